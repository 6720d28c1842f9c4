"""anomalox: fast industrial visual anomaly detection with a Rust core.

Convention: a higher anomaly score means more anomalous.

The core (``anomalox.ops``, ``anomalox.metrics``) needs numpy only. The detectors, backbones,
``evaluate`` and model files need torch (any supported version, ``MIN_TORCH`` or later): they are
imported on first use, and without torch raise an ``ImportError`` saying so. The tch backbones are
the optional package ``anomalox-tch`` (``pip install anomalox[tch]``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

from anomalox import _core, metrics, ops
from anomalox.exceptions import (
    AnomaloxError,
    CalibrationWarning,
    InternalError,
    KernelArgumentError,
    ModelFileError,
    NotFittedError,
)

#: The oldest torch the Python layer is tested with (the newest: the latest on PyPI when released).
MIN_TORCH = "2.5.0"

__version__: str = _core.__version__

# Public names that need torch, and the module each comes from (imported on first access).
_NEEDS_TORCH = {
    "Backbone": "anomalox.backbone",
    "ModuleBackbone": "anomalox.torch_backbone",
    "Evaluation": "anomalox.evaluate",
    "evaluate": "anomalox.evaluate",
    "compare": "anomalox.comparison",
    "load": "anomalox.persist",
    "save": "anomalox.persist",
    "detectors": "anomalox.detectors",
    "PatchCore": "anomalox.detectors",
    "PaDiM": "anomalox.detectors",
    "SPADE": "anomalox.detectors",
    "DFM": "anomalox.detectors",
    "STFPM": "anomalox.detectors",
    "ReverseDistillation": "anomalox.detectors",
    "FRE": "anomalox.detectors",
    "FastFlow": "anomalox.detectors",
    "SuperSimpleNet": "anomalox.detectors",
    "Inspection": "anomalox.detectors",
}

if TYPE_CHECKING:
    from anomalox import detectors
    from anomalox.backbone import Backbone
    from anomalox.comparison import compare
    from anomalox.detectors import (
        DFM,
        FRE,
        SPADE,
        STFPM,
        FastFlow,
        Inspection,
        PaDiM,
        PatchCore,
        ReverseDistillation,
        SuperSimpleNet,
    )
    from anomalox.evaluate import Evaluation, evaluate
    from anomalox.persist import load, save
    from anomalox.torch_backbone import ModuleBackbone


def __getattr__(name: str) -> Any:
    module_name = _NEEDS_TORCH.get(name)
    if module_name is None:
        raise AttributeError(f"module 'anomalox' has no attribute {name!r}")
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"anomalox.{name} needs torch ({MIN_TORCH} or later), which is not installed: pip install torch "
            f"(anomalox.ops and anomalox.metrics work without it)"
        ) from exc
    module = importlib.import_module(module_name)
    importlib.import_module("anomalox.persist")  # registers the model-file writer (detector.save)
    value = module if name == "detectors" else getattr(module, name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """``anomalox.evaluate`` is the function, though a submodule of that name exists: importing
    the submodule (``from anomalox.evaluate import write_maps``) binds it on the package, and this
    binds the function instead, as an eager ``from anomalox.evaluate import evaluate`` would."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "evaluate" and isinstance(value, types.ModuleType):
            value = value.evaluate
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted({*globals(), *_NEEDS_TORCH})


__all__ = [
    "AnomaloxError",
    "Backbone",
    "CalibrationWarning",
    "DFM",
    "Evaluation",
    "Inspection",
    "InternalError",
    "KernelArgumentError",
    "MIN_TORCH",
    "ModelFileError",
    "ModuleBackbone",
    "NotFittedError",
    "PaDiM",
    "PatchCore",
    "ReverseDistillation",
    "FRE",
    "FastFlow",
    "SuperSimpleNet",
    "SPADE",
    "STFPM",
    "compare",
    "detectors",
    "evaluate",
    "load",
    "metrics",
    "ops",
    "save",
    "__version__",
]


def _has_torch() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


if not _has_torch():
    # Without torch, `from anomalox import *` gives the names that work there.
    __all__ = [name for name in __all__ if name not in _NEEDS_TORCH]
