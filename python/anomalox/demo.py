"""``anomalox demo``: PatchCore on the ELPV solar-cell images, offline, with an HTML report.

ELPV (Buerhop-Lutz et al. 2018; Deitsch et al. 2019) is licensed CC BY-NC-SA 4.0: non-commercial
use only. It is installed from PyPI (``elpv-dataset``); nothing is downloaded at run time.
"""

from __future__ import annotations

import time
from typing import Any

N_TRAIN = 100  # normal cells to fit on: sized so the whole demo takes under 3 minutes on 2 cores


def run_demo(
    n_train: int | None = None, seed: int = 0, out: str = "anomalox-demo-report.html", quiet: bool = False
) -> dict[str, Any]:
    """Fit PatchCore (EfficientNet-Lite0, ImageNet weights) on normal ELPV cells, score the rest.

    Train: ``n_train`` cells of defect probability 0 (seeded draw). Test: the other probability-0
    cells and every probability-1 cell; the uncertain 1/3 and 2/3 cells are left out. Prints the
    split, image AUROC / AUPR / F1-max and the times; writes the HTML report to ``out``.

    Returns
    -------
    dict
        ``image_auroc``, ``image_aupr``, ``f1_max`` (from :func:`anomalox.evaluate`),
        ``fit_seconds``, ``predict_seconds`` (scoring and metrics), ``n_train``, ``n_test``.
    """
    from anomalox import PatchCore, evaluate
    from anomalox.elpv import demo_split
    from anomalox.report import write_evaluation_report

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
    evaluation = evaluate(model, split["test"], labels, keep_maps=True)
    predict_s = time.perf_counter() - start
    summary = {
        "image_auroc": evaluation["image_auroc"],
        "image_aupr": evaluation["image_aupr"],
        "f1_max": evaluation["f1_max"],
        "fit_seconds": round(fit_s, 2),
        "predict_seconds": round(predict_s, 2),
        "n_train": len(split["train"]),
        "n_test": len(labels),
    }
    print(f"fit {fit_s:.1f} s ({repr(model).split('# ')[-1]})")
    print(f"predict {predict_s:.1f} s for {len(labels)} images")
    print(
        f"image AUROC {summary['image_auroc']:.4f}   AUPR {summary['image_aupr']:.4f}   F1-max {summary['f1_max']:.4f}"
    )
    write_evaluation_report(out, evaluation, metrics=summary, title="anomalox demo: PatchCore on ELPV solar cells")
    print(f"report: {out}")
    return summary
