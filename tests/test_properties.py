"""Property-based tests (hypothesis) of the kernels against independent float64 references.

Shapes, value scales, dtypes and memory layouts are drawn at random: C-contiguous, permuted
axes (transposed), stepped (strided) and reversed (negative-stride) numpy views, and contiguous,
permuted and stepped torch tensors. Results must match the references within the documented
tolerances and must not depend on the layout.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from anomalox import metrics, ops

F32 = np.float32

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

LAYOUTS = ["c", "permuted", "strided", "reversed", "torch", "torch_permuted", "torch_strided"]
layouts = st.sampled_from(LAYOUTS)
scales = st.sampled_from([1e-3, 1.0, 1e3])
seeds = st.integers(0, 2**32 - 1)


def in_layout(x: np.ndarray, layout: str):
    """The same logical values as `x`, in the given memory layout (a view, not a copy)."""
    perm = tuple(range(x.ndim))[::-1]
    if layout == "c":
        return np.ascontiguousarray(x)
    if layout == "permuted":
        return np.ascontiguousarray(x.transpose(perm)).transpose(perm)
    if layout in ("strided", "torch_strided"):
        big = np.zeros(tuple(2 * s + 1 for s in x.shape), x.dtype)
        view = tuple(slice(1, None, 2) for _ in x.shape)
        big[view] = x
        return torch.from_numpy(big)[view] if layout == "torch_strided" else big[view]
    if layout == "reversed":  # negative strides on every axis
        flip = tuple(slice(None, None, -1) for _ in x.shape)
        return np.ascontiguousarray(x[flip])[flip]
    if layout == "torch":
        return torch.from_numpy(np.ascontiguousarray(x))
    if layout == "torch_permuted":
        return torch.from_numpy(np.ascontiguousarray(x.transpose(perm))).permute(perm)
    raise AssertionError(layout)


def as_np(x) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def f32_values(x) -> np.ndarray:
    """The float32 values a kernel sees, as float64 (the exact input of the reference)."""
    return as_np(x).astype(F32).astype(np.float64)


@st.composite
def float_arrays(draw, shape, dtypes=(F32, np.float64)):
    """Random normal values, times a drawn scale plus an offset, in a drawn dtype and layout."""
    rng = np.random.default_rng(draw(seeds))
    scale = draw(scales)
    offset = draw(st.sampled_from([0.0, 3.0])) * scale
    x = (rng.standard_normal(shape) * scale + offset).astype(draw(st.sampled_from(dtypes)))
    return in_layout(x, draw(layouts))


def check_knn(q, b, k, dist, idx, metric):
    q64, b64 = f32_values(q), f32_values(b)
    d2 = ((q64[:, None, :] - b64[None]) ** 2).sum(-1)
    order = np.argsort(d2, axis=1, kind="stable")
    ref = np.take_along_axis(d2, order, 1)
    qn, bn = (q64**2).sum(1), (b64**2).sum(1)
    dist, idx = as_np(dist).astype(np.float64), as_np(idx)
    assert dist.shape == idx.shape == (q64.shape[0], k)
    got_d2 = dist**2 if metric == "euclidean" else dist
    for i in range(q64.shape[0]):
        tol = 1e-4 * ref[i] + 1e-6 * (qn[i] + bn[order[i]])  # per candidate, sorted
        assert np.all(np.abs(got_d2[i] - ref[i, :k]) <= tol[:k] + 1e-300), (i, got_d2[i], ref[i, :k])
        # The reported distance is the true distance of the reported index.
        own = d2[i, idx[i]]
        assert np.all(np.abs(got_d2[i] - own) <= 1e-4 * own + 1e-6 * (qn[i] + bn[idx[i]]) + 1e-300)
        assert len(set(idx[i].tolist())) == k and idx[i].min() >= 0 and idx[i].max() < b64.shape[0]
        for j in range(k):
            gap_next = ref[i, j + 1] - ref[i, j] if j + 1 < ref.shape[1] else np.inf
            gap_prev = ref[i, j] - ref[i, j - 1] if j > 0 else np.inf
            tol_next = tol[j] + (tol[j + 1] if j + 1 < len(tol) else 0.0)
            tol_prev = tol[j] + (tol[j - 1] if j > 0 else 0.0)
            if gap_next > tol_next and gap_prev > tol_prev:
                assert idx[i, j] == order[i, j], (i, j)
    assert np.all(np.diff(dist, axis=1) >= 0)


@SETTINGS
@given(data=st.data(), m=st.integers(1, 12), n=st.integers(1, 80), d=st.integers(1, 40))
def test_knn_matches_float64_brute_force(data, m, n, d):
    q = data.draw(float_arrays((m, d)), "queries")
    b = data.draw(float_arrays((n, d)), "bank")
    if data.draw(st.booleans(), "duplicate bank rows") and n > 1:
        b = as_np(b).copy()
        b[n // 2 :] = b[: n - n // 2]  # exact ties
    k = data.draw(st.integers(1, n), "k")
    metric = data.draw(st.sampled_from(["euclidean", "sqeuclidean"]), "metric")
    dist, idx = ops.knn(q, b, k, metric=metric, n_threads=data.draw(st.sampled_from([1, 2])))
    assert isinstance(dist, torch.Tensor) == isinstance(q, torch.Tensor)
    check_knn(q, b, k, dist, idx, metric)
    # Layout-, dtype- and thread-independent: the same as on C-contiguous float32 copies.
    d_c, i_c = ops.knn(f32_values(q).astype(F32), f32_values(b).astype(F32), k, metric=metric, n_threads=3)
    np.testing.assert_array_equal(as_np(idx), i_c)
    np.testing.assert_array_equal(as_np(dist), d_c)


def farthest_point_gaps(x: np.ndarray, idx: np.ndarray):
    """For each greedy step: (distance of the chosen point to the selection so far, the largest
    such distance over all points), in float64."""
    min_d = ((x - x[idx[0]]) ** 2).sum(1)
    for j in idx[1:]:
        yield min_d[j], min_d.max()
        min_d = np.minimum(min_d, ((x - x[j]) ** 2).sum(1))


@SETTINGS
@given(data=st.data(), n=st.integers(1, 150), d=st.integers(1, 24))
def test_coreset_is_a_deterministic_greedy_k_center_selection(data, n, d):
    x = data.draw(float_arrays((n, d)), "features")
    if data.draw(st.booleans(), "duplicate rows") and n > 1:
        x = in_layout(np.repeat(as_np(x)[: (n + 1) // 2], 2, axis=0)[:n], data.draw(layouts, "dup layout"))
    use_ratio = data.draw(st.booleans(), "ratio")
    if use_ratio:
        size = data.draw(st.floats(1e-6, 1.0, exclude_min=False), "ratio")
        count = max(1, int(size * n))
    else:
        size = count = data.draw(st.integers(1, n), "count")
    projection_dim = data.draw(st.sampled_from([None, 1, 3, 16, 64]), "projection_dim")
    seed = data.draw(st.integers(0, 2**70), "seed")

    idx = ops.coreset(x, size, projection_dim=projection_dim, seed=seed, n_threads=1)
    assert isinstance(idx, torch.Tensor) == isinstance(x, torch.Tensor)
    idx = as_np(idx)
    assert idx.dtype == np.int64 and idx.shape == (count,)
    assert len(np.unique(idx)) == count  # no duplicates
    assert idx.min() >= 0 and idx.max() < n
    # Deterministic for a seed, whatever the thread count or the memory layout.
    np.testing.assert_array_equal(
        as_np(ops.coreset(x, size, projection_dim=projection_dim, seed=seed, n_threads=2)), idx
    )
    x_c = f32_values(x).astype(F32)
    np.testing.assert_array_equal(ops.coreset(x_c, size, projection_dim=projection_dim, seed=seed, n_threads=2), idx)
    # The starting point is the first index and does not depend on the size: greedy selections
    # of different sizes are prefixes of each other.
    full = ops.coreset(x_c, n, projection_dim=projection_dim, seed=seed)
    np.testing.assert_array_equal(full[:count], idx)
    if projection_dim is None:
        # Farthest point: each chosen point is (within float32 rounding) the farthest from the
        # points chosen before it.
        x64 = f32_values(x)
        scale = (x64**2).sum(1).max()
        for chosen, farthest in farthest_point_gaps(x64, idx):
            assert chosen >= farthest - 1e-4 * farthest - 1e-6 * scale


def numpy_gaussian(x: np.ndarray, eps: float):
    b, c, h, w = x.shape
    e = x.reshape(b, c, h * w).transpose(2, 0, 1)  # (HW, B, C)
    mean = e.mean(1)
    centred = e - mean[:, None, :]
    cov = np.einsum("pbc,pbd->pcd", centred, centred) / (b - 1) + eps * np.eye(c)
    return mean, np.linalg.inv(cov)


@SETTINGS
@given(
    data=st.data(),
    b=st.integers(2, 12),
    c=st.integers(1, 6),
    h=st.integers(1, 4),
    w=st.integers(1, 4),
    eps=st.sampled_from([0.01, 0.1, 1.0]),
)
def test_gaussian_fit_and_mahalanobis_match_numpy_float64(data, b, c, h, w, eps):
    x = data.draw(float_arrays((b, c, h, w)), "features")
    x64 = f32_values(x)
    mean, inv_cov = ops.gaussian_fit(x, eps=eps, n_threads=data.draw(st.sampled_from([1, 2])))
    ref_mean, ref_inv = numpy_gaussian(x64, eps)
    assert isinstance(mean, torch.Tensor) == isinstance(x, torch.Tensor)
    mean, inv_cov = as_np(mean), as_np(inv_cov)
    assert mean.shape == (h * w, c) and inv_cov.shape == (h * w, c, c) and mean.dtype == F32
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-4, atol=1e-6 * np.abs(x64).max())
    np.testing.assert_allclose(inv_cov, ref_inv, rtol=1e-4, atol=1e-5 * np.abs(ref_inv).max())
    np.testing.assert_array_equal(inv_cov, inv_cov.transpose(0, 2, 1))  # exactly symmetric

    # Streaming over a random split of the batch gives the same statistics.
    cut = data.draw(st.integers(1, b - 1), "split")
    acc = ops.GaussianAccumulator().partial_fit(x[:cut]).partial_fit(x[cut:])
    assert acc.n_samples == b
    for got, want in zip(acc.finalize(eps=eps), (mean, inv_cov)):
        np.testing.assert_allclose(as_np(got), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())

    # Mahalanobis of new data (in another layout) against the fitted statistics, in float64.
    m = data.draw(st.integers(1, 5), "test samples")
    t = data.draw(float_arrays((m, c, h, w)), "test features")
    mean_in = in_layout(mean, data.draw(layouts, "mean layout"))
    inv_in = in_layout(inv_cov, data.draw(layouts, "inv_cov layout"))
    got = as_np(ops.mahalanobis(t, mean_in, inv_in))
    e = f32_values(t).reshape(m, c, h * w).transpose(0, 2, 1) - mean.astype(np.float64)
    d2 = np.einsum("bpc,pcd,bpd->bp", e, inv_cov.astype(np.float64), e)
    ref = np.sqrt(np.maximum(d2, 0)).reshape(m, h, w)
    assert got.shape == (m, h, w) and got.dtype == F32
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6 * ref.max())


@SETTINGS
@given(
    data=st.data(),
    b=st.integers(1, 3),
    h=st.integers(1, 24),
    w=st.integers(1, 24),
    out_h=st.integers(1, 48),
    out_w=st.integers(1, 48),
    mode=st.sampled_from(["bilinear", "nearest"]),
)
def test_upsample_matches_torch_interpolate(data, b, h, w, out_h, out_w, mode):
    maps = data.draw(float_arrays((b, h, w)), "maps")
    got = ops.upsample(maps, (out_h, out_w), mode=mode, n_threads=data.draw(st.sampled_from([1, 2])))
    assert isinstance(got, torch.Tensor) == isinstance(maps, torch.Tensor)
    src = torch.from_numpy(f32_values(maps).astype(F32))[:, None]
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    ref = F.interpolate(src, size=(out_h, out_w), mode=mode, **kwargs)[:, 0].numpy()
    got = as_np(got)
    assert got.shape == ref.shape and got.dtype == F32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    if mode == "nearest":  # nearest picks input values exactly
        assert np.isin(got, src.numpy()).all()


@SETTINGS
@given(
    data=st.data(),
    b=st.integers(1, 3),
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    sigma=st.floats(0.2, 6.0),
)
def test_gaussian_blur_matches_scipy_reflect(data, b, h, w, sigma):
    maps = data.draw(float_arrays((b, h, w)), "maps")
    got = ops.gaussian_blur(maps, sigma=sigma, n_threads=data.draw(st.sampled_from([1, 2])))
    assert isinstance(got, torch.Tensor) == isinstance(maps, torch.Tensor)
    m64 = f32_values(maps)
    ref = np.stack([ndimage.gaussian_filter(m, sigma, mode="reflect", truncate=4.0) for m in m64])
    got = as_np(got)
    assert got.shape == ref.shape and got.dtype == F32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(m64).max())


label_dtypes = st.sampled_from([np.bool_, np.int8, np.uint8, np.int32, np.int64, "torch_bool", "torch_int64", "list"])


def labels_as(y: np.ndarray, kind, layout: str):
    """0/1 labels as a list, a numpy array of `kind` or a torch tensor, in (about) `layout`."""
    if kind == "list":
        return y.tolist()
    torch_layout = layout if layout.startswith("torch") else "torch_strided"
    if kind == "torch_bool":
        return in_layout(y.astype(bool), torch_layout)
    if kind == "torch_int64":
        return in_layout(y.astype(np.int64), torch_layout)
    return in_layout(y.astype(kind), "strided" if layout.startswith("torch") else layout)


@SETTINGS
@given(data=st.data(), n=st.integers(2, 400), levels=st.sampled_from([None, 2, 5, 50]), kind=label_dtypes)
def test_image_auroc_and_aupr_match_sklearn(data, n, levels, kind):
    rng = np.random.default_rng(data.draw(seeds, "seed"))
    y = rng.integers(0, 2, n)
    y[rng.choice(n, 2, replace=False)] = [0, 1]  # both classes
    s = rng.standard_normal(n) * data.draw(scales, "scale") + data.draw(st.floats(0, 3), "separation") * y
    if levels is not None:  # ties
        s = np.round(s * levels) / levels
    s = s.astype(data.draw(st.sampled_from([F32, np.float64]), "dtype"))
    layout = data.draw(layouts, "layout")
    scores = in_layout(s, layout)
    labels = labels_as(y, kind, layout)
    s32 = s.astype(F32)  # what the kernel ranks, and so what scikit-learn must see
    threads = data.draw(st.sampled_from([1, 2]), "threads")
    assert metrics.image_auroc(labels, scores, n_threads=threads) == pytest.approx(roc_auc_score(y, s32), abs=1e-12)
    assert metrics.image_aupr(labels, scores, n_threads=threads) == pytest.approx(
        average_precision_score(y, s32), abs=1e-12
    )


@SETTINGS
@given(
    data=st.data(),
    n=st.integers(1, 4),
    h=st.integers(1, 20),
    w=st.integers(1, 20),
    levels=st.sampled_from([None, 4, 30]),
)
def test_pixel_auroc_matches_sklearn_on_all_pixels(data, n, h, w, levels):
    rng = np.random.default_rng(data.draw(seeds, "seed"))
    if n * h * w < 2:
        n = 2
    masks = rng.random((n, h, w)) < data.draw(st.floats(0.05, 0.5), "defect fraction")
    masks.flat[rng.choice(masks.size, 2, replace=False)] = [True, False]
    maps = rng.random((n, h, w)) + 0.5 * masks
    if levels is not None:
        maps = np.round(maps * levels) / levels
    maps = maps.astype(F32)
    layout = data.draw(layouts, "layout")
    mask_in = in_layout(masks, layout)
    if data.draw(st.booleans(), "channel axis"):
        mask_in, map_in = mask_in[:, None], in_layout(maps, layout)[:, None]
    else:
        map_in = in_layout(maps, layout)
    got = metrics.pixel_auroc(mask_in, map_in, n_threads=data.draw(st.sampled_from([1, 2])))
    assert got == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
