"""Study files: the YAML schema (pydantic), its validation, and the expansion into trials.

A study names a data set, a search space over detectors and their hyperparameters, a search
algorithm, the objectives and the resources of each trial. ``load_study`` reads and validates a
file; ``expand_trials`` turns a grid or random space into concrete :class:`TrialConfig` s, and
``resolve_trial`` turns one sampled assignment (from Optuna, say) into one.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sweep.errors import StudyError, did_you_mean

# Keys of the space that are not detector hyperparameters, or not only.
TRIAL_KEYS = ("model", "seed", "image_size", "epochs", "augmentation", "stress")
# Trial keys that name a data variant: a training augmentation set or a test-time stress.
VARIANT_KEYS = ("augmentation", "stress")
# Trial keys a study may also give per model (``cfa.image_size: 224``).
PER_MODEL_TRIAL_KEYS = ("image_size",)
NATIVE_SIZE = "native"
"""An image size that means: the backbone's fixed input size (transformers), else the data
set's ``image_size``."""
# Detector hyperparameters that most detectors share; they apply wherever the detector has them.
SHARED_HPARAMS = ("backbone", "pretrained", "weights")
BACKBONE_MARK = "@"
"""Joins model and backbone in a per-(model, backbone) key: ``fastflow@cait_m48_448.lr``."""

METRICS: dict[str, Literal["max", "min"]] = {
    "image_auroc": "max",
    "image_f1": "max",
    "image_f1max": "max",
    "pixel_auroc": "max",
    "pixel_f1": "max",
    "pixel_f1max": "max",
    "pixel_aupro": "max",
    "latency_ms": "min",
    "throughput_fps": "max",
    "train_s": "min",
    "params_trainable": "min",
    "params_total": "min",
    "peak_rss_mb": "min",
    "peak_gpu_mb": "min",
}
"""Metrics a study may use as objectives, with their natural direction."""

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "int")
DEFAULT_DATA_ROOT = "~/.cache/anomaly-sweep/glue"
DEFAULT_CACHE_DIR = "~/.cache/anomaly-sweep/features"
CACHE_DIR_ENV = "ANOMALY_SWEEP_CACHE_DIR"


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


def key_candidates(model: str, name: str, backbone: str | None = None) -> tuple[str, ...]:
    """The space keys that can give ``name`` to a trial of ``model`` on ``backbone``, most
    specific first: ``model@backbone.name``, ``model.name``, ``name``.

    This is the study format's precedence rule, written once; the first key present wins and
    without any the detector's default applies (its backbone family's, else its signature's).
    """
    specific = () if backbone is None else (f"{model}{BACKBONE_MARK}{backbone}.{name}",)
    return (*specific, f"{model}.{name}", name)


def first_key(
    keys: Mapping[str, Any], model: str, name: str, backbone: str | None = None
) -> str | None:
    """The key of ``keys`` (a space or an assignment) that gives ``name`` to ``model``'s trials
    by :func:`key_candidates`, or None when none does."""
    return next((k for k in key_candidates(model, name, backbone) if k in keys), None)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticGlueConfig(_Strict):
    """How many images the synthetic glue-line generator renders per split."""

    n_train: int = Field(200, ge=1)
    n_val_good: int = Field(20, ge=0)
    n_val_defect: int = Field(4, ge=0, description="per defect type")
    n_test_good: int = Field(40, ge=1)
    n_test_defect: int = Field(6, ge=1, description="per defect type")
    height: int = Field(480, ge=32)
    width: int = Field(640, ge=32)
    defect_types: tuple[str, ...] | None = None


class DatasetConfig(_Strict):
    kind: Literal["synthetic_glue", "mvtec", "folder"] = "synthetic_glue"
    root: str | None = None
    category: str | None = None
    image_size: int = Field(256, ge=32, le=4096)
    seed: int = Field(0, description="seed of data generation and of data splits")
    normal_dir: str | None = None
    abnormal_dir: str | None = None
    mask_dir: str | None = None
    val_fraction: float | None = Field(None, gt=0, lt=1)
    test_fraction: float | None = Field(None, gt=0, lt=1)
    synthetic: SyntheticGlueConfig | None = None

    @model_validator(mode="after")
    def _check_kind(self) -> DatasetConfig:
        if self.kind == "mvtec":
            for name in ("root", "category"):
                if getattr(self, name) is None:
                    raise ValueError(f"dataset kind 'mvtec' needs '{name}'")
        if self.kind == "folder":
            for name in ("normal_dir", "abnormal_dir"):
                if getattr(self, name) is None:
                    raise ValueError(f"dataset kind 'folder' needs '{name}'")
        if self.synthetic is not None and self.kind != "synthetic_glue":
            raise ValueError("'synthetic' applies only to dataset kind 'synthetic_glue'")
        return self

    def loader_arguments(self, image_size: int) -> dict[str, Any]:
        """Keyword arguments of ``data.load_dataset`` for this data set at ``image_size``."""
        args: dict[str, Any] = {"image_size": image_size, "seed": self.seed}
        if self.kind == "synthetic_glue":
            args["root"] = str(Path(self.root or DEFAULT_DATA_ROOT).expanduser())
            args["category"] = self.category or "part1"
            if self.synthetic is not None:
                from data.synthetic_glue import GlueSetConfig

                values = self.synthetic.model_dump(exclude_none=True)
                if "defect_types" in values:
                    values["defect_types"] = tuple(values["defect_types"])
                args["config"] = GlueSetConfig(**values)
        elif self.kind == "mvtec":
            args["root"] = str(Path(self.root).expanduser())  # type: ignore[arg-type]
            args["category"] = self.category
        else:
            args["normal_dir"] = str(Path(self.normal_dir).expanduser())  # type: ignore[arg-type]
            args["abnormal_dir"] = str(Path(self.abnormal_dir).expanduser())  # type: ignore[arg-type]
            if self.mask_dir:
                args["mask_dir"] = str(Path(self.mask_dir).expanduser())
            if self.test_fraction is not None:
                args["test_fraction"] = self.test_fraction
        if self.val_fraction is not None and self.kind != "synthetic_glue":
            args["val_fraction"] = self.val_fraction
        return args

    @property
    def label(self) -> str:
        """A short name of the data set for result rows."""
        if self.kind == "folder":
            return f"folder:{Path(self.normal_dir or '').parent.name or self.normal_dir}"
        return self.kind


def _check_rdb_url(url: str) -> None:
    """An Optuna RDB storage URL must name a database dialect SQLAlchemy knows."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    expected = "expected 'journal', 'memory' or an RDB URL such as sqlite:///optuna.db"
    try:
        make_url(url).get_dialect()
    except ArgumentError:
        raise ValueError(f"storage: {expected}, got {url!r}") from None
    except NoSuchModuleError:
        scheme = url.split("://", 1)[0]
        raise ValueError(
            f"storage: {scheme!r} is not a database SQLAlchemy knows ({expected}, "
            f"postgresql://..., mysql+pymysql://...); got {url!r}"
        ) from None


class SearchConfig(_Strict):
    algorithm: Literal["grid", "random", "optuna"] = "grid"
    sampler: Literal["tpe", "nsga2", "random"] | None = None
    n_trials: int | None = Field(None, ge=1, description="optuna: number of trials")
    num_samples: int = Field(1, ge=1, description="random: draws per grid point")
    seed: int = 0
    storage: str | None = Field(
        None,
        description="optuna: where the Optuna study lives; 'journal' (the default) is a journal "
        "file under the output (<output>/_optuna/journal.log, which optuna-dashboard opens and a "
        "re-run resumes from), 'memory' keeps nothing, anything else is an RDB URL "
        "(sqlite:///path.db, postgresql://...)",
    )

    @model_validator(mode="after")
    def _check(self) -> SearchConfig:
        if self.algorithm == "optuna" and self.n_trials is None:
            raise ValueError("search algorithm 'optuna' needs 'n_trials'")
        if self.algorithm != "optuna":
            for name in ("sampler", "storage", "n_trials"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name!r} applies only to search algorithm 'optuna'")
        if self.storage not in (None, "journal", "memory"):
            _check_rdb_url(self.storage)
        return self

    @property
    def storage_kind(self) -> Literal["journal", "memory", "url"]:
        storage = self.storage or "journal"
        return storage if storage in ("journal", "memory") else "url"  # type: ignore[return-value]


class Objective(_Strict):
    metric: str
    mode: Literal["max", "min"] | None = None

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        if metric not in METRICS:
            raise ValueError(
                f"unknown metric {metric!r}{did_you_mean(metric, METRICS)} "
                f"(known: {', '.join(METRICS)})"
            )
        return metric

    @property
    def direction(self) -> Literal["max", "min"]:
        return self.mode or METRICS[self.metric]


class ResourceOverride(_Strict):
    """A trial's resource request; a key left out takes the detector's default."""

    cpu: float | None = Field(None, gt=0)
    gpu: float | None = Field(None, ge=0, description="GPUs: a fraction packs trials on one GPU")
    memory_gb: float | None = Field(None, gt=0, description="host memory")

    @field_validator("gpu")
    @classmethod
    def _whole_or_fraction(cls, gpu: float | None) -> float | None:
        if gpu is not None and gpu > 1 and gpu != int(gpu):
            raise ValueError("a GPU request above 1 must be a whole number")
        return gpu


class Resources(ResourceOverride):
    """Resource requests: each detector's default (by backbone and image size), overridden by
    the study-wide keys, overridden in turn by ``models.<model>``."""

    models: dict[str, ResourceOverride] = Field(default_factory=dict)


class CacheConfig(_Strict):
    """Reuse of work across trials (see ``models.cache``)."""

    features: bool = Field(
        True,
        description="keep frozen backbones' features (and PatchCore coreset selections) in a "
        "content-addressed cache on each node's disk, so trials that share backbone, weights, "
        "layers, image size, data split and augmentation reuse them",
    )
    dir: str | None = Field(
        None,
        description="the node-local cache folder (default $ANOMALY_SWEEP_CACHE_DIR, else "
        "~/.cache/anomaly-sweep/features)",
    )
    max_gb: float = Field(20.0, gt=0, description="size bound; least recently used entries go")

    @property
    def directory(self) -> Path:
        configured = self.dir or os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR
        return Path(configured).expanduser()


class BatchSizes(_Strict):
    """One model's batch sizes; a key left out takes the study's."""

    train_batch_size: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)


class EvaluationConfig(_Strict):
    train_batch_size: int = Field(32, ge=1)
    batch_size: int = Field(32, ge=1, description="eval batch size (throughput is measured at it)")
    models: dict[str, BatchSizes] = Field(
        default_factory=dict,
        description="per-model batch sizes (Table B.8 trains CFA at 4, DRAEM and DSR at 8): "
        "model -> {train_batch_size, batch_size}; part of those models' config hash only",
    )
    latency_warmup: int = Field(3, ge=0)
    latency_repeats: int = Field(20, ge=1)
    exclusive_timing: bool = Field(
        True,
        description="time latency and throughput while no other trial on the node is timing "
        "(a node-wide lock); the row's timing_exclusive says whether it was",
    )
    timing_lock_timeout_s: float = Field(
        600.0, gt=0, description="how long a trial waits for the timing lock before timing anyway"
    )
    example_maps: int = Field(
        4,
        ge=0,
        description="test images whose anomaly maps each trial saves under <output>/_examples "
        "for the report's heatmap grid (anomalous first; 0 = none)",
    )

    def batch_sizes(self, model: str | None = None) -> tuple[int, int]:
        """The (training, evaluation) batch sizes of ``model``'s trials."""
        override = self.models.get(model) if model is not None else None
        if override is None:
            return self.train_batch_size, self.batch_size
        return (
            override.train_batch_size or self.train_batch_size,
            override.batch_size or self.batch_size,
        )


EPOCH_METRICS: dict[str, Literal["max", "min"]] = {
    "loss": "min",
    "val_image_auroc": "max",
    "val_pixel_auroc": "max",
}
"""Metrics an iterative trial reports after its epochs, which a scheduler can act on."""


class SchedulerConfig(_Strict):
    """An early-stopping trial scheduler (ASHA): poor trials stop at a rung of epochs."""

    kind: Literal["asha"] = "asha"
    metric: str = Field(
        "val_image_auroc",
        description="per-epoch metric: loss, val_image_auroc or val_pixel_auroc "
        "(the val_ metrics score the validation split, which needs anomalies)",
    )
    mode: Literal["max", "min"] | None = None
    grace_period: int = Field(1, ge=1, description="epochs every trial runs before any stop")
    reduction_factor: float = Field(3.0, gt=1, description="1 in this many trials goes on per rung")
    max_t: int | None = Field(None, ge=1, description="epochs of the last rung (default: epochs)")
    eval_every: int = Field(1, ge=1, description="score the validation split every N epochs")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        if metric not in EPOCH_METRICS:
            raise ValueError(
                f"unknown per-epoch metric {metric!r}{did_you_mean(metric, EPOCH_METRICS)} "
                f"(known: {', '.join(EPOCH_METRICS)})"
            )
        return metric

    @property
    def direction(self) -> Literal["max", "min"]:
        return self.mode or EPOCH_METRICS[self.metric]


class FailureSettings(_Strict):
    max_failures: int = Field(1, ge=0, description="retries of a trial whose worker died")


class Param(_Strict):
    """One key of the search space: a fixed value or a distribution."""

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


class Study(_Strict):
    name: str
    description: str = ""
    dataset: DatasetConfig = DatasetConfig()
    space: dict[str, Param]
    search: SearchConfig = SearchConfig()
    objectives: tuple[Objective, ...] = (
        Objective(metric="image_auroc", mode="max"),
        Objective(metric="latency_ms", mode="min"),
    )
    resources: Resources = Resources()
    max_concurrent: int | None = Field(None, ge=1)
    output: str | None = None
    evaluation: EvaluationConfig = EvaluationConfig()
    failure: FailureSettings = FailureSettings()
    scheduler: SchedulerConfig | None = None
    cache: CacheConfig = CacheConfig()
    weights_dir: str | None = Field(
        None,
        description="folder of pretrained backbone weights (<backbone>.safetensors, as `sweep "
        "weights fetch` writes them) that trials with pretrained: true load with no network; "
        "default $ANOMALY_SWEEP_WEIGHTS_DIR, else ~/.cache/anomaly-sweep/weights where it holds "
        "the backbone's file, else timm downloads it. A path, not part of any trial's identity",
    )
    augmentations: dict[str, Any] = Field(
        default_factory=dict,
        description="training augmentation sets of this study: name -> list of "
        "{AlbumentationsTransform: {kwargs}}; the builtins (none, defocus, brightness_contrast, "
        "iso_noise, table3_all) need no definition",
    )
    stresses: dict[str, Any] = Field(
        default_factory=dict,
        description="test-time stress perturbations of this study: name -> {kind: ..., params}; "
        "the builtins (none, lighting, background, rotation, orientation) need no definition",
    )
    smoke: dict[str, Any] = Field(
        default_factory=dict,
        description="how `sweep run --smoke` shrinks this study further: dotted keys -> values, "
        "as --set takes them (space.image_size: 64)",
    )
    source: str | None = Field(None, exclude=True, description="the file this study came from")

    @field_validator("name")
    @classmethod
    def _slug(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError("use letters, digits, '_', '.' and '-' (it names files)")
        return name

    @field_validator("space", mode="before")
    @classmethod
    def _parse_space(cls, raw: Any) -> dict[str, Param]:
        if not isinstance(raw, Mapping) or not raw:
            raise ValueError("the space is a non-empty mapping of key -> value or distribution")
        return {str(k): _parse_param(str(k), v) for k, v in raw.items()}

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, objectives: tuple[Objective, ...]) -> tuple[Objective, ...]:
        if not objectives:
            raise ValueError("at least one objective is needed")
        names = [o.metric for o in objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"objectives repeat a metric: {names}")
        return objectives

    @field_validator("augmentations", "stresses")
    @classmethod
    def _data_variants(cls, raw: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if not raw:
            return raw
        from data.augment import parse_augmentation_sets
        from data.errors import DatasetError
        from data.stress import parse_stresses

        parse = parse_augmentation_sets if info.field_name == "augmentations" else parse_stresses
        try:
            parse(raw)
        except DatasetError as exc:
            raise ValueError(str(exc)) from None
        return raw

    @field_validator("weights_dir")
    @classmethod
    def _local_weights_dir(cls, value: str | None) -> str | None:
        if value is not None and "://" in value:
            raise ValueError(
                f"a local folder that every node sees (a shared mount, or object storage synced "
                f"to each node's disk), not a URI: {value!r}"
            )
        return value

    @field_validator("smoke")
    @classmethod
    def _smoke_keys(cls, raw: dict[str, Any]) -> dict[str, Any]:
        for key in raw:
            if not isinstance(key, str) or not key or key.split(".")[0] not in cls.model_fields:
                raise ValueError(
                    f"smoke: {key!r} is not a dotted study key (e.g. space.image_size, "
                    "dataset.synthetic.n_train)"
                )
        return raw

    @model_validator(mode="after")
    def _check_space(self) -> Study:
        _validate_space(self)
        _validate_variants(self)
        for section, named in (
            ("resources.models", self.resources.models),
            ("evaluation.models", self.evaluation.models),
        ):
            unknown = sorted(set(named) - set(self.models))
            if unknown:
                raise ValueError(
                    f"{section}: {', '.join(map(repr, unknown))} not among the study's models "
                    f"({', '.join(self.models)})"
                )
        if self.scheduler is not None and self.search.algorithm == "optuna":
            raise ValueError(
                "scheduler: ASHA runs with search algorithm 'grid' or 'random'; an optuna search "
                "takes no per-epoch results here"
            )
        return self

    @functools.cached_property
    def augmentation_sets(self) -> dict[str, Any]:
        """Every training augmentation set the study can name: builtins and its own."""
        from data.augment import augmentation_sets

        return augmentation_sets(self.augmentations)

    @functools.cached_property
    def stress_specs(self) -> dict[str, Any]:
        """Every test-time stress the study can name: builtins and its own."""
        from data.stress import BUILTIN_STRESSES, parse_stresses

        return {**BUILTIN_STRESSES, **parse_stresses(self.stresses)}

    @property
    def output_dir(self) -> str:
        return self.output or f"results/{self.name}"

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self.space["model"].options())


def _parse_param(key: str, value: Any) -> Param:
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
            return Param(kind=kind, values=tuple(_freeze(v) for v in arg))
        if not (isinstance(arg, list) and len(arg) == 2 and all(_is_number(a) for a in arg)):
            raise ValueError(f"space key {key!r}: {kind} needs [low, high] numbers, got {arg!r}")
        low, high = float(arg[0]), float(arg[1])
        if not low < high and not (kind == "int" and low == high):
            raise ValueError(f"space key {key!r}: {kind} needs low < high, got {arg!r}")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"space key {key!r}: loguniform needs low > 0, got {arg!r}")
        if kind == "int" and not all(float(a).is_integer() for a in arg):
            raise ValueError(f"space key {key!r}: int needs whole numbers, got {arg!r}")
        return Param(kind=kind, low=low, high=high)
    return Param(kind="fixed", values=(_freeze(value),))


def _freeze(value: Any) -> Any:
    # Lists in a space are values (e.g. layers), and trial configs must be hashable.
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _validate_variants(study: Study) -> None:
    """The space's augmentation sets and stresses must be defined (builtin or in the study)."""
    for key, variants in (("augmentation", "augmentation_sets"), ("stress", "stress_specs")):
        if key not in study.space:
            continue
        known = getattr(study, variants)
        param = study.space[key]
        if not param.is_enumerable:
            raise ValueError(f"space key {key!r} takes names: a value or a grid/choice of names")
        section = "augmentations" if key == "augmentation" else "stresses"
        for name in param.options():
            if name not in known:
                raise ValueError(
                    f"space key {key!r}: unknown {key} {name!r}{did_you_mean(str(name), known)} "
                    f"(known: {', '.join(known)}; define your own under '{section}:')"
                )


def _validate_space(study: Study) -> None:
    import models

    space = study.space
    if "model" not in space:
        raise ValueError("the space needs a 'model' key (a model name or a grid/choice of them)")
    if not space["model"].is_enumerable:
        raise ValueError("space key 'model' must be a value or a grid/choice of model names")
    known_models = models.list_models()
    for name in space["model"].options():
        if name not in known_models:
            raise ValueError(
                f"space key 'model': unknown model {name!r}{did_you_mean(name, known_models)} "
                f"(known: {', '.join(known_models)})"
            )
    study_models = list(space["model"].options())
    hparams = {m: models.hyperparameters(m) for m in study_models}

    for key in space:
        if key in TRIAL_KEYS:
            continue
        model, backbone, hp = split_key(key)
        if model is not None:
            if model not in known_models:
                raise ValueError(
                    f"space key {key!r}: unknown model {model!r}{did_you_mean(model, known_models)}"
                )
            if model not in study_models:
                raise ValueError(
                    f"space key {key!r} applies to model {model!r}, which the study's 'model' "
                    f"does not include ({', '.join(study_models)})"
                )
            if backbone is not None:
                _check_backbone_key(study, key, hparams[model])
                continue
            if hp in PER_MODEL_TRIAL_KEYS:
                continue
            if hp not in hparams[model] or hp == "seed":
                raise ValueError(
                    f"space key {key!r}: model {model!r} has no hyperparameter {hp!r}"
                    f"{did_you_mean(hp, hparams[model])} "
                    f"(known: {', '.join(sorted(h for h in hparams[model] if h != 'seed'))})"
                )
        elif BACKBONE_MARK in key:
            raise ValueError(
                f"space key {key!r}: a per-(model, backbone) key is "
                f"MODEL{BACKBONE_MARK}BACKBONE.HYPERPARAMETER (e.g. "
                f"'fastflow{BACKBONE_MARK}cait_m48_448.flow_steps')"
            )
        elif not any(key in hps for hps in hparams.values()):
            every = sorted({h for hps in hparams.values() for h in hps} | set(TRIAL_KEYS))
            raise ValueError(
                f"space key {key!r} is not a hyperparameter of any model in the study"
                f"{did_you_mean(key, every)} (known: {', '.join(every)})"
            )
    if "backbone" in space and space["backbone"].is_enumerable:
        from models.backbones import list_backbones

        known_backbones = list_backbones()
        for name in space["backbone"].options():
            if name not in known_backbones:
                raise ValueError(
                    f"space key 'backbone': unknown backbone {name!r}"
                    f"{did_you_mean(name, known_backbones)} (known: {', '.join(known_backbones)})"
                )
    _check_backbone_pairs(study, study_models, hparams)
    size_keys = [k for k in space if k == "image_size" or k.endswith(".image_size")]
    for key in ("seed", "epochs", *size_keys):
        if key in space:
            param = space[key]
            if param.kind in ("uniform", "loguniform"):
                raise ValueError(f"space key {key!r} takes whole numbers, not {param.kind}")
            for value in param.options():
                if key in size_keys and value == NATIVE_SIZE:
                    continue
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    expected = (
                        "a whole number or 'native'" if key in size_keys else "a whole number"
                    )
                    raise ValueError(f"space key {key!r}: expected {expected}, got {value!r}")
                if key in size_keys and value < 32:
                    raise ValueError(f"space key {key!r}: {value} is below the minimum of 32")
    if study.search.algorithm == "grid":
        for key, param in space.items():
            if not param.is_enumerable:
                raise ValueError(
                    f"space key {key!r}: a {param.kind} distribution cannot be enumerated by "
                    "search algorithm 'grid'; use 'random' or 'optuna', or a grid of values"
                )


def _check_backbone_key(study: Study, key: str, known: Mapping[str, Any]) -> None:
    """A per-(model, backbone) key must name a backbone some of the model's trials in this study
    use, and set one of the model's hyperparameters."""
    from models.backbones import list_backbones

    model, backbone, hp = split_key(key)
    assert model is not None and backbone is not None
    if "backbone" not in known:
        raise ValueError(
            f"space key {key!r}: model {model!r} takes no backbone; give its hyperparameters "
            f"as '{model}.{hp}'"
        )
    known_backbones = list_backbones()
    if backbone not in known_backbones:
        raise ValueError(
            f"space key {key!r}: unknown backbone {backbone!r}"
            f"{did_you_mean(backbone, known_backbones)} (known: {', '.join(known_backbones)})"
        )
    used = space_options(study, model, "backbone") or ()
    if backbone not in used:
        raise ValueError(
            f"space key {key!r}: no {model} trial of the study runs on {backbone!r} "
            f"({model}'s backbones here: {', '.join(map(str, used))})"
        )
    if hp == "image_size" or (hp == "epochs" and "epochs" in known):
        # Per backbone they would split a model's sizes and budgets everywhere data is prepared,
        # trials are costed and epochs scheduled; 'native' already covers sizes that follow the
        # backbone.
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


def space_options(
    study: Study, model: str, name: str, backbone: str | None = None
) -> tuple[Any, ...] | None:
    """Every value hyperparameter ``name`` takes in ``model``'s trials (on ``backbone`` where
    given): the options of the most specific space key that gives it, else the detector's
    signature default; None where a continuous distribution samples it."""
    import models

    known = models.hyperparameters(model)
    for key in key_candidates(model, name, backbone):
        # A shared key reaches only the detectors that have the hyperparameter.
        if key in study.space and (key != name or name in known):
            param = study.space[key]
            return param.options() if param.is_enumerable else None
    return (known.get(name),)


def _check_backbone_pairs(
    study: Study, study_models: list[str], hparams: Mapping[str, Mapping[str, Any]]
) -> None:
    """Fail on any model x backbone x layers x image size the grid would produce but cannot run."""
    import models

    for model in study_models:
        if "backbone" not in hparams[model]:
            continue
        backbones = space_options(study, model, "backbone")
        sizes = _size_options(study, model)
        if backbones is None or sizes is None:
            continue
        for backbone in backbones:
            # Layers may be given per backbone (model@backbone.layers).
            layer_options = (
                space_options(study, model, "layers", backbone)
                if "layers" in hparams[model]
                else (None,)
            )
            if layer_options is None:
                continue
            for layers, size_option in itertools.product(layer_options, sizes):
                size = resolve_image_size(study, backbone, size_option)
                given = {} if layers is None else {"layers": _freeze(layers)}
                problem = models.backbone_problem(model, backbone, given, size)
                if problem is None:
                    continue
                usable = models.compatible_backbones(model, given, size)
                where = f" with layers {list(layers)}" if layers is not None else ""
                hint = (
                    f"; at {size} px{where} it can use: {', '.join(usable)}"
                    if usable
                    else f"; no registered backbone works with it at {size} px{where}"
                )
                raise ValueError(
                    f"model {model!r} cannot use backbone {backbone!r}{where} at {size} px: "
                    f"{problem}{hint} (give each model its own backbones with "
                    f"'{model}.backbone')"
                )


def _size_options(study: Study, model: str) -> tuple[Any, ...] | None:
    """The image sizes (ints or 'native') a model's trials may take; None when sampled."""
    key = first_key(study.space, model, "image_size")
    if key is None:
        return (study.dataset.image_size,)
    param = study.space[key]
    return param.options() if param.is_enumerable else None


def resolve_image_size(study: Study, backbone: str | None, size: Any) -> int:
    """A trial's image size in pixels: ``size``, or for 'native' the backbone's fixed input size
    (the data set's ``image_size`` for a backbone that takes any size)."""
    if size != NATIVE_SIZE:
        return int(size)
    if backbone is not None:
        from models.backbones import get_backbone

        native = get_backbone(backbone).input_size
        if native is not None:
            return int(native)
    return study.dataset.image_size


def study_image_sizes(study: Study) -> list[int]:
    """Every image size a trial of the study can have (the data is prepared at each)."""
    import models

    sizes: set[int] = set()
    for model in study.models:
        options = _size_options(study, model)
        if options is None:  # a sampled size: its bounds
            param = study.space[first_key(study.space, model, "image_size")]
            options = (int(param.low or 0), int(param.high or 0))
        backbones: tuple[Any, ...] = (None,)
        if "backbone" in models.hyperparameters(model):
            backbones = space_options(study, model, "backbone") or (None,)
        for size in options:
            for backbone in backbones:
                sizes.add(resolve_image_size(study, backbone, size))
    return sorted(sizes)


# --------------------------------------------------------------------------- loading


def load_study(path: str | Path, overrides: Sequence[str] = ()) -> Study:
    """Read, override (``key.path=value``) and validate a study file.

    Every problem is a :class:`StudyError` naming the file, the key and what was expected.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise StudyError("no such study file", path=str(path)) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        message = f"cannot read the study file ({exc.__class__.__name__})"
        raise StudyError(message, path=str(path)) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise StudyError(f"{where}invalid YAML: {problem}", path=str(path)) from None
    if not isinstance(raw, dict):
        raise StudyError(
            "a study file is a YAML mapping (name:, dataset:, space:, ...)", path=str(path)
        )
    for override in overrides:
        apply_override(raw, override, source=str(path))
    return study_from_dict(raw, source=str(path))


def study_from_dict(raw: Mapping[str, Any], source: str | None = None) -> Study:
    """Validate a study given as a mapping (what a YAML file holds)."""
    try:
        return Study.model_validate({**raw, "source": source})
    except ValidationError as exc:
        raise StudyError(_explain(exc, raw), path=source) from None


def _explain(exc: ValidationError, raw: Mapping[str, Any]) -> str:
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        key = ".".join(loc)
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            section = _section_fields(loc[:-1])
            message = f"unknown key {loc[-1]!r}{did_you_mean(loc[-1], section)}"
            if section:
                message += f" (known: {', '.join(section)})"
        elif error["type"] == "missing":
            message = "required key is missing"
        elif "input" in error and error["type"] not in ("value_error", "assertion_error"):
            message = f"{message} (got {error['input']!r})"
        lines.append(f"{key}: {message}" if key else message)
    return "; ".join(lines)


def _section_fields(loc: list[str]) -> list[str]:
    model: type[BaseModel] | None = Study
    for part in loc:
        info = model.model_fields.get(part) if model else None
        annotation = info.annotation if info else None
        model = (
            annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else None
        )
        if model is None:
            for arg in getattr(annotation, "__args__", ()):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    model = arg
    if model is None:
        return []
    return [name for name in model.model_fields if name != "source"]


_UNSET = object()


def apply_override(
    raw: dict, override: str, source: str | None = None, *, value: Any = _UNSET
) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a raw study mapping in place; with
    ``value`` given, ``override`` is the dotted key alone.

    Space keys contain dots themselves (``patchcore.coreset_ratio``), so everything after
    ``space.`` is one key.
    """
    if value is _UNSET:
        if "=" not in override:
            raise StudyError(f"--set expects key=value, got {override!r}", path=source)
        dotted, _, text = override.partition("=")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise StudyError(
                f"--set {dotted.strip()}: value {text!r} is not valid YAML", path=source
            ) from None
    else:
        dotted = override
    dotted = dotted.strip()
    parts = dotted.split(".")
    if parts[0] == "space" and len(parts) > 2:
        parts = ["space", ".".join(parts[1:])]
    if not all(parts):
        raise StudyError(f"--set: bad key {dotted!r}", path=source)
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise StudyError(f"--set {dotted}: {part!r} is not a mapping", path=source)
        node = child
    node[parts[-1]] = value


# --------------------------------------------------------------------------- trials


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
            "hparams": {k: _jsonable(v) for k, v in sorted(self.hparams.items())},
            # Left out when unused, so that trials without variants keep their ids.
            **{k: getattr(self, k) for k in VARIANT_KEYS if getattr(self, k) != "none"},
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TrialConfig:
        return cls(
            model=raw["model"],
            seed=int(raw["seed"]),
            image_size=int(raw["image_size"]),
            epochs=None if raw.get("epochs") is None else int(raw["epochs"]),
            hparams={k: _freeze(v) for k, v in raw.get("hparams", {}).items()},
            augmentation=str(raw.get("augmentation", "none")),
            stress=str(raw.get("stress", "none")),
        )

    def label(self) -> str:
        parts = [self.model]
        if self.backbone:
            parts.append(self.backbone)
        variants = "".join(
            f" {k}={getattr(self, k)}" for k in VARIANT_KEYS if getattr(self, k) != "none"
        )
        return "/".join(parts) + f" seed={self.seed} {self.image_size}px" + variants


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# How timing is scheduled, and how many example maps a trial saves beside its row, do not
# change what a trial computes: neither is part of its config hash.
_TIMING_POLICY = {"exclusive_timing", "timing_lock_timeout_s"}
_NOT_IN_HASH = _TIMING_POLICY | {"example_maps", "models"}


def config_hash(study: Study, trial: TrialConfig) -> str:
    """A stable id of everything that determines a trial's result.

    Study name, output, resources and concurrency are left out: the same configuration on the
    same data gives the same result wherever it runs.
    """
    identity: dict[str, Any] = {
        "trial": trial.to_dict(),
        "dataset": study.dataset.model_dump(exclude={"image_size"}, exclude_none=True),
        "evaluation": study.evaluation.model_dump(exclude=_NOT_IN_HASH),
    }
    # A per-model batch size is part of that model's trials only (and of no one's when unset).
    train_batch, eval_batch = study.evaluation.batch_sizes(trial.model)
    identity["evaluation"].update(train_batch_size=train_batch, batch_size=eval_batch)
    # A variant's definition, not only its name, decides the result.
    if trial.augmentation != "none":
        identity["augmentation"] = study.augmentation_sets[trial.augmentation].spec()
    if trial.stress != "none":
        identity["stress"] = study.stress_specs[trial.stress].spec()
    # A pretrained part is named by path; what the path holds decides the result too, so a
    # teacher distilled again into the same file makes new configurations.
    contents = _part_contents(trial.hparams)
    if contents:
        identity["parts"] = contents
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _part_contents(hparams: Mapping[str, Any]) -> dict[str, str | None]:
    """The content fingerprint (``models.parts.part_fingerprint``) of every pretrained-part path
    a trial sets: a file's SHA-256, a texture folder's manifest hash, an image folder's listing
    hash. A path that holds nothing gets None (validation refuses it before any trial runs)."""
    from models.parts import PART_HYPERPARAMETERS, part_fingerprint

    return {
        name: part_fingerprint(str(value), PART_HYPERPARAMETERS[name])
        for name, value in sorted(hparams.items())
        if name in PART_HYPERPARAMETERS and isinstance(value, str)
    }


def resolve_trial(study: Study, assignment: Mapping[str, Any]) -> TrialConfig:
    """Turn one value per space key into a trial, keeping only what applies to its model and
    backbone (the most specific key of :func:`key_candidates` wins)."""
    import models

    model = assignment["model"]
    known = models.hyperparameters(model)
    seed = int(assignment.get("seed", 0))
    # Per-(model, backbone) keys depend on the backbone, which is settled first.
    backbone = assigned_backbone(model, assignment)
    hparams: dict[str, Any] = {}
    for hp in known:
        if hp in TRIAL_KEYS:  # seed and epochs are the trial's, set below
            continue
        for key in key_candidates(model, hp, backbone):
            if key in assignment:
                hparams[hp] = _freeze(assignment[key])
                break
    if "seed" in known:
        hparams["seed"] = seed
    # The training budget and the size are the trial's (what fit, the scheduler and the data
    # preparation use), per model too.
    epochs_key = first_key(assignment, model, "epochs")
    epochs = None if epochs_key is None else assignment[epochs_key]
    size_key = first_key(assignment, model, "image_size")
    size = study.dataset.image_size if size_key is None else assignment[size_key]
    return TrialConfig(
        model=model,
        seed=seed,
        image_size=resolve_image_size(study, backbone, size),
        epochs=None if epochs is None else int(epochs),
        hparams=hparams,
        augmentation=str(assignment.get("augmentation", "none")),
        stress=str(assignment.get("stress", "none")),
    )


def assigned_backbone(model: str, assignment: Mapping[str, Any]) -> str | None:
    """The backbone of ``model``'s trial under ``assignment`` (its own key, else the shared one,
    else its default); None for a detector without one."""
    import models

    known = models.hyperparameters(model)
    if "backbone" not in known:
        return None
    key = first_key(assignment, model, "backbone")
    if key is None:
        return known["backbone"]
    return None if assignment[key] is None else str(assignment[key])


def assignment_from_sampler(study: Study, sampled: Mapping[str, Any]) -> dict[str, Any]:
    """A full assignment from what a sampler chose: fixed keys added, indexed choices decoded.

    Optuna's categorical choices must be scalars, so list-valued options (e.g. layers) are
    sampled by index as ``<key>#index``.
    """
    assignment = {k: p.values[0] for k, p in study.space.items() if p.kind == "fixed"}
    for key, value in sampled.items():
        if key.endswith("#index"):
            name = key.removesuffix("#index")
            assignment[name] = study.space[name].values[int(value)]
        else:
            assignment[key] = value
    return assignment


def expand_trials(study: Study) -> list[TrialConfig]:
    """Every trial of a grid or random study, deduplicated, in a stable order.

    Grid: the cartesian product of every grid/choice key. Random: for each grid point,
    ``search.num_samples`` draws of the continuous keys and choices, from ``search.seed``.
    Keys that do not apply to a model (another model's hyperparameters, a backbone for a
    detector without one) would repeat a configuration; duplicates are dropped.
    """
    if study.search.algorithm == "optuna":
        raise ValueError("optuna studies are sampled during the run, not expanded")
    grid_keys = [k for k, p in study.space.items() if p.kind in ("fixed", "grid")]
    sampled_keys = [k for k in study.space if k not in grid_keys]
    if study.search.algorithm == "grid":
        grid_keys, sampled_keys = list(study.space), []
    rng = np.random.default_rng(study.search.seed)
    draws = study.search.num_samples if study.search.algorithm == "random" else 1
    seen: set[str] = set()
    trials: list[TrialConfig] = []
    for values in itertools.product(*(study.space[k].options() for k in grid_keys)):
        point = dict(zip(grid_keys, values, strict=True))
        for _ in range(draws):
            assignment = {**point, **{k: sample_param(study.space[k], rng) for k in sampled_keys}}
            trial = resolve_trial(study, assignment)
            digest = config_hash(study, trial)
            if digest not in seen:
                seen.add(digest)
                trials.append(trial)
    return trials


def sample_param(param: Param, rng: np.random.Generator) -> Any:
    """One draw of a parameter (random search)."""
    if param.kind in ("fixed", "grid", "choice"):
        return param.values[int(rng.integers(len(param.values)))]
    assert param.low is not None and param.high is not None
    if param.kind == "uniform":
        return float(rng.uniform(param.low, param.high))
    if param.kind == "loguniform":
        return float(math.exp(rng.uniform(math.log(param.low), math.log(param.high))))
    return int(rng.integers(int(param.low), int(param.high) + 1))


def study_to_yaml(study: Study) -> str:
    """The validated study as YAML (what a run records beside its results)."""
    raw = study.model_dump(mode="json", exclude={"source"})
    space = {}
    for key, param in study.space.items():
        if param.kind == "fixed":
            space[key] = _jsonable(param.values[0])
        elif param.kind in ("grid", "choice"):
            space[key] = {param.kind: [_jsonable(v) for v in param.values]}
        else:
            space[key] = {param.kind: [param.low, param.high]}
    raw["space"] = space
    return yaml.safe_dump(copy.deepcopy(raw), sort_keys=False)


# --------------------------------------------------------------------------- smoke form

DEFAULT_SMOKE_DATA_ROOT = "~/.cache/anomaly-sweep/glue-smoke"
SMOKE_IMAGE_SIZES = (64, 96)
SMOKE_DATASET = {
    "kind": "synthetic_glue",
    "category": "part1",
    "image_size": SMOKE_IMAGE_SIZES[0],
    "synthetic": {
        "n_train": 10,
        "n_val_good": 3,
        "n_val_defect": 1,
        "n_test_good": 4,
        "n_test_defect": 1,
        "height": 240,
        "width": 320,
    },
}
SMOKE_OPTUNA_TRIALS = 3


def check_hyperparameters(study: Study) -> None:
    """Raise :class:`StudyError` when a detector refuses a configuration the grid produces.

    Each distinct configuration (seeds aside) is built on PyTorch's meta device: the detector
    checks its arguments as it would in a trial, with no weights loaded or memory used (about
    0.1 s a configuration). Optuna draws are checked as they are sampled: a refused draw is an
    error row.
    """
    if study.search.algorithm == "optuna":
        return
    from models.base import ModelError, get_class
    from models.costs import build_on_meta

    refused: dict[str, str] = {}
    seen: set[str] = set()
    for trial in expand_trials(study):
        settings = {k: v for k, v in trial.hparams.items() if k != "seed"}
        label = ", ".join(f"{k}={v}" for k, v in sorted(settings.items()))
        key = f"{trial.model}({label})"
        if key in seen:
            continue
        seen.add(key)
        try:
            build_on_meta(get_class(trial.model), trial.hparams)
        except ModelError as error:
            refused[key] = str(error)
    if refused:
        shown = "; ".join(f"{key}: {reason}" for key, reason in list(refused.items())[:3])
        more = f" (and {len(refused) - 3} more)" if len(refused) > 3 else ""
        raise StudyError(
            f"{len(refused)} of {len(seen)} configurations are refused by their detector: "
            f"{shown}{more}",
            path=study.source,
            key="space",
        )


def smoke_form(
    study: Study, *, data_root: str | None = None, cache_dir: str | None = None
) -> Study:
    """The study shrunk to run in about a minute on a CPU: the same detectors, keys, variants
    and search, on tiny models and tiny data.

    Every detector gets its tiny configuration (``models.tiny``: random-init resnet18, narrow
    heads), one epoch, the first seed only, 64 px (two sizes, 64 and 96, where the study sweeps
    image sizes), a small generated glue-line part, optuna's trials cut to a few and a random
    search to one draw per grid point, one CPU per trial and no GPU; rows go to
    ``<output>-smoke`` under the name ``<name>-smoke``. The study's own ``smoke:`` block (dotted
    keys, as ``--set`` takes them) is applied last and may undo any of this.
    """
    import models
    from models.tiny import tiny_hparams

    raw = yaml.safe_load(study_to_yaml(study))
    space: dict[str, Any] = raw["space"]
    models_ = list(study.models)

    raw["name"] = f"{study.name}-smoke"
    raw["output"] = f"{study.output_dir.rstrip('/')}-smoke"
    raw["dataset"] = {
        **copy.deepcopy(SMOKE_DATASET),
        "root": data_root or DEFAULT_SMOKE_DATA_ROOT,
        "seed": study.dataset.seed,
    }
    if "seed" in space:
        seeds = study.space["seed"]
        space["seed"] = int(seeds.options()[0]) if seeds.is_enumerable else int(seeds.low or 0)
    if "image_size" in space:
        param = study.space["image_size"]
        count = len(set(param.options())) if param.is_enumerable else 1
        sizes = list(SMOKE_IMAGE_SIZES[: min(count, len(SMOKE_IMAGE_SIZES))])
        space["image_size"] = sizes[0] if len(sizes) == 1 else {"grid": sizes}
    iterative = any(models.get_class(m).learning_type == "iterative" for m in models_)
    if "epochs" in space or iterative:
        space["epochs"] = 1
    for key in list(space):
        name = key.partition(".")[2] or key
        if name == "epochs":
            space[key] = 1
        elif name == "image_size" and key != "image_size":
            space[key] = SMOKE_IMAGE_SIZES[0]
        elif name == "weights":
            del space[key]
    if "pretrained" in space:
        space["pretrained"] = False
    for model in models_:
        tiny = tiny_hparams(model)
        layers_key = f"{model}.layers" if f"{model}.layers" in space else "layers"
        if (
            "backbone" in tiny
            and "layers" not in tiny
            and layers_key in study.space
            and not _layers_fit(model, tiny["backbone"], study.space[layers_key])
        ):
            # The study's layers belong to its own backbones: the tiny one takes its defaults.
            space[f"{model}.layers"] = _jsonable(models.hyperparameters(model)["layers"])
        for hp, value in tiny.items():
            space[f"{model}.{hp}"] = _jsonable(value)
        for key in list(space):
            owner, backbone, hp = split_key(key)
            if owner != model or backbone is None:
                continue
            # The tiny configuration wins over per-backbone settings as it does over the
            # model's own; layers chosen for a full-size input may not exist at 64 px.
            if hp in tiny or (
                hp == "layers" and not _layers_fit(model, backbone, study.space[key])
            ):
                del space[key]
    search = raw["search"]
    if search.get("algorithm") == "optuna":
        search["n_trials"] = min(int(search["n_trials"]), SMOKE_OPTUNA_TRIALS)
    if search.get("algorithm") == "random":
        search["num_samples"] = 1
    if raw.get("scheduler"):
        raw["scheduler"]["max_t"] = 1
        raw["scheduler"]["grace_period"] = 1
    raw["resources"] = {"cpu": 1, "gpu": 0}
    raw["max_concurrent"] = min(int(raw.get("max_concurrent") or 2), 2)
    raw["evaluation"] = {
        **raw.get("evaluation", {}),
        "train_batch_size": min(int(raw.get("evaluation", {}).get("train_batch_size", 8)), 8),
        "batch_size": 8,
        "latency_warmup": 1,
        "latency_repeats": 3,
    }
    raw["evaluation"]["models"] = {
        model: {key: min(int(value), 8) for key, value in (sizes or {}).items() if value}
        for model, sizes in raw["evaluation"].get("models", {}).items()
    }
    if cache_dir is not None:
        raw["cache"] = {**raw.get("cache", {}), "dir": cache_dir}
    raw["smoke"] = {}
    for dotted, value in study.smoke.items():
        apply_override(raw, dotted, source=study.source, value=value)
    # A smoke block that drops models drops their own keys with them.
    kept = raw["space"]["model"]
    kept = set(kept.get("grid") or kept.get("choice") or ()) if isinstance(kept, dict) else {kept}
    for key in list(raw["space"]):
        owner, backbone, _ = split_key(key)
        if owner is not None and owner not in kept:
            del raw["space"][key]
        elif backbone is not None and f"space.{key}" not in study.smoke:
            # The smoke form runs other backbones (tiny ones): the study's settings for its
            # own backbones have nothing left to apply to. Those the smoke block gives stay,
            # and are validated like any key.
            used = _raw_backbones(raw["space"], owner)
            if used is not None and backbone not in used:
                del raw["space"][key]
    raw["resources"]["models"] = {}
    raw["evaluation"]["models"] = {
        model: sizes for model, sizes in raw["evaluation"]["models"].items() if model in kept
    }
    try:
        return study_from_dict(raw, source=study.source)
    except StudyError as exc:
        where = f"{study.source}: " if study.source else ""
        raise StudyError(
            f"the smoke form of the study is invalid: {str(exc).removeprefix(where)} (adjust "
            "the study's smoke: block)",
            path=study.source,
        ) from None


def _raw_backbones(space: Mapping[str, Any], model: str | None) -> set[Any] | None:
    """The backbones ``model``'s trials use under a raw (YAML) space; None when that cannot be
    read (a bad value, reported when the space is validated)."""
    import models

    if model is None or model not in models.list_models():
        return None
    known = models.hyperparameters(model)
    for key in key_candidates(model, "backbone"):
        if key in space:
            try:
                return set(_parse_param(key, space[key]).options())
            except ValueError:
                return None
    return {known.get("backbone")}


def _layers_fit(model: str, backbone: str, param: Param) -> bool:
    import models

    if not param.is_enumerable:
        return False
    return all(
        models.backbone_problem(model, backbone, {"layers": value}, SMOKE_IMAGE_SIZES[0]) is None
        for value in param.options()
    )
