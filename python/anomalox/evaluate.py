"""``anomalox.evaluate``: every metric of a detector on a labelled test set.

The test set is an MVTec-layout folder, a :class:`~anomalox.data.LabeledSet`, or any images a
detector accepts with their 0/1 labels (and optionally their masks). The result is an
:class:`Evaluation`: the metrics, the labels, the scores and the paths; the anomaly maps and the
ground-truth masks only when asked for (they are the large part). Images are scored in chunks and
pixel metrics accumulated per chunk, so memory does not grow with the test set;
:func:`write_maps` scores images with their maps written to a folder instead of kept.
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
from anomalox.data import LabeledSet, as_source, read_labeled_set
from anomalox.preprocess import center_crop, size_pair

__all__ = ["Evaluation", "MapFiles", "evaluate", "mask_for_map", "read_mask", "write_maps"]


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
    map_files : list of str or None
        With ``evaluate(..., maps_dir=...)``: the ``.npy`` file of each image's map.
    pro_curve : (fpr, pro) float64 arrays, or None
        The PRO curve of the pixel metrics (:meth:`PixelMetricsAccumulator.pro_curve`), None
        when they were skipped.
    mask_sources : list or None
        The masks as given (files, arrays or None per image), for drawing a few of them again.
    """

    metrics: dict[str, Any]
    labels: np.ndarray = field(repr=False)
    scores: np.ndarray = field(repr=False)
    paths: list[str | None] = field(repr=False)
    threshold: float | None = None
    maps: np.ndarray | list[np.ndarray] | None = field(default=None, repr=False)
    masks: list[np.ndarray | None] | None = field(default=None, repr=False)
    map_files: list[str] | None = field(default=None, repr=False)
    pro_curve: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    mask_sources: list[Any] | None = field(default=None, repr=False)

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
    size = prep.resized_size(*mask.shape)
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


@dataclass
class MapFiles:
    """What :func:`write_maps` scored: scores, the map files, predicted labels and paths."""

    scores: np.ndarray
    files: list[str]
    labels: np.ndarray | None
    paths: list[str | None]
    threshold: float | None


def _chunks(detector: Any, X: Any, chunk_size: int | None) -> Iterator[tuple[Any, list[str | None]]]:
    """(inspection, paths) per chunk of at most ``chunk_size`` images of ``X``, in order.

    The default is the multiple of ``detector.batch_size`` nearest 32: chunks then split into the
    same backbone batches as one ``inspect`` of all images, so the scores are the same bits.
    """
    detector.check_is_fitted()
    if chunk_size is None:
        chunk_size = detector.batch_size * max(1, round(32 / detector.batch_size))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
    source = as_source(X, "test")
    for items, paths in source.iter_batches(int(chunk_size)):
        inspection = detector.inspect(items)
        yield inspection, [p if p is not None else q for p, q in zip(paths, inspection.paths)]


def _map_names(start: int, paths: list[str | None]) -> list[str]:
    return [
        f"{start + i:06d}" + ("" if p is None else "_" + os.path.splitext(os.path.basename(p))[0]) + ".npy"
        for i, p in enumerate(paths)
    ]


def _write_chunk(maps_dir: str, start: int, paths: list[str | None], maps: Any) -> list[str]:
    files = []
    for name, amap in zip(_map_names(start, paths), maps):
        file = os.path.join(maps_dir, name)
        np.save(file, np.asarray(amap, np.float32))
        files.append(file)
    return files


def write_maps(detector: Any, X: Any, maps_dir: str | os.PathLike[str], *, chunk_size: int | None = None) -> MapFiles:
    """Score ``X`` and write each anomaly map to ``maps_dir`` as it goes, keeping none in memory.

    Parameters
    ----------
    detector : a fitted anomalox detector
    X : anything ``detector.inspect`` accepts
    maps_dir : folder
        Created if needed; one float32 ``.npy`` per image, ``<index>_<file stem>.npy`` (the
        index in scoring order, 6 digits; no stem for images given as arrays).
    chunk_size : int, optional
        Images per ``detector.inspect`` call: peak memory is about one chunk of maps. Default:
        the multiple of ``detector.batch_size`` nearest 32 (the scores are then bit for bit those
        of one ``inspect`` call; other sizes can change their last bits, as batching does).

    Returns
    -------
    MapFiles
        Scores (N,) float32, the files written, 0/1 labels (with ``threshold_``), the paths.
    """
    folder = os.fspath(maps_dir)
    os.makedirs(folder, exist_ok=True)
    scores: list[np.ndarray] = []
    files: list[str] = []
    paths: list[str | None] = []
    for inspection, chunk_paths in _chunks(detector, X, chunk_size):
        files += _write_chunk(folder, len(paths), chunk_paths, inspection.maps)
        scores.append(inspection.scores)
        paths += chunk_paths
    all_scores = np.concatenate(scores)
    threshold = detector.threshold_
    labels = None if threshold is None else (all_scores > threshold).astype(np.int64)
    return MapFiles(all_scores, files, labels, paths, threshold)


def _image_size(item: Any) -> tuple[int, int] | None:
    """(H, W) of an image file or array without decoding it; None when unknown."""
    if isinstance(item, (str, os.PathLike)):
        from PIL import Image

        try:
            with Image.open(item) as image:
                return image.size[1], image.size[0]
        except OSError:
            return None
    if isinstance(item, torch.Tensor):
        return (int(item.shape[-2]), int(item.shape[-1])) if item.dim() == 3 else tuple(item.shape[:2])  # type: ignore[return-value]
    if isinstance(item, np.ndarray):
        return (int(item.shape[0]), int(item.shape[1])) if item.ndim in (2, 3) else None
    return None


def _one_map_size(X: Any, detector: Any) -> bool:
    """Whether every map of ``X`` will have one size (a crop, or images of one size)."""
    if detector.backbone_.preprocessing.center_crop is not None:
        return True
    source = as_source(X, "test")
    if not source.sized:
        return True  # checked per chunk: a second size raises
    sizes = {_image_size(item) for item in source.items or []}
    return len(sizes) == 1 and None not in sizes


def evaluate(
    detector: Any,
    X: Any,
    labels: Any = None,
    *,
    masks: Sequence[Any] | None = None,
    fpr_limit: float = 0.3,
    keep_maps: bool = False,
    keep_masks: bool = False,
    maps_dir: str | os.PathLike[str] | None = None,
    chunk_size: int | None = None,
) -> Evaluation:
    """Image AUROC, AUPR, F1-max and, when the test set has masks, pixel AUROC and AUPRO.

    The test set is scored ``chunk_size`` images at a time; each chunk's maps feed a
    :class:`~anomalox.metrics.PixelMetricsAccumulator` and are then dropped (or written to
    ``maps_dir``, or kept with ``keep_maps``), so memory does not grow with the number of images.

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
    maps_dir : folder, optional
        Write each map there as it is computed (see :func:`write_maps`); ``.map_files`` lists them.
    chunk_size : int, optional
        Images per ``detector.inspect`` call (default: see :func:`write_maps`).

    Returns
    -------
    Evaluation
        ``.metrics`` holds ``image_auroc``, ``image_aupr``, ``f1_max``, ``f1_threshold``,
        ``pixel_auroc``, ``aupro`` (None when skipped), ``pixel_metrics`` (a note: where they
        were computed, or why skipped, and the bound on their binning error), ``n_images`` and
        ``n_defective``; ``result["aupro"]`` reads it too.

    Image metrics are exact. Pixel metrics are binned (see
    :class:`~anomalox.metrics.PixelMetricsAccumulator`): within the bound the note states of
    :func:`~anomalox.metrics.pixel_auroc` / :func:`~anomalox.metrics.aupro` on all maps at once.
    When the maps do not all share one size, pixel metrics are computed at the detector's input
    resolution (maps resized bilinearly, masks with nearest neighbours), as anomalib does; when it
    has none (``image_size=None`` or ``keep_aspect_ratio``), over every pixel of each map at its
    image's own resolution.
    """
    if not isinstance(keep_maps, bool):
        raise TypeError(f"keep_maps: expected a bool, got {keep_maps!r}")
    if not isinstance(keep_masks, bool):
        raise TypeError(f"keep_masks: expected a bool, got {keep_masks!r}")
    images, y, mask_sources, skipped = _test_set(X, labels, masks)
    source = as_source(images, "test")
    if source.sized and len(source) != y.size:
        raise ValueError(f"labels: expected {len(source)} labels (one per image of X), got {y.size}")
    folder = None if maps_dir is None else os.fspath(maps_dir)
    if folder is not None:
        os.makedirs(folder, exist_ok=True)
    accumulator = metrics.PixelMetricsAccumulator()
    native = mask_sources is None or _one_map_size(images, detector)
    first_shape: tuple[int, ...] | None = None
    scores: list[np.ndarray] = []
    paths: list[str | None] = []
    kept_maps: list[np.ndarray] = []
    kept_masks: list[np.ndarray | None] = []
    map_files: list[str] = []
    for inspection, chunk_paths in _chunks(detector, images, chunk_size):
        start = len(paths)
        scores.append(inspection.scores)
        paths += chunk_paths
        if start + len(chunk_paths) > y.size:
            continue  # more images than labels (an iterable of batches): the check below says so
        maps = list(inspection.maps)
        if folder is not None:
            map_files += _write_chunk(folder, start, chunk_paths, maps)
        if keep_maps:
            kept_maps += maps
        if mask_sources is None:
            continue
        chunk_masks = [
            mask_for_map(mask_sources[start + i], path, amap, detector)
            for i, (path, amap) in enumerate(zip(chunk_paths, maps))
        ]
        if keep_masks:
            kept_masks += [None if mask_sources[start + i] is None else m for i, m in enumerate(chunk_masks)]
        if native:
            for amap in maps:
                first_shape = first_shape or amap.shape
                if amap.shape != first_shape:
                    raise ValueError(
                        f"X: expected images of one size when given as an iterable of batches, got maps of "
                        f"{first_shape[1]}x{first_shape[0]} and {amap.shape[1]}x{amap.shape[0]}; pass a list"
                    )
            accumulator.update(np.stack(chunk_masks), np.stack(maps))
        elif not detector.backbone_.preprocessing.fixed_size:
            # No one input resolution (image_size=None or keep_aspect_ratio): each at its own size.
            for mask, amap in zip(chunk_masks, maps):
                accumulator.update(mask[None], amap[None])
        else:
            size = detector.backbone_.preprocessing.output_size
            accumulator.update(
                np.concatenate([_resize_mask(m, size) for m in chunk_masks]),
                np.concatenate([ops.upsample(m[None], size) for m in maps]),
            )
    all_scores = np.concatenate(scores)
    if len(all_scores) != y.size:
        raise ValueError(f"labels: expected {len(all_scores)} labels (one per image of X), got {y.size}")
    f1, f1_threshold = metrics.f1_max(y, all_scores)
    result: dict[str, Any] = {
        "n_images": len(all_scores),
        "n_defective": int(y.sum()),
        "image_auroc": metrics.image_auroc(y, all_scores),
        "image_aupr": metrics.image_aupr(y, all_scores),
        "f1_max": f1,
        "f1_threshold": float(f1_threshold),
        "pixel_auroc": None,
        "aupro": None,
    }
    curve = None
    if mask_sources is None:
        result["pixel_metrics"] = skipped
    else:
        result["pixel_auroc"] = accumulator.pixel_auroc()
        result["aupro"] = accumulator.aupro(fpr_limit)
        auroc_bound, aupro_bound = accumulator.error_bounds(fpr_limit)
        if native:
            where = f"at the images' own resolution {first_shape[1]}x{first_shape[0]}"  # type: ignore[index]
        elif not detector.backbone_.preprocessing.fixed_size:
            where = "at each image's own resolution (the images differ in size)"
        else:
            size = detector.backbone_.preprocessing.output_size
            where = f"at the detector's input resolution {size[1]}x{size[0]} (the images differ in size)"
        result["pixel_metrics"] = (
            f"computed {where}, streamed in score bins (|error| <= {auroc_bound:.1e} pixel AUROC, "
            f"{aupro_bound:.1e} AUPRO)"
        )
        fpr, pro, _ = accumulator.pro_curve()
        curve = (fpr, pro)
    threshold = detector.threshold_
    maps_out: np.ndarray | list[np.ndarray] | None = None
    if keep_maps:
        maps_out = np.stack(kept_maps) if len({m.shape for m in kept_maps}) == 1 else kept_maps
    return Evaluation(
        metrics=result,
        labels=y,
        scores=all_scores,
        paths=paths,
        threshold=threshold,
        maps=maps_out,
        masks=kept_masks if keep_masks and mask_sources is not None else None,
        map_files=map_files if folder is not None else None,
        pro_curve=curve,
        mask_sources=mask_sources,
    )


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    resized = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None].float(), size=size, mode="nearest")
    return resized[0].numpy() >= 0.5


def mask_for_map(source: Any, path: str | None, amap: np.ndarray, detector: Any) -> np.ndarray:
    """One image's mask at its map's size: all-normal for None, else read (a file) and cropped.

    ``source`` is a mask file, an (H, W) array at the image's size, or None; ``path`` names the
    image in errors.
    """
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
