"""The ELPV solar-cell data set (electroluminescence images of PV cells) for demos.

The PyPI package ``elpv-dataset`` (no download at run time; its licence expression is
"CC-BY-NC-SA-4.0 AND Apache-2.0": the images are CC BY-NC-SA 4.0, **non-commercial use only**)
ships the 2,624 cell
images as 300x300 8-bit grayscale PNG files in ``elpv_dataset/data/images`` with
``elpv_dataset/data/labels.csv``: per cell a defect probability (0, 1/3, 2/3 or 1, the experts'
confidence that the cell is defective) and the cell type (``mono`` or ``poly``). Counts:
1,508 cells at probability 0, 295 at 1/3, 106 at 2/3 and 715 at 1.

:func:`load_elpv` returns the file paths inside the installed package (nothing is copied);
:func:`demo_split` makes the one-class split used by the demo.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import numpy as np

__all__ = ["demo_split", "load_elpv"]


def _data_dir() -> str:
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the ELPV data needs the package elpv-dataset: pip install elpv-dataset")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def load_elpv() -> tuple[list[str], np.ndarray, list[str]]:
    """All ELPV cells.

    Returns
    -------
    paths : list of str, length 2624
        Absolute paths of the PNG files shipped by ``elpv-dataset`` (300x300, 8-bit gray).
    probabilities : ndarray (2624,), float64
        Defect probability of each cell: 0, 1/3, 2/3 or 1.
    types : list of str
        ``"mono"`` or ``"poly"`` per cell.
    """
    root = _data_dir()
    paths, probs, types = [], [], []
    with open(os.path.join(root, "labels.csv"), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rel, prob, kind = line.split()
                paths.append(os.path.join(root, rel))
                probs.append(float(prob))
                types.append(kind)
    return paths, np.asarray(probs, dtype=np.float64), types


def demo_split(n_train: int, seed: int = 0, cell_type: str | None = None) -> dict[str, Any]:
    """A one-class split: train on defect-free cells, test on defect-free and defective ones.

    Parameters
    ----------
    n_train : int
        Number of probability-0 cells to train on, ``1 <= n_train < 1508`` (or fewer than the
        number of probability-0 cells of ``cell_type``), so the test set keeps some normals.
    seed : int
        Seed of the shuffle that picks the training cells.
    cell_type : {"mono", "poly"}, optional
        Keep only cells of this type (mono: 588 normal and 313 defective; poly: 920 and 402).

    Returns
    -------
    dict
        ``train``: list of n_train paths (probability 0), in shuffled order; ``test``: the
        other probability-0 cells followed by the probability-1 cells, each in file order;
        ``test_labels``: ndarray of int64, 0 for normal, 1 for defective. Cells with
        probability 1/3 or 2/3 are left out.
    """
    paths, probs, types = load_elpv()
    keep = np.ones(len(paths), bool)
    if cell_type is not None:
        if cell_type not in ("mono", "poly"):
            raise ValueError(f"cell_type: expected 'mono', 'poly' or None, got {cell_type!r}")
        keep = np.array([t == cell_type for t in types])
    normal = np.flatnonzero(keep & (probs == 0.0))
    defect = np.flatnonzero(keep & (probs == 1.0))
    if isinstance(n_train, bool) or not isinstance(n_train, (int, np.integer)):
        raise TypeError(f"n_train: expected an int, got {n_train!r}")
    if not 1 <= n_train < normal.size:
        raise ValueError(f"n_train: expected 1 <= n_train < {normal.size} (the normal cells), got {n_train}")
    order = np.random.default_rng(seed).permutation(normal.size)
    train = normal[order[:n_train]]
    rest = np.sort(normal[order[n_train:]])
    test = np.concatenate([rest, defect])
    labels = np.concatenate([np.zeros(rest.size, np.int64), np.ones(defect.size, np.int64)])
    return {"train": [paths[i] for i in train], "test": [paths[i] for i in test], "test_labels": labels}
