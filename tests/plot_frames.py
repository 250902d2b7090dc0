"""Hand-built result frames shaped like ``sweep.results.read_results`` returns them.

Shared by the plot tests and handy for looking at the plots by eye:
``python -c "from tests.plot_frames import demo; demo('/tmp/plots')"``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

MODELS = (
    # model, backbone, image AUROC, latency ms
    ("patchcore", "resnet18", 0.95, 30.0),
    ("padim", "resnet18", 0.90, 8.0),
    ("padim", "wide_resnet50_2", 0.93, 25.0),
    ("stfpm", "resnet18", 0.97, 12.0),
    ("dfkde", "resnet18", 0.70, 6.0),
    ("efficient_ad", None, 0.96, 4.0),
)


def result_frame(
    *,
    pixel: bool = True,
    variants: bool = False,
    sizes: bool = False,
    coreset: bool = False,
    seeds: int = 2,
    failures: bool = True,
    timing: bool = True,
) -> pd.DataFrame:
    """Rows of a made-up study: six detector/backbone configurations at 64 px, ``seeds`` seeds.

    ``pixel`` gives pixel metrics; ``variants`` adds an augmentation set and a stress per
    configuration; ``sizes`` runs PaDiM/resnet18 at 64, 128 and 256 px; ``coreset`` runs
    PatchCore at coreset ratios 0.001 to 1; ``failures`` adds an error and a stopped row;
    ``timing`` gives ``latency_ms`` and ``throughput_fps`` (NaN without).
    """
    rng = np.random.default_rng(0)
    configs = []
    for model, backbone, auroc, latency in MODELS:
        configs.append(
            {"model": model, "backbone": backbone, "image_size": 64, "auroc": auroc,
             "latency": latency, "ratio": 0.1 if model == "patchcore" else None}
        )  # fmt: skip
    if sizes:
        for size in (128, 256):
            configs.append(
                {"model": "padim", "backbone": "resnet18", "image_size": size,
                 "auroc": 0.90 + size / 5000, "latency": 8.0 * (size / 64) ** 2, "ratio": None}
            )  # fmt: skip
    if coreset:
        for ratio in (0.001, 0.01, 0.5, 1.0):
            configs.append(
                {"model": "patchcore", "backbone": "resnet18", "image_size": 64,
                 "auroc": 0.95 + 0.03 * np.log10(ratio) / 3, "latency": 30.0 * (0.5 + ratio),
                 "ratio": ratio}
            )  # fmt: skip
    variant_pairs = [("none", "none")]
    if variants:
        variant_pairs += [("table3_all", "none"), ("none", "rotation")]
    rows = []
    for config in configs:
        for augmentation, stress in variant_pairs:
            drop = 0.0 if (augmentation, stress) == ("none", "none") else rng.uniform(0.0, 0.1)
            for seed in range(seeds):
                image_auroc = config["auroc"] - drop + rng.normal(0, 0.01)
                row = {
                    "status": "ok",
                    "model": config["model"],
                    "backbone": config["backbone"],
                    "seed": seed,
                    "image_size": config["image_size"],
                    "epochs": None,
                    "dataset": "synthetic_glue",
                    "category": "part1",
                    "augmentation": augmentation,
                    "stress": stress,
                    "image_auroc": image_auroc,
                    "image_f1": image_auroc - 0.05,
                    "pixel_auroc": (image_auroc + 0.02) if pixel else np.nan,
                    "pixel_f1": (image_auroc - 0.4) if pixel else np.nan,
                    "pixel_aupro": (image_auroc - 0.1) if pixel else np.nan,
                    "latency_ms": config["latency"] * rng.uniform(0.95, 1.05),
                    "throughput_fps": 1000.0 / config["latency"] * rng.uniform(0.9, 1.5),
                    "train_s": 10.0,
                    "memory_bank_size": (
                        int(2000 * config["ratio"]) if config["ratio"] is not None else None
                    ),
                    "hp.coreset_ratio": config["ratio"],
                    "hp.pretrained": True,
                }
                row["config_hash"] = _digest(row)
                rows.append(row)
    if failures:
        for status in ("error", "stopped"):
            rows.append(
                {"status": status, "model": "cfa", "backbone": "resnet18", "seed": 0,
                 "image_size": 64, "augmentation": "none", "stress": "none",
                 "config_hash": status, "error": "boom" if status == "error" else None}
            )  # fmt: skip
    frame = pd.DataFrame(rows)
    if not timing:
        frame[["latency_ms", "throughput_fps"]] = np.nan
    # As read back from Parquet: nullable integers become floats.
    for column in ("memory_bank_size", "epochs"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    return frame


def _digest(row: dict) -> str:
    blob = json.dumps({k: v for k, v in row.items() if k in IDENTITY}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


IDENTITY = (
    "model",
    "backbone",
    "seed",
    "image_size",
    "augmentation",
    "stress",
    "hp.coreset_ratio",
)


def demo(out_dir: str) -> dict[str, Path]:
    """Write every plot of a frame with everything in it, for looking at."""
    from sweep.read.plots import report_plots

    df = result_frame(variants=True, sizes=True, coreset=True)
    return report_plots(df, None, [("image_auroc", "max"), ("latency_ms", "min")], Path(out_dir))
