"""Low-level kernels, usable on their own inside any PyTorch or numpy pipeline.

Every function takes float32 numpy arrays or CPU torch tensors (contiguous or not), and returns
the same kind it was given. Float32 inputs are not copied; other float dtypes are converted to
float32 (one copy); integer, bool and complex inputs raise ``TypeError``. CUDA tensors raise a
``ValueError`` naming the device instead of being copied silently. NaN or infinite values raise
``ValueError``.

Each call releases the GIL, runs on ``n_threads`` threads (default: ``torch.get_num_threads()``
when torch is loaded, else the CPUs the process may use)
and stops within about a second on Ctrl-C (``KeyboardInterrupt``).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch

from anomalox import _core
from anomalox._convert import as_float32, as_int64, is_tensor, resolve_threads, same_kind, tensor_to_numpy
from anomalox.params import NON_NEGATIVE_INT, POSITIVE_INT, Interval, check

# Results are of the kind given: numpy arrays for numpy (or array-like) input, tensors for tensors.
ArrayT = TypeVar("ArrayT", np.ndarray, "torch.Tensor")

__all__ = [
    "GaussianAccumulator",
    "coreset",
    "coreset_coverage",
    "gaussian_blur",
    "gaussian_fit",
    "knn",
    "mahalanobis",
    "stitch",
    "tile_offsets",
    "upsample",
]


def knn(
    queries: ArrayT,
    bank: Any,
    k: int,
    metric: Literal["euclidean", "sqeuclidean"] = "euclidean",
    n_threads: int | None = None,
) -> tuple[ArrayT, ArrayT]:
    """Exact k nearest neighbours of each query row in ``bank``.

    Parameters
    ----------
    queries : array (M, D), float32
    bank : array (N, D), float32
    k : int
        Neighbours per query, ``1 <= k <= N``.
    metric : {"euclidean", "sqeuclidean"}
    n_threads : int, optional

    Returns
    -------
    distances : (M, k) float32, ascending per row
    indices : (M, k) int64 into ``bank``; ties go to the lower index

    Notes
    -----
    Blocked: the full M×N distance matrix is never formed. Memory beyond the inputs is
    O(N + threads · block²) plus a packed copy of ``bank`` when it is not C-contiguous.
    Candidates are ranked with ‖q‖² + ‖b‖² − 2 q·b; the returned distances of the k winners are
    recomputed directly as Σ(q − b)², so they do not suffer that expansion's cancellation.
    """
    q, q_torch = as_float32(queries, "queries", "(M, D)")
    b, _ = as_float32(bank, "bank", "(N, D)")
    k = int(check("k", k, [POSITIVE_INT]))
    dist, idx = _core.knn(q, b, k, metric, resolve_threads(n_threads))
    return same_kind(dist, q_torch), same_kind(idx, q_torch)


def _coreset_count(size: Any, n: int) -> int:
    if isinstance(size, bool):
        raise TypeError(f"size: expected an int count or a float ratio, got {size!r}")
    if isinstance(size, numbers.Integral):
        if not 1 <= int(size) <= n:
            raise ValueError(f"size: expected a count in [1, {n}] (the number of features), got {size}")
        return int(size)
    if isinstance(size, numbers.Real):
        if not 0.0 < float(size) <= 1.0:
            raise ValueError(f"size: expected a ratio in (0, 1], got {size}")
        return max(1, int(float(size) * n))
    raise TypeError(f"size: expected an int count or a float ratio, got {type(size).__name__}")


def coreset(
    features: ArrayT,
    size: int | float,
    projection_dim: int | None = 128,
    seed: int = 0,
    n_threads: int | None = None,
    overwrite_features: bool = False,
) -> ArrayT:
    """Greedy k-center (farthest point) coreset selection, as in PatchCore.

    Parameters
    ----------
    features : array (N, D), float32
    size : int or float
        A count in [1, N], or a ratio in (0, 1] giving ``max(1, int(ratio * N))``.
    projection_dim : int or None
        Select on a seeded Gaussian random projection to this many dimensions (faster, as in
        PatchCore); ``None`` selects in the original space. From 32 dimensions on, the
        projection decides which selected point each point is assigned to, and the next pick
        is the point farthest from its assigned point in the *original* space (see Notes).
    seed : int
        Seeds the projection and the starting point.
    overwrite_features : bool
        With ``projection_dim=None``, allow the selection to use ``features`` itself as its
        working copy when it is a writable C-contiguous float32 array (or CPU tensor): saves a
        copy of N × D floats, and leaves the rows of ``features`` reordered (as with scipy's
        ``overwrite_a``). Ignored otherwise. Same result either way.

    Returns
    -------
    indices : (size,) int64, in selection order, starting point first, no duplicates.

    Notes
    -----
    Deterministic for a seed, whatever ``n_threads``. Memory: N × projection_dim float32 for the
    projected features (with ``None``: a working copy of N × D, none with ``overwrite_features``)
    plus O(N); time at most O(size · N · projection_dim), usually far less (exact
    triangle-inequality pruning).

    Pick rule with a projection of ``projection_dim >= 32``: each point keeps the exact
    squared distance, in the original space, to the selected point it is assigned to (its
    nearest in the projected space), recomputed when that changes (about seven times per point
    in the benchmark); the pick is the largest. That distance bounds the point's true distance
    to the selection from above, so the selection's coverage (the largest distance from a point
    to its nearest selected point, in the original space) is driven down directly, instead of
    through projected distances that under-state some points' distances. Below 32 dimensions the
    projection mis-assigns too many points for this to help (a test set covered 3× worse at 4
    dimensions) and the pick is the largest projected distance. The original rows are read in
    place (copied once if not C-contiguous).
    """
    x, as_torch = as_float32(features, "features", "(N, D)")
    count = _coreset_count(size, x.shape[0])
    if projection_dim is not None:
        projection_dim = int(check("projection_dim", projection_dim, [POSITIVE_INT]))
    seed = int(check("seed", seed, [NON_NEGATIVE_INT])) % 2**64
    if overwrite_features and projection_dim is None and x.flags.c_contiguous and x.flags.writeable:
        idx = _core.coreset_in_place(x, count, seed, resolve_threads(n_threads))
    else:
        idx = _core.coreset(x, count, projection_dim, seed, resolve_threads(n_threads))
    return same_kind(idx, as_torch)


def coreset_coverage(features: Any, indices: Any, n_threads: int | None = None) -> float:
    """Max over rows of ``features`` of the Euclidean distance to the nearest selected row."""
    x, _ = as_float32(features, "features", "(N, D)")
    idx = as_int64(indices, "indices", x.shape[0])
    return float(_core.coreset_coverage(x, idx, resolve_threads(n_threads)))


def gaussian_fit(features: ArrayT, eps: float = 0.01, n_threads: int | None = None) -> tuple[ArrayT, ArrayT]:
    """Per-position Gaussian of feature maps (PaDiM): mean and inverse covariance.

    Parameters
    ----------
    features : array (B, C, H, W), float32, B >= 2
    eps : float
        Added to the covariance diagonal (regularisation), as in PaDiM.

    Returns
    -------
    mean : (H·W, C) float32
    inv_cov : (H·W, C, C) float32, inverse of the covariance (ddof=1) + eps·I

    Notes
    -----
    Accumulated in float64 and inverted through a Cholesky factorisation, in parallel over
    positions. Memory: H·W·C·(C+1)·8 bytes of float64 state plus the float32 outputs. For data
    that does not fit in one array, use :class:`GaussianAccumulator`.
    """
    x, as_torch = as_float32(features, "features", "(B, C, H, W)")
    mean, inv_cov = _core.gaussian_fit(x, _eps(eps), resolve_threads(n_threads))
    return same_kind(mean, as_torch), same_kind(inv_cov, as_torch)


def _eps(eps: Any) -> float:
    return float(check("eps", eps, [Interval(numbers.Real, 0, None, closed="left")]))


class GaussianAccumulator:
    """Streaming version of :func:`gaussian_fit`: feed batches with ``partial_fit``.

    The shape (C, H, W) is fixed by the first batch. Memory: H·W·C·(C+1)·8 bytes (float64 mean
    and centred scatter per position, merged batch by batch with Chan's pairwise update).

    Examples
    --------
    >>> acc = GaussianAccumulator()
    >>> for batch in loader:                        # doctest: +SKIP
    ...     acc.partial_fit(backbone(batch))
    >>> mean, inv_cov = acc.finalize(eps=0.01)      # doctest: +SKIP
    """

    def __init__(self, n_threads: int | None = None) -> None:
        self.n_threads = n_threads
        self._acc: Any = None
        self._torch = False

    @property
    def n_samples(self) -> int:
        return 0 if self._acc is None else self._acc.n_samples

    def partial_fit(self, features: Any) -> GaussianAccumulator:
        x, as_torch = as_float32(features, "features", "(B, C, H, W)")
        if self._acc is None:
            # The first batch fixes the shape only once it has been accepted: a refused batch
            # (NaN, say) leaves the accumulator as new.
            _, c, h, w = x.shape
            acc = _core.GaussianAccumulator(c, h, w)
            acc.update(x, resolve_threads(self.n_threads))
            self._acc, self._torch = acc, as_torch
            return self
        if tuple(x.shape[1:]) != self._acc.shape:
            raise ValueError(
                f"features: expected batches of shape (B, {', '.join(map(str, self._acc.shape))}) "
                f"like the first batch, got {tuple(x.shape)}"
            )
        self._acc.update(x, resolve_threads(self.n_threads))
        return self

    def state(self) -> tuple[np.ndarray, np.ndarray, int]:
        """Copies of the sufficient statistics: mean (H·W, C) float64, centred scatter
        (H·W, C, C) float64 (the sum of outer products of deviations from the mean), count."""
        if self._acc is None:
            raise ValueError("features: no batch was given to partial_fit; the accumulator holds no statistics")
        return self._acc.state()

    @classmethod
    def from_state(
        cls, mean: np.ndarray, scatter: np.ndarray, n: int, height: int, width: int, n_threads: int | None = None
    ) -> GaussianAccumulator:
        """An accumulator holding ``state()``'s statistics on a `height` × `width` grid."""
        acc = cls(n_threads=n_threads)
        acc._acc = _core.GaussianAccumulator.from_state(
            np.ascontiguousarray(mean, dtype=np.float64),
            np.ascontiguousarray(scatter, dtype=np.float64),
            int(n),
            int(height),
            int(width),
        )
        return acc

    def merge(self, other: GaussianAccumulator) -> GaussianAccumulator:
        """Absorb `other`'s statistics: the result is that of one accumulator given both sample sets.

        Chan et al.'s pairwise merge per position (exact up to float64 rounding; any merge order or
        tree gives the same statistics to rounding). `other` is left unchanged.
        """
        if not isinstance(other, GaussianAccumulator):
            raise TypeError(f"other: expected a GaussianAccumulator, got {type(other).__name__}")
        if other._acc is None:
            return self
        if self._acc is None:
            c, h, w = other._acc.shape
            self._acc = _core.GaussianAccumulator(c, h, w)
            self._torch = other._torch
        self._acc.merge(other._acc, resolve_threads(self.n_threads))
        return self

    def finalize(self, eps: float = 0.01) -> tuple[Any, Any]:
        """``(mean (H·W, C), inv_cov (H·W, C, C))`` of everything seen so far."""
        if self._acc is None:
            raise ValueError("features: no batch was given to partial_fit; need at least 2 samples")
        mean, inv_cov = self._acc.finalize(_eps(eps), resolve_threads(self.n_threads))
        return same_kind(mean, self._torch), same_kind(inv_cov, self._torch)


def mahalanobis(features: ArrayT, mean: Any, inv_cov: Any, n_threads: int | None = None) -> ArrayT:
    """Mahalanobis distance map ``sqrt((x − μ)ᵀ Σ⁻¹ (x − μ))`` at every position.

    Parameters
    ----------
    features : (B, C, H, W) float32
    mean : (H·W, C) float32
    inv_cov : (H·W, C, C) float32

    Returns
    -------
    (B, H, W) float32
    """
    x, as_torch = as_float32(features, "features", "(B, C, H, W)")
    mu, _ = as_float32(mean, "mean", "(H*W, C)")
    prec, _ = as_float32(inv_cov, "inv_cov", "(H*W, C, C)")
    return same_kind(_core.mahalanobis(x, mu, prec, resolve_threads(n_threads)), as_torch)


def upsample(
    maps: ArrayT,
    size: int | Sequence[int],
    mode: Literal["bilinear", "nearest"] = "bilinear",
    n_threads: int | None = None,
) -> ArrayT:
    """Resize anomaly maps (B, h, w) to ``size`` = (H, W) (or H for a square).

    ``"bilinear"`` equals ``torch.nn.functional.interpolate(..., mode="bilinear",
    align_corners=False)``; ``"nearest"`` equals its ``mode="nearest"``.
    """
    m, as_torch = as_float32(maps, "maps", "(B, h, w)")
    pair = (size, size) if isinstance(size, numbers.Integral) else size
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"size: expected an int or a pair of ints (H, W), got {size!r}")
    height, width = (int(check("size", s, [POSITIVE_INT])) for s in pair)
    return same_kind(_core.upsample(m, height, width, mode, resolve_threads(n_threads)), as_torch)


def gaussian_blur(maps: ArrayT, sigma: float = 4.0, n_threads: int | None = None) -> ArrayT:
    """Gaussian smoothing of each map (B, H, W).

    Separable, kernel radius ``int(4·sigma + 0.5)``, reflect padding: equal to
    ``scipy.ndimage.gaussian_filter(map, sigma, mode="reflect", truncate=4.0)``.
    """
    m, as_torch = as_float32(maps, "maps", "(B, H, W)")
    check("sigma", sigma, [Interval(numbers.Real, 0, None, closed="neither")])
    return same_kind(_core.gaussian_blur(m, float(sigma), resolve_threads(n_threads)), as_torch)


def _pair(value: Any, name: str) -> tuple[int, int]:
    """``(value, value)`` for an int, else the two positive ints of a pair."""
    pair = (value, value) if isinstance(value, numbers.Integral) else value
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{name}: expected an int or a pair of ints (rows, cols), got {value!r}")
    first, second = (int(check(name, v, [POSITIVE_INT])) for v in pair)
    return first, second


def _int64_array(x: Any, name: str, shape: tuple[int, ...], shape_doc: str) -> np.ndarray:
    """An int64 numpy view of integers `x` of exactly `shape`."""
    if is_tensor(x):
        if x.device.type != "cpu":
            raise ValueError(f"{name}: expected a CPU tensor, got one on {x.device}")
        x = tensor_to_numpy(x)
    arr = np.asarray(x)
    if arr.shape != shape:
        raise ValueError(f"{name}: expected shape {shape_doc} = {shape}, got {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integers, got dtype {arr.dtype}")
    lo, hi = arr.min(), arr.max()  # checked before the cast: uint64 could wrap
    if lo < 0 or hi > np.iinfo(np.int64).max:
        raise ValueError(f"{name}: expected non-negative int64 values, got {lo if lo < 0 else hi}")
    return arr.astype(np.int64, copy=False)


def stitch(
    tiles: ArrayT,
    offsets: Any,
    size: int | Sequence[int],
    image_index: Any = None,
    n_threads: int | None = None,
) -> ArrayT:
    """Stitch per-tile maps into whole maps, averaging where tiles overlap.

    Parameters
    ----------
    tiles : array (T, th, tw), float32
        One map per tile.
    offsets : integer array (T, 2)
        Top-left corner (row, col) of each tile in its output map, as :func:`tile_offsets` gives.
        Every tile must lie inside the output, and every output pixel must be covered by at least
        one tile: an uncovered pixel raises ``ValueError`` naming ``offsets`` and the pixel
        (there is no fill value).
    size : int or (H, W)
        Size of each output map.
    image_index : integer array (T,), optional
        Output image of each tile, for the tiles of several images in one call.
    n_threads : int, optional

    Returns
    -------
    (H, W) float32, or (N, H, W) with ``N = image_index.max() + 1`` when ``image_index`` is given.

    Notes
    -----
    Each pixel is the mean of the tile values covering it, summed in float64 in tile order (the
    result does not depend on ``n_threads``). Equal, up to the float32 rounding of the mean, to the
    numpy reference ``np.add.at(total, (image_index, rows, cols), tiles)`` and the same for a count,
    then ``total / count``. Memory: the float32 output plus, per thread, a float64 sum and a uint32
    count for a block of at most 65,536 output pixels.

    Examples
    --------
    >>> offsets = tile_offsets(600, 1000, tile_size=256, tile_stride=192)
    >>> maps = stitch(tile_maps, offsets, (600, 1000))  # doctest: +SKIP
    """
    t, as_torch = as_float32(tiles, "tiles", "(T, th, tw)")
    height, width = _pair(size, "size")
    off = _int64_array(offsets, "offsets", (t.shape[0], 2), "(T, 2)")
    if image_index is None:
        idx, n_images = None, 1
    else:
        idx = _int64_array(image_index, "image_index", (t.shape[0],), "(T,)")
        n_images = int(idx.max()) + 1
    out = _core.stitch(t, off, idx, n_images, height, width, resolve_threads(n_threads))
    return same_kind(out if image_index is not None else out[0], as_torch)


def tile_offsets(
    height: int,
    width: int,
    tile_size: int | Sequence[int],
    tile_stride: int | Sequence[int] | None = None,
) -> np.ndarray:
    """Top-left corners (row, col) of overlapping tiles covering a (height, width) image.

    Along each axis tiles start every ``tile_stride`` pixels, and a last tile flush with the
    border covers the remainder (it overlaps its neighbour by more when the stride does not divide
    the size evenly).

    Parameters
    ----------
    height, width : int
        Image size.
    tile_size : int or (th, tw)
        At most the image size.
    tile_stride : int or (sh, sw), optional
        At most ``tile_size``, so that tiles leave no gaps; default ``tile_size`` (no overlap
        except at the border).

    Returns
    -------
    (T, 2) int64, in row-major order; the input to :func:`stitch`.
    """
    h = int(check("height", height, [POSITIVE_INT]))
    w = int(check("width", width, [POSITIVE_INT]))
    th, tw = _pair(tile_size, "tile_size")
    sh, sw = _pair(tile_size if tile_stride is None else tile_stride, "tile_stride")
    if th > h or tw > w:
        raise ValueError(f"tile_size: expected at most the image size ({h}, {w}), got ({th}, {tw})")
    if sh > th or sw > tw:
        raise ValueError(
            f"tile_stride: expected at most tile_size ({th}, {tw}) so that tiles leave no gaps, got ({sh}, {sw})"
        )
    rows = [*range(0, h - th, sh), h - th]
    cols = [*range(0, w - tw, sw), w - tw]
    return np.array([(r, c) for r in rows for c in cols], dtype=np.int64).reshape(-1, 2)
