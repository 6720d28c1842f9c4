#!/usr/bin/env python3
"""A trained detector with its default parameters on Magnetic Tile: fit time and accuracy.

The first ``--train`` (100) images of ``train/good`` in sorted order, every test image, all
preprocessed once to 256 x 256 [0, 1] tensors (as ``bench_detectors.py`` does; the detector
normalises them itself). ``validation_fraction=0`` (every training image is learned from), the
other parameters the class defaults (``--method stfpm``: 40 epochs, SGD; ``reverse_distillation``:
60 epochs, Adam; ``fre``: 50 epochs, Adam; ``fastflow``: 50 epochs, Adam; ``supersimplenet``: 10 epochs, AdamW). Image AUROC and AUPRO (FPR 0.3) as ``bench_detectors.py`` computes them.

Usage:
  PYTHONPATH=python:tch/python .venv/bin/python benches/bench_trained_defaults.py --method stfpm
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--method", choices=("stfpm", "reverse_distillation", "fre", "fastflow", "supersimplenet"), default="stfpm"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train", type=int, default=100)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import anomalox
    import bench_detectors as bd
    from anomalox import metrics
    from anomalox.preprocess import Preprocessing

    torch.set_num_threads(args.threads)
    listing = argparse.Namespace(data=bd.DEFAULT_DATA, train=args.train, quick=False)
    train, test, labels, masks = bd.list_data(listing)
    to01 = Preprocessing(image_size=256, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    x_train, x_test = to01.transform(train)[0], to01.transform(test)[0]
    cls = {
        "stfpm": anomalox.STFPM,
        "reverse_distillation": anomalox.ReverseDistillation,
        "fre": anomalox.FRE,
        "fastflow": anomalox.FastFlow,
        "supersimplenet": anomalox.SuperSimpleNet,
    }[args.method]
    model = cls(random_state=args.seed, n_threads=args.threads, validation_fraction=0)
    start = time.perf_counter()
    model.fit(x_train)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    found = model.inspect(x_test)
    score_s = time.perf_counter() - start
    truth = bd.read_masks(masks)
    out = {
        "method": args.method,
        "params": {k: v for k, v in model.get_params().items() if isinstance(v, (int, float, str, type(None)))},
        "seed": args.seed,
        "threads": args.threads,
        "n_train": len(train),
        "n_test": len(test),
        "fit_s": round(fit_s, 1),
        "score_s": round(score_s, 1),
        "image_auroc": round(float(metrics.image_auroc(labels, found.scores)), 4),
        "aupro": round(float(metrics.aupro(truth, np.asarray(found.maps), fpr_limit=0.3)), 4),
        "loss_history": [round(v, 4) for v in model.loss_history_],
        "load_average": os.getloadavg(),
    }
    text = json.dumps(out)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
