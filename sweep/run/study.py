"""Study files: the YAML schema (pydantic), loading with ``--set`` overrides, and the identity
of a study's trials.

A study names a data set, a search space over detectors and their hyperparameters, a search
algorithm, the objectives and the resources of each trial. ``load_study`` reads and validates a
file; the space itself, what its keys resolve to and how it is enumerated, is
:class:`sweep.run.space.Space` (``Study.search_space``); ``expand_trials`` lists a grid or random
study's trials and ``config_hash`` names each one by everything that decides its result.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

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

from data.anomalies import SYNTHETIC_KINDS
from data.augment import augmentation_sets, parse_augmentation_sets
from data.datasets import dataset_files
from data.errors import DatasetError
from data.roi import fingerprint as roi_fingerprint
from data.stress import BUILTIN_STRESSES, parse_stresses
from data.synthetic_glue import GlueSetConfig
from models.base import get_class, shape_problem
from models.base import hyperparameters as models_hyperparameters
from models.costs import build_on_meta
from models.errors import ModelError
from models.parts import PART_HYPERPARAMETERS, part_fingerprint
from sweep.errors import StudyError, did_you_mean
from sweep.results import Objective
from sweep.run.metrics import ThresholdPolicy
from sweep.run.space import (
    INT64_LIMIT,
    Param,
    Space,
    TrialConfig,
    parse_param,
    seed_problem,
    split_key,
)

DEFAULT_DATA_ROOT = "~/.cache/anomaly-sweep/glue"
DEFAULT_CACHE_DIR = "~/.cache/anomaly-sweep/features"
CACHE_DIR_ENV = "ANOMALY_SWEEP_CACHE_DIR"
MAX_NAME_LENGTH = 100
"""The longest study name (see ``Study._slug``)."""
SMOKE_SUFFIX = "-smoke"
"""What the smoke form (``sweep.run.smoke``) appends to a study's name."""
MAX_NUM_SAMPLES = 10_000
"""The most draws per grid point a random search takes (``search.num_samples``)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_seed(value: Any) -> Any:
    """A seed field's value, checked before pydantic's int coercion (which takes 1e23 as a
    float and 2**63 as an int that no row can hold)."""
    problem = seed_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


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
    image_size: int | tuple[int, int] = Field(
        256,
        description="a side in pixels (square images), or [height, width]: then a trial's "
        "image_size sets the shorter side and the other follows this aspect ratio",
    )
    seed: int = Field(0, description="seed of data generation and of data splits")
    normal_dir: str | None = None
    abnormal_dir: str | None = None
    mask_dir: str | None = None
    val_fraction: float | None = Field(None, gt=0, lt=1)
    test_fraction: float | None = Field(None, gt=0, lt=1)
    synthetic: SyntheticGlueConfig | None = None
    resize: Literal["stretch", "pad", "crop"] | None = Field(
        None,
        description="how images of another aspect ratio than image_size's reach it: stretch "
        "(the default), pad (letterbox; the border counts for no metric) or crop (centre)",
    )
    roi: str | None = Field(
        None,
        description="region of interest: one mask image for every image, or a folder of masks "
        "by image stem (nonzero = inside); outside it images are blanked, maps are at their "
        "minimum, defects do not count and pixel metrics are not computed (data/roi.py)",
    )
    bit_depth: Literal[8, 10, 12, 14, 16, "auto"] = Field(
        "auto",
        description="bit depth of the data in 16-bit image files (12-bit cameras write 16-bit "
        "PNGs): 0..2**bit_depth-1 maps onto 0..255, and a file with a larger value is refused; "
        "auto infers it from the largest value of the training images (10, 12, 14 or 16 bits). "
        "8-bit files are read as they are",
    )

    _seed = field_validator("seed", mode="before")(_check_seed)

    @field_validator("image_size", mode="before")
    @classmethod
    def _image_size(cls, value: Any) -> Any:
        pair = isinstance(value, (list, tuple))
        sides = list(value) if pair else [value]
        if len(sides) != (2 if pair else 1) or any(
            not isinstance(s, int) or isinstance(s, bool) for s in sides
        ):
            raise ValueError(
                f"expected a whole number of pixels, or two of them (height, width), got {value!r}"
            )
        for side in sides:
            if not 32 <= side <= 4096:
                raise ValueError(f"{side} px is outside 32-4096")
        # A square pair is the plain size: the same trials and config hashes.
        return sides[0] if len(set(sides)) == 1 else tuple(sides)

    @field_validator("roi")
    @classmethod
    def _absolute_roi(cls, value: str | None) -> str | None:
        # Trials run in Ray's trial folders, not where the study was loaded: a relative path
        # is taken from the directory the study is loaded in, as a command line would.
        return None if value is None else str(Path(value).expanduser().absolute())

    @property
    def base_size(self) -> int:
        """The image size a trial takes by default: the side, or the shorter of [height,
        width]."""
        return self.image_size if isinstance(self.image_size, int) else min(self.image_size)

    def shape(self, size: int) -> tuple[int, int]:
        """(height, width) of a trial's images at ``size``: square for a side, else ``size``
        for the shorter side and the other at ``image_size``'s aspect ratio."""
        if isinstance(self.image_size, int):
            return size, size
        height, width = self.image_size
        short = min(height, width)
        return round(height * size / short), round(width * size / short)

    @property
    def resize_mode(self) -> str:
        return self.resize or "stretch"

    def identity(self) -> dict[str, Any]:
        """What of the data set decides a trial's result (its part of the config hash).

        The image size is the trial's; a non-square aspect is added, and the ROI is named by
        what its file holds, not where it lives (as weights are). Keys at their defaults are
        left out, so hashes of earlier studies stay."""
        identity = self.model_dump(exclude={"image_size", "roi"}, exclude_none=True)
        if identity.get("resize") == "stretch":
            del identity["resize"]  # what an unset resize does
        if identity["bit_depth"] == "auto":
            del identity["bit_depth"]  # the default: hashes from before the key existed stay
        if not isinstance(self.image_size, int):
            identity["aspect"] = list(self.image_size)
        if self.roi is not None:
            identity["roi_sha256"] = roi_fingerprint(self.roi)
        return identity

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
        shape = self.shape(image_size)
        args: dict[str, Any] = {
            "image_size": image_size if shape[0] == shape[1] else shape,
            "seed": self.seed,
        }
        # Only when set, so that the data cache keys of earlier studies stay.
        if self.resize is not None:
            args["resize"] = self.resize
        if self.roi is not None:
            args["roi"] = str(Path(self.roi).expanduser())
        if self.bit_depth != "auto":
            args["bit_depth"] = self.bit_depth
        if self.kind == "synthetic_glue":
            args["root"] = str(Path(self.root or DEFAULT_DATA_ROOT).expanduser())
            args["category"] = self.category or "part1"
            if self.synthetic is not None:
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


def _check_shapes(study: Study) -> None:
    """Fail, naming the detector, where a non-square ``dataset.image_size`` meets a detector or
    backbone that needs square images."""
    dataset = study.dataset
    if isinstance(dataset.image_size, int):
        return
    space = study.search_space
    checks: set[tuple[str, str | None, Any, int]] = set()
    for pair in space.backbone_pairs():
        checks.add((pair.model, pair.backbone, pair.layers, pair.image_size))
    for model in study.models:
        if "backbone" not in models_hyperparameters(model):
            for size in space.image_size_options(model) or (dataset.base_size,):
                checks.add((model, None, None, space.image_size(None, size)))
    for model, backbone, layers, size in sorted(checks, key=repr):
        height, width = dataset.shape(size)
        hparams = None if layers is None else {"layers": layers}
        problem = shape_problem(model, backbone, height, width, hparams)
        if problem is not None:
            on = f" on backbone {backbone!r}" if backbone else ""
            raise ValueError(
                f"dataset.image_size {list(dataset.image_size)}: model {model!r}{on} cannot "
                f"read {height}x{width} (H x W) images: {problem} (use a square image_size; "
                "dataset.resize: pad or crop keeps the images' aspect ratio)"
            )


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
    # Bounded: every draw is listed before anything runs (sweep validate, sweep run), and a
    # billion of them would fill the driver's memory first.
    num_samples: int = Field(
        1, ge=1, le=MAX_NUM_SAMPLES, description="random: draws per grid point"
    )
    seed: int = 0
    storage: str | None = Field(
        None,
        description="optuna: where the Optuna study lives; 'journal' (the default) is a journal "
        "file under the output (<output>/_optuna/journal.log, which optuna-dashboard opens and a "
        "re-run resumes from), 'memory' keeps nothing, anything else is an RDB URL "
        "(sqlite:///path.db, postgresql://...)",
    )

    _seed = field_validator("seed", mode="before")(_check_seed)

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


class ResourceOverride(_Strict):
    """A trial's resource request; a key left out takes the detector's default."""

    # Finite: Ray takes no infinite request (and .inf read as a GPU count broke validation).
    cpu: float | None = Field(None, gt=0, allow_inf_nan=False)
    gpu: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="GPUs: a fraction packs trials on one GPU"
    )
    memory_gb: float | None = Field(None, gt=0, allow_inf_nan=False, description="host memory")

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

    train_batch_size: int | None = Field(None, ge=1, lt=INT64_LIMIT)
    batch_size: int | None = Field(None, ge=1, lt=INT64_LIMIT)


class EvaluationConfig(_Strict):
    # A row stores batch sizes as int64 (eval_batch_size).
    train_batch_size: int = Field(32, ge=1, lt=INT64_LIMIT)
    batch_size: int = Field(
        32, ge=1, lt=INT64_LIMIT, description="eval batch size (throughput is measured at it)"
    )
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

    threshold: str | dict[str, float] = Field(
        "f1_max",
        description="how the decision threshold is chosen on the validation split: f1_max, "
        "youden, iou_max, precision_at:P ({precision_at: 0.95}) or fixed:V ({fixed: 0.5}); "
        "the test split is judged at it and the row records policy and value",
    )
    pixel_threshold: str | dict[str, float] | None = Field(
        None, description="the pixel-level threshold policy (default: threshold's)"
    )
    validation: Literal["auto", "split", "from_test", "synthetic"] = Field(
        "auto",
        description="where the validation anomalies that thresholds are chosen on come from: "
        "the data set's validation split, a share of its test split (val_from_test, then left "
        "out of test), or synthetic anomalies made from half of the normal validation images; "
        "auto = the split when it holds anomalies, else synthetic",
    )
    val_from_test: float = Field(
        0.2, gt=0, lt=1, description="share of the test images moved to validation (from_test)"
    )
    synthetic_anomalies: str = Field(
        "cutpaste",
        description="generator of synthetic validation anomalies (data/anomalies.py): "
        + ", ".join(SYNTHETIC_KINDS),
    )

    keep_models: Literal["none", "front", "all"] = Field(
        "none",
        description="keep each trial's fitted detector under <output>/_models (all), or those "
        "of the configurations on the Pareto front of the study's objectives once the run ends "
        "(front), for sweep export to use instead of a refit",
    )

    @field_validator("synthetic_anomalies")
    @classmethod
    def _known_generator(cls, kind: str) -> str:
        if kind not in SYNTHETIC_KINDS:
            raise ValueError(
                f"unknown synthetic anomaly kind {kind!r}{did_you_mean(kind, SYNTHETIC_KINDS)} "
                f"(known: {', '.join(SYNTHETIC_KINDS)})"
            )
        return kind

    @field_validator("threshold", "pixel_threshold")
    @classmethod
    def _known_policy(cls, value: Any) -> Any:
        if value is None:
            return None
        return str(ThresholdPolicy.parse(value))

    @property
    def threshold_policy(self) -> ThresholdPolicy:
        return ThresholdPolicy.parse(self.threshold)

    @property
    def pixel_threshold_policy(self) -> ThresholdPolicy:
        return ThresholdPolicy.parse(self.pixel_threshold or self.threshold)

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
        # A file name holds 255 bytes on most file systems, and the name is only the start of
        # some: Ray Tune's run folder is <name>-<run id> (16 more) with trial folders below, and
        # the smoke form is <name>-smoke (whose own suffix is not counted here). 100 leaves room.
        if len(name.removesuffix(SMOKE_SUFFIX)) > MAX_NAME_LENGTH:
            raise ValueError(
                f"{len(name)} characters; at most {MAX_NAME_LENGTH} (it names files and folders)"
            )
        return name

    @field_validator("space", mode="before")
    @classmethod
    def _parse_space(cls, raw: Any) -> dict[str, Param]:
        if not isinstance(raw, Mapping) or not raw:
            raise ValueError("the space is a non-empty mapping of key -> value or distribution")
        return {str(k): parse_param(str(k), v) for k, v in raw.items()}

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
        # The smoke form reads the models it keeps before it validates anything.
        if "space" in raw:
            raise ValueError(
                "smoke: give the space's keys one by one (space.image_size: 64), not 'space' whole"
            )
        if "space.model" in raw and _model_option_problem(raw["space.model"]):
            raise ValueError(
                "smoke: space.model: expected a model name or {grid|choice: [names]}, got "
                f"{raw['space.model']!r}"
            )
        return raw

    @model_validator(mode="after")
    def _check_space(self) -> Study:
        self.search_space.check(self.search.algorithm)
        _check_shapes(self)
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
    def search_space(self) -> Space:
        """The space (``space:``) as a :class:`Space`: what every trial's keys resolve to."""
        return Space(self.space, self.dataset.base_size)

    @functools.cached_property
    def augmentation_sets(self) -> dict[str, Any]:
        """Every training augmentation set the study can name: builtins and its own."""
        return augmentation_sets(self.augmentations)

    @functools.cached_property
    def stress_specs(self) -> dict[str, Any]:
        """Every test-time stress the study can name: builtins and its own."""
        return {**BUILTIN_STRESSES, **parse_stresses(self.stresses)}

    @property
    def output_dir(self) -> str:
        return self.output or f"results/{self.name}"

    @property
    def models(self) -> tuple[str, ...]:
        return self.search_space.models


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
            if not isinstance(name, str) or name not in known:
                raise ValueError(
                    f"space key {key!r}: unknown {key} {name!r}{did_you_mean(str(name), known)} "
                    f"(known: {', '.join(known)}; define your own under '{section}:')"
                )


# --------------------------------------------------------------------------- loading


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping at any level: PyYAML keeps
    the last one silently (YAML itself says keys are unique). A merge (``<<: *base``) may still
    be overridden: that is what it is for."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                again = key in first
            except TypeError:  # an unhashable key, which the mapping refuses itself
                continue
            if again:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first on line {first[key]}, again on line {line}; "
                    "the second would replace the first)",
                    key_node.start_mark,
                )
            first[key] = line
        return super().construct_mapping(node, deep=deep)


def load_study(
    path: str | Path, overrides: Sequence[str] = (), notes: list[str] | None = None
) -> Study:
    """Read, override (``key.path=value``) and validate a study file.

    Every problem is a :class:`StudyError` naming the file, the key and what was expected. An
    override that narrows ``space.model`` drops the keys of the models it leaves out (see
    :func:`drop_keys_of_models_left_out`); ``notes`` gets a line saying which.
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
        raw = yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise StudyError(f"{where}invalid YAML: {problem}", path=str(path)) from None
    if not isinstance(raw, dict):
        raise StudyError(
            "a study file is a YAML mapping (name:, dataset:, space:, ...)", path=str(path)
        )
    file_models = _raw_models(raw.get("space"))
    for override in overrides:
        apply_override(raw, override, source=str(path))
    note = drop_keys_of_models_left_out(raw, file_models, overrides)
    if note is not None and notes is not None:
        notes.append(note)
    return study_from_dict(raw, source=str(path))


def drop_keys_of_models_left_out(
    raw: dict, file_models: set[str] | None, overrides: Sequence[str]
) -> str | None:
    """Where ``--set space.model=...`` leaves out models the file has, drop those models' own
    keys (``patchcore.coreset_ratio``, ``patchcore@resnet18.layers``, ``resources.models`` and
    ``evaluation.models`` entries) from ``raw`` in place, else the commonest override would fail
    on keys it made moot; return a note naming them (None when nothing was dropped).

    Only models of the file that the override removed lose keys: a key of a model the file never
    had stays an error, and so does one the overrides give themselves.
    """
    given = {o.partition("=")[0].strip() for o in overrides}
    models = _raw_models(raw.get("space"))
    if "space.model" not in given or file_models is None or models is None:
        return None
    left_out = file_models - models
    dropped: list[str] = []
    for key in list(raw["space"]):
        if split_key(str(key)).model in left_out and f"space.{key}" not in given:
            del raw["space"][key]
            dropped.append(f"space.{key}")
    for section in ("resources", "evaluation"):
        block = raw.get(section)
        per_model = block.get("models") if isinstance(block, dict) else None
        if not isinstance(per_model, dict):
            continue
        for model in list(per_model):
            name = f"{section}.models.{model}"
            if model in left_out and not any(g == name or g.startswith(f"{name}.") for g in given):
                del per_model[model]
                dropped.append(name)
    if not dropped:
        return None
    return (
        f"--set space.model leaves out {', '.join(sorted(left_out))}: dropped their keys "
        f"{', '.join(dropped)}"
    )


def _model_option_problem(value: Any) -> bool:
    """Whether ``value`` is not a model name or a ``{grid|choice: [names]}``."""
    if isinstance(value, Mapping):
        names = next(iter(value.values())) if len(value) == 1 else None
        if next(iter(value), None) not in ("grid", "choice") or not isinstance(names, list):
            return True
        return not names or not all(isinstance(n, str) for n in names)
    return not isinstance(value, str)


def _raw_models(space: Any) -> set[str] | None:
    """The model names a raw (YAML) space's ``model`` gives, a name or a grid/choice of them;
    None when it gives none readable (validation says why)."""
    if not isinstance(space, Mapping):
        return None
    value = space.get("model")
    if isinstance(value, Mapping) and len(value) == 1:
        value = next(iter(value.values()))
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) for v in values):
        return None
    return set(values)


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
    ``space.`` is one key; so is everything after ``smoke.``, whose keys are dotted study keys
    (``smoke.space.image_size=64``).
    """
    if value is _UNSET:
        if "=" not in override:
            raise StudyError(f"--set expects key=value, got {override!r}", path=source)
        dotted, _, text = override.partition("=")
        try:
            value = yaml.load(text, Loader=UniqueKeyLoader)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None)
            raise StudyError(
                f"--set {dotted.strip()}: value {text!r} is not valid YAML"
                + (f": {problem}" if problem else ""),
                path=source,
            ) from None
    else:
        dotted = override
    dotted = dotted.strip()
    parts = dotted.split(".")
    if parts[0] in ("space", "smoke") and len(parts) > 2:
        parts = [parts[0], ".".join(parts[1:])]
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


# How timing is scheduled, and how many example maps a trial saves beside its row, do not
# change what a trial computes: neither is part of its config hash.
_TIMING_POLICY = {"exclusive_timing", "timing_lock_timeout_s"}
_NOT_IN_HASH = _TIMING_POLICY | {"example_maps", "models", "keep_models"}
_HASHED_WHEN_SET = (
    "threshold",
    "pixel_threshold",
    "validation",
    "val_from_test",
    "synthetic_anomalies",
)


def config_hash(study: Study, trial: TrialConfig) -> str:
    """A stable id of everything that determines a trial's result.

    Study name, output, resources and concurrency are left out: the same configuration on the
    same data gives the same result wherever it runs.
    """
    identity: dict[str, Any] = {
        "trial": trial.to_dict(),
        "dataset": study.dataset.identity(),
        "evaluation": study.evaluation.model_dump(exclude=_NOT_IN_HASH),
    }
    # Settings added after results existed count only when they are changed, so that those
    # results keep their ids.
    for key in _HASHED_WHEN_SET:
        if identity["evaluation"][key] == EvaluationConfig.model_fields[key].default:
            del identity["evaluation"][key]
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
    return {
        name: part_fingerprint(str(value), PART_HYPERPARAMETERS[name])
        for name, value in sorted(hparams.items())
        if name in PART_HYPERPARAMETERS and isinstance(value, str)
    }


def expand_trials(study: Study) -> list[TrialConfig]:
    """Every trial of a grid or random study, deduplicated, in a stable order.

    Grid: the cartesian product of every key (:meth:`Space.grid`). Random: for each point of
    the fixed and grid keys, ``search.num_samples`` draws of the choices and continuous keys,
    from ``search.seed`` (:meth:`Space.sample`).
    """
    if study.search.algorithm == "optuna":
        raise ValueError("optuna studies are sampled during the run, not expanded")
    if study.search.algorithm == "grid":
        return study.search_space.grid()
    rng = np.random.default_rng(study.search.seed)
    return study.search_space.sample(rng, study.search.num_samples)


def study_to_yaml(study: Study) -> str:
    """The validated study as YAML (what a run records beside its results)."""
    raw = study.model_dump(mode="json", exclude={"source"})
    raw["space"] = study.search_space.to_yaml()
    return yaml.safe_dump(copy.deepcopy(raw), sort_keys=False)


# --------------------------------------------------------------------------- one output, one study

# What decides no result (how timing is scheduled, what is saved beside a row): a continuation
# may change it.
_EVALUATION_NOT_IDENTITY = _TIMING_POLICY | {"example_maps", "keep_models"}


def study_identity(study: Study) -> dict[str, Any]:
    """What makes two runs one study (see :func:`continuation_problem`): the name, the data
    set, the evaluation (less the keys that decide no result) and the objectives."""
    return {
        "name": study.name,
        "dataset": study.dataset.model_dump(mode="json"),
        "evaluation": study.evaluation.model_dump(mode="json", exclude=_EVALUATION_NOT_IDENTITY),
        "objectives": [o.model_dump(mode="json") for o in study.objectives],
    }


def continuation_problem(saved: Study, study: Study) -> str | None:
    """Why ``study`` is not a continuation of ``saved`` (the study an output holds), in words;
    None when it is one.

    A continuation has the same identity (:func:`study_identity`), keeps the definitions of the
    augmentation sets and stresses ``saved`` defined (it may add more), runs the same search
    algorithm, and only adds trials: every trial of a grid ``saved`` is one of ``study``'s; a
    random search may also draw more (the same space and ``search.seed``, at least as many
    ``num_samples``); an Optuna study keeps its space, sampler, seed and storage (``n_trials``
    may change). Everything else (resources, concurrency, the scheduler, the cache, where
    weights are, the smoke block, the description) may change."""
    changed = _differences(study_identity(saved), study_identity(study))
    for section in ("augmentations", "stresses"):
        old, new = getattr(saved, section), getattr(study, section)
        changed += [f"{section}.{name}" for name in sorted(old) if new.get(name) != old[name]]
    if changed:
        return _changed_keys(changed, saved, study)
    old_search, new_search = saved.search, study.search
    if old_search.algorithm != new_search.algorithm:
        return f"search.algorithm: {old_search.algorithm} -> {new_search.algorithm}"
    same_space = saved.search_space.to_yaml() == study.search_space.to_yaml()
    if old_search.algorithm == "optuna":
        changed = [
            f"search.{key}"
            for key in ("sampler", "seed", "storage")
            if getattr(old_search, key) != getattr(new_search, key)
        ]
        changed += [] if same_space else ["space"]
        if changed:
            return _changed_keys(changed, saved, study) + " (an Optuna study keeps its space)"
        return None
    if (
        old_search.algorithm == "random"
        and same_space
        and old_search.seed == new_search.seed
        and new_search.num_samples >= old_search.num_samples
    ):
        return None
    ours = {json.dumps(t.to_dict(), sort_keys=True) for t in expand_trials(study)}
    theirs = expand_trials(saved)
    dropped = [t for t in theirs if json.dumps(t.to_dict(), sort_keys=True) not in ours]
    if not dropped:
        return None
    shown = "; ".join(_trial_label(t) for t in dropped[:2])
    more = f" and {len(dropped) - 2} more" if len(dropped) > 2 else ""
    return (
        f"its space does not hold {len(dropped)} of the output's {len(theirs)} "
        f"trials ({shown}{more}); a continuation only adds trials"
    )


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted keys where ``old`` and ``new`` (JSON-like) differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(dict.fromkeys([*old, *new]))
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _changed_keys(keys: list[str], saved: Study, study: Study) -> str:
    def value(source: Study, key: str) -> Any:
        node: Any = study_identity(source) | {
            "augmentations": source.augmentations,
            "stresses": source.stresses,
            "search": source.search.model_dump(mode="json"),
            "space": "(the space)",
        }
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    shown = [f"{k}: {value(saved, k)!r} -> {value(study, k)!r}" for k in keys[:3]]
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return "; ".join(shown) + more


def _trial_label(trial: TrialConfig) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in sorted(trial.hparams.items()))
    return f"{trial.model}({settings})"


# --------------------------------------------------------------------------- the data's content

DATA_RECORD_VERSION = 1


def data_record(dataset: DatasetConfig) -> dict[str, Any]:
    """What a run records of its data set's content (``<output>/_data.json``): where the data
    is, a ``fingerprint`` and, for data on disk, the ``files`` it is the digest of (relative
    path -> [bytes, modification time in whole seconds]: listing reads no file), so that a later
    run can say what changed. Generated data is decided by its generator's configuration: that
    is its fingerprint."""
    args = dataset.loader_arguments(dataset.base_size)
    if dataset.kind == "synthetic_glue":
        where = f"{args['root']}/{args['category']}"
        generator = {
            "category": args["category"],
            "seed": dataset.seed,
            "config": None if dataset.synthetic is None else dataset.synthetic.model_dump(),
        }
        content: Any = generator
        files = None
    else:
        if dataset.kind == "mvtec":
            where = f"{args['root']}/{args['category']}"
        else:
            where = " and ".join(
                args[k] for k in ("normal_dir", "abnormal_dir", "mask_dir") if k in args
            )
        files = {path: list(stamp) for path, stamp in dataset_files(dataset.kind, **args).items()}
        content = files
    blob = json.dumps(content, sort_keys=True, default=str).encode()
    record: dict[str, Any] = {
        "version": DATA_RECORD_VERSION,
        "kind": dataset.kind,
        "data": where,
        "fingerprint": hashlib.sha256(blob).hexdigest()[:16],
    }
    if files is not None:
        record["files"] = files
    return record


def data_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """What changed between two :func:`data_record` file listings, in words."""
    before, after = old.get("files") or {}, new.get("files") or {}
    if not before and not after:
        return "the data set's generator configuration changed"
    kinds = {
        "added": sorted(set(after) - set(before)),
        "removed": sorted(set(before) - set(after)),
        "modified": sorted(p for p in set(before) & set(after) if before[p] != after[p]),
    }
    parts = []
    for kind, paths in kinds.items():
        if paths:
            shown = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
            parts.append(f"{len(paths)} file(s) {kind} ({shown})")
    return "; ".join(parts) or "the files are the same but were recorded otherwise"


def check_hyperparameters(study: Study) -> None:
    """Raise :class:`StudyError` when a detector refuses a configuration the grid produces.

    Each distinct configuration (seeds aside) is built on PyTorch's meta device: the detector
    checks its arguments as it would in a trial, with no weights loaded or memory used (about
    0.1 s a configuration). Optuna draws are checked as they are sampled: a refused draw is an
    error row.
    """
    if study.search.algorithm == "optuna":
        return
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
