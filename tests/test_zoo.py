"""Contracts every registered detector keeps: the zoo is complete, hyperparameters are
documented, backbone checks answer for every backbone, epochs are reported and stopping works,
and building a detector leaves the global random state alone."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from toy_defects import batches, toy_set

import models
from models.backbones import get_backbone, list_backbones
from models.tiny import tiny_hparams

ISSUE_ZOO = {
    "draem", "dsr", "ganomaly", "skip_ganomaly", "autoencoder", "cutpaste", "memseg",
    "patchcore", "padim", "stfpm",
    "dfkde", "dfm", "cfa",
    "cflow", "csflow", "fastflow", "uflow",
    "reverse_distillation", "efficient_ad", "efficient_ad_ast", "simplenet", "mmr",
}  # fmt: skip


def tiny(name: str, **overrides) -> models.Detector:
    return models.create(name, **{**tiny_hparams(name), **overrides})


def test_the_zoo_has_every_detector_of_the_issue():
    missing = ISSUE_ZOO - set(models.list_models())
    assert not missing, f"not registered: {sorted(missing)}"


@pytest.mark.parametrize("name", models.list_models())
def test_every_hyperparameter_is_documented(name):
    doc = inspect.getdoc(models.get_class(name).__init__) or ""
    undocumented = [hp for hp in models.hyperparameters(name) if f"{hp}:" not in doc]
    assert not undocumented, f"{name}: document {undocumented} in __init__'s Args"


@pytest.mark.parametrize("name", models.list_models())
def test_backbone_checks_answer_for_every_backbone(name):
    hparams = models.hyperparameters(name)
    if "backbone" not in hparams:
        assert models.backbone_problem(name, "resnet18") == f"{name} takes no backbone"
        return
    default = hparams["backbone"]
    assert models.backbone_problem(name, default) is None, "the default backbone must work"
    usable = models.compatible_backbones(name)
    assert default in usable
    for backbone in list_backbones():
        for size in (None, get_backbone(backbone).input_size or 256, 250):
            problem = models.backbone_problem(name, backbone, None, size)
            assert problem is None or (isinstance(problem, str) and problem), (backbone, size)


@pytest.mark.parametrize("name", models.list_models())
def test_creating_a_detector_leaves_the_global_rng_alone(name):
    state = torch.random.get_rng_state()
    tiny(name, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.fixture(scope="module")
def toy():
    return toy_set(n_train=4, n_test_each=2)


@pytest.mark.parametrize("name", models.list_models())
def test_epochs_are_reported_and_stopping_is_honoured(name, toy):
    detector = tiny(name)
    seen: list[tuple[int, dict]] = []

    def on_epoch_end(epoch: int, values: dict) -> bool:
        seen.append((epoch, values))
        return epoch == 2

    train = batches(toy.train, 2)
    if detector.learning_type == "supervised":
        # Supervised detectors train on labelled defects too, as the trainable gives them.
        train = [
            {"image": b, "label": torch.zeros(len(b), dtype=torch.int64), "mask": torch.zeros(
                len(b), *b.shape[2:])} for b in train
        ] + [{"image": toy.test, "label": toy.labels, "mask": toy.masks.float()}]  # fmt: skip
    stats = detector.fit(train, epochs=4, on_epoch_end=on_epoch_end)
    assert not detector.training, "fit leaves the detector in eval mode"
    if detector.learning_type == "one_pass":
        assert [epoch for epoch, _ in seen] == [1]
        assert stats["epochs"] == 1
    else:
        assert [epoch for epoch, _ in seen] == [1, 2]
        assert stats["epochs"] == 2
        assert all(math.isfinite(values["loss"]) for _, values in seen)
    prediction = detector.predict(toy.test)
    assert prediction.score.shape == (len(toy.test),)
    assert torch.isfinite(prediction.score).all()
    assert (prediction.anomaly_map is not None) == detector.localizes
    notes = stats.get("notes", [])
    assert isinstance(notes, list) and all(isinstance(n, str) and n for n in notes)


@pytest.mark.parametrize("name", models.list_models())
def test_parameter_counts_split_the_whole_model(name):
    detector = tiny(name)
    trainable, frozen = detector.param_counts()
    assert trainable + frozen == sum(p.numel() for p in detector.parameters()) > 0
    if detector.learning_type == "one_pass":
        assert trainable == 0, "one-pass detectors learn no weights by gradient"


# The reference study's model x backbone pairs (Tables 4-5 and B.8) at its image sizes.
REFERENCE_PAIRS = [
    ("cfa", "resnet18", 224), ("cfa", "wide_resnet50_2", 224),
    ("cflow", "wide_resnet50_2", 256),
    ("csflow", "efficientnet_b5", 768),
    ("dfkde", "resnet18", 256), ("dfkde", "wide_resnet50_2", 256),
    ("dfm", "resnet18", 256), ("dfm", "resnet50", 256),
    ("fastflow", "resnet18", 256), ("fastflow", "wide_resnet50_2", 256),
    ("fastflow", "cait_m48_448", 448), ("fastflow", "deit_base_distilled_patch16_384", 384),
    ("mmr", "wide_resnet50_2", 256),
    ("padim", "resnet18", 256), ("padim", "wide_resnet50_2", 256),
    ("patchcore", "wide_resnet50_2", 256),
    ("reverse_distillation", "resnet18", 256), ("reverse_distillation", "wide_resnet50_2", 256),
    ("simplenet", "wide_resnet50_2", 288),
    ("stfpm", "resnet18", 256), ("stfpm", "wide_resnet50_2", 256),
    ("uflow", "mcait", 448), ("uflow", "resnet18", 256), ("uflow", "wide_resnet50_2", 256),
]  # fmt: skip


@pytest.mark.parametrize(("name", "backbone", "size"), REFERENCE_PAIRS)
def test_the_reference_studys_pairs_are_compatible(name, backbone, size):
    assert models.backbone_problem(name, backbone, None, size) is None
