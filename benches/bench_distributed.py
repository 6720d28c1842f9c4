#!/usr/bin/env python3
"""anomalox.distributed on one machine: Ray's overhead in scoring, and distributed vs one fit.

``score``: a PatchCore (defaults: EfficientNet-Lite0, 256 px, coreset 10 %) fitted on
``--train`` normal ELPV cells (``anomalox.elpv.demo_split(train, seed=0)``) scores ``--n`` other
ELPV cells (the split's test cells, first ``--n``), three ways, interleaved ``--repeats`` times:

- ``single``: this process, ``n_threads=2`` and ``torch.set_num_threads(2)``, ``inspect`` on
  chunks of ``--batch`` paths (what each Ray actor does per batch; maps computed and dropped);
- ``ray 1x2``: ``anomalox.distributed.score(model, paths, num_actors=1, cpus_per_actor=2)``;
- ``ray 2x1``: the same with 2 actors of 1 CPU.

The Ray runs are timed from the call to the last row in the driver (``.to_pandas()``): they include
shipping the model through the object store, starting the actors and loading the model in each.
Ray runs on a local instance started once (``ray.init(num_cpus=2)``), on loopback. Each run also
records the CPU seconds used meanwhile by this process and by Ray's processes that outlive the run
(raylet, GCS, log monitor, idle workers; not the actors, which end with the run): where the cores
went that the actors did not get.

``fit``: PaDiM or PatchCore (defaults, ``validation_fraction`` 0.2 held out for the threshold on
both sides) on the first ``--train`` Magnetic Tile training images, fitted once in one Ray task of
2 CPUs (``fit``, 2 threads) and once by ``anomalox.distributed.fit(shards=--shards,
cpus_per_shard=1)``; each is timed in the driver. Peak RSS per worker: a thread polls the RSS of
every Ray worker process (``/proc/<pid>/status`` VmRSS, every 50 ms) and keeps the highest value
seen per task name (the process title Ray sets: ``ray::_partial_task``, ``ray::_merge_task``,
``ray::_single_fit``); it includes each worker's imports (torch, anomalox). The driver's peak
during the distributed fit (it scores the held-out images) is its VmHWM after a reset. Accuracy:
image AUROC of both models on every Magnetic Tile test image; for PatchCore also the coverage of
each memory bank over all training patches that went into the model (Euclidean distance of each
patch to its nearest bank row: max, as ``anomalox.ops.coreset_coverage``, and mean).

``oversampling``: PatchCore's shard coresets without Ray (the same ``partial_fit`` / ``merge``
in this process): coverage of the merged bank over all ``--train`` Magnetic Tile training
patches (every image learned from) against one selection, for ``--shard-counts`` shards and
``--factors`` (the class attribute ``_shard_oversampling``); ``--single-seeds`` adds one
selection with other ``random_state`` values, the spread of the reference itself.

Usage (the project venv has ray[data], requirements-dev.txt):
  .venv/bin/python benches/bench_distributed.py score [--n 2000 --repeats 5]
  .venv/bin/python benches/bench_distributed.py fit --method padim
  .venv/bin/python benches/bench_distributed.py fit --method patchcore
  .venv/bin/python benches/bench_distributed.py oversampling [--single-seeds 1 2]

Markdown to stdout, JSON to benches/results/distributed_<mode>[_<method>].json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from typing import Any

import numpy as np
import torch

import anomalox
from anomalox import distributed
from anomalox.detectors import PaDiM, PatchCore
from anomalox.elpv import demo_split

HERE = os.path.dirname(os.path.abspath(__file__))
TILE = os.path.join(HERE, "..", "..", "shared", "datasets", "magnetic_tile")


def start_ray() -> Any:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


# ----------------------------------------------------------------------------- scoring
def daemon_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) so far of every other Ray process that outlives a run (raylet,
    gcs_server, log monitor, agents, idle workers), by process name; and of this process."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        text = b" ".join(argv).decode(errors="replace")
        if int(pid) == os.getpid():
            name = "driver (this process)"
        elif "ray" not in text:
            continue
        else:
            name = os.path.basename(argv[0].decode(errors="replace").split()[0]) or "?"
            if name.startswith("python"):
                name = os.path.basename(argv[2].decode(errors="replace")) if len(argv) > 2 else name
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def score_single(model: Any, paths: list[str], batch: int) -> np.ndarray:
    scores = []
    for i in range(0, len(paths), batch):
        scores.append(model.inspect(paths[i : i + batch]).scores)
    return np.concatenate(scores)


def bench_score(args: argparse.Namespace) -> dict[str, Any]:
    split = demo_split(args.train, seed=0)
    paths = split["test"][: args.n]
    torch.set_num_threads(2)
    model = PatchCore(n_threads=2, verbose=False).fit(split["train"])
    start_ray()
    runs: dict[str, list[float]] = {"single": [], "ray 1x2": [], "ray 2x1": []}
    overhead: dict[str, list[dict[str, float]]] = {k: [] for k in runs}
    reference = None
    worst = 0.0
    for rep in range(args.repeats):
        for name in runs:
            cpu0 = daemon_cpu_s()
            t0 = time.perf_counter()
            if name == "single":
                scores = score_single(model, paths, args.batch)
                if reference is None:
                    reference = scores
            else:
                actors, cpus = (1, 2) if name == "ray 1x2" else (2, 1)
                frame = distributed.score(
                    model, paths, num_actors=actors, cpus_per_actor=cpus, batch_size=args.batch
                ).to_pandas()
                assert frame["path"].is_unique and len(frame) == len(paths) and frame["error"].isna().all()
                scores = frame.set_index("path").loc[paths, "score"].to_numpy()
            elapsed = time.perf_counter() - t0
            cpu1 = daemon_cpu_s()
            used = {k: round(v - cpu0.get(k, 0.0), 2) for k, v in cpu1.items() if v - cpu0.get(k, 0.0) >= 0.05}
            overhead[name].append(used)
            runs[name].append(elapsed)
            if reference is not None and name != "single":
                worst = max(worst, float(np.max(np.abs(scores - reference) / np.abs(reference))))
            print(
                f"  repeat {rep + 1} {name}: {elapsed:.1f} s ({len(paths) / elapsed:.1f} images/s); CPU s of the "
                f"driver and Ray's lasting processes: {used}",
                flush=True,
            )
    median = {k: statistics.median(v) for k, v in runs.items()}
    # Throughput relative to single, per repeat (single and Ray ran back to back), then the median.
    paired = {k: statistics.median(a / b for a, b in zip(runs["single"], v)) for k, v in runs.items()}
    out = {
        "n_images": len(paths),
        "train": args.train,
        "batch": args.batch,
        "repeats": args.repeats,
        "seconds": runs,
        "median_s": median,
        "images_per_s": {k: len(paths) / v for k, v in median.items()},
        "throughput_vs_single_median_of_pairs": paired,
        "max_rel_score_diff_vs_single": worst,
        "cpu_s_of_driver_and_ray_daemons": overhead,
    }
    print(f"\nScoring {len(paths)} ELPV cells, PatchCore (Lite0, 256 px), medians of {args.repeats} interleaved runs\n")
    print("| run | median s | images/s | vs single (medians) | vs single (median of pairs) |")
    print("|---|---:|---:|---:|---:|")
    for k, v in median.items():
        print(f"| {k} | {v:.1f} | {len(paths) / v:.1f} | {median['single'] / v:.2f}x | {paired[k]:.3f}x |")
    print(f"\nlargest relative score difference Ray vs single: {worst:.2e}")
    return out


# ----------------------------------------------------------------------------- fitting
class RssMonitor:
    """Highest VmRSS (MiB) seen per Ray process title, polled every `period` seconds."""

    def __init__(self, period: float = 0.05) -> None:
        self.period = period
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        title = f.read().split(b"\0")[0].decode(errors="replace").strip()
                    if not title.startswith("ray::_"):  # the tasks and actors here, not Ray's agents
                        continue
                    with open(f"/proc/{pid}/status") as f:
                        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
                except (OSError, StopIteration, ValueError):
                    continue
                name = title.split()[0]
                self.peak[name] = max(self.peak.get(name, 0.0), rss)
            time.sleep(self.period)

    def __enter__(self) -> RssMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def _single_fit(detector: Any, paths: list[str]) -> bytes:
    import tempfile

    torch.set_num_threads(2)
    model = detector.set_params(n_threads=2).fit(paths)
    with tempfile.TemporaryDirectory() as folder:
        path = model.save(os.path.join(folder, "m.safetensors"))
        with open(path, "rb") as f:
            return f.read()


def _warm() -> None:
    import anomalox.detectors  # noqa: F401


def _load_bytes(data: bytes) -> Any:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "m.safetensors")
        with open(path, "wb") as f:
            f.write(data)
        return anomalox.load(path)


def _hwm_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def coverage(bank: np.ndarray, patches: np.ndarray) -> tuple[float, float]:
    dist, _ = anomalox.ops.knn(patches, bank, 1, n_threads=2)
    return float(dist.max()), float(dist.mean())


def bench_fit(args: argparse.Namespace) -> dict[str, Any]:
    from anomalox.data import resolve_folder
    from anomalox.metrics import image_auroc

    train = resolve_folder(TILE, "train")[: args.train]
    test = resolve_folder(TILE, "test")
    labels = np.array([0 if os.sep + "good" + os.sep in p else 1 for p in test])
    detector = PaDiM(verbose=False) if args.method == "padim" else PatchCore(verbose=False)
    ray = start_ray()
    single_task = ray.remote(num_cpus=2)(_single_fit)
    # Warm the worker pool (imports happen once per worker) so both timings start alike.
    ray.get([ray.remote(num_cpus=1)(_warm).remote() for _ in range(2)])
    with RssMonitor() as monitor:
        t0 = time.perf_counter()
        single = _load_bytes(ray.get(single_task.remote(detector, train)))
        single_s = time.perf_counter() - t0
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        t0 = time.perf_counter()
        merged = distributed.fit(detector, train, shards=args.shards, cpus_per_shard=1)
        dist_s = time.perf_counter() - t0
        driver_mib = _hwm_mib()
    peaks = dict(monitor.peak)
    torch.set_num_threads(2)
    single.set_params(n_threads=2)
    merged.set_params(n_threads=2)
    auroc_single = image_auroc(labels, single.decision_function(test))
    auroc_merged = image_auroc(labels, merged.decision_function(test))
    out: dict[str, Any] = {
        "method": args.method,
        "train_images": len(train),
        "shards": args.shards,
        "single_fit_s": single_s,
        "distributed_fit_s": dist_s,
        "peak_rss_mib": peaks,
        "driver_peak_mib_during_distributed_fit": driver_mib,
        "auroc_single": auroc_single,
        "auroc_distributed": auroc_merged,
        "threshold_single": single.threshold_,
        "threshold_distributed": merged.threshold_,
    }
    print(
        f"\n{args.method} on {len(train)} Magnetic Tile training images, {args.shards} shards x 1 CPU vs one task x 2 CPUs\n"
    )
    print("| | fit s | image AUROC | threshold |\n|---|---:|---:|---:|")
    print(f"| one fit | {single_s:.1f} | {auroc_single:.4f} | {single.threshold_:.4g} |")
    print(f"| distributed | {dist_s:.1f} | {auroc_merged:.4f} | {merged.threshold_:.4g} |")
    print("\npeak RSS per worker (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(peaks.items())))
    print(f"driver peak during the distributed fit: {driver_mib:.0f} MiB")
    if args.method == "patchcore":
        # Every training patch that went into the model (the hold-out excluded: same split both sides).
        kept, _ = detector._holdout(len(train))
        everything = PatchCore(coreset_ratio=1.0, n_threads=2, verbose=False).partial_fit([train[i] for i in kept])
        patches = everything.partial_state()["data"]["bank"]
        cov_single = coverage(single.memory_bank_, patches)
        cov_merged = coverage(merged.memory_bank_, patches)
        out.update(
            n_patches=int(patches.shape[0]),
            bank_rows={"single": int(single.memory_bank_.shape[0]), "distributed": int(merged.memory_bank_.shape[0])},
            coverage_max={"single": cov_single[0], "distributed": cov_merged[0]},
            coverage_mean={"single": cov_single[1], "distributed": cov_merged[1]},
        )
        print(
            f"coverage of {patches.shape[0]:,} patches (max / mean nearest-bank distance): one selection "
            f"{cov_single[0]:.4f} / {cov_single[1]:.4f}, distributed {cov_merged[0]:.4f} / {cov_merged[1]:.4f} "
            f"({cov_merged[0] / cov_single[0] - 1:+.1%} / {cov_merged[1] / cov_single[1] - 1:+.1%}); bank rows "
            f"{single.memory_bank_.shape[0]} / {merged.memory_bank_.shape[0]}"
        )
    return out


def bench_oversampling(args: argparse.Namespace) -> dict[str, Any]:
    """PatchCore's shard coresets: coverage of the merged bank against one selection, in process
    (the same partial_fit / merge as distributed.fit, without Ray), per shard count and
    oversampling factor (the class attribute ``_shard_oversampling``, 2 by default)."""
    from sklearn.base import clone

    from anomalox.data import resolve_folder

    train = resolve_folder(TILE, "train")[: args.train]
    base = PatchCore(n_threads=2, verbose=False, validation_fraction=0.0)
    torch.set_num_threads(2)
    patches = PatchCore(coreset_ratio=1.0, n_threads=2, verbose=False).partial_fit(train).partial_state()
    patches = patches["data"]["bank"]
    single = clone(base).fit(train).memory_bank_
    ref = coverage(single, patches)
    rows = []
    # The spread of one selection itself: other seeds of the greedy k-center start (random_state).
    seeds = {}
    for seed in args.single_seeds:
        seeds[seed] = coverage(clone(base).set_params(random_state=seed).fit(train).memory_bank_, patches)
        print(f"one selection, random_state={seed}: max {seeds[seed][0]:.4f}, mean {seeds[seed][1]:.4f}", flush=True)
    print(
        f"\nPatchCore coverage of {patches.shape[0]:,} patches ({len(train)} Magnetic Tile images), one selection: "
        f"max {ref[0]:.4f}, mean {ref[1]:.4f}\n"
    )
    print("| shards | oversampling | max | mean | max vs one | mean vs one |\n|---:|---:|---:|---:|---:|---:|")
    default = PatchCore._shard_oversampling
    try:
        for shards in args.shard_counts:
            for factor in args.factors:
                PatchCore._shard_oversampling = factor
                parts = [
                    clone(base).partial_fit([train[i] for i in c])
                    for c in np.array_split(np.arange(len(train)), shards)
                ]
                bank = clone(base).merge(*parts).memory_bank_
                got = coverage(bank, patches)
                rows.append({"shards": shards, "oversampling": factor, "max": got[0], "mean": got[1]})
                print(
                    f"| {shards} | {factor:g} | {got[0]:.4f} | {got[1]:.4f} | {got[0] / ref[0] - 1:+.1%} | "
                    f"{got[1] / ref[1] - 1:+.1%} |",
                    flush=True,
                )
    finally:
        PatchCore._shard_oversampling = default
    return {
        "train_images": len(train),
        "n_patches": int(patches.shape[0]),
        "single": {"max": ref[0], "mean": ref[1]},
        "single_other_seeds": {str(k): {"max": v[0], "mean": v[1]} for k, v in seeds.items()},
        "merged": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["score", "fit", "oversampling"])
    parser.add_argument("--n", type=int, default=2000, help="score: images scored")
    parser.add_argument("--train", type=int, default=None, help="training images (score: 200, fit: 200)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--method", choices=["padim", "patchcore"], default="padim")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--shard-counts", type=int, nargs="*", default=[2, 4], help="oversampling: shard counts")
    parser.add_argument("--factors", type=float, nargs="*", default=[1.0, 2.0, 4.0], help="oversampling: factors")
    parser.add_argument(
        "--single-seeds", type=int, nargs="*", default=[], help="oversampling: other random_state of one selection"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.train = args.train or 200
    out = {"score": bench_score, "fit": bench_fit, "oversampling": bench_oversampling}[args.mode](args)
    name = {
        "score": "distributed_score",
        "fit": f"distributed_fit_{args.method}",
        "oversampling": "distributed_oversampling",
    }[args.mode]
    path = args.json or os.path.join(HERE, "results", f"{name}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nJSON: {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
