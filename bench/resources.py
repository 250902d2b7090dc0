"""Check the resource estimates of ``Detector.default_resources`` against real training steps.

For each detector (a fresh process each, so no allocator state carries over): build it
(``pretrained=False``), then ``fit`` one epoch of one batch of random images on the CPU while a
thread samples the process's resident memory. The memory ``fit`` adds on top of the built
detector is compared with the estimate of the same thing (gradients and Adam moments of the
trained weights, activations autograd keeps, the largest single operation; the estimate's CUDA
overhead and allocator slack left out), and the seconds of the step with the estimated FLOPs
and bytes moved (the CPU throughput constants of ``sweep.plan`` are fitted to this).

    python bench/resources.py [--size 128] [--batch 8] [--threads 1] [--models a,b] [--json OUT]

Glibc is told to return large blocks to the system at once (``MALLOC_MMAP_THRESHOLD_``), so the
resident size follows the tensors alive.
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
EPOCHS = {"dsr": 5}
"""Epochs of one batch each: DSR's first epochs train only its VQ-VAE; with five, every phase
runs (the time is per epoch)."""

CHILD = r"""
import json, sys, threading, time
import psutil, torch
import models
from models.base import ALLOCATOR_SLACK  # noqa: F401

name, size, batch, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
epochs = int(sys.argv[5])
extra = json.loads(sys.argv[6])
torch.set_num_threads(threads)
cls = models.get_class(name)
known = models.hyperparameters(name)
kwargs = {"pretrained": False} if "pretrained" in known else {}
kwargs.update(extra)
profile = cls.cost_profile(None, kwargs, size, batch_size=batch)
detector = models.create(name, **kwargs)
images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
process = psutil.Process()
base = peak = process.memory_info().rss
stop = threading.Event()

def sample():
    global peak
    while not stop.wait(0.002):
        peak = max(peak, process.memory_info().rss)

thread = threading.Thread(target=sample, daemon=True)
thread.start()
started = time.perf_counter()
detector.fit([images], epochs=epochs)
seconds = (time.perf_counter() - started) / epochs
stop.set()
thread.join()
peak = max(peak, process.memory_info().rss)
estimate = 12 * profile.trainable_params + profile.saved_bytes + profile.working_bytes
print(json.dumps({
    "model": name,
    "measured_gb": (peak - base) / 2**30,
    "estimated_gb": estimate / 2**30,
    "fit_s": seconds,
    "train_gflop": batch * profile.train_flops / 1e9,
    "forward_gflop": batch * profile.forward_flops / 1e9,
    "train_gb_traffic": batch * profile.train_traffic / 2**30,
    "learning_type": cls.learning_type,
}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    import models

    names = args.models.split(",") if args.models else models.list_models()
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
    rows = []
    print(
        f"{'detector':22s} {'measured GB':>11s} {'estimated GB':>12s} {'ratio':>6s} "
        f"{'fit s':>7s} {'GFLOP':>8s} {'GFLOP/s':>8s}"
    )
    for name in names:
        started = time.perf_counter()
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                CHILD,
                name,
                str(args.size),
                str(args.batch),
                str(args.threads),
                str(EPOCHS.get(name, 1)),
                json.dumps(EXTRA_HPARAMS.get(name, {})),
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        if done.returncode != 0:
            print(f"{name:22s} failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        ratio = row["estimated_gb"] / max(row["measured_gb"], 1e-6)
        rate = row["train_gflop"] / row["fit_s"]
        print(
            f"{name:22s} {row['measured_gb']:11.3f} {row['estimated_gb']:12.3f} {ratio:6.2f} "
            f"{row['fit_s']:7.2f} {row['train_gflop']:8.1f} {rate:8.1f}"
            f"   ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"size": args.size, "batch": args.batch, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
