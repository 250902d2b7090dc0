"""A tiny study's output written row by row with ResultStore: what the report, query and
compare tests read without running a sweep (seconds instead of a Ray run)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from sweep.results import ResultStore, hp_column_types, row_schema
from sweep.run.study import study_from_dict, study_to_yaml
from tests.conftest import tiny_study

# model, hyperparameters, image AUROC, pixel AUROC, latency ms, train s
CONFIGS = [
    ("patchcore", {"coreset_ratio": 0.01, "num_neighbors": 9}, 0.86, 0.90, 6.0, 2.0),
    ("patchcore", {"coreset_ratio": 0.1, "num_neighbors": 9}, 0.93, 0.95, 14.0, 3.0),
    ("patchcore", {"coreset_ratio": 1.0, "num_neighbors": 9}, 0.95, 0.96, 60.0, 9.0),
    ("padim", {"n_features": 100}, 0.88, 0.93, 9.0, 1.0),
    ("padim", {"n_features": 50}, 0.84, 0.91, 12.0, 1.0),  # dominated by n_features=100
    ("stfpm", {"lr": 0.4}, 0.80, 0.85, 4.0, 20.0),
]
START = datetime(2025, 1, 1, tzinfo=timezone.utc)
HP_NAMES = ("backbone", "pretrained", "coreset_ratio", "num_neighbors", "n_features", "lr")


def write_study_output(
    output: Path,
    *,
    category: str = "part1",
    seeds: tuple[int, ...] = (0, 1, 2),
    augmentations: tuple[str, ...] = ("none",),
    shift: float = 0.0,
    configs: list | None = None,
    error_row: bool = True,
) -> Path:
    """Rows of every configuration x seed x augmentation (+ one error row) and ``_study.yaml``.

    Metrics are the table's values plus a seed-dependent wobble of at most 0.01; an
    augmentation other than none costs 0.03 of every AUROC; ``shift`` is added to every AUROC
    (a second output that is uniformly better or worse).
    """
    configs = CONFIGS if configs is None else configs
    hp_values: dict[str, list] = {name: [] for name in HP_NAMES}
    for _, hp, *_ in configs:
        for name in HP_NAMES:
            hp_values[name].append(hp.get(name))
    hp_values["backbone"] = ["resnet18"]
    hp_values["pretrained"] = [False]
    schema = row_schema(hp_column_types(hp_values))
    store = ResultStore(output)
    trials = ((c, s, a) for c in configs for s in seeds for a in augmentations)
    for count, ((model, hp, auroc, pixel, latency, train), seed, augmentation) in enumerate(
        trials, start=1
    ):
        wobble = np.random.default_rng(1000 * count + seed).uniform(-0.01, 0.01)
        cost = 0.03 if augmentation != "none" else 0.0
        store.write_row(
            {
                "study": "tiny",
                "run_id": "20250101T000000",
                "trial_id": f"t{count}",
                "config_hash": f"{count:016x}",
                "status": "ok",
                "model": model,
                "backbone": "resnet18",
                "seed": seed,
                "image_size": 64,
                "dataset": "synthetic_glue",
                "category": category,
                "augmentation": augmentation,
                "stress": "none",
                "image_auroc": auroc + wobble - cost + shift,
                "image_f1": auroc - 0.1 + wobble,
                "pixel_auroc": pixel + wobble / 2 - cost + shift,
                "pixel_f1": pixel - 0.5 + wobble,
                "pixel_aupro": pixel - 0.2 + wobble,
                "latency_ms": latency * (1 + wobble),
                "train_s": train,
                "throughput_fps": 1000.0 / latency,
                "device": "cpu",
                "timing_exclusive": True,
                "started_at": START + timedelta(minutes=count),
                **{f"hp.{k}": v for k, v in {"backbone": "resnet18", **hp}.items()},
            },
            schema,
        )
    if error_row:
        store.write_row(
            {
                "study": "tiny",
                "config_hash": "e" * 16,
                "status": "error",
                "error": "RuntimeError: stfpm diverged | loss=nan\n  at models/stfpm.py:120",
                "model": "stfpm",
                "backbone": "resnet18",
                "seed": 7,
                "image_size": 64,
                "dataset": "synthetic_glue",
                "category": category,
                "augmentation": augmentations[0],
                "stress": "none",
                "hp.backbone": "resnet18",
                "hp.lr": 0.4,
            },
            schema,
        )
    study = tiny_study(output.parent / "glue", output)
    study["space"]["model"] = {"grid": ["patchcore", "padim", "stfpm"]}
    study["description"] = "Three detectors on a tiny glue-line part."
    (Path(output) / "_study.yaml").write_text(study_to_yaml(study_from_dict(study)))
    return Path(output)
