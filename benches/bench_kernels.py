#!/usr/bin/env python3
"""Side-by-side kernel benchmarks: anomalox vs. its peers (anomalib 2.7.0, faiss-cpu).

Each kernel is timed interleaved (anomalox, peer, anomalox, peer, ...) at a fixed
thread count, and the median and spread (min-max) over the pairs are reported,
together with accuracy-agreement checks between the implementations.

Kernels (``--only``):
  knn      PatchCore scoring: anomalox ops.knn vs faiss IndexFlatL2 vs
           anomalib PatchcoreModel.nearest_neighbors; plus peak-RSS of each
           (fresh subprocess per method, RSS polled from the parent every 5 ms).
  coreset  k-center-greedy: anomalox ops.coreset vs anomalib KCenterGreedy;
           time and coverage (max distance to the nearest selected point, in the
           original space), one seed per pair.
  padim    Gaussian fit: anomalox ops.gaussian_fit and ops.GaussianAccumulator
           vs anomalib MultiVariateGaussian.forward; plus Mahalanobis scoring vs
           anomalib's PaDiM AnomalyMapGenerator.compute_distance.
  blur     post-processing: upsample + Gaussian blur (sigma 4): anomalox
           ops.upsample + ops.gaussian_blur vs anomalib's AnomalyMapGenerators
           (PaDiM: bilinear, align_corners=False; PatchCore: F.interpolate's
           default "nearest"), both then GaussianBlur2d(kernel 33, reflect).

Usage (inside the bench venv, see benches/setup_env.sh):
  python benches/bench_kernels.py --quick
  python benches/bench_kernels.py --only knn,coreset --pairs 5 --json out.json
  python benches/bench_kernels.py --quick --peers-only   # no anomalox needed

Markdown goes to stdout, diagnostics to stderr.
"""

from __future__ import annotations

import os

# anomalib's KCenterGreedy wraps its loop in tqdm; keep stderr clean (tqdm>=4.66
# honours TQDM_* environment overrides). Set before anything imports tqdm.
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import gc
import json
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=UserWarning)

# --------------------------------------------------------------------------- sizes

FULL = {
    "knn": dict(m=6272, n=16384, d=1536, k=9),
    "coreset": dict(n=31360, d=1536, ratio=0.1, projection_dim=128),
    "padim": dict(b=200, c=100, h=56, w=56, acc_batch=32, test_b=32, eps=0.01),
    "blur": dict(b=100, h=28, w=28, out=224, sigma=4.0),
}
QUICK = {
    "knn": dict(m=1568, n=4096, d=1536, k=9),
    "coreset": dict(n=4096, d=1536, ratio=0.1, projection_dim=128),
    "padim": dict(b=40, c=100, h=28, w=28, acc_batch=32, test_b=8, eps=0.01),
    "blur": dict(b=16, h=28, w=28, out=224, sigma=4.0),
}
KERNELS = ("knn", "coreset", "padim", "blur")


def log(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- data


def make_mixture(
    n: int,
    d: int,
    *,
    structure_seed: int,
    sample_seed: int,
    n_clusters: int = 64,
    rank: int = 16,
    noise: float = 0.05,
    chunk: int = 2048,
) -> np.ndarray:
    """Clustered float32 features: a Gaussian mixture of low-rank clusters.

    Centers ~ 3*N(0, I); each cluster spreads along its own rank-``rank`` subspace
    with its own scale, plus small isotropic noise; cluster weights are uneven.
    The same ``structure_seed`` gives the same mixture (so a bank and its queries
    come from one distribution). Filled chunk by chunk so the only large
    allocation is the output (keeps the memory child's baseline clean).
    """
    srng = np.random.default_rng(structure_seed)
    centers = 3.0 * srng.standard_normal((n_clusters, d), dtype=np.float32)
    bases = srng.standard_normal((n_clusters, rank, d), dtype=np.float32) / np.float32(np.sqrt(rank))
    scales = srng.uniform(0.3, 1.0, n_clusters).astype(np.float32)
    weights = srng.dirichlet(np.full(n_clusters, 2.0))
    rng = np.random.default_rng(sample_seed)
    labels = rng.choice(n_clusters, size=n, p=weights)
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, chunk):
        lab = labels[s : s + chunk]
        blk = noise * rng.standard_normal((len(lab), d), dtype=np.float32)
        for c in np.unique(lab):
            m = lab == c
            z = rng.standard_normal((int(m.sum()), rank), dtype=np.float32)
            blk[m] += centers[c] + scales[c] * (z @ bases[c])
        out[s : s + chunk] = blk
    return out


def make_padim_features(b: int, c: int, h: int, w: int, seed: int, rank: int = 20) -> np.ndarray:
    """(B, C, H, W) float32 with correlated channels (shared low-rank mixing + noise)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((c, rank), dtype=np.float32) / np.float32(np.sqrt(rank))
    offset = rng.standard_normal((c, h * w), dtype=np.float32)
    out = np.empty((b, c, h * w), dtype=np.float32)
    for i in range(b):
        z = rng.standard_normal((rank, h * w), dtype=np.float32)
        out[i] = offset + mix @ z + 0.3 * rng.standard_normal((c, h * w), dtype=np.float32)
    return out.reshape(b, c, h, w)


def make_maps(b: int, h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.gamma(2.0, 1.0, size=(b, h, w)).astype(np.float32)


# --------------------------------------------------------------------------- timing


@dataclass
class Timed:
    """Returned by a bench callable to override the wall time it measured."""

    result: Any
    seconds: float
    extra: dict = field(default_factory=dict)


def run_interleaved(
    fns: dict[str, Callable[[int], Any]],
    pairs: dict[str, int] | int,
    *,
    budget_s: dict[str, float] | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[Any]], dict[str, list[dict]], dict[str, str]]:
    """Call fns round-robin (A B A B ...), ``pairs`` rounds; fn(i) gets the round.

    ``pairs`` may be per-fn (fewer rounds for a slow peer); ``budget_s`` stops an
    fn early once its cumulative time would exceed the budget (noted).
    """
    if isinstance(pairs, int):
        pairs = {k: pairs for k in fns}
    budget_s = budget_s or {}
    times: dict[str, list[float]] = {k: [] for k in fns}
    results: dict[str, list[Any]] = {k: [] for k in fns}
    extras: dict[str, list[dict]] = {k: [] for k in fns}
    notes: dict[str, str] = {}
    stopped: set[str] = set()
    for i in range(max(pairs.values())):
        for name, fn in fns.items():
            if i >= pairs[name] or name in stopped:
                continue
            gc.collect()
            t0 = time.perf_counter()
            r = fn(i)
            dt = time.perf_counter() - t0
            if isinstance(r, Timed):
                dt, extras[name] = r.seconds, extras[name] + [r.extra]
                r = r.result
            times[name].append(dt)
            results[name].append(r)
            log(f"    {name} [{i}] {dt:.4f}s")
            b = budget_s.get(name)
            if b is not None and i + 1 < pairs[name]:
                spent = sum(times[name])
                if spent + statistics.median(times[name]) > b:
                    stopped.add(name)
                    notes[name] = f"stopped after {len(times[name])} of {pairs[name]} runs (time budget {b:.0f}s)"
                    log(f"    {name}: {notes[name]}")
    return times, results, extras, notes


def summarize(ts: list[float]) -> dict:
    return {
        "n": len(ts),
        "median_s": statistics.median(ts),
        "min_s": min(ts),
        "max_s": max(ts),
        "times_s": ts,
    }


def fmt_s(x: float) -> str:
    if x >= 100:
        return f"{x:.0f} s"
    if x >= 1:
        return f"{x:.2f} s"
    if x >= 1e-3:
        return f"{x * 1e3:.1f} ms"
    return f"{x * 1e6:.0f} µs"


# --------------------------------------------------------------------------- env


class Env:
    def __init__(self, threads: int, peers_only: bool):
        import torch

        self.threads = threads
        self.torch = torch
        torch.set_num_threads(threads)
        self.ops = None
        if not peers_only:
            import anomalox.ops as ops  # noqa: PLC0415

            self.ops = ops
        self._faiss = None

    @property
    def faiss(self):
        if self._faiss is None:
            import faiss  # noqa: PLC0415

            faiss.omp_set_num_threads(self.threads)
            self._faiss = faiss
        return self._faiss

    def info(self) -> dict:
        import torch

        d = {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "threads": self.threads,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "numpy": np.__version__,
            "loadavg_start": os.getloadavg(),
        }
        for mod in ("anomalib", "faiss", "anomalox"):
            try:
                d[mod] = __import__(mod).__version__
            except Exception as e:  # noqa: BLE001
                d[mod] = f"unavailable ({type(e).__name__})"
        return d


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _rows_row(kernel, size, impl, s, ref_median=None, note=""):
    row = {"kernel": kernel, "size": size, "impl": impl, **s, "note": note}
    if ref_median is not None and impl_is_peer(impl):
        row["anomalox_speedup"] = s["median_s"] / ref_median
    return row


def impl_is_peer(impl: str) -> bool:
    return not impl.startswith("anomalox")


# --------------------------------------------------------------------------- kNN


def _patchcore_holder(bank_t):
    """A real PatchcoreModel (random-init resnet18 backbone, no download) holding
    ``bank_t`` as memory_bank; falls back to a plain object if that fails."""
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    try:
        model = PatchcoreModel(layers=["layer2", "layer3"], backbone="resnet18", pre_trained=False).eval()
        model.memory_bank = bank_t
        return model, "PatchcoreModel(resnet18, pre_trained=False).nearest_neighbors"
    except Exception as e:  # noqa: BLE001
        log(f"  PatchcoreModel construction failed ({e!r}); calling nearest_neighbors unbound")
        holder = types.SimpleNamespace(memory_bank=bank_t, euclidean_dist=PatchcoreModel.euclidean_dist)
        holder.nearest_neighbors = types.MethodType(PatchcoreModel.nearest_neighbors, holder)
        return holder, "PatchcoreModel.nearest_neighbors (unbound, on a holder)"


def knn_data(cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    bank = make_mixture(cfg["n"], cfg["d"], structure_seed=7, sample_seed=1)
    queries = make_mixture(cfg["m"], cfg["d"], structure_seed=7, sample_seed=2)
    return queries, bank


def knn_agreement(d_ref, i_ref, d_oth, i_oth) -> dict:
    d_ref = np.asarray(d_ref, dtype=np.float64)
    d_oth = np.asarray(d_oth, dtype=np.float64)
    i_ref = np.asarray(i_ref)
    i_oth = np.asarray(i_oth)
    k = i_ref.shape[1]
    rows_equal = float(np.mean(np.all(i_ref == i_oth, axis=1)))
    overlap = np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(i_ref, i_oth)])
    first_equal = float(np.mean(i_ref[:, 0] == i_oth[:, 0]))
    rel = np.abs(d_ref - d_oth) / np.maximum(np.abs(d_ref), 1e-12)
    return {
        "rows_identical_frac": rows_equal,
        "nn1_equal_frac": first_equal,
        "recall_at_k": float(overlap),
        "max_rel_dist_diff": float(rel.max()),
    }


def bench_knn(env: Env, cfg: dict, pairs: int, args) -> dict:
    torch, ops, faiss, T = env.torch, env.ops, env.faiss, env.threads
    m, n, d, k = cfg["m"], cfg["n"], cfg["d"], cfg["k"]
    size = f"{m:,} q × {n:,} bank × {d:,} d, k={k}"
    log(f"[knn] {size}")
    queries, bank = knn_data(cfg)
    q_t, bank_t = torch.from_numpy(queries), torch.from_numpy(bank)
    holder, peer_name = _patchcore_holder(bank_t)

    def f_anomalox(_i):
        return ops.knn(queries, bank, k, n_threads=T)

    def f_faiss(_i):
        t0 = time.perf_counter()
        index = faiss.IndexFlatL2(d)
        index.add(bank)
        t1 = time.perf_counter()
        dist2, idx = index.search(queries, k)
        t2 = time.perf_counter()
        return Timed((np.sqrt(np.maximum(dist2, 0)), idx), t2 - t1, {"add_s": t1 - t0})

    def f_anomalib(_i):
        with torch.no_grad():
            return holder.nearest_neighbors(embedding=q_t, n_neighbors=k)

    fns = {}
    if ops is not None:
        fns["anomalox ops.knn"] = f_anomalox
    fns["faiss IndexFlatL2.search"] = f_faiss
    fns[f"anomalib {peer_name}"] = f_anomalib
    # warm-up (thread pools, BLAS init) on a slice
    for fn_name in fns:
        log(f"  warm-up {fn_name}")
    small_q = queries[:256]
    if ops is not None:
        ops.knn(small_q, bank, k, n_threads=T)
    idx0 = faiss.IndexFlatL2(d)
    idx0.add(bank)
    idx0.search(small_q, k)
    with torch.no_grad():
        holder.nearest_neighbors(embedding=q_t[:256], n_neighbors=k)
    times, results, extras, notes = run_interleaved(fns, pairs)

    out: dict[str, Any] = {"size": size, "rows": [], "accuracy": {}, "memory": {}}
    ref = times.get("anomalox ops.knn")
    ref_med = statistics.median(ref) if ref else None
    for name, ts in times.items():
        note = ""
        if name.startswith("faiss"):
            adds = [e["add_s"] for e in extras[name]]
            note = f"search only; add() {fmt_s(statistics.median(adds))} extra; returns squared L2"
        if name.startswith("anomalib"):
            note = "chunks queries by 1024 (DEFAULT_CHUNK_SIZE), full matmul + topk per chunk"
        out["rows"].append(_rows_row("knn", size, name, summarize(ts), ref_med, note))

    # accuracy (last results of each)
    names = list(results)
    d_f, i_f = results[[x for x in names if x.startswith("faiss")][0]][-1]
    d_b, i_b = results[[x for x in names if x.startswith("anomalib")][0]][-1]
    d_b, i_b = d_b.numpy(), i_b.numpy()
    if ops is not None:
        d_a, i_a = results["anomalox ops.knn"][-1]
        out["accuracy"]["anomalox_vs_faiss"] = knn_agreement(d_f, i_f, d_a, i_a)
        out["accuracy"]["anomalox_vs_anomalib"] = knn_agreement(d_b, i_b, d_a, i_a)
        out["accuracy"]["anomalox_dtypes"] = f"{np.asarray(d_a).dtype}/{np.asarray(i_a).dtype}"
    out["accuracy"]["anomalib_vs_faiss"] = knn_agreement(d_f, i_f, d_b, i_b)

    if not args.no_memory:
        methods = (["anomalox"] if ops is not None else []) + ["faiss", "anomalib"]
        for meth in methods:
            log(f"  memory child: {meth}")
            out["memory"][meth] = measure_knn_memory(meth, cfg, env.threads)
            log(f"    {out['memory'][meth]}")
    return out


# ---- peak memory: one fresh subprocess per method; parent polls its RSS


def measure_knn_memory(method: str, cfg: dict, threads: int, poll_s: float = 0.005) -> dict:
    import psutil

    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--_mem-child",
        method,
        "--_mem-cfg",
        json.dumps(cfg),
        "--threads",
        str(threads),
    ]
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    line = ""
    for _ in range(1000):  # skip anything a library prints on import
        line = child.stdout.readline()
        if not line or line.startswith("READY"):
            break
    if not line.startswith("READY"):
        child.kill()
        return {"error": f"child did not start (rc={child.wait()})"}
    proc = psutil.Process(child.pid)
    base = proc.memory_info().rss
    peak = [base]
    samples = [0]
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            try:
                r = proc.memory_info().rss
            except psutil.Error:
                break
            samples[0] += 1
            if r > peak[0]:
                peak[0] = r
            time.sleep(poll_s)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    child.stdin.write("go\n")
    child.stdin.flush()
    res_line = child.stdout.readline()
    while res_line and not res_line.startswith("{"):
        res_line = child.stdout.readline()
    stop.set()
    th.join()
    child.stdin.close()
    child.wait(timeout=60)
    try:
        res = json.loads(res_line)
    except json.JSONDecodeError:
        return {"error": f"bad child output {res_line!r}"}
    res.update(
        baseline_rss_mib=base / 2**20,
        peak_rss_increase_mib=(peak[0] - base) / 2**20,
        polls=samples[0],
    )
    # the larger of the two estimates (polling can miss a spike < poll_s)
    res["peak_increase_mib"] = max(res["peak_rss_increase_mib"], res.get("maxrss_increase_mib", 0.0))
    return res


def mem_child(method: str, cfg: dict, threads: int) -> None:
    import psutil
    import torch

    torch.set_num_threads(threads)
    queries, bank = knn_data(cfg)
    k = cfg["k"]
    if method == "anomalox":
        import anomalox.ops as ops

        def call():
            return ops.knn(queries, bank, k, n_threads=threads)

        ops.knn(queries[:64], bank[:256], k, n_threads=threads)
    elif method == "faiss":
        import faiss

        faiss.omp_set_num_threads(threads)
        index = faiss.IndexFlatL2(cfg["d"])
        index.add(bank)  # the index holds its own copy of the bank: counted in the baseline

        def call():
            return index.search(queries, k)

        index.search(queries[:64], k)
    elif method == "anomalib":
        q_t, bank_t = torch.from_numpy(queries), torch.from_numpy(bank)
        holder, _ = _patchcore_holder(bank_t)

        def call():
            with torch.no_grad():
                return holder.nearest_neighbors(embedding=q_t, n_neighbors=k)

        with torch.no_grad():
            holder.nearest_neighbors(embedding=q_t[:64], n_neighbors=k)
    else:
        raise SystemExit(f"unknown method {method}")
    gc.collect()
    ru0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rss0 = psutil.Process().memory_info().rss
    print("READY", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    r = call()
    dt = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del r
    print(
        json.dumps(
            {
                "method": method,
                "seconds": dt,
                # ru_maxrss is a lifetime high-water mark: this is a lower bound, 0 if the
                # call's peak stayed below what setup had already reached
                "maxrss_increase_mib": max(0, ru1 - max(ru0, rss0)) / 2**20,
                "setup_maxrss_over_rss_mib": (ru0 - rss0) / 2**20,
            }
        ),
        flush=True,
    )


# --------------------------------------------------------------------------- coreset


def bench_coreset(env: Env, cfg: dict, pairs: int, args) -> dict:
    torch, ops, T = env.torch, env.ops, env.threads
    from anomalib.models.components import KCenterGreedy

    n, d, ratio, pdim = cfg["n"], cfg["d"], cfg["ratio"], cfg["projection_dim"]
    size = f"{ratio:g} of {n:,} × {d:,}"
    log(f"[coreset] {size}")
    feats = make_mixture(n, d, structure_seed=11, sample_seed=3)
    feats_t = torch.from_numpy(feats)

    def f_anomalox(i):
        return np.asarray(ops.coreset(feats, ratio, projection_dim=pdim, seed=i, n_threads=T))

    proj_dims: list[int] = []

    def f_anomalib(i):
        # KCenterGreedy draws its start point with torch; its SparseRandomProjection
        # draws row nnz counts / signs with torch and column indices with numpy's
        # global RNG (sample_without_replacement, random_state=None): seed both.
        torch.manual_seed(i)
        np.random.seed(i)
        sampler = KCenterGreedy(embedding=feats_t, sampling_ratio=ratio)
        idx = sampler.select_coreset_idxs()
        proj_dims.append(int(sampler.features.shape[1]))
        return np.asarray(idx, dtype=np.int64)

    fns = {}
    if ops is not None:
        fns["anomalox ops.coreset"] = f_anomalox
        ops.coreset(feats[:2048], 0.05, projection_dim=pdim, seed=0, n_threads=T)  # warm-up
    fns["anomalib KCenterGreedy.select_coreset_idxs"] = f_anomalib
    # warm-up for anomalib on a slice
    torch.manual_seed(0)
    KCenterGreedy(embedding=feats_t[:2048], sampling_ratio=0.05).select_coreset_idxs()
    peer_pairs = args.coreset_peer_pairs or pairs
    times, results, _extras, notes = run_interleaved(
        fns,
        {k: (peer_pairs if impl_is_peer(k) else pairs) for k in fns},
        budget_s={k: args.coreset_peer_budget for k in fns if impl_is_peer(k)},
    )

    def coverage(idx: np.ndarray) -> float:
        if ops is not None:
            dist, _ = ops.knn(feats, feats[idx], 1, n_threads=T)
            return float(np.asarray(dist).max())
        # peers-only fallback: torch cdist in chunks
        sel = feats_t[torch.from_numpy(idx)]
        best = 0.0
        for s in range(0, n, 4096):
            best = max(best, float(torch.cdist(feats_t[s : s + 4096], sel).min(1).values.max()))
        return best

    out: dict[str, Any] = {"size": size, "rows": [], "coverage": {}, "accuracy": {}}
    ref = times.get("anomalox ops.coreset")
    ref_med = statistics.median(ref) if ref else None
    for name, ts in times.items():
        covs = [coverage(ix) for ix in results[name]]
        sizes = sorted({len(ix) for ix in results[name]})
        uniq = all(len(np.unique(ix)) == len(ix) for ix in results[name])
        out["coverage"][name] = {
            "per_seed": covs,
            "median": statistics.median(covs),
            "coreset_sizes": sizes,
            "all_unique": uniq,
        }
        note = notes.get(name, "")
        if name.startswith("anomalib"):
            pd = sorted(set(proj_dims))
            note = (note + "; " if note else "") + (
                f"SparseRandomProjection(eps=0.9) → {pd} dims (JL bound), dense matmul; "
                "torch.linalg.norm over all rows per step"
            )
        else:
            note = f"projection_dim={pdim}"
        row = _rows_row("coreset", size, name, summarize(ts), ref_med, note)
        row["coverage_median"] = out["coverage"][name]["median"]
        out["rows"].append(row)
    if ops is not None:
        ca = out["coverage"]["anomalox ops.coreset"]["median"]
        cb = out["coverage"]["anomalib KCenterGreedy.select_coreset_idxs"]["median"]
        out["accuracy"]["coverage_ratio_anomalox_over_anomalib"] = ca / cb
        # cross-check ops.coreset_coverage against the knn-based coverage
        ix = results["anomalox ops.coreset"][0]
        out["accuracy"]["ops.coreset_coverage_vs_knn"] = {
            "coreset_coverage": float(ops.coreset_coverage(feats, ix, n_threads=T)),
            "knn_max": out["coverage"]["anomalox ops.coreset"]["per_seed"][0],
        }
    return out


# --------------------------------------------------------------------------- PaDiM


def bench_padim(env: Env, cfg: dict, pairs: int, args) -> dict:
    torch, ops, T = env.torch, env.ops, env.threads
    from anomalib.models.components import MultiVariateGaussian
    from anomalib.models.image.padim.anomaly_map import AnomalyMapGenerator as PadimMapGen

    b, c, h, w, eps, bs = cfg["b"], cfg["c"], cfg["h"], cfg["w"], cfg["eps"], cfg["acc_batch"]
    size = f"{b} × {c} × {h} × {w}"
    log(f"[padim] {size}")
    feats = make_padim_features(b, c, h, w, seed=5)
    feats_t = torch.from_numpy(feats)

    def make_acc():
        try:
            return ops.GaussianAccumulator(n_threads=T)
        except TypeError:
            return ops.GaussianAccumulator()

    def f_fit(_i):
        return ops.gaussian_fit(feats, eps=eps, n_threads=T)

    def f_acc(_i):
        acc = make_acc()
        for s in range(0, b, bs):
            acc.partial_fit(feats[s : s + bs])
        return acc.finalize(eps=eps)

    def f_anomalib(_i):
        with torch.no_grad():
            mean, inv = MultiVariateGaussian().forward(feats_t)
        return mean, inv

    fns = {}
    if ops is not None:
        fns["anomalox ops.gaussian_fit"] = f_fit
        fns[f"anomalox GaussianAccumulator (batches of {bs})"] = f_acc
        ops.gaussian_fit(np.ascontiguousarray(feats[:4, :, :4, :4]), eps=eps, n_threads=T)  # warm-up
    fns["anomalib MultiVariateGaussian.forward"] = f_anomalib
    MultiVariateGaussian().forward(feats_t[:4, :, :4, :4].contiguous())
    times, results, _e, notes = run_interleaved(fns, pairs)

    out: dict[str, Any] = {"size": size, "rows": [], "accuracy": {}}
    ref = times.get("anomalox ops.gaussian_fit")
    ref_med = statistics.median(ref) if ref else None
    for name, ts in times.items():
        note = ""
        if name.startswith("anomalib"):
            note = "python loop of H*W torch covs, +0.01 I +1e-5 I, batched torch.linalg.inv"
        elif name.startswith("anomalox GaussianAccumulator"):
            peer_med = statistics.median(times["anomalib MultiVariateGaussian.forward"])
            note = f"streaming; anomalib median / this = {peer_med / statistics.median(ts):.2f}×"
        out["rows"].append(_rows_row("padim-fit", size, name, summarize(ts), ref_med, note))

    mean_b, inv_b = results["anomalib MultiVariateGaussian.forward"][-1]
    mean_b = mean_b.numpy().T  # anomalib: (C, H*W) -> (H*W, C)
    inv_b = inv_b.numpy()
    if ops is not None:
        # anomalib regularises with 0.01 + 1e-5 on the diagonal: match it for the check
        mean_a, inv_a = ops.gaussian_fit(feats, eps=eps + 1e-5, n_threads=T)
        mean_a, inv_a = np.asarray(mean_a), np.asarray(inv_a)
        out["accuracy"]["gaussian_fit_vs_anomalib"] = _inv_agreement(mean_a, inv_a, mean_b, inv_b)
        mean_c, inv_c = results[f"anomalox GaussianAccumulator (batches of {bs})"][-1]
        mean_f, inv_f = results["anomalox ops.gaussian_fit"][-1]
        out["accuracy"]["accumulator_vs_gaussian_fit"] = _inv_agreement(
            np.asarray(mean_c), np.asarray(inv_c), np.asarray(mean_f), np.asarray(inv_f)
        )
        out["accuracy"]["gaussian_fit(eps=0.01)_vs_anomalib(0.01+1e-5)"] = _inv_agreement(
            np.asarray(mean_f), np.asarray(inv_f), mean_b, inv_b
        )

        # Mahalanobis scoring on a test batch, with each side's own fitted stats
        tb = cfg["test_b"]
        test = make_padim_features(tb, c, h, w, seed=6)
        test_t = torch.from_numpy(test)
        # both sides score with anomalib's fitted stats, so the check isolates the kernel
        mean_bt, inv_bt = results["anomalib MultiVariateGaussian.forward"][-1]
        mean_h, inv_h = np.ascontiguousarray(mean_b), np.ascontiguousarray(inv_b)

        def f_maha(_i):
            return ops.mahalanobis(test, mean_h, inv_h, n_threads=T)

        def f_maha_b(_i):
            with torch.no_grad():
                return PadimMapGen.compute_distance(test_t, [mean_bt, inv_bt])

        f_maha(0)
        f_maha_b(0)
        log(f"[padim] mahalanobis {tb} × {c} × {h} × {w}")
        mt, mr, _e, _n = run_interleaved(
            {"anomalox ops.mahalanobis": f_maha, "anomalib PaDiM AnomalyMapGenerator.compute_distance": f_maha_b},
            pairs,
        )
        msize = f"{tb} × {c} × {h} × {w} vs {h * w} Gaussians"
        mref = statistics.median(mt["anomalox ops.mahalanobis"])
        for name, ts in mt.items():
            note = "returns sqrt'd distance, (B,1,H,W)" if impl_is_peer(name) else ""
            out["rows"].append(_rows_row("mahalanobis", msize, name, summarize(ts), mref, note))
        da = np.asarray(mr["anomalox ops.mahalanobis"][-1], dtype=np.float64)
        db = mr["anomalib PaDiM AnomalyMapGenerator.compute_distance"][-1].numpy()[:, 0].astype(np.float64)
        out["accuracy"]["mahalanobis_vs_anomalib"] = {
            "shape": list(da.shape),
            "max_rel_diff_as_is": float(np.max(np.abs(da - db) / np.maximum(db, 1e-12))),
            "max_rel_diff_if_squared": float(np.max(np.abs(da - db**2) / np.maximum(db**2, 1e-12))),
        }
    return out


def _inv_agreement(mean_a, inv_a, mean_b, inv_b) -> dict:
    fro = np.concatenate(
        [
            np.linalg.norm(inv_a[s : s + 256].astype(np.float64) - inv_b[s : s + 256], axis=(1, 2))
            / np.linalg.norm(inv_b[s : s + 256].astype(np.float64), axis=(1, 2))
            for s in range(0, len(inv_b), 256)
        ]
    )
    return {
        "shapes": [list(mean_a.shape), list(inv_a.shape), list(mean_b.shape), list(inv_b.shape)],
        "mean_max_abs_diff": float(np.abs(mean_a.astype(np.float64) - mean_b).max()),
        "inv_cov_max_rel_fro_diff": float(fro.max()),
        "inv_cov_median_rel_fro_diff": float(np.median(fro)),
    }


# --------------------------------------------------------------------------- blur


def bench_blur(env: Env, cfg: dict, pairs: int, args) -> dict:
    torch, ops, T = env.torch, env.ops, env.threads
    import torch.nn.functional as F
    from anomalib.models.image.padim.anomaly_map import AnomalyMapGenerator as PadimMapGen
    from anomalib.models.image.patchcore.anomaly_map import AnomalyMapGenerator as PatchcoreMapGen

    b, h, w, out_sz, sigma = cfg["b"], cfg["h"], cfg["w"], cfg["out"], cfg["sigma"]
    maps = make_maps(b, h, w, seed=9)
    maps_t = torch.from_numpy(maps).unsqueeze(1)  # anomalib wants (B, 1, h, w)
    padim_gen = PadimMapGen(sigma=int(sigma))
    patch_gen = PatchcoreMapGen(sigma=int(sigma))
    size_ = (out_sz, out_sz)
    out: dict[str, Any] = {"rows": [], "accuracy": {}}

    for mode, peer_name, peer in (
        (
            "bilinear",
            "anomalib PaDiM AnomalyMapGenerator (bilinear, align_corners=False) + GaussianBlur2d",
            lambda: padim_gen.smooth_anomaly_map(padim_gen.up_sample(maps_t, size_)),
        ),
        (
            "nearest",
            "anomalib PatchCore AnomalyMapGenerator (F.interpolate default 'nearest') + GaussianBlur2d",
            lambda: patch_gen(maps_t, size_),
        ),
    ):
        size = f"{b} maps {h}×{w} → {out_sz}×{out_sz}, {mode}, σ={sigma:g}"
        log(f"[blur] {size}")

        def f_anomalox(_i, mode=mode):
            up = ops.upsample(maps, size_, mode=mode, n_threads=T)
            return ops.gaussian_blur(up, sigma=sigma, n_threads=T)

        def f_peer(_i, peer=peer):
            with torch.no_grad():
                return peer()

        fns = {}
        if ops is not None:
            fns[f"anomalox ops.upsample({mode}) + ops.gaussian_blur"] = f_anomalox
            f_anomalox(0)
        fns[peer_name] = f_peer
        f_peer(0)
        times, results, _e, _n = run_interleaved(fns, pairs)
        ref = times.get(f"anomalox ops.upsample({mode}) + ops.gaussian_blur")
        ref_med = statistics.median(ref) if ref else None
        for name, ts in times.items():
            note = "kernel 33×33 (2*int(4σ+.5)+1), reflect pad, dense 2-D conv" if impl_is_peer(name) else ""
            out["rows"].append(_rows_row(f"postproc-{mode}", size, name, summarize(ts), ref_med, note))
        if ops is not None:
            a = np.asarray(results[f"anomalox ops.upsample({mode}) + ops.gaussian_blur"][-1], dtype=np.float64)
            p = results[peer_name][-1].numpy()[:, 0].astype(np.float64)
            scale = np.abs(p).max()
            m = int(4.0 * sigma + 0.5)  # kernel radius: interior is unaffected by border mode
            up_a = np.asarray(ops.upsample(maps, size_, mode=mode, n_threads=T), dtype=np.float64)
            up_p = F.interpolate(
                maps_t, size=size_, mode=mode, **({"align_corners": False} if mode == "bilinear" else {})
            )
            up_p = up_p.numpy()[:, 0].astype(np.float64)
            out["accuracy"][f"postproc_{mode}"] = {
                "shape": list(a.shape),
                "max_abs_diff_over_max": float(np.abs(a - p).max() / scale),
                "interior_max_abs_diff_over_max": float(np.abs(a - p)[:, m:-m, m:-m].max() / scale),
                "upsample_only_max_abs_diff_over_max": float(np.abs(up_a - up_p).max() / np.abs(up_p).max()),
            }
    return out


# --------------------------------------------------------------------------- report


def markdown(report: dict) -> str:
    lines = []
    info = report["env"]
    lines.append(f"# anomalox kernel benchmarks ({'quick' if report['quick'] else 'full'} sizes)\n")
    lines.append(
        f"CPU: {info['cpu']} ({info['cpu_count']} logical), threads={info['threads']}; "
        f"torch {info['torch']}, anomalib {info['anomalib']}, faiss {info['faiss']}, "
        f"anomalox {info['anomalox']}; load avg at start {tuple(round(x, 2) for x in info['loadavg_start'])}, "
        f"at end {tuple(round(x, 2) for x in report.get('loadavg_end', (0, 0, 0)))}.\n"
    )
    lines.append(f"Interleaved A/B, {report['pairs']} pairs unless noted; speedup = peer median / anomalox median.\n")
    lines.append("| kernel | size | implementation | median | min–max | n | anomalox speedup | notes |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for k in report["kernels"]:
        for r in report["results"][k]["rows"]:
            sp = f"{r['anomalox_speedup']:.2f}×" if "anomalox_speedup" in r else ""
            lines.append(
                f"| {r['kernel']} | {r['size']} | {r['impl']} | {fmt_s(r['median_s'])} | "
                f"{fmt_s(r['min_s'])}–{fmt_s(r['max_s'])} | {r['n']} | {sp} | {r['note']} |"
            )
    res = report["results"]
    if "knn" in res and res["knn"].get("memory"):
        lines.append(
            "\n**kNN peak memory** (fresh process per method; RSS polled every 5 ms from the parent, "
            "baseline taken after inputs are allocated and a small warm-up call):\n"
        )
        lines.append("| method | peak RSS increase | baseline RSS | polls during call | call time |")
        lines.append("|---|---|---|---|---|")
        for meth, m in res["knn"]["memory"].items():
            if "error" in m:
                lines.append(f"| {meth} | error: {m['error']} | | | |")
                continue
            lines.append(
                f"| {meth} | {m['peak_increase_mib']:.1f} MiB | "
                f"{m['baseline_rss_mib']:.0f} MiB | {m['polls']} | {fmt_s(m['seconds'])} |"
            )
    if "coreset" in res:
        lines.append(
            "\n**Coreset coverage** (max over all points of the Euclidean distance, in the original "
            "1,536-d space, to the nearest selected point; lower is better; one seed per run):\n"
        )
        lines.append("| implementation | median coverage | per seed | coreset size | unique |")
        lines.append("|---|---|---|---|---|")
        for name, c in res["coreset"]["coverage"].items():
            lines.append(
                f"| {name} | {c['median']:.4f} | {', '.join(f'{x:.3f}' for x in c['per_seed'])} | "
                f"{c['coreset_sizes']} | {c['all_unique']} |"
            )
    lines.append("\n**Accuracy agreement**\n")
    for k in report["kernels"]:
        for name, v in res[k].get("accuracy", {}).items():
            lines.append(f"- {k} / {name}: `{json.dumps(v, default=float)}`")
    targets = report.get("targets")
    if targets:
        lines.append("\n**Targets**\n")
        for t in targets:
            lines.append(f"- {t}")
    return "\n".join(lines) + "\n"


def targets(report: dict) -> list[str]:
    out = []
    res = report["results"]
    c = res.get("coreset")
    if c and "coverage_ratio_anomalox_over_anomalib" in c.get("accuracy", {}):
        sp = [r for r in c["rows"] if "anomalox_speedup" in r][0]["anomalox_speedup"]
        cr = c["accuracy"]["coverage_ratio_anomalox_over_anomalib"]
        out.append(f"coreset speedup ≥ 10×: {sp:.1f}× → {'PASS' if sp >= 10 else 'FAIL'}")
        out.append(f"coreset coverage ≤ 1.02× anomalib's: {cr:.4f}× → {'PASS' if cr <= 1.02 else 'FAIL'}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (script validation)")
    p.add_argument("--pairs", type=int, default=5, help="interleaved A/B rounds per kernel (default 5)")
    p.add_argument("--only", default=",".join(KERNELS), help=f"comma list of {','.join(KERNELS)}")
    p.add_argument("--json", help="write the full results (raw times included) to this file")
    p.add_argument("--threads", type=int, default=2, help="threads for every implementation (default 2)")
    p.add_argument("--peers-only", action="store_true", help="skip anomalox (validate the peer half)")
    p.add_argument("--no-memory", action="store_true", help="skip the kNN peak-memory subprocesses")
    p.add_argument(
        "--coreset-peer-pairs", type=int, default=0, help="runs of anomalib's KCenterGreedy (default: --pairs)"
    )
    p.add_argument(
        "--coreset-peer-budget",
        type=float,
        default=900.0,
        help="stop anomalib's coreset runs once they would exceed this many seconds (default 900)",
    )
    p.add_argument("--_mem-child", dest="mem_child", help=argparse.SUPPRESS)
    p.add_argument("--_mem-cfg", dest="mem_cfg", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.mem_child:
        mem_child(args.mem_child, json.loads(args.mem_cfg), args.threads)
        return

    if args.pairs < 1:
        p.error("--pairs must be ≥ 1")
    kernels = [k.strip() for k in args.only.split(",") if k.strip()]
    bad = [k for k in kernels if k not in KERNELS]
    if bad:
        p.error(f"unknown kernel(s) {bad}; choose from {KERNELS}")
    sizes = QUICK if args.quick else FULL
    env = Env(args.threads, args.peers_only)
    report: dict[str, Any] = {
        "quick": args.quick,
        "pairs": args.pairs,
        "kernels": kernels,
        "sizes": {k: sizes[k] for k in kernels},
        "env": env.info(),
        "results": {},
    }
    bench = {"knn": bench_knn, "coreset": bench_coreset, "padim": bench_padim, "blur": bench_blur}
    for k in kernels:
        t0 = time.perf_counter()
        report["results"][k] = bench[k](env, sizes[k], args.pairs, args)
        report["results"][k]["wall_s"] = time.perf_counter() - t0
        report["results"][k]["loadavg_after"] = os.getloadavg()
        log(f"[{k}] done in {report['results'][k]['wall_s']:.1f}s")
    report["loadavg_end"] = os.getloadavg()
    report["targets"] = targets(report)
    md = markdown(report)
    sys.stdout.write(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=float)
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
