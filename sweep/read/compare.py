"""``sweep compare``: the same configurations of two study outputs side by side.

Two outputs differ by design in a few keys (the *treatment*: the augmentation set, the part,
the image size, ...) and are otherwise meant to hold the same configurations. The configuration
columns (``sweep.read.analysis.config_columns``: model, backbone, image size, data set, variants,
every ``hp.*``) minus the treatment keys match a configuration of A with one of B; each side is
aggregated over seeds and every metric is shown as mean ± std for A and B with the difference
of the means (B - A).

Each difference comes with a p-value: a paired t-test over the seeds both sides ran
(``sweep.read.stats.paired_t_tests``; the seed fixes the data order, initialisation and
sampling, so seed s of A and seed s of B share them) and its Benjamini-Hochberg adjustment.
The family of the adjustment is one metric across all matched configurations: the question
a comparison asks is "where does the treatment change this metric?", one test per
configuration, and the metrics are different questions (and strongly correlated, which would
only make a family over them conservative in an unknown way).

The treatment is ``--on KEY`` (repeatable), or else found: the configuration columns that are
constant within each output but differ between them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sweep.errors import SweepError, did_you_mean
from sweep.read import analysis
from sweep.read.query import apply_where
from sweep.read.report import metric_mode
from sweep.read.stats import benjamini_hochberg, paired_t_tests
from sweep.results import read_results

__all__ = ["DEFAULT_METRICS", "SIGNIFICANCE", "compare_outputs", "print_comparison"]

DEFAULT_METRICS = ("image_auroc", "pixel_auroc", "image_f1", "pixel_f1", "latency_ms")
SIGNIFICANCE = 0.05
"""The adjusted p-value below which the table marks a difference (a false discovery rate)."""


def _norm(value: Any) -> Any:
    """A cell as a plain, comparable value: NaN -> None, 64.0 -> 64, arrays -> JSON."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, np.ndarray):
        return json.dumps(value.tolist(), default=str)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return int(value)
    return value


def _values(df: pd.DataFrame, column: str) -> set:
    if column not in df.columns:
        return {None}
    return {json.dumps(_norm(v), default=str) for v in df[column]}


def _shown(values: set) -> str:
    return ", ".join(sorted(str(json.loads(v)) for v in values))


def _treatment(a: pd.DataFrame, b: pd.DataFrame, columns: list[str], on: Sequence[str]) -> list:
    if on:
        for key in on:
            if key not in columns:
                known = [*columns, *(c for c in a.columns if c not in columns)]
                raise SweepError(
                    f"--on {key!r}: not a configuration column{did_you_mean(key, known)} "
                    f"(configuration columns: {', '.join(columns)})"
                )
        return list(dict.fromkeys(on))
    found = []
    for column in columns:
        in_a, in_b = _values(a, column), _values(b, column)
        if len(in_a) == 1 and len(in_b) == 1 and in_a != in_b:
            found.append(column)
    return found


def _side(
    df: pd.DataFrame, match_on: list[str], treatment: list[str], metrics: list[str]
) -> pd.DataFrame:
    """One output aggregated over seeds, with ``_key``: its match columns' values as JSON."""
    df = df.copy()
    by = [*match_on, *treatment]
    for column in by:
        if column not in df.columns:
            df[column] = None
    agg = analysis.aggregate_seeds(df, metrics, by=by)
    agg["_key"] = [
        json.dumps([_norm(row[c]) for c in match_on], default=str) for _, row in agg.iterrows()
    ]
    return agg


def _seed_means(df: pd.DataFrame, match_on: list[str], metrics: list[str]) -> pd.DataFrame:
    """One output's ok rows as metric means per ``(_key, seed)`` (``_key`` as in :func:`_side`;
    a repeated trial of a seed counts once, as its mean)."""
    ok = df[(df["status"] == "ok") & df["seed"].notna()] if "status" in df.columns else df
    present = [c for c in match_on if c in ok.columns]
    keys = [
        json.dumps([_norm(values.get(c)) for c in match_on], default=str)
        for values in ok[present].to_dict(orient="records")
    ]
    values = ok[metrics].apply(pd.to_numeric, errors="coerce").astype(float)
    return values.groupby([pd.Index(keys, name="_key"), ok["seed"].to_numpy()]).mean()


def _add_paired_tests(
    matched: list[tuple[str, dict]], means_a: pd.DataFrame, means_b: pd.DataFrame, metrics: list
) -> None:
    """``paired_seeds``, ``<m>_p`` and ``<m>_p_adj`` on each matched entry (in place)."""
    common = means_a.index.intersection(means_b.index).get_level_values(0).value_counts()
    for key, entry in matched:
        entry["paired_seeds"] = int(common.get(key, 0))
    for metric in metrics:
        tests = paired_t_tests(means_a[metric], means_b[metric])
        p_values = [float(tests["p"].get(key, math.nan)) for key, _ in matched]
        adjusted = benjamini_hochberg(p_values)
        for (_, entry), p, p_adj in zip(matched, p_values, adjusted, strict=True):
            entry[f"{metric}_p"] = None if math.isnan(p) else p
            entry[f"{metric}_p_adj"] = None if math.isnan(p_adj) else float(p_adj)


def _metric_list(a: pd.DataFrame, b: pd.DataFrame, metrics: Sequence[str] | None) -> list[str]:
    columns = set(a.columns) | set(b.columns)
    if not metrics:
        return [
            m
            for m in DEFAULT_METRICS
            if any(m in df.columns and df[m].notna().any() for df in (a, b))
        ] or [m for m in DEFAULT_METRICS if m in columns]
    chosen = []
    for metric in metrics:
        if metric not in columns:
            raise SweepError(f"--metric {metric!r}: no such column{did_you_mean(metric, columns)}")
        for df in (a, b):
            if metric in df.columns and not pd.api.types.is_numeric_dtype(df[metric]):
                raise SweepError(f"--metric {metric!r}: not a numeric column")
        chosen.append(metric)
    return list(dict.fromkeys(chosen))


def compare_outputs(
    dir_a: str | Path,
    dir_b: str | Path,
    *,
    metrics: Sequence[str] | None = None,
    on: Sequence[str] = (),
    where: Sequence[str] = (),
) -> dict:
    """Match the configurations of two outputs and compare their metrics (JSON-able dict).

    Keys: ``a``, ``b`` (the directories), ``treatment`` (key -> its values in A and in B),
    ``match_on`` (the columns that matched), ``metrics``, ``modes``, ``matched`` (one entry per
    configuration in both: its match columns, ``n_seeds_a`` / ``_b`` and per metric
    ``<m>_a`` / ``<m>_a_std`` / ``<m>_b`` / ``<m>_b_std`` / ``<m>_diff``, and the paired
    t-test over the seeds both sides hold with a value: ``<m>_p`` and ``<m>_p_adj``, the
    Benjamini-Hochberg adjustment over the matched configurations, None with fewer than 2
    such seeds; ``paired_seeds``: the seeds both sides ran), ``only_a``, ``only_b``
    (configurations in one output only) and ``rows`` (row and ok counts per side).
    ``where`` filters both sides first (``sweep.read.query`` conditions).
    """
    frames = []
    for directory in (dir_a, dir_b):
        df = read_results(directory)
        if df.empty:
            raise SweepError(f"results {str(directory)!r}: no trial rows found")
        frames.append(apply_where(df, where) if where else df)
    a, b = frames
    metric_names = _metric_list(a, b, metrics)
    for df in (a, b):
        for metric in metric_names:
            if metric not in df.columns:
                df[metric] = np.nan
    columns = list(dict.fromkeys([*analysis.config_columns(a), *analysis.config_columns(b)]))
    treatment = _treatment(a, b, columns, on)
    match_on = [c for c in columns if c not in treatment]
    sides = [_side(df, match_on, treatment, metric_names) for df in (a, b)]
    for side, name, directory in zip(sides, "AB", (dir_a, dir_b), strict=True):
        repeated = side[side["_key"].duplicated(keep=False)]
        if len(repeated):
            varying = [c for c in treatment if repeated[c].map(_norm).nunique(dropna=False) > 1]
            shown = "; ".join(
                f"{c}: {', '.join(sorted(map(str, repeated[c].map(_norm).unique())))}"
                for c in varying
            )
            example = varying[0] if varying else "KEY"
            raise SweepError(
                f"{name} ({directory}): one configuration holds several values of the "
                f"treatment ({shown}); compare needs one value per side: filter with "
                f"--where, e.g. --where '{example} == ...'"
            )
    by_key = [
        dict(zip(side["_key"], side.to_dict(orient="records"), strict=True)) for side in sides
    ]
    modes = {m: metric_mode(m) for m in metric_names}
    matched, only_a, only_b = [], [], []
    tested: list[tuple[str, dict]] = []

    def identity(row: dict) -> dict:
        return {c: _norm(row.get(c)) for c in match_on}

    for key, row_a in by_key[0].items():
        row_b = by_key[1].get(key)
        if row_b is None:
            only_a.append({**identity(row_a), "n_seeds": int(row_a["n_seeds"])})
            continue
        entry: dict[str, Any] = {
            **identity(row_a),
            "n_seeds_a": int(row_a["n_seeds"]),
            "n_seeds_b": int(row_b["n_seeds"]),
        }
        for metric in metric_names:
            mean_a, mean_b = _norm(row_a[f"{metric}_mean"]), _norm(row_b[f"{metric}_mean"])
            entry[f"{metric}_a"] = mean_a
            entry[f"{metric}_a_std"] = _norm(row_a[f"{metric}_std"])
            entry[f"{metric}_b"] = mean_b
            entry[f"{metric}_b_std"] = _norm(row_b[f"{metric}_std"])
            entry[f"{metric}_diff"] = (
                None if mean_a is None or mean_b is None else float(mean_b) - float(mean_a)
            )
        matched.append(entry)
        tested.append((key, entry))
    for key, row_b in by_key[1].items():
        if key not in by_key[0]:
            only_b.append({**identity(row_b), "n_seeds": int(row_b["n_seeds"])})
    _add_paired_tests(
        tested,
        _seed_means(a, match_on, metric_names),
        _seed_means(b, match_on, metric_names),
        metric_names,
    )
    return {
        "a": str(dir_a),
        "b": str(dir_b),
        "treatment": {
            c: {"a": _shown(_values(a, c)), "b": _shown(_values(b, c))} for c in treatment
        },
        "match_on": match_on,
        "metrics": metric_names,
        "modes": modes,
        "matched": matched,
        "only_a": only_a,
        "only_b": only_b,
        "rows": {
            "a": {"rows": len(a), "ok": int((a["status"] == "ok").sum())},
            "b": {"rows": len(b), "ok": int((b["status"] == "ok").sum())},
        },
    }


def _label_columns(entries: list[dict], match_on: list[str]) -> list[str]:
    """The match columns worth a table column: model and backbone, any other that varies, and
    a hyperparameter where it varies within one model (what tells its configurations apart)."""
    shown = [c for c in ("model", "backbone") if c in match_on]
    for column in match_on:
        if column in shown:
            continue
        if column.startswith("hp."):
            by_model: dict[Any, set] = {}
            for entry in entries:
                if entry.get(column) is not None:
                    by_model.setdefault(entry.get("model"), set()).add(
                        json.dumps(entry[column], default=str)
                    )
            varies = any(len(values) > 1 for values in by_model.values())
        else:
            varies = len({json.dumps(e.get(column), default=str) for e in entries}) > 1
        if varies:
            shown.append(column)
    return shown


def _fmt(mean: Any, std: Any, digits: int) -> str:
    if mean is None:
        return "-"
    if std is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _p_cell(p_adj: Any) -> str:
    if p_adj is None:
        return "[dim]n<2[/dim]"
    text = f"{p_adj:.2g}" if p_adj >= 1e-4 else f"{p_adj:.0e}"
    return f"[bold]{text}*[/bold]" if p_adj < SIGNIFICANCE else text


def print_comparison(result: dict, console: Console) -> None:
    """The comparison as rich tables (A, B, B - A per metric) and the unmatched lists."""
    treatment = result["treatment"]
    if treatment:
        what = "; ".join(f"{k}: A = {v['a']}, B = {v['b']}" for k, v in treatment.items())
    else:
        what = "no key differs between them (same configurations, compared as they are)"
    console.print(
        f"A = {escape(result['a'])}\nB = {escape(result['b'])}\ntreatment: {escape(what)}"
    )
    entries = result["matched"] + result["only_a"] + result["only_b"]
    labels = _label_columns(entries, result["match_on"])
    table = Table(
        title=f"{len(result['matched'])} configuration(s) in both (mean ± std over seeds; "
        "Δ = B - A, green = better; p: paired t-test over seeds, Benjamini-Hochberg adjusted "
        f"per metric over the configurations, * below {SIGNIFICANCE:g}; n<2: fewer than 2 "
        "seeds on both sides)"
    )
    for column in labels:
        table.add_column(column.removeprefix("hp."), justify="left")
    table.add_column("seeds A/B", justify="right")
    for metric in result["metrics"]:
        arrow = "↓" if result["modes"][metric] == "min" else "↑"
        table.add_column(f"{metric} {arrow} A", justify="right")
        table.add_column("B", justify="right")
        table.add_column("Δ", justify="right")
        table.add_column("p adj", justify="right")
    for entry in result["matched"]:
        cells = []
        for metric in result["metrics"]:
            digits = 1 if metric.endswith(("_ms", "_s")) else 3
            diff = entry[f"{metric}_diff"]
            if diff is None:
                delta = "-"
            else:
                better = diff > 0 if result["modes"][metric] == "max" else diff < 0
                colour = "dim" if diff == 0 else "green" if better else "red"
                delta = f"[{colour}]{diff:+.{digits}f}[/{colour}]"
            cells += [
                _fmt(entry[f"{metric}_a"], entry[f"{metric}_a_std"], digits),
                _fmt(entry[f"{metric}_b"], entry[f"{metric}_b_std"], digits),
                delta,
                _p_cell(entry.get(f"{metric}_p_adj")),
            ]
        table.add_row(
            *(escape(str(entry.get(c) if entry.get(c) is not None else "-")) for c in labels),
            f"{entry['n_seeds_a']}/{entry['n_seeds_b']}",
            *cells,
        )
    console.print(table)
    for side, name in (("only_a", "A"), ("only_b", "B")):
        rows = result[side]
        if not rows:
            continue
        only = Table(title=f"{len(rows)} configuration(s) only in {name}")
        for column in labels:
            only.add_column(column.removeprefix("hp."), justify="left")
        only.add_column("seeds", justify="right")
        for entry in rows:
            only.add_row(
                *(escape(str(entry.get(c) if entry.get(c) is not None else "-")) for c in labels),
                str(entry["n_seeds"]),
            )
        console.print(only)
