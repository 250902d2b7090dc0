"""Vector quantisation and a two-level VQ-VAE (van den Oord et al., "Neural Discrete
Representation Learning", NeurIPS 2017; Razavi et al., "Generating Diverse High-Fidelity
Images with VQ-VAE-2", NeurIPS 2019).

An encoder maps an image to feature vectors on a grid; each vector is replaced by its nearest
entry of a learned codebook, and a decoder reconstructs the image from those entries alone. The
two-level model quantises a stride-8 ("top") grid first and a stride-4 ("bottom") grid
conditioned on the decoded top level, so the top codes carry the coarse layout and the bottom
ones the detail. The codebooks learn by exponential moving averages of the encoder outputs
assigned to them (VQ-VAE's EMA variant); the encoders learn through the straight-through
estimator plus a commitment loss that keeps their outputs near their codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LatentDecoder", "TwoLevelVQVAE", "VectorQuantizer"]

COMMITMENT_COST = 0.25
"""Weight of the commitment loss (VQ-VAE's beta)."""
EMA_DECAY = 0.99
"""Decay of the codebook's moving averages (VQ-VAE's EMA variant)."""


class VectorQuantizer(nn.Module):
    """A codebook of ``num_embeddings`` vectors of size ``embedding_dim``, learned by EMA.

    The codebook is a parameter without gradient (it is updated in place by :meth:`update`),
    so it counts as a frozen weight once the quantiser is trained and survives state dicts.

    Args:
        num_embeddings: codebook size K.
        embedding_dim: size D of every code vector (the channels of the quantised maps).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.codebook = nn.Parameter(torch.randn(num_embeddings, embedding_dim), False)
        self.register_buffer("cluster_size", torch.ones(num_embeddings))
        self.register_buffer("embed_sum", self.codebook.detach().clone())
        self.register_buffer("initialised", torch.tensor(False))
        # Training-only bookkeeping for restarts, not part of the state.
        self._usage: Tensor | None = None
        self._recent: Tensor | None = None

    @property
    def num_embeddings(self) -> int:
        return self.codebook.shape[0]

    def nearest(self, flat: Tensor) -> Tensor:
        """Index of the nearest codebook entry of every row of ``flat`` (N x D)."""
        codebook = self.codebook.detach()
        distances = (
            flat.square().sum(1, keepdim=True)
            - 2 * flat @ codebook.T
            + codebook.square().sum(1)[None]
        )
        return distances.argmin(1)

    def lookup(self, indices: Tensor) -> Tensor:
        """Codebook vectors of a ``B x h x w`` index map, as a ``B x D x h x w`` map."""
        return self.codebook.detach()[indices].permute(0, 3, 1, 2)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Quantise a ``B x D x h x w`` map.

        Returns the quantised map (with straight-through gradients to ``features``), the
        ``B x h x w`` code indices and the commitment loss.
        """
        flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        indices = self.nearest(flat.detach()).view(features.shape[0], *features.shape[2:])
        quantised = self.lookup(indices)
        commitment = F.mse_loss(features, quantised)
        return features + (quantised - features).detach(), indices, commitment

    @torch.no_grad()
    def initialise(self, features: Tensor, generator: torch.Generator) -> None:
        """Start every entry on a random encoder output of ``features`` (the first batch).

        Entries drawn from the data are all used from the first step, where random ones far
        from the encoder's outputs would never be chosen.
        """
        flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        rows = torch.randint(len(flat), (self.num_embeddings,), generator=generator)
        jitter = torch.randn(self.codebook.shape, generator=generator).to(flat)
        start = flat[rows.to(flat.device)] + 1e-3 * flat.std() * jitter
        self.codebook.copy_(start)
        self.embed_sum.copy_(start)
        self.cluster_size.fill_(1.0)
        self.initialised.fill_(True)

    @torch.no_grad()
    def update(self, features: Tensor, indices: Tensor) -> None:
        """One EMA step of the codebook towards the encoder outputs assigned to each entry."""
        flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        flat_indices = indices.reshape(-1)
        counts = torch.bincount(flat_indices, minlength=self.num_embeddings).to(flat)
        sums = torch.zeros_like(self.embed_sum).index_add_(0, flat_indices, flat)
        self.cluster_size.mul_(EMA_DECAY).add_(counts, alpha=1 - EMA_DECAY)
        self.embed_sum.mul_(EMA_DECAY).add_(sums, alpha=1 - EMA_DECAY)
        # Laplace smoothing keeps the division finite for entries that were never assigned.
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + 1e-5) / (total + self.num_embeddings * 1e-5) * total
        self.codebook.copy_(self.embed_sum / smoothed[:, None])
        if self._usage is None:
            self._usage = torch.zeros_like(counts)
        self._usage += counts
        self._recent = flat

    @torch.no_grad()
    def restart_unused(self, generator: torch.Generator) -> int:
        """Move every entry no encoder output chose since the last call onto a random encoder
        output of the latest batch; returns how many moved.

        Called once per epoch: an entry unused for a whole epoch is dead, and without restarts
        the codebook of a near-uniform training set shrinks to a handful of entries (the
        encoder outputs collapse onto them), leaving the decoder blind to local detail.
        """
        if self._usage is None or self._recent is None:
            return 0
        dead = (self._usage == 0).nonzero().flatten()
        if len(dead):
            flat = self._recent
            rows = torch.randint(len(flat), (len(dead),), generator=generator).to(flat.device)
            # The jitter separates entries restarted on the same output.
            jitter = torch.randn(len(dead), flat.shape[1], generator=generator).to(flat)
            start = flat[rows] + 1e-2 * flat.std() * jitter
            self.codebook[dead] = start
            self.embed_sum[dead] = start
            self.cluster_size[dead] = 1.0
        self._usage, self._recent = None, None
        return len(dead)


class ResidualStack(nn.Module):
    """``n_layers`` residual blocks (ReLU, 3x3 conv to ``hidden``, ReLU, 1x1 conv back)."""

    def __init__(self, channels: int, hidden: int, n_layers: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(),
                nn.Conv2d(channels, hidden, 3, padding=1, bias=False),
                nn.ReLU(),
                nn.Conv2d(hidden, channels, 1, bias=False),
            )
            for _ in range(n_layers)
        )

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = x + block(x)
        return F.relu(x)


def _down(in_channels: int, out_channels: int) -> nn.Conv2d:
    # 4x4 stride-2 convolutions halve even sizes exactly, as VQ-VAE's encoders do.
    return nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1)


def _up(in_channels: int, out_channels: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1)


class LatentDecoder(nn.Module):
    """Image from a pair of quantised maps: the top one upsampled to the bottom grid and
    concatenated with it, a 3x3 conv and residual stack, then two x2 transposed convolutions.

    Args:
        embedding_dim: channels D of both quantised maps.
        hidden: channels of the decoder's body.
        residual_hidden: channels inside the residual blocks.
        n_residual: residual blocks.
        out_channels: channels of the output image.
    """

    def __init__(
        self,
        embedding_dim: int,
        hidden: int,
        residual_hidden: int,
        n_residual: int,
        out_channels: int = 3,
    ):
        super().__init__()
        self.upsample_top = _up(embedding_dim, embedding_dim)
        self.body = nn.Sequential(
            nn.Conv2d(2 * embedding_dim, hidden, 3, padding=1),
            ResidualStack(hidden, residual_hidden, n_residual),
            _up(hidden, hidden // 2),
            nn.ReLU(),
            _up(hidden // 2, out_channels),
        )

    def forward(self, top: Tensor, bottom: Tensor) -> Tensor:
        return self.body(torch.cat([self.upsample_top(top), bottom], dim=1))


class TwoLevelVQVAE(nn.Module):
    """VQ-VAE-2-style discrete latent model with a stride-8 and a stride-4 codebook.

    Inputs are images in [0, 1] whose sides are multiples of 8.

    Args:
        hidden: channels of the encoders and the decoder.
        residual_hidden: channels inside their residual blocks.
        n_residual: residual blocks per encoder and in the decoder.
        embedding_dim: size D of the code vectors.
        num_embeddings: entries K of each of the two codebooks.
    """

    def __init__(
        self,
        hidden: int,
        residual_hidden: int,
        n_residual: int,
        embedding_dim: int,
        num_embeddings: int,
    ):
        super().__init__()
        self.encoder_bottom = nn.Sequential(
            _down(3, hidden // 2),
            nn.ReLU(),
            _down(hidden // 2, hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            ResidualStack(hidden, residual_hidden, n_residual),
        )
        self.encoder_top = nn.Sequential(
            _down(hidden, hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            ResidualStack(hidden, residual_hidden, n_residual),
        )
        self.pre_quantise_top = nn.Conv2d(hidden, embedding_dim, 1)
        self.vq_top = VectorQuantizer(num_embeddings, embedding_dim)
        # The bottom level sees the decoded top codes, so it only adds what they miss.
        self.top_to_bottom = _up(embedding_dim, embedding_dim)
        self.pre_quantise_bottom = nn.Conv2d(hidden + embedding_dim, embedding_dim, 1)
        self.vq_bottom = VectorQuantizer(num_embeddings, embedding_dim)
        self.decoder = LatentDecoder(embedding_dim, hidden, residual_hidden, n_residual)

    @property
    def quantisers(self) -> tuple[VectorQuantizer, VectorQuantizer]:
        return self.vq_top, self.vq_bottom

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Quantise both levels.

        Returns ``top``/``bottom`` (quantised maps, straight-through), ``top_index``/
        ``bottom_index`` and ``commitment`` (the summed commitment losses). With a
        ``generator`` (training), uninitialised codebooks start on this batch's features.
        """
        hidden = self.encoder_bottom(images)
        top_features = self.pre_quantise_top(self.encoder_top(hidden))
        if generator is not None and not bool(self.vq_top.initialised):
            self.vq_top.initialise(top_features.detach(), generator)
        top, top_index, top_commitment = self.vq_top(top_features)
        bottom_features = self.pre_quantise_bottom(
            torch.cat([hidden, self.top_to_bottom(top)], dim=1)
        )
        if generator is not None and not bool(self.vq_bottom.initialised):
            self.vq_bottom.initialise(bottom_features.detach(), generator)
        bottom, bottom_index, bottom_commitment = self.vq_bottom(bottom_features)
        return {
            "top": top,
            "bottom": bottom,
            "top_index": top_index,
            "bottom_index": bottom_index,
            "top_features": top_features,
            "bottom_features": bottom_features,
            "commitment": top_commitment + bottom_commitment,
        }

    def decode(self, top: Tensor, bottom: Tensor) -> Tensor:
        return self.decoder(top, bottom)

    def restart_unused(self, generator: torch.Generator) -> dict[str, int]:
        """Restart the entries of both codebooks unused since the last call (once an epoch)."""
        return {
            "restarted_top": self.vq_top.restart_unused(generator),
            "restarted_bottom": self.vq_bottom.restart_unused(generator),
        }

    def training_step(self, images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Reconstruction + commitment loss of a batch, and the EMA update of both codebooks.

        Returns (total loss to back-propagate, reconstruction loss).
        """
        codes = self.encode(images, generator)
        reconstruction = F.mse_loss(self.decode(codes["top"], codes["bottom"]), images)
        self.vq_top.update(codes["top_features"].detach(), codes["top_index"])
        self.vq_bottom.update(codes["bottom_features"].detach(), codes["bottom_index"])
        return reconstruction + COMMITMENT_COST * codes["commitment"], reconstruction
