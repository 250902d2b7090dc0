"""MMR (Zhang et al., "Industrial Anomaly Detection with Domain Shift: A Real-world Dataset and
Masked Multi-scale Reconstruction", 2023; the AeBAD paper).

A frozen CNN (WideResNet50, ``layer1``..``layer3``) gives the multi-scale target features of an
image. A vision transformer sees the same image cut into patches, MAE-style: during training a
random ``mask_ratio`` of the patches is dropped and the encoder runs on the visible ones only;
a learned mask token fills the dropped positions, fixed sine-cosine position embeddings are
added, and a simple feature pyramid (ViTDet's: transposed convolutions up, max pooling down,
then 1x1 and 3x3 convolutions with channel LayerNorm) turns the stride-``patch_size`` token map
into one map per CNN layer. The loss is ``1 - cos`` between reconstructed and target features,
averaged over positions and summed over scales. Reconstructing hidden patches from visible ones
forces the transformer to learn how normal parts relate to each other, so at test time (no
masking) it reproduces normal content but not anomalies: the per-layer ``1 - cos`` maps,
upsampled, summed and Gaussian-blurred, are the anomaly map, their maximum the image score.

The paper starts the transformer from MAE's ImageNet-pretrained ViT-Base; offline it starts from
a seeded random initialisation unless ``vit_weights`` names a local MAE checkpoint or timm ViT
weights file, and the row's ``parts`` and ``notes`` say which. The paper
trains at 224 px (resized to 256, centre-cropped); the study uses 256 px. At either size the
16-px token grid tiles the CNN's stride-4, 8 and 16 grids exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from models.backbones import (
    FeatureExtractor,
    get_backbone,
    load_state_dict_file,
    resolve_layers,
    state_dict_problems,
)
from models.base import (
    Batch,
    Detector,
    EpochCallback,
    Prediction,
    check_epochs,
    hyperparameters,
    register,
    train_epochs,
)
from models.components.feature_utils import gaussian_blur, upsample_maps
from models.constraints import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    UNIT_LEFT_CLOSED,
    Interval,
    Rule,
)
from models.errors import ModelError
from models.parts import describe_part

__all__ = ["MMR", "MaskedViT", "sincos_position_embedding"]

MAX_SCALE_STEPS = 3
"""The pyramid reaches CNN strides up to 2**3 times finer or coarser than the patch size."""


def sincos_position_embedding(dim: int, height: int, width: int) -> Tensor:
    """MAE's fixed 2-D sine-cosine position embedding of a ``height x width`` grid: ``HW x dim``.

    The first half of the channels encodes the column, the second half the row, each as sines
    then cosines of the position at ``dim / 4`` geometrically spaced frequencies.
    """
    quarter = dim // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=torch.float64),
        torch.arange(width, dtype=torch.float64),
        indexing="ij",
    )

    def encode(positions: Tensor) -> Tensor:
        angles = positions.flatten()[:, None] * frequencies[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class _PatchEmbed(nn.Module):
    # Named like MAE's (patch_embed.proj) so that its checkpoints load as they are.
    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(images)


class MaskedViT(nn.Module):
    """A ViT encoder that can drop patches (MAE) and returns the full token grid, mask tokens in.

    Args:
        patch_size: side of the square patches (the token map's stride).
        embed_dim: token dimension (divisible by 4 and by ``heads``).
        depth: transformer blocks.
        heads: attention heads per block.
        mlp_ratio: hidden width of the blocks' MLPs per ``embed_dim``.

    Parameter names follow MAE's encoder (``cls_token``, ``patch_embed.proj``, ``blocks``,
    ``norm``), so an MAE checkpoint's encoder loads into it directly.
    """

    def __init__(self, patch_size: int, embed_dim: int, depth: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.patch_embed = _PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList(
            Block(embed_dim, heads, mlp_ratio, qkv_bias=True) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self._positions: dict[tuple[int, int, torch.device], Tensor] = {}
        self._init_weights()

    def _init_weights(self) -> None:
        # MAE's initialisation: the patch projection like a linear layer, Xavier-uniform linear
        # layers, small normal tokens.
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def position_embedding(self, height: int, width: int, device: torch.device) -> Tensor:
        """The fixed ``1 x HW x D`` embedding of a grid (cached; nothing to learn or save)."""
        key = (height, width, device)
        if key not in self._positions:
            embedding = sincos_position_embedding(self.embed_dim, height, width)
            self._positions[key] = embedding[None].to(device)
        return self._positions[key]

    def forward(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        """``B x D x h x w`` token map of ``images``; only the tokens ``keep`` are encoded.

        ``keep`` (``B x K`` token indices, row-major over the patch grid) selects the visible
        patches; the others are replaced by the mask token after the encoder. None keeps all.
        """
        tokens = self.patch_embed(images)
        batch, dim, height, width = tokens.shape
        positions = self.position_embedding(height, width, tokens.device)
        tokens = tokens.flatten(2).transpose(1, 2) + positions
        if keep is not None:
            index = keep[..., None].expand(-1, -1, dim)
            tokens = tokens.gather(1, index)
        # The class token takes part in attention as in MAE (its position is the zero vector).
        x = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)[:, 1:]
        if keep is not None:
            full = self.mask_token.expand(batch, height * width, dim)
            x = full.scatter(1, index, x)
        # A second fixed embedding tells the pyramid where each (mask) token sits, as MAE's
        # decoder does.
        x = x + positions
        return x.transpose(1, 2).reshape(batch, dim, height, width)


class _PyramidLevel(nn.Sequential):
    """ViTDet's simple-feature-pyramid branch: resample the token map by ``2**steps``, then
    project to ``out_channels`` (1x1 conv + LayerNorm, 3x3 conv + LayerNorm)."""

    def __init__(self, embed_dim: int, out_channels: int, steps: int):
        layers: list[nn.Module] = []
        channels = embed_dim
        for step in range(steps):
            layers.append(nn.ConvTranspose2d(channels, channels // 2, 2, stride=2))
            channels //= 2
            if step < steps - 1:
                layers += [LayerNorm2d(channels), nn.GELU()]
        layers += [nn.MaxPool2d(2) for _ in range(-steps)]
        layers += [
            nn.Conv2d(channels, out_channels, 1, bias=False),
            LayerNorm2d(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            LayerNorm2d(out_channels),
        ]
        super().__init__(*layers)


def _scale_steps(patch_size: int, strides: Mapping[str, int]) -> dict[str, int] | str:
    """log2(patch_size / stride) per layer, or why a layer cannot be reached."""
    steps = {}
    for layer, stride in strides.items():
        ratio = math.log2(patch_size / stride)
        if ratio != round(ratio) or abs(ratio) > MAX_SCALE_STEPS:
            return (
                f"layer {layer} has stride {stride} and the ViT's token map stride "
                f"{patch_size}: their ratio must be a power of two between 1/{2**MAX_SCALE_STEPS}"
                f" and {2**MAX_SCALE_STEPS} (e.g. layers layer1..layer3 with patch_size 16)"
            )
        steps[layer] = round(ratio)
    return steps


def _layer_strides(backbone: str, layers: Sequence[str]) -> dict[str, int]:
    spec = get_backbone(backbone)
    return {layer: spec.layer(layer)[0] for layer in resolve_layers(spec, layers)}


@register("mmr")
class MMR(Detector):
    """Masked multi-scale reconstruction of frozen CNN features by a vision transformer."""

    learning_type = "iterative"
    localizes = True

    hyperparameter_constraints: ClassVar[Mapping[str, Rule]] = {
        "mask_ratio": UNIT_LEFT_CLOSED,
        # Which patch sizes the backbone's strides allow is backbone_problem's to say.
        "patch_size": POSITIVE_INT,
        # The pyramid halves the embedding up to MAX_SCALE_STEPS times.
        "vit_embed_dim": Interval(int, 2**MAX_SCALE_STEPS, None),
        "vit_depth": NON_NEGATIVE_INT,
        "vit_heads": POSITIVE_INT,
        "vit_mlp_ratio": POSITIVE,
        "lr": POSITIVE,
        "beta1": UNIT_LEFT_CLOSED,
        "beta2": UNIT_LEFT_CLOSED,
        "weight_decay": NON_NEGATIVE,
        "epochs": POSITIVE_INT,
        "warmup_epochs": NON_NEGATIVE_INT,
        "blur_sigma": NON_NEGATIVE,
    }

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        mask_ratio: float = 0.4,
        patch_size: int = 16,
        vit_embed_dim: int = 768,
        vit_depth: int = 12,
        vit_heads: int = 12,
        vit_mlp_ratio: float = 4.0,
        vit_weights: str | None = None,
        lr: float = 1e-3,
        beta1: float = 0.9,
        beta2: float = 0.95,
        weight_decay: float = 0.05,
        epochs: int = 200,
        warmup_epochs: int = 50,
        blur_sigma: float = 4.0,
        seed: int = 0,
        pretrained: bool = True,
        weights: str | None = None,
    ) -> None:
        """
        Args:
            backbone: the frozen CNN whose features are reconstructed (the paper's
                wide_resnet50_2).
            layers: its layers reconstructed; each layer's stride times a power of two (at most
                8 either way) must equal ``patch_size``.
            mask_ratio: fraction of the patches hidden from the encoder during training (the
                paper's 0.4); nothing is hidden at test time.
            patch_size: side in pixels of the ViT's patches (ViT-Base/16: 16).
            vit_embed_dim: token dimension of the ViT (ViT-Base: 768); a multiple of 4 and of
                ``vit_heads``.
            vit_depth: transformer blocks (ViT-Base: 12).
            vit_heads: attention heads (ViT-Base: 12).
            vit_mlp_ratio: MLP width per token dimension in the blocks (ViT-Base: 4).
            vit_weights: local ViT checkpoint (``.pth``/``.bin``/``.safetensors``) to start the
                ViT from: MAE's pretraining checkpoint, as the paper does, or a timm ViT of the
                same shape (``vit_base_patch16_224``'s, e.g. from ``sweep weights fetch``; its
                learned position embedding is not used). The encoder's ``cls_token``,
                ``patch_embed``, ``blocks`` and ``norm`` are read. None starts from a seeded
                random initialisation, and ``fit`` says so in its notes.
            lr: peak AdamW learning rate, reached after the warmup.
            beta1: AdamW's first-moment decay (MAE's 0.9).
            beta2: AdamW's second-moment decay (MAE's 0.95).
            weight_decay: AdamW weight decay, applied to weight matrices and tokens but not to
                biases and norms (as MAE and the MMR code do).
            epochs: training epochs when ``fit`` is not given a budget.
            warmup_epochs: epochs of linear learning-rate warmup, after which the rate follows a
                half cosine to zero at the last epoch.
            blur_sigma: standard deviation in pixels of the Gaussian smoothing of the anomaly
                map (the paper's 4); 0 disables it.
            seed: seeds the ViT's and pyramid's initialisation, the training masks, and the
                CNN's initialisation when it is not pretrained.
            pretrained: use timm's pretrained weights for the CNN.
            weights: local CNN weight file or directory (overrides ``pretrained``).
        """
        super().__init__()
        problem = type(self).backbone_problem(
            backbone, {"layers": layers, "patch_size": patch_size}
        )
        if problem is not None:
            raise ModelError(f"mmr: cannot use backbone {backbone!r}: {problem}")
        # Beyond the table: two hyperparameters together.
        if vit_embed_dim % 4 or vit_embed_dim % vit_heads:
            raise ModelError(
                f"mmr: vit_embed_dim must be a multiple of 4 and of vit_heads ({vit_heads}), "
                f"got {vit_embed_dim}"
            )
        self.epochs = epochs
        self.warmup_epochs = warmup_epochs
        self.mask_ratio = float(mask_ratio)
        self.lr = float(lr)
        self.betas = (float(beta1), float(beta2))
        self.weight_decay = float(weight_decay)
        self.blur_sigma = float(blur_sigma)
        self.seed = seed

        generator = torch.Generator().manual_seed(seed)
        teacher_seed, vit_seed, self._mask_seed = torch.randint(
            2**62, (3,), generator=generator
        ).tolist()
        self.teacher = FeatureExtractor(
            backbone, layers, pretrained=pretrained, weights=weights, seed=teacher_seed
        )
        steps = _scale_steps(patch_size, self.teacher.strides)
        assert isinstance(steps, dict)  # backbone_problem has checked it
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(vit_seed)
            self.vit = MaskedViT(patch_size, vit_embed_dim, vit_depth, vit_heads, vit_mlp_ratio)
            self.pyramid = nn.ModuleDict(
                {
                    layer: _PyramidLevel(vit_embed_dim, self.teacher.channels[layer], step)
                    for layer, step in steps.items()
                }
            )
        self.vit_weights = vit_weights
        self._vit_source: str | None = None
        if vit_weights is not None:
            self._load_vit(vit_weights)
        self.register_buffer("fitted", torch.tensor(False))

    @classmethod
    def backbone_problem(
        cls, backbone: str, hparams: Mapping[str, Any] | None = None, image_size: int | None = None
    ) -> str | None:
        """Base checks, plus: every layer's stride is a power-of-two fraction of the patch size."""
        problem = super().backbone_problem(backbone, hparams, image_size)
        if problem is not None:
            return problem
        merged = {**hyperparameters(cls.name), **(hparams or {})}
        patch_size = merged["patch_size"]
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
            return f"patch_size must be a positive int, got {patch_size!r}"
        if not merged["layers"]:
            return "it needs at least one CNN layer to reconstruct"
        steps = _scale_steps(patch_size, _layer_strides(backbone, merged["layers"]))
        return steps if isinstance(steps, str) else None

    def _load_vit(self, path: str) -> None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise ModelError(f"mmr: vit_weights file {str(file)!r} does not exist")
        state = load_state_dict_file(file)
        self._vit_source = _vit_checkpoint_kind(state)
        own = {k: v for k, v in self.vit.state_dict().items() if k != "mask_token"}
        problem = state_dict_problems(own, state)
        if problem is not None:
            raise ModelError(
                f"mmr: vit_weights {str(file)!r} does not fit a ViT with patch_size "
                f"{self.vit.patch_size}, embed dim {self.vit.embed_dim} and "
                f"{len(self.vit.blocks)} blocks: {problem}"
            )
        if any(p.is_meta for p in self.vit.parameters()):
            return  # built for shapes only (a study's validation): checked, nothing to copy
        self.vit.load_state_dict({key: state[key] for key in own}, strict=False)

    def reconstruct(self, images: Tensor, keep: Tensor | None = None) -> dict[str, Tensor]:
        """The pyramid's reconstruction of every layer from the (partly hidden) image."""
        tokens = self.vit(images, keep)
        return {layer: level(tokens) for layer, level in self.pyramid.items()}

    @staticmethod
    def loss(target: Mapping[str, Tensor], reconstruction: Mapping[str, Tensor]) -> Tensor:
        """Sum over layers of the mean over images and positions of ``1 - cos``."""
        maps = _cosine_distance_maps(target, reconstruction)
        return torch.stack([m.mean() for m in maps.values()]).sum()

    def _keep_indices(self, images: Tensor, generator: torch.Generator) -> Tensor:
        # MAE's per-image random masking: a random permutation of the patches per image (drawn
        # on the CPU from the seeded generator, so any device gives the same masks), keeping the
        # first (1 - mask_ratio) of them.
        patch = self.vit.patch_size
        n_patches = (images.shape[-2] // patch) * (images.shape[-1] // patch)
        n_keep = max(1, int(n_patches * (1 - self.mask_ratio)))
        noise = torch.rand(images.shape[0], n_patches, generator=generator)
        return noise.argsort(dim=1)[:, :n_keep].to(images.device)

    def _learning_rate(self, epoch: int, n_epochs: int) -> float:
        # Linear warmup then a half cosine, per epoch, as the study describes the schedule. (The
        # authors' released code computes the warmup the same way but then divides the rate by
        # 10 at epochs 120 and 160, its cosine line commented out.)
        if epoch <= self.warmup_epochs:
            return self.lr * epoch / self.warmup_epochs
        progress = (epoch - 1 - self.warmup_epochs) / max(1, n_epochs - self.warmup_epochs)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    def resource_probe(self, images: Tensor) -> None:
        """A training step's forward: the teacher's features and the masked ViT's
        reconstruction of every layer."""
        with torch.no_grad():
            target = self.teacher(images)
        keep = None
        if self.mask_ratio > 0:
            keep = self._keep_indices(images, torch.Generator().manual_seed(0))
        self.loss(target, self.reconstruct(images, keep))

    def fit(
        self,
        train: Iterable[Batch],
        *,
        epochs: int | None = None,
        on_epoch_end: EpochCallback | None = None,
    ) -> dict[str, Any]:
        """Train the ViT and pyramid with AdamW for ``epochs`` (default: the constructor's).

        The learning rate is set per epoch: linear warmup over ``warmup_epochs``, then a half
        cosine over the remaining epochs of this ``fit`` (a budget shorter than the warmup never
        reaches the peak rate). ``on_epoch_end(epoch, {"loss": mean loss, "lr": rate})`` runs
        after every epoch and stops training when it returns True. A non-finite loss is a
        :class:`ModelError`. Returns the epochs run and the last epoch's loss.
        """
        n_epochs = self.epochs if epochs is None else check_epochs("mmr", epochs, "fit epochs")
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        decay = [p for n, p in trainable if p.ndim >= 2 and not n.endswith(".bias")]
        no_decay = [p for n, p in trainable if not (p.ndim >= 2 and not n.endswith(".bias"))]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.lr,
            betas=self.betas,
        )
        generator = torch.Generator().manual_seed(self._mask_seed)

        def set_learning_rate(epoch: int) -> None:
            rate = self._learning_rate(epoch, n_epochs)
            for group in optimizer.param_groups:
                group["lr"] = rate

        def step(images: Tensor) -> dict[str, float]:
            with torch.no_grad():
                target = self.teacher(images)
            keep = self._keep_indices(images, generator) if self.mask_ratio > 0 else None
            loss = self.loss(target, self.reconstruct(images, keep))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return {"loss": float(loss.detach())}

        def end_of_epoch(epoch: int, means: dict[str, float]) -> dict[str, float]:
            self.fitted.fill_(True)
            rate = optimizer.param_groups[0]["lr"]
            # The loop has no start-of-epoch hook: the next epoch's rate is set here.
            if epoch < n_epochs:
                set_learning_rate(epoch + 1)
            return {"lr": rate}

        set_learning_rate(1)

        epochs_run, means = train_epochs(
            self,
            train,
            step,
            epochs=n_epochs,
            on_epoch_end=on_epoch_end,
            end_of_epoch=end_of_epoch,
        )
        notes = []
        if self.vit_weights is None:
            notes.append(
                "mmr: no vit_weights, so the ViT starts from a random initialisation instead of "
                "MAE's ImageNet-pretrained ViT-Base"
            )
        elif self._vit_source == "timm ViT":
            notes.append(
                "mmr: the ViT starts from a supervised timm ViT (not MAE's); its learned "
                "position embedding is replaced by the fixed sine-cosine one MMR uses"
            )
        return {
            "epochs": epochs_run,
            "loss": means.get("loss", math.nan),
            "notes": notes,
            "parts": self.parts(),
        }

    def parts(self) -> dict[str, str]:
        """Where the ViT's starting weights come from, as a result row shows it."""
        if self.vit_weights is None:
            return {"vit": "random init"}
        return {"vit": f"{self._vit_source} {describe_part(self.vit_weights, 'file')}"}

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        """Score a batch (nothing masked): blurred sum of the per-layer ``1 - cos`` maps, max."""
        if not bool(self.fitted):
            raise ModelError("mmr: predict called before fit")
        images = images.to(self.fitted.device)
        maps = _cosine_distance_maps(self.teacher(images), self.reconstruct(images))
        size = images.shape[-2:]
        anomaly_map = torch.stack([upsample_maps(m, size) for m in maps.values()]).sum(0)
        anomaly_map = gaussian_blur(anomaly_map, self.blur_sigma)
        scores = anomaly_map.flatten(1).max(dim=1).values
        return Prediction(score=scores, anomaly_map=anomaly_map)


def _cosine_distance_maps(
    target: Mapping[str, Tensor], reconstruction: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    maps = {}
    for layer, feature in target.items():
        rebuilt = reconstruction[layer]
        if rebuilt.shape[-2:] != feature.shape[-2:]:
            # Images whose sides are not multiples of the patch size give a token grid that
            # does not tile the CNN's grid exactly; align the reconstruction to the target.
            rebuilt = F.interpolate(
                rebuilt, size=feature.shape[-2:], mode="bilinear", align_corners=False
            )
        maps[layer] = 1.0 - F.cosine_similarity(feature, rebuilt, dim=1)
    return maps


def _vit_checkpoint_kind(state: Mapping[str, Tensor]) -> str:
    """What trained a ViT checkpoint, from its keys: MAE's pretraining checkpoints hold the
    decoder (or the mask token), timm's classification models a learned position embedding or
    a head."""
    if "mask_token" in state or any(key.startswith("decoder") for key in state):
        return "MAE"
    if "pos_embed" in state or "head.weight" in state:
        return "timm ViT"
    return "ViT"
