"""A study's search space: its keys, the precedence rule, and every way of enumerating it.

A space maps keys to a fixed value or a distribution (:class:`Param`). A key is shared
(``lr``), per model (``stfpm.lr``) or per model and backbone (``fastflow@cait_m48_448.lr``).
:class:`Space` is the one place that knows which key gives a trial its value: the most specific
key present wins, and without any the detector's default applies (its backbone family's, else
its signature's). ``image_size`` may also be per model, or ``native`` (the backbone's own input
size). Everything that enumerates trials asks the space: the grid, random draws, Optuna's
define-by-run suggestions, the plan's representative configurations, the image sizes the data
is prepared at and the (model, backbone) pairs validation checks.

The space is built from the parsed ``space:`` block and the data set's default image size
only; it never sees the rest of the study.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict

import models
from models.backbones import get_backbone, list_backbones
from sweep.errors import did_you_mean

__all__ = [
    "BACKBONE_MARK",
    "DISTRIBUTIONS",
    "FOLLOW_SEED",
    "LABEL_KEY",
    "NATIVE_SIZE",
    "PER_MODEL_TRIAL_KEYS",
    "SEED_LIMIT",
    "SHARED_HPARAMS",
    "SPLIT_KEYS",
    "TRIAL_KEYS",
    "VARIANT_KEYS",
    "BackbonePair",
    "Param",
    "Space",
    "SpaceKey",
    "TrialConfig",
    "freeze",
    "jsonable",
    "parse_param",
    "seed_problem",
    "split_key",
]

TRIAL_KEYS = (
    "model",
    "seed",
    "image_size",
    "epochs",
    "augmentation",
    "stress",
    "split_seed",
    "test_fraction",
    "labelled_defects",
)
"""Keys of the space that are not detector hyperparameters, or not only."""
SPLIT_KEYS = ("split_seed", "test_fraction")
"""Trial keys that draw the data set's splits again (:func:`data.splits.resplit`): the split's
seed (an int, or ``seed`` for the trial's own seed) and the share of normal images tested."""
LABEL_KEY = "labelled_defects"
"""The trial key that moves N defect images per defect type from the test split into a
labelled training split (:func:`data.splits.labelled_split`): supervised detectors train on
them, every detector of that N is tested without them."""
FOLLOW_SEED = "seed"
"""The ``split_seed`` that means: the trial's seed draws its split too."""
VARIANT_KEYS = ("augmentation", "stress")
"""Trial keys that name a data variant: a training augmentation set or a test-time stress."""
PER_MODEL_TRIAL_KEYS = ("image_size", LABEL_KEY)
"""Trial keys a study may also give per model (``cfa.image_size: 224``,
``supervised_classifier.labelled_defects: {grid: [1, 5]}``)."""
NATIVE_SIZE = "native"
"""An image size that means: the backbone's fixed input size (transformers), else the data
set's ``image_size``."""
SHARED_HPARAMS = ("backbone", "pretrained", "weights")
"""Detector hyperparameters that most detectors share; they apply wherever the detector has
them."""
BACKBONE_MARK = "@"
"""Joins model and backbone in a per-(model, backbone) key: ``fastflow@cait_m48_448.lr``."""
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "int")
MAX_REPRESENTATIVES = 2000
"""Configurations of an Optuna space costed at most (its enumerable keys' product)."""
SEED_LIMIT = 2**32
"""Every seed (``seed``, ``split_seed``, ``dataset.seed``, ``search.seed``) is below this, and
>= 0: Optuna's samplers seed numpy's legacy RandomState, which takes no larger seed, while
numpy's and torch's generators and a result row's int64 columns take every such one."""
INT64_LIMIT = 2**63
"""Other whole numbers a result row stores (epochs, labelled defects) are below this: its
columns are int64, and a value past it leaves a trained trial with no row."""
MAX_IMAGE_SIZE = 4096
"""The largest image side in pixels (``dataset.image_size`` has the same bound)."""


# ----------------------------------------------------------------------------- keys and values


class SpaceKey(NamedTuple):
    """What a space key names: ``lr`` is shared (model and backbone None), ``stfpm.lr`` is
    STFPM's, ``fastflow@cait_m48_448.flow_steps`` FastFlow's on CaiT-M48 only."""

    model: str | None
    backbone: str | None
    name: str


def split_key(key: str) -> SpaceKey:
    """The model, backbone and hyperparameter (or trial key) a space key names."""
    owner, dot, name = key.partition(".")
    if not dot:
        return SpaceKey(None, None, key)
    model, mark, backbone = owner.partition(BACKBONE_MARK)
    return SpaceKey(model, backbone if mark else None, name)


def _winning_key(
    keys: Mapping[str, Any], model: str, name: str, backbone: str | None = None
) -> str | None:
    """The study format's precedence rule, the only place it is written: of the keys of
    ``keys`` (a space or an assignment) that can give ``name`` to a trial of ``model`` on
    ``backbone``, the most specific wins (``model@backbone.name``, then ``model.name``, then
    ``name``); None when none is present, and the detector's default applies."""
    specific = () if backbone is None else (f"{model}{BACKBONE_MARK}{backbone}.{name}",)
    return next((k for k in (*specific, f"{model}.{name}", name) if k in keys), None)


def seed_problem(value: Any) -> str | None:
    """Why ``value`` cannot be a seed (None when it can): an integer in [0, :data:`SEED_LIMIT`)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
        return f"must be an integer from 0 to {SEED_LIMIT - 1} (2**32 - 1), got {value!r}"
    return None


def _split_seed(value: Any, seed: int) -> int | None:
    """A trial's split seed: ``seed`` (:data:`FOLLOW_SEED`) follows the trial's own."""
    if value is None:
        return None
    return seed if value == FOLLOW_SEED else int(value)


class Param(BaseModel):
    """One key of the search space: a fixed value or a distribution."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["fixed", "grid", "choice", "uniform", "loguniform", "int"]
    values: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None

    @property
    def is_enumerable(self) -> bool:
        return self.kind in ("fixed", "grid", "choice")

    def options(self) -> tuple[Any, ...]:
        """Every value of a fixed/grid/choice parameter."""
        return self.values

    def draw(self, rng: np.random.Generator) -> Any:
        """One random draw (random search)."""
        if self.is_enumerable:
            return self.values[int(rng.integers(len(self.values)))]
        assert self.low is not None and self.high is not None
        if self.kind == "uniform":
            return float(rng.uniform(self.low, self.high))
        if self.kind == "loguniform":
            return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        return int(rng.integers(int(self.low), int(self.high) + 1))

    def representative(self, cost_bearing: bool) -> Any:
        """One value standing for a continuous parameter when costing: the costly end of a
        cost-bearing key (epochs, image size), the middle of the others."""
        assert self.low is not None and self.high is not None
        if cost_bearing:
            return int(self.high)
        if self.kind == "int":
            return round((self.low + self.high) / 2)
        if self.kind == "loguniform":
            return math.sqrt(self.low * self.high)
        return (self.low + self.high) / 2

    def to_yaml(self) -> Any:
        """The parameter as a study file writes it."""
        if self.kind == "fixed":
            return jsonable(self.values[0])
        if self.kind in ("grid", "choice"):
            return {self.kind: [jsonable(v) for v in self.values]}
        return {self.kind: [self.low, self.high]}


def parse_param(key: str, value: Any) -> Param:
    """A space entry (a value, or a one-key mapping naming a distribution) as a :class:`Param`;
    ValueError naming the key on a malformed distribution."""
    if isinstance(value, Mapping):
        if len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS:
            raise ValueError(
                f"space key {key!r}: a distribution is one of {{{', '.join(DISTRIBUTIONS)}}}: "
                f"[...], got {dict(value)!r}"
            )
        kind, arg = next(iter(value.items()))
        if kind in ("grid", "choice"):
            if not isinstance(arg, list) or not arg:
                raise ValueError(f"space key {key!r}: {kind} needs a non-empty list")
            return Param(kind=kind, values=tuple(freeze(v) for v in arg))
        if not (isinstance(arg, list) and len(arg) == 2 and all(_is_number(a) for a in arg)):
            raise ValueError(f"space key {key!r}: {kind} needs [low, high] numbers, got {arg!r}")
        # Draws need finite bounds (NaN compares false too), and an int draw's must fit
        # numpy's int64 with room for its range.
        if not all(abs(a) < INT64_LIMIT // 2 for a in arg):
            raise ValueError(
                f"space key {key!r}: {kind} needs finite bounds within +-2**62, got {arg!r}"
            )
        low, high = float(arg[0]), float(arg[1])
        if not low < high and not (kind == "int" and low == high):
            raise ValueError(f"space key {key!r}: {kind} needs low < high, got {arg!r}")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"space key {key!r}: loguniform needs low > 0, got {arg!r}")
        if kind == "int" and not all(float(a).is_integer() for a in arg):
            raise ValueError(f"space key {key!r}: int needs whole numbers, got {arg!r}")
        return Param(kind=kind, low=low, high=high)
    return Param(kind="fixed", values=(freeze(value),))


def freeze(value: Any) -> Any:
    """Lists as tuples, recursively: lists in a space are values (layers), and trial configs
    must be hashable."""
    if isinstance(value, list):
        return tuple(freeze(v) for v in value)
    return value


def jsonable(value: Any) -> Any:
    """Tuples as lists and numpy scalars as Python's, for JSON and YAML."""
    if isinstance(value, tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- trials


@dataclass(frozen=True)
class TrialConfig:
    """One concrete trial: a detector, its hyperparameters and the data settings."""

    model: str
    seed: int
    image_size: int
    epochs: int | None
    hparams: Mapping[str, Any] = field(default_factory=dict)
    """Keyword arguments of ``models.create(model, ...)`` (seed included)."""
    augmentation: str = "none"
    """The training augmentation set (a name of ``Study.augmentation_sets``)."""
    stress: str = "none"
    """The test-time stress perturbation (a name of ``Study.stress_specs``)."""
    split_seed: int | None = None
    """Seed of a fresh train/val/test split of the data set; None keeps the data set's."""
    test_fraction: float | None = None
    """Share of normal images in a fresh split's test split; None keeps the data set's."""
    labelled_defects: int | None = None
    """Defect images per type moved from test into the labelled training split; None (or 0):
    none, the test split stays whole."""

    @property
    def resplits(self) -> bool:
        """Whether this trial's data is split again (a split seed or a test share is set)."""
        return self.split_seed is not None or self.test_fraction is not None

    @property
    def backbone(self) -> str | None:
        value = self.hparams.get("backbone")
        return None if value is None else str(value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "seed": self.seed,
            "image_size": self.image_size,
            "epochs": self.epochs,
            "hparams": {k: jsonable(v) for k, v in sorted(self.hparams.items())},
            # Left out when unused, so that trials without variants keep their ids.
            **{k: getattr(self, k) for k in VARIANT_KEYS if getattr(self, k) != "none"},
            **{k: getattr(self, k) for k in SPLIT_KEYS if getattr(self, k) is not None},
            **({} if self.labelled_defects is None else {LABEL_KEY: self.labelled_defects}),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TrialConfig:
        return cls(
            model=raw["model"],
            seed=int(raw["seed"]),
            image_size=int(raw["image_size"]),
            epochs=None if raw.get("epochs") is None else int(raw["epochs"]),
            hparams={k: freeze(v) for k, v in raw.get("hparams", {}).items()},
            augmentation=str(raw.get("augmentation", "none")),
            stress=str(raw.get("stress", "none")),
            split_seed=None if raw.get("split_seed") is None else int(raw["split_seed"]),
            test_fraction=None if raw.get("test_fraction") is None else float(raw["test_fraction"]),
            labelled_defects=None if raw.get(LABEL_KEY) is None else int(raw[LABEL_KEY]),
        )

    def key(self) -> str:
        """What tells two trials of one study apart (their config hash adds the study's data
        and evaluation settings, which are the same for all of them)."""
        return json.dumps(self.to_dict(), sort_keys=True, default=str)

    def label(self) -> str:
        parts = [self.model]
        if self.backbone:
            parts.append(self.backbone)
        variants = "".join(
            f" {k}={getattr(self, k)}" for k in VARIANT_KEYS if getattr(self, k) != "none"
        )
        if self.labelled_defects:
            variants += f" {LABEL_KEY}={self.labelled_defects}"
        return "/".join(parts) + f" seed={self.seed} {self.image_size}px" + variants


@dataclass(frozen=True)
class BackbonePair:
    """One model x backbone x layers x image size a space can produce."""

    model: str
    backbone: str
    layers: tuple[Any, ...] | None
    """The layers the space gives on that backbone; None: the detector's default."""
    image_size: int


# ----------------------------------------------------------------------------- the space


class Space:
    """The search space of one study: what each trial's keys resolve to, and its enumerations.

    Args:
        params: the parsed ``space:`` block (key -> :class:`Param`); it must have ``model``.
        default_image_size: the data set's ``image_size``, which a trial takes when no key
            gives it one.
    """

    def __init__(self, params: Mapping[str, Param], default_image_size: int) -> None:
        self.params = dict(params)
        self.default_image_size = default_image_size

    @classmethod
    def from_raw(cls, raw: Mapping[str, Any], default_image_size: int) -> Space:
        """A space from what a study file's ``space:`` holds; ValueError on a malformed key."""
        return cls({str(k): parse_param(str(k), v) for k, v in raw.items()}, default_image_size)

    def __getitem__(self, key: str) -> Param:
        return self.params[key]

    def __contains__(self, key: object) -> bool:
        return key in self.params

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def items(self) -> Iterator[tuple[str, Param]]:
        return iter(self.params.items())

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self.params["model"].options())

    # ------------------------------------------------------------------ the precedence rule

    def key_for(self, model: str, name: str, backbone: str | None = None) -> str | None:
        """The space key that gives ``name`` to ``model``'s trials (on ``backbone``), or None."""
        return _winning_key(self.params, model, name, backbone)

    def values(self, model: str, name: str, backbone: str | None = None) -> tuple[Any, ...] | None:
        """Every value hyperparameter ``name`` takes in ``model``'s trials (on ``backbone``
        where given): the options of the key that gives it, else the detector's default; None
        where a continuous distribution samples it. A shared key reaches only the detectors
        that have the hyperparameter."""
        known = models.hyperparameters(model)
        key = self.key_for(model, name, backbone)
        if key == name and name not in known:
            key = None
        if key is None:
            return (known.get(name),)
        param = self.params[key]
        return param.options() if param.is_enumerable else None

    def backbone_of(self, model: str, assignment: Mapping[str, Any]) -> str | None:
        """The backbone of ``model``'s trial under ``assignment`` (its own key, else the shared
        one, else its default); None for a detector without one."""
        known = models.hyperparameters(model)
        if "backbone" not in known:
            return None
        key = _winning_key(assignment, model, "backbone")
        if key is None:
            return known["backbone"]
        return None if assignment[key] is None else str(assignment[key])

    def image_size(self, backbone: str | None, size: Any) -> int:
        """A trial's image size in pixels: ``size``, or for 'native' the backbone's fixed input
        size (the data set's for a backbone that takes any size)."""
        if size != NATIVE_SIZE:
            return int(size)
        if backbone is not None:
            native = get_backbone(backbone).input_size
            if native is not None:
                return int(native)
        return self.default_image_size

    def image_size_options(self, model: str) -> tuple[Any, ...] | None:
        """The image sizes (ints or 'native') ``model``'s trials may take; None when sampled."""
        key = self.key_for(model, "image_size")
        if key is None:
            return (self.default_image_size,)
        param = self.params[key]
        return param.options() if param.is_enumerable else None

    def image_sizes(self) -> list[int]:
        """Every image size a trial can have (the data is prepared at each); a sampled size
        counts by its bounds."""
        sizes: set[int] = set()
        for model in self.models:
            options = self.image_size_options(model)
            if options is None:
                param = self.params[self.key_for(model, "image_size")]
                options = (int(param.low or 0), int(param.high or 0))
            backbones: tuple[Any, ...] = (None,)
            if "backbone" in models.hyperparameters(model):
                backbones = self.values(model, "backbone") or (None,)
            for size in options:
                for backbone in backbones:
                    sizes.add(self.image_size(backbone, size))
        return sorted(sizes)

    def max_epochs(self) -> int | None:
        """The longest training in epochs: per model its own key's largest value (a sampled
        one's upper bound), else its default (one-pass detectors have none); the largest."""
        budgets: list[int | None] = []
        for model in self.models:
            key = self.key_for(model, "epochs")
            if key is None:
                default = models.hyperparameters(model).get("epochs")
                budgets.append(default if isinstance(default, int) else None)
                continue
            param = self.params[key]
            if not param.is_enumerable:
                budgets.append(None if param.high is None else int(param.high))
                continue
            given = [int(v) for v in param.options() if v is not None]
            budgets.append(max(given) if given else None)
        known = [b for b in budgets if b is not None]
        return max(known) if known else None

    # ------------------------------------------------------------------ trials

    def resolve(self, assignment: Mapping[str, Any]) -> TrialConfig:
        """One value per space key as a trial, keeping only what applies to its model and
        backbone."""
        model = assignment["model"]
        known = models.hyperparameters(model)
        seed = int(assignment.get("seed", 0))
        # Per-(model, backbone) keys depend on the backbone, which is settled first.
        backbone = self.backbone_of(model, assignment)
        hparams: dict[str, Any] = {}
        for hp in known:
            if hp in TRIAL_KEYS:  # seed and epochs are the trial's, set below
                continue
            key = _winning_key(assignment, model, hp, backbone)
            if key is not None:
                hparams[hp] = freeze(assignment[key])
        if "seed" in known:
            hparams["seed"] = seed
        # The training budget and the size are the trial's (what fit, the scheduler and the
        # data preparation use), per model too.
        epochs_key = _winning_key(assignment, model, "epochs")
        epochs = None if epochs_key is None else assignment[epochs_key]
        size_key = _winning_key(assignment, model, "image_size")
        size = self.default_image_size if size_key is None else assignment[size_key]
        label_key = _winning_key(assignment, model, LABEL_KEY)
        labelled = None if label_key is None else assignment[label_key]
        return TrialConfig(
            model=model,
            seed=seed,
            image_size=self.image_size(backbone, size),
            epochs=None if epochs is None else int(epochs),
            hparams=hparams,
            augmentation=str(assignment.get("augmentation", "none")),
            stress=str(assignment.get("stress", "none")),
            split_seed=_split_seed(assignment.get("split_seed"), seed),
            test_fraction=(
                None
                if assignment.get("test_fraction") is None
                else float(assignment["test_fraction"])
            ),
            labelled_defects=None if labelled is None else int(labelled),
        )

    def from_sampler(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        """A full assignment from what Optuna chose: fixed keys added, indexed choices decoded
        (Optuna's categorical choices must be scalars, so list-valued options such as layers
        are sampled by index as ``<key>#index``)."""
        assignment = {k: p.values[0] for k, p in self.params.items() if p.kind == "fixed"}
        for key, value in sampled.items():
            if key.endswith("#index"):
                name = key.removesuffix("#index")
                assignment[name] = self.params[name].values[int(value)]
            else:
                assignment[key] = value
        return assignment

    def resolve_sampled(self, sampled: Mapping[str, Any]) -> TrialConfig:
        """The trial of an Optuna trial's parameters (or a Tune config of them)."""
        return self.resolve(self.from_sampler(sampled))

    def grid(self) -> list[TrialConfig]:
        """Every trial of the cartesian product of all keys (all must be enumerable),
        deduplicated: keys that do not apply to a model would repeat its configurations."""
        return self._expand(list(self.params), [], None, 1)

    def sample(self, rng: np.random.Generator, draws: int) -> list[TrialConfig]:
        """Random search: for each point of the fixed and grid keys, ``draws`` draws of the
        choices and continuous keys from ``rng``, deduplicated."""
        fixed = [k for k, p in self.params.items() if p.kind in ("fixed", "grid")]
        sampled = [k for k in self.params if k not in fixed]
        return self._expand(fixed, sampled, rng, draws)

    def _expand(
        self,
        enumerated: list[str],
        sampled: list[str],
        rng: np.random.Generator | None,
        draws: int,
    ) -> list[TrialConfig]:
        trials: list[TrialConfig] = []
        for pinned, keys in self._key_groups(enumerated, per_model=rng is None):
            for values in itertools.product(*(self.params[k].options() for k in keys)):
                point = {**pinned, **dict(zip(keys, values, strict=True))}
                for _ in range(draws):
                    assert rng is not None or not sampled
                    drawn = {k: self.params[k].draw(rng) for k in sampled} if sampled else {}
                    trials.append(self.resolve({**point, **drawn}))
        return _distinct(trials)

    def _key_groups(
        self, enumerated: list[str], per_model: bool
    ) -> list[tuple[dict[str, Any], list[str]]]:
        """The products :meth:`_expand` walks, as (pinned keys, keys to multiply): one per model
        (the model pinned, the shared keys and that model's own multiplied), so that another
        model's grid does not multiply a model's trials only for :func:`_distinct` to drop them
        again (the robustness study's per-model grids made 816,000 points of 3375 trials).
        Random search keeps the one product: its draws come from one generator in a fixed
        order, which grouping would change."""
        if not per_model or "model" not in enumerated:
            return [({}, enumerated)]
        return [
            (
                {"model": model},
                [k for k in enumerated if k != "model" and split_key(k).model in (None, model)],
            )
            for model in self.params["model"].options()
        ]

    def representatives(self, limit: int = MAX_REPRESENTATIVES) -> list[TrialConfig]:
        """The distinct configurations a sampled (Optuna) space can produce, for costing: every
        combination of the enumerable keys (at most ``limit``), continuous keys at
        :meth:`Param.representative`."""
        keys = list(self.params)
        options = [
            p.options()
            if p.is_enumerable
            else (p.representative(split_key(k).name in ("epochs", "image_size")),)
            for k, p in self.params.items()
        ]
        combinations = itertools.islice(itertools.product(*options), limit)
        return _distinct(
            self.resolve(dict(zip(keys, values, strict=True))) for values in combinations
        )

    def suggest(self, trial: Any) -> None:
        """Optuna's define-by-run space: the model first, then only that model's keys, and a
        per-(model, backbone) key only once the trial's backbone is drawn and only for that
        backbone, so Optuna never learns from values a trial did not use."""
        model = trial.suggest_categorical("model", list(self.models))
        per_backbone: list[tuple[str, str, Param]] = []
        for key, param in self.params.items():
            owner, backbone, _ = split_key(key)
            if key == "model" or (owner is not None and owner != model):
                continue
            if backbone is not None:
                per_backbone.append((key, backbone, param))
            else:
                _suggest_param(trial, key, param)
        chosen = self.backbone_of(model, self.from_sampler(trial.params))
        for key, backbone, param in per_backbone:
            if backbone == chosen:
                _suggest_param(trial, key, param)

    def backbone_pairs(self) -> Iterator[BackbonePair]:
        """Every model x backbone x layers x image size the space enumerates (sampled backbones,
        layers or sizes are not enumerated)."""
        for model in self.models:
            known = models.hyperparameters(model)
            if "backbone" not in known:
                continue
            backbones = self.values(model, "backbone")
            sizes = self.image_size_options(model)
            if backbones is None or sizes is None:
                continue
            for backbone in backbones:
                # Layers may be given per backbone (model@backbone.layers).
                layer_options = (
                    self.values(model, "layers", backbone) if "layers" in known else (None,)
                )
                if layer_options is None:
                    continue
                for layers, size in itertools.product(layer_options, sizes):
                    yield BackbonePair(
                        model,
                        backbone,
                        None if layers is None else freeze(layers),
                        self.image_size(backbone, size),
                    )

    # ------------------------------------------------------------------ validation

    def check(self, algorithm: str) -> None:
        """ValueError, naming the key, for anything in the space the registries or the search
        ``algorithm`` cannot take."""
        if "model" not in self.params:
            raise ValueError(
                "the space needs a 'model' key (a model name or a grid/choice of them)"
            )
        if not self.params["model"].is_enumerable:
            raise ValueError("space key 'model' must be a value or a grid/choice of model names")
        known_models = models.list_models()
        for name in self.models:
            if name not in known_models:
                raise ValueError(
                    f"space key 'model': unknown model {name!r}"
                    f"{did_you_mean(name, known_models)} (known: {', '.join(known_models)})"
                )
        hparams = {m: models.hyperparameters(m) for m in self.models}
        for key in self.params:
            if key not in TRIAL_KEYS:
                self._check_key(key, known_models, hparams)
        if "backbone" in self.params and self.params["backbone"].is_enumerable:
            known_backbones = list_backbones()
            for name in self.params["backbone"].options():
                if name not in known_backbones:
                    raise ValueError(
                        f"space key 'backbone': unknown backbone {name!r}"
                        f"{did_you_mean(name, known_backbones)} "
                        f"(known: {', '.join(known_backbones)})"
                    )
        # Sizes and layer names first: the pairs are checked with them.
        self._check_whole_numbers()
        self._check_layer_names()
        self._check_backbone_pairs()
        self._check_split_keys()
        self._check_labelled_defects()
        if algorithm == "grid":
            for key, param in self.params.items():
                if not param.is_enumerable:
                    raise ValueError(
                        f"space key {key!r}: a {param.kind} distribution cannot be enumerated by "
                        "search algorithm 'grid'; use 'random' or 'optuna', or a grid of values"
                    )

    def _check_key(
        self, key: str, known_models: list[str], hparams: Mapping[str, Mapping[str, Any]]
    ) -> None:
        model, backbone, hp = split_key(key)
        if model is None:
            if BACKBONE_MARK in key:
                raise ValueError(
                    f"space key {key!r}: a per-(model, backbone) key is "
                    f"MODEL{BACKBONE_MARK}BACKBONE.HYPERPARAMETER (e.g. "
                    f"'fastflow{BACKBONE_MARK}cait_m48_448.flow_steps')"
                )
            if not any(key in hps for hps in hparams.values()):
                every = sorted({h for hps in hparams.values() for h in hps} | set(TRIAL_KEYS))
                raise ValueError(
                    f"space key {key!r} is not a hyperparameter of any model in the study"
                    f"{did_you_mean(key, every)} (known: {', '.join(every)})"
                )
            return
        if model not in known_models:
            raise ValueError(
                f"space key {key!r}: unknown model {model!r}{did_you_mean(model, known_models)}"
            )
        if model not in self.models:
            raise ValueError(
                f"space key {key!r} applies to model {model!r}, which the study's 'model' does "
                f"not include ({', '.join(self.models)})"
            )
        if backbone is not None:
            self._check_backbone_key(key, hparams[model])
        elif hp not in PER_MODEL_TRIAL_KEYS and (hp not in hparams[model] or hp == "seed"):
            raise ValueError(
                f"space key {key!r}: model {model!r} has no hyperparameter {hp!r}"
                f"{did_you_mean(hp, hparams[model])} "
                f"(known: {', '.join(sorted(h for h in hparams[model] if h != 'seed'))})"
            )

    def _check_backbone_key(self, key: str, known: Mapping[str, Any]) -> None:
        """A per-(model, backbone) key must name a backbone some of the model's trials use, and
        set one of the model's hyperparameters."""
        model, backbone, hp = split_key(key)
        assert model is not None and backbone is not None
        if "backbone" not in known:
            raise ValueError(
                f"space key {key!r}: model {model!r} takes no backbone; give its "
                f"hyperparameters as '{model}.{hp}'"
            )
        known_backbones = list_backbones()
        if backbone not in known_backbones:
            raise ValueError(
                f"space key {key!r}: unknown backbone {backbone!r}"
                f"{did_you_mean(backbone, known_backbones)} (known: {', '.join(known_backbones)})"
            )
        used = self.values(model, "backbone") or ()
        if backbone not in used:
            raise ValueError(
                f"space key {key!r}: no {model} trial of the study runs on {backbone!r} "
                f"({model}'s backbones here: {', '.join(map(str, used))})"
            )
        if hp == "image_size" or (hp == "epochs" and "epochs" in known):
            # Per backbone they would split a model's sizes and budgets everywhere data is
            # prepared, trials are costed and epochs scheduled; 'native' already covers sizes
            # that follow the backbone.
            hint = " ('native' takes each backbone's own input size)" if hp == "image_size" else ""
            raise ValueError(
                f"space key {key!r}: {hp} is set per model, not per (model, backbone): "
                f"'{model}.{hp}'{hint}"
            )
        settable = sorted(h for h in known if h not in TRIAL_KEYS and h != "backbone")
        if hp not in settable:
            why = (
                "the backbone is what the key selects, not a value it sets"
                if hp == "backbone"
                else f"model {model!r} has no hyperparameter {hp!r}{did_you_mean(hp, settable)}"
            )
            raise ValueError(f"space key {key!r}: {why} (known: {', '.join(settable)})")

    def _check_backbone_pairs(self) -> None:
        """Fail on any model x backbone x layers x image size the space would produce but
        cannot run."""
        for pair in self.backbone_pairs():
            given = {} if pair.layers is None else {"layers": pair.layers}
            problem = models.backbone_problem(pair.model, pair.backbone, given, pair.image_size)
            if problem is None:
                continue
            usable = models.compatible_backbones(pair.model, given, pair.image_size)
            where = f" with layers {list(pair.layers)}" if pair.layers is not None else ""
            hint = (
                f"; at {pair.image_size} px{where} it can use: {', '.join(usable)}"
                if usable
                else f"; no registered backbone works with it at {pair.image_size} px{where}"
            )
            raise ValueError(
                f"model {pair.model!r} cannot use backbone {pair.backbone!r}{where} at "
                f"{pair.image_size} px: {problem}{hint} (give each model its own backbones with "
                f"'{pair.model}.backbone')"
            )

    @staticmethod
    def _known(model: str) -> Mapping[str, Any]:
        """``model``'s hyperparameters and their defaults (an unknown model has none)."""
        return models.hyperparameters(model) if model in models.list_models() else {}

    def _check_layer_names(self) -> None:
        """``layers`` takes layer names: one, or a list of them (the backbone says which)."""
        for key, param in self.params.items():
            owner, _, name = split_key(key)
            if name != "layers":
                continue
            # None is the default layers of a few detectors (their backbone's own), no others'.
            reached = [owner] if owner else [m for m in self.models if name in self._known(m)]
            takes_none = all(self._known(m).get(name, ()) is None for m in reached)
            for value in param.options():
                names = value if isinstance(value, tuple) else (value,)
                if not (value is None and takes_none) and not (
                    names and all(isinstance(n, str) for n in names)
                ):
                    raise ValueError(
                        f"space key {key!r}: expected a layer name or a list of them "
                        f"(e.g. [layer2, layer3]), got {jsonable(value)!r}"
                    )

    def _check_split_keys(self) -> None:
        """``split_seed`` takes ints or ``seed``; ``test_fraction`` shares in (0, 1)."""
        for key in SPLIT_KEYS:
            param = self.params.get(key)
            if param is None:
                continue
            if key == "split_seed" and param.kind in ("uniform", "loguniform"):
                raise ValueError(f"space key {key!r} takes whole numbers, not {param.kind}")
            bounds = (param.low, param.high) if not param.is_enumerable else param.options()
            if param.kind == "int":  # whole-numbered bounds, held as floats
                bounds = tuple(int(b) for b in bounds if b is not None)
            for value in bounds:
                if value is None or value == FOLLOW_SEED:
                    continue
                if key == "split_seed":
                    whole = isinstance(value, int) and not isinstance(value, bool)
                    if not (whole and value >= 0):
                        raise ValueError(
                            f"space key 'split_seed': expected an int >= 0 or {FOLLOW_SEED!r} "
                            f"(the trial's seed), got {value!r}"
                        )
                    problem = seed_problem(value)
                    if problem is not None:
                        raise ValueError(f"space key 'split_seed': {problem}")
                elif (
                    isinstance(value, bool)
                    or not isinstance(value, (int, float))
                    or not (0 < value < 1)
                ):
                    raise ValueError(
                        f"space key 'test_fraction': expected a share in (0, 1), got {value!r}"
                    )

    def _check_labelled_defects(self) -> None:
        """``labelled_defects`` (shared or per model) takes whole numbers >= 0, and every trial
        of a supervised detector needs at least one labelled defect per type."""
        keys = [k for k in self.params if split_key(k).name == LABEL_KEY]
        for key in keys:
            param = self.params[key]
            if param.kind in ("uniform", "loguniform"):
                raise ValueError(f"space key {key!r} takes whole numbers, not {param.kind}")
            bounds = param.options() if param.is_enumerable else (param.low, param.high)
            for value in bounds:
                whole = isinstance(value, int | float) and not isinstance(value, bool)
                # The bound first: float() of a huge int overflows; a row stores it as int64.
                if not (whole and 0 <= value < INT64_LIMIT and float(value).is_integer()):
                    raise ValueError(
                        f"space key {key!r}: expected a whole number of defect images per type "
                        f"(>= 0, < 2**63), got {value!r}"
                    )
        for model in self.models:
            if models.get_class(model).learning_type != "supervised":
                continue
            key = self.key_for(model, LABEL_KEY)
            if key is None:
                raise ValueError(
                    f"model {model!r} is supervised and trains on labelled defects: give "
                    f"'{LABEL_KEY}' (defect images per type, >= 1), e.g. "
                    f"'{model}.{LABEL_KEY}: {{grid: [1, 5, 20]}}'"
                )
            param = self.params[key]
            low = min(param.options()) if param.is_enumerable else param.low
            if low is not None and low < 1:
                raise ValueError(
                    f"space key {key!r}: model {model!r} is supervised and needs at least one "
                    f"labelled defect per type, got {low!r}; give it its own values with "
                    f"'{model}.{LABEL_KEY}: {{grid: [1, 5, 20]}}'"
                )

    def _check_whole_numbers(self) -> None:
        """Seeds, epochs and image sizes (shared or per model) are whole numbers in range: a
        float or a number past a row's int64 would fail only once a trial has trained."""
        for key, param in self.params.items():
            name = split_key(key).name
            if name not in ("seed", "epochs", "image_size"):
                continue
            if param.kind in ("uniform", "loguniform"):
                raise ValueError(f"space key {key!r} takes whole numbers, not {param.kind}")
            values = param.options() if param.is_enumerable else (param.low, param.high)
            for value in values if param.is_enumerable else map(int, values):
                problem = _whole_number_problem(name, value)
                if problem is not None:
                    raise ValueError(f"space key {key!r}: {problem}")

    def to_yaml(self) -> dict[str, Any]:
        """The space as a study file writes it."""
        return {key: param.to_yaml() for key, param in self.params.items()}


def _whole_number_problem(name: str, value: Any) -> str | None:
    """Why ``value`` cannot be a trial's ``name`` (seed, epochs or image_size), or None."""
    if name == "seed":
        return seed_problem(value)
    if name == "image_size" and value == NATIVE_SIZE:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        expected = "a whole number or 'native'" if name == "image_size" else "a whole number"
        return f"expected {expected}, got {value!r}"
    if name == "image_size" and value < 32:
        return f"{value} is below the minimum of 32"
    if name == "image_size" and value > MAX_IMAGE_SIZE:
        return f"{value} is above the maximum of {MAX_IMAGE_SIZE}"
    if value >= INT64_LIMIT:
        return f"{value} is too large (a result row stores it as a 64-bit integer)"
    return None


def _distinct(trials: Iterable[TrialConfig]) -> list[TrialConfig]:
    """``trials`` in order, each configuration once: keys that do not apply to a model repeat its
    configurations."""
    first: dict[str, TrialConfig] = {}
    for trial in trials:
        first.setdefault(trial.key(), trial)
    return list(first.values())


def _suggest_param(trial: Any, key: str, param: Param) -> None:
    if param.kind == "fixed":
        # Constants are not part of Optuna's space; Space.from_sampler adds them back.
        return
    if param.kind in ("grid", "choice"):
        options = list(param.values)
        # Optuna's categorical choices must be scalars: tuples (e.g. layers) go by index.
        if any(isinstance(v, tuple) for v in options):
            trial.suggest_categorical(f"{key}#index", list(range(len(options))))
        else:
            trial.suggest_categorical(key, options)
    elif param.kind == "uniform":
        trial.suggest_float(key, param.low, param.high)
    elif param.kind == "loguniform":
        trial.suggest_float(key, param.low, param.high, log=True)
    else:
        trial.suggest_int(key, int(param.low), int(param.high))
