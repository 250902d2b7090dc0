"""Inference timing and memory peaks, measured the same way for every detector.

``latency_ms`` is the median time of one image (batch 1) through ``predict`` after warm-up:
model forward plus anomaly map, no data loading, CUDA synchronised on GPU. ``throughput_fps``
is images per second at the evaluation batch size. Trials time under :func:`exclusive_timing`,
a node-wide lock, so that packed trials never time at the same moment.
"""

from __future__ import annotations

import fcntl
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import psutil
import torch


def synchronize(device: torch.device) -> None:
    """Wait for ``device`` to finish its queued work: CUDA calls return before it has, so a
    clock read without this times the launch, not the work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class LatencyResult:
    median_ms: float
    samples_ms: tuple[float, ...]

    @property
    def spread_ms(self) -> float:
        """Interquartile range: how steady the timing was."""
        if len(self.samples_ms) < 4:
            return 0.0
        q = statistics.quantiles(self.samples_ms, n=4)
        return q[2] - q[0]


def measure_latency(
    predict: Callable[[torch.Tensor], object],
    image: torch.Tensor,
    *,
    warmup: int = 3,
    repeats: int = 20,
) -> LatencyResult:
    """Median wall time of ``predict`` on one ``1 x 3 x H x W`` image, after ``warmup`` calls."""
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(
            f"latency is timed at batch size 1, got a batch of shape {tuple(image.shape)}"
        )
    device = image.device
    with torch.inference_mode():
        for _ in range(warmup):
            predict(image)
        synchronize(device)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            predict(image)
            synchronize(device)
            samples.append((time.perf_counter() - start) * 1000.0)
    return LatencyResult(statistics.median(samples), tuple(samples))


def measure_throughput(
    predict: Callable[[torch.Tensor], object], batch: torch.Tensor, *, repeats: int = 3
) -> float:
    """Images per second of ``predict`` at the batch size: best of ``repeats`` after a warm-up."""
    device = batch.device
    best = float("inf")
    with torch.inference_mode():
        predict(batch)
        synchronize(device)
        for _ in range(repeats):
            start = time.perf_counter()
            predict(batch)
            synchronize(device)
            best = min(best, time.perf_counter() - start)
    return batch.shape[0] / best


class PeakMemory:
    """Peak resident memory of this process (and GPU memory) while the block runs.

    ``ru_maxrss`` would carry peaks over from earlier trials of a reused worker, so the RSS
    is sampled by a background thread instead.
    """

    def __init__(self, interval_s: float = 0.05, device: torch.device | None = None):
        self.interval_s = interval_s
        self.device = device or torch.device("cpu")
        self.peak_rss_mb = 0.0
        self.peak_gpu_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process = psutil.Process()

    def _sample(self) -> None:
        rss = self._process.memory_info().rss / 2**20
        self.peak_rss_mb = max(self.peak_rss_mb, rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self._sample()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        if self.device.type == "cuda":
            self.peak_gpu_mb = torch.cuda.max_memory_allocated(self.device) / 2**20


class Stopwatch:
    """``with Stopwatch() as sw: ...; sw.seconds``"""

    seconds: float = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


# ----------------------------------------------------------------------------- the timing lock

TIMING_LOCK_ENV = "ANOMALY_SWEEP_TIMING_LOCK"
# How often a waiting trial retries the lock: short next to any timing it waits for.
_LOCK_POLL_S = 0.005


def timing_lock_path() -> Path:
    """The node-wide lock file (``$ANOMALY_SWEEP_TIMING_LOCK``, else one in the temp folder)."""
    configured = os.environ.get(TIMING_LOCK_ENV)
    return (
        Path(configured)
        if configured
        else Path(tempfile.gettempdir()) / "anomaly-sweep-timing.lock"
    )


@dataclass
class TimingSlot:
    """What :func:`exclusive_timing` got: whether no other trial on the node timed meanwhile."""

    exclusive: bool
    wait_s: float = 0.0
    started_at: datetime | None = None
    finished_at: datetime | None = None


@contextmanager
def exclusive_timing(
    *, enabled: bool = True, timeout_s: float = 600.0, path: str | Path | None = None
) -> Iterator[TimingSlot]:
    """Hold the node's timing lock while the block runs.

    Trials packed on one node (fractional GPUs, or several CPU trials) would otherwise time their
    latency while others time theirs on the same device, and each would measure the others' work.
    The lock is an exclusive ``flock`` on a file every trial process of the node opens: the
    kernel releases it when its holder exits or dies, so a crashed trial never leaves it held,
    and it works with or without Ray. A trial that waits longer than ``timeout_s`` times anyway
    and says so (``exclusive=False``). Trials that are training meanwhile still share the device;
    the lock keeps timings from overlapping each other.
    """
    slot = TimingSlot(exclusive=False)
    if not enabled:
        slot.started_at = datetime.now(timezone.utc)
        try:
            yield slot
        finally:
            slot.finished_at = datetime.now(timezone.utc)
        return
    lock_path = Path(path) if path is not None else timing_lock_path()
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        waited_from = time.monotonic()
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                slot.exclusive = True
                break
            except BlockingIOError:
                if time.monotonic() - waited_from >= timeout_s:
                    break
                time.sleep(_LOCK_POLL_S)
        slot.wait_s = time.monotonic() - waited_from
        slot.started_at = datetime.now(timezone.utc)
        try:
            yield slot
        finally:
            slot.finished_at = datetime.now(timezone.utc)
            if slot.exclusive:
                fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)
