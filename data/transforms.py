"""Pixel transforms shared by the loaders: channel handling, resizing, aspect handling,
normalisation.

:func:`prepare` is the whole geometric and ROI preprocessing of one decoded image, as the
loaders apply it; anything that scores new images (an exported model) calls it the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

__all__ = [
    "BIT_DEPTHS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RESIZE_MODES",
    "as_shape",
    "aspect_window",
    "fit_aspect",
    "frame_mask",
    "infer_bit_depth",
    "normalize",
    "prepare",
    "prepare_mask",
    "resize_image",
    "resize_mask",
    "to_rgb",
    "to_source",
]

RESIZE_MODES = ("stretch", "pad", "crop")
"""How an image reaches a target shape of another aspect ratio: ``stretch`` resizes it as it is
(the aspect changes), ``pad`` letterboxes it (a constant border, centred), ``crop`` cuts the
centre to the target's aspect. Pad and crop then resize with the aspect kept."""

Shape = tuple[int, int]
"""(height, width) in pixels."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""The statistics images are normalised with when they reach a detector; the one definition
(models reads them from here: data is the layer below it)."""


BIT_DEPTHS = (8, 10, 12, 14, 16)
"""The bit depths the data in a 16-bit image file can have (``dataset.bit_depth``)."""


def infer_bit_depth(peak: int) -> int:
    """The bit depth of 16-bit image data whose largest value is ``peak``: the smallest of 10,
    12, 14 and 16 bits that holds it (cameras write 10-, 12- and 14-bit data in 16-bit files;
    8-bit data in a 16-bit file is not guessed: it reads as 10-bit unless set)."""
    for depth in BIT_DEPTHS[1:]:
        if peak <= 2**depth - 1:
            return depth
    return BIT_DEPTHS[-1]


def to_rgb(image: np.ndarray, bit_depth: int | None = None) -> np.ndarray:
    """An OpenCV-decoded image (H x W gray, H x W x 1, BGR or BGRA; 8 or 16 bit) as H x W x 3
    uint8 RGB. Gray is replicated to three channels, so that ImageNet backbones see it as the
    gray colour it is.

    A 16-bit image holds ``bit_depth``-bit data (default 16): its top 8 of those bits are kept,
    so 0..2**bit_depth - 1 maps onto 0..255; larger values saturate at 255. 8-bit images are
    taken as they are whatever ``bit_depth`` says."""
    if image.dtype == np.uint16:
        depth = BIT_DEPTHS[-1] if bit_depth is None else bit_depth
        if depth not in BIT_DEPTHS:
            raise ValueError(f"bit_depth: expected one of {BIT_DEPTHS}, got {bit_depth!r}")
        # A shift, not a multiply: at 16 bits it is the top byte exactly, as always read.
        image = np.minimum(image >> (depth - 8), 255).astype(np.uint8)
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


def as_shape(size: int | Sequence[int]) -> Shape:
    """``size`` (a side, or ``(height, width)``) as ``(height, width)``."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    height, width = size
    return int(height), int(width)


def resize_image(image: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """``image`` resized to ``size`` (a side, or ``(height, width)``): area averaging when
    shrinking (no aliasing of fine structure such as a thin glue bead), bilinear when
    enlarging."""
    height, width = as_shape(size)
    if image.shape[0] == height and image.shape[1] == width:
        return image
    shrinking = image.shape[0] * image.shape[1] >= height * width
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


def resize_mask(mask: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """A binary mask (H x W, nonzero = anomalous) resized to ``size`` (a side, or ``(height,
    width)``) as bool.

    A pixel of the result is anomalous when at least half of the area it covers is. A defect
    smaller than half an output pixel would vanish that way and leave an anomalous image with
    an empty mask, so in that case every output pixel the defect touches is kept instead.
    """
    shape = as_shape(size)
    binary = (mask > 0).astype(np.float32)
    if binary.shape[:2] == shape:
        return binary > 0
    coverage = resize_image(binary, shape)
    resized = coverage >= 0.5
    if not resized.any() and binary.any():
        resized = coverage > 0
    return resized


def aspect_window(
    source: Sequence[int], shape: Sequence[int], resize: str = "stretch"
) -> tuple[int, int, int, int, int, int]:
    """Where a ``source`` (height, width) image lies once brought to ``shape``'s aspect ratio
    by ``resize``, before resizing: ``(canvas_h, canvas_w, top, left, height, width)``, the
    canvas that is then resized to ``shape`` and, in canvas pixels for ``pad`` (the image
    inside its border) or in source pixels for ``crop`` (the part of the image kept), the
    window at ``top, left`` of ``height x width``."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize: expected one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    height, width = as_shape(source)
    target_h, target_w = as_shape(shape)
    # Integer cross-multiplication: which side is too long for the target's aspect.
    too_wide = width * target_h > target_w * height
    if resize == "stretch":
        return height, width, 0, 0, height, width
    if resize == "crop":
        if too_wide:
            keep = max(1, round(height * target_w / target_h))
            return height, keep, 0, (width - keep) // 2, height, keep
        keep = max(1, round(width * target_h / target_w))
        return keep, width, (height - keep) // 2, 0, keep, width
    if too_wide:
        grow = max(0, round(width * target_h / target_w) - height)
        return height + grow, width, grow // 2, 0, height, width
    grow = max(0, round(height * target_w / target_h) - width)
    return height, width + grow, 0, grow // 2, height, width


def fit_aspect(image: np.ndarray, shape: Sequence[int], resize: str = "stretch") -> np.ndarray:
    """``image`` (H x W or H x W x C) brought to the aspect ratio of ``shape`` (height, width)
    at its own scale, before any resizing: unchanged for ``stretch`` (and when the aspects
    already agree to the pixel), centred zero borders for ``pad``, its centre for ``crop``."""
    canvas_h, canvas_w, top, left, height, width = aspect_window(image.shape[:2], shape, resize)
    if resize == "crop":
        return image[top : top + height, left : left + width]
    if (canvas_h, canvas_w) == image.shape[:2]:
        return image
    borders = (top, canvas_h - height - top, left, canvas_w - width - left)
    return cv2.copyMakeBorder(image, *borders, cv2.BORDER_CONSTANT, value=0)


def to_source(
    values: np.ndarray, source: Sequence[int], resize: str = "stretch", fill: float | None = None
) -> np.ndarray:
    """A prepared image's per-pixel ``values`` (H x W, e.g. an anomaly map) brought back onto
    the ``source`` (height, width) image it was prepared from: the letterbox border of ``pad``
    dropped, what ``crop`` cut away filled with ``fill`` (default: the minimum of ``values``).
    Bilinear, as maps are upsampled."""
    canvas_h, canvas_w, top, left, height, width = aspect_window(source, values.shape[:2], resize)
    canvas = cv2.resize(
        np.asarray(values, np.float32), (canvas_w, canvas_h), interpolation=cv2.INTER_LINEAR
    )
    if resize == "pad":
        return canvas[top : top + height, left : left + width]
    if resize == "stretch":
        return canvas
    out = np.full(as_shape(source), values.min() if fill is None else fill, np.float32)
    out[top : top + height, left : left + width] = canvas
    return out


def prepare_mask(mask: np.ndarray, shape: Sequence[int], resize: str = "stretch") -> np.ndarray:
    """A mask (H x W, nonzero = set) as ``prepare`` brings its image to ``shape``: bool, the
    padding of ``pad`` unset."""
    binary = (np.asarray(mask) > 0).astype(np.uint8)
    return resize_mask(fit_aspect(binary, shape, resize), shape)


def frame_mask(source: Sequence[int], shape: Sequence[int], resize: str = "stretch") -> np.ndarray:
    """Which pixels of a ``source`` (height, width) image prepared to ``shape`` show the image:
    all of them but the letterbox border of ``pad``."""
    return prepare_mask(np.ones(as_shape(source), np.uint8), shape, resize)


def prepare(
    rgb: np.ndarray,
    shape: int | Sequence[int],
    resize: str = "stretch",
    roi: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One decoded RGB image (H x W x 3 uint8, see :func:`to_rgb`) as a detector sees it:
    pixels outside ``roi`` (an H x W mask of the source, nonzero = inside) set to 0, brought to
    ``shape``'s aspect by ``resize`` and resized to ``shape``. Returns ``(pixels, valid)``:
    ``shape`` x 3 uint8, and which of its pixels count for evaluation (inside the ROI and not
    padding; None when all do).

    The loaders prepare every image this way; an exported model scoring new images calls it
    with the same ``shape``, ``resize`` and ROI, then :func:`normalize`.
    """
    shape = as_shape(shape)
    if roi is not None:
        if roi.shape[:2] != rgb.shape[:2]:
            raise ValueError(
                f"roi: mask is {roi.shape[1]}x{roi.shape[0]} (W x H) but the image is "
                f"{rgb.shape[1]}x{rgb.shape[0]}"
            )
        # The sealant study's binary masking: the detector never sees outside the ROI, in
        # training or at test, so its own image score is the ROI's.
        rgb = rgb * (roi > 0)[:, :, None].astype(rgb.dtype)
    pixels = resize_image(fit_aspect(rgb, shape, resize), shape)
    valid = frame_mask(rgb.shape[:2], shape, resize) if resize == "pad" else None
    if roi is not None:
        inside = prepare_mask(roi, shape, resize)
        valid = inside if valid is None else valid & inside
    if valid is not None and valid.all():
        valid = None
    return pixels, valid


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
