"""FastFlow on the toy defect set (CPU, random-init ResNet18)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from toy_defects import batches, check_prediction, image_auroc, pixel_auroc, toy_set

import models
import models.backbones
import models.fastflow
from models.base import backbone_problem
from models.errors import ModelError
from models.fastflow import default_layers

# Half the paper's 8 flow steps and 3 epochs keep a fit at about 4 s on one thread. On the toy set
# the random ResNet18 features already separate the defects (image AUROC 1.0 for seeds 0-2 with
# 2 to 5 epochs), so what training adds is checked through the falling loss. FrEIA's coupling
# scales the subnet's output by 0.1, so the flows start near the identity and move slowly: the
# loss is at 0.64-0.72 of its start after 2 epochs for seeds 0-2, 0.33-0.46 after 3.
CONFIG = {"flow_steps": 4}
EPOCHS = 3


def fit(seed: int = 0, epochs: int = EPOCHS, **overrides):
    detector = models.create("fastflow", pretrained=False, seed=seed, **{**CONFIG, **overrides})
    history: list[tuple[int, dict]] = []
    stats = detector.fit(
        batches(toy_set().train),
        epochs=epochs,
        on_epoch_end=lambda epoch, metrics: history.append((epoch, metrics)) and False,
    )
    return detector, stats, history


@pytest.fixture(scope="module")
def toy():
    return toy_set()


@pytest.fixture(scope="module")
def fitted():
    return fit()


@pytest.fixture(scope="module")
def prediction(fitted, toy):
    return fitted[0].predict(toy.test)


def test_detects_and_localises_the_toy_defects(toy, prediction):
    check_prediction(toy, prediction, localizes=True)
    assert image_auroc(toy, prediction.score) >= 0.9
    assert pixel_auroc(toy, prediction.anomaly_map) >= 0.9
    # Maps are negated likelihoods in [-1, 0).
    assert prediction.anomaly_map.min() >= -1 and prediction.anomaly_map.max() < 0


def test_reports_every_epoch_and_the_loss_falls(fitted):
    _, stats, history = fitted
    assert [epoch for epoch, _ in history] == list(range(1, EPOCHS + 1))
    losses = [metrics["loss"] for _, metrics in history]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.6 * losses[0]
    assert stats["epochs"] == EPOCHS and stats["loss"] == losses[-1]


def test_stops_when_told_and_defaults_to_the_constructor_budget(toy):
    detector = models.create("fastflow", pretrained=False, flow_steps=1, layers=("layer2",))
    seen = []
    stats = detector.fit(batches(toy.train), on_epoch_end=lambda e, m: seen.append(e) or e == 2)
    assert seen == [1, 2] and stats["epochs"] == 2
    assert detector.epochs == 500
    assert not detector.training


def test_can_be_scored_between_epochs(toy):
    # A scheduler scores the validation split from on_epoch_end (sweep/run/trainable.py).
    detector = models.create("fastflow", pretrained=False, flow_steps=1, layers=("layer2",))
    scores = []

    def score(epoch, metrics):
        detector.eval()
        scores.append(detector.predict(toy.test).score)
        detector.train()
        return False

    detector.fit(batches(toy.train), epochs=2, on_epoch_end=score)
    assert len(scores) == 2 and all(torch.isfinite(s).all() for s in scores)
    assert not torch.equal(scores[0], scores[1])


def test_same_seed_same_scores_and_another_seed_differs(toy, prediction):
    again = fit(seed=0)[0].predict(toy.test)
    assert torch.equal(again.score, prediction.score)
    assert torch.equal(again.anomaly_map, prediction.anomaly_map)
    other = models.create("fastflow", pretrained=False, seed=1, **CONFIG)
    first = models.create("fastflow", pretrained=False, seed=0, **CONFIG)
    assert not torch.equal(
        other.flows[0].blocks[0].permutation0, first.flows[0].blocks[0].permutation0
    )


def test_state_dict_round_trip(fitted, toy, prediction):
    detector = fitted[0]
    fresh = models.create("fastflow", pretrained=False, seed=5, **CONFIG)
    fresh.load_state_dict(detector.state_dict())
    fresh.eval()
    restored = fresh.predict(toy.test)
    assert torch.equal(restored.score, prediction.score)


def test_only_flows_and_norms_train(fitted):
    detector = fitted[0]
    assert not any(p.requires_grad for p in detector.extractor.parameters())
    flows = sum(p.numel() for p in detector.flows.parameters())
    norms = sum(p.numel() for p in detector.norms.parameters())
    backbone = sum(p.numel() for p in detector.extractor.parameters())
    assert detector.param_counts() == (flows + norms, backbone)
    # CNN features are normalised over C x h x w: 64 x 16 x 16, 128 x 8 x 8, 256 x 4 x 4 at 64 px.
    shapes = [tuple(norm.normalized_shape) for norm in detector.norms]
    assert shapes == [(64, 16, 16), (128, 8, 8), (256, 4, 4)]


def test_predict_before_fit_and_bad_input_are_errors(fitted, toy):
    with pytest.raises(ModelError, match="before fit"):
        models.create("fastflow", pretrained=False, **CONFIG).predict(toy.test)
    with pytest.raises(ModelError, match="empty"):
        models.create("fastflow", pretrained=False, **CONFIG).fit([], epochs=1)
    with pytest.raises(ModelError, match="image size"):
        fitted[0].predict(torch.zeros(1, 3, 96, 96))


@pytest.mark.parametrize(
    "bad",
    [
        {"flow_steps": 0},
        {"hidden_ratio": 0.0},
        {"clamp": -1.0},
        {"lr": 0.0},
        {"weight_decay": -1.0},
        {"epochs": 0},
        {"layers": ("layer9",)},
    ],
)
def test_bad_hyperparameters_are_errors(bad):
    key = next(iter(bad))
    with pytest.raises(ModelError, match=key if key != "layers" else "layer9"):
        models.create("fastflow", pretrained=False, **bad)


def test_defaults_are_the_reference_study_values():
    defaults = models.hyperparameters("fastflow")
    assert {
        k: defaults[k]
        for k in (
            "backbone",
            "flow_steps",
            "hidden_ratio",
            "conv3x3_only",
            "lr",
            "weight_decay",
            "epochs",
        )
    } == {
        "backbone": "resnet18",
        "flow_steps": 8,
        "hidden_ratio": 1.0,
        "conv3x3_only": True,
        "lr": 1e-3,
        "weight_decay": 1e-5,
        "epochs": 500,
    }
    assert default_layers(models.backbones.get_backbone("resnet18")) == (
        "layer1",
        "layer2",
        "layer3",
    )


def test_alternating_kernels_use_1x1_convolutions_on_odd_steps():
    detector = models.create(
        "fastflow", pretrained=False, flow_steps=2, conv3x3_only=False, layers=("layer1",)
    )
    kernels = [block.subnet1[0].kernel_size for block in detector.flows[0].blocks]
    assert kernels == [(3, 3), (1, 1)]
    # hidden_ratio scales the subnets' hidden width from their input (half of 64 channels).
    narrow = models.create("fastflow", pretrained=False, hidden_ratio=0.5, layers=("layer1",))
    assert narrow.flows[0].blocks[0].subnet1[0].out_channels == 16


def test_backbone_constraints(monkeypatch):
    assert backbone_problem("fastflow", "resnet18") is None
    assert "layer9" in backbone_problem("fastflow", "resnet18", {"layers": ("layer9",)})
    # A transformer (declared here without building it) must get its native size, and FastFlow
    # reads the paper's block by default, or the nearest declared one.
    vit = dataclasses.replace(
        models.backbones.get_backbone("resnet18"),
        name="cait_m48_448",
        kind="vit",
        input_size=448,
        layers={f"blocks.{i}": (16, 768) for i in range(3, 48, 4)},
    )
    monkeypatch.setitem(models.backbones.BACKBONES, "cait_m48_448", vit)
    assert default_layers(vit) == ("blocks.39",)
    assert backbone_problem("fastflow", "cait_m48_448", image_size=448) is None
    assert "448" in backbone_problem("fastflow", "cait_m48_448", image_size=256)


needs_transformers = pytest.mark.skipif(
    not {"cait_s24_224", "deit_base_distilled_patch16_384"}
    <= set(models.backbones.list_backbones()),
    reason="needs the transformer backbones of the registry",
)


@needs_transformers
def test_runs_on_a_transformer_token_map():
    # The smallest registered transformer, read at its first block to keep the test cheap.
    detector = models.create(
        "fastflow",
        backbone="cait_s24_224",
        layers=("blocks.0",),
        pretrained=False,
        flow_steps=1,
        hidden_ratio=0.16,
        conv3x3_only=False,
    )
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    stats = detector.fit([images], epochs=1)
    assert math.isfinite(stats["loss"])
    prediction = detector.predict(images)
    assert prediction.anomaly_map.shape == (2, 224, 224)
    assert torch.isfinite(prediction.anomaly_map).all()
    # Tokens are normalised by the backbone's own final norm, not by a LayerNorm of FastFlow's.
    assert len(detector.norms) == 0


def test_transformer_features_are_the_backbones_normed_tokens():
    # DINOv2 ViT-S/14 takes any multiple of its patch: a 2 x 2 token map at 28 px, its second
    # block keeping the build cheap.
    detector = models.create(
        "fastflow",
        backbone="vit_small_patch14_dinov2",
        layers=("blocks.1",),
        pretrained=False,
        flow_steps=1,
    )
    # A pretrained final norm has a learned affine; random initialisation leaves it at 1 and 0,
    # which a fresh LayerNorm would match by chance.
    norm = detector.extractor.model.norm
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.rand(norm.weight.shape, generator=generator))
        norm.bias.copy_(torch.randn(norm.bias.shape, generator=generator))
    reference = models.backbones.FeatureExtractor(
        "vit_small_patch14_dinov2", ["blocks.1"], pretrained=False
    )
    reference.load_state_dict(detector.extractor.state_dict())
    images = torch.randn(2, 3, 28, 28, generator=generator)
    expected = reference(images, norm=True)["blocks.1"]
    assert expected.shape == (2, 384, 2, 2)
    assert not torch.allclose(expected, reference(images)["blocks.1"], atol=1e-3)

    seen = []
    detector.flows[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    detector.fit([images], epochs=1)
    detector.predict(images)
    assert len(seen) == 2
    for features in seen:
        torch.testing.assert_close(features, expected)
    # The flows alone train: no LayerNorm of FastFlow's own on top of the backbone's.
    flows = sum(p.numel() for p in detector.flows.parameters())
    assert detector.param_counts()[0] == flows


@pytest.mark.parametrize(
    ("backbone", "overrides", "millions"),
    [
        ("resnet18", {}, 5.6),
        ("wide_resnet50_2", {}, 78.0),
        pytest.param(
            "deit_base_distilled_patch16_384",
            {"flow_steps": 20, "hidden_ratio": 0.16, "conv3x3_only": False},
            7.1,
            marks=needs_transformers,
        ),
    ],
)
def test_trainable_parameters_match_table_2(backbone, overrides, millions):
    # Table 2 of the reference study (256 px for CNNs); built on the meta device: no memory.
    with torch.device("meta"):
        detector = models.create("fastflow", backbone=backbone, pretrained=False, **overrides)
        if not detector.is_vit:
            channels, strides = detector.extractor.channels, detector.extractor.strides
            detector._normalise(
                {
                    layer: torch.zeros(1, channels[layer], 256 // s, 256 // s)
                    for layer, s in strides.items()
                }
            )
    assert round(detector.param_counts()[0] / 1e6, 1) == millions


def test_building_and_fitting_leave_the_global_rng_alone(toy):
    state = torch.random.get_rng_state()
    detector = models.create("fastflow", pretrained=False, **{**CONFIG, "layers": ("layer3",)})
    detector.fit(batches(toy.train[:8]), epochs=1)
    assert torch.equal(state, torch.random.get_rng_state())
