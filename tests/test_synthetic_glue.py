"""The synthetic glue-line generator: deterministic images, honest masks, an atomic data set."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from data.errors import DatasetError
from data.synthetic_glue import (
    DEFECT_TYPES,
    GENERATOR_VERSION,
    PARTS,
    SEGMENTS,
    GlueSetConfig,
    ensure_generated,
    generate,
    render_defect,
    render_normal,
)

# Small images keep the suite fast; 240 x 320 still has a bead several pixels wide.
H, W = 240, 320
TINY = GlueSetConfig(
    n_train=3, n_val_good=1, n_val_defect=1, n_test_good=2, n_test_defect=1, height=96, width=128
)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# ----------------------------------------------------------------------------- rendering


def test_contract_names():
    assert DEFECT_TYPES == (
        "warp_small",
        "warp_large",
        "bifurcation",
        "missing",
        "narrowing",
        "misalignment",
        "hole",
    )
    assert {"part1", "part6", "part16"} <= set(PARTS)


@pytest.mark.parametrize("part", sorted(PARTS))
def test_normal_images_are_gray_deterministic_and_vary(part):
    first = render_normal(part, rng(3), H, W)
    assert first.shape == (H, W) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, render_normal(part, rng(3), H, W))
    other = render_normal(part, rng(4), H, W)
    # Another seed is another photo of the same part: different pixels, similar content.
    assert np.mean(first != other) > 0.5
    assert abs(float(first.mean()) - float(other.mean())) < 80


def test_default_size_is_the_studys_480_by_640():
    assert render_normal("part1", rng(0)).shape == (480, 640)


@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_defect_is_deterministic(defect):
    image, mask = render_defect("part1", defect, rng(11), H, W)
    again_image, again_mask = render_defect("part1", defect, rng(11), H, W)
    np.testing.assert_array_equal(image, again_image)
    np.testing.assert_array_equal(mask, again_mask)
    other_image, other_mask = render_defect("part1", defect, rng(12), H, W)
    assert not np.array_equal(image, other_image)
    assert not np.array_equal(mask, other_mask)


@pytest.mark.parametrize("part", ["part1", "part16"])
@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_mask_is_binary_nonempty_and_covers_the_change(part, defect):
    for seed in range(3):
        image, mask = render_defect(part, defect, rng(seed), H, W)
        normal = render_normal(part, rng(seed), H, W)  # the same scene without the defect
        assert mask.shape == (H, W) and mask.dtype == np.uint8
        assert set(np.unique(mask)) == {0, 255}
        inside = mask > 0
        assert inside.sum() >= 20
        assert inside.mean() < 0.1  # a local defect, not the whole image

        change = np.abs(image.astype(np.int16) - normal.astype(np.int16))
        visible = change > 3
        # The defect is visible inside its mask ...
        assert (visible & inside).sum() >= 10, (part, defect, seed)
        # ... and the image changed (beyond faint shading tails) only there.
        assert (visible & inside).sum() / visible.sum() > 0.9, (part, defect, seed)


# Where each segment lies in the study's part 1 (Fig. 6): (x range, y range) of a defect's
# centre as fractions of the image: A middle left, B centre, C right of centre, D right,
# E the branch curving up to the upper right.
SEGMENT_REGIONS = {
    "A": ((0.0, 0.3), (0.4, 0.7)),
    "B": ((0.35, 0.58), (0.4, 0.7)),
    "C": ((0.6, 0.8), (0.4, 0.7)),
    "D": ((0.8, 1.0), (0.5, 0.7)),
    "E": ((0.78, 1.0), (0.0, 0.56)),
}


@pytest.mark.parametrize("segment", SEGMENTS)
def test_defects_land_in_the_requested_segment(segment):
    (x_low, x_high), (y_low, y_high) = SEGMENT_REGIONS[segment]
    for defect in DEFECT_TYPES:
        for seed in range(2):
            _, mask = render_defect("part1", defect, rng(seed), H, W, segment=segment)
            ys, xs = np.nonzero(mask)
            assert x_low < xs.mean() / W < x_high, (defect, seed)
            assert y_low < ys.mean() / H < y_high, (defect, seed)


def test_warp_sizes_differ():
    small = [render_defect("part1", "warp_small", rng(s), H, W)[1] > 0 for s in range(6)]
    large = [render_defect("part1", "warp_large", rng(s), H, W)[1] > 0 for s in range(6)]
    assert np.median([m.sum() for m in large]) > 1.8 * np.median([m.sum() for m in small])


def test_part16_has_the_strongest_lighting_changes():
    def brightness_spread(part: str) -> float:
        return float(np.std([render_normal(part, rng(s), H, W).mean() for s in range(12)]))

    assert brightness_spread("part16") > 2 * brightness_spread("part1")
    assert brightness_spread("part1") > brightness_spread("part6")


@pytest.mark.parametrize(("height", "width"), [(32, 32), (64, 48), (600, 400)])
def test_every_defect_renders_at_unusual_sizes(height, width):
    for defect in DEFECT_TYPES:
        image, mask = render_defect("part1", defect, rng(0), height, width)
        assert image.shape == mask.shape == (height, width)
        assert mask.any()


def test_bad_arguments_raise_dataset_error():
    with pytest.raises(DatasetError, match=r"unknown glue-line part 'part99'.*part1"):
        render_normal("part99", rng(0))
    with pytest.raises(DatasetError, match=r"unknown defect type 'scratch'.*hole"):
        render_defect("part1", "scratch", rng(0))
    with pytest.raises(DatasetError, match=r"unknown segment 'F'.*A, B, C, D, E"):
        render_defect("part1", "hole", rng(0), segment="F")


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("n_train", -1, "n_train"),
        ("n_test_defect", 1.5, "n_test_defect"),
        ("height", 16, "height"),
        ("defect_types", ("hole", "scratch"), "scratch"),
        ("defect_types", ("hole", "hole"), "duplicates"),
    ],
)
def test_config_is_validated(field, value, needle):
    with pytest.raises(DatasetError, match=needle):
        GlueSetConfig(**{field: value})


# ----------------------------------------------------------------------------- the data set


def test_generate_writes_the_layout_and_manifest(tmp_path):
    calls: list[tuple[int, int]] = []
    config = GlueSetConfig(**{**TINY.to_dict(), "defect_types": ("hole", "warp_large")})
    path = generate(tmp_path, "part1", config, seed=5, progress=lambda d, t: calls.append((d, t)))
    assert path == tmp_path / "part1"

    total = 3 + 1 + 2 * 1 + 2 + 2 * 1
    assert calls == [(i, total) for i in range(1, total + 1)]
    assert sorted(p.name for p in (path / "train" / "good").iterdir()) == [
        "000.png",
        "001.png",
        "002.png",
    ]
    for split, truth in (("val", "val_ground_truth"), ("test", "ground_truth")):
        assert sorted(p.name for p in (path / split).iterdir()) == ["good", "hole", "warp_large"]
        for defect in ("hole", "warp_large"):
            (image_path,) = (path / split / defect).iterdir()
            assert re.fullmatch(r"000_seg[A-E]\.png", image_path.name)
            mask = cv2.imread(str(path / truth / defect / f"{image_path.stem}_mask.png"), -1)
            image = cv2.imread(str(image_path), -1)
            assert image.shape == mask.shape == (96, 128)  # single channel, as the study's
            assert set(np.unique(mask)) == {0, 255}

    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["version"] == GENERATOR_VERSION
    assert manifest["part"] == "part1" and manifest["seed"] == 5
    assert manifest["config"] == config.to_dict()
    assert manifest["counts"] == {
        "train/good": 3,
        "val/good": 1,
        "val/hole": 1,
        "val/warp_large": 1,
        "test/good": 2,
        "test/hole": 1,
        "test/warp_large": 1,
    }
    assert [p.name for p in tmp_path.iterdir()] == ["part1"]  # no staging directory left


def test_generate_is_byte_identical_and_stable_under_growth(tmp_path):
    a = files(generate(tmp_path / "a", "part6", TINY, seed=1))
    b = files(generate(tmp_path / "b", "part6", TINY, seed=1))
    assert a == b
    # More images of each kind add files but leave the existing ones as they were.
    bigger = GlueSetConfig(**{**TINY.to_dict(), "n_train": 5, "n_test_defect": 2})
    c = files(generate(tmp_path / "c", "part6", bigger, seed=1))
    assert {k: v for k, v in c.items() if k in a and k != "manifest.json"} == {
        k: v for k, v in a.items() if k != "manifest.json"
    }
    assert len(c) > len(a)
    d = files(generate(tmp_path / "d", "part6", TINY, seed=2))
    assert d["train/good/000.png"] != a["train/good/000.png"]


def test_each_defect_type_covers_every_segment(tmp_path):
    config = GlueSetConfig(
        **{**TINY.to_dict(), "n_test_defect": 5, "defect_types": ("missing", "hole")}
    )
    path = generate(tmp_path, "part16", config)
    for defect in ("missing", "hole"):
        names = sorted(p.name for p in (path / "test" / defect).iterdir())
        assert sorted(name[7] for name in names) == list(SEGMENTS)  # "NNN_segX.png"


def test_ensure_generated_reuses_a_matching_data_set(tmp_path):
    path = ensure_generated(tmp_path, "part1", TINY, seed=0)
    before = files(path)
    mtime = (path / "manifest.json").stat().st_mtime_ns
    calls = []
    assert ensure_generated(tmp_path, "part1", TINY, seed=0, progress=calls.append) == path
    assert calls == []  # nothing rendered
    assert (path / "manifest.json").stat().st_mtime_ns == mtime
    assert files(path) == before


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"seed": 1}, "seed"),
        ({"config": GlueSetConfig(**{**TINY.to_dict(), "n_train": 4})}, "config"),
    ],
)
def test_ensure_generated_rejects_a_different_data_set(tmp_path, change, needle):
    path = ensure_generated(tmp_path, "part1", TINY, seed=0)
    args = {"part": "part1", "config": TINY, "seed": 0, **change}
    with pytest.raises(DatasetError, match=needle) as caught:
        ensure_generated(tmp_path, **args)
    assert str(path) in str(caught.value)


def test_ensure_generated_rejects_a_directory_without_manifest(tmp_path):
    (tmp_path / "part1" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="manifest") as caught:
        ensure_generated(tmp_path, "part1", TINY)
    assert str(tmp_path / "part1") in str(caught.value)


def test_generate_refuses_to_overwrite(tmp_path):
    generate(tmp_path, "part1", TINY)
    with pytest.raises(DatasetError, match="already exists"):
        generate(tmp_path, "part1", TINY)


def test_interrupted_generation_leaves_nothing_behind(tmp_path):
    class Interrupted(Exception):
        pass

    def interrupt(done: int, total: int) -> None:
        if done == 4:
            raise Interrupted

    with pytest.raises(Interrupted):
        generate(tmp_path, "part1", TINY, progress=interrupt)
    assert list(tmp_path.iterdir()) == []
    # A later run starts from scratch and completes.
    assert (ensure_generated(tmp_path, "part1", TINY) / "manifest.json").is_file()


def test_a_custom_part_spec_gets_its_own_directory(tmp_path):
    custom = replace(PARTS["part1"], name="wide_bead", bead_radius=11.0)
    path = ensure_generated(tmp_path, custom, TINY)
    assert path == tmp_path / "wide_bead"
    assert json.loads((path / "manifest.json").read_text())["part"] == "wide_bead"
    assert ensure_generated(tmp_path, custom, TINY) == path


@pytest.mark.parametrize("same", [True, False], ids=["same-inputs", "other-inputs"])
def test_a_concurrent_writer_that_finishes_first(tmp_path, same):
    """Two workers generating the same data set: the later one keeps the first one's copy
    when it holds the same data set, and refuses otherwise."""
    other = TINY if same else GlueSetConfig(**{**TINY.to_dict(), "n_train": 2})

    def race(done: int, total: int) -> None:
        if done == 1:
            generate(tmp_path, "part1", other)

    if same:
        path = ensure_generated(tmp_path, "part1", TINY, progress=race)
        assert files(path) == files(generate(tmp_path / "fresh", "part1", TINY))
    else:
        with pytest.raises(DatasetError, match="config") as caught:
            ensure_generated(tmp_path, "part1", TINY, progress=race)
        assert str(tmp_path / "part1") in str(caught.value)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
