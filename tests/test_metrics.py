"""anomalox.metrics against scikit-learn and a plain numpy/scipy PRO/AUPRO written here."""

import threading
import time

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from anomalox import _core, metrics

# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


def reference_pro_curve(masks, maps):
    """PRO curve by brute force: scipy 8-connected labelling, then one pass per threshold."""
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, dtype=np.float32)
    region_scores = []
    for mask, amap in zip(masks, maps):
        lab, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        region_scores += [amap[lab == r] for r in range(1, n + 1)]
    normal_scores = maps[~masks]
    thresholds = np.unique(maps)[::-1]
    fpr, pro = [0.0], [0.0]
    for t in thresholds:
        fpr.append(np.count_nonzero(normal_scores >= t) / normal_scores.size)
        pro.append(np.mean([np.count_nonzero(r >= t) / r.size for r in region_scores]))
    return np.array(fpr), np.array(pro), np.concatenate([[np.inf], thresholds])


def reference_aupro(masks, maps, limit):
    """MVTec AD: trapezoid area of PRO(FPR) up to `limit` (interpolated there), / `limit`."""
    fpr, pro, _ = reference_pro_curve(masks, maps)
    keep = fpr <= limit
    area = np.sum(0.5 * (pro[keep][1:] + pro[keep][:-1]) * np.diff(fpr[keep]))
    if limit not in fpr:
        i = np.searchsorted(fpr, limit, side="right")  # first point past the limit
        y = pro[i - 1] + (pro[i] - pro[i - 1]) * (limit - fpr[i - 1]) / (fpr[i] - fpr[i - 1])
        area += 0.5 * (y + pro[i - 1]) * (limit - fpr[i - 1])
    return area / limit


def blobs(rng, n, h, w, levels=None, empty_every=3):
    """Masks of random discs (some images defect-free) and maps that score defects higher."""
    masks = np.zeros((n, h, w), dtype=np.int64)
    yy, xx = np.mgrid[:h, :w]
    for i in range(n):
        if i % empty_every == empty_every - 1:
            continue
        for _ in range(rng.integers(1, 4)):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1, max(2, h / 5))
            masks[i] |= ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.int64)
    maps = rng.random((n, h, w)) + 0.4 * masks
    if levels is not None:  # many ties
        maps = np.round(maps * levels) / levels
    return masks, maps.astype(np.float32)


def image_data(rng, n, levels=None):
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = rng.standard_normal(n) + 0.8 * labels
    if levels is not None:
        scores = np.round(scores * levels) / levels
    return labels, scores.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Image-level metrics vs scikit-learn
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,levels", [(2, None), (50, 2), (1000, None), (5000, 8), (100_000, 1000)])
def test_image_auroc_and_aupr_match_sklearn(rng, n, levels):
    labels, scores = image_data(rng, n, levels)
    assert metrics.image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics.image_aupr(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("n,levels", [(3, None), (400, 4), (3000, None), (20_000, 100)])
def test_f1_max_matches_precision_recall_curve(rng, n, levels):
    labels, scores = image_data(rng, n, levels)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    p, r = precision[:-1], recall[:-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    f1_best, threshold = metrics.f1_max(labels, scores)
    assert f1_best == pytest.approx(f1.max(), abs=1e-12)
    # The threshold is one that reaches the maximum, the lowest such one (argmax over ascending).
    reaching = thresholds[np.abs(f1 - f1.max()) <= 1e-12]
    assert threshold == pytest.approx(float(reaching.min()), abs=0)


def test_f1_max_prefers_the_lowest_threshold_on_a_tie():
    # Threshold 3: TP 1, FP 0 -> F1 2/3; threshold 1: TP 2, FP 2 -> F1 2/3.
    f1, threshold = metrics.f1_max([1, 0, 1, 0], [3.0, 2.0, 1.0, 1.0])
    assert f1 == pytest.approx(2 / 3) and threshold == 1.0


@pytest.mark.parametrize("levels", [None, 5])
def test_roc_curve_matches_sklearn_without_dropping_points(rng, levels):
    labels, scores = image_data(rng, 2000, levels)
    fpr, tpr, thr = metrics.roc_curve(labels, scores)
    s_fpr, s_tpr, s_thr = sk_roc_curve(labels, scores, drop_intermediate=False)
    assert fpr.dtype == np.float64 and thr.dtype == np.float32
    np.testing.assert_allclose(fpr, s_fpr, rtol=0, atol=1e-15)
    np.testing.assert_allclose(tpr, s_tpr, rtol=0, atol=1e-15)
    assert thr[0] == np.inf
    np.testing.assert_array_equal(thr[1:], s_thr[1:])


def test_labels_may_be_bool_or_any_int_dtype_and_torch(rng):
    labels, scores = image_data(rng, 500)
    want = roc_auc_score(labels, scores)
    for y in [labels.astype(bool), labels.astype(np.uint8), labels.astype(np.int32), list(labels)]:
        assert metrics.image_auroc(y, scores) == pytest.approx(want, abs=1e-12)
    got = metrics.image_auroc(torch.from_numpy(labels), torch.from_numpy(scores.astype(np.float64)))
    assert got == pytest.approx(want, abs=1e-12)
    fpr, tpr, thr = metrics.roc_curve(torch.from_numpy(labels).bool(), torch.from_numpy(scores))
    assert isinstance(fpr, torch.Tensor) and isinstance(thr, torch.Tensor)


# --------------------------------------------------------------------------------------------
# Pixel-level metrics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,levels", [((3, 9, 11), None), ((10, 64, 64), 50), ((6, 100, 90), None)])
def test_pixel_auroc_matches_sklearn_on_all_pixels(rng, shape, levels):
    masks, maps = blobs(rng, *shape, levels=levels)
    want = roc_auc_score(masks.ravel(), maps.ravel())
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(want, abs=1e-12)
    # A singleton channel axis, torch tensors, bool masks.
    got = metrics.pixel_auroc(torch.from_numpy(masks[:, None]).bool(), torch.from_numpy(maps[:, None]))
    assert got == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("shape,levels", [((4, 12, 10), None), ((6, 24, 24), 20), ((5, 40, 48), 64)])
def test_pro_curve_matches_the_per_threshold_reference(rng, shape, levels):
    masks, maps = blobs(rng, *shape, levels=levels)
    fpr, pro, thr = metrics.pro_curve(masks, maps)
    r_fpr, r_pro, r_thr = reference_pro_curve(masks, maps)
    np.testing.assert_array_equal(thr, r_thr.astype(np.float32))
    np.testing.assert_allclose(fpr, r_fpr, rtol=0, atol=1e-15)
    np.testing.assert_allclose(pro, r_pro, rtol=0, atol=1e-12)
    assert fpr[-1] == 1.0 and pro[-1] == 1.0


@pytest.mark.parametrize("limit", [0.01, 0.05, 0.3, 0.77, 1.0])
@pytest.mark.parametrize("shape,levels", [((6, 20, 20), None), ((8, 48, 40), 100), ((20, 64, 64), 60)])
def test_aupro_matches_the_mvtec_definition(rng, shape, levels, limit):
    masks, maps = blobs(rng, *shape, levels=levels)
    got = metrics.aupro(masks, maps, fpr_limit=limit)
    assert got == pytest.approx(reference_aupro(masks, maps, limit), abs=1e-12)


def test_aupro_default_limit_is_0_3_and_perfect_maps_score_one(rng):
    masks, maps = blobs(rng, 6, 32, 32, levels=30)
    assert metrics.aupro(masks, maps) == metrics.aupro(masks, maps, fpr_limit=0.3)
    assert metrics.aupro(masks, masks.astype(np.float32)) == 1.0
    assert metrics.aupro(masks, 1.0 - masks.astype(np.float32)) == 0.0


def test_regions_are_8_connected():
    # Region A: two diagonal pixels; region B: a 2x2 square. Only A's top-left pixel is detected.
    masks = np.zeros((1, 6, 6), dtype=np.uint8)
    masks[0, 0, 0] = masks[0, 1, 1] = 1
    masks[0, 3:5, 3:5] = 1
    maps = np.zeros((1, 6, 6), dtype=np.float32)
    maps[0, 0, 0] = 1.0
    # 8-connectivity: (1/2 + 0) / 2 regions. With 4-connectivity it would be (1 + 0 + 0) / 3.
    assert metrics.pro_at_threshold(masks, maps, 0.5) == 0.25


def test_pro_at_threshold_equals_the_curve_and_the_reference(rng):
    masks, maps = blobs(rng, 5, 30, 30, levels=12)
    fpr, pro, thr = metrics.pro_curve(masks, maps)
    _, r_pro, r_thr = reference_pro_curve(masks, maps)
    for k in range(1, len(thr), 3):
        got = metrics.pro_at_threshold(masks, maps, float(thr[k]))
        assert got == pytest.approx(pro[k], abs=1e-12)
        assert got == pytest.approx(r_pro[k], abs=1e-12)
    assert metrics.pro_at_threshold(masks, maps, np.inf) == 0.0
    assert metrics.pro_at_threshold(masks, maps, -np.inf) == 1.0


def test_results_do_not_depend_on_threads_or_memory_layout(rng):
    masks, maps = blobs(rng, 12, 80, 70)
    base = metrics.pro_curve(masks, maps, n_threads=1)
    for got in [
        metrics.pro_curve(masks, maps, n_threads=3),
        # Transposed (non-contiguous) inputs describe the same set of pixels and regions.
        metrics.pro_curve(masks.transpose(0, 2, 1), maps.transpose(0, 2, 1), n_threads=2),
    ]:
        for a, b in zip(base, got):
            np.testing.assert_array_equal(a, b)
    a1 = metrics.aupro(masks, maps, n_threads=1)
    assert a1 == metrics.aupro(masks[:, ::-1], maps[:, ::-1], n_threads=4)
    assert metrics.pixel_auroc(masks, maps, n_threads=1) == metrics.pixel_auroc(
        np.asfortranarray(masks), np.asfortranarray(maps), n_threads=3
    )


def test_pixel_curves_come_back_as_torch_for_torch_maps(rng):
    masks, maps = blobs(rng, 3, 16, 16)
    fpr, pro, thr = metrics.pro_curve(torch.from_numpy(masks), torch.from_numpy(maps))
    assert all(isinstance(t, torch.Tensor) for t in (fpr, pro, thr))
    assert fpr.dtype == torch.float64 and thr.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_float_labels_and_masks_are_refused_with_type_error():
    with pytest.raises(TypeError, match=r"^labels: expected an int or bool array \(N\) of 0/1, got dtype float64"):
        metrics.image_auroc(np.array([0.0, 1.0]), np.array([0.1, 0.2]))
    with pytest.raises(TypeError, match=r"^masks: expected an int or bool tensor .* got dtype torch.float32"):
        metrics.aupro(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(TypeError, match=r"^scores: expected a float32 array"):
        metrics.image_aupr([0, 1], [0, 1])


def test_label_values_other_than_0_and_1_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match=r"^labels: expected only 0 \(normal\) and 1 \(anomalous\), found 2"):
        metrics.f1_max([0, 1, 2], [0.1, 0.2, 0.3])
    masks = np.zeros((1, 4, 4), dtype=np.int64)
    masks[0, 0, 0] = -1
    with pytest.raises(ValueError, match=r"^masks: expected only 0 .* found -1"):
        metrics.pixel_auroc(masks, np.zeros((1, 4, 4), np.float32))


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"^labels: expected the shape of scores \(3,\), got \(2,\)"):
        metrics.image_auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"^masks: expected the shape of maps \(2, 4, 4\), got \(2, 4, 5\)"):
        metrics.aupro(np.zeros((2, 4, 5), bool), np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"^maps: expected a 3-D array \(N, H, W\), got shape \(4, 4\)"):
        metrics.pro_curve(np.zeros((4, 4), bool), np.zeros((4, 4), np.float32))


def test_a_single_class_is_refused():
    with pytest.raises(ValueError, match=r"^labels: need both normal \(0\) and anomalous \(1\) samples"):
        metrics.image_auroc([1, 1, 1], [0.1, 0.2, 0.3])
    maps = np.random.default_rng(0).random((2, 5, 5)).astype(np.float32)
    with pytest.raises(ValueError, match=r"^masks: need both normal \(0\) and anomalous \(1\) pixels"):
        metrics.aupro(np.zeros((2, 5, 5), bool), maps)
    with pytest.raises(ValueError, match=r"^masks: need both normal"):
        metrics.pro_curve(np.ones((2, 5, 5), bool), maps)
    with pytest.raises(ValueError, match=r"^masks: need both normal \(0\) and anomalous \(1\) pixels"):
        metrics.pixel_auroc(np.zeros((2, 5, 5), bool), maps)
    with pytest.raises(ValueError, match=r"^masks: need at least one anomalous"):
        metrics.pro_at_threshold(np.zeros((2, 5, 5), bool), maps, 0.5)


def test_pixel_auroc_kernel_names_maps_masks_and_pixels_itself():
    # The pixel kernel is told its argument names; Python does not rewrite the image kernel's text.
    maps = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    with pytest.raises(ValueError) as info:
        _core.pixel_auroc(maps, np.zeros(4, bool), 1)
    assert str(info.value) == "masks: need both normal (0) and anomalous (1) pixels, got 4 normal and 0 anomalous"
    with pytest.raises(ValueError, match=r"^maps: expected finite values, found NaN"):
        _core.pixel_auroc(np.array([0.1, np.nan], np.float32), np.array([True, False]), 1)
    labels = np.array([True, False, True, False])
    assert _core.pixel_auroc(maps, labels, 1) == _core.auroc(maps, labels, 1)


def test_non_finite_scores_empty_inputs_and_bad_limits_are_refused():
    with pytest.raises(ValueError, match=r"^scores: expected finite values, found NaN"):
        metrics.image_auroc([0, 1, 0], [0.1, np.nan, 0.3])
    maps = np.zeros((2, 5, 5), np.float32)
    maps[1, 2, 3] = np.inf
    masks = np.zeros((2, 5, 5), bool)
    masks[0, 1, 1] = True
    with pytest.raises(ValueError, match=r"^maps: expected finite values, found inf"):
        metrics.aupro(masks, maps)
    with pytest.raises(ValueError, match=r"^scores: expected a non-empty array"):
        metrics.image_auroc(np.zeros(0, int), np.zeros(0, np.float32))
    zeros = np.zeros((2, 5, 5), np.float32)
    for bad in [0, 0.0, -0.1, 1.5, np.nan]:
        with pytest.raises(ValueError, match=r"^fpr_limit: expected a number in \(0, 1\]"):
            metrics.aupro(masks, zeros, fpr_limit=bad)
    with pytest.raises(TypeError, match=r"^fpr_limit"):
        metrics.aupro(masks, zeros, fpr_limit=True)
    with pytest.raises(ValueError, match=r"^threshold: expected a number, got NaN"):
        metrics.pro_at_threshold(masks, zeros, float("nan"))


def test_tensors_off_the_cpu_are_refused_naming_the_device():
    labels = torch.zeros(3, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match=r"^labels: .* on meta"):
        metrics.image_auroc(labels, np.array([0.1, 0.2, 0.3], np.float32))


def test_pixel_metrics_release_the_gil(rng):
    masks, maps = blobs(rng, 40, 224, 224)
    ticks = 0
    stop = threading.Event()

    def count():
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            time.sleep(0.001)

    t = threading.Thread(target=count)
    t.start()
    start = time.perf_counter()
    for _ in range(3):
        metrics.pro_curve(masks, maps, n_threads=1)
    elapsed = time.perf_counter() - start
    stop.set()
    t.join()
    # With the GIL held during the calls, the counter could only run between them.
    assert elapsed > 0.05
    assert ticks >= 10


# --------------------------------------------------------------------------------------------
# Streaming pixel metrics
# --------------------------------------------------------------------------------------------


def _streamed(masks, maps, batch):
    acc = metrics.PixelMetricsAccumulator()
    for start in range(0, len(maps), batch):
        acc.update(masks[start : start + batch], maps[start : start + batch])
    return acc


@pytest.mark.parametrize("levels", [None, 50])
@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_accumulator_matches_the_exact_metrics_within_its_bound_and_1e_3(rng, levels, limit):
    masks, maps = blobs(rng, 9, 40, 36, levels)
    acc = _streamed(masks, maps, 4)
    auroc_bound, aupro_bound = acc.error_bounds(limit)
    exact_auroc, exact_aupro = metrics.pixel_auroc(masks, maps), metrics.aupro(masks, maps, fpr_limit=limit)
    assert abs(acc.pixel_auroc() - exact_auroc) <= min(auroc_bound + 1e-12, 1e-3)
    assert abs(acc.aupro(fpr_limit=limit) - exact_aupro) <= min(aupro_bound + 1e-12, 1e-3)
    if levels is not None:  # scores far apart: one distinct score per bin, the exact figures
        assert acc.pixel_auroc() == exact_auroc and acc.aupro(limit) == pytest.approx(exact_aupro, abs=1e-12)


def test_accumulator_pro_curve_keeps_points_of_the_exact_curve(rng):
    masks, maps = blobs(rng, 6, 20, 20, levels=20)
    fpr, pro, thr = _streamed(masks, maps, 2).pro_curve()
    ref_fpr, ref_pro, ref_thr = reference_pro_curve(masks, maps)
    np.testing.assert_array_equal(fpr, ref_fpr)
    np.testing.assert_allclose(pro, ref_pro, atol=1e-12)
    assert thr[0] == np.inf and np.all(thr[1:] <= ref_thr[1:])  # a bin's lowest score


def test_accumulator_does_not_depend_on_batches_or_threads(rng):
    masks, maps = blobs(rng, 8, 24, 24)
    whole = _streamed(masks, maps, 8)
    one_thread = metrics.PixelMetricsAccumulator(n_threads=1)
    for i in range(8):
        one_thread.update(masks[i : i + 1], maps[i : i + 1])
    for acc in (_streamed(masks, maps, 3), one_thread):
        assert acc.pixel_auroc() == whole.pixel_auroc() and acc.aupro() == whole.aupro()
    assert whole.n_images == 8 and whole.nbytes < 64 << 20
    assert repr(whole).startswith("PixelMetricsAccumulator(8 images, ")


def test_accumulator_takes_maps_of_another_size_in_a_later_batch(rng):
    small, big = blobs(rng, 3, 16, 16), blobs(rng, 3, 24, 20)
    acc = metrics.PixelMetricsAccumulator().update(*small).update(*big)
    exact = metrics.pixel_auroc(
        np.concatenate([small[0].ravel(), big[0].ravel()])[None, None],
        np.concatenate([small[1].ravel(), big[1].ravel()])[None, None],
    )
    assert abs(acc.pixel_auroc() - exact) <= acc.error_bounds()[0] + 1e-12


def test_accumulator_refuses_bad_inputs_naming_the_argument(rng):
    masks, maps = blobs(rng, 3, 8, 8)
    acc = metrics.PixelMetricsAccumulator()
    with pytest.raises(ValueError, match=r"^masks: expected the shape of maps \(3, 8, 8\), got \(3, 7, 8\)$"):
        acc.update(masks[:, 1:], maps)
    with pytest.raises(TypeError, match=r"^masks: expected an int or bool array"):
        acc.update(masks.astype(float), maps)
    bad = maps.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match=r"^maps: expected finite values"):
        acc.update(masks, bad)
    with pytest.raises(ValueError, match=r"^maps: expected a 3-D array \(N, H, W\), got shape \(8, 8\)$"):
        acc.update(masks[0], maps[0])
    assert acc.n_images == 0  # nothing was added by the failed calls
    with pytest.raises(ValueError, match=r"^masks: need both normal \(0\) and anomalous \(1\) pixels"):
        acc.pixel_auroc()
    acc.update(masks, maps)
    with pytest.raises(ValueError, match=r"^fpr_limit: expected a number in \(0, 1\], got 0$"):
        acc.aupro(fpr_limit=0)
