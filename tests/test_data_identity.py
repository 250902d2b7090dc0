"""What a study's data is: the bit depth of 16-bit files (part of a trial's identity only when
set), the data set's content fingerprint (an edited data set is not taken for the one an
output's rows came from) and the study an output holds (one output, one study)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray.cloudpickle as cloudpickle

from sweep.errors import SweepError
from sweep.results import BASE_SCHEMA, ResultStore, read_results
from sweep.run.runner import (
    DATA_RECORD,
    STUDY_COPY,
    check_data_unchanged,
    check_same_study,
    run_study,
)
from sweep.run.smoke import smoke_form
from sweep.run.study import (
    apply_override,
    config_hash,
    continuation_problem,
    data_changes,
    data_record,
    expand_trials,
    study_from_dict,
    study_to_yaml,
)
from tests.conftest import tiny_study
from tests.test_cli import mvtec


def _study(tmp_path: Path, **dataset):
    # Fixed paths: the data set's root is part of the config hash.
    raw = tiny_study(Path("/tmp/x/glue"), Path("/tmp/x/out"))
    raw["dataset"].update(dataset)
    return study_from_dict(raw)


def test_bit_depth_enters_the_config_hash_only_when_set(tmp_path):
    default = _study(tmp_path)
    trial = expand_trials(default)[0]
    auto = _study(tmp_path, bit_depth="auto")
    twelve = _study(tmp_path, bit_depth=12)
    assert default.dataset.bit_depth == "auto"
    assert "bit_depth" not in default.dataset.identity()
    # The id every existing output holds for this configuration (before the key existed).
    assert config_hash(default, trial) == config_hash(auto, trial) == "92df86efc58c569d"
    assert config_hash(twelve, trial) != config_hash(default, trial)
    assert twelve.dataset.loader_arguments(64)["bit_depth"] == 12
    assert "bit_depth" not in default.dataset.loader_arguments(64)


# ------------------------------------------------------------------------ one output, one study


def _grid(tmp_path: Path, **changes) -> dict:
    raw = tiny_study(tmp_path / "glue", tmp_path / "out")
    raw["space"]["seed"] = {"grid": [0, 1]}
    for key, value in changes.items():
        apply_override(raw, key, value=value)
    return raw


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"name": "other"}, "name: 'tiny' -> 'other'"),
        ({"dataset.image_size": 96}, "dataset.image_size: 64 -> 96"),
        ({"dataset.synthetic.n_train": 20}, "dataset.synthetic.n_train: 12 -> 20"),
        ({"evaluation.threshold": "youden"}, "evaluation.threshold: 'f1_max' -> 'youden'"),
        ({"objectives": [{"metric": "pixel_auroc"}]}, "objectives"),
        ({"space.seed": 0}, "does not hold 2 of the output's 4 trials"),
        ({"space.backbone": "resnet34"}, "does not hold 4 of the output's 4 trials"),
        ({"search.algorithm": "random"}, "search.algorithm: grid -> random"),
    ],
)
def test_another_study_is_not_a_continuation(tmp_path, changes, needle):
    saved = study_from_dict(_grid(tmp_path))
    problem = continuation_problem(saved, study_from_dict(_grid(tmp_path, **changes)))
    assert problem is not None and needle in problem, problem


def test_a_continuation_only_adds_trials_and_may_change_what_decides_no_result(tmp_path):
    saved = study_from_dict(_grid(tmp_path))
    assert continuation_problem(saved, saved) is None
    grown = _grid(
        tmp_path,
        **{
            "space.seed": {"grid": [0, 1, 2]},
            "space.model": {"grid": ["patchcore", "padim", "dfm"]},
            "resources.cpu": 2,
            "max_concurrent": 1,
            "evaluation.example_maps": 0,
            "evaluation.keep_models": "all",
            "description": "more seeds",
            "output": str(tmp_path / "elsewhere"),
        },
    )
    assert continuation_problem(saved, study_from_dict(grown)) is None
    # Optuna: more trials are a continuation; another sampler is another study.
    optuna = {"search": {"algorithm": "optuna", "n_trials": 3, "seed": 1}}
    first = study_from_dict({**_grid(tmp_path), **optuna})
    more = study_from_dict({**_grid(tmp_path), "search": {**optuna["search"], "n_trials": 9}})
    assert continuation_problem(first, more) is None
    other = {**optuna["search"], "sampler": "random"}
    assert "search.sampler" in continuation_problem(
        first, study_from_dict({**_grid(tmp_path), "search": other})
    )


def test_smoke_form_is_another_study(tmp_path):
    study = study_from_dict(_grid(tmp_path))
    assert "name: 'tiny' -> 'tiny-smoke'" in continuation_problem(study, smoke_form(study))


def test_run_refuses_another_study_before_writing_anything(tmp_path):
    output = tmp_path / "out"
    saved = study_from_dict(_grid(tmp_path))
    store = ResultStore(output)
    check_same_study(saved, store)  # nothing there: any study may start it
    store.ensure()
    store.write_file(STUDY_COPY, study_to_yaml(saved).encode())
    before = sorted(p.name for p in output.iterdir())
    other = study_from_dict(_grid(tmp_path, **{"dataset.image_size": 96}))
    with pytest.raises(SweepError, match=r"holds study 'tiny'.*dataset.image_size: 64 -> 96"):
        run_study(other, output=str(output), preflight=False)
    assert sorted(p.name for p in output.iterdir()) == before == [STUDY_COPY]


# ----------------------------------------------------------------------------- the data's content


def _mvtec_study(tmp_path: Path):
    root = mvtec(tmp_path / "mvtec")
    raw = tiny_study(tmp_path / "glue", tmp_path / "out")
    raw["dataset"] = {"kind": "mvtec", "root": str(root), "category": "part", "image_size": 64}
    return study_from_dict(raw), root / "part"


def test_data_record_lists_the_files_and_changes_with_them(tmp_path):
    study, part = _mvtec_study(tmp_path)
    record = data_record(study.dataset)
    assert record["kind"] == "mvtec" and record["data"] == str(part)
    assert set(record["files"]) == {
        "train/good/000.png",
        "train/good/001.png",
        "train/good/002.png",
        "test/good/000.png",
        "test/crack/000.png",
        "ground_truth/crack/000_mask.png",
    }
    assert data_record(study.dataset) == record  # listing reads no file: stable
    (part / "train" / "good" / "003.png").write_bytes((part / "train/good/000.png").read_bytes())
    (part / "test" / "good" / "000.png").unlink()
    (part / "test" / "crack" / "000.png").write_bytes(b"edited")
    changed = data_record(study.dataset)
    assert changed["fingerprint"] != record["fingerprint"]
    assert data_changes(record, changed) == (
        "1 file(s) added (train/good/003.png); 1 file(s) removed (test/good/000.png); "
        "1 file(s) modified (test/crack/000.png)"
    )
    # Generated data: its generator's configuration is its content.
    glue = study_from_dict(tiny_study(tmp_path / "glue", tmp_path / "out")).dataset
    assert "files" not in data_record(glue)
    assert data_record(glue)["fingerprint"] == data_record(glue)["fingerprint"]


def test_a_changed_data_set_is_refused_and_rerun_replaces_every_row(tmp_path):
    study, part = _mvtec_study(tmp_path)
    store = ResultStore(tmp_path / "made")
    store.ensure()
    store.write_file(DATA_RECORD, json.dumps(data_record(study.dataset)).encode())
    for digest in ("a" * 16, "b" * 16):
        store.write_row({"config_hash": digest, "status": "ok"}, BASE_SCHEMA)
        store.write_file(f"_images/{digest}.parquet", b"")
        store.write_file(f"_examples/{digest}.npz", b"")
    assert check_data_unchanged(study, store) == (data_record(study.dataset), False)

    (part / "test" / "good" / "000.png").unlink()
    with pytest.raises(SweepError) as caught:
        check_data_unchanged(study, store)
    message = str(caught.value)
    assert f"data set {part} changed since the rows of output {store.uri!r}" in message
    assert "1 file(s) removed (test/good/000.png)" in message
    assert "--on-data-change rerun" in message
    record, replace = check_data_unchanged(study, store, "rerun")
    assert replace and "test/good/000.png" not in record["files"]
    assert store.remove_results(["_examples"]) == 2
    assert sorted(p.name for p in (tmp_path / "made").iterdir()) == [DATA_RECORD]
    # Without rows there is nothing stale: the data as it is now is taken.
    assert check_data_unchanged(study, store)[1] is False


@pytest.mark.slow
@pytest.mark.ray
def test_a_changed_data_set_is_refused_or_rerun_on_request(ray_session, tmp_path):
    study, part = _mvtec_study(tmp_path)
    output = tmp_path / "out"
    first = run_study(study, output=str(output), trial_runner=_runner, preflight=False)
    assert first.ok == 2
    record = json.loads((output / DATA_RECORD).read_text())
    assert record["fingerprint"] == data_record(study.dataset)["fingerprint"]
    (part / "train" / "good" / "009.png").write_bytes((part / "train/good/000.png").read_bytes())
    before = {p.name: p.stat().st_mtime_ns for p in output.glob("*.parquet")}
    with pytest.raises(
        SweepError,
        match=r"part changed since the rows of output .*1 file\(s\) added \(train/good/009.png\)"
        r".*--on-data-change rerun",
    ):
        run_study(study, output=str(output), trial_runner=_runner, preflight=False)
    assert {p.name: p.stat().st_mtime_ns for p in output.glob("*.parquet")} == before

    (output / "_images").mkdir()
    (output / "_images" / "stale.parquet").write_bytes(b"")
    rerun = run_study(
        study, output=str(output), trial_runner=_runner, preflight=False, on_data_change="rerun"
    )
    assert (rerun.skipped, rerun.ok) == (0, 2)
    assert not (output / "_images" / "stale.parquet").exists()
    assert len(read_results(output)) == 2
    assert json.loads((output / DATA_RECORD).read_text())["files"]["train/good/009.png"]


def _runner(trial, ctx, report):
    return {"image_auroc": 0.5, "latency_ms": 1.0, "train_s": 0.0}


cloudpickle.register_pickle_by_value(__import__(__name__))


def test_an_unknown_on_data_change_is_refused_first(tmp_path):
    study = study_from_dict(_grid(tmp_path))
    with pytest.raises(SweepError, match="--on-data-change 'keep': expected one of refuse, rerun"):
        run_study(study, on_data_change="keep", preflight=False)
    assert not (tmp_path / "out").exists()
