"""The search space: the precedence rule and every enumeration, asked of ``Space`` directly."""

from __future__ import annotations

import re

import numpy as np
import pytest

from sweep.run.space import Space, parse_param

DEIT = "deit_base_distilled_patch16_384"


def space(default_image_size: int = 64, **raw) -> Space:
    return Space.from_raw({"pretrained": False, **raw}, default_image_size)


def test_the_most_specific_key_wins_and_the_detector_default_applies_without_one():
    s = space(
        model={"grid": ["fastflow", "padim"]},
        flow_steps=4,
        **{
            "fastflow.backbone": {"grid": ["resnet18", DEIT]},
            "fastflow.image_size": "native",
            "fastflow.flow_steps": 6,
            f"fastflow@{DEIT}.flow_steps": 20,
        },
    )
    assert s.key_for("fastflow", "flow_steps", DEIT) == f"fastflow@{DEIT}.flow_steps"
    assert s.key_for("fastflow", "flow_steps", "resnet18") == "fastflow.flow_steps"
    assert s.key_for("fastflow", "hidden_ratio") is None
    assert s.values("fastflow", "flow_steps", DEIT) == (20,)
    assert s.values("fastflow", "flow_steps") == (6,)
    # No key: the detector's signature default; a shared key reaches only detectors that
    # have the hyperparameter.
    assert s.values("fastflow", "hidden_ratio") == (1.0,)
    assert s.values("padim", "flow_steps") == (None,)
    trials = {(t.backbone, t.hparams["flow_steps"]) for t in s.grid() if t.model == "fastflow"}
    assert trials == {("resnet18", 6), (DEIT, 20)}


def test_resolve_keeps_only_what_applies_to_the_trials_model_and_backbone():
    s = space(model={"grid": ["patchcore", "padim"]}, backbone="resnet18")
    trial = s.resolve(
        {
            "model": "padim",
            "backbone": "resnet18",
            "patchcore.coreset_ratio": 0.1,
            "seed": 3,
            "epochs": 7,
        }
    )
    assert trial.model == "padim" and trial.seed == 3 and trial.epochs == 7
    assert "coreset_ratio" not in trial.hparams and trial.hparams["seed"] == 3
    assert trial.image_size == 64  # the data set's size when no key gives one


def test_native_size_is_the_backbones_input_size_else_the_data_sets():
    s = space(default_image_size=96, model="fastflow")
    assert s.image_size(DEIT, "native") == 384
    assert s.image_size("resnet18", "native") == 96
    assert s.image_size(None, 128) == 128
    sized = space(
        default_image_size=96,
        model="fastflow",
        image_size="native",
        backbone={"grid": ["resnet18", DEIT]},
    )
    assert sized.image_sizes() == [96, 384]


def test_grid_deduplicates_configurations_keys_do_not_reach():
    # padim has no coreset_ratio: its two grid points are one trial.
    s = space(
        model={"grid": ["patchcore", "padim"]}, **{"patchcore.coreset_ratio": {"grid": [0.01, 0.1]}}
    )
    trials = s.grid()
    assert sorted(t.model for t in trials) == ["padim", "patchcore", "patchcore"]
    assert len({t.key() for t in trials}) == len(trials)


def test_grid_walks_each_model_s_own_keys_only(monkeypatch):
    # Another model's grid must not multiply a model's points (the robustness study walked
    # 816,000 points for 3375 trials): 2 x 3 points for patchcore, 4 for padim, nothing more.
    s = space(
        model={"grid": ["patchcore", "padim"]},
        seed={"grid": [0, 1]},
        **{
            "patchcore.coreset_ratio": {"grid": [0.01, 0.1, 0.2]},
            "padim.n_features": {"grid": [10, 20, 30, 40]},
        },
    )
    calls = []
    resolve = Space.resolve
    monkeypatch.setattr(Space, "resolve", lambda self, a: calls.append(a) or resolve(self, a))
    trials = s.grid()
    assert len(calls) == len(trials) == 2 * 3 + 2 * 4
    assert [t.model for t in trials] == ["patchcore"] * 6 + ["padim"] * 8
    assert {(t.seed, t.hparams["coreset_ratio"]) for t in trials if t.model == "patchcore"} == {
        (seed, r) for seed in (0, 1) for r in (0.01, 0.1, 0.2)
    }


def test_split_keys_resolve_and_are_checked():
    s = space(model="padim", seed={"grid": [3, 4]}, split_seed="seed", test_fraction=0.15)
    trials = s.grid()
    assert [(t.seed, t.split_seed, t.test_fraction) for t in trials] == [(3, 3, 0.15), (4, 4, 0.15)]
    assert trials[0].to_dict()["split_seed"] == 3
    fixed = space(model="padim", split_seed=7).grid()[0]
    assert (fixed.split_seed, fixed.test_fraction) == (7, None)
    unset = space(model="padim").grid()[0]
    assert "split_seed" not in unset.to_dict() and not unset.resplits, "old trials keep their ids"
    for bad, message in [
        ({"split_seed": -1}, "split_seed': expected an int >= 0"),
        ({"split_seed": "trial"}, "split_seed': expected an int >= 0 or 'seed'"),
        ({"test_fraction": 1.0}, "test_fraction': expected a share in (0, 1)"),
        ({"test_fraction": {"grid": [0.1, 0]}}, "test_fraction': expected a share in (0, 1)"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            space(model="padim", **bad).check("grid")


def test_random_draws_come_from_the_generator_given():
    s = space(model="patchcore", **{"patchcore.coreset_ratio": {"loguniform": [0.001, 0.5]}})
    first = s.sample(np.random.default_rng(7), draws=5)
    again = s.sample(np.random.default_rng(7), draws=5)
    other = s.sample(np.random.default_rng(8), draws=5)
    ratios = [t.hparams["coreset_ratio"] for t in first]
    assert first == again and ratios != [t.hparams["coreset_ratio"] for t in other]
    assert len(set(ratios)) == 5 and all(0.001 <= r <= 0.5 for r in ratios)


def test_sampler_parameters_decode_indexed_choices_and_add_constants():
    s = space(model="padim", layers={"choice": [["layer1", "layer2"], ["layer2", "layer3"]]})
    trial = s.resolve_sampled({"model": "padim", "layers#index": 1})
    assert trial.hparams["layers"] == ("layer2", "layer3")
    assert trial.hparams["pretrained"] is False  # a fixed key, not part of Optuna's space


def test_representatives_cost_the_expensive_end_of_epochs_and_size():
    s = space(
        model="stfpm",
        epochs={"int": [2, 40]},
        image_size={"int": [64, 256]},
        lr={"loguniform": [0.01, 1.0]},
    )
    (trial,) = s.representatives()
    assert trial.epochs == 40 and trial.image_size == 256
    assert trial.hparams["lr"] == pytest.approx(0.1)  # the geometric middle


def test_max_epochs_is_the_longest_budget_any_model_has():
    both = {"model": {"grid": ["stfpm", "padim"]}}
    assert space(**both, epochs=5).max_epochs() == 5
    assert space(**both, epochs=5, **{"stfpm.epochs": 12}).max_epochs() == 12
    assert space(model="padim").max_epochs() is None


def test_backbone_pairs_follow_per_backbone_layers():
    s = space(
        model="padim",
        backbone={"grid": ["resnet18", "wide_resnet50_2"]},
        **{"padim@resnet18.layers": ["layer2"]},
    )
    pairs = {(p.backbone, p.layers, p.image_size) for p in s.backbone_pairs()}
    default = ("layer1", "layer2", "layer3")  # padim's own layers where no key gives any
    assert pairs == {("resnet18", ("layer2",), 64), ("wide_resnet50_2", default, 64)}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"uniform": [1, 0]}, "low < high"),
        ({"loguniform": [0, 1]}, "low > 0"),
        ({"normal": [0, 1]}, "a distribution is one of"),
        ({"grid": []}, "non-empty list"),
    ],
)
def test_malformed_distributions_name_the_key(raw, message):
    with pytest.raises(ValueError, match=rf"space key 'lr'.*{message}"):
        parse_param("lr", raw)
