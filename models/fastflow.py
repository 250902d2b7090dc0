"""FastFlow (Yu et al., "FastFlow: Unsupervised Anomaly Detection and Localization via 2D
Normalizing Flows", arXiv:2111.07677, 2021).

Features of a frozen backbone (CNNs: three stages at strides 4, 8 and 16; transformers: the token
map of one intermediate block) are layer-normalised (CNN stages by a trained LayerNorm over
``C x h x w`` each, transformer tokens by the backbone's own pretrained final norm, as the
paper's code and anomalib read them), and each scale gets its own 2-D normalizing flow: a stack
of affine coupling blocks whose subnets are small convolutional networks, so the flow models every
position in its spatial context instead of each feature vector alone. Training
maximises the likelihood of the normal features under a standard normal latent. At test time the
per-position likelihood ``exp(-mean_c z^2 / 2)`` of every scale is upsampled to the image, the
anomaly map is the negated mean over scales, and the image score is its maximum.

The coupling blocks follow the FrEIA ``AllInOneBlock`` of the authors' and anomalib's code, which
the reference study ran (its Table 2 counts 5.6M trainable parameters for ResNet18 at 256 px, as
this module has): per block a seeded channel permutation, one subnet transforming half of the
channels from the other half, a log-scale soft clamp of 2 and a learned per-channel affine.
Subnets alternate 3x3 and 1x1 convolutions, or use 3x3 only (``conv3x3_only``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from models.backbones import BackboneSpec, FeatureExtractor, get_backbone, resolve_layers
from models.base import (
    Batch,
    Detector,
    EpochCallback,
    Prediction,
    check_epochs,
    register,
    train_epochs,
)
from models.components.feature_utils import upsample_maps
from models.components.flows import AffineCoupling, SequentialFlow, gaussian_nll
from models.constraints import BOOL, NON_NEGATIVE, POSITIVE, POSITIVE_INT, Rule
from models.errors import ModelError

__all__ = ["FastFlow"]

CNN_LAYERS = ("layer1", "layer2", "layer3")
"""The paper's CNN feature scales (strides 4, 8, 16)."""
PAPER_VIT_BLOCKS = {"deit_base_distilled_patch16_384": 7, "cait_m48_448": 40}
"""Index of the transformer block whose tokens the paper's code reads (the 8th of DeiT's 12,
the 41st of CaiT-M48's 48)."""
_VIT_DEPTH_FRACTION = 2 / 3
"""Other transformers: the declared block closest to this fraction of the depth."""


def _block_index(layer: str) -> int | None:
    match = re.fullmatch(r"blocks\.(\d+)", layer)
    return int(match.group(1)) if match else None


def default_layers(spec: BackboneSpec) -> tuple[str, ...]:
    """FastFlow's feature layers on ``spec``: CNN stages 1-3, or one transformer block."""
    if spec.kind != "vit":
        return CNN_LAYERS
    blocks = {i: name for name in spec.layers if (i := _block_index(name)) is not None}
    if not blocks:
        return (list(spec.layers)[-1],)
    target = PAPER_VIT_BLOCKS.get(spec.name)
    if target is None:
        target = round(_VIT_DEPTH_FRACTION * (max(blocks) + 1)) - 1
    return (blocks[min(blocks, key=lambda i: (abs(i - target), i))],)


def _subnet_factory(hidden_ratio: float, kernel_size: int):
    def subnet(in_channels: int, out_channels: int) -> nn.Module:
        hidden = max(1, int(in_channels * hidden_ratio))
        padding = kernel_size // 2
        return nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size, padding=padding),
            nn.ReLU(),
            nn.Conv2d(hidden, out_channels, kernel_size, padding=padding),
        )

    return subnet


@register("fastflow")
class FastFlow(Detector):
    """2-D normalizing flows over backbone feature maps; low likelihood = anomalous."""

    learning_type = "iterative"
    localizes = True
    backbone_kinds = ("cnn", "vit")
    fixed_input_size = True

    hyperparameter_constraints: ClassVar[Mapping[str, Rule]] = {
        "flow_steps": POSITIVE_INT,
        "hidden_ratio": POSITIVE,
        "conv3x3_only": BOOL,
        "clamp": POSITIVE,
        "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "epochs": POSITIVE_INT,
    }

    def __init__(
        self,
        backbone: str = "resnet18",
        layers: Sequence[str] | None = None,
        flow_steps: int = 8,
        hidden_ratio: float = 1.0,
        conv3x3_only: bool = True,
        clamp: float = 2.0,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        epochs: int = 500,
        seed: int = 0,
        pretrained: bool = True,
        weights: str | None = None,
    ) -> None:
        """
        Args:
            backbone: frozen feature extractor (``models.backbones.list_backbones()``); CNNs
                or transformers (which need their native input size: the paper ran
                deit_base_distilled_patch16_384 at 384 px and cait_m48_448 at 448 px, with
                ``flow_steps=20, hidden_ratio=0.16, conv3x3_only=False``).
            layers: the feature maps, one flow each. None: ``layer1``-``layer3`` on CNNs, and
                on transformers the paper's block (``blocks.7`` of DeiT, ``blocks.40`` of
                CaiT-M48; elsewhere the declared block nearest two thirds of the depth).
            flow_steps: coupling blocks per flow.
            hidden_ratio: hidden channels of each subnet as a multiple of its input channels
                (half the feature channels).
            conv3x3_only: all subnets use 3x3 convolutions; False alternates 3x3 and 1x1
                (the paper's transformer setting, fewer parameters).
            clamp: soft bound of the coupling log-scales (``clamp * tanh(0.1 s)``, FrEIA's).
            lr: Adam learning rate.
            weight_decay: Adam weight decay (L2 penalty).
            epochs: training epochs when ``fit`` is not given a budget.
            seed: seeds the flows' permutations and initialisation (and the backbone's when it
                is not pretrained).
            pretrained: use timm's pretrained backbone weights.
            weights: local backbone weight file or directory (overrides ``pretrained``).
        """
        super().__init__()
        self.epochs = epochs
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        spec = get_backbone(backbone)
        self.is_vit = spec.kind == "vit"
        layers = default_layers(spec) if layers is None else layers
        generator = torch.Generator().manual_seed(seed)
        backbone_seed, *flow_seeds = torch.randint(
            2**62, (1 + len(list(layers)),), generator=generator, device="cpu"
        ).tolist()
        self.extractor = FeatureExtractor(
            backbone, layers, pretrained=pretrained, weights=weights, seed=backbone_seed
        )
        self.flows = nn.ModuleList()
        for layer, flow_seed in zip(self.extractor.layers, flow_seeds, strict=True):
            channels = self.extractor.channels[layer]
            block_seeds = torch.randint(
                2**62,
                (flow_steps,),
                generator=torch.Generator().manual_seed(flow_seed),
                device="cpu",
            ).tolist()
            self.flows.append(
                SequentialFlow(
                    [
                        AffineCoupling(
                            channels,
                            _subnet_factory(
                                hidden_ratio, 3 if conv3x3_only or step % 2 == 0 else 1
                            ),
                            clamp=float(clamp),
                            seed=block_seed,
                            both_halves=False,
                            global_affine=True,
                        )
                        for step, block_seed in enumerate(block_seeds)
                    ]
                )
            )
        # CNN features are normalised jointly over C x h x w with a learned per-element affine
        # (the paper's code), whose shape needs the feature grid: built on the first batch of
        # fit. Transformer tokens go through the backbone's final norm instead (the paper's code
        # reads them so), whose pretrained affine a fresh LayerNorm would throw away: no norms.
        self.norms = nn.ModuleList()
        self.register_buffer("fitted", torch.tensor(False))

    def _normalise(self, features: Mapping[str, Tensor]) -> list[Tensor]:
        if self.is_vit:
            # Already through the backbone's final norm (forward(norm=True) in _latents).
            return list(features.values())
        if len(self.norms) == 0:
            for f in features.values():
                self.norms.append(nn.LayerNorm(tuple(f.shape[1:]), device=f.device))
        out = []
        for norm, (layer, f) in zip(self.norms, features.items(), strict=True):
            if tuple(f.shape[1:]) != tuple(norm.normalized_shape):
                raise ModelError(
                    f"fastflow: {layer} features are {tuple(f.shape[1:])} here but "
                    f"{tuple(norm.normalized_shape)} when the model was built; use one image "
                    "size for fit and predict"
                )
            out.append(norm(f))
        return out

    def _latents(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        # Latents and per-sample log-determinants of every scale.
        with torch.no_grad():
            features = self.extractor(images, norm=self.is_vit)
        zs, log_dets = [], []
        for flow, feature in zip(self.flows, self._normalise(features), strict=True):
            z, log_det = flow(feature)
            zs.append(z)
            log_dets.append(log_det)
        return zs, log_dets

    def resource_probe(self, images: Tensor) -> None:
        """A training step's forward: frozen features and every scale's flow."""
        self._latents(images)

    def fit(
        self,
        train: Iterable[Batch],
        *,
        epochs: int | None = None,
        on_epoch_end: EpochCallback | None = None,
    ) -> dict[str, Any]:
        """Train the flows (and, on CNNs, the layer norms) with Adam for ``epochs`` passes.

        The loss is the sum over scales of the mean negative log-likelihood of a sample's
        feature map. ``on_epoch_end(epoch, {"loss": mean loss of the epoch})`` runs after every
        epoch and stops training when it returns True. A non-finite epoch loss is a
        :class:`ModelError` (training diverged).
        """
        n_epochs = self.epochs if epochs is None else check_epochs("fastflow", epochs, "fit epochs")
        optimizer: torch.optim.Optimizer | None = None

        def step(images: Tensor) -> dict[str, float]:
            nonlocal optimizer
            zs, log_dets = self._latents(images)
            if optimizer is None:
                # Created after the first forward, which builds the CNN layer norms.
                optimizer = torch.optim.Adam(
                    [p for p in self.parameters() if p.requires_grad],
                    lr=self.lr,
                    weight_decay=self.weight_decay,
                )
            loss = torch.stack(
                [gaussian_nll(z, d) for z, d in zip(zs, log_dets, strict=True)]
            ).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return {"loss": float(loss.detach())}

        def end_of_epoch(epoch: int, means: dict[str, float]) -> None:
            self.fitted.fill_(True)

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
    def predict(self, images: Tensor) -> Prediction:
        """Score a batch: the negated mean over scales of the per-position likelihood, and max.

        As in the paper's code the per-position log-likelihood is ``-mean_c z^2 / 2`` (the
        Jacobian term, the same for every image at a position up to the learned scaling, is
        left out), and its exponential lies in (0, 1], so maps lie in [-1, 0).
        """
        if not bool(self.fitted):
            raise ModelError("fastflow: predict called before fit")
        images = images.to(self.fitted.device)
        zs, _ = self._latents(images)
        size = images.shape[-2:]
        maps = [-upsample_maps(torch.exp(-0.5 * z.square().mean(1)), size) for z in zs]
        anomaly_map = torch.stack(maps).mean(0)
        scores = anomaly_map.flatten(1).max(dim=1).values
        return Prediction(score=scores, anomaly_map=anomaly_map)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The CNN layer norms' shapes are only known after fit: take the stored ones.
        if not self.is_vit and len(self.norms) == 0:
            index = 0
            while (key := f"{prefix}norms.{index}.weight") in state_dict:
                shape = tuple(state_dict[key].shape)
                self.norms.append(nn.LayerNorm(shape, device=self.fitted.device))
                index += 1
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def backbone_problem(
        cls, backbone: str, hparams: Mapping[str, Any] | None = None, image_size: int | None = None
    ) -> str | None:
        """Also checks the default layers FastFlow picks on ``backbone`` exist there."""
        problem = super().backbone_problem(backbone, hparams, image_size)
        if problem is not None or (hparams or {}).get("layers") is not None:
            return problem
        try:
            resolve_layers(get_backbone(backbone), default_layers(get_backbone(backbone)))
        except ModelError as error:
            return f"{error}; FastFlow reads these by default, pass layers= to choose others"
        return None
