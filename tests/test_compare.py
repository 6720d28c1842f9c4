"""anomalox.compare: one row per detector, each fitted and evaluated in its own process; a failing
detector fills its own row's error; the CLI and the HTML page show the same table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import anomalox
from anomalox import DFM, PaDiM, PatchCore
from anomalox.comparison import COLUMNS


class _Dies(DFM):
    """A detector whose process ends abruptly in fit (as a crash or the OOM killer would end it)."""

    def fit(self, X, y=None):
        os._exit(3)


def _small(cls, **kw):
    return cls(image_size=64, n_threads=1, validation_fraction=0.25, contamination=0.25, **kw)


@pytest.fixture(scope="module")
def table(mvtec):
    detectors = [
        _small(PaDiM, n_features=20),
        _small(DFM),
        _small(PaDiM, n_features=10),
        PatchCore(image_size=64, coreset_ratio=2.0),  # refused by fit: its row holds the error
    ]
    return anomalox.compare(detectors, mvtec, mvtec, as_frame=False)


def test_rows_hold_the_same_metrics_as_evaluate_in_this_process(table, mvtec):
    assert [r["detector"] for r in table] == ["PaDiM", "DFM", "PaDiM (2)", "PatchCore"]
    assert all(list(r) == list(COLUMNS) for r in table)
    padim = table[0]
    assert padim["error"] is None
    # The same fit here gives the same metrics (fits are deterministic for a seed and thread count).
    model = _small(PaDiM, n_features=20).fit(str(Path(mvtec) / "train" / "good"))
    ev = anomalox.evaluate(model, mvtec)
    for key in ("image_auroc", "image_aupr", "f1_max", "pixel_auroc", "aupro"):
        assert padim[key] == pytest.approx(ev[key], abs=1e-9), key
    assert padim["threshold"] == pytest.approx(model.threshold_)
    good = ev.scores[ev.labels == 0]
    assert padim["false_alarm_rate"] == pytest.approx(float(np.mean(good > model.threshold_)))
    for r in table[:3]:
        assert r["error"] is None
        assert r["fit_s"] > 0 and r["score_s"] > 0
        assert 100 < r["peak_rss_mib"] < 16000
        assert 0 <= r["image_auroc"] <= 1 and r["aupro"] is not None
    assert table[2]["image_auroc"] is not None and table[2] != table[0]


def test_a_failing_detector_fills_its_row_and_the_others_still_run(table):
    failed = table[3]
    assert failed["error"].startswith("ValueError: coreset_ratio")
    assert failed["image_auroc"] is None and failed["fit_s"] is None


def test_a_process_that_dies_is_reported_and_the_next_detector_runs(mvtec):
    rows = anomalox.compare([_small(_Dies), _small(DFM)], mvtec, mvtec, as_frame=False)
    assert "exit code 3" in rows[0]["error"] and rows[0]["image_auroc"] is None
    assert rows[1]["error"] is None and rows[1]["image_auroc"] is not None


def test_the_detectors_given_stay_unfitted(mvtec):
    padim = _small(PaDiM, n_features=10)
    rows = anomalox.compare({"tiny": padim}, mvtec, mvtec, as_frame=False)
    assert rows[0]["detector"] == "tiny" and rows[0]["error"] is None
    assert not hasattr(padim, "threshold_") or padim.threshold_ is None
    with pytest.raises(anomalox.NotFittedError):
        padim.decision_function(np.zeros((1, 64, 64, 3), np.uint8))


def test_timeout_stops_a_detector_and_bad_arguments_are_named(mvtec):
    rows = anomalox.compare([_small(DFM)], mvtec, mvtec, timeout=0.01, as_frame=False)
    assert rows[0]["error"].startswith("TimeoutError")
    with pytest.raises(TypeError, match="detectors"):
        anomalox.compare("padim", mvtec, mvtec)
    with pytest.raises(TypeError, match="detectors"):
        anomalox.compare([object()], mvtec, mvtec)
    with pytest.raises(ValueError, match="detectors"):
        anomalox.compare([], mvtec, mvtec)
    with pytest.raises(ValueError, match="timeout"):
        anomalox.compare([_small(DFM)], mvtec, mvtec, timeout=-1)


def test_dataframe_when_pandas_is_there_and_the_page_shows_errors(mvtec, tmp_path):
    pd = pytest.importorskip("pandas")
    from anomalox.report import write_comparison_report

    frame = anomalox.compare([_small(DFM)], mvtec, mvtec, timeout=0.01)
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == list(COLUMNS)
    page = Path(write_comparison_report(tmp_path / "c.html", frame))
    assert "TimeoutError" in page.read_text()
    with pytest.raises(ValueError, match="table"):
        write_comparison_report(tmp_path / "empty.html", [])


def test_cli_compare_prints_the_table_and_writes_the_page(mvtec, tmp_path, capsys):
    from anomalox.cli import main

    page = tmp_path / "compare.html"
    argv = ["compare", str(mvtec), "--method", "padim", "--method", "dfm", "--param", "image_size=64"]
    argv += ["--param", "n_threads=1", "--param", "contamination=0.25", "--param", "padim:n_features=20"]
    argv += ["--json", "--quiet", "--report", str(page)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = json.loads(out[: out.rindex("]") + 1])
    assert [r["detector"] for r in rows] == ["padim", "dfm"]
    assert all(r["error"] is None for r in rows)
    text = page.read_text()
    assert text.count("<tr>") == 3 and "padim" in text and "<b>" in text
    # a parameter for a method that is not compared is a usage error with its name
    assert main(["compare", str(mvtec), "--method", "dfm", "--param", "padim:n_features=2", "--quiet"]) == 1
    assert "padim" in capsys.readouterr().err


def test_images_with_labels_as_the_test_set(images):
    good, test_good, test_bad = images
    x = np.concatenate([test_good, test_bad])
    y = np.array([0] * len(test_good) + [1] * len(test_bad))
    (row,) = anomalox.compare([_small(DFM)], list(good), list(x), labels=y, as_frame=False)
    assert row["error"] is None and row["aupro"] is None  # no masks: pixel metrics skipped
    model = _small(DFM).fit(list(good))
    assert row["image_auroc"] == pytest.approx(anomalox.evaluate(model, list(x), labels=y)["image_auroc"], abs=1e-9)
