"""Input handling shared by `anomalox.ops` and `anomalox.metrics`: numpy arrays and torch tensors
in, the same kind out; torch is optional.

Torch CPU tensors are viewed as numpy arrays through DLPack (``np.from_dlpack``: shares memory),
so nothing is copied when the dtype is already float32; results go back through
``torch.from_dlpack``, which shares memory too. DLPack, not ``Tensor.numpy()`` /
``torch.from_numpy``: those need the numpy torch was built against (a torch built for NumPy 1
refuses NumPy 2). Torch is never imported here: a tensor can only be passed once it is.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from anomalox.params import POSITIVE_INT, check


def _torch() -> Any:
    """The torch module when it has been imported, else None (a tensor implies it has)."""
    return sys.modules.get("torch")


def is_tensor(x: Any) -> bool:
    """Whether `x` is a torch tensor (False without torch)."""
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


def default_threads() -> int:
    """torch's intra-op thread count when torch is loaded, else the CPUs this process may use."""
    torch = _torch()
    if torch is not None:
        return max(1, torch.get_num_threads())
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - platforms without sched_getaffinity
        return max(1, os.cpu_count() or 1)


def resolve_threads(n_threads: int | None) -> int:
    """`n_threads`, or :func:`default_threads` when it is None."""
    if n_threads is None:
        return default_threads()
    return int(check("n_threads", n_threads, [POSITIVE_INT, None]))


def tensor_to_numpy(x: Any) -> np.ndarray:
    """A CPU tensor as a numpy array sharing its memory (DLPack); conjugate / negative views resolved."""
    return np.from_dlpack(x.detach().resolve_conj().resolve_neg())


def as_float32(x: Any, name: str, shape_doc: str) -> tuple[np.ndarray, bool]:
    """A float32 numpy view of `x` of rank `len(shape_doc.split(','))` and whether it was a tensor.

    Other floating dtypes are converted (one copy); integer, bool and complex inputs are refused.
    """
    ndim = len(shape_doc.split(","))
    is_torch = is_tensor(x)
    if is_torch:
        torch = _torch()
        if x.device.type != "cpu":
            raise ValueError(
                f"{name}: anomalox kernels run on the CPU, but this tensor is on {x.device}; "
                f"move it with .cpu() first (no copy is made silently)"
            )
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a float32 tensor {shape_doc}, got dtype {x.dtype}")
        if x.dtype not in (torch.float32, torch.float64):
            x = x.to(torch.float32)  # float16 / bfloat16: exact in float32
        arr = tensor_to_numpy(x)
    else:
        arr = np.asarray(x)
        if arr.dtype.kind != "f":
            raise TypeError(f"{name}: expected a float32 array {shape_doc}, got dtype {arr.dtype}")
    if arr.dtype != np.float32 or not arr.dtype.isnative:
        # Finite values beyond the float32 range would silently become inf (with a numpy
        # RuntimeWarning); refuse them by name instead.
        try:
            with np.errstate(over="raise"):
                arr = arr.astype(np.float32)
        except FloatingPointError:
            raise ValueError(
                f"{name}: expected values within the float32 range (|x| <= {np.finfo(np.float32).max:.4g}), "
                f"got {arr.dtype} values beyond it"
            ) from None
    if arr.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array {shape_doc}, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"{name}: expected a non-empty array {shape_doc}, got shape {tuple(arr.shape)}")
    return arr, is_torch


def as_int64(x: Any, name: str, n: int) -> np.ndarray:
    """A 1-D, non-empty int64 numpy view of integer indices into `n` rows."""
    if is_tensor(x):
        if x.device.type != "cpu":
            raise ValueError(f"{name}: expected a CPU tensor, got one on {x.device}")
        x = tensor_to_numpy(x)
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of indices, got shape {arr.shape}")
    if arr.size == 0:  # before the dtype check: `[]` is a float64 array
        raise ValueError(f"{name}: expected at least one index, got an empty array")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer indices, got dtype {arr.dtype}")
    lo, hi = arr.min(), arr.max()  # checked before the cast: uint64 could wrap
    if lo < 0 or hi >= n:
        raise ValueError(f"{name}: expected indices in [0, {n}), got {lo if lo < 0 else hi}")
    return arr.astype(np.int64, copy=False)


def same_kind(arr: np.ndarray, as_torch: bool) -> Any:
    """Return `arr` as a torch tensor (sharing memory, through DLPack) when the input was one."""
    if not as_torch:
        return arr
    # DLPack cannot say read-only (a tensor result is the caller's to write), and torch refuses
    # negative strides: copy those.
    if not arr.flags.writeable or any(stride < 0 for stride in arr.strides):
        arr = arr.copy()
    return _torch().from_dlpack(arr)
