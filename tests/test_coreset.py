import numpy as np
import pytest
import torch

from anomalox import ops
from conftest import greedy_k_center


def clustered(rng, n=600, d=24, centers=12):
    c = rng.standard_normal((centers, d)) * 5
    return (c[rng.integers(0, centers, n)] + rng.standard_normal((n, d))).astype(np.float32)


def test_coreset_without_projection_equals_textbook_greedy(rng):
    x = clustered(rng)
    idx = ops.coreset(x, 40, projection_dim=None, seed=3)
    assert idx.dtype == np.int64 and idx.shape == (40,)
    assert idx.tolist() == greedy_k_center(x, 40, int(idx[0]))


def test_coreset_overwrite_features_gives_the_same_selection_and_reorders_rows(rng):
    x = clustered(rng, n=4000, d=16, centers=40)
    want = ops.coreset(x, 300, projection_dim=None, seed=5)
    work = x.copy()
    got = ops.coreset(work, 300, projection_dim=None, seed=5, overwrite_features=True)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(work, x)  # used as the working copy
    # Reordered, not altered: the same multiset of rows.
    np.testing.assert_array_equal(np.unique(work, axis=0), np.unique(x, axis=0))
    t = torch.from_numpy(x.copy())
    np.testing.assert_array_equal(
        ops.coreset(t, 300, projection_dim=None, seed=5, overwrite_features=True).numpy(), want
    )


@pytest.mark.parametrize("kind", ["read-only", "strided", "projected", "float64"])
def test_coreset_overwrite_features_leaves_inputs_it_cannot_use_untouched(rng, kind):
    x = clustered(rng, n=1000, d=16)
    proj = 8 if kind == "projected" else None
    want = ops.coreset(x, 50, projection_dim=proj, seed=2)
    work = x.copy()
    if kind == "read-only":
        work.setflags(write=False)
    if kind == "strided":
        work = np.asfortranarray(work)
    if kind == "float64":
        work = work.astype(np.float64)
    before = work.copy()
    got = ops.coreset(work, 50, projection_dim=proj, seed=2, overwrite_features=True)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(work, before)


@pytest.mark.parametrize("size,expected", [(0.1, 60), (1.0, 600), (1e-9, 1), (7, 7), (600, 600)])
def test_coreset_size_is_a_count_or_a_ratio(rng, size, expected):
    idx = ops.coreset(clustered(rng), size, seed=0)
    assert len(idx) == expected
    assert len(np.unique(idx)) == expected  # no duplicates
    assert idx.min() >= 0 and idx.max() < 600


def test_coreset_is_deterministic_for_a_seed_whatever_the_thread_count(rng):
    x = clustered(rng, n=3000, d=200)
    a = ops.coreset(x, 0.1, seed=7, n_threads=1)
    b = ops.coreset(x, 0.1, seed=7, n_threads=2)
    c = ops.coreset(x, 0.1, seed=7, n_threads=4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert not np.array_equal(a, ops.coreset(x, 0.1, seed=8))


def test_coreset_handles_duplicate_rows_and_full_size(rng):
    x = np.repeat(rng.standard_normal((5, 4)).astype(np.float32), 4, axis=0)
    idx = ops.coreset(x, 20, projection_dim=None)
    assert sorted(idx.tolist()) == list(range(20))


def test_projected_coreset_covers_nearly_as_well_as_unprojected(rng):
    x = clustered(rng, n=2000, d=300, centers=40)
    exact = ops.coreset_coverage(x, ops.coreset(x, 100, projection_dim=None))
    projected = ops.coreset_coverage(x, ops.coreset(x, 100, projection_dim=128))
    assert projected <= 1.25 * exact


def test_coreset_coverage_matches_numpy(rng):
    x = clustered(rng, n=300)
    sel = np.array([0, 5, 17, 200])
    d = np.sqrt(((x[:, None, :].astype(np.float64) - x[sel][None]) ** 2).sum(-1)).min(1).max()
    assert ops.coreset_coverage(x, sel) == pytest.approx(d, rel=1e-5)


def test_coreset_torch_in_torch_out(rng):
    idx = ops.coreset(torch.from_numpy(clustered(rng)), 5)
    assert isinstance(idx, torch.Tensor) and idx.dtype == torch.int64


@pytest.mark.parametrize(
    "size,kwargs,exc,match",
    [
        (0, {}, ValueError, "size"),
        (601, {}, ValueError, "size"),
        (1.5, {}, ValueError, "size"),
        (0.0, {}, ValueError, "size"),
        (True, {}, TypeError, "size"),
        ("10", {}, TypeError, "size"),
        (5, {"projection_dim": 0}, ValueError, "projection_dim"),
        (5, {"seed": -1}, ValueError, "seed"),
    ],
)
def test_coreset_rejects_bad_arguments(rng, size, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ops.coreset(clustered(rng), size, **kwargs)
