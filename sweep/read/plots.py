"""PNG plots of a study's results: the reference study's Figs. 10-14 and the ablations.

* :func:`tradeoff_plot` / :func:`pareto_plot`: inference time against an accuracy metric,
  Pareto front and knee picks marked, seed std as error bars (Fig. 13);
* :func:`image_vs_pixel_plot`: image-level against pixel-level performance (Fig. 14);
* :func:`robustness_plot`: each augmentation / stress against clean, per configuration (Fig. 12);
* :func:`param_plot`: metrics against any numeric hyperparameter a study varies (resolution,
  PatchCore's coreset ratio), with latency and memory-bank size in a panel of their own;
* :func:`timing_plot`: inference time and throughput per configuration as sorted bars (Fig. 10);
* :func:`examples_plot`: example test images, their ground truth and each chosen model's
  anomaly map (Fig. 11), from the maps trials save (:mod:`sweep.read.examples`); which models
  it shows is an :class:`ExamplesSpec` (:func:`parse_examples`: the knee picks, or the top and
  bottom N by a metric);
* :func:`report_plots`: every one of these that a study's rows have data for.

Figures are built with :class:`matplotlib.figure.Figure` on an Agg canvas rather than through
``pyplot``: nothing global (backend, current figure) changes, so plotting is safe in worker
processes, tests and notebooks alike, and no display is needed. Every file is written
atomically (a temporary file renamed into place).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import textwrap
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from matplotlib.transforms import Bbox

from sweep.errors import SweepError, did_you_mean
from sweep.read.analysis import (
    CLEAN,
    VARIANT_COLUMNS,
    Selection,
    aggregate_seeds,
    clean_mask,
    config_columns,
    pareto_mask,
    select,
    variant_deltas,
)
from sweep.read.examples import load_examples
from sweep.results import METRICS

__all__ = [
    "ExamplesSpec",
    "examples_plot",
    "image_vs_pixel_plot",
    "param_plot",
    "pareto_plot",
    "parse_examples",
    "ranked_choices",
    "report_plots",
    "robustness_plot",
    "swept_columns",
    "timing_bars",
    "timing_plot",
    "tradeoff_plot",
]

DPI = 150
MAX_LABELS = 40
"""Beyond this many configurations only front points get a text label."""

# Distinct marker, size and colour per knee method, so coinciding picks stay visible: the
# larger hollow markers ring the smaller ones.
KNEE_STYLE = {
    "kneedle": {"marker": "*", "s": 420, "color": "#d62728"},
    "utopia": {"marker": "D", "s": 230, "color": "#2ca02c"},
    "topsis": {"marker": "s", "s": 140, "color": "#9467bd"},
}
FRONT_COLOR = "#1f77b4"
DOMINATED_COLOR = "#9a9a9a"
# Candidate label offsets in points (dx, dy, horizontal alignment), tried in order.
LABEL_OFFSETS = (
    (6, 5, "left"),
    (6, -11, "left"),
    (-6, 5, "right"),
    (-6, -11, "right"),
    (0, 10, "center"),
    (0, -16, "center"),
    (10, 16, "left"),
    (-10, 16, "right"),
    (10, -22, "left"),
    (-10, -22, "right"),
    (0, 22, "center"),
    (0, -28, "center"),
)


def _guess_mode(metric: str) -> str:
    """Better direction of a metric that is not an objective: times and sizes go down."""
    lower = metric.lower()
    if lower.endswith(("_ms", "_s", "_mb", "_size")) or lower.startswith(("params", "memory")):
        return "min"
    return "max"


def _axes_metrics(sel: Selection, x: str | None, y: str | None) -> tuple[str, str]:
    names = [m for m, _ in sel.objectives]
    modes = dict(sel.objectives)
    if x is None:
        x = next((m for m in names if modes[m] == "min" and m != y), None)
        x = x or next((m for m in names if m != y), None)
    if y is None:
        y = next((m for m in names if m != x and modes[m] == "max"), None)
        y = y or next((m for m in names if m != x), None)
    if x is None or y is None:
        raise SweepError(
            "pareto_plot: needs two metrics; pass x= and y= with a single objective "
            f"(objectives: {', '.join(names)})"
        )
    missing = [m for m in (x, y) if f"{m}_mean" not in sel.table.columns]
    if missing:
        raise SweepError(
            f"pareto_plot: no aggregated column for {', '.join(map(repr, missing))} "
            "(expected <metric>_mean in the selection table)"
        )
    return x, y


def _column(sel: Selection, name: str, default: float = np.nan) -> np.ndarray:
    if name not in sel.table.columns:
        return np.full(len(sel.table), default)
    return np.asarray(sel.table[name], dtype=np.float64)


_SHORT_NAMES = {"image_size": "size", "augmentation": "aug", "stress": "stress", "epochs": "epochs"}


def _short(column: str) -> str:
    """A column's name as labels show it: ``hp.coreset_ratio`` -> ``coreset_ratio``."""
    return _SHORT_NAMES.get(column, column.removeprefix("hp."))


def _missing(value: Any) -> bool:
    if value is None or value is pd.NA:
        return True
    return isinstance(value, (float, np.floating)) and math.isnan(value)


def _display(value: Any) -> str:
    if _missing(value):
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, (int, float, np.integer, np.floating)):
        return f"{float(value):g}"
    return str(value)


def _canonical(value: Any) -> Any:
    if _missing(value):
        return None
    if isinstance(value, (bool, np.bool_, str)):
        return value if isinstance(value, str) else bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)  # exact, and 256 == 256.0
    return str(value)


def _key(values: Sequence[Any]) -> str:
    """A configuration's identity that survives int/float and None/NaN differences."""
    return json.dumps([_canonical(v) for v in values])


def _base_label(table: pd.DataFrame, row: int) -> str:
    parts = []
    for column in ("model", "backbone"):
        if column in table.columns:
            value = table[column].iloc[row]
            if isinstance(value, str) and value:
                parts.append(value)
    return "/".join(parts) or f"row {row}"


def _config_labels(table: pd.DataFrame, columns: Sequence[str] | None = None) -> list[str]:
    """A label per row: ``model/backbone`` plus the configuration columns that tell rows of
    the same model and backbone apart (``patchcore/resnet18 coreset_ratio=0.01``).

    ``columns`` are the candidates (default: every configuration column of ``table``).
    """
    base = [_base_label(table, i) for i in range(len(table))]
    candidates = config_columns(table) if columns is None else list(columns)
    distinguishing = []
    for column in candidates:
        if column in ("model", "backbone") or column not in table.columns:
            continue
        seen: dict[str, set[str]] = {}
        for label, value in zip(base, table[column], strict=True):
            seen.setdefault(label, set()).add(_display(value))
        if any(len(values) > 1 for values in seen.values()):
            distinguishing.append(column)
    labels = []
    for i, label in enumerate(base):
        extras = [
            f"{_short(c)}={_display(table[c].iloc[i])}"
            for c in distinguishing
            if not _missing(table[c].iloc[i])
        ]
        labels.append(" ".join([label, *extras]))
    return labels


def _axis_title(metric: str, mode: str, horizontal: bool) -> str:
    better = (
        ("← better" if mode == "min" else "better →")
        if horizontal
        else ("↓ better" if mode == "min" else "↑ better")
    )
    return f"{metric}   ({better}; mean ± std over seeds)"


def _overlap_area(box: Bbox, other: Bbox) -> float:
    width = min(box.x1, other.x1) - max(box.x0, other.x0)
    height = min(box.y1, other.y1) - max(box.y0, other.y0)
    return max(width, 0.0) * max(height, 0.0)


def _place_labels(fig: Figure, ax, xs, ys, rows, labels, on_front, knees) -> None:
    """Label points greedily: each label goes to the candidate offset that covers least.

    Cost is the area a label would cover of other labels (weighted most), the legend,
    markers, or outside the axes. Front points go first and are always labelled; dominated
    points only where a spot free of everything exists.
    """
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    obstacles: list[tuple[Bbox, float]] = []  # (box, weight of covering it)
    legend = ax.get_legend()
    if legend is not None:
        obstacles.append((legend.get_window_extent(renderer), 4.0))
    pixels = ax.transData.transform(np.column_stack([xs, ys]))
    for row, (px, py) in zip(rows, pixels, strict=True):
        half = 16 if row in knees else 5  # knee markers are drawn larger
        obstacles.append((Bbox.from_bounds(px - half, py - half, 2 * half, 2 * half), 1.0))
    too_many = len(rows) > MAX_LABELS
    for i in sorted(range(len(rows)), key=lambda i: (not on_front[i], rows[i])):
        if too_many and not on_front[i]:
            continue
        best: tuple[float, object, Bbox] | None = None
        for dx, dy, align in LABEL_OFFSETS:
            text = ax.annotate(
                labels[i],
                (xs[i], ys[i]),
                xytext=(dx, dy),
                textcoords="offset points",
                ha=align,
                fontsize=7,
                color="#222222" if on_front[i] else "#777777",
            )
            box = text.get_window_extent(renderer).padded(1.5)
            cost = sum(weight * _overlap_area(box, other) for other, weight in obstacles)
            cost += 10.0 * (box.width * box.height - _overlap_area(box, inside))
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, text, box)
            else:
                text.remove()
            if cost == 0:
                break
        if best is None:
            continue
        if best[0] > 0 and not on_front[i]:
            best[1].remove()
            continue
        obstacles.append((best[2], 6.0))


def _save_atomically(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _log_x_if_wide(ax, values: np.ndarray) -> None:
    """A logarithmic x axis with plain 1-2-5 tick numbers when the values span a decade."""
    values = values[np.isfinite(values)]
    if values.size and (values > 0).all() and values.max() / values.min() > 10:
        ax.set_xscale("log")
        # Plain numbers at 1-2-5 steps read better than bare powers of ten.
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())


def _front_panel(
    fig: Figure, ax, sel: Selection, x: str, y: str, title: str
) -> Callable[[], None] | None:
    """Draw ``y`` against ``x`` of ``sel`` on ``ax``; return what labels the points.

    The labels are placed by measuring text boxes, which needs the figure drawn once with
    every panel in place: call the returned function after ``fig.canvas.draw()``.
    """
    modes = dict(sel.objectives)
    x_mode, y_mode = modes.get(x, _guess_mode(x)), modes.get(y, _guess_mode(y))
    xs, ys = _column(sel, f"{x}_mean"), _column(sel, f"{y}_mean")
    x_err = np.nan_to_num(_column(sel, f"{x}_std", 0.0))
    y_err = np.nan_to_num(_column(sel, f"{y}_std", 0.0))
    on_front = _column(sel, "on_front", 0.0).astype(bool)
    valid = np.isfinite(xs) & np.isfinite(ys)

    ax.grid(True, which="major", alpha=0.3)
    n_valid = int(valid.sum())
    ax.set_title(
        title
        or f"{y} vs {x}: {int((on_front & valid).sum())} of {n_valid} configurations "
        "on the Pareto front",
        fontsize=10,
    )
    ax.set_xlabel(_axis_title(x, x_mode, True), fontsize=9)
    ax.set_ylabel(_axis_title(y, y_mode, False), fontsize=9)
    if n_valid == 0:
        ax.text(
            0.5, 0.5, f"no configuration has both {x} and {y}", ha="center", transform=ax.transAxes
        )
        return None
    _log_x_if_wide(ax, xs[valid])

    for mask, color, label in (
        (valid & ~on_front, DOMINATED_COLOR, "dominated"),
        (valid & on_front, FRONT_COLOR, "on the Pareto front"),
    ):
        if mask.any():
            ax.errorbar(
                xs[mask],
                ys[mask],
                xerr=x_err[mask],
                yerr=y_err[mask],
                fmt="o",
                ms=5,
                color=color,
                ecolor=color,
                elinewidth=0.8,
                capsize=2,
                alpha=0.9,
                label=label,
                zorder=3,
            )

    # The front of the two plotted metrics (the selection's front may use more objectives).
    rows = np.flatnonzero(valid)
    front2d = rows[
        pareto_mask(np.column_stack([xs[rows], ys[rows]]), [x_mode == "max", y_mode == "max"])
    ]
    front2d = front2d[np.argsort(xs[front2d], kind="stable")]
    if front2d.size:
        ax.step(
            xs[front2d],
            ys[front2d],
            where="post" if x_mode == "min" else "pre",
            color=FRONT_COLOR,
            lw=1.2,
            alpha=0.6,
            zorder=2,
            label=f"front ({x}, {y})",
        )

    for method, style in KNEE_STYLE.items():
        row = sel.picks.get(method)
        if row is None or not valid[row]:
            continue
        chosen = " (chosen)" if sel.chosen == method else ""
        ax.scatter(
            [xs[row]],
            [ys[row]],
            facecolors="none",
            edgecolors=style["color"],
            marker=style["marker"],
            s=style["s"],
            linewidths=1.6,
            zorder=4,
            label=f"knee: {method}{chosen}",
        )

    ax.margins(x=0.08, y=0.1)
    legend = ax.legend(fontsize=8, loc="best", framealpha=0.85)
    for handle in legend.legend_handles:
        if isinstance(handle, PathCollection):  # knee markers: legend-sized, not plot-sized
            handle.set_sizes([90])
    all_labels = _config_labels(sel.table)
    labels = [all_labels[int(r)] for r in rows]
    knees = {row for row in sel.picks.values() if row is not None}

    def place() -> None:
        _place_labels(fig, ax, xs[rows], ys[rows], list(rows), labels, list(on_front[rows]), knees)

    return place


def pareto_plot(
    sel: Selection,
    path: str | os.PathLike[str],
    *,
    x: str | None = None,
    y: str | None = None,
    title: str = "",
) -> Path:
    """Write a PNG of ``y`` against ``x`` (default: the time objective against accuracy).

    Every configuration is a point with seed-std error bars (front points in colour,
    dominated ones grey), the 2-D Pareto front of the plotted metrics is a step line, each
    knee method's pick has its own marker in the legend, and points are labelled
    ``model/backbone`` (plus the hyperparameters that tell a model's configurations apart).
    The x axis is logarithmic when its values span more than a decade. The file is written
    atomically; the path is returned.
    """
    x, y = _axes_metrics(sel, x, y)
    fig = _new_figure(8.0, 5.6)
    place = _front_panel(fig, fig.add_subplot(), sel, x, y, title)
    if place is not None:
        fig.canvas.draw()  # fixes limits and layout before measuring label boxes
        place()
    _save_atomically(fig, Path(path))
    return Path(path)


# --------------------------------------------------------------------------- Figs. 13 and 14


def _finite(frame: pd.DataFrame, column: str) -> np.ndarray:
    if column not in frame.columns:
        return np.zeros(len(frame), dtype=bool)
    return np.isfinite(pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float))


def _pair_selection(
    agg: pd.DataFrame, x: str, y: str, x_mode: str | None, y_mode: str | None
) -> Selection | None:
    """The Pareto front and knees of ``agg`` on the two metrics alone (None without a row that
    has both)."""
    if not (_finite(agg, f"{x}_mean") & _finite(agg, f"{y}_mean")).any():
        return None
    objectives = [(y, y_mode or _guess_mode(y)), (x, x_mode or _guess_mode(x))]
    return select(agg.reset_index(drop=True), objectives)


def tradeoff_plot(
    agg: pd.DataFrame,
    path: str | os.PathLike[str],
    *,
    x: str = "latency_ms",
    y: str = "image_auroc",
    x_mode: str | None = None,
    y_mode: str | None = None,
    title: str = "",
) -> Path | None:
    """:func:`pareto_plot` of ``y`` against ``x`` with the front and knees of these two
    metrics (not the study's objectives): the reference study's Fig. 13, one metric a file.

    ``agg`` is a seed-aggregated table (:func:`sweep.read.analysis.aggregate_seeds`) with
    ``<metric>_mean`` and ``<metric>_std`` columns. Returns None, writing nothing, when no
    configuration has finite values of both.
    """
    sel = _pair_selection(agg, x, y, x_mode, y_mode)
    if sel is None:
        return None
    return pareto_plot(sel, path, x=x, y=y, title=title)


IMAGE_PIXEL_PAIRS = (("image_auroc", "pixel_auroc"), ("image_f1", "pixel_f1"))
"""Fig. 14's panels: image-level metric on x, the pixel-level one on y."""


def image_vs_pixel_plot(
    agg: pd.DataFrame,
    path: str | os.PathLike[str],
    *,
    pairs: Sequence[tuple[str, str]] = IMAGE_PIXEL_PAIRS,
) -> Path | None:
    """Image-level against pixel-level performance per configuration (Fig. 14): one panel per
    pair of ``pairs`` that has data, the upper right corner best, each panel with its own
    front and knees. None, writing nothing, when no configuration has a pixel metric (an
    image-level-only study, or a data set without masks).
    """
    selections = []
    for x, y in pairs:
        sel = _pair_selection(agg, x, y, "max", "max")
        if sel is not None:
            selections.append((x, y, sel))
    if not selections:
        return None
    fig = _new_figure(7.0 * len(selections), 5.6)
    axes = fig.subplots(1, len(selections), squeeze=False)[0]
    placers = [
        _front_panel(fig, ax, sel, x, y, f"{y} vs {x}")
        for ax, (x, y, sel) in zip(axes, selections, strict=True)
    ]
    fig.suptitle("Image-level vs pixel-level performance (upper right is best)", fontsize=11)
    fig.canvas.draw()
    for place in placers:
        if place is not None:
            place()
    _save_atomically(fig, Path(path))
    return Path(path)


# --------------------------------------------------------------------------- Fig. 12

ROBUSTNESS_METRICS = ("image_auroc", "image_f1", "pixel_auroc", "pixel_f1")
"""Fig. 12's panels (those with data); other metrics only when none of these has any."""
VARIANT_COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


def _variant_label(row: pd.Series) -> str:
    parts = []
    for column in VARIANT_COLUMNS:
        value = row.get(column, CLEAN)
        if not _missing(value) and value != CLEAN:
            parts.append(f"{'augmentation' if column == 'augmentation' else 'stress'}: {value}")
    return " + ".join(parts) or "clean"


def robustness_plot(
    deltas: pd.DataFrame,
    path: str | os.PathLike[str],
    *,
    metrics: Sequence[str] | None = None,
) -> Path | None:
    """Each data variant against clean, per configuration (the reference study's Fig. 12).

    ``deltas`` is :func:`sweep.read.analysis.variant_deltas`'s frame. One panel per metric with a
    finite ``<metric>_delta``; a group of horizontal bars per configuration, one bar per
    variant (training augmentation set and/or test-time stress), its length the variant's
    mean minus the clean mean, its error bar the variant's seed std. None, writing nothing,
    when no delta is finite.
    """
    if metrics is None:
        found = [c.removesuffix("_delta") for c in deltas.columns if str(c).endswith("_delta")]
        usual = [m for m in ROBUSTNESS_METRICS if _finite(deltas, f"{m}_delta").any()]
        metrics = usual or found
    metrics = [m for m in metrics if _finite(deltas, f"{m}_delta").any()]
    if deltas.empty or not metrics:
        return None
    frame = deltas.reset_index(drop=True)
    variant_names = [_variant_label(row) for _, row in frame.iterrows()]
    base_columns = [c for c in config_columns(frame) if c not in VARIANT_COLUMNS]
    config_names = _config_labels(frame, base_columns)
    configs = list(dict.fromkeys(config_names))
    # Augmentation sets first, then stresses, then both at once; by name within each.
    variants = sorted(
        dict.fromkeys(variant_names),
        key=lambda v: ("+" in v, v.startswith("stress"), v),
    )
    colors = {v: VARIANT_COLORS[i % len(VARIANT_COLORS)] for i, v in enumerate(variants)}

    n_cols = min(2, len(metrics))
    n_rows = math.ceil(len(metrics) / n_cols)
    slots = len(configs) * len(variants)
    height = min(40.0, max(2.6, 0.22 * slots + 1.2))
    fig = _new_figure(6.2 * n_cols, height * n_rows + 0.6)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    bar = 0.8 / len(variants)
    for ax, metric in zip(axes, metrics, strict=False):
        values = pd.to_numeric(frame[f"{metric}_delta"], errors="coerce").to_numpy(float)
        spread = (
            np.nan_to_num(pd.to_numeric(frame[f"{metric}_std"], errors="coerce").to_numpy(float))
            if f"{metric}_std" in frame.columns
            else np.zeros(len(frame))
        )
        for j, variant in enumerate(variants):
            rows = [
                i
                for i in range(len(frame))
                if variant_names[i] == variant and np.isfinite(values[i])
            ]
            if not rows:
                continue
            ys = [
                configs.index(config_names[i]) + (j - (len(variants) - 1) / 2) * bar for i in rows
            ]
            ax.barh(
                ys,
                values[rows],
                height=bar * 0.9,
                xerr=spread[rows],
                color=colors[variant],
                error_kw={"elinewidth": 0.7, "capsize": 1.5, "ecolor": "#333333"},
                label=variant,
            )
        ax.axvline(0.0, color="#222222", lw=0.8)
        ax.set_yticks(range(len(configs)), configs, fontsize=7)
        ax.set_ylim(len(configs) - 0.5, -0.5)  # first configuration on top
        ax.grid(True, axis="x", alpha=0.3)
        ax.set_title(f"{metric}: variant − clean", fontsize=10)
        ax.set_xlabel(
            f"Δ {metric}   (right = better than clean; bar: variant seed std)", fontsize=8
        )
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    handles, labels = [], []
    for ax in axes[: len(metrics)]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    fig.legend(handles, labels, loc="outside upper center", ncols=min(4, len(labels)), fontsize=8)
    _save_atomically(fig, Path(path))
    return Path(path)


# --------------------------------------------------------------------------- ablations

PARAM_METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")
COST_METRICS = ("latency_ms", "memory_bank_size")
SWEEPABLE_FIXED = ("image_size", "epochs", "test_fraction", "labelled_defects")
"""Fixed result columns an ablation may vary; every numeric ``hp.*`` column may too."""
SERIES_COLORS = VARIANT_COLORS


def _numeric(frame: pd.DataFrame, column: str) -> np.ndarray:
    return pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float)


def _series_keys(agg: pd.DataFrame, param: str) -> list[str]:
    """Which curve each row belongs to: every configuration column but ``param``."""
    others = [c for c in config_columns(agg) if c != param]
    return [_key([agg[c].iloc[i] for c in others]) for i in range(len(agg))]


def swept_columns(agg: pd.DataFrame) -> list[str]:
    """Numeric configuration columns (``image_size``, ``epochs``, numeric ``hp.*``) that take
    two or more values among configurations that agree on every other configuration column:
    what a study varies as an ablation, and :func:`param_plot` can draw."""
    candidates = [c for c in SWEEPABLE_FIXED if c in agg.columns]
    candidates += [
        c
        for c in config_columns(agg)
        if c.startswith("hp.")
        and pd.api.types.is_numeric_dtype(agg[c])
        and not pd.api.types.is_bool_dtype(agg[c])
    ]
    swept = []
    for column in candidates:
        values = _numeric(agg, column)
        seen: dict[str, set[float]] = {}
        for key, value in zip(_series_keys(agg, column), values, strict=True):
            if np.isfinite(value):
                seen.setdefault(key, set()).add(float(value))
        if any(len(v) >= 2 for v in seen.values()):
            swept.append(column)
    return swept


def param_plot(
    agg: pd.DataFrame,
    param: str,
    path: str | os.PathLike[str],
    *,
    metrics: Sequence[str] | None = None,
    cost_metrics: Sequence[str] = COST_METRICS,
) -> Path | None:
    """Metrics against a numeric configuration column ``param`` (``image_size``,
    ``hp.coreset_ratio``, ...): a resolution or coreset-ratio study's picture.

    One curve per configuration that varies ``param`` with everything else fixed (mean over
    seeds, seed std as error bars; a configuration run at one value is a marker); a panel per
    accuracy metric with data (``metrics``, default :data:`PARAM_METRICS`), then a cost panel:
    ``latency_ms`` on the left axis and ``memory_bank_size`` (dashed) on a right-hand one. The
    x axis is logarithmic when ``param`` spans more than a decade. None, writing nothing, when
    no configuration has two values of ``param``.
    """
    if param not in agg.columns or agg.empty:
        return None
    xs = _numeric(agg, param)
    keys = _series_keys(agg, param)
    members: dict[str, list[int]] = {}
    for i, (key, value) in enumerate(zip(keys, xs, strict=True)):
        if np.isfinite(value):
            members.setdefault(key, []).append(i)
    series = {key: sorted(rows, key=lambda i: xs[i]) for key, rows in members.items()}
    # A configuration at one value of param is a marker beside the curves (label_budget's
    # supervised detectors where only one N was run), but one curve is needed to draw at all.
    if not any(len({xs[i] for i in rows}) >= 2 for rows in series.values()):
        return None
    used = sorted(i for rows in series.values() for i in rows)
    metrics = list(PARAM_METRICS if metrics is None else metrics)
    accuracy = [m for m in metrics if _finite(agg.iloc[used], f"{m}_mean").any()]
    costs = [m for m in cost_metrics if _finite(agg.iloc[used], f"{m}_mean").any()]
    panels: list[list[str]] = [[m] for m in accuracy] + ([costs] if costs else [])
    if not panels:
        return None

    firsts = [rows[0] for rows in series.values()]
    others = [c for c in config_columns(agg) if c != param]
    names = _config_labels(agg.iloc[firsts].reset_index(drop=True), others)
    colors = [SERIES_COLORS[i % len(SERIES_COLORS)] for i in range(len(series))]
    n_cols = min(2, len(panels))
    n_rows = math.ceil(len(panels) / n_cols)
    fig = _new_figure(6.4 * n_cols, 4.2 * n_rows + 0.5 + 0.18 * len(series))
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    short = param.removeprefix("hp.")
    distinct = np.unique(xs[used])
    for ax, panel in zip(axes, panels, strict=False):
        twin = None
        for k, metric in enumerate(panel):
            target = ax
            if k == 1:  # the second cost metric gets its own scale on the right
                twin = ax.twinx()
                target = twin
            for (_key, rows), name, color in zip(series.items(), names, colors, strict=True):
                means = _numeric(agg.iloc[rows], f"{metric}_mean")
                stds = (
                    np.nan_to_num(_numeric(agg.iloc[rows], f"{metric}_std"))
                    if f"{metric}_std" in agg.columns
                    else None
                )
                keep = np.isfinite(means)
                if not keep.any():
                    continue
                target.errorbar(
                    xs[rows][keep],
                    means[keep],
                    yerr=None if stds is None else stds[keep],
                    fmt="o-" if k == 0 else "s--",
                    ms=4,
                    lw=1.3,
                    capsize=2,
                    color=color,
                    label=name if k == 0 else None,
                )
            mode = _guess_mode(metric)
            target.set_ylabel(
                f"{metric} ({'↓' if mode == 'min' else '↑'} better)"
                + ("  [dashed]" if k == 1 else ""),
                fontsize=8,
            )
        _log_x_if_wide(ax, xs[used])
        if ax.get_xscale() == "linear" and distinct.size <= 8:
            ax.set_xticks(distinct, [f"{v:g}" for v in distinct])
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlabel(short, fontsize=9)
        what = " and ".join(panel)
        ax.set_title(f"{what} vs {short}", fontsize=10)
        if twin is not None:
            twin.tick_params(labelsize=8)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles and len(panels) > 1:
        handles, labels = axes[len(panels) - 1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)), fontsize=8)
    fig.suptitle(f"metrics vs {short} (mean ± std over seeds)", fontsize=11)
    _save_atomically(fig, Path(path))
    return Path(path)


# --------------------------------------------------------------------------- Fig. 10

TIMING_METRICS = ("latency_ms", "throughput_fps")
"""Fig. 10's panels, those with data: inference time per image, and images per second."""
TIMING_TITLES = {
    "latency_ms": "Inference time per image (ms)",
    "throughput_fps": "Throughput (images / s)",
}
TIMING_COLORS = {"min": "#1f77b4", "max": "#2ca02c"}


def _metric_mode(metric: str, objectives: Sequence[tuple[str, str]] = ()) -> str:
    """Which way ``metric`` is better: the study's objective, else its natural direction."""
    return dict(objectives).get(metric) or METRICS.get(metric) or _guess_mode(metric)


def timing_bars(agg: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Fig. 10's bars of one metric: ``label``, ``mean``, ``std`` and ``row`` (the position in
    ``agg``) of each configuration with a finite ``<metric>_mean``, best first (lowest latency,
    highest throughput), ties by label. Empty when no configuration has the metric."""
    columns = ["label", "mean", "std", "row"]
    if agg.empty or f"{metric}_mean" not in agg.columns:
        return pd.DataFrame(columns=columns)
    means = _numeric(agg, f"{metric}_mean")
    stds = (
        np.nan_to_num(_numeric(agg, f"{metric}_std"))
        if f"{metric}_std" in agg.columns
        else np.zeros(len(agg))
    )
    bars = pd.DataFrame(
        {
            "label": _config_labels(agg.reset_index(drop=True)),
            "mean": means,
            "std": stds,
            "row": np.arange(len(agg)),
        }
    )[np.isfinite(means)]
    ascending = _metric_mode(metric) == "min"
    bars = bars.sort_values(["mean", "label"], ascending=[ascending, True], kind="stable")
    return bars.reset_index(drop=True)[columns]


def timing_plot(
    agg: pd.DataFrame,
    path: str | os.PathLike[str],
    *,
    metrics: Sequence[str] = TIMING_METRICS,
) -> Path | None:
    """Inference time and throughput per configuration (the reference study's Fig. 10).

    ``agg`` is a seed-aggregated table (:func:`sweep.read.analysis.aggregate_seeds`). One panel
    per metric of ``metrics`` with data: a horizontal bar per configuration (its seed mean,
    the seed std as an error bar, the value written beside it), sorted best first from the
    top (:func:`timing_bars`); configurations without the metric are left out of its panel.
    The axis is logarithmic when the values span more than a decade. None, writing nothing,
    when no configuration has any of ``metrics``.
    """
    panels = [(m, timing_bars(agg, m)) for m in metrics]
    panels = [(m, bars) for m, bars in panels if not bars.empty]
    if not panels:
        return None
    longest = max(len(bars) for _, bars in panels)
    height = min(40.0, max(2.4, 0.24 * longest + 1.3))
    fig = _new_figure(6.4 * len(panels), height)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (metric, bars) in zip(axes, panels, strict=True):
        mode = _metric_mode(metric)
        means, stds = bars["mean"].to_numpy(float), bars["std"].to_numpy(float)
        _log_x_if_wide(ax, means)
        ys = np.arange(len(bars))
        ax.barh(
            ys,
            means,
            height=0.7,
            xerr=stds,
            color=TIMING_COLORS[mode],
            alpha=0.85,
            error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "#333333"},
        )
        for y, mean, std in zip(ys, means, stds, strict=True):
            ax.annotate(
                f"{mean:.3g}",
                (mean + std, y),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=6,
                color="#333333",
            )
        ax.set_yticks(ys, bars["label"].tolist(), fontsize=7)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_ylim(len(bars) - 0.5, -0.5)  # best on top
        ax.margins(x=0.12)
        ax.grid(True, axis="x", which="major", alpha=0.3)
        better = "← better" if mode == "min" else "better →"
        ax.set_xlabel(f"{metric}   ({better}; mean ± std over seeds)", fontsize=8)
        ax.set_title(
            f"{TIMING_TITLES.get(metric, metric)}: {len(bars)} configurations", fontsize=10
        )
    fig.suptitle("Inference time and throughput per configuration (best on top)", fontsize=11)
    _save_atomically(fig, Path(path))
    return Path(path)


# --------------------------------------------------------------------------- Fig. 11

MAX_EXAMPLE_MODELS = 6
MAX_EXAMPLE_ROWS = 4


def examples_plot(
    columns: Sequence[tuple[str, dict[str, Any]]],
    path: str | os.PathLike[str],
    *,
    max_rows: int = MAX_EXAMPLE_ROWS,
) -> Path | None:
    """A grid of example test images (the reference study's Fig. 11): one row per image, the
    image and its ground-truth mask, then one column per model with its anomaly map over the
    image and its image score.

    ``columns`` are ``(label, examples)`` pairs, ``examples`` as
    :func:`sweep.read.examples.load_examples` returns them. Rows are the images every model saved
    (matched by file path, so models at different image sizes line up), in the first model's
    order. Each model's maps share one colour scale, min-max over the rows shown. None, writing
    nothing, without a model or an image they all saved.
    """
    columns = [(label, ex) for label, ex in columns if ex is not None]
    if not columns or max_rows < 1:
        return None
    first = columns[0][1]
    common = [p for p in first["path"] if all(p in ex["path"] for _, ex in columns[1:])]
    common = common[:max_rows]
    if not common:
        return None
    n_cols = 2 + len(columns)
    fig = _new_figure(1.9 * n_cols, 1.9 * len(common) + 0.9)
    axes = fig.subplots(len(common), n_cols, squeeze=False)
    lookup = [{p: i for i, p in enumerate(ex["path"])} for _, ex in columns]
    ranges = []
    for (_, ex), where in zip(columns, lookup, strict=True):
        maps = ex.get("anomaly_map")
        if maps is None:
            ranges.append(None)
            continue
        shown = np.concatenate([maps[where[p]].ravel() for p in common]).astype(np.float64)
        shown = shown[np.isfinite(shown)]
        low, high = (float(shown.min()), float(shown.max())) if shown.size else (0.0, 1.0)
        ranges.append((low, high if high > low else low + 1.0))

    for r, image_path in enumerate(common):
        i0 = lookup[0][image_path]
        image = first["image"][i0]
        anomalous = int(first["label"][i0]) == 1
        defect = first["defect"][i0] if anomalous else "normal"
        row_axes = axes[r]
        row_axes[0].imshow(image)
        row_axes[0].set_ylabel(
            f"{defect}\n{Path(image_path).name}", fontsize=7, rotation=0, ha="right", va="center"
        )
        mask = first.get("mask")
        if mask is not None:
            row_axes[1].imshow(mask[i0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            row_axes[1].text(0.5, 0.5, "no mask", ha="center", va="center", fontsize=8)
        for c, ((_, ex), where, span) in enumerate(zip(columns, lookup, ranges, strict=True)):
            ax = row_axes[2 + c]
            i = where[image_path]
            own = ex["image"][i]
            ax.imshow(own.mean(axis=2), cmap="gray", vmin=0, vmax=255)
            height, width = own.shape[:2]
            maps = ex.get("anomaly_map")
            if maps is not None and span is not None:
                low, high = span
                ax.imshow(
                    (maps[i].astype(np.float64) - low) / (high - low),
                    cmap="jet",
                    vmin=0.0,
                    vmax=1.0,
                    alpha=0.5,
                    extent=(-0.5, width - 0.5, height - 0.5, -0.5),
                    interpolation="bilinear",
                )
                own_mask = ex.get("mask")
                if own_mask is not None and own_mask[i].any():
                    ax.contour(own_mask[i], levels=[0.5], colors="white", linewidths=0.7)
            else:
                ax.text(
                    0.5,
                    0.5,
                    "no anomaly map",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                    fontsize=7,
                    color="white",
                )
            ax.text(
                0.03,
                0.03,
                f"score {float(ex['score'][i]):.3g}",
                transform=ax.transAxes,
                fontsize=6,
                color="white",
                bbox={"facecolor": "black", "alpha": 0.55, "pad": 1.2, "lw": 0},
            )
    titles = ["image", "ground truth"] + [label for label, _ in columns]
    for c, title in enumerate(titles):
        axes[0][c].set_title("\n".join(textwrap.wrap(title, 22)), fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    caption = (
        "Example test images, their ground truth and each model's anomaly map (per model: "
        "blue low, red high over the images shown; white line: the ground truth)"
    )
    fig.suptitle(textwrap.fill(caption, int(12 * 1.9 * n_cols)), fontsize=8)
    _save_atomically(fig, Path(path))
    return Path(path)


# --------------------------------------------------------------------------- the report

TIME_METRIC = "latency_ms"
TRADEOFF_METRICS = ("image_auroc", "image_f1", "pixel_auroc", "pixel_f1", "pixel_aupro")
"""Accuracy metrics Fig. 13 draws against inference time (one file each) when they have data;
an accuracy objective of the study outside this list is drawn too."""
ACCURACY_METRICS = (*TRADEOFF_METRICS, "image_f1max", "pixel_f1max")


def _has_values(frame: pd.DataFrame, column: str) -> bool:
    return bool(_finite(frame, column).any())


MAX_RANKED_MODELS = 12
"""The most models a ranked examples spec may ask for (``top-bottom:6`` is twelve columns)."""
EXAMPLES_DEFAULT_METRIC = "image_auroc"
EXAMPLES_KINDS = ("top", "bottom", "top-bottom")


@dataclass(frozen=True)
class ExamplesSpec:
    """Which models the heatmap grid (Fig. 11) shows; :func:`parse_examples` reads the text.

    ``kind`` is ``"knee"`` (the knee picks, then the other Pareto front members), or ``"top"``,
    ``"bottom"`` or ``"top-bottom"``: the ``n`` best and/or worst configurations by ``metric``.
    """

    kind: str = "knee"
    n: int = 0
    metric: str = ""

    def __str__(self) -> str:
        return self.kind if self.kind == "knee" else f"{self.kind}:{self.n}:{self.metric}"


def parse_examples(spec: str | ExamplesSpec) -> ExamplesSpec:
    """Read an examples spec: ``knee`` (the default), or ``top:N[:METRIC]``,
    ``bottom:N[:METRIC]`` or ``top-bottom:N[:METRIC]`` for the N best, the N worst, or both,
    by METRIC (default ``image_auroc``; "best" follows the metric's direction, so
    ``top:3:latency_ms`` is the three fastest). ``top-bottom:4:image_auroc`` is the reference
    study's Fig. 11. Raises :class:`SweepError` naming the spec when it is malformed.
    """
    if isinstance(spec, ExamplesSpec):
        return spec
    text = str(spec).strip()
    if text == "knee":
        return ExamplesSpec()
    kind, _, rest = text.partition(":")
    count, _, metric = rest.partition(":")
    usage = "expected knee, top:N[:METRIC], bottom:N[:METRIC] or top-bottom:N[:METRIC]"
    if kind not in EXAMPLES_KINDS:
        raise SweepError(f"examples {text!r}: unknown choice {kind!r} ({usage})")
    try:
        n = int(count)
    except ValueError:
        raise SweepError(f"examples {text!r}: N must be a whole number ({usage})") from None
    models = 2 * n if kind == "top-bottom" else n
    if n < 1 or models > MAX_RANKED_MODELS:
        raise SweepError(
            f"examples {text!r}: N must be at least 1 and show at most {MAX_RANKED_MODELS} "
            f"models (got {models})"
        )
    metric = metric.strip() or EXAMPLES_DEFAULT_METRIC
    if ":" in metric:
        raise SweepError(f"examples {text!r}: too many ':' parts ({usage})")
    return ExamplesSpec(kind, n, metric)


def ranked_choices(
    table: pd.DataFrame,
    spec: ExamplesSpec,
    mode: str | None = None,
    available: Callable[[int], bool] | None = None,
) -> list[tuple[int, str]]:
    """The rows of ``table`` (a seed-aggregated table with ``<metric>_mean``) a ranked spec
    picks, each with why it is there, best first: ``(row, "top 1 by image_auroc = 0.97")``.

    Configurations are ranked on their finite seed means in ``mode``'s direction (default the
    metric's natural one), ties by row. ``top k`` / ``bottom k`` is the k-th best / worst among
    them. ``available`` says whether a row can be shown (it saved example maps); those that
    cannot are passed over and the next rank taken, so a label always gives the true rank. A
    configuration among both the best and the worst is shown once, as a top one.
    """
    column = f"{spec.metric}_mean"
    if spec.kind not in EXAMPLES_KINDS:
        raise SweepError(f"examples {str(spec)!r}: not a ranked choice")
    if column not in table.columns:
        return []
    values = _numeric(table, column)
    better_low = (mode or _metric_mode(spec.metric)) == "min"
    rows = [r for r in range(len(table)) if np.isfinite(values[r])]
    rows.sort(key=lambda r: (values[r] if better_low else -values[r], r))
    usable = available or (lambda _row: True)

    def reason(side: str, rank: int, row: int) -> str:
        return f"{side} {rank} by {spec.metric} = {values[row]:.3g}"

    top: list[tuple[int, str]] = []
    if spec.kind in ("top", "top-bottom"):
        for rank, row in enumerate(rows, start=1):
            if len(top) == spec.n:
                break
            if usable(row):
                top.append((row, reason("top", rank, row)))
    bottom: list[tuple[int, str]] = []
    if spec.kind in ("bottom", "top-bottom"):
        taken = {row for row, _ in top}
        for rank, row in enumerate(reversed(rows), start=1):
            if len(bottom) == spec.n:
                break
            if row not in taken and usable(row):
                bottom.append((row, reason("bottom", rank, row)))
    return top + bottom[::-1]


def _knee_choices(sel: Selection) -> list[tuple[int, str]]:
    """The knee picks (the recommended one first), then the other front members by the first
    objective."""
    table = sel.table
    order: list[int] = []
    if sel.chosen is not None and sel.picks.get(sel.chosen) is not None:
        order.append(int(sel.picks[sel.chosen]))
    order += [int(r) for r in sel.picks.values() if r is not None]
    front = [int(r) for r in table.index[table["on_front"].astype(bool)]]
    first_metric, first_mode = sel.objectives[0]
    values = pd.to_numeric(table[f"{first_metric}_mean"], errors="coerce")
    front.sort(key=lambda r: (-values[r] if first_mode == "max" else values[r], r))
    order += front
    choices = []
    for r in dict.fromkeys(order):
        knees = [m for m, pick in sel.picks.items() if pick == r]
        choices.append((r, f"knee: {', '.join(knees)}" if knees else "front"))
    return choices


def _example_choices(
    spec: ExamplesSpec,
    sel: Selection | None,
    agg: pd.DataFrame,
    clean: pd.DataFrame,
    results_dir: str | os.PathLike[str],
    objectives: Sequence[tuple[str, str]] = (),
) -> list[tuple[str, dict[str, Any]]]:
    """The models of the heatmap grid, labelled with why each is there: the knee picks and
    front members of ``sel`` (up to :data:`MAX_EXAMPLE_MODELS`), or the ranked configurations
    of ``agg``; each shown by its lowest seed that saved example maps."""
    if "config_hash" not in clean.columns:
        return []
    table = sel.table if spec.kind == "knee" and sel is not None else agg
    if spec.kind == "knee" and sel is None:
        return []
    by = [c for c in config_columns(table) if c in clean.columns]
    hashes: dict[str, list[str]] = {}
    ranked = clean.sort_values("seed", kind="stable") if "seed" in clean.columns else clean
    for _, row in ranked.iterrows():
        hashes.setdefault(_key([row[c] for c in by]), []).append(str(row["config_hash"]))
    loaded: dict[int, dict[str, Any] | None] = {}

    def examples_of(r: int) -> dict[str, Any] | None:
        if r not in loaded:
            loaded[r] = None
            for digest in hashes.get(_key([table[c].iloc[r] for c in by]), []):
                try:
                    examples = load_examples(results_dir, digest)
                except SweepError:
                    continue
                if examples is not None and examples.get("anomaly_map") is not None:
                    loaded[r] = examples
                    break
        return loaded[r]

    if spec.kind == "knee":
        candidates = _knee_choices(sel)  # type: ignore[arg-type]
        cap = MAX_EXAMPLE_MODELS
    else:
        mode = _metric_mode(spec.metric, objectives)
        candidates = ranked_choices(table, spec, mode, lambda r: examples_of(r) is not None)
        cap = len(candidates)
    labels = _config_labels(table.reset_index(drop=True))
    chosen = []
    for r, why in candidates:
        if len(chosen) >= cap:
            break
        examples = examples_of(r)
        if examples is not None:
            chosen.append((f"{labels[r]} ({why})", examples))
    return chosen


def report_plots(
    df: pd.DataFrame,
    selection: Selection | None,
    objectives: list[tuple[str, str]],
    out_dir: Path,
    results_dir: str | Path | None = None,
    examples: str | ExamplesSpec = "knee",
) -> dict[str, Path]:
    """Every plot the rows have data for, written under ``out_dir``; returns ``{name: path}``.

    ``df`` is every row of a study (:func:`sweep.results.read_results`: ok, error and stopped
    rows, clean and data-variant rows). Model selection pictures use the ok, clean rows
    (trained and tested without augmentation or stress), aggregated over seeds:

    * ``pareto_<metric>``: ``latency_ms`` against each accuracy metric with data (Fig. 13);
    * ``pareto``: the study's own two objectives, when they are not one of those;
    * ``image_vs_pixel``: image- against pixel-level metrics, when there are pixel metrics
      (Fig. 14);
    * ``robustness``: each augmentation / stress against clean, when there are variant rows
      (Fig. 12);
    * ``timing``: inference time and throughput bars per configuration, when any has them
      (Fig. 10);
    * ``vs_<param>``: metrics against each numeric configuration column the study varies with
      everything else fixed (``vs_image_size``, ``vs_coreset_ratio``, ``vs_labelled_defects``):
      the study's accuracy objectives first, then :data:`PARAM_METRICS`;
    * ``examples``: the heatmap grid (Fig. 11), when ``results_dir`` holds the chosen models'
      saved example maps.

    ``selection`` is the study's selection over the clean configurations (made here from
    ``objectives`` when None). ``examples`` (:func:`parse_examples`) chooses the grid's models:
    ``"knee"``, the selection's knee picks and front members, or ``"top-bottom:4:image_auroc"``
    and the like, the best and worst configurations by a metric. A malformed spec, or a metric
    the rows have no column for, raises :class:`SweepError`.
    """
    spec = parse_examples(examples)
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    if df is None or df.empty:
        return written
    if spec.kind != "knee" and spec.metric not in df.columns:
        raise SweepError(
            f"examples {str(spec)!r}: the results have no column {spec.metric!r}"
            + did_you_mean(spec.metric, df.columns)
        )
    ok = df[df["status"] == "ok"] if "status" in df.columns else df
    clean = ok[clean_mask(ok)]
    objective_metrics = [m for m, _ in objectives]
    accuracy = [m for m in ACCURACY_METRICS if _has_values(clean, m)]
    extra = [
        m
        for m, mode in objectives
        if mode == "max" and m not in accuracy and m != TIME_METRIC and _has_values(clean, m)
    ]
    metrics = [
        m
        for m in dict.fromkeys(
            [
                *accuracy,
                *extra,
                *TIMING_METRICS,
                "memory_bank_size",
                *objective_metrics,
                *([spec.metric] if spec.metric else []),
            ]
        )
        if m in clean.columns
    ]
    agg = aggregate_seeds(clean, metrics) if len(clean) and metrics else pd.DataFrame()

    def keep(name: str, path: Path | None) -> None:
        if path is not None:
            written[name] = path

    tradeoff = [m for m in [*TRADEOFF_METRICS, *extra] if m in accuracy or m in extra]
    if not agg.empty and _has_values(agg, f"{TIME_METRIC}_mean"):
        for metric in tradeoff:
            keep(
                f"pareto_{metric}",
                tradeoff_plot(agg, out_dir / f"pareto_{metric}.png", x=TIME_METRIC, y=metric),
            )

    if selection is None and not agg.empty and objectives:
        try:
            selection = select(agg, objectives)
        except SweepError:
            selection = None
    if selection is not None and len(selection.objectives) == 2:
        pair = {m for m, _ in selection.objectives}
        if not any(pair == {TIME_METRIC, m} for m in tradeoff if f"pareto_{m}" in written):
            with contextlib.suppress(SweepError):  # e.g. a selection without <metric>_mean
                keep("pareto", pareto_plot(selection, out_dir / "pareto.png"))

    if not agg.empty:
        keep("image_vs_pixel", image_vs_pixel_plot(agg, out_dir / "image_vs_pixel.png"))

    if not clean_mask(ok).all():
        robust = [m for m in ACCURACY_METRICS if _has_values(ok, m)]
        if robust:
            deltas = variant_deltas(ok, robust)
            keep("robustness", robustness_plot(deltas, out_dir / "robustness.png"))

    if not agg.empty:
        keep("timing", timing_plot(agg, out_dir / "timing.png"))
        # The study's own accuracy objectives lead (label_budget's recall at precision 0.95
        # against labelled_defects), then the usual AUROC / AUPRO panels.
        param_metrics = list(
            dict.fromkeys([*(m for m, mode in objectives if mode == "max"), *PARAM_METRICS])
        )
        for param in swept_columns(agg):
            name = f"vs_{param.removeprefix('hp.')}"
            keep(name, param_plot(agg, param, out_dir / f"{name}.png", metrics=param_metrics))

    if results_dir is not None and not agg.empty:
        choices = _example_choices(spec, selection, agg, clean, results_dir, objectives)
        keep("examples", examples_plot(choices, out_dir / "examples.png"))
    return written
