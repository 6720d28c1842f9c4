#!/usr/bin/env python3
"""Where one STFPM training step's time goes: anomalox's step vs torch eager, in one process.

Three steps on the same batch (``--batch`` images of 256 px, random values; the Lite0 taps
``_blocks.2``, ``_blocks.4``, ``_blocks.10``), timed interleaved ``--repeats`` times (medians):

- ``anomalox``: ``StfpmStudent.train_epoch`` on one batch (student forward + backward + SGD step in
  Rust; the teacher's features are given, as ``STFPM.fit`` computes them once per image);
- ``eager, as anomalib``: the reference Lite0 teacher forward (no grad) + timm's
  ``tf_efficientnet_lite0`` student forward, STFPM loss, backward, ``torch.optim.SGD`` step,
  NCHW tensors (what anomalib's ``Stfpm.training_step`` runs);
- ``eager student only, channels-last``: the timm student step alone with channels-last input and
  weights (the same work as anomalox's step, in Python).

Then ``torch.profiler`` on the last one: the share of each operator group (both share libtorch's
kernels, so this is where anomalox's step spends its time too).

Usage:
  PYTHONPATH=python:tch/python .venv-bench/bin/python benches/profile_training_step.py --threads 2
"""

from __future__ import annotations

import argparse
import sys

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import anomalox_tch
    import timm

    from anomalox.backbone import BACKBONES

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import bench_detectors as bd
    import step_profiling

    layers = ["_blocks.2", "_blocks.4", "_blocks.10"]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, 256, 256, generator=g) * 2 - 1
    teacher_net = bd.lite_taps_module(layers)
    with torch.no_grad():
        targets = [t.contiguous() for t in teacher_net(x).values()]

    ours = anomalox_tch._tch.StfpmStudent(
        "efficientnet_lite0", "efficientnet_lite", dict(BACKBONES["efficientnet_lite0"].config), layers, 0, None, 1
    )
    ours.configure("sgd", 0.4, 1e-3, 0.9, 0.0, False, (0.9, 0.999), 1e-8, None, "constant", 10**6)

    def student():
        net = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(1, 2, 3))
        return net, torch.optim.SGD(net.parameters(), lr=0.4, momentum=0.9, weight_decay=1e-3)

    def loss_of(teacher, feats):
        norm = torch.nn.functional.normalize
        return sum(0.5 / (t.shape[2] * t.shape[3]) * ((norm(t) - norm(s)) ** 2).sum() for t, s in zip(teacher, feats))

    eager_net, eager_opt = student()
    cl_net, cl_opt = student()
    cl_net = cl_net.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def step_ours():
        ours.train_epoch(x, targets, list(range(args.batch)), args.batch, None, args.threads)

    def step_anomalib():
        with torch.no_grad():
            teacher = list(teacher_net(x).values())
        loss = loss_of(teacher, eager_net(x))
        eager_opt.zero_grad()
        loss.backward()
        eager_opt.step()

    def step_cl():
        loss = loss_of(targets, cl_net(x_cl))
        cl_opt.zero_grad()
        loss.backward()
        cl_opt.step()

    steps = {"anomalox": step_ours, "eager, as anomalib": step_anomalib, "eager student only, channels-last": step_cl}
    times = step_profiling.time_steps(steps, args.repeats)
    step_profiling.print_step_table(
        f"One STFPM training step, {args.batch} images of 256 px, {args.threads} threads (medians of {args.repeats})",
        times,
        args.batch,
    )

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step_cl()
    step_profiling.print_operator_shares(prof, group_of, "torch.profiler, eager student only, channels-last, 2 steps")


def group_of(name: str) -> str:
    """The operator group of an aten operator of the STFPM step."""
    if "convolution_backward" in name:
        return "convolution backward"
    if "conv" in name:
        return "convolution forward"
    if "batch_norm" in name and "backward" in name:
        return "batch norm backward"
    if "batch_norm" in name:
        return "batch norm forward"
    if "hardtanh" in name or "relu" in name:
        return "ReLU6 forward / backward"
    if "pad" in name:
        return "TF SAME padding"
    return "other (loss, optimiser, copies)"


if __name__ == "__main__":
    main()
