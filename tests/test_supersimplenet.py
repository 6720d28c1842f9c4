"""SuperSimpleNet (the tch part): the loss against torchvision's ``sigmoid_focal_loss`` and the
truncated L1 written from its formula, the features and both heads against plain PyTorch written
from anomalib's ``SupersimplenetModel``, the Perlin masks, the optimiser's groups, and the detector's
training contract (determinism, save/load, any image size, bad parameters, non-finite loss)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomalox.backbone import tch_available

pytestmark = pytest.mark.skipif(not tch_available(), reason="anomalox's tch part is not installed")


@pytest.fixture(scope="module")
def tch():
    import anomalox_tch

    return anomalox_tch._tch


def ref_loss(map_, score, masks, labels):
    from torchvision.ops import sigmoid_focal_loss

    def trunc(pred, target):
        normal, anomalous = pred[target == 0], pred[target > 0]
        t = torch.clamp(normal + 0.5, min=0).mean() if len(normal) else pred.new_zeros(())
        f = torch.clamp(-anomalous + 0.5, min=0).mean() if len(anomalous) else pred.new_zeros(())
        return t + f

    focal = sigmoid_focal_loss(map_, masks, alpha=-1, gamma=4.0, reduction="mean")
    return focal + trunc(map_, masks) + sigmoid_focal_loss(score, labels, alpha=-1, gamma=4.0, reduction="mean")


def test_ssn_loss_and_gradients_match_torchvision_and_the_formula(tch):
    g = torch.Generator().manual_seed(0)
    map_ = (torch.randn(4, 1, 6, 5, generator=g) * 2).requires_grad_(True)
    score = torch.randn(4, generator=g).requires_grad_(True)
    masks = (torch.rand(4, 1, 6, 5, generator=g) > 0.7).float()
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0])
    got = tch.ssn_loss(map_, score, masks, labels)
    m64, s64 = map_.detach().double().requires_grad_(True), score.detach().double().requires_grad_(True)
    want = ref_loss(m64, s64, masks.double(), labels.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    for a, b in zip(torch.autograd.grad(got, [map_, score]), torch.autograd.grad(want, [m64, s64])):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-8)
    # no anomalous position: that half of the truncated L1 is 0
    empty = tch.ssn_loss(map_.detach(), score.detach(), torch.zeros_like(masks), torch.zeros(4))
    torch.testing.assert_close(
        empty.double(), ref_loss(m64.detach(), s64.detach(), torch.zeros_like(m64), torch.zeros(4).double())
    )
    with pytest.raises(ValueError, match="masks"):
        tch.ssn_loss(map_, score, masks[:2], labels)


def test_perlin_masks_are_binary_seeded_and_sometimes_empty(tch):
    a = tch.ssn_perlin_masks(3, 64, 20, 12, 0.2)
    assert a.shape == (64, 1, 20, 12)
    assert torch.equal(a, tch.ssn_perlin_masks(3, 64, 20, 12, 0.2))
    assert not torch.equal(a, tch.ssn_perlin_masks(4, 64, 20, 12, 0.2))
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    empty = int((a.amax((1, 2, 3)) == 0).sum())
    assert 15 <= empty <= 49  # each emptied with probability 1/2
    coverage = float(a[a.amax((1, 2, 3)) > 0].mean())
    assert 0.05 < coverage < 0.6  # blobs, not everything


def _head(tch, channels=(6, 4), grid=(4, 4), seed=0):
    return tch.HeadModel.supersimplenet(
        "efficientnet_lite0", [f"t{i}" for i in range(len(channels))], list(channels), grid, 0.015, 0.2, seed, None, 1
    )


def ref_predict(state, taps):
    """anomalib's SupersimplenetModel in eval mode from the head's tensors: (map logits, score logits)."""
    h, w = taps[0].shape[-2:]
    f = torch.cat([F.interpolate(t, size=(2 * h, 2 * w), mode="bilinear") for t in taps], 1)
    f = F.avg_pool2d(f, 3, stride=1, padding=1)
    a = F.conv2d(f, state["adaptor.weight"], state["adaptor.bias"])

    def bn(x, name):
        return F.batch_norm(
            x,
            state[f"segdec.{name}.running_mean"],
            state[f"segdec.{name}.running_var"],
            state[f"segdec.{name}.weight"],
            state[f"segdec.{name}.bias"],
            training=False,
            eps=1e-5,
        )

    s = bn(F.conv2d(a, state["segdec.seg_conv1_weight"], state["segdec.seg_conv1_bias"]), "seg_bn")
    map_ = F.conv2d(F.leaky_relu(s, 0.2), state["segdec.seg_conv2_weight"])
    d = F.relu(
        bn(
            F.conv2d(
                torch.cat([f, map_], 1), state["segdec.cls_conv_weight"], state["segdec.cls_conv_bias"], padding=2
            ),
            "cls_bn",
        )
    )
    pooled = torch.cat([d.amax((2, 3)), d.mean((2, 3)), map_.amax((2, 3)), map_.mean((2, 3))], 1)
    return map_[:, 0], F.linear(pooled, state["segdec.fc_weight"], state["segdec.fc_bias"])[:, 0]


def test_ssn_head_initialisation_and_predictions_match_plain_pytorch(tch):
    head = _head(tch)
    state = dict(head.state_dict())
    assert tuple(state["adaptor.weight"].shape) == (10, 10, 1, 1)
    assert tuple(state["segdec.seg_conv1_weight"].shape) == (1024, 10, 1, 1)
    assert tuple(state["segdec.cls_conv_weight"].shape) == (128, 11, 5, 5)
    assert tuple(state["segdec.fc_weight"].shape) == (1, 258)
    # xavier-normal: std sqrt(2 / (fan_in + fan_out))
    w = state["segdec.seg_conv1_weight"]
    assert abs(float(w.std()) - (2 / (10 + 1024)) ** 0.5) < 0.05 * (2 / (10 + 1024)) ** 0.5
    assert torch.equal(state["segdec.seg_bn.weight"], torch.ones(1024)) and not state["segdec.cls_bn.bias"].any()
    g = torch.Generator().manual_seed(1)
    new = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}
    new = {k: v.abs() + 0.5 if k.endswith("running_var") else v for k, v in new.items()}
    head.load_state_dict(list(new.items()))
    # any grid: the heads are convolutional
    taps = [torch.randn(2, 6, 5, 3, generator=g), torch.randn(2, 4, 3, 2, generator=g)]
    map_, score = head.features(taps, 1)
    want_map, want_score = ref_predict(new, taps)
    torch.testing.assert_close(map_, want_map, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(score, want_score, rtol=1e-4, atol=1e-4)
    maps, scores = head.maps(taps, (40, 24), "logits", 1)
    assert torch.equal(maps, map_) and torch.equal(scores, score)  # on the feature grid
    with pytest.raises(ValueError, match="features"):
        head.features(taps[:1], 1)
    with pytest.raises(ValueError, match="map_mode"):
        head.maps(taps, (40, 24), "probability", 1)


def test_the_adaptor_group_has_its_own_rate(tch):
    g = torch.Generator().manual_seed(2)
    taps = [torch.randn(4, 6, 4, 4, generator=g), torch.randn(4, 4, 2, 2, generator=g)]
    head = _head(tch, seed=5)
    before = dict(head.state_dict())
    with pytest.raises(ValueError, match="group"):
        head.set_group(2, 0.0, 0.0)  # no such group
    head.set_group(1, 0.0, 0.0)  # the adaptor frozen
    head.configure("adamw", 1e-3, 1e-5, 0.9, 0.0, False, (0.9, 0.999), 1e-8, None, "constant", 10)
    losses = head.train_epoch(torch.zeros(4, 1), taps, [0, 1, 2, 3], 4, None, 1)
    assert len(losses) == 1 and np.isfinite(losses[0])
    after = dict(head.state_dict())
    assert torch.equal(after["adaptor.weight"], before["adaptor.weight"])
    assert not torch.equal(after["segdec.seg_conv1_weight"], before["segdec.seg_conv1_weight"])


# ------------------------------------------------------------------ the detector
def _ssn(**kw):
    from anomalox import SuperSimpleNet

    params = dict(
        image_size=64,
        max_epochs=3,
        batch_size=4,
        n_threads=1,
        validation_fraction=0.25,
        contamination=0.25,
        learning_rate=1e-3,
    )
    params.update(kw)
    return SuperSimpleNet(**params)


@pytest.fixture(scope="module")
def fitted(images):
    good, _, _ = images
    return _ssn().fit(good)


def test_ssn_fits_and_scores(fitted, images):
    _, test_good, test_bad = images
    assert len(fitted.loss_history_) == 3 and all(np.isfinite(fitted.loss_history_))
    # Lite0 _blocks.4 and _blocks.10 at 64 px: 8 x 8 and 4 x 4
    assert fitted.feature_shapes_ == ((40, 8, 8), (112, 4, 4))
    assert fitted.weights_["adaptor.weight"].shape == (152, 152, 1, 1)
    found = fitted.inspect(np.concatenate([test_good, test_bad]))
    assert found.scores.shape == (8,) and found.maps.shape == (8, 64, 64)
    assert np.all(np.isfinite(found.scores)) and np.all(np.isfinite(found.maps))
    assert fitted.threshold_ is not None and found.labels is not None
    assert "adaptor + heads" in repr(fitted)
    # another size scores too (convolutional heads)
    assert fitted.decision_function(np.concatenate([test_good, test_good], axis=2)).shape == (4,)


def test_ssn_is_deterministic_and_leaves_torchs_generator_alone(fitted, images):
    good, test_good, _ = images
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = _ssn().fit(good)
    assert torch.equal(torch.rand(3), expected)
    for name, value in fitted.weights_.items():
        assert np.array_equal(value, again.weights_[name]), name
    np.testing.assert_array_equal(again.decision_function(test_good), fitted.decision_function(test_good))
    other = _ssn(random_state=1, max_epochs=1).fit(good)
    assert not np.array_equal(other.weights_["adaptor.weight"], fitted.weights_["adaptor.weight"])


def test_ssn_save_load_gives_identical_scores(fitted, images, tmp_path):
    import anomalox

    _, test_good, test_bad = images
    x = np.concatenate([test_good, test_bad])
    loaded = anomalox.load(fitted.save(tmp_path / "ssn.safetensors"))
    assert type(loaded).__name__ == "SuperSimpleNet"
    np.testing.assert_array_equal(loaded.decision_function(x), fitted.decision_function(x))
    np.testing.assert_array_equal(loaded.anomaly_map(x), fitted.anomaly_map(x))


def test_ssn_bad_parameters(images):
    good, _, _ = images
    with pytest.raises(ValueError, match="noise_std"):
        _ssn(noise_std=0.0).fit(good)
    with pytest.raises(ValueError, match="perlin_threshold"):
        _ssn(perlin_threshold=1.5).fit(good)
    with pytest.raises(ValueError, match="optimizer"):
        _ssn(optimizer="rmsprop").fit(good)
    with pytest.raises(ValueError, match="learning_rate"):
        _ssn(learning_rate=1e30, max_epochs=3).fit(good)
    with pytest.raises(ValueError, match="early_stopping_patience"):
        _ssn(early_stopping_patience=2).fit(good)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_ssn_trains_and_scores_on_a_gpu(images):
    good, test_good, _ = images
    gpu = _ssn(max_epochs=2, device="cuda").fit(good)
    scores = gpu.decision_function(test_good)
    assert scores.shape == (4,) and np.all(np.isfinite(scores))


def test_ssn_through_the_cli_and_evaluate(mvtec, tmp_path):
    import anomalox
    from anomalox.cli import main

    path = tmp_path / "ssn.ax"
    params = [
        "image_size=64",
        "max_epochs=1",
        "batch_size=4",
        "n_threads=1",
        "contamination=0.3",
        "validation_fraction=0.3",
    ]
    args = [a for p in params for a in ("--param", p)]
    assert main(["fit", str(mvtec), "--out", str(path), "--quiet", "--method", "supersimplenet", *args]) == 0
    model = anomalox.load(path)
    assert type(model).__name__ == "SuperSimpleNet" and len(model.loss_history_) == 1
    result = anomalox.evaluate(model, mvtec)
    assert 0.0 <= result["image_auroc"] <= 1.0 and result["aupro"] is not None
