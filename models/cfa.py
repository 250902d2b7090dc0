"""CFA (Lee et al., "CFA: Coupled-Hypersphere-Based Feature Adaptation for Target-Oriented Anomaly
Localization", IEEE Access 2022).

A frozen backbone gives patch features (``layers``, each averaged over a 3x3 neighbourhood with the
zero padding counted, resized to the first layer's grid and concatenated). A small learnable patch
descriptor, a CoordConv (the features plus two channels of normalised pixel coordinates) followed by
a 1x1 convolution, adapts them to the target data set. The memory bank holds, for every grid
position, the mean adapted feature of the training images, taken once before training (optionally
compressed by k-means). Training pulls every adapted training feature into hyperspheres of radius
``r`` around its ``K`` nearest memory features (attraction) and pushes it out of a margin around the
next ``J`` (repulsion: hard negatives), with a Deep-SVDD-style soft boundary. At test time a patch's
score is its squared distance to the nearest memory feature, weighted by the softmin over its ``K``
nearest distances (confident when the nearest is clearly the nearest); the map is upsampled and
blurred and its maximum is the image score.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from models.backbones import FeatureExtractor
from models.base import (
    Batch,
    Detector,
    EpochCallback,
    Prediction,
    check_epochs,
    iter_images,
    register,
    train_epochs,
)
from models.components.feature_utils import concat_to_first, gaussian_blur, upsample_maps
from models.constraints import NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, Rule
from models.errors import ModelError

__all__ = ["CFA", "CoordConvDescriptor"]

_KMEANS_MAX_ITERATIONS = 300


class CoordConvDescriptor(torch.nn.Module):
    """CFA's patch descriptor: a 1x1 convolution over the features plus their (x, y) position.

    The two coordinate channels (each in [-1, 1] across the grid) let the adapted feature
    depend on where the patch is, which suits aligned objects (Liu et al.'s CoordConv, 2018).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels + 2, out_channels, kernel_size=1)

    def forward(self, features: Tensor) -> Tensor:
        batch, _, height, width = features.shape
        ys = torch.linspace(-1.0, 1.0, height, device=features.device, dtype=features.dtype)
        xs = torch.linspace(-1.0, 1.0, width, device=features.device, dtype=features.dtype)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        coordinates = torch.stack([grid_x, grid_y]).expand(batch, 2, height, width)
        return self.conv(torch.cat([features, coordinates], dim=1))


def _squared_distances(queries: Tensor, memory: Tensor) -> Tensor:
    # |q|^2 + |m|^2 - 2 q.m: one matrix product instead of a Q x M x D difference tensor.
    squared = (
        queries.square().sum(1, keepdim=True) + memory.square().sum(1) - 2.0 * queries @ memory.T
    )
    return squared.clamp_min(0.0)


def _kmeans(points: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """``k x D`` centroids of ``points`` by Lloyd's algorithm from ``k`` seeded random points."""
    start = torch.randperm(points.shape[0], generator=generator)[:k].to(points.device)
    centroids = points[start].clone()
    assignment = None
    for _ in range(_KMEANS_MAX_ITERATIONS):
        new_assignment = _squared_distances(points, centroids).argmin(1)
        if assignment is not None and torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=k).to(points.dtype)
        # A centroid that lost all its points stays where it was.
        occupied = counts > 0
        centroids[occupied] = sums[occupied] / counts[occupied, None]
    return centroids


@register("cfa")
class CFA(Detector):
    """Coupled-hypersphere feature adaptation with a memory bank of mean normal features."""

    learning_type = "iterative"
    localizes = True

    hyperparameter_constraints: ClassVar[Mapping[str, Rule]] = {
        "gamma_c": POSITIVE_INT,
        "gamma_d": POSITIVE_INT,
        "num_nearest_neighbors": POSITIVE_INT,
        "num_hard_negative_features": NON_NEGATIVE_INT,
        "radius": NON_NEGATIVE,
        "nu": POSITIVE,
        "repulsion_margin": NON_NEGATIVE,
        "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "epochs": POSITIVE_INT,
        "blur_sigma": NON_NEGATIVE,
    }

    def __init__(
        self,
        backbone: str = "resnet18",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        gamma_c: int = 1,
        gamma_d: int = 1,
        num_nearest_neighbors: int = 3,
        num_hard_negative_features: int = 3,
        radius: float = 1e-5,
        nu: float = 1e-3,
        repulsion_margin: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        epochs: int = 30,
        blur_sigma: float = 4.0,
        seed: int = 0,
        pretrained: bool = True,
        weights: str | None = None,
    ) -> None:
        """
        Args:
            backbone: frozen feature extractor (``models.backbones.list_backbones()``).
            layers: backbone layers concatenated into a patch feature; the first sets the grid.
            gamma_c: memory-bank compression: the per-position mean features (one per grid
                position) are clustered by k-means into ``positions // gamma_c`` centroids;
                1 keeps them all (the reference study's setting).
            gamma_d: descriptor compression: the adapted features have ``channels // gamma_d``
                channels, ``channels`` being those of the concatenated backbone features; 1
                keeps the size (the reference study's setting).
            num_nearest_neighbors: ``K``, the nearest memory features every training feature is
                attracted to, and the number the softmin of the test score runs over.
            num_hard_negative_features: ``J``, the memory features after the ``K`` nearest that
                every training feature is repelled from (hard negatives); 0 turns repulsion off.
            radius: ``r``, radius of the hyperspheres around memory features: squared
                distances below ``r^2`` cost no attraction.
            nu: soft-boundary weight ``nu`` of Deep SVDD: both loss terms are mean hinge
                penalties multiplied by ``1 / nu``.
            repulsion_margin: ``alpha``: a hard negative costs ``max(0, r^2 - d - alpha)`` at
                squared distance ``d``. With the paper's tiny radius this is never positive,
                so repulsion only acts when ``r^2`` exceeds the margin.
            lr: AdamW learning rate of the descriptor.
            weight_decay: AdamW (decoupled) weight decay.
            epochs: training epochs when ``fit`` is not given a budget.
            blur_sigma: standard deviation in pixels of the Gaussian smoothing of the anomaly
                map; 0 disables it.
            seed: seeds the descriptor's initialisation, the k-means start (``gamma_c > 1``)
                and the backbone's initialisation when it is not pretrained.
            pretrained: use timm's pretrained backbone weights.
            weights: local backbone weight file or directory (overrides ``pretrained``).
        """
        super().__init__()
        self.epochs = epochs
        self.gamma_c = gamma_c
        self.gamma_d = gamma_d
        self.num_nearest_neighbors = num_nearest_neighbors
        self.num_hard_negative_features = num_hard_negative_features
        self.radius = float(radius)
        self.nu = float(nu)
        self.repulsion_margin = float(repulsion_margin)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.blur_sigma = float(blur_sigma)
        self.seed = seed
        # Backbone, descriptor and k-means get distinct seeds drawn from the one seed.
        generator = torch.Generator().manual_seed(seed)
        backbone_seed, descriptor_seed, self._kmeans_seed = torch.randint(
            2**62, (3,), generator=generator
        ).tolist()
        self.extractor = FeatureExtractor(
            backbone, layers, pretrained=pretrained, weights=weights, seed=backbone_seed
        )
        channels = sum(self.extractor.channels.values())
        # Beyond the table: the bound comes from the backbone's layers.
        if channels // gamma_d < 1:
            raise ModelError(
                f"cfa: gamma_d must be at most the {channels} feature channels, got {gamma_d}"
            )
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(descriptor_seed)
            self.descriptor = CoordConvDescriptor(channels, channels // gamma_d)
        self.register_buffer("memory_bank", torch.empty(0, channels // gamma_d))

    def patch_features(self, images: Tensor) -> Tensor:
        """Frozen backbone patch features: ``B x C x h x w`` on the first layer's grid."""
        with torch.no_grad():
            features = self.extractor(images)
            # 3x3 neighbourhood averaging, as in the authors' descriptor, gives every patch
            # some local context before adaptation. The zero padding counts (every window is
            # divided by 9, as theirs and anomalib's are): border patches keep a mark of where
            # they sit, which the memory bank of per-position means is built to use.
            pooled = [
                F.avg_pool2d(f, kernel_size=3, stride=1, padding=1) for f in features.values()
            ]
            return concat_to_first(pooled, mode="bilinear")

    def adapted_features(self, images: Tensor) -> Tensor:
        """The descriptor's output for a batch, flattened to ``(B h w) x D``."""
        adapted = self.descriptor(self.patch_features(images))
        return adapted.permute(0, 2, 3, 1).reshape(-1, adapted.shape[1])

    @torch.no_grad()
    def _init_memory_bank(self, train: Iterable[Batch], device: torch.device) -> int:
        total: Tensor | None = None
        count = 0
        for images in iter_images(train):
            adapted = self.descriptor(self.patch_features(images.to(device)))
            if total is None:
                total = torch.zeros_like(adapted[0], dtype=torch.float64)
            elif adapted.shape[1:] != total.shape:
                raise ModelError(
                    f"cfa: training images give {tuple(adapted.shape[-2:])} feature grids after "
                    f"{tuple(total.shape[-2:])}; all training images must have the same size"
                )
            total += adapted.double().sum(0)
            count += adapted.shape[0]
        if total is None:
            raise ModelError("cfa: the training set is empty")
        memory = (total / count).float().flatten(1).T.contiguous()  # (h w) x D
        if self.gamma_c > 1:
            n_clusters = memory.shape[0] // self.gamma_c
            if n_clusters < 1:
                raise ModelError(
                    f"cfa: gamma_c {self.gamma_c} exceeds the {memory.shape[0]} grid positions "
                    "of the memory bank"
                )
            generator = torch.Generator().manual_seed(self._kmeans_seed)
            memory = _kmeans(memory, n_clusters, generator)
        self.memory_bank = memory
        return count

    def loss(self, adapted: Tensor) -> Tensor:
        """Soft-boundary coupled-hypersphere loss of ``N x D`` adapted features."""
        k, j = self.num_nearest_neighbors, self.num_hard_negative_features
        nearest = torch.topk(
            _squared_distances(adapted, self.memory_bank), k + j, dim=1, largest=False
        ).values
        r2 = self.radius**2
        attraction = F.relu(nearest[:, :k] - r2).mean()
        loss = attraction
        if j > 0:
            loss = loss + F.relu(r2 - nearest[:, k:] - self.repulsion_margin).mean()
        return loss / self.nu

    def resource_probe(self, images: Tensor) -> None:
        """A training step's forward: adapted features and their distances to a memory bank of
        one feature per grid position (``/ gamma_c`` clusters), the loss's largest tensor."""
        adapted = self.adapted_features(images)
        positions = adapted.shape[0] // images.shape[0]
        self.memory_bank = adapted.new_empty(max(1, positions // self.gamma_c), adapted.shape[1])
        self.loss(adapted)

    def fit(
        self,
        train: Iterable[Batch],
        *,
        epochs: int | None = None,
        on_epoch_end: EpochCallback | None = None,
    ) -> dict[str, Any]:
        """Build the memory bank (one pass), then train the descriptor for ``epochs`` passes.

        The memory bank is taken from the descriptor as it is when ``fit`` starts and stays
        fixed while the descriptor learns. ``on_epoch_end(epoch, {"loss": mean loss})`` runs
        after every epoch and stops training when it returns True. A non-finite epoch loss is a
        :class:`ModelError` (training diverged).
        """
        n_epochs = self.epochs if epochs is None else check_epochs("cfa", epochs, "fit epochs")
        device = self.memory_bank.device
        self.eval()
        n_images = self._init_memory_bank(train, device)
        needed = self.num_nearest_neighbors + self.num_hard_negative_features
        if needed > self.memory_bank.shape[0]:
            raise ModelError(
                f"cfa: num_nearest_neighbors + num_hard_negative_features = {needed} exceeds "
                f"the {self.memory_bank.shape[0]} memory-bank features"
            )
        optimizer = torch.optim.AdamW(
            self.descriptor.parameters(), lr=self.lr, weight_decay=self.weight_decay, amsgrad=True
        )

        def step(images: Tensor) -> dict[str, float]:
            loss = self.loss(self.adapted_features(images))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return {"loss": float(loss.detach())}

        epochs_run, means = train_epochs(
            self, train, step, epochs=n_epochs, on_epoch_end=on_epoch_end
        )
        return {
            "epochs": epochs_run,
            "loss": means.get("loss", math.nan),
            "n_images": n_images,
            "memory_bank_size": int(self.memory_bank.shape[0]),
        }

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        """Score a batch: the blurred softmin-weighted nearest-memory distance map and its max."""
        if self.memory_bank.shape[0] == 0:
            raise ModelError("cfa: predict called before fit (the memory bank is empty)")
        features = self.descriptor(self.patch_features(images.to(self.memory_bank.device)))
        batch, dim, height, width = features.shape
        queries = features.permute(0, 2, 3, 1).reshape(-1, dim)
        k = min(self.num_nearest_neighbors, self.memory_bank.shape[0])
        nearest = torch.topk(
            _squared_distances(queries, self.memory_bank), k, dim=1, largest=False
        ).values
        # The nearest distance counts fully only when it stands out from the next K - 1: a
        # patch about as close to several memory features sits in a dense normal region.
        patch_scores = F.softmin(nearest, dim=1)[:, 0] * nearest[:, 0]
        maps = upsample_maps(patch_scores.view(batch, height, width), images.shape[-2:])
        maps = gaussian_blur(maps, self.blur_sigma)
        return Prediction(score=maps.flatten(1).max(dim=1).values, anomaly_map=maps)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The memory bank's size is only known after fit: take the stored one.
        key = prefix + "memory_bank"
        if key in state_dict:
            self.memory_bank = torch.empty_like(state_dict[key], device=self.memory_bank.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
