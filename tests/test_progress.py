"""The live sweep view counts what Tune tells it: running, ok, errors and retries."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

from sweep.results import Objective
from sweep.run.progress import SweepProgress


def _trial(trial_id: str, failures: int = 0):
    config = {"trial": {"model": "padim", "seed": 0, "image_size": 64, "epochs": None}}
    return SimpleNamespace(trial_id=trial_id, config=config, num_failures=failures, error_file="")


def _progress() -> tuple[SweepProgress, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=False)
    return SweepProgress(
        total=2, objectives=[Objective(metric="image_auroc")], console=console
    ), out


def test_a_trial_retried_after_losing_its_worker_is_running_once():
    progress, out = _progress()
    first, second = _trial("a"), _trial("b")
    progress.on_trial_start(0, [], first)
    progress.on_trial_start(0, [], second)
    progress.on_trial_recover(0, [], _trial("a", failures=1))
    progress.on_trial_start(0, [], first)  # Tune starts the same trial again
    assert progress.running == 2 and progress.retried == 1
    for trial, auroc in ((first, 0.9), (second, 0.8)):
        done = {"done": True, "status": "ok", "image_auroc": auroc, "label": trial.trial_id}
        progress.on_trial_result(0, [], trial, done)
        progress.on_trial_complete(0, [], trial)
    assert (progress.running, progress.ok, progress.retried) == (0, 2, 1)
    assert "lost its worker; running it again (failure 1" in out.getvalue()
    assert progress.best is not None and progress.best[0] == 0.9


def test_a_lost_trial_with_no_retry_left_stops_running_and_is_reported():
    progress, out = _progress()
    trial = _trial("a")
    progress.on_trial_start(0, [], trial)
    progress.on_trial_error(0, [], trial)
    assert progress.running == 0 and progress.ok == 0
    assert "lost its worker" in out.getvalue()
