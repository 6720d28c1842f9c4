"""STFPM (Wang, Wu, Cui, Qiao & Wang 2021, "Student-Teacher Feature Pyramid Matching for Anomaly Detection")."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from anomalox.detectors._trained import INPUT, TrainedDetector, spec_of, tch_module
from anomalox.params import Options


class STFPM(TrainedDetector):
    """STFPM anomaly detector: a student network learns to reproduce a pretrained teacher's features.

    The teacher is the pretrained backbone (frozen: batch norm folded, evaluation mode). The
    student has the same architecture, freshly initialised (timm's rules: He-normal convolutions
    by fan-out, and ResNets' last batch norm of each residual branch at zero), with its own
    parameters, and is trained on the good images to match the teacher's L2-normalised features
    at each tap: loss = Σ_l 0.5 / (h_l w_l) · Σ (n(t_l) − n(s_l))², summed over the batch (the
    paper's eq. (1)–(2); anomalib's ``STFPMLoss``). Where the image is unlike the training images,
    the student fails to follow the teacher.

    Map: per tap 0.5 · ‖n(t_l) − n(s_l)‖² at each position (equal to 1 − cosine similarity),
    upsampled bilinearly to the input size, then multiplied over the taps (the paper's rule;
    ``map_combine="sum"`` adds them instead). No smoothing, as anomalib's STFPM. Image score: the
    map's maximum.

    The teacher's features are computed once per training image (it is frozen and the images are
    not augmented), so each step runs only the student forward and backward.

    Paper budget: ResNet-18 (``layer1``–``layer3``), 256 px, SGD with learning rate 0.4, momentum
    0.9, weight decay 1e-4, 100 epochs, batch 32; anomalib's defaults: the same with weight decay
    1e-3. The defaults here (Lite0 teacher, 40 epochs, batch 8) are sized so that fitting 100
    images at 256 px takes under 10 minutes on a 2-core CPU (figures in BENCHMARKS.md).

    Parameters
    ----------
    backbone : str
        The teacher (and the student's architecture), see ``anomalox.backbone.BACKBONES``;
        default ``"efficientnet_lite0"`` (bundled weights). ResNets use the weights in the torch
        hub cache. A torch module is refused: the student is built in the tch part.
    layers : sequence of str, optional
        Taps to match; default Lite: ``("_blocks.2", "_blocks.4", "_blocks.10")`` (strides 4, 8,
        16), ResNets: ``("layer1", "layer2", "layer3")`` (the paper's).
    map_combine : "product" or "sum"
        How the per-tap maps are combined.
    <training parameters>
    <shared parameters>

    Attributes
    ----------
    student_weights_ : dict of str to float32 arrays
        The student's trained parameters and batch-norm statistics (the layers up to the deepest
        tap), by the teacher checkpoint's parameter names.
    loss_history_ : tuple of float
        The mean training loss of each epoch.
    threshold_, pixel_threshold_ : float or None
    calibration_scores_, pixel_calibration_scores_ : (n,) float32 array or None
    backbone_ : anomalox.Backbone
        The teacher.

    Examples
    --------
    >>> model = STFPM(max_epochs=20).fit("magnetic_tile/train/good")
    >>> maps = model.anomaly_map(["tile_1.png", "tile_2.png"])
    """

    learned_attributes = ("student_weights_", "loss_history_")
    _weights_attribute = "student_weights_"
    _sigma = 0.0
    _default_layers = {
        "efficientnet_lite": ("_blocks.2", "_blocks.4", "_blocks.10"),
        "resnet": ("layer1", "layer2", "layer3"),
    }
    _parameter_constraints = {"map_combine": [Options({"product", "sum"})]}

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: Any = None,
        map_combine: str = "product",
        max_epochs: int = 40,
        max_steps: int | None = None,
        optimizer: str = "sgd",
        learning_rate: float = 0.4,
        momentum: float = 0.9,
        betas: Any = (0.9, 0.999),
        weight_decay: float = 1e-3,
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
        return tch_module().StfpmStudent(
            backbone.name, family, config, list(backbone.layers), seed, self._cuda(backbone), self._threads()
        )

    def _score_features(self, features: dict[str, torch.Tensor]) -> tuple[None, torch.Tensor]:
        x = features[INPUT]
        teacher = self._targets(features)
        threads = self._threads()
        student = [s.cpu() for s in self._model().features(x, threads)]
        maps = tch_module().stfpm_map(
            [t.contiguous() for t in teacher],
            [s.contiguous() for s in student],
            (int(x.shape[-2]), int(x.shape[-1])),
            self.map_combine,
            threads,
        )
        return None, maps

    def _summary(self) -> str:
        n = sum(int(np.prod(v.shape)) for v in self.student_weights_.values())
        return f"student {n:,} values, {self._epochs_summary()}"
