"""``sweep plan``: packing arithmetic, estimates from history or the cost model, the plan of a
real study without Ray."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from sweep.errors import StudyError
from sweep.output import format_duration, render_plan, show_plan
from sweep.run.plan import TRIAL_OVERHEAD_S, make_plan, pack_trials, plan_study
from sweep.run.resources import ClusterShape, NodeShape, ResourceRequest
from sweep.run.study import config_hash, expand_trials, load_study, study_from_dict

ROOT = Path(__file__).resolve().parents[1]
ONE_GPU = ClusterShape((NodeShape("n", cpus=16, gpus=1, gpu_memory_gb=16, memory_gb=64),))
NO_GPU = ClusterShape((NodeShape("n", cpus=8, gpus=0, memory_gb=64),))


def gpu_trial(share: float, cpu: float = 1, memory_gb: float = 1) -> ResourceRequest:
    return ResourceRequest(gpu=share, cpu=cpu, memory_gb=memory_gb, gpu_memory_gb=1)


# --------------------------------------------------------------------------- packing


def test_four_quarter_gpu_trials_share_one_gpu():
    packing = pack_trials([gpu_trial(0.25)] * 4, [100.0] * 4, ONE_GPU)
    assert packing.max_concurrent == 4
    assert packing.makespan_s == pytest.approx(100)
    assert packing.gpu_utilisation == pytest.approx(1.0)


def test_half_and_three_quarters_do_not_share_a_gpu():
    packing = pack_trials([gpu_trial(0.5), gpu_trial(0.75)], [100.0, 60.0], ONE_GPU)
    assert packing.max_concurrent == 1
    assert packing.makespan_s == pytest.approx(160)
    # 0.75 x 60 + 0.5 x 100 GPU-seconds held out of 160.
    assert packing.gpu_utilisation == pytest.approx((45 + 50) / 160)


def test_first_fit_decreasing_fills_gaps():
    # 0.75 first (largest), then the 0.25 beside it; the two 0.5s follow together.
    shares = [0.5, 0.25, 0.75, 0.5]
    packing = pack_trials([gpu_trial(s) for s in shares], [10.0] * 4, ONE_GPU)
    assert packing.makespan_s == pytest.approx(20)
    assert packing.max_concurrent == 2


def test_cpus_memory_and_max_concurrent_limit_packing():
    cpus = pack_trials([ResourceRequest(0, 4, 1, 1)] * 3, [10.0] * 3, NO_GPU)
    assert (cpus.max_concurrent, cpus.makespan_s) == (2, 20)
    memory = pack_trials([ResourceRequest(0, 1, 40, 1)] * 2, [10.0] * 2, NO_GPU)
    assert memory.max_concurrent == 1
    capped = pack_trials([ResourceRequest(0, 1, 1, 1)] * 4, [10.0] * 4, NO_GPU, max_concurrent=2)
    assert (capped.max_concurrent, capped.makespan_s) == (2, 20)
    assert capped.cpu_utilisation == pytest.approx(2 / 8)


def test_whole_gpus_and_unschedulable_trials():
    four = ClusterShape((NodeShape("n", cpus=8, gpus=4, gpu_memory_gb=16, memory_gb=64),))
    packing = pack_trials([gpu_trial(2), gpu_trial(2), gpu_trial(1)], [10.0] * 3, four)
    assert (packing.max_concurrent, packing.makespan_s) == (2, 20)
    lost = pack_trials([gpu_trial(0.5), gpu_trial(0.25, cpu=99)], [10.0, 10.0], ONE_GPU)
    assert lost.unschedulable == (1,) and lost.makespan_s == pytest.approx(10)


# --------------------------------------------------------------------------- estimates


def quick_study(**changes):
    raw = {
        "name": "plan",
        "dataset": {"kind": "synthetic_glue", "image_size": 64, "synthetic": {"n_train": 20}},
        "space": {
            "model": {"grid": ["padim", "stfpm"]},
            "backbone": "resnet18",
            "pretrained": False,
            "epochs": 4,
            "seed": {"grid": [0, 1]},
        },
        "evaluation": {"train_batch_size": 8, "batch_size": 8},
        **changes,
    }
    return study_from_dict(raw)


def history_row(study, trial, seconds: float, device: str = "cpu", **extra) -> dict:
    started = datetime(2026, 1, 1, tzinfo=timezone.utc)
    return {
        "config_hash": config_hash(study, trial),
        "status": "ok",
        "model": trial.model,
        "backbone": trial.backbone,
        "image_size": trial.image_size,
        "epochs_run": trial.epochs if trial.model == "stfpm" else None,
        "n_train": 20,
        "train_s": seconds - 2.0,
        "device": device,
        "started_at": started,
        "finished_at": started + timedelta(seconds=seconds),
        **extra,
    }


def test_estimates_come_from_history_when_present():
    study = quick_study()
    padim0, _, stfpm0, stfpm1 = expand_trials(study)
    history = pd.DataFrame(
        [
            history_row(study, padim0, 7.0),
            history_row(study, stfpm0, 42.0),
            history_row(study, stfpm1, 99.0, device="NVIDIA H100"),  # another kind of device
        ]
    )
    plan = plan_study(study, NO_GPU, history=history)
    by_trial = {(p.trial.model, p.trial.seed): p for p in plan.trials}
    assert by_trial["padim", 0].source == "history (same config)"
    assert by_trial["padim", 0].seconds == pytest.approx(7.0)
    assert by_trial["padim", 1].source == "history (model/backbone/size)"
    assert by_trial["padim", 1].seconds == pytest.approx(7.0)
    assert by_trial["stfpm", 1].source == "history (model/backbone/size)"
    assert by_trial["stfpm", 1].seconds == pytest.approx(42.0)  # the GPU row does not count
    without = plan_study(study, NO_GPU)
    assert {p.source for p in without.trials} == {"model"}


def test_history_is_scaled_to_epochs_and_training_images():
    study = quick_study()
    stfpm0 = expand_trials(study)[2]
    row = history_row(study, stfpm0, 42.0, config_hash="another", epochs_run=2, n_train=10)
    plan = plan_study(study, NO_GPU, history=[row])
    stfpm = next(p for p in plan.trials if p.trial.model == "stfpm")
    # 40 s of training for 2 epochs of 10 images -> 4 epochs of 20: x4, plus the 2 s beside it.
    assert stfpm.seconds == pytest.approx(2 + 40 * 4)


def test_model_estimates_grow_with_epochs_and_are_faster_on_a_gpu():
    def stfpm(epochs: int):
        space = {"model": "stfpm", "backbone": "resnet18", "pretrained": False, "epochs": epochs}
        return quick_study(space=space)

    cpu_short = plan_study(stfpm(4), NO_GPU).trials[0]
    cpu_long = plan_study(stfpm(40), NO_GPU).trials[0]
    gpu_long = plan_study(stfpm(40), ONE_GPU).trials[0]
    assert cpu_long.seconds > 5 * (cpu_short.seconds - TRIAL_OVERHEAD_S)
    assert gpu_long.device == "gpu" and gpu_long.seconds < cpu_long.seconds


# --------------------------------------------------------------------------- whole plans


def test_quickstart_plan_is_fast_and_starts_no_ray():
    import ray

    study = load_study(ROOT / "studies" / "quickstart.yaml")
    started = time.perf_counter()
    plan = plan_study(study, ClusterShape.local())
    assert time.perf_counter() - started < 5
    assert not ray.is_initialized()
    assert len(plan.trials) == 6 and plan.packing.makespan_s > 0
    assert all(p.request.gpu == 0 and p.request.cpu == 1 for p in plan.trials)
    encoded = json.loads(json.dumps(plan.to_dict()))
    assert encoded["n_trials"] == 6 and encoded["trials"][0]["estimate_source"]


def test_render_plan_shows_groups_packing_and_warnings():
    study = quick_study(resources={"cpu": 64})
    console = Console(record=True, width=140)
    render_plan(plan_study(study, NO_GPU), console)
    text = console.export_text()
    assert "padim / resnet18" in text and "stfpm / resnet18" in text
    assert "wall clock" in text and "trials at once" in text
    assert "clipped to 8" in text


def test_optuna_plan_spreads_n_trials_over_the_space():
    study = quick_study(
        search={"algorithm": "optuna", "n_trials": 10},
        space={
            "model": {"choice": ["padim", "stfpm"]},
            "backbone": "resnet18",
            "pretrained": False,
            "epochs": {"int": [2, 6]},
        },
    )
    plan = plan_study(study, NO_GPU)
    assert len(plan.trials) == 10 and plan.configurations == 2
    assert {p.trial.model for p in plan.trials} == {"padim", "stfpm"}
    assert max(p.trial.epochs or 0 for p in plan.trials) == 6  # the costly end
    assert any("optuna" in note for note in plan.notes)


def test_plan_command_options(tmp_path):
    path = ROOT / "studies" / "quickstart.yaml"
    console = Console(record=True, width=140)
    with pytest.raises(StudyError, match="not both"):
        make_plan(path, cluster=tmp_path / "c.yaml", gpus=1)
    plan = make_plan(path, gpus=2, overrides=["resources.gpu=0.25"])
    show_plan(plan, as_json=True, console=console)
    assert plan.cluster.gpus == 2 and all(p.request.gpu == 0.25 for p in plan.trials)
    assert json.loads(console.export_text())["cluster"]["nodes"][0]["gpus"] == 2
    with pytest.raises(StudyError, match="no such results"):
        make_plan(path, history=tmp_path / "nothing")


def test_format_duration():
    assert [format_duration(s) for s in (5, 600, 7200, 3 * 86400)] == [
        "5 s",
        "10.0 min",
        "2.0 h",
        "3.0 d",
    ]


def test_optuna_configurations_cost_per_backbone_keys_on_their_backbone():

    study = quick_study(
        search={"algorithm": "optuna", "n_trials": 10},
        space={
            "model": {"choice": ["padim", "stfpm"]},
            "backbone": {"choice": ["resnet18", "resnet34"]},
            "pretrained": False,
            "stfpm@resnet34.lr": {"choice": [0.1, 0.4]},
            "stfpm@resnet18.lr": {"loguniform": [0.01, 0.4]},
        },
    )
    found = {
        (t.model, t.backbone, t.hparams.get("lr") and round(t.hparams["lr"], 4))
        for t in study.search_space.representatives()
    }
    # A sampled per-backbone key is costed at one value (the geometric middle of a loguniform).
    assert found == {
        ("padim", "resnet18", None),
        ("padim", "resnet34", None),
        ("stfpm", "resnet18", round((0.01 * 0.4) ** 0.5, 4)),
        ("stfpm", "resnet34", 0.1),
        ("stfpm", "resnet34", 0.4),
    }
