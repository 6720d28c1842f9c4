"""Tiling (``tile_size`` / ``tile_stride``) and native-size inputs (``image_size=None``) in every
detector, against independent references: tiles cut by hand, brute-force nearest distances,
per-crop models, a numpy overlap-averaging stitch and scipy's Gaussian filter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score

import anomalox
from anomalox import DFM, SPADE, PaDiM, PatchCore
from anomalox.detectors._base import stack_taps

H, W = 44, 76  # neither side a multiple of the stride: the last tile of a row / column is flush
TILE, STRIDE = 32, 20
SIGMA = 4.0


def smooth_images(n: int, height: int = H, width: int = W, seed: int = 0) -> np.ndarray:
    """Smooth random gray-ish textures, uint8 (n, height, width, 3)."""
    rng = np.random.default_rng(seed)
    noise = torch.from_numpy(rng.random((n, 3, max(height // 8, 2), max(width // 8, 2)), dtype=np.float32))
    up = F.interpolate(noise, size=(height, width), mode="bilinear", align_corners=False).numpy()
    img = 60 + 120 * up + rng.normal(0, 3, up.shape)
    return img.clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1).copy()


def with_spot(img: np.ndarray) -> np.ndarray:
    out = img.copy()
    out[10:22, 30:44] = 250
    return out


def offsets_ref(size: tuple[int, int], tile: int = TILE, stride: int = STRIDE) -> list[tuple[int, int]]:
    """Tile corners by definition: every `stride` pixels, plus a last tile flush with the border."""

    def starts(length: int) -> list[int]:
        out = list(range(0, length - tile + 1, stride))
        return out if out[-1] == length - tile else [*out, length - tile]

    return [(r, c) for r in starts(size[0]) for c in starts(size[1])]


def stitch_ref(tiles: np.ndarray, offsets: list[tuple[int, int]], size: tuple[int, int]) -> np.ndarray:
    """Overlap averaging: float64 sums and counts with np.add.at."""
    total, count = np.zeros(size), np.zeros(size)
    th, tw = tiles.shape[-2:]
    rr, cc = np.meshgrid(np.arange(th), np.arange(tw), indexing="ij")
    for tile, (r, c) in zip(tiles, offsets):
        np.add.at(total, (rr + r, cc + c), tile.astype(np.float64))
        np.add.at(count, (rr + r, cc + c), 1.0)
    assert count.min() > 0
    return total / count


def final_map(tile_maps: np.ndarray, offsets: list[tuple[int, int]], size: tuple[int, int]) -> np.ndarray:
    """Grid-resolution tile maps (T, h, w) → upsampled to the tile, stitched, smoothed (sigma 4)."""
    up = F.interpolate(
        torch.from_numpy(np.asarray(tile_maps, np.float32))[:, None],
        size=(TILE, TILE),
        mode="bilinear",
        align_corners=False,
    )[:, 0].numpy()
    return gaussian_filter(stitch_ref(up, offsets, size), SIGMA, mode="reflect", truncate=4.0)


def crops_at(images: np.ndarray, offset: tuple[int, int]) -> np.ndarray:
    r, c = offset
    return np.ascontiguousarray(images[:, r : r + TILE, c : c + TILE])


@pytest.fixture(scope="module")
def train():
    return smooth_images(10, seed=1)


@pytest.fixture(scope="module")
def test_images():
    good = smooth_images(2, seed=2)
    return np.stack([good[0], with_spot(good[1])])


def _tiled(cls, **kw):
    kw.setdefault("image_size", None)
    kw.setdefault("tile_size", TILE)
    kw.setdefault("tile_stride", STRIDE)
    kw.setdefault("validation_fraction", 0.0)
    return cls(**kw)


@pytest.fixture(scope="module")
def patchcore(train):
    return _tiled(PatchCore, coreset_ratio=1.0).fit(train)


@pytest.fixture(scope="module")
def padim(train):
    return _tiled(PaDiM, n_features=24).fit(train)


@pytest.fixture(scope="module")
def dfm(train):
    return _tiled(DFM, pooling_kernel_size=1, pca_variance=0.8).fit(train)


# ------------------------------------------------------------------------- maps against references
def test_tile_layout_reference_has_overlaps_and_a_flush_last_tile():
    offsets = offsets_ref((H, W))
    assert offsets == [(r, c) for r in (0, 12) for c in (0, 20, 40, 44)]
    np.testing.assert_array_equal(anomalox.ops.tile_offsets(H, W, TILE, STRIDE), offsets)


def test_patchcore_tiled_map_equals_brute_force_nearest_distances_stitched(patchcore, test_images):
    model = patchcore
    assert model.memory_bank_.shape[0] == model.n_train_patches_  # coreset_ratio=1: every patch
    bank = torch.from_numpy(model.memory_bank_).double()
    offsets = offsets_ref((H, W))
    got_maps = model.anomaly_map(test_images)
    got_scores = model.decision_function(test_images)
    assert got_maps.shape == (2, H, W)
    for i, img in enumerate(test_images):
        x, _ = model.backbone_.preprocessing.transform(img)
        assert x.shape[-2:] == (H, W)  # image_size=None: no resize
        crops = torch.stack([x[0, :, r : r + TILE, c : c + TILE] for r, c in offsets])
        feats = model.backbone_.features(crops, preprocess=False)
        layers = list(feats)
        grid = feats[layers[0]].shape[-2:]
        parts = [F.avg_pool2d(feats[name].contiguous(), 3, 1, 1) for name in layers]
        parts = [
            p if p.shape[-2:] == grid else F.interpolate(p, size=grid, mode="bilinear", align_corners=False)
            for p in parts
        ]
        emb = torch.cat(parts, 1).double()
        t, c, h, w = emb.shape
        rows = emb.permute(0, 2, 3, 1).reshape(-1, c)
        nearest = torch.cdist(rows, bank).min(1).values.reshape(t, h, w).numpy()
        expected = final_map(nearest, offsets, (H, W))
        np.testing.assert_allclose(got_maps[i], expected, rtol=1e-4, atol=1e-4 * expected.max())
        np.testing.assert_allclose(got_scores[i], expected.max(), rtol=1e-4)
        assert got_scores[i] == pytest.approx(float(got_maps[i].max()), rel=1e-6)
    assert got_scores[1] > got_scores[0]  # the spot


def _padim_grid_map(model: PaDiM, crops: np.ndarray) -> np.ndarray:
    """Mahalanobis distances of `crops` on the untiled model's feature grid, in float64."""
    feats = model.backbone_.features(crops)
    emb = stack_taps(feats, tuple(feats), mode="nearest")[:, torch.from_numpy(model.channels_)]
    n, c, h, w = emb.shape
    x = emb.permute(0, 2, 3, 1).reshape(n, h * w, c).double().numpy()
    delta = x - model.mean_.astype(np.float64)
    inv = model.inv_cov_.astype(np.float64)
    return np.sqrt(np.einsum("bpc,pcd,bpd->bp", delta, inv, delta)).reshape(n, h, w)


def test_padim_tiled_equals_one_untiled_model_per_tile_position(padim, train, test_images):
    offsets = offsets_ref((H, W))
    assert padim.input_size_ == (H, W)
    h, w = padim.grid_
    block = h * w
    assert padim.mean_.shape == (len(offsets) * block, 24)
    grid_maps = np.empty((len(test_images), len(offsets), h, w))
    for p, offset in enumerate(offsets):
        alone = PaDiM(image_size=None, n_features=24, validation_fraction=0.0).fit(crops_at(train, offset))
        assert tuple(alone.grid_) == (h, w)
        np.testing.assert_array_equal(alone.channels_, padim.channels_)
        np.testing.assert_allclose(padim.mean_[p * block : (p + 1) * block], alone.mean_, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            padim.inv_cov_[p * block : (p + 1) * block],
            alone.inv_cov_,
            rtol=1e-3,
            atol=1e-3 * np.abs(alone.inv_cov_).max(),
        )
        grid_maps[:, p] = _padim_grid_map(alone, crops_at(test_images, offset))
    got_maps = padim.anomaly_map(test_images)
    got_scores = padim.decision_function(test_images)
    for i in range(len(test_images)):
        expected = final_map(grid_maps[i], offsets, (H, W))
        np.testing.assert_allclose(got_maps[i], expected, rtol=1e-3, atol=1e-3 * expected.max())
        np.testing.assert_allclose(got_scores[i], expected.max(), rtol=1e-3)


def test_dfm_tiled_equals_one_untiled_pca_per_tile_position(dfm, train, test_images):
    offsets = offsets_ref((H, W))
    t, d = dfm.mean_.shape
    k = dfm.components_.shape[1]
    assert t == len(offsets) and dfm.input_size_ == (H, W) and dfm.n_train_images_ == len(train)
    assert len(dfm.n_components_) == t and max(dfm.n_components_) == k
    assert len(set(dfm.n_components_)) > 1  # some positions are padded
    grid_maps = []
    for p, offset in enumerate(offsets):
        alone = DFM(image_size=None, pooling_kernel_size=1, pca_variance=0.8, validation_fraction=0.0)
        alone.fit(crops_at(train, offset))
        n = alone.n_components_
        assert dfm.n_components_[p] == n
        np.testing.assert_allclose(dfm.mean_[p], alone.mean_, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dfm.components_[p, :n], alone.components_, atol=1e-4)
        np.testing.assert_allclose(dfm.explained_variance_[p, :n], alone.explained_variance_, rtol=1e-4)
        np.testing.assert_allclose(dfm.explained_variance_ratio_[p, :n], alone.explained_variance_ratio_, rtol=1e-4)
        # Padding rows after a position's own components change no score.
        assert not dfm.components_[p, n:].any()
        assert (dfm.explained_variance_[p, n:] == 1).all() and not dfm.explained_variance_ratio_[p, n:].any()
        # The per-cell squared reconstruction error, from this position's own PCA.
        tap = alone.backbone_.features(crops_at(test_images, offset))["_blocks.10"]
        ti, c, gh, gw = tap.shape
        x = tap.contiguous().reshape(ti, -1).double().numpy()
        centred = x - alone.mean_.astype(np.float64)
        comps = alone.components_.astype(np.float64)
        residual = (centred - centred @ comps.T @ comps) ** 2
        grid_maps.append(residual.reshape(ti, c, gh, gw).sum(1))
    grid_maps_arr = np.stack(grid_maps, axis=1)  # (images, T, gh, gw)
    got_maps = dfm.anomaly_map(test_images)
    got_scores = dfm.decision_function(test_images)
    for i in range(len(test_images)):
        expected = final_map(grid_maps_arr[i], offsets, (H, W))
        np.testing.assert_allclose(got_maps[i], expected, rtol=1e-3, atol=1e-3 * expected.max())
        np.testing.assert_allclose(got_scores[i], expected.max(), rtol=1e-3)
    # With tiles the image score is the map's maximum whatever `score` says.
    nll = _tiled(DFM, pooling_kernel_size=1, pca_variance=0.8, score="nll").fit(train)
    np.testing.assert_allclose(nll.decision_function(test_images), got_scores, rtol=1e-6)


# ------------------------------------------------------------------------------- differing sizes
def _mixed_sizes() -> list[np.ndarray]:
    a, b, c = smooth_images(2, seed=3), smooth_images(2, 40, 64, seed=4), smooth_images(1, 52, 36, seed=5)
    return [a[0], b[0], c[0], a[1], b[1]]


@pytest.mark.parametrize("cls", [PatchCore, SPADE])
def test_bank_detectors_tiled_accept_images_of_different_sizes(cls, train):
    model = _tiled(cls).fit(_mixed_sizes() + list(train[:3]))
    images = [*smooth_images(1, 40, 64, seed=6), *smooth_images(1, H, W, seed=7), *smooth_images(1, 36, 52, seed=8)]
    maps = model.anomaly_map(images)
    assert isinstance(maps, list) and [m.shape for m in maps] == [(40, 64), (H, W), (36, 52)]
    scores = model.decision_function(images)
    for img, amap, score in zip(images, maps, scores):
        alone = model.anomaly_map(img[None])
        np.testing.assert_allclose(alone[0], amap, rtol=1e-5, atol=1e-6)
        assert score == pytest.approx(float(amap.max()), rel=1e-6)


def test_patchcore_native_size_untiled_maps_are_each_at_their_own_size():
    model = PatchCore(image_size=None, coreset_ratio=1.0, validation_fraction=0.0).fit(_mixed_sizes())
    images = _mixed_sizes()[:3]
    maps = model.anomaly_map(images)
    assert [m.shape for m in maps] == [im.shape[:2] for im in images]
    for img, amap in zip(images, maps):
        np.testing.assert_allclose(model.anomaly_map(img[None])[0], amap, rtol=1e-5, atol=1e-6)


def test_keep_aspect_ratio_tiled_maps_come_back_at_the_input_size(train):
    model = _tiled(PatchCore, image_size=34, keep_aspect_ratio=True).fit(train[:4])
    # 44x76 -> 34x58 (58.7 truncated, as torchvision's Resize(34)).
    assert model.backbone_.preprocessing.resized_size(H, W) == (34, 58)
    maps = model.anomaly_map(train[:2])
    assert maps.shape == (2, H, W)


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("cls", [PaDiM, DFM])
@pytest.mark.parametrize("tiled", [True, False])
def test_per_position_detectors_refuse_images_of_different_sizes(cls, tiled):
    kw = {"tile_size": TILE, "tile_stride": STRIDE} if tiled else {}
    if cls is DFM:
        kw["pooling_kernel_size"] = 1
    images = _mixed_sizes()
    with pytest.raises(ValueError, match="come out of preprocessing at one size"):
        cls(image_size=None, validation_fraction=0.0, batch_size=8, **kw).fit(images)
    # Also when the odd size arrives in a later batch.
    same = list(smooth_images(4, seed=9))
    with pytest.raises(ValueError, match="come out of preprocessing at one size"):
        cls(image_size=None, validation_fraction=0.0, batch_size=2, **kw).fit([*same, images[1]])
    model = cls(image_size=None, validation_fraction=0.0, **kw).fit(same)
    with pytest.raises(ValueError, match=r"one size; got 44x76 and 40x64"):
        model.decision_function(images[1][None])
    with pytest.raises(ValueError, match="one size"):
        model.anomaly_map([images[0], images[1]])


def test_spade_untiled_refuses_images_of_different_sizes_and_tiled_records_no_size():
    images = _mixed_sizes()
    with pytest.raises(ValueError, match=r"^X: SPADE compares .* one size; got .*set tile_size"):
        SPADE(image_size=None, validation_fraction=0.0, batch_size=8).fit(images)
    same = list(smooth_images(4, seed=9))
    model = SPADE(image_size=None, validation_fraction=0.0).fit(same)
    assert tuple(model.input_size_) == (H, W)
    with pytest.raises(ValueError, match=r"one size; got 44x76 and 40x64"):
        model.decision_function(images[1][None])
    assert _tiled(SPADE).fit(images).input_size_ is None


def test_tile_size_larger_than_the_image_is_named(train):
    with pytest.raises(ValueError, match=r"tile_size: .*64x64 tiles for an image of 44x76"):
        _tiled(PatchCore, tile_size=64, tile_stride=None).fit(train[:3])
    with pytest.raises(ValueError, match=r"tile_size: .*image_size=32"):
        PaDiM(image_size=32, tile_size=(32, 40), validation_fraction=0.0).fit(train[:3])
    model = _tiled(PatchCore).fit(train[:3])
    with pytest.raises(ValueError, match="tile_size"):
        model.decision_function(smooth_images(1, 30, 76))


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"tile_size": 16, "tile_stride": 20}, "tile_stride"),
        ({"tile_size": (16, 16), "tile_stride": (8, 17)}, "tile_stride"),
        ({"tile_stride": 8}, "tile_stride"),
        ({"tile_size": 0}, "tile_size"),
        ({"tile_size": (16, 16, 16)}, "tile_size"),
        ({"image_size": (32, 48), "keep_aspect_ratio": True}, "keep_aspect_ratio"),
    ],
)
@pytest.mark.parametrize("cls", [PatchCore, PaDiM])
def test_bad_tiling_parameters_are_named_at_fit(cls, params, name, train):
    with pytest.raises(ValueError, match=name):
        cls(validation_fraction=0.0, **params).fit(train[:3])


def test_a_fit_refused_for_its_tiling_parameters_leaves_the_fitted_state(padim, train, test_images):
    from sklearn.base import clone

    model = clone(padim).fit(train)
    scores = model.decision_function(test_images)
    mean = model.mean_.copy()
    for bad in ({"tile_stride": TILE + 1}, {"tile_size": None}, {"keep_aspect_ratio": True, "image_size": (32, 32)}):
        model.set_params(**bad)
        with pytest.raises(ValueError, match="tile_stride|keep_aspect_ratio"):
            model.fit(train)
        model.set_params(**{k: padim.get_params()[k] for k in bad})
        np.testing.assert_array_equal(model.mean_, mean)
        assert model.input_size_ == (H, W)
        np.testing.assert_array_equal(model.decision_function(test_images), scores)


# ---------------------------------------------------------------------------------- model files
@pytest.mark.parametrize("name", ["patchcore", "padim", "dfm"])
def test_tiled_models_round_trip_through_model_files(name, request, test_images, tmp_path):
    model = request.getfixturevalue(name)
    loaded = anomalox.load(anomalox.save(model, tmp_path / f"{name}.ax"))
    assert type(loaded) is type(model)
    assert loaded.tile_size == TILE and loaded.tile_stride == STRIDE and loaded.image_size is None
    if name != "patchcore":
        assert loaded.input_size_ == (H, W)
    if name == "dfm":
        assert loaded.n_components_ == model.n_components_
    np.testing.assert_array_equal(loaded.decision_function(test_images), model.decision_function(test_images))
    np.testing.assert_array_equal(loaded.anomaly_map(test_images), model.anomaly_map(test_images))


@pytest.mark.parametrize("tiled", [True, False])
def test_padim_state_without_input_size_loads_as_an_older_model_and_scores_the_same(tiled, train, test_images):
    kw = {"tile_size": TILE, "tile_stride": STRIDE} if tiled else {"image_size": 32}
    model = PaDiM(n_features=16, validation_fraction=0.0, **{"image_size": None, **kw}).fit(train[:6])
    state = dict(model.state_dict())
    del state["input_size_"]
    old = PaDiM(**model.get_params()).load_state_dict(state)
    assert old.input_size_ is None
    np.testing.assert_array_equal(old.decision_function(test_images), model.decision_function(test_images))
    np.testing.assert_array_equal(old.anomaly_map(test_images), model.anomaly_map(test_images))


# ---------------------------------------------------------------------------- evaluate, calibration
def test_evaluate_native_size_pixel_auroc_is_over_all_pixels_of_all_sizes():
    good = [smooth_images(1, 40, 64, seed=10)[0], smooth_images(1, 48, 56, seed=11)[0]]
    model = PatchCore(image_size=None, coreset_ratio=1.0, validation_fraction=0.0).fit(
        [*smooth_images(3, 40, 64, seed=12), *smooth_images(3, 48, 56, seed=13)]
    )
    bad = [with_spot(smooth_images(1, 40, 64, seed=14)[0]), with_spot(smooth_images(1, 48, 56, seed=15)[0])]
    images = [good[0], bad[0], good[1], bad[1]]
    labels = np.array([0, 1, 0, 1])
    masks = []
    for img, label in zip(images, labels):
        m = np.zeros(img.shape[:2], bool)
        if label:
            m[10:22, 30:44] = True
        masks.append(m)
    result = anomalox.evaluate(model, images, labels, masks=masks, keep_maps=True)
    maps = result.maps
    assert [m.shape for m in maps] == [im.shape[:2] for im in images]
    expected = roc_auc_score(
        np.concatenate([m.ravel() for m in masks]), np.concatenate([a.ravel() for a in model.anomaly_map(images)])
    )
    assert result.metrics["pixel_auroc"] == pytest.approx(expected, abs=1e-3)
    assert "each image's own resolution" in result.metrics["pixel_metrics"]
    assert 0.0 <= result.metrics["aupro"] <= 1.0


@pytest.mark.parametrize("cls", [PatchCore, PaDiM])
def test_cross_validated_calibration_with_tiles(cls, train):
    kw = {"n_features": 16} if cls is PaDiM else {"coreset_ratio": 1.0}
    model = _tiled(cls, calibration="cv", n_folds=3, **kw)
    with pytest.warns(anomalox.CalibrationWarning):
        model.fit(train[:9])
    assert model.calibration_scores_.shape == (9,) and model.pixel_calibration_scores_.shape == (9,)
    # 9 scores cannot give contamination 0.01: the threshold is the largest score.
    assert model.threshold_ == pytest.approx(float(model.calibration_scores_.max()))
    # Tiled, the image score is the map's maximum, so both calibrations agree.
    np.testing.assert_allclose(model.calibration_scores_, model.pixel_calibration_scores_, rtol=1e-6)
