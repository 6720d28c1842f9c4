#!/usr/bin/env python3
"""Realised false-alarm rate of the calibrated threshold on ELPV: calibration="cv" vs "holdout".

For each seed, ``anomalox.elpv.demo_split(n_train, seed)`` draws the training cells (defect
probability 0); the other good cells (1,408 with 100 training cells) are the test set. Two
PatchCore models with the demo's settings (defaults, ``image_size=224``) and
``contamination=alpha`` are fitted on the same cells, one per calibration rule, and the realised
false-alarm rate is the fraction of the good test cells that ``predict`` flags (``p_value <= alpha``
gives the same figure when the threshold has its guarantee; checked). A ``CalibrationWarning`` (too few hold-out images for alpha) is
recorded, not raised.

Usage:
  python benches/bench_calibration.py --seeds 5           # 100 cells, alpha 0.05, seeds 0..4
  python benches/bench_calibration.py --seeds 1 --n-train 60 --alpha 0.1

Markdown goes to stdout, progress to stderr; --json PATH also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import numpy as np

from anomalox import CalibrationWarning, PatchCore
from anomalox.elpv import demo_split


def realised_rate(calibration: str, train: list[str], good_test: list[str], alpha: float) -> dict:
    model = PatchCore(image_size=224, contamination=alpha, calibration=calibration)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CalibrationWarning)
        model.fit(train)
    fit_s = time.perf_counter() - start
    scores = model.decision_function(good_test)
    flagged = scores > model.threshold_
    from anomalox.detectors.calibration import p_values

    warned = any(issubclass(w.category, CalibrationWarning) for w in caught)
    if not warned:  # with its guarantee, p <= alpha is the same decision as score > threshold_
        assert np.array_equal(p_values(model.calibration_scores_, scores) <= alpha, flagged)
    return {
        "rate": float(flagged.mean()),
        "threshold": model.threshold_,
        "n_calibration": int(model.calibration_scores_.size),
        "warned": warned,
        "fit_seconds": round(fit_s, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="splits 0..seeds-1")
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    rows = []
    for seed in range(args.seeds):
        split = demo_split(args.n_train, seed=seed)
        good_test = [p for p, y in zip(split["test"], split["test_labels"]) if y == 0]
        row = {"seed": seed, "n_good_test": len(good_test)}
        for rule in ("cv", "holdout"):
            row[rule] = realised_rate(rule, split["train"], good_test, args.alpha)
            print(f"seed {seed} {rule}: {row[rule]}", file=sys.stderr, flush=True)
        rows.append(row)
        if args.json:  # after every split, so an interrupted run keeps what it measured
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    print(f"ELPV, {args.n_train} training cells, PatchCore(image_size=224), alpha = {args.alpha}\n")
    print("| split seed | good test cells | cv: rate (n cal) | holdout: rate (n cal) |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        cells = [
            f"{r[k]['rate']:.4f} ({r[k]['n_calibration']}{', warned' if r[k]['warned'] else ''})"
            for k in ("cv", "holdout")
        ]
        print(f"| {r['seed']} | {r['n_good_test']} | {cells[0]} | {cells[1]} |")
    means = {k: float(np.mean([r[k]["rate"] for r in rows])) for k in ("cv", "holdout")}
    print(f"| mean | | {means['cv']:.4f} | {means['holdout']:.4f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "rows": rows, "means": means}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
