#!/usr/bin/env python3
"""Where one Reverse Distillation training step's time goes: anomalox's step vs torch eager.

One process, one batch (``--batch`` images of ``--size`` px; the encoder's taps ``layer1-3`` of a
random ResNet-18, computed once), each step timed interleaved ``--repeats`` times (medians):

- ``anomalox``: ``HeadModel.train_epoch`` on one batch (OCBE + decoder forward, loss, backward and an
  Adam step in Rust; the encoder's taps are given, as ``ReverseDistillation.fit`` computes them once
  per image);
- ``eager, as anomalib``: the encoder forward (no grad) + anomalib 2.7.0's
  ``get_bottleneck_layer`` / ``get_decoder`` forward, its ``ReverseDistillationLoss``, backward and
  ``torch.optim.Adam`` (betas (0.5, 0.999)), NCHW tensors: what anomalib's ``training_step`` runs;
- ``eager OCBE + decoder only``: the same without the encoder (the work of anomalox's step),
  NCHW and channels-last.

Then ``torch.profiler`` on anomalox's configuration in eager form (channels-last OCBE + decoder):
the share of each operator group.

Usage:
  PYTHONPATH=python:tch/python .venv-bench/bin/python benches/profile_rd_step.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--only", default=None, help="time only the steps whose name contains this (one per process)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import anomalox_tch
    import torchvision
    from anomalib.models.components.backbone import get_decoder
    from anomalib.models.image.reverse_distillation.components import get_bottleneck_layer
    from anomalib.models.image.reverse_distillation.loss import ReverseDistillationLoss

    from anomalox.backbone import BACKBONES

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import step_profiling

    torch.manual_seed(0)
    encoder = torchvision.models.resnet18(weights=None).eval()

    def taps(x: torch.Tensor) -> list[torch.Tensor]:
        h = encoder.maxpool(encoder.relu(encoder.bn1(encoder.conv1(x))))
        out = []
        for layer in (encoder.layer1, encoder.layer2, encoder.layer3):
            h = layer(h)
            out.append(h)
        return out

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    with torch.no_grad():
        targets = [t.contiguous() for t in taps(x)]
    targets_cl = [t.contiguous(memory_format=torch.channels_last) for t in targets]

    layers = ["layer1", "layer2", "layer3"]
    ours = anomalox_tch._tch.HeadModel.reverse_distillation(
        "resnet18", "resnet", dict(BACKBONES["resnet18"].config), layers, 0, None, 1
    )
    ours.configure("adam", 0.005, 0.0, 0.9, 0.0, False, (0.5, 0.999), 1e-8, None, "constant", 10**6)
    loss_fn = ReverseDistillationLoss()

    def eager(channels_last: bool):
        bottleneck, decoder = get_bottleneck_layer("resnet18"), get_decoder("resnet18")
        if channels_last:
            bottleneck = bottleneck.to(memory_format=torch.channels_last)
            decoder = decoder.to(memory_format=torch.channels_last)
        params = [*bottleneck.parameters(), *decoder.parameters()]
        return bottleneck, decoder, torch.optim.Adam(params, lr=0.005, betas=(0.5, 0.999))

    nchw, cl = eager(False), eager(True)

    def step_ours():
        ours.train_epoch(x, targets, list(range(args.batch)), args.batch, None, args.threads)

    def loss_any_layout(feats, decoded):
        # anomalib's loss `view`s the features, which channels-last tensors refuse: the same sum
        # of 1 - cos over each image's flattened features, with `reshape`.
        cos = torch.nn.functional.cosine_similarity
        return sum(
            (1 - cos(e.reshape(e.shape[0], -1), d.reshape(d.shape[0], -1))).mean() for e, d in zip(feats, decoded)
        )

    def step_heads(model, feats):
        bottleneck, decoder, opt = model
        decoded = decoder(bottleneck(feats))
        loss = loss_fn(feats, decoded) if model is nchw else loss_any_layout(feats, decoded)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def step_anomalib():
        with torch.no_grad():
            feats = taps(x)
        step_heads(nchw, feats)

    steps = {
        "anomalox": step_ours,
        "eager, as anomalib (encoder + OCBE + decoder, NCHW)": step_anomalib,
        "eager OCBE + decoder only, NCHW": lambda: step_heads(nchw, targets),
        "eager OCBE + decoder only, channels-last": lambda: step_heads(cl, targets_cl),
    }
    if args.only:
        steps = {k: f for k, f in steps.items() if args.only in k}
    times = step_profiling.time_steps(steps, args.repeats)
    step_profiling.print_step_table(
        f"One Reverse Distillation training step (ResNet-18 encoder), {args.batch} images of {args.size} px, "
        f"{args.threads} threads (medians of {args.repeats})",
        times,
        args.batch,
    )
    if args.no_profile:
        return

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step_heads(cl, targets_cl)
    step_profiling.print_operator_shares(prof, group_of, "torch.profiler, eager OCBE + decoder, channels-last, 2 steps")


def group_of(name: str) -> str:
    """The operator group of an aten operator of the Reverse Distillation step."""
    if "convolution_backward" in name:
        return "convolution backward (transposed ones included)"
    if "conv" in name:
        return "convolution forward (transposed ones included)"
    if "batch_norm" in name and "backward" in name:
        return "batch norm backward"
    if "batch_norm" in name:
        return "batch norm forward"
    if "relu" in name or "threshold" in name:
        return "ReLU forward / backward"
    return "other (loss, optimiser, copies)"


if __name__ == "__main__":
    main()
