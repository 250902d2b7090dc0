"""PNG plots of a study's selection.

Figures are built with :class:`matplotlib.figure.Figure` on an Agg canvas rather than through
``pyplot``: nothing global (backend, current figure) changes, so plotting is safe in worker
processes, tests and notebooks alike, and no display is needed.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from matplotlib.transforms import Bbox

from sweep.analysis import Selection, pareto_mask
from sweep.errors import SweepError

__all__ = ["pareto_plot"]

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
    if lower.endswith(("_ms", "_s", "_mb")) or lower.startswith("params"):
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


def _point_label(sel: Selection, row: int) -> str:
    parts = []
    for column in ("model", "backbone"):
        if column in sel.table.columns:
            value = sel.table.at[row, column]
            if isinstance(value, str) and value:
                parts.append(value)
    return "/".join(parts) or f"row {row}"


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
    ``model/backbone``. The x axis is logarithmic when its values span more than a decade.
    The file is written atomically; the path is returned.
    """
    x, y = _axes_metrics(sel, x, y)
    modes = dict(sel.objectives)
    x_mode, y_mode = modes.get(x, _guess_mode(x)), modes.get(y, _guess_mode(y))
    xs, ys = _column(sel, f"{x}_mean"), _column(sel, f"{y}_mean")
    x_err = np.nan_to_num(_column(sel, f"{x}_std", 0.0))
    y_err = np.nan_to_num(_column(sel, f"{y}_std", 0.0))
    on_front = _column(sel, "on_front", 0.0).astype(bool)
    valid = np.isfinite(xs) & np.isfinite(ys)

    fig = Figure(figsize=(8.0, 5.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
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
        _save_atomically(fig, Path(path))
        return Path(path)

    positive = xs[valid] > 0
    if positive.all() and xs[valid].max() / xs[valid].min() > 10:
        ax.set_xscale("log")
        # Plain numbers at 1-2-5 steps read better than bare powers of ten.
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())

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
    fig.canvas.draw()  # fixes limits and layout before measuring label boxes
    labels = [_point_label(sel, int(r)) for r in rows]
    knees = {row for row in sel.picks.values() if row is not None}
    _place_labels(fig, ax, xs[rows], ys[rows], list(rows), labels, list(on_front[rows]), knees)
    _save_atomically(fig, Path(path))
    return Path(path)
