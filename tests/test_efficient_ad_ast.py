"""EfficientAD-AST on the toy defect set (CPU, random-init resnet18, small networks)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from toy_defects import batches, check_prediction, image_auroc, pixel_auroc, toy_set

import models
import models.efficient_ad_ast  # registers "efficient_ad_ast" until models/__init__ imports it
from models.components.flows import AffineCoupling, SequentialFlow
from models.errors import ModelError

# resnet18's layer2 gives an 8 x 8 grid at 64 px; small teacher, student and few epochs. The
# flow teacher gets a 10x learning rate so that its 20 steps move its NLL (from about +1 to about
# -220 per position); image AUROC is then 1.0 and pixel AUROC 0.98 for seeds 0 and 1.
SMALL = {
    "backbone": "resnet18",
    "layers": ("layer2",),
    "pretrained": False,
    "n_coupling_blocks": 2,
    "teacher_hidden_channels": 32,
    "teacher_lr": 2e-3,
    "teacher_epochs": 10,
    "student_hidden_channels": 64,
    "n_student_blocks": 1,
}
FIT_EPOCHS = 3


def create(**overrides) -> models.Detector:
    return models.create("efficient_ad_ast", **{**SMALL, **overrides})


@pytest.fixture(scope="module")
def toy():
    return toy_set()


@pytest.fixture(scope="module")
def fitted(toy):
    seen: list[tuple[int, dict]] = []
    detector = create(seed=0)
    stats = detector.fit(
        batches(toy.train), epochs=FIT_EPOCHS, on_epoch_end=lambda e, m: seen.append((e, m))
    )
    return detector, stats, seen, detector.predict(toy.test)


def test_detects_and_localises_the_toy_defects(toy, fitted):
    _, stats, _, prediction = fitted
    check_prediction(toy, prediction, localizes=True)
    assert image_auroc(toy, prediction.score) >= 0.9
    assert pixel_auroc(toy, prediction.anomaly_map) >= 0.9
    assert stats["epochs"] == FIT_EPOCHS and stats["teacher_epochs"] == 10
    assert math.isfinite(stats["teacher_nll"])
    assert any("ImageNet penalty is dropped" in note for note in stats["notes"])


def test_reports_every_student_epoch_with_falling_loss(fitted):
    seen = fitted[2]
    assert [e for e, _ in seen] == [1, 2, 3]
    for _, metrics in seen:
        assert set(metrics) == {"loss", "loss_st", "loss_ae", "loss_stae"}
        assert all(math.isfinite(v) for v in metrics.values())
    losses = [metrics["loss"] for _, metrics in seen]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.9 * losses[0]


def test_stops_when_told(toy):
    calls: list[int] = []
    detector = create(teacher_epochs=1, epochs=40)
    stats = detector.fit([toy.train[:4]], on_epoch_end=lambda e, m: calls.append(e) or e == 2)
    assert calls == [1, 2] and stats["epochs"] == 2


def test_can_be_scored_between_epochs(toy):
    # An ASHA study on a validation metric scores the detector from on_epoch_end
    # (sweep/run/trainable.py), from the first student epoch on.
    test = toy.test[:4]
    detector = create(teacher_epochs=1, seed=0)
    scored: list[tuple[int, models.Prediction]] = []

    def score(epoch: int, metrics: dict) -> bool:
        scored.append((epoch, detector.predict(test)))
        return False

    detector.fit([toy.train[:4]], epochs=2, on_epoch_end=score)
    assert [epoch for epoch, _ in scored] == [1, 2]
    for _, prediction in scored:
        assert torch.isfinite(prediction.score).all()
        assert torch.isfinite(prediction.anomaly_map).all()
        assert prediction.anomaly_map.shape == test.shape[:1] + test.shape[2:]
    assert not torch.equal(scored[0][1].score, scored[1][1].score)
    # Scoring leaves the training alone: the last epoch's scores are the fitted detector's.
    assert not detector.training
    assert torch.equal(detector.predict(test).score, scored[1][1].score)
    quiet = create(teacher_epochs=1, seed=0)
    quiet.fit([toy.train[:4]], epochs=2)
    assert torch.equal(quiet.predict(test).score, scored[1][1].score)


def test_flow_teacher_is_built_from_the_shared_coupling_blocks(toy, fitted):
    detector = fitted[0]
    assert isinstance(detector.teacher, SequentialFlow)
    blocks = list(detector.teacher.blocks)
    assert len(blocks) == 2 and all(isinstance(b, AffineCoupling) for b in blocks)
    assert blocks[0].condition_channels == [32]
    # Trained by likelihood: the normal features' NLL is far below the untrained flow's (the
    # identity, whose NLL is 0.5 |x|^2 per position), and agrees with what fit reported.
    with torch.no_grad():
        features, encoding = detector.features(toy.train)
        latents, log_det = detector.teacher_latents(features, encoding)
    trained = (0.5 * latents.square().sum(1) - log_det).mean()
    untrained = (0.5 * features.square().sum(1)).mean()
    assert trained < untrained - 20
    assert trained == pytest.approx(fitted[1]["teacher_nll"], rel=0.2)
    # The teacher is invertible: its inverse recovers the features.
    with torch.no_grad():
        back, _ = detector.teacher(latents, encoding, reverse=True)
    assert torch.allclose(back, features, atol=1e-4)


def test_trainable_and_frozen_parts(fitted):
    detector = fitted[0]
    assert not any(p.requires_grad for p in detector.extractor.parameters())
    for part in (detector.teacher, detector.student, detector.autoencoder):
        assert all(p.requires_grad for p in part.parameters())
    trainable, frozen = detector.param_counts()
    assert frozen == sum(p.numel() for p in detector.extractor.parameters())
    assert trainable == sum(
        p.numel()
        for part in (detector.teacher, detector.student, detector.autoencoder)
        for p in part.parameters()
    )
    assert not detector.training


def test_same_seed_same_scores_and_global_rng_untouched(toy):
    small = [toy.train[:4]]
    state = torch.random.get_rng_state()
    first = create(seed=5, teacher_epochs=1)
    first.fit([{"image": small[0]}], epochs=1)
    assert torch.equal(state, torch.random.get_rng_state())
    second = create(seed=5, teacher_epochs=1)
    second.fit(small, epochs=1)
    a, b = first.predict(toy.test[:4]), second.predict(toy.test[:4])
    assert torch.equal(a.score, b.score) and torch.equal(a.anomaly_map, b.anomaly_map)
    other = create(seed=6, teacher_epochs=1)
    other.fit(small, epochs=1)
    assert not torch.equal(other.predict(toy.test[:4]).score, a.score)


def test_state_dict_round_trip(toy, fitted):
    detector, *_, prediction = fitted
    copy = create(seed=1)
    copy.load_state_dict(detector.state_dict())
    assert torch.allclose(copy.predict(toy.test).score, prediction.score)


def test_predict_before_fit_and_empty_training_set_are_errors(toy):
    detector = create()
    with pytest.raises(ModelError, match="before fit"):
        detector.predict(toy.test[:1])
    with pytest.raises(ModelError, match="empty"):
        detector.fit([], epochs=1)


def test_imagenet_penalty_from_a_local_folder(tmp_path, toy):
    rng = np.random.default_rng(0)
    for i in range(2):
        cv2.imwrite(str(tmp_path / f"{i}.jpg"), rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    small = [toy.train[:4]]
    detector = create(teacher_epochs=1, imagenet_dir=str(tmp_path))
    stats = detector.fit(small, epochs=1)
    assert stats["notes"] == []
    plain = create(teacher_epochs=1)
    plain.fit(small, epochs=1)
    assert not torch.equal(detector.student.conv_in.weight, plain.student.conv_in.weight)


def test_feature_autoencoder_keeps_any_grid():
    ae = models.efficient_ad_ast.FeatureAutoencoder(40, 24)
    for side in (2, 8, 24, 40):
        with torch.no_grad():
            assert ae(torch.zeros(2, 40, side, side + 1)).shape == (2, 24, side, side + 1)


def test_defaults_are_the_thesis_and_ast_values():
    defaults = models.hyperparameters("efficient_ad_ast")
    assert defaults["backbone"] == "efficientnet_b5" and defaults["layers"] == ("layer4",)
    assert defaults["pos_enc_dim"] == 32
    assert defaults["n_coupling_blocks"] == 4 and defaults["teacher_hidden_channels"] == 64
    assert defaults["clamp"] == 3.0
    assert defaults["teacher_lr"] == 2e-4 and defaults["teacher_epochs"] == 240
    assert defaults["student_hidden_channels"] == 1024 and defaults["n_student_blocks"] == 4
    assert defaults["lr"] == 2e-4 and defaults["weight_decay"] == 1e-5
    assert defaults["epochs"] == 100 and defaults["hard_quantile"] == 0.0
    assert defaults["imagenet_dir"] is None
    assert models.get_class("efficient_ad_ast").learning_type == "iterative"


def test_backbone_constraints():
    problem = models.backbone_problem
    assert problem("efficient_ad_ast", "resnet18", {"layers": ("layer2",)}, 64) is None
    assert problem("efficient_ad_ast", "efficientnet_b5", None, 256) is None
    assert (
        problem("efficient_ad_ast", "vit_base_patch16_224", {"layers": ("blocks.8",)}, 224) is None
    )
    assert "no layer" in problem("efficient_ad_ast", "resnet18", {"layers": ("layer9",)})
    assert "composite" in problem("efficient_ad_ast", "mcait")
    with pytest.raises(ModelError, match="cannot use backbone 'mcait'"):
        models.create("efficient_ad_ast", backbone="mcait", pretrained=False)


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"pos_enc_dim": 30}, "pos_enc_dim"),
        ({"pos_enc_dim": 0}, "pos_enc_dim"),
        ({"n_coupling_blocks": 0}, "n_coupling_blocks"),
        ({"teacher_hidden_channels": -1}, "teacher_hidden_channels"),
        ({"clamp": 0}, "clamp"),
        ({"teacher_lr": -1e-4}, "teacher_lr"),
        ({"teacher_epochs": 0}, "teacher_epochs"),
        ({"student_hidden_channels": 0}, "student_hidden_channels"),
        ({"n_student_blocks": -1}, "n_student_blocks"),
        ({"lr": 0}, "lr"),
        ({"weight_decay": -1}, "weight_decay"),
        ({"epochs": 1.5}, "epochs"),
        ({"hard_quantile": 1}, "hard_quantile"),
        ({"imagenet_dir": "/no/such/folder"}, "imagenet_dir"),
    ],
)
def test_bad_hyperparameters_are_errors(hparams, message):
    with pytest.raises(ModelError, match=rf"^efficient_ad_ast: {message}"):
        create(**hparams)
