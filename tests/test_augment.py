"""Training augmentation sets: Table 3's parameters as albumentations builds them, seeded
determinism, per-image probabilities, and the errors a study's own sets can raise."""

from __future__ import annotations

import json
import pickle

import albumentations as A
import pytest
import torch

from data import (
    BUILTIN_AUGMENTATIONS,
    AugmentationSet,
    Augmenter,
    DatasetError,
    TransformSpec,
    augmentation_sets,
    parse_augmentation_sets,
)


def batch(n: int = 32, size: int = 48, seed: int = 0) -> torch.Tensor:
    """Textured uint8 images (a gradient plus noise), so that blur, noise and contrast changes
    all show."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(40, 200, size).view(1, 1, 1, size)
    noise = torch.randint(0, 40, (n, 3, size, size), generator=g)
    return (ramp + noise).clamp(0, 255).to(torch.uint8)


def changed(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Per image: whether any pixel differs."""
    return (before != after).flatten(1).any(dim=1)


# ----------------------------------------------------------------------------- Table 3


def built(name: str) -> list[A.BasicTransform]:
    return list(BUILTIN_AUGMENTATIONS[name].compose(seed=0).transforms)


def check_defocus(t: A.BasicTransform) -> None:
    assert isinstance(t, A.Defocus)
    assert (t.p, tuple(t.radius), tuple(t.alias_blur)) == (0.5, (3, 10), (0.1, 0.5))


def check_brightness_contrast(t: A.BasicTransform) -> None:
    assert isinstance(t, A.RandomBrightnessContrast)
    assert t.p == 0.5
    assert tuple(t.brightness_limit) == (-0.2, 0.2)
    assert tuple(t.contrast_limit) == (-0.2, 0.2)
    assert t.brightness_by_max is True


def check_iso_noise(t: A.BasicTransform) -> None:
    assert isinstance(t, A.ISONoise)
    assert (t.p, tuple(t.color_shift), tuple(t.intensity)) == (0.5, (0.01, 0.05), (0.1, 0.5))


def test_builtins_build_table3_parameters():
    """Read back from the albumentations objects, not from our own dicts."""
    assert set(BUILTIN_AUGMENTATIONS) == {
        "none",
        "defocus",
        "brightness_contrast",
        "iso_noise",
        "table3_all",
    }
    assert built("none") == [] and BUILTIN_AUGMENTATIONS["none"].is_identity
    (defocus,) = built("defocus")
    check_defocus(defocus)
    (brightness_contrast,) = built("brightness_contrast")
    check_brightness_contrast(brightness_contrast)
    (iso_noise,) = built("iso_noise")
    check_iso_noise(iso_noise)
    together = built("table3_all")
    assert len(together) == 3
    for transform, check in zip(
        together, (check_defocus, check_brightness_contrast, check_iso_noise), strict=True
    ):
        check(transform)


def test_spec_is_json_and_parses_back_to_the_same_set():
    spec = BUILTIN_AUGMENTATIONS["table3_all"].spec()
    assert json.loads(json.dumps(spec)) == spec
    assert spec[0] == {"Defocus": {"p": 0.5, "radius": [3, 10], "alias_blur": [0.1, 0.5]}}
    again = parse_augmentation_sets({"mine": spec})["mine"]
    assert again.spec() == spec
    assert again.transforms == BUILTIN_AUGMENTATIONS["table3_all"].transforms
    # Equal sets hash alike, so they can key caches.
    assert hash(again.transforms) == hash(BUILTIN_AUGMENTATIONS["table3_all"].transforms)
    assert BUILTIN_AUGMENTATIONS["none"].spec() == []
    # Sets travel to Ray workers.
    assert pickle.loads(pickle.dumps(again)) == again


# ----------------------------------------------------------------------------- applying


def test_same_seed_same_images_and_each_call_draws_anew():
    x = batch()
    first = Augmenter(BUILTIN_AUGMENTATIONS["table3_all"], seed=7)
    second = Augmenter(BUILTIN_AUGMENTATIONS["table3_all"], seed=7)
    epoch1 = first(x)
    assert torch.equal(epoch1, second(x))
    epoch2 = first(x)
    assert torch.equal(epoch2, second(x))
    assert not torch.equal(epoch1, epoch2)
    other = Augmenter(BUILTIN_AUGMENTATIONS["table3_all"], seed=8)(x)
    assert not torch.equal(epoch1, other)


def test_none_is_the_identity_without_a_copy():
    x = batch(4)
    assert Augmenter(BUILTIN_AUGMENTATIONS["none"], seed=0)(x) is x


@pytest.mark.parametrize("name", ["defocus", "brightness_contrast", "iso_noise"])
def test_half_of_the_images_change_at_p_one_half(name):
    x = batch(32)
    y = Augmenter(BUILTIN_AUGMENTATIONS[name], seed=0)(x)
    assert y.shape == x.shape and y.dtype == torch.uint8
    n_changed = int(changed(x, y).sum())
    # Binomial(32, 0.5): 6..26 holds with probability > 0.9998.
    assert 6 <= n_changed <= 26, n_changed
    # Unchanged images are bit-identical, not merely close.
    kept = ~changed(x, y)
    assert torch.equal(x[kept], y[kept])


def test_table3_transforms_fire_independently():
    """Each transform draws from its own stream: albumentations' Compose(seed=) alone seeds all
    three alike, so their p = 0.5 draws coincide and a quarter of the images, not an eighth,
    would pass through untouched."""
    x = batch(256, size=16)
    y = Augmenter(BUILTIN_AUGMENTATIONS["table3_all"], seed=3)(x)
    untouched = 1 - changed(x, y).float().mean().item()
    assert 0.06 < untouched < 0.2, untouched


def test_shape_dtype_and_device_are_kept_for_any_size():
    x = batch(3, size=40)[:, :, :, :36].contiguous()
    y = Augmenter(BUILTIN_AUGMENTATIONS["table3_all"], seed=1)(x)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert y.is_contiguous()


def test_user_set_with_a_geometric_transform_applies():
    sets = augmentation_sets({"flip": [{"HorizontalFlip": {"p": 1.0}}]})
    assert set(BUILTIN_AUGMENTATIONS) < set(sets)
    x = batch(2)
    assert torch.equal(Augmenter(sets["flip"], seed=0)(x), x.flip(-1))


@pytest.mark.parametrize(
    "pixels",
    [torch.zeros(2, 3, 8, 8), torch.zeros(2, 1, 8, 8, dtype=torch.uint8), "images"],
)
def test_augmenter_refuses_other_inputs(pixels):
    with pytest.raises(DatasetError, match="Augmenter"):
        Augmenter(BUILTIN_AUGMENTATIONS["defocus"], seed=0)(pixels)


def test_augmenter_needs_a_set_and_a_seed():
    with pytest.raises(DatasetError, match="seed"):
        Augmenter(BUILTIN_AUGMENTATIONS["defocus"], seed=-1)
    with pytest.raises(DatasetError, match="AugmentationSet"):
        Augmenter("defocus", seed=0)


# ----------------------------------------------------------------------------- parse errors


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"blur": [{"GaussianBlur": {}}, {"GausianBlur": {}}]},
            "augmentation set 'blur': item 1: unknown albumentations transform 'GausianBlur' "
            "(did you mean 'GaussianBlur'?)",
        ),
        (
            {"blur": [{"Defocus": {"radius": 0}}]},
            "augmentation set 'blur': item 0: Defocus: bad argument 'radius'",
        ),
        (
            {"blur": [{"Defocus": {"radious": 4}}]},
            "augmentation set 'blur': item 0: Defocus: Argument(s) 'radious' are not valid",
        ),
        ({"blur": ["Defocus"]}, "augmentation set 'blur': item 0: expected a mapping"),
        (
            {"blur": [{"Defocus": {}, "Blur": {}}]},
            "augmentation set 'blur': item 0: expected a mapping with one key",
        ),
        ({"blur": [{"Defocus": [3, 10]}]}, "item 0: 'Defocus': arguments must be a mapping"),
        ({"blur": {"Defocus": {}}}, "augmentation set 'blur': expected a list"),
        ({"blur": []}, "augmentation set 'blur': no transforms"),
        ({"defocus": [{"Blur": {}}]}, "augmentation set 'defocus': redefines a built-in set"),
        (
            {"crop": [{"CenterCrop": {"height": 32, "width": 32}}]},
            "augmentation set 'crop': item 0: CenterCrop: changes the image size",
        ),
        (
            {"crop": [{"RandomResizedCrop": {"size": [256, 256]}}]},
            "item 0: RandomResizedCrop: changes the image size",
        ),
        ({"f": [{"ToFloat": {}}]}, "augmentation set 'f': item 0: ToFloat: returns float32"),
        (
            {"m": [{"MaskDropout": {}}]},
            "augmentation set 'm': item 0: MaskDropout: cannot be applied",
        ),
        ({"o": [{"OneOf": {}}]}, "item 0: unknown albumentations transform 'OneOf' (compositions"),
        ({"b": [{"Blur": {"p": float("nan")}}]}, "augmentation set 'b': item 0: Blur.p: expected"),
        ({"b": [{"Blur": {"strict": False}}]}, "augmentation set 'b': item 0: Blur: 'strict'"),
    ],
)
def test_parse_errors_name_the_set_the_item_and_the_key(raw, expected):
    with pytest.raises(DatasetError) as info:
        parse_augmentation_sets(raw)
    assert expected in str(info.value)


def test_parse_refuses_a_non_mapping():
    with pytest.raises(DatasetError, match="augmentation sets: expected a mapping"):
        parse_augmentation_sets([{"Blur": {}}])


def test_transform_spec_builds_fresh_transforms():
    spec = TransformSpec("Defocus", {"radius": (3, 5)})
    assert dict(spec.kwargs) == {"radius": [3, 5]}
    first, second = spec.build(), spec.build(p=1.0)
    assert first is not second and second.p == 1.0 and tuple(second.radius) == (3, 5)
    assert AugmentationSet("x", (spec,)).spec() == [{"Defocus": {"radius": [3, 5]}}]
