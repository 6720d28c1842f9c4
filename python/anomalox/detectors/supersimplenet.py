"""SuperSimpleNet (Rolih, Fučka & Skočaj, ICPR 2024), unsupervised mode."""

from __future__ import annotations

from numbers import Real
from typing import Any

import numpy as np
import torch

from anomalox.detectors._trained import INPUT, TrainedDetector, tch_module
from anomalox.params import Interval

# The trainer's variable group of the adaptor (its own learning rate and weight decay).
ADAPTOR_GROUP = 1


class SuperSimpleNet(TrainedDetector):
    """SuperSimpleNet anomaly detector: segmentation and classification heads trained on frozen
    features with synthetic feature-space anomalies (one-class / self-supervised family).

    Features (anomalib's ``SupersimplenetModel``): the taps of the frozen pretrained backbone,
    upsampled bilinearly to twice the first tap's grid, concatenated and averaged over 3×3
    neighbourhoods; a trained 1×1 convolution (the adaptor) maps them to adapted features. While
    training, every mini-batch is doubled, and each copy gets Gaussian noise (σ ``noise_std``) added
    inside a random Perlin-noise mask thresholded at ``perlin_threshold`` (half the masks empty):
    a synthetic anomaly in feature space, no image is altered. A segmentation head (1×1 conv to
    1024 channels, batch norm, LeakyReLU 0.2, 1×1 conv to 1) predicts the mask from the noised
    adapted features; a classification head (5×5 conv to 128 channels, batch norm, ReLU, global max
    and mean, with the map's max and mean, a linear layer) predicts whether the item was noised
    from the noised raw features and the map (without gradient into the segmentation head). Loss:
    focal loss (γ 4) and truncated L1 (margin ½) of the map, focal loss of the score.

    Map: the segmentation head's logits, upsampled bilinearly to the input size and smoothed with a
    Gaussian of σ 4 (anomalib truncates its kernel at 3σ, anomalox at 4σ) — anomalib then applies a
    sigmoid, which changes no ranking, threshold decision or metric; image score: the
    classification head's logit (anomalib: its sigmoid). Tiled (``tile_size``), the score is the
    maximum of the stitched map. The heads are convolutional: any image size is scored.

    Optimiser as anomalib's: AdamW, the heads at ``learning_rate`` 2e-4 with weight decay 1e-5, the
    adaptor at ``adaptor_learning_rate`` 1e-4 with ``adaptor_weight_decay`` 1e-2 (AdamW's default),
    both × 0.4 from 80 % of the training steps and again from 90 % (``lr_schedule="multistep"``;
    anomalib counts ``int(0.8 · epochs)`` and ``int(0.9 · epochs)`` epochs: the same steps when the
    epochs are a multiple of 10, and early stopping is refused: the held-out loss sees no anomaly). The
    paper and anomalib train 300 epochs at batch 32 on a GPU; a step here runs the two heads on
    twice the batch at stride 4, which costs seconds on a CPU, so the default is 10 epochs (see
    BENCHMARKS.md for what that reaches and costs). Initialisation as anomalib's: convolution and
    linear weights xavier-normal, batch norms 1 and 0, biases torch's default, from the detector's
    own seeded generator; the masks and noise of each step are drawn from the seed and the step
    (on the CPU, whatever the device).

    Parameters
    ----------
    backbone : str
        See ``anomalox.backbone.BACKBONES``; default ``"efficientnet_lite0"`` (bundled weights).
        ResNets use the weights in the torch hub cache (anomalib's default: Wide-ResNet-50-2).
    layers : sequence of str, optional
        The taps; default Lite: ``("_blocks.4", "_blocks.10")`` (strides 8 and 16), ResNets:
        ``("layer2", "layer3")`` (anomalib's).
    perlin_threshold : float
        Where the Perlin noise passes this, the feature noise is added (anomalib's 0.2).
    noise_std : float
        σ of the feature-space Gaussian noise (anomalib's 0.015).
    adaptor_learning_rate, adaptor_weight_decay : float
        The adaptor's AdamW rate and decay (anomalib's 1e-4 and 1e-2).
    <training parameters>
    <shared parameters>

    Attributes
    ----------
    weights_ : dict of str to float32 arrays
        ``adaptor.*`` and ``segdec.*`` (the heads, with their batch norms' running statistics).
    feature_shapes_ : tuple of (int, int, int)
        Each tap's (C, h, w) at the fitted size (the channels are what the heads are built for).
    loss_history_ : tuple of float
        The mean training loss of each epoch.
    threshold_, pixel_threshold_ : float or None
    calibration_scores_, pixel_calibration_scores_ : (n,) float32 array or None
    backbone_ : anomalox.Backbone

    Examples
    --------
    >>> model = SuperSimpleNet(max_epochs=5).fit("magnetic_tile/train/good")
    >>> result = model.inspect(["tile_1.png", "tile_2.png"])
    """

    learned_attributes = ("weights_", "feature_shapes_", "loss_history_")
    _weights_attribute = "weights_"
    _shapes_attribute = "feature_shapes_"
    _sigma = 4.0
    _default_layers = {"efficientnet_lite": ("_blocks.4", "_blocks.10"), "resnet": ("layer2", "layer3")}
    _parameter_constraints = {
        "perlin_threshold": [Interval(Real, -1.0, 1.0, closed="neither")],
        "noise_std": [Interval(Real, 0.0, None, closed="neither")],
        "adaptor_learning_rate": [Interval(Real, 0.0, None, closed="neither")],
        "adaptor_weight_decay": [Interval(Real, 0.0, None, closed="left")],
    }

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: Any = None,
        perlin_threshold: float = 0.2,
        noise_std: float = 0.015,
        adaptor_learning_rate: float = 1e-4,
        adaptor_weight_decay: float = 1e-2,
        max_epochs: int = 10,
        max_steps: int | None = None,
        optimizer: str = "adamw",
        learning_rate: float = 2e-4,
        momentum: float = 0.9,
        betas: Any = (0.9, 0.999),
        weight_decay: float = 1e-5,
        lr_schedule: str = "multistep",
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
        self.perlin_threshold = perlin_threshold
        self.noise_std = noise_std
        self.adaptor_learning_rate = adaptor_learning_rate
        self.adaptor_weight_decay = adaptor_weight_decay
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

    def _new_model(self, backbone: Any, seed: int, shapes: list[tuple[int, ...]] | None) -> Any:
        if not shapes or any(len(s) != 3 for s in shapes):
            raise ValueError(f"layers: expected taps of (C, h, w) features, got shapes {shapes!r}")
        model = tch_module().HeadModel.supersimplenet(
            backbone.name,
            list(backbone.layers),
            [int(s[0]) for s in shapes],
            (int(shapes[0][1]), int(shapes[0][2])),
            float(self.noise_std),
            float(self.perlin_threshold),
            seed,
            self._cuda(backbone),
            self._threads(),
        )
        model.set_group(ADAPTOR_GROUP, float(self.adaptor_learning_rate), float(self.adaptor_weight_decay))
        return model

    def _check_params(self) -> None:
        super()._check_params()
        if self.early_stopping_patience is not None:
            # The held-out loss is that of clean features (every mask and label 0), which pushing
            # every logit down minimises: it does not tell a better detector.
            raise ValueError(
                "early_stopping_patience: expected None (SuperSimpleNet's held-out loss, on clean features only, "
                f"does not measure detection), got {self.early_stopping_patience!r}"
            )

    def _score_features(self, features: dict[str, torch.Tensor]) -> tuple[np.ndarray, torch.Tensor]:
        x = features[INPUT]
        taps = [t.contiguous() for t in self._targets(features)]
        maps, scores = self._model().maps(taps, (int(x.shape[-2]), int(x.shape[-1])), "logits", self._threads())
        return scores.numpy(), maps

    def _summary(self) -> str:
        n = sum(int(np.prod(v.shape)) for v in self.weights_.values())
        return f"adaptor + heads {n:,} values, {self._epochs_summary()}"
