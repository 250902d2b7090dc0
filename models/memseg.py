"""MemSeg (Yang et al., "MemSeg: A semi-supervised method for image surface defect detection
using differences and commonalities", Engineering Applications of Artificial Intelligence 2023).

A U-Net segmenter trained on normal images turned anomalous on the fly, which compares what it
sees with a memory of normal images:

- **Anomaly simulation.** Half of the training images get a Perlin-noise mask inside which a
  noise foreground is blended in with a random transparency (``data.anomalies.PerlinBlend``:
  DTD textures in the paper, a generated texture or a tile-shuffled copy of the image itself —
  the paper's "structure" anomaly — without ``texture_dir``).
- **Memory module.** ``memory_size`` training images, drawn once before training, are encoded by
  the frozen first stages of a ResNet (``layer1``..``layer3``) and kept. An input's features are
  compared with every memory image's (mean squared difference, summed over the three levels);
  the closest one gives the difference information ``(features - memory)**2``, which is
  concatenated with the input's own features at each level.
- **Multi-scale feature fusion.** Each level's concatenation goes through convolutions and a
  coordinate attention (Hou et al., CVPR 2021); deeper levels are upsampled and added to the
  shallower ones, and each level is weighted by a spatial attention map: the channel mean of its
  difference information times the (upsampled) map of the level below.
- **Decoder.** The trainable last ResNet stage (``layer4``) turns ``layer3`` into the U-Net's
  bottleneck; the decoder upsamples it with the fused levels and the stem's features as skip
  connections to a two-class map at input resolution, trained with focal + L1 loss on the
  anomaly channel's softmax.

The anomaly map is the softmax anomaly channel; the image score the mean of its ``top_k``
largest values.

Settings: the reference seed 003 (a benchmark of MemSeg on industrial images) gives the study's
configuration, which this class takes as defaults where it states them: 256 px, ResNet18,
memory of 30 images, AdamW with lr 0.003 and weight decay 5e-4, cosine schedule with linear
warm-up over the first 20 % down to 1e-4, loss 0.7 focal (gamma 4, no alpha) + 0.3 L1, batch
size 8, 15 000 iterations. The budget is counted in epochs here: 15 000 iterations of batch 8
are 500 epochs of a 240-image training set (an MVTec AD category), the default ``epochs``; the
schedule follows the share of the budget seen, image by image. The paper's transparency range
``(0.15, 1.0)`` is the default ``beta`` (seed 003 gives (0.8, 1.0), a stronger blend).

Deviations: the stem is frozen with ``layer1``..``layer3`` (the reference code leaves it
trainable, which lets the encoder's features drift away from the stored memory) and frozen
layers keep their batch-norm statistics; the foreground mask the paper multiplies into the
Perlin mask for object categories (a binarised image, with per-category thresholds) is left
out, so anomalies may land on the background.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.anomalies import PerlinBlend
from data.transforms import IMAGENET_MEAN, IMAGENET_STD
from models.backbones import FeatureExtractor, get_backbone
from models.base import (
    Batch,
    Detector,
    EpochCallback,
    Prediction,
    check_epochs,
    iter_images,
    register,
    train_epochs,
)
from models.components.losses import focal_loss
from models.constraints import (
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    UNIT_LEFT_CLOSED,
    Interval,
    Is,
    Range,
    Rule,
)
from models.errors import ModelError
from models.parts import describe_part

__all__ = ["CoordinateAttention", "MemSeg"]

RESNETS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "resnext50_32x4d",
    "resnext101_32x8d",
)
"""Backbones MemSeg can use: ResNets, whose trainable last stage it runs on top of ``layer3``."""
LEVELS = ("layer1", "layer2", "layer3")
"""The encoder levels compared with the memory."""
DECODER_CHANNELS = 48
"""Width of the decoder's two full-resolution stages (the reference implementation's)."""


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class CoordinateAttention(nn.Module):
    """Coordinate attention (Hou et al., "Coordinate Attention for Efficient Mobile Network
    Design", CVPR 2021): channel attention factorised along the two axes, so each weight also
    knows where (which row, which column) it applies.

    Args:
        channels: input (and output) channels.
        reduction: channel reduction of the shared 1x1 transform (at least 8 channels remain).
    """

    def __init__(self, channels: int, reduction: int = 32) -> None:
        super().__init__()
        hidden = max(8, channels // reduction)
        self.shared = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.BatchNorm2d(hidden), nn.Hardswish()
        )
        self.along_h = nn.Conv2d(hidden, channels, 1)
        self.along_w = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        height = x.shape[2]
        # Pool each row and each column, transform them together, then split again.
        rows = x.mean(dim=3, keepdim=True)  # B x C x H x 1
        columns = x.mean(dim=2, keepdim=True).transpose(2, 3)  # B x C x W x 1
        mixed = self.shared(torch.cat([rows, columns], dim=2))
        weight_h = torch.sigmoid(self.along_h(mixed[:, :, :height]))
        weight_w = torch.sigmoid(self.along_w(mixed[:, :, height:].transpose(2, 3)))
        return x * weight_h * weight_w


class _FusionBlock(nn.Module):
    """One level of the MSFF: conv, coordinate attention, two convs down to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv_in = nn.Sequential(*_conv_bn_relu(in_channels, in_channels))
        self.attention = CoordinateAttention(in_channels)
        self.conv_out = nn.Sequential(
            *_conv_bn_relu(in_channels, out_channels), *_conv_bn_relu(out_channels, out_channels)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_out(self.attention(self.conv_in(x)))


class _UpConv(nn.Module):
    """Bilinear upsampling to a given size, then conv-BN-ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(*_conv_bn_relu(in_channels, out_channels))

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        return self.conv(_resize(x, size))


class _FusionAndDecoder(nn.Module):
    """MSFF module and U-Net decoder: the trainable head of MemSeg.

    Args:
        stem: channels of the stem (stride 2).
        levels: channels of ``layer1``, ``layer2``, ``layer3`` (strides 4, 8, 16).
        deep: channels of the trainable ``layer4`` (stride 32).
    """

    def __init__(self, stem: int, levels: Sequence[int], deep: int) -> None:
        super().__init__()
        c1, c2, c3 = levels
        self.fuse = nn.ModuleList(_FusionBlock(2 * c, c) for c in levels)
        self.top_down = nn.ModuleList([_UpConv(c2, c1), _UpConv(c3, c2)])
        self.up3, self.up2, self.up1 = _UpConv(deep, c3), _UpConv(2 * c3, c2), _UpConv(2 * c2, c1)
        self.up0 = _UpConv(2 * c1, DECODER_CHANNELS)
        self.stem = nn.Sequential(*_conv_bn_relu(stem, DECODER_CHANNELS))
        self.up_mask = _UpConv(2 * DECODER_CHANNELS, DECODER_CHANNELS)
        self.out = nn.Conv2d(DECODER_CHANNELS, 2, 3, padding=1)

    def forward(
        self,
        stem: Tensor,
        features: Sequence[Tensor],
        differences: Sequence[Tensor],
        deep: Tensor,
        size: Sequence[int],
    ) -> Tensor:
        fused = [
            block(torch.cat([f, d], dim=1))
            for block, f, d in zip(self.fuse, features, differences, strict=True)
        ]
        # Top-down: each level gets the (already fused) deeper one, upsampled.
        fused[1] = fused[1] + self.top_down[1](fused[2], fused[1].shape[-2:])
        fused[0] = fused[0] + self.top_down[0](fused[1], fused[0].shape[-2:])
        # Spatial attention: where the input differs from its closest memory, at every scale.
        attention = differences[2].mean(dim=1, keepdim=True)
        weights = [attention]
        for d in (differences[1], differences[0]):
            attention = d.mean(dim=1, keepdim=True) * _resize(attention, d.shape[-2:])
            weights.insert(0, attention)
        fused = [f * w for f, w in zip(fused, weights, strict=True)]

        x = torch.cat([self.up3(deep, fused[2].shape[-2:]), fused[2]], dim=1)
        x = torch.cat([self.up2(x, fused[1].shape[-2:]), fused[1]], dim=1)
        x = torch.cat([self.up1(x, fused[0].shape[-2:]), fused[0]], dim=1)
        x = torch.cat([self.up0(x, stem.shape[-2:]), self.stem(stem)], dim=1)
        return self.out(self.up_mask(x, size))


@register("memseg")
class MemSeg(Detector):
    """Memory-guided U-Net segmenter trained on simulated anomalies."""

    learning_type = "iterative"
    localizes = True
    supported_backbones = RESNETS

    hyperparameter_constraints: ClassVar[Mapping[str, Rule]] = {
        "memory_size": POSITIVE_INT,
        "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "min_lr": POSITIVE,
        "warmup_ratio": UNIT_LEFT_CLOSED,
        "epochs": POSITIVE_INT,
        "focal_weight": NON_NEGATIVE,
        "l1_weight": NON_NEGATIVE,
        "focal_gamma": NON_NEGATIVE,
        "beta": Range(0, 1),
        "anomaly_probability": Interval(float, 0, 1, closed="right"),
        "texture_dir": (Is(str, "a folder path"), None),
        "top_k": POSITIVE_INT,
    }

    def __init__(
        self,
        backbone: str = "resnet18",
        memory_size: int = 30,
        lr: float = 0.003,
        weight_decay: float = 5e-4,
        min_lr: float = 1e-4,
        warmup_ratio: float = 0.2,
        epochs: int = 500,
        focal_weight: float = 0.7,
        l1_weight: float = 0.3,
        focal_gamma: float = 4.0,
        beta: Sequence[float] = (0.15, 1.0),
        anomaly_probability: float = 0.5,
        texture_dir: str | None = None,
        top_k: int = 100,
        seed: int = 0,
        pretrained: bool = True,
        weights: str | None = None,
    ) -> None:
        """
        Args:
            backbone: the encoder, a ResNet (``MemSeg.supported_backbones``; the paper's
                resnet18). Its stem and ``layer1``..``layer3`` are frozen (they describe the
                memory), its ``layer4`` is trained.
            memory_size: training images kept in the memory (the paper's 30); fewer when the
                training set is smaller.
            lr: peak AdamW learning rate (seed 003: 0.003).
            weight_decay: AdamW weight decay (seed 003: 5e-4).
            min_lr: learning rate at the start of the warm-up and at the end of the cosine
                decay (seed 003: 1e-4).
            warmup_ratio: share of the training budget over which the learning rate rises
                linearly from ``min_lr`` to ``lr`` (seed 003: 0.2); cosine decay follows.
            epochs: training epochs when ``fit`` is not given a budget (500: seed 003's 15 000
                iterations of batch 8 on a 240-image training set).
            focal_weight: weight of the focal loss (seed 003: 0.7).
            l1_weight: weight of the L1 loss between the anomaly channel's softmax and the
                mask (seed 003: 0.3).
            focal_gamma: focusing parameter of the focal loss (seed 003 and the paper's code: 4).
            beta: range ``(low, high)`` of the transparency with which the noise foreground is
                blended into the image inside the mask, drawn uniformly per image (the paper's
                ``(0.15, 1.0)``; ``data.anomalies.PerlinBlend``'s ``beta``).
            anomaly_probability: share of training images made anomalous (the reference code
                alternates, 0.5).
            texture_dir: folder of texture images for the texture anomalies (the paper uses
                DTD). Without it the texture is generated and ``fit`` says so in
                ``stats["notes"]``.
            top_k: the image score is the mean of the ``top_k`` largest anomaly-map values (the
                paper's 100; all pixels when the image has fewer).
            seed: seeds the initialisation, the choice of memory images and the synthetic
                anomalies (and the encoder when it is not pretrained).
            pretrained: start the encoder from timm's pretrained weights (the paper; seed 003
                trained from scratch).
            weights: local encoder weight file or directory (overrides ``pretrained``).
        """
        super().__init__()
        problem = type(self).backbone_problem(backbone)
        if problem is not None:
            raise ModelError(f"memseg: cannot use backbone {backbone!r}: {problem}")
        # Beyond the table: two hyperparameters together, and the file system.
        if min_lr > lr:
            raise ModelError(f"memseg: min_lr must be <= lr ({lr}), got {min_lr!r}")
        if focal_weight + l1_weight <= 0:
            raise ModelError("memseg: focal_weight and l1_weight cannot both be 0")
        # Not only in fit: a study's validation builds every configuration first.
        if texture_dir is not None and not Path(texture_dir).expanduser().is_dir():
            raise ModelError(f"memseg: texture_dir {texture_dir!r} is not a folder")
        self.memory_size = memory_size
        self.top_k = top_k
        self.epochs = epochs
        self.lr, self.min_lr = float(lr), float(min_lr)
        self.weight_decay = float(weight_decay)
        self.warmup_ratio = float(warmup_ratio)
        self.focal_weight, self.l1_weight = float(focal_weight), float(l1_weight)
        self.focal_gamma = float(focal_gamma)
        self.beta = (float(beta[0]), float(beta[1]))
        self.anomaly_probability = float(anomaly_probability)
        self.texture_dir = texture_dir
        self.seed = seed

        generator = torch.Generator().manual_seed(seed)
        seeds = torch.randint(2**62, (5,), generator=generator, device="cpu").tolist()
        encoder_seed, deep_seed, head_seed, self._memory_seed, self._anomaly_seed = seeds
        self.encoder = FeatureExtractor(
            backbone, ("act1", *LEVELS), pretrained=pretrained, weights=weights, seed=encoder_seed
        )
        # The trainable last stage, taken from its own copy of the backbone (the same weights
        # when pretrained); the frozen encoder stays frozen, batch norms included.
        trainable = FeatureExtractor(
            backbone,
            ("layer4",),
            pretrained=pretrained,
            weights=weights,
            requires_grad=True,
            seed=deep_seed,
        )
        self.deep = trainable.model.layer4
        spec = get_backbone(backbone)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(head_seed)
            self.head = _FusionAndDecoder(
                spec.layer("act1")[1],
                [spec.layer(level)[1] for level in LEVELS],
                spec.layer("layer4")[1],
            )
        for level in LEVELS:
            self.register_buffer(f"memory_{level}", torch.empty(0))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("fitted", torch.tensor(False))

    @classmethod
    def backbone_problem(
        cls, backbone: str, hparams: Mapping[str, Any] | None = None, image_size: int | None = None
    ) -> str | None:
        """Base checks; MemSeg runs a ResNet's trainable ``layer4`` on its frozen ``layer3``."""
        if backbone not in RESNETS:
            get_backbone(backbone)  # an unknown name is an error of its own
            return (
                "it trains the last stage (layer4) of a ResNet on top of the frozen layer3, "
                f"so it needs one of {', '.join(RESNETS)}"
            )
        return super().backbone_problem(backbone, hparams, image_size)

    # ----------------------------------------------------------------------------- memory

    def memory(self) -> list[Tensor]:
        """The memory images' ``layer1``..``layer3`` features, ``N x C x h x w`` each."""
        return [getattr(self, f"memory_{level}") for level in LEVELS]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The memory's shape is only known after fit: take the stored one.
        for level in LEVELS:
            key = f"{prefix}memory_{level}"
            if key in state_dict:
                current = getattr(self, f"memory_{level}")
                setattr(
                    self,
                    f"memory_{level}",
                    torch.empty_like(state_dict[key], device=current.device),
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _choose_memory(self, train: Iterable[Batch]) -> tuple[Tensor, int]:
        """A uniform sample of ``memory_size`` training images (reservoir sampling, seeded) and
        the number of training images."""
        generator = torch.Generator().manual_seed(self._memory_seed)
        chosen: list[Tensor] = []
        seen = 0
        for images in iter_images(train):
            for image in images:
                if len(chosen) < self.memory_size:
                    chosen.append(image.detach().cpu())
                else:
                    slot = int(torch.randint(seen + 1, (1,), generator=generator))
                    if slot < self.memory_size:
                        chosen[slot] = image.detach().cpu()
                seen += 1
        if not chosen:
            raise ModelError("memseg: the training set is empty")
        return torch.stack(chosen), seen

    @torch.no_grad()
    def _store_memory(self, images: Tensor) -> None:
        parts: dict[str, list[Tensor]] = {level: [] for level in LEVELS}
        for start in range(0, len(images), 8):
            features = self.encoder(images[start : start + 8].to(self.fitted.device))
            for level in LEVELS:
                parts[level].append(features[level])
        for level in LEVELS:
            setattr(self, f"memory_{level}", torch.cat(parts[level]))

    def differences(self, features: Sequence[Tensor]) -> list[Tensor]:
        """``(features - closest memory image's)**2`` per level; the closest memory image of an
        input has the smallest mean squared difference, summed over the levels."""
        memory = self.memory()
        # One memory image at a time: exact (a self-match is exactly 0) and never B x N x D.
        distance = torch.stack(
            [
                sum(
                    (f - m[i]).square().flatten(1).mean(dim=1)
                    for f, m in zip(features, memory, strict=True)
                )
                for i in range(len(memory[0]))
            ],
            dim=1,
        )
        closest = distance.argmin(dim=1)
        return [(f - m[closest]).square() for f, m in zip(features, memory, strict=True)]

    # ----------------------------------------------------------------------------- network

    def segment(self, images: Tensor) -> Tensor:
        """Two-class logits ``B x 2 x H x W`` of a batch of ImageNet-normalised images."""
        with torch.no_grad():
            encoded = self.encoder(images)
        features = [encoded[level] for level in LEVELS]
        differences = self.differences(features)
        deep = self.deep(features[2])
        return self.head(encoded["act1"], features, differences, deep, images.shape[-2:])

    def losses(self, logits: Tensor, masks: Tensor) -> dict[str, Tensor]:
        """Weighted focal and L1 losses of logits against ``B x 1 x H x W`` masks."""
        anomaly = torch.softmax(logits, dim=1)[:, 1]
        terms = {
            "loss_focal": focal_loss(logits, masks, self.focal_gamma),
            "loss_l1": F.l1_loss(anomaly, masks[:, 0]),
        }
        terms["loss"] = self.focal_weight * terms["loss_focal"] + self.l1_weight * terms["loss_l1"]
        return terms

    def _learning_rate(self, progress: float) -> float:
        """Warm-up then cosine schedule at ``progress`` in [0, 1] of the training budget."""
        span = self.lr - self.min_lr
        if progress < self.warmup_ratio:
            return self.min_lr + span * progress / self.warmup_ratio
        decay = (progress - self.warmup_ratio) / (1 - self.warmup_ratio)
        return self.min_lr + span * 0.5 * (1 + math.cos(math.pi * min(decay, 1.0)))

    def resource_probe(self, images: Tensor) -> None:
        """A training step's forward: segmentation of the (blended) batch against a memory
        of ``memory_size`` images."""
        with torch.no_grad():
            encoded = self.encoder(images[:1])
        for level in LEVELS:
            feature = encoded[level]
            setattr(
                self, f"memory_{level}", feature.new_empty(self.memory_size, *feature.shape[1:])
            )
        self.segment(images)

    def fit(
        self,
        train: Iterable[Batch],
        *,
        epochs: int | None = None,
        on_epoch_end: EpochCallback | None = None,
    ) -> dict[str, Any]:
        """Fill the memory, then train ``layer4`` and the head for ``epochs`` passes.

        One pass draws the memory images; then every batch gets its simulated anomalies and
        one AdamW step. ``on_epoch_end(epoch, {"loss", "loss_focal", "loss_l1", "lr"})`` runs
        after every epoch (mean losses per image) and stops training when it returns True.
        Returns the epochs run, the last epoch's losses, the memory size and, without
        ``texture_dir``, a note saying the textures were generated.
        """
        n_epochs = self.epochs if epochs is None else check_epochs("memseg", epochs, "fit epochs")
        notes = []
        if self.texture_dir is None:
            notes.append(
                "memseg: no texture_dir, so the texture anomalies blend in generated textures "
                "(Perlin colour fields) instead of DTD images"
            )
        try:
            blend = PerlinBlend(texture_dir=self.texture_dir, beta=self.beta)
        except ValueError as error:
            raise ModelError(f"memseg: texture_dir {self.texture_dir!r}: {error}") from error
        memory_images, n_train = self._choose_memory(train)
        self._store_memory(memory_images)
        parameters = [*self.deep.parameters(), *self.head.parameters()]
        optimizer = torch.optim.AdamW(
            parameters, lr=self._learning_rate(0.0), weight_decay=self.weight_decay
        )
        generator = torch.Generator().manual_seed(self._anomaly_seed)
        budget = n_epochs * n_train
        seen = 0

        def step(images: Tensor) -> dict[str, float]:
            nonlocal seen
            lr = self._learning_rate(seen / budget)
            for group in optimizer.param_groups:
                group["lr"] = lr
            pixels = (images * self.std + self.mean).clamp(0.0, 1.0)
            anomalous, masks = blend(pixels, generator, probability=self.anomaly_probability)
            terms = self.losses(self.segment((anomalous - self.mean) / self.std), masks)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            seen += images.shape[0]
            return {**{key: float(value.detach()) for key, value in terms.items()}, "lr": lr}

        def end_of_epoch(epoch: int, means: dict[str, float]) -> None:
            self.fitted.fill_(True)

        epochs_run, means = train_epochs(
            self, train, step, epochs=n_epochs, on_epoch_end=on_epoch_end, end_of_epoch=end_of_epoch
        )
        stats: dict[str, Any] = {
            "epochs": epochs_run,
            **means,
            "memory_size": len(memory_images),
        }
        if notes:
            stats["notes"] = notes
        stats["parts"] = self.parts()
        return stats

    def parts(self) -> dict[str, str]:
        """Where the anomalies' textures come from, as a result row shows it."""
        if self.texture_dir is None:
            return {"textures": "generated"}
        return {"textures": describe_part(self.texture_dir, "folder")}

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        """Anomaly map: softmax anomaly channel; score: mean of its ``top_k`` largest values."""
        if not bool(self.fitted):
            raise ModelError("memseg: predict called before fit")
        images = images.to(self.fitted.device)
        memory_size = tuple(self.memory()[0].shape[-2:])
        stride = self.encoder.strides["layer1"]
        expected = tuple(-(-s // stride) for s in images.shape[-2:])
        if memory_size != expected:
            raise ModelError(
                f"memseg: the memory holds features of the training images' size, whose layer1 "
                f"grid is {memory_size[0]}x{memory_size[1]}; {images.shape[-2]}x"
                f"{images.shape[-1]} images give {expected[0]}x{expected[1]}: predict at the "
                "training size"
            )
        anomaly_map = torch.softmax(self.segment(images), dim=1)[:, 1]
        k = min(self.top_k, anomaly_map[0].numel())
        score = anomaly_map.flatten(1).topk(k, dim=1).values.mean(dim=1)
        return Prediction(score=score, anomaly_map=anomaly_map)
