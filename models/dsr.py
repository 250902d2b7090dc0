"""DSR (Zavrtanik, Kristan & Skočaj, "DSR - A Dual Subspace Re-Projection Network for Surface
Anomaly Detection", ECCV 2022).

A two-level VQ-VAE (stride-8 and stride-4 codebooks, ``models.components.vq``) describes any
image by entries of its codebooks, and its general decoder turns them back into the image: what
an anomaly looks like survives quantisation. DSR learns on top of that frozen "general
appearance" model:

* anomalies are made in the quantised space: inside a Perlin-noise mask
  (``data.anomalies.perlin_mask``) on one or both grids, each code is swapped for a random
  codebook entry that is neither among the 5 % nearest to it nor farther than a per-image
  strength allows, so they range from near-in-distribution to gross;
* a subspace restriction module per level (a small U-Net, then re-quantisation with the same
  codebook) learns to map such codes back to the normal ones (L2 to the clean codes), and an
  object-specific decoder turns the restricted codes into the anomaly-free image (L2 to the
  input);
* an anomaly detection module (a U-Net on the concatenation of the general decoder's image,
  which shows the anomaly, and the object-specific one, which does not) learns the anomaly
  mask with a focal loss;
* in a last phase, with everything else frozen, an upsampling module (a U-Net on the image,
  the object-specific reconstruction and the coarse mask) learns to sharpen the mask, which is
  only as fine as the latent grids, on image-space Perlin anomalies
  (``data.anomalies.PerlinBlend``, DRAEM's) with a focal loss.

The anomaly map is the upsampling module's anomaly probability; the image score is the
maximum of that map smoothed by a mean filter. The paper pretrains the VQ-VAE on ImageNet and
freezes it; offline it is either loaded from ``vq_weights`` or trained on the training images in
a first phase. One ``fit`` runs the phases back to back within one epoch budget and reports
every epoch (``phase`` 1: VQ-VAE, 2: the DSR modules, 3: upsampling), so ASHA and time budgets
see a single run. The study trains with batch 8 (the caller's batches) on un-normalised
images: inputs arrive ImageNet-normalised and are mapped back to [0, 1] here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.anomalies import PerlinBlend, perlin_mask
from data.errors import DatasetError
from data.transforms import IMAGENET_MEAN, IMAGENET_STD
from models.backbones import load_state_dict_file, state_dict_problems
from models.base import (
    Batch,
    Detector,
    EpochCallback,
    Prediction,
    check_epochs,
    register,
    train_epochs,
)
from models.components.vq import LatentDecoder, TwoLevelVQVAE, VectorQuantizer
from models.constraints import (
    EVEN,
    NON_NEGATIVE_INT,
    ODD,
    POSITIVE,
    POSITIVE_INT,
    AllOf,
    Interval,
    Rule,
    check_hyperparameters,
    multiple_of,
)
from models.errors import ModelError
from models.parts import FolderImages, check_part_kind, describe_part, list_images, save_part

__all__ = [
    "DSR",
    "VQ_KIND",
    "GeneralVQ",
    "UNet",
    "focal_loss",
    "phase_epochs",
    "train_general_vq",
    "vq_phase",
]

FOCAL_GAMMA = 2.0
"""Focusing parameter of the focal loss (the usual 2)."""
NEAREST_EXCLUDED = 0.05
"""Share of the codebook nearest to a code never used as its replacement: swapping a code for
an almost identical one would teach the detector to flag normal variation."""
ANOMALY_PROBABILITY = 0.5
"""Share of training images that get an anomaly (image-space in the VQ-VAE and upsampling phases,
latent in the DSR phase); the others teach the detection and upsampling modules to stay silent
on normal images."""
STRIDE = 8
"""Input sides are padded to a multiple of the top grid's stride."""


def phase_epochs(
    total: int, upsampling_train_ratio: float, vq_train_ratio: float, train_vq: bool
) -> tuple[int, int, int]:
    """Split an epoch budget into (VQ-VAE, DSR modules, upsampling module) epochs.

    The upsampling phase starts after ``upsampling_train_ratio`` of the budget (the study's
    meaning); the VQ-VAE phase, when it runs here, takes ``vq_train_ratio`` of the budget from
    the front. While the budget allows, the VQ-VAE and then the DSR modules get at least one
    epoch each, since every later phase needs the earlier ones.
    """

    def share(ratio: float) -> int:
        return math.floor(ratio * total + 0.5)

    n_vq = min(total, max(1, share(vq_train_ratio))) if train_vq else 0
    upsampling_start = min(total, max(n_vq + 1, share(upsampling_train_ratio)))
    return n_vq, upsampling_start - n_vq, total - upsampling_start


def focal_loss(logits: Tensor, target: Tensor, gamma: float = FOCAL_GAMMA) -> Tensor:
    """Mean focal loss of ``B x 2 x H x W`` logits against a ``B x H x W`` {0, 1} mask.

    ``-(1 - p_t)^gamma log p_t`` down-weights the many easy normal pixels so the few anomalous
    ones drive the gradient.
    """
    log_p = F.log_softmax(logits, dim=1).gather(1, target.long()[:, None]).squeeze(1)
    return (-((1 - log_p.exp()) ** gamma) * log_p).mean()


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """A U-Net: ``depth`` max-pool halvings with double 3x3 conv blocks, bilinear upsampling to
    each skip's size (so any input size works) and a 1x1 output convolution.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        width: channels of the first level; level ``i`` has ``width * min(2**i, max_multiplier)``.
        depth: number of halvings.
        max_multiplier: cap of the channel multiplier of the deeper levels.
    """

    def __init__(
        self, in_channels: int, out_channels: int, width: int, depth: int, max_multiplier: int = 8
    ):
        super().__init__()
        channels = [width * min(2**level, max_multiplier) for level in range(depth + 1)]
        self.encoders = nn.ModuleList(
            _conv_block(c_in, c_out)
            for c_in, c_out in zip([in_channels, *channels[:-1]], channels, strict=True)
        )
        self.ups = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels[level + 1], channels[level], 3, padding=1, bias=False),
                nn.BatchNorm2d(channels[level]),
                nn.ReLU(inplace=True),
            )
            for level in range(depth)
        )
        self.decoders = nn.ModuleList(_conv_block(2 * c, c) for c in channels[:-1])
        self.head = nn.Conv2d(channels[0], out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level:
                x = F.max_pool2d(x, 2, ceil_mode=True)
            x = encoder(x)
            skips.append(x)
        x = skips.pop()
        for level in reversed(range(len(skips))):
            skip = skips[level]
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = self.decoders[level](torch.cat([self.ups[level](x), skip], dim=1))
        return self.head(x)


def _codebook_ranks(quantiser: VectorQuantizer) -> Tensor:
    # Row k: every codebook index sorted by distance from entry k (k itself first).
    codebook = quantiser.codebook.detach()
    return torch.cdist(codebook, codebook).argsort(dim=1).to(torch.int32)


def _replace_codes(
    quantiser: VectorQuantizer,
    ranks: Tensor,
    indices: Tensor,
    mask: Tensor,
    strength: Tensor,
    generator: torch.Generator,
) -> Tensor:
    """The quantised map of ``indices`` with the codes inside ``mask`` swapped.

    A swapped code becomes an entry drawn uniformly among its neighbours of distance rank
    ``[NEAREST_EXCLUDED * K, strength * K)``, ``strength`` (``B``, in (0, 1]) set per image.
    """
    k = ranks.shape[0]
    low = min(k - 1, max(1, math.ceil(NEAREST_EXCLUDED * k)))
    high = (strength * k).floor().long().clamp(low + 1, k)
    draw = torch.rand(indices.shape, generator=generator)
    rank = low + (draw * (high - low)[:, None, None]).long()
    rank = torch.minimum(rank, high[:, None, None] - 1).to(indices.device)
    swapped = ranks[indices, rank].long()
    return quantiser.lookup(torch.where(mask, swapped, indices))


def _pad(images: Tensor) -> Tensor:
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % STRIDE, -width % STRIDE
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h), mode="replicate")
    return images


@register("dsr")
class DSR(Detector):
    """Dual subspace re-projection: general and object-specific decoders of a quantised latent
    space, compared by an anomaly detection module."""

    learning_type = "iterative"
    localizes = True

    hyperparameter_constraints: ClassVar[Mapping[str, Rule]] = {
        "lr": POSITIVE,
        "epochs": POSITIVE_INT,
        "latent_anomaly_strength": Interval(float, 0, 1, closed="right"),
        "upsampling_train_ratio": Interval(float, 0, 1, closed="both"),
        "vq_train_ratio": Interval(float, 0, 1, closed="neither"),
        # Even: the VQ-VAE's encoder halves its channels.
        "hidden_channels": AllOf(Interval(int, 2, None), EVEN),
        "residual_channels": POSITIVE_INT,
        "n_residual_layers": NON_NEGATIVE_INT,
        "embedding_dim": POSITIVE_INT,
        "num_embeddings": Interval(int, 2, None),
        "unet_width": POSITIVE_INT,
        "score_filter_size": AllOf(POSITIVE_INT, ODD),
    }

    def __init__(
        self,
        lr: float = 2e-4,
        epochs: int = 700,
        latent_anomaly_strength: float = 0.2,
        upsampling_train_ratio: float = 0.7,
        vq_train_ratio: float = 0.2,
        hidden_channels: int = 128,
        residual_channels: int = 64,
        n_residual_layers: int = 2,
        embedding_dim: int = 128,
        num_embeddings: int = 4096,
        unet_width: int = 64,
        score_filter_size: int = 21,
        texture_dir: str | None = None,
        vq_weights: str | None = None,
        seed: int = 0,
    ) -> None:
        """
        Args:
            lr: Adam learning rate of every phase (the study's 2e-4).
            epochs: the whole run's epoch budget when ``fit`` is not given one (the study's
                700), shared by the phases.
            latent_anomaly_strength: lowest strength of a latent anomaly (the study's 0.2).
                Each training image draws a strength ``s`` uniformly in
                ``[latent_anomaly_strength, 1]``; a swapped code is replaced by an entry among
                the ``s * num_embeddings`` nearest to it (less the 5 % nearest), so low
                strengths give subtle anomalies and 1 any entry.
            upsampling_train_ratio: share of the epoch budget before the upsampling module's
                phase starts (the study's 0.7); 1 never trains it, and the map is then the
                anomaly detection module's own.
            vq_train_ratio: share of the epoch budget, from the front, that trains the general
                VQ-VAE on the training images when no ``vq_weights`` are given (the paper
                pretrains it on ImageNet instead; this phase has no counterpart in the study).
            hidden_channels: channels of the VQ-VAE's encoders and of both decoders (paper
                128).
            residual_channels: channels inside their residual blocks (paper 64).
            n_residual_layers: residual blocks per encoder and decoder (paper 2).
            embedding_dim: size of the code vectors, and the width of the subspace
                restriction U-Nets (paper 128).
            num_embeddings: entries of each of the two codebooks (paper 4096).
            unet_width: first-level channels of the anomaly detection and upsampling U-Nets
                (64 as DRAEM's discriminative network).
            score_filter_size: side of the mean filter applied to the map before its maximum
                becomes the image score (21 px, an odd number; 1 disables it).
            texture_dir: local folder of texture images (DTD in the paper) blended into the
                image-space anomalies of the upsampling phase; None generates textures.
            vq_weights: local file holding the general VQ-VAE's state dict (the ``vq.``
                entries of a fitted DSR's state dict, or ``detector.vq.state_dict()``); when
                given, the VQ-VAE phase is skipped.
            seed: seeds the initialisation of every module and all the randomness of
                training (codebook starts, masks, strengths, swapped codes, image anomalies).
        """
        super().__init__()
        # Beyond the table: the file system.
        try:
            self._blend = PerlinBlend(texture_dir=texture_dir)
        except DatasetError as error:
            raise ModelError(f"dsr: texture_dir {texture_dir!r}: {error}") from None
        self.epochs = epochs
        self.lr = float(lr)
        self.latent_anomaly_strength = float(latent_anomaly_strength)
        self.upsampling_train_ratio = float(upsampling_train_ratio)
        self.vq_train_ratio = float(vq_train_ratio)
        self.score_filter_size = score_filter_size
        self.texture_dir = texture_dir
        self.vq_weights = vq_weights
        self.seed = seed

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.vq = TwoLevelVQVAE(
                hidden_channels, residual_channels, n_residual_layers, embedding_dim, num_embeddings
            )
            # The restriction U-Nets work on the small latent grids: two halvings suffice.
            self.restrict_top = UNet(embedding_dim, embedding_dim, embedding_dim, 2, 2)
            self.restrict_bottom = UNet(embedding_dim, embedding_dim, embedding_dim, 2, 2)
            self.object_decoder = LatentDecoder(
                embedding_dim, hidden_channels, residual_channels, n_residual_layers
            )
            # Input: object-specific and general reconstructions.
            self.anomaly_module = UNet(6, 2, unet_width, 4, 4)
            # Input: the image, the object-specific reconstruction and the coarse mask.
            self.upsampling_module = UNet(8, 2, unet_width, 3, 4)
        # The general appearance model is frozen, as in the paper (its own phase, when it runs,
        # turns gradients on for its duration only).
        self.vq.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), False)
        self.register_buffer("fitted", torch.tensor(False))
        self.register_buffer("upsampling_trained", torch.tensor(False))
        if vq_weights is not None:
            self._load_vq(Path(vq_weights))

    def _load_vq(self, path: Path) -> None:
        if not path.is_file():
            raise ModelError(f"dsr: vq_weights {str(path)!r} is not a file")
        check_part_kind(path, VQ_KIND, "dsr", "vq_weights")
        try:
            state = load_state_dict_file(path)
        except ModelError as error:
            raise ModelError(f"dsr: {error}") from None
        if any(key.startswith("vq.") for key in state):
            state = {key[3:]: value for key, value in state.items() if key.startswith("vq.")}
        own = self.vq.state_dict()
        problem = state_dict_problems(own, state)
        if problem is not None:
            raise ModelError(f"dsr: vq_weights {str(path)!r} do not fit the VQ-VAE: {problem}")
        if any(p.is_meta for p in self.vq.parameters()):
            return  # built for shapes only (a study's validation): checked, nothing to copy
        self.vq.load_state_dict({key: state[key] for key in own})

    def _unit(self, images: Tensor) -> Tensor:
        """ImageNet-normalised images back in [0, 1] pixel space, padded to the stride."""
        return _pad(images * self.std + self.mean)

    def _restore(self, top: Tensor, bottom: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Restricted codes of both levels and the object-specific image decoded from them."""
        restored_top = self.restrict_top(top)
        restored_bottom = self.restrict_bottom(bottom)
        image = self.object_decoder(
            self.vq.vq_top(restored_top)[0], self.vq.vq_bottom(restored_bottom)[0]
        )
        return restored_top, restored_bottom, image

    def _coarse(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Anomaly probabilities of the detection module (``B x 2 x H x W``) and the
        object-specific reconstruction of [0, 1] images."""
        codes = self.vq.encode(images)
        general = self.vq.decode(codes["top"], codes["bottom"])
        _, _, specific = self._restore(codes["top"], codes["bottom"])
        logits = self.anomaly_module(torch.cat([specific, general], dim=1))
        return logits.softmax(dim=1), specific

    def _latent_anomalies(
        self, codes: Mapping[str, Tensor], ranks: tuple[Tensor, Tensor], generator: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Both quantised maps with Perlin-masked codes swapped, and the image-size mask."""
        top_index, bottom_index = codes["top_index"], codes["bottom_index"]
        n, height, width = bottom_index.shape
        # Lattice scales up to a quarter of the grid: blobs of at least ~4 bottom cells, since
        # finer noise would vanish on the top grid.
        max_scale = max(1, int(math.log2(min(height, width))) - 1)
        bottom_masks = torch.zeros(n, height, width, dtype=torch.bool)
        levels = torch.randint(3, (n,), generator=generator)  # 0 top, 1 bottom, 2 both
        anomalous = torch.rand(n, generator=generator) < ANOMALY_PROBABILITY
        for i in range(n):
            if anomalous[i]:
                bottom_masks[i] = perlin_mask(
                    height, width, generator=generator, max_scale=max_scale
                )
        top_masks = F.adaptive_max_pool2d(bottom_masks[:, None].float(), top_index.shape[-2:])
        top_masks = top_masks[:, 0].bool() & (levels != 1)[:, None, None]
        bottom_masks &= (levels != 0)[:, None, None]
        low = self.latent_anomaly_strength
        strength = low + (1 - low) * torch.rand(n, generator=generator)
        device = bottom_index.device
        top_masks, bottom_masks = top_masks.to(device), bottom_masks.to(device)
        top = _replace_codes(self.vq.vq_top, ranks[0], top_index, top_masks, strength, generator)
        bottom = _replace_codes(
            self.vq.vq_bottom, ranks[1], bottom_index, bottom_masks, strength, generator
        )
        size = (height * 4, width * 4)
        target = torch.maximum(
            F.interpolate(top_masks[:, None].float(), size=size, mode="nearest"),
            F.interpolate(bottom_masks[:, None].float(), size=size, mode="nearest"),
        )[:, 0]
        return top, bottom, target

    def resource_probe(self, images: Tensor) -> None:
        """A training step's forward in the main phase, which has most of the epoch budget: the
        frozen VQ-VAE's codes and general reconstruction, the subspace restriction and
        object-specific decoder, and the anomaly detection module."""
        unit = self._unit(images)
        with torch.no_grad():
            codes = self.vq.encode(unit)
            general = self.vq.decode(codes["top"], codes["bottom"])
        _, _, specific = self._restore(codes["top"], codes["bottom"])
        self.anomaly_module(torch.cat([specific, general], dim=1))

    def fit(
        self,
        train: Iterable[Batch],
        *,
        epochs: int | None = None,
        on_epoch_end: EpochCallback | None = None,
    ) -> dict[str, Any]:
        """Train the phases in turn within ``epochs`` (default: the constructor's).

        ``on_epoch_end(epoch, {"loss", "phase", ...})`` runs after every epoch of every phase,
        with the epoch counted over the whole run, and stops the run when it returns True.
        Returns the epochs run, the last loss, the epochs of each phase and notes on what the
        offline setting changes.
        """
        total = self.epochs if epochs is None else check_epochs("dsr", epochs, "fit epochs")
        train_vq = self.vq_weights is None
        n_vq, n_main, n_up = phase_epochs(
            total, self.upsampling_train_ratio, self.vq_train_ratio, train_vq
        )
        generator = torch.Generator().manual_seed(self.seed)
        run = {"vq_epochs": 0, "main_epochs": 0, "upsampling_epochs": 0}
        state = {"done": 0, "stopped": False, "loss": math.nan}

        def report(phase: int) -> Callable[[int, dict], bool]:
            def callback(epoch: int, metrics: dict) -> bool:
                state["loss"] = metrics["loss"]
                stop = False
                if on_epoch_end is not None:
                    stop = bool(on_epoch_end(state["done"] + epoch, {**metrics, "phase": phase}))
                state["stopped"] = stop
                return stop

            return callback

        phases = [
            ("vq_epochs", n_vq, self._vq_phase),
            ("main_epochs", n_main, self._main_phase),
            ("upsampling_epochs", n_up, self._upsampling_phase),
        ]
        for phase, (key, n_epochs, make_step) in enumerate(phases, start=1):
            if n_epochs == 0 or state["stopped"]:
                continue
            step, after_epoch, cleanup = make_step(generator)

            def end_of_epoch(
                epoch: int, means: dict[str, float], after_epoch: Callable = after_epoch
            ) -> dict[str, float]:
                self.fitted.fill_(True)
                return after_epoch()

            try:
                epochs_run, _ = train_epochs(
                    self,
                    train,
                    step,
                    epochs=n_epochs,
                    on_epoch_end=report(phase),
                    end_of_epoch=end_of_epoch,
                )
            finally:
                cleanup()
            run[key] = epochs_run
            state["done"] += epochs_run
            if key == "upsampling_epochs" and epochs_run:
                self.upsampling_trained.fill_(True)
        return {
            "epochs": state["done"],
            "loss": state["loss"],
            **run,
            "notes": self._notes(run, total),
            "parts": self.parts(),
        }

    def parts(self) -> dict[str, str]:
        """Where the general VQ-VAE and the textures come from, as a result row shows it."""
        codebook = (
            f"own training images ({self.vq_train_ratio:g} of the epochs)"
            if self.vq_weights is None
            else describe_part(self.vq_weights, "file")
        )
        textures = (
            "generated" if self.texture_dir is None else describe_part(self.texture_dir, "folder")
        )
        return {"codebook": codebook, "textures": textures}

    def _notes(self, run: Mapping[str, int], total: int) -> list[str]:
        notes = []
        if self.vq_weights is None:
            notes.append(
                f"dsr: the general VQ-VAE (pretrained on ImageNet in the paper) was trained on "
                f"the training images for {run['vq_epochs']} of the {total} epochs"
            )
        else:
            notes.append(f"dsr: the general VQ-VAE was loaded from {self.vq_weights}")
        if not bool(self.upsampling_trained):
            notes.append(
                "dsr: the upsampling module was not trained (its phase starts after "
                f"{self.upsampling_train_ratio:g} of the epoch budget); the anomaly map is the "
                "anomaly detection module's coarse mask"
            )
        elif self.texture_dir is None and run["upsampling_epochs"]:
            notes.append(
                "dsr: the upsampling module's image-space anomalies used generated textures "
                "(no texture_dir; the paper blends DTD textures)"
            )
        return notes

    def _vq_phase(self, generator: torch.Generator) -> tuple[Callable, Callable, Callable]:
        # Image-space anomalies widen what the codebooks cover beyond the normal images,
        # standing in for the variety of ImageNet the paper's VQ-VAE learned from: the general
        # decoder must reproduce anomalies it has never seen.
        train_step, after_epoch, cleanup = vq_phase(self.vq, self.lr, generator, self._blend)

        def step(images: Tensor) -> dict[str, float]:
            return train_step((images * self.std + self.mean).clamp(0, 1))

        return step, after_epoch, cleanup

    def _main_phase(self, generator: torch.Generator) -> tuple[Callable, Callable, Callable]:
        modules = (self.restrict_top, self.restrict_bottom, self.object_decoder)
        parameters = [p for m in (*modules, self.anomaly_module) for p in m.parameters()]
        optimizer = torch.optim.Adam(parameters, lr=self.lr)
        ranks = (_codebook_ranks(self.vq.vq_top), _codebook_ranks(self.vq.vq_bottom))

        def step(images: Tensor) -> dict[str, float]:
            images = self._unit(images)
            with torch.no_grad():
                codes = self.vq.encode(images)
                top, bottom, target = self._latent_anomalies(codes, ranks, generator)
                general = self.vq.decode(top, bottom)
            restored_top, restored_bottom, specific = self._restore(top, bottom)
            logits = self.anomaly_module(torch.cat([specific, general], dim=1))
            focal = focal_loss(logits, target)
            features = F.mse_loss(restored_top, codes["top"]) + F.mse_loss(
                restored_bottom, codes["bottom"]
            )
            reconstruction = F.mse_loss(specific, images)
            loss = focal + features + reconstruction
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return {
                "loss": float(loss.detach()),
                "focal": float(focal.detach()),
                "features": float(features.detach()),
                "reconstruction": float(reconstruction.detach()),
            }

        return step, dict, lambda: None

    def _upsampling_phase(self, generator: torch.Generator) -> tuple[Callable, Callable, Callable]:
        optimizer = torch.optim.Adam(self.upsampling_module.parameters(), lr=self.lr)
        frozen = (self.restrict_top, self.restrict_bottom, self.object_decoder, self.anomaly_module)

        def step(images: Tensor) -> dict[str, float]:
            # The earlier modules are frozen: their batch norms must use running statistics,
            # whatever mode the training loop (or a validation pass) left them in.
            for module in frozen:
                module.eval()
            unit = (images * self.std + self.mean).clamp(0, 1)
            anomalous, masks = self._blend(unit, generator, probability=ANOMALY_PROBABILITY)
            anomalous, masks = _pad(anomalous), _pad(masks)
            with torch.no_grad():
                coarse, specific = self._coarse(anomalous)
            logits = self.upsampling_module(torch.cat([anomalous, specific, coarse], dim=1))
            loss = focal_loss(logits, masks[:, 0] > 0.5)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return {"loss": float(loss.detach())}

        return step, dict, lambda: None

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        """Score a batch: the anomaly probability map and the maximum of its mean-filtered
        version."""
        if not bool(self.fitted):
            raise ModelError("dsr: predict called before fit")
        images = images.to(self.fitted.device)
        height, width = images.shape[-2:]
        unit = self._unit(images)
        probabilities, specific = self._coarse(unit)
        if bool(self.upsampling_trained):
            logits = self.upsampling_module(torch.cat([unit, specific, probabilities], dim=1))
            probabilities = logits.softmax(dim=1)
        anomaly_map = probabilities[:, 1, :height, :width]
        size = self.score_filter_size
        smoothed = F.avg_pool2d(
            anomaly_map[:, None], size, stride=1, padding=size // 2, count_include_pad=False
        )
        scores = smoothed.flatten(1).max(dim=1).values
        return Prediction(score=scores, anomaly_map=anomaly_map)


def vq_phase(
    vq: TwoLevelVQVAE, lr: float, generator: torch.Generator, blend: PerlinBlend | None = None
) -> tuple[Callable[[Tensor], dict[str, float]], Callable[[], dict[str, float]], Callable]:
    """Training of the general VQ-VAE: ``(step, after_epoch, cleanup)``.

    ``step(images)`` takes [0, 1] images, blends image-space anomalies into half of them when
    ``blend`` is given, and makes one Adam step of the encoders and decoder plus one moving
    average step of the codebooks; ``after_epoch()`` restarts the codebook entries unused since
    its last call; ``cleanup()`` freezes the VQ-VAE again. DSR's own VQ phase and
    :func:`train_general_vq` both train this way.
    """
    # The codebooks learn by moving averages, everything else by gradient.
    parameters = [p for name, p in vq.named_parameters() if not name.endswith("codebook")]
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(parameters, lr=lr)

    def step(unit: Tensor) -> dict[str, float]:
        if blend is not None:
            unit, _ = blend(unit, generator, probability=ANOMALY_PROBABILITY)
        loss, reconstruction = vq.training_step(_pad(unit), generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": float(loss.detach()), "reconstruction": float(reconstruction.detach())}

    def after_epoch() -> dict[str, float]:
        return {key: float(n) for key, n in vq.restart_unused(generator).items()}

    return step, after_epoch, lambda: vq.requires_grad_(False)


VQ_KIND = "dsr.vq"
"""The ``kind`` of a general VQ-VAE file's metadata."""


@dataclass
class GeneralVQ:
    """A general VQ-VAE trained on a generic image folder: its state dict (``vq.`` keys, as
    ``DSR(vq_weights=)`` reads them), how it was made, and its loss per step."""

    state: dict[str, Tensor]
    metadata: dict[str, Any]
    losses: list[float] = field(default_factory=list)

    def save(self, path: str | Path) -> Path:
        """Write it as a safetensors file with its metadata in the header, atomically."""
        return save_part(self.state, path, self.metadata)


def train_general_vq(
    images: str | Path,
    *,
    image_size: int = 256,
    steps: int = 10_000,
    batch_size: int = 8,
    lr: float = 2e-4,
    restart_every: int = 100,
    hidden_channels: int = 128,
    residual_channels: int = 64,
    n_residual_layers: int = 2,
    embedding_dim: int = 128,
    num_embeddings: int = 4096,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> GeneralVQ:
    """Train DSR's general VQ-VAE on the images of folder ``images`` (ImageNet in the paper).

    Each step draws ``batch_size`` random images, resized to ``image_size``, and trains as DSR's
    own VQ phase does (:func:`vq_phase`, without image-space anomalies: the folder's variety is
    what they stand in for); every ``restart_every`` steps unused codebook entries restart.
    The sizes must be the DSR configuration's that will load it. ``progress(step, steps,
    loss)`` runs after every step. Returns the state dict, metadata and losses.
    """
    check_hyperparameters(
        "train_general_vq",
        {
            "image_size": AllOf(POSITIVE_INT, multiple_of(STRIDE)),
            "steps": POSITIVE_INT,
            "batch_size": POSITIVE_INT,
            "restart_every": POSITIVE_INT,
        },
        {
            "image_size": image_size,
            "steps": steps,
            "batch_size": batch_size,
            "restart_every": restart_every,
        },
    )
    files = list_images(images, "train_general_vq")
    sizes = {
        "hidden_channels": hidden_channels,
        "residual_channels": residual_channels,
        "n_residual_layers": n_residual_layers,
        "embedding_dim": embedding_dim,
        "num_embeddings": num_embeddings,
    }
    # The detector checks the sizes and builds the VQ-VAE exactly as DSR(**sizes) would.
    detector = DSR(**sizes, seed=seed)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vq = detector.vq.to(device)
    generator = torch.Generator().manual_seed(seed)
    draw_seed = int(torch.randint(2**62, (1,), generator=generator))
    draws = FolderImages(files, (image_size,), draw_seed)
    step, after_epoch, cleanup = vq_phase(vq, lr, generator)
    losses: list[float] = []
    vq.train()
    try:
        for index in range(1, steps + 1):
            (unit,) = draws.random_batch(batch_size)
            value = step(unit.to(device))["reconstruction"]
            if not math.isfinite(value):
                raise ModelError(f"train_general_vq: the loss is {value} at step {index}")
            losses.append(value)
            if index % restart_every == 0 and index < steps:
                after_epoch()
            if progress is not None:
                progress(index, steps, value)
    finally:
        cleanup()
    vq.eval()
    tail = losses[-max(1, min(100, steps // 10)) :]
    final = sum(tail) / len(tail)
    folder = Path(images).expanduser()
    metadata = {
        "kind": VQ_KIND,
        **sizes,
        "images": str(folder.resolve()),
        "n_images": len(files),
        "image_size": image_size,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "restart_every": restart_every,
        "seed": seed,
        "first_loss": sum(losses[: len(tail)]) / len(tail),
        "final_loss": final,
        "summary": (
            f"general VQ-VAE trained on {len(files)} images of {folder}, {steps} steps, "
            f"{image_size} px, {num_embeddings} codes, reconstruction loss {final:.3g}"
        ),
    }
    state = {f"vq.{key}": value.detach().cpu() for key, value in vq.state_dict().items()}
    return GeneralVQ(state=state, metadata=metadata, losses=losses)
