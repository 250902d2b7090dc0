"""What a detector costs to train and run, measured on the meta device (no tensors, no weights).

Planning a study (``sweep plan``) needs, for every trial, the device memory it will take and
the work it will do, long before anything runs and for hundreds of configurations. This module
builds the detector with its hyperparameters on PyTorch's meta device (shapes only: nothing is
allocated, initialised or downloaded) and runs its training forward pass there
(:meth:`Detector.resource_probe`) on a meta batch, recording:

- the parameters it trains and the ones it keeps frozen;
- the bytes autograd saves for the backward pass (via ``saved_tensors_hooks``: exactly the
  activations a training step keeps alive, deduplicated by storage, parameters excluded);
- the largest single operation (its inputs and output), the transient peak on top of that;
- the floating-point operations per image, with ``torch.utils.flop_counter``'s formulas, split
  into the ones whose inputs need gradients (they cost a backward pass too) and the rest;
- the bytes every operation reads and writes (element-wise work, normalisations and the flows'
  couplings are bound by memory bandwidth, which FLOPs do not see).

:func:`cost_profile` memoises the result per detector, hyperparameters (seed and weight source
left out: they change no shape), image size and batch size, so a study of many seeds pays once
per distinct configuration; a build plus probe takes 0.01-0.3 s.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.fx.experimental._config
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from models.backbones import meta_init

if TYPE_CHECKING:
    from models.base import Detector

__all__ = ["OPTIMIZER_BYTES_PER_PARAM", "CostProfile", "Work", "build_on_meta", "cost_profile"]

IGNORED_HPARAMS = ("seed", "weights", "pretrained", "epochs")
"""Hyperparameters that change no shape: left out of the memoisation key (and weights are never
loaded: the build always uses ``pretrained=False``, ``weights=None``)."""


OPTIMIZER_BYTES_PER_PARAM = 32
"""Memory traffic of one Adam step per trained fp32 parameter: parameter, gradient and both
moments read, parameter and moments written, the gradient zeroed (8 x 4 bytes)."""


@dataclass(frozen=True)
class Work:
    """What a computation's time is made of: arithmetic, memory traffic and sequential steps
    (optimiser steps, greedy coreset iterations), each with a fixed overhead beyond its FLOPs
    and bytes: kernel launches, the optimiser's loop, Python."""

    flops: float = 0.0
    traffic_bytes: float = 0.0
    steps: int = 0

    def __add__(self, other: Work) -> Work:
        return Work(
            self.flops + other.flops,
            self.traffic_bytes + other.traffic_bytes,
            self.steps + other.steps,
        )

    def __mul__(self, factor: float) -> Work:
        return Work(self.flops * factor, self.traffic_bytes * factor, round(self.steps * factor))


@dataclass(frozen=True)
class CostProfile:
    """The cost of one detector configuration, from its meta-device build and probe."""

    trainable_params: int
    frozen_params: int
    saved_bytes: int
    """Bytes autograd keeps for backward over one training batch (0 for one-pass detectors)."""
    working_bytes: int
    """The largest single operation of the probe (inputs + output), at the training batch."""
    forward_flops: float
    """Per image: every operation of the probe's forward pass."""
    train_flops: float
    """Per image and training step: the forward pass plus a backward pass (twice the forward)
    of the operations whose inputs need gradients."""
    forward_traffic: float = 0.0
    """Per image: bytes every non-view operation of the forward pass reads and writes (what
    element-wise work costs: it is bound by memory bandwidth, not FLOPs)."""
    train_traffic: float = 0.0
    """Per image and training step: the forward traffic plus twice that of the operations
    whose inputs need gradients."""
    image_size: int = 0
    batch_size: int = 1
    module_params: Mapping[str, int] = field(default_factory=dict)
    """Parameters of each module up to two levels deep (``"decoders"``, ``"decoders.0"``), for
    detectors whose cost model needs a part's size."""
    notes: tuple[str, ...] = ()
    """What the measurement could not do (e.g. the probe failed and only parameters count)."""

    @property
    def weight_bytes(self) -> int:
        """fp32 weights; trained ones also hold a gradient and two Adam moments (4x)."""
        return 4 * (self.frozen_params + 4 * self.trainable_params)


class _CpuSeeds(TorchDispatchMode):
    # Detectors derive sub-seeds in __init__ (torch.randint(..., generator=g).tolist()): on the
    # meta device such a tensor has no values to read, so random draws from a CPU generator are
    # made on the CPU (a few numbers). Everything else stays on the meta device.
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        generator = kwargs.get("generator")
        on_cpu = generator is not None and generator.device.type == "cpu"
        if on_cpu and kwargs.get("device") == torch.device("meta"):
            kwargs["device"] = torch.device("cpu")
        return func(*args, **kwargs)


def build_on_meta(cls: type[Detector], hparams: Mapping[str, Any]) -> Detector:
    """``cls(**hparams)`` on the meta device: shapes only, no weights loaded or initialised."""
    known = cls.hyperparameter_defaults()
    # What the trial would really build: its backbone family's defaults included. Asked of the
    # class: models.base, where the registry lives, imports this module.
    values = {k: v for k, v in cls.trial_hparams(None, hparams).items() if k in known}
    if "pretrained" in known:
        values["pretrained"] = False
    if "weights" in known:
        values["weights"] = None
    with torch.random.fork_rng(devices=[]), meta_init(), _CpuSeeds():
        return cls(**values)


_VIEW_OPS = frozenset(
    {
        "view",
        "_unsafe_view",
        "alias",
        "as_strided",
        "expand",
        "permute",
        "transpose",
        "t",
        "slice",
        "select",
        "squeeze",
        "unsqueeze",
        "detach",
        "split",
        "split_with_sizes",
        "unbind",
        "chunk",
        "narrow",
        "unfold",
    }
)


class _Meter(TorchDispatchMode):
    """Counts FLOPs (forward, and of ops that need gradients) and the largest single op."""

    def __init__(self, ignored_storages: set[int]) -> None:
        super().__init__()
        self.ignored = ignored_storages
        self.flops = 0.0
        self.grad_flops = 0.0
        self.traffic = 0.0
        self.grad_traffic = 0.0
        self.working_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        # Random draws need no values here: a probe's generator may live on another device.
        if "generator" in kwargs:
            kwargs["generator"] = None
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        needs_grad = any(t.requires_grad for t in inputs)
        if packet in flop_registry:
            flops = float(flop_registry[packet](*args, **kwargs, out_val=out))
            self.flops += flops
            if needs_grad:
                self.grad_flops += flops
        if packet.__name__ not in _VIEW_OPS:
            outputs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
            traffic = sum(t.numel() * t.element_size() for t in (*inputs, *outputs))
            self.traffic += traffic
            if needs_grad:
                self.grad_traffic += traffic
            touched = {
                _storage_key(t): _nbytes(t)
                for t in (*inputs, *outputs)
                if _storage_key(t) not in self.ignored and not (t.is_leaf and t.requires_grad)
            }
            self.working_bytes = max(self.working_bytes, sum(touched.values()))
        return out


def _storage_key(tensor: Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _nbytes(tensor: Tensor) -> int:
    return tensor.untyped_storage().nbytes()


def _run_probe(detector: Detector, image_size: int, batch_size: int) -> tuple[int, _Meter]:
    """Saved-for-backward bytes and the meter of one probe of ``detector`` on a meta batch."""
    state = {p for p in detector.parameters()} | {b for b in detector.buffers()}
    ignored = {_storage_key(t) for t in state}
    saved: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        key = _storage_key(tensor)
        # Trained parameters are leaves that need gradients (a probe may build networks).
        if key not in ignored and not (tensor.is_leaf and tensor.requires_grad):
            saved[key] = _nbytes(tensor)
        return tensor

    images = torch.empty(batch_size, 3, image_size, image_size, device="meta")
    meter = _Meter(ignored)
    detector.train()
    # Boolean masks select every element on the meta device: an upper bound, not an error.
    with (
        torch.fx.experimental._config.patch(meta_nonzero_assume_all_nonzero=True),
        torch.random.fork_rng(devices=[]),
        torch.enable_grad(),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
        meter,
    ):
        detector.resource_probe(images)
    return sum(saved.values()), meter


def _freeze(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


def cost_profile(
    cls: type[Detector], hparams: Mapping[str, Any], image_size: int, batch_size: int
) -> CostProfile:
    """The :class:`CostProfile` of detector ``cls`` with ``hparams`` (memoised)."""
    key = tuple(sorted((k, _freeze(v)) for k, v in hparams.items() if k not in IGNORED_HPARAMS))
    try:
        hash(key)
    except TypeError:  # an unhashable value: measure without the cache
        return _measure(cls, dict(key), image_size, batch_size)
    return _cached_profile(cls, key, image_size, batch_size)


@functools.lru_cache(maxsize=4096)
def _cached_profile(
    cls: type[Detector], key: tuple[tuple[str, Any], ...], image_size: int, batch_size: int
) -> CostProfile:
    return _measure(cls, dict(key), image_size, batch_size)


def _measure(
    cls: type[Detector], hparams: dict[str, Any], image_size: int, batch_size: int
) -> CostProfile:
    detector = build_on_meta(cls, hparams)
    notes: tuple[str, ...] = ()
    try:
        saved, meter = _run_probe(detector, image_size, batch_size)
    except Exception as error:  # a probe that cannot run on meta must not stop a plan
        saved, meter = 0, _Meter(set())
        notes = (f"{cls.name}: activations and FLOPs not measured ({type(error).__name__})",)
    # Counted after the probe: some detectors build their networks for the image size there.
    trainable, frozen = detector.param_counts()
    module_params = {
        name: sum(p.numel() for p in module.parameters())
        for name, module in detector.named_modules()
        if name and name.count(".") <= 1
    }
    return CostProfile(
        trainable_params=trainable,
        frozen_params=frozen,
        saved_bytes=saved,
        working_bytes=meter.working_bytes,
        forward_flops=meter.flops / batch_size,
        train_flops=(meter.flops + 2 * meter.grad_flops) / batch_size,
        forward_traffic=meter.traffic / batch_size,
        train_traffic=(meter.traffic + 2 * meter.grad_traffic) / batch_size,
        image_size=image_size,
        batch_size=batch_size,
        module_params=module_params,
        notes=notes,
    )
