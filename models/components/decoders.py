"""ResNet building blocks run forwards and in reverse, for detectors that decode CNN features.

Reverse distillation (Deng & Li, CVPR 2022) trains a "de-ResNet": a decoder that mirrors a ResNet
encoder with the same block type and widths, where the first block of every stage doubles the
resolution with a 2x2 transposed convolution instead of halving it with a strided convolution.
This module knows the block layout of the torchvision/timm ResNet family
(:data:`RESNET_ARCHS`) and builds, for any of them, the encoder-direction stage that one-class
bottlenecks need (:class:`ResNetStage`) and the decoder (:class:`ResNetDecoder`) that goes from a
stride-32 embedding back to the ``layer3``, ``layer2`` and ``layer1`` maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "RESNET_ARCHS",
    "ResNetArch",
    "ResNetDecoder",
    "ResNetStage",
    "ResidualBlock",
    "init_conv_weights",
]

Resample = Literal["none", "down", "up"]


@dataclass(frozen=True)
class ResNetArch:
    """The block layout of a ResNet-family encoder."""

    block: Literal["basic", "bottleneck"]
    """``"basic"`` (two 3x3 convolutions, ResNet18/34) or ``"bottleneck"`` (1x1-3x3-1x1)."""
    depths: tuple[int, int, int, int]
    """Blocks in ``layer1`` .. ``layer4``."""
    groups: int = 1
    """Groups of the 3x3 convolution of a bottleneck (ResNeXt's cardinality)."""
    width_per_group: int = 64
    """Channels per group of the bottleneck's 3x3 convolution at ``planes == 64`` (128 for
    WideResNets, 4 or 8 for ResNeXts)."""

    @property
    def expansion(self) -> int:
        """Output channels of a block per ``planes``."""
        return 1 if self.block == "basic" else 4

    def planes(self, stage: int) -> int:
        """``planes`` of stage ``stage`` (1..4): 64, 128, 256, 512."""
        return 64 * 2 ** (stage - 1)

    def channels(self, stage: int) -> int:
        """Output channels of stage ``stage`` (1..4), e.g. 256 for ``layer1`` of ResNet50."""
        return self.planes(stage) * self.expansion

    def width(self, planes: int) -> int:
        """Channels inside a bottleneck with ``planes``."""
        return int(planes * self.width_per_group / 64) * self.groups


RESNET_ARCHS: dict[str, ResNetArch] = {
    "resnet18": ResNetArch("basic", (2, 2, 2, 2)),
    "resnet34": ResNetArch("basic", (3, 4, 6, 3)),
    "resnet50": ResNetArch("bottleneck", (3, 4, 6, 3)),
    "resnet101": ResNetArch("bottleneck", (3, 4, 23, 3)),
    "resnet152": ResNetArch("bottleneck", (3, 8, 36, 3)),
    "wide_resnet50_2": ResNetArch("bottleneck", (3, 4, 6, 3), width_per_group=128),
    "wide_resnet101_2": ResNetArch("bottleneck", (3, 4, 23, 3), width_per_group=128),
    "resnext50_32x4d": ResNetArch("bottleneck", (3, 4, 6, 3), groups=32, width_per_group=4),
    "resnext101_32x8d": ResNetArch("bottleneck", (3, 4, 23, 3), groups=32, width_per_group=8),
    "resnext101_64x4d": ResNetArch("bottleneck", (3, 4, 23, 3), groups=64, width_per_group=4),
}
"""Block layouts by backbone name (the names of ``models.backbones``)."""


def _resampling_conv(
    in_channels: int, out_channels: int, resample: Resample, groups: int = 1
) -> nn.Module:
    # The spatial convolution of a block: 3x3 (strided when going down), or a 2x2 transposed
    # convolution with stride 2 when going up, which exactly doubles the grid.
    if resample == "up":
        return nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2, groups=groups, bias=False)
    stride = 2 if resample == "down" else 1
    return nn.Conv2d(
        in_channels, out_channels, 3, stride=stride, padding=1, groups=groups, bias=False
    )


class ResidualBlock(nn.Module):
    """A ResNet block (basic or bottleneck) that keeps, halves or doubles the resolution.

    Args:
        arch: block type and bottleneck widths.
        in_channels: input channels.
        planes: the block's ``planes``; it outputs ``planes * arch.expansion`` channels.
        resample: ``"none"``, ``"down"`` (stride 2, as the first block of an encoder stage) or
            ``"up"`` (2x2 transposed convolution, as the first block of a decoder stage).
    """

    def __init__(self, arch: ResNetArch, in_channels: int, planes: int, resample: Resample):
        super().__init__()
        out_channels = planes * arch.expansion
        if arch.block == "basic":
            layers = [
                _resampling_conv(in_channels, planes, resample),
                nn.BatchNorm2d(planes),
                nn.ReLU(inplace=True),
                nn.Conv2d(planes, planes, 3, padding=1, bias=False),
                nn.BatchNorm2d(planes),
            ]
        else:
            width = arch.width(planes)
            layers = [
                nn.Conv2d(in_channels, width, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                _resampling_conv(width, width, resample, groups=arch.groups),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, out_channels, 1, bias=False),
                nn.BatchNorm2d(out_channels),
            ]
        self.body = nn.Sequential(*layers)
        self.shortcut: nn.Module = nn.Identity()
        if resample != "none" or in_channels != out_channels:
            if resample == "up":
                projection = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2, bias=False)
            else:
                stride = 2 if resample == "down" else 1
                projection = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            self.shortcut = nn.Sequential(projection, nn.BatchNorm2d(out_channels))
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNetStage(nn.Module):
    """``depth`` residual blocks; the first one resamples (and projects the shortcut).

    Args:
        arch: block type and widths.
        in_channels: input channels.
        planes: ``planes`` of every block (output: ``planes * arch.expansion`` channels).
        depth: number of blocks.
        resample: what the first block does to the resolution (see :class:`ResidualBlock`).

    ``forward(x, size)`` crops the first block's output to ``size`` (rows, columns) when given:
    going up doubles the grid, which is one row or column too many wherever the encoder's
    stride-2 convolution rounded an odd size up.
    """

    def __init__(
        self, arch: ResNetArch, in_channels: int, planes: int, depth: int, resample: Resample
    ):
        super().__init__()
        blocks = [ResidualBlock(arch, in_channels, planes, resample)]
        channels = blocks[0].out_channels
        blocks += [ResidualBlock(arch, channels, planes, "none") for _ in range(depth - 1)]
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = channels

    def forward(self, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
        x = self.blocks[0](x)
        if size is not None:
            x = x[..., : size[0], : size[1]]
        for block in self.blocks[1:]:
            x = block(x)
        return x


class ResNetDecoder(nn.Module):
    """The student "de-ResNet" of reverse distillation: embedding -> ``layer3``..``layer1`` maps.

    Three up-sampling stages turn the ``arch.channels(4)``-channel stride-32 embedding into maps
    shaped like the encoder's ``layer3`` (stride 16), ``layer2`` (8) and ``layer1`` (4) outputs.
    Following the authors' implementation (and anomalib's), the stages producing the ``layer3``,
    ``layer2`` and ``layer1`` shapes have ``depths[0]``, ``depths[1]`` and ``depths[2]`` blocks
    (all equal for ResNet18, 3/4/6 for the 50-layer networks).

    Args:
        arch: the encoder's block layout.
    """

    def __init__(self, arch: ResNetArch):
        super().__init__()
        self.arch = arch
        stages = {}
        channels = arch.channels(4)
        for depth, stage in zip(arch.depths[:3], (3, 2, 1), strict=True):
            stages[f"layer{stage}"] = ResNetStage(
                arch, channels, arch.planes(stage), depth, resample="up"
            )
            channels = stages[f"layer{stage}"].out_channels
        self.stages = nn.ModuleDict(stages)

    def forward(
        self, embedding: Tensor, sizes: dict[str, Sequence[int]] | None = None
    ) -> dict[str, Tensor]:
        """``{"layer1": .., "layer2": .., "layer3": ..}`` from a ``B x C x h x w`` embedding.

        ``sizes`` gives the teacher's grid of each layer, to which the decoder's maps are
        cropped (they are otherwise ``2h``, ``4h`` and ``8h`` rows high).
        """
        outputs = {}
        x = embedding
        for name, stage in self.stages.items():
            x = stage(x, None if sizes is None else sizes[name])
            outputs[name] = x
        return {name: outputs[name] for name in ("layer1", "layer2", "layer3")}


def init_conv_weights(module: nn.Module) -> None:
    """He (fan-out) initialisation of (transposed) convolutions; batch norms at 1 and 0.

    The initialisation of torchvision's ResNets, which the reverse-distillation code keeps.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
