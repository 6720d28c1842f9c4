"""anomalox: fast industrial visual anomaly detection with a Rust core.

Convention: a higher anomaly score means more anomalous.
"""

from __future__ import annotations

REQUIRED_TORCH = "2.13.0"


def _check_torch() -> str:
    try:
        import torch  # noqa: F401  (libtorch must be loaded before the extension)
    except ImportError as exc:  # pragma: no cover - exercised only without torch
        raise ImportError(
            f"anomalox needs torch=={REQUIRED_TORCH}, but torch is not installed: pip install torch=={REQUIRED_TORCH}"
        ) from exc
    found = torch.__version__.split("+")[0]
    if found != REQUIRED_TORCH:
        raise ImportError(
            f"anomalox was built against torch=={REQUIRED_TORCH}, but torch {torch.__version__} is "
            f"installed. Install the matching version: pip install torch=={REQUIRED_TORCH}"
        )
    return found


_check_torch()

from anomalox import _core, detectors, metrics, ops  # noqa: E402
from anomalox.backbone import Backbone  # noqa: E402
from anomalox.detectors import *  # noqa: E402,F401,F403  (PatchCore, PaDiM, ...)
from anomalox.evaluate import Evaluation, evaluate  # noqa: E402
from anomalox.exceptions import (  # noqa: E402
    AnomaloxError,
    CalibrationWarning,
    InternalError,
    KernelArgumentError,
    ModelFileError,
    NotFittedError,
)
from anomalox.persist import load, save  # noqa: E402

if _core.__torch_version__ not in (REQUIRED_TORCH, "unknown"):  # pragma: no cover
    raise ImportError(
        f"this anomalox build was compiled against torch {_core.__torch_version__}, "
        f"but it requires torch=={REQUIRED_TORCH}; rebuild anomalox"
    )

__version__: str = _core.__version__

__all__ = [
    "AnomaloxError",
    "Backbone",
    "CalibrationWarning",
    "Evaluation",
    "InternalError",
    "KernelArgumentError",
    "ModelFileError",
    "NotFittedError",
    "evaluate",
    "load",
    "save",
    "metrics",
    "ops",
    "__version__",
    *[name for name in detectors.__all__ if name != "BaseDetector"],
]
