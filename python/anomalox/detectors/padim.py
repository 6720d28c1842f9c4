"""PaDiM (Defard et al., ICPR 2021): a Gaussian of patch features at every position."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from anomalox import ops
from anomalox.detectors._base import BaseDetector, seed_from, stack_taps
from anomalox.detectors.families import padim_n_features_for_width, rules_for
from anomalox.params import POSITIVE_INT, Hidden


class PaDiM(BaseDetector):
    """PaDiM anomaly detector.

    The taps are stacked on the first tap's grid (deeper taps resized with nearest neighbours, as
    anomalib does), a seeded random subset of ``n_features`` channels is kept, and a Gaussian
    (mean, covariance with ddof=1 plus 0.01·I) is accumulated batch by batch at every grid
    position in float64. The map is the Mahalanobis distance, upsampled and smoothed (sigma 4);
    the image score is the map's maximum.

    Memory: H·W·n_features² · 8 bytes while fitting (Lite0 at 256 px: 64·64·100² → 328 MB), and
    the float32 inverse covariances (half that) once fitted.

    Tiled (``tile_size``), a Gaussian is fitted at every position of every tile position, so every
    image must have the same size; memory is the above per tile position, with H·W the tile's
    feature grid (Lite0, 256-px tiles, 100 features: 328 MB while fitting and 164 MB fitted per
    tile position; a 1600 × 800 image in 256-px tiles without overlap has 7 × 4 = 28 of them).

    Mergeable (``partial_fit``, ``merge``, ``anomalox.distributed.fit``): a partial state is the
    float64 count, mean and centred scatter at every position, H·W·n_features·(n_features + 1)·8
    bytes (Lite0 at 256 px, 100 features: 331 MB; WRN-50-2 at 256 px, 550 features on its 64 × 64
    layer1 grid: 9.9 GB), merged exactly by Chan et al.'s pairwise update.

    Default ``batch_size`` 16 (not 4 as for PatchCore): every batch reads all the
    H·W·n_features² statistics once, so small batches cost time.

    Parameters
    ----------
    backbone : str
        Default ``"efficientnet_lite0"``.
    layers : sequence of str, optional
        Default Lite: ``("_blocks.2", "_blocks.4", "_blocks.10")`` (strides 4, 8, 16: 176
        channels); ResNets: ``("layer1", "layer2", "layer3")``.
    n_features : int, optional
        Channels kept; default by backbone family (``anomalox.detectors.families``): 550 for
        resnet50 / wide_resnet50_2 and 100 otherwise; for a torch module, 550 when the taps have
        1,024 channels or more together, else 100 (capped at the number of channels).
    <shared parameters>

    Attributes
    ----------
    channels_ : (n_features,) int64 array, the kept channels
    mean_ : (T·H·W, n_features) float32 array
    inv_cov_ : (T·H·W, n_features, n_features) float32 array
        T tile positions (1 untiled), each an H × W feature grid (``grid_``).
    input_size_ : (height, width)
        The preprocessed image size the Gaussians were fitted on; images must come out at it.
    threshold_, pixel_threshold_ : float or None
    calibration_scores_, pixel_calibration_scores_ : (n,) float32 array or None
        The calibration images' scores and maximum map values the thresholds come from.
    """

    learned_attributes = ("channels_", "mean_", "inv_cov_", "grid_", "input_size_")
    _learned_defaults = {"input_size_": None}
    per_position = True
    mergeable = True
    _default_layers = {
        "efficientnet_lite": ("_blocks.2", "_blocks.4", "_blocks.10"),
        "resnet": ("layer1", "layer2", "layer3"),
    }
    _parameter_constraints = {"n_features": [POSITIVE_INT, Hidden(None)]}

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: Any = None,
        n_features: int | None = None,
        image_size: Any = 256,
        crop_size: Any = None,
        keep_aspect_ratio: bool = False,
        tile_size: Any = None,
        tile_stride: Any = None,
        weights: Any = None,
        device: str = "cpu",
        preprocessing: Any = None,
        batch_size: int = 16,
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
        self.n_features = n_features
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

    def _embed(self, features: dict[str, torch.Tensor], channels: np.ndarray) -> torch.Tensor:
        """(n, C, T·h, w): each image's T tiles' grids one below the other (T = 1 untiled)."""
        stacked = stack_taps(features, tuple(features), mode="nearest")[:, torch.from_numpy(channels)]
        rows, c, h, w = stacked.shape
        t = self._positions
        return stacked.reshape(rows // t, t, c, h, w).transpose(1, 2).reshape(rows // t, c, t * h, w).contiguous()

    def _accumulate(
        self, batches: Iterator[dict[str, torch.Tensor]]
    ) -> tuple[ops.GaussianAccumulator, np.ndarray, tuple[int, int]]:
        accumulator = ops.GaussianAccumulator(n_threads=self.n_threads)
        channels, grid = None, (0, 0)
        for feats in batches:
            if channels is None:
                total = sum(f.shape[1] for f in feats.values())
                wanted = self.n_features
                if wanted is None and isinstance(self.backbone, str):
                    wanted = rules_for(self.backbone).padim_n_features
                elif wanted is None:  # a torch module: by width (see families.padim_n_features_for_width)
                    wanted = padim_n_features_for_width(total)
                rng = np.random.default_rng(seed_from(self.random_state))
                channels = np.sort(rng.choice(total, size=min(wanted, total), replace=False)).astype(np.int64)
            embedding = self._embed(feats, channels)
            grid = (embedding.shape[2] // self._positions, embedding.shape[3])
            accumulator.partial_fit(embedding)
        assert channels is not None  # the base refuses an empty X before this
        return accumulator, channels, grid

    def _fit_features(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, Any]:
        accumulator, channels, grid = self._accumulate(batches)
        if accumulator.n_samples < 2:
            raise ValueError(f"X: PaDiM needs at least 2 training images, got {accumulator.n_samples}")
        mean, inv_cov = accumulator.finalize(eps=0.01)
        return {"channels_": channels, "mean_": mean.numpy(), "inv_cov_": inv_cov.numpy(), "grid_": grid}

    def _partial_features(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, Any]:
        accumulator, channels, grid = self._accumulate(batches)
        mean, scatter, n = accumulator.state()
        return {"channels": channels, "grid": grid, "mean": mean, "scatter": scatter, "n": n}

    def _accumulator(self, data: dict[str, Any]) -> ops.GaussianAccumulator:
        rows = data["mean"].shape[0]
        return ops.GaussianAccumulator.from_state(
            data["mean"], data["scatter"], data["n"], rows // data["grid"][1], data["grid"][1], n_threads=self.n_threads
        )

    def _merge_partials(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        if not np.array_equal(a["channels"], b["channels"]) or tuple(a["grid"]) != tuple(b["grid"]):
            raise ValueError(
                "other: PaDiM partial states of different channels or feature grids cannot merge (random_state="
                "None draws new channels at every partial_fit: set an int; or another backbone, layers or image size)"
            )
        merged = self._accumulator(a).merge(self._accumulator(b))
        mean, scatter, n = merged.state()
        return {"channels": a["channels"], "grid": tuple(a["grid"]), "mean": mean, "scatter": scatter, "n": n}

    def _finish_partial(self, data: dict[str, Any]) -> dict[str, Any]:
        if data["n"] < 2:
            raise ValueError(f"X: PaDiM needs at least 2 training images, got {data['n']}")
        mean, inv_cov = self._accumulator(data).finalize(eps=0.01)
        return {"channels_": data["channels"], "mean_": mean, "inv_cov_": inv_cov, "grid_": tuple(data["grid"])}

    def _score_features(self, features: dict[str, torch.Tensor]) -> tuple[None, torch.Tensor]:
        embedding = self._embed(features, self.channels_)
        n, _, th, w = embedding.shape
        h = th // self._positions
        if (h, w) != tuple(self.grid_) or th * w != self.mean_.shape[0]:
            raise ValueError(
                f"X: the features form {self._positions} tile position(s) of a {(h, w)} grid but the Gaussians were "
                f"fitted on {self.mean_.shape[0]} positions, tiles of a {tuple(self.grid_)} grid; the detector was "
                f"changed after fit: refit it"
            )
        maps = ops.mahalanobis(
            embedding, torch.from_numpy(self.mean_), torch.from_numpy(self.inv_cov_), n_threads=self.n_threads
        )
        # (n, T·h, w) -> (n·T, h, w): one map per tile, image-major as the features came.
        return None, maps.reshape(n * self._positions, h, w)

    def _summary(self) -> str:
        h, w = self.grid_
        tiles = self.mean_.shape[0] // (h * w)
        where = f"{h} x {w} positions" + (f" of {tiles} tile positions" if tiles > 1 else "")
        return f"Gaussians at {where} over {len(self.channels_)} channels"
