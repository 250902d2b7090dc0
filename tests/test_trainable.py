"""One trial without Ray: per-epoch results for schedulers, and what lands in the row."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sweep.errors import StudyError
from sweep.run.runner import study_schema
from sweep.run.study import expand_trials, study_from_dict
from sweep.run.trainable import TrialContext, run_trial
from tests.conftest import tiny_study


def _context(study, tmp_path) -> TrialContext:
    return TrialContext(
        study=study, output=str(tmp_path / "out"), run_id="test", schema=study_schema(study)
    )


def test_iterative_trial_scores_validation_every_epoch_but_the_last(glue_root, tmp_path):
    raw = tiny_study(glue_root, tmp_path / "out")
    raw["space"] = {
        "model": "stfpm",
        "backbone": "resnet18",
        "pretrained": False,
        "seed": 0,
        "epochs": 3,
        "stfpm.layers": ["layer1", "layer2"],
    }
    raw["scheduler"] = {"kind": "asha", "metric": "val_image_auroc"}
    study = study_from_dict(raw)
    reports: list[dict] = []
    row = run_trial(expand_trials(study)[0], _context(study, tmp_path), reports.append)

    assert [r["epoch"] for r in reports] == [1, 2, 3]
    for report in reports[:2]:
        assert 0.0 <= report["val_image_auroc"] <= 1.0
        assert 0.0 <= report["val_pixel_auroc"] <= 1.0
        assert report["loss"] > 0
    # The last epoch is the end of training: no metric a scheduler could stop it on.
    assert "val_image_auroc" not in reports[2] and "loss" in reports[2]
    assert row["epochs_run"] == 3
    assert 0.0 <= row["image_auroc"] <= 1.0


def test_one_pass_trials_give_a_scheduler_nothing_to_stop(glue_root, tmp_path):
    raw = tiny_study(glue_root, tmp_path / "out")
    raw["space"] = {"model": "padim", "backbone": "resnet18", "pretrained": False, "epochs": 5}
    raw["scheduler"] = {"kind": "asha"}
    study = study_from_dict(raw)
    reports: list[dict] = []
    run_trial(expand_trials(study)[0], _context(study, tmp_path), reports.append)
    assert reports == [{"epoch": 1}]


def test_scheduler_settings_are_validated():
    base = {"name": "s", "space": {"model": "stfpm"}}
    with pytest.raises(StudyError, match="did you mean 'val_image_auroc'"):
        study_from_dict({**base, "scheduler": {"metric": "val_image_aucroc"}})
    with pytest.raises(StudyError, match="grid' or 'random'"):
        study_from_dict({**base, "scheduler": {}, "search": {"algorithm": "optuna", "n_trials": 3}})
    study = study_from_dict({**base, "scheduler": {"metric": "loss"}})
    assert study.scheduler.direction == "min"


def test_what_a_detector_could_not_use_lands_in_the_row(glue_root, tmp_path):
    raw = tiny_study(glue_root, tmp_path / "out")
    raw["space"] = {"model": "efficient_ad", "seed": 0, "epochs": 1}
    study = study_from_dict(raw)
    row = run_trial(expand_trials(study)[0], _context(study, tmp_path))
    assert "imagenet_dir" in row["notes"] and "teacher" in row["notes"]
    assert row["params_trainable"] > 0 and row["params_frozen"] > 0


def test_validation_mid_training_gives_each_module_its_own_mode_back(glue_root, tmp_path):
    import models
    from sweep.run.trainable import _validation_metrics, load_data

    raw = tiny_study(glue_root, tmp_path / "out")
    raw["space"] = {"model": "stfpm", "backbone": "resnet18", "pretrained": False}
    raw["scheduler"] = {"kind": "asha"}
    study = study_from_dict(raw)
    detector = models.create("stfpm", backbone="resnet18", pretrained=False)
    detector.train()
    frozen_part = detector.student.model.layer1
    frozen_part.eval()  # e.g. a phase of training that holds part of the network fixed
    values = _validation_metrics(detector, load_data(study, 64).val, study, torch.device("cpu"))
    assert 0.0 <= values["val_image_auroc"] <= 1.0
    assert detector.training and detector.student.training
    assert not frozen_part.training


def test_an_attempt_runs_its_models_batch_sizes(glue_root, tmp_path):
    raw = tiny_study(glue_root, tmp_path / "out")
    raw["evaluation"]["models"] = {"padim": {"train_batch_size": 3, "batch_size": 5}}
    study = study_from_dict(raw)
    ctx = _context(study, tmp_path)
    assert ctx.batch_sizes("padim") == (3, 5)
    assert ctx.batch_sizes("patchcore") == (8, 8)
    retry = dataclasses.replace(ctx, train_batch_size=1)  # an out-of-memory retry's context
    assert retry.batch_sizes("padim") == (1, 5)


def _images_of(output, row_hash):
    from sweep.results import read_images

    return read_images(output, [row_hash])


def test_a_trial_stores_its_per_image_results_and_the_threshold_policy(glue_root, tmp_path):
    from sweep.run.study import config_hash

    raw = tiny_study(glue_root, tmp_path / "out")
    raw["space"] = {"model": "padim", "backbone": "resnet18", "pretrained": False, "seed": 0}
    raw["evaluation"]["threshold"] = "youden"
    study = study_from_dict(raw)
    trial = expand_trials(study)[0]
    row = run_trial(trial, _context(study, tmp_path))
    images = _images_of(tmp_path / "out", config_hash(study, trial))
    assert (row["threshold_policy"], row["pixel_threshold_policy"]) == ("youden", "youden")
    assert row["val_source"] == "split"
    test = images[images["split"] == "test"]
    assert len(test) == row["n_test"] and (images["split"] == "val").sum() == row["n_val"]
    # What the row says follows from the stored scores: the recompute's premise.
    flagged = test["score"] >= row["image_threshold"]
    assert row["image_tp"] == int((flagged & (test["label"] == 1)).sum())
    assert row["image_fp"] == int((flagged & (test["label"] == 0)).sum())
    anomalous = test[test["label"] == 1]
    assert (anomalous["defect"] != "good").all() and (anomalous["defect_pixels"] > 0).all()
    assert (test.loc[test["label"] == 0, "defect_pixels"] == 0).all()
    assert anomalous["defect_fraction"].between(0, 1).all()


def test_validation_from_test_and_split_axes_change_the_trial_s_data(glue_root, tmp_path):
    raw = tiny_study(glue_root, tmp_path / "out")
    raw["space"] = {
        "model": "padim",
        "backbone": "resnet18",
        "pretrained": False,
        "seed": {"grid": [0, 1]},
        "split_seed": "seed",
        "test_fraction": 0.3,
    }
    raw["evaluation"]["validation"] = "from_test"
    raw["evaluation"]["val_from_test"] = 0.5
    study = study_from_dict(raw)
    trials = expand_trials(study)
    assert [t.split_seed for t in trials] == [0, 1]
    rows = [run_trial(t, _context(study, tmp_path)) for t in trials]
    base = study_from_dict(tiny_study(glue_root, tmp_path / "base"))
    from sweep.run.trainable import load_data

    pooled = load_data(base, 64)
    total = len(pooled.train) + len(pooled.val) + len(pooled.test)
    for row in rows:
        assert row["val_source"] == "from_test"
        assert row["n_train"] + row["n_val"] + row["n_test"] == total
    tested = [
        set(load_data(study, 64, "none", t.split_seed, t.test_fraction).test.paths) for t in trials
    ]
    assert tested[0] != tested[1], "each seed draws its own split"


def test_a_kept_model_scores_the_test_split_as_the_trial_did(glue_root, tmp_path):
    from sweep.deploy.artefact import rebuild_detector
    from sweep.results import MODELS_DIR, ResultStore, read_images
    from sweep.run.study import config_hash
    from sweep.run.trainable import load_data

    raw = tiny_study(glue_root, tmp_path / "out")
    raw["space"] = {"model": "padim", "backbone": "resnet18", "pretrained": False, "seed": 0}
    raw["evaluation"]["keep_models"] = "all"
    study = study_from_dict(raw)
    trial = expand_trials(study)[0]
    run_trial(trial, _context(study, tmp_path))
    digest = config_hash(study, trial)
    store = ResultStore(tmp_path / "out")
    assert store.kept_models() == [digest]
    folder = tmp_path / "out" / MODELS_DIR
    import json

    recipe = json.loads((folder / f"{digest}.json").read_text())
    detector = rebuild_detector(recipe, folder / f"{digest}.safetensors")
    test = load_data(study, 64).test
    with torch.no_grad():
        scores = detector.predict(test.images()).score.numpy()
    stored = read_images(tmp_path / "out", [digest]).query("split == 'test'")["score"].to_numpy()
    assert abs(scores - stored).max() < 1e-5
    # keep_models decides what is kept, not what is computed: the config hash ignores it.
    raw["evaluation"]["keep_models"] = "none"
    assert config_hash(study_from_dict(raw), trial) == digest
    store.remove_model(digest)
    assert store.kept_models() == []
