"""The shared normalizing-flow blocks: invertibility, exact log-determinants, list form."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.components.flows import (
    AffineCoupling,
    SequentialFlow,
    gaussian_log_likelihood,
    gaussian_nll,
    positional_encoding_2d,
    soft_clamp,
)


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Test inputs from a seeded generator, so tests neither vary nor touch the global RNG."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def conv_subnet(in_channels: int, out_channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, out_channels, 1)
    )


def linear_subnet(in_channels: int, out_channels: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_channels, 16), nn.Tanh(), nn.Linear(16, out_channels))


class ScaledLinear(nn.Module):
    """A linear subnet whose outputs are multiplied by ``gain`` (to push log-scales far out)."""

    def __init__(self, in_channels: int, out_channels: int, gain: float) -> None:
        super().__init__()
        self.linear = nn.Linear(in_channels, out_channels)
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * self.linear(x)


class ListSubnet(nn.Module):
    """A multi-scale subnet: each scale sees itself plus the resized other scales (as CS-Flow)."""

    def __init__(self, in_channels: list[int], out_channels: list[int]) -> None:
        super().__init__()
        total = sum(in_channels)
        self.convs = nn.ModuleList(nn.Conv2d(total, c, 3, padding=1) for c in out_channels)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        outs = []
        for i, conv in enumerate(self.convs):
            size = xs[i].shape[-2:]
            mixed = [
                nn.functional.interpolate(x, size=size) if j != i else x for j, x in enumerate(xs)
            ]
            outs.append(conv(torch.cat(mixed, dim=1)))
        return outs


def conditional_flow(seed: int = 0) -> SequentialFlow:
    return SequentialFlow(
        [
            AffineCoupling(5, linear_subnet, clamp=1.9, condition_channels=4, seed=seed + i)
            for i in range(3)
        ]
    )


def test_maps_round_trip_exactly():
    flow = SequentialFlow([AffineCoupling(6, conv_subnet, seed=i) for i in range(4)]).double()
    x = randn(2, 6, 5, 7, dtype=torch.float64)
    z, log_det = flow(x)
    back, inverse_log_det = flow(z, reverse=True)
    assert z.shape == x.shape and log_det.shape == (2,)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-10)
    torch.testing.assert_close(inverse_log_det, -log_det)
    # The flow actually transforms its input (subnets are not initialised to the identity).
    assert (z - x).abs().max() > 0.1


def test_conditional_vectors_round_trip_and_depend_on_the_condition():
    flow = conditional_flow().double()
    x = randn(3, 5, dtype=torch.float64)
    condition = randn(3, 4, dtype=torch.float64, seed=1)
    z, _ = flow(x, condition)
    back, _ = flow(z, condition, reverse=True)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-10)
    other, _ = flow(x, condition + 1.0)
    assert (other - z).abs().max() > 1e-3
    with pytest.raises(ValueError, match="condition"):
        flow(x)


def _brute_force_log_det(fn, x: torch.Tensor) -> torch.Tensor:
    """log |det| of the full Jacobian of ``fn`` at each sample of ``x`` (one sample at a time)."""
    values = []
    for sample in x:
        jacobian = torch.autograd.functional.jacobian(
            lambda s: fn(s[None])[0].flatten(), sample
        ).reshape(sample.numel(), sample.numel())
        values.append(torch.linalg.slogdet(jacobian).logabsdet)
    return torch.stack(values)


def test_log_det_matches_the_brute_force_jacobian():
    flow = SequentialFlow([AffineCoupling(4, conv_subnet, clamp=2.0, seed=i) for i in range(3)])
    flow = flow.double()
    x = randn(2, 4, 3, 3, dtype=torch.float64)
    _, log_det = flow(x)
    expected = _brute_force_log_det(lambda t: flow(t)[0], x)
    torch.testing.assert_close(log_det, expected, rtol=1e-8, atol=1e-8)


def test_conditional_log_det_matches_the_brute_force_jacobian():
    flow = conditional_flow(seed=7).double()
    x = randn(3, 5, dtype=torch.float64)
    condition = randn(3, 4, dtype=torch.float64, seed=1)
    _, log_det = flow(x, condition)
    expected = torch.stack(
        [
            _brute_force_log_det(lambda t, c=c: flow(t, c[None])[0], x[i : i + 1])[0]
            for i, c in enumerate(condition)
        ]
    )
    torch.testing.assert_close(log_det, expected, rtol=1e-8, atol=1e-8)


def test_per_position_log_det_sums_to_the_per_sample_one():
    flow = SequentialFlow([AffineCoupling(6, conv_subnet, seed=i) for i in range(2)]).double()
    x = randn(2, 6, 4, 5, dtype=torch.float64)
    z, per_sample = flow(x)
    z2, per_position = flow(x, per_position=True)
    assert per_position.shape == (2, 4, 5)
    torch.testing.assert_close(z2, z)
    torch.testing.assert_close(per_position.sum((1, 2)), per_sample)
    # Per-position likelihoods add up to the sample's likelihood as well.
    per_pixel = gaussian_log_likelihood(z, per_position)
    torch.testing.assert_close(per_pixel.sum((1, 2)), gaussian_log_likelihood(z, per_sample))


def test_list_form_round_trips_with_exact_log_det():
    channels = [4, 6]
    flow = SequentialFlow(
        [
            AffineCoupling(channels, ListSubnet, clamp=3.0, soft_clamp="atan", seed=i)
            for i in range(2)
        ]
    ).double()
    xs = [
        randn(2, 4, 4, 4, dtype=torch.float64),
        randn(2, 6, 2, 2, dtype=torch.float64, seed=1),
    ]
    zs, log_det = flow(xs)
    assert [z.shape for z in zs] == [x.shape for x in xs] and log_det.shape == (2,)
    back, _ = flow(zs, reverse=True)
    for b, x in zip(back, xs, strict=True):
        torch.testing.assert_close(b, x, rtol=0, atol=1e-10)
    _, per_position = flow(xs, per_position=True)
    assert [p.shape for p in per_position] == [(2, 4, 4), (2, 2, 2)]
    torch.testing.assert_close(sum(p.sum((1, 2)) for p in per_position), log_det)

    def flat(t: torch.Tensor) -> torch.Tensor:
        parts = flow([t[:, :64].reshape(-1, 4, 4, 4), t[:, 64:].reshape(-1, 6, 2, 2)])[0]
        return torch.cat([p.flatten(1) for p in parts], dim=1)

    joined = torch.cat([x.flatten(1) for x in xs], dim=1)
    torch.testing.assert_close(log_det, _brute_force_log_det(flat, joined), rtol=1e-8, atol=1e-8)
    # The scales interact: changing the coarse one changes the fine one's output.
    changed, _ = flow([xs[0], xs[1] + 1.0])
    assert (changed[0] - zs[0]).abs().max() > 1e-3


def test_same_seed_same_block_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    a = AffineCoupling(16, conv_subnet, seed=3)
    b = AffineCoupling(16, conv_subnet, seed=3)
    c = AffineCoupling(16, conv_subnet, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.permutation0, b.permutation0)
    assert not torch.equal(a.permutation0, c.permutation0)
    assert sorted(a.permutation0.tolist()) == list(range(16))
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    x = randn(2, 16, 3, 3)
    assert torch.equal(a(x)[0], b(x)[0])
    assert not torch.allclose(a(x)[0], c(x)[0])
    # The permutation is a buffer: it travels with the state dict.
    assert "permutation0" in a.state_dict()


def test_clamp_bounds_the_log_scale():
    clamp = 1.5
    block = AffineCoupling(
        4, lambda i, o: ScaledLinear(i, o, gain=1e3), clamp=clamp, permute=False, seed=0
    )
    x = randn(64, 4) * 10
    _, per_sample = block(x)
    # Two halves of two channels each are scaled per block: |log det| <= 4 * clamp, and the
    # huge raw scales saturate at the bound.
    assert per_sample.abs().max() <= 4 * clamp
    assert per_sample.abs().max() >= 3 * clamp
    unclamped = AffineCoupling(
        4, lambda i, o: ScaledLinear(i, o, gain=1e3), clamp=0.0, permute=False, seed=0
    )
    # Without the clamp the same subnet's scales explode (to inf and nan in float32).
    assert not (unclamped(x)[1].abs() <= 100).all()
    s = torch.linspace(-1e4, 1e4, 101)
    for kind in ("tanh", "atan"):
        clamped = soft_clamp(s, clamp, kind)
        assert clamped.abs().max() <= clamp
    # Near zero the tanh clamp is the identity, so it does not distort small scales; CS-Flow's
    # atan one has slope 2 / pi there.
    small = torch.tensor([1e-4])
    torch.testing.assert_close(soft_clamp(small, clamp, "tanh"), small)
    torch.testing.assert_close(soft_clamp(small, clamp, "atan"), small * 2 / math.pi)


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="at least 2 channels"):
        AffineCoupling(1, conv_subnet)
    with pytest.raises(ValueError, match="clamp"):
        AffineCoupling(4, conv_subnet, clamp=-1.0)
    with pytest.raises(ValueError, match="soft_clamp"):
        AffineCoupling(4, conv_subnet, soft_clamp="sigmoid")
    block = AffineCoupling(4, conv_subnet)
    with pytest.raises(ValueError, match="channels"):
        block([randn(1, 4, 2, 2)])
    with pytest.raises(ValueError, match="multiple of 4"):
        positional_encoding_2d(6, 3, 3)


def test_gaussian_nll_is_the_negative_mean_log_likelihood():
    z = randn(3, 2, 4, 4, dtype=torch.float64)
    log_det = randn(3, dtype=torch.float64, seed=1)
    expected = -gaussian_log_likelihood(z, log_det, include_constant=False).mean()
    torch.testing.assert_close(gaussian_nll(z, log_det), expected)
    torch.testing.assert_close(gaussian_nll(z, log_det, per_dimension=True), expected / 32)
    # With the constant, the likelihood of z = 0 and no volume change is the normal's density.
    zero = torch.zeros(1, 3)
    value = gaussian_log_likelihood(zero, torch.zeros(1))
    torch.testing.assert_close(value, torch.tensor([-1.5 * math.log(2 * math.pi)]))


def test_training_a_flow_lowers_the_nll():
    # A flow must learn to map a skewed 2-D distribution towards the standard normal.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, generator=generator) * torch.tensor([3.0, 0.3]) + 2.0
    flow = SequentialFlow([AffineCoupling(2, linear_subnet, seed=i) for i in range(4)])
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    losses = []
    for _ in range(100):
        z, log_det = flow(x)
        loss = gaussian_nll(z, log_det)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 1.0


def test_positional_encoding():
    encoding = positional_encoding_2d(8, 3, 5)
    assert encoding.shape == (8, 3, 5)
    # Columns in the first half (constant down a column), rows in the second.
    assert torch.equal(encoding[:4, 0], encoding[:4, 2])
    assert torch.equal(encoding[4:, :, 0], encoding[4:, :, 4])
    torch.testing.assert_close(encoding[0, 0], torch.sin(torch.arange(5.0)))
    torch.testing.assert_close(encoding[1, 0], torch.cos(torch.arange(5.0)))
    torch.testing.assert_close(encoding[5, :, 0], torch.cos(torch.arange(3.0)))
    # Every position gets a distinct code.
    codes = encoding.flatten(1).T
    assert torch.cdist(codes, codes).add(torch.eye(15) * 10).min() > 1e-3


def test_one_sided_blocks_with_global_affine_are_exact():
    # FrEIA AllInOneBlock's structure: one subnet per block, then a learned channel rescaling.
    flow = SequentialFlow(
        [
            AffineCoupling(4, conv_subnet, both_halves=False, global_affine=True, seed=i)
            for i in range(3)
        ]
    ).double()
    with torch.no_grad():  # move the global affine away from its identity start
        for block in flow.blocks:
            block.global_scale[0].copy_(randn(4, dtype=torch.float64, seed=5))
            block.global_offset[0].copy_(randn(4, dtype=torch.float64, seed=6))
    x = randn(2, 4, 3, 3, dtype=torch.float64)
    z, log_det = flow(x)
    back, inverse_log_det = flow(z, reverse=True)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-10)
    torch.testing.assert_close(inverse_log_det, -log_det)
    expected = _brute_force_log_det(lambda t: flow(t)[0], x)
    torch.testing.assert_close(log_det, expected, rtol=1e-8, atol=1e-8)
    _, per_position = flow(x, per_position=True)
    torch.testing.assert_close(per_position.sum((1, 2)), log_det)
    # One subnet instead of two, plus 2 x C global parameters.
    one = AffineCoupling(8, conv_subnet, both_halves=False, global_affine=True)
    two = AffineCoupling(8, conv_subnet)
    n_one = sum(p.numel() for p in one.parameters())
    n_two = sum(p.numel() for p in two.parameters())
    assert n_one == n_two // 2 + 16


def _all_in_one_by_hand(block, x, condition, clamp):
    """FrEIA's ``AllInOneBlock`` (hard permutation, SOFTPLUS global affine, no GIN: what the
    reference FastFlow, CFlow and U-Flow build), written out around ``block``'s own subnet."""
    channels = x.shape[1]
    passive = channels - channels // 2
    x1, x2 = x[:, :passive], x[:, passive:]
    a = 0.1 * block.subnet1(torch.cat([x1, condition], dim=1))
    s = clamp * torch.tanh(a[:, : channels // 2])
    u = torch.cat([x1, x2 * torch.exp(s) + a[:, channels // 2 :]], dim=1)
    raw = block.global_scale[0].view(1, -1, 1, 1)
    scale = 0.1 * 2.0 * torch.log1p(torch.exp(raw / 2.0))  # 0.1 x softplus with beta 0.5
    v = u * scale + block.global_offset[0].view(1, -1, 1, 1)
    # FrEIA permutes after the block: output channel i is channel perm[i] of v.
    y = v[:, block.permutation0]
    positions = x[0, 0].numel()
    log_det = s.sum((1, 2, 3)) + positions * torch.log(scale).sum()
    return y, log_det


def test_one_sided_block_is_freia_all_in_one_block():
    clamp = 1.9
    block = AffineCoupling(
        5,
        conv_subnet,
        clamp=clamp,
        condition_channels=2,
        seed=3,
        both_halves=False,
        global_affine=True,
    ).double()
    # The global scale starts at exactly 1 (FrEIA's ``global_affine_init``).
    torch.testing.assert_close(
        0.2 * torch.log1p(torch.exp(block.global_scale[0] / 2)), torch.ones(5, dtype=torch.float64)
    )
    with torch.no_grad():
        block.global_scale[0].add_(randn(5, dtype=torch.float64, seed=5))
        block.global_offset[0].copy_(randn(5, dtype=torch.float64, seed=6))
        # Coefficients large enough that the clamp and the 0.1 both matter.
        for module in block.subnet1:
            if isinstance(module, nn.Conv2d):
                module.weight.mul_(8.0)
    x = randn(2, 5, 3, 4, dtype=torch.float64)
    condition = randn(2, 2, 3, 4, dtype=torch.float64, seed=1)
    y, log_det = block(x, condition)
    expected_y, expected_log_det = _all_in_one_by_hand(block, x, condition, clamp)
    torch.testing.assert_close(y, expected_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(log_det, expected_log_det, rtol=1e-12, atol=1e-12)
    back, inverse_log_det = block(y, condition, reverse=True)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-10)
    torch.testing.assert_close(inverse_log_det, -log_det)
