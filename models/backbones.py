"""Pretrained CNN backbones as multi-scale feature extractors.

Every detector reads features through :class:`FeatureExtractor`, a thin layer over
``timm.create_model(..., features_only=True)`` that names layers the way papers do
(``layer1``..``layer4`` for ResNets), validates them against :data:`BACKBONES`, and loads local
weight files so that clusters without internet access (and tests) can run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import Tensor

from models.base import ModelError, _suggest

__all__ = ["BACKBONES", "BackboneSpec", "FeatureExtractor", "get_backbone", "list_backbones"]

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
"""File name endings accepted as weight files (``.safetensors``, else a ``torch.save`` file)."""


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone that detectors may use, and the feature layers it offers."""

    name: str
    """Name used in studies and ``models.create(..., backbone=name)``."""
    timm_name: str
    """Architecture name passed to ``timm.create_model``."""
    layers: dict[str, tuple[int, int]]
    """Layer name -> (stride, channels), in timm's ``feature_info`` order (shallow to deep)."""


def _resnet_layers(widths: tuple[int, int, int, int]) -> dict[str, tuple[int, int]]:
    return {
        "act1": (2, 64),
        "layer1": (4, widths[0]),
        "layer2": (8, widths[1]),
        "layer3": (16, widths[2]),
        "layer4": (32, widths[3]),
    }


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("resnet18", "resnet18", _resnet_layers((64, 128, 256, 512))),
        BackboneSpec("resnet50", "resnet50", _resnet_layers((256, 512, 1024, 2048))),
        BackboneSpec("wide_resnet50_2", "wide_resnet50_2", _resnet_layers((256, 512, 1024, 2048))),
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
            f"unknown backbone {name!r}{_suggest(str(name), BACKBONES)} "
            f"(known: {', '.join(list_backbones())})"
        ) from None


def _check_layers(spec: BackboneSpec, layers: Sequence[str]) -> list[str]:
    if isinstance(layers, str):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ModelError(f"backbone {spec.name!r}: at least one layer is needed")
    for layer in layers:
        if layer not in spec.layers:
            raise ModelError(
                f"backbone {spec.name!r} has no layer {layer!r}{_suggest(str(layer), spec.layers)} "
                f"(valid: {', '.join(spec.layers)})"
            )
    duplicates = sorted({layer for layer in layers if layers.count(layer) > 1})
    if duplicates:
        raise ModelError(f"backbone {spec.name!r}: layers repeated: {', '.join(duplicates)}")
    return layers


def resolve_weights_file(spec: BackboneSpec, weights: str | Path) -> Path:
    """The weight file ``weights`` names for ``spec``.

    ``weights`` is a file, or a directory holding ``<name><suffix>`` or ``<timm_name><suffix>``
    for a suffix in :data:`WEIGHT_SUFFIXES` (one directory can then serve a sweep over backbones).
    """
    path = Path(weights).expanduser()
    if path.is_dir():
        names = dict.fromkeys((spec.name, spec.timm_name))
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
            from safetensors.torch import load_file

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


def _load_weights(model: torch.nn.Module, path: Path, spec: BackboneSpec) -> None:
    state = load_state_dict_file(path)
    own = model.state_dict()
    # A full timm checkpoint also holds the classifier and the layers deeper than the last one
    # requested, which the truncated feature model does not have: those extra keys are fine.
    missing = [key for key in own if key not in state]
    mismatched = [
        f"{key} {tuple(state[key].shape)} (expected {tuple(value.shape)})"
        for key, value in own.items()
        if key in state and state[key].shape != value.shape
    ]
    if missing or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if mismatched:
            problems.append(f"{len(mismatched)} wrong shapes (e.g. {', '.join(mismatched[:2])})")
        raise ModelError(
            f"weights file {str(path)!r} does not fit backbone {spec.name!r} "
            f"(timm {spec.timm_name!r}): {'; '.join(problems)}"
        )
    model.load_state_dict({key: state[key] for key in own}, strict=True)


class FeatureExtractor(torch.nn.Module):
    """Multi-scale features of a timm backbone, by layer name.

    Args:
        name: a backbone of :data:`BACKBONES`.
        layers: layer names of that backbone (e.g. ``("layer2", "layer3")``), any order.
        pretrained: start from timm's pretrained weights (downloaded on first use).
        weights: a local weight file (``.safetensors`` or a ``torch.save`` state dict of the timm
            model, classifier included or not) or a directory of them (see
            :func:`resolve_weights_file`); it takes precedence over ``pretrained`` and needs no
            network.
        requires_grad: train the backbone. When False (the default) the extractor is frozen:
            its parameters have ``requires_grad=False`` and it stays in eval mode even when a
            parent module is put in training mode, so batch-norm statistics never change.
        seed: seeds the random initialisation, which is what remains with ``pretrained=False``
            and no ``weights``; the global random state is neither used nor changed.

    ``forward(images)`` returns ``{layer: B x C x h x w}`` in the order of ``layers``;
    ``channels`` and ``strides`` give C and the input-to-feature stride of each layer.
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
        self.layers = _check_layers(self.spec, layers)
        order = list(self.spec.layers)
        out_indices = sorted(order.index(layer) for layer in self.layers)
        weights_file = None if weights is None else resolve_weights_file(self.spec, weights)
        try:
            # timm initialises weights from the global generator: seed it in a forked state.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.model = timm.create_model(
                    self.spec.timm_name,
                    features_only=True,
                    out_indices=tuple(out_indices),
                    pretrained=pretrained and weights_file is None,
                )
        except Exception as error:
            hint = " (no network? pass weights=PATH to a local file)" if pretrained else ""
            raise ModelError(
                f"could not build backbone {name!r} (timm {self.spec.timm_name!r}): {error}{hint}"
            ) from error
        built = list(self.model.feature_info.module_name())
        expected = [order[i] for i in out_indices]
        if built != expected:
            raise ModelError(
                f"backbone {name!r}: timm gave layers {built}, the spec says {expected}; "
                "BACKBONES is out of date with this timm version"
            )
        if weights_file is not None:
            _load_weights(self.model, weights_file, self.spec)
        self.channels = {layer: self.spec.layers[layer][1] for layer in self.layers}
        self.strides = {layer: self.spec.layers[layer][0] for layer in self.layers}
        self.frozen = not requires_grad
        if self.frozen:
            self.model.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Set training mode; a frozen extractor always stays in eval mode."""
        return super().train(mode and not self.frozen)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``{layer: B x C x h x w}`` for a ``B x 3 x H x W`` batch, in the order of ``layers``."""
        outputs = self.model(images)
        by_name = dict(zip(self.model.feature_info.module_name(), outputs, strict=True))
        return {layer: by_name[layer] for layer in self.layers}

    def extra_repr(self) -> str:
        return f"name={self.spec.name!r}, layers={self.layers}, frozen={self.frozen}"
