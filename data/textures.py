"""Texture folders for the detectors that blend textures into synthetic anomalies.

DRAEM (and MemSeg, and DSR's upsampling phase) paste textures of the Describable Textures
Dataset inside their Perlin masks; ``texture_dir`` points :class:`data.anomalies.PerlinBlend` at
a folder of such images. :func:`make_texture_folder` writes one offline: square tiles cut from
the images of a folder the user gives or, by default, from the real photographs that
scikit-image ships (:data:`SKIMAGE_TEXTURES`, public domain), with a ``manifest.json`` saying
where the tiles come from and a hash of their content. The folder appears whole or not at all
(written under a temporary name, then renamed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from data.datasets import IMAGE_SUFFIXES, decode_image
from data.errors import DatasetError
from data.transforms import to_rgb

__all__ = ["MANIFEST", "SKIMAGE_TEXTURES", "TEXTURES_KIND", "make_texture_folder"]

MANIFEST = "manifest.json"
TEXTURES_KIND = "textures"
SKIMAGE_TEXTURES = ("brick", "grass", "gravel", "immunohistochemistry", "moon")
"""The photographs of ``skimage.data`` used by default: three texture photographs (brick, grass,
gravel), a stained tissue section (colour) and the lunar surface. All install with
scikit-image; none needs a download."""


def make_texture_folder(
    out: str | Path,
    *,
    images: str | Path | None = None,
    tile_size: int = 128,
    stride: int | None = None,
    max_per_image: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a texture folder at ``out`` and return its manifest.

    Args:
        out: the folder to create (it must not exist unless ``overwrite``).
        images: a folder of images (searched recursively) to cut tiles from; None uses
            scikit-image's photographs :data:`SKIMAGE_TEXTURES`.
        tile_size: side of the square tiles in pixels (images smaller than a tile are enlarged
            so that their shorter side fits one).
        stride: step between tiles (default: half a tile, so tiles overlap by half).
        max_per_image: keep at most this many tiles of each image, chosen at random from
            ``seed``; None keeps every tile.
        seed: seeds the choice of tiles.
        overwrite: replace an existing ``out`` (the old folder goes only once the new one is
            complete).
    """
    for name, value in (
        ("tile_size", tile_size),
        ("stride", stride),
        ("max_per_image", max_per_image),
    ):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise DatasetError(f"textures: {name} must be a positive int, got {value!r}")
    if tile_size < 8:
        raise DatasetError(f"textures: tile_size must be at least 8 px, got {tile_size}")
    step = stride or max(1, tile_size // 2)
    target = Path(out).expanduser()
    if target.exists() and not overwrite:
        raise DatasetError(f"{target}: already exists (remove it, choose another, or overwrite)")
    if not target.parent.is_dir():
        raise DatasetError(f"{target}: its folder {target.parent} does not exist")
    sources = _folder_sources(Path(images).expanduser()) if images else _skimage_sources()
    rng = np.random.default_rng(seed)

    staging = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    )
    try:
        # mkdtemp's folder is private (0700); a texture folder is read by other users and nodes.
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(staging, 0o777 & ~mask)
        files: dict[str, str] = {}
        for label, read in sources:
            tiles = _tiles(read(), tile_size, step)
            if max_per_image is not None and len(tiles) > max_per_image:
                keep = sorted(rng.choice(len(tiles), size=max_per_image, replace=False).tolist())
                tiles = [tiles[i] for i in keep]
            for (row, col), tile in tiles:
                name = f"{label}_{row:04d}_{col:04d}.png"
                ok, encoded = cv2.imencode(".png", np.ascontiguousarray(tile[:, :, ::-1]))
                if not ok:
                    raise DatasetError(f"textures: could not encode a tile of {label}")
                (staging / name).write_bytes(encoded.tobytes())
                files[name] = hashlib.sha256(encoded.tobytes()).hexdigest()
        content = hashlib.sha256(
            "".join(f"{name}\0{digest}\n" for name, digest in sorted(files.items())).encode()
        ).hexdigest()
        where = f"the images of {images}" if images else f"skimage's {', '.join(SKIMAGE_TEXTURES)}"
        manifest = {
            "kind": TEXTURES_KIND,
            "source": str(Path(images).expanduser().resolve()) if images else "skimage.data",
            "sources": [label for label, _ in sources],
            "tile_size": tile_size,
            "stride": step,
            "max_per_image": max_per_image,
            "seed": seed,
            "n_tiles": len(files),
            "content_sha256": content,
            "summary": f"{len(files)} texture tiles of {tile_size} px from {where}",
            "files": files,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        _publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _publish(staging: Path, target: Path) -> None:
    """Move the finished folder into place; an old one is removed only after the new one is."""
    if not target.exists():
        os.rename(staging, target)
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _tiles(
    image: np.ndarray, tile_size: int, step: int
) -> list[tuple[tuple[int, int], np.ndarray]]:
    """Square tiles on a grid, keyed by their top-left corner."""
    height, width = image.shape[:2]
    if min(height, width) < tile_size:
        scale = tile_size / min(height, width)
        size = (max(tile_size, round(width * scale)), max(tile_size, round(height * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        height, width = image.shape[:2]
    return [
        ((top, left), image[top : top + tile_size, left : left + tile_size])
        for top in range(0, height - tile_size + 1, step)
        for left in range(0, width - tile_size + 1, step)
    ]


def _folder_sources(folder: Path) -> list[tuple[str, Any]]:
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise DatasetError(f"{folder}: image folder {state}")
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise DatasetError(f"{folder}: image folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
    labels = _unique_labels([p.relative_to(folder).with_suffix("").as_posix() for p in files])
    return [(label, _file_reader(path)) for label, path in zip(labels, files, strict=True)]


def _file_reader(path: Path):
    def read() -> np.ndarray:
        image = decode_image(path, cv2.IMREAD_UNCHANGED)
        try:
            return to_rgb(image)
        except TypeError as error:
            raise DatasetError(f"{path}: {error}") from None

    return read


def _skimage_sources() -> list[tuple[str, Any]]:
    # scikit-image is a dev extra (pyproject.toml), not a dependency: only this source needs it.
    import skimage.data

    def reader(name: str):
        def read() -> np.ndarray:
            image = np.asarray(getattr(skimage.data, name)())
            if image.dtype != np.uint8:
                image = (255 * (image.astype(np.float64) / max(1, image.max()))).astype(np.uint8)
            if image.ndim == 2:
                image = np.repeat(image[:, :, None], 3, axis=2)
            return np.ascontiguousarray(image[:, :, :3])

        return read

    return [(name, reader(name)) for name in SKIMAGE_TEXTURES]


def _unique_labels(paths: Sequence[str]) -> list[str]:
    """File-name-safe labels of the source images (their relative paths, slashes replaced)."""
    labels: list[str] = []
    for path in paths:
        label = "".join(c if c.isalnum() or c in "-." else "_" for c in path)
        while label in labels:  # 'a/b' and 'a_b' would collide
            label += "_"
        labels.append(label)
    return labels
