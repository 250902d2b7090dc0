"""CutPaste on the toy defect set (CPU, no pretrained weights).

The paper fine-tunes an ImageNet ResNet18; without a download the backbone starts from a random
resnet18 saved to a local file, built with timm's ``zero_init_last=False``. timm's own untrained
ResNet zero-initialises the last batch norm of every residual block, which leaves the pooled
``layer4`` features strided projections of the stem: their Gaussian separates the toy set only
at AUROC ~0.75, and a few CutPaste epochs on 16 images do not teach it more. With live residual
branches the pooled features see the defects (AUROC 1.0 from the first epoch), and what the
short runs check on top is that the self-supervised classifier trains (falling loss, rising
accuracy) without spoiling them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf
from toy_defects import batches, check_prediction, image_auroc, pixel_auroc, toy_set

import models
import models.cutpaste  # registers "cutpaste" until models/__init__ imports it
from models.base import backbone_problem, hyperparameters
from models.cutpaste import CutPaste, GaussianDensity, _coverage, _positions, ledoit_wolf
from models.errors import ModelError

FIT_EPOCHS = 2


@pytest.fixture(scope="module")
def toy():
    return toy_set()


def small(random_resnet18_weights: str, **overrides) -> CutPaste:
    config = {"pretrained": False, "weights": random_resnet18_weights}
    return models.create("cutpaste", **{**config, **overrides})


def small_images(n: int = 8) -> torch.Tensor:
    return toy_set(size=32, n_train=n, n_test_each=1).train


@pytest.fixture(scope="module")
def fitted(toy, random_resnet18_weights):
    detector = small(random_resnet18_weights)
    history = []

    def on_epoch_end(epoch: int, metrics: dict) -> bool:
        # The Gaussian is refitted after every epoch, so scoring mid-training works (what
        # validation-driven schedulers do).
        history.append((epoch, metrics, detector.predict(toy.test[:2]).score))
        return False

    stats = detector.fit(batches(toy.train), epochs=FIT_EPOCHS, on_epoch_end=on_epoch_end)
    return detector, stats, history, detector.predict(toy.test)


def test_detects_defects_at_image_level(toy, fitted):
    detector, _, _, prediction = fitted
    check_prediction(toy, prediction, localizes=False)
    assert not detector.training
    assert image_auroc(toy, prediction.score) >= 0.9
    assert (prediction.score >= 0).all()


def test_every_epoch_is_reported_with_a_cosine_learning_rate(fitted):
    _, stats, history, _ = fitted
    assert [epoch for epoch, _, _ in history] == list(range(1, FIT_EPOCHS + 1))
    for _, metrics, scores in history:
        assert set(metrics) == {"loss", "accuracy", "lr"}
        assert math.isfinite(metrics["loss"]) and 0 <= metrics["accuracy"] <= 1
        assert torch.isfinite(scores).all()
    # Cosine decay over the 2-epoch budget, stepped per epoch: 0.03, then 0.03 (1 + cos pi/2) / 2.
    assert [metrics["lr"] for _, metrics, _ in history] == pytest.approx([0.03, 0.015])
    # Three balanced classes: the untrained classifier starts near chance, ln 3.
    assert abs(history[0][1]["loss"] - math.log(3)) < 0.3
    last = history[-1][1]
    assert stats == {"epochs": FIT_EPOCHS, "loss": last["loss"], "accuracy": last["accuracy"]}


def test_the_self_supervised_classifier_learns(random_resnet18_weights):
    # Binary CutPaste on 8 small images with a one-layer head: enough updates in a few seconds
    # for the classifier to learn to spot pasted patches.
    images = small_images()
    detector = small(random_resnet18_weights, variant="binary", head_dims=(64,))
    history = []
    detector.fit([images], epochs=12, on_epoch_end=lambda e, m: history.append(m) or False)
    losses = [m["loss"] for m in history]
    accuracies = [m["accuracy"] for m in history]
    # (Seeds 0-3 end at 0.31-0.47 of the first epochs' loss and 83-94 % accuracy.)
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3])
    assert np.mean(accuracies[-3:]) > 0.75


def test_training_stops_when_the_callback_says_so(toy, random_resnet18_weights):
    detector = small(random_resnet18_weights, head_dims=(32,))
    calls = []
    stats = detector.fit(
        batches(small_images(4)), epochs=5, on_epoch_end=lambda e, m: calls.append(e) or e == 2
    )
    assert calls == [1, 2]
    assert stats["epochs"] == 2
    assert not detector.training


def test_same_seed_same_scores_and_another_seed_differs(toy, random_resnet18_weights):
    def run(seed: int) -> torch.Tensor:
        detector = small(random_resnet18_weights, seed=seed, head_dims=(32,))
        detector.fit([small_images(4)], epochs=1)
        return detector.predict(toy.test[:4]).score

    first = run(0)
    assert torch.equal(first, run(0))
    assert not torch.equal(first, run(1))


def test_state_dict_round_trip_keeps_what_was_learned(toy, fitted, random_resnet18_weights):
    detector, _, _, prediction = fitted
    restored = small(random_resnet18_weights, seed=5)
    assert "density.precision" in detector.state_dict()
    restored.load_state_dict(detector.state_dict())
    assert torch.allclose(restored.predict(toy.test).score, prediction.score)


def test_predict_runs_in_eval_mode_and_restores_the_mode(toy, fitted):
    detector, _, _, prediction = fitted
    detector.train()
    try:
        assert torch.equal(detector.predict(toy.test).score, prediction.score)
        assert detector.training
    finally:
        detector.eval()


def test_synthetic_views_differ_from_the_originals_only_where_pasted(toy, random_resnet18_weights):
    detector = small(random_resnet18_weights)
    images = toy.train[:4]
    views, labels = detector._synthesize(images, torch.Generator().manual_seed(0))
    assert views.shape == (12, 3, 64, 64)
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal(views[:4], images)
    for copy in (views[4:8], views[8:]):
        changed = (copy != images).any(dim=1)
        assert changed.flatten(1).any(dim=1).all(), "every copy has a pasted region"
        # A paste covers at most 15 % of the image (scars far less).
        assert changed.float().mean() < 0.15


def test_predict_before_fit_and_empty_training_set_are_errors(toy, random_resnet18_weights):
    detector = small(random_resnet18_weights, head_dims=(32,))
    with pytest.raises(ModelError, match="before fit"):
        detector.predict(toy.test[:2])
    with pytest.raises(ModelError, match="empty"):
        detector.fit([], epochs=1)


def test_patch_level_model_localises(toy, random_resnet18_weights):
    detector = small(
        random_resnet18_weights, localize=True, patch_size=16, patch_stride=8, blur_sigma=2.0
    )
    assert detector.localizes and not CutPaste.localizes
    detector.fit(batches(toy.train), epochs=FIT_EPOCHS)
    prediction = detector.predict(toy.test)
    check_prediction(toy, prediction, localizes=True)
    assert image_auroc(toy, prediction.score) >= 0.9
    assert pixel_auroc(toy, prediction.anomaly_map) >= 0.9
    with pytest.raises(ModelError, match="smaller than patch_size 16"):
        detector.predict(toy.test[:1, :, :12, :12])


def test_patch_scores_spread_over_the_pixels_they_cover():
    assert _positions(64, 16, 4) == list(range(0, 49, 4))
    # 50 - 16 = 34 is not a multiple of 8: a last patch flush with the border covers the edge.
    assert _positions(50, 16, 8) == [0, 8, 16, 24, 32, 34]
    assert _positions(16, 16, 4) == [0]
    cover = _coverage(50, 16, 8, torch.device("cpu"))
    assert cover.shape == (50, 6)
    assert (cover.sum(1) >= 1).all(), "every pixel is in some patch"
    assert cover.sum(0).tolist() == [16.0] * 6


def test_ledoit_wolf_matches_scikit_learn():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 8)) @ rng.normal(size=(8, 8))
    mean, covariance, shrinkage = ledoit_wolf(torch.from_numpy(x))
    reference = LedoitWolf().fit(x)
    assert shrinkage == pytest.approx(reference.shrinkage_)
    np.testing.assert_allclose(mean.numpy(), reference.location_)
    np.testing.assert_allclose(covariance.numpy(), reference.covariance_, rtol=1e-10)
    density = GaussianDensity(8)
    density.fit(torch.from_numpy(x).float())
    query = torch.from_numpy(rng.normal(size=(5, 8)))
    expected = reference.mahalanobis(query.numpy()) ** 0.5
    np.testing.assert_allclose(density(query).numpy(), expected, rtol=1e-5)


def test_a_degenerate_training_set_still_gives_finite_distances():
    density = GaussianDensity(4)
    density.fit(torch.ones(3, 4))
    distances = density(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]]))
    assert torch.isfinite(distances).all()
    assert distances[0] == 0 and distances[1] > 0


def test_parameters_are_all_trained(random_resnet18_weights):
    detector = small(random_resnet18_weights)
    trainable, frozen = detector.param_counts()
    assert frozen == 0
    backbone = sum(p.numel() for p in detector.backbone.parameters())
    assert 11.0e6 < backbone < 11.3e6  # resnet18 without its classifier
    # Projection head: 512 -> 8 x 512 (linear + batch norm) -> 128, and a 3-way classifier.
    head = 8 * (512 * 512 + 512 + 2 * 512) + 512 * 128 + 128 + 128 * 3 + 3
    assert trainable == backbone + head


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"variant": "4way"}, "variant must be one of binary, scar, 3way"),
        ({"embedding": "logits"}, "embedding must be one of head, pooled"),
        ({"head_dims": ()}, "head_dims must be a non-empty sequence"),
        ({"head_dims": (512, 0)}, "head_dims must be a non-empty sequence"),
        ({"lr": 0}, "lr must be > 0"),
        ({"momentum": -0.1}, "momentum must be >= 0"),
        ({"weight_decay": float("nan")}, "weight_decay must be >= 0"),
        ({"epochs": 0}, "epochs must be a positive int"),
        ({"localize": "yes"}, "localize must be True or False"),
        ({"patch_size": 4}, "patch_size must be an int >= 8"),
        ({"patch_stride": 0}, "patch_stride must be a positive int"),
        ({"blur_sigma": -1}, "blur_sigma must be >= 0"),
    ],
)
def test_bad_hyperparameters_are_model_errors(random_resnet18_weights, overrides, message):
    with pytest.raises(ModelError, match=f"cutpaste: {message}"):
        small(random_resnet18_weights, **overrides)


def test_bad_fit_epochs_is_a_model_error(toy, random_resnet18_weights):
    with pytest.raises(ModelError, match="fit epochs must be a positive int"):
        small(random_resnet18_weights, head_dims=(32,)).fit(batches(toy.train[:2]), epochs=0)


def test_defaults_are_the_papers():
    defaults = hyperparameters("cutpaste")
    assert defaults["backbone"] == "resnet18"
    assert defaults["variant"] == "3way"
    assert tuple(defaults["head_dims"]) == (512,) * 8 + (128,)
    assert defaults["embedding"] == "head"
    assert (defaults["lr"], defaults["momentum"], defaults["weight_decay"]) == (0.03, 0.9, 3e-5)
    assert defaults["epochs"] == 256
    assert defaults["localize"] is False
    assert (defaults["patch_size"], defaults["patch_stride"]) == (64, 4)
    assert defaults["pretrained"] is True
    assert CutPaste.learning_type == "iterative"
    assert CutPaste.localizes is False


def test_backbone_constraints():
    assert backbone_problem("cutpaste", "resnet18") is None
    assert backbone_problem("cutpaste", "efficientnet_b0") is None
    vit = backbone_problem("cutpaste", "vit_base_patch16_224")
    assert vit is not None and "cnn" in vit
    too_small = backbone_problem("cutpaste", "resnet18", {"localize": True}, 48)
    assert too_small is not None and "patch_size" in too_small
    assert backbone_problem("cutpaste", "resnet18", {"localize": False}, 48) is None
    assert (
        backbone_problem("cutpaste", "resnet18", {"localize": True, "patch_size": 32}, 48) is None
    )
    with pytest.raises(ModelError, match="vit_base_patch16_224"):
        models.create("cutpaste", backbone="vit_base_patch16_224", pretrained=False)
