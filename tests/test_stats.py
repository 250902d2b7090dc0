"""``sweep.read.stats``: the paired t-test, Benjamini-Hochberg and false negatives by defect-size
tertile, against hand-worked values, scipy and a brute-force step-up procedure."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from sweep.read.stats import (
    benjamini_hochberg,
    false_negatives_by_size,
    paired_t_test,
    paired_t_tests,
)

# ----------------------------------------------------------------------------- paired t-test


def test_paired_t_test_hand_worked():
    # d = b - a = [1, 2, 3]: mean 2, sd 1, se 1/sqrt(3), t = 2 sqrt(3) on 2 degrees of freedom.
    # The t(2) distribution has the closed form F(t) = 1/2 + t / (2 sqrt(2 + t^2)), so the
    # two-sided p = 1 - t / sqrt(2 + t^2) = 1 - sqrt(12/14).
    t, p = paired_t_test([1.0, 1.0, 1.0], [2.0, 3.0, 4.0])
    assert t == pytest.approx(2 * math.sqrt(3))
    assert p == pytest.approx(1 - math.sqrt(12 / 14), rel=1e-9)
    # The sign follows b - a.
    t_rev, p_rev = paired_t_test([2.0, 3.0, 4.0], [1.0, 1.0, 1.0])
    assert (t_rev, p_rev) == pytest.approx((-t, p))


def test_paired_t_test_matches_scipy_and_drops_non_finite_pairs():
    rng = np.random.default_rng(0)
    a = rng.normal(0.8, 0.02, 7)
    b = a + rng.normal(0.01, 0.02, 7)
    expected = stats.ttest_rel(b, a)
    assert paired_t_test(a, b) == pytest.approx((expected.statistic, expected.pvalue))
    a_gaps, b_gaps = a.copy(), b.copy()
    a_gaps[1], b_gaps[4] = np.nan, np.inf
    keep = [0, 2, 3, 5, 6]
    expected = stats.ttest_rel(b[keep], a[keep])
    assert paired_t_test(a_gaps, b_gaps) == pytest.approx((expected.statistic, expected.pvalue))


def test_paired_t_test_degenerate_cases():
    assert all(math.isnan(v) for v in paired_t_test([0.9], [0.8]))
    assert all(math.isnan(v) for v in paired_t_test([0.9, np.nan], [0.8, 0.7]))
    assert all(math.isnan(v) for v in paired_t_test([], []))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no scipy precision-loss warning either
        assert paired_t_test([0.9, 0.8, 0.7], [0.9, 0.8, 0.7]) == (0.0, 1.0)
        # A constant shift (exact, or up to the rounding of the subtraction): p = 0, as scipy.
        assert paired_t_test([0.9, 0.8, 0.7], [1.0, 0.9, 0.8]) == (math.inf, 0.0)
        assert paired_t_test([2.0, 3.0], [1.0, 2.0]) == (-math.inf, 0.0)
    with pytest.raises(ValueError, match="pairs must match"):
        paired_t_test([1.0, 2.0], [1.0])


def test_paired_t_tests_in_bulk_equal_one_at_a_time():
    rng = np.random.default_rng(1)
    a_parts, b_parts = {}, {}
    for g, n in enumerate([5, 5, 3, 1, 4, 3, 5]):
        a = rng.normal(0.8, 0.05, n)
        b = a + rng.normal(0.02 * g, 0.01, n)
        a_parts[f"c{g}"], b_parts[f"c{g}"] = pd.Series(a), pd.Series(b)
    a_parts["same"], b_parts["same"] = pd.Series([0.5, 0.6]), pd.Series([0.5, 0.6])
    a_parts["shift"], b_parts["shift"] = pd.Series([0.5, 0.6, 0.7]), pd.Series([0.6, 0.7, 0.8])
    a_parts["gap"] = pd.Series([0.1, np.nan, 0.3, 0.2])
    b_parts["gap"] = pd.Series([0.2, 0.5, 0.35, 0.1], index=[0, 1, 2, 9])  # seed 9 not in a
    a_all, b_all = pd.concat(a_parts), pd.concat(b_parts)
    result = paired_t_tests(a_all, b_all)
    assert set(result.index) == set(a_parts)
    for group in a_parts:
        pair = pd.concat([a_parts[group], b_parts[group]], axis=1, join="inner")
        t, p = paired_t_test(pair[0], pair[1])
        n = int(np.isfinite(pair).all(axis=1).sum())
        row = result.loc[group]
        assert row["n_pairs"] == n, group
        if math.isnan(p):
            assert math.isnan(row["t"]) and math.isnan(row["p"]), group
        else:
            assert (row["t"], row["p"]) == pytest.approx((t, p), rel=1e-12), group
    assert result.loc["same", "p"] == 1.0 and result.loc["shift", "p"] == 0.0


# ----------------------------------------------------------------------------- BH


def brute_force_bh(p: list[float]) -> list[float]:
    """The step-up procedure, by definition: the adjusted p of test i is the smallest q at which
    BH rejects it, i.e. min over k >= rank(i) of p_(k) m / k, capped at 1."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    rank = {i: r + 1 for r, i in enumerate(order)}
    return [min(1.0, min(p[order[k - 1]] * m / k for k in range(rank[i], m + 1))) for i in range(m)]


def test_benjamini_hochberg_hand_worked():
    # Sorted: 0.005, 0.01, 0.03, 0.04 -> p m / k = 0.02, 0.02, 0.04, 0.04 (already monotone).
    adjusted = benjamini_hochberg([0.01, 0.04, 0.03, 0.005])
    assert adjusted.tolist() == pytest.approx([0.02, 0.04, 0.04, 0.02])
    # Step-up: 0.04 * 3/2 = 0.06 would exceed the larger p's 0.045 * 3/3, so it takes 0.045.
    assert benjamini_hochberg([0.01, 0.04, 0.045]).tolist() == pytest.approx([0.03, 0.045, 0.045])


def test_benjamini_hochberg_against_brute_force():
    rng = np.random.default_rng(3)
    for m in (1, 2, 5, 17, 60):
        p = np.concatenate([rng.uniform(0, 0.05, m // 2), rng.uniform(0, 1, m - m // 2)])
        p[rng.integers(0, m)] = p[0]  # a tie
        assert benjamini_hochberg(p).tolist() == pytest.approx(brute_force_bh(p.tolist()))


def test_benjamini_hochberg_passes_nan_through_outside_the_family():
    p = [0.01, np.nan, 0.04, 0.03, np.nan, 0.005]
    adjusted = benjamini_hochberg(p)
    assert np.isnan(adjusted[[1, 4]]).all()
    # The family is the four finite p-values: m = 4, not 6.
    assert adjusted[[0, 2, 3, 5]].tolist() == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert benjamini_hochberg([]).size == 0
    assert np.isnan(benjamini_hochberg([np.nan, np.nan])).all()


# ----------------------------------------------------------------------------- tertiles


def images_table() -> pd.DataFrame:
    """Nine anomalous test images of sizes 10..90 px (three per tertile), one anomalous test
    image without a mask, two good test images and an anomalous validation image; scores are
    chosen so the misses at threshold 0.5 are known."""
    rows = [("test", 1, size, score) for size, score in zip(
        [10, 20, 30, 40, 50, 60, 70, 80, 90],
        [0.1, 0.2, 0.9, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95],
        strict=True,
    )]  # fmt: skip
    rows += [("test", 1, None, 0.3), ("test", 0, None, 0.1), ("test", 0, None, 0.9)]
    rows += [("val", 1, 5, 0.0)]
    return pd.DataFrame(rows, columns=["split", "label", "defect_pixels", "score"]).astype(
        {"defect_pixels": "Int64"}
    )


def test_false_negatives_by_size_tertiles():
    table = false_negatives_by_size(images_table(), 0.5)
    assert table.iloc[:3].to_dict(orient="records") == [
        {"bucket": "small", "min_pixels": 10, "max_pixels": 30, "n_anomalous": 3,
         "n_false_negatives": 2, "fn_rate": pytest.approx(2 / 3)},
        {"bucket": "medium", "min_pixels": 40, "max_pixels": 60, "n_anomalous": 3,
         "n_false_negatives": 1, "fn_rate": pytest.approx(1 / 3)},
        {"bucket": "large", "min_pixels": 70, "max_pixels": 90, "n_anomalous": 3,
         "n_false_negatives": 0, "fn_rate": 0.0},
    ]  # fmt: skip
    unknown = table.iloc[3]
    assert (unknown["bucket"], unknown["n_anomalous"], unknown["n_false_negatives"]) == (
        "unknown size",
        1,
        1,
    )
    assert pd.isna(unknown["min_pixels"]) and pd.isna(unknown["max_pixels"])
    # Score == threshold is a detection; per-image thresholds (each trial's own) by column.
    images = images_table().assign(cut=[0.1] * 3 + [0.9] * 10)
    by_column = false_negatives_by_size(images, "cut")
    assert by_column["n_false_negatives"].tolist() == [0, 3, 1, 1]  # 0.9 >= 0.9 is found


def test_false_negatives_by_size_ties_and_few_images():
    sizes = [10, 10, 10, 10, 20, 30]
    images = pd.DataFrame({"split": "test", "label": 1, "defect_pixels": sizes, "score": [0.0] * 6})
    table = false_negatives_by_size(images, 0.5)
    # The lower cut falls inside the tie at 10: the 10s stay together, two buckets remain.
    assert table["bucket"].tolist() == ["small", "large"]
    assert table["n_anomalous"].tolist() == [4, 2]
    assert table[["min_pixels", "max_pixels"]].values.tolist() == [[10, 10], [20, 30]]
    one = false_negatives_by_size(images.iloc[:1], 0.5)
    assert one["bucket"].tolist() == ["all"] and one["n_false_negatives"].tolist() == [1]
    same = false_negatives_by_size(images.iloc[:4], 0.5)
    assert same["bucket"].tolist() == ["all"] and same["n_anomalous"].tolist() == [4]
    two = false_negatives_by_size(images.iloc[3:5], 0.5)
    assert two["bucket"].tolist() == ["small", "large"]
    none = false_negatives_by_size(images.assign(label=0), 0.5)
    assert none.empty and "fn_rate" in none.columns
