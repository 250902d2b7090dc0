"""EfficientAD-AST: EfficientAD with the asymmetric student-teacher pair of AST (the Vilnius
bachelor thesis "Anomaly Detection in Industrial Manufacturing Using Deep Neural Networks",
sections 1.6, 1.7 and 2.4-2.6; AST is Rudolph, Wehrbein, Rosenhahn and Wandt, "Asymmetric
Student-Teacher Networks for Industrial Anomaly Detection", WACV 2023; EfficientAD is Batzner,
Heckler and König, WACV 2024).

EfficientAD's student and teacher share an architecture, so the student generalises to anomalies
more than one would like; AST makes the pair asymmetric instead. Here:

- The teacher is a normalizing flow on frozen backbone features (EfficientNet-B5 in AST),
  conditioned on a 2-D positional encoding and trained first, by maximum likelihood on the normal
  images, to map them to a standard normal. It is bijective, so it cannot ignore what it has
  not seen: anomalous features get latents that a regressor trained on normal ones cannot
  predict.
- The student is a conventional residual convolutional network on the same features and
  positional encoding. Its first half of output channels regresses the flow's latents, its
  second half the output of
- EfficientAD's autoencoder, here on features and positional encoding instead of pixels, with a
  1 x 1 bottleneck that captures the global (logical) layout of normal images.

Losses (the thesis' final version): mean squared errors student-teacher, autoencoder-teacher and
student-autoencoder, summed, plus EfficientAD's ImageNet penalty when ``imagenet_dir`` is given.
The thesis dropped EfficientAD's hard-feature quantile, its teacher-output normalisation, its map
normalisation and the 4-cell map padding, as each made its results worse; ``hard_quantile``
keeps the quantile available (0, the default, uses every element). The anomaly map is the
average of the student-teacher and student-autoencoder squared differences, bilinearly upsampled
to the image; the image score is its maximum.

Two phases, one ``fit``: the flow teacher trains for ``teacher_epochs`` first (AST's 240 epochs,
Adam 2e-4), then student and autoencoder for ``epochs`` (the thesis' maximum of 100, Adam 2e-4).
``on_epoch_end`` follows the second phase, the one the thesis early-stops; the teacher's epochs
are summarised in the returned statistics.

Backbone: AST reads EfficientNet-B5 after its sixth stage (block 35, 304 channels at stride 32,
24 x 24 at its 768 px input). That stage end is not a feature point of our registry, whose
EfficientNet ``layer4`` is the seventh stage's end (512 channels, same stride 32): the default
takes that. At the usual 256 px a stride-32 map is only 8 x 8; ``layers=("layer3",)`` (stride
16) gives a finer map. Any CNN or transformer of the registry works (``resnet18`` in the tests).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
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
    register,
    train_epochs,
)
from models.components.feature_utils import concat_to_first, upsample_maps
from models.components.flows import AffineCoupling, SequentialFlow, positional_encoding_2d
from models.components.pdn import PenaltyImages, hard_feature_loss
from models.constraints import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    UNIT_LEFT_CLOSED,
    AllOf,
    Rule,
    multiple_of,
)
from models.errors import ModelError

__all__ = ["EfficientADAST", "FeatureAutoencoder", "ResidualStudent"]

_FLOW_LEAKY_SLOPE = 0.1


class _CouplingSubnet(nn.Module):
    """AST's coupling subnet: two k x k convolutions with a leaky ReLU between them, the output
    scaled by a learned factor that starts at 0, so every coupling starts as the identity."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, kernel: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv2d(hidden, out_channels, kernel, padding=kernel // 2)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(F.leaky_relu(self.conv1(x), _FLOW_LEAKY_SLOPE)) * self.gamma


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        y = F.leaky_relu(self.bn1(self.conv1(x)))
        y = F.leaky_relu(self.bn2(self.conv2(y)))
        return x + y


class ResidualStudent(nn.Module):
    """AST's student: a 3 x 3 convolution into ``hidden`` channels, ``n_blocks`` residual blocks
    (two 3 x 3 convolutions with batch norm and leaky ReLU each) and a 3 x 3 output convolution;
    every layer keeps the feature map's size."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, n_blocks: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.blocks = nn.Sequential(*(_ResidualBlock(hidden) for _ in range(n_blocks)))
        self.conv_out = nn.Conv2d(hidden, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_out(self.blocks(F.leaky_relu(self.conv_in(x))))


class FeatureAutoencoder(nn.Module):
    """EfficientAD's autoencoder adapted to feature maps, as the thesis describes (2.6.5).

    Encoder: the input grid resized to 16 x 16 (average pooling or bilinear), two stride-2
    4 x 4 convolutions (to 4 x 4) and a 4 x 4 convolution to a 1 x 1 code of ``hidden``
    numbers, as EfficientAD's bottleneck. Decoder:
    five nearest-neighbour doublings (1 to 32 cells), each followed by a 3 x 3 convolution,
    ReLU and dropout; then the map is brought to the feature grid (adaptive average pooling,
    the thesis' choice, or bilinear resizing for grids over 32 cells) and two 3 x 3
    convolutions produce ``out_channels``. The parameters do not depend on the grid size.
    """

    _INPUT_GRID = 16
    _CODE_GRID = 4
    _DOUBLINGS = 5

    def __init__(
        self, in_channels: int, out_channels: int, hidden: int = 64, dropout: float = 0.2
    ) -> None:
        super().__init__()
        self.encoder = nn.ModuleList(
            [
                nn.Conv2d(in_channels, hidden // 2, 4, stride=2, padding=1),
                nn.Conv2d(hidden // 2, hidden, 4, stride=2, padding=1),
            ]
        )
        self.bottleneck = nn.Conv2d(hidden, hidden, self._CODE_GRID)
        self.decoder = nn.ModuleList(
            [nn.Conv2d(hidden, hidden, 3, padding=1) for _ in range(self._DOUBLINGS)]
        )
        self.head = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 3, padding=1),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        size = tuple(x.shape[-2:])
        x = _resize(x, (self._INPUT_GRID, self._INPUT_GRID))
        for conv in self.encoder:
            x = F.relu(conv(x))
        x = self.bottleneck(x)
        for conv in self.decoder:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = self.dropout(F.relu(conv(x)))
        return self.head(_resize(x, size))


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@register("efficient_ad_ast")
class EfficientADAST(Detector):
    """Normalizing-flow teacher, residual student and feature autoencoder (EfficientAD-AST)."""

    learning_type = "iterative"
    localizes = True
    backbone_kinds = ("cnn", "vit")

    hyperparameter_constraints: ClassVar[Mapping[str, Rule]] = {
        # Sines and cosines of rows and columns.
        "pos_enc_dim": AllOf(POSITIVE_INT, multiple_of(4)),
        "n_coupling_blocks": POSITIVE_INT,
        "teacher_hidden_channels": POSITIVE_INT,
        "clamp": POSITIVE,
        "teacher_lr": POSITIVE,
        "teacher_epochs": POSITIVE_INT,
        "student_hidden_channels": POSITIVE_INT,
        "n_student_blocks": NON_NEGATIVE_INT,
        "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "epochs": POSITIVE_INT,
        "hard_quantile": UNIT_LEFT_CLOSED,
    }

    def __init__(
        self,
        backbone: str = "efficientnet_b5",
        layers: Sequence[str] = ("layer4",),
        pos_enc_dim: int = 32,
        n_coupling_blocks: int = 4,
        teacher_hidden_channels: int = 64,
        clamp: float = 3.0,
        teacher_lr: float = 2e-4,
        teacher_epochs: int = 240,
        student_hidden_channels: int = 1024,
        n_student_blocks: int = 4,
        lr: float = 2e-4,
        weight_decay: float = 1e-5,
        epochs: int = 100,
        hard_quantile: float = 0.0,
        imagenet_dir: str | None = None,
        seed: int = 0,
        pretrained: bool = True,
        weights: str | None = None,
    ) -> None:
        """
        Args:
            backbone: frozen feature extractor of teacher, student and autoencoder
                (``models.backbones.list_backbones()``; AST's is EfficientNet-B5).
            layers: backbone layers read; several are resized to the first one's grid and
                concatenated (AST reads one).
            pos_enc_dim: channels of the 2-D sinusoidal positional encoding that conditions the
                flow and is appended to the inputs of student and autoencoder (a multiple of 4).
            n_coupling_blocks: affine coupling blocks of the flow teacher (AST: 4).
            teacher_hidden_channels: hidden channels of each coupling subnet (AST: 64).
            clamp: soft clamp of the coupling log-scales, ``clamp * 2/pi * atan(s / clamp)``
                (AST: 3).
            teacher_lr: Adam learning rate of the flow teacher (AST: 2e-4).
            teacher_epochs: training epochs of the flow teacher, run before the student's
                (AST: 240).
            student_hidden_channels: channels of the student's residual blocks (AST: 1024).
            n_student_blocks: residual blocks of the student (AST: 4).
            lr: Adam learning rate of student and autoencoder (the thesis: 2e-4).
            weight_decay: Adam weight decay of both phases (1e-5).
            epochs: student-autoencoder epochs when ``fit`` is not given a budget (the thesis'
                maximum, which it early-stopped).
            hard_quantile: quantile of the squared student-teacher differences above which they
                enter the student's loss, EfficientAD's hard feature loss; 0 (the thesis'
                final choice) uses all of them.
            imagenet_dir: local folder of images (ImageNet in the thesis) on which the
                student's teacher half is pulled to zero; None drops that penalty.
            seed: seeds every initialisation, the flow's permutations, the penalty images and
                dropout.
            pretrained: use timm's pretrained backbone weights.
            weights: local backbone weight file or directory (overrides ``pretrained``).
        """
        super().__init__()
        # Beyond the table: the file system.
        if imagenet_dir is not None and not Path(imagenet_dir).expanduser().is_dir():
            raise ModelError(
                f"efficient_ad_ast: imagenet_dir {str(imagenet_dir)!r} is not a folder"
            )
        self.pos_enc_dim = pos_enc_dim
        self.clamp = float(clamp)
        self.teacher_lr = float(teacher_lr)
        self.teacher_epochs = teacher_epochs
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.epochs = epochs
        self.hard_quantile = float(hard_quantile)
        self.imagenet_dir = imagenet_dir
        self.seed = seed

        seeds = torch.randint(2**62, (6,), generator=torch.Generator().manual_seed(seed)).tolist()
        backbone_seed, flow_seed, student_seed, ae_seed, self._train_seed, self._penalty_seed = (
            seeds
        )
        self.extractor = FeatureExtractor(
            backbone, layers, pretrained=pretrained, weights=weights, seed=backbone_seed
        )
        channels = sum(self.extractor.channels.values())
        if channels < 2:
            raise ModelError(
                f"efficient_ad_ast: the flow needs at least 2 feature channels, "
                f"{backbone} {'+'.join(self.extractor.layers)} has {channels}"
            )
        self.channels = channels
        kernels = [3] * (n_coupling_blocks - 1) + [5]  # AST: a wider last coupling

        def subnet_for(kernel: int):
            def build(in_channels: int, out_channels: int) -> nn.Module:
                return _CouplingSubnet(in_channels, out_channels, teacher_hidden_channels, kernel)

            return build

        block_seeds = torch.randint(
            2**62, (n_coupling_blocks,), generator=torch.Generator().manual_seed(flow_seed)
        ).tolist()
        self.teacher = SequentialFlow(
            [
                AffineCoupling(
                    channels,
                    subnet_for(kernel),
                    clamp=self.clamp,
                    condition_channels=pos_enc_dim,
                    seed=block_seed,
                    soft_clamp="atan",
                )
                for kernel, block_seed in zip(kernels, block_seeds, strict=True)
            ]
        )
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(student_seed)
            self.student = ResidualStudent(
                channels + pos_enc_dim, 2 * channels, student_hidden_channels, n_student_blocks
            )
            torch.default_generator.manual_seed(ae_seed)
            self.autoencoder = FeatureAutoencoder(channels + pos_enc_dim, channels)
        self.register_buffer("fitted", torch.tensor(False))
        self.eval()

    # ------------------------------------------------------------------------------ networks

    def features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Backbone features ``B x C x h x w`` and their positional encoding ``B x P x h x w``."""
        maps = list(self.extractor(images).values())
        features = maps[0] if len(maps) == 1 else concat_to_first(maps)
        b, _, h, w = features.shape
        encoding = positional_encoding_2d(self.pos_enc_dim, h, w).to(features)
        return features, encoding.expand(b, -1, -1, -1)

    def teacher_latents(self, features: Tensor, encoding: Tensor) -> tuple[Tensor, Tensor]:
        """The flow's latents ``z`` (``B x C x h x w``) and log-determinant per position."""
        return self.teacher(features, encoding, per_position=True)

    def raw_maps(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Student-teacher and student-autoencoder maps, ``B x h x w`` on the feature grid."""
        c = self.channels
        features, encoding = self.features(images)
        latents, _ = self.teacher_latents(features, encoding)
        inputs = torch.cat([features, encoding], dim=1)
        student = self.student(inputs)
        reconstruction = self.autoencoder(inputs)
        local = (latents - student[:, :c]).square().mean(1)
        global_ = (reconstruction - student[:, c:]).square().mean(1)
        return local, global_

    # ------------------------------------------------------------------------------ fit

    def resource_probe(self, images: Tensor) -> None:
        """A training step's forward in the student phase: features, the flow teacher's
        latents, student and autoencoder."""
        self._losses(images, None)

    def fit(
        self,
        train: Iterable[Batch],
        *,
        epochs: int | None = None,
        on_epoch_end: EpochCallback | None = None,
    ) -> dict[str, Any]:
        """Train the flow teacher for ``teacher_epochs``, then student and autoencoder for
        ``epochs`` (default: the constructor's).

        ``on_epoch_end(epoch, {"loss", "loss_st", "loss_ae", "loss_stae"})`` runs after every
        student-autoencoder epoch (mean losses per image): it can score the detector with
        ``predict``, and it stops training when it returns True. The statistics hold the
        teacher's epochs and last mean negative log-likelihood per position (``teacher_nll``).
        A non-finite mean loss in either phase (a diverged flow or student) is a
        :class:`ModelError`.
        """
        n_epochs = (
            self.epochs
            if epochs is None
            else check_epochs("efficient_ad_ast", epochs, "fit epochs")
        )
        device = self.fitted.device
        notes: list[str] = []
        penalty = None
        if self.imagenet_dir is None:
            notes.append(
                "efficient_ad_ast: no imagenet_dir, so the student's ImageNet penalty is dropped"
            )
        else:
            penalty = PenaltyImages(self.imagenet_dir, self._penalty_seed, "efficient_ad_ast")
        params = [*self.student.parameters(), *self.autoencoder.parameters()]
        optimizer = torch.optim.Adam(params, lr=self.lr, eps=1e-8, weight_decay=self.weight_decay)

        def step(images: Tensor) -> dict[str, float]:
            parts = self._losses(images, penalty)
            loss = parts.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            values = torch.cat([loss.detach()[None], parts.detach()]).tolist()
            return dict(zip(("loss", "loss_st", "loss_ae", "loss_stae"), values, strict=True))

        def end_of_epoch(epoch: int, means: dict[str, float]) -> None:
            # Scorable from the first student epoch on, so that a scheduler can score a
            # validation split from on_epoch_end (ASHA); the maps need no statistics.
            self.fitted.fill_(True)

        rng_devices = [device.index or 0] if device.type == "cuda" else []
        # Dropout draws from the global generator: fork it, seeded, for reproducibility.
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(self._train_seed)
            teacher_nll = self._fit_teacher(train)
            # The flow teacher has no dropout or batch norm, so training mode leaves it as it
            # is; its parameters are simply not in this optimizer.
            epochs_run, losses = train_epochs(
                self,
                train,
                step,
                epochs=n_epochs,
                on_epoch_end=on_epoch_end,
                end_of_epoch=end_of_epoch,
            )
        return {
            "epochs": epochs_run,
            **losses,
            "teacher_epochs": self.teacher_epochs,
            "teacher_nll": teacher_nll,
            "notes": notes,
        }

    def _fit_teacher(self, train: Iterable[Batch]) -> float:
        """Train the flow teacher by maximum likelihood; return its last epoch's mean NLL."""
        optimizer = torch.optim.Adam(
            self.teacher.parameters(), lr=self.teacher_lr, eps=1e-8, weight_decay=self.weight_decay
        )

        def step(images: Tensor) -> dict[str, float]:
            with torch.no_grad():
                features, encoding = self.features(images)
            latents, log_det = self.teacher_latents(features, encoding)
            # AST's loss: per position 0.5 |z|^2 - log|det|, averaged over positions.
            loss = (0.5 * latents.square().sum(1) - log_det).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return {"teacher_nll": float(loss.detach())}

        # Student and autoencoder are in training mode too but take no part in this phase.
        _, means = train_epochs(self, train, step, epochs=self.teacher_epochs)
        return means["teacher_nll"]

    def _losses(self, images: Tensor, penalty: PenaltyImages | None) -> Tensor:
        """(student-teacher, autoencoder-teacher, student-autoencoder) losses of a batch."""
        c = self.channels
        with torch.no_grad():
            features, encoding = self.features(images)
            latents, _ = self.teacher_latents(features, encoding)
        inputs = torch.cat([features, encoding], dim=1)
        student = self.student(inputs)
        loss_st = hard_feature_loss((latents - student[:, :c]).square(), self.hard_quantile)
        if penalty is not None:
            outside = penalty.sample(images.shape[0], images.shape[-2:], images.device)
            with torch.no_grad():
                outside_features, outside_encoding = self.features(outside)
            outside_inputs = torch.cat([outside_features, outside_encoding], dim=1)
            loss_st = loss_st + self.student(outside_inputs)[:, :c].square().mean()
        reconstruction = self.autoencoder(inputs)
        loss_ae = (latents - reconstruction).square().mean()
        loss_stae = (reconstruction - student[:, c:]).square().mean()
        return torch.stack([loss_st, loss_ae, loss_stae])

    # ------------------------------------------------------------------------------ predict

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        """Average of the student-teacher and student-autoencoder maps, upsampled; score = max."""
        if not bool(self.fitted):
            raise ModelError("efficient_ad_ast: predict called before fit")
        images = images.to(self.fitted.device)
        training = self.training
        self.eval()  # batch norm statistics and no dropout, whatever mode the caller left
        try:
            local, global_ = self.raw_maps(images)
        finally:
            self.train(training)
        anomaly_map = upsample_maps(0.5 * local + 0.5 * global_, images.shape[-2:])
        return Prediction(score=anomaly_map.flatten(1).amax(1), anomaly_map=anomaly_map)
