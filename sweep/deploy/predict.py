"""``sweep predict``: score images and folders with an exported artefact.

Each image is read and prepared as the study's data loader prepares it (decoded by OpenCV, RGB,
outside the artefact's region of interest set to 0, brought to its (height, width) by its resize
mode with ``data.transforms.prepare``, normalised with its mean and std), scored in batches,
and written out: one row per input in ``scores.parquet`` and ``scores.csv``, and per scored
image a mask (``masks/``, the map at or above the pixel threshold) and a heatmap overlay
(``overlays/``). The map is first brought to its ROI minimum outside the ROI and the letterbox
border (``data.roi.mask_maps``, as the trial evaluated it), then mapped back onto the image as
the camera took it (``data.transforms.to_source``): stretched back, the border dropped, or
what the crop cut away filled with the map's minimum. An image that cannot be read is reported
in its row and skipped; the others go on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch

from data.datasets import IMAGE_SUFFIXES, decode_image
from data.errors import DatasetError
from data.roi import mask_maps
from data.transforms import prepare, to_rgb, to_source
from sweep.deploy.artefact import Artefact, load_artefact, normalise_pixels
from sweep.errors import SweepError

__all__ = ["COLUMNS", "PredictSummary", "collect_images", "predict"]

COLUMNS = ("path", "score", "normalised_score", "anomalous", "mask", "overlay", "error")
"""``scores.parquet`` / ``scores.csv``: the input, its image score, the score normalised
(``Normalisation``: 0.5 at the threshold), the decision ``score >= threshold``, the mask and
overlay files (relative to the output folder) and why the image was skipped (else empty)."""

OVERLAY_ALPHA = 0.5
"""Weight of the heatmap over the image in an overlay."""


@dataclass
class PredictSummary:
    """What ``predict`` did."""

    out: Path
    backend: str
    scored: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    """(path, reason) of every image that was skipped."""
    anomalous: int = 0
    files: list[Path] = field(default_factory=list)
    """The tables written."""


def collect_images(inputs: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """(image file, output name) for every image ``inputs`` name: files as given (named by
    their stem), folders searched recursively for image suffixes, sorted (named by their path
    in the folder, ``good/001.png`` -> ``good__001``). A missing input, or none at all found,
    is a :class:`SweepError`."""
    found: list[tuple[Path, str]] = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            files = [p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
            found += [
                (p, "__".join(p.relative_to(path).with_suffix("").parts))
                for p in sorted(files, key=str)
                if p.is_file()
            ]
        elif path.is_file():
            found.append((path, path.stem))
        else:
            raise SweepError(f"image input {str(path)!r}: no such file or directory")
    if not found:
        shown = ", ".join(map(str, inputs))
        raise SweepError(
            f"image inputs {shown!r}: no images found "
            f"(expected {'/'.join(IMAGE_SUFFIXES)} files, or folders holding them)"
        )
    return found


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SweepError(f"--out {str(out)!r}: a file is there, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "masks").mkdir(exist_ok=True)
        (out / "overlays").mkdir(exist_ok=True)
    except OSError as exc:
        raise SweepError(f"--out {str(out)!r}: cannot create it ({exc.strerror or exc})") from None


@dataclass
class _Prepared:
    """One image read for scoring."""

    index: int
    rgb: np.ndarray
    """The image as the camera took it (H x W x 3 RGB uint8)."""
    pixels: np.ndarray
    """The model's input, 3 x H' x W' uint8."""
    valid: np.ndarray | None
    """Which pixels of the input count (inside the ROI, not padding); None: all."""
    roi: np.ndarray | None = None
    """The artefact's ROI on the image (H x W bool); None: no ROI."""


def _read(path: Path, artefact: Artefact, index: int) -> _Prepared:
    """``path`` prepared as the study's loaders prepare their images
    (``data.transforms.prepare``, with the artefact's ROI resized to the image as
    ``RegionOfInterest.mask_for`` resizes it: a mask of another aspect ratio is a
    ``DatasetError``, so the image is skipped)."""
    try:
        rgb = to_rgb(decode_image(path, cv2.IMREAD_UNCHANGED), artefact.bit_depth)
    except TypeError as exc:
        raise DatasetError(f"{path}: unsupported image ({exc})") from exc
    roi = None if artefact.roi is None else artefact.roi.mask_for(path, *rgb.shape[:2])
    pixels, valid = prepare(rgb, artefact.image_size, artefact.resize, roi)
    return _Prepared(index, rgb, np.ascontiguousarray(pixels.transpose(2, 0, 1)), valid, roi)


def _unique(names: Sequence[str]) -> list[str]:
    # Two inputs may give one name (a.png in two folders given): the second becomes a-1.
    used: dict[str, int] = {}
    unique = []
    for name in names:
        count = used.get(name, 0)
        used[name] = count + 1
        unique.append(name if count == 0 else f"{name}-{count}")
    return unique


def _write_pictures(
    artefact: Artefact, image: _Prepared, anomaly_map: np.ndarray, out: Path, name: str
) -> tuple[str | None, str]:
    """The mask and overlay PNGs of one image on the image as the camera took it; their paths
    under ``out``."""
    if image.valid is not None:
        # As the trial evaluated it: outside the ROI (and on the border) at the ROI's minimum.
        anomaly_map = mask_maps(anomaly_map[None], image.valid[None])[0]
    source = to_source(anomaly_map, image.rgb.shape[:2], artefact.resize)
    if image.roi is not None:
        # Upsampling blends the ROI's edge into the pixels just outside it: the source-size
        # ROI has the last word, so no mask pixel lies outside it.
        source = mask_maps(source[None], image.roi[None])[0]
    mask_name = None
    if artefact.pixel_threshold is not None:
        mask_name = f"masks/{name}.png"
        mask = np.where(source >= artefact.pixel_threshold, 255, 0).astype(np.uint8)
        if not cv2.imwrite(str(out / mask_name), mask):
            raise OSError(f"cannot write {out / mask_name}")
    normalisation = artefact.map_normalisation
    if normalisation is not None:
        heat = normalisation.apply(source)
    else:  # no pixel threshold: the map's own range
        low, high = float(source.min()), float(source.max())
        heat = (source - low) / (high - low) if high > low else np.zeros_like(source)
    colours = cv2.applyColorMap((heat * 255).round().astype(np.uint8), cv2.COLORMAP_JET)
    bgr = cv2.cvtColor(image.rgb, cv2.COLOR_RGB2BGR)
    overlay = cv2.addWeighted(bgr, 1 - OVERLAY_ALPHA, colours, OVERLAY_ALPHA, 0)
    overlay_name = f"overlays/{name}.png"
    if not cv2.imwrite(str(out / overlay_name), overlay):
        raise OSError(f"cannot write {out / overlay_name}")
    return mask_name, overlay_name


def predict(
    artefact_dir: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    backend: str | None = None,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> PredictSummary:
    """Score every image of ``inputs`` with the artefact; write tables and pictures to ``out``.

    ``backend``: ``onnx`` (the default where the artefact has ``model.onnx``), ``torchscript``
    or ``torch`` (the detector rebuilt from ``detector.safetensors``). ``progress(done,
    total)`` is called after each batch. Bad input (no artefact, a damaged one, no images, an
    unwritable ``out``) is a :class:`SweepError` before anything is scored; an image that
    cannot be read is a row with its ``error`` and is counted in ``failed``.
    """
    if batch_size < 1:
        raise SweepError(f"--batch-size {batch_size}: expected at least 1")
    artefact = load_artefact(artefact_dir)
    found = collect_images(inputs)
    paths = [path for path, _ in found]
    backend = backend or artefact.default_backend()
    score_batch = artefact.scorer(backend)
    out = Path(out)
    _check_out(out)
    prep = artefact.meta["preprocessing"]
    names = _unique([name for _, name in found])
    rows: list[dict[str, Any]] = []
    summary = PredictSummary(out=out, backend=backend, scored=0)
    threshold = artefact.image_threshold
    normalisation = artefact.score_normalisation

    def flush(batch: list[_Prepared]) -> None:
        if not batch:
            return
        pixels = torch.from_numpy(np.stack([image.pixels for image in batch]))
        images = normalise_pixels(pixels, prep["mean"], prep["std"]).numpy()
        scores, maps = score_batch(images)
        for j, image in enumerate(batch):
            row = rows[image.index]
            # The detector's own score: it never saw outside the ROI (blanked in prepare).
            score = float(scores[j])
            row["score"] = score
            if threshold is not None:
                row["anomalous"] = bool(score >= threshold)
                summary.anomalous += row["anomalous"]
            if normalisation is not None:
                row["normalised_score"] = float(normalisation.apply(np.float64(score)))
            if maps is not None:
                row["mask"], row["overlay"] = _write_pictures(
                    artefact, image, maps[j], out, names[image.index]
                )
            summary.scored += 1
        batch.clear()

    pending: list[_Prepared] = []
    for i, path in enumerate(paths):
        rows.append(dict.fromkeys(COLUMNS) | {"path": str(path)})
        try:
            pending.append(_read(path, artefact, i))
        except DatasetError as exc:
            rows[i]["error"] = str(exc)
            summary.failed.append((str(path), str(exc)))
        if len(pending) >= batch_size:
            flush(pending)
            if progress is not None:
                progress(i + 1, len(paths))
    flush(pending)
    if progress is not None:
        progress(len(paths), len(paths))
    summary.files = _write_tables(rows, out)
    return summary


def _write_tables(rows: Iterable[dict[str, Any]], out: Path) -> list[Path]:
    table = pd.DataFrame(list(rows), columns=list(COLUMNS))
    table["score"] = table["score"].astype(float)
    table["normalised_score"] = table["normalised_score"].astype(float)
    table["anomalous"] = table["anomalous"].astype("boolean")
    parquet, csv = out / "scores.parquet", out / "scores.csv"
    table.to_parquet(parquet, index=False)
    table.to_csv(csv, index=False)
    return [parquet, csv]
