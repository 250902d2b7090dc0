"""A tiny generated image set with large, obvious defects, shared by every detector's tests.

Normal images are a periodic texture crossed by a darker band (a glue line), shifted by up to two
pixels per image, with mild noise; anomalous ones add a bright disc or a dark scratch. Images are
normalised with ImageNet-like statistics, as the data loaders deliver them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

SIZE = 64
N_TRAIN = 16
N_TEST_EACH = 8


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    """A normal image: the periodic texture and the darker band, shifted by up to two pixels,
    with mild noise."""
    dx, dy = rng.uniform(-2, 2, size=2)
    image = 0.5 + 0.2 * np.sin(2 * math.pi * (xx + dx) / 8) * np.sin(2 * math.pi * (yy + dy) / 8)
    band = np.abs(yy + dy - size / 2) < size / 6
    return np.where(band, 0.6 * image + 0.25, image) + rng.normal(0, 0.03, image.shape)


def make_images(
    n: int, anomalous: bool, seed: int, size: int = SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` normalised 3 x size x size images and their ``n x size x size`` defect masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images, masks = [], []
    for _ in range(n):
        image = _background(rng, yy, xx, size)
        mask = np.zeros_like(image, dtype=bool)
        if anomalous:
            cy, cx = rng.uniform(size * 0.25, size * 0.75, size=2)
            if rng.random() < 0.5:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 < (size / 8) ** 2
                image = np.where(mask, 1.0, image)
            else:
                angle = rng.uniform(0, math.pi)
                across = np.abs((xx - cx) * math.sin(angle) - (yy - cy) * math.cos(angle))
                along = np.abs((xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle))
                mask = (across < 2.0) & (along < size / 3)
                image = np.where(mask, 0.0, image)
        images.append(image.astype(np.float32))
        masks.append(mask)
    gray = torch.from_numpy(np.stack(images))[:, None]
    return ((gray - 0.45) / 0.225).repeat(1, 3, 1, 1), torch.from_numpy(np.stack(masks))


@dataclass(frozen=True)
class ToySet:
    train: torch.Tensor
    test: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor

    @property
    def size(self) -> int:
        return self.test.shape[-1]


def toy_set(size: int = SIZE, n_train: int = N_TRAIN, n_test_each: int = N_TEST_EACH) -> ToySet:
    """Training images (normal only) and a balanced test set with masks."""
    train, _ = make_images(n_train, anomalous=False, seed=0, size=size)
    good, good_masks = make_images(n_test_each, anomalous=False, seed=1, size=size)
    bad, bad_masks = make_images(n_test_each, anomalous=True, seed=2, size=size)
    return ToySet(
        train=train,
        test=torch.cat([good, bad]),
        labels=torch.tensor([0] * n_test_each + [1] * n_test_each),
        masks=torch.cat([good_masks, bad_masks]),
    )


def batches(images: torch.Tensor, size: int = 8) -> list[torch.Tensor]:
    return [images[i : i + size] for i in range(0, len(images), size)]


def image_auroc(toy: ToySet, scores: torch.Tensor) -> float:
    return float(roc_auc_score(toy.labels.numpy(), scores.detach().double().numpy()))


def pixel_auroc(toy: ToySet, maps: torch.Tensor) -> float:
    return float(
        roc_auc_score(toy.masks.flatten().numpy(), maps.detach().double().flatten().numpy())
    )


def check_prediction(toy: ToySet, prediction, localizes: bool) -> None:
    """Shapes and finiteness every detector must satisfy on the toy test set."""
    n = len(toy.test)
    assert prediction.score.shape == (n,)
    assert torch.isfinite(prediction.score).all()
    if localizes:
        assert prediction.anomaly_map is not None
        assert prediction.anomaly_map.shape == (n, toy.size, toy.size)
        assert torch.isfinite(prediction.anomaly_map).all()
    else:
        assert prediction.anomaly_map is None


def make_look_alike_images(
    n: int, anomalous: bool, seed: int, size: int = SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Defects that look like the normal variation: every image, normal or not, is the texture
    of :func:`make_images` with one flat disc. A normal disc is dark (0 to 0.42) or bright
    (0.58 to 1); a defect's is mid-gray (0.45 to 0.55), which lies between the normal ones.

    A model of normal images alone sees a disc of an in-between gray as nothing new (PaDiM's
    Gaussians even score it below the normal discs); labels say which gray is the defect: the
    case where labelled defects buy what no amount of normal images can.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images, masks = [], []
    for _ in range(n):
        image = _background(rng, yy, xx, size)
        cy, cx = rng.uniform(size * 0.25, size * 0.75, size=2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < (size / 8) ** 2
        if anomalous:
            value = rng.uniform(0.45, 0.55)
        else:
            value = rng.uniform(0.0, 0.42) if rng.random() < 0.5 else rng.uniform(0.58, 1.0)
        images.append(np.where(disc, value, image).astype(np.float32))
        masks.append(disc if anomalous else np.zeros_like(disc))
    gray = torch.from_numpy(np.stack(images))[:, None]
    return ((gray - 0.45) / 0.225).repeat(1, 3, 1, 1), torch.from_numpy(np.stack(masks))
