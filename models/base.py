"""The detector protocol and the model registry.

Every detector follows a small scikit-learn-like API: hyperparameters in ``__init__``,
``fit`` on normal images, ``predict`` on a batch. The registry mirrors timm's: a decorator
registers a class under a name and ``create`` builds one from keyword hyperparameters.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from models.backbones import (
    BACKBONES,
    FeatureExtractor,
    get_backbone,
    list_backbones,
    resolve_layers,
)
from models.constraints import Rule, check_hyperparameters
from models.costs import OPTIMIZER_BYTES_PER_PARAM, CostProfile, Work, cost_profile
from models.errors import ModelError, did_you_mean

LearningType = Literal["one_pass", "iterative", "supervised"]
"""``one_pass``: statistics of frozen features in one pass; ``iterative``: trained by gradient
over epochs on normal images; ``supervised``: trained by gradient over epochs on normal images
(label 0) and labelled defects (label 1, with masks): batches are mappings with ``"label"`` and
``"mask"`` (``data.AnomalyDataset.batches``), and a training set without a defect is refused."""
EpochCallback = Callable[[int, dict], bool]
"""``on_epoch_end(epoch, metrics) -> stop?``: epoch counts from 1; return True to stop."""

Batch = Tensor | Mapping[str, Any]
"""A training batch: a ``B x 3 x H x W`` normalised image tensor, or a mapping with ``"image"``."""


@dataclass
class Prediction:
    """What a detector says about a batch of images."""

    score: Tensor
    """``B``: image-level anomaly score, higher = more anomalous."""
    anomaly_map: Tensor | None
    """``B x H x W`` at input resolution, or None for image-level-only detectors."""


# ----------------------------------------------------------------------------- resources

DEFAULT_TRAIN_BATCH_SIZE = 32
"""A study's ``evaluation.train_batch_size`` default."""
DEFAULT_TRAIN_IMAGES = 200
"""Training images assumed when a study does not say (the synthetic glue-line default; MVTec AD
categories have 60-391)."""


def batch_images(batch: Batch) -> Tensor:
    """The image tensor of a batch, whichever form it comes in."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping) and "image" in batch:
        return batch["image"]
    raise TypeError(f"a batch is an image tensor or a mapping with 'image', got {type(batch)!r}")


def iter_images(train: Iterable[Batch]) -> Iterator[Tensor]:
    """Yield the image tensors of an iterable of batches."""
    for batch in train:
        yield batch_images(batch)


class Detector(torch.nn.Module):
    """Base class of every anomaly detector.

    Subclasses set ``learning_type`` and ``localizes``, take every hyperparameter as a keyword
    argument of ``__init__`` (documented there, defaults from the reference study's Table B.8)
    and implement ``fit`` and ``predict``. Randomness comes only from ``seed``.
    """

    name: ClassVar[str] = ""
    learning_type: ClassVar[LearningType] = "one_pass"
    localizes: ClassVar[bool] = True
    """Whether ``predict`` returns an anomaly map."""
    backbone_kinds: ClassVar[tuple[str, ...]] = ("cnn",)
    """Kinds of backbone (``BackboneSpec.kind``) the detector can read features from."""
    supported_backbones: ClassVar[tuple[str, ...] | None] = None
    """When set, the only backbones the detector accepts (e.g. those it has a decoder for)."""
    family_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    """Backbone family (``BackboneSpec.family``) -> hyperparameter defaults that replace the
    signature's on backbones of that family (layers suited to its channel widths). A value the
    caller gives always wins; :func:`trial_hyperparameters` resolves them."""
    hyperparameter_constraints: ClassVar[Mapping[str, Rule]] = {}
    """Hyperparameter -> what its value may be (see :mod:`models.constraints`), checked before
    ``__init__`` runs. Checks relating several hyperparameters or the backbone stay in
    ``__init__``."""
    fixed_input_size: ClassVar[bool] = False
    """Whether a backbone with a fixed input size (``BackboneSpec.input_size``) must be fed
    images of exactly that size (as FastFlow and U-Flow do with their transformers)."""
    square_input: ClassVar[bool] = False
    """Whether the detector needs square images whatever its backbone (none of the zoo does on
    a CNN; fixed-size transformer backbones need them: :meth:`shape_problem`)."""

    @classmethod
    def backbone_problem(
        cls, backbone: str, hparams: Mapping[str, Any] | None = None, image_size: int | None = None
    ) -> str | None:
        """Why this detector cannot run on ``backbone``, or None when it can.

        ``hparams`` are the other hyperparameters of the trial (missing ones take their
        defaults) and ``image_size`` the input size when known. The answer says what would
        work instead. Subclasses with further constraints extend this and call ``super()``.
        """
        spec = get_backbone(backbone)
        if cls.supported_backbones is not None and backbone not in cls.supported_backbones:
            return f"it supports only {', '.join(cls.supported_backbones)}"
        if spec.kind not in cls.backbone_kinds:
            usable = [b for b in list_backbones() if get_backbone(b).kind in cls.backbone_kinds]
            return (
                f"{backbone} is a {spec.kind} backbone and it reads {'/'.join(cls.backbone_kinds)} "
                f"features (e.g. {', '.join(usable[:4])})"
            )
        merged = trial_hyperparameters(cls.name, {**(hparams or {}), "backbone": backbone})
        layers = merged.get("layers")
        if layers is not None:
            try:
                resolve_layers(spec, layers)
            except ModelError as error:
                return str(error)
        if image_size is None:
            return None
        # A CNN's native size (EfficientNet-Lite's) is what it was trained at, not a limit.
        fixed = spec.input_size if cls.fixed_input_size and spec.kind != "cnn" else None
        if fixed is not None and image_size != fixed:
            return f"it feeds {backbone} its native {fixed} px input, not {image_size} px"
        if spec.kind != "composite":
            return spec.size_problem(image_size)
        return None

    @classmethod
    def shape_problem(
        cls,
        backbone: str | None,
        height: int,
        width: int,
        hparams: Mapping[str, Any] | None = None,
    ) -> str | None:
        """Why this detector cannot read ``height`` x ``width`` images (non-square ones, from
        ``dataset.image_size: [height, width]``), or None when it can. Square sizes are
        :meth:`backbone_problem`'s."""
        if height == width:
            return None
        if cls.square_input:
            return f"it needs square images, got {height}x{width} (H x W)"
        if backbone is None:
            return None
        spec = get_backbone(backbone)
        if cls.fixed_input_size and spec.kind != "cnn" and spec.input_size is not None:
            side = spec.input_size
            return f"it feeds {backbone} its native {side}x{side} px input, not {height}x{width}"
        for side in (height, width):
            problem = cls.backbone_problem(backbone, hparams, side)
            if problem is not None:
                return problem
        if spec.kind != "composite":
            return spec.size_problem(height, width)
        return None

    # ------------------------------------------------------------------------- resources

    def resource_probe(self, images: Tensor) -> None:
        """Run, on ``images`` (a meta-device training batch), the forward pass of one training
        step: the networks ``fit`` runs and trains, without losses or optimiser steps.

        :mod:`models.costs` measures it (FLOPs, activations autograd keeps) to size the
        detector's resource request; nothing is computed. The default runs every
        :class:`~models.backbones.FeatureExtractor` of the detector, which is the whole story for
        one-pass detectors; detectors that train networks of their own override it. It must not
        read tensor values (no ``.item()``, no data-dependent shapes).
        """
        for module in self.modules():
            if isinstance(module, FeatureExtractor):
                module(images)

    @classmethod
    def hyperparameter_defaults(cls) -> dict[str, Any]:
        """This detector's hyperparameters and their defaults (None where there is no
        default): its ``__init__``'s keyword arguments."""
        sig = inspect.signature(cls.__init__)
        return {
            k: (None if p.default is inspect.Parameter.empty else p.default)
            for k, p in sig.parameters.items()
            if k != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }

    @classmethod
    def trial_hparams(
        cls, backbone: str | None, hparams: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """Every hyperparameter a trial of this detector runs with (see
        :func:`trial_hyperparameters`); ``backbone``, when given, replaces the one in
        ``hparams``."""
        given = dict(hparams or {})
        if backbone is not None and "backbone" in hyperparameters(cls.name):
            given["backbone"] = backbone
        return trial_hyperparameters(cls.name, given)

    @classmethod
    def cost_profile(
        cls,
        backbone: str | None,
        hparams: Mapping[str, Any] | None,
        image_size: int,
        *,
        batch_size: int = DEFAULT_TRAIN_BATCH_SIZE,
    ) -> CostProfile:
        """Parameters, activations and FLOPs of this detector at ``image_size`` and
        ``batch_size``, measured on the meta device (see :mod:`models.costs`; memoised)."""
        return cost_profile(cls, cls.trial_hparams(backbone, hparams), image_size, batch_size)

    @classmethod
    def fit_state_bytes(
        cls,
        backbone: str | None,
        hparams: Mapping[str, Any] | None,
        image_size: int,
        *,
        n_train: int = DEFAULT_TRAIN_IMAGES,
    ) -> float:
        """Bytes of device memory ``fit`` holds beyond its networks' weights, activations and
        optimiser state (which :meth:`cost_profile` measures): a memory bank, per-position
        covariances. 0 by default; detectors that build such state from ``n_train`` images
        override it. ``sweep.run.resources`` turns this and the profile into a trial's request."""
        return 0

    @classmethod
    def fit_work(
        cls,
        backbone: str | None,
        hparams: Mapping[str, Any] | None,
        image_size: int,
        *,
        n_train: int = DEFAULT_TRAIN_IMAGES,
        epochs: int | None = None,
        batch_size: int = DEFAULT_TRAIN_BATCH_SIZE,
    ) -> Work:
        """The work of a whole ``fit``: ``n_train`` images x the epochs (``epochs``, else the
        detector's default; one pass for one-pass detectors) x the per-image FLOPs and memory
        traffic of :meth:`cost_profile`, and for iterative detectors one optimiser step per
        batch and epoch, each moving ``OPTIMIZER_BYTES_PER_PARAM`` per trained parameter.
        Detectors with costly work beyond their networks (coreset selection, covariance
        inversion) or more steps per batch override it."""
        profile = cls.cost_profile(backbone, hparams, image_size, batch_size=batch_size)
        if cls.learning_type == "one_pass":
            return Work(n_train * profile.forward_flops, n_train * profile.forward_traffic)
        if epochs is None:
            epochs = cls.trial_hparams(backbone, hparams).get("epochs") or 1
        steps = math.ceil(n_train / batch_size) * int(epochs)
        images = n_train * int(epochs)
        return Work(
            images * profile.train_flops,
            images * profile.train_traffic
            + steps * OPTIMIZER_BYTES_PER_PARAM * profile.trainable_params,
            steps,
        )

    @classmethod
    def predict_work(
        cls,
        backbone: str | None,
        hparams: Mapping[str, Any] | None,
        image_size: int,
        *,
        n_train: int = DEFAULT_TRAIN_IMAGES,
        batch_size: int = DEFAULT_TRAIN_BATCH_SIZE,
    ) -> Work:
        """The work of ``predict`` per image: the probe's forward pass. Detectors whose scoring
        costs more (a nearest-neighbour search over a memory bank of ``n_train`` images)
        override it."""
        profile = cls.cost_profile(backbone, hparams, image_size, batch_size=batch_size)
        return Work(profile.forward_flops, profile.forward_traffic)

    def fit(
        self,
        train: Iterable[Batch],
        *,
        epochs: int | None = None,
        on_epoch_end: EpochCallback | None = None,
    ) -> dict:
        """Learn the normal appearance from ``train``; return training statistics.

        ``train`` may be iterated once per epoch. One-pass detectors ignore ``epochs`` and call
        ``on_epoch_end`` once; iterative ones call it after every epoch and stop when it says so.
        """
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        """Score a batch of normalised ``B x 3 x H x W`` images."""
        raise NotImplementedError

    def export_module(self) -> torch.nn.Module:
        """The fitted detector's scoring as a module for deployment (TorchScript, ONNX).

        It takes a normalised float ``B x 3 x H x W`` batch at the fitted image size and
        returns ``(scores B, maps B x H x W)`` equal to :meth:`predict`'s, built only of tensor
        operations that tracing records and ONNX expresses (no faiss, no Python branches on
        tensor values, no in-place writes into slices), so that one trace serves any batch
        size. It shares the detector's tensors; call it after ``fit``. Detectors that do not
        implement it raise :class:`ModelError`.
        """
        exportable = [
            name
            for name, cls in sorted(_REGISTRY.items())
            if cls.export_module is not Detector.export_module
        ]
        raise ModelError(
            f"{self.name or type(self).__name__} cannot be exported yet "
            f"(exportable: {', '.join(exportable) or 'none'})"
        )

    def hparams(self) -> dict[str, Any]:
        """The hyperparameters this detector was built with."""
        return dict(getattr(self, "_hparams", {}))

    def param_counts(self) -> tuple[int, int]:
        """(trainable, frozen) parameter counts, as the reference study's Table 2 counts them."""
        trainable = frozen = 0
        for p in self.parameters():
            if p.requires_grad:
                trainable += p.numel()
            else:
                frozen += p.numel()
        return trainable, frozen

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")


def check_epochs(model: str, value: Any, what: str = "epochs") -> int:
    """``value`` as an epoch count; anything but a positive int is a :class:`ModelError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(f"{model}: {what} must be a positive int, got {value!r}")
    return value


def train_epochs(
    detector: Detector,
    train: Iterable[Batch],
    step: Callable[[Tensor], Mapping[str, float]],
    *,
    epochs: int,
    on_epoch_end: EpochCallback | None = None,
    end_of_epoch: Callable[[int, dict[str, float]], Mapping[str, float] | None] | None = None,
) -> tuple[int, dict[str, float]]:
    """The epoch loop every iterative detector shares; returns (epochs run, last epoch's means).

    ``step(images)`` trains on one batch (already on the detector's device) and returns its
    losses as floats, each a mean over the batch. After every epoch the batch-size-weighted
    means go through ``end_of_epoch(epoch, means)`` (schedules, bookkeeping; what it returns is
    added to the means) and then to ``on_epoch_end(epoch, means)``, which stops training by
    returning True. The detector is in training mode during the loop and in eval mode after it,
    also when it fails. An epoch without images, or with a non-finite loss, is a
    :class:`ModelError` naming the detector.
    """
    device = detector.device
    name = detector.name or type(detector).__name__
    epoch, means = 0, {}
    detector.train()
    try:
        for epoch in range(1, epochs + 1):
            sums: dict[str, float] = {}
            n_images = 0
            for images in iter_images(train):
                images = images.to(device)
                for key, value in step(images).items():
                    sums[key] = sums.get(key, 0.0) + float(value) * images.shape[0]
                n_images += images.shape[0]
            if n_images == 0:
                raise ModelError(f"{name}: the training set is empty")
            means = {key: total / n_images for key, total in sums.items()}
            diverged = [key for key, value in means.items() if not math.isfinite(value)]
            if diverged:
                raise ModelError(
                    f"{name}: training diverged ({diverged[0]} {means[diverged[0]]} in epoch "
                    f"{epoch}); try a lower learning rate"
                )
            if end_of_epoch is not None:
                means.update(end_of_epoch(epoch, means) or {})
            if on_epoch_end is not None and on_epoch_end(epoch, dict(means)):
                break
    finally:
        detector.eval()
    return epoch, means


_REGISTRY: dict[str, type[Detector]] = {}


def register(name: str) -> Callable[[type[Detector]], type[Detector]]:
    """Class decorator: make a detector available as ``models.create(name, ...)``."""

    def wrap(cls: type[Detector]) -> type[Detector]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ModelError(f"detector {name!r} is registered twice")
        cls.name = name
        original_init = cls.__init__
        signature = inspect.signature(original_init)
        # A misspelt table key would silently check nothing: refuse it on import.
        unknown = set(cls.hyperparameter_constraints) - set(signature.parameters) - {"self"}
        if unknown:
            raise TypeError(
                f"detector {name!r} constrains {', '.join(sorted(unknown))}, which its "
                f"__init__ does not take"
            )

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            # The one place hyperparameters are checked: every way of building a detector
            # (create, a direct call, costs.build_on_meta) passes here before the body runs.
            check_hyperparameters(name, cls.hyperparameter_constraints, bound.arguments)
            original_init(self, *args, **kwargs)
            if type(self) is cls:
                self._hparams = {k: v for k, v in bound.arguments.items() if k != "self"}

        __init__.__signature__ = signature  # type: ignore[attr-defined]
        __init__.__doc__ = original_init.__doc__
        cls.__init__ = __init__  # type: ignore[method-assign]
        _REGISTRY[name] = cls
        return cls

    return wrap


def get_class(name: str) -> type[Detector]:
    """The detector class registered as ``name``."""
    # The registry is full before anyone outside the package can call this: detector modules
    # register on import, models/__init__ imports them all, and Python runs it before any
    # `import models.<module>` finishes.
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(
            f"unknown model {name!r}{did_you_mean(name, _REGISTRY)} "
            f"(known: {', '.join(sorted(_REGISTRY))})"
        ) from None


def hyperparameters(name: str) -> dict[str, Any]:
    """A detector's hyperparameters and their defaults (None where there is no default)."""
    return get_class(name).hyperparameter_defaults()


def trial_hyperparameters(name: str, hparams: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every hyperparameter detector ``name`` runs with when built with ``hparams``: those
    given, else its backbone family's defaults (``Detector.family_defaults``), else the
    signature's."""
    cls = get_class(name)
    merged = {**hyperparameters(name), **(hparams or {})}
    if cls.family_defaults and merged.get("backbone") is not None:
        spec = BACKBONES.get(merged["backbone"])
        family = cls.family_defaults.get(spec.family, {}) if spec is not None else {}
        merged.update({k: v for k, v in family.items() if k not in (hparams or {})})
    return merged


def create(name: str, **hparams: Any) -> Detector:
    """Build the detector registered as ``name`` with the given hyperparameters (missing ones
    take their backbone family's defaults, else the signature's).

    An unknown hyperparameter is a :class:`ModelError` naming the closest known one.
    """
    cls = get_class(name)
    known = hyperparameters(name)
    for key in hparams:
        if key not in known:
            raise ModelError(
                f"model {name!r} has no hyperparameter {key!r}{did_you_mean(key, known)} "
                f"(known: {', '.join(sorted(known))})"
            )
    if "backbone" in known:
        check_backbone(name, hparams.get("backbone", known["backbone"]), hparams)
        hparams = trial_hyperparameters(name, hparams)
    return cls(**hparams)


def backbone_problem(
    name: str,
    backbone: str,
    hparams: Mapping[str, Any] | None = None,
    image_size: int | None = None,
) -> str | None:
    """Why detector ``name`` cannot use ``backbone`` (see :meth:`Detector.backbone_problem`)."""
    cls = get_class(name)
    if "backbone" not in hyperparameters(name):
        return f"{name} takes no backbone"
    return cls.backbone_problem(backbone, hparams, image_size)


def shape_problem(
    name: str,
    backbone: str | None,
    height: int,
    width: int,
    hparams: Mapping[str, Any] | None = None,
) -> str | None:
    """Why detector ``name`` cannot read ``height`` x ``width`` images on ``backbone`` (None:
    no backbone), or None (see :meth:`Detector.shape_problem`)."""
    return get_class(name).shape_problem(backbone, height, width, hparams)


def check_backbone(
    name: str,
    backbone: str,
    hparams: Mapping[str, Any] | None = None,
    image_size: int | None = None,
) -> None:
    """Raise :class:`ModelError` naming the pair when detector ``name`` cannot use ``backbone``."""
    problem = backbone_problem(name, backbone, hparams, image_size)
    if problem is not None:
        raise ModelError(f"model {name!r} cannot use backbone {backbone!r}: {problem}")


def compatible_backbones(
    name: str, hparams: Mapping[str, Any] | None = None, image_size: int | None = None
) -> list[str]:
    """The registered backbones detector ``name`` can use with these hyperparameters."""
    if "backbone" not in hyperparameters(name):
        return []
    return [b for b in list_backbones() if backbone_problem(name, b, hparams, image_size) is None]


def list_models() -> list[str]:
    """Names of every registered detector, sorted (see :func:`get_class`)."""
    return sorted(_REGISTRY)
