"""DFM (Ahuja et al. 2019, deep feature modeling): PCA of pooled deep features, as in anomalib."""

from __future__ import annotations

from collections.abc import Iterator
from numbers import Real
from typing import Any

import numpy as np
import torch

from anomalox.detectors._base import BaseDetector
from anomalox.params import POSITIVE_INT, Interval, Options


class DFM(BaseDetector):
    """DFM anomaly detector: a PCA model of each image's pooled deep features.

    Features: one tap, averaged over non-overlapping ``pooling_kernel_size`` squares (no padding:
    trailing rows and columns that do not fill a square are dropped, as in anomalib), flattened per
    image to a vector of C · h · w. Fitting is a PCA of these vectors (SVD of the centred training
    matrix in float64), keeping the fewest components whose explained variance ratio exceeds
    ``pca_variance`` (scikit-learn's rule; anomalib 2.7 keeps one fewer).

    Scores (float64 internally):

    - ``"fre"``: the squared feature reconstruction error ``||x - mean - P^T P (x - mean)||^2``.
    - ``"nll"``: the Gaussian negative log-likelihood in the PCA space with the diagonal covariance
      of the component variances: ``sum_j z_j^2 / var_j + sum_j log var_j``, that is ``2 · NLL``
      with the constant ``n_components · log(2 pi)`` dropped (anomalib's score; anomalib divides
      by N instead of N - 1 in the variances, which changes neither the ranking nor the threshold's
      quantile position).

    The map is the per-cell squared reconstruction error summed over channels on the pooled grid,
    for both scores (anomalib gives no map for ``"nll"``); upsampled and smoothed (sigma 4).

    Parameters
    ----------
    backbone : str
        See ``anomalox.backbone.BACKBONES``; default ``"efficientnet_lite0"`` (bundled weights).
    layers : sequence of one str, optional
        The tap; default Lite: ``("_blocks.10",)``, ResNets: ``("layer3",)``.
    pooling_kernel_size : int
        Side of the averaging squares; 1: no pooling. The tap's grid must be at least this big.
    pca_variance : float in (0, 1)
        Fraction of the training variance the kept components explain.
    score : {"fre", "nll"}
    <shared parameters>

    Attributes
    ----------
    mean_ : (D,) float32 array
    components_ : (n_components_, D) float32 array
        Unit rows, each signed so that its largest-magnitude entry is positive.
    explained_variance_ : (n_components_,) float32 array
        Variances along the components (ddof 1).
    explained_variance_ratio_ : (n_components_,) float32 array
    n_components_ : int; n_train_images_ : int
    threshold_, pixel_threshold_ : float or None
    calibration_scores_, pixel_calibration_scores_ : (n,) float32 array or None
        The calibration images' scores and maximum map values the thresholds come from.
    backbone_ : anomalox.Backbone

    Examples
    --------
    >>> model = DFM(score="nll").fit("magnetic_tile/train/good")
    >>> scores = model.decision_function(["tile_1.png", "tile_2.png"])
    """

    learned_attributes = (
        "mean_",
        "components_",
        "explained_variance_",
        "explained_variance_ratio_",
        "n_components_",
        "n_train_images_",
    )
    _default_layers = {"efficientnet_lite": ("_blocks.10",), "resnet": ("layer3",)}
    _parameter_constraints = {
        "pooling_kernel_size": [POSITIVE_INT],
        "pca_variance": [Interval(Real, 0.0, 1.0, closed="neither")],
        "score": [Options({"fre", "nll"})],
    }

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: Any = None,
        pooling_kernel_size: int = 4,
        pca_variance: float = 0.97,
        score: str = "fre",
        image_size: Any = 256,
        crop_size: Any = None,
        weights: Any = None,
        device: str = "cpu",
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
        self.pooling_kernel_size = pooling_kernel_size
        self.pca_variance = pca_variance
        self.score = score
        self.image_size = image_size
        self.crop_size = crop_size
        self.weights = weights
        self.device = device
        self.batch_size = batch_size
        self.validation_fraction = validation_fraction
        self.contamination = contamination
        self.calibration = calibration
        self.n_folds = n_folds
        self.random_state = random_state
        self.n_threads = n_threads
        self.verbose = verbose

    def _check_params(self) -> None:
        if self.layers is not None and (isinstance(self.layers, str) or len(tuple(self.layers)) != 1):
            raise ValueError(
                f"layers: DFM uses one tap, expected a sequence of one name such as ('layer3',), got {self.layers!r}"
            )

    def _pool(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        (name, tap), k = next(iter(features.items())), int(self.pooling_kernel_size)
        if k > 1:
            if min(tap.shape[-2:]) < k:
                raise ValueError(
                    f"pooling_kernel_size: {k} is larger than the {tuple(tap.shape[-2:])} grid of tap {name!r}; "
                    f"use a smaller kernel or a larger image_size"
                )
            tap = torch.nn.functional.avg_pool2d(tap, k)
        return tap

    def _fit_features(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, Any]:
        x = torch.cat([self._pool(feats).flatten(1) for feats in batches]).double()
        if x.shape[0] < 2:
            raise ValueError(f"X: DFM needs at least 2 training images (after the validation hold-out), got {len(x)}")
        mean = x.mean(0)
        _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
        variance = s**2 / (x.shape[0] - 1)
        ratio = variance / variance.sum().clamp_min(torch.finfo(torch.float64).tiny)
        count = int(np.searchsorted(torch.cumsum(ratio, 0).numpy(), self.pca_variance, side="right")) + 1
        count = min(count, int((s > s[0] * 1e-12).sum()) if s[0] > 0 else 1)
        components = vh[:count]
        sign = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))
        f32 = lambda t: np.ascontiguousarray(t.numpy(), dtype=np.float32)  # noqa: E731
        return {
            "mean_": f32(mean),
            "components_": f32(components * sign),
            "explained_variance_": f32(variance[:count]),
            "explained_variance_ratio_": f32(ratio[:count]),
            "n_components_": count,
            "n_train_images_": int(x.shape[0]),
        }

    def _score_features(self, features: dict[str, torch.Tensor]) -> tuple[np.ndarray, torch.Tensor]:
        pooled = self._pool(features)
        n, c, h, w = pooled.shape
        if c * h * w != self.mean_.shape[0]:
            raise ValueError(
                f"X: the backbone gives {c * h * w}-dim pooled features but mean_ holds {self.mean_.shape[0]}-dim "
                f"ones; the detector was changed after fit: refit it"
            )
        centred = pooled.flatten(1).double() - torch.from_numpy(self.mean_).double()
        components = torch.from_numpy(self.components_).double()
        z = centred @ components.T
        residual = (centred - z @ components) ** 2
        maps = residual.reshape(n, c, h, w).sum(1)
        if self.score == "fre":
            scores = residual.sum(1)
        else:
            variance = torch.from_numpy(self.explained_variance_).double().clamp_min(1e-12)
            scores = (z**2 / variance).sum(1) + variance.log().sum()
        return scores.float().numpy(), maps.float()

    def _summary(self) -> str:
        return f"{self.n_components_} of {self.mean_.shape[0]} PCA dims ({self.score}), {self.n_train_images_:,} images"
