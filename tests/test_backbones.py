"""Backbone registry and FeatureExtractor: shapes, layer names, freezing, local weight files."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from data.transforms import IMAGENET_MEAN, IMAGENET_STD
from models import backbones
from models.backbones import (
    BACKBONES,
    STAGE_ALIASES,
    BackboneSpec,
    FeatureExtractor,
    backbone_param_count,
    get_backbone,
    list_backbones,
    meta_init,
    resolve_layers,
)
from models.errors import ModelError

SINGLE = [name for name in list_backbones() if BACKBONES[name].kind != "composite"]
CNNS = [name for name in SINGLE if BACKBONES[name].kind == "cnn"]
TRANSFORMERS = [name for name in SINGLE if BACKBONES[name].kind == "vit"]


def test_registry_lists_the_reference_backbones():
    names = list_backbones()
    assert names == sorted(names)
    assert len(SINGLE) >= 28
    expected = {
        *["resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2", "wide_resnet101_2"],
        *["resnext50_32x4d", "resnext101_32x8d", "mobilenetv3_large_100", "mobilenetv3_small_100"],
        *["convnext_tiny", "convnext_small", "densenet121", "densenet201", "vgg16_bn", "vgg19_bn"],
        *["deit_base_distilled_patch16_384", "cait_m48_448", "cait_s24_224", "mcait"],
        *["vit_base_patch16_224", "vit_small_patch14_dinov2", "vit_base_patch14_dinov2"],
        *(f"efficientnet_b{i}" for i in range(8)),
    }
    assert expected <= set(names)
    for name, spec in BACKBONES.items():
        assert spec.name == name
        assert spec.family, name
        strides = [stride for stride, _ in spec.layers.values()]
        assert strides == sorted(strides), f"{name}: layers must go from shallow to deep"
        if spec.kind == "vit":
            assert spec.input_size and spec.input_size % spec.patch_size == 0, name
            assert len(set(spec.layers.values())) == 1, f"{name}: one stride and width"


def test_resnets_use_torchvision_weights_and_all_tags_exist():
    for name in ("resnet18", "wide_resnet50_2", "resnext101_32x8d", "densenet121", "vgg16_bn"):
        assert BACKBONES[name].timm_name == f"{name}.tv_in1k"
    for name in SINGLE:
        spec = BACKBONES[name]
        cfg = timm.models.get_pretrained_cfg(spec.timm_name)
        assert cfg is not None, f"{name}: timm has no pretrained tag {spec.timm_name!r}"
        # Every backbone is told the statistics its weights were trained with, so that the
        # extractor can convert the ImageNet-normalised images it receives.
        assert (tuple(cfg.mean), tuple(cfg.std)) == (spec.mean, spec.std), name
        if spec.kind == "vit":
            assert cfg.input_size[-1] == spec.input_size, name
    assert (backbones.IMAGENET_MEAN, backbones.IMAGENET_STD) == (IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize("name", SINGLE)
def test_every_declared_layer_has_its_declared_shape(name):
    spec = BACKBONES[name]
    size = 64 if spec.kind == "cnn" else spec.input_size
    # On the meta device timm builds the network without allocating or initialising weights, so
    # every registered backbone is checked in a fraction of a second.
    with meta_init():
        extractor = FeatureExtractor(name, list(spec.layers), pretrained=False)
    with torch.device("meta"):
        features = extractor(torch.empty(1, 3, size, size))
    assert list(features) == list(spec.layers)
    for layer, (stride, channels) in spec.layers.items():
        assert extractor.strides[layer] == stride
        assert extractor.channels[layer] == channels
        assert features[layer].shape == (1, channels, size // stride, size // stride), layer
    if spec.kind == "cnn":
        # The stage aliases name the deepest native layer at their stride.
        assert set(spec.aliases) | set(spec.layers) >= set(STAGE_ALIASES)
        for alias, stride in STAGE_ALIASES.items():
            native = spec.native(alias)
            assert features[native].shape[-1] == size // stride, alias
            deeper = list(spec.layers)[list(spec.layers).index(native) + 1 :]
            assert all(spec.layers[layer][0] > stride for layer in deeper), alias
    else:
        assert spec.aliases == {}


@pytest.mark.parametrize(
    "name", ["efficientnet_b0", "convnext_tiny", "densenet121", "vgg16_bn", "mobilenetv3_small_100"]
)
def test_stage_aliases_work_on_other_families(name):
    with meta_init():
        extractor = FeatureExtractor(name, ["layer3", "layer1", "layer2"], pretrained=False)
    with torch.device("meta"):
        features = extractor(torch.empty(1, 3, 64, 64))
    assert list(features) == ["layer3", "layer1", "layer2"]
    assert extractor.strides == {"layer3": 16, "layer1": 4, "layer2": 8}
    spec = BACKBONES[name]
    for layer, feature in features.items():
        assert feature.shape[1] == extractor.channels[layer] == spec.layer(layer)[1]
        assert feature.shape[-1] == 64 // STAGE_ALIASES[layer]


def test_alias_and_native_name_of_one_layer_are_repeats():
    spec = get_backbone("efficientnet_b0")
    assert spec.aliases["layer2"] == "blocks.2"
    assert resolve_layers(spec, ["layer2", "blocks.4"]) == ["layer2", "blocks.4"]
    with pytest.raises(ModelError, match=r"repeated: layer2/blocks\.2"):
        resolve_layers(spec, ["layer2", "blocks.2"])


def test_bad_alias_lists_the_valid_names_with_stride_and_channels():
    with pytest.raises(ModelError) as error:
        FeatureExtractor("efficientnet_b0", ["layer2", "layer5"], pretrained=False)
    message = str(error.value)
    assert "no layer 'layer5'" in message
    assert "valid: blocks.0, blocks.1, blocks.2, blocks.4, blocks.6, layer1, layer2" in message
    assert "blocks.2 = layer2 8/40" in message and "blocks.6 = layer4 32/320" in message
    # Transformers are described compactly: a range of blocks at one stride and width.
    with pytest.raises(ModelError, match=r"valid: blocks\.0 \.\. blocks\.47.*stride 16 with 768"):
        resolve_layers(get_backbone("cait_m48_448"), ["layer3"])


def test_mcait_is_a_composite_that_only_uflow_reads():
    spec = get_backbone("mcait")
    assert spec.kind == "composite" and "mcait" in list_backbones()
    assert spec.members == ("cait_m48_448", "cait_s24_224")
    assert all(get_backbone(member).kind == "vit" for member in spec.members)
    with pytest.raises(ModelError, match=r"'mcait' is a pair of backbones.*uflow.*'cait_m48_448'"):
        FeatureExtractor("mcait", ["blocks.40"], pretrained=False)
    with pytest.raises(ModelError, match="composite"):
        resolve_layers(spec, ["blocks.40"])


def test_param_counts_are_computed_without_allocating():
    torch.manual_seed(0)
    real = timm.create_model("resnet18.tv_in1k", pretrained=False)
    assert backbone_param_count("resnet18") == sum(p.numel() for p in real.parameters())
    assert backbone_param_count("wide_resnet50_2") == 68_883_240  # torchvision's figure
    truncated = FeatureExtractor("resnet18", ["layer2"], pretrained=False)
    assert backbone_param_count("resnet18", ["layer2"]) == sum(
        p.numel() for p in truncated.parameters()
    )
    assert backbone_param_count("mcait") == backbone_param_count(
        "cait_m48_448"
    ) + backbone_param_count("cait_s24_224")
    assert backbone_param_count("cait_m48_448") > 350_000_000


def _tiny_transformer(monkeypatch, timm_name, depth, dim, **kwargs) -> BackboneSpec:
    """Register a small timm transformer for real-tensor tests (the registered ones are big)."""
    spec = BackboneSpec(
        timm_name,
        timm_name,
        {f"blocks.{i}": (16, dim) for i in range(depth)},
        kind="vit",
        input_size=224,
        family="test",
        **kwargs,
    )
    monkeypatch.setitem(BACKBONES, timm_name, spec)
    return spec


def _reference_tokens(timm_name, seed, images, block, dynamic=True):
    """Patch tokens after ``block`` of the whole timm model, computed independently of the
    extractor: a forward hook on the block, prefix tokens cut off, rows of the patch grid."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        extra = {"dynamic_img_size": True} if dynamic else {}
        model = timm.create_model(timm_name, pretrained=False, **extra).eval()
    captured = {}
    model.blocks[block].register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    with torch.no_grad():
        normed = model.forward_features(images)
    height, width = images.shape[-2] // 16, images.shape[-1] // 16

    def as_map(tokens: torch.Tensor) -> torch.Tensor:
        prefix = tokens.shape[1] - height * width
        return tokens[:, prefix:].reshape(len(tokens), height, width, -1).permute(0, 3, 1, 2)

    tokens = captured["x"]
    return as_map(tokens), as_map(normed), tokens.shape[1] - height * width


def test_transformer_tokens_are_patch_grid_maps_without_prefix_tokens(monkeypatch):
    # DeiT-tiny distilled has a class and a distillation token; it takes other sizes than 224.
    _tiny_transformer(
        monkeypatch, "deit_tiny_distilled_patch16_224", depth=12, dim=192, dynamic_size=True
    )
    images = torch.randn(2, 3, 48, 64)
    extractor = FeatureExtractor(
        "deit_tiny_distilled_patch16_224", ["blocks.5", "blocks.2"], pretrained=False, seed=3
    )
    assert len(extractor.model.blocks) == 6  # the deeper blocks are not even built
    with torch.no_grad():
        features = extractor(images)
        normed = extractor(images, norm=True)
    assert list(features) == ["blocks.5", "blocks.2"]
    assert features["blocks.2"].shape == (2, 192, 3, 4)
    assert extractor.strides == {"blocks.5": 16, "blocks.2": 16}
    raw, _, prefix = _reference_tokens("deit_tiny_distilled_patch16_224", 3, images, block=5)
    assert prefix == 2
    torch.testing.assert_close(features["blocks.5"], raw)
    # The final norm is a LayerNorm over channels at each position.
    norm = extractor.model.norm
    expected = norm(raw.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(normed["blocks.5"], expected)


def test_cait_takes_its_fixed_size_only(monkeypatch):
    _tiny_transformer(monkeypatch, "cait_xxs24_224", depth=24, dim=192)
    extractor = FeatureExtractor("cait_xxs24_224", ["blocks.1"], pretrained=False, seed=1)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        features = extractor(images)
    raw, _, prefix = _reference_tokens("cait_xxs24_224", 1, images, block=1, dynamic=False)
    assert prefix == 0  # CaiT's class token only enters the class-attention blocks
    assert features["blocks.1"].shape == (1, 192, 14, 14)
    torch.testing.assert_close(features["blocks.1"], raw)
    with pytest.raises(ModelError, match=r"takes 224x224 px images only.*got 64x64"):
        extractor(torch.randn(1, 3, 64, 64))


def test_dynamic_transformers_need_multiples_of_the_patch_size():
    spec = get_backbone("vit_small_patch14_dinov2")
    assert spec.patch_size == 14 and spec.input_size == 518 and spec.dynamic_size
    assert spec.size_problem(224) is None and spec.size_problem(518) is None
    assert "multiples of its patch size 14" in spec.size_problem(64)
    assert "448x448 px images only" in get_backbone("cait_m48_448").size_problem(224)
    assert get_backbone("resnet18").size_problem(61) is None
    with meta_init():
        extractor = FeatureExtractor("vit_small_patch14_reg4_dinov2", ["blocks.11"], False)
    with torch.device("meta"):
        # Register tokens (4) and the class token are dropped: a 16 x 16 grid at 224 px.
        assert extractor(torch.empty(1, 3, 224, 224))["blocks.11"].shape == (1, 384, 16, 16)
        with pytest.raises(ModelError, match=r"multiples of its patch size 14.*got 64x64"):
            extractor(torch.empty(1, 3, 64, 64))


def test_weights_trained_on_other_statistics_get_converted_inputs(monkeypatch):
    # ViT AugReg weights expect (x - 0.5) / 0.5; images arrive ImageNet-normalised.
    half = (0.5, 0.5, 0.5)
    _tiny_transformer(
        monkeypatch,
        "vit_tiny_patch16_224",
        depth=12,
        dim=192,
        dynamic_size=True,
        mean=half,
        std=half,
    )
    extractor = FeatureExtractor("vit_tiny_patch16_224", ["blocks.3"], pretrained=False)
    assert backbone_param_count("vit_tiny_patch16_224", ["blocks.3"]) == sum(
        p.numel() for p in extractor.parameters()
    )
    assert "input_scale" not in extractor.state_dict()
    images = torch.randn(1, 3, 32, 32)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    own = (images * std + mean - 0.5) / 0.5
    with torch.no_grad():
        features = extractor(images)["blocks.3"]
    raw, _, _ = _reference_tokens("vit_tiny_patch16_224", 0, own, block=3)
    torch.testing.assert_close(features, raw)


def test_transformer_weights_file_round_trip(monkeypatch, tmp_path):
    _tiny_transformer(
        monkeypatch, "deit_tiny_distilled_patch16_224", depth=12, dim=192, dynamic_size=True
    )
    torch.manual_seed(11)
    full = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False)
    path = tmp_path / "deit.safetensors"
    save_file(full.state_dict(), str(path))
    first = FeatureExtractor("deit_tiny_distilled_patch16_224", ["blocks.1"], weights=path)
    second = FeatureExtractor("deit_tiny_distilled_patch16_224", ["blocks.1"], weights=path, seed=5)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(first(images)["blocks.1"], second(images)["blocks.1"])
    assert torch.equal(first.model.pos_embed, full.pos_embed)


def test_norm_is_refused_on_cnns():
    extractor = FeatureExtractor("resnet18", ["layer1"], pretrained=False)
    with pytest.raises(ModelError, match="norm=True applies to transformer"):
        extractor(torch.randn(1, 3, 32, 32), norm=True)


def test_features_come_back_in_the_requested_order_on_real_tensors():
    extractor = FeatureExtractor("resnet18", ["layer3", "layer1"], pretrained=False)
    features = extractor(torch.randn(1, 3, 64, 64))
    assert list(features) == ["layer3", "layer1"]
    assert features["layer1"].shape == (1, 64, 16, 16)
    assert features["layer3"].shape == (1, 256, 4, 4)
    assert extractor.channels == {"layer3": 256, "layer1": 64}
    assert extractor.strides == {"layer3": 16, "layer1": 4}


def test_aliased_features_equal_the_native_ones_on_real_tensors():
    by_alias = FeatureExtractor("mobilenetv3_small_100", ["layer2"], pretrained=False, seed=2)
    by_name = FeatureExtractor("mobilenetv3_small_100", ["blocks.1"], pretrained=False, seed=2)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        aliased, native = by_alias(images)["layer2"], by_name(images)["blocks.1"]
    assert aliased.shape == (1, 24, 8, 8)
    assert torch.equal(aliased, native)


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

    # A checkpoint of another architecture: resnet18's keys with a deeper stem's shapes, and
    # one with a single key.
    _, state = _timm_checkpoint(seed=0)
    other = dict(state, **{"conv1.weight": torch.zeros(32, 3, 3, 3)})
    wrong = tmp_path / "resnet18t_weights.pth"
    torch.save(other, wrong)
    with pytest.raises(
        ModelError, match=r"resnet18t_weights\.pth.*does not fit backbone 'resnet18'.*conv1\.weight"
    ):
        FeatureExtractor("resnet18", ["layer1"], pretrained=False, weights=wrong)

    partial = tmp_path / "partial.pth"
    torch.save({"conv1.weight": state["conv1.weight"]}, partial)
    with pytest.raises(ModelError, match=r"partial\.pth.*missing keys"):
        FeatureExtractor("resnet18", ["layer1"], pretrained=False, weights=partial)
