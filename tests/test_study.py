"""Study files: validation errors that name the problem, expansion, overrides, hashing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sweep.errors import StudyError
from sweep.study import (
    apply_override,
    config_hash,
    expand_trials,
    load_study,
    resolve_trial,
    study_from_dict,
)

BASE = {
    "name": "t",
    "dataset": {"kind": "synthetic_glue", "image_size": 64},
    "space": {
        "model": {"grid": ["patchcore", "padim"]},
        "backbone": {"grid": ["resnet18", "wide_resnet50_2"]},
        "pretrained": False,
        "seed": {"grid": [0, 1]},
        "patchcore.coreset_ratio": {"grid": [0.01, 0.1]},
    },
}


def write(tmp_path: Path, raw: dict | str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def with_space(**space) -> dict:
    return {**BASE, "space": {**BASE["space"], **space}}


def test_grid_expands_only_applicable_keys_and_dedupes():
    study = study_from_dict(BASE)
    trials = expand_trials(study)
    # patchcore: 2 backbones x 2 seeds x 2 ratios; padim: 2 x 2 (the ratio does not apply)
    assert len(trials) == 8 + 4
    padim = [t for t in trials if t.model == "padim"]
    assert all("coreset_ratio" not in t.hparams for t in padim)
    assert {t.hparams["coreset_ratio"] for t in trials if t.model == "patchcore"} == {0.01, 0.1}
    assert all(t.hparams["seed"] == t.seed for t in trials)
    assert len({config_hash(study, t) for t in trials}) == len(trials)


def test_hash_ignores_output_and_resources_but_not_data():
    a = study_from_dict(BASE)
    b = study_from_dict({**BASE, "output": "elsewhere", "resources": {"cpu": 4}})
    c = study_from_dict({**BASE, "dataset": {**BASE["dataset"], "category": "part16"}})
    trial = expand_trials(a)[0]
    assert config_hash(a, trial) == config_hash(b, trial)
    assert config_hash(a, trial) != config_hash(c, trial)


def test_random_search_is_seeded():
    raw = with_space(**{"patchcore.coreset_ratio": {"loguniform": [0.001, 0.5]}})
    raw["search"] = {"algorithm": "random", "num_samples": 3, "seed": 7}
    first = [t.hparams.get("coreset_ratio") for t in expand_trials(study_from_dict(raw))]
    again = [t.hparams.get("coreset_ratio") for t in expand_trials(study_from_dict(raw))]
    assert first == again
    ratios = [r for r in first if r is not None]
    assert len(set(ratios)) == len(ratios) and all(0.001 <= r <= 0.5 for r in ratios)


def test_prefixed_key_wins_over_shared_key():
    study = study_from_dict(with_space(**{"patchcore.backbone": "wide_resnet50_2"}))
    trial = resolve_trial(
        study,
        {"model": "patchcore", "backbone": "resnet18", "patchcore.backbone": "wide_resnet50_2"},
    )
    assert trial.backbone == "wide_resnet50_2"


def test_a_models_own_epochs_are_its_trials_budget():
    space = {"model": {"grid": ["stfpm", "padim"]}, "backbone": "resnet18", "epochs": 20}
    study = study_from_dict({**BASE, "space": {**space, "stfpm.epochs": 5}})
    stfpm, padim = sorted(expand_trials(study), key=lambda t: t.model != "stfpm")
    # The budget fit runs (and a scheduler counts) is the trial's, not a detector default.
    assert (stfpm.model, stfpm.epochs, "epochs" in stfpm.hparams) == ("stfpm", 5, False)
    assert (padim.model, padim.epochs) == ("padim", 20)
    shared = study_from_dict({**BASE, "space": {**space, "model": "stfpm"}})
    assert config_hash(study, stfpm) != config_hash(shared, expand_trials(shared)[0])


@pytest.mark.parametrize(
    ("raw", "needles"),
    [
        (
            with_space(model={"grid": ["patchcor"]}),
            ["space", "unknown model 'patchcor'", "patchcore"],
        ),
        (with_space(**{"patchcore.coreset_ratoi": 0.1}), ["coreset_ratoi", "coreset_ratio"]),
        (with_space(**{"stfpm.lr": 0.1}), ["stfpm.lr", "does not include"]),
        (with_space(backbone="resnet19"), ["unknown backbone 'resnet19'", "resnet18"]),
        (with_space(colour=1), ["'colour'", "not a hyperparameter"]),
        ({**BASE, "max_concurent": 2}, ["max_concurent", "max_concurrent"]),
        ({**BASE, "max_concurrent": "two"}, ["max_concurrent", "integer"]),
        ({**BASE, "dataset": {"kind": "mvtec"}}, ["dataset", "needs 'root'"]),
        ({**BASE, "dataset": {"kind": "imagenet"}}, ["dataset.kind", "synthetic_glue"]),
        ({**BASE, "objectives": [{"metric": "image_aurco"}]}, ["image_aurco", "image_auroc"]),
        (with_space(seed={"uniform": [0, 1]}), ["seed", "whole numbers"]),
        (with_space(**{"patchcore.coreset_ratio": {"uniform": [0.1, 0.01]}}), ["low < high"]),
        (with_space(**{"patchcore.coreset_ratio": {"loguniform": [0.0, 1]}}), ["low > 0"]),
        (with_space(**{"patchcore.coreset_ratio": {"uniform": [0.01, 0.1]}}), ["'grid'"]),
        (with_space(**{"patchcore.coreset_ratio": {"gird": [0.1]}}), ["distribution is one of"]),
        ({**BASE, "name": "has space"}, ["name", "letters"]),
        ({k: v for k, v in BASE.items() if k != "space"}, ["space", "required"]),
        ({**BASE, "search": {"algorithm": "optuna"}}, ["n_trials"]),
    ],
)
def test_bad_study_names_file_key_and_expectation(tmp_path, raw, needles):
    path = write(tmp_path, raw)
    with pytest.raises(StudyError) as info:
        load_study(path)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(StudyError, match="no such study file"):
        load_study(tmp_path / "absent.yaml")
    with pytest.raises(StudyError, match=r"line 2, column 8: invalid YAML: mapping values"):
        load_study(write(tmp_path, "name: x\nspace: : {\n"))
    with pytest.raises(StudyError, match="YAML mapping"):
        load_study(write(tmp_path, "- just\n- a list\n"))


def test_overrides(tmp_path):
    path = write(tmp_path, BASE)
    study = load_study(
        path,
        overrides=[
            "dataset.image_size=96",
            "space.patchcore.coreset_ratio=0.5",
            "space.seed={grid: [3]}",
            "max_concurrent=3",
        ],
    )
    assert study.dataset.image_size == 96
    assert study.space["patchcore.coreset_ratio"].values == (0.5,)
    assert study.space["seed"].values == (3,)
    assert study.max_concurrent == 3
    with pytest.raises(StudyError, match="key=value"):
        load_study(path, overrides=["dataset.image_size"])
    raw: dict = {"a": 1}
    with pytest.raises(StudyError, match="not a mapping"):
        apply_override(raw, "a.b=2")


def test_shipped_studies_validate():
    root = Path(__file__).resolve().parents[1] / "studies"
    files = sorted(root.glob("*.yaml"))
    assert files, "no study files shipped"
    for path in files:
        study = load_study(path)
        if study.search.algorithm != "optuna":
            assert expand_trials(study)


@pytest.mark.parametrize(
    ("space", "needles"),
    [
        (
            {"model": "fastflow", "backbone": "cait_m48_448", "image_size": 256},
            ["'fastflow' cannot use backbone 'cait_m48_448'", "448", "at 256 px it can use"],
        ),
        (
            {"model": "reverse_distillation", "backbone": "efficientnet_b0"},
            ["decoder", "resnet18"],
        ),
        (
            {"model": "csflow", "backbone": "resnet18"},
            ["'csflow' cannot use backbone 'resnet18'", "efficientnet_b5"],
        ),
        (
            {"model": {"grid": ["patchcore", "uflow"]}, "backbone": "mcait"},
            ["'patchcore' cannot use backbone 'mcait'", "'patchcore.backbone'"],
        ),
        (
            {"model": "padim", "backbone": "vit_base_patch16_224"},
            ["'padim' cannot use backbone 'vit_base_patch16_224'", "cnn"],
        ),
    ],
    ids=["fixed-size", "no-decoder", "efficientnet-only", "shared-backbone", "vit"],
)
def test_incompatible_pairs_fail_validation_naming_what_works(space, needles):
    with pytest.raises(StudyError) as error:
        study_from_dict({"name": "pairs", "space": {**space, "pretrained": False}})
    for needle in needles:
        assert needle in str(error.value), (needle, str(error.value))


def test_each_model_can_have_its_own_backbones():
    study = study_from_dict(
        {
            "name": "own",
            "space": {
                "model": {"grid": ["fastflow", "patchcore"]},
                "fastflow.backbone": {"grid": ["resnet18", "deit_base_distilled_patch16_384"]},
                "patchcore.backbone": "wide_resnet50_2",
                "image_size": 384,
            },
        }
    )
    pairs = {(t.model, t.backbone) for t in expand_trials(study)}
    assert pairs == {
        ("fastflow", "resnet18"),
        ("fastflow", "deit_base_distilled_patch16_384"),
        ("patchcore", "wide_resnet50_2"),
    }


def test_per_model_batch_sizes_reach_only_their_model():
    plain = study_from_dict(BASE)
    tuned = study_from_dict({**BASE, "evaluation": {"models": {"padim": {"train_batch_size": 4}}}})
    patchcore = next(t for t in expand_trials(plain) if t.model == "patchcore")
    padim = next(t for t in expand_trials(plain) if t.model == "padim")
    # Hashes of studies without per-model sizes are those of earlier releases (finished rows
    # stay finished), and an override changes its own model's trials only.
    assert config_hash(plain, patchcore) == "f21814279fcd039b"
    assert config_hash(plain, padim) == "5d7e64e21b2eb662"
    assert config_hash(tuned, patchcore) == config_hash(plain, patchcore)
    assert config_hash(tuned, padim) != config_hash(plain, padim)
    assert tuned.evaluation.batch_sizes("padim") == (4, 32)
    assert tuned.evaluation.batch_sizes("patchcore") == (32, 32)
    # The same sizes given study-wide are the same configuration as given per model.
    same = study_from_dict({**BASE, "evaluation": {"models": {"padim": {"train_batch_size": 32}}}})
    assert config_hash(same, padim) == config_hash(plain, padim)


def test_per_model_batch_sizes_name_models_of_the_study(tmp_path):
    raw = {**BASE, "evaluation": {"models": {"draem": {"train_batch_size": 8}}}}
    with pytest.raises(StudyError, match=r"evaluation.models: 'draem' not among the study's"):
        load_study(write(tmp_path, raw))
    raw = {**BASE, "evaluation": {"models": {"padim": {"train_batch_size": 0}}}}
    with pytest.raises(StudyError, match=r"evaluation.models.padim.train_batch_size"):
        load_study(write(tmp_path, raw))
