"""Training augmentations: named sets of albumentations transforms, applied per image.

A study trains a detector under one *augmentation set* at a time: ``none``, one of the
reference study's three modes, or all three together (Chen et al. 2025, section 3.5 and
Table 3: Defocus for focus errors, RandomBrightnessContrast for lighting changes, ISONoise for
sensor noise, each with ``p = 0.5``). A study may define its own sets in the same form the
result rows record them::

    augmentation_sets:
      blur: [{GaussianBlur: {blur_limit: [3, 7], p: 0.5}}]

Sets are checked when they are parsed, before any trial runs: each transform is instantiated
(albumentations validates its arguments, strictly: an unknown argument is an error, not a
warning) and then applied, always (``p = 1``), to two probe images of different sizes. A set
must keep every image's size and uint8 dtype at *every* size, because one set serves every
image size of a study and all images of a split are stacked into one tensor; so crops,
resizes, pads and transforms with a fixed output size are refused, while flips, rotations
that keep the frame, blurs and colour changes are fine. (Training images have no masks, so
geometric transforms are allowed here; test-time perturbations with masks are in
:mod:`data.stress`.)

:class:`Augmenter` applies a set to uint8 ``N x 3 x H x W`` batches. Its random draws come
from ``A.Compose(..., seed=seed)`` alone, never from global random state: two augmenters with
the same seed produce the same images, and each call continues the stream, so every epoch
sees new draws.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from data.errors import DatasetError

# albumentations asks PyPI for a newer version on every import (a network call with a 2 s
# timeout, in every Ray worker); a user who wants the check can still set the variable to 0.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A

__all__ = [
    "BUILTIN_AUGMENTATIONS",
    "AugmentationSet",
    "Augmenter",
    "TransformSpec",
    "augmentation_sets",
    "parse_augmentation_sets",
]


# ----------------------------------------------------------------------------- specs


def _json_value(value: Any, where: str) -> Any:
    """``value`` in canonical JSON form (tuples as lists), or a DatasetError naming ``where``."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DatasetError(f"{where}: expected a finite number, got {value!r}")
        return value
    if isinstance(value, list | tuple):
        return [_json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise DatasetError(f"{where}: keys must be strings, got {k!r}")
            out[k] = _json_value(v, f"{where}.{k}")
        return out
    raise DatasetError(
        f"{where}: expected a JSON value (number, string, boolean, list, mapping), "
        f"got {type(value).__name__} {value!r}"
    )


@dataclass(frozen=True)
class TransformSpec:
    """One albumentations transform: its class name in ``albumentations`` and the keyword
    arguments it is built with (JSON values; tuples are kept as lists)."""

    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        kwargs = _json_value(dict(self.kwargs), f"{self.name}")
        object.__setattr__(self, "kwargs", MappingProxyType(kwargs))

    def __hash__(self) -> int:
        return hash(json.dumps(self.spec(), sort_keys=True))

    def __reduce__(self) -> tuple:
        # A read-only mapping view cannot be pickled (Ray ships specs to its workers).
        return (TransformSpec, (self.name, dict(self.kwargs)))

    def spec(self) -> dict[str, dict[str, Any]]:
        """``{name: kwargs}``, as a study file writes it."""
        return {self.name: json.loads(json.dumps(dict(self.kwargs)))}

    def build(self, **overrides: Any) -> A.BasicTransform:
        """A new albumentations transform (``overrides`` replace arguments, e.g. ``p``).

        Raises DatasetError for an unknown name or arguments albumentations refuses.
        """
        return _instantiate(self.name, {**self.kwargs, **overrides})


@dataclass(frozen=True)
class AugmentationSet:
    """A named sequence of transforms, applied in order to each training image; each
    transform fires with its own probability ``p``."""

    name: str
    transforms: tuple[TransformSpec, ...] = ()

    def spec(self) -> list[dict[str, dict[str, Any]]]:
        """JSON-able description, ``[{"Defocus": {"p": 0.5, ...}}, ...]``: what result rows
        record and trial ids hash. It lists the arguments the set gives, not albumentations'
        defaults for the others."""
        return [t.spec() for t in self.transforms]

    @property
    def is_identity(self) -> bool:
        """True when the set has no transforms (images pass through untouched)."""
        return not self.transforms

    def compose(self, seed: int) -> A.Compose:
        """The set as one ``A.Compose`` whose random draws all come from ``seed`` (>= 0)."""
        transforms = [t.build() for t in self.transforms]
        compose = A.Compose(transforms, seed=seed)
        # albumentations 2.0 seeds every transform of a Compose with the same seed, so their
        # p = 0.5 draws coincide (Table 3's three transforms would fire in only four of eight
        # patterns); each transform gets its own stream, spawned from the set's seed.
        streams = np.random.SeedSequence(seed).spawn(len(transforms))
        for transform, stream in zip(transforms, streams, strict=True):
            transform.set_random_seed(int(stream.generate_state(1)[0]))
        return compose


def _set(name: str, *transforms: tuple[str, dict[str, Any]]) -> AugmentationSet:
    return AugmentationSet(name, tuple(TransformSpec(n, kw) for n, kw in transforms))


# Table 3 of Chen et al. 2025 ("parameter settings for data augmentation"), exactly.
_DEFOCUS = ("Defocus", {"p": 0.5, "radius": [3, 10], "alias_blur": [0.1, 0.5]})
_BRIGHTNESS_CONTRAST = (
    "RandomBrightnessContrast",
    {
        "p": 0.5,
        "brightness_limit": [-0.2, 0.2],
        "contrast_limit": [-0.2, 0.2],
        "brightness_by_max": True,
    },
)
_ISO_NOISE = ("ISONoise", {"p": 0.5, "color_shift": [0.01, 0.05], "intensity": [0.1, 0.5]})

BUILTIN_AUGMENTATIONS: dict[str, AugmentationSet] = {
    "none": _set("none"),
    "defocus": _set("defocus", _DEFOCUS),
    "brightness_contrast": _set("brightness_contrast", _BRIGHTNESS_CONTRAST),
    "iso_noise": _set("iso_noise", _ISO_NOISE),
    # The three together, in Table 3's order, each still firing on its own with p = 0.5.
    "table3_all": _set("table3_all", _DEFOCUS, _BRIGHTNESS_CONTRAST, _ISO_NOISE),
}
"""The reference study's augmentation modes (Chen et al. 2025, Table 3), one at a time and
all together, plus ``none``."""


# ----------------------------------------------------------------------------- validation


@functools.cache
def _transform_names() -> list[str]:
    """Names of the concrete albumentations transforms a set may use."""
    base = (A.BasicTransform, A.ImageOnlyTransform, A.DualTransform, A.Transform3D)
    return sorted(
        name
        for name, obj in vars(A).items()
        if inspect.isclass(obj) and issubclass(obj, A.BasicTransform) and obj not in base
    )


def _instantiate(name: str, kwargs: Mapping[str, Any]) -> A.BasicTransform:
    """``albumentations.<name>(**kwargs)`` with strict argument checking."""
    names = _transform_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        if inspect.isclass(getattr(A, name, None)):
            hint = " (compositions such as OneOf are not supported; list transforms directly)"
        raise DatasetError(f"unknown albumentations transform {name!r}{hint}")
    if "strict" in kwargs:
        raise DatasetError(f"{name}: 'strict' is set by anomaly-sweep, leave it out")
    try:
        return getattr(A, name)(**kwargs, strict=True)
    except ValueError as error:
        cause = error.__cause__
        if isinstance(cause, ValidationError):
            # pydantic's own text repeats links and types; name each argument and its problem.
            problems = {}
            for item in cause.errors():
                key = str(item["loc"][0]) if item["loc"] else "arguments"
                problems.setdefault(key, item["msg"])
            detail = "; ".join(f"{key!r}: {msg}" for key, msg in problems.items())
            raise DatasetError(f"{name}: bad argument {detail}") from error
        raise DatasetError(f"{name}: {error}") from error
    except TypeError as error:
        raise DatasetError(f"{name}: {error}") from error


# Two square probe sizes, neither a common image size, so a transform that crops, pads or
# resizes to a fixed size shows it on at least one of them.
_PROBE_SIZES = (37, 101)


def _probe_images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (s, s, 3), dtype=np.uint8) for s in _PROBE_SIZES]


def _check_keeps_size(spec: TransformSpec) -> None:
    """Apply ``spec`` (always firing) to the probe images: it must run on an image alone and
    return the same shape and uint8 dtype."""
    transform = spec.build(p=1.0)
    compose = A.Compose([transform], seed=0)
    for image in _probe_images():
        try:
            out = compose(image=image)["image"]
        except Exception as error:  # any failure here is the transform's own
            raise DatasetError(
                f"{spec.name}: cannot be applied to a {image.shape[0]} x {image.shape[1]} RGB "
                f"image on its own ({type(error).__name__}: {error})"
            ) from error
        shape = getattr(out, "shape", None)
        if shape != image.shape:
            raise DatasetError(
                f"{spec.name}: changes the image size ({image.shape} -> {shape}); every image "
                "of a split must keep its size, at every image size of the study"
            )
        if out.dtype != np.uint8:
            raise DatasetError(
                f"{spec.name}: returns {out.dtype} images; augmentations must keep uint8"
            )


def _parse_set(name: Any, raw: Any) -> AugmentationSet:
    where = f"augmentation set {name!r}"
    if not isinstance(name, str) or not name.strip():
        raise DatasetError(f"{where}: a set's name must be a non-empty string")
    if name in BUILTIN_AUGMENTATIONS:
        raise DatasetError(
            f"{where}: redefines a built-in set (built-in: {', '.join(BUILTIN_AUGMENTATIONS)}); "
            "pick another name"
        )
    if isinstance(raw, str | bytes | Mapping) or not isinstance(raw, Sequence):
        raise DatasetError(
            f"{where}: expected a list of {{TransformName: {{arguments}}}} items, got "
            f"{type(raw).__name__}"
        )
    if not raw:
        raise DatasetError(f"{where}: no transforms; use the built-in 'none' for no augmentation")
    transforms = []
    for index, item in enumerate(raw):
        at = f"{where}: item {index}"
        if not isinstance(item, Mapping) or len(item) != 1:
            raise DatasetError(
                f"{at}: expected a mapping with one key, {{TransformName: {{arguments}}}}, "
                f"got {item!r}"
            )
        ((transform, kwargs),) = item.items()
        if not isinstance(transform, str):
            raise DatasetError(f"{at}: the transform name must be a string, got {transform!r}")
        kwargs = {} if kwargs is None else kwargs
        if not isinstance(kwargs, Mapping):
            raise DatasetError(
                f"{at}: {transform!r}: arguments must be a mapping of keyword arguments, "
                f"got {kwargs!r}"
            )
        try:
            spec = TransformSpec(transform, kwargs)
            _check_keeps_size(spec)
        except DatasetError as error:
            raise DatasetError(f"{at}: {error}") from error
        transforms.append(spec)
    return AugmentationSet(name, tuple(transforms))


def parse_augmentation_sets(raw: Mapping[str, Any]) -> dict[str, AugmentationSet]:
    """A study's own sets, ``{set_name: [{AlbumentationsClassName: {kwargs}}, ...]}``,
    validated eagerly (see the module docstring).

    Raises DatasetError naming the set, the item's index (from 0) and the transform or
    argument at fault.
    """
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise DatasetError(
            f"augmentation sets: expected a mapping of set names to transform lists, got "
            f"{type(raw).__name__}"
        )
    return {name: _parse_set(name, value) for name, value in raw.items()}


def augmentation_sets(study_defined: Mapping[str, Any] | None = None) -> dict[str, AugmentationSet]:
    """Every set a study can name: the built-in ones and its own (raw, as in the study
    file; parsed and validated here)."""
    return {**BUILTIN_AUGMENTATIONS, **parse_augmentation_sets(study_defined or {})}


# ----------------------------------------------------------------------------- applying


class Augmenter:
    """Applies an :class:`AugmentationSet` to uint8 ``N x 3 x H x W`` batches, each image
    independently.

    Args:
        aug_set: The set to apply.
        seed: Source of every random draw. Calls continue one stream, so a second epoch gets
            new draws; another augmenter with the same seed repeats them exactly.
    """

    def __init__(self, aug_set: AugmentationSet, seed: int) -> None:
        if not isinstance(aug_set, AugmentationSet):
            raise DatasetError(f"Augmenter: expected an AugmentationSet, got {aug_set!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise DatasetError(f"Augmenter: seed must be an int >= 0, got {seed!r}")
        self.aug_set = aug_set
        self.seed = seed
        self._compose = None if aug_set.is_identity else aug_set.compose(seed)

    def __repr__(self) -> str:
        return f"Augmenter({self.aug_set.name!r}, seed={self.seed})"

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """The batch augmented: same shape, dtype and device. The identity set returns
        ``pixels`` itself."""
        if not isinstance(pixels, torch.Tensor) or pixels.dtype != torch.uint8:
            raise DatasetError(f"Augmenter: expected a uint8 tensor, got {_describe(pixels)}")
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise DatasetError(
                f"Augmenter: expected N x 3 x H x W pixels, got {tuple(pixels.shape)}"
            )
        if self._compose is None:
            return pixels
        # One channels-last copy of the batch for OpenCV; each image is then a view into it.
        images = pixels.detach().cpu().permute(0, 2, 3, 1).contiguous().numpy()
        out = np.empty_like(images)
        for i, image in enumerate(images):
            augmented = self._compose(image=image)["image"]
            if augmented.shape != image.shape or augmented.dtype != np.uint8:
                raise DatasetError(
                    f"augmentation set {self.aug_set.name!r}: turned a {image.shape} uint8 "
                    f"image into {augmented.shape} {augmented.dtype}"
                )
            out[i] = augmented
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().to(pixels.device)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {tuple(value.shape)}"
    return type(value).__name__
