"""Declarative hyperparameter constraints, checked in one place.

Every detector states what each of its hyperparameters may be in one table, its class
attribute ``hyperparameter_constraints``::

    hyperparameter_constraints = {
        "lr": POSITIVE,                                   # a finite real > 0
        "epochs": POSITIVE_INT,                           # an int >= 1
        "grad_clip": (POSITIVE, None),                    # alternatives: > 0, or None
        "map_kernel": AllOf(POSITIVE_INT, ODD),           # every part must hold
        "score_mode": Options("mean", "max"),
    }

:func:`models.base.register` wraps every registered detector's ``__init__`` so that
:func:`check_hyperparameters` runs on the bound arguments (defaults applied) before the body:
a bad value is a :class:`~models.errors.ModelError` worded ``"<model>: <param> must be <what>,
got <value>"``, also when the detector is built on the meta device for costing. A table key
that is not an ``__init__`` parameter fails at registration.

What a table cannot say stays as code in the detector's ``__init__``, each with a comment:
checks that relate several hyperparameters (``min_lr <= lr``, ``l1_weight + ssim_weight > 0``,
``vit_embed_dim`` a multiple of ``vit_heads``), checks against the backbone and its layers
(PaDiM's ``n_features`` at most the layers' channels, CFA's ``gamma_d``, layer names), and
checks of the file system (``texture_dir`` a folder, weight files).

A bool is never a number here (``True`` is no learning rate), and reals must be finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from models.errors import ModelError, did_you_mean

__all__ = [
    "BOOL",
    "EVEN",
    "NON_NEGATIVE",
    "NON_NEGATIVE_INT",
    "ODD",
    "POSITIVE",
    "POSITIVE_INT",
    "UNIT_LEFT_CLOSED",
    "AllOf",
    "Constraint",
    "Interval",
    "Is",
    "Options",
    "Range",
    "Rule",
    "Satisfies",
    "SequenceOf",
    "check_hyperparameters",
    "describe",
    "is_integer",
    "is_real",
    "multiple_of",
]

Closed = Literal["left", "right", "both", "neither"]


def is_real(value: Any) -> bool:
    """Whether ``value`` is a finite int or float (a bool is not: ``True`` is no learning
    rate), the test every real-valued hyperparameter check starts from."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an int and not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


class Constraint:
    """One condition on a hyperparameter's value.

    ``description`` completes "<param> must be ..."; :meth:`problem` says which part failed,
    which for most constraints is the whole description.
    """

    description: str

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError

    def problem(self, value: Any) -> str | None:
        """None when ``value`` is accepted, else what it must be."""
        return None if self.accepts(value) else self.description


@dataclass(frozen=True)
class Interval(Constraint):
    """A number in a range: ``kind`` int (bools excluded) or float (any finite real, ints
    included); a None bound is unbounded; ``closed`` says which bounds are allowed values.

    An int interval is normalised to closed bounds (``> 0`` is ``>= 1``). ``note`` says why
    the range is what it is and ends the description in parentheses.
    """

    kind: type[int] | type[float]
    low: float | None
    high: float | None
    closed: Closed = "both"
    note: str = ""
    description: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in (int, float):
            raise TypeError(f"Interval kind must be int or float, got {self.kind!r}")
        if self.closed not in ("left", "right", "both", "neither"):
            raise ValueError(f"Interval closed must be left, right, both or neither: {self.closed}")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"Interval low {self.low} is above high {self.high}")
        if self.kind is int:
            for bound in (self.low, self.high):
                if bound is not None and not is_integer(bound):
                    raise TypeError(f"an int Interval needs int bounds, got {bound!r}")
            # Closed int bounds read better ("an int >= 1") and make one rendering suffice.
            if self.low is not None and self.closed in ("right", "neither"):
                object.__setattr__(self, "low", self.low + 1)
            if self.high is not None and self.closed in ("left", "neither"):
                object.__setattr__(self, "high", self.high - 1)
            object.__setattr__(self, "closed", "both")
        text = self._render()
        object.__setattr__(self, "description", f"{text} ({self.note})" if self.note else text)

    def _low_closed(self) -> bool:
        return self.closed in ("left", "both")

    def _high_closed(self) -> bool:
        return self.closed in ("right", "both")

    def _render(self) -> str:
        low, high = self.low, self.high
        if self.kind is int:
            if low is None and high is None:
                return "an int"
            if high is None:
                return "a positive int" if low == 1 else f"an int >= {low}"
            if low is None:
                return f"an int <= {high}"
            return f"an int in [{low}, {high}]"
        if low is None and high is None:
            return "a finite number"
        if high is None:
            return f"{'>=' if self._low_closed() else '>'} {low}"
        if low is None:
            return f"{'<=' if self._high_closed() else '<'} {high}"
        left = "[" if self._low_closed() else "("
        right = "]" if self._high_closed() else ")"
        return f"in {left}{low}, {high}{right}"

    def accepts(self, value: Any) -> bool:
        if not (is_integer(value) if self.kind is int else is_real(value)):
            return False
        if self.low is not None and not (
            value >= self.low if self._low_closed() else value > self.low
        ):
            return False
        return self.high is None or (
            value <= self.high if self._high_closed() else value < self.high
        )


class Options(Constraint):
    """One of a fixed set of values (compared by equality and type, so True is not 1)."""

    def __init__(self, *values: Any) -> None:
        if not values:
            raise ValueError("Options needs at least one value")
        self.values = values
        self.description = f"one of {', '.join(str(v) for v in values)}"

    def accepts(self, value: Any) -> bool:
        return any(type(value) is type(v) and value == v for v in self.values)

    def __repr__(self) -> str:
        return f"Options{self.values!r}"


class Is(Constraint):
    """An instance of ``kind``; ``Is(bool)`` reads "True or False"."""

    def __init__(self, kind: type, description: str | None = None) -> None:
        self.kind = kind
        if description is None:
            description = "True or False" if kind is bool else f"a {kind.__name__}"
        self.description = description

    def accepts(self, value: Any) -> bool:
        return isinstance(value, self.kind)

    def __repr__(self) -> str:
        return f"Is({self.kind.__name__})"


class Satisfies(Constraint):
    """A condition of its own, worded by ``description`` ("odd", "a multiple of 4").

    Used after a type check in :class:`AllOf`: the predicate may assume the type. A predicate
    that raises on a value rejects it.
    """

    def __init__(self, predicate: Callable[[Any], bool], description: str) -> None:
        self.predicate = predicate
        self.description = description

    def accepts(self, value: Any) -> bool:
        try:
            return bool(self.predicate(value))
        except (TypeError, ValueError, ArithmeticError):
            return False

    def __repr__(self) -> str:
        return f"Satisfies({self.description!r})"


class AllOf(Constraint):
    """Every part must hold; the first part that fails words the message, so that an even
    kernel size reads "must be odd" and a zero one "must be a positive int"."""

    def __init__(self, *parts: Constraint) -> None:
        if not parts:
            raise ValueError("AllOf needs at least one constraint")
        self.parts = parts
        self.description = " and ".join(p.description for p in parts)

    def accepts(self, value: Any) -> bool:
        return all(p.accepts(value) for p in self.parts)

    def problem(self, value: Any) -> str | None:
        for part in self.parts:
            problem = part.problem(value)
            if problem is not None:
                return problem
        return None

    def __repr__(self) -> str:
        return f"AllOf{self.parts!r}"


class SequenceOf(Constraint):
    """A list or tuple (not a string) whose every item meets ``item``, of exactly ``length``
    items when given, else of at least ``min_length``."""

    def __init__(self, item: Constraint, *, length: int | None = None, min_length: int = 0):
        self.item = item
        self.length = length
        self.min_length = min_length
        if length is not None:
            size = f"a sequence of {length} items"
        elif min_length == 1:
            size = "a non-empty sequence"
        elif min_length > 1:
            size = f"a sequence of at least {min_length} items"
        else:
            size = "a sequence"
        self.description = f"{size}, each {item.description}"

    def accepts(self, value: Any) -> bool:
        if not isinstance(value, Sequence) or isinstance(value, str | bytes):
            return False
        if self.length is not None and len(value) != self.length:
            return False
        return len(value) >= self.min_length and all(self.item.accepts(v) for v in value)

    def __repr__(self) -> str:
        return f"SequenceOf({self.item!r}, length={self.length}, min_length={self.min_length})"


class Range(Constraint):
    """A pair ``(low, high)`` of reals with ``lower <= low <= high <= upper``: a range to draw
    from (the blend factor of a synthetic anomaly)."""

    def __init__(self, lower: float, upper: float) -> None:
        self.lower, self.upper = lower, upper
        self.description = f"a range (low, high) in [{lower}, {upper}]"

    def accepts(self, value: Any) -> bool:
        if not isinstance(value, Sequence) or isinstance(value, str | bytes) or len(value) != 2:
            return False
        low, high = value
        return is_real(low) and is_real(high) and self.lower <= low <= high <= self.upper

    def __repr__(self) -> str:
        return f"Range({self.lower}, {self.upper})"


Rule = Constraint | tuple[Constraint | None, ...]
"""A table entry: one constraint, or a tuple of alternatives (any may hold; None allows None)."""

POSITIVE = Interval(float, 0, None, closed="neither")
"""A finite real > 0 (learning rates, clamps)."""
NON_NEGATIVE = Interval(float, 0, None, closed="left")
"""A finite real >= 0 (weight decays, loss weights, blur sigmas)."""
UNIT_LEFT_CLOSED = Interval(float, 0, 1, closed="left")
"""A real in [0, 1) (Adam's betas, quantiles, ratios that must leave something)."""
POSITIVE_INT = Interval(int, 1, None, closed="left")
"""An int >= 1 (epochs, channels, block counts)."""
NON_NEGATIVE_INT = Interval(int, 0, None, closed="left")
"""An int >= 0 (counts that may be zero)."""
BOOL = Is(bool)
"""True or False (not 0 or "yes")."""
ODD = Satisfies(lambda value: value % 2 == 1, "odd")
"""Odd (a kernel with a centre); put after an int interval in :class:`AllOf`."""
EVEN = Satisfies(lambda value: value % 2 == 0, "even")
"""Even (channels split in two halves); put after an int interval in :class:`AllOf`."""


def multiple_of(n: int, why: str = "") -> Satisfies:
    """A multiple of ``n``, with ``why`` in parentheses; put after an int interval in
    :class:`AllOf`."""
    description = f"a multiple of {n} ({why})" if why else f"a multiple of {n}"
    return Satisfies(lambda value: value % n == 0, description)


def _alternatives(rule: Rule) -> tuple[Constraint | None, ...]:
    return rule if isinstance(rule, tuple) else (rule,)


def describe(rule: Rule) -> str:
    """What a value under ``rule`` must be: "> 0", "a positive int or None"."""
    parts = ["None" if c is None else c.description for c in _alternatives(rule)]
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} or {parts[-1]}"


def _problem(rule: Rule, value: Any) -> str | None:
    alternatives = _alternatives(rule)
    if value is None and None in alternatives:
        return None
    constraints = [c for c in alternatives if c is not None]
    if any(c.accepts(value) for c in constraints):
        return None
    # A single constraint says which of its parts failed; alternatives list every way to pass.
    if len(alternatives) == 1:
        return constraints[0].problem(value)
    return describe(rule)


def check_hyperparameters(
    model: str, constraints: Mapping[str, Rule], values: Mapping[str, Any]
) -> None:
    """Raise :class:`ModelError` for the first of ``values`` its rule in ``constraints``
    rejects: ``"<model>: <param> must be <what>, got <value>"``, with a "did you mean" hint for
    a misspelt option. Parameters without a rule, and rules without a value (a partial
    configuration), are not checked."""
    for param, rule in constraints.items():
        if param not in values:
            continue
        value = values[param]
        problem = _problem(rule, value)
        if problem is None:
            continue
        hint = ""
        if isinstance(value, str):
            options = [
                str(v) for c in _alternatives(rule) if isinstance(c, Options) for v in c.values
            ]
            hint = did_you_mean(value, options)
        raise ModelError(f"{model}: {param} must be {problem}, got {value!r}{hint}")
