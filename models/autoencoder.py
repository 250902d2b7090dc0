"""Convolutional autoencoder: the reconstruction baseline of the reference report (seed 000,
"automated visual inspection for battery assembly", Section 2.2.2 and 3.3).

A compact encoder-decoder is trained on normal images to reproduce them through a narrow
bottleneck; an anomaly, never seen, is reproduced as something normal, and the per-pixel
reconstruction error marks it.

Architecture (as the report lists it): an encoder of four 3 x 3 stride-2 convolutions
(3 -> 32 -> 64 -> 128 -> 256 channels, each with batch norm and ReLU) down to a 256-channel map
at 1/16 of the input (16 x 16 at 256 px), a 3 x 3 convolution 256 -> 256 with ReLU as the
bottleneck, and a decoder of four 4 x 4 stride-2 transposed convolutions
(256 -> 128 -> 64 -> 32 -> 3, batch norm and ReLU but after the last) ending in a Sigmoid that
reconstructs the [0, 1] image; no skip connections (they would pass defects straight through).
That layer list holds 1.67M parameters; the report's "approximately 2.8 million" does not follow
from it, and the list is what is built. The encoder reads the ImageNet-normalised input as
delivered (the report normalises its input too) and the reconstruction is compared with the
de-normalised [0, 1] image. Sides that are not multiples of 16 are padded by edge replication and
the output cropped back.

Training (Section 3.3.3): L = 0.8 L1 + 0.2 (1 - SSIM) between the image and its reconstruction,
AdamW (betas 0.9 / 0.999, weight decay 1e-4), learning rate 1e-3 decayed by a cosine schedule to
1e-5 over the epochs of the run (stepped once per epoch), gradient norms clipped at 1.0, 100
epochs at batch size 32 (the batch size belongs to the data pipeline). Where the report departs
from what a detector can do here: no mixed precision (runs on CPU must be bit-reproducible), no
checkpoint selection by validation loss (``fit`` sees no validation set; the last epoch is kept),
and its CLAHE / flip / affine augmentations belong to the data pipeline.

Scoring: the anomaly map is the per-pixel absolute error averaged over colour channels, smoothed
by a ``map_kernel`` x ``map_kernel`` mean filter (the report's 3 x 3 heatmap filter). The image
score is, by default, the report's "mean absolute reconstruction error per pixel"
(``score_mode="mean"``). A mean dilutes a small defect among many well-reconstructed pixels, so
``score_mode="max"`` (the maximum of the smoothed map, as most localising detectors score) is
offered for small defects; the smoothing keeps a single noisy pixel from deciding it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.transforms import IMAGENET_MEAN, IMAGENET_STD
from models.base import (
    Batch,
    Detector,
    EpochCallback,
    Prediction,
    check_epochs,
    register,
    train_epochs,
)
from models.components.losses import ssim
from models.constraints import (
    NON_NEGATIVE,
    ODD,
    POSITIVE,
    POSITIVE_INT,
    UNIT_LEFT_CLOSED,
    AllOf,
    Options,
    Rule,
)
from models.errors import ModelError

__all__ = ["ConvAutoencoder"]

_STRIDE = 16
"""Total downsampling of the encoder: inputs are padded to a multiple of it."""


def _to_pixels(images: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


class _Network(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        widths = (3, 32, 64, 128, 256)
        encoder: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(widths):
            encoder += [
                nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
        self.encoder = nn.Sequential(*encoder)
        self.bottleneck = nn.Sequential(nn.Conv2d(256, 256, 3, 1, 1), nn.ReLU(inplace=True))
        decoder: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(widths[:0:-1]):
            decoder += [
                nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
        decoder += [nn.ConvTranspose2d(32, 3, 4, 2, 1), nn.Sigmoid()]
        self.decoder = nn.Sequential(*decoder)

    def forward(self, images: Tensor) -> Tensor:
        return self.decoder(self.bottleneck(self.encoder(images)))


@register("autoencoder")
class ConvAutoencoder(Detector):
    """Convolutional autoencoder scored by its reconstruction error."""

    learning_type = "iterative"
    localizes = True
    hyperparameter_constraints: ClassVar[Mapping[str, Rule]] = {
        "lr": POSITIVE,
        "min_lr": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "beta1": UNIT_LEFT_CLOSED,
        "beta2": UNIT_LEFT_CLOSED,
        "l1_weight": NON_NEGATIVE,
        "ssim_weight": NON_NEGATIVE,
        "grad_clip": (POSITIVE, None),
        "epochs": POSITIVE_INT,
        "score_mode": Options("mean", "max"),
        "map_kernel": AllOf(POSITIVE_INT, ODD),
    }

    def __init__(
        self,
        lr: float = 1e-3,
        min_lr: float = 1e-5,
        weight_decay: float = 1e-4,
        beta1: float = 0.9,
        beta2: float = 0.999,
        l1_weight: float = 0.8,
        ssim_weight: float = 0.2,
        grad_clip: float | None = 1.0,
        epochs: int = 100,
        score_mode: str = "mean",
        map_kernel: int = 3,
        seed: int = 0,
    ) -> None:
        """
        Args:
            lr: initial AdamW learning rate.
            min_lr: learning rate the cosine schedule reaches at the last epoch.
            weight_decay: AdamW's decoupled weight decay.
            beta1: AdamW's first-moment decay.
            beta2: AdamW's second-moment decay.
            l1_weight: weight of the L1 reconstruction loss.
            ssim_weight: weight of the structural loss ``1 - SSIM``.
            grad_clip: maximum gradient norm (None: no clipping).
            epochs: training epochs when ``fit`` is not given a budget (also the length of the
                cosine schedule).
            score_mode: image score: ``"mean"`` (mean absolute error per pixel, the report's)
                or ``"max"`` (maximum of the smoothed anomaly map).
            map_kernel: side of the mean filter that smooths the anomaly map (odd; 1: none).
            seed: seeds the initialisation.
        """
        super().__init__()
        # Beyond the table: two hyperparameters together.
        if min_lr > lr:
            raise ModelError(f"autoencoder: min_lr must be <= lr ({lr}), got {min_lr!r}")
        if l1_weight + ssim_weight <= 0:
            raise ModelError("autoencoder: l1_weight + ssim_weight must be > 0, got 0")
        self.lr, self.min_lr = float(lr), float(min_lr)
        self.weight_decay = float(weight_decay)
        self.betas = (float(beta1), float(beta2))
        self.l1_weight, self.ssim_weight = float(l1_weight), float(ssim_weight)
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.epochs = epochs
        self.score_mode = score_mode
        self.map_kernel = map_kernel
        self.seed = seed
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            self.network = _Network()
        self.register_buffer("fitted", torch.tensor(False))

    def reconstruct(self, images: Tensor) -> Tensor:
        """The [0, 1] reconstruction of a batch of normalised images, at their size."""
        height, width = images.shape[-2:]
        pad_h, pad_w = -height % _STRIDE, -width % _STRIDE
        padded = F.pad(images, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else images
        return self.network(padded)[..., :height, :width]

    def resource_probe(self, images: Tensor) -> None:
        """A training step's forward: the reconstruction of the batch."""
        self.reconstruct(images)

    def fit(
        self,
        train: Iterable[Batch],
        *,
        epochs: int | None = None,
        on_epoch_end: EpochCallback | None = None,
    ) -> dict[str, Any]:
        """Train with AdamW and a per-epoch cosine learning-rate schedule.

        ``on_epoch_end(epoch, metrics)`` runs after every epoch with the mean loss (``"loss"``),
        its L1 and SSIM parts (``"l1"``, ``"ssim"``: the mean SSIM index) and the learning rate
        the next epoch uses (``"lr"``), and stops training when it returns True.
        """
        n_epochs = (
            self.epochs if epochs is None else check_epochs("autoencoder", epochs, "fit epochs")
        )
        optimizer = torch.optim.AdamW(
            self.network.parameters(), lr=self.lr, betas=self.betas, weight_decay=self.weight_decay
        )
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=n_epochs, eta_min=self.min_lr
        )

        def step(images: Tensor) -> dict[str, float]:
            target = _to_pixels(images)
            reconstruction = self.reconstruct(images)
            l1 = F.l1_loss(reconstruction, target)
            similarity = ssim(reconstruction, target)
            loss = self.l1_weight * l1 + self.ssim_weight * (1 - similarity)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
            optimizer.step()
            return {
                "loss": float(loss.detach()),
                "l1": float(l1.detach()),
                "ssim": float(similarity.detach()),
            }

        def end_of_epoch(epoch: int, means: dict[str, float]) -> dict[str, float]:
            schedule.step()
            self.fitted.fill_(True)
            return {"lr": optimizer.param_groups[0]["lr"]}

        epochs_run, means = train_epochs(
            self, train, step, epochs=n_epochs, on_epoch_end=on_epoch_end, end_of_epoch=end_of_epoch
        )
        return {"epochs": epochs_run, "loss": means.get("loss", math.nan)}

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        """Score a batch: the smoothed per-pixel absolute error and the image score of
        ``score_mode`` (the mean raw error, or the maximum of the smoothed map)."""
        if not bool(self.fitted):
            raise ModelError("autoencoder: predict called before fit")
        images = images.to(self.fitted.device)
        error = (self.reconstruct(images) - _to_pixels(images)).abs().mean(1)
        anomaly_map = error
        if self.map_kernel > 1:
            # Edge replication keeps the border pixels' averages from being pulled towards 0.
            pad = self.map_kernel // 2
            padded = F.pad(error[:, None], (pad, pad, pad, pad), mode="replicate")
            anomaly_map = F.avg_pool2d(padded, self.map_kernel, stride=1)[:, 0]
        if self.score_mode == "mean":
            score = error.flatten(1).mean(1)
        else:
            score = anomaly_map.flatten(1).amax(1)
        return Prediction(score=score, anomaly_map=anomaly_map)
