"""A tiny study's output written row by row with ResultStore: what the report, query and
compare tests read without running a sweep (seconds instead of a Ray run)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

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
# Issue 15's columns: AU-PR, IoU, recall at precision >= 0.996 / 0.95 / 0.90, the threshold policy
# and where the validation split came from (older outputs lack them: ``new_metrics=False``).
NEW_COLUMNS = {
    "image_ap": pa.float64(),
    "pixel_ap": pa.float64(),
    "pixel_iou": pa.float64(),
    "image_recall_p996": pa.float64(),
    "image_recall_p95": pa.float64(),
    "image_recall_p90": pa.float64(),
    "threshold_policy": pa.string(),
    "val_source": pa.string(),
}
# Per-image results: test images of four defect sizes (one without a mask) and good ones.
IMAGE_SIZES = (40, 90, 160, 250, 400, 640, None)


def write_study_output(
    output: Path,
    *,
    category: str = "part1",
    seeds: tuple[int, ...] = (0, 1, 2),
    augmentations: tuple[str, ...] = ("none",),
    shift: float = 0.0,
    configs: list | None = None,
    error_row: bool = True,
    wobble_seed: int | None = None,
    new_metrics: bool = True,
    images: bool = False,
) -> Path:
    """Rows of every configuration x seed x augmentation (+ one error row) and ``_study.yaml``.

    Metrics are the table's values plus a seed-dependent wobble of at most 0.01 (drawn anew
    with ``wobble_seed``: a second output whose noise is not the first's); an augmentation other
    than none costs 0.03 of every AUROC; ``shift`` is added to every AUROC (a second output that
    is uniformly better or worse). ``new_metrics``: the issue-15 columns (AP, recall at fixed
    precision, threshold policy, validation source). ``images``: per-image results under
    ``_images/`` (:func:`image_rows`).
    """
    configs = CONFIGS if configs is None else configs
    hp_values: dict[str, list] = {name: [] for name in HP_NAMES}
    for _, hp, *_ in configs:
        for name in HP_NAMES:
            hp_values[name].append(hp.get(name))
    hp_values["backbone"] = ["resnet18"]
    hp_values["pretrained"] = [False]
    schema = row_schema(hp_column_types(hp_values))
    if new_metrics:
        schema = pa.schema(
            [*schema, *(pa.field(n, t) for n, t in NEW_COLUMNS.items() if n not in schema.names)]
        )
    else:
        schema = pa.schema([f for f in schema if f.name not in NEW_COLUMNS])
    store = ResultStore(output)
    trials = ((c, s, a) for c in configs for s in seeds for a in augmentations)
    for count, ((model, hp, auroc, pixel, latency, train), seed, augmentation) in enumerate(
        trials, start=1
    ):
        draw = 1000 * count + seed
        rng = np.random.default_rng(draw if wobble_seed is None else (draw, wobble_seed))
        wobble = rng.uniform(-0.01, 0.01)
        cost = 0.03 if augmentation != "none" else 0.0
        config_hash = f"{count:016x}"
        extra = {}
        if new_metrics:
            extra = {
                "image_ap": auroc - 0.05 + wobble,
                "pixel_ap": pixel - 0.4 + wobble,
                "pixel_iou": pixel - 0.6 + wobble,
                "image_recall_p996": auroc - 0.5 + wobble,
                "image_recall_p95": auroc - 0.2 + wobble,
                "image_recall_p90": auroc - 0.1 + wobble,
                "threshold_policy": "f1_max",
                "val_source": "split",
            }
        if images:
            frame = image_rows(config_hash, miss=1.0 - auroc)
            store.write_file(f"_images/{config_hash}.parquet", _parquet_bytes(frame))
        store.write_row(
            {
                **extra,
                "image_threshold": 0.5,
                "study": "tiny",
                "run_id": "20250101T000000",
                "trial_id": f"t{count}",
                "config_hash": config_hash,
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


def image_rows(config_hash: str, miss: float):  # -> pandas.DataFrame
    """One trial's per-image results (the ``_images/<config_hash>.parquet`` columns): each
    size of :data:`IMAGE_SIZES` twice as an anomalous test image, four good test images and two
    validation images. The anomalous scores rise with the defect size from 0.5 - ``miss``, so a
    worse detector (larger ``miss``) misses more of the small defects at threshold 0.5."""
    import pandas as pd

    rows = []
    for i, size in enumerate([*IMAGE_SIZES, *IMAGE_SIZES]):
        rise = 0.0 if size is None else size / 640
        rows.append(("test", 1, "crack", size, 0.5 - miss + rise * 0.4 - 0.01 * (i % 2)))
    rows += [("test", 0, "good", None, 0.2 + 0.05 * k) for k in range(4)]
    rows += [("val", 1, "crack", 100, 0.7), ("val", 0, "good", None, 0.3)]
    frame = pd.DataFrame(rows, columns=["split", "label", "defect", "defect_pixels", "score"])
    frame.insert(0, "config_hash", config_hash)
    frame.insert(2, "index", frame.groupby("split").cumcount().astype("int64"))
    frame.insert(3, "path", [f"img/{i}.png" for i in range(len(frame))])
    frame["defect_fraction"] = frame["defect_pixels"] / (64 * 64)
    return frame.astype(
        {
            "label": "int8",
            "defect_pixels": "Int64",
            "defect_fraction": "float64",
            "score": "float64",
        }
    )


def _parquet_bytes(frame) -> bytes:
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink)
    return sink.getvalue().to_pybytes()
