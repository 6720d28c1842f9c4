"""Every exception anomalox raises on purpose, in one hierarchy; catch by kind, not by message.

- :class:`AnomaloxError`: the base of anomalox's own exceptions.
- :class:`KernelArgumentError` (also a ``ValueError``): a kernel refused an argument; ``.arg`` is
  the argument's name (as the function's signature spells it).
- :class:`InternalError` (also a ``RuntimeError``): an internal failure (a Rust panic); please
  report it with the message.
- :class:`ModelFileError` (also a ``ValueError``): a file that is not a readable anomalox model
  (a pickle, truncated, tampered with, or an incompatible format).
- :class:`NotFittedError`: scikit-learn's, re-exported; a detector used before ``fit``.
- :class:`CalibrationWarning` (a ``UserWarning``, not an exception): too few calibration images
  for the false-alarm rate asked for (``contamination``); the threshold is then the largest
  calibration score and the warning states the rate that is achievable.

Bad arguments to the Python API raise plain ``ValueError`` / ``TypeError`` naming the argument
("``arg: expected X, got Y``").
"""

from __future__ import annotations

from sklearn.exceptions import NotFittedError

__all__ = [
    "AnomaloxError",
    "CalibrationWarning",
    "InternalError",
    "KernelArgumentError",
    "ModelFileError",
    "NotFittedError",
]


class AnomaloxError(Exception):
    """Base class of the exceptions anomalox defines."""


class KernelArgumentError(AnomaloxError, ValueError):
    """A kernel refused an argument: wrong shape, size or value (NaN, out of range).

    Attributes
    ----------
    arg : str
        The name of the offending argument, as the public function names it.
    """

    def __init__(self, message: str, arg: str = "") -> None:
        super().__init__(message)
        self.arg = arg

    def __reduce__(self) -> tuple[type[KernelArgumentError], tuple[str, str]]:
        # Keep `.arg` through pickling (multiprocessing, joblib).
        return (type(self), (str(self), self.arg))


class InternalError(AnomaloxError, RuntimeError):
    """An internal failure (a Rust panic) in anomalox. Please report it with the message."""


class ModelFileError(AnomaloxError, ValueError):
    """A file that is not a readable anomalox detector (wrong format, corrupt, incompatible)."""


class CalibrationWarning(UserWarning):
    """Too few calibration scores for the conformal threshold at the requested ``contamination``.

    With n calibration scores the smallest false-alarm rate a conformal threshold can promise is
    1 / (n + 1); below it the threshold falls back to the largest calibration score.
    """
