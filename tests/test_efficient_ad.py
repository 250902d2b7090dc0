"""EfficientAD on the toy defect set (CPU, randomly initialised teacher, no ImageNet penalty)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from toy_defects import batches, check_prediction, image_auroc, pixel_auroc, toy_set

import models
import models.efficient_ad  # registers "efficient_ad" until models/__init__ imports it
from models.components.pdn import (
    ImageAutoencoder,
    PenaltyImages,
    color_jitter,
    hard_feature_loss,
    patch_description_network,
    quantile,
)
from models.errors import ModelError

# One epoch over the 16 toy images (2 held out) already separates the toy defects: with a random
# teacher, image AUROC is 1.0 and pixel AUROC 0.89 for seeds 0-2. The mechanics (callbacks,
# stopping, determinism) run on 4 crops of 40 px (3 trained, 1 held out, 2 x 2 feature maps) so
# that every epoch is one cheap step.
FIT_EPOCHS = 1
MECHANICS_SIZE = 40


@pytest.fixture(scope="module")
def toy():
    return toy_set()


@pytest.fixture(scope="module")
def small_train(toy):
    return [toy.train[:4, :, :MECHANICS_SIZE, :MECHANICS_SIZE]]


@pytest.fixture(scope="module")
def fitted(toy):
    detector = models.create("efficient_ad", seed=0)
    stats = detector.fit(batches(toy.train), epochs=FIT_EPOCHS)
    return detector, stats, detector.predict(toy.test)


def test_detects_and_localises_the_toy_defects(toy, fitted):
    _, stats, prediction = fitted
    check_prediction(toy, prediction, localizes=True)
    assert image_auroc(toy, prediction.score) >= 0.9
    assert pixel_auroc(toy, prediction.anomaly_map) >= 0.8
    assert stats["epochs"] == FIT_EPOCHS
    assert stats["n_validation"] == 2 and stats["n_train"] == 14
    assert math.isfinite(stats["loss"])


def test_notes_say_what_outside_data_was_missing(fitted):
    notes = fitted[1]["notes"]
    assert any("teacher PDN is randomly initialised" in note for note in notes)
    assert any("ImageNet penalty is dropped" in note for note in notes)


def test_map_normalisation_sends_held_out_quantiles_to_0_and_0_1(fitted):
    detector = fitted[0]
    q_a, q_b = detector.st_quantiles
    assert 0 < q_a < q_b
    maps = torch.tensor([[[q_a, q_b]]])
    normalised = models.efficient_ad._normalise(maps, detector.st_quantiles)
    assert torch.allclose(normalised, torch.tensor([[[0.0, 0.1]]]), atol=1e-6)


def test_teacher_frozen_student_and_autoencoder_trained(toy, fitted):
    detector = fitted[0]
    assert not any(p.requires_grad for p in detector.teacher.parameters())
    assert all(p.requires_grad for p in detector.student.parameters())
    assert all(p.requires_grad for p in detector.autoencoder.parameters())
    assert not detector.training and not detector.autoencoder.training
    fresh = models.create("efficient_ad", seed=0)
    assert torch.equal(fresh.teacher[0].weight, detector.teacher[0].weight)
    assert not torch.equal(fresh.student[0].weight, detector.student[0].weight)
    # Teacher outputs are normalised with the training images' channel statistics.
    with torch.no_grad():
        features = detector._teacher_features(toy.train)
    assert features.mean((0, 2, 3)).abs().max() < 0.3
    assert (features.std((0, 2, 3)) - 1).abs().max() < 0.3


def test_reports_every_epoch_and_stops_when_told(small_train):
    seen: list[tuple[int, dict]] = []
    detector = models.create("efficient_ad", seed=0, lr=1e-3)
    stats = detector.fit(small_train, epochs=3, on_epoch_end=lambda e, m: seen.append((e, m)))
    assert [e for e, _ in seen] == [1, 2, 3]
    for _, metrics in seen:
        assert set(metrics) == {"loss", "loss_st", "loss_ae", "loss_stae"}
        assert all(math.isfinite(v) for v in metrics.values())
        parts = metrics["loss_st"] + metrics["loss_ae"] + metrics["loss_stae"]
        assert metrics["loss"] == pytest.approx(parts, rel=1e-5)
    assert stats["epochs"] == 3 and stats["n_train"] == 3 and stats["n_validation"] == 1
    # The student learns the teacher: its hard loss falls from the first epoch on.
    assert seen[2][1]["loss_st"] < 0.9 * seen[0][1]["loss_st"]

    calls: list[int] = []
    stopped = models.create("efficient_ad", seed=0, epochs=50)
    stats = stopped.fit(small_train, on_epoch_end=lambda e, m: calls.append(e) or e == 2)
    assert calls == [1, 2] and stats["epochs"] == 2


def test_same_seed_same_scores_and_global_rng_untouched(toy, small_train):
    state = torch.random.get_rng_state()
    first = models.create("efficient_ad", seed=3)
    first.fit([{"image": small_train[0]}], epochs=1)
    assert torch.equal(state, torch.random.get_rng_state())
    second = models.create("efficient_ad", seed=3)
    second.fit(small_train, epochs=1)
    test = toy.test[:4, :, :MECHANICS_SIZE, :MECHANICS_SIZE]
    a, b = first.predict(test), second.predict(test)
    assert torch.equal(a.score, b.score) and torch.equal(a.anomaly_map, b.anomaly_map)
    other = models.create("efficient_ad", seed=4)
    other.fit(small_train, epochs=1)
    assert not torch.equal(other.predict(test).score, a.score)


def test_can_be_scored_between_epochs(toy, small_train):
    # An ASHA study on a validation metric scores the detector from on_epoch_end
    # (sweep/run/trainable.py): maps must be normalised for the networks of that epoch.
    test = toy.test[:4, :, :MECHANICS_SIZE, :MECHANICS_SIZE]
    detector = models.create("efficient_ad", seed=0, lr=1e-3)
    scored: list[tuple[int, models.Prediction, torch.Tensor]] = []

    def score(epoch: int, metrics: dict) -> bool:
        scored.append((epoch, detector.predict(test), detector.st_quantiles.clone()))
        return False

    detector.fit(small_train, epochs=2, on_epoch_end=score)
    assert [epoch for epoch, _, _ in scored] == [1, 2]
    for _, prediction, quantiles in scored:
        assert torch.isfinite(prediction.score).all()
        assert torch.isfinite(prediction.anomaly_map).all()
        assert prediction.anomaly_map.shape == (4, MECHANICS_SIZE, MECHANICS_SIZE)
        assert 0 < quantiles[0] < quantiles[1]
    # Each epoch measures its own quantiles; the last epoch's are the fitted detector's, and
    # scoring between epochs changes nothing in the training.
    assert not torch.equal(scored[0][2], scored[1][2])
    final = detector.predict(test)
    assert torch.equal(final.score, scored[1][1].score)
    assert detector.training is False
    quiet = models.create("efficient_ad", seed=0, lr=1e-3)
    quiet.fit(small_train, epochs=2)
    assert torch.equal(quiet.predict(test).score, final.score)


def test_state_dict_round_trip(toy, fitted):
    detector, _, prediction = fitted
    copy = models.create("efficient_ad", seed=1)
    copy.load_state_dict(detector.state_dict())
    again = copy.predict(toy.test)
    assert torch.allclose(again.score, prediction.score)


def test_predict_before_fit_and_empty_training_set_are_errors(toy):
    detector = models.create("efficient_ad")
    with pytest.raises(ModelError, match="before fit"):
        detector.predict(toy.test[:1])
    with pytest.raises(ModelError, match="empty"):
        detector.fit([], epochs=1)


def test_single_image_normalises_on_the_training_image(toy):
    detector = models.create("efficient_ad")
    stats = detector.fit([toy.train[:1, :, :MECHANICS_SIZE, :MECHANICS_SIZE]], epochs=1)
    assert stats["n_validation"] == 0 and stats["n_train"] == 1
    assert any("too few distinct training images" in note for note in stats["notes"])
    assert detector.st_quantiles[0] < detector.st_quantiles[1]


def test_teacher_weights_are_loaded_and_checked(tmp_path):
    source = models.create("efficient_ad", seed=7)
    path = tmp_path / "teacher_small.pth"
    torch.save(source.teacher.state_dict(), path)
    detector = models.create("efficient_ad", seed=0, teacher_weights=str(path))
    assert torch.equal(detector.teacher[8].weight, source.teacher[8].weight)
    # anomalib names its layers conv1..conv4.
    renamed = {
        f"conv{n}.{kind}": source.teacher[i].state_dict()[kind]
        for n, i in enumerate((0, 3, 6, 8), start=1)
        for kind in ("weight", "bias")
    }
    torch.save(renamed, tmp_path / "anomalib.pt")
    detector = models.create("efficient_ad", teacher_weights=str(tmp_path / "anomalib.pt"))
    assert torch.equal(detector.teacher[6].bias, source.teacher[6].bias)
    with pytest.raises(ModelError, match=r"^efficient_ad: teacher_weights: .*wrong shapes"):
        models.create("efficient_ad", teacher_weights=str(path), teacher_out_channels=128)
    with pytest.raises(ModelError, match="is not a file"):
        models.create("efficient_ad", teacher_weights=str(tmp_path / "missing.pth"))
    torch.save(source.teacher, tmp_path / "pickled.pth")
    with pytest.raises(ModelError, match="not a pickled module"):
        models.create("efficient_ad", teacher_weights=str(tmp_path / "pickled.pth"))


def test_imagenet_penalty_from_a_local_folder(tmp_path, small_train):
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i}.png"), rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    penalty = PenaltyImages(tmp_path, seed=0, owner="efficient_ad")
    images = penalty.sample(2, (40, 40), torch.device("cpu"))
    assert images.shape == (2, 3, 40, 40) and torch.isfinite(images).all()
    again = PenaltyImages(tmp_path, seed=0, owner="efficient_ad").sample(2, (40, 40), "cpu")
    assert torch.equal(images, again)

    detector = models.create("efficient_ad", imagenet_dir=str(tmp_path))
    stats = detector.fit(small_train, epochs=1)
    assert not any("penalty" in note for note in stats["notes"])
    plain = models.create("efficient_ad")
    plain.fit(small_train, epochs=1)
    assert not torch.equal(detector.student[0].weight, plain.student[0].weight)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="holds no images"):
        models.create("efficient_ad", imagenet_dir=str(tmp_path / "empty")).fit(small_train)


def test_pdn_layouts_receptive_field_and_output_sizes():
    for size in ("small", "medium"):
        pdn = patch_description_network(size, 384)
        image = torch.zeros(1, 3, 48, 48, requires_grad=True)
        out = pdn(image)
        assert out.shape == (1, 384, 4, 4)
        out[0, :, 2, 2].sum().backward()
        touched = image.grad[0].abs().sum(0) > 0
        rows, cols = touched.any(1).nonzero(), touched.any(0).nonzero()
        assert rows.max() - rows.min() + 1 == 33 and cols.max() - cols.min() + 1 == 33
    # Output sizes at the paper's 256 px, on the meta device (shapes only, no compute).
    with torch.device("meta"):
        image = torch.zeros(1, 3, 256, 256)
        for size in ("small", "medium"):
            assert patch_description_network(size, 8)(image).shape[-1] == 56
            assert patch_description_network(size, 8, padding=True)(image).shape[-1] == 64
    assert ImageAutoencoder.decoder_sizes(256) == [3, 8, 15, 32, 63, 127]
    ae = ImageAutoencoder(16)
    for side, out in ((64, 8), (256, 56), (96, 16)):
        with torch.no_grad():
            assert ae(torch.zeros(1, 3, side, side), (out, out)).shape == (1, 16, out, out)


def test_param_counts_match_table_2():
    # Table 2 of the reference study lists 8.1M trainable parameters for EfficientAD: that is
    # student + autoencoder + teacher (the Lightning summary it comes from counts the teacher,
    # which anomalib leaves requires_grad). Our frozen teacher is counted as frozen.
    trainable, frozen = models.create("efficient_ad").param_counts()
    assert (trainable, frozen) == (5_363_712, 2_694_144)
    assert round((trainable + frozen) / 1e6, 1) == 8.1
    trainable, frozen = models.create("efficient_ad", model_size="medium").param_counts()
    assert (trainable, frozen) == (12_711_808, 8_026_624)


def test_losses_and_helpers():
    x = torch.arange(1000, dtype=torch.float32)
    assert hard_feature_loss(x, 0.99) == pytest.approx(x[x >= quantile(x, 0.99)].mean())
    assert hard_feature_loss(x, 0.0) == pytest.approx(x.mean())
    values = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.1, 0.9, 0.995, 1.0):
        assert quantile(values, q) == pytest.approx(torch.quantile(values, q).item())
    images = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.2
    jittered = color_jitter(images, torch.Generator().manual_seed(0))
    assert jittered.shape == images.shape and not torch.equal(jittered, images)
    assert torch.equal(jittered, color_jitter(images, torch.Generator().manual_seed(0)))


def test_defaults_are_table_b8():
    defaults = models.hyperparameters("efficient_ad")
    assert defaults["model_size"] == "small"
    assert defaults["teacher_out_channels"] == 384
    assert defaults["lr"] == 1e-4
    assert defaults["weight_decay"] == 1e-5
    assert defaults["epochs"] == 200
    assert defaults["hard_quantile"] == 0.999
    assert defaults["teacher_weights"] is None and defaults["imagenet_dir"] is None
    assert models.get_class("efficient_ad").learning_type == "iterative"
    assert models.backbone_problem("efficient_ad", "resnet18") == "efficient_ad takes no backbone"


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"model_size": "large"}, "model_size"),
        ({"teacher_out_channels": 0}, "teacher_out_channels"),
        ({"lr": -1}, "lr"),
        ({"weight_decay": -1e-5}, "weight_decay"),
        ({"epochs": 0}, "epochs"),
        ({"hard_quantile": 1.0}, "hard_quantile"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"padding": "yes"}, "padding"),
        ({"imagenet_dir": "/no/such/folder"}, "imagenet_dir"),
    ],
)
def test_bad_hyperparameters_are_errors(hparams, message):
    with pytest.raises(ModelError, match=rf"^efficient_ad: {message}"):
        models.create("efficient_ad", **hparams)
