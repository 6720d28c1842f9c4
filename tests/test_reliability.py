"""Reliability and safety of the detectors: bad input, threads, determinism, panics, model files.

Every bad input raises the documented exception (``ValueError`` for bad values, shapes and files,
``TypeError`` for bad dtypes and argument kinds) with a message naming the argument, what was
expected and what was given, and leaves a fitted detector exactly as it was. The kernel-level
bad-input contract is in ``test_bad_input.py``; the basic load refusals in ``test_detectors.py``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import struct
import threading
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import anomalox
from anomalox import PaDiM, PatchCore, _core, ops
from anomalox.detectors import patchcore as patchcore_module
from conftest import SIZE

# Their image sets are tiny: the conformal threshold falls back to the largest calibration score.
pytestmark = pytest.mark.filterwarnings("ignore::anomalox.CalibrationWarning")


def _patchcore(**kw):
    kw.setdefault("image_size", SIZE)
    kw.setdefault("coreset_ratio", 1.0)
    kw.setdefault("validation_fraction", 0.25)
    return PatchCore(**kw)


def _padim(**kw):
    kw.setdefault("image_size", SIZE)
    kw.setdefault("n_features", 20)
    kw.setdefault("validation_fraction", 0.25)
    return PaDiM(**kw)


@pytest.fixture(scope="module")
def pc(images):
    return _patchcore().fit(images[0])


@pytest.fixture(scope="module")
def pd(images):
    return _padim().fit(images[0])


@pytest.fixture(scope="module")
def test_x(images):
    return np.concatenate([images[1][:2], images[2][:2]])


def fitted_state(model) -> dict:
    """Copies of every learned attribute (public names ending in ``_``), backbone_ by identity."""
    return {
        k: (np.array(v, copy=True) if isinstance(v, np.ndarray) else v)
        for k, v in vars(model).items()
        if k.endswith("_") and not k.startswith("_")
    }


def assert_same_state(model, before: dict) -> None:
    after = fitted_state(model)
    assert after.keys() == before.keys()
    for k, v in before.items():
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(after[k], v, err_msg=k)
        else:
            assert after[k] is v or after[k] == v, k


def refused(model, exc, pattern, call, X):
    """`model.<call>(X)` raises `exc` matching `pattern`; the fitted state is unchanged."""
    before = fitted_state(model)
    with pytest.raises(exc, match=pattern):
        getattr(model, call)(X)
    assert_same_state(model, before)


# ------------------------------------------------------------------------------ bad images
def _nan_batch(images, value, where=1):
    x = images[1][:3].astype(np.float32) / 255
    x[where, 5, 7, 1] = value
    return x


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("kind", ["array", "float64", "tensor", "list"])
def test_non_finite_float_images_are_refused_naming_the_image(pc, images, value, kind):
    x = _nan_batch(images, value, where=1)
    if kind == "float64":
        x = x.astype(np.float64)
    elif kind == "tensor":
        x = torch.from_numpy(x).permute(0, 3, 1, 2)
    elif kind == "list":
        x = [images[1][0], *list(x)]  # a uint8 image first: the bad one is image 2 of the list
    index = 2 if kind == "list" else 1
    message = rf"^X: expected finite pixel values, got NaN/Inf in image {index}$"
    for call in ("decision_function", "anomaly_map", "fit"):
        refused(pc, ValueError, message, call, x)


def test_non_finite_images_in_a_loader_or_a_float_file_are_refused(pc, images, tmp_path):
    x = torch.from_numpy(_nan_batch(images, np.nan, where=1)).permute(0, 3, 1, 2)
    loader = torch.utils.data.DataLoader([{"image": t} for t in x], batch_size=3)
    refused(
        pc, ValueError, r"^images: expected finite pixel values, got NaN/Inf in image 1$", "decision_function", loader
    )
    plane = np.full((SIZE, SIZE), 0.5, np.float32)
    plane[3, 3] = np.inf
    path = tmp_path / "float.tif"
    Image.fromarray(plane, mode="F").save(path)
    refused(
        pc,
        ValueError,
        r"^images: expected finite pixel values, got NaN/Inf in image 0 \(.*float\.tif'\)$",
        "decision_function",
        str(path),
    )


@pytest.mark.parametrize(
    "x, shown",
    [
        (np.zeros(SIZE, np.uint8), f"({SIZE},)"),
        (np.zeros((1, 2, SIZE, SIZE, 3), np.uint8), f"(1, 2, {SIZE}, {SIZE}, 3)"),
        (np.zeros((2, SIZE, SIZE, 2), np.uint8), f"(2, {SIZE}, {SIZE}, 2)"),  # not split into 2-wide images
        (torch.zeros(SIZE), f"({SIZE},)"),
        (torch.zeros(SIZE, SIZE), f"({SIZE}, {SIZE})"),
        (torch.zeros(1, 1, 3, SIZE, SIZE), f"(1, 1, 3, {SIZE}, {SIZE})"),
        (torch.zeros(2, SIZE, SIZE, 3), f"(1, {SIZE}, {SIZE}, 3)"),  # channels-last tensor: C = 64
    ],
)
def test_wrong_rank_or_layout_is_a_value_error_with_the_shape_given(pc, x, shown):
    pattern = r"^(X|images): (expected|a 4-D array must be|a tensor must be).*got shape " + re.escape(shown)
    for call in ("decision_function", "fit"):
        refused(pc, ValueError, pattern, call, x)


@pytest.mark.parametrize("dtype", ["int32", "int64", "int8", "bool", "complex64"])
@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_integer_bool_and_complex_images_are_a_type_error_naming_the_dtype(pc, dtype, lib):
    x = np.ones((SIZE, SIZE, 3), dtype=dtype)
    if lib == "torch":
        x = torch.from_numpy(x).permute(2, 0, 1)
    pattern = r"^images: expected uint8, uint16 or floating-point pixels, got dtype (torch\.)?" + dtype
    for call in ("decision_function", "fit"):
        refused(pc, TypeError, pattern, call, x)
    refused(pc, TypeError, r"^X: expected a folder, image paths, .* got int$", "decision_function", 3)


@pytest.mark.parametrize(
    "x, pattern",
    [
        ([], r"^X: expected at least one image, got an empty sequence$"),
        ((), r"^X: expected at least one image, got an empty sequence$"),
        (
            np.zeros((0, SIZE, SIZE, 3), np.uint8),
            r"^X: expected at least one image, got an empty batch of shape \(0, 64, 64, 3\)$",
        ),
        (
            torch.zeros(0, 3, SIZE, SIZE),
            r"^X: expected at least one image, got an empty batch of shape \(0, 3, 64, 64\)$",
        ),
        (np.zeros((0, SIZE, 3), np.uint8), r"^images: expected non-empty images, got shape \(1, 3, 0, 64\)$"),
        (np.zeros((SIZE, 0), np.float32), r"^images: expected non-empty images, got shape \(1, 1, 64, 0\)$"),
        (torch.zeros(3, 0, SIZE), r"^images: expected non-empty images, got shape \(1, 3, 0, 64\)$"),
        (iter([]), r"^X: expected at least one (training )?image, got none \(an empty iterable\)$"),
    ],
)
def test_empty_inputs_are_refused(pc, x, pattern):
    refused(pc, ValueError, pattern, "decision_function", x)
    refused(pc, ValueError, pattern, "fit", iter([]) if isinstance(x, type(iter([]))) else x)


def test_images_of_different_sizes_kinds_and_dtypes_in_one_call(pc, images):
    rgb = images[2][0]
    gray = np.asarray(Image.fromarray(images[2][1][..., 0]).resize((50, 40)))
    tensor = torch.from_numpy(np.array(Image.fromarray(images[2][2]).resize((96, 80)))).permute(2, 0, 1).float() / 255
    together = pc.inspect([rgb, gray, tensor])
    assert isinstance(together.maps, list)
    assert [m.shape for m in together.maps] == [(SIZE, SIZE), (40, 50), (80, 96)]
    assert all(m.dtype == np.float32 and np.isfinite(m).all() for m in together.maps)
    alone = np.concatenate([pc.decision_function(x) for x in (rgb, gray, tensor)])
    np.testing.assert_allclose(together.scores, alone, rtol=1e-5, atol=1e-6)


def _png16_rgb(path, rgb16: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def test_grayscale_rgba_and_16_bit_files_score_like_the_8_bit_rgb_image(pc, images, tmp_path):
    rgb = images[2][0]  # gray texture replicated on 3 channels, with a bright spot (250)
    gray = rgb[..., 0]
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full(gray.shape, 77, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "gray16.png")  # up to 64250: scaled, not clipped
    _png16_rgb(tmp_path / "rgb16.png", rgb.astype(np.uint16) * 257)
    full = np.full((SIZE, SIZE), 65535, np.uint16)
    Image.fromarray(full).save(tmp_path / "white16.png")
    for name, mode in (("gray16.png", "I;16"), ("rgba.png", "RGBA"), ("gray.png", "L")):
        with Image.open(tmp_path / name) as image:
            assert image.mode == mode
    reference = pc.decision_function(rgb)
    for name in ("gray.png", "rgba.png", "gray16.png", "rgb16.png"):
        np.testing.assert_allclose(pc.decision_function(str(tmp_path / name)), reference, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(pc.decision_function(gray.astype(np.uint16) * 257), reference, rtol=1e-5)
    white = pc.decision_function(str(tmp_path / "white16.png"))
    np.testing.assert_allclose(white, pc.decision_function(np.full((SIZE, SIZE, 3), 255, np.uint8)), rtol=1e-5)


def test_corrupt_truncated_and_fake_image_files_name_the_file(pc, images, tmp_path):
    Image.fromarray(images[2][0]).save(tmp_path / "ok.png")
    blob = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(blob[: len(blob) // 2])
    broken = bytearray(blob)
    broken[60:90] = bytes(30)  # inside the compressed pixel data
    (tmp_path / "corrupt.png").write_bytes(bytes(broken))
    (tmp_path / "fake.jpg").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    for name in ("truncated.png", "corrupt.png", "fake.jpg", "empty.png"):
        path = str(tmp_path / name)
        pattern = rf"^images: could not read {re.escape(repr(path))} as an image"
        refused(pc, ValueError, pattern, "decision_function", path)
        refused(pc, ValueError, pattern, "decision_function", [str(tmp_path / "ok.png"), path])
        refused(pc, ValueError, pattern, "fit", [str(tmp_path / "ok.png")] * 3 + [path])
    refused(
        pc,
        FileNotFoundError,
        r"^X: no such file or folder: .*missing\.png",
        "decision_function",
        str(tmp_path / "missing.png"),
    )


def test_folders_skip_other_extensions_but_name_a_fake_image_and_need_images(pc, images, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    for i, img in enumerate(images[1][:3]):
        Image.fromarray(img).save(good / f"{i}.png")
    (good / "notes.txt").write_text("skipped")
    (good / "labels.csv").write_text("0,1")
    inspection = pc.inspect(str(good))
    assert [os.path.basename(p) for p in inspection.paths] == ["0.png", "1.png", "2.png"]
    np.testing.assert_allclose(inspection.scores, pc.decision_function(images[1][:3]), rtol=1e-5)
    (good / "1b.png").write_text("a text file with an image extension")
    pattern = r"^images: could not read '.*1b\.png' as an image"
    refused(pc, ValueError, pattern, "decision_function", str(good))
    refused(pc, ValueError, pattern, "fit", str(good))
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.md").write_text("no images here")
    for call in ("decision_function", "fit"):
        refused(pc, ValueError, r"^X: the folder '.*empty' holds no images \(looked for .*\.png", call, str(empty))
        refused(pc, FileNotFoundError, r"^X: no such file or folder", call, str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------ evaluate
def _copy_category(mvtec, tmp_path):
    root = tmp_path / "category"
    shutil.copytree(mvtec / "test", root / "test")
    shutil.copytree(mvtec / "ground_truth", root / "ground_truth")
    return root


def test_evaluate_missing_masks_for_some_defect_images_is_a_clear_error(pc, mvtec, tmp_path):
    root = _copy_category(mvtec, tmp_path)
    os.remove(root / "ground_truth/spot/002_mask.png")
    with pytest.raises(
        FileNotFoundError, match=r"^ground truth: 1 defect image\(s\) have no mask under .*002\.png.*_mask\.png"
    ):
        anomalox.evaluate(pc, str(root))


def test_evaluate_masks_of_the_wrong_size_or_unreadable_name_the_mask(pc, mvtec, tmp_path):
    root = _copy_category(mvtec, tmp_path)
    Image.fromarray(np.zeros((32, 48), np.uint8)).save(root / "ground_truth/spot/001_mask.png")
    with pytest.raises(
        ValueError,
        match=r"^ground truth: the mask '.*001_mask\.png' is 48x32 but its image '.*001\.png' \(and its map\) is 64x64$",
    ):
        anomalox.evaluate(pc, str(root))
    (root / "ground_truth/spot/001_mask.png").write_text("not a mask")
    with pytest.raises(ValueError, match=r"^ground truth: could not read the mask '.*001_mask\.png'"):
        anomalox.evaluate(pc, str(root))


# ------------------------------------------------------------------------------ changed after fit
def test_feature_dimension_mismatch_between_fit_and_predict_is_a_clear_error(pc, pd, test_x):
    bank = pc.memory_bank_
    try:
        pc.memory_bank_ = np.ascontiguousarray(bank[:, :100])
        with pytest.raises(
            ValueError,
            match=rf"^X: the backbone gives {bank.shape[1]}-dim patch features but memory_bank_ holds 100-dim ones; .*refit",
        ):
            pc.decision_function(test_x)
    finally:
        pc.memory_bank_ = bank
    grid = pd.grid_
    try:
        pd.grid_ = (grid[0] + 1, grid[1])
        with pytest.raises(ValueError, match=r"^X: the features form .* grid but the Gaussians were fitted on .*refit"):
            pd.decision_function(test_x)
    finally:
        pd.grid_ = grid


def test_set_params_after_fit_does_not_mix_the_fitted_state_with_the_new_parameters(images, mvtec, test_x, tmp_path):
    model = _patchcore(validation_fraction=0.0).fit(images[0])
    scores, maps = model.decision_function(test_x), model.anomaly_map(test_x)
    big = np.array(Image.fromarray(images[2][0]).resize((96, 80)))
    big_map = model.anomaly_map(big)
    assert big_map.shape == (1, 80, 96)
    baseline = anomalox.evaluate(model, str(mvtec))
    # Backbone parameters take effect at the next fit (as in scikit-learn); until then the fitted
    # backbone is used throughout: scores, maps (no crop applied to one part only) and evaluate.
    model.set_params(layers=["_blocks.4"], image_size=96, crop_size=48)
    np.testing.assert_array_equal(model.decision_function(test_x), scores)
    np.testing.assert_array_equal(model.anomaly_map(test_x), maps)
    np.testing.assert_array_equal(model.anomaly_map(big), big_map)  # still at the input's own size
    result = anomalox.evaluate(model, str(mvtec))
    assert result["pixel_auroc"] == baseline["pixel_auroc"] and result["aupro"] == baseline["aupro"]
    # Saving would write the new parameters next to the old state: refused, naming them.
    with pytest.raises(
        ValueError, match=r"^detector: layers, image_size, crop_size changed \(set_params\) after fit.*refit"
    ):
        model.save(tmp_path / "mixed.ax")
    assert not (tmp_path / "mixed.ax").exists()
    model.set_params(layers=None, image_size=SIZE, crop_size=None)
    loaded = anomalox.load(model.save(tmp_path / "ok.ax"))
    np.testing.assert_array_equal(loaded.decision_function(test_x), scores)
    # Scoring-time parameters may change freely; a refit adopts the backbone parameters.
    loaded.set_params(reweight=False, n_threads=1, batch_size=2)
    loaded.save(tmp_path / "scoring-params.ax")
    loaded.set_params(layers=["_blocks.4"]).fit(images[0])
    assert loaded.memory_bank_.shape[1] == loaded.backbone_.layer_channels["_blocks.4"]
    loaded.save(tmp_path / "refit.ax")


@pytest.mark.parametrize(
    "cls, param, value, shown",
    [
        (PatchCore, "coreset_ratio", 0, r"a number in \(0.0, 1.0\), got 0$"),
        (PatchCore, "coreset_ratio", 1.5, r"a number in \(0.0, 1.0\), got 1.5$"),
        (PatchCore, "coreset_ratio", float("nan"), r"a number in \(0.0, 1.0\), got nan$"),
        (PatchCore, "num_neighbors", 0, r"a positive integer, got 0$"),
        (PatchCore, "num_neighbors", 2.5, r"a positive integer, got 2.5$"),
        (PatchCore, "projection_dim", 0, r"a positive integer, got 0$"),
        (PatchCore, "contamination", 0.7, r"a number in \(0.0, 0.5\), got 0.7$"),
        (PatchCore, "contamination", 0, r"a number in \(0.0, 0.5\), got 0$"),
        (PatchCore, "validation_fraction", 1.0, r"a number in \[0.0, 1.0\), got 1.0$"),
        (PatchCore, "validation_fraction", -0.1, r"a number in \[0.0, 1.0\), got -0.1$"),
        (PatchCore, "batch_size", 0, r"a positive integer, got 0$"),
        (PatchCore, "batch_size", True, r"a positive integer, got True$"),
        (PaDiM, "n_features", 0, r"a positive integer, got 0$"),
        (PaDiM, "batch_size", 0, r"a positive integer, got 0$"),
        (PaDiM, "contamination", 0.7, r"a number in \(0.0, 0.5\), got 0.7$"),
        (PaDiM, "validation_fraction", 1.0, r"a number in \[0.0, 1.0\), got 1.0$"),
    ],
)
def test_invalid_parameters_raise_value_error_at_fit_naming_the_parameter(pc, pd, images, cls, param, value, shown):
    model = pc if cls is PatchCore else pd
    before, old = fitted_state(model), getattr(model, param)
    cls(**{param: value})  # __init__ only stores (scikit-learn convention)
    try:
        model.set_params(**{param: value})
        with pytest.raises(ValueError, match=rf"^{param}: expected " + shown):
            model.fit(images[0])
    finally:
        model.set_params(**{param: old})
    assert_same_state(model, before)


# ------------------------------------------------------------------------------ threads
@pytest.mark.parametrize("which", ["pc", "pd"])
def test_eight_threads_at_once_give_the_sequential_results_bit_for_bit(which, request, test_x):
    model = request.getfixturevalue(which)
    expected_scores, expected_maps = model.decision_function(test_x), model.anomaly_map(test_x)
    n = 8
    barrier = threading.Barrier(n)
    results: list = [None] * n
    errors: list = []

    def work(i):
        try:
            barrier.wait(timeout=60)
            if i % 2:
                maps = model.anomaly_map(test_x)
                scores = model.decision_function(test_x)
            else:
                scores = model.decision_function(test_x)
                maps = model.anomaly_map(test_x)
            results[i] = (scores, maps)
        except BaseException as exc:  # reported below, on the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "deadlock: threads still running after 120 s"
    assert not errors, errors
    for scores, maps in results:
        np.testing.assert_array_equal(scores, expected_scores)
        np.testing.assert_array_equal(maps, expected_maps)


# ------------------------------------------------------------------------------ determinism
def test_same_random_state_gives_bit_identical_fits_scores_and_maps(images, test_x):
    fits = {}
    for make in (lambda: _patchcore(coreset_ratio=0.5, random_state=11), lambda: _padim(random_state=11)):
        a, b = make().fit(images[0]), make().fit(images[0])
        fits[type(a)] = a
        state_a, state_b = fitted_state(a), fitted_state(b)
        del state_a["backbone_"], state_b["backbone_"]
        assert state_a.keys() == state_b.keys()
        for k in state_a:
            np.testing.assert_array_equal(state_a[k], state_b[k], err_msg=k)
        np.testing.assert_array_equal(a.decision_function(test_x), b.decision_function(test_x))
        np.testing.assert_array_equal(a.anomaly_map(test_x), b.anomaly_map(test_x))
    other = _patchcore(coreset_ratio=0.5, random_state=12).fit(images[0])
    assert not np.array_equal(other.memory_bank_, fits[PatchCore].memory_bank_)  # the seed matters


def test_coreset_selection_does_not_depend_on_the_thread_count(images, test_x):
    full = _patchcore(validation_fraction=0.0, n_threads=1).fit(images[0]).memory_bank_
    banks = {
        t: _patchcore(coreset_ratio=0.5, validation_fraction=0.0, n_threads=t).fit(images[0]).memory_bank_
        for t in (1, 2)
    }
    # The backbone's convolutions may round differently with another thread count (~1e-6), so
    # compare which training patches were chosen, and the values to a tolerance.
    chosen = {t: ((b[:, None, :] - full[None]) ** 2).sum(-1).argmin(1) for t, b in banks.items()}
    np.testing.assert_array_equal(chosen[1], chosen[2])
    np.testing.assert_allclose(banks[1], banks[2], rtol=1e-5, atol=1e-5)
    for projection_dim in (None, 32):
        picks = [ops.coreset(full, 100, projection_dim=projection_dim, seed=5, n_threads=t) for t in (1, 2)]
        np.testing.assert_array_equal(picks[0], picks[1])


def test_scores_on_a_fixed_memory_bank_agree_across_thread_counts(pc, pd, test_x):
    for model in (pc, pd):
        old = model.n_threads
        try:
            out = {}
            for t in (1, 2):
                model.set_params(n_threads=t)
                out[t] = (model.decision_function(test_x), model.anomaly_map(test_x))
        finally:
            model.set_params(n_threads=old)
        np.testing.assert_allclose(out[1][0], out[2][0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out[1][1], out[2][1], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ panics
def _panic(*args, **kwargs):
    _core._debug_panic(2)


@pytest.mark.parametrize("which, kernel", [("pc", "knn"), ("pd", "mahalanobis"), ("pc", "gaussian_blur")])
def test_a_rust_panic_in_a_detector_call_is_an_internal_error_and_the_detector_survives(
    which, kernel, request, monkeypatch, images, test_x
):
    model = request.getfixturevalue(which)
    expected = model.decision_function(test_x)
    before = fitted_state(model)
    with monkeypatch.context() as m:
        m.setattr(patchcore_module.ops, kernel, _panic)  # the shared anomalox.ops module
        with pytest.raises(anomalox.InternalError, match="deliberate test panic") as info:
            model.decision_function(test_x)
        assert isinstance(info.value, RuntimeError)
        with pytest.raises(anomalox.InternalError):
            model.fit(images[0])  # fails at validation scoring at the latest
    assert_same_state(model, before)
    np.testing.assert_array_equal(model.decision_function(test_x), expected)


# ------------------------------------------------------------------------------ model files
def _split_safetensors(blob: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _join_safetensors(header: dict, data: bytes, length: int) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    # The same header length where the edit fits (the file keeps its layout), else a longer one
    # padded to 8 bytes; data offsets count from the end of the header, so they stay valid.
    length = max(length, -(-len(text) // 8) * 8)
    text += b" " * (length - len(text))
    return struct.pack("<Q", length) + text + data


@pytest.fixture(scope="module")
def saved(pc, tmp_path_factory):
    path = pc.save(tmp_path_factory.mktemp("files") / "model.ax")
    with open(path, "rb") as f:
        return f.read()


def _edited(saved, edit) -> bytes:
    header, data = _split_safetensors(saved)
    length = struct.unpack("<Q", saved[:8])[0]
    edit(header)
    return _join_safetensors(header, data, length)


def _shape(delta):
    def edit(h):
        h["state.memory_bank_"]["shape"][1] += delta

    return edit


def _swap_shape(h):
    h["state.memory_bank_"]["shape"].reverse()  # same byte count: a consistent but wrong header


def _offsets(h):
    h["state.memory_bank_"]["data_offsets"][1] -= 4


def _offsets_past_end(h):
    begin, end = h["state.memory_bank_"]["data_offsets"]
    h["state.memory_bank_"]["data_offsets"] = [begin + 4096, end + 4096]


def _dtype(h):
    h["state.memory_bank_"]["dtype"] = "I32"


def _threshold(h):
    state = json.loads(h["__metadata__"]["state"])
    state["threshold_"] = state["threshold_"] * 0.5
    h["__metadata__"]["state"] = json.dumps(state, sort_keys=True)


def _params(h):
    params = json.loads(h["__metadata__"]["params"])
    params["image_size"] = 96
    h["__metadata__"]["params"] = json.dumps(params, sort_keys=True)


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (_shape(-1), "corrupt"),
        (_shape(+1), "corrupt"),
        (_offsets, "corrupt"),
        (_offsets_past_end, "corrupt|truncated"),
        (_swap_shape, "checksum"),
        (_dtype, "checksum"),
        (_threshold, "checksum"),
        (_params, "checksum"),
    ],
)
def test_files_whose_arrays_or_metadata_do_not_match_are_refused(saved, tmp_path, edit, pattern):
    header, _ = _split_safetensors(saved)
    assert "state.memory_bank_" in header and "threshold_" in header["__metadata__"]["state"]
    path = tmp_path / "edited.ax"
    path.write_bytes(_edited(saved, edit))
    with pytest.raises(anomalox.ModelFileError, match=pattern):
        anomalox.load(path)
    assert issubclass(anomalox.ModelFileError, ValueError)


def test_an_unedited_round_trip_of_the_header_still_loads(saved, tmp_path, pc, test_x):
    path = tmp_path / "same.ax"
    path.write_bytes(_edited(saved, lambda h: None))
    np.testing.assert_array_equal(anomalox.load(path).decision_function(test_x), pc.decision_function(test_x))


class _CreatesMarker:
    """Unpickling this object creates the file `path` (what a malicious model file would do)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickles_that_would_run_code_are_refused_without_running_it(tmp_path):
    probe = tmp_path / "probe"
    with pickle.loads(pickle.dumps(_CreatesMarker(probe))):
        pass
    assert probe.exists()  # the payload is live: unpickling it does run code
    marker = tmp_path / "marker"
    files = {f"protocol{p}.ax": pickle.dumps(_CreatesMarker(marker), protocol=p) for p in (0, 2, 5)}
    for name, blob in files.items():
        (tmp_path / name).write_bytes(blob)
    torch.save({"memory_bank_": _CreatesMarker(marker)}, tmp_path / "torch.ax")
    files["torch.ax"] = b""
    for name in files:
        with pytest.raises(anomalox.ModelFileError, match="pickle|not a safetensors file"):
            anomalox.load(tmp_path / name)
        assert not marker.exists(), name
