"""Building blocks of EfficientAD (Batzner et al., "EfficientAD: Accurate Visual Anomaly Detection
at Millisecond-Level Latencies", WACV 2024), shared by ``efficient_ad`` and ``efficient_ad_ast``.

- :func:`patch_description_network`: the paper's small and medium patch description networks
  (PDN), four or six convolutions with a 33 x 33 receptive field, used as teacher and student.
- :class:`ImageAutoencoder`: the paper's convolutional autoencoder, whose 1 x 1 bottleneck has
  to encode the whole image and so learns the logical constraints of normal images.
- :func:`hard_feature_loss`: the student's loss restricted to its worst-predicted elements.
- :class:`PenaltyImages`: images from a local folder (ImageNet in the paper) on which the
  student's output is pulled to zero, so that it does not generalise beyond the normal images.
- :func:`color_jitter`: the autoencoder's training augmentation.
- :func:`quantile` and :func:`image_fingerprints`: helpers for the map normalisation on held-out
  training images.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_rgb
from models.backbones import state_dict_problems
from models.errors import ModelError

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageAutoencoder",
    "PenaltyImages",
    "color_jitter",
    "hard_feature_loss",
    "image_fingerprints",
    "load_pdn_weights",
    "patch_description_network",
    "quantile",
]

ModelSize = Literal["small", "medium"]


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
"""File name endings (any case) that :class:`PenaltyImages` reads from its folder."""


def patch_description_network(
    model_size: ModelSize, out_channels: int, padding: bool = False
) -> nn.Sequential:
    """The paper's PDN (Tables 6 and 7): four (small) or six (medium) convolutions.

    Every output feature describes one 33 x 33 input patch. With ``padding`` the convolutions
    and poolings are zero-padded as the paper's tables list, and the output is a quarter of the
    input size (64 x 64 for 256 px); without it (the official code's and anomalib's default)
    it is ``(size - 32) / 4`` (56 x 56). The modules form one ``nn.Sequential`` in the paper's
    order, so state dicts of the official implementation (keys ``0.weight``, ``3.weight``, ...)
    load as they are; :func:`load_pdn_weights` also reads ``conv1.weight``-style keys.
    """
    p = 1 if padding else 0
    if model_size == "small":
        return nn.Sequential(
            nn.Conv2d(3, 128, 4, padding=3 * p),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2, 2, padding=p),
            nn.Conv2d(128, 256, 4, padding=3 * p),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2, 2, padding=p),
            nn.Conv2d(256, 256, 3, padding=p),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, out_channels, 4),
        )
    if model_size == "medium":
        return nn.Sequential(
            nn.Conv2d(3, 256, 4, padding=3 * p),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2, 2, padding=p),
            nn.Conv2d(256, 512, 4, padding=3 * p),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2, 2, padding=p),
            nn.Conv2d(512, 512, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(512, 512, 3, padding=p),
            nn.ReLU(inplace=True),
            nn.Conv2d(512, out_channels, 4),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 1),
        )
    raise ValueError(f"model_size must be 'small' or 'medium', got {model_size!r}")


def load_pdn_weights(network: nn.Sequential, state: Mapping[str, Tensor], source: str) -> None:
    """Load a PDN state dict into ``network``.

    Keys may be the ``nn.Sequential`` indices (``0.weight``, the official implementation) or
    ``conv1.weight`` .. ``convN.weight`` numbered in layer order (anomalib); a ``teacher.``,
    ``module.`` or ``model.`` prefix common to all keys is dropped.
    """
    state = dict(state)
    for prefix in ("module.", "teacher.", "model."):
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}
    own = network.state_dict()
    if not set(own) <= set(state):
        conv_indices = [i for i, m in enumerate(network) if isinstance(m, nn.Conv2d)]
        renamed = {}
        for number, index in enumerate(conv_indices, start=1):
            for kind in ("weight", "bias"):
                key = f"conv{number}.{kind}"
                if key in state:
                    renamed[f"{index}.{kind}"] = state[key]
        if set(own) <= set(renamed):
            state = renamed
    problem = state_dict_problems(own, state)
    if problem is not None:
        raise ModelError(f"{source} does not hold this PDN's weights ({problem})")
    if any(p.is_meta for p in network.parameters()):
        return  # built for shapes only (a study's validation): checked, nothing to copy
    network.load_state_dict({key: state[key].float() for key in own})


class ImageAutoencoder(nn.Module):
    """EfficientAD's autoencoder (the paper's Table 8): images to a 1 x 1 code and back to the
    teacher's feature map.

    Five stride-2 4 x 4 convolutions and an 8 x 8 one encode a 256 px image into 64 numbers;
    the decoder alternates bilinear resizing (to 3, 8, 15, 32, 63 and 127 px for a 256 px input,
    scaled with other sizes) with 4 x 4 convolutions and dropout, resizes to the teacher's
    output size and ends with two 3 x 3 convolutions. The parameters do not depend on the image
    size: where the fifth encoder stage is not 8 x 8 (any size but 256 px) it is resized to
    8 x 8 before the last encoder convolution, so the bottleneck stays a single global code.

    Args:
        out_channels: channels of the reconstructed feature map (the teacher's).
        dropout: dropout probability after every decoder convolution but the last two.
    """

    _CODE_GRID = 8

    def __init__(self, out_channels: int = 384, dropout: float = 0.2) -> None:
        super().__init__()
        self.encoder = nn.ModuleList(
            [
                nn.Conv2d(3, 32, 4, stride=2, padding=1),
                nn.Conv2d(32, 32, 4, stride=2, padding=1),
                nn.Conv2d(32, 64, 4, stride=2, padding=1),
                nn.Conv2d(64, 64, 4, stride=2, padding=1),
                nn.Conv2d(64, 64, 4, stride=2, padding=1),
            ]
        )
        self.bottleneck = nn.Conv2d(64, 64, self._CODE_GRID)
        self.decoder = nn.ModuleList([nn.Conv2d(64, 64, 4, padding=2) for _ in range(6)])
        self.head = nn.Sequential(
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, out_channels, 3, padding=1),
        )
        self.dropout = nn.Dropout(dropout)

    @staticmethod
    def decoder_sizes(size: int) -> list[int]:
        """Intermediate decoder sizes for one image side (the paper's for 256 px)."""
        sizes = [
            size // 64 - 1,
            size // 32,
            size // 16 - 1,
            size // 8,
            size // 4 - 1,
            size // 2 - 1,
        ]
        return [max(1, s) for s in sizes]

    def forward(self, images: Tensor, output_size: Sequence[int]) -> Tensor:
        height, width = images.shape[-2:]
        x = images
        for conv in self.encoder:
            x = F.relu(conv(x))
        x = self.bottleneck(_resize(x, (self._CODE_GRID, self._CODE_GRID)))
        for conv, h, w in zip(
            self.decoder, self.decoder_sizes(height), self.decoder_sizes(width), strict=True
        ):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
            x = self.dropout(F.relu(conv(x)))
        x = F.interpolate(x, size=tuple(output_size), mode="bilinear", align_corners=False)
        return self.head(x)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        # Shrinking: average, so that every position of the larger grid contributes.
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def quantile(values: Tensor, q: float) -> Tensor:
    """The ``q`` quantile of all elements (linear interpolation, as ``torch.quantile``), for
    tensors of any size (``torch.quantile`` stops at 2**24 elements)."""
    flat = values.reshape(-1)
    n = flat.numel()
    position = q * (n - 1)
    low = math.floor(position)
    high = min(low + 1, n - 1)
    low_value = flat.kthvalue(low + 1).values
    if high == low:
        return low_value
    high_value = flat.kthvalue(high + 1).values
    return low_value + (position - low) * (high_value - low_value)


def hard_feature_loss(difference: Tensor, hard_quantile: float) -> Tensor:
    """Mean of the squared differences at or above their ``hard_quantile`` quantile.

    The student then learns only where it imitates the teacher worst (the paper's hard feature
    loss): it matches the teacher on normal images without spending its capacity on features it
    already gets right, which would make it generalise to anomalies too.
    """
    threshold = quantile(difference.detach(), hard_quantile)
    return difference[difference >= threshold].mean()


def color_jitter(images: Tensor, generator: torch.Generator) -> Tensor:
    """The autoencoder's augmentation: per image, one of brightness, contrast or saturation
    (chosen at random) changed by a factor drawn uniformly from [0.8, 1.2].

    ``images`` are ImageNet-normalised; the change is made on the [0, 1] pixels and the result
    normalised again. Randomness comes only from ``generator`` (a CPU generator).
    """
    n = images.shape[0]
    kinds = torch.randint(3, (n,), generator=generator).to(images.device)
    factors = (0.8 + 0.4 * torch.rand(n, generator=generator)).to(images)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    pixels = (images * std + mean).clamp(0, 1)
    gray = (0.299 * pixels[:, 0] + 0.587 * pixels[:, 1] + 0.114 * pixels[:, 2]).unsqueeze(1)
    f = factors.view(n, 1, 1, 1)
    brightness = pixels * f
    contrast = (pixels - gray.mean((2, 3), keepdim=True)) * f + gray.mean((2, 3), keepdim=True)
    saturation = (pixels - gray) * f + gray
    k = kinds.view(n, 1, 1, 1)
    out = torch.where(k == 0, brightness, torch.where(k == 1, contrast, saturation)).clamp(0, 1)
    return (out - mean) / std


class PenaltyImages:
    """Images of a local folder for the student's penalty (the paper uses ImageNet).

    Each draw picks a file at random, resizes it to twice the training size, turns it gray with
    probability 0.3 and keeps the central training-sized window, as the official
    implementation does; the result is ImageNet-normalised like the training images.

    Args:
        folder: a folder searched recursively for :data:`IMAGE_SUFFIXES` files.
        seed: seeds every random choice.
        owner: the detector's name, for error messages.
    """

    def __init__(self, folder: str | Path, seed: int, owner: str) -> None:
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise ModelError(f"{owner}: imagenet_dir {str(root)!r} is not a folder")
        self.files = sorted(
            p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not self.files:
            raise ModelError(
                f"{owner}: imagenet_dir {str(root)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})"
            )
        self.rng = np.random.default_rng(seed)
        self.owner = owner

    def sample(self, n: int, size: Sequence[int], device: torch.device) -> Tensor:
        """``n x 3 x H x W`` normalised images (``size = (H, W)``)."""
        height, width = int(size[0]), int(size[1])
        out = np.empty((n, height, width, 3), dtype=np.float32)
        for i in range(n):
            path = self.files[int(self.rng.integers(len(self.files)))]
            raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if raw is None:
                raise ModelError(f"{self.owner}: could not read penalty image {str(path)!r}")
            rgb = to_rgb(raw)
            shrinking = rgb.shape[0] * rgb.shape[1] >= 4 * height * width
            interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
            image = cv2.resize(rgb, (2 * width, 2 * height), interpolation=interpolation)
            image = image.astype(np.float32) / 255.0
            if self.rng.random() < 0.3:
                gray = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
                image = np.repeat(gray[:, :, None], 3, axis=2)
            top, left = height // 2, width // 2
            out[i] = image[top : top + height, left : left + width]
        pixels = torch.from_numpy(out).permute(0, 3, 1, 2)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return ((pixels - mean) / std).to(device)


def image_fingerprints(images: Tensor) -> list[str]:
    """A content hash per image, so that held-out training images are recognised in every epoch
    whatever order (or batching) the caller delivers them in."""
    data = images.detach().float().cpu().contiguous().numpy()
    return [hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest() for image in data]
