"""Reverse Distillation (the tch part): the loss, its gradient and the map against plain PyTorch
written from the paper's equations, the OCBE and decoder against anomalib's parameter names and
counts, and the detector's training contract (loss decreases, determinism, save/load)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomalox.backbone import BACKBONES, tch_available

pytestmark = pytest.mark.skipif(not tch_available(), reason="anomalox's tch part is not installed")

# anomalib 2.7.0, measured in its own venv: sum of numel over get_bottleneck_layer("resnet18") and
# get_decoder("resnet18") parameters is 15,908,480, of which OCBE.conv4 / bn4 (created, never used
# by its forward pass, and left out by anomalox) hold 525,312.
ANOMALIB_RESNET18_PARAMETERS = 15_908_480
ANOMALIB_RESNET18_UNUSED = 525_312


@pytest.fixture(scope="module")
def tch():
    import anomalox_tch

    return anomalox_tch._tch


def ref_loss(encoder: list[torch.Tensor], decoder: list[torch.Tensor]) -> torch.Tensor:
    # Deng & Li 2022, eq. (2): per tap 1 - <vec e, vec d> / (||vec e|| ||vec d||) over each image's
    # flattened features, averaged over the batch, summed over the taps.
    total = torch.zeros((), dtype=torch.float64)
    for e, d in zip(encoder, decoder):
        a, b = e.reshape(e.shape[0], -1), d.reshape(d.shape[0], -1)
        cos = (a * b).sum(1) / (torch.sqrt((a * a).sum(1)) * torch.sqrt((b * b).sum(1)))
        total = total + (1 - cos).mean()
    return total


def ref_map(encoder, decoder, size, combine):
    # eq. (3)-(4): per position 1 - cos along the channels, bilinear (align_corners, as anomalib)
    # to the image size, added (or multiplied) over the taps.
    out = None
    for e, d in zip(encoder, decoder):
        m = (1 - F.cosine_similarity(e, d, dim=1)).unsqueeze(1)
        m = F.interpolate(m, size=size, mode="bilinear", align_corners=True)
        out = m if out is None else (out * m if combine == "product" else out + m)
    return out[:, 0]


def pairs(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 6, 8, 8), (2, 10, 4, 4), (2, 12, 2, 2)]
    encoder = [torch.randn(s, generator=g) for s in shapes]
    decoder = [torch.randn(s, generator=g) for s in shapes]
    return encoder, decoder


def test_rd_loss_and_its_gradient_match_the_equations(tch):
    encoder, decoder = pairs()
    mine_d = [d.clone().requires_grad_(True) for d in decoder]
    mine = tch.rd_loss(encoder, mine_d)
    mine.backward()
    ref_d = [d.double().clone().requires_grad_(True) for d in decoder]
    ref = ref_loss([e.double() for e in encoder], ref_d)
    ref.backward()
    assert mine.dtype == torch.float32 and mine.dim() == 0
    assert abs(mine.detach().item() - ref.detach().item()) <= 1e-5 * abs(ref.detach().item())
    for a, b in zip(mine_d, ref_d):
        torch.testing.assert_close(a.grad, b.grad.float(), atol=1e-5, rtol=1e-5)
    assert abs(tch.rd_loss(encoder, encoder).item()) < 1e-6


@pytest.mark.parametrize("combine", ["sum", "product"])
def test_rd_map_matches_the_equations(tch, combine):
    encoder, decoder = pairs(1)
    mine = tch.rd_map(encoder, decoder, (16, 20), combine, 1)
    ref = ref_map([e.double() for e in encoder], [d.double() for d in decoder], (16, 20), combine)
    assert mine.shape == (2, 16, 20)
    torch.testing.assert_close(mine, ref.float(), atol=1e-5, rtol=1e-5)


def test_rd_functions_name_bad_arguments(tch):
    encoder, decoder = pairs()
    with pytest.raises(ValueError, match="decoder"):
        tch.rd_loss(encoder, decoder[:2])
    with pytest.raises(ValueError, match="map_combine"):
        tch.rd_map(encoder, decoder, (8, 8), "mean", 1)


def _rd_model(tch, name, layers, seed=0):
    return tch.HeadModel.reverse_distillation(
        name, BACKBONES[name].family, dict(BACKBONES[name].config), layers, seed, None, 1
    )


def test_resnet18_ocbe_and_decoder_have_anomalib_s_parameters(tch):
    model = _rd_model(tch, "resnet18", ["layer1", "layer2", "layer3"])
    state = dict(model.state_dict())
    trainable = {k: v for k, v in state.items() if not k.endswith(("running_mean", "running_var"))}
    assert sum(v.numel() for v in trainable.values()) == ANOMALIB_RESNET18_PARAMETERS - ANOMALIB_RESNET18_UNUSED
    components = pytest.importorskip("anomalib.models.image.reverse_distillation.components")
    from anomalib.models.components.backbone import get_decoder

    theirs = {f"bottleneck.{k}": v for k, v in components.get_bottleneck_layer("resnet18").state_dict().items()}
    theirs.update({f"decoder.{k}": v for k, v in get_decoder("resnet18").state_dict().items()})
    theirs = {
        k: v
        for k, v in theirs.items()
        if not k.endswith("num_batches_tracked") and not k.startswith(("bottleneck.conv4", "bottleneck.bn4"))
    }
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {k: tuple(v.shape) for k, v in state.items()}

    # With the same weights (batch-norm statistics moved by one training step), anomalib's modules
    # in evaluation mode give the decoder's features.
    g = torch.Generator().manual_seed(0)
    taps = [torch.randn(2, c, s, s, generator=g).relu() for c, s in ((64, 16), (128, 8), (256, 4))]
    model.configure("adam", 0.005, 0.0, 0.9, 0.0, False, (0.5, 0.999), 1e-8, None, "constant", 10)
    model.train_epoch(torch.zeros(1), taps, [0, 1], 2, None, 1)
    state = dict(model.state_dict())
    bottleneck, decoder = components.get_bottleneck_layer("resnet18"), get_decoder("resnet18")
    for prefix, module in (("bottleneck.", bottleneck), ("decoder.", decoder)):
        module.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=False)
        module.eval()
    with torch.no_grad():
        expected = decoder(bottleneck(taps))
    # The tch part runs the convolutions channels-last (other kernels, other summation order):
    # equal up to float32 rounding at the features' scale.
    for mine, ref in zip(model.features(taps, 1), expected):
        assert mine.shape == ref.shape
        assert float((mine - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_rd_model_refuses_taps_that_do_not_double(tch):
    with pytest.raises(ValueError, match="layers"):
        _rd_model(tch, "efficientnet_lite0", ["_blocks.2", "_blocks.1", "_blocks.10"])
    with pytest.raises(ValueError, match="layers"):
        _rd_model(tch, "efficientnet_lite0", ["_blocks.2", "_blocks.99", "_blocks.10"])


def test_rd_model_features_have_the_taps_shapes(tch):
    model = _rd_model(tch, "efficientnet_lite0", ["_blocks.2", "_blocks.4", "_blocks.10"])
    encoder = [torch.randn(2, 24, 17, 15), torch.randn(2, 40, 9, 8), torch.randn(2, 112, 5, 4)]
    decoded = model.features(encoder, 1)
    assert [tuple(d.shape) for d in decoded] == [tuple(e.shape) for e in encoder]
    maps, scores = model.maps(encoder, (65, 57), "sum", 1)
    assert scores is None
    assert maps.shape == (2, 65, 57)
    torch.testing.assert_close(maps, tch.rd_map(encoder, decoded, (65, 57), "sum", 1))
    with pytest.raises(ValueError, match="encoder"):
        model.maps(encoder[:2], (65, 57), "sum", 1)


def test_rd_model_state_round_trips_and_bad_weights_are_named(tch):
    layers = ["layer1", "layer2", "layer3"]
    a, b = _rd_model(tch, "resnet18", layers, seed=0), _rd_model(tch, "resnet18", layers, seed=1)
    state = a.state_dict()
    assert [k for k, _ in state] == sorted(k for k, _ in state)
    assert all(t.is_contiguous() and t.device.type == "cpu" for _, t in state)
    encoder = [torch.randn(1, 64, 16, 16), torch.randn(1, 128, 8, 8), torch.randn(1, 256, 4, 4)]
    assert not torch.equal(a.maps(encoder, (32, 32), "sum", 1)[0], b.maps(encoder, (32, 32), "sum", 1)[0])
    b.load_state_dict(state)
    torch.testing.assert_close(
        a.maps(encoder, (32, 32), "sum", 1)[0], b.maps(encoder, (32, 32), "sum", 1)[0], rtol=0, atol=0
    )
    before = b.state_dict()
    for bad, match in (
        (state[1:], r"state.*1 missing"),
        ([*state, ("extra.weight", torch.zeros(1))], r"state.*1 unexpected"),
        ([(k, t[..., :1] if t.dim() == 4 else t) for k, t in state], r"state.*expected shape"),
    ):
        with pytest.raises(ValueError, match=match):
            b.load_state_dict(bad)
    # nothing was copied by a refused load
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(before, b.state_dict()))


# ------------------------------------------------------------------ the detector
def _rd(**kw):
    from anomalox import ReverseDistillation

    params = dict(
        image_size=64,
        max_epochs=3,
        batch_size=4,
        n_threads=1,
        validation_fraction=0.25,
        contamination=0.25,
    )
    params.update(kw)
    return ReverseDistillation(**params)


@pytest.fixture(scope="module")
def fitted(images):
    good, _, _ = images
    return _rd().fit(good)


def test_rd_fits_scores_and_localises(fitted, images):
    good, test_good, test_bad = images
    assert len(fitted.loss_history_) == 3
    assert fitted.loss_history_[-1] < fitted.loss_history_[0]
    found = fitted.inspect(np.concatenate([test_good, test_bad]))
    assert found.scores.shape == (8,) and found.maps.shape == (8, 64, 64)
    assert np.all(np.isfinite(found.maps))
    np.testing.assert_allclose(found.scores, found.maps.reshape(8, -1).max(1), rtol=1e-6)
    assert fitted.threshold_ is not None and found.labels is not None
    assert all(k.startswith(("bottleneck.", "decoder.")) for k in fitted.weights_)
    assert all(v.dtype == np.float32 for v in fitted.weights_.values())
    assert "OCBE" in repr(fitted)


def test_rd_is_deterministic_for_a_seed(fitted, images):
    good, test_good, _ = images
    again = _rd().fit(good)
    for name, value in fitted.weights_.items():
        assert np.array_equal(value, again.weights_[name]), name
    assert again.loss_history_ == fitted.loss_history_
    np.testing.assert_array_equal(again.decision_function(test_good), fitted.decision_function(test_good))
    other = _rd(random_state=1, max_epochs=1).fit(good)
    name = "decoder.layer1.0.conv1.weight"
    assert not np.array_equal(other.weights_[name], fitted.weights_[name])


def test_rd_save_load_gives_identical_scores(fitted, images, tmp_path):
    import anomalox

    _, test_good, test_bad = images
    x = np.concatenate([test_good, test_bad])
    path = fitted.save(tmp_path / "rd.safetensors")
    loaded = anomalox.load(path)
    assert type(loaded).__name__ == "ReverseDistillation"
    assert loaded.loss_history_ == fitted.loss_history_
    np.testing.assert_array_equal(loaded.decision_function(x), fitted.decision_function(x))
    np.testing.assert_array_equal(loaded.anomaly_map(x), fitted.anomaly_map(x))


def test_rd_product_maps_and_bad_parameters(images):
    good, test_good, _ = images
    model = _rd(map_combine="product", max_epochs=1, validation_fraction=0).fit(good[:6])
    assert model.anomaly_map(test_good).shape == (4, 64, 64)
    with pytest.raises(ValueError, match="map_combine"):
        _rd(map_combine="mean").fit(good)


def test_rd_max_steps_early_stopping_and_torch_s_random_state(images):
    good, _, _ = images
    model = _rd(max_epochs=5, max_steps=4).fit(good)  # 10 training images, batch 4: 3 steps per epoch
    assert len(model.loss_history_) == 2
    stopped = _rd(max_epochs=4, early_stopping_patience=1).fit(good)
    assert 1 <= len(stopped.loss_history_) <= 4
    torch.manual_seed(123)
    before = torch.get_rng_state()
    _rd(max_epochs=1, validation_fraction=0).fit(good[:6])
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_rd_trains_and_scores_on_a_gpu(images):
    good, test_good, _ = images
    cpu = _rd(max_epochs=2).fit(good)
    gpu = _rd(max_epochs=2, device="cuda").fit(good)
    assert gpu.loss_history_[-1] < gpu.loss_history_[0]
    scores = gpu.decision_function(test_good)
    assert scores.shape == (4,) and np.all(np.isfinite(scores))
    # Different kernels: close to the CPU fit, not equal.
    np.testing.assert_allclose(gpu.loss_history_[0], cpu.loss_history_[0], rtol=0.05)
