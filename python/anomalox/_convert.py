"""Input handling shared by `anomalox.ops`: numpy arrays and torch tensors in, the same kind out.

Torch CPU tensors are viewed as numpy arrays (`Tensor.numpy()` shares memory), so nothing is
copied when the dtype is already float32; results come back through `torch.from_numpy`, which
shares memory too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from anomalox.params import POSITIVE_INT, check


def resolve_threads(n_threads: int | None) -> int:
    """`n_threads`, or torch's intra-op thread count when it is None."""
    if n_threads is None:
        return max(1, torch.get_num_threads())
    return int(check("n_threads", n_threads, [POSITIVE_INT, None]))


def as_float32(x: Any, name: str, shape_doc: str) -> tuple[np.ndarray, bool]:
    """A float32 numpy view of `x` of rank `len(shape_doc.split(','))` and whether it was a tensor.

    Other floating dtypes are converted (one copy); integer, bool and complex inputs are refused.
    """
    ndim = len(shape_doc.split(","))
    is_torch = isinstance(x, torch.Tensor)
    if is_torch:
        if x.device.type != "cpu":
            raise ValueError(
                f"{name}: anomalox kernels run on the CPU, but this tensor is on {x.device}; "
                f"move it with .cpu() first (no copy is made silently)"
            )
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a float32 tensor {shape_doc}, got dtype {x.dtype}")
        if x.dtype not in (torch.float32, torch.float64):
            x = x.to(torch.float32)  # float16 / bfloat16: exact in float32
        arr = x.detach().resolve_conj().resolve_neg().numpy()
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
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(f"{name}: expected a CPU tensor, got one on {x.device}")
        x = x.detach().numpy()
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
    """Return `arr` as a torch tensor (sharing memory) when the input was one."""
    return torch.from_numpy(arr) if as_torch else arr
