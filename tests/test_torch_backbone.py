"""anomalox.torch_backbone: ModuleBackbone against hand-run torchvision forwards, and the pure-torch
reference backbones against the Rust (tch) Backbone."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from anomalox import Backbone
from anomalox.torch_backbone import ModuleBackbone, reference_backbone

torchvision = pytest.importorskip("torchvision")
pytest.importorskip("efficientnet_lite_pytorch")


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude (as test_backbone)."""
    assert a.shape == ref.shape, (a.shape, ref.shape)
    return float((a.double() - ref.double()).abs().max() / ref.double().abs().max())


def resnet18(seed: int = 0) -> torch.nn.Module:
    """torchvision's resnet18 with random weights and random batch-norm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def manual_taps(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """conv1 ... layer4 called by hand, in eval mode without gradients."""
    with torch.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        taps = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            h = getattr(model, name)(h)
            taps[name] = h
    return taps


@pytest.fixture(scope="module")
def net():
    return resnet18()


def test_taps_equal_a_manual_forward(net):
    backbone = ModuleBackbone(net, ["layer3", "layer1", "layer2"])
    x = torch.randn(2, 3, 96, 80, generator=torch.Generator().manual_seed(1))
    maps = backbone.features(x, preprocess=False)
    ref = manual_taps(net, x)
    assert list(maps) == ["layer3", "layer1", "layer2"]
    for name, fmap in maps.items():
        assert fmap.dtype == torch.float32 and not fmap.requires_grad
        assert rel_err(fmap, ref[name]) <= 1e-6, name
    assert backbone.layer_channels == {"layer3": 256, "layer1": 64, "layer2": 128}
    assert backbone.layer_strides == {"layer3": 16, "layer1": 4, "layer2": 8}
    assert list(backbone.taps) == ["layer1", "layer2", "layer3"]  # forward order
    assert backbone.name == "ResNet" and backbone.weights_source == "module" and backbone.weights_path is None
    assert backbone.device == torch.device("cpu")


def test_preprocessing_matches_imagenet_normalisation(net):
    backbone = ModuleBackbone(net, ["layer2"], image_size=64)
    images = np.random.default_rng(0).integers(0, 256, size=(2, 70, 90, 3), dtype=np.uint8)
    x = backbone.preprocessing(images)
    assert x.shape == (2, 3, 64, 64)
    assert backbone.preprocessing.mean == (0.485, 0.456, 0.406)
    a = backbone.features(images)["layer2"]
    assert torch.equal(a, backbone.features(x, preprocess=False)["layer2"])
    assert rel_err(a, manual_taps(net, x)["layer2"]) <= 1e-6


def test_training_flags_are_restored(net):
    model = copy.deepcopy(net).train()
    model.layer1.eval()  # a mixed state must come back as it was
    flags = {n: m.training for n, m in model.named_modules()}
    backbone = ModuleBackbone(model, ["layer2", "layer3"])
    x = torch.randn(2, 3, 64, 64)
    maps = backbone.features(x, preprocess=False)
    backbone.logits(x, preprocess=False)
    assert {n: m.training for n, m in model.named_modules()} == flags
    # It ran in eval mode: batch statistics were not used, running statistics not updated.
    assert torch.equal(model.bn1.running_mean, net.bn1.running_mean)
    assert rel_err(maps["layer3"], manual_taps(net, x)["layer3"]) <= 1e-6
    # Restored on an error, too.
    with pytest.raises(TypeError):
        backbone.features(torch.randn(1, 3, 64, 64).to(torch.int64), preprocess=False)

    def fail(*_):
        raise RuntimeError("boom")

    handle = model.layer1.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        backbone.features(x, preprocess=False)
    handle.remove()
    assert {n: m.training for n, m in model.named_modules()} == flags


def test_forward_stops_after_the_last_tap_and_hooks_are_removed(net):
    model = copy.deepcopy(net)
    calls = []
    model.layer4.register_forward_hook(lambda *_: calls.append("layer4"))
    model.fc.register_forward_hook(lambda *_: calls.append("fc"))
    hooks_before = {n: len(m._forward_hooks) for n, m in model.named_modules()}
    backbone = ModuleBackbone(model, ["layer2", "layer3"])
    calls.clear()  # the constructor's probe
    backbone.features(torch.rand(1, 3, 64, 64))
    assert calls == []
    ModuleBackbone(model, ["layer4"]).features(torch.rand(1, 3, 64, 64))
    assert "layer4" in calls and "fc" not in calls
    assert {n: len(m._forward_hooks) for n, m in model.named_modules()} == hooks_before


def test_logits_are_the_whole_forward(net):
    backbone = ModuleBackbone(net, ["layer2"])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = net(x)
    assert torch.equal(backbone.logits(x, preprocess=False), ref)


@pytest.mark.parametrize(
    "layers",
    ["layer2", [], ["layer2", "layer2"], ["layer9"], ["layer2", 3], ["layer2", ""]],
)
def test_bad_layer_names_are_refused(net, layers):
    with pytest.raises(ValueError, match="layers: expected") as err:
        ModuleBackbone(net, layers)
    if layers == ["layer9"]:
        assert "'layer1'" in str(err.value) and "more)" in str(err.value)  # names listed, truncated


def test_a_tap_that_is_not_a_feature_map_is_refused(net):
    with pytest.raises(ValueError, match="'fc' to output a 4-D tensor"):
        ModuleBackbone(net, ["layer2", "fc"])


def test_a_tap_that_never_runs_is_refused():
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)
            self.unused = torch.nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.conv(x)

    with pytest.raises(ValueError, match=r"did not"):
        ModuleBackbone(Net(), ["conv", "unused"])


class FixedSize(torch.nn.Module):
    """A network that only takes 48 x 48 inputs (as a ViT-like model with fixed positions would)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.down = torch.nn.Conv2d(8, 16, 2, stride=2)

    def forward(self, x):
        if tuple(x.shape[-2:]) != (48, 48):
            raise RuntimeError(f"expected 48 x 48 inputs, got {tuple(x.shape[-2:])}")
        return self.down(self.stem(x))


def test_probe_falls_back_to_the_preprocessing_size():
    backbone = ModuleBackbone(FixedSize(), ["stem", "down"], image_size=48)
    assert backbone.layer_strides == {"stem": 4, "down": 8}
    assert backbone.layer_channels == {"stem": 8, "down": 16}
    assert backbone.features(np.zeros((2, 60, 60, 3), np.uint8))["down"].shape == (2, 16, 6, 6)
    with pytest.raises(ValueError, match=r"module: a forward pass of a \(1, 3, 32, 32\) input"):
        ModuleBackbone(FixedSize(), ["stem"], image_size=32)


def test_module_without_parameters_runs_on_the_cpu():
    net = torch.nn.Sequential(torch.nn.AvgPool2d(2), torch.nn.AvgPool2d(2))
    backbone = ModuleBackbone(net, ["1"], image_size=32)
    assert backbone.device == torch.device("cpu")
    assert backbone.layer_strides == {"1": 4} and backbone.layer_channels == {"1": 3}
    assert backbone.features(np.zeros((16, 16), np.uint8))["1"].shape == (1, 3, 8, 8)


def test_fingerprint_is_stable_and_follows_the_weights(net):
    model = copy.deepcopy(net)
    backbone = ModuleBackbone(model, ["layer2"])
    first = backbone.fingerprint()
    assert first["class"] == "torchvision.models.resnet.ResNet"
    assert len(first["sha256"]) == 64
    assert backbone.fingerprint() == first
    assert ModuleBackbone(copy.deepcopy(model), ["layer3"]).fingerprint() == first
    with torch.no_grad():
        model.layer3[0].conv1.weight[0, 0, 0, 0] += 1e-3
    changed = backbone.fingerprint()
    assert changed["sha256"] != first["sha256"]
    with torch.no_grad():
        model.layer3[0].conv1.weight[0, 0, 0, 0] -= 1e-3
        model.bn1.running_var[0] += 1.0  # buffers count too
    assert backbone.fingerprint()["sha256"] not in (first["sha256"], changed["sha256"])


def test_preprocess_callable_replaces_mean_std(net):
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    by_stats = ModuleBackbone(net, ["layer2"], mean=mean, std=std, image_size=64)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    by_callable = ModuleBackbone(net, ["layer2"], preprocess=lambda x: (x - m) / s, image_size=64)
    images = np.random.default_rng(1).integers(0, 256, size=(2, 50, 60, 3), dtype=np.uint8)
    a = by_stats.features(images)["layer2"]
    b = by_callable.features(images)["layer2"]
    assert rel_err(b, a) <= 1e-6
    # preprocess=False inputs are the [0, 1] batches its preprocessing makes; the callable still runs.
    unit = by_callable.preprocessing(images)
    assert 0.0 <= float(unit.min()) and float(unit.max()) <= 1.0
    assert torch.equal(by_callable.features(unit, preprocess=False)["layer2"], b)
    with pytest.raises(ValueError, match="preprocess: expected either"):
        ModuleBackbone(net, ["layer2"], mean=mean, preprocess=lambda x: x)


def test_gray_and_uint8_inputs_match_the_tch_backbone(net):
    """1-channel uint8 images through the same preprocessing give the Rust network's maps."""
    ours = ModuleBackbone(net, ["layer2", "layer3"], image_size=96)
    tch = Backbone("resnet18", weights=net.state_dict(), image_size=96)
    gray = np.random.default_rng(2).integers(0, 256, size=(2, 80, 100), dtype=np.uint8)  # a (N, H, W) batch
    a, b = ours.features(gray), tch.features(gray)
    for name in ("layer2", "layer3"):
        side = 96 // ours.layer_strides[name]
        assert a[name].shape == b[name].shape == (2, ours.layer_channels[name], side, side)
        assert rel_err(a[name], b[name]) <= 1e-5, name


def test_n_threads_is_restored(net):
    backbone = ModuleBackbone(net, ["layer2"])
    before = torch.get_num_threads()
    x = torch.randn(1, 3, 64, 64)
    one = backbone.features(x, preprocess=False, n_threads=1)["layer2"]
    assert torch.get_num_threads() == before
    assert rel_err(one, backbone.features(x, preprocess=False)["layer2"]) <= 1e-5
    with pytest.raises(ValueError, match="n_threads: expected"):
        backbone.features(x, preprocess=False, n_threads=0)


# --- reference backbones vs the Rust network --------------------------------------------------------


def test_reference_lite0_matches_tch_at_256():
    ref = reference_backbone("efficientnet_lite0", image_size=256)
    tch = Backbone("efficientnet_lite0", image_size=256)
    assert ref.name == tch.name == "efficientnet_lite0"
    assert ref.layers == tch.layers == ("_blocks.4", "_blocks.10")
    assert ref.layer_channels == tch.layer_channels and ref.layer_strides == tch.layer_strides
    assert ref.taps == tch.taps
    assert ref.weights_path == tch.weights_path and ref.weights_source == tch.weights_source
    assert ref.preprocessing == tch.preprocessing
    images = [np.random.default_rng(3).integers(0, 256, size=(300, 260, 3), dtype=np.uint8)]
    x = torch.rand(2, 3, 197, 230, generator=torch.Generator().manual_seed(4)) * 2 - 1  # off-grid size
    for a, b in ((ref.features(images), tch.features(images)), (ref.features(x, False), tch.features(x, False))):
        for name in ref.layers:
            assert a[name].shape == b[name].shape, name
            assert rel_err(a[name], b[name]) <= 1e-4, name  # test_backbone's Lite tolerance


def test_reference_resnet18_matches_tch_with_a_state_dict(net):
    sd = net.state_dict()
    ref = reference_backbone("resnet18", weights=sd, image_size=96, layers=["layer1", "layer3"])
    tch = Backbone("resnet18", weights=sd, image_size=96, layers=["layer1", "layer3"])
    assert ref.weights_source == tch.weights_source == "state_dict" and ref.weights_path is None
    assert ref.taps == tch.taps and ref.layer_strides == tch.layer_strides
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(5))
    a, b = ref.features(x, preprocess=False), tch.features(x, preprocess=False)
    for name in ref.layers:
        assert rel_err(a[name], b[name]) <= 1e-5, name
    assert rel_err(ref.logits(x, preprocess=False), tch.logits(x, preprocess=False)) <= 1e-5
    # The reference holds its own copy of the weights.
    assert all(p.data_ptr() != sd[n].data_ptr() for n, p in ref.module.named_parameters())


def test_reference_default_layers_and_headless_weights(net):
    sd = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    ref = reference_backbone("resnet18", weights=sd)
    assert ref.layers == ("layer2", "layer3") and ref.preprocessing.output_size == (224, 224)
    with pytest.raises(ValueError, match="weights: the state_dict does not fit resnet18"):
        reference_backbone("resnet18", weights={k: v for k, v in sd.items() if k != "conv1.weight"})
    with pytest.raises(ValueError, match="weights: the state_dict does not fit resnet18"):
        reference_backbone("resnet18", weights={**sd, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="name: expected one of"):
        reference_backbone("resnet19")
    with pytest.raises(ValueError, match="device: expected"):
        reference_backbone("resnet18", weights=sd, device="tpu")
    with pytest.raises(ValueError, match="layers: expected distinct tap names"):
        reference_backbone("resnet18", weights=sd, layers=["conv1"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_module_on_cuda(net):
    model = copy.deepcopy(net).cuda()
    backbone = ModuleBackbone(model, ["layer2", "layer3"], image_size=64)
    assert backbone.device.type == "cuda"
    images = np.random.default_rng(6).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    maps = backbone.features(images)
    cpu = ModuleBackbone(net, ["layer2", "layer3"], image_size=64).features(images)
    for name in backbone.layers:
        assert maps[name].device.type == "cuda"
        assert rel_err(maps[name].cpu(), cpu[name]) <= 1e-3, name  # cuDNN / TF32 differences
