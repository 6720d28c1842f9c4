"""partial_fit / merge of the mergeable detectors (PaDiM, DFM, SPADE, PatchCore), without Ray.

References: ``fit`` on all the images (the merged model must equal it: PaDiM to 1e-6 relative,
SPADE exactly, DFM's scores to 1e-4), numpy's mean / covariance for the merged Gaussian
statistics, and PatchCore's documented two-stage selection.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

import anomalox
from anomalox import ops
from anomalox.detectors import DFM, FRE, SPADE, PaDiM, PatchCore


def shards_of(images, sizes):
    out, start = [], 0
    for size in sizes:
        out.append(list(images[start : start + size]))
        start += size
    return out


def merged_of(base, images, sizes=(4, 6, 4)):
    parts = [clone(base).partial_fit(shard) for shard in shards_of(images, sizes)]
    return clone(base).merge(*parts), parts


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# Shards of 4 / 6 / 4 images at batch_size 2 give the same batches as one pass (features are then
# identical: they vary at float32 rounding with the batch composition).
COMMON = {"image_size": 64, "batch_size": 2, "validation_fraction": 0.0, "n_threads": 2}


def test_gaussian_accumulator_merge_matches_numpy(rng):
    x = (rng.normal(size=(13, 3, 2, 2)) * [[[1.0]], [[2.0]], [[0.5]]] + 3).astype(np.float32)
    parts = [ops.GaussianAccumulator().partial_fit(x[a:b]) for a, b in ((0, 5), (5, 6), (6, 13))]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    mean, scatter, n = merged.state()
    rows = x.astype(np.float64).transpose(2, 3, 0, 1).reshape(4, 13, 3)
    assert n == 13
    np.testing.assert_allclose(mean, rows.mean(1), rtol=1e-12)
    for p in range(4):
        np.testing.assert_allclose(scatter[p] / 12, np.cov(rows[p].T), rtol=1e-10, atol=1e-12)
    restored = ops.GaussianAccumulator.from_state(mean, scatter, n, 2, 2)
    m1, i1 = merged.finalize()
    m2, i2 = restored.finalize()
    np.testing.assert_array_equal(m1, m2)
    np.testing.assert_array_equal(i1, i2)
    with pytest.raises(ValueError, match="other"):
        merged.merge(ops.GaussianAccumulator().partial_fit(x[:2, :2]))


def test_padim_merge_equals_one_fit(images):
    good, test_good, test_bad = images
    base = PaDiM(**COMMON)
    one = clone(base).fit(list(good))
    merged, parts = merged_of(base, good)
    assert rel(merged.mean_, one.mean_) < 1e-6
    assert rel(merged.inv_cov_, one.inv_cov_) < 1e-6
    test = list(test_good) + list(test_bad)
    assert rel(merged.decision_function(test), one.decision_function(test)) < 1e-6
    # The partial state is the float64 sufficient statistics, H·W·C·(C+1)·8 bytes.
    state = parts[0].partial_state()
    assert state["n_images"] == 4 and state["data"]["scatter"].dtype == np.float64
    h, w = one.grid_
    assert state["data"]["scatter"].shape == (h * w, len(one.channels_), len(one.channels_))
    # Successive partial_fit calls accumulate like merge.
    running = clone(base)
    for shard in shards_of(good, (4, 6, 4)):
        running.partial_fit(shard)
    assert rel(running.inv_cov_, one.inv_cov_) < 1e-6


@pytest.mark.parametrize("score", ["fre", "nll"])
@pytest.mark.parametrize("scatter_max_dim", [4096, 8], ids=["scatter", "thin-svd"])
def test_dfm_merge_equals_one_fit(images, score, scatter_max_dim, monkeypatch):
    monkeypatch.setattr(DFM, "_scatter_max_dim", scatter_max_dim)
    good, test_good, test_bad = images
    base = DFM(score=score, pooling_kernel_size=1, **COMMON)
    one = clone(base).fit(list(good))
    merged, parts = merged_of(base, good)
    assert ("scatter" in parts[0].partial_state()["data"]) == (scatter_max_dim > 8)
    assert merged.n_components_ == one.n_components_ and merged.n_train_images_ == len(good)
    test = list(test_good) + list(test_bad)
    assert rel(merged.decision_function(test), one.decision_function(test)) < 1e-4


def test_dfm_tiled_merge_equals_one_fit(images):
    good, test_good, _ = images
    base = DFM(tile_size=32, pooling_kernel_size=1, **COMMON)
    one = clone(base).fit(list(good))
    merged, _ = merged_of(base, good)
    assert merged.n_components_ == one.n_components_
    assert rel(merged.decision_function(list(test_good)), one.decision_function(list(test_good))) < 1e-4


def test_spade_merge_concatenates_exactly(images):
    good, test_good, test_bad = images
    base = SPADE(top_k_images=3, **COMMON)
    one = clone(base).fit(list(good))
    merged, _ = merged_of(base, good)
    np.testing.assert_array_equal(merged.train_maps_, one.train_maps_)
    np.testing.assert_array_equal(merged.train_global_, one.train_global_)
    test = list(test_good) + list(test_bad)
    np.testing.assert_array_equal(merged.decision_function(test), one.decision_function(test))


def test_patchcore_shards_oversample_then_select_the_target(images):
    good, test_good, test_bad = images
    base = PatchCore(coreset_ratio=0.1, **COMMON)
    one = clone(base).fit(list(good))
    merged, parts = merged_of(base, good)
    n_patches = one.n_train_patches_
    assert merged.n_train_patches_ == n_patches
    # Each shard keeps twice the ratio of its own patches; the merge selects the target size.
    for part, size in zip(parts, (4, 6, 4)):
        kept = part.partial_state()["data"]["bank"].shape[0]
        assert kept == max(1, int(0.2 * n_patches * size / len(good)))
    assert merged.memory_bank_.shape == one.memory_bank_.shape
    # The bank's rows are training patches: each is one of the shards' kept rows.
    union = np.concatenate([p.partial_state()["data"]["bank"] for p in parts])
    d = ((merged.memory_bank_[:, None, :] - union[None]) ** 2).sum(-1).min(1)
    assert np.all(d == 0)
    scores = merged.decision_function(list(test_good) + list(test_bad))
    assert scores[4:].min() > scores[:4].max()


def test_partial_fit_leaves_threshold_to_calibration(images, tmp_path):
    good, test_good, _ = images
    model = PaDiM(**COMMON).partial_fit(list(good[:7]))
    assert model.threshold_ is None and model.calibration_scores_ is None
    with pytest.raises(ValueError, match="threshold_"):
        model.predict(list(test_good))
    model.set_threshold(list(good[7:]), contamination=0.2)
    assert model.threshold_ is not None
    path = model.save(tmp_path / "merged.safetensors")
    loaded = anomalox.load(path)
    np.testing.assert_array_equal(loaded.decision_function(list(test_good)), model.decision_function(list(test_good)))
    with pytest.raises(ValueError, match="partial_fit: .*loaded"):
        loaded.partial_fit(list(good[:2]))


def test_merge_refusals(images):
    good = list(images[0])
    a = PaDiM(**COMMON).partial_fit(good[:4])
    with pytest.raises(ValueError, match="n_features"):
        clone(a).set_params(n_features=20).merge(a)
    with pytest.raises(ValueError, match="n_features"):
        PaDiM(n_features=20, **COMMON).partial_fit(good[4:8]).merge(a)
    with pytest.raises(ValueError, match="expected a PaDiM"):
        a.merge(SPADE(**COMMON).partial_fit(good[:4]))
    with pytest.raises(ValueError, match="partial state of a PaDiM, got one of a SPADE"):
        a.merge(SPADE(**COMMON).partial_fit(good[:4]).partial_state())
    with pytest.raises(ValueError, match="expected a partial state"):
        a.merge({"not": "a state"})
    with pytest.raises(ValueError, match="others: expected at least one"):
        PaDiM(**COMMON).merge()
    with pytest.raises(ValueError, match="image_size"):
        clone(a).merge(PaDiM(**{**COMMON, "image_size": 96}).partial_fit(good[:4]))
    with pytest.raises(ValueError, match="merge: .*fit\\(\\)"):
        PaDiM(**COMMON).fit(good).merge(a)
    with pytest.raises(TypeError, match="partial_fit: FRE cannot learn from shards"):
        FRE().partial_fit(good)
    # Parameters that do not change what is learned may differ.
    b = PaDiM(**{**COMMON, "n_threads": 1, "batch_size": 3, "contamination": 0.1}).partial_fit(good[4:])
    assert clone(a).merge(a, b).partial_state()["n_images"] == 4 + len(good) - 4
    with pytest.raises(ValueError, match="n_features changed"):
        a.set_params(n_features=10).partial_fit(good[:2])


def test_fit_discards_the_partial_state(images):
    good = list(images[0])
    model = SPADE(**COMMON).partial_fit(good[:4])
    model.fit(good)
    with pytest.raises(NotFittedError, match="partial_state: this SPADE has no partial state"):
        model.partial_state()


def test_merge_states_equals_merge_in_any_tree(images):
    """merge_states (what distributed merge tasks run) is associative: any tree, the same model."""
    good, test_good, test_bad = images
    test = list(test_good) + list(test_bad)
    parts = [PaDiM(**COMMON).partial_fit(shard).partial_state() for shard in shards_of(list(good), (4, 6, 4))]
    merger = PaDiM(**COMMON)
    left = merger.merge_states(merger.merge_states(parts[0], parts[1]), parts[2])
    right = merger.merge_states(parts[0], merger.merge_states(parts[1], parts[2]))
    assert left["n_images"] == right["n_images"] == 14
    a = PaDiM(**COMMON).merge(left).decision_function(test)
    b = PaDiM(**COMMON).merge(right).decision_function(test)
    c = PaDiM(**COMMON).fit(list(good)).decision_function(test)
    assert rel(a, b) < 1e-6 and rel(a, c) < 1e-6
    with pytest.raises(ValueError, match="states: expected at least one"):
        merger.merge_states()
    with pytest.raises(ValueError, match="they differ in n_features"):
        PaDiM(**COMMON).merge_states(
            parts[0], PaDiM(**{**COMMON, "n_features": 20}).partial_fit(good[:2]).partial_state()
        )


def test_calibration_split_is_fits_split(images):
    """fit's hold-out is calibration_split's: learning on its first part and calibrating on its
    second with set_threshold_from_values gives fit's threshold and calibration scores."""
    good = list(images[0])
    params = {**COMMON, "validation_fraction": 0.3, "contamination": 0.25}
    one = PaDiM(**params).fit(good)
    ((learned, held),) = PaDiM(**params).calibration_split(len(good))
    assert len(held) == round(0.3 * len(good)) and sorted([*learned, *held]) == list(range(len(good)))
    model = PaDiM(**params).partial_fit([good[i] for i in learned])
    scores, map_max = model.calibration_values([good[i] for i in held])
    model.set_threshold_from_values(scores, map_max)
    assert model.threshold_ == pytest.approx(one.threshold_, rel=1e-5)
    assert model.pixel_threshold_ == pytest.approx(one.pixel_threshold_, rel=1e-5)
    np.testing.assert_allclose(model.calibration_scores_, one.calibration_scores_, rtol=1e-5)
    folds = PaDiM(**{**params, "calibration": "cv", "n_folds": 3}).calibration_split(len(good))
    assert len(folds) == 3
    assert sorted(np.concatenate([scored for _, scored in folds])) == list(range(len(good)))
    for learned, scored in folds:
        assert not set(learned) & set(scored) and len(learned) + len(scored) == len(good)
    with pytest.raises(ValueError, match="n: calibration='cv' with n_folds=3 needs at least 3"):
        PaDiM(calibration="cv", n_folds=3).calibration_split(2)
    with pytest.raises(ValueError, match="scores: expected a non-empty 1-D array"):
        model.set_threshold_from_values([])
    with pytest.raises(ValueError, match="map_max: expected 2 finite values"):
        model.set_threshold_from_values([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="contamination"):
        model.set_threshold_from_values([1.0, 2.0], contamination=0.9)


def test_check_params_refuses_before_any_work():
    with pytest.raises(ValueError, match="coreset_ratio"):
        PatchCore(coreset_ratio=0.0).check_params()
    PatchCore().check_params()


def test_shard_state_is_partial_fits_state_and_leaves_the_detector(images):
    good, test_good, _ = images
    fitted = PatchCore(coreset_ratio=0.2, **COMMON).fit(list(good))
    before = fitted.decision_function(list(test_good))
    shard = fitted.shard_state(list(good[:6]))
    reference = PatchCore(coreset_ratio=0.2, **COMMON).partial_fit(list(good[:6])).partial_state()
    assert shard["n_images"] == reference["n_images"] == 6 and shard["params"] == reference["params"]
    np.testing.assert_array_equal(shard["data"]["bank"], reference["data"]["bank"])
    np.testing.assert_array_equal(fitted.decision_function(list(test_good)), before)
    fresh = PatchCore(coreset_ratio=0.2, **COMMON)
    fresh.shard_state(list(good[:6]))
    with pytest.raises(NotFittedError):
        fresh.decision_function(list(test_good))
    one = PaDiM(**COMMON).shard_state(list(good[:1]))  # one image: a state, though no model yet
    assert one["n_images"] == 1
    with pytest.raises(TypeError, match="shard_state: FRE cannot learn from shards"):
        FRE().shard_state(list(good))
