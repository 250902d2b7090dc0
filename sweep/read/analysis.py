"""Seed aggregation, Pareto fronts and knee-point model selection.

The study's result rows (one per trial, see ``docs/results-schema.md``) are reduced to one row
per configuration with :func:`aggregate_seeds` (mean and standard deviation over seeds, as the
reference study's tables report them). :func:`select` then finds the configurations that no
other beats on every objective (the Pareto front) and picks one "no preference" compromise on
it three ways:

* ``kneedle``: the knee of the 2-D front by the Kneedle algorithm (Satopaa et al. 2011, via
  the ``kneed`` package), the point where giving up one objective stops buying much of the
  other;
* ``utopia``: the front point closest to the utopia point (best value of every objective)
  after min-max normalising each objective over the front;
* ``topsis``: the highest TOPSIS closeness coefficient (Hwang & Yoon 1981), which takes any
  number of objectives and optional weights.

Each pick is then tested against seed noise (:func:`pick_stability`): does it change when one
objective moves one seed-std against it?
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from sweep.errors import SweepError, did_you_mean

__all__ = [
    "CONFIG_COLUMNS",
    "CONFIG_COLUMNS_EXCLUDED",
    "KNEE_METHODS",
    "Selection",
    "aggregate_seeds",
    "clean_mask",
    "config_columns",
    "config_key",
    "knee_kneedle",
    "knee_utopia",
    "pareto_mask",
    "pick_stability",
    "select",
    "selection_to_dict",
    "topsis",
    "variant_deltas",
]

CONFIG_COLUMNS = (
    "model",
    "backbone",
    "image_size",
    "epochs",
    "dataset",
    "category",
    "augmentation",
    "stress",
    "test_fraction",
    "labelled_defects",
)
"""Fixed result columns that identify a configuration (``hp.*`` columns come after them).
``split_seed`` is not one: like the seed, a split drawn per seed is variance to average over."""

VARIANT_COLUMNS = ("augmentation", "stress")
"""Configuration columns that name a data variant; ``none`` is the clean baseline."""
CLEAN = "none"

CONFIG_COLUMNS_EXCLUDED = (
    "seed",
    "hp.seed",
    "study",
    "run_id",
    "trial_id",
    "config_hash",
    "status",
    "error",
    "epochs_run",
    "trial_config",
    "device",
    "hostname",
    "versions",
    "notes",
    "metric_notes",
    "started_at",
    "finished_at",
)
"""Columns that never identify a configuration: the seed (what aggregation averages over),
bookkeeping, and per-run facts."""

HP_PREFIX = "hp."
KNEE_METHODS = ("kneedle", "utopia", "topsis")
MODES = ("max", "min")


# --------------------------------------------------------------------------- aggregation


def config_columns(df: pd.DataFrame) -> list[str]:
    """The columns of ``df`` that identify a configuration, in a fixed order.

    :data:`CONFIG_COLUMNS` that are present, then every ``hp.*`` column (sorted) except
    those in :data:`CONFIG_COLUMNS_EXCLUDED`.
    """
    fixed = [c for c in CONFIG_COLUMNS if c in df.columns]
    hparams = sorted(
        c for c in df.columns if c.startswith(HP_PREFIX) and c not in CONFIG_COLUMNS_EXCLUDED
    )
    return fixed + hparams


def _hashable(value: Any) -> Any:
    """A grouping key for one cell: lists, dicts and arrays become their JSON text."""
    if isinstance(value, (list, tuple, dict, np.ndarray)):
        return json.dumps(np.asarray(value).tolist() if isinstance(value, np.ndarray) else value)
    return value


def _sort_key(value: Any) -> tuple:
    """Total order over mixed cells: numbers, then text, then missing values."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return (2, 0.0, "")
    if isinstance(value, (bool, int, float, np.integer, np.floating, np.bool_)):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _missing_columns(df: pd.DataFrame, wanted: Sequence[str], what: str) -> None:
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise SweepError(
            f"{what}: no column(s) {', '.join(map(repr, missing))} "
            f"(columns present: {', '.join(map(str, df.columns))})"
        )


def aggregate_seeds(
    df: pd.DataFrame, metrics: Sequence[str], by: Sequence[str] | None = None
) -> pd.DataFrame:
    """One row per configuration: ``by``, ``n_seeds``, ``<metric>_mean``, ``<metric>_std``.

    Only rows with ``status == "ok"`` count (every row when there is no ``status`` column).
    ``by`` defaults to :func:`config_columns`; missing values in ``by`` form their own group.
    Means and standard deviations (``ddof=1``; 0 for a single value) skip NaN metric values,
    so one failed metric does not hide the other seeds. ``n_seeds`` counts the ok rows.
    Rows are sorted by the ``by`` columns, so the result does not depend on the input order.
    """
    metrics = list(dict.fromkeys(metrics))
    by = config_columns(df) if by is None else list(by)
    _missing_columns(df, [*by, *metrics], "aggregate_seeds")
    ok = df[df["status"] == "ok"] if "status" in df.columns else df
    columns = [*by, "n_seeds", *(f"{m}_{s}" for m in metrics for s in ("mean", "std"))]
    if ok.empty:
        return pd.DataFrame(columns=columns)

    # Factorise each key column (NaN/None as a value of its own) and group on the codes, so
    # unhashable or mixed-type cells and missing values group the same way everywhere.
    codes = pd.DataFrame(
        {c: pd.factorize(ok[c].map(_hashable), use_na_sentinel=False)[0] for c in by},
        index=ok.index,
    )
    group = (
        codes.groupby(by, sort=False).ngroup().to_numpy()
        if by
        else np.zeros(len(ok), dtype=np.int64)
    )
    first_rows = ~pd.Series(group).duplicated().to_numpy()
    result = ok.loc[first_rows, by].reset_index(drop=True)  # group id order = first appearance
    values = ok[metrics].apply(pd.to_numeric, errors="coerce").astype(float)
    grouped = values.groupby(group)
    result["n_seeds"] = grouped.size().to_numpy()
    means, stds, counts = grouped.mean(), grouped.std(ddof=1), grouped.count()
    for metric in metrics:
        result[f"{metric}_mean"] = means[metric].to_numpy()
        result[f"{metric}_std"] = stds[metric].mask(counts[metric] == 1, 0.0).to_numpy()

    order = sorted(
        range(len(result)),
        key=lambda i: tuple(_sort_key(result.at[i, c]) for c in by),
    )
    return result.iloc[order].reset_index(drop=True)[columns]


def variant_deltas(df: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Each data variant of each configuration against the same configuration clean.

    A variant is a training augmentation set and/or a test-time stress other than ``none``
    (:data:`VARIANT_COLUMNS`). One row per configuration and variant: the configuration columns,
    ``n_seeds``, ``<metric>_mean`` / ``_std`` under the variant, ``<metric>_clean`` (the clean
    configuration's mean) and ``<metric>_delta`` (variant mean minus clean mean; NaN where the
    clean configuration has no ok rows). This is the reference study's Table C.9 with the clean
    baseline beside it. Rows without variant columns count as clean.
    """
    metrics = list(dict.fromkeys(metrics))
    df = df.copy()
    for column in VARIANT_COLUMNS:
        df[column] = df[column].fillna(CLEAN) if column in df.columns else CLEAN
    agg = aggregate_seeds(df, metrics)
    base = [c for c in config_columns(df) if c not in VARIANT_COLUMNS]
    columns = [
        *base,
        *VARIANT_COLUMNS,
        "n_seeds",
        *(f"{m}_{part}" for m in metrics for part in ("mean", "std", "clean", "delta")),
    ]
    if agg.empty:
        return pd.DataFrame(columns=columns)
    keys = agg[base].apply(lambda row: json.dumps([_hashable(v) for v in row], default=str), axis=1)
    is_clean = (agg[list(VARIANT_COLUMNS)] == CLEAN).all(axis=1)
    clean = {key: agg.loc[i] for i, key in keys[is_clean].items()}
    variants = agg[~is_clean].copy()
    for metric in metrics:
        reference = [
            clean[key][f"{metric}_mean"] if key in clean else np.nan for key in keys[~is_clean]
        ]
        variants[f"{metric}_clean"] = np.asarray(reference, dtype=float)
        variants[f"{metric}_delta"] = variants[f"{metric}_mean"] - variants[f"{metric}_clean"]
    return variants.reset_index(drop=True)[columns]


# --------------------------------------------------------------------------- Pareto front


def _gains(points: Any, maximize: Sequence[bool]) -> np.ndarray:
    """``points`` as floats oriented so that larger is better in every column."""
    array = np.asarray(points, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(f"points: expected an n x k array, got shape {array.shape}")
    if len(maximize) != array.shape[1]:
        raise ValueError(
            f"maximize: {len(maximize)} flag(s) for {array.shape[1]} objective column(s)"
        )
    return np.where(np.asarray(maximize, dtype=bool), array, -array)


def _front_of_gains(gains: np.ndarray) -> np.ndarray:
    valid = np.flatnonzero(np.all(np.isfinite(gains), axis=1))
    # Lexicographic order, best first: a point that dominates another is strictly earlier, so
    # comparing each point with the front kept so far is enough (a dominated dominator is
    # itself dominated by an earlier front member, by transitivity).
    order = valid[np.lexsort((-gains[valid]).T[::-1])]
    front: list[int] = []
    for index in order:
        if front:
            kept = gains[front]
            point = gains[index]
            if np.any(np.all(kept >= point, axis=1) & np.any(kept > point, axis=1)):
                continue
        front.append(int(index))
    mask = np.zeros(len(gains), dtype=bool)
    mask[front] = True
    return mask


def pareto_mask(points: np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    """True for the rows of ``points`` (``n x k``) that no other row dominates.

    Row ``a`` dominates ``b`` when it is at least as good in every objective and strictly
    better in one (``maximize[j]`` says which way is better for column ``j``). Rows with a
    NaN or infinite value are never on the front and dominate nothing; equal rows do not
    dominate each other, so duplicates on the front are all kept.
    """
    return _front_of_gains(_gains(points, maximize))


# --------------------------------------------------------------------------- knee points


def _unique_front(gains: np.ndarray) -> np.ndarray:
    """Front row indices, one per distinct point (the lowest index), by ascending column 0."""
    front = np.flatnonzero(_front_of_gains(gains))
    _, first = np.unique(gains[front], axis=0, return_index=True)
    unique = front[np.sort(first)]
    return unique[np.argsort(gains[unique, 0], kind="stable")]


def knee_kneedle(points: np.ndarray, maximize: Sequence[bool]) -> int | None:
    """Row index of the knee of the 2-D Pareto front by Kneedle, or None.

    None when the front has fewer than 3 distinct points or Kneedle finds no knee (a front
    that bulges away from the utopia point has none).
    """
    gains = _gains(points, maximize)
    if gains.shape[1] != 2:
        raise ValueError(f"knee_kneedle: needs exactly 2 objectives, got {gains.shape[1]}")
    front = _unique_front(gains)
    if len(front) < 3:
        return None
    # kneed imports scipy.signal (about a second): only pay for it when a knee is wanted.
    from kneed import KneeLocator

    x, y = gains[front, 0], gains[front, 1]
    # Oriented as gains and sorted by x, a front falls (y decreases) and is concave where it
    # bulges towards the utopia point: that bulge is the knee.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kneed warns instead of returning a reason
        knee = KneeLocator(x, y, curve="concave", direction="decreasing").knee
    if knee is None:
        return None
    return int(front[int(np.argmin(np.abs(x - knee)))])


def knee_utopia(points: np.ndarray, maximize: Sequence[bool]) -> int | None:
    """Row index of the front point nearest the utopia point, or None without valid rows.

    Each objective is min-max normalised over the front (an objective constant on the front
    counts as 0 everywhere), the utopia point is the best of each, and the distance is
    Euclidean. Ties go to the lowest row index.
    """
    front, distance = _utopia_distances(points, maximize)
    if front.size == 0:
        return None
    return int(front[int(np.argmin(distance))])


def _utopia_distances(
    points: np.ndarray, maximize: Sequence[bool]
) -> tuple[np.ndarray, np.ndarray]:
    """Front row indices and their normalised distances to the utopia point."""
    gains = _gains(points, maximize)
    front = np.flatnonzero(_front_of_gains(gains))
    if front.size == 0:
        return front, np.zeros(0)
    values = gains[front]
    low, high = values.min(axis=0), values.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    shortfall = np.where(high > low, (high - values) / span, 0.0)
    return front, np.sqrt((shortfall**2).sum(axis=1))


def topsis(
    points: np.ndarray, maximize: Sequence[bool], weights: Sequence[float] | None = None
) -> np.ndarray:
    """TOPSIS closeness coefficient of every row (NaN for rows with a non-finite value).

    Each column is divided by its Euclidean norm over the valid rows (vector normalisation)
    and multiplied by its weight (equal weights by default; normalised to sum 1). The ideal
    takes the best weighted value of each column, the anti-ideal the worst; a row's closeness
    is ``d_anti / (d_ideal + d_anti)`` in [0, 1], higher = better. Rows that sit on both the
    ideal and the anti-ideal (every valid row equal) get 0.5.
    """
    raw = np.asarray(points, dtype=np.float64)
    gains = _gains(raw, maximize)  # validates the shapes
    raw = raw.reshape(gains.shape)
    k = gains.shape[1]
    w = np.full(k, 1.0 / k) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (k,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(
            f"weights: expected {k} non-negative finite values with a positive sum, got {weights}"
        )
    w = w / w.sum()
    closeness = np.full(len(raw), np.nan)
    valid = np.all(np.isfinite(raw), axis=1)
    if not valid.any():
        return closeness
    x = raw[valid]
    norm = np.sqrt((x**2).sum(axis=0))
    v = np.divide(x, norm, out=np.zeros_like(x), where=norm > 0) * w
    benefit = np.asarray(maximize, dtype=bool)
    ideal = np.where(benefit, v.max(axis=0), v.min(axis=0))
    anti = np.where(benefit, v.min(axis=0), v.max(axis=0))
    d_ideal = np.sqrt(((v - ideal) ** 2).sum(axis=1))
    d_anti = np.sqrt(((v - anti) ** 2).sum(axis=1))
    total = d_ideal + d_anti
    closeness[valid] = np.divide(d_anti, total, out=np.full_like(total, 0.5), where=total > 0)
    return closeness


# --------------------------------------------------------------------------- selection


@dataclass
class Selection:
    """The outcome of :func:`select`."""

    table: pd.DataFrame
    """The aggregated configurations (row labels 0..n-1, in the input's order) with
    ``on_front``, ``topsis_closeness`` and one ``knee_<method>`` flag per method."""
    objectives: list[tuple[str, str]]
    """``(metric, "max" | "min")`` pairs."""
    front: pd.DataFrame
    """The rows of ``table`` on the Pareto front."""
    picks: dict[str, int | None]
    """Method (``kneedle``, ``utopia``, ``topsis``) -> row label in ``table`` (None if none)."""
    notes: list[str] = field(default_factory=list)
    """Fallbacks taken, rows left out and how stable each pick is under seed noise."""
    chosen: str | None = None
    """The method whose pick is the recommendation: kneedle for 2 objectives (utopia when
    Kneedle has no knee), TOPSIS for 3 or more or when weights are given, utopia for one."""
    stability: dict[str, dict[str, int | None]] = field(default_factory=dict)
    """Method -> ``{objective: new pick}`` for each objective whose one-seed-std move against
    the pick changes it (empty: the pick holds). Only methods that were tested (a pick, and
    more than one seed somewhere) appear."""
    weights: dict[str, float] | None = None
    """The TOPSIS weights by objective (normalised to sum 1), None for equal weights."""


def _describe(table: pd.DataFrame, row: int) -> str:
    parts = [str(table.at[row, c]) for c in ("model", "backbone") if c in table.columns]
    parts = [p for p in parts if p not in ("None", "nan", "<NA>")]
    return f"row {row} ({'/'.join(parts)})" if parts else f"row {row}"


def _topsis_pick(
    points: np.ndarray, maximize: Sequence[bool], weights: Sequence[float] | None = None
) -> int | None:
    """The front row with the highest TOPSIS closeness, or None without a front."""
    on_front = pareto_mask(points, maximize)
    if not on_front.any():
        return None
    closeness = topsis(points, maximize, weights)
    return int(np.argmax(np.where(on_front, closeness, -np.inf)))


def pick_stability(
    points: np.ndarray,
    spread: np.ndarray,
    maximize: Sequence[bool],
    pick: int,
    picker: Callable[[np.ndarray], int | None],
) -> dict[int, int | None]:
    """Whether a pick survives each objective moving one seed-std against it.

    For objective ``j`` the picked row gets worse by its own std while every other row gets
    better by its own: the least favourable case within one std. ``picker`` is the method
    (points -> row or None). Returns ``{j: new pick}`` for each objective whose move changes
    the pick (None: the method then picks nothing); empty when the pick holds.
    """
    changed: dict[int, int | None] = {}
    for j in range(points.shape[1]):
        better = 1.0 if maximize[j] else -1.0
        shifted = points.copy()
        shifted[:, j] += better * spread[:, j]
        shifted[pick, j] -= 2.0 * better * spread[pick, j]
        other = picker(shifted)
        if other != pick:
            changed[j] = other
    return changed


def _stability_note(
    method: str,
    pick: int,
    changed: dict[int, int | None],
    names: Sequence[str],
    describe: Callable[[int], str],
) -> str:
    if not changed:
        return (
            f"uncertainty: the {method} pick {describe(pick)} holds when any one objective "
            "moves one seed-std against it"
        )
    moves = ", ".join(
        f"{names[j]} (to {'no pick' if other is None else describe(other)})"
        for j, other in changed.items()
    )
    return (
        f"uncertainty: the {method} pick {describe(pick)} changes within one seed-std, when "
        f"one objective moves one seed-std against it: {moves}"
    )


def _objective_weights(
    weights: Mapping[str, float] | None, names: Sequence[str]
) -> list[float] | None:
    """TOPSIS weights in objective order from ``{metric: weight}`` (unnamed objectives: 1)."""
    if not weights:
        return None
    unknown = [m for m in weights if m not in names]
    if unknown:
        raise SweepError(
            f"weights: {', '.join(map(repr, unknown))} "
            f"{'is not an objective' if len(unknown) == 1 else 'are not objectives'}"
            f"{did_you_mean(unknown[0], names)} (objectives: {', '.join(names)})"
        )
    values = []
    for name in names:
        value = weights.get(name, 1.0)
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise SweepError(f"weights: {name}={value!r} is not a number") from None
        if not (math.isfinite(value) and value > 0):
            raise SweepError(f"weights: {name}={value!r} must be a positive number")
        values.append(value)
    return values


def _validate_objectives(
    agg: pd.DataFrame, objectives: Sequence[tuple[str, str]]
) -> list[tuple[str, str]]:
    parsed = [(str(metric), str(mode)) for metric, mode in objectives]
    if not parsed:
        raise SweepError("select: no objectives given")
    for metric, mode in parsed:
        if mode not in MODES:
            raise SweepError(f"objective {metric!r}: mode must be 'max' or 'min', got {mode!r}")
    available = sorted(c[: -len("_mean")] for c in agg.columns if str(c).endswith("_mean"))
    missing = [m for m, _ in parsed if f"{m}_mean" not in agg.columns]
    if missing:
        raise SweepError(
            f"select: no aggregated column for objective(s) {', '.join(map(repr, missing))} "
            f"(aggregated metrics: {', '.join(available) or 'none'})"
        )
    return parsed


def select(
    agg: pd.DataFrame,
    objectives: Sequence[tuple[str, str]],
    weights: Mapping[str, float] | None = None,
) -> Selection:
    """Pareto front and knee picks over ``<metric>_mean`` columns of :func:`aggregate_seeds`.

    ``objectives`` are ``(metric, "max" | "min")`` pairs. Kneedle runs for exactly 2
    objectives; utopia distance and TOPSIS for any number. ``weights`` (``{metric: weight}``,
    positive; objectives left out weigh 1) apply to TOPSIS, and make its pick the chosen one.
    ``<metric>_std`` columns, when present, are used to say whether each method's pick changes
    when one objective moves one seed-std against it.
    """
    objectives = _validate_objectives(agg, objectives)
    names = [m for m, _ in objectives]
    maximize = [mode == "max" for _, mode in objectives]
    topsis_weights = _objective_weights(weights, names)
    table = agg.reset_index(drop=True).copy()
    points = np.column_stack(
        [pd.to_numeric(table[f"{m}_mean"], errors="coerce").to_numpy(float) for m in names]
    )
    notes: list[str] = []
    incomplete = int((~np.all(np.isfinite(points), axis=1)).sum())
    if incomplete:
        notes.append(
            f"{incomplete} configuration(s) lack a finite mean for an objective and are "
            "left out of the front"
        )
    table["on_front"] = pareto_mask(points, maximize)
    table["topsis_closeness"] = topsis(points, maximize, topsis_weights)

    pickers: dict[str, Callable[[np.ndarray], int | None]] = {
        "utopia": lambda p: knee_utopia(p, maximize),
        "topsis": lambda p: _topsis_pick(p, maximize, topsis_weights),
    }
    if len(objectives) == 2:
        pickers["kneedle"] = lambda p: knee_kneedle(p, maximize)
    picks: dict[str, int | None] = dict.fromkeys(KNEE_METHODS)
    for method, picker in pickers.items():
        picks[method] = picker(points)
    on_front = table["on_front"].to_numpy()

    n_front = len(_unique_front(_gains(points, maximize))) if on_front.any() else 0
    if len(objectives) == 2:
        if picks["kneedle"] is not None:
            chosen: str | None = "kneedle"
        else:
            chosen = "utopia" if picks["utopia"] is not None else None
            reason = (
                "fewer than 3 distinct points on the front"
                if n_front < 3
                else "no knee found (the front does not bulge towards the utopia point)"
            )
            notes.append(f"kneedle: {reason}; utopia used")
    elif len(objectives) == 1:
        chosen = "utopia" if picks["utopia"] is not None else None
        notes.append("kneedle: needs exactly 2 objectives, got 1; utopia used")
    else:
        chosen = "topsis" if picks["topsis"] is not None else None
        notes.append(f"kneedle: needs exactly 2 objectives, got {len(objectives)}; topsis used")
    if topsis_weights is not None and picks["topsis"] is not None:
        chosen = "topsis"
        shown = ", ".join(f"{m}={w:g}" for m, w in zip(names, topsis_weights, strict=True))
        notes.append(f"weights {shown}: TOPSIS's pick is the chosen one")
    if not on_front.any():
        notes.append("no configuration has a finite value for every objective: no front")
    front_rows, distance = _utopia_distances(points, maximize)
    nearest = front_rows[np.isclose(distance, distance.min())] if distance.size else front_rows
    if len(nearest) > 1 and picks["utopia"] is not None:
        tied = len({tuple(points[r]) for r in nearest})
        if tied > 1:
            notes.append(
                f"utopia: {tied} distinct front points are equally near the utopia point "
                f"(a front of two points always ties); {_describe(table, picks['utopia'])}, the "
                "first, is shown"
            )

    for method in KNEE_METHODS:
        pick = picks[method]
        table[f"knee_{method}"] = (table.index == pick) if pick is not None else False

    def describe(row: int) -> str:
        return _describe(table, row)

    stability: dict[str, dict[str, int | None]] = {}
    std_columns = [f"{m}_std" for m in names]
    tested = [m for m in KNEE_METHODS if picks[m] is not None]
    tested.sort(key=lambda m: m != chosen)  # the recommendation's note first
    if tested and all(c in table.columns for c in std_columns):
        spread = np.nan_to_num(
            np.column_stack(
                [pd.to_numeric(table[c], errors="coerce").to_numpy(float) for c in std_columns]
            )
        )
        if "n_seeds" in table.columns and (table["n_seeds"] <= 1).all():
            notes.append("uncertainty: one seed per configuration, no seed-std to test against")
        else:
            for method in tested:
                pick = int(picks[method])  # type: ignore[arg-type]
                changed = pick_stability(points, spread, maximize, pick, pickers[method])
                stability[method] = {names[j]: other for j, other in changed.items()}
                notes.append(_stability_note(method, pick, changed, names, describe))
    return Selection(
        table=table,
        objectives=objectives,
        front=table[table["on_front"]],
        picks=picks,
        notes=notes,
        chosen=chosen,
        stability=stability,
        weights=(
            None
            if topsis_weights is None
            else {m: w / sum(topsis_weights) for m, w in zip(names, topsis_weights, strict=True)}
        ),
    )


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types: None for NaN, NA and NaT, lists for arrays, ISO times."""
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [jsonable(v) for v in value.tolist()]
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    return value


def selection_to_dict(sel: Selection) -> dict:
    """A JSON-serialisable view of ``sel`` (NaN and infinities become None)."""
    records = [
        {str(k): jsonable(v) for k, v in row.items()} for row in sel.table.to_dict(orient="records")
    ]
    return {
        "objectives": [{"metric": m, "mode": mode} for m, mode in sel.objectives],
        "table": records,
        "front": [int(i) for i in sel.front.index],
        "picks": {k: None if v is None else int(v) for k, v in sel.picks.items()},
        "chosen": sel.chosen,
        "notes": list(sel.notes),
        "stability": {
            method: {m: None if r is None else int(r) for m, r in changed.items()}
            for method, changed in sel.stability.items()
        },
        "weights": None if sel.weights is None else dict(sel.weights),
    }


def clean_mask(frame: pd.DataFrame) -> pd.Series:
    """Which rows trained and tested clean (every variant column ``none`` or missing): what
    model selection compares."""
    present = [c for c in VARIANT_COLUMNS if c in frame.columns]
    if not present:
        return pd.Series(True, index=frame.index)
    return (frame[present].fillna(CLEAN) == CLEAN).all(axis=1)


def config_key(values: Mapping[str, Any], columns: Sequence[str]) -> str:
    """A configuration's identity as text: its ``columns`` values (:func:`jsonable`) as JSON,
    to match a row with its aggregated configuration."""
    return json.dumps([jsonable(values[c]) for c in columns], default=str)
