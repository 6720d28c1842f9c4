"""A wheel from `maturin build` installs into a fresh venv that has torch==2.13.0 and works."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_passes_the_smoke_run(tmp_path):
    if shutil.which("cargo") is None:
        pytest.skip("needs a Rust toolchain to build the wheel")
    env = dict(os.environ, LIBTORCH_USE_PYTORCH="1")
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "maturin", "build", "--release", "--quiet", "--out", str(wheels)],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=1800,
    )
    (wheel,) = wheels.glob("anomalox-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", "torch==2.13.0", str(wheel)],
        check=True,
        timeout=1800,
    )
    out = subprocess.run(
        [str(py), "-m", "anomalox.smoke", "--n-threads", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all checks passed" in out.stdout
    assert (
        str(venv)
        in subprocess.run(
            [str(py), "-c", "import anomalox; print(anomalox.__file__)"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
