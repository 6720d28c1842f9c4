"""Trained detectors (the tch part): STFPM's loss and map against plain PyTorch written from the
paper's equations, one optimiser step against ``torch.optim``, and the detector's training
contract (loss decreases, determinism, save/load, non-finite loss, Ctrl-C, unchanged torch RNG)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

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


def ref_normalize(x: torch.Tensor) -> torch.Tensor:
    # n(x) = x / max(||x||_2, 1e-12) over channels, written out.
    norm = torch.sqrt((x * x).sum(dim=1, keepdim=True)).clamp_min(1e-12)
    return x / norm


def ref_loss(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor:
    # Wang et al. 2021, eq. (1)-(2): per tap 1/(2 h w) * sum over positions of ||n(t) - n(s)||^2,
    # summed over taps and over the batch.
    total = torch.zeros((), dtype=torch.float64)
    for t, s in zip(teacher, student):
        h, w = t.shape[-2:]
        total = total + ((ref_normalize(t) - ref_normalize(s)) ** 2).sum() / (2 * h * w)
    return total


def ref_map(teacher, student, size, combine):
    # eq. (3)-(4): per-position 1/2 ||n(t) - n(s)||^2, bilinear to the image size, product over taps.
    out = None
    for t, s in zip(teacher, student):
        m = 0.5 * ((ref_normalize(t) - ref_normalize(s)) ** 2).sum(dim=1, keepdim=True)
        m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        out = m if out is None else (out * m if combine == "product" else out + m)
    return out[:, 0]


def pairs(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 6, 8, 8), (2, 10, 4, 4), (2, 12, 2, 2)]
    teacher = [torch.randn(s, generator=g) for s in shapes]
    student = [torch.randn(s, generator=g) for s in shapes]
    return teacher, student


def test_stfpm_loss_and_its_gradient_match_the_equations(tch):
    teacher, student = pairs()
    mine_s = [s.clone().requires_grad_(True) for s in student]
    mine = tch.stfpm_loss(teacher, mine_s)
    mine.backward()
    ref_s = [s.double().clone().requires_grad_(True) for s in student]
    ref = ref_loss([t.double() for t in teacher], ref_s)
    ref.backward()
    assert mine.dtype == torch.float32 and mine.dim() == 0
    assert abs(mine.detach().item() - ref.detach().item()) <= 1e-5 * abs(ref.detach().item())
    for a, b in zip(mine_s, ref_s):
        torch.testing.assert_close(a.grad, b.grad.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("combine", ["product", "sum"])
def test_stfpm_map_matches_the_equations(tch, combine):
    teacher, student = pairs(1)
    mine = tch.stfpm_map(teacher, student, (16, 20), combine, 1)
    ref = ref_map([t.double() for t in teacher], [s.double() for s in student], (16, 20), combine)
    assert mine.shape == (2, 16, 20)
    torch.testing.assert_close(mine, ref.float(), atol=1e-5, rtol=1e-5)


def test_stfpm_functions_name_bad_arguments(tch):
    teacher, student = pairs()
    with pytest.raises(ValueError, match="student"):
        tch.stfpm_loss(teacher, student[:2])
    with pytest.raises(ValueError, match="map_combine"):
        tch.stfpm_map(teacher, student, (8, 8), "mean", 1)


# ------------------------------------------------------------------ one step vs torch.optim
def _torchvision_resnet18():
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.resnet18(weights=None)


def _taps(net, x, n_layers):
    h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    out = []
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4)[:n_layers]:
        h = layer(h)
        out.append(h)
    return out


def test_student_state_holds_the_layers_up_to_the_deepest_tap_and_bad_weights_are_named(tch):
    from anomalox.backbone import BACKBONES

    config = dict(BACKBONES["resnet18"].config)
    a = tch.StfpmStudent("resnet18", "resnet", config, ["layer1", "layer2"], 3, None, 1)
    b = tch.StfpmStudent("resnet18", "resnet", config, ["layer1", "layer2"], 4, None, 1)
    state = a.state_dict()
    assert {k.split(".")[0] for k, _ in state} == {"conv1", "bn1", "layer1", "layer2"}
    b.load_state_dict(state)
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(state, b.state_dict()))
    deeper = tch.StfpmStudent("resnet18", "resnet", config, ["layer1", "layer2", "layer3"], 3, None, 1)
    with pytest.raises(ValueError, match=r"state.*resnet18 student.*unexpected"):
        b.load_state_dict(deeper.state_dict())
    with pytest.raises(ValueError, match=r"state.*missing"):
        deeper.load_state_dict(state)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_one_training_step_equals_torch_optim(tch, optimizer):
    from anomalox.backbone import BACKBONES

    layers = ["layer1", "layer2"]
    student = tch.StfpmStudent("resnet18", "resnet", dict(BACKBONES["resnet18"].config), layers, 3, None, 1)
    initial = dict(student.state_dict())
    assert all(k.split(".")[0] in {"conv1", "bn1", "layer1", "layer2"} for k in initial)
    lr, wd = 1e-3, 1e-2
    student.configure(optimizer, lr, wd, 0.9, 0.0, False, (0.8, 0.99), 1e-8, None, "constant", 10)

    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 3, 48, 48, generator=g)
    teacher = [torch.randn(3, 64, 12, 12, generator=g), torch.randn(3, 128, 6, 6, generator=g)]
    losses = student.train_epoch(x, teacher, [2, 0, 1], 3, None, 1)
    assert len(losses) == 1 and student.step == 1

    net = _torchvision_resnet18()
    missing, _ = net.load_state_dict(initial, strict=False)
    assert not [k for k in missing if k.split(".")[0] in {"conv1", "bn1", "layer1", "layer2"}]
    net.train()
    params = [p for n, p in net.named_parameters() if n.split(".")[0] in {"conv1", "bn1", "layer1", "layer2"}]
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, betas=(0.8, 0.99), eps=1e-8, weight_decay=wd)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    order = torch.tensor([2, 0, 1])
    loss = ref_loss([t[order] for t in teacher], _taps(net, x[order], 2))
    assert abs(losses[0] - loss.detach().item()) <= 1e-5 * abs(loss.detach().item())
    opt.zero_grad()
    loss.backward()
    opt.step()

    after = dict(student.state_dict())
    expected = {k: v for k, v in net.state_dict().items() if k in after}
    grads = {k: p.grad for k, p in net.named_parameters() if k in after}
    assert set(expected) == set(after)
    changed = 0
    for name, value in after.items():
        # Adam's first step is lr * g / (|g| + eps) with g = gradient + wd * weight: where g nearly
        # cancels, rounding differences in it move the step by up to lr. Those elements are only
        # checked to have stepped at most lr.
        sure = torch.ones_like(value, dtype=torch.bool)
        if name in grads and optimizer == "adam":
            sure = (grads[name] + wd * initial[name]).abs() > 1e-6
        torch.testing.assert_close(value[sure], expected[name][sure], atol=2e-6, rtol=1e-4, msg=name)
        assert float((value - initial[name]).abs().max()) <= 1.01 * lr + 1e-6 or name not in grads or optimizer == "sgd"
        changed += int(not torch.equal(value, initial[name]))
    assert changed > len(after) // 2  # the step moved the parameters and the statistics


# ------------------------------------------------------------------ the detector
def _stfpm(**kw):
    from anomalox import STFPM

    params = dict(
        image_size=64,
        max_epochs=3,
        batch_size=4,
        learning_rate=0.05,
        n_threads=1,
        validation_fraction=0.25,
        contamination=0.25,
    )
    params.update(kw)
    return STFPM(**params)


@pytest.fixture(scope="module")
def fitted(images):
    good, _, _ = images
    return _stfpm().fit(good)


def test_stfpm_fits_scores_and_localises(fitted, images):
    good, test_good, test_bad = images
    assert len(fitted.loss_history_) == 3
    assert fitted.loss_history_[-1] < fitted.loss_history_[0]
    found = fitted.inspect(np.concatenate([test_good, test_bad]))
    assert found.scores.shape == (8,) and found.maps.shape == (8, 64, 64)
    assert np.all(np.isfinite(found.maps)) and np.all(found.maps >= 0)
    # The image score is the map's maximum (no smoothing).
    np.testing.assert_allclose(found.scores, found.maps.reshape(8, -1).max(1), rtol=1e-6)
    assert fitted.threshold_ is not None and found.labels is not None
    assert set(fitted.student_weights_) and all(v.dtype == np.float32 for v in fitted.student_weights_.values())
    assert "student" in repr(fitted)


def test_stfpm_is_deterministic_for_a_seed(fitted, images):
    good, test_good, _ = images
    again = _stfpm().fit(good)
    for name, value in fitted.student_weights_.items():
        assert np.array_equal(value, again.student_weights_[name]), name
    assert again.loss_history_ == fitted.loss_history_
    np.testing.assert_array_equal(again.decision_function(test_good), fitted.decision_function(test_good))
    other = _stfpm(random_state=1).fit(good)
    assert not np.array_equal(other.student_weights_["_conv_stem.weight"], fitted.student_weights_["_conv_stem.weight"])


def test_stfpm_save_load_gives_identical_scores(fitted, images, tmp_path):
    import anomalox

    _, test_good, test_bad = images
    x = np.concatenate([test_good, test_bad])
    path = fitted.save(tmp_path / "stfpm.safetensors")
    loaded = anomalox.load(path)
    assert type(loaded).__name__ == "STFPM"
    assert loaded.loss_history_ == fitted.loss_history_
    np.testing.assert_array_equal(loaded.decision_function(x), fitted.decision_function(x))
    np.testing.assert_array_equal(loaded.anomaly_map(x), fitted.anomaly_map(x))


def test_fitting_leaves_torch_s_random_state_alone(images):
    good, _, _ = images
    torch.manual_seed(123)
    before = torch.get_rng_state()
    _stfpm(max_epochs=1, validation_fraction=0).fit(good[:6])
    assert torch.equal(torch.get_rng_state(), before)


def test_a_diverging_fit_names_the_learning_rate_and_leaves_nothing_fitted(images):
    from sklearn.exceptions import NotFittedError

    good, _, _ = images
    model = _stfpm(learning_rate=1e12, max_epochs=3, validation_fraction=0)
    with pytest.raises(ValueError, match=r"learning_rate: the training loss became (NaN|inf|-inf) at step \d+"):
        model.fit(good)
    with pytest.raises(NotFittedError):
        model.decision_function(good[:1])


def test_max_steps_and_early_stopping(images):
    good, _, _ = images
    model = _stfpm(max_epochs=5, max_steps=4).fit(good)  # 10 training images, batch 4: 3 steps per epoch
    assert len(model.loss_history_) == 2
    stopped = _stfpm(max_epochs=4, early_stopping_patience=1, learning_rate=0.05).fit(good)
    assert 1 <= len(stopped.loss_history_) <= 4
    with pytest.raises(ValueError, match="early_stopping_patience"):
        _stfpm(early_stopping_patience=2, validation_fraction=0).fit(good)


@pytest.mark.parametrize(
    "param, value",
    [("max_epochs", 0), ("optimizer", "rmsprop"), ("learning_rate", 0.0), ("betas", (0.9, 1.5)), ("map_combine", "x")],
)
def test_bad_training_parameters_are_named(images, param, value):
    good, _, _ = images
    with pytest.raises(ValueError, match=param):
        _stfpm(**{param: value}).fit(good)


def test_stfpm_refuses_a_module_backbone(images):
    good, _, _ = images
    with pytest.raises(ValueError, match="backbone: STFPM trains"):
        _stfpm(backbone=torch.nn.Conv2d(3, 8, 3), layers=["weight"]).fit(good)


def test_stfpm_adam_cosine_sum_and_tiles(images):
    good, test_good, test_bad = images
    model = _stfpm(
        optimizer="adam",
        learning_rate=1e-3,
        lr_schedule="cosine",
        grad_clip_norm=1.0,
        map_combine="sum",
        image_size=None,
        tile_size=32,
        max_epochs=2,
    ).fit(good)
    maps = model.anomaly_map(np.concatenate([test_good, test_bad]))
    assert maps.shape == (8, 64, 64) and np.all(np.isfinite(maps))


def test_ctrl_c_stops_training_within_a_step_and_leaves_it_unfitted(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, time, threading
            import numpy as np
            import torch
            from anomalox import STFPM
            rng = np.random.default_rng(0)
            x = rng.integers(0, 255, (16, 96, 96, 3), dtype=np.uint8)
            model = STFPM(image_size=96, max_epochs=1000, batch_size=4, n_threads=1, validation_fraction=0)
            def ready():  # training has started once the first epoch's call is running
                time.sleep(0.5)
                print("ready", flush=True)
            threading.Thread(target=ready).start()
            try:
                model.fit(x)
                print("finished", flush=True)
            except KeyboardInterrupt:
                print("interrupted %.3f %s" % (time.perf_counter(), hasattr(model, "student_weights_")), flush=True)
            """
        )
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(3.0)
    sent = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert out.startswith("interrupted"), out
    _, when, fitted = out.split()
    assert fitted == "False"
    # One step of 4 images at 96 px takes well under a second on one thread.
    assert float(when) - sent < 2.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_stfpm_trains_and_scores_on_a_gpu(images):
    good, test_good, _ = images
    cpu = _stfpm(max_epochs=2).fit(good)
    gpu = _stfpm(max_epochs=2, device="cuda").fit(good)
    assert gpu.loss_history_[-1] < gpu.loss_history_[0]
    scores = gpu.decision_function(test_good)
    assert scores.shape == (4,) and np.all(np.isfinite(scores))
    # Different kernels: close to the CPU fit, not equal.
    np.testing.assert_allclose(gpu.loss_history_[0], cpu.loss_history_[0], rtol=0.05)


@pytest.mark.filterwarnings("ignore::anomalox.CalibrationWarning")
def test_stfpm_through_the_cli_evaluate_and_report(mvtec, tmp_path):

    import anomalox
    from anomalox.cli import main
    from anomalox.report import write_evaluation_report

    path = tmp_path / "stfpm.ax"
    params = ["image_size=64", "max_epochs=2", "batch_size=4", "learning_rate=0.05", "n_threads=1"]
    args = [a for p in params for a in ("--param", p)]
    assert main(["fit", str(mvtec), "--out", str(path), "--quiet", "--method", "stfpm", *args]) == 0
    model = anomalox.load(path)
    assert type(model).__name__ == "STFPM" and len(model.loss_history_) == 2
    result = anomalox.evaluate(model, mvtec)
    assert 0.0 <= result["image_auroc"] <= 1.0 and result["aupro"] is not None
    html = write_evaluation_report(tmp_path / "r.html", result, detector=model)
    text = Path(html).read_text()
    assert "STFPM" in text and "trained 2 epochs" in text
    assert main(["evaluate", str(path), str(mvtec), "--json", "--quiet"]) == 0


def test_stfpm_without_the_feature_cache_trains_the_same(images):
    # cache_features=False: the teacher runs on each shuffled mini-batch instead of once per image;
    # max_steps stops the streamed loop as it stops the cached one.
    good, test_good, _ = images
    cached = _stfpm(max_steps=5, validation_fraction=0).fit(good)
    streamed = _stfpm(max_steps=5, validation_fraction=0, cache_features=False).fit(good)
    assert len(streamed.loss_history_) == len(cached.loss_history_) == 2  # 4 + 1 steps of 4 images
    np.testing.assert_allclose(streamed.loss_history_, cached.loss_history_, rtol=1e-4)
    np.testing.assert_allclose(streamed.decision_function(test_good), cached.decision_function(test_good), rtol=1e-3)
