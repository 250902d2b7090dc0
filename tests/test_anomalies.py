"""Tests of the synthetic anomaly generators in ``data.anomalies``."""

from __future__ import annotations

import math
import pickle

import cv2
import numpy as np
import pytest
import torch

from data.anomalies import (
    SYNTHETIC_KINDS,
    CutPaste,
    LocalWarp,
    PerlinBlend,
    perlin_mask,
    perlin_noise,
    synthesize,
)
from data.errors import DatasetError


def _textured(n: int = 6, height: int = 48, width: int = 64, seed: int = 0) -> torch.Tensor:
    """Colourful structured images in [0, 1]: every pixel differs from its neighbours, so any
    change an anomaly makes is visible."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(
        torch.arange(height, dtype=torch.float32),
        torch.arange(width, dtype=torch.float32),
        indexing="ij",
    )
    images = []
    for _ in range(n):
        f = 0.2 + 0.5 * torch.rand(3, 2, generator=g)
        phase = 6.3 * torch.rand(3, generator=g)
        waves = [
            0.5 + 0.35 * torch.sin(f[c, 0] * xx + phase[c]) * torch.cos(f[c, 1] * yy)
            for c in range(3)
        ]
        images.append(torch.stack(waves) + 0.05 * torch.rand(3, height, width, generator=g))
    return torch.stack(images).clamp(0, 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


GENERATORS = {
    "perlin": lambda: PerlinBlend(),
    "cutpaste": lambda: CutPaste(),
    "cutpaste_scar": lambda: CutPaste(scar=True),
    "warp": lambda: LocalWarp(),
}


def test_kinds_cover_every_generator():
    assert set(SYNTHETIC_KINDS) == set(GENERATORS)


# ----------------------------------------------------------------------------- Perlin noise


def test_perlin_noise_is_smooth_gradient_noise():
    noise = perlin_noise(64, 96, (4, 6), generator=_gen(0))
    assert noise.shape == (64, 96) and noise.dtype == torch.float32
    assert noise.abs().max() <= 1.0 + 1e-6 and noise.std() > 0.1
    # Gradient noise vanishes on the lattice: every 16th row and column here.
    assert noise[::16, ::16].abs().max() < 1e-6
    # Smooth: neighbouring pixels differ by far less than the noise's range.
    assert (noise[1:] - noise[:-1]).abs().max() < 0.25
    assert (noise[:, 1:] - noise[:, :-1]).abs().max() < 0.25
    assert torch.equal(noise, perlin_noise(64, 96, (4, 6), generator=_gen(0)))
    assert not torch.equal(noise, perlin_noise(64, 96, (4, 6), generator=_gen(1)))


def test_perlin_masks_are_never_empty():
    sizes = set()
    for seed in range(40):
        # max_scale=1 leaves only one lattice cell, whose noise often stays below 0.5.
        for max_scale in (1, 6):
            mask = perlin_mask(32, 40, generator=_gen(seed), max_scale=max_scale)
            assert mask.dtype == torch.bool and mask.shape == (32, 40)
            assert mask.any()
            sizes.add(int(mask.sum()))
    assert len(sizes) > 20  # random shapes, not a fixed fallback
    assert torch.equal(perlin_mask(32, 32, generator=_gen(3)), perlin_mask(32, 32, generator=3))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_scale": -1}, "min_scale"),
        ({"min_scale": 3, "max_scale": 3}, "max_scale"),
        ({"threshold": 1.5}, "threshold"),
    ],
)
def test_perlin_mask_bad_arguments(kwargs, match):
    with pytest.raises(DatasetError, match=match):
        perlin_mask(16, 16, generator=_gen(0), **kwargs)


# ----------------------------------------------------------------------------- every generator


@pytest.mark.parametrize("kind", SYNTHETIC_KINDS)
def test_masks_binary_non_empty_and_shapes_kept(kind):
    images = _textured(6)
    out, masks = synthesize(images, kind, seed=0)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.device == images.device and masks.device == images.device
    assert masks.shape == (6, 1, 48, 64) and masks.dtype == images.dtype
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert (masks.flatten(1).sum(1) > 0).all()
    assert out.min() >= 0 and out.max() <= 1
    # The anomaly changed the image where its mask is.
    for i in range(6):
        assert (out[i] != images[i])[:, masks[i, 0] > 0].any()
    # The input is left alone.
    assert torch.equal(images, _textured(6))


@pytest.mark.parametrize("kind", SYNTHETIC_KINDS)
def test_same_seed_same_output_and_global_rng_untouched(kind):
    images = _textured(4)
    torch.manual_seed(1234)
    np.random.seed(1234)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    first = synthesize(images, kind, seed=7)
    second = synthesize(images, kind, seed=7)
    other = synthesize(images, kind, seed=8)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], other[1])
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.random.get_state()[1].tolist() == numpy_state[1].tolist()


@pytest.mark.parametrize("kind", SYNTHETIC_KINDS)
def test_double_precision_kept(kind):
    out, masks = synthesize(_textured(2).double(), kind, seed=0)
    assert out.dtype == torch.float64 and masks.dtype == torch.float64
    assert (masks.flatten(1).sum(1) > 0).all()


@pytest.mark.parametrize("kind", ["perlin", "cutpaste", "cutpaste_scar"])
def test_outside_the_mask_bit_identical(kind):
    images = _textured(8)
    out, masks = synthesize(images, kind, seed=3)
    outside = (masks == 0).expand_as(images)
    assert torch.equal(out[outside], images[outside])


def test_a_generator_is_a_stream():
    # Successive calls with one generator give new anomalies; a fresh one repeats them.
    images = _textured(2)
    g = _gen(5)
    blend = PerlinBlend()
    first, second = blend(images, g)[1], blend(images, g)[1]
    assert not torch.equal(first, second)
    assert torch.equal(blend(images, _gen(5))[1], first)


# ----------------------------------------------------------------------------- PerlinBlend


def test_perlin_blend_probability():
    images = _textured(16)
    out, masks = PerlinBlend()(images, _gen(0), probability=0.5)
    anomalous = masks.flatten(1).sum(1) > 0
    assert 0 < int(anomalous.sum()) < 16
    assert torch.equal(out[~anomalous], images[~anomalous])
    out, masks = PerlinBlend()(images, _gen(0), probability=0.0)
    assert torch.equal(out, images) and not masks.any()


def test_perlin_blend_beta_is_the_opacity():
    images = _textured(6)
    # beta = 0: the source is invisible although the mask is drawn.
    out, masks = PerlinBlend(beta=0.0)(images, _gen(1))
    assert torch.equal(out, images) and (masks.flatten(1).sum(1) > 0).all()
    # The opacity scales the change: half the opacity, half the change (same draws).
    full, masks = PerlinBlend(beta=1.0)(images, _gen(1))
    half, _ = PerlinBlend(beta=0.5)(images, _gen(1))
    inside = (masks > 0).expand_as(images)
    assert ((half - images)[inside] - 0.5 * (full - images)[inside]).abs().max() < 1e-5
    assert (full - images)[inside].abs().mean() > 0.05


def _write_textures(folder, colours):
    folder.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(colours):
        image = np.zeros((20 + 7 * i, 30, 3), np.uint8)
        image[:] = colour[::-1]  # BGR on disk
        assert cv2.imwrite(str(folder / f"texture_{i}.png"), image)


def test_perlin_blend_uses_the_texture_folder(tmp_path):
    # Flat textures stay flat under every DRAEM augmentation, so at full opacity every
    # anomaly is one flat colour: it came from the folder. Generated sources never are.
    _write_textures(tmp_path / "a", [(200, 30, 30)])
    _write_textures(tmp_path / "b" / "nested", [(20, 180, 90), (90, 90, 250)])
    blend = PerlinBlend(tmp_path, beta=1.0)
    assert len(blend.textures) == 3
    images = _textured(6)
    out, masks = blend(images, _gen(0))
    generated, generated_masks = PerlinBlend(beta=1.0)(images, _gen(0))
    for i in range(6):
        inside = masks[i, 0] > 0
        assert out[i][:, inside].std(dim=1).max() < 1e-4
        inside = generated_masks[i, 0] > 0
        if inside.sum() > 20:
            assert generated[i][:, inside].std(dim=1).max() > 1e-3
    # Cached, and the cache does not travel with a pickled generator.
    assert blend._cache
    clone = pickle.loads(pickle.dumps(blend))
    assert not clone._cache and clone.textures == blend.textures
    assert torch.equal(clone(images, _gen(0))[0], out)
    # synthesize passes the folder on.
    by_name = synthesize(images, "perlin", seed=4, texture_dir=tmp_path)[0]
    assert torch.equal(by_name, PerlinBlend(tmp_path)(images, _gen(4))[0])


def test_texture_folder_errors(tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(DatasetError, match=r"no_such_folder: texture folder not found"):
        PerlinBlend(missing)
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="holds no images"):
        PerlinBlend(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    blend = PerlinBlend(tmp_path)
    with pytest.raises(DatasetError, match=r"broken\.png"):
        blend(_textured(1), _gen(0))


# ----------------------------------------------------------------------------- CutPaste


def test_cutpaste_pastes_a_rectangle_cut_from_the_image():
    images = _textured(4, 40, 40)
    out, masks = CutPaste(jitter=0.0)(images, _gen(2))
    for i in range(4):
        rows = masks[i, 0].any(dim=1).nonzero()[:, 0]
        cols = masks[i, 0].any(dim=0).nonzero()[:, 0]
        top, left = int(rows[0]), int(cols[0])
        h, w = len(rows), len(cols)
        assert int(masks[i].sum()) == h * w  # a filled, axis-aligned rectangle
        assert 0.015 <= h * w / (40 * 40) <= 0.16
        assert 0.3 / 1.5 <= w / h <= 3.3 * 1.5
        patch = out[i, :, top : top + h, left : left + w]
        # Without jitter the patch is an exact copy of some rectangle of the original.
        windows = images[i].unfold(1, h, 1).unfold(2, w, 1)  # 3 x nh x nw x h x w
        same = (windows == patch[:, None, None]).flatten(3).all(dim=3).all(dim=0)
        assert same.any()


def test_cutpaste_scars_are_thin_rotated_and_scale_with_the_image():
    images = _textured(12, 128, 128)
    _, masks = CutPaste(scar=True)(images, _gen(0))
    counts = masks.flatten(1).sum(1)
    # (2..16) x (10..25) px at 256 px is (1..8) x (5..13) px at 128 px.
    assert (counts >= 4).all() and (counts <= 8 * 13 * 1.3).all()
    rotated = 0
    for mask in masks[:, 0] > 0:
        rows = mask.any(dim=1).nonzero()[:, 0]
        cols = mask.any(dim=0).nonzero()[:, 0]
        rotated += int(mask.sum()) < len(rows) * len(cols)
    assert rotated >= 6
    _, big = CutPaste(scar=True)(_textured(12, 256, 256), _gen(0))
    assert big.flatten(1).sum(1).mean() > 2.5 * counts.mean()


def test_cutpaste_jitter_changes_colours():
    images = _textured(8)
    plain, masks = CutPaste(jitter=0.0)(images, _gen(4))
    jittered, same_masks = CutPaste(jitter=0.3)(images, _gen(4))
    assert torch.equal(masks, same_masks)
    inside = (masks > 0).expand_as(images)
    assert (plain[inside] - jittered[inside]).abs().mean() > 0.01


# ----------------------------------------------------------------------------- LocalWarp


def _ramps(n: int, size: int) -> torch.Tensor:
    """Images whose first two channels are the x and y pixel coordinates / size: bilinear
    sampling reproduces a ramp exactly, so the change of a pixel is its displacement."""
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=torch.float64),
        torch.arange(size, dtype=torch.float64),
        indexing="ij",
    )
    return torch.stack((xs / size, ys / size, torch.zeros_like(xs)))[None].repeat(n, 1, 1, 1)


def test_warp_mask_is_where_pixels_move_more_than_half_a_pixel():
    size, margin = 64, 12
    images = _ramps(8, size)
    out, masks = LocalWarp(radius=(0.1, 0.3), strength=(0.1, 0.4), on_structure=False)(
        images, _gen(0)
    )
    moved = torch.hypot(*((images - out)[:, :2] * size).unbind(1))  # B x H x W, pixels
    inner = (slice(None), slice(margin, -margin), slice(margin, -margin))
    moved, mask = moved[inner], masks[:, 0][inner] > 0
    assert int(mask.sum()) > 100  # the comparison below is not vacuous
    clear = (moved - 0.5).abs() > 1e-4
    assert torch.equal(mask[clear], (moved > 0.5)[clear])
    # Far from the bump nothing changes at all.
    assert (moved == 0).flatten(1).any(1).all()


def test_warp_outside_the_mask_stays_within_its_neighbourhood():
    images = _textured(8)
    out, masks = LocalWarp()(images, _gen(1))
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="replicate")
    low = -torch.nn.functional.max_pool2d(-padded, 3, stride=1)
    high = torch.nn.functional.max_pool2d(padded, 3, stride=1)
    outside = (masks == 0).expand_as(images)
    assert (out[outside] >= low[outside] - 1e-6).all()
    assert (out[outside] <= high[outside] + 1e-6).all()
    assert (out[outside] == images[outside]).float().mean() > 0.5


def test_warp_lands_on_structure():
    # A flat image with one textured square: warps drawn on structure land near the square.
    images = torch.full((16, 3, 64, 64), 0.5)
    images[:, :, 40:56, 8:24] = _textured(16, 16, 16)
    _, masks = LocalWarp(radius=(0.05, 0.08))(images, _gen(0))
    near = torch.zeros(64, 64, dtype=torch.bool)
    near[34:62, 2:30] = True
    hits = ((masks[:, 0] > 0) & near).flatten(1).any(1)
    assert hits.float().mean() >= 0.9
    _, uniform = LocalWarp(radius=(0.05, 0.08), on_structure=False)(images, _gen(0))
    assert ((uniform[:, 0] > 0) & near).flatten(1).any(1).float().mean() < 0.6


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: PerlinBlend(beta=(0.5, 0.2)), "beta"),
        (lambda: PerlinBlend(beta=1.5), "beta"),
        (lambda: PerlinBlend(max_scale=0), "PerlinBlend: max_scale"),
        (lambda: PerlinBlend(threshold="high"), "PerlinBlend: threshold"),
        (lambda: CutPaste(area_ratio=(0.1, 2.0)), "area_ratio"),
        (lambda: CutPaste(aspect_ratio=(0, 1)), "aspect_ratio"),
        (lambda: CutPaste(jitter=-0.1), "jitter"),
        (lambda: LocalWarp(strength=(0.1, 1.0)), "strength"),
        (lambda: LocalWarp(radius=0), "radius"),
    ],
)
def test_bad_hyperparameters(make, match):
    with pytest.raises(DatasetError, match=match):
        make()


def test_bad_inputs():
    with pytest.raises(DatasetError, match="unknown anomaly kind 'blur'"):
        synthesize(_textured(1), "blur", seed=0)
    with pytest.raises(DatasetError, match="B x C x H x W"):
        CutPaste()(torch.rand(3, 16, 16), _gen(0))
    with pytest.raises(DatasetError, match="B x C x H x W"):
        LocalWarp()(torch.zeros(1, 3, 16, 16, dtype=torch.uint8), _gen(0))
    with pytest.raises(DatasetError, match="3-channel"):
        PerlinBlend()(torch.rand(1, 1, 16, 16), _gen(0))
    with pytest.raises(DatasetError, match="probability"):
        PerlinBlend()(_textured(1), _gen(0), probability=2)
    with pytest.raises(DatasetError, match="Generator"):
        CutPaste()(_textured(1), "seed")
    # Gray images are fine where colour is not needed.
    out, masks = CutPaste()(torch.rand(2, 1, 16, 16), _gen(0))
    assert out.shape == (2, 1, 16, 16) and masks.sum() > 0
    assert math.isfinite(float(LocalWarp()(torch.rand(2, 1, 16, 16), _gen(0))[0].sum()))
