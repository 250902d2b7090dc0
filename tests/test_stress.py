"""Test-time stresses: masks stay on the defects under geometric stresses and untouched under
photometric ones, draws are seeded, and bad study entries name the stress and the key."""

from __future__ import annotations

import json
import pickle

import cv2
import numpy as np
import pytest
import torch

from data import (
    BUILTIN_STRESSES,
    STRESS_KINDS,
    AnomalyDataset,
    DatasetError,
    StressSpec,
    apply_stress,
    parse_stresses,
)

SIZE = 64
BRIGHT, DIM = 235, 70


def bright_square_split(corner_defect: bool = False) -> AnomalyDataset:
    """Dim, slightly noisy images; anomalous ones hold a bright rectangle (their mask), some
    touching the image border. ``corner_defect`` puts a 3 x 3 one in the top-left corner."""
    g = torch.Generator().manual_seed(0)
    n = 8
    pixels = (DIM + torch.randint(0, 12, (n, 3, SIZE, SIZE), generator=g)).to(torch.uint8)
    masks = torch.zeros(n, SIZE, SIZE, dtype=torch.bool)
    labels = torch.zeros(n, dtype=torch.int64)
    boxes = [(20, 30, 14, 10), (0, 40, 12, 9), (45, 0, 10, 16), (28, 50, 9, 14)]
    if corner_defect:
        boxes = [(0, 0, 3, 3)] * 4
    for i, (top, left, h, w) in zip(range(0, n, 2), boxes, strict=True):
        pixels[i, :, top : top + h, left : left + w] = BRIGHT
        masks[i, top : top + h, left : left + w] = True
        labels[i] = 1
    defects = ["bright" if label else "good" for label in labels]
    return AnomalyDataset(pixels, labels, masks, defects, [f"img{i}.png" for i in range(n)])


def bright_pixels(data: AnomalyDataset) -> torch.Tensor:
    """Where the bright defect went: a mask recomputed from the images alone."""
    return data.pixels.float().mean(dim=1) > (BRIGHT + DIM) / 2


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a & b).flatten(1).sum(1) / (a | b).flatten(1).sum(1).clamp(min=1)


def check_same_records(before: AnomalyDataset, after: AnomalyDataset) -> None:
    assert after is not before
    assert torch.equal(after.labels, before.labels)
    assert after.defects == before.defects and after.paths == before.paths
    assert after.pixels.shape == before.pixels.shape and after.pixels.dtype == torch.uint8
    assert after.has_masks == before.has_masks


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("border", ["reflect", "replicate", "constant"])
def test_rotation_moves_the_masks_with_the_defects(border):
    data = bright_square_split()
    spec = parse_stresses({"r": {"kind": "rotation", "max_degrees": 40, "border": border}})["r"]
    out = apply_stress(data, spec, seed=1)
    check_same_records(data, out)
    anomalous = data.labels == 1
    # The image is resampled bilinearly and the mask by nearest neighbour with the same matrix
    # and border: they differ at most on a few boundary pixels. With a reflecting border, a
    # defect on the edge is copied into the corners, and the copies are marked too.
    overlap = iou(out.masks, bright_pixels(out))[anomalous]
    assert (overlap > 0.95).all(), overlap
    assert not out.masks[~anomalous].any()
    # Rotated, not left in place.
    assert (iou(out.masks, data.masks)[anomalous] < 0.9).all()


def test_rotation_never_empties_an_anomalous_mask():
    """A 3 x 3 defect in the corner leaves the frame under most rotations; its angle is
    redrawn, and an image is left unrotated when no draw keeps it."""
    data = bright_square_split(corner_defect=True)
    spec = StressSpec("far", "rotation", {"max_degrees": 90, "border": "constant"})
    for seed in range(4):
        out = apply_stress(data, spec, seed=seed)
        assert out.masks[data.labels == 1].flatten(1).any(dim=1).all()
        assert (iou(out.masks, bright_pixels(out))[data.labels == 1] > 0.6).all()


def test_orientation_turns_image_and_mask_exactly():
    data = bright_square_split()
    out = apply_stress(data, StressSpec("flip", "orientation", {"modes": ["rot180"]}), seed=0)
    check_same_records(data, out)
    assert torch.equal(out.pixels, data.pixels.flip(-1, -2))
    assert torch.equal(out.masks, data.masks.flip(-1, -2))

    mixed = apply_stress(data, BUILTIN_STRESSES["orientation"], seed=0)
    anomalous = data.labels == 1
    assert torch.equal(mixed.masks[anomalous], bright_pixels(mixed)[anomalous])
    for i in range(len(data)):
        # Each image is one of the default modes, with its mask.
        candidates = [data.pixels[i].flip(-1, -2), data.pixels[i].flip(-1), data.pixels[i].flip(-2)]
        assert any(torch.equal(mixed.pixels[i], c) for c in candidates)


@pytest.mark.parametrize(
    "mode", ["rot90", "rot180", "rot270", "hflip", "vflip", "transpose", "transverse"]
)
def test_every_orientation_mode_keeps_masks_aligned(mode):
    data = bright_square_split()
    out = apply_stress(data, StressSpec("o", "orientation", {"modes": [mode]}), seed=0)
    anomalous = data.labels == 1
    assert torch.equal(out.masks[anomalous], bright_pixels(out)[anomalous])
    assert not torch.equal(out.masks, data.masks)


# ----------------------------------------------------------------------------- photometric


@pytest.mark.parametrize("kind", ["lighting", "background"])
def test_photometric_stresses_leave_masks_identical(kind):
    data = bright_square_split()
    out = apply_stress(data, BUILTIN_STRESSES[kind], seed=0)
    check_same_records(data, out)
    assert torch.equal(out.masks, data.masks)
    assert (out.pixels != data.pixels).flatten(1).any(dim=1).all()


def test_lighting_gain_and_gradient():
    flat = torch.full((1, 3, SIZE, SIZE), 100, dtype=torch.uint8)
    data = AnomalyDataset(
        flat, torch.zeros(1), torch.zeros(1, SIZE, SIZE, dtype=torch.bool), ["good"], ["a.png"]
    )
    brighter = StressSpec("b", "lighting", {"gain": 1.5, "gamma": 1.0, "gradient": 0.0})
    assert (apply_stress(data, brighter, seed=0).pixels == 150).all()
    ramp = StressSpec("g", "lighting", {"gain": 1.0, "gamma": 1.0, "gradient": 0.5})
    out = apply_stress(data, ramp, seed=0).pixels.float()
    # 1 -+ 0.5 at the two far sides of the image along the light's direction.
    assert out.min() == pytest.approx(50, abs=1) and out.max() == pytest.approx(150, abs=1)


def test_background_keeps_the_structure():
    """What the background stress adds is smooth: the change has little fine detail compared
    with the image's own edges and noise."""
    data = bright_square_split()
    spec = StressSpec("bg", "background", {"strength": 1.0, "colour": [0.3, 0.6]})
    out = apply_stress(data, spec, seed=0)
    before = data.pixels.permute(0, 2, 3, 1).numpy().astype(np.float32)
    change = out.pixels.permute(0, 2, 3, 1).numpy().astype(np.float32) - before
    for i in range(len(data)):
        detail = np.abs(cv2.Laplacian(before[i], cv2.CV_32F)).mean()
        change_detail = np.abs(cv2.Laplacian(change[i], cv2.CV_32F)).mean()
        assert change_detail < 0.2 * detail
        # ... while the image's overall appearance did change.
        assert np.abs(change[i]).mean() > 10


# ----------------------------------------------------------------------------- identity, seeds


def test_none_returns_the_data_unchanged():
    data = bright_square_split()
    assert apply_stress(data, BUILTIN_STRESSES["none"], seed=0) is data


@pytest.mark.parametrize("kind", ["lighting", "background", "rotation", "orientation"])
def test_same_seed_same_result_other_seed_other_result(kind):
    data = bright_square_split()
    spec = BUILTIN_STRESSES[kind]
    first, again = apply_stress(data, spec, seed=3), apply_stress(data, spec, seed=3)
    assert torch.equal(first.pixels, again.pixels) and torch.equal(first.masks, again.masks)
    assert not torch.equal(first.pixels, apply_stress(data, spec, seed=4).pixels)


def test_images_without_a_mask_file_stay_so():
    data = bright_square_split()
    present = torch.ones(len(data), dtype=torch.bool)
    present[0] = False
    data = AnomalyDataset(
        data.pixels, data.labels, data.masks, data.defects, data.paths, mask_present=present
    )
    assert not data.has_masks
    assert not apply_stress(data, BUILTIN_STRESSES["rotation"], seed=0).has_masks


# ----------------------------------------------------------------------------- specs, errors


def test_builtin_specs_are_json_with_every_default():
    assert set(BUILTIN_STRESSES) == set(STRESS_KINDS)
    assert BUILTIN_STRESSES["rotation"].spec() == {
        "kind": "rotation",
        "max_degrees": 15.0,
        "border": "reflect",
    }
    for name, spec in BUILTIN_STRESSES.items():
        raw = spec.spec()
        assert json.loads(json.dumps(raw)) == raw
        assert parse_stresses({f"my_{name}": raw})[f"my_{name}"].spec() == raw
        # Specs travel to Ray workers.
        assert pickle.loads(pickle.dumps(spec)) == spec


def test_study_variants_fill_in_defaults():
    stresses = parse_stresses({"rot30": {"kind": "rotation", "max_degrees": 30}})
    assert stresses["rot30"].spec() == {
        "kind": "rotation",
        "max_degrees": 30.0,
        "border": "reflect",
    }
    fixed = parse_stresses({"dark": {"kind": "lighting", "gain": 0.6}})["dark"]
    assert fixed.params["gain"] == [0.6, 0.6]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"r": {"kind": "rotaton"}}, "stress 'r': key 'kind': unknown stress kind 'rotaton' (did"),
        ({"r": {"max_degrees": 3}}, "stress 'r': key 'kind' is missing"),
        (
            {"r": {"kind": "rotation", "max_degree": 3}},
            "stress 'r': key 'max_degree': not a parameter of a rotation stress (did you mean "
            "'max_degrees'?)",
        ),
        ({"r": {"kind": "rotation", "max_degrees": 200}}, "stress 'r': key 'max_degrees':"),
        ({"r": {"kind": "rotation", "border": "wrap"}}, "stress 'r': key 'border':"),
        ({"l": {"kind": "lighting", "gain": [1.4, 1.1]}}, "stress 'l': key 'gain': expected"),
        ({"l": {"kind": "lighting", "gradient": 1.5}}, "stress 'l': key 'gradient':"),
        ({"b": {"kind": "background", "sigma": 0}}, "stress 'b': key 'sigma':"),
        ({"o": {"kind": "orientation", "modes": ["rot45"]}}, "stress 'o': key 'modes':"),
        ({"o": {"kind": "orientation", "modes": []}}, "stress 'o': key 'modes':"),
        ({"n": {"kind": "none", "x": 1}}, "stress 'n': key 'x': not a parameter"),
        ({"rotation": {"kind": "rotation"}}, "stress 'rotation': redefines a built-in"),
        ({"r": "rotation"}, "stress 'r': expected a mapping"),
    ],
)
def test_parse_errors_name_the_stress_and_the_key(raw, expected):
    with pytest.raises(DatasetError) as info:
        parse_stresses(raw)
    assert expected in str(info.value)


def test_apply_stress_checks_its_arguments():
    data = bright_square_split()
    with pytest.raises(DatasetError, match="StressSpec"):
        apply_stress(data, "rotation", seed=0)
    with pytest.raises(DatasetError, match="seed"):
        apply_stress(data, BUILTIN_STRESSES["rotation"], seed=None)
