"""Check the resource and time estimates of the detectors against real training on the CPU.

For each detector, two fresh processes (no allocator state or caches carried over), each
building it with ``pretrained=False`` and training on one batch of random images:

- memory: ``fit`` one epoch while a thread samples the resident size; the memory ``fit`` adds
  to the built detector is compared with the estimate of the same thing (``default_resources``
  for that one batch, less the CUDA overhead, the allocator slack and the weights already
  built). Glibc returns large blocks at once (``MALLOC_MMAP_THRESHOLD_``), so the resident size
  follows the tensors alive;
- time: ``fit`` several epochs and take the steady-state seconds per epoch (one-pass detectors:
  the second of two fits), next to the work ``fit_work`` counts for one epoch (FLOPs, memory
  traffic, optimiser steps). ``--fit`` fits the CPU speed constants of ``sweep.run.plan`` to it.

    python bench/resources.py [--size 128] [--batch 8] [--threads 1] [--models a,b] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

EXTRA_HPARAMS = {"efficient_ad_ast": {"teacher_epochs": 1}}
"""Settings that keep one-batch fits short (EfficientAD-AST's 240 teacher epochs)."""
EPOCHS = {"dsr": 6}
"""Epochs of the timing run (one batch each; 3 unless given). DSR's first epochs train only its
VQ-VAE: with six every phase runs, in the memory run too, and the mean over epochs 2-6 is
taken."""

CHILD = r"""
import json, sys, threading, time
import psutil, torch
import models
from sweep.run.resources import ALLOCATOR_SLACK, DEVICE_OVERHEAD_GB, detector_request

mode, name, size, batch, threads, epochs, extra = sys.argv[1:8]
size, batch, threads, epochs = int(size), int(batch), int(threads), int(epochs)
torch.set_num_threads(threads)
cls = models.get_class(name)
kwargs = {"pretrained": False} if "pretrained" in models.hyperparameters(name) else {}
kwargs.update(json.loads(extra))
detector = models.create(name, **kwargs)
images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
result = {"model": name}
if mode == "memory":
    request = detector_request(cls, None, kwargs, size, batch_size=batch, n_train=batch)
    profile = cls.cost_profile(None, kwargs, size, batch_size=batch)
    weights = 4 * (profile.trainable_params + profile.frozen_params) / 2**30
    device = (request.gpu_memory_gb - DEVICE_OVERHEAD_GB) / ALLOCATOR_SLACK
    result["estimated_gb"] = device - weights
    process = psutil.Process()
    base = peak = process.memory_info().rss
    stop = threading.Event()

    def sample():
        global peak
        while not stop.wait(0.002):
            peak = max(peak, process.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    detector.fit([images], epochs=epochs if name in ("dsr",) else 1)
    stop.set()
    thread.join()
    result["measured_gb"] = (max(peak, process.memory_info().rss) - base) / 2**30
else:
    if cls.learning_type == "one_pass":
        detector.fit([images])
        started = time.perf_counter()
        detector.fit([images])
        result["epoch_s"] = time.perf_counter() - started
    else:
        stamps = []
        def on_epoch_end(epoch, metrics):
            stamps.append(time.perf_counter())
            return False
        started = time.perf_counter()
        detector.fit([images], epochs=epochs, on_epoch_end=on_epoch_end)
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        result["epoch_s"] = sum(gaps) / len(gaps)
    work = cls.fit_work(None, kwargs, size, n_train=batch, epochs=1, batch_size=batch)
    result.update(gflop=work.flops / 1e9, traffic_gb=work.traffic_bytes / 1e9, steps=work.steps)
print(json.dumps(result))
"""


def run_child(mode: str, name: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if mode == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    epochs = EPOCHS.get(name, 3)
    extra = json.dumps(EXTRA_HPARAMS.get(name, {}))
    command = [sys.executable, "-c", CHILD, mode, name, str(args.size), str(args.batch)]
    command += [str(args.threads), str(epochs), extra]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def fit_constants(rows: list[dict]) -> tuple[float, float, float]:
    """(s per GFLOP, s per GB, s per step) minimising relative errors, non-negative."""
    import numpy as np
    from scipy.optimize import nnls

    x = np.array([[r["gflop"], r["traffic_gb"], r["steps"]] for r in rows])
    y = np.array([r["epoch_s"] for r in rows])
    coefficients, _ = nnls(x / y[:, None], np.ones_like(y))
    return tuple(float(c) for c in coefficients)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="")
    parser.add_argument("--json", default="")
    parser.add_argument("--fit", action="store_true", help="fit the CPU speed constants")
    args = parser.parse_args()
    import models
    from models.costs import Work
    from sweep.run.plan import DeviceSpeed

    names = args.models.split(",") if args.models else models.list_models()
    speed = DeviceSpeed.cpu(args.threads)
    rows = []
    print(
        f"{'detector':22s} {'measured GB':>11s} {'estimated':>9s} {'ratio':>5s}   "
        f"{'epoch s':>8s} {'GFLOP':>8s} {'GB moved':>8s} {'steps':>5s} {'model s':>8s} "
        f"{'ratio':>5s}"
    )
    for name in names:
        started = time.perf_counter()
        try:
            row = {**run_child("memory", name, args), **run_child("time", name, args)}
        except RuntimeError as error:
            print(f"{name:22s} failed: {error}")
            continue
        work = Work(row["gflop"] * 1e9, row["traffic_gb"] * 1e9, row["steps"])
        row["model_s"] = speed.seconds(work)
        rows.append(row)
        print(
            f"{name:22s} {row['measured_gb']:11.3f} {row['estimated_gb']:9.3f} "
            f"{row['estimated_gb'] / max(row['measured_gb'], 1e-3):5.2f}   "
            f"{row['epoch_s']:8.3f} {row['gflop']:8.1f} {row['traffic_gb']:8.2f} {row['steps']:5d} "
            f"{row['model_s']:8.3f} {row['model_s'] / row['epoch_s']:5.2f}"
            f"   ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    if args.fit and rows:
        per_gflop, per_gb, per_step = fit_constants(rows)
        print(
            f"fit: {1 / per_gflop if per_gflop else float('inf'):.1f} GFLOP/s, "
            f"{1 / per_gb if per_gb else float('inf'):.2f} GB/s, {per_step * 1e3:.1f} ms/step "
            f"per {args.threads} thread(s)"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"size": args.size, "batch": args.batch, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
