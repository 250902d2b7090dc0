"""Regions of interest: where in an image a defect counts (``dataset.roi``).

A ROI is one mask image for every image of a data set, or a folder of masks, one per image,
matched by file stem (``<stem>.png`` or ``<stem>_mask.png``, as ground-truth masks). Nonzero
pixels are inside; a mask of another size than its image is resized to it when the aspect
ratios agree.

The rule, after the sealant study's binary masking (applied in training and inference):

- the detector never sees outside the ROI: those pixels are set to 0 in every split
  (:func:`data.transforms.prepare`), so its image score is about the ROI only and is used as
  it is;
- its anomaly map is set to the map's minimum inside the ROI everywhere outside it;
- ground-truth masks are cut to the ROI, and an anomalous image whose whole mask lies outside
  it is normal for evaluation (its defect cannot count); anomalous images without a mask stay
  anomalous, as nothing says where their defect is;
- pixel metrics are computed over the pixels inside the ROI only.

:func:`restrict` applies the last three to a split's outputs; the letterbox border of
``dataset.resize: pad`` is outside in the same way.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import cv2
import numpy as np

from data.errors import DatasetError
from data.files import decode_image, list_images

__all__ = ["RegionOfInterest", "mask_maps", "restrict"]

_ASPECT_TOLERANCE = 0.01
"""Relative difference of aspect ratios under which a ROI mask is resized to its image."""


class RegionOfInterest:
    """``dataset.roi``: a mask file for every image, or a folder of per-image masks.

    Args:
        path: the mask image or the folder (``~`` expanded). A folder must hold a mask for
            every image the data set loads; a missing one is an error naming the image.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self._single: np.ndarray | None = None
        self._index: dict[str, Path] = {}
        if self.path.is_file():
            self._single = _read_mask(self.path)
        elif self.path.is_dir():
            for file in list_images(self.path):
                self._index.setdefault(file.stem, file)
                if file.stem.endswith("_mask"):
                    self._index[file.stem[: -len("_mask")]] = file
            if not self._index:
                raise DatasetError(f"{self.path}: ROI folder holds no mask images")
        else:
            raise DatasetError(f"{self.path}: ROI mask not found (expected an image or a folder)")
        self.sha256 = fingerprint(str(self.path))

    def __repr__(self) -> str:
        kind = "mask" if self._single is not None else f"folder of {len(self._index)} masks"
        return f"RegionOfInterest({str(self.path)!r}, {kind})"

    @property
    def per_image(self) -> bool:
        """Whether each image has its own mask (a folder), not one for all."""
        return self._single is None

    def mask_for(self, image: str | Path, height: int, width: int) -> np.ndarray:
        """The ROI of the ``height`` x ``width`` image file ``image``, as H x W bool."""
        if self._single is not None:
            mask, source = self._single, self.path
        else:
            stem = Path(image).stem
            source = self._index.get(stem)
            if source is None:
                raise DatasetError(
                    f"{image}: no ROI mask in {self.path} (expected {stem}.png or {stem}_mask.png)"
                )
            mask = _read_mask(source)
        if mask.shape == (height, width):
            return mask
        ratio = (mask.shape[1] / mask.shape[0]) / (width / height)
        if abs(ratio - 1) > _ASPECT_TOLERANCE:
            raise DatasetError(
                f"{source}: ROI mask is {mask.shape[1]}x{mask.shape[0]} (W x H) but image "
                f"{image} is {width}x{height}: the aspect ratios differ (a resized mask would "
                "move the region)"
            )
        coverage = cv2.resize(
            mask.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR
        )
        return coverage >= 0.5


def _read_mask(path: Path) -> np.ndarray:
    mask = decode_image(path, cv2.IMREAD_GRAYSCALE) > 0
    if not mask.any():
        raise DatasetError(f"{path}: ROI mask is empty (nonzero pixels are inside the region)")
    return mask


def fingerprint(path: str) -> str | None:
    """SHA-256 of a ROI: the mask file's bytes, or for a folder of its file names and their
    SHA-256; None when nothing is there."""
    target = Path(path).expanduser()
    try:
        stat = target.stat()
    except OSError:
        return None
    return _fingerprint(str(target), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _fingerprint(path: str, mtime_ns: int, size: int) -> str:
    # mtime and size are in the key so that a mask written again is hashed again.
    target = Path(path)
    if target.is_file():
        return _file_sha256(target)
    digest = hashlib.sha256()
    for file in sorted(p for p in target.iterdir() if p.is_file()):
        digest.update(f"{file.name}\0{_file_sha256(file)}\n".encode())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mask_maps(maps: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``maps`` (N x H x W) with every pixel outside ``valid`` (N x H x W bool) set to that
    map's minimum inside it (its overall minimum when nothing of it is inside)."""
    out = np.array(maps, copy=True)
    for image, inside in zip(out, valid, strict=True):
        if inside.all():
            continue
        image[~inside] = image[inside].min() if inside.any() else image.min()
    return out


def restrict(
    labels: np.ndarray,
    masks: np.ndarray | None,
    maps: np.ndarray | None,
    valid: np.ndarray | None,
    mask_present: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """A split's ``(labels, masks, maps)`` with only the ``valid`` pixels (N x H x W bool, None:
    all) counting: masks cut to them, maps at their minimum outside them, and an anomalous image
    with a mask (``mask_present``, N bool; default all) that is empty once cut made normal.
    """
    labels = np.asarray(labels).copy()
    if masks is not None:
        masks = np.asarray(masks, dtype=bool)
        if valid is not None:
            masks = masks & valid
        present = np.ones(len(labels), bool) if mask_present is None else np.asarray(mask_present)
        empty = ~masks.reshape(len(masks), -1).any(axis=1)
        labels[(labels == 1) & present & empty] = 0
    if maps is not None and valid is not None:
        maps = mask_maps(maps, valid)
    return labels, masks, maps
