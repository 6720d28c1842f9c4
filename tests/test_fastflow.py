"""FastFlow (the tch part): the coupling blocks, their log-determinant and inverse, the loss and the
maps against plain PyTorch written from the method's equations (FrEIA's ``AllInOneBlock`` with
anomalib's settings, anomalib's ``FastflowLoss`` and ``AnomalyMapGenerator``), one Adam step against
``torch.optim.Adam``, and the detector's training contract (loss decreases, determinism, save/load,
bad parameters, non-finite loss)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomalox.backbone import tch_available

pytestmark = pytest.mark.skipif(not tch_available(), reason="anomalox's tch part is not installed")

BLOCK_KEYS = (
    "conv1_weight",
    "conv1_bias",
    "conv2_weight",
    "conv2_bias",
    "global_scale",
    "global_offset",
    "permutation",
)


@pytest.fixture(scope="module")
def tch():
    import anomalox_tch

    return anomalox_tch._tch


def ref_block(x, w1, b1, w2, b2, gs, go, perm, clamp=2.0):
    """One AllInOneBlock forward: (out, log|det J| per image)."""
    c = x.shape[1]
    c1, c2 = c - c // 2, c // 2
    x1, x2 = x[:, :c1], x[:, c1:]
    k = w1.shape[-1]
    a = F.conv2d(F.relu(F.conv2d(x1, w1, b1, padding=k // 2)), w2, b2, padding=k // 2) * 0.1
    s = clamp * torch.tanh(a[:, :c2])
    y = torch.cat([x1, x2 * torch.exp(s) + a[:, c2:]], 1)
    g = 0.1 * F.softplus(gs, beta=0.5)
    # FrEIA's hard permutation: a 1x1 convolution with w[i, perm[i]] = 1
    w = torch.zeros(c, c, dtype=x.dtype)
    w[torch.arange(c), perm.long()] = 1.0
    out = F.conv2d(y * g + go, w.view(c, c, 1, 1))
    n_pixels = x.shape[2] * x.shape[3]
    return out, s.sum((1, 2, 3)) + n_pixels * torch.log(g).sum()


def ref_flow(x, blocks):
    total = 0.0
    for b in blocks:
        x, ld = ref_block(x, *b)
        total = total + ld
    return x, total


def random_blocks(c, kernels, gen, dtype=torch.float32):
    """Blocks away from the initial state (every term matters), as tensors requiring gradients."""
    c1, c2 = c - c // 2, c // 2
    blocks = []
    for k in kernels:
        h = c1  # hidden_ratio 1
        b = [
            torch.randn(h, c1, k, k, generator=gen) * 0.5,
            torch.randn(h, generator=gen) * 0.3,
            torch.randn(2 * c2, h, k, k, generator=gen) * 0.5,
            torch.randn(2 * c2, generator=gen) * 0.3,
            9.93 + torch.randn(1, c, 1, 1, generator=gen),
            torch.randn(1, c, 1, 1, generator=gen) * 0.3,
            torch.randperm(c, generator=gen).float(),
        ]
        blocks.append([t.to(dtype).requires_grad_(i < 6) for i, t in enumerate(b)])
    return blocks


def test_flow_values_log_det_gradients_and_inverse_match_the_equations(tch):
    gen = torch.Generator().manual_seed(0)
    blocks = random_blocks(5, (3, 1, 3), gen)
    x = torch.randn(2, 5, 6, 4, generator=gen, requires_grad=True)
    z, ld = tch.fastflow_flow(x, blocks, 2.0, False)
    assert z.shape == x.shape and ld.shape == (2, 6, 4)

    blocks64 = [[t.detach().double().requires_grad_(t.requires_grad) for t in b] for b in blocks]
    x64 = x.detach().double().requires_grad_(True)
    z_ref, ld_ref = ref_flow(x64, blocks64)
    torch.testing.assert_close(z.double(), z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld.sum((1, 2)).double(), ld_ref, rtol=1e-5, atol=1e-5)

    # gradients of a scalar that uses z and the log-determinant
    weight = torch.randn(z.shape, generator=gen)
    got = (z * weight).sum() - ld.sum()
    want = (z_ref * weight.double()).sum() - ld_ref.sum()
    trained = [t for b in blocks for t in b if t.requires_grad]
    trained64 = [t for b in blocks64 for t in b if t.requires_grad]
    g_got = torch.autograd.grad(got, [x, *trained])
    g_want = torch.autograd.grad(want, [x64, *trained64])
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))

    # the inverse undoes the flow
    back, none = tch.fastflow_flow(z.detach(), blocks, 2.0, True)
    assert none is None
    torch.testing.assert_close(back, x.detach(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="blocks"):
        tch.fastflow_flow(x, [blocks[0][:6]], 2.0, False)


def test_fastflow_loss_and_maps_match_anomalib_equations(tch):
    gen = torch.Generator().manual_seed(1)
    zs = [torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 6, 4, 4, generator=gen)]
    lds = [torch.randn(3, 8, 8, generator=gen, requires_grad=True), torch.randn(3, 4, 4, generator=gen)]
    zs[0].requires_grad_(True)
    got = tch.fastflow_loss(zs, lds)
    # FastflowLoss: sum over taps of mean over the batch of (0.5 * sum z^2 - log|det J|)
    z64 = [z.detach().double().requires_grad_(True) for z in zs]
    want = sum(torch.mean(0.5 * (z**2).sum((1, 2, 3)) - ld.double().sum((1, 2))) for z, ld in zip(z64, lds))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    (g_got,) = torch.autograd.grad(got, zs[0])
    (g_want,) = torch.autograd.grad(want, z64[0])
    torch.testing.assert_close(g_got.double(), g_want, rtol=1e-5, atol=1e-7)

    size = (16, 16)
    maps = tch.fastflow_map([z.detach() for z in zs], [ld.detach() for ld in lds], size, "probability")
    # AnomalyMapGenerator: mean over taps of the upsampled -exp(-0.5 * mean_c z^2)
    ref = torch.stack(
        [F.interpolate(-torch.exp(-0.5 * (z.detach() ** 2).mean(1, keepdim=True)), size, mode="bilinear") for z in zs],
        -1,
    ).mean(-1)[:, 0]
    torch.testing.assert_close(maps, ref, rtol=1e-5, atol=1e-6)
    assert float(maps.max()) < 0 and float(maps.min()) >= -1
    nll = tch.fastflow_map([z.detach() for z in zs], [ld.detach() for ld in lds], size, "nll")
    ref = torch.stack(
        [
            F.interpolate(0.5 * (z.detach() ** 2).sum(1, keepdim=True) - ld.detach()[:, None], size, mode="bilinear")
            for z, ld in zip(zs, lds)
        ],
        -1,
    ).mean(-1)[:, 0]
    torch.testing.assert_close(nll, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="map_mode"):
        tch.fastflow_map(zs, lds, size, "max")
    with pytest.raises(ValueError, match="log_dets"):
        tch.fastflow_loss(zs, lds[:1])


def _head(tch, channels=(5, 4), grids=((6, 4), (3, 2)), steps=3, ratio=1.0, conv3x3_only=False, seed=0):
    return tch.HeadModel.fastflow(
        "efficientnet_lite0",
        [f"tap{i}" for i in range(len(channels))],
        list(channels),
        list(grids),
        steps,
        ratio,
        conv3x3_only,
        2.0,
        seed,
        None,
        1,
    )


def _ref_head(state, feats, steps):
    """LayerNorm over (C, h, w) with its affine, then the blocks: per tap (z, log|det J|)."""
    out = []
    for i, f in enumerate(feats):
        x = F.layer_norm(f, f.shape[1:], state[f"tap{i}.norm_weight"], state[f"tap{i}.norm_bias"], eps=1e-5)
        blocks = [[state[f"tap{i}.step{j}.{k}"] for k in BLOCK_KEYS] for j in range(steps)]
        out.append(ref_flow(x, blocks))
    return out


def test_fastflow_head_initialisation_and_outputs(tch):
    head = _head(tch)
    state = dict(head.state_dict())
    assert len(state) == 2 * (2 + 3 * len(BLOCK_KEYS))
    # kernels 3, 1, 3; torch's default Conv2d init U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for j, k in enumerate((3, 1, 3)):
        w = state[f"tap0.step{j}.conv1_weight"]
        assert tuple(w.shape) == (3, 3, k, k)  # 5 channels: c1 = 3, hidden 3
        assert tuple(state[f"tap0.step{j}.conv2_weight"].shape) == (4, 3, k, k)  # 2 * c2
        bound = 1 / math.sqrt(3 * k * k)
        assert float(w.abs().max()) <= bound and float(state[f"tap0.step{j}.conv1_bias"].abs().max()) <= bound
    g = 0.1 * F.softplus(state["tap0.step0.global_scale"], beta=0.5)
    torch.testing.assert_close(g, torch.ones_like(g))
    assert not state["tap0.step0.global_offset"].any()
    assert torch.equal(state["tap1.norm_weight"], torch.ones(4, 3, 2)) and not state["tap1.norm_bias"].any()
    for i, c in enumerate((5, 4)):
        perms = [state[f"tap{i}.step{j}.permutation"] for j in range(3)]
        for p in perms:
            assert sorted(p.long().tolist()) == list(range(c))
    assert len({tuple(p.tolist()) for p in (state[f"tap0.step{j}.permutation"] for j in range(3))}) > 1
    assert not torch.equal(
        state["tap0.step0.conv1_weight"], dict(_head(tch, seed=1).state_dict())["tap0.step0.conv1_weight"]
    )
    assert torch.equal(state["tap0.step0.conv1_weight"], dict(_head(tch).state_dict())["tap0.step0.conv1_weight"])

    gen = torch.Generator().manual_seed(2)
    new = {
        k: (t if k.endswith("permutation") else t + 0.2 * torch.randn(t.shape, generator=gen)) for k, t in state.items()
    }
    head.load_state_dict(list(new.items()))
    feats = [torch.randn(2, 5, 6, 4, generator=gen) * 3 + 1, torch.randn(2, 4, 3, 2, generator=gen)]
    out = head.features(feats, 1)
    ref = _ref_head(new, feats, 3)
    for i, (z_ref, ld_ref) in enumerate(ref):
        torch.testing.assert_close(out[2 * i], z_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[2 * i + 1].sum((1, 2)), ld_ref, rtol=1e-4, atol=1e-4)
    maps, scores = head.maps(feats, (12, 8), "probability", 1)
    assert scores is None and maps.shape == (2, 12, 8)
    want = tch.fastflow_map([out[0], out[2]], [out[1], out[3]], (12, 8), "probability")
    torch.testing.assert_close(maps, want)
    with pytest.raises(ValueError, match="map_mode"):
        head.maps(feats, (12, 8), "sum", 1)
    with pytest.raises(ValueError, match="features"):
        head.features([feats[0]], 1)
    with pytest.raises(ValueError, match="group"):
        head.set_group(1, 1e-3, 0.0)  # FastFlow's variables are all in group 0
    bad = dict(new)
    bad["tap0.step1.permutation"] = torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="permutation"):
        head.load_state_dict(list(bad.items()))
    torch.testing.assert_close(dict(head.state_dict())["tap0.step1.permutation"], new["tap0.step1.permutation"])


def test_fastflow_head_refuses_bad_shapes(tch):
    with pytest.raises(ValueError, match="flow_steps"):
        _head(tch, steps=0)
    with pytest.raises(ValueError, match="hidden_ratio"):
        _head(tch, ratio=0.1)
    with pytest.raises(ValueError, match="layers"):
        _head(tch, channels=(1, 4))
    with pytest.raises(ValueError, match="layers"):
        _head(tch, channels=(5,))


def test_one_fastflow_training_step_equals_torch_adam(tch):
    head = _head(tch, seed=3)
    state = {k: t.clone().requires_grad_(not k.endswith("permutation")) for k, t in head.state_dict()}
    lr, wd = 1e-3, 1e-5
    head.configure("adam", lr, wd, 0.9, 0.0, False, (0.9, 0.999), 1e-8, None, "constant", 10)
    gen = torch.Generator().manual_seed(4)
    feats = [torch.randn(4, 5, 6, 4, generator=gen), torch.randn(4, 4, 3, 2, generator=gen)]
    order = [2, 0, 3, 1]
    losses = head.train_epoch(torch.zeros(4, 3, 1, 1), feats, order, 4, None, 1)
    assert len(losses) == 1

    trained = [t for t in state.values() if t.requires_grad]
    opt = torch.optim.Adam(trained, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    idx = torch.tensor(order)
    ref = _ref_head(state, [f[idx] for f in feats], 3)
    loss = sum(torch.mean(0.5 * (z**2).sum((1, 2, 3)) - ld) for z, ld in ref)
    assert abs(losses[0] - loss.item()) <= 1e-5 * abs(loss.item())
    opt.zero_grad()
    loss.backward()
    opt.step()
    for name, t in head.state_dict():
        torch.testing.assert_close(t, state[name].detach(), rtol=1e-5, atol=2e-6, msg=name)


# ------------------------------------------------------------------ the detector
def _fastflow(**kw):
    from anomalox import FastFlow

    params = dict(
        image_size=64,
        max_epochs=8,
        batch_size=4,
        flow_steps=4,
        n_threads=1,
        validation_fraction=0.25,
        contamination=0.25,
    )
    params.update(kw)
    return FastFlow(**params)


@pytest.fixture(scope="module")
def fitted(images):
    good, _, _ = images
    return _fastflow().fit(good)


def test_fastflow_fits_scores_and_localises(fitted, images):
    _, test_good, test_bad = images
    assert len(fitted.loss_history_) == 8
    assert fitted.loss_history_[-1] < fitted.loss_history_[0]
    # Lite0 _blocks.2, _blocks.4, _blocks.10 at 64 px: strides 4, 8, 16
    assert fitted.feature_shapes_ == ((24, 16, 16), (40, 8, 8), (112, 4, 4))
    assert fitted.weights_["tap2.step3.conv2_weight"].shape == (112, 56, 1, 1)
    assert fitted.input_size_ == (64, 64)
    found = fitted.inspect(np.concatenate([test_good, test_bad]))
    assert found.scores.shape == (8,) and found.maps.shape == (8, 64, 64)
    assert np.all(found.maps < 0) and np.all(found.maps >= -1)
    np.testing.assert_allclose(found.scores, found.maps.reshape(8, -1).max(1), rtol=1e-6)
    assert found.scores[4:].mean() > found.scores[:4].mean()
    assert fitted.threshold_ is not None and found.labels is not None
    assert "3 flows of 4 steps" in repr(fitted)


def test_fastflow_is_deterministic_for_a_seed(fitted, images):
    good, test_good, _ = images
    again = _fastflow().fit(good)
    for name, value in fitted.weights_.items():
        assert np.array_equal(value, again.weights_[name]), name
    np.testing.assert_array_equal(again.decision_function(test_good), fitted.decision_function(test_good))
    other = _fastflow(random_state=1, max_epochs=1).fit(good)
    assert not np.array_equal(other.weights_["tap0.step0.conv1_weight"], fitted.weights_["tap0.step0.conv1_weight"])


def test_fastflow_save_load_gives_identical_scores(fitted, images, tmp_path):
    import anomalox

    _, test_good, test_bad = images
    x = np.concatenate([test_good, test_bad])
    loaded = anomalox.load(fitted.save(tmp_path / "fastflow.safetensors"))
    assert type(loaded).__name__ == "FastFlow" and loaded.feature_shapes_ == fitted.feature_shapes_
    np.testing.assert_array_equal(loaded.decision_function(x), fitted.decision_function(x))
    np.testing.assert_array_equal(loaded.anomaly_map(x), fitted.anomaly_map(x))
    nll = loaded.set_params(map_mode="nll")
    maps = nll.anomaly_map(x)
    assert maps.shape == (8, 64, 64) and np.all(np.isfinite(maps)) and float(maps.max()) > 0


def test_fastflow_tiles_and_bad_parameters(images):
    good, test_good, _ = images
    tiled = _fastflow(tile_size=32, max_epochs=2, validation_fraction=0).fit(good[:6])
    found = tiled.inspect(test_good)
    assert found.maps.shape == (4, 64, 64)
    np.testing.assert_allclose(found.scores, found.maps.reshape(4, -1).max(1), rtol=1e-6)
    with pytest.raises(ValueError, match="flow_steps"):
        _fastflow(flow_steps=0).fit(good)
    with pytest.raises(ValueError, match="hidden_ratio"):
        _fastflow(hidden_ratio=0.0).fit(good)
    with pytest.raises(ValueError, match="map_mode"):
        _fastflow(map_mode="max").fit(good)
    with pytest.raises(ValueError, match="learning_rate"):
        _fastflow(learning_rate=1e12, max_epochs=3).fit(good)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_fastflow_trains_and_scores_on_a_gpu(images):
    good, test_good, _ = images
    cpu = _fastflow(max_epochs=3).fit(good)
    gpu = _fastflow(max_epochs=3, device="cuda").fit(good)
    assert gpu.loss_history_[-1] < gpu.loss_history_[0]
    scores = gpu.decision_function(test_good)
    assert scores.shape == (4,) and np.all(np.isfinite(scores))
    # Different kernels: close to the CPU fit, not equal.
    np.testing.assert_allclose(gpu.loss_history_[0], cpu.loss_history_[0], rtol=0.05)


def test_fastflow_through_the_cli_and_evaluate(mvtec, tmp_path):
    import anomalox
    from anomalox.cli import main

    path = tmp_path / "fastflow.ax"
    params = [
        "image_size=64",
        "max_epochs=2",
        "batch_size=4",
        "flow_steps=2",
        "n_threads=1",
        "contamination=0.3",
        "validation_fraction=0.3",
    ]
    args = [a for p in params for a in ("--param", p)]
    assert main(["fit", str(mvtec), "--out", str(path), "--quiet", "--method", "fastflow", *args]) == 0
    model = anomalox.load(path)
    assert type(model).__name__ == "FastFlow" and len(model.loss_history_) == 2
    result = anomalox.evaluate(model, mvtec)
    assert 0.0 <= result["image_auroc"] <= 1.0 and result["aupro"] is not None


def test_fastflow_without_the_feature_cache_trains_the_same(fitted, images):
    # cache_features=False: the backbone runs on each shuffled mini-batch instead of once per image.
    good, test_good, _ = images
    streamed = _fastflow(cache_features=False).fit(good)
    np.testing.assert_allclose(streamed.loss_history_, fitted.loss_history_, rtol=1e-4)
    np.testing.assert_allclose(streamed.decision_function(test_good), fitted.decision_function(test_good), rtol=1e-3)
    assert streamed.feature_shapes_ == fitted.feature_shapes_
