import numpy as np
import pytest
import torch

from anomalox import ops
from conftest import brute_force_sqdist


def assert_knn_matches_reference(q, b, k, dist, idx, metric="euclidean"):
    """Distances within rtol 1e-4 + atol 1e-6·(‖q‖²+‖b‖²); indices equal where the gap to the next
    candidate exceeds that tolerance."""
    d2 = brute_force_sqdist(q, b)
    order = np.argsort(d2, axis=1, kind="stable")
    ref_d2 = np.take_along_axis(d2, order, 1)
    qn = (q.astype(np.float64) ** 2).sum(1)
    bn = (b.astype(np.float64) ** 2).sum(1)
    dist = np.asarray(dist, dtype=np.float64)
    idx = np.asarray(idx)
    got_d2 = dist**2 if metric == "euclidean" else dist
    for i in range(q.shape[0]):
        tol_d2 = 1e-4 * ref_d2[i, :k] + 1e-6 * (qn[i] + bn[order[i, :k]])
        assert np.all(np.abs(got_d2[i] - ref_d2[i, :k]) <= tol_d2 + 1e-12), i
        # The reported distance is the true distance of the reported index.
        np.testing.assert_allclose(got_d2[i], d2[i, idx[i]], rtol=1e-4, atol=1e-6 * (qn[i] + bn.max()))
        for j in range(k):
            nxt = ref_d2[i, j + 1] if j + 1 < ref_d2.shape[1] else np.inf
            prev = ref_d2[i, j - 1] if j > 0 else -np.inf
            tol = 1e-4 * ref_d2[i, j] + 1e-6 * (qn[i] + bn.max())
            if nxt - ref_d2[i, j] > tol and ref_d2[i, j] - prev > tol:
                assert idx[i, j] == order[i, j], (i, j)
    assert np.all(np.diff(dist, axis=1) >= 0)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
@pytest.mark.parametrize("m,n,d,k", [(1, 1, 1, 1), (37, 300, 17, 5), (300, 2500, 64, 9), (64, 700, 300, 700)])
def test_knn_matches_float64_brute_force(rng, metric, m, n, d, k):
    q = rng.standard_normal((m, d)).astype(np.float32) * 3 + 1
    b = rng.standard_normal((n, d)).astype(np.float32) * 3 + 1
    dist, idx = ops.knn(q, b, k, metric=metric, n_threads=2)
    assert dist.shape == (m, k) and dist.dtype == np.float32
    assert idx.shape == (m, k) and idx.dtype == np.int64
    assert_knn_matches_reference(q, b, k, dist, idx, metric)


def test_knn_agrees_with_faiss_index_flat_l2(rng):
    faiss = pytest.importorskip("faiss")
    q = rng.standard_normal((500, 96)).astype(np.float32)
    b = rng.standard_normal((4000, 96)).astype(np.float32)
    index = faiss.IndexFlatL2(96)
    index.add(b)
    f_d2, f_idx = index.search(q, 9)
    dist, idx = ops.knn(q, b, 9, metric="sqeuclidean")
    qn = (q.astype(np.float64) ** 2).sum(1, keepdims=True)
    tol = 1e-4 * f_d2 + 1e-6 * (qn + (b.astype(np.float64) ** 2).sum(1).max())
    assert np.all(np.abs(dist - f_d2) <= tol)
    gaps = np.diff(f_d2, axis=1)
    clear = np.ones_like(f_idx, dtype=bool)
    clear[:, :-1] &= gaps > tol[:, :-1]
    clear[:, 1:] &= gaps > tol[:, 1:]
    assert np.array_equal(idx[clear], f_idx[clear])
    assert clear.mean() > 0.95


def test_knn_handles_non_contiguous_inputs_like_contiguous(rng):
    q = rng.standard_normal((40, 120)).astype(np.float32)
    b = rng.standard_normal((90, 500)).astype(np.float32)
    q_strided = np.asfortranarray(q)[:, ::2]  # column-major and stepped
    b_strided = b[::3, ::2][:, :60]  # stepped rows and columns
    q_c, b_c = np.ascontiguousarray(q_strided), np.ascontiguousarray(b_strided)
    assert not q_strided.flags.c_contiguous and not b_strided.flags.c_contiguous
    d1, i1 = ops.knn(q_strided, b_strided, 4)
    d2, i2 = ops.knn(q_c, b_c, 4)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)


def test_knn_torch_in_torch_out_and_transposed_tensor(rng):
    q = torch.from_numpy(rng.standard_normal((30, 16)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal((16, 200)).astype(np.float32)).T  # non-contiguous
    dist, idx = ops.knn(q, b, 3)
    assert isinstance(dist, torch.Tensor) and isinstance(idx, torch.Tensor)
    assert dist.dtype == torch.float32 and idx.dtype == torch.int64
    ref = torch.cdist(q.double(), b.double()).topk(3, largest=False)
    torch.testing.assert_close(dist.double(), ref.values, rtol=1e-4, atol=1e-5)


def test_knn_exact_match_has_zero_distance_and_ties_go_to_lower_index(rng):
    b = rng.standard_normal((50, 8)).astype(np.float32)
    b[30] = b[10]  # duplicate row: a tie
    dist, idx = ops.knn(b[[10]], b, 2)
    assert dist[0, 0] == 0.0 and dist[0, 1] == 0.0
    assert idx[0].tolist() == [10, 30]


def test_knn_is_independent_of_thread_count(rng):
    q = rng.standard_normal((700, 40)).astype(np.float32)
    b = rng.standard_normal((3000, 40)).astype(np.float32)
    d1, i1 = ops.knn(q, b, 5, n_threads=1)
    d3, i3 = ops.knn(q, b, 5, n_threads=3)
    np.testing.assert_array_equal(i1, i3)
    np.testing.assert_array_equal(d1, d3)


@pytest.mark.parametrize(
    "q_shape,b_shape,k,match",
    [
        ((4, 3), (5, 4), 1, "bank"),
        ((4, 3), (5, 3), 6, "k"),
        ((4, 3), (5, 3), 0, "k"),
        ((4,), (5, 3), 1, "queries: expected a 2-D"),
        ((0, 3), (5, 3), 1, "queries: expected a non-empty"),
        ((4, 3), (0, 3), 1, "bank: expected a non-empty"),
    ],
)
def test_knn_rejects_bad_shapes_naming_the_argument(q_shape, b_shape, k, match):
    with pytest.raises(ValueError, match=match):
        ops.knn(np.zeros(q_shape, np.float32), np.zeros(b_shape, np.float32), k)


def test_knn_rejects_unknown_metric_and_non_finite_values():
    q = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="metric"):
        ops.knn(q, q, 1, metric="cosine")
    bad = q.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="bank: expected finite values"):
        ops.knn(q, bad, 1)
