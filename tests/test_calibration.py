"""Calibrated decisions: the conformal threshold, cross-fitted calibration, p-values and pixel masks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.stats import binom

import anomalox
from anomalox import DFM, SPADE, CalibrationWarning, PaDiM, PatchCore
from anomalox.detectors.calibration import calibration_cdf, conformal_rank, conformal_threshold, p_values
from conftest import SIZE

DETECTORS = [
    (PatchCore, {"coreset_ratio": 1.0}),
    (PaDiM, {"n_features": 20}),
    (SPADE, {"top_k_images": 3}),
    (DFM, {"pooling_kernel_size": 2}),
]


# ----------------------------------------------------------------------------- the rule itself
def test_conformal_rank_is_the_ceiling_of_n_plus_one_times_one_minus_alpha():
    assert conformal_rank(19, 0.05) == 19  # (n + 1)(1 - α) = 19 exactly, despite float rounding
    assert conformal_rank(99, 0.01) == 99
    assert conformal_rank(100, 0.05) == 96  # ⌈101 · 0.95⌉ = ⌈95.95⌉
    assert conformal_rank(9, 0.05) == 10  # > n: no such order statistic


def test_conformal_threshold_is_that_order_statistic():
    scores = np.random.default_rng(0).permutation(np.arange(100, dtype=np.float32))
    assert conformal_threshold(scores, 0.05) == 95.0  # the 96th smallest of 0..99


@pytest.mark.parametrize(
    "n, alpha, ties", [(99, 0.1, False), (19, 0.05, False), (250, 0.03, False), (99, 0.1, True)], ids=str
)
def test_realised_false_alarm_rate_stays_within_the_binomial_interval_of_alpha(n, alpha, ties):
    # One new good score per seed: over seeds the flags are independent Bernoulli(p) with
    # p = (n + 1 - k) / (n + 1) <= alpha (and > alpha - 1 / (n + 1) for continuous scores).
    seeds = 4000
    flagged = 0
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        draws = rng.gamma(2.0, size=n + 1)
        if ties:  # a discrete score: ties only lower the chance of a strict exceedance
            draws = np.round(draws * 4)
        flagged += int(draws[n] > conformal_threshold(draws[:n], alpha))
    # 99.9 % binomial intervals: at most the upper end at alpha; at least the lower end at
    # alpha - 1 / (n + 1), the least the rule flags with continuous scores.
    assert flagged <= binom.ppf(0.9995, seeds, alpha)
    if not ties:
        assert flagged >= binom.ppf(0.0005, seeds, alpha - 1.0 / (n + 1))


def test_too_few_scores_warn_with_the_achievable_rate_and_fall_back_to_the_largest():
    scores = np.arange(10.0)
    with pytest.warns(CalibrationWarning, match=r"1/\(n\+1\) = 0\.0909.*calibration='cv'.*larger contamination"):
        assert conformal_threshold(scores, 0.05) == 9.0
    assert issubclass(CalibrationWarning, UserWarning) and anomalox.CalibrationWarning is CalibrationWarning


def test_p_value_is_at_most_alpha_exactly_when_the_score_exceeds_the_threshold():
    rng = np.random.default_rng(1)
    calibration = rng.normal(size=99)
    scores = np.concatenate([rng.normal(size=500), calibration[:20]])  # ties with calibration scores too
    for alpha in (0.01, 0.05, 0.1, 0.3):
        np.testing.assert_array_equal(
            p_values(calibration, scores) <= alpha, scores > conformal_threshold(calibration, alpha)
        )
    brute = [(1 + np.sum(calibration >= s)) / 100 for s in scores]
    np.testing.assert_allclose(p_values(calibration, scores), brute, rtol=0, atol=1e-15)
    cdf = calibration_cdf(calibration, scores)
    assert cdf.min() >= 0 and cdf.max() <= 1
    np.testing.assert_allclose(cdf, [np.mean(calibration <= s) for s in scores])


# ------------------------------------------------------------------------------- on detectors
def _detector(cls, kw, **more):
    return cls(**{"image_size": SIZE, **kw, **more})


@pytest.mark.parametrize("cls, kw", DETECTORS, ids=lambda v: getattr(v, "__name__", ""))
def test_cv_calibrates_on_every_image_and_the_final_model_learns_from_all(cls, kw, images):
    good = images[0]
    with pytest.warns(CalibrationWarning):  # 14 images cannot resolve contamination 0.01
        cv = _detector(cls, kw, calibration="cv", n_folds=3).fit(good)
    assert cv.calibration_scores_.shape == (len(good),) and cv.pixel_calibration_scores_.shape == (len(good),)
    assert cv.threshold_ == cv.calibration_scores_.max()
    all_images = _detector(cls, kw, validation_fraction=0.0).fit(good)
    for name in cls.learned_attributes:
        a, b = getattr(cv, name), getattr(all_images, name)
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b
    masks = cv.predict_mask(images[2])
    assert masks.dtype == bool and masks.shape == (len(images[2]), SIZE, SIZE)
    np.testing.assert_array_equal(masks, cv.anomaly_map(images[2]) > cv.pixel_threshold_)
    p = cv.p_value(images[2])
    assert p.dtype == np.float64 and np.all((p > 0) & (p <= 1))
    both = np.concatenate([images[1], images[2]])
    normalized = cv.normalized_score(both)
    scores = cv.decision_function(both)
    np.testing.assert_array_equal(normalized, [np.mean(cv.calibration_scores_ <= s) for s in scores])
    assert np.all((normalized >= 0) & (normalized <= 1)) and normalized[4:].mean() > normalized[:4].mean()


def test_cv_calibration_scores_are_out_of_fold(images):
    # With every patch in the bank, a training image scores 0 in-sample; out of fold it cannot.
    model = PatchCore(image_size=SIZE, coreset_ratio=1.0, calibration="cv", n_folds=2, contamination=0.1)
    model.fit(images[0])  # n = 14: k = ⌈15 · 0.9⌉ = 14, no warning
    assert np.all(model.decision_function(images[0]) == 0.0)
    assert np.all(model.calibration_scores_ > 0.0)


def test_holdout_threshold_is_the_conformal_order_statistic_of_the_held_out_scores(images):
    model = PatchCore(image_size=SIZE, coreset_ratio=1.0, validation_fraction=0.5, contamination=0.25)
    model.fit(images[0])  # n = 7: k = ⌈8 · 0.75⌉ = 6, no warning
    assert model.calibration_scores_.shape == (7,)
    assert model.threshold_ == np.sort(model.calibration_scores_)[5]
    assert model.pixel_threshold_ == np.sort(model.pixel_calibration_scores_)[5]


def test_set_threshold_uses_the_same_rule_and_warns_the_same_way(images):
    model = PatchCore(image_size=SIZE, coreset_ratio=1.0, validation_fraction=0.0).fit(images[0])
    assert model.threshold_ is None and model.calibration_scores_ is None
    model.set_threshold(images[1], contamination=0.4)  # n = 4: k = ⌈5 · 0.6⌉ = 3
    scores = model.decision_function(images[1])
    assert model.threshold_ == np.sort(scores)[2]
    np.testing.assert_array_equal(model.calibration_scores_, scores)
    with pytest.warns(CalibrationWarning, match=r"^threshold_: 4 calibration images"):
        model.set_threshold(images[1], contamination=0.05)
    assert model.threshold_ == scores.max()


def test_cv_refuses_an_unsized_iterable_naming_calibration(images):
    loader = torch.utils.data.DataLoader(torch.from_numpy(images[0]).permute(0, 3, 1, 2), batch_size=5)
    with pytest.raises(ValueError, match=r"^calibration: 'cv' needs a sized X"):
        PatchCore(image_size=SIZE, calibration="cv").fit(iter(loader))
    with pytest.raises(ValueError, match=r"^X: calibration='cv' with n_folds=5 needs at least 5 images, got 3"):
        PatchCore(image_size=SIZE, calibration="cv").fit(images[0][:3])


@pytest.mark.parametrize(
    "param, value, message",
    [
        ("calibration", "kfold", r"^calibration: expected 'cv' or 'holdout', got 'kfold'$"),
        ("n_folds", 1, r"^n_folds: expected an integer in \[2, inf\), got 1$|^n_folds: expected .*, got 1$"),
        ("n_folds", 2.5, r"^n_folds: expected .*, got 2.5$"),
    ],
)
def test_calibration_parameters_are_validated_by_the_table(param, value, message, images):
    with pytest.raises(ValueError, match=message):
        PatchCore(image_size=SIZE, **{param: value}).fit(images[0])


def test_calibration_survives_save_and_load(images, tmp_path):
    with pytest.warns(CalibrationWarning):
        model = PaDiM(image_size=SIZE, n_features=20, validation_fraction=0.3).fit(images[0])
    loaded = anomalox.load(model.save(tmp_path / "m.ax"))
    np.testing.assert_array_equal(loaded.calibration_scores_, model.calibration_scores_)
    assert loaded.pixel_threshold_ == model.pixel_threshold_
    np.testing.assert_array_equal(loaded.p_value(images[2]), model.p_value(images[2]))


def test_a_failed_set_threshold_leaves_the_previous_calibration_whole(images):
    model = PatchCore(image_size=SIZE, coreset_ratio=1.0, validation_fraction=0.0).fit(images[0])
    model.set_threshold(images[1], contamination=0.4)
    before = (model.threshold_, model.pixel_threshold_, model.calibration_scores_.copy())
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)  # the warning raised, as the suite does
        with pytest.raises(CalibrationWarning):
            model.set_threshold(images[1][:2], contamination=0.05)
    assert (model.threshold_, model.pixel_threshold_) == before[:2]
    np.testing.assert_array_equal(model.calibration_scores_, before[2])
    assert len(model.pixel_calibration_scores_) == len(before[2])
