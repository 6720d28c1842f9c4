"""Fit several detectors on the same images and compare them in one table.

Each detector is fitted and evaluated in its own fresh Python process (``multiprocessing``'s
"spawn"), one after another, so that its peak RSS is its own and a crash takes only its own row.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
import traceback
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__all__ = ["COLUMNS", "compare"]

# The table's columns, in order.
COLUMNS = (
    "detector",
    "image_auroc",
    "image_aupr",
    "f1_max",
    "pixel_auroc",
    "aupro",
    "false_alarm_rate",
    "threshold",
    "fit_s",
    "score_s",
    "peak_rss_mib",
    "error",
)


def _peak_rss_mib() -> float:
    """This process's peak resident set size in MiB (``ru_maxrss``; Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _measure(detector: Any, train: Any, test: Any, labels: Any, masks: Any, fpr_limit: float) -> dict[str, Any]:
    """Fit `detector` on `train`, evaluate it on `test`: one row of the table (without its name)."""
    from anomalox.evaluate import evaluate

    start = time.perf_counter()
    detector.fit(train)
    fitted = time.perf_counter()
    ev = evaluate(detector, test, labels=labels, masks=masks, fpr_limit=fpr_limit)
    scored = time.perf_counter()
    good = ev.scores[ev.labels == 0]
    threshold = ev.threshold
    m = ev.metrics
    return {
        "image_auroc": m["image_auroc"],
        "image_aupr": m["image_aupr"],
        "f1_max": m["f1_max"],
        "pixel_auroc": m["pixel_auroc"],
        "aupro": m["aupro"],
        "false_alarm_rate": None if threshold is None or good.size == 0 else float(np.mean(good > threshold)),
        "threshold": None if threshold is None else float(threshold),
        "fit_s": fitted - start,
        "score_s": scored - fitted,
        "peak_rss_mib": _peak_rss_mib(),
        "error": None,
    }


def _child(conn: Any, detector: Any, train: Any, test: Any, labels: Any, masks: Any, fpr_limit: float) -> None:
    """The worker process: one row, or the error that stopped it, sent back through `conn`."""
    try:
        row = _measure(detector, train, test, labels, masks, fpr_limit)
    except BaseException as e:  # noqa: BLE001 - every failure becomes the row's error
        row = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(), "peak_rss_mib": None}
        try:
            row["peak_rss_mib"] = _peak_rss_mib()
        except Exception:  # noqa: BLE001
            pass
    conn.send(row)
    conn.close()


def _names(detectors: Any) -> list[tuple[str, Any]]:
    if isinstance(detectors, Mapping):
        items = [(str(k), v) for k, v in detectors.items()]
    elif isinstance(detectors, Iterable) and not isinstance(detectors, (str, bytes)):
        items = []
        seen: dict[str, int] = {}
        for det in detectors:
            base = type(det).__name__
            seen[base] = seen.get(base, 0) + 1
            items.append((base if seen[base] == 1 else f"{base} ({seen[base]})", det))
    else:
        raise TypeError(
            f"detectors: expected a list of detectors or a dict of name to detector, got {type(detectors).__name__}"
        )
    if not items:
        raise ValueError("detectors: expected at least one detector, got none")
    from anomalox.detectors import BaseDetector

    for name, det in items:
        if not isinstance(det, BaseDetector):
            raise TypeError(f"detectors: expected anomalox detectors, got {type(det).__name__} for {name!r}")
    return items


def compare(
    detectors: Any,
    train: Any,
    test: Any,
    labels: Any = None,
    masks: Any = None,
    *,
    fpr_limit: float = 0.3,
    timeout: float | None = None,
    as_frame: bool | None = None,
    verbose: bool = False,
) -> Any:
    """Fit each detector on `train`, evaluate it on `test`, one table row per detector.

    Each detector runs in its own fresh Python process (``multiprocessing`` with the "spawn"
    start method), one at a time: fit on `train`, then :func:`anomalox.evaluate` on `test`. The
    detectors given are not changed (each process fits its own copy), so they stay unfitted here.
    A detector that fails (an exception, its process dying, the `timeout`) gets its error in its
    row and empty metrics; the others still run.

    Parameters
    ----------
    detectors : list of detectors, or dict of name to detector
        Unfitted anomalox detectors (with the parameters to compare). In a list, rows are named by
        class, repeated classes numbered ("PatchCore", "PatchCore (2)").
    train : folder, paths or images
        What every detector's ``fit`` gets: an MVTec category's ``train/good``, or anything
        ``fit`` accepts (arrays and tensors are pickled to each process). An MVTec category folder
        itself means its ``train/good``.
    test : folder, LabeledSet, or images
        What :func:`anomalox.evaluate` gets: an MVTec category (or its ``test`` folder), a
        :class:`~anomalox.data.LabeledSet`, or with `labels` anything ``inspect`` accepts.
    labels, masks : optional
        The test images' 0/1 labels (1 = defective) and masks, as :func:`anomalox.evaluate`
        takes them.
    fpr_limit : float
        The FPR limit of AUPRO.
    timeout : float, optional
        Seconds per detector (fit and evaluation) before its process is stopped.
    as_frame : bool, optional
        Return a pandas DataFrame (True), a list of dicts (False); None: a DataFrame when pandas
        is installed.
    verbose : bool
        Print each detector's row as it finishes.

    Returns
    -------
    pandas.DataFrame or list of dict
        One row per detector, columns :data:`COLUMNS`: ``detector``; the metrics of
        :func:`anomalox.evaluate` (``image_auroc``, ``image_aupr``, ``f1_max``, ``pixel_auroc``,
        ``aupro``: None when the test set has no masks); ``false_alarm_rate``: the fraction of the
        good test images scored above ``threshold_`` (as ``predict``), ``threshold``; ``fit_s``:
        the wall time of ``fit``; ``score_s``: the wall time of ``evaluate`` (scoring the test
        images and computing the metrics); ``peak_rss_mib``: the process's peak resident memory
        (its imports included); ``error``: None, or the failure's type and message.

    Notes
    -----
    The "spawn" start method runs each process from a fresh interpreter that imports the caller's
    main module: in a script, call ``compare`` under ``if __name__ == "__main__":`` (notebooks
    need nothing).

    Examples
    --------
    >>> table = anomalox.compare([PatchCore(), PaDiM(), STFPM(max_epochs=5)],
    ...                          "magnetic_tile/train/good", "magnetic_tile")
    """
    items = _names(detectors)
    if as_frame not in (None, True, False):
        raise TypeError(f"as_frame: expected True, False or None, got {as_frame!r}")
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"timeout: expected a positive number of seconds or None, got {timeout!r}")
    if as_frame is None or as_frame:
        try:
            import pandas as pd
        except ImportError:
            if as_frame:
                raise ImportError("as_frame=True needs pandas: pip install pandas") from None
            pd = None
    else:
        pd = None
    if isinstance(train, (str, os.PathLike)) and os.path.isdir(os.path.join(os.fspath(train), "train", "good")):
        train = os.path.join(os.fspath(train), "train", "good")

    ctx = multiprocessing.get_context("spawn")
    rows: list[dict[str, Any]] = []
    for name, detector in items:
        row: dict[str, Any] = dict.fromkeys(COLUMNS)
        row["detector"] = name
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(send, detector, train, test, labels, masks, fpr_limit), daemon=True)
        start = time.perf_counter()
        try:
            proc.start()
            send.close()
            got = receive.poll(timeout)
            result = None
            if got:
                try:
                    result = receive.recv()
                except EOFError:  # the process ended without reporting
                    result = None
            if result is not None:
                result.pop("traceback", None)
                row.update(result)
            elif not got:
                proc.terminate()
                proc.join(10)
                row["error"] = f"TimeoutError: stopped after {time.perf_counter() - start:.0f} s (timeout={timeout} s)"
            else:
                proc.join(30)
                row["error"] = (
                    f"the detector's process ended (exit code {proc.exitcode}) before it reported; its output "
                    "above says why"
                )
        except KeyboardInterrupt:
            proc.terminate()
            raise
        finally:
            receive.close()
            proc.join(10)
        rows.append(row)
        if verbose:
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items() if v is not None}
            print(f"compare: {shown}", flush=True)
    return pd.DataFrame(rows, columns=list(COLUMNS)) if pd is not None else rows
