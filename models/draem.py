"""DRAEM (Zavrtanik et al., "DRAEM - A Discriminatively Trained Reconstruction Embedding for
Surface Anomaly Detection", ICCV 2021), with optional SSPCAB (Ristea et al., CVPR 2022).

Training sees normal images only, half of them turned anomalous on the fly: a Perlin-noise mask
blends a texture into the image (``data.anomalies.PerlinBlend``; DTD textures in the paper, a
generated source without ``texture_dir``). Two networks learn jointly:

- a *reconstructive* encoder-decoder (no skip connections) that must return the normal image
  from its anomalous version, trained with L2 + SSIM loss, so it learns to paint anomalies over;
- a *discriminative* U-Net that sees the (possibly anomalous) input concatenated with that
  reconstruction and segments the anomaly, trained with a focal loss against the blend mask.
  Comparing an image with its normal-looking reconstruction, it learns a distance in a joint
  embedding of both instead of a hand-made reconstruction error.

At test time the softmax anomaly channel of the discriminative network is the anomaly map; the
image score is the maximum of that map after a ``score_kernel`` x ``score_kernel`` mean filter
(21 in the paper). With ``sspcab=True`` the last convolution of the reconstructive encoder is an
SSPCAB (masked convolution + channel attention, ``models.components.sspcab``) trained with its own
reconstruction loss weighted by ``sspcab_lambda``, as the SSPCAB paper does for DRAEM.

Images arrive ImageNet-normalised; both networks work in [0, 1] pixel space (the paper's input),
so the detector de-normalises them first. The learning rate is multiplied by 0.2 at 80 % and
90 % of the epoch budget (the paper's schedule). Left out: the paper's random rotation of some
training images (a data augmentation outside the method, which would also break the geometry of
aligned industrial parts).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.anomalies import PerlinBlend
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
from models.components.losses import focal_loss, ssim
from models.components.sspcab import SSPCAB
from models.constraints import (
    BOOL,
    NON_NEGATIVE,
    ODD,
    POSITIVE,
    POSITIVE_INT,
    AllOf,
    Interval,
    Is,
    Range,
    Rule,
)
from models.errors import ModelError
from models.parts import describe_part

__all__ = ["DiscriminativeSubNetwork", "Draem", "ReconstructiveSubNetwork"]

MIN_SIZE = 32
"""Smallest image side: the discriminative U-Net halves the resolution five times."""
LR_MILESTONES = (0.8, 0.9)
"""Fractions of the epoch budget after which the learning rate is multiplied by ``LR_DECAY``."""
LR_DECAY = 0.2


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


def _double_conv(in_channels: int, out_channels: int, mid_channels: int | None = None):
    mid = out_channels if mid_channels is None else mid_channels
    return nn.Sequential(*_conv_bn_relu(in_channels, mid), *_conv_bn_relu(mid, out_channels))


class _Up(nn.Module):
    """Bilinear upsampling to a given size, then conv-BN-ReLU (sizes need not be powers of 2)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(*_conv_bn_relu(in_channels, out_channels))

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        return self.conv(F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False))


class ReconstructiveSubNetwork(nn.Module):
    """DRAEM's reconstructive encoder-decoder: 3 channels in [0, 1] in, 3 out, no skips.

    Args:
        base_channels: width of the first stage; stages have 1, 2, 4, 8, 8 times as many
            channels (the paper's 128).
        sspcab: make the second convolution of the deepest encoder stage an SSPCAB.

    ``forward(x)`` returns ``(reconstruction, sspcab_pair)``, the pair the SSPCAB's input and
    output (for its loss), or None without SSPCAB.
    """

    def __init__(self, base_channels: int = 128, sspcab: bool = False) -> None:
        super().__init__()
        c = base_channels
        widths = (c, 2 * c, 4 * c, 8 * c)
        self.encoder = nn.ModuleList(
            _double_conv(a, b) for a, b in zip((3, *widths[:-1]), widths, strict=True)
        )
        deep = 8 * c
        self.bottleneck_in = nn.Sequential(*_conv_bn_relu(deep, deep))
        if sspcab:
            self.sspcab: SSPCAB | None = SSPCAB(deep)
            self.bottleneck_out = nn.Sequential(nn.BatchNorm2d(deep), nn.ReLU(inplace=True))
        else:
            self.sspcab = None
            self.bottleneck_out = nn.Sequential(*_conv_bn_relu(deep, deep))
        # Decoder: per stage, upsample + conv, then two convs that narrow the channels.
        self.up = nn.ModuleList(_Up(w, w) for w in (8 * c, 4 * c, 2 * c, c))
        self.decode = nn.ModuleList(
            _double_conv(w_in, w_out, mid_channels=w_in)
            for w_in, w_out in ((8 * c, 4 * c), (4 * c, 2 * c), (2 * c, c), (c, c))
        )
        self.out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        sizes = []
        for stage in self.encoder:
            x = stage(x)
            sizes.append(x.shape[-2:])
            x = F.max_pool2d(x, 2)
        x = self.bottleneck_in(x)
        pair = None
        if self.sspcab is not None:
            y = self.sspcab(x)
            pair = (x, y)
            x = y
        x = self.bottleneck_out(x)
        for up, decode, size in zip(self.up, self.decode, reversed(sizes), strict=True):
            x = decode(up(x, size))
        return self.out(x), pair


class DiscriminativeSubNetwork(nn.Module):
    """DRAEM's discriminative U-Net: image and reconstruction (6 channels) in, 2-class logits out.

    Args:
        base_channels: width of the first stage; the six encoder stages have 1, 2, 4, 8, 8, 8
            times as many channels (the paper's 64).
    """

    def __init__(self, base_channels: int = 64) -> None:
        super().__init__()
        c = base_channels
        widths = (c, 2 * c, 4 * c, 8 * c, 8 * c, 8 * c)
        self.encoder = nn.ModuleList(
            _double_conv(a, b) for a, b in zip((6, *widths[:-1]), widths, strict=True)
        )
        # Decoder stage i upsamples to encoder stage 4 - i's size and concatenates its output.
        ups = ((8 * c, 8 * c), (8 * c, 4 * c), (4 * c, 2 * c), (2 * c, c), (c, c))
        self.up = nn.ModuleList(_Up(a, b) for a, b in ups)
        self.decode = nn.ModuleList(
            _double_conv(up + skip, up)
            for up, skip in ((8 * c, 8 * c), (4 * c, 8 * c), (2 * c, 4 * c), (c, 2 * c), (c, c))
        )
        self.out = nn.Conv2d(c, 2, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for i, stage in enumerate(self.encoder):
            if i:
                x = F.max_pool2d(x, 2)
            x = stage(x)
            skips.append(x)
        for up, decode, skip in zip(self.up, self.decode, reversed(skips[:-1]), strict=True):
            x = decode(torch.cat([up(x, skip.shape[-2:]), skip], dim=1))
        return self.out(x)


@register("draem")
class Draem(Detector):
    """Reconstructive and discriminative sub-networks trained on Perlin-blended anomalies."""

    learning_type = "iterative"
    localizes = True

    hyperparameter_constraints: ClassVar[Mapping[str, Rule]] = {
        "reconstructive_channels": POSITIVE_INT,
        "discriminative_channels": POSITIVE_INT,
        "lr": POSITIVE,
        "epochs": POSITIVE_INT,
        "beta": Range(0, 1),
        "anomaly_probability": Interval(float, 0, 1, closed="right"),
        "texture_dir": (Is(str, "a folder path"), None),
        "focal_gamma": NON_NEGATIVE,
        "sspcab": BOOL,
        "sspcab_lambda": NON_NEGATIVE,
        "score_kernel": AllOf(POSITIVE_INT, ODD),
    }

    def __init__(
        self,
        reconstructive_channels: int = 128,
        discriminative_channels: int = 64,
        lr: float = 1e-4,
        epochs: int = 700,
        beta: Sequence[float] = (0.1, 1.0),
        anomaly_probability: float = 0.5,
        texture_dir: str | None = None,
        focal_gamma: float = 2.0,
        sspcab: bool = False,
        sspcab_lambda: float = 0.1,
        score_kernel: int = 21,
        seed: int = 0,
    ) -> None:
        """
        Args:
            reconstructive_channels: first-stage width of the reconstructive encoder-decoder
                (the paper's 128; its stages have up to 8 times as many channels).
            discriminative_channels: first-stage width of the discriminative U-Net (the
                paper's 64).
            lr: Adam learning rate of both sub-networks (Table B.8: 1e-4); multiplied by 0.2
                after 80 % and again after 90 % of the epochs.
            epochs: training epochs when ``fit`` is not given a budget (Table B.8: 700).
            beta: range ``(low, high)`` of the opacity with which the texture is blended into
                the image inside the anomaly mask, drawn uniformly per image (Table B.8's
                ``[0.1, 1.0]``; ``data.anomalies.PerlinBlend``'s ``beta``).
            anomaly_probability: share of training images made anomalous; the others are
                trained on as normal, with an empty mask (the paper's 0.5).
            texture_dir: folder of texture images to blend in (the paper uses DTD). Without it
                the texture is generated (Perlin colour fields and colour/structure transforms
                of the image itself) and ``fit`` says so in ``stats["notes"]``.
            focal_gamma: focusing parameter of the segmentation's focal loss (the paper's 2).
            sspcab: put an SSPCAB in the reconstructive encoder's deepest stage (DRAEM+SSPCAB).
            sspcab_lambda: weight of the SSPCAB's reconstruction loss (Table B.8: 0.1); used
                only with ``sspcab=True``.
            score_kernel: side of the mean filter applied to the anomaly map before its maximum
                is taken as the image score (the paper's 21, at 256 px); 1 takes the raw maximum.
            seed: seeds the initialisation of both networks and the synthetic anomalies.
        """
        super().__init__()
        # Beyond the table: the file system. Here, not only in fit: a study's validation builds
        # every configuration first.
        if texture_dir is not None and not Path(texture_dir).expanduser().is_dir():
            raise ModelError(f"draem: texture_dir {texture_dir!r} is not a folder")
        self.reconstructive_channels = reconstructive_channels
        self.discriminative_channels = discriminative_channels
        self.epochs = epochs
        self.score_kernel = score_kernel
        self.lr = float(lr)
        self.beta = (float(beta[0]), float(beta[1]))
        self.anomaly_probability = float(anomaly_probability)
        self.texture_dir = texture_dir
        self.focal_gamma = float(focal_gamma)
        self.use_sspcab = sspcab
        self.sspcab_lambda = float(sspcab_lambda)
        self.seed = seed

        generator = torch.Generator().manual_seed(seed)
        init_seed, self._anomaly_seed = torch.randint(
            2**62, (2,), generator=generator, device="cpu"
        ).tolist()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.reconstructive = ReconstructiveSubNetwork(reconstructive_channels, sspcab)
            self.discriminative = DiscriminativeSubNetwork(discriminative_channels)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("fitted", torch.tensor(False))

    def _pixels(self, images: Tensor) -> Tensor:
        """ImageNet-normalised images back in [0, 1] pixel space."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ModelError(f"draem: expected B x 3 x H x W images, got {tuple(images.shape)}")
        if min(images.shape[-2:]) < MIN_SIZE:
            raise ModelError(
                f"draem: images must be at least {MIN_SIZE} px on each side (the discriminative "
                f"U-Net halves them five times), got {images.shape[-2]}x{images.shape[-1]}"
            )
        return (images * self.std + self.mean).clamp(0.0, 1.0)

    def segment(self, pixels: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        """Reconstruction, anomaly logits (``B x 2 x H x W``) and SSPCAB pair of [0, 1] images."""
        reconstruction, pair = self.reconstructive(pixels)
        logits = self.discriminative(torch.cat([reconstruction, pixels], dim=1))
        return reconstruction, logits, pair

    def losses(self, pixels: Tensor, anomalous: Tensor, masks: Tensor) -> dict[str, Tensor]:
        """The paper's loss terms for normal ``pixels``, their anomalous version and its masks."""
        reconstruction, logits, pair = self.segment(anomalous)
        terms = {
            "loss_l2": F.mse_loss(reconstruction, pixels),
            "loss_ssim": 1.0 - ssim(reconstruction, pixels),
            "loss_focal": focal_loss(logits, masks, self.focal_gamma),
        }
        if pair is not None:
            terms["loss_sspcab"] = self.sspcab_lambda * SSPCAB.loss(*pair)
        terms["loss"] = sum(terms.values())
        return terms

    def resource_probe(self, images: Tensor) -> None:
        """A training step's forward: both sub-networks and the loss terms (an anomalous batch
        has the shapes of the normal one)."""
        pixels = self._pixels(images)
        self.losses(pixels, pixels, pixels[:, :1])

    def fit(
        self,
        train: Iterable[Batch],
        *,
        epochs: int | None = None,
        on_epoch_end: EpochCallback | None = None,
    ) -> dict[str, Any]:
        """Train both sub-networks with Adam for ``epochs`` (default: the constructor's) passes.

        Every batch is de-normalised and a share ``anomaly_probability`` of its images gets a
        Perlin-blended anomaly. ``on_epoch_end(epoch, {"loss", "loss_l2", "loss_ssim",
        "loss_focal"[, "loss_sspcab"], "lr"})`` runs after every epoch (mean losses per image)
        and stops training when it returns True. Returns the epochs run, the last epoch's
        losses and, without ``texture_dir``, a note saying the textures were generated.
        """
        n_epochs = self.epochs if epochs is None else check_epochs("draem", epochs, "fit epochs")
        notes = []
        if self.texture_dir is None:
            notes.append(
                "draem: no texture_dir, so the anomalies blend in generated textures (Perlin "
                "colour fields and transforms of the image itself) instead of DTD images"
            )
        try:
            blend = PerlinBlend(texture_dir=self.texture_dir, beta=self.beta)
        except (OSError, ValueError) as error:
            raise ModelError(f"draem: texture_dir {self.texture_dir!r}: {error}") from error
        parameters = [*self.reconstructive.parameters(), *self.discriminative.parameters()]
        optimizer = torch.optim.Adam(parameters, lr=self.lr)
        # The milestones of the paper's schedule, as epoch counts of this run's budget.
        milestones = [round(fraction * n_epochs) for fraction in LR_MILESTONES]
        generator = torch.Generator().manual_seed(self._anomaly_seed)

        def step(images: Tensor) -> dict[str, float]:
            pixels = self._pixels(images)
            anomalous, masks = blend(pixels, generator, probability=self.anomaly_probability)
            terms = self.losses(pixels, anomalous, masks)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            return {key: float(value.detach()) for key, value in terms.items()}

        def end_of_epoch(epoch: int, means: dict[str, float]) -> dict[str, float]:
            self.fitted.fill_(True)
            lr = optimizer.param_groups[0]["lr"]
            if epoch in milestones:
                for group in optimizer.param_groups:
                    group["lr"] *= LR_DECAY ** milestones.count(epoch)
            return {"lr": lr}

        epochs_run, means = train_epochs(
            self, train, step, epochs=n_epochs, on_epoch_end=on_epoch_end, end_of_epoch=end_of_epoch
        )
        stats: dict[str, Any] = {"epochs": epochs_run, **means}
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
        """Anomaly map: softmax anomaly channel; score: max of its ``score_kernel`` mean filter."""
        if not bool(self.fitted):
            raise ModelError("draem: predict called before fit")
        pixels = self._pixels(images.to(self.fitted.device))
        _, logits, _ = self.segment(pixels)
        anomaly_map = torch.softmax(logits, dim=1)[:, 1]
        k = self.score_kernel
        smoothed = F.avg_pool2d(anomaly_map[:, None], k, stride=1, padding=k // 2)
        return Prediction(score=smoothed.flatten(1).amax(dim=1), anomaly_map=anomaly_map)
