"""What each trial asks of the cluster, and what the cluster has to give.

A trial's request starts from its detector's default (:func:`detector_request`: sized from the
detector's cost profile for the backbone, hyperparameters, image size and training batch, see
``docs/resources.md``)
and is then overridden by the study, most specific last::

    detector default  <  study ``resources``  <  study ``resources.models.<model>``

The result is fitted to the cluster: without GPUs a trial runs on the CPU (GPU request 0, and
the device memory it would have taken comes out of host memory); the default GPU share is sized
to the cluster's real GPU memory rather than the 16 GB reference; and a request larger than the
largest node is clipped to it, with a warning, so no trial is left unschedulable.

:class:`ClusterShape` describes the cluster: this machine (:meth:`ClusterShape.local`), the
connected Ray cluster (:meth:`ClusterShape.from_ray`) or a Ray cluster launcher file
(:meth:`ClusterShape.from_cluster_yaml`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml

import models
from data.synthetic_glue import GlueSetConfig
from models.base import (
    DEFAULT_TRAIN_BATCH_SIZE,
    DEFAULT_TRAIN_IMAGES,
    Detector,
)
from models.errors import ModelError
from sweep.errors import StudyError
from sweep.run.study import Study, TrialConfig, UniqueKeyLoader

__all__ = [
    "DEFAULT_CPUS",
    "GPU_FRACTIONS",
    "HOST_BASE_GB",
    "REFERENCE_GPU_MEMORY_GB",
    "ClusterShape",
    "NodeShape",
    "ResourceRequest",
    "detector_request",
    "gpu_fraction",
    "grown",
    "ray_resources",
    "study_image_counts",
    "study_train_images",
    "trial_resources",
]


@dataclass(frozen=True)
class ResourceRequest:
    """What one trial asks of the cluster, and the device memory it is expected to take."""

    gpu: float
    """Share of one GPU (``GPU_FRACTIONS``) or whole GPUs; 0 runs on the CPU."""
    cpu: float
    """CPUs (torch threads) of the trial."""
    memory_gb: float
    """Host memory (Ray's ``memory`` resource)."""
    gpu_memory_gb: float
    """Estimated device memory of the trial on a GPU (what the fraction is sized from)."""

    def __post_init__(self) -> None:
        if self.gpu < 0 or (self.gpu > 1 and self.gpu != int(self.gpu)):
            raise ModelError(f"a GPU request is a fraction up to 1 or whole GPUs, got {self.gpu}")
        if self.cpu <= 0 or self.memory_gb < 0 or self.gpu_memory_gb < 0:
            raise ModelError(
                f"a resource request needs cpu > 0 and memory >= 0, got cpu={self.cpu}, "
                f"memory_gb={self.memory_gb}, gpu_memory_gb={self.gpu_memory_gb}"
            )

    def replace(self, **changes: float) -> ResourceRequest:
        """A copy with some fields changed."""
        return replace(self, **changes)


# The policy that turns a detector's cost (models.costs: memory and FLOPs, which are the
# method's) into what a trial asks of Ray (GPU share, CPUs, host memory: the engine's).

REFERENCE_GPU_MEMORY_GB = 16.0
"""The GPU a default request is sized for (a T4/V100-16GB/A4000 class card); ``sweep plan``
re-sizes the fraction to the GPUs a cluster really has."""
GPU_FRACTIONS = (0.125, 0.25, 0.5, 1.0)
"""GPU shares a default request takes: they pack without waste (8, 4, 2 or 1 per GPU). One
trial runs in one process on one device, so no default asks for more than one GPU."""
DEVICE_OVERHEAD_GB = 0.5
"""Per process on a GPU: the CUDA context and cuDNN/cuBLAS workspaces (0.3-0.6 GB on recent
cards and PyTorch releases)."""
ALLOCATOR_SLACK = 1.2
"""PyTorch's caching allocator rounds blocks up and fragments: tensors take ~20 % more."""
HOST_BASE_GB = 1.0
"""A Ray worker before any model or data set: torch, timm, the detectors, the data code and
Ray Tune imported take 0.87 GB of resident memory, the worker's runtime the rest
(``docs/resources.md``)."""
DEFAULT_CPUS: dict[str, float] = {"one_pass": 2.0, "iterative": 4.0, "supervised": 4.0}
"""CPUs per trial. Data sets are held in memory (no loader workers), so the CPUs are torch's
threads for host-side work: one-pass fits run their statistics, nearest-neighbour search
(faiss, on CPU trials) and coreset selection on the host; iterative ones also synthesise
anomalies and shuffle batches every step, and evaluate the validation split between epochs."""


def gpu_fraction(memory_gb: float, gpu_memory_gb: float = REFERENCE_GPU_MEMORY_GB) -> float:
    """The smallest share in ``GPU_FRACTIONS`` of a ``gpu_memory_gb`` card that holds
    ``memory_gb``; a whole GPU when even that is too small (the plan warns about it)."""
    need = memory_gb / gpu_memory_gb
    return next((share for share in GPU_FRACTIONS if need <= share), GPU_FRACTIONS[-1])


def grown(
    request: ResourceRequest, device_gb: float = 0.0, host_gb: float = 0.0
) -> ResourceRequest:
    """A copy of ``request`` with more device and host memory, the GPU share sized up to
    match."""
    device = request.gpu_memory_gb + device_gb
    gpu = max(request.gpu, gpu_fraction(device)) if request.gpu > 0 else 0.0
    return request.replace(
        gpu=gpu,
        gpu_memory_gb=round(device, 2),
        memory_gb=round(request.memory_gb + host_gb, 2),
    )


def _gb(n_bytes: float) -> float:
    return n_bytes / 2**30


def detector_request(
    cls: type[Detector],
    backbone: str | None,
    hparams: Mapping[str, Any] | None,
    image_size: int,
    *,
    batch_size: int = DEFAULT_TRAIN_BATCH_SIZE,
    n_train: int = DEFAULT_TRAIN_IMAGES,
) -> ResourceRequest:
    """The resources a trial of detector ``cls`` asks for by default.

    ``backbone`` (None: the detector's default) and ``hparams`` (missing ones take their
    defaults) are the trial's; ``batch_size`` its training batch and ``n_train`` its
    training images. Device memory = ``DEVICE_OVERHEAD_GB`` + ``ALLOCATOR_SLACK`` x (fp32
    weights, with gradient and two Adam moments for trained ones + activations autograd
    keeps over a training batch + the largest single operation), all from
    ``Detector.cost_profile``; the GPU share is that over ``REFERENCE_GPU_MEMORY_GB``, rounded
    up to ``GPU_FRACTIONS``. Host memory = ``HOST_BASE_GB`` + the data set in memory (about
    1.5 x ``n_train`` images as float32, validation and test included) + a CPU copy of the
    weights. CPUs: ``DEFAULT_CPUS`` by learning type. What ``fit`` holds beyond its networks
    (``Detector.fit_state_bytes``: a memory bank, per-position covariances) is added to the
    device memory with :func:`grown`.
    """
    profile = cls.cost_profile(backbone, hparams, image_size, batch_size=batch_size)
    tensors = profile.weight_bytes + profile.saved_bytes + profile.working_bytes
    device_gb = DEVICE_OVERHEAD_GB + ALLOCATOR_SLACK * _gb(tensors)
    data_bytes = 1.5 * n_train * 3 * image_size**2 * 4
    params = profile.trainable_params + profile.frozen_params
    host_gb = HOST_BASE_GB + _gb(data_bytes + 4 * params)
    request = ResourceRequest(
        gpu=gpu_fraction(device_gb),
        cpu=DEFAULT_CPUS[cls.learning_type],
        memory_gb=round(host_gb, 2),
        gpu_memory_gb=round(device_gb, 2),
    )
    state = cls.fit_state_bytes(backbone, hparams, image_size, n_train=n_train)
    if not state:
        return request
    # Rounded on its own, as the request is, so that a plan's figures add up as printed.
    return grown(request, device_gb=round(ALLOCATOR_SLACK * state / 2**30, 2))


UNBUILDABLE_REQUEST = ResourceRequest(gpu=0.0, cpu=1.0, memory_gb=1.0, gpu_memory_gb=0.0)
"""What a trial asks for when its detector refuses its hyperparameters (it fails at once)."""
ACCELERATOR_MEMORY_GB = {
    "H200": 141.0,
    "H100": 80.0,
    "A100": 40.0,
    "A40": 48.0,
    "L40S": 48.0,
    "L40": 48.0,
    "A10G": 24.0,
    "L4": 24.0,
    "V100": 16.0,
    "T4": 16.0,
}
"""Memory of the GPUs Ray names in a node's ``accelerator_type:<name>`` resource (the smaller
variant where there are two: A100 40 GB, V100 16 GB)."""

INSTANCE_ACCELERATORS = (
    # (prefix of an AWS InstanceType or a GCP machineType, the GPU it carries). Longest first.
    ("p4de.", "A100-80G"),
    ("p4d.", "A100"),
    ("p5.", "H100"),
    ("p5e.", "H200"),
    ("p3.", "V100"),
    ("g4dn.", "T4"),
    ("g5.", "A10G"),
    ("g6e.", "L40S"),
    ("g6.", "L4"),
    ("g2-", "L4"),
    ("a2-ultragpu-", "A100-80G"),
    ("a2-highgpu-", "A100"),
    ("a2-megagpu-", "A100"),
    ("a3-", "H100"),
)
"""GPUs of the cloud instance types a cluster file may name, for GPU memory in `sweep plan`."""

GCP_ACCELERATORS = {
    "nvidia-tesla-t4": "T4",
    "nvidia-tesla-v100": "V100",
    "nvidia-tesla-a100": "A100",
    "nvidia-a100-80gb": "A100-80G",
    "nvidia-l4": "L4",
    "nvidia-h100-80gb": "H100",
}
"""GCP ``guestAccelerators`` types (on N1 machines) and the GPU each is."""


def node_type_gpu_memory_gb(spec: Mapping[str, Any]) -> float | None:
    """GPU memory of one node type of a cluster file: from an ``accelerator_type:<GPU>``
    resource it declares, else from its instance type (AWS ``InstanceType``, GCP
    ``machineType`` or ``guestAccelerators``); None when the file does not say."""
    resources = spec.get("resources") or {}
    kinds = [str(k).partition(":")[2] for k in resources if str(k).startswith("accelerator_type:")]
    node_config = spec.get("node_config") or {}
    machine = str(node_config.get("InstanceType") or node_config.get("machineType") or "")
    for prefix, gpu in sorted(INSTANCE_ACCELERATORS, key=lambda item: -len(item[0])):
        if machine.startswith(prefix):
            kinds.append(gpu)
    for accelerator in node_config.get("guestAccelerators") or []:
        name = str(accelerator.get("acceleratorType", "")).rsplit("/", 1)[-1]
        if name in GCP_ACCELERATORS:
            kinds.append(GCP_ACCELERATORS[name])
    for kind in kinds:
        if kind == "A100-80G":
            return 80.0
        if kind in ACCELERATOR_MEMORY_GB:
            return ACCELERATOR_MEMORY_GB[kind]
    return None


RAY_OBJECT_STORE_SHARE = 0.3
"""Share of a node's memory Ray keeps for its object store by default; the rest is the node's
``memory`` resource."""


@dataclass(frozen=True)
class NodeShape:
    """One node: what Ray can schedule on it."""

    name: str
    cpus: float
    gpus: float = 0.0
    gpu_memory_gb: float | None = None
    """Memory of each of its GPUs, when known (not in a cluster launcher file)."""
    memory_gb: float = math.inf
    """Ray's ``memory`` resource of the node (unlimited when not given)."""


@dataclass(frozen=True)
class ClusterShape:
    """The nodes a study can run on."""

    nodes: tuple[NodeShape, ...]
    source: str = ""
    """Where the shape came from ("this machine", "ray cluster at ...", a file)."""
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def cpus(self) -> float:
        return sum(node.cpus for node in self.nodes)

    @property
    def gpus(self) -> float:
        return sum(node.gpus for node in self.nodes)

    @property
    def gpu_memory_gb(self) -> float | None:
        """The smallest known GPU memory of the cluster (a share sized for it fits on any)."""
        known = [n.gpu_memory_gb for n in self.nodes if n.gpus > 0 and n.gpu_memory_gb]
        return min(known) if known else None

    def describe(self) -> str:
        """``3 nodes: 48 CPUs, 4 GPUs (80 GB), 480 GB`` and where it came from."""
        memory = sum(n.memory_gb for n in self.nodes)
        parts = [f"{len(self.nodes)} node{'s' if len(self.nodes) != 1 else ''}"]
        parts.append(f"{_number(self.cpus)} CPUs")
        if self.gpus:
            gpu_memory = self.gpu_memory_gb
            parts.append(
                f"{_number(self.gpus)} GPUs"
                + (f" ({_number(gpu_memory)} GB)" if gpu_memory else " (memory unknown)")
            )
        else:
            parts.append("no GPU")
        if math.isfinite(memory):
            parts.append(f"{memory:.0f} GB memory")
        return ", ".join(parts) + (f"; {self.source}" if self.source else "")

    # ------------------------------------------------------------------------ constructors

    @classmethod
    def local(cls, gpus: float | None = None, gpu_memory_gb: float | None = None) -> ClusterShape:
        """This machine: its CPUs, its CUDA GPUs and its memory (less Ray's object store).

        ``gpus`` pretends it has that many GPUs (``sweep plan --gpus N``), of
        ``gpu_memory_gb`` each (default: the real one's, else the 16 GB reference).
        """
        cpus = float(os.cpu_count() or 1)
        memory = psutil.virtual_memory().total / 2**30 * (1 - RAY_OBJECT_STORE_SHARE)
        real_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        real_memory = None
        if real_gpus:
            real_memory = min(
                torch.cuda.get_device_properties(i).total_memory / 2**30 for i in range(real_gpus)
            )
        count = float(real_gpus if gpus is None else gpus)
        if count < 0:
            raise StudyError(f"--gpus must be >= 0, got {gpus}")
        per_gpu = gpu_memory_gb or real_memory or (REFERENCE_GPU_MEMORY_GB if count else None)
        source = "this machine" + (f", {_number(count)} GPUs assumed" if gpus is not None else "")
        node = NodeShape("local", cpus, count, per_gpu if count else None, memory)
        return cls((node,), source=source)

    @classmethod
    def from_ray(cls, address: str | None = None) -> ClusterShape:
        """The alive nodes of the Ray cluster this process is connected to (``ray.init`` is
        called with ``address`` when it is not)."""
        import ray

        if not ray.is_initialized():
            try:
                ray.init(address=address or "auto", logging_level="ERROR", log_to_driver=False)
            except ConnectionError as error:
                raise StudyError(f"cannot reach the Ray cluster at {address!r}: {error}") from None
        nodes = []
        for i, info in enumerate(n for n in ray.nodes() if n.get("Alive", True)):
            resources = info.get("Resources", {})
            gpus = float(resources.get("GPU", 0.0))
            memory = resources.get("memory")
            kinds = [k.partition(":")[2] for k in resources if k.startswith("accelerator_type:")]
            known = [ACCELERATOR_MEMORY_GB[k] for k in kinds if k in ACCELERATOR_MEMORY_GB]
            nodes.append(
                NodeShape(
                    name=str(info.get("NodeManagerHostname") or info.get("NodeID", i)),
                    cpus=float(resources.get("CPU", 0.0)),
                    gpus=gpus,
                    gpu_memory_gb=min(known) if gpus and known else None,
                    memory_gb=math.inf if memory is None else float(memory) / 2**30,
                )
            )
        if not nodes:
            raise StudyError("the Ray cluster has no alive nodes")
        return cls(tuple(nodes), source=f"ray cluster {address or 'auto'}")

    @classmethod
    def from_cluster_yaml(
        cls, path: str | Path, workers: str = "max", gpu_memory_gb: float | None = None
    ) -> ClusterShape:
        """The nodes a Ray cluster launcher file describes: the head node plus, per node type
        of ``available_node_types``, its ``max_workers`` (``workers="min"``: ``min_workers``)
        nodes with that type's ``resources`` (``CPU``, ``GPU``, ``memory`` in bytes), capped by
        the file's top-level ``max_workers``. GPU memory: ``gpu_memory_gb`` where given, else
        what the node type's instance type or ``accelerator_type:<GPU>`` resource tells
        (:func:`node_type_gpu_memory_gb`), else the 16 GB reference.

        Every problem is a :class:`StudyError` naming the file and the key.
        """
        path = Path(path)
        source = str(path)
        try:
            # A key given twice (two head node types of one name) is refused, as in studies.
            raw = yaml.load(path.read_text(), Loader=UniqueKeyLoader)
        except FileNotFoundError:
            raise StudyError("no such cluster file", path=source) from None
        except (OSError, UnicodeDecodeError) as error:
            raise StudyError(f"cannot read the cluster file ({error})", path=source) from None
        except yaml.YAMLError as error:
            raise StudyError(f"invalid YAML: {error}", path=source) from None
        if workers not in ("max", "min"):
            raise StudyError(f"workers must be 'max' or 'min', got {workers!r}", path=source)
        if not isinstance(raw, Mapping):
            raise StudyError("a cluster file is a YAML mapping", path=source)
        types = raw.get("available_node_types")
        if not isinstance(types, Mapping) or not types:
            raise StudyError(
                "needs 'available_node_types': a mapping of node type -> {resources, "
                "min_workers, max_workers}",
                path=source,
                key="available_node_types",
            )
        head = raw.get("head_node_type")
        if head is not None and head not in types:
            raise StudyError(
                f"head node type {head!r} is not one of available_node_types "
                f"({', '.join(map(str, types))})",
                path=source,
                key="head_node_type",
            )
        if head is None and len(types) == 1:
            head = next(iter(types))
        budget = _count(raw, "max_workers", source, default=math.inf)
        nodes: list[NodeShape] = []
        unknown_gpu_memory = False
        for name, spec in types.items():
            key = f"available_node_types.{name}"
            if not isinstance(spec, Mapping):
                raise StudyError("a node type is a mapping", path=source, key=key)
            shape = _node_from_resources(str(name), spec.get("resources"), source, key)
            card = gpu_memory_gb or node_type_gpu_memory_gb(spec)
            if shape.gpus and not card:
                unknown_gpu_memory = True
            shape = NodeShape(
                shape.name, shape.cpus, shape.gpus, card if shape.gpus else None, shape.memory_gb
            )
            low = _count(spec, "min_workers", source, key, default=0)
            high = _count(spec, "max_workers", source, key, default=low)
            if high < low:
                raise StudyError(
                    f"max_workers {high} is below min_workers {low}", path=source, key=key
                )
            count = int(low if workers == "min" else high)
            if name == head:
                nodes.append(NodeShape(f"{name} (head)", *_fields(shape)))
            for i in range(count):
                if budget <= 0:
                    break
                nodes.append(NodeShape(f"{name}[{i}]", *_fields(shape)))
                budget -= 1
        if head is None:
            raise StudyError(
                "name the head node's type with 'head_node_type'", path=source, key="head_node_type"
            )
        notes = ()
        if unknown_gpu_memory:
            notes = (
                f"GPU memory of a node type not known from its instance type or an "
                f"accelerator_type resource: {REFERENCE_GPU_MEMORY_GB:g} GB assumed per GPU "
                "(give --gpu-memory-gb)",
            )
        return cls(tuple(nodes), source=f"{source} ({workers}_workers)", notes=notes)


def _fields(node: NodeShape) -> tuple[float, float, float | None, float]:
    return node.cpus, node.gpus, node.gpu_memory_gb, node.memory_gb


def _count(
    spec: Mapping[str, Any], name: str, source: str, key: str | None = None, default: float = 0
) -> float:
    value = spec.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        where = f"{key}.{name}" if key else name
        raise StudyError(f"expected a whole number >= 0, got {value!r}", path=source, key=where)
    return value


def _node_from_resources(name: str, resources: Any, source: str, key: str) -> NodeShape:
    key = f"{key}.resources"
    if resources is None:
        raise StudyError(
            "give the node type's resources ({CPU: n, GPU: n, memory: bytes}): the plan cannot "
            "ask a cloud provider what an instance type has",
            path=source,
            key=key,
        )
    if not isinstance(resources, Mapping):
        raise StudyError("resources is a mapping {CPU, GPU, memory}", path=source, key=key)
    values = {}
    for field_name in ("CPU", "GPU", "memory"):
        value = resources.get(field_name, 0 if field_name == "GPU" else None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise StudyError(
                f"expected a number >= 0, got {value!r}", path=source, key=f"{key}.{field_name}"
            )
        values[field_name] = float(value)
    if "CPU" not in values:
        raise StudyError("the number of CPUs is missing", path=source, key=f"{key}.CPU")
    memory = values.get("memory")
    return NodeShape(
        name=name,
        cpus=values["CPU"],
        gpus=values.get("GPU", 0.0),
        memory_gb=math.inf if memory is None else memory / 2**30,
    )


def _number(value: float) -> str:
    return f"{value:g}"


# ----------------------------------------------------------------------------- trial requests

_FIELDS = ("cpu", "gpu", "memory_gb")


def _explicit(overrides: Any, name: str) -> float | None:
    """The value a study gave for ``name``, or None where it left the detector's default.

    A field counts only when the study file set it: with the older schema (``cpu: 1.0`` as
    the model's own default) an unset field still has a value, which is not the user's.
    """
    if overrides is None:
        return None
    value = getattr(overrides, name, None)
    fields_set = getattr(overrides, "model_fields_set", None)
    if value is None or (fields_set is not None and name not in fields_set):
        return None
    return float(value)


def study_image_counts(study: Study) -> tuple[int, int]:
    """(training, validation + test) images of the study's data set, as far as the plan can
    know without loading it: the synthetic generator's settings, the ``train/good`` folder of
    an MVTec category on this machine, else ``DEFAULT_TRAIN_IMAGES`` and half as many again
    for evaluation."""
    dataset = study.dataset
    if dataset.kind == "synthetic_glue":
        values = dataset.synthetic.model_dump(exclude_none=True) if dataset.synthetic else {}
        if "defect_types" in values:
            values["defect_types"] = tuple(values["defect_types"])
        config = GlueSetConfig(**values)
        kinds = len(config.defect_types)
        evaluation = (
            config.n_val_good
            + kinds * config.n_val_defect
            + config.n_test_good
            + kinds * config.n_test_defect
        )
        return config.n_train, evaluation
    n_train = DEFAULT_TRAIN_IMAGES
    if dataset.kind == "mvtec" and dataset.root and dataset.category:
        folder = Path(dataset.root).expanduser() / dataset.category / "train" / "good"
        if folder.is_dir():
            n_train = sum(1 for p in folder.iterdir() if p.is_file()) or DEFAULT_TRAIN_IMAGES
    return n_train, n_train // 2


def study_train_images(study: Study) -> int:
    """The study's training images (see :func:`study_image_counts`)."""
    return study_image_counts(study)[0]


def default_request(study: Study, trial: TrialConfig) -> ResourceRequest:
    """The detector's default request for ``trial`` (before the study's overrides); a
    :class:`ModelError` when the detector refuses the trial's hyperparameters."""
    return detector_request(
        models.get_class(trial.model),
        trial.backbone,
        trial.hparams,
        trial.image_size,
        batch_size=study.evaluation.batch_sizes(trial.model)[0],
        n_train=study_train_images(study),
    )


def trial_resources(
    study: Study,
    trial: TrialConfig,
    cluster: ClusterShape,
    warnings: list[str] | None = None,
) -> ResourceRequest:
    """The resources ``trial`` runs with on ``cluster``.

    Detector default, then the study's ``resources``, then ``resources.models[<model>]``; then
    fitted to the cluster (see the module docstring). What was clipped or changed against the
    study's wish is appended to ``warnings`` (when given) as one line each.
    """
    notes: list[str] = []
    try:
        request = default_request(study, trial)
    except ModelError as error:
        # The trial will fail at once with this error and write an error row: it needs next to
        # nothing, and sizing it must not stop the others.
        request = UNBUILDABLE_REQUEST
        notes.append(f"{_label(trial)}: cannot be built ({error}); it will fail as an error row")
    gpu_memory = cluster.gpu_memory_gb
    if gpu_memory and cluster.gpus and request.gpu > 0:
        # The default share was sized for the reference card: size it for the real one.
        request = request.replace(gpu=gpu_fraction(request.gpu_memory_gb, gpu_memory))
    chosen = {name: getattr(request, name) for name in _FIELDS}
    explicit: set[str] = set()
    layers = [getattr(study, "resources", None)]
    per_model = getattr(layers[0], "models", None) or {}
    layers.append(per_model.get(trial.model) if isinstance(per_model, Mapping) else None)
    for overrides in layers:
        for name in _FIELDS:
            value = _explicit(overrides, name)
            if value is not None:
                chosen[name] = value
                explicit.add(name)
    request = request.replace(**chosen)
    label = _label(trial)

    if request.gpu > 0 and not cluster.gpus:
        if "gpu" in explicit:
            notes.append(f"{label}: the cluster has no GPU; gpu {request.gpu:g} -> 0 (CPU)")
        request = request.replace(gpu=0.0)
    if request.gpu == 0 and "memory_gb" not in explicit:
        # On the CPU the model, its activations and optimiser state live in host memory.
        host = request.memory_gb + max(0.0, request.gpu_memory_gb - DEVICE_OVERHEAD_GB)
        request = request.replace(memory_gb=round(host, 2))
    if request.gpu > 0:
        card = gpu_memory or REFERENCE_GPU_MEMORY_GB
        share = min(request.gpu, 1.0) * card
        if request.gpu_memory_gb > share:
            notes.append(
                f"{label}: estimated {request.gpu_memory_gb:.1f} GB of GPU memory, more than "
                f"the {share:.1f} GB of gpu {request.gpu:g} on a {card:g} GB GPU; it may run "
                "out of memory (lower evaluation.train_batch_size or the image size)"
            )
    request = _clip(request, cluster, label, notes)
    if warnings is not None:
        warnings.extend(notes)
    return request


def _label(trial: TrialConfig) -> str:
    parts = [trial.model]
    if trial.backbone:
        parts.append(trial.backbone)
    return "/".join(parts) + f" {trial.image_size}px"


def _clip(
    request: ResourceRequest, cluster: ClusterShape, label: str, notes: list[str]
) -> ResourceRequest:
    """The request clipped to the largest node that could host it (a GPU node for a GPU
    trial), one note per clipped resource."""
    candidates = [n for n in cluster.nodes if n.gpus > 0] if request.gpu > 0 else cluster.nodes
    candidates = candidates or list(cluster.nodes)
    limits = {
        "cpu": max(n.cpus for n in candidates),
        "gpu": max(n.gpus for n in candidates),
        "memory_gb": max(n.memory_gb for n in candidates),
    }
    changes = {}
    for name, limit in limits.items():
        value = getattr(request, name)
        if value <= limit:
            continue
        if name == "gpu" and limit >= 1:
            limit = float(math.floor(limit))  # whole GPUs above one
        changes[name] = limit
        unit = " GB" if name == "memory_gb" else ""
        notes.append(
            f"{label}: {name} {value:g}{unit} is more than the largest node has; "
            f"clipped to {limit:g}{unit}"
        )
    return request.replace(**changes) if changes else request


def ray_resources(request: ResourceRequest) -> dict[str, float]:
    """The request as ``tune.with_resources`` takes it (memory in bytes)."""
    resources = {"cpu": request.cpu, "gpu": request.gpu}
    if request.memory_gb > 0:
        resources["memory"] = request.memory_gb * 2**30
    return resources


def merge_warnings(lines: Iterable[str]) -> list[str]:
    """Warnings without repeats: lines ``subject: message`` with the same message become one,
    naming its subjects (a clipped CPU request is one line, not one per configuration)."""
    groups: dict[str, list[str]] = {}
    for line in lines:
        subject, colon, message = line.partition(": ")
        subjects = groups.setdefault(message if colon else line, [])
        if colon and subject not in subjects:
            subjects.append(subject)
    merged = []
    for message, subjects in groups.items():
        if len(subjects) <= 1:
            merged.append(f"{subjects[0]}: {message}" if subjects else message)
            continue
        shown = ", ".join(subjects[:4])
        if len(subjects) > 4:
            shown += f" and {len(subjects) - 4} more"
        merged.append(f"{message} ({shown})")
    return merged
