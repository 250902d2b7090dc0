"""The convolutional autoencoder on the toy defect set (CPU, trained from scratch).

The toy defects are the brightest and darkest pixels of their images, so even an untrained
autoencoder (Sigmoid output ~0.5 everywhere) finds them in its error map; what training adds is
the reconstruction of the normal texture, and the test asserts that too. 20 epochs at 32 px
(40 steps of batch 8, ~2 s) take the error on normal test images from that of a flat grey
output (0.085) to ~0.053 (seeds 0-2) and SSIM from ~0.35 to ~0.9, while the defects keep an
error of ~0.4. The maximum of the smoothed map then ranks every defect image first (AUROC 1.0);
the report's mean-error score dilutes the small defects among the well-reconstructed pixels and
reaches 0.875-0.94.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from toy_defects import batches, check_prediction, image_auroc, pixel_auroc, toy_set

import models
from data.transforms import IMAGENET_MEAN, IMAGENET_STD
from models.autoencoder import ConvAutoencoder
from models.base import backbone_problem, hyperparameters
from models.errors import ModelError

SIZE = 32
FIT_EPOCHS = 20


@pytest.fixture(scope="module")
def toy():
    return toy_set(size=SIZE)


def pixels(images: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    return images * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def fitted(toy):
    detector = models.create("autoencoder", score_mode="max")
    history = []

    def on_epoch_end(epoch: int, metrics: dict) -> bool:
        history.append((epoch, metrics))
        return False

    stats = detector.fit(batches(toy.train), epochs=FIT_EPOCHS, on_epoch_end=on_epoch_end)
    return detector, stats, history, detector.predict(toy.test)


def test_detects_and_localises_defects(toy, fitted):
    detector, _, _, prediction = fitted
    check_prediction(toy, prediction, localizes=True)
    assert not detector.training
    assert image_auroc(toy, prediction.score) >= 0.9
    assert pixel_auroc(toy, prediction.anomaly_map) >= 0.95


def test_normal_texture_is_reconstructed_and_defects_are_not(toy, fitted):
    _, _, _, prediction = fitted
    half = len(toy.test) // 2
    normal = prediction.anomaly_map[:half].mean()
    flat_grey = (pixels(toy.test[:half]) - 0.5).abs().mean()
    assert normal < 0.75 * flat_grey
    assert prediction.anomaly_map[toy.masks].mean() > 5 * normal


def test_the_reports_mean_score_detects_less_sharply(toy, fitted):
    detector, _, _, _ = fitted
    mean_mode = models.create("autoencoder")
    mean_mode.load_state_dict(detector.state_dict())
    mean_mode.eval()
    prediction = mean_mode.predict(toy.test)
    # The raw (unsmoothed) per-pixel error, averaged: the report's image score.
    error = (mean_mode.reconstruct(toy.test) - pixels(toy.test).clamp(0, 1)).abs().mean(1)
    assert torch.allclose(prediction.score, error.flatten(1).mean(1), atol=1e-6)
    assert image_auroc(toy, prediction.score) >= 0.8


def test_every_epoch_is_reported_with_a_cosine_learning_rate(fitted):
    _, stats, history, _ = fitted
    assert [epoch for epoch, _ in history] == list(range(1, FIT_EPOCHS + 1))
    for epoch, metrics in history:
        assert set(metrics) == {"loss", "l1", "ssim", "lr"}
        assert all(math.isfinite(value) for value in metrics.values())
        assert metrics["loss"] == pytest.approx(
            0.8 * metrics["l1"] + 0.2 * (1 - metrics["ssim"]), rel=1e-5
        )
        cosine = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * epoch / FIT_EPOCHS))
        assert metrics["lr"] == pytest.approx(cosine, rel=1e-6)
    assert history[-1][1]["lr"] == pytest.approx(1e-5)
    l1 = [metrics["l1"] for _, metrics in history]
    ssim = [metrics["ssim"] for _, metrics in history]
    assert l1[-1] < 0.5 * l1[0]
    assert ssim[0] < 0.5 < 0.8 < ssim[-1]
    assert stats == {"epochs": FIT_EPOCHS, "loss": history[-1][1]["loss"]}


def test_training_stops_when_the_callback_says_so(toy):
    detector = models.create("autoencoder")
    calls = []
    stats = detector.fit(
        batches(toy.train[:4]), epochs=5, on_epoch_end=lambda e, m: calls.append(e) or e == 2
    )
    assert calls == [1, 2]
    assert stats["epochs"] == 2
    assert not detector.training


def test_same_seed_same_scores_and_another_seed_differs(toy):
    def run(seed: int):
        detector = models.create("autoencoder", seed=seed)
        detector.fit(batches(toy.train[:4]), epochs=2)
        return detector.predict(toy.test[:4])

    first, again = run(0), run(0)
    assert torch.equal(first.score, again.score)
    assert torch.equal(first.anomaly_map, again.anomaly_map)
    assert not torch.equal(first.score, run(1).score)


def test_creating_and_fitting_leave_the_global_rng_alone(toy):
    state = torch.random.get_rng_state()
    models.create("autoencoder", seed=3).fit(batches(toy.train[:2]), epochs=1)
    assert torch.equal(state, torch.random.get_rng_state())


def test_state_dict_round_trip_keeps_what_was_learned(toy, fitted):
    detector, _, _, prediction = fitted
    restored = models.create("autoencoder", score_mode="max", seed=5)
    restored.load_state_dict(detector.state_dict())
    restored.eval()
    again = restored.predict(toy.test)
    assert torch.equal(again.score, prediction.score)
    assert torch.equal(again.anomaly_map, prediction.anomaly_map)


def test_the_reports_architecture(fitted):
    detector, _, _, _ = fitted
    trainable, frozen = detector.param_counts()
    # The report's layer list: 1.67M parameters (it quotes ~2.8M, which the list does not give).
    assert (trainable, frozen) == (1_669_091, 0)
    with torch.no_grad():
        code = detector.network.encoder(torch.zeros(1, 3, 256, 256))
    assert code.shape == (1, 256, 16, 16)


def test_sizes_that_are_not_multiples_of_16_are_padded_and_cropped(toy, fitted):
    detector, _, _, _ = fitted
    odd = F.interpolate(toy.test[:2], size=(20, 44), mode="bilinear")
    prediction = detector.predict(odd)
    assert prediction.anomaly_map.shape == (2, 20, 44)
    assert torch.isfinite(prediction.score).all()
    assert detector.reconstruct(odd).shape == (2, 3, 20, 44)


def test_map_smoothing_is_a_mean_filter(toy, fitted):
    detector, _, _, prediction = fitted
    raw = models.create("autoencoder", score_mode="max", map_kernel=1)
    raw.load_state_dict(detector.state_dict())
    raw.eval()
    unsmoothed = raw.predict(toy.test).anomaly_map
    inner = F.avg_pool2d(unsmoothed[:, None], 3, stride=1)[:, 0]
    assert torch.allclose(prediction.anomaly_map[:, 1:-1, 1:-1], inner, atol=1e-6)


def test_predict_before_fit_and_empty_training_set_are_errors(toy):
    detector = models.create("autoencoder")
    with pytest.raises(ModelError, match="before fit"):
        detector.predict(toy.test[:2])
    with pytest.raises(ModelError, match="empty"):
        detector.fit([], epochs=1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lr": 0}, "lr must be > 0"),
        ({"min_lr": -1e-5}, "min_lr must be > 0"),
        ({"lr": 1e-4, "min_lr": 1e-3}, "min_lr must be <= lr"),
        ({"weight_decay": -1}, "weight_decay must be >= 0"),
        ({"beta1": 1.0}, "beta1 must be in"),
        ({"beta2": -0.5}, "beta2 must be in"),
        ({"l1_weight": -0.8}, "l1_weight must be >= 0"),
        ({"ssim_weight": None}, "ssim_weight must be >= 0"),
        ({"l1_weight": 0, "ssim_weight": 0}, "l1_weight \\+ ssim_weight must be > 0"),
        ({"grad_clip": 0}, "grad_clip must be > 0 or None"),
        ({"epochs": 0}, "epochs must be a positive int"),
        ({"score_mode": "median"}, "score_mode must be one of mean, max"),
        ({"map_kernel": 4}, "map_kernel must be odd, got 4"),
        ({"map_kernel": 0}, "map_kernel must be a positive int, got 0"),
        ({"grad_clip": True}, "grad_clip must be > 0 or None, got True"),
    ],
)
def test_bad_hyperparameters_are_model_errors(overrides, message):
    with pytest.raises(ModelError, match=f"autoencoder: {message}"):
        models.create("autoencoder", **overrides)


def test_bad_fit_epochs_is_a_model_error(toy):
    with pytest.raises(ModelError, match="fit epochs must be a positive int"):
        models.create("autoencoder").fit(batches(toy.train[:2]), epochs=0)


def test_defaults_are_the_reports_values():
    defaults = hyperparameters("autoencoder")
    assert (defaults["lr"], defaults["min_lr"]) == (1e-3, 1e-5)
    assert defaults["weight_decay"] == 1e-4
    assert (defaults["beta1"], defaults["beta2"]) == (0.9, 0.999)
    assert (defaults["l1_weight"], defaults["ssim_weight"]) == (0.8, 0.2)
    assert defaults["grad_clip"] == 1.0
    assert defaults["epochs"] == 100
    assert defaults["score_mode"] == "mean"
    assert defaults["map_kernel"] == 3
    assert ConvAutoencoder.learning_type == "iterative"
    assert ConvAutoencoder.localizes


def test_takes_no_backbone():
    assert backbone_problem("autoencoder", "resnet18") == "autoencoder takes no backbone"
