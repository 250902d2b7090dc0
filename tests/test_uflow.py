"""U-Flow on the toy defect set (CPU, random-init ResNet18) and its U-shaped flow."""

from __future__ import annotations

import math

import pytest
import torch
from toy_defects import batches, check_prediction, image_auroc, pixel_auroc, toy_set

import models
import models.uflow  # registers "uflow" until models/__init__ imports it
from models.backbones import backbone_param_count
from models.base import backbone_problem, compatible_backbones
from models.errors import ModelError
from models.uflow import UFlow, UShapedFlow

# The paper's flow (4 steps per scale) on ResNet18 layer1..layer3 at 64 px (16, 8 and 4 px
# grids) for 2 epochs: a fit takes about 1 s on one thread. The standardised random features
# already separate the toy defects (image AUROC 1.0, pixel AUROC 0.97 for seeds 0 and 1); what
# training adds is checked through the falling loss.
EPOCHS = 2


def fit(seed: int = 0, epochs: int = EPOCHS, on_epoch_end=None, **overrides):
    detector = models.create("uflow", pretrained=False, seed=seed, **overrides)
    history: list[tuple[int, dict]] = []

    def record(epoch: int, metrics: dict) -> bool:
        history.append((epoch, metrics))
        return bool(on_epoch_end and on_epoch_end(epoch, metrics))

    stats = detector.fit(batches(toy_set().train), epochs=epochs, on_epoch_end=record)
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
    # One minus a mean of likelihoods exp(-|z|^2 / 2C): in [0, 1); the score is the map's max.
    assert prediction.anomaly_map.min() >= 0 and prediction.anomaly_map.max() < 1
    assert torch.equal(prediction.score, prediction.anomaly_map.flatten(1).max(1).values)


def test_reports_every_epoch_and_the_loss_falls(fitted):
    detector, stats, history = fitted
    assert [epoch for epoch, _ in history] == list(range(1, EPOCHS + 1))
    losses = [metrics["loss"] for _, metrics in history]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0] - 0.1
    assert stats == {"epochs": EPOCHS, "loss": losses[-1]}
    assert not detector.training


def test_stops_when_told_and_the_same_seed_gives_the_same_scores(toy, prediction):
    # Asked for 5 epochs, told to stop after the second: the same two epochs as the fixture's.
    detector, stats, history = fit(seed=0, epochs=5, on_epoch_end=lambda e, m: e == 2)
    assert [epoch for epoch, _ in history] == [1, 2] and stats["epochs"] == 2
    again = detector.predict(toy.test)
    assert torch.equal(again.score, prediction.score)
    assert torch.equal(again.anomaly_map, prediction.anomaly_map)


def test_another_seed_gives_another_flow():
    first, second = UFlow(pretrained=False, seed=0), UFlow(pretrained=False, seed=1)
    assert not torch.equal(
        first.flow.stages[0].blocks[0].permutation0, second.flow.stages[0].blocks[0].permutation0
    )


def test_default_budget_comes_from_the_constructor(toy):
    detector = models.create("uflow", pretrained=False, epochs=1, flow_steps=1)
    seen = []
    detector.fit(batches(toy.train[:4]), on_epoch_end=lambda e, m: seen.append(e) or False)
    assert seen == [1]


def test_state_dict_round_trip(fitted, toy, prediction):
    restored = models.create("uflow", pretrained=False)
    with pytest.raises(ModelError, match="before fit"):
        restored.predict(toy.test[:2])
    restored.load_state_dict(fitted[0].state_dict())
    assert torch.equal(restored.predict(toy.test).score, prediction.score)


def test_u_shape_keeps_every_dimension_and_sends_half_up(fitted, toy):
    detector = fitted[0]
    with torch.no_grad():
        features = detector.features(toy.test[:2])
        latents, log_det = detector.flow(features)
    # Standardised per image over C x h x w.
    for f in features:
        torch.testing.assert_close(f.mean((1, 2, 3)), torch.zeros(2), atol=1e-4, rtol=0)
    assert [tuple(f.shape[1:]) for f in features] == [(64, 16, 16), (128, 8, 8), (256, 4, 4)]
    # layer3's 256 channels: 128 up (32 at 8 x 8), 128 kept; layer2 + 32 = 160: 80 up (20 at
    # 16 x 16), 80 kept; layer1 + 20 = 84, all kept. A volume-preserving U: no dimension lost.
    assert [tuple(z.shape[1:]) for z in latents] == [(84, 16, 16), (80, 8, 8), (128, 4, 4)]
    assert sum(z[0].numel() for z in latents) == sum(f[0].numel() for f in features)
    assert log_det.shape == (2,) and torch.isfinite(log_det).all()


def test_coarse_context_reaches_the_finer_latents(fitted, toy):
    # Changing only the coarsest features changes the finest latent: the U's up path works.
    detector = fitted[0]
    with torch.no_grad():
        features = detector.features(toy.test[:1])
        finest = detector.flow(features)[0][0]
        features[-1] = features[-1] + 1.0
        assert not torch.allclose(detector.flow(features)[0][0], finest)


def test_backbone_frozen_flow_trained_and_mcait_flow_size():
    detector = UFlow(pretrained=False)
    trainable, frozen = detector.param_counts()
    assert trainable == sum(p.numel() for p in detector.flow.parameters())
    assert frozen == backbone_param_count("resnet18", ["layer1", "layer2", "layer3"])
    assert not any(p.requires_grad for p in detector.extractors.parameters())
    # The paper's flow on mcait (768 channels at 28 x 28, 384 at 14 x 14) has the 12.2M
    # trainable parameters of the reference study's Table 2.
    mcait = UShapedFlow([768, 384], flow_steps=4, clamp=2.0, ratio=1.0, seed=0)
    assert round(sum(p.numel() for p in mcait.parameters()) / 1e6, 1) == 12.2


def test_other_cnn_pyramids_via_stage_aliases(toy):
    detector = models.create(
        "uflow", backbone="efficientnet_b0", layers=("layer2", "layer3"), pretrained=False
    )
    detector.fit(batches(toy.train[:4]), epochs=1)
    check_prediction(toy, detector.predict(toy.test), localizes=True)


def test_predict_before_fit_and_empty_training_set_are_errors(toy):
    detector = models.create("uflow", pretrained=False, flow_steps=1)
    with pytest.raises(ModelError, match="before fit"):
        detector.predict(toy.test[:2])
    with pytest.raises(ModelError, match="empty"):
        detector.fit([], epochs=1)


def test_images_whose_grids_do_not_halve_are_an_error(fitted):
    with pytest.raises(ModelError, match="halve"):
        fitted[0].predict(torch.zeros(1, 3, 72, 72))


def test_creating_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    models.create("uflow", pretrained=False, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ({"flow_steps": 0}, "flow_steps"),
        ({"affine_clamp": 0.0}, "affine_clamp"),
        ({"affine_subnet_channels_ratio": -1.0}, "affine_subnet_channels_ratio"),
        ({"lr": float("nan")}, "lr"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"epochs": 1.5}, "epochs"),
        ({"layers": ("layer1", "layer3")}, "layers must be"),
        ({"layers": ("layer2",)}, "layers must be"),
        ({"layers": ("layer1", "layer7")}, "backbone 'resnet18' has no layer 'layer7'"),
    ],
)
def test_bad_hyperparameters_are_errors_naming_them(bad, named):
    with pytest.raises(ModelError, match=rf"^uflow: {named}"):
        UFlow(pretrained=False, **bad)


def test_defaults_are_table_b8():
    defaults = models.hyperparameters("uflow")
    assert {
        k: defaults[k]
        for k in (
            "flow_steps",
            "affine_clamp",
            "affine_subnet_channels_ratio",
            "lr",
            "weight_decay",
            "epochs",
        )
    } == {
        "flow_steps": 4,
        "affine_clamp": 2.0,
        "affine_subnet_channels_ratio": 1.0,
        "lr": 1e-3,
        "weight_decay": 1e-5,
        "epochs": 200,
    }
    # ResNet18 is one of the study's three backbones (mcait is impractical as a CPU default);
    # layers None stands for the paper's layer1..layer3.
    assert (defaults["backbone"], defaults["layers"]) == ("resnet18", None)
    assert models.get_class("uflow").learning_type == "iterative"


def test_backbone_constraints():
    assert backbone_problem("uflow", "resnet18", image_size=256) is None
    assert backbone_problem("uflow", "wide_resnet50_2", image_size=256) is None
    assert backbone_problem("uflow", "mcait", image_size=448) is None
    assert "448" in backbone_problem("uflow", "mcait", image_size=256)
    assert "leave layers unset" in backbone_problem("uflow", "mcait", {"layers": ("layer1",)})
    assert "vit" in backbone_problem("uflow", "cait_m48_448")
    assert "multiple of the deepest stride 16" in backbone_problem("uflow", "resnet18", None, 100)
    assert "double" in backbone_problem("uflow", "resnet18", {"layers": ("layer1", "layer3")})
    usable = compatible_backbones("uflow", image_size=448)
    assert {"resnet18", "wide_resnet50_2", "mcait"} <= set(usable)
    assert not {"cait_m48_448", "cait_s24_224", "vit_base_patch16_224"} & set(usable)
    with pytest.raises(ModelError, match="cannot use backbone 'cait_s24_224'"):
        models.create("uflow", backbone="cait_s24_224", pretrained=False)
