"""CutPaste (Li, Sohn, Yoon & Pfister, "CutPaste: Self-Supervised Learning for Anomaly Detection
and Localization", CVPR 2021).

A CNN (ResNet18 in the paper, ImageNet-pretrained) with an MLP projection head learns to tell
normal training images from copies of them spoiled by CutPaste (a rectangle cut from the image,
colour-jittered and pasted elsewhere) and CutPaste-scar (a thin, rotated strip pasted the same
way). The 3-way variant classifies normal / CutPaste / scar; "binary" and "scar" use one kind of
anomaly. The classifier itself is thrown away: to detect, a Gaussian density estimator (GDE,
the mean and Ledoit-Wolf shrunk covariance of the L2-normalised embeddings of the normal
training images) scores a test image by the Mahalanobis distance of its embedding.

Localisation (``localize=True``) follows the paper's patch-level model: the network is trained on
random ``patch_size`` crops (CutPaste applied to the crop), the GDE models patch embeddings, and
at test time every patch of a dense grid (stride ``patch_stride``) is scored; each pixel takes
the mean score of the patches covering it, Gaussian-smoothed. The image score is then the
largest patch score. That is one network forward per patch (2401 per image at 256 px with the
paper's 64 px patches, stride 4), so it is off by default and the detector is image-level.

The paper trains at 256 px (the study's image size sets it here). Departures from it: the
Gaussian is refitted after every epoch (so scores exist mid-training, for validation-driven
schedulers; the last refit is the paper's fit after training), the cosine decay steps per epoch
rather than per update, and the training images get no random translation or colour jitter
besides the anomalies' own jitter of the pasted patch (the caller's data pipeline may add them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.anomalies import CutPaste as CutPasteAnomaly
from data.transforms import IMAGENET_MEAN, IMAGENET_STD
from models.backbones import FeatureExtractor
from models.base import (
    Batch,
    Detector,
    EpochCallback,
    Prediction,
    check_epochs,
    hyperparameters,
    iter_images,
    register,
    train_epochs,
)
from models.components.feature_utils import gaussian_blur
from models.constraints import (
    BOOL,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    Interval,
    Options,
    Rule,
    SequenceOf,
)
from models.errors import ModelError

__all__ = ["CutPaste", "GaussianDensity", "ledoit_wolf"]

VARIANTS: dict[str, tuple[bool, ...]] = {"binary": (False,), "scar": (True,), "3way": (False, True)}
"""Variant -> the synthetic anomaly classes it trains on (``scar`` flag of each), after class 0
(normal)."""
EMBEDDINGS = ("head", "pooled")
LAYER = "layer4"
"""The stride-32 stage every CNN backbone offers (an alias where its native name differs); its
global average pool is the representation the projection head reads."""
PATCH_CHUNK = 512
"""Patches embedded per forward pass when scoring a dense grid (bounds the memory)."""


def ledoit_wolf(x: Tensor) -> tuple[Tensor, Tensor, float]:
    """Mean, Ledoit-Wolf shrunk covariance and shrinkage of the rows of ``x`` (``N x d``).

    The covariance is ``(1 - s) S + s (tr S / d) I`` with ``S`` the maximum-likelihood sample
    covariance and ``s`` the shrinkage that minimises the expected Frobenius error (Ledoit &
    Wolf, 2004), which keeps it well conditioned when there are fewer images than dimensions.
    Computed in float64.
    """
    x = x.detach().double()
    n, d = x.shape
    mean = x.mean(0)
    centred = x - mean
    sample = centred.T @ centred / n
    scale = sample.diagonal().mean()
    identity = torch.eye(d, dtype=x.dtype, device=x.device)
    # Distance of S to the scaled identity, and the variance of S around the true covariance.
    distance = (sample - scale * identity).square().sum() / d
    fourth = centred.square().sum(1).square().sum()
    spread = (fourth / n - sample.square().sum()) / (n * d)
    spread = torch.minimum(spread, distance)
    shrinkage = 0.0 if float(distance) == 0.0 else float(spread / distance)
    covariance = (1.0 - shrinkage) * sample + shrinkage * scale * identity
    return mean, covariance, shrinkage


class GaussianDensity(nn.Module):
    """A Gaussian fitted to normal embeddings; ``forward`` gives Mahalanobis distances.

    Args:
        dim: dimension of the embeddings. Mean and precision are float64 buffers of fixed shape,
            so a state dict round-trips into a freshly built model.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("precision", torch.eye(dim, dtype=torch.float64))
        self.register_buffer("fitted", torch.tensor(False))

    @torch.no_grad()
    def fit(self, embeddings: Tensor) -> float:
        """Fit mean and Ledoit-Wolf precision to ``N x dim`` embeddings; return the shrinkage."""
        mean, covariance, shrinkage = ledoit_wolf(embeddings)
        factor, info = torch.linalg.cholesky_ex(covariance)
        if int(info) != 0:
            # Only a degenerate set gets here (all embeddings equal: zero covariance); a small
            # isotropic floor keeps the distances finite.
            floor = max(float(covariance.diagonal().mean()), 1.0) * 1e-6
            identity = torch.eye(len(mean), dtype=covariance.dtype, device=covariance.device)
            factor = torch.linalg.cholesky(covariance + floor * identity)
        self.mean.copy_(mean)
        self.precision.copy_(torch.cholesky_inverse(factor))
        self.fitted.fill_(True)
        return shrinkage

    def forward(self, embeddings: Tensor) -> Tensor:
        centred = embeddings.double() - self.mean
        squared = torch.einsum("bi,ij,bj->b", centred, self.precision, centred)
        return squared.clamp_min(0.0).sqrt()


def _positions(length: int, patch: int, stride: int) -> list[int]:
    """Patch offsets along one side: every ``stride`` pixels, plus one flush with the end so
    that every pixel is covered."""
    last = length - patch
    offsets = list(range(0, last + 1, stride))
    if offsets[-1] != last:
        offsets.append(last)
    return offsets


def _coverage(length: int, patch: int, stride: int, device: torch.device) -> Tensor:
    """``length x n_patches`` 0/1 matrix: whether pixel ``r`` lies in patch ``i`` (of the
    offsets :func:`_positions` gives)."""
    pixels = torch.arange(length, device=device)[:, None]
    starts = torch.tensor(_positions(length, patch, stride), device=device)[None, :]
    return ((pixels >= starts) & (pixels < starts + patch)).float()


@register("cutpaste")
class CutPaste(Detector):
    """Self-supervised CutPaste classifier; Gaussian density of its embeddings scores images."""

    learning_type = "iterative"
    # The default (localize=False) is image-level; an instance built with localize=True sets
    # its own ``localizes`` and returns maps.
    localizes = False

    hyperparameter_constraints: ClassVar[Mapping[str, Rule]] = {
        "variant": Options(*VARIANTS),
        # A single int is one linear layer.
        "head_dims": (SequenceOf(POSITIVE_INT, min_length=1), POSITIVE_INT),
        "embedding": Options(*EMBEDDINGS),
        "lr": POSITIVE,
        "momentum": NON_NEGATIVE,
        "weight_decay": NON_NEGATIVE,
        "epochs": POSITIVE_INT,
        "localize": BOOL,
        "patch_size": Interval(int, 8, None),
        "patch_stride": POSITIVE_INT,
        "blur_sigma": NON_NEGATIVE,
    }

    def __init__(
        self,
        backbone: str = "resnet18",
        variant: str = "3way",
        head_dims: Sequence[int] = (512, 512, 512, 512, 512, 512, 512, 512, 128),
        embedding: str = "head",
        lr: float = 0.03,
        momentum: float = 0.9,
        weight_decay: float = 3e-5,
        epochs: int = 256,
        localize: bool = False,
        patch_size: int = 64,
        patch_stride: int = 4,
        blur_sigma: float = 4.0,
        seed: int = 0,
        pretrained: bool = True,
        weights: str | None = None,
    ) -> None:
        """
        Args:
            backbone: the CNN trained as the classifier's body (the paper's ResNet18; any CNN
                of ``models.backbones.list_backbones()``): its stride-32 stage (``layer4``),
                globally average-pooled, feeds the projection head.
            variant: the self-supervised task: ``"binary"`` (normal vs CutPaste),
                ``"scar"`` (normal vs CutPaste-scar) or ``"3way"`` (normal vs CutPaste vs scar,
                the paper's best).
            head_dims: widths of the MLP projection head: every layer but the last is
                linear + batch norm + ReLU, the last is linear (the embedding); a linear
                classifier follows. The default is the paper's eight 512-wide layers and a
                128-dimensional embedding.
            embedding: the representation the Gaussian density models: ``"head"`` (the
                projection head's output, as in the public reimplementations) or
                ``"pooled"`` (the pooled backbone features the head reads); L2-normalised
                either way.
            lr: initial SGD learning rate (the paper's 0.03), decayed to 0 with a cosine over
                the epoch budget (stepped once per epoch).
            momentum: SGD momentum (the paper's 0.9).
            weight_decay: SGD weight decay (the paper's 3e-5).
            epochs: training epochs (passes over the training set) when ``fit`` is not given a
                budget. The paper trains 256 "epochs" of 256 updates of 32 images (plus their
                augmented copies); a pass over a few hundred images is far fewer updates, so
                this default is a budget for sweeps to cut, not a reproduction of the paper's
                65 536 steps.
            localize: train and score the patch-level model (the paper's localisation) and
                return anomaly maps. Off by default: scoring takes one network forward per
                patch of the dense grid.
            patch_size: side in pixels of the patches of the patch-level model (the paper's 64
                at 256 px); images must be at least this large. Used only with ``localize``.
            patch_stride: stride in pixels of the dense patch grid scored at test time (the
                paper's 4). The Gaussian is fitted to a random subset of that grid's patches in
                every training image, as many as a grid at a stride of half a patch holds
                (neighbouring patches add little, and the refit runs after every epoch). Used
                only with ``localize``.
            blur_sigma: standard deviation in pixels of the Gaussian smoothing of the anomaly
                map (the patch scores spread over the pixels they cover); 0 disables it. Used
                only with ``localize``.
            seed: seeds the initialisation of the head (and of the backbone when it is not
                pretrained), every random choice of the synthetic anomalies and crops, and the
                patches the patch-level Gaussian is fitted to.
            pretrained: start the backbone from timm's ImageNet weights (the paper does).
            weights: local backbone weight file or directory (overrides ``pretrained``).
        """
        super().__init__()
        dims = [head_dims] if isinstance(head_dims, int) else list(head_dims)
        # Beyond the table: the backbone (a direct call skips create's check).
        problem = type(self).backbone_problem(backbone)
        if problem is not None:
            raise ModelError(f"cutpaste: cannot use backbone {backbone!r}: {problem}")
        self.variant = variant
        self.embedding = embedding
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.epochs = epochs
        self.localize = localize
        self.localizes = localize
        self.patch_size = patch_size
        self.patch_stride = patch_stride
        self.blur_sigma = float(blur_sigma)
        # The patch-level Gaussian sees about one scoring-grid patch in
        # (_fit_stride / patch_stride)^2 of every training image: neighbours add little, and
        # the refit after every epoch must stay cheap next to the epoch's few crops per image.
        self._fit_stride = max(patch_stride, patch_size // 2)
        self.seed = seed

        generator = torch.Generator().manual_seed(seed)
        backbone_seed, head_seed, self._augment_seed, self._density_seed = torch.randint(
            2**62, (4,), generator=generator
        ).tolist()
        self.backbone = FeatureExtractor(
            backbone,
            [LAYER],
            pretrained=pretrained,
            weights=weights,
            requires_grad=True,
            seed=backbone_seed,
        )
        width = self.backbone.channels[LAYER]
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(head_seed)
            layers: list[nn.Module] = []
            for dim in dims[:-1]:
                layers += [nn.Linear(width, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True)]
                width = dim
            layers.append(nn.Linear(width, dims[-1]))
            self.head = nn.Sequential(*layers)
            self.classifier = nn.Linear(dims[-1], 1 + len(VARIANTS[variant]))
        self.anomalies = [CutPasteAnomaly(scar=scar) for scar in VARIANTS[variant]]
        dim = dims[-1] if embedding == "head" else self.backbone.channels[LAYER]
        self.density = GaussianDensity(dim)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        # Built ready to score (batch norm on running statistics); fit switches modes itself.
        self.eval()

    @classmethod
    def backbone_problem(
        cls, backbone: str, hparams: Mapping[str, Any] | None = None, image_size: int | None = None
    ) -> str | None:
        """Base checks, plus: with ``localize`` the images hold at least one patch."""
        problem = super().backbone_problem(backbone, hparams, image_size)
        if problem is not None or image_size is None:
            return problem
        merged = {**hyperparameters(cls.name), **(hparams or {})}
        patch = merged.get("patch_size")
        if merged.get("localize") is True and isinstance(patch, int) and image_size < patch:
            return (
                f"with localize its patches are {patch} px, larger than the {image_size} px "
                "images; use a smaller patch_size"
            )
        return None

    # ------------------------------------------------------------------ network

    def forward_features(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(pooled backbone features, projection-head embedding, class logits) of a batch."""
        pooled = self.backbone(images)[LAYER].mean(dim=(2, 3))
        projected = self.head(pooled)
        return pooled, projected, self.classifier(projected)

    def embed(self, images: Tensor) -> Tensor:
        """The L2-normalised representation the Gaussian density models, ``B x dim``."""
        pooled, projected, _ = self.forward_features(images)
        return F.normalize(projected if self.embedding == "head" else pooled, dim=1)

    # ------------------------------------------------------------------ training

    def _check_size(self, images: Tensor) -> None:
        if self.localize and min(images.shape[-2:]) < self.patch_size:
            raise ModelError(
                f"cutpaste: images of {images.shape[-2]}x{images.shape[-1]} px are smaller than "
                f"patch_size {self.patch_size}"
            )

    def _random_crops(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """One ``patch_size`` crop per image, at a random position."""
        size = self.patch_size
        height, width = images.shape[-2:]
        ys = torch.randint(height - size + 1, (images.shape[0],), generator=generator).tolist()
        xs = torch.randint(width - size + 1, (images.shape[0],), generator=generator).tolist()
        return torch.stack(
            [
                image[:, y : y + size, x : x + size]
                for image, y, x in zip(images, ys, xs, strict=True)
            ]
        )

    def _synthesize(self, images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The batch, followed by one spoiled copy per anomaly class, and the class labels."""
        # The generators work on [0, 1] pixels; outside the pasted region the copies keep the
        # normalised originals bit for bit, so nothing but the paste tells the classes apart
        # (clamping out-of-range pixels would be a give-away).
        pixels = (images * self.pixel_std + self.pixel_mean).clamp(0.0, 1.0)
        views, labels = [images], [torch.zeros(len(images), dtype=torch.long)]
        for label, anomaly in enumerate(self.anomalies, start=1):
            spoiled, mask = anomaly(pixels, generator)
            spoiled = (spoiled.to(images.dtype) - self.pixel_mean) / self.pixel_std
            views.append(torch.where(mask.to(images.device) > 0.5, spoiled, images))
            labels.append(torch.full((len(images),), label, dtype=torch.long))
        return torch.cat(views), torch.cat(labels).to(images.device)

    def resource_probe(self, images: Tensor) -> None:
        """A training step's forward: the batch (cropped to patches with ``localize``) and one
        spoiled copy per anomaly class through backbone, head and classifier."""
        if self.localize:
            images = images[..., : self.patch_size, : self.patch_size]
        self.forward_features(images.repeat(1 + len(self.anomalies), 1, 1, 1))

    def fit(
        self,
        train: Iterable[Batch],
        *,
        epochs: int | None = None,
        on_epoch_end: EpochCallback | None = None,
    ) -> dict[str, Any]:
        """Train the classifier for ``epochs`` (default: the constructor's) passes, refitting
        the Gaussian density after each.

        Every step classifies the batch and its CutPaste (and/or scar) copies with cross
        entropy. After each epoch one pass over ``train`` in eval mode fits the Gaussian to the
        normal embeddings (patch embeddings with ``localize``), so ``predict`` is valid at every
        epoch (validation-driven schedulers) and the last fit is the paper's; the pass costs a
        forward of the training set, about a ninth of a 3-way epoch. ``on_epoch_end(epoch,
        {"loss", "accuracy", "lr"})`` runs after every epoch (mean cross entropy and
        classification accuracy over the training images, the learning rate used) and stops
        training when it returns True.
        """
        n_epochs = self.epochs if epochs is None else check_epochs("cutpaste", epochs, "fit epochs")
        optimizer = torch.optim.SGD(
            [*self.backbone.parameters(), *self.head.parameters(), *self.classifier.parameters()],
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )
        generator = torch.Generator().manual_seed(self._augment_seed)

        def step(images: Tensor) -> dict[str, float]:
            self._check_size(images)
            if self.localize:
                images = self._random_crops(images, generator)
            inputs, labels = self._synthesize(images, generator)
            _, _, logits = self.forward_features(inputs)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            accuracy = (logits.detach().argmax(1) == labels).float().mean()
            return {"loss": float(loss.detach()), "accuracy": float(accuracy)}

        def end_of_epoch(epoch: int, means: dict[str, float]) -> dict[str, float]:
            used = optimizer.param_groups[0]["lr"]
            for group in optimizer.param_groups:
                group["lr"] = self.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / n_epochs))
            self._fit_density(train)
            return {"lr": used}

        epochs_run, means = train_epochs(
            self,
            train,
            step,
            epochs=n_epochs,
            on_epoch_end=on_epoch_end,
            end_of_epoch=end_of_epoch,
        )
        return {
            "epochs": epochs_run,
            "loss": means.get("loss", math.nan),
            "accuracy": means.get("accuracy", math.nan),
        }

    @torch.no_grad()
    def _fit_density(self, train: Iterable[Batch]) -> None:
        """Fit the Gaussian to the eval-mode embeddings of the normal training images (of a
        random subset of each one's scoring-grid patches with ``localize``)."""
        was_training = self.training
        self.eval()
        # A fresh generator per pass: every refit draws the same subsets for the same batches.
        generator = torch.Generator().manual_seed(self._density_seed)
        try:
            embeddings = []
            for images in iter_images(train):
                images = images.to(self.density.mean.device)
                if not self.localize:
                    embeddings.append(self.embed(images))
                    continue
                self._check_size(images)
                ys, xs = self._grid(images, self.patch_stride)
                coarse_ys, coarse_xs = self._grid(images, self._fit_stride)
                n_fit = len(coarse_ys) * len(coarse_xs)
                # Random grid positions, not a coarse grid: a stride that is a multiple of a
                # texture's period would show the Gaussian one phase of it and make every
                # other position of the scoring grid look anomalous.
                corners = []
                for i in range(len(images)):
                    chosen = torch.randperm(len(ys) * len(xs), generator=generator)[:n_fit]
                    corners += [(i, ys[k // len(xs)], xs[k % len(xs)]) for k in chosen.tolist()]
                embeddings.append(self._embed_patches(images, corners))
            if not embeddings:
                raise ModelError("cutpaste: the training set is empty")
            self.density.fit(torch.cat(embeddings))
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------ scoring

    def _grid(self, images: Tensor, stride: int) -> tuple[list[int], list[int]]:
        """Row and column offsets of the patch grid at ``stride`` over ``images``."""
        height, width = images.shape[-2:]
        return (
            _positions(height, self.patch_size, stride),
            _positions(width, self.patch_size, stride),
        )

    def _embed_patches(self, images: Tensor, corners: list[tuple[int, int, int]]) -> Tensor:
        """``len(corners) x dim`` embeddings of the patches at (image, top, left)."""
        size = self.patch_size
        chunks = []
        for start in range(0, len(corners), PATCH_CHUNK):
            patches = [
                images[i, :, y : y + size, x : x + size]
                for i, y, x in corners[start : start + PATCH_CHUNK]
            ]
            chunks.append(self.embed(torch.stack(patches)))
        return torch.cat(chunks)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        """Score a batch by the Mahalanobis distance of its embeddings to the normal Gaussian.

        Image level: the distance of the whole image's embedding, no map. With ``localize``:
        the distance of every patch of the dense grid, spread over the pixels each covers
        (mean over covering patches) and Gaussian-smoothed; the image score is the largest
        patch distance. Scoring always runs in eval mode (batch norm on its running
        statistics, as the Gaussian was fitted), also when called from a training callback.
        """
        if not bool(self.density.fitted):
            raise ModelError("cutpaste: predict called before fit")
        was_training = self.training
        self.eval()
        try:
            return self._score(images.to(self.density.mean.device))
        finally:
            self.train(was_training)

    def _score(self, images: Tensor) -> Prediction:
        if not self.localize:
            return Prediction(score=self.density(self.embed(images)).float(), anomaly_map=None)
        self._check_size(images)
        ys, xs = self._grid(images, self.patch_stride)
        corners = [(i, y, x) for i in range(len(images)) for y in ys for x in xs]
        distances = self.density(self._embed_patches(images, corners))
        grid = distances.float().view(len(images), len(ys), len(xs))
        # Pixel (r, c) is covered by patch (i, j) iff row r is in patch row i and column c in
        # patch column j, so sums and counts over covering patches factor into two products.
        height, width = images.shape[-2:]
        cover_y = _coverage(height, self.patch_size, self.patch_stride, images.device)
        cover_x = _coverage(width, self.patch_size, self.patch_stride, images.device)
        sums = cover_y @ grid @ cover_x.T
        counts = cover_y.sum(1)[:, None] * cover_x.sum(1)[None, :]
        anomaly_map = gaussian_blur(sums / counts, self.blur_sigma)
        return Prediction(score=grid.flatten(1).amax(1), anomaly_map=anomaly_map)
