"""Where results go: local paths and URIs through pyarrow filesystems, the checks made before
any trial, the study copy that `sweep resume` runs, one driver per output, and what a writer
killed mid-write leaves (nothing any reader sees)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pandas as pd
import pyarrow.dataset as pads
import pytest
import ray.cloudpickle as cloudpickle
import yaml
from typer.testing import CliRunner

from sweep.cli import app
from sweep.errors import SweepError
from sweep.results import ResultStore, read_results
from sweep.run.runner import read_study_copy, run_study, study_schema
from sweep.run.search import (
    OPTUNA_JOURNAL,
    check_optuna_storage,
    finished_optuna_trials,
    optuna_storage,
    settle_stale_optuna_trials,
)
from sweep.run.study import (
    config_hash,
    expand_trials,
    study_from_dict,
    study_to_yaml,
)
from tests.conftest import tiny_study


def quick_runner(trial, ctx, report):
    """A trial that trains nothing: these tests are about where rows go."""
    return {"image_auroc": 0.5 + trial.seed / 100, "latency_ms": 1.0 + trial.seed, "train_s": 0.0}


# Ray workers cannot import this test module; ship its functions by value.
cloudpickle.register_pickle_by_value(__import__(__name__))


def _grid_study(glue_root, output, seeds=3):
    raw = tiny_study(glue_root, output)
    raw["space"] = {"model": "patchcore", "seed": {"grid": list(range(seeds))}}
    return study_from_dict(raw)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again on return: nothing listens there


@pytest.mark.ray
def test_a_file_uri_output_runs_reruns_and_reads_back(ray_session, glue_root, tmp_path):
    uri = f"{(tmp_path / 'out').as_uri()}"
    assert uri.startswith("file:///")
    study = _grid_study(glue_root, uri)
    summary = run_study(study, trial_runner=quick_runner, preflight=False)
    assert (summary.ok, summary.errors, summary.lost, summary.output) == (3, 0, 0, uri)

    folder = tmp_path / "out"
    assert len(list(folder.glob("*.parquet"))) == 3
    assert (folder / "_tune").is_dir(), "Tune's state follows the output"
    rows = read_results(uri)
    assert sorted(rows.seed) == [0, 1, 2] and set(rows.status) == {"ok"}
    assert sorted(rows.config_hash) == sorted(config_hash(study, t) for t in expand_trials(study))

    again = run_study(study, trial_runner=quick_runner, preflight=False)
    assert (again.planned, again.skipped, again.ok) == (3, 3, 0)
    assert len(read_results(uri)) == 3

    # The study copy: what `sweep resume URI` runs.
    copy = read_study_copy(uri)
    assert study_to_yaml(copy) == study_to_yaml(study)
    assert copy.source == f"{uri}/_study.yaml"
    result = CliRunner().invoke(app, ["resume", uri])
    assert result.exit_code == 0, result.output
    assert "all 3 trials of 'tiny' are already in" in " ".join(result.output.split())


def test_an_unreachable_object_store_fails_before_anything_runs(tmp_path, monkeypatch):
    # No credentials, and an endpoint where nothing listens: what a typo or a missing VPN does.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    uri = f"s3://results/glue?endpoint_override=127.0.0.1:{_closed_port()}&scheme=http"
    never = tmp_path / "glue-never-made"
    raw = tiny_study(never, tmp_path / "unused")
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(raw))
    start = time.monotonic()
    result = CliRunner().invoke(app, ["run", str(study_file), "--output", uri])
    message = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert f"error: output {uri!r}: cannot reach it" in message
    assert "Traceback" not in result.output
    assert not never.exists(), "failed before the data pre-flight"
    assert time.monotonic() - start < 120


def test_storage_that_never_answers_is_given_up_on_with_a_message(tmp_path):
    class Silent:
        def get_file_info(self, path):
            time.sleep(30)

    store = ResultStore(tmp_path.as_uri())
    store.fs, store.local, store.uri = Silent(), False, "gs://results/glue"
    start = time.monotonic()
    with pytest.raises(SweepError, match=r"output 'gs://results/glue': the storage did not answer"):
        store.check_reachable(timeout_s=0.5)
    assert time.monotonic() - start < 5


def test_an_optuna_journal_needs_a_posix_output(glue_root, tmp_path):
    raw = tiny_study(glue_root, tmp_path / "out")
    raw["space"] = {"model": "patchcore", "seed": {"int": [0, 9]}}
    raw["search"] = {"algorithm": "optuna", "n_trials": 2}
    study = study_from_dict(raw)
    object_store = ResultStore("s3://results/glue?region=eu-west-1")  # parsed, never contacted
    with pytest.raises(SweepError, match=r"search.storage: the Optuna journal needs a local"):
        check_optuna_storage(study, object_store)
    # An RDB (or no storage) is fine there; a local output keeps the journal.
    check_optuna_storage(
        study.model_copy(
            update={"search": study.search.model_copy(update={"storage": "sqlite:///optuna.db"})}
        ),
        object_store,
    )
    check_optuna_storage(study, ResultStore(tmp_path / "out"))


def test_resume_needs_the_study_copy_of_a_run(tmp_path):
    empty = tmp_path / "not-a-study-output"
    empty.mkdir()
    for output in (empty, tmp_path / "missing"):
        result = CliRunner().invoke(app, ["resume", str(output)])
        message = " ".join(result.output.split())
        assert result.exit_code == 2, result.output
        assert f"output {str(output)!r}: no study copy (_study.yaml) there" in message
    assert not (tmp_path / "missing").exists()


def test_one_driver_per_output_and_a_killed_holder_frees_it(tmp_path):
    store = ResultStore(tmp_path / "out")
    in_use = r"is in use by another sweep run \(pid \d+ on "
    second = ResultStore(tmp_path / "out")
    with store.lock(), pytest.raises(SweepError, match=in_use), second.lock():
        pass
    with store.lock():  # released on exit
        pass

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import time
                from sweep.results import ResultStore
                with ResultStore({str(tmp_path / "out")!r}).lock():
                    print("held", flush=True)
                    time.sleep(600)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SweepError, match=f"pid {holder.pid} on "), store.lock():
            pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with store.lock():  # the kernel dropped the dead driver's lock
        pass


def test_a_writer_killed_mid_write_leaves_nothing_a_reader_sees(glue_root, tmp_path):
    duckdb = pytest.importorskip("duckdb")
    study = _grid_study(glue_root, tmp_path / "out", seeds=2)
    first, second = expand_trials(study)
    row = {"config_hash": config_hash(study, first), "status": "ok", "seed": 0}
    ResultStore(tmp_path / "out").write_row(row, study_schema(study))
    # A second writer dies (SIGKILL) at the very moment it would rename its file into place.
    script = textwrap.dedent(
        f"""
        import os, signal
        from sweep.results import ResultStore
        from sweep.run.runner import study_schema
        from sweep.run.study import load_study
        os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        study = load_study({str(tmp_path / "study.yaml")!r})
        row = {{"config_hash": {config_hash(study, second)!r}, "status": "ok", "seed": 1}}
        ResultStore({str(tmp_path / "out")!r}).write_row(row, study_schema(study))
        """
    )
    (tmp_path / "study.yaml").write_text(study_to_yaml(study))
    killed = subprocess.run([sys.executable, "-c", script], check=False)
    assert killed.returncode == -signal.SIGKILL
    leftovers = [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1, "the partial file is there..."

    out = tmp_path / "out"
    assert len(pd.read_parquet(out)) == 1, "...but no reader sees it"
    assert pads.dataset(out, format="parquet").count_rows() == 1
    assert duckdb.sql(f"SELECT count(*) FROM '{out}/**/*.parquet'").fetchall() == [(1,)]
    assert ResultStore(out).statuses() == {row["config_hash"]: "ok"}
    assert ResultStore(out).remove_temporary_files() == leftovers
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def _optuna_study(glue_root, tmp_path):
    raw = tiny_study(glue_root, tmp_path / "out")
    raw["space"] = {
        "model": "patchcore",
        "seed": {"int": [0, 50]},
        "patchcore.coreset_ratio": {"loguniform": [0.01, 0.5]},
    }
    raw["search"] = {"algorithm": "optuna", "sampler": "random", "n_trials": 4, "seed": 0}
    return study_from_dict(raw)


def test_a_torn_optuna_journal_record_and_a_stale_lock_are_repaired(glue_root, tmp_path):
    study = _optuna_study(glue_root, tmp_path)
    store = ResultStore(tmp_path / "out")
    storage = optuna_storage(study, store)
    created = optuna.create_study(
        study_name=study.name, storage=storage, directions=["maximize", "minimize"]
    )
    created.tell(created.ask({"x": optuna.distributions.FloatDistribution(0, 1)}), [0.5, 1.0])
    journal = Path(store.root) / OPTUNA_JOURNAL
    # A driver killed mid-append: half a record, and the journal's lock still in place.
    with journal.open("ab") as handle:
        handle.write(b'{"op_code": 4, "worker_id": "dead", "trial_id": 0, "sta')
    os.symlink(str(journal) + ".dead", str(journal) + ".lock")

    start = time.monotonic()
    storage = optuna_storage(study, store)
    resumed = optuna.load_study(study_name=study.name, storage=storage)
    resumed.tell(resumed.ask({"x": optuna.distributions.FloatDistribution(0, 1)}), [0.7, 2.0])
    assert time.monotonic() - start < 10, "no wait for a stale lock"
    again = optuna.load_study(study_name=study.name, storage=optuna_storage(study, store))
    assert [t.values for t in again.get_trials()] == [[0.5, 1.0], [0.7, 2.0]]
    assert journal.read_bytes().endswith(b"\n")


def test_trials_a_killed_driver_left_running_are_settled_from_their_rows(glue_root, tmp_path):
    study = _optuna_study(glue_root, tmp_path)
    store = ResultStore(tmp_path / "out")
    storage = optuna_storage(study, store)
    created = optuna.create_study(
        study_name=study.name, storage=storage, directions=["maximize", "minimize"]
    )
    space = study.search_space
    finished, lost = created.ask(), created.ask()
    space.suggest(finished)
    space.suggest(lost)
    # `finished` wrote its row before the driver died; `lost` was still training.
    trial = space.resolve_sampled(finished.params)
    row = {"config_hash": config_hash(study, trial), "status": "ok", "image_auroc": 0.8}
    ResultStore(tmp_path / "out").write_row({**row, "latency_ms": 3.0}, study_schema(study))
    assert finished_optuna_trials(study, storage) == 0

    assert settle_stale_optuna_trials(study, storage, store) == (1, 1)
    trials = optuna.load_study(study_name=study.name, storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL"]
    assert trials[0].values == [0.8, 3.0]
    assert finished_optuna_trials(study, storage) == 1, "the finished trial counts, once"
    assert settle_stale_optuna_trials(study, storage, store) == (0, 0)


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "random"])
def test_a_resumed_optuna_search_at_the_top_seed_still_seeds_its_sampler(
    glue_root, tmp_path, sampler
):
    """search.seed may be 2**32 - 1; a resume seeds its sampler past the finished trials, which
    Optuna's samplers refuse beyond 2**32 - 1: the seed wraps round instead."""
    from sweep.run.search import optuna_searcher

    raw = tiny_study(glue_root, tmp_path / "out")
    raw["search"] = {"algorithm": "optuna", "sampler": sampler, "n_trials": 4, "seed": 2**32 - 1}
    searcher = optuna_searcher(study_from_dict(raw), finished=3)
    assert searcher._sampler._rng.rng.randint(10) == optuna_searcher(
        study_from_dict({**raw, "search": {**raw["search"], "seed": 2}})
    )._sampler._rng.rng.randint(10)
