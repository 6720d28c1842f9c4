"""The HTML report (anomalox.report) and the ELPV demo split (anomalox.elpv)."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalox import elpv
from anomalox.report import overlay, write_report


def _imgs(doc: str) -> list[str]:
    return re.findall(r"<img\b[^>]*>", doc)


def _check_self_contained(doc: str) -> None:
    for attr, value in re.findall(r'\b(src|href)\s*=\s*"([^"]*)"', doc):
        assert "http" not in value, f"external {attr}: {value[:80]}"
        assert value.startswith(("data:image/png;base64,", "#")), f"{attr}={value[:80]}"
    assert "<script" not in doc and "<link" not in doc and "@import" not in doc and "url(http" not in doc
    for tag in _imgs(doc):  # every image decodes as a PNG
        data = re.search(r'src="data:image/png;base64,([^"]+)"', tag).group(1)
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            assert im.format == "PNG" and min(im.size) > 0


def _metrics_rows(doc: str) -> dict[str, str]:
    table = re.search(r'<table id="metrics">(.*?)</table>', doc, re.S).group(1)
    return dict(re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td></tr>", table))


def _synthetic(rng, n=20, mixed_sizes=False):
    labels = np.array([0] * (n // 2) + [1] * (n - n // 2))
    scores = rng.normal(size=n) + 2.0 * labels
    sizes = [(40 + 8 * (i % 3), 56 + 4 * (i % 2)) if mixed_sizes else (48, 64) for i in range(n)]
    images, maps, masks = [], [], []
    for i, (h, w) in enumerate(sizes):
        kind = i % 4
        if kind == 0:
            images.append(rng.integers(0, 65536, (h, w), dtype=np.uint16))  # 16-bit gray
        elif kind == 1:
            images.append(rng.integers(0, 256, (h, w, 4), dtype=np.uint8))  # RGBA
        elif kind == 2:
            images.append(rng.random((h, w, 3)).astype(np.float32))  # float RGB in [0, 1]
        else:
            images.append(rng.integers(0, 256, (h, w), dtype=np.uint8))  # 8-bit gray
        mh, mw = (h // 2, w // 2) if mixed_sizes else (h, w)  # maps at a lower resolution
        maps.append(rng.random((mh, mw)).astype(np.float32) + labels[i])
        mask = np.zeros((h, w), bool)
        if labels[i]:
            mask[5:15, 10:30] = True
        masks.append(mask if labels[i] else None)
    return labels, scores, images, maps, masks


@pytest.mark.parametrize("mixed_sizes", [False, True])
def test_report_full(tmp_path, rng, mixed_sizes):
    labels, scores, images, maps, masks = _synthetic(rng, mixed_sizes=mixed_sizes)
    if not mixed_sizes:
        maps = np.stack(maps)  # (N, H, W) array form
    metrics = {"image_auroc": 0.93124, "pixel_auroc": None, "aupro": np.float32(0.5)}
    out = write_report(
        tmp_path / "sub" / "r.html",
        paths=[f"img{i}.png" for i in range(20)],
        scores=scores,
        threshold=1.0,
        gt_labels=labels,
        maps=maps,
        gt_masks=masks,
        metrics=metrics,
        images=images,
        max_examples=4,
    )
    assert out == str(tmp_path / "sub" / "r.html")
    doc = Path(out).read_text(encoding="utf-8")
    assert _metrics_rows(doc) == {"image_auroc": "0.9312", "pixel_auroc": "skipped", "aupro": "0.5000"}
    # 4 false alarms + 4 misses, each input / heatmap / ground truth.
    assert len(_imgs(doc)) == 2 * 4 * 3
    assert doc.count('alt="ground truth"') == 8 and doc.count('alt="heatmap"') == 8
    assert "ROC curve" in doc and "PRO curve" in doc and "Score histogram" in doc
    assert ("resampled" in doc) == mixed_sizes
    _check_self_contained(doc)


def test_report_without_labels_or_masks(tmp_path, rng):
    _, scores, images, maps, _ = _synthetic(rng, n=6, mixed_sizes=True)
    out = write_report(
        tmp_path / "r.html", paths=[None] * 6, scores=scores, threshold=0.5, maps=maps, images=images, max_examples=8
    )
    doc = Path(out).read_text(encoding="utf-8")
    assert len(_imgs(doc)) == 6 * 2  # all 6 images (fewer than max_examples), input + heatmap
    assert "ground truth" not in doc and "ROC curve" not in doc and "PRO curve" not in doc
    assert "no metrics given" in doc and 'id="metrics"' in doc
    # Highest-scored first.
    shown = [int(k) for k in re.findall(r'<div class="cap">#(\d+)', doc)]
    assert shown == list(np.argsort(-scores))
    _check_self_contained(doc)


def test_report_reads_paths(tmp_path, rng):
    """Files on disk: 16-bit PNG, RGBA PNG, palette PNG, 8-bit JPEG; no maps."""
    arrays = [
        rng.integers(0, 65536, (30, 40), dtype=np.uint16),
        rng.integers(0, 256, (30, 40, 4), dtype=np.uint8),
        rng.integers(0, 256, (30, 40, 3), dtype=np.uint8),
        rng.integers(0, 256, (30, 40), dtype=np.uint8),
    ]
    files = []
    for i, a in enumerate(arrays):
        p = tmp_path / (f"x{i}.jpg" if i == 3 else f"x{i}.png")
        im = Image.fromarray(a)
        (im.convert("P") if i == 2 else im).save(p)
        files.append(str(p))
    out = write_report(
        tmp_path / "r.html",
        paths=files,
        scores=[0.1, 0.9, 0.2, 0.8],
        threshold=0.5,
        gt_labels=[0, 1, 0, 1],
        metrics={"n": 4},
    )
    doc = Path(out).read_text(encoding="utf-8")
    assert len(_imgs(doc)) == 4 and _metrics_rows(doc) == {"n": "4"}
    assert "x1.png" in doc and "x3.jpg" in doc
    _check_self_contained(doc)


def test_report_roc_auroc_is_metrics_image_auroc_with_ties(tmp_path):
    from anomalox.metrics import image_auroc

    labels = [0, 0, 1, 1, 0, 1, 0, 1]
    scores = [0.1, 0.5, 0.5, 0.9, 0.3, 0.3, 0.7, 0.2]  # ties across classes count one half
    doc = Path(
        write_report(tmp_path / "r.html", paths=[None] * 8, scores=scores, threshold=0.5, gt_labels=labels)
    ).read_text(encoding="utf-8")
    assert f"AUROC {image_auroc(labels, np.float32(scores)):.4f}" in doc


def test_report_validates_lengths(tmp_path):
    with pytest.raises(ValueError, match="gt_labels"):
        write_report(tmp_path / "r.html", paths=[None] * 3, scores=[1.0, 2.0, 3.0], threshold=1.0, gt_labels=[0, 1])


def test_overlay_and_16bit_scaling(rng):
    img16 = np.array([[0, 65535], [32768, 257]], np.uint16)
    same = overlay(img16, np.zeros((2, 2)), 0.0, 1.0, alpha=0.0)  # alpha 0: the image itself
    assert same.dtype == np.uint8 and same.shape == (2, 2, 3)
    assert same[..., 0].tolist() == [[0, 255], [128, 1]]  # scaled by 1/257, not clipped at 255
    hot = overlay(np.zeros((8, 6), np.uint8), np.full((4, 3), 5.0), 0.0, 1.0, alpha=1.0)  # map resized
    assert hot.shape == (8, 6, 3) and (hot == hot[0, 0]).all() and hot[0, 0, 0] > 100 and hot[0, 0, 2] == 0
    cold = overlay(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4)), 0.0, 1.0, alpha=1.0)
    assert cold[0, 0, 2] > 100 and cold[0, 0, 0] == 0


# --- real browser -----------------------------------------------------------------------------


def _debian_chromium() -> tuple[str, str]:
    """Paths of Debian's chromium and chromedriver, installing them with apt-get when missing."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if not shutil.which("apt-get") or os.geteuid() != 0:
            pytest.skip("chromium/chromedriver missing and apt-get (as root) is unavailable")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = "apt-get update -qq && apt-get install -y -qq chromium chromium-driver"
        done = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            pytest.skip(f"apt-get could not install chromium: {done.stderr[-400:]}")
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("apt-get ran, but chromium or chromedriver is still not on PATH")
    return browser, driver


@pytest.mark.slow
def test_report_renders_in_chromium(tmp_path, rng):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    browser, driver_path = _debian_chromium()
    labels, scores, images, maps, masks = _synthetic(rng, mixed_sizes=True)
    out = write_report(
        tmp_path / "report.html",
        paths=[f"cell{i}.png" for i in range(20)],
        scores=scores,
        threshold=1.0,
        gt_labels=labels,
        maps=maps,
        gt_masks=masks,
        images=images,
        metrics={"image_auroc": 0.9, "aupro": None},
    )
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser  # with the driver path below, selenium-manager is never run
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=driver_path))
    try:
        driver.get("file://" + os.path.abspath(out))
        assert driver.find_element(By.ID, "metrics").is_displayed()
        imgs = driver.find_elements(By.TAG_NAME, "img")
        assert len(imgs) == 2 * 8 * 3
        widths = driver.execute_script("return Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0);")
        assert all(w > 0 for w in widths), widths
        assert len(driver.find_elements(By.TAG_NAME, "svg")) >= 3
        assert driver.save_screenshot(str(tmp_path / "report.png"))
    finally:
        driver.quit()
    assert os.path.getsize(tmp_path / "report.png") > 1000


# --- ELPV -------------------------------------------------------------------------------------


def test_elpv_load():
    pytest.importorskip("elpv_dataset")
    paths, probs, types = elpv.load_elpv()
    assert len(paths) == len(types) == probs.size == 2624
    assert set(np.round(probs, 3)) == {0.0, 0.333, 0.667, 1.0} and set(types) == {"mono", "poly"}
    assert [(probs == v).sum() for v in (0.0, 1.0)] == [1508, 715]
    assert os.path.isfile(paths[0]) and os.path.isfile(paths[-1])


def test_elpv_demo_split():
    pytest.importorskip("elpv_dataset")
    paths, probs, _ = elpv.load_elpv()
    prob = dict(zip(paths, probs))
    split = elpv.demo_split(200, seed=3)
    train, test, y = split["train"], split["test"], split["test_labels"]
    assert len(train) == 200 and len(test) == y.size == (1508 - 200) + 715
    assert int((y == 0).sum()) == 1308 and int((y == 1).sum()) == 715
    assert not set(train) & set(test) and len(set(test)) == len(test)
    assert all(prob[p] == 0.0 for p in train)
    assert all(prob[p] == float(label) for p, label in zip(test, y))  # 1/3 and 2/3 left out
    again = elpv.demo_split(200, seed=3)
    assert again["train"] == train and again["test"] == test and np.array_equal(again["test_labels"], y)
    assert elpv.demo_split(200, seed=4)["train"] != train
    mono = elpv.demo_split(100, cell_type="mono")
    assert len(mono["test"]) == 488 + 313
    with pytest.raises(ValueError):
        elpv.demo_split(1508)


def test_evaluation_report_states_how_images_were_scored(tmp_path, rng):
    """The summary names the detector's resizing and tiling, as fitted (set_params after fit does not change it)."""
    import anomalox
    from anomalox.report import describe_setup, write_evaluation_report

    train = (rng.random((4, 40, 100, 3)) * 255).astype(np.uint8)
    test = (rng.random((4, 40, 100, 3)) * 255).astype(np.uint8)
    tiled = anomalox.PatchCore(image_size=None, tile_size=32, tile_stride=24, validation_fraction=0.0).fit(train)
    result = anomalox.evaluate(tiled, test, labels=[0, 0, 1, 1])
    tiled.set_params(tile_size=None, tile_stride=None)
    doc = Path(write_evaluation_report(tmp_path / "r.html", result, detector=tiled)).read_text(encoding="utf-8")
    setup = re.search(r'<span id="setup">([^<]*)</span>', doc)
    assert setup is not None
    assert setup.group(1) == (
        "PatchCore (efficientnet_lite0): images at their own size, cut into 32-px tiles every 24 px whose maps are "
        "stitched (overlaps averaged); image score = the maximum of the stitched map."
    )
    squashed = anomalox.PaDiM(image_size=(24, 48), n_features=10, validation_fraction=0.0).fit(train)
    assert describe_setup(squashed) == "PaDiM (efficientnet_lite0): images resized to 24 x 48 (aspect ratio ignored)."
    short = anomalox.DFM(image_size=32, keep_aspect_ratio=True, validation_fraction=0.0, pooling_kernel_size=1)
    assert "short side of 32 px (aspect ratio kept)" in describe_setup(short.fit(train))
