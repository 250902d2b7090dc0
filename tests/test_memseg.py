"""MemSeg on the toy defect set (CPU, no pretrained weights).

The encoder is a randomly initialised resnet18 from a local weight file built with live residual
branches (``zero_init_last=False``), as the reverse-distillation tests do: its frozen layer1..3
then see defects, which the memory comparison needs. A memory of 8 images and 3 epochs of
batch 2 (24 steps) give image AUROC 0.97, 1.0 and 1.0 on the toy set for seeds 0, 1 and 2
(pixel AUROC 0.68, 0.76, 0.64).

The tests train at lr 1e-3 instead of the default 0.003: in a run this short the decoder's
weights change faster than its batch-norm running statistics (momentum 0.1) can follow, and at
0.003 the eval-mode maps collapse (image AUROC ~0.1 where the same network in training mode,
normalising with the test batch's statistics, scores 1.0). A full run ends its cosine schedule
at ``min_lr`` for many steps, which lets the statistics catch up.
"""

from __future__ import annotations

import math

import pytest
import torch
from toy_defects import batches, check_prediction, image_auroc, pixel_auroc, toy_set

import models
from models.base import backbone_problem, hyperparameters
from models.errors import ModelError
from models.memseg import LEVELS, CoordinateAttention, MemSeg

FIT_EPOCHS = 3
LR = 1e-3


@pytest.fixture(scope="module")
def toy():
    return toy_set()


def small(random_resnet18_weights: str, **overrides) -> MemSeg:
    config = {
        "backbone": "resnet18",
        "pretrained": False,
        "weights": random_resnet18_weights,
        "memory_size": 8,
        "lr": LR,
        "min_lr": 1e-5,
    }
    return models.create("memseg", **{**config, **overrides})


@pytest.fixture(scope="module")
def fitted(toy, random_resnet18_weights):
    detector = small(random_resnet18_weights)
    history = []

    def on_epoch_end(epoch: int, metrics: dict) -> bool:
        history.append((epoch, metrics))
        return False

    stats = detector.fit(batches(toy.train, 2), epochs=FIT_EPOCHS, on_epoch_end=on_epoch_end)
    return detector, stats, history, detector.predict(toy.test)


def test_detects_and_localises_defects(toy, fitted):
    detector, _, _, prediction = fitted
    check_prediction(toy, prediction, localizes=True)
    assert not detector.training
    assert image_auroc(toy, prediction.score) >= 0.9
    # Localisation is still rough after 24 steps (0.64-0.76 over three seeds).
    assert pixel_auroc(toy, prediction.anomaly_map) > 0.55
    # The map is a probability, and the score the mean of its 100 largest values.
    assert prediction.anomaly_map.min() >= 0 and prediction.anomaly_map.max() <= 1
    top = prediction.anomaly_map.flatten(1).topk(100, dim=1).values.mean(dim=1)
    assert torch.allclose(prediction.score, top)


def test_every_epoch_is_reported_with_the_schedule(fitted):
    _, stats, history, _ = fitted
    assert [epoch for epoch, _ in history] == list(range(1, FIT_EPOCHS + 1))
    for _, metrics in history:
        assert {"loss", "loss_focal", "loss_l1", "lr"} <= set(metrics)
        assert all(math.isfinite(value) for value in metrics.values())
        expected = 0.7 * metrics["loss_focal"] + 0.3 * metrics["loss_l1"]
        assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
    # Warm-up over the first 20 % of the budget, then cosine decay towards min_lr.
    lrs = [metrics["lr"] for _, metrics in history]
    assert lrs[0] < LR and max(lrs) <= LR and lrs[-1] < max(lrs)
    assert stats["epochs"] == FIT_EPOCHS and stats["memory_size"] == 8
    assert any("texture_dir" in note for note in stats["notes"])


def test_learning_rate_schedule_warms_up_then_decays(random_resnet18_weights):
    detector = small(random_resnet18_weights, lr=0.01, min_lr=0.001, warmup_ratio=0.2)
    # Progress is the share of the budget's images seen: 0.2 ends the warm-up.
    assert detector._learning_rate(0.0) == pytest.approx(0.001)
    assert detector._learning_rate(0.1) == pytest.approx(0.0055)
    assert detector._learning_rate(0.2) == pytest.approx(0.01)
    assert detector._learning_rate(0.6) == pytest.approx(0.0055)
    assert detector._learning_rate(1.0) == pytest.approx(0.001)


def test_memory_holds_training_features_and_matches_itself(toy, fitted):
    detector, _, _, _ = fitted
    memory = detector.memory()
    assert [tuple(m.shape) for m in memory] == [(8, 64, 16, 16), (8, 128, 8, 8), (8, 256, 4, 4)]
    # Every memory image is a training image, chosen by the seed.
    images, n_train = detector._choose_memory(batches(toy.train))
    assert n_train == len(toy.train)
    assert all(any(torch.equal(image, t) for t in toy.train) for image in images)
    features = detector.encoder(images)
    assert torch.allclose(features["layer1"], memory[0])
    # A memory image's closest memory image is itself: no difference anywhere.
    differences = detector.differences([features[level] for level in LEVELS])
    assert all(float(d.abs().max()) == 0.0 for d in differences)
    others = detector.differences([detector.encoder(toy.test[8:10])[level] for level in LEVELS])
    assert all(float(d.abs().max()) > 0.0 for d in others)


def test_small_training_set_gives_a_smaller_memory(toy, random_resnet18_weights):
    detector = small(random_resnet18_weights)
    stats = detector.fit(batches(toy.train[:3], 2), epochs=1)
    assert stats["memory_size"] == 3
    assert detector.memory()[0].shape[0] == 3


def test_training_stops_when_the_callback_says_so(toy, random_resnet18_weights):
    detector = small(random_resnet18_weights, memory_size=2)
    calls = []
    stats = detector.fit(
        batches(toy.train[:4], 2), epochs=5, on_epoch_end=lambda e, m: calls.append(e) or e == 2
    )
    assert calls == [1, 2]
    assert stats["epochs"] == 2
    assert not detector.training


def test_same_seed_same_scores_and_another_seed_differs(toy, random_resnet18_weights):
    def run(seed: int):
        detector = small(random_resnet18_weights, seed=seed, memory_size=2)
        detector.fit(batches(toy.train[:4], 2), epochs=1)
        return detector.predict(toy.test[:2])

    first, again = run(0), run(0)
    assert torch.equal(first.score, again.score)
    assert torch.equal(first.anomaly_map, again.anomaly_map)
    other = small(random_resnet18_weights, seed=1).head.state_dict()
    for key, value in small(random_resnet18_weights, seed=0).head.state_dict().items():
        if key.endswith("weight") and value.ndim == 4:
            assert not torch.equal(value, other[key])


def test_state_dict_round_trip_keeps_memory_and_weights(toy, fitted, random_resnet18_weights):
    detector, _, _, prediction = fitted
    restored = small(random_resnet18_weights, seed=5)
    restored.load_state_dict(detector.state_dict())
    restored.eval()
    again = restored.predict(toy.test)
    assert torch.allclose(again.score, prediction.score)
    assert torch.allclose(again.anomaly_map, prediction.anomaly_map)


def test_predict_at_another_size_is_an_error(toy, fitted):
    detector, _, _, _ = fitted
    images = torch.nn.functional.interpolate(toy.test[:2], size=(48, 48), mode="bilinear")
    with pytest.raises(ModelError, match="training size"):
        detector.predict(images)


def test_predict_before_fit_and_empty_training_set_are_errors(toy, random_resnet18_weights):
    detector = small(random_resnet18_weights)
    with pytest.raises(ModelError, match="before fit"):
        detector.predict(toy.test[:2])
    with pytest.raises(ModelError, match="empty"):
        detector.fit([], epochs=1)


def test_missing_texture_folder_is_a_model_error(toy, random_resnet18_weights, tmp_path):
    # At construction, so that a study's validation (which builds every configuration) finds it.
    with pytest.raises(ModelError, match=r"dtd.*is not a folder"):
        small(random_resnet18_weights, texture_dir=str(tmp_path / "dtd"))
    (tmp_path / "dtd").mkdir()
    detector = small(random_resnet18_weights, texture_dir=str(tmp_path / "dtd"))
    with pytest.raises(ModelError, match="dtd"):
        detector.fit(batches(toy.train[:2]), epochs=1)


def test_encoder_is_frozen_and_only_layer4_and_head_train(random_resnet18_weights):
    detector = small(random_resnet18_weights)
    trainable, frozen = detector.param_counts()
    assert frozen == sum(p.numel() for p in detector.encoder.parameters())
    deep = sum(p.numel() for p in detector.deep.parameters())
    head = sum(p.numel() for p in detector.head.parameters())
    assert trainable == deep + head
    # resnet18: stem + layer1..3 hold 2.78M parameters, layer4 8.39M.
    assert 2.7e6 < frozen < 2.9e6
    assert 8.3e6 < deep < 8.5e6
    detector.train()
    assert not detector.encoder.training and detector.deep.training
    detector.eval()


def test_coordinate_attention_keeps_shape_and_scales_positively():
    attention = CoordinateAttention(16).eval()
    x = torch.rand(2, 16, 6, 10)
    y = attention(x)
    assert y.shape == x.shape
    # Weights are sigmoids: the output keeps the sign of the input and never exceeds it.
    assert torch.all(y.abs() <= x.abs()) and torch.all((y >= 0) == (x >= 0))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"memory_size": 0}, "memory_size must be a positive int"),
        ({"top_k": 0}, "top_k must be a positive int"),
        ({"lr": 0}, "lr must be > 0"),
        ({"lr": 0.001, "min_lr": 0.01}, "min_lr must be <= lr"),
        ({"weight_decay": -1}, "weight_decay must be >= 0"),
        ({"warmup_ratio": 1.0}, "warmup_ratio must be in"),
        ({"focal_weight": 0, "l1_weight": 0}, "cannot both be 0"),
        ({"focal_gamma": -1}, "focal_gamma must be >= 0"),
        ({"beta": (0.5, 0.2)}, "beta must be a range"),
        ({"anomaly_probability": 0}, "anomaly_probability must be in"),
        ({"epochs": 0}, "epochs must be a positive int"),
    ],
)
def test_bad_hyperparameters_are_model_errors(random_resnet18_weights, overrides, message):
    with pytest.raises(ModelError, match=message):
        small(random_resnet18_weights, **overrides)


def test_defaults_are_the_reference_values():
    defaults = hyperparameters("memseg")
    assert defaults["backbone"] == "resnet18"
    assert defaults["memory_size"] == 30
    assert (defaults["lr"], defaults["weight_decay"], defaults["min_lr"]) == (0.003, 5e-4, 1e-4)
    assert defaults["warmup_ratio"] == 0.2
    assert (defaults["focal_weight"], defaults["l1_weight"], defaults["focal_gamma"]) == (
        0.7,
        0.3,
        4.0,
    )
    assert tuple(defaults["beta"]) == (0.15, 1.0)
    assert defaults["anomaly_probability"] == 0.5
    assert defaults["top_k"] == 100
    assert defaults["epochs"] == 500
    assert defaults["texture_dir"] is None
    assert MemSeg.learning_type == "iterative"
    assert MemSeg.localizes


def test_backbones_must_be_resnets():
    for name in ("resnet18", "wide_resnet50_2", "resnext50_32x4d"):
        assert backbone_problem("memseg", name) is None
    problem = backbone_problem("memseg", "efficientnet_b0")
    assert problem is not None and "layer4" in problem and "resnet18" in problem
    assert backbone_problem("memseg", "vit_base_patch16_224") is not None
    with pytest.raises(ModelError, match="efficientnet_b0"):
        models.create("memseg", backbone="efficientnet_b0", pretrained=False)
