"""Property-based fuzzing of the study schema and ``--set`` (Hypothesis).

Random mutations of the shipped study files (keys deleted, values replaced by random scalars,
lists, mappings, text, huge integers, floats, None and NaN, keys renamed with typos, ``--set``
overrides of random keys with random values) must each either validate as ``sweep validate``
does, smoke form, trial expansion and config hashes included, or fail as bad input (what the
CLI turns into exit 2 and a message naming the file): never with another exception, which the
CLI would print as a traceback. About a fifth of the examples validate, the rest are refused.

Derandomized (the same examples on every run): 100 examples in make test (~7 s on 2 busy
cores), 1500 in the slow stage (~80 s).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import sweep.run.study as study_module
from sweep.cli import _user_errors
from sweep.errors import StudyError
from sweep.run.smoke import smoke_form
from sweep.run.space import DISTRIBUTIONS, TRIAL_KEYS, split_key
from sweep.run.study import (
    UniqueKeyLoader,
    check_hyperparameters,
    config_hash,
    expand_trials,
    load_study,
)

STUDIES = sorted((Path(__file__).resolve().parents[1] / "studies").glob("*.yaml"))
RAW = {path.name: yaml.load(path.read_text(), Loader=UniqueKeyLoader) for path in STUDIES}

# Values with a meaning somewhere in a study, beside random ones.
WORDS: tuple[str, ...] = (
    "native",
    "seed",
    "auto",
    "none",
    "padim",
    "patchcore",
    "stfpm",
    "resnet18",
    "grid",
    "optuna",
    "1e23",
    "",
    "~",
    "[",
    "{a: 1, a: 2}",
)
EXTREMES = (2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, -1, 0)
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)


def _values(huge: bool) -> st.SearchStrategy[Any]:
    """Random values: scalars, lists, mappings, distributions; with ``huge``, integers and
    floats of any size.

    Detectors' own hyperparameters get moderate numbers only: a detector sizes its modules
    from them (FastFlow's flow_steps=2**31 asks its constructor for 16 GiB), and bounding them
    is the detector's business, not the schema's (its checks here refuse nonsense types and
    signs, which moderate values reach).
    """
    numbers = (
        st.one_of(st.integers(), st.sampled_from(EXTREMES), st.floats())
        if huge
        else st.one_of(
            st.floats(-1e3, 1e3), st.sampled_from([float("nan"), float("inf"), -float("inf")])
        )
    )
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(-3, 64), numbers, TEXT, st.sampled_from(WORDS)
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3),
            st.dictionaries(st.one_of(TEXT, st.sampled_from(DISTRIBUTIONS)), inner, max_size=3),
            st.builds(lambda kind, args: {kind: args}, st.sampled_from(DISTRIBUTIONS), inner),
        ),
        max_leaves=6,
    )


VALUES = _values(huge=True)
MODERATE_VALUES = _values(huge=False)


def _is_hyperparameter(dotted: str) -> bool:
    """Whether a --set key names a detector hyperparameter (a space key, not a trial key)."""
    space, dot, key = dotted.partition(".")
    return space == "space" and bool(dot) and split_key(key).name not in TRIAL_KEYS


def _paths(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every key path of a raw study (mapping keys and list indices)."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        yield (*prefix, key)
        if isinstance(value, (dict, list)):
            yield from _paths(value, (*prefix, key))


def _dotted(path: tuple) -> str:
    """A key path as --set names it (everything after ``space.`` is one space key)."""
    if path[0] == "space" and len(path) > 1:
        return f"space.{path[1]}"
    return ".".join(str(part) for part in path)


def _typo(key: str, kind: str, position: int) -> str:
    if not key:
        return "x"
    i = position % len(key)
    if kind == "drop":
        return key[:i] + key[i + 1 :] or "x"
    if kind == "double":
        return key[:i] + key[i] + key[i:]
    if kind == "swap" and len(key) > 1:
        j = min(i + 1, len(key) - 1)
        chars = list(key)
        chars[i], chars[j] = chars[j], chars[i]
        return "".join(chars)
    return key + "s"


def _leaves(node: Any) -> Iterator[Any]:
    for value in node.values() if isinstance(node, dict) else node:
        if isinstance(value, (dict, list)):
            yield from _leaves(value)
        else:
            yield value


# Every word and space key the shipped studies use: plausible values and --set keys.
WORDS += tuple(sorted({v for raw in RAW.values() for v in _leaves(raw) if isinstance(v, str)}))
KEYS = sorted({_dotted(p) for raw in RAW.values() for p in _paths(raw)})


@st.composite
def _near(draw: st.DrawFn, value: Any, huge: bool = True) -> Any:
    """A value like ``value``: of its type, at its edges, or a list with one element less or
    more; what gets past a first look at the type (``huge``: see :func:`_values`)."""
    if isinstance(value, bool):
        return draw(st.one_of(st.booleans(), st.none()))
    if isinstance(value, int):
        edges = st.sampled_from(EXTREMES) if huge else st.integers(-3, 64)
        return draw(st.one_of(st.integers(-2, max(-2, min(2 * value + 2, 4096))), edges))
    if isinstance(value, float):
        other = st.floats() if huge else _values(huge=False).filter(lambda v: isinstance(v, float))
        return draw(st.one_of(other, st.just(value * 10)))
    if isinstance(value, str):
        return draw(st.sampled_from(WORDS))
    if isinstance(value, list) and value:
        i = draw(st.integers(0, len(value) - 1))
        return draw(st.sampled_from([value[:i] + value[i + 1 :], [*value, value[i]], value[i:]]))
    if isinstance(value, dict) and value:
        key = draw(st.sampled_from(sorted(value, key=str)))
        return {**value, key: draw(_near(value[key], huge))}
    return draw(VALUES if huge else MODERATE_VALUES)


def _yaml(value: Any) -> str:
    """``value`` as one line of YAML, as a --set value is written."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")


@st.composite
def mutated_studies(draw: st.DrawFn) -> tuple[str, dict, list[str]]:
    """A shipped study's raw mapping, mutated once or twice, and --set overrides."""
    name = draw(st.sampled_from(sorted(RAW)))
    raw = copy.deepcopy(RAW[name])
    overrides: list[str] = []
    for _ in range(draw(st.sampled_from([1, 1, 1, 2]))):
        kind = draw(st.sampled_from(["near", "near", "replace", "delete", "rename", "set", "set"]))
        paths = list(_paths(raw))
        if kind == "set" or not paths:
            key = draw(st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS), TEXT))
            current = functools.reduce(
                lambda node, part: node.get(part) if isinstance(node, dict) else None,
                key.split(".", 1) if key.startswith("space.") else key.split("."),
                raw,
            )
            huge = not _is_hyperparameter(key)
            value = draw(st.one_of(_near(current, huge), VALUES if huge else MODERATE_VALUES))
            text = draw(st.one_of(st.just(_yaml(value)), st.just(_yaml(value)), TEXT))
            overrides.append(f"{key}={text}")
            continue
        path = draw(st.sampled_from(paths))
        parent = functools.reduce(lambda node, part: node[part], path[:-1], raw)
        key = path[-1]
        huge = not _is_hyperparameter(_dotted(path))
        if kind == "delete":
            del parent[key]
        elif kind == "near":
            parent[key] = draw(_near(parent[key], huge))
        elif kind == "replace":
            parent[key] = draw(VALUES if huge else MODERATE_VALUES)
        elif isinstance(parent, dict):
            typo = _typo(
                str(key),
                draw(st.sampled_from(["drop", "double", "swap", "append"])),
                draw(st.integers(0, 40)),
            )
            parent[typo] = parent.pop(key)
    return name, raw, overrides


# Building a configuration on PyTorch's meta device (check_hyperparameters) takes ~0.1 s and
# gives the same answer every time: examples share the answers, so that more examples fit.
_BUILT: dict[str, Exception | None] = {}
_ORIGINAL_BUILD = study_module.build_on_meta


def _build_once(cls: type, hparams: Any) -> None:
    key = f"{cls.__name__}:{sorted(hparams.items(), key=repr)!r}"
    if key not in _BUILT:
        try:
            _ORIGINAL_BUILD(cls, hparams)
            _BUILT[key] = None
        except Exception as exc:  # replayed below, whatever it is
            _BUILT[key] = exc
    if _BUILT[key] is not None:
        raise _BUILT[key]


def validate_like_the_cli(path: Path, overrides: list[str]) -> None:
    """What ``sweep validate`` does (sweep/cli.py): load with overrides, check every
    configuration on the meta device, the same for the smoke form, then list the trials and
    their config hashes (an Optuna study lists none)."""
    study = load_study(path, overrides)
    check_hyperparameters(study)
    smoke = smoke_form(study)
    check_hyperparameters(smoke)
    for each in (study, smoke):
        if each.search.algorithm != "optuna":
            trials = expand_trials(each)
            assert trials, "a grid or random study expands to at least one trial"
            for trial in trials:
                config_hash(each, trial)


def _check(tmp: Path, example: tuple[str, dict, list[str]]) -> None:
    _, raw, overrides = example
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with mock.patch.object(study_module, "build_on_meta", _build_once):
        try:
            validate_like_the_cli(path, overrides)
            event("validates")
        except _user_errors() as exc:
            event(f"bad input: {type(exc).__name__}")
            message = str(exc)
            # What the CLI prints after "error: ", naming the file where it is the study's
            # fault (a key with a newline in it is quoted as it is).
            assert message.strip(), message
            assert "Traceback" not in message and " object at 0x" not in message, message
            if isinstance(exc, StudyError):
                assert message.startswith(str(path)), message


FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _tmp(factory: pytest.TempPathFactory) -> Path:
    # Session-scoped: Hypothesis runs many examples in one call of a test.
    tmp = factory.getbasetemp() / "fuzz"
    tmp.mkdir(exist_ok=True)
    return tmp


@settings(FUZZ, max_examples=100)
@given(example=mutated_studies())
def test_mutated_studies_validate_or_fail_as_bad_input(tmp_path_factory, example):
    _check(_tmp(tmp_path_factory), example)


@pytest.mark.slow
@settings(FUZZ, max_examples=1500)
@given(example=mutated_studies())
def test_many_mutated_studies_validate_or_fail_as_bad_input(tmp_path_factory, example):
    _check(_tmp(tmp_path_factory), example)
