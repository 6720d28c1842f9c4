"""``anomalox demo``: PatchCore on the ELPV solar-cell images, offline, with an HTML report.

ELPV (Buerhop-Lutz et al. 2018; Deitsch et al. 2019) is licensed CC BY-NC-SA 4.0: non-commercial
use only. It is installed from PyPI (``elpv-dataset``); nothing is downloaded at run time.
"""

from __future__ import annotations

import time

N_TRAIN = 100  # normal cells to fit on: sized so the whole demo takes under 3 minutes on 2 cores


def run_demo(n_train: int | None = None, seed: int = 0, out: str = "anomalox-demo-report.html", quiet: bool = False) -> dict:
    """Fit PatchCore (EfficientNet-Lite0, ImageNet weights) on normal ELPV cells, score the rest.

    Train: ``n_train`` cells of defect probability 0 (seeded draw). Test: the other probability-0
    cells and every probability-1 cell; the uncertain 1/3 and 2/3 cells are left out. Prints the
    split, image AUROC / AUPR / F1-max and the times; writes the HTML report to ``out``.
    """
    from anomalox import PatchCore, metrics
    from anomalox.elpv import demo_split
    from anomalox.report import write_report

    n_train = N_TRAIN if n_train is None else n_train
    split = demo_split(n_train, seed=seed)
    labels = split["test_labels"]
    print(
        f"ELPV split (seed {seed}): train {len(split['train'])} normal cells; "
        f"test {int((labels == 0).sum())} normal + {int(labels.sum())} defective cells "
        f"(probability 1/3 and 2/3 cells excluded). Data: CC BY-NC-SA 4.0, non-commercial use only."
    )
    model = PatchCore(image_size=224, verbose=not quiet)
    start = time.perf_counter()
    model.fit(split["train"])
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    result = model.inspect(split["test"])
    predict_s = time.perf_counter() - start
    f1, f1_threshold = metrics.f1_max(labels, result.scores)
    summary = {
        "image_auroc": metrics.image_auroc(labels, result.scores),
        "image_aupr": metrics.image_aupr(labels, result.scores),
        "f1_max": f1,
        "fit_seconds": round(fit_s, 2),
        "predict_seconds": round(predict_s, 2),
        "n_train": len(split["train"]),
        "n_test": len(labels),
    }
    print(f"fit {fit_s:.1f} s ({repr(model).split('# ')[-1]})")
    print(f"predict {predict_s:.1f} s for {len(labels)} images")
    print(f"image AUROC {summary['image_auroc']:.4f}   AUPR {summary['image_aupr']:.4f}   F1-max {f1:.4f}")
    threshold = model.threshold_ if model.threshold_ is not None else f1_threshold
    write_report(out, paths=result.paths, scores=result.scores, threshold=threshold, gt_labels=labels,
                 maps=result.maps, metrics=summary, title="anomalox demo: PatchCore on ELPV solar cells")
    print(f"report: {out}")
    return summary
