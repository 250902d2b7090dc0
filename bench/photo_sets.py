"""MVTec-layout anomaly data sets built from real photographs: the CC0 textures scikit-image
ships (``skimage.data.brick()``, ``grass()``, ``gravel()``: 512 x 512 gray), with synthetic
defects and their pixel masks. Used by ``bench/parity.py``; deterministic from a seed.

Per set (category = texture name), under ``ROOT/<texture>/``:

* ``train/good/``: ``train`` crops of ``crop`` x ``crop`` source pixels at random places, half of
  them mirrored left-right, each with a small brightness / contrast jitter and sensor noise;
* ``test/good/``: ``good`` more such crops;
* ``test/<defect>/`` + ``ground_truth/<defect>/<stem>_mask.png``: ``defective`` crops (split
  evenly over the defect types) with one defect each:

  - ``patch``: a disc of the same texture from elsewhere, rotated by 45 to 135 degrees, pasted
    in (a foreign piece of the same material);
  - ``scratch``: a thin bright or dark polyline (2 to 4 px wide);
  - ``blob``: an elliptic region blurred and its contrast halved (a smudge or stain).

Images are written at the crop size (RGB PNG, the gray replicated); loaders resize them.

    python bench/photo_sets.py [ROOT] [--sets brick,grass,gravel] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

DEFAULT_ROOT = Path("~/.cache/anomaly-sweep/photo-sets").expanduser()
TEXTURES = ("brick", "grass", "gravel")
DEFECTS = ("patch", "scratch", "blob")
VERSION = 1
"""Bumped when the generator changes, so that a cached set is rebuilt."""


def texture(name: str) -> np.ndarray:
    """The scikit-image photograph ``name`` as 512 x 512 uint8 gray."""
    import skimage.data

    if name not in TEXTURES:
        raise ValueError(f"unknown texture {name!r}; choose from {', '.join(TEXTURES)}")
    return np.asarray(getattr(skimage.data, name)(), dtype=np.uint8)


def _crop(source: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A jittered random ``size`` x ``size`` crop of ``source``, as float32 0..255."""
    y, x = rng.integers(0, source.shape[0] - size + 1), rng.integers(0, source.shape[1] - size + 1)
    crop = source[y : y + size, x : x + size].astype(np.float32)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    mean = crop.mean()
    crop = (crop - mean) * rng.uniform(0.95, 1.05) + mean + rng.uniform(-6, 6)
    return crop + rng.normal(0.0, 2.0, crop.shape).astype(np.float32)


def _ellipse_mask(size: int, rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    axes = (int(size * rng.uniform(lo, hi)), int(size * rng.uniform(lo, hi)))
    margin = max(axes) + 2
    center = (int(rng.integers(margin, size - margin)), int(rng.integers(margin, size - margin)))
    cv2.ellipse(mask, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return mask.astype(bool)


def _defect(
    kind: str, image: np.ndarray, source: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (float32) with one defect of ``kind``, and its bool mask."""
    size = image.shape[0]
    out = image.copy()
    if kind == "patch":
        mask = _ellipse_mask(size, rng, 0.08, 0.16)
        piece = _crop(source, size, rng)
        angle = float(rng.uniform(45, 135))
        rotation = cv2.getRotationMatrix2D((size / 2, size / 2), angle, 1.0)
        piece = cv2.warpAffine(piece, rotation, (size, size), borderMode=cv2.BORDER_REFLECT)
        out[mask] = piece[mask]
    elif kind == "scratch":
        layer = np.zeros((size, size), np.uint8)
        points = [rng.uniform(0.15, 0.85, 2) * size]
        heading = rng.uniform(0, 2 * np.pi)
        for _ in range(3):
            heading += rng.uniform(-0.5, 0.5)
            step = size * rng.uniform(0.08, 0.16)
            points.append(points[-1] + step * np.array([np.cos(heading), np.sin(heading)]))
        polyline = np.clip(np.array(points), 2, size - 3).astype(np.int32)
        cv2.polylines(layer, [polyline], False, 1, int(rng.integers(2, 5)), cv2.LINE_AA)
        mask = layer.astype(bool)
        value = 245.0 if rng.random() < 0.5 else 15.0
        out[mask] = 0.3 * out[mask] + 0.7 * value
    elif kind == "blob":
        mask = _ellipse_mask(size, rng, 0.10, 0.18)
        blurred = cv2.GaussianBlur(image, (0, 0), 3.0)
        mean = blurred[mask].mean()
        changed = (blurred - mean) * 0.5 + mean + rng.choice([-25.0, 25.0])
        out[mask] = changed[mask]
    else:
        raise ValueError(f"unknown defect {kind!r}")
    return out, mask


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    gray = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    if not cv2.imwrite(str(path), cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)):
        raise OSError(f"could not write {path}")


def build_set(
    root: Path,
    name: str,
    *,
    seed: int = 0,
    train: int = 80,
    good: int = 20,
    defective: int = 21,
    crop: int = 256,
) -> Path:
    """Write (or reuse) the set of texture ``name`` under ``root``; returns ``root / name``."""
    settings = {
        "version": VERSION,
        "texture": name,
        "seed": seed,
        "train": train,
        "good": good,
        "defective": defective,
        "crop": crop,
    }
    directory = Path(root).expanduser() / name
    marker = directory / "photo_set.json"
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return directory
    if directory.exists():
        import shutil

        shutil.rmtree(directory)
    source = texture(name)
    rng = np.random.default_rng([seed, TEXTURES.index(name)])
    for i in range(train):
        _write(directory / "train" / "good" / f"{i:03d}.png", _crop(source, crop, rng))
    for i in range(good):
        _write(directory / "test" / "good" / f"{i:03d}.png", _crop(source, crop, rng))
    for i in range(defective):
        kind = DEFECTS[i % len(DEFECTS)]
        image, mask = _defect(kind, _crop(source, crop, rng), source, rng)
        _write(directory / "test" / kind / f"{i:03d}.png", image)
        mask_path = directory / "ground_truth" / kind / f"{i:03d}_mask.png"
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(mask_path), mask.astype(np.uint8) * 255)
    marker.write_text(json.dumps(settings))
    return directory


def build_sets(root: Path, names: list[str], seed: int = 0, **kwargs: int) -> Path:
    """Write (or reuse) every set of ``names`` under ``root``; returns ``root``."""
    for name in names:
        build_set(root, name, seed=seed, **kwargs)
    return Path(root).expanduser()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--sets", default=",".join(TEXTURES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = build_sets(args.root, args.sets.split(","), seed=args.seed)
    print(f"photo sets under {root}: {args.sets}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
