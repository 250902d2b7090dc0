"""Example anomaly maps saved by trials, for the report's heatmap grid (the reference study's
Fig. 11).

After scoring its test split a trial saves a few test images with their ground-truth masks, its
anomaly maps and image scores to ``<output>/_examples/<config_hash>.npz``
(``evaluation.example_maps`` images; 0 saves nothing). The images are picked the same way in
every trial of a study, anomalous ones first in data-set order, then normal ones, so every
model's maps show the same images and sit side by side in one grid. The file layout is in
``docs/results-schema.md``. Only numpy and pyarrow's filesystems are used here: trials import
this module, and it stays free of matplotlib.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from sweep.errors import SweepError
from sweep.results import ResultStore

__all__ = ["EXAMPLES_DIR", "example_indices", "examples_path", "load_examples", "save_examples"]

EXAMPLES_DIR = "_examples"
"""Folder under a study's output; Parquet readers skip it (leading underscore)."""

FORMAT_VERSION = 1


def example_indices(labels: np.ndarray, n: int) -> np.ndarray:
    """Which test images a trial saves: the first ``n`` anomalous images in data-set order,
    then normal ones in data-set order when there are fewer than ``n`` anomalous ones.

    It depends on the labels alone (never on a trial's seed or scores), so every trial that
    sees the same test split saves the same images.
    """
    labels = np.asarray(labels).reshape(-1)
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    order = np.concatenate([np.flatnonzero(labels == 1), np.flatnonzero(labels != 1)])
    return order[:n].astype(np.int64)


def examples_path(store: ResultStore, config_hash: str) -> str:
    """Where a trial's examples live in ``store`` (a path on ``store.fs``)."""
    return f"{store.root}/{EXAMPLES_DIR}/{config_hash}.npz"


def _quantise(maps: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Maps as float16 in [0, 1] over their common finite range, with that range.

    Anomaly scores may be far outside float16's range (flow log-likelihoods) or sit on a large
    offset with small differences (distances); scaling first keeps ~3 significant digits of
    the variation either way. Non-finite values become the range's ends.
    """
    values = maps.astype(np.float64)
    finite = values[np.isfinite(values)]
    low = float(finite.min()) if finite.size else 0.0
    high = float(finite.max()) if finite.size else 0.0
    span = high - low if high > low else 1.0
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    scaled = np.clip((values - low) / span, 0.0, 1.0)
    return scaled.astype(np.float16), low, high


def save_examples(
    store: ResultStore,
    config_hash: str,
    *,
    pixels: np.ndarray,
    masks: np.ndarray | None,
    maps: np.ndarray | None,
    scores: np.ndarray,
    labels: np.ndarray,
    paths: list[str],
    defects: list[str],
    n: int,
) -> str | None:
    """Save ``n`` examples of one trial's test split; return the file's path (None for n=0).

    ``pixels`` is the split's ``N x 3 x S x S`` uint8 images as the model saw them (stressed
    where the trial's test split was), ``masks`` ``N x S x S`` (None without masks), ``maps``
    ``N x H x W`` float (None for image-level-only detectors), ``scores`` ``N`` image scores.
    The file appears whole or not at all: a temporary file renamed into place on local disks,
    one whole-object upload on object stores.
    """
    index = example_indices(labels, n)
    if index.size == 0:
        return None
    pixels = np.asarray(pixels)
    arrays: dict[str, np.ndarray] = {
        "format_version": np.asarray(FORMAT_VERSION),
        "config_hash": np.asarray(config_hash),
        "index": index,
        "path": np.asarray([str(paths[i]) for i in index]),
        "defect": np.asarray([str(defects[i]) for i in index]),
        "label": np.asarray(labels)[index].astype(np.int8),
        "score": np.asarray(scores, dtype=np.float64)[index],
        # Height x width x RGB, as image files and matplotlib hold images.
        "image": np.ascontiguousarray(pixels[index].transpose(0, 2, 3, 1)).astype(np.uint8),
    }
    if masks is not None:
        arrays["mask"] = np.asarray(masks)[index].astype(bool)
    if maps is not None:
        quantised, low, high = _quantise(np.asarray(maps)[index])
        arrays["anomaly_map"] = quantised
        arrays["map_range"] = np.asarray([low, high], dtype=np.float64)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return store.write_file(f"{EXAMPLES_DIR}/{config_hash}.npz", buffer.getvalue())


def load_examples(output: str | os.PathLike[str], config_hash: str) -> dict[str, Any] | None:
    """One trial's saved examples, or None when it saved none.

    Keys: ``config_hash``; ``index`` (into the test split), ``path``, ``defect``, ``label``
    (1 = anomalous), ``score`` (image score): one entry per example; ``image`` ``n x S x S x 3``
    uint8; ``mask`` ``n x S x S`` bool or None; ``anomaly_map`` ``n x H x W`` float32 in the
    detector's own units (restored from the stored float16) or None. A file that cannot be
    read raises :class:`SweepError` naming it.
    """
    store = ResultStore(output)
    path = examples_path(store, config_hash)
    try:
        if store.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with store.fs.open_input_file(path) as handle:
            data = handle.read()
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise SweepError(f"examples {path!r}: cannot read them ({exc})") from None
    required = ("index", "path", "label", "score", "image")
    missing = [key for key in required if key not in arrays]
    if missing:
        raise SweepError(f"examples {path!r}: missing {', '.join(missing)}")
    anomaly_map = None
    if "anomaly_map" in arrays:
        low, high = (float(v) for v in arrays.get("map_range", (0.0, 1.0)))
        span = high - low if high > low else 1.0
        anomaly_map = low + arrays["anomaly_map"].astype(np.float32) * np.float32(span)
    return {
        "config_hash": str(arrays.get("config_hash", config_hash)),
        "index": arrays["index"].astype(np.int64),
        "path": [str(p) for p in arrays["path"]],
        "defect": [str(d) for d in arrays.get("defect", [""] * len(arrays["path"]))],
        "label": arrays["label"].astype(np.int64),
        "score": arrays["score"].astype(np.float64),
        "image": arrays["image"],
        "mask": arrays.get("mask"),
        "anomaly_map": anomaly_map,
    }
