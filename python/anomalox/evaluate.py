"""``anomalox.evaluate``: every metric of a detector on an MVTec-layout test folder."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from anomalox import metrics, ops
from anomalox.data import LabeledSet, read_labeled_set
from anomalox.preprocess import _size_pair, center_crop

__all__ = ["evaluate", "read_mask"]


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
    size = _size_pair(prep.image_size, "image_size")
    resized = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None].float(), size=size, mode="nearest")
    return center_crop(resized, _size_pair(prep.center_crop, "crop_size"))[0, 0].numpy() >= 0.5


def evaluate(detector: Any, test_folder: str | os.PathLike, fpr_limit: float = 0.3) -> dict[str, Any]:
    """Image AUROC, AUPR, F1-max and, when the folder has masks, pixel AUROC and AUPRO.

    Parameters
    ----------
    detector : a fitted anomalox detector
    test_folder : an MVTec-layout category (or its ``test`` folder): ``test/good`` normal, every
        other ``test/<defect>`` defective, masks at ``ground_truth/<defect>/<name>_mask.png``
        (good images count as all-normal pixels).
    fpr_limit : float
        The FPR limit of AUPRO.

    Returns
    -------
    dict with ``image_auroc``, ``image_aupr``, ``f1_max``, ``f1_threshold``, ``pixel_auroc``,
    ``aupro`` (None when skipped), ``pixel_metrics`` (a note: where they were computed or why
    skipped), ``n_images``, ``n_defective`` and ``inspection`` (the scores/maps/paths).

    When the maps do not all share one size, pixel metrics are computed at the detector's input
    resolution (maps resized bilinearly, masks with nearest neighbours), as anomalib does.
    """
    return _evaluate(detector, test_folder, fpr_limit)[0]


def _evaluate(detector: Any, test_folder: str | os.PathLike, fpr_limit: float = 0.3) -> tuple[dict[str, Any], LabeledSet, list[np.ndarray] | None]:
    """``evaluate``'s result, the labeled test set and the masks it read (each at its map's size;
    None when the set has no masks), so a caller such as the report reads nothing twice."""
    labeled = read_labeled_set(test_folder)
    if labeled.labels.min() == labeled.labels.max():
        raise ValueError(
            f"test_folder: {os.fspath(test_folder)!r} needs both good and defective images "
            f"(test/good and test/<defect>), got only {'defective' if labeled.labels[0] else 'good'} ones"
        )
    inspection = detector.inspect(labeled.paths)
    scores = inspection.scores
    f1, f1_threshold = metrics.f1_max(labeled.labels, scores)
    result: dict[str, Any] = {
        "n_images": len(labeled.paths),
        "n_defective": int(labeled.labels.sum()),
        "image_auroc": metrics.image_auroc(labeled.labels, scores),
        "image_aupr": metrics.image_aupr(labeled.labels, scores),
        "f1_max": f1,
        "f1_threshold": float(f1_threshold),
        "pixel_auroc": None,
        "aupro": None,
    }
    masks: list[np.ndarray] | None = None
    if not labeled.has_masks:
        result["pixel_metrics"] = "skipped: the test folder has no ground-truth masks"
    else:
        maps = list(inspection.maps)
        masks = []
        for path, mask_path, amap in zip(labeled.paths, labeled.mask_paths, maps):
            mask = _mask_like_map(read_mask(mask_path), detector) if mask_path else np.zeros(amap.shape, bool)
            if mask.shape != amap.shape:
                raise ValueError(
                    f"ground truth: the mask {mask_path!r} is {mask.shape[1]}x{mask.shape[0]} but its image "
                    f"{path!r} (and its map) is {amap.shape[1]}x{amap.shape[0]}"
                )
            masks.append(mask)
        if len({m.shape for m in maps}) == 1:
            all_maps, all_masks = np.stack(maps), np.stack(masks)
            where = f"at the images' own resolution {maps[0].shape[1]}x{maps[0].shape[0]}"
        else:
            size = detector.backbone_.preprocessing.output_size
            all_maps = np.concatenate([ops.upsample(m[None], size) for m in maps])
            all_masks = np.concatenate([
                torch.nn.functional.interpolate(torch.from_numpy(m)[None, None].float(), size=size, mode="nearest")[0].numpy() >= 0.5
                for m in masks
            ])
            where = f"at the detector's input resolution {size[1]}x{size[0]} (the images differ in size)"
        result["pixel_auroc"] = metrics.pixel_auroc(all_masks, all_maps)
        result["aupro"] = metrics.aupro(all_masks, all_maps, fpr_limit=fpr_limit)
        result["pixel_metrics"] = f"computed {where}"
    result["inspection"] = inspection
    return result, labeled, masks
