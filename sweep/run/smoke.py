"""The smoke form of a study: the same detectors, keys, variants and search on tiny models and
tiny data, so that CI can dry-run every study on a CPU in about a minute (``sweep run --smoke``).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import yaml

import models
from models.tiny import tiny_hparams
from sweep.errors import StudyError
from sweep.run.space import Param, Space, jsonable, split_key
from sweep.run.study import Study, apply_override, study_from_dict, study_to_yaml

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
    iterative = any(models.get_class(m).learning_type != "one_pass" for m in models_)
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
        layers_key = study.search_space.key_for(model, "layers")
        if (
            "backbone" in tiny
            and "layers" not in tiny
            and layers_key is not None
            and not _layers_fit(model, tiny["backbone"], study.space[layers_key])
        ):
            # The study's layers belong to its own backbones: the tiny one takes its defaults.
            space[f"{model}.layers"] = jsonable(models.hyperparameters(model)["layers"])
        for hp, value in tiny.items():
            space[f"{model}.{hp}"] = jsonable(value)
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
    synthetic = raw["dataset"].get("synthetic")
    if raw["dataset"].get("kind") == "synthetic_glue" and synthetic != SMOKE_DATASET["synthetic"]:
        # A smoke block that asks for other generated data gets a root of its own: one root
        # holds one generated configuration, and other studies' smoke runs share the default.
        digest = hashlib.sha256(json.dumps(synthetic, sort_keys=True).encode()).hexdigest()[:8]
        raw["dataset"]["root"] = f"{str(raw['dataset']['root']).rstrip('/')}-{digest}"
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
    if model is None or model not in models.list_models():
        return None
    try:
        backbones = Space.from_raw(space, SMOKE_IMAGE_SIZES[0]).values(model, "backbone")
    except ValueError:
        return None
    return None if backbones is None else set(backbones)


def _layers_fit(model: str, backbone: str, param: Param) -> bool:
    if not param.is_enumerable:
        return False
    return all(
        models.backbone_problem(model, backbone, {"layers": value}, SMOKE_IMAGE_SIZES[0]) is None
        for value in param.options()
    )
