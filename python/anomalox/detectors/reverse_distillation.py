"""Reverse Distillation (Deng & Li 2022, "Anomaly Detection via Reverse Distillation from One-Class Embedding")."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from anomalox.detectors._trained import INPUT, TrainedDetector, spec_of, tch_module
from anomalox.params import Options


class ReverseDistillation(TrainedDetector):
    """Reverse Distillation anomaly detector: a decoder learns to rebuild a frozen encoder's features.

    The encoder is the pretrained backbone (frozen: batch norm folded, evaluation mode); its three
    taps (strides s, 2s, 4s) go through a trainable one-class bottleneck embedding (OCBE: the two
    shallower taps downsampled by 3×3 stride-2 convolutions, concatenated with the deepest, and
    compressed by residual blocks into one embedding at stride 8s), and a trainable decoder
    mirroring the encoder (residual blocks that upsample with 2×2 stride-2 transposed
    convolutions) gives back tensors of the taps' shapes. Trained on the good images with loss =
    Σ_k mean over the batch of 1 − cos(vec(e_k), vec(d_k)), the cosine similarity of each image's
    flattened encoder and decoder features at tap k (the paper's eq. (2), anomalib's
    ``ReverseDistillationLoss``). Where the image is unlike the training images, the compact
    embedding does not carry what the decoder would need to rebuild the encoder's features.

    Map: per tap 1 − cosine similarity along the channels at each position, upsampled bilinearly
    (align_corners true, as anomalib) to the input size and summed over the taps
    (``map_combine="product"`` multiplies), then smoothed with a Gaussian of σ = 4. Image score:
    the smoothed map's maximum.

    The encoder's features are computed once per training image (it is frozen and the images are
    not augmented), so a step runs only the OCBE and decoder, forward and backward.

    ResNet encoders (``layers`` ``layer1``–``layer3``) get anomalib's OCBE and decoders
    (``get_bottleneck_layer``, ``de_resnet18`` / ``de_resnet50`` / ``de_wide_resnet50_2``): the
    same blocks, channels and parameter names. What differs from anomalib, and why: its OCBE also
    creates a 1×1 convolution and batch norm (``conv4`` / ``bn4``) that its forward pass never
    uses, left out here; its transposed convolutions keep torch's default uniform
    initialisation, drawn from torch's global generator, while here every convolution is
    N(0, 2 / fan_out) from the detector's own seeded generator (the caller's torch random state
    is left alone and a seed fixes the weights); Adam's betas are the paper's code's
    (0.5, 0.999) where anomalib uses (0.5, 0.99); the map is summed, anomalib's default, as in
    the paper's code. EfficientNet-Lite encoders (the default) have no decoder in the paper or
    in anomalib: anomalox's own design uses the same OCBE and decoder with BasicBlocks at the
    Lite taps' channels (Lite0 ``_blocks.2`` / ``_blocks.4`` / ``_blocks.10``: 24 / 40 / 112
    channels, a 224-channel embedding at stride 32).

    Paper budget: Wide-ResNet-50-2, 256 px, Adam with learning rate 0.005, betas (0.5, 0.999),
    200 epochs, batch 16. The defaults here (Lite0 encoder, 60 epochs, batch 8) are sized so that
    fitting 100 images at 256 px takes under 10 minutes on a 2-core CPU.

    Parameters
    ----------
    backbone : str
        The encoder, see ``anomalox.backbone.BACKBONES``; default ``"efficientnet_lite0"``
        (bundled weights). ResNets use the weights in the torch hub cache. A torch module is
        refused: the OCBE and decoder are built in the tch part for the encoder's structure.
    layers : sequence of str, optional
        The three encoder taps, at strides s, 2s, 4s; default Lite: ``("_blocks.2", "_blocks.4",
        "_blocks.10")`` (strides 4, 8, 16), ResNets: ``("layer1", "layer2", "layer3")`` (the
        paper's).
    map_combine : "sum" or "product"
        How the per-tap maps are combined.
    <training parameters>
    <shared parameters>

    Attributes
    ----------
    weights_ : dict of str to float32 arrays
        The OCBE's (``bottleneck.…``) and decoder's (``decoder.…``) trained parameters and
        batch-norm statistics.
    loss_history_ : tuple of float
        The mean training loss of each epoch.
    threshold_, pixel_threshold_ : float or None
    calibration_scores_, pixel_calibration_scores_ : (n,) float32 array or None
    backbone_ : anomalox.Backbone
        The encoder.

    Examples
    --------
    >>> model = ReverseDistillation(max_epochs=5).fit("magnetic_tile/train/good")
    >>> maps = model.anomaly_map(["tile_1.png", "tile_2.png"])
    """

    learned_attributes = ("weights_", "loss_history_")
    _weights_attribute = "weights_"
    _sigma = 4.0
    _default_layers = {
        "efficientnet_lite": ("_blocks.2", "_blocks.4", "_blocks.10"),
        "resnet": ("layer1", "layer2", "layer3"),
    }
    _parameter_constraints = {"map_combine": [Options({"sum", "product"})]}

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: Any = None,
        map_combine: str = "sum",
        max_epochs: int = 60,
        max_steps: int | None = None,
        optimizer: str = "adam",
        learning_rate: float = 0.005,
        momentum: float = 0.9,
        betas: Any = (0.5, 0.999),
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
        self.map_combine = map_combine
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
        family, config = spec_of(backbone)
        return tch_module().HeadModel.reverse_distillation(
            backbone.name, family, config, list(backbone.layers), seed, self._cuda(backbone), self._threads()
        )

    def _score_features(self, features: dict[str, torch.Tensor]) -> tuple[None, torch.Tensor]:
        x = features[INPUT]
        encoder = [t.contiguous() for t in self._targets(features)]
        maps, _ = self._model().maps(encoder, (int(x.shape[-2]), int(x.shape[-1])), self.map_combine, self._threads())
        return None, maps

    def _summary(self) -> str:
        n = sum(int(np.prod(v.shape)) for v in self.weights_.values())
        return f"OCBE + decoder {n:,} values, {self._epochs_summary()}"
