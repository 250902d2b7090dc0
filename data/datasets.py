"""Anomaly-detection data sets held in memory: the MVTec AD layout, a folder layout, and the
synthetic glue-line data.

Every loader decodes and checks every image and mask up front, so a study with bad data fails
before its first trial rather than in the middle of one. Images are brought to ``image_size``
(a side, or ``(height, width)``; ``resize`` says how another aspect ratio is met, and a ROI
blanks what lies outside it: :func:`data.transforms.prepare`) and kept as uint8 (N x 3 x H x W,
RGB; gray images replicated to three channels; 16-bit files by the bit depth of their data,
``bit_depth``: 8 to 16, or ``auto``, inferred from the training images' largest value, see
:func:`data.transforms.infer_bit_depth`); :meth:`AnomalyDataset.images` and
:meth:`AnomalyDataset.batches` hand them out as float32 normalised with ImageNet's mean and
standard deviation.

Splits: ``train`` holds normal images only. ``val`` is what decision thresholds are fit on, so
they are never fit on ``test``; when a data set has no validation images of its own, ``val`` is
a seeded share of the normal training images, and then holds no anomalies: image and pixel F1
thresholds cannot be fit and are reported as NaN downstream.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from data.errors import DatasetError
from data.files import IMAGE_SUFFIXES, decode_image, is_image
from data.files import list_images as _list_images
from data.roi import RegionOfInterest
from data.synthetic_glue import GlueSetConfig, ensure_generated
from data.transforms import (
    BIT_DEPTHS,
    RESIZE_MODES,
    as_shape,
    infer_bit_depth,
    normalize,
    prepare,
    prepare_mask,
    to_rgb,
)

__all__ = [
    "DATASET_KINDS",
    "IMAGE_SUFFIXES",
    "AnomalyDataset",
    "DatasetSplits",
    "dataset_files",
    "load_dataset",
    "load_folder",
    "load_mvtec",
    "load_synthetic_glue",
]

DATASET_KINDS = ("synthetic_glue", "mvtec", "folder")

GOOD = "good"


# ----------------------------------------------------------------------------- the data set


class AnomalyDataset:
    """One split of a data set, every image in memory at one size.

    Attributes:
        pixels: N x 3 x H x W uint8, RGB (gray images replicated to three channels).
        labels: N int64, 0 = normal, 1 = anomalous.
        masks: N x H x W bool; all False for normal images and for anomalous images without a
            mask file.
        has_masks: True when every anomalous image has a mask (so pixel metrics can be
            computed; also True for a split without anomalies).
        defects: ``"good"`` or the defect type, per image.
        paths: the image files, per image.

    The constructor takes these (``has_masks`` aside) plus ``mask_present``, N bool: which
    images have a mask file (default: all); it checks that the shapes agree.
    """

    def __init__(
        self,
        pixels: torch.Tensor,
        labels: torch.Tensor,
        masks: torch.Tensor,
        defects: Sequence[str],
        paths: Sequence[str],
        mask_present: torch.Tensor | None = None,
    ) -> None:
        n = len(paths)
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(
                f"pixels: expected uint8 N x 3 x H x W, got {pixels.dtype} {tuple(pixels.shape)}"
            )
        size = tuple(pixels.shape[2:])
        if pixels.shape[0] != n or labels.shape != (n,) or len(defects) != n:
            raise ValueError(
                f"pixels, labels, defects and paths must have one entry per image: got "
                f"{pixels.shape[0]}, {tuple(labels.shape)}, {len(defects)}, {n}"
            )
        if masks.dtype != torch.bool or tuple(masks.shape) != (n, *size):
            raise ValueError(
                f"masks: expected bool {(n, *size)}, got {masks.dtype} {tuple(masks.shape)}"
            )
        self.pixels = pixels
        self.labels = labels.to(torch.int64)
        self.masks = masks
        self.defects = list(defects)
        self.paths = [str(p) for p in paths]
        # Which images have a mask file (normal images count as having their empty one).
        if mask_present is None:
            mask_present = torch.ones(n, dtype=torch.bool)
        self._mask_present = mask_present.to(torch.bool)
        anomalous = self.labels == 1
        self.has_masks = bool(self._mask_present[anomalous].all())

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        size = "x".join(str(s) for s in self.pixels.shape[2:])
        return (
            f"AnomalyDataset({len(self)} images, {self.num_anomalous} anomalous, {size}, "
            f"has_masks={self.has_masks})"
        )

    @property
    def mask_present(self) -> torch.Tensor:
        """N bool: which images have a mask (normal images count as having their empty one)."""
        return self._mask_present

    @property
    def defect_pixels(self) -> list[int | None]:
        """Per image, its mask's anomalous pixels (0 for normal images), None without a mask."""
        counts = self.masks.flatten(1).sum(dim=1).tolist()
        present = self._mask_present.tolist()
        return [int(c) if p else None for c, p in zip(counts, present, strict=True)]

    @classmethod
    def concat(cls, parts: Sequence[AnomalyDataset]) -> AnomalyDataset:
        """One data set holding the images of ``parts`` in order (all at one image size)."""
        if not parts:
            raise ValueError("concat: expected at least one data set")
        return cls(
            pixels=torch.cat([p.pixels for p in parts]),
            labels=torch.cat([p.labels for p in parts]),
            masks=torch.cat([p.masks for p in parts]),
            defects=[d for p in parts for d in p.defects],
            paths=[path for p in parts for path in p.paths],
            mask_present=torch.cat([p.mask_present for p in parts]),
        )

    @property
    def num_anomalous(self) -> int:
        """How many images are anomalous."""
        return int(self.labels.sum())

    @property
    def image_size(self) -> int:
        """The side of the square images, in pixels (the width of non-square ones)."""
        return int(self.pixels.shape[-1])

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the images, in pixels."""
        return int(self.pixels.shape[-2]), int(self.pixels.shape[-1])

    def images(self, index: Any = None) -> torch.Tensor:
        """float32 N x 3 x H x W images normalised with ImageNet's statistics: all of them, or
        those picked by ``index`` (an int, a slice, a sequence or tensor of indices)."""
        if index is None:
            return normalize(self.pixels)
        if isinstance(index, slice):
            return normalize(self.pixels[index])
        return normalize(self.pixels[torch.as_tensor(index, dtype=torch.long).reshape(-1)])

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Mini-batches as dicts: ``image`` (normalised float32 B x 3 x H x W), ``label`` (B
        int64), ``mask`` (B x H x W float32, 0 or 1) and ``index`` (B int64, into this split).

        ``shuffle`` draws the order from ``generator``, which it requires (reproducibility
        never depends on global random state).
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        n = len(self)
        if shuffle:
            if generator is None:
                raise ValueError("batches(shuffle=True) needs a torch.Generator")
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size]
            yield {
                "image": normalize(self.pixels[index]),
                "label": self.labels[index],
                "mask": self.masks[index].float(),
                "index": index,
            }

    def subset(self, indices: Any) -> AnomalyDataset:
        """A new data set holding the images at ``indices`` (in that order)."""
        index = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        picked = index.tolist()
        return AnomalyDataset(
            pixels=self.pixels[index],
            labels=self.labels[index],
            masks=self.masks[index],
            defects=[self.defects[i] for i in picked],
            paths=[self.paths[i] for i in picked],
            mask_present=self._mask_present[index],
        )


@dataclass
class DatasetSplits:
    """The train, validation and test splits of one data set (category) at one image size."""

    train: AnomalyDataset
    val: AnomalyDataset
    test: AnomalyDataset
    name: str
    category: str | None
    image_size: int
    val_source: str = "split"
    """Where the validation anomalies come from (``data.splits.VALIDATION_SOURCES``)."""
    shape: tuple[int, int] | None = None
    """(height, width) of the images; None: ``image_size`` square."""
    resize: str = "stretch"
    """How images of another aspect ratio reached ``shape`` (``data.transforms.RESIZE_MODES``)."""
    roi: RegionOfInterest | None = None
    """The region of interest, if the data set has one (``data.roi``)."""
    sources: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)
    """Each image file's own (height, width), by path."""
    valid: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    """By path, which pixels count for evaluation (inside the ROI, not padding), for images
    where some do not."""
    labelled: AnomalyDataset | None = None
    """Labelled defect images that supervised detectors train on, moved out of the test split
    (:func:`data.splits.labelled_split`); None: none were drawn."""
    bit_depth: int | None = None
    """The bit depth the data of the 16-bit image files was read at (its top 8 bits kept);
    None: the data set has no 16-bit file."""
    bit_depth_peak: int | None = None
    """The largest value of the 16-bit training images when ``bit_depth`` was inferred from it
    (``bit_depth="auto"``); None when it was set."""

    @property
    def restricted(self) -> bool:
        """Whether evaluation goes through :func:`data.roi.restrict`: a ROI, or a resize that
        can cut or pad. Otherwise outputs are evaluated as they are (today's behaviour)."""
        return self.roi is not None or self.resize != "stretch"

    def valid_pixels(self, dataset: AnomalyDataset) -> np.ndarray | None:
        """N x H x W bool: which pixels of ``dataset``'s images (a split of these) count for
        evaluation; None when all do. Synthetic anomalies (``path#kind``) take their source
        image's."""
        if not self.valid:
            return None
        out = np.ones((len(dataset), *dataset.shape), bool)
        for i, path in enumerate(dataset.paths):
            mask = self.valid.get(path.split("#", 1)[0])
            if mask is not None:
                out[i] = mask
        return out

    def source_sizes(self) -> list[tuple[int, int]]:
        """The distinct (height, width) of the image files, most frequent first."""
        counts: dict[tuple[int, int], int] = {}
        for size in self.sources.values():
            counts[size] = counts.get(size, 0) + 1
        return sorted(counts, key=lambda s: (-counts[s], s))

    def aspect_change(self) -> str | None:
        """What happened to the images' aspect ratio, in words; None when nothing did (every
        source has the target's aspect to within 1%)."""
        height, width = self.shape or (self.image_size, self.image_size)
        target = width / height
        changed = [s for s in self.source_sizes() if abs((s[1] / s[0]) / target - 1) > 0.01]
        if not changed:
            return None
        how = {
            "stretch": "stretched",
            "pad": "letterboxed (padded)",
            "crop": "centre-cropped",
        }[self.resize]
        sources = ", ".join(f"{w}x{h}" for h, w in changed[:3])
        more = f" and {len(changed) - 3} more sizes" if len(changed) > 3 else ""
        return (
            f"{sources}{more} (W x H, aspect {changed[0][1] / changed[0][0]:.3g}) {how} to "
            f"{width}x{height} (aspect {target:.3g})"
        )

    def describe(self) -> str:
        """One line: images per split, how many anomalous, whether masks exist, image size."""

        def split(label: str, data: AnomalyDataset) -> str:
            if data.num_anomalous == 0:
                return f"{label} {len(data)}"
            masks = "masks" if data.has_masks else "no masks"
            return f"{label} {len(data)} ({data.num_anomalous} anomalous, {masks})"

        title = f"{self.name}/{self.category}" if self.category else self.name
        val = "val" if self.val_source == "split" else f"val ({self.val_source})"
        parts = [split("train", self.train), split(val, self.val), split("test", self.test)]
        if self.labelled is not None:
            parts.append(split("labelled", self.labelled))
        size = f"{self.image_size}px"
        if self.shape is not None and self.shape[0] != self.shape[1]:
            size = f"{self.shape[0]}x{self.shape[1]}px"
        if self.resize != "stretch":
            size += f" ({self.resize})"
        roi = f", roi {self.roi.path.name}" if self.roi is not None else ""
        depth = ""
        if self.bit_depth is not None:
            how = "set" if self.bit_depth_peak is None else f"auto, train max {self.bit_depth_peak}"
            depth = f", 16-bit files read as {self.bit_depth}-bit ({how})"
        return f"{title} {size}{roi}{depth}: {', '.join(parts)}"


# ----------------------------------------------------------------------------- reading files


@dataclass(frozen=True)
class _Item:
    path: Path
    label: int
    defect: str
    mask: Path | None


@dataclass(frozen=True)
class _Preparation:
    """How every image of a load is prepared (:func:`data.transforms.prepare`)."""

    shape: tuple[int, int]
    resize: str = "stretch"
    roi: RegionOfInterest | None = None
    bit_depth: int | str = "auto"
    """The bit depth of 16-bit files' data as given: a value above it refuses the file."""
    read_depth: int | None = None
    """With ``bit_depth="auto"``: the depth inferred from the training images (None: 16 until
    it is known); values above it saturate."""


@dataclass
class _Loaded:
    pixels: np.ndarray
    mask: np.ndarray | None
    source: tuple[int, int]
    valid: np.ndarray | None
    peak: int | None
    """The largest value of a 16-bit image; None for an 8-bit one."""


def _load_one(item: _Item, prep: _Preparation) -> _Loaded:
    """One image prepared (3 x H x W uint8 RGB), its H x W bool mask or None, its own size and
    which of its pixels count (None: all); raises DatasetError."""
    image = decode_image(item.path, cv2.IMREAD_UNCHANGED)
    peak = int(image.max()) if image.dtype == np.uint16 else None
    depth = prep.read_depth if prep.bit_depth == "auto" else int(prep.bit_depth)
    if peak is not None and prep.bit_depth != "auto" and peak > 2 ** int(prep.bit_depth) - 1:
        raise DatasetError(
            f"{item.path}: holds the value {peak}, above {2 ** int(prep.bit_depth) - 1}, the "
            f"largest {prep.bit_depth}-bit value (dataset.bit_depth: {prep.bit_depth}); its data "
            f"needs {infer_bit_depth(peak)} bits (set that, or auto)"
        )
    try:
        rgb = to_rgb(image, depth)
    except TypeError as exc:
        raise DatasetError(f"{item.path}: unsupported image ({exc})") from exc
    source = (int(rgb.shape[0]), int(rgb.shape[1]))
    mask = None
    if item.mask is not None:
        raw = decode_image(item.mask, cv2.IMREAD_GRAYSCALE)
        if raw.shape != rgb.shape[:2]:
            raise DatasetError(
                f"{item.mask}: mask is {raw.shape[1]}x{raw.shape[0]} (W x H) but its image "
                f"{item.path} is {rgb.shape[1]}x{rgb.shape[0]}"
            )
        # Masks are 0/255; >= 128 ignores compression noise in masks saved as JPEG.
        mask = prepare_mask(raw >= 128, prep.shape, prep.resize)
    roi = None if prep.roi is None else prep.roi.mask_for(item.path, *source)
    pixels, valid = prepare(rgb, prep.shape, prep.resize, roi)
    return _Loaded(np.ascontiguousarray(pixels.transpose(2, 0, 1)), mask, source, valid, peak)


@dataclass
class _LoadInfo:
    sources: dict[str, tuple[int, int]] = field(default_factory=dict)
    valid: dict[str, np.ndarray] = field(default_factory=dict)
    shared: dict[Any, np.ndarray] = field(default_factory=dict)
    peaks: dict[str, int] = field(default_factory=dict)
    """The largest value of each 16-bit image, by path."""


def _splits(
    train: list[_Item],
    val: list[_Item],
    test: list[_Item],
    prep: _Preparation,
    name: str,
    category: str | None,
) -> DatasetSplits:
    info = _LoadInfo()
    loaded = [_load_items(items, prep, info) for items in (train, val, test)]
    depth, peak = _read_depth(prep, info, train)
    if prep.bit_depth == "auto" and depth is not None and depth != BIT_DEPTHS[-1]:
        # Loaded as 16-bit first: 8-bit and true 16-bit data sets are read once, and only
        # data of fewer bits in 16-bit files (which read nearly black) is read again.
        prep = dataclasses.replace(prep, read_depth=depth)
        info = _LoadInfo()
        loaded = [_load_items(items, prep, info) for items in (train, val, test)]
    height, width = prep.shape
    return DatasetSplits(
        *loaded,
        name=name,
        category=category,
        image_size=min(height, width),
        shape=prep.shape,
        resize=prep.resize,
        roi=prep.roi,
        sources=info.sources,
        valid=info.valid,
        bit_depth=depth,
        bit_depth_peak=peak,
    )


def _read_depth(
    prep: _Preparation, info: _LoadInfo, train: list[_Item]
) -> tuple[int | None, int | None]:
    """The bit depth 16-bit files are read at, and the training images' peak it was inferred
    from (None when set); (None, None) without a 16-bit file.

    Inferred from every training image, not one: a dark image of 16-bit data must not pass for
    12-bit data."""
    if not info.peaks:
        return None, None
    if prep.bit_depth != "auto":
        return int(prep.bit_depth), None
    peaks = [info.peaks[str(item.path)] for item in train if str(item.path) in info.peaks]
    peak = max(peaks or info.peaks.values())
    return infer_bit_depth(peak), peak


def _preparation(
    image_size: int | Sequence[int],
    resize: str,
    roi: str | Path | RegionOfInterest | None,
    bit_depth: int | str = "auto",
) -> _Preparation:
    shape = _check_size(image_size)
    if resize not in RESIZE_MODES:
        raise DatasetError(f"resize: expected one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    if bit_depth != "auto" and (isinstance(bit_depth, bool) or bit_depth not in BIT_DEPTHS):
        raise DatasetError(
            f"bit_depth: expected one of {', '.join(map(str, BIT_DEPTHS))} or auto, got "
            f"{bit_depth!r}"
        )
    if roi is not None and not isinstance(roi, RegionOfInterest):
        roi = RegionOfInterest(roi)
    return _Preparation(shape, resize, roi, bit_depth)


def _workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    # OpenCV decodes and resizes without holding the GIL, so threads load in parallel.
    return max(1, min(8, cpus))


def _load_items(
    items: list[_Item], prep: _Preparation, info: _LoadInfo | None = None
) -> AnomalyDataset:
    """Decode, check and prepare ``items`` (in order) into a data set; each image's own size
    and valid pixels go to ``info``."""
    n = len(items)
    height, width = prep.shape
    pixels = np.empty((n, 3, height, width), np.uint8)
    masks = np.zeros((n, height, width), bool)
    failures: list[DatasetError] = []
    info = _LoadInfo() if info is None else info

    def load(i: int) -> None:
        try:
            loaded = _load_one(items[i], prep)
        except DatasetError as exc:
            failures.append(exc)
            return
        pixels[i] = loaded.pixels
        if loaded.peak is not None:
            info.peaks[str(items[i].path)] = loaded.peak
        if loaded.mask is not None:
            masks[i] = loaded.mask
        path = str(items[i].path)
        info.sources[path] = loaded.source
        if loaded.valid is not None:
            # One array per source size where every image has the same ROI (or none), not one
            # per image: thousands of large masks would otherwise hold gigabytes.
            per_image = prep.roi is not None and prep.roi.per_image
            key = path if per_image else loaded.source
            info.valid[path] = info.shared.setdefault(key, loaded.valid)

    workers = _workers()
    if workers == 1 or n < 8:
        for i in range(n):
            load(i)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(load, range(n)))
    if failures:
        failures.sort(key=str)  # threads finish in any order; report deterministically
        more = f" (and {len(failures) - 1} more bad file(s))" if len(failures) > 1 else ""
        raise DatasetError(f"{failures[0]}{more}") from failures[0]
    return AnomalyDataset(
        pixels=torch.from_numpy(pixels),
        labels=torch.tensor([item.label for item in items], dtype=torch.int64),
        masks=torch.from_numpy(masks),
        defects=[item.defect for item in items],
        paths=[str(item.path) for item in items],
        mask_present=torch.tensor([item.label == 0 or item.mask is not None for item in items]),
    )


def _mask_index(directory: Path) -> dict[str, Path]:
    """Mask files in ``directory`` by the stem of the image they belong to: ``<stem>_mask.*``
    (MVTec AD's naming) or ``<stem>.*``."""
    if not directory.is_dir():
        return {}
    index: dict[str, Path] = {}
    for path in _list_images(directory):
        stem = path.stem
        index.setdefault(stem, path)
        if stem.endswith("_mask"):
            index[stem[: -len("_mask")]] = path
    return index


def _check_masks(items: list[_Item], where: Path, expected: str) -> None:
    """Either every anomalous image has a mask or none has: a partial set is an error."""
    missing = [item.path for item in items if item.label == 1 and item.mask is None]
    anomalous = sum(item.label for item in items)
    if missing and len(missing) < anomalous:
        shown = ", ".join(str(p) for p in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DatasetError(
            f"{where}: {len(missing)} of {anomalous} anomalous images have no mask: {shown}{more} "
            f"(expected {expected})"
        )


def _check_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``image_size`` (a side, or ``(height, width)``) as ``(height, width)``."""
    sides = [image_size] if not isinstance(image_size, Sequence) else list(image_size)
    if len(sides) not in (1, 2) or any(
        not isinstance(s, (int, np.integer)) or isinstance(s, bool) or s < 8 for s in sides
    ):
        raise DatasetError(
            f"image_size: expected an integer >= 8 or [height, width] of them, got {image_size!r}"
        )
    return as_shape(sides[0] if len(sides) == 1 else sides)


def _check_fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise DatasetError(f"{name}: expected a number in (0, 1), got {value!r}")
    return float(value)


def _directory(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        state = "is not a directory" if path.exists() else "not found"
        raise DatasetError(f"{path}: {what} {state}")
    return path


def _split_indices(n: int, take: int, seed: Any) -> tuple[list[int], list[int]]:
    """A seeded choice of ``take`` of ``n`` indices, and the rest; both sorted."""
    order = np.random.default_rng(seed).permutation(n)
    return sorted(order[:take].tolist()), sorted(order[take:].tolist())


# ----------------------------------------------------------------------------- MVTec AD layout


def _labelled_items(split_dir: Path, truth_dir: Path) -> list[_Item]:
    """Images of ``split_dir/<good|defect>/``, anomalies paired with masks from
    ``truth_dir/<defect>/``."""
    items = []
    for sub in sorted((p for p in split_dir.iterdir() if p.is_dir()), key=lambda p: p.name):
        masks = {} if sub.name == GOOD else _mask_index(truth_dir / sub.name)
        for path in _list_images(sub):
            if sub.name == GOOD:
                items.append(_Item(path, 0, GOOD, None))
            else:
                items.append(_Item(path, 1, sub.name, masks.get(path.stem)))
    return items


def load_mvtec(
    root: str | Path,
    category: str,
    image_size: int | Sequence[int],
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    resize: str = "stretch",
    roi: str | Path | RegionOfInterest | None = None,
    bit_depth: int | str = "auto",
) -> DatasetSplits:
    """One category of a data set in the MVTec AD layout.

    ``<root>/<category>/train/good/`` are the (normal) training images; ``test/<defect>/`` the
    test images (``good`` normal, any other folder anomalous), with masks
    ``ground_truth/<defect>/<stem>_mask.png``. If ``<category>/val/`` exists it is the
    validation split (same layout, masks from ``val_ground_truth/``); otherwise a seeded
    ``val_fraction`` of ``train/good`` is held out as a normal-only validation split (image and
    pixel F1 thresholds then cannot be fit and come out NaN downstream).

    Anomalous images without masks are allowed when no anomaly of the split has one
    (``has_masks`` is then False); a partial set of masks is an error.

    ``image_size`` is a side or ``(height, width)``; ``resize`` (``stretch``, ``pad``,
    ``crop``) how images of another aspect ratio reach it; ``roi`` a :mod:`data.roi` mask (or
    folder of masks) outside which images are blanked and nothing counts. ``bit_depth`` (8,
    10, 12, 14, 16 or ``auto``) is the depth of the data in 16-bit image files, whose top 8
    bits of it are kept: set, a file with a larger value is refused; ``auto`` infers it from
    the largest value of the training images, and larger values elsewhere saturate.
    """
    prep = _preparation(image_size, resize, roi, bit_depth)
    val_fraction = _check_fraction("val_fraction", val_fraction)
    root = _directory(root, "data root")
    if not isinstance(category, str) or not category:
        raise DatasetError(f"category: expected a category name under {root}, got {category!r}")
    category_dir = root / category
    if not category_dir.is_dir():
        known = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise DatasetError(
            f"{category_dir}: category not found (categories under {root}: "
            f"{', '.join(known) or 'none'})"
        )

    train_dir = category_dir / "train" / GOOD
    train_paths = _list_images(train_dir) if train_dir.is_dir() else []
    if not train_paths:
        raise DatasetError(
            f"{train_dir}: no training images (expected normal images, {'/'.join(IMAGE_SUFFIXES)})"
        )
    test_dir = category_dir / "test"
    if not test_dir.is_dir():
        raise DatasetError(
            f"{test_dir}: test directory not found (expected test/good, test/<defect>)"
        )
    test_items = _labelled_items(test_dir, category_dir / "ground_truth")
    if not any(item.label == 1 for item in test_items):
        raise DatasetError(
            f"{test_dir}: no anomalous test images (expected test/<defect>/ folders beside "
            "test/good)"
        )
    if not any(item.label == 0 for item in test_items):
        raise DatasetError(f"{test_dir / GOOD}: no normal test images")
    _check_masks(test_items, test_dir, f"{category_dir / 'ground_truth'}/<defect>/<stem>_mask.png")

    train_items = [_Item(p, 0, GOOD, None) for p in train_paths]
    val_dir = category_dir / "val"
    if val_dir.is_dir():
        val_items = _labelled_items(val_dir, category_dir / "val_ground_truth")
        if not val_items:
            raise DatasetError(f"{val_dir}: holds no images (expected val/good, val/<defect>)")
        _check_masks(
            val_items, val_dir, f"{category_dir / 'val_ground_truth'}/<defect>/<stem>_mask.png"
        )
    else:
        if len(train_items) < 2:
            raise DatasetError(
                f"{train_dir}: 1 training image is too few to hold out a validation split "
                "(expected at least 2, or a val/ folder)"
            )
        take = min(len(train_items) - 1, max(1, round(val_fraction * len(train_items))))
        val_index, train_index = _split_indices(len(train_items), take, [seed, 0x5EED])
        val_items = [train_items[i] for i in val_index]
        train_items = [train_items[i] for i in train_index]

    return _splits(train_items, val_items, test_items, prep, "mvtec", category)


# ----------------------------------------------------------------------------- folder layout


def load_folder(
    normal_dir: str | Path,
    abnormal_dir: str | Path,
    image_size: int | Sequence[int],
    *,
    mask_dir: str | Path | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.3,
    seed: int = 0,
    resize: str = "stretch",
    roi: str | Path | RegionOfInterest | None = None,
    bit_depth: int | str = "auto",
) -> DatasetSplits:
    """A folder of normal images and a folder of anomalous ones, split with a seed.

    Normal images are shared out as ``val_fraction`` to validation, ``test_fraction`` to test
    and the rest to training; anomalous images as ``val_fraction`` to validation (at least one
    stays for test) and the rest to test. ``mask_dir`` optionally holds a mask per anomalous
    image, named ``<stem>.png`` or ``<stem>_mask.png`` (any image suffix). ``image_size``,
    ``resize`` and ``roi`` as for :func:`load_mvtec`.
    """
    prep = _preparation(image_size, resize, roi, bit_depth)
    val_fraction = _check_fraction("val_fraction", val_fraction)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1:
        raise DatasetError(
            f"val_fraction + test_fraction: expected < 1 to leave training images, got "
            f"{val_fraction} + {test_fraction}"
        )
    normal_dir = _directory(normal_dir, "normal image directory")
    abnormal_dir = _directory(abnormal_dir, "abnormal image directory")
    normals = _list_images(normal_dir)
    abnormals = _list_images(abnormal_dir)
    if not normals:
        raise DatasetError(f"{normal_dir}: no normal images ({'/'.join(IMAGE_SUFFIXES)})")
    if not abnormals:
        raise DatasetError(
            f"{abnormal_dir}: no anomalous images (expected test anomalies, "
            f"{'/'.join(IMAGE_SUFFIXES)})"
        )

    defect = abnormal_dir.name
    masks: dict[str, Path] = {}
    if mask_dir is not None:
        mask_dir = _directory(mask_dir, "mask directory")
        masks = _mask_index(mask_dir)
        if not any(p.stem in masks for p in abnormals):
            raise DatasetError(
                f"{mask_dir}: no mask matches any image of {abnormal_dir} (expected "
                f"<stem>.png or <stem>_mask.png, e.g. {abnormals[0].stem}_mask.png)"
            )
    normal_items = [_Item(p, 0, GOOD, None) for p in normals]
    abnormal_items = [_Item(p, 1, defect, masks.get(p.stem)) for p in abnormals]
    if mask_dir is not None:
        _check_masks(abnormal_items, abnormal_dir, f"{mask_dir}/<stem>.png or <stem>_mask.png")
    _check_distinct(normal_dir, normals, abnormal_dir, abnormals, mask_dir, abnormal_items)

    n = len(normal_items)
    n_test = max(1, round(test_fraction * n))
    n_val = max(1, round(val_fraction * n))
    if n - n_test - n_val < 1:
        raise DatasetError(
            f"{normal_dir}: {n} normal image(s) are too few for val_fraction={val_fraction} and "
            f"test_fraction={test_fraction} (each split needs at least one)"
        )
    held_out, train_index = _split_indices(n, n_test + n_val, [seed, 0])
    # Which of the held-out images go to validation is a second seeded draw.
    val_pos, test_pos = _split_indices(len(held_out), n_val, [seed, 1])
    a_val = min(len(abnormal_items) - 1, round(val_fraction * len(abnormal_items)))
    a_val_index, a_test_index = _split_indices(len(abnormal_items), a_val, [seed, 2])

    train = [normal_items[i] for i in train_index]
    val = [normal_items[held_out[i]] for i in val_pos] + [abnormal_items[i] for i in a_val_index]
    test = [normal_items[held_out[i]] for i in test_pos] + [abnormal_items[i] for i in a_test_index]
    return _splits(train, val, test, prep, "folder", None)


def _check_distinct(
    normal_dir: Path,
    normals: list[Path],
    abnormal_dir: Path,
    abnormals: list[Path],
    mask_dir: Path | None,
    abnormal_items: list[_Item],
) -> None:
    """Refuse a folder data set whose normal and anomalous images are the same files (one
    folder given twice, a symlink or ``..`` to it, hard links, byte-identical copies), or whose
    masks are its images: the same pictures would train as normal and be tested as anomalies
    (an AUROC far below 0.5 and no other sign).

    A folder inside the other is no problem by itself: only the images directly in each folder
    are read."""
    where = f"dataset.normal_dir {normal_dir} and dataset.abnormal_dir {abnormal_dir}"
    if normal_dir.resolve() == abnormal_dir.resolve():
        raise DatasetError(
            f"{where} are the same folder ({normal_dir.resolve()}): its images would train as "
            "normal and be tested as anomalies; give a folder of normal and one of anomalous images"
        )
    shared = _same_files(normals, abnormals)
    if shared:
        shown = ", ".join(f"{a.name} = {b.name}" for a, b in shared[:3])
        more = f" and {len(shared) - 3} more" if len(shared) > 3 else ""
        raise DatasetError(
            f"{where} hold the same image file(s) ({len(shared)}: {shown}{more}; linked, or "
            "byte-identical copies): they would train as normal and be tested as anomalies; "
            "each image belongs in one of the two folders"
        )
    if mask_dir is None:
        return
    used = [item.mask for item in abnormal_items if item.mask is not None]
    for images, key in ((abnormals, "abnormal_dir"), (normals, "normal_dir")):
        shared = _same_files(used, images)
        if shared:
            raise DatasetError(
                f"dataset.mask_dir {mask_dir}: its masks are image files of dataset.{key} "
                f"({shared[0][0].name} = {shared[0][1].name}); masks go in a folder of their own "
                "(<stem>.png or <stem>_mask.png, 0 = normal, 255 = anomalous)"
            )


def _same_files(first: list[Path], second: list[Path]) -> list[tuple[Path, Path]]:
    """Pairs of ``first`` and ``second`` that hold the same bytes: the same file (by device
    and inode, so symlinks, ``..`` and hard links meet) or a copy of it. Only files of equal
    size are read and hashed, so distinct images cost a ``stat`` each."""

    def stat(path: Path) -> os.stat_result:
        try:
            return path.stat()
        except OSError as exc:
            raise DatasetError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc

    by_size: dict[int, list[Path]] = {}
    inodes: dict[tuple[int, int], Path] = {}
    for path in first:
        info = stat(path)
        inodes[(info.st_dev, info.st_ino)] = path
        by_size.setdefault(info.st_size, []).append(path)
    pairs: list[tuple[Path, Path]] = []
    digests: dict[Path, str] = {}

    def digest(path: Path) -> str:
        if path not in digests:
            digests[path] = hashlib.sha256(path.read_bytes()).hexdigest()
        return digests[path]

    for path in second:
        info = stat(path)
        same = inodes.get((info.st_dev, info.st_ino))
        if same is None:
            same = next(
                (p for p in by_size.get(info.st_size, []) if digest(p) == digest(path)), None
            )
        if same is not None:
            pairs.append((same, path))
    return pairs


# ----------------------------------------------------------------------------- glue lines & kinds


def load_synthetic_glue(
    root: str | Path,
    category: str,
    image_size: int | Sequence[int],
    *,
    config: GlueSetConfig = GlueSetConfig(),
    seed: int = 0,
    resize: str = "stretch",
    roi: str | Path | RegionOfInterest | None = None,
    bit_depth: int | str = "auto",
) -> DatasetSplits:
    """The synthetic glue-line data of part ``category`` (generated under ``root`` on first
    use, reused after; see :mod:`data.synthetic_glue`), loaded like MVTec AD."""
    _preparation(image_size, resize, None, bit_depth)
    ensure_generated(root, category, config=config, seed=seed)
    splits = load_mvtec(
        root, category, image_size, seed=seed, resize=resize, roi=roi, bit_depth=bit_depth
    )
    splits.name = "synthetic_glue"
    return splits


def dataset_files(
    kind: str,
    *,
    root: str | Path | None = None,
    category: str | None = None,
    normal_dir: str | Path | None = None,
    abnormal_dir: str | Path | None = None,
    mask_dir: str | Path | None = None,
    **_loading: Any,
) -> dict[str, tuple[int, int]]:
    """The image files a data set of ``kind`` is read from (the arguments of
    :func:`load_dataset`; the rest are ignored), each with its size in bytes and modification
    time in whole seconds, by path relative to the data set: under ``<root>/<category>`` for
    ``mvtec`` (masks and validation folders included), ``normal_dir/<name>``,
    ``abnormal_dir/<name>`` and ``mask_dir/<name>`` for ``folder``. A cheap stand-in for their
    content (no file is read); a folder that does not exist lists nothing, and generated data
    (``synthetic_glue``) lists nothing: its generator's configuration decides it."""
    if kind == "mvtec":
        if root is None or category is None:
            return {}
        base = Path(root).expanduser() / category
        files = sorted(p for p in base.rglob("*") if is_image(p) and p.is_file())
        return {str(p.relative_to(base)): _stamp(p) for p in files}
    listing: dict[str, tuple[int, int]] = {}
    if kind == "folder":
        for key, folder in (
            ("normal_dir", normal_dir),
            ("abnormal_dir", abnormal_dir),
            ("mask_dir", mask_dir),
        ):
            if folder is None:
                continue
            path = Path(folder).expanduser()
            path = Path(root).expanduser() / path if root is not None else path
            if path.is_dir():
                listing.update({f"{key}/{p.name}": _stamp(p) for p in _list_images(path)})
    return listing


def _stamp(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_size, int(info.st_mtime)


_COMMON_OPTIONS = {"resize", "roi", "bit_depth"}
_OPTIONS = {
    "synthetic_glue": {"config"} | _COMMON_OPTIONS,
    "mvtec": {"val_fraction"} | _COMMON_OPTIONS,
    "folder": {"normal_dir", "abnormal_dir", "mask_dir", "val_fraction", "test_fraction"}
    | _COMMON_OPTIONS,
}


def load_dataset(
    kind: str,
    *,
    root: str | Path | None = None,
    category: str | None = None,
    image_size: int | Sequence[int],
    seed: int = 0,
    **options: Any,
) -> DatasetSplits:
    """Load a data set by kind: ``"synthetic_glue"`` (``root``, ``category`` = part, default
    ``part1``; option ``config``), ``"mvtec"`` (``root``, ``category``; option
    ``val_fraction``) or ``"folder"`` (options ``normal_dir``, ``abnormal_dir``, optional
    ``mask_dir``, ``val_fraction``, ``test_fraction``; relative directories are taken under
    ``root`` when it is given). Every kind takes ``resize``, ``roi`` and ``bit_depth`` (see
    :func:`load_mvtec`); ``image_size`` is a side or ``(height, width)``."""
    if kind not in _OPTIONS:
        raise DatasetError(f"unknown dataset kind {kind!r} (known: {', '.join(DATASET_KINDS)})")
    unknown = sorted(set(options) - _OPTIONS[kind])
    if unknown:
        accepted = ", ".join(sorted(_OPTIONS[kind]))
        raise DatasetError(
            f"dataset kind {kind!r}: unknown option(s) {', '.join(unknown)} (accepted: {accepted})"
        )
    if kind == "synthetic_glue":
        if root is None:
            raise DatasetError("dataset kind 'synthetic_glue' needs a root directory")
        return load_synthetic_glue(root, category or "part1", image_size, seed=seed, **options)
    if kind == "mvtec":
        if root is None or category is None:
            raise DatasetError("dataset kind 'mvtec' needs a root directory and a category")
        return load_mvtec(root, category, image_size, seed=seed, **options)
    for name in ("normal_dir", "abnormal_dir"):
        if options.get(name) is None:
            raise DatasetError(f"dataset kind 'folder' needs the option {name}")
    if root is not None:
        for name in ("normal_dir", "abnormal_dir", "mask_dir"):
            if options.get(name) is not None:
                options[name] = Path(root).expanduser() / Path(options[name]).expanduser()
    return load_folder(image_size=image_size, seed=seed, **options)
