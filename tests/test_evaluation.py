"""`anomalox.evaluate` returns an `Evaluation`; a labelled list of images gives the folder's figures;
maps and masks are kept only when asked for; heatmap export names its files in one place."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import anomalox
from anomalox import Evaluation, PatchCore
from anomalox.data import read_labeled_set
from anomalox.report import write_evaluation_report, write_heatmaps

# Its image set is tiny: the conformal threshold falls back to the largest calibration score.
pytestmark = pytest.mark.filterwarnings("ignore::anomalox.CalibrationWarning")

METRIC_KEYS = [
    "n_images",
    "n_defective",
    "image_auroc",
    "image_aupr",
    "f1_max",
    "f1_threshold",
    "pixel_auroc",
    "aupro",
    "pixel_metrics",
]


def _read(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


@pytest.fixture(scope="module")
def model(images):
    return PatchCore(image_size=64, coreset_ratio=1.0, validation_fraction=0.25).fit(images[0])


@pytest.fixture(scope="module")
def folder_evaluation(model, mvtec):
    return anomalox.evaluate(model, str(mvtec))


def test_evaluate_returns_an_evaluation_with_metrics_labels_scores_and_paths(folder_evaluation, mvtec, model):
    ev = folder_evaluation
    assert isinstance(ev, Evaluation)
    assert list(ev.metrics) == METRIC_KEYS
    assert ev["image_auroc"] == ev.metrics["image_auroc"] == 1.0
    assert ev.as_dict() == ev.metrics and ev.as_dict() is not ev.metrics
    json.dumps(ev.as_dict())  # plain values
    labeled = read_labeled_set(mvtec)
    assert ev.paths == labeled.paths
    np.testing.assert_array_equal(ev.labels, labeled.labels)
    np.testing.assert_array_equal(ev.scores, model.decision_function(labeled.paths))
    assert ev.threshold == model.threshold_


def test_maps_and_masks_are_kept_only_when_asked_for(folder_evaluation, model, mvtec):
    assert folder_evaluation.maps is None and folder_evaluation.masks is None
    kept = anomalox.evaluate(model, str(mvtec), keep_maps=True, keep_masks=True)
    assert kept.metrics == folder_evaluation.metrics
    np.testing.assert_array_equal(kept.maps, model.anomaly_map(kept.paths))
    labeled = read_labeled_set(mvtec)
    assert [m is None for m in kept.masks] == [p is None for p in labeled.mask_paths]
    spot = kept.masks[-1]
    assert (
        spot.dtype == bool and spot.shape == kept.maps[-1].shape and spot[20:34, 24:38].all() and spot.sum() == 14 * 14
    )
    only_maps = anomalox.evaluate(model, str(mvtec), keep_maps=True)
    assert only_maps.maps is not None and only_maps.masks is None
    with pytest.raises(TypeError, match=r"^keep_maps: expected a bool, got 'yes'$"):
        anomalox.evaluate(model, str(mvtec), keep_maps="yes")


def test_a_labelled_list_of_paths_gives_the_same_metrics_as_the_folder(folder_evaluation, model, mvtec):
    labeled = read_labeled_set(mvtec)
    by_list = anomalox.evaluate(model, labeled.paths, labeled.labels, masks=labeled.mask_paths)
    assert by_list.metrics == folder_evaluation.metrics  # the same figures, bit for bit
    assert anomalox.evaluate(model, labeled).metrics == folder_evaluation.metrics
    # masks as arrays, and without masks: the image metrics are the same, pixel metrics skipped
    arrays = [None if p is None else _read(p) >= 128 for p in labeled.mask_paths]
    assert anomalox.evaluate(model, labeled.paths, labeled.labels, masks=arrays).metrics == by_list.metrics
    image_only = anomalox.evaluate(model, labeled.paths, list(labeled.labels))
    assert image_only["aupro"] is None and image_only["pixel_metrics"] == "skipped: no ground-truth masks given"
    assert {k: image_only[k] for k in METRIC_KEYS[:6]} == {k: folder_evaluation[k] for k in METRIC_KEYS[:6]}


def test_labelled_images_as_arrays(model, images, folder_evaluation):
    _, test_good, test_bad = images
    ev = anomalox.evaluate(model, [*test_good, *test_bad], [0] * 4 + [1] * 4)
    assert ev.paths == [None] * 8 and ev["image_auroc"] == 1.0 and ev["n_defective"] == 4


def test_bad_labels_and_masks_are_refused_naming_the_argument(model, mvtec):
    paths = read_labeled_set(mvtec).paths
    with pytest.raises(
        TypeError, match=r"^labels: expected 0/1 labels when X is not an MVTec folder or a LabeledSet, got None"
    ):
        anomalox.evaluate(model, paths)
    with pytest.raises(
        ValueError, match=r"^labels: expected a 1-D sequence of 0 \(normal\) / 1 \(defective\), got \[0, 2\]"
    ):
        anomalox.evaluate(model, paths[:2], [0, 2])
    with pytest.raises(ValueError, match=r"^labels: expected both 0 \(normal\) and 1 \(defective\), got only 0$"):
        anomalox.evaluate(model, paths[:2], [0, 0])
    with pytest.raises(ValueError, match=r"^labels: expected 8 labels \(one per image of X\), got 2$"):
        anomalox.evaluate(model, paths, [0, 1])
    with pytest.raises(ValueError, match=r"^masks: expected 8 entries \(one per label\), got 1$"):
        anomalox.evaluate(model, paths, [0] * 4 + [1] * 4, masks=[None])
    with pytest.raises(ValueError, match=r"^masks: expected None when X is an MVTec folder"):
        anomalox.evaluate(model, str(mvtec), masks=[None] * 8)


def test_evaluation_report_uses_the_kept_maps_and_masks(model, mvtec, tmp_path):
    ev = anomalox.evaluate(model, str(mvtec), keep_maps=True, keep_masks=True)
    text = Path(write_evaluation_report(tmp_path / "r.html", ev, title="t")).read_text(encoding="utf-8")
    assert f"AUROC {ev['image_auroc']:.4f}" in text and "PRO curve" in text and 'alt="ground truth"' in text
    assert f"<td>aupro</td><td>{ev['aupro']:.4f}</td>" in text


def test_write_heatmaps_names_files_by_the_path_below_the_common_folder(tmp_path, rng):
    root = tmp_path / "imgs"
    for sub in ("good", "crack"):
        (root / sub).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (16, 12), np.uint8)).save(root / sub / "000.png")
    paths = [str(root / "good" / "000.png"), str(root / "crack" / "000.png"), None]
    maps = [rng.random((4, 3)).astype(np.float32) for _ in range(3)]
    written = write_heatmaps(tmp_path / "out", paths, maps)
    assert [os.path.basename(f) for f in written] == ["good_000_map.png", "crack_000_map.png", "image_00002_map.png"]
    sizes = [_read(f).shape[1::-1] for f in written]
    assert sizes == [(12, 16), (12, 16), (3, 4)]  # the image's size; the map's own without a path
    with pytest.raises(ValueError, match=r"^maps: expected 3 maps \(one per path\), got 2$"):
        write_heatmaps(tmp_path / "out", paths, maps[:2])


def test_evaluation_reads_as_the_mapping_of_its_metrics(folder_evaluation):
    ev = folder_evaluation
    assert "aupro" in ev and "inspection" not in ev
    assert dict(ev) == ev.metrics == ev.as_dict()
    assert list(ev.keys()) == list(ev.metrics) and len(ev) == len(ev.metrics)
    assert dict(ev.items())["image_auroc"] == ev["image_auroc"]


def test_a_number_in_place_of_labels_points_to_the_keyword_fpr_limit(model, mvtec):
    with pytest.raises(TypeError, match=r"labels: .*got the number 0\.2 \(fpr_limit is keyword-only"):
        anomalox.evaluate(model, str(mvtec), 0.2)


def test_streamed_pixel_metrics_equal_the_in_memory_ones_within_the_stated_bound(model, mvtec):
    from anomalox import metrics
    from anomalox.evaluate import read_mask

    kept = anomalox.evaluate(model, str(mvtec), keep_maps=True, keep_masks=True, chunk_size=model.batch_size)
    masks = np.stack([np.zeros(m.shape, bool) if k is None else k for m, k in zip(kept.maps, kept.masks)])
    assert abs(kept["pixel_auroc"] - metrics.pixel_auroc(masks, kept.maps)) <= 1e-3
    assert abs(kept["aupro"] - metrics.aupro(masks, kept.maps)) <= 1e-3
    assert "streamed in score bins (|error| <= " in kept["pixel_metrics"]
    one_chunk = anomalox.evaluate(model, str(mvtec), chunk_size=100)
    assert one_chunk.metrics == kept.metrics  # the chunking changes nothing
    fpr, pro = kept.pro_curve
    assert fpr[0] == pro[0] == 0 and fpr[-1] == pro[-1] == 1
    assert read_mask(read_labeled_set(mvtec).mask_paths[-1]).sum() == 14 * 14


def test_maps_are_written_to_a_folder_instead_of_kept(model, mvtec, tmp_path, folder_evaluation):
    from anomalox.evaluate import write_maps

    ev = anomalox.evaluate(model, str(mvtec), maps_dir=tmp_path / "maps", chunk_size=model.batch_size)
    assert ev.maps is None and ev.metrics == folder_evaluation.metrics
    labeled = read_labeled_set(mvtec)
    assert [os.path.basename(f) for f in ev.map_files][:2] == ["000000_000.npy", "000001_001.npy"]
    np.testing.assert_array_equal(np.stack([np.load(f) for f in ev.map_files]), model.anomaly_map(labeled.paths))
    written = write_maps(model, labeled.paths, tmp_path / "scored")
    np.testing.assert_array_equal(written.scores, ev.scores)
    assert written.paths == labeled.paths and written.threshold == model.threshold_
    assert [os.path.basename(f) for f in written.files] == [os.path.basename(f) for f in ev.map_files]
    with pytest.raises(ValueError, match=r"^chunk_size: expected an int >= 1, got 0$"):
        write_maps(model, labeled.paths, tmp_path / "x", chunk_size=0)


def test_report_without_kept_maps_inspects_only_the_examples_and_shows_the_false_alarm_rate(
    model, mvtec, tmp_path, folder_evaluation
):
    ev = folder_evaluation
    text = Path(write_evaluation_report(tmp_path / "r.html", ev, detector=model)).read_text(encoding="utf-8")
    assert "PRO curve" in text and 'alt="heatmap"' in text and 'alt="ground truth"' in text
    good = ev.scores[ev.labels == 0]
    rate = float(np.mean(good > model.threshold_))
    assert f"Realised false-alarm rate: {100 * rate:.2f}% of the good images" in text
    plain = Path(write_evaluation_report(tmp_path / "p.html", ev)).read_text(encoding="utf-8")
    assert "PRO curve" in plain and 'alt="heatmap"' not in plain
