"""Test-time stress perturbations: a whole split under changed lighting, a different background,
or with its parts rotated or flipped, with the masks still on the defects.

The battery-inspection study in the reference set stress-tested detectors trained on one setup
with test images taken under other lighting, on another background and with cells flipped
upside down; detectors differed most under exactly these shifts. :func:`apply_stress`
reproduces such shifts on any split, deterministically from a seed, and returns a new
:class:`~data.datasets.AnomalyDataset` with the same labels, defects and paths. Every image
gets its own random draw within the stress's ranges.

Kinds (parameters and their defaults are on the ``*Params`` models below):

* ``none``: the split itself, unchanged (the same object).
* ``lighting``: ``gain * ramp * x ** gamma`` for pixel values ``x`` in [0, 1]: a global
  exposure change (``gain``), a tone change (``gamma``) and a linear illumination ramp of
  relative strength ``gradient`` in a random direction (``ramp`` goes from ``1 - gradient`` at
  one side of the image to ``1 + gradient`` at the other).
* ``background``: the low-frequency content of the image is replaced, the structure kept.
  The data sets have no object masks, so the background cannot be cut out; what a new
  background (or new fixture, new illumination) changes is mostly the image's smooth,
  large-scale appearance, while the part's edges, glue beads and defects are its
  high-frequency structure. The image is split at a Gaussian blur of ``sigma`` (a fraction of
  the image side) into ``low + high``; ``low`` is blended with weight ``strength`` towards a
  new field, a random colour (each channel drawn from ``colour``) plus a Perlin texture
  (:func:`data.anomalies.perlin_noise`, amplitude ``texture``, ``texture_scale`` lattice
  cells); ``high`` is added back unchanged.
* ``rotation``: a rotation about the image centre by an angle drawn from
  ``[-max_degrees, max_degrees]``; the image bilinear, the mask nearest-neighbour with the same
  matrix and the same border mode, so the mask stays on the defect (with a reflecting border, a
  defect copied in from outside the frame is marked too).
* ``orientation``: the part turned or flipped (``modes``, one drawn per image: ``rot90``,
  ``rot180``, ``rot270``, ``hflip``, ``vflip``, ``transpose``, ``transverse``), like the
  upside-down cells of the battery study; exact pixel permutations of image and mask.

Photometric stresses (``lighting``, ``background``) leave masks identical. A geometric stress
can move a defect out of the frame: when a rotation would leave an anomalous image's non-empty
mask empty, its angle is redrawn (up to :data:`ROTATION_REDRAWS` times) and, failing that, the
image is left unrotated; so anomalous images keep a non-empty mask.

A study names stresses from :data:`BUILTIN_STRESSES` or defines its own variants,
``{name: {kind: rotation, max_degrees: 30}}``, checked by :func:`parse_stresses`. Bad input is
a :class:`~data.errors.DatasetError` naming the stress and the key.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Annotated, Any, Literal

import cv2
import numpy as np
import torch
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError

from data.anomalies import perlin_noise
from data.datasets import AnomalyDataset
from data.errors import DatasetError

__all__ = [
    "BUILTIN_STRESSES",
    "ROTATION_REDRAWS",
    "STRESS_KINDS",
    "BackgroundParams",
    "LightingParams",
    "NoneParams",
    "OrientationParams",
    "RotationParams",
    "StressSpec",
    "apply_stress",
    "parse_stresses",
]

ROTATION_REDRAWS = 10


# ----------------------------------------------------------------------------- parameters


def _as_pair(value: Any) -> Any:
    """A number means the fixed range (value, value); anything else goes to pydantic as is."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (value, value)
    return value


def _range(low: float, high: float) -> Any:
    """A ``(min, max)`` field with ``low <= min <= max <= high`` (a number for a fixed value)."""

    def check(pair: tuple[float, float]) -> tuple[float, float]:
        lo, hi = pair
        if not (math.isfinite(lo) and math.isfinite(hi) and low <= lo <= hi <= high):
            raise ValueError(f"expected low <= min <= max <= high, with low {low} and high {high}")
        return pair

    return Annotated[tuple[float, float], BeforeValidator(_as_pair), AfterValidator(check)]


def _fraction(low: float, high: float) -> Any:
    def check(value: float) -> float:
        if not (math.isfinite(value) and low < value <= high):
            raise ValueError(f"expected a number in ({low}, {high}]")
        return value

    return Annotated[float, AfterValidator(check)]


# Field types: a factor (gain, gamma), a share of [0, 1], and friends.
_Factor = _range(0.05, 20.0)
_Share = _range(0.0, 1.0)
_Gradient = _range(0.0, 0.99)
_LatticeCells = _range(0.5, 64.0)
_ImageFraction = _fraction(0.0, 1.0)
_Degrees = _fraction(0.0, 180.0)


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoneParams(_Params):
    """``none`` takes no parameters."""


class LightingParams(_Params):
    """``lighting``: each image's ``gain``, ``gamma`` and ``gradient`` are drawn uniformly
    from these ranges (a number fixes the value)."""

    gain: _Factor = (0.75, 1.25)
    gamma: _Factor = (0.8, 1.25)
    gradient: _Gradient = (0.1, 0.3)


class BackgroundParams(_Params):
    """``background``: low-pass cut-off ``sigma`` (fraction of the image side), blend weight
    ``strength`` towards the new field, the new field's per-channel ``colour`` range (0..1),
    its Perlin ``texture`` amplitude and ``texture_scale`` (lattice cells across the image)."""

    sigma: _ImageFraction = 0.05
    strength: _Share = (0.5, 0.5)
    colour: _Share = (0.2, 0.8)
    texture: _Share = (0.1, 0.1)
    texture_scale: _LatticeCells = (2.0, 8.0)


class RotationParams(_Params):
    """``rotation``: angles uniform in ``[-max_degrees, max_degrees]``; ``border`` is how the
    corners are filled, for image and mask alike (``constant`` fills black, mask empty)."""

    max_degrees: _Degrees = 15.0
    border: Literal["reflect", "replicate", "constant"] = "reflect"


OrientationMode = Literal["rot90", "rot180", "rot270", "hflip", "vflip", "transpose", "transverse"]


def _non_empty(modes: tuple[str, ...]) -> tuple[str, ...]:
    if not modes:
        raise ValueError("expected at least one mode")
    return modes


class OrientationParams(_Params):
    """``orientation``: each image gets one of ``modes``, uniformly (one mode: all of them)."""

    modes: Annotated[tuple[OrientationMode, ...], AfterValidator(_non_empty)] = (
        "rot180",
        "hflip",
        "vflip",
    )


_PARAMS: dict[str, type[_Params]] = {
    "none": NoneParams,
    "lighting": LightingParams,
    "background": BackgroundParams,
    "rotation": RotationParams,
    "orientation": OrientationParams,
}
STRESS_KINDS = tuple(_PARAMS)


def _resolve(name: str, kind: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` checked against ``kind``'s model, defaults filled in, as JSON values."""
    where = f"stress {name!r}"
    if not isinstance(kind, str) or kind not in _PARAMS:
        close = difflib.get_close_matches(str(kind), STRESS_KINDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DatasetError(
            f"{where}: key 'kind': unknown stress kind {kind!r}{hint}; "
            f"known: {', '.join(STRESS_KINDS)}"
        )
    model = _PARAMS[kind]
    known = list(model.model_fields)
    for key in params:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            listed = ", ".join(known) if known else "none"
            raise DatasetError(
                f"{where}: key {key!r}: not a parameter of a {kind} stress{hint}; "
                f"its parameters: {listed}"
            )
    try:
        checked = model(**params)
    except ValidationError as error:
        first = error.errors()[0]
        key = first["loc"][0] if first["loc"] else "?"
        message = first["msg"].removeprefix("Value error, ")
        raise DatasetError(f"{where}: key {key!r}: {message} (got {params.get(key)!r})") from error
    return json.loads(json.dumps(checked.model_dump(mode="json")))


# ----------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class StressSpec:
    """A named stress: its ``kind`` (:data:`STRESS_KINDS`) and parameters. The parameters are
    checked and completed with the kind's defaults on construction."""

    name: str
    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        resolved = _resolve(self.name, self.kind, dict(self.params))
        object.__setattr__(self, "params", MappingProxyType(resolved))

    def __hash__(self) -> int:
        return hash((self.name, json.dumps(self.spec(), sort_keys=True)))

    def __reduce__(self) -> tuple:
        # A read-only mapping view cannot be pickled (Ray ships specs to its workers).
        return (StressSpec, (self.name, self.kind, dict(self.params)))

    def spec(self) -> dict[str, Any]:
        """JSON-able ``{"kind": ..., <every parameter, defaults included>}``: what result rows
        record and trial ids hash."""
        return {"kind": self.kind, **json.loads(json.dumps(dict(self.params)))}

    @property
    def is_identity(self) -> bool:
        """True for the ``none`` kind."""
        return self.kind == "none"


BUILTIN_STRESSES: dict[str, StressSpec] = {kind: StressSpec(kind, kind) for kind in STRESS_KINDS}
"""One stress of every kind, with its default parameters, named after the kind."""


def parse_stresses(raw: Mapping[str, Any] | None) -> dict[str, StressSpec]:
    """A study's own stresses, ``{name: {kind: <kind>, <parameter>: <value>, ...}}``, checked
    (unknown kinds and keys, values out of range). A name may not redefine a built-in."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise DatasetError(
            f"stresses: expected a mapping of stress names to {{kind: ..., ...}}, got "
            f"{type(raw).__name__}"
        )
    out = {}
    for name, entry in raw.items():
        where = f"stress {name!r}"
        if not isinstance(name, str) or not name.strip():
            raise DatasetError(f"{where}: a stress's name must be a non-empty string")
        if name in BUILTIN_STRESSES:
            raise DatasetError(
                f"{where}: redefines a built-in stress (built-in: {', '.join(BUILTIN_STRESSES)});"
                " pick another name"
            )
        if not isinstance(entry, Mapping):
            raise DatasetError(
                f"{where}: expected a mapping {{kind: ..., <parameter>: <value>}}, got {entry!r}"
            )
        if "kind" not in entry:
            raise DatasetError(f"{where}: key 'kind' is missing (one of {', '.join(STRESS_KINDS)})")
        params = {k: v for k, v in entry.items() if k != "kind"}
        out[name] = StressSpec(name, entry["kind"], params)
    return out


# ----------------------------------------------------------------------------- applying


def _uniform(g: torch.Generator, pair: tuple[float, float] | list[float]) -> float:
    low, high = pair
    return low + (high - low) * float(torch.rand(1, generator=g, dtype=torch.float64)[0])


def _to_unit(image: torch.Tensor) -> np.ndarray:
    """3 x H x W uint8 to H x W x 3 float32 in [0, 1]."""
    return image.permute(1, 2, 0).numpy().astype(np.float32) / 255.0


def _to_uint8(image: np.ndarray) -> torch.Tensor:
    """H x W x 3 float in [0, 1] (clipped) to 3 x H x W uint8, rounded."""
    out = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    return torch.from_numpy(out.transpose(2, 0, 1).copy())


def _lighting(
    image: torch.Tensor, mask: torch.Tensor, params: Mapping[str, Any], g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    gain, gamma = _uniform(g, params["gain"]), _uniform(g, params["gamma"])
    strength = _uniform(g, params["gradient"])
    angle = _uniform(g, (0.0, 2 * math.pi))
    x = _to_unit(image)
    height, width = x.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    cos, sin = math.cos(angle), math.sin(angle)
    # Projection on the light's direction, scaled so the image spans exactly [-1, 1].
    reach = abs(cos) * (width - 1) / 2 + abs(sin) * (height - 1) / 2
    along = ((xs - (width - 1) / 2) * cos + (ys - (height - 1) / 2) * sin) / max(reach, 1e-6)
    ramp = 1.0 + strength * along
    return _to_uint8(gain * ramp[..., None] * np.power(x, gamma)), mask


def _background(
    image: torch.Tensor, mask: torch.Tensor, params: Mapping[str, Any], g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    x = _to_unit(image)
    height, width = x.shape[:2]
    sigma = params["sigma"] * min(height, width)
    low = cv2.GaussianBlur(x, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    strength = _uniform(g, params["strength"])
    colour = np.array([_uniform(g, params["colour"]) for _ in range(3)], dtype=np.float32)
    amplitude = _uniform(g, params["texture"])
    scale = _uniform(g, params["texture_scale"])
    texture = perlin_noise(height, width, scale, generator=g).numpy()
    field = colour + amplitude * texture[..., None]
    new_low = (1.0 - strength) * low + strength * field
    return _to_uint8((x - low) + new_low), mask


_BORDERS = {
    "reflect": cv2.BORDER_REFLECT_101,
    "replicate": cv2.BORDER_REPLICATE,
    "constant": cv2.BORDER_CONSTANT,
}


def _rotation(
    image: torch.Tensor, mask: torch.Tensor, params: Mapping[str, Any], g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
    binary = mask.numpy().astype(np.uint8)
    height, width = binary.shape
    centre = ((width - 1) / 2, (height - 1) / 2)
    border = _BORDERS[params["border"]]
    limit = params["max_degrees"]
    for _ in range(ROTATION_REDRAWS):
        angle = _uniform(g, (-limit, limit))
        matrix = cv2.getRotationMatrix2D(centre, angle, 1.0)
        rotated_mask = cv2.warpAffine(
            binary, matrix, (width, height), flags=cv2.INTER_NEAREST, borderMode=border
        )
        # A defect turned wholly out of the frame would leave an anomaly with nothing to find.
        if rotated_mask.any() or not binary.any():
            break
    else:
        return image.clone(), mask.clone()
    rotated = cv2.warpAffine(
        pixels, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=border
    )
    return (
        torch.from_numpy(rotated.transpose(2, 0, 1).copy()),
        torch.from_numpy(rotated_mask.astype(bool)),
    )


# Each as a function of an ... x H x W tensor (image 3 x H x W or mask H x W alike).
_ORIENTATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "rot90": lambda t: torch.rot90(t, 1, dims=(-2, -1)),
    "rot180": lambda t: torch.rot90(t, 2, dims=(-2, -1)),
    "rot270": lambda t: torch.rot90(t, 3, dims=(-2, -1)),
    "hflip": lambda t: torch.flip(t, dims=(-1,)),
    "vflip": lambda t: torch.flip(t, dims=(-2,)),
    "transpose": lambda t: t.transpose(-2, -1),
    "transverse": lambda t: torch.rot90(t, 2, dims=(-2, -1)).transpose(-2, -1),
}


def _orientation(
    image: torch.Tensor, mask: torch.Tensor, params: Mapping[str, Any], g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    modes = params["modes"]
    turn = _ORIENTATIONS[modes[int(torch.randint(len(modes), (1,), generator=g)[0])]]
    return turn(image).contiguous(), turn(mask).contiguous()


_APPLY = {
    "lighting": _lighting,
    "background": _background,
    "rotation": _rotation,
    "orientation": _orientation,
}
_PHOTOMETRIC = ("lighting", "background")


def apply_stress(dataset: AnomalyDataset, spec: StressSpec, *, seed: int) -> AnomalyDataset:
    """``dataset`` under the stress ``spec``, every random draw from ``seed``: a new data set
    with the same labels, defects and paths, perturbed pixels and (for geometric stresses)
    masks moved with them. ``none`` returns ``dataset`` itself."""
    if not isinstance(spec, StressSpec):
        raise DatasetError(f"apply_stress: expected a StressSpec, got {spec!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DatasetError(f"apply_stress: seed must be an int, got {seed!r}")
    if spec.is_identity:
        return dataset
    height, width = dataset.pixels.shape[-2:]
    if spec.kind == "orientation" and height != width:
        turns = {"rot90", "rot270", "transpose", "transverse"} & set(spec.params["modes"])
        if turns:
            raise DatasetError(
                f"stress {spec.name!r}: modes {sorted(turns)} need square images, "
                f"got {height} x {width}"
            )
    g = torch.Generator().manual_seed(seed)
    apply = _APPLY[spec.kind]
    pixels = torch.empty_like(dataset.pixels)
    masks = dataset.masks.clone()
    for i in range(len(dataset)):
        pixels[i], moved = apply(dataset.pixels[i], dataset.masks[i], spec.params, g)
        if spec.kind not in _PHOTOMETRIC:
            masks[i] = moved
    return AnomalyDataset(
        pixels=pixels,
        labels=dataset.labels.clone(),
        masks=masks,
        defects=list(dataset.defects),
        paths=list(dataset.paths),
        # Which images have a mask file does not change under a stress.
        mask_present=dataset._mask_present.clone(),
    )
