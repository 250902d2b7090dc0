"""The exported artefact: one folder that scores images with only the installed package.

Layout (``docs/deploy.md``)::

    artefact.json          what the model is, how to feed it, its threshold, metrics, sha256s
    model.pt               TorchScript of ``Detector.export_module()`` (traced, any batch size)
    model.onnx             the same as ONNX (opset :data:`ONNX_OPSET`), where it exports
    detector.safetensors   the fitted detector's tensors: ``models.create`` + load rebuilds it
    roi.png                the study's region of interest (one mask file), where it has one

Every scorer takes a normalised float32 ``B x 3 x S x S`` batch and returns (image scores ``B``,
anomaly maps ``B x S x S``). Nothing here imports ``sweep.run`` or Ray: ``sweep predict`` runs
where only the artefact is.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.errors import DatasetError
from data.roi import RegionOfInterest
from data.transforms import BIT_DEPTHS, RESIZE_MODES
from sweep.errors import SweepError

__all__ = [
    "BACKENDS",
    "FORMAT",
    "FORMAT_VERSION",
    "META_FILE",
    "ONNX_FILE",
    "ONNX_OPSET",
    "ROI_FILE",
    "TORCHSCRIPT_FILE",
    "WEIGHTS_FILE",
    "Artefact",
    "Normalisation",
    "load_artefact",
    "normalise_pixels",
    "rebuild_detector",
    "sha256_file",
]

FORMAT = "anomaly-sweep-artefact"
FORMAT_VERSION = 1
"""Bumped when a reader of the previous version would misread the folder."""
META_FILE = "artefact.json"
TORCHSCRIPT_FILE = "model.pt"
ONNX_FILE = "model.onnx"
WEIGHTS_FILE = "detector.safetensors"
ROI_FILE = "roi.png"
ONNX_OPSET = 17
"""Supported by every onnxruntime since 1.14; what the legacy (TorchScript-based) exporter
writes best."""
BACKENDS = ("onnx", "torchscript", "torch")

Scorer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Normalisation:
    """anomalib's threshold-centred min-max normalisation of a score.

    ``clip((score - threshold) / (max - min) + 0.5, 0, 1)`` with ``min`` and ``max`` the
    validation split's scores (or map values): the threshold lands on 0.5, so "normalised score
    >= 0.5" is the decision at the validation threshold, and the validation range spans 1.
    """

    threshold: float
    min: float
    max: float

    def apply(self, values: np.ndarray) -> np.ndarray:
        spread = self.max - self.min
        if not math.isfinite(spread) or spread <= 0:
            spread = 1.0  # a constant validation range: centre on the threshold only
        return np.clip((values - self.threshold) / spread + 0.5, 0.0, 1.0)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> Normalisation | None:
        """The normalisation ``artefact.json`` stores, or None where it stores none (no
        threshold could be chosen on the validation split)."""
        if not values or values.get("threshold") is None:
            return None
        return cls(float(values["threshold"]), float(values["min"]), float(values["max"]))


def normalise_pixels(pixels: torch.Tensor, mean: Any, std: Any) -> torch.Tensor:
    """uint8 ``N x 3 x H x W`` RGB to float32 with ``mean`` and ``std`` (0..1 units), in the
    same arithmetic as ``data.transforms.normalize`` so that scores match the training side's
    to the bit."""
    shape = (3, 1, 1)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(shape)
    bias = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)]).view(shape)
    return torch.addcmul(bias, pixels.float(), scale)


def rebuild_detector(meta: Mapping[str, Any], weights: Path):  # -> models.Detector
    """The fitted PyTorch detector from ``artefact.json``'s ``create_args`` and its tensors.

    Built without pretrained weights (the file holds every tensor, so nothing is downloaded or
    read from a weights folder) and loaded strictly.
    """
    from safetensors.torch import load_model

    import models

    args = dict(meta["create_args"])
    known = models.hyperparameters(meta["model"])
    if "pretrained" in known:
        args["pretrained"] = False
    args.pop("weights", None)
    detector = models.create(meta["model"], **args)
    load_model(detector, str(weights), strict=True)
    return detector.eval()


@dataclass
class Artefact:
    """An artefact folder, read and checked."""

    folder: Path
    meta: dict[str, Any]

    @property
    def image_size(self) -> tuple[int, int]:
        height, width = self.meta["preprocessing"]["image_size"]
        return int(height), int(width)

    @property
    def resize(self) -> str:
        return str(self.meta["preprocessing"]["resize"])

    @property
    def bit_depth(self) -> int | None:
        """The bits of data a 16-bit image holds, as in training (None: all 16)."""
        depth = self.meta["preprocessing"].get("bit_depth")
        return None if depth is None else int(depth)

    @functools.cached_property
    def roi(self) -> RegionOfInterest | None:
        """The study's region of interest (``roi.png``), applied to every image as the trial
        applied it; None where the study had none."""
        if self.meta["preprocessing"].get("roi") is None:
            return None
        return RegionOfInterest(self.folder / ROI_FILE)

    @property
    def image_threshold(self) -> float | None:
        return self.meta["threshold"].get("image")

    @property
    def pixel_threshold(self) -> float | None:
        return self.meta["threshold"].get("pixel")

    @property
    def score_normalisation(self) -> Normalisation | None:
        return Normalisation.from_dict(self.meta["normalisation"].get("image"))

    @property
    def map_normalisation(self) -> Normalisation | None:
        return Normalisation.from_dict(self.meta["normalisation"].get("pixel"))

    def default_backend(self) -> str:
        """ONNX Runtime where the artefact has ``model.onnx``, else TorchScript."""
        return "onnx" if ONNX_FILE in self.meta["files"] else "torchscript"

    def scorer(self, backend: str | None = None) -> Scorer:
        """A function from a normalised float32 ``B x 3 x H x W`` array to (scores, maps)."""
        backend = backend or self.default_backend()
        if backend not in BACKENDS:
            raise SweepError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        if backend == "onnx":
            if ONNX_FILE not in self.meta["files"]:
                raise SweepError(
                    f"{self.folder}: no {ONNX_FILE} in this artefact ({self.meta['model']} did "
                    "not export to ONNX); use --backend torchscript"
                )
            return _onnx_scorer(self.folder / ONNX_FILE)
        if backend == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation
                module = torch.jit.load(str(self.folder / TORCHSCRIPT_FILE), map_location="cpu")
            return _torch_scorer(module.eval())
        detector = rebuild_detector(self.meta, self.folder / WEIGHTS_FILE)
        return _torch_scorer(lambda images: _prediction(detector, images))


def _prediction(detector: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    prediction = detector.predict(images)
    return prediction.score, prediction.anomaly_map


def _torch_scorer(module: Callable[[torch.Tensor], Any]) -> Scorer:
    def score(images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        with torch.no_grad():
            scores, maps = module(torch.from_numpy(images))
        return scores.float().numpy(), None if maps is None else maps.float().numpy()

    return score


def _onnx_scorer(path: Path) -> Scorer:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initialisers are not the user's
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def score(images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        scores, maps = session.run(None, {name: np.ascontiguousarray(images, np.float32)})
        return scores, maps

    return score


def load_artefact(folder: str | Path) -> Artefact:
    """Read ``folder/artefact.json`` and check the folder against it: the format, and every
    file it lists present with its SHA-256. Anything else is a :class:`SweepError` naming the
    folder or file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SweepError(f"artefact {str(folder)!r}: no such directory")
    path = folder / META_FILE
    if not path.is_file():
        raise SweepError(
            f"artefact {str(folder)!r}: no {META_FILE} there; it is not a folder that "
            "sweep export wrote"
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SweepError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SweepError(f"{path}: not an anomaly-sweep artefact (format {FORMAT!r} expected)")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise SweepError(
            f"{path}: artefact format version {version!r}; this anomaly-sweep reads version "
            f"{FORMAT_VERSION} (export it again with this version)"
        )
    resize = meta["preprocessing"].get("resize")
    if resize not in RESIZE_MODES:
        raise SweepError(
            f"{path}: preprocessing.resize {resize!r} is not supported here "
            f"(known: {', '.join(RESIZE_MODES)})"
        )
    depth = meta["preprocessing"].get("bit_depth")
    if depth is not None and depth not in BIT_DEPTHS:
        raise SweepError(
            f"{path}: preprocessing.bit_depth {depth!r} is not one of "
            f"{', '.join(map(str, BIT_DEPTHS))}"
        )
    files = dict(meta["files"])
    roi = meta["preprocessing"].get("roi")
    if roi is not None:
        if not isinstance(roi, dict) or roi.get("file") != ROI_FILE or "sha256" not in roi:
            raise SweepError(
                f"{path}: preprocessing.roi is not a {ROI_FILE} with its sha256; this "
                "anomaly-sweep cannot apply it"
            )
        files[ROI_FILE] = roi["sha256"]
    for name, expected in files.items():
        file = folder / name
        if not file.is_file():
            raise SweepError(f"artefact {str(folder)!r}: {name} is missing")
        if sha256_file(file) != expected:
            raise SweepError(
                f"{file}: sha256 differs from the one {META_FILE} records (damaged or edited); "
                "export the model again"
            )
    artefact = Artefact(folder, meta)
    try:
        artefact.roi  # noqa: B018 -- read once here: a bad mask is the artefact's fault
    except DatasetError as exc:
        raise SweepError(f"artefact {str(folder)!r}: {exc}") from None
    return artefact
