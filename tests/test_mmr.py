"""MMR on the toy defect set (CPU, no pretrained weights, a tiny ViT).

The target CNN is one fixed random resnet18 (seed 0) loaded from a local file (the ``weights=``
path). It keeps its residual branches live, as ``FeatureExtractor`` now does for any frozen
random ResNet: timm zero-initialises the last batch norm of every residual block, so its
untrained ``layer2``/``layer3`` are strided 1x1 projections of the stem that see ~11 px windows
every 8 or 16 px and miss most of a defect (image AUROC stays near 0.7 with them). With live
residual branches, 10 epochs of a 2-block, 64-dim ViT give image AUROC 1.0 and pixel AUROC ~0.88.
``patch_size=8`` makes the pyramid go both ways: up for ``layer1`` (stride 4), down for
``layer3`` (stride 16).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from toy_defects import batches, check_prediction, image_auroc, pixel_auroc, toy_set

import models
from models.backbones import BACKBONES, BackboneSpec
from models.base import backbone_problem, hyperparameters
from models.errors import ModelError
from models.mmr import MMR, sincos_position_embedding

FIT_EPOCHS = 10
TINY = {
    "backbone": "resnet18",
    "pretrained": False,
    "patch_size": 8,
    "vit_embed_dim": 64,
    "vit_depth": 2,
    "vit_heads": 2,
    "lr": 0.005,
    "warmup_epochs": 1,
}


@pytest.fixture(scope="module")
def toy():
    return toy_set()


def small(random_resnet18_weights: str, **overrides) -> MMR:
    return models.create("mmr", **{**TINY, "weights": random_resnet18_weights, **overrides})


@pytest.fixture(scope="module")
def fitted(toy, random_resnet18_weights):
    detector = small(random_resnet18_weights)
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
    assert pixel_auroc(toy, prediction.anomaly_map) >= 0.8


def test_every_epoch_is_reported_the_loss_falls_and_the_rate_warms_up_then_decays(fitted):
    _, stats, history, _ = fitted
    assert [epoch for epoch, _ in history] == list(range(1, FIT_EPOCHS + 1))
    losses = [metrics["loss"] for _, metrics in history]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.8 * losses[0]
    assert {k: stats[k] for k in ("epochs", "loss")} == {"epochs": FIT_EPOCHS, "loss": losses[-1]}
    # The row says that the ViT was not MAE's.
    assert stats["parts"] == {"vit": "random init"}
    assert "random initialisation" in stats["notes"][0]
    rates = [metrics["lr"] for _, metrics in history]
    # One warmup epoch reaches the peak; a half cosine then falls towards zero.
    assert rates[0] == pytest.approx(TINY["lr"])
    assert rates[1] == pytest.approx(TINY["lr"])
    assert all(later < earlier for earlier, later in itertools.pairwise(rates[1:]))
    assert rates[-1] < 0.05 * TINY["lr"]


def test_warmup_is_linear(random_resnet18_weights):
    detector = small(random_resnet18_weights, warmup_epochs=4)
    assert [detector._learning_rate(e, 10) for e in (1, 2, 4)] == pytest.approx(
        [0.25 * TINY["lr"], 0.5 * TINY["lr"], TINY["lr"]]
    )


def test_training_stops_when_the_callback_says_so(toy, random_resnet18_weights):
    detector = small(random_resnet18_weights)
    calls = []
    stats = detector.fit(
        batches(toy.train[:4]), epochs=5, on_epoch_end=lambda e, m: calls.append(e) or e == 2
    )
    assert calls == [1, 2]
    assert stats["epochs"] == 2
    assert not detector.training


def test_same_seed_same_scores_and_another_seed_differs(toy, random_resnet18_weights):
    def run(seed: int):
        detector = small(random_resnet18_weights, seed=seed)
        detector.fit(batches(toy.train[:4]), epochs=2)
        return detector.predict(toy.test[:2])

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first.score, again.score)
    assert torch.equal(first.anomaly_map, again.anomaly_map)
    assert not torch.equal(first.score, other.score)


def test_masking_hides_patches_completely(toy, random_resnet18_weights):
    detector = small(random_resnet18_weights, mask_ratio=0.4).eval()
    images = toy.test[:2]
    keep = detector._keep_indices(images, torch.Generator().manual_seed(0))
    n_patches = (64 // 8) ** 2
    assert keep.shape == (2, int(n_patches * 0.6))
    assert not torch.equal(keep[0].sort().values, keep[1].sort().values)
    hidden = sorted(set(range(n_patches)) - set(keep[0].tolist()))[0]
    row, col = divmod(hidden, 64 // 8)
    changed = images.clone()
    changed[0, :, row * 8 : (row + 1) * 8, col * 8 : (col + 1) * 8] = 5.0
    with torch.no_grad():
        before = detector.vit(images, keep)
        after = detector.vit(changed, keep)
        unmasked = detector.vit(changed)
    # The encoder never sees a hidden patch: nothing downstream depends on its pixels.
    assert torch.equal(before, after)
    assert not torch.equal(detector.vit(images).detach(), unmasked)


def test_position_embedding_is_maes_sine_cosine():
    embedding = sincos_position_embedding(8, 2, 3)
    assert embedding.shape == (6, 8)
    # Position (row 0, column 0): sines 0, cosines 1.
    assert torch.equal(embedding[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    # Row 1, column 2 (index 5): the first half encodes the column, the second the row, at
    # frequencies 1 and 1/100 (10000 ** -(i / 2)).
    column = [math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)]
    row = [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]
    assert embedding[5].tolist() == pytest.approx(column + row, abs=1e-6)


def test_state_dict_round_trip_keeps_what_was_learned(toy, fitted, random_resnet18_weights):
    detector, _, _, prediction = fitted
    restored = small(random_resnet18_weights, seed=5)
    restored.load_state_dict(detector.state_dict())
    restored.eval()
    again = restored.predict(toy.test)
    assert torch.allclose(again.score, prediction.score)
    assert torch.allclose(again.anomaly_map, prediction.anomaly_map)


def test_vit_weights_load_from_an_mae_style_checkpoint(random_resnet18_weights, tmp_path):
    source = small(random_resnet18_weights, seed=1)
    state = {k: v for k, v in source.vit.state_dict().items() if k != "mask_token"}
    # An MAE checkpoint also holds a position embedding and its pixel decoder; both are ignored.
    state["pos_embed"] = torch.zeros(1, 65, 64)
    state["decoder_embed.weight"] = torch.zeros(32, 64)
    path = tmp_path / "mae.pth"
    torch.save({"model": state}, path)
    loaded = small(random_resnet18_weights, seed=2, vit_weights=str(path))
    for key, value in source.vit.state_dict().items():
        if key != "mask_token":
            assert torch.equal(loaded.vit.state_dict()[key], value), key
    with pytest.raises(ModelError, match="does not fit a ViT"):
        small(random_resnet18_weights, vit_weights=str(path), vit_embed_dim=32)
    with pytest.raises(ModelError, match="does not exist"):
        small(random_resnet18_weights, vit_weights=str(tmp_path / "missing.pth"))


def test_predict_before_fit_and_empty_training_set_are_errors(toy, random_resnet18_weights):
    detector = small(random_resnet18_weights)
    with pytest.raises(ModelError, match="before fit"):
        detector.predict(toy.test[:2])
    with pytest.raises(ModelError, match="empty"):
        detector.fit([], epochs=1)


def test_parameters_are_the_vit_and_pyramid_and_the_cnn_is_frozen(random_resnet18_weights):
    detector = small(random_resnet18_weights)
    trainable, frozen = detector.param_counts()
    learned = sum(p.numel() for p in (*detector.vit.parameters(), *detector.pyramid.parameters()))
    assert trainable == learned
    assert frozen == sum(p.numel() for p in detector.teacher.parameters())
    assert all(not p.requires_grad for p in detector.teacher.parameters())


def test_odd_input_size_gives_maps_of_input_size(toy, fitted):
    detector, _, _, _ = fitted
    images = torch.nn.functional.interpolate(toy.test[:2], size=(44, 60), mode="bilinear")
    prediction = detector.predict(images)
    assert prediction.anomaly_map.shape == (2, 44, 60)
    assert torch.isfinite(prediction.anomaly_map).all()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mask_ratio": 1.0}, "mask_ratio must be in"),
        ({"vit_embed_dim": 66}, "multiple of 4 and of vit_heads"),
        ({"vit_heads": 3}, "multiple of 4 and of vit_heads"),
        ({"vit_depth": -1}, "vit_depth must be an int >= 0"),
        ({"vit_mlp_ratio": 0}, "vit_mlp_ratio must be > 0"),
        ({"lr": -1e-3}, "lr must be > 0"),
        ({"weight_decay": -1}, "weight_decay must be >= 0"),
        ({"beta2": 1.0}, "beta2 must be in"),
        ({"epochs": 0}, "epochs must be a positive int"),
        ({"warmup_epochs": -1}, "warmup_epochs must be an int >= 0"),
        ({"blur_sigma": -2}, "blur_sigma must be >= 0"),
        ({"patch_size": 12}, "power of two"),
        ({"patch_size": 0}, "patch_size must be a positive int"),
    ],
)
def test_bad_hyperparameters_are_model_errors(random_resnet18_weights, overrides, message):
    with pytest.raises(ModelError, match=message):
        small(random_resnet18_weights, **overrides)


def test_defaults_are_the_study_and_paper_values():
    defaults = hyperparameters("mmr")
    assert defaults["backbone"] == "wide_resnet50_2"
    assert tuple(defaults["layers"]) == ("layer1", "layer2", "layer3")
    assert defaults["mask_ratio"] == 0.4
    # ViT-Base/16, as the paper's MAE-pretrained encoder.
    assert (defaults["patch_size"], defaults["vit_embed_dim"]) == (16, 768)
    assert (defaults["vit_depth"], defaults["vit_heads"], defaults["vit_mlp_ratio"]) == (12, 12, 4)
    assert defaults["vit_weights"] is None
    assert (defaults["lr"], defaults["weight_decay"]) == (1e-3, 0.05)
    assert (defaults["beta1"], defaults["beta2"]) == (0.9, 0.95)
    assert (defaults["epochs"], defaults["warmup_epochs"]) == (200, 50)
    assert defaults["blur_sigma"] == 4.0
    assert MMR.learning_type == "iterative"
    assert MMR.localizes


def test_backbone_constraints(monkeypatch):
    assert backbone_problem("mmr", "resnet18") is None
    assert backbone_problem("mmr", "wide_resnet50_2") is None
    # Stride 2 (act1) is 8x finer than a 16-px patch; with 32-px patches it would be 16x.
    assert backbone_problem("mmr", "resnet18", {"layers": ["act1", "layer1"]}) is None
    too_fine = backbone_problem("mmr", "resnet18", {"layers": ["act1"], "patch_size": 32})
    assert too_fine is not None and "power of two" in too_fine
    monkeypatch.setitem(
        BACKBONES,
        "vit_small_patch16_224",
        BackboneSpec(
            "vit_small_patch16_224", "vit_small_patch16_224", {"blocks": (16, 384)}, "vit"
        ),
    )
    transformer = backbone_problem("mmr", "vit_small_patch16_224", {"layers": ["blocks"]})
    assert transformer is not None and "cnn" in transformer
    with pytest.raises(ModelError, match="vit_small_patch16_224"):
        models.create("mmr", backbone="vit_small_patch16_224", layers=["blocks"], pretrained=False)
