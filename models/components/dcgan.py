"""DCGAN-style networks and the square power-of-two plumbing of the GAN detectors.

GANomaly (Akçay et al., ACCV 2018) and Skip-GANomaly (Akçay et al., IJCNN 2019) build their
networks in the DCGAN manner (Radford et al., ICLR 2016): 4 x 4 convolutions of stride 2 halve
a square image until it is 4 x 4 (doubling the channels each time), a final 4 x 4 convolution
maps that to a 1 x 1 code, and the decoder mirrors it with transposed convolutions. The number of
layers, and with it the parameter count, therefore follows the image side: a 256 px image has
five halving layers after the first, a 64 px image three.

:class:`SquareGAN` holds what both detectors share: images are taken from ImageNet
normalisation to the ``[-1, 1]`` range of the papers' Tanh outputs, zero-padded (mid-grey) to the
next power of two of their longer side, and the networks are built for that side. They are built
for 256 px (the reference study's resolution, so that parameter counts before training are those
of its Table 2) and rebuilt, from the same seed, when the first training batch needs another
side; the side is a buffer, so a state dict carries it and loading one rebuilds to match.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.transforms import IMAGENET_MEAN, IMAGENET_STD
from models.backbones import meta_init
from models.base import Batch, Detector, EpochCallback, check_epochs, train_epochs
from models.constraints import POSITIVE, POSITIVE_INT, UNIT_LEFT_CLOSED, Rule
from models.errors import ModelError

__all__ = [
    "DEFAULT_SIDE",
    "MIN_SIDE",
    "DCGANDecoder",
    "DCGANEncoder",
    "SquareGAN",
    "dcgan_init_",
    "network_side",
    "to_tanh_range",
]

DEFAULT_SIDE = 256
"""The side the networks are built for before any training (the reference study's 256 px)."""
MIN_SIDE = 16
"""The smallest network side: the first layer halves it to 8 and one more halving reaches 4."""


def network_side(height: int, width: int) -> int:
    """The square power-of-two side an ``height x width`` image is padded to (at least 16)."""
    longer = max(height, width, MIN_SIDE)
    return 1 << (longer - 1).bit_length()


def to_tanh_range(images: Tensor) -> Tensor:
    """ImageNet-normalised images as pixels in ``[-1, 1]`` (the range of a Tanh output)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return ((images * std + mean) * 2 - 1).clamp(-1, 1)


def dcgan_init_(module: nn.Module) -> None:
    """DCGAN's initialisation: convolutions N(0, 0.02), batch-norm scales N(1, 0.02), biases 0.

    Draws from the global generator: call it inside ``torch.random.fork_rng`` after seeding.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def _halvings(side: int) -> int:
    if side < MIN_SIDE or side & (side - 1):
        raise ValueError(f"the DCGAN side must be a power of two >= {MIN_SIDE}, got {side}")
    return int(math.log2(side)) - 2


class DCGANEncoder(nn.Module):
    """``side x side`` image -> ``out_channels x 1 x 1`` code.

    ``body``: a 4 x 4 stride-2 convolution to ``n_features`` channels with LeakyReLU(0.2), then
    4 x 4 stride-2 convolutions with batch norm and LeakyReLU that double the channels until the
    map is 4 x 4; ``final``: a 4 x 4 convolution without padding to the code. ``forward`` returns
    the code and the body's ``C x 4 x 4`` features (what a discriminator's feature matching
    compares).
    """

    def __init__(self, side: int, in_channels: int, out_channels: int, n_features: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, n_features, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        channels = n_features
        for _ in range(_halvings(side) - 1):
            layers += [
                nn.Conv2d(channels, 2 * channels, 4, 2, 1, bias=False),
                nn.BatchNorm2d(2 * channels),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            channels *= 2
        self.body = nn.Sequential(*layers)
        self.final = nn.Conv2d(channels, out_channels, 4, 1, 0, bias=False)
        self.feature_channels = channels

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.body(images)
        return self.final(features), features


class DCGANDecoder(nn.Module):
    """``in_channels x 1 x 1`` code -> ``side x side`` image in ``[-1, 1]``.

    The mirror of :class:`DCGANEncoder`: a 4 x 4 transposed convolution to a 4 x 4 map, 4 x 4
    stride-2 transposed convolutions with batch norm and ReLU that halve the channels while
    doubling the size, and a last one to ``out_channels`` with Tanh.
    """

    def __init__(self, side: int, in_channels: int, out_channels: int, n_features: int) -> None:
        super().__init__()
        halvings = _halvings(side)
        channels = n_features * 2 ** (halvings - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(in_channels, channels, 4, 1, 0, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        ]
        for _ in range(halvings - 1):
            layers += [
                nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(channels // 2),
                nn.ReLU(inplace=True),
            ]
            channels //= 2
        layers += [nn.ConvTranspose2d(channels, out_channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, code: Tensor) -> Tensor:
        return self.main(code)


D_COLLAPSE = 1e-5
"""Discriminator loss below which D is re-initialised (the authors' code)."""


class SquareGAN(Detector):
    """Base of the GAN detectors: a generator and a discriminator built for one square
    power-of-two side, trained alternately.

    Subclasses call :meth:`_setup_gan` in ``__init__`` and implement
    :meth:`_make_generator` and :meth:`_make_discriminator` (a network for a side; D returns
    ``(logits, features)``) and :meth:`_generator_losses` (the generator's objective).
    """

    hyperparameter_constraints: ClassVar[Mapping[str, Rule]] = {
        "latent_dim": POSITIVE_INT,
        "n_features": POSITIVE_INT,
        "lr": POSITIVE,
        "beta1": UNIT_LEFT_CLOSED,
        "beta2": UNIT_LEFT_CLOSED,
        "epochs": POSITIVE_INT,
    }

    def _setup_gan(
        self,
        *,
        latent_dim: int,
        n_features: int,
        lr: float,
        beta1: float,
        beta2: float,
        loss_weights: Mapping[str, float],
        epochs: int,
        seed: int,
    ) -> None:
        """Keep the hyperparameters GANs share (checked by the subclass's table, which extends
        :attr:`hyperparameter_constraints`), draw the networks' seeds, build."""
        self.latent_dim = latent_dim
        self.n_features = n_features
        self.lr = float(lr)
        self.betas = (float(beta1), float(beta2))
        for key, value in loss_weights.items():
            setattr(self, key, float(value))
        self.epochs = epochs
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        self._generator_seed, self._discriminator_seed = torch.randint(
            2**62, (2,), generator=generator, device="cpu"
        ).tolist()
        self._init_side()

    def _make_generator(self, side: int) -> nn.Module:
        raise NotImplementedError

    def _make_discriminator(self, side: int) -> nn.Module:
        raise NotImplementedError

    def _generator_losses(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
        """The generator's weighted loss on a batch ``x`` in [-1, 1], its parts by name, the
        reconstruction, and D's logits on ``x`` (reused by the discriminator's update)."""
        raise NotImplementedError

    def _init_side(self) -> None:
        self.register_buffer("side", torch.tensor(DEFAULT_SIDE))
        self.register_buffer("fitted", torch.tensor(False))
        self._build(DEFAULT_SIDE)

    def _build(self, side: int) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self._generator_seed)
            self.generator = self._make_generator(side)
            dcgan_init_(self.generator)
        self.discriminator = self._new_discriminator(side, 0)

    def _new_discriminator(self, side: int, count: int) -> nn.Module:
        # Drawn on the CPU from its own seed (the count-th re-initialisation gets seed + count),
        # so that neither the global CPU nor any accelerator generator is touched.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self._discriminator_seed + count)
            discriminator = self._make_discriminator(side)
            dcgan_init_(discriminator)
        return discriminator

    def _reinit_discriminator(self, count: int) -> None:
        # Copied into the existing tensors: the optimizer keeps updating the same parameters.
        fresh = self._new_discriminator(int(self.side), count)
        self.discriminator.load_state_dict(fresh.state_dict())

    def resource_probe(self, images: Tensor) -> None:
        """A training step's forward: the networks built on the meta device for the batch's
        side (they are built per side at the first batch), the generator's losses and the
        discriminator on the reconstruction."""
        side = network_side(*images.shape[-2:])
        with meta_init():
            self._build(side)
        self.side = torch.tensor(side)
        x, _ = self._network_input(images)
        _, _, reconstruction, _ = self._generator_losses(x)
        self.discriminator(reconstruction.detach())

    def fit(
        self,
        train: Iterable[Batch],
        *,
        epochs: int | None = None,
        on_epoch_end: EpochCallback | None = None,
    ) -> dict[str, Any]:
        """Train generator and discriminator alternately, one Adam step each per batch.

        ``on_epoch_end(epoch, metrics)`` runs after every epoch with the epoch's mean weighted
        generator loss (``"loss"``), its parts and the discriminator's loss (``"d_loss"``), and
        stops training when it returns True. D is re-initialised whenever its loss collapses
        below :data:`D_COLLAPSE`. The networks are rebuilt for the first batch's side when they
        were built for another.
        """
        n_epochs = self.epochs if epochs is None else check_epochs(self.name, epochs, "fit epochs")
        optimizers: dict[str, torch.optim.Optimizer] = {}
        reinits = 0

        def step(images: Tensor) -> dict[str, float]:
            nonlocal reinits
            if not optimizers:
                self._prepare_side(images)
                for key, net in (("g", self.generator), ("d", self.discriminator)):
                    optimizers[key] = torch.optim.Adam(
                        net.parameters(), lr=self.lr, betas=self.betas
                    )
            x, _ = self._network_input(images)
            loss, parts, reconstruction, real_logits = self._generator_losses(x)
            optimizers["g"].zero_grad(set_to_none=True)
            loss.backward()
            optimizers["g"].step()

            fake_logits, _ = self.discriminator(reconstruction.detach())
            d_loss = 0.5 * (
                F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
            )
            optimizers["d"].zero_grad(set_to_none=True)
            d_loss.backward()
            optimizers["d"].step()
            d_value = float(d_loss.detach())
            if d_value < D_COLLAPSE:
                reinits += 1
                self._reinit_discriminator(reinits)
            return {
                "loss": float(loss.detach()),
                **{key: float(value.detach()) for key, value in parts.items()},
                "d_loss": d_value,
            }

        def end_of_epoch(epoch: int, means: dict[str, float]) -> None:
            self.fitted.fill_(True)

        epochs_run, means = train_epochs(
            self, train, step, epochs=n_epochs, on_epoch_end=on_epoch_end, end_of_epoch=end_of_epoch
        )
        return {
            "epochs": epochs_run,
            "loss": means.get("loss", math.nan),
            "d_loss": means.get("d_loss", math.nan),
            "discriminator_reinits": reinits,
        }

    def _rebuild(self, side: int) -> None:
        device = self.side.device
        self._build(side)
        self.side.fill_(side)
        self.fitted.fill_(False)
        self.to(device)

    def _prepare_side(self, images: Tensor) -> None:
        """Build the networks for the training images' side, if they are not already."""
        height, width = images.shape[-2:]
        if max(height, width) < MIN_SIDE:
            raise ModelError(
                f"{self.name}: images must be at least {MIN_SIDE} px on their longer side, "
                f"got {height} x {width}"
            )
        side = network_side(height, width)
        if side != int(self.side):
            self._rebuild(side)

    def _network_input(self, images: Tensor) -> tuple[Tensor, tuple[int, int, int, int]]:
        """Images in ``[-1, 1]`` placed on the networks' square, and the box they occupy.

        The images are zero-padded (mid-grey), centred; images whose own side differs from the
        networks' (only at prediction) are first resized by the ratio of the two sides.
        """
        x = to_tanh_range(images)
        side = int(self.side)
        height, width = x.shape[-2:]
        natural = network_side(height, width)
        if natural != side:
            scale = side / natural
            height, width = max(1, round(height * scale)), max(1, round(width * scale))
            x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
        top, left = (side - height) // 2, (side - width) // 2
        x = F.pad(x, (left, side - width - left, top, side - height - top))
        return x, (top, left, height, width)

    @staticmethod
    def _input_map(maps: Tensor, box: tuple[int, int, int, int], size: tuple[int, int]) -> Tensor:
        """``B x side x side`` maps cropped to the image's box and resized to ``size``."""
        top, left, height, width = box
        maps = maps[:, top : top + height, left : left + width]
        if (height, width) != tuple(size):
            maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)
            maps = maps[:, 0]
        return maps

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Load a state dict, first rebuilding the networks for the side it was trained at."""
        side = state_dict.get("side")
        if side is not None and int(side) != int(self.side):
            self._rebuild(int(side))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
