"""CS-Flow (Rudolph, Wehrbein, Rosenhahn and Wandt, "Fully Convolutional Cross-Scale-Flows for
Image-based Defect Detection", WACV 2022).

The image is seen at three sizes (full, 1/2 and 1/4) by the same frozen EfficientNet, cut after
one stage: the paper's "layer 36" of EfficientNet-B5, 304 channels at stride 32 (24 x 24 at
768 px). A normalizing flow then maps the three feature maps jointly to Gaussian latents: every
coupling block is an affine coupling over the list of scales whose subnet is a *cross-scale*
convolution, so that the log-scale and shift predicted at one scale mix that scale with its
up-sampled coarser and strided finer neighbours. The flow is trained by maximum likelihood on
normal images only. A defect gets latents far from the origin: the image score is the mean of
``z**2 / 2`` over every latent dimension, and the anomaly map the mean of ``z**2`` over channels
at every position of the full-size image's latent (or, with ``anomaly_map_mode="all"``, its
product with the coarser scales' maps).

Parameter counts match the reference study's Table 2 for the defaults: 17.5M frozen
(EfficientNet-B5 up to the layer) and 275M trainable (four blocks of two subnets with 1024 hidden
channels, the last block with 5 x 5 kernels as in the paper's code).

Layer naming: Table B.8 gives the layer as "6.8", torchvision's ``features.6.8``, i.e. block 8
(the last) of the sixth MBConv stage. In timm that stage is ``blocks.5`` (``features.0`` is
torchvision's stem), and its last block is the 36th MBConv block of EfficientNet-B5
(3 + 5 + 5 + 7 + 7 + 9): the ``layer`` hyperparameter names a stage output, ``"blocks.5"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbones import FeatureExtractor, get_backbone
from models.base import (
    Batch,
    Detector,
    EpochCallback,
    Prediction,
    check_epochs,
    register,
    train_epochs,
)
from models.components.feature_utils import upsample_maps
from models.components.flows import AffineCoupling, SequentialFlow, gaussian_nll
from models.constraints import (
    NON_NEGATIVE,
    ODD,
    POSITIVE,
    POSITIVE_INT,
    UNIT_LEFT_CLOSED,
    AllOf,
    Options,
    Rule,
    SequenceOf,
)
from models.errors import ModelError

__all__ = ["CSFlow", "CrossScaleSubnet"]

N_SCALES = 3
"""Image sizes the flow sees: full, 1/2 and 1/4 (the paper's three scales)."""
EFFICIENTNET_STAGES = 7
"""Stages (``blocks.0`` .. ``blocks.6``) of every timm EfficientNet B0-B7."""
MAP_MODES = ("largest", "all")
"""``anomaly_map_mode`` values: the full-size image's scale only, or the product of all three."""
_LEAKY_SLOPE = 0.1


class CrossScaleSubnet(nn.Module):
    """CS-Flow's coupling subnet over a list of maps, finest first.

    A convolution per scale lifts its input to ``hidden_channels`` (leaky ReLU), then output
    ``s`` sums a convolution of its own hidden map, one of the next coarser hidden map
    bilinearly upsampled to its grid, and a stride-2 one of the next finer hidden map: the
    cross-scale connections through which each scale's log-scales and shifts see its
    neighbours. The outputs are multiplied by a learned per-scale factor that starts at 0, so
    every coupling block starts as the identity.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: Sequence[int],
        hidden_channels: int,
        kernel_size: int,
    ) -> None:
        super().__init__()
        n = len(in_channels)
        pad = kernel_size // 2

        def conv(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
            return nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=pad)

        self.lift = nn.ModuleList(conv(in_channels[s], hidden_channels) for s in range(n))
        self.same = nn.ModuleList(conv(hidden_channels, out_channels[s]) for s in range(n))
        self.from_coarser = nn.ModuleList(
            conv(hidden_channels, out_channels[s]) for s in range(n - 1)
        )
        self.from_finer = nn.ModuleList(
            conv(hidden_channels, out_channels[s], stride=2) for s in range(1, n)
        )
        self.gamma = nn.Parameter(torch.zeros(n))

    def forward(self, xs: Sequence[Tensor]) -> list[Tensor]:
        hidden = [
            F.leaky_relu(lift(x), _LEAKY_SLOPE) for lift, x in zip(self.lift, xs, strict=True)
        ]
        out = []
        for s, h in enumerate(hidden):
            y = self.same[s](h)
            if s + 1 < len(hidden):
                coarser = F.interpolate(
                    hidden[s + 1], size=h.shape[-2:], mode="bilinear", align_corners=False
                )
                y = y + self.from_coarser[s](coarser)
            if s > 0:
                finer = self.from_finer[s - 1](hidden[s - 1])
                if finer.shape[-2:] != y.shape[-2:]:
                    # A stride-2 convolution of an odd grid can be one off the coarser grid.
                    finer = F.interpolate(
                        finer, size=y.shape[-2:], mode="bilinear", align_corners=False
                    )
                y = y + finer
            out.append(self.gamma[s] * y)
        return out


@register("csflow")
class CSFlow(Detector):
    """Cross-scale normalizing flow over a frozen EfficientNet's multi-scale features."""

    learning_type = "iterative"
    localizes = True
    supported_backbones = tuple(f"efficientnet_b{i}" for i in range(8))

    hyperparameter_constraints: ClassVar[Mapping[str, Rule]] = {
        "n_coupling_blocks": POSITIVE_INT,
        "hidden_channels": POSITIVE_INT,
        "kernel_size": AllOf(POSITIVE_INT, ODD),
        "last_kernel_size": AllOf(POSITIVE_INT, ODD),
        "clamp": POSITIVE,
        "lr": POSITIVE,
        "eps": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "betas": SequenceOf(UNIT_LEFT_CLOSED, length=2),
        "grad_clip_norm": NON_NEGATIVE,
        "epochs": POSITIVE_INT,
        "anomaly_map_mode": Options(*MAP_MODES),
    }

    def __init__(
        self,
        backbone: str = "efficientnet_b5",
        layer: str = "blocks.5",
        n_coupling_blocks: int = 4,
        hidden_channels: int = 1024,
        kernel_size: int = 3,
        last_kernel_size: int = 5,
        clamp: float = 3.0,
        lr: float = 2e-4,
        eps: float = 1e-4,
        weight_decay: float = 1e-5,
        betas: tuple[float, float] = (0.5, 0.9),
        grad_clip_norm: float = 1.0,
        epochs: int = 240,
        anomaly_map_mode: str = "largest",
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
            kernel_size: kernel of the subnets' convolutions (odd; the paper's 3).
            last_kernel_size: kernel of the last coupling block's subnets (odd; the paper's
                code, which the reference study ran, widens it to 5).
            clamp: soft clamp of the coupling log-scales, ``clamp * 2/pi * atan(s / clamp)``
                (the paper's 3).
            lr: Adam learning rate.
            eps: Adam's epsilon (Table B.8's 1e-4, much larger than Adam's usual 1e-8).
            weight_decay: Adam weight decay (L2 penalty).
            betas: Adam's moment coefficients ((0.5, 0.9) in the paper's code and the
                reference implementation).
            grad_clip_norm: gradients are rescaled to at most this total norm before every
                step (the reference implementation's trainer clips at 1); 0 disables it.
            epochs: training epochs when ``fit`` is not given a budget (Table B.8's 240).
            anomaly_map_mode: ``"largest"``: the mean squared latent per position of the
                full-size image's scale, as the paper localises; ``"all"``: the product over
                the three scales of that map (each upsampled), the reference
                implementation's default.
            seed: seeds the flow's permutations and initialisation, and the backbone's when it
                is not pretrained.
            pretrained: use timm's pretrained backbone weights.
            weights: local backbone weight file or directory (overrides ``pretrained``).
        """
        super().__init__()
        # Beyond the table: the stage must exist in the backbone.
        problem = _layer_problem(layer)
        if problem is not None:
            raise ModelError(f"csflow: {problem}")
        self.epochs = epochs
        self.layer = layer
        self.lr = float(lr)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.betas = (float(betas[0]), float(betas[1]))
        self.grad_clip_norm = float(grad_clip_norm)
        self.anomaly_map_mode = anomaly_map_mode
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

        def subnet_factory(kernel: int):
            def subnet(in_channels: list[int], out_channels: list[int]) -> nn.Module:
                return CrossScaleSubnet(in_channels, out_channels, hidden_channels, kernel)

            return subnet

        kernels = [kernel_size] * (n_coupling_blocks - 1) + [last_kernel_size]
        self.flow = SequentialFlow(
            [
                AffineCoupling(
                    [self.channels] * N_SCALES,
                    subnet_factory(kernel),
                    clamp=float(clamp),
                    seed=block_seed,
                    soft_clamp="atan",
                )
                for kernel, block_seed in zip(kernels, block_seeds, strict=True)
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

    def backbone_features(self, images: Tensor) -> Tensor:
        """The truncated EfficientNet's map of ``images`` (one scale).

        ``self.extractor`` only builds and freezes the network: its blocks after ``layer`` are
        cut off, so its own ``forward`` no longer applies; this is the backbone's forward.
        """
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
            maps.append(self.backbone_features(scaled))
        return maps

    def resource_probe(self, images: Tensor) -> None:
        """A training step's forward: the three-scale features and the flow."""
        with torch.no_grad():
            maps = self.features(images)
        self.flow(maps)

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
        n_epochs = self.epochs if epochs is None else check_epochs("csflow", epochs, "fit epochs")
        optimizer = torch.optim.Adam(
            self.flow.parameters(),
            lr=self.lr,
            betas=self.betas,
            eps=self.eps,
            weight_decay=self.weight_decay,
        )

        def step(images: Tensor) -> dict[str, float]:
            with torch.no_grad():
                maps = self.features(images)
            z, log_det = self.flow(maps)
            # Per latent dimension, as the paper's loss: the scale of the loss (and of Adam's
            # eps relative to the gradients) does not depend on the image size.
            loss = gaussian_nll(z, log_det, per_dimension=True)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip_norm > 0:
                nn.utils.clip_grad_norm_(self.flow.parameters(), self.grad_clip_norm)
            optimizer.step()
            return {"loss": float(loss.detach())}

        def end_of_epoch(epoch: int, means: dict[str, float]) -> None:
            self.fitted.fill_(True)

        epochs_run, means = train_epochs(
            self,
            train,
            step,
            epochs=n_epochs,
            on_epoch_end=on_epoch_end,
            end_of_epoch=end_of_epoch,
        )
        return {"epochs": epochs_run, "loss": means.get("loss", math.nan)}

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        """Score a batch: the mean of ``z**2 / 2`` over every latent dimension of the three
        scales (the paper's code and the reference implementation), and the anomaly map of
        ``anomaly_map_mode`` (mean of ``z**2`` over channels per position, upsampled)."""
        if not bool(self.fitted):
            raise ModelError("csflow: predict called before fit")
        images = images.to(self.fitted.device)
        z, _ = self.flow(self.features(images))
        scores = 0.5 * torch.cat([zs.flatten(1) for zs in z], dim=1).square().mean(1)
        size = images.shape[-2:]
        maps = [upsample_maps(zs.square().mean(1), size) for zs in z]
        anomaly_map = maps[0]
        if self.anomaly_map_mode == "all":
            for other in maps[1:]:
                anomaly_map = anomaly_map * other
        return Prediction(score=scores, anomaly_map=anomaly_map)


def _layer_problem(layer: Any) -> str | None:
    valid = [f"blocks.{i}" for i in range(EFFICIENTNET_STAGES)]
    if layer not in valid:
        return (
            f"layer must be an EfficientNet stage {', '.join(valid)} (the paper's is "
            f"'blocks.5'), got {layer!r}"
        )
    return None
