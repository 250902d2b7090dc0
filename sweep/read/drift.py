"""A drift sentinel: does a detector's score distribution on new normal images still match the
one it had on validation?

The battery study proposes a detector's score as a drift sentinel: when a line's lighting,
fixture or part orientation changes, the scores of good parts move before anyone labels a
defect. Here the new normal images are a trial's normal test images (``split == "test"``,
``label == 0``) and the reference its normal validation images (``split == "val"``,
``label == 0``), both from the trial's per-image results (``_images/``). A test-time stress
(``data.stress``) changes the test split only, so a stressed trial's validation split is the
clean one, and its test normals are the same parts under the shift; the unstressed trial's test
normals are the control, where no drift is expected.

Two rules, each at ``alpha / 2`` (Bonferroni), so that on a stable process the verdict's false
alarm rate is at most ``alpha`` (:data:`DRIFT_ALPHA`, 0.05):

* :func:`ks_test`: the two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``,
  two-sided): any change of the distribution's shape or location, up or down.
* :func:`control_limit` / :func:`limit_test`: the control limit is the ``k``-th largest
  validation normal score, ``k = max(1, floor(0.003 (n + 1)))`` of ``n``: the empirical 99.7th
  percentile (a three-sigma chart's share), or the largest score where validation is too small
  for it. Under no drift, scores are exchangeable, so a new normal image lies beyond it with
  probability ``k / (n + 1)`` whatever the score distribution, and the count beyond it among
  ``m`` new images is beta-binomial(``m``, ``k``, ``n + 1 - k``): a binomial whose rate is
  itself uncertain, because the limit is estimated from ``n`` images. The rule fires when that
  count is improbably high (upper tail below ``alpha / 2``).

:func:`drift_test` applies both to two arrays; :func:`drift_by_trial` to every trial of an
output; :func:`drift_by_configuration` counts, per configuration and shift, the seeds that flag
drift. Tested against scipy and exact enumeration (``tests/test_drift.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import stats

from sweep.read.analysis import CLEAN, config_columns

__all__ = [
    "DRIFT_ALPHA",
    "LIMIT_SHARE",
    "MIN_IMAGES",
    "control_limit",
    "drift_by_configuration",
    "drift_by_trial",
    "drift_test",
    "ks_test",
    "limit_test",
    "smallest_p",
]

DRIFT_ALPHA = 0.05
"""The verdict's significance level: each rule tests at half of it."""
LIMIT_SHARE = 0.003
"""The share of validation normal scores above the control limit (a three-sigma chart's)."""
MIN_IMAGES = 2
"""Fewer normal images than this on either side: no test, no verdict."""
TRIAL_COLUMNS = [
    "n_reference",
    "n_new",
    "ks_statistic",
    "ks_p",
    "limit",
    "expected_share",
    "n_beyond",
    "share_beyond",
    "limit_p",
    "min_p",
    "drift",
]


def _finite(values: ArrayLike) -> np.ndarray:
    x = np.asarray(values, dtype=float).ravel()
    return x[np.isfinite(x)]


def ks_test(reference: ArrayLike, new: ArrayLike) -> tuple[float, float]:
    """Two-sided two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``): ``(D, p)``.
    Non-finite scores are left out; NaNs when either side has fewer than :data:`MIN_IMAGES`."""
    x, y = _finite(reference), _finite(new)
    if x.size < MIN_IMAGES or y.size < MIN_IMAGES:
        return math.nan, math.nan
    result = stats.ks_2samp(x, y)
    return float(result.statistic), float(result.pvalue)


def control_limit(reference: ArrayLike, share: float = LIMIT_SHARE) -> tuple[float, int, float]:
    """The control limit of the validation normal scores ``reference``: ``(limit, k,
    expected_share)``. The limit is the ``k``-th largest score, ``k = max(1, floor(share (n +
    1)))``; a new score from the same distribution lies above it with probability
    ``expected_share = k / (n + 1)`` (exchangeability; ties only lower it)."""
    x = np.sort(_finite(reference))
    n = x.size
    if n == 0:
        return math.nan, 0, math.nan
    k = max(1, math.floor(share * (n + 1)))
    return float(x[n - k]), k, k / (n + 1)


def limit_test(reference: ArrayLike, new: ArrayLike) -> dict:
    """The new scores against the reference's :func:`control_limit`: ``limit``,
    ``expected_share``, ``n_beyond`` (new scores strictly above the limit), ``share_beyond`` and
    ``limit_p``, the probability of at least that many beyond it under no drift (the upper
    tail of beta-binomial(``m``, ``k``, ``n + 1 - k``); NaN with too few images)."""
    x, y = _finite(reference), _finite(new)
    limit, k, expected = control_limit(x)
    if x.size < MIN_IMAGES or y.size < MIN_IMAGES:
        return {
            "limit": limit,
            "expected_share": expected,
            "n_beyond": int((y > limit).sum()) if x.size else 0,
            "share_beyond": math.nan,
            "limit_p": math.nan,
        }
    beyond = int((y > limit).sum())
    p = float(stats.betabinom.sf(beyond - 1, y.size, k, x.size + 1 - k))
    return {
        "limit": limit,
        "expected_share": expected,
        "n_beyond": beyond,
        "share_beyond": beyond / y.size,
        "limit_p": min(p, 1.0),
    }


def smallest_p(n_reference: int, n_new: int) -> float:
    """The smallest p-value either rule can give with these many normal images (both samples
    apart for the KS test, every new score beyond the limit for the control limit); NaN below
    :data:`MIN_IMAGES`. When it is not below ``alpha / 2`` the sentinel cannot fire at all:
    "no drift" then says nothing (a smoke study's handful of images)."""
    if n_reference < MIN_IMAGES or n_new < MIN_IMAGES:
        return math.nan
    ks = stats.ks_2samp(np.zeros(n_reference), np.ones(n_new)).pvalue
    _, k, _ = control_limit(np.arange(n_reference, dtype=float))
    limit = stats.betabinom.pmf(n_new, n_new, k, n_reference + 1 - k)
    return float(min(ks, limit))


def drift_test(reference: ArrayLike, new: ArrayLike, alpha: float = DRIFT_ALPHA) -> dict:
    """Both rules on validation normal scores ``reference`` and new normal scores ``new``.

    Returns ``n_reference``, ``n_new``, ``ks_statistic``, ``ks_p``, the :func:`limit_test`
    keys, ``min_p`` (:func:`smallest_p`) and ``drift``: True when ``ks_p`` or ``limit_p`` is
    below ``alpha / 2``, None when either side has fewer than :data:`MIN_IMAGES` finite scores.
    """
    x, y = _finite(reference), _finite(new)
    d, p = ks_test(x, y)
    limit = limit_test(x, y)
    drift = None
    if not math.isnan(p):
        drift = bool(p < alpha / 2 or limit["limit_p"] < alpha / 2)
    return {
        "n_reference": int(x.size),
        "n_new": int(y.size),
        "ks_statistic": d,
        "ks_p": p,
        **limit,
        "min_p": smallest_p(x.size, y.size),
        "drift": drift,
    }


def drift_by_trial(
    rows: pd.DataFrame, images: pd.DataFrame, alpha: float = DRIFT_ALPHA
) -> pd.DataFrame:
    """:func:`drift_test` for every ok trial of ``rows`` with per-image results in ``images``
    (``sweep.results.read_images``): its normal test scores against its normal validation
    scores. One row per trial: the rows' columns and :data:`TRIAL_COLUMNS`."""
    ok = rows[rows["status"] == "ok"] if "status" in rows.columns else rows
    normal = images[images["label"] == 0]
    scores = {
        (h, split): group["score"].to_numpy(dtype=float)
        for (h, split), group in normal.groupby(["config_hash", "split"])
    }
    empty = np.array([], dtype=float)
    out = []
    for row in ok.to_dict(orient="records"):
        h = row["config_hash"]
        if not any((h, s) in scores for s in ("val", "test")):
            continue
        test = drift_test(scores.get((h, "val"), empty), scores.get((h, "test"), empty), alpha)
        out.append({**row, **test})
    if not out:
        return pd.DataFrame(columns=[*ok.columns, *TRIAL_COLUMNS])
    return pd.DataFrame(out)


def drift_by_configuration(
    trials: pd.DataFrame, by: Sequence[str] | None = None, alpha: float = DRIFT_ALPHA
) -> pd.DataFrame:
    """Per configuration and shift (``stress``), over seeds: ``trials`` (seeds tested),
    ``trials_drift`` (seeds that flag drift), ``ks_p_median``, ``share_beyond_median``,
    ``expected_share_median``, ``trials_can_fire`` (seeds with enough images for a rule to
    reach ``alpha / 2``: :func:`smallest_p`) and ``drift``: True when more than half of the
    tested seeds flag drift. ``by``: the configuration columns (default ``config_columns``
    without ``stress``). Trials without a verdict are left out; the clean control
    (``stress == "none"``) comes first in each configuration."""
    by = [c for c in config_columns(trials) if c != "stress"] if by is None else list(by)
    tested = trials[trials["drift"].notna()].copy()
    tested["stress"] = tested["stress"].fillna(CLEAN) if "stress" in tested else CLEAN
    columns = [
        *by,
        "stress",
        "trials",
        "trials_drift",
        "ks_p_median",
        "share_beyond_median",
        "expected_share_median",
        "trials_can_fire",
        "drift",
    ]
    if tested.empty:
        return pd.DataFrame(columns=columns)
    tested["drift"] = tested["drift"].astype(bool)
    tested["can_fire"] = tested["min_p"] < alpha / 2
    grouped = tested.groupby([*by, "stress"], dropna=False, sort=False)
    table = grouped.agg(
        trials=("drift", "size"),
        trials_drift=("drift", "sum"),
        ks_p_median=("ks_p", "median"),
        share_beyond_median=("share_beyond", "median"),
        expected_share_median=("expected_share", "median"),
        trials_can_fire=("can_fire", "sum"),
    ).reset_index()
    table = table.astype({"trials_drift": "int64", "trials_can_fire": "int64"})
    table["drift"] = 2 * table["trials_drift"] > table["trials"]
    # The control first, then the shifts by name, within configurations in their own order.
    table["_clean"] = table["stress"] != CLEAN
    table = table.sort_values([*by, "_clean", "stress"], kind="stable", na_position="first")
    return table.drop(columns="_clean").reset_index(drop=True)[columns]
