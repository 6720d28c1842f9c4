#!/usr/bin/env python3
"""One FastFlow training step on cached taps: anomalox's flows (Rust / tch) vs anomalib's in torch eager.

Random features shaped like the Lite0 taps ``_blocks.2`` / ``_blocks.4`` / ``_blocks.10`` at 256 px
((24, 64, 64), (40, 32, 32), (112, 16, 16)), a batch of 8: anomalox's ``HeadModel.fastflow`` (layer
norms + 8 coupling blocks per tap, Adam lr 1e-3, weight decay 1e-5) against anomalib 2.7.0's own
pieces, ``nn.LayerNorm`` + ``create_fast_flow_block`` + ``FastflowLoss`` with the same optimiser. No
backbone on either side: this is the part of a FastFlow step that both run. Two warm-up steps each,
then ``--pairs`` interleaved pairs; median and minimum seconds per step.

Usage:
  PYTHONPATH=python:tch/python .venv-bench/bin/python benches/profile_fastflow_step.py [--threads 2] [--pairs 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pairs", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import anomalox_tch
    from anomalib.models.image.fastflow.loss import FastflowLoss
    from anomalib.models.image.fastflow.torch_model import create_fast_flow_block

    shapes = [(24, 64, 64), (40, 32, 32), (112, 16, 16)]
    b = 8
    feats = [torch.randn(b, *s) for s in shapes]
    head = anomalox_tch._tch.HeadModel.fastflow(
        "efficientnet_lite0", ["a", "b", "c"], [s[0] for s in shapes], [s[1:] for s in shapes],
        8, 1.0, False, 2.0, 0, None, args.threads,
    )  # fmt: skip
    head.configure("adam", 1e-3, 1e-5, 0.9, 0.0, False, (0.9, 0.999), 1e-8, None, "constant", 1000)
    torch.manual_seed(0)
    norms = torch.nn.ModuleList([torch.nn.LayerNorm(list(s)) for s in shapes])
    flows = torch.nn.ModuleList([create_fast_flow_block(list(s), False, 1.0, 8) for s in shapes])
    params = [q for q in [*norms.parameters(), *flows.parameters()] if q.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3, weight_decay=1e-5)
    criterion = FastflowLoss()

    def eager_step() -> None:
        opt.zero_grad(set_to_none=True)
        hidden, jacobians = [], []
        for norm, flow, x in zip(norms, flows, feats, strict=True):
            h, j = flow(norm(x))
            hidden.append(h)
            jacobians.append(j)
        criterion(hidden, jacobians).backward()
        opt.step()

    def anomalox_step() -> None:
        head.train_epoch(torch.zeros(b, 1), feats, list(range(b)), b, None, args.threads)

    steps = {"anomalox": anomalox_step, "anomalib torch eager": eager_step}
    for fn in steps.values():
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.pairs):
        for name, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    print(f"| step (8 images, {args.threads} threads) | median s | min s |\n|---|---|---|")
    for name, v in times.items():
        print(f"| {name} | {statistics.median(v):.3f} | {min(v):.3f} |")


if __name__ == "__main__":
    main()
