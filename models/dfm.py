"""DFM: Deep Feature Modelling (Ahuja et al., "Probabilistic Modeling of Deep Features for
Out-of-Distribution and Adversarial Detection", 2019), with the feature-map variant the reference
study ran.

Fit: every training image's backbone feature map (``layers``, deeper ones resized to the first's
grid and concatenated) is average-pooled in ``pooling_kernel_size`` blocks and flattened into one
vector; PCA on these vectors keeps the components explaining ``pca_level`` of their variance, a
linear model of normal images. Predict with ``score_type="fre"``: the feature reconstruction
error, ``|x - x_hat|^2`` between a test vector and its projection onto the principal subspace;
summed over channels it is an error map on the pooled grid (upsampled to the input), and its
total is the image score. With ``"nll"``: the negative log-likelihood of the test vector's PCA
coordinates under the Gaussian the training vectors have there (independent components with
the PCA variances); image level only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from models.backbones import FeatureExtractor, get_backbone, resolve_layers
from models.base import (
    Batch,
    Detector,
    EpochCallback,
    Prediction,
    hyperparameters,
    iter_images,
    register,
)
from models.components.feature_utils import concat_to_first, upsample_maps
from models.components.pca import PCA
from models.constraints import POSITIVE_INT, Interval, Options, Rule
from models.errors import ModelError

__all__ = ["DFM"]

SCORE_TYPES = ("fre", "nll")


@register("dfm")
class DFM(Detector):
    """PCA model of pooled deep feature maps; reconstruction-error or likelihood scoring.

    ``localizes`` is True for the class (the default ``score_type="fre"`` gives a map); an
    instance built with ``score_type="nll"`` sets its own ``localizes`` to False and returns
    ``anomaly_map=None``.
    """

    learning_type = "one_pass"
    localizes = True
    # Pooling and PCA read any feature map, a transformer's token grid included (the reference
    # study ran DFM on DeiT too); transformers must be fed their native input size.
    backbone_kinds = ("cnn", "vit")
    fixed_input_size = True

    hyperparameter_constraints: ClassVar[Mapping[str, Rule]] = {
        "pooling_kernel_size": POSITIVE_INT,
        "pca_level": Interval(float, 0, 1, closed="right"),
        "score_type": Options(*SCORE_TYPES),
    }

    def __init__(
        self,
        backbone: str = "resnet50",
        layers: Sequence[str] = ("layer3",),
        pooling_kernel_size: int = 2,
        pca_level: float = 0.97,
        score_type: str = "fre",
        seed: int = 0,
        pretrained: bool = True,
        weights: str | None = None,
    ) -> None:
        """
        Args:
            backbone: feature extractor (``models.backbones.list_backbones()``). The default is
                ResNet50, the backbone of the reference study's DFM results (its Table B.8 also
                lists ResNet18).
            layers: backbone layers modelled; several are resized to the first's grid and
                concatenated.
            pooling_kernel_size: side of the average-pooling window (and its stride) applied to
                the feature map before modelling; 1 disables pooling. Larger windows give
                shorter vectors and a coarser anomaly map.
            pca_level: fraction of the training vectors' variance the kept principal
                components explain, in (0, 1].
            score_type: ``"fre"``: feature reconstruction error (image score and anomaly map),
                ``"nll"``: Gaussian negative log-likelihood in the PCA space (image score only).
            seed: seeds the backbone's initialisation when it is not pretrained (DFM itself
                makes no random choice).
            pretrained: use timm's pretrained backbone weights.
            weights: local backbone weight file or directory (overrides ``pretrained``).
        """
        super().__init__()
        self.pooling_kernel_size = pooling_kernel_size
        self.pca_level = float(pca_level)
        self.score_type = score_type
        self.localizes = score_type == "fre"
        self.seed = seed
        self.extractor = FeatureExtractor(
            backbone, layers, pretrained=pretrained, weights=weights, seed=seed
        )
        self.pca = PCA()
        # The pooled feature map's shape (C, h, w), known after fit.
        self.register_buffer("feature_shape", torch.zeros(3, dtype=torch.long))

    @classmethod
    def backbone_problem(
        cls, backbone: str, hparams: Mapping[str, Any] | None = None, image_size: int | None = None
    ) -> str | None:
        """Also: the first layer's grid at ``image_size`` must hold one pooling window."""
        problem = super().backbone_problem(backbone, hparams, image_size)
        if problem is not None or image_size is None:
            return problem
        merged = {**hyperparameters(cls.name), **(hparams or {})}
        spec = get_backbone(backbone)
        first = resolve_layers(spec, merged["layers"])[0]
        stride = spec.layer(first)[0]
        kernel = merged["pooling_kernel_size"]
        if isinstance(kernel, int) and image_size // stride < kernel:
            return (
                f"{first} of {backbone} has a {image_size // stride} px grid at {image_size} px "
                f"input, smaller than pooling_kernel_size {kernel}; use images of at least "
                f"{stride * kernel} px, a shallower layer or a smaller kernel"
            )
        return None

    def pooled_features(self, images: Tensor) -> Tensor:
        """``B x C x h x w``: the concatenated feature maps after average pooling."""
        features = concat_to_first(list(self.extractor(images).values()), mode="bilinear")
        if self.pooling_kernel_size > 1:
            if min(features.shape[-2:]) < self.pooling_kernel_size:
                raise ModelError(
                    f"dfm: the {features.shape[-2]}x{features.shape[-1]} feature grid is "
                    f"smaller than pooling_kernel_size {self.pooling_kernel_size}; use larger "
                    "images or a smaller kernel"
                )
            features = F.avg_pool2d(features, self.pooling_kernel_size)
        return features

    @torch.no_grad()
    def fit(
        self,
        train: Iterable[Batch],
        *,
        epochs: int | None = None,
        on_epoch_end: EpochCallback | None = None,
    ) -> dict[str, Any]:
        """Fit the PCA on one pass over ``train``; ``epochs`` is ignored."""
        self.eval()
        device = self.feature_shape.device
        maps = [self.pooled_features(images.to(device)) for images in iter_images(train)]
        if not maps:
            raise ModelError("dfm: the training set is empty")
        shapes = {tuple(m.shape[1:]) for m in maps}
        if len(shapes) > 1:
            raise ModelError(
                f"dfm: training images give feature maps of shapes {sorted(shapes)}; all "
                "training images must have the same size"
            )
        vectors = torch.cat([m.flatten(1) for m in maps])
        if vectors.shape[0] < 2:
            raise ModelError("dfm: at least 2 training images are needed for a PCA")
        try:
            self.pca.fit(vectors, self.pca_level)
        except ValueError as error:
            raise ModelError(f"dfm: {error}") from error
        self.feature_shape = torch.tensor(maps[0].shape[1:], device=device)
        stats = {
            "epochs": 1,
            "n_images": int(vectors.shape[0]),
            "feature_size": int(vectors.shape[1]),
            "n_components": self.pca.n_components,
        }
        if on_epoch_end is not None:
            on_epoch_end(1, {"n_components": stats["n_components"]})
        return stats

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        """Score a batch: total reconstruction error and its map (``"fre"``), or the NLL."""
        if not self.pca.fitted:
            raise ModelError("dfm: predict called before fit")
        features = self.pooled_features(images.to(self.feature_shape.device))
        expected = tuple(self.feature_shape.tolist())
        if tuple(features.shape[1:]) != expected:
            raise ModelError(
                f"dfm: fitted on {expected} feature maps, these images give "
                f"{tuple(features.shape[1:])}; predict at the training image size"
            )
        vectors = features.flatten(1)
        coordinates = self.pca.transform(vectors)
        if self.score_type == "nll":
            variance = self.pca.explained_variance.clamp_min(torch.finfo(torch.float64).tiny)
            nll = 0.5 * (
                (coordinates.square() / variance).sum(1) + torch.log(2.0 * math.pi * variance).sum()
            )
            return Prediction(score=nll.float(), anomaly_map=None)
        error = (vectors.double() - self.pca.inverse_transform(coordinates)).square()
        error_map = error.view(features.shape).sum(1)  # B x h x w
        scores = error_map.flatten(1).sum(1)
        anomaly_map = upsample_maps(error_map.float(), images.shape[-2:])
        return Prediction(score=scores.float(), anomaly_map=anomaly_map)
