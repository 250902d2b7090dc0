"""`sweep cascade`: cascades, OR/AND ensembles and score averages from per-image results."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from scipy.stats import zscore
from typer.testing import CliRunner

from sweep.cli import app
from sweep.read.cascade import (
    Member,
    aggregate_candidates,
    cascade_front,
    decision_metrics,
    evaluate_average,
    evaluate_cascade,
    evaluate_single,
    evaluate_vote,
    f1_max_threshold,
    normalise,
    per_seed_candidates,
    recall_at_precision,
)
from sweep.results import IMAGE_SCHEMA, ResultStore, row_schema
from sweep.run import metrics as run_metrics

runner = CliRunner()

# The hand-worked case: 6 validation images (3 good, 3 anomalous), 8 test images (4 and 4).
VAL_LABELS = np.array([0, 0, 0, 1, 1, 1], bool)
TEST_LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1], bool)
A_VAL = np.array([0.1, 0.2, 0.3, 0.25, 0.6, 0.9])
A_TEST = np.array([0.1, 0.2, 0.3, 0.5, 0.4, 0.7, 0.8, 0.22])
B_VAL = np.array([0.1, 0.3, 0.2, 0.5, 0.7, 0.9])
B_TEST = np.array([0.6, 0.1, 0.2, 0.7, 0.9, 0.8, 0.3, 0.95])
# A: fast (2 ms), threshold 0.6; B: slow (10 ms), threshold 0.5.
A = Member("a", VAL_LABELS, A_VAL, TEST_LABELS, A_TEST, threshold=0.6, latency_ms=2.0)
B = Member("b", VAL_LABELS, B_VAL, TEST_LABELS, B_TEST, threshold=0.5, latency_ms=10.0)


def test_cascade_hand_worked():
    # Stage 1 (A) at recall >= 0.99 of 3 validation anomalies keeps all 3: t1 = the lowest
    # anomaly score, 0.25. On test A flags images 2 (0.3), 3, 4, 5, 6: 5 of 8 go to stage 2,
    # so latency = 2 + 5/8 * 10 = 8.25 ms. Image 7 (anomalous, 0.22) is passed as good: FN.
    # B (>= 0.5) on those five: 2 (0.2) no, 3 (0.7) yes but good: FP, 4 (0.9) TP, 5 (0.8) TP,
    # 6 (0.3) no: FN. TP 2, FP 1, FN 2: precision 2/3, recall 1/2, F1 = 4 / (3 + 4) = 4/7.
    row = evaluate_cascade(A, B, min_precision=0.6, stage1_recall=0.99)
    assert row["stage1_flagged"] == pytest.approx(5 / 8)
    assert row["latency_ms"] == pytest.approx(8.25)
    assert row["precision"] == pytest.approx(2 / 3)
    assert row["recall"] == pytest.approx(0.5)
    assert row["f1"] == pytest.approx(4 / 7)
    assert row["recall_at_p"] == pytest.approx(0.5)  # precision 2/3 >= 0.6
    # At P = 0.95 the decision is not precise enough: recall at precision 0 (rows' convention).
    assert evaluate_cascade(A, B, 0.95, 0.99)["recall_at_p"] == 0.0

    # B -> A: t1 = 0.5 (B's lowest validation anomaly); B flags 0, 3, 4, 5, 7 (5/8), A (>= 0.6)
    # confirms 5 only: TP 1, FP 0; latency 10 + 5/8 * 2 = 11.25; F1 = 2 / (1 + 4) = 0.4.
    back = evaluate_cascade(B, A, 0.95, 0.99)
    assert back["latency_ms"] == pytest.approx(11.25)
    assert (back["precision"], back["recall"], back["f1"]) == pytest.approx((1.0, 0.25, 0.4))
    assert back["recall_at_p"] == pytest.approx(0.25)

    # Stage-1 recall 0.5: k = ceil(1.5) = 2, t1 = the 2nd highest anomaly, 0.6. A flags 5
    # (0.7) and 6 (0.8): 2/8 go on (latency 2 + 2.5 = 4.5); B confirms 5: TP 1.
    loose = evaluate_cascade(A, B, 0.95, 0.5)
    assert loose["stage1_flagged"] == pytest.approx(0.25)
    assert loose["latency_ms"] == pytest.approx(4.5)
    assert (loose["precision"], loose["recall"]) == pytest.approx((1.0, 0.25))


def test_singles_or_and_average_hand_worked():
    # A >= 0.6 flags 5, 6: TP 2 -> F1 4/6. Test recall at precision 0.95 over A's scores:
    # 0.8 (1), 0.7 (1), 0.5 (0) ...: 2 of 4 at precision 1.
    single = evaluate_single(A, 0.95)
    assert (single["f1"], single["recall_at_p"], single["latency_ms"]) == pytest.approx(
        (2 / 3, 0.5, 2.0)
    )
    # B >= 0.5 flags 0, 3, 4, 5, 7: TP 3, FP 2 -> F1 6/9; 0.95, 0.9, 0.8 anomalous: 3/4.
    assert (evaluate_single(B, 0.95)["f1"], evaluate_single(B, 0.95)["recall_at_p"]) == (
        pytest.approx(2 / 3),
        pytest.approx(0.75),
    )
    # OR: 0, 3, 4, 5, 6, 7: TP 4, FP 2 -> F1 8/10; AND: 5 only -> F1 2/5. Both run A and B.
    either = evaluate_vote([A, B], "or", 0.95)
    both = evaluate_vote([A, B], "and", 0.95)
    assert (either["precision"], either["recall"], either["f1"]) == pytest.approx((2 / 3, 1, 0.8))
    assert (both["precision"], both["recall"], both["f1"]) == pytest.approx((1, 0.25, 0.4))
    assert either["latency_ms"] == both["latency_ms"] == 12.0
    # Average: both members have validation normals {0.1, 0.2, 0.3} (mean 0.2, same std), so the
    # average ranks as A + B. Validation sums: good 0.2, 0.5, 0.5, anomalous 0.75, 1.3, 1.8:
    # F1-max (= 1) at 0.75. Test sums 0.7, 0.3, 0.5, 1.2 | 1.3, 1.5, 1.1, 1.17: >= 0.75 flags
    # 3 (FP) and every anomaly: precision 0.8, recall 1, F1 8/9. Recall at precision 0.95:
    # 1.5 (1), 1.3 (1), 1.2 (0): 2/4.
    mean = evaluate_average([A, B], 0.95)
    assert (mean["precision"], mean["recall"], mean["f1"]) == pytest.approx((0.8, 1, 8 / 9))
    assert mean["recall_at_p"] == pytest.approx(0.5)
    assert mean["latency_ms"] == 12.0


def test_or_and_against_brute_force():
    rng = np.random.default_rng(3)
    val_labels, test_labels = rng.random(30) < 0.4, rng.random(50) < 0.4
    members = [
        Member(
            f"m{i}",
            val_labels,
            rng.normal(size=30),
            test_labels,
            np.round(rng.normal(size=50) + test_labels, 1),  # ties at the threshold too
            threshold=0.5,
            latency_ms=float(i + 1),
        )
        for i in range(3)
    ]
    for rule, combine in (("or", any), ("and", all)):
        flagged = [combine(m.test_scores[i] >= m.threshold for m in members) for i in range(50)]
        tp = sum(f and y for f, y in zip(flagged, test_labels, strict=True))
        expected_precision = tp / sum(flagged)
        expected_recall = tp / test_labels.sum()
        row = evaluate_vote(members, rule, 0.9)
        assert row["precision"] == pytest.approx(expected_precision)
        assert row["recall"] == pytest.approx(expected_recall)
        assert row["f1"] == pytest.approx(
            2 * expected_precision * expected_recall / (expected_precision + expected_recall)
        )
        assert row["latency_ms"] == 6.0
        precise = expected_precision >= 0.9
        assert row["recall_at_p"] == pytest.approx(expected_recall if precise else 0.0)


def test_numpy_metrics_match_the_run_side():
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = rng.random(40) < 0.3
        scores = np.round(rng.normal(size=40) + labels, 1)  # ties
        for p in (0.6, 0.9, 1.0):
            assert recall_at_precision(labels, scores, p) == pytest.approx(
                run_metrics.recall_at_precision(labels, scores, p)[0]
            )
        assert f1_max_threshold(labels, scores) == run_metrics.f1_max(labels, scores)[1]
        flagged = scores >= 0.5
        assert decision_metrics(labels, flagged)["f1"] == pytest.approx(
            run_metrics.f1_at(labels, scores, 0.5)
        )


def test_normalisation_uses_validation_normals_and_makes_the_average_scale_free():
    z = normalise(VAL_LABELS, A_VAL, A_VAL)
    # The validation normals become z-scores of themselves (population std, as scipy's).
    assert z[:3] == pytest.approx(zscore(A_VAL[:3]))
    assert normalise(VAL_LABELS, A_VAL, A_TEST) == pytest.approx((A_TEST - 0.2) / A_VAL[:3].std())
    # A member on another scale (a distance in the thousands) changes nothing once normalised;
    # averaging the raw scores would let it decide alone.
    rescaled = Member(
        "b", VAL_LABELS, 1000 * B_VAL + 7, TEST_LABELS, 1000 * B_TEST + 7, 507.0, 10.0
    )
    assert evaluate_average([A, rescaled], 0.95) == pytest.approx(
        evaluate_average([A, B], 0.95), nan_ok=True
    )
    # A constant member (std 0) only shifts the average.
    flat = Member("c", VAL_LABELS, np.ones(6), TEST_LABELS, np.ones(8), 1.0, 1.0)
    assert math.isfinite(evaluate_average([A, flat], 0.95)["f1"])


def test_a_dominating_cascade_joins_the_front_and_pushes_the_slow_model_off():
    # Fast: catches every anomaly but also half the good images. Slow: perfect, 10 ms.
    # Fast -> slow: perfect (F1 1) at 1 + (half the good + all anomalies) * 10 < 10 ms.
    rng = np.random.default_rng(1)
    val_labels = np.r_[np.zeros(10), np.ones(6)].astype(bool)
    test_labels = np.r_[np.zeros(20), np.ones(10)].astype(bool)

    def fast_scores(labels):
        noisy = rng.random(labels.size) < 0.5
        return np.where(labels | noisy, 1.0 + rng.random(labels.size), rng.random(labels.size))

    members = {}
    for seed in (0, 1):
        fast_val, fast_test = fast_scores(val_labels), fast_scores(test_labels)
        fast_val[-1] = 1.0  # stage 1 keeps every validation anomaly: t1 = 1, below all
        members.setdefault("fast", {})[seed] = Member(
            "fast", val_labels, fast_val, test_labels, fast_test, 1.0, 1.0
        )
        slow_val = val_labels + 0.1 * rng.random(16)
        slow_test = test_labels + 0.1 * rng.random(30)
        members.setdefault("slow", {})[seed] = Member(
            "slow", val_labels, slow_val, test_labels, slow_test, 0.5, 10.0
        )
    per_seed, notes = per_seed_candidates(members, max_members=2)
    assert not notes
    assert set(per_seed["kind"]) == {"single", "cascade", "or", "and", "average"}
    assert (per_seed.groupby("candidate").size() == 2).all()  # paired by seed
    agg = aggregate_candidates(per_seed)
    selection = cascade_front(agg, "f1")
    front = set(selection.front["candidate"])
    by_name = agg.set_index("candidate")
    assert by_name.at["fast -> slow", "f1_mean"] == 1.0
    assert by_name.at["fast -> slow", "latency_ms_mean"] < 10.0
    assert "fast -> slow" in front and "slow" not in front
    assert "fast" in front  # the fastest stays: nothing beats 1 ms


def _write_trial(store, digest, model, seed, val, test, threshold, latency, **extra):
    now = datetime.now(timezone.utc)
    row = dict(study="s", config_hash=digest, trial_id=digest, status="ok", model=model)
    row |= dict(seed=seed, started_at=now, finished_at=now, augmentation="none", stress="none")
    row |= dict(image_threshold=threshold, threshold_policy="f1_max", latency_ms=latency)
    store.write_row(row | extra, row_schema({}))
    labels = [*VAL_LABELS.astype(int), *TEST_LABELS.astype(int)]
    n_val, n = VAL_LABELS.size, len(labels)
    table = {
        "config_hash": [None] * n,
        "split": ["val"] * n_val + ["test"] * (n - n_val),
        "index": [*range(n_val), *range(n - n_val)],
        "path": [f"img{i}.png" for i in range(n)],
        "label": labels,
        "defect": ["good" if v == 0 else "scratch" for v in labels],
        "defect_pixels": [0] * n,
        "defect_fraction": [0.0] * n,
        "score": [*val, *test],
    }
    store.write_images(digest, pa.table(table, schema=IMAGE_SCHEMA))


@pytest.fixture
def output(tmp_path):
    store = ResultStore(tmp_path / "out")
    for seed, extra_ms in ((0, 0.0), (1, 2.0)):
        _write_trial(store, f"a{seed}", "fast", seed, A_VAL, A_TEST, 0.6, 2.0 + extra_ms)
        _write_trial(store, f"b{seed}", "slow", seed, B_VAL, B_TEST, 0.5, 10.0)
    # Left out: a stressed trial, and a seed only one configuration ran pairs with nothing.
    _write_trial(store, "s0", "fast", 0, A_VAL, A_TEST, 0.6, 2.0, stress="lighting")
    _write_trial(store, "a2", "fast", 2, A_VAL, A_TEST, 0.6, 2.0)
    return tmp_path / "out"


def test_cli_on_a_tiny_output(output):
    result = runner.invoke(app, ["cascade", str(output), "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    candidates = {c["candidate"]: c for c in data["candidates"]}
    cascade = candidates["fast -> slow"]
    assert cascade["n_seeds"] == 2  # seed 2 of fast has no partner
    # Seed 0: 2 + 5/8 * 10 = 8.25 ms; seed 1: 4 + 6.25 = 10.25 ms.
    assert cascade["latency_ms_mean"] == pytest.approx(9.25)
    assert cascade["f1_mean"] == pytest.approx(4 / 7) and cascade["f1_std"] == 0.0
    assert candidates["fast"]["n_seeds"] == 3
    assert candidates["fast | slow"]["f1_mean"] == pytest.approx(0.8)
    assert candidates["mean(fast, slow)"]["f1_mean"] == pytest.approx(8 / 9)
    assert set(data["front"]) >= {"fast"}
    assert any("augmentation or a stress" in n for n in data["notes"])

    table = runner.invoke(app, ["cascade", str(output)])
    assert table.exit_code == 0, table.output
    assert "fast -> slow" in table.stdout and "front (f1 max" in table.stdout

    alone = runner.invoke(app, ["cascade", str(output), "--top", "1", "--format", "json"])
    assert alone.exit_code == 0, alone.output
    kinds = {c["candidate"]: c["kind"] for c in json.loads(alone.stdout)["candidates"]}
    assert kinds == {"fast": "single", "slow": "single"}

    for bad in (["--precision", "1.5"], ["--max-members", "1"], ["--objective", "auroc"]):
        refused = runner.invoke(app, ["cascade", str(output), *bad])
        assert refused.exit_code == 2, bad


def test_cli_refuses_an_output_without_per_image_results(tmp_path):
    store = ResultStore(tmp_path / "old")
    now = datetime.now(timezone.utc)
    row = dict(study="s", config_hash="x", trial_id="x", status="ok", model="padim", seed=0)
    store.write_row(row | dict(started_at=now, finished_at=now), row_schema({}))
    result = runner.invoke(app, ["cascade", str(tmp_path / "old")])
    assert result.exit_code == 2
    assert "per-image results" in result.output
    missing = runner.invoke(app, ["cascade", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2


@pytest.mark.slow
@pytest.mark.ray
def test_cascade_on_a_smoke_study_s_output(ray_session, tmp_path):
    """Issue 17's check: `sweep cascade` on the seeds study's smoke form (three detectors, two
    seeds, real per-image results) prints the candidates and their front."""
    import yaml

    from sweep.run.runner import run_study
    from sweep.run.smoke import smoke_form
    from sweep.run.study import apply_override, load_study, study_from_dict, study_to_yaml

    seeds = Path(__file__).resolve().parent.parent / "studies" / "seeds.yaml"
    raw = yaml.safe_load(
        study_to_yaml(smoke_form(load_study(seeds), data_root=str(tmp_path / "glue")))
    )
    apply_override(raw, "space.seed", value={"grid": [0, 1]})
    study = study_from_dict(raw)
    output = tmp_path / "out"
    assert run_study(study, output=str(output)).ok == 2 * len(study.models)
    result = runner.invoke(app, ["cascade", str(output), "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    kinds = {c["kind"] for c in report["candidates"]}
    assert {"single", "cascade", "or", "and", "average"} <= kinds
    assert report["front"], "some candidates are on the front"
    table = runner.invoke(app, ["cascade", str(output)])
    assert table.exit_code == 0 and "front" in table.output
