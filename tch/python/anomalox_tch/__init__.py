"""anomalox-tch: anomalox's backbones run by libtorch inside Rust (tch), faster than torch eager.

Built against one torch: it loads only next to exactly that version (``REQUIRED_TORCH``), since
the extension links that libtorch. ``anomalox.Backbone`` uses it; without it (or with another
torch) anomalox runs the same networks in the installed torch (see ``anomalox.torch_backbone``).
"""

from __future__ import annotations

REQUIRED_TORCH = "2.13.0"


def _check_torch() -> None:
    try:
        import torch  # libtorch must be loaded before the extension
    except ImportError as exc:
        raise ImportError(
            f"anomalox-tch needs torch=={REQUIRED_TORCH}, but torch is not installed: install torch=={REQUIRED_TORCH}, "
            f"or use anomalox without its tch part (pass a torch module as backbone)"
        ) from exc
    found = torch.__version__.split("+")[0]
    if found != REQUIRED_TORCH:
        raise ImportError(
            f"anomalox-tch was built against torch=={REQUIRED_TORCH}, but torch {torch.__version__} is installed. "
            f"Either install torch=={REQUIRED_TORCH} (pip install torch=={REQUIRED_TORCH}), or pass a torch module "
            f"as backbone (backbone=my_module, layers=[...]), which runs in the installed torch"
        )


_check_torch()

from anomalox_tch import _tch  # noqa: E402

if _tch.__torch_version__ not in (REQUIRED_TORCH, "unknown"):  # pragma: no cover - a broken build
    raise ImportError(
        f"this anomalox-tch build was compiled against torch {_tch.__torch_version__}, but it requires "
        f"torch=={REQUIRED_TORCH}; rebuild it"
    )

__version__: str = _tch.__version__
BackboneModel = _tch.BackboneModel

__all__ = ["REQUIRED_TORCH", "BackboneModel", "__version__"]
