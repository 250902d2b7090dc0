"""The ``sweep`` command line."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from sweep.errors import EXIT_BAD_INPUT, SweepError

app = typer.Typer(
    help="Ray-distributed hyperparameter and ablation sweeps for visual anomaly detection.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Make and inspect data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

# Tables stay readable when piped or logged (no terminal width to go by).
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

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


def _bad_input(exc: Exception) -> None:
    err.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def _user_errors() -> tuple[type[Exception], ...]:
    from data.errors import DatasetError
    from models.base import ModelError

    return (SweepError, DatasetError, ModelError)


# --------------------------------------------------------------------------- run


@app.command()
def run(
    study_file: Annotated[Path, typer.Argument(help="The study YAML file.")],
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Results directory or URI.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a study key: dataset.image_size=64, space.seed=0."),
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: $RAY_ADDRESS, else local).")
    ] = None,
    num_cpus: Annotated[
        int | None, typer.Option(help="CPUs of a local Ray instance (default: all).")
    ] = None,
    retry_errors: Annotated[
        bool, typer.Option("--retry-errors", help="Run again trials whose row is an error.")
    ] = False,
    smoke: Annotated[
        bool,
        typer.Option(
            "--smoke",
            help="Run the study's smoke form: tiny models, tiny generated data, one seed, a few "
            "trials, on CPU, into <output>-smoke (CI dry-runs every study this way).",
        ),
    ] = False,
) -> None:
    """Run a study: every trial its output does not hold yet, one Parquet row each."""
    from sweep.runner import run_study
    from sweep.study import load_study, smoke_form

    try:
        study = load_study(study_file, overrides=set_ or [])
        if smoke:
            study = smoke_form(study)
        summary = run_study(
            study,
            output=output,
            address=address,
            retry_errors=retry_errors,
            num_cpus=num_cpus,
            console=err,
        )
    except _user_errors() as exc:
        _bad_input(exc)
    err.print(
        f"[bold]{study.name}[/bold]: {summary.ok} ok, {summary.errors} error rows, "
        f"{summary.skipped} already done, {summary.lost} lost "
        f"(sweep {summary.sweep_s:.1f}s, Ray start {summary.ray_start_s:.1f}s)"
    )
    if summary.interrupted:
        err.print(
            f"interrupted: finished trials are saved in {summary.output}; "
            f"run the same command again to finish the study"
        )
        raise typer.Exit(130)
    err.print(f"results: {summary.output}   next: sweep report {summary.output}")
    if summary.lost:
        raise typer.Exit(1)


@app.command()
def validate(
    study_file: Annotated[Path, typer.Argument(help="The study YAML file.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a study key.")] = None,
    smoke: Annotated[
        bool, typer.Option("--smoke", help="Print the trials of the study's smoke form.")
    ] = False,
) -> None:
    """Check a study file (and its smoke form) and print its trials, without running anything."""
    from sweep.study import (
        VARIANT_KEYS,
        check_hyperparameters,
        config_hash,
        expand_trials,
        load_study,
        smoke_form,
    )

    try:
        study = load_study(study_file, overrides=set_ or [])
        check_hyperparameters(study)
        smoke_study = smoke_form(study)
        check_hyperparameters(smoke_study)
    except _user_errors() as exc:
        _bad_input(exc)
    if smoke:
        study = smoke_study
    if study.search.algorithm == "optuna":
        out.print(f"{study.name}: valid; optuna search, {study.search.n_trials} trials")
        return
    trials = expand_trials(study)
    variants = [k for k in VARIANT_KEYS if k in study.space]
    table = Table(title=f"{study.name}: {len(trials)} trials")
    columns = ("config_hash", "model", "backbone", "seed", "image_size", *variants)
    for column in (*columns, "hyperparameters"):
        table.add_column(column)
    for trial in trials:
        extra = {k: v for k, v in trial.hparams.items() if k not in ("backbone", "seed")}
        table.add_row(
            config_hash(study, trial),
            trial.model,
            trial.backbone or "-",
            str(trial.seed),
            str(trial.image_size),
            *(getattr(trial, k) for k in variants),
            ", ".join(f"{k}={v}" for k, v in sorted(extra.items())),
        )
    out.print(table)


@app.command()
def plan(
    study_file: Annotated[Path, typer.Argument(help="The study YAML file.")],
    cluster: Annotated[
        Path | None,
        typer.Option(help="A Ray cluster launcher file (cluster.yaml): plan for its nodes."),
    ] = None,
    gpus: Annotated[
        float | None, typer.Option(help="Plan for this machine with this many GPUs.")
    ] = None,
    gpu_memory_gb: Annotated[
        float | None, typer.Option(help="Memory of each GPU where the cluster does not say.")
    ] = None,
    history: Annotated[
        Path | None,
        typer.Option(help="Results whose measured times the estimates use (default: the study's)."),
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a study key.")] = None,
    smoke: Annotated[bool, typer.Option("--smoke", help="Plan the study's smoke form.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Print the trials, their resources, how they pack on the cluster and a time estimate,
    without running anything."""
    from sweep.plan import plan_command
    from sweep.study import load_study, smoke_form

    try:
        study = load_study(study_file, overrides=set_ or [])
        if smoke:
            study = smoke_form(study)
        plan_command(
            study,
            cluster=cluster,
            gpus=gpus,
            gpu_memory_gb=gpu_memory_gb,
            as_json=as_json,
            history=history,
            console=out,
        )
    except _user_errors() as exc:
        _bad_input(exc)


# --------------------------------------------------------------------------- report


def _fmt(mean: Any, std: Any, digits: int = 3) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _study_objectives(results_dir: Path, objectives: list[str] | None) -> list[tuple[str, str]]:
    from sweep.study import METRICS, Objective, load_study

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
    copy = results_dir / "_study.yaml"
    if copy.is_file():
        try:
            study = load_study(copy)
            return [(o.metric, o.direction) for o in study.objectives]
        except SweepError:
            pass
    return [("image_auroc", METRICS["image_auroc"]), ("latency_ms", METRICS["latency_ms"])]


def build_report(results_dir: Path, objectives: list[tuple[str, str]], plots_dir: Path) -> dict:
    """Aggregate, select and plot; return the report as a JSON-able dict."""
    import pandas as pd

    from sweep import analysis, plots
    from sweep.results import read_results

    df = read_results(results_dir)
    if df.empty:
        raise SweepError(f"results {str(results_dir)!r}: no trial rows found")
    errors = df[df["status"] != "ok"]
    metrics = list(dict.fromkeys([*REPORT_METRICS, *(m for m, _ in objectives)]))
    variant_columns = [c for c in analysis.VARIANT_COLUMNS if c in df.columns]
    has_variants = bool(variant_columns) and bool(
        (df[variant_columns].fillna(analysis.CLEAN) != analysis.CLEAN).any(axis=None)
    )
    report: dict[str, Any] = {
        "results": str(results_dir),
        "trials": len(df),
        "ok": int((df["status"] == "ok").sum()),
        "errors": [
            {"model": r.model, "backbone": r.backbone, "seed": r.seed, "error": r.error}
            for r in errors.itertuples()
        ],
        "objectives": [{"metric": m, "mode": d} for m, d in objectives],
        "plots": {},
    }
    if has_variants:
        deltas = analysis.variant_deltas(df, ROBUSTNESS_METRICS)
        report["robustness"] = json.loads(deltas.to_json(orient="records"))
        # Model selection compares detectors as they would run: trained and tested clean.
        clean = (df[variant_columns].fillna(analysis.CLEAN) == analysis.CLEAN).all(axis=1)
        df = df[clean]
    agg = analysis.aggregate_seeds(df, metrics) if not df.empty else pd.DataFrame()
    report["configurations"] = json.loads(agg.to_json(orient="records")) if len(agg) else []
    if agg.empty:
        report["selection"] = None
        return report
    selection = analysis.select(agg, objectives)
    report["selection"] = analysis.selection_to_dict(selection)
    if len(objectives) >= 2:
        time_metric = next((m for m, _ in objectives if m in ("latency_ms", "train_s")), None)
        accuracy = [m for m, _ in objectives if m != time_metric]
        x, y = (time_metric, accuracy[0]) if time_metric else (objectives[0][0], objectives[1][0])
        path = plots.pareto_plot(selection, plots_dir / "pareto.png", x=x, y=y)
        report["plots"]["pareto"] = str(path)
    return report


def _varying_columns(configs: list[dict]) -> list[str]:
    """Hyperparameter columns whose value differs between the configurations of a model: what
    tells two rows of the same model, backbone and size apart."""
    varying = []
    columns = sorted({k for c in configs for k in c if k.startswith("hp.") and k != "hp.seed"})
    for column in columns:
        by_model: dict[Any, set] = {}
        for config in configs:
            value = config.get(column)
            if value is not None:
                by_model.setdefault(config.get("model"), set()).add(json.dumps(value))
        if any(len(values) > 1 for values in by_model.values()):
            varying.append(column)
    return varying


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _print_report(report: dict, objectives: list[tuple[str, str]]) -> None:
    configs = report["configurations"]
    metrics = list(dict.fromkeys([*REPORT_METRICS, *(m for m, _ in objectives)]))
    picks = (report.get("selection") or {}).get("picks", {})
    front = {
        i
        for i, row in enumerate((report.get("selection") or {}).get("table", []))
        if row.get("on_front")
    }
    table = Table(
        title=f"{report['results']}: {report['ok']}/{report['trials']} trials ok "
        "(mean ± std over seeds)"
    )
    varying = _varying_columns(configs)
    for column in ("model", "backbone", "size", *varying, "seeds", *metrics, "front"):
        table.add_column(
            column.removeprefix("hp."),
            justify="right" if column not in ("model", "backbone") else "left",
        )
    best = {}
    for metric in metrics:
        values = [c.get(f"{metric}_mean") for c in configs if c.get(f"{metric}_mean") is not None]
        if values:
            mode = dict(objectives).get(metric) or (
                "min" if metric in ("latency_ms", "train_s") else "max"
            )
            best[metric] = max(values) if mode == "max" else min(values)
    for i, config in enumerate(configs):
        cells = []
        for metric in metrics:
            text = _fmt(
                config.get(f"{metric}_mean"),
                config.get(f"{metric}_std"),
                1 if metric in ("latency_ms", "train_s") else 3,
            )
            if best.get(metric) is not None and config.get(f"{metric}_mean") == best[metric]:
                text = f"[bold]{text}[/bold]"
            cells.append(text)
        marks = [name for name, idx in picks.items() if idx == i]
        flag = ("◆ knee:" + ",".join(marks)) if marks else ("•" if i in front else "")
        table.add_row(
            str(config.get("model")),
            str(config.get("backbone") or "-"),
            str(config.get("image_size") or "-"),
            *(_cell(config.get(c)) for c in varying),
            str(config.get("n_seeds")),
            *cells,
            flag,
        )
    out.print(table)
    selection = report.get("selection")
    if selection:
        names = " vs ".join(f"{m} ({d})" for m, d in objectives)
        out.print(f"Pareto front over {names}: {len(front)} configuration(s)")
        for method, idx in selection["picks"].items():
            if idx is None:
                continue
            row = configs[idx]
            out.print(
                f"  knee ({method}): {row.get('model')}/{row.get('backbone') or '-'} "
                + ", ".join(f"{m}={row.get(f'{m}_mean'):.4g}" for m, _ in objectives)
            )
        for note in selection.get("notes", []):
            out.print(f"  [dim]{note}[/dim]")
    if report.get("robustness"):
        _print_robustness(report["robustness"])
    for error in report["errors"]:
        out.print(
            f"[red]error row[/red] {error['model']}/{error['backbone'] or '-'} "
            f"seed={error['seed']}: {error['error']}"
        )
    for name, path in report["plots"].items():
        out.print(f"{name} plot: {path}")


def _print_robustness(rows: list[dict]) -> None:
    """Table C.9's shape: per detector and variant, mean ± std and the change from clean."""
    table = Table(
        title="Robustness: each augmentation set / stress vs the same configuration clean "
        "(mean ± std over seeds, Δ = change of the mean)"
    )
    variants = [c for c in ("augmentation", "stress") if any(r.get(c) != "none" for r in rows)]
    for column in ("model", "backbone", "size", *variants, "seeds", *ROBUSTNESS_METRICS):
        table.add_column(column, justify="left" if column in ("model", "backbone") else "right")
    for row in rows:
        cells = []
        for metric in ROBUSTNESS_METRICS:
            text = _fmt(row.get(f"{metric}_mean"), row.get(f"{metric}_std"))
            delta = row.get(f"{metric}_delta")
            if delta is not None and not math.isnan(delta):
                colour = "green" if delta > 0 else "red" if delta < 0 else "dim"
                text += f" [{colour}]Δ {delta:+.3f}[/{colour}]"
            cells.append(text)
        table.add_row(
            str(row.get("model")),
            str(row.get("backbone") or "-"),
            str(row.get("image_size") or "-"),
            *(str(row.get(c)) for c in variants),
            str(row.get("n_seeds")),
            *cells,
        )
    out.print(table)


@app.command()
def report(
    results_dir: Annotated[Path, typer.Argument(help="A study's results directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    plots: Annotated[
        Path | None, typer.Option(help="Where to write plots (default: RESULTS_DIR/_report).")
    ] = None,
    objective: Annotated[
        list[str] | None,
        typer.Option(help="metric[:max|min], repeatable (default: the study's objectives)."),
    ] = None,
) -> None:
    """Seed-aggregated table, Pareto front and knee point; writes pareto.png."""
    try:
        if not results_dir.is_dir():
            raise SweepError(f"results {str(results_dir)!r}: no such directory")
        objectives = _study_objectives(results_dir, objective)
        result = build_report(results_dir, objectives, plots or results_dir / "_report")
    except _user_errors() as exc:
        _bad_input(exc)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    else:
        _print_report(result, objectives)


# --------------------------------------------------------------------------- catalogues


@app.command("models")
def list_models_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    matrix: Annotated[
        bool, typer.Option(help="Also print the model x backbone compatibility matrix.")
    ] = True,
) -> None:
    """List the detectors, their hyperparameters and the backbones each can use.

    Compatibility is judged with each detector's default layers, and for transformer backbones at
    their native input size; a study checks its own layers and image sizes when it is validated.
    """
    import models
    from models.backbones import get_backbone, list_backbones

    backbones = list_backbones()
    rows = []
    for name in models.list_models():
        cls = models.get_class(name)
        hps = models.hyperparameters(name)
        usable = [
            b
            for b in backbones
            if "backbone" in hps
            and models.backbone_problem(name, b, None, get_backbone(b).input_size) is None
        ]
        rows.append(
            {
                "name": name,
                "learning_type": cls.learning_type,
                "localizes": cls.localizes,
                "default_backbone": hps.get("backbone"),
                "backbones": usable,
                "hyperparameters": dict(hps),
            }
        )
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
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


@app.command("backbones")
def list_backbones_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """List the backbones: kind, input size, parameters and layers (stride/channels).

    On every CNN the stage aliases layer1..layer4 name its stride-4..32 layers; transformers
    offer every block at one stride (their patch size).
    """
    from models.backbones import BACKBONES, backbone_param_count, describe_layers

    rows = [
        {
            "name": spec.name,
            "timm_name": spec.timm_name,
            "kind": spec.kind,
            "family": spec.family,
            "input_size": spec.input_size,
            "dynamic_size": spec.dynamic_size,
            "members": list(spec.members),
            "params": backbone_param_count(spec.name),
            "layers": {k: {"stride": s, "channels": c} for k, (s, c) in spec.layers.items()},
            "aliases": dict(spec.aliases),
            "layer_summary": describe_layers(spec),
        }
        for spec in sorted(BACKBONES.values(), key=lambda s: s.name)
    ]
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
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


def _compact_layers(row: dict[str, Any]) -> str:
    strides = {(v["stride"], v["channels"]) for v in row["layers"].values()}
    if row["kind"] != "cnn" or len(strides) == 1:
        return row["layer_summary"].removeprefix("valid: ")
    alias_of = {native: alias for alias, native in row["aliases"].items()}
    return ", ".join(
        f"{name}{f' ({alias_of[name]})' if name in alias_of else ''} {v['stride']}/{v['channels']}"
        for name, v in row["layers"].items()
    )


# --------------------------------------------------------------------------- data


@data_app.command("synth-glue")
def synth_glue(
    output: Annotated[Path, typer.Argument(help="Root directory of the data set.")],
    part: Annotated[
        list[str] | None, typer.Option(help="Part(s) to render (default: all).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Generation seed.")] = 0,
    n_train: Annotated[int, typer.Option(help="Normal training images per part.")] = 200,
    n_test_good: Annotated[int, typer.Option(help="Normal test images per part.")] = 40,
    n_test_defect: Annotated[int, typer.Option(help="Test images per defect type.")] = 6,
    n_val_good: Annotated[int, typer.Option(help="Normal validation images per part.")] = 20,
    n_val_defect: Annotated[int, typer.Option(help="Validation images per defect type.")] = 4,
) -> None:
    """Render the synthetic glue-line data set (MVTec AD layout plus a validation split)."""
    from rich.progress import Progress

    from data.synthetic_glue import PARTS, GlueSetConfig, ensure_generated

    parts = part or sorted(PARTS)
    try:
        for name in parts:
            if name not in PARTS:
                from sweep.errors import did_you_mean

                raise SweepError(
                    f"--part: unknown part {name!r}{did_you_mean(name, PARTS)} "
                    f"(known: {', '.join(sorted(PARTS))})"
                )
        config = GlueSetConfig(
            n_train=n_train,
            n_val_good=n_val_good,
            n_val_defect=n_val_defect,
            n_test_good=n_test_good,
            n_test_defect=n_test_defect,
        )
        with Progress(console=err) as progress:
            for name in parts:
                task = progress.add_task(name, total=None)

                def tick(done: int, total: int, task: Any = task) -> None:
                    progress.update(task, completed=done, total=total)

                path = ensure_generated(output, name, config=config, seed=seed, progress=tick)
                progress.console.print(f"{name}: {path}")
    except _user_errors() as exc:
        _bad_input(exc)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
