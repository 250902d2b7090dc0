"""Skip-GANomaly (Akçay, Atapour-Abarghouei & Breckon, "Skip-GANomaly: Skip Connected and
Adversarially Trained Encoder-Decoder Anomaly Detection", IJCNN 2019).

A U-Net generator with skip connections between encoder and decoder at every scale reconstructs
normal images; a DCGAN discriminator tells input from reconstruction and also provides a latent
representation f (its last convolution's ``latent_dim`` outputs). The generator minimises
``w_adv`` L_adv (fool the discriminator: BCE of D(x_hat) against "real"), ``w_con`` L_con (L1
between x and x_hat) and ``w_lat`` L_lat (L2 between f(x) and f(x_hat)); the discriminator learns
with BCE and is re-initialised whenever its loss collapses below 1e-5, as in the authors' code.
The skips let the generator keep fine detail of normal images, while the adversarial and latent
losses keep it from learning the identity, so an anomaly comes out "repaired".

Score (the paper's): ``lambda_score * R(x) + (1 - lambda_score) * L(x)`` with the reconstruction
error R the mean absolute difference of x and x_hat (L1) and the latent error L the mean squared
difference of f(x) and f(x_hat) (L2). The paper min-max-scales both over the test set; here each
image's score stands alone, so scores do not depend on the batch (the AUROC of one term is
unchanged, the weighting of the two is on their raw scales). Anomaly map (our choice: the paper
scores images only): the per-pixel absolute reconstruction error averaged over the colour
channels, the pixel-wise version of R, so ``localizes = True``.

Networks: the U-Net halves the image down to 1 x 1 (log2(side) levels, the authors' code) with
``n_features`` channels at the first level, doubling to at most 8x; the discriminator is the DCGAN
encoder of ``models.components.dcgan`` with a 1 x 1 classifier on its latent. Sides are powers of
two (other sizes are zero-padded, mid-grey, to the next power of two of the longer side; below
16 px is refused); pixels are in the paper's [-1, 1] (Tanh output).

Defaults: the reference seed (Zipfel et al. 2023, Table 9): 256 px, 30 epochs (the paper's 15),
Adam lr 2e-4 with beta1 0.5, latent size 100, weights 1 / 50 / 1; lambda 0.9 (paper). Their
"lambda" learning-rate policy keeps the rate constant for the first ``niter`` epochs, which here
is the whole training, so the rate is constant. The authors' code also adds noise to the
generator's input and the latent loss to the discriminator's; neither is in the paper, and
neither is done here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import Prediction, register
from models.components.dcgan import DCGANEncoder, SquareGAN
from models.constraints import NON_NEGATIVE, Interval, Rule
from models.errors import ModelError

__all__ = ["SkipGANomaly", "UNetGenerator"]


class UNetGenerator(nn.Module):
    """U-Net from ``side x side`` down to 1 x 1 and back, with a skip at every level.

    Level ``i`` (0 = outermost) halves the map with a 4 x 4 stride-2 convolution to
    ``min(n_features * 2**i, 8 * n_features)`` channels (LeakyReLU(0.2) before, batch norm after
    but at the outermost and innermost levels); on the way up, a ReLU and a 4 x 4 stride-2
    transposed convolution take the concatenation of the level's encoder output and the deeper
    decoder output back to the level's input channels (batch norm after, Tanh at the top).
    """

    def __init__(self, side: int, n_features: int, channels: int = 3) -> None:
        super().__init__()
        depth = int(math.log2(side))
        widths = [min(n_features * 2**i, 8 * n_features) for i in range(depth)]
        self.down = nn.ModuleList()
        self.up = nn.ModuleList()
        for i in range(depth):
            inner = i == depth - 1
            layers: list[nn.Module] = [] if i == 0 else [nn.LeakyReLU(0.2)]
            source = channels if i == 0 else widths[i - 1]
            normed = 0 < i < depth - 1
            layers.append(nn.Conv2d(source, widths[i], 4, 2, 1, bias=False))
            if normed:
                layers.append(nn.BatchNorm2d(widths[i]))
            self.down.append(nn.Sequential(*layers))
            up_in = widths[i] if inner else 2 * widths[i]
            up: list[nn.Module] = [
                nn.ReLU(),
                nn.ConvTranspose2d(up_in, source, 4, 2, 1, bias=i == 0),
                nn.Tanh() if i == 0 else nn.BatchNorm2d(source),
            ]
            self.up.append(nn.Sequential(*up))

    def forward(self, images: Tensor) -> Tensor:
        skips = []
        x = images
        for down in self.down:
            x = down(x)
            skips.append(x)
        x = self.up[-1](skips[-1])
        for i in range(len(self.up) - 2, -1, -1):
            x = self.up[i](torch.cat([skips[i], x], dim=1))
        return x


class _Discriminator(nn.Module):
    """DCGAN encoder to a ``latent_dim`` code f(x), and a linear real/fake logit on it."""

    def __init__(self, side: int, latent_dim: int, n_features: int) -> None:
        super().__init__()
        self.encoder = DCGANEncoder(side, 3, latent_dim, n_features)
        self.classifier = nn.Conv2d(latent_dim, 1, 1, bias=False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        latent, _ = self.encoder(images)
        return self.classifier(latent).flatten(), latent.flatten(1)


@register("skip_ganomaly")
class SkipGANomaly(SquareGAN):
    """U-Net GAN scored by reconstruction and discriminator-latent errors."""

    learning_type = "iterative"
    localizes = True

    hyperparameter_constraints: ClassVar[Mapping[str, Rule]] = {
        **SquareGAN.hyperparameter_constraints,
        "w_adv": NON_NEGATIVE,
        "w_con": NON_NEGATIVE,
        "w_lat": NON_NEGATIVE,
        "lambda_score": Interval(float, 0, 1),
    }

    def __init__(
        self,
        latent_dim: int = 100,
        n_features: int = 64,
        lr: float = 2e-4,
        beta1: float = 0.5,
        beta2: float = 0.999,
        w_adv: float = 1.0,
        w_con: float = 50.0,
        w_lat: float = 1.0,
        lambda_score: float = 0.9,
        epochs: int = 30,
        seed: int = 0,
    ) -> None:
        """
        Args:
            latent_dim: size of the discriminator's latent representation f (the code's nz).
            n_features: channels of the first level of the U-Net and of the discriminator
                (ngf/ndf, 64); deeper levels double them (the U-Net up to 8x).
            lr: Adam learning rate of generator and discriminator.
            beta1: Adam's first-moment decay (0.5, as DCGAN).
            beta2: Adam's second-moment decay.
            w_adv: weight of the adversarial loss.
            w_con: weight of the contextual L1 reconstruction loss.
            w_lat: weight of the L2 loss between the discriminator latents of x and x_hat.
            lambda_score: weight of the reconstruction error in the score (the latent error
                gets ``1 - lambda_score``).
            epochs: training epochs when ``fit`` is not given a budget.
            seed: seeds the initialisation of the networks and the discriminator's
                re-initialisations.
        """
        super().__init__()
        self.lambda_score = float(lambda_score)
        self._setup_gan(
            latent_dim=latent_dim,
            n_features=n_features,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            loss_weights={"w_adv": w_adv, "w_con": w_con, "w_lat": w_lat},
            epochs=epochs,
            seed=seed,
        )

    def _make_generator(self, side: int) -> nn.Module:
        return UNetGenerator(side, self.n_features)

    def _make_discriminator(self, side: int) -> nn.Module:
        return _Discriminator(side, self.latent_dim, self.n_features)

    def _generator_losses(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
        """Adversarial BCE, L1 contextual and discriminator-latent L2 losses (``fit``'s
        metrics ``adv``, ``con``, ``lat``)."""
        reconstruction = self.generator(x)
        # D's pass on the real images serves both updates: the generator step leaves D as is.
        real_logits, real_latent = self.discriminator(x)
        fake_logits, fake_latent = self.discriminator(reconstruction)
        adv = F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
        con = F.l1_loss(reconstruction, x)
        lat = F.mse_loss(fake_latent, real_latent.detach())
        loss = self.w_adv * adv + self.w_con * con + self.w_lat * lat
        return loss, {"adv": adv, "con": con, "lat": lat}, reconstruction, real_logits

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        """Score a batch: the weighted reconstruction and latent errors; map: the per-pixel
        absolute reconstruction error (mean over colour channels) at input resolution."""
        if not bool(self.fitted):
            raise ModelError("skip_ganomaly: predict called before fit")
        images = images.to(self.side.device)
        x, box = self._network_input(images)
        reconstruction = self.generator(x)
        _, real_latent = self.discriminator(x)
        _, fake_latent = self.discriminator(reconstruction)
        error = (x - reconstruction).abs().mean(1)
        anomaly_map = self._input_map(error, box, tuple(images.shape[-2:]))
        # R over the image itself: the padding around it is no part of the input.
        reconstruction_error = anomaly_map.flatten(1).mean(1)
        latent_error = (real_latent - fake_latent).square().mean(1)
        score = self.lambda_score * reconstruction_error + (1 - self.lambda_score) * latent_error
        return Prediction(score=score, anomaly_map=anomaly_map)
