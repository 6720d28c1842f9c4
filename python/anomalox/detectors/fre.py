"""FRE (Ndiour, Ahuja & Tickoo, BMVC 2023, "FRE: A Fast Method For Anomaly Detection And Segmentation")."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from anomalox.detectors._trained import INPUT, TrainedDetector, tch_module
from anomalox.params import POSITIVE_INT


class FRE(TrainedDetector):
    """FRE anomaly detector: a shallow tied autoencoder reconstructs pooled frozen features.

    Features: one tap of the frozen pretrained backbone, averaged over non-overlapping
    ``pooling_kernel_size`` squares (no padding: trailing rows and columns that do not fill a
    square are dropped) and flattened per image to v of D = C · h' · w' values, as DFM's. A linear
    autoencoder with tied weights, r = (v Wᵀ + b_e) W + b_d with W of ``latent_dim`` × D, learns
    to reconstruct v from the good images (loss: the mean of (v − r)², anomalib's ``MSELoss``);
    what it has not seen, it reconstructs badly. This is DFM's reconstruction error with the
    subspace learned by gradient descent instead of an SVD: cheap to train, a useful baseline.

    Map: at each position of the pooled grid, the squared reconstruction error summed over the
    channels, upsampled bilinearly (align_corners false) to the input size, not smoothed (as
    anomalib's ``FREModel``). Image score: the sum of the map on the pooled grid (anomalib's; the
    squared norm of v − r). Tiled (``tile_size``), one autoencoder serves every tile (all tiles
    have one size) and the image score is the maximum of the stitched map. Untiled, every image
    must have the fitted size (D is fixed by it).

    Initialisation as anomalib's ``TiedAE``: W ~ U(−a, a), a = √(6 / (D + latent_dim))
    (``xavier_uniform_``), drawn from the detector's own seeded generator; biases 0. Optimiser
    Adam with learning rate 1e-3, as anomalib; anomalib sets no epoch count (its trainer's
    default applies). The default here, 50 epochs, is where the training loss stops falling on
    100 images at 256 px (13 steps per epoch; 200 epochs gave the same accuracy on Magnetic Tile);
    the autoencoder's steps take milliseconds, feature extraction (once per image) dominates.

    Parameters
    ----------
    backbone : str
        See ``anomalox.backbone.BACKBONES``; default ``"efficientnet_lite0"`` (bundled weights).
        ResNets use the weights in the torch hub cache (anomalib's default: ResNet-50 ``layer3``).
    layers : sequence of one str, optional
        The tap; default Lite: ``("_blocks.10",)`` (112 channels at stride 16), ResNets:
        ``("layer3",)``.
    pooling_kernel_size : int
        Side of the averaging squares (anomalib's default 2); 1: no pooling. The tap's grid must
        be at least this big.
    latent_dim : int
        The autoencoder's latent dimension (anomalib's default 220).
    <training parameters>
    <shared parameters>

    Attributes
    ----------
    weights_ : dict of str to float32 arrays
        ``weight`` (latent_dim, D), ``encoder_bias`` (latent_dim,), ``decoder_bias`` (D,).
    feature_shape_ : (int, int, int)
        The tap's (C, h, w) before pooling at the fitted size.
    loss_history_ : tuple of float
        The mean training loss of each epoch.
    input_size_ : (int, int) or None
        The preprocessed size the detector was fitted on (untiled images must have it).
    threshold_, pixel_threshold_ : float or None
    calibration_scores_, pixel_calibration_scores_ : (n,) float32 array or None
    backbone_ : anomalox.Backbone

    Examples
    --------
    >>> model = FRE().fit("magnetic_tile/train/good")
    >>> result = model.inspect(["tile_1.png", "tile_2.png"])
    """

    learned_attributes = ("weights_", "feature_shape_", "loss_history_", "input_size_")
    _weights_attribute = "weights_"
    _sigma = 0.0
    one_size_untiled = True
    _default_layers = {"efficientnet_lite": ("_blocks.10",), "resnet": ("layer3",)}
    _parameter_constraints = {"pooling_kernel_size": [POSITIVE_INT], "latent_dim": [POSITIVE_INT]}

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: Any = None,
        pooling_kernel_size: int = 2,
        latent_dim: int = 220,
        max_epochs: int = 50,
        max_steps: int | None = None,
        optimizer: str = "adam",
        learning_rate: float = 1e-3,
        momentum: float = 0.9,
        betas: Any = (0.9, 0.999),
        weight_decay: float = 0.0,
        lr_schedule: str = "constant",
        grad_clip_norm: float | None = None,
        early_stopping_patience: int | None = None,
        cache_features: bool = True,
        image_size: Any = 256,
        crop_size: Any = None,
        keep_aspect_ratio: bool = False,
        tile_size: Any = None,
        tile_stride: Any = None,
        weights: Any = None,
        device: str = "cpu",
        preprocessing: Any = None,
        batch_size: int = 8,
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
        self.latent_dim = latent_dim
        self.max_epochs = max_epochs
        self.max_steps = max_steps
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.betas = betas
        self.weight_decay = weight_decay
        self.lr_schedule = lr_schedule
        self.grad_clip_norm = grad_clip_norm
        self.early_stopping_patience = early_stopping_patience
        self.cache_features = cache_features
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
        super()._check_params()
        if self.layers is not None and not isinstance(self.layers, str) and len(tuple(self.layers)) != 1:
            raise ValueError(
                f"layers: FRE reads one tap, expected one name such as ('layer3',), got {tuple(self.layers)!r}"
            )

    def _new_model(self, backbone: Any, seed: int, shapes: list[tuple[int, ...]] | None) -> Any:
        if shapes is None or len(shapes) != 1 or len(shapes[0]) != 3:
            raise ValueError(f"layers: FRE reads one tap of (C, h, w) features, got shapes {shapes!r}")
        c, h, w = (int(v) for v in shapes[0])
        (layer,) = backbone.layers
        return tch_module().HeadModel.fre(
            backbone.name,
            layer,
            c,
            (h, w),
            int(self.pooling_kernel_size),
            int(self.latent_dim),
            seed,
            self._cuda(backbone),
            self._threads(),
        )

    def _fitted_shapes(self) -> list[tuple[int, ...]] | None:
        return [tuple(int(v) for v in self.feature_shape_)]

    def _fit_features(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, Any]:
        model, history, (shape,) = self._fit_trained(batches)
        return {**self._trained_state(model, history), "feature_shape_": shape}

    def _score_features(self, features: dict[str, torch.Tensor]) -> tuple[np.ndarray, torch.Tensor]:
        x = features[INPUT]
        taps = [t.contiguous() for t in self._targets(features)]
        maps, scores = self._model().maps(taps, (int(x.shape[-2]), int(x.shape[-1])), "sum", self._threads())
        return scores.numpy(), maps

    def _summary(self) -> str:
        latent, dim = self.weights_["weight"].shape
        return f"autoencoder {dim:,} -> {latent} values, {self._epochs_summary()}"
