"""A quick end-to-end run of every kernel on random data, checked against numpy.

Run with ``python -m anomalox.smoke``; it exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

import anomalox
from anomalox import ops


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m anomalox.smoke", description=__doc__)
    parser.add_argument("--n-threads", type=int, default=None, help="threads (default: torch's)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print(
        f"anomalox {anomalox.__version__}, torch {torch.__version__}, "
        f"threads {args.n_threads or torch.get_num_threads()}"
    )
    failures = []

    def check(name: str, ok: bool, seconds: float, detail: str = "") -> None:
        print(f"  {'ok  ' if ok else 'FAIL'} {name:<44} {seconds * 1e3:8.1f} ms  {detail}")
        if not ok:
            failures.append(name)

    q = rng.standard_normal((1024, 384)).astype(np.float32)
    bank = rng.standard_normal((4096, 384)).astype(np.float32)
    (dist, idx), t = _timed(ops.knn, q, bank, 9, n_threads=args.n_threads)
    sub = slice(0, 64)
    ref = np.sqrt(((q[sub, None].astype(np.float64) - bank[None]) ** 2).sum(-1))
    ref_idx = np.argsort(ref, 1)[:, :9]
    check(
        "knn 1024 x 4096 x 384, k=9",
        np.array_equal(idx[sub], ref_idx) and np.allclose(dist[sub], np.take_along_axis(ref, ref_idx, 1), rtol=1e-4),
        t,
    )

    feats = rng.standard_normal((8000, 256)).astype(np.float32)
    sel, t = _timed(ops.coreset, feats, 0.1, n_threads=args.n_threads)
    check(
        "coreset 10% of 8000 x 256", len(np.unique(sel)) == 800, t, f"coverage {ops.coreset_coverage(feats, sel):.3f}"
    )

    maps = rng.standard_normal((32, 40, 8, 8)).astype(np.float32)
    (mean, inv_cov), t = _timed(ops.gaussian_fit, maps, n_threads=args.n_threads)
    e = maps.astype(np.float64).reshape(32, 40, 64)
    ref_cov = np.cov(e[:, :, 5], rowvar=False) + 0.01 * np.eye(40)
    check("gaussian_fit 32 x 40 x 8 x 8", np.allclose(inv_cov[5], np.linalg.inv(ref_cov), rtol=1e-4, atol=1e-5), t)
    dmap, t = _timed(ops.mahalanobis, maps[:4], mean, inv_cov, n_threads=args.n_threads)
    d = e[:4, :, 5] - mean[5]
    check(
        "mahalanobis 4 x 40 x 8 x 8",
        np.allclose(dmap[:, 0, 5], np.sqrt(np.einsum("bc,cd,bd->b", d, inv_cov[5], d)), rtol=1e-4),
        t,
    )

    small = rng.standard_normal((100, 28, 28)).astype(np.float32)
    up, t = _timed(ops.upsample, small, (224, 224), n_threads=args.n_threads)
    ref_up = torch.nn.functional.interpolate(
        torch.from_numpy(small)[:, None], size=(224, 224), mode="bilinear", align_corners=False
    )[:, 0].numpy()
    check("upsample 100 x 28^2 -> 224^2", np.allclose(up, ref_up, atol=1e-5), t)
    blurred, t = _timed(ops.gaussian_blur, up, 4.0, n_threads=args.n_threads)
    check("gaussian_blur 100 x 224^2, sigma 4", bool(np.isfinite(blurred).all()) and blurred.std() < up.std(), t)

    print("smoke run:", "all checks passed" if not failures else f"FAILED: {', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
