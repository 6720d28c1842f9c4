#!/usr/bin/env python3
"""Where STFPM's scoring time goes: cProfile of ``STFPM.inspect`` on Magnetic Tile test images.

An ``STFPM(max_epochs=1)`` is fitted on the first ``--train`` (40) ``train/good`` images (resized
to 256 px with PIL, bilinear) and then scores the first ``--test`` (240) test images in sorted path
order, after a warm-up call on 16; the profile lists the calls with the most own time (the Rust
calls appear as the methods ``features`` of the teacher's ``BackboneModel`` and the student's
``StfpmStudent``, and ``stfpm_map``).

Usage:
  PYTHONPATH=python:tch/python .venv/bin/python benches/profile_stfpm_scoring.py
"""

from __future__ import annotations

import argparse
import cProfile
import glob
import os
import pstats
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(os.path.dirname(ROOT), "shared", "datasets", "magnetic_tile")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--train", type=int, default=40)
    p.add_argument("--test", type=int, default=240)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch
    from PIL import Image

    import anomalox

    torch.set_num_threads(args.threads)

    def load(pattern: str, n: int) -> list[np.ndarray]:
        paths = sorted(glob.glob(os.path.join(args.data, pattern)))[:n]
        return [np.asarray(Image.open(q).convert("RGB").resize((256, 256), Image.BILINEAR)) for q in paths]

    train, test = load("train/good/*", args.train), load("test/*/*", args.test)
    model = anomalox.STFPM(max_epochs=1, validation_fraction=0.0, n_threads=args.threads).fit(train)
    model.inspect(test[:16])
    profile = cProfile.Profile()
    start, cpu = time.perf_counter(), time.process_time()
    profile.enable()
    model.inspect(test)
    profile.disable()
    print(f"inspect of {len(test)} images: {time.perf_counter() - start:.2f} s, {time.process_time() - cpu:.2f} CPU s")
    pstats.Stats(profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
