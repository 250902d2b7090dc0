"""Synthetic anomalies for training self-supervised detectors and for making validation splits.

Four generators, each a pure function of float image tensors in [0, 1] (``B x C x H x W``, any
device) and a CPU :class:`torch.Generator` that makes every random choice, so the same seed gives
the same output and the global random state is never touched. Each returns ``(images, masks)``
with ``masks`` ``B x 1 x H x W`` in {0, 1} (the images' dtype and device):

* :class:`PerlinBlend`, DRAEM's anomaly (Zavrtanik et al., "DRAEM - A discriminatively trained
  reconstruction embedding for surface anomaly detection", ICCV 2021, section 3.3): a mask from
  thresholded, randomly rotated Perlin noise (:func:`perlin_mask`), inside which the image is
  blended with an anomaly source ``(1 - beta) * image + beta * source``. The source is a random
  texture image from a folder (DRAEM uses the DTD textures) under three of DRAEM's random colour
  and geometry augmentations, or, without a folder, generated: a Perlin-noise colour field or a
  tile-shuffled, flipped and shifted copy of the image itself, under the same augmentations.
* :class:`CutPaste` (Li et al., "CutPaste: Self-supervised learning for anomaly detection and
  localization", CVPR 2021, section 3.1): a rectangle of random area and aspect ratio is cut
  from one place, colour-jittered and pasted at another; the *scar* variant pastes a thin,
  long, rotated rectangle.
* :class:`LocalWarp`: the reference study (Chen et al. 2025) made its defects by pushing a glue
  bead around with GIMP's warp tool; this is a smooth local displacement (a Gaussian bump of
  random radius, strength and direction) applied with ``grid_sample``. The mask is where pixels
  move by more than half a pixel.

:class:`PerlinBlend` and :class:`CutPaste` leave every pixel outside the mask bit-identical.
:class:`LocalWarp` is continuous, so pixels just outside its mask are resampled at less than
half a pixel from where they were: each stays within the range of its 3 x 3 neighbourhood, and
pixels the displacement moves by less than :data:`LocalWarp.EXACT_BELOW` pixels are kept as
they are.

:func:`synthesize` makes anomalies by name for studies (``"perlin"``, ``"cutpaste"``,
``"cutpaste_scar"``, ``"warp"``). Bad arguments are :class:`data.errors.DatasetError`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from data.datasets import IMAGE_SUFFIXES
from data.errors import DatasetError

__all__ = [
    "SYNTHETIC_KINDS",
    "CutPaste",
    "LocalWarp",
    "PerlinBlend",
    "perlin_mask",
    "perlin_noise",
    "synthesize",
]

SYNTHETIC_KINDS = ("perlin", "cutpaste", "cutpaste_scar", "warp")

GeneratorLike = torch.Generator | int


# ----------------------------------------------------------------------------- helpers


def _generator(generator: GeneratorLike) -> torch.Generator:
    """A CPU generator: the one given, or one seeded with the given int."""
    if isinstance(generator, torch.Generator):
        if generator.device.type != "cpu":
            raise DatasetError(f"expected a CPU torch.Generator, got one on {generator.device}")
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise DatasetError(f"expected a torch.Generator or an int seed, got {generator!r}")


def _uniform(generator: torch.Generator, low: float, high: float, n: int | None = None):
    """Uniform draw(s) in [low, high): a float, or a CPU tensor of ``n``."""
    values = torch.rand(1 if n is None else n, generator=generator, dtype=torch.float64)
    values = low + (high - low) * values
    return float(values[0]) if n is None else values.float()


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """An int in [low, high)."""
    return int(torch.randint(low, high, (1,), generator=generator)[0])


def _range(name: str, value: float | Sequence[float], low: float, high: float) -> tuple:
    """``value`` (a number or a (min, max) pair) as a checked pair within [low, high]."""
    pair = (value, value) if isinstance(value, int | float) else tuple(value)
    if (
        len(pair) != 2
        or not all(isinstance(v, int | float) and math.isfinite(v) for v in pair)
        or not low <= pair[0] <= pair[1] <= high
    ):
        raise DatasetError(
            f"{name}: expected a number or a (min, max) pair with {low} <= min <= max <= {high}, "
            f"got {value!r}"
        )
    return float(pair[0]), float(pair[1])


def _check_images(images: Tensor, what: str) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise DatasetError(f"{what}: expected a float B x C x H x W tensor, got {shape}")
    if images.shape[0] == 0 or images.shape[2] < 2 or images.shape[3] < 2:
        shape = tuple(images.shape)
        raise DatasetError(f"{what}: expected a non-empty batch of images, got {shape}")


def _check_rgb(images: Tensor, what: str) -> None:
    if images.shape[1] != 3:
        raise DatasetError(f"{what}: expected 3-channel images, got {images.shape[1]} channels")


def _pixel_grid(height: int, width: int, device: torch.device | None = None):
    """(ys, xs) pixel-centre coordinates, each H x W float32."""
    ys = torch.arange(height, dtype=torch.float32, device=device)
    xs = torch.arange(width, dtype=torch.float32, device=device)
    return torch.meshgrid(ys, xs, indexing="ij")


def _to_normalised(ys: Tensor, xs: Tensor, height: int, width: int) -> Tensor:
    """Pixel coordinates as a ``grid_sample`` grid (align_corners=False), ... x H x W x 2."""
    return torch.stack(((2 * xs + 1) / width - 1, (2 * ys + 1) / height - 1), dim=-1)


def _rotate(images: Tensor, angles: Tensor, padding_mode: str = "zeros") -> Tensor:
    """``images`` (B x C x H x W) rotated about their centres by ``angles`` (B, radians,
    counter-clockwise on screen), bilinear, in pixel units (no stretch for non-square images)."""
    b, _, height, width = images.shape
    ys, xs = _pixel_grid(height, width, images.device)
    cy, cx = (height - 1) / 2, (width - 1) / 2
    cos = angles.to(images.device, torch.float32).cos().view(b, 1, 1)
    sin = angles.to(images.device, torch.float32).sin().view(b, 1, 1)
    dx, dy = xs - cx, ys - cy
    # Backward mapping: each output pixel samples where the inverse rotation takes it (y down).
    src_x = cos * dx - sin * dy + cx
    src_y = sin * dx + cos * dy + cy
    grid = _to_normalised(src_y, src_x, height, width)
    return F.grid_sample(
        images,
        grid.to(images.dtype),
        mode="bilinear",
        padding_mode=padding_mode,
        align_corners=False,
    )


def _gray(images: Tensor) -> Tensor:
    """Luma (B x 1 x H x W) of RGB images; the mean for other channel counts."""
    if images.shape[1] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device)
        return (images * weights.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    return images.mean(dim=1, keepdim=True)


def _hue_rotation(images: Tensor, angle: float) -> Tensor:
    """RGB images (B x 3 x H x W) with their hue turned by ``angle`` radians: a rotation about
    the gray axis, which leaves grays gray and keeps brightness nearly."""
    k = torch.full((3,), 1 / math.sqrt(3), dtype=torch.float64)
    cross = torch.tensor([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    rot = (
        math.cos(angle) * torch.eye(3, dtype=torch.float64)
        + math.sin(angle) * cross.double()
        + (1 - math.cos(angle)) * torch.outer(k, k)
    )
    rot = rot.to(images.device, images.dtype)
    return torch.einsum("ij,bjhw->bihw", rot, images)


# ----------------------------------------------------------------------------- Perlin noise


def _fade(t: Tensor) -> Tensor:
    # Perlin's quintic: zero first and second derivatives at the lattice, so no grid artefacts.
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(
    height: int,
    width: int,
    scale: float | tuple[float, float] = (4, 4),
    *,
    generator: GeneratorLike,
    device: torch.device | str | None = None,
) -> Tensor:
    """2-D gradient (Perlin) noise, ``height x width`` float32 in about [-1, 1].

    Args:
        height, width: Output size in pixels.
        scale: Lattice cells along (y, x) across the image (a number for both): 1 gives one
            smooth blob, 32 a fine texture. Any positive value; DRAEM uses powers of two.
        generator: Draws the random unit gradients at the lattice points (or an int seed).
        device: Where the noise is computed (the draws are made on the CPU).
    """
    generator = _generator(generator)
    sy, sx = (scale, scale) if isinstance(scale, int | float) else tuple(scale)
    if not (sy > 0 and sx > 0 and math.isfinite(sy) and math.isfinite(sx)):
        raise DatasetError(f"perlin_noise: scale must be positive, got {scale!r}")
    if height < 1 or width < 1:
        raise DatasetError(f"perlin_noise: size must be positive, got {height} x {width}")
    ny, nx = math.ceil(sy) + 1, math.ceil(sx) + 1
    angles = 2 * math.pi * torch.rand(ny, nx, generator=generator)
    gradients = torch.stack((angles.cos(), angles.sin()), dim=-1).to(device)  # (gx, gy)

    y = torch.arange(height, dtype=torch.float32, device=device) * (sy / height)
    x = torch.arange(width, dtype=torch.float32, device=device) * (sx / width)
    y0, x0 = y.floor().long(), x.floor().long()
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]

    def corner(dy: int, dx: int) -> Tensor:
        # Two index_selects: the lattice row depends on y only and the column on x only.
        g = gradients.index_select(0, y0 + dy).index_select(1, x0 + dx)
        return g[..., 0] * (fx - dx) + g[..., 1] * (fy - dy)

    u, v = _fade(fx), _fade(fy)
    top = torch.lerp(corner(0, 0), corner(0, 1), u)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), u)
    # Unit gradients bound 2-D Perlin noise by sqrt(1/2); scaled to [-1, 1] as DRAEM does.
    return math.sqrt(2) * torch.lerp(top, bottom, v)


def perlin_mask(
    height: int,
    width: int,
    *,
    generator: GeneratorLike,
    threshold: float = 0.5,
    min_scale: int = 0,
    max_scale: int = 6,
    device: torch.device | str | None = None,
) -> Tensor:
    """DRAEM's anomaly mask: Perlin noise, rotated by a random angle in [-90, 90) degrees,
    above ``threshold``; ``height x width`` bool, never empty.

    Args:
        height, width: Mask size in pixels.
        generator: Source of every random choice (or an int seed).
        threshold: Noise level above which a pixel is anomalous; higher gives smaller blobs.
        min_scale, max_scale: The lattice scale along each axis is ``2**k``, ``k`` drawn
            independently per axis from ``[min_scale, max_scale)`` (DRAEM: 0 and 6).
        device: Where the mask is computed.

    An empty draw (likely at coarse scales) is redrawn; after a few empty draws the mask is the
    part of the last noise above half its maximum, so it is never empty.
    """
    generator = _generator(generator)
    _check_perlin("perlin_mask", threshold, min_scale, max_scale)
    noise = None
    for _ in range(_MASK_DRAWS):
        ky = _randint(generator, min_scale, max_scale)
        kx = _randint(generator, min_scale, max_scale)
        noise = perlin_noise(height, width, (2**ky, 2**kx), generator=generator, device=device)
        angle = torch.tensor([math.radians(_uniform(generator, -90, 90))])
        # Zero fill outside the rotated field, as DRAEM's imgaug affine does: never masked.
        noise = _rotate(noise[None, None], angle)[0, 0]
        mask = noise > threshold
        if mask.any():
            return mask
    peak = float(noise.max())
    if peak > 0:
        return noise > peak / 2
    # A field without a single positive value; practically impossible, but stay non-empty.
    ys, xs = _pixel_grid(height, width, noise.device)
    cy, cx = _randint(generator, 0, height), _randint(generator, 0, width)
    radius = max(1.0, min(height, width) / 8)
    return (ys - cy) ** 2 + (xs - cx) ** 2 <= radius**2


_MASK_DRAWS = 8


def _check_perlin(what: str, threshold: float, min_scale: int, max_scale: int) -> None:
    if isinstance(min_scale, bool) or not isinstance(min_scale, int) or min_scale < 0:
        raise DatasetError(f"{what}: min_scale must be an int >= 0, got {min_scale!r}")
    if isinstance(max_scale, bool) or not isinstance(max_scale, int) or max_scale <= min_scale:
        raise DatasetError(
            f"{what}: max_scale must be an int > min_scale ({min_scale}), got {max_scale!r}"
        )
    if max_scale > 16:
        # 2**16 lattice cells per axis is far finer than any image's pixels.
        raise DatasetError(f"{what}: max_scale must be <= 16, got {max_scale}")
    if not isinstance(threshold, int | float) or not -1 < threshold < 1:
        raise DatasetError(f"{what}: threshold must be a number in (-1, 1), got {threshold!r}")


# ------------------------------------------------------------------------ DRAEM's augmentations
# Each takes one image (1 x 3 x H x W, float32 in [0, 1]) and the generator, and returns one.
# DRAEM draws three of these (imgaug) without replacement for every anomaly source.


def _aug_gamma(x: Tensor, g: torch.Generator) -> Tensor:
    gamma = _uniform(g, 0.5, 2.0, 3).to(x.device).view(1, 3, 1, 1)
    return x.clamp(0, 1) ** gamma


def _aug_brightness(x: Tensor, g: torch.Generator) -> Tensor:
    return x * _uniform(g, 0.8, 1.2) + _uniform(g, -30, 30) / 255


def _aug_sharpness(x: Tensor, g: torch.Generator) -> Tensor:
    # PIL's EnhanceSharpness: blend with its 3 x 3 smoothing filter, factor in [0, 2).
    kernel = torch.ones(3, 3, dtype=x.dtype, device=x.device)
    kernel[1, 1] = 5
    kernel = (kernel / kernel.sum()).expand(3, 1, 3, 3)
    smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    return torch.lerp(smooth, x, _uniform(g, 0.0, 2.0))


def _aug_hue_saturation(x: Tensor, g: torch.Generator) -> Tensor:
    # imgaug's AddToHueAndSaturation((-50, 50)): up to about +-70 degrees of hue.
    x = _hue_rotation(x, math.radians(_uniform(g, -70, 70)))
    gray = _gray(x)
    return torch.lerp(gray, x, _uniform(g, 0.6, 1.4))


def _aug_solarize(x: Tensor, g: torch.Generator) -> Tensor:
    threshold = _uniform(g, 32, 128) / 255
    return torch.where(x >= threshold, 1 - x, x)


def _aug_posterize(x: Tensor, g: torch.Generator) -> Tensor:
    step = 2 ** (8 - _randint(g, 1, 8))
    return torch.floor(x.clamp(0, 1) * 255 / step) * step / 255


def _aug_invert(x: Tensor, g: torch.Generator) -> Tensor:
    return 1 - x


def _aug_autocontrast(x: Tensor, g: torch.Generator) -> Tensor:
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    span = high - low
    return torch.where(span > 1e-6, (x - low) / span.clamp_min(1e-6), x)


def _aug_equalize(x: Tensor, g: torch.Generator) -> Tensor:
    """Histogram equalisation per channel on 256 levels, as PIL's ImageOps.equalize."""
    levels = (x.clamp(0, 1) * 255).round().long()
    out = torch.empty_like(x)
    n = levels[0, 0].numel()
    for c in range(x.shape[1]):
        hist = torch.bincount(levels[0, c].flatten(), minlength=256)
        cdf = hist.cumsum(0)
        lowest = cdf[hist > 0][0]
        if int(lowest) == n:  # one level only: nothing to spread
            out[0, c] = x[0, c]
            continue
        lut = (cdf - lowest).clamp_min(0).to(x.dtype) / (n - lowest)
        out[0, c] = lut[levels[0, c]]
    return out


def _aug_rotate(x: Tensor, g: torch.Generator) -> Tensor:
    angle = torch.tensor([math.radians(_uniform(g, -45, 45))])
    # Reflection instead of imgaug's black corners: a black wedge is an easy, unrealistic cue.
    return _rotate(x, angle, padding_mode="reflection")


_AUGMENTATIONS: tuple[Callable[[Tensor, torch.Generator], Tensor], ...] = (
    _aug_gamma,
    _aug_brightness,
    _aug_sharpness,
    _aug_hue_saturation,
    _aug_solarize,
    _aug_posterize,
    _aug_invert,
    _aug_autocontrast,
    _aug_equalize,
    _aug_rotate,
)


def _draem_augment(x: Tensor, g: torch.Generator, count: int = 3) -> Tensor:
    """Three of DRAEM's augmentations, drawn without replacement, in the order drawn."""
    for index in torch.randperm(len(_AUGMENTATIONS), generator=g)[:count].tolist():
        x = _AUGMENTATIONS[index](x, g).clamp(0, 1)
    return x


# ----------------------------------------------------------------------------- PerlinBlend


class PerlinBlend:
    """DRAEM's synthetic anomaly: a Perlin-noise mask inside which the image is blended with an
    augmented anomaly source.

    Args:
        texture_dir: Folder of anomaly-source images (searched recursively for
            ``data.datasets.IMAGE_SUFFIXES``; DRAEM uses the Describable Textures Dataset). Each
            anomaly takes a random one, resized to the image. ``None`` generates the source:
            with equal probability a Perlin-noise colour field or a copy of the image with its
            tiles shuffled, flipped and shifted; a missing or image-less folder is a
            :class:`DatasetError` naming it.
        beta: Range of the source's opacity inside the mask, drawn uniformly per image:
            ``(1 - beta) * image + beta * source``. The reference study's (0.1, 1.0).
        threshold: Perlin noise level above which a pixel is anomalous (DRAEM: 0.5).
        min_scale, max_scale: Perlin lattice scales ``2**k``, ``k`` in ``[min_scale,
            max_scale)`` per axis (DRAEM: 0 and 6).
        cache_size: Texture images kept decoded and resized (about 200 kB each at 256 px).
    """

    def __init__(
        self,
        texture_dir: str | Path | None = None,
        beta: float | tuple[float, float] = (0.1, 1.0),
        threshold: float = 0.5,
        *,
        min_scale: int = 0,
        max_scale: int = 6,
        cache_size: int = 512,
    ) -> None:
        self.beta = _range("PerlinBlend: beta", beta, 0.0, 1.0)
        _check_perlin("PerlinBlend", threshold, min_scale, max_scale)
        self.threshold = float(threshold)
        self.min_scale, self.max_scale = min_scale, max_scale
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise DatasetError(f"PerlinBlend: cache_size must be an int >= 0, got {cache_size!r}")
        self.cache_size = cache_size
        self.texture_dir = None if texture_dir is None else Path(texture_dir).expanduser()
        self.textures: list[Path] = []
        if self.texture_dir is not None:
            if not self.texture_dir.is_dir():
                state = "is not a directory" if self.texture_dir.exists() else "not found"
                raise DatasetError(f"{self.texture_dir}: texture folder {state}")
            self.textures = sorted(
                (
                    p
                    for p in self.texture_dir.rglob("*")
                    if p.suffix.lower() in IMAGE_SUFFIXES
                    and not p.name.startswith(".")
                    and p.is_file()
                ),
                key=str,
            )
            if not self.textures:
                raise DatasetError(
                    f"{self.texture_dir}: texture folder holds no images "
                    f"({', '.join(IMAGE_SUFFIXES)})"
                )
        self._cache: OrderedDict[tuple[int, int, int], Tensor] = OrderedDict()

    def __repr__(self) -> str:
        source = "generated" if self.texture_dir is None else f"{len(self.textures)} textures"
        return (
            f"PerlinBlend(texture_dir={self.texture_dir!r}, beta={self.beta}, "
            f"threshold={self.threshold}, source={source})"
        )

    def __getstate__(self) -> dict:
        # The cache is a pure speed-up; don't ship it to workers.
        return {**self.__dict__, "_cache": OrderedDict()}

    def __call__(
        self, images: Tensor, generator: GeneratorLike, *, probability: float = 1.0
    ) -> tuple[Tensor, Tensor]:
        """Blend an anomaly into each image; with ``probability`` < 1 the others stay as they
        are, with an empty mask. Returns ``(images, masks)``."""
        _check_images(images, "PerlinBlend")
        _check_rgb(images, "PerlinBlend")
        if not 0 <= probability <= 1:
            raise DatasetError(f"PerlinBlend: probability must be in [0, 1], got {probability!r}")
        g = _generator(generator)
        b, _, height, width = images.shape
        out = images.clone()
        masks = torch.zeros(b, 1, height, width, dtype=images.dtype, device=images.device)
        for i in range(b):
            if _uniform(g, 0, 1) >= probability:
                continue
            mask = perlin_mask(
                height,
                width,
                generator=g,
                threshold=self.threshold,
                min_scale=self.min_scale,
                max_scale=self.max_scale,
                device=images.device,
            )
            image = images[i : i + 1].float()
            source = self._source(image, g)
            beta = _uniform(g, *self.beta)
            blended = torch.lerp(image, source, beta).to(images.dtype)
            out[i] = torch.where(mask, blended[0], images[i])
            masks[i, 0] = mask.to(images.dtype)
        return out, masks

    def _source(self, image: Tensor, g: torch.Generator) -> Tensor:
        """An augmented anomaly source for ``image`` (1 x 3 x H x W float32)."""
        _, _, height, width = image.shape
        if self.textures:
            source = self._texture(_randint(g, 0, len(self.textures)), height, width)
            source = source.to(image.device, torch.float32)[None] / 255
        elif _uniform(g, 0, 1) < 0.5:
            source = _perlin_colours(height, width, g, image.device)
        else:
            source = _restructured(image, g)
        return _draem_augment(source, g)

    def _texture(self, index: int, height: int, width: int) -> Tensor:
        """Texture ``index`` as 3 x H x W uint8 RGB (CPU), cached."""
        key = (index, height, width)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        path = self.textures[index]
        try:
            data = np.fromfile(path, dtype=np.uint8)
            image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
        except (OSError, cv2.error) as exc:
            raise DatasetError(f"{path}: cannot read the texture image ({exc})") from exc
        if image is None or image.size == 0:
            raise DatasetError(f"{path}: not a readable image (texture folder {self.texture_dir})")
        shrinking = image.shape[0] * image.shape[1] >= height * width
        image = cv2.resize(
            image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        )
        rgb = torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1)))
        if self.cache_size:
            self._cache[key] = rgb
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return rgb


def _perlin_colours(height: int, width: int, g: torch.Generator, device) -> Tensor:
    """A generated texture (1 x 3 x H x W): three random colours mixed by two Perlin fields of
    random scales, so the source has blobs, streaks or grain unlike any product surface."""
    colours = torch.rand(3, 3, generator=g).to(device).view(3, 3, 1, 1)
    fields = []
    for _ in range(2):
        ky, kx = _randint(g, 0, 6), _randint(g, 0, 6)
        noise = perlin_noise(height, width, (2**ky, 2**kx), generator=g, device=device)
        # Perlin values gather around 0: stretch them so the colours reach their pure tones.
        fields.append((0.5 + noise).clamp(0, 1)[None])
    first, second = fields
    mix = colours[0] * (1 - first) + colours[1] * first
    return torch.lerp(mix, colours[2], 0.5 * second)[None].clamp(0, 1)


def _restructured(image: Tensor, g: torch.Generator) -> Tensor:
    """The image's own content rearranged (1 x 3 x H x W): tiles shuffled, flipped, shifted,
    so the source has the product's colours and structure but in the wrong places."""
    _, _, height, width = image.shape
    source = image.clone()
    tiles = (1, 2, 4, 8)[_randint(g, 0, 4)]
    th, tw = height // tiles, width // tiles
    if tiles > 1 and th > 0 and tw > 0:
        region = source[:, :, : th * tiles, : tw * tiles]
        blocks = region.reshape(1, 3, tiles, th, tiles, tw).permute(0, 2, 4, 1, 3, 5)
        blocks = blocks.reshape(tiles * tiles, 3, th, tw)
        blocks = blocks[torch.randperm(tiles * tiles, generator=g).to(image.device)]
        blocks = blocks.reshape(1, tiles, tiles, 3, th, tw).permute(0, 3, 1, 4, 2, 5)
        source[:, :, : th * tiles, : tw * tiles] = blocks.reshape(1, 3, th * tiles, tw * tiles)
    if _uniform(g, 0, 1) < 0.5:
        source = source.flip(3)
    if _uniform(g, 0, 1) < 0.5:
        source = source.flip(2)
    shift = (_randint(g, 0, height), _randint(g, 0, width))
    return source.roll(shift, dims=(2, 3))


# ----------------------------------------------------------------------------- CutPaste


class CutPaste:
    """CutPaste and CutPaste-scar (Li et al., CVPR 2021): a patch cut from the image,
    colour-jittered and pasted elsewhere in it.

    Args:
        scar: False for the rectangle variant, True for the scar: a thin, long rectangle turned
            by a random angle.
        area_ratio: Range of the patch's area as a fraction of the image's (rectangle
            variant; the paper's (0.02, 0.15)).
        aspect_ratio: Range of the patch's width / height, drawn log-uniformly (rectangle
            variant; the paper's (0.3, 3.3)).
        scar_width, scar_height: Ranges of the scar's width and length in pixels at
            ``reference_size`` (the paper's (2, 16) and (10, 25) at 256 px), scaled with the
            image's smaller side; at least one pixel.
        scar_angle: Range of the scar's rotation in degrees (the paper's (-45, 45)).
        jitter: Strength of the patch's colour jitter: brightness, contrast and saturation
            factors in ``[1 - jitter, 1 + jitter]`` and a hue turn of up to ``jitter`` of a
            full turn (the paper's torchvision ColorJitter(0.1, 0.1, 0.1, 0.1)).
        reference_size: Image side the scar sizes refer to.
    """

    def __init__(
        self,
        scar: bool = False,
        area_ratio: tuple[float, float] = (0.02, 0.15),
        aspect_ratio: tuple[float, float] = (0.3, 3.3),
        *,
        scar_width: tuple[float, float] = (2, 16),
        scar_height: tuple[float, float] = (10, 25),
        scar_angle: tuple[float, float] = (-45, 45),
        jitter: float = 0.1,
        reference_size: int = 256,
    ) -> None:
        self.scar = bool(scar)
        self.area_ratio = _range("CutPaste: area_ratio", area_ratio, 1e-6, 1.0)
        self.aspect_ratio = _range("CutPaste: aspect_ratio", aspect_ratio, 1e-3, 1e3)
        self.scar_width = _range("CutPaste: scar_width", scar_width, 0.0, math.inf)
        self.scar_height = _range("CutPaste: scar_height", scar_height, 0.0, math.inf)
        self.scar_angle = _range("CutPaste: scar_angle", scar_angle, -180.0, 180.0)
        self.jitter = _range("CutPaste: jitter", jitter, 0.0, 1.0)[0]
        if isinstance(reference_size, bool) or not isinstance(reference_size, int):
            raise DatasetError(f"CutPaste: reference_size must be an int, got {reference_size!r}")
        if reference_size < 1:
            raise DatasetError(f"CutPaste: reference_size must be >= 1, got {reference_size}")
        self.reference_size = reference_size

    def __repr__(self) -> str:
        if self.scar:
            return (
                f"CutPaste(scar=True, scar_width={self.scar_width}, "
                f"scar_height={self.scar_height}, scar_angle={self.scar_angle}, "
                f"jitter={self.jitter})"
            )
        return (
            f"CutPaste(area_ratio={self.area_ratio}, aspect_ratio={self.aspect_ratio}, "
            f"jitter={self.jitter})"
        )

    def __call__(self, images: Tensor, generator: GeneratorLike) -> tuple[Tensor, Tensor]:
        """Paste one patch into each image. Returns ``(images, masks)``."""
        _check_images(images, "CutPaste")
        g = _generator(generator)
        b, _, height, width = images.shape
        out = images.clone()
        masks = torch.zeros(b, 1, height, width, dtype=images.dtype, device=images.device)
        for i in range(b):
            ph, pw, angle = self._patch_shape(height, width, g)
            top, left = _randint(g, 0, height - ph + 1), _randint(g, 0, width - pw + 1)
            patch = images[i : i + 1, :, top : top + ph, left : left + pw].float()
            patch = self._colour_jitter(patch, g).to(images.dtype)[0]
            mask, rows, cols = _paste_footprint(ph, pw, angle, height, width, g, images.device)
            out[i][:, mask] = patch[:, rows, cols]
            masks[i, 0] = mask.to(images.dtype)
        return out, masks

    def _patch_shape(self, height: int, width: int, g: torch.Generator) -> tuple[int, int, float]:
        """(height, width, angle in radians) of the next patch, before rotation."""
        if self.scar:
            scale = min(height, width) / self.reference_size
            pw = max(1, round(_uniform(g, *self.scar_width) * scale))
            ph = max(1, round(_uniform(g, *self.scar_height) * scale))
            angle = math.radians(_uniform(g, *self.scar_angle))
            return min(ph, height), min(pw, width), angle
        area = _uniform(g, *self.area_ratio) * height * width
        aspect = math.exp(_uniform(g, *map(math.log, self.aspect_ratio)))
        pw = min(width, max(1, round(math.sqrt(area * aspect))))
        ph = min(height, max(1, round(math.sqrt(area / aspect))))
        return ph, pw, 0.0

    def _colour_jitter(self, patch: Tensor, g: torch.Generator) -> Tensor:
        """torchvision-like ColorJitter of a 1 x C x h x w patch in [0, 1], fixed order."""
        j = self.jitter
        patch = patch * _uniform(g, 1 - j, 1 + j)
        mean = _gray(patch).mean()
        patch = torch.lerp(mean.expand_as(patch), patch, _uniform(g, 1 - j, 1 + j))
        if patch.shape[1] == 3:
            patch = torch.lerp(_gray(patch).expand_as(patch), patch, _uniform(g, 1 - j, 1 + j))
            patch = _hue_rotation(patch, 2 * math.pi * _uniform(g, -j, j))
        return patch.clamp(0, 1)


def _paste_footprint(
    ph: int, pw: int, angle: float, height: int, width: int, g: torch.Generator, device
) -> tuple[Tensor, Tensor, Tensor]:
    """Where a ``ph x pw`` patch turned by ``angle`` lands: (H x W bool mask, and for each
    masked pixel in row-major order the patch row and column it shows, nearest neighbour so
    pasted pixels are exact copies). The footprint lies inside the image where it fits and
    always covers its centre pixel, so it is never empty."""
    cos, sin = math.cos(angle), math.sin(angle)
    half_x = (abs(pw * cos) + abs(ph * sin)) / 2
    half_y = (abs(pw * sin) + abs(ph * cos)) / 2

    def centre(extent: float, size: int) -> int:
        low = min(math.ceil(extent - 0.5), size // 2)
        high = max(size - 1 - math.ceil(extent - 0.5), low)
        return _randint(g, low, high + 1)

    cy, cx = centre(half_y, height), centre(half_x, width)
    ys, xs = _pixel_grid(height, width, device)
    dy, dx = ys - cy, xs - cx
    # Inverse rotation to patch coordinates, where patch pixel j covers [j, j + 1): flooring is
    # nearest-neighbour sampling and, unrotated, a one-to-one copy (float64 keeps that exact).
    u = (cos * dx.double() + sin * dy.double()) + pw / 2
    v = (-sin * dx.double() + cos * dy.double()) + ph / 2
    cols, rows = torch.floor(u).long(), torch.floor(v).long()
    mask = (cols >= 0) & (cols < pw) & (rows >= 0) & (rows < ph)
    return mask, rows[mask], cols[mask]


# ----------------------------------------------------------------------------- LocalWarp


class LocalWarp:
    """A local warp like GIMP's warp tool, with which the reference study made its defects:
    pixels are pushed in a random direction by a smooth Gaussian bump of displacement.

    Args:
        radius: Range of the bump's radius (like the size of GIMP's warp brush) as a fraction
            of the image's smaller side: two standard deviations of the Gaussian falloff, where
            the push has fallen to 14 % of its peak.
        strength: Range of the peak displacement as a fraction of the radius. Up to 0.8 the
            warp never folds the image over itself (the Gaussian's steepest slope times the
            peak stays below one); the peak is at least one pixel whatever the fraction, so
            the mask is never empty.
        on_structure: Draw the bump's centre with probability proportional to the local image
            gradient, so warps land on edges and texture where they are visible (a warp of a
            flat area changes nothing); False draws it uniformly.

    Every pixel the warp moves by more than half a pixel is in the mask. Outside the mask the
    image is resampled at less than half a pixel from each pixel centre (bilinear), so each
    pixel stays within the range of its 3 x 3 neighbourhood; pixels moved by less than
    :attr:`EXACT_BELOW` pixels are kept bit-identical.
    """

    EXACT_BELOW = 0.01

    def __init__(
        self,
        radius: tuple[float, float] = (0.05, 0.2),
        strength: tuple[float, float] = (0.15, 0.5),
        *,
        on_structure: bool = True,
    ) -> None:
        self.radius = _range("LocalWarp: radius", radius, 1e-4, 10.0)
        self.strength = _range("LocalWarp: strength", strength, 0.0, 0.8)
        self.on_structure = bool(on_structure)

    def __repr__(self) -> str:
        return (
            f"LocalWarp(radius={self.radius}, strength={self.strength}, "
            f"on_structure={self.on_structure})"
        )

    def __call__(self, images: Tensor, generator: GeneratorLike) -> tuple[Tensor, Tensor]:
        """Warp each image once. Returns ``(images, masks)``."""
        _check_images(images, "LocalWarp")
        g = _generator(generator)
        b, _, height, width = images.shape
        centres = self._centres(images, g)  # B x 2 (y, x), pixel centres
        side = min(height, width)
        radius = _uniform(g, *self.radius, b) * side
        sigma = torch.clamp(radius / 2, min=1.0)
        push = torch.clamp(_uniform(g, *self.strength, b) * radius, min=1.0)
        angle = _uniform(g, 0, 2 * math.pi, b)
        vy, vx = push * angle.sin(), push * angle.cos()

        device = images.device
        ys, xs = _pixel_grid(height, width, device)
        cy, cx = (centres[:, k].to(device).view(b, 1, 1) for k in (0, 1))
        sigma = sigma.to(device).view(b, 1, 1)
        falloff = torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma**2))
        dy, dx = vy.to(device).view(b, 1, 1) * falloff, vx.to(device).view(b, 1, 1) * falloff
        moved = torch.sqrt(dy**2 + dx**2)
        # Backward mapping: each pixel takes its value from where the push came from.
        grid = _to_normalised(ys - dy, xs - dx, height, width)
        warped = F.grid_sample(
            images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False
        ).to(images.dtype)
        out = torch.where((moved >= self.EXACT_BELOW)[:, None], warped, images)
        return out, (moved > 0.5)[:, None].to(images.dtype)

    def _centres(self, images: Tensor, g: torch.Generator) -> Tensor:
        """B x 2 (row, column) integer pixel centres of the bumps."""
        b, _, height, width = images.shape
        if self.on_structure:
            gray = _gray(images.float())
            gy = (gray[:, :, 1:, :] - gray[:, :, :-1, :]).abs()
            gx = (gray[:, :, :, 1:] - gray[:, :, :, :-1]).abs()
            energy = F.pad(gy, (0, 0, 0, 1)) + F.pad(gx, (0, 1, 0, 0))
            # Smoothed, so a centre near (not only on) an edge is likely too.
            energy = F.avg_pool2d(energy, 5, stride=1, padding=2, count_include_pad=False)
            weights = energy.flatten(1).double().cpu()
            # A floor keeps every pixel possible; a flat image falls back to uniform.
            weights = weights + 0.05 * weights.mean(dim=1, keepdim=True) + 1e-12
        else:
            weights = torch.ones(b, height * width, dtype=torch.float64)
        index = torch.multinomial(weights, 1, generator=g)[:, 0]
        return torch.stack((index // width, index % width), dim=1).float()


# ----------------------------------------------------------------------------- by name


def synthesize(
    images: Tensor, kind: str, *, seed: int, texture_dir: str | Path | None = None
) -> tuple[Tensor, Tensor]:
    """Anomalies of one ``kind`` (:data:`SYNTHETIC_KINDS`) in every image, with the generators'
    defaults, from ``seed``; ``texture_dir`` is the Perlin blend's texture source. Returns
    ``(images, masks)``; every mask is non-empty."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DatasetError(f"synthesize: seed must be an int, got {seed!r}")
    generator = torch.Generator().manual_seed(seed)
    if kind == "perlin":
        return PerlinBlend(texture_dir)(images, generator)
    if kind in ("cutpaste", "cutpaste_scar"):
        return CutPaste(scar=kind == "cutpaste_scar")(images, generator)
    if kind == "warp":
        return LocalWarp()(images, generator)
    raise DatasetError(
        f"synthesize: unknown anomaly kind {kind!r} (known: {', '.join(SYNTHETIC_KINDS)})"
    )
