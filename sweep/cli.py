"""The ``sweep`` command line.

Each command calls a domain function, which returns data, then :mod:`sweep.output`, which
prints it. The domain modules are imported inside the commands: nearly all of them bring torch,
Ray or pandas, which ``sweep --help`` and the commands that do not use them should not wait for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from sweep import output as view
from sweep.errors import SweepError, did_you_mean
from sweep.output import bad_input, note

app = typer.Typer(
    help="Ray-distributed hyperparameter and ablation sweeps for visual anomaly detection.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Make and inspect data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
weights_app = typer.Typer(
    help="Pretrained backbone weights for nodes without internet.", no_args_is_help=True
)
app.add_typer(weights_app, name="weights")
parts_app = typer.Typer(
    help="Make the pretrained parts some detectors take (EfficientAD's teacher, DSR's general "
    "VQ-VAE, texture folders) offline, and show what a part file holds.",
    no_args_is_help=True,
)
app.add_typer(parts_app, name="parts")

# Options `run` and `resume` share.
AddressOption = Annotated[
    str | None, typer.Option(help="Ray cluster address (default: $RAY_ADDRESS, else local).")
]


def _cpu_count(value: int | None) -> int | None:
    # Further on 0 reads as "not given" (all CPUs): refuse it with the negatives, by name.
    if value is not None and value < 1:
        bad_input(
            f"--num-cpus {value}: expected a whole number of CPUs, 1 or more (leave it out to "
            "use all of this machine's)"
        )
    return value


NumCpusOption = Annotated[
    int | None,
    typer.Option(help="CPUs of a local Ray instance (default: all).", callback=_cpu_count),
]
RetryErrorsOption = Annotated[
    bool, typer.Option("--retry-errors", help="Run again trials whose row is an error.")
]
OnDataChangeOption = Annotated[
    str,
    typer.Option(
        "--on-data-change",
        help="When the data set's files changed since the output's rows were made: refuse "
        "(exit 2, saying what changed) or rerun (every trial again; the old rows are replaced).",
    ),
]


def _user_errors() -> tuple[type[Exception], ...]:
    # The data and models packages bring torch: imported when a command catches their errors.
    from data.errors import DatasetError
    from models.errors import ModelError

    return (SweepError, DatasetError, ModelError)


def _load_study(study_file: Path, set_: list[str] | None) -> Any:  # -> Study
    """``load_study`` with the --set overrides, its notes (the keys a --set space.model that
    leaves out models drops) on stderr, also where the study then fails to validate."""
    from sweep.run.study import load_study

    notes: list[str] = []
    try:
        return load_study(study_file, overrides=set_ or [], notes=notes)
    finally:
        for line in notes:
            note(f"note: {line}")


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
    address: AddressOption = None,
    num_cpus: NumCpusOption = None,
    retry_errors: RetryErrorsOption = False,
    smoke: Annotated[
        bool,
        typer.Option(
            "--smoke",
            help="Run the study's smoke form: tiny models, tiny generated data, one seed, a few "
            "trials, on CPU, into <output>-smoke (CI dry-runs every study this way).",
        ),
    ] = False,
    on_data_change: OnDataChangeOption = "refuse",
) -> None:
    """Run a study: every trial its output does not hold yet, one Parquet row each.

    Interrupted (Ctrl-C, a killed driver, a lost node), the same command, or ``sweep resume
    OUTPUT``, runs the rest: finished trials are never run twice.
    """
    from sweep.run.smoke import smoke_form

    try:
        study = _load_study(study_file, set_)
        if smoke:
            study = smoke_form(study)
    except _user_errors() as exc:
        bad_input(exc)
    _run_and_report(study, output, address, num_cpus, retry_errors, on_data_change)


@app.command()
def resume(
    output: Annotated[str, typer.Argument(help="The results directory or URI of a study.")],
    address: AddressOption = None,
    num_cpus: NumCpusOption = None,
    retry_errors: RetryErrorsOption = False,
    on_data_change: OnDataChangeOption = "refuse",
) -> None:
    """Finish a study from its output alone: run the study saved there (_study.yaml, as the
    first run validated it, overrides and --smoke applied) for the trials it does not hold."""
    from sweep.run.runner import read_study_copy

    try:
        study = read_study_copy(output)
    except _user_errors() as exc:
        bad_input(exc)
    _run_and_report(study, output, address, num_cpus, retry_errors, on_data_change)


def _run_and_report(
    study: Any,
    output: str | None,
    address: str | None,
    num_cpus: int | None,
    retry_errors: bool,
    on_data_change: str = "refuse",
) -> None:
    from sweep.run.runner import run_study

    target = output or study.output_dir
    try:
        summary = run_study(
            study,
            output=output,
            address=address,
            retry_errors=retry_errors,
            num_cpus=num_cpus,
            on_data_change=on_data_change,
            # The run's live progress (data preparation, the trials' bar) goes to stderr.
            console=view.err,
        )
    except _user_errors() as exc:
        bad_input(exc)
    except KeyboardInterrupt:  # before any trial started
        note("interrupted before any trial ran; run the same command again")
        raise typer.Exit(130) from None
    view.show_run_summary(study.name, summary)
    if summary.interrupted:
        view.show_interrupted(summary.output, target)
        raise typer.Exit(130)
    view.show_results_next(summary.output)
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
    from sweep.run.smoke import smoke_form
    from sweep.run.space import VARIANT_KEYS
    from sweep.run.study import check_hyperparameters, config_hash, expand_trials

    try:
        study = _load_study(study_file, set_)
        check_hyperparameters(study)
        smoke_study = smoke_form(study)
        check_hyperparameters(smoke_study)
    except _user_errors() as exc:
        bad_input(exc)
    if smoke:
        study = smoke_study
    if study.search.algorithm == "optuna":
        view.show_optuna_study(study.name, study.search.n_trials)
        return
    trials = expand_trials(study)
    hashes = [config_hash(study, trial) for trial in trials]
    view.show_trials(study.name, trials, hashes, [k for k in VARIANT_KEYS if k in study.space])


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
    from sweep.run.plan import make_plan
    from sweep.run.smoke import smoke_form

    try:
        study = _load_study(study_file, set_)
        if smoke:
            study = smoke_form(study)
        the_plan = make_plan(
            study, cluster=cluster, gpus=gpus, gpu_memory_gb=gpu_memory_gb, history=history
        )
    except _user_errors() as exc:
        bad_input(exc)
    view.show_plan(the_plan, as_json)


# --------------------------------------------------------------------------- report


@app.command()
def report(
    results_dir: Annotated[Path, typer.Argument(help="A study's results directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    html: Annotated[
        Path | None,
        typer.Option(
            "--html", help="Write the report as one self-contained HTML file (plots embedded)."
        ),
    ] = None,
    markdown: Annotated[
        Path | None,
        typer.Option("--markdown", help="Write the report as Markdown (plots linked as PNGs)."),
    ] = None,
    plots: Annotated[
        Path | None, typer.Option(help="Where to write plots (default: RESULTS_DIR/_report).")
    ] = None,
    objective: Annotated[
        list[str] | None,
        typer.Option(help="metric[:max|min], repeatable (default: the study's objectives)."),
    ] = None,
    weights: Annotated[
        list[str] | None,
        typer.Option(
            help="TOPSIS weights, e.g. image_auroc=2,latency_ms=1 (objectives left out weigh 1); "
            "TOPSIS's pick then becomes the chosen one."
        ),
    ] = None,
    examples: Annotated[
        str,
        typer.Option(
            help="Which models the heatmap grid (Fig. 11) shows: knee (the knee picks and front "
            "members), or top:N, bottom:N or top-bottom:N with an optional :METRIC (default "
            "image_auroc), e.g. top-bottom:4:image_auroc."
        ),
    ] = "knee",
) -> None:
    """Seed-aggregated table, Pareto front, each knee method's pick and the plots; optionally
    an HTML or Markdown report."""
    from sweep.read.plots import parse_examples
    from sweep.read.report import (
        build_report,
        check_writable,
        parse_weights,
        render_html,
        render_markdown,
        study_objectives,
        write_atomically,
    )

    try:
        if not results_dir.is_dir():
            raise SweepError(f"results {str(results_dir)!r}: no such directory")
        for path, what in ((html, "--html"), (markdown, "--markdown")):
            if path is not None:
                check_writable(path, what)
        parse_examples(examples)  # a bad spec fails before anything is read
        objectives = study_objectives(results_dir, objective)
        result = build_report(
            results_dir,
            objectives,
            plots or results_dir / "_report",
            weights=parse_weights(weights) or None,
            examples=examples,
        )
        written = []
        if html is not None:
            written.append(("html", write_atomically(html, render_html(result), "--html")))
        if markdown is not None:
            text = render_markdown(result, markdown)
            written.append(("markdown", write_atomically(markdown, text, "--markdown")))
    except _user_errors() as exc:
        bad_input(exc)
    view.show_report(result, objectives, as_json, written)


@app.command("results")
def results_cmd(
    results_dir: Annotated[
        str, typer.Argument(help="A study's results directory (or s3://, gs:// URI).")
    ],
    where: Annotated[
        list[str] | None,
        typer.Option(
            help="COLUMN OP VALUE, repeatable (all must hold); OP: == != < <= > >= in, not in, "
            "~ (regex), is null, is not null. E.g. --where 'image_auroc >= 0.9' "
            "--where 'model in patchcore,padim'."
        ),
    ] = None,
    columns: Annotated[
        list[str] | None,
        typer.Option(help="Columns to keep, comma-separated, globs allowed (hp.*)."),
    ] = None,
    sort: Annotated[
        list[str] | None, typer.Option(help="Sort by these columns; -COLUMN for descending.")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many rows.", min=0)] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="table, csv, json or parquet (needs --output).")
    ] = "table",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file (csv/json/parquet).")
    ] = None,
    recompute: Annotated[
        bool,
        typer.Option(
            "--recompute",
            help="First compute every row's image-level metrics again from its stored "
            "per-image results (no retraining), and rewrite the rows.",
        ),
    ] = False,
    threshold: Annotated[
        str | None,
        typer.Option(
            help="With --recompute: choose the image threshold with this policy instead of each "
            "row's own (f1_max, youden, iou_max, precision_at:P, fixed:V)."
        ),
    ] = None,
) -> None:
    """Filter a study's rows and print or export them (every column unless --columns; the
    table shows the main ones)."""
    from sweep.read.query import FORMATS, apply_where, export_rows, pick_columns, sort_rows
    from sweep.results import read_results

    if recompute or threshold is not None:
        _recompute(results_dir, threshold, recompute)
    try:
        if fmt not in FORMATS:
            raise SweepError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
        if fmt == "parquet" and output is None:
            raise SweepError("--format parquet: needs --output FILE")
        if fmt == "table" and output is not None:
            raise SweepError("--format table prints to the terminal; use csv, json or parquet")
        df = read_results(results_dir)
        rows = sort_rows(apply_where(df, where or []), sort)
        if limit is not None:
            rows = rows.head(limit)
        rows = rows[pick_columns(df, columns, table=fmt == "table")]
        if output is not None:
            export_rows(rows, fmt, output)
    except _user_errors() as exc:
        bad_input(exc)
    view.show_rows(rows, len(df), fmt, results_dir, output)


def _recompute(results_dir: str, threshold: str | None, recompute: bool) -> None:
    from sweep.run.metrics import ThresholdPolicy
    from sweep.run.recompute import recompute_output

    try:
        if not recompute:
            raise SweepError("--threshold applies with --recompute")
        policy = None
        if threshold is not None:
            try:
                policy = ThresholdPolicy.parse(threshold)
            except ValueError as exc:
                raise SweepError(f"--threshold {threshold!r}: {exc}") from None
        with view.recompute_progress() as progress:
            summary = recompute_output(results_dir, policy, progress=progress)
    except _user_errors() as exc:
        bad_input(exc)
    view.show_recompute(results_dir, summary)


@app.command()
def compare(
    dir_a: Annotated[str, typer.Argument(help="Results directory (or URI) A.")],
    dir_b: Annotated[str, typer.Argument(help="Results directory (or URI) B.")],
    metric: Annotated[
        list[str] | None,
        typer.Option(help="Metric to compare, repeatable (default: AUROCs, F1s, latency)."),
    ] = None,
    on: Annotated[
        list[str] | None,
        typer.Option(
            help="The key(s) that differ by design (e.g. augmentation, category); default: "
            "those constant within each output but different between them."
        ),
    ] = None,
    where: Annotated[
        list[str] | None,
        typer.Option(help="Filter both outputs first (as in `sweep results --where`)."),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """The same configurations of two outputs side by side: mean ± std in A and B, and B - A."""
    from sweep.read.compare import compare_outputs

    try:
        if fmt not in ("table", "json"):
            raise SweepError(f"--format {fmt!r}: table or json")
        result = compare_outputs(dir_a, dir_b, metrics=metric, on=on or (), where=where or ())
    except _user_errors() as exc:
        bad_input(exc)
    view.show_comparison(result, as_json=fmt == "json")


@app.command()
def cascade(
    results_dir: Annotated[
        str, typer.Argument(help="A study's results directory (or s3://, gs:// URI).")
    ],
    stage1_recall: Annotated[
        float,
        typer.Option(
            "--stage1-recall",
            help="Stage 1 of a cascade passes an image as good below the highest threshold "
            "that keeps at least this share of its validation anomalies.",
        ),
    ] = 0.99,
    max_members: Annotated[
        int, typer.Option(help="Most configurations in an OR, AND or average (2 or more).")
    ] = 3,
    precision: Annotated[
        float, typer.Option(help="The precision P of the recall-at-precision column.")
    ] = 0.95,
    objective: Annotated[
        str,
        typer.Option(help="What the front maximises against latency: f1 or recall (at P)."),
    ] = "f1",
    top: Annotated[
        int,
        typer.Option(help="Combine only the TOP configurations by mean validation AUROC."),
    ] = 8,
    limit: Annotated[
        int, typer.Option(help="The table shows the singles, the front and this many others.")
    ] = 15,
    fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """Two-stage cascades, OR / AND ensembles and normalised score averages of 2-3
    configurations from the per-image results: their recall at precision P, F1 and expected
    latency, on a Pareto front with the single configurations (thresholds from validation)."""
    from sweep.read.cascade import cascade_output

    try:
        if fmt not in ("table", "json"):
            raise SweepError(f"--format {fmt!r}: table or json")
        result = cascade_output(
            results_dir,
            min_precision=precision,
            stage1_recall=stage1_recall,
            max_members=max_members,
            top=top,
            objective=objective,
        )
    except SweepError as exc:  # only reads results: no data or model errors (nor torch)
        bad_input(exc)
    view.show_cascade(result, as_json=fmt == "json", limit=limit)


# --------------------------------------------------------------------------- catalogues


@app.command("models")
def list_models_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    matrix: Annotated[
        bool, typer.Option(help="Also print the model x backbone compatibility matrix.")
    ] = True,
    backbone: Annotated[
        str | None,
        typer.Option(
            "--backbone",
            help="Say for each detector whether it runs on this backbone, the layers it reads "
            "there, or why not (e.g. tf_efficientnet_lite0, the offline pretrained family).",
        ),
    ] = None,
) -> None:
    """List the detectors, their hyperparameters and the backbones each can use.

    Compatibility is judged with each detector's default layers (its backbone family's defaults
    where it has them), and at the backbone's native input size where it has one; a study checks
    its own layers and image sizes when it is validated.
    """
    import models
    from models.backbones import get_backbone, list_backbones

    if backbone is not None:
        try:
            get_backbone(backbone)
        except models.ModelError as error:
            bad_input(f"--backbone: {error}")
        _models_on_backbone(backbone, as_json)
        return
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
                "family_defaults": {
                    family: dict(values) for family, values in cls.family_defaults.items()
                },
            }
        )
    view.show_models(rows, backbones, as_json, matrix)


def _models_on_backbone(backbone: str, as_json: bool) -> None:
    """``sweep models --backbone NAME``: each detector on one backbone, with its layers there
    or the reason it refuses the pair."""
    import models
    from models.backbones import get_backbone
    from models.packaged import packaged_weights

    spec = get_backbone(backbone)
    rows = []
    for name in models.list_models():
        hps = models.hyperparameters(name)
        if "backbone" not in hps:
            rows.append({"name": name, "runs": None, "layers": None, "reason": "own network"})
            continue
        problem = models.backbone_problem(name, backbone, None, spec.input_size)
        layers = None
        if problem is None:
            resolved = models.trial_hyperparameters(name, {"backbone": backbone})
            chosen = resolved.get("layers", resolved.get("layer"))
            if chosen is not None:
                chosen = [chosen] if isinstance(chosen, str) else chosen
                layers = [f"{layer} ({spec.native(layer)})" for layer in chosen]
        rows.append({"name": name, "runs": problem is None, "layers": layers, "reason": problem})
    packaged = packaged_weights(backbone)
    package = packaged.distribution if packaged else None
    view.show_models_on_backbone(rows, backbone, spec.family, package, as_json)


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
    view.show_backbones(rows, as_json)


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
    from data.synthetic_glue import PARTS, GlueSetConfig, ensure_generated

    parts = part or sorted(PARTS)
    try:
        for name in parts:
            if name not in PARTS:
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
        with view.generation_progress() as start:
            for name in parts:
                path = ensure_generated(
                    output, name, config=config, seed=seed, progress=start(name)
                )
                view.generated(name, path)
    except _user_errors() as exc:
        bad_input(exc)


# --------------------------------------------------------------------------- weights


@weights_app.command("fetch")
def weights_fetch(
    study_files: Annotated[list[Path], typer.Argument(help="Study YAML file(s).")],
    to: Annotated[
        Path | None,
        typer.Option(
            help="Folder to write <backbone>.safetensors into (default: the study's weights_dir, "
            "else $ANOMALY_SWEEP_WEIGHTS_DIR, else ~/.cache/anomaly-sweep/weights)."
        ),
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a study key.")] = None,
) -> None:
    """Download the pretrained backbones the studies' trials can load (where there is internet)
    into a folder nodes share; files already there and valid are kept. Exit 1 if any failed."""
    from sweep.run.weights import fetch_studies

    try:
        # The downloads' progress bar shares stderr with the summary.
        report = fetch_studies(study_files, to, set_ or [], console=view.err)
    except _user_errors() as exc:
        bad_input(exc)
    view.show_weights_fetch(report)
    raise typer.Exit(1 if report.failed else 0)


@weights_app.command("list")
def weights_list(
    study_files: Annotated[list[Path], typer.Argument(help="Study YAML file(s).")],
    to: Annotated[Path | None, typer.Option(help="The weights folder (default as fetch).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a study key.")] = None,
) -> None:
    """List the backbones the studies need and what the weights folder holds for each."""
    from sweep.run.weights import list_weights

    try:
        folders = list_weights(study_files, to, set_ or [])
    except _user_errors() as exc:
        bad_input(exc)
    view.show_weights_list(folders)


# --------------------------------------------------------------------------- parts

ImagesOption = Annotated[
    Path, typer.Option("--images", help="Folder of generic images (searched recursively).")
]
PartOutOption = Annotated[Path, typer.Option("--out", help="The .safetensors file to write.")]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
SeedOption = Annotated[int, typer.Option(help="Seeds initialisation and every image draw.")]
DeviceOption = Annotated[
    str | None, typer.Option(help="cpu or cuda (default: cuda when available).")
]


def _check_part_output(out: Path, overwrite: bool) -> None:
    """Refuse a bad output path before hours of training, not after."""
    if out.suffix != ".safetensors":
        raise SweepError(f"--out {str(out)!r}: a part is written as a .safetensors file")
    if not out.parent.is_dir():
        raise SweepError(f"--out {str(out)!r}: folder {str(out.parent)!r} does not exist")
    if out.exists() and not overwrite:
        raise SweepError(f"--out {str(out)!r} already exists (pass --overwrite to replace it)")


def _make_part(out: Path, overwrite: bool, label: str, train: Any) -> None:
    """Check ``out``, run ``train(progress)`` under a progress bar, save the part it returns to
    ``out`` and print its summary; bad input exits 2."""
    try:
        _check_part_output(out, overwrite)
        with view.training_progress(label) as tick:
            part = train(tick)
        part.save(out)
    except _user_errors() as exc:
        bad_input(exc)
    note(f"{out}: {part.metadata['summary']}")


@parts_app.command("teacher")
def parts_teacher(
    images: ImagesOption,
    out: PartOutOption,
    backbone: Annotated[
        str, typer.Option(help="Pretrained CNN to distil from (the paper: wide_resnet101_2).")
    ] = "tf_efficientnet_lite0",
    weights: Annotated[
        Path | None,
        typer.Option(help="Local weights file or folder for the backbone (no download)."),
    ] = None,
    layer: Annotated[
        list[str] | None, typer.Option(help="Backbone layers read (default: layer2, layer3).")
    ] = None,
    size: Annotated[str, typer.Option(help="Teacher PDN: small or medium.")] = "small",
    channels: Annotated[int, typer.Option(help="Teacher output channels.")] = 384,
    image_size: Annotated[int, typer.Option(help="Teacher input side in pixels.")] = 256,
    steps: Annotated[int, typer.Option(help="Optimiser steps (the paper: 60000).")] = 60_000,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 16,
    norm_images: Annotated[
        int | None,
        typer.Option(help="Images for the target's channel statistics (default: up to 10000)."),
    ] = None,
    seed: SeedOption = 0,
    device: DeviceOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Distil EfficientAD's teacher PDN from a pretrained backbone on an image folder
    (EfficientAD, Algorithm 1): for efficient_ad.teacher_weights."""
    from models.teacher_distillation import distill_teacher

    _make_part(
        out,
        overwrite,
        "distilling",
        lambda tick: distill_teacher(
            images,
            backbone=backbone,
            layers=tuple(layer) if layer else ("layer2", "layer3"),
            weights=weights,
            model_size=size,
            out_channels=channels,
            image_size=image_size,
            steps=steps,
            batch_size=batch_size,
            norm_images=norm_images,
            seed=seed,
            device=device,
            progress=tick,
        ),
    )


@parts_app.command("dsr-vq")
def parts_dsr_vq(
    images: ImagesOption,
    out: PartOutOption,
    image_size: Annotated[int, typer.Option(help="Training image side in pixels.")] = 256,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 10_000,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 8,
    hidden_channels: Annotated[int, typer.Option(help="As dsr.hidden_channels.")] = 128,
    residual_channels: Annotated[int, typer.Option(help="As dsr.residual_channels.")] = 64,
    n_residual_layers: Annotated[int, typer.Option(help="As dsr.n_residual_layers.")] = 2,
    embedding_dim: Annotated[int, typer.Option(help="As dsr.embedding_dim.")] = 128,
    num_embeddings: Annotated[int, typer.Option(help="As dsr.num_embeddings.")] = 4096,
    seed: SeedOption = 0,
    device: DeviceOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Train DSR's general VQ-VAE on an image folder (ImageNet in the paper): for
    dsr.vq_weights. The sizes must be those of the DSR configurations that load it."""
    from models.dsr import train_general_vq

    _make_part(
        out,
        overwrite,
        "training",
        lambda tick: train_general_vq(
            images,
            image_size=image_size,
            steps=steps,
            batch_size=batch_size,
            hidden_channels=hidden_channels,
            residual_channels=residual_channels,
            n_residual_layers=n_residual_layers,
            embedding_dim=embedding_dim,
            num_embeddings=num_embeddings,
            seed=seed,
            device=device,
            progress=tick,
        ),
    )


@parts_app.command("textures")
def parts_textures(
    out: Annotated[Path, typer.Option("--out", help="The texture folder to create.")],
    images: Annotated[
        Path | None,
        typer.Option(help="Folder of images to cut tiles from (default: skimage's photographs)."),
    ] = None,
    tile_size: Annotated[int, typer.Option(help="Tile side in pixels.")] = 128,
    stride: Annotated[int | None, typer.Option(help="Step between tiles (default: half).")] = None,
    max_per_image: Annotated[
        int | None, typer.Option(help="At most this many tiles per image (random).")
    ] = None,
    seed: SeedOption = 0,
    overwrite: OverwriteOption = False,
) -> None:
    """Write a texture folder for draem/memseg/dsr.texture_dir from an image folder or
    scikit-image's photographs, with a manifest.json."""
    from data.textures import make_texture_folder

    try:
        manifest = make_texture_folder(
            out,
            images=images,
            tile_size=tile_size,
            stride=stride,
            max_per_image=max_per_image,
            seed=seed,
            overwrite=overwrite,
        )
    except _user_errors() as exc:
        bad_input(exc)
    note(f"{out}: {manifest['summary']}")


@parts_app.command("show")
def parts_show(
    path: Annotated[Path, typer.Argument(help="A part file or a texture folder.")],
) -> None:
    """Print what a part file or texture folder says of itself (JSON)."""
    from models.parts import file_sha256, read_manifest, read_part

    try:
        if path.is_dir():
            described = read_manifest(path)
            if described is None:
                raise SweepError(f"{str(path)!r}: a folder without a manifest.json")
            described = {k: v for k, v in described.items() if k != "files"}
        elif path.is_file():
            described = read_part(path) or {"metadata": None}
            described["sha256"] = file_sha256(path)
        else:
            raise SweepError(f"{str(path)!r} does not exist")
    except _user_errors() as exc:
        bad_input(exc)
    view.show_part(described)


# --------------------------------------------------------------------------- export / predict


@app.command("export")
def export_cmd(
    output: Annotated[str, typer.Argument(help="A study's results directory.")],
    pick: Annotated[
        str,
        typer.Option(
            help="knee (the report's chosen pick), kneedle, utopia, topsis, or a config hash "
            "(or a unique prefix of at least 6 characters)."
        ),
    ],
    to: Annotated[Path, typer.Option("--to", help="The artefact folder to write.")],
    seed: Annotated[
        int | None,
        typer.Option(help="Which of the configuration's seeds to refit (default: the lowest)."),
    ] = None,
    weights: Annotated[
        list[str] | None,
        typer.Option(help="TOPSIS weights, as `sweep report --weights` takes them."),
    ] = None,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="Write nothing and exit 1 when the refit does not reproduce the row's metrics.",
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing folder at --to.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print artefact.json.")] = False,
) -> None:
    """Refit the picked configuration, check it against its row, and write a deployable
    artefact folder (TorchScript, ONNX, weights, artefact.json): docs/deploy.md."""
    from sweep.deploy.export import export
    from sweep.read.report import parse_weights

    try:
        result = export(
            output,
            pick,
            to,
            seed=seed,
            weights=parse_weights(weights) or None,
            strict=strict,
            overwrite=overwrite,
        )
    except _user_errors() as exc:
        bad_input(exc)
    except RuntimeError as exc:  # --strict's mismatch, a TorchScript trace that differs
        view.err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    view.show_export(result, as_json)


@app.command("predict")
def predict_cmd(
    artefact: Annotated[Path, typer.Argument(help="An artefact folder from `sweep export`.")],
    images: Annotated[
        list[Path], typer.Argument(help="Image files and folders (searched recursively).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Where scores, masks and overlays go.")],
    backend: Annotated[
        str | None,
        typer.Option(
            help="onnx (default where the artefact has model.onnx), torchscript, or torch (the "
            "detector rebuilt from detector.safetensors)."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images scored at once.")] = 8,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Score images with an exported artefact alone (no study, no Ray): scores.parquet and
    scores.csv, a mask and a heatmap overlay per image. Exit status 0: every image scored;
    1: some could not be read (their rows say why); 2: bad input."""
    from sweep.deploy.predict import predict

    try:
        with view.predict_progress() as progress:
            summary = predict(
                artefact, images, out, backend=backend, batch_size=batch_size, progress=progress
            )
    except _user_errors() as exc:
        bad_input(exc)
    view.show_predict(summary, as_json)
    if summary.failed:
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
