"""Statistics of the source studies, over a study's rows and per-image results.

* :func:`paired_t_test`: two configurations measured on the same seeds (the sealant study's
  paired t-test): does the metric differ beyond the seed-to-seed noise?
* :func:`benjamini_hochberg`: the false-discovery-rate adjustment of a family of such tests.
* :func:`paired_t_tests`: the same test for many pairs of configurations at once.
* :func:`false_negatives_by_size`: the sealant study's false negatives by defect-size tertile.

``sweep compare`` and ``sweep report`` call these; they are plain functions of arrays and
DataFrames, tested against scipy, hand-worked cases and brute force (``tests/test_stats.py``).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import stats

__all__ = [
    "SIZE_BUCKETS",
    "UNKNOWN_SIZE",
    "benjamini_hochberg",
    "false_negatives_by_size",
    "paired_t_test",
    "paired_t_tests",
]

UNKNOWN_SIZE = "unknown size"
SIZE_BUCKETS = {3: ("small", "medium", "large"), 2: ("small", "large"), 1: ("all",)}
"""Bucket names by how many size bins ties leave (see :func:`false_negatives_by_size`)."""
FN_COLUMNS = [
    "bucket",
    "min_pixels",
    "max_pixels",
    "n_anomalous",
    "n_false_negatives",
    "fn_rate",
]


def paired_t_test(a: ArrayLike, b: ArrayLike) -> tuple[float, float]:
    """Two-sided paired t-test of ``b - a`` (``scipy.stats.ttest_rel``): ``(t, p)``.

    ``a[i]`` and ``b[i]`` are one seed's values of two configurations. Pairs where either value
    is NaN or infinite are left out. Fewer than 2 pairs: ``(nan, nan)`` (no variance to test
    against). Differences without spread, where scipy has no defined answer for identical
    inputs, follow the limit of the test as the seed noise vanishes: all differences 0 (the two
    sides identical, nothing to reject) gives ``(0.0, 1.0)``; one constant non-zero difference
    gives ``(±inf, 0.0)``, as scipy does (a shift that no seed moves is certain).
    """
    x, y = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"paired_t_test: {x.size} values against {y.size}; pairs must match")
    keep = np.isfinite(x) & np.isfinite(y)
    d = y[keep] - x[keep]
    if d.size < 2:
        return math.nan, math.nan
    mean = float(d.mean())
    # Equal up to the rounding of the subtraction: scipy would divide by a variance of
    # rounding noise (and warn about catastrophic cancellation).
    if float(np.ptp(d)) <= 1e-12 * abs(mean):
        if mean == 0.0:
            return 0.0, 1.0
        return math.copysign(math.inf, mean), 0.0
    result = stats.ttest_rel(y[keep], x[keep])
    return float(result.statistic), float(result.pvalue)


def paired_t_tests(a: pd.Series, b: pd.Series) -> pd.DataFrame:
    """:func:`paired_t_test` for many groups at once (hundreds of configurations in one call).

    ``a`` and ``b`` are indexed by ``(group, seed)``; a group's pairs are the seeds both hold
    with finite values. Returns one row per group with a pair (indexed by group): ``n_pairs``,
    ``t``, ``p``, with :func:`paired_t_test`'s rules. Groups with as many pairs go to
    ``scipy.stats.ttest_rel`` together, one call per pair count.
    """
    joined = pd.concat({"a": a, "b": b}, axis=1, join="inner").astype(float)
    joined = joined[np.isfinite(joined["a"]) & np.isfinite(joined["b"])].sort_index()
    groups = joined.index.get_level_values(0)
    sizes = pd.Series(groups).value_counts(sort=False)
    result = pd.DataFrame(
        {"n_pairs": sizes.astype("int64"), "t": math.nan, "p": math.nan}, index=sizes.index
    )
    for size in sorted(set(sizes[sizes >= 2])):
        inside = groups.isin(sizes.index[sizes == size])
        block = joined[inside]
        keys = block.index.get_level_values(0)[::size]
        x = block["a"].to_numpy().reshape(len(keys), size)
        y = block["b"].to_numpy().reshape(len(keys), size)
        d = y - x
        mean = d.mean(axis=1)
        flat = np.ptp(d, axis=1) <= 1e-12 * np.abs(mean)
        t = np.where(mean == 0, 0.0, np.copysign(np.inf, mean))
        p = np.where(mean == 0, 1.0, 0.0)
        if (~flat).any():
            tested = stats.ttest_rel(y[~flat], x[~flat], axis=1)
            t[~flat], p[~flat] = tested.statistic, tested.pvalue
        result.loc[keys, "t"], result.loc[keys, "p"] = t, p
    return result


def benjamini_hochberg(p_values: ArrayLike) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (``scipy.stats.false_discovery_control``).

    NaN p-values (tests that could not run) stay NaN and are not counted in the family: m is
    the number of tests with a p-value. Rejecting where the adjusted value is below q keeps the
    false discovery rate at q (independent or positively dependent tests).
    """
    p = np.asarray(p_values, dtype=float).ravel()
    adjusted = np.full(p.shape, np.nan)
    known = ~np.isnan(p)
    if known.any():
        adjusted[known] = stats.false_discovery_control(p[known], method="bh")
    return adjusted


def false_negatives_by_size(
    images: pd.DataFrame, threshold: float | ArrayLike | str
) -> pd.DataFrame:
    """False negatives of the anomalous test images by defect-size tertile (the sealant study).

    ``images``: per-image results (``split``, ``label``, ``defect_pixels``, ``score``; one or
    more trials). ``threshold``: one number, one per row of ``images`` (each trial's own), or
    the name of a column holding it. An image is a false negative when its score is below the
    threshold (the detector calls an image anomalous at score >= threshold).

    The anomalous test images (``split == "test"``, ``label == 1``) with a known size are cut
    into three equal-count bins by ``defect_pixels`` (``pandas.qcut``). Ties at a cut merge two
    bins (sizes are never split across buckets) and fewer than three images leave bins empty,
    so two or one bucket(s) may remain, named ``small``/``large`` or ``all``. Images without
    a size form an ``unknown size`` bucket.
    One row per bucket, smallest first: ``bucket``, ``min_pixels`` / ``max_pixels`` (the
    bucket's smallest and largest defect), ``n_anomalous``, ``n_false_negatives``, ``fn_rate``.
    Empty when there are no anomalous test images.
    """
    if isinstance(threshold, str):
        if threshold not in images.columns:
            raise ValueError(f"false_negatives_by_size: no threshold column {threshold!r}")
        cut = pd.to_numeric(images[threshold], errors="coerce").to_numpy(dtype=float)
    else:
        cut = np.broadcast_to(np.asarray(threshold, dtype=float), (len(images),))
    anomalous = ((images["split"] == "test") & (images["label"] == 1)).to_numpy()
    scores = pd.to_numeric(images["score"], errors="coerce").to_numpy(dtype=float)[anomalous]
    # A NaN score or threshold is no detection: the image was not flagged.
    missed = ~(scores >= cut[anomalous])
    sizes = pd.to_numeric(images["defect_pixels"], errors="coerce").to_numpy(dtype=float)[anomalous]
    known = ~np.isnan(sizes)
    rows = []
    if known.any():
        bins = np.asarray(pd.qcut(sizes[known], 3, labels=False, duplicates="drop"), float)
        if np.isnan(bins).all():  # one distinct size: qcut has no bin edges to cut at
            bins = np.zeros_like(bins)
        # Few images can leave a bin empty (two sizes: bins 0 and 2); name what holds images.
        present = np.unique(bins)
        for name, b in zip(SIZE_BUCKETS[len(present)], present, strict=True):
            inside = bins == b
            rows.append(_bucket(name, sizes[known][inside], missed[known][inside]))
    if (~known).any():
        rows.append(_bucket(UNKNOWN_SIZE, sizes[~known], missed[~known]))
    table = pd.DataFrame(rows, columns=FN_COLUMNS)
    return table.astype({"min_pixels": "Int64", "max_pixels": "Int64"})


def _bucket(name: str, sizes: np.ndarray, missed: np.ndarray) -> dict:
    n, fn = int(missed.size), int(missed.sum())
    finite = sizes[~np.isnan(sizes)]
    return {
        "bucket": name,
        "min_pixels": int(finite.min()) if finite.size else None,
        "max_pixels": int(finite.max()) if finite.size else None,
        "n_anomalous": n,
        "n_false_negatives": fn,
        "fn_rate": fn / n if n else math.nan,
    }
