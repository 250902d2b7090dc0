"""One trial: data -> detector -> fit -> evaluate -> time -> one Parquet row.

``run_trial`` does the work and knows nothing of Ray; ``tune_trial`` is the thin Ray Tune
function trainable around it. A trial that fails for its own reason (an exception, a NaN loss,
out of memory) becomes a row with ``status="error"`` and the cause, and the sweep goes on.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import math
import os
import platform
import socket
import tempfile
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import timm
import torch
from ray import tune

import data
import models
from data.augment import Augmenter
from data.errors import DatasetError
from data.roi import restrict
from data.splits import labelled_split, resplit, synthetic_validation, validation_from_test
from data.stress import apply_stress
from data.transforms import normalize
from models.cache import TensorCache, use_cache
from sweep.read.examples import save_examples
from sweep.results import HP_PREFIX, IMAGE_SCHEMA, ResultStore
from sweep.run import metrics as metric_fns
from sweep.run.space import TrialConfig
from sweep.run.study import Study, config_hash
from sweep.run.timing import (
    PeakMemory,
    Stopwatch,
    exclusive_timing,
    measure_latency,
    measure_throughput,
)
from sweep.run.weights import trial_weights

Reporter = Callable[[dict[str, Any]], None]
"""Receives per-epoch results while a trial trains (Ray Tune's ``report`` in a sweep)."""


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a run shares: the study, where rows go, and their schema."""

    study: Study
    output: str
    run_id: str
    schema: pa.Schema
    retry_errors: bool = False
    trial_runner: Callable[[TrialConfig, TrialContext, Reporter | None], dict[str, Any]] | None = (
        None
    )
    """Replaces :func:`run_trial` (benchmarks time the engine with a trivial one)."""
    train_batch_size: int | None = None
    """Overrides ``evaluation.train_batch_size`` (an out-of-memory retry halves it)."""
    eval_batch_size: int | None = None
    """Overrides ``evaluation.batch_size`` (an out-of-memory retry halves it)."""

    def batch_sizes(self, model: str | None = None) -> tuple[int, int]:
        """The (training, evaluation) batch sizes this attempt of a ``model`` trial runs with."""
        train, evaluation = self.study.evaluation.batch_sizes(model)
        return self.train_batch_size or train, self.eval_batch_size or evaluation


# ----------------------------------------------------------------------------- data

_DATA_CACHE: OrderedDict[str, Any] = OrderedDict()
_DATA_CACHE_SIZE = 6
"""Loaded data sets, their prepared splits and stressed variants kept in a process."""


def load_data(
    study: Study,
    image_size: int,
    stress: str = "none",
    split_seed: int | None = None,
    test_fraction: float | None = None,
    labelled_defects: int | None = None,
):  # -> data.DatasetSplits
    """The study's data at ``image_size`` as a trial sees it, cached in this process for the
    trials that follow: split again when ``split_seed`` or ``test_fraction`` is set
    (:func:`data.splits.resplit`), ``labelled_defects`` defect images per type moved from the
    test split into the labelled split (:func:`data.splits.labelled_split`; before validation
    anomalies are drawn, so that ``from_test`` never takes a labelled image), with validation
    anomalies from the study's
    ``evaluation.validation`` source, and the test split under ``stress`` (a name of the
    study's stresses).

    Every draw here takes the split's seed (the data set's unless ``split_seed`` is set), not
    the trial's: every trial of a split sees the same images, so their scores compare.
    """
    args = study.dataset.loader_arguments(image_size)
    raw_key = json.dumps([study.dataset.kind, args], sort_keys=True, default=repr)
    redraw = split_seed is not None or test_fraction is not None
    seed = study.dataset.seed if split_seed is None else split_seed
    evaluation = study.evaluation
    prepared_key = json.dumps(
        [
            raw_key,
            [seed, test_fraction] if redraw else None,
            *([labelled_defects] if labelled_defects else []),
            [evaluation.validation, evaluation.val_from_test, evaluation.synthetic_anomalies],
        ]
    )

    def prepared():
        splits = _cached(raw_key, lambda: data.load_dataset(study.dataset.kind, **args))
        if redraw:
            splits = resplit(splits, seed=seed, test_fraction=test_fraction)
        if labelled_defects:
            splits = labelled_split(splits, per_type=labelled_defects, seed=seed)
        return with_validation(splits, study, seed)

    if stress == "none":
        return _cached(prepared_key, prepared)
    spec = study.stress_specs[stress]
    stressed_key = json.dumps([prepared_key, spec.spec()], sort_keys=True, default=repr)

    def stressed():
        clean = _cached(prepared_key, prepared)
        return dataclasses.replace(
            clean, test=apply_stress(clean.test, spec, seed=study.dataset.seed)
        )

    return _cached(stressed_key, stressed)


def _cached(key: str, make: Callable[[], Any]) -> Any:
    if key in _DATA_CACHE:
        _DATA_CACHE.move_to_end(key)
        return _DATA_CACHE[key]
    value = make()
    _DATA_CACHE[key] = value
    while len(_DATA_CACHE) > _DATA_CACHE_SIZE:
        _DATA_CACHE.popitem(last=False)
    return value


def with_validation(splits, study: Study, seed: int):  # -> data.DatasetSplits
    """``splits`` with validation anomalies from ``evaluation.validation``: ``auto`` keeps the
    data set's own validation split when it holds anomalies and otherwise makes synthetic ones
    (or, where too few normal validation images allow that, keeps the split as it is)."""
    evaluation = study.evaluation
    source = evaluation.validation
    if source == "auto":
        if splits.val.num_anomalous:
            return splits
        try:
            return synthetic_validation(splits, kind=evaluation.synthetic_anomalies, seed=seed)
        except DatasetError:
            return splits
    if source == "from_test":
        return validation_from_test(splits, fraction=evaluation.val_from_test, seed=seed)
    if source == "synthetic":
        return synthetic_validation(splits, kind=evaluation.synthetic_anomalies, seed=seed)
    return splits


class _Epochs:
    """Training batches, reshuffled every epoch from the trial's seed, on the trial's device,
    through the trial's augmentation set (fresh random draws every epoch)."""

    def __init__(self, dataset, batch_size: int, seed: int, device: torch.device, augmenter=None):
        self.dataset = dataset
        self.batch_size = min(batch_size, len(dataset))
        self.generator = torch.Generator().manual_seed(seed)
        self.device = device
        self.augmenter = augmenter

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.dataset.batches(self.batch_size, shuffle=True, generator=self.generator):
            if self.augmenter is not None:
                batch["image"] = normalize(self.augmenter(self.dataset.pixels[batch["index"]]))
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


_FEATURE_CACHES: dict[tuple[str, int], Any] = {}


def feature_cache(study: Study):  # -> models.cache.TensorCache | None
    """This process's handle on the node's feature cache, or None when the study disables it."""
    if not study.cache.features:
        return None
    key = (str(study.cache.directory), int(study.cache.max_gb * 2**30))
    if key not in _FEATURE_CACHES:
        _FEATURE_CACHES[key] = TensorCache(study.cache.directory, max_bytes=key[1])
    return _FEATURE_CACHES[key]


# ----------------------------------------------------------------------------- the trial


def _in_ray_worker() -> bool:
    """True inside a Ray task or actor, where Ray decides this trial's GPUs and CPUs.

    A driver that has called ``ray.init`` is not a worker: a trial run there (a test, a
    notebook) owns whatever the process has, and Ray's assigned-resource calls refuse it.
    """
    if not ray.is_initialized():
        return False
    return ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def select_device() -> torch.device:
    """CUDA when this trial may use a GPU: one Ray assigned it, or any outside Ray."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if _in_ray_worker() and not ray.get_gpu_ids():
        return torch.device("cpu")
    return torch.device("cuda")


def _assigned_cpus(study: Study) -> int:
    """Torch threads for the trial: the CPUs Ray gave it, else the study's request (else 1)."""
    if _in_ray_worker():
        assigned = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if assigned:
            return max(1, int(assigned))
    return max(1, int(study.resources.cpu or 1))


def _predict_split(detector: models.Detector, dataset, batch_size: int, device: torch.device):
    scores, maps = [], []
    for batch in dataset.batches(batch_size):
        prediction = detector.predict(batch["image"].to(device))
        scores.append(prediction.score.detach().float().cpu())
        if prediction.anomaly_map is not None:
            maps.append(prediction.anomaly_map.detach().float().cpu())
    score = torch.cat(scores).numpy()
    if not np.all(np.isfinite(score)):
        raise FloatingPointError(f"{int((~np.isfinite(score)).sum())} non-finite image scores")
    return metric_fns.SplitOutputs(
        labels=dataset.labels.numpy(),
        scores=score,
        masks=dataset.masks.numpy() if dataset.has_masks else None,
        maps=torch.cat(maps).numpy() if maps else None,
    )


def restrict_outputs(splits, dataset, outputs: metric_fns.SplitOutputs) -> metric_fns.SplitOutputs:
    """``outputs`` of ``dataset`` (a split of ``splits``) as they are evaluated: with only the
    pixels inside the ROI and off the letterbox border counting (:func:`data.roi.restrict`):
    masks cut, maps at their minimum outside, images whose whole defect lies outside made
    normal. Unchanged for a data set without a ROI and stretched images."""
    if not splits.restricted:
        return outputs
    valid = splits.valid_pixels(dataset)
    labels, masks, maps = restrict(
        outputs.labels, outputs.masks, outputs.maps, valid, dataset.mask_present.numpy()
    )
    return metric_fns.SplitOutputs(labels, outputs.scores, masks, maps, valid)


def data_columns(splits, test: metric_fns.SplitOutputs) -> dict[str, Any]:
    """The row's columns on how the images were prepared: their shape, the resize mode, the
    image files' own sizes and the aspect change, the ROI (path, SHA-256) and what it did."""
    height, width = splits.test.shape
    sizes = splits.source_sizes()
    shown = ",".join(f"{w}x{h}" for h, w in sizes[:3])
    more = f" (+{len(sizes) - 3} more)" if len(sizes) > 3 else ""
    relabelled = fraction = None
    if splits.restricted:
        relabelled = int(np.count_nonzero((splits.test.labels.numpy() == 1) & (test.labels == 0)))
    if splits.roi is not None:
        fraction = 1.0 if test.valid is None else float(np.mean(test.valid))
    return {
        "image_height": height,
        "image_width": width,
        "resize": splits.resize,
        "source_sizes": (shown + more) or None,
        "aspect_change": splits.aspect_change(),
        "roi": None if splits.roi is None else str(splits.roi.path),
        "roi_sha256": None if splits.roi is None else splits.roi.sha256,
        "roi_fraction": fraction,
        "n_relabelled": relabelled,
    }


def run_trial(
    trial: TrialConfig, ctx: TrialContext, report: Reporter | None = None
) -> dict[str, Any]:
    """Fit and evaluate one configuration; return its result row (without bookkeeping columns)."""
    study = ctx.study
    device = select_device()
    torch.set_num_threads(_assigned_cpus(study))
    splits = load_data(
        study,
        trial.image_size,
        trial.stress,
        trial.split_seed,
        trial.test_fraction,
        trial.labelled_defects,
    )
    supervised = models.get_class(trial.model).learning_type == "supervised"
    if supervised and splits.labelled is None:
        raise models.ModelError(
            f"{trial.model} is supervised and trains on labelled defects: the trial has "
            f"labelled_defects={trial.labelled_defects}, give it 1 or more per defect type"
        )
    # Supervised detectors learn from the labelled defects beside the normal images; the others
    # never see them (and every detector of one labelled_defects is tested without them).
    training = splits.train
    if supervised:
        training = data.AnomalyDataset.concat([splits.train, splits.labelled])
    augmenter = None
    if trial.augmentation != "none":
        augmenter = Augmenter(study.augmentation_sets[trial.augmentation], seed=trial.seed)
    cache = feature_cache(study)
    cache_before = cache.stats() if cache is not None else None

    # A pretrained backbone comes from the study's weights folder where one serves it.
    create_args, weights = trial_weights(study, trial)
    detector = models.create(trial.model, **create_args).to(device)
    epochs_run = 0
    scheduler = study.scheduler
    # Supervised detectors train by gradient over epochs too: the scheduler, the epoch count and
    # the validation scores between epochs treat them as iterative.
    iterative = detector.learning_type in ("iterative", "supervised")
    scores_validation = scheduler is not None and iterative and scheduler.metric.startswith("val_")
    budget = trial.epochs if trial.epochs is not None else getattr(detector, "epochs", None)

    def on_epoch_end(epoch: int, values: dict) -> bool:
        nonlocal epochs_run
        epochs_run = epoch
        loss = values.get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise FloatingPointError(f"training loss is {loss} at epoch {epoch}")
        if report is None:
            return False
        result = {"epoch": epoch, **{k: float(v) for k, v in values.items()}}
        last = not iterative or (budget is not None and epoch >= budget)
        if last:
            # The scheduler must not act on a finished training: the trial goes on to its test
            # evaluation and reports that. (ASHA stops any trial that reaches max_t.)
            if scheduler is not None:
                result.pop(scheduler.metric, None)
        elif scores_validation and epoch % scheduler.eval_every == 0:
            result.update(
                _validation_metrics(
                    detector, splits.val, study, device, ctx.batch_sizes(trial.model)[1], splits
                )
            )
        report(result)
        return False

    train_batch_size, batch_size = ctx.batch_sizes(trial.model)
    train = _Epochs(training, train_batch_size, trial.seed, device, augmenter)
    # Features are reused only where the backbone is frozen for good: one-pass training and
    # evaluation. Timing runs without the cache, or it would time disk reads.
    fit_cache = cache if detector.learning_type == "one_pass" else None
    with PeakMemory(device=device) as memory:
        with Stopwatch() as fit_time, use_cache(fit_cache):
            stats = detector.fit(train, epochs=trial.epochs, on_epoch_end=on_epoch_end)
        detector.eval()
        with use_cache(cache):
            val = _predict_split(detector, splits.val, batch_size, device)
            test = _predict_split(detector, splits.test, batch_size, device)
        val = restrict_outputs(splits, splits.val, val)
        test = restrict_outputs(splits, splits.test, test)
        scores = metric_fns.evaluate(
            val,
            test,
            study.evaluation.threshold_policy,
            study.evaluation.pixel_threshold_policy,
        )
        # The hash reads every pretrained part a trial names (a file's SHA-256): once.
        store, digest = ResultStore(ctx.output), config_hash(study, trial)
        store.write_images(digest, image_table(splits, val, test))
        if study.evaluation.keep_models != "none":
            keep_model(store, digest, trial, detector, create_args)

        images = splits.test.images()
        repeat = math.ceil(batch_size / len(images))
        batch = images.repeat(repeat, 1, 1, 1)[:batch_size].to(device)
        evaluation = study.evaluation
        with exclusive_timing(
            enabled=evaluation.exclusive_timing, timeout_s=evaluation.timing_lock_timeout_s
        ) as timing:
            latency = measure_latency(
                detector.predict,
                images[:1].to(device),
                warmup=evaluation.latency_warmup,
                repeats=evaluation.latency_repeats,
            )
            throughput = measure_throughput(detector.predict, batch)

    notes = list((stats or {}).get("notes", ()))
    problem = _save_examples(ctx.study, store, digest, splits.test, test)
    if problem is not None:
        notes.append(problem)
    trainable, frozen = detector.param_counts()
    return {
        **scores,
        "epochs_run": epochs_run if iterative else None,
        "train_s": fit_time.seconds,
        "latency_ms": latency.median_ms,
        "throughput_fps": throughput,
        "timing_exclusive": timing.exclusive,
        "timing_wait_s": timing.wait_s,
        "timing_started_at": timing.started_at,
        "timing_finished_at": timing.finished_at,
        **_cache_counts(cache, cache_before),
        "eval_batch_size": batch_size,
        "memory_bank_size": (stats or {}).get("memory_bank_size"),
        "params_trainable": trainable,
        "params_frozen": frozen,
        "params_total": trainable + frozen,
        "peak_rss_mb": memory.peak_rss_mb,
        "peak_gpu_mb": memory.peak_gpu_mb,
        "weights": weights,
        "parts": _parts_column(stats),
        "val_source": splits.val_source,
        "n_train": len(training),
        "n_val": len(splits.val),
        "n_test": len(splits.test),
        **data_columns(splits, test),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "category": splits.category,
        "notes": "; ".join(notes) or None,
    }


def image_table(splits, val: metric_fns.SplitOutputs, test: metric_fns.SplitOutputs) -> pa.Table:
    """A trial's per-image results (``sweep.results.IMAGE_SCHEMA``): every validation and test
    image with its label, defect type and size, and the score the detector gave it. Thresholds
    and image-level metrics can be computed again from them (``sweep results --recompute``)."""
    columns: dict[str, list] = {name: [] for name in IMAGE_SCHEMA.names}
    for name, dataset, outputs in (("val", splits.val, val), ("test", splits.test, test)):
        height, width = dataset.shape
        area = height * width
        sizes = dataset.defect_pixels
        if outputs.masks is not None and outputs.valid is not None:
            # Defects as evaluated: cut to the region of interest.
            counts = outputs.masks.reshape(len(sizes), -1).sum(axis=1)
            sizes = [None if n is None else int(c) for n, c in zip(sizes, counts, strict=True)]
        columns["split"] += [name] * len(dataset)
        columns["index"] += list(range(len(dataset)))
        columns["path"] += dataset.paths
        columns["label"] += [int(v) for v in outputs.labels]
        columns["defect"] += dataset.defects
        columns["defect_pixels"] += sizes
        columns["defect_fraction"] += [None if n is None else n / area for n in sizes]
        columns["score"] += [float(v) for v in outputs.scores]
    columns["config_hash"] = [None] * len(columns["split"])
    return pa.table(columns, schema=IMAGE_SCHEMA)


def keep_model(
    store: ResultStore,
    digest: str,
    trial: TrialConfig,
    detector: models.Detector,
    create_args: dict[str, Any],
) -> None:
    """Keep a fitted detector under ``_models/`` (``evaluation.keep_models``): every tensor it
    holds, pretrained backbone included, so ``sweep export`` rebuilds it without weights files
    and without fitting again."""
    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "detector.safetensors")
        save_model(detector, path)
        with open(path, "rb") as handle:
            tensors = handle.read()
    recipe = {
        "model": trial.model,
        "create_args": {k: v for k, v in create_args.items() if k != "weights"},
        "trial_config": trial.to_dict(),
    }
    store.write_model(digest, tensors, recipe)


def _parts_column(stats: dict[str, Any] | None) -> str | None:
    """The ``parts`` column: the detector's ``stats["parts"]`` (where its teacher, codebook,
    textures or ViT came from) as a JSON object, None for detectors without such parts."""
    parts = (stats or {}).get("parts")
    if not parts:
        return None
    return json.dumps({str(k): str(v) for k, v in parts.items()}, sort_keys=True)


def _save_examples(study: Study, store: ResultStore, digest: str, dataset, outputs) -> str | None:
    """Save the trial's example maps (``evaluation.example_maps``) beside its row.

    They are for the report's pictures only: a failure comes back as a note for the row,
    never as an exception that would turn a scored trial into an error row.
    """
    n = study.evaluation.example_maps
    if n <= 0:
        return None
    try:
        save_examples(
            store,
            digest,
            pixels=dataset.pixels.numpy(),
            masks=outputs.masks,
            maps=outputs.maps,
            scores=outputs.scores,
            labels=outputs.labels,
            paths=dataset.paths,
            defects=dataset.defects,
            n=n,
        )
    except Exception as exc:  # the row matters more than its pictures
        return f"example maps not saved ({exc.__class__.__name__}: {exc})"
    return None


def _cache_counts(cache, before: dict[str, int] | None) -> dict[str, int | None]:
    if cache is None or before is None:
        return {"cache_hits": None, "cache_misses": None}
    after = cache.stats()
    return {
        "cache_hits": after["hits"] - before["hits"],
        "cache_misses": after["misses"] - before["misses"],
    }


def _validation_metrics(
    detector: models.Detector,
    val,
    study: Study,
    device,
    batch_size: int | None = None,
    splits=None,
) -> dict[str, float]:
    """Score the validation split mid-training, for a scheduler; every module's mode is restored."""
    # Each submodule gets its own mode back: a detector mid-training may hold frozen parts in
    # eval mode, which a blanket train() would flip.
    modes = [(module, module.training) for module in detector.modules()]
    detector.eval()
    try:
        outputs = _predict_split(detector, val, batch_size or study.evaluation.batch_size, device)
    finally:
        for module, training in modes:
            module.training = training
    if splits is not None:
        outputs = restrict_outputs(splits, val, outputs)
    if len(np.unique(outputs.labels)) < 2:
        raise ValueError(
            f"scheduler metric {study.scheduler.metric!r} needs normal and anomalous images in "
            "the validation split; use metric 'loss' or a data set with validation defects"
        )
    values = {"val_image_auroc": metric_fns.auroc(outputs.labels, outputs.scores)}
    if outputs.maps is not None and outputs.masks is not None:
        valid = Ellipsis if outputs.valid is None else outputs.valid
        masks, maps = np.asarray(outputs.masks)[valid], np.asarray(outputs.maps)[valid]
        values["val_pixel_auroc"] = metric_fns.auroc(masks.reshape(-1), maps.reshape(-1))
    return values


@functools.cache
def _versions() -> str:
    return json.dumps(
        {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "ray": ray.__version__,
            "anomaly_sweep": _package_version(),
        }
    )


def _package_version() -> str:
    try:
        return version("anomaly-sweep")
    except PackageNotFoundError:
        return "unknown"


def _describe_error(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    where = " <- ".join(
        f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames)
    )
    kind = "out of memory" if _is_oom(exc) else exc.__class__.__name__
    return f"{kind}: {exc} [{where}]"


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)) or "out of memory" in str(
        exc
    )


def _smaller_batches(trial: TrialConfig, ctx: TrialContext) -> TrialContext | None:
    """The context of an out-of-memory retry: both batch sizes halved, as far as the detector
    allows (``min_train_batch_size``, default 1); None when neither can shrink."""
    train, evaluation = ctx.batch_sizes(trial.model)
    floor = max(1, int(getattr(models.get_class(trial.model), "min_train_batch_size", 1)))
    smaller_train, smaller_eval = max(floor, train // 2), max(1, evaluation // 2)
    if (smaller_train, smaller_eval) == (train, evaluation):
        return None
    return dataclasses.replace(ctx, train_batch_size=smaller_train, eval_batch_size=smaller_eval)


class _ForwardEpochs:
    """Passes on only epochs past those already reported: a retried trial trains from epoch 1
    again, which the scheduler has seen."""

    def __init__(self, report: Reporter):
        self.report = report
        self.last = 0

    def __call__(self, result: dict[str, Any]) -> None:
        epoch = int(result.get("epoch", self.last + 1))
        if epoch > self.last:
            self.last = epoch
            self.report(result)


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def execute_trial(
    trial: TrialConfig, ctx: TrialContext, report: Reporter | None = None, trial_id: str = ""
) -> dict[str, Any]:
    """Run a trial and build its complete row; a failure becomes an error row, never a raise.

    A trial that runs out of memory (CUDA or host) is tried once more with its training and
    evaluation batches halved; the row's ``retried_with_batch`` says so.
    """
    row = _row_header(trial, ctx, trial_id)
    runner = ctx.trial_runner or run_trial
    forward = _ForwardEpochs(report) if report is not None else None
    attempt = ctx
    first_failure = None
    while True:
        retry = None
        try:
            row.update(runner(trial, attempt, forward))
            row["status"], row["error"] = "ok", None
        except Exception as exc:  # a trial's own failure must not stop the sweep
            row["status"] = "error"
            row["error"] = _describe_error(exc)
            if first_failure is None and _is_oom(exc):
                retry = _smaller_batches(trial, attempt)
        if retry is None:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            break
        # Out of the except block, the failed attempt's frames (and their tensors) are gone;
        # collect them before the retry asks for memory again.
        _release_memory()
        first_failure = row["error"]
        attempt = retry
        row["retried_with_batch"] = retry.batch_sizes(trial.model)[0]
    if first_failure is not None:
        train, evaluation = ctx.batch_sizes(trial.model)
        smaller_train, smaller_eval = attempt.batch_sizes(trial.model)
        note = (
            f"retried with train batch {smaller_train} and eval batch {smaller_eval} "
            f"(from {train} and {evaluation}) after: {first_failure}"
        )
        row["notes"] = "; ".join(n for n in (note, row.get("notes")) if n)
    row["finished_at"] = datetime.now(timezone.utc)
    return {k: v for k, v in row.items() if k in ctx.schema.names}


def stopped_row(
    trial: TrialConfig, ctx: TrialContext, trial_id: str, last_result: dict[str, Any]
) -> dict[str, Any]:
    """The row of a trial the scheduler stopped early, from the last epoch it reported.

    Such a trial was never scored on the test split: its test metrics are missing and its
    ``notes`` say where it stopped and on what.
    """
    row = _row_header(trial, ctx, trial_id)
    epoch = last_result.get("epoch")
    row["status"] = "stopped"
    row["epochs_run"] = None if epoch is None else int(epoch)
    scheduler = ctx.study.scheduler
    if scheduler is not None:
        value = last_result.get(scheduler.metric)
        shown = "not reported" if value is None else f"{float(value):.4g}"
        row["notes"] = (
            f"stopped by the {scheduler.kind} scheduler after epoch {epoch} "
            f"({scheduler.metric} {shown})"
        )
    row["finished_at"] = datetime.now(timezone.utc)
    return {k: v for k, v in row.items() if k in ctx.schema.names}


def _row_header(trial: TrialConfig, ctx: TrialContext, trial_id: str) -> dict[str, Any]:
    study = ctx.study
    started = datetime.now(timezone.utc)
    digest = config_hash(study, trial)
    row: dict[str, Any] = {
        "study": study.name,
        "run_id": ctx.run_id,
        "trial_id": trial_id or digest,
        "config_hash": digest,
        "model": trial.model,
        "backbone": trial.backbone,
        "seed": trial.seed,
        "image_size": trial.image_size,
        "epochs": trial.epochs,
        "dataset": study.dataset.label,
        "category": study.dataset.category,
        "augmentation": trial.augmentation,
        "augmentation_spec": _variant_spec(study, "augmentation_sets", trial.augmentation),
        "stress": trial.stress,
        "stress_spec": _variant_spec(study, "stress_specs", trial.stress),
        "split_seed": trial.split_seed,
        "test_fraction": trial.test_fraction,
        "labelled_defects": trial.labelled_defects,
        "hostname": socket.gethostname(),
        "versions": _versions(),
        "trial_config": json.dumps(trial.to_dict(), sort_keys=True),
        "started_at": started,
    }
    hparams = models.trial_hyperparameters(trial.model, trial.hparams)
    row.update({HP_PREFIX + k: v for k, v in hparams.items() if HP_PREFIX + k in ctx.schema.names})
    return row


def _variant_spec(study: Study, variants: str, name: str) -> str | None:
    """The JSON definition of a trial's augmentation set or stress (None for ``none``)."""
    if name == "none":
        return None
    return json.dumps(getattr(study, variants)[name].spec(), sort_keys=True)


def final_metrics(study: Study, row: dict[str, Any]) -> dict[str, Any]:
    """What a finished trial reports to Tune: objectives, status and identity."""
    values: dict[str, Any] = {
        "status": row.get("status"),
        "config_hash": row.get("config_hash"),
        "label": f"{row.get('model')}/{row.get('backbone') or '-'} seed={row.get('seed')}",
        "error": row.get("error"),
        "done": True,
    }
    for objective in study.objectives:
        value = row.get(objective.metric)
        values[objective.metric] = float("nan") if value is None else float(value)
    return values


def tune_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """Ray Tune function trainable: one trial from a grid entry or an Optuna assignment."""
    if "trial" in config:
        trial = TrialConfig.from_dict(config["trial"])
    else:
        trial = ctx.study.search_space.resolve_sampled(config)
    store = ResultStore(ctx.output)
    digest = config_hash(ctx.study, trial)
    existing = store.read_row(digest)
    if existing is not None and (existing["status"] != "error" or not ctx.retry_errors):
        tune.report({**final_metrics(ctx.study, existing), "skipped": True})
        return
    # Optuna takes intermediate results only for its own metric; epochs are not reported to it.
    report = None if ctx.study.search.algorithm == "optuna" else tune.report
    trial_id = tune.get_context().get_trial_id() or digest
    row = execute_trial(trial, ctx, report, trial_id=trial_id)
    store.write_row(row, ctx.schema)
    tune.report({**final_metrics(ctx.study, row), "skipped": False})
