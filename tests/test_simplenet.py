"""SimpleNet on the toy defect set (CPU, random-init ResNet18)."""

from __future__ import annotations

import math

import pytest
import torch
from toy_defects import batches, check_prediction, image_auroc, pixel_auroc, toy_set

import models
import models.simplenet  # registers "simplenet" (until models/__init__.py imports it)
from models.backbones import meta_init
from models.base import backbone_problem
from models.errors import ModelError
from models.simplenet import patch_embedding

# The paper's noise_std (0.015) is small next to the spread of pretrained features, and its 160
# epochs give the discriminator thousands of steps to learn such a tight boundary. A 20-epoch run
# on 16 toy images (80 steps) leaves the discriminator at the trivial all-zero output at that
# noise (loss stuck near 2 x margin), so this test synthesises coarser anomalies. The embedding:
# resnet18's layer2 + layer3 3x3 patches (9 x 128 values, kept; 9 x 256, pooled to 1536),
# 2688 values pooled to 1536, with a per-dimension std of 0.20 here (0.26 once adapted). With
# noise_std 0.1 the loss falls to a seventh of its start or less and image AUROC is 1.0 for seeds
# 0, 1 and 2 (pixel AUROC 0.82, 0.92, 0.81); 0.05 leaves the discriminator undecided (pixel 0.60).
CONFIG = {"backbone": "resnet18", "noise_std": 0.1}
EPOCHS = 20
BATCH = 4


def fit(seed: int = 0, epochs: int = EPOCHS, images: torch.Tensor | None = None, **overrides):
    detector = models.create("simplenet", pretrained=False, seed=seed, **{**CONFIG, **overrides})
    train = toy_set().train if images is None else images
    history: list[tuple[int, dict]] = []
    stats = detector.fit(
        batches(train, BATCH),
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
    assert pixel_auroc(toy, prediction.anomaly_map) >= 0.7


def test_image_score_is_the_top_patch_score(fitted, toy, prediction):
    # Patch scores are negated discriminator outputs; the map blurs them, the score does not.
    detector = fitted[0]
    with torch.no_grad():
        adapted, (batch, height, width) = detector._adapted(toy.test[:4])
        patch_scores = -detector.discriminator(adapted).view(batch, height * width)
    assert torch.allclose(prediction.score[:4], patch_scores.max(1).values)


def test_reports_every_epoch_and_learns_to_separate(fitted):
    _, stats, history = fitted
    assert [epoch for epoch, _ in history] == list(range(1, EPOCHS + 1))
    losses = [metrics["loss"] for _, metrics in history]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.75 * losses[0]
    for _, metrics in history:
        assert 0.0 <= metrics["p_true"] <= 1.0 and 0.0 <= metrics["p_fake"] <= 1.0
    first, last = history[0][1], history[-1][1]
    assert last["p_true"] + last["p_fake"] > first["p_true"] + first["p_fake"]
    assert stats["epochs"] == EPOCHS
    assert stats["loss"] == losses[-1]
    assert stats["embed_dim"] == 1536


def test_stops_when_told_defaults_to_the_constructor_budget_and_scores_between_epochs(toy):
    detector = models.create("simplenet", pretrained=False, epochs=3, **CONFIG)
    seen, scores = [], []

    def on_epoch_end(epoch: int, metrics: dict) -> bool:
        # A scheduler scores the validation split mid-training (sweep/run/trainable.py).
        seen.append(epoch)
        detector.eval()
        scores.append(detector.predict(toy.test[:2]).score)
        detector.train()
        return epoch == 2

    stats = detector.fit(batches(toy.train[:4], BATCH), on_epoch_end=on_epoch_end)
    assert seen == [1, 2] and stats["epochs"] == 2
    assert all(torch.isfinite(s).all() for s in scores)
    assert not detector.training

    seen.clear()
    detector.fit(batches(toy.train[:4], BATCH), on_epoch_end=lambda e, m: seen.append(e) or False)
    assert seen == [1, 2, 3]


def test_same_seed_same_scores_another_seed_differs(toy):
    short = {"epochs": 2, "images": toy.train[:8]}
    state = torch.random.get_rng_state()
    first = fit(seed=0, **short)[0].predict(toy.test)
    again = fit(seed=0, **short)[0].predict(toy.test)
    # The noise comes from a generator seeded by `seed`, never from the global one.
    assert torch.equal(state, torch.random.get_rng_state())
    assert torch.equal(first.score, again.score)
    assert torch.equal(first.anomaly_map, again.anomaly_map)
    other = fit(seed=1, **short)[0].predict(toy.test)
    assert not torch.equal(first.score, other.score)


def test_state_dict_round_trip(fitted, toy, prediction):
    fresh = models.create("simplenet", pretrained=False, seed=5, **CONFIG)
    fresh.load_state_dict(fitted[0].state_dict())
    restored = fresh.predict(toy.test)
    assert torch.equal(restored.score, prediction.score)
    assert torch.equal(restored.anomaly_map, prediction.anomaly_map)


def test_only_adaptor_and_discriminator_learn(fitted):
    detector = fitted[0]
    assert not any(p.requires_grad for p in detector.extractor.parameters())
    backbone = sum(p.numel() for p in detector.extractor.parameters())
    # One 1536 x 1536 linear adaptor; a 1536 -> 1024 layer with batch norm, a bias-free 1024 -> 1.
    adaptor = 1536 * 1536 + 1536
    discriminator = 1536 * 1024 + 1024 + 2 * 1024 + 1024
    assert detector.param_counts() == (adaptor + discriminator, backbone)
    untrained = models.create("simplenet", pretrained=False, **CONFIG)
    frozen_before = untrained.extractor.state_dict()
    for name, value in detector.extractor.state_dict().items():
        assert torch.equal(value, frozen_before[name]), name
    for part in ("adaptor", "discriminator"):
        before = getattr(untrained, part).state_dict()
        after = getattr(detector, part).state_dict()
        assert any(not torch.equal(after[k], before[k]) for k in before), part


def _adaptive_mean(vectors: torch.Tensor, size: int) -> torch.Tensor:
    """Adaptive average pooling of the last dimension, written out: output ``i`` is the mean of
    inputs ``floor(i L / size)`` to ``ceil((i + 1) L / size) - 1``."""
    length = vectors.shape[-1]
    bins = [
        vectors[..., (i * length) // size : -((-(i + 1) * length) // size)].mean(-1)
        for i in range(size)
    ]
    return torch.stack(bins, dim=-1)


def _unfolded(feature: torch.Tensor) -> torch.Tensor:
    """``B x C x h x w`` -> ``B x h x w x 9C``: each position's zero-padded 3x3 window, ordered
    channel, then window row, then window column (``torch.nn.Unfold``'s order)."""
    height, width = feature.shape[-2:]
    padded = torch.nn.functional.pad(feature, (1, 1, 1, 1))
    shifts = [padded[..., i : i + height, j : j + width] for i in range(3) for j in range(3)]
    return torch.stack(shifts, dim=2).flatten(1, 2).permute(0, 2, 3, 1)


def test_patch_embedding_by_hand():
    # The official code's construction on numbers small enough to follow: a 1-channel 2 x 2
    # layer and a 2-channel 1 x 1 layer, each pooled to 3 values per patch, 3 in the end.
    shallow = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    deep = torch.tensor([6.0, 12.0]).view(1, 2, 1, 1)
    embedding = patch_embedding([shallow, deep], (3, 3), 3, patch_size=3)
    # Position (0, 0): window rows (0 0 0), (0 1 2), (0 3 4); 9 values -> 3, a mean per row:
    # 0, 1, 7/3. The deep layer's windows are zero but for their centre: (0 0 0 0 6 0 | 0 0 0)
    # (0 0 0 | 0 12 0 0 0 0), 18 values -> 3 means of 6: 1, 0, 2, the same at every position
    # once resized to 2 x 2. Both layers, 6 values -> 3 means of 2.
    third = 7.0 / 3.0
    expected = {
        (0, 0): [(0 + 1) / 2, (third + 1) / 2, (0 + 2) / 2],
        (0, 1): [(0 + 1) / 2, (third + 1) / 2, (0 + 2) / 2],  # rows (0 0 0) (1 2 0) (3 4 0)
        (1, 0): [(1 + third) / 2, (0 + 1) / 2, (0 + 2) / 2],  # rows (0 1 2) (0 3 4) (0 0 0)
        (1, 1): [(1 + third) / 2, (0 + 1) / 2, (0 + 2) / 2],
    }
    assert embedding.shape == (1, 3, 2, 2)
    for (row, column), values in expected.items():
        torch.testing.assert_close(embedding[0, :, row, column], torch.tensor(values))


def test_patch_features_follow_the_official_construction(toy):
    # The official code (and GLASS's, anomalib's port of it): each layer's 3x3 patches
    # unfolded with zero padding, the deeper layer's resized bilinearly to the first grid,
    # each layer's patch vector average-pooled to pretrain_embed_dimension, the layers'
    # vectors concatenated and pooled to target_embed_dimension. Bins of uneven length here:
    # resnet18's 9 x 128 and 9 x 256 values -> 1000 each, 2000 -> 700.
    detector = models.create(
        "simplenet",
        pretrained=False,
        backbone="resnet18",
        pretrain_embed_dimension=1000,
        target_embed_dimension=700,
    )
    images = toy.test[:2]
    with torch.no_grad():
        raw = list(detector.extractor(images).values())
        features = detector.patch_features(images)
    grid = raw[0].shape[-2:]
    layers = []
    for feature in raw:
        patches = _unfolded(feature).permute(0, 3, 1, 2)
        patches = torch.nn.functional.interpolate(
            patches, size=grid, mode="bilinear", align_corners=False
        )
        layers.append(_adaptive_mean(patches.permute(0, 2, 3, 1), 1000))
    expected = _adaptive_mean(torch.cat(layers, dim=-1), 700).permute(0, 3, 1, 2)
    assert features.shape == (2, 700, 8, 8)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)


def test_paper_model_size():
    # wide_resnet50_2 layer2 + layer3: 9 x 512 and 9 x 1024 patch values, 1536 each, 1536 in all.
    with meta_init():
        detector = models.create("simplenet", pretrained=False)
    assert detector.layer_dims == (1536, 1536)
    assert detector.embed_dim == 1536
    trainable, frozen = detector.param_counts()
    assert trainable == (1536 * 1536 + 1536) + (1536 * 1024 + 1024 + 2 * 1024 + 1024)
    assert round(frozen / 1e6, 1) == 24.9  # Table 2's figure for the truncated WideResNet50


def test_embedding_dimension_is_pooled_down_never_up(toy):
    smaller = models.create("simplenet", pretrained=False, target_embed_dimension=100, **CONFIG)
    with torch.no_grad():
        features = smaller.patch_features(toy.test[:2])
    # 64 px at stride 8 (layer2) gives an 8 x 8 grid.
    assert features.shape == (2, 100, 8, 8)
    # Without the 3x3 window resnet18's layers have 128 and 256 values, fewer than 1536: they
    # are kept as they are, and so are their 384 together, each time with a note.
    capped = models.create("simplenet", pretrained=False, patch_size=1, **CONFIG)
    assert capped.layer_dims == (128, 256) and capped.embed_dim == 384
    with torch.no_grad():
        features = capped.patch_features(toy.test[:2])
        raw = list(capped.extractor(toy.test[:2]).values())
    expected = torch.cat(
        [raw[0], torch.nn.functional.interpolate(raw[1], size=(8, 8), mode="bilinear")], dim=1
    )
    torch.testing.assert_close(features, expected)
    notes = capped.fit(batches(toy.train[:4], BATCH), epochs=1)["notes"]
    assert len(notes) == 3
    assert "128 values" in notes[0] and "256 values" in notes[1] and "384" in notes[2]
    # With the 3x3 window (1152 and 2304 values) both can be pooled to 1000, and 2000 to 1000.
    pooled = models.create(
        "simplenet",
        pretrained=False,
        pretrain_embed_dimension=1000,
        target_embed_dimension=1000,
        **CONFIG,
    )
    assert pooled.layer_dims == (1000, 1000) and pooled.embed_dim == 1000
    assert "notes" not in pooled.fit(batches(toy.train[:4], BATCH), epochs=1)


def test_without_adaptor_the_discriminator_reads_the_features(toy):
    detector = models.create("simplenet", pretrained=False, pre_proj=0, **CONFIG)
    assert len(detector.adaptor) == 0
    stats = detector.fit(batches(toy.train[:4], BATCH), epochs=1)
    assert math.isfinite(stats["loss"])
    assert torch.isfinite(detector.predict(toy.test[:2]).score).all()


def test_predict_before_fit_and_empty_training_set_are_errors(toy):
    detector = models.create("simplenet", pretrained=False, **CONFIG)
    with pytest.raises(ModelError, match="before fit"):
        detector.predict(toy.test[:2])
    with pytest.raises(ModelError, match="empty"):
        detector.fit([], epochs=1)


@pytest.mark.parametrize(
    "bad",
    [
        {"pretrain_embed_dimension": 0},
        {"target_embed_dimension": 0},
        {"patch_size": 2},
        {"patch_size": 0},
        {"pre_proj": -1},
        {"noise_std": 0.0},
        {"noise_std": float("nan")},
        {"dsc_layers": 0},
        {"dsc_hidden": 1.5},
        {"dsc_margin": -0.5},
        {"adaptor_lr": 0},
        {"dsc_lr": -1e-4},
        {"weight_decay": -1e-5},
        {"epochs": 0},
        {"epochs": True},
        {"blur_sigma": -1.0},
    ],
)
def test_bad_hyperparameters_are_errors(bad):
    name, value = next(iter(bad.items()))
    with pytest.raises(ModelError, match=rf"^simplenet: {name} must .*got {value!r}"):
        models.create("simplenet", pretrained=False, **{**CONFIG, **bad})


def test_bad_fit_epochs_are_an_error(toy):
    detector = models.create("simplenet", pretrained=False, **CONFIG)
    with pytest.raises(ModelError, match="simplenet: fit epochs"):
        detector.fit(batches(toy.train[:4]), epochs=0)


def test_defaults_are_the_reference_study_and_paper_values():
    hparams = models.hyperparameters("simplenet")
    # Table B.8: WideResNet50, layer2 + layer3 (its batch 8 and 288 px are the study's settings);
    # the rest is the paper's section 4.1 (and its 160 epochs).
    assert hparams["backbone"] == "wide_resnet50_2"
    assert tuple(hparams["layers"]) == ("layer2", "layer3")
    assert hparams["pretrain_embed_dimension"] == 1536
    assert hparams["target_embed_dimension"] == 1536
    assert hparams["patch_size"] == 3
    assert hparams["pre_proj"] == 1
    assert hparams["noise_std"] == 0.015
    assert hparams["dsc_layers"] == 2 and hparams["dsc_hidden"] == 1024
    assert hparams["dsc_margin"] == 0.5
    assert hparams["adaptor_lr"] == 1e-4 and hparams["dsc_lr"] == 2e-4
    assert hparams["weight_decay"] == 1e-5
    assert hparams["epochs"] == 160
    assert hparams["blur_sigma"] == 4.0
    cls = models.get_class("simplenet")
    assert cls.learning_type == "iterative" and cls.localizes


def test_backbone_constraints():
    assert backbone_problem("simplenet", "resnet18") is None
    assert backbone_problem("simplenet", "wide_resnet50_2", None, 288) is None
    # Transformer token maps are not what the method was built on: CNN features only.
    assert "cnn" in backbone_problem("simplenet", "vit_base_patch16_224")
    assert "layer5" in backbone_problem("simplenet", "resnet18", {"layers": ("layer5",)})
    with pytest.raises(ModelError, match="simplenet"):
        models.create("simplenet", backbone="deit_base_distilled_patch16_384", pretrained=False)
