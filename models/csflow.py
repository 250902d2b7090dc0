"""CS-Flow (Rudolph, Wehrbein, Rosenhahn and Wandt, "Fully Convolutional Cross-Scale-Flows for
Image-based Defect Detection", WACV 2022).

The image is seen at three sizes (full, 1/2 and 1/4) by the same frozen EfficientNet, cut after
one stage: the paper's "layer 36" of EfficientNet-B5, 304 channels at stride 32 (24 x 24 at
768 px). A normalizing flow then maps the three feature maps jointly to Gaussian latents: every
coupling block is an affine coupling over the list of scales whose subnet is a *cross-scale*
convolution, so that the log-scale and shift predicted at one scale mix that scale with its
up-sampled coarser and strided finer neighbours. The flow is trained by maximum likelihood on
normal images only. A defect gets latents far from the origin: the image score is the mean
squared latent, and the per-position squared norm of the finest scale's latent is the anomaly
map.

Layer naming: Table B.8 gives the layer as "6.8", torchvision's ``features.6.8``, i.e. block 8
(the last) of the sixth MBConv stage. In timm that stage is ``blocks.5`` (``features.0`` is
torchvision's stem), and its last block is the 36th MBConv block of EfficientNet-B5
(3 + 5 + 5 + 7 + 7 + 9): the ``layer`` hyperparameter names a stage output, ``"blocks.5"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbones import FeatureExtractor, get_backbone
from models.base import (
    Batch,
    Detector,
    EpochCallback,
    ModelError,
    Prediction,
    iter_images,
    register,
)
from models.components.feature_utils import upsample_maps
from models.components.flows import AffineCoupling, SequentialFlow, gaussian_nll

__all__ = ["CSFlow", "CrossScaleConv", "CrossScaleSubnet"]

N_SCALES = 3
"""Image sizes the flow sees: full, 1/2 and 1/4 (the paper's three scales)."""
EFFICIENTNET_STAGES = 7
"""Stages (``blocks.0`` .. ``blocks.6``) of every timm EfficientNet B0-B7."""
_LEAKY_SLOPE = 0.1


class CrossScaleConv(nn.Module):
    """One cross-scale convolution over a list of maps, finest first.

    Output ``s`` is ``conv(x_s) + up(conv(x_{s+1})) + strided_conv(x_{s-1})``: each scale sees
    its own map, the next coarser one (convolved, then bilinearly resized to its grid) and the
    next finer one (a stride-2 convolution). Only the same-scale convolution has a bias, as the
    three terms are summed.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int], kernel_size: int):
        super().__init__()
        n = len(in_channels)
        pad = kernel_size // 2
        self.same = nn.ModuleList(
            nn.Conv2d(in_channels[s], out_channels[s], kernel_size, padding=pad) for s in range(n)
        )
        self.from_coarser = nn.ModuleList(
            nn.Conv2d(in_channels[s + 1], out_channels[s], kernel_size, padding=pad, bias=False)
            for s in range(n - 1)
        )
        self.from_finer = nn.ModuleList(
            nn.Conv2d(
                in_channels[s - 1], out_channels[s], kernel_size, stride=2, padding=pad, bias=False
            )
            for s in range(1, n)
        )

    def forward(self, xs: Sequence[Tensor]) -> list[Tensor]:
        out = []
        for s, x in enumerate(xs):
            y = self.same[s](x)
            if s + 1 < len(xs):
                y = y + _resize(self.from_coarser[s](xs[s + 1]), y)
            if s > 0:
                # A stride-2 convolution halves the finer grid; odd sizes can be one off.
                y = y + _resize(self.from_finer[s - 1](xs[s - 1]), y)
            out.append(y)
        return out


def _resize(x: Tensor, like: Tensor) -> Tensor:
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class CrossScaleSubnet(nn.Module):
    """CS-Flow's coupling subnet: two cross-scale convolutions with a leaky ReLU between.

    The outputs are multiplied by a learned per-scale factor that starts at 0, so that every
    coupling block starts as the identity and training begins from a well-conditioned flow.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: Sequence[int],
        hidden_channels: int,
        kernel_size: int,
    ) -> None:
        super().__init__()
        hidden = [hidden_channels] * len(in_channels)
        self.layer1 = CrossScaleConv(in_channels, hidden, kernel_size)
        self.layer2 = CrossScaleConv(hidden, out_channels, kernel_size)
        self.gamma = nn.Parameter(torch.zeros(len(in_channels)))

    def forward(self, xs: Sequence[Tensor]) -> list[Tensor]:
        hidden = [F.leaky_relu(h, _LEAKY_SLOPE) for h in self.layer1(xs)]
        return [g * y for g, y in zip(self.gamma, self.layer2(hidden), strict=True)]


@register("csflow")
class CSFlow(Detector):
    """Cross-scale normalizing flow over a frozen EfficientNet's multi-scale features."""

    learning_type = "iterative"
    localizes = True
    supported_backbones = tuple(f"efficientnet_b{i}" for i in range(8))

    def __init__(
        self,
        backbone: str = "efficientnet_b5",
        layer: str = "blocks.5",
        n_coupling_blocks: int = 4,
        hidden_channels: int = 1024,
        kernel_size: int = 3,
        clamp: float = 3.0,
        lr: float = 2e-4,
        eps: float = 1e-4,
        weight_decay: float = 1e-5,
        betas: tuple[float, float] = (0.5, 0.9),
        epochs: int = 240,
        seed: int = 0,
        pretrained: bool = True,
        weights: str | None = None,
    ) -> None:
        """
        Args:
            backbone: the frozen feature extractor, an EfficientNet (``efficientnet_b0`` ..
                ``efficientnet_b7``); the paper's is B5 (304 channels at ``blocks.5``).
            layer: the timm stage whose output is the feature map, ``"blocks.0"`` ..
                ``"blocks.6"``; the default ``"blocks.5"`` is Table B.8's "6.8" (torchvision's
                ``features.6.8``, the paper's layer 36, see the module docstring).
            n_coupling_blocks: coupling blocks of the cross-scale flow (the paper's 4).
            hidden_channels: channels of the cross-scale convolution between the two layers
                of every subnet (the paper's 1024).
            kernel_size: kernel of every cross-scale convolution (odd; the paper's 3).
            clamp: soft clamp of the coupling log-scales, ``clamp * 2/pi * atan(s / clamp)``
                (the paper's 3).
            lr: Adam learning rate.
            eps: Adam's epsilon (Table B.8's 1e-4; larger than Adam's usual 1e-8, which the
                paper found stabilises the flow).
            weight_decay: Adam weight decay (L2 penalty).
            betas: Adam's moment coefficients (the paper's code uses (0.5, 0.9)).
            epochs: training epochs when ``fit`` is not given a budget (Table B.8's 240).
            seed: seeds the flow's permutations and initialisation, and the backbone's when it
                is not pretrained.
            pretrained: use timm's pretrained backbone weights.
            weights: local backbone weight file or directory (overrides ``pretrained``).
        """
        super().__init__()
        problem = _layer_problem(layer)
        if problem is not None:
            raise ModelError(f"csflow: {problem}")
        for name, value in (
            ("n_coupling_blocks", n_coupling_blocks),
            ("hidden_channels", hidden_channels),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelError(f"csflow: {name} must be a positive int, got {value!r}")
        if (
            isinstance(kernel_size, bool)
            or not isinstance(kernel_size, int)
            or kernel_size < 1
            or kernel_size % 2 == 0
        ):
            raise ModelError(f"csflow: kernel_size must be a positive odd int, got {kernel_size!r}")
        for name, value in (("clamp", clamp), ("lr", lr), ("eps", eps)):
            if not _is_real(value) or not value > 0:
                raise ModelError(f"csflow: {name} must be > 0, got {value!r}")
        if not _is_real(weight_decay) or not weight_decay >= 0:
            raise ModelError(f"csflow: weight_decay must be >= 0, got {weight_decay!r}")
        if (
            not isinstance(betas, Sequence)
            or len(betas) != 2
            or not all(_is_real(b) and 0 <= b < 1 for b in betas)
        ):
            raise ModelError(f"csflow: betas must be two numbers in [0, 1), got {betas!r}")
        self.epochs = _check_epochs(epochs, "epochs")
        self.layer = layer
        self.lr = float(lr)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.betas = (float(betas[0]), float(betas[1]))
        self.seed = seed

        generator = torch.Generator().manual_seed(seed)
        backbone_seed, *block_seeds = torch.randint(
            2**62, (1 + n_coupling_blocks,), generator=generator
        ).tolist()
        spec = get_backbone(backbone)
        # timm's EfficientNet exposes stage outputs only where the stride changes, so blocks.5
        # (same stride as blocks.6) is no feature point: build the extractor to its deepest
        # layer and run the stem and stages up to ``layer`` directly.
        deepest = max(spec.layers, key=lambda name: spec.layers[name][0])
        self.extractor = FeatureExtractor(
            backbone, [deepest], pretrained=pretrained, weights=weights, seed=backbone_seed
        )
        net = self.extractor.model
        stage = int(layer.split(".")[1])
        if not all(hasattr(net, a) for a in ("conv_stem", "bn1", "blocks")) or stage >= len(
            net.blocks
        ):
            raise ModelError(
                f"csflow: backbone {backbone!r} has no EfficientNet stage {layer!r} "
                f"(timm {spec.timm_name!r})"
            )
        # The stages after ``layer`` are never run: dropping them keeps param_counts honest.
        net.blocks = net.blocks[: stage + 1]
        # Every EfficientNet block ends with a convolution: its output channels are the stage's.
        convs = [m for m in net.blocks[stage].modules() if isinstance(m, nn.Conv2d)]
        self.channels = convs[-1].out_channels

        def subnet(in_channels: list[int], out_channels: list[int]) -> nn.Module:
            return CrossScaleSubnet(in_channels, out_channels, hidden_channels, kernel_size)

        self.flow = SequentialFlow(
            [
                AffineCoupling(
                    [self.channels] * N_SCALES,
                    subnet,
                    clamp=float(clamp),
                    seed=block_seed,
                    soft_clamp="atan",
                )
                for block_seed in block_seeds
            ]
        )
        self.register_buffer("fitted", torch.tensor(False))

    @classmethod
    def backbone_problem(
        cls, backbone: str, hparams: Mapping[str, Any] | None = None, image_size: int | None = None
    ) -> str | None:
        """Only EfficientNets, cut at a stage ``blocks.0`` .. ``blocks.6``."""
        problem = super().backbone_problem(backbone, hparams, image_size)
        if problem is not None:
            return problem
        layer = (hparams or {}).get("layer", "blocks.5")
        return _layer_problem(layer)

    def _backbone_features(self, images: Tensor) -> Tensor:
        net = self.extractor.model
        # The extractor's input conversion, for weights trained with other statistics than
        # ImageNet's (the identity for EfficientNets).
        images = images * self.extractor.input_scale + self.extractor.input_shift
        return net.blocks(net.bn1(net.conv_stem(images)))

    def features(self, images: Tensor) -> list[Tensor]:
        """The backbone's maps of the image at full, 1/2 and 1/4 size, finest first."""
        height, width = images.shape[-2:]
        maps = []
        for s in range(N_SCALES):
            scaled = images
            if s > 0:
                size = (max(1, height >> s), max(1, width >> s))
                scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
            maps.append(self._backbone_features(scaled))
        return maps

    def fit(
        self,
        train: Iterable[Batch],
        *,
        epochs: int | None = None,
        on_epoch_end: EpochCallback | None = None,
    ) -> dict[str, Any]:
        """Train the flow by maximum likelihood for ``epochs`` (default: the constructor's).

        ``on_epoch_end(epoch, {"loss": mean negative log-likelihood per latent dimension})``
        runs after every epoch and stops training when it returns True. A non-finite loss is a
        :class:`ModelError` (the flow diverged). Returns the epochs run and the last loss.
        """
        n_epochs = self.epochs if epochs is None else _check_epochs(epochs, "fit epochs")
        optimizer = torch.optim.Adam(
            self.flow.parameters(),
            lr=self.lr,
            betas=self.betas,
            eps=self.eps,
            weight_decay=self.weight_decay,
        )
        device = self.fitted.device
        self.train()
        epoch = 0
        epoch_loss = math.nan
        try:
            for epoch in range(1, n_epochs + 1):
                loss_sum, n_images = 0.0, 0
                for images in iter_images(train):
                    images = images.to(device)
                    with torch.no_grad():
                        maps = self.features(images)
                    z, log_det = self.flow(maps)
                    # Per latent dimension, as the paper's loss: the scale of the loss (and of
                    # Adam's eps relative to the gradients) does not depend on the image size.
                    loss = gaussian_nll(z, log_det, per_dimension=True)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    loss_sum += float(loss.detach()) * images.shape[0]
                    n_images += images.shape[0]
                if n_images == 0:
                    raise ModelError("csflow: the training set is empty")
                epoch_loss = loss_sum / n_images
                if not math.isfinite(epoch_loss):
                    raise ModelError(
                        f"csflow: training diverged (loss {epoch_loss} in epoch {epoch}); "
                        "try a lower lr or clamp"
                    )
                self.fitted.fill_(True)
                if on_epoch_end is not None and on_epoch_end(epoch, {"loss": epoch_loss}):
                    break
        finally:
            self.eval()
        return {"epochs": epoch, "loss": epoch_loss}

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        """Score a batch: the mean squared latent and the finest scale's squared-norm map.

        The score averages, over the three scales, the mean of ``z**2`` per latent dimension,
        so that each scale counts equally whatever its number of positions; the map is
        ``|z(p)|**2`` at every position of the full-size image's latent, bilinearly upsampled.
        """
        if not bool(self.fitted):
            raise ModelError("csflow: predict called before fit")
        images = images.to(self.fitted.device)
        z, _ = self.flow(self.features(images))
        scores = torch.stack([zs.flatten(1).square().mean(1) for zs in z]).mean(0)
        anomaly_map = upsample_maps(z[0].square().sum(1), images.shape[-2:])
        return Prediction(score=scores, anomaly_map=anomaly_map)


def _layer_problem(layer: Any) -> str | None:
    valid = [f"blocks.{i}" for i in range(EFFICIENTNET_STAGES)]
    if layer not in valid:
        return (
            f"layer must be an EfficientNet stage {', '.join(valid)} (the paper's is "
            f"'blocks.5'), got {layer!r}"
        )
    return None


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_epochs(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(f"csflow: {name} must be a positive int, got {value!r}")
    return value
