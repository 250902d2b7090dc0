"""``sweep export``: the picked configuration refitted, checked against its row, and written as
an artefact folder (:mod:`sweep.deploy.artefact`).

1. **Pick**: the report's selection (seed-aggregated clean configurations, Pareto front, knee
   picks: :func:`sweep.read.analysis.select` on the study's objectives), ``knee`` being the
   report's chosen method; or a config hash (or a unique prefix of one). Of the configuration's
   ok rows, the lowest seed's (or ``seed``'s).
2. **Refit**: the row's ``trial_config`` rebuilt as ``run_trial`` builds it: the same data
   (``trainable.load_data``), weights, seed, training batches (``trainable._Epochs``), batch
   sizes (the row's, after an out-of-memory retry) and CPU threads; then the validation and
   test splits scored and evaluated with the row's threshold policies.
3. **Check**: the refit's ``image_auroc`` and ``pixel_auroc`` against the row's, within
   :data:`METRIC_TOLERANCE` (by the detector's learning type).
4. **Write**: TorchScript and ONNX of ``Detector.export_module()``, each checked against
   ``Detector.predict`` on test images (:data:`PARITY_RTOL`), the detector's tensors, the
   study's ROI mask (``roi.png``, where ``dataset.roi`` is one mask file; a folder of per-image
   masks cannot follow new images and is refused) and ``artefact.json``; into a temporary
   sibling folder renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch

import models
from data.files import decode_image
from data.roi import RegionOfInterest
from data.transforms import IMAGENET_MEAN, IMAGENET_STD
from sweep.deploy.artefact import (
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    ONNX_FILE,
    ONNX_OPSET,
    ROI_FILE,
    TORCHSCRIPT_FILE,
    WEIGHTS_FILE,
    rebuild_detector,
    sha256_file,
)
from sweep.errors import SweepError
from sweep.read import analysis
from sweep.results import MODELS_DIR, ResultStore, read_results
from sweep.run import metrics as metric_fns
from sweep.run import trainable
from sweep.run.runner import read_study_copy
from sweep.run.space import TrialConfig
from sweep.run.study import Study
from sweep.run.weights import trial_weights

__all__ = [
    "CHECKED_METRICS",
    "METRIC_TOLERANCE",
    "PARITY_RTOL",
    "PICKS",
    "ExportResult",
    "Pick",
    "export",
    "parity",
    "pick_row",
]

PICKS = ("knee", "kneedle", "utopia", "topsis")
"""``--pick`` methods; anything else is read as a config hash (or a unique prefix of one)."""
METRIC_TOLERANCE = {"one_pass": 1e-6, "iterative": 1e-3, "supervised": 1e-3}
"""Largest absolute difference of a checked metric between the row and the refit. One-pass
detectors repeat their arithmetic exactly on the same device and threads (1e-6 leaves room
for a float32 sum's order); iterative ones may drift where training is not bit-reproducible
(a GPU's atomics, another thread count)."""
CHECKED_METRICS = ("image_auroc", "pixel_auroc")
PARITY_RTOL = 1e-4
"""TorchScript and ONNX outputs must be within ``PARITY_RTOL * max|predict's output|`` (scores
and maps apart) of ``Detector.predict`` on the same test images."""
PARITY_IMAGES = 4


@dataclass
class Pick:
    """The row an export rebuilds, and why it was chosen."""

    row: dict[str, Any]
    method: str | None
    """The knee method (``kneedle``, ``utopia``, ``topsis``), or None for a config hash."""
    seeds: list[int]
    """The seeds the configuration ran with (ok rows)."""


@dataclass
class ExportResult:
    """What ``export`` wrote and found."""

    folder: Path
    pick: Pick
    meta: dict[str, Any]
    reproduced: bool
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- pick


def pick_row(
    rows: pd.DataFrame,
    study: Study,
    pick: str,
    *,
    seed: int | None = None,
    weights: Mapping[str, float] | None = None,
) -> Pick:
    """The row ``pick`` names: a knee method's configuration (as ``sweep report`` selects it)
    or a config hash; of a configuration's seeds, ``seed`` or else the lowest."""
    ok = rows[rows["status"] == "ok"] if "status" in rows.columns else rows
    if ok.empty:
        raise SweepError("no ok rows to export from")
    method: str | None = None
    if pick in PICKS:
        clean = ok[analysis.clean_mask(ok)]
        if clean.empty:
            raise SweepError("--pick: no clean (augmentation and stress 'none') ok rows")
        objectives = [(o.metric, o.direction) for o in study.objectives]
        agg = analysis.aggregate_seeds(clean, [m for m, _ in objectives])
        selection = analysis.select(agg, objectives, weights=weights)
        method = selection.chosen if pick == "knee" else pick
        index = selection.picks.get(method) if method else None
        if index is None:
            raise SweepError(
                f"--pick {pick}: the selection has no {method or 'chosen'} pick "
                f"({'; '.join(selection.notes) or 'no front'})"
            )
        columns = [c for c in analysis.config_columns(clean) if c in agg.columns]
        wanted = analysis.config_key(selection.table.loc[index], columns)
        keys = [analysis.config_key(r, columns) for r in clean.to_dict(orient="records")]
        matching = clean[[k == wanted for k in keys]]
    else:
        hashes = ok["config_hash"].astype(str)
        matching = ok[hashes == pick]
        if matching.empty and len(pick) >= 6:
            matching = ok[hashes.str.startswith(pick)]
        found = sorted(set(matching["config_hash"]))
        if not found:
            known = ", ".join(sorted(set(hashes))[:5])
            raise SweepError(
                f"--pick {pick!r}: not knee, kneedle, utopia or topsis, and no ok row has that "
                f"config hash (e.g. {known})"
            )
        if len(found) > 1:
            raise SweepError(f"--pick {pick!r}: the prefix matches {len(found)} config hashes")
    seeds = sorted(int(s) for s in matching["seed"])
    if seed is not None and seed not in seeds:
        raise SweepError(f"--seed {seed}: the pick ran with seeds {seeds}")
    chosen = matching[matching["seed"] == (seeds[0] if seed is None else seed)]
    row = chosen.sort_values("config_hash").iloc[0].to_dict()
    return Pick(row=row, method=method, seeds=seeds)


# --------------------------------------------------------------------------- refit


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


@dataclass
class _Refit:
    detector: models.Detector
    splits: Any
    val: metric_fns.SplitOutputs
    test: metric_fns.SplitOutputs
    metrics: dict[str, Any]
    create_args: dict[str, Any]
    device: str
    threads: int
    kept: bool = False
    """Whether the detector is the trial's own kept one (``evaluation.keep_models``)."""


def _kept_model(output: str, digest: str) -> tuple[dict[str, Any], Path] | None:
    """The recipe and tensors file of the trial's kept detector, or None (a local output
    only: the tensors are read from disk)."""
    store = ResultStore(output)
    if not store.local or digest not in store.kept_models():
        return None
    folder = Path(store.root) / MODELS_DIR
    recipe = json.loads((folder / f"{digest}.json").read_text())
    return recipe, folder / f"{digest}.safetensors"


def _refit(study: Study, row: Mapping[str, Any], output: str) -> _Refit:
    trial = TrialConfig.from_dict(json.loads(row["trial_config"]))
    device = trainable.select_device()
    threads = trainable._assigned_cpus(study)
    splits = trainable.load_data(
        study, trial.image_size, trial.stress, trial.split_seed, trial.test_fraction
    )
    augmenter = None
    if trial.augmentation != "none":
        from data.augment import Augmenter

        augmenter = Augmenter(study.augmentation_sets[trial.augmentation], seed=trial.seed)
    create_args, _ = trial_weights(study, trial)
    train_batch, eval_batch = study.evaluation.batch_sizes(trial.model)
    # An out-of-memory retry ran with halved batches; the row says which.
    retried = _number(row.get("retried_with_batch"))
    if retried:
        train_batch = int(retried)
    if _number(row.get("eval_batch_size")):
        eval_batch = int(row["eval_batch_size"])
    kept = _kept_model(output, str(row["config_hash"]))
    with _threads(threads):
        if kept is not None:
            # The trial's own fitted detector (evaluation.keep_models): no refit.
            detector = rebuild_detector(kept[0], kept[1]).to(device)
        else:
            detector = models.create(trial.model, **create_args).to(device)
            train = trainable._Epochs(splits.train, train_batch, trial.seed, device, augmenter)
            detector.fit(train, epochs=trial.epochs, on_epoch_end=lambda epoch, values: False)
        detector.eval()
        val = trainable._predict_split(detector, splits.val, eval_batch, device)
        test = trainable._predict_split(detector, splits.test, eval_batch, device)
    # Evaluated as the trial evaluated them: a padded border (and a ROI) does not count.
    val = trainable.restrict_outputs(splits, splits.val, val)
    test = trainable.restrict_outputs(splits, splits.test, test)
    policy = row.get("threshold_policy") or study.evaluation.threshold
    pixel_policy = row.get("pixel_threshold_policy") or policy
    scores = metric_fns.evaluate(val, test, str(policy), str(pixel_policy))
    return _Refit(
        detector, splits, val, test, scores, create_args, str(device), threads, kept is not None
    )


# --------------------------------------------------------------------------- the files


def parity(
    reference: tuple[np.ndarray, np.ndarray | None], other: tuple[np.ndarray, np.ndarray | None]
) -> dict[str, float]:
    """Max absolute differences of scores and maps, and the worst of them relative to the
    reference's largest magnitude (the figure :data:`PARITY_RTOL` bounds)."""
    result: dict[str, float] = {}
    relative = 0.0
    for name, ref, got in (("scores", reference[0], other[0]), ("maps", reference[1], other[1])):
        if ref is None:
            continue
        diff = float(np.max(np.abs(np.asarray(ref, np.float64) - np.asarray(got, np.float64))))
        result[f"{name}_max_abs_diff"] = diff
        relative = max(relative, diff / max(float(np.max(np.abs(ref))), 1e-12))
    result["max_rel_diff"] = relative
    return result


def _trace(module: torch.nn.Module, example: torch.Tensor, path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings(), torch.no_grad():
        # Tracer warnings name shapes read as Python ints, and torch.jit says it is deprecated
        # (it still serves the C++ and Python runtimes); the parity check is what counts.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, str(path))
        # Scored from the file, so the check covers what predict will load.
        return torch.jit.load(str(path), map_location="cpu").eval()


def _onnx(module: torch.nn.Module, example: torch.Tensor, path: Path):
    import onnx
    import onnxruntime

    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        # The TorchScript-based exporter: the dynamo one needs onnxscript and handles the
        # feature extractors' dict outputs no better.
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            input_names=["images"],
            output_names=["scores", "maps"],
            dynamic_axes={"images": {0: "batch"}, "scores": {0: "batch"}, "maps": {0: "batch"}},
            opset_version=ONNX_OPSET,
        )
    onnx.checker.check_model(str(path))
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def write_model_files(
    detector: models.Detector, images: torch.Tensor, folder: Path
) -> tuple[dict[str, dict[str, float]], list[str]]:
    """``model.pt``, ``model.onnx`` (where it exports within tolerance) and
    ``detector.safetensors`` of a fitted CPU detector into ``folder``; the parity of each
    backend against ``detector.predict(images)``, and notes on what was left out.

    TorchScript beyond :data:`PARITY_RTOL` is an error (the artefact would score differently
    from the study); ONNX beyond it, or failing to export, is left out with a note.
    """
    from safetensors.torch import save_model

    detector = detector.cpu().eval()
    module = detector.export_module().eval()
    with torch.no_grad():
        prediction = detector.predict(images)
    reference = (
        prediction.score.numpy(),
        None if prediction.anomaly_map is None else prediction.anomaly_map.numpy(),
    )
    example = images[: min(2, len(images))]
    traced = _trace(module, example, folder / TORCHSCRIPT_FILE)
    with torch.no_grad():
        scores, maps = traced(images)
    results = {"torchscript": parity(reference, (scores.numpy(), maps.numpy()))}
    if results["torchscript"]["max_rel_diff"] > PARITY_RTOL:
        raise RuntimeError(
            f"{detector.name}: TorchScript differs from predict by "
            f"{results['torchscript']['max_rel_diff']:.3g} (relative), above {PARITY_RTOL:g}"
        )
    notes = []
    try:
        session = _onnx(module, example, folder / ONNX_FILE)
        outputs = session.run(None, {"images": images.numpy()})
        results["onnx"] = parity(reference, (outputs[0], outputs[1]))
        if results["onnx"]["max_rel_diff"] > PARITY_RTOL:
            notes.append(
                f"ONNX left out: it differs from predict by {results['onnx']['max_rel_diff']:.3g}"
                f" (relative), above {PARITY_RTOL:g}"
            )
            (folder / ONNX_FILE).unlink()
    except Exception as exc:  # an operator ONNX lacks: TorchScript still serves
        notes.append(f"ONNX left out: the export failed ({exc.__class__.__name__}: {exc})")
        (folder / ONNX_FILE).unlink(missing_ok=True)
    save_model(detector, str(folder / WEIGHTS_FILE))
    return results, notes


def _versions() -> dict[str, str]:
    names = ("anomaly-sweep", "torch", "timm", "onnx", "onnxruntime", "numpy")
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def _plain(values: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k): analysis.jsonable(v) for k, v in values.items()}


def _normalisation(labels_scores: np.ndarray | None, threshold: Any) -> dict[str, float] | None:
    threshold = _number(threshold)
    if labels_scores is None or threshold is None:
        return None
    return {
        "threshold": threshold,
        "min": float(np.min(labels_scores)),
        "max": float(np.max(labels_scores)),
    }


# --------------------------------------------------------------------------- the ROI


def _single_roi(study: Study, row: Mapping[str, Any], pick: str) -> RegionOfInterest | None:
    """The study's ROI where an artefact can carry it (one mask file, as the trial read it);
    a folder of per-image masks, or a mask changed since the trial, is a :class:`SweepError`."""
    if study.dataset.roi is None:
        return None
    roi = RegionOfInterest(study.dataset.roi)  # missing or empty: a DatasetError (exit 2)
    if roi.per_image:
        raise SweepError(
            f"--pick {pick}: dataset.roi {str(roi.path)!r} is a folder of per-image ROI masks, "
            "matched to the data set's images by name; new images on the line have none, so "
            "an artefact cannot carry it (give the study one mask file for every image)"
        )
    recorded = row.get("roi_sha256")
    if isinstance(recorded, str) and recorded and recorded != roi.sha256:
        raise SweepError(
            f"--pick {pick}: the ROI mask {str(roi.path)!r} changed since the trial ran "
            f"(sha256 {roi.sha256[:12]}, the row's {recorded[:12]}); the refit would not be the "
            "row's configuration (restore the mask, or run the study again)"
        )
    return roi


def _write_roi(roi: RegionOfInterest, folder: Path) -> dict[str, Any]:
    """The ROI as ``folder/roi.png`` (0/255, read back exactly as the trial read the study's
    mask: nonzero inside) and what ``artefact.json`` says of it."""
    inside = decode_image(roi.path, cv2.IMREAD_GRAYSCALE) > 0
    path = folder / ROI_FILE
    if not cv2.imwrite(str(path), np.where(inside, 255, 0).astype(np.uint8)):
        raise OSError(f"cannot write {path}")
    height, width = inside.shape
    return {
        "file": ROI_FILE,
        "sha256": sha256_file(path),
        "size": [height, width],
        "inside_fraction": float(inside.mean()),
        "source": str(roi.path),
        "source_sha256": roi.sha256,
        "rule": "pixels outside set to 0 before resizing (data.transforms.prepare); maps "
        "outside at their minimum inside (data.roi.mask_maps); the mask is resized to an image "
        "of the same aspect ratio (data.roi.RegionOfInterest.mask_for)",
    }


# --------------------------------------------------------------------------- export


def _exportable(model: str) -> bool:
    return models.get_class(model).export_module is not models.Detector.export_module


def export(
    output: str,
    pick: str,
    to: str | Path,
    *,
    seed: int | None = None,
    weights: Mapping[str, float] | None = None,
    strict: bool = False,
    overwrite: bool = False,
) -> ExportResult:
    """Export the configuration ``pick`` names from the study output ``output`` to ``to``.

    Bad input (no such output, no pick, ``to`` already there without ``overwrite``) is a
    :class:`SweepError` before anything is fitted. A refit whose checked metrics differ from
    the row's by more than :data:`METRIC_TOLERANCE` is exported with ``reproduced`` false and
    a note, or, with ``strict``, not exported (``RuntimeError``). Nothing is left half-written.
    """
    target = Path(to)
    if target.exists() and not overwrite:
        raise SweepError(f"--to {str(target)!r}: already exists (give --overwrite to replace it)")
    if target.exists() and not target.is_dir():
        raise SweepError(f"--to {str(target)!r}: a file is there, not a folder")
    rows = read_results(output)
    if rows.empty:
        raise SweepError(f"results {str(output)!r}: no trial rows found")
    study = read_study_copy(output)
    chosen = pick_row(rows, study, pick, seed=seed, weights=weights)
    row = chosen.row
    model = str(row["model"])
    detector_class = models.get_class(model)
    if not _exportable(model):
        # Before a refit that could take hours.
        known = ", ".join(m for m in models.list_models() if _exportable(m))
        raise SweepError(
            f"--pick {pick}: the pick is a {model} model, which cannot be exported yet "
            f"(exportable: {known})"
        )
    roi = _single_roi(study, row, pick)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        problem = exc.strerror or exc
        raise SweepError(f"--to {str(target)!r}: cannot create it ({problem})") from None
    if not os.access(target.parent, os.W_OK):
        raise SweepError(f"--to {str(target)!r}: its folder is not writable")

    refit = _refit(study, row, output)
    tolerance = METRIC_TOLERANCE[detector_class.learning_type]
    differences: dict[str, float] = {}
    notes: list[str] = []
    for metric in CHECKED_METRICS:
        expected, got = _number(row.get(metric)), _number(refit.metrics.get(metric))
        if expected is None and got is None:
            continue
        if expected is None or got is None:
            differences[metric] = math.inf
        else:
            differences[metric] = abs(got - expected)
    reproduced = all(d <= tolerance for d in differences.values())
    if not reproduced:
        shown = ", ".join(
            f"{m} row {_number(row.get(m))} refit {_number(refit.metrics.get(m))} (|diff| {d:.3g})"
            for m, d in differences.items()
            if d > tolerance
        )
        message = f"the refit does not reproduce the row within {tolerance:g}: {shown}"
        if strict:
            raise RuntimeError(message + "; nothing was exported (--strict)")
        notes.append(message)

    temporary = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        images = refit.splits.test.images()[:PARITY_IMAGES]
        backends, file_notes = write_model_files(refit.detector, images, temporary)
        notes += file_notes
        trial_config = json.loads(row["trial_config"])
        height, width = refit.splits.test.shape
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": model,
            "backbone": row.get("backbone"),
            "learning_type": detector_class.learning_type,
            "localizes": detector_class.localizes,
            "hyperparameters": _plain(models.trial_hyperparameters(model, trial_config["hparams"])),
            "create_args": _plain({k: v for k, v in refit.create_args.items() if k != "weights"}),
            "trial_config": trial_config,
            "config_hash": row["config_hash"],
            "pick": {
                "given": pick,
                "method": chosen.method,
                "seed": int(row["seed"]),
                "seeds": chosen.seeds,
            },
            "source": {"output": str(output), "study": study.name, "weights": row.get("weights")},
            "preprocessing": {
                "image_size": [height, width],
                "resize": refit.splits.resize,
                "aspect_change": refit.splits.aspect_change(),
                "interpolation": "area when shrinking, bilinear when enlarging (OpenCV); "
                "data.transforms.prepare",
                "color": "RGB, 8 bit (16-bit images keep the top 8 of their bit_depth bits; gray "
                "replicated)",
                # The study's data depth (dataset.bit_depth, or inferred): 12-bit data in 16-bit
                # files must be scaled as in training, not read nearly black. None: 16.
                "bit_depth": refit.splits.bit_depth,
                "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD),
                "roi": None,
            },
            "inputs": {"images": "float32 B x 3 x H x W, normalised"},
            "outputs": {"scores": "float32 B", "maps": "float32 B x H x W"},
            "threshold": {
                "policy": refit.metrics["threshold_policy"],
                "image": _number(refit.metrics.get("image_threshold")),
                "pixel_policy": refit.metrics["pixel_threshold_policy"],
                "pixel": _number(refit.metrics.get("pixel_threshold")),
                "chosen_on": f"validation split ({refit.splits.val_source}, "
                f"{len(refit.splits.val)} images)",
                "decision": "anomalous when score >= threshold",
            },
            "normalisation": {
                "method": "clip((x - threshold) / (max - min) + 0.5, 0, 1), min/max over the "
                "validation split (anomalib's min-max normalisation)",
                "image": _normalisation(refit.val.scores, refit.metrics.get("image_threshold")),
                "pixel": _normalisation(refit.val.maps, refit.metrics.get("pixel_threshold")),
            },
            "metrics": {
                "row": _plain({k: row.get(k) for k in _METRIC_KEYS if k in row}),
                "refit": _plain({k: refit.metrics.get(k) for k in _METRIC_KEYS}),
                "checked": list(differences),
                "abs_difference": _plain(differences),
                "tolerance": tolerance,
                "reproduced": reproduced,
            },
            "refit": {
                "device": refit.device,
                "threads": refit.threads,
                # The trial's kept detector (evaluation.keep_models) is scored again, not fitted.
                "fitted": "kept by the trial" if refit.kept else "refit",
            },
            "parity": {
                "images": len(images),
                "rtol": PARITY_RTOL,
                "reference": "Detector.predict (PyTorch)",
                **backends,
            },
            "notes": notes,
            "versions": _versions(),
        }
        if roi is not None:
            meta["preprocessing"]["roi"] = _write_roi(roi, temporary)
        meta["files"] = {
            name: sha256_file(temporary / name)
            for name in (TORCHSCRIPT_FILE, ONNX_FILE, WEIGHTS_FILE)
            if (temporary / name).exists()
        }
        (temporary / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if target.exists():
            retired = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(retired)
            temporary.rename(target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            temporary.rename(target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return ExportResult(target, chosen, meta, reproduced, notes)


_METRIC_KEYS = (
    "image_auroc",
    "pixel_auroc",
    "image_f1",
    "pixel_f1",
    "image_threshold",
    "pixel_threshold",
    "threshold_policy",
    "pixel_threshold_policy",
)
