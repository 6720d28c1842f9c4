#!/usr/bin/env python3
"""Pixel-metric benchmark: anomalox.metrics vs anomalib 2.7.0 on a test set of anomaly maps.

  aupro        anomalox.metrics.aupro(masks, maps, fpr_limit=0.3) vs anomalib.metrics.AUPRO
               (fields anomaly_map/gt_mask, fpr_limit=0.3): update + compute. The values must
               agree within 1e-3 (both follow the MVTec AD definition and divide the area by
               the limit; anomalib accumulates in float32).
  pixel_auroc  anomalox.metrics.pixel_auroc vs anomalib.metrics.AUROC (torchmetrics' exact
               BinaryROC), values within 1e-6.

Data: N maps of H×W (default 100 × 224²) that look like real anomaly maps: smooth noise
(Gaussian-filtered) plus a raised bump on each defect, and masks of 1-3 random blobs on
two images out of three. Both libraries get the same CPU torch tensors (float32 maps, bool
masks); conversions are inside the timed call. Calls are interleaved (anomalox, anomalib,
anomalox, ...) at one thread count; medians and min-max over the pairs are reported.

Usage (inside the bench venv, see benches/setup_env.sh):
  python benches/bench_metrics.py                # 100 × 224², 5 pairs
  python benches/bench_metrics.py --quick        # 20 × 224², 3 pairs
  python benches/bench_metrics.py --n 100 --size 224 --pairs 7 --threads 2 --json out.json

Markdown goes to stdout, progress to stderr. Exit status 1 if the values disagree.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import types
import warnings

import numpy as np

warnings.filterwarnings("ignore")


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def make_test_set(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(maps float32 (n, size, size), masks bool (n, size, size))."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), dtype=bool)
    maps = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):
        if i % 3 != 2:
            for _ in range(rng.integers(1, 4)):
                cy, cx = rng.uniform(0, size, 2)
                ry, rx = rng.uniform(size / 40, size / 8, 2)
                masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=4)
        bump = ndimage.gaussian_filter(masks[i].astype(np.float64), sigma=3)
        maps[i] = (noise / noise.std() + 2.5 * bump + 0.05 * rng.standard_normal((size, size))).astype(np.float32)
    return maps, masks


def summarize(ts: list[float]) -> dict:
    return {"n": len(ts), "median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "times_s": ts}


def fmt_s(x: float) -> str:
    return f"{x:.2f} s" if x >= 1 else f"{x * 1e3:.1f} ms"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="number of maps (default 100)")
    ap.add_argument("--size", type=int, default=224, help="map side (default 224)")
    ap.add_argument("--pairs", type=int, default=5, help="interleaved pairs (default 5)")
    ap.add_argument("--threads", type=int, default=None, help="threads for both (default: torch's)")
    ap.add_argument("--fpr-limit", type=float, default=0.3)
    ap.add_argument("--only", default="aupro,pixel_auroc", help="comma list of: aupro, pixel_auroc")
    ap.add_argument("--quick", action="store_true", help="20 maps, 3 pairs")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    args = ap.parse_args()
    if args.quick:
        args.n, args.pairs = 20, 3

    import torch
    from anomalib.metrics import AUPRO, AUROC

    import anomalox
    from anomalox import metrics

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    log(f"data: {args.n} maps of {args.size}x{args.size}, {threads} threads")
    maps_np, masks_np = make_test_set(args.n, args.size)
    maps, masks = torch.from_numpy(maps_np), torch.from_numpy(masks_np)
    batch = types.SimpleNamespace(anomaly_map=maps, gt_mask=masks)

    def anomalib_metric(cls, **kw):
        def run() -> float:
            m = cls(fields=["anomaly_map", "gt_mask"], **kw)
            m.update(batch)
            return float(m.compute())

        return run

    cases = {
        "aupro": (
            lambda: metrics.aupro(masks, maps, fpr_limit=args.fpr_limit, n_threads=threads),
            anomalib_metric(AUPRO, fpr_limit=args.fpr_limit),
            1e-3,
        ),
        "pixel_auroc": (
            lambda: metrics.pixel_auroc(masks, maps, n_threads=threads),
            anomalib_metric(AUROC),
            1e-6,
        ),
    }
    selected = [c for c in args.only.split(",") if c]
    unknown = set(selected) - set(cases)
    if unknown:
        ap.error(f"--only: unknown {sorted(unknown)}; choose from {sorted(cases)}")

    out = {
        "config": vars(args) | {"threads": threads},
        "env": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "anomalib": __import__("anomalib").__version__,
            "anomalox": anomalox.__version__,
            "loadavg_start": os.getloadavg(),
        },
        "results": {},
    }
    ok = True
    rows = []
    for name in selected:
        ours, theirs, tol = cases[name]
        log(f"{name}: warm-up")
        ours(), theirs()
        times = {"anomalox": [], "anomalib": []}
        values = {"anomalox": [], "anomalib": []}
        for i in range(args.pairs):
            for who, fn in (("anomalox", ours), ("anomalib", theirs)):
                gc.collect()
                t0 = time.perf_counter()
                v = fn()
                dt = time.perf_counter() - t0
                times[who].append(dt)
                values[who].append(v)
                log(f"  {name} {who} [{i}] {dt:.4f}s value {v:.6f}")
        a, b = values["anomalox"][0], values["anomalib"][0]
        agree = abs(a - b) <= tol
        ok &= agree
        sa, sb = summarize(times["anomalox"]), summarize(times["anomalib"])
        speedup = sb["median_s"] / sa["median_s"]
        out["results"][name] = {
            "anomalox": sa | {"value": a},
            "anomalib": sb | {"value": b},
            "abs_diff": abs(a - b),
            "tolerance": tol,
            "agree": agree,
            "speedup_median": speedup,
        }
        rows.append(
            f"| {name} | {fmt_s(sa['median_s'])} ({fmt_s(sa['min_s'])}–{fmt_s(sa['max_s'])}) "
            f"| {fmt_s(sb['median_s'])} ({fmt_s(sb['min_s'])}–{fmt_s(sb['max_s'])}) "
            f"| {speedup:.1f}× | {a:.6f} | {b:.6f} | {abs(a - b):.1e} {'✓' if agree else '✗'} |"
        )
    out["env"]["loadavg_end"] = os.getloadavg()

    print(f"### Pixel metrics: {args.n} maps of {args.size}×{args.size}, {threads} threads, {args.pairs} pairs\n")
    print(
        "| metric | anomalox median (min–max) | anomalib 2.7 median (min–max) | speedup | anomalox | anomalib | |diff| |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nload average start {out['env']['loadavg_start']}, end {out['env']['loadavg_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    if not ok:
        log("VALUES DISAGREE beyond tolerance")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
