"""Metrics against scikit-learn, brute force and hand-worked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import f1_score, roc_auc_score

from sweep.run.metrics import (
    AT_IMAGE_THRESHOLD,
    AT_PIXEL_THRESHOLD,
    IMAGE_COUNTS,
    METRIC_KEYS,
    SplitOutputs,
    aupro,
    auroc,
    evaluate,
    f1_at,
    f1_max,
)


def _random_case(rng: np.random.Generator, size: int, decimals: int):
    labels = rng.integers(0, 2, size)
    # Rounding makes ties common, including ties between positives and negatives.
    scores = np.round(rng.normal(size=size) + 0.8 * labels, decimals)
    return labels, scores


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    checked = 0
    for _ in range(60):
        labels, scores = _random_case(rng, int(rng.integers(2, 80)), int(rng.integers(0, 3)))
        if labels.min() == labels.max():
            continue
        assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        checked += 1
    assert checked > 40


def test_auroc_perfect_inverted_and_constant():
    labels = np.array([0, 0, 1, 1])
    assert auroc(labels, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auroc(labels, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert auroc(labels, [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_auroc_accepts_torch_tensors_and_nd_arrays():
    masks = torch.tensor([[[0, 1], [1, 0]], [[0, 0], [0, 1]]], dtype=torch.bool)
    maps = torch.tensor([[[0.1, 0.7], [0.6, 0.2]], [[0.3, 0.1], [0.2, 0.9]]])
    expected = roc_auc_score(masks.numpy().ravel(), maps.numpy().ravel())
    assert auroc(masks, maps) == pytest.approx(expected)


def test_auroc_nan_when_one_class_absent():
    assert math.isnan(auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(auroc([0, 0], [0.1, 0.2]))
    assert math.isnan(auroc([], []))


@pytest.mark.parametrize("seed", range(3))
def test_f1_max_equals_brute_force_over_every_threshold(seed):
    rng = np.random.default_rng(100 + seed)
    for _ in range(30):
        labels, scores = _random_case(rng, int(rng.integers(2, 60)), int(rng.integers(0, 3)))
        if not labels.any():
            continue
        brute = max(f1_score(labels, scores >= t, zero_division=0.0) for t in np.unique(scores))
        best, threshold = f1_max(labels, scores)
        assert best == pytest.approx(brute, abs=1e-12)
        # The threshold returned achieves the best F1 under the same ">=" rule.
        assert f1_at(labels, scores, threshold) == pytest.approx(best, abs=1e-12)
        assert f1_score(labels, scores >= threshold) == pytest.approx(best, abs=1e-12)


def test_f1_max_prefers_the_highest_threshold_on_ties():
    # t=0.9: TP 1, FP 0, FN 1 -> 2/3;  t=0.5: 1, 1, 1 -> 1/2;  t=0.4: 1, 2, 1 -> 2/5;
    # t=0.1: TP 2, FP 2, FN 0 -> 4/6 = 2/3. Tie between 0.9 and 0.1: the higher is kept.
    labels = np.array([1, 0, 0, 1])
    scores = np.array([0.9, 0.5, 0.4, 0.1])
    best, threshold = f1_max(labels, scores)
    assert best == pytest.approx(2 / 3)
    assert threshold == 0.9


def test_f1_at_hand_example_and_nan_cases():
    labels = np.array([0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.6, 0.4, 0.7, 0.9])
    # >= 0.5 predicts {0.6, 0.7, 0.9}: TP 2, FP 1, FN 1 -> F1 = 4 / (4 + 1 + 1) = 2/3.
    assert f1_at(labels, scores, 0.5) == pytest.approx(2 / 3)
    # A threshold above every score predicts nothing: TP 0 -> F1 0.
    assert f1_at(labels, scores, 2.0) == 0.0
    assert math.isnan(f1_at([0, 0], [0.1, 0.2], 0.1))
    assert math.isnan(f1_at(labels, scores, float("nan")))
    assert all(math.isnan(v) for v in f1_max([0, 0, 0], [0.1, 0.2, 0.3]))


def test_bad_inputs_raise_naming_the_argument():
    with pytest.raises(ValueError, match=r"labels.*binary"):
        auroc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="differ in size"):
        auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"scores.*non-finite"):
        f1_max([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), fpr_limit=0.0)


# ----------------------------------------------------------------------------------- AUPRO


def _hand_case():
    """Two 3x3 images, the worked example of :func:`test_aupro_hand_worked_example`."""
    masks = np.zeros((2, 3, 3), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: ONE 8-connected region
    masks[1, 2, 2] = True  # a second region of one pixel
    maps = np.zeros((2, 3, 3), dtype=np.float32)
    maps[0, 0, 0], maps[0, 1, 1] = 0.9, 0.5  # region 1
    maps[1, 2, 2] = 0.6  # region 2, tied with two normal pixels
    maps[0, 0, 1] = 0.8  # normal pixels: one at 0.8, two at 0.6, three at 0.4, nine at 0
    maps[1, 0, 0] = maps[1, 0, 1] = 0.6
    maps[0, 2, 0] = maps[0, 2, 1] = maps[1, 1, 0] = 0.4
    return masks, maps


def test_aupro_hand_worked_example():
    # 2 regions (sizes 2 and 1), 15 normal pixels. Walking the distinct scores:
    #   t=0.9: FPR 0,          PRO (1/2 + 0)/2 = 0.25
    #   t=0.8: FPR 1/15,       PRO 0.25
    #   t=0.6: FPR 3/15 = 0.2, PRO (1/2 + 1)/2 = 0.75  (tie: a sloped segment from 1/15)
    #   t=0.5: FPR 0.2,        PRO 1
    #   t=0.4: FPR 0.4,        PRO 1
    #   t=0  : FPR 1,          PRO 1
    # Area up to 0.3: 0.25 * 1/15 + (2/15) * (0.25 + 0.75)/2 + 0.1 * 1 = 11/60, so
    # AUPRO@0.3 = (11/60) / 0.3 = 11/18.
    # Up to 0.1 the limit falls inside the sloped segment: PRO(0.1) = 0.25 + 0.5 * (1/30)/(2/15)
    # = 0.375, area = 1/60 + (1/30) * (0.25 + 0.375)/2 = 13/480, AUPRO@0.1 = 13/48.
    masks, maps = _hand_case()
    assert aupro(masks, maps) == pytest.approx(11 / 18, abs=1e-12)
    assert aupro(masks, maps, fpr_limit=0.1) == pytest.approx(13 / 48, abs=1e-12)
    # The whole curve: 0.25 * 1/15 + (2/15) * 0.5 + 0.8 * 1 (with 4-connectivity region 1
    # would be two regions and every value above would change).
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(
        0.25 / 15 + (2 / 15) * 0.5 + 0.8, abs=1e-12
    )


def _brute_force_aupro(masks, maps, fpr_limit):
    """Per-threshold loop straight from the definition (scipy labelling, 8-connectivity)."""
    regions = []
    for mask, amap in zip(masks, maps, strict=True):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [amap[labelled == k] for k in range(1, count + 1)]
    normal = maps[~masks]
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        points.append((np.mean(normal >= t), np.mean([np.mean(region >= t) for region in regions])))
    fpr, pro = np.array(points).T
    grid_fpr = np.append(fpr[fpr <= fpr_limit], fpr_limit)
    # Interpolating PRO at the limit from the first point past it (FPR is sorted).
    beyond = int(np.argmax(fpr > fpr_limit)) if np.any(fpr > fpr_limit) else len(fpr) - 1
    below = beyond - 1
    slope = (pro[beyond] - pro[below]) / max(fpr[beyond] - fpr[below], 1e-300)
    grid_pro = np.append(pro[fpr <= fpr_limit], pro[below] + slope * (fpr_limit - fpr[below]))
    area = np.sum(np.diff(grid_fpr) * (grid_pro[1:] + grid_pro[:-1]) / 2)
    return area / fpr_limit


@pytest.mark.parametrize("seed", range(4))
def test_aupro_matches_brute_force_on_random_blobs(seed):
    rng = np.random.default_rng(seed)
    masks = rng.random((3, 12, 12)) > 0.85
    masks[0] = False  # one image without any defect still counts in the FPR
    maps = np.round(rng.random((3, 12, 12)) + 0.6 * masks, 1).astype(np.float32)
    for limit in (0.05, 0.3, 1.0):
        assert aupro(masks, maps, limit) == pytest.approx(
            _brute_force_aupro(masks, maps, limit), abs=1e-9
        )


def test_aupro_perfect_map_is_one_and_degenerate_is_nan():
    masks, _ = _hand_case()
    assert aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0)
    assert aupro(masks, 1.0 - masks.astype(np.float32)) == pytest.approx(0.0)
    assert math.isnan(aupro(np.zeros((2, 4, 4)), np.ones((2, 4, 4))))
    assert math.isnan(aupro(np.ones((1, 4, 4)), np.ones((1, 4, 4))))


# -------------------------------------------------------------------------------- evaluate


def _split(rng, n_normal, n_anomalous, size=8, pixel=True, maps=True):
    labels = np.array([0] * n_normal + [1] * n_anomalous)
    masks = np.zeros((labels.size, size, size), dtype=bool)
    for i in np.flatnonzero(labels):
        r, c = rng.integers(0, size - 3, 2)
        masks[i, r : r + 3, c : c + 3] = True
    amap = (rng.random(masks.shape) + masks).astype(np.float32)
    return SplitOutputs(
        labels=labels,
        scores=amap.reshape(labels.size, -1).max(axis=1) + rng.normal(0, 0.3, labels.size),
        masks=masks if pixel else None,
        maps=amap if maps else None,
    )


def test_evaluate_returns_every_key_and_consistent_values():
    rng = np.random.default_rng(0)
    val, test = _split(rng, 6, 6), _split(rng, 8, 8)
    result = evaluate(val, test)
    assert set(result) == {
        *METRIC_KEYS,
        "metric_notes",
        "threshold_policy",
        "pixel_threshold_policy",
    }
    assert result["metric_notes"] == ""
    assert result["threshold_policy"] == result["pixel_threshold_policy"] == "f1_max"
    assert all(math.isfinite(result[k]) for k in METRIC_KEYS)
    assert all(isinstance(result[k], int) for k in IMAGE_COUNTS)
    assert result["image_auroc"] == pytest.approx(roc_auc_score(test.labels, test.scores))
    assert result["pixel_auroc"] == pytest.approx(
        roc_auc_score(test.masks.ravel(), test.maps.ravel())
    )
    assert result["image_threshold"] == f1_max(val.labels, val.scores)[1]
    assert result["image_f1"] == pytest.approx(
        f1_score(test.labels, test.scores >= result["image_threshold"])
    )
    assert result["pixel_f1"] == pytest.approx(
        f1_score(test.masks.ravel(), test.maps.ravel() >= result["pixel_threshold"])
    )
    assert result["pixel_aupro"] == pytest.approx(aupro(test.masks, test.maps))
    # The oracle threshold is chosen on test, so it can only do at least as well.
    assert result["image_f1max"] >= result["image_f1"]
    assert result["pixel_f1max"] >= result["pixel_f1"]


def test_evaluate_accepts_torch_tensors():
    rng = np.random.default_rng(1)
    val, test = _split(rng, 4, 4), _split(rng, 4, 4)
    as_torch = SplitOutputs(
        labels=torch.from_numpy(test.labels),
        scores=torch.from_numpy(test.scores),
        masks=torch.from_numpy(test.masks),
        maps=torch.from_numpy(test.maps),
    )
    assert evaluate(val, as_torch) == pytest.approx(evaluate(val, test), nan_ok=True)


def _nan_keys(result):
    return {k for k in METRIC_KEYS if math.isnan(result[k])}


def test_evaluate_validation_without_anomalies_gives_nan_f1_with_reason():
    rng = np.random.default_rng(2)
    result = evaluate(_split(rng, 5, 0), _split(rng, 5, 5))
    assert _nan_keys(result) == {*AT_IMAGE_THRESHOLD, *AT_PIXEL_THRESHOLD}
    notes = result["metric_notes"]
    assert "image_threshold and its metrics (f1_max): validation split has no anomalies" in notes
    assert "pixel_threshold and its metrics (f1_max): validation masks have no anomalous" in notes
    assert math.isfinite(result["image_auroc"]) and math.isfinite(result["pixel_aupro"])


def test_evaluate_image_only_detector():
    rng = np.random.default_rng(3)
    result = evaluate(_split(rng, 4, 4, maps=False), _split(rng, 4, 4, maps=False))
    assert _nan_keys(result) == {k for k in METRIC_KEYS if k.startswith("pixel_")}
    assert result["metric_notes"] == "pixel_*: detector gives no anomaly map"


def test_evaluate_without_ground_truth_masks():
    rng = np.random.default_rng(4)
    result = evaluate(_split(rng, 4, 4, pixel=False), _split(rng, 4, 4, pixel=False))
    assert _nan_keys(result) == {k for k in METRIC_KEYS if k.startswith("pixel_")}
    assert result["metric_notes"].startswith("pixel_*: no ground-truth masks")


def test_evaluate_test_split_with_one_class():
    rng = np.random.default_rng(5)
    only_anomalies = evaluate(_split(rng, 3, 3), _split(rng, 0, 4))
    assert "image_auroc: test split has no normal images" in only_anomalies["metric_notes"]
    assert math.isnan(only_anomalies["image_auroc"])
    assert only_anomalies["image_f1max"] == 1.0  # flagging everything is right
    assert math.isfinite(only_anomalies["pixel_auroc"])  # images still have normal pixels

    only_normal = evaluate(_split(rng, 3, 3), _split(rng, 4, 0))
    undefined_without_anomalies = {
        "image_auroc",
        "image_ap",
        "image_f1",
        "image_f1max",
        "image_recall",
        *(k for k in METRIC_KEYS if k.startswith("image_recall_p")),
        "pixel_auroc",
        "pixel_ap",
        "pixel_f1",
        "pixel_f1max",
        "pixel_aupro",
        "pixel_recall",
    }
    assert undefined_without_anomalies <= _nan_keys(only_normal)
    # What needs no anomaly is still measured: how many good parts the threshold rejects.
    assert math.isfinite(only_normal["image_fpr"]) and math.isfinite(only_normal["image_accuracy"])
    assert only_normal["image_tn"] + only_normal["image_fp"] == 4
    notes = only_normal["metric_notes"]
    assert (
        "image_auroc, image_ap, image_f1max, image_recall_*, image_f1, image_recall: "
        "test split has no anomalies" in notes
    )
    assert "test masks have no anomalous pixel" in notes


def test_evaluate_non_finite_maps_are_nan_with_reason():
    rng = np.random.default_rng(6)
    test = _split(rng, 4, 4)
    test.maps[0, 0, 0] = np.nan
    result = evaluate(_split(rng, 4, 4), test)
    assert _nan_keys(result) == {k for k in METRIC_KEYS if k.startswith("pixel_")}
    assert "pixel_*: test anomaly maps have 1 non-finite value(s)" in result["metric_notes"]


def test_evaluate_rejects_maps_that_do_not_match_masks():
    rng = np.random.default_rng(7)
    test = _split(rng, 2, 2)
    test.maps = test.maps[:, :4, :4]
    with pytest.raises(ValueError, match="test maps and masks differ in shape"):
        evaluate(_split(rng, 2, 2), test)
