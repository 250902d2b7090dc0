"""CFA on the toy defect set (CPU, random-init backbone), and its loss and memory bank."""

from __future__ import annotations

import pytest
import torch
from toy_defects import batches, check_prediction, image_auroc, pixel_auroc, toy_set

import models
import models.cfa  # registers "cfa" until models/__init__ imports it
from models import backbones
from models.base import backbone_problem, hyperparameters
from models.errors import ModelError

CONFIG = {"pretrained": False}
EPOCHS = 3


@pytest.fixture(scope="module")
def toy():
    return toy_set()


def fit(toy, epochs=EPOCHS, on_epoch_end=None, **overrides):
    detector = models.create("cfa", **{**CONFIG, **overrides})
    stats = detector.fit(batches(toy.train, 4), epochs=epochs, on_epoch_end=on_epoch_end)
    return detector, stats


@pytest.fixture(scope="module")
def fitted(toy):
    history = []
    detector, stats = fit(toy, on_epoch_end=lambda e, m: history.append((e, m)) and False)
    return detector, stats, history, detector.predict(toy.test)


def test_detects_and_localises_anomalies(toy, fitted):
    # Image AUROC 1.0 and pixel AUROC 0.986-0.991 for seeds 0-2 after 1 or 3 epochs.
    _, stats, _, prediction = fitted
    check_prediction(toy, prediction, localizes=True)
    assert image_auroc(toy, prediction.score) >= 0.9
    assert pixel_auroc(toy, prediction.anomaly_map) >= 0.9
    assert stats["epochs"] == EPOCHS
    # One memory feature per position of the 16 x 16 layer1 grid.
    assert stats["memory_bank_size"] == 16 * 16
    torch.testing.assert_close(prediction.score, prediction.anomaly_map.flatten(1).amax(1))


def test_reports_a_falling_loss_every_epoch(fitted):
    _, stats, history, _ = fitted
    assert [epoch for epoch, _ in history] == list(range(1, EPOCHS + 1))
    losses = [metrics["loss"] for _, metrics in history]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0]
    assert stats["loss"] == losses[-1]


def test_stops_when_the_callback_says_so(toy):
    seen = []
    _, stats = fit(toy, epochs=5, on_epoch_end=lambda e, m: seen.append(e) or e == 2)
    assert seen == [1, 2] and stats["epochs"] == 2


def test_same_seed_same_scores(toy):
    first = fit(toy, epochs=1)[0].predict(toy.test)
    again = fit(toy, epochs=1)[0].predict(toy.test)
    assert torch.equal(first.score, again.score)
    assert torch.equal(first.anomaly_map, again.anomaly_map)


def test_state_dict_round_trip(toy, fitted):
    detector, *_ = fitted
    restored = models.create("cfa", **CONFIG)
    restored.load_state_dict(detector.state_dict())
    assert torch.equal(restored.predict(toy.test).score, fitted[3].score)


def test_memory_bank_is_the_mean_initial_descriptor_feature(toy, fitted):
    untrained = models.create("cfa", **CONFIG)
    with torch.no_grad():
        adapted = untrained.descriptor(untrained.patch_features(toy.train))
    expected = adapted.mean(0).flatten(1).T
    # The bank is taken before training and stays fixed while the descriptor learns.
    torch.testing.assert_close(fitted[0].memory_bank, expected)
    assert not torch.equal(fitted[0].descriptor.conv.weight, untrained.descriptor.conv.weight)


def test_patch_features_average_3x3_counting_the_zero_padding(toy):
    # The authors' descriptor and anomalib's ``F.avg_pool2d(feature, 3, 1, 1)`` divide every
    # window by 9, border windows too: a border patch's feature shrinks towards zero, a mark
    # of where it sits. Written out: zero-pad by one, sum the 9 shifted maps, divide by 9, then
    # resize the deeper layers bilinearly to the first layer's grid and concatenate.
    detector = models.create("cfa", **CONFIG)
    images = toy.test[:2]
    with torch.no_grad():
        raw = list(detector.extractor(images).values())
        features = detector.patch_features(images)
    pooled = []
    for feature in raw:
        height, width = feature.shape[-2:]
        padded = torch.nn.functional.pad(feature, (1, 1, 1, 1))
        windows = [padded[..., i : i + height, j : j + width] for i in range(3) for j in range(3)]
        pooled.append(torch.stack(windows).sum(0) / 9)
    # A corner window holds 4 features and 5 zeros.
    torch.testing.assert_close(pooled[0][..., 0, 0], raw[0][..., :2, :2].sum((-2, -1)) / 9)
    size = pooled[0].shape[-2:]
    expected = torch.cat(
        [pooled[0]]
        + [
            torch.nn.functional.interpolate(p, size=size, mode="bilinear", align_corners=False)
            for p in pooled[1:]
        ],
        dim=1,
    )
    torch.testing.assert_close(features, expected)


def test_only_the_descriptor_learns():
    detector = models.create("cfa", **CONFIG)
    trainable, frozen = detector.param_counts()
    channels = 64 + 128 + 256  # resnet18 layer1..layer3
    assert trainable == (channels + 2) * channels + channels  # CoordConv 1x1 weights + bias
    assert frozen == sum(p.numel() for p in detector.extractor.parameters())
    half = models.create("cfa", **CONFIG, gamma_d=2)
    assert half.param_counts()[0] == (channels + 2) * (channels // 2) + channels // 2


def test_gamma_c_compresses_the_memory_bank(toy):
    detector, stats = fit(toy, epochs=1, gamma_c=4)
    assert stats["memory_bank_size"] == 16 * 16 // 4
    check_prediction(toy, detector.predict(toy.test), localizes=True)


def test_loss_attracts_within_the_radius_and_repels_hard_negatives():
    detector = models.create(
        "cfa",
        **CONFIG,
        gamma_d=448,  # one adapted channel: a hand-checkable 1-d memory bank
        num_nearest_neighbors=1,
        num_hard_negative_features=1,
        radius=1.0,
        nu=0.5,
        repulsion_margin=0.25,
    )
    detector.memory_bank = torch.tensor([[0.0], [1.0], [10.0]])
    # x = 0.25: nearest 0 at d = 0.0625 (inside r^2 = 1, no attraction); hard negative 1 at
    # d = 0.5625, inside r^2 - alpha = 0.75 by 0.1875: repulsion 0.1875.
    # x = 3: nearest 1 at d = 4, attraction 3; hard negative 0 at d = 9, no repulsion.
    adapted = torch.tensor([[0.25], [3.0]])
    expected = ((0.0 + 3.0) / 2 + (0.1875 + 0.0) / 2) / 0.5
    assert detector.loss(adapted).item() == pytest.approx(expected)


def test_defaults_are_the_reference_studys():
    assert hyperparameters("cfa") == {
        "backbone": "resnet18",
        "layers": ("layer1", "layer2", "layer3"),
        "gamma_c": 1,
        "gamma_d": 1,
        "num_nearest_neighbors": 3,
        "num_hard_negative_features": 3,
        "radius": 1e-5,
        "nu": 1e-3,
        "repulsion_margin": 0.1,
        "lr": 1e-3,
        "weight_decay": 5e-4,
        "epochs": 30,
        "blur_sigma": 4.0,
        "seed": 0,
        "pretrained": True,
        "weights": None,
    }
    assert models.get_class("cfa").learning_type == "iterative"


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"gamma_c": -1}, "gamma_c must be a positive int, got -1"),
        ({"gamma_d": 0}, "gamma_d must be a positive int, got 0"),
        ({"gamma_d": 449}, "gamma_d must be at most the 448 feature channels"),
        ({"num_nearest_neighbors": 0}, "num_nearest_neighbors must be a positive int"),
        ({"num_hard_negative_features": -1}, "num_hard_negative_features must be an int >= 0"),
        ({"radius": -1.0}, "radius must be >= 0"),
        ({"nu": 0.0}, "nu must be > 0"),
        ({"lr": 0}, "lr must be > 0"),
        ({"weight_decay": -1e-4}, "weight_decay must be >= 0"),
        ({"repulsion_margin": float("nan")}, "repulsion_margin must be >= 0"),
        ({"epochs": 0}, "epochs must be a positive int"),
        ({"blur_sigma": -1}, "blur_sigma must be >= 0"),
    ],
)
def test_bad_hyperparameters(hparams, message):
    with pytest.raises(ModelError, match=f"^cfa: {message}"):
        models.create("cfa", **CONFIG, **hparams)


def test_misuse_is_a_model_error(toy):
    detector = models.create("cfa", **CONFIG)
    with pytest.raises(ModelError, match="before fit"):
        detector.predict(toy.test)
    with pytest.raises(ModelError, match="empty"):
        detector.fit([])
    with pytest.raises(ModelError, match="fit epochs must be a positive int"):
        detector.fit(batches(toy.train), epochs=0)
    small = toy_set(size=16, n_train=2, n_test_each=1)  # 4 x 4 grid: 4 clusters at gamma_c 4
    with pytest.raises(ModelError, match="exceeds the 4 memory-bank features"):
        models.create("cfa", **CONFIG, gamma_c=4).fit([small.train], epochs=1)


def test_backbone_constraints(monkeypatch):
    assert backbone_problem("cfa", "wide_resnet50_2") is None
    assert "layer7" in backbone_problem("cfa", "resnet18", {"layers": ("layer1", "layer7")})
    vit = backbones.BackboneSpec("toy_vit", "toy_vit", {"blocks.8": (16, 384)}, "vit", 224)
    monkeypatch.setitem(backbones.BACKBONES, "toy_vit", vit)
    problem = backbone_problem("cfa", "toy_vit", {"layers": ("blocks.8",)}, image_size=224)
    assert problem is not None and "cnn" in problem
