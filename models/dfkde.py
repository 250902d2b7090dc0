"""DFKDE: Deep Feature Kernel Density Estimation (the reference study's image-level baseline).

Fit: every training image becomes one vector, the global average of its backbone features
(``layers``, concatenated over layers); the vectors are reduced by PCA to a few components,
rescaled (by the largest training norm, or each to unit length), and a Gaussian kernel density
estimate is placed on them (bandwidth by Scott's rule, kernel shaped like the data covariance, as
``scipy.stats.gaussian_kde`` does). Predict: the image score is the negative log density of the
image's vector under that estimate, so images unlike every training image score high. There is
no anomaly map.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from models.backbones import FeatureExtractor
from models.base import Batch, Detector, EpochCallback, Prediction, iter_images, register
from models.components.pca import PCA
from models.constraints import POSITIVE_INT, Interval, Options, Rule
from models.errors import ModelError

__all__ = ["DFKDE", "GaussianKDE"]

SCALING_METHODS = ("scale", "norm")

# Relative ridge added to a kernel covariance that Cholesky rejects (near-duplicate training
# vectors make it singular), tried in growing multiples of the mean variance.
_JITTERS = (0.0, 1e-10, 1e-8, 1e-6, 1e-4)
# Training points per block when scoring, to bound the B x N distance temporaries.
_POINTS_PER_BLOCK = 1 << 16


class GaussianKDE(torch.nn.Module):
    """Gaussian kernel density estimate with a full bandwidth matrix (Scott's rule).

    The kernel covariance is ``h^2 * Cov(points)`` with ``h = N^(-1 / (d + 4))`` (Scott, 1992).
    The points are stored whitened by that covariance's Cholesky factor, so a log density is a
    log-sum-exp of squared Euclidean distances. Buffers are float64 and round-trip through
    ``state_dict``.
    """

    def __init__(self) -> None:
        super().__init__()
        # whitening: d x d, L^-1 for the kernel covariance L L^T; points: N x d, whitened;
        # log_norm: log of the normalising constant 1 / (N sqrt(det(2 pi Sigma))).
        self.register_buffer("whitening", torch.empty(0, 0, dtype=torch.float64))
        self.register_buffer("points", torch.empty(0, 0, dtype=torch.float64))
        self.register_buffer("log_norm", torch.zeros((), dtype=torch.float64))

    @property
    def fitted(self) -> bool:
        return self.points.shape[0] > 0

    @torch.no_grad()
    def fit(self, points: Tensor) -> GaussianKDE:
        """Place a kernel on every row of the ``N x d`` matrix ``points`` (N >= 2)."""
        points = points.detach().double()
        n, d = points.shape
        if n < 2:
            raise ValueError(f"a kernel density estimate needs >= 2 points, got {n}")
        bandwidth = n ** (-1.0 / (d + 4))
        covariance = torch.atleast_2d(torch.cov(points.T)) * bandwidth**2
        scale = covariance.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
        identity = torch.eye(d, dtype=torch.float64, device=points.device)
        for jitter in _JITTERS:
            factor, info = torch.linalg.cholesky_ex(covariance + jitter * scale * identity)
            if info == 0:
                break
        else:
            raise ValueError("the kernel covariance is not positive definite (non-finite data?)")
        whitening = torch.linalg.solve_triangular(factor, identity, upper=False)
        self.whitening = whitening
        self.points = points @ whitening.T
        log_det = 2.0 * factor.diagonal().log().sum()
        self.log_norm = -math.log(n) - 0.5 * (d * math.log(2.0 * math.pi) + log_det)
        return self

    def log_density(self, x: Tensor) -> Tensor:
        """``log p(x)`` for every row of the ``B x d`` matrix ``x`` (float64)."""
        queries = x.double() @ self.whitening.T
        blocks = []
        for start in range(0, self.points.shape[0], _POINTS_PER_BLOCK):
            squared = torch.cdist(queries, self.points[start : start + _POINTS_PER_BLOCK]).square()
            blocks.append(torch.logsumexp(-0.5 * squared, dim=1))
        return torch.logsumexp(torch.stack(blocks, dim=1), dim=1) + self.log_norm

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The shapes are only known after fit: take the stored ones.
        for name in ("whitening", "points"):
            key = prefix + name
            if key in state_dict:
                current = getattr(self, name)
                setattr(self, name, torch.empty_like(state_dict[key], device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@register("dfkde")
class DFKDE(Detector):
    """Kernel density of globally pooled, PCA-reduced deep features; image level only."""

    learning_type = "one_pass"
    localizes = False
    # Global pooling reads any feature map, a transformer's token grid included; transformers
    # must be fed their native input size.
    backbone_kinds = ("cnn", "vit")
    fixed_input_size = True

    hyperparameter_constraints: ClassVar[Mapping[str, Rule]] = {
        "n_pca_components": POSITIVE_INT,
        "feature_scaling_method": Options(*SCALING_METHODS),
        "max_training_points": Interval(int, 2, None, note="a density needs two points"),
    }

    def __init__(
        self,
        backbone: str = "resnet18",
        layers: Sequence[str] = ("layer4",),
        n_pca_components: int = 16,
        feature_scaling_method: str = "scale",
        max_training_points: int = 40000,
        seed: int = 0,
        pretrained: bool = True,
        weights: str | None = None,
    ) -> None:
        """
        Args:
            backbone: feature extractor (``models.backbones.list_backbones()``).
            layers: backbone layers whose globally averaged features are concatenated into an
                image's vector.
            n_pca_components: PCA components the vectors are reduced to before the density
                estimate. Fewer are kept when the training set cannot support them (at most
                one less than the number of training vectors, and at most the feature size);
                ``fit`` then says so in ``stats["notes"]``.
            feature_scaling_method: how the reduced vectors are rescaled: ``"scale"`` divides
                all of them by the largest norm seen in training, ``"norm"`` makes each one a
                unit vector (only its direction counts).
            max_training_points: most training vectors the density is built on; a larger
                training set is cut to a seeded random subset of this size.
            seed: seeds the training subset, and the backbone's initialisation when it is not
                pretrained.
            pretrained: use timm's pretrained backbone weights.
            weights: local backbone weight file or directory (overrides ``pretrained``).
        """
        super().__init__()
        self.n_pca_components = n_pca_components
        self.feature_scaling_method = feature_scaling_method
        self.max_training_points = max_training_points
        self.seed = seed
        self.extractor = FeatureExtractor(
            backbone, layers, pretrained=pretrained, weights=weights, seed=seed
        )
        self.pca = PCA()
        self.kde = GaussianKDE()
        self.register_buffer("max_norm", torch.ones((), dtype=torch.float64))

    def embed(self, images: Tensor) -> Tensor:
        """One vector per image: ``B x C``, the layers' spatially averaged features."""
        features = self.extractor(images)
        return torch.cat([f.mean(dim=(2, 3)) for f in features.values()], dim=1)

    def _scale(self, reduced: Tensor) -> Tensor:
        if self.feature_scaling_method == "norm":
            return F.normalize(reduced, dim=1)
        return reduced / self.max_norm

    @torch.no_grad()
    def fit(
        self,
        train: Iterable[Batch],
        *,
        epochs: int | None = None,
        on_epoch_end: EpochCallback | None = None,
    ) -> dict[str, Any]:
        """Fit PCA and the density on one pass over ``train``; ``epochs`` is ignored."""
        self.eval()
        device = self.max_norm.device
        vectors = [self.embed(images.to(device)) for images in iter_images(train)]
        if not vectors:
            raise ModelError("dfkde: the training set is empty")
        features = torch.cat(vectors)
        n_images = features.shape[0]
        if n_images < 2:
            raise ModelError("dfkde: at least 2 training images are needed for a density")
        notes = []
        if n_images > self.max_training_points:
            generator = torch.Generator().manual_seed(self.seed)
            keep = torch.randperm(n_images, generator=generator)[: self.max_training_points]
            features = features[keep.sort().values.to(device)]
        n_points, dim = features.shape
        # Centred, N vectors span at most N - 1 directions: further components have zero
        # variance and would make the kernel covariance singular.
        n_components = min(self.n_pca_components, n_points - 1, dim)
        if n_components < self.n_pca_components:
            notes.append(
                f"dfkde kept {n_components} PCA components instead of {self.n_pca_components}: "
                f"{n_points} training vectors of size {dim} support no more"
            )
        self.pca.fit(features, n_components)
        reduced = self.pca.transform(features)
        self.max_norm = torch.linalg.vector_norm(reduced, dim=1).max().clamp_min(1e-12)
        try:
            self.kde.fit(self._scale(reduced))
        except ValueError as error:
            raise ModelError(f"dfkde: {error}") from error
        stats: dict[str, Any] = {
            "epochs": 1,
            "n_images": n_images,
            "n_training_points": n_points,
            "n_pca_components": n_components,
        }
        if notes:
            stats["notes"] = notes
        if on_epoch_end is not None:
            on_epoch_end(1, {"n_training_points": n_points})
        return stats

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        """Score a batch: the negative log density of each image's reduced feature vector."""
        if not self.kde.fitted:
            raise ModelError("dfkde: predict called before fit")
        features = self.embed(images.to(self.max_norm.device))
        log_density = self.kde.log_density(self._scale(self.pca.transform(features)))
        return Prediction(score=(-log_density).float(), anomaly_map=None)
