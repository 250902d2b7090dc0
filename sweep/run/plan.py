"""``sweep plan``: what a study would run, with what, for how long, before running anything.

:func:`plan_study` lists the study's trials (a grid or random study's own; for an Optuna study
its ``n_trials`` spread evenly over the configurations its space can produce), gives each its
resources (:func:`sweep.run.resources.trial_resources`) and an estimated duration, and packs them
onto the cluster in a small simulation to estimate the wall-clock time. Nothing is trained, no
data is loaded and Ray is not started.

Durations come from measured rows when there are some (``history``: a results directory or its
rows) for the same configuration, or for the same model, backbone and image size (scaled to the
trial's epochs and training images) on the same kind of device; otherwise from a cost model: the
work of the whole fit and evaluation (:meth:`Detector.fit_work`, :meth:`Detector.predict_work`:
FLOPs, memory traffic and optimiser steps counted on the meta device) over the device's speed
(:class:`DeviceSpeed`: CPU constants fitted to ``bench/resources.py``, GPU ones assumed) plus
:data:`TRIAL_OVERHEAD_S`. Every estimate says where it came from.

The packing is a first-fit-decreasing list schedule: whenever resources free up, the pending
trials, largest GPU share (then CPUs, then duration) first, each go to the first node with room:
a GPU share up to 1 on one GPU with that much left (as Ray places fractional GPUs), whole GPUs
on free GPUs, CPUs and memory on the same node, ``max_concurrent`` respected. Ray Tune starts
trials in its own order, so this is an estimate of the makespan, not a schedule.
"""

from __future__ import annotations

import math
import numbers
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import models
from models.costs import Work
from models.errors import ModelError
from sweep.errors import StudyError
from sweep.results import read_results
from sweep.run.resources import (
    ClusterShape,
    ResourceRequest,
    merge_warnings,
    study_image_counts,
    trial_resources,
)
from sweep.run.study import (
    Study,
    TrialConfig,
    config_hash,
    expand_trials,
    load_study,
)

__all__ = [
    "CPU_GBPS_PER_THREAD",
    "CPU_GFLOPS_PER_THREAD",
    "GPU_GBPS",
    "GPU_TFLOPS",
    "TRIAL_OVERHEAD_S",
    "DeviceSpeed",
    "Packing",
    "StudyPlan",
    "TrialGroup",
    "TrialPlan",
    "group_trials",
    "make_plan",
    "pack_trials",
    "plan_study",
]

CPU_GFLOPS_PER_THREAD = 84.0
"""Arithmetic speed of one CPU thread on convolutions and matrix products (GFLOP/s)."""
CPU_GBPS_PER_THREAD = 10.0
"""Memory traffic one CPU thread sustains through element-wise work (GB/s)."""
CPU_STEP_S = 0.0
"""Fixed cost of one optimiser step on the CPU beyond its FLOPs and traffic (s): the fit finds
none, it is lost in the optimiser's memory traffic."""
GPU_TFLOPS = 10.0
"""Arithmetic speed of one trial on a GPU (TFLOP/s): fp32 training of small networks at batch
32 reaches a fraction of a card's peak (19.5 TFLOP/s fp32 on an A100, 82 on an RTX 4090, 67 on
an H100); an assumption, not a measurement (no GPU was at hand, ``docs/resources.md``)."""
GPU_GBPS = 1000.0
"""Memory traffic of one trial on a GPU (GB/s): about half of an A100's or RTX 4090's HBM/GDDR
bandwidth; an assumption like ``GPU_TFLOPS``."""
GPU_STEP_S = 0.003
"""Fixed cost of one optimiser step on a GPU: a few hundred kernel launches (s)."""
TRIAL_OVERHEAD_S = 3.0
"""Seconds per trial beyond its work: building the detector, the data set from the worker's
cache, the result row (the quickstart's rows: 4-7 s of wall time beyond ``train_s``, evaluation
included)."""
# The CPU constants are fitted to ``bench/resources.py`` (every detector, steady-state epochs,
# 128 px, batch 8, one thread); see docs/resources.md for the fit and its residuals. Trials
# sharing a GPU are assumed not to slow each other, and CPU speed to grow linearly with threads.


@dataclass(frozen=True)
class DeviceSpeed:
    """How fast a trial's device does each kind of work."""

    flops_per_s: float
    bytes_per_s: float
    step_s: float

    @classmethod
    def cpu(cls, threads: float) -> DeviceSpeed:
        n = max(1, int(threads))
        return cls(CPU_GFLOPS_PER_THREAD * 1e9 * n, CPU_GBPS_PER_THREAD * 1e9 * n, CPU_STEP_S)

    @classmethod
    def gpu(cls) -> DeviceSpeed:
        return cls(GPU_TFLOPS * 1e12, GPU_GBPS * 1e9, GPU_STEP_S)

    def seconds(self, work: Work) -> float:
        """Time of ``work``: arithmetic, traffic and step overheads added (a roofline would
        take the larger of the first two; added, they fit the measured epochs better)."""
        return (
            work.flops / self.flops_per_s
            + work.traffic_bytes / self.bytes_per_s
            + work.steps * self.step_s
        )


@dataclass(frozen=True)
class TrialPlan:
    """One planned trial."""

    trial: TrialConfig
    request: ResourceRequest
    seconds: float
    """Estimated wall time of the trial, evaluation included."""
    source: str
    """Where ``seconds`` came from: ``history (same config)``, ``history (model/backbone/size)``
    or ``model``."""

    @property
    def device(self) -> str:
        return "gpu" if self.request.gpu > 0 else "cpu"

    def to_dict(self) -> dict[str, Any]:
        return {
            "trial": self.trial.to_dict(),
            "resources": {
                "gpu": self.request.gpu,
                "cpu": self.request.cpu,
                "memory_gb": self.request.memory_gb,
                "gpu_memory_gb": self.request.gpu_memory_gb,
            },
            "device": self.device,
            "estimate_s": round(self.seconds, 2),
            "estimate_source": self.source,
        }


@dataclass(frozen=True)
class Packing:
    """The outcome of packing the trials onto the cluster."""

    makespan_s: float
    """Estimated wall time of the whole study."""
    max_concurrent: int
    """Most trials running at once."""
    mean_concurrent: float
    """Trials running at once, averaged over the makespan."""
    gpu_utilisation: float
    """Share of the cluster's GPU capacity the trials hold, averaged over the makespan (0 on a
    cluster without GPUs)."""
    cpu_utilisation: float
    """Share of the cluster's CPUs the trials hold, averaged over the makespan."""
    unschedulable: tuple[int, ...] = ()
    """Indices of trials that fit on no node (left out of the simulation)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "makespan_s": round(self.makespan_s, 1),
            "max_concurrent": self.max_concurrent,
            "mean_concurrent": round(self.mean_concurrent, 2),
            "gpu_utilisation": round(self.gpu_utilisation, 3),
            "cpu_utilisation": round(self.cpu_utilisation, 3),
            "unschedulable": list(self.unschedulable),
        }


@dataclass(frozen=True)
class StudyPlan:
    """Everything ``sweep plan`` shows."""

    study: str
    algorithm: str
    cluster: ClusterShape
    trials: tuple[TrialPlan, ...]
    packing: Packing
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    configurations: int = 0
    """Distinct configurations (for an Optuna study, those its space can produce)."""

    @property
    def serial_s(self) -> float:
        """The trials' estimates added up: the wall time one at a time."""
        return sum(t.seconds for t in self.trials)

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "algorithm": self.algorithm,
            "cluster": {
                "source": self.cluster.source,
                "description": self.cluster.describe(),
                "nodes": [
                    {
                        "name": n.name,
                        "cpus": n.cpus,
                        "gpus": n.gpus,
                        "gpu_memory_gb": n.gpu_memory_gb,
                        "memory_gb": None if math.isinf(n.memory_gb) else round(n.memory_gb, 2),
                    }
                    for n in self.cluster.nodes
                ],
            },
            "n_trials": len(self.trials),
            "configurations": self.configurations,
            "serial_s": round(self.serial_s, 1),
            "packing": self.packing.to_dict(),
            "trials": [t.to_dict() for t in self.trials],
            "warnings": list(self.warnings),
            "notes": list(self.notes),
        }


# ----------------------------------------------------------------------------- trials


# ----------------------------------------------------------------------------- estimates


def _device_kind(device: Any) -> str:
    return "cpu" if str(device).lower() in ("cpu", "", "none", "nan") else "gpu"


def _history_rows(history: Any) -> list[dict[str, Any]]:
    """Finished rows of ``history`` (a results directory, a DataFrame or row mappings)."""
    if history is None:
        return []
    if isinstance(history, str | Path):
        frame = read_results(history)
        rows = frame.to_dict("records") if len(frame) else []
    elif hasattr(history, "to_dict"):
        rows = history.to_dict("records")
    else:
        rows = [dict(row) for row in history]
    return [
        row
        for row in rows
        if row.get("status", "ok") == "ok"
        and row.get("model")
        and _finite(row.get("train_s"))
        and _finite(row.get("image_size"))
    ]


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _wall_s(row: Mapping[str, Any]) -> float:
    """A row's wall time: started to finished when recorded, else its training time plus the
    overhead."""
    started, finished = row.get("started_at"), row.get("finished_at")
    try:
        seconds = (finished - started).total_seconds()
        if math.isfinite(seconds) and seconds > 0:
            return seconds
    except (TypeError, AttributeError, ValueError):
        pass
    return float(row["train_s"]) + TRIAL_OVERHEAD_S


def _scaled_wall_s(row: Mapping[str, Any], epochs: int | None, n_train: int) -> float:
    """A similar row's wall time with its training part scaled to the trial's epochs and
    training images."""
    scale = 1.0
    ran = row.get("epochs_run")
    if epochs and _finite(ran) and ran > 0:
        scale *= epochs / float(ran)
    if _finite(row.get("n_train")) and row["n_train"] > 0:
        scale *= n_train / float(row["n_train"])
    train = float(row["train_s"])
    return max(0.0, _wall_s(row) - train) + train * scale


def _trial_epochs(trial: TrialConfig) -> int | None:
    cls = models.get_class(trial.model)
    if cls.learning_type == "one_pass":
        return None
    if trial.epochs is not None:
        return trial.epochs
    default = models.hyperparameters(trial.model).get("epochs")
    return int(default) if isinstance(default, int) else None


class _Estimator:
    """Seconds per trial, from history where it has the configuration, else from the model."""

    def __init__(self, study: Study, history: Any):
        self.study = study
        self.n_train, self.n_eval = study_image_counts(study)
        self.by_hash: dict[tuple[str, str], list[float]] = {}
        self.by_kind: dict[tuple[str, str | None, int, str], list[Mapping[str, Any]]] = {}
        for row in _history_rows(history):
            device = _device_kind(row.get("device"))
            if row.get("config_hash"):
                self.by_hash.setdefault((row["config_hash"], device), []).append(_wall_s(row))
            backbone = row.get("backbone")
            backbone = None if backbone is None or backbone != backbone else str(backbone)
            key = (str(row["model"]), backbone, int(row["image_size"]), device)
            self.by_kind.setdefault(key, []).append(row)

    def seconds(self, trial: TrialConfig, request: ResourceRequest) -> tuple[float, str]:
        device = "gpu" if request.gpu > 0 else "cpu"
        same = self.by_hash.get((config_hash(self.study, trial), device))
        if same:
            return statistics.median(same), "history (same config)"
        similar = self.by_kind.get((trial.model, trial.backbone, trial.image_size, device))
        if similar:
            epochs = _trial_epochs(trial)
            times = [_scaled_wall_s(row, epochs, self.n_train) for row in similar]
            return statistics.median(times), "history (model/backbone/size)"
        try:
            return self.model_seconds(trial, request), "model"
        except ModelError:  # trial_resources has warned: the trial will fail on its own
            return TRIAL_OVERHEAD_S, "unknown"

    def model_seconds(self, trial: TrialConfig, request: ResourceRequest) -> float:
        """The work of fit and evaluation over the device's assumed speed, plus overhead."""
        study = self.study
        cls = models.get_class(trial.model)
        batch = study.evaluation.batch_sizes(trial.model)[0]
        args = (trial.backbone, trial.hparams, trial.image_size)
        fit = cls.fit_work(*args, n_train=self.n_train, epochs=trial.epochs, batch_size=batch)
        predict = cls.predict_work(*args, n_train=self.n_train, batch_size=batch)
        evaluation = study.evaluation
        scored = self.n_eval + 4 * evaluation.batch_sizes(trial.model)[1]  # splits, throughput
        scheduler = study.scheduler
        epochs = _trial_epochs(trial)
        if scheduler is not None and epochs and scheduler.metric.startswith("val_"):
            validation = self.n_eval // 2  # the validation split, every eval_every epochs
            scored += validation * (epochs // scheduler.eval_every)
        # Latency: batch-1 calls after warm-up, each at least a step's overhead (a GPU's kernel
        # launches).
        latency_calls = evaluation.latency_warmup + evaluation.latency_repeats
        speed = DeviceSpeed.gpu() if request.gpu > 0 else DeviceSpeed.cpu(request.cpu)
        latency = latency_calls * max(speed.seconds(predict), speed.step_s)
        return TRIAL_OVERHEAD_S + speed.seconds(fit + predict * scored) + latency


# ----------------------------------------------------------------------------- packing


@dataclass
class _NodeState:
    cpus: float
    memory_gb: float
    gpus: list[float]
    """Free share of each GPU."""


def _fits(node: _NodeState, request: ResourceRequest) -> list[int] | None:
    """The GPUs ``request`` would take on ``node`` (empty for a CPU trial), or None."""
    eps = 1e-9
    if request.cpu > node.cpus + eps or request.memory_gb > node.memory_gb + eps:
        return None
    if request.gpu <= 0:
        return []
    if request.gpu <= 1:
        share = next((i for i, free in enumerate(node.gpus) if free + eps >= request.gpu), None)
        return None if share is None else [share]
    whole = [i for i, free in enumerate(node.gpus) if free >= 1 - eps]
    return whole[: int(request.gpu)] if len(whole) >= request.gpu else None


def pack_trials(
    requests: Sequence[ResourceRequest],
    seconds: Sequence[float],
    cluster: ClusterShape,
    max_concurrent: int | None = None,
) -> Packing:
    """Simulate running trials with these requests and durations on ``cluster`` (see the
    module docstring)."""

    def fresh() -> list[_NodeState]:
        return [
            _NodeState(
                n.cpus, n.memory_gb, [1.0] * int(n.gpus) + ([n.gpus % 1] if n.gpus % 1 else [])
            )
            for n in cluster.nodes
        ]

    empty = fresh()
    unschedulable = tuple(
        i for i, r in enumerate(requests) if all(_fits(node, r) is None for node in empty)
    )
    excluded = set(unschedulable)
    pending = sorted(
        (i for i in range(len(requests)) if i not in excluded),
        key=lambda i: (-requests[i].gpu, -requests[i].cpu, -seconds[i], i),
    )
    nodes = fresh()
    limit = max_concurrent or len(requests) or 1
    now = peak = 0
    held_gpu = held_cpu = busy = 0.0
    running: list[tuple[float, int, int, list[int]]] = []  # (end, trial, node, its GPUs)
    while pending or running:
        for index in list(pending):  # first fit, in decreasing order
            if len(running) >= limit:
                break
            request = requests[index]
            for n, node in enumerate(nodes):
                gpus = _fits(node, request)
                if gpus is None:
                    continue
                node.cpus -= request.cpu
                node.memory_gb -= request.memory_gb
                for g in gpus:
                    node.gpus[g] -= min(request.gpu, 1.0)
                running.append((now + seconds[index], index, n, gpus))
                pending.remove(index)
                break
        peak = max(peak, len(running))
        end = min(item[0] for item in running)
        span = end - now
        held_gpu += span * sum(requests[i].gpu for _, i, _, _ in running)
        held_cpu += span * sum(requests[i].cpu for _, i, _, _ in running)
        busy += span * len(running)
        now = end
        for item in [item for item in running if item[0] <= now]:
            running.remove(item)
            _, index, n, gpus = item
            node, request = nodes[n], requests[index]
            node.cpus += request.cpu
            node.memory_gb += request.memory_gb
            for g in gpus:
                node.gpus[g] += min(request.gpu, 1.0)
    return Packing(
        makespan_s=now,
        max_concurrent=peak,
        mean_concurrent=busy / now if now else 0.0,
        gpu_utilisation=held_gpu / (cluster.gpus * now) if now and cluster.gpus else 0.0,
        cpu_utilisation=held_cpu / (cluster.cpus * now) if now and cluster.cpus else 0.0,
        unschedulable=unschedulable,
    )


# ----------------------------------------------------------------------------- the plan


def plan_study(study: Study, cluster: ClusterShape, history: Any = None) -> StudyPlan:
    """The plan of ``study`` on ``cluster``: trials, resources, estimates and packing.

    ``history``: a results directory (or its rows as a DataFrame or mappings) whose measured
    times replace the cost model where they match.
    """
    warnings: list[str] = []
    notes: list[str] = list(cluster.notes)
    if study.search.algorithm == "optuna":
        configurations = study.search_space.representatives()
        n_trials = study.search.n_trials or 0
        trials = [configurations[i % len(configurations)] for i in range(n_trials)]
        notes.append(
            f"optuna: {n_trials} trials drawn from {len(configurations)} configurations "
            "(continuous keys at one value; epochs and image_size at their high end); the plan "
            "spreads them evenly, Optuna will not"
        )
    else:
        trials = expand_trials(study)
        configurations = trials
    estimator = _Estimator(study, history)
    planned: list[TrialPlan] = []
    for trial in trials:
        request = trial_resources(study, trial, cluster, warnings)
        seconds, source = estimator.seconds(trial, request)
        planned.append(TrialPlan(trial, request, seconds, source))
    packing = pack_trials(
        [p.request for p in planned], [p.seconds for p in planned], cluster, study.max_concurrent
    )
    for index in packing.unschedulable:
        request = planned[index].request
        warnings.append(
            f"{planned[index].trial.label()}: fits on no node (gpu {request.gpu:g}, cpu "
            f"{request.cpu:g}, memory {request.memory_gb:g} GB)"
        )
    if study.scheduler is not None:
        notes.append(
            "scheduler (ASHA): estimates assume every trial trains its full epochs; early "
            "stopping makes the study shorter"
        )
    profile_notes: set[str] = set()
    for p in planned:
        if p.source == "unknown":  # its detector cannot be built: warned already
            continue
        profile = models.get_class(p.trial.model).cost_profile(
            p.trial.backbone,
            p.trial.hparams,
            p.trial.image_size,
            batch_size=study.evaluation.batch_sizes(p.trial.model)[0],
        )
        profile_notes.update(profile.notes)
    notes.extend(sorted(profile_notes))
    if history is not None and not any(p.source.startswith("history") for p in planned):
        notes.append("history: no finished row matches a trial on its kind of device")
    return StudyPlan(
        study=study.name,
        algorithm=study.search.algorithm,
        cluster=cluster,
        trials=tuple(planned),
        packing=packing,
        warnings=tuple(merge_warnings(warnings)),
        notes=tuple(notes),
        configurations=len(configurations),
    )


# ----------------------------------------------------------------------------- groups


@dataclass(frozen=True)
class TrialGroup:
    """Trials of one model x backbone x image size x epochs x request: seeds and
    hyperparameters that change neither are counted, not repeated (``sweep plan``'s rows)."""

    first: TrialPlan
    count: int
    total_s: float
    epochs: int | None
    """None for a one-pass detector."""
    sources: frozenset[str]
    """The members' :attr:`TrialPlan.source`."""


def group_trials(plan: StudyPlan) -> list[TrialGroup]:
    """``plan``'s trials as :class:`TrialGroup`, in the order of their first member."""
    groups: dict[tuple, list[TrialPlan]] = {}
    for trial_plan in plan.trials:
        trial = trial_plan.trial
        key = (trial.model, trial.backbone, trial.image_size, trial.epochs, trial_plan.request)
        groups.setdefault(key, []).append(trial_plan)
    return [
        TrialGroup(
            members[0],
            len(members),
            sum(m.seconds for m in members),
            _trial_epochs(members[0].trial),
            frozenset(m.source for m in members),
        )
        for members in groups.values()
    ]


def make_plan(
    study: Study | str | Path,
    *,
    cluster: str | Path | None = None,
    gpus: float | None = None,
    gpu_memory_gb: float | None = None,
    overrides: Iterable[str] = (),
    history: str | Path | None = None,
) -> StudyPlan:
    """The plan ``sweep plan STUDY.yaml [--cluster FILE | --gpus N] [--set k=v]`` shows
    (``sweep.output.show_plan`` prints it).

    ``study`` is a study file (read with ``overrides``) or a loaded :class:`Study`. The cluster
    is the launcher file ``cluster`` (each node type at ``max_workers``), else this machine
    (with ``gpus`` GPUs when given); ``gpu_memory_gb`` is the memory of each GPU where the
    cluster does not say. The history is ``history``, else the study's own output when it
    holds rows. Bad input is a :class:`StudyError` (exit status 2).
    """
    if not isinstance(study, Study):
        study = load_study(study, list(overrides))
    if cluster is not None and gpus is not None:
        raise StudyError("give --cluster or --gpus, not both")
    if cluster is not None:
        shape = ClusterShape.from_cluster_yaml(cluster, gpu_memory_gb=gpu_memory_gb)
    else:
        shape = ClusterShape.local(gpus=gpus, gpu_memory_gb=gpu_memory_gb)
    if history is None:
        output = Path(study.output_dir).expanduser()
        history = output if output.is_dir() and any(output.glob("*.parquet")) else None
    elif not Path(history).expanduser().exists():
        raise StudyError(f"no such results directory: {history}")
    return plan_study(study, shape, history=history)
