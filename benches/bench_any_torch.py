#!/usr/bin/env python3
"""Issue 15 (any torch): the core without tch against the build that links libtorch.

Two builds side by side, each in its own interpreter:

  OLD  ``--old-python`` (default /work/main/.venv/bin/python, run with cwd ``--old-root``): the
       single extension that links tch/libtorch; ``import anomalox`` imports torch.
  NEW  ``--new-python`` (default this worktree's .venv, cwd the worktree): the abi3 core
       ``anomalox._core`` without libtorch, plus the separate ``anomalox_tch`` package.

Parts (``--part``; each writes ``--json`` if given and prints Markdown to stdout):

  import     ``import anomalox`` in a fresh subprocess: OLD (imports torch) vs NEW (core only;
             the child asserts ``'torch' not in sys.modules``), and NEW's
             ``import anomalox; anomalox.PatchCore`` (the lazy torch import) for reference.
             ``--pairs`` interleaved rounds; medians of the in-process import time.
  kernels    ops.knn (numpy, and torch tensors: DLPack in NEW, ``Tensor.numpy()`` in OLD),
             ops.coreset, ops.gaussian_fit, metrics.aupro: one fresh child per (build, kernel),
             OLD and NEW alternately, each child prints its best-of-3 in-process time.
             Per kernel the median over ``--pairs`` rounds and the median of the per-round
             NEW/OLD ratios.
  patchcore  NEW only: PatchCore on Magnetic Tile (bench_detectors.py's settings) fitted on the
             first ``--train`` sorted train/good paths, ``anomalox.evaluate`` of the category;
             (a) ``tch``: the default backbone (anomalox_tch), (b) ``torch``: the child sets
             ``anomalox.backbone._TCH = (None, ...)`` so the named backbone falls back to
             ``anomalox.torch_backbone.reference_backbone``. ``--order`` gives the sequence of
             children (default ``tch,torch,torch,tch``); peak RSS is each child's VmHWM.

Usage (from the worktree root):
  .venv/bin/python benches/bench_any_torch.py --part import --pairs 9 --json benches/results/any_torch_import.json
  .venv/bin/python benches/bench_any_torch.py --part kernels --pairs 5 --json benches/results/any_torch_kernels.json
  .venv/bin/python benches/bench_any_torch.py --part patchcore --order tch,torch \
      --json benches/results/any_torch_patchcore.json

Markdown goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_DATA = os.path.join(os.path.dirname(ROOT), "shared", "datasets", "magnetic_tile")
THREADS = 2

KERNELS = ("knn", "knn_torch", "coreset", "gaussian_fit", "aupro")
KERNEL_DOC = {
    "knn": "ops.knn, numpy: 10,000 × 256 queries vs 50,000 bank, k=1",
    "knn_torch": "ops.knn, torch tensors (same sizes)",
    "coreset": "ops.coreset, 50,000 × 128 → 5,000",
    "gaussian_fit": "ops.gaussian_fit, (32, 100, 64, 64)",
    "aupro": "metrics.aupro, 100 maps 256 × 256",
}


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


# --------------------------------------------------------------------------- children


def child_import(mode: str) -> dict:
    t0 = time.perf_counter()
    import anomalox

    t_import = time.perf_counter() - t0
    torch_loaded = "torch" in sys.modules
    out = {"import_s": t_import, "torch_imported": torch_loaded, "file": anomalox.__file__}
    if mode == "core":
        assert not torch_loaded, "import anomalox imported torch"
    if mode == "patchcore":
        t1 = time.perf_counter()
        anomalox.PatchCore  # noqa: B018  (the lazy import of the detectors and torch)
        out["patchcore_attr_s"] = time.perf_counter() - t1
        out["import_and_attr_s"] = time.perf_counter() - t0
        out["torch_imported"] = "torch" in sys.modules
    return out


def kernel_inputs(kernel: str):
    import numpy as np

    rng = np.random.default_rng(0)
    if kernel in ("knn", "knn_torch"):
        bank = rng.standard_normal((50_000, 256), dtype=np.float32)
        queries = rng.standard_normal((10_000, 256), dtype=np.float32)
        if kernel == "knn_torch":
            import torch

            return torch.from_numpy(queries), torch.from_numpy(bank)
        return queries, bank
    if kernel == "coreset":
        centers = 3.0 * rng.standard_normal((64, 128), dtype=np.float32)
        lab = rng.integers(0, 64, 50_000)
        return (centers[lab] + rng.standard_normal((50_000, 128), dtype=np.float32),)
    if kernel == "gaussian_fit":
        mix = rng.standard_normal((100, 16), dtype=np.float32) / 4.0
        z = rng.standard_normal((32, 16, 64 * 64), dtype=np.float32)
        x = np.einsum("cr,brp->bcp", mix, z) + 0.3 * rng.standard_normal((32, 100, 64 * 64), dtype=np.float32)
        return (np.ascontiguousarray(x.reshape(32, 100, 64, 64), dtype=np.float32),)
    if kernel == "aupro":
        yy, xx = np.mgrid[0:256, 0:256]
        masks = np.zeros((100, 256, 256), dtype=np.uint8)
        maps = rng.gamma(2.0, 1.0, size=(100, 256, 256)).astype(np.float32)
        for i in range(100):
            for _ in range(1 + i % 3):  # 1-3 elliptic defects per map, raised scores inside
                cy, cx = rng.integers(30, 226, 2)
                ry, rx = rng.integers(5, 30, 2)
                m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
                masks[i][m] = 1
                maps[i][m] += rng.uniform(0.5, 3.0)
        return masks, maps
    raise ValueError(kernel)


def child_kernel(kernel: str, reps: int = 3) -> dict:
    import numpy as np

    t0 = time.perf_counter()
    import anomalox
    from anomalox import metrics, ops

    import_s = time.perf_counter() - t0
    args = kernel_inputs(kernel)
    if kernel in ("knn", "knn_torch"):

        def fn():
            return ops.knn(args[0], args[1], 1, n_threads=THREADS)

    elif kernel == "coreset":

        def fn():
            return ops.coreset(args[0], 5_000, seed=0, n_threads=THREADS)

    elif kernel == "gaussian_fit":

        def fn():
            return ops.gaussian_fit(args[0], eps=0.01, n_threads=THREADS)

    else:

        def fn():
            return metrics.aupro(args[0], args[1], fpr_limit=0.3, n_threads=THREADS)

    times, res = [], None
    for _ in range(reps):
        t = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t)
    # a checksum of the result, to compare OLD and NEW
    if isinstance(res, float):
        check = res
    else:
        first = res[0] if isinstance(res, tuple) else res
        first = first.numpy() if hasattr(first, "numpy") and not isinstance(first, np.ndarray) else first
        check = float(np.asarray(first, dtype=np.float64).sum())
    return {
        "best_s": min(times),
        "times_s": times,
        "check": check,
        "result_type": type(res[0] if isinstance(res, tuple) else res).__name__,
        "import_s": import_s,
        "torch_imported": "torch" in sys.modules,
        "file": anomalox.__file__,
    }


def list_train(data: str, n: int) -> list[str]:
    d = os.path.join(data, "train", "good")
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".png"))[:n]


def child_patchcore(path: str, data: str, n_train: int) -> dict:
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(THREADS)
    import anomalox
    import anomalox.backbone

    if path == "torch":
        anomalox.backbone._TCH = (None, "benchmark: torch path")
    model = anomalox.PatchCore(
        image_size=256,
        coreset_ratio=0.1,
        num_neighbors=9,
        validation_fraction=0,
        random_state=0,
        batch_size=16,
        n_threads=THREADS,
    )
    train = list_train(data, n_train)
    t1 = time.perf_counter()
    model.fit(train)
    fit_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    result = anomalox.evaluate(model, data)
    score_s = time.perf_counter() - t2
    m = result.metrics
    return {
        "path": path,
        "n_train": len(train),
        "n_test": len(result.labels),
        "backbone": type(model.backbone_).__module__ + "." + type(model.backbone_).__name__,
        "tch_loaded": "anomalox_tch" in sys.modules,
        "image_auroc": float(m["image_auroc"]),
        "pixel_auroc": float(m["pixel_auroc"]),
        "aupro": float(m["aupro"]),
        "fit_s": fit_s,
        "score_s": score_s,
        "total_s": fit_s + score_s,
        "process_s": time.perf_counter() - t0,
        "peak_rss_mib": vm_hwm_mib(),
        "torch": torch.__version__,
        "file": anomalox.__file__,
    }


# --------------------------------------------------------------------------- parent


def spawn(python: str, cwd: str, child_args: list[str], timeout: float) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS), RAYON_NUM_THREADS=str(THREADS))
    env.pop("PYTHONPATH", None)
    argv = [python, os.path.abspath(__file__), "--child", *child_args]
    t0 = time.perf_counter()
    p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"child {child_args} in {python} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = wall
    if p.stderr.strip():
        out["stderr_tail"] = p.stderr.strip()[-500:]
    return out


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def rng_s(xs: list[float]) -> str:
    return f"{min(xs):.3f}–{max(xs):.3f}"


def part_import(args, builds) -> dict:
    specs = [("OLD", "old", "torch"), ("NEW", "new", "core"), ("NEW + anomalox.PatchCore", "new", "patchcore")]
    runs: dict[str, list[dict]] = {s[0]: [] for s in specs}
    for i in range(args.pairs):
        for label, build, mode in specs:
            py, cwd = builds[build]
            r = spawn(py, cwd, ["import", mode], 120)
            runs[label].append(r)
            log(f"  import [{i}] {label}: {r['import_s']:.3f}s (process {r['process_wall_s']:.3f}s) {r['file']}")
    old = [r["import_s"] for r in runs["OLD"]]
    new = [r["import_s"] for r in runs["NEW"]]
    ratios = [n / o for n, o in zip(new, old)]
    pc = [r["import_and_attr_s"] for r in runs["NEW + anomalox.PatchCore"]]
    print(f"\n`import anomalox`, fresh subprocess per run, {args.pairs} interleaved rounds (OLD, NEW, NEW+PatchCore)\n")
    print("| build | what is timed | torch imported | median | range | median process wall |")
    print("|---|---|---|---:|---:|---:|")
    for label, xs, what in (
        ("OLD", old, "`import anomalox`"),
        ("NEW", new, "`import anomalox`"),
        ("NEW", pc, "`import anomalox; anomalox.PatchCore`"),
    ):
        key = {"OLD": "OLD"}.get(label, "NEW" if "PatchCore" not in what else "NEW + anomalox.PatchCore")
        rs = runs[key]
        ti = {r["torch_imported"] for r in rs}
        walls = [r["process_wall_s"] for r in rs]
        print(
            f"| {label} | {what} | {', '.join(map(str, sorted(ti)))} | {med(xs):.3f} s | {rng_s(xs)} s | {med(walls):.3f} s |"
        )
    print(f"\nNEW/OLD `import anomalox`: median of per-round ratios {med(ratios):.3f} ({rng_s(ratios)})")
    return {"runs": runs, "ratio_new_old_median": med(ratios), "pairs": args.pairs}


def part_kernels(args, builds) -> dict:
    kernels = args.kernels.split(",") if args.kernels else list(KERNELS)
    runs = {k: {"OLD": [], "NEW": []} for k in kernels}
    for i in range(args.pairs):
        for k in kernels:
            order = ("OLD", "NEW") if i % 2 == 0 else ("NEW", "OLD")
            for label in order:
                py, cwd = builds[label.lower()]
                r = spawn(py, cwd, ["kernel", k], 300)
                runs[k][label].append(r)
                log(f"  {k} [{i}] {label}: best {r['best_s']:.4f}s {r['result_type']} check={r['check']:.6g}")
    print(
        f"\nKernels, {THREADS} threads, fresh child per (build, kernel), best of 3 in-process; "
        f"{args.pairs} interleaved rounds (OLD first in even rounds, NEW first in odd)\n"
    )
    print(
        "| kernel | OLD median (range) | NEW median (range) | NEW/OLD (median of rounds) | ratio range | results equal |"
    )
    print("|---|---:|---:|---:|---:|---|")
    summary = {}
    for k in kernels:
        o = [r["best_s"] for r in runs[k]["OLD"]]
        n = [r["best_s"] for r in runs[k]["NEW"]]
        ratios = [b / a for a, b in zip(o, n)]
        checks = {r["check"] for r in runs[k]["OLD"] + runs[k]["NEW"]}
        eq = "yes" if len(checks) == 1 else f"no ({sorted(checks)})"
        summary[k] = {"old_median_s": med(o), "new_median_s": med(n), "ratio_median": med(ratios), "ratios": ratios}
        print(
            f"| {KERNEL_DOC[k]} | {med(o) * 1e3:.1f} ms ({min(o) * 1e3:.1f}–{max(o) * 1e3:.1f}) | "
            f"{med(n) * 1e3:.1f} ms ({min(n) * 1e3:.1f}–{max(n) * 1e3:.1f}) | {med(ratios):.3f} | "
            f"{min(ratios):.3f}–{max(ratios):.3f} | {eq} |"
        )
    return {"runs": runs, "summary": summary, "pairs": args.pairs}


def part_patchcore(args, builds) -> dict:
    py, cwd = builds["new"]
    runs = []
    for i, path in enumerate(args.order.split(",")):
        log(f"  patchcore [{i}] {path} ...")
        r = spawn(py, cwd, ["patchcore", path, args.data, str(args.train)], 540)
        runs.append(r)
        log(
            f"  patchcore [{i}] {path}: fit {r['fit_s']:.1f}s score {r['score_s']:.1f}s "
            f"img {r['image_auroc']:.6f} pix {r['pixel_auroc']:.6f} aupro {r['aupro']:.6f} "
            f"peak {r['peak_rss_mib']:.0f} MiB {r['backbone']}"
        )
    print(
        f"\nPatchCore on Magnetic Tile, NEW build, {runs[0]['n_train']} train / {runs[0]['n_test']} test, order {args.order}\n"
    )
    print("| run | path | backbone | image AUROC | pixel AUROC | AUPRO | fit | score (evaluate) | total | peak RSS |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for i, r in enumerate(runs):
        print(
            f"| {i + 1} | {r['path']} | `{r['backbone']}` | {r['image_auroc']:.6f} | {r['pixel_auroc']:.6f} | "
            f"{r['aupro']:.6f} | {r['fit_s']:.1f} s | {r['score_s']:.1f} s | {r['total_s']:.1f} s | "
            f"{r['peak_rss_mib']:.0f} MiB |"
        )
    by = {p: [r for r in runs if r["path"] == p] for p in ("tch", "torch")}
    out = {"runs": runs}
    if by["tch"] and by["torch"]:
        t, q = by["tch"], by["torch"]
        for key in ("fit_s", "score_s", "total_s"):
            out[f"ratio_{key}"] = med([r[key] for r in q]) / med([r[key] for r in t])
        for key in ("image_auroc", "pixel_auroc", "aupro"):
            out[f"maxdiff_{key}"] = max(abs(a[key] - b[key]) for a in t for b in q)
        print(
            "\ntorch/tch (medians per path): fit {ratio_fit_s:.2f}×, score {ratio_score_s:.2f}×, total "
            "{ratio_total_s:.2f}×; largest |Δ| image AUROC {maxdiff_image_auroc:.2e}, pixel AUROC "
            "{maxdiff_pixel_auroc:.2e}, AUPRO {maxdiff_aupro:.2e}".format(**out)
        )
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "import":
            out = child_import(rest[0])
        elif kind == "kernel":
            out = child_kernel(rest[0])
        else:
            out = child_patchcore(rest[0], rest[1], int(rest[2]))
        print(json.dumps(out))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("import", "kernels", "patchcore"), required=True)
    p.add_argument("--pairs", type=int, default=None, help="interleaved rounds (import: 9, kernels: 5)")
    p.add_argument("--kernels", default=None, help=f"comma list of {','.join(KERNELS)}")
    p.add_argument("--order", default="tch,torch,torch,tch", help="patchcore children, e.g. tch,torch")
    p.add_argument("--train", type=int, default=100, help="first N sorted train/good images")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--old-python", default="/work/main/.venv/bin/python")
    p.add_argument("--old-root", default="/work/main")
    p.add_argument("--new-python", default=os.path.join(ROOT, ".venv", "bin", "python"))
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.pairs is None:
        args.pairs = 9 if args.part == "import" else 5
    builds = {"old": (args.old_python, args.old_root), "new": (args.new_python, ROOT)}
    t0 = time.time()
    load0 = os.getloadavg()
    res = {"import": part_import, "kernels": part_kernels, "patchcore": part_patchcore}[args.part](args, builds)
    res.update(
        part=args.part,
        command="python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        builds={k: list(v) for k, v in builds.items()},
        threads=THREADS,
        load_average_start=load0,
        load_average_end=os.getloadavg(),
        wall_s=time.time() - t0,
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    log(f"load average {load0} -> {res['load_average_end']}, wall {res['wall_s']:.0f}s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
