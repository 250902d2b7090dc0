"""Fault tolerance: trials that fail for their own reason, out-of-memory retries, Ctrl-C, a
driver killed at random moments, and a worker node of a real multi-node Ray cluster killed
mid-trial. Each ends with every expected row present exactly once."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pandas as pd
import psutil
import pyarrow.dataset as pads
import pytest
import torch
import yaml

import models
from sweep.run.runner import study_schema
from sweep.run.study import config_hash, expand_trials, study_from_dict
from sweep.run.trainable import TrialContext, execute_trial
from tests.conftest import tiny_study

REPO = Path(__file__).resolve().parents[1]
SWEEP = str(Path(sys.executable).with_name("sweep"))


def _context(study, tmp_path, **kw) -> TrialContext:
    return TrialContext(
        study=study, output=str(tmp_path / "out"), run_id="t", schema=study_schema(study), **kw
    )


def _padim_study(glue_root, tmp_path, **evaluation):
    raw = tiny_study(glue_root, tmp_path / "out")
    raw["space"] = {"model": "padim", "backbone": "resnet18", "pretrained": False, "seed": 0}
    raw["evaluation"] = {**raw["evaluation"], "example_maps": 0, **evaluation}
    return study_from_dict(raw)


# ------------------------------------------------------------------ a trial's own failures


def test_an_exception_is_an_error_row_with_its_type_message_and_place(glue_root, tmp_path):
    study = _padim_study(glue_root, tmp_path)
    calls = []

    def broken(trial, ctx, report):
        calls.append(ctx.batch_sizes())
        raise KeyError("no such layer 'layer9'")

    row = execute_trial(expand_trials(study)[0], _context(study, tmp_path, trial_runner=broken))
    assert row["status"] == "error"
    assert row["error"].startswith("KeyError: \"no such layer 'layer9'\" [")
    assert "test_faults.py" in row["error"] and "broken" in row["error"]
    assert calls == [(8, 8)], "only out-of-memory failures are retried"
    assert row.get("retried_with_batch") is None


def test_a_nan_training_loss_is_an_error_row(glue_root, tmp_path, monkeypatch):
    study = _padim_study(glue_root, tmp_path)
    cls = models.get_class("padim")

    def diverging_fit(self, train, epochs=None, on_epoch_end=None):
        on_epoch_end(1, {"loss": float("nan")})

    monkeypatch.setattr(cls, "fit", diverging_fit)
    row = execute_trial(expand_trials(study)[0], _context(study, tmp_path))
    assert row["status"] == "error"
    assert row["error"].startswith("FloatingPointError: training loss is nan at epoch 1")
    assert row.get("image_auroc") is None


def test_non_finite_scores_are_an_error_row(glue_root, tmp_path, monkeypatch):
    study = _padim_study(glue_root, tmp_path)
    cls = models.get_class("padim")
    predict = cls.predict

    def nan_predict(self, images):
        prediction = predict(self, images)
        prediction.score[0] = float("inf")
        return prediction

    monkeypatch.setattr(cls, "predict", nan_predict)
    row = execute_trial(expand_trials(study)[0], _context(study, tmp_path))
    assert row["status"] == "error"
    assert "FloatingPointError" in row["error"] and "non-finite image scores" in row["error"]


def test_out_of_memory_at_the_smallest_batch_is_an_error_row(glue_root, tmp_path):
    study = _padim_study(glue_root, tmp_path, train_batch_size=1, batch_size=1)
    calls = []

    def oom(trial, ctx, report):
        calls.append(ctx.batch_sizes())
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    row = execute_trial(expand_trials(study)[0], _context(study, tmp_path, trial_runner=oom))
    assert calls == [(1, 1)], "nothing to halve: no retry"
    assert row["status"] == "error"
    assert row["error"].startswith("out of memory: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert row.get("retried_with_batch") is None


# ------------------------------------------------------------------ out-of-memory retry


def test_cuda_out_of_memory_is_retried_once_with_half_the_batch(glue_root, tmp_path):
    study = _padim_study(glue_root, tmp_path, train_batch_size=8, batch_size=6)
    calls = []
    forwarded: list[dict] = []

    def runner(trial, ctx, report):
        train, evaluation = ctx.batch_sizes()
        calls.append((train, evaluation))
        report({"epoch": 1, "loss": 1.0})
        report({"epoch": 2, "loss": 0.5})
        if train > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")
        report({"epoch": 3, "loss": 0.25})
        return {"image_auroc": 0.75, "eval_batch_size": evaluation, "notes": "fit note"}

    ctx = _context(study, tmp_path, trial_runner=runner)
    row = execute_trial(expand_trials(study)[0], ctx, forwarded.append)
    assert calls == [(8, 6), (4, 3)]
    assert row["status"] == "ok" and row["error"] is None
    assert row["image_auroc"] == 0.75
    assert row["retried_with_batch"] == 4 and row["eval_batch_size"] == 3
    assert "retried with train batch 4 and eval batch 3 (from 8 and 6)" in row["notes"]
    assert "out of memory: CUDA out of memory" in row["notes"] and "fit note" in row["notes"]
    # The scheduler sees every epoch once: the retry's epochs 1-2 were reported already.
    assert [r["epoch"] for r in forwarded] == [1, 2, 3]


def test_host_out_of_memory_in_a_real_trial_is_retried_with_half_the_batch(
    glue_root, tmp_path, monkeypatch
):
    study = _padim_study(glue_root, tmp_path)
    cls = models.get_class("padim")
    fit = cls.fit
    batches: list[int] = []

    def fit_once_out_of_memory(self, train, epochs=None, on_epoch_end=None):
        batches.append(train.batch_size)
        if len(batches) == 1:
            raise MemoryError("cannot allocate 12 GiB for the embedding")
        return fit(self, train, epochs=epochs, on_epoch_end=on_epoch_end)

    monkeypatch.setattr(cls, "fit", fit_once_out_of_memory)
    row = execute_trial(expand_trials(study)[0], _context(study, tmp_path))
    assert batches == [8, 4]
    assert row["status"] == "ok", row["error"]
    assert 0.0 <= row["image_auroc"] <= 1.0
    assert row["retried_with_batch"] == 4 and row["eval_batch_size"] == 4
    assert "out of memory: cannot allocate 12 GiB" in row["notes"]


def test_a_retry_that_runs_out_of_memory_again_is_an_error_row(glue_root, tmp_path):
    study = _padim_study(glue_root, tmp_path)
    calls = []

    def always_oom(trial, ctx, report):
        calls.append(ctx.batch_sizes())
        raise RuntimeError(f"CUDA error: out of memory (batch {ctx.batch_sizes()[0]})")

    row = execute_trial(expand_trials(study)[0], _context(study, tmp_path, trial_runner=always_oom))
    assert calls == [(8, 8), (4, 4)], "one retry only"
    assert row["status"] == "error" and row["retried_with_batch"] == 4
    assert row["error"].startswith("out of memory: CUDA error: out of memory (batch 4)")
    assert "after: out of memory: CUDA error: out of memory (batch 8)" in row["notes"]


def test_a_detector_floor_on_the_training_batch_is_kept(glue_root, tmp_path, monkeypatch):
    study = _padim_study(glue_root, tmp_path, train_batch_size=8, batch_size=8)
    monkeypatch.setattr(models.get_class("padim"), "min_train_batch_size", 8, raising=False)
    calls = []

    def oom_once(trial, ctx, report):
        calls.append(ctx.batch_sizes())
        if len(calls) == 1:
            raise MemoryError
        return {}

    row = execute_trial(expand_trials(study)[0], _context(study, tmp_path, trial_runner=oom_once))
    assert calls == [(8, 8), (8, 4)], "the training batch stays at the detector's floor"
    assert row["status"] == "ok" and row["retried_with_batch"] == 8


# ------------------------------------------------------------------ whole runs, interrupted
#
# These run `sweep run` (or a driver script) in subprocesses, each in a session of its own so
# that every process it starts (Ray's included) can be found and ended by id afterwards, and
# with RAY_TMPDIR of their own, so that no other Ray on the machine is joined or disturbed.


def _study_file(glue_root: Path, tmp_path: Path, seeds: int, **space) -> tuple[Path, Path]:
    output = tmp_path / "out"
    raw = tiny_study(glue_root, output)
    raw["space"] = {
        "model": "padim",
        "backbone": "resnet18",
        "pretrained": False,
        "seed": {"grid": list(range(seeds))},
        **space,
    }
    raw["evaluation"] = {**raw["evaluation"], "example_maps": 0}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, output


def _expected_hashes(study_path: Path) -> set[str]:
    from sweep.run.study import load_study

    study = load_study(study_path)
    return {config_hash(study, t) for t in expand_trials(study)}


@contextlib.contextmanager
def _ray_sandbox():
    """Environment for subprocesses that start Ray: a short RAY_TMPDIR of their own (Ray's
    socket paths must stay under 108 bytes), no inherited RAY_ADDRESS."""
    temp = tempfile.mkdtemp(prefix="rf", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=temp, PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    try:
        yield env
    finally:
        subprocess.run(["rm", "-rf", temp], check=False)


def _session_processes(sid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getsid(proc.pid) == sid:
                found.append(proc)
    return found


def _end_session(sid: int) -> None:
    """SIGKILL every process of a session this test started (by pid, nothing else)."""
    for proc in _session_processes(sid):
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(_session_processes(sid), timeout=10)


def _wait_for(condition, timeout_s: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process ended first (exit {proc.returncode})")
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout_s} s")


def _rows(output: Path) -> list[Path]:
    return sorted(output.glob("*.parquet")) if output.is_dir() else []


def _read_rows(output: Path) -> pd.DataFrame:
    # pyarrow's dataset discovery is what pandas, Polars and Ray Data read a folder through.
    return pads.dataset(output, format="parquet").to_table().to_pandas()


def _sweep(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [SWEEP, *args],
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
        env=env,
        cwd=REPO,
        start_new_session=True,
    )


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_says_how_to_resume(glue_root, tmp_path):
    study_path, output = _study_file(glue_root, tmp_path, seeds=10)
    expected = _expected_hashes(study_path)
    log = tmp_path / "run.log"
    with _ray_sandbox() as env:
        proc = _sweep(["run", str(study_path), "--num-cpus", "2"], env, log)
        try:
            _wait_for(lambda: _rows(output), 300, "a first finished trial", proc)
            # What a terminal's Ctrl-C does: SIGINT to the foreground process group.
            os.killpg(proc.pid, signal.SIGINT)
            code = proc.wait(timeout=120)
            text = " ".join(log.read_text().split())
            # Ray went down with the driver: nothing of its session is left running.
            _wait_for(lambda: not _session_processes(proc.pid), 60, "Ray's processes to end")
        finally:
            _end_session(proc.pid)
        assert code == 130, text
        assert "interrupted: the finished trials are saved in" in text
        assert f"sweep resume {output}" in text
        interrupted = _read_rows(output)
        assert 0 < len(interrupted) < len(expected), "the sweep was stopped mid-way"
        assert set(interrupted.status) == {"ok"}, "no trial in flight was written as finished"

        resume_log = tmp_path / "resume.log"
        proc = _sweep(["resume", str(output), "--num-cpus", "2"], env, resume_log)
        try:
            assert proc.wait(timeout=600) == 0, resume_log.read_text()
        finally:
            _end_session(proc.pid)
    resumed = " ".join(resume_log.read_text().split())
    assert f"{len(interrupted)} already done" in resumed
    final = _read_rows(output)
    assert sorted(final.config_hash) == sorted(expected)
    assert set(final.status) == {"ok"}


@pytest.mark.slow
def test_a_driver_killed_at_random_moments_loses_and_repeats_nothing(glue_root, tmp_path):
    study_path, output = _study_file(glue_root, tmp_path, seeds=14)
    expected = _expected_hashes(study_path)
    rng = random.Random(20260701)
    log = tmp_path / "run.log"
    rows_at_kill = []
    with _ray_sandbox() as env:
        # The first kill lands anywhere in the start (data pre-flight, Ray start, first
        # trials); each of the others at a random moment after that run finished a trial of
        # its own, while others are in flight.
        for kill in range(4):
            before = len(_rows(output))
            proc = _sweep(["run", str(study_path), "--num-cpus", "2"], env, log)
            try:
                if kill == 0:
                    time.sleep(rng.uniform(2.0, 10.0))
                else:
                    _wait_for(lambda n=before: len(_rows(output)) > n, 300, "a new row", proc)
                    time.sleep(rng.uniform(0.0, 1.0))
                assert proc.poll() is None, f"kill {kill}: the run ended before it"
                proc.kill()  # SIGKILL: no handler, no cleanup of any kind
                proc.wait(timeout=30)
                rows_at_kill.append(len(_rows(output)))
            finally:
                # A killed driver's Ray dies with it (Ray ties its processes to the driver's
                # life); what little outlives it (agents) is ended here, by pid.
                _end_session(proc.pid)
        proc = _sweep(["run", str(study_path), "--num-cpus", "2"], env, log)
        try:
            assert proc.wait(timeout=600) == 0, log.read_text()
        finally:
            _end_session(proc.pid)
    last = " ".join(log.read_text().split())

    assert rows_at_kill[-1] < len(expected), "the last kill still left trials to run"
    assert all(a < b for a, b in itertools.pairwise(rows_at_kill)), rows_at_kill
    match = re.search(r"(\d+) already done", last)
    assert match and int(match.group(1)) >= rows_at_kill[-1], (rows_at_kill, last)
    final = _read_rows(output)
    assert sorted(final.config_hash) == sorted(expected), "each expected row exactly once"
    assert set(final.status) == {"ok"}
    assert len(_rows(output)) == len(expected)
    assert not list(output.glob(".tmp-*")), "no temporary file is left behind"
    assert (output / "_study.yaml").is_file()


_DRIVER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path

    import ray

    from sweep.run.runner import run_study
    from sweep.run.study import config_hash, load_study
    from sweep.run.trainable import run_trial

    STUDY, ADDRESS, ATTEMPTS = sys.argv[1], sys.argv[2], Path(sys.argv[3])


    def logged_runner(trial, ctx, report):
        # Marks each attempt (configuration, node, process), then trains for real; the sleep
        # stands for a longer training, so that a node can die in the middle of one.
        node = ray.get_runtime_context().get_node_id()
        ATTEMPTS.joinpath(f"{config_hash(ctx.study, trial)}.{node}.{os.getpid()}").touch()
        time.sleep(4)
        return run_trial(trial, ctx, report)


    ray.init(address=ADDRESS, log_to_driver=False)
    deadline = time.monotonic() + 120
    while sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")) < 2:
        assert time.monotonic() < deadline, "the worker nodes did not join"
        time.sleep(0.5)
    summary = run_study(load_study(STUDY), address=ADDRESS, trial_runner=logged_runner)
    print(json.dumps({"ok": summary.ok, "errors": summary.errors, "lost": summary.lost}))
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_a_worker_node_killed_mid_trial_is_retried_on_another_node(glue_root, tmp_path):
    """A head (no CPUs: it runs no trials) and two one-CPU worker nodes, started with
    `ray start` on loopback; the node running the first trial dies with everything on it."""
    import secrets

    study_path, output = _study_file(glue_root, tmp_path, seeds=4, model="stfpm", epochs=2)
    expected = _expected_hashes(study_path)
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    port = _free_port()
    address = f"127.0.0.1:{port}"
    ray_cli = str(Path(sys.executable).with_name("ray"))
    common = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    started: list[subprocess.Popen] = []
    with _ray_sandbox() as env:
        # Token authentication, as a real cluster has it; the GCS declares a silent node dead
        # after ~10 s instead of ~30 s.
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=secrets.token_hex(32),
            RAY_health_check_period_ms="2000",
            RAY_health_check_timeout_ms="2000",
            RAY_health_check_failure_threshold="4",
        )

        def start(args: list[str], name: str) -> subprocess.Popen:
            log = (tmp_path / f"{name}.log").open("w")
            proc = subprocess.Popen(
                [ray_cli, "start", *args, *common],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            started.append(proc)
            return proc

        try:
            nodes = [
                ("head", ["--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false"]),
                ("w1", [f"--address={address}", "--num-cpus=1"]),
                ("w2", [f"--address={address}", "--num-cpus=1"]),
            ]
            for name, args in nodes:  # one at a time: 2 cores start one node at a time well
                node = start(args, name)
                log = tmp_path / f"{name}.log"
                _wait_for(lambda log=log: "Ray runtime started" in log.read_text(), 120, name, node)
            workers = started[1:]
            run_log = tmp_path / "driver.log"
            proc = subprocess.Popen(
                [sys.executable, str(driver), str(study_path), address, str(attempts)],
                stdout=subprocess.PIPE,
                stderr=run_log.open("w"),
                env=env,
                cwd=REPO,
                start_new_session=True,
                text=True,
            )
            started.append(proc)

            _wait_for(lambda: list(attempts.iterdir()), 300, "a first trial", proc)
            # The trial that started last is the one surely in the middle of its training.
            newest = max(attempts.iterdir(), key=lambda p: p.stat().st_mtime_ns)
            victim_hash, _, pid = newest.name.split(".")
            ancestors = {p.pid for p in psutil.Process(int(pid)).parents()}
            owner = [w for w in workers if w.pid in ancestors]
            assert len(owner) == 1, "the trial runs on one of the worker nodes"
            time.sleep(1.0)  # well inside the trial's 4 s of training
            assert not (output / f"{victim_hash}.parquet").exists()
            _end_session(owner[0].pid)  # the node's raylet, agents and workers, all at once

            out, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, run_log.read_text()[-3000:]
        finally:
            for process in reversed(started):
                _end_session(process.pid)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary == {"ok": len(expected), "errors": 0, "lost": 0}, summary

    rows = _read_rows(output)
    assert sorted(rows.config_hash) == sorted(expected), "every trial's row exactly once"
    assert set(rows.status) == {"ok"}
    tries = [p.name.split(".") for p in attempts.iterdir() if p.name.startswith(victim_hash)]
    assert len(tries) == 2, "the trial on the lost node ran again"
    assert len({node for _, node, _ in tries}) == 2, "on the other node"
