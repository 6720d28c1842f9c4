"""Every public entry point fails loudly and clearly on bad input.

Each bad input raises the documented exception (``ValueError`` for bad values and shapes,
``TypeError`` for bad dtypes and argument kinds) with a message of the form
``"<argument>: expected <what>, got <what was given>"``, and a failed call leaves its inputs
(and, for :class:`~anomalox.ops.GaussianAccumulator`, its state) untouched.

What the existing per-kernel test files already pin down (a few shape errors per kernel, the
basic size/seed checks of ``coreset``, the metrics' float-label and single-class errors) is not
repeated here; this file goes across every entry point and every kind of bad input.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from anomalox import metrics, ops

F32 = np.float32


def rx(text: str) -> str:
    """An anchored regex matching `text` literally at the start of the message."""
    return "^" + re.escape(text)


def snapshot(*arrays):
    return [a.clone() if isinstance(a, torch.Tensor) else np.array(a, copy=True) for a in arrays]


def assert_unchanged(before, arrays):
    for b, a in zip(before, arrays):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        else:
            np.testing.assert_array_equal(a, b)  # NaN == NaN for assert_array_equal


def with_bad_value(shape, value, where, layout="c", seed=0):
    """Random float32 data of `shape` with `value` at index `where`, in the given memory layout."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(F32)
    x[where] = value
    if layout == "c":
        return x
    if layout == "fortran":
        return np.asfortranarray(x)
    if layout == "strided":  # every other element of a larger array along the last axis
        big = np.zeros(shape[:-1] + (2 * shape[-1],), F32)
        big[..., ::2] = x
        return big[..., ::2]
    if layout == "torch_t":  # a tensor with all axes permuted (non-contiguous)
        rev = tuple(range(x.ndim))[::-1]
        return torch.from_numpy(np.ascontiguousarray(x.transpose(rev))).permute(rev)
    raise AssertionError(layout)


LAYOUTS = ["c", "fortran", "strided", "torch_t"]
NON_FINITE = [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "-inf")]


# ---------------------------------------------------------------------------------------------
# Every ops entry point, parametrised: (name, call(arrays...), arrays builder)
# ---------------------------------------------------------------------------------------------


def _gauss_stats(c=3, h=2, w=2):
    rng = np.random.default_rng(1)
    return ops.gaussian_fit(rng.standard_normal((8, c, h, w)).astype(F32))


def _acc_fit(x):
    return ops.GaussianAccumulator().partial_fit(x)


# name, argument that receives the array, expected rank doc, function of that one array, a
# valid array of the right shape
ARRAY_ARGS = [
    ("knn", "queries", "(M, D)", lambda a: ops.knn(a, np.ones((5, 4), F32), 1), (3, 4)),
    ("knn", "bank", "(N, D)", lambda a: ops.knn(np.ones((3, 4), F32), a, 1), (5, 4)),
    ("coreset", "features", "(N, D)", lambda a: ops.coreset(a, 2), (6, 4)),
    ("coreset_noproj", "features", "(N, D)", lambda a: ops.coreset(a, 2, projection_dim=None), (6, 4)),
    ("coreset_coverage", "features", "(N, D)", lambda a: ops.coreset_coverage(a, [0, 1]), (6, 4)),
    ("gaussian_fit", "features", "(B, C, H, W)", lambda a: ops.gaussian_fit(a), (4, 3, 2, 2)),
    ("GaussianAccumulator", "features", "(B, C, H, W)", _acc_fit, (4, 3, 2, 2)),
    ("mahalanobis", "features", "(B, C, H, W)", lambda a: ops.mahalanobis(a, *_gauss_stats()), (4, 3, 2, 2)),
    ("upsample", "maps", "(B, h, w)", lambda a: ops.upsample(a, (7, 5)), (2, 3, 4)),
    ("gaussian_blur", "maps", "(B, H, W)", lambda a: ops.gaussian_blur(a, 1.0), (2, 3, 4)),
]
ARRAY_IDS = [f"{name}-{arg}" for name, arg, *_ in ARRAY_ARGS]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("value,shown", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name,arg,doc,call,shape", ARRAY_ARGS, ids=ARRAY_IDS)
def test_non_finite_values_are_refused_naming_the_argument(name, arg, doc, call, shape, value, shown, layout):
    where = tuple(s - 1 for s in shape)  # the last element: every value must be scanned
    x = with_bad_value(shape, value, where, layout)
    before = snapshot(x)
    with pytest.raises(ValueError, match=rx(f"{arg}: expected finite values, ")) as info:
        call(x)
    msg = str(info.value)
    if name in ("gaussian_fit", "GaussianAccumulator"):
        assert msg.endswith("found NaN or infinity")  # the Gaussian kernels do not say which
    else:
        assert re.search(rf"found {re.escape(shown)} \(memory-order element \d+\)$", msg), msg
    assert_unchanged(before, [x])


@pytest.mark.parametrize("name,arg,doc,call,shape", ARRAY_ARGS, ids=ARRAY_IDS)
def test_wrong_rank_is_refused_with_expected_and_given_shape(name, arg, doc, call, shape):
    ndim = len(shape)
    for bad in [shape[:-1] or (3,), shape + (2,), ()]:
        x = np.ones(bad, F32)
        with pytest.raises(ValueError, match=rx(f"{arg}: expected a {ndim}-D array {doc}, got shape {tuple(bad)}")):
            call(x)
    with pytest.raises(ValueError, match=rx(f"{arg}: expected a {ndim}-D array {doc}, got shape")):
        call(torch.ones(shape[1:] or (3,)))


BAD_NUMPY_DTYPES = [np.int8, np.uint8, np.int32, np.int64, np.uint64, np.bool_, np.complex64, np.complex128]
BAD_TORCH_DTYPES = [torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool, torch.complex64]


@pytest.mark.parametrize("name,arg,doc,call,shape", ARRAY_ARGS, ids=ARRAY_IDS)
def test_integer_bool_and_complex_dtypes_are_refused_with_type_error(name, arg, doc, call, shape):
    for dt in BAD_NUMPY_DTYPES:
        x = np.ones(shape, dt)
        with pytest.raises(TypeError, match=rx(f"{arg}: expected a float32 array {doc}, got dtype {np.dtype(dt)}")):
            call(x)
    for dt in BAD_TORCH_DTYPES:
        x = torch.ones(shape, dtype=dt)
        with pytest.raises(TypeError, match=rx(f"{arg}: expected a float32 tensor {doc}, got dtype {dt}")):
            call(x)
    for obj, shown in [(np.full(shape, "a"), "<U1"), (np.empty(shape, object), "object")]:
        with pytest.raises(TypeError, match=rx(f"{arg}: expected a float32 array {doc}, got dtype {shown}")):
            call(obj)


@pytest.mark.parametrize("name,arg,doc,call,shape", ARRAY_ARGS, ids=ARRAY_IDS)
def test_other_float_dtypes_are_accepted_and_converted(name, arg, doc, call, shape):
    def outputs(r):
        if isinstance(r, ops.GaussianAccumulator):
            r = r.finalize()
        return [np.asarray(a) for a in (r if isinstance(r, tuple) else (r,))]

    x = np.random.default_rng(3).standard_normal(shape)
    ref = outputs(call(x.astype(F32)))
    # float64 (numpy or torch), big-endian float32 and float16/bfloat16 (exact in float32).
    x16 = x.astype(np.float16)
    for conv, same_as in [
        (x, ref),
        (torch.from_numpy(x), ref),
        (x.astype(">f4"), ref),
        (x16, outputs(call(x16.astype(F32)))),
        (torch.from_numpy(x16), outputs(call(x16.astype(F32)))),
        (torch.from_numpy(x).to(torch.bfloat16), outputs(call(torch.from_numpy(x).to(torch.bfloat16).float()))),
    ]:
        for a, b in zip(outputs(call(conv)), same_as):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name,arg,doc,call,shape", ARRAY_ARGS, ids=ARRAY_IDS)
def test_float64_values_beyond_float32_range_are_refused_not_turned_into_inf(name, arg, doc, call, shape):
    # Before the fix, numpy's cast turned 1e39 into inf with a RuntimeWarning (an error under
    # `filterwarnings = error`) and the kernel then complained about an "inf" the caller never
    # passed.
    for kind in ("numpy", "torch"):
        x = np.random.default_rng(4).standard_normal(shape)
        x[(0,) * len(shape)] = -1e39
        arg_in = torch.from_numpy(x) if kind == "torch" else x
        before = snapshot(arg_in)
        with pytest.raises(ValueError, match=rx(f"{arg}: expected values within the float32 range")) as info:
            call(arg_in)
        assert "float64" in str(info.value)
        assert_unchanged(before, [arg_in])


@pytest.mark.parametrize("name,arg,doc,call,shape", ARRAY_ARGS, ids=ARRAY_IDS)
def test_empty_arrays_are_refused_with_the_shape_given(name, arg, doc, call, shape):
    for axis in range(len(shape)):
        bad = tuple(0 if i == axis else s for i, s in enumerate(shape))
        with pytest.raises(ValueError, match=rx(f"{arg}: expected a non-empty array {doc}, got shape {bad}")):
            call(np.ones(bad, F32))


@pytest.mark.parametrize("name,arg,doc,call,shape", ARRAY_ARGS, ids=ARRAY_IDS)
def test_tensors_off_the_cpu_are_refused_naming_argument_and_device(name, arg, doc, call, shape):
    x = torch.empty(shape, device="meta")
    with pytest.raises(ValueError, match=rx(f"{arg}: anomalox kernels run on the CPU, but this tensor is on meta")):
        call(x)


@pytest.mark.parametrize(
    "call",
    [
        lambda t: ops.knn(np.ones((2, 2), F32), np.ones((2, 2), F32), 1, n_threads=t),
        lambda t: ops.coreset(np.ones((4, 2), F32), 2, n_threads=t),
        lambda t: ops.coreset_coverage(np.ones((4, 2), F32), [0], n_threads=t),
        lambda t: ops.gaussian_fit(np.ones((3, 1, 1, 1), F32), n_threads=t),
        lambda t: ops.GaussianAccumulator(n_threads=t).partial_fit(np.ones((3, 1, 1, 1), F32)),
        lambda t: ops.upsample(np.ones((1, 2, 2), F32), 3, n_threads=t),
        lambda t: ops.gaussian_blur(np.ones((1, 2, 2), F32), 1.0, n_threads=t),
        lambda t: metrics.image_auroc([0, 1], [0.0, 1.0], n_threads=t),
        lambda t: metrics.pixel_auroc(np.eye(2, dtype=int)[None], np.eye(2, dtype=F32)[None], n_threads=t),
    ],
)
def test_bad_thread_counts_are_refused_by_every_entry_point(call):
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match=rx(f"n_threads: expected a positive integer or None, got {bad!r}")):
            call(bad)


# ---------------------------------------------------------------------------------------------
# knn
# ---------------------------------------------------------------------------------------------


def test_knn_k_outside_one_to_n_names_k_bound_and_value():
    q, b = np.ones((3, 4), F32), np.ones((5, 4), F32)
    for k in (6, 1000):
        with pytest.raises(ValueError, match=rx(f"k: expected 1 <= k <= N=5 (bank rows), got k={k}")):
            ops.knn(q, b, k)
    for k in (0, -1, 2.0, 2.5, True, None, "2"):
        with pytest.raises(ValueError, match=rx(f"k: expected a positive integer, got {k!r}")):
            ops.knn(q, b, k)
    assert ops.knn(q, b, np.int64(5))[1].shape == (3, 5)  # numpy integers are integers


def test_knn_k_larger_than_a_single_row_bank():
    with pytest.raises(ValueError, match=rx("k: expected 1 <= k <= N=1 (bank rows), got k=2")):
        ops.knn(torch.ones(2, 3), torch.ones(1, 3), 2)


@pytest.mark.parametrize("dq,db", [(4, 3), (3, 4), (1, 128)])
def test_knn_feature_dimension_mismatch_names_both_dimensions(dq, db):
    q = np.ones((2, dq), F32)
    b = torch.ones(db, 6).T  # transposed tensor bank: the check is on the logical shape
    before = snapshot(q, b)
    with pytest.raises(
        ValueError, match=rx(f"bank: expected as many columns as queries (D={dq}), got bank with D={db}")
    ):
        ops.knn(q, b, 1)
    assert_unchanged(before, [q, b])


def test_knn_unknown_metric_names_the_choices_and_the_value():
    q = np.ones((2, 2), F32)
    for bad in ("cosine", "Euclidean", ""):
        with pytest.raises(ValueError, match=rx(f"metric: expected 'euclidean' or 'sqeuclidean', got \"{bad}\"")):
            ops.knn(q, q, 1, metric=bad)


def test_knn_nan_in_bank_reports_the_first_bad_element():
    b = np.zeros((50, 8), F32)
    b[30, 2] = np.nan
    b[40, 0] = np.inf
    with pytest.raises(ValueError, match=rx("bank: expected finite values, found NaN (memory-order element 242)")):
        ops.knn(np.zeros((1, 8), F32), b, 3)


# ---------------------------------------------------------------------------------------------
# coreset and coreset_coverage
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, -1, -100, 11, 10**12, np.int64(0), np.int32(11)])
def test_coreset_count_outside_one_to_n(size):
    x = np.random.default_rng(0).standard_normal((10, 3)).astype(F32)
    before = snapshot(x)
    with pytest.raises(ValueError, match=rx(f"size: expected a count in [1, 10] (the number of features), got {size}")):
        ops.coreset(x, size)
    assert_unchanged(before, [x])


@pytest.mark.parametrize(
    "size", [0.0, -0.0, -0.5, 1.0000001, 2.0, float("nan"), float("inf"), -float("inf"), np.float32(1.5)]
)
def test_coreset_ratio_outside_zero_one(size):
    x = np.ones((10, 3), F32)
    with pytest.raises(ValueError, match=rx(f"size: expected a ratio in (0, 1], got {size}")):
        ops.coreset(x, size)


@pytest.mark.parametrize(
    "size,shown",
    [(True, "True"), (False, "False"), (np.True_, "bool"), (None, "NoneType"), ("3", "str"), ([3], "list")],
)
def test_coreset_size_of_the_wrong_kind_is_a_type_error(size, shown):
    with pytest.raises(TypeError, match=rx("size: expected an int count or a float ratio, got ") + re.escape(shown)):
        ops.coreset(np.ones((10, 3), F32), size)


def test_coreset_accepts_the_edges_of_the_size_range():
    x = np.random.default_rng(0).standard_normal((10, 3)).astype(F32)
    assert len(ops.coreset(x, 1)) == 1 and len(ops.coreset(x, 10)) == 10
    assert len(ops.coreset(x, 1.0)) == 10 and len(ops.coreset(x, 1e-12)) == 1
    assert len(ops.coreset(x[:1], 1)) == 1  # a single feature


@pytest.mark.parametrize(
    "kwargs,exc,message",
    [
        ({"projection_dim": 0}, ValueError, "projection_dim: expected a positive integer, got 0"),
        ({"projection_dim": -3}, ValueError, "projection_dim: expected a positive integer, got -3"),
        ({"projection_dim": 2.0}, ValueError, "projection_dim: expected a positive integer, got 2.0"),
        ({"projection_dim": True}, ValueError, "projection_dim: expected a positive integer, got True"),
        ({"seed": -1}, ValueError, "seed: expected a non-negative integer, got -1"),
        ({"seed": 1.5}, ValueError, "seed: expected a non-negative integer, got 1.5"),
        ({"seed": True}, ValueError, "seed: expected a non-negative integer, got True"),
        ({"seed": None}, ValueError, "seed: expected a non-negative integer, got None"),
    ],
)
def test_coreset_bad_projection_dim_and_seed(kwargs, exc, message):
    with pytest.raises(exc, match=rx(message)):
        ops.coreset(np.ones((10, 3), F32), 3, **kwargs)


@pytest.mark.parametrize(
    "indices,exc,message",
    [
        ([], ValueError, "indices: expected at least one index, got an empty array"),
        (np.array([], np.int64), ValueError, "indices: expected at least one index, got an empty array"),
        ([0, 10], ValueError, "indices: expected indices in [0, 10), got 10"),
        ([-1, 3], ValueError, "indices: expected indices in [0, 10), got -1"),
        (np.array([2**63 + 5], np.uint64), ValueError, f"indices: expected indices in [0, 10), got {2**63 + 5}"),
        (torch.tensor([3, 99]), ValueError, "indices: expected indices in [0, 10), got 99"),
        ([1.0, 2.0], TypeError, "indices: expected integer indices, got dtype float64"),
        (np.array([True, False]), TypeError, "indices: expected integer indices, got dtype bool"),
        (torch.tensor([1.0]), TypeError, "indices: expected integer indices, got dtype float32"),
        ([[1, 2]], ValueError, "indices: expected a 1-D array of indices, got shape (1, 2)"),
        (3, ValueError, "indices: expected a 1-D array of indices, got shape ()"),
    ],
)
def test_coreset_coverage_bad_indices_name_the_argument(indices, exc, message):
    x = np.random.default_rng(0).standard_normal((10, 3)).astype(F32)
    with pytest.raises(exc, match=rx(message)):
        ops.coreset_coverage(x, indices)


# ---------------------------------------------------------------------------------------------
# gaussian_fit, GaussianAccumulator, mahalanobis
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [-1, -1e-12, float("nan"), float("inf"), True, None, "0.1", 1j])
def test_gaussian_bad_eps(eps):
    x = np.random.default_rng(0).standard_normal((4, 2, 2, 2)).astype(F32)
    with pytest.raises(ValueError, match=rx(f"eps: expected a finite number >= 0, got {eps!r}")):
        ops.gaussian_fit(x, eps=eps)
    acc = ops.GaussianAccumulator().partial_fit(x)
    with pytest.raises(ValueError, match=rx(f"eps: expected a finite number >= 0, got {eps!r}")):
        acc.finalize(eps=eps)


def test_gaussian_fit_needs_two_samples():
    x = np.ones((1, 2, 3, 3), F32)
    with pytest.raises(ValueError, match=rx("features: need at least 2 samples to estimate a covariance, got 1")):
        ops.gaussian_fit(x)
    acc = ops.GaussianAccumulator()
    with pytest.raises(ValueError, match=rx("features: no batch was given to partial_fit; need at least 2 samples")):
        acc.finalize()
    acc.partial_fit(x)
    with pytest.raises(ValueError, match=rx("features: need at least 2 samples to estimate a covariance, got 1")):
        acc.finalize()


def test_singular_covariance_without_eps_is_a_clear_value_error():
    x = np.ones((5, 3, 2, 2), F32)  # zero variance: covariance 0, not invertible with eps=0
    with pytest.raises(
        ValueError, match=r"^covariance at position 0 \(h=0, w=0\) is not positive definite .*increase eps"
    ):
        ops.gaussian_fit(x, eps=0.0)
    with pytest.raises(
        ValueError, match=r"^inverse covariance at position 0 \(h=0, w=0\) overflows float32; increase eps"
    ):
        ops.gaussian_fit(x, eps=1e-300)
    assert np.isfinite(ops.gaussian_fit(x, eps=0.01)[1]).all()


def test_accumulator_refused_batch_leaves_the_state_unchanged():
    rng = np.random.default_rng(0)
    good = rng.standard_normal((6, 3, 2, 2)).astype(F32)
    acc = ops.GaussianAccumulator().partial_fit(good[:3])
    bad = good[3:].copy()
    bad[1, 2, 1, 0] = np.nan
    before = snapshot(bad)
    for batch, exc in [
        (bad, ValueError),  # NaN
        (good[3:, :2], ValueError),  # other channel count
        (good[3:, :, :1], ValueError),  # other height
        (good[3:, :, :, :0], ValueError),  # empty
        (good[3:, 0], ValueError),  # rank 3
        (good[3:].astype(np.int32), TypeError),  # dtype
    ]:
        with pytest.raises(exc, match="^features: "):
            acc.partial_fit(batch)
        assert acc.n_samples == 3
    assert_unchanged(before, [bad])
    acc.partial_fit(good[3:])
    for a, b in zip(acc.finalize(), ops.gaussian_fit(good)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_accumulator_refused_first_batch_does_not_fix_the_shape():
    # Before the fix, a refused first batch (here: NaN) still fixed (C, H, W) and the output
    # kind, so the next, valid batch was refused as "not like the first batch".
    acc = ops.GaussianAccumulator()
    with pytest.raises(ValueError, match=rx("features: expected finite values")):
        acc.partial_fit(torch.full((3, 2, 2, 2), float("nan")))
    assert acc.n_samples == 0
    x = np.random.default_rng(0).standard_normal((4, 5, 1, 3)).astype(F32)
    mean, inv_cov = acc.partial_fit(x).finalize()
    assert isinstance(mean, np.ndarray) and mean.shape == (3, 5) and inv_cov.shape == (3, 5, 5)


def test_accumulator_batch_shape_mismatch_names_expected_and_given_shape():
    acc = ops.GaussianAccumulator().partial_fit(np.zeros((2, 2, 3, 3), F32))
    with pytest.raises(
        ValueError, match=rx("features: expected batches of shape (B, 2, 3, 3) like the first batch, got (4, 3, 3, 3)")
    ):
        acc.partial_fit(torch.zeros(4, 3, 3, 3))


@pytest.mark.parametrize(
    "f_shape,m_shape,p_shape,message",
    [
        # channels of features vs mean
        (
            (2, 4, 2, 2),
            (4, 3),
            (4, 3, 3),
            "mean: expected shape (4, 4) to match features (2, 4, 2, 2) (H*W, C), got (4, 3)",
        ),
        # positions of features vs mean
        (
            (2, 3, 3, 2),
            (4, 3),
            (4, 3, 3),
            "mean: expected shape (6, 3) to match features (2, 3, 3, 2) (H*W, C), got (4, 3)",
        ),
        # inv_cov channels
        (
            (2, 3, 2, 2),
            (4, 3),
            (4, 2, 2),
            "inv_cov: expected shape (4, 3, 3) to match features (2, 3, 2, 2) (H*W, C, C), got (4, 2, 2)",
        ),
        # inv_cov not square
        (
            (2, 3, 2, 2),
            (4, 3),
            (4, 3, 4),
            "inv_cov: expected shape (4, 3, 3) to match features (2, 3, 2, 2) (H*W, C, C), got (4, 3, 4)",
        ),
        # inv_cov positions
        (
            (2, 3, 2, 2),
            (4, 3),
            (5, 3, 3),
            "inv_cov: expected shape (4, 3, 3) to match features (2, 3, 2, 2) (H*W, C, C), got (5, 3, 3)",
        ),
    ],
)
def test_mahalanobis_dimension_mismatch_names_the_argument_and_both_shapes(f_shape, m_shape, p_shape, message):
    x, mean, inv_cov = np.ones(f_shape, F32), np.zeros(m_shape, F32), np.zeros(p_shape, F32)
    before = snapshot(x, mean, inv_cov)
    with pytest.raises(ValueError, match=rx(message)):
        ops.mahalanobis(x, mean, inv_cov)
    assert_unchanged(before, [x, mean, inv_cov])


@pytest.mark.parametrize(
    "which,bad_shape,doc",
    [
        ("mean", (4,), "(H*W, C)"),
        ("mean", (1, 4, 3), "(H*W, C)"),
        ("inv_cov", (4, 9), "(H*W, C, C)"),
        ("inv_cov", (1, 4, 3, 3), "(H*W, C, C)"),
    ],
)
def test_mahalanobis_statistics_of_the_wrong_rank(which, bad_shape, doc):
    mean, inv_cov = _gauss_stats()
    args = {"mean": mean, "inv_cov": inv_cov}
    args[which] = np.ones(bad_shape, F32)
    ndim = len(doc.split(","))
    with pytest.raises(ValueError, match=rx(f"{which}: expected a {ndim}-D array {doc}, got shape {bad_shape}")):
        ops.mahalanobis(np.ones((2, 3, 2, 2), F32), **args)


@pytest.mark.parametrize("which", ["mean", "inv_cov"])
def test_mahalanobis_statistics_of_the_wrong_dtype(which):
    mean, inv_cov = _gauss_stats()
    args = {"mean": mean, "inv_cov": inv_cov}
    args[which] = args[which].astype(np.int64)
    with pytest.raises(TypeError, match=rx(f"{which}: expected a float32 array")):
        ops.mahalanobis(np.ones((2, 3, 2, 2), F32), **args)


@pytest.mark.parametrize("which", ["mean", "inv_cov"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_mahalanobis_non_finite_statistics_are_refused(which, value):
    mean, inv_cov = _gauss_stats()
    args = {"mean": mean.copy(), "inv_cov": inv_cov.copy()}
    args[which][1, 0] = value
    # The kernel sees a non-finite distance and cannot tell which of the two holds the NaN/Inf.
    with pytest.raises(
        ValueError, match=rx("mean/inv_cov: expected finite statistics, but the distance at position 1")
    ):
        ops.mahalanobis(np.ones((2, 3, 2, 2), F32), **args)


# ---------------------------------------------------------------------------------------------
# upsample and gaussian_blur
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size,exc,message",
    [
        (0, ValueError, "size: expected a positive integer, got 0"),
        ((4, 0), ValueError, "size: expected a positive integer, got 0"),
        ((-2, 4), ValueError, "size: expected a positive integer, got -2"),
        ((4.0, 4), ValueError, "size: expected a positive integer, got 4.0"),
        ((True, 4), ValueError, "size: expected a positive integer, got True"),
        (2.5, TypeError, "size: expected an int or a pair of ints (H, W), got 2.5"),
        ((3, 3, 3), TypeError, "size: expected an int or a pair of ints (H, W), got (3, 3, 3)"),
        ((3,), TypeError, "size: expected an int or a pair of ints (H, W), got (3,)"),
        ("8", TypeError, "size: expected an int or a pair of ints (H, W), got '8'"),
        (None, TypeError, "size: expected an int or a pair of ints (H, W), got None"),
        (10**10, ValueError, "size: expected an output that fits in memory, got (2, 10000000000, 10000000000)"),
    ],
)
def test_upsample_bad_size(size, exc, message):
    maps = np.ones((2, 3, 4), F32)
    with pytest.raises(exc, match=rx(message)):
        ops.upsample(maps, size)


def test_upsample_unknown_mode():
    for mode in ("bicubic", "area", "Bilinear"):
        with pytest.raises(ValueError, match=rx(f"mode: expected 'bilinear' or 'nearest', got \"{mode}\"")):
            ops.upsample(np.ones((1, 2, 2), F32), 4, mode=mode)


@pytest.mark.parametrize(
    "sigma,message",
    [
        (0, "sigma: expected a finite number > 0, got 0"),
        (-1.0, "sigma: expected a finite number > 0, got -1.0"),
        (float("nan"), "sigma: expected a finite number > 0, got nan"),
        (float("inf"), "sigma: expected a finite number > 0, got inf"),
        (True, "sigma: expected a finite number > 0, got True"),
        ("1", "sigma: expected a finite number > 0, got '1'"),
        (None, "sigma: expected a finite number > 0, got None"),
        (1e9, "sigma: expected a finite number > 0 and below 16384.125 (radius at most 65536), got 1000000000"),
    ],
)
def test_gaussian_blur_bad_sigma(sigma, message):
    maps = np.ones((2, 3, 4), F32)
    before = snapshot(maps)
    with pytest.raises(ValueError, match=rx(message)):
        ops.gaussian_blur(maps, sigma)
    assert_unchanged(before, [maps])


# ---------------------------------------------------------------------------------------------
# Image-level metrics
# ---------------------------------------------------------------------------------------------

IMAGE_METRICS = [metrics.image_auroc, metrics.image_aupr, metrics.f1_max, metrics.roc_curve]
IMAGE_IDS = [f.__name__ for f in IMAGE_METRICS]
Y = np.array([0, 1, 0, 1, 1])
S = np.array([0.1, 0.9, 0.4, 0.35, 0.8], F32)


@pytest.mark.parametrize("fn", IMAGE_METRICS, ids=IMAGE_IDS)
@pytest.mark.parametrize("labels,normal,anomalous", [([0] * 5, 5, 0), ([1] * 5, 0, 5), (np.ones(5, bool), 0, 5)])
def test_a_single_class_in_labels_is_a_value_error_with_the_counts(fn, labels, normal, anomalous):
    # AUROC, AUPR, F1 and the ROC curve are undefined without both classes: documented ("both
    # must occur") and refused, never NaN.
    with pytest.raises(
        ValueError,
        match=rx(
            f"labels: need both normal (0) and anomalous (1) samples, got {normal} normal and {anomalous} anomalous"
        ),
    ):
        fn(labels, S)


@pytest.mark.parametrize("fn", IMAGE_METRICS, ids=IMAGE_IDS)
def test_labels_of_the_wrong_length_or_shape(fn):
    for labels in (Y[:4], np.concatenate([Y, [0]]), Y[None], Y[:, None], torch.from_numpy(Y[:3])):
        shape = tuple(np.asarray(labels).shape)
        with pytest.raises(ValueError, match=rx(f"labels: expected the shape of scores (5,), got {shape}")):
            fn(labels, S)
    for scores in (S[None], S[:, None], np.float32(0.5)):
        shape = tuple(np.shape(scores))
        with pytest.raises(ValueError, match=rx(f"scores: expected a 1-D array (N), got shape {shape}")):
            fn(Y, scores)


@pytest.mark.parametrize("fn", IMAGE_METRICS, ids=IMAGE_IDS)
@pytest.mark.parametrize("value,shown", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_non_finite_scores(fn, value, shown):
    for scores in (S.copy(), S.astype(np.float64), torch.from_numpy(S.copy())):
        scores[4] = value
        before = snapshot(scores)
        labels = Y.copy()
        with pytest.raises(ValueError, match=rx(f"scores: expected finite values, found {shown} ")):
            fn(labels, scores)
        assert_unchanged(before + [Y], [scores, labels])


@pytest.mark.parametrize("fn", IMAGE_METRICS, ids=IMAGE_IDS)
def test_label_and_score_dtypes(fn):
    # labels: int or bool (numpy or torch) of 0/1 only; anything else is a TypeError.
    for labels in (Y.astype(np.float32), Y.astype(np.float64), Y.astype(np.complex64), Y.astype(str), Y.astype(object)):
        with pytest.raises(
            TypeError, match=rx(f"labels: expected an int or bool array (N) of 0/1, got dtype {labels.dtype}")
        ):
            fn(labels, S)
    for dt in (torch.float32, torch.float16, torch.complex64):
        with pytest.raises(TypeError, match=rx(f"labels: expected an int or bool tensor (N) of 0/1, got dtype {dt}")):
            fn(torch.from_numpy(Y).to(dt), S)
    # scores: float; int and bool scores are a TypeError too (they are almost always labels
    # passed in the wrong position).
    for scores in (Y, Y.astype(bool), Y.astype(np.complex128)):
        with pytest.raises(TypeError, match=rx(f"scores: expected a float32 array (N), got dtype {scores.dtype}")):
            fn(Y, scores)
    # Every int width and bool is fine.
    ref = fn(Y, S)
    for labels in (
        Y.astype(np.int8),
        Y.astype(np.uint64),
        Y.astype(bool),
        torch.from_numpy(Y).to(torch.uint8),
        Y.tolist(),
    ):
        got = fn(labels, S)
        for a, b in zip(got if isinstance(got, tuple) else (got,), ref if isinstance(ref, tuple) else (ref,)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("fn", IMAGE_METRICS, ids=IMAGE_IDS)
@pytest.mark.parametrize("bad", [2, -1, 255])
def test_label_values_other_than_0_and_1(fn, bad):
    labels = Y.astype(np.int64)
    labels[2] = bad
    with pytest.raises(ValueError, match=rx(f"labels: expected only 0 (normal) and 1 (anomalous), found {bad}")):
        fn(labels, S)
    with pytest.raises(ValueError, match=rx(f"labels: expected only 0 (normal) and 1 (anomalous), found {bad}")):
        fn(torch.from_numpy(labels), S)


@pytest.mark.parametrize("fn", IMAGE_METRICS, ids=IMAGE_IDS)
def test_empty_image_inputs(fn):
    for labels, scores in [
        ([], []),
        (np.zeros(0, int), np.zeros(0, F32)),
        (torch.zeros(0, dtype=torch.int64), torch.zeros(0)),
    ]:
        with pytest.raises(ValueError, match=rx("scores: expected a non-empty array (N), got shape (0,)")):
            fn(labels, scores)


# ---------------------------------------------------------------------------------------------
# Pixel-level metrics
# ---------------------------------------------------------------------------------------------

PIXEL_METRICS = {
    "pixel_auroc": metrics.pixel_auroc,
    "aupro": metrics.aupro,
    "pro_curve": metrics.pro_curve,
    "pro_at_threshold": lambda k, m: metrics.pro_at_threshold(k, m, 0.5),
}


def pixel_data():
    masks = np.zeros((2, 6, 5), np.int64)
    masks[0, 1:3, 1:3] = 1
    maps = np.random.default_rng(0).random((2, 6, 5)).astype(F32)
    return masks, maps


@pytest.mark.parametrize("name", PIXEL_METRICS)
@pytest.mark.parametrize("mask_shape", [(2, 6, 4), (2, 5, 5), (1, 6, 5), (3, 6, 5), (2, 5, 6), (6, 5), (1, 2, 6, 5)])
def test_masks_of_the_wrong_size_vs_maps(name, mask_shape):
    masks, maps = pixel_data()
    bad = np.zeros(mask_shape, bool)
    bad.flat[0] = True
    before = snapshot(maps, bad)
    with pytest.raises(ValueError, match=rx(f"masks: expected the shape of maps (2, 6, 5), got {mask_shape}")):
        PIXEL_METRICS[name](bad, maps)
    with pytest.raises(ValueError, match=rx(f"masks: expected the shape of maps (2, 6, 5), got {mask_shape}")):
        PIXEL_METRICS[name](torch.from_numpy(bad), torch.from_numpy(maps))
    assert_unchanged(before, [maps, bad])


@pytest.mark.parametrize("name", PIXEL_METRICS)
def test_maps_of_the_wrong_rank(name):
    masks, maps = pixel_data()
    for bad in (maps[0], maps.reshape(-1), np.stack([maps, maps], 1), maps[None]):
        with pytest.raises(ValueError, match=rx(f"maps: expected a 3-D array (N, H, W), got shape {bad.shape}")):
            PIXEL_METRICS[name](np.zeros(bad.shape, bool), bad)


@pytest.mark.parametrize("name", PIXEL_METRICS)
def test_pixel_dtypes_and_values(name):
    masks, maps = pixel_data()
    fn = PIXEL_METRICS[name]
    with pytest.raises(TypeError, match=rx("masks: expected an int or bool array (N, H, W) of 0/1, got dtype float32")):
        fn(masks.astype(F32), maps)
    with pytest.raises(
        TypeError, match=rx("masks: expected an int or bool tensor (N, H, W) of 0/1, got dtype torch.float64")
    ):
        fn(torch.from_numpy(masks).double(), maps)
    with pytest.raises(TypeError, match=rx("maps: expected a float32 array (N, H, W), got dtype int64")):
        fn(masks, masks)
    with pytest.raises(ValueError, match=rx("masks: expected only 0 (normal) and 1 (anomalous), found 255")):
        fn((masks * 255).astype(np.uint8), maps)


@pytest.mark.parametrize("name", ["aupro", "pro_curve", "pro_at_threshold"])
@pytest.mark.parametrize("value,shown", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_non_finite_maps(name, value, shown):
    masks, maps = pixel_data()
    maps[1, 5, 4] = value
    before = snapshot(masks, maps)
    with pytest.raises(ValueError, match=rx(f"maps: expected finite values, found {shown} ")):
        PIXEL_METRICS[name](masks, maps)
    assert_unchanged(before, [masks, maps])


@pytest.mark.parametrize("name", ["aupro", "pro_curve"])
@pytest.mark.parametrize("fill,normal,anomalous", [(0, 60, 0), (1, 0, 60)])
def test_a_single_class_in_masks(name, fill, normal, anomalous):
    _, maps = pixel_data()
    with pytest.raises(
        ValueError,
        match=rx(
            f"masks: need both normal (0) and anomalous (1) pixels, got {normal} normal and {anomalous} anomalous"
        ),
    ):
        PIXEL_METRICS[name](np.full((2, 6, 5), fill, np.uint8), maps)


def test_pro_at_threshold_needs_a_defect_but_not_a_normal_pixel():
    _, maps = pixel_data()
    with pytest.raises(ValueError, match=rx("masks: need at least one anomalous (1) pixel, got none")):
        metrics.pro_at_threshold(np.zeros((2, 6, 5), bool), maps, 0.5)
    # Documented: "Needs at least one defect pixel" -- all-defect masks are fine (one region).
    got = metrics.pro_at_threshold(np.ones((2, 6, 5), bool), maps, 0.5)
    assert got == pytest.approx(np.mean(maps >= 0.5), abs=1e-12)


@pytest.mark.parametrize(
    "threshold,exc,message",
    [
        ("0.5", TypeError, "threshold: expected a number, got '0.5'"),
        (None, TypeError, "threshold: expected a number, got None"),
        (False, TypeError, "threshold: expected a number, got False"),
    ],
)
def test_pro_at_threshold_bad_threshold(threshold, exc, message):
    masks, maps = pixel_data()
    with pytest.raises(exc, match=rx(message)):
        metrics.pro_at_threshold(masks, maps, threshold)


@pytest.mark.parametrize("name", PIXEL_METRICS)
def test_empty_pixel_inputs(name):
    for shape in [(0, 6, 5), (2, 0, 5), (2, 6, 0)]:
        with pytest.raises(ValueError, match=rx(f"maps: expected a non-empty array (N, H, W), got shape {shape}")):
            PIXEL_METRICS[name](np.zeros(shape, bool), np.zeros(shape, F32))


@pytest.mark.parametrize("case", ["nan_map", "all_normal", "all_anomalous"])
def test_pixel_auroc_errors_name_maps_and_masks(case):
    masks, maps = pixel_data()
    if case == "nan_map":
        maps[1, 2, 3] = np.nan
        with pytest.raises(ValueError, match=rx("maps: expected finite values, found NaN")):
            metrics.pixel_auroc(masks, maps)
    else:
        fill = 0 if case == "all_normal" else 1
        with pytest.raises(ValueError, match=rx("masks: need both normal (0) and anomalous (1) pixels")):
            metrics.pixel_auroc(np.full(masks.shape, fill, bool), maps)
