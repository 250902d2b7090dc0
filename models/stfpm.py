"""STFPM (Wang et al., "Student-Teacher Feature Pyramid Matching for Anomaly Detection",
BMVC 2021).

A frozen teacher backbone and a randomly initialised student of the same architecture see the
same normal images; the student learns to reproduce the teacher's (channel-normalised) feature
pyramid. On an anomaly the student, never trained on such content, disagrees with the teacher,
and the disagreement at every scale is the anomaly map.
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
from models.components.feature_utils import upsample_maps
from models.constraints import NON_NEGATIVE, POSITIVE, POSITIVE_INT, Rule

__all__ = ["STFPM"]


def _discrepancy_maps(
    teacher: Mapping[str, Tensor], student: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    # 0.5 * |t/|t| - s/|s||^2 over channels at every position: the paper's per-layer map.
    return {
        layer: 0.5
        * (F.normalize(teacher[layer], dim=1) - F.normalize(student[layer], dim=1)).square().sum(1)
        for layer in teacher
    }


@register("stfpm")
class STFPM(Detector):
    """Student-teacher feature pyramid matching."""

    learning_type = "iterative"
    localizes = True

    hyperparameter_constraints: ClassVar[Mapping[str, Rule]] = {
        "lr": POSITIVE,
        "momentum": NON_NEGATIVE,
        "weight_decay": NON_NEGATIVE,
        "epochs": POSITIVE_INT,
    }

    def __init__(
        self,
        backbone: str = "resnet18",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        lr: float = 0.4,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        epochs: int = 100,
        seed: int = 0,
        pretrained: bool = True,
        weights: str | None = None,
    ) -> None:
        """
        Args:
            backbone: architecture of teacher and student (``models.backbones.list_backbones()``).
            layers: the pyramid levels matched between teacher and student.
            lr: SGD learning rate.
            momentum: SGD momentum.
            weight_decay: SGD weight decay (L2 penalty).
            epochs: training epochs when ``fit`` is not given a budget.
            seed: seeds the student's initialisation (and the teacher's when it is not
                pretrained).
            pretrained: use timm's pretrained weights for the teacher (the student always
                starts from random weights).
            weights: local teacher weight file or directory (overrides ``pretrained``).
        """
        super().__init__()
        self.epochs = epochs
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.seed = seed
        # Teacher and student get distinct initialisations drawn from the seed: identical ones
        # would start the student at a zero-loss, zero-gradient point when not pretrained.
        generator = torch.Generator().manual_seed(seed)
        teacher_seed, student_seed = torch.randint(2**62, (2,), generator=generator).tolist()
        self.teacher = FeatureExtractor(
            backbone, layers, pretrained=pretrained, weights=weights, seed=teacher_seed
        )
        self.student = FeatureExtractor(
            backbone, layers, pretrained=False, requires_grad=True, seed=student_seed
        )

    @staticmethod
    def loss(teacher: Mapping[str, Tensor], student: Mapping[str, Tensor]) -> Tensor:
        """The paper's loss: sum over layers of ``0.5 / (h w)`` times the squared difference of
        the channel-normalised features, summed over channels, positions and images.

        Summed over the batch, not averaged (as the paper and anomalib do): Table B.8's SGD
        settings (lr 0.4, weight decay 1e-4) were tuned for this scale, which a batch mean
        would divide by the batch size.
        """
        maps = _discrepancy_maps(teacher, student)
        return torch.stack([m.mean((1, 2)).sum() for m in maps.values()]).sum()

    def fit(
        self,
        train: Iterable[Batch],
        *,
        epochs: int | None = None,
        on_epoch_end: EpochCallback | None = None,
    ) -> dict[str, Any]:
        """Train the student with SGD for ``epochs`` (default: the constructor's) passes.

        Each step minimises :meth:`loss` of its batch (a sum over the images);
        ``on_epoch_end(epoch, {"loss": mean loss per image of the epoch})`` runs after every
        epoch and stops training when it returns True. Returns the epochs run and the last
        epoch's loss.
        """
        n_epochs = self.epochs if epochs is None else check_epochs("stfpm", epochs, "fit epochs")
        optimizer = torch.optim.SGD(
            self.student.parameters(),
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )

        def step(images: Tensor) -> dict[str, float]:
            with torch.no_grad():
                target = self.teacher(images)
            loss = self.loss(target, self.student(images))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # Reported per image, so that epochs with different batch sizes compare.
            return {"loss": float(loss.detach()) / images.shape[0]}

        epochs_run, means = train_epochs(
            self, train, step, epochs=n_epochs, on_epoch_end=on_epoch_end
        )
        return {"epochs": epochs_run, "loss": means.get("loss", math.nan)}

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        """Score a batch: product over layers of the upsampled discrepancy maps, and its max.

        The product (the paper's choice) keeps a position anomalous only where every scale
        agrees, which suppresses the single-layer noise a sum would pass on.
        """
        images = images.to(next(self.student.parameters()).device)
        maps = _discrepancy_maps(self.teacher(images), self.student(images))
        size = images.shape[-2:]
        anomaly_map = torch.ones(images.shape[0], *size, device=images.device)
        for layer_map in maps.values():
            anomaly_map = anomaly_map * upsample_maps(layer_map, size)
        scores = anomaly_map.flatten(1).max(dim=1).values
        return Prediction(score=scores, anomaly_map=anomaly_map)

    def export_module(self) -> torch.nn.Module:
        """:meth:`predict` as a module (:class:`STFPMExport`): it is tensor operations already."""
        return STFPMExport(self)


class STFPMExport(torch.nn.Module):
    """STFPM's scoring: teacher and student pyramids, the product of their discrepancy maps."""

    def __init__(self, detector: STFPM) -> None:
        super().__init__()
        self.teacher = detector.teacher
        self.student = detector.student

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        maps = _discrepancy_maps(self.teacher(images), self.student(images))
        size = images.shape[-2:]
        # ones_like keeps the batch size a traced one (torch.ones(B, ...) would freeze it).
        anomaly_map = torch.ones_like(images[:, 0])
        for layer_map in maps.values():
            anomaly_map = anomaly_map * upsample_maps(layer_map, size)
        return anomaly_map.flatten(1).max(dim=1).values, anomaly_map
