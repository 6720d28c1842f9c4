#!/usr/bin/env python3
"""Every anomalox detector with its default parameters on one category, through ``anomalox.compare``.

The first ``--train`` (100) images of ``train/good`` in sorted order are every detector's training
images; the whole ``test`` folder (with ``ground_truth`` masks) its test set. Each detector runs in
its own process (``compare``), one after another, with ``n_threads`` = ``--threads`` and
``random_state=0``; everything else is the class default (256 px, Lite0 backbone, held-out
calibration of 10 % of the training images). The table (markdown on stdout), the JSON and the HTML
page of ``anomalox.report.write_comparison_report`` are written.

Usage:
  PYTHONPATH=python:tch/python .venv/bin/python benches/bench_compare.py
  PYTHONPATH=python:tch/python .venv/bin/python benches/bench_compare.py --only patchcore,fre --train 40
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(os.path.dirname(ROOT), "shared", "datasets", "magnetic_tile")
ORDER = ("patchcore", "padim", "spade", "dfm", "fre", "stfpm", "reverse_distillation", "fastflow", "supersimplenet")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="MVTec-layout category folder")
    p.add_argument("--train", type=int, default=100, help="first N train/good images in sorted order")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default=",".join(ORDER), help="comma-separated detectors")
    p.add_argument("--json", default=os.path.join(ROOT, "benches", "results", "compare_magnetic_tile.json"))
    p.add_argument("--html", default=None, help="HTML page (default: the JSON path with .html)")
    args = p.parse_args()

    import anomalox
    from anomalox.data import list_images
    from anomalox.report import write_comparison_report

    classes = {
        "patchcore": anomalox.PatchCore,
        "padim": anomalox.PaDiM,
        "spade": anomalox.SPADE,
        "dfm": anomalox.DFM,
        "fre": anomalox.FRE,
        "stfpm": anomalox.STFPM,
        "reverse_distillation": anomalox.ReverseDistillation,
        "fastflow": anomalox.FastFlow,
        "supersimplenet": anomalox.SuperSimpleNet,
    }
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise SystemExit(f"--only: unknown detectors {unknown}; choose from {list(classes)}")
    detectors = {classes[n].__name__: classes[n](n_threads=args.threads, random_state=0) for n in names}
    train = list_images(os.path.join(args.data, "train", "good"))[: args.train]
    load_start = os.getloadavg()
    start = time.perf_counter()
    table = anomalox.compare(detectors, train, args.data, as_frame=False, verbose=True)
    wall = time.perf_counter() - start
    load_end = os.getloadavg()

    cols = [
        ("image AUROC", "image_auroc", ".4f"),
        ("image AUPR", "image_aupr", ".4f"),
        ("F1-max", "f1_max", ".4f"),
        ("pixel AUROC", "pixel_auroc", ".4f"),
        ("AUPRO", "aupro", ".4f"),
        ("false alarms at threshold_", "false_alarm_rate", ".3f"),
        ("fit s", "fit_s", ".1f"),
        ("score s", "score_s", ".1f"),
        ("peak RSS MiB", "peak_rss_mib", ".0f"),
    ]

    def fmt(v, spec):
        return "—" if v is None else format(v, spec)

    lines = [
        f"### Every detector with its defaults on {os.path.basename(os.path.normpath(args.data))} "
        f"({len(train)} train images, the whole test folder; {args.threads} threads; `anomalox.compare`)",
        "",
        "| detector | " + " | ".join(c[0] for c in cols) + " | error |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for r in table:
        lines.append(
            f"| {r['detector']} | " + " | ".join(fmt(r[k], s) for _, k, s in cols) + f" | {r['error'] or ''} |"
        )
    cmd = "PYTHONPATH=python:tch/python " + " ".join(
        [os.path.relpath(sys.executable, ROOT), os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]
    )
    lines += [
        "",
        f"Command: `{cmd}`  ",
        f"Total {wall:.0f} s; load average at start {'/'.join(f'{v:.2f}' for v in load_start)}, at end "
        f"{'/'.join(f'{v:.2f}' for v in load_end)} ({os.cpu_count()} CPUs).",
    ]
    print("\n".join(lines))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(
            {"data": args.data, "n_train": len(train), "threads": args.threads, "rows": table, "wall_s": wall},
            f,
            indent=1,
        )
    html = args.html or os.path.splitext(args.json)[0] + ".html"
    write_comparison_report(html, table, title=f"anomalox compare: {os.path.basename(os.path.normpath(args.data))}")
    print(f"wrote {args.json} and {html}", file=sys.stderr)


if __name__ == "__main__":
    main()
