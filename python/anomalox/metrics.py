"""Evaluation metrics for anomaly detection, computed in Rust.

Image level: :func:`image_auroc`, :func:`image_aupr`, :func:`f1_max`, :func:`roc_curve`.
Pixel level: :func:`pixel_auroc`, :func:`aupro`, :func:`pro_curve`, :func:`pro_at_threshold`.

Labels and masks are integer or bool arrays (numpy or CPU torch) holding only 0 (normal) and 1
(anomalous); float labels raise ``TypeError``, other values ``ValueError``. Scores and maps are
float arrays, converted to float32 (a higher score means more anomalous); NaN or infinite scores
raise ``ValueError``. Thresholds are the distinct score values and a sample counts as anomalous
when ``score >= threshold``; tied scores enter together, exactly as in scikit-learn.

Pixel metrics take maps and masks of shape (N, H, W) (a singleton channel axis, (N, 1, H, W), is
accepted) and run over the whole test set at once: one parallel sort of all pixels, no
per-threshold copy. :class:`PixelMetricsAccumulator` gives the same metrics from batches, without
keeping the maps (binned, within a bound it reports). Each call releases the GIL and runs on ``n_threads`` threads (default:
``torch.get_num_threads()``); results do not depend on the thread count.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

from anomalox import _core
from anomalox._convert import as_float32, is_tensor, resolve_threads, same_kind, tensor_to_numpy

#: Three curve arrays (x, y, thresholds): numpy arrays, or torch tensors when the scores were.
Curve = tuple[np.ndarray, np.ndarray, np.ndarray] | tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]

__all__ = [
    "PixelMetricsAccumulator",
    "aupro",
    "f1_max",
    "image_aupr",
    "image_auroc",
    "pixel_auroc",
    "pro_at_threshold",
    "pro_curve",
    "roc_curve",
]


def _as_binary(x: Any, name: str, shape_doc: str) -> np.ndarray:
    """A bool numpy array from int or bool 0/1 labels; floats and other values are refused."""
    if is_tensor(x):
        if x.device.type != "cpu":
            raise ValueError(
                f"{name}: anomalox metrics run on the CPU, but this tensor is on {x.device}; "
                f"move it with .cpu() first (no copy is made silently)"
            )
        if x.dtype.is_floating_point or x.dtype.is_complex:
            raise TypeError(f"{name}: expected an int or bool tensor {shape_doc} of 0/1, got dtype {x.dtype}")
        # DLPack has no bool on older numpy / torch: 0/1 bytes instead (one copy).
        x = tensor_to_numpy(x.byte() if str(x.dtype) == "torch.bool" else x)
    arr = np.asarray(x)
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an int or bool array {shape_doc} of 0/1, got dtype {arr.dtype}")
    if arr.size:
        lo, hi = arr.min(), arr.max()
        if lo < 0 or hi > 1:
            bad = arr[(arr != 0) & (arr != 1)].flat[0]
            raise ValueError(f"{name}: expected only 0 (normal) and 1 (anomalous), found {bad}")
    return arr.astype(np.bool_)


def _squeeze_channel(x: Any) -> Any:
    """(N, 1, H, W) -> (N, H, W); anything else unchanged."""
    if not isinstance(x, np.ndarray) and not is_tensor(x):
        x = np.asarray(x)
    if x.ndim == 4 and x.shape[1] == 1:
        return x[:, 0]
    return x


def _image_inputs(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, bool]:
    s, as_torch = as_float32(scores, "scores", "(N)")
    y = _as_binary(labels, "labels", "(N)")
    if y.shape != s.shape:
        raise ValueError(f"labels: expected the shape of scores {tuple(s.shape)}, got {tuple(y.shape)}")
    return y, s, as_torch


def _pixel_inputs(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray, bool]:
    m, as_torch = as_float32(_squeeze_channel(maps), "maps", "(N, H, W)")
    k = _as_binary(_squeeze_channel(masks), "masks", "(N, H, W)")
    if k.shape != m.shape:
        raise ValueError(f"masks: expected the shape of maps {tuple(m.shape)}, got {tuple(k.shape)}")
    return k, m, as_torch


def image_auroc(labels: Any, scores: Any, n_threads: int | None = None) -> float:
    """Area under the ROC curve of image-level scores.

    Parameters
    ----------
    labels : array (N,), int or bool
        1 for anomalous, 0 for normal images; both must occur.
    scores : array (N,), float
        Anomaly scores, higher is more anomalous.
    n_threads : int, optional

    Returns
    -------
    float
        Equal to ``sklearn.metrics.roc_auc_score(labels, scores)`` (trapezoids between distinct
        thresholds; ties count one half).

    Notes
    -----
    One parallel sort, O(N) memory. Counts are integers and the area is one exact rational
    rounded once to float64.
    """
    y, s, _ = _image_inputs(labels, scores)
    return float(_core.auroc(s, y, resolve_threads(n_threads)))


def image_aupr(labels: Any, scores: Any, n_threads: int | None = None) -> float:
    """Area under the precision-recall curve as average precision.

    Parameters
    ----------
    labels : array (N,), int or bool
        1 for anomalous, 0 for normal images; both must occur.
    scores : array (N,), float
    n_threads : int, optional

    Returns
    -------
    float
        ``Σ (R_k − R_{k−1}) · P_k`` over distinct thresholds, equal to
        ``sklearn.metrics.average_precision_score(labels, scores)`` (step-wise, not the
        trapezoid rule, which is optimistic).
    """
    y, s, _ = _image_inputs(labels, scores)
    return float(_core.aupr(s, y, resolve_threads(n_threads)))


def f1_max(labels: Any, scores: Any, n_threads: int | None = None) -> tuple[float, float]:
    """Best F1 score over all thresholds, and that threshold.

    Parameters
    ----------
    labels : array (N,), int or bool
        1 for anomalous, 0 for normal; both must occur.
    scores : array (N,), float
    n_threads : int, optional

    Returns
    -------
    f1 : float
        ``max_t 2·TP / (2·TP + FP + FN)`` with "anomalous" meaning ``score >= t``, over the
        distinct score values t (the F1 of ``sklearn.metrics.precision_recall_curve``).
    threshold : float
        The score value reaching it (a float32 value); among equal F1 the lowest threshold, as
        ``argmax`` over scikit-learn's ascending thresholds and anomalib's ``F1Max`` pick.
    """
    y, s, _ = _image_inputs(labels, scores)
    f1, threshold = _core.f1_max(s, y, resolve_threads(n_threads))
    return float(f1), float(threshold)


def roc_curve(labels: Any, scores: Any, n_threads: int | None = None) -> Curve:
    """ROC curve at every distinct score.

    Parameters
    ----------
    labels : array (N,), int or bool
        1 for anomalous, 0 for normal; both must occur.
    scores : array (N,), float
    n_threads : int, optional

    Returns
    -------
    fpr : (K + 1,) float64, non-decreasing from 0 to 1
    tpr : (K + 1,) float64, non-decreasing from 0 to 1
    thresholds : (K + 1,) float32, decreasing: ``inf`` then the K distinct scores

    Equal to ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)``. Torch
    scores give torch tensors.
    """
    y, s, as_torch = _image_inputs(labels, scores)
    fpr, tpr, thr = _core.roc_curve(s, y, resolve_threads(n_threads))
    return same_kind(fpr, as_torch), same_kind(tpr, as_torch), same_kind(thr, as_torch)


def pixel_auroc(masks: Any, maps: Any, n_threads: int | None = None) -> float:
    """AUROC over all pixels of a test set.

    Parameters
    ----------
    masks : array (N, H, W), int or bool
        Ground truth, 1 on defects; the set needs both normal and anomalous pixels.
    maps : array (N, H, W), float
        Anomaly maps.
    n_threads : int, optional

    Returns
    -------
    float
        ``sklearn.metrics.roc_auc_score(masks.ravel(), maps.ravel())``.

    Notes
    -----
    One parallel bucket sort of the N·H·W pixels (16 bytes per pixel of working memory); the
    maps are not copied when they are C-contiguous float32.
    """
    k, m, _ = _pixel_inputs(masks, maps)
    return float(_core.pixel_auroc(m.reshape(-1), k.reshape(-1), resolve_threads(n_threads)))


def _fpr_limit(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"fpr_limit: expected a number in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"fpr_limit: expected a number in (0, 1], got {value!r}")
    return float(value)


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3, n_threads: int | None = None) -> float:
    """Normalised area under the per-region overlap (PRO) curve up to an FPR limit.

    Parameters
    ----------
    masks : array (N, H, W), int or bool
        Ground truth, 1 on defects; needs at least one defect pixel and one normal pixel.
    maps : array (N, H, W), float
        Anomaly maps.
    fpr_limit : float
        Integrate over false positive rates in [0, fpr_limit], ``0 < fpr_limit <= 1``.
    n_threads : int, optional

    Returns
    -------
    float in [0, 1]
        The MVTec AD definition: regions are the 8-connected components of each mask; at a
        threshold t, PRO is the mean over all regions of the test set of the fraction of the
        region's pixels with ``map >= t``, FPR the fraction of all normal pixels with
        ``map >= t``. The area under PRO(FPR) from 0 to ``fpr_limit`` (trapezoid rule, PRO
        interpolated linearly at the limit) is divided by ``fpr_limit``.

    Notes
    -----
    Same definition and normalisation as the MVTec AD evaluation script and anomalib 2.7's
    ``AUPRO`` (which also divides by the limit); anomalib accumulates in float32 and returns 0
    where this function raises (no defect or no normal pixel). One parallel bucket sort of the
    pixels above the score where the FPR passes the limit; no per-threshold copy.
    """
    k, m, _ = _pixel_inputs(masks, maps)
    return float(_core.aupro(m, k, _fpr_limit(fpr_limit), resolve_threads(n_threads)))


def pro_curve(masks: Any, maps: Any, n_threads: int | None = None) -> Curve:
    """The whole PRO curve: FPR and per-region overlap at every distinct score.

    Parameters
    ----------
    masks : array (N, H, W), int or bool
        Needs at least one defect pixel and one normal pixel.
    maps : array (N, H, W), float
    n_threads : int, optional

    Returns
    -------
    fpr : (K + 1,) float64, non-decreasing from 0 to 1
    pro : (K + 1,) float64, non-decreasing from 0 to 1
    thresholds : (K + 1,) float32, decreasing: ``inf`` then the K distinct map values

    Notes
    -----
    Definitions as in :func:`aupro`. K can be as large as N·H·W (20 bytes per point).
    Torch maps give torch tensors.
    """
    k, m, as_torch = _pixel_inputs(masks, maps)
    fpr, pro, thr = _core.pro_curve(m, k, resolve_threads(n_threads))
    return same_kind(fpr, as_torch), same_kind(pro, as_torch), same_kind(thr, as_torch)


def pro_at_threshold(masks: Any, maps: Any, threshold: float, n_threads: int | None = None) -> float:
    """Per-region overlap at one threshold.

    Parameters
    ----------
    masks : array (N, H, W), int or bool
        Needs at least one defect pixel.
    maps : array (N, H, W), float
    threshold : float
        A pixel is predicted anomalous when ``map >= threshold`` (compared in float32, like
        the maps).
    n_threads : int, optional

    Returns
    -------
    float
        Mean over all 8-connected regions of the masks of the fraction of the region's pixels
        predicted anomalous.
    """
    k, m, _ = _pixel_inputs(masks, maps)
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold: expected a number, got {threshold!r}")
    return float(_core.pro_at_threshold(m, k, float(threshold), resolve_threads(n_threads)))


class PixelMetricsAccumulator:
    """Pixel AUROC and AUPRO from batches of (masks, maps), without keeping the maps.

    Each pixel's score is counted in a bin: the top 24 bits of the float32's order-preserving bit
    pattern (sign, exponent, 15 mantissa bits), so bins are 2**-15 of the score wide in relative
    terms and no score range is needed in advance. Per bin it keeps the normal-pixel count, the
    defect-pixel count and the summed overlap of the 8-connected defect regions (labelled per
    image, as :func:`aupro`). Memory: 96 KiB per 4,096 bins in use (a few MiB for real maps),
    independent of the number of images.

    Every threshold of the binned curves is a threshold of the exact ones (:func:`pixel_auroc`,
    :func:`aupro`, :func:`pro_curve`); scores closer than a bin count as tied. The difference is
    at most ``error_bounds(fpr_limit)`` (½·Σ Δfpr·Δtpr over the bins): below 1e-3 when the scores
    spread over a few percent of their value, tested against the exact kernels; results are exact
    when no bin holds two distinct scores. Results do not depend on the batch split or on
    ``n_threads``.

    Parameters
    ----------
    n_threads : int, optional
        Threads per call (default ``torch.get_num_threads()``).

    Examples
    --------
    >>> acc = PixelMetricsAccumulator()
    >>> for masks, maps in batches:  # doctest: +SKIP
    ...     acc.update(masks, maps)
    >>> acc.pixel_auroc(), acc.aupro(fpr_limit=0.3)  # doctest: +SKIP
    """

    def __init__(self, n_threads: int | None = None) -> None:
        self.n_threads = n_threads
        self._core = _core.PixelMetricsAccumulator()

    def update(self, masks: Any, maps: Any) -> PixelMetricsAccumulator:
        """Add a batch: masks (N, H, W) int or bool 0/1, maps (N, H, W) float; all or nothing.

        Sizes may differ between batches; within one call all maps share one size.
        """
        k, m, _ = _pixel_inputs(masks, maps)
        self._core.update(m, k, resolve_threads(self.n_threads))
        return self

    def pixel_auroc(self) -> float:
        """Pixel AUROC over every pixel added so far (see :func:`pixel_auroc`)."""
        return float(self._core.pixel_auroc(resolve_threads(self.n_threads)))

    def aupro(self, fpr_limit: float = 0.3) -> float:
        """AUPRO up to ``fpr_limit`` over every pixel added so far (see :func:`aupro`)."""
        return float(self._core.aupro(_fpr_limit(fpr_limit), resolve_threads(self.n_threads)))

    def pro_curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fpr, pro, thresholds) at ``inf`` and then at each non-empty bin, highest score first.

        A threshold is its bin's lowest score; the points are points of :func:`pro_curve`'s.
        """
        fpr, pro, thr = self._core.pro_curve(resolve_threads(self.n_threads))
        return fpr, pro, thr

    def error_bounds(self, fpr_limit: float = 0.3) -> tuple[float, float]:
        """Bounds on ``|binned - exact|`` of (pixel AUROC, AUPRO at ``fpr_limit``) for these data."""
        auroc_bound, aupro_bound = self._core.error_bounds(_fpr_limit(fpr_limit), resolve_threads(self.n_threads))
        return float(auroc_bound), float(aupro_bound)

    @property
    def n_images(self) -> int:
        """Images added so far."""
        return int(self._core.n_images)

    @property
    def n_regions(self) -> int:
        """Defect regions (8-connected components of the masks) added so far."""
        return int(self._core.n_regions)

    @property
    def nbytes(self) -> int:
        """Bytes held by the bins."""
        return int(self._core.nbytes)

    def __repr__(self) -> str:
        normal, defect = self._core.n_pixels
        return (
            f"PixelMetricsAccumulator({self.n_images} images, {normal} normal and {defect} defect pixels, "
            f"{self.n_regions} regions)"
        )
