"""AU-PR, recall at fixed precision, Youden's J, the confusion matrix at a threshold and IoU,
the threshold policies and the image and pixel columns :func:`evaluate` reads at their
thresholds, each against scikit-learn, brute force over every threshold or a hand-worked case."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    jaccard_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from sweep.run.metrics import (
    AT_IMAGE_THRESHOLD,
    IMAGE_METRICS,
    RECALL_AT_PRECISION,
    SplitOutputs,
    ThresholdPolicy,
    average_precision,
    evaluate,
    image_metrics,
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


# --------------------------------------------------------------------------- threshold policies


@pytest.mark.parametrize(
    ("spec", "kind", "value"),
    [
        ("f1_max", "f1_max", None),
        ("youden", "youden", None),
        (" iou_max ", "iou_max", None),
        ("precision_at:0.95", "precision_at", 0.95),
        ("precision_at: 1", "precision_at", 1.0),
        ({"precision_at": 0.95}, "precision_at", 0.95),
        ({"fixed": 0.5}, "fixed", 0.5),
        ("fixed:-1.5", "fixed", -1.5),
        ({"fixed": 3}, "fixed", 3.0),
    ],
)
def test_threshold_policy_parses_names_strings_and_mappings(spec, kind, value):
    policy = ThresholdPolicy.parse(spec)
    assert (policy.kind, policy.value) == (kind, value)
    assert ThresholdPolicy.parse(str(policy)) == policy
    assert ThresholdPolicy.parse(policy) is policy


@pytest.mark.parametrize("value", [0.123456789, 1e-9, -2.5e7 + 0.25, 0.9961])
def test_threshold_policy_string_round_trips_every_digit(value):
    # The row's threshold_policy string is what ``sweep results --recompute`` parses back.
    for kind in ("fixed", "precision_at"):
        if kind == "precision_at" and not 0 < value <= 1:
            continue
        policy = ThresholdPolicy(kind, value)
        assert ThresholdPolicy.parse(str(policy)).value == value
    assert str(ThresholdPolicy.parse("precision_at:0.95")) == "precision_at:0.95"
    assert str(ThresholdPolicy.parse({"fixed": 3})) == "fixed:3"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("f1max", r"unknown threshold policy 'f1max' \(known: f1_max, youden"),
        ({"median": 1}, "unknown threshold policy 'median'"),
        ("precision_at", r"'precision_at' needs a value \(e.g. precision_at: 0.95\)"),
        ("fixed", r"'fixed' needs a value \(e.g. fixed: 0.5\)"),
        ("f1_max:0.5", "'f1_max' takes no value"),
        ({"youden": 1}, "'youden' takes no value"),
        ("precision_at:0", r"expected a precision in \(0, 1\], got 0"),
        ("precision_at:1.5", r"expected a precision in \(0, 1\], got 1.5"),
        ({"precision_at": -0.1}, r"expected a precision in \(0, 1\]"),
        ("fixed:nan", "not finite"),
        ({"fixed": float("inf")}, "not finite"),
        ("precision_at:high", "'precision_at': expected a number, got 'high'"),
        ({"fixed": 1, "youden": None}, "expected one key"),
        (0.5, "expected a name or a mapping"),
    ],
)
def test_threshold_policy_rejects_bad_specs_clearly(spec, message):
    with pytest.raises(ValueError, match=message):
        ThresholdPolicy.parse(spec)


def _best_threshold(labels, scores, score_of):
    """Brute force: the highest distinct score whose ``score_of(tp, fp, P, N)`` is the best."""
    by_threshold = [(score_of(tp, fp, p, n), t) for t, tp, fp, p, n in _brute(labels, scores)]
    best = max(value for value, _ in by_threshold)
    return max(t for value, t in by_threshold if abs(value - best) < 1e-12)


BRUTE_OBJECTIVES = {
    "f1_max": lambda tp, fp, p, n: 2 * tp / (tp + fp + p),
    "youden": lambda tp, fp, p, n: tp / p - fp / n,
    "iou_max": lambda tp, fp, p, n: tp / (tp + fp + p - tp),
}


@pytest.mark.parametrize("kind", sorted(BRUTE_OBJECTIVES))
@pytest.mark.parametrize("seed", range(2))
def test_policy_choose_is_the_brute_force_best_threshold(kind, seed):
    policy = ThresholdPolicy.parse(kind)
    for labels, scores in _cases(seed, 40):
        threshold, why = policy.choose(labels, scores)
        assert why is None
        assert threshold == _best_threshold(labels, scores, BRUTE_OBJECTIVES[kind])


@pytest.mark.parametrize("precision", [0.6, 0.8, 0.95])
def test_precision_at_choose_is_the_most_permissive_precise_threshold(precision):
    policy = ThresholdPolicy("precision_at", precision)
    found = unreachable = 0
    for labels, scores in _cases(7, 40):
        precise = [
            (tp, t)
            for t, tp, fp, _, _ in _brute(labels, scores)
            if tp / (tp + fp) >= precision - 1e-12
        ]
        threshold, why = policy.choose(labels, scores)
        if not precise:
            assert math.isnan(threshold)
            assert why == f"no validation threshold reaches precision {precision:g}"
            unreachable += 1
            continue
        assert why is None
        most = max(tp for tp, _ in precise)
        # Every threshold of the best recall is as good; the highest flags fewest normals.
        assert threshold == max(t for tp, t in precise if tp == most)
        found += 1
    assert found > 10 and (unreachable > 0 or precision < 0.9)


def test_fixed_policy_never_looks_at_the_data():
    policy = ThresholdPolicy.parse("fixed:-1.5")
    assert policy.choose([], []) == (-1.5, None)
    assert policy.choose([0, 0], [1.0, 2.0]) == (-1.5, None)
    # Not even at invalid data: nothing to validate when nothing is read.
    assert policy.choose([7], [float("nan")]) == (-1.5, None)
    assert not policy.needs_anomalies and ThresholdPolicy().needs_anomalies


@pytest.mark.parametrize("kind", ["f1_max", "youden", "iou_max", "precision_at:0.9"])
def test_policy_choose_nan_with_reason(kind):
    policy = ThresholdPolicy.parse(kind)
    threshold, why = policy.choose([], [])
    assert math.isnan(threshold) and why == "validation split is empty"
    threshold, why = policy.choose([0, 0, 0], [0.1, 0.2, 0.3])
    assert math.isnan(threshold) and why == "validation split has no anomalies"
    threshold, why = policy.choose([1, 1], [0.1, 0.2])
    if policy.kind == "youden":
        assert math.isnan(threshold) and why == "validation split has no normal images"
    else:  # flagging both anomalies is perfect: F1, IoU and precision are 1
        assert (threshold, why) == (0.1, None)


# --------------------------------------------------------------------------- image metrics


def _split_scores(rng, normal, anomalous, decimals=1):
    labels = rng.permutation(np.r_[np.zeros(normal, int), np.ones(anomalous, int)])
    return labels, np.round(rng.normal(size=labels.size) + 1.2 * labels, decimals)


@pytest.mark.parametrize("spec", ["f1_max", "youden", "iou_max", "precision_at:0.8", "fixed:0.4"])
@pytest.mark.parametrize("seed", range(3))
def test_image_metrics_equal_sklearn_at_the_chosen_threshold(spec, seed):
    rng = np.random.default_rng(seed)
    val_labels, val_scores = _split_scores(rng, 12, 8)
    test_labels, test_scores = _split_scores(rng, 25, 15)
    out, notes = image_metrics(val_labels, val_scores, test_labels, test_scores, spec)
    threshold, why = ThresholdPolicy.parse(spec).choose(val_labels, val_scores)
    if why is not None:  # precision_at out of reach on this draw
        assert math.isnan(out["image_threshold"]) and why in "; ".join(notes)
        return
    assert notes == []
    assert set(out) == set(IMAGE_METRICS)
    assert out["image_threshold"] == threshold
    assert out["image_auroc"] == pytest.approx(roc_auc_score(test_labels, test_scores))
    assert out["image_ap"] == pytest.approx(average_precision_score(test_labels, test_scores))
    brute_f1 = max(2 * tp / (tp + fp + p) for _, tp, fp, p, _ in _brute(test_labels, test_scores))
    assert out["image_f1max"] == pytest.approx(brute_f1)
    for key, precision in RECALL_AT_PRECISION.items():
        recalls = [
            tp / p
            for _, tp, fp, p, _ in _brute(test_labels, test_scores)
            if tp / (tp + fp) >= precision - 1e-12
        ]
        assert out[key] == pytest.approx(max(recalls, default=0.0))
    flagged = test_scores >= threshold
    tn, fp, fn, tp = confusion_matrix(test_labels, flagged, labels=[0, 1]).ravel()
    assert (out["image_tp"], out["image_fp"], out["image_tn"], out["image_fn"]) == (tp, fp, tn, fn)
    assert out["image_f1"] == pytest.approx(f1_score(test_labels, flagged))
    assert out["image_recall"] == pytest.approx(recall_score(test_labels, flagged))
    assert out["image_accuracy"] == pytest.approx(accuracy_score(test_labels, flagged))
    assert out["image_fpr"] == pytest.approx(fp / (fp + tn))
    if tp + fp:
        assert out["image_precision"] == pytest.approx(precision_score(test_labels, flagged))
        assert out["image_fp_share"] == pytest.approx(fp / (tp + fp))


def test_image_metrics_on_degenerate_splits_are_nan_with_notes():
    rng = np.random.default_rng(11)
    val = _split_scores(rng, 6, 4)
    # Empty test split: everything NaN, one note.
    out, notes = image_metrics(*val, [], [])
    assert all(math.isnan(v) for v in out.values())
    assert notes == ["image_*: test split is empty"]
    # No test anomaly: the curve metrics are undefined, the threshold still judges normals.
    out, notes = image_metrics(*val, *_split_scores(rng, 10, 0))
    assert notes == [
        "image_auroc, image_ap, image_f1max, image_recall_*, image_f1, image_recall: "
        "test split has no anomalies"
    ]
    assert all(math.isnan(out[k]) for k in ("image_auroc", "image_ap", *RECALL_AT_PRECISION))
    assert math.isfinite(out["image_fpr"]) and out["image_tp"] + out["image_fn"] == 0
    # No normal test image: AUROC alone is undefined.
    out, notes = image_metrics(*val, *_split_scores(rng, 0, 5))
    assert notes == ["image_auroc: test split has no normal images"]
    assert math.isnan(out["image_auroc"]) and out["image_ap"] == 1.0
    # No validation anomaly: no threshold, so nothing judged at one; test curves unaffected.
    test = _split_scores(rng, 10, 5)
    out, notes = image_metrics(*_split_scores(rng, 6, 0), *test, "youden")
    assert notes == ["image_threshold and its metrics (youden): validation split has no anomalies"]
    assert all(math.isnan(out[k]) for k in AT_IMAGE_THRESHOLD)
    assert math.isfinite(out["image_auroc"])
    # ... unless the threshold is fixed.
    out, notes = image_metrics(*_split_scores(rng, 6, 0), *test, {"fixed": 0.0})
    assert notes == [] and out["image_threshold"] == 0.0
    assert out["image_tp"] + out["image_fp"] == int((test[1] >= 0.0).sum())


# --------------------------------------------------------------------------- pixel metrics


def _pixel_split(rng, normal, anomalous, size=8):
    labels = np.r_[np.zeros(normal, int), np.ones(anomalous, int)]
    masks = np.zeros((labels.size, size, size), dtype=bool)
    for i in np.flatnonzero(labels):
        top, left = rng.integers(0, size - 3, 2)
        masks[i, top : top + 3, left : left + int(rng.integers(2, 4))] = True
    maps = np.round(rng.normal(size=masks.shape) + 1.5 * masks, 1).astype(np.float32)
    scores = maps.reshape(labels.size, -1).max(axis=1).astype(np.float64)
    return SplitOutputs(labels=labels, scores=scores, masks=masks, maps=maps)


@pytest.mark.parametrize(
    ("policy", "pixel_policy"),
    [
        ("f1_max", None),
        ("youden", "iou_max"),
        ("f1_max", "precision_at:0.5"),
        ("iou_max", "fixed:1"),
    ],
)
def test_evaluate_pixel_metrics_at_the_pixel_policys_threshold(policy, pixel_policy):
    rng = np.random.default_rng(3)
    val, test = _pixel_split(rng, 3, 3), _pixel_split(rng, 3, 4)
    result = evaluate(val, test, policy, pixel_policy)
    chosen = ThresholdPolicy.parse(policy if pixel_policy is None else pixel_policy)
    assert result["threshold_policy"] == str(ThresholdPolicy.parse(policy))
    assert result["pixel_threshold_policy"] == str(chosen)
    assert result["metric_notes"] == ""
    threshold, why = chosen.choose(val.masks, val.maps)
    assert why is None and result["pixel_threshold"] == pytest.approx(threshold)
    image_threshold = ThresholdPolicy.parse(policy).choose(val.labels, val.scores)[0]
    assert result["image_threshold"] == image_threshold

    gt, flat = test.masks.ravel(), test.maps.ravel()
    assert result["pixel_ap"] == pytest.approx(average_precision_score(gt, flat))
    flagged = flat >= threshold
    tp, fp = int((flagged & gt).sum()), int((flagged & ~gt).sum())
    fn, tn = int((~flagged & gt).sum()), int((~flagged & ~gt).sum())
    assert result["pixel_iou"] == pytest.approx(tp / (tp + fp + fn))
    assert result["pixel_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert result["pixel_precision"] == pytest.approx(tp / (tp + fp))
    assert result["pixel_recall"] == pytest.approx(tp / (tp + fn))
    assert result["pixel_fpr"] == pytest.approx(fp / (fp + tn))
    if chosen.kind == "iou_max":  # brute force over every validation pixel score
        vgt, vflat = val.masks.ravel(), val.maps.ravel()
        best = _best_threshold(
            vgt.astype(int), vflat.astype(np.float64), BRUTE_OBJECTIVES["iou_max"]
        )
        assert result["pixel_threshold"] == pytest.approx(best)


def test_evaluate_pixel_policy_defaults_to_the_image_policy_and_may_differ():
    rng = np.random.default_rng(4)
    val, test = _pixel_split(rng, 3, 3), _pixel_split(rng, 3, 3)
    same = evaluate(val, test, "precision_at:0.9")
    assert same["pixel_threshold_policy"] == same["threshold_policy"] == "precision_at:0.9"
    other = evaluate(val, test, "precision_at:0.9", "youden")
    assert other["pixel_threshold_policy"] == "youden"
    assert other["pixel_threshold"] == ThresholdPolicy("youden").choose(val.masks, val.maps)[0]
    assert other["pixel_threshold"] != same["pixel_threshold"]
    assert all(
        other[k] == same[k] or (math.isnan(other[k]) and math.isnan(same[k])) for k in IMAGE_METRICS
    )
