"""The exception hierarchy: what a user catches, by kind, from `anomalox`."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import sklearn.exceptions
import torch

import anomalox
from anomalox import _core, exceptions, ops


def test_every_exception_is_importable_from_anomalox():
    for name in exceptions.__all__:
        assert getattr(anomalox, name) is getattr(exceptions, name)
        assert name in anomalox.__all__


def test_hierarchy():
    assert issubclass(anomalox.KernelArgumentError, anomalox.AnomaloxError)
    assert issubclass(anomalox.KernelArgumentError, ValueError)
    assert issubclass(anomalox.InternalError, anomalox.AnomaloxError)
    assert issubclass(anomalox.InternalError, RuntimeError)
    assert issubclass(anomalox.ModelFileError, anomalox.AnomaloxError)
    assert issubclass(anomalox.ModelFileError, ValueError)
    assert anomalox.NotFittedError is sklearn.exceptions.NotFittedError


def test_kernel_error_names_its_argument():
    bank = np.zeros((4, 3), np.float32)
    with pytest.raises(anomalox.KernelArgumentError, match=r"^k: expected") as info:
        ops.knn(np.zeros((2, 3), np.float32), bank, k=5)
    assert info.value.arg == "k"
    assert str(info.value).startswith("k: ")


def test_kernel_error_is_a_value_error():
    with pytest.raises(ValueError):
        ops.knn(np.zeros((2, 3), np.float32), np.zeros((4, 3), np.float32), k=5)


def test_binding_argument_errors_name_their_argument():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(anomalox.KernelArgumentError) as info:
        _core.knn(x, x, 1, "manhattan", 1)
    assert info.value.arg == "metric"
    with pytest.raises(anomalox.KernelArgumentError) as info:
        _core.upsample(np.zeros((1, 2, 2), np.float32), 4, 4, "cubic", 1)
    assert info.value.arg == "mode"
    with pytest.raises(anomalox.KernelArgumentError) as info:
        _core.knn(x, x, 1, "euclidean", 0)
    assert info.value.arg == "n_threads"


def test_backbone_input_errors_name_their_argument():
    backbone = anomalox.Backbone("efficientnet_lite0")
    with pytest.raises(anomalox.KernelArgumentError) as info:
        backbone._model.features(torch.zeros(1, 3, 32, 32), ["nowhere"], 1)
    assert info.value.arg == "layers"
    with pytest.raises(anomalox.KernelArgumentError) as info:
        backbone._model.features(torch.zeros(1, 3, 32, 32, dtype=torch.float64), ["_blocks.0"], 1)
    assert info.value.arg == "x"


def test_unknown_backbone_family_names_its_argument():
    with pytest.raises(anomalox.KernelArgumentError, match="family: expected") as info:
        pytest.importorskip("anomalox_tch").BackboneModel("net", "vgg", {}, [], None, 1)
    assert info.value.arg == "family"


def test_panic_is_an_internal_error():
    with pytest.raises(anomalox.InternalError, match="deliberate test panic") as info:
        _core._debug_panic(2)
    assert isinstance(info.value, anomalox.AnomaloxError)
    assert isinstance(info.value, RuntimeError)


def test_kernel_argument_error_keeps_its_argument_through_pickling():
    err = pickle.loads(pickle.dumps(anomalox.KernelArgumentError("k: expected 1 <= k <= N", "k")))
    assert isinstance(err, anomalox.KernelArgumentError)
    assert (str(err), err.arg) == ("k: expected 1 <= k <= N", "k")


def test_kernel_argument_error_without_arg():
    err = anomalox.KernelArgumentError("k: expected a positive integer")
    assert err.arg == ""
    assert str(err) == "k: expected a positive integer"
