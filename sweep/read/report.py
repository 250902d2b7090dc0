"""``sweep report``: a study's results as a decision.

:func:`build_report` reads a study's output, aggregates the seeds, finds the Pareto front and
each knee method's pick (``sweep.read.analysis``), writes the plots (``sweep.read.plots``) and
returns the report as a JSON-able dict. Three renderings of that dict:

* :func:`print_report`: rich tables on the terminal;
* :func:`render_html`: one self-contained HTML file (inline CSS, plots embedded as base64
  ``data:`` URIs, nothing fetched from anywhere), for a browser or a mail;
* :func:`render_markdown`: the same content as Markdown, plots linked by relative path.

:func:`write_atomically` writes a rendering (temporary file + ``os.replace``), so a reader never
sees half a report and a failed write leaves nothing behind.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sweep.errors import SweepError
from sweep.read import analysis
from sweep.read.drift import (
    DRIFT_ALPHA,
    LIMIT_SHARE,
    drift_by_configuration,
    drift_by_trial,
)
from sweep.read.stats import benjamini_hochberg, false_negatives_by_size, paired_t_tests
from sweep.results import METRICS, Objective, read_images, read_results, write_atomically

__all__ = [
    "REPORT_METRICS",
    "ROBUSTNESS_METRICS",
    "build_report",
    "check_writable",
    "metric_mode",
    "parse_weights",
    "print_report",
    "render_html",
    "render_markdown",
    "study_objectives",
    "write_atomically",
]

ROBUSTNESS_METRICS = ("image_auroc", "image_f1", "pixel_auroc", "pixel_f1")
"""The metrics of the reference study's robustness table (Table C.9)."""
REPORT_METRICS = (
    "image_auroc",
    "image_f1",
    "pixel_auroc",
    "pixel_f1",
    "pixel_aupro",
    "latency_ms",
    "train_s",
)
"""The metrics of the configurations table (the objectives are added when not among them)."""
OPTIONAL_METRICS = {"image_ap": "image_f1", "image_recall_p95": "image_ap"}
"""Table metrics shown where the rows have values for them (outputs before issue 15 lack the
columns), each placed after the metric named."""
EVALUATION_COLUMNS = ("threshold_policy", "val_source", "aspect_change", "roi")
"""Row columns that say how a threshold was chosen, how the images' aspect ratio changed and
which region of interest counted; the report header shows their values."""
SIGNIFICANCE = 0.05
"""The adjusted p-value below which a paired test counts as a difference."""
TIME_METRICS = ("latency_ms", "train_s")
METHOD_TEXT = {
    "kneedle": "Kneedle (2-D knee)",
    "utopia": "nearest to utopia",
    "topsis": "TOPSIS",
}
PLOT_TITLES = {
    "pareto": "The study's objectives: Pareto front and knee picks",
    "image_vs_pixel": "Image- vs pixel-level performance (Fig. 14)",
    "robustness": "Robustness: each variant against clean (Fig. 12)",
    "examples": "Example test images, each chosen model's anomaly map, ground truth (Fig. 11)",
    "timing": "Inference time and throughput per configuration, best on top (Fig. 10)",
}
"""Captions of ``sweep.read.plots.report_plots``'s plots; ``pareto_<m>`` and ``vs_<key>`` below."""


# --------------------------------------------------------------------------- inputs


def metric_mode(metric: str, objectives: Sequence[tuple[str, str]] = ()) -> str:
    """Which way ``metric`` is better: the objective's mode, else the metric's natural one."""
    mode = dict(objectives).get(metric) or METRICS.get(metric)
    if mode:
        return mode
    return "min" if metric.endswith(("_ms", "_s", "_mb")) else "max"


def study_objectives(results_dir: Path, objectives: list[str] | None) -> list[tuple[str, str]]:
    """``--objective metric[:max|min]`` options, else the saved study's, else AUROC vs latency."""
    if objectives:
        parsed = []
        for text in objectives:
            metric, _, mode = text.partition(":")
            try:
                objective = Objective(metric=metric, mode=mode or None)
            except ValueError as exc:
                raise SweepError(f"--objective {text!r}: {exc.errors()[0]['msg']}") from None  # type: ignore[attr-defined]
            parsed.append((objective.metric, objective.direction))
        return parsed
    # The run validated the whole study before saving it: only its objectives are read here
    # (reading results never needs the detector registries a full validation loads).
    try:
        saved = _study_settings(results_dir)
        given = saved["settings"].get("objectives") if saved else None
        if given:
            return [(o.metric, o.direction) for o in map(Objective.model_validate, given)]
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return [("image_auroc", METRICS["image_auroc"]), ("latency_ms", METRICS["latency_ms"])]


def parse_weights(texts: Sequence[str] | None) -> dict[str, float]:
    """``--weights image_auroc=2,latency_ms=1`` (repeatable, comma-separated) as a dict.

    Names are checked against the objectives by ``sweep.read.analysis.select``; here only the form
    and positivity.
    """
    weights: dict[str, float] = {}
    for text in texts or []:
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or not name:
                raise SweepError(f"--weights {part!r}: expected METRIC=WEIGHT, e.g. image_auroc=2")
            try:
                weight = float(value)
            except ValueError:
                raise SweepError(f"--weights {part!r}: {value.strip()!r} is not a number") from None
            if not (math.isfinite(weight) and weight > 0):
                raise SweepError(f"--weights {part!r}: a weight must be a positive number")
            if name in weights:
                raise SweepError(f"--weights: {name!r} given twice")
            weights[name] = weight
    return weights


def _study_settings(results_dir: Path) -> dict[str, Any] | None:
    """The study copy the runner saves under the output (``_study.yaml``), raw and parsed."""
    copy = results_dir / "_study.yaml"
    if not copy.is_file():
        return None
    text = copy.read_text(encoding="utf-8")
    try:
        settings = yaml.safe_load(text)
    except yaml.YAMLError:
        settings = None
    if not isinstance(settings, dict):
        settings = {}
    return {
        "path": str(copy),
        "name": settings.get("name"),
        "description": settings.get("description"),
        "settings": settings,
        "yaml": text,
    }


# --------------------------------------------------------------------------- building


def build_report(
    results_dir: Path,
    objectives: list[tuple[str, str]],
    plots_dir: Path,
    weights: Mapping[str, float] | None = None,
    examples: str = "knee",
) -> dict:
    """Aggregate, select and plot; return the report as a JSON-able dict. ``examples`` picks
    the heatmap grid's models (``sweep.read.plots.parse_examples``: ``knee`` or
    ``top-bottom:4:image_auroc`` and the like).

    Keys: ``results``, ``study`` (the saved study, or None), ``trials``, ``ok``, ``errors``
    (rows whose status is not ok), ``objectives``, ``weights``, ``metrics``,
    ``configurations`` (seed-aggregated, clean data only when the study has variants),
    ``selection`` (``sweep.read.analysis.selection_to_dict``), ``robustness`` (when the study has
    augmentations or stresses), ``evaluation`` (the rows' distinct ``threshold_policy`` and
    ``val_source`` values, where the rows have them), ``paired_tests`` (each configuration
    against the best by the first objective: ``metric``, ``mode``, ``best`` (its index in
    ``configurations``), ``alpha``, ``rows`` of ``index``, ``n_pairs``, ``diff`` (its mean
    minus the best's over the paired seeds), ``t`` (None when infinite), ``p`` and ``p_adj``
    (Benjamini-Hochberg over the rows); None with one configuration), ``false_negatives``
    (per front or picked configuration with per-image results: ``index``,
    ``configuration``, ``trials`` and ``buckets``, the rows of
    ``sweep.read.stats.false_negatives_by_size``; None without them), ``drift`` (the drift
    sentinel, ``sweep.read.drift``, when the study ran test-time stresses and has per-image
    results: ``alpha``, ``limit_share``, ``flagged`` (per shift: configurations flagged and
    tested), ``trials_cannot_fire`` and ``rows`` of ``configuration``, ``stress`` and
    ``sweep.read.drift.drift_by_configuration``'s counts; None or absent otherwise),
    ``plots`` (name -> PNG path).
    """
    # matplotlib (about half a second) only where plots are drawn: `sweep compare` imports
    # this module for metric_mode.
    from sweep.read import plots

    all_rows = read_results(results_dir)
    if all_rows.empty:
        raise SweepError(f"results {str(results_dir)!r}: no trial rows found")
    df = all_rows
    errors = df[df["status"] != "ok"]
    metrics = list(dict.fromkeys([*REPORT_METRICS, *(m for m, _ in objectives)]))
    missing = [m for m in metrics if m not in df.columns]
    if missing:
        raise SweepError(
            f"results {str(results_dir)!r}: no column(s) {', '.join(map(repr, missing))}"
        )
    for metric, after in OPTIONAL_METRICS.items():
        if metric in metrics or after not in metrics or metric not in df.columns:
            continue
        if df.loc[df["status"] == "ok", metric].notna().any():
            metrics.insert(metrics.index(after) + 1, metric)
    variant_columns = [c for c in analysis.VARIANT_COLUMNS if c in df.columns]
    has_variants = bool(variant_columns) and bool(
        (df[variant_columns].fillna(analysis.CLEAN) != analysis.CLEAN).any(axis=None)
    )
    report: dict[str, Any] = {
        "results": str(results_dir),
        "generated_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "study": _study_settings(results_dir),
        "trials": len(df),
        "ok": int((df["status"] == "ok").sum()),
        "errors": [
            {
                "status": r.status,
                "model": r.model,
                "backbone": r.backbone,
                "seed": None if pd.isna(r.seed) else int(r.seed),
                "config_hash": r.config_hash,
                "error": r.error,
                "notes": getattr(r, "notes", None),
            }
            for r in errors.itertuples()
        ],
        "objectives": [{"metric": m, "mode": d} for m, d in objectives],
        "weights": dict(weights) if weights else None,
        "metrics": metrics,
        "evaluation": _evaluation(df),
        "plots": {},
    }
    if has_variants:
        deltas = analysis.variant_deltas(df, ROBUSTNESS_METRICS)
        report["robustness"] = json.loads(deltas.to_json(orient="records"))
        report["drift"] = _drift(results_dir, df)
        # Model selection compares detectors as they would run: trained and tested clean.
        clean = (df[variant_columns].fillna(analysis.CLEAN) == analysis.CLEAN).all(axis=1)
        df = df[clean]
    agg = analysis.aggregate_seeds(df, metrics) if not df.empty else pd.DataFrame()
    report["configurations"] = json.loads(agg.to_json(orient="records")) if len(agg) else []
    if agg.empty:
        report["selection"] = None
        return report
    selection = analysis.select(agg, objectives, weights=weights)
    report["selection"] = analysis.selection_to_dict(selection)
    rows = _config_rows(df, agg)
    report["paired_tests"] = _paired_tests(agg, rows, objectives[0])
    shown = [i for i, row in enumerate(report["selection"]["table"]) if row.get("on_front")]
    shown += [i for i in report["selection"]["picks"].values() if i is not None]
    report["false_negatives"] = _false_negatives(
        results_dir, report["configurations"], rows, sorted(set(shown))
    )
    written = plots.report_plots(
        all_rows, selection, objectives, plots_dir, results_dir=results_dir, examples=examples
    )
    report["plots"] = {name: str(path) for name, path in written.items()}
    return report


def _evaluation(df: pd.DataFrame) -> dict[str, list[str]]:
    """The distinct threshold policies and validation sources of the ok rows, by column."""
    ok = df[df["status"] == "ok"]
    return {
        column: sorted(map(str, ok[column].dropna().unique()))
        for column in EVALUATION_COLUMNS
        if column in ok.columns and ok[column].notna().any()
    }


def _plain(value: Any) -> Any:
    """A cell as a JSON-able grouping key: NaN and None alike, numpy scalars as Python ones."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _config_rows(df: pd.DataFrame, agg: pd.DataFrame) -> pd.DataFrame:
    """The ok rows with ``_config``: the position of their configuration in ``agg``."""
    ok = df[df["status"] == "ok"]
    by = [c for c in analysis.config_columns(ok) if c in agg.columns]

    def keys(frame: pd.DataFrame) -> list[str]:
        records = frame[by].to_dict(orient="records")
        return [json.dumps([_plain(r[c]) for c in by], default=str) for r in records]

    position = {key: i for i, key in enumerate(keys(agg))}
    return ok.assign(_config=[position.get(key, -1) for key in keys(ok)])


def _paired_tests(agg: pd.DataFrame, rows: pd.DataFrame, objective: tuple[str, str]) -> dict | None:
    """Each configuration against the best by ``objective``: a paired t-test over the seeds both
    ran, Benjamini-Hochberg adjusted over the family of those comparisons. None with fewer than
    two configurations or no best one."""
    metric, mode = objective
    means = agg[f"{metric}_mean"].astype(float)
    if len(agg) < 2 or means.isna().all():
        return None
    best = int(means.idxmax() if mode == "max" else means.idxmin())
    rows = rows[rows["seed"].notna()]
    values = pd.to_numeric(rows[metric], errors="coerce").astype(float)
    per_seed = values.groupby([rows["_config"], rows["seed"]]).mean()
    others = per_seed.drop(index=[best, -1], level=0, errors="ignore")
    top = per_seed.xs(best, level=0) if best in per_seed.index.get_level_values(0) else None
    against = pd.Series(
        np.nan if top is None else top.reindex(others.index.get_level_values(1)).to_numpy(),
        index=others.index,
        dtype=float,
    )
    tests = paired_t_tests(against, others)
    diffs = (others - against).groupby(level=0).mean()
    out = []
    for i in range(len(agg)):
        if i == best:
            continue
        tested = i in tests.index
        out.append(
            {
                "index": i,
                "n_pairs": int(tests.at[i, "n_pairs"]) if tested else 0,
                "diff": _finite(diffs.get(i)) if tested else None,
                "t": _finite(tests.at[i, "t"]) if tested else None,
                "p": _finite(tests.at[i, "p"]) if tested else None,
            }
        )
    adjusted = benjamini_hochberg([math.nan if r["p"] is None else r["p"] for r in out])
    for row, p_adj in zip(out, adjusted, strict=True):
        row["p_adj"] = _finite(p_adj)
    return {"metric": metric, "mode": mode, "best": best, "alpha": SIGNIFICANCE, "rows": out}


def _finite(value: Any) -> float | None:
    """A float for strict JSON: None for a missing, NaN or infinite value (the t of a constant
    difference, whose p of 0 says it all)."""
    if value is None or pd.isna(value) or not math.isfinite(value):
        return None
    return float(value)


def _false_negatives(
    results_dir: Path, configs: list[dict], rows: pd.DataFrame, shown: Sequence[int]
) -> list[dict] | None:
    """False negatives by defect-size tertile of the configurations ``shown`` (the front and
    the picks), each trial at its own ``image_threshold``, summed over seeds. None when no
    shown trial has per-image results and a threshold."""
    if "image_threshold" not in rows.columns:
        return None
    trials = rows.loc[rows["_config"].isin(shown), ["config_hash", "image_threshold", "_config"]]
    trials = trials[trials["image_threshold"].notna()]
    if trials.empty:
        return None
    images = read_images(results_dir, config_hashes=trials["config_hash"].tolist())
    if images.empty:
        return None
    images = images.merge(trials, on="config_hash")
    varying = _varying_columns(configs)
    out = []
    for i in shown:
        mine = images[images["_config"] == i]
        if mine.empty:
            continue
        table = false_negatives_by_size(mine, "image_threshold")
        out.append(
            {
                "index": i,
                "configuration": _config_name(configs[i], varying),
                "trials": int(mine["config_hash"].nunique()),
                "buckets": json.loads(table.to_json(orient="records")),
            }
        )
    return out or None


def _drift(results_dir: Path, df: pd.DataFrame) -> dict | None:
    """The drift sentinel per configuration and shift (the clean control first): each trial's
    normal test scores against its normal validation scores, seeds counted. None when no ok
    row ran a test-time stress or no such trial has per-image results."""
    ok = df[df["status"] == "ok"]
    if "stress" not in ok.columns:
        return None
    if not (ok["stress"].fillna(analysis.CLEAN) != analysis.CLEAN).any():
        return None
    images = read_images(results_dir, config_hashes=ok["config_hash"].tolist())
    if images.empty:
        return None
    trials = drift_by_trial(ok, images)
    if not (trials["stress"].fillna(analysis.CLEAN) != analysis.CLEAN).any():
        return None
    table = drift_by_configuration(trials)
    if table.empty:
        return None
    # 15 digits: the default 10 decimals leave a small p-value with 4 significant ones.
    records = json.loads(table.to_json(orient="records", double_precision=15))
    varying = _varying_columns(records)
    # Fixed configuration columns (augmentation, category, ...) that differ name themselves too.
    named = ("model", "backbone", "image_size", "stress")
    differing = [
        c
        for c in analysis.CONFIG_COLUMNS
        if c not in named
        and c not in varying
        and c in table.columns
        and table[c].nunique(dropna=False) > 1
    ]
    flagged: dict[str, list[int]] = {}
    rows = []
    for record in records:
        name = _config_name(record, varying)
        name += "".join(f" {c}={_cell(record.get(c))}" for c in differing)
        counts = flagged.setdefault(record["stress"], [0, 0])
        counts[0] += bool(record["drift"])
        counts[1] += 1
        rows.append(
            {
                "configuration": name,
                **{
                    k: record[k]
                    for k in (
                        "stress",
                        "trials",
                        "trials_drift",
                        "trials_can_fire",
                        "ks_p_median",
                        "share_beyond_median",
                        "expected_share_median",
                        "drift",
                    )
                },
            }
        )
    tested = trials[trials["drift"].notna()]
    return {
        "alpha": DRIFT_ALPHA,
        "limit_share": LIMIT_SHARE,
        "flagged": flagged,
        "trials_cannot_fire": int((~(tested["min_p"] < DRIFT_ALPHA / 2)).sum()),
        "rows": rows,
    }


# --------------------------------------------------------------------------- shared pieces


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _digits(metric: str) -> int:
    return 1 if metric in TIME_METRICS else 3


def _fmt(mean: Any, std: Any, digits: int = 3) -> str:
    if _missing(mean):
        return "-"
    if _missing(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _cell(value: Any) -> str:
    if _missing(value):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


SWEPT_TRIAL_COLUMNS = ("epochs", "test_fraction", "labelled_defects")
"""Configuration columns besides ``hp.*`` that a study may vary within one model (label_budget's
``labelled_defects``): named in a configuration's label when they do."""


def _varying_columns(configs: list[dict]) -> list[str]:
    """Trial columns (:data:`SWEPT_TRIAL_COLUMNS`) and hyperparameter columns whose value differs
    between the configurations of a model: what tells two rows of the same model, backbone and
    size apart."""
    varying = []
    present = {k for c in configs for k in c}
    columns = [c for c in SWEPT_TRIAL_COLUMNS if c in present]
    columns += sorted(k for k in present if k.startswith("hp.") and k != "hp.seed")
    for column in columns:
        by_model: dict[Any, set] = {}
        for config in configs:
            value = config.get(column)
            if value is not None:
                by_model.setdefault(config.get("model"), set()).add(json.dumps(value))
        if any(len(values) > 1 for values in by_model.values()):
            varying.append(column)
    return varying


def _config_name(config: Mapping[str, Any], varying: Sequence[str] = ()) -> str:
    """``model/backbone 128px k=v``: a configuration in a few words."""
    name = str(config.get("model"))
    if config.get("backbone"):
        name += f"/{config['backbone']}"
    if config.get("image_size"):
        name += f" {config['image_size']}px"
    extra = [
        f"{c.removeprefix('hp.')}={_cell(config.get(c))}"
        for c in varying
        if not _missing(config.get(c))
    ]
    return " ".join([name, *extra])


def _best_values(report: dict) -> dict[str, float]:
    """The best mean of each metric over the configurations, by its mode."""
    objectives = [(o["metric"], o["mode"]) for o in report["objectives"]]
    best = {}
    for metric in report.get("metrics", REPORT_METRICS):
        values = [
            c[f"{metric}_mean"]
            for c in report["configurations"]
            if not _missing(c.get(f"{metric}_mean"))
        ]
        if values:
            best[metric] = max(values) if metric_mode(metric, objectives) == "max" else min(values)
    return best


def _selection_rows(report: dict) -> tuple[list[bool], dict[int, list[str]]]:
    """Per configuration: on the front?, and the methods that picked it."""
    selection = report.get("selection") or {}
    table = selection.get("table", [])
    front = [bool(row.get("on_front")) for row in table]
    picked: dict[int, list[str]] = {}
    for method, index in selection.get("picks", {}).items():
        if index is not None:
            picked.setdefault(index, []).append(method)
    return front, picked


def _stability_text(report: dict, method: str) -> str:
    """Does the method's pick change within one seed-std? In words, for the tables."""
    selection = report.get("selection") or {}
    stability = selection.get("stability") or {}
    if method not in stability:
        picked = selection.get("picks", {}).get(method) is not None
        return "not tested (one seed per configuration)" if picked else ""
    changed = stability[method]
    if not changed:
        return "holds"
    configs = report["configurations"]
    varying = _varying_columns(configs)
    moves = []
    for metric, row in changed.items():
        if row is None:
            target = "no knee" if method == "kneedle" else "no pick"
        else:
            target = _config_name(configs[row], varying)
        moves.append(f"{metric} worse by one std → {target}")
    return "changes: " + "; ".join(moves)


def _pick_rows(report: dict) -> list[dict[str, Any]]:
    """Each method's pick side by side: one dict per method."""
    selection = report.get("selection") or {}
    configs = report["configurations"]
    varying = _varying_columns(configs)
    rows = []
    for method, index in selection.get("picks", {}).items():
        config = configs[index] if index is not None else None
        table = selection.get("table", [])
        rows.append(
            {
                "method": method,
                "label": METHOD_TEXT.get(method, method),
                "chosen": selection.get("chosen") == method,
                "index": index,
                "configuration": _config_name(config, varying) if config else None,
                "config": config,
                "closeness": table[index].get("topsis_closeness") if config else None,
                "stability": _stability_text(report, method),
            }
        )
    return rows


# --------------------------------------------------------------------------- terminal


def print_report(report: dict, objectives: list[tuple[str, str]], console: Console) -> None:
    """The report as rich tables: configurations, knee picks, notes, robustness, errors."""
    configs = report["configurations"]
    metrics = report.get("metrics") or list(
        dict.fromkeys([*REPORT_METRICS, *(m for m, _ in objectives)])
    )
    front, picked = _selection_rows(report)
    doc = _Doc(report)
    if doc.evaluation_text():
        console.print(escape(doc.evaluation_text().capitalize()))
    table = Table(
        title=f"{escape(report['results'])}: {report['ok']}/{report['trials']} trials ok "
        "(mean ± std over seeds)"
    )
    varying = _varying_columns(configs)
    for column in ("model", "backbone", "size", *varying, "seeds", *metrics, "front"):
        table.add_column(
            column.removeprefix("hp."),
            justify="right" if column not in ("model", "backbone") else "left",
        )
    best = _best_values(report)
    for i, config in enumerate(configs):
        cells = []
        for metric in metrics:
            text = _fmt(config.get(f"{metric}_mean"), config.get(f"{metric}_std"), _digits(metric))
            if best.get(metric) is not None and config.get(f"{metric}_mean") == best[metric]:
                text = f"[bold]{text}[/bold]"
            cells.append(text)
        marks = picked.get(i, [])
        on_front = i < len(front) and front[i]
        flag = "◆ knee" if marks else ("•" if on_front else "")
        table.add_row(
            escape(str(config.get("model"))),
            escape(str(config.get("backbone") or "-")),
            str(config.get("image_size") or "-"),
            *(escape(_cell(config.get(c))) for c in varying),
            str(config.get("n_seeds")),
            *cells,
            flag,
        )
    console.print(table)
    selection = report.get("selection")
    if selection:
        names = " vs ".join(f"{m} ({d})" for m, d in objectives)
        console.print(f"Pareto front over {names}: {sum(front)} configuration(s)")
        if report.get("weights"):
            shown = ", ".join(f"{m}={w:g}" for m, w in report["weights"].items())
            console.print(f"TOPSIS weights: {shown}")
        picks = Table(title="Knee picks, side by side (mean ± std over seeds)")
        for column in ("method", "configuration", *(m for m, _ in objectives)):
            picks.add_column(column, justify="left" if column != "seeds" else "right")
        picks.add_column("TOPSIS closeness", justify="right")
        picks.add_column("within one seed-std")
        for row in _pick_rows(report):
            config = row["config"] or {}
            picks.add_row(
                row["method"] + (" (chosen)" if row["chosen"] else ""),
                escape(row["configuration"] or "no pick"),
                *(
                    _fmt(config.get(f"{m}_mean"), config.get(f"{m}_std"), _digits(m))
                    for m, _ in objectives
                ),
                _cell(row["closeness"]),
                escape(row["stability"]),
            )
        console.print(picks)
        for note in selection.get("notes", []):
            console.print(f"  [dim]{escape(note)}[/dim]")
    if report.get("paired_tests") and not doc.paired_ran():
        console.print(PAIRED_NOT_RUN)
    elif report.get("paired_tests"):
        tests = Table(title=escape(doc.paired_title()))
        for i, column in enumerate(doc.paired_header()):
            tests.add_column(column, justify="left" if i in (0, 5) else "right")
        for differs, cells in doc.paired_rows():
            tests.add_row(*(escape(c) for c in cells), style="bold" if differs else None)
        console.print(tests)
    if report.get("false_negatives"):
        fn = Table(title=FN_TITLE)
        for i, column in enumerate(doc.fn_header()):
            fn.add_column(column, justify="left" if i == 0 else "right")
        for cells in doc.fn_rows():
            fn.add_row(*(escape(c) for c in cells))
        console.print(fn)
    if report.get("robustness"):
        print_robustness(report["robustness"], console)
    if report.get("drift"):
        drift = Table(title=escape(doc.drift_title()))
        for i, column in enumerate(doc.drift_header()):
            drift.add_column(column, justify="left" if i in (0, 1, 7) else "right")
        for flagged, cells in doc.drift_rows():
            drift.add_row(*(escape(c) for c in cells), style="bold red" if flagged else None)
        console.print(drift)
        console.print(escape(doc.drift_summary()))
    for error in report["errors"]:
        what = error["error"] or error.get("notes") or ""
        console.print(
            f"[red]{error['status']} row[/red] {escape(str(error['model']))}/"
            f"{escape(str(error['backbone'] or '-'))} seed={error['seed']}: {escape(str(what))}"
        )
    for name, path in report["plots"].items():
        console.print(f"{name} plot: {escape(str(path))}")


def _variant_columns(rows: list[dict]) -> list[str]:
    return [c for c in ("augmentation", "stress") if any(r.get(c) != "none" for r in rows)]


def print_robustness(rows: list[dict], console: Console) -> None:
    """Table C.9's shape: per detector and variant, mean ± std and the change from clean."""
    table = Table(
        title="Robustness: each augmentation set / stress vs the same configuration clean "
        "(mean ± std over seeds, Δ = change of the mean)"
    )
    variants = _variant_columns(rows)
    varying = _varying_columns(rows)
    for column in ("model", "backbone", "size", *varying, *variants, "seeds", *ROBUSTNESS_METRICS):
        table.add_column(
            column.removeprefix("hp."),
            justify="left" if column in ("model", "backbone") else "right",
        )
    for row in rows:
        cells = []
        for metric in ROBUSTNESS_METRICS:
            text = _fmt(row.get(f"{metric}_mean"), row.get(f"{metric}_std"))
            delta = row.get(f"{metric}_delta")
            if not _missing(delta):
                colour = "green" if delta > 0 else "red" if delta < 0 else "dim"
                text += f" [{colour}]Δ {delta:+.3f}[/{colour}]"
            cells.append(text)
        table.add_row(
            escape(str(row.get("model"))),
            escape(str(row.get("backbone") or "-")),
            str(row.get("image_size") or "-"),
            *(escape(_cell(row.get(c))) for c in varying),
            *(escape(str(row.get(c))) for c in variants),
            str(row.get("n_seeds")),
            *cells,
        )
    console.print(table)


# --------------------------------------------------------------------------- documents


class _Doc:
    """What HTML and Markdown renderings share: the report's sections as cells and rows."""

    def __init__(self, report: dict):
        self.report = report
        self.objectives = [(o["metric"], o["mode"]) for o in report["objectives"]]
        self.metrics = report.get("metrics") or list(REPORT_METRICS)
        self.configs = report["configurations"]
        self.varying = _varying_columns(self.configs)
        self.best = _best_values(report)
        self.front, self.picked = _selection_rows(report)
        study = report.get("study") or {}
        self.title = f"Study {study.get('name') or Path(report['results']).name}"

    def arrow(self, metric: str) -> str:
        return "↓" if metric_mode(metric, self.objectives) == "min" else "↑"

    def config_header(self) -> list[str]:
        return [
            "model",
            "backbone",
            "size",
            *(c.removeprefix("hp.") for c in self.varying),
            "seeds",
            *(f"{m} {self.arrow(m)}" for m in self.metrics),
            "front / knee",
        ]

    def config_rows(self, bold: Callable[[str], str]) -> list[list[str]]:
        rows = []
        for i, config in enumerate(self.configs):
            cells = []
            for metric in self.metrics:
                text = _fmt(
                    config.get(f"{metric}_mean"), config.get(f"{metric}_std"), _digits(metric)
                )
                mean = config.get(f"{metric}_mean")
                if self.best.get(metric) is not None and mean == self.best[metric]:
                    text = bold(text)
                cells.append(text)
            marks = self.picked.get(i, [])
            on_front = i < len(self.front) and self.front[i]
            flag = ("knee: " + ", ".join(marks)) if marks else ("front" if on_front else "")
            rows.append(
                [
                    str(config.get("model")),
                    str(config.get("backbone") or "-"),
                    str(config.get("image_size") or "-"),
                    *(_cell(config.get(c)) for c in self.varying),
                    str(config.get("n_seeds")),
                    *cells,
                    flag,
                ]
            )
        return rows

    def pick_header(self) -> list[str]:
        return [
            "method",
            "pick",
            *(f"{m} {self.arrow(m)}" for m, _ in self.objectives),
            "TOPSIS closeness",
            "within one seed-std",
        ]

    def pick_rows(self) -> list[tuple[bool, list[str]]]:
        rows = []
        for row in _pick_rows(self.report):
            config = row["config"] or {}
            rows.append(
                (
                    row["chosen"],
                    [
                        row["label"] + (" (chosen)" if row["chosen"] else ""),
                        row["configuration"] or "no pick",
                        *(
                            _fmt(config.get(f"{m}_mean"), config.get(f"{m}_std"), _digits(m))
                            for m, _ in self.objectives
                        ),
                        _cell(row["closeness"]),
                        row["stability"],
                    ],
                )
            )
        return rows

    def recommendation(self) -> str | None:
        selection = self.report.get("selection") or {}
        chosen = selection.get("chosen")
        index = (selection.get("picks") or {}).get(chosen) if chosen else None
        if index is None:
            return None
        config = self.configs[index]
        values = ", ".join(
            f"{m} {_fmt(config.get(f'{m}_mean'), config.get(f'{m}_std'), _digits(m))}"
            for m, _ in self.objectives
        )
        stability = _stability_text(self.report, chosen)
        if stability == "holds":
            tail = " The pick holds when any one objective moves one seed-std against it."
        elif stability.startswith("changes"):
            tail = (
                " Within one seed-std the pick "
                + stability.replace("changes: ", "changes (", 1)
                + ")."
            )
        else:
            tail = f" Stability {stability}." if stability else ""
        if chosen == "utopia" and any(n.startswith("utopia: ") for n in selection.get("notes", [])):
            tail += " Other front points are as near the utopia point (a tie; see the notes)."
        return (
            f"{_config_name(config, self.varying)}, by {METHOD_TEXT.get(chosen, chosen)}: "
            f"{values}.{tail}"
        )

    def evaluation_text(self) -> str:
        """How thresholds were chosen, from the rows: ``threshold policy: f1_max; ...``."""
        names = {
            "threshold_policy": "threshold policy",
            "val_source": "validation images",
            "aspect_change": "aspect ratio",
            "roi": "region of interest",
        }
        evaluation = self.report.get("evaluation") or {}
        return "; ".join(
            f"{names.get(column, column)}: {', '.join(values)}"
            for column, values in evaluation.items()
        )

    def paired_title(self) -> str:
        tests = self.report.get("paired_tests") or {}
        best = self.configs[tests["best"]]
        return (
            f"Paired tests: each configuration against the best by {tests['metric']} "
            f"({_config_name(best, self.varying)}), paired t-test over the seeds both ran, "
            f"Benjamini-Hochberg adjusted over the {len(tests['rows'])} comparison(s)"
        )

    def paired_ran(self) -> bool:
        tests = self.report.get("paired_tests") or {}
        return any(row.get("p_adj") is not None for row in tests.get("rows", []))

    def paired_header(self) -> list[str]:
        metric = (self.report.get("paired_tests") or {}).get("metric", "")
        return ["configuration", "seeds paired", f"Δ {metric} vs best", "p", "p adj", "verdict"]

    def paired_rows(self) -> list[tuple[bool, list[str]]]:
        """(differs at the significance level?, cells) per tested configuration."""
        tests = self.report.get("paired_tests") or {}
        digits = _digits(tests.get("metric", ""))
        out = []
        for row in tests.get("rows", []):
            p_adj = row.get("p_adj")
            differs = p_adj is not None and p_adj < tests["alpha"]
            if p_adj is None:
                verdict = "n<2 (no test)"
            elif differs:
                verdict = f"differs (p adj < {tests['alpha']:g})"
            else:
                verdict = "no evidence of a difference"
            diff = row.get("diff")
            out.append(
                (
                    differs,
                    [
                        _config_name(self.configs[row["index"]], self.varying),
                        str(row["n_pairs"]),
                        "-" if diff is None else f"{diff:+.{digits}f}",
                        _p_text(row.get("p")),
                        _p_text(p_adj),
                        verdict,
                    ],
                )
            )
        return out

    def fn_header(self) -> list[str]:
        return ["configuration", "trials", *self._fn_buckets()]

    def _fn_buckets(self) -> list[str]:
        present = {
            b["bucket"] for c in self.report.get("false_negatives") or [] for b in c["buckets"]
        }
        return [b for b in FN_BUCKET_ORDER if b in present]

    def fn_rows(self) -> list[list[str]]:
        """Per shown configuration: ``FN/n (rate) · size range`` per size bucket."""
        buckets = self._fn_buckets()
        out = []
        for config in self.report.get("false_negatives") or []:
            cells = dict.fromkeys(buckets, "-")
            for b in config["buckets"]:
                text = f"{b['n_false_negatives']}/{b['n_anomalous']}"
                if not _missing(b.get("fn_rate")):
                    text += f" ({b['fn_rate']:.0%})"
                if b.get("min_pixels") is not None:
                    text += f" · {b['min_pixels']}–{b['max_pixels']} px"
                cells[b["bucket"]] = text
            out.append([config["configuration"], str(config["trials"]), *cells.values()])
        return out

    def robustness_header(self) -> list[str]:
        rows = self.report.get("robustness") or []
        return [
            "model",
            "backbone",
            "size",
            *(c.removeprefix("hp.") for c in _varying_columns(rows)),
            *_variant_columns(rows),
            "seeds",
            *(f"{m} ↑" for m in ROBUSTNESS_METRICS),
        ]

    def robustness_rows(self) -> list[list[tuple[str, float | None]]]:
        """Cells as (text, delta) pairs: the delta colours a metric cell, None elsewhere."""
        rows = self.report.get("robustness") or []
        variants = _variant_columns(rows)
        varying = _varying_columns(rows)
        out = []
        for row in rows:
            cells: list[tuple[str, float | None]] = [
                (str(row.get("model")), None),
                (str(row.get("backbone") or "-"), None),
                (str(row.get("image_size") or "-"), None),
                *((_cell(row.get(c)), None) for c in varying),
                *((str(row.get(c)), None) for c in variants),
                (str(row.get("n_seeds")), None),
            ]
            for metric in ROBUSTNESS_METRICS:
                text = _fmt(row.get(f"{metric}_mean"), row.get(f"{metric}_std"))
                delta = row.get(f"{metric}_delta")
                if not _missing(delta):
                    text += f" (Δ {delta:+.3f})"
                cells.append((text, None if _missing(delta) else float(delta)))
            out.append(cells)
        return out

    def drift_title(self) -> str:
        drift = self.report.get("drift") or {}
        percentile = 100 * (1 - drift["limit_share"])
        return (
            "Drift sentinel: each trial's normal test scores (under the shift; none is the "
            "control) against its normal validation scores. A seed flags drift when the "
            "two-sided KS test or the control limit (the validation normals' "
            f"{percentile:g}th percentile, their largest score when there are too few) gives "
            f"p < {drift['alpha'] / 2:g}; a configuration drifts when more than half its seeds "
            "flag it"
        )

    def drift_summary(self) -> str:
        """Which shifts the sentinel flags, in configurations, and when it could not fire."""
        drift = self.report.get("drift") or {}
        parts = [
            f"{'none (control)' if shift == analysis.CLEAN else shift} {hit}/{total}"
            for shift, (hit, total) in drift.get("flagged", {}).items()
        ]
        text = "Configurations flagged, per shift: " + ", ".join(parts) + "."
        if drift.get("trials_cannot_fire"):
            text += (
                f" {drift['trials_cannot_fire']} trial(s) have too few normal images for "
                f"either rule to reach p < {drift['alpha'] / 2:g}: their no-drift verdict "
                "says nothing."
            )
        return text

    def drift_header(self) -> list[str]:
        return [
            "configuration",
            "shift",
            "seeds",
            "seeds flagging",
            "median KS p",
            "beyond limit (median)",
            "expected",
            "verdict",
        ]

    def drift_rows(self) -> list[tuple[bool, list[str]]]:
        """(drift?, cells) per configuration and shift."""
        out = []
        for row in (self.report.get("drift") or {}).get("rows", []):
            if row["drift"]:
                verdict = "drift"
            elif not row["trials_can_fire"]:
                verdict = "cannot fire (too few normal images)"
            else:
                verdict = "no drift"
            share, expected = row.get("share_beyond_median"), row.get("expected_share_median")
            out.append(
                (
                    bool(row["drift"]),
                    [
                        row["configuration"],
                        "none (control)" if row["stress"] == analysis.CLEAN else row["stress"],
                        str(row["trials"]),
                        str(row["trials_drift"]),
                        _p_text(row.get("ks_p_median")),
                        "-" if _missing(share) else f"{share:.1%}",
                        "-" if _missing(expected) else f"{expected:.1%}",
                        verdict,
                    ],
                )
            )
        return out

    def error_rows(self) -> list[list[str]]:
        return [
            [
                str(e["status"]),
                str(e["model"]),
                str(e["backbone"] or "-"),
                "-" if e["seed"] is None else str(e["seed"]),
                str(e["error"] or e.get("notes") or ""),
            ]
            for e in self.report["errors"]
        ]

    def settings_rows(self) -> list[tuple[str, str]]:
        """The saved study's top-level keys, each value as compact JSON."""
        study = self.report.get("study") or {}
        rows = []
        for key, value in (study.get("settings") or {}).items():
            if key in ("name", "description"):
                continue
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            rows.append((str(key), text))
        return rows

    def summary(self) -> str:
        report = self.report
        names = " vs ".join(f"{m} ({d})" for m, d in self.objectives)
        text = (
            f"{report['ok']} of {report['trials']} trials ok, {len(self.configs)} "
            f"configuration(s) (mean ± std over seeds), objectives: {names}."
        )
        if report.get("weights"):
            text += " TOPSIS weights: " + ", ".join(
                f"{m}={w:g}" for m, w in report["weights"].items()
            )
        if self.evaluation_text():
            text += f" {self.evaluation_text().capitalize()}."
        return text


CSS = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1f2328;
       margin: 0; background: #eef0f3; }
main { max-width: 1240px; margin: 0 auto; padding: 20px 32px 40px; background: #fff; }
h1 { font-size: 24px; margin: 4px 0 2px; }
h2 { font-size: 18px; margin: 30px 0 8px; padding-bottom: 4px; border-bottom: 2px solid #d0d7de; }
p.meta { color: #57606a; margin: 0 0 12px; }
.callout { background: #eaf3ff; border-left: 5px solid #1f77b4; padding: 10px 14px;
           margin: 12px 0; font-size: 15px; }
.wrap { overflow-x: auto; }
table { border-collapse: collapse; font-size: 12.5px; margin: 6px 0 10px; }
th, td { border: 1px solid #d0d7de; padding: 4px 6px; text-align: right; white-space: nowrap; }
th { background: #f0f3f6; font-weight: 600; }
td.l, th.l { text-align: left; }
td.note, th.note { text-align: left; white-space: normal; min-width: 150px; }
td.wrap-text { white-space: pre-wrap; text-align: left; max-width: 640px;
               font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 11.5px; }
tbody tr:nth-child(even) td { background: #f8f9fb; }
tr.front td:first-child { box-shadow: inset 4px 0 0 #1f77b4; }
tr.knee td { background: #fff6dd !important; }
tr.chosen td { background: #e6f4ea !important; font-weight: 600; }
td.pos { color: #1a7f37; } td.neg { color: #cf222e; }
ul.notes { color: #57606a; font-size: 13px; margin: 4px 0 0; padding-left: 20px; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 18px; }
figure { margin: 0; border: 1px solid #d0d7de; border-radius: 6px; padding: 8px; background: #fff; }
figure img { width: 100%; height: auto; display: block; }
figure.wide { grid-column: 1 / -1; }
figcaption { font-size: 13px; color: #57606a; margin-top: 6px; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; padding: 10px; overflow: auto;
      font-size: 12px; }
details summary { cursor: pointer; color: #0969da; margin: 6px 0; }
.legend { font-size: 12.5px; color: #57606a; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    left: int = 2,
    row_classes: Sequence[str] | None = None,
    raw: bool = False,
    table_id: str = "",
    note_last: bool = False,
) -> str:
    """A table; the first ``left`` columns align left, and the last one is wrapped text when
    ``note_last``. ``raw``: the cells are already HTML."""

    def cls(i: int) -> str:
        if note_last and i == len(header) - 1:
            return ' class="note"'
        return ' class="l"' if i < left else ""

    ths = "".join(f"<th{cls(i)}>{_e(h)}</th>" for i, h in enumerate(header))
    body = []
    for r, row in enumerate(rows):
        row_cls = f' class="{row_classes[r]}"' if row_classes and row_classes[r] else ""
        tds = "".join(f"<td{cls(i)}>{c if raw else _e(c)}</td>" for i, c in enumerate(row))
        body.append(f"<tr{row_cls}>{tds}</tr>")
    ident = f' id="{table_id}"' if table_id else ""
    return (
        f'<div class="wrap"><table{ident}><thead><tr>{ths}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _png_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG's header, or None when it is not a PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _plot_caption(name: str) -> str:
    if name in PLOT_TITLES:
        return PLOT_TITLES[name]
    if name.startswith("pareto_"):
        return f"Inference time vs {name.removeprefix('pareto_')}: front and knee picks (Fig. 13)"
    if name.startswith("vs_"):
        return f"Metrics vs {name.removeprefix('vs_')} (mean ± std over seeds)"
    return name.replace("_", " ")


def _figure_html(name: str, path: Path) -> str:
    """One plot as a figure, the PNG inlined as a base64 data URI; wide plots span the row."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SweepError(f"plot {str(path)!r}: cannot read it ({exc})") from None
    size = _png_size(data)
    wide = size is not None and size[0] > 1.7 * size[1]
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    caption = _e(_plot_caption(name))
    wide_class = ' class="wide"' if wide else ""
    return (
        f'<figure id="plot-{_e(name)}"{wide_class}>'
        f'<img alt="{caption}" src="{uri}"><figcaption>{caption} '
        f"(<code>{_e(Path(path).name)}</code>)</figcaption></figure>"
    )


def render_html(report: dict) -> str:
    """One self-contained HTML page: inline CSS, plots as base64 data URIs, no scripts."""
    doc = _Doc(report)
    study = report.get("study") or {}
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(doc.title)} · anomaly-sweep report</title>",
        f"<style>{CSS}</style></head><body><main>",
        f"<h1>{_e(doc.title)}</h1>",
        f'<p class="meta">{_e(study.get("description") or "")}'
        f"{'<br>' if study.get('description') else ''}results <code>{_e(report['results'])}"
        f"</code> · generated {_e(report.get('generated_at', ''))}</p>",
        f"<p>{_e(doc.summary())}</p>",
    ]
    recommendation = doc.recommendation()
    if recommendation:
        parts.append(f'<div class="callout"><b>Pick:</b> {_e(recommendation)}</div>')

    selection = report.get("selection")
    if selection:
        parts.append('<h2 id="picks">Knee picks, side by side</h2>')
        pick_rows = doc.pick_rows()
        parts.append(
            _html_table(
                doc.pick_header(),
                [cells for _, cells in pick_rows],
                row_classes=["chosen" if chosen else "" for chosen, _ in pick_rows],
                table_id="knee-picks",
                note_last=True,
            )
        )
        notes = "".join(f"<li>{_e(n)}</li>" for n in _document_notes(selection))
        if notes:
            parts.append(f'<ul class="notes">{notes}</ul>')

    parts.append('<h2 id="configurations">Configurations (mean ± std over seeds)</h2>')
    if doc.configs:
        rows = doc.config_rows(lambda text: f"<b>{_e(text)}</b>")
        escaped = [[cell if cell.startswith("<b>") else _e(cell) for cell in row] for row in rows]
        classes = [
            " ".join(
                c
                for c, on in (
                    ("front", i < len(doc.front) and doc.front[i]),
                    ("knee", i in doc.picked),
                )
                if on
            )
            for i in range(len(rows))
        ]
        parts.append(
            _html_table(
                doc.config_header(),
                escaped,
                row_classes=classes,
                raw=True,
                table_id="configurations-table",
                note_last=True,
            )
        )
        parts.append(
            '<p class="legend">Bold: the best mean of each column (↑ higher is better, '
            "↓ lower). Rows with a blue edge are on the Pareto front; highlighted rows are "
            "knee picks.</p>"
        )
    else:
        parts.append("<p>No configuration has an ok row.</p>")

    if report.get("paired_tests") and not doc.paired_ran():
        parts.append(f"<p>{_e(PAIRED_NOT_RUN)}</p>")
    elif report.get("paired_tests"):
        parts.append('<h2 id="paired-tests">Paired tests</h2>')
        parts.append(f"<p>{_e(doc.paired_title())}.</p>")
        paired = doc.paired_rows()
        parts.append(
            _html_table(
                doc.paired_header(),
                [cells for _, cells in paired],
                left=1,
                table_id="paired-tests-table",
                note_last=True,
            )
        )
    if report.get("false_negatives"):
        parts.append('<h2 id="false-negatives">False negatives by defect size</h2>')
        parts.append(f"<p>{_e(FN_TITLE)}.</p>")
        parts.append(
            _html_table(doc.fn_header(), doc.fn_rows(), left=1, table_id="false-negatives-table")
        )

    if report.get("robustness"):
        parts.append(
            '<h2 id="robustness">Robustness: each variant against the same configuration clean</h2>'
        )
        rows_html = []
        for row in doc.robustness_rows():
            cells = []
            for text, delta in row:
                cls = (
                    "" if delta is None else (" pos" if delta > 0 else " neg" if delta < 0 else "")
                )
                cells.append((text, cls))
            rows_html.append(cells)
        header = doc.robustness_header()
        ths = "".join(
            f'<th class="l">{_e(h)}</th>' if i < 2 else f"<th>{_e(h)}</th>"
            for i, h in enumerate(header)
        )
        body = "".join(
            "<tr>"
            + "".join(
                f'<td class="{"l" if i < 2 else ""}{cls}">{_e(text)}</td>'
                for i, (text, cls) in enumerate(cells)
            )
            + "</tr>"
            for cells in rows_html
        )
        parts.append(
            f'<div class="wrap"><table id="robustness-table"><thead><tr>{ths}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>"
        )
        parts.append(
            "<p class=\"legend\">Δ: the variant's mean minus the clean configuration's "
            "(green: better, red: worse).</p>"
        )

    if report.get("drift"):
        parts.append('<h2 id="drift">Drift sentinel</h2>')
        parts.append(f"<p>{_e(doc.drift_title())}.</p>")
        drift_rows = doc.drift_rows()
        parts.append(
            _html_table(
                doc.drift_header(),
                [cells for _, cells in drift_rows],
                row_classes=["knee" if flagged else "" for flagged, _ in drift_rows],
                table_id="drift-table",
                note_last=True,
            )
        )
        parts.append(f'<p class="legend">{_e(doc.drift_summary())}</p>')

    if report["plots"]:
        parts.append('<h2 id="plots">Plots</h2><div class="plots">')
        for name, path in report["plots"].items():
            parts.append(_figure_html(name, Path(path)))
        parts.append("</div>")

    parts.append(f'<h2 id="errors">Rows that are not ok ({len(report["errors"])})</h2>')
    if report["errors"]:
        error_rows = doc.error_rows()
        body = "".join(
            "<tr>"
            + "".join(f'<td class="l">{_e(c)}</td>' for c in row[:3])
            + f"<td>{_e(row[3])}</td>"
            + f'<td class="wrap-text">{_e(row[4])}</td></tr>'
            for row in error_rows
        )
        parts.append(
            '<div class="wrap"><table id="errors-table"><thead><tr><th class="l">status</th>'
            '<th class="l">model</th><th class="l">backbone</th><th>seed</th>'
            f'<th class="l">error</th></tr></thead><tbody>{body}</tbody></table></div>'
        )
    else:
        parts.append("<p>None: every trial finished.</p>")

    parts.append('<h2 id="settings">Study settings</h2>')
    if study:
        body = "".join(
            f'<tr><td class="l">{_e(k)}</td><td class="wrap-text">{_e(v)}</td></tr>'
            for k, v in doc.settings_rows()
        )
        parts.append(
            '<div class="wrap"><table id="settings-table"><thead><tr><th class="l">key</th>'
            f'<th class="l">value</th></tr></thead><tbody>{body}</tbody></table></div>'
        )
        parts.append(
            f"<details><summary>The study as run (<code>{_e(study.get('path', ''))}</code>)"
            f"</summary><pre>{_e(study.get('yaml', ''))}</pre></details>"
        )
    else:
        parts.append("<p>No saved study (<code>_study.yaml</code>) under the results.</p>")
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


def _p_text(p: Any) -> str:
    if _missing(p):
        return "-"
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.0e}"


PAIRED_NOT_RUN = "Paired tests: none ran (no two configurations share 2 or more seeds)."
FN_BUCKET_ORDER = ("small", "medium", "large", "all", "unknown size")
FN_TITLE = (
    "False negatives by defect size (the anomalous test images of the front and the picks, "
    "each trial at its own threshold, summed over seeds): missed/anomalous (rate) · defect "
    "pixels"
)


def _document_notes(selection: dict) -> list[str]:
    """The selection's notes less the per-method stability ones (the picks table shows them)."""
    tested = {f"uncertainty: the {method} pick " for method in selection.get("stability", {})}
    return [n for n in selection.get("notes", []) if not n.startswith(tuple(tested) or ("\0",))]


def _md_escape(text: Any) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 2, note_last: bool = False
) -> str:
    """A pipe table; the first ``left`` columns (and the last, for notes) align left."""
    last = len(header) - 1

    def align(i: int) -> str:
        return ":---" if i < left or (note_last and i == last) else "---:"

    lines = [
        "| " + " | ".join(_md_escape(h) for h in header) + " |",
        "|" + "|".join(align(i) for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: dict, markdown_path: Path) -> str:
    """The report as Markdown; plots are linked relative to ``markdown_path``'s folder."""
    doc = _Doc(report)
    study = report.get("study") or {}
    lines = [f"# {doc.title}", ""]
    if study.get("description"):
        lines += [_md_escape(study["description"]), ""]
    lines += [
        f"Results `{report['results']}`, generated {report.get('generated_at', '')}.",
        "",
        doc.summary(),
        "",
    ]
    recommendation = doc.recommendation()
    if recommendation:
        lines += [f"> **Pick:** {_md_escape(recommendation)}", ""]
    selection = report.get("selection")
    if selection:
        lines += ["## Knee picks, side by side", ""]
        rows = [
            [(f"**{_md_escape(c)}**" if chosen else _md_escape(c)) for c in cells]
            for chosen, cells in doc.pick_rows()
        ]
        lines += [_md_table(doc.pick_header(), rows, note_last=True), ""]
        lines += [f"- {_md_escape(n)}" for n in _document_notes(selection)] + [""]
    lines += ["## Configurations (mean ± std over seeds)", ""]
    if doc.configs:
        rows = [
            [c if c.startswith("**") else _md_escape(c) for c in row]
            for row in doc.config_rows(lambda text: f"**{_md_escape(text)}**")
        ]
        lines += [
            _md_table(doc.config_header(), rows, note_last=True),
            "",
            "Bold: the best mean of each column (↑ higher is better, ↓ lower).",
            "",
        ]
    else:
        lines += ["No configuration has an ok row.", ""]
    if report.get("paired_tests") and not doc.paired_ran():
        lines += [PAIRED_NOT_RUN, ""]
    elif report.get("paired_tests"):
        lines += ["## Paired tests", "", _md_escape(doc.paired_title()) + ".", ""]
        rows = [
            [*map(_md_escape, cells[:-1]), f"**{cells[-1]}**" if differs else cells[-1]]
            for differs, cells in doc.paired_rows()
        ]
        lines += [_md_table(doc.paired_header(), rows, left=1, note_last=True), ""]
    if report.get("false_negatives"):
        lines += ["## False negatives by defect size", "", _md_escape(FN_TITLE) + ".", ""]
        rows = [[_md_escape(c) for c in row] for row in doc.fn_rows()]
        lines += [_md_table(doc.fn_header(), rows, left=1), ""]
    if report.get("robustness"):
        lines += ["## Robustness: each variant against the same configuration clean", ""]
        rows = [[_md_escape(text) for text, _ in row] for row in doc.robustness_rows()]
        lines += [
            _md_table(doc.robustness_header(), rows),
            "",
            "Δ: the variant's mean minus the clean configuration's.",
            "",
        ]
    if report.get("drift"):
        lines += ["## Drift sentinel", "", _md_escape(doc.drift_title()) + ".", ""]
        rows = [
            [*map(_md_escape, cells[:-1]), f"**{cells[-1]}**" if flagged else cells[-1]]
            for flagged, cells in doc.drift_rows()
        ]
        lines += [_md_table(doc.drift_header(), rows, note_last=True), ""]
        lines += [_md_escape(doc.drift_summary()), ""]
    if report["plots"]:
        lines += ["## Plots", ""]
        base = Path(markdown_path).resolve().parent
        for name, path in report["plots"].items():
            link = Path(os.path.relpath(Path(path).resolve(), base)).as_posix()
            lines += [f"![{_md_escape(_plot_caption(name))}]({link})", ""]
    lines += [f"## Rows that are not ok ({len(report['errors'])})", ""]
    if report["errors"]:
        rows = [[_md_escape(c) for c in row] for row in doc.error_rows()]
        lines += [_md_table(["status", "model", "backbone", "seed", "error"], rows, left=3), ""]
    else:
        lines += ["None: every trial finished.", ""]
    lines += ["## Study settings", ""]
    if study:
        rows = [[_md_escape(k), f"`{_md_escape(v)}`"] for k, v in doc.settings_rows()]
        lines += [_md_table(["key", "value"], rows), ""]
        lines += ["```yaml", study.get("yaml", "").rstrip("\n"), "```", ""]
    else:
        lines += ["No saved study (`_study.yaml`) under the results.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- writing


def check_writable(path: Path, what: str) -> None:
    """Fail early (SweepError naming ``what`` and the path) where ``path`` cannot be written:
    it is a directory, or its nearest existing parent is not a writable directory."""
    path = Path(path)
    if path.is_dir():
        raise SweepError(f"{what} {str(path)!r}: cannot write it (it is a directory)")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SweepError(f"{what} {str(path)!r}: cannot write it ({str(parent)!r} is not a folder)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SweepError(
            f"{what} {str(path)!r}: cannot write it (no permission in {str(parent)!r})"
        )
