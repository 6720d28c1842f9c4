"""Issue 15: anomalox with any torch — module backbones, the tch fallback, torch-free imports.

- Detectors with ``backbone=<torch.nn.Module>`` (a random-weight torchvision ResNet-18): the
  PatchCore map and score against a hand-written forward, 3 × 3 pooling, ``torch.cdist`` and the
  paper's re-weighting; the user's training flag left alone; ``preprocessing`` forms.
- Named backbones without the tch part (simulated): the pure-torch reference scores as tch does,
  with one notice on the ``anomalox`` logger; ``anomalox.Backbone`` says why it cannot run.
- PaDiM's default ``n_features`` for modules by the stacked taps' width.
- Model files of module-backbone detectors: the module is required on load and must be the same.
- ``import anomalox`` without torch; ops on tensors share memory.
"""

from __future__ import annotations

import copy
import logging
import subprocess
import sys
import textwrap
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

import anomalox
import anomalox.backbone as backbone_module
from anomalox import ops
from anomalox.detectors import _base
from anomalox.detectors.families import padim_n_features_for_width
from anomalox.torch_backbone import ModuleBackbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _textures(n: int, size: int, seed: int) -> np.ndarray:
    """Smooth random gray textures with a little noise, uint8 (n, size, size, 3)."""
    rng = np.random.default_rng(seed)
    noise = torch.from_numpy(rng.random((n, 1, size // 8, size // 8), dtype=np.float32))
    smooth = F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
    img = (60 + 120 * smooth + rng.normal(0, 3, (n, size, size))).clip(0, 255).astype(np.uint8)
    return np.repeat(img[..., None], 3, axis=3)


@pytest.fixture(scope="module")
def train_images() -> np.ndarray:
    return _textures(6, 80, seed=1)


@pytest.fixture(scope="module")
def test_images() -> np.ndarray:
    imgs = _textures(3, 80, seed=2)
    imgs[1, 20:40, 30:50] = 250  # a bright defect
    return imgs


def _resnet18(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    return _resnet18()


def _patchcore(module: torch.nn.Module, **kw) -> anomalox.PatchCore:
    params = {
        "backbone": module,
        "layers": ["layer2", "layer3"],
        "image_size": 64,
        "coreset_ratio": 0.5,
        "validation_fraction": 0,
        "n_threads": 1,
    }
    params.update(kw)
    return anomalox.PatchCore(**params)


def _padim(module: torch.nn.Module, **kw) -> anomalox.PaDiM:
    params = {
        "backbone": module,
        "layers": ["layer1", "layer2", "layer3"],
        "image_size": 64,
        "validation_fraction": 0,
        "n_threads": 1,
    }
    params.update(kw)
    return anomalox.PaDiM(**params)


# ------------------------------------------------------------------ 1. module backbones vs by hand


def _manual_taps(net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """layer2 and layer3 of a torchvision ResNet, computed stage by stage in eval mode."""
    was = net.training
    net.eval()
    try:
        with torch.no_grad():
            h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            l2 = net.layer2(net.layer1(h))
            l3 = net.layer3(l2)
    finally:
        net.train(was)
    return l2, l3


def _reference_patchcore(model: anomalox.PatchCore, net: torch.nn.Module, images: np.ndarray):
    """(scores, maps) of a fitted PatchCore, computed independently of the detector's code."""
    x, sizes = model.backbone_.preprocessing.transform(images)
    l2, l3 = _manual_taps(net, x)
    p2 = F.avg_pool2d(l2, 3, stride=1, padding=1)  # count_include_pad: padding counted
    p3 = F.avg_pool2d(l3, 3, stride=1, padding=1)
    p3 = F.interpolate(p3, size=p2.shape[-2:], mode="bilinear", align_corners=False)
    emb = torch.cat([p2, p3], 1).double()
    n, c, h, w = emb.shape
    rows = emb.permute(0, 2, 3, 1).reshape(n, h * w, c)
    bank = torch.from_numpy(model.memory_bank_).double()
    dist = torch.cdist(rows, bank[None].expand(n, -1, -1))  # (n, h*w, M)
    nearest_d, nearest_i = dist.min(dim=2)
    grid = nearest_d.reshape(n, h, w).float().contiguous()
    full = ops.gaussian_blur(ops.upsample(grid, tuple(x.shape[-2:])), sigma=4)
    maps = torch.stack([ops.upsample(m[None], size)[0] for m, size in zip(full, sizes)])
    # The paper's re-weighting of the worst patch's distance.
    scores = []
    for i in range(n):
        worst = int(nearest_d[i].argmax())
        best = nearest_d[i, worst]
        anchor = bank[nearest_i[i, worst]]
        support = torch.cdist(anchor[None], bank)[0].argsort()[: model.num_neighbors]
        spread = torch.linalg.vector_norm(rows[i, worst][None] - bank[support], dim=1)
        scores.append(float((1 - torch.softmax(spread, 0)[0]) * best))
    return np.array(scores), maps.numpy()


def test_patchcore_module_backbone_matches_hand_computation(resnet, train_images, test_images):
    resnet.train()
    model = _patchcore(resnet).fit(train_images)
    assert resnet.training and all(m.training for m in resnet.modules()), "fit changed the module's training flags"
    assert isinstance(model.backbone_, ModuleBackbone)
    assert model.memory_bank_.shape[1] == 128 + 256

    found = model.inspect(test_images)
    assert found.scores.shape == (3,) and found.scores.dtype == np.float32
    assert found.maps.shape == (3, 80, 80)
    assert resnet.training

    ref_scores, ref_maps = _reference_patchcore(model, resnet, test_images)
    np.testing.assert_allclose(found.maps, ref_maps, rtol=0, atol=1e-4)
    np.testing.assert_allclose(found.scores, ref_scores, rtol=1e-4, atol=1e-5)
    assert found.scores[1] > max(found.scores[0], found.scores[2])  # the defect stands out
    resnet.eval()


def test_padim_module_backbone_fits_and_scores(resnet, train_images, test_images):
    resnet.train()
    model = _padim(resnet).fit(train_images)
    assert resnet.training and all(m.training for m in resnet.modules())
    resnet.eval()
    found = model.inspect(test_images)
    assert found.scores.shape == (3,)
    assert found.maps.shape == (3, 80, 80)
    assert tuple(model.grid_) == (16, 16)  # layer1 of a 64 px input
    assert model.mean_.shape == (16 * 16, 100)
    assert model.inv_cov_.shape == (16 * 16, 100, 100)
    assert np.isfinite(found.maps).all()
    # The score is the smoothed map's maximum at the 64 px input (the maps shown are at 80 px).
    np.testing.assert_allclose(found.scores, found.maps.reshape(3, -1).max(1), rtol=1e-2)
    assert found.scores[1] > max(found.scores[0], found.scores[2])  # the defect stands out


# ------------------------------------------------------------------ 2. the fallback without tch


@pytest.fixture(scope="module")
def named_patchcore(train_images):
    """PatchCore on the default named backbone through the tch part (coreset 1: comparable banks)."""
    model = anomalox.PatchCore(image_size=96, coreset_ratio=1.0, validation_fraction=0, n_threads=1)
    return model.fit(train_images)


def test_named_backbone_falls_back_to_reference(named_patchcore, train_images, test_images, monkeypatch, caplog):
    assert not isinstance(named_patchcore.backbone_, ModuleBackbone), "expected the tch part to load here"
    tch_scores = named_patchcore.decision_function(test_images)

    reason = "simulated: tch part missing"
    monkeypatch.setattr(backbone_module, "_TCH", (None, reason))
    monkeypatch.setattr(_base, "_NOTICED", set())
    assert not backbone_module.tch_available()
    with pytest.raises(ImportError, match=reason):
        anomalox.Backbone("efficientnet_lite0")

    with caplog.at_level(logging.WARNING, logger="anomalox"):
        fallback = anomalox.PatchCore(image_size=96, coreset_ratio=1.0, validation_fraction=0, n_threads=1)
        fallback.fit(train_images)
        again = anomalox.PatchCore(image_size=96, coreset_ratio=1.0, validation_fraction=0, n_threads=1)
        again.fit(train_images[:3])  # same backbone name: no second notice
    notices = [r for r in caplog.records if r.name == "anomalox"]
    assert len(notices) == 1, [r.getMessage() for r in notices]
    message = notices[0].getMessage()
    assert reason in message and "efficientnet_lite0" in message and "\n" not in message

    assert isinstance(fallback.backbone_, ModuleBackbone)
    assert fallback.backbone_.name == "efficientnet_lite0"
    assert fallback.memory_bank_.shape == named_patchcore.memory_bank_.shape
    np.testing.assert_allclose(fallback.memory_bank_, named_patchcore.memory_bank_, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(fallback.decision_function(test_images), tch_scores, rtol=1e-3)


# ------------------------------------------------------------------ 3. preprocessing


def test_preprocessing_forms_agree(resnet, train_images, test_images):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)

    def normalise(x: torch.Tensor) -> torch.Tensor:
        return ((x - mean_t) / std_t).contiguous()

    maps = {}
    for label, value in {
        "pair": (mean, std),
        "dict": {"mean": list(mean), "std": list(std)},
        "callable": normalise,
    }.items():
        maps[label] = (
            _patchcore(resnet, preprocessing=value, coreset_ratio=1.0).fit(train_images).anomaly_map(test_images)
        )
    np.testing.assert_array_equal(maps["pair"], maps["dict"])
    np.testing.assert_array_equal(maps["pair"], maps["callable"])

    default = _patchcore(resnet, coreset_ratio=1.0).fit(train_images).anomaly_map(test_images)
    imagenet = (
        _patchcore(resnet, coreset_ratio=1.0, preprocessing=(IMAGENET_MEAN, IMAGENET_STD))
        .fit(train_images)
        .anomaly_map(test_images)
    )
    np.testing.assert_array_equal(default, imagenet)
    assert not np.allclose(default, maps["pair"])


@pytest.mark.parametrize(
    "value",
    [
        "imagenet",
        0.5,
        {"mean": (0.5, 0.5, 0.5)},
        ((0.5,) * 3, (0.2,) * 3, (0,) * 3),
        (0.5, 0.2),  # scalars, not per-channel values
        ((0.5, 0.5), (0.2, 0.2)),  # 2 channels
        ((0.5,) * 3, (0.0, 1.0, 1.0)),  # a zero std
        ((0.5,) * 3, ("a", 1.0, 1.0)),
        {"mean": (0.5,) * 3, "std": (float("nan"), 1.0, 1.0)},
    ],
)
def test_bad_preprocessing_is_named(resnet, train_images, value):
    with pytest.raises(ValueError, match="^preprocessing"):
        _patchcore(resnet, preprocessing=value).fit(train_images)


def test_preprocessing_with_named_backbone_refused(train_images):
    with pytest.raises(ValueError, match="preprocessing"):
        anomalox.PatchCore(image_size=64, validation_fraction=0, preprocessing=(IMAGENET_MEAN, IMAGENET_STD)).fit(
            train_images
        )


def test_module_needs_layers(resnet, train_images):
    with pytest.raises(ValueError, match="layers"):
        _patchcore(resnet, layers=None).fit(train_images)
    with pytest.raises(ValueError, match="layers"):
        _patchcore(resnet, layers=["layer2", "no_such_layer"]).fit(train_images)


# ------------------------------------------------------------------ 4. PaDiM n_features by width


def test_padim_n_features_resnet18_module(resnet, train_images):
    model = _padim(resnet, image_size=32).fit(train_images)
    assert len(model.channels_) == 100  # 64 + 128 + 256 = 448 stacked channels
    assert np.all(np.diff(model.channels_) > 0) and model.channels_.max() < 448


@pytest.mark.parametrize(("widths", "expected"), [((512, 512), 550), ((511, 512), 100)])
def test_padim_n_features_wide_module(widths, expected, train_images):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        OrderedDict(
            stem=torch.nn.Conv2d(3, widths[0], 8, stride=8),
            deep=torch.nn.Conv2d(widths[0], widths[1], 1, stride=2),
        )
    )
    assert padim_n_features_for_width(sum(widths)) == expected
    model = anomalox.PaDiM(backbone=net, layers=["stem", "deep"], image_size=32, validation_fraction=0, n_threads=1)
    model.fit(train_images)
    assert len(model.channels_) == expected
    assert model.mean_.shape == (4 * 4, expected)
    # n_features given explicitly wins over the width rule
    small = anomalox.PaDiM(
        backbone=net, layers=["stem", "deep"], image_size=32, n_features=7, validation_fraction=0, n_threads=1
    )
    assert len(small.fit(train_images).channels_) == 7


# ------------------------------------------------------------------ 5. model files


class _OtherResNet(torchvision.models.ResNet):
    """The same architecture (and weights) under another class."""


@pytest.mark.parametrize("kind", ["patchcore", "padim"])
def test_module_model_file_round_trip(kind, resnet, train_images, test_images, tmp_path):
    make = _patchcore if kind == "patchcore" else _padim
    model = make(resnet, preprocessing={"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}).fit(train_images)
    path = model.save(tmp_path / "model.safetensors")
    before = model.inspect(test_images)

    loaded = anomalox.load(path, backbone=resnet)
    assert type(loaded) is type(model) and isinstance(loaded.backbone_, ModuleBackbone)
    assert loaded.backbone_.module is resnet
    after = loaded.inspect(test_images)
    np.testing.assert_array_equal(after.scores, before.scores)
    np.testing.assert_array_equal(after.maps, before.maps)

    # A fresh network with the same weights is the same network.
    twin = _resnet18()
    twin.load_state_dict(resnet.state_dict())
    np.testing.assert_array_equal(anomalox.load(path, backbone=twin).decision_function(test_images), before.scores)

    with pytest.raises(anomalox.ModelFileError, match="backbone=module"):
        anomalox.load(path)

    changed = copy.deepcopy(resnet)
    with torch.no_grad():
        changed.layer2[0].conv1.weight[0, 0, 0, 0] += 1e-3
    with pytest.raises(anomalox.ModelFileError, match="not the same network"):
        anomalox.load(path, backbone=changed)

    other = _OtherResNet(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2]).eval()
    other.load_state_dict(resnet.state_dict())
    with pytest.raises(anomalox.ModelFileError, match="_OtherResNet"):
        anomalox.load(path, backbone=other)


def test_module_model_file_without_module_or_callable(resnet, train_images, tmp_path):
    model = _patchcore(resnet, preprocessing=lambda x: x * 2 - 1).fit(train_images)
    with pytest.raises(ValueError, match="preprocessing"):
        model.save(tmp_path / "callable.safetensors")
    assert not list(tmp_path.iterdir()), "a refused save left a file behind"


def test_named_model_file_refuses_backbone_argument(named_patchcore, resnet, test_images, tmp_path):
    path = named_patchcore.save(tmp_path / "named.safetensors")
    with pytest.raises(ValueError, match="backbone") as info:
        anomalox.load(path, backbone=resnet)
    assert not isinstance(info.value, anomalox.ModelFileError)
    loaded = anomalox.load(path)
    np.testing.assert_array_equal(loaded.decision_function(test_images), named_patchcore.decision_function(test_images))


# ------------------------------------------------------------------ 6. without torch; tensors


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, check=False
    )


def test_import_does_not_import_torch():
    result = _python(
        """
        import sys
        import numpy as np
        import anomalox
        assert "torch" not in sys.modules, "import anomalox imported torch"
        rng = np.random.default_rng(0)
        q, b = rng.random((5, 4), dtype=np.float32), rng.random((9, 4), dtype=np.float32)
        d, i = anomalox.ops.knn(q, b, 2)
        ref = np.sqrt(((q[:, None] - b[None]) ** 2).sum(-1))
        assert np.array_equal(i[:, 0], ref.argmin(1)), (i, ref)
        assert np.allclose(d[:, 0], ref.min(1), atol=1e-6)
        masks = np.zeros((2, 16, 16), np.uint8); masks[:, 4:8, 4:8] = 1
        value = anomalox.metrics.aupro(masks, masks.astype(np.float32))
        assert abs(value - 1.0) < 1e-6, value
        assert "torch" not in sys.modules, "ops / metrics imported torch"
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# Prepended to a child's code: as if torch were not installed, importing it raises
# ModuleNotFoundError. (Not sys.modules["torch"] = None: scipy, via sklearn, then reads
# torch.Tensor off None.)
_NO_TORCH = """
import importlib.abc
import sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoTorch())
"""


def test_import_without_torch_installed():
    result = _python(
        _NO_TORCH
        + textwrap.dedent(
            """
            import numpy as np
            import anomalox
            d, i = anomalox.ops.knn(np.zeros((2, 3), np.float32), np.ones((4, 3), np.float32), 1)
            assert d.shape == (2, 1) and isinstance(d, np.ndarray)
            assert np.allclose(d, np.sqrt(3.0))
            assert "torch" not in sys.modules
            try:
                anomalox.PatchCore
            except ImportError as exc:
                print("ImportError:", exc)
            else:
                raise SystemExit("anomalox.PatchCore did not raise")
            """
        )
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ImportError:") and "torch" in result.stdout
    assert "pip install torch" in result.stdout


def test_ops_on_tensors_share_memory():
    from anomalox._convert import as_float32

    t = torch.rand(4, 6)
    view, was_tensor = as_float32(t, "x", "(N, D)")
    assert was_tensor
    assert view.__array_interface__["data"][0] == t.data_ptr()

    maps = torch.rand(2, 5, 7)
    up = ops.upsample(maps, (10, 14))
    assert isinstance(up, torch.Tensor) and up.dtype == torch.float32 and up.shape == (2, 10, 14)
    ref = F.interpolate(maps[:, None], size=(10, 14), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(up, ref, rtol=0, atol=1e-6)
    up[0, 0, 0] = 42.0  # the result is the caller's to write

    dist, idx = ops.knn(t, torch.rand(9, 6), 3)
    assert isinstance(dist, torch.Tensor) and isinstance(idx, torch.Tensor) and idx.dtype == torch.int64

    as_array = ops.upsample(maps.numpy(), (10, 14))
    assert isinstance(as_array, np.ndarray)
    np.testing.assert_array_equal(as_array, ops.upsample(maps, (10, 14)).numpy())


# ------------------------------------------------------------------------- review fixes


def test_an_earlier_tap_is_not_overwritten_by_an_in_place_layer_after_it(resnet):
    """resnet18's relu (inplace=True) runs on bn1's output after the bn1 hook: the tap must keep
    the batch norm's values (negative ones included), as calling the layers by hand gives."""
    x = torch.randn(2, 3, 64, 64)
    maps = ModuleBackbone(resnet, ["bn1", "layer1"]).features(x, preprocess=False)
    with torch.no_grad():
        expected = resnet.bn1(resnet.conv1(x))
        after = resnet.layer1(resnet.maxpool(torch.relu(expected)))
    assert float(expected.min()) < 0
    torch.testing.assert_close(maps["bn1"], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(maps["layer1"], after, rtol=1e-5, atol=1e-5)


def test_save_registers_the_model_file_writer_without_a_top_level_name(tmp_path):
    """`from anomalox.detectors import PatchCore` alone (no anomalox.<name> touched): save works."""
    result = _python(
        f"""
        import numpy as np
        from anomalox.detectors import PatchCore
        imgs = np.random.default_rng(0).integers(0, 255, (3, 48, 48, 3), dtype=np.uint8)
        model = PatchCore(image_size=48, validation_fraction=0).fit(imgs)
        print(model.save({str(tmp_path / "m.ax")!r}))
        """
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m.ax").is_file()


def test_star_import_without_torch_gives_the_core_names():
    result = _python(
        _NO_TORCH
        + textwrap.dedent(
            """
            from anomalox import *
            assert "ops" in dir() and "metrics" in dir() and "PatchCore" not in dir()
            print("ok")
            """
        )
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_a_module_backbone_refuses_weights_and_another_device(resnet, train_images):
    with pytest.raises(ValueError, match=r"^weights: a torch module backbone carries its own weights"):
        _patchcore(resnet, weights="/nonexistent.pt").fit(train_images)
    with pytest.raises(ValueError, match=r"^device: a torch module backbone runs on its own device, cpu"):
        _patchcore(resnet, device="cuda:0").fit(train_images)


def test_preprocessing_as_numpy_arrays_compares_by_value_and_saves(resnet, train_images, test_images, tmp_path):
    mean, std = np.array([0.4, 0.5, 0.6]), np.array([0.2, 0.25, 0.3])
    model = _patchcore(resnet, preprocessing=(mean, std)).fit(train_images)
    model.set_params(preprocessing=(tuple(mean), list(std)))  # the same values in other containers
    assert set(model.state_dict()) >= {"memory_bank_"}
    path = model.save(tmp_path / "np.ax")
    again = anomalox.load(path, backbone=resnet)
    np.testing.assert_array_equal(again.decision_function(test_images), model.decision_function(test_images))
    model.set_params(preprocessing=(mean, std * 2))
    with pytest.raises(ValueError, match="preprocessing changed"):
        model.state_dict()


def test_clone_shares_the_module_backbone(resnet):
    from sklearn.base import clone

    model = _patchcore(resnet, preprocessing=([0.4, 0.5, 0.6], [0.2, 0.2, 0.2]))
    copy_ = clone(model)
    assert copy_.backbone is resnet
    assert copy_.get_params()["preprocessing"] == model.get_params()["preprocessing"]
    assert copy_.get_params()["preprocessing"] is not model.get_params()["preprocessing"]  # cloned as sklearn does


def test_a_negative_stride_result_goes_back_to_torch_as_a_copy():
    from anomalox import _convert

    arr = np.arange(6.0, dtype=np.float32)[::-1]
    out = _convert.same_kind(arr, True)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_array_equal(out.numpy(), arr)
