"""``anomalox.evaluate``: every metric of a detector on a labelled test set.

The test set is an MVTec-layout folder, a :class:`~anomalox.data.LabeledSet`, or any images a
detector accepts with their 0/1 labels (and optionally their masks). The result is an
:class:`Evaluation`: the metrics, the labels, the scores and the paths; the anomaly maps and the
ground-truth masks only when asked for (they are the large part).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from anomalox import metrics, ops
from anomalox.data import LabeledSet, read_labeled_set
from anomalox.preprocess import center_crop, size_pair

__all__ = ["Evaluation", "evaluate", "read_mask"]


@dataclass
class Evaluation(Mapping[str, Any]):
    """What :func:`evaluate` measured, and on what.

    A read-only mapping of its metrics, as ``evaluate`` returned a dict before:
    ``evaluation["image_auroc"]`` reads ``evaluation.metrics["image_auroc"]``, and ``in``,
    ``keys()``, ``items()`` and ``dict(evaluation)`` see the metrics. The repr shows the metrics
    and the threshold only.

    Attributes
    ----------
    metrics : dict
        ``image_auroc``, ``image_aupr``, ``f1_max``, ``f1_threshold``, ``pixel_auroc``, ``aupro``
        (None when skipped), ``pixel_metrics`` (where they were computed, or why skipped),
        ``n_images`` and ``n_defective``.
    labels : ndarray (N,), int64
        Ground truth, 1 = defective.
    scores : ndarray (N,), float32
        The detector's image scores.
    paths : list of str or None
        The image files, in scoring order (None for images given as arrays).
    threshold : float or None
        The detector's ``threshold_`` when scored (None when it has none).
    maps : ndarray (N, H, W) or list of (H_i, W_i) arrays, or None
        The anomaly maps; None unless ``evaluate(..., keep_maps=True)``.
    masks : list of (H_i, W_i) bool arrays or None, or None
        The ground-truth masks at their map's size, None for an image without a mask (all
        pixels normal); None unless ``keep_masks=True`` and the set has masks.
    """

    metrics: dict[str, Any]
    labels: np.ndarray = field(repr=False)
    scores: np.ndarray = field(repr=False)
    paths: list[str | None] = field(repr=False)
    threshold: float | None = None
    maps: np.ndarray | list[np.ndarray] | None = field(default=None, repr=False)
    masks: list[np.ndarray | None] | None = field(default=None, repr=False)

    def __getitem__(self, key: str) -> Any:
        return self.metrics[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.metrics)

    def __len__(self) -> int:
        return len(self.metrics)

    def as_dict(self) -> dict[str, Any]:
        """A copy of :attr:`metrics` (plain Python values: JSON-serialisable)."""
        return dict(self.metrics)


def read_mask(path: str) -> np.ndarray:
    """A ground-truth mask as an (H, W) bool array (pixels >= 128 are defective)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L")) >= 128
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"ground truth: could not read the mask {path!r}: {exc}") from exc


def _mask_like_map(mask: np.ndarray, detector: Any) -> np.ndarray:
    """Apply the detector's crop to a mask (maps cover the crop when ``crop_size`` is set)."""
    prep = detector.backbone_.preprocessing  # as fitted, even if set_params changed crop_size since
    if prep.center_crop is None:
        return mask
    size = size_pair(prep.image_size, "image_size")
    resized = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None].float(), size=size, mode="nearest")
    return center_crop(resized, size_pair(prep.center_crop, "crop_size"))[0, 0].numpy() >= 0.5


def _check_labels(labels: Any) -> np.ndarray:
    if isinstance(labels, numbers.Real) and not isinstance(labels, bool):
        raise TypeError(
            f"labels: expected a 1-D sequence of 0 (normal) / 1 (defective), got the number {labels!r} "
            f"(fpr_limit is keyword-only: evaluate(detector, X, fpr_limit={labels!r}))"
        )
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0 or y.dtype.kind not in "biuf" or not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels: expected a 1-D sequence of 0 (normal) / 1 (defective), got {_describe(labels)}")
    return y.astype(np.int64)


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    return f"an array of shape {tuple(shape)}" if shape is not None else repr(value)[:80]


def _test_set(X: Any, labels: Any, masks: Sequence[Any] | None) -> tuple[Any, np.ndarray, list[Any] | None, str]:
    """(images to inspect, labels, masks or None, the note when pixel metrics are skipped)."""
    if labels is None:
        if masks is not None:
            raise ValueError(
                "masks: expected None when X is an MVTec folder or a LabeledSet (they carry their own masks)"
            )
        if isinstance(X, LabeledSet):
            labeled = X
        elif isinstance(X, (str, os.PathLike)):
            labeled = read_labeled_set(X)
        else:
            raise TypeError(
                f"labels: expected 0/1 labels when X is not an MVTec folder or a LabeledSet, got None (X is {type(X).__name__})"
            )
        if labeled.labels.min() == labeled.labels.max():
            where = f"test_folder: {os.fspath(X)!r}" if isinstance(X, (str, os.PathLike)) else "X: the LabeledSet"
            raise ValueError(
                f"{where} needs both good and defective images "
                f"(test/good and test/<defect>), got only {'defective' if labeled.labels[0] else 'good'} ones"
            )
        kept = list(labeled.mask_paths) if labeled.has_masks else None
        return labeled.paths, labeled.labels, kept, "skipped: the test folder has no ground-truth masks"
    y = _check_labels(labels)
    if y.min() == y.max():
        raise ValueError(f"labels: expected both 0 (normal) and 1 (defective), got only {y[0]}")
    if masks is not None:
        masks = list(masks)
        if len(masks) != y.size:
            raise ValueError(f"masks: expected {y.size} entries (one per label), got {len(masks)}")
        if all(m is None for m in masks):
            masks = None
    return X, y, masks, "skipped: no ground-truth masks given"


def evaluate(
    detector: Any,
    X: Any,
    labels: Any = None,
    *,
    masks: Sequence[Any] | None = None,
    fpr_limit: float = 0.3,
    keep_maps: bool = False,
    keep_masks: bool = False,
) -> Evaluation:
    """Image AUROC, AUPR, F1-max and, when the test set has masks, pixel AUROC and AUPRO.

    Parameters
    ----------
    detector : a fitted anomalox detector
    X : folder, LabeledSet, or images
        With ``labels=None``: an MVTec-layout category (or its ``test`` folder): ``test/good``
        normal, every other ``test/<defect>`` defective, masks at
        ``ground_truth/<defect>/<name>_mask.png`` (good images count as all-normal pixels), or a
        :class:`~anomalox.data.LabeledSet`. With ``labels``: anything ``detector.inspect`` accepts.
    labels : array (N,) of 0/1, optional
        Ground truth of ``X``'s images, 1 = defective; both classes needed.
    masks : sequence of N masks, optional
        With ``labels``: per image a mask file, an (H, W) bool array at the image's size, or None
        (all pixels normal). The detector's crop is applied to them as to the images.
    fpr_limit : float
        The FPR limit of AUPRO.
    keep_maps, keep_masks : bool
        Keep the anomaly maps / the masks (at their map's size) in the result.

    Returns
    -------
    Evaluation
        ``.metrics`` holds ``image_auroc``, ``image_aupr``, ``f1_max``, ``f1_threshold``,
        ``pixel_auroc``, ``aupro`` (None when skipped), ``pixel_metrics`` (a note: where they
        were computed or why skipped), ``n_images`` and ``n_defective``; ``result["aupro"]``
        reads it too.

    When the maps do not all share one size, pixel metrics are computed at the detector's input
    resolution (maps resized bilinearly, masks with nearest neighbours), as anomalib does.
    """
    if not isinstance(keep_maps, bool):
        raise TypeError(f"keep_maps: expected a bool, got {keep_maps!r}")
    if not isinstance(keep_masks, bool):
        raise TypeError(f"keep_masks: expected a bool, got {keep_masks!r}")
    images, y, mask_sources, skipped = _test_set(X, labels, masks)
    inspection = detector.inspect(images)
    scores = inspection.scores
    if len(scores) != y.size:
        raise ValueError(f"labels: expected {len(scores)} labels (one per image of X), got {y.size}")
    f1, f1_threshold = metrics.f1_max(y, scores)
    result: dict[str, Any] = {
        "n_images": len(scores),
        "n_defective": int(y.sum()),
        "image_auroc": metrics.image_auroc(y, scores),
        "image_aupr": metrics.image_aupr(y, scores),
        "f1_max": f1,
        "f1_threshold": float(f1_threshold),
        "pixel_auroc": None,
        "aupro": None,
    }
    kept_masks: list[np.ndarray | None] | None = None
    if mask_sources is None:
        result["pixel_metrics"] = skipped
    else:
        maps = list(inspection.maps)
        pixel_masks = [
            _pixel_mask(source, path, amap, detector)
            for source, path, amap in zip(mask_sources, inspection.paths, maps)
        ]
        result["pixel_auroc"], result["aupro"], result["pixel_metrics"] = _pixel_metrics(
            maps, pixel_masks, detector, fpr_limit
        )
        if keep_masks:
            kept_masks = [None if source is None else mask for source, mask in zip(mask_sources, pixel_masks)]
    return Evaluation(
        metrics=result,
        labels=y,
        scores=scores,
        paths=list(inspection.paths),
        threshold=inspection.threshold,
        maps=inspection.maps if keep_maps else None,
        masks=kept_masks,
    )


def _pixel_mask(source: Any, path: str | None, amap: np.ndarray, detector: Any) -> np.ndarray:
    """One image's mask at its map's size: all-normal for None, else read (a file) and cropped."""
    if source is None:
        return np.zeros(amap.shape, bool)
    if isinstance(source, (str, os.PathLike)):
        mask = read_mask(os.fspath(source))
        name = repr(os.fspath(source))
    else:
        mask = np.asarray(source)
        if mask.ndim != 2:
            raise ValueError(f"masks: expected (H, W) arrays or mask files, got an array of shape {mask.shape}")
        mask = mask.astype(bool)
        name = "given"
    mask = _mask_like_map(mask, detector)
    if mask.shape != amap.shape:
        image = "" if path is None else f" {path!r}"
        raise ValueError(
            f"ground truth: the mask {name} is {mask.shape[1]}x{mask.shape[0]} but its image{image} "
            f"(and its map) is {amap.shape[1]}x{amap.shape[0]}"
        )
    return mask


def _pixel_metrics(
    maps: list[np.ndarray], masks: list[np.ndarray], detector: Any, fpr_limit: float
) -> tuple[float, float, str]:
    """Pixel AUROC, AUPRO and where they were computed."""
    if len({m.shape for m in maps}) == 1:
        all_maps, all_masks = np.stack(maps), np.stack(masks)
        where = f"at the images' own resolution {maps[0].shape[1]}x{maps[0].shape[0]}"
    else:
        size = detector.backbone_.preprocessing.output_size
        all_maps = np.concatenate([ops.upsample(m[None], size) for m in maps])
        all_masks = np.concatenate(
            [
                torch.nn.functional.interpolate(torch.from_numpy(m)[None, None].float(), size=size, mode="nearest")[
                    0
                ].numpy()
                >= 0.5
                for m in masks
            ]
        )
        where = f"at the detector's input resolution {size[1]}x{size[0]} (the images differ in size)"
    return (
        metrics.pixel_auroc(all_masks, all_maps),
        metrics.aupro(all_masks, all_maps, fpr_limit=fpr_limit),
        f"computed {where}",
    )
