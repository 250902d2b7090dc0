"""What packing does to latency, and what the node-wide timing lock gives back.

Several trials packed on one node time their latency at the same moment unless something keeps
them apart; each then measures the others' work too. This times one fitted PaDiM (resnet18,
random init, 128 px, one torch thread per process) at batch 1 the way every trial does
(``sweep.run.timing.measure_latency``), in three settings within one run:

- alone: one process times, nothing else runs;
- packed, no lock: ``--workers`` processes time at the same moment (a start barrier);
- packed, with the lock: the same processes under ``exclusive_timing``.

It prints the median latency of each setting and its ratio to alone, and the time the locked
workers waited. Medians over ``--rounds`` rounds.

    python bench/timing_lock.py [--workers 2] [--threads 1] [--rounds 5] [--repeats 40]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _detector(threads: int):
    import torch

    import models

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(16, 3, 128, 128, generator=generator)
    detector = models.create("padim", backbone="resnet18", pretrained=False)
    detector.fit([train])
    return detector, torch.randn(1, 3, 128, 128, generator=generator)


def _time(lock: str | None, repeats: int, threads: int, barrier, results) -> None:
    from sweep.run.timing import exclusive_timing, measure_latency

    detector, image = _detector(threads)
    barrier.wait()
    with exclusive_timing(enabled=lock is not None, path=lock) as slot:
        latency = measure_latency(detector.predict, image, warmup=3, repeats=repeats)
    results.append((latency.median_ms, slot.wait_s))


def _round(workers: int, lock: str | None, repeats: int, threads: int) -> list[tuple[float, float]]:
    context = multiprocessing.get_context("fork")
    with context.Manager() as manager:
        results = manager.list()
        barrier = context.Barrier(workers)
        processes = [
            context.Process(target=_time, args=(lock, repeats, threads, barrier, results))
            for _ in range(workers)
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join()
        return list(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="trials packed on the node")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=40, help="timed calls per trial")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per trial")
    args = parser.parse_args()
    lock = str(Path(tempfile.mkdtemp()) / "timing.lock")

    alone, unlocked, locked, waits = [], [], [], []
    started = time.perf_counter()
    for _ in range(args.rounds):
        # Interleaved, so that a change in the machine's load hits every setting alike.
        alone += [m for m, _ in _round(1, None, args.repeats, args.threads)]
        unlocked += [m for m, _ in _round(args.workers, None, args.repeats, args.threads)]
        packed = _round(args.workers, lock, args.repeats, args.threads)
        locked += [m for m, _ in packed]
        waits += [w for _, w in packed]
    base = statistics.median(alone)
    print(
        f"PaDiM resnet18 128 px, batch 1, {args.threads} torch thread(s) per process, "
        f"{args.workers} packed workers on {os.cpu_count()} CPUs,"
    )
    elapsed = time.perf_counter() - started
    print(f"{args.rounds} rounds x {args.repeats} timed calls ({elapsed:.0f} s)")
    print(f"{'setting':<22}{'median latency':>16}{'vs alone':>10}")
    for name, values in (
        ("alone", alone),
        ("packed, no lock", unlocked),
        ("packed, with lock", locked),
    ):
        median = statistics.median(values)
        print(f"{name:<22}{median:>13.2f} ms{median / base:>9.2f}x")
    print(f"lock wait per trial: median {statistics.median(waits):.2f} s, max {max(waits):.2f} s")


if __name__ == "__main__":
    main()
