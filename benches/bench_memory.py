#!/usr/bin/env python3
"""Memory benchmark (issue 6): PatchCore with Wide-ResNet-50-2 on all 1,508 normal ELPV cells.

Taps layer2 + layer3 (1,536-dim patches) at 224 px: 1,508 × 28 × 28 = 1.18 M patches, 7.3 GB as
float32. Random weights (seeded; accuracy is not the point). Coreset ratio 0.01. Each library runs
in its own process, polled for RSS every 0.2 s (peak = max of the polled RSS and ru_maxrss):

  anomalox  PatchCore(backbone="wide_resnet50_2", weights=<random state_dict>, image_size=224,
            coreset_ratio=0.01, validation_fraction=0).fit(paths): streams the patches to a
            temporary file with plain writes and keeps only their 128-dim projection in memory.
  anomalib  2.7.0 PatchcoreModel(backbone="wide_resnet50_2", layers=[layer2, layer3],
            pre_trained=False) with the same random weights, fed the same preprocessed batches in
            train mode, then subsample_embedding(0.01); capped at --anomalib-timeout (30 min) and
            --max-rss-gib.

Usage (bench venv, see benches/setup_env.sh; PYTHONPATH=python uses the checkout's build):
  PYTHONPATH=python .venv-bench/bin/python benches/bench_memory.py [--only anomalox|anomalib]
      [--n 1508] [--threads 2] [--json benches/results/memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def weights_file(workdir: str) -> str:
    import torch
    import torchvision

    path = os.path.join(workdir, "wrn50_random.pth")
    if not os.path.exists(path):
        torch.manual_seed(0)
        torch.save(torchvision.models.wide_resnet50_2(weights=None).state_dict(), path)
    return path


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from anomalox.elpv import load_elpv

    paths, prob, _ = load_elpv()
    normal = [p for p, q in zip(paths, prob) if q == 0][: args.n]
    t0 = time.perf_counter()
    out: dict = {"library": args.worker, "n_images": len(normal)}
    if args.worker == "anomalox":
        import anomalox

        model = anomalox.PatchCore(
            backbone="wide_resnet50_2",
            weights=args.weights,
            image_size=224,
            coreset_ratio=0.01,
            validation_fraction=0.0,
            batch_size=16,
            n_threads=args.threads,
            verbose=False,
        )
        model.fit(normal)
        out["memory_bank"] = list(model.memory_bank_.shape)
        out["n_patches"] = int(model.n_train_patches_)
    else:
        import warnings

        warnings.filterwarnings("ignore")
        from anomalib.models.image.patchcore.torch_model import PatchcoreModel

        from anomalox.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

        model = PatchcoreModel(layers=["layer2", "layer3"], backbone="wide_resnet50_2", pre_trained=False)
        state = torch.load(args.weights, weights_only=True)
        missing = model.feature_extractor.feature_extractor.load_state_dict(state, strict=False)
        out["weights_missing_keys"] = len(missing.missing_keys)
        prep = Preprocessing(image_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        model.train()
        with torch.no_grad():
            for i in range(0, len(normal), 16):
                model(prep(normal[i : i + 16]))
        out["embedding_collected_s"] = time.perf_counter() - t0
        model.subsample_embedding(0.01)
        out["memory_bank"] = list(model.memory_bank.shape)
    out["fit_s"] = time.perf_counter() - t0
    out["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


def run_polled(argv, timeout: float, max_rss_gib: float, log_path: str):
    page = os.sysconf("SC_PAGE_SIZE")
    peak, start = 0.0, time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/statm") as f:
                    peak = max(peak, int(f.read().split()[1]) * page / 2**20)
            except (OSError, ValueError, IndexError):
                pass
            if peak > max_rss_gib * 1024:
                proc.kill(), proc.wait()
                return (
                    f"killed at RSS {peak / 1024:.1f} GiB (> {max_rss_gib:g} GiB cap)",
                    peak,
                    time.perf_counter() - start,
                )
            if time.perf_counter() - start > timeout:
                proc.kill(), proc.wait()
                return f"stopped at the {timeout / 60:.0f}-minute cap", peak, time.perf_counter() - start
            time.sleep(0.2)
    return proc.returncode, peak, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["anomalox", "anomalib"])
    p.add_argument("--n", type=int, default=1508)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--anomalib-timeout", type=float, default=1800)
    p.add_argument("--max-rss-gib", type=float, default=18)
    p.add_argument("--json")
    p.add_argument("--worker", choices=["anomalox", "anomalib"], help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    workdir = tempfile.mkdtemp(prefix="anomalox-membench-")
    weights = weights_file(workdir)
    rows = []
    for lib in ["anomalox", "anomalib"]:
        if args.only and lib != args.only:
            continue
        log_path = os.path.join(workdir, f"{lib}.log")
        argv = [
            sys.executable,
            __file__,
            "--worker",
            lib,
            "--weights",
            weights,
            "--n",
            str(args.n),
            "--threads",
            str(args.threads),
        ]
        load0 = os.getloadavg()
        status, peak, wall = run_polled(
            argv, args.anomalib_timeout if lib == "anomalib" else 7200, args.max_rss_gib, log_path
        )
        with open(log_path) as f:
            lines = f.read().splitlines()
        result = next((json.loads(line[7:]) for line in lines if line.startswith("RESULT ")), {})
        row = {
            "library": lib,
            "status": "ok" if status == 0 else (status if isinstance(status, str) else f"exit {status}: {lines[-1:]}"),
            "wall_s": round(wall, 1),
            "peak_rss_polled_mib": round(peak),
            "load_start": load0,
            "load_end": os.getloadavg(),
            **result,
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print("| library | status | fit wall s | peak RSS MiB | memory bank | patches |\n|---|---|---|---|---|---|")
    for r in rows:
        rss = max(r["peak_rss_polled_mib"], r.get("ru_maxrss_mib", 0))
        print(
            f"| {r['library']} | {r['status']} | {r.get('fit_s', r['wall_s']):.0f} | {rss:,.0f} | {r.get('memory_bank', '-')} | {r.get('n_patches', '-')} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
