"""Synthetic glue-line images: the default data set of anomaly-sweep.

The reference study (Chen et al. 2025, section 3.2) inspects grayscale 480 x 640 camera images of
a glue bead laid along sheet-metal edges of a car body, and makes its defective images by warping
the bead inside five named segments A-E with GIMP. Its images are confidential, so this module
renders look-alikes:

* a static *part*: sheet-metal plates with edges, holes and a brushed texture, a darker region
  under segment A, a component close below segment B, a small hole above segment C, sheet metal
  below C and D, and a branch (segment E) that detaches from the main line in a curve towards the
  upper right corner (:class:`PartSpec`);
* per image, the natural variation of a production line: the part shifts by a few pixels, the
  robot lays the bead with a slightly different path and width, and the lighting changes (global
  gain and offset, an illumination gradient, a lamp hot spot) under sensor noise;
* the bead itself, drawn as a dense chain of anti-aliased discs along its centreline and shaded
  like a raised bead (a ridge from the distance transform, a lit and a shadowed flank, a small
  cast shadow);
* defects that change the bead only: the study's local warps (``warp_small``, ``warp_large``, a
  smooth displacement field like GIMP's warp tool) and the five sealant defect types of the
  car-underbody sealant inspection paper among the project's references (``003``, sections
  4.2-4.3): ``bifurcation``, ``missing``, ``narrowing``, ``misalignment`` and ``hole``.

A defect's ground-truth mask is where the defective image differs from the image the same draws
give without the defect: the XOR of the two bead silhouettes plus every pixel whose noise-free,
unlit brightness changed by more than a few gray levels (a narrowed bead's lower ridge, a moved
shadow), lightly dilated; a misalignment gets a wider margin, as in the sealant paper. A draw
that changes too few pixels is redrawn, so no mask is empty.

Everything random comes from the ``numpy.random.Generator`` passed in. :func:`render_defect`
draws the defect-free scene first, with the same draws in the same order as
:func:`render_normal`, so ``render_defect(part, d, default_rng(s))`` and
``render_normal(part, default_rng(s))`` show the same scene and differ only around the mask.

:func:`generate` writes a data set in the MVTec AD layout plus a validation split holding its
own synthetic defects (so thresholds are never fit on the test split)::

    <root>/<part>/train/good/000.png
    <root>/<part>/val/good/*.png            <root>/<part>/val/<defect>/<nnn>_seg<S>.png
    <root>/<part>/test/good/*.png           <root>/<part>/test/<defect>/<nnn>_seg<S>.png
    <root>/<part>/ground_truth/<defect>/<nnn>_seg<S>_mask.png
    <root>/<part>/val_ground_truth/<defect>/<nnn>_seg<S>_mask.png
    <root>/<part>/manifest.json

where ``<S>`` is the segment (A-E) the defect lies in; the images of each defect type take the
segments in turn, so every type covers all five.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from data.errors import DatasetError

__all__ = [
    "DEFECT_TYPES",
    "GENERATOR_VERSION",
    "PARTS",
    "SEGMENTS",
    "GlueSetConfig",
    "Hole",
    "Lighting",
    "PartSpec",
    "Plate",
    "Segment",
    "ensure_generated",
    "generate",
    "render_defect",
    "render_normal",
]

#: Bumped whenever a change makes the generator write different images for the same inputs;
#: :func:`ensure_generated` then refuses to reuse data sets written by an older version.
GENERATOR_VERSION = 2

DEFECT_TYPES: tuple[str, ...] = (
    "warp_small",
    "warp_large",
    "bifurcation",
    "missing",
    "narrowing",
    "misalignment",
    "hole",
)
SEGMENTS: tuple[str, ...] = ("A", "B", "C", "D", "E")

#: Geometry in a :class:`PartSpec` is in pixels of the reference 480 x 640 (H x W) image.
REFERENCE_HEIGHT = 480
REFERENCE_WIDTH = 640

Point = tuple[float, float]


# ----------------------------------------------------------------------------- part description


@dataclass(frozen=True)
class Plate:
    """A flat piece of sheet metal (or any other component): a polygon of uniform brightness
    whose outline is drawn as a bright bevelled edge."""

    polygon: tuple[Point, ...]
    level: float
    edge: float = 22.0  # brightness added along the outline (light catching the sheet edge)


@dataclass(frozen=True)
class Hole:
    """An elliptic hole through the metal: dark inside, with a bright rim."""

    center: Point
    radii: Point
    level: float = 22.0
    rim: float = 35.0  # brightness added on the rim
    angle: float = 0.0  # degrees


@dataclass(frozen=True)
class Segment:
    """A named stretch of a bead: a fraction range of one stroke's arc length."""

    name: str
    on_branch: bool  # False: the main line, True: the branch
    start: float
    end: float


@dataclass(frozen=True)
class Lighting:
    """How the illumination varies between images (each value is drawn uniformly per image)."""

    gain: tuple[float, float] = (0.92, 1.08)  # global multiplicative gain
    offset: tuple[float, float] = (-8.0, 8.0)  # global additive offset, gray levels
    gradient: float = 0.12  # largest relative brightness change across the image
    hotspot: tuple[float, float] = (0.0, 0.1)  # relative strength of a lamp reflection
    noise_sigma: tuple[float, float] = (2.0, 3.5)  # sensor noise, gray levels


@dataclass(frozen=True)
class PartSpec:
    """Everything that makes one part (category) look the way it does.

    Coordinates are in pixels of a 480 x 640 (H x W) image and scale with the rendered size.
    """

    name: str
    description: str
    main_path: tuple[Point, ...]  # control points of the main bead, left to right
    branch_path: tuple[Point, ...]  # control points of the branch (segment E), from the main line
    segments: tuple[Segment, ...]
    plates: tuple[Plate, ...]
    holes: tuple[Hole, ...]
    lighting: Lighting = field(default_factory=Lighting)
    background_level: float = 70.0  # the structure behind all plates
    texture: float = 6.0  # amplitude of the metal's low-frequency blotches and brushing
    texture_seed: int = 0  # the texture is part of the part: fixed, not drawn per image
    bead_radius: float = 8.0
    bead_level: float = 100.0  # gray level of the bead at its edge
    bead_ridge: float = 55.0  # brightness added at the top of the bead
    bead_relief: float = 25.0  # brightness difference between the lit and the shadowed flank
    bead_shadow: float = 0.3  # darkening of the cast shadow beside the bead
    jitter_px: float = 4.0  # the part moves by up to this many pixels between images
    bead_wobble_px: float = 1.5  # natural lateral variation of the bead path
    bead_width_variation: float = 0.06  # natural relative variation of the bead radius

    def __post_init__(self) -> None:
        names = [segment.name for segment in self.segments]
        if sorted(names) != sorted(SEGMENTS):
            raise DatasetError(
                f"part {self.name!r}: segments must be exactly {', '.join(SEGMENTS)}, got {names}"
            )
        if len(self.main_path) < 2 or len(self.branch_path) < 2:
            raise DatasetError(f"part {self.name!r}: a bead path needs at least 2 control points")


def _fingerprint(spec: PartSpec) -> str:
    """A short stable digest of what a part looks like (its description aside), recorded in
    the manifest so that a changed part definition is never served from an old data set."""
    return hashlib.sha256(repr(replace(spec, description="")).encode()).hexdigest()[:16]


_STANDARD_SEGMENTS = (
    Segment("A", False, 0.10, 0.32),
    Segment("B", False, 0.40, 0.57),
    Segment("C", False, 0.63, 0.76),
    Segment("D", False, 0.83, 0.96),
    Segment("E", True, 0.05, 0.62),
)


def _points(text: str) -> tuple[Point, ...]:
    """``"x,y x,y ..."`` as a tuple of points (keeps the part tables below readable)."""
    return tuple((float(x), float(y)) for x, y in (pair.split(",") for pair in text.split()))


PARTS: dict[str, PartSpec] = {
    "part1": PartSpec(
        name="part1",
        description="the study's main part: moderate difficulty, moderate lighting changes",
        main_path=_points(
            "-20,248 40,246 110,252 180,262 250,268 320,268 390,264 460,261 530,262 600,267 660,270"
        ),
        branch_path=_points("510,262 542,249 564,216 579,170 594,120 610,70 624,20 634,-25"),
        segments=_STANDARD_SEGMENTS,
        plates=(
            # The upper sheet: its lower edge runs under the bead (the seam being sealed).
            Plate(
                _points(
                    "0,0 640,0 640,266 600,264 530,259 460,258 390,261 320,265 250,265 "
                    "180,259 110,249 40,243 0,243"
                ),
                level=118,
            ),
            # A flange in the upper right corner whose edge the branch follows.
            Plate(
                _points("552,252 572,214 586,168 600,118 616,68 630,18 638,0 640,0 640,262"),
                level=150,
            ),
            # Area A: "a darker background underneath".
            Plate(_points("30,257 215,271 228,362 150,398 25,372"), level=30, edge=10),
            # Area B: a component very close below the bead.
            Plate(_points("238,283 415,281 420,352 236,354"), level=148),
            # Areas C and D: a long sheet below the bead.
            Plate(_points("428,281 640,285 640,430 432,425"), level=110),
            Plate(_points("0,405 640,442 640,480 0,480"), level=92),
        ),
        holes=(
            Hole((458, 236), (7, 7)),  # area C: "a small hole above it"
            Hole((150, 120), (26, 22)),
            Hole((330, 150), (12, 12)),
            Hole((420, 78), (16, 10), angle=15),
            Hole((322, 318), (10, 10), level=30),
            Hole((540, 360), (18, 14), angle=-10),
        ),
        texture_seed=1,
    ),
    "part6": PartSpec(
        name="part6",
        description="an easier part: clean metal, a high-contrast bead, steady lighting",
        main_path=_points(
            "-20,230 60,236 140,250 220,266 300,276 380,280 460,276 530,266 600,258 660,254"
        ),
        branch_path=_points("514,268 546,246 570,206 590,156 608,106 624,56 634,6 640,-30"),
        segments=_STANDARD_SEGMENTS,
        plates=(
            Plate(
                _points(
                    "0,0 640,0 640,252 600,255 530,263 460,273 380,277 300,273 220,263 "
                    "140,247 60,233 0,229"
                ),
                level=100,
            ),
            Plate(_points("40,246 220,276 230,340 40,330"), level=62, edge=8),
            Plate(_points("0,300 640,290 640,480 0,480"), level=150),
        ),
        holes=(Hole((478, 250), (7, 7)), Hole((200, 110), (20, 20)), Hole((420, 390), (14, 14))),
        lighting=Lighting(
            gain=(0.96, 1.04),
            offset=(-4.0, 4.0),
            gradient=0.05,
            hotspot=(0.0, 0.04),
            noise_sigma=(1.5, 2.5),
        ),
        background_level=80.0,
        texture=3.0,
        texture_seed=6,
        bead_level=170.0,
        bead_ridge=50.0,
        bead_wobble_px=1.0,
        bead_width_variation=0.04,
        jitter_px=3.0,
    ),
    "part16": PartSpec(
        name="part16",
        description=(
            "the hard part: shiny metal under strongly changing light, from dark to overexposed"
        ),
        main_path=_points(
            "-20,300 70,296 150,286 230,272 310,262 390,258 470,260 540,266 610,274 660,278"
        ),
        branch_path=_points("496,261 528,240 550,202 566,152 582,102 598,52 610,2 616,-30"),
        segments=_STANDARD_SEGMENTS,
        plates=(
            Plate(
                _points(
                    "0,0 640,0 640,276 610,272 540,264 470,258 390,256 310,260 230,270 "
                    "150,284 70,294 0,297"
                ),
                level=135,
            ),
            Plate(
                _points("540,250 560,206 576,154 592,104 608,54 620,0 640,0 640,270"),
                level=170,
            ),
            Plate(_points("40,312 240,290 250,380 60,400"), level=35, edge=12),
            Plate(_points("270,280 460,278 470,360 268,362"), level=160),
            Plate(_points("480,284 640,292 640,480 470,480"), level=125),
        ),
        holes=(
            Hole((440, 232), (7, 7)),
            Hole((120, 150), (24, 24)),
            Hole((300, 110), (14, 10), angle=-20),
            Hole((360, 320), (11, 11), level=30),
        ),
        lighting=Lighting(
            gain=(0.55, 1.65),
            offset=(-25.0, 25.0),
            gradient=0.35,
            hotspot=(0.0, 0.7),
            noise_sigma=(2.5, 5.0),
        ),
        background_level=60.0,
        texture=8.0,
        texture_seed=16,
        bead_level=115.0,
        bead_ridge=45.0,
        jitter_px=5.0,
    ),
}


# ----------------------------------------------------------------------------- data-set config


@dataclass(frozen=True)
class GlueSetConfig:
    """How many images of each kind :func:`generate` renders, and at which size.

    ``n_val_defect`` and ``n_test_defect`` count images per defect type.
    """

    n_train: int = 200
    n_val_good: int = 20
    n_val_defect: int = 4
    n_test_good: int = 40
    n_test_defect: int = 6
    height: int = 480
    width: int = 640
    defect_types: tuple[str, ...] = DEFECT_TYPES

    def __post_init__(self) -> None:
        for name in ("n_train", "n_val_good", "n_val_defect", "n_test_good", "n_test_defect"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise DatasetError(f"GlueSetConfig.{name}: expected an integer >= 0, got {value!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 32:
                raise DatasetError(
                    f"GlueSetConfig.{name}: expected an integer >= 32, got {value!r}"
                )
        if isinstance(self.defect_types, str):
            raise DatasetError(
                f"GlueSetConfig.defect_types: expected a sequence of defect types, got the "
                f"string {self.defect_types!r}"
            )
        defects = tuple(self.defect_types)
        unknown = [d for d in defects if d not in DEFECT_TYPES]
        if unknown:
            raise DatasetError(
                f"GlueSetConfig.defect_types: unknown {unknown} (known: {', '.join(DEFECT_TYPES)})"
            )
        if len(set(defects)) != len(defects):
            raise DatasetError(f"GlueSetConfig.defect_types: duplicates in {list(defects)}")
        object.__setattr__(self, "defect_types", defects)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the manifest's ``config``)."""
        values = asdict(self)
        values["defect_types"] = list(self.defect_types)
        return values


# ----------------------------------------------------------------------------- static layout


@dataclass(frozen=True)
class _Layout:
    """What does not change between images of one part at one size (cached)."""

    background: np.ndarray  # float32, (H + 2 margin) x (W + 2 margin), read-only
    margin: int
    strokes: tuple[np.ndarray, ...]  # nominal centrelines (main, branch): N x 2, one px apart
    segments: dict[str, tuple[int, int, int]]  # name -> (stroke index, first, last point index)
    scale: float  # geometric mean of the x and y scale factors, for lengths
    radius: float  # nominal bead radius in pixels
    # Defects are sized in this unit: the scale, or more where the bead radius hit its floor
    # in a small image (so that a defect stays large enough to change the bead).
    unit: float


def _resolve(part: str | PartSpec) -> PartSpec:
    if isinstance(part, PartSpec):
        return part
    if part not in PARTS:
        raise DatasetError(f"unknown glue-line part {part!r} (known: {', '.join(sorted(PARTS))})")
    return PARTS[part]


def _spline(control: np.ndarray, step: float = 1.0) -> np.ndarray:
    """Points ``step`` pixels apart along a Catmull-Rom spline through ``control`` (N x 2)."""
    padded = np.vstack([2 * control[0] - control[1], control, 2 * control[-1] - control[-2]])
    t = np.linspace(0.0, 1.0, 48, endpoint=False)[:, None]
    pieces = []
    for i in range(1, len(padded) - 2):
        p0, p1, p2, p3 = padded[i - 1 : i + 3]
        pieces.append(
            0.5
            * (
                2 * p1
                + (p2 - p0) * t
                + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                + (3 * p1 - p0 - 3 * p2 + p3) * t**3
            )
        )
    dense = np.vstack([*pieces, control[-1:]])
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(dense, axis=0).T))])
    target = np.linspace(0.0, arc[-1], max(2, math.ceil(arc[-1] / step) + 1))
    return np.column_stack(
        [np.interp(target, arc, dense[:, 0]), np.interp(target, arc, dense[:, 1])]
    )


def _normals(points: np.ndarray) -> np.ndarray:
    """Unit normals (pointing to the left of the direction of travel, i.e. up for a line
    running left to right in image coordinates) of a polyline."""
    tangent = np.gradient(points, axis=0)
    tangent /= np.maximum(np.linalg.norm(tangent, axis=1, keepdims=True), 1e-9)
    return np.column_stack([tangent[:, 1], -tangent[:, 0]])


def _fixed(points: np.ndarray) -> np.ndarray:
    """Coordinates in OpenCV's fixed point (4 fractional bits) for sub-pixel drawing."""
    return np.round(np.asarray(points) * 16).astype(np.int32)


@functools.lru_cache(maxsize=16)
def _layout(spec: PartSpec, height: int, width: int) -> _Layout:
    sx, sy = width / REFERENCE_WIDTH, height / REFERENCE_HEIGHT
    scale = math.sqrt(sx * sy)
    margin = math.ceil(spec.jitter_px * max(sx, sy)) + 1

    def place(points) -> np.ndarray:
        return np.asarray(points, dtype=np.float64) * (sx, sy) + margin

    canvas = np.full((height + 2 * margin, width + 2 * margin), spec.background_level, np.uint8)
    edge_width = max(1, round(2 * scale))
    for plate in spec.plates:
        polygon = _fixed(place(plate.polygon))
        cv2.fillPoly(canvas, [polygon], float(plate.level), cv2.LINE_AA, 4)
        edge = float(min(255.0, plate.level + plate.edge))
        cv2.polylines(canvas, [polygon], True, edge, edge_width, cv2.LINE_AA, 4)
    for hole in spec.holes:
        center = tuple(int(v) for v in _fixed(place([hole.center])[0]))
        axes = tuple(max(16, int(v)) for v in _fixed(np.asarray(hole.radii) * (sx, sy)))
        cv2.ellipse(canvas, center, axes, hole.angle, 0, 360, float(hole.level), -1, cv2.LINE_AA, 4)
        rim = float(min(255.0, hole.level + hole.rim))
        cv2.ellipse(canvas, center, axes, hole.angle, 0, 360, rim, edge_width, cv2.LINE_AA, 4)

    # The metal's texture is part of the part, so it comes from the part's own seed.
    rng = np.random.default_rng(spec.texture_seed)
    shape = canvas.shape
    blotches = rng.standard_normal((max(2, shape[0] // 24), max(2, shape[1] // 24)))
    blotches = cv2.resize(blotches.astype(np.float32), shape[::-1], interpolation=cv2.INTER_CUBIC)
    brushing = rng.standard_normal(shape).astype(np.float32)
    brushing = cv2.blur(brushing, (max(3, round(41 * sx)), 1))
    brushing /= max(float(brushing.std()), 1e-6)
    background = canvas.astype(np.float32) + spec.texture * (blotches + 0.5 * brushing)
    background = cv2.GaussianBlur(background, (3, 3), 0.6)  # the camera's slight softness
    background.setflags(write=False)

    radius = max(2.0, spec.bead_radius * scale)
    strokes = (_spline(place(spec.main_path)), _spline(place(spec.branch_path)))
    segments = {}
    for segment in spec.segments:
        stroke = 1 if segment.on_branch else 0
        n = len(strokes[stroke])
        first, last = round(segment.start * (n - 1)), round(segment.end * (n - 1))
        segments[segment.name] = (stroke, first, max(first, last))
    for stroke in strokes:
        stroke.setflags(write=False)
    return _Layout(
        background=background,
        margin=margin,
        strokes=strokes,
        segments=segments,
        scale=scale,
        radius=radius,
        unit=radius / spec.bead_radius,
    )


# ----------------------------------------------------------------------------- per-image scene


@dataclass
class _Stroke:
    """One continuous piece of bead: centreline points and the radius at each."""

    points: np.ndarray  # N x 2, pixels
    radii: np.ndarray  # N
    first_index: int = 0  # index of the first point in the uncut stroke (see _bead_alpha)


@dataclass
class _Scene:
    """One image's draws: where the part is, how the bead was laid, how it was lit."""

    shift: tuple[int, int]  # (dx, dy) of the part
    strokes: list[_Stroke]  # main line, branch
    gain: float
    offset: float
    ramp: tuple[float, float]  # relative brightness change per unit x and y (image = 1 x 1)
    hotspot: tuple[float, float, float, float]  # strength, centre x, centre y (0..1), sigma (0..1)
    noise_sigma: float
    noise_seed: int
    voids: list[tuple[tuple[float, float], tuple[float, float], float]] = field(
        default_factory=list
    )  # holes in the bead: centre, half-axes, angle (degrees)


def _smooth_variation(rng: np.random.Generator, n: int, amplitude: float) -> np.ndarray:
    """A smooth random function over ``n`` points: three sinusoids of 1-5 cycles."""
    s = np.linspace(0.0, 1.0, n)
    total = np.zeros(n)
    for _ in range(3):
        cycles = rng.uniform(1.0, 5.0)
        phase = rng.uniform(0.0, 2 * math.pi)
        total += rng.uniform(0.3, 1.0) * np.sin(2 * math.pi * cycles * s + phase)
    return amplitude * total / 2.0


def _draw_scene(spec: PartSpec, layout: _Layout, rng: np.random.Generator) -> _Scene:
    """Draw one defect-free image's random parameters (always the same draws, same order)."""
    lighting = spec.lighting
    jitter = layout.margin - 1
    dx, dy = (int(v) for v in rng.integers(-jitter, jitter + 1, size=2))
    width_factor = 1.0 + rng.normal(0.0, spec.bead_width_variation / 2)
    strokes = []
    for nominal in layout.strokes:
        n = len(nominal)
        lateral = _smooth_variation(rng, n, spec.bead_wobble_px * layout.scale)
        relative = _smooth_variation(rng, n, spec.bead_width_variation)
        points = nominal + lateral[:, None] * _normals(nominal) + (dx, dy) - layout.margin
        radii = layout.radius * width_factor * (1.0 + relative)
        strokes.append(_Stroke(points, radii))
    angle = rng.uniform(0.0, 2 * math.pi)
    strength = rng.uniform(0.0, lighting.gradient)
    return _Scene(
        shift=(dx, dy),
        strokes=strokes,
        gain=rng.uniform(*lighting.gain),
        offset=rng.uniform(*lighting.offset),
        ramp=(strength * math.cos(angle), strength * math.sin(angle)),
        hotspot=(
            rng.uniform(*lighting.hotspot),
            rng.uniform(0.0, 1.0),
            rng.uniform(0.0, 1.0),
            rng.uniform(0.12, 0.35),
        ),
        noise_sigma=rng.uniform(*lighting.noise_sigma),
        noise_seed=int(rng.integers(2**63)),
    )


def _bead_alpha(scene: _Scene, radius: float, height: int, width: int) -> np.ndarray:
    """The bead's anti-aliased coverage (uint8, 255 = bead): a dense chain of discs per stroke,
    minus the voids."""
    alpha = np.zeros((height, width), np.uint8)
    # Discs a third of their radius apart leave edge ripples well under 0.1 px. The discs sit at
    # the same points of a stroke whatever a defect did elsewhere (a cut stroke keeps its
    # original indexing), so a defect changes the drawing only where it changes the bead.
    stride = max(1, int(0.35 * radius))
    for stroke in scene.strokes:
        n = len(stroke.points)
        if n == 0:
            continue
        on_grid = (np.arange(n) + stroke.first_index) % stride == 0
        on_grid[[0, -1]] = True  # the end caps
        on_grid |= stroke.radii < 0.8 * radius  # thin places need denser discs
        index = np.flatnonzero(on_grid)
        centres = _fixed(stroke.points[index]).tolist()
        disc_radii = _fixed(stroke.radii[index]).tolist()
        for (x, y), disc_radius in zip(centres, disc_radii, strict=True):
            if disc_radius > 0:
                cv2.circle(alpha, (x, y), disc_radius, 255, -1, cv2.LINE_AA, 4)
    for centre, axes, angle in scene.voids:
        cv2.ellipse(
            alpha,
            tuple(int(v) for v in _fixed(centre)),
            tuple(max(8, int(v)) for v in _fixed(axes)),
            angle,
            0,
            360,
            0,
            -1,
            cv2.LINE_AA,
            4,
        )
    return alpha


def _box(alpha: np.ndarray, pad: int) -> tuple[slice, slice]:
    """The bounding box of the bead's pixels, ``pad`` pixels larger on every side (slices)."""
    x, y, w, h = cv2.boundingRect(alpha)
    rows = slice(max(0, y - pad), min(alpha.shape[0], y + h + pad))
    cols = slice(max(0, x - pad), min(alpha.shape[1], x + w + pad))
    return rows, cols


def _bead_shade(spec: PartSpec, layout: _Layout, alpha: np.ndarray) -> np.ndarray:
    """Brightness of the bead surface (float32, H x W, 0 away from the bead): a rounded ridge
    lit from the upper left."""
    shade = np.zeros(alpha.shape, np.float32)
    # Work inside the bead's bounding box only: it is half the image or less.
    box = _box(alpha, pad=2)
    inside = (alpha[box] >= 128).astype(np.uint8)
    distance = cv2.distanceTransform(inside, cv2.DIST_L2, 3)
    t = np.minimum(distance * np.float32(1.0 / layout.radius), 1.0)
    height = np.sqrt(t * (2.0 - t))  # a circular cross-section, 0 at the edge, 1 on the ridge
    # Sobel's 3x3 kernels measure 8x the per-pixel slope; times the radius makes it unitless.
    # Light from the upper left: flanks facing up and left are brighter.
    slope = layout.radius / 8.0
    gx = cv2.Sobel(height, cv2.CV_32F, 1, 0, ksize=3, scale=0.45 * slope)
    gy = cv2.Sobel(height, cv2.CV_32F, 0, 1, ksize=3, scale=0.9 * slope)
    lit = np.clip(gx + gy, -1.0, 1.0)
    shade[box] = spec.bead_level + spec.bead_ridge * height + spec.bead_relief * lit
    return shade


def _appearance(
    spec: PartSpec, layout: _Layout, scene: _Scene, alpha: np.ndarray, shade: np.ndarray
) -> np.ndarray:
    """The part with the bead on it, before lighting and noise (float32 gray levels)."""
    height, width = alpha.shape
    dx, dy = scene.shift
    m = layout.margin
    image = layout.background[m - dy : m - dy + height, m - dx : m - dx + width].copy()
    # The bead's cast shadow falls down and to the right of it.
    sx = max(1, round(3 * layout.scale))
    sy = max(1, round(4.5 * layout.scale))
    rows, cols = _box(alpha, pad=max(sx, sy) + 1)
    a = alpha[rows, cols].astype(np.float32) * np.float32(1.0 / 255.0)
    part = image[rows, cols]  # a view: the edits below land in ``image``
    part[sy:, sx:] *= 1.0 - np.float32(spec.bead_shadow) * a[:-sy, :-sx]
    part += a * (shade[rows, cols] - part)
    return image


def _expose(scene: _Scene, image: np.ndarray) -> np.ndarray:
    """Light ``image`` (float32, modified in place) and add sensor noise: the uint8 photo."""
    height, width = image.shape
    # Illumination: gain x (1 + linear ramp + lamp hot spot) + offset, built from 1-D profiles.
    u = np.linspace(-0.5, 0.5, width, dtype=np.float32)
    v = np.linspace(-0.5, 0.5, height, dtype=np.float32)
    strength, cx, cy, sigma = scene.hotspot
    hx = np.exp(-((u + 0.5 - cx) ** 2) / (2 * sigma**2)).astype(np.float32)
    hy = np.exp(-((v + 0.5 - cy) ** 2) / (2 * sigma**2)).astype(np.float32)
    gain = np.float32(scene.gain)
    field = (gain * (1.0 + 2 * scene.ramp[1] * v))[:, None] + (gain * 2 * scene.ramp[0] * u)
    field += (gain * np.float32(strength) * hy)[:, None] * hx
    image *= field

    # Sensor noise: the sum of two uniform bytes is triangular (close to Gaussian) and much
    # faster to draw than normal variates. Its standard deviation is 255 / sqrt(6).
    noise_rng = np.random.default_rng(scene.noise_seed)
    size = height * width
    draws = np.frombuffer(noise_rng.bytes(2 * size), np.uint8)
    noise = draws[:size].astype(np.float32)
    noise += draws[size:]
    k = np.float32(scene.noise_sigma * math.sqrt(6.0) / 255.0)
    image += noise.reshape(height, width) * k
    # The noise's mean (255 k) comes off with the offset; 0.5 rounds to nearest.
    image += np.float32(scene.offset - 255.0 * k + 0.5)
    np.clip(image, 0.0, 255.0, out=image)
    return image.astype(np.uint8)


# ----------------------------------------------------------------------------- defects


def _stretch(rng: np.random.Generator, layout: _Layout, segment: str, length: float):
    """A stretch of about ``length`` points centred inside ``segment``: (stroke, first, last)."""
    stroke, first, last = layout.segments[segment]
    half = int(length / 2)
    if last - first > 2 * half:
        centre = int(rng.integers(first + half, last - half + 1))
    else:
        centre = (first + last) // 2
    n = len(layout.strokes[stroke])
    return stroke, max(0, centre - half), min(n - 1, centre + half)


def _window(n: int, ramp: float) -> np.ndarray:
    """1 in the middle, cosine ramps of ``ramp`` (fraction of n) down to 0 at both ends."""
    t = np.linspace(0.0, 1.0, n)
    up = np.clip(t / max(ramp, 1e-6), 0.0, 1.0)
    down = np.clip((1.0 - t) / max(ramp, 1e-6), 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(np.pi * np.minimum(up, down))


def _copy_scene(scene: _Scene) -> _Scene:
    strokes = [_Stroke(s.points.copy(), s.radii.copy(), s.first_index) for s in scene.strokes]
    return replace(scene, strokes=strokes, voids=list(scene.voids))


def _bifurcation(scene: _Scene, layout: _Layout, segment: str, rng: np.random.Generator) -> _Scene:
    """A thinner branch splits off the bead (a partly blocked nozzle); the bead thins there."""
    out = _copy_scene(scene)
    length = rng.uniform(28, 60) * layout.unit
    stroke, first, last = _stretch(rng, layout, segment, length)
    bead = out.strokes[stroke]
    start = first
    direction = np.gradient(bead.points, axis=0)[start]
    direction /= max(float(np.linalg.norm(direction)), 1e-9)
    if rng.random() < 0.5:
        direction = -direction  # the branch may split off backwards as well as forwards
    turn = math.radians(rng.uniform(20, 42)) * (1 if rng.random() < 0.5 else -1)
    bend = math.radians(rng.uniform(-15, 15))
    n = max(4, int(length))
    angles = turn + bend * np.linspace(0.0, 1.0, n)
    cos, sin = np.cos(angles), np.sin(angles)
    steps = np.column_stack(
        [direction[0] * cos - direction[1] * sin, direction[0] * sin + direction[1] * cos]
    )
    points = bead.points[start] + np.cumsum(steps, axis=0)
    radius = float(bead.radii[start])
    radii = radius * np.linspace(rng.uniform(0.6, 0.8), rng.uniform(0.3, 0.45), n)
    out.strokes.append(_Stroke(np.vstack([bead.points[start], points]), np.r_[radii[0], radii]))
    bead.radii[first : last + 1] *= 1.0 - 0.15 * _window(last - first + 1, 0.3)
    return out


def _missing(scene: _Scene, layout: _Layout, segment: str, rng: np.random.Generator) -> _Scene:
    """A gap in the bead: no sealant over a stretch."""
    out = _copy_scene(scene)
    stroke, first, last = _stretch(rng, layout, segment, rng.uniform(18, 55) * layout.unit)
    bead = out.strokes[stroke]
    # The bead tapers into the gap from both sides rather than stopping bluntly.
    taper = max(2, int(2 * layout.radius))
    bead.radii[max(0, first - taper) : first] *= np.linspace(
        1.0, 0.55, first - max(0, first - taper)
    )
    end = min(len(bead.radii), last + 1 + taper)
    bead.radii[last + 1 : end] *= np.linspace(0.55, 1.0, end - last - 1)
    # The far piece is drawn right after the near one: anti-aliased discs composite in drawing
    # order (uint8 rounding), so keeping the order keeps the rest of the bead bit-identical.
    out.strokes[stroke] = _Stroke(bead.points[:first], bead.radii[:first], bead.first_index)
    out.strokes.insert(
        stroke + 1,
        _Stroke(bead.points[last + 1 :], bead.radii[last + 1 :], bead.first_index + last + 1),
    )
    return out


def _narrowing(scene: _Scene, layout: _Layout, segment: str, rng: np.random.Generator) -> _Scene:
    """The bead gets locally thinner (reduced flow)."""
    out = _copy_scene(scene)
    stroke, first, last = _stretch(rng, layout, segment, rng.uniform(40, 110) * layout.unit)
    depth = rng.uniform(0.45, 0.7)
    out.strokes[stroke].radii[first : last + 1] *= 1.0 - depth * _window(last - first + 1, 0.35)
    return out


def _misalignment(scene: _Scene, layout: _Layout, segment: str, rng: np.random.Generator) -> _Scene:
    """A stretch of bead laid beside its nominal path (part and nozzle out of register)."""
    out = _copy_scene(scene)
    stroke, first, last = _stretch(rng, layout, segment, rng.uniform(60, 140) * layout.unit)
    bead = out.strokes[stroke]
    offset = rng.uniform(1.3, 2.2) * layout.radius * (1 if rng.random() < 0.5 else -1)
    # Ramps long enough that the bead's edge never folds over itself.
    shift = offset * _window(last - first + 1, rng.uniform(0.3, 0.45))
    normals = _normals(bead.points[first : last + 1])
    bead.points[first : last + 1] += shift[:, None] * normals
    return out


def _hole(scene: _Scene, layout: _Layout, segment: str, rng: np.random.Generator) -> _Scene:
    """A void (burst bubble) in the bead through which the metal shows."""
    out = _copy_scene(scene)
    stroke, first, _ = _stretch(rng, layout, segment, 1)
    bead = out.strokes[stroke]
    radius = float(bead.radii[first])
    tangent = np.gradient(bead.points, axis=0)[first]
    normal = np.array([tangent[1], -tangent[0]]) / max(float(np.linalg.norm(tangent)), 1e-9)
    along = max(1.5, rng.uniform(0.5, 1.1) * radius)
    across = max(1.2, rng.uniform(0.35, 0.55) * radius)
    centre = bead.points[first] + rng.uniform(-0.3, 0.3) * (radius - across) * normal
    angle = math.degrees(math.atan2(tangent[1], tangent[0]))
    out.voids.append(((float(centre[0]), float(centre[1])), (along, across), angle))
    return out


_GEOMETRIC_DEFECTS: dict[str, Callable[[_Scene, _Layout, str, np.random.Generator], _Scene]] = {
    "bifurcation": _bifurcation,
    "missing": _missing,
    "narrowing": _narrowing,
    "misalignment": _misalignment,
    "hole": _hole,
}

# GIMP-warp-like local displacement: (sigma of the Gaussian falloff, displacement), reference px.
_WARPS = {"warp_small": ((10.0, 16.0), (3.5, 6.0)), "warp_large": ((22.0, 34.0), (10.0, 18.0))}


def _warp(
    layers: list[np.ndarray], layout: _Layout, scene: _Scene, segment: str, size: str, rng
) -> None:
    """Push the bead around a point of ``segment`` with a smooth Gaussian displacement field,
    in place (the shading moves with the bead, as with GIMP's warp tool)."""
    (sigma_range, push_range) = _WARPS[size]
    stroke, index, _ = _stretch(rng, layout, segment, 1)
    points = scene.strokes[stroke].points
    radius = float(scene.strokes[stroke].radii[index])
    normal = _normals(points[max(0, index - 2) : index + 3]).mean(axis=0)
    centre = points[index] + rng.uniform(-0.5, 0.5) * radius * normal
    sigma = rng.uniform(*sigma_range) * layout.unit
    push = rng.uniform(*push_range) * layout.unit
    angle = math.radians(rng.uniform(-35, 35)) + (0 if rng.random() < 0.5 else math.pi)
    cos, sin = math.cos(angle), math.sin(angle)
    vx, vy = push * (normal[0] * cos - normal[1] * sin), push * (normal[0] * sin + normal[1] * cos)

    height, width = layers[0].shape
    reach = 3 * sigma + push
    x0, x1 = max(0, int(centre[0] - reach)), min(width, int(centre[0] + reach) + 1)
    y0, y1 = max(0, int(centre[1] - reach)), min(height, int(centre[1] + reach) + 1)
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    falloff = np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * sigma**2))
    # Backward mapping: each pixel takes its value from where the push came from.
    map_x = (xx - vx * falloff).astype(np.float32)
    map_y = (yy - vy * falloff).astype(np.float32)
    for layer in layers:
        layer[y0:y1, x0:x1] = cv2.remap(
            layer, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )


def _min_defect_pixels(layout: _Layout) -> int:
    """The smallest bead difference (pixels, before dilation) a defect must make."""
    return max(4, round(40 * layout.scale**2))


_MAX_DRAWS = 50


#: A pixel belongs to a defect's mask where the bead covers it in one image but not in the
#: other, or where the unlit picture changed by more than this many gray levels (a narrowed
#: bead's lower ridge, a moved shadow, the rounded ends of a gap).
_VISIBLE_CHANGE = 4.0


def _render_defect(
    spec: PartSpec,
    defect: str,
    rng: np.random.Generator,
    height: int,
    width: int,
    segment: str | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """(image, mask, segment) of one defective image."""
    if defect not in DEFECT_TYPES:
        raise DatasetError(f"unknown defect type {defect!r} (known: {', '.join(DEFECT_TYPES)})")
    if segment is not None and segment not in SEGMENTS:
        raise DatasetError(f"unknown segment {segment!r} (known: {', '.join(SEGMENTS)})")
    layout = _layout(spec, height, width)
    scene = _draw_scene(spec, layout, rng)
    nominal_alpha = _bead_alpha(scene, layout.radius, height, width)
    nominal_shade = _bead_shade(spec, layout, nominal_alpha)
    nominal = _appearance(spec, layout, scene, nominal_alpha, nominal_shade)
    nominal_inside = nominal_alpha >= 128
    minimum = _min_defect_pixels(layout)
    for _ in range(_MAX_DRAWS):
        where = segment or SEGMENTS[int(rng.integers(len(SEGMENTS)))]
        if defect in _WARPS:
            warped = nominal_alpha.astype(np.float32)
            shade = nominal_shade.copy()
            _warp([warped, shade], layout, scene, where, defect, rng)
            alpha = np.clip(warped + 0.5, 0, 255).astype(np.uint8)
            shown = scene
        else:
            shown = _GEOMETRIC_DEFECTS[defect](scene, layout, where, rng)
            alpha = _bead_alpha(shown, layout.radius, height, width)
            shade = _bead_shade(spec, layout, alpha)
        changed = (alpha >= 128) != nominal_inside
        if int(changed.sum()) >= minimum:
            break
    else:
        raise DatasetError(
            f"part {spec.name!r} at {height}x{width}: {_MAX_DRAWS} draws of a {defect!r} defect "
            f"all changed fewer than {minimum} pixels; render larger images"
        )
    image = _appearance(spec, layout, shown, alpha, shade)
    changed |= np.abs(image - nominal) > _VISIBLE_CHANGE
    # The sealant paper annotates misalignments with a margin; the others get a light one.
    margin = max(1, round((5.0 if defect == "misalignment" else 2.0) * layout.scale))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
    mask = cv2.dilate(changed.astype(np.uint8) * np.uint8(255), kernel)
    return _expose(shown, image), mask, where


# ----------------------------------------------------------------------------- public rendering


def render_normal(
    part: str | PartSpec, rng: np.random.Generator, height: int = 480, width: int = 640
) -> np.ndarray:
    """One defect-free image (H x W uint8) of ``part``, all randomness drawn from ``rng``."""
    spec = _resolve(part)
    layout = _layout(spec, height, width)
    scene = _draw_scene(spec, layout, rng)
    alpha = _bead_alpha(scene, layout.radius, height, width)
    return _expose(scene, _appearance(spec, layout, scene, alpha, _bead_shade(spec, layout, alpha)))


def render_defect(
    part: str | PartSpec,
    defect: str,
    rng: np.random.Generator,
    height: int = 480,
    width: int = 640,
    *,
    segment: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One image of ``part`` with a ``defect`` (one of :data:`DEFECT_TYPES`) in ``segment`` (one
    of :data:`SEGMENTS`; None: a random one), and its mask (H x W uint8, 0 or 255): where the
    image differs from the defect-free one, lightly dilated.

    The defect-free scene is drawn first exactly as :func:`render_normal` draws it, so both
    functions called with equally seeded generators show the same scene.
    """
    image, mask, _ = _render_defect(_resolve(part), defect, rng, height, width, segment)
    return image, mask


# ----------------------------------------------------------------------------- data set on disk

_MANIFEST = "manifest.json"
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
_TRUTH = {"val": "val_ground_truth", "test": "ground_truth"}  # where each split's masks go


def _part_key(part: str) -> int:
    # A stable number per part name (Python's hash() is salted per process).
    return zlib.crc32(part.encode())


def _plan(config: GlueSetConfig) -> list[tuple[str, str, int]]:
    """Every image to render: (split, "good" or defect type, index)."""
    plan = [("train", "good", i) for i in range(config.n_train)]
    plan += [("val", "good", i) for i in range(config.n_val_good)]
    plan += [("val", d, i) for d in config.defect_types for i in range(config.n_val_defect)]
    plan += [("test", "good", i) for i in range(config.n_test_good)]
    plan += [("test", d, i) for d in config.defect_types for i in range(config.n_test_defect)]
    return plan


def _manifest(spec: PartSpec, config: GlueSetConfig, seed: int) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for split, kind, _ in _plan(config):
        counts[f"{split}/{kind}"] = counts.get(f"{split}/{kind}", 0) + 1
    return {
        "generator": "anomaly-sweep synthetic_glue",
        "version": GENERATOR_VERSION,
        "part": spec.name,
        "part_fingerprint": _fingerprint(spec),
        "seed": seed,
        "config": config.to_dict(),
        "counts": counts,
    }


def _identity(manifest: dict[str, Any]) -> tuple:
    """The manifest entries that decide the content of a data set."""
    return tuple(
        json.dumps(manifest.get(key), sort_keys=True)
        for key in ("version", "part", "part_fingerprint", "seed", "config")
    )


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / _MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict):
        raise DatasetError(f"{path}: expected a JSON object")
    return manifest


def _check_arguments(part: str | PartSpec, config: GlueSetConfig, seed: int) -> PartSpec:
    spec = _resolve(part)
    if not isinstance(config, GlueSetConfig):
        raise DatasetError(f"config: expected a GlueSetConfig, got {type(config).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise DatasetError(f"seed: expected an integer >= 0, got {seed!r}")
    return spec


def _reuse(target: Path, wanted: dict[str, Any]) -> Path:
    """``target`` if it holds the data set ``wanted`` describes; DatasetError otherwise."""
    existing = _read_manifest(target) if target.is_dir() else None
    if existing is None:
        raise DatasetError(
            f"{target}: exists but holds no {_MANIFEST} of a generated glue-line data set; "
            "delete it or choose another root"
        )
    if _identity(existing) != _identity(wanted):
        keys = ("version", "part", "part_fingerprint", "seed", "config")
        different = [key for key in keys if existing.get(key) != wanted[key]]
        found = {key: existing.get(key) for key in different}
        expected = {key: wanted[key] for key in different}
        raise DatasetError(
            f"{target}: was generated with a different {', '.join(different)} (found {found}, "
            f"expected {expected}); delete it or choose another root"
        )
    return target


def _write_png(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image):
        raise DatasetError(f"{path}: could not write the image")


def generate(
    root: str | Path,
    part: str | PartSpec,
    config: GlueSetConfig = GlueSetConfig(),
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Render the data set of ``part`` (a name in :data:`PARTS`, or a :class:`PartSpec`)
    under ``root/<part name>`` and return that directory.

    The same (part, config, seed) always gives byte-identical files: image ``i`` of a split
    draws from its own generator seeded by (seed, part, split, defect, i), so larger configs
    only add images. The data set is written into a temporary directory beside the target and
    renamed into place when complete, so an interrupted run never leaves a half data set.
    ``progress(done, total)`` is called after every image.

    Raises :class:`DatasetError` if the directory already exists (see :func:`ensure_generated`).
    """
    spec = _check_arguments(part, config, seed)
    target = Path(root).expanduser() / spec.name
    if target.exists():
        raise DatasetError(f"{target}: already exists; delete it or use ensure_generated()")
    return _generate(spec, target, config, seed, progress)


def _generate(
    spec: PartSpec,
    target: Path,
    config: GlueSetConfig,
    seed: int,
    progress: Callable[[int, int], None] | None,
) -> Path:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}.partial-", dir=target.parent))
    except OSError as exc:
        raise DatasetError(
            f"{target.parent}: cannot create the data-set directory ({exc})"
        ) from exc

    manifest = _manifest(spec, config, seed)
    plan = _plan(config)
    part_key = _part_key(spec.name)
    try:
        for split, kind in sorted({(split, kind) for split, kind, _ in plan}):
            (staging / split / kind).mkdir(parents=True)
            if kind != "good":
                (staging / _TRUTH[split] / kind).mkdir(parents=True)
        for done, (split, kind, index) in enumerate(plan, start=1):
            defect_id = 0 if kind == "good" else 1 + DEFECT_TYPES.index(kind)
            rng = np.random.default_rng([seed, part_key, _SPLIT_IDS[split], defect_id, index])
            if kind == "good":
                image = render_normal(spec, rng, config.height, config.width)
                _write_png(staging / split / "good" / f"{index:03d}.png", image)
            else:
                # Segments in turn, so that every defect type covers all of A-E evenly.
                segment = SEGMENTS[(index + defect_id) % len(SEGMENTS)]
                image, mask, _ = _render_defect(
                    spec, kind, rng, config.height, config.width, segment
                )
                name = f"{index:03d}_seg{segment}"
                _write_png(staging / split / kind / f"{name}.png", image)
                _write_png(staging / _TRUTH[split] / kind / f"{name}_mask.png", mask)
            if progress is not None:
                progress(done, len(plan))
        # The manifest is written last: a directory holding one is complete.
        (staging / _MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        try:
            os.rename(staging, target)
        except OSError as exc:
            if not target.exists():
                raise DatasetError(
                    f"{target}: cannot move the data set into place ({exc})"
                ) from exc
            # Another process (a parallel worker of the same study) finished first. Generation
            # is deterministic, so a copy made from the same inputs is identical: keep theirs.
            _reuse(target, manifest)
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def ensure_generated(
    root: str | Path,
    part: str | PartSpec,
    config: GlueSetConfig = GlueSetConfig(),
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """``root/<part name>`` holding the data set of (part, config, seed): reused when its
    manifest matches, generated when absent.

    Raises :class:`DatasetError` naming the directory when it exists with another manifest
    (different config, seed, part definition or generator version) or none at all, rather than
    mixing data sets or deleting files it did not write.
    """
    spec = _check_arguments(part, config, seed)
    target = Path(root).expanduser() / spec.name
    if target.exists():
        return _reuse(target, _manifest(spec, config, seed))
    return _generate(spec, target, config, seed, progress)
