"""GANomaly on the toy defect set (CPU, trained from scratch).

The toy set is used at 32 px, the paper's CIFAR-10 resolution: the DCGAN stack then has two
halving layers, and 40 epochs (80 steps of batch 8) train in a few seconds. The score is the
distance of the two latent codes, which means something only once generator and re-encoder have
learned the normal images: after one epoch (or with a frozen learning rate) the image AUROC is
0.36-0.66 over seeds 0-2, after 40 epochs 0.97-1.0, so the AUROC assertion tests learning.
(At 64 px the same needs ~35 epochs of twice the cost; the reference study's 100 epochs at 256 px
gave 0.42 on its glue lines.)
"""

from __future__ import annotations

import math

import pytest
import torch
from toy_defects import batches, check_prediction, image_auroc, toy_set

import models
import models.components.dcgan as dcgan_module
from models.base import backbone_problem, hyperparameters
from models.errors import ModelError
from models.ganomaly import GANomaly

SIZE = 32
FIT_EPOCHS = 40
SMALL = {"n_features": 16}


@pytest.fixture(scope="module")
def toy():
    return toy_set(size=SIZE)


def small(**overrides) -> GANomaly:
    return models.create("ganomaly", **{**SMALL, **overrides})


@pytest.fixture(scope="module")
def fitted(toy):
    detector = small()
    history = []

    def on_epoch_end(epoch: int, metrics: dict) -> bool:
        history.append((epoch, metrics))
        return False

    stats = detector.fit(batches(toy.train), epochs=FIT_EPOCHS, on_epoch_end=on_epoch_end)
    return detector, stats, history, detector.predict(toy.test)


def test_detects_defects_from_the_latent_codes(toy, fitted):
    detector, _, _, prediction = fitted
    check_prediction(toy, prediction, localizes=False)
    assert not detector.training
    assert int(detector.side) == SIZE
    assert image_auroc(toy, prediction.score) >= 0.9


def test_every_epoch_is_reported_and_the_generator_learns(fitted):
    _, stats, history, _ = fitted
    assert [epoch for epoch, _ in history] == list(range(1, FIT_EPOCHS + 1))
    for _, metrics in history:
        assert set(metrics) == {"loss", "adv", "con", "enc", "d_loss"}
        assert all(math.isfinite(value) for value in metrics.values())
        weighted = metrics["adv"] + 50 * metrics["con"] + metrics["enc"]
        assert metrics["loss"] == pytest.approx(weighted, rel=1e-5)
    con = [metrics["con"] for _, metrics in history]
    # L1 in [-1, 1] pixels: ~0.18 for the untrained decoder, about a third of it after training.
    assert con[0] > 0.15
    assert con[-1] < 0.6 * con[0]
    assert stats["epochs"] == FIT_EPOCHS
    assert stats["loss"] == history[-1][1]["loss"]
    assert stats["d_loss"] == history[-1][1]["d_loss"]
    assert stats["discriminator_reinits"] == 0


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
        return detector.predict(toy.test[:4]).score

    first = run(0)
    assert torch.equal(first, run(0))
    assert not torch.equal(first, run(1))


def test_creating_and_fitting_leave_the_global_rng_alone(toy):
    state = torch.random.get_rng_state()
    small(seed=3).fit(batches(toy.train[:2]), epochs=1)
    assert torch.equal(state, torch.random.get_rng_state())


def test_a_collapsed_discriminator_is_reinitialised(toy, monkeypatch):
    # Any loss counts as collapsed: D is re-drawn after every step, each time differently.
    monkeypatch.setattr(dcgan_module, "D_COLLAPSE", math.inf)
    detector = small()
    before = detector.discriminator.final.weight.clone()
    stats = detector.fit(batches(toy.train[:4], 2), epochs=2)
    assert stats["discriminator_reinits"] == 4
    assert not torch.equal(before, detector.discriminator.final.weight)
    again = small()
    again.fit(batches(toy.train[:4], 2), epochs=2)
    assert torch.equal(again.discriminator.final.weight, detector.discriminator.final.weight)


def test_state_dict_round_trip_rebuilds_for_the_trained_side(toy, fitted):
    detector, _, _, prediction = fitted
    restored = small(seed=5)
    assert int(restored.side) == 256
    restored.load_state_dict(detector.state_dict())
    restored.eval()
    assert int(restored.side) == SIZE
    assert torch.equal(restored.predict(toy.test).score, prediction.score)


def test_parameter_counts_follow_the_side_and_match_the_study_at_256():
    # Table 2 of the reference study: 188M trainable parameters (two encoders, decoder and
    # discriminator at 256 px with 64 features). Built on the meta device: no memory is used.
    with torch.device("meta"):
        trainable, frozen = models.create("ganomaly").param_counts()
    assert 188.0e6 < trainable < 189.5e6
    assert frozen == 0


def test_other_sizes_are_padded_to_a_power_of_two(toy, fitted):
    detector = small()
    odd = torch.nn.functional.interpolate(toy.train, size=(20, 28), mode="bilinear")
    detector.fit(batches(odd), epochs=1)
    assert int(detector.side) == 32
    assert torch.isfinite(detector.predict(odd[:2]).score).all()
    # Predicting at another size than the training one resizes onto the trained networks.
    fitted_detector = fitted[0]
    larger = torch.nn.functional.interpolate(toy.test[:2], size=(64, 64), mode="bilinear")
    assert torch.isfinite(fitted_detector.predict(larger).score).all()
    assert int(fitted_detector.side) == SIZE


def test_too_small_images_are_a_model_error(toy):
    tiny = torch.nn.functional.interpolate(toy.train[:2], size=(8, 12), mode="bilinear")
    with pytest.raises(ModelError, match=r"at least 16 px.*8 x 12"):
        small().fit([tiny], epochs=1)


def test_predict_before_fit_and_empty_training_set_are_errors(toy):
    detector = small()
    with pytest.raises(ModelError, match="before fit"):
        detector.predict(toy.test[:2])
    with pytest.raises(ModelError, match="empty"):
        detector.fit([], epochs=1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"latent_dim": 0}, "latent_dim must be a positive int"),
        ({"n_features": 2.5}, "n_features must be a positive int"),
        ({"lr": 0}, "lr must be > 0"),
        ({"beta1": 1.0}, "beta1 must be in"),
        ({"beta2": -0.1}, "beta2 must be in"),
        ({"wadv": -1}, "wadv must be >= 0"),
        ({"wcon": None}, "wcon must be >= 0"),
        ({"wenc": -0.5}, "wenc must be >= 0"),
        ({"epochs": 0}, "epochs must be a positive int"),
    ],
)
def test_bad_hyperparameters_are_model_errors(overrides, message):
    with pytest.raises(ModelError, match=f"ganomaly: {message}"):
        small(**overrides)


def test_bad_fit_epochs_is_a_model_error(toy):
    with pytest.raises(ModelError, match="fit epochs must be a positive int"):
        small().fit(batches(toy.train[:2]), epochs=0)


def test_defaults_are_the_study_and_paper_values():
    defaults = hyperparameters("ganomaly")
    # Table B.8 of the reference study.
    assert defaults["lr"] == 0.0002
    assert (defaults["beta1"], defaults["beta2"]) == (0.5, 0.999)
    assert (defaults["wadv"], defaults["wcon"], defaults["wenc"]) == (1, 50, 1)
    assert defaults["epochs"] == 100
    # The paper.
    assert (defaults["latent_dim"], defaults["n_features"]) == (100, 64)
    assert GANomaly.learning_type == "iterative"
    assert not GANomaly.localizes


def test_takes_no_backbone():
    assert backbone_problem("ganomaly", "resnet18") == "ganomaly takes no backbone"


# Anomalib 2.7 departs from the paper and the authors' code on the points below (it calls its
# DCGAN init on the containers, so no layer gets it; its adversarial loss compares D's two
# probabilities; its encoder loss is smooth L1). These tests hold the zoo to the paper.


def test_every_network_gets_the_dcgan_initialisation():
    detector = small()
    convs = bns = 0
    for net in (detector.generator, detector.discriminator):
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
                assert module.weight.std().item() == pytest.approx(0.02, rel=0.2)
                assert abs(module.weight.mean().item()) < 0.01
                convs += 1
            elif isinstance(module, torch.nn.BatchNorm2d):
                assert (module.weight - 1).abs().max().item() < 0.15
                assert module.weight.std().item() == pytest.approx(0.02, rel=0.5)
                assert torch.equal(module.bias, torch.zeros_like(module.bias))
                bns += 1
    # Three encoders (G_E, E, D) and a decoder at 256 px: every layer was reached.
    assert (convs, bns) == (3 * 7 + 7, 3 * 5 + 6)


def test_adversarial_loss_matches_the_discriminator_features_and_encoder_loss_is_l2(toy):
    detector = small()
    detector._prepare_side(toy.train[:4])
    detector.train()
    x, _ = detector._network_input(toy.train[:4])
    with torch.random.fork_rng(devices=[]):
        _, parts, reconstruction, _ = detector._generator_losses(x)
    _, z, z_again = detector.generator(x)
    real_logits, real_features = detector.discriminator(x)
    _, fake_features = detector.discriminator(reconstruction)
    assert real_features.shape[1:] == (detector.discriminator.feature_channels, 4, 4)
    features_l2 = (fake_features - real_features).square().mean()
    probabilities_l2 = (
        (torch.sigmoid(real_logits) - torch.sigmoid(detector.discriminator(reconstruction)[0]))
        .square()
        .mean()
    )
    assert parts["adv"].item() == pytest.approx(features_l2.item(), rel=1e-4)
    assert parts["adv"].item() != pytest.approx(probabilities_l2.item(), rel=1e-2)
    assert parts["enc"].item() == pytest.approx((z - z_again).square().mean().item(), rel=1e-4)


def test_an_images_score_does_not_depend_on_its_batch(toy, fitted):
    # Batch norm in eval mode at scoring: the running statistics, not the batch's.
    detector, _, _, prediction = fitted
    alone = torch.cat([detector.predict(image[None]).score for image in toy.test[:3]])
    torch.testing.assert_close(alone, prediction.score[:3], rtol=1e-4, atol=1e-6)
