"""PatchCore, PaDiM and STFPM on a small generated texture set (CPU, random-init backbones)."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import roc_auc_score
from toy_defects import N_TRAIN, SIZE, batches, toy_set

import models
from models.components.feature_utils import NearestNeighbors, gaussian_blur
from models.errors import ModelError

# Small, fast configurations of each detector; everything else is the paper's default. STFPM's
# teacher is randomly initialised here, and at 64 px its layer3 grid is 4 x 4: matching layer1 and
# layer2 for 40 epochs gives image AUROC >= 0.95 for every seed from 0 to 7, where the default
# three layers for a few epochs range from 0.5 to 1.0 across seeds.
CONFIGS = {
    "patchcore": {"backbone": "resnet18"},
    "padim": {},
    "stfpm": {"layers": ("layer1", "layer2")},
}
FIT_EPOCHS = {"patchcore": None, "padim": None, "stfpm": 40}


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    toy = toy_set()
    return {"train": toy.train, "test": toy.test, "labels": toy.labels, "masks": toy.masks}


def fit_predict(name: str, data: dict, seed: int = 0, **overrides) -> models.Prediction:
    detector = models.create(name, pretrained=False, seed=seed, **{**CONFIGS[name], **overrides})
    detector.fit(batches(data["train"]), epochs=FIT_EPOCHS[name])
    return detector.predict(data["test"])


@pytest.fixture(scope="module")
def predictions(data) -> dict[str, models.Prediction]:
    return {name: fit_predict(name, data) for name in CONFIGS}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_detects_and_localises_anomalies(name, data, predictions):
    prediction = predictions[name]
    n_test = len(data["test"])
    assert prediction.score.shape == (n_test,)
    assert prediction.anomaly_map.shape == (n_test, SIZE, SIZE)
    assert torch.isfinite(prediction.score).all()
    assert torch.isfinite(prediction.anomaly_map).all()
    assert roc_auc_score(data["labels"].numpy(), prediction.score.numpy()) >= 0.9
    # The map must point at the defect, not merely rise everywhere on defective images.
    pixel_auroc = roc_auc_score(
        data["masks"].flatten().numpy(), prediction.anomaly_map.flatten().numpy()
    )
    assert pixel_auroc >= 0.8


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_seed_same_scores(name, data, predictions):
    again = fit_predict(name, data, seed=0)
    assert torch.equal(again.score, predictions[name].score)
    assert torch.equal(again.anomaly_map, predictions[name].anomaly_map)


def test_different_seed_changes_padim_channels():
    first = models.create("padim", pretrained=False, seed=0)
    second = models.create("padim", pretrained=False, seed=1)
    assert first.channel_index.shape == (100,)
    assert not torch.equal(first.channel_index, second.channel_index)


def test_creating_a_detector_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    models.create("stfpm", pretrained=False, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())


def test_dict_batches_fit_like_tensors(data):
    tensors = models.create("padim", pretrained=False)
    tensors.fit(batches(data["train"]))
    dicts = models.create("padim", pretrained=False)
    dicts.fit([{"image": b, "label": torch.zeros(len(b))} for b in batches(data["train"])])
    assert torch.equal(tensors.predict(data["test"]).score, dicts.predict(data["test"]).score)


@pytest.mark.parametrize("name", ["patchcore", "padim"])
def test_one_pass_detectors_report_one_epoch(name, data):
    calls = []
    detector = models.create(name, pretrained=False, **CONFIGS[name])
    stats = detector.fit(
        batches(data["train"]), epochs=5, on_epoch_end=lambda e, m: calls.append(e) or False
    )
    assert calls == [1]
    assert stats["epochs"] == 1


def test_stfpm_reports_every_epoch_and_learns(data):
    reports = []
    detector = models.create("stfpm", pretrained=False)
    stats = detector.fit(
        batches(data["train"]), epochs=4, on_epoch_end=lambda e, m: reports.append((e, m)) or False
    )
    assert [epoch for epoch, _ in reports] == [1, 2, 3, 4]
    losses = [metrics["loss"] for _, metrics in reports]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]
    assert stats == {"epochs": 4, "loss": losses[-1]}
    assert not detector.training


def test_stfpm_stops_when_told(data):
    seen = []
    detector = models.create("stfpm", pretrained=False, epochs=50)
    stats = detector.fit(batches(data["train"]), on_epoch_end=lambda e, m: seen.append(e) or e == 2)
    assert seen == [1, 2]
    assert stats["epochs"] == 2


def test_stfpm_default_budget_comes_from_constructor(data):
    seen = []
    detector = models.create("stfpm", pretrained=False, epochs=2)
    detector.fit(batches(data["train"][:4]), on_epoch_end=lambda e, m: seen.append(e) or False)
    assert seen == [1, 2]


def test_stfpm_teacher_frozen_student_trained(data):
    detector = models.create("stfpm", pretrained=False)
    teacher_before = {k: v.clone() for k, v in detector.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in detector.student.state_dict().items()}
    detector.fit(batches(data["train"][:8]), epochs=1)
    teacher_after = detector.teacher.state_dict()
    assert all(torch.equal(v, teacher_after[k]) for k, v in teacher_before.items())
    student_after = detector.student.state_dict()
    assert any(not torch.equal(v, student_after[k]) for k, v in student_before.items())


def test_param_counts_split_trainable_and_frozen():
    stfpm = models.create("stfpm", pretrained=False)
    student = sum(p.numel() for p in stfpm.student.parameters())
    assert stfpm.param_counts() == (student, student)
    patchcore = models.create("patchcore", backbone="resnet18", pretrained=False)
    backbone = sum(p.numel() for p in patchcore.extractor.parameters())
    assert patchcore.param_counts() == (0, backbone)


def test_memory_bank_is_a_buffer_of_the_coreset_size(data):
    detector = models.create("patchcore", backbone="resnet18", pretrained=False)
    stats = detector.fit(batches(data["train"]))
    # layer2 of a 64 x 64 image is an 8 x 8 grid: 16 images give 1024 patches, 10% kept.
    assert stats["n_patches"] == N_TRAIN * 8 * 8
    assert detector.memory_bank.shape == (round(0.1 * N_TRAIN * 64), 128 + 256)
    assert "memory_bank" in dict(detector.named_buffers())
    assert detector.param_counts()[0] == 0


def test_full_coreset_ratio_keeps_every_patch(data):
    detector = models.create("patchcore", backbone="resnet18", coreset_ratio=1.0, pretrained=False)
    stats = detector.fit(batches(data["train"][:4]))
    assert stats["memory_bank_size"] == stats["n_patches"] == 4 * 8 * 8


def test_patchcore_reweighting_only_lowers_the_max_patch_distance(data):
    detector = models.create("patchcore", backbone="resnet18", pretrained=False)
    detector.fit(batches(data["train"]))
    weighted = detector.predict(data["test"]).score
    detector.num_neighbors = 1
    unweighted = detector.predict(data["test"]).score
    assert torch.all(weighted < unweighted)
    assert torch.all(weighted > 0)


@pytest.mark.parametrize("name", ["patchcore", "padim"])
def test_state_dict_round_trip(name, data, predictions):
    fitted = models.create(name, pretrained=False, **CONFIGS[name])
    fitted.fit(batches(data["train"]))
    restored = models.create(name, pretrained=False, **CONFIGS[name])
    restored.load_state_dict(fitted.state_dict())
    assert torch.equal(restored.predict(data["test"]).score, predictions[name].score)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_predict_before_fit_is_an_error(name, data):
    detector = models.create(name, pretrained=False, **CONFIGS[name])
    if name == "stfpm":
        # An untrained student is still a valid (poor) detector: it predicts.
        assert detector.predict(data["test"][:2]).score.shape == (2,)
        return
    with pytest.raises(ModelError, match="before fit"):
        detector.predict(data["test"][:2])


def test_padim_rejects_another_image_size(data):
    detector = models.create("padim", pretrained=False)
    detector.fit(batches(data["train"][:4]))
    with pytest.raises(ModelError, match="training image size"):
        detector.predict(torch.zeros(1, 3, 2 * SIZE, 2 * SIZE))


def test_empty_training_set_is_an_error():
    for name in CONFIGS:
        detector = models.create(name, pretrained=False, **CONFIGS[name])
        with pytest.raises(ModelError, match="empty"):
            detector.fit([], epochs=FIT_EPOCHS[name])


def test_unknown_hyperparameter_suggests_the_closest():
    with pytest.raises(ModelError, match="coreset_ratio"):
        models.create("patchcore", coreset_ration=0.2)
    with pytest.raises(ModelError, match="no hyperparameter 'learning_rate'"):
        models.create("stfpm", learning_rate=0.1)


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("patchcore", {"coreset_ratio": 0.0}),
        ("patchcore", {"coreset_ratio": 1.5}),
        ("patchcore", {"num_neighbors": 0}),
        ("patchcore", {"projection_dim": 0}),
        ("padim", {"n_features": 449}),
        ("padim", {"n_features": 0}),
        ("stfpm", {"lr": 0.0}),
        ("stfpm", {"epochs": 0}),
        ("patchcore", {"backbone": "resnet19"}),
        ("padim", {"layers": ("layer1", "layer5")}),
    ],
)
def test_bad_hyperparameter_values_are_errors(name, bad):
    with pytest.raises(ModelError):
        models.create(name, pretrained=False, **{**CONFIGS[name], **bad})


def test_defaults_are_the_reference_study_values():
    assert models.hyperparameters("patchcore") == {
        "backbone": "wide_resnet50_2",
        "layers": ("layer2", "layer3"),
        "coreset_ratio": 0.1,
        "num_neighbors": 9,
        "projection_dim": 128,
        "blur_sigma": 4.0,
        "seed": 0,
        "pretrained": True,
        "weights": None,
    }
    padim = models.hyperparameters("padim")
    assert (padim["backbone"], padim["layers"]) == ("resnet18", ("layer1", "layer2", "layer3"))
    stfpm = models.hyperparameters("stfpm")
    assert {k: stfpm[k] for k in ("backbone", "lr", "momentum", "weight_decay", "epochs")} == {
        "backbone": "resnet18",
        "lr": 0.4,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "epochs": 100,
    }
    assert [models.get_class(n).learning_type for n in CONFIGS] == [
        "one_pass",
        "one_pass",
        "iterative",
    ]


def test_padim_paper_embedding_sizes():
    assert models.create("padim", pretrained=False).n_features == 100
    wide = models.create("padim", backbone="wide_resnet50_2", pretrained=False)
    assert wide.n_features == 550
    assert wide.mean.shape == (0, 550)


def test_nearest_neighbors_faiss_and_torch_agree():
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(500, 24, generator=generator)
    queries = torch.randn(40, 24, generator=generator)
    exact = torch.cdist(queries, bank)
    expected, expected_index = exact.topk(3, dim=1, largest=False)
    for backend in ("faiss", "torch"):
        distances, indices = NearestNeighbors(bank, backend=backend).search(queries, k=3)
        assert torch.equal(indices, expected_index)
        torch.testing.assert_close(distances, expected, rtol=1e-4, atol=1e-4)


def test_gaussian_blur_smooths_and_keeps_constants():
    constant = torch.full((2, 20, 30), 3.0)
    torch.testing.assert_close(gaussian_blur(constant, sigma=4.0), constant)
    spike = torch.zeros(1, 41, 41)
    spike[0, 20, 20] = 1.0
    blurred = gaussian_blur(spike, sigma=2.0)
    assert blurred.shape == spike.shape
    torch.testing.assert_close(blurred.sum(), torch.tensor(1.0))
    assert blurred[0, 20, 20] == blurred.max() and blurred[0, 20, 20] < 0.05
    torch.testing.assert_close(blurred[0], blurred[0].T)
