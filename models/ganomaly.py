"""GANomaly (Akçay, Atapour-Abarghouei & Breckon, "GANomaly: Semi-Supervised Anomaly Detection
via Adversarial Training", ACCV 2018).

An encoder-decoder-encoder generator is trained, on normal images only, to reconstruct them: the
first encoder G_E maps an image x to a latent code z, the decoder G_D maps z back to an image
x_hat, and a second encoder E maps x_hat to z'. Three losses train it: a contextual L1 loss
between x and x_hat (weight ``wcon`` 50), an encoder L2 loss between z and z' (``wenc`` 1), and an
adversarial loss (``wadv`` 1), the L2 distance between the features a DCGAN discriminator D
extracts from x and from x_hat (feature matching). D itself learns with binary cross-entropy to
tell x from x_hat and, as in the authors' code, is re-initialised whenever its loss collapses
below 1e-5 (a perfect discriminator gives the generator no gradient). At test time an anomaly,
which the generator never learned to reproduce, is reconstructed as something normal, so its
two codes disagree: the score is the mean squared difference ||z - z'||^2 / latent_dim.
GANomaly scores images only (``localizes = False``), as in the reference study.

Networks: DCGAN stacks (``models.components.dcgan``) whose depth follows the image side, which
must be a power of two: other sizes are zero-padded (mid-grey) to the next power of two of the
longer side, and sides below 16 px are refused. Images are taken from ImageNet normalisation to
the paper's [-1, 1] range (the decoder ends with Tanh). With the paper's 64 features and a
100-d code, the four networks at 256 px hold 188M parameters, the figure of the study's Table 2.

Defaults: the reference study's Table B.8 (256 px, batch size 32, 100 epochs, Adam with lr 2e-4
and betas (0.5, 0.999), wadv 1, wcon 50, wenc 1) and the paper's ``latent_dim`` 100 and
``n_features`` 64. The image size and batch size belong to the data pipeline. The paper
min-max-scales scores over the test set; that is left to the evaluation (AUROC ignores it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import (
    Batch,
    EpochCallback,
    ModelError,
    Prediction,
    check_epochs,
    register,
    train_epochs,
)
from models.components.dcgan import DCGANDecoder, DCGANEncoder, SquareGAN, dcgan_init_

__all__ = ["GANomaly"]

D_COLLAPSE = 1e-5
"""Discriminator loss below which D is re-initialised (the authors' code)."""


class _Generator(nn.Module):
    """G_E -> G_D -> E: image -> z -> reconstruction -> z'."""

    def __init__(self, side: int, latent_dim: int, n_features: int) -> None:
        super().__init__()
        self.encoder = DCGANEncoder(side, 3, latent_dim, n_features)
        self.decoder = DCGANDecoder(side, latent_dim, 3, n_features)
        self.reencoder = DCGANEncoder(side, 3, latent_dim, n_features)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z, _ = self.encoder(images)
        reconstruction = self.decoder(z)
        z_again, _ = self.reencoder(reconstruction)
        return reconstruction, z.flatten(1), z_again.flatten(1)


@register("ganomaly")
class GANomaly(SquareGAN):
    """Encoder-decoder-encoder GAN scored by the distance of its two latent codes."""

    learning_type = "iterative"
    localizes = False

    def __init__(
        self,
        latent_dim: int = 100,
        n_features: int = 64,
        lr: float = 2e-4,
        beta1: float = 0.5,
        beta2: float = 0.999,
        wadv: float = 1.0,
        wcon: float = 50.0,
        wenc: float = 1.0,
        epochs: int = 100,
        seed: int = 0,
    ) -> None:
        """
        Args:
            latent_dim: size of the latent code z (the paper's nz, 100).
            n_features: channels of the first convolution of every network (the paper's
                ngf/ndf, 64); each halving layer doubles them.
            lr: Adam learning rate of the generator and of the discriminator.
            beta1: Adam's first-moment decay (0.5, DCGAN's choice, steadies GAN training).
            beta2: Adam's second-moment decay.
            wadv: weight of the adversarial (discriminator feature-matching) loss.
            wcon: weight of the contextual L1 reconstruction loss.
            wenc: weight of the L2 loss between the codes z and z'.
            epochs: training epochs when ``fit`` is not given a budget.
            seed: seeds the initialisation of the networks and the discriminator's
                re-initialisations.
        """
        super().__init__()
        for name, value in (("latent_dim", latent_dim), ("n_features", n_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelError(f"ganomaly: {name} must be a positive int, got {value!r}")
        if not isinstance(lr, int | float) or not lr > 0:
            raise ModelError(f"ganomaly: lr must be > 0, got {lr!r}")
        for name, value in (("beta1", beta1), ("beta2", beta2)):
            if not isinstance(value, int | float) or not 0 <= value < 1:
                raise ModelError(f"ganomaly: {name} must be in [0, 1), got {value!r}")
        for name, value in (("wadv", wadv), ("wcon", wcon), ("wenc", wenc)):
            if not isinstance(value, int | float) or not value >= 0:
                raise ModelError(f"ganomaly: {name} must be >= 0, got {value!r}")
        self.latent_dim = latent_dim
        self.n_features = n_features
        self.lr = float(lr)
        self.betas = (float(beta1), float(beta2))
        self.wadv, self.wcon, self.wenc = float(wadv), float(wcon), float(wenc)
        self.epochs = check_epochs("ganomaly", epochs)
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        self._generator_seed, self._discriminator_seed = torch.randint(
            2**62, (2,), generator=generator, device="cpu"
        ).tolist()
        self._init_side()

    def _build(self, side: int) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self._generator_seed)
            self.generator = _Generator(side, self.latent_dim, self.n_features)
            dcgan_init_(self.generator)
        self.discriminator = self._new_discriminator(side, 0)

    def _new_discriminator(self, side: int, count: int) -> nn.Module:
        # Drawn on the CPU from its own seed (the count-th re-initialisation gets seed + count),
        # so that neither the global CPU nor any accelerator generator is touched.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self._discriminator_seed + count)
            # D outputs a logit (BCE with logits is the paper's sigmoid + BCE, computed stably).
            discriminator = DCGANEncoder(side, 3, 1, self.n_features)
            dcgan_init_(discriminator)
        return discriminator

    def _reinit_discriminator(self, count: int) -> None:
        # Copied into the existing tensors: the optimizer keeps updating the same parameters.
        fresh = self._new_discriminator(int(self.side), count)
        self.discriminator.load_state_dict(fresh.state_dict())

    def fit(
        self,
        train: Iterable[Batch],
        *,
        epochs: int | None = None,
        on_epoch_end: EpochCallback | None = None,
    ) -> dict[str, Any]:
        """Train generator and discriminator alternately, one Adam step each per batch.

        ``on_epoch_end(epoch, metrics)`` runs after every epoch with the epoch's mean weighted
        generator loss (``"loss"``), its three parts (``"adv"``, ``"con"``, ``"enc"``) and the
        discriminator's loss (``"d_loss"``), and stops training when it returns True. The
        networks are rebuilt for the first batch's side when they were built for another.
        """
        n_epochs = self.epochs if epochs is None else check_epochs("ganomaly", epochs, "fit epochs")
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
            reconstruction, z, z_again = self.generator(x)

            # D's pass on the real images serves both updates: the generator step leaves D as is.
            real_logits, real_features = self.discriminator(x)
            _, fake_features = self.discriminator(reconstruction)
            adv = F.mse_loss(fake_features, real_features.detach())
            con = F.l1_loss(reconstruction, x)
            enc = F.mse_loss(z_again, z)
            loss = self.wadv * adv + self.wcon * con + self.wenc * enc
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
            if float(d_loss.detach()) < D_COLLAPSE:
                reinits += 1
                self._reinit_discriminator(reinits)
            return {
                "loss": float(loss.detach()),
                "adv": float(adv.detach()),
                "con": float(con.detach()),
                "enc": float(enc.detach()),
                "d_loss": float(d_loss.detach()),
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

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        """Score a batch: the mean squared difference of the codes z and z' of each image."""
        if not bool(self.fitted):
            raise ModelError("ganomaly: predict called before fit")
        x, _ = self._network_input(images.to(self.side.device))
        _, z, z_again = self.generator(x)
        return Prediction(score=(z - z_again).square().mean(1), anomaly_map=None)
