"""Dataset loaders: what they hold, how they split, and how they refuse bad data."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import data
from data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AnomalyDataset,
    DatasetError,
    GlueSetConfig,
    load_dataset,
    load_folder,
    load_mvtec,
)

SIZE = 32


def write_image(path: Path, value: int = 100, size: tuple[int, int] = (40, 48), color=None) -> Path:
    """A gray (or BGR ``color``) image with a bright square, so that images are not flat."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = size
    if color is None:
        image = np.full((height, width), value, np.uint8)
        image[4:12, 4:12] = 255 - value
    else:
        image = np.zeros((height, width, 3), np.uint8)
        image[:] = color
    assert cv2.imwrite(str(path), image)
    return path


def write_mask(path: Path, box=(10, 30, 12, 36), size: tuple[int, int] = (40, 48)) -> Path:
    """A 0/255 mask with a filled rectangle ``box`` = (y0, y1, x0, x1)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(size, np.uint8)
    y0, y1, x0, x1 = box
    mask[y0:y1, x0:x1] = 255
    assert cv2.imwrite(str(path), mask)
    return path


def mvtec(
    root: Path,
    *,
    n_train: int = 10,
    n_good: int = 2,
    defects: tuple[str, ...] = ("crack", "hole"),
    masks: bool = True,
    val: bool = False,
) -> Path:
    """An MVTec-AD-style tree ``root/widget`` of small gray images."""
    category = root / "widget"
    for i in range(n_train):
        write_image(category / "train" / "good" / f"{i:03d}.png", 80 + i)
    splits = [("test", "ground_truth")] + ([("val", "val_ground_truth")] if val else [])
    for split, truth in splits:
        for i in range(n_good):
            write_image(category / split / "good" / f"{i:03d}.png", 90 + i)
        for defect in defects:
            for i in range(2):
                write_image(category / split / defect / f"{i:03d}.png", 30 + i)
                if masks:
                    write_mask(category / truth / defect / f"{i:03d}_mask.png")
    return root


# ----------------------------------------------------------------------------- contents


def test_mvtec_splits_shapes_and_dtypes(tmp_path):
    splits = load_mvtec(mvtec(tmp_path), "widget", SIZE)
    assert (splits.name, splits.category, splits.image_size) == ("mvtec", "widget", SIZE)
    assert len(splits.test) == 2 + 2 * 2
    test = splits.test
    assert test.pixels.shape == (6, 3, SIZE, SIZE) and test.pixels.dtype == torch.uint8
    assert test.labels.tolist() == [1, 1, 0, 0, 1, 1]  # sorted: crack, good, hole
    assert test.defects == ["crack", "crack", "good", "good", "hole", "hole"]
    assert test.masks.shape == (6, SIZE, SIZE) and test.masks.dtype == torch.bool
    assert test.has_masks
    assert not test.masks[test.labels == 0].any()
    assert all(m.any() for m in test.masks[test.labels == 1])
    assert [Path(p).name for p in test.paths[:2]] == ["000.png", "001.png"]


def test_images_are_imagenet_normalised(tmp_path):
    splits = load_mvtec(mvtec(tmp_path), "widget", SIZE)
    pixels = splits.train.pixels.float() / 255
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = (pixels - mean) / std
    images = splits.train.images()
    assert images.dtype == torch.float32
    torch.testing.assert_close(images, expected)
    torch.testing.assert_close(splits.train.images([2, 0]), expected[[2, 0]])
    torch.testing.assert_close(splits.train.images(1), expected[1:2])
    torch.testing.assert_close(splits.train.images(np.int64(-1)), expected[-1:])
    torch.testing.assert_close(splits.train.images(slice(1, 3)), expected[1:3])


def test_gray_is_replicated_and_color_stays_rgb(tmp_path):
    root = mvtec(tmp_path)
    # A pure blue BGR image: OpenCV's (255, 0, 0) must end up in the third (blue) RGB channel.
    write_image(root / "widget" / "train" / "good" / "blue.png", color=(255, 0, 0))
    train = load_mvtec(root, "widget", SIZE).train
    index = [Path(p).name for p in train.paths].index("blue.png")
    blue = train.pixels[index]
    assert blue[2].min() == 255 and blue[0].max() == 0 and blue[1].max() == 0
    gray = train.pixels[(index + 1) % len(train)]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def deep_folder(root: Path, depth: int, *, scale: float = 1.0, n_normal: int = 10) -> np.ndarray:
    """A folder data set ``root/ok``, ``root/nok`` of 16-bit PNGs holding ``depth``-bit data (the
    8-bit pictures returned, widened by ``depth - 8`` bits plus noise in the low bits; ``scale``
    darkens them)."""
    rng = np.random.default_rng(depth)
    pictures = rng.integers(0, 256, (n_normal + 3, 40, 48), dtype=np.uint16)
    pictures[:, 4:12, 4:12] = 255  # every image reaches the top of the range
    for i, picture in enumerate(pictures):
        low = rng.integers(0, 2 ** (depth - 8), picture.shape, dtype=np.uint16)
        wide = ((picture << (depth - 8)) | low) * scale
        sub, name = ("ok", f"n{i:02d}") if i < n_normal else ("nok", f"a{i:02d}")
        (root / sub).mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(root / sub / f"{name}.png"), wide.astype(np.uint16))
    assert cv2.imread(str(root / "ok" / "n00.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    return pictures.astype(np.uint8)


def test_12_bit_data_in_16_bit_pngs_reads_like_its_8_bit_version(tmp_path):
    pictures = deep_folder(tmp_path, 12)
    splits = load_folder(tmp_path / "ok", tmp_path / "nok", (40, 48))
    assert (splits.bit_depth, splits.bit_depth_peak) == (12, 4095)
    assert "16-bit files read as 12-bit (auto, train max 4095)" in splits.describe()
    everything = torch.cat([splits.train.pixels, splits.val.pixels, splits.test.pixels])
    assert abs(everything.float().mean() - pictures.mean()) < 0.5  # ~128, not 7.5 (top 8 bits)
    by_name = {Path(p).stem: i for i, p in enumerate(splits.train.paths)}
    name, i = next(iter(by_name.items()))
    assert torch.equal(splits.train.pixels[i, 0], torch.from_numpy(pictures[int(name[1:])]))
    # Set, the same; set too low, the file is refused by name.
    again = load_folder(tmp_path / "ok", tmp_path / "nok", (40, 48), bit_depth=12)
    assert torch.equal(again.train.pixels, splits.train.pixels)
    assert "read as 12-bit (set)" in again.describe()
    with pytest.raises(
        DatasetError, match=r"n\d\d.png: holds the value 4\d+, above 1023.*needs 12"
    ):
        load_folder(tmp_path / "ok", tmp_path / "nok", (40, 48), bit_depth=10)
    # Set to 16, the top 8 bits as before: nearly black.
    assert load_folder(tmp_path / "ok", tmp_path / "nok", 32, bit_depth=16).train.pixels.max() < 16


def test_dark_16_bit_data_is_read_by_the_whole_training_set_not_one_image(tmp_path):
    deep_folder(tmp_path, 16, scale=0.05)  # dark 16-bit images: their peak is 3276
    bright = np.full((40, 48), 60000, np.uint16)
    assert cv2.imwrite(str(tmp_path / "ok" / "n99.png"), bright)  # one image uses the range
    splits = load_folder(tmp_path / "ok", tmp_path / "nok", 32)
    assert "n99.png" in "".join(splits.train.paths)
    assert splits.bit_depth == 16
    dark = [i for i, p in enumerate(splits.train.paths) if not p.endswith("n99.png")]
    assert splits.train.pixels[dark].max() < 16  # dark as they are, not brightened 16x
    # 8-bit data sets state nothing and read once, as always.
    plain = load_mvtec(mvtec(tmp_path / "mv"), "widget", SIZE)
    assert plain.bit_depth is None and "bit" not in plain.describe()


def test_batches(tmp_path):
    test = load_mvtec(mvtec(tmp_path), "widget", SIZE).test
    batches = list(test.batches(4))
    assert [len(b["index"]) for b in batches] == [4, 2]
    first = batches[0]
    assert first["image"].shape == (4, 3, SIZE, SIZE) and first["image"].dtype == torch.float32
    assert first["label"].dtype == torch.int64
    assert first["mask"].dtype == torch.float32 and set(first["mask"].unique().tolist()) <= {0, 1}
    torch.testing.assert_close(first["image"], test.images([0, 1, 2, 3]))
    assert [len(b["index"]) for b in test.batches(4, drop_last=True)] == [4]

    def order(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return torch.cat(
            [b["index"] for b in test.batches(4, shuffle=True, generator=generator)]
        ).tolist()

    assert sorted(order(0)) == list(range(6))
    assert order(0) == order(0)
    assert order(0) != order(1)
    with pytest.raises(ValueError, match="Generator"):
        next(test.batches(2, shuffle=True))
    with pytest.raises(ValueError, match="batch_size"):
        next(test.batches(0))


def test_subset_keeps_everything_aligned(tmp_path):
    test = load_mvtec(mvtec(tmp_path), "widget", SIZE).test
    part = test.subset([4, 2])
    assert isinstance(part, AnomalyDataset) and len(part) == 2
    assert part.defects == ["hole", "good"]
    assert part.labels.tolist() == [1, 0]
    assert torch.equal(part.pixels, test.pixels[[4, 2]])
    assert torch.equal(part.masks, test.masks[[4, 2]])
    assert part.paths == [test.paths[4], test.paths[2]]


def test_constructor_checks_shapes_and_mask_presence():
    pixels = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    labels = torch.tensor([0, 1])
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    made = AnomalyDataset(pixels, labels, masks, ["good", "cut"], ["a.png", "b.png"])
    assert made.has_masks and len(made) == 2
    unmasked = torch.tensor([True, False])
    assert not AnomalyDataset(
        pixels, labels, masks, ["good", "cut"], ["a", "b"], unmasked
    ).has_masks
    with pytest.raises(ValueError, match="one entry per image"):
        AnomalyDataset(pixels, labels, masks, ["good"], ["a.png"])
    with pytest.raises(ValueError, match="masks"):
        AnomalyDataset(pixels, labels, masks[:, :4], ["good", "cut"], ["a.png", "b.png"])
    with pytest.raises(ValueError, match="uint8"):
        AnomalyDataset(pixels.float(), labels, masks, ["good", "cut"], ["a.png", "b.png"])


def test_masks_are_resized_by_area(tmp_path):
    root = mvtec(tmp_path)
    # A mask covering the left half of a 40 x 48 image stays the left half at 32 x 32 ...
    for i in range(2):
        write_mask(root / "widget" / "ground_truth" / "crack" / f"{i:03d}_mask.png", (0, 40, 0, 24))
    # ... and a single pixel (a quarter of an output pixel) is kept rather than lost.
    write_mask(root / "widget" / "ground_truth" / "hole" / "000_mask.png", (20, 21, 20, 21))
    test = load_mvtec(root, "widget", SIZE).test
    half = test.masks[0]
    assert half[:, :16].all() and not half[:, 16:].any()
    assert test.masks[4].sum() >= 1


def test_validation_split_from_val_folder(tmp_path):
    splits = load_mvtec(mvtec(tmp_path, val=True), "widget", SIZE)
    assert len(splits.train) == 10  # all training images stay in training
    val = splits.val
    assert val.labels.sum() == 4 and (val.labels == 0).sum() == 2
    assert val.has_masks and all(m.any() for m in val.masks[val.labels == 1])
    assert all("/val/" in p for p in val.paths)


def test_validation_falls_back_to_a_seeded_share_of_train(tmp_path):
    root = mvtec(tmp_path, n_train=20)
    a = load_mvtec(root, "widget", SIZE, val_fraction=0.25, seed=0)
    assert (len(a.train), len(a.val)) == (15, 5)
    assert a.val.labels.sum() == 0  # normal only: thresholds cannot be fit on it
    assert not set(a.train.paths) & set(a.val.paths)
    assert load_mvtec(root, "widget", SIZE, val_fraction=0.25, seed=0).val.paths == a.val.paths
    assert load_mvtec(root, "widget", SIZE, val_fraction=0.25, seed=1).val.paths != a.val.paths


def test_anomalies_without_any_mask_load_for_image_metrics(tmp_path):
    test = load_mvtec(mvtec(tmp_path, masks=False), "widget", SIZE).test
    assert not test.has_masks
    assert not test.masks.any()


def test_image_suffixes_are_case_insensitive_and_others_ignored(tmp_path):
    root = mvtec(tmp_path, n_train=2)
    train = root / "widget" / "train" / "good"
    for name in ("a.PNG", "b.jpg", "c.JPEG", "d.bmp", "e.tif", "f.TIFF"):
        write_image(train / name)
    (train / "notes.txt").write_text("not an image")
    (train / ".hidden.png").write_bytes(b"editor swap file")
    splits = load_mvtec(root, "widget", SIZE, val_fraction=0.1)
    names = sorted(Path(p).name for p in splits.train.paths + splits.val.paths)
    assert names == ["000.png", "001.png", "a.PNG", "b.jpg", "c.JPEG", "d.bmp", "e.tif", "f.TIFF"]


def test_describe_is_one_line_with_the_counts(tmp_path):
    text = load_mvtec(mvtec(tmp_path), "widget", SIZE).describe()
    assert "\n" not in text
    assert text == "mvtec/widget 32px: train 9, val 1, test 6 (4 anomalous, masks)"


# ----------------------------------------------------------------------------- folder layout


def folder(root: Path, *, n_normal: int = 10, n_abnormal: int = 5, masks: str = "mask") -> Path:
    for i in range(n_normal):
        write_image(root / "ok" / f"n{i:02d}.png", 100 + i)
    for i in range(n_abnormal):
        write_image(root / "nok" / f"a{i:02d}.png", 20 + i)
        if masks == "mask":
            write_mask(root / "masks" / f"a{i:02d}_mask.png")
        elif masks == "plain":
            write_mask(root / "masks" / f"a{i:02d}.png")
    return root


@pytest.mark.parametrize("naming", ["mask", "plain"])
def test_folder_layout_splits_with_masks(tmp_path, naming):
    root = folder(tmp_path, masks=naming)
    splits = load_folder(root / "ok", root / "nok", SIZE, mask_dir=root / "masks", seed=3)
    assert (splits.name, splits.category) == ("folder", None)
    # 10 normal: 2 val (0.2), 3 test (0.3), 5 train; 5 anomalous: 1 val, 4 test.
    assert (len(splits.train), len(splits.val), len(splits.test)) == (5, 3, 7)
    assert splits.train.labels.sum() == 0
    assert splits.val.labels.sum() == 1 and splits.test.labels.sum() == 4
    everything = splits.train.paths + splits.val.paths + splits.test.paths
    assert len(set(everything)) == 15  # each image in exactly one split
    for split in (splits.val, splits.test):
        assert split.has_masks
        assert all(m.any() for m in split.masks[split.labels == 1])
        assert set(split.defects) <= {"good", "nok"}
    again = load_folder(root / "ok", root / "nok", SIZE, mask_dir=root / "masks", seed=3)
    assert again.test.paths == splits.test.paths
    other = load_folder(root / "ok", root / "nok", SIZE, mask_dir=root / "masks", seed=4)
    assert other.train.paths != splits.train.paths


def test_folder_without_masks(tmp_path):
    root = folder(tmp_path, masks="none")
    splits = load_folder(root / "ok", root / "nok", SIZE)
    assert not splits.test.has_masks


@pytest.mark.parametrize("how", ["same", "dotdot", "symlink", "linked_files", "copies"])
def test_folder_refuses_the_same_images_as_normal_and_anomalous(tmp_path, how):
    root = folder(tmp_path, masks="none")
    normal, abnormal = root / "ok", root / "nok"
    if how == "same":
        abnormal = normal
    elif how == "dotdot":
        abnormal = root / "nok" / ".." / "ok"
    elif how == "symlink":
        abnormal = root / "link"
        abnormal.symlink_to(normal, target_is_directory=True)
    else:
        abnormal = root / "mixed"
        abnormal.mkdir()
        for path in sorted((root / "nok").iterdir()):
            (abnormal / path.name).write_bytes(path.read_bytes())
        shared = abnormal / "n03.png"
        if how == "linked_files":
            shared.symlink_to(normal / "n03.png")
        else:
            shared.write_bytes((normal / "n03.png").read_bytes())
    with pytest.raises(DatasetError) as caught:
        load_folder(normal, abnormal, SIZE)
    message = str(caught.value)
    assert "dataset.normal_dir" in message and "dataset.abnormal_dir" in message
    assert str(abnormal) in message
    if how in ("linked_files", "copies"):
        assert "n03.png" in message and "(1:" in message


def test_folder_refuses_masks_that_are_the_images(tmp_path):
    root = folder(tmp_path, masks="none")
    with pytest.raises(
        DatasetError, match=r"dataset.mask_dir .*image files of dataset.abnormal_dir"
    ):
        load_folder(root / "ok", root / "nok", SIZE, mask_dir=root / "nok")


def test_folder_inside_the_other_shares_no_image_and_loads(tmp_path):
    # Only the images directly in each folder are read: defects/ below the normal folder is
    # a layout of distinct images.
    for i in range(10):
        write_image(tmp_path / "images" / f"n{i:02d}.png", 100 + i)
    for i in range(3):
        write_image(tmp_path / "images" / "defects" / f"a{i:02d}.png", 20 + i)
    splits = load_folder(tmp_path / "images", tmp_path / "images" / "defects", SIZE)
    paths = splits.train.paths + splits.val.paths + splits.test.paths
    assert len(paths) == len(set(paths)) == 13
    assert splits.test.num_anomalous + splits.val.num_anomalous == 3


# ----------------------------------------------------------------------------- load_dataset


def test_load_dataset_dispatches_by_kind(tmp_path):
    root = mvtec(tmp_path / "mv")
    splits = load_dataset("mvtec", root=root, category="widget", image_size=SIZE, val_fraction=0.2)
    assert len(splits.val) == 2
    folder(tmp_path / "f")
    splits = load_dataset(
        "folder", root=tmp_path / "f", image_size=SIZE, normal_dir="ok", abnormal_dir="nok"
    )
    assert splits.name == "folder" and len(splits.test) == 3 + 4


def test_load_dataset_synthetic_glue_generates_then_loads(tmp_path):
    config = GlueSetConfig(
        n_train=4,
        n_val_good=2,
        n_val_defect=1,
        n_test_good=2,
        n_test_defect=1,
        height=96,
        width=128,
        defect_types=("warp_large", "missing"),
    )
    splits = load_dataset(
        "synthetic_glue", root=tmp_path, category="part6", image_size=SIZE, config=config
    )
    assert splits.name == "synthetic_glue" and splits.category == "part6"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4, 4, 4)
    assert splits.val.labels.sum() == 2 and splits.val.has_masks  # validation anomalies
    assert splits.test.has_masks and all(m.any() for m in splits.test.masks[2:])
    assert splits.test.defects == ["good", "good", "missing", "warp_large"]
    # A second load reuses the generated files.
    assert data.load_synthetic_glue(tmp_path, "part6", SIZE, config=config).test.paths == (
        splits.test.paths
    )


# ----------------------------------------------------------------------------- bad input


def corrupt(root: Path) -> Path:
    path = root / "widget" / "train" / "good" / "003.png"
    path.write_text("this is not a png")
    return path


def truncated(root: Path) -> Path:
    path = root / "widget" / "test" / "hole" / "001.png"
    path.write_bytes(path.read_bytes()[:60])
    return path


def empty(root: Path) -> Path:
    path = root / "widget" / "test" / "good" / "000.png"
    path.write_bytes(b"")
    return path


def wrong_mask_size(root: Path) -> Path:
    return write_mask(root / "widget" / "ground_truth" / "crack" / "001_mask.png", size=(20, 20))


def missing_one_mask(root: Path) -> Path:
    (root / "widget" / "ground_truth" / "hole" / "001_mask.png").unlink()
    return root / "widget" / "test" / "hole" / "001.png"


def no_train(root: Path) -> Path:
    for path in (root / "widget" / "train" / "good").iterdir():
        path.unlink()
    return root / "widget" / "train" / "good"


def no_anomalies(root: Path) -> Path:
    for defect in ("crack", "hole"):
        for path in (root / "widget" / "test" / defect).iterdir():
            path.unlink()
        (root / "widget" / "test" / defect).rmdir()
    return root / "widget" / "test"


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (corrupt, "not a readable image"),
        (truncated, "not a readable image"),
        (empty, "empty file"),
        (wrong_mask_size, "mask is 20x20"),
        (missing_one_mask, "1 of 4 anomalous images have no mask"),
        (no_train, "no training images"),
        (no_anomalies, "no anomalous test images"),
    ],
)
def test_bad_mvtec_data_names_the_path(tmp_path, damage, needle):
    root = mvtec(tmp_path)
    culprit = damage(root)
    with pytest.raises(DatasetError, match=needle) as caught:
        load_mvtec(root, "widget", SIZE)
    assert str(culprit) in str(caught.value)


def test_missing_root_and_category(tmp_path):
    with pytest.raises(DatasetError, match="not found") as caught:
        load_mvtec(tmp_path / "nowhere", "widget", SIZE)
    assert str(tmp_path / "nowhere") in str(caught.value)
    root = mvtec(tmp_path)
    with pytest.raises(DatasetError, match=r"category not found.*widget") as caught:
        load_mvtec(root, "gadget", SIZE)
    assert str(root / "gadget") in str(caught.value)


def test_bad_folder_data_names_the_path(tmp_path):
    root = folder(tmp_path)
    with pytest.raises(DatasetError) as caught:
        load_folder(root / "ok", root / "absent", SIZE)
    assert str(root / "absent") in str(caught.value)
    (root / "empty").mkdir()
    with pytest.raises(DatasetError, match="no anomalous images") as caught:
        load_folder(root / "ok", root / "empty", SIZE)
    assert str(root / "empty") in str(caught.value)
    with pytest.raises(DatasetError, match="no mask matches") as caught:
        load_folder(root / "ok", root / "nok", SIZE, mask_dir=root / "ok")
    assert str(root / "ok") in str(caught.value)
    (root / "masks" / "a03_mask.png").unlink()
    with pytest.raises(DatasetError, match="have no mask") as caught:
        load_folder(root / "ok", root / "nok", SIZE, mask_dir=root / "masks")
    assert str(root / "nok" / "a03.png") in str(caught.value)
    small = folder(tmp_path / "small", n_normal=2)
    with pytest.raises(DatasetError, match=r"2 normal image.*too few") as caught:
        load_folder(small / "ok", small / "nok", SIZE)
    assert str(small / "ok") in str(caught.value)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"kind": "imagenet"}, "unknown dataset kind 'imagenet'.*synthetic_glue, mvtec, folder"),
        ({"kind": "mvtec", "val_fractoin": 0.1}, "unknown option.*val_fractoin.*val_fraction"),
        ({"kind": "mvtec", "category": None}, "needs a root directory and a category"),
        ({"kind": "folder", "normal_dir": "ok"}, "abnormal_dir"),
        ({"kind": "mvtec", "image_size": 0}, "image_size"),
        ({"kind": "mvtec", "val_fraction": 1.0}, "val_fraction"),
    ],
)
def test_bad_load_dataset_arguments(tmp_path, kwargs, needle):
    args = {"root": mvtec(tmp_path), "category": "widget", "image_size": SIZE, **kwargs}
    with pytest.raises(DatasetError, match=needle):
        load_dataset(**args)


def test_synthetic_glue_refuses_a_foreign_directory(tmp_path):
    root = mvtec(tmp_path)  # root/widget is not a generated data set
    (root / "part1").mkdir()
    with pytest.raises(DatasetError, match="manifest") as caught:
        load_dataset("synthetic_glue", root=root, category="part1", image_size=SIZE)
    assert str(root / "part1") in str(caught.value)


def test_every_kind_takes_resize_and_roi_and_a_defect_cropped_away_is_normal(tmp_path):
    from sweep.run import metrics
    from sweep.run.trainable import restrict_outputs

    root = mvtec(tmp_path)  # 40 x 48 (H x W); crop to square keeps columns 4-43
    write_mask(root / "widget" / "ground_truth" / "crack" / "000_mask.png", (10, 30, 44, 48))
    roi = write_mask(tmp_path / "roi.png", (0, 40, 0, 48))
    splits = load_dataset(
        "mvtec", root=root, category="widget", image_size=SIZE, resize="crop", roi=roi
    )
    assert splits.resize == "crop" and splits.roi is not None
    test = splits.test
    cropped = test.paths.index(str(root / "widget" / "test" / "crack" / "000.png"))
    assert test.labels[cropped] == 1 and not test.masks[cropped].any()
    outputs = metrics.SplitOutputs(
        test.labels.numpy(), np.zeros(len(test)), test.masks.numpy(), None
    )
    labels = restrict_outputs(splits, test, outputs).labels
    assert labels[cropped] == 0 and labels.sum() == test.num_anomalous - 1
    with pytest.raises(DatasetError, match="resize: expected one of stretch, pad, crop"):
        load_dataset("mvtec", root=root, category="widget", image_size=SIZE, resize="fit")
