"""Split-conformal calibration: thresholds, p-values and normalised scores from good-image scores.

With n calibration scores s_1..s_n of good images and a new good image's score S, exchangeable
(the n + 1 images drawn alike), the rank of S among the n + 1 scores is uniform (ties only lower
the chance of a strict exceedance). So for the k-th smallest calibration score s_(k),

    P(S > s_(k)) <= (n + 1 - k) / (n + 1) <= alpha   when   k = ceil((n + 1)(1 - alpha)),

the conformal threshold (Vovk et al. 2005; Angelopoulos & Bates 2021, eq. 1). The decision must be
``S > s_(k)``: ``S >= s_(k)`` adds the event S = s_(k) (probability 1 / (n + 1) with continuous
scores) and breaks the bound. It exists only when k <= n, that is n + 1 >= 1 / alpha.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from anomalox.exceptions import CalibrationWarning

__all__ = ["calibration_cdf", "conformal_rank", "conformal_threshold", "p_values"]


def conformal_rank(n: int, alpha: float) -> int:
    """k = ⌈(n + 1)(1 − alpha)⌉: the rank (1-based) of the conformal threshold among n scores."""
    # The tiny slack keeps (n + 1)(1 - alpha) that is an integer in exact arithmetic (n = 19,
    # alpha = 0.05: 19.000000000000004 in floats) from rounding up one rank too far.
    return math.ceil((n + 1) * (1.0 - alpha) - 1e-9)


def conformal_threshold(
    scores: np.ndarray, alpha: float, what: str = "threshold_", warn: bool = True, stacklevel: int = 2
) -> float:
    """The ⌈(n + 1)(1 − alpha)⌉-th smallest of `scores` (see the module docstring).

    When that rank exceeds n the largest score is returned and (with `warn`) a
    ``CalibrationWarning`` states the rate achievable with n scores, 1 / (n + 1), and the ways
    out. `what` names the threshold in the warning; `stacklevel` is ``warnings.warn``'s.
    """
    ordered = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    n = ordered.size
    if n == 0:
        raise ValueError(f"{what}: expected at least one calibration score, got none")
    k = conformal_rank(n, alpha)
    if k > n and warn:
        warnings.warn(
            f"{what}: {n} calibration image{'s' if n != 1 else ''} cannot support contamination={alpha:g}: "
            f"the smallest false-alarm rate a conformal threshold can promise with n={n} is 1/(n+1) = "
            f"{1.0 / (n + 1):.3g}, so {what} is the largest calibration score (no guarantee at {alpha:g}). "
            f"Use at least {math.ceil(1.0 / alpha) - 1} calibration images (more images, or calibration='cv', "
            f"which calibrates on every training image) or a larger contamination (>= {1.0 / (n + 1):.3g})",
            CalibrationWarning,
            stacklevel=stacklevel,
        )
    k = min(k, n)
    return float(ordered[max(k, 1) - 1])


def p_values(calibration: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Conformal p-values (1 + #{calibration >= s}) / (n + 1), float64, for each score s.

    Under exchangeability P(p <= alpha) <= alpha for a good image; p <= alpha exactly when
    s > the conformal threshold at alpha (when that threshold exists).
    """
    ordered = np.sort(np.asarray(calibration, dtype=np.float64).ravel())
    s = np.asarray(scores, dtype=np.float64)
    at_least = ordered.size - np.searchsorted(ordered, s, side="left")
    return (1.0 + at_least) / (ordered.size + 1.0)


def calibration_cdf(calibration: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The empirical CDF of the calibration scores at each score: #{calibration <= s} / n, in [0, 1]."""
    ordered = np.sort(np.asarray(calibration, dtype=np.float64).ravel())
    s = np.asarray(scores, dtype=np.float64)
    return np.searchsorted(ordered, s, side="right") / float(ordered.size)
