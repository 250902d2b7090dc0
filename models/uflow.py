"""U-Flow (Tailanian, Pardo and Musé, "U-Flow: A U-shaped Normalizing Flow for Anomaly Detection
with Unsupervised Threshold", 2022, arXiv:2211.12353).

A frozen backbone gives a feature pyramid: for CNNs the stages ``layer1``..``layer3`` (strides
4, 8 and 16, each standardised per image), for the paper's ``mcait`` the token maps of two CaiTs
(block 40 of CaiT-M48 at 448 px, stride 16, and block 20 of CaiT-S24 fed the image at 224 px,
stride 32 relative to the input), passed through each transformer's final LayerNorm. A
normalizing flow shaped like a U-Net maps the pyramid to Gaussian latents: starting from the
coarsest scale, each scale's flow (``flow_steps`` coupling blocks) transforms its input, half of
its output becomes that scale's latent, and the other half is upsampled invertibly (a 2x2
depth-to-space shuffle) and concatenated to the next finer scale's features, whose flow thus
also sees the coarser context. The finest flow's whole output is the last latent. The flow is
trained by maximum likelihood on normal images.

At test time every scale's latent gives a per-position likelihood ``exp(-mean_c z^2 / 2)``; the
anomaly map is one minus its mean over the scales (each upsampled to the image) and the image
score is the map's maximum. The paper's a contrario threshold (the number of false alarms of a
region) is a post-processing step for choosing a threshold without labels; the sweep chooses
its own thresholds, so it is not part of the detector.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbones import FeatureExtractor, get_backbone, resolve_layers
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
from models.constraints import NON_NEGATIVE, POSITIVE, POSITIVE_INT, Rule
from models.errors import ModelError

__all__ = ["UFlow", "UShapedFlow"]

CNN_LAYERS = ("layer1", "layer2", "layer3")
"""The paper's CNN pyramid (strides 4, 8, 16)."""
MCAIT_BLOCKS = {"cait_m48_448": "blocks.40", "cait_s24_224": "blocks.20"}
"""The block read from each member of ``mcait`` (the paper's Table 6: block index 40 and 20)."""
MCAIT_COARSE_INPUT = 224
"""The size the image is resized to for ``mcait``'s second member, CaiT-S24."""


class _CouplingSubnet(nn.Module):
    """Two convolutions with a ReLU between, ``in -> ratio * in -> out`` channels, initialised
    as PyTorch does (the paper's and anomalib's); the coupling block scales their output by 0.1.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, ratio: float):
        super().__init__()
        hidden = max(1, int(in_channels * ratio))
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size, padding=kernel_size // 2),
            nn.ReLU(),
            nn.Conv2d(hidden, out_channels, kernel_size, padding=kernel_size // 2),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class UShapedFlow(nn.Module):
    """The U-shaped flow over a feature pyramid whose grids halve from scale to scale.

    Args:
        channels: channels of each scale, finest first.
        flow_steps: coupling blocks per scale; their subnets alternate 3x3 and 1x1 kernels
            (3x3 first), as in the paper's code.
        clamp: soft clamp of the coupling log-scales, ``clamp * tanh(0.1 s)`` (FrEIA's).
        ratio: hidden channels of each subnet relative to its input channels.
        seed: seeds every block's permutation and initialisation.

    Every block is the shared :class:`AffineCoupling` in the form of FrEIA's ``AllInOneBlock``
    (one half transformed from the other, then a learned per-channel scale and offset, behind a
    fixed channel permutation). ``forward(features) -> (latents, log_det)``: one latent per
    scale, finest first (the coarser ones hold the channels not sent up), and the per-sample
    log-determinant of the whole flow.
    """

    def __init__(
        self, channels: Sequence[int], flow_steps: int, clamp: float, ratio: float, seed: int
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        seeds = torch.randint(2**62, (len(channels) * flow_steps,), generator=generator).tolist()
        self.up_channels: list[int] = []
        stages = []
        in_channels = channels[-1]
        for k, i in enumerate(reversed(range(len(channels)))):
            if in_channels < 2:
                raise ModelError(f"uflow: a flow stage needs 2+ channels, got {in_channels}")
            stages.append(
                SequentialFlow(
                    [
                        AffineCoupling(
                            in_channels,
                            _subnet_factory(3 if step % 2 == 0 else 1, ratio),
                            clamp=clamp,
                            seed=seeds[k * flow_steps + step],
                            both_halves=False,
                            global_affine=True,
                        )
                        for step in range(flow_steps)
                    ]
                )
            )
            if i > 0:
                # About half goes up, a multiple of 4 so the 2x2 shuffle can unfold it.
                up = in_channels // 8 * 4
                if up == 0:
                    raise ModelError(
                        f"uflow: a scale with {in_channels} channels is too thin to send "
                        "channels to the finer one (8+ needed)"
                    )
                self.up_channels.append(up)
                in_channels = channels[i - 1] + up // 4
        self.stages = nn.ModuleList(stages)

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
        x = features[-1]
        latents: list[Tensor] = []
        log_det = x.new_zeros(x.shape[0])
        for k, stage in enumerate(self.stages):
            z, stage_log_det = stage(x)
            log_det = log_det + stage_log_det
            i = len(features) - 1 - k
            if i == 0:
                latents.append(z)
                break
            up, out = z[:, : self.up_channels[k]], z[:, self.up_channels[k] :]
            latents.append(out)
            # Depth-to-space is a permutation of entries: invertible, log-determinant 0.
            up = F.pixel_shuffle(up, 2)
            finer = features[i - 1]
            if up.shape[-2:] != finer.shape[-2:]:
                raise ModelError(
                    f"uflow: feature grids must halve from scale to scale, got "
                    f"{tuple(finer.shape[-2:])} below {tuple(z.shape[-2:])}; use an image size "
                    "divisible by the deepest stride"
                )
            x = torch.cat([finer, up], dim=1)
        return latents[::-1], log_det


def _subnet_factory(kernel_size: int, ratio: float):
    def subnet(in_channels: int, out_channels: int) -> nn.Module:
        return _CouplingSubnet(in_channels, out_channels, kernel_size, ratio)

    return subnet


@register("uflow")
class UFlow(Detector):
    """U-shaped normalizing flow over a frozen backbone's feature pyramid."""

    learning_type = "iterative"
    localizes = True
    backbone_kinds = ("cnn", "composite")
    fixed_input_size = True

    hyperparameter_constraints: ClassVar[Mapping[str, Rule]] = {
        "flow_steps": POSITIVE_INT,
        "affine_clamp": POSITIVE,
        "affine_subnet_channels_ratio": POSITIVE,
        "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "epochs": POSITIVE_INT,
    }

    def __init__(
        self,
        backbone: str = "resnet18",
        layers: Sequence[str] | None = None,
        flow_steps: int = 4,
        affine_clamp: float = 2.0,
        affine_subnet_channels_ratio: float = 1.0,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        epochs: int = 200,
        seed: int = 0,
        pretrained: bool = True,
        weights: str | None = None,
    ) -> None:
        """
        Args:
            backbone: a CNN (the study ran ``resnet18`` and ``wide_resnet50_2`` at 256 px) or
                ``"mcait"`` (the paper's pair of CaiTs, at 448 px). Table B.8 lists mcait first;
                the default is resnet18 because mcait (330M frozen parameters up to the blocks
                read, a forward pass of about 0.5 TFLOP per image) is impractical as a default
                on a CPU and in CI, not because it cannot run offline (its members' weights
                come from ``weights``, as any backbone's).
            layers: the CNN stages of the pyramid, each grid half the previous one (consecutive
                strides doubling); None is the paper's ``("layer1", "layer2", "layer3")``. With
                ``mcait`` it must stay None: the CaiT blocks are fixed (40 and 20).
            flow_steps: coupling blocks of each scale's flow (Table B.8's 4).
            affine_clamp: soft clamp of the coupling log-scales (Table B.8's 2).
            affine_subnet_channels_ratio: hidden channels of each coupling subnet relative to
                its input channels (Table B.8's 1).
            lr: Adam learning rate.
            weight_decay: Adam weight decay (L2 penalty).
            epochs: training epochs when ``fit`` is not given a budget (Table B.8's 200).
            seed: seeds the flow's permutations and initialisation, and the backbone's when it
                is not pretrained.
            pretrained: use timm's pretrained backbone weights.
            weights: local backbone weight file or directory (overrides ``pretrained``); for
                ``mcait`` a directory holding both members' files.
        """
        super().__init__()
        self.epochs = epochs
        # Beyond the table: the layers must form the backbone's pyramid.
        problem = _pyramid_problem(get_backbone(backbone), layers)
        if problem is not None:
            raise ModelError(f"uflow: {problem}")
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.seed = seed

        generator = torch.Generator().manual_seed(seed)
        flow_seed, *backbone_seeds = torch.randint(2**62, (3,), generator=generator).tolist()
        spec = get_backbone(backbone)
        self.composite = spec.kind == "composite"
        if self.composite:
            self.extractors = nn.ModuleList(
                FeatureExtractor(
                    member,
                    [MCAIT_BLOCKS[member]],
                    pretrained=pretrained,
                    weights=weights,
                    seed=member_seed,
                )
                for member, member_seed in zip(spec.members, backbone_seeds, strict=True)
            )
            channels = [get_backbone(m).layer(MCAIT_BLOCKS[m])[1] for m in spec.members]
            self.layers = [f"{m}.{MCAIT_BLOCKS[m]}" for m in spec.members]
        else:
            self.layers = list(CNN_LAYERS if layers is None else layers)
            self.layers.sort(key=lambda layer: spec.layer(layer)[0])
            self.extractors = nn.ModuleList(
                [
                    FeatureExtractor(
                        backbone,
                        self.layers,
                        pretrained=pretrained,
                        weights=weights,
                        seed=backbone_seeds[0],
                    )
                ]
            )
            channels = [spec.layer(layer)[1] for layer in self.layers]
        self.flow = UShapedFlow(
            channels,
            flow_steps,
            clamp=float(affine_clamp),
            ratio=float(affine_subnet_channels_ratio),
            seed=flow_seed,
        )
        self.register_buffer("fitted", torch.tensor(False))

    @classmethod
    def backbone_problem(
        cls, backbone: str, hparams: Mapping[str, Any] | None = None, image_size: int | None = None
    ) -> str | None:
        """CNNs with a halving pyramid, or ``mcait`` (at 448 px) with the default layers."""
        spec = get_backbone(backbone)
        layers = (hparams or {}).get("layers")
        if spec.kind == "composite":
            # A composite has no layers for the generic check: check the rest without them.
            problem = super().backbone_problem(
                backbone, {**(hparams or {}), "layers": None}, image_size
            )
        else:
            problem = super().backbone_problem(backbone, hparams, image_size)
        if problem is not None:
            return problem
        problem = _pyramid_problem(spec, layers)
        if problem is None and image_size is not None and spec.kind != "composite":
            strides = [spec.layer(layer)[0] for layer in (layers or CNN_LAYERS)]
            if image_size % max(strides):
                return (
                    f"the image size must be a multiple of the deepest stride {max(strides)} "
                    f"so that the grids halve exactly, got {image_size}"
                )
        return problem

    def features(self, images: Tensor) -> list[Tensor]:
        """The normalised feature pyramid of a batch, finest first."""
        if self.composite:
            fine, coarse = self.extractors
            small = F.interpolate(
                images, size=(MCAIT_COARSE_INPUT,) * 2, mode="bicubic", align_corners=True
            )
            # Each CaiT's own final LayerNorm, as the paper reads them.
            return [
                next(iter(fine(images, norm=True).values())),
                next(iter(coarse(small, norm=True).values())),
            ]
        maps = self.extractors[0](images)
        # Each map standardised per image over all its entries (LayerNorm over C x h x w).
        # Without the learned elementwise affine of the paper's code: that affine sits outside
        # the likelihood, so maximum likelihood would shrink it towards zero; without it the
        # normalisation also works at any image size.
        return [F.layer_norm(maps[layer], maps[layer].shape[1:]) for layer in self.layers]

    def resource_probe(self, images: Tensor) -> None:
        """A training step's forward: frozen features and the U-shaped flow."""
        with torch.no_grad():
            features = self.features(images)
        self.flow(features)

    def fit(
        self,
        train: Iterable[Batch],
        *,
        epochs: int | None = None,
        on_epoch_end: EpochCallback | None = None,
    ) -> dict[str, Any]:
        """Train the flow by maximum likelihood for ``epochs`` (default: the constructor's).

        The loss minimised is the per-image negative log-likelihood summed over every latent
        dimension, as the paper's; ``on_epoch_end(epoch, {"loss": ...})`` gets it per latent
        dimension (comparable across image sizes) after every epoch and stops training when it
        returns True. A non-finite loss is a :class:`ModelError` (the flow diverged). Returns
        the epochs run and the last loss.
        """
        n_epochs = self.epochs if epochs is None else check_epochs("uflow", epochs, "fit epochs")
        optimizer = torch.optim.Adam(
            self.flow.parameters(), lr=self.lr, weight_decay=self.weight_decay
        )

        def step(images: Tensor) -> dict[str, float]:
            with torch.no_grad():
                features = self.features(images)
            latents, log_det = self.flow(features)
            loss = gaussian_nll(latents, log_det)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            dims = sum(z[0].numel() for z in latents)
            return {"loss": float(loss.detach()) / dims}

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
        """Score a batch: one minus the mean over scales of the per-position likelihood, and
        its maximum."""
        if not bool(self.fitted):
            raise ModelError("uflow: predict called before fit")
        images = images.to(self.fitted.device)
        latents, _ = self.flow(self.features(images))
        size = images.shape[-2:]
        likelihood = torch.stack(
            [upsample_maps(torch.exp(-0.5 * z.square().mean(1)), size) for z in latents]
        ).mean(0)
        anomaly_map = 1.0 - likelihood
        scores = anomaly_map.flatten(1).max(dim=1).values
        return Prediction(score=scores, anomaly_map=anomaly_map)


def _pyramid_problem(spec: Any, layers: Sequence[str] | None) -> str | None:
    """Why ``layers`` of ``spec`` cannot form U-Flow's pyramid, or None."""
    if spec.kind == "composite":
        if spec.name != "mcait":
            return f"the only composite backbone it reads is mcait, not {spec.name!r}"
        if layers is not None:
            return (
                "mcait's blocks are fixed (CaiT blocks 40 and 20): leave layers unset, "
                f"got {layers!r}"
            )
        return None
    if spec.kind != "cnn":
        return f"{spec.name} is a {spec.kind} backbone; U-Flow reads CNN pyramids or mcait"
    if layers is None:
        layers = CNN_LAYERS
    try:
        resolved = resolve_layers(spec, layers)
    except ModelError as error:
        return str(error)
    strides = sorted(spec.layer(layer)[0] for layer in resolved)
    if len(strides) < 2 or any(b != 2 * a for a, b in itertools.pairwise(strides)):
        return (
            "layers must be 2+ stages whose strides double from one to the next (e.g. "
            f"layer1, layer2, layer3), got {list(layers)} with strides {strides}"
        )
    return None
