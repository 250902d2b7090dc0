"""Inference timing and memory peaks, measured the same way for every detector.

``latency_ms`` is the median time of one image (batch 1) through ``predict`` after warm-up:
model forward plus anomaly map, no data loading, CUDA synchronised on GPU. ``throughput_fps``
is images per second at the evaluation batch size.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import torch


def _sync(device: torch.device) -> None:
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
        _sync(device)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            predict(image)
            _sync(device)
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
        _sync(device)
        for _ in range(repeats):
            start = time.perf_counter()
            predict(batch)
            _sync(device)
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
