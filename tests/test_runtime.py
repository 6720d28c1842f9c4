"""The package contract: import, errors, panics, GIL release, Ctrl-C, threads, input kinds."""

import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

import anomalox
from anomalox import _convert, _core, ops


def run_python(code: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, **kwargs
    )


def test_import_in_a_fresh_interpreter_exposes_the_version_without_loading_torch():
    out = run_python("import sys, anomalox; print(anomalox.__version__, 'torch' in sys.modules)")
    assert out.returncode == 0, out.stderr
    version, torch_loaded = out.stdout.split()
    assert version == anomalox.__version__ and version.count(".") == 2
    assert torch_loaded == "False"


@pytest.fixture
def tch():
    return pytest.importorskip("anomalox_tch", reason="the tch part (anomalox-tch) is not installed")


def test_the_tch_part_reports_the_torch_it_was_built_against(tch):
    out = run_python("import anomalox_tch, torch; print(anomalox_tch._tch.__torch_version__)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == torch.__version__.split("+")[0] == tch.REQUIRED_TORCH


def test_wrong_torch_version_gives_a_clear_import_error_only_for_the_tch_part(tch):
    out = run_python(
        """
        import torch
        torch.__version__ = "2.9.1+cpu"
        import numpy as np, anomalox
        from anomalox.backbone import tch_available, tch_unavailable_reason
        assert anomalox.ops.knn(np.ones((1, 2), np.float32), np.ones((1, 2), np.float32), 1)[0][0, 0] == 0
        assert not tch_available()
        print(tch_unavailable_reason())
        anomalox.Backbone("efficientnet_lite0")
        """
    )
    assert out.returncode != 0
    assert "built against torch==2.13.0, but torch 2.9.1+cpu is installed" in out.stdout
    assert "pip install torch==2.13.0" in out.stdout and "pass a torch module as backbone" in out.stdout
    assert "ImportError: Backbone('efficientnet_lite0') runs in anomalox's tch part, which does not load" in out.stderr


def test_rust_panic_becomes_a_runtime_error_and_the_interpreter_survives():
    assert issubclass(anomalox.InternalError, RuntimeError)
    with pytest.raises(RuntimeError, match="deliberate test panic") as info:
        _core._debug_panic(2)
    assert isinstance(info.value, anomalox.InternalError)
    assert isinstance(info.value, Exception)  # caught by `except Exception`, unlike PanicException
    d, _ = ops.knn(np.ones((1, 2), np.float32), np.ones((1, 2), np.float32), 1)
    assert d[0, 0] == 0.0


def test_heavy_calls_release_the_gil(rng):
    q = rng.standard_normal((3000, 256)).astype(np.float32)
    b = rng.standard_normal((20000, 256)).astype(np.float32)
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
    ops.knn(q, b, 9, n_threads=1)
    elapsed = time.perf_counter() - start
    stop.set()
    t.join()
    # With the GIL held, the counter could not run during the call at all.
    assert elapsed > 0.05
    assert ticks >= 10


def test_ctrl_c_interrupts_a_long_kernel_within_a_second(tmp_path):
    script = tmp_path / "long.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, time, numpy as np
            from anomalox import ops
            x = np.random.default_rng(0).standard_normal((60000, 256)).astype(np.float32)
            print("ready", flush=True)
            try:
                ops.coreset(x, 60000, projection_dim=None, n_threads=1)  # minutes of work
                print("finished", flush=True)
            except KeyboardInterrupt:
                print("interrupted %.3f" % time.perf_counter(), flush=True)
            """
        )
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(1.0)
    sent = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert out.startswith("interrupted"), out
    assert float(out.split()[1]) - sent < 1.0


def test_the_tch_part_shares_torch_s_libtorch(tch):
    assert tch._tch.libtorch_num_threads() == torch.get_num_threads()  # one shared libtorch


def test_thread_count_defaults_to_torch_and_is_validated():
    assert _convert.resolve_threads(None) == torch.get_num_threads()
    assert _convert.resolve_threads(3) == 3
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n_threads"):
            _convert.resolve_threads(bad)


def test_float32_inputs_are_viewed_not_copied():
    t = torch.randn(8, 5).T  # non-contiguous
    arr, is_torch = _convert.as_float32(t, "x", "(M, D)")
    assert is_torch and arr.ctypes.data == t.data_ptr()
    n = np.ones((4, 3), np.float32)[:, ::2]
    assert _convert.as_float32(n, "x", "(M, D)")[0] is n


def test_other_floats_are_converted_and_non_floats_refused():
    q64 = np.random.default_rng(0).standard_normal((5, 3))
    d, _ = ops.knn(q64, q64, 1)
    assert d.dtype == np.float32 and np.all(d == 0)
    half = torch.ones(4, 3, dtype=torch.float16)
    assert ops.knn(half, half, 2)[0].dtype == torch.float32
    with pytest.raises(TypeError, match="queries: expected a float32 array .* got dtype int64"):
        ops.knn(np.ones((2, 2), np.int64), np.ones((2, 2), np.float32), 1)
    with pytest.raises(TypeError, match="bank: expected a float32 tensor .* got dtype torch.bool"):
        ops.knn(torch.ones(2, 2), torch.ones(2, 2, dtype=torch.bool), 1)


def test_non_cpu_tensors_are_refused_naming_the_device():
    meta = torch.empty(4, 3, device="meta")
    with pytest.raises(ValueError, match="queries: anomalox kernels run on the CPU, but this tensor is on meta"):
        ops.knn(meta, meta, 1)
