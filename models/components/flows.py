"""Normalizing-flow building blocks shared by the flow detectors (CFlow, CS-Flow, FastFlow,
U-Flow) and EfficientAD-AST's flow teacher.

A normalizing flow maps features ``x`` to latents ``z = f(x)`` with a tractable Jacobian, and
trains ``f`` so that normal features land on a standard normal; the change of variables gives the
exact likelihood ``log p(x) = log N(z; 0, I) + log |det df/dx|``, and an anomaly is what gets a
low one (Rezende & Mohamed 2015; Dinh et al., "Density estimation using Real NVP", ICLR 2017).

:class:`AffineCoupling` is the affine coupling block (Dinh et al.; Kingma & Dhariwal, "Glow",
NeurIPS 2018) that all these detectors stack, in two forms:

- two-sided (CS-Flow's and AST's): a fixed seeded channel permutation, a split into two halves
  ``(a, b)``, then ``b <- b * exp(s(a)) + t(a)`` and ``a <- a * exp(s'(b)) + t'(b)``, where
  ``s, t`` (and ``s', t'``) come from a subnet of the other half, optionally concatenated with a
  condition; the log-scales soft-clamped to ``(-clamp, clamp)`` (``clamp * tanh(s / clamp)`` or
  CS-Flow's ``atan``) so that a few large values cannot blow the likelihood up;
- one-sided, FrEIA's ``AllInOneBlock`` (the block the reference implementations of FastFlow,
  CFlow and U-Flow stack, anomalib's included): the first ``ceil(C/2)`` channels ``x1`` stay,
  the subnet of ``x1`` (and the condition, CFlow's positional encoding) gives coefficients that
  are scaled by 0.1 as a whole ("for stability and easier initialization"), ``s = clamp *
  tanh(0.1 s_raw)``, ``t = 0.1 t_raw``, and ``x2 <- x2 * exp(s) + t``; with ``global_affine``
  a learned per-channel scale and offset follow, then the channel permutation.

The Jacobian is triangular and its log-determinant the sum of the clamped log-scales (plus the
global scales' logs, once per position).

Inputs are one tensor with channels on dim 1 (``B x C x H x W`` maps, ``B x C`` vectors) or a
list of such tensors (CS-Flow's multi-scale input, each scale split on its own channels and one
subnet seeing every scale at once).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AffineCoupling",
    "SequentialFlow",
    "gaussian_log_likelihood",
    "gaussian_nll",
    "positional_encoding_2d",
    "soft_clamp",
]

SubnetFactory = Callable[..., nn.Module]
"""``subnet(in_channels, out_channels) -> module``. For a single tensor both are ints and the
module maps ``B x in x ...`` to ``B x out x ...``; for the list form both are lists (one entry
per scale) and the module maps a list of tensors to a list of tensors. ``out`` is twice the
transformed half: the first half of the output channels are log-scales, the second shifts."""

FlowInput = Tensor | list[Tensor]
SoftClamp = Literal["tanh", "atan"]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def soft_clamp(s: Tensor, clamp: float, kind: SoftClamp = "tanh") -> Tensor:
    """Squash raw log-scales smoothly into ``(-clamp, clamp)``.

    ``"tanh"``: ``clamp * tanh(s / clamp)`` (FrEIA's and Glow-derived flows), the identity near
    0; ``"atan"``: ``clamp * (2 / pi) * atan(s / clamp)`` (CS-Flow), slope ``2 / pi`` near 0.
    ``clamp <= 0`` leaves ``s`` unclamped.
    """
    if clamp <= 0:
        return s
    if kind == "tanh":
        return clamp * torch.tanh(s / clamp)
    if kind == "atan":
        return clamp * (2.0 / math.pi) * torch.atan(s / clamp)
    raise ValueError(f"soft clamp must be 'tanh' or 'atan', got {kind!r}")


def _as_list(x: FlowInput) -> tuple[list[Tensor], bool]:
    if isinstance(x, Tensor):
        return [x], False
    return list(x), True


def _sum_but_batch(t: Tensor) -> Tensor:
    return t.flatten(1).sum(1) if t.ndim > 1 else t


class AffineCoupling(nn.Module):
    """A Glow-style affine coupling block: permute, then transform each half from the other.

    Args:
        channels: channels of the input, or one count per scale for the list form (each
            at least 2, as each is split in two).
        subnet: factory ``subnet(in_channels, out_channels)`` building the network that
            predicts log-scale and shift of one half from the other (see
            :data:`SubnetFactory`); called once per transformed half. Its modules are
            initialised from ``seed``, not from the global random state.
        clamp: bound of the soft-clamped log-scale: ``clamp * tanh(s / clamp)`` two-sided,
            ``clamp * tanh(0.1 s)`` one-sided (FrEIA's); 0 disables the clamp. FastFlow and
            U-Flow use 2.0, CFlow 1.9, CS-Flow 3.0.
        condition_channels: channels of the condition concatenated to the subnet's input at
            every step (e.g. CFlow's positional encoding); an int, or one per scale for the
            list form. 0 means unconditional.
        seed: seeds the channel permutation (a buffer) and the subnets' initialisation.
        soft_clamp: ``"tanh"`` or ``"atan"`` (CS-Flow's ``clamp * 2/pi * atan(s / clamp)``);
            one-sided blocks take only ``"tanh"`` (FrEIA's).
        permute: shuffle channels (so stacked blocks mix all channels): at the block's input
            two-sided, at its output one-sided (where ``AllInOneBlock`` does); False keeps the
            order.
        both_halves: transform both halves, each from the other (Glow's / Real NVP's
            two-step coupling, two subnets). False is FrEIA's ``AllInOneBlock`` coupling (see
            the module's docstring): one subnet, half the subnet parameters per block.
        global_affine: follow the coupling with a learned per-channel scale and offset, as
            ``AllInOneBlock`` does (its ``SOFTPLUS`` type: the scale is ``0.1 * softplus`` with
            beta 0.5 of a parameter, starting at 1); it lets every block rescale the channels
            the coupling leaves unchanged.

    ``forward(x, condition=None, reverse=False, per_position=False) -> (z, log_det)``. ``x`` is
    a tensor ``B x C x ...`` or a list of them; ``condition`` matches its form with
    ``condition_channels`` channels and the same trailing sizes. ``log_det`` is
    ``log |det dz/dx|`` per sample (``B``), or with ``per_position`` summed only over channels
    (``B x ...``; a list for the list form). ``reverse=True`` computes the inverse ``x`` from
    ``z`` and returns ``log |det dx/dz|`` (the negation of the forward one).
    """

    def __init__(
        self,
        channels: int | Sequence[int],
        subnet: SubnetFactory,
        clamp: float = 2.0,
        condition_channels: int | Sequence[int] = 0,
        seed: int = 0,
        soft_clamp: SoftClamp = "tanh",
        permute: bool = True,
        both_halves: bool = True,
        global_affine: bool = False,
    ) -> None:
        super().__init__()
        self.multi_scale = not isinstance(channels, int)
        channel_list = [int(c) for c in channels] if self.multi_scale else [int(channels)]
        if not channel_list or any(c < 2 for c in channel_list):
            raise ValueError(f"coupling needs at least 2 channels per input, got {channels!r}")
        if isinstance(condition_channels, int):
            condition_list = [condition_channels] * len(channel_list)
        else:
            condition_list = [int(c) for c in condition_channels]
        if len(condition_list) != len(channel_list) or any(c < 0 for c in condition_list):
            raise ValueError(
                f"condition_channels must be >= 0, one per input, got {condition_channels!r}"
            )
        if clamp < 0 or not math.isfinite(clamp):
            raise ValueError(f"clamp must be finite and >= 0, got {clamp!r}")
        if soft_clamp not in ("tanh", "atan"):
            raise ValueError(f"soft_clamp must be 'tanh' or 'atan', got {soft_clamp!r}")
        if not both_halves and soft_clamp != "tanh":
            raise ValueError("a one-sided (AllInOneBlock) coupling clamps with 'tanh' only")
        self.channels = channel_list
        self.condition_channels = condition_list
        self.clamp = float(clamp)
        self.soft_clamp = soft_clamp
        self.both_halves = both_halves
        # AllInOneBlock keeps the larger half (ceil) and transforms the smaller.
        self.split = [c // 2 if both_halves else c - c // 2 for c in channel_list]
        first = self.split
        second = [c - h for c, h in zip(channel_list, first, strict=True)]

        generator = torch.Generator().manual_seed(seed)
        for i, c in enumerate(channel_list):
            # Explicitly on the CPU, like the generator, so that blocks can also be built under
            # a ``torch.device("meta")`` context (to count parameters without allocating).
            order = (
                torch.randperm(c, generator=generator, device="cpu")
                if permute
                else torch.arange(c, device="cpu")
            )
            self.register_buffer(f"permutation{i}", order)
            self.register_buffer(f"inverse{i}", torch.argsort(order))
        init_seed = int(torch.randint(2**62, (1,), generator=generator, device="cpu"))

        def sizes(halves: list[int]) -> list[int]:
            return [h + k for h, k in zip(halves, condition_list, strict=True)]

        def unwrap(values: list[int]) -> int | list[int]:
            return values if self.multi_scale else values[0]

        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(init_seed)
            # subnet1 reads the first half and transforms the second; subnet2 the reverse.
            self.subnet1 = subnet(unwrap(sizes(first)), unwrap([2 * h for h in second]))
            self.subnet2 = (
                subnet(unwrap(sizes(second)), unwrap([2 * h for h in first]))
                if both_halves
                else None
            )
        if global_affine:
            # 0.1 * softplus_beta=0.5(start) = 1: the block starts without a global rescaling.
            start = 2.0 * math.log(math.expm1(5.0))
            self.global_scale = nn.ParameterList(
                nn.Parameter(torch.full((c,), start)) for c in channel_list
            )
            self.global_offset = nn.ParameterList(
                nn.Parameter(torch.zeros(c)) for c in channel_list
            )
        else:
            self.global_scale = self.global_offset = None

    def _permutation(self, i: int, inverse: bool = False) -> Tensor:
        return getattr(self, f"inverse{i}" if inverse else f"permutation{i}")

    def _params(
        self, net: nn.Module, inputs: list[Tensor], conditions: list[Tensor] | None
    ) -> list[tuple[Tensor, Tensor]]:
        if conditions is not None:
            inputs = [torch.cat([x, c], dim=1) for x, c in zip(inputs, conditions, strict=True)]
        out = net(inputs if self.multi_scale else inputs[0])
        outs = list(out) if self.multi_scale else [out]
        params = []
        for o in outs:
            if self.both_halves:
                s, t = o.chunk(2, dim=1)
                params.append((soft_clamp(s, self.clamp, self.soft_clamp), t))
            else:
                # AllInOneBlock's scaling of the whole coefficient tensor, then its clamp.
                s, t = (0.1 * o).chunk(2, dim=1)
                params.append((self.clamp * torch.tanh(s) if self.clamp > 0 else s, t))
        return params

    def _couple(
        self,
        net: nn.Module,
        source: list[Tensor],
        target: list[Tensor],
        conditions: list[Tensor] | None,
        reverse: bool,
    ) -> tuple[list[Tensor], list[Tensor]]:
        # Affine transform of ``target`` from ``source``; returns it and its per-position
        # log-determinant (summed over channels).
        params = self._params(net, source, conditions)
        if reverse:
            out = [(y - t) * torch.exp(-s) for y, (s, t) in zip(target, params, strict=True)]
            return out, [-s.sum(1) for s, _ in params]
        out = [y * torch.exp(s) + t for y, (s, t) in zip(target, params, strict=True)]
        return out, [s.sum(1) for s, _ in params]

    def _global(self, xs: list[Tensor], reverse: bool) -> tuple[list[Tensor], list[Tensor]]:
        out, log_dets = [], []
        for x, raw, offset in zip(xs, self.global_scale, self.global_offset, strict=True):
            shape = (1, -1) + (1,) * (x.ndim - 2)
            scale = 0.1 * F.softplus(raw, beta=0.5)
            log_scale = scale.log().sum()
            if reverse:
                out.append((x - offset.view(shape)) / scale.view(shape))
                log_scale = -log_scale
            else:
                out.append(x * scale.view(shape) + offset.view(shape))
            log_dets.append(log_scale.expand(x[:, 0].shape))
        return out, log_dets

    def forward(
        self,
        x: FlowInput,
        condition: FlowInput | None = None,
        reverse: bool = False,
        per_position: bool = False,
    ) -> tuple[FlowInput, Tensor | list[Tensor]]:
        """Transform ``x`` (or invert with ``reverse``); return ``(output, log_det)``."""
        xs, is_list = _as_list(x)
        if is_list != self.multi_scale or len(xs) != len(self.channels):
            raise ValueError(
                f"coupling built for {'a list of ' if self.multi_scale else ''}"
                f"{self.channels} channels, got "
                f"{[t.shape[1] for t in xs] if is_list else tuple(xs[0].shape)}"
            )
        conditions = None
        if condition is not None:
            conditions, _ = _as_list(condition)
            if len(conditions) != len(xs):
                raise ValueError(f"one condition per input needed, got {len(conditions)}")
        elif any(self.condition_channels):
            raise ValueError(f"coupling expects a condition of {self.condition_channels} channels")

        parts: list[list[Tensor]] = []  # per-position log-dets of each step
        # Two-sided blocks permute at their input, one-sided ones at their output.
        permute_first = self.both_halves
        if not reverse and permute_first:
            xs = [t.index_select(1, self._permutation(i)) for i, t in enumerate(xs)]
        if reverse and not permute_first:
            xs = [t.index_select(1, self._permutation(i, True)) for i, t in enumerate(xs)]
        if reverse and self.global_scale is not None:
            xs, log_det = self._global(xs, reverse=True)
            parts.append(log_det)
        a = [t[:, :h] for t, h in zip(xs, self.split, strict=True)]
        b = [t[:, h:] for t, h in zip(xs, self.split, strict=True)]
        if not reverse:
            b, log_det = self._couple(self.subnet1, a, b, conditions, reverse=False)
            parts.append(log_det)
            if self.subnet2 is not None:
                a, log_det = self._couple(self.subnet2, b, a, conditions, reverse=False)
                parts.append(log_det)
        else:
            if self.subnet2 is not None:
                a, log_det = self._couple(self.subnet2, b, a, conditions, reverse=True)
                parts.append(log_det)
            b, log_det = self._couple(self.subnet1, a, b, conditions, reverse=True)
            parts.append(log_det)
        out = [torch.cat([ai, bi], dim=1) for ai, bi in zip(a, b, strict=True)]
        if not reverse and self.global_scale is not None:
            out, log_det = self._global(out, reverse=False)
            parts.append(log_det)
        if not reverse and not permute_first:
            out = [t.index_select(1, self._permutation(i)) for i, t in enumerate(out)]
        if reverse and permute_first:
            out = [t.index_select(1, self._permutation(i, True)) for i, t in enumerate(out)]

        per_scale = [
            sum(scale_parts[1:], scale_parts[0]) for scale_parts in zip(*parts, strict=True)
        ]
        log_dets: Tensor | list[Tensor]
        if per_position:
            log_dets = per_scale if self.multi_scale else per_scale[0]
        else:
            log_dets = torch.stack([_sum_but_batch(d) for d in per_scale]).sum(0)
        return (out if self.multi_scale else out[0]), log_dets

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels if self.multi_scale else self.channels[0]}, "
            f"clamp={self.clamp}, condition_channels={self.condition_channels}, "
            f"both_halves={self.both_halves}, global_affine={self.global_scale is not None}"
        )


class SequentialFlow(nn.Module):
    """A stack of invertible blocks; the log-determinants of the blocks add up.

    Args:
        blocks: the blocks, applied in order (each ``block(x, condition, reverse,
            per_position) -> (x, log_det)``, e.g. :class:`AffineCoupling`).
    """

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(
        self,
        x: FlowInput,
        condition: FlowInput | None = None,
        reverse: bool = False,
        per_position: bool = False,
    ) -> tuple[FlowInput, Tensor | list[Tensor]]:
        """Run every block (in reverse order, inverted, with ``reverse``); return ``(z, log_det)``.

        ``log_det`` is per sample (``B``), or per position (``B x ...``, a list for the list
        form) with ``per_position``.
        """
        total: Tensor | list[Tensor] | None = None
        for block in reversed(self.blocks) if reverse else self.blocks:
            x, log_det = block(x, condition, reverse=reverse, per_position=per_position)
            if total is None:
                total = log_det
            elif isinstance(total, list):
                total = [t + d for t, d in zip(total, log_det, strict=True)]
            else:
                total = total + log_det
        if total is None:
            xs, is_list = _as_list(x)
            zeros = [torch.zeros_like(t[:, 0]) for t in xs]
            if per_position:
                total = zeros if is_list else zeros[0]
            else:
                total = xs[0].new_zeros(xs[0].shape[0])
        return x, total


def gaussian_log_likelihood(
    z: FlowInput, log_det: Tensor | list[Tensor], include_constant: bool = True
) -> Tensor | list[Tensor]:
    """``log p(x) = log N(z; 0, I) + log |det dz/dx|``, summed over channels (dim 1).

    With a per-position ``log_det`` (``B x ...``) the result is per position (``B x ...``, the
    per-pixel likelihood of CFlow and FastFlow); with a per-sample one (``B``) it is per
    sample, summed over every dimension. Lists (multi-scale) give a list for per-position
    log-dets and one ``B`` tensor otherwise. ``include_constant`` adds ``-C/2 log 2 pi`` per
    term; the training losses of the papers drop it.
    """
    zs, is_list = _as_list(z)
    per_position = isinstance(log_det, list) or (
        isinstance(log_det, Tensor) and log_det.ndim == zs[0].ndim - 1 and log_det.ndim > 1
    )

    def log_normal(t: Tensor) -> Tensor:
        value = -0.5 * t.square().sum(1)
        if include_constant:
            value = value - t.shape[1] * _HALF_LOG_2PI
        return value

    if per_position:
        dets = log_det if isinstance(log_det, list) else [log_det]
        out = [log_normal(t) + d for t, d in zip(zs, dets, strict=True)]
        return out if is_list else out[0]
    total = torch.stack([_sum_but_batch(log_normal(t)) for t in zs]).sum(0)
    return total + log_det


def gaussian_nll(z: FlowInput, log_det: Tensor, per_dimension: bool = False) -> Tensor:
    """Mean over the batch of the negative log-likelihood ``0.5 |z|^2 - log |det|`` per sample.

    ``log_det`` is per sample (``B``). The constant ``D/2 log 2 pi`` is dropped, as the flow
    papers' losses do; ``per_dimension`` divides by the number of dimensions ``D`` of a sample
    (every scale together for lists), which keeps the loss's scale independent of the feature
    size (CS-Flow's normalisation).
    """
    zs, _ = _as_list(z)
    if log_det.ndim != 1:
        raise ValueError(f"gaussian_nll needs a per-sample (B) log_det, got {tuple(log_det.shape)}")
    nll = torch.stack([0.5 * t.flatten(1).square().sum(1) for t in zs]).sum(0) - log_det
    if per_dimension:
        nll = nll / sum(t[0].numel() for t in zs)
    return nll.mean()


def positional_encoding_2d(channels: int, height: int, width: int) -> Tensor:
    """A ``channels x height x width`` sinusoidal 2-D positional encoding (``channels % 4 == 0``).

    The first half of the channels encodes the column, the second the row, each as
    interleaved sines and cosines of geometrically spaced frequencies (Vaswani et al. 2017,
    extended to 2-D as CFLOW-AD does). Returned on the CPU in float32.
    """
    if channels <= 0 or channels % 4:
        raise ValueError(
            f"positional encoding needs a positive multiple of 4 channels, got {channels}"
        )
    if height < 1 or width < 1:
        raise ValueError(f"positional encoding needs a positive size, got {height}x{width}")
    half = channels // 2
    cpu = {"dtype": torch.float64, "device": "cpu"}  # whatever the default device: callers move it
    frequencies = torch.exp(torch.arange(0, half, 2, **cpu) * -(math.log(10000.0) / half))
    columns = torch.arange(width, **cpu)[:, None] * frequencies  # W x half/2
    rows = torch.arange(height, **cpu)[:, None] * frequencies  # H x half/2
    encoding = torch.zeros(channels, height, width, **cpu)
    encoding[0:half:2] = torch.sin(columns).T[:, None, :].expand(-1, height, -1)
    encoding[1:half:2] = torch.cos(columns).T[:, None, :].expand(-1, height, -1)
    encoding[half::2] = torch.sin(rows).T[:, :, None].expand(-1, -1, width)
    encoding[half + 1 :: 2] = torch.cos(rows).T[:, :, None].expand(-1, -1, width)
    return encoding.float()
