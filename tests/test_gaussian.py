import numpy as np
import pytest
import torch

from anomalox import ops


def numpy_reference(x: np.ndarray, eps: float):
    b, c, h, w = x.shape
    e = x.astype(np.float64).reshape(b, c, h * w).transpose(2, 0, 1)  # (HW, B, C)
    mean = e.mean(1)
    cov = np.stack([np.cov(e[p], rowvar=False, ddof=1) for p in range(h * w)]) + eps * np.eye(c)
    return mean, np.linalg.inv(cov)


def test_gaussian_fit_equals_numpy_float64(rng):
    x = (rng.standard_normal((40, 6, 5, 7)) * 2 + 3).astype(np.float32)
    mean, inv_cov = ops.gaussian_fit(x, eps=0.01)
    ref_mean, ref_inv = numpy_reference(x, 0.01)
    assert mean.shape == (35, 6) and inv_cov.shape == (35, 6, 6)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(inv_cov, ref_inv, rtol=1e-4, atol=1e-5 * np.abs(ref_inv).max())


def test_streaming_accumulator_equals_one_shot(rng):
    x = (rng.standard_normal((23, 5, 3, 4)) + 10).astype(np.float32)
    acc = ops.GaussianAccumulator()
    for lo, hi in [(0, 1), (1, 8), (8, 9), (9, 23)]:
        acc.partial_fit(x[lo:hi])
    assert acc.n_samples == 23
    m1, p1 = acc.finalize(eps=0.01)
    m2, p2 = ops.gaussian_fit(x, eps=0.01)
    np.testing.assert_allclose(m1, m2, rtol=1e-6)
    np.testing.assert_allclose(p1, p2, rtol=1e-5, atol=1e-6)


def test_mahalanobis_equals_numpy_float64(rng):
    train = rng.standard_normal((30, 4, 3, 3)).astype(np.float32)
    test = rng.standard_normal((5, 4, 3, 3)).astype(np.float32) * 2
    mean, inv_cov = ops.gaussian_fit(train)
    got = ops.mahalanobis(test, mean, inv_cov)
    e = test.astype(np.float64).reshape(5, 4, 9).transpose(0, 2, 1) - mean.astype(np.float64)
    ref = np.sqrt(np.einsum("bpc,pcd,bpd->bp", e, inv_cov.astype(np.float64), e)).reshape(5, 3, 3)
    assert got.shape == (5, 3, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-4)


def test_mahalanobis_of_the_mean_is_zero_and_torch_round_trips(rng):
    train = torch.from_numpy(rng.standard_normal((10, 3, 2, 2)).astype(np.float32))
    mean, inv_cov = ops.gaussian_fit(train)
    assert isinstance(mean, torch.Tensor)
    at_mean = mean.T.reshape(1, 3, 2, 2)
    assert float(ops.mahalanobis(at_mean, mean, inv_cov).abs().max()) < 1e-3


def test_gaussian_inputs_with_permuted_axes_are_read_correctly(rng):
    x = rng.standard_normal((12, 4, 3, 2)).astype(np.float32)
    strided = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    assert not strided.flags.c_contiguous
    for a, b in zip(ops.gaussian_fit(strided), ops.gaussian_fit(x)):
        np.testing.assert_array_equal(a, b)


def test_gaussian_errors_name_the_argument(rng):
    with pytest.raises(ValueError, match="features"):
        ops.gaussian_fit(np.zeros((1, 2, 3, 3), np.float32))  # one sample: no covariance
    with pytest.raises(ValueError, match="features: expected a 4-D"):
        ops.gaussian_fit(np.zeros((5, 2, 3), np.float32))
    with pytest.raises(ValueError, match="eps"):
        ops.gaussian_fit(np.zeros((5, 2, 3, 3), np.float32), eps=-1)
    mean, inv_cov = ops.gaussian_fit(rng.standard_normal((5, 2, 3, 3)).astype(np.float32))
    with pytest.raises(ValueError, match="mean"):
        ops.mahalanobis(np.zeros((1, 3, 3, 3), np.float32), mean, inv_cov)
    acc = ops.GaussianAccumulator().partial_fit(np.zeros((2, 2, 3, 3), np.float32))
    with pytest.raises(ValueError, match=r"features: expected batches of shape \(B, 2, 3, 3\)"):
        acc.partial_fit(np.zeros((2, 2, 3, 4), np.float32))


def _rss_mib() -> float:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="reads /proc (Linux)")
def test_a_dropped_accumulator_gives_its_memory_back():
    """The extension's allocator returns freed memory at once: a 331 MB accumulator used to stay
    resident after it was dropped (mimalloc's delayed purge), for the life of the process."""
    acc = ops.GaussianAccumulator(n_threads=2)
    acc.partial_fit(np.ones((2, 100, 64, 64), np.float32))  # state: 64·64·100·101·8 B = 331 MB
    held = _rss_mib()
    del acc
    assert held - _rss_mib() > 250


_THP_PROBE = """
import numpy as np
from anomalox import ops
out = ops.upsample(np.zeros((16, 32, 32), np.float32), 1024)  # 64 MB from the extension
addr = out.__array_interface__["data"][0]
eligible = None
with open("/proc/self/smaps") as f:
    inside = False
    for line in f:
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and head == "THPeligible:":
            eligible = int(line.split()[1])
print(eligible)
"""


def _thp_mode() -> str | None:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else None


@pytest.mark.skipif(
    _thp_mode() != "madvise",
    reason="needs Linux with transparent huge pages in 'madvise' mode, where only a request makes memory eligible",
)
@pytest.mark.parametrize("env_value, eligible", [(None, "0"), ("1", "1")])
def test_the_allocator_asks_for_huge_pages_only_when_the_user_sets_mimalloc_allow_thp(env_value, eligible):
    """By default the extension's allocator does not mark its memory MADV_HUGEPAGE (first touches
    of fresh 2 MB pages stalled in compaction: gaussian_fit 0.63 s -> 0.40 s); MIMALLOC_ALLOW_THP=1
    restores mimalloc's behaviour, which shows the probe can tell the two apart."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MIMALLOC_ALLOW_THP"}
    if env_value is not None:
        env["MIMALLOC_ALLOW_THP"] = env_value
    probe = subprocess.run([sys.executable, "-c", _THP_PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == eligible
