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

from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import Prediction, register
from models.components.dcgan import DCGANDecoder, DCGANEncoder, SquareGAN
from models.constraints import NON_NEGATIVE, Rule
from models.errors import ModelError

__all__ = ["GANomaly"]


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

    hyperparameter_constraints: ClassVar[Mapping[str, Rule]] = {
        **SquareGAN.hyperparameter_constraints,
        "wadv": NON_NEGATIVE,
        "wcon": NON_NEGATIVE,
        "wenc": NON_NEGATIVE,
    }

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
        self._setup_gan(
            latent_dim=latent_dim,
            n_features=n_features,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            loss_weights={"wadv": wadv, "wcon": wcon, "wenc": wenc},
            epochs=epochs,
            seed=seed,
        )

    def _make_generator(self, side: int) -> nn.Module:
        return _Generator(side, self.latent_dim, self.n_features)

    def _make_discriminator(self, side: int) -> nn.Module:
        # D outputs a logit (BCE with logits is the paper's sigmoid + BCE, computed stably).
        return DCGANEncoder(side, 3, 1, self.n_features)

    def _generator_losses(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
        """Feature-matching adversarial, L1 contextual and L2 encoder losses (``fit``'s
        metrics ``adv``, ``con``, ``enc``)."""
        reconstruction, z, z_again = self.generator(x)
        # D's pass on the real images serves both updates: the generator step leaves D as is.
        real_logits, real_features = self.discriminator(x)
        _, fake_features = self.discriminator(reconstruction)
        adv = F.mse_loss(fake_features, real_features.detach())
        con = F.l1_loss(reconstruction, x)
        enc = F.mse_loss(z_again, z)
        loss = self.wadv * adv + self.wcon * con + self.wenc * enc
        return loss, {"adv": adv, "con": con, "enc": enc}, reconstruction, real_logits

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        """Score a batch: the mean squared difference of the codes z and z' of each image."""
        if not bool(self.fitted):
            raise ModelError("ganomaly: predict called before fit")
        x, _ = self._network_input(images.to(self.side.device))
        _, z, z_again = self.generator(x)
        return Prediction(score=(z - z_again).square().mean(1), anomaly_map=None)
