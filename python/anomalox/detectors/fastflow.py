"""FastFlow (Yu et al., 2021, "FastFlow: Unsupervised Anomaly Detection and Localization via 2D Normalizing Flows")."""

from __future__ import annotations

from numbers import Real
from typing import Any

import numpy as np
import torch

from anomalox.detectors._trained import INPUT, TrainedDetector, tch_module
from anomalox.params import POSITIVE_INT, Interval, Options, Unchecked

# FrEIA's AllInOneBlock affine clamping as anomalib builds FastFlow's blocks.
CLAMP = 2.0


class FastFlow(TrainedDetector):
    """FastFlow anomaly detector: per-tap 2-D normalizing flows over frozen features.

    Each tap of the frozen pretrained backbone is layer-normalised over (channels, height, width)
    with a trained elementwise affine (anomalib's ``FastflowModel`` for CNN backbones), then mapped
    by ``flow_steps`` affine coupling blocks to z, trained so that z of the good images follows a
    standard normal: the loss is the negative log-likelihood ½ Σ z² − log|det ∂z/∂x| (anomalib's
    ``FastflowLoss``: summed over the taps, averaged over the batch). A block (FrEIA's
    ``AllInOneBlock`` with anomalib's settings) splits the channels in two, predicts a scale and a
    shift for the second half from the first with a conv → ReLU → conv subnet (3×3 and 1×1 kernels
    alternating, as the paper; ``conv3x3_only``: 3×3 everywhere; hidden channels ``hidden_ratio`` ×
    its inputs), clamps the log-scale to (−2, 2) with a tanh, applies a learned per-channel global
    scale (softplus) and offset, then a fixed random permutation of the channels.

    Map (``map_mode="probability"``, anomalib's): per tap −exp(−½ · mean over channels of z²) at each
    position, a negative probability in [−1, 0); ``"nll"``: the per-position negative
    log-likelihood ½ Σ_c z² minus the position's log-determinant (no constant). Each tap's map is
    upsampled bilinearly (align_corners false) to the input size and the taps are averaged; not
    smoothed (as anomalib). Image score: the maximum of the map. Tiled (``tile_size``), one model
    serves every tile (all tiles have one size); untiled, every image must have the fitted size (the
    layer norms are sized to the taps' grids).

    Initialisation as torch's defaults for the subnets' convolutions, the layer norms' affine 1 and
    0, global scale 1 and offset 0, one uniformly random permutation per block, all from the
    detector's own seeded generator. Optimiser Adam, learning rate 1e-3, weight decay 1e-5
    (anomalib's). The paper trains 500 epochs; anomalib's configuration allows 500 and stops early
    on the validation pixel AUROC, which needs defective images with masks. The default here, 50
    epochs (about 5 minutes for 100 images at 256 px on 2 CPU cores: the features are extracted
    once per fit, each epoch runs only the flows), is a budget, not convergence: the loss keeps
    falling (the flows keep sharpening the density of the good features), and on Magnetic Tile
    longer training lowered the accuracy (see BENCHMARKS.md); lower ``max_epochs`` where held-out
    defective images show the same.

    Parameters
    ----------
    backbone : str
        See ``anomalox.backbone.BACKBONES``; default ``"efficientnet_lite0"`` (bundled weights).
        ResNets use the weights in the torch hub cache (anomalib's default: ResNet-18).
    layers : sequence of str, optional
        The taps; default Lite: ``("_blocks.2", "_blocks.4", "_blocks.10")`` (strides 4, 8, 16),
        ResNets: ``("layer1", "layer2", "layer3")`` (anomalib's).
    flow_steps : int
        Coupling blocks per tap (anomalib's default 8).
    hidden_ratio : float
        Hidden channels of a subnet over its input channels (anomalib's default 1.0).
    conv3x3_only : bool
        3×3 subnets at every step instead of 3×3 and 1×1 alternating (default False).
    map_mode : {"probability", "nll"}
        The map, see above (default anomalib's "probability").
    <training parameters>
    <shared parameters>

    Attributes
    ----------
    weights_ : dict of str to float32 arrays
        Per tap i ``tap{i}.norm_weight`` / ``tap{i}.norm_bias`` and per block j
        ``tap{i}.step{j}.conv1_weight`` … ``global_scale``, ``global_offset``, ``permutation``.
    feature_shapes_ : tuple of (int, int, int)
        Each tap's (C, h, w) at the fitted size.
    loss_history_ : tuple of float
        The mean training loss of each epoch.
    input_size_ : (int, int) or None
        The preprocessed size the detector was fitted on (untiled images must have it).
    threshold_, pixel_threshold_ : float or None
    calibration_scores_, pixel_calibration_scores_ : (n,) float32 array or None
    backbone_ : anomalox.Backbone

    Examples
    --------
    >>> model = FastFlow(max_epochs=20).fit("magnetic_tile/train/good")
    >>> result = model.inspect(["tile_1.png", "tile_2.png"])
    """

    learned_attributes = ("weights_", "feature_shapes_", "loss_history_", "input_size_")
    _weights_attribute = "weights_"
    _shapes_attribute = "feature_shapes_"
    _sigma = 0.0
    one_size_untiled = True
    _default_layers = {
        "efficientnet_lite": ("_blocks.2", "_blocks.4", "_blocks.10"),
        "resnet": ("layer1", "layer2", "layer3"),
    }
    _parameter_constraints = {
        "flow_steps": [POSITIVE_INT],
        "hidden_ratio": [Interval(Real, 0.0, None, closed="neither")],
        "conv3x3_only": [Unchecked("its truth value")],
        "map_mode": [Options({"probability", "nll"})],
    }

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: Any = None,
        flow_steps: int = 8,
        hidden_ratio: float = 1.0,
        conv3x3_only: bool = False,
        map_mode: str = "probability",
        max_epochs: int = 50,
        max_steps: int | None = None,
        optimizer: str = "adam",
        learning_rate: float = 1e-3,
        momentum: float = 0.9,
        betas: Any = (0.9, 0.999),
        weight_decay: float = 1e-5,
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
        self.flow_steps = flow_steps
        self.hidden_ratio = hidden_ratio
        self.conv3x3_only = conv3x3_only
        self.map_mode = map_mode
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
        return tch_module().HeadModel.fastflow(
            backbone.name,
            list(backbone.layers),
            [int(s[0]) for s in shapes],
            [(int(s[1]), int(s[2])) for s in shapes],
            int(self.flow_steps),
            float(self.hidden_ratio),
            bool(self.conv3x3_only),
            CLAMP,
            seed,
            self._cuda(backbone),
            self._threads(),
        )

    def _score_features(self, features: dict[str, torch.Tensor]) -> tuple[None, torch.Tensor]:
        x = features[INPUT]
        taps = [t.contiguous() for t in self._targets(features)]
        maps, _ = self._model().maps(taps, (int(x.shape[-2]), int(x.shape[-1])), self.map_mode, self._threads())
        return None, maps

    def _summary(self) -> str:
        n = sum(int(np.prod(v.shape)) for k, v in self.weights_.items() if not k.endswith("permutation"))
        return f"{len(self.feature_shapes_)} flows of {self.flow_steps} steps, {n:,} values, {self._epochs_summary()}"
