"""Splits drawn again: the split seed and the test share as study axes, and validation
anomalies for data sets whose validation split has none.

The VIN-label study re-draws its train/validation/test split with every seed and ablates the
test share (0.10 / 0.15 / 0.20): the variance a split adds is part of what it measures.
:func:`resplit` pools every image of a loaded data set and draws the three splits again.

A decision threshold is fit on the validation split, which needs anomalies. MVTec AD without a
``val/`` folder has none; :func:`validation_from_test` moves a seeded share of the test images
to validation (anomalib's ``from_test``) and :func:`synthetic_validation` turns half of the
normal validation images into synthetic anomalies (anomalib's ``synthetic``), leaving the test
split as it is.

Supervised detectors train on labelled defects: :func:`labelled_split` moves ``N`` defect
images of every defect type out of the test split into a labelled training split, so that the
test split every detector of that ``N`` is scored on holds none of them.

Every draw takes its generator from the seed it is given: trials that share that seed share
their splits, so their scores compare.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from data.anomalies import SYNTHETIC_KINDS, synthesize
from data.datasets import AnomalyDataset, DatasetSplits
from data.errors import DatasetError

__all__ = [
    "VALIDATION_SOURCES",
    "labelled_split",
    "resplit",
    "synthetic_validation",
    "validation_from_test",
]

VALIDATION_SOURCES = ("split", "from_test", "synthetic")
"""Where a trial's validation anomalies come from: the data set's own validation split, a
share of its test split, or synthetic anomalies made from normal validation images."""


def _draw(indices: np.ndarray, take: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """``take`` of ``indices`` drawn by ``rng`` and the rest, both in their original order."""
    chosen = np.zeros(indices.size, dtype=bool)
    chosen[rng.permutation(indices.size)[:take]] = True
    return indices[chosen], indices[~chosen]


def resplit(splits: DatasetSplits, *, seed: int, test_fraction: float | None = None):
    """The data set's images pooled and split again from ``seed``.

    Normal images: ``test_fraction`` of them go to test (default: the share the test split
    had), as many as the validation split had go to validation, the rest to training.
    Anomalous images: to validation and test in the proportion the splits had (all to test
    when validation had none). Each split keeps the pooled order (train, val, test), so the
    same seed always gives the same splits.
    """
    if test_fraction is not None and not 0 < test_fraction < 1:
        raise DatasetError(f"test_fraction: expected a number in (0, 1), got {test_fraction!r}")
    pool = AnomalyDataset.concat([splits.train, splits.val, splits.test])
    labels = pool.labels.numpy()
    normal, anomalous = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    val_normal = int((splits.val.labels == 0).sum())
    val_anomalous = splits.val.num_anomalous
    if test_fraction is None:
        test_normal = int((splits.test.labels == 0).sum())
    else:
        test_normal = max(1, round(test_fraction * normal.size))
    if normal.size - test_normal - val_normal < 1:
        raise DatasetError(
            f"{splits.name}: {normal.size} normal image(s) are too few for {test_normal} test "
            f"and {val_normal} validation image(s): no training image is left"
        )
    rng = np.random.default_rng([seed, 0x5B1])
    test_n, rest = _draw(normal, test_normal, rng)
    val_n, train_n = _draw(rest, val_normal, rng)
    val_a, test_a = _draw(anomalous, val_anomalous, rng)
    return dataclasses.replace(
        splits,
        train=pool.subset(train_n),
        val=pool.subset(np.sort(np.concatenate([val_n, val_a]))),
        test=pool.subset(np.sort(np.concatenate([test_n, test_a]))),
    )


def validation_from_test(splits: DatasetSplits, *, fraction: float, seed: int):
    """``fraction`` of the test images, normal and anomalous alike (at least one anomaly),
    moved to the validation split and out of the test split."""
    if not 0 < fraction < 1:
        raise DatasetError(f"val_from_test: expected a number in (0, 1), got {fraction!r}")
    labels = splits.test.labels.numpy()
    normal, anomalous = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    if anomalous.size < 2:
        raise DatasetError(
            f"{splits.name}: the test split has {anomalous.size} anomalous image(s); moving "
            "some to validation needs at least 2 (one stays for testing)"
        )
    rng = np.random.default_rng([seed, 0x7E5])
    take_anomalous = min(anomalous.size - 1, max(1, round(fraction * anomalous.size)))
    moved_a, kept_a = _draw(anomalous, take_anomalous, rng)
    take_normal = min(normal.size - 1, round(fraction * normal.size)) if normal.size else 0
    moved_n, kept_n = _draw(normal, max(0, take_normal), rng)
    moved = splits.test.subset(np.sort(np.concatenate([moved_n, moved_a])))
    return dataclasses.replace(
        splits,
        val_source="from_test",
        val=AnomalyDataset.concat([splits.val, moved]),
        test=splits.test.subset(np.sort(np.concatenate([kept_n, kept_a]))),
    )


def synthetic_validation(splits: DatasetSplits, *, kind: str = "cutpaste", seed: int):
    """Half of the normal validation images (drawn from ``seed``) replaced by synthetic
    anomalies of ``kind`` (:data:`data.anomalies.SYNTHETIC_KINDS`) made from them, with their
    masks; the other half stay normal. Training and test splits are untouched."""
    if kind not in SYNTHETIC_KINDS:
        raise DatasetError(
            f"synthetic validation: unknown anomaly kind {kind!r} "
            f"(known: {', '.join(SYNTHETIC_KINDS)})"
        )
    val = splits.val
    normal = np.flatnonzero(val.labels.numpy() == 0)
    if normal.size < 2:
        raise DatasetError(
            f"{splits.name}: the validation split has {normal.size} normal image(s); synthetic "
            "validation anomalies need at least 2 (half of them become anomalous)"
        )
    rng = np.random.default_rng([seed, 0x5A7])
    altered, _ = _draw(normal, normal.size // 2, rng)
    source = val.subset(altered)
    images, masks = synthesize(source.pixels.float() / 255.0, kind, seed=seed)
    pixels = (images.clamp(0, 1) * 255.0).round().to(torch.uint8)
    anomalies = AnomalyDataset(
        pixels=pixels,
        labels=torch.ones(len(source), dtype=torch.int64),
        masks=masks[:, 0] > 0.5,
        defects=[f"synthetic_{kind}"] * len(source),
        paths=[f"{path}#synthetic_{kind}" for path in source.paths],
    )
    others = np.setdiff1d(np.arange(len(val)), altered)
    return dataclasses.replace(
        splits, val_source="synthetic", val=AnomalyDataset.concat([val.subset(others), anomalies])
    )


def labelled_split(splits: DatasetSplits, *, per_type: int, seed: int):
    """``per_type`` anomalous test images of every defect type, drawn from ``seed``, moved out
    of the test split into ``splits.labelled`` (the training defects of supervised detectors).

    The draws are nested: per type one permutation from ``seed`` is cut at ``per_type``, so a
    larger budget labels a superset of a smaller one's images and tests on a subset of its test
    images. ``per_type`` 0 returns ``splits`` unchanged. A type with ``per_type`` or fewer test
    images (none would be left to test on) is a :class:`DatasetError` naming it.
    """
    if isinstance(per_type, bool) or not isinstance(per_type, int) or per_type < 0:
        raise DatasetError(f"labelled_defects: expected an int >= 0, got {per_type!r}")
    if per_type == 0:
        return splits
    test = splits.test
    labels = test.labels.numpy()
    defects = np.asarray(test.defects, dtype=object)
    types = sorted({d for d, label in zip(test.defects, labels, strict=True) if label == 1})
    if not types:
        raise DatasetError(
            f"{splits.name}: labelled_defects: {per_type} needs anomalous test images, and the "
            "test split has none"
        )
    counts = {t: int(np.sum((defects == t) & (labels == 1))) for t in types}
    short = {t: n for t, n in counts.items() if n <= per_type}
    if short:
        listed = ", ".join(f"{t!r} has {n}" for t, n in sorted(short.items()))
        raise DatasetError(
            f"{splits.name}: labelled_defects: {per_type} per defect type leaves no test image of "
            f"some types ({listed}); give a smaller labelled_defects or more test defects"
        )
    rng = np.random.default_rng([seed, 0x1AB])
    moved = []
    for defect in types:
        indices = np.flatnonzero((defects == defect) & (labels == 1))
        moved.append(indices[rng.permutation(indices.size)[:per_type]])
    chosen = np.sort(np.concatenate(moved))
    kept = np.setdiff1d(np.arange(len(test)), chosen)
    return dataclasses.replace(splits, labelled=test.subset(chosen), test=test.subset(kept))
