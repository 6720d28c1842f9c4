"""The ``anomalox`` command line (also ``python -m anomalox``).

Exit codes: 0 success, 2 usage error, 1 runtime error (a one-line message; ``--debug`` shows the
traceback).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from typing import Any

METHODS = ("patchcore", "padim", "spade", "dfm", "stfpm", "reverse_distillation", "fre", "fastflow", "supersimplenet")

EXAMPLES = {
    "fit": """examples:
  anomalox fit magnetic_tile --out tile.ax                 # MVTec category: uses train/good
  anomalox fit good_parts/ --out m.ax --method padim --backbone resnet18
  anomalox fit good_parts/ --out m.ax --param coreset_ratio=0.05 --param image_size=224""",
    "predict": """examples:
  anomalox predict tile.ax new_images/ --out results.csv
  anomalox predict tile.ax a.png b.png --maps heatmaps/""",
    "evaluate": """examples:
  anomalox evaluate tile.ax magnetic_tile            # MVTec category: uses test/ and ground_truth/
  anomalox evaluate tile.ax magnetic_tile --json""",
    "report": """examples:
  anomalox report tile.ax magnetic_tile --out report.html""",
    "compare": """examples:
  anomalox compare magnetic_tile --method patchcore --method padim --method fre
  anomalox compare magnetic_tile --method stfpm --method fre --param max_epochs=5 --param fre:latent_dim=100
  anomalox compare magnetic_tile --method patchcore --method dfm --json --report compare.html""",
    "demo": """examples:
  anomalox demo                 # PatchCore on the ELPV solar cells, writes anomalox-demo-report.html
  anomalox demo --quiet --n-train 200""",
}


class CliError(Exception):
    """A runtime failure reported as one line, exit code 1."""


def _parse_value(text: str) -> Any:
    """JSON where it parses (numbers, lists, true/false/null), the plain string otherwise."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _params(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--param: expected key=value, got {pair!r}")
        out[key.strip()] = _parse_value(value)
    return out


def _detector(method: str, backbone: str | None, params: dict[str, Any], verbose: bool):
    import anomalox

    cls = {
        "patchcore": anomalox.PatchCore,
        "padim": anomalox.PaDiM,
        "spade": anomalox.SPADE,
        "dfm": anomalox.DFM,
        "stfpm": anomalox.STFPM,
        "reverse_distillation": anomalox.ReverseDistillation,
        "fre": anomalox.FRE,
        "fastflow": anomalox.FastFlow,
        "supersimplenet": anomalox.SuperSimpleNet,
    }[method]
    if backbone is not None:
        params = {**params, "backbone": backbone}
    known = cls().get_params()
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise CliError(f"--param: {method} has no parameter {', '.join(unknown)} (it has: {', '.join(sorted(known))})")
    return cls(**{**params, "verbose": verbose})


def _load(path: str, verbose: bool):
    import anomalox

    model = anomalox.load(path)
    model.set_params(verbose=verbose)
    return model


def cmd_fit(args: argparse.Namespace) -> None:
    model = _detector(args.method, args.backbone, _params(args.param), not args.quiet)
    start = time.perf_counter()
    model.fit(args.train_dir)
    model.save(args.out)
    print(f"fit in {time.perf_counter() - start:.1f} s, saved {args.out}: {repr(model)}")


def cmd_predict(args: argparse.Namespace) -> None:
    from anomalox.report import write_heatmaps

    model = _load(args.model, not args.quiet)
    images = args.images[0] if len(args.images) == 1 else args.images
    result = model.inspect(images)
    labels = result.labels if result.labels is not None else [""] * len(result.scores)
    out = open(args.out, "w", newline="") if args.out else sys.stdout
    try:
        writer = csv.writer(out)
        writer.writerow(["path", "score", "label"])
        for path, score, label in zip(result.paths, result.scores, labels):
            writer.writerow([path, f"{float(score):.6g}", label])
    finally:
        if args.out:
            out.close()
    if args.maps:
        write_heatmaps(args.maps, result.paths, result.maps)
    if args.out:
        print(
            f"scored {len(result.scores)} images; wrote {args.out}"
            + (f" and heatmaps in {args.maps}" if args.maps else "")
        )


def _metrics_table(metrics: dict[str, Any]) -> str:
    rows = [
        (k, "skipped" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))) for k, v in metrics.items()
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def cmd_evaluate(args: argparse.Namespace) -> None:
    import anomalox

    evaluation = anomalox.evaluate(_load(args.model, not args.quiet), args.test_dir)
    print(json.dumps(evaluation.metrics, indent=2) if args.json else _metrics_table(evaluation.metrics))


def cmd_report(args: argparse.Namespace) -> None:
    import anomalox
    from anomalox.report import write_evaluation_report

    model = _load(args.model, not args.quiet)
    # Maps are not kept: the report inspects again only the images its grids show.
    evaluation = anomalox.evaluate(model, args.test_dir)
    write_evaluation_report(args.out, evaluation, title=f"anomalox report: {args.test_dir}", detector=model)
    print(f"wrote {args.out}")


def _method_params(methods: list[str], pairs: list[str]) -> dict[str, dict[str, Any]]:
    """--param for compare: METHOD:KEY=VALUE sets one method's parameter, KEY=VALUE every method's."""
    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for pair in pairs:
        head, sep, rest = pair.partition(":")
        if sep and head in METHODS and "=" in rest:
            if head not in out:
                raise CliError(f"--param: {pair!r} names {head}, which is not among the --method given")
            out[head].update(_params([rest]))
        else:
            for m in methods:
                out[m].update(_params([pair]))
    return out


def cmd_compare(args: argparse.Namespace) -> None:
    import anomalox
    from anomalox.report import write_comparison_report

    methods = list(dict.fromkeys(args.method or ["patchcore"]))
    params = _method_params(methods, args.param)
    detectors = {m: _detector(m, args.backbone, params[m], not args.quiet) for m in methods}
    table = anomalox.compare(
        detectors, args.category, args.category, timeout=args.timeout, as_frame=False, verbose=not args.quiet
    )
    if args.json:
        print(json.dumps(table, indent=2))
    else:
        cols = ["detector", "image_auroc", "aupro", "false_alarm_rate", "fit_s", "score_s", "peak_rss_mib", "error"]
        cells = [[_cell(r[c]) for c in cols] for r in table]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip())
        for row in cells:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    if args.report:
        print(f"wrote {write_comparison_report(args.report, table, title=f'anomalox compare: {args.category}')}")
    if all(r["error"] for r in table):
        raise CliError("every detector failed (see the error column)")


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def cmd_demo(args: argparse.Namespace) -> None:
    from anomalox.demo import run_demo

    run_demo(n_train=args.n_train, seed=args.seed, out=args.out, quiet=args.quiet)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anomalox",
        description="Industrial visual anomaly detection: fit on good images, score and localise defects.",
        epilog="Run 'anomalox COMMAND --help' for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
        p.set_defaults(func=func)
        return p

    p = command("fit", "Fit a detector on a folder of good images and save it.", cmd_fit)
    p.add_argument(
        "train_dir", metavar="TRAIN_DIR", help="folder of good images, or an MVTec category (its train/good)"
    )
    p.add_argument("--out", required=True, help="model file to write (safetensors)")
    p.add_argument("--method", choices=METHODS, default="patchcore")
    p.add_argument("--backbone", default=None, help="e.g. efficientnet_lite0 (default), resnet18, wide_resnet50_2")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="detector parameter, value parsed as JSON when it can be (repeatable)",
    )

    p = command("predict", "Score images with a saved detector.", cmd_predict)
    p.add_argument("model", metavar="MODEL")
    p.add_argument("images", metavar="IMAGES_OR_DIR", nargs="+")
    p.add_argument("--out", help="CSV file (path, score, label); default: standard output")
    p.add_argument("--maps", metavar="DIR", help="write heatmap overlays (PNG) into DIR")

    p = command("evaluate", "Metrics of a saved detector on an MVTec-layout test folder.", cmd_evaluate)
    p.add_argument("model", metavar="MODEL")
    p.add_argument("test_dir", metavar="TEST_DIR")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command("report", "Write a self-contained HTML report on an MVTec-layout test folder.", cmd_report)
    p.add_argument("model", metavar="MODEL")
    p.add_argument("test_dir", metavar="TEST_DIR")
    p.add_argument("--out", default="report.html")

    p = command(
        "compare",
        "Fit several detectors on an MVTec category's train/good, evaluate each on its test/, one table "
        "(each detector in its own process).",
        cmd_compare,
    )
    p.add_argument("category", metavar="CATEGORY", help="an MVTec-layout category folder")
    p.add_argument("--method", choices=METHODS, action="append", help="a detector to compare (repeatable)")
    p.add_argument("--backbone", default=None, help="the backbone of every detector (default: each one's default)")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="[METHOD:]KEY=VALUE",
        help="a parameter of every detector, or of one with METHOD: (repeatable; values parsed as JSON)",
    )
    p.add_argument("--timeout", type=float, default=None, help="seconds per detector")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.add_argument("--report", metavar="HTML", help="also write the table as an HTML page")

    p = command("demo", "PatchCore on the ELPV solar-cell images (offline), with an HTML report.", cmd_demo)
    p.add_argument("--n-train", type=int, default=None, help="normal cells to train on (default: the demo's size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="anomalox-demo-report.html")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"anomalox {version('anomalox')}"
    except PackageNotFoundError:  # pragma: no cover
        return "anomalox (unknown version)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))  # exit code 2
    except KeyboardInterrupt:
        print("anomalox: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every runtime failure: one line, exit code 1
        if args.debug:
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"anomalox: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
