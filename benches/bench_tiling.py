#!/usr/bin/env python3
"""Tiling (issue 14): squashed default vs tiled at native scale; cost growth; the stitch kernel.

Four parts (``--parts``, default all):

1. ``synthetic``: seeded long strips (``--height`` x ``--width``, default 256 x 2048, RGB uint8):
   a woven texture (two crossed sinusoid "threads" of 7-10 px period at random phase, per-thread
   brightness jitter, Gaussian noise). ``--train`` (30) good training strips, ``--test`` (80) test
   strips, half of them with 1-2 small defects at random positions: a faint blob (ellipse of
   6-12 px, +-15-35 grey levels), a scratch (2-3 px wide, 8-12 px long, any angle, weave flattened
   to about the mean), a patch of missing weave (flat, about the mean, 8-12 px) or a misweave
   (8-12 px of the texture mirrored about its mean). Only the blob shifts the mean brightness.
   ``PatchCore()`` and ``PaDiM()`` (defaults otherwise: EfficientNet-Lite0, bundled weights) with
   the default ``image_size=256`` (the strip squeezed 8x horizontally) vs ``image_size=None,
   tile_size=256, tile_stride=--stride`` (default 256: 8 tiles a strip, at native scale); image
   AUROC, pixel AUROC and AUPRO (``anomalox.evaluate`` with the drawn masks), fit and score time.
1b. ``thin`` (not in the default set): the same strips and settings, but only defects that an 8x
   horizontal squeeze erases: a thin vertical scratch (1-2 px wide, 20-60 px tall,
   +-30-50 grey levels times ``--thin-contrast``), a 10-16 x 16-32 px patch with the vertical threads
   in antiphase, or one vertical thread missing over 20-60 px (the last two preserve every row's
   mean brightness). PatchCore with ``coreset_ratio=--coreset-ratio`` in both settings. Besides
   the AUROCs: mean / std of good and defective image scores, their separation, the share of
   defective strips above every good one, and how often the map's maximum lies on the defect.
2. ``magnetic``: Magnetic Tile (``--data``, MVTec layout; image sides vary from about 100 to
   630 px). ``--mt-train`` (100) training images drawn (seeded) from ``train/good``, ``--mt-test``
   (300) test images drawn (seeded, stratified good/defective; 0 = all 641). ``PatchCore()``
   default (256 x 256, aspect ignored) vs ``PatchCore(image_size=256, keep_aspect_ratio=True,
   tile_size=256, tile_stride=192)``: short side 256 (not native: the smallest images are about
   100 px, below a 256 tile, and the largest would be 2.5x the default scale), long side kept,
   tiles along it. ``anomalox.evaluate`` (pixel metrics at each image's native size).
3. ``scaling``: tiled PatchCore and tiled PaDiM (``image_size=None, tile_size=256``, no overlap)
   on ``--scale-images`` (8) synthetic strips of height 256 and widths ``--widths``, each
   (detector, width) in a fresh child process: fit + score the same images, wall time and peak RSS
   (VmHWM), per megapixel.
4. ``stitch``: ``anomalox.ops.stitch`` vs an ``np.add.at`` reference (float64 sums / counts) on
   ``--stitch-tiles`` (1,000) float32 tiles of 256 x 256 into 10 maps: stride 256 (no overlap,
   maps 256 x 25,600) and stride 128 (half-overlapping, maps 256 x 12,928); ops.stitch median of
   ``--reps`` (3), the reference median of min(reps, 3).

Usage:
  python benches/bench_tiling.py                                 # everything, default sizes
  python benches/bench_tiling.py --parts synthetic --train 20 --test 20   # quick
  python benches/bench_tiling.py --parts scaling --widths 512 1024 2048 4096
  python benches/bench_tiling.py --parts thin --detectors PaDiM PatchCore

Markdown tables go to stdout, progress to stderr; --json PATH also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(os.path.dirname(ROOT), "shared", "datasets", "magnetic_tile")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- synthetic strips


def weave(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A woven texture (float32, about 128 +- 45): crossed threads, per-thread jitter, noise."""
    y = np.arange(height, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    py, px = rng.uniform(7, 10), rng.uniform(7, 10)
    warp = np.sin(2 * np.pi * x / px + rng.uniform(0, 2 * np.pi))  # vertical threads
    weft = np.sin(2 * np.pi * y / py + rng.uniform(0, 2 * np.pi))  # horizontal threads
    # Each thread slightly brighter or darker than its neighbours, as in real fabric.
    col_gain = 1 + 0.15 * rng.standard_normal(int(width / px) + 2)[(x / px).astype(int)]
    row_gain = 1 + 0.15 * rng.standard_normal(int(height / py) + 2)[(y / py).astype(int)]
    img = 128 + 22 * warp * col_gain + 22 * weft * row_gain + 10 * warp * weft
    img += rng.normal(0, 8, (height, width)).astype(np.float32)
    return img.astype(np.float32)


def add_defects(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """1-2 small defects drawn into img (in place); their mask.

    Three of the four kinds change the weave, not the mean brightness, so that averaging 8 columns
    (the squashed default's resize) leaves little of them; the blob also shifts the brightness.
    """
    h, w = img.shape
    mask = np.zeros((h, w), bool)
    for _ in range(rng.integers(1, 3)):
        cy, cx = int(rng.integers(16, h - 16)), int(rng.integers(16, w - 16))
        ys, xs = np.mgrid[cy - 12 : cy + 13, cx - 12 : cx + 13]
        kind = rng.integers(4)
        if kind == 0:  # faint blob, 6-12 px across
            ry, rx = rng.uniform(3, 6, 2)
            spot = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1
            img[ys[spot], xs[spot]] += rng.choice([-1, 1]) * rng.uniform(15, 35)
        elif kind == 1:  # scratch, 2-3 px wide, 8-12 px long, any angle: weave flattened to the mean
            angle, length, half = rng.uniform(0, np.pi), rng.uniform(8, 12), rng.uniform(1, 1.5)
            d = np.abs((ys - cy) * np.cos(angle) - (xs - cx) * np.sin(angle))
            along = np.abs((ys - cy) * np.sin(angle) + (xs - cx) * np.cos(angle))
            spot = (d <= half) & (along <= length / 2)
            img[ys[spot], xs[spot]] = 128 + rng.uniform(-10, 10) + rng.normal(0, 8, int(spot.sum()))
        elif kind == 2:  # missing weave: a flat patch of 8-12 px at about the mean
            sy, sx = rng.integers(8, 13, 2)
            spot = (np.abs(ys - cy) < sy / 2) & (np.abs(xs - cx) < sx / 2)
            img[ys[spot], xs[spot]] = 128 + rng.uniform(-10, 10) + rng.normal(0, 8, int(spot.sum()))
        else:  # misweave: 8-12 px where the texture is mirrored about the mean (threads out of phase)
            sy, sx = rng.integers(8, 13, 2)
            spot = (np.abs(ys - cy) < sy / 2) & (np.abs(xs - cx) < sx / 2)
            img[ys[spot], xs[spot]] = 256 - img[ys[spot], xs[spot]]
        mask[ys[spot], xs[spot]] = True
    return mask


def rgb(img: np.ndarray) -> np.ndarray:
    g = np.clip(img, 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def make_strips(
    n_train: int, n_test: int, height: int, width: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    train = np.stack([rgb(weave(rng, height, width)) for _ in range(n_train)])
    test, labels, masks = [], [], []
    for i in range(n_test):
        img = weave(rng, height, width)
        mask = add_defects(img, rng) if i % 2 else np.zeros((height, width), bool)
        test.append(rgb(img))
        labels.append(i % 2)
        masks.append(mask)
    return train, np.stack(test), np.asarray(labels, np.int64), masks


def fit_and_evaluate(model: Any, train: Any, test: Any, labels: Any = None, masks: Any = None) -> dict:
    import anomalox

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", anomalox.CalibrationWarning)
        model.fit(train)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev = anomalox.evaluate(model, test, labels, masks=masks)
    score_s = time.perf_counter() - t0
    return {
        "image_auroc": float(ev["image_auroc"]),
        "pixel_auroc": float(ev["pixel_auroc"]) if "pixel_auroc" in ev else None,
        "aupro": float(ev["aupro"]) if "aupro" in ev else None,
        "fit_s": round(fit_s, 1),
        "score_s": round(score_s, 1),
    }


def part_synthetic(args: argparse.Namespace) -> list[dict]:
    import anomalox

    t0 = time.perf_counter()
    train, test, labels, masks = make_strips(args.train, args.test, args.height, args.width, args.seed)
    log(
        f"synthetic: {len(train)} train, {len(test)} test strips of {args.height} x {args.width} "
        f"({int(labels.sum())} defective, {sum(int(m.sum()) for m in masks)} defect px) "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    rows = []
    configs = [
        ("squashed: image_size=256", {}),
        (
            f"tiled: image_size=None, tile_size=256, tile_stride={args.stride}",
            {"image_size": None, "tile_size": 256, "tile_stride": args.stride},
        ),
    ]
    for name in args.detectors:
        for label, params in configs:
            model = getattr(anomalox, name)(**params)
            row = {"detector": name, "setting": label, **fit_and_evaluate(model, train, test, labels, masks)}
            log(json.dumps(row))
            rows.append(row)
    print(
        f"\nSynthetic strips: {args.train} good training / {args.test} test ({int(labels.sum())} defective) "
        f"{args.height} x {args.width}, seed {args.seed}\n"
    )
    table(rows, ["detector", "setting", "image_auroc", "pixel_auroc", "aupro", "fit_s", "score_s"])
    return rows


# ----------------------------------------------------------------------------- thin defects


def weave_thin(rng: np.random.Generator, height: int, width: int, defects: bool, contrast: float):
    """The woven texture of ``weave`` (same formula), 1-2 defects that an 8x horizontal squeeze erases.

    Returns (float32 image, bool mask). Defects (``defects=True``), each 1-2 per strip at random:
    a thin vertical scratch (1-2 px wide, 20-60 px tall, +-``contrast`` x 30-50 grey levels, about
    the weave's own peak amplitude: the 8x antialiased squeeze divides it by 4-8), a patch (10-16 px
    wide, 16-32 px tall) where the vertical threads are in antiphase, or a missing vertical thread
    (its sinusoid flattened over one period, 20-60 px tall). The two weave defects change only
    the vertical threads, whose 8-column average is about 0 with or without them: they preserve
    the mean brightness along every row, and the squeeze leaves the horizontal threads intact.
    """
    y = np.arange(height, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    py, px = rng.uniform(7, 10), rng.uniform(7, 10)
    phase = rng.uniform(0, 2 * np.pi)
    warp = np.sin(2 * np.pi * x / px + phase) * np.ones((height, 1), np.float32)
    weft = np.sin(2 * np.pi * y / py + rng.uniform(0, 2 * np.pi))
    col_gain = 1 + 0.15 * rng.standard_normal(int(width / px) + 2)[(x / px).astype(int)]
    row_gain = 1 + 0.15 * rng.standard_normal(int(height / py) + 2)[(y / py).astype(int)]
    noise = rng.normal(0, 8, (height, width)).astype(np.float32)
    mask = np.zeros((height, width), bool)
    extra = np.zeros((height, width), np.float32)
    if defects:
        for _ in range(rng.integers(1, 3)):
            kind = rng.integers(3)
            if kind == 0:  # thin vertical scratch
                tall, wide = int(rng.integers(20, 61)), int(rng.integers(1, 3))
                r0, c0 = int(rng.integers(8, height - tall - 8)), int(rng.integers(8, width - 10))
                extra[r0 : r0 + tall, c0 : c0 + wide] += rng.choice([-1, 1]) * contrast * rng.uniform(30, 50)
                mask[r0 : r0 + tall, c0 : c0 + wide] = True
            elif kind == 1:  # vertical threads in antiphase over a small patch
                tall, wide = int(rng.integers(16, 33)), int(rng.integers(10, 17))
                r0, c0 = int(rng.integers(8, height - tall - 8)), int(rng.integers(8, width - wide - 8))
                warp[r0 : r0 + tall, c0 : c0 + wide] *= -1
                mask[r0 : r0 + tall, c0 : c0 + wide] = True
            else:  # one vertical thread missing: its sinusoid flat over one full period
                tall, wide = int(rng.integers(20, 61)), int(round(px))
                r0, c0 = int(rng.integers(8, height - tall - 8)), int(rng.integers(8, width - wide - 8))
                warp[r0 : r0 + tall, c0 : c0 + wide] = 0
                mask[r0 : r0 + tall, c0 : c0 + wide] = True
    img = 128 + 22 * warp * col_gain + 22 * weft * row_gain + 10 * warp * weft + noise + extra
    return img.astype(np.float32), mask


def make_thin_strips(
    n_train: int, n_test: int, height: int, width: int, seed: int, contrast: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    train = np.stack([rgb(weave_thin(rng, height, width, False, contrast)[0]) for _ in range(n_train)])
    test, labels, masks = [], [], []
    for i in range(n_test):
        img, mask = weave_thin(rng, height, width, bool(i % 2), contrast)
        test.append(rgb(img))
        labels.append(i % 2)
        masks.append(mask)
    return train, np.stack(test), np.asarray(labels, np.int64), masks


def score_spread(ev: Any, masks: list[np.ndarray], tol: int = 8) -> dict:
    """Good / defective image-score statistics and where each defective strip's map peaks.

    ``sep``: (mean defective - mean good) / std good. ``above_good_max``: fraction of defective
    strips scoring above every good strip. ``peak_on_defect``: fraction of defective strips whose
    map maximum, mapped to native coordinates, lies within ``tol`` native px of a defect pixel.
    """
    s, lab = np.asarray(ev.scores, np.float64), np.asarray(ev.labels)
    g, d = s[lab == 0], s[lab == 1]
    hits = []
    for m, mp, y in zip(masks, ev.maps, lab):
        if not y:
            continue
        mh, mw = np.asarray(mp).shape[-2:]
        r, c = np.unravel_index(int(np.argmax(mp)), (mh, mw))
        nr, nc = (r + 0.5) * m.shape[0] / mh, (c + 0.5) * m.shape[1] / mw
        rr, cc = np.nonzero(m)
        hits.append(bool(np.min(np.maximum(np.abs(rr - nr), np.abs(cc - nc))) <= tol))
    return {
        "good_mean": float(g.mean()),
        "good_std": float(g.std(ddof=1)),
        "defect_mean": float(d.mean()),
        "defect_std": float(d.std(ddof=1)),
        "good_cv": float(g.std(ddof=1) / g.mean()),
        "sep": float((d.mean() - g.mean()) / g.std(ddof=1)),
        "above_good_max": float((d > g.max()).mean()),
        "peak_on_defect": float(np.mean(hits)),
    }


def part_thin(args: argparse.Namespace) -> list[dict]:
    import anomalox

    t0 = time.perf_counter()
    train, test, labels, masks = make_thin_strips(
        args.train, args.test, args.height, args.width, args.seed, args.thin_contrast
    )
    log(
        f"thin: {len(train)} train, {len(test)} test strips of {args.height} x {args.width} "
        f"({int(labels.sum())} defective, {sum(int(m.sum()) for m in masks)} defect px) "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    configs = [
        ("squashed: image_size=256", {}),
        (
            f"tiled: image_size=None, tile_size=256, tile_stride={args.stride}",
            {"image_size": None, "tile_size": 256, "tile_stride": args.stride},
        ),
    ]
    rows = []
    for name in args.detectors:
        for label, params in configs:
            if name == "PatchCore":
                params = {**params, "coreset_ratio": args.coreset_ratio}
            model = getattr(anomalox, name)(**params)
            t1 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", anomalox.CalibrationWarning)
                model.fit(train)
            fit_s = time.perf_counter() - t1
            t1 = time.perf_counter()
            ev = anomalox.evaluate(model, test, labels, masks=masks, keep_maps=True)
            score_s = time.perf_counter() - t1
            row = {
                "detector": name,
                "setting": label,
                "image_auroc": float(ev["image_auroc"]),
                "pixel_auroc": None if ev["pixel_auroc"] is None else float(ev["pixel_auroc"]),
                "aupro": None if ev["aupro"] is None else float(ev["aupro"]),
                "fit_s": round(fit_s, 1),
                "score_s": round(score_s, 1),
                **score_spread(ev, masks),
            }
            del ev
            log(json.dumps(row))
            rows.append(row)
    print(
        f"\nThin / weave-only defects: {args.train} good training / {args.test} test ({int(labels.sum())} "
        f"defective) {args.height} x {args.width}, seed {args.seed}, contrast x{args.thin_contrast}, "
        f"PatchCore coreset_ratio {args.coreset_ratio}\n"
    )
    table(rows, ["detector", "setting", "image_auroc", "pixel_auroc", "aupro", "fit_s", "score_s"])
    print()
    table(
        rows,
        [
            "detector",
            "setting",
            "good_mean",
            "good_std",
            "defect_mean",
            "defect_std",
            "good_cv",
            "sep",
            "above_good_max",
            "peak_on_defect",
        ],
    )
    return rows


# ----------------------------------------------------------------------------- Magnetic Tile


def list_category(root: str, n_train: int, n_test: int, seed: int) -> tuple[list[str], list[str], np.ndarray, list]:
    rng = np.random.default_rng(seed)
    tdir = os.path.join(root, "train", "good")
    train = sorted(os.path.join(tdir, f) for f in os.listdir(tdir) if f.endswith(".png"))
    if 0 < n_train < len(train):
        train = [train[i] for i in sorted(rng.choice(len(train), n_train, replace=False))]
    good, bad = [], []
    for defect in sorted(os.listdir(os.path.join(root, "test"))):
        ddir = os.path.join(root, "test", defect)
        for f in sorted(os.listdir(ddir)):
            if not f.endswith(".png"):
                continue
            stem = os.path.splitext(f)[0]
            mask = None if defect == "good" else os.path.join(root, "ground_truth", defect, stem + "_mask.png")
            (good if defect == "good" else bad).append((os.path.join(ddir, f), mask))
    if n_test:  # stratified: the good / defective proportion of the whole test set
        n_good = round(n_test * len(good) / (len(good) + len(bad)))
        good = [good[i] for i in sorted(rng.choice(len(good), n_good, replace=False))]
        bad = [bad[i] for i in sorted(rng.choice(len(bad), n_test - n_good, replace=False))]
    items = good + bad
    labels = np.asarray([0] * len(good) + [1] * len(bad), np.int64)
    return train, [p for p, _ in items], labels, [m for _, m in items]


def part_magnetic(args: argparse.Namespace) -> list[dict]:
    import anomalox

    train, test, labels, masks = list_category(args.data, args.mt_train, args.mt_test, args.seed)
    log(f"magnetic: {len(train)} train, {len(test)} test ({int(labels.sum())} defective) from {args.data}")
    configs = [
        ("default: image_size=256 (square)", {}),
        (
            "keep_aspect_ratio=True (short side 256), tile_size=256, tile_stride=192",
            {"keep_aspect_ratio": True, "tile_size": 256, "tile_stride": 192},
        ),
    ]
    rows = []
    for label, params in configs:
        model = anomalox.PatchCore(**params)
        row = {"detector": "PatchCore", "setting": label, **fit_and_evaluate(model, train, test, labels, masks)}
        log(json.dumps(row))
        rows.append(row)
    print(
        f"\nMagnetic Tile: {len(train)} training images (seeded draw of train/good), {len(test)} test images "
        f"({int(labels.sum())} defective)\n"
    )
    table(rows, ["detector", "setting", "image_auroc", "pixel_auroc", "aupro", "fit_s", "score_s"])
    return rows


# ----------------------------------------------------------------------------- scaling


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def scaling_child(name: str, width: int, n_images: int, height: int, seed: int) -> dict:
    import anomalox

    rng = np.random.default_rng(seed)
    images = np.stack([rgb(weave(rng, height, width)) for _ in range(n_images)])
    base_mb = peak_rss_mb()
    model = getattr(anomalox, name)(image_size=None, tile_size=256)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", anomalox.CalibrationWarning)
        model.fit(images)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.decision_function(images)
    score_s = time.perf_counter() - t0
    out = {"detector": name, "width": width, "fit_s": fit_s, "score_s": score_s, "peak_rss_mb": peak_rss_mb()}
    out["rss_before_fit_mb"] = base_mb
    if name == "PatchCore":
        out["bank"] = int(model.memory_bank_.shape[0])
    return out


def part_scaling(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name in args.detectors:
        for width in args.widths:
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--child",
                name,
                str(width),
                str(args.scale_images),
                str(args.height),
                str(args.seed),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                log(f"{name} width {width} failed:\n{proc.stderr[-3000:]}")
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            mpix = args.scale_images * args.height * width / 1e6
            row["megapixels"] = mpix
            row["s_per_mpix"] = (row["fit_s"] + row["score_s"]) / mpix
            log(json.dumps(row))
            rows.append(row)
    print(
        f"\nScaling: tiled (image_size=None, tile_size=256, no overlap), {args.scale_images} images of "
        f"{args.height} x width, fit then score the same images; one child process per row\n"
    )
    print(
        "| detector | width | tiles / image | megapixels | fit s | score s | s / Mpx | peak RSS MB "
        "| time ratio to previous | RSS ratio to previous | PatchCore bank |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    prev: dict = {}
    for r in rows:
        total = r["fit_s"] + r["score_s"]
        p = prev.get(r["detector"])
        tr = f"{total / p[0]:.2f}" if p else ""
        rr = f"{r['peak_rss_mb'] / p[1]:.2f}" if p else ""
        prev[r["detector"]] = (total, r["peak_rss_mb"])
        print(
            f"| {r['detector']} | {r['width']} | {-(-r['width'] // 256)} | {r['megapixels']:.2f} | "
            f"{r['fit_s']:.1f} | {r['score_s']:.1f} | {r['s_per_mpix']:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{tr} | {rr} | {r.get('bank', '')} |"
        )
    return rows


# ----------------------------------------------------------------------------- stitch kernel


def stitch_reference(tiles: np.ndarray, offsets: np.ndarray, image_index: np.ndarray, n: int, h: int, w: int):
    th, tw = tiles.shape[1:]
    sums = np.zeros((n, h, w), np.float64)
    counts = np.zeros((n, h, w), np.int64)
    rr, cc = np.mgrid[0:th, 0:tw]
    for t in range(len(tiles)):
        r, c = offsets[t]
        idx = (image_index[t], rr + r, cc + c)
        np.add.at(sums, idx, tiles[t])
        np.add.at(counts, idx, 1)
    return (sums / counts).astype(np.float32)


def part_stitch(args: argparse.Namespace) -> list[dict]:
    from anomalox import ops

    rows = []
    n_images = 10
    for stride in (256, 128):
        # The image width giving about --stitch-tiles tiles in all.
        per_image = args.stitch_tiles // n_images
        w = 256 + (per_image - 1) * stride
        offs = ops.tile_offsets(256, w, 256, stride)
        offsets = np.concatenate([offs] * n_images)
        image_index = np.repeat(np.arange(n_images), len(offs))
        tiles = np.random.default_rng(args.seed).random((len(offsets), 256, 256), dtype=np.float32)
        times: dict[str, list[float]] = {"stitch": [], "np.add.at": []}
        out = ref = None
        for _ in range(args.reps):
            t0 = time.perf_counter()
            out = ops.stitch(tiles, offsets, (256, w), image_index=image_index)
            times["stitch"].append(time.perf_counter() - t0)
        for _ in range(max(1, min(args.reps, 3))):
            t0 = time.perf_counter()
            ref = stitch_reference(tiles, offsets, image_index, n_images, 256, w)
            times["np.add.at"].append(time.perf_counter() - t0)
        assert out is not None and ref is not None
        err = float(np.abs(out - ref).max())
        row = {
            "tiles": len(offsets),
            "stride": stride,
            "output": f"{n_images} x 256 x {w}",
            "stitch_s": float(np.median(times["stitch"])),
            "add_at_s": float(np.median(times["np.add.at"])),
            "max_abs_diff": err,
        }
        row["speedup"] = row["add_at_s"] / row["stitch_s"]
        log(json.dumps(row))
        rows.append(row)
    print(
        f"\nStitch: {args.stitch_tiles} float32 tiles of 256 x 256; ops.stitch median of {args.reps}, "
        f"np.add.at median of {max(1, min(args.reps, 3))}\n"
    )
    print("| tiles | stride | output | ops.stitch | np.add.at reference | speedup | max abs diff |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['tiles']} | {r['stride']} | {r['output']} | {r['stitch_s'] * 1e3:.0f} ms | "
            f"{r['add_at_s'] * 1e3:.0f} ms | {r['speedup']:.0f}x | {r['max_abs_diff']:.1e} |"
        )
    return rows


# ----------------------------------------------------------------------------- main


def fmt(v: Any, col: str) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.1f}" if col.endswith("_s") else f"{v:.4f}"
    return str(v)


def table(rows: list[dict], cols: list[str]) -> None:
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" if c in ("detector", "setting") else "---:" for c in cols) + "|")
    for r in rows:
        print("| " + " | ".join(fmt(r.get(c), c) for c in cols) + " |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--parts",
        nargs="+",
        default=["synthetic", "magnetic", "scaling", "stitch"],
        choices=["synthetic", "thin", "magnetic", "scaling", "stitch"],
    )
    ap.add_argument("--detectors", nargs="+", default=["PatchCore", "PaDiM"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--train", type=int, default=30, help="synthetic good training strips")
    ap.add_argument("--test", type=int, default=80, help="synthetic test strips, half defective")
    ap.add_argument("--stride", type=int, default=256, help="synthetic tile stride")
    ap.add_argument("--thin-contrast", type=float, default=1.0, help="thin: scratch contrast factor")
    ap.add_argument("--coreset-ratio", type=float, default=0.1, help="thin: PatchCore coreset_ratio (both settings)")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--mt-train", type=int, default=100, help="Magnetic Tile training images (0 = all)")
    ap.add_argument("--mt-test", type=int, default=300, help="Magnetic Tile test images (0 = all)")
    ap.add_argument("--widths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--scale-images", type=int, default=8)
    ap.add_argument("--stitch-tiles", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        name, width, n, height, seed = args.child
        print(json.dumps(scaling_child(name, int(width), int(n), int(height), int(seed))))
        return 0
    results: dict = {"args": vars(args)}
    parts = {
        "synthetic": part_synthetic,
        "thin": part_thin,
        "magnetic": part_magnetic,
        "scaling": part_scaling,
        "stitch": part_stitch,
    }
    for part in args.parts:
        t0 = time.perf_counter()
        results[part] = parts[part](args)
        log(f"{part}: {time.perf_counter() - t0:.0f} s")
        if args.json:  # after every part, so an interrupted run keeps what it measured
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
