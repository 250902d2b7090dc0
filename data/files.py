"""Reading image files: which files are images, and decoding one with a clear error."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from data.errors import DatasetError

__all__ = ["IMAGE_SUFFIXES", "decode_image", "is_image", "list_images"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def is_image(path: Path) -> bool:
    """Whether ``path`` names an image file by its suffix (hidden files are not)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def list_images(directory: Path) -> list[Path]:
    """The image files directly in ``directory``, sorted by name."""
    return sorted((p for p in directory.iterdir() if p.is_file() and is_image(p)), key=str)


def decode_image(path: Path, flags: int) -> np.ndarray:
    """The decoded pixels of an image file (``cv2.imdecode`` with ``flags``); a DatasetError
    naming the file when it cannot be read or is not an image."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    if data.size == 0:
        raise DatasetError(f"{path}: empty file (expected an image)")
    try:
        image = cv2.imdecode(data, flags)
    except cv2.error as exc:
        raise DatasetError(f"{path}: not a readable image ({exc})") from exc
    if image is None or image.size == 0:
        raise DatasetError(f"{path}: not a readable image (corrupt, truncated or not an image)")
    return image
