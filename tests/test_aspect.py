"""Aspect ratio: dataset.image_size [H, W] and dataset.resize (stretch, pad, crop); what the
row and the compatibility check say about it."""

from __future__ import annotations

import numpy as np
import pytest

import models
from data import load_mvtec
from data.transforms import fit_aspect, frame_mask, prepare, prepare_mask, resize_image
from sweep.errors import StudyError
from sweep.run import metrics
from sweep.run.study import config_hash, expand_trials, study_from_dict
from sweep.run.trainable import data_columns, restrict_outputs
from tests.conftest import tiny_study
from tests.test_datasets import mvtec


def wide_image() -> np.ndarray:
    """20 x 40 (H x W) RGB: 50 on the left and right quarters, 200 in the middle half."""
    image = np.full((20, 40, 3), 50, np.uint8)
    image[:, 10:30] = 200
    return image


def test_stretch_is_the_plain_resize_and_counts_every_pixel():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    pixels, valid = prepare(image, 24)
    assert np.array_equal(pixels, resize_image(image, 24)) and valid is None
    pixels, valid = prepare(image, (12, 20))
    assert pixels.shape == (12, 20, 3) and valid is None


def test_pad_letterboxes_with_a_zero_border_that_does_not_count():
    pixels, valid = prepare(wide_image(), (32, 32), "pad")
    # 20 x 40 padded to 40 x 40 (10 rows above and below), then 0.8 x: 8 border rows each side.
    assert pixels[:8].max() == 0 and pixels[24:].max() == 0
    assert pixels[8:24, 8:24].min() == 200
    expected = np.zeros((32, 32), bool)
    expected[8:24] = True
    assert np.array_equal(valid, expected)
    assert np.array_equal(frame_mask((20, 40), (32, 32), "pad"), expected)
    mask = np.ones((20, 40), np.uint8)
    assert np.array_equal(prepare_mask(mask, (32, 32), "pad"), expected), "masks padded with 0"


def test_crop_keeps_the_centre_at_the_target_aspect():
    assert fit_aspect(wide_image(), (16, 16), "crop").shape == (20, 20, 3)
    pixels, valid = prepare(wide_image(), (16, 16), "crop")
    assert pixels.min() == 200 and valid is None
    tall = np.zeros((40, 20), np.uint8)
    tall[10:30] = 1
    assert prepare_mask(tall, (16, 16), "crop").all()
    # The same aspect: nothing is cut or padded.
    assert fit_aspect(wide_image(), (10, 20), "crop").shape == (20, 40, 3)
    assert fit_aspect(wide_image(), (10, 20), "pad").shape == (20, 40, 3)


def test_the_loader_takes_height_and_width_and_records_the_sources(tmp_path):
    root = mvtec(tmp_path)  # 40 x 48 (H x W) images
    splits = load_mvtec(root, "widget", (24, 36))
    assert tuple(splits.test.pixels.shape[1:]) == (3, 24, 36)
    assert tuple(splits.test.masks.shape[1:]) == (24, 36) and splits.test.shape == (24, 36)
    assert splits.source_sizes() == [(40, 48)]
    assert splits.aspect_change() == ("48x40 (W x H, aspect 1.2) stretched to 36x24 (aspect 1.5)")
    assert load_mvtec(root, "widget", (30, 36)).aspect_change() is None, "1.2 is 1.2"
    assert "24x36px" in splits.describe()


def test_padding_counts_for_no_pixel_metric(tmp_path):
    root = mvtec(tmp_path)
    splits = load_mvtec(root, "widget", 48, resize="pad")  # 40 x 48 -> 4 border rows each side
    test = splits.test
    assert test.pixels[:, :, :4].max() == 0 and test.pixels[:, :, 44:].max() == 0
    assert not test.masks[:, :4].any() and not test.masks[:, 44:].any()
    maps = test.masks.numpy().astype(np.float32)
    maps[:, :4] = 5.0  # hot on the border: would be false positives if the border counted
    scores = test.labels.numpy().astype(float)
    outputs = restrict_outputs(
        splits, test, metrics.SplitOutputs(test.labels.numpy(), scores, test.masks.numpy(), maps)
    )
    assert outputs.valid is not None and outputs.valid[:, 4:44].all()
    assert not outputs.valid[:, :4].any() and (outputs.maps[:, :4] == 0).all()
    result = metrics.evaluate(outputs, outputs)
    assert result["pixel_auroc"] == pytest.approx(1.0)
    columns = data_columns(splits, outputs)
    assert columns["resize"] == "pad" and columns["aspect_change"].endswith("(aspect 1)")
    assert (columns["image_height"], columns["image_width"]) == (48, 48)
    assert columns["source_sizes"] == "48x40" and columns["n_relabelled"] == 0
    assert columns["roi"] is None and columns["roi_fraction"] is None


def _study(tmp_path, dataset=None, space=None):
    raw = tiny_study(tmp_path / "glue", tmp_path / "out")
    raw["dataset"].update(dataset or {})
    raw["space"].update(space or {})
    return study_from_dict(raw)


def test_a_trial_size_sets_the_shorter_side_and_the_aspect_enters_the_hash(tmp_path):
    study = _study(tmp_path, {"image_size": [480, 848]}, {"image_size": {"grid": [240, 480]}})
    assert study.dataset.base_size == 480
    assert [study.dataset.shape(t.image_size) for t in expand_trials(study)][:2] == [
        (240, 424),
        (480, 848),
    ]
    square = _study(tmp_path)
    trial = expand_trials(square)[0]
    assert _study(tmp_path, {"image_size": [64, 64]}).dataset.image_size == 64
    stretched = _study(tmp_path, {"resize": "stretch"})
    assert config_hash(stretched, trial) == config_hash(square, trial), "the default, spelt out"
    changed = [
        _study(tmp_path, {"image_size": [64, 96]}),
        _study(tmp_path, {"resize": "pad"}),
        _study(tmp_path, {"resize": "crop"}),
    ]
    hashes = {config_hash(s, trial) for s in changed} | {config_hash(square, trial)}
    assert len(hashes) == 4


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ([480], r"expected a whole number of pixels, or two of them \(height, width\)"),
        ([16, 64], "16 px"),
    ],
)
def test_bad_image_sizes_name_the_key(tmp_path, value, needle):
    with pytest.raises(StudyError, match=f"dataset.image_size.*{needle}"):
        _study(tmp_path, {"image_size": value})


def test_detectors_that_need_square_images_say_so_at_validation(tmp_path, monkeypatch):
    native = {"model": "fastflow", "backbone": "vit_base_patch16_224", "image_size": "native"}
    assert _study(tmp_path, space=native)
    with pytest.raises(StudyError, match="model 'fastflow' on backbone 'vit_base_patch16_224'"):
        _study(tmp_path, {"image_size": [96, 128]}, native)
    monkeypatch.setattr(models.get_class("padim"), "square_input", True)
    with pytest.raises(StudyError, match=r"model 'padim'.*it needs square images, got 64x85"):
        _study(tmp_path, {"image_size": [64, 85]})
    assert _study(tmp_path, {"image_size": [64, 85], "resize": "pad"}, {"model": "patchcore"})


def test_maps_go_back_onto_the_source_image():
    from data.transforms import to_source

    frame = frame_mask((20, 40), (32, 32), "pad").astype(np.float32)
    back = to_source(frame, (20, 40), "pad")
    assert back.shape == (20, 40) and back[1:-1].min() == pytest.approx(1.0)
    kept = to_source(np.ones((16, 16), np.float32), (20, 40), "crop", fill=0.0)
    assert kept.shape == (20, 40) and kept[:, 10:30].min() == 1.0
    assert kept[:, :10].max() == 0.0 and kept[:, 30:].max() == 0.0
    assert to_source(np.ones((8, 8)), (20, 40)).shape == (20, 40)
