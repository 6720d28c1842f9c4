"""Parameters declared once (constraint tables, shared docs), the detectors' state contract, and
the one-way imports between the detectors and persistence."""

from __future__ import annotations

import ast
import inspect
import math
import pathlib
import re
from numbers import Integral, Real

import numpy as np
import pytest

import anomalox
from anomalox import detectors
from anomalox.backbone import BACKBONES
from anomalox.detectors import (
    DFM,
    FRE,
    SPADE,
    STFPM,
    BaseDetector,
    FastFlow,
    NotFittedError,
    PaDiM,
    PatchCore,
    ReverseDistillation,
    SuperSimpleNet,
)
from anomalox.detectors._base import SHARED_PARAMETERS_DOC
from anomalox.detectors.families import FAMILIES, rules_for
from anomalox.params import NON_NEGATIVE_INT, POSITIVE_INT, Hidden, Interval, Options, Unchecked, check, validate_params
from conftest import SIZE

# Their image sets are tiny: the conformal threshold falls back to the largest calibration score.
pytestmark = pytest.mark.filterwarnings("ignore::anomalox.CalibrationWarning")

PACKAGE = pathlib.Path(anomalox.__file__).parent
DETECTORS = [getattr(detectors, name) for name in detectors.__all__]
DETECTORS = [c for c in DETECTORS if isinstance(c, type) and issubclass(c, BaseDetector) and c is not BaseDetector]
SHARED = [
    "image_size",
    "crop_size",
    "weights",
    "device",
    "batch_size",
    "validation_fraction",
    "contamination",
    "random_state",
    "n_threads",
    "verbose",
]


# ----------------------------------------------------------------------- tables and signatures
@pytest.mark.parametrize("cls", DETECTORS, ids=lambda c: c.__name__)
def test_every_detector_signature_and_constraint_table_name_the_same_parameters(cls):
    signature = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    table = cls.parameter_constraints()
    assert sorted(signature) == sorted(table), (
        f"missing from the table: {sorted(set(signature) - set(table))}, "
        f"not in __init__: {sorted(set(table) - set(signature))}"
    )
    # The shared parameters come from the base's table, not from a copy in the subclass.
    own = vars(cls).get("_parameter_constraints", {})
    assert not set(own) & set(SHARED)
    assert set(SHARED) <= set(signature)


@pytest.mark.parametrize("cls", DETECTORS, ids=lambda c: c.__name__)
def test_every_parameter_is_documented_and_the_shared_text_is_the_bases(cls):
    doc = cls.__doc__
    assert SHARED_PARAMETERS_DOC in doc and "<shared parameters>" not in doc
    section = doc.split("Parameters\n    ----------")[1].split("Attributes\n")[0]
    for name in inspect.signature(cls.__init__).parameters:
        if name != "self":
            assert re.search(rf"\b{name}\b", section), f"{cls.__name__}: {name} is not documented"


@pytest.mark.parametrize("cls", DETECTORS, ids=lambda c: c.__name__)
def test_every_detector_lists_its_learned_attributes(cls):
    assert cls.learned_attributes and all(n.endswith("_") and not n.startswith("_") for n in cls.learned_attributes)
    assert "threshold_" not in cls.learned_attributes and "backbone_" not in cls.learned_attributes


# ---------------------------------------------------------------------------- validator messages
@pytest.mark.parametrize(
    "constraints, value, message",
    [
        ([POSITIVE_INT], 0, "x: expected a positive integer, got 0"),
        ([POSITIVE_INT], 2.0, "x: expected a positive integer, got 2.0"),
        ([POSITIVE_INT], True, "x: expected a positive integer, got True"),
        ([POSITIVE_INT, None], -1, "x: expected a positive integer or None, got -1"),
        ([POSITIVE_INT, Hidden(None)], "3", "x: expected a positive integer, got '3'"),
        ([NON_NEGATIVE_INT], -1, "x: expected a non-negative integer, got -1"),
        ([Interval(Real, 0.0, 1.0, closed="neither")], 1.5, "x: expected a number in (0.0, 1.0), got 1.5"),
        ([Interval(Real, 0.0, 1.0, closed="neither")], math.nan, "x: expected a number in (0.0, 1.0), got nan"),
        ([Interval(Real, 0.0, 1.0, closed="left")], 1.0, "x: expected a number in [0.0, 1.0), got 1.0"),
        ([Interval(Real, 0.0, 1.0, closed="both")], False, "x: expected a number in [0.0, 1.0], got False"),
        ([Interval(Integral, 2, 5, closed="right")], 2, "x: expected an integer in (2, 5], got 2"),
        ([Interval(Real, 0, None, closed="left")], -1, "x: expected a finite number >= 0, got -1"),
        ([Interval(Real, 0, None, closed="neither")], math.inf, "x: expected a finite number > 0, got inf"),
        ([Options({"fre", "nll"})], "x", "x: expected 'fre' or 'nll', got 'x'"),
        ([Options({"fre", "nll"})], ["fre"], "x: expected 'fre' or 'nll', got ['fre']"),
    ],
)
def test_validator_messages_name_the_argument_what_it_accepts_and_the_value(constraints, value, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        check("x", value, constraints)


def test_validator_accepts_any_satisfied_constraint_and_returns_the_value_unchanged():
    assert check("x", np.int64(3), [POSITIVE_INT]) == 3
    assert check("x", None, [POSITIVE_INT, Hidden(None)]) is None
    assert check("x", 1, [Interval(Real, 0.0, 1.0, closed="neither"), Hidden(Options({1}))]) == 1
    assert check("x", object(), [Unchecked("elsewhere")]) is not None
    with pytest.raises(KeyError, match="no constraint"):
        validate_params({"a": [POSITIVE_INT]}, {"b": 1})


@pytest.mark.parametrize(
    "cls, param, value, message",
    [
        (DFM, "score", "max", "score: expected 'fre' or 'nll', got 'max'"),
        (DFM, "pca_variance", 1.0, "pca_variance: expected a number in (0.0, 1.0), got 1.0"),
        (DFM, "pooling_kernel_size", 0, "pooling_kernel_size: expected a positive integer, got 0"),
        (SPADE, "top_k_images", 0, "top_k_images: expected a positive integer, got 0"),
        (PatchCore, "n_threads", 0, "n_threads: expected a positive integer or None, got 0"),
        (PaDiM, "n_features", 1.5, "n_features: expected a positive integer, got 1.5"),
    ],
)
def test_fit_checks_the_table_before_building_anything(images, cls, param, value, message):
    model = cls(image_size=SIZE, **{param: value})
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        model.fit(images[0])
    assert not hasattr(model, "backbone_")


# ------------------------------------------------------------------------------ backbone families
# The taps and PaDiM's channel count each backbone gets by default: fixed, whatever the refactor.
DEFAULT_TAPS = {
    "lite": {
        PatchCore: ("_blocks.4", "_blocks.10"),
        PaDiM: ("_blocks.2", "_blocks.4", "_blocks.10"),
        SPADE: ("_blocks.4", "_blocks.10"),
        DFM: ("_blocks.10",),
        STFPM: ("_blocks.2", "_blocks.4", "_blocks.10"),
        ReverseDistillation: ("_blocks.2", "_blocks.4", "_blocks.10"),
        FRE: ("_blocks.10",),
        FastFlow: ("_blocks.2", "_blocks.4", "_blocks.10"),
        SuperSimpleNet: ("_blocks.4", "_blocks.10"),
    },
    "resnet": {
        PatchCore: ("layer2", "layer3"),
        PaDiM: ("layer1", "layer2", "layer3"),
        SPADE: ("layer1", "layer2", "layer3"),
        DFM: ("layer3",),
        STFPM: ("layer1", "layer2", "layer3"),
        ReverseDistillation: ("layer1", "layer2", "layer3"),
        FRE: ("layer3",),
        FastFlow: ("layer1", "layer2", "layer3"),
        SuperSimpleNet: ("layer2", "layer3"),
    },
}
PADIM_N_FEATURES = {"resnet50": 550, "wide_resnet50_2": 550}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_default_taps_and_padim_channels_per_backbone_are_unchanged(name):
    kind = "lite" if name.startswith("efficientnet_lite") else "resnet"
    for cls in DETECTORS:
        assert cls()._layers_for(name) == DEFAULT_TAPS[kind][cls]
    assert rules_for(name).padim_n_features == PADIM_N_FEATURES.get(name, 100)
    assert rules_for(name.replace("_", "-")) == rules_for(name)


def test_every_backbone_family_has_rules_and_every_detector_has_taps_for_them():
    families = {spec.family for spec in BACKBONES.values()}
    assert families == set(FAMILIES)
    for cls in DETECTORS:
        assert {FAMILIES[f].taps for f in families} == set(cls._default_layers)


# ------------------------------------------------------------------------------ state contract
@pytest.fixture(scope="module")
def fitted_dfm(images):
    return DFM(image_size=SIZE, validation_fraction=0.2, pooling_kernel_size=2).fit(images[0])


def test_state_dict_round_trips_into_a_new_detector_that_scores_identically(fitted_dfm, images):
    state = fitted_dfm.state_dict()
    assert set(state) == {*DFM.learned_attributes, *BaseDetector.calibrated_attributes}
    assert state["threshold_"] is not None and state["calibration_scores_"].dtype == np.float32
    twin = DFM(**fitted_dfm.get_params()).load_state_dict(state)
    np.testing.assert_array_equal(twin.decision_function(images[2]), fitted_dfm.decision_function(images[2]))
    np.testing.assert_array_equal(twin.predict(images[2]), fitted_dfm.predict(images[2]))
    np.testing.assert_array_equal(twin.p_value(images[2]), fitted_dfm.p_value(images[2]))
    np.testing.assert_array_equal(twin.predict_mask(images[2]), fitted_dfm.predict_mask(images[2]))


def test_a_state_without_calibration_scores_loads_and_p_value_asks_to_recalibrate(fitted_dfm, images):
    # The state of a model file written before calibration scores were kept: threshold_ only.
    old = {k: v for k, v in fitted_dfm.state_dict().items() if k in (*DFM.learned_attributes, "threshold_")}
    twin = DFM(**fitted_dfm.get_params()).load_state_dict(old)
    assert twin.calibration_scores_ is None and twin.pixel_threshold_ is None
    np.testing.assert_array_equal(twin.predict(images[2]), fitted_dfm.predict(images[2]))
    for method in (twin.p_value, twin.normalized_score, twin.predict_mask):
        with pytest.raises(ValueError, match=r"no calibration scores .* recalibrate it with set_threshold"):
            method(images[2])
    twin.set_threshold(images[1], contamination=0.4)
    assert twin.calibration_scores_.shape == (len(images[1]),) and twin.predict_mask(images[2]).dtype == bool


def test_an_old_model_file_without_calibration_scores_still_loads(fitted_dfm, images, tmp_path, monkeypatch):
    # Written as before calibration scores were kept: the state holds threshold_ and nothing else of them.
    old = {k: v for k, v in fitted_dfm.state_dict().items() if k in (*DFM.learned_attributes, "threshold_")}
    monkeypatch.setattr(fitted_dfm, "state_dict", lambda: old)
    loaded = anomalox.load(anomalox.save(fitted_dfm, tmp_path / "old.ax"))
    assert loaded.calibration_scores_ is None and loaded.threshold_ == fitted_dfm.threshold_
    np.testing.assert_array_equal(loaded.predict(images[2]), fitted_dfm.predict(images[2]))
    with pytest.raises(ValueError, match="recalibrate it with set_threshold"):
        loaded.p_value(images[2])


def test_state_dict_refuses_an_unfitted_or_changed_detector_and_load_refuses_foreign_state(fitted_dfm):
    with pytest.raises(NotFittedError, match="not fitted"):
        DFM().state_dict()
    with pytest.raises(ValueError, match=r"^detector: image_size changed \(set_params\) after fit"):
        DFM(**fitted_dfm.get_params()).load_state_dict(fitted_dfm.state_dict()).set_params(image_size=32).state_dict()
    state = dict(fitted_dfm.state_dict(), extra_=1)
    del state["mean_"]
    with pytest.raises(ValueError, match=r"^state: .* 1 missing \['mean_'\] and 1 unexpected \['extra_'\]"):
        DFM(**fitted_dfm.get_params()).load_state_dict(state)


def test_top_level_save_and_the_method_write_the_same_model(fitted_dfm, images, tmp_path):
    a = anomalox.save(fitted_dfm, tmp_path / "a.ax")
    b = fitted_dfm.save(tmp_path / "b.ax")
    np.testing.assert_array_equal(
        anomalox.load(a).decision_function(images[1]), anomalox.load(b).decision_function(images[1])
    )


# ------------------------------------------------------------------------- one-way module contracts
def _tree(path: pathlib.Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def test_persist_uses_no_private_detector_attribute_and_imports_no_private_name():
    tree = _tree(PACKAGE / "persist.py")
    private = [
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.endswith("__")
    ]
    assert private == []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.module != "__future__":
                assert not any(part.startswith("_") for part in (node.module or "").split(".")), node.module
            assert not any(alias.name.startswith("_") for alias in node.names)


def test_detectors_never_import_persist():
    for path in (PACKAGE / "detectors").glob("*.py"):
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or "", *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n.startswith("anomalox.persist") for n in names), path.name


@pytest.mark.parametrize("name", ["detectors", "persist.py", "ops.py", "params.py", "_convert.py"])
def test_modules_import_no_private_names_of_other_modules(name):
    paths = list((PACKAGE / name).glob("*.py")) if (PACKAGE / name).is_dir() else [PACKAGE / name]
    for path in paths:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom):
                bad = [a.name for a in node.names if a.name.startswith("_") and a.name != "_core"]
                assert bad == [], f"{path.name} imports {bad} from {node.module}"
