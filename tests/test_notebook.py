"""Execute notebooks/quickstart.ipynb top to bottom in a fresh kernel (this interpreter).

Needs nbclient, nbformat and ipykernel (requirements-dev.txt); skipped when they are missing.
The kernel runs in a temporary working directory, with a kernelspec for ``sys.executable``
written to a temporary JUPYTER_PATH, so nothing is installed in the user's Jupyter folders.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
KERNEL = "anomalox-test"
CELL_TIMEOUT_S = 600


def _kernelspec(root: Path) -> Path:
    """A kernelspec running ipykernel in this interpreter; returns the JUPYTER_PATH entry."""
    share = root / "jupyter"
    spec_dir = share / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python ({sys.executable})",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    return share


def test_notebook_is_saved_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "clear the notebook's outputs before committing"


# The Jupyter stack, not anomalox: jupyter_client / jupyter_core / zmq may emit DeprecationWarnings
# (utcnow, platformdirs migration, event-loop policies) in the test process.
@pytest.mark.filterwarnings("ignore::DeprecationWarning:jupyter_client")
@pytest.mark.filterwarnings("ignore::DeprecationWarning:jupyter_core")
@pytest.mark.filterwarnings("ignore::DeprecationWarning:zmq")
@pytest.mark.filterwarnings("ignore::DeprecationWarning:nbclient")
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("JUPYTER_PATH", str(_kernelspec(home)))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")  # the new path layout: no migration warning
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(home / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(home / "ipython"))
    workdir = tmp_path / "run"
    workdir.mkdir()

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(workdir)}},
        allow_errors=False,
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:  # the traceback of the failing cell
        pytest.fail(f"notebook cell failed:\n{exc}")

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    # The heatmap grid is displayed inline as a PNG, and the fitted repr shows the memory bank.
    assert any("image/png" in out.get("data", {}) for out in outputs)
    text = "".join(out.get("text", "") + out.get("data", {}).get("text/plain", "") for out in outputs)
    assert "# fitted: memory bank" in text
    assert "identical scores, maps and threshold on" in text
