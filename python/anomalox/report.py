"""A self-contained HTML report of one anomaly detection run.

:func:`write_report` writes a single HTML file: a metrics table, a score histogram with the
threshold, the ROC curve, the PRO curve (when ground-truth masks are given) and example grids
(input, heatmap overlay, ground truth) of the worst false alarms and misses. Plots are inline
SVG and images base64 PNG data URIs, so the file has no external CSS, JS, fonts or images.
:func:`write_evaluation_report` writes it for an :class:`anomalox.Evaluation`.
:func:`overlay` draws one heatmap over one image (pure numpy + PIL); :func:`write_heatmaps` saves
one overlay PNG per image.
"""

from __future__ import annotations

import base64
import html
import io
import numbers
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from anomalox.evaluate import mask_for_map
from anomalox.metrics import image_auroc, pro_curve, roc_curve

if TYPE_CHECKING:
    from anomalox.evaluate import Evaluation

__all__ = [
    "describe_setup",
    "example_indices",
    "overlay",
    "write_comparison_report",
    "write_evaluation_report",
    "write_heatmaps",
    "write_report",
]

_T = np.linspace(0.0, 1.0, 256)[:, None]
#: Jet colour map, 256 x RGB uint8: dark blue (low) through green and yellow to dark red (high).
JET = np.round(np.clip(1.5 - np.abs(4.0 * _T - [3.0, 2.0, 1.0]), 0, 1) * 255).astype(np.uint8)
_PRO_PIXEL_BUDGET = 1 << 23  # pixels fed to pro_curve; larger sets are resampled for the plot
_CSS = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse}
td,th{border:1px solid #bbb;padding:2px 8px;text-align:left}.plots svg{margin:0 1em 1em 0}
.row{display:flex;gap:8px;align-items:flex-start;margin:6px 0}.cap{width:14em;font-size:85%;
word-break:break-all}figure{margin:0}figcaption{font-size:75%;text-align:center}
img{height:192px;width:auto}svg text.lg{paint-order:stroke;stroke:#fff;stroke-width:3px}"""


def _to_rgb8(image: Any) -> np.ndarray:
    """Any gray/RGB(A) uint8, uint16, int, bool or float array -> (H, W, 3) uint8."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] in (2, 4):
        a = a[..., :-1]  # drop alpha
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3):
        raise ValueError(f"image: expected (H, W), (H, W, 1|2|3|4), got shape {a.shape}")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype.kind in "ui" and a.dtype != np.uint8:
        if a.dtype != np.uint16 and a.size and 0 <= a.min() and a.max() <= 255:
            a = a.astype(np.uint8)
        else:  # 16-bit: scale the full range onto 8 bits (65535 -> 255), no clipping at 255
            a = np.round(np.clip(a, 0, 65535) / 257.0).astype(np.uint8)
    elif a.dtype.kind == "f":
        a = np.nan_to_num(a.astype(np.float64))
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 1.0)
        if lo < 0.0 or hi > 1.0:  # not in [0, 1]: stretch min..max
            a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        a = np.round(a * 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise TypeError(f"image: unsupported dtype {a.dtype}")
    return np.ascontiguousarray(np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a)


def _read(path: str | os.PathLike) -> np.ndarray:
    """Read an image file with PIL as (H, W, 3) uint8 (16-bit files scaled, not clipped)."""
    with Image.open(path) as im:
        if im.mode.startswith("I;16") or im.mode == "I":
            a = np.clip(np.asarray(im).astype(np.int64), 0, 65535).astype(np.uint16)
        elif im.mode in ("L", "LA", "RGB", "RGBA", "F"):
            a = np.asarray(im)
        else:
            a = np.asarray(im.convert("RGBA"))
    return _to_rgb8(a)


def _resize(a: np.ndarray, shape: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize a 2-D float or bool array to ``shape`` (bilinear, or nearest for masks)."""
    if a.shape == tuple(shape):
        return a
    if nearest:
        im = Image.fromarray(np.asarray(a, np.uint8) * 255)
        return np.asarray(im.resize(shape[::-1], Image.Resampling.NEAREST)) > 127
    im = Image.fromarray(np.asarray(a, np.float32))
    return np.asarray(im.resize(shape[::-1], Image.Resampling.BILINEAR))


def overlay(image: Any, amap: Any, vmin: float, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """Blend a jet-coloured anomaly map over an image.

    Parameters
    ----------
    image : array (H, W) or (H, W, 1|2|3|4), or path
        uint8, uint16 (scaled by 1/257), bool or float (in [0, 1], else stretched min..max);
        an alpha channel is dropped. A path is read with PIL.
    amap : array (h, w), float
        Anomaly map; resized bilinearly to (H, W) when its size differs.
    vmin, vmax : float
        Map values shown as the lowest (dark blue) and highest (dark red) colour; values
        outside are clipped. Use the same pair for a whole set so colours are comparable.
    alpha : float
        Weight of the colour map in the blend.

    Returns
    -------
    ndarray (H, W, 3) uint8
    """
    rgb = _read(image) if isinstance(image, (str, os.PathLike)) else _to_rgb8(image)
    m = np.nan_to_num(np.squeeze(np.asarray(amap, dtype=np.float32)))
    if m.ndim != 2:
        raise ValueError(f"amap: expected (h, w), got shape {np.shape(amap)}")
    m = _resize(m, rgb.shape[:2])
    span = float(vmax) - float(vmin)
    t = np.clip((m - float(vmin)) / span, 0.0, 1.0) if span > 0 else np.zeros_like(m)
    colour = JET[np.round(t * 255).astype(np.intp)]
    return np.round((1.0 - alpha) * rgb + alpha * colour).astype(np.uint8)


def _png_uri(rgb: np.ndarray, max_side: int = 384) -> str:
    im = Image.fromarray(rgb)
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plot(title: str, xlabel: str, ylabel: str, xlim, ylim, items: list, w=380, h=270) -> str:
    """A small inline SVG plot. items: ("bars", edges, heights, colour, label),
    ("line", xs, ys, colour, label, dash) or ("vline", x, colour, label)."""
    L, T, W, H = 52, 28, w - 64, h - 72
    (x0, x1), (y0, y1) = xlim, ylim
    x1, y1 = (x1 if x1 > x0 else x0 + 1.0), (y1 if y1 > y0 else y0 + 1.0)
    px = lambda x: L + (np.asarray(x, float) - x0) / (x1 - x0) * W  # noqa: E731
    py = lambda y: T + H - (np.asarray(y, float) - y0) / (y1 - y0) * H  # noqa: E731
    s = [
        f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-size="11" role="img">',
        f'<text x="{w / 2}" y="16" text-anchor="middle" font-weight="bold">{html.escape(title)}</text>',
        f'<rect x="{L}" y="{T}" width="{W}" height="{H}" fill="none" stroke="#444"/>',
    ]
    for v in np.linspace(x0, x1, 5):
        s.append(f'<text x="{px(v):.1f}" y="{T + H + 14}" text-anchor="middle">{v:.3g}</text>')
    for v in np.linspace(y0, y1, 5):
        s.append(f'<text x="{L - 4}" y="{py(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    s.append(f'<text x="{L + W / 2}" y="{h - 22}" text-anchor="middle">{html.escape(xlabel)}</text>')
    s.append(
        f'<text x="12" y="{T + H / 2}" text-anchor="middle" '
        f'transform="rotate(-90 12 {T + H / 2})">{html.escape(ylabel)}</text>'
    )
    legend = []
    for it in items:
        if it[0] == "bars":
            _, edges, heights, colour, label = it
            for a, b, v in zip(edges[:-1], edges[1:], heights):
                if v > 0:
                    s.append(
                        f'<rect x="{px(a):.1f}" y="{py(v):.1f}" width="{max(px(b) - px(a), 0.5):.1f}"'
                        f' height="{py(y0) - py(v):.1f}" fill="{colour}" fill-opacity="0.5"/>'
                    )
        elif it[0] == "line":
            _, xs, ys, colour, label, dash = it
            pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(px(xs), py(ys)))
            s.append(
                f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="1.5"'
                + (' stroke-dasharray="4 3"' if dash else "")
                + "/>"
            )
        else:
            _, x, colour, label = it
            s.append(
                f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{T}" y2="{T + H}" stroke="{colour}"'
                ' stroke-width="2" stroke-dasharray="6 3"/>'
            )
        if label:
            legend.append((colour, label))
    for k, (colour, label) in enumerate(legend):
        s.append(
            f'<text class="lg" x="{L + W - 4}" y="{T + 14 + 13 * k}" text-anchor="end" fill="{colour}">'
            f"{html.escape(label)}</text>"
        )
    return "\n".join(s + ["</svg>"])


def _decimate(*curves: np.ndarray, n: int = 1500) -> list[np.ndarray]:
    idx = np.unique(np.linspace(0, len(curves[0]) - 1, min(n, len(curves[0]))).astype(np.intp))
    return [np.asarray(c, float)[idx] for c in curves]


def _colourbar(vmin: float, vmax: float, threshold: float, w=380, h=44) -> str:
    rgb = [",".join(str(int(c)) for c in JET[k * 255 // 16]) for k in range(17)]
    stops = "".join(f'<stop offset="{k / 16:.4f}" stop-color="rgb({c})"/>' for k, c in enumerate(rgb))
    s = [
        f'<svg width="{w}" height="{h}" font-size="11"><defs><linearGradient id="jet">{stops}'
        f'</linearGradient></defs><rect x="10" y="4" width="{w - 20}" height="16" fill="url(#jet)"/>'
        f'<text x="10" y="34">{vmin:.4g}</text><text x="{w - 10}" y="34" text-anchor="end">{vmax:.4g}</text>'
    ]
    if vmax > vmin and vmin <= threshold <= vmax:
        x = 10 + (threshold - vmin) / (vmax - vmin) * (w - 20)
        s.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="2" y2="22" stroke="#000" stroke-width="2"/>'
            f'<text x="{x:.1f}" y="34" text-anchor="middle">threshold</text>'
        )
    return "".join(s) + "</svg>"


def _pro_plot(maps: list[np.ndarray], masks: list, notes: list[str]) -> str:
    """PRO curve over the whole set; maps/masks are resampled to one grid when sizes differ."""
    shapes = [m.shape if k is None else np.shape(k) for m, k in zip(maps, masks)]
    h, w = next((np.shape(k) for k in masks if k is not None), shapes[0])
    scale = min(1.0, float(np.sqrt(_PRO_PIXEL_BUDGET / (len(maps) * h * w))))
    grid = (max(1, round(h * scale)), max(1, round(w * scale)))
    if any(s != grid for s in shapes) or any(m.shape != grid for m in maps):
        notes.append(f"PRO curve: maps and masks resampled to {grid[0]}x{grid[1]} (one grid for the set).")
    mk = np.stack(
        [np.zeros(grid, bool) if k is None else _resize(np.squeeze(np.asarray(k, bool)), grid, True) for k in masks]
    )
    mp = np.stack([_resize(m, grid) for m in maps]).astype(np.float32)
    try:
        fpr, pro, _ = pro_curve(mk.astype(np.uint8), mp)
    except ValueError as exc:
        notes.append(f"PRO curve skipped: {exc}")
        return ""
    return _pro_plot_from_curve(np.asarray(fpr, float), np.asarray(pro, float))


def _pro_plot_from_curve(fpr: np.ndarray, pro: np.ndarray) -> str:
    keep = fpr <= 0.3
    fpr, pro = _decimate(fpr[keep], pro[keep])
    return _plot(
        "PRO curve (FPR <= 0.3)",
        "false positive rate (pixels)",
        "per-region overlap",
        (0, 0.3),
        (0, 1),
        [("line", fpr, pro, "#1f77b4", "", False)],
    )


def _value(v: Any) -> str:
    if v is None:
        return "skipped"
    if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral):
        return f"{float(v):.4f}"
    return html.escape(str(v))


def _score_plots(s: np.ndarray, y: np.ndarray | None, thr: float, notes: list[str]) -> list[str]:
    """The score histogram (per class when labels are given) and the ROC curve."""
    lo, hi = min(float(s.min()), thr), max(float(s.max()), thr)
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, 31)
    groups = (
        [("all images", s, "#555")]
        if y is None
        else [("normal", s[y == 0], "#1f77b4"), ("defective", s[y == 1], "#d62728")]
    )
    bars = [("bars", edges, np.histogram(v, edges)[0] / max(v.size, 1), c, f"{g} ({v.size})") for g, v, c in groups]
    ymax = max(float(b[2].max()) for b in bars) * 1.1 or 1.0
    plots = [
        _plot(
            "Score histogram",
            "image score",
            "fraction of class",
            (edges[0], edges[-1]),
            (0, ymax),
            bars + [("vline", thr, "#000", f"threshold {thr:.4g}")],
        )
    ]
    if y is not None and 0 < y.sum() < y.size:
        fpr, tpr, _ = (np.asarray(c, float) for c in roc_curve(y, s.astype(np.float32)))
        auc = image_auroc(y, s.astype(np.float32))  # the figure evaluate reports
        fpr, tpr = _decimate(fpr, tpr)
        lines = [("line", [0, 1], [0, 1], "#999", "", True), ("line", fpr, tpr, "#d62728", f"AUROC {auc:.4f}", False)]
        plots.append(_plot("ROC curve", "false positive rate", "true positive rate", (0, 1), (0, 1), lines))
    elif y is not None:
        notes.append("ROC curve skipped: gt_labels hold only one class.")
    return plots


def _example_row(i, s, thr, y, paths, images, maps, masks, vmin, vmax) -> str:
    """One grid row: caption, input, heatmap overlay (with maps), ground truth (with masks)."""
    if images is not None:
        img = _to_rgb8(images[i])
    elif paths[i] is not None:
        img = _read(paths[i])
    else:  # nothing to show: a grey canvas of the map's size
        img = np.full((*(maps[i].shape if maps and maps[i] is not None else (64, 64)), 3), 128, np.uint8)
    cells = [(img, "input")]
    if maps is not None and maps[i] is not None:
        cells.append((overlay(img, maps[i], vmin, vmax), "heatmap"))
    if masks is not None:
        k = masks[i]
        k = np.zeros(img.shape[:2], bool) if k is None else np.squeeze(np.asarray(k, bool))
        cells.append((_to_rgb8(_resize(k, img.shape[:2], nearest=True)), "ground truth"))
    name = os.path.basename(str(paths[i])) if paths[i] is not None else f"image {i}"
    cap = f"#{i} {html.escape(name)}<br>score {s[i]:.5g} ({'flagged' if s[i] >= thr else 'not flagged'})"
    if y is not None:
        cap += f"<br>label {'defective' if y[i] else 'normal'}"
    figs = "".join(
        f'<figure><img src="{_png_uri(a)}" alt="{c}"><figcaption>{c}</figcaption></figure>' for a, c in cells
    )
    return f'<div class="row"><div class="cap">{cap}</div>{figs}</div>'


def _ranked(s: np.ndarray, y: np.ndarray | None) -> list[np.ndarray]:
    """The images of each example grid, in display order: all by score (no labels), or the normal
    ones by descending score and the defective ones by ascending score."""
    if y is None:
        return [np.argsort(-s, kind="stable")]
    normal, defect = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    return [normal[np.argsort(-s[normal], kind="stable")], defect[np.argsort(s[defect], kind="stable")]]


def example_indices(scores: Any, labels: Any = None, max_examples: int = 8) -> list[int]:
    """The images :func:`write_report` shows in its example grids (the only maps it needs)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = None if labels is None else np.asarray(labels).astype(np.int64).reshape(-1)
    return sorted({int(i) for idx in _ranked(s, y) for i in idx[:max_examples]})


def write_report(
    out_path: str | os.PathLike,
    *,
    paths: Sequence[str | None],
    scores: Any,
    threshold: float,
    gt_labels: Any = None,
    maps: Any = None,
    gt_masks: Sequence[Any] | None = None,
    metrics: dict[str, float | None] | None = None,
    title: str = "anomalox report",
    images: Sequence[Any] | None = None,
    max_examples: int = 8,
    pro: tuple[Any, Any] | None = None,
    false_alarm_rate: float | None = None,
    setup: str | None = None,
) -> str:
    """Write a self-contained HTML report of scored images.

    Parameters
    ----------
    out_path : str or path
        The HTML file to write (parent folders are created).
    paths : sequence of str or None, length N
        Image files (read with PIL) and the names shown; None where there is no file.
    scores : array (N,), float
        Image anomaly scores (higher = more anomalous).
    threshold : float
        Decision threshold: an image is flagged when ``score >= threshold``.
    gt_labels : array (N,) of 0/1, optional
        Ground truth (1 = defective). Enables the per-class histogram, the ROC curve and the
        false-alarm / miss grids; without it the highest-scored images are shown.
    maps : array (N, H, W) or list of (H_i, W_i) float arrays (or None entries), optional
        Anomaly maps, each resized to its image's size for the overlay. All maps share one
        colour scale: the min and max over the maps given. A list may hold None for the images
        not shown (see :func:`example_indices`).
    gt_masks : list of (H_i, W_i) bool arrays or None, optional
        Ground-truth defect masks (None = no defect). Adds the mask column and, without ``pro``,
        the PRO curve computed from all maps.
    metrics : dict, optional
        Name -> value for the ``<table id="metrics">``; None values are shown as "skipped".
    title : str
    images : sequence of arrays, optional
        Images to show instead of reading ``paths`` (uint8/uint16/float/bool, gray/RGB(A)).
    max_examples : int
        Images per example grid.
    pro : (fpr, pro) arrays, optional
        The PRO curve to draw (e.g. :attr:`Evaluation.pro_curve`), instead of computing it from
        ``maps`` and ``gt_masks``.
    false_alarm_rate : float, optional
        The realised false-alarm rate of the detector's threshold on the good images, shown in
        the summary.
    setup : str, optional
        How the images were scored (see :func:`describe_setup`), shown under the summary.

    Returns
    -------
    str
        The path written.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n, thr = s.size, float(threshold)
    y = None if gt_labels is None else np.asarray(gt_labels).astype(np.int64).reshape(-1)
    given = {"paths": paths, "gt_labels": y, "maps": maps, "gt_masks": gt_masks, "images": images}
    for name, v in given.items():
        if v is not None and len(v) != n:
            raise ValueError(f"{name}: expected {n} entries (one per score), got {len(v)}")
    if n == 0:
        raise ValueError("scores: expected at least one image")
    mlist = (
        None
        if maps is None
        else [None if m is None else np.nan_to_num(np.squeeze(np.asarray(m, np.float32))) for m in maps]
    )
    notes: list[str] = []
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{_value(v)}</td></tr>" for k, v in (metrics or {}).items())
    summary = f"{n} images, threshold {thr:.6g}, {int((s >= thr).sum())} flagged (score &ge; threshold)"
    if y is not None:
        summary += f"; ground truth: {int((y == 0).sum())} normal, {int((y == 1).sum())} defective"
    if false_alarm_rate is not None:
        summary += (
            f'. <span id="false-alarm-rate">Realised false-alarm rate: {100 * false_alarm_rate:.2f}% of the good '
            f"images score above the detector's threshold_</span>"
        )
    if setup is not None:
        summary += f'.<br><span id="setup">{html.escape(setup)}</span>'
    plots = _score_plots(s, y, thr, notes)
    if pro is not None:
        plots.append(_pro_plot_from_curve(np.asarray(pro[0], float), np.asarray(pro[1], float)))
    elif gt_masks is not None and mlist is not None and all(m is not None for m in mlist):
        plots.append(_pro_plot(mlist, list(gt_masks), notes))  # type: ignore[arg-type]

    shown = [m for m in mlist or [] if m is not None]
    vmin = min(float(m.min()) for m in shown) if shown else 0.0
    vmax = max(float(m.max()) for m in shown) if shown else 1.0
    headings = (
        ["Highest-scored images"]
        if y is None
        else [
            "Highest-scored normal images (false alarms when flagged)",
            "Lowest-scored defective images (misses when not flagged)",
        ]
    )
    sections = list(zip(headings, _ranked(s, y)))
    parts = (
        []
        if mlist is None
        else [
            f"<p>Heatmap colour scale (jet, shared by all images): map value {vmin:.4g} (dark blue) to "
            f"{vmax:.4g} (dark red), the min and max over the maps shown.</p>{_colourbar(vmin, vmax, thr)}"
        ]
    )
    for heading, idx in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>" + ("" if len(idx) else "<p>none</p>"))
        parts += [_example_row(i, s, thr, y, paths, images, mlist, gt_masks, vmin, vmax) for i in idx[:max_examples]]
    return _write_page(
        out_path,
        title,
        [
            f"<h1>{html.escape(title)}</h1><p>{summary}</p>",
            f'<table id="metrics"><tr><th>metric</th><th>value</th></tr>'
            f"{rows or '<tr><td colspan=2>no metrics given</td></tr>'}</table>",
            f'<div class="plots">{"".join(plots)}</div>',
            *(f"<p><em>{html.escape(t)}</em></p>" for t in notes),
            *parts,
        ],
    )


def _write_page(out_path: str | os.PathLike, title: str, body: list[str]) -> str:
    """Write a self-contained HTML page (the report's style) of the `body` parts; its path."""
    doc = "\n".join(
        [
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>",
            *body,
            "</body></html>\n",
        ]
    )
    out = os.fspath(out_path)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(doc)
    return out


def describe_setup(detector: Any) -> str:
    """One sentence on how a fitted detector scores images: its class, resizing, crop and tiles
    (and, for a trained detector, its epochs and final training loss).

    Reads the fitted backbone's preprocessing and ``tiling_`` (as fitted, even if ``set_params``
    changed the parameters since).
    """
    prep = detector.backbone_.preprocessing
    if prep.image_size is None:
        size = "at their own size"
    elif prep.keep_aspect_ratio:
        size = f"resized to a short side of {prep.image_size} px (aspect ratio kept)"
    else:
        h, w = (prep.image_size, prep.image_size) if isinstance(prep.image_size, int) else prep.image_size
        size = f"resized to {h} x {w} (aspect ratio ignored)"
    text = f"{type(detector).__name__} ({detector.backbone_.name}): images {size}"
    if prep.center_crop is not None:
        text += f", center crop {prep.center_crop}"
    if detector.tiling_ is not None:
        (th, tw), (sh, sw) = detector.tiling_
        tile = f"{th}-px" if th == tw else f"{th} x {tw}-px"
        stride = f"{sh} px" if sh == sw else f"{sh} x {sw} px"
        text += (
            f", cut into {tile} tiles every {stride} whose maps are stitched (overlaps averaged); "
            f"image score = the maximum of the stitched map"
        )
    history = getattr(detector, "loss_history_", None)
    if history:
        text += f"; its network trained {len(history)} epochs (final training loss {history[-1]:.4g})"
    return text + "."


def write_evaluation_report(
    out_path: str | os.PathLike,
    evaluation: Evaluation,
    *,
    title: str = "anomalox report",
    metrics: dict[str, Any] | None = None,
    max_examples: int = 8,
    detector: Any = None,
) -> str:
    """Write the HTML report of an :func:`anomalox.evaluate` result (see :func:`write_report`).

    Parameters
    ----------
    out_path : str or path
        The HTML file to write.
    evaluation : Evaluation
        Its scores, labels, paths and PRO curve; its maps and masks when it kept them
        (``evaluate(..., keep_maps=True, keep_masks=True)``).
    title : str
    metrics : dict, optional
        The metrics table; default ``evaluation.metrics``.
    max_examples : int
        Images per example grid.
    detector : fitted detector, optional
        When the evaluation kept no maps: the detector that was evaluated, to inspect again only
        the (at most 2 × ``max_examples``) images the grids show. Without it the grids show no
        heatmaps.

    Returns
    -------
    str
        The path written. The threshold drawn is the detector's, else the F1-max threshold. With
        the detector's threshold and good images in the test set, the summary gives the realised
        false-alarm rate: the fraction of the good images scored above it (as ``predict``).
    """
    ev = evaluation
    threshold = ev.threshold if ev.threshold is not None else ev.metrics["f1_threshold"]
    good = ev.scores[ev.labels == 0]
    false_alarm_rate = None if ev.threshold is None or good.size == 0 else float(np.mean(good > ev.threshold))
    maps: Any = ev.maps
    masks: Any = ev.masks
    if maps is None and detector is not None and all(p is not None for p in ev.paths):
        shown = example_indices(ev.scores, ev.labels, max_examples)
        inspection = detector.inspect([ev.paths[i] for i in shown])
        maps, masks = [None] * len(ev.paths), None
        for i, amap in zip(shown, inspection.maps):
            maps[i] = amap
        if ev.mask_sources is not None:
            masks = [None] * len(ev.paths)
            for i in shown:
                if ev.mask_sources[i] is not None:
                    masks[i] = mask_for_map(ev.mask_sources[i], ev.paths[i], maps[i], detector)
    return write_report(
        out_path,
        paths=ev.paths,
        scores=ev.scores,
        threshold=threshold,
        gt_labels=ev.labels,
        maps=maps,
        gt_masks=masks,
        metrics=ev.metrics if metrics is None else metrics,
        title=title,
        max_examples=max_examples,
        pro=ev.pro_curve,
        false_alarm_rate=false_alarm_rate,
        setup=None if detector is None else describe_setup(detector),
    )


def _heatmap_names(paths: Sequence[str | None]) -> list[str]:
    """One file name per image: its path below the images' common folder, so that test/good/000 and
    test/crack/000 differ; ``image_<i>`` where there is no path."""
    real = [os.path.abspath(p) for p in paths if p]
    root = os.path.commonpath([os.path.dirname(p) for p in real]) if real else ""
    names = []
    for i, path in enumerate(paths):
        rel = os.path.splitext(os.path.relpath(os.path.abspath(path), root))[0] if path else f"image_{i:05d}"
        names.append(rel.replace(os.sep, "_") + "_map.png")
    return names


def write_heatmaps(
    out_dir: str | os.PathLike,
    paths: Sequence[str | None],
    maps: Any,
    *,
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.5,
) -> list[str]:
    """Save one heatmap overlay PNG per image into ``out_dir``.

    Parameters
    ----------
    out_dir : str or path
        Folder to write into (created).
    paths : sequence of str or None, length N
        The images under the maps; None draws the map over a gray canvas of the map's size.
    maps : array (N, H, W) or list of (H_i, W_i) float arrays
    vmin, vmax : float, optional
        The colour scale (see :func:`overlay`); default the min and max over all maps, so colours
        compare across images.
    alpha : float
        Weight of the colour map in the blend.

    Returns
    -------
    list of str
        The files written, in order: ``<path below the common folder, "/" as "_">_map.png``
        (``image_<i>_map.png`` without a path).
    """
    maps = list(maps)
    if len(maps) != len(paths):
        raise ValueError(f"maps: expected {len(paths)} maps (one per path), got {len(maps)}")
    lo = vmin if vmin is not None else float(min((np.min(m) for m in maps), default=0.0))
    hi = vmax if vmax is not None else float(max((np.max(m) for m in maps), default=1.0))
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    written = []
    for path, amap, name in zip(paths, maps, _heatmap_names(paths)):
        image = path if path else np.full((*np.shape(np.squeeze(amap)), 3), 128, np.uint8)
        file = os.path.join(out, name)
        Image.fromarray(overlay(image, amap, lo, hi, alpha)).save(file)
        written.append(file)
    return written


# Columns of a comparison where a higher value is better, and where a lower one is.
_HIGHER_BETTER = ("image_auroc", "image_aupr", "f1_max", "pixel_auroc", "aupro")
_LOWER_BETTER = ("fit_s", "score_s", "peak_rss_mib")


def write_comparison_report(out_path: str | os.PathLike, table: Any, title: str = "anomalox comparison") -> str:
    """Write the table of :func:`anomalox.compare` as a self-contained HTML page: one row per
    detector side by side, the best value of each metric and cost column in bold, errors shown in
    their row.

    Parameters
    ----------
    out_path : path
        The HTML file to write (its folder is created).
    table : pandas.DataFrame or list of dict
        What ``compare`` returned.
    title : str

    Returns
    -------
    str
        The path written.
    """
    rows = table.to_dict("records") if hasattr(table, "to_dict") else [dict(r) for r in table]
    if not rows:
        raise ValueError("table: expected at least one row, got none")
    from anomalox.comparison import COLUMNS

    def number(v: Any) -> float | None:
        try:
            f = float(v)
        except (TypeError, ValueError):
            return None
        return f if np.isfinite(f) else None

    best: dict[str, float] = {}
    for col in (*_HIGHER_BETTER, *_LOWER_BETTER):
        values = [x for x in (number(r.get(col)) for r in rows) if x is not None]
        if values:
            best[col] = max(values) if col in _HIGHER_BETTER else min(values)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = []
    for r in rows:
        cells = []
        for col in COLUMNS:
            v = r.get(col)
            x = number(v)
            if col in ("detector", "error") or x is None:
                text = "" if v is None or (isinstance(v, float) and not np.isfinite(v)) else html.escape(str(v))
            else:
                text = f"{x:.4f}" if col not in ("fit_s", "score_s", "peak_rss_mib") else f"{x:.1f}"
            if x is not None and best.get(col) == x:
                text = f"<b>{text}</b>"
            cells.append(f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return _write_page(
        out_path,
        title,
        [
            f"<h1>{html.escape(title)}</h1>",
            "<p>Each detector fitted on the same images and evaluated on the same test set, each in its own "
            "process (fit_s / score_s: wall seconds of fit and of the evaluation; peak_rss_mib: that process's "
            "peak memory; false_alarm_rate: good test images scored above the detector's threshold). Bold: the "
            "best value of a column.</p>",
            f'<table id="comparison"><tr>{head}</tr>{"".join(body)}</table>',
        ],
    )
