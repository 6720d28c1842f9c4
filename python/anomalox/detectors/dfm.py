"""DFM (Ahuja et al. 2019, deep feature modeling): PCA of pooled deep features, as in anomalib."""

from __future__ import annotations

from collections.abc import Iterator
from numbers import Real
from typing import Any

import numpy as np
import torch

from anomalox.detectors._base import BaseDetector, writable
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

    Tiled (``tile_size``), one PCA is fitted per tile position, so every image must have the same
    size; each position keeps its own number of components, and the image score is the maximum of
    the stitched map (the ``"fre"`` map, whatever ``score``). Memory per tile position: D floats of
    mean and K · D of components (K the most components any position keeps).

    Mergeable (``partial_fit``, ``merge``, ``anomalox.distributed.fit``): a partial state is the
    count, mean and centred scatter (D × D float64 per tile position: 25.7 MB for the default Lite0
    tap at 256 px, D = 1,792) for D up to 4,096; wider (WRN-50-2 ``layer3`` at 256 px: D = 16,384,
    a 2.1 GB scatter), the thin SVD of the shard's centred features (min(n, D) × D float64:
    131 KB per image). Both merge exactly (Chan et al.'s update; the SVD of the stacked
    s·Vᵀ rows and the scaled mean difference); the merged PCA follows ``fit``'s rules, from the
    scatter's eigenvectors or the merged SVD.

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
        Tiled: a leading axis of T tile positions on each array, (T, D), (T, K, D), (T, K), (T, K),
        with K the most components a position keeps; a position with fewer has zero rows (variance
        1, ratio 0) after its own, which change no score, and ``n_components_`` is a tuple of T ints.
    input_size_ : (height, width)
        The preprocessed image size the model was fitted on; images must come out at it.
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
        "input_size_",
    )
    _learned_defaults = {"input_size_": None}
    per_position = True
    mergeable = True
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
        self.pooling_kernel_size = pooling_kernel_size
        self.pca_variance = pca_variance
        self.score = score
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
                    f"use a smaller kernel, or a larger image_size or tile_size"
                )
            tap = torch.nn.functional.avg_pool2d(tap, k)
        return tap

    def _pooled_rows(self, batches: Iterator[dict[str, torch.Tensor]]) -> torch.Tensor:
        """(images, T, D) float64 pooled features, T tile positions (1 untiled)."""
        x = torch.cat([self._pool(feats).flatten(1) for feats in batches]).double()
        t = self._positions
        if x.shape[0] // t < 2:
            raise ValueError(
                f"X: DFM needs at least 2 training images (after the validation hold-out), got {x.shape[0] // t}"
            )
        return x.reshape(-1, t, x.shape[1])

    def _fit_features(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, Any]:
        x = self._pooled_rows(batches)
        return self._stack_positions([self._pca(x[:, p]) for p in range(x.shape[1])])

    def _stack_positions(self, fits: list[dict[str, Any]]) -> dict[str, Any]:
        """One position's PCA as is; several stacked on a leading axis with zero-padded components."""
        if len(fits) == 1:
            return fits[0]
        t, k = len(fits), max(f["n_components_"] for f in fits)

        def padded(name: str, fill: float) -> np.ndarray:
            out = np.full((t, k, *fits[0][name].shape[1:]), fill, dtype=np.float32)
            for p, f in enumerate(fits):
                out[p, : f["n_components_"]] = f[name]
            return out

        return {
            "mean_": np.stack([f["mean_"] for f in fits]),
            "components_": padded("components_", 0.0),
            "explained_variance_": padded("explained_variance_", 1.0),
            "explained_variance_ratio_": padded("explained_variance_ratio_", 0.0),
            "n_components_": tuple(int(f["n_components_"]) for f in fits),
            "n_train_images_": fits[0]["n_train_images_"],
        }

    def _pca(self, x: torch.Tensor) -> dict[str, Any]:
        """The PCA of the rows of `x` (n, D) float64."""
        mean = x.mean(0)
        _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
        return self._pca_from(mean, s, vh, int(x.shape[0]))

    def _pca_from(self, mean: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, n: int) -> dict[str, Any]:
        """The PCA attributes from the singular values `s` (descending) and right singular vectors
        `vh` of n centred rows (float64)."""
        variance = s**2 / (n - 1)
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
            "n_train_images_": n,
        }

    # Partial states (partial_fit / merge): up to this feature width the exact float64 scatter
    # (D × D per tile position, 134 MB at D = 4,096); wider, the thin SVD of the centred rows
    # (min(n, D) × D), which merges exactly too but grows with the images.
    _scatter_max_dim: int = 4096

    def _partial_features(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, Any]:
        x = torch.cat([self._pool(feats).flatten(1) for feats in batches]).double()
        x = x.reshape(-1, self._positions, x.shape[1])  # (images, T, D)
        n, d = x.shape[0], x.shape[2]
        mean = x.mean(0)
        centred = (x - mean).transpose(0, 1)  # (T, images, D)
        if d <= self._scatter_max_dim:
            return {"n": n, "mean": mean.numpy(), "scatter": (centred.transpose(1, 2) @ centred).numpy()}
        _, s, vh = torch.linalg.svd(centred, full_matrices=False)
        return {"n": n, "mean": mean.numpy(), "s": s.numpy(), "vh": vh.numpy()}

    def _merge_partials(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        if a["mean"].shape != b["mean"].shape or set(a) != set(b):
            raise ValueError(
                f"other: DFM partial states of pooled features {a['mean'].shape} and {b['mean'].shape} (tile "
                f"positions, width) cannot merge (another backbone, layer, pooling or image size)"
            )
        na, nb = int(a["n"]), int(b["n"])
        n = na + nb
        delta = b["mean"] - a["mean"]  # (T, D)
        merged = {"n": n, "mean": a["mean"] + delta * (nb / n)}
        if "scatter" in a:
            # Chan et al.'s pairwise merge of centred scatters.
            merged["scatter"] = a["scatter"] + b["scatter"] + (na * nb / n) * delta[:, :, None] * delta[:, None, :]
            return merged
        # The rows s·vh of each part and the scaled mean difference have the merged centred
        # scatter as their Gram matrix; their thin SVD is the merged one.
        rows = np.concatenate(
            [a["s"][..., None] * a["vh"], b["s"][..., None] * b["vh"], np.sqrt(na * nb / n) * delta[:, None, :]], axis=1
        )
        _, s, vh = np.linalg.svd(rows, full_matrices=False)
        keep = min(n, rows.shape[2])
        merged["s"], merged["vh"] = s[:, :keep], vh[:, :keep]
        return merged

    def _finish_partial(self, data: dict[str, Any]) -> dict[str, Any]:
        n = int(data["n"])
        if n < 2:
            raise ValueError(f"X: DFM needs at least 2 training images, got {n}")
        fits = []
        for p in range(data["mean"].shape[0]):
            mean = torch.from_numpy(writable(data["mean"][p]))
            if "scatter" in data:
                # Eigenvalues of the scatter are the squared singular values of the centred rows;
                # below 1e-12 of the largest they are rounding noise of the eigensolver: null.
                w, v = torch.linalg.eigh(torch.from_numpy(writable(data["scatter"][p])))
                w, v = w.flip(0), v.flip(1)
                w = torch.where(w > w[0] * 1e-12, w, torch.zeros_like(w))
                s, vh = w.sqrt(), v.T
            else:
                s, vh = torch.from_numpy(writable(data["s"][p])), torch.from_numpy(writable(data["vh"][p]))
            fits.append(self._pca_from(mean, s, vh, n))
        return self._stack_positions(fits)

    def _score_features(self, features: dict[str, torch.Tensor]) -> tuple[np.ndarray, torch.Tensor]:
        pooled = self._pool(features)
        n, c, h, w = pooled.shape
        t = self._positions
        # Untiled: one position; the arrays then have no position axis (as before tiling existed).
        mean = torch.from_numpy(self.mean_).double().reshape(-1, self.mean_.shape[-1])
        if c * h * w != mean.shape[1] or t != mean.shape[0]:
            raise ValueError(
                f"X: the backbone gives {t} tile position(s) of {c * h * w}-dim pooled features but mean_ holds "
                f"{mean.shape[0]} of {mean.shape[1]}-dim ones; the detector was changed after fit: refit it"
            )
        components = torch.from_numpy(self.components_).double().reshape(t, -1, mean.shape[1])
        variance = torch.from_numpy(self.explained_variance_).double().reshape(t, -1).clamp_min(1e-12)
        centred = pooled.flatten(1).double().reshape(n // t, t, -1) - mean  # (images, T, D)
        z = torch.einsum("ntd,tkd->ntk", centred, components)
        residual = (centred - torch.einsum("ntk,tkd->ntd", z, components)) ** 2
        maps = residual.reshape(n, c, h, w).sum(1)
        if self.score == "fre":
            scores = residual.reshape(n, -1).sum(1)
        else:
            scores = ((z**2 / variance).sum(-1) + variance.log().sum(-1)).reshape(n)
        return scores.float().numpy(), maps.float()

    def _summary(self) -> str:
        if self.mean_.ndim == 1:
            return f"{self.n_components_} of {self.mean_.shape[0]} PCA dims ({self.score}), {self.n_train_images_:,} images"
        t, d = self.mean_.shape
        return (
            f"{min(self.n_components_)}-{max(self.n_components_)} of {d} PCA dims at each of {t} tile positions "
            f"({self.score}), {self.n_train_images_:,} images"
        )
