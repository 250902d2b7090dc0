"""Reverse distillation (Deng & Li, "Anomaly Detection via Reverse Distillation from One-Class
Embedding", CVPR 2022).

A frozen teacher encoder (a ResNet) describes an image by its ``layer1``..``layer3`` maps. A
trainable one-class bottleneck embedding (OCBE) squeezes them into one compact code: the two
shallower maps are brought to the ``layer3`` grid by strided 3x3 convolutions (multi-scale
feature fusion), concatenated with ``layer3`` and passed through one more ResNet stage (the
one-class embedding, shaped like ``layer4``). A student decoder that mirrors the encoder in
reverse (a "de-ResNet" with the teacher's block type, upsampling with transposed convolutions)
must restore the teacher's three maps from that code alone. Trained on normal images only, the
student restores normal content and fails on anomalies, which the compact code cannot carry:
``1 - cos`` between teacher and student features at every position, summed over the three
upsampled layers and Gaussian-blurred, is the anomaly map; its maximum is the image score.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbones import FeatureExtractor
from models.base import (
    Batch,
    Detector,
    EpochCallback,
    Prediction,
    check_epochs,
    hyperparameters,
    register,
    train_epochs,
)
from models.components.decoders import (
    RESNET_ARCHS,
    ResNetArch,
    ResNetDecoder,
    ResNetStage,
    init_conv_weights,
)
from models.components.feature_utils import gaussian_blur, upsample_maps
from models.constraints import (
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    UNIT_LEFT_CLOSED,
    Options,
    Rule,
)
from models.errors import ModelError

__all__ = ["OneClassBottleneck", "ReverseDistillation"]

LAYERS = ("layer1", "layer2", "layer3")
"""The teacher layers the decoder mirrors: the only valid ``layers``."""
MAP_MODES = ("add", "multiply")


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class OneClassBottleneck(nn.Module):
    """OCBE: multi-scale feature fusion, then one ResNet stage down to the compact embedding.

    Args:
        arch: the teacher's block layout; the embedding stage uses its block type and its
            ``layer4`` depth, and outputs ``arch.channels(4)`` channels at stride 32.
    """

    def __init__(self, arch: ResNetArch):
        super().__init__()
        c1, c2, c3 = (arch.channels(stage) for stage in (1, 2, 3))
        self.fuse1 = nn.Sequential(*_conv_bn_relu(c1, c2), *_conv_bn_relu(c2, c3))
        self.fuse2 = nn.Sequential(*_conv_bn_relu(c2, c3))
        self.embed = ResNetStage(arch, 3 * c3, arch.planes(4), arch.depths[3], resample="down")

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        fused = torch.cat(
            [self.fuse1(features["layer1"]), self.fuse2(features["layer2"]), features["layer3"]],
            dim=1,
        )
        return self.embed(fused)


def _cosine_distance_maps(
    teacher: Mapping[str, Tensor], student: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    return {
        layer: 1.0 - F.cosine_similarity(teacher[layer], student[layer], dim=1) for layer in teacher
    }


@register("reverse_distillation")
class ReverseDistillation(Detector):
    """Teacher encoder, one-class bottleneck and a reverse (decoding) student."""

    learning_type = "iterative"
    localizes = True
    supported_backbones = tuple(RESNET_ARCHS)

    hyperparameter_constraints: ClassVar[Mapping[str, Rule]] = {
        "lr": POSITIVE,
        "beta1": UNIT_LEFT_CLOSED,
        "beta2": UNIT_LEFT_CLOSED,
        "epochs": POSITIVE_INT,
        "anomaly_map_mode": Options(*MAP_MODES),
        "blur_sigma": NON_NEGATIVE,
    }

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = LAYERS,
        lr: float = 0.005,
        beta1: float = 0.5,
        beta2: float = 0.999,
        epochs: int = 200,
        anomaly_map_mode: str = "add",
        blur_sigma: float = 4.0,
        seed: int = 0,
        pretrained: bool = True,
        weights: str | None = None,
    ) -> None:
        """
        Args:
            backbone: the teacher, a ResNet-family network the student decoder can mirror
                (``ReverseDistillation.supported_backbones``). The study ran ResNet18 and
                WideResNet50_2; the default is the paper's (and anomalib's) wide_resnet50_2.
            layers: the teacher maps distilled; the decoder mirrors exactly
                ``("layer1", "layer2", "layer3")``, the only accepted value.
            lr: Adam learning rate of the bottleneck and the decoder.
            beta1: Adam's first-moment decay (the paper's 0.5).
            beta2: Adam's second-moment decay.
            epochs: training epochs when ``fit`` is not given a budget.
            anomaly_map_mode: how the per-layer ``1 - cos`` maps, upsampled to the input size,
                combine: ``"add"`` (the paper's sum) or ``"multiply"``.
            blur_sigma: standard deviation in pixels of the Gaussian smoothing of the anomaly
                map (the paper's 4); 0 disables it.
            seed: seeds the initialisation of the bottleneck and decoder (and of the teacher
                when it is not pretrained).
            pretrained: use timm's pretrained weights for the teacher.
            weights: local teacher weight file or directory (overrides ``pretrained``).
        """
        super().__init__()
        problem = type(self).backbone_problem(backbone, {"layers": layers})
        if problem is not None:
            raise ModelError(f"reverse_distillation: cannot use backbone {backbone!r}: {problem}")
        self.epochs = epochs
        self.lr = float(lr)
        self.betas = (float(beta1), float(beta2))
        self.anomaly_map_mode = anomaly_map_mode
        self.blur_sigma = float(blur_sigma)
        self.seed = seed

        generator = torch.Generator().manual_seed(seed)
        teacher_seed, student_seed = torch.randint(2**62, (2,), generator=generator).tolist()
        self.teacher = FeatureExtractor(
            backbone, LAYERS, pretrained=pretrained, weights=weights, seed=teacher_seed
        )
        arch = RESNET_ARCHS[backbone]
        expected = {layer: arch.channels(stage) for stage, layer in enumerate(LAYERS, start=1)}
        if self.teacher.channels != expected:
            raise ModelError(
                f"reverse_distillation: backbone {backbone!r} gives channels "
                f"{self.teacher.channels}, its decoder expects {expected}"
            )
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(student_seed)
            self.bottleneck = OneClassBottleneck(arch)
            self.decoder = ResNetDecoder(arch)
            init_conv_weights(self.bottleneck)
            init_conv_weights(self.decoder)
        self.register_buffer("fitted", torch.tensor(False))

    @classmethod
    def backbone_problem(
        cls, backbone: str, hparams: Mapping[str, Any] | None = None, image_size: int | None = None
    ) -> str | None:
        """Base checks, plus: a decoder exists for the backbone, and the layers are ``LAYERS``."""
        problem = super().backbone_problem(backbone, hparams, image_size)
        if backbone not in RESNET_ARCHS:
            return (
                "it needs a student decoder matching the backbone and has one only for "
                f"{', '.join(RESNET_ARCHS)}"
            )
        if problem is not None:
            return problem
        layers = {**hyperparameters(cls.name), **(hparams or {})}["layers"]
        layers = [layers] if isinstance(layers, str) else list(layers or ())
        if tuple(layers) != LAYERS:
            return (
                "its decoder mirrors the three consecutive stages layer1, layer2, layer3: "
                f"layers must be exactly {LAYERS}, got {tuple(layers)}"
            )
        return None

    def student(self, teacher: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The decoder's restoration of the teacher's maps, from their one-class embedding."""
        sizes = {layer: feature.shape[-2:] for layer, feature in teacher.items()}
        return self.decoder(self.bottleneck(teacher), sizes)

    @staticmethod
    def loss(teacher: Mapping[str, Tensor], student: Mapping[str, Tensor]) -> Tensor:
        """Sum over layers of the batch mean of ``1 - cos`` between whole flattened maps."""
        terms = [
            (1.0 - F.cosine_similarity(teacher[layer].flatten(1), student[layer].flatten(1))).mean()
            for layer in teacher
        ]
        return torch.stack(terms).sum()

    def resource_probe(self, images: Tensor) -> None:
        """A training step's forward: the teacher, then bottleneck and decoder."""
        with torch.no_grad():
            target = self.teacher(images)
        self.loss(target, self.student(target))

    def fit(
        self,
        train: Iterable[Batch],
        *,
        epochs: int | None = None,
        on_epoch_end: EpochCallback | None = None,
    ) -> dict[str, Any]:
        """Train bottleneck and decoder with Adam for ``epochs`` (default: the constructor's).

        ``on_epoch_end(epoch, {"loss": mean loss of the epoch})`` runs after every epoch and
        stops training when it returns True. A non-finite loss is a :class:`ModelError`.
        Returns the epochs run and the last epoch's loss.
        """
        n_epochs = (
            self.epochs
            if epochs is None
            else check_epochs("reverse_distillation", epochs, "fit epochs")
        )
        parameters = [*self.bottleneck.parameters(), *self.decoder.parameters()]
        optimizer = torch.optim.Adam(parameters, lr=self.lr, betas=self.betas)

        def step(images: Tensor) -> dict[str, float]:
            with torch.no_grad():
                target = self.teacher(images)
            loss = self.loss(target, self.student(target))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
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
        """Score a batch: blurred combination of the per-layer ``1 - cos`` maps, and its max."""
        if not bool(self.fitted):
            raise ModelError("reverse_distillation: predict called before fit")
        images = images.to(self.fitted.device)
        teacher = self.teacher(images)
        maps = _cosine_distance_maps(teacher, self.student(teacher))
        size = images.shape[-2:]
        upsampled = [upsample_maps(layer_map, size) for layer_map in maps.values()]
        if self.anomaly_map_mode == "add":
            anomaly_map = torch.stack(upsampled).sum(0)
        else:
            anomaly_map = torch.stack(upsampled).prod(0)
        anomaly_map = gaussian_blur(anomaly_map, self.blur_sigma)
        scores = anomaly_map.flatten(1).max(dim=1).values
        return Prediction(score=scores, anomaly_map=anomaly_map)
