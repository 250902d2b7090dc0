"""DSR on the toy defect set (CPU, small widths).

The paper's general VQ-VAE is pretrained on ImageNet, so its decoder reproduces any defect and
the anomaly detection module only has to compare that with the object-specific reconstruction.
Offline the VQ-VAE learns in the run's first phase from the 16 toy images (and Perlin blends of
them), and it takes a few hundred steps to learn even the normal texture: a run short enough
for the 25 s budget (12 epochs of 4 steps) leaves every module far from converged, and its
AUROC on the toy defects is chance. The fast tests therefore check what such a run does show:
every phase runs for its share of the budget, reports every epoch and lowers its own loss;
the latent anomalies, the budget split and the codebook restarts do what they should;
determinism, stopping, weight loading and the error messages. The slow test trains 300 epochs
(about a minute) and asserts image and pixel AUROC >= 0.9 and that the detection module finds
the latent anomalies it was trained on.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from toy_defects import batches, check_prediction, image_auroc, pixel_auroc, toy_set

import models
from models.base import backbone_problem, hyperparameters
from models.components.vq import TwoLevelVQVAE, VectorQuantizer
from models.dsr import DSR, _codebook_ranks, _replace_codes, focal_loss, phase_epochs
from models.errors import ModelError

SMALL = {
    "hidden_channels": 32,
    "residual_channels": 16,
    "n_residual_layers": 1,
    "embedding_dim": 32,
    "num_embeddings": 256,
    "unet_width": 8,
    "score_filter_size": 9,
    "lr": 2e-3,
    "vq_train_ratio": 0.25,
    "upsampling_train_ratio": 0.5,
}
"""Small widths; the ratios give each phase enough of a short run to show it learns."""
TINY = {
    "hidden_channels": 8,
    "residual_channels": 4,
    "n_residual_layers": 1,
    "embedding_dim": 8,
    "num_embeddings": 16,
    "unet_width": 4,
    "score_filter_size": 5,
}
FIT_EPOCHS = 12
PHASES = [1] * 3 + [2] * 3 + [3] * 6


def small(**overrides) -> DSR:
    return models.create("dsr", **{**SMALL, **overrides})


def tiny(**overrides) -> DSR:
    return models.create("dsr", **{**TINY, **overrides})


@pytest.fixture(scope="module")
def toy():
    return toy_set()


@pytest.fixture(scope="module")
def fitted(toy):
    detector = small()
    history = []

    def on_epoch_end(epoch: int, metrics: dict) -> bool:
        history.append((epoch, metrics))
        return False

    stats = detector.fit(batches(toy.train, 4), epochs=FIT_EPOCHS, on_epoch_end=on_epoch_end)
    return detector, stats, history, detector.predict(toy.test)


def test_every_epoch_of_every_phase_is_reported_and_each_phase_learns(fitted):
    _, stats, history, _ = fitted
    assert [epoch for epoch, _ in history] == list(range(1, FIT_EPOCHS + 1))
    assert [metrics["phase"] for _, metrics in history] == PHASES
    assert all(math.isfinite(float(v)) for _, metrics in history for v in metrics.values())
    by_phase = {p: [m for _, m in history if m["phase"] == p] for p in (1, 2, 3)}
    # VQ-VAE: from a random decoder to the images' mean appearance and more.
    vq = [m["reconstruction"] for m in by_phase[1]]
    assert vq[-1] < 0.5 * vq[0]
    # DSR modules: the object-specific decoder and restriction modules start from scratch.
    main = [m["loss"] for m in by_phase[2]]
    assert {"focal", "features", "reconstruction"} <= set(by_phase[2][0])
    assert main[-1] < main[0]
    upsampling = [m["loss"] for m in by_phase[3]]
    assert upsampling[-1] < upsampling[0]
    assert stats["epochs"] == FIT_EPOCHS
    assert (stats["vq_epochs"], stats["main_epochs"], stats["upsampling_epochs"]) == (3, 3, 6)
    assert stats["loss"] == upsampling[-1]
    assert any("trained on the training images for 3 of the 12 epochs" in n for n in stats["notes"])
    assert any("generated textures" in n for n in stats["notes"])


def test_predictions_are_probability_maps_of_input_size(toy, fitted):
    detector, _, _, prediction = fitted
    check_prediction(toy, prediction, localizes=True)
    assert not detector.training
    assert bool(detector.upsampling_trained)
    assert prediction.anomaly_map.min() >= 0 and prediction.anomaly_map.max() <= 1
    # The score is a mean-filtered map's maximum: never above the map's own maximum.
    assert (prediction.score <= prediction.anomaly_map.flatten(1).max(1).values + 1e-6).all()


def test_the_general_model_is_frozen_and_its_codebooks_in_use(toy, fitted):
    detector, _, _, _ = fitted
    assert not any(p.requires_grad for p in detector.vq.parameters())
    with torch.no_grad():
        codes = detector.vq.encode(detector._unit(toy.train))
    # Restarts of unused entries keep a near-uniform training set from collapsing the
    # codebooks onto a single entry each (what happens without them).
    assert codes["top_index"].unique().numel() >= 4
    assert codes["bottom_index"].unique().numel() >= 4


def test_odd_input_size_gives_maps_of_input_size(toy, fitted):
    detector, _, _, _ = fitted
    images = torch.nn.functional.interpolate(toy.test[:2], size=(44, 60), mode="bilinear")
    prediction = detector.predict(images)
    assert prediction.anomaly_map.shape == (2, 44, 60)
    assert torch.isfinite(prediction.score).all()


def test_state_dict_round_trip_keeps_what_was_learned(toy, fitted):
    detector, _, _, prediction = fitted
    restored = small(seed=5)
    restored.load_state_dict(detector.state_dict())
    restored.eval()
    again = restored.predict(toy.test)
    assert torch.allclose(again.score, prediction.score, atol=1e-6)
    assert torch.allclose(again.anomaly_map, prediction.anomaly_map, atol=1e-6)


def test_vq_weights_replace_the_vq_phase(toy, fitted, tmp_path):
    detector, _, _, _ = fitted
    path = tmp_path / "vq.pt"
    torch.save(detector.vq.state_dict(), path)
    loaded = small(vq_weights=str(path))
    for key, value in detector.vq.state_dict().items():
        assert torch.equal(loaded.vq.state_dict()[key], value), key
    stats = loaded.fit(batches(toy.train[:4], 4), epochs=2)
    assert (stats["vq_epochs"], stats["main_epochs"], stats["upsampling_epochs"]) == (0, 1, 1)
    assert any("loaded from" in note for note in stats["notes"])
    for key, value in detector.vq.state_dict().items():
        assert torch.equal(loaded.vq.state_dict()[key], value), f"{key} changed in fit"
    # A whole detector's state dict works too: its "vq." entries are used.
    whole = tmp_path / "dsr.pt"
    torch.save(detector.state_dict(), whole)
    assert torch.equal(small(vq_weights=str(whole)).vq.vq_top.codebook, detector.vq.vq_top.codebook)
    with pytest.raises(ModelError, match="do not fit the VQ-VAE"):
        small(vq_weights=str(path), embedding_dim=16)
    with pytest.raises(ModelError, match="is not a file"):
        small(vq_weights=str(tmp_path / "missing.pt"))


def test_latent_anomalies_swap_codes_inside_the_mask_within_the_strength_window():
    quantiser = VectorQuantizer(40, 1)
    with torch.no_grad():
        # Codes at i**2 on a line: distances from code 0 grow with the index, so the
        # neighbour of rank r of code 0 is code r.
        quantiser.codebook.copy_(torch.arange(40.0)[:, None] ** 2)
    ranks = _codebook_ranks(quantiser)
    assert ranks[0].tolist() == list(range(40))
    indices = torch.randint(40, (2, 16, 16), generator=torch.Generator().manual_seed(0))
    indices[1] = 0
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[:, 4:12, 2:10] = True
    strength = torch.tensor([1.0, 0.5])
    swapped = _replace_codes(
        quantiser, ranks, indices, mask, strength, torch.Generator().manual_seed(1)
    )
    assert swapped.shape == (2, 1, 16, 16)
    new = swapped[:, 0].round().sqrt().long()  # back to indices
    assert torch.equal(new[~mask], indices[~mask])
    # Rank of every replacement among its original's neighbours: never one of the nearest
    # 5 % (2 of 40, the code itself included), never beyond strength * 40.
    position = (ranks[indices].long() == new[..., None]).float().argmax(-1)
    assert (position[mask] >= 2).all()
    assert (position[0][mask[0]] < 40).all() and (position[1][mask[1]] < 20).all()
    # Code 0 at strength 0.5: replacements spread over codes 2..19.
    assert set(new[1][mask[1]].tolist()) <= set(range(2, 20))
    assert len(set(new[1][mask[1]].tolist())) > 10


def test_latent_anomaly_targets_cover_exactly_the_changed_codes(fitted, toy):
    detector, _, _, _ = fitted
    generator = torch.Generator().manual_seed(3)
    ranks = (_codebook_ranks(detector.vq.vq_top), _codebook_ranks(detector.vq.vq_bottom))
    with torch.no_grad():
        codes = detector.vq.encode(detector._unit(torch.cat([toy.train, toy.test[:8]])))
        top, bottom, target = detector._latent_anomalies(codes, ranks, generator)
    clean_top = detector.vq.vq_top.lookup(codes["top_index"])
    clean_bottom = detector.vq.vq_bottom.lookup(codes["bottom_index"])
    assert target.shape == (24, 64, 64)
    assert set(target.unique().tolist()) <= {0.0, 1.0}
    # Half the images keep their codes (and an empty target), the others change somewhere.
    anomalous = target.flatten(1).any(1)
    assert 4 <= int(anomalous.sum()) <= 20
    changed_top = (top != clean_top).any(1)
    changed_bottom = (bottom != clean_bottom).any(1)
    assert not changed_top[~anomalous].any() and not changed_bottom[~anomalous].any()
    # A changed code lies inside the target; the target is the changed cells' union, so
    # nothing outside it differs from the clean codes.
    top_cells = torch.nn.functional.max_pool2d(target[:, None], 8)[:, 0].bool()
    bottom_cells = torch.nn.functional.max_pool2d(target[:, None], 4)[:, 0].bool()
    assert not (changed_top & ~top_cells).any()
    assert not (changed_bottom & ~bottom_cells).any()


@pytest.mark.parametrize(
    ("total", "upsampling", "vq", "train_vq", "expected"),
    [
        (700, 0.7, 0.2, True, (140, 350, 210)),
        (700, 0.7, 0.2, False, (0, 490, 210)),
        (100, 1.0, 0.2, True, (20, 80, 0)),
        (4, 0.7, 0.2, True, (1, 2, 1)),
        (2, 0.7, 0.2, True, (1, 1, 0)),
        (1, 0.7, 0.2, True, (1, 0, 0)),
        (1, 0.7, 0.2, False, (0, 1, 0)),
        (10, 0.0, 0.2, True, (2, 1, 7)),
    ],
)
def test_the_epoch_budget_is_split_between_phases(total, upsampling, vq, train_vq, expected):
    assert phase_epochs(total, upsampling, vq, train_vq) == expected
    assert sum(phase_epochs(total, upsampling, vq, train_vq)) == total


def test_stopping_during_a_phase_skips_the_later_ones(toy):
    detector = tiny()
    calls = []
    stats = detector.fit(
        batches(toy.train[:4], 2), epochs=6, on_epoch_end=lambda e, m: calls.append(e) or e == 2
    )
    assert calls == [1, 2]
    assert stats["epochs"] == 2
    assert (stats["vq_epochs"], stats["main_epochs"], stats["upsampling_epochs"]) == (1, 1, 0)
    assert not detector.training
    assert not bool(detector.upsampling_trained)
    assert any("upsampling module was not trained" in note for note in stats["notes"])
    prediction = detector.predict(toy.test[:4])
    assert torch.isfinite(prediction.score).all()
    assert prediction.anomaly_map.shape == (4, 64, 64)


def test_same_seed_same_scores_and_another_seed_differs(toy):
    def run(seed: int):
        detector = tiny(seed=seed)
        detector.fit(batches(toy.train[:4], 2), epochs=3)
        return detector.predict(toy.test[:4])

    first, again = run(0), run(0)
    assert torch.equal(first.score, again.score)
    assert torch.equal(first.anomaly_map, again.anomaly_map)
    assert not torch.equal(first.anomaly_map, run(1).anomaly_map)


def test_texture_folder_feeds_the_image_space_anomalies(toy, tmp_path):
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for i in range(2):
        cv2.imwrite(str(tmp_path / f"t{i}.png"), rng.integers(0, 255, (32, 32, 3), np.uint8))
    detector = tiny(texture_dir=str(tmp_path))
    stats = detector.fit(batches(toy.train[:2], 2), epochs=3)
    assert stats["upsampling_epochs"] == 1
    assert not any("generated textures" in note for note in stats["notes"])
    with pytest.raises(ModelError, match="texture_dir"):
        tiny(texture_dir=str(tmp_path / "missing"))


def test_predict_before_fit_and_empty_training_set_are_errors(toy):
    detector = tiny()
    with pytest.raises(ModelError, match="before fit"):
        detector.predict(toy.test[:2])
    with pytest.raises(ModelError, match="empty"):
        detector.fit([], epochs=3)


def test_focal_loss_rewards_confident_right_answers():
    target = torch.tensor([[[0, 1], [1, 0]]])
    right = torch.stack([1 - target, target], dim=1).float() * 8 - 4
    assert focal_loss(right, target) < 1e-4
    assert focal_loss(-right, target) > 3.0
    # Easy pixels count less than in cross-entropy: their weight (1 - p)^2 is small.
    mild = right / 4
    assert focal_loss(mild, target) < 0.1 * torch.nn.functional.cross_entropy(mild, target)


def test_unused_codebook_entries_are_restarted_on_encoder_outputs():
    quantiser = VectorQuantizer(8, 4)
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 4, 3, 3, generator=generator) * 0.01 + 5.0
    quantiser.initialise(features, generator)
    with torch.no_grad():
        quantiser.codebook[1:] = -100.0  # far from every output: never chosen
        _, indices, _ = quantiser(features)
        quantiser.update(features, indices)
    assert quantiser.restart_unused(generator) >= 7
    assert (quantiser.codebook - 5.0).abs().max() < 1.0
    assert quantiser.restart_unused(generator) == 0  # nothing seen since the last call


def test_parameters_split_into_the_frozen_vq_vae_and_the_trained_modules():
    detector = models.create("dsr")
    trainable, frozen = detector.param_counts()
    assert frozen == sum(p.numel() for p in detector.vq.parameters())
    assert trainable == sum(p.numel() for p in detector.parameters()) - frozen
    # Table 2 of the study: 36.3M trainable, 4.0M frozen. The paper's widths give here
    # 26.6M (subspace restriction 11.0M, anomaly detection 9.2M, upsampling 5.6M,
    # object decoder 0.9M) and 3.2M (the VQ-VAE with its two 4096 x 128 codebooks).
    assert 25e6 < trainable < 28e6
    assert 3.0e6 < frozen < 3.5e6
    assert isinstance(detector.vq, TwoLevelVQVAE)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lr": 0}, "lr must be > 0"),
        ({"epochs": 0}, "epochs must be a positive int"),
        ({"latent_anomaly_strength": 0}, "latent_anomaly_strength must be in"),
        ({"latent_anomaly_strength": 1.5}, "latent_anomaly_strength must be in"),
        ({"upsampling_train_ratio": 1.2}, "upsampling_train_ratio must be in"),
        ({"vq_train_ratio": 1.0}, "vq_train_ratio must be in"),
        ({"hidden_channels": 7}, "hidden_channels must be even"),
        ({"num_embeddings": 1}, "num_embeddings must be an int >= 2"),
        ({"unet_width": 0}, "unet_width must be a positive int, got 0"),
        ({"embedding_dim": 2.5}, "embedding_dim must be a positive int, got 2.5"),
        ({"score_filter_size": 4}, "score_filter_size must be odd"),
    ],
)
def test_bad_hyperparameters_are_model_errors(overrides, message):
    with pytest.raises(ModelError, match=message):
        tiny(**overrides)


def test_bad_fit_epochs_is_a_model_error(toy):
    with pytest.raises(ModelError, match="fit epochs must be a positive int"):
        tiny().fit(batches(toy.train[:2]), epochs=0)


def test_defaults_are_the_study_and_paper_values():
    defaults = hyperparameters("dsr")
    assert defaults["lr"] == 2e-4
    assert defaults["epochs"] == 700
    assert defaults["latent_anomaly_strength"] == 0.2
    assert defaults["upsampling_train_ratio"] == 0.7
    assert (defaults["hidden_channels"], defaults["residual_channels"]) == (128, 64)
    assert (defaults["embedding_dim"], defaults["num_embeddings"]) == (128, 4096)
    assert defaults["n_residual_layers"] == 2
    assert defaults["vq_weights"] is None and defaults["texture_dir"] is None
    assert DSR.learning_type == "iterative"
    assert DSR.localizes


def test_dsr_takes_no_backbone():
    assert backbone_problem("dsr", "resnet18") == "dsr takes no backbone"


@pytest.mark.slow
def test_a_longer_run_detects_and_localises_the_toy_defects(toy):
    # 300 epochs of 4 steps (about a minute on one CPU thread): 180 for the VQ-VAE, 75 for
    # the DSR modules, 45 for the upsampling module. Image AUROC 1.0 and pixel AUROC 0.97 to
    # 1.0 for seeds 0 to 2.
    detector = small(num_embeddings=512, vq_train_ratio=0.6, upsampling_train_ratio=0.85)
    detector.fit(batches(toy.train, 4), epochs=300)
    prediction = detector.predict(toy.test)
    check_prediction(toy, prediction, localizes=True)
    assert image_auroc(toy, prediction.score) >= 0.9
    assert pixel_auroc(toy, prediction.anomaly_map) >= 0.9
    # The detection module on its own task: latent anomalies in held-out normal images.
    ranks = (_codebook_ranks(detector.vq.vq_top), _codebook_ranks(detector.vq.vq_bottom))
    with torch.no_grad():
        codes = detector.vq.encode(detector._unit(toy.test[:8]))
        top, bottom, target = detector._latent_anomalies(
            codes, ranks, torch.Generator().manual_seed(0)
        )
        _, _, specific = detector._restore(top, bottom)
        logits = detector.anomaly_module(
            torch.cat([specific, detector.vq.decode(top, bottom)], dim=1)
        )
    found = roc_auc_score(target.flatten().numpy(), logits.softmax(1)[:, 1].flatten().numpy())
    assert found >= 0.75
