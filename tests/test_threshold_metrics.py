"""AU-PR, recall at fixed precision, Youden's J, the confusion matrix at a threshold and IoU,
each against scikit-learn, brute force over every threshold or a hand-worked case."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, confusion_matrix, jaccard_score

from sweep.run.metrics import (
    average_precision,
    iou_at,
    iou_max,
    recall_at_precision,
    threshold_stats,
    youden,
)


def _cases(seed: int, count: int = 60):
    """Random labelled scores; rounding makes ties common, between classes too."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        size = int(rng.integers(2, 80))
        labels = rng.integers(0, 2, size)
        scores = np.round(rng.normal(size=size) + 0.8 * labels, int(rng.integers(0, 3)))
        if labels.min() != labels.max():
            yield labels, scores


def _brute(labels, scores):
    """Per distinct threshold (descending): tp, fp, positives, negatives."""
    positives, negatives = int(labels.sum()), int((1 - labels).sum())
    for t in sorted(set(scores.tolist()), reverse=True):
        flagged = scores >= t
        tp = int((flagged & (labels == 1)).sum())
        yield t, tp, int(flagged.sum()) - tp, positives, negatives


@pytest.mark.parametrize("seed", range(3))
def test_average_precision_equals_sklearn_with_ties(seed):
    checked = 0
    for labels, scores in _cases(seed):
        expected = average_precision_score(labels, scores)
        assert average_precision(labels, scores) == pytest.approx(expected, abs=1e-12)
        checked += 1
    assert checked > 40


@pytest.mark.parametrize("min_precision", [0.9, 0.95, 0.996])
@pytest.mark.parametrize("seed", range(3))
def test_recall_at_precision_is_the_best_recall_of_any_precise_enough_threshold(
    seed, min_precision
):
    for labels, scores in _cases(seed):
        precise = [
            (tp / positives, t)
            for t, tp, fp, positives, _ in _brute(labels, scores)
            if tp / (tp + fp) >= min_precision - 1e-12
        ]
        recall, threshold = recall_at_precision(labels, scores, min_precision)
        if not precise:
            assert recall == 0.0 and math.isnan(threshold)
            continue
        best = max(r for r, _ in precise)
        assert recall == pytest.approx(best)
        assert threshold == max(t for r, t in precise if r == best)


def test_recall_at_precision_hand_worked():
    # Descending: 0.9 (bad), 0.8, 0.7, 0.6 (defects), 0.5 (bad), 0.4 (defect).
    labels = np.array([0, 1, 1, 1, 0, 1])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    # Precision >= 0.75 first holds at t = 0.6 (3 of 4), recall 3/4; t = 0.4 gives 4/6.
    assert recall_at_precision(labels, scores, 0.75) == (0.75, 0.6)
    assert recall_at_precision(labels, scores, 0.6) == (1.0, 0.4)
    # The top score is a false alarm: no threshold is perfectly precise.
    recall, threshold = recall_at_precision(labels, scores, 1.0)
    assert recall == 0.0 and math.isnan(threshold)
    with pytest.raises(ValueError, match="min_precision"):
        recall_at_precision(labels, scores, 0.0)


@pytest.mark.parametrize("seed", range(3))
def test_youden_is_the_best_tpr_minus_fpr(seed):
    for labels, scores in _cases(seed):
        by_threshold = [(tp / p - fp / n, t) for t, tp, fp, p, n in _brute(labels, scores)]
        best = max(j for j, _ in by_threshold)
        j, threshold = youden(labels, scores)
        assert j == pytest.approx(best)
        assert threshold == max(t for jj, t in by_threshold if abs(jj - best) < 1e-12)


@pytest.mark.parametrize("seed", range(2))
def test_threshold_stats_equal_sklearns_confusion_matrix(seed):
    rng = np.random.default_rng(seed)
    for labels, scores in _cases(seed, 30):
        threshold = float(rng.choice(scores))
        stats = threshold_stats(labels, scores, threshold)
        tn, fp, fn, tp = confusion_matrix(labels, scores >= threshold, labels=[0, 1]).ravel()
        assert (stats.tp, stats.fp, stats.tn, stats.fn) == (tp, fp, tn, fn)
        assert stats.accuracy == pytest.approx((tp + tn) / labels.size)
        assert stats.recall == pytest.approx(tp / (tp + fn))
        assert stats.false_positive_rate == pytest.approx(fp / (fp + tn))
        if tp + fp:
            assert stats.precision == pytest.approx(tp / (tp + fp))
            assert stats.false_positive_share == pytest.approx(1 - stats.precision)


def test_iou_equals_sklearns_jaccard_and_iou_max_is_the_best_threshold():
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 16, 16), dtype=bool)
    masks[0, 4:9, 4:9] = True
    masks[2, 10:14, 2:6] = True
    maps = np.round(rng.normal(size=masks.shape) + 1.5 * masks, 1)
    for threshold in (0.0, 0.5, 1.0, 1.7):
        expected = jaccard_score(masks.ravel(), (maps >= threshold).ravel())
        assert iou_at(masks, maps, threshold) == pytest.approx(expected)
    best, threshold = iou_max(masks, maps)
    brute = max((iou_at(masks, maps, t), t) for t in np.unique(maps))
    assert best == pytest.approx(brute[0]) and threshold == pytest.approx(brute[1])
    # Perfect maps: IoU 1 at the threshold that separates them.
    assert iou_max(masks, masks.astype(float)) == (1.0, 1.0)


def test_degenerate_inputs_give_nan_not_errors():
    normal_only = np.zeros(5, dtype=int)
    scores = np.arange(5.0)
    assert math.isnan(average_precision(normal_only, scores))
    assert all(math.isnan(v) for v in recall_at_precision(normal_only, scores, 0.95))
    assert all(math.isnan(v) for v in youden(np.ones(5, dtype=int), scores))
    assert all(math.isnan(v) for v in iou_max(np.zeros((2, 4, 4)), np.ones((2, 4, 4))))
    assert math.isnan(iou_at(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), 0.5))
