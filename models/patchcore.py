"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

Fit: every training image becomes a grid of locally aware patch features (mid-level backbone
features averaged over a 3x3 neighbourhood, deeper layers upsampled to the first layer's grid and
concatenated); a greedy k-center coreset of all of them is the memory bank. Predict: a patch's
anomaly score is its distance to the nearest memory-bank patch; the image score is the largest
patch score, re-weighted by how isolated its nearest memory patch is.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
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
from models.cache import active_cache, make_key
from models.components.coreset import GreedyCoreset, coreset_size, greedy_coreset
from models.components.feature_utils import (
    NearestNeighbors,
    concat_to_first,
    gaussian_blur,
    upsample_maps,
)
from models.constraints import NON_NEGATIVE, POSITIVE_INT, Interval, Rule
from models.costs import Work
from models.errors import ModelError

__all__ = ["PatchCore"]

CORESET_COST_FACTOR = 2.3
"""Effective FLOPs of :func:`greedy_coreset` per FLOP of the textbook greedy k-center
(``2 k n d``): its pruning does about 4x less arithmetic, but what remains is scattered memory
access, not matrix products (calibrated: ``docs/BENCHMARKS.md``'s 102,400 -> 10,240 patches in
3.8 s on 2 threads; ``docs/resources.md``)."""


def _synchronized_clock(device: torch.device) -> float:
    # GPU work is asynchronous: wait for it so that the time split in fit's stats is real.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@register("patchcore")
class PatchCore(Detector):
    """Memory bank of nominal patch features with nearest-neighbour scoring."""

    learning_type = "one_pass"
    localizes = True
    # EfficientNet-Lite's stride-8 and stride-16 stages are thin (40 + 112 channels against
    # WRN-50's 512 + 1024): its stride-4 stage restores the detail a patch needs. On the
    # quickstart's part1 at 128 px: image AUROC 0.88 -> 0.92, pixel 0.96 -> 0.98.
    family_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "efficientnet_lite": {"layers": ("layer1", "layer2", "layer3")}
    }

    hyperparameter_constraints: ClassVar[Mapping[str, Rule]] = {
        "coreset_ratio": Interval(float, 0, 1, closed="right"),
        "num_neighbors": POSITIVE_INT,
        "projection_dim": (POSITIVE_INT, None),
        "blur_sigma": NON_NEGATIVE,
    }

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer2", "layer3"),
        coreset_ratio: float = 0.1,
        num_neighbors: int = 9,
        projection_dim: int | None = 128,
        blur_sigma: float = 4.0,
        seed: int = 0,
        pretrained: bool = True,
        weights: str | None = None,
    ) -> None:
        """
        Args:
            backbone: feature extractor (``models.backbones.list_backbones()``).
            layers: backbone layers whose features form a patch; the first sets the patch grid.
            coreset_ratio: fraction of all training patches kept in the memory bank, in (0, 1].
            num_neighbors: size of the memory-bank neighbourhood used to re-weight the image
                score (``b`` in the paper); 1 turns the re-weighting off.
            projection_dim: dimension of the random projection the coreset is selected in;
                None selects on the full features.
            blur_sigma: standard deviation in pixels of the Gaussian smoothing of the anomaly
                map; 0 disables it.
            seed: seeds the coreset's projection and starting point, and the backbone's
                initialisation when it is not pretrained.
            pretrained: use timm's pretrained backbone weights.
            weights: local backbone weight file or directory (overrides ``pretrained``).
        """
        super().__init__()
        self.coreset_ratio = float(coreset_ratio)
        self.num_neighbors = num_neighbors
        self.projection_dim = projection_dim
        self.blur_sigma = float(blur_sigma)
        self.seed = seed
        self.extractor = FeatureExtractor(
            backbone, layers, pretrained=pretrained, weights=weights, seed=seed
        )
        self.register_buffer("memory_bank", torch.empty(0, sum(self.extractor.channels.values())))
        self._index: NearestNeighbors | None = None
        self._index_source: Tensor | None = None

    # ------------------------------------------------------------------ resources

    @classmethod
    def _bank_shape(
        cls, backbone: str | None, hparams: Mapping[str, Any] | None, image_size: int
    ) -> tuple[int, int, int, float]:
        """(patches per image, patch channels, coreset selection dimension, coreset ratio)."""
        merged = cls.trial_hparams(backbone, hparams)
        spec = get_backbone(merged["backbone"])
        layers = list(merged["layers"])
        stride = spec.layer(layers[0])[0]
        channels = sum(spec.layer(layer)[1] for layer in layers)
        dim = min(merged["projection_dim"] or channels, channels)
        return math.ceil(image_size / stride) ** 2, channels, dim, float(merged["coreset_ratio"])

    @classmethod
    def fit_state_bytes(
        cls,
        backbone: str | None,
        hparams: Mapping[str, Any] | None,
        image_size: int,
        *,
        n_train: int = DEFAULT_TRAIN_IMAGES,
    ) -> float:
        """What ``fit`` holds on the device: every training patch feature, their projection
        and nearest-centre distances for the coreset, and the memory bank."""
        per_image, channels, dim, ratio = cls._bank_shape(backbone, hparams, image_size)
        patches = n_train * per_image
        return 4 * patches * (channels * (1 + ratio) + dim + 2)

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
        """Feature extraction plus the coreset: the random projection and a greedy k-center
        selection of ``coreset_ratio`` of the patches, ``2 k n d`` FLOPs for the textbook
        algorithm scaled by ``CORESET_COST_FACTOR``, and one sequential step per centre."""
        work = super().fit_work(
            backbone, hparams, image_size, n_train=n_train, epochs=epochs, batch_size=batch_size
        )
        per_image, channels, dim, ratio = cls._bank_shape(backbone, hparams, image_size)
        patches = n_train * per_image
        if ratio < 1.0:
            centres = max(1, round(ratio * patches))
            projection = 2 * patches * channels * dim
            selection = 2 * centres * patches * dim * CORESET_COST_FACTOR
            # Each greedy iteration is a sequential step (a handful of kernels on a GPU).
            work += Work(projection + selection, 4 * patches * (channels + dim), centres)
        return work

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
        """The backbone plus an exact nearest-neighbour search of every patch in the bank."""
        work = super().predict_work(
            backbone, hparams, image_size, n_train=n_train, batch_size=batch_size
        )
        per_image, channels, _, ratio = cls._bank_shape(backbone, hparams, image_size)
        bank = max(1, round(ratio * n_train * per_image))
        return work + Work(2 * per_image * bank * channels, 4 * bank * channels)

    def patch_features(self, images: Tensor) -> Tensor:
        """Locally aware patch features of a batch: ``B x D x h x w`` on the first layer's grid."""
        features = self.extractor(images)
        # 3x3 neighbourhood average (stride 1) widens each patch's receptive field without
        # lowering the resolution. The zero padding counts in the mean, as in the reference
        # implementations (an unfold with zero padding; anomalib's AvgPool2d(3, 1, 1)): border
        # patches keep a mark of where they are, which matters on parts at a fixed position
        # (quickstart part1, Lite0: image AUROC 0.82 -> 0.89 with the full bank).
        pooled = [F.avg_pool2d(f, kernel_size=3, stride=1, padding=1) for f in features.values()]
        return concat_to_first(pooled, mode="bilinear")

    @torch.no_grad()
    def fit(
        self,
        train: Iterable[Batch],
        *,
        epochs: int | None = None,
        on_epoch_end: EpochCallback | None = None,
    ) -> dict[str, Any]:
        """Build the memory bank from one pass over ``train``; ``epochs`` is ignored.

        Returns the number of training patches, the memory-bank size and the seconds spent on
        feature extraction and on coreset selection.
        """
        self.eval()
        self._index = self._index_source = None
        device = self.memory_bank.device
        started = _synchronized_clock(device)
        patches = []
        for images in iter_images(train):
            features = self.patch_features(images.to(device))
            patches.append(features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]))
        if not patches:
            raise ModelError("patchcore: the training set is empty")
        features = torch.cat(patches)
        del patches
        extracted = _synchronized_clock(device)
        if self.coreset_ratio < 1.0:
            selected = self._select_coreset(features)
            self.memory_bank = features[selected].contiguous()
        else:
            self.memory_bank = features
        finished = _synchronized_clock(device)
        stats = {
            "epochs": 1,
            "n_patches": int(features.shape[0]),
            "memory_bank_size": int(self.memory_bank.shape[0]),
            "feature_s": extracted - started,
            "coreset_s": finished - extracted,
        }
        if on_epoch_end is not None:
            on_epoch_end(1, {"memory_bank_size": stats["memory_bank_size"]})
        return stats

    def _select_coreset(self, features: Tensor) -> Tensor:
        """The memory bank's indices into ``features``.

        Inside ``models.cache.use_cache(cache)`` the greedy run is shared through the cache,
        keyed by the features' content, the projection and the generator's state: a stored run
        at least as long gives its prefix, a shorter one is resumed and stored longer. Both give
        exactly the indices of a fresh run, so the memory bank does not depend on the cache.
        (Two trials extending one run at once both store theirs and the last write stays, maybe
        the shorter: a later trial then resumes more of it. A cost, never a different result.)
        """
        generator = torch.Generator().manual_seed(self.seed)
        cache = active_cache()
        if cache is None:
            return greedy_coreset(
                features,
                self.coreset_ratio,
                projection_dim=self.projection_dim,
                generator=generator,
            )
        size = coreset_size(features.shape[0], self.coreset_ratio)
        key = make_key(
            "patchcore.coreset/1",
            torch.__version__,
            features.device.type,
            features,
            self.projection_dim,
            generator.get_state(),
        )
        stored = cache.get(key, device=features.device)
        if stored is not None and stored["selected"].shape[0] >= size:
            return stored["selected"][:size]
        options = {"projection_dim": self.projection_dim, "generator": generator}
        try:
            run = GreedyCoreset(features, **options, state=stored)
        except ValueError:
            if stored is None:
                raise
            # A stored run that does not fit (not expected for a matching key): start afresh.
            options["generator"] = torch.Generator().manual_seed(self.seed)
            run = GreedyCoreset(features, **options)
        selected = run.select(size)
        cache.put(key, run.state_dict())
        return selected

    def _neighbors(self) -> NearestNeighbors:
        # The search index is a cache of the memory bank; moving the module to another device or
        # refitting replaces the buffer tensor, which invalidates it.
        if self._index is None or self._index_source is not self.memory_bank:
            if self.memory_bank.shape[0] == 0:
                raise ModelError("patchcore: predict called before fit (the memory bank is empty)")
            self._index = NearestNeighbors(self.memory_bank)
            self._index_source = self.memory_bank
        return self._index

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        """Score a batch: re-weighted max patch distance, and the blurred patch-distance map."""
        index = self._neighbors()
        features = self.patch_features(images.to(self.memory_bank.device))
        batch, dim, height, width = features.shape
        queries = features.permute(0, 2, 3, 1).reshape(-1, dim)
        distances, nearest = index.search(queries, k=1)
        patch_scores = distances[:, 0].view(batch, height * width)
        nearest = nearest[:, 0].view(batch, height * width)

        # Image score (paper, eq. 7): take the most anomalous patch m_test* and its nearest memory
        # patch m*; down-weight s* = |m_test* - m*| when m* sits in a dense part of the bank,
        # i.e. when m_test* is about as close to m*'s other neighbours as to m* itself.
        max_scores, max_positions = patch_scores.max(dim=1)
        scores = max_scores
        k = min(self.num_neighbors, len(index))
        if k > 1:
            rows = torch.arange(batch, device=queries.device)
            worst_queries = queries.view(batch, height * width, dim)[rows, max_positions]
            matched = nearest[rows, max_positions]
            _, neighborhood = index.search(self.memory_bank[matched], k=k)
            # N_b(m*) is m* and its k - 1 nearest other bank patches; the search returns m*
            # among its own k nearest, but not necessarily first when copies of it tie.
            is_matched = (neighborhood == matched[:, None]).to(torch.uint8)
            order = torch.argsort(is_matched, dim=1, stable=True)
            others = neighborhood.gather(1, order)[:, : k - 1]
            to_others = torch.linalg.vector_norm(
                worst_queries[:, None, :] - self.memory_bank[others], dim=2
            )
            to_neighborhood = torch.cat([max_scores[:, None], to_others], dim=1)
            weights = 1.0 - torch.softmax(to_neighborhood, dim=1)[:, 0]
            scores = weights * max_scores

        maps = upsample_maps(patch_scores.view(batch, height, width), images.shape[-2:])
        maps = gaussian_blur(maps, self.blur_sigma)
        return Prediction(score=scores, anomaly_map=maps)

    def export_module(self) -> torch.nn.Module:
        """:meth:`predict` as traceable tensor operations (:class:`PatchCoreExport`)."""
        if self.memory_bank.shape[0] == 0:
            raise ModelError("patchcore: export called before fit (the memory bank is empty)")
        return PatchCoreExport(self)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The memory bank's size is only known after fit: take the stored one.
        key = prefix + "memory_bank"
        if key in state_dict:
            self.memory_bank = torch.empty_like(state_dict[key], device=self.memory_bank.device)
        self._index = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class PatchCoreExport(torch.nn.Module):
    """PatchCore's scoring without faiss: the nearest-neighbour search is a matrix product and a
    minimum (top-k for the re-weighting neighbourhood), so TorchScript and ONNX can hold it.

    Distances to the chosen bank patches are computed directly (``|q - m|``), not from the
    expanded ``|q|^2 - 2 q.m + |m|^2`` the search ranks by, which loses precision near 0. The
    ``B x patches x bank`` distance matrix is the memory cost: score small batches.
    """

    def __init__(self, detector: PatchCore) -> None:
        super().__init__()
        self.detector = detector
        bank = detector.memory_bank.detach()
        self.register_buffer("bank_norms", bank.square().sum(1), persistent=False)
        self.register_buffer("bank_ids", torch.arange(bank.shape[0]), persistent=False)
        self.k = min(detector.num_neighbors, bank.shape[0])
        self.blur_sigma = detector.blur_sigma

    def _squared(self, queries: Tensor) -> Tensor:
        # ... x D queries -> ... x N squared distances to every bank patch (ranking only).
        bank = self.detector.memory_bank
        return queries.square().sum(-1, keepdim=True) - 2.0 * queries @ bank.T + self.bank_norms

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        bank = self.detector.memory_bank
        features = self.detector.patch_features(images)  # B x D x h x w
        queries = features.flatten(2).transpose(1, 2)  # B x P x D
        nearest = self._squared(queries).argmin(-1)  # B x P
        patch_scores = torch.linalg.vector_norm(queries - bank[nearest], dim=-1)  # B x P
        max_scores, max_positions = patch_scores.max(1)
        scores = max_scores
        if self.k > 1:
            index = max_positions[:, None, None].expand(-1, 1, queries.shape[-1])
            worst_queries = queries.gather(1, index)[:, 0]  # B x D
            matched = nearest.gather(1, max_positions[:, None])[:, 0]  # B
            # The k - 1 bank patches nearest m* other than m* itself (predict's N_b(m*) less
            # m*): the softmax below does not depend on their order.
            to_bank = self._squared(bank[matched])
            to_bank = to_bank.masked_fill(self.bank_ids[None] == matched[:, None], math.inf)
            others = to_bank.topk(self.k - 1, dim=1, largest=False).indices
            to_others = torch.linalg.vector_norm(worst_queries[:, None] - bank[others], dim=2)
            to_neighborhood = torch.cat([max_scores[:, None], to_others], dim=1)
            scores = (1.0 - torch.softmax(to_neighborhood, dim=1)[:, 0]) * max_scores
        maps = upsample_maps(patch_scores.reshape_as(features[:, 0]), images.shape[-2:])
        return scores, gaussian_blur(maps, self.blur_sigma)
