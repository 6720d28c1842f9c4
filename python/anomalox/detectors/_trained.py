"""The shared base of detectors that train a network on the good images (the tch part).

A trained detector keeps the three hooks of ``BaseDetector``; its feature dicts also carry the
preprocessed input batch under ``INPUT`` (the frozen backbone's taps are the rest). Fitting gathers
every training image and the frozen network's features once (memory: the preprocessed images,
N · 3 · H · W float32, plus the taps; with ``cache_features=False`` the images only, and the
backbone runs again on each mini-batch), then runs the training loop in Rust, one epoch per call
with the GIL released, mini-batches in a seeded shuffled order; Python draws the progress bar,
keeps ``loss_history_`` and stops early between epochs. The trained weights are a learned
attribute (a dict of arrays), so model files hold them.

Determinism: the same ``random_state``, inputs and ``n_threads`` give bit-identical weights on the
CPU (the initialisation and the shuffle are seeded by it alone, and libtorch's CPU kernels are
deterministic for a fixed thread count). Another thread count changes how the convolutions' backward
passes split their sums, so the first step's gradients differ by rounding, and training amplifies
that like any other perturbation: weights and scores of fits with different thread counts are not
equal, and differ about as much as fits with different seeds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from numbers import Real
from typing import Any, ClassVar

import numpy as np
import torch

from anomalox.backbone import BACKBONES, tch_available, tch_unavailable_reason
from anomalox.detectors._base import BaseDetector, seed_from
from anomalox.params import POSITIVE_INT, Interval, Options, Unchecked

__all__ = ["INPUT", "TRAINING_PARAMETERS_DOC", "TrainedDetector"]

# The key of the preprocessed input batch in a trained detector's feature dicts.
INPUT = "__input__"

# Placed in a trained detector's Parameters section in place of the line "    <training parameters>".
TRAINING_PARAMETERS_DOC = """\
    max_epochs : int; max_steps : int or None
        Passes over the training images, and an optional cap on optimisation steps in all.
    optimizer : "sgd", "adam" or "adamw"; learning_rate : float; momentum : float (SGD);
    betas : (float, float) (Adam, AdamW); weight_decay : float
        libtorch's ``torch::optim::SGD`` / ``Adam`` / ``AdamW`` (the code of ``torch.optim``'s;
        with SGD and Adam weight decay is the L2 term added to the gradient, with AdamW the
        decoupled decay).
    lr_schedule : "constant", "cosine" or "multistep"
        Cosine: the rate falls from ``learning_rate`` to 0 over the training steps; multistep:
        × 0.4 from 80 % of the steps and again from 90 % (SuperSimpleNet's).
    grad_clip_norm : float or None
        Clip the gradients' global L2 norm before each step.
    early_stopping_patience : int or None
        Stop when the held-out validation images' loss has not improved for this many epochs,
        and keep the weights of the best epoch (needs ``calibration="holdout"`` and
        ``validation_fraction > 0``; those images then also pick the epoch, not only calibrate).
    cache_features : bool
        True (default): the frozen backbone runs once per training image and its taps stay in
        memory for every epoch: N · Σ_taps C·h·w float32 (100 images at 256 px: 67 MB with the
        three Lite0 taps ``_blocks.2/4/10``, 734 MB with Wide-ResNet-50-2's ``layer1-3``). False,
        where they do not fit: the taps of the training images are dropped as they are gathered
        (the backbone still runs once over them then), only the preprocessed images stay
        (N · 3 · H · W float32, 79 MB for 100 images at 256 px), and the backbone runs again on
        every mini-batch (each epoch then costs a backbone pass over the images, as in anomalib);
        the held-out images' taps (early stopping) are still kept. The training is the same, its
        results equal up to float rounding (the backbone sees other batches).
    batch_size : int
        Images per training step and per scoring pass."""

_TRAINING_MARKER = "    <training parameters>"


class _Betas:
    """Constraint: two reals in [0, 1)."""

    def is_satisfied_by(self, value: Any) -> bool:
        try:
            b1, b2 = value
        except (TypeError, ValueError):
            return False
        return all(isinstance(b, Real) and not isinstance(b, bool) and 0 <= float(b) < 1 for b in (b1, b2))

    def __str__(self) -> str:
        return "a pair of floats in [0, 1)"


class TrainedDetector(BaseDetector):
    """Shared training machinery; see the module docstring. Not used directly.

    Subclasses implement ``_new_model(backbone, seed, shapes)`` (the Rust model to train, freshly
    initialised) and the scoring hook; ``_targets(features)`` (the list of tensors it is trained to
    match, from a feature dict) defaults to the backbone's taps.
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "max_epochs": [POSITIVE_INT],
        "max_steps": [POSITIVE_INT, None],
        "optimizer": [Options({"sgd", "adam", "adamw"})],
        "learning_rate": [Interval(Real, 0.0, None, closed="neither")],
        "momentum": [Interval(Real, 0.0, 1.0, closed="left")],
        "betas": [_Betas()],
        "weight_decay": [Interval(Real, 0.0, None, closed="left")],
        "lr_schedule": [Options({"constant", "cosine", "multistep"})],
        "grad_clip_norm": [Interval(Real, 0.0, None, closed="neither"), None],
        "early_stopping_patience": [POSITIVE_INT, None],
        "cache_features": [Unchecked("its truth value")],
    }
    # The trained model of the current weights (rebuilt when the weights attribute changes).
    _model_cache: tuple[Any, Any] | None = None
    # Set by _learn / _split for the hooks: the frozen backbone and the held-out items.
    _training_backbone: Any = None
    _validation_items: list[Any] | None = None
    # Subclasses: the learned attribute holding the trained weights.
    _weights_attribute: ClassVar[str] = "weights_"
    # Subclasses whose model is built from the taps' per-image shapes: the learned attribute holding
    # them, a tuple of (C, h, w) (None: the model does not need them).
    _shapes_attribute: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        if cls.__doc__ and _TRAINING_MARKER in cls.__doc__:
            cls.__doc__ = cls.__doc__.replace(_TRAINING_MARKER, TRAINING_PARAMETERS_DOC)
        super().__init_subclass__(**kwargs)

    # ----------------------------------------------------------- subclass hooks
    def _new_model(self, backbone: Any, seed: int, shapes: list[tuple[int, ...]] | None) -> Any:
        """The Rust model, freshly initialised from `seed`; `shapes`: the targets' per-image shapes
        (at fit; after a load, ``_fitted_shapes()``)."""
        raise NotImplementedError

    def _fitted_shapes(self) -> list[tuple[int, ...]] | None:
        """The targets' per-image shapes the fitted model was built for, where it needs them."""
        if self._shapes_attribute is None:
            return None
        return [tuple(int(v) for v in s) for s in getattr(self, self._shapes_attribute)]

    def _fit_features(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """The trained state (weights, ``loss_history_``, and the shapes where recorded)."""
        model, history, shapes = self._fit_trained(batches)
        state = self._trained_state(model, history)
        if self._shapes_attribute is not None:
            state[self._shapes_attribute] = tuple(shapes)
        return state

    def _targets(self, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The frozen backbone's taps of a feature dict, in order (every entry but the input)."""
        return [features[name] for name in features if name != INPUT]

    # ------------------------------------------------------------ for subclasses
    @staticmethod
    def _cuda(backbone: Any) -> int | None:
        """The CUDA device index of `backbone`, None on the CPU (the Rust models' `cuda` argument)."""
        return backbone.device.index if backbone.device.type == "cuda" else None

    def _trained_state(self, model: Any, history: list[float]) -> dict[str, Any]:
        """The learned attributes of a fit: the trained weights (the model is kept as their cache)
        and ``loss_history_``."""
        weights = {name: t.numpy() for name, t in model.state_dict()}
        self._model_cache = (weights, model)
        return {self._weights_attribute: weights, "loss_history_": tuple(history)}

    def _epochs_summary(self) -> str:
        """ "N epochs, final loss L" for the repr."""
        epochs = len(self.loss_history_)
        last = f", final loss {self.loss_history_[-1]:.4g}" if epochs else ""
        return f"{epochs} epochs{last}"

    # ----------------------------------------------------------------- backbone
    def _check_params(self) -> None:
        if self.early_stopping_patience is not None and (
            self.calibration != "holdout" or not self.validation_fraction > 0
        ):
            raise ValueError(
                f"early_stopping_patience: needs held-out images (calibration='holdout' and validation_fraction > 0), "
                f"got calibration={self.calibration!r}, validation_fraction={self.validation_fraction!r}"
            )

    def build_backbone(self) -> Any:
        """The frozen pretrained network (an ``anomalox.Backbone``): trained detectors run in the tch part."""
        name = type(self).__name__
        if isinstance(self.backbone, torch.nn.Module):
            raise ValueError(
                f"backbone: {name} trains a network of the backbone's architecture in anomalox's tch part; pass a "
                f"name of anomalox.backbone.BACKBONES, got a {type(self.backbone).__name__} module"
            )
        if not tch_available():
            raise ImportError(f"{name} trains in anomalox's tch part, which does not load: {tch_unavailable_reason()}")
        return super().build_backbone()

    def _forward(self, backbone: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = super()._forward(backbone, x)
        feats[INPUT] = x
        return feats

    def _learn(self, backbone: Any, batches: Iterator[Any], total: int | None, held: bool) -> dict[str, Any]:
        self._training_backbone = backbone
        try:
            return super()._learn(backbone, batches, total, held)
        finally:
            self._training_backbone = None
            self._validation_items = None

    def _split(self, source: Any) -> tuple[Iterator[Any], list[Any]]:
        batches, held = super()._split(source)
        self._validation_items = held
        return batches, held

    def _gather(
        self, batches: Iterator[dict[str, torch.Tensor]], keep_targets: bool = True
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None, list[tuple[int, ...]]]:
        """Every image of `batches` and (with `keep_targets`) its targets, concatenated along the
        image axis; and the targets' per-image shapes."""
        images: list[torch.Tensor] = []
        targets: list[list[torch.Tensor]] = []
        shapes: list[tuple[int, ...]] = []
        for feats in batches:
            images.append(feats[INPUT])
            batch = self._targets(feats)
            shapes = [tuple(int(v) for v in t.shape[1:]) for t in batch]
            if keep_targets:
                targets.append([t.contiguous() for t in batch])
        x = torch.cat(images) if len(images) > 1 else images[0]
        y = [torch.cat(parts) if len(parts) > 1 else parts[0] for parts in zip(*targets)] if keep_targets else None
        if not bool(torch.isfinite(x).all()):
            raise ValueError("X: the preprocessed training images hold NaN or infinite values")
        return x.contiguous(), y, shapes

    def _validation_set(self) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        items = self._validation_items
        if not items or self.early_stopping_patience is None:
            return None
        backbone = self._training_backbone
        groups = (
            group.features
            for start in range(0, len(items), self.batch_size)
            for group in self._groups(backbone, items[start : start + self.batch_size])
        )
        x, y, _ = self._gather(groups)
        assert y is not None
        return x, y

    # ------------------------------------------------------------------- training
    def _epoch(
        self, model: Any, x: torch.Tensor, y: list[torch.Tensor] | None, order: list[int], threads: int
    ) -> list[float]:
        """One epoch's step losses: over the cached targets `y`, or (None) with the backbone run on
        each mini-batch of `x` in `order`."""
        if y is not None:
            return list(model.train_epoch(x, y, order, self.batch_size, self.max_steps, threads))
        losses: list[float] = []
        for start in range(0, len(order), self.batch_size):
            if self.max_steps is not None and model.step >= self.max_steps:
                break
            xb = x[torch.tensor(order[start : start + self.batch_size], device=x.device)]
            yb = [t.contiguous() for t in self._targets(self._forward(self._training_backbone, xb))]
            losses += model.train_epoch(xb, yb, list(range(len(xb))), len(xb), self.max_steps, threads)
        return losses

    def _train(self, model: Any, x: torch.Tensor, y: list[torch.Tensor] | None, seed: int) -> list[float]:
        """The training loop over `x` / `y` (None: targets computed per mini-batch); returns the
        per-epoch mean training loss."""
        n = int(x.shape[0])
        threads = self._threads()
        steps_per_epoch = math.ceil(n / self.batch_size)
        total = self.max_epochs * steps_per_epoch
        if self.max_steps is not None:
            total = min(total, int(self.max_steps))
        b1, b2 = self.betas
        model.configure(
            self.optimizer,
            float(self.learning_rate),
            float(self.weight_decay),
            float(self.momentum),
            0.0,
            False,
            (float(b1), float(b2)),
            1e-8,
            None if self.grad_clip_norm is None else float(self.grad_clip_norm),
            self.lr_schedule,
            total,
        )
        validation = self._validation_set()
        rng = np.random.default_rng(seed)
        history: list[float] = []
        best: tuple[float, Any] = (math.inf, None)
        waited = 0
        with self._progress(total, "fit: train", unit="step") as bar:
            for epoch in range(1, self.max_epochs + 1):
                order = rng.permutation(n).tolist()
                start = time.perf_counter()
                losses = self._epoch(model, x, y, order, threads)
                if not losses:
                    break
                seconds = max(time.perf_counter() - start, 1e-9)
                history.append(float(np.mean(losses)))
                bar.update(len(losses))
                seen = min(n, len(losses) * self.batch_size)
                postfix = {"epoch": epoch, "loss": f"{history[-1]:.4g}", "img/s": f"{seen / seconds:.1f}"}
                if validation is not None:
                    val_loss = model.evaluate(validation[0], validation[1], self.batch_size, threads)
                    postfix["val"] = f"{val_loss:.4g}"
                    if val_loss < best[0]:
                        best, waited = (val_loss, model.state_dict()), 0
                    else:
                        waited += 1
                bar.set_postfix(postfix)
                if validation is not None and waited >= self.early_stopping_patience:
                    break
                if self.max_steps is not None and model.step >= self.max_steps:
                    break
        if best[1] is not None:
            model.load_state_dict(best[1])
        return history

    def _threads(self) -> int:
        from anomalox._convert import resolve_threads

        return resolve_threads(self.n_threads)

    def _fit_trained(
        self, batches: Iterator[dict[str, torch.Tensor]]
    ) -> tuple[Any, list[float], list[tuple[int, ...]]]:
        """Gather, build a fresh model and train it: (model, loss history, the targets' per-image shapes)."""
        backbone = self._training_backbone
        x, y, shapes = self._gather(batches, keep_targets=bool(self.cache_features))
        seed = seed_from(self.random_state)
        # The initial weights come from the model's own generator seeded with `seed` (never torch's
        # global one): the caller's torch random state is left as it was.
        model = self._new_model(backbone, seed, shapes)
        history = self._train(model, x, y, seed)
        return model, history, shapes

    def _model(self) -> Any:
        """The trained model of the current weights (built from them after load or a refit)."""
        weights = getattr(self, self._weights_attribute)
        cache = self._model_cache
        if cache is not None and cache[0] is weights:
            return cache[1]
        model = self._new_model(self.backbone_, 0, self._fitted_shapes())
        model.load_state_dict([(k, torch.from_numpy(np.ascontiguousarray(v))) for k, v in weights.items()])
        self._model_cache = (weights, model)
        return model


def tch_module() -> Any:
    """The loaded ``anomalox_tch._tch`` extension (callers have checked ``tch_available``)."""
    if not tch_available():
        raise ImportError(f"anomalox's tch part does not load: {tch_unavailable_reason()}")
    import anomalox_tch

    return anomalox_tch._tch


def spec_of(backbone: Any) -> tuple[str, dict[str, Any]]:
    """(family, structural config) of a named backbone."""
    spec = BACKBONES[backbone.name]
    return spec.family, dict(spec.config)
