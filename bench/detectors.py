"""Benchmark: fit time, batch-1 latency and backbone share of every detector on CPU.

Each detector is built with ``pretrained=False`` and ``resnet18`` wherever it takes a backbone
(plus the overrides of :data:`BENCH_OVERRIDES`; everything else is the paper default), fitted on
50 generated synthetic glue-line images at 128 x 128 and timed:

* ``fit_s``: the whole fit for one-pass detectors; ``fit_s_per_epoch``: one epoch (``fit(...,
  epochs=1)``) for iterative ones, whose real budget is the study's max epochs times that;
* ``latency_ms``: median wall time of ``predict`` on one image after warm-up
  (``sweep.run.timing.measure_latency``, as the sweep measures it);
* ``backbone_ms``: the same for the detector's own frozen feature extractor alone (its first
  ``FeatureExtractor``, with the layers it reads), and ``ratio`` = latency / backbone: what the
  method adds on top of the features. Detectors without a timm backbone (EfficientAD's PDN) have
  none.

    python bench/detectors.py [--models patchcore,padim] [--images 50] [--size 128]
                              [--threads 2] [--batch-size 8] [--runs 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console
from rich.table import Table

import models
from data.synthetic_glue import render_normal
from data.transforms import normalize, resize_image, to_rgb
from models.backbones import FeatureExtractor
from sweep.run.timing import measure_latency

BENCH_OVERRIDES: dict[str, dict[str, Any]] = {
    # CS-Flow reads EfficientNet stages only: the smallest one, at the paper's stage.
    "csflow": {"backbone": "efficientnet_b0"},
    # EfficientAD-AST trains its flow teacher before the student; one teacher epoch keeps "one
    # epoch" meaning one pass of each network.
    "efficient_ad_ast": {"teacher_epochs": 1},
}
"""Per-detector hyperparameters on top of ``pretrained=False`` and ``backbone="resnet18"``
(where the detector has them): what keeps a detector CPU-feasible or its single epoch
comparable. An override's ``backbone`` replaces resnet18."""


def bench_hparams(name: str) -> dict[str, Any]:
    """The hyperparameters detector ``name`` is benchmarked with."""
    known = models.hyperparameters(name)
    hparams: dict[str, Any] = {}
    if "pretrained" in known:
        hparams["pretrained"] = False
    if "backbone" in known:
        hparams["backbone"] = "resnet18"
    return {**hparams, **BENCH_OVERRIDES.get(name, {})}


def glue_images(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` normalised ``3 x size x size`` defect-free synthetic glue-line images (part1).

    Rendered at 240 x 320 and resized (area averaging) to a square, as the data loaders do.
    """
    rng = np.random.default_rng(seed)
    pixels = [
        resize_image(to_rgb(render_normal("part1", rng, height=240, width=320)), size)
        for _ in range(n)
    ]
    return normalize(torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous())


def _extractor(detector: models.Detector) -> FeatureExtractor | None:
    # The first feature extractor registered is the frozen backbone (the teacher where a
    # student copy follows it).
    for module in detector.modules():
        if isinstance(module, FeatureExtractor):
            return module
    return None


def bench_one(
    name: str, images: torch.Tensor, batch_size: int, warmup: int, repeats: int
) -> dict[str, Any]:
    """Build, fit and time detector ``name``; a failure becomes the row's ``error``."""
    hparams = bench_hparams(name)
    cls = models.get_class(name)
    row: dict[str, Any] = {
        "model": name,
        "learning_type": cls.learning_type,
        "hparams": {k: v for k, v in hparams.items() if k != "pretrained"},
    }
    if "backbone" in hparams:
        problem = models.backbone_problem(name, hparams["backbone"], hparams, images.shape[-1])
        if problem is not None:
            row["error"] = f"backbone {hparams['backbone']!r}: {problem}"
            return row
    try:
        started = time.perf_counter()
        detector = models.create(name, **hparams)
        row["build_s"] = time.perf_counter() - started
        trainable, frozen = detector.param_counts()
        row["params_trainable"], row["params_frozen"] = trainable, frozen
        batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        iterative = cls.learning_type == "iterative"
        started = time.perf_counter()
        stats = detector.fit(batches, epochs=1 if iterative else None)
        row["fit_s_per_epoch" if iterative else "fit_s"] = time.perf_counter() - started
        if stats.get("notes"):
            row["notes"] = list(stats["notes"])
        detector.eval()
        image = images[:1]
        latency = measure_latency(detector.predict, image, warmup=warmup, repeats=repeats)
        row["latency_ms"] = latency.median_ms
        row["latency_iqr_ms"] = latency.spread_ms
        extractor = _extractor(detector)
        if extractor is not None:
            # CS-Flow runs its truncated EfficientNet itself (one scale timed here).
            forward = getattr(detector, "backbone_features", extractor)
            backbone = measure_latency(forward, image, warmup=warmup, repeats=repeats)
            row["backbone"] = extractor.spec.name
            row["backbone_layers"] = list(extractor.layers)
            row["backbone_ms"] = backbone.median_ms
            row["ratio"] = latency.median_ms / backbone.median_ms
    except Exception as error:  # one broken detector must not end the benchmark
        row["error"] = f"{type(error).__name__}: {error}"
    return row


TIMED = ("build_s", "fit_s", "fit_s_per_epoch", "latency_ms", "latency_iqr_ms", "backbone_ms")


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from repeated runs: each timing is the median over runs; ``ratio`` is the
    median of the per-run ratios (latency and backbone timed back to back in one run)."""
    failed = [run for run in runs if "error" in run]
    if failed:
        return failed[0]
    row = dict(runs[0])
    for key in (*TIMED, "ratio"):
        values = [run[key] for run in runs if run.get(key) is not None]
        if values:
            row[key] = float(np.median(values))
    row["runs"] = len(runs)
    return row


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(rows: list[dict[str, Any]], console: Console, title: str) -> None:
    table = Table(title=title)
    table.add_column("model")
    table.add_column("backbone")
    table.add_column("fit s", justify="right")
    table.add_column("latency ms", justify="right")
    table.add_column("backbone ms", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("trainable / frozen M", justify="right")
    for row in rows:
        if "error" in row:
            backbone = row["hparams"].get("backbone", "-")
            table.add_row(row["model"], backbone, "failed", "", "", "", "", style="red")
            continue
        fit = f"{row['fit_s']:.2f}" if "fit_s" in row else f"{row['fit_s_per_epoch']:.2f} /epoch"
        params = f"{row['params_trainable'] / 1e6:.2f} / {row['params_frozen'] / 1e6:.2f}"
        table.add_row(
            row["model"],
            row.get("backbone", "-"),
            fit,
            _fmt(row["latency_ms"]),
            _fmt(row.get("backbone_ms")),
            _fmt(row.get("ratio"), 2),
            params,
        )
    console.print(table)
    for row in rows:
        if "error" in row:
            console.print(f"[red]{row['model']}: {row['error']}[/red]")
        for note in row.get("notes", []):
            prefix = "" if note.startswith(f"{row['model']}:") else f"{row['model']}: "
            console.print(f"{prefix}{note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated detector names (default: all)")
    parser.add_argument("--images", type=int, default=50, help="training images")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--batch-size", type=int, default=8, help="training batch size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed predict calls")
    parser.add_argument("--repeats", type=int, default=20, help="timed predict calls")
    parser.add_argument(
        "--runs", type=int, default=3, help="build-fit-time runs per detector (medians reported)"
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    names = models.list_models() if args.models is None else args.models.split(",")
    unknown = [n for n in names if n not in models.list_models()]
    if unknown:
        parser.error(f"unknown models {unknown} (known: {', '.join(models.list_models())})")
    torch.set_num_threads(args.threads)
    # Wide enough for the table when the output goes to a file.
    console = Console(width=None if sys.stdout.isatty() else 200)
    images = glue_images(args.images, args.size, seed=0)
    rows = []
    for name in names:
        console.print(f"{name} ...", end=" ")
        started = time.perf_counter()
        runs = [
            bench_one(name, images, args.batch_size, args.warmup, args.repeats)
            for _ in range(args.runs)
        ]
        rows.append(median_row(runs))
        console.print(f"{time.perf_counter() - started:.1f} s")
        gc.collect()
    title = (
        f"{args.images} synthetic glue images {args.size}x{args.size}, CPU, "
        f"{args.threads} threads, batch {args.batch_size}; iterative fits: one epoch; "
        f"medians of {args.runs} runs"
    )
    print_table(rows, console, title)
    if args.json is not None:
        config = {
            "images": args.images,
            "size": args.size,
            "threads": args.threads,
            "batch_size": args.batch_size,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "runs": args.runs,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        }
        args.json.write_text(json.dumps({"config": config, "results": rows}, indent=2) + "\n")
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
