"""CFLOW-AD on the toy defect set (CPU, random-init ResNet18)."""

from __future__ import annotations

import math

import pytest
import torch
from toy_defects import N_TRAIN, batches, check_prediction, image_auroc, pixel_auroc, toy_set

import models
import models.cflow
from models.base import backbone_problem
from models.cflow import CFlow, conditional_decoder
from models.errors import ModelError

# ResNet18 instead of the default WideResNet50 (whose layer4 decoder alone has 59M parameters),
# layers 2 and 3 (8 x 8 and 4 x 4 at 64 px), half the coupling blocks and 2 epochs: a fit takes
# about 2 s on one thread and reaches image AUROC 1.0 and pixel AUROC ~0.98 for seeds 0-2.
CONFIG = {"backbone": "resnet18", "layers": ("layer2", "layer3"), "coupling_blocks": 4}
EPOCHS = 2


def fit(seed: int = 0, epochs: int = EPOCHS, **overrides):
    detector = models.create("cflow", pretrained=False, seed=seed, **{**CONFIG, **overrides})
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
    # Each of the two layers adds 1 - p, p = exp(log p - the larger of the training and the
    # image's own maximum) in [0, 1].
    assert prediction.anomaly_map.min() >= 0 and prediction.anomaly_map.max() <= 2.0


def test_reports_every_epoch_and_the_loss_falls(fitted):
    detector, stats, history = fitted
    assert [epoch for epoch, _ in history] == list(range(1, EPOCHS + 1))
    losses = [metrics["loss"] for _, metrics in history]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0] - 0.05
    assert stats == {"epochs": EPOCHS, "loss": losses[-1]}
    assert torch.isfinite(detector.reference_log_p).all()
    assert not detector.training


def test_trains_on_fiber_batches(toy, monkeypatch):
    sizes = []
    original = CFlow._log_p

    def spy(decoder, vectors, conditions):
        if decoder.training:
            sizes.append(len(vectors))
        return original(decoder, vectors, conditions)

    monkeypatch.setattr(CFlow, "_log_p", staticmethod(spy))
    detector = models.create("cflow", pretrained=False, **{**CONFIG, "coupling_blocks": 1})
    detector.fit(batches(toy.train), epochs=1)
    # Every position of every image of both layers once, 64 vectors per step; the batches of 8
    # images have 8 * 64 and 8 * 16 positions, multiples of 64.
    assert sum(sizes) == N_TRAIN * (8 * 8 + 4 * 4)
    assert set(sizes) == {64}


def test_stops_when_told_and_defaults_to_the_constructor_budget(toy):
    detector = models.create(
        "cflow", pretrained=False, **{**CONFIG, "coupling_blocks": 1, "layers": ("layer3",)}
    )
    seen = []
    stats = detector.fit(batches(toy.train), on_epoch_end=lambda e, m: seen.append(e) or e == 2)
    assert seen == [1, 2] and stats["epochs"] == 2
    assert detector.epochs == 50


def test_can_be_scored_between_epochs(toy):
    # A scheduler scores the validation split from on_epoch_end (sweep/run/trainable.py).
    detector = models.create("cflow", pretrained=False, **{**CONFIG, "coupling_blocks": 1})
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
    other = fit(seed=1, epochs=1, coupling_blocks=1)[0].predict(toy.test)
    assert not torch.allclose(other.score, prediction.score)


def test_scores_do_not_depend_on_the_batch(fitted, toy, prediction):
    alone = torch.cat([fitted[0].predict(toy.test[i : i + 1]).score for i in range(4)])
    torch.testing.assert_close(alone, prediction.score[:4], rtol=1e-4, atol=1e-5)


def test_more_likely_than_any_training_fiber_stays_finite(toy):
    # The failure of a 2-epoch trial at 64 px: a barely trained flow whose training features are
    # large spreads log-likelihoods over thousands of nats per dimension, and features it never
    # saw (here: ordinary images after high-contrast training ones) come out far more likely
    # than every training fiber. exp(log p - training max) overflowed (past 88 in float32) and
    # the upsampled map and the image scores became NaN.
    train = 20 * torch.randn(N_TRAIN, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    detector = models.create("cflow", pretrained=False, **CONFIG)
    detector.fit(batches(train), epochs=EPOCHS)
    excess = [
        float(log_p.amax() - reference)
        for log_p, reference in zip(
            detector._layer_log_p(toy.test), detector.reference_log_p, strict=True
        )
    ]
    assert max(excess) > 88.8  # the precondition of the overflow
    prediction = detector.predict(toy.test)
    check_prediction(toy, prediction, localizes=True)
    # Every layer adds 1 - p with p in [0, 1].
    assert prediction.anomaly_map.min() >= 0 and prediction.anomaly_map.max() <= 2
    alone = torch.cat([detector.predict(toy.test[i : i + 1]).score for i in range(3)])
    torch.testing.assert_close(alone, prediction.score[:3], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("value", [0.0, 1e3, -1e3, 1e20, -1e20])
def test_constant_extreme_images_get_finite_scores(fitted, value):
    # Far outside the training features in either direction: log-likelihoods from about -1e11
    # per dimension to -inf, or above the training maximum.
    images = torch.full((2, 3, 64, 64), value)
    prediction = fitted[0].predict(images)
    assert torch.isfinite(prediction.score).all()
    assert torch.isfinite(prediction.anomaly_map).all()
    assert prediction.anomaly_map.min() >= 0 and prediction.anomaly_map.max() <= 2


def test_state_dict_round_trip(fitted, toy, prediction):
    fresh = models.create("cflow", pretrained=False, seed=5, **CONFIG)
    fresh.load_state_dict(fitted[0].state_dict())
    fresh.eval()
    assert torch.equal(fresh.predict(toy.test).score, prediction.score)


def test_only_the_decoders_train(fitted):
    detector = fitted[0]
    assert not any(p.requires_grad for p in detector.encoder.parameters())
    decoders = sum(p.numel() for p in detector.decoders.parameters())
    encoder = sum(p.numel() for p in detector.encoder.parameters())
    assert detector.param_counts() == (decoders, encoder)


def test_wide_resnet50_decoders_have_the_reference_studys_parameter_count():
    # Table 2 of the reference study: 81.6M trainable parameters for CFlow on WideResNet50
    # (layers 2-4 with 512, 1024 and 2048 channels). Built on the meta device: no memory.
    with torch.device("meta"):
        decoders = [conditional_decoder(c, 128, 8, 1.9, seed=0) for c in (512, 1024, 2048)]
    total = sum(p.numel() for d in decoders for p in d.parameters())
    assert round(total / 1e6, 1) == 81.6


def test_predict_before_fit_and_empty_training_set_are_errors(toy):
    with pytest.raises(ModelError, match="before fit"):
        models.create("cflow", pretrained=False, **CONFIG).predict(toy.test)
    with pytest.raises(ModelError, match="empty"):
        models.create("cflow", pretrained=False, **CONFIG).fit([], epochs=1)


@pytest.mark.parametrize(
    "bad",
    [
        {"condition_vector": 0},
        {"condition_vector": 130},
        {"coupling_blocks": 0},
        {"clamp_alpha": 0.0},
        {"fiber_batch_size": 0},
        {"lr": -1.0},
        {"epochs": 0},
    ],
)
def test_bad_hyperparameters_are_errors(bad):
    with pytest.raises(ModelError, match=f"cflow: {next(iter(bad))}"):
        models.create("cflow", pretrained=False, **{**CONFIG, **bad})


def test_defaults_are_the_reference_study_values():
    defaults = models.hyperparameters("cflow")
    keys = (
        "backbone",
        "layers",
        "condition_vector",
        "coupling_blocks",
        "clamp_alpha",
        "fiber_batch_size",
        "lr",
        "epochs",
    )
    assert {k: defaults[k] for k in keys} == {
        "backbone": "wide_resnet50_2",
        "layers": ("layer2", "layer3", "layer4"),
        "condition_vector": 128,
        "coupling_blocks": 8,
        "clamp_alpha": 1.9,
        "fiber_batch_size": 64,
        "lr": 1e-4,
        "epochs": 50,
    }


def test_backbone_constraints():
    assert backbone_problem("cflow", "resnet18", {"layers": ("layer2", "layer3")}) is None
    assert backbone_problem("cflow", "wide_resnet50_2") is None
    assert "layer9" in backbone_problem("cflow", "resnet18", {"layers": ("layer2", "layer9")})


def test_building_and_fitting_leave_the_global_rng_alone(toy):
    state = torch.random.get_rng_state()
    detector = models.create("cflow", pretrained=False, **{**CONFIG, "layers": ("layer3",)})
    detector.fit(batches(toy.train[:8]), epochs=1)
    assert torch.equal(state, torch.random.get_rng_state())
