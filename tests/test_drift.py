"""The drift sentinel (sweep.read.drift) against scipy, hand-worked cases and exact enumeration."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from sweep.read.drift import (
    DRIFT_ALPHA,
    control_limit,
    drift_by_configuration,
    drift_by_trial,
    drift_test,
    ks_test,
    limit_test,
    smallest_p,
)


def exceedance_tail(n: int, m: int, k: int, beyond: int) -> float:
    """P(at least ``beyond`` of m new scores lie above the k-th largest of n reference scores),
    all n + m scores exchangeable: every choice of the reference's ranks is equally likely."""
    hits = total = 0
    for ranks in itertools.combinations(range(n + m), n):
        limit = sorted(ranks)[n - k]
        above = sum(1 for r in range(n + m) if r not in ranks and r > limit)
        hits += above >= beyond
        total += 1
    return hits / total


def test_ks_matches_scipy_and_a_hand_worked_case():
    reference = [0.11, 0.25, 0.31, 0.42, 0.58, 0.61]
    new = [0.33, 0.47, 0.66, 0.71, 0.9]
    expected = stats.ks_2samp(reference, new)
    assert ks_test(reference, new) == pytest.approx((expected.statistic, expected.pvalue))
    # Apart entirely: D = 1, and exactly 2 of the C(6, 3) = 20 rank splits are that extreme.
    assert ks_test([1, 2, 3], [4, 5, 6]) == pytest.approx((1.0, 2 / 20))
    # Non-finite scores are left out; one score is too few for a test.
    assert ks_test([1, 2, np.nan, 3], [4, 5, np.inf, 6]) == pytest.approx((1.0, 0.1))
    assert all(math.isnan(v) for v in ks_test([1.0], [2.0, 3.0]))


def test_control_limit_by_hand():
    # 9 scores: 0.003 x 10 < 1, so the limit is the largest, exceeded with probability 1/10.
    scores = [0.3, 0.1, 0.9, 0.5, 0.2, 0.8, 0.4, 0.7, 0.6]
    assert control_limit(scores) == (0.9, 1, pytest.approx(0.1))
    # 999 scores: k = floor(0.003 x 1000) = 3, the third largest, the empirical 99.7th percentile.
    many = np.arange(999, dtype=float)
    assert control_limit(many) == (996.0, 3, pytest.approx(0.003))
    result = limit_test(scores, [0.95, 0.85, 1.2, 0.9])  # 0.9 is not beyond: strictly above
    assert result["n_beyond"] == 2 and result["share_beyond"] == 0.5
    assert math.isnan(control_limit([])[0])


@pytest.mark.parametrize(("n", "m", "beyond"), [(4, 3, 1), (4, 3, 3), (5, 4, 2), (6, 2, 0)])
def test_limit_p_is_the_exact_exceedance_tail(n, m, beyond):
    reference = np.arange(n, dtype=float)
    new = np.r_[np.full(beyond, n + 10.0), np.full(m - beyond, -1.0)]
    result = limit_test(reference, new)
    assert result["n_beyond"] == beyond
    assert result["expected_share"] == pytest.approx(1 / (n + 1))
    assert result["limit_p"] == pytest.approx(exceedance_tail(n, m, 1, beyond))


def test_limit_p_with_k_above_one_matches_enumeration():
    # k = 2 needs n + 1 >= 667; scipy's beta-binomial against the enumeration at share 0.4.
    from sweep.read import drift

    n, m = 5, 3
    _, k, expected = control_limit(np.arange(n, dtype=float), share=0.4)
    assert (k, expected) == (2, pytest.approx(2 / 6))
    for beyond in range(m + 1):
        tail = stats.betabinom.sf(beyond - 1, m, k, n + 1 - k)
        assert tail == pytest.approx(exceedance_tail(n, m, k, beyond))
    assert drift.LIMIT_SHARE == 0.003


def test_a_shifted_distribution_is_flagged_and_an_identical_one_is_not():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=200)
    shifted = drift_test(reference, rng.normal(loc=1.0, size=200))
    assert shifted["drift"] is True and shifted["ks_p"] < 1e-6 and shifted["limit_p"] < 1e-6
    same = drift_test(reference, reference.copy())
    assert same["drift"] is False and same["ks_p"] == 1.0 and same["n_beyond"] == 0
    # A scale-down (new scores lower, none beyond the limit): only the KS test sees it.
    lower = drift_test(reference, rng.normal(loc=-1.0, size=200))
    assert lower["drift"] is True and lower["n_beyond"] == 0 and lower["limit_p"] == 1.0


def test_either_rule_fires_the_verdict_at_half_alpha():
    reference = np.arange(100, dtype=float)
    # 10 of 100 far beyond the limit, the rest as before: KS sees a D of 0.1, the limit a lot.
    new = np.r_[np.arange(90, dtype=float), np.full(10, 500.0)]
    result = drift_test(reference, new)
    assert result["ks_p"] > 0.5 and result["limit_p"] < 1e-3 and result["drift"] is True
    # Each rule tests at alpha / 2: a KS p between alpha / 2 and alpha alone is not drift.
    a, b = np.arange(12, dtype=float), np.arange(12, dtype=float) - 6.5
    p = ks_test(a, b)[1]
    assert DRIFT_ALPHA / 2 < p < DRIFT_ALPHA
    assert drift_test(a, b)["drift"] is False
    assert drift_test([1.0], [2.0, 3.0])["drift"] is None


def test_smallest_p_says_when_the_sentinel_cannot_fire():
    # 3 validation and 4 test normals (a smoke study): KS at best 2/35, the limit at best 1/35.
    assert smallest_p(3, 4) == pytest.approx(1 / 35)
    assert smallest_p(3, 4) > DRIFT_ALPHA / 2
    assert smallest_p(20, 20) < 1e-10
    assert math.isnan(smallest_p(1, 5))


def _images(config_hash: str, val: np.ndarray, test: np.ndarray) -> pd.DataFrame:
    frames = [
        pd.DataFrame({"split": "val", "label": 0, "score": val}),
        pd.DataFrame({"split": "val", "label": 1, "score": val + 100}),  # anomalies: ignored
        pd.DataFrame({"split": "test", "label": 0, "score": test}),
        pd.DataFrame({"split": "test", "label": 1, "score": test + 100}),
    ]
    return pd.concat(frames).assign(config_hash=config_hash)


def test_per_trial_and_per_configuration_over_seeds():
    rng = np.random.default_rng(1)
    rows, images = [], []
    for seed in (0, 1, 2):
        val = rng.normal(size=60)
        for stress, loc in (("none", 0.0), ("lighting", 2.0), ("rotation", 0.0)):
            h = f"{seed}-{stress}"
            rows.append(
                {"config_hash": h, "status": "ok", "model": "padim", "seed": seed, "stress": stress}
            )
            images.append(_images(h, val, rng.normal(loc=loc, size=40)))
    rows.append({"config_hash": "err", "status": "error", "model": "padim", "seed": 3})
    trials = drift_by_trial(pd.DataFrame(rows), pd.concat(images))
    assert len(trials) == 9 and set(trials["n_reference"]) == {60}
    assert set(trials["n_new"]) == {40}
    lighting = trials[trials["stress"] == "lighting"]
    assert lighting["drift"].all()
    table = drift_by_configuration(trials, by=["model"])
    assert table["stress"].tolist() == ["none", "lighting", "rotation"]
    flagged = table.set_index("stress")
    assert flagged.loc["lighting", "trials_drift"] == 3 and flagged.loc["lighting", "drift"]
    assert flagged.loc["none", "trials"] == 3 and not flagged.loc["none", "drift"]
    assert not flagged.loc["rotation", "drift"]
    assert flagged["trials_can_fire"].tolist() == [3, 3, 3]
    expected_p = np.median(lighting["ks_p"])
    assert flagged.loc["lighting", "ks_p_median"] == pytest.approx(expected_p)
