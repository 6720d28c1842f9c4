"""FRE (the tch part): the autoencoder, loss and map against plain PyTorch written from the
method's equations (anomalib's ``TiedAE`` / ``FREModel``), one Adam step against ``torch.optim.Adam``,
and the detector's training contract (loss decreases, determinism, save/load, bad parameters)."""

from __future__ import annotations

import math

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


def ref_pool(f: torch.Tensor, k: int) -> torch.Tensor:
    # avg_pool2d with stride k, no padding, the partial window dropped; flattened channel-major.
    p = F.avg_pool2d(f, k) if k > 1 else f
    return p.reshape(p.shape[0], -1)


def ref_reconstruct(v, weight, encoder_bias, decoder_bias):
    # r = (v W^T + b_e) W + b_d
    return (v @ weight.T + encoder_bias) @ weight + decoder_bias


def _head(tch, channels=6, grid=(9, 7), pool=2, latent=5, seed=0):
    return tch.HeadModel.fre("efficientnet_lite0", "_blocks.10", channels, grid, pool, latent, seed, None, 1)


def test_fre_loss_map_and_gradient_match_the_equations(tch):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, 4 * 2 * 3, generator=g)
    r = torch.randn(3, 4 * 2 * 3, generator=g, requires_grad=True)
    r64 = r.detach().double().requires_grad_(True)
    got = tch.fre_loss(v, r)
    want = ((v.double() - r64) ** 2).mean()  # float64 reference
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    (g_got,) = torch.autograd.grad(got, r)
    (g_want,) = torch.autograd.grad(want, r64)
    torch.testing.assert_close(g_got.double(), g_want, rtol=1e-5, atol=1e-7)
    maps, scores = tch.fre_map(v, r.detach(), (4, 2, 3))
    ref = ((v.double() - r64.detach()) ** 2).reshape(3, 4, 2, 3).sum(1)
    torch.testing.assert_close(maps.double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(scores.double(), ref.sum((1, 2)), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="reconstruction"):
        tch.fre_map(v, r.detach(), (4, 2, 2))
    with pytest.raises(ValueError, match="reconstruction"):
        tch.fre_loss(v, r.detach()[:, :5])


def test_fre_head_outputs_and_maps_match_the_equations(tch):
    head = _head(tch)
    state = dict(head.state_dict())
    assert sorted(state) == ["decoder_bias", "encoder_bias", "weight"]
    d = 6 * 4 * 3  # 9 x 7 pooled by 2: 4 x 3
    assert tuple(state["weight"].shape) == (5, d)
    # xavier_uniform_: U(-a, a) with a = sqrt(6 / (D + L)); biases 0
    a = math.sqrt(6 / (d + 5))
    w = state["weight"]
    assert float(w.abs().max()) <= a and float(w.abs().max()) > 0.9 * a
    assert abs(float(w.std()) - a / math.sqrt(3)) < 0.15 * a / math.sqrt(3)
    assert not state["encoder_bias"].any() and not state["decoder_bias"].any()
    # a trained-looking state: nonzero biases
    g = torch.Generator().manual_seed(1)
    new = {k: torch.randn(t.shape, generator=g) for k, t in state.items()}
    head.load_state_dict(list(new.items()))

    f = torch.randn(2, 6, 9, 7, generator=g)
    v, r = head.features([f], 1)
    torch.testing.assert_close(v, ref_pool(f, 2), rtol=1e-6, atol=1e-6)
    ref_r = ref_reconstruct(ref_pool(f, 2), new["weight"], new["encoder_bias"], new["decoder_bias"])
    torch.testing.assert_close(r, ref_r, rtol=1e-5, atol=1e-4)
    maps, scores = head.maps([f], (18, 14), "sum", 1)
    grid = ((ref_pool(f, 2) - ref_r) ** 2).reshape(2, 6, 4, 3).sum(1)
    torch.testing.assert_close(scores, grid.sum((1, 2)), rtol=1e-5, atol=1e-3)
    up = F.interpolate(grid[:, None], size=(18, 14), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(maps, up, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="features"):
        head.maps([torch.randn(2, 6, 8, 7)], (18, 14), "sum", 1)
    with pytest.raises(ValueError, match="features"):
        head.maps([f, f], (18, 14), "sum", 1)


def test_fre_head_refuses_bad_sizes(tch):
    with pytest.raises(ValueError, match="pooling_kernel_size"):
        _head(tch, grid=(3, 7), pool=4)
    with pytest.raises(ValueError, match="latent_dim"):
        _head(tch, latent=0)
    with pytest.raises(ValueError, match="pooling_kernel_size"):
        _head(tch, pool=0)


def test_one_fre_training_step_equals_torch_adam(tch):
    head = _head(tch, seed=3)
    state = {k: t.clone().requires_grad_(True) for k, t in head.state_dict()}
    lr, wd = 1e-2, 1e-3
    head.configure("adam", lr, wd, 0.9, 0.0, False, (0.9, 0.999), 1e-8, None, "constant", 10)
    g = torch.Generator().manual_seed(4)
    f = torch.randn(4, 6, 9, 7, generator=g)
    order = [2, 0, 3, 1]
    losses = head.train_epoch(torch.zeros(4, 3, 1, 1), [f], order, 4, None, 1)
    assert len(losses) == 1

    opt = torch.optim.Adam(list(state.values()), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    v = ref_pool(f[torch.tensor(order)], 2)
    loss = ((v - ref_reconstruct(v, state["weight"], state["encoder_bias"], state["decoder_bias"])) ** 2).mean()
    assert abs(losses[0] - loss.item()) <= 1e-5 * loss.item()
    opt.zero_grad()
    loss.backward()
    opt.step()
    for name, t in head.state_dict():
        torch.testing.assert_close(t, state[name].detach(), rtol=1e-5, atol=2e-6, msg=name)


# ------------------------------------------------------------------ the detector
def _fre(**kw):
    from anomalox import FRE

    params = dict(
        image_size=64,
        max_epochs=20,
        batch_size=4,
        latent_dim=8,
        n_threads=1,
        validation_fraction=0.25,
        contamination=0.25,
        learning_rate=1e-2,
    )
    params.update(kw)
    return FRE(**params)


@pytest.fixture(scope="module")
def fitted(images):
    good, _, _ = images
    return _fre().fit(good)


def test_fre_fits_scores_and_localises(fitted, images):
    _, test_good, test_bad = images
    assert len(fitted.loss_history_) == 20
    assert fitted.loss_history_[-1] < 0.5 * fitted.loss_history_[0]
    assert fitted.feature_shape_ == (112, 4, 4)  # Lite0 _blocks.10 at 64 px: stride 16
    assert fitted.weights_["weight"].shape == (8, 112 * 2 * 2)
    assert fitted.input_size_ == (64, 64)
    found = fitted.inspect(np.concatenate([test_good, test_bad]))
    assert found.scores.shape == (8,) and found.maps.shape == (8, 64, 64)
    assert np.all(np.isfinite(found.maps)) and np.all(found.maps >= 0)
    # the score is the sum over the pooled grid (2 x 2) of the error: the mean of the upsampled
    # map times the 4 cells, up to the bilinear resampling's edge effects
    assert np.all(found.scores > found.maps.reshape(8, -1).max(1))
    assert found.scores[4:].mean() > found.scores[:4].mean()
    assert fitted.threshold_ is not None and found.labels is not None
    assert "autoencoder 448 -> 8" in repr(fitted)


def test_fre_is_deterministic_for_a_seed(fitted, images):
    good, test_good, _ = images
    again = _fre().fit(good)
    for name, value in fitted.weights_.items():
        assert np.array_equal(value, again.weights_[name]), name
    np.testing.assert_array_equal(again.decision_function(test_good), fitted.decision_function(test_good))
    other = _fre(random_state=1, max_epochs=1).fit(good)
    assert not np.array_equal(other.weights_["weight"], fitted.weights_["weight"])


def test_fre_save_load_gives_identical_scores(fitted, images, tmp_path):
    import anomalox

    _, test_good, test_bad = images
    x = np.concatenate([test_good, test_bad])
    loaded = anomalox.load(fitted.save(tmp_path / "fre.safetensors"))
    assert type(loaded).__name__ == "FRE" and loaded.feature_shape_ == fitted.feature_shape_
    np.testing.assert_array_equal(loaded.decision_function(x), fitted.decision_function(x))
    np.testing.assert_array_equal(loaded.anomaly_map(x), fitted.anomaly_map(x))


def test_fre_tiles_and_bad_parameters(images):
    good, test_good, _ = images
    tiled = _fre(tile_size=32, max_epochs=2, validation_fraction=0).fit(good[:6])
    found = tiled.inspect(test_good)
    assert found.maps.shape == (4, 64, 64)
    np.testing.assert_allclose(found.scores, found.maps.reshape(4, -1).max(1), rtol=1e-6)
    with pytest.raises(ValueError, match="layers"):
        _fre(layers=("_blocks.4", "_blocks.10")).fit(good)
    with pytest.raises(ValueError, match="latent_dim"):
        _fre(latent_dim=0).fit(good)
    with pytest.raises(ValueError, match="pooling_kernel_size"):
        _fre(pooling_kernel_size=5).fit(good)  # 64 px: a 4 x 4 grid
    with pytest.raises(ValueError, match="learning_rate"):
        _fre(learning_rate=1e12, max_epochs=3).fit(good)


def test_fre_takes_one_tap_as_a_string(images):
    good, test_good, _ = images
    model = _fre(layers="_blocks.4", max_epochs=2, validation_fraction=0).fit(good[:6])
    assert model.feature_shape_ == (40, 8, 8)  # Lite0 _blocks.4 at 64 px: stride 8
    assert model.decision_function(test_good).shape == (4,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_fre_trains_and_scores_on_a_gpu(images):
    good, test_good, _ = images
    cpu = _fre(max_epochs=3).fit(good)
    gpu = _fre(max_epochs=3, device="cuda").fit(good)
    assert gpu.loss_history_[-1] < gpu.loss_history_[0]
    scores = gpu.decision_function(test_good)
    assert scores.shape == (4,) and np.all(np.isfinite(scores))
    # Different kernels: close to the CPU fit, not equal.
    np.testing.assert_allclose(gpu.loss_history_[0], cpu.loss_history_[0], rtol=0.05)


def test_fre_through_the_cli_and_evaluate(mvtec, tmp_path):
    import anomalox
    from anomalox.cli import main

    path = tmp_path / "fre.ax"
    params = [
        "image_size=64",
        "max_epochs=3",
        "batch_size=4",
        "latent_dim=8",
        "n_threads=1",
        "contamination=0.3",
        "validation_fraction=0.3",
    ]
    args = [a for p in params for a in ("--param", p)]
    assert main(["fit", str(mvtec), "--out", str(path), "--quiet", "--method", "fre", *args]) == 0
    model = anomalox.load(path)
    assert type(model).__name__ == "FRE" and len(model.loss_history_) == 3
    result = anomalox.evaluate(model, mvtec)
    assert 0.0 <= result["image_auroc"] <= 1.0 and result["aupro"] is not None
