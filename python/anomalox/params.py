"""Parameter constraints declared as data, and the one validator that checks them.

Estimators declare what each parameter may be in a table, as scikit-learn's
``_parameter_constraints`` do::

    {"num_neighbors": [Interval(Integral, 1, None, closed="left")],
     "projection_dim": [Interval(Integral, 1, None, closed="left"), Hidden(None)],
     "score": [Options({"fre", "nll"})]}

A value is valid when it satisfies any constraint of its list. Otherwise ``ValueError`` says
"``name: expected <the visible constraints, joined by 'or'>, got <repr of the value>``". A
constraint is an :class:`Interval`, an :class:`Options`, ``None`` (the value None), a type, a
:class:`Hidden` constraint (accepted but not named in the message), or :class:`Unchecked`
(validated elsewhere, named by ``where``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

__all__ = [
    "NON_NEGATIVE_INT",
    "POSITIVE_INT",
    "Hidden",
    "Interval",
    "Options",
    "Unchecked",
    "check",
    "describe",
    "validate_params",
]


class Interval:
    """Numbers of type `kind` (``numbers.Integral`` or ``numbers.Real``) between `left` and `right`.

    ``None`` bounds are open-ended; `closed` says which given bounds belong to the interval. Bools
    are never numbers here, and a Real interval holds finite values only.
    """

    def __init__(
        self,
        kind: type,
        left: float | None,
        right: float | None,
        *,
        closed: Literal["left", "right", "both", "neither"],
    ) -> None:
        if kind not in (numbers.Integral, numbers.Real):
            raise ValueError(f"kind: expected numbers.Integral or numbers.Real, got {kind!r}")
        if closed not in ("left", "right", "both", "neither"):
            raise ValueError(f"closed: expected 'left', 'right', 'both' or 'neither', got {closed!r}")
        self.kind: Any = kind  # Any: numbers' ABCs declare no comparison operators
        self.left, self.right, self.closed = left, right, closed

    def is_satisfied_by(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, self.kind):
            return False
        if self.kind is numbers.Real and not math.isfinite(value):
            return False
        if self.left is not None:
            if value < self.left or (value == self.left and self.closed not in ("left", "both")):
                return False
        if self.right is not None:
            if value > self.right or (value == self.right and self.closed not in ("right", "both")):
                return False
        return True

    def __str__(self) -> str:
        if self.kind is numbers.Integral and self.right is None and self.left in (0, 1) and self.closed == "left":
            return "a positive integer" if self.left == 1 else "a non-negative integer"
        if self.right is None and self.left is not None:
            return f"a finite number {'>=' if self.closed in ('left', 'both') else '>'} {self.left}"
        what = "an integer" if self.kind is numbers.Integral else "a number"
        low = "[" if self.closed in ("left", "both") else "("
        high = "]" if self.closed in ("right", "both") else ")"
        left = "-inf" if self.left is None else self.left
        right = "inf" if self.right is None else self.right
        return f"{what} in {low}{left}, {right}{high}"


class Options:
    """One of a fixed set of values (strings are shown quoted, in sorted order)."""

    def __init__(self, values: Iterable[Any]) -> None:
        self.values = frozenset(values)

    def is_satisfied_by(self, value: Any) -> bool:
        try:
            return value in self.values
        except TypeError:  # unhashable
            return False

    def __str__(self) -> str:
        shown = sorted(repr(v) for v in self.values)
        return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " or " + shown[-1]


class Hidden:
    """A constraint that is accepted but not named in the error message (a special case)."""

    def __init__(self, constraint: Any) -> None:
        self.constraint = constraint


class Unchecked:
    """A parameter checked elsewhere (`where`, e.g. ``"anomalox.Backbone"``), not by this table."""

    def __init__(self, where: str) -> None:
        self.where = where


POSITIVE_INT = Interval(numbers.Integral, 1, None, closed="left")
NON_NEGATIVE_INT = Interval(numbers.Integral, 0, None, closed="left")


def _satisfies(constraint: Any, value: Any) -> bool:
    if isinstance(constraint, Hidden):
        return _satisfies(constraint.constraint, value)
    if isinstance(constraint, Unchecked):
        return True
    if constraint is None:
        return value is None
    if isinstance(constraint, type):
        return isinstance(value, constraint)
    return bool(constraint.is_satisfied_by(value))


def describe(constraints: Sequence[Any]) -> str:
    """What the constraints accept, as the error message says it ("a positive integer or None")."""
    parts = []
    for c in constraints:
        if isinstance(c, (Hidden, Unchecked)):
            continue
        parts.append("None" if c is None else c.__name__ if isinstance(c, type) else str(c))
    return " or ".join(parts)


def check(name: str, value: Any, constraints: Sequence[Any]) -> Any:
    """`value` unchanged when it satisfies one of `constraints`; ``ValueError`` naming `name` otherwise."""
    if not any(_satisfies(c, value) for c in constraints):
        raise ValueError(f"{name}: expected {describe(constraints)}, got {value!r}")
    return value


def validate_params(constraints: Mapping[str, Sequence[Any]], params: Mapping[str, Any]) -> None:
    """Check every parameter in `params` against its entry in `constraints` (a missing entry is a bug)."""
    for name, value in params.items():
        if name not in constraints:
            raise KeyError(f"{name}: no constraint is declared for this parameter")
        check(name, value, constraints[name])
