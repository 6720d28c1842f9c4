#!/usr/bin/env python3
"""Bounded-memory evaluation: ``evaluate`` and ``write_maps`` on 1,000 synthetic 640 x 640 images.

A temporary MVTec-layout category is generated (``--images`` test images, half defective, 640 x 640
grey textures: smooth random waves plus noise; defects: bright or dark ellipses and scratches,
with their masks; 8 good training images). A ``PatchCore()`` (defaults: EfficientNet-Lite0,
256 x 256 inputs) fitted on the training images is saved, then three child processes each load
it and report their peak RSS (VmHWM):

1. ``evaluate``: ``anomalox.evaluate(model, folder)`` (maps streamed, none kept);
2. ``write_maps``: ``anomalox.evaluate.write_maps(model, test, maps_dir)`` (every 640 x 640 map
   written as .npy, none kept), then the pixel metrics of the written maps streamed through a
   ``PixelMetricsAccumulator`` (32 maps read at a time);
3. ``reference``: the exact in-memory computation: every written map and mask loaded at once and
   ``anomalox.metrics.pixel_auroc`` / ``aupro`` (one sort of all pixels) on them; its peak RSS is
   what holding all maps costs.

The parent checks that 1 and 2 stay below ``--max-rss-gb`` and that their pixel metrics differ
from 3's by at most the bound the accumulator reports (and 1e-3), image metrics exactly.

Usage:
  PYTHONPATH=python .venv/bin/python benches/bench_evaluate_memory.py            # 1,000 images
  PYTHONPATH=python .venv/bin/python benches/bench_evaluate_memory.py --images 64 --no-reference
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

SIZE = 640


def texture(rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    img = np.zeros((SIZE, SIZE), np.float32)
    for _ in range(4):
        fy, fx, phase = rng.uniform(4, 24), rng.uniform(4, 24), rng.uniform(0, 2 * np.pi)
        img += np.sin(2 * np.pi * (fy * y + fx * x) + phase)
    img = 128 + 18 * img + rng.normal(0, 6, img.shape)
    return img


def defect(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros(img.shape, bool)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    for _ in range(rng.integers(1, 3)):
        cy, cx = rng.integers(60, SIZE - 60, 2)
        if rng.random() < 0.5:
            ry, rx = rng.integers(8, 40, 2)
            spot = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
        else:
            angle, length = rng.uniform(0, np.pi), rng.integers(40, 160)
            d = np.abs((y - cy) * np.cos(angle) - (x - cx) * np.sin(angle))
            along = np.abs((y - cy) * np.sin(angle) + (x - cx) * np.cos(angle))
            spot = (d <= 2) & (along <= length / 2)
        img[spot] += rng.choice([-1, 1]) * rng.uniform(40, 80)
        mask |= spot
    return mask


def make_category(root: str, n_test: int, n_train: int, seed: int) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    cat = os.path.join(root, "synthetic")
    for sub in ("train/good", "test/good", "test/defect", "ground_truth/defect"):
        os.makedirs(os.path.join(cat, sub), exist_ok=True)
    save = lambda a, p: Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(p, quality=92)  # noqa: E731
    for i in range(n_train):
        save(texture(rng), os.path.join(cat, "train/good", f"{i:04d}.jpg"))
    for i in range(n_test):
        img = texture(rng)
        if i % 2:
            mask = defect(img, rng)
            save(img, os.path.join(cat, "test/defect", f"{i:04d}.jpg"))
            Image.fromarray(mask.astype(np.uint8) * 255).save(
                os.path.join(cat, "ground_truth/defect", f"{i:04d}_mask.png")
            )
        else:
            save(img, os.path.join(cat, "test/good", f"{i:04d}.jpg"))
    return cat


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(mode: str, model_path: str, cat: str, maps_dir: str) -> dict:
    import anomalox
    from anomalox.data import read_labeled_set
    from anomalox.evaluate import read_mask, write_maps
    from anomalox.metrics import PixelMetricsAccumulator, aupro, pixel_auroc

    model = anomalox.load(model_path)
    labeled = read_labeled_set(cat)
    t0 = time.perf_counter()
    out: dict = {"mode": mode}
    if mode == "evaluate":
        ev = anomalox.evaluate(model, cat)
        out.update(ev.as_dict())
    elif mode == "write_maps":
        written = write_maps(model, labeled.paths, maps_dir)
        acc = PixelMetricsAccumulator()
        for start in range(0, len(written.files), 32):
            files = written.files[start : start + 32]
            maps = np.stack([np.load(f) for f in files])
            masks = np.stack(
                [
                    np.zeros(m.shape, bool) if p is None else read_mask(p)
                    for m, p in zip(maps, labeled.mask_paths[start : start + 32])
                ]
            )
            acc.update(masks, maps)
        out.update(
            pixel_auroc=acc.pixel_auroc(),
            aupro=acc.aupro(0.3),
            bounds=acc.error_bounds(0.3),
            image_auroc=anomalox.metrics.image_auroc(labeled.labels, written.scores),
            n_files=len(written.files),
        )
    else:
        files = sorted(os.path.join(maps_dir, f) for f in os.listdir(maps_dir))
        maps = np.stack([np.load(f) for f in files])
        masks = np.stack(
            [np.zeros(m.shape, bool) if p is None else read_mask(p) for m, p in zip(maps, labeled.mask_paths)]
        )
        out.update(
            pixel_auroc=pixel_auroc(masks, maps), aupro=aupro(masks, maps, fpr_limit=0.3), maps_gb=maps.nbytes / 1e9
        )
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--train", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-rss-gb", type=float, default=2.0)
    ap.add_argument("--no-reference", action="store_true", help="skip the in-memory reference run")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--child", nargs=4, metavar=("MODE", "MODEL", "CAT", "MAPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    import warnings

    import anomalox

    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        cat = make_category(root, args.images, args.train, args.seed)
        print(f"generated {args.images} test images in {time.perf_counter() - t0:.0f} s", flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", anomalox.CalibrationWarning)  # 8 images: no 1% tail
            model = anomalox.PatchCore(random_state=0).fit(os.path.join(cat, "train", "good"))
        model_path = model.save(os.path.join(root, "model.ax"))
        maps_dir = os.path.join(root, "maps")
        results = {}
        for mode in ["evaluate", "write_maps"] + ([] if args.no_reference else ["reference"]):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", mode, model_path, cat, maps_dir],
                capture_output=True,
                text=True,
            )
            if proc.returncode:
                sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(results[mode]), flush=True)
    ok = True
    for mode in ("evaluate", "write_maps"):
        peak = results[mode]["peak_rss_mb"] / 1024
        print(f"{mode}: peak RSS {peak:.2f} GiB ({'ok' if peak < args.max_rss_gb else 'OVER'} < {args.max_rss_gb})")
        ok &= peak < args.max_rss_gb
    if "reference" in results:
        ref = results["reference"]
        bound_auroc, bound_aupro = results["write_maps"]["bounds"]
        for mode in ("evaluate", "write_maps"):
            da = abs(results[mode]["pixel_auroc"] - ref["pixel_auroc"])
            dp = abs(results[mode]["aupro"] - ref["aupro"])
            good = da <= min(bound_auroc + 1e-12, 1e-3) and dp <= min(bound_aupro + 1e-12, 1e-3)
            print(f"{mode}: |pixel AUROC - exact| {da:.2e}, |AUPRO - exact| {dp:.2e} ({'ok' if good else 'OVER'})")
            ok &= good
        ok &= results["evaluate"]["image_auroc"] == results["write_maps"]["image_auroc"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
