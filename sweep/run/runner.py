"""Run a study on Ray Tune: a local ``ray.init`` or an existing cluster.

Grid and random studies are expanded on the driver, configurations already in the output are
dropped, and the rest go to Tune as one ``tune.grid_search`` over concrete trials. Optuna
studies go through ``OptunaSearch`` with a define-by-run space (so a model's hyperparameters are
only sampled for that model), single- or multi-objective. Every trial writes its own Parquet
row; Tune's own state lives under ``<output>/_tune``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import ray
import yaml
from ray import tune
from ray.tune import Callback, Stopper
from ray.tune.schedulers import ASHAScheduler
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from rich.console import Console

import models
from sweep.errors import SweepError
from sweep.read.examples import EXAMPLES_DIR
from sweep.results import ResultStore, hp_column_types, row_schema
from sweep.run.progress import SweepProgress
from sweep.run.resources import ClusterShape, merge_warnings, ray_resources, trial_resources
from sweep.run.search import (
    OPTUNA_JOURNAL,
    check_optuna_storage,
    finished_optuna_trials,
    optuna_searcher,
    optuna_storage,
    settle_stale_optuna_trials,
)
from sweep.run.space import SPLIT_KEYS, TRIAL_KEYS, Param, TrialConfig, split_key
from sweep.run.study import (
    Study,
    check_hyperparameters,
    config_hash,
    continuation_problem,
    data_changes,
    data_record,
    expand_trials,
    study_from_dict,
    study_to_yaml,
)
from sweep.run.trainable import Reporter, TrialContext, load_data, stopped_row, tune_trial
from sweep.run.weights import check_study_weights

TrialRunner = Callable[[TrialConfig, TrialContext, Reporter | None], dict[str, Any]]


@dataclass
class RunSummary:
    output: str
    run_id: str
    planned: int
    skipped: int
    ok: int = 0
    errors: int = 0
    stopped: int = 0
    """Trials the scheduler (ASHA) stopped early: a row with ``status="stopped"`` each."""
    lost: int = 0
    """Trials Tune gave up on (worker died more than ``max_failures`` times): no row."""
    interrupted: bool = False
    ray_start_s: float = 0.0
    sweep_s: float = 0.0
    error_rows: list[str] = field(default_factory=list)


def study_schema(study: Study):
    """The row schema of a study: the base columns and one ``hp.`` column per hyperparameter."""
    values: dict[str, list[Any]] = {}
    for model in study.models:
        for name, default in models.hyperparameters(model).items():
            values.setdefault(name, []).append(default)
    for key, param in study.space.items():
        if key in TRIAL_KEYS:
            continue
        name = split_key(key).name
        if name in values:
            values[name].extend(_param_values(param))
    return row_schema(hp_column_types(values))


def _param_values(param: Param) -> list[Any]:
    if param.kind in ("fixed", "grid", "choice"):
        return list(param.values)
    if param.kind == "int":
        return [int(param.low or 0), int(param.high or 0)]
    return [float(param.low or 0.0), float(param.high or 0.0)]


def check_ray_address(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail fast, with a message, on a Ray address that is malformed or where nothing answers.

    ``ray.init`` itself keeps retrying an unreachable address for minutes; a study should not
    wait that long to learn of a typo. No address (and ``local``) is left to Ray. ``auto`` is
    what ``ray.init`` reads for it: ``$RAY_ADDRESS``, else the address ``ray start`` recorded on
    this machine, which must answer (a stopped cluster leaves its record behind). Ray's last
    resort, any Ray process found in the process table, is not followed: that is another
    driver's private instance, not a cluster to join.
    """
    if not address or address == "local":
        return
    label = f"Ray address {address!r}"
    if address == "auto":
        resolved = _auto_address()
        if resolved is None:
            return
        label = f"--address auto (found {resolved!r})"
        address = resolved
    hostport = address.removeprefix("ray://")
    host, _, port_text = hostport.rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise SweepError(
            f"{label}: expected HOST:PORT (the head's GCS port, 6379 by "
            "default), ray://HOST:PORT (Ray Client, 10001) or 'auto'"
        )
    try:
        with socket.create_connection((host, int(port_text)), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        if label.startswith("--address auto"):
            raise SweepError(
                f"{label}: nothing answers on {host}:{port_text} ({reason}); the cluster "
                "`ray start` recorded there is gone: start one with `ray start --head`, or leave "
                "--address out to start a local Ray for this run"
            ) from None
        raise SweepError(
            f"cannot reach the Ray cluster at {address!r}: nothing answers on "
            f"{host}:{port_text} ({reason}); is the head node up (`ray status` on it) and the "
            "port open to this machine?"
        ) from None


def _auto_address() -> str | None:
    """The address ``auto`` stands for (see :func:`check_ray_address`); SweepError when there is
    none, None when this Ray's way of recording it is unknown (then Ray is left to look)."""
    environment = os.environ.get("RAY_ADDRESS")
    if environment and environment != "auto":
        return environment
    try:
        # Ray's own reading of the record, so that RAY_TMPDIR and TMPDIR move it as they move it
        # for ray.init; private, hence the fallback.
        from ray._common.utils import get_ray_address_file
        from ray._private.utils import read_ray_address

        record, recorded = get_ray_address_file(None), read_ray_address()
    except (ImportError, AttributeError, OSError):
        return None
    if not recorded:
        raise SweepError(
            f"--address auto: no Ray cluster runs on this machine (`ray start` records its "
            f"address in {record}, and there is none); start one with `ray start --head`, or "
            "leave --address out to start a local Ray for this run"
        )
    return recorded


def connect_ray(address: str | None = None, num_cpus: int | None = None) -> float:
    """Start or join Ray; return the seconds it took (0 when already connected)."""
    if ray.is_initialized():
        return 0.0
    address = address or os.environ.get("RAY_ADDRESS") or None
    start = time.perf_counter()
    try:
        if address:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
        else:
            ray.init(
                num_cpus=num_cpus or os.cpu_count(),
                include_dashboard=False,
                logging_level=logging.ERROR,
                log_to_driver=False,
            )
    except ConnectionError as exc:
        raise SweepError(f"cannot reach the Ray cluster at {address!r}: {exc}") from None
    return time.perf_counter() - start


FINAL_STATUSES = ("ok", "stopped")
"""Row statuses a re-run keeps; ``error`` rows are kept too unless errors are retried."""


def _asha_scheduler(study: Study):
    scheduler = study.scheduler
    assert scheduler is not None
    max_t = scheduler.max_t or study.search_space.max_epochs()
    if max_t is None:
        raise SweepError(
            "scheduler: set 'scheduler.max_t' or an 'epochs' value in the space (ASHA needs the "
            "longest training in epochs)"
        )
    return ASHAScheduler(
        time_attr="epoch",
        metric=scheduler.metric,
        mode=scheduler.direction,
        max_t=max_t,
        grace_period=min(scheduler.grace_period, max_t),
        reduction_factor=scheduler.reduction_factor,
    )


class _StoppedTrialRows(Callback):
    """Writes the row of every trial the scheduler stops (its worker is stopped mid-training)."""

    def __init__(self, ctx: TrialContext):
        self.ctx = ctx

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        if not result.get("done") or "status" in result or "trial" not in trial.config:
            return
        config = TrialConfig.from_dict(trial.config["trial"])
        row = stopped_row(config, self.ctx, trial.trial_id, result)
        ResultStore(self.ctx.output).write_row(row, self.ctx.schema)


class _TrialRequest:
    """Each trial's Ray resources: its detector's default for its backbone and image size,
    overridden by the study (a class rather than a closure: Tune pickles it)."""

    def __init__(self, study: Study, cluster: ClusterShape):
        self.study = study
        self.cluster = cluster

    def __call__(self, config: dict[str, Any]) -> dict[str, float]:
        if "trial" in config:
            trial = TrialConfig.from_dict(config["trial"])
        else:
            trial = self.study.search_space.resolve_sampled(config)
        return ray_resources(trial_resources(self.study, trial, self.cluster))


STUDY_COPY = "_study.yaml"
"""The validated study a run saves under its output: what ``sweep resume OUTPUT`` runs."""


DATA_RECORD = "_data.json"
"""What the run recorded of its data set's content (``sweep.run.study.data_record``)."""

ON_DATA_CHANGE = ("refuse", "rerun")
"""What a run does when the data set changed since the output's rows were made."""


def _write_study_copy(store: ResultStore, study: Study) -> None:
    store.write_file(STUDY_COPY, study_to_yaml(study).encode())


def read_study_copy(output: str) -> Study:
    """The study saved under ``output`` by the run that made it (local path or URI)."""
    store = ResultStore(output)
    store.check_reachable()
    saved = _saved_study(store)
    if saved is None:
        raise SweepError(
            f"output {store.uri!r}: no study copy ({STUDY_COPY}) there; it is not the output "
            "of a `sweep run` (give `sweep run STUDY.yaml --output ...` instead)"
        )
    return saved


def _saved_study(store: ResultStore) -> Study | None:
    """The study copy under the output, validated; None when there is none."""
    data = store.read_file(STUDY_COPY)
    source = f"{store.uri.rstrip('/')}/{STUDY_COPY}"
    if data is None:
        return None
    try:
        raw = yaml.safe_load(data.decode())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SweepError(f"{source}: the study copy is not readable YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{source}: the study copy is not a study mapping")
    return study_from_dict(raw, source=source)


def check_same_study(study: Study, store: ResultStore) -> None:
    """One output holds one study: refuse (before anything is written) a study that is not a
    continuation of the one the output holds (``sweep.run.study.continuation_problem``): its
    rows would mix with the other's, and the report draw one front over both."""
    saved = _saved_study(store)
    if saved is None:
        return
    problem = continuation_problem(saved, study)
    if problem is None:
        return
    raise SweepError(
        f"output {store.uri!r} holds study {saved.name!r} ({STUDY_COPY}); this run's study "
        f"{study.name!r} is another: {problem}. One output holds one study: give this run "
        "another --output, or "
        f"continue that study (`sweep resume {store.uri}`, or the same name, data set, "
        "evaluation and objectives with a space that only adds trials)"
    )


def check_data_unchanged(
    study: Study, store: ResultStore, on_data_change: str = "refuse"
) -> tuple[dict[str, Any], bool]:
    """The data record of this run (``sweep.run.study.data_record``), and whether the output's
    rows must be made again: its rows came from a data set whose content has changed since
    (files added, removed, modified). ``on_data_change``: ``refuse`` (exit 2, saying what
    changed) or ``rerun`` (every trial again, the old rows replaced). An output without a
    record (made before records existed) takes this run's."""
    _check_on_data_change(on_data_change)
    record = data_record(study.dataset)
    data = store.read_file(DATA_RECORD)
    if data is None:
        return record, False
    try:
        saved = json.loads(data)
        fingerprint = saved["fingerprint"]
    except (ValueError, KeyError, TypeError):
        raise SweepError(
            f"{store.uri.rstrip('/')}/{DATA_RECORD}: not a data record this version reads "
            "(remove it to take the data as it is now)"
        ) from None
    if fingerprint == record["fingerprint"] or not store.statuses():
        return record, False
    if on_data_change == "rerun":
        if study.search.algorithm == "optuna" and study.search.storage_kind == "url":
            raise SweepError(
                f"--on-data-change rerun: study {study.name!r} keeps its Optuna trials in "
                f"{study.search.storage!r}, which this run cannot clear; give another --output "
                "(and storage)"
            )
        return record, True
    raise SweepError(
        f"data set {record['data']} changed since the rows of output {store.uri!r} were made "
        f"from it: {data_changes(saved, record)}. Those rows would not describe this data: "
        "give another --output, or pass --on-data-change rerun to run every trial again on the "
        "data as it is now (the old rows are replaced)"
    )


def _check_on_data_change(on_data_change: str) -> None:
    if on_data_change not in ON_DATA_CHANGE:
        raise SweepError(
            f"--on-data-change {on_data_change!r}: expected one of {', '.join(ON_DATA_CHANGE)}"
        )


class _Interrupt:
    """Ctrl-C during a sweep: the first SIGINT asks Tune to stop every trial (through a
    :class:`Stopper`), the second one raises KeyboardInterrupt at once.

    Module-level state rather than attributes: Tune pickles its stopper with the experiment.
    """

    requested = threading.Event()

    @classmethod
    @contextlib.contextmanager
    def handling(cls) -> Iterator[None]:
        cls.requested.clear()
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers belong to the main thread; Tune's own then applies
            return
        previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum: int, frame: Any) -> None:
            if cls.requested.is_set():
                raise KeyboardInterrupt
            cls.requested.set()

        # Tune would install its own handler (which saves its experiment state for a Tune
        # restore that this engine does not use); the output is the state here.
        saved_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
            if saved_env is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = saved_env


class _StopOnInterrupt(Stopper):
    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        return _Interrupt.requested.is_set()


def _check_output_shared(store: ResultStore, timeout_s: float = 120.0) -> None:
    """On a cluster of several nodes, a local output must be a folder every node sees (NFS,
    EFS, a shared mount): each trial writes its row where it runs. A marker written here must
    be visible on every alive node, or the run stops before any trial."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not store.local or len(nodes) < 2:
        return
    marker = f"_nodes-see-{os.getpid()}-{time.time_ns()}"
    store.write_file(marker, b"")
    path = f"{store.root}/{marker}"
    try:
        sees = ray.remote(num_cpus=0, max_retries=0)(os.path.exists)
        pending = {
            n["NodeManagerAddress"] + f" ({n['NodeID'][:8]})": sees.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(path)
            for n in nodes
        }
        ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=timeout_s)
        blind = [node for node, ref in pending.items() if ref in ready and not _node_sees(ref)]
    finally:
        with contextlib.suppress(OSError):
            store.fs.delete_file(path)
    if blind:
        raise SweepError(
            f"output {store.uri!r} is a folder on this machine's disk that Ray node(s) "
            f"{', '.join(blind)} do not see; every node writes its trials' rows there, so give a "
            "folder on storage every node mounts (NFS, EFS) or a URI (s3://..., gs://...)"
        )


def _node_sees(ref: Any) -> bool:
    try:
        return bool(ray.get(ref))
    except Exception:  # the node went away meanwhile: Tune's business, not the output's
        return True


def front_config_hashes(study: Study, rows) -> set[str]:
    """Config hashes (every seed) of the configurations on the Pareto front of ``study``'s
    objectives, clean variants only, as ``sweep report`` and ``sweep export`` select them."""
    from sweep.read import analysis

    ok = rows[rows["status"] == "ok"] if len(rows) else rows
    ok = ok[analysis.clean_mask(ok)]
    if ok.empty:
        return set()
    objectives = [(o.metric, o.direction) for o in study.objectives]
    agg = analysis.aggregate_seeds(ok, [m for m, _ in objectives])
    table = analysis.select(agg, objectives).table
    columns = [c for c in analysis.config_columns(ok) if c in agg.columns]
    front = {
        analysis.config_key(table.loc[i], columns)
        for i in table.index[table["on_front"].astype(bool)]
    }
    return {
        str(r["config_hash"])
        for r in ok.to_dict(orient="records")
        if analysis.config_key(r, columns) in front
    }


def prune_kept_models(study: Study, store: ResultStore) -> int:
    """Remove the kept detectors of configurations off the Pareto front (``keep_models:
    front``); return how many. Every seed of a front configuration stays."""
    kept = store.kept_models()
    if not kept:
        return 0
    keep = front_config_hashes(study, store.read().to_pandas())
    dropped = [h for h in kept if h not in keep]
    for digest in dropped:
        store.remove_model(digest)
    return len(dropped)


def _most_labelled_defects(study: Study) -> int | None:
    """The largest ``labelled_defects`` any key of the space gives (shared or per model), or
    None when the study labels none."""
    values = []
    for key, param in study.search_space.params.items():
        if split_key(key).name != "labelled_defects":
            continue
        given = param.options() if param.is_enumerable else (param.high,)
        values += [int(v) for v in given if v is not None]
    return max(values) if values and max(values) > 0 else None


def _splits_to_check(study: Study) -> list[tuple[int | None, float | None]]:
    """The (split seed, test share) pairs the data pre-flight draws: the data set's own split,
    or one redrawn split per test share the space gives (a share too large for the data fails
    there, before any trial). Split seeds change which images go where, not how many."""
    params = study.search_space.params
    if not any(key in params for key in SPLIT_KEYS):
        return [(None, None)]
    param = params.get("test_fraction")
    if param is None:
        fractions: list[float | None] = [None]
    elif param.is_enumerable:
        fractions = [None if v is None else float(v) for v in param.options()]
    else:
        fractions = [float(param.high)] if param.high is not None else [None]
    return [(study.dataset.seed, f) for f in dict.fromkeys(fractions)]


def run_study(
    study: Study,
    *,
    output: str | None = None,
    address: str | None = None,
    retry_errors: bool = False,
    num_cpus: int | None = None,
    trial_runner: TrialRunner | None = None,
    preflight: bool = True,
    console: Console | None = None,
    on_data_change: str = "refuse",
) -> RunSummary:
    """Run every trial of ``study`` that its output does not hold yet; return a summary.

    Safe to run again after any interruption (Ctrl-C, a killed driver, a lost node): finished
    trials are files named by their configuration, so they are skipped, never repeated. An
    output holds one study (:func:`check_same_study`) made from one state of its data set
    (:func:`check_data_unchanged`, ``on_data_change``): both are checked before anything is
    written.
    """
    # Tune's own status boxes would fight with the progress display; ours reports every trial.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

    console = console or Console(stderr=True)
    _check_on_data_change(on_data_change)
    output = output or study.output_dir
    store = ResultStore(output)
    # An address given to this run is checked even where Ray is already up (a notebook, a
    # test session): a typo should not pass silently because another connection exists.
    if address or not ray.is_initialized():
        check_ray_address(address or os.environ.get("RAY_ADDRESS"))
    check_hyperparameters(study)
    # Where the results go is checked before the (possibly long) data pre-flight.
    check_optuna_storage(study, store)
    store.check_reachable()
    check_same_study(study, store)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")

    if preflight:
        # A weights folder the user named must hold every pretrained backbone (exit 2 if not).
        check_study_weights(study)
        # Data problems are the user's to fix: fail before any trial starts (exit 2), and make
        # the synthetic data set once here rather than in every worker at the same time.
        for size in study.search_space.image_sizes():
            labelled = _most_labelled_defects(study)
            for split_seed, test_fraction in _splits_to_check(study):
                with console.status(f"preparing data ({study.dataset.kind}, {size}px)"):
                    splits = load_data(study, size, "none", split_seed, test_fraction)
                    if labelled:
                        # The largest labelled split takes the most test defects: if the data
                        # holds enough for it, it holds enough for every smaller one.
                        load_data(study, size, "none", split_seed, test_fraction, labelled)
                share = "" if test_fraction is None else f" (test share {test_fraction:g})"
                console.print(f"data: {splits.describe()}{share}")
    record, replace_rows = check_data_unchanged(study, store, on_data_change)

    store.check_writable()
    with store.lock():
        if replace_rows:
            removed = store.remove_results((EXAMPLES_DIR, OPTUNA_JOURNAL.split("/")[0]))
            console.print(
                f"data set {record['data']} changed: the {removed} row(s) made from it before "
                "are removed and every trial runs again (--on-data-change rerun)"
            )
        store.write_file(DATA_RECORD, json.dumps(record, indent=1, sort_keys=True).encode())
        summary = _run_locked(
            study,
            store,
            run_id=run_id,
            address=address,
            retry_errors=retry_errors,
            num_cpus=num_cpus,
            trial_runner=trial_runner,
            console=console,
        )
        if study.evaluation.keep_models == "front":
            dropped = prune_kept_models(study, store)
            if dropped:
                console.print(
                    f"kept models: {dropped} off the Pareto front removed "
                    "(evaluation.keep_models: front)"
                )
        return summary


def _run_locked(
    study: Study,
    store: ResultStore,
    *,
    run_id: str,
    address: str | None,
    retry_errors: bool,
    num_cpus: int | None,
    trial_runner: TrialRunner | None,
    console: Console,
) -> RunSummary:
    """The run itself, while this driver holds the output."""
    # What a driver killed mid-write left: temporary row files (never visible to Parquet
    # readers, but clutter), a torn Optuna journal record (repaired in optuna_storage).
    store.remove_temporary_files()
    _write_study_copy(store, study)
    ctx = TrialContext(
        study=study,
        output=store.root if store.local else store.uri,
        run_id=run_id,
        schema=study_schema(study),
        retry_errors=retry_errors,
        trial_runner=trial_runner,
    )
    storage = None
    if study.search.algorithm == "optuna":
        storage = optuna_storage(study, store)
        completed, failed = settle_stale_optuna_trials(study, storage, store)
        if completed or failed:
            console.print(
                f"optuna: {completed + failed} trial(s) of an interrupted run closed: "
                f"{completed} from their rows, {failed} failed (they run anew)"
            )
        planned = study.search.n_trials or 0
        pending: list[TrialConfig] = []
        # A re-run resumes the Optuna study: its sampler learns from the finished trials and
        # only the rest of n_trials run.
        skipped = min(planned, finished_optuna_trials(study, storage))
    else:
        trials = expand_trials(study)
        planned = len(trials)
        done = store.statuses()
        keep = FINAL_STATUSES if retry_errors else (*FINAL_STATUSES, "error")
        pending = [t for t in trials if done.get(config_hash(study, t)) not in keep]
        skipped = planned - len(pending)
    summary = RunSummary(output=store.uri, run_id=run_id, planned=planned, skipped=skipped)
    if (study.search.algorithm != "optuna" and not pending) or planned == skipped:
        console.print(f"all {planned} trials of {study.name!r} are already in {store.uri}")
        return summary

    started_ray = not ray.is_initialized()
    try:
        summary.ray_start_s = connect_ray(address, num_cpus)
        _check_output_shared(store)
        _tune(study, store, ctx, summary, pending, storage, console)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the trials started
        summary.interrupted = True
    finally:
        if summary.interrupted and started_ray and ray.is_initialized():
            # Trials still running are stopped with the Ray instance this run started.
            ray.shutdown()
    return summary


def _tune(
    study: Study,
    store: ResultStore,
    ctx: TrialContext,
    summary: RunSummary,
    pending: list[TrialConfig],
    storage: Any,
    console: Console,
) -> None:
    planned, skipped = summary.planned, summary.skipped
    cluster = ClusterShape.from_ray()
    warnings: list[str] = []
    for trial in pending:
        trial_resources(study, trial, cluster, warnings)
    for line in merge_warnings(warnings):
        console.print(f"[yellow]resources:[/yellow] {line}")
    request = _TrialRequest(study, cluster)
    trainable = tune.with_resources(tune.with_parameters(tune_trial, ctx=ctx), request)
    scheduler = None
    callbacks: list[Callback] = []
    if study.scheduler is not None:
        scheduler = _asha_scheduler(study)
        callbacks.append(_StoppedTrialRows(ctx))
        # Results without the scheduler's metric (epochs between validations, the final
        # summary) are expected; ASHA ignores them.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"

    if study.search.algorithm == "optuna":
        param_space: dict[str, Any] = {}
        total = planned - skipped
        tune_config = tune.TuneConfig(
            search_alg=optuna_searcher(study, storage, finished=skipped),
            num_samples=total,
            max_concurrent_trials=study.max_concurrent,
            reuse_actors=True,
        )
    else:
        param_space = {"trial": tune.grid_search([t.to_dict() for t in pending])}
        tune_config = tune.TuneConfig(
            max_concurrent_trials=study.max_concurrent, reuse_actors=True, scheduler=scheduler
        )
        total = len(pending)

    progress = SweepProgress(total=total, objectives=list(study.objectives), console=console)
    # Tune's experiment state goes beside the rows, through the output's own filesystem (an
    # object store's client and credentials included), so no node needs the driver's disk.
    tune_dir = f"{store.root.rstrip('/')}/_tune"
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune_config,
        run_config=tune.RunConfig(
            name=f"{study.name}-{ctx.run_id}",
            storage_path=tune_dir,
            storage_filesystem=None if store.local else store.fs,
            failure_config=tune.FailureConfig(max_failures=study.failure.max_failures),
            callbacks=[*callbacks, progress],
            stop=_StopOnInterrupt(),
            verbose=0,
        ),
    )
    console.print(
        f"running {total} trial(s) of {study.name!r}"
        + (f" ({skipped} already done)" if skipped else "")
        + f" -> {store.uri}"
    )
    start = time.perf_counter()
    grid = None
    try:
        with progress, _Interrupt.handling():
            grid = tuner.fit()
    finally:
        summary.sweep_s = time.perf_counter() - start
        summary.ok, summary.errors = progress.ok, progress.errors
        summary.stopped = progress.stopped
        summary.error_rows = progress.error_messages
        summary.interrupted = _Interrupt.requested.is_set()
        if grid is not None:
            summary.lost = sum(1 for r in grid if r.error is not None)
