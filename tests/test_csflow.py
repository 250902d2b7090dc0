"""CS-Flow on the toy defect set (CPU, random-init EfficientNet-B0) and its cross-scale flow."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from toy_defects import batches, check_prediction, image_auroc, pixel_auroc, toy_set

import models
import models.csflow  # registers "csflow" until models/__init__ imports it
from models.base import backbone_problem, compatible_backbones
from models.components.flows import gaussian_nll
from models.csflow import CrossScaleSubnet, CSFlow
from models.errors import ModelError

# A randomly initialised EfficientNet's deep features are tiny (about 1e-4 to 1e-6 at stage 6:
# eval-mode batch norm with statistics that do not fit random weights shrinks them stage by
# stage), and the flow starts as the identity, so after two epochs at the paper's learning rate
# the scores are mostly the features' own energy; what the flow learns is checked on features
# of unit scale below. At 64 px the paper's stride-32 stage gives a 2 x 2 map; stage 4
# (blocks.3, stride 16) gives 4 x 4, enough to check localisation (image AUROC 0.97-1.0 and
# pixel AUROC 0.90-0.92 for seeds 0-2). 16 hidden channels instead of 1024 keep a fit under a
# second.
CONFIG = {"backbone": "efficientnet_b0", "layer": "blocks.3", "hidden_channels": 16}
EPOCHS = 2


def fit(seed: int = 0, epochs: int = EPOCHS, on_epoch_end=None, **overrides):
    detector = models.create("csflow", pretrained=False, seed=seed, **{**CONFIG, **overrides})
    history: list[tuple[int, dict]] = []

    def record(epoch: int, metrics: dict) -> bool:
        history.append((epoch, metrics))
        return bool(on_epoch_end and on_epoch_end(epoch, metrics))

    stats = detector.fit(batches(toy_set().train), epochs=epochs, on_epoch_end=record)
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
    assert pixel_auroc(toy, prediction.anomaly_map) >= 0.85
    # Mean squared latents: never negative.
    assert prediction.score.min() >= 0 and prediction.anomaly_map.min() >= 0


def test_all_scales_map_is_the_product_of_the_scale_maps(fitted, toy, prediction):
    detector = fitted[0]
    detector.anomaly_map_mode = "all"
    try:
        product = detector.predict(toy.test)
    finally:
        detector.anomaly_map_mode = "largest"
    assert torch.equal(product.score, prediction.score)
    with torch.no_grad():
        z, _ = detector.flow(detector.features(toy.test))
    coarser = [
        F.interpolate(zs.square().mean(1, keepdim=True), size=(64, 64), mode="bilinear")
        for zs in z[1:]
    ]
    expected = prediction.anomaly_map * coarser[0][:, 0] * coarser[1][:, 0]
    torch.testing.assert_close(product.anomaly_map, expected)
    assert pixel_auroc(toy, product.anomaly_map) >= 0.8


def test_reports_every_epoch_and_the_likelihood_rises(fitted):
    detector, stats, history = fitted
    assert [epoch for epoch, _ in history] == list(range(1, EPOCHS + 1))
    losses = [metrics["loss"] for _, metrics in history]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]
    assert stats == {"epochs": EPOCHS, "loss": losses[-1]}
    assert not detector.training


def test_stops_when_told_and_the_same_seed_gives_the_same_scores(toy, prediction):
    # Asked for 5 epochs, told to stop after the second: the same two epochs as the fixture's.
    detector, stats, history = fit(seed=0, epochs=5, on_epoch_end=lambda e, m: e == 2)
    assert [epoch for epoch, _ in history] == [1, 2] and stats["epochs"] == 2
    again = detector.predict(toy.test)
    assert torch.equal(again.score, prediction.score)
    assert torch.equal(again.anomaly_map, prediction.anomaly_map)


def test_default_budget_comes_from_the_constructor(toy):
    detector = models.create("csflow", pretrained=False, epochs=1, **CONFIG)
    seen = []
    detector.fit(batches(toy.train[:4]), on_epoch_end=lambda e, m: seen.append(e) or False)
    assert seen == [1]


def test_state_dict_round_trip(fitted, toy, prediction):
    restored = models.create("csflow", pretrained=False, **CONFIG)
    with pytest.raises(ModelError, match="before fit"):
        restored.predict(toy.test[:2])
    restored.load_state_dict(fitted[0].state_dict())
    assert torch.equal(restored.predict(toy.test).score, prediction.score)


def test_backbone_frozen_flow_trained(fitted):
    detector = fitted[0]
    trainable, frozen = detector.param_counts()
    assert trainable == sum(p.numel() for p in detector.flow.parameters())
    assert frozen == sum(p.numel() for p in detector.extractor.parameters())
    assert not any(p.requires_grad for p in detector.extractor.parameters())
    # Only the stem and the stages up to the layer are kept: EfficientNet-B0 to blocks.3.
    assert frozen == 308_660


def test_papers_configuration_has_the_reference_sizes():
    # EfficientNet-B5 up to blocks.5 (the paper's layer 36, Table B.8's "6.8") has the 17.5M
    # frozen parameters of the reference study's Table 2 and gives 304 x 24 x 24 at 768 px
    # (checked here at 128 px: 4 x 4, 2 x 2 and 1 x 1 for the three scales).
    detector = models.create("csflow", pretrained=False, hidden_channels=4)
    assert detector.channels == 304
    assert round(detector.param_counts()[1] / 1e6, 1) == 17.5
    with torch.no_grad():
        maps = detector.features(torch.zeros(1, 3, 128, 128))
    assert [tuple(m.shape) for m in maps] == [(1, 304, 4, 4), (1, 304, 2, 2), (1, 304, 1, 1)]
    # The default flow, counted without allocating it: two subnets (152 -> 1024 -> 304
    # channels at each scale) per block, 3 x 3 kernels but 5 x 5 in the last block: Table 2's
    # 275M trainable parameters.
    with torch.device("meta"):
        sizes = {
            k: sum(p.numel() for p in CrossScaleSubnet([152] * 3, [304] * 3, 1024, k).parameters())
            for k in (3, 5)
        }
    assert round(2 * (3 * sizes[3] + sizes[5]) / 1e6) == 275


def test_cross_scale_flow_learns_a_density_and_inverts():
    # Unit-scale features with channels correlated within and across scales, as pretrained
    # features have: the flow must raise their likelihood well above the identity's, find
    # shifted ones unlikely, and invert exactly.
    detector = models.create(
        "csflow",
        pretrained=False,
        backbone="efficientnet_b0",
        layer="blocks.1",
        hidden_channels=16,
        n_coupling_blocks=2,
    )
    flow = detector.flow
    generator = torch.Generator().manual_seed(0)
    channels = detector.channels
    mixing = torch.randn(channels, channels, generator=generator) / math.sqrt(channels)
    offset = torch.randn(channels, 1, 1, generator=generator)

    def sample(n: int) -> list[torch.Tensor]:
        fine = torch.randn(n, channels, 4, 4, generator=generator)
        fine = torch.einsum("dc,bchw->bdhw", 2.0 * mixing, fine) + offset
        return [fine, F.avg_pool2d(fine, 2), F.avg_pool2d(fine, 4)]

    @torch.no_grad()
    def nll(xs: list[torch.Tensor]) -> float:
        z, log_det = flow(xs)
        return float(gaussian_nll(z, log_det, per_dimension=True))

    held_out = sample(16)
    before = nll(held_out)
    optimizer = torch.optim.Adam(flow.parameters(), lr=2e-2)
    for _ in range(20):
        z, log_det = flow(sample(16))
        loss = gaussian_nll(z, log_det, per_dimension=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    flow.eval()
    with torch.no_grad():
        assert nll(held_out) < before - 0.5
        z, _ = flow(held_out)
        restored, _ = flow(z, reverse=True)
        for x, r in zip(held_out, restored, strict=True):
            torch.testing.assert_close(r, x, rtol=1e-4, atol=1e-4)
        # Off-distribution features (shifted by 3 standard units) are less likely.
        assert nll([x + 3.0 for x in held_out]) > nll(held_out) + 1.0


def test_predict_before_fit_and_empty_training_set_are_errors(toy):
    detector = models.create("csflow", pretrained=False, **CONFIG)
    with pytest.raises(ModelError, match="before fit"):
        detector.predict(toy.test[:2])
    with pytest.raises(ModelError, match="empty"):
        detector.fit([], epochs=1)


def test_creating_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    models.create("csflow", pretrained=False, **CONFIG)
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ({"layer": "blocks.7"}, "layer"),
        ({"layer": "layer4"}, "layer"),
        ({"n_coupling_blocks": 0}, "n_coupling_blocks"),
        ({"hidden_channels": 2.5}, "hidden_channels"),
        ({"kernel_size": 2}, "kernel_size"),
        ({"last_kernel_size": 0}, "last_kernel_size"),
        ({"grad_clip_norm": -1.0}, "grad_clip_norm"),
        ({"anomaly_map_mode": "max"}, "anomaly_map_mode"),
        ({"clamp": -1.0}, "clamp"),
        ({"lr": 0.0}, "lr"),
        ({"eps": 0.0}, "eps"),
        ({"weight_decay": -1e-5}, "weight_decay"),
        ({"betas": (0.5, 1.0)}, "betas"),
        ({"epochs": 0}, "epochs"),
    ],
)
def test_bad_hyperparameters_are_errors_naming_them(bad, named):
    with pytest.raises(ModelError, match=rf"^csflow: {named}"):
        CSFlow(pretrained=False, **{**CONFIG, **bad})


def test_defaults_are_table_b8():
    defaults = models.hyperparameters("csflow")
    assert {
        k: defaults[k] for k in ("backbone", "layer", "lr", "weight_decay", "eps", "epochs")
    } == {
        "backbone": "efficientnet_b5",
        "layer": "blocks.5",
        "lr": 2e-4,
        "weight_decay": 1e-5,
        "eps": 1e-4,
        "epochs": 240,
    }
    # The paper's flow: 4 coupling blocks, clamp 3, 1024 hidden channels, 3 x 3 kernels (5 x 5
    # in the last block); Adam's betas and the gradient clipping of the reference code.
    assert (defaults["n_coupling_blocks"], defaults["clamp"]) == (4, 3.0)
    assert (defaults["hidden_channels"], defaults["kernel_size"]) == (1024, 3)
    assert (defaults["last_kernel_size"], defaults["betas"]) == (5, (0.5, 0.9))
    assert (defaults["grad_clip_norm"], defaults["anomaly_map_mode"]) == (1.0, "largest")
    assert models.get_class("csflow").learning_type == "iterative"


def test_only_efficientnets_with_a_stage_layer():
    assert backbone_problem("csflow", "efficientnet_b5") is None
    assert "efficientnet_b" in backbone_problem("csflow", "resnet18")
    assert "cait_m48_448" not in compatible_backbones("csflow")
    assert set(compatible_backbones("csflow")) == {f"efficientnet_b{i}" for i in range(8)}
    problem = backbone_problem("csflow", "efficientnet_b0", {"layer": "blocks.9"})
    assert problem is not None and "blocks.5" in problem
    with pytest.raises(ModelError, match="cannot use backbone 'wide_resnet50_2'"):
        models.create("csflow", backbone="wide_resnet50_2", pretrained=False)
