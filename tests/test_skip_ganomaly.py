"""Skip-GANomaly on the toy defect set (CPU, trained from scratch).

The toy defects are the brightest and darkest pixels of their images, so even an untrained
generator (Tanh output ~0, error ~|x|) ranks them first: image and pixel AUROC are 1.0 before
training and stay there. What training adds is the reconstruction of normal content, so the test
asserts that too: after 40 epochs at 32 px (a few seconds; 80 steps of batch 8) the error on
normal test images is about half of the untrained generator's (0.09 against 0.17 over seeds
0-2), while it stays ~0.8 inside the defects. The same run at 64 px needs about twice the epochs
for the same gain at four times the cost per epoch.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from toy_defects import batches, check_prediction, image_auroc, pixel_auroc, toy_set

import models
import models.components.dcgan as dcgan_module
from models.base import backbone_problem, hyperparameters
from models.components.dcgan import to_tanh_range
from models.errors import ModelError
from models.skip_ganomaly import SkipGANomaly, UNetGenerator

SIZE = 32
FIT_EPOCHS = 40
SMALL = {"n_features": 16}


@pytest.fixture(scope="module")
def toy():
    return toy_set(size=SIZE)


def small(**overrides) -> SkipGANomaly:
    return models.create("skip_ganomaly", **{**SMALL, **overrides})


@pytest.fixture(scope="module")
def fitted(toy):
    detector = small()
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
    assert int(detector.side) == SIZE
    assert image_auroc(toy, prediction.score) >= 0.9
    assert pixel_auroc(toy, prediction.anomaly_map) >= 0.95


def test_normal_content_is_reconstructed_and_defects_are_not(toy, fitted):
    _, _, _, prediction = fitted
    normal = prediction.anomaly_map[: len(toy.test) // 2].mean()
    untrained = to_tanh_range(toy.test[: len(toy.test) // 2]).abs().mean()
    assert normal < 0.7 * untrained
    defects = prediction.anomaly_map[toy.masks]
    assert defects.mean() > 4 * normal


def test_every_epoch_is_reported_and_the_losses_fall(fitted):
    _, stats, history, _ = fitted
    assert [epoch for epoch, _ in history] == list(range(1, FIT_EPOCHS + 1))
    for _, metrics in history:
        assert set(metrics) == {"loss", "adv", "con", "lat", "d_loss"}
        assert all(math.isfinite(value) for value in metrics.values())
        weighted = metrics["adv"] + 50 * metrics["con"] + metrics["lat"]
        assert metrics["loss"] == pytest.approx(weighted, rel=1e-5)
    con = [metrics["con"] for _, metrics in history]
    assert con[-1] < 0.6 * con[0]
    assert stats["epochs"] == FIT_EPOCHS
    assert stats["loss"] == history[-1][1]["loss"]
    assert stats["discriminator_reinits"] == 0


def test_score_weights_reconstruction_and_latent_errors(toy, fitted):
    detector, _, _, prediction = fitted
    reconstruction_only = small(lambda_score=1.0)
    reconstruction_only.load_state_dict(detector.state_dict())
    reconstruction_only.eval()
    only = reconstruction_only.predict(toy.test)
    assert torch.allclose(only.score, only.anomaly_map.flatten(1).mean(1))
    assert torch.equal(only.anomaly_map, prediction.anomaly_map)
    latent_only = small(lambda_score=0.0)
    latent_only.load_state_dict(detector.state_dict())
    latent_only.eval()
    latent = latent_only.predict(toy.test).score
    assert torch.allclose(prediction.score, 0.9 * only.score + 0.1 * latent)
    assert (latent >= 0).all()


def test_training_stops_when_the_callback_says_so(toy):
    detector = small()
    calls = []
    stats = detector.fit(
        batches(toy.train[:4]), epochs=5, on_epoch_end=lambda e, m: calls.append(e) or e == 2
    )
    assert calls == [1, 2]
    assert stats["epochs"] == 2
    assert not detector.training


def test_same_seed_same_scores_and_another_seed_differs(toy):
    def run(seed: int):
        detector = small(seed=seed)
        detector.fit(batches(toy.train[:4]), epochs=2)
        return detector.predict(toy.test[:4])

    first, again = run(0), run(0)
    assert torch.equal(first.score, again.score)
    assert torch.equal(first.anomaly_map, again.anomaly_map)
    assert not torch.equal(first.score, run(1).score)


def test_creating_and_fitting_leave_the_global_rng_alone(toy):
    state = torch.random.get_rng_state()
    small(seed=3).fit(batches(toy.train[:2]), epochs=1)
    assert torch.equal(state, torch.random.get_rng_state())


def test_a_collapsed_discriminator_is_reinitialised(toy, monkeypatch):
    monkeypatch.setattr(dcgan_module, "D_COLLAPSE", math.inf)
    detector = small()
    stats = detector.fit(batches(toy.train[:4], 2), epochs=2)
    assert stats["discriminator_reinits"] == 4
    again = small()
    again.fit(batches(toy.train[:4], 2), epochs=2)
    assert torch.equal(
        again.discriminator.classifier.weight, detector.discriminator.classifier.weight
    )


def test_state_dict_round_trip_rebuilds_for_the_trained_side(toy, fitted):
    detector, _, _, prediction = fitted
    restored = small(seed=5)
    assert int(restored.side) == 256
    restored.load_state_dict(detector.state_dict())
    restored.eval()
    assert int(restored.side) == SIZE
    again = restored.predict(toy.test)
    assert torch.equal(again.score, prediction.score)
    assert torch.equal(again.anomaly_map, prediction.anomaly_map)


def test_unet_goes_down_to_one_pixel_and_matches_pix2pix_at_256():
    network = UNetGenerator(32, 4)
    assert len(network.down) == 5
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    x = images
    for down in network.down:
        x = down(x)
    assert x.shape == (2, 32, 1, 1)
    out = network.eval()(images)
    assert out.shape == images.shape and out.abs().max() <= 1
    # pix2pix's unet_256 with 64 features: 54.41M parameters.
    with torch.device("meta"):
        unet = UNetGenerator(256, 64)
    assert sum(p.numel() for p in unet.parameters()) == 54_413_955


def test_maps_have_the_input_size_at_odd_and_other_sizes(toy, fitted):
    detector = small()
    odd = F.interpolate(toy.train, size=(20, 28), mode="bilinear")
    detector.fit(batches(odd), epochs=1)
    assert int(detector.side) == 32
    prediction = detector.predict(odd[:2])
    assert prediction.anomaly_map.shape == (2, 20, 28)
    assert torch.isfinite(prediction.anomaly_map).all()
    larger = F.interpolate(toy.test[:2], size=(64, 48), mode="bilinear")
    prediction = fitted[0].predict(larger)
    assert prediction.anomaly_map.shape == (2, 64, 48)
    assert torch.isfinite(prediction.score).all()


def test_too_small_images_and_predict_before_fit_and_empty_sets_are_errors(toy):
    detector = small()
    with pytest.raises(ModelError, match="before fit"):
        detector.predict(toy.test[:2])
    with pytest.raises(ModelError, match="empty"):
        detector.fit([], epochs=1)
    tiny = F.interpolate(toy.train[:2], size=(8, 8), mode="bilinear")
    with pytest.raises(ModelError, match="at least 16 px"):
        detector.fit([tiny], epochs=1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"latent_dim": 0}, "latent_dim must be a positive int"),
        ({"n_features": True}, "n_features must be a positive int"),
        ({"lr": -1e-4}, "lr must be > 0"),
        ({"beta1": 1.5}, "beta1 must be in"),
        ({"beta2": 1.0}, "beta2 must be in"),
        ({"w_adv": -1}, "w_adv must be >= 0"),
        ({"w_con": "50"}, "w_con must be >= 0"),
        ({"w_lat": -1}, "w_lat must be >= 0"),
        ({"lambda_score": 1.1}, "lambda_score must be in"),
        ({"epochs": 1.5}, "epochs must be a positive int"),
    ],
)
def test_bad_hyperparameters_are_model_errors(overrides, message):
    with pytest.raises(ModelError, match=f"skip_ganomaly: {message}"):
        small(**overrides)


def test_bad_fit_epochs_is_a_model_error(toy):
    with pytest.raises(ModelError, match="fit epochs must be a positive int"):
        small().fit(batches(toy.train[:2]), epochs=-1)


def test_defaults_are_the_reference_and_paper_values():
    defaults = hyperparameters("skip_ganomaly")
    # Zipfel et al. (reference seed 002), Table 9: implemented values.
    assert defaults["lr"] == 0.0002
    assert defaults["beta1"] == 0.5
    assert defaults["latent_dim"] == 100
    assert (defaults["w_adv"], defaults["w_con"], defaults["w_lat"]) == (1, 50, 1)
    assert defaults["epochs"] == 30
    # The paper.
    assert defaults["beta2"] == 0.999
    assert defaults["lambda_score"] == 0.9
    assert defaults["n_features"] == 64
    assert SkipGANomaly.learning_type == "iterative"
    assert SkipGANomaly.localizes


def test_takes_no_backbone():
    assert backbone_problem("skip_ganomaly", "resnet18") == "skip_ganomaly takes no backbone"
