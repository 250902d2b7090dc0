"""The declarative hyperparameter checks: each constraint kind, the message format, and every
registered detector's table against its ``__init__``."""

from __future__ import annotations

import inspect
import math
import re
from typing import Any, ClassVar

import pytest

import models
from models.base import Detector, get_class, register
from models.constraints import (
    BOOL,
    EVEN,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    ODD,
    POSITIVE,
    POSITIVE_INT,
    UNIT_LEFT_CLOSED,
    AllOf,
    Interval,
    Is,
    Options,
    Range,
    Rule,
    Satisfies,
    SequenceOf,
    check_hyperparameters,
    describe,
    multiple_of,
)
from models.costs import build_on_meta
from models.errors import ModelError

EXEMPT = {
    "seed": "any int: it only seeds generators, as it always has",
    "pretrained": "a flag the backbone reads; unchecked, as it always has been",
}
"""Numeric hyperparameters a detector need not constrain, and why."""


def check(rule: Rule, value: Any) -> None:
    check_hyperparameters("model", {"param": rule}, {"param": value})


def rejects(rule: Rule, value: Any) -> str:
    with pytest.raises(ModelError) as caught:
        check(rule, value)
    return str(caught.value)


@pytest.mark.parametrize(
    ("rule", "good", "bad", "what"),
    [
        (POSITIVE, [1e-300, 1, 2.5], [0, 0.0, -1e-9], "> 0"),
        (NON_NEGATIVE, [0, 0.0, 3], [-1e-12, -1], ">= 0"),
        (UNIT_LEFT_CLOSED, [0, 0.999999], [1, 1.0, -0.1], "in [0, 1)"),
        (Interval(float, 0, 1, closed="right"), [1, 1e-9], [0, 1.0000001], "in (0, 1]"),
        (Interval(float, 0, 1, closed="neither"), [0.5], [0, 1], "in (0, 1)"),
        (Interval(float, 0, 1), [0, 1], [-0.1, 1.1], "in [0, 1]"),
        (Interval(float, None, 3, closed="right"), [-1e9, 3], [3.01], "<= 3"),
        (POSITIVE_INT, [1, 10**9], [0, -1], "a positive int"),
        (NON_NEGATIVE_INT, [0, 5], [-1], "an int >= 0"),
        (Interval(int, 2, None), [2, 3], [1], "an int >= 2"),
        (Interval(int, 2, 4), [2, 4], [1, 5], "an int in [2, 4]"),
        (Interval(int, 0, None, closed="neither"), [1], [0], "a positive int"),
        (Options("mean", "max"), ["mean", "max"], ["median", "Mean", 1], "one of mean, max"),
        (BOOL, [True, False], [0, 1, "yes", None], "True or False"),
        (Is(str, "a folder path"), ["/x"], [3, None], "a folder path"),
        (multiple_of(4), [0, 8], [6], "a multiple of 4"),
    ],
)
def test_each_constraint_accepts_its_edges_and_rejects_just_outside(rule, good, bad, what):
    for value in good:
        check(rule, value)
    for value in bad:
        # Options may add a "did you mean" hint after the value.
        assert rejects(rule, value).startswith(f"model: param must be {what}, got {value!r}")


@pytest.mark.parametrize("rule", [POSITIVE, NON_NEGATIVE, UNIT_LEFT_CLOSED, POSITIVE_INT])
@pytest.mark.parametrize("value", [True, False])
def test_a_bool_is_no_number(rule, value):
    assert rejects(rule, value).endswith(f"got {value!r}")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "1", None, [1.0]])
def test_reals_are_finite_numbers(value):
    rejects(NON_NEGATIVE, value)


def test_int_intervals_take_ints_only():
    assert rejects(POSITIVE_INT, 2.0) == "model: param must be a positive int, got 2.0"
    assert rejects(POSITIVE_INT, 2.5) == "model: param must be a positive int, got 2.5"
    check(POSITIVE, 3)  # a real interval takes ints


def test_none_only_where_the_rule_allows_it():
    check((POSITIVE, None), None)
    check((POSITIVE_INT, None), 3)
    assert rejects(POSITIVE, None) == "model: param must be > 0, got None"
    assert rejects((POSITIVE, None), 0) == "model: param must be > 0 or None, got 0"
    assert rejects((POSITIVE_INT, None), True) == (
        "model: param must be a positive int or None, got True"
    )


def test_all_of_reports_the_first_part_that_fails():
    odd_kernel = AllOf(POSITIVE_INT, ODD)
    for value in (1, 3, 21):
        check(odd_kernel, value)
    assert rejects(odd_kernel, 4) == "model: param must be odd, got 4"
    assert rejects(odd_kernel, 0) == "model: param must be a positive int, got 0"
    assert rejects(odd_kernel, 3.0) == "model: param must be a positive int, got 3.0"
    assert rejects(AllOf(POSITIVE_INT, EVEN), 7) == "model: param must be even, got 7"


def test_satisfies_rejects_what_its_predicate_cannot_handle():
    assert (
        rejects(Satisfies(lambda v: v % 2 == 0, "even"), "x")
        == "model: param must be even, got 'x'"
    )


def test_sequences_and_ranges():
    dims = SequenceOf(POSITIVE_INT, min_length=1)
    check(dims, (1,))
    check(dims, [512, 128])
    for bad in ((), (512, 0), (1, True), "12", 3):
        assert rejects(dims, bad).startswith(
            "model: param must be a non-empty sequence, each a positive int, got "
        )
    pair = SequenceOf(UNIT_LEFT_CLOSED, length=2)
    check(pair, (0, 0.9))
    assert rejects(pair, (0.5, 1.0)) == (
        "model: param must be a sequence of 2 items, each in [0, 1), got (0.5, 1.0)"
    )
    rejects(pair, (0.5,))
    beta = Range(0, 1)
    check(beta, (0.1, 1.0))
    check(beta, [0.5, 0.5])
    for bad in ((0.8, 0.2), (0.1, 1.5), (-0.1, 0.5), (0.1,), "ab", (True, 1)):
        assert rejects(beta, bad).startswith("model: param must be a range (low, high) in [0, 1]")


def test_messages_name_the_model_and_hint_a_misspelt_option():
    with pytest.raises(ModelError, match=r"^dfm: score_type must be one of fre, nll, got 'nl'"):
        models.create("dfm", pretrained=False, score_type="nl")
    message = rejects(Options("mean", "max"), "maen")
    assert message == "model: param must be one of mean, max, got 'maen'; did you mean 'mean'?"


def test_notes_say_why():
    rule = Interval(int, 2, None, note="a density needs two points")
    assert describe(rule) == "an int >= 2 (a density needs two points)"
    assert describe((POSITIVE, None)) == "> 0 or None"
    assert describe((POSITIVE_INT, BOOL, None)) == "a positive int, True or False or None"


def test_values_without_a_rule_and_rules_without_a_value_are_not_checked():
    check_hyperparameters("model", {"lr": POSITIVE}, {"other": -1})
    check_hyperparameters("model", {}, {"lr": -1})


def test_checks_stop_at_the_first_bad_value_in_table_order():
    with pytest.raises(ModelError, match=r"^model: a must be"):
        check_hyperparameters("model", {"a": POSITIVE, "b": POSITIVE}, {"b": 0, "a": 0})


def test_bad_interval_definitions_are_refused():
    with pytest.raises(ValueError):
        Interval(float, 1, 0)
    with pytest.raises(ValueError):
        Interval(float, 0, 1, closed="open")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Interval(int, 0.5, None)
    with pytest.raises(TypeError):
        Interval(str, 0, 1)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the zoo


def _parameters(cls: type[Detector]) -> dict[str, inspect.Parameter]:
    return {k: p for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}


def _is_numeric(parameter: inspect.Parameter) -> bool:
    annotation = str(parameter.annotation)
    default = parameter.default
    return bool(re.search(r"\b(int|float|bool)\b", annotation)) or (
        isinstance(default, int | float) and default is not inspect.Parameter.empty
    )


@pytest.mark.parametrize("name", models.list_models())
def test_every_numeric_hyperparameter_is_constrained(name):
    cls = get_class(name)
    table = cls.hyperparameter_constraints
    unconstrained = [
        k
        for k, p in _parameters(cls).items()
        if _is_numeric(p) and k not in table and k not in EXEMPT
    ]
    assert not unconstrained, f"{name} does not constrain {unconstrained}"


@pytest.mark.parametrize("name", models.list_models())
def test_table_keys_are_init_parameters_and_defaults_pass(name):
    cls = get_class(name)
    parameters = _parameters(cls)
    assert set(cls.hyperparameter_constraints) <= set(parameters)
    # The signature's defaults meet the table (else the detector could not be built bare).
    defaults = {k: p.default for k, p in parameters.items() if p.default is not p.empty}
    check_hyperparameters(name, cls.hyperparameter_constraints, defaults)


def test_a_misspelt_table_key_fails_at_registration():
    class Misspelt(Detector):
        hyperparameter_constraints: ClassVar[dict[str, Rule]] = {"lrr": POSITIVE}

        def __init__(self, lr: float = 1e-3) -> None:
            super().__init__()

    with pytest.raises(TypeError, match="constrains lrr, which its __init__ does not take"):
        register("misspelt_for_test")(Misspelt)
    assert "misspelt_for_test" not in models.list_models()


def test_the_check_runs_for_every_way_of_building():
    cls = get_class("padim")
    with pytest.raises(ModelError, match=r"^padim: covariance_eps must be > 0, got 0"):
        cls(pretrained=False, covariance_eps=0)
    with pytest.raises(ModelError, match=r"^padim: blur_sigma must be >= 0, got -1"):
        models.create("padim", pretrained=False, blur_sigma=-1)
    # Positional arguments are bound to their names first.
    with pytest.raises(ModelError, match=r"^padim: n_features must be a positive int or None"):
        cls("resnet18", ("layer1",), 0, pretrained=False)


def test_meta_device_builds_are_checked_too():
    with pytest.raises(ModelError, match=r"^stfpm: lr must be > 0, got 0"):
        build_on_meta(get_class("stfpm"), {"lr": 0})
