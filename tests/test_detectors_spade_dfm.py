"""SPADE and DFM on small synthetic images, with independent numpy / scikit-learn references."""

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.decomposition import PCA

from anomalox.detectors import DFM, SPADE, NotFittedError

SIZE = 64


def smooth_images(n, seed):
    """Random smooth RGB textures in [0.3, 0.7], (n, SIZE, SIZE, 3) float32."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    up = torch.nn.functional.interpolate(low, size=(SIZE, SIZE), mode="bicubic", align_corners=False)
    return (0.3 + 0.4 * up.clamp(0, 1)).permute(0, 2, 3, 1).contiguous().numpy()


def with_defect(images):
    out = images.copy()
    out[:, 6:26, 8:28, :] = 1.0  # inside the top-left quadrant (one DFM cell)
    return out


@pytest.fixture(scope="module")
def train():
    return smooth_images(12, 0)


@pytest.fixture(scope="module")
def test_normals():
    return smooth_images(3, 1)


def spade(**kw):
    return SPADE(**{"image_size": SIZE, "top_k_images": 3, "validation_fraction": 0.0, **kw})


def dfm(**kw):
    return DFM(**{"image_size": SIZE, "pooling_kernel_size": 2, "validation_fraction": 0.0, **kw})


@pytest.fixture(scope="module")
def fitted(train):
    return {"spade": spade().fit(train), "fre": dfm().fit(train), "nll": dfm(score="nll").fit(train)}


@pytest.mark.parametrize("name", ["spade", "fre", "nll"])
def test_defect_scores_higher(fitted, test_normals, name):
    model = fitted[name]
    normal = model.decision_function(test_normals)
    defect = model.decision_function(with_defect(test_normals))
    assert normal.dtype == np.float32 and normal.shape == (3,)
    assert defect.min() > normal.max()
    maps = model.anomaly_map(with_defect(test_normals))
    assert maps.shape == (3, SIZE, SIZE) and maps.dtype == np.float32
    inside, outside = maps[:, 6:26, 8:28].mean(), maps[:, 40:, 40:].mean()
    assert inside > outside


@pytest.mark.parametrize("name", ["spade", "fre"])
def test_map_shapes_follow_inputs(fitted, test_normals, name):
    model = fitted[name]
    big = np.ascontiguousarray(np.repeat(np.repeat(test_normals[:1], 2, axis=1), 2, axis=2))
    maps = model.anomaly_map([test_normals[0], big[0]])
    assert isinstance(maps, list) and [m.shape for m in maps] == [(SIZE, SIZE), (2 * SIZE, 2 * SIZE)]


def test_fit_returns_self_and_not_fitted(train):
    for model in (spade(), dfm()):
        with pytest.raises(NotFittedError):
            model.decision_function(train[:1])
        assert model.fit(train) is model
        assert "fitted" in repr(model)


def test_clone_and_params(fitted):
    for model in (fitted["spade"], fitted["nll"]):
        twin = clone(model)
        assert twin.get_params() == model.get_params() and not hasattr(twin, "backbone_")
    assert clone(fitted["nll"]).set_params(score="fre").get_params()["score"] == "fre"
    assert spade().set_params(top_k_images=7).top_k_images == 7


@pytest.mark.parametrize(
    "model",
    [SPADE(top_k_images=0), SPADE(num_neighbors=-1), DFM(pca_variance=1.0), DFM(score="x"), DFM(layers="layer3")],
)
def test_bad_params(model, train):
    with pytest.raises(ValueError):
        model.fit(train)


def test_dfm_pca_matches_sklearn(fitted, train):
    model = fitted["fre"]
    tap = model.backbone_.features(train)["_blocks.10"]
    pooled = torch.nn.functional.avg_pool2d(tap, 2).flatten(1).numpy().astype(np.float64)
    ref = PCA(n_components=0.97, svd_solver="full").fit(pooled)
    assert model.n_components_ == ref.n_components_
    np.testing.assert_allclose(model.explained_variance_ratio_, ref.explained_variance_ratio_, rtol=1e-4)
    np.testing.assert_allclose(model.explained_variance_, ref.explained_variance_, rtol=1e-4)
    np.testing.assert_allclose(model.mean_, ref.mean_, rtol=1e-4, atol=1e-5)
    dots = np.abs((model.components_.astype(np.float64) * ref.components_).sum(1))
    np.testing.assert_allclose(dots, 1.0, atol=1e-4)
    # FRE and NLL scores against the sklearn model.
    query = smooth_images(2, 5)
    x = torch.nn.functional.avg_pool2d(model.backbone_.features(query)["_blocks.10"], 2).flatten(1).numpy()
    z = ref.transform(x.astype(np.float64))
    fre = ((x - ref.inverse_transform(z)) ** 2).sum(1)
    np.testing.assert_allclose(model.decision_function(query), fre, rtol=1e-3)
    nll = (z**2 / ref.explained_variance_).sum(1) + np.log(ref.explained_variance_).sum()
    np.testing.assert_allclose(fitted["nll"].decision_function(query), nll, rtol=1e-3, atol=1e-3)


def test_spade_image_score_matches_brute_force(fitted, train, test_normals):
    model = fitted["spade"]
    assert model.train_global_.shape == (12, 112) and model.train_maps_.shape == (12, 152, 8, 8)
    query = with_defect(test_normals)
    g = model.backbone_.features(query)["_blocks.10"].mean(dim=(-2, -1)).numpy().astype(np.float64)
    d = np.sqrt(((g[:, None, :] - model.train_global_.astype(np.float64)[None]) ** 2).sum(-1))
    expected = np.sort(d, axis=1)[:, :3].mean(1)
    np.testing.assert_allclose(model.decision_function(query), expected, rtol=1e-4)
    # top_k_images larger than the training set is capped: the mean over all images.
    big = spade(top_k_images=100).fit(train)
    np.testing.assert_allclose(big.decision_function(query), d.mean(1), rtol=1e-4)
