"""PatchCore (Roth et al., CVPR 2022): a coreset memory bank of locally aware patch features."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from numbers import Real
from typing import IO, Any

import numpy as np
import torch

from anomalox import ops
from anomalox.detectors._base import BaseDetector, as_rows, seed_from, stack_taps, writable
from anomalox.params import POSITIVE_INT, Hidden, Interval, Options, Unchecked


def _read_rows(spill: IO[bytes], indices: np.ndarray, width: int) -> np.ndarray:
    """Rows `indices` of the spilled (N, width) float32 file, with plain reads in file order.

    Not a memory map: mapped pages of the file would count toward RSS while resident, and fault
    read-ahead maps far more than the selected rows.
    """
    rows = np.empty((len(indices), width), np.float32)
    row_bytes = width * 4
    spill.flush()
    fd = spill.fileno()
    for k in np.argsort(indices, kind="stable"):
        data = os.pread(fd, row_bytes, int(indices[k]) * row_bytes)
        rows[k] = np.frombuffer(data, dtype=np.float32)
    return rows


def _read_all(spill: IO[bytes], n_rows: int, width: int) -> np.ndarray:
    """The whole spilled (n_rows, width) float32 file as one array."""
    spill.flush()
    spill.seek(0)
    return np.fromfile(spill, dtype=np.float32, count=n_rows * width).reshape(n_rows, width)


class PatchCore(BaseDetector):
    """PatchCore anomaly detector.

    Patch features: each tap averaged over 3 × 3 neighbourhoods (stride 1, padding counted), deeper
    taps resized bilinearly to the shallowest tap's grid, concatenated. Fitting keeps a greedy
    k-center coreset of them (selected on a seeded random projection to ``projection_dim``) as the
    memory bank. A patch's score is its Euclidean distance to the nearest bank entry; the image
    score is the maximum patch score, re-weighted as in the paper (and anomalib) when
    ``reweight=True``: by ``1 - softmax`` of the distances from that patch to the ``num_neighbors``
    bank entries nearest its own nearest entry. Maps are upsampled and smoothed (sigma 4).

    Fitting streams: full-width patch features and their projections go to temporary files
    with plain writes; only the projections are read back, as one array that the selection
    reorders in place, so peak memory grows with N × projection_dim plus the bank. The selection
    therefore picks by projected distance, as anomalib does; ``anomalox.ops.coreset`` on features
    held in memory picks by original-space distance instead (better coverage).

    Mergeable (``partial_fit``, ``merge``, ``anomalox.distributed.fit``): each shard keeps a
    coreset of twice ``coreset_ratio`` of its patches (full width: its partial state), and the
    merged detector selects ``coreset_ratio`` of all the shards' patches from their union, in the
    same projected space. One shard alone (a single ``partial_fit``) thus gives a bank selected
    from a pre-selected coreset, not ``fit``'s.

    Default ``batch_size`` 4: on the CPU, larger batches add activation memory (about 35 MB per
    Lite0 image at 256 px) without running faster; raise it on a GPU.

    Parameters
    ----------
    backbone : str
        See ``anomalox.backbone.BACKBONES``; default ``"efficientnet_lite0"`` (bundled weights).
    layers : sequence of str, optional
        Taps; default Lite: ``("_blocks.4", "_blocks.10")``, ResNets: ``("layer2", "layer3")``.
    coreset_ratio : float in (0, 1]
        Fraction of the training patches kept; 1 keeps all (no selection).
    num_neighbors : int
        Bank entries used by the re-weighting.
    reweight : bool
        Re-weight the image score as in the paper; False: the plain maximum patch score.
    projection_dim : int or None
        Dimension of the random projection used to select the coreset; None selects on the full
        features (slower). Features no wider than this are not projected.
    <shared parameters>

    Attributes
    ----------
    memory_bank_ : (M, C) float32 array
    threshold_, pixel_threshold_ : float or None
    calibration_scores_, pixel_calibration_scores_ : (n,) float32 array or None
        The calibration images' scores and maximum map values the thresholds come from.
    backbone_ : anomalox.Backbone

    Examples
    --------
    >>> model = PatchCore().fit("magnetic_tile/train/good")
    >>> scores = model.decision_function(["tile_1.png", "tile_2.png"])
    """

    learned_attributes = ("memory_bank_", "n_train_patches_")
    mergeable = True
    _default_layers = {"efficientnet_lite": ("_blocks.4", "_blocks.10"), "resnet": ("layer2", "layer3")}
    _parameter_constraints = {
        # 1 (keep every patch) is allowed, but the message names the selection's range.
        "coreset_ratio": [Interval(Real, 0.0, 1.0, closed="neither"), Hidden(Options({1}))],
        "num_neighbors": [POSITIVE_INT],
        "reweight": [Unchecked("its truth value")],
        "projection_dim": [POSITIVE_INT, Hidden(None)],
    }

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: Any = None,
        coreset_ratio: float = 0.1,
        num_neighbors: int = 9,
        reweight: bool = True,
        projection_dim: int | None = 128,
        image_size: Any = 256,
        crop_size: Any = None,
        keep_aspect_ratio: bool = False,
        tile_size: Any = None,
        tile_stride: Any = None,
        weights: Any = None,
        device: str = "cpu",
        preprocessing: Any = None,
        batch_size: int = 4,
        validation_fraction: float = 0.1,
        contamination: float = 0.01,
        calibration: str = "holdout",
        n_folds: int = 5,
        random_state: Any = 0,
        n_threads: int | None = None,
        verbose: bool = False,
    ) -> None:
        self.backbone = backbone
        self.layers = layers
        self.coreset_ratio = coreset_ratio
        self.num_neighbors = num_neighbors
        self.reweight = reweight
        self.projection_dim = projection_dim
        self.image_size = image_size
        self.crop_size = crop_size
        self.keep_aspect_ratio = keep_aspect_ratio
        self.tile_size = tile_size
        self.tile_stride = tile_stride
        self.weights = weights
        self.device = device
        self.preprocessing = preprocessing
        self.batch_size = batch_size
        self.validation_fraction = validation_fraction
        self.contamination = contamination
        self.calibration = calibration
        self.n_folds = n_folds
        self.random_state = random_state
        self.n_threads = n_threads
        self.verbose = verbose

    def _embed(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return stack_taps(features, tuple(features), pool=3)

    def _projection(self, width: int, seed: int) -> torch.Tensor | None:
        """The seeded random projection the selection works in (None: features no wider than it)."""
        if self.projection_dim is None or width <= self.projection_dim:
            return None
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(width, self.projection_dim, generator=gen) / math.sqrt(self.projection_dim)

    def _fit_features(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, Any]:
        bank, n_rows = self._select(batches, float(self.coreset_ratio))
        return {"memory_bank_": bank, "n_train_patches_": n_rows}

    def _select(self, batches: Iterator[dict[str, torch.Tensor]], ratio: float) -> tuple[np.ndarray, int]:
        """The coreset of `ratio` of the patches of `batches` (all of them at 1), and their count."""
        seed = seed_from(self.random_state)
        projection = None
        n_rows, width = 0, 0
        # Full-width rows and their projections both go to temporary files with plain writes;
        # the selection space is read back as one array that the selection then works in.
        with (
            tempfile.TemporaryFile(prefix="anomalox-patches-") as spill,
            tempfile.TemporaryFile(prefix="anomalox-projected-") as projected,
        ):
            for feats in batches:
                rows = as_rows(self._embed(feats))
                if n_rows == 0:
                    width = rows.shape[1]
                    projection = self._projection(width, seed)
                rows.numpy().tofile(spill)
                if projection is not None:
                    (rows @ projection).numpy().tofile(projected)
                n_rows += rows.shape[0]
            if ratio >= 1:
                return _read_all(spill, n_rows, width), n_rows
            if projection is not None:
                space = _read_all(projected, n_rows, projection.shape[1])
            else:
                space = _read_all(spill, n_rows, width)
            count = max(1, int(ratio * n_rows))
            with self._progress(1, f"fit: coreset of {count:,} / {n_rows:,} patches", unit="step") as bar:
                chosen = ops.coreset(
                    space, count, projection_dim=None, seed=seed, n_threads=self.n_threads, overwrite_features=True
                )
                bar.update(1)
            del space
            bank = _read_rows(spill, np.asarray(chosen), width)
        return bank, n_rows

    # A shard keeps this many times coreset_ratio of its patches; the merged detector selects
    # coreset_ratio of all patches from the union of the shards' coresets.
    _shard_oversampling: float = 2.0

    def _partial_features(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, Any]:
        bank, n_rows = self._select(batches, min(1.0, self._shard_oversampling * float(self.coreset_ratio)))
        return {"bank": bank, "n_patches": n_rows}

    def _merge_partials(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        if a["bank"].shape[1] != b["bank"].shape[1]:
            raise ValueError(
                f"other: PatchCore partial states of {a['bank'].shape[1]}- and {b['bank'].shape[1]}-dim patch "
                f"features cannot merge (another backbone or layers)"
            )
        return {"bank": np.concatenate([a["bank"], b["bank"]]), "n_patches": int(a["n_patches"]) + int(b["n_patches"])}

    def _finish_partial(self, data: dict[str, Any]) -> dict[str, Any]:
        bank, n_rows = data["bank"], int(data["n_patches"])
        count = max(1, int(float(self.coreset_ratio) * n_rows))
        if count < bank.shape[0]:
            seed = seed_from(self.random_state)
            projection = self._projection(bank.shape[1], seed)
            space = bank.copy() if projection is None else (torch.from_numpy(writable(bank)) @ projection).numpy()
            chosen = ops.coreset(
                space, count, projection_dim=None, seed=seed, n_threads=self.n_threads, overwrite_features=True
            )
            bank = np.ascontiguousarray(bank[np.asarray(chosen)])
        return {"memory_bank_": bank, "n_train_patches_": n_rows}

    def _score_features(self, features: dict[str, torch.Tensor]) -> tuple[np.ndarray, torch.Tensor]:
        embedding = self._embed(features)
        n, width, h, w = embedding.shape
        bank = torch.from_numpy(self.memory_bank_)
        if width != bank.shape[1]:
            raise ValueError(
                f"X: the backbone gives {width}-dim patch features but memory_bank_ holds {bank.shape[1]}-dim "
                f"ones; the detector was changed after fit: refit it"
            )
        rows = as_rows(embedding)
        dist, idx = ops.knn(rows, bank, 1, n_threads=self.n_threads)
        patch = dist[:, 0].reshape(n, h * w)
        best, where = patch.max(dim=1)
        if not self.reweight or self.num_neighbors == 1:
            return best.numpy(), patch.reshape(n, h, w)
        image = torch.arange(n)
        worst_rows = rows.reshape(n, h * w, width)[image, where]
        nearest = bank[idx[:, 0].reshape(n, h * w)[image, where]]
        _, support = ops.knn(nearest, bank, min(self.num_neighbors, bank.shape[0]), n_threads=self.n_threads)
        spread = torch.linalg.vector_norm(worst_rows[:, None, :] - bank[support], dim=-1)
        weight = 1.0 - torch.softmax(spread, dim=1)[:, 0]
        return (weight * best).numpy(), patch.reshape(n, h, w)

    def _summary(self) -> str:
        m, c = self.memory_bank_.shape
        return f"memory bank {m:,} x {c} of {self.n_train_patches_:,} patches"
