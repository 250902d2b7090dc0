"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection
and Localization", ICPR 2020 workshops).

Fit: at every position of the first layer's feature grid, the embeddings of the training images
(several backbone layers, resized to that grid and concatenated, reduced to a seeded random subset
of channels) are modelled by a multivariate Gaussian. Predict: the Mahalanobis distance of each
test embedding to its position's Gaussian is the anomaly map; its maximum is the image score.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from models.backbones import FeatureExtractor, get_backbone
from models.base import (
    DEFAULT_TRAIN_BATCH_SIZE,
    DEFAULT_TRAIN_IMAGES,
    Batch,
    Detector,
    EpochCallback,
    Prediction,
    iter_images,
    register,
)
from models.components.feature_utils import concat_to_first, gaussian_blur, upsample_maps
from models.constraints import NON_NEGATIVE, POSITIVE, POSITIVE_INT, Rule
from models.costs import Work
from models.errors import ModelError

__all__ = ["PaDiM"]

PAPER_N_FEATURES = {"resnet18": 100, "wide_resnet50_2": 550}
"""Embedding sizes the PaDiM paper keeps for its backbones (``n_features=None``)."""
_DEFAULT_N_FEATURES_CAP = 550

# The model itself is P x C x C float32 inverse covariances (about 5 GB for wide_resnet50_2 at
# 256 px, as in the paper); these bound the temporaries next to it: float64 matrices inverted at
# once (in bytes), and positions per batched product when scoring.
_INVERSION_CHUNK_BYTES = 1 << 27
FLOAT64_FACTORISATION_COST = 4.0
"""Batched float64 Cholesky factorisation and inversion of 550 x 550 matrices runs at about a
quarter of the float32 matrix-product rate on the CPU (measured: 21 GFLOP/s per thread against
84; 100 x 100 ones are slower still, 4 GFLOP/s, their per-matrix overhead is not counted)."""
_POSITIONS_PER_PRODUCT = 256


@register("padim")
class PaDiM(Detector):
    """One Gaussian per feature position; Mahalanobis distance as the anomaly score."""

    learning_type = "one_pass"
    localizes = True

    hyperparameter_constraints: ClassVar[Mapping[str, Rule]] = {
        # None: the paper's value for the backbone, else all channels up to a cap.
        "n_features": (POSITIVE_INT, None),
        "covariance_eps": POSITIVE,
        "blur_sigma": NON_NEGATIVE,
    }

    def __init__(
        self,
        backbone: str = "resnet18",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        n_features: int | None = None,
        covariance_eps: float = 0.01,
        blur_sigma: float = 4.0,
        seed: int = 0,
        pretrained: bool = True,
        weights: str | None = None,
    ) -> None:
        """
        Args:
            backbone: feature extractor (``models.backbones.list_backbones()``).
            layers: backbone layers concatenated into an embedding; the first sets the grid.
            n_features: channels kept from the concatenated embedding (a seeded random subset),
                at most the total. None keeps the paper's 100 for resnet18 and 550 for
                wide_resnet50_2, and for other backbones min(total channels, 550).
            covariance_eps: multiple of the identity added to every covariance so it is
                invertible (the paper's 0.01).
            blur_sigma: standard deviation in pixels of the Gaussian smoothing of the anomaly
                map; 0 disables it.
            seed: seeds the random channel subset, and the backbone's initialisation when it
                is not pretrained.
            pretrained: use timm's pretrained backbone weights.
            weights: local backbone weight file or directory (overrides ``pretrained``).
        """
        super().__init__()
        self.extractor = FeatureExtractor(
            backbone, layers, pretrained=pretrained, weights=weights, seed=seed
        )
        total = sum(self.extractor.channels.values())
        if n_features is None:
            n_features = PAPER_N_FEATURES.get(backbone, min(total, _DEFAULT_N_FEATURES_CAP))
        # Beyond the table: the bound comes from the backbone's layers.
        if n_features > total:
            raise ModelError(
                f"padim: n_features must be between 1 and the {total} channels of {backbone} "
                f"{'+'.join(self.extractor.layers)}, got {n_features}"
            )
        self.n_features = n_features
        self.covariance_eps = float(covariance_eps)
        self.blur_sigma = float(blur_sigma)
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        channels = torch.randperm(total, generator=generator)[:n_features].sort().values
        self.register_buffer("channel_index", channels)
        self.register_buffer("mean", torch.empty(0, n_features))
        self.register_buffer("inv_covariance", torch.empty(0, n_features, n_features))

    # ------------------------------------------------------------------ resources

    @classmethod
    def _gaussian_shape(
        cls, backbone: str | None, hparams: Mapping[str, Any] | None, image_size: int
    ) -> tuple[int, int]:
        """(grid positions, embedding channels) of a trial's Gaussians."""
        merged = cls.trial_hparams(backbone, hparams)
        name = merged["backbone"]
        spec = get_backbone(name)
        layers = list(merged["layers"])
        total = sum(spec.layer(layer)[1] for layer in layers)
        channels = merged["n_features"] or PAPER_N_FEATURES.get(
            name, min(total, _DEFAULT_N_FEATURES_CAP)
        )
        return math.ceil(image_size / spec.layer(layers[0])[0]) ** 2, channels

    @classmethod
    def fit_state_bytes(
        cls,
        backbone: str | None,
        hparams: Mapping[str, Any] | None,
        image_size: int,
        *,
        n_train: int = DEFAULT_TRAIN_IMAGES,
    ) -> float:
        """The model ``fit`` builds on the device: a ``C x C`` covariance per grid position
        (float32, inverted in place) and the float64 chunk being inverted."""
        positions, channels = cls._gaussian_shape(backbone, hparams, image_size)
        return 4 * positions * channels * (channels + 2) + 2 * _INVERSION_CHUNK_BYTES

    @classmethod
    def fit_work(
        cls,
        backbone: str | None,
        hparams: Mapping[str, Any] | None,
        image_size: int,
        *,
        n_train: int = DEFAULT_TRAIN_IMAGES,
        epochs: int | None = None,
        batch_size: int = DEFAULT_TRAIN_BATCH_SIZE,
    ) -> Work:
        """Feature extraction, the per-position outer products of every image, and a Cholesky
        factorisation and inversion per position (about ``4/3 C^3`` in float64, counted
        ``FLOAT64_FACTORISATION_COST`` times)."""
        work = super().fit_work(
            backbone, hparams, image_size, n_train=n_train, epochs=epochs, batch_size=batch_size
        )
        positions, channels = cls._gaussian_shape(backbone, hparams, image_size)
        outer = 2 * n_train * positions * channels**2
        inversion = positions * 4 / 3 * channels**3 * FLOAT64_FACTORISATION_COST
        # Every batch reads and writes the P x C x C sums; the inversion passes them in float64.
        batches = math.ceil(n_train / batch_size)
        traffic = 4 * positions * channels**2 * (2 * batches + 6)
        return work + Work(outer + inversion, traffic)

    @classmethod
    def predict_work(
        cls,
        backbone: str | None,
        hparams: Mapping[str, Any] | None,
        image_size: int,
        *,
        n_train: int = DEFAULT_TRAIN_IMAGES,
        batch_size: int = DEFAULT_TRAIN_BATCH_SIZE,
    ) -> Work:
        """The backbone plus a Mahalanobis distance per grid position (``2 C^2`` each, reading
        that position's ``C x C`` inverse covariance)."""
        work = super().predict_work(
            backbone, hparams, image_size, n_train=n_train, batch_size=batch_size
        )
        positions, channels = cls._gaussian_shape(backbone, hparams, image_size)
        return work + Work(2 * positions * channels**2, 4 * positions * channels**2)

    def embed(self, images: Tensor) -> Tensor:
        """Embeddings of a batch: ``B x n_features x h x w`` on the first layer's grid."""
        # Kept channels are picked from each layer before resizing: the same result as picking
        # them from the full concatenation, without materialising all channels at full size.
        selected, offset = [], 0
        for feature in self.extractor(images).values():
            channels = feature.shape[1]
            in_layer = self.channel_index[
                (self.channel_index >= offset) & (self.channel_index < offset + channels)
            ]
            selected.append(feature.index_select(1, in_layer - offset))
            offset += channels
        # The paper aligns deeper layers to the first by nearest-neighbour upsampling.
        return concat_to_first(selected, mode="nearest")

    @torch.no_grad()
    def fit(
        self,
        train: Iterable[Batch],
        *,
        epochs: int | None = None,
        on_epoch_end: EpochCallback | None = None,
    ) -> dict[str, Any]:
        """Estimate the per-position Gaussians from one pass over ``train``; ``epochs`` is ignored.

        Sums are accumulated batch by batch, shifted by the first batch's mean to avoid the
        cancellation of ``E[xx^T] - mu mu^T`` in float32, so no training embedding is kept.
        """
        self.eval()
        device = self.channel_index.device
        count = 0
        shift = total = outer = None
        grid: tuple[int, int] | None = None
        for images in iter_images(train):
            embedding = self.embed(images.to(device)).float()
            batch, channels, height, width = embedding.shape
            if grid is None:
                grid = (height, width)
                shift = embedding.mean(0).flatten(1).T.contiguous()  # P x C
                total = torch.zeros_like(shift)
                outer = torch.zeros(height * width, channels, channels, device=device)  # P x C x C
            elif (height, width) != grid:
                raise ModelError(
                    f"padim: training images give {height}x{width} feature grids after "
                    f"{grid[0]}x{grid[1]}; all training images must have the same size"
                )
            centred = embedding.flatten(2).permute(2, 0, 1) - shift[:, None, :]  # P x B x C
            total += centred.sum(1)
            outer.baddbmm_(centred.transpose(1, 2), centred)
            count += batch
        if grid is None:
            raise ModelError("padim: the training set is empty")
        if count < 2:
            raise ModelError("padim: at least 2 training images are needed for a covariance")
        centred_mean = total / count
        # Unbiased covariance from the shifted sums, then (cov + eps I)^-1, a chunk at a time and
        # in place so that only one P x C x C tensor is ever held.
        identity = torch.eye(self.n_features, device=device, dtype=torch.float64)
        chunk = max(1, _INVERSION_CHUNK_BYTES // (8 * self.n_features**2))
        for start in range(0, outer.shape[0], chunk):
            stop = start + chunk
            m = centred_mean[start:stop].double()
            covariance = (outer[start:stop].double() - count * m[:, :, None] * m[:, None, :]) / (
                count - 1
            )
            covariance += self.covariance_eps * identity
            factor, info = torch.linalg.cholesky_ex(covariance)
            if torch.any(info != 0):
                raise ModelError(
                    "padim: a regularised covariance is not positive definite "
                    "(non-finite features?)"
                )
            outer[start:stop] = torch.cholesky_inverse(factor).float()
        self.mean = (shift + centred_mean).contiguous()
        self.inv_covariance = outer
        if on_epoch_end is not None:
            on_epoch_end(1, {})
        return {"epochs": 1, "n_images": count, "positions": outer.shape[0]}

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        """Score a batch: the blurred Mahalanobis-distance map and its maximum."""
        if self.mean.shape[0] == 0:
            raise ModelError("padim: predict called before fit")
        embedding = self.embed(images.to(self.channel_index.device)).float()
        batch, _, height, width = embedding.shape
        if height * width != self.mean.shape[0]:
            raise ModelError(
                f"padim: fitted on {self.mean.shape[0]} feature positions, these images give "
                f"{height}x{width}; predict at the training image size"
            )
        delta = embedding.flatten(2).permute(2, 0, 1) - self.mean[:, None, :]  # P x B x C
        squared = torch.empty(height * width, batch, device=delta.device)
        # d^T S^-1 d at every position, as batched (B x C) @ (C x C) products over a few
        # positions at a time so that the temporaries stay small.
        for start in range(0, delta.shape[0], _POSITIONS_PER_PRODUCT):
            stop = start + _POSITIONS_PER_PRODUCT
            d = delta[start:stop]
            squared[start:stop] = (torch.bmm(d, self.inv_covariance[start:stop]) * d).sum(2)
        distances = squared.clamp_min_(0).sqrt_().T.reshape(batch, height, width)
        maps = gaussian_blur(upsample_maps(distances, images.shape[-2:]), self.blur_sigma)
        scores = maps.flatten(1).max(dim=1).values
        return Prediction(score=scores, anomaly_map=maps)

    def export_module(self) -> torch.nn.Module:
        """:meth:`predict` as traceable tensor operations (:class:`PaDiMExport`)."""
        if self.mean.shape[0] == 0:
            raise ModelError("padim: export called before fit")
        return PaDiMExport(self)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The Gaussians' shapes are only known after fit: take the stored ones.
        for name in ("mean", "inv_covariance"):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key], device=self.mean.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class PaDiMExport(torch.nn.Module):
    """PaDiM's scoring as traceable operations: :meth:`PaDiM.embed` with each layer's kept
    channels fixed at export (``embed`` finds them with a boolean mask, a data-dependent shape)
    and every position's Mahalanobis distance as one batched product."""

    def __init__(self, detector: PaDiM) -> None:
        super().__init__()
        self.detector = detector
        offset = 0
        for i, channels in enumerate(detector.extractor.channels.values()):
            index = detector.channel_index
            kept = index[(index >= offset) & (index < offset + channels)] - offset
            self.register_buffer(f"kept_{i}", kept.clone(), persistent=False)
            offset += channels
        self.blur_sigma = detector.blur_sigma

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.detector.extractor(images).values()
        selected = [
            feature.index_select(1, getattr(self, f"kept_{i}"))
            for i, feature in enumerate(features)
        ]
        embedding = concat_to_first(selected, mode="nearest").float()  # B x C x h x w
        delta = embedding.flatten(2).permute(2, 0, 1) - self.detector.mean[:, None, :]  # P x B x C
        squared = (torch.bmm(delta, self.detector.inv_covariance) * delta).sum(2)  # P x B
        distances = squared.clamp_min(0).sqrt().T.reshape_as(embedding[:, 0])
        maps = gaussian_blur(upsample_maps(distances, images.shape[-2:]), self.blur_sigma)
        return maps.flatten(1).max(dim=1).values, maps
