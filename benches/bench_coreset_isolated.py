"""Coreset selection, anomalox vs anomalib 2.7.0 KCenterGreedy, each run in its own process.

Interleaved by seed (anomalox, anomalib, anomalox, anomalib, ...) at 2 threads, on the same
clustered features as benches/bench_kernels.py (31,360 × 1,536, 10%). Each run is a fresh
subprocess, so neither library's allocator state affects the other (in one process, anomalib's
loop grew by gigabytes after anomalox had run; see BENCHMARKS.md). Coverage = max over all
points of the Euclidean distance, in the original space, to the nearest selected point.

    .venv-bench/bin/python benches/bench_coreset_isolated.py [--seeds 5] [--projection-dims 128,256]

``--projection-dims``: one anomalox run per seed for each value (default 128, the kernel's default).
anomalib's KCenterGreedy projects with a sparse random projection to the Johnson-Lindenstrauss
dimension for eps = 0.9 (255 dimensions for N = 31,360), so 256 compares at a matched dimension.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import os, sys, time, json
os.environ.setdefault("TQDM_DISABLE", "1")
import numpy as np, torch
sys.path.insert(0, {bench_dir!r})
from bench_kernels import make_mixture
torch.set_num_threads(2)
which, seed, out, proj = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
x = make_mixture(31360, 1536, structure_seed=11, sample_seed=3)
if which == "anomalox":
    from anomalox import ops
    t = time.perf_counter(); idx = np.asarray(ops.coreset(x, 0.1, projection_dim=proj, seed=seed, n_threads=2)); dt = time.perf_counter() - t
else:
    from anomalib.models.components import KCenterGreedy
    torch.manual_seed(seed); np.random.seed(seed)
    t = time.perf_counter(); idx = np.asarray(KCenterGreedy(embedding=torch.from_numpy(x), sampling_ratio=0.1).select_coreset_idxs()); dt = time.perf_counter() - t
rss = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
np.save(out, idx)
print(json.dumps({{"seconds": dt, "peak_rss_mib": rss, "n": int(idx.size), "unique": int(np.unique(idx).size)}}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--projection-dims", default="128", help="comma-separated anomalox projection_dim values")
    args = ap.parse_args()
    bench_dir = os.path.dirname(os.path.abspath(__file__))
    code = CHILD.format(bench_dir=bench_dir)
    sys.path.insert(0, bench_dir)
    import numpy as np

    from anomalox import ops
    from bench_kernels import make_mixture

    x = make_mixture(31360, 1536, structure_seed=11, sample_seed=3)
    dims = [int(p) for p in args.projection_dims.split(",")]
    runs = [("anomalox", p, f"anomalox (projection_dim={p})") for p in dims] + [
        ("anomalib", 0, "anomalib KCenterGreedy")
    ]
    rows: dict[str, list[dict]] = {label: [] for _, _, label in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for which, proj, label in runs:
                out = os.path.join(tmp, f"{which}-{proj}-{seed}.npy")
                cmd = [sys.executable, "-c", code, which, str(seed), out, str(proj)]
                for attempt in range(3):
                    res = subprocess.run(cmd, capture_output=True, text=True)
                    if res.returncode == 0:
                        break
                    # anomalib's loop has been OOM-killed here (its process grew past 23 GB under
                    # plain glibc malloc, see BENCHMARKS.md); that run is reported and retried.
                    print(
                        f"seed {seed} {label}: exit {res.returncode} (attempt {attempt + 1}); "
                        f"{res.stderr.strip()[-300:]}",
                        file=sys.stderr,
                        flush=True,
                    )
                else:
                    raise RuntimeError(f"{label} failed 3 times on seed {seed}")
                r = json.loads(res.stdout.strip().splitlines()[-1])
                r["failed_attempts"] = attempt
                idx = np.load(out)
                r["coverage"] = float(ops.knn(x, x[idx], 1, n_threads=2)[0].max())
                rows[label].append(r)
                print(f"seed {seed} {label}: {r}", file=sys.stderr, flush=True)
    print(f"load average at end: {os.getloadavg()}")
    print("| implementation | median time | min–max | median coverage | coverage per seed | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    med = {}
    for which, rs in rows.items():
        ts = [r["seconds"] for r in rs]
        cs = [r["coverage"] for r in rs]
        med[which] = (statistics.median(ts), statistics.median(cs))
        print(
            f"| {which} | {med[which][0]:.2f} s | {min(ts):.2f}–{max(ts):.2f} s | {med[which][1]:.3f} | "
            f"{', '.join(f'{c:.3f}' for c in cs)} | {statistics.median(r['peak_rss_mib'] for r in rs):.0f} |"
        )
    ref = med["anomalib KCenterGreedy"]
    for _, _, label in runs[:-1]:
        print(
            f"\n{label}: speedup (anomalib median / anomalox median) {ref[0] / med[label][0]:.1f}×; "
            f"coverage ratio (anomalox / anomalib) {med[label][1] / ref[1]:.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
