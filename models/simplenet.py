"""SimpleNet (Liu et al., "SimpleNet: A Simple Network for Image Anomaly Detection and
Localization", CVPR 2023).

A frozen backbone turns every image into a grid of locally aware patch features, built as the
official code builds them (:func:`patch_embedding`): each mid-level layer's 3x3 patches are
unfolded (zero-padded), each patch's values average-pooled to ``pretrain_embed_dimension``, the
deeper layers resized to the first layer's grid, and the layers' vectors concatenated and pooled to
``target_embed_dimension``. A trainable feature adaptor (a linear layer) maps them to a
target-oriented space, where *anomalous* features are synthesised by adding Gaussian noise to the
adapted normal ones. A small MLP discriminator learns to score normal features above ``+margin``
and the noisy ones below ``-margin`` (truncated L1 loss). At test time the negative discriminator
output of each adapted patch is its anomaly score: the map is the upsampled, Gaussian-blurred patch
scores, the image score the largest patch score.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbones import FeatureExtractor
from models.base import (
    Batch,
    Detector,
    EpochCallback,
    Prediction,
    check_epochs,
    register,
    train_epochs,
)
from models.components.feature_utils import concat_to_first, gaussian_blur, upsample_maps
from models.constraints import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    ODD,
    POSITIVE,
    POSITIVE_INT,
    AllOf,
    Rule,
)
from models.errors import ModelError

__all__ = ["SimpleNet", "patch_embedding"]


def _pool_channels(features: Tensor, dim: int) -> Tensor:
    """Adaptive average pooling over the channels of ``B x C x h x w``: ``B x dim x h x w``,
    output channel ``i`` the mean of input channels ``floor(i C / dim)`` to
    ``ceil((i + 1) C / dim) - 1`` (``torch.nn.AdaptiveAvgPool1d`` along the channels)."""
    if features.shape[1] == dim:
        return features
    return F.adaptive_avg_pool3d(features.unsqueeze(1), (dim, *features.shape[-2:]))[:, 0]


def patch_embedding(
    features: Sequence[Tensor], layer_dims: Sequence[int], embed_dim: int, patch_size: int = 3
) -> Tensor:
    """SimpleNet's (and PatchCore's official) locally aware patch features.

    Each layer's ``B x C x h x w`` map is unfolded into its zero-padded ``patch_size`` x
    ``patch_size`` windows (``C k k`` values per position, ordered channel, window row, window
    column, as ``torch.nn.Unfold``), each window average-pooled to ``layer_dims[i]`` values and
    resized bilinearly to the first layer's grid; the layers' vectors, concatenated in order,
    are average-pooled to ``embed_dim``. Returns ``B x embed_dim x h_0 x w_0``. (The official
    code resizes the unfolded windows and then pools; both are linear along different axes, so
    pooling first is the same and cheaper.)
    """
    pad = patch_size // 2
    pooled = []
    for feature, dim in zip(features, layer_dims, strict=True):
        batch, _, height, width = feature.shape
        windows = F.unfold(feature, patch_size, padding=pad).view(batch, -1, height, width)
        pooled.append(_pool_channels(windows, dim))
    return _pool_channels(concat_to_first(pooled, mode="bilinear"), embed_dim)


@register("simplenet")
class SimpleNet(Detector):
    """Feature adaptor and discriminator trained against Gaussian-noise feature anomalies."""

    learning_type = "iterative"
    localizes = True

    hyperparameter_constraints: ClassVar[Mapping[str, Rule]] = {
        "pretrain_embed_dimension": POSITIVE_INT,
        "target_embed_dimension": POSITIVE_INT,
        # An even window has no centre: the pooled grid would shift by half a patch.
        "patch_size": AllOf(POSITIVE_INT, ODD),
        "pre_proj": NON_NEGATIVE_INT,
        "noise_std": POSITIVE,
        "dsc_layers": POSITIVE_INT,
        "dsc_hidden": POSITIVE_INT,
        "dsc_margin": POSITIVE,
        "adaptor_lr": POSITIVE,
        "dsc_lr": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "epochs": POSITIVE_INT,
        "blur_sigma": NON_NEGATIVE,
    }

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer2", "layer3"),
        pretrain_embed_dimension: int = 1536,
        target_embed_dimension: int = 1536,
        patch_size: int = 3,
        pre_proj: int = 1,
        noise_std: float = 0.015,
        dsc_layers: int = 2,
        dsc_hidden: int = 1024,
        dsc_margin: float = 0.5,
        adaptor_lr: float = 1e-4,
        dsc_lr: float = 2e-4,
        weight_decay: float = 1e-5,
        epochs: int = 160,
        blur_sigma: float = 4.0,
        seed: int = 0,
        pretrained: bool = True,
        weights: str | None = None,
    ) -> None:
        """
        Args:
            backbone: frozen feature extractor (``models.backbones.list_backbones()``).
            layers: backbone layers whose features form a patch; the first sets the patch grid.
            pretrain_embed_dimension: values each layer's unfolded patch (``channels x
                patch_size^2``) is average-pooled to (the official code's 1536: wide_resnet50_2's
                9 x 512 and 9 x 1024 values become 1536 each); a layer with fewer values keeps
                them all (``layer_dims``).
            target_embed_dimension: dimension the layers' pooled patches, concatenated, are
                average-pooled to (the official 1536); with fewer values in all they are kept as
                they are. The adaptor and the discriminator work in this dimension
                (``embed_dim``).
            patch_size: side of the zero-padded window unfolded around each position (stride
                1) to make a patch feature aware of its surroundings; 1 turns it off.
            pre_proj: number of linear layers of the feature adaptor (the paper's 1), stacked
                without activations as in the paper's code; 0 leaves the features unadapted.
            noise_std: standard deviation of the Gaussian noise added to adapted normal
                features to synthesise anomalous ones, in feature units (the paper's 0.015
                suits ImageNet-pretrained features; features of other scales need another).
            dsc_layers: layers of the discriminator MLP, the last being the linear scoring
                layer; the others are linear + batch norm + LeakyReLU(0.2).
            dsc_hidden: width of the discriminator's hidden layers.
            dsc_margin: margin ``th`` of the truncated L1 loss: normal features are pushed
                above ``+th``, synthesised ones below ``-th``.
            adaptor_lr: Adam learning rate of the feature adaptor.
            dsc_lr: Adam learning rate of the discriminator.
            weight_decay: Adam weight decay (L2 penalty) of adaptor and discriminator.
            epochs: training epochs when ``fit`` is not given a budget (the paper's 160).
            blur_sigma: standard deviation in pixels of the Gaussian smoothing of the anomaly
                map; 0 disables it.
            seed: seeds the adaptor's and the discriminator's initialisation, the noise that
                makes the synthetic anomalies, and the backbone's initialisation when it is
                not pretrained.
            pretrained: use timm's pretrained backbone weights.
            weights: local backbone weight file or directory (overrides ``pretrained``).
        """
        super().__init__()
        self.pretrain_embed_dimension = pretrain_embed_dimension
        self.target_embed_dimension = target_embed_dimension
        self.patch_size = patch_size
        self.pre_proj = pre_proj
        self.noise_std = float(noise_std)
        self.dsc_layers = dsc_layers
        self.dsc_hidden = dsc_hidden
        self.dsc_margin = float(dsc_margin)
        self.adaptor_lr = float(adaptor_lr)
        self.dsc_lr = float(dsc_lr)
        self.weight_decay = float(weight_decay)
        self.epochs = epochs
        self.blur_sigma = float(blur_sigma)
        self.seed = seed
        # Backbone, adaptor and discriminator get distinct initialisations drawn from the seed.
        generator = torch.Generator().manual_seed(seed)
        backbone_seed, head_seed = torch.randint(
            2**62, (2,), generator=generator, device="cpu"
        ).tolist()
        self.extractor = FeatureExtractor(
            backbone, layers, pretrained=pretrained, weights=weights, seed=backbone_seed
        )
        # Pooling only ever shrinks here, where the official code's adaptive pooling also
        # stretches (repeats values) up to 1536: repeated values leave directions in which normal
        # features never vary but the noise does, and the discriminator would learn to spot
        # those instead of anything an anomaly changes. On the paper's backbone nothing is
        # stretched, so the two agree.
        self._notes = []
        self.layer_dims: tuple[int, ...] = ()
        for layer, channels in self.extractor.channels.items():
            values = channels * self.patch_size**2
            self.layer_dims += (min(self.pretrain_embed_dimension, values),)
            if values < self.pretrain_embed_dimension:
                self._notes.append(
                    f"simplenet: pretrain_embed_dimension {self.pretrain_embed_dimension} is more "
                    f"than the {values} values of a {self.patch_size}x{self.patch_size} patch of "
                    f"{backbone} {layer}; that layer keeps {values}"
                )
        total = sum(self.layer_dims)
        self.embed_dim = min(self.target_embed_dimension, total)
        if self.embed_dim < self.target_embed_dimension:
            self._notes.append(
                f"simplenet: target_embed_dimension {self.target_embed_dimension} is more than "
                f"the {total} pooled patch values of {backbone} {'+'.join(self.extractor.layers)}; "
                f"features are {total}-dimensional"
            )
        dim = self.embed_dim
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(head_seed)
            self.adaptor = nn.Sequential(*(nn.Linear(dim, dim) for _ in range(self.pre_proj)))
            blocks: list[nn.Module] = []
            width = dim
            for _ in range(self.dsc_layers - 1):
                blocks += [
                    nn.Linear(width, self.dsc_hidden),
                    nn.BatchNorm1d(self.dsc_hidden),
                    nn.LeakyReLU(0.2),
                ]
                width = self.dsc_hidden
            # No bias on the scoring layer: batch norm before it already centres the input.
            blocks.append(nn.Linear(width, 1, bias=self.dsc_layers == 1))
            self.discriminator = nn.Sequential(*blocks)
            for module in (*self.adaptor, *self.discriminator):
                if isinstance(module, nn.Linear):
                    # Xavier-normal keeps the adapted features at the scale of the inputs, so
                    # the absolute noise_std means the same thing before and after the adaptor.
                    nn.init.xavier_normal_(module.weight)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
        self.register_buffer("fitted", torch.tensor(False))
        # Built ready to score (batch norm on its running statistics), e.g. after loading a
        # state dict; fit switches to training mode and back.
        self.eval()

    def patch_features(self, images: Tensor) -> Tensor:
        """Locally aware patch features (:func:`patch_embedding`): ``B x embed_dim x h x w`` on
        the first layer's grid."""
        features = list(self.extractor(images).values())
        return patch_embedding(features, self.layer_dims, self.embed_dim, self.patch_size)

    def _adapted(self, images: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        # (B * h * w) x D adapted features, and the (B, h, w) shape to fold scores back into.
        with torch.no_grad():
            features = self.patch_features(images)
        batch, dim, height, width = features.shape
        rows = features.permute(0, 2, 3, 1).reshape(-1, dim)
        return self.adaptor(rows), (batch, height, width)

    def resource_probe(self, images: Tensor) -> None:
        """A training step's forward: adapted features and the discriminator on them and on
        their noisy copies."""
        true, _ = self._adapted(images)
        self.discriminator(torch.cat([true, true]))

    def fit(
        self,
        train: Iterable[Batch],
        *,
        epochs: int | None = None,
        on_epoch_end: EpochCallback | None = None,
    ) -> dict[str, Any]:
        """Train adaptor and discriminator with Adam for ``epochs`` (default: the constructor's).

        After every epoch ``on_epoch_end(epoch, metrics)`` runs with the epoch's mean
        ``"loss"``, ``"p_true"`` (fraction of normal features scored >= margin) and
        ``"p_fake"`` (fraction of synthesised ones scored < -margin); training stops when it
        returns True. A non-finite loss is a :class:`ModelError`. Returns the epochs run and
        the last epoch's metrics.
        """
        n_epochs = (
            self.epochs if epochs is None else check_epochs("simplenet", epochs, "fit epochs")
        )
        device = self.fitted.device
        optimizers = [
            torch.optim.Adam(
                self.discriminator.parameters(), lr=self.dsc_lr, weight_decay=self.weight_decay
            )
        ]
        if self.pre_proj > 0:
            optimizers.append(
                torch.optim.Adam(
                    self.adaptor.parameters(), lr=self.adaptor_lr, weight_decay=self.weight_decay
                )
            )
        # A fresh generator per fit: refitting with the same seed draws the same noise.
        generator = torch.Generator(device=device).manual_seed(self.seed)
        margin = self.dsc_margin

        def step(images: Tensor) -> dict[str, float]:
            true, _ = self._adapted(images)
            noise = torch.randn(true.shape, generator=generator, device=device, dtype=true.dtype)
            fake = true + self.noise_std * noise
            scores = self.discriminator(torch.cat([true, fake]))[:, 0]
            true_scores, fake_scores = scores[: len(true)], scores[len(true) :]
            loss = F.relu(margin - true_scores).mean() + F.relu(margin + fake_scores).mean()
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            return {
                "loss": float(loss.detach()),
                "p_true": float((true_scores.detach() >= margin).float().mean()),
                "p_fake": float((fake_scores.detach() < -margin).float().mean()),
            }

        def end_of_epoch(epoch: int, means: dict[str, float]) -> None:
            self.fitted.fill_(True)

        epochs_run, metrics = train_epochs(
            self,
            train,
            step,
            epochs=n_epochs,
            on_epoch_end=on_epoch_end,
            end_of_epoch=end_of_epoch,
        )
        stats: dict[str, Any] = {"epochs": epochs_run, **metrics, "embed_dim": self.embed_dim}
        if self._notes:
            stats["notes"] = list(self._notes)
        return stats

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        """Score a batch: the blurred map of negative discriminator outputs, and its top patch.

        The image score is the largest patch score before upsampling and blurring, as in the
        paper (``max_{h,w} s_{h,w}``).
        """
        if not bool(self.fitted):
            raise ModelError("simplenet: predict called before fit")
        adapted, (batch, height, width) = self._adapted(images.to(self.fitted.device))
        patch_scores = -self.discriminator(adapted)[:, 0].view(batch, height, width)
        scores = patch_scores.flatten(1).max(dim=1).values
        maps = gaussian_blur(upsample_maps(patch_scores, images.shape[-2:]), self.blur_sigma)
        return Prediction(score=scores, anomaly_map=maps)
