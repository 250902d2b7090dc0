"""Image- and pixel-level anomaly detection metrics (numpy only).

Every curve metric here comes from one descending sort of the scores: consecutive equal scores
are collapsed into one threshold, so ties count exactly as scikit-learn counts them, and the cost
is ``O(n log n)`` whatever the number of distinct scores. Pixel metrics run over every test pixel
(about 20 million at 256 px), so maps stay float32 and the test maps are sorted only once for
pixel AUROC, F1-max and AUPRO together.

:func:`evaluate` turns a detector's outputs on the validation and test splits into the result
row's metric columns. It never raises on a degenerate split (one class missing, no masks, no
anomaly maps): the metric is NaN and ``metric_notes`` says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

__all__ = [
    "AT_IMAGE_THRESHOLD",
    "AT_PIXEL_THRESHOLD",
    "AUPRO_FPR_LIMIT",
    "IMAGE_COUNTS",
    "IMAGE_METRICS",
    "METRIC_KEYS",
    "PIXEL_METRICS",
    "RECALL_AT_PRECISION",
    "THRESHOLD_POLICIES",
    "SplitOutputs",
    "ThresholdPolicy",
    "ThresholdStats",
    "aupro",
    "auroc",
    "average_precision",
    "evaluate",
    "f1_at",
    "f1_max",
    "image_metrics",
    "iou_at",
    "iou_max",
    "recall_at_precision",
    "threshold_stats",
    "youden",
]

RECALL_AT_PRECISION = {
    "image_recall_p996": 0.996,
    "image_recall_p95": 0.95,
    "image_recall_p90": 0.90,
}
"""Test recall at the most permissive threshold whose precision reaches the value (the
VIN-label study's headline: how many defects a line still catches when at most 0.4 %, 5 % or
10 % of what it rejects is good)."""

IMAGE_COUNTS = ("image_tp", "image_fp", "image_tn", "image_fn")
"""The test confusion matrix at the chosen image threshold (integer columns)."""
AT_IMAGE_THRESHOLD = (
    "image_threshold",
    "image_f1",
    "image_precision",
    "image_recall",
    "image_accuracy",
    "image_fpr",
    "image_fp_share",
    *IMAGE_COUNTS,
)
"""The image threshold a policy chose on validation, and the test metrics at it."""
AT_PIXEL_THRESHOLD = (
    "pixel_threshold",
    "pixel_f1",
    "pixel_iou",
    "pixel_precision",
    "pixel_recall",
    "pixel_fpr",
)
"""The pixel threshold a policy chose on validation, and the test metrics at it."""
IMAGE_METRICS = (
    "image_auroc",
    "image_ap",
    "image_f1max",
    *RECALL_AT_PRECISION,
    *AT_IMAGE_THRESHOLD,
)
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro", *AT_PIXEL_THRESHOLD)
METRIC_KEYS = (*IMAGE_METRICS, *PIXEL_METRICS)
"""The numeric keys :func:`evaluate` returns (besides ``metric_notes`` and the policies)."""

AUPRO_FPR_LIMIT = 0.3
"""The false-positive-rate limit of ``pixel_aupro`` (the MVTec AD convention)."""

NAN = float("nan")


@dataclass
class SplitOutputs:
    """What a detector produced on one split (numpy arrays or torch tensors)."""

    labels: np.ndarray
    """``N`` ints, 1 = anomalous image."""
    scores: np.ndarray
    """``N`` floats, higher = more anomalous."""
    masks: np.ndarray | None
    """``N x H x W`` ground-truth masks (nonzero = anomalous pixel), or None."""
    maps: np.ndarray | None
    """``N x H x W`` float anomaly maps, or None for image-level-only detectors."""
    valid: np.ndarray | None = None
    """``N x H x W`` bool, the pixels pixel metrics are computed over (a region of interest,
    not letterbox padding); None: all of them."""


def _counted(split: SplitOutputs) -> tuple[Any, Any]:
    """``split``'s masks and maps, as flat arrays of the counted (``valid``) pixels only when
    some do not count. Masks cut to ``valid`` keep each region whole within it, so the AUPRO
    regions of the full masks are the same pixels in the same order."""
    if split.valid is None:
        return split.masks, split.maps
    valid = np.asarray(split.valid, dtype=bool)
    return _to_numpy(split.masks, "masks")[valid], _to_numpy(split.maps, "maps")[valid]


# --------------------------------------------------------------------------- input checks


def _to_numpy(value: Any, name: str) -> np.ndarray:
    """A numpy view of an array or a (possibly CUDA, possibly grad-tracking) torch tensor."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype == object:
        raise TypeError(f"{name}: expected a numeric array, got dtype object")
    return array


def _binary(value: Any, name: str) -> np.ndarray:
    """``value`` as a flat bool array; raise if anything but 0/1 (or bool) is in it."""
    array = _to_numpy(value, name)
    if array.dtype != bool:
        # Explicit 0/1 check rather than ``astype(bool)``: a mask saved as 0/255 or a label
        # vector of class ids would otherwise be accepted silently.
        if not np.all((array == 0) | (array == 1)):
            raise ValueError(f"{name}: expected binary values (0/1 or bool)")
        array = array == 1
    return array.reshape(-1)


def _scores(value: Any, name: str) -> np.ndarray:
    """``value`` as a flat float array (float32 kept as is to halve the memory of pixel maps)."""
    array = _to_numpy(value, name)
    if array.dtype not in (np.float32, np.float64):
        array = array.astype(np.float64)
    array = array.reshape(-1)
    if not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise ValueError(f"{name}: {bad} non-finite value(s); scores must be finite")
    return array


def _paired(labels: Any, scores: Any, label_name: str, score_name: str):
    flat_labels = _binary(labels, label_name)
    flat_scores = _scores(scores, score_name)
    if flat_labels.shape != flat_scores.shape:
        raise ValueError(
            f"{label_name} and {score_name} differ in size: "
            f"{flat_labels.size} vs {flat_scores.size} values"
        )
    return flat_labels, flat_scores


# --------------------------------------------------------------------------- the one sort


@dataclass
class _Ranking:
    """Scores sorted once, descending, with equal scores grouped into one threshold."""

    order: np.ndarray
    """Permutation that sorts the scores descending."""
    starts: np.ndarray
    """Position (in sorted order) where each distinct score begins."""
    thresholds: np.ndarray
    """The distinct scores, descending."""
    predicted: np.ndarray
    """Number of values with ``score >= thresholds[k]``, per threshold."""

    @classmethod
    def of(cls, scores: np.ndarray) -> _Ranking:
        # int32 positions where they fit halve the ranking's memory on big pixel sets; the
        # bound leaves room for sums of two counts (``predicted + positives``).
        index_type = np.int32 if scores.size < 2**30 else np.int64
        # Ascending sort reversed: the order inside a run of ties does not matter because
        # ties are collapsed below.
        order = np.argsort(scores).astype(index_type, copy=False)[::-1]
        ordered = scores[order]
        is_start = np.empty(ordered.size, dtype=bool)
        is_start[:1] = True
        np.not_equal(ordered[1:], ordered[:-1], out=is_start[1:])
        starts = np.flatnonzero(is_start).astype(index_type, copy=False)
        del is_start
        thresholds = ordered[starts]
        del ordered
        predicted = np.empty_like(starts)
        predicted[:-1] = starts[1:]
        predicted[-1:] = scores.size
        return cls(order=order, starts=starts, thresholds=thresholds, predicted=predicted)

    def true_counts(self, mask: np.ndarray) -> np.ndarray:
        """Per threshold, how many entries of the bool ``mask`` score ``>= threshold``."""
        if self.starts.size == 0:
            return np.zeros(0, dtype=np.int64)
        return np.cumsum(np.add.reduceat(mask[self.order], self.starts, dtype=np.int64))

    def sparse_sums(self, indices: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Per threshold, the sum of ``weights`` over ``indices`` scoring ``>= threshold``.

        ``indices`` are ascending flat indices (the anomalous pixels, usually a small share of
        all pixels), so only arrays of their size and of the number of thresholds are built.
        """
        member = np.zeros(self.order.size, dtype=bool)
        member[indices] = True
        sorted_positions = np.flatnonzero(member[self.order])
        del member
        weight_of = weights[np.searchsorted(indices, self.order[sorted_positions])]
        group = np.searchsorted(self.starts, sorted_positions, side="right") - 1
        per_group = np.bincount(group, weights=weight_of, minlength=self.starts.size)
        return np.cumsum(per_group)


def _ranked(
    labels: Any, scores: Any, label_name: str = "labels", score_name: str = "scores"
) -> tuple[_Ranking, np.ndarray, int]:
    """The one sort of ``scores``, the true-positive count per threshold and the positives."""
    flat_labels, flat_scores = _paired(labels, scores, label_name, score_name)
    ranking = _Ranking.of(flat_scores)
    tp = ranking.true_counts(flat_labels)
    return ranking, tp, int(tp[-1]) if tp.size else 0


def _auroc_from(ranking: _Ranking, tp: np.ndarray) -> float:
    """AUROC from the per-threshold true-positive counts ``tp`` of ``ranking``."""
    positives = int(tp[-1]) if tp.size else 0
    negatives = ranking.order.size - positives
    if positives == 0 or negatives == 0:
        return NAN
    # Trapezoid rule on integer counts: twice the area in units of one (positive, negative)
    # pair, sum((FP_k - FP_k-1) * (TP_k + TP_k-1)), exact in int64 (at most 2 * P * N, about
    # 2e14 for 20 M pixels). A positive tied with a negative lands on a sloped segment and
    # counts one half, as in sklearn. In-place steps keep it to a few threshold-sized arrays.
    fp_step = ranking.predicted - tp
    fp_step[1:] -= fp_step[:-1].copy()
    tp_pair = tp.copy()
    tp_pair[1:] += tp[:-1]
    twice_area = int(np.dot(fp_step, tp_pair))
    return twice_area / (2.0 * positives * negatives)


def _f1_max_from(ranking: _Ranking, tp: np.ndarray) -> tuple[float, float]:
    """``(F1-max, threshold)`` from the per-threshold true-positive counts ``tp``."""
    positives = int(tp[-1]) if tp.size else 0
    if positives == 0:
        return NAN, NAN
    # F1 = 2TP / (2TP + FP + FN) and TP + FP = predicted, FN = P - TP, so the denominator is
    # predicted + P: no division by zero once P > 0.
    f1 = tp.astype(np.float64)
    f1 *= 2.0
    f1 /= ranking.predicted + positives
    best = int(np.argmax(f1))  # first maximum = the highest threshold achieving it
    return float(f1[best]), float(ranking.thresholds[best])


# --------------------------------------------------------------------------- public metrics


def auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve; NaN if ``labels`` lacks either class.

    Exact (integer trapezoid over every distinct score), with ties counted one half as in
    ``sklearn.metrics.roc_auc_score``. ``labels`` and ``scores`` may have any shape as long
    as they hold the same number of values (pixel masks and maps are flattened).
    """
    ranking, tp, _ = _ranked(labels, scores)
    return _auroc_from(ranking, tp)


def f1_max(labels: Any, scores: Any) -> tuple[float, float]:
    """``(best F1, threshold)`` over every threshold ``score >= t``; NaNs if no positive.

    The threshold is the highest distinct score that reaches the best F1, so
    ``f1_at(labels, scores, threshold)`` gives the best F1 back.
    """
    ranking, tp, _ = _ranked(labels, scores)
    return _f1_max_from(ranking, tp)


def f1_at(labels: Any, scores: Any, threshold: float) -> float:
    """F1 when a value is predicted anomalous iff ``score >= threshold``.

    NaN if ``labels`` has no positive (recall undefined) or ``threshold`` is NaN.
    """
    flat_labels, flat_scores = _paired(labels, scores, "labels", "scores")
    positives = int(np.count_nonzero(flat_labels))
    if positives == 0 or math.isnan(threshold):
        return NAN
    predicted = flat_scores >= threshold
    tp = int(np.count_nonzero(predicted & flat_labels))
    return 2.0 * tp / (int(np.count_nonzero(predicted)) + positives)


def average_precision(labels: Any, scores: Any) -> float:
    """Area under the precision-recall curve as average precision: the sum over thresholds of
    the recall gained times the precision there (``sklearn.metrics.average_precision_score``,
    ties grouped as it groups them); NaN if ``labels`` has no positive."""
    return _average_precision_from(*_ranked(labels, scores)[:2])


def _average_precision_from(ranking: _Ranking, tp: np.ndarray) -> float:
    positives = int(tp[-1]) if tp.size else 0
    if positives == 0:
        return NAN
    precision = tp / ranking.predicted
    recall_gain = np.diff(tp, prepend=0) / positives
    return float(np.dot(recall_gain, precision))


def recall_at_precision(labels: Any, scores: Any, min_precision: float) -> tuple[float, float]:
    """``(recall, threshold)``: the highest recall of any threshold ``score >= t`` whose
    precision is at least ``min_precision``, and the highest such threshold reaching it.

    A line that must not flag more than ``1 - min_precision`` of its rejects wrongly reads how
    many defects it still catches. ``(0.0, NaN)`` when no threshold is that precise; NaNs when
    ``labels`` has no positive.
    """
    if not 0 < min_precision <= 1:
        raise ValueError(f"min_precision must be in (0, 1], got {min_precision!r}")
    return _recall_at_precision_from(*_ranked(labels, scores)[:2], min_precision)


def _recall_at_precision_from(
    ranking: _Ranking, tp: np.ndarray, min_precision: float
) -> tuple[float, float]:
    positives = int(tp[-1]) if tp.size else 0
    if positives == 0:
        return NAN, NAN
    # A hair of tolerance: 19 / 20 must count as precision 0.95 whatever the rounding.
    precise = tp / ranking.predicted >= min_precision - 1e-12
    if not precise.any():
        return 0.0, NAN
    recall = np.where(precise, tp, -1)
    best = int(np.argmax(recall))  # first maximum = the highest threshold achieving it
    return float(recall[best] / positives), float(ranking.thresholds[best])


def youden(labels: Any, scores: Any) -> tuple[float, float]:
    """``(J, threshold)``: Youden's J = TPR - FPR at its best threshold ``score >= t`` (the
    highest one reaching it); NaNs if ``labels`` lacks either class."""
    return _youden_from(*_ranked(labels, scores)[:2])


def _youden_from(ranking: _Ranking, tp: np.ndarray) -> tuple[float, float]:
    positives = int(tp[-1]) if tp.size else 0
    negatives = ranking.order.size - positives
    if positives == 0 or negatives == 0:
        return NAN, NAN
    j = tp / positives - (ranking.predicted - tp) / negatives
    best = int(np.argmax(j))
    return float(j[best]), float(ranking.thresholds[best])


@dataclass(frozen=True)
class ThresholdStats:
    """The confusion matrix of ``score >= threshold`` and what a line reads off it."""

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def precision(self) -> float:
        predicted = self.tp + self.fp
        return self.tp / predicted if predicted else NAN

    @property
    def recall(self) -> float:
        positives = self.tp + self.fn
        return self.tp / positives if positives else NAN

    @property
    def accuracy(self) -> float:
        return (self.tp + self.tn) / (self.tp + self.fp + self.tn + self.fn)

    @property
    def false_positive_rate(self) -> float:
        """The share of normal items flagged (a re-inspection cost)."""
        negatives = self.fp + self.tn
        return self.fp / negatives if negatives else NAN

    @property
    def false_positive_share(self) -> float:
        """The share of flagged items that are normal (1 - precision)."""
        predicted = self.tp + self.fp
        return self.fp / predicted if predicted else NAN


def threshold_stats(labels: Any, scores: Any, threshold: float) -> ThresholdStats:
    """The confusion matrix when a value is predicted anomalous iff ``score >= threshold``."""
    flat_labels, flat_scores = _paired(labels, scores, "labels", "scores")
    if math.isnan(threshold):
        raise ValueError("threshold is NaN")
    predicted = flat_scores >= threshold
    tp = int(np.count_nonzero(predicted & flat_labels))
    fp = int(np.count_nonzero(predicted)) - tp
    positives = int(np.count_nonzero(flat_labels))
    return ThresholdStats(
        threshold=float(threshold),
        tp=tp,
        fp=fp,
        tn=flat_labels.size - positives - fp,
        fn=positives - tp,
    )


def iou_at(masks: Any, maps: Any, threshold: float) -> float:
    """Intersection over union of ``maps >= threshold`` and the masks, over every pixel
    together; NaN if both are empty or ``threshold`` is NaN."""
    flat_masks, flat_maps = _paired(masks, maps, "masks", "maps")
    if math.isnan(threshold):
        return NAN
    predicted = flat_maps >= threshold
    union = int(np.count_nonzero(predicted | flat_masks))
    return int(np.count_nonzero(predicted & flat_masks)) / union if union else NAN


def iou_max(masks: Any, maps: Any) -> tuple[float, float]:
    """``(best IoU, threshold)`` over every threshold ``map >= t`` (the sealant study's
    IoU-maximising threshold: the highest one reaching the best); NaNs if no mask pixel."""
    return _iou_max_from(*_ranked(masks, maps, "masks", "maps")[:2])


def _iou_max_from(ranking: _Ranking, tp: np.ndarray) -> tuple[float, float]:
    positives = int(tp[-1]) if tp.size else 0
    if positives == 0:
        return NAN, NAN
    # |pred & gt| / |pred | gt| = TP / (predicted + P - TP), never 0 in the denominator.
    iou = tp / (ranking.predicted + positives - tp)
    best = int(np.argmax(iou))
    return float(iou[best]), float(ranking.thresholds[best])


def _region_weights(masks: np.ndarray) -> np.ndarray:
    """Per anomalous pixel (in flat order), ``1 / (n_regions * size of its region)``.

    Regions are the 8-connected components of each image's mask. Summing these weights over
    the pixels scoring at or above a threshold gives PRO(t), the mean per-region overlap.
    """
    region_ids = []
    offset = 0
    for mask in masks:
        count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        # Component 0 is the background; shift the others to ids unique across images.
        region_ids.append(labels[mask].astype(np.int64) + (offset - 1))
        offset += count - 1
    if offset == 0:
        return np.zeros(0)
    flat_ids = np.concatenate(region_ids)
    sizes = np.bincount(flat_ids, minlength=offset)
    return 1.0 / (offset * sizes[flat_ids].astype(np.float64))


def _aupro_from(
    ranking: _Ranking, tp: np.ndarray, masks: np.ndarray, flat_masks: np.ndarray, fpr_limit: float
) -> float:
    """AUPRO of ``masks`` (and their flat view) given the ranking of the maps and its ``tp``."""
    weights = _region_weights(masks)
    negatives = flat_masks.size - weights.size
    if weights.size == 0 or negatives == 0:
        return NAN
    pro = ranking.sparse_sums(np.flatnonzero(flat_masks), weights)
    fp = ranking.predicted - tp
    fpr = np.concatenate(([0.0], fp / negatives))
    del fp
    pro = np.concatenate(([0.0], pro))
    # Last curve point at or below the limit; the curve reaches FPR 1, so when that point is
    # short of the limit a next point exists and lies strictly beyond it.
    last = int(np.searchsorted(fpr, fpr_limit, side="right")) - 1
    area = float(np.sum(np.diff(fpr[: last + 1]) * (pro[1 : last + 1] + pro[:last]) / 2.0))
    if fpr[last] < fpr_limit:
        step = (fpr_limit - fpr[last]) / (fpr[last + 1] - fpr[last])
        pro_at_limit = pro[last] + step * (pro[last + 1] - pro[last])
        area += float((fpr_limit - fpr[last]) * (pro[last] + pro_at_limit) / 2.0)
    return area / fpr_limit


def _mask_stack(masks: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(N x H x W bool masks, flat view)``; a single ``H x W`` mask counts as ``N = 1``."""
    array = _to_numpy(masks, name)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"{name}: expected N x H x W masks, got shape {array.shape}")
    flat = _binary(array, name)
    return flat.reshape(array.shape), flat


def aupro(masks: Any, maps: Any, fpr_limit: float = AUPRO_FPR_LIMIT) -> float:
    """Normalised area under the per-region-overlap (PRO) curve up to ``fpr_limit``.

    As defined for MVTec AD: regions are the 8-connected components of each ground-truth mask;
    PRO(t) is the mean over regions of the fraction of region pixels scoring ``>= t``; FPR(t)
    is over every normal pixel of every image. The curve is walked at every distinct score,
    integrated with the trapezoid rule from FPR 0 to ``fpr_limit`` (interpolating linearly at
    the limit) and divided by ``fpr_limit``, so a perfect map scores 1. NaN when there is no
    anomalous or no normal pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit: expected a value in (0, 1], got {fpr_limit}")
    stack, flat_masks = _mask_stack(masks, "masks")
    flat_maps = _scores(maps, "maps")
    if flat_maps.size != flat_masks.size:
        raise ValueError(f"masks and maps differ in size: shapes {stack.shape} vs {np.shape(maps)}")
    ranking = _Ranking.of(flat_maps)
    return _aupro_from(ranking, ranking.true_counts(flat_masks), stack, flat_masks, fpr_limit)


# --------------------------------------------------------------------------- thresholds

THRESHOLD_POLICIES = ("f1_max", "youden", "iou_max", "precision_at", "fixed")
"""How a decision threshold is chosen on the validation split (``fixed`` takes a value and
needs no validation anomalies; ``precision_at`` takes the precision to reach)."""


@dataclass(frozen=True)
class ThresholdPolicy:
    """A way of choosing the threshold ``score >= t`` that flags an image or a pixel.

    ``f1_max`` maximises F1 (the reference study), ``youden`` maximises TPR - FPR (the
    battery study), ``iou_max`` maximises TP / (TP + FP + FN), the IoU of the flagged pixels
    with the masks (the sealant study), ``precision_at: p`` takes the most permissive threshold
    whose precision reaches ``p`` (the VIN-label study) and ``fixed: v`` is ``v`` itself.
    Written ``f1_max`` or ``precision_at:0.95`` (:meth:`parse` also takes ``{precision_at:
    0.95}``).
    """

    kind: str = "f1_max"
    value: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in THRESHOLD_POLICIES:
            raise ValueError(
                f"unknown threshold policy {self.kind!r} (known: {', '.join(THRESHOLD_POLICIES)})"
            )
        takes_value = self.kind in ("precision_at", "fixed")
        if takes_value and self.value is None:
            example = "precision_at: 0.95" if self.kind == "precision_at" else "fixed: 0.5"
            raise ValueError(f"threshold policy {self.kind!r} needs a value (e.g. {example})")
        if not takes_value and self.value is not None:
            raise ValueError(f"threshold policy {self.kind!r} takes no value")
        if self.value is not None:
            if isinstance(self.value, bool) or not math.isfinite(float(self.value)):
                raise ValueError(f"threshold policy {self.kind!r}: {self.value!r} is not finite")
            if self.kind == "precision_at" and not 0 < self.value <= 1:
                raise ValueError(f"precision_at: expected a precision in (0, 1], got {self.value}")

    @classmethod
    def parse(cls, spec: Any) -> ThresholdPolicy:
        """A policy from ``"youden"``, ``"precision_at:0.95"`` or ``{"fixed": 0.5}``."""
        if isinstance(spec, ThresholdPolicy):
            return spec
        if isinstance(spec, dict):
            if len(spec) != 1:
                raise ValueError(
                    f"threshold policy: expected one key such as {{precision_at: 0.95}}, "
                    f"got {spec!r}"
                )
            ((kind, value),) = spec.items()
            return cls(str(kind), _policy_value(kind, value))
        if not isinstance(spec, str):
            raise ValueError(f"threshold policy: expected a name or a mapping, got {spec!r}")
        kind, colon, value = spec.partition(":")
        return cls(kind.strip(), _policy_value(kind, value.strip()) if colon else None)

    @property
    def needs_anomalies(self) -> bool:
        """Whether choosing it needs anomalous validation images (all but ``fixed`` do)."""
        return self.kind != "fixed"

    def __str__(self) -> str:
        if self.value is None:
            return self.kind
        # Short where that is exact, every digit otherwise: rows store this string and
        # ``sweep results --recompute`` parses it back.
        text = f"{self.value:g}"
        return f"{self.kind}:{text if float(text) == self.value else repr(float(self.value))}"

    def choose(self, labels: Any, scores: Any) -> tuple[float, str | None]:
        """``(threshold, None)`` chosen on validation ``labels`` and ``scores``, or ``(NaN,
        why)`` when no threshold can be chosen."""
        if self.kind == "fixed":
            return float(self.value), None  # type: ignore[arg-type]
        ranking, tp, positives = _ranked(labels, scores)
        negatives = ranking.order.size - positives
        if ranking.order.size == 0:
            return NAN, "validation split is empty"
        if positives == 0:
            return NAN, "validation split has no anomalies"
        if self.kind == "f1_max":
            return _f1_max_from(ranking, tp)[1], None
        if self.kind == "iou_max":
            return _iou_max_from(ranking, tp)[1], None
        if self.kind == "youden":
            if negatives == 0:
                return NAN, "validation split has no normal images"
            return _youden_from(ranking, tp)[1], None
        threshold = _recall_at_precision_from(ranking, tp, float(self.value))[1]  # type: ignore[arg-type]
        if math.isnan(threshold):
            return NAN, f"no validation threshold reaches precision {self.value:g}"
        return threshold, None


def _policy_value(kind: Any, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"threshold policy {kind!r}: expected a number, got {value!r}") from None


# --------------------------------------------------------------------------- evaluate


class _Notes:
    """NaN reasons in the order found, one entry per reason."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, keys: str, reason: str) -> None:
        self.items.append(f"{keys}: {reason}")

    def __str__(self) -> str:
        return "; ".join(self.items)


def image_metrics(
    val_labels: Any,
    val_scores: Any,
    test_labels: Any,
    test_scores: Any,
    policy: ThresholdPolicy | str = "f1_max",
) -> tuple[dict[str, float], list[str]]:
    """The image-level columns of a result row, and the reasons for their NaNs.

    Curve metrics (AUROC, AP, F1-max, recall at precision) are read off the test scores alone;
    the threshold is chosen on the validation split by ``policy`` and the test split is then
    judged at it (F1, precision, recall, accuracy, false-positive rate and share, the confusion
    matrix). :func:`evaluate` calls it on a detector's outputs and ``sweep results
    --recompute`` on a trial's stored per-image results.
    """
    policy = ThresholdPolicy.parse(policy)
    notes = _Notes()
    out = dict.fromkeys(IMAGE_METRICS, NAN)
    test_labels, test_scores = _paired(test_labels, test_scores, "test labels", "test scores")
    val_labels, val_scores = _paired(val_labels, val_scores, "val labels", "val scores")
    n_anomalous = int(np.count_nonzero(test_labels))
    n_normal = test_labels.size - n_anomalous

    if test_labels.size == 0:
        notes.add("image_*", "test split is empty")
        return out, notes.items
    ranking = _Ranking.of(test_scores)
    tp = ranking.true_counts(test_labels)
    if n_anomalous == 0:
        notes.add(
            "image_auroc, image_ap, image_f1max, image_recall_*, image_f1, image_recall",
            "test split has no anomalies",
        )
    else:
        out["image_f1max"] = _f1_max_from(ranking, tp)[0]
        out["image_ap"] = _average_precision_from(ranking, tp)
        for key, precision in RECALL_AT_PRECISION.items():
            out[key] = _recall_at_precision_from(ranking, tp, precision)[0]
        if n_normal == 0:
            notes.add("image_auroc", "test split has no normal images")
        else:
            out["image_auroc"] = _auroc_from(ranking, tp)
    del ranking, tp

    threshold, why = policy.choose(val_labels, val_scores)
    if why is not None:
        notes.add(f"image_threshold and its metrics ({policy})", why)
        return out, notes.items
    out["image_threshold"] = threshold
    stats = threshold_stats(test_labels, test_scores, threshold)
    out.update(
        image_f1=f1_at(test_labels, test_scores, threshold),
        image_precision=stats.precision,
        image_recall=stats.recall,
        image_accuracy=stats.accuracy,
        image_fpr=stats.false_positive_rate,
        image_fp_share=stats.false_positive_share,
        image_tp=stats.tp,
        image_fp=stats.fp,
        image_tn=stats.tn,
        image_fn=stats.fn,
    )
    return out, notes.items


def _pixel_problem(split: SplitOutputs, name: str) -> str | None:
    """Why ``split`` cannot give pixel metrics, or None if it can."""
    if split.maps is None:
        return "detector gives no anomaly map"
    if split.masks is None:
        return f"no ground-truth masks in the {name} split"
    maps = _to_numpy(split.maps, f"{name} maps")
    masks = _to_numpy(split.masks, f"{name} masks")
    if maps.shape != masks.shape:
        raise ValueError(f"{name} maps and masks differ in shape: {maps.shape} vs {masks.shape}")
    bad = int(maps.size - np.count_nonzero(np.isfinite(maps)))
    if bad:
        return f"{name} anomaly maps have {bad} non-finite value(s)"
    return None


def _evaluate_pixel(
    val: SplitOutputs, test: SplitOutputs, policy: ThresholdPolicy, notes: _Notes
) -> dict[str, float]:
    out = dict.fromkeys(PIXEL_METRICS, NAN)
    problem = _pixel_problem(test, "test")
    if problem is not None:
        notes.add("pixel_*", problem)
        return out
    stack, flat_masks = _mask_stack(test.masks, "test masks")
    flat_maps = _scores(test.maps, "test maps")
    if test.valid is not None:
        # Pixels outside the region of interest count for nothing; the masks are cut to it
        # (data.roi.restrict), so every anomalous pixel stays, in the same order.
        counted = np.asarray(test.valid, dtype=bool).reshape(-1)
        stack = stack & np.asarray(test.valid, dtype=bool)
        flat_masks, flat_maps = stack.reshape(-1)[counted], flat_maps[counted]
    if flat_masks.size == 0:
        notes.add("pixel_*", "test split is empty")
        return out
    n_anomalous = int(np.count_nonzero(flat_masks))
    n_normal = flat_masks.size - n_anomalous
    if n_anomalous == 0:
        notes.add(
            "pixel_auroc, pixel_ap, pixel_f1max, pixel_aupro", "test masks have no anomalous pixel"
        )
    elif n_normal == 0:
        notes.add("pixel_auroc, pixel_aupro", "test masks have no normal pixel")
    if n_anomalous:
        ranking = _Ranking.of(flat_maps)
        tp = ranking.true_counts(flat_masks)
        out["pixel_f1max"] = _f1_max_from(ranking, tp)[0]
        out["pixel_ap"] = _average_precision_from(ranking, tp)
        if n_normal:
            out["pixel_auroc"] = _auroc_from(ranking, tp)
            out["pixel_aupro"] = _aupro_from(ranking, tp, stack, flat_masks, AUPRO_FPR_LIMIT)
        del ranking, tp  # the validation split's sort below needs the memory

    if policy.needs_anomalies:
        why = _pixel_problem(val, "validation")
        if why is None:
            threshold, why = policy.choose(*_counted(val))
            if why is not None:
                why = why.replace(
                    "validation split has no anomalies", "validation masks have no anomalous pixel"
                )
    else:
        threshold, why = float(policy.value), None  # type: ignore[arg-type]
    if why is not None:
        notes.add(f"pixel_threshold and its metrics ({policy})", why)
        return out
    out["pixel_threshold"] = threshold
    stats = threshold_stats(flat_masks, flat_maps, threshold)
    out.update(
        pixel_f1=f1_at(flat_masks, flat_maps, threshold),
        pixel_iou=iou_at(flat_masks, flat_maps, threshold),
        pixel_precision=stats.precision,
        pixel_recall=stats.recall,
        pixel_fpr=stats.false_positive_rate,
    )
    return out


def evaluate(
    val: SplitOutputs,
    test: SplitOutputs,
    policy: ThresholdPolicy | str = "f1_max",
    pixel_policy: ThresholdPolicy | str | None = None,
) -> dict[str, float | str]:
    """The metric columns of a result row.

    Image level (:func:`image_metrics`): AUROC, AP, F1-max and recall at precision 0.996 /
    0.95 / 0.90 on the test split; the threshold chosen on the validation split by ``policy``
    and the test split's F1, precision, recall, accuracy, false-positive rate and share and
    confusion matrix at it. Pixel level, over every test pixel: AUROC, AP, F1-max and AUPRO (up
    to FPR 0.3); the threshold chosen on the validation maps by ``pixel_policy`` (default:
    ``policy``) and the test F1, IoU, precision, recall and false-positive rate at it.
    ``threshold_policy`` and ``pixel_threshold_policy`` name the policies; ``metric_notes``
    holds the ``"; "``-joined reasons for every NaN (empty when there is none). Degenerate
    splits give NaN, never an exception; inconsistent inputs (sizes that do not match,
    non-binary labels, non-finite image scores) raise ``ValueError``.
    """
    policy = ThresholdPolicy.parse(policy)
    pixel_policy = policy if pixel_policy is None else ThresholdPolicy.parse(pixel_policy)
    result: dict[str, float | str] = {}
    image, image_notes = image_metrics(val.labels, val.scores, test.labels, test.scores, policy)
    result.update(image)
    notes = _Notes()
    notes.items.extend(image_notes)
    result.update(_evaluate_pixel(val, test, pixel_policy, notes))
    result["threshold_policy"] = str(policy)
    result["pixel_threshold_policy"] = str(pixel_policy)
    result["metric_notes"] = str(notes)
    return result
