"""Study files: validation errors that name the problem, expansion, overrides, hashing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sweep.errors import StudyError
from sweep.run.smoke import smoke_form
from sweep.run.study import (
    apply_override,
    config_hash,
    expand_trials,
    load_study,
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
    trial = study.search_space.resolve(
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
        # A seed past a row's int64 trained and then failed to be written; 1e23 is no integer.
        (with_space(seed=2**63), ["space key 'seed'", "must be an integer", "2**32 - 1"]),
        (with_space(seed={"grid": [0, 1e23]}), ["space key 'seed'", "must be an integer"]),
        (with_space(seed={"int": [0, 2**32]}), ["space key 'seed'", "got 4294967296"]),
        (with_space(split_seed=2**32), ["space key 'split_seed'", "must be an integer"]),
        ({**BASE, "dataset": {"seed": 1e23}}, ["dataset.seed", "must be an integer"]),
        ({**BASE, "dataset": {"seed": -1}}, ["dataset.seed", "must be an integer"]),
        ({**BASE, "search": {"seed": 2**32}}, ["search.seed", "must be an integer"]),
        (with_space(epochs=2**63), ["space key 'epochs'", "64-bit"]),
        (with_space(image_size=8192), ["space key 'image_size'", "maximum of 4096"]),
        ({**BASE, "evaluation": {"batch_size": 2**63}}, ["evaluation.batch_size", "less than"]),
        (with_space(coreset_ratio={"uniform": [0, float("inf")]}), ["finite bounds"]),
        # Found by tests/test_fuzz.py: each was a traceback.
        (with_space(image_size=None), ["space key 'image_size'", "got None"]),
        (with_space(augmentation={"grid": [{"a": 1}]}), ["unknown augmentation {'a': 1}"]),
        (with_space(**{"patchcore.layers": [{"a": 1}]}), ["expected a layer name or a list"]),
        (with_space(**{"patchcore.layers": None}), ["'patchcore.layers'", "got None"]),
        ({**BASE, "resources": {"gpu": float("inf")}}, ["resources.gpu", "finite"]),
        ({**BASE, "smoke": {"space": {"seed": 0}}}, ["smoke: give the space's keys one by one"]),
        ({**BASE, "smoke": {"space.model": {"grid": 5}}}, ["smoke: space.model: expected"]),
        (
            {**BASE, "search": {"algorithm": "random", "num_samples": 10**9}},
            ["search.num_samples", "10000"],
        ),
        (with_space(**{"patchcore.coreset_ratio": {"uniform": [0.1, 0.01]}}), ["low < high"]),
        (with_space(**{"patchcore.coreset_ratio": {"loguniform": [0.0, 1]}}), ["low > 0"]),
        (with_space(**{"patchcore.coreset_ratio": {"uniform": [0.01, 0.1]}}), ["'grid'"]),
        (with_space(**{"patchcore.coreset_ratio": {"gird": [0.1]}}), ["distribution is one of"]),
        ({**BASE, "name": "has space"}, ["name", "letters"]),
        ({**BASE, "name": "n" * 101}, ["name: 101 characters; at most 100"]),
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


def test_every_seed_up_to_two_to_the_32_is_taken():
    # Optuna's samplers (numpy's RandomState) take seeds below 2**32; so does everything else.
    raw = with_space(seed=2**32 - 1, split_seed=2**32 - 1)
    study = study_from_dict({**raw, "dataset": {"seed": 2**32 - 1}, "search": {"seed": 0}})
    assert {t.seed for t in expand_trials(study)} == {2**32 - 1}


def test_the_longest_name_has_a_smoke_form():
    study = study_from_dict({**BASE, "name": "n" * 100})
    assert smoke_form(study).name == "n" * 100 + "-smoke"


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(StudyError, match="no such study file"):
        load_study(tmp_path / "absent.yaml")
    with pytest.raises(StudyError, match=r"line 2, column 8: invalid YAML: mapping values"):
        load_study(write(tmp_path, "name: x\nspace: : {\n"))
    with pytest.raises(StudyError, match="YAML mapping"):
        load_study(write(tmp_path, "- just\n- a list\n"))


def test_a_key_given_twice_is_refused_at_any_level(tmp_path):
    nested = "name: x\nspace:\n  model: padim\n  seed: 0\n  backbone: resnet18\n  seed: 1\n"
    with pytest.raises(StudyError, match=r"line 6, .*duplicate key 'seed' \(first on line 4"):
        load_study(write(tmp_path, nested))
    with pytest.raises(StudyError, match=r"--set smoke: .*duplicate key 'a'"):
        load_study(write(tmp_path, BASE), ["smoke={a: 1, a: 2}"])
    # A merge is meant to be overridden.
    merged = "base: &b {model: padim, seed: 0}\nname: x\nspace: {<<: *b, seed: 1}\n"
    raw = yaml.safe_load(merged)
    assert raw["space"] == {"model": "padim", "seed": 1}
    with pytest.raises(StudyError, match="unknown key 'base'"):
        load_study(write(tmp_path, merged))


def test_narrowing_model_with_set_drops_the_left_out_models_keys(tmp_path):
    raw = with_space(**{"patchcore@resnet18.num_neighbors": 3})
    raw["evaluation"] = {"models": {"patchcore": {"batch_size": 4}}}
    path = write(tmp_path, raw)
    notes: list[str] = []
    study = load_study(path, ["space.model=padim"], notes)
    assert study.models == ("padim",)
    assert not any(key.startswith("patchcore") for key in study.space)
    assert study.evaluation.models == {}
    assert notes == [
        "--set space.model leaves out patchcore: dropped their keys "
        "space.patchcore.coreset_ratio, space.patchcore@resnet18.num_neighbors, "
        "evaluation.models.patchcore"
    ]
    # Without a --set of the model, the file's keys are the file's: no pruning.
    with pytest.raises(StudyError, match=r"'patchcore\.coreset_ratio' applies to model"):
        load_study(write(tmp_path, {**raw, "space": {**raw["space"], "model": "padim"}}))


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        # A model the file never had, and a key the overrides give themselves, stay errors.
        (["space.model=padim", "space.stfpm.lr=0.1"], "'stfpm.lr' applies to model 'stfpm'"),
        (
            ["space.model=padim", "space.patchcore.coreset_ratio=0.2"],
            "'patchcore.coreset_ratio' applies to model 'patchcore'",
        ),
    ],
)
def test_narrowing_model_keeps_keys_the_file_did_not_make_moot(tmp_path, overrides, needle):
    with pytest.raises(StudyError, match=needle):
        load_study(write(tmp_path, BASE), overrides)


def test_set_of_a_smoke_key_keeps_its_dots(tmp_path):
    study = load_study(write(tmp_path, BASE), ["smoke.space.image_size=96"])
    assert study.smoke == {"space.image_size": 96}
    assert smoke_form(study).search_space.image_sizes() == [96]


def test_layers_may_be_left_to_the_backbone_only_where_that_is_the_default():
    space = {"model": "fastflow", "backbone": "resnet18", "pretrained": False, "layers": None}
    assert study_from_dict({**BASE, "space": space}).models == ("fastflow",)


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


# --------------------------------------------------------------------------- per (model, backbone)

DEIT = "deit_base_distilled_patch16_384"
FLOW_SPACE = {
    "model": {"grid": ["fastflow", "padim"]},
    "pretrained": False,
    "fastflow.backbone": {"grid": ["resnet18", DEIT]},
    "fastflow.image_size": "native",
    "seed": {"grid": [0, 1]},
}


def flow_study(**space) -> dict:
    return {"name": "flow", "dataset": {"image_size": 64}, "space": {**FLOW_SPACE, **space}}


def test_per_backbone_key_wins_over_model_and_shared_keys_on_its_backbone_only():
    study = study_from_dict(
        flow_study(
            **{
                "flow_steps": 4,
                "fastflow.flow_steps": 6,
                f"fastflow@{DEIT}.flow_steps": 20,
                "fastflow.hidden_ratio": 0.5,
                f"fastflow@{DEIT}.conv3x3_only": False,
                "padim@resnet18.n_features": 50,
            }
        )
    )
    trials = {(t.model, t.backbone, t.seed): t.hparams for t in expand_trials(study)}
    assert len(trials) == 2 * 2 + 2
    deit, resnet = trials[("fastflow", DEIT, 0)], trials[("fastflow", "resnet18", 0)]
    assert (deit["flow_steps"], deit["hidden_ratio"], deit["conv3x3_only"]) == (20, 0.5, False)
    assert (resnet["flow_steps"], resnet["hidden_ratio"]) == (6, 0.5)
    assert "conv3x3_only" not in resnet  # the detector's default (and family default) applies
    # padim runs on its default backbone, so padim@resnet18 reaches it.
    assert trials[("padim", None, 1)]["n_features"] == 50
    # Without the model key the shared one is next in line, on every backbone but DeiT.
    shared = study_from_dict(flow_study(**{"flow_steps": 4, f"fastflow@{DEIT}.flow_steps": 20}))
    steps = {
        t.backbone: t.hparams["flow_steps"] for t in expand_trials(shared) if t.model != "padim"
    }
    assert steps == {"resnet18": 4, DEIT: 20}


def test_per_backbone_keys_change_the_hash_of_their_trials_only():
    plain = study_from_dict(flow_study())
    tuned = study_from_dict(flow_study(**{f"fastflow@{DEIT}.flow_steps": {"grid": [20, 12]}}))
    before = {t.label(): config_hash(plain, t) for t in expand_trials(plain)}
    after: dict[str, list[str]] = {}
    for trial in expand_trials(tuned):
        after.setdefault(trial.label(), []).append(config_hash(tuned, trial))
    for label, digest in before.items():
        if DEIT in label:
            # A grid per (model, backbone) multiplies its own trials, each a new configuration.
            assert len(after[label]) == 2 and digest not in after[label]
        else:
            assert after[label] == [digest], label
    # A study without such keys keeps the hashes of earlier releases (finished rows stay so).
    assert before["fastflow/resnet18 seed=0 64px"] == "aa8e246f03c370e8"
    assert before[f"fastflow/{DEIT} seed=0 384px"] == "1d9a2b44ae227682"
    assert before["padim seed=1 64px"] == "4f85c42da292347f"


def test_random_search_draws_per_backbone_keys_for_their_trials():
    raw = flow_study(**{f"fastflow@{DEIT}.hidden_ratio": {"uniform": [0.1, 0.3]}})
    raw["search"] = {"algorithm": "random", "num_samples": 3, "seed": 5}
    trials = expand_trials(study_from_dict(raw))
    ratios = [t.hparams["hidden_ratio"] for t in trials if t.backbone == DEIT]
    assert len(ratios) == 2 * 3 and len(set(ratios)) == 6
    assert all(0.1 <= r <= 0.3 for r in ratios)
    # The other trials are not repeated once per draw of a key that does not reach them.
    assert sum(t.backbone == "resnet18" for t in trials) == 2
    assert all("hidden_ratio" not in t.hparams for t in trials if t.backbone != DEIT)


def test_per_backbone_layers_are_checked_against_their_backbone():
    space = {"model": "padim", "padim.backbone": {"grid": ["resnet18", "vgg16_bn"]}}
    with pytest.raises(StudyError, match=r"'padim' cannot use backbone 'resnet18' with layers"):
        study_from_dict({"name": "l", "space": {**space, "padim@resnet18.layers": ["features.5"]}})
    study = study_from_dict(
        {"name": "l", "space": {**space, "padim@vgg16_bn.layers": ["features.12"]}}
    )
    layers = {t.backbone: t.hparams.get("layers") for t in expand_trials(study)}
    assert layers == {"resnet18": None, "vgg16_bn": ("features.12",)}


@pytest.mark.parametrize(
    ("key", "value", "needles"),
    [
        ("fastflw@resnet18.lr", 0.1, ["unknown model 'fastflw'", "did you mean 'fastflow'"]),
        ("stfpm@resnet18.lr", 0.1, ["'stfpm@resnet18.lr'", "does not include"]),
        ("draem@resnet18.lr", 0.1, ["'draem@resnet18.lr'", "does not include"]),
        ("fastflow@resnet19.lr", 0.1, ["unknown backbone 'resnet19'", "did you mean 'resnet18'"]),
        (
            "fastflow@wide_resnet50_2.lr",
            0.1,
            ["no fastflow trial of the study runs on 'wide_resnet50_2'", f"resnet18, {DEIT}"],
        ),
        ("fastflow@resnet18.flow_step", 3, ["no hyperparameter 'flow_step'", "'flow_steps'"]),
        ("fastflow@resnet18.epochs", 3, ["epochs is set per model", "'fastflow.epochs'"]),
        ("fastflow@resnet18.image_size", 64, ["'fastflow.image_size'", "'native'"]),
        ("fastflow@resnet18.seed", 1, ["no hyperparameter 'seed'"]),
        ("fastflow@resnet18.backbone", DEIT, ["the backbone is what the key selects"]),
        ("fastflow@resnet18", 1, ["MODEL@BACKBONE.HYPERPARAMETER"]),
        ("fastflow@resnet18.lr", {"uniform": [0.1, 0.2]}, ["'grid'"]),
    ],
)
def test_bad_per_backbone_keys_name_the_key(tmp_path, key, value, needles):
    path = write(tmp_path, flow_study(**{key: value}))
    with pytest.raises(StudyError) as info:
        load_study(path)
    message = str(info.value)
    assert str(path) in message and f"'{key}'" in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_per_backbone_keys_of_models_without_a_backbone_are_refused():
    raw = {"name": "d", "space": {"model": "draem", "draem@resnet18.lr": 0.1}}
    with pytest.raises(StudyError, match=r"'draem' takes no backbone; give .* as 'draem.lr'"):
        study_from_dict(raw)


def test_smoke_form_drops_per_backbone_keys_of_backbones_it_does_not_run():
    study = study_from_dict(
        flow_study(
            **{
                f"fastflow@{DEIT}.flow_steps": 20,
                "fastflow@resnet18.flow_steps": 12,  # the tiny configuration's flow_steps win
                "fastflow@resnet18.hidden_ratio": 0.5,
            }
        )
    )
    smoke = smoke_form(study)
    assert f"fastflow@{DEIT}.flow_steps" not in smoke.space
    assert "fastflow@resnet18.flow_steps" not in smoke.space
    (flow,) = [t for t in expand_trials(smoke) if t.model == "fastflow"]
    assert (flow.backbone, flow.hparams["flow_steps"], flow.hparams["hidden_ratio"]) == (
        "resnet18",
        1,
        0.5,
    )
    # A per-backbone key the smoke block gives is the smoke form's own, validated as such.
    raw = flow_study(**{f"fastflow@{DEIT}.flow_steps": 20})
    raw["smoke"] = {f"space.fastflow@{DEIT}.lr": 0.1}
    with pytest.raises(StudyError, match=r"smoke form .* no fastflow trial of the study runs on"):
        smoke_form(study_from_dict(raw))


def test_glue_line_gives_fastflow_table_b8_transformer_settings_only_on_transformers():
    root = Path(__file__).resolve().parents[1] / "studies"
    study = load_study(root / "glue_line.yaml")
    trials = expand_trials(study)
    assert len(trials) == 140
    transformer = {"flow_steps": 20, "hidden_ratio": 0.16, "conv3x3_only": False}
    flows = [t for t in trials if t.model == "fastflow"]
    assert len(flows) == 20
    for trial in flows:
        given = {k: trial.hparams[k] for k in transformer if k in trial.hparams}
        if trial.backbone in ("cait_m48_448", DEIT):
            assert given == transformer, trial.label()
        else:
            assert given == {}, trial.label()  # FastFlow's ResNet defaults: 8, 1.0, True
    # Every other trial is the configuration it was before the per-backbone keys.
    plain_raw = yaml.safe_load((root / "glue_line.yaml").read_text())
    plain_raw["space"] = {k: v for k, v in plain_raw["space"].items() if "@" not in k}
    plain = study_from_dict(plain_raw)
    unchanged = {config_hash(plain, t) for t in expand_trials(plain)}
    changed = [t for t in trials if config_hash(study, t) not in unchanged]
    assert sorted({(t.model, t.backbone) for t in changed}) == [
        ("fastflow", "cait_m48_448"),
        ("fastflow", DEIT),
    ]
    assert len(changed) == 10
    # The smoke form runs FastFlow on the tiny resnet18, where the keys do not apply.
    smoke = smoke_form(study)
    assert not [k for k in smoke.space if "@" in k]


def test_per_backbone_pretrained_and_weights_decide_which_weights_a_study_needs():
    from sweep.run.weights import needed_backbones

    space = {"model": "stfpm", "stfpm.backbone": {"grid": ["resnet18", "wide_resnet50_2"]}}
    only_wide = {"pretrained": False, "stfpm@wide_resnet50_2.pretrained": True}
    own_file = {"pretrained": True, "stfpm@resnet18.weights": "/weights/mine.safetensors"}
    for extra in (only_wide, own_file):
        study = study_from_dict({"name": "w", "space": {**space, **extra}})
        assert [need.backbone for need in needed_backbones(study)] == ["wide_resnet50_2"]
    both = study_from_dict({"name": "w", "space": {**space, "pretrained": True}})
    assert [need.backbone for need in needed_backbones(both)] == ["resnet18", "wide_resnet50_2"]
