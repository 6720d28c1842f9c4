"""The `anomalox` command line: fit / predict / evaluate / report / demo, help and exit codes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from importlib.metadata import entry_points

import numpy as np
import pytest

import anomalox
from anomalox.cli import main

# Their image sets are tiny: the conformal threshold falls back to the largest calibration score.
pytestmark = pytest.mark.filterwarnings("ignore::anomalox.CalibrationWarning")

FAST = ["--param", "image_size=64", "--param", "coreset_ratio=1.0", "--param", "validation_fraction=0.25"]


@pytest.fixture(scope="module")
def model_file(mvtec, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "model.ax"
    assert main(["fit", str(mvtec), "--out", str(path), "--quiet", *FAST]) == 0
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "anomalox", *args], capture_output=True, text=True, timeout=300)


def test_console_script_is_declared():
    assert any(
        ep.name == "anomalox" and ep.value == "anomalox.cli:main" for ep in entry_points(group="console_scripts")
    )


@pytest.mark.parametrize("command", ["fit", "predict", "evaluate", "report", "demo"])
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"anomalox {command}" in out


def test_usage_errors_exit_2_and_runtime_errors_exit_1_with_one_line(tmp_path):
    usage = _run("fit", str(tmp_path))  # --out missing
    assert usage.returncode == 2 and "--out" in usage.stderr
    missing = _run("fit", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.ax"), "--quiet")
    assert missing.returncode == 1
    assert missing.stderr.strip().count("\n") == 0 and "Traceback" not in missing.stderr
    assert missing.stderr.startswith("anomalox: error: ") and "nowhere" in missing.stderr
    debug = _run("fit", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.ax"), "--quiet", "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_fit_prints_the_calibration_warning_and_succeeds(mvtec, tmp_path):
    fitted = _run("fit", str(mvtec), "--out", str(tmp_path / "m.ax"), "--quiet", *FAST)
    assert fitted.returncode == 0 and (tmp_path / "m.ax").is_file()
    assert "CalibrationWarning" in fitted.stderr and "1/(n+1)" in fitted.stderr


def test_fit_takes_the_calibration_rule_as_a_param(mvtec, tmp_path):
    path = tmp_path / "cv.ax"
    args = [*FAST, "--param", "calibration=cv", "--param", "n_folds=2", "--param", "contamination=0.1"]
    assert main(["fit", str(mvtec), "--out", str(path), "--quiet", *args]) == 0
    assert anomalox.load(path).calibration_scores_.shape == (14,)


def test_unknown_or_malformed_params_are_refused(mvtec, tmp_path, capsys):
    assert main(["fit", str(mvtec), "--out", str(tmp_path / "m.ax"), "--quiet", "--param", "colour=red"]) == 1
    assert "has no parameter colour" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", str(mvtec), "--out", str(tmp_path / "m.ax"), "--quiet", "--param", "noequals"])
    assert exit_info.value.code == 2


def test_predict_writes_csv_in_path_order_and_heatmaps(model_file, mvtec, tmp_path):
    out, maps = tmp_path / "scores.csv", tmp_path / "maps"
    assert (
        main(["predict", str(model_file), str(mvtec / "test"), "--out", str(out), "--maps", str(maps), "--quiet"]) == 0
    )
    with open(out) as f:
        rows = list(csv.DictReader(f))
    paths = sorted(str(p) for p in (mvtec / "test").rglob("*.png"))
    assert [r["path"] for r in rows] == paths
    scores = np.array([float(r["score"]) for r in rows])
    defective = np.array(["/spot/" in p for p in paths])
    assert scores[defective].min() > scores[~defective].max()
    assert {r["label"] for r in rows} <= {"0", "1"}
    expected = sorted(f"{kind}_{i:03d}_map.png" for kind in ("good", "spot") for i in range(4))
    assert sorted(p.name for p in maps.glob("*")) == expected  # the path below test/, one file each


def test_evaluate_prints_a_table_or_json(model_file, mvtec, capsys):
    assert main(["evaluate", str(model_file), str(mvtec), "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["image_auroc"] == 1.0 and result["aupro"] is not None
    assert main(["evaluate", str(model_file), str(mvtec), "--quiet"]) == 0
    assert "image_auroc" in capsys.readouterr().out


def test_report_writes_a_self_contained_html(model_file, mvtec, tmp_path):
    out = tmp_path / "r.html"
    assert main(["report", str(model_file), str(mvtec), "--out", str(out), "--quiet"]) == 0
    text = out.read_text()
    assert 'id="metrics"' in text and "data:image/png;base64," in text and "http" not in text.split("<body", 1)[1]
    assert "PRO curve" in text and 'alt="heatmap"' in text and 'alt="ground truth"' in text  # maps and masks kept


def test_demo_wiring_on_a_small_split(monkeypatch, images, tmp_path, capsys):
    """The demo's steps on a small synthetic split (the real ELPV run is the README's main command)."""
    import anomalox.elpv

    good, test_good, test_bad = images
    split = {"train": list(good), "test": list(test_good) + list(test_bad), "test_labels": np.array([0] * 4 + [1] * 4)}
    monkeypatch.setattr(anomalox.elpv, "demo_split", lambda n, seed=0: split)
    from anomalox.demo import run_demo

    summary = run_demo(n_train=14, out=str(tmp_path / "demo.html"), quiet=True)
    out = capsys.readouterr().out
    assert "image AUROC" in out and "non-commercial" in out
    assert summary["image_auroc"] == 1.0 and (tmp_path / "demo.html").exists()
