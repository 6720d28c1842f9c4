"""The shared base of every detector: input handling, feature extraction, maps, thresholds.

A detector subclass implements three hooks:

- ``_fit_features(batches)``: learn from an iterator of feature dicts ``{tap: (n, C, h, w)}``;
  returns a dict of learned attributes (names ending in ``_``).
- ``_score_features(features)``: ``(scores or None, maps)`` with ``maps`` (n, h, w) on the feature
  grid; ``None`` scores mean "the maximum of the smoothed map at input resolution".
- ``_summary()``: a short description of the fitted state for the repr.

Detectors that learn a model per feature-grid position (``per_position = True``: PaDiM, DFM)
get, when tiling, the tiles' features image-major with ``self._positions`` tiles per image (every
image has the same tile layout). They, and detectors that keep the training images' feature maps
(``one_size_untiled = True``: SPADE), need every image at one size (untiled, or always for
``per_position``); they list ``input_size_`` in ``learned_attributes`` and the base sets it: the
preprocessed size they were fitted on (None where any size is accepted).

It declares three tables: ``learned_attributes`` (the names ``_fit_features`` returns: the
fitted state that ``state_dict`` exports and model files hold), ``_parameter_constraints`` (its
own parameters' constraints, checked by ``fit``; the shared ones are declared here) and
``_default_layers`` (its default taps per tap naming, see ``anomalox.detectors.families``).
Its docstring lists its own parameters and the line ``<shared parameters>``, replaced by the
shared parameters' text.
"""

from __future__ import annotations

import html
import importlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError

from anomalox import ops
from anomalox.backbone import Backbone, tch_available, tch_unavailable_reason
from anomalox.data import Source, as_source
from anomalox.detectors.calibration import calibration_cdf, conformal_threshold, p_values
from anomalox.detectors.families import rules_for
from anomalox.params import POSITIVE_INT, Interval, Options, Unchecked, check, validate_params

__all__ = [
    "BaseDetector",
    "Inspection",
    "NotFittedError",
    "SHARED_PARAMETERS_DOC",
    "as_rows",
    "seed_from",
    "stack_taps",
]

# Placed in each detector's Parameters section in place of the line "    <shared parameters>".
SHARED_PARAMETERS_DOC = """\
    image_size : int, (h, w) or None; keep_aspect_ratio : bool
        Resize target: an int is a square, (h, w) an exact size (both ignore the aspect ratio);
        with ``keep_aspect_ratio=True`` an int is the short side and the long side keeps the
        image's proportions; None keeps each image's own size (its native resolution).
    crop_size : int or (h, w), optional
        Center crop after resizing (maps then cover the crop).
    tile_size : int or (h, w), optional; tile_stride : int or (h, w), optional
        Cut each (resized, cropped) image into tiles of ``tile_size`` every ``tile_stride`` pixels
        (default ``tile_size``: no overlap; the last tile of a row or column is flush with the
        border), featurise them in batches of ``batch_size`` tiles, and stitch the tile maps into
        one map per image, averaging where tiles overlap (``anomalox.ops.stitch``). The image score
        is then the maximum of the stitched, smoothed map. Use it with ``image_size=None`` or
        ``keep_aspect_ratio`` to keep small defects of large or long images at their native scale.
        Memory banks (PatchCore, SPADE) are shared over tile positions; PaDiM and DFM learn one
        model per tile position, so every image must have the same size.
    weights : see ``anomalox.Backbone``; device : "cpu" or "cuda[:N]"
    preprocessing : None, (mean, std) or callable
        Only for a ``torch.nn.Module`` backbone (then ``layers`` names its tap submodules): the
        per-channel mean and std the module expects of [0, 1] RGB pixels (default ImageNet's), or
        a callable mapping a float (N, 3, H, W) batch in [0, 1] to the module's input.
    batch_size : int
        Images per forward pass.
    contamination : float in (0, 0.5)
        The false-alarm rate α asked of ``predict``: ``threshold_`` is the conformal threshold, the
        ⌈(n + 1)(1 − α)⌉-th smallest of n calibration scores of good images. With "holdout", a new
        good image scores above it with probability at most α (split-conformal, under
        exchangeability); with "cv" the scores come from the fold models, not the final one, so
        that bound is not guaranteed (cross-conformal methods only guarantee about 2α). Needs
        n + 1 >= 1/α; with fewer, ``threshold_`` is the largest score and ``fit`` emits
        ``CalibrationWarning``.
    calibration : "holdout" or "cv"; validation_fraction : float in [0, 1); n_folds : int >= 2
        Where the calibration scores come from. "holdout": ``validation_fraction`` of the images
        are held out (not learned from) and scored; one fit. "cv": the images are split into
        ``n_folds`` folds, a model fitted on the other folds scores each fold, and the final model
        learns from all images: every image is a calibration image, at the cost of
        ``n_folds + 1`` fits; needs a sized X (folder, paths, arrays, tensors).
    random_state : int or None; n_threads : int or None; verbose : bool (progress bars)"""

_SHARED_MARKER = "    <shared parameters>"


def _owned(data: Mapping[str, Any]) -> dict[str, Any]:
    """`data` with its read-only arrays (views into Ray's object store) copied; others kept."""
    return {k: writable(v) if isinstance(v, np.ndarray) else v for k, v in data.items()}


def writable(array: np.ndarray) -> np.ndarray:
    """`array`, or a copy of it when it is read-only (an array that came through Ray's object
    store): torch.from_numpy warns on read-only arrays, and in-place work on them fails."""
    return array if array.flags.writeable else np.array(array)


@dataclass
class Inspection:
    """Everything one pass over images gives: scores, maps, predicted labels and paths.

    ``maps`` is an (N, H, W) float32 array when all maps share a size, else a list of (H, W)
    arrays; ``labels`` are 0/1 with ``threshold`` (None when the detector has no threshold).
    """

    scores: np.ndarray
    maps: np.ndarray | list[np.ndarray]
    labels: np.ndarray | None
    paths: list[str | None]
    threshold: float | None


@dataclass
class _Group:
    """One backbone pass: features of images (or of their tiles, image-major) of one batch.

    ``sizes``: each image's size before preprocessing; ``input_sizes``: after (its map's size
    before ``_postprocess``); ``offsets``: each image's tile corners (T_i, 2), or None untiled.
    """

    features: dict[str, torch.Tensor]
    sizes: list[tuple[int, int]]
    input_sizes: list[tuple[int, int]]
    offsets: list[np.ndarray] | None

    @property
    def n_images(self) -> int:
        return len(self.sizes)


def _size_or_pair(value: Any, name: str) -> tuple[int, int] | None:
    """None, or an int / (h, w) pair of positive ints as (h, w); ValueError naming `name`."""
    if value is None:
        return None
    from anomalox.preprocess import size_pair

    return size_pair(value, name)


_NOTICED: set[str] = set()


def _notice_fallback(name: str) -> None:
    """One line on the ``anomalox`` logger, once per backbone name: the tch part is not used."""
    if name not in _NOTICED:
        _NOTICED.add(name)
        logging.getLogger("anomalox").warning(
            "anomalox: %s runs in torch %s (the tch part does not load: %s)",
            name,
            torch.__version__,
            tch_unavailable_reason(),
        )


def _is_module(value: Any) -> bool:
    return isinstance(value, torch.nn.Module)


def _normalisation(value: Any) -> tuple[Any, Any, Any]:
    """(mean, std, callable) from a ``preprocessing`` parameter; ValueError naming it otherwise."""
    if value is None:
        return None, None, None
    if callable(value):
        return None, None, value
    pair: Any = None
    if isinstance(value, Mapping) and set(value) == {"mean", "std"}:
        pair = (value["mean"], value["std"])
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        pair = value
    if pair is not None:
        # Each of mean and std: 3 finite reals (std positive); checked here so the error names the argument.
        try:
            mean, std = (tuple(float(v) for v in part) for part in pair)
        except (TypeError, ValueError):
            mean = std = ()
        if len(mean) == 3 and len(std) == 3 and all(np.isfinite(mean)) and all(s > 0 and np.isfinite(s) for s in std):
            return mean, std, None
    raise ValueError(
        f"preprocessing: expected None, a (mean, std) pair of 3 values each (std positive), "
        f"{{'mean': ..., 'std': ...}} or a callable, got {value!r}"
    )


def _check_module_device(device: Any, module_device: torch.device) -> None:
    """A module backbone runs where it is: ``device`` must name that device (ValueError otherwise)."""
    try:
        asked = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: expected 'cpu' or 'cuda[:N]', got {device!r}") from exc
    if asked.type == "cuda" and asked.index is None and torch.cuda.is_available():
        asked = torch.device("cuda", torch.cuda.current_device())
    if asked != module_device:
        raise ValueError(
            f"device: a torch module backbone runs on its own device, {module_device}; got device={device!r}. "
            f"Set device='{module_device}' or move the module (module.to(...)) first"
        )


class _Silent:
    """The progress-bar interface, doing nothing (verbose=False)."""

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        return None


class _Maps:
    """Collects maps into one (N, H, W) array while they share a size; falls back to a list of
    (H, W) arrays when sizes differ.

    The array is allocated for ``capacity`` maps up front (an exact count for sized inputs, an
    estimate for an iterable of batches) and doubled when it runs out. Pages of the unused tail are
    never touched, so an over-estimate costs address space, not memory. Copying each batch in
    (instead of keeping per-image views of the batch tensors and stacking them at the end) frees
    every batch at once: no final stacking copy, and no live map blocks pinning the allocator's
    heap between the backbone's temporaries (measured once: PaDiM scoring 630 streamed images
    peaked about 700 MB lower).
    """

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.array: np.ndarray | None = None
        self.items: list[np.ndarray] | None = None
        self.count = 0

    def add(self, amap: np.ndarray) -> None:
        if self.items is None and (self.array is None or amap.shape == self.array.shape[1:]):
            if self.array is None:
                self.array = np.empty((max(self.capacity or 64, 1), *amap.shape), np.float32)
            elif self.count == self.array.shape[0]:
                grown = np.empty((2 * self.count, *amap.shape), np.float32)
                grown[: self.count] = self.array
                self.array = grown
            self.array[self.count] = amap
        else:
            if self.items is None:
                self.items = [] if self.array is None else list(self.array[: self.count])
                self.array = None
            self.items.append(np.ascontiguousarray(amap))
        self.count += 1

    def result(self) -> np.ndarray | list[np.ndarray]:
        if self.array is not None:
            return self.array[: self.count]
        items = self.items or []
        return np.stack(items) if len({m.shape for m in items}) == 1 else items


def _n_batches(source: Source) -> int | None:
    """The length of an iterable of batches when it has one (a DataLoader: its number of batches)."""
    if source.sized:
        return None
    try:
        return int(len(source.batches))  # type: ignore[arg-type]
    except TypeError:
        return None


_BACKBONE = Unchecked("anomalox.Backbone")
_CONTAMINATION = [Interval(Real, 0.0, 0.5, closed="neither")]


class BaseDetector(BaseEstimator):
    """Shared machinery; see the module docstring. Not used directly.

    State contract: ``learned_attributes`` names what ``fit`` learns; ``state_dict()`` exports it
    (with ``calibrated_attributes``: the thresholds and their calibration scores) and
    ``load_state_dict(state)`` restores it, rebuilding the backbone from the parameters. Model
    files (``anomalox.save`` / ``anomalox.load``) go through these only.
    """

    # The calibration state every detector has; all but threshold_ may be absent from a state
    # written before calibration scores were kept (it then loads with them None).
    calibrated_attributes: ClassVar[tuple[str, ...]] = (
        "threshold_",
        "calibration_scores_",
        "pixel_threshold_",
        "pixel_calibration_scores_",
    )
    threshold_: float | None
    calibration_scores_: np.ndarray | None
    pixel_threshold_: float | None
    pixel_calibration_scores_: np.ndarray | None

    # Subclasses: the names _fit_features returns (besides threshold_ and backbone_, set here).
    learned_attributes: ClassVar[tuple[str, ...]] = ()
    # Learned attributes a state written by an older version may lack, and the value they load with.
    _learned_defaults: ClassVar[dict[str, Any]] = {}
    # Subclasses that fit one model per feature-grid position (see the module docstring).
    per_position: ClassVar[bool] = False
    # Subclasses whose fitted state holds feature maps of one grid: images of one size unless tiled.
    one_size_untiled: ClassVar[bool] = False
    # Tiles per image for the hooks of per_position detectors (1 untiled); set by the base.
    _positions: int = 1
    # Subclasses: default taps per tap naming (FamilyRules.taps), and the sigma of the map smoothing.
    _default_layers: ClassVar[dict[str, tuple[str, ...]]] = {}
    _sigma: ClassVar[float] = 4.0
    # The parameters every detector has; a subclass's table adds its own (see parameter_constraints).
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "backbone": [_BACKBONE],
        "layers": [_BACKBONE],
        "image_size": [_BACKBONE],
        "crop_size": [_BACKBONE],
        "keep_aspect_ratio": [Unchecked("its truth value")],
        "tile_size": [Unchecked("None, an int or an (h, w) pair; checked by fit")],
        "tile_stride": [Unchecked("None, an int or an (h, w) pair; checked by fit")],
        "weights": [_BACKBONE],
        "device": [_BACKBONE],
        "preprocessing": [Unchecked("None, (mean, std) or a callable; checked by fit")],
        "batch_size": [POSITIVE_INT],
        "validation_fraction": [Interval(Real, 0.0, 1.0, closed="left")],
        "contamination": _CONTAMINATION,
        "calibration": [Options({"holdout", "cv"})],
        "n_folds": [Interval(Integral, 2, None, closed="left")],
        "random_state": [Unchecked("numpy.random.default_rng")],
        "n_threads": [POSITIVE_INT, None],
        "verbose": [Unchecked("its truth value selects progress bars")],
    }
    # The model-file writer, registered by anomalox.persist (detectors never import it).
    _saver: ClassVar[Callable[[BaseDetector, str | os.PathLike[str]], str] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__doc__ and _SHARED_MARKER in cls.__doc__:
            cls.__doc__ = cls.__doc__.replace(_SHARED_MARKER, SHARED_PARAMETERS_DOC)

    @classmethod
    def parameter_constraints(cls) -> dict[str, list[Any]]:
        """Every parameter's constraints: the shared table merged with the subclasses' own."""
        merged: dict[str, list[Any]] = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get("_parameter_constraints", {}))
        return merged

    @classmethod
    def register_saver(cls, saver: Callable[[BaseDetector, str | os.PathLike[str]], str]) -> None:
        """Make ``detector.save(path)`` call ``saver(detector, path)`` (``anomalox.persist`` registers its own)."""
        BaseDetector._saver = saver

    # ------------------------------------------------------------------ hooks
    def _fit_features(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, Any]:
        raise NotImplementedError

    def _score_features(self, features: dict[str, torch.Tensor]) -> tuple[np.ndarray | None, torch.Tensor]:
        raise NotImplementedError

    def _summary(self) -> str:
        return ""

    # Mergeable detectors (``mergeable = True``: PaDiM, DFM, SPADE, PatchCore) implement three more
    # hooks, used by ``partial_fit`` / ``merge`` / ``anomalox.distributed.fit``:
    # ``_partial_features(batches)`` gives a partial state (a dict of numpy arrays and plain values,
    # picklable) of some images; ``_merge_partials(a, b)`` the partial state of both image sets
    # (associative: any merge tree gives the same model, to rounding); ``_finish_partial(data)`` the
    # learned attributes (``input_size_`` excepted) of a partial state.
    mergeable: ClassVar[bool] = False

    def _partial_features(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, Any]:
        raise NotImplementedError

    def _merge_partials(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _finish_partial(self, data: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _check_params(self) -> None:
        """Subclass rules the constraint table cannot express (called by fit before anything is changed)."""

    def _tiling(self) -> tuple[tuple[int, int], tuple[int, int]] | None:
        """(tile, stride) from ``tile_size`` / ``tile_stride``, or None untiled; ValueError naming the argument."""
        tile = _size_or_pair(self.tile_size, "tile_size")
        stride = _size_or_pair(self.tile_stride, "tile_stride")
        if tile is None:
            if stride is not None:
                raise ValueError(f"tile_stride: set without tile_size, got tile_stride={self.tile_stride!r}")
            return None
        stride = tile if stride is None else stride
        if stride[0] > tile[0] or stride[1] > tile[1]:
            raise ValueError(
                f"tile_stride: expected at most tile_size {tile} so that tiles leave no gaps, got {stride}"
            )
        return tile, stride

    def _check_shared(self) -> None:
        """Rules of the shared parameters the table cannot express."""
        if self.keep_aspect_ratio and self.image_size is not None and not isinstance(self.image_size, Integral):
            raise ValueError(
                f"keep_aspect_ratio: True needs an int image_size (the short side), got image_size={self.image_size!r}"
            )
        self._tiling()

    # --------------------------------------------------------------- helpers
    def _layers_for(self, backbone: str) -> tuple[str, ...] | None:
        if self.layers is not None:
            return (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)
        return self._default_layers.get(rules_for(backbone).taps)

    def build_backbone(self) -> Any:
        """A new backbone for the current parameters (``backbone``, ``layers``, sizes, weights, device).

        A ``torch.nn.Module`` gives an ``anomalox.torch_backbone.ModuleBackbone``; a name gives an
        ``anomalox.Backbone`` (tch) when anomalox's tch part loads, and otherwise the same network
        with the same weights in the installed torch (``reference_backbone``), after a one-line
        notice (logger ``anomalox``, once per backbone name).
        """
        sizes = {
            "image_size": 224 if self.image_size is None else self.image_size,
            "center_crop": self.crop_size,
            "keep_aspect_ratio": bool(self.keep_aspect_ratio),
            "resize": self.image_size is not None,
        }
        if _is_module(self.backbone):
            from anomalox.torch_backbone import ModuleBackbone

            if self.layers is None:
                raise ValueError(
                    "layers: a torch module backbone needs the names of the submodules whose outputs are the taps, "
                    "e.g. layers=['layer2', 'layer3'] for a torchvision ResNet; got None"
                )
            layers = (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)
            if self.weights is not None:
                raise ValueError(
                    f"weights: a torch module backbone carries its own weights; load them into the module, "
                    f"got weights={self.weights!r}"
                )
            mean, std, function = _normalisation(self.preprocessing)
            built = ModuleBackbone(self.backbone, layers, mean=mean, std=std, preprocess=function, **sizes)
            _check_module_device(self.device, built.device)
            return built
        if not isinstance(self.backbone, str):
            raise ValueError(
                f"backbone: expected a name of anomalox.backbone.BACKBONES or a torch.nn.Module, "
                f"got {type(self.backbone).__name__}"
            )
        if self.preprocessing is not None:
            raise ValueError(
                f"preprocessing: only for a torch module backbone; the named backbone {self.backbone!r} has its own "
                f"normalisation, got preprocessing={self.preprocessing!r}"
            )
        name = str(self.backbone).replace("-", "_")
        if not tch_available():
            from anomalox.torch_backbone import reference_backbone

            _notice_fallback(name)
            return reference_backbone(
                name, layers=self._layers_for(name), weights=self.weights, device=self.device, **sizes
            )
        return Backbone(
            name,
            layers=self._layers_for(name),
            weights=self.weights,
            device=self.device,
            image_size=self.image_size,
            center_crop=self.crop_size,
            keep_aspect_ratio=bool(self.keep_aspect_ratio),
            resize=self.image_size is not None,
        )

    @property
    def tiling_(self) -> tuple[tuple[int, int], tuple[int, int]] | None:
        """((tile h, w), (stride h, w)) the fitted detector cuts images into, or None untiled.

        As fitted: ``set_params(tile_size=...)`` after ``fit`` takes effect at the next fit only.
        """
        self.check_is_fitted()
        return self._tiles

    def __sklearn_clone__(self) -> BaseDetector:
        """``sklearn.base.clone``: a new unfitted detector with the same parameters, each cloned as
        sklearn does, except a ``torch.nn.Module`` backbone, which is shared (not deep-copied: it
        may be large, or on a GPU)."""
        from sklearn.base import clone

        params = self.get_params(deep=False)
        return type(self)(
            **{k: v if k == "backbone" and _is_module(v) else clone(v, safe=False) for k, v in params.items()}
        )

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "backbone_")

    def check_is_fitted(self) -> None:
        """Raise ``NotFittedError`` unless ``fit`` (or ``load_state_dict``) has run."""
        if not hasattr(self, "backbone_"):
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet: call fit(X) with images of good parts first"
            )

    def _progress(self, total: int | None, desc: str, unit: str = "img") -> Any:
        if not self.verbose:
            return _Silent()
        try:  # notebook bars need ipywidgets; without it tqdm.auto only warns, so use text bars
            import ipywidgets  # noqa: F401
            from tqdm.auto import tqdm
        except ImportError:
            from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit=unit, leave=False)

    def _forward(self, backbone: Backbone, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = backbone.features(x, preprocess=False, n_threads=self.n_threads)
        return {k: v.cpu() for k, v in feats.items()}

    def _groups(self, backbone: Backbone, items: list[Any]) -> Iterator[_Group]:
        """Backbone passes over one batch of items, in order: one pass when the images come out at
        one size, one per run of equal sizes otherwise; with tiles, one group of all their tiles,
        featurised ``batch_size`` tiles at a time."""
        prep = backbone.preprocessing
        images = items if len(items) > 1 else items[0]
        tiles = self._tiles
        if tiles is None and prep.fixed_size:
            x, sizes = prep.transform(images, backbone.device)
            yield _Group(self._forward(backbone, x), sizes, [(x.shape[-2], x.shape[-1])] * len(sizes), None)
            return
        each, sizes = prep.transform_each(images, backbone.device)
        input_sizes = [(int(m.shape[-2]), int(m.shape[-1])) for m in each]
        if tiles is None:
            start = 0
            while start < len(each):
                stop = start + 1
                while stop < len(each) and input_sizes[stop] == input_sizes[start]:
                    stop += 1
                x = torch.stack(each[start:stop])
                yield _Group(self._forward(backbone, x), sizes[start:stop], input_sizes[start:stop], None)
                start = stop
            return
        tile, stride = tiles
        offsets = [self._tile_offsets(size, tile, stride) for size in input_sizes]
        crops = [m[:, r : r + tile[0], c : c + tile[1]] for m, off in zip(each, offsets) for r, c in off.tolist()]
        parts = [
            self._forward(backbone, torch.stack(crops[i : i + self.batch_size]))
            for i in range(0, len(crops), self.batch_size)
        ]
        feats = {k: torch.cat([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in parts[0]}
        yield _Group(feats, sizes, input_sizes, offsets)

    def _tile_offsets(self, size: tuple[int, int], tile: tuple[int, int], stride: tuple[int, int]) -> np.ndarray:
        if tile[0] > size[0] or tile[1] > size[1]:
            resize = "" if self.image_size is None else f" after image_size={self.image_size!r}"
            raise ValueError(
                f"tile_size: expected tiles no larger than the images, got {tile[0]}x{tile[1]} tiles for an image of "
                f"{size[0]}x{size[1]} (h x w){resize}; use a smaller tile_size or a larger image_size"
            )
        return ops.tile_offsets(size[0], size[1], tile, stride)

    def _one_size(self, group: _Group) -> bool:
        """Whether the images of `group` must all come out at the fitted size."""
        return self.per_position or (self.one_size_untiled and group.offsets is None)

    def _check_positions(self, group: _Group, expected: Any) -> tuple[int, int]:
        """Every image at the size the detector was fitted on (`expected`, None while fitting the
        first group); sets ``self._positions``. Returns that size."""
        size = group.input_sizes[0]
        other = next((s for s in group.input_sizes if s != size), None)
        if expected is not None and tuple(expected) != size:
            size, other = (int(expected[0]), int(expected[1])), size
        if other is not None:
            name = type(self).__name__
            if self.per_position:
                why = f"learns one model per feature position{' and tile' if group.offsets is not None else ''}"
                fix = "or tile images of equal size; PatchCore and SPADE (tiled) accept any size"
            else:
                why = "compares each image's feature map with the training images' maps"
                fix = "or set tile_size (tiles all have one size)"
            raise ValueError(
                f"X: {name} {why}, so every image must come out of preprocessing at one size; got "
                f"{size[0]}x{size[1]} and {other[0]}x{other[1]} (h x w). Resize to one size (image_size as an int "
                f"or (h, w)), {fix}"
            )
        self._positions = 1 if group.offsets is None else len(group.offsets[0])
        return size

    def _holdout(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The sorted training and validation indices of `n` images (``validation_fraction``,
        seeded by ``random_state``); at least one of each when the fraction is positive and n > 1."""
        rng = np.random.default_rng(self.random_state)
        n_val = int(round(self.validation_fraction * n)) if n > 1 else 0
        n_val = min(max(n_val, 1 if self.validation_fraction > 0 and n > 1 else 0), n - 1)
        order = rng.permutation(n)
        return np.sort(order[n_val:]), np.sort(order[:n_val])

    def _split(self, source: Source) -> tuple[Iterator[Any], list[Any]]:
        """The training batches and the held-out validation items (never put in the model)."""
        if source.sized:
            train, val = self._holdout(len(source))
            items = source.items
            assert items is not None  # a sized source holds its items
            return source.iter_batches(self.batch_size, train), [items[i] for i in val]
        rng = np.random.default_rng(self.random_state)
        held: list[Any] = []

        def batches() -> Iterator[tuple[list[Any], None]]:
            for items, _ in source.iter_batches(self.batch_size):
                x = items[0]
                per_image = list(x) if isinstance(x, (torch.Tensor, np.ndarray)) and len(x.shape) == 4 else [x]
                keep = rng.random(len(per_image)) >= self.validation_fraction
                held.extend(img for img, k in zip(per_image, keep) if not k)
                if keep.any():
                    yield [img for img, k in zip(per_image, keep) if k], None

        return batches(), held

    def _smooth(self, maps: torch.Tensor, input_size: tuple[int, int]) -> torch.Tensor:
        """Feature-grid maps upsampled to the input resolution and smoothed."""
        full = ops.upsample(maps.to(torch.float32).contiguous(), list(input_size), n_threads=self.n_threads)
        if self._sigma > 0:
            full = ops.gaussian_blur(full, sigma=self._sigma, n_threads=self.n_threads)
        return full

    def _postprocess(self, full: torch.Tensor, input_size: tuple[int, int], sizes: list[Any]) -> list[np.ndarray]:
        """Input-resolution maps → each image's own size (with a crop: the crop's resolution)."""
        # The fitted backbone's crop, not self.crop_size: set_params after fit must not mix the two.
        if self.backbone_.preprocessing.center_crop is not None:
            return [m.numpy() for m in full]
        out = []
        for m, size in zip(full, sizes):
            if tuple(size) != tuple(input_size):
                m = ops.upsample(m[None], tuple(size), n_threads=self.n_threads)[0]
            out.append(np.ascontiguousarray(m.numpy()))
        return out

    def _stitched(self, grid: torch.Tensor, group: _Group) -> tuple[np.ndarray, list[np.ndarray]]:
        """Tile maps on the feature grid → per image: stitched, smoothed, its maximum as the score."""
        assert self._tiles is not None and group.offsets is not None
        tile_maps = ops.upsample(grid.to(torch.float32).contiguous(), list(self._tiles[0]), n_threads=self.n_threads)
        scores, maps, start = [], [], 0
        for off, input_size, size in zip(group.offsets, group.input_sizes, group.sizes):
            full = ops.stitch(tile_maps[start : start + len(off)], off, input_size, n_threads=self.n_threads)[None]
            start += len(off)
            if self._sigma > 0:
                full = ops.gaussian_blur(full, sigma=self._sigma, n_threads=self.n_threads)
            scores.append(float(full.max()))
            maps += self._postprocess(full, input_size, [size])
        return np.array(scores, dtype=np.float32), maps

    # ------------------------------------------------------------------- API
    def _features_to(
        self,
        hook: Callable[[Iterator[dict[str, torch.Tensor]]], dict[str, Any]],
        backbone: Backbone,
        batches: Iterator[Any],
        total: int | None,
        held: bool,
    ) -> tuple[dict[str, Any], tuple[int, int] | None, int]:
        """``hook(features of batches)``, the fitted input size (None unless one size is required)
        and the number of images."""
        bar = self._progress(total, "fit: features")

        self._positions = 1
        fit_size: tuple[int, int] | None = None
        n = 0

        def features() -> Iterator[dict[str, torch.Tensor]]:
            nonlocal fit_size, n
            for items, _ in batches:
                for group in self._groups(backbone, items):
                    if self._one_size(group):
                        fit_size = self._check_positions(group, fit_size)
                    n += group.n_images
                    bar.update(group.n_images)
                    yield group.features
            if n == 0:
                if held:
                    raise ValueError("X: no training images left after holding out the validation images")
                raise ValueError("X: expected at least one training image, got none (an empty iterable)")

        with bar:
            result = hook(features())
        return result, fit_size, n

    def _learn(self, backbone: Backbone, batches: Iterator[Any], total: int | None, held: bool) -> dict[str, Any]:
        """The learned attributes from `batches` of training items (one fit of the hooks)."""
        state, fit_size, _ = self._features_to(self._fit_features, backbone, batches, total, held)
        if self.per_position or self.one_size_untiled:
            state["input_size_"] = fit_size
        if set(state) != set(self.learned_attributes):
            raise TypeError(
                f"{type(self).__name__}._fit_features returned {sorted(state)}, but its learned_attributes "
                f"list {sorted(self.learned_attributes)}: the two must name the same attributes"
            )
        return state

    def _calibration_values(self, source: Source, desc: str) -> tuple[np.ndarray, np.ndarray]:
        """Image scores and maximum map values of `source`, scored by the current fitted state."""
        found = self._inspect(source, desc)
        map_max = np.array([float(np.max(m)) for m in found.maps], dtype=np.float32)
        return found.scores, map_max

    def _cross_fit(self, backbone: Backbone, source: Source) -> tuple[np.ndarray, np.ndarray]:
        """Out-of-fold calibration values: fold k scored by a model fitted on the other folds."""
        if not source.sized:
            raise ValueError(
                "calibration: 'cv' needs a sized X (a folder, a list of paths, an array or a tensor) to split "
                "into folds, got an iterable of batches; use calibration='holdout' for it"
            )
        n = len(source)
        if n < self.n_folds:
            raise ValueError(
                f"X: calibration='cv' with n_folds={self.n_folds} needs at least {self.n_folds} images, got {n}"
            )
        items = source.items
        assert items is not None  # a sized source holds its items
        scores, map_max = [], []
        for k, (rest, fold) in enumerate(self.calibration_split(n)):
            state = self._learn(backbone, source.iter_batches(self.batch_size, rest), len(rest), held=True)
            for name, value in state.items():
                setattr(self, name, value)
            self.backbone_, self.threshold_ = backbone, None
            held = [items[i] for i in fold]
            fold_scores, fold_max = self._calibration_values(
                Source(items=held, paths=[None] * len(held)), f"fit: fold {k + 1}/{self.n_folds}"
            )
            scores.append(fold_scores)
            map_max.append(fold_max)
        return np.concatenate(scores), np.concatenate(map_max)

    def _calibrate(self, scores: np.ndarray | None, map_max: np.ndarray | None, contamination: float) -> None:
        """Set the image and pixel thresholds and their calibration values (None: no calibration)."""
        # Both thresholds first, then the four attributes: a warning raised as an error (or any
        # failure) leaves the previous calibration whole. stacklevel 4: the warning points at the
        # caller of fit / set_threshold; the pixel threshold has the same n, so one warning covers both.
        threshold = None if scores is None else conformal_threshold(scores, contamination, stacklevel=4)
        pixel_threshold = None if map_max is None else conformal_threshold(map_max, contamination, warn=False)
        self.calibration_scores_ = None if scores is None else np.asarray(scores, np.float32)
        self.pixel_calibration_scores_ = None if map_max is None else np.asarray(map_max, np.float32)
        self.threshold_, self.pixel_threshold_ = threshold, pixel_threshold

    def check_params(self) -> None:
        """Validate the parameters as ``fit`` does first, without fitting (for example before
        sending the detector to other processes): ``ValueError`` / ``TypeError`` naming the
        parameter."""
        validate_params(self.parameter_constraints(), self.get_params(deep=False))
        self._check_params()
        self._check_shared()

    def calibration_split(self, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """How ``fit`` splits `n` training images (in the order given) for its calibration.

        Returns (learned, scored) pairs of sorted index arrays: with ``calibration="holdout"`` one
        pair (the model learns from the first, the second is held out and scored); with ``"cv"``
        ``n_folds`` pairs (fold k is scored by a model of the other folds; the final model learns
        from all). Seeded by ``random_state``: the same split as ``fit`` of the same images.
        """
        n = int(check("n", n, [POSITIVE_INT]))
        if self.calibration == "cv":
            if n < self.n_folds:
                raise ValueError(
                    f"n: calibration='cv' with n_folds={self.n_folds} needs at least {self.n_folds} images, got {n}"
                )
            folds = np.array_split(np.random.default_rng(self.random_state).permutation(n), self.n_folds)
            return [
                (np.sort(np.concatenate([f for j, f in enumerate(folds) if j != k])), np.sort(fold))
                for k, fold in enumerate(folds)
            ]
        return [self._holdout(n)]

    def calibration_values(self, X_normal: Any) -> tuple[np.ndarray, np.ndarray]:
        """What calibration uses of good images: their image scores and maximum map values.

        Returns (scores (N,) float32, map_max (N,) float32), as ``set_threshold`` computes them;
        ``set_threshold_from_values`` calibrates on values gathered from several models (as
        cross-fitting does: each image scored by a model that did not learn from it).
        """
        self.check_is_fitted()
        return self._calibration_values(as_source(X_normal, "test"), "calibrate")

    def set_threshold_from_values(
        self, scores: Any, map_max: Any = None, contamination: float | None = None
    ) -> BaseDetector:
        """Calibrate on the ``calibration_values`` of good images not learned from, by the conformal
        rule of ``fit`` (``threshold_``; ``pixel_threshold_`` too when `map_max` is given).

        `contamination` defaults to the detector's.
        """
        self.check_is_fitted()
        contamination = self.contamination if contamination is None else contamination
        check("contamination", contamination, _CONTAMINATION)
        values = np.asarray(scores, dtype=np.float32)
        if values.ndim != 1 or values.size == 0 or not np.isfinite(values).all():
            raise ValueError(f"scores: expected a non-empty 1-D array of finite scores, got shape {values.shape}")
        peaks = None
        if map_max is not None:
            peaks = np.asarray(map_max, dtype=np.float32)
            if peaks.shape != values.shape or not np.isfinite(peaks).all():
                raise ValueError(
                    f"map_max: expected {values.shape[0]} finite values (one per score), got shape {peaks.shape}"
                )
        self._calibrate(values, peaks, contamination)
        return self

    def fit(self, X: Any, y: Any = None) -> BaseDetector:
        """Learn from images of good parts and calibrate ``threshold_`` (see ``calibration``).

        Parameters
        ----------
        X : folder, paths, arrays, tensors or an iterable of batches (see ``anomalox.data``)
        y : ignored

        Returns
        -------
        self
        """
        self.check_params()  # before the fitted state is put aside: a refused fit leaves it whole
        learned = {k: v for k, v in vars(self).items() if k.endswith("_") and not k.startswith("_")}
        for k in learned:
            delattr(self, k)
        tiles_before = getattr(self, "_tiles", None)
        partial_before = getattr(self, "_partial", None)
        self._tiles = self._tiling()
        self._partial = None
        try:
            backbone = self.build_backbone()
            source = as_source(X, "train")
            calibration: tuple[np.ndarray, np.ndarray] | None = None
            held: list[Any] = []
            if self.calibration == "cv":
                calibration = self._cross_fit(backbone, source)
                state = self._learn(backbone, source.iter_batches(self.batch_size), len(source), held=False)
            else:
                train_batches, held = self._split(source)
                total = None if not source.sized else len(source) - len(held)
                state = self._learn(backbone, train_batches, total, held=bool(held))
            for k, v in state.items():
                setattr(self, k, v)
            self.backbone_ = backbone
            self.threshold_ = None
            fitted_with = self._structural_params()
            if held:
                calibration = self._calibration_values(Source(items=held, paths=[None] * len(held)), "fit: validation")
            scores, map_max = calibration if calibration is not None else (None, None)
            self._calibrate(scores, map_max, self.contamination)
        except BaseException:
            for k in [k for k in vars(self) if k.endswith("_") and not k.startswith("_")]:
                delattr(self, k)
            for k, v in learned.items():
                setattr(self, k, v)
            self._tiles = tiles_before
            self._partial = partial_before
            raise
        self._fitted_with = fitted_with
        return self

    # ------------------------------------------------------- partial fitting
    # Parameters that do not change what is learned from an image (how fast, where, and the
    # calibration): partial states of detectors that differ only in these merge.
    _MERGE_FREE = frozenset(
        {
            "batch_size",
            "device",
            "n_threads",
            "verbose",
            "validation_fraction",
            "contamination",
            "calibration",
            "n_folds",
        }
    )

    def _merge_key(self) -> dict[str, str]:
        """The parameters partial states must share to merge, as text: a module backbone by its type,
        a function (``preprocessing``) by its qualified name (its repr holds an address that differs
        in every process)."""
        key = {}
        for name, value in self.get_params(deep=False).items():
            if name in self._MERGE_FREE:
                continue
            if _is_module(value):
                key[name] = f"<{type(value).__name__} module>"
            elif callable(value) and hasattr(value, "__qualname__"):
                key[name] = f"<function {getattr(value, '__module__', '?')}.{value.__qualname__}>"
            else:
                key[name] = repr(value)
        return key

    def _require_mergeable(self, what: str) -> None:
        if not self.mergeable:
            raise TypeError(
                f"{what}: {type(self).__name__} cannot learn from shards and merge (it trains a network); "
                f"mergeable detectors: PaDiM, DFM, SPADE and PatchCore"
            )

    def partial_fit(self, X: Any, y: Any = None) -> BaseDetector:
        """Learn from more images of good parts, keeping a mergeable partial state (no threshold).

        Every image of `X` is learned from (no validation hold-out); successive calls and
        ``merge`` accumulate. The detector scores after each call as one fitted on all the images
        so far, but ``threshold_`` stays None: calibrate with ``set_threshold(X_normal)`` on good
        images not learned from (``anomalox.distributed.fit`` does it with the detector's
        calibration rule). The partial state is kept in memory only (``partial_state()``); model
        files do not hold it. PaDiM and DFM need at least 2 images in the first call (the model is
        finished after each call); ``shard_state`` has no such limit. A detector fitted by ``fit``
        or loaded keeps none: clone it (``sklearn.base.clone``) to start partial fitting.

        Parameters
        ----------
        X : folder, paths, arrays, tensors or an iterable of batches (see ``anomalox.data``)
        y : ignored

        Returns
        -------
        self
        """
        self._require_mergeable("partial_fit")
        self.check_params()
        previous = getattr(self, "_partial", None)
        if previous is None and hasattr(self, "backbone_"):
            raise ValueError(
                f"partial_fit: this {type(self).__name__} was fitted by fit() or loaded, which keep no mergeable "
                f"statistics; start partial fitting on a new detector (sklearn.base.clone(detector))"
            )
        if previous is not None and previous["params"] != self._merge_key():
            changed = sorted(k for k, v in self._merge_key().items() if previous["params"].get(k) != v)
            raise ValueError(
                f"partial_fit: {', '.join(changed)} changed (set_params) since the first partial_fit; the partial "
                f"state was learned with the old values: set them back, or start on a new detector"
            )
        tiles = self._tiling()
        backbone = self.backbone_ if previous is not None else self.build_backbone()
        source = as_source(X, "train")
        tiles_before, self._tiles = getattr(self, "_tiles", None), tiles
        try:
            part = self._partial_of(
                backbone, source.iter_batches(self.batch_size), len(source) if source.sized else None
            )
            merged = part if previous is None else self._merge_two(previous, part)
            self._adopt_partial(merged, backbone)
        except BaseException:
            self._tiles = tiles_before
            raise
        return self

    def shard_state(self, X: Any) -> dict[str, Any]:
        """The partial state of `X`'s images alone, leaving this detector as it is: what one shard
        sends to the merge (``anomalox.distributed.fit``'s shard tasks run it).

        Equal to ``clone(self).partial_fit(X).partial_state()`` without finishing a model of the
        shard (PaDiM's inverse covariances, PatchCore's final selection), which the merge does not
        need. Merge states with ``merge_states`` / ``merge``.
        """
        self._require_mergeable("shard_state")
        self.check_params()
        backbone = self.build_backbone()  # not backbone_: parameters may have changed since a fit
        source = as_source(X, "train")
        tiles_before, positions_before = getattr(self, "_tiles", None), getattr(self, "_positions", None)
        self._tiles = self._tiling()
        try:
            return self._partial_of(
                backbone, source.iter_batches(self.batch_size), len(source) if source.sized else None
            )
        finally:
            self._tiles = tiles_before
            if positions_before is not None:
                self._positions = positions_before

    def _partial_of(self, backbone: Backbone, batches: Iterator[Any], total: int | None) -> dict[str, Any]:
        data, fit_size, n = self._features_to(self._partial_features, backbone, batches, total, held=False)
        return {
            "detector": type(self).__name__,
            "params": self._merge_key(),
            "n_images": n,
            "input_size": fit_size,
            "positions": self._positions,
            "data": data,
        }

    _PARTIAL_KEYS = frozenset({"detector", "params", "n_images", "input_size", "positions", "data"})

    def _check_partial(self, part: Any) -> None:
        """ValueError unless `part` is a partial state of this detector's class."""
        if not isinstance(part, Mapping) or set(part) != self._PARTIAL_KEYS:
            raise ValueError(
                f"other: expected a partial state (detector.partial_state()) or a partially fitted detector, "
                f"got {type(part).__name__}"
            )
        if part["detector"] != type(self).__name__:
            raise ValueError(
                f"other: expected a partial state of a {type(self).__name__}, got one of a {part['detector']}"
            )

    def _merge_two(self, a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
        """The partial state of both image sets; ValueError when the two cannot merge."""
        self._check_partial(a)
        self._check_partial(b)
        if a["params"] != b["params"]:
            differ = sorted(k for k in {*a["params"], *b["params"]} if a["params"].get(k) != b["params"].get(k))
            raise ValueError(
                f"other: partial states learned with different parameters cannot merge; they differ in "
                f"{', '.join(differ)}"
            )
        size_a, size_b = a["input_size"], b["input_size"]
        if size_a is not None and size_b is not None and tuple(size_a) != tuple(size_b):
            raise ValueError(
                f"other: partial states of images preprocessed to {tuple(size_a)} and {tuple(size_b)} cannot merge: "
                f"{type(self).__name__} needs one size; resize to one image_size"
            )
        if a["positions"] != b["positions"]:
            raise ValueError(
                f"other: partial states of {a['positions']} and {b['positions']} tile positions per image cannot merge"
            )
        return {
            "detector": a["detector"],
            "params": dict(a["params"]),
            "n_images": int(a["n_images"]) + int(b["n_images"]),
            "input_size": size_a if size_a is not None else size_b,
            "positions": a["positions"],
            "data": self._merge_partials(a["data"], b["data"]),
        }

    def _adopt_partial(self, part: dict[str, Any], backbone: Backbone) -> None:
        """Become the detector fitted on the partial state's images (uncalibrated)."""
        # Partial states that came through Ray's object store hold read-only arrays: the merges
        # and finishes read them in place (torch.from_numpy only on writable ones, see _writable);
        # the learned attributes get writable copies of those they share.
        state = _owned(self._finish_partial(part["data"]))
        if self.per_position or self.one_size_untiled:
            state["input_size_"] = None if part["input_size"] is None else tuple(part["input_size"])
        for k, v in state.items():
            setattr(self, k, v)
        self.backbone_ = backbone
        self._positions = int(part["positions"])
        self._partial = part
        self._calibrate(None, None, self.contamination)
        self._fitted_with = self._structural_params()

    def partial_state(self) -> dict[str, Any]:
        """The mergeable partial state of ``partial_fit`` / ``merge``: a picklable dict (numpy arrays
        and plain values), what ``anomalox.distributed`` ships between Ray workers.

        Its size is that of the detector's sufficient statistics (see each detector's docstring);
        it is not saved in model files.
        """
        self._require_mergeable("partial_state")
        part = getattr(self, "_partial", None)
        if part is None:
            raise NotFittedError(
                f"partial_state: this {type(self).__name__} has no partial state; call partial_fit(X) first"
            )
        return dict(part)

    def merge_states(self, *states: Any) -> dict[str, Any]:
        """The partial state of all `states`' images, without adopting it (cheap: no backbone, no
        final selection): what the merge tasks of ``anomalox.distributed.fit``'s tree run.

        Parameters
        ----------
        *states : ``partial_state()`` dicts of detectors of this class, learned with the same
            parameters (those that set what is learned)

        Returns
        -------
        dict, a partial state (for ``merge`` or another ``merge_states``)
        """
        self._require_mergeable("merge_states")
        if not states:
            raise ValueError("states: expected at least one partial state to merge, got none")
        merged = states[0]
        self._check_partial(merged)
        for state in states[1:]:
            merged = self._merge_two(merged, state)
        return dict(merged)

    def merge(self, *others: Any) -> BaseDetector:
        """Merge partial states into this detector: it then scores as one fitted on all their images.

        Parameters
        ----------
        *others : partially fitted detectors of this class or their ``partial_state()`` dicts
            Learned with the same parameters (those that set what is learned: not ``n_threads``,
            ``batch_size``, ``device``, ``verbose`` or the calibration's). This detector may be
            new (it then takes the first state) or partially fitted.

        Returns
        -------
        self, uncalibrated (``threshold_`` None): see ``partial_fit``.
        """
        self._require_mergeable("merge")
        parts: list[Any] = [] if getattr(self, "_partial", None) is None else [self._partial]
        if not parts and hasattr(self, "backbone_"):
            raise ValueError(
                f"merge: this {type(self).__name__} was fitted by fit() or loaded, which keep no mergeable "
                f"statistics; merge into a new detector (sklearn.base.clone(detector))"
            )
        for other in others:
            if isinstance(other, BaseDetector):
                if type(other) is not type(self):
                    raise ValueError(f"other: expected a {type(self).__name__}, got a {type(other).__name__}")
                other = other.partial_state()
            parts.append(other)
        if not parts:
            raise ValueError("others: expected at least one partial state to merge, got none")
        for part in parts:
            self._check_partial(part)
        key = self._merge_key()
        if parts[0]["params"] != key:  # a new detector adopting states must have their parameters
            differ = sorted(k for k in {*key, *parts[0]["params"]} if key.get(k) != parts[0]["params"].get(k))
            raise ValueError(
                f"other: a partial state learned with other parameters than this detector's cannot merge into it; "
                f"they differ in {', '.join(differ)}"
            )
        self._check_shared()
        merged = self.merge_states(*parts)
        backbone = self.backbone_ if hasattr(self, "backbone_") else self.build_backbone()
        tiles_before, self._tiles = getattr(self, "_tiles", None), self._tiling()
        try:
            self._adopt_partial(merged, backbone)
        except BaseException:
            self._tiles = tiles_before
            raise
        return self

    # Parameters that build the backbone: changing them after fit takes effect at the next fit only.
    _STRUCTURAL = (
        "backbone",
        "layers",
        "image_size",
        "crop_size",
        "keep_aspect_ratio",
        "tile_size",
        "tile_stride",
        "weights",
        "preprocessing",
    )

    def _structural_params(self) -> dict[str, Any]:
        params = {k: getattr(self, k) for k in self._STRUCTURAL}
        # Compared by value: (mean, std) as floats, whatever container (tuple, list, array) held them.
        preprocessing = params["preprocessing"]
        if preprocessing is not None and not callable(preprocessing):
            try:
                params["preprocessing"] = _normalisation(preprocessing)[:2]
            except ValueError:
                pass  # fit refuses it; keep it as given
        return params

    def _changed_since_fit(self) -> list[str]:
        """Backbone parameters set (set_params) after fit, which the fitted state does not reflect."""
        before = getattr(self, "_fitted_with", None)
        if before is None:
            return []
        changed = []
        for k, now in self._structural_params().items():
            old = before[k]
            same = old is now or (
                not isinstance(old, (dict, torch.Tensor, np.ndarray)) and type(old) is type(now) and old == now
            )
            if not same:
                changed.append(k)
        return changed

    def state_dict(self) -> dict[str, Any]:
        """The fitted state, by attribute name: ``learned_attributes`` and ``calibrated_attributes``.

        Arrays are the detector's own (not copies); the backbone is not included (it is rebuilt
        from the parameters). Raises ``NotFittedError`` before ``fit``, and ``ValueError`` when
        backbone parameters were changed (``set_params``) after ``fit``: the state would not
        match them.
        """
        self.check_is_fitted()
        changed = self._changed_since_fit()
        if changed:
            raise ValueError(
                f"detector: {', '.join(changed)} changed (set_params) after fit, so the fitted state no longer "
                f"matches the parameters; refit it (or set them back) before saving"
            )
        return {name: getattr(self, name) for name in (*self.learned_attributes, *self.calibrated_attributes)}

    def load_state_dict(self, state: Mapping[str, Any], backbone: Backbone | None = None) -> BaseDetector:
        """Restore a ``state_dict()``: the detector then scores as the one it came from.

        `backbone` is this detector's ``build_backbone()`` when the caller has already built
        (and checked) it; None builds it. Raises ``ValueError`` when `state` does not name
        exactly ``learned_attributes`` and ``calibrated_attributes``; the calibration scores and
        pixel threshold may be missing (a model saved before they were kept): they are then None,
        and ``p_value`` / ``predict_mask`` ask for ``set_threshold``.
        """
        expected = {*self.learned_attributes, *self.calibrated_attributes}
        optional = (set(self.calibrated_attributes) - {"threshold_"}) | set(self._learned_defaults)
        missing, unexpected = sorted(expected - optional - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"state: expected the attributes {sorted(expected)} of a {type(self).__name__}, "
                f"got {len(missing)} missing {missing} and {len(unexpected)} unexpected {unexpected}"
            )
        self._check_shared()
        tiles = self._tiling()
        backbone = self.build_backbone() if backbone is None else backbone
        for name in expected:
            setattr(self, name, state.get(name, self._learned_defaults.get(name)))
        self.backbone_ = backbone
        self._tiles = tiles
        self._partial = None
        self._fitted_with = self._structural_params()
        return self

    def _inspect(self, source: Source, desc: str = "score") -> Inspection:
        scores: list[np.ndarray] = []
        # Capacity for the maps: the exact count, or batches × the first batch's size (an estimate).
        maps = _Maps(len(source) if source.sized else None)
        n_batches = _n_batches(source)
        paths: list[str | None] = []
        with self._progress(len(source) if source.sized else None, desc) as bar:
            for items, batch_paths in source.iter_batches(self.batch_size):
                count = 0
                for group in self._groups(self.backbone_, items):
                    if self._one_size(group):
                        self._check_positions(group, self.input_size_)
                    if maps.capacity is None and n_batches is not None:
                        maps.capacity = n_batches * group.n_images
                    batch_scores, grid = self._score_features(group.features)
                    if group.offsets is not None:
                        batch_scores, group_maps = self._stitched(grid, group)
                    else:
                        input_size = group.input_sizes[0]
                        full = self._smooth(grid, input_size)
                        if batch_scores is None:
                            batch_scores = full.amax(dim=(-2, -1)).numpy()
                        group_maps = self._postprocess(full, input_size, group.sizes)
                    for m in group_maps:
                        maps.add(m)
                    scores.append(np.asarray(batch_scores, dtype=np.float32))
                    count += group.n_images
                paths.extend(batch_paths if batch_paths is not None else [None] * count)
                bar.update(count)
        if not scores:
            raise ValueError("X: expected at least one image, got none (an empty iterable)")
        all_scores = np.concatenate(scores)
        labels = None if self.threshold_ is None else (all_scores > self.threshold_).astype(np.int64)
        return Inspection(all_scores, maps.result(), labels, paths, self.threshold_)

    def inspect(self, X: Any) -> Inspection:
        """Scores, maps, predicted labels and paths from one pass over `X` (nothing computed twice).

        Folders are read in sorted path order (an MVTec category: its ``test`` folder); the
        outputs follow that order, and ``paths`` says which image each row is.
        """
        self.check_is_fitted()
        return self._inspect(as_source(X, "test"))

    def decision_function(self, X: Any) -> np.ndarray:
        """Image anomaly scores (N,) float32; higher means more anomalous."""
        return self.inspect(X).scores

    def anomaly_map(self, X: Any) -> np.ndarray | list[np.ndarray]:
        """Per-pixel anomaly maps, float32, each at its input's own resolution.

        An (N, H, W) array when all inputs share a size, else a list of (H, W) arrays. With
        ``crop_size``, a map covers the center crop (at the crop's resolution), not the whole image.
        """
        return self.inspect(X).maps

    def predict(self, X: Any) -> np.ndarray:
        """0 (normal) / 1 (anomalous) per image: score > ``threshold_``.

        Strictly greater: the conformal bound P(good score > threshold_) <= contamination holds
        for ``>``, not for ``>=`` (see ``anomalox.detectors.calibration``).
        """
        self.check_is_fitted()
        if self.threshold_ is None:
            raise ValueError(
                "threshold_: this detector has no threshold (validation_fraction=0 and no set_threshold call); "
                "call set_threshold(X_normal) with images of good parts"
            )
        return self.inspect(X).labels  # type: ignore[return-value]

    def set_threshold(self, X_normal: Any, contamination: float | None = None) -> BaseDetector:
        """Recalibrate on images of good parts not learned from: ``threshold_``, ``pixel_threshold_``
        and their calibration scores, by the conformal rule of ``fit`` (and its ``CalibrationWarning``).

        `contamination` defaults to the detector's.
        """
        self.check_is_fitted()
        contamination = self.contamination if contamination is None else contamination
        check("contamination", contamination, _CONTAMINATION)
        scores, map_max = self._calibration_values(as_source(X_normal, "test"), "calibrate")
        self._calibrate(scores, map_max, contamination)
        return self

    def _calibration_scores(self, name: str) -> np.ndarray:
        self.check_is_fitted()
        values = getattr(self, name, None)
        if values is None:
            raise ValueError(
                f"{name}: this detector has no calibration scores (validation_fraction=0, or a model file written "
                f"before they were saved); recalibrate it with set_threshold(X_normal) on images of good parts"
            )
        return values

    def p_value(self, X: Any) -> np.ndarray:
        """Conformal p-values (N,) float64: (1 + #{calibration scores >= s}) / (n + 1) per image score s.

        For a new good image P(p <= α) <= α (exchangeability), and p <= ``contamination`` exactly
        when ``predict`` flags the image (when ``threshold_`` has its guarantee). Small: anomalous.
        """
        calibration = self._calibration_scores("calibration_scores_")
        return p_values(calibration, self.decision_function(X))

    def normalized_score(self, X: Any) -> np.ndarray:
        """Scores in [0, 1], (N,) float64: the empirical CDF of the calibration scores at each score.

        The fraction of the good calibration images that score at or below the image: 0.97 means
        "above 97 % of good images"; 1 means above them all. Monotone in the score.
        """
        calibration = self._calibration_scores("calibration_scores_")
        return calibration_cdf(calibration, self.decision_function(X))

    def predict_mask(self, X: Any) -> np.ndarray | list[np.ndarray]:
        """Per-pixel decisions, bool, shaped as ``anomaly_map``: map value > ``pixel_threshold_``.

        ``pixel_threshold_`` is the conformal threshold of the good calibration images' maximum map
        values, so ``contamination`` is the rate of good images with any flagged pixel (not a
        per-pixel rate).
        """
        self._calibration_scores("pixel_calibration_scores_")
        maps = self.anomaly_map(X)
        if isinstance(maps, np.ndarray):
            return maps > self.pixel_threshold_
        return [m > self.pixel_threshold_ for m in maps]

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write the fitted detector to one safetensors file: ``anomalox.save(self, path)``."""
        if BaseDetector._saver is None:
            # The writer lives in anomalox.persist, which imports the detectors (never the other way
            # round); `import anomalox` no longer imports it eagerly, so load it by name on first use.
            importlib.import_module("anomalox.persist")
        if BaseDetector._saver is None:  # pragma: no cover - persist registers itself on import
            raise RuntimeError(
                "save: no model-file writer is registered; import anomalox (anomalox.persist registers it)"
            )
        return BaseDetector._saver(self, path)

    # ------------------------------------------------------------------ repr
    def __repr__(self, N_CHAR_MAX: int = 700) -> str:
        text = super().__repr__(N_CHAR_MAX)
        if hasattr(self, "backbone_"):
            threshold = "none" if self.threshold_ is None else f"{self.threshold_:.4g}"
            text += f"  # fitted: {self._summary()}, threshold {threshold}"
        else:
            text += "  # not fitted"
        return text

    def _repr_html_(self) -> str:
        return f"<pre>{html.escape(repr(self))}</pre>"


def stack_taps(
    features: dict[str, torch.Tensor],
    layers: tuple[str, ...],
    pool: int = 0,
    mode: Literal["bilinear", "nearest"] = "bilinear",
) -> torch.Tensor:
    """Concatenate the taps on the first tap's grid: (n, sum C, h, w).

    ``pool`` > 1 first averages each tap over a pool × pool neighbourhood (stride 1, zero padding
    counted in the mean: PatchCore's locally aware features). Deeper taps are resized with ``mode``.
    """
    first = features[layers[0]]
    grid = first.shape[-2:]
    parts = []
    for name in layers:
        tap = features[name]
        if pool > 1:
            tap = torch.nn.functional.avg_pool2d(tap, pool, stride=1, padding=pool // 2)
        if tap.shape[-2:] != grid:
            extra = {"align_corners": False} if mode == "bilinear" else {}
            tap = torch.nn.functional.interpolate(tap, size=grid, mode=mode, **extra)
        parts.append(tap)
    return torch.cat(parts, 1)


def as_rows(embedding: torch.Tensor) -> torch.Tensor:
    """(n, C, h, w) → contiguous (n·h·w, C) patch rows, in image, row, column order."""
    n, c = embedding.shape[:2]
    return embedding.permute(0, 2, 3, 1).reshape(-1, c).contiguous()


def seed_from(random_state: Any) -> int:
    """A 63-bit seed from an int / None / numpy Generator (None: fresh entropy)."""
    return int(np.random.default_rng(random_state).integers(2**63 - 1))
