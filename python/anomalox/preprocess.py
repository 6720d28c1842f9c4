"""Image loading and preprocessing shared by the backbones and every estimator.

Accepted images (one, or a list/tuple of any mix of them):

- a path (``str`` or ``os.PathLike``) to an image file, read with Pillow;
- a ``PIL.Image``; 16-bit modes (``I;16``, and ``I`` with values up to 65535) keep their depth,
  ``F`` is taken as floats in [0, 1], every other mode is converted to RGB;
- a numpy array: 2-D is one grayscale image (H, W); 3-D is one image (H, W, C) when the last axis
  is 1, 3 or 4, otherwise a batch of grayscale images (N, H, W); 4-D is a batch (N, H, W, C);
- a torch tensor: (C, H, W) or (N, C, H, W), C in {1, 3, 4}.

Values: ``uint8`` is divided by 255, ``uint16`` by 65535, floating point is taken as already in
[0, 1]; other dtypes raise ``TypeError``. Grayscale is replicated to 3 channels and a 4th (alpha)
channel is dropped.

Then, in this order: resize to ``image_size`` (bilinear with antialiasing, as torchvision's
``Resize(antialias=True)`` on tensors; with ``keep_aspect_ratio`` the short side is resized to it,
and ``image_size=None`` keeps every image's own size), optional center crop, and the normalisation
the backbone was trained with. The result is a float32 batch (N, 3, H, W) on the requested device
(or, with :meth:`Preprocessing.transform_each`, one (3, H, W) tensor per image when sizes differ).
"""

from __future__ import annotations

import numbers
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# [0, 1] -> [-1, 1]: what the TensorFlow EfficientNet-Lite checkpoints were trained with.
SYMMETRIC_MEAN = (0.5, 0.5, 0.5)
SYMMETRIC_STD = (0.5, 0.5, 0.5)

_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
_TORCH_SCALE = {torch.uint8: 255.0, torch.uint16: 65535.0}
#: The channel counts an image may have (gray, RGB, RGBA); ``anomalox.data`` uses the same rule.
CHANNELS = (1, 3, 4)


def size_pair(value: Any, name: str) -> tuple[int, int]:
    """An int or an (h, w) pair of positive ints as (h, w).

    Parameters
    ----------
    value : int or (int, int)
        A side length, or (height, width).
    name : str
        The argument's name, used in the error message.

    Returns
    -------
    tuple of int
        ``(height, width)``; ValueError naming ``name`` otherwise.
    """
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        pair: tuple[Any, ...] = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        pair = tuple(value)
    else:
        raise ValueError(f"{name}: expected an int or an (height, width) pair, got {value!r}")
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and int(v) >= 1 for v in pair):
        raise ValueError(f"{name}: expected positive integers, got {value!r}")
    return int(pair[0]), int(pair[1])


def _from_pil(image: Any) -> np.ndarray:
    mode = image.mode
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)
    if mode == "I":
        arr = np.asarray(image)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(
                f"images: a 32-bit integer PIL image (mode 'I') must hold 16-bit values, "
                f"got values in [{arr.min()}, {arr.max()}]"
            )
        return arr.astype(np.uint16)
    if mode == "F":
        return np.asarray(image, dtype=np.float32)
    if mode not in ("L", "RGB"):
        image = image.convert("RGB")
    return np.asarray(image)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """One image file as a numpy array, as the detectors read a path: (H, W) for 8- and 16-bit
    grayscale (uint8 / uint16; ``F`` mode float), (H, W, 3) uint8 for every other mode.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for one
    Pillow cannot read (corrupt or truncated); other I/O errors (permissions, disk) as they are.
    """
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:  # pragma: no cover - pillow is installed with the test extras
        raise ImportError("images: reading image files needs Pillow: pip install pillow") from exc
    if not os.path.isfile(path):
        raise FileNotFoundError(f"images: no such image file: {os.fspath(path)!r}")
    try:
        image = Image.open(path)
    except UnidentifiedImageError as exc:
        raise ValueError(f"images: could not read {os.fspath(path)!r} as an image: {exc}") from exc
    with image:
        try:
            image.load()
        except (OSError, SyntaxError, EOFError, ValueError) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise  # a real I/O error (permissions, disk), not a broken image
            # A truncated or corrupt file: Pillow's own message does not name it.
            raise ValueError(
                f"images: could not read {os.fspath(path)!r} as an image (corrupt or truncated): {exc}"
            ) from exc
        return _from_pil(image)


def _is_pil(x: Any) -> bool:
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(x, pil.Image)


def _numpy_batch(arr: np.ndarray) -> tuple[torch.Tensor, float]:
    """(N, C, H, W) tensor sharing `arr`'s memory where possible, and the divisor to [0, 1]."""
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype.kind == "f":
        scale = 1.0
    elif arr.dtype in _SCALE:
        scale = _SCALE[arr.dtype]
    else:
        raise TypeError(f"images: expected uint8, uint16 or floating-point pixels, got dtype {arr.dtype}")
    if arr.dtype == np.uint16:
        arr = arr.astype(np.float32)  # torch has few kernels for uint16
    elif arr.dtype.kind == "f" and arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    if arr.ndim == 2:
        arr = arr[None, :, :, None]
    elif arr.ndim == 3:
        arr = arr[None] if arr.shape[-1] in CHANNELS else arr[..., None]
    elif arr.ndim == 4:
        if arr.shape[-1] not in CHANNELS:
            raise ValueError(f"images: a 4-D array must be (N, H, W, C) with C in {CHANNELS}, got shape {arr.shape}")
    else:
        raise ValueError(
            f"images: expected a 2-D (H, W), 3-D (H, W, C) / (N, H, W) or 4-D (N, H, W, C) array, got shape {arr.shape}"
        )
    if not arr.flags.writeable:
        arr = arr.copy()  # torch refuses to wrap read-only memory (Pillow's arrays are read-only)
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2), scale


def _torch_batch(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    if x.dtype.is_floating_point:
        scale = 1.0
    elif x.dtype in _TORCH_SCALE:
        scale = _TORCH_SCALE[x.dtype]
    else:
        raise TypeError(f"images: expected uint8, uint16 or floating-point pixels, got dtype {x.dtype}")
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[1] not in CHANNELS:
        raise ValueError(
            f"images: a tensor must be (C, H, W) or (N, C, H, W) with C in {CHANNELS}, got shape {tuple(x.shape)}"
        )
    return x.detach(), scale


def _as_batch(image: Any) -> tuple[torch.Tensor, float]:
    """One input item as an (N, C, H, W) tensor of raw pixels and the divisor bringing it to [0, 1]."""
    if isinstance(image, torch.Tensor):
        return _torch_batch(image)
    if isinstance(image, (str, os.PathLike)):
        return _numpy_batch(read_image(image))
    if _is_pil(image):
        return _numpy_batch(_from_pil(image))
    if isinstance(image, np.ndarray):
        return _numpy_batch(image)
    raise TypeError(f"images: expected paths, PIL images, numpy arrays or torch tensors, got {type(image).__name__}")


def to_float_batches(images: Any, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """The input as float32 batches (n, 3, H, W) in [0, 1] on `device`, one per item.

    A list or tuple gives one batch per element (their sizes may differ); anything else gives one.
    """
    items: Sequence[Any] = images if isinstance(images, (list, tuple)) else [images]
    if len(items) == 0:
        raise ValueError("images: expected at least one image, got an empty sequence")
    batches = []
    seen = 0
    for item in items:
        raw, scale = _as_batch(item)
        if raw.shape[0] == 0 or raw.shape[2] == 0 or raw.shape[3] == 0:
            raise ValueError(f"images: expected non-empty images, got shape {tuple(raw.shape)}")
        # Move the raw pixels (often uint8, 4x smaller) before converting.
        x = raw.to(device, non_blocking=True).to(torch.float32)
        if raw.dtype.is_floating_point:
            finite = torch.isfinite(x).flatten(1).all(1)
            if not bool(finite.all()):
                i = seen + int((~finite).nonzero()[0, 0])
                where = f" ({os.fspath(item)!r})" if isinstance(item, (str, os.PathLike)) else ""
                raise ValueError(f"images: expected finite pixel values, got NaN/Inf in image {i}{where}")
        seen += x.shape[0]
        if scale != 1.0:
            x = x / scale
        channels = x.shape[1]
        if channels == 1:
            x = x.expand(-1, 3, -1, -1)
        elif channels == 4:
            x = x[:, :3]
        batches.append(x)
    return batches


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with antialiasing (torchvision's tensor ``Resize(antialias=True)``)."""
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The central (h, w) window, placed as torchvision's ``center_crop`` places it."""
    height, width = x.shape[-2:]
    h, w = size
    if h > height or w > width:
        raise ValueError(f"center_crop: a {h}x{w} crop does not fit a {height}x{width} image")
    top = int(round((height - h) / 2.0))
    left = int(round((width - w) / 2.0))
    return x[..., top : top + h, left : left + w]


@dataclass(frozen=True)
class Preprocessing:
    """Resize, optional center crop and per-channel normalisation.

    Parameters
    ----------
    image_size : int, (height, width) or None
        Every image is resized to exactly this size (an int gives a square); None keeps each
        image's own size.
    center_crop : int or (height, width), optional
        Crop this central window after resizing.
    keep_aspect_ratio : bool
        True: an int ``image_size`` is the length of the short side, the long side follows the
        image's aspect ratio (truncated to whole pixels), as torchvision's ``Resize(int)``.
        Needs an int (or None) ``image_size``.
    mean, std : 3 floats
        Normalisation applied to pixels in [0, 1]: ``(x - mean) / std``.
    """

    image_size: int | tuple[int, int] | None
    center_crop: int | tuple[int, int] | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    keep_aspect_ratio: bool = False

    def __post_init__(self) -> None:
        if self.image_size is not None:
            size_pair(self.image_size, "image_size")
        if self.keep_aspect_ratio and self.image_size is not None and not isinstance(self.image_size, numbers.Integral):
            raise ValueError(
                f"keep_aspect_ratio: True needs an int image_size (the short side), got image_size={self.image_size!r}; "
                f"an (h, w) image_size sets both sides"
            )
        if self.center_crop is not None:
            crop = size_pair(self.center_crop, "center_crop")
            if self.fixed_size:
                size = size_pair(self.image_size, "image_size")
                if crop[0] > size[0] or crop[1] > size[1]:
                    raise ValueError(f"center_crop: {crop} does not fit in image_size {size}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ValueError(f"{name}: expected 3 values (one per RGB channel), got {value!r}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std: expected positive values, got {self.std!r}")

    @property
    def fixed_size(self) -> bool:
        """Whether every image is resized to one size (an int or (h, w) ``image_size``, aspect ignored)."""
        return self.image_size is not None and not self.keep_aspect_ratio

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the batches this produces; ValueError when it depends on the image."""
        if self.center_crop is not None:
            return size_pair(self.center_crop, "center_crop")
        if not self.fixed_size:
            raise ValueError(
                "output_size: the size depends on each image (image_size=None or keep_aspect_ratio); "
                "use resized_size(height, width)"
            )
        return size_pair(self.image_size, "image_size")

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of this size has after resizing (before the crop)."""
        if self.image_size is None:
            return int(height), int(width)
        if not self.keep_aspect_ratio:
            return size_pair(self.image_size, "image_size")
        short = int(self.image_size)  # type: ignore[arg-type]
        # The long side truncated, as torchvision's Resize(int) computes it: int(short * long / short_side).
        if height <= width:
            return short, max(1, int(short * width / height))
        return max(1, int(short * height / width)), short

    def map_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the preprocessed image (and its map) for an input of this size."""
        if self.center_crop is not None:
            return size_pair(self.center_crop, "center_crop")
        return self.resized_size(height, width)

    def __call__(self, images: Any, device: torch.device | str = "cpu") -> torch.Tensor:
        """A normalised float32 batch (N, 3, H, W) on `device`."""
        return self.transform(images, device)[0]

    def transform(self, images: Any, device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """The normalised batch, and each image's (height, width) before resizing.

        Raises ValueError when the images do not come out at one size (``image_size=None`` or
        ``keep_aspect_ratio`` with images of different sizes): use :meth:`transform_each`.
        """
        parts, sizes = self._batches(images, device)
        shapes = {tuple(b.shape[-2:]) for b in parts}
        if len(shapes) > 1:
            raise ValueError(
                f"images: they come out at {len(shapes)} different sizes (image_size=None or keep_aspect_ratio), "
                f"so they do not form one batch; use transform_each"
            )
        x = torch.cat(parts) if len(parts) > 1 else parts[0]
        return self._normalise(x), sizes

    def transform_each(
        self, images: Any, device: torch.device | str = "cpu"
    ) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """Each image normalised at its own output size: (3, H, W) tensors, and the sizes before resizing."""
        parts, sizes = self._batches(images, device)
        return [self._normalise(b)[i] for b in parts for i in range(b.shape[0])], sizes

    def _batches(self, images: Any, device: torch.device | str) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """Resized (and cropped) float batches in [0, 1], one per input item, and the sizes before resizing."""
        raw = to_float_batches(images, device)
        sizes = [(int(b.shape[-2]), int(b.shape[-1])) for b in raw for _ in range(b.shape[0])]
        batches = [resize(b, self.resized_size(b.shape[-2], b.shape[-1])) for b in raw]
        if self.center_crop is not None:
            crop = size_pair(self.center_crop, "center_crop")
            batches = [center_crop(b, crop) for b in batches]
        return batches, sizes

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous()
