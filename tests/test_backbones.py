"""Backbone registry and FeatureExtractor: shapes, layer names, freezing, local weight files."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from models.backbones import BACKBONES, FeatureExtractor, get_backbone, list_backbones
from models.base import ModelError


def test_registry_lists_the_reference_backbones():
    names = list_backbones()
    assert names == sorted(names)
    assert {"resnet18", "resnet50", "wide_resnet50_2"} <= set(names)
    for name, spec in BACKBONES.items():
        assert spec.name == name
        strides = [stride for stride, _ in spec.layers.values()]
        assert strides == sorted(strides), f"{name}: layers must go from shallow to deep"


@pytest.mark.parametrize("name", list_backbones())
def test_every_declared_layer_has_its_declared_shape(name):
    spec = BACKBONES[name]
    # On the meta device timm builds the network without allocating or initialising weights, so
    # every registered backbone is checked in milliseconds.
    with torch.device("meta"):
        extractor = FeatureExtractor(name, list(spec.layers), pretrained=False)
        features = extractor(torch.empty(2, 3, 64, 64))
    assert list(features) == list(spec.layers)
    for layer, (stride, channels) in spec.layers.items():
        assert extractor.strides[layer] == stride
        assert extractor.channels[layer] == channels
        assert features[layer].shape == (2, channels, 64 // stride, 64 // stride), layer


def test_features_come_back_in_the_requested_order_on_real_tensors():
    extractor = FeatureExtractor("resnet18", ["layer3", "layer1"], pretrained=False)
    features = extractor(torch.randn(1, 3, 64, 64))
    assert list(features) == ["layer3", "layer1"]
    assert features["layer1"].shape == (1, 64, 16, 16)
    assert features["layer3"].shape == (1, 256, 4, 4)
    assert extractor.channels == {"layer3": 256, "layer1": 64}
    assert extractor.strides == {"layer3": 16, "layer1": 4}


def test_unknown_backbone_suggests_the_closest():
    with pytest.raises(ModelError, match=r"unknown backbone 'resnet19'.*did you mean 'resnet18'"):
        FeatureExtractor("resnet19", ["layer1"], pretrained=False)
    with pytest.raises(ModelError, match="wide_resnet50_2"):
        get_backbone("wideresnet50")


def test_unknown_layer_lists_the_valid_ones():
    with pytest.raises(ModelError, match=r"no layer 'layer5'.*valid: act1, layer1, layer2"):
        FeatureExtractor("resnet18", ["layer2", "layer5"], pretrained=False)
    with pytest.raises(ModelError, match="did you mean 'layer2'"):
        FeatureExtractor("resnet18", ["layr2"], pretrained=False)


def test_empty_or_repeated_layers_are_errors():
    with pytest.raises(ModelError, match="at least one layer"):
        FeatureExtractor("resnet18", [], pretrained=False)
    with pytest.raises(ModelError, match="repeated: layer2"):
        FeatureExtractor("resnet18", ["layer2", "layer2"], pretrained=False)


def test_frozen_extractor_stays_in_eval_mode():
    extractor = FeatureExtractor("resnet18", ["layer1"], pretrained=False)
    parent = torch.nn.Sequential(extractor)
    parent.train()
    assert not extractor.training
    assert not any(module.training for module in extractor.modules())
    assert not any(p.requires_grad for p in extractor.parameters())

    trainable = FeatureExtractor("resnet18", ["layer1"], pretrained=False, requires_grad=True)
    torch.nn.Sequential(trainable).train()
    assert trainable.training
    assert all(p.requires_grad for p in trainable.parameters())


def test_random_initialisation_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    first = FeatureExtractor("resnet18", ["layer1"], pretrained=False, seed=7)
    second = FeatureExtractor("resnet18", ["layer1"], pretrained=False, seed=7)
    other = FeatureExtractor("resnet18", ["layer1"], pretrained=False, seed=8)
    assert torch.equal(state, torch.random.get_rng_state())
    weight = "model.conv1.weight"
    assert torch.equal(first.state_dict()[weight], second.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], other.state_dict()[weight])


def _timm_checkpoint(seed: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A full randomly initialised timm resnet18 (classifier included) and its state dict."""
    torch.manual_seed(seed)
    model = timm.create_model("resnet18", pretrained=False).eval()
    return model, model.state_dict()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_round_trip(tmp_path, suffix):
    source, state = _timm_checkpoint(seed=123)
    path = tmp_path / f"random{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)

    layers = ["layer1", "layer2"]
    extractor = FeatureExtractor("resnet18", layers, pretrained=True, weights=path)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = extractor(images)
        expected = source.forward_intermediates(images, indices=[1, 2], intermediates_only=True)
    for layer, reference in zip(layers, expected, strict=True):
        torch.testing.assert_close(features[layer], reference, rtol=0, atol=0)
    # The file replaced the random initialisation: a different seed gives the same features.
    again = FeatureExtractor("resnet18", layers, pretrained=False, weights=path, seed=99)
    with torch.no_grad():
        assert torch.equal(again(images)["layer2"], features["layer2"])


def test_weights_directory_finds_the_backbone_file(tmp_path):
    _, state = _timm_checkpoint(seed=5)
    torch.save({"state_dict": state}, tmp_path / "resnet18.pth")
    extractor = FeatureExtractor("resnet18", ["layer1"], pretrained=False, weights=tmp_path)
    assert torch.equal(extractor.state_dict()["model.conv1.weight"], state["conv1.weight"])
    with pytest.raises(ModelError, match=r"no file for backbone 'resnet50'.*resnet50\.pth"):
        FeatureExtractor("resnet50", ["layer1"], pretrained=False, weights=tmp_path)


def test_bad_weights_files_name_the_path(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(ModelError, match=r"nowhere\.pth.*does not exist"):
        FeatureExtractor("resnet18", ["layer1"], pretrained=False, weights=missing)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=r"garbage\.pth.*could not be read"):
        FeatureExtractor("resnet18", ["layer1"], pretrained=False, weights=garbage)

    torch.manual_seed(0)
    resnet50 = timm.create_model("resnet50", pretrained=False).state_dict()
    wrong = tmp_path / "resnet50_weights.pth"
    torch.save(resnet50, wrong)
    with pytest.raises(
        ModelError, match=r"resnet50_weights\.pth.*does not fit backbone 'resnet18'"
    ):
        FeatureExtractor("resnet18", ["layer1"], pretrained=False, weights=wrong)

    partial = tmp_path / "partial.pth"
    torch.save({"conv1.weight": resnet50["conv1.weight"]}, partial)
    with pytest.raises(ModelError, match=r"partial\.pth.*missing keys"):
        FeatureExtractor("resnet18", ["layer1"], pretrained=False, weights=partial)
