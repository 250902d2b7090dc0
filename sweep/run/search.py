"""Optuna's side of a study run: its storage (a journal under the output, an RDB or memory),
the repair of what a killed driver leaves in a journal, the trials such a driver left running,
and Ray Tune's searcher over the study's define-by-run space."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend
from ray.tune.search.optuna import OptunaSearch

from sweep.errors import SweepError
from sweep.results import ResultStore
from sweep.run.study import Study, config_hash

OPTUNA_JOURNAL = "_optuna/journal.log"
"""Where a study's Optuna journal lives under its output (``search.storage: journal``)."""


def optuna_storage(study: Study, store: ResultStore):
    """The Optuna storage of a study: its journal file under the output, an RDB, or None."""
    kind = study.search.storage_kind
    if kind == "memory":
        return None
    if kind == "url":
        try:
            return optuna.storages.RDBStorage(study.search.storage)
        except Exception as exc:  # sqlalchemy's errors vary by driver
            raise SweepError(
                f"search.storage: cannot open {study.search.storage!r}: {exc}"
            ) from None
    check_optuna_storage(study, store)
    path = Path(store.root) / OPTUNA_JOURNAL
    path.parent.mkdir(parents=True, exist_ok=True)
    _repair_journal(path)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def check_optuna_storage(study: Study, store: ResultStore) -> None:
    """An Optuna journal is a file that the driver appends to under a POSIX file lock: it can
    live under a local (or NFS) output, not in an object store, which has neither appends nor
    locks. Checked before anything runs."""
    if study.search.algorithm != "optuna" or study.search.storage_kind != "journal":
        return
    if not store.local:
        raise SweepError(
            f"search.storage: the Optuna journal needs a local output, not {store.uri}; give "
            "search.storage an RDB URL (sqlite:///optuna.db, postgresql://...) or 'memory'"
        )


def _repair_journal(path: Path) -> None:
    """Undo what a driver killed in the middle of a journal write can leave: a last record
    without its line end (Optuna would glue the next record to it and could not read the
    journal again) and the journal's lock file (Optuna waits for a stale one to age). Called
    while this run holds the output's lock, so no other writer exists."""
    lock = path.with_name(path.name + ".lock")
    if lock.is_symlink() or lock.exists():
        lock.unlink()
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as handle:
        data = handle.read()
        if data.endswith(b"\n"):
            return
        # Every complete record ends with a line end; what follows the last one was never
        # acknowledged to anybody.
        handle.truncate(data.rfind(b"\n") + 1)


def settle_stale_optuna_trials(study: Study, storage, store: ResultStore) -> tuple[int, int]:
    """Close the Optuna trials that an earlier, killed or interrupted driver left RUNNING.

    A trial whose row was written completes with the row's objective values (a finished trial
    is not run twice); the others fail, and the search runs new ones in their place. Only for
    the journal under the output, which this run's output lock makes its own: an RDB may be
    shared with drivers that are alive. Returns (completed, failed).
    """
    if storage is None or study.search.storage_kind != "journal":
        return 0, 0
    try:
        existing = optuna.load_study(study_name=study.name, storage=storage)
    except KeyError:
        return 0, 0
    completed = failed = 0
    stale = existing.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for frozen in stale:
        values = None
        try:
            trial = study.search_space.resolve_sampled(frozen.params)
            row = store.read_row(config_hash(study, trial))
        except (KeyError, ValueError, TypeError):  # params of another space: nothing to match
            row = None
        if row is not None:
            raw = [row.get(o.metric) for o in study.objectives]
            if all(v is not None and math.isfinite(float(v)) for v in raw):
                values = [float(v) for v in raw]
        state = optuna.trial.TrialState.COMPLETE if values else optuna.trial.TrialState.FAIL
        storage.set_trial_state_values(frozen._trial_id, state=state, values=values)
        completed, failed = (completed + 1, failed) if values else (completed, failed + 1)
    return completed, failed


def finished_optuna_trials(study: Study, storage) -> int:
    """Trials of the study's Optuna study that completed in an earlier run (0 without one)."""
    if storage is None:
        return 0
    try:
        existing = optuna.load_study(study_name=study.name, storage=storage)
    except KeyError:  # no such study yet
        return 0
    return len(existing.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


class _NSGAIISampler(optuna.samplers.NSGAIISampler):
    """NSGA-II that Ray Tune can checkpoint with its searcher.

    Optuna 5.1 gave the genetic samplers a thread lock, which does not pickle; the lock is
    dropped from the pickled state and made anew on load.
    """

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_thread_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


def optuna_searcher(study: Study, storage=None, finished: int = 0):
    """Ray Tune's Optuna searcher of a study: its sampler, seeded past the ``finished`` trials,
    its objectives, the space's define-by-run suggestions and the ``storage``."""
    samplers = {
        "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed),
        "nsga2": lambda seed: _NSGAIISampler(seed=seed),
        "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
    }
    # A resumed study re-seeds its sampler past the trials it has: with the same seed, the
    # random start-up draws would repeat the first run's configurations.
    # Modulo 2**32: Optuna's samplers take no seed past it (search.seed itself is below it).
    sampler = samplers[study.search.sampler or "tpe"]((study.search.seed + finished) % 2**32)
    metrics = [o.metric for o in study.objectives]
    modes = [o.direction for o in study.objectives]
    shared = {"space": study.search_space.suggest, "sampler": sampler, "storage": storage}
    if storage is not None:
        shared["study_name"] = study.name
    if len(metrics) == 1:
        return OptunaSearch(metric=metrics[0], mode=modes[0], **shared)
    return OptunaSearch(metric=metrics, mode=modes, **shared)
