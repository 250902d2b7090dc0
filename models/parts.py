"""The pretrained parts some detectors take from outside: their files, metadata and provenance.

EfficientAD's distilled teacher, DSR's general VQ-VAE, MMR's pretrained ViT and the texture
folders of DRAEM, DSR and MemSeg are made once, offline, by the producers
(:func:`models.teacher_distillation.distill_teacher`, :func:`models.dsr.train_general_vq`,
:func:`data.textures.make_texture_folder`) and handed to the detectors as paths. A produced file
is a safetensors state dict whose header carries a JSON description of how it was made
(:func:`save_part`, :func:`read_part`); a produced folder carries a ``manifest.json``. From
either, :func:`describe_part` writes the short provenance a result row shows, and files without
metadata (a user's plain state dict) are named by file name and SHA-256.

:data:`PART_HYPERPARAMETERS` names the detector hyperparameters that take such paths, so that a
study's configuration identity can include what the path holds (:func:`part_fingerprint`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from data.datasets import decode_image
from data.errors import DatasetError
from data.transforms import to_rgb
from models.errors import ModelError

__all__ = [
    "IMAGE_SUFFIXES",
    "MANIFEST",
    "METADATA_KEY",
    "PART_HYPERPARAMETERS",
    "FolderImages",
    "check_part_kind",
    "describe_part",
    "file_sha256",
    "list_images",
    "part_fingerprint",
    "read_manifest",
    "read_part",
    "read_rgb",
    "save_part",
    "short_sha",
]

METADATA_KEY = "anomaly_sweep.part"
"""The safetensors header entry holding a produced part's JSON description."""
MANIFEST = "manifest.json"
"""The file a produced folder (a texture folder) describes itself in."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
"""File name endings (any case) read from an image folder."""

PART_HYPERPARAMETERS: dict[str, Literal["file", "folder"]] = {
    "teacher_weights": "file",
    "vq_weights": "file",
    "vit_weights": "file",
    "texture_dir": "folder",
    "imagenet_dir": "folder",
}
"""Detector hyperparameters whose value is the path of a pretrained part or an image folder."""

_SHORT = 12
"""Hex digits of a SHA-256 shown in a row."""


# --------------------------------------------------------------------------- files


def save_part(state: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, Any]) -> Path:
    """Write ``state`` as a safetensors file at ``path`` with ``metadata`` in its header.

    ``metadata`` must hold ``kind`` (e.g. ``"efficient_ad.teacher"``) and JSON values. The file
    is written to a temporary name beside ``path`` and renamed into place, so a crash leaves
    either the old file or the new one, never half of one.
    """
    if "kind" not in metadata:
        raise ValueError("part metadata needs a 'kind'")
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise ModelError(f"{str(path)!r}: a part is written as a .safetensors file")
    if not path.parent.is_dir():
        raise ModelError(f"{str(path)!r}: folder {str(path.parent)!r} does not exist")
    header = {METADATA_KEY: json.dumps(dict(metadata), sort_keys=True)}
    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    handle, temporary = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".partial", dir=path.parent
    )
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=header)
        # mkstemp's file is private (0600); a part is read by other users and nodes.
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_part(path: str | Path) -> dict[str, Any] | None:
    """The metadata :func:`save_part` wrote into ``path``; None for a file without it (a
    ``torch.save`` file or a safetensors file written elsewhere). Reads the header only."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"{str(path)!r} is not a file")
    if path.suffix != ".safetensors":
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except Exception as error:
        raise ModelError(f"{str(path)!r} is not a readable safetensors file: {error}") from None
    raw = header.get(METADATA_KEY)
    if raw is None:
        return None
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ModelError(f"{str(path)!r}: its part metadata is not JSON ({error})") from None
    return metadata if isinstance(metadata, dict) else None


def check_part_kind(path: str | Path, kind: str, owner: str, name: str) -> dict[str, Any] | None:
    """``path``'s metadata, after checking that a produced file is of ``kind``.

    A file produced for another use (a DSR codebook given as EfficientAD's teacher) is refused
    naming both; a file without metadata passes (its tensors are checked when loaded).
    """
    metadata = read_part(path)
    if metadata is not None and metadata.get("kind") != kind:
        raise ModelError(
            f"{owner}: {name} {str(path)!r} holds a {metadata.get('kind')!r} part, "
            f"not a {kind!r} one"
        )
    return metadata


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The ``manifest.json`` of a produced folder, or None when it has none (or not JSON)."""
    manifest = Path(folder).expanduser() / MANIFEST
    if not manifest.is_file():
        return None
    try:
        content = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return content if isinstance(content, dict) else None


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, remembered per (path, size, modification time) in this process."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- image folders


def list_images(folder: str | Path, owner: str) -> list[Path]:
    """The image files under ``folder`` (recursively, sorted); an error naming the folder when
    it is missing or holds none."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        state = "is not a folder" if root.exists() else "does not exist"
        raise ModelError(f"{owner}: image folder {str(root)!r} {state}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ModelError(
            f"{owner}: image folder {str(root)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})"
        )
    return files


def read_rgb(path: Path, owner: str) -> np.ndarray:
    """``H x W x 3`` uint8 RGB pixels of an image file; an error naming it when unreadable."""
    try:
        raw = decode_image(path, cv2.IMREAD_UNCHANGED)
    except DatasetError as error:
        raise ModelError(f"{owner}: {error}") from None
    try:
        return to_rgb(raw)
    except TypeError as error:
        raise ModelError(f"{owner}: {str(path)!r}: {error}") from None


class FolderImages:
    """Random images of a folder for the producers: each resized bilinearly to every one of
    ``sizes`` (square), as ``B x 3 x S x S`` float pixels in [0, 1].

    Args:
        files: the image files (:func:`list_images`).
        sizes: the sides the images are resized to, one output per size.
        seed: seeds every draw (which image, whether it turns gray).
        gray_probability: chance that an image is converted to gray (replicated channels).
    """

    def __init__(
        self, files: list[Path], sizes: tuple[int, ...], seed: int, gray_probability: float = 0.0
    ) -> None:
        self.files = files
        self.sizes = sizes
        self.gray_probability = gray_probability
        self.rng = np.random.default_rng(seed)

    def batch(self, indices: Sequence[int]) -> tuple[Tensor, ...]:
        """The images of ``files[indices]``, one tensor per size."""
        outputs: tuple[list[np.ndarray], ...] = tuple([] for _ in self.sizes)
        for index in indices:
            image = read_rgb(self.files[int(index)], "image folder").astype(np.float32) / 255
            if self.gray_probability and self.rng.random() < self.gray_probability:
                gray = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
                image = np.repeat(gray[:, :, None], 3, axis=2)
            for size, out in zip(self.sizes, outputs, strict=True):
                out.append(cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR))
        return tuple(
            torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous() for out in outputs
        )

    def random_batch(self, n: int) -> tuple[Tensor, ...]:
        """``n`` images drawn at random (with replacement)."""
        return self.batch(self.rng.integers(len(self.files), size=n).tolist())


# --------------------------------------------------------------------------- provenance


def describe_part(path: str | Path | None, kind: Literal["file", "folder"]) -> str:
    """The short provenance a result row shows for a part at ``path``.

    A produced file: what made it (e.g. ``distilled from tf_efficientnet_lite0 (weights
    sha256:ab12..) on 480 images of /data/photos, 2000 steps, 256 px, loss 0.41``) and the
    file's own name and hash; a produced folder: its manifest's source and count; anything else:
    the file's name and SHA-256, or the folder's path and number of images.
    """
    if path is None:
        raise ValueError("describe_part needs a path")
    path = Path(path).expanduser()
    if kind == "folder":
        manifest = read_manifest(path)
        if manifest is not None and "summary" in manifest:
            return f"{manifest['summary']} ({path})"
        n = sum(1 for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        return f"folder {path} ({n} images)"
    own = f"file {path.name} sha256:{file_sha256(path)[:_SHORT]}"
    metadata = read_part(path)
    if metadata is None or "summary" not in metadata:
        return own
    return f"{metadata['summary']}; {own}"


def part_fingerprint(path: str | Path, kind: Literal["file", "folder"]) -> str | None:
    """What a configuration's identity records of a part besides its path: a file's SHA-256;
    for a folder, its manifest's content hash where it has one, else a hash of its image files'
    relative paths and sizes (cheap on ImageNet-sized folders, and the same on every node that
    mounts the same data). None when the path holds nothing (validation reports that)."""
    path = Path(path).expanduser()
    if kind == "file":
        return file_sha256(path) if path.is_file() else None
    if not path.is_dir():
        return None
    manifest = read_manifest(path)
    if manifest is not None and isinstance(manifest.get("content_sha256"), str):
        return manifest["content_sha256"]
    return _folder_listing_hash(str(path.resolve()), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _folder_listing_hash(root: str, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    base = Path(root)
    for file in sorted(p for p in base.rglob("*") if p.is_file()):
        if file.suffix.lower() in IMAGE_SUFFIXES:
            digest.update(f"{file.relative_to(base).as_posix()}\0{file.stat().st_size}\n".encode())
    return digest.hexdigest()


def short_sha(digest: str) -> str:
    """A SHA-256 as rows show it."""
    return f"sha256:{digest[:_SHORT]}"
