"""A texture test set with subtle, local defects, made from a real photograph of gravel.

The toy set of ``toy_defects.py`` is solved by a baseline that learns nothing: each pixel's
distance from the median training image scores its discs and scratches perfectly (image and
pixel AUROC 1.0). This set is built so that such a baseline is near chance, and only a detector
that models the *texture* (what a neighbourhood of gravel looks like) finds the defects.

Source: scikit-image's ``data.gravel()`` (a CC0 photograph, shipped in the installed package),
shrunk to half size so that a 96 px crop holds a few dozen stones, and split into two disjoint
bands: normal training crops come from the top band, test crops (normal and defective) from the
bottom band, so no test image repeats a training one. Every crop is randomly rotated by a
multiple of 90 degrees and maybe mirrored (gravel has no preferred direction).

Every defect replaces the pixels under its mask by *the same values, rearranged*: no pixel is
brighter, darker or more contrasted than the gravel it covers, so a per-pixel intensity check
has nothing to find. What the rearrangement follows (the values are assigned in the rank order
of a "structure" image) makes the defect:

``coarse``   gravel at twice the scale (bigger stones), from the full-size photograph;
``fine``     gravel at 0.4 times the scale (smaller stones);
``blur``     the crop itself, Gaussian-blurred (a smeared spot, restretched to full contrast);
``foreign``  scikit-image's grass photograph (also CC0): blades instead of stones;
``scratch``  a thin (3 px) curved groove across half the crop, lit from one side: the brightest
             covered values line one edge, the darkest the other.

Blob defects are ellipses covering 6-15 % of the image, scratches about 2 %. Images are RGB
uint8 (the gray photograph in three channels, as ``data.transforms.to_rgb`` delivers gray
images); ``TextureSet.train`` and ``.test`` normalise them as the loaders do. Building a set
takes a fraction of a second and writes nothing.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from scipy.spatial import cKDTree

from data.transforms import normalize
from sweep.run.metrics import auroc

SIZE = 96
N_TRAIN = 32
N_TEST_GOOD = 40
N_TEST_BAD = 40
DEFECT_KINDS = ("coarse", "fine", "blur", "foreign", "scratch")
FULL_TO_NORMAL = 0.5
"""Normal gravel is the 512 x 512 photograph shrunk by this factor, so that a crop holds dozens
of stones."""
TRAIN_ROWS = (0, 150)
"""Rows of the half-size (256 x 256) photograph that training crops come from."""
TEST_ROWS = (160, 256)
"""Rows test crops come from: disjoint from the training band (a 10-row gap)."""


@functools.lru_cache(maxsize=1)
def _photographs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gravel at full (512 px) and half scale, and grass at half scale, as float32 gray."""
    import skimage.data

    gravel = skimage.data.gravel().astype(np.float32)
    grass = skimage.data.grass().astype(np.float32)
    normal = (round(gravel.shape[1] * FULL_TO_NORMAL), round(gravel.shape[0] * FULL_TO_NORMAL))
    return (
        cv2.resize(gravel, normal, interpolation=cv2.INTER_AREA),
        gravel,
        cv2.resize(grass, normal, interpolation=cv2.INTER_AREA),
    )


def _crop(
    source: np.ndarray, rows: tuple[int, int], size: int, rng: np.random.Generator
) -> np.ndarray:
    top = rng.integers(rows[0], rows[1] - size + 1)
    left = rng.integers(0, source.shape[1] - size + 1)
    patch = source[top : top + size, left : left + size]
    patch = np.rot90(patch, k=int(rng.integers(4)))
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    return np.ascontiguousarray(patch)


def gravel_crop(rows: tuple[int, int], size: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``size`` x ``size`` float crop of normal gravel from the given rows."""
    return _crop(_photographs()[0], rows, size, rng)


def _scaled_crop(full: np.ndarray, scale: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """A crop of gravel at ``scale`` times the normal one (the full-size photograph shrunk by
    ``FULL_TO_NORMAL``)."""
    extent = round(size / (scale * FULL_TO_NORMAL))
    patch = _crop(full, (0, full.shape[0]), extent, rng)
    if extent == size:
        return patch
    return cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)


def _blob(size: int, rng: np.random.Generator) -> np.ndarray:
    """A random ellipse away from the border: the defect's region."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(0.3 * size, 0.7 * size, size=2)
    a, b = rng.uniform(0.14 * size, 0.22 * size, size=2)
    angle = rng.uniform(0, math.pi)
    u = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
    v = -(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def _rearranged(image: np.ndarray, mask: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``image`` with the pixels under ``mask`` replaced by the same values, rearranged so that
    they rank as ``order`` (the defect's structure) does there.

    The defect then holds exactly the intensities it covers: no pixel is brighter, darker or
    more contrasted than the gravel it replaces, and only the arrangement is anomalous.
    """
    result = image.copy()
    values = np.sort(image[mask])
    # A stable sort of the structure breaks ties by position, which keeps this deterministic.
    ranks = np.argsort(np.argsort(order[mask], kind="stable"), kind="stable")
    result[mask] = values[ranks]
    return result


def _scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin groove across much of the crop, lit from one side: its brightest values line one
    edge and its darkest the other, as light catches a real scratch."""
    size = image.shape[0]
    # A gently curved path: a quadratic Bezier whose control point bends it sideways.
    centre = rng.uniform(0.4 * size, 0.6 * size, size=2)
    angle = rng.uniform(0, math.pi)
    along_axis = np.array([math.cos(angle), math.sin(angle)])
    across_axis = np.array([-along_axis[1], along_axis[0]])
    half_length = rng.uniform(0.25 * size, 0.35 * size)
    bend = rng.uniform(-0.15 * size, 0.15 * size)
    start, end = centre - half_length * along_axis, centre + half_length * along_axis
    control = centre + bend * across_axis
    t = np.linspace(0, 1, 4 * size)[:, None]
    path = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end
    tangent = 2 * (1 - t) * (control - start) + 2 * t * (end - control)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    # Each pixel's offset from its nearest point of the path, split into the distance and
    # the side (along that point's normal).
    yy, xx = np.mgrid[0:size, 0:size]
    pixels = np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float64)
    distance, nearest = cKDTree(path).query(pixels)
    distance = distance.reshape(size, size)
    side = np.einsum("pc,pc->p", pixels - path[nearest], normal[nearest]).reshape(size, size)
    mask = distance <= 1.5
    return _rearranged(image, mask, side), mask


def add_defect(
    image: np.ndarray, kind: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (a float gravel crop) with a defect of ``kind`` (``DEFECT_KINDS``), and the
    defect's mask."""
    _, full, grass = _photographs()
    size = image.shape[0]
    if kind == "scratch":
        return _scratch(image, rng)
    mask = _blob(size, rng)
    if kind == "coarse":
        structure = _scaled_crop(full, 2.0, size, rng)
    elif kind == "fine":
        structure = _scaled_crop(full, 0.4, size, rng)
    elif kind == "blur":
        structure = cv2.GaussianBlur(image, (0, 0), sigmaX=2.0)
    elif kind == "foreign":
        structure = _crop(grass, (0, grass.shape[0]), size, rng)
    else:
        raise ValueError(f"unknown defect kind {kind!r}; known: {', '.join(DEFECT_KINDS)}")
    return _rearranged(image, mask, structure), mask


def make_images(
    n: int,
    rows: tuple[int, int],
    seed: int | np.random.SeedSequence,
    kinds: tuple[str, ...] = (),
    size: int = SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` RGB uint8 ``n x 3 x size x size`` crops and their ``n x size x size`` masks; with
    ``kinds``, image ``i`` carries a defect of kind ``kinds[i % len(kinds)]``."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for i in range(n):
        image = gravel_crop(rows, size, rng)
        mask = np.zeros((size, size), bool)
        if kinds:
            image, mask = add_defect(image, kinds[i % len(kinds)], rng)
        images.append(np.clip(np.round(image), 0, 255).astype(np.uint8))
        masks.append(mask)
    gray = torch.from_numpy(np.stack(images))[:, None]
    return gray.repeat(1, 3, 1, 1), torch.from_numpy(np.stack(masks))


@dataclass(frozen=True)
class TextureSet:
    """Normal training crops and a labelled test set; pixels as uint8, images normalised."""

    train_pixels: torch.Tensor
    test_pixels: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    kinds: tuple[str, ...]
    """The defect kind of each test image ("" for normal ones)."""

    @property
    def train(self) -> torch.Tensor:
        return normalize(self.train_pixels)

    @property
    def test(self) -> torch.Tensor:
        return normalize(self.test_pixels)

    @property
    def size(self) -> int:
        return self.test_pixels.shape[-1]

    def baseline(self) -> Baseline:
        """The median baseline (:func:`median_baseline`) on this set's pixels."""
        return median_baseline(self.train_pixels, self.test_pixels, self.labels, self.masks)


def texture_set(
    seed: int = 0,
    size: int = SIZE,
    n_train: int = N_TRAIN,
    n_good: int = N_TEST_GOOD,
    n_bad: int = N_TEST_BAD,
) -> TextureSet:
    """The texture set for ``seed``: every crop, flip and defect comes from that seed."""
    train_seed, good_seed, bad_seed = np.random.SeedSequence(seed).spawn(3)
    train, _ = make_images(n_train, TRAIN_ROWS, train_seed, size=size)
    good, good_masks = make_images(n_good, TEST_ROWS, good_seed, size=size)
    bad, bad_masks = make_images(n_bad, TEST_ROWS, bad_seed, kinds=DEFECT_KINDS, size=size)
    return TextureSet(
        train_pixels=train,
        test_pixels=torch.cat([good, bad]),
        labels=torch.tensor([0] * n_good + [1] * n_bad),
        masks=torch.cat([good_masks, bad_masks]),
        kinds=("",) * n_good + tuple(DEFECT_KINDS[i % len(DEFECT_KINDS)] for i in range(n_bad)),
    )


@dataclass(frozen=True)
class Baseline:
    """How the naive detector that learns nothing ranks a test set."""

    image_auroc: float
    pixel_auroc: float
    reduction: str
    """"max" or "mean": the image score that gave the baseline its better image AUROC."""


def median_baseline(
    train: torch.Tensor, test: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor
) -> Baseline:
    """Per pixel, the L2 distance over channels of a test image from the per-pixel median of
    the training images; the image score is the max or the mean of that map, whichever ranks
    the test set better (the baseline gets the benefit of the doubt).

    ``train`` and ``test`` are ``N x 3 x H x W`` images, as pixels or normalised (the distance
    is computed in whatever scale they come in).
    """
    median = train.double().median(dim=0).values
    distance = (test.double() - median).pow(2).sum(dim=1).sqrt()
    by_reduction = {
        "max": auroc(labels, distance.flatten(1).max(dim=1).values),
        "mean": auroc(labels, distance.flatten(1).mean(dim=1)),
    }
    reduction = max(by_reduction, key=by_reduction.__getitem__)
    return Baseline(by_reduction[reduction], auroc(masks, distance), reduction)
