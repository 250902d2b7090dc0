"""Pixel transforms shared by the loaders: channel handling, resizing, normalisation."""

from __future__ import annotations

import cv2
import numpy as np
import torch

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "normalize",
    "resize_image",
    "resize_mask",
    "to_rgb",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""The statistics images are normalised with when they reach a detector; the one definition
(models reads them from here: data is the layer below it)."""


def to_rgb(image: np.ndarray) -> np.ndarray:
    """An OpenCV-decoded image (H x W gray, H x W x 1, BGR or BGRA; 8 or 16 bit) as H x W x 3
    uint8 RGB. Gray is replicated to three channels, so that ImageNet backbones see it as the
    gray colour it is."""
    if image.dtype == np.uint16:
        # 16-bit industrial images: keep the top 8 bits (a 0..65535 -> 0..255 rescale).
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise TypeError(f"expected 8- or 16-bit pixels, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    raise TypeError(f"expected 1, 3 or 4 channels, got shape {image.shape}")


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` resized to ``size`` x ``size``: area averaging when shrinking (no aliasing of
    fine structure such as a thin glue bead), bilinear when enlarging."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    shrinking = image.shape[0] * image.shape[1] >= size * size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A binary mask (H x W, nonzero = anomalous) resized to ``size`` x ``size`` as bool.

    A pixel of the result is anomalous when at least half of the area it covers is. A defect
    smaller than half an output pixel would vanish that way and leave an anomalous image with
    an empty mask, so in that case every output pixel the defect touches is kept instead.
    """
    binary = (mask > 0).astype(np.float32)
    if binary.shape[0] == size and binary.shape[1] == size:
        return binary > 0
    coverage = resize_image(binary, size)
    resized = coverage >= 0.5
    if not resized.any() and binary.any():
        resized = coverage > 0
    return resized


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 N x 3 x H x W RGB (or 3 x H x W) to float32 with ImageNet's mean and std."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {pixels.dtype}")
    if pixels.ndim not in (3, 4) or pixels.shape[-3] != 3:
        raise ValueError(f"expected (N x) 3 x H x W pixels, got shape {tuple(pixels.shape)}")
    shape = (3, 1, 1)
    # (x / 255 - mean) / std as one multiply-add: x * scale + bias.
    scale = torch.tensor([1.0 / (255.0 * s) for s in IMAGENET_STD]).view(shape)
    bias = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    return torch.addcmul(bias.view(shape), pixels.float(), scale)
