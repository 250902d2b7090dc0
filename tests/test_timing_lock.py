"""The node-wide timing lock: packed trials never time at the same moment."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from sweep.run.timing import exclusive_timing

HOLD_S = 0.3


def _time_under_lock(lock: str, enabled: bool, intervals, ready) -> None:
    ready.wait()
    with exclusive_timing(enabled=enabled, timeout_s=30, path=lock) as slot:
        start = time.time()
        time.sleep(HOLD_S)
        intervals.append((start, time.time(), slot.exclusive))


def _concurrent_intervals(lock: Path, enabled: bool, workers: int = 3) -> list[tuple]:
    context = multiprocessing.get_context("fork")
    with context.Manager() as manager:
        intervals = manager.list()
        ready = context.Event()
        processes = [
            context.Process(target=_time_under_lock, args=(str(lock), enabled, intervals, ready))
            for _ in range(workers)
        ]
        for process in processes:
            process.start()
        ready.set()
        for process in processes:
            process.join(timeout=30)
            assert process.exitcode == 0
        return sorted(intervals)


def _overlaps(intervals: list[tuple]) -> int:
    return sum(1 for a, b in itertools.pairwise(intervals) if b[0] < a[1])


def test_concurrent_processes_never_time_at_once(tmp_path):
    intervals = _concurrent_intervals(tmp_path / "timing.lock", enabled=True)
    assert len(intervals) == 3
    assert all(exclusive for *_, exclusive in intervals)
    assert _overlaps(intervals) == 0


def test_without_the_lock_the_same_processes_overlap(tmp_path):
    # The control: the workers above do start together, so the lock is what separates them.
    intervals = _concurrent_intervals(tmp_path / "timing.lock", enabled=False)
    assert not any(exclusive for *_, exclusive in intervals)
    assert _overlaps(intervals) >= 1


def _hold_forever(lock: str, held) -> None:
    with exclusive_timing(path=lock):
        held.set()
        time.sleep(60)


def test_a_killed_holder_releases_the_lock(tmp_path):
    lock = str(tmp_path / "timing.lock")
    context = multiprocessing.get_context("fork")
    held = context.Event()
    holder = context.Process(target=_hold_forever, args=(lock, held))
    holder.start()
    assert held.wait(10)
    with exclusive_timing(path=lock, timeout_s=0.2) as slot:
        assert not slot.exclusive, "the lock must be held while its holder lives"
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    with exclusive_timing(path=lock, timeout_s=5) as slot:
        assert slot.exclusive
        assert slot.wait_s < 5


def test_a_timeout_times_anyway_and_says_so(tmp_path):
    lock = tmp_path / "timing.lock"
    with exclusive_timing(path=lock) as outer:
        assert outer.exclusive
        started = time.monotonic()
        with exclusive_timing(path=lock, timeout_s=0.1) as inner:
            assert not inner.exclusive
        assert 0.1 <= time.monotonic() - started < 2
    assert outer.started_at is not None and outer.finished_at >= outer.started_at


def test_the_lock_file_comes_from_the_environment(tmp_path, monkeypatch):
    from sweep.run.timing import TIMING_LOCK_ENV, timing_lock_path

    monkeypatch.setenv(TIMING_LOCK_ENV, str(tmp_path / "node.lock"))
    assert timing_lock_path() == tmp_path / "node.lock"
    with exclusive_timing() as slot:
        assert slot.exclusive
    assert (tmp_path / "node.lock").exists()


@pytest.mark.parametrize("enabled", [True, False])
def test_the_slot_records_when_timing_ran(tmp_path, enabled):
    with exclusive_timing(enabled=enabled, path=tmp_path / "timing.lock") as slot:
        time.sleep(0.01)
    assert slot.exclusive is enabled
    assert (slot.finished_at - slot.started_at).total_seconds() >= 0.01
