"""CFLOW-AD (Gudovskiy et al., "CFLOW-AD: Real-Time Unsupervised Anomaly Detection with
Localization via Conditional Normalizing Flows", WACV 2022).

A frozen encoder gives feature maps at several scales. At every scale a conditional normalizing
flow (the decoder) models the distribution of single feature vectors, conditioned on a 2-D
sinusoidal positional encoding of where the vector sits in the map, so one small flow covers
every position while still knowing the position's statistics. The decoders are trained on random
batches of feature vectors ("fibers") pooled over images and positions, maximising the
likelihood per dimension through ``-log sigmoid(log p / C)``. At test time each scale's
per-position log-likelihood is turned into a probability ``exp(log p - max log p)``, one minus it
is upsampled and summed over scales into the anomaly map, whose maximum is the image score.

The coupling blocks follow FrEIA's ``AllInOneBlock`` that the authors' code stacks (one subnet
per block transforming half of the channels, log-scales soft-clamped by ``clamp_alpha``, a learned
per-channel affine), with fully connected subnets ``Linear(n, 2n) - ReLU - Linear(2n, out)`` whose
input ``n`` is half the channels plus the condition: 81.6M trainable parameters for
wide_resnet50_2 layers 2-4, as the reference study's Table 2 counts.

Where the paper normalises log-likelihoods by their maximum over the whole test set (which makes
a score depend on the other images scored with it), this module subtracts, per layer, the largest
of the log-likelihoods seen in the last training epoch (over every training fiber, kept as a
buffer) and of the scored image's own: a score depends on its image alone, not on how the test
set is batched, and the reference is known after every epoch, so the detector can be scored
mid-training. The image's own maximum matters where a position is more likely than every
training fiber, which a barely trained flow gives out-of-distribution features (its likelihoods
then spread over thousands of nats per dimension): subtracting the training maximum alone would
leave ``exp`` a positive argument, overflowing to infinity past 88 in float32, and the map
non-finite. With it, every probability lies in [0, 1] and the map in [0, number of layers].
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbones import FeatureExtractor, get_backbone
from models.base import (
    DEFAULT_TRAIN_BATCH_SIZE,
    DEFAULT_TRAIN_IMAGES,
    Batch,
    Detector,
    EpochCallback,
    Prediction,
    check_epochs,
    register,
    train_epochs,
)
from models.components.feature_utils import upsample_maps
from models.components.flows import (
    AffineCoupling,
    SequentialFlow,
    gaussian_log_likelihood,
    positional_encoding_2d,
)
from models.constraints import POSITIVE, POSITIVE_INT, AllOf, Rule, multiple_of
from models.costs import OPTIMIZER_BYTES_PER_PARAM, Work
from models.errors import ModelError

__all__ = ["CFlow", "conditional_decoder"]

# Feature vectors pushed through a decoder at once when scoring (bounds the temporaries).
_SCORING_CHUNK = 1 << 16


def _subnet_fc(in_channels: int, out_channels: int) -> nn.Module:
    hidden = 2 * in_channels
    return nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(), nn.Linear(hidden, out_channels))


def conditional_decoder(
    channels: int, condition_channels: int, coupling_blocks: int, clamp: float, seed: int
) -> SequentialFlow:
    """CFLOW-AD's decoder: a conditional flow over ``N x channels`` feature vectors."""
    seeds = torch.randint(
        2**62, (coupling_blocks,), generator=torch.Generator().manual_seed(seed), device="cpu"
    ).tolist()
    return SequentialFlow(
        [
            AffineCoupling(
                channels,
                _subnet_fc,
                clamp=clamp,
                condition_channels=condition_channels,
                seed=block_seed,
                both_halves=False,
                global_affine=True,
            )
            for block_seed in seeds
        ]
    )


@register("cflow")
class CFlow(Detector):
    """Position-conditioned normalizing flows over the feature vectors of several layers."""

    learning_type = "iterative"
    localizes = True

    hyperparameter_constraints: ClassVar[Mapping[str, Rule]] = {
        "condition_vector": AllOf(
            POSITIVE_INT,
            multiple_of(4, "sines and cosines of rows and columns"),
        ),
        "coupling_blocks": POSITIVE_INT,
        "clamp_alpha": POSITIVE,
        "fiber_batch_size": POSITIVE_INT,
        "lr": POSITIVE,
        "epochs": POSITIVE_INT,
    }

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer2", "layer3", "layer4"),
        condition_vector: int = 128,
        coupling_blocks: int = 8,
        clamp_alpha: float = 1.9,
        fiber_batch_size: int = 64,
        lr: float = 1e-4,
        epochs: int = 50,
        seed: int = 0,
        pretrained: bool = True,
        weights: str | None = None,
    ) -> None:
        """
        Args:
            backbone: frozen encoder (``models.backbones.list_backbones()``).
            layers: encoder layers, one decoder each.
            condition_vector: channels of the 2-D positional encoding the decoders are
                conditioned on (a multiple of 4).
            coupling_blocks: coupling blocks per decoder.
            clamp_alpha: soft bound of the coupling log-scales
                (``clamp_alpha * tanh(0.1 s)``, FrEIA's).
            fiber_batch_size: feature vectors per optimisation step; each training batch's
                vectors (all images and positions of a layer) are shuffled with a seeded
                permutation and cut into batches of this size.
            lr: Adam learning rate.
            epochs: training epochs when ``fit`` is not given a budget.
            seed: seeds the decoders' permutations and initialisation, the fiber shuffling,
                and the encoder's initialisation when it is not pretrained.
            pretrained: use timm's pretrained encoder weights.
            weights: local encoder weight file or directory (overrides ``pretrained``).
        """
        super().__init__()
        self.epochs = epochs
        self.condition_vector = condition_vector
        self.fiber_batch_size = fiber_batch_size
        self.lr = float(lr)
        generator = torch.Generator().manual_seed(seed)
        encoder_seed, self._shuffle_seed, *decoder_seeds = torch.randint(
            2**62, (2 + len(list(layers)),), generator=generator, device="cpu"
        ).tolist()
        self.encoder = FeatureExtractor(
            backbone, layers, pretrained=pretrained, weights=weights, seed=encoder_seed
        )
        self.decoders = nn.ModuleList(
            conditional_decoder(
                self.encoder.channels[layer],
                condition_vector,
                coupling_blocks,
                float(clamp_alpha),
                decoder_seed,
            )
            for layer, decoder_seed in zip(self.encoder.layers, decoder_seeds, strict=True)
        )
        # Per layer, the largest log-likelihood per dimension of the last training epoch: the
        # shift that turns log-likelihoods into probabilities in about [0, 1]. NaN until fit.
        self.register_buffer("reference_log_p", torch.full((len(self.decoders),), math.nan))

    def _fibers(self, feature: Tensor) -> tuple[Tensor, Tensor]:
        # ``B x C x h x w`` -> (B*h*w x C vectors, B*h*w x P positional encodings).
        batch, _, height, width = feature.shape
        encoding = positional_encoding_2d(self.condition_vector, height, width).to(feature)
        vectors = feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1])
        conditions = encoding.permute(1, 2, 0).reshape(1, -1, self.condition_vector)
        return vectors, conditions.expand(batch, -1, -1).reshape(-1, self.condition_vector)

    @staticmethod
    def _log_p(decoder: nn.Module, vectors: Tensor, conditions: Tensor) -> Tensor:
        # Log-likelihood per dimension of every vector.
        z, log_det = decoder(vectors, conditions)
        return gaussian_log_likelihood(z, log_det) / vectors.shape[1]

    @classmethod
    def _decoder_work(
        cls, backbone: str | None, hparams: Mapping[str, Any] | None, image_size: int, batch: int
    ) -> tuple[float, float, list[int]]:
        """(FLOPs per image of every decoder over every position, FLOPs of the probe's one fiber
        batch per decoder, fiber batches per decoder and training batch). A flow of linear
        subnets costs about twice its parameters per vector."""
        merged = cls.trial_hparams(backbone, hparams)
        spec = get_backbone(merged["backbone"])
        profile = cls.cost_profile(backbone, hparams, image_size, batch_size=batch)
        fiber = merged["fiber_batch_size"]
        full = probed = 0.0
        steps = []
        for i, layer in enumerate(merged["layers"]):
            per_vector = 2 * profile.module_params.get(f"decoders.{i}", 0)
            positions = math.ceil(image_size / spec.layer(layer)[0]) ** 2
            full += per_vector * positions
            probed += per_vector * min(fiber, batch * positions)
            steps.append(math.ceil(batch * positions / fiber))
        return full, probed, steps

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
        """The encoder once per image and epoch; the decoders, forward and backward, over every
        feature vector (the probe runs one fiber batch per decoder, a training batch runs them
        all); one optimiser step per fiber batch, each over one decoder's parameters."""
        profile = cls.cost_profile(backbone, hparams, image_size, batch_size=batch_size)
        full, probed, steps = cls._decoder_work(backbone, hparams, image_size, batch_size)
        encoder = max(0.0, profile.forward_flops - probed / batch_size)
        if epochs is None:
            epochs = cls.trial_hparams(backbone, hparams)["epochs"]
        batches = math.ceil(n_train / batch_size) * int(epochs)
        per_step = OPTIMIZER_BYTES_PER_PARAM * profile.trainable_params / max(1, len(steps))
        return Work(
            n_train * int(epochs) * (encoder + 3 * full),
            n_train * int(epochs) * profile.train_traffic + batches * sum(steps) * per_step,
            batches * sum(steps),
        )

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
        """The encoder and every decoder over every position."""
        profile = cls.cost_profile(backbone, hparams, image_size, batch_size=batch_size)
        full, probed, _ = cls._decoder_work(backbone, hparams, image_size, batch_size)
        flops = max(0.0, profile.forward_flops - probed / batch_size) + full
        return Work(flops, profile.forward_traffic)

    def resource_probe(self, images: Tensor) -> None:
        """A training step's forward: the encoder, then one fiber batch per decoder (a step
        trains on ``fiber_batch_size`` vectors at a time)."""
        with torch.no_grad():
            features = self.encoder(images)
        for decoder, feature in zip(self.decoders, features.values(), strict=True):
            vectors, conditions = self._fibers(feature)
            batch = slice(0, self.fiber_batch_size)
            self._log_p(decoder, vectors[batch], conditions[batch])

    def fit(
        self,
        train: Iterable[Batch],
        *,
        epochs: int | None = None,
        on_epoch_end: EpochCallback | None = None,
    ) -> dict[str, Any]:
        """Train the decoders with Adam on shuffled fiber batches, for ``epochs`` passes.

        Every training batch is encoded once; then for each layer its feature vectors are
        shuffled and each fiber batch makes one optimisation step of
        ``-log sigmoid(log p / C)``. ``on_epoch_end(epoch, {"loss": mean loss per vector})``
        runs after every epoch and stops training when it returns True. The largest
        log-likelihood of each layer in the epoch becomes the reference that normalises the
        anomaly maps (before ``on_epoch_end``, so the callback can score the detector). A
        non-finite epoch loss is a :class:`ModelError` (training diverged).
        """
        n_epochs = self.epochs if epochs is None else check_epochs("cflow", epochs, "fit epochs")
        device = self.reference_log_p.device
        optimizer = torch.optim.Adam(self.decoders.parameters(), lr=self.lr)
        shuffle = torch.Generator().manual_seed(self._shuffle_seed)
        epoch_max = torch.full_like(self.reference_log_p, -math.inf)

        def step(images: Tensor) -> dict[str, float]:
            loss_sum, n_vectors = 0.0, 0
            with torch.no_grad():
                features = self.encoder(images)
            for i, (decoder, feature) in enumerate(
                zip(self.decoders, features.values(), strict=True)
            ):
                vectors, conditions = self._fibers(feature)
                order = torch.randperm(len(vectors), generator=shuffle, device="cpu")
                for start in range(0, len(order), self.fiber_batch_size):
                    index = order[start : start + self.fiber_batch_size].to(device)
                    log_p = self._log_p(decoder, vectors[index], conditions[index])
                    loss = -F.logsigmoid(log_p)
                    optimizer.zero_grad(set_to_none=True)
                    loss.mean().backward()
                    optimizer.step()
                    loss_sum += float(loss.detach().sum())
                    epoch_max[i] = torch.maximum(epoch_max[i], log_p.detach().max())
                    n_vectors += len(index)
            # With one image size throughout, every image has as many vectors, so the epoch
            # loop's mean over images of these per-vector means is the epoch's mean per vector.
            return {"loss": loss_sum / n_vectors}

        def end_of_epoch(epoch: int, means: dict[str, float]) -> None:
            self.reference_log_p.copy_(epoch_max)
            epoch_max.fill_(-math.inf)

        epochs_run, means = train_epochs(
            self,
            train,
            step,
            epochs=n_epochs,
            on_epoch_end=on_epoch_end,
            end_of_epoch=end_of_epoch,
        )
        return {"epochs": epochs_run, "loss": means.get("loss", math.nan)}

    @torch.no_grad()
    def _layer_log_p(self, images: Tensor) -> list[Tensor]:
        # Per layer, ``B x h x w`` log-likelihoods per dimension.
        maps = []
        features = self.encoder(images)
        for decoder, feature in zip(self.decoders, features.values(), strict=True):
            vectors, conditions = self._fibers(feature)
            log_p = torch.cat(
                [
                    self._log_p(
                        decoder,
                        vectors[start : start + _SCORING_CHUNK],
                        conditions[start : start + _SCORING_CHUNK],
                    )
                    for start in range(0, len(vectors), _SCORING_CHUNK)
                ]
            )
            maps.append(log_p.reshape(feature.shape[0], *feature.shape[2:]))
        return maps

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        """Score a batch: ``sum over layers of 1 - exp(log p - reference)``, and its maximum.

        Per layer and image the reference is the larger of the training one
        (``reference_log_p``) and the image's own largest log-likelihood, so that the
        probabilities lie in [0, 1] whatever the image.
        """
        if not bool(torch.isfinite(self.reference_log_p).all()):
            raise ModelError("cflow: predict called before fit")
        images = images.to(self.reference_log_p.device)
        size = images.shape[-2:]
        anomaly_map = torch.zeros(images.shape[0], *size, device=images.device)
        for log_p, reference in zip(self._layer_log_p(images), self.reference_log_p, strict=True):
            own = log_p.flatten(1).amax(1)[:, None, None]
            probability = torch.exp(log_p - torch.maximum(own, reference))
            anomaly_map += upsample_maps(1.0 - probability, size)
        scores = anomaly_map.flatten(1).max(dim=1).values
        return Prediction(score=scores, anomaly_map=anomaly_map)
