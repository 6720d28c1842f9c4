"""What detectors accept as images, and MVTec-layout folders.

``X`` may be:

- a folder: a flat (or nested) folder of images, or an MVTec AD category (``train/good``,
  ``test/<defect>``, ``ground_truth/<defect>/<name>_mask.png``). Fitting on a category uses
  ``train/good``; scoring a category uses ``test``. Images are taken in sorted path order; files
  whose extension is not an image extension are skipped; a folder without images is an error.
- one image path, or a list/tuple of paths, PIL images, numpy arrays or torch tensors (any mix);
- a numpy array or torch tensor holding one image or a batch (see ``anomalox.preprocess``);
- any other iterable, such as a torch ``DataLoader``: each element is a batch, as a tensor, a
  ``(images, ...)`` tuple/list, or a dict with an ``"image"`` key (and optionally ``"image_path"``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from anomalox.preprocess import CHANNELS

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"})

__all__ = ["IMAGE_EXTENSIONS", "Source", "LabeledSet", "as_source", "list_images", "read_labeled_set"]


def list_images(folder: str | os.PathLike) -> list[str]:
    """Image files under `folder` (recursively), sorted; ValueError when there are none."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"X: no such folder: {folder!r}")
    found: list[str] = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found.extend(os.path.join(root, f) for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
    if not found:
        raise ValueError(f"X: the folder {folder!r} holds no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return sorted(found)


def resolve_folder(folder: str | os.PathLike, role: str) -> list[str]:
    """The images of `folder` for `role` ("train" or "test"), honouring the MVTec layout."""
    folder = os.fspath(folder)
    sub = os.path.join(folder, "train", "good") if role == "train" else os.path.join(folder, "test")
    return list_images(sub if os.path.isdir(sub) else folder)


@dataclass
class Source:
    """Images to stream in batches: an indexable list of items, or an iterable of batches."""

    items: list[Any] | None = None  # one image (or a batch tensor/array slice) per entry
    paths: list[str | None] | None = None
    batches: Iterable[Any] | None = None

    def __len__(self) -> int:
        if self.items is None:
            raise TypeError("this source is an iterable of batches; its length is unknown")
        return len(self.items)

    @property
    def sized(self) -> bool:
        return self.items is not None

    def iter_batches(self, batch_size: int, indices: Any = None) -> Iterator[tuple[list[Any], list[str | None]]]:
        """(items, paths) chunks of at most `batch_size` images; `indices` selects and orders items."""
        if self.items is None:
            for batch in self.batches:  # type: ignore[union-attr]
                images, paths = _unpack_batch(batch)
                yield [images], paths
            return
        order = range(len(self.items)) if indices is None else indices
        order = list(order)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            yield [self.items[i] for i in chunk], [self.paths[i] if self.paths else None for i in chunk]


def _is_batch(x: np.ndarray) -> bool:
    """Whether a numpy array holds several images: (N, H, W, C), or (N, H, W) when its last axis
    cannot be a channel axis (the rule of ``anomalox.preprocess``)."""
    return x.ndim == 4 or (x.ndim == 3 and x.shape[-1] not in CHANNELS)


def _batch_len(images: Any) -> int:
    if isinstance(images, torch.Tensor):
        return 1 if images.dim() == 3 else int(images.shape[0])
    if isinstance(images, np.ndarray):
        return int(images.shape[0]) if _is_batch(images) else 1
    return len(images) if isinstance(images, (list, tuple)) else 1


def _unpack_batch(batch: Any) -> tuple[Any, list[str | None]]:
    paths = None
    if isinstance(batch, Mapping):
        if "image" not in batch:
            raise ValueError(f"X: a batch given as a dict needs an 'image' key, got keys {sorted(batch)}")
        images = batch["image"]
        paths = batch.get("image_path")
    elif isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], (torch.Tensor, np.ndarray)):
        images = batch[0]
    else:
        images = batch
    n = _batch_len(images)
    if paths is None or isinstance(paths, str) or len(paths) != n:
        paths = [None] * n
    return images, [None if p is None else str(p) for p in paths]


def _split_array(x: Any) -> list[Any]:
    """One entry per image of an array/tensor batch (views, no copies)."""
    if isinstance(x, torch.Tensor):
        return [x[i] for i in range(x.shape[0])] if x.dim() == 4 else [x]
    if x.ndim == 4 and x.shape[-1] not in CHANNELS:
        # Split, each (H, W, C) image would pass for a batch of C-wide grayscale images.
        raise ValueError(f"X: a 4-D array must be (N, H, W, C) with C in (1, 3, 4), got shape {x.shape}")
    if _is_batch(x):
        return [x[i] for i in range(x.shape[0])]
    return [x]


def _check_finite(parts: list[Any], first: int) -> None:
    """Refuse NaN/Inf pixels of floating-point images, naming the image's index in X."""
    for i, part in enumerate(parts):
        if isinstance(part, torch.Tensor):
            bad = part.dtype.is_floating_point and not bool(torch.isfinite(part).all())
        else:
            bad = part.dtype.kind == "f" and not np.isfinite(part).all()
        if bad:
            raise ValueError(f"X: expected finite pixel values, got NaN/Inf in image {first + i}")


def as_source(X: Any, role: str) -> Source:
    """`X` (see the module docstring) as a `Source`; `role` is "train" or "test"."""
    if isinstance(X, (str, os.PathLike)):
        path = os.fspath(X)
        files = resolve_folder(path, role) if os.path.isdir(path) else [path]
        if not os.path.isdir(path) and not os.path.isfile(path):
            raise FileNotFoundError(f"X: no such file or folder: {path!r}")
        return Source(items=list(files), paths=list(files))
    if isinstance(X, (torch.Tensor, np.ndarray)):
        if isinstance(X, np.ndarray) and X.dtype == object:
            raise TypeError("X: expected a numeric array of images, got an object array")
        images = _split_array(X)
        if not images:
            raise ValueError(f"X: expected at least one image, got an empty batch of shape {tuple(X.shape)}")
        _check_finite(images, 0)
        return Source(items=images, paths=[None] * len(images))
    if isinstance(X, (list, tuple)):
        if len(X) == 0:
            raise ValueError("X: expected at least one image, got an empty sequence")
        items: list[Any] = []
        paths: list[str | None] = []
        for x in X:
            if isinstance(x, (str, os.PathLike)):
                items.append(os.fspath(x))
                paths.append(os.fspath(x))
            elif isinstance(x, (torch.Tensor, np.ndarray)):
                parts = _split_array(x)
                _check_finite(parts, len(items))
                items.extend(parts)
                paths.extend([None] * len(parts))
            else:
                items.append(x)
                paths.append(None)
        return Source(items=items, paths=paths)
    if isinstance(X, Iterable):
        return Source(batches=X)
    raise TypeError(
        f"X: expected a folder, image paths, arrays, tensors or an iterable of batches, got {type(X).__name__}"
    )


@dataclass
class LabeledSet:
    """An MVTec-layout test folder: images, 0/1 labels, mask paths (None for good images)."""

    paths: list[str]
    labels: np.ndarray
    defect_types: list[str]
    mask_paths: list[str | None]

    @property
    def has_masks(self) -> bool:
        return any(m is not None for m in self.mask_paths)


def read_labeled_set(folder: str | os.PathLike) -> LabeledSet:
    """Read an MVTec-layout category (or its ``test`` folder): ``test/good`` is normal, every other
    ``test/<defect>`` anomalous, masks at ``ground_truth/<defect>/<name>_mask.png``.

    A flat folder of images (no defect subfolders) is returned with all labels 0 and no masks.
    When some defect images have masks and others do not, the missing ones raise FileNotFoundError.
    """
    folder = os.fspath(folder)
    test_dir = os.path.join(folder, "test") if os.path.isdir(os.path.join(folder, "test")) else folder
    category = (
        os.path.dirname(os.path.abspath(test_dir)) if test_dir != folder else os.path.dirname(os.path.abspath(folder))
    )
    gt_dir = os.path.join(category, "ground_truth")
    paths = list_images(test_dir)
    labels, kinds, masks = [], [], []
    for path in paths:
        rel = os.path.relpath(path, test_dir)
        kind = rel.split(os.sep)[0] if os.sep in rel else "good"
        kinds.append(kind)
        labels.append(0 if kind == "good" else 1)
        mask = None
        if kind != "good":
            stem = os.path.splitext(os.path.basename(path))[0]
            candidate = os.path.join(gt_dir, kind, stem + "_mask.png")
            mask = candidate if os.path.isfile(candidate) else None
        masks.append(mask)
    missing = [p for p, k, m in zip(paths, kinds, masks) if k != "good" and m is None]
    if missing and len(missing) < sum(labels):
        raise FileNotFoundError(
            f"ground truth: {len(missing)} defect image(s) have no mask under {gt_dir!r}, e.g. "
            f"{missing[0]!r} (expected {os.path.join(gt_dir, '<defect>', '<name>_mask.png')!r})"
        )
    return LabeledSet(paths, np.asarray(labels, dtype=np.int64), kinds, masks)
