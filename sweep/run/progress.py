"""The live terminal view of a sweep: trials done / running / failed and the best so far."""

from __future__ import annotations

import math
from typing import Any

from ray.tune import Callback
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sweep.results import Objective
from sweep.run.space import TrialConfig


class SweepProgress(Callback):
    """A Ray Tune callback (runs on the driver) that drives a rich progress bar.

    Each finished trial also gets one printed line, so logs of non-interactive runs (CI, a
    cluster job) show progress too.
    """

    def __init__(self, total: int, objectives: list[Objective], console: Console | None = None):
        self.total = total
        self.objectives = objectives
        self.console = console or Console(stderr=True)
        self.ok = 0
        self.errors = 0
        self.skipped = 0
        self.stopped = 0
        self.running = 0
        self.retried = 0
        self.error_messages: list[str] = []
        self.best: tuple[float, str] | None = None
        self._finished: set[str] = set()
        self._progress: Progress | None = None
        self._task: Any = None

    # rich objects hold locks and threads; Tune may pickle its callbacks with the experiment.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_progress=None, _task=None, console=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.console = Console(stderr=True)

    def __enter__(self) -> SweepProgress:
        self._progress = Progress(
            TextColumn("[bold]trials"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self._task = self._progress.add_task("sweep", total=self.total, status=self._status())
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._refresh()
            self._progress.stop()

    def _status(self) -> str:
        parts = [f"running {self.running}", f"ok {self.ok}"]
        parts.append(f"[red]failed {self.errors}[/red]" if self.errors else "failed 0")
        if self.stopped:
            parts.append(f"stopped early {self.stopped}")
        if self.skipped:
            parts.append(f"skipped {self.skipped}")
        if self.retried:
            parts.append(f"retried {self.retried}")
        if self.best is not None:
            metric = self.objectives[0].metric
            parts.append(f"best {metric} {self.best[0]:.4g} ({self.best[1]})")
        return " | ".join(parts)

    def _refresh(self) -> None:
        if self._progress is not None:
            done = self.ok + self.errors + self.skipped + self.stopped
            self._progress.update(self._task, completed=done, status=self._status())

    def _print(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message)
        else:
            self.console.print(message)

    # ---- Tune callback hooks
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running += 1
        self._refresh()

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        if not result.get("done") or trial.trial_id in self._finished:
            return
        self._finished.add(trial.trial_id)
        label = result.get("label", trial.trial_id)
        if "status" not in result:
            # A per-epoch result marked done by Tune: the scheduler stopped the trial there.
            self.stopped += 1
            self._print(
                f"[yellow]⏹ {trial_label(trial)} stopped early after epoch "
                f"{result.get('epoch', '?')}[/yellow]"
            )
        elif result.get("skipped"):
            self.skipped += 1
            self._print(f"[dim]= {label}: already in the output[/dim]")
        elif result.get("status") == "ok":
            self.ok += 1
            self._update_best(result, label)
            values = ", ".join(
                f"{o.metric}={result.get(o.metric, math.nan):.4g}" for o in self.objectives
            )
            self._print(f"[green]✓[/green] {label}: {values}")
        else:
            self.errors += 1
            message = f"{label}: {result.get('error')}"
            self.error_messages.append(message)
            self._print(f"[red]✗ {message}[/red]")
        self._refresh()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running = max(0, self.running - 1)
        self._refresh()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running = max(0, self.running - 1)
        self._print(
            f"[red]! trial {trial.trial_id} lost its worker: {trial.error_file or ''}[/red]"
        )
        self._refresh()

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # Tune starts the trial again (on_trial_start), so it stops counting as running here.
        self.running = max(0, self.running - 1)
        self.retried += 1
        self._print(
            f"[yellow]↻ {trial_label(trial)} lost its worker; running it again "
            f"(failure {getattr(trial, 'num_failures', '?')} of its failure.max_failures)[/yellow]"
        )
        self._refresh()

    def _update_best(self, result: dict, label: str) -> None:
        objective = self.objectives[0]
        value = result.get(objective.metric)
        if value is None or not math.isfinite(value):
            return
        better = self.best is None or (
            value > self.best[0] if objective.direction == "max" else value < self.best[0]
        )
        if better:
            self.best = (float(value), label)


def trial_label(trial: Any) -> str:
    """A readable name for a Tune trial of a grid/random study, else its id."""
    raw = getattr(trial, "config", {}).get("trial")
    return TrialConfig.from_dict(raw).label() if isinstance(raw, dict) else str(trial.trial_id)
