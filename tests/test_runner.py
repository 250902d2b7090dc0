"""The whole path through Ray Tune: study -> trials -> Parquet rows -> re-run skips them."""

from __future__ import annotations

import itertools
import math

import pandas as pd
import pytest
import ray.cloudpickle as cloudpickle

from sweep.errors import StudyError
from sweep.results import read_results
from sweep.run.runner import run_study
from sweep.run.study import study_from_dict
from tests.conftest import tiny_study

pytestmark = pytest.mark.ray


def trivial_runner(trial, ctx, report):
    """A trial that trains nothing: isolates the engine from the detectors."""
    if trial.seed == 13:
        raise RuntimeError("seed 13 is unlucky")
    if report is not None:
        report({"epoch": 1, "loss": 0.5})
    return {"image_auroc": 0.5 + trial.seed / 100, "latency_ms": 1.0 + trial.seed, "train_s": 0.0}


# Ray workers cannot import this test module; ship its functions by value.
cloudpickle.register_pickle_by_value(__import__(__name__))


def test_real_tiny_study_rows_read_back(ray_session, glue_root, tmp_path, monkeypatch):
    duckdb = pytest.importorskip("duckdb")
    raw = tiny_study(glue_root, tmp_path / "out")
    raw["space"]["padim.n_features"] = {"grid": [32, 100000]}  # 100000 > channels: must fail
    study = study_from_dict(raw)
    with pytest.raises(StudyError, match="n_features"):
        run_study(study)  # a grid's refused configuration is bad input, found before any trial
    assert not (tmp_path / "out").exists()
    # One the up-front check cannot see (an Optuna draw) fails in its trial: an error row.
    monkeypatch.setattr("sweep.run.runner.check_hyperparameters", lambda study: None)
    summary = run_study(study)
    assert (summary.ok, summary.errors, summary.lost) == (2, 1, 0)

    df = pd.read_parquet(tmp_path / "out")
    assert len(df) == 3
    ok = df[df.status == "ok"]
    assert set(ok.model) == {"patchcore", "padim"}
    for row in ok.itertuples():
        assert 0.0 <= row.image_auroc <= 1.0
        assert row.latency_ms > 0 and row.throughput_fps > 0 and row.train_s > 0
        assert row.params_frozen > 0 and row.peak_rss_mb > 0
        assert row.device == "cpu" and row.image_size == 64 and row.backbone == "resnet18"
    error = df[df.status == "error"].iloc[0]
    assert error.model == "padim" and error["hp.n_features"] == 100000
    assert "100000" in error.error
    assert math.isnan(error.image_auroc)

    count = duckdb.sql(f"SELECT count(*) FROM '{tmp_path}/out/[!._]*.parquet'").fetchall()
    assert count == [(3,)]
    # Each scored trial's per-image results sit beside its row, one row per val and test image.
    images = duckdb.sql(
        f"SELECT config_hash, count(*) AS n, count(DISTINCT split) AS splits "
        f"FROM '{tmp_path}/out/_images/*.parquet' GROUP BY ALL"
    ).fetchall()
    assert {h for h, _, _ in images} == set(ok.config_hash)
    for _, n, splits in images:
        assert n == ok.n_val.iloc[0] + ok.n_test.iloc[0] and splits == 2

    again = run_study(study)
    assert (again.planned, again.skipped, again.ok, again.errors) == (3, 3, 0, 0)
    assert len(read_results(tmp_path / "out")) == 3


def test_error_rows_do_not_stop_the_sweep_and_retry_on_request(ray_session, glue_root, tmp_path):
    raw = tiny_study(glue_root, tmp_path / "out")
    raw["space"]["seed"] = {"grid": [0, 1, 13, 2]}
    raw["space"]["model"] = "patchcore"
    study = study_from_dict(raw)
    summary = run_study(study, trial_runner=trivial_runner, preflight=False)
    assert (summary.ok, summary.errors) == (3, 1)
    df = read_results(tmp_path / "out").set_index("seed")
    assert df.loc[13, "status"] == "error" and "unlucky" in df.loc[13, "error"]
    assert df.loc[2, "image_auroc"] == pytest.approx(0.52)

    retry = run_study(study, trial_runner=trivial_runner, preflight=False, retry_errors=True)
    assert (retry.planned, retry.skipped, retry.errors) == (4, 3, 1)
    assert len(read_results(tmp_path / "out")) == 4


def test_optuna_multi_objective_search(ray_session, glue_root, tmp_path):
    raw = tiny_study(glue_root, tmp_path / "out")
    raw["space"] = {
        "model": "patchcore",
        "backbone": "resnet18",
        "pretrained": False,
        "seed": {"choice": [0, 1, 2, 3, 4, 5, 6, 7]},
        "patchcore.coreset_ratio": {"loguniform": [0.01, 0.5]},
        "patchcore.num_neighbors": {"int": [1, 9]},
    }
    raw["search"] = {"algorithm": "optuna", "sampler": "nsga2", "n_trials": 5, "seed": 3}
    study = study_from_dict(raw)
    summary = run_study(study, trial_runner=trivial_runner, preflight=False)
    df = read_results(tmp_path / "out")
    assert summary.ok + summary.errors + summary.skipped == 5
    assert len(df) == df.config_hash.nunique() >= 1
    assert df["hp.coreset_ratio"].between(0.01, 0.5).all()
    assert df["hp.num_neighbors"].between(1, 9).all()


def test_optuna_search_through_tune_applies_per_backbone_keys(ray_session, glue_root, tmp_path):
    raw = tiny_study(glue_root, tmp_path / "out")
    raw["space"] = {
        "model": "patchcore",
        "backbone": {"choice": ["resnet18", "resnet34"]},
        "pretrained": False,
        "seed": {"choice": [0, 1, 2, 3]},
        "patchcore.num_neighbors": {"int": [1, 9]},
        "patchcore@resnet34.num_neighbors": {"int": [20, 30]},
    }
    raw["search"] = {"algorithm": "optuna", "sampler": "random", "n_trials": 8, "seed": 2}
    run_study(study_from_dict(raw), trial_runner=trivial_runner, preflight=False)
    df = read_results(tmp_path / "out")
    by_backbone = df.groupby("backbone")["hp.num_neighbors"]
    assert set(by_backbone.groups) == {"resnet18", "resnet34"}
    assert by_backbone.min()["resnet34"] >= 20 and by_backbone.max()["resnet18"] <= 9


def epoch_runner(trial, ctx, report):
    """Trains for ``trial.epochs`` epochs; seed 0 is a good configuration, the others poor."""
    quality = 0.9 if trial.seed == 0 else 0.2 + trial.seed / 100
    for epoch in range(1, trial.epochs + 1):
        if report is not None:
            # Like run_trial, the last epoch carries no scheduler metric: the trial is done.
            values = {} if epoch == trial.epochs else {"val_image_auroc": quality}
            report({"epoch": epoch, "loss": 1.0 / epoch, **values})
    return {"image_auroc": quality, "latency_ms": 1.0, "train_s": 0.0, "epochs_run": trial.epochs}


cloudpickle.register_pickle_by_value(__import__(__name__))


def test_asha_stops_poor_trials_early_and_records_them(ray_session, glue_root, tmp_path):
    raw = tiny_study(glue_root, tmp_path / "out")
    raw["space"] = {"model": "patchcore", "seed": {"grid": [0, 1, 2]}, "epochs": 9}
    raw["scheduler"] = {"kind": "asha", "grace_period": 1, "reduction_factor": 3}
    raw["max_concurrent"] = 1  # the good trial sets each rung's bar before the poor ones arrive
    study = study_from_dict(raw)
    summary = run_study(study, trial_runner=epoch_runner, preflight=False)
    assert (summary.ok, summary.stopped, summary.errors) == (1, 2, 0)

    df = read_results(tmp_path / "out").set_index("seed")
    assert df.loc[0, "status"] == "ok" and df.loc[0, "epochs_run"] == 9
    for seed in (1, 2):
        row = df.loc[seed]
        assert row["status"] == "stopped"
        assert row["epochs_run"] < 9
        assert "stopped by the asha scheduler" in row["notes"]
        assert math.isnan(row["image_auroc"])

    again = run_study(study, trial_runner=epoch_runner, preflight=False)
    assert (again.planned, again.skipped) == (3, 3)


def test_optuna_study_lives_in_a_journal_and_a_rerun_resumes_it(ray_session, glue_root, tmp_path):
    import optuna

    raw = tiny_study(glue_root, tmp_path / "out")
    raw["space"] = {
        "model": "patchcore",
        "backbone": "resnet18",
        "pretrained": False,
        "seed": {"int": [0, 50]},
        "patchcore.coreset_ratio": {"loguniform": [0.01, 0.5]},
    }
    raw["search"] = {"algorithm": "optuna", "sampler": "tpe", "n_trials": 3, "seed": 1}
    first = run_study(study_from_dict(raw), trial_runner=trivial_runner, preflight=False)
    assert first.ok == 3 and first.skipped == 0
    journal = tmp_path / "out" / "_optuna" / "journal.log"
    assert journal.is_file()
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))
    )
    stored = optuna.load_study(study_name="tiny", storage=storage)
    assert len(stored.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 3
    assert [d.name for d in stored.directions] == ["MAXIMIZE", "MINIMIZE"]

    raw["search"]["n_trials"] = 5
    second = run_study(study_from_dict(raw), trial_runner=trivial_runner, preflight=False)
    assert second.skipped == 3, "the finished trials count towards n_trials"
    assert second.ok + second.errors == 2
    stored = optuna.load_study(study_name="tiny", storage=storage)
    assert len(stored.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 5
    assert len(read_results(tmp_path / "out")) >= 3

    again = run_study(study_from_dict(raw), trial_runner=trivial_runner, preflight=False)
    assert again.skipped == 5 and again.ok == 0


def test_optuna_memory_storage_keeps_no_journal(ray_session, glue_root, tmp_path):
    raw = tiny_study(glue_root, tmp_path / "out")
    raw["space"] = {"model": "patchcore", "seed": {"int": [0, 9]}}
    raw["search"] = {"algorithm": "optuna", "n_trials": 2, "storage": "memory"}
    summary = run_study(study_from_dict(raw), trial_runner=trivial_runner, preflight=False)
    assert summary.ok == 2
    assert not (tmp_path / "out" / "_optuna").exists()


def test_packed_trials_never_time_at_once(ray_session, glue_root, tmp_path):
    # Two real trials run side by side on the 2 CPUs; each times 120 predictions. Their timing
    # windows, recorded in the rows, must not overlap.
    raw = tiny_study(glue_root, tmp_path / "out")
    raw["space"] = {
        "model": "padim",
        "backbone": "resnet18",
        "pretrained": False,
        "seed": {"grid": list(range(8))},
    }
    raw["evaluation"] = {**raw["evaluation"], "latency_repeats": 120}
    summary = run_study(study_from_dict(raw))
    # A tiny PaDiM trial takes about a second, while Tune's second actor takes several to start
    # (a fresh worker importing torch): the first actor alone could finish a short study. Eight
    # trials that each time 120 calls (~3 s, serialised by the lock) outlast that start-up.
    assert summary.ok == 8
    df = read_results(tmp_path / "out").sort_values("timing_started_at")
    assert df["timing_exclusive"].all()
    windows = list(zip(df["timing_started_at"], df["timing_finished_at"], strict=True))
    for (_, end), (start, _) in itertools.pairwise(windows):
        assert start >= end, "two trials timed at the same time"
    # The trials did run concurrently (so the lock had something to keep apart).
    spans = sorted(zip(df["started_at"], df["finished_at"], strict=True))
    assert any(b[0] < a[1] for a, b in itertools.pairwise(spans))


def test_define_by_run_samples_per_backbone_keys_only_for_the_drawn_backbone():
    import optuna

    deit = "deit_base_distilled_patch16_384"
    key = f"fastflow@{deit}.flow_steps"
    study = study_from_dict(
        {
            "name": "per-backbone",
            "search": {"algorithm": "optuna", "n_trials": 40},
            "space": {
                "model": {"choice": ["fastflow", "padim"]},
                "pretrained": False,
                "fastflow.backbone": {"choice": ["resnet18", deit]},
                "fastflow.image_size": "native",
                "fastflow.flow_steps": {"int": [2, 8]},
                key: {"int": [16, 24]},
                f"fastflow@{deit}.conv3x3_only": False,
            },
        }
    )
    space = study.search_space
    sampler = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    kinds = set()
    for _ in range(40):
        trial = sampler.ask()
        space.suggest(trial)
        config = space.resolve_sampled(trial.params)
        sampler.tell(trial, 0.0)
        kinds.add(config.backbone if config.model == "fastflow" else config.model)
        # Optuna holds a per-backbone value only for trials that run on that backbone.
        assert (key in trial.params) == (config.backbone == deit), trial.params
        if config.backbone == deit:
            assert 16 <= config.hparams["flow_steps"] <= 24
            assert config.hparams["conv3x3_only"] is False
        elif config.model == "fastflow":
            assert 2 <= config.hparams["flow_steps"] <= 8
            assert "conv3x3_only" not in config.hparams
        else:
            assert not {"flow_steps", "conv3x3_only"} & set(config.hparams)
    assert kinds == {"resnet18", deit, "padim"}


def test_asha_runs_to_the_longest_budget_a_model_has():
    def study(**space):
        return study_from_dict({"name": "t", "space": {"pretrained": False, **space}})

    def _max_epochs(study):
        return study.search_space.max_epochs()

    both = {"model": {"grid": ["stfpm", "padim"]}}
    assert _max_epochs(study(**both, epochs=5)) == 5
    assert _max_epochs(study(**both, epochs=5, **{"stfpm.epochs": 12})) == 12
    mixed = {"model": {"grid": ["stfpm", "draem"]}, "stfpm.epochs": 3}
    assert _max_epochs(study(**mixed)) == 700  # DRAEM's own default is the longest
    assert _max_epochs(study(**mixed, epochs={"grid": [4, 9]})) == 9
    assert _max_epochs(study(model="padim")) is None  # nothing trains in epochs
