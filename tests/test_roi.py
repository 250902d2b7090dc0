"""Regions of interest (dataset.roi): what the detector sees, what counts, and the identity of a
configuration with one."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from data import DatasetError, load_mvtec
from data.roi import RegionOfInterest, mask_maps, restrict
from sweep.run import metrics
from sweep.run.study import config_hash, expand_trials, study_from_dict
from sweep.run.trainable import restrict_outputs
from tests.conftest import tiny_study
from tests.test_datasets import write_image, write_mask

HEIGHT, WIDTH = 40, 48
INSIDE = (0, HEIGHT, 0, 24)  # the ROI: the left half
DEFECT_IN = (10, 20, 4, 12)  # (y0, y1, x0, x1)
DEFECT_OUT = (10, 20, 30, 40)


def write_roi(path: Path, box=INSIDE, size=(HEIGHT, WIDTH)) -> Path:
    return write_mask(path, box, size)


def widget(root: Path) -> Path:
    """An MVTec-layout category ``widget``: test images with a defect inside the ROI and one
    with its whole defect outside it; every image bright where the outside defect is."""
    category = root / "widget"
    for i in range(6):
        write_image(category / "train" / "good" / f"{i:03d}.png", 80 + i)
    for i in range(2):
        write_image(category / "test" / "good" / f"{i:03d}.png", 90 + i)
    for name, box in (("in", DEFECT_IN), ("out", DEFECT_OUT)):
        image = np.full((HEIGHT, WIDTH), 60, np.uint8)
        y0, y1, x0, x1 = box
        image[y0:y1, x0:x1] = 250
        path = category / "test" / "crack" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), image)
        write_mask(category / "ground_truth" / "crack" / f"{name}_mask.png", box, (HEIGHT, WIDTH))
    return root


def test_restrict_cuts_masks_floors_maps_and_makes_outside_defects_normal():
    valid = np.zeros((3, 2, 4), bool)
    valid[:, :, :2] = True
    masks = np.zeros((3, 2, 4), bool)
    masks[0, 0, 3] = True  # wholly outside: becomes normal
    masks[1, 0, 1] = masks[1, 1, 3] = True  # partly inside: cut, stays anomalous
    # image 2 is anomalous without a mask file: nothing says where its defect is
    maps = np.arange(24, dtype=np.float32).reshape(3, 2, 4)
    labels, cut, floored = restrict(
        np.array([1, 1, 1]), masks, maps, valid, np.array([True, True, False])
    )
    assert labels.tolist() == [0, 1, 1]
    assert cut[1].tolist() == [[False, True, False, False], [False, False, False, False]]
    # Outside the ROI each map sits at its own minimum inside it.
    assert floored[1].tolist() == [[8, 9, 8, 8], [12, 13, 8, 8]]
    assert np.array_equal(floored[:, :, :2], maps[:, :, :2])
    nothing_inside = mask_maps(maps[:1], np.zeros((1, 2, 4), bool))
    assert (nothing_inside == maps[0].min()).all(), "no ROI pixel: the whole map at its minimum"


def test_a_defect_outside_the_roi_no_longer_counts(tmp_path):
    root = widget(tmp_path)
    roi = write_roi(tmp_path / "roi.png")
    plain = load_mvtec(root, "widget", (HEIGHT, WIDTH))
    masked = load_mvtec(root, "widget", (HEIGHT, WIDTH), roi=roi)
    test = masked.test
    out = test.paths.index(next(p for p in test.paths if p.endswith("out.png")))
    inside = test.paths.index(next(p for p in test.paths if p.endswith("in.png")))

    # The detector never sees outside the ROI: the outside defect is blanked away.
    assert test.pixels[:, :, :, 24:].max() == 0
    assert plain.test.pixels[out, :, 10:20, 30:40].min() == 250

    # What a detector would say: the inside defect high, the unseen one low; its maps hot on
    # the defects and on clutter outside the ROI (the right edge) of a normal image.
    normal = [i for i in range(4) if i not in (inside, out)]
    scores = np.zeros(4)
    scores[[*normal, inside, out]] = [0.1, 0.2, 0.9, 0.15]
    maps = np.zeros((4, HEIGHT, WIDTH), np.float32)
    maps[inside, 10:20, 4:12] = 1.0
    maps[normal[0], :, 44:] = 2.0
    outputs = metrics.SplitOutputs(
        labels=test.labels.numpy(), scores=scores, masks=test.masks.numpy(), maps=maps
    )
    before = metrics.evaluate(outputs, outputs)
    split = restrict_outputs(masked, test, outputs)
    after = metrics.evaluate(split, split)

    # Image level: without the ROI the unseen defect is a miss; with it, that image is normal.
    assert test.labels[out] == 1 and split.labels[out] == 0 and split.labels[inside] == 1
    assert before["image_auroc"] == pytest.approx(0.75)
    assert after["image_auroc"] == pytest.approx(1.0)
    # Pixel level: the outside defect and the clutter no longer count; the metric is over the
    # ROI's pixels alone (scikit-learn on those pixels as the oracle).
    assert not split.masks[out].any()
    assert before["pixel_auroc"] < 0.95
    roi = split.valid
    assert roi is not None and roi[:, :, :24].all() and not roi[:, :, 24:].any()
    oracle = roc_auc_score(test.masks.numpy()[roi], maps[roi])
    assert after["pixel_auroc"] == pytest.approx(oracle) == pytest.approx(1.0)


def test_pixel_metrics_over_a_roi_equal_them_on_the_cropped_images():
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 12, 16), bool)
    masks[0, 2:5, 3:6] = masks[1, 6:9, 1:4] = masks[1, 1:3, 8:10] = True
    maps = rng.random((4, 12, 16)).astype(np.float32) + masks * 0.6
    valid = np.zeros_like(masks)
    valid[:, :, :11] = True
    labels = np.array([1, 1, 0, 0])
    scores = np.array([0.9, 0.8, 0.1, 0.3])
    roi = metrics.SplitOutputs(labels, scores, masks, maps + ~valid * 5.0, valid)
    cropped = metrics.SplitOutputs(labels, scores, masks[:, :, :11], maps[:, :, :11])
    got, want = metrics.evaluate(roi, roi), metrics.evaluate(cropped, cropped)
    for key in ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro", "pixel_f1", "pixel_iou"):
        assert got[key] == pytest.approx(want[key]), key


def test_a_folder_of_masks_matches_by_stem_and_names_an_image_without_one(tmp_path):
    root = widget(tmp_path)
    folder = tmp_path / "rois"
    for path in sorted((root / "widget").rglob("*.png")):
        if "ground_truth" not in path.parts:
            write_roi(folder / f"{path.stem}.png", (0, HEIGHT, 0, 8))
    splits = load_mvtec(root, "widget", 32, roi=folder)
    assert splits.test.pixels[:, :, :, 8:].max() == 0
    (folder / "in.png").unlink()
    with pytest.raises(DatasetError, match=r"in\.png: no ROI mask in .*rois"):
        load_mvtec(root, "widget", 32, roi=folder)


def test_a_roi_is_resized_to_its_images_and_refused_at_another_aspect(tmp_path):
    root = widget(tmp_path)
    half = write_roi(tmp_path / "half.png", (0, HEIGHT // 2, 0, 12), (HEIGHT // 2, WIDTH // 2))
    splits = load_mvtec(root, "widget", (HEIGHT, WIDTH), roi=half)
    assert splits.test.pixels[:, :, :, 24:].max() == 0
    square = write_roi(tmp_path / "square.png", (0, 40, 0, 20), (40, 40))
    with pytest.raises(DatasetError, match=r"square\.png: ROI mask is 40x40 .* aspect ratios"):
        load_mvtec(root, "widget", 32, roi=square)
    empty = write_roi(tmp_path / "empty.png", (0, 0, 0, 0))
    with pytest.raises(DatasetError, match="ROI mask is empty"):
        RegionOfInterest(empty)
    with pytest.raises(DatasetError, match="ROI mask not found"):
        RegionOfInterest(tmp_path / "nothing.png")


def test_the_roi_is_in_the_config_hash_by_content_and_only_when_set(tmp_path):
    roi = write_roi(tmp_path / "roi.png")
    raw = tiny_study(tmp_path / "glue", tmp_path / "out")
    plain = study_from_dict(raw)
    trial = expand_trials(plain)[0]
    with_roi = study_from_dict({**raw, "dataset": {**raw["dataset"], "roi": str(roi)}})
    assert RegionOfInterest(roi).sha256 == hashlib.sha256(roi.read_bytes()).hexdigest()
    first = config_hash(with_roi, trial)
    assert first != config_hash(plain, trial)
    copy = tmp_path / "elsewhere" / "same.png"
    copy.parent.mkdir()
    copy.write_bytes(roi.read_bytes())
    moved = study_from_dict({**raw, "dataset": {**raw["dataset"], "roi": str(copy)}})
    assert config_hash(moved, trial) == first, "the same mask elsewhere: the same configuration"
    write_roi(roi, (0, HEIGHT, 0, 20))
    assert config_hash(with_roi, trial) != first, "a mask written again: a new configuration"


def test_a_relative_roi_is_taken_from_where_the_study_is_loaded(tmp_path, monkeypatch):
    write_roi(tmp_path / "roi.png")
    monkeypatch.chdir(tmp_path)
    raw = tiny_study(tmp_path / "glue", tmp_path / "out")
    study = study_from_dict({**raw, "dataset": {**raw["dataset"], "roi": "roi.png"}})
    assert study.dataset.roi == str(tmp_path / "roi.png")


def test_a_trial_with_a_roi_states_it_in_its_row(glue_root, tmp_path):
    from sweep.run.runner import study_schema
    from sweep.run.trainable import TrialContext, run_trial

    raw = tiny_study(glue_root, tmp_path / "out")
    bead = Path(__file__).resolve().parents[1] / "studies" / "roi" / "glue_part1_bead.png"
    raw["dataset"].update(image_size=[48, 64], roi=str(bead))
    raw["space"]["model"] = "padim"
    study = study_from_dict(raw)
    ctx = TrialContext(study, str(tmp_path / "out"), "test", study_schema(study))
    row = run_trial(expand_trials(study)[0], ctx)
    assert (row["image_height"], row["image_width"]) == (48, 64)
    assert row["source_sizes"] == "320x240" and row["aspect_change"] is None, "4:3 kept"
    assert row["roi"] == str(bead) and row["roi_sha256"] == RegionOfInterest(bead).sha256
    assert 0.2 < row["roi_fraction"] < 0.26 and row["n_relabelled"] == 0
    assert 0.0 <= row["pixel_auroc"] <= 1.0
