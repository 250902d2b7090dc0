"""DFM on the toy defect set (CPU, random-init backbone), and the PCA it is built on."""

from __future__ import annotations

import pytest
import torch
from sklearn.decomposition import PCA as SklearnPCA
from toy_defects import batches, check_prediction, image_auroc, pixel_auroc, toy_set

import models
import models.dfm  # registers "dfm" until models/__init__ imports it
from models import backbones
from models.base import backbone_problem, hyperparameters
from models.components.pca import PCA
from models.errors import ModelError

# ResNet18 builds faster than the default ResNet50. At 64 px layer3 pools to a 2 x 2 grid, too
# coarse to localise: layer2 (a 4 x 4 grid after pooling) gives pixel AUROC 0.95-0.97 for seeds
# 0-2, and image AUROC 1.0 like layer3.
CONFIG = {"backbone": "resnet18", "layers": ("layer2",), "pretrained": False}


@pytest.fixture(scope="module")
def toy():
    return toy_set()


def fit(toy, **overrides):
    detector = models.create("dfm", **{**CONFIG, **overrides})
    calls = []
    stats = detector.fit(batches(toy.train), on_epoch_end=lambda e, m: calls.append(e))
    return detector, stats, calls


@pytest.fixture(scope="module")
def fitted(toy):
    detector, stats, calls = fit(toy)
    return detector, stats, calls, detector.predict(toy.test)


def test_detects_and_localises_anomalies(toy, fitted):
    detector, stats, calls, prediction = fitted
    assert detector.localizes
    check_prediction(toy, prediction, localizes=True)
    assert image_auroc(toy, prediction.score) >= 0.9
    assert pixel_auroc(toy, prediction.anomaly_map) >= 0.9
    assert calls == [1]
    # 128 channels on the 8 x 8 layer2 grid, pooled in 2 x 2 blocks.
    assert stats["feature_size"] == 128 * 4 * 4
    assert 1 <= stats["n_components"] <= 15


def test_reconstruction_error_vanishes_on_the_full_training_subspace(toy):
    # With every component kept, a training image lies in the PCA subspace: its feature
    # reconstruction error is numerically zero while normal test images keep theirs.
    detector, stats, _ = fit(toy, pca_level=1.0)
    assert stats["n_components"] == 15
    on_train = detector.predict(toy.train[:4]).score
    on_test = detector.predict(toy.test[:4]).score
    assert on_train.max() < 1e-6 * on_test.min()


def test_nll_scores_images_without_a_map(toy):
    # Layer3 (pooled to 2 x 2) suits the image-level likelihood: image AUROC 0.92-1.0 for
    # seeds 0-2 here, 0.97 for seed 0.
    detector, _, _ = fit(toy, layers=("layer3",), score_type="nll")
    assert models.get_class("dfm").localizes and not detector.localizes
    prediction = detector.predict(toy.test)
    check_prediction(toy, prediction, localizes=False)
    assert image_auroc(toy, prediction.score) >= 0.9


def test_same_seed_same_scores(toy, fitted):
    again, _, _ = fit(toy)
    prediction = again.predict(toy.test)
    assert torch.equal(prediction.score, fitted[3].score)
    assert torch.equal(prediction.anomaly_map, fitted[3].anomaly_map)


def test_state_dict_round_trip(toy, fitted):
    detector, *_ = fitted
    restored = models.create("dfm", **CONFIG)
    restored.load_state_dict(detector.state_dict())
    assert torch.equal(restored.predict(toy.test).score, fitted[3].score)


def test_pca_matches_scikit_learn():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 12, generator=generator, dtype=torch.float64)
    x = x @ torch.diag(torch.linspace(3.0, 0.1, 12, dtype=torch.float64))
    ours = PCA().fit(x, 0.9)
    theirs = SklearnPCA(n_components=0.9, svd_solver="full").fit(x.numpy())
    assert ours.n_components == theirs.n_components_
    torch.testing.assert_close(
        ours.explained_variance, torch.from_numpy(theirs.explained_variance_)
    )
    # Components agree up to sign, so compare the projections onto them.
    torch.testing.assert_close(
        ours.components.T @ ours.components,
        torch.from_numpy(theirs.components_.T @ theirs.components_),
    )
    assert PCA().fit(x, 5).n_components == 5
    full = PCA().fit(x, 100)
    assert full.n_components == 12
    torch.testing.assert_close(full.inverse_transform(full.transform(x)), x)


def test_defaults_are_the_reference_studys():
    assert hyperparameters("dfm") == {
        "backbone": "resnet50",
        "layers": ("layer3",),
        "pooling_kernel_size": 2,
        "pca_level": 0.97,
        "score_type": "fre",
        "seed": 0,
        "pretrained": True,
        "weights": None,
    }
    assert models.get_class("dfm").learning_type == "one_pass"


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"pooling_kernel_size": 0}, "pooling_kernel_size must be a positive int, got 0"),
        ({"pooling_kernel_size": 2.0}, "pooling_kernel_size must be a positive int, got 2.0"),
        ({"pca_level": 0.0}, "pca_level must be in"),
        ({"pca_level": 1.5}, "pca_level must be in"),
        ({"score_type": "mahalanobis"}, "score_type must be one of fre, nll"),
        ({"layers": ("layer0",)}, "layer0"),
    ],
)
def test_bad_hyperparameters(hparams, message):
    with pytest.raises(ModelError, match=message):
        models.create("dfm", **{**CONFIG, **hparams})


def test_misuse_is_a_model_error(toy, fitted):
    detector = models.create("dfm", **CONFIG)
    with pytest.raises(ModelError, match="before fit"):
        detector.predict(toy.test)
    with pytest.raises(ModelError, match="empty"):
        detector.fit([])
    with pytest.raises(ModelError, match="at least 2"):
        detector.fit([toy.train[:1]])
    with pytest.raises(ModelError, match="predict at the training image size"):
        fitted[0].predict(toy_set(size=96, n_train=2, n_test_each=1).test)


def test_backbone_constraints(monkeypatch):
    assert backbone_problem("dfm", "resnet18") is None
    # Layer3 has stride 16: at 16 px it is a 1 x 1 grid, smaller than the 2 x 2 pooling window.
    problem = backbone_problem("dfm", "resnet18", image_size=16)
    assert "pooling_kernel_size 2" in problem and "32 px" in problem
    assert backbone_problem("dfm", "resnet18", image_size=32) is None
    assert backbone_problem("dfm", "resnet18", {"pooling_kernel_size": 1}, image_size=16) is None
    vit = backbones.BackboneSpec("toy_vit", "toy_vit", {"blocks.8": (16, 384)}, "vit", 224)
    monkeypatch.setitem(backbones.BACKBONES, "toy_vit", vit)
    assert backbone_problem("dfm", "toy_vit", {"layers": ("blocks.8",)}, image_size=224) is None
    assert "224 px" in backbone_problem("dfm", "toy_vit", {"layers": ("blocks.8",)}, 256)
    assert "layer3" in backbone_problem("dfm", "toy_vit")
