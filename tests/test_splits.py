"""Splits drawn again (data/splits.py) on small in-memory data sets: every image lands in one
split with its pixels, mask and defect, the counts follow the arguments, and a seed fixes it."""

from __future__ import annotations

import pytest
import torch

from data.anomalies import SYNTHETIC_KINDS
from data.datasets import AnomalyDataset, DatasetSplits
from data.errors import DatasetError
from data.splits import resplit, synthetic_validation, validation_from_test

SIZE = 8


def _dataset(prefix: str, normal: int, anomalous: int, seed: int) -> AnomalyDataset:
    """Random images, normal ones first; every third anomaly has no mask file."""
    g = torch.Generator().manual_seed(seed)
    n = normal + anomalous
    labels = torch.tensor([0] * normal + [1] * anomalous)
    masks = torch.zeros(n, SIZE, SIZE, dtype=torch.bool)
    present = torch.ones(n, dtype=torch.bool)
    for k, i in enumerate(range(normal, n)):
        if k % 3 == 2:
            present[i] = False
            continue
        top, left = torch.randint(0, SIZE - 2, (2,), generator=g).tolist()
        masks[i, top : top + 2, left : left + 1 + k % 2] = True
    return AnomalyDataset(
        pixels=torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=g),
        labels=labels,
        masks=masks,
        defects=["good"] * normal + [f"crack{k % 2}" for k in range(anomalous)],
        paths=[f"{prefix}/{i:02d}.png" for i in range(n)],
        mask_present=present,
    )


def _splits(train=12, val=(4, 2), test=(6, 6)) -> DatasetSplits:
    return DatasetSplits(
        train=_dataset("train", train, 0, 1),
        val=_dataset("val", *val, 2),
        test=_dataset("test", *test, 3),
        name="toy",
        category=None,
        image_size=SIZE,
    )


def _images(data: AnomalyDataset) -> dict[str, tuple]:
    """path -> (pixels, mask, label, defect, mask present): what must stay together."""
    return {
        path: (data.pixels[i], data.masks[i], int(data.labels[i]), data.defects[i], bool(p))
        for i, (path, p) in enumerate(zip(data.paths, data.mask_present.tolist(), strict=True))
    }


def _assert_same_images(split: AnomalyDataset, reference: dict[str, tuple]) -> None:
    for path, (pixels, mask, label, defect, present) in _images(split).items():
        ref_pixels, ref_mask, ref_label, ref_defect, ref_present = reference[path]
        assert torch.equal(pixels, ref_pixels) and torch.equal(mask, ref_mask), path
        assert (label, defect, present) == (ref_label, ref_defect, ref_present), path


def _all_images(splits: DatasetSplits) -> dict[str, tuple]:
    return {**_images(splits.train), **_images(splits.val), **_images(splits.test)}


def _counts(data: AnomalyDataset) -> tuple[int, int]:
    return len(data) - data.num_anomalous, data.num_anomalous


# --------------------------------------------------------------------------- the data set


def test_concat_keeps_order_and_every_attribute():
    a, b = _dataset("a", 2, 3, 0), _dataset("b", 1, 2, 1)
    both = AnomalyDataset.concat([a, b])
    assert both.paths == a.paths + b.paths and both.defects == a.defects + b.defects
    assert torch.equal(both.pixels, torch.cat([a.pixels, b.pixels]))
    assert torch.equal(both.masks, torch.cat([a.masks, b.masks]))
    assert both.labels.tolist() == a.labels.tolist() + b.labels.tolist()
    assert both.mask_present.tolist() == a.mask_present.tolist() + b.mask_present.tolist()
    assert not both.has_masks  # a's third anomaly has no mask file
    with pytest.raises(ValueError, match="at least one"):
        AnomalyDataset.concat([])


def test_defect_pixels_none_without_a_mask_and_zero_for_normal_images():
    data = _dataset("d", 2, 3, 0)
    expected = [0, 0, int(data.masks[2].sum()), int(data.masks[3].sum()), None]
    assert data.defect_pixels == expected
    assert expected[2] > 0 and expected[3] > 0


def test_val_source_defaults_to_the_data_sets_own_split():
    assert _splits().val_source == "split"


# --------------------------------------------------------------------------- resplit


@pytest.mark.parametrize("test_fraction", [None, 0.2, 0.5])
def test_resplit_partitions_the_pool_with_the_requested_counts(test_fraction):
    original = _splits()
    pool = _all_images(original)
    normal_total = sum(1 for v in pool.values() if v[2] == 0)
    drawn = resplit(original, seed=4, test_fraction=test_fraction)
    paths = drawn.train.paths + drawn.val.paths + drawn.test.paths
    assert sorted(paths) == sorted(pool) and len(set(paths)) == len(paths)
    for split in (drawn.train, drawn.val, drawn.test):
        _assert_same_images(split, pool)
        # The pooled order (train, val, test, each by index) is kept inside every split.
        order = list(pool)
        positions = [order.index(p) for p in split.paths]
        assert positions == sorted(positions)
    assert drawn.train.num_anomalous == 0
    assert _counts(drawn.val) == _counts(original.val) == (4, 2)
    test_normal = 6 if test_fraction is None else round(test_fraction * normal_total)
    assert _counts(drawn.test) == (test_normal, 6)
    assert len(drawn.train) == normal_total - 4 - test_normal
    assert (drawn.name, drawn.val_source) == ("toy", "split")


def test_resplit_without_validation_anomalies_sends_them_all_to_test():
    drawn = resplit(_splits(val=(4, 0)), seed=0)
    assert _counts(drawn.val) == (4, 0) and _counts(drawn.test) == (6, 6)


def test_resplit_is_fixed_by_its_seed():
    original = _splits()

    def paths(seed):
        drawn = resplit(original, seed=seed, test_fraction=0.25)
        return drawn.train.paths, drawn.val.paths, drawn.test.paths

    assert paths(3) == paths(3)
    assert paths(3) != paths(4)
    # Anomalies are drawn too, not only normal images.
    assert resplit(original, seed=3).val.paths[-2:] != resplit(original, seed=5).val.paths[-2:]


def test_resplit_rejects_a_test_share_that_leaves_no_training_image():
    # 22 normal images: 4 stay for validation, so a test share of 0.9 (20) leaves none.
    with pytest.raises(DatasetError, match=r"^toy: 22 normal image\(s\) are too few"):
        resplit(_splits(), seed=0, test_fraction=0.9)
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(DatasetError, match="test_fraction"):
            resplit(_splits(), seed=0, test_fraction=bad)


# --------------------------------------------------------------------------- from test


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_validation_from_test_moves_a_share_of_each_class(fraction):
    original = _splits(test=(10, 5))
    moved_splits = validation_from_test(original, fraction=fraction, seed=2)
    assert moved_splits.val_source == "from_test"
    assert moved_splits.train is original.train
    val, test = moved_splits.val, moved_splits.test
    # The original validation images first, then those that left the test split.
    assert val.paths[:6] == original.val.paths
    moved = val.paths[6:]
    assert sorted(moved + test.paths) == sorted(original.test.paths)
    assert not set(moved) & set(test.paths)
    _assert_same_images(val, _all_images(original))
    _assert_same_images(test, _all_images(original))
    moved_normal, moved_anomalous = _counts(val.subset(range(6, len(val))))
    assert 1 <= moved_anomalous <= 4 and test.num_anomalous >= 1
    assert abs(moved_anomalous - fraction * 5) <= 1  # at least one, at most all but one
    assert abs(moved_normal - fraction * 10) <= 0.5


def test_validation_from_test_is_fixed_by_its_seed():
    original = _splits(test=(10, 6))
    first = validation_from_test(original, fraction=0.5, seed=1)
    assert first.val.paths == validation_from_test(original, fraction=0.5, seed=1).val.paths
    assert first.val.paths != validation_from_test(original, fraction=0.5, seed=2).val.paths


def test_validation_from_test_needs_two_test_anomalies():
    with pytest.raises(DatasetError, match=r"^toy: the test split has 1 anomalous image\(s\)"):
        validation_from_test(_splits(test=(6, 1)), fraction=0.5, seed=0)
    with pytest.raises(DatasetError, match="val_from_test"):
        validation_from_test(_splits(), fraction=1.0, seed=0)


# --------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("kind", SYNTHETIC_KINDS)
def test_synthetic_validation_turns_half_the_normal_images_into_anomalies(kind):
    original = _splits(val=(5, 3))
    made = synthetic_validation(original, kind=kind, seed=3)
    assert made.val_source == "synthetic"
    assert made.train is original.train and made.test is original.test
    val = made.val
    synthetic = [i for i, p in enumerate(val.paths) if p.endswith(f"#synthetic_{kind}")]
    assert len(synthetic) == 2 and len(val) == len(original.val)
    kept = [p for i, p in enumerate(val.paths) if i not in synthetic]
    assert sorted(kept + [val.paths[i].split("#")[0] for i in synthetic]) == sorted(
        original.val.paths
    )
    _assert_same_images(
        val.subset([i for i in range(len(val)) if i not in synthetic]), _images(original.val)
    )
    assert _counts(val) == (3, 5)
    source = _images(original.val)
    for i in synthetic:
        pixels, _, label, *_ = source[val.paths[i].split("#")[0]]
        assert label == 0  # made from a normal image
        assert int(val.labels[i]) == 1 and val.defects[i] == f"synthetic_{kind}"
        assert val.mask_present[i] and val.masks[i].any()
        inside = val.masks[i]
        assert (val.pixels[i][:, inside] != pixels[:, inside]).any()
    assert val.has_masks is False  # one original anomaly still has no mask file
    again = synthetic_validation(original, kind=kind, seed=3)
    assert again.val.paths == val.paths and torch.equal(again.val.pixels, val.pixels)
    assert torch.equal(again.val.masks, val.masks)


def test_synthetic_validation_draws_its_images_from_the_seed():
    original = _splits(val=(8, 0))
    picked = {
        tuple(p for p in synthetic_validation(original, seed=s).val.paths if "#" in p)
        for s in range(4)
    }
    assert len(picked) > 1


def test_synthetic_validation_errors_name_the_problem():
    with pytest.raises(DatasetError, match=r"unknown anomaly kind 'scratch' \(known: perlin"):
        synthetic_validation(_splits(), kind="scratch", seed=0)
    with pytest.raises(DatasetError, match=r"^toy: the validation split has 1 normal image\(s\)"):
        synthetic_validation(_splits(val=(1, 2)), seed=0)
