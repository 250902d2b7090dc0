"""`sweep results --recompute`: image-level metrics again from stored per-image results."""

from __future__ import annotations

import math
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score
from typer.testing import CliRunner

from sweep.cli import app
from sweep.errors import SweepError
from sweep.results import IMAGE_SCHEMA, ResultStore, read_images, read_results, row_schema
from sweep.run.metrics import SplitOutputs, evaluate, youden
from sweep.run.recompute import recompute_output

runner = CliRunner()
SCHEMA = row_schema({})
PIXEL_NOTE = "pixel_*: detector gives no anomaly map"


def _split(rng: np.random.Generator, normal: int, anomalous: int) -> tuple[np.ndarray, ...]:
    labels = np.r_[np.zeros(normal, int), np.ones(anomalous, int)]
    return labels, np.round(rng.normal(size=labels.size) + 1.2 * labels, 2)


def _trial(store: ResultStore, digest: str, seed: int, *, images: bool = True, val=None) -> dict:
    """A scored row as the trainable writes it (image metrics from ``evaluate``), and its
    per-image results; ``val`` replaces the drawn validation (labels, scores)."""
    rng = np.random.default_rng(seed)
    (val_labels, val_scores), (test_labels, test_scores) = _split(rng, 6, 4), _split(rng, 12, 8)
    if val is not None:
        val_labels, val_scores = (np.asarray(v) for v in val)
    metrics = evaluate(
        SplitOutputs(val_labels, val_scores, None, None),
        SplitOutputs(test_labels, test_scores, None, None),
    )
    now = datetime.now(timezone.utc)
    row = {
        "study": "s",
        "config_hash": digest,
        "trial_id": digest,
        "status": "ok",
        "model": "padim",
        "seed": seed,
        "started_at": now,
        "finished_at": now,
        **metrics,
    }
    store.write_row(row, SCHEMA)
    if images:
        n_val, n_test = val_labels.size, test_labels.size
        labels = [*val_labels, *test_labels]
        store.write_images(
            digest,
            pa.table(
                {
                    "config_hash": [None] * (n_val + n_test),
                    "split": ["val"] * n_val + ["test"] * n_test,
                    "index": [*range(n_val), *range(n_test)],
                    "path": [f"img{i}.png" for i in range(n_val + n_test)],
                    "label": labels,
                    "defect": ["good" if v == 0 else "scratch" for v in labels],
                    "defect_pixels": [0 if v == 0 else 40 + i for i, v in enumerate(labels)],
                    "defect_fraction": [None] * (n_val + n_test),
                    "score": [*val_scores, *test_scores],
                },
                schema=IMAGE_SCHEMA,
            ),
        )
    return {"val": (val_labels, val_scores), "test": (test_labels, test_scores), "row": row}


@pytest.fixture
def output(tmp_path):
    store = ResultStore(tmp_path / "out")
    trials = {f"t{seed}": _trial(store, f"t{seed}", seed) for seed in range(3)}
    trials["old"] = _trial(store, "old", 7, images=False)
    now = datetime.now(timezone.utc)
    error = {
        **dict(study="s", config_hash="bad", trial_id="bad", status="error", error="boom"),
        **dict(model="padim", seed=9, started_at=now, finished_at=now),
    }
    store.write_row(error, SCHEMA)
    return tmp_path / "out", trials


def test_per_image_results_read_back_with_their_trial(output):
    directory, trials = output
    images = read_images(directory)
    assert set(images["config_hash"]) == {"t0", "t1", "t2"}
    assert len(images) == 3 * 30
    one = read_images(directory, ["t1"])
    test = one[one["split"] == "test"]
    assert test["score"].tolist() == pytest.approx(trials["t1"]["test"][1].tolist())
    assert read_images(directory, ["old"]).empty


def test_recompute_with_the_rows_own_policy_changes_nothing(output):
    directory, _ = output
    before = read_results(directory).set_index("config_hash")
    summary = recompute_output(str(directory))
    after = read_results(directory).set_index("config_hash")
    assert sorted(summary.recomputed) == ["t0", "t1", "t2"]
    assert summary.without_images == ["old"] and summary.not_scored == 1
    assert summary.policies == {"f1_max": 3}
    pd.testing.assert_frame_equal(before.sort_index(), after.sort_index())


def test_recompute_with_another_policy_rewrites_the_image_columns_only(output):
    directory, trials = output
    before = read_results(directory).set_index("config_hash")
    summary = recompute_output(str(directory), "youden")
    assert summary.policies == {"youden": 3}
    after = read_results(directory).set_index("config_hash")
    for digest in ("t0", "t1", "t2"):
        (val_labels, val_scores), (test_labels, test_scores) = (
            trials[digest]["val"],
            trials[digest]["test"],
        )
        row = after.loc[digest]
        threshold = youden(val_labels, val_scores)[1]
        assert row.threshold_policy == "youden"
        assert row.image_threshold == threshold
        assert row.image_f1 == pytest.approx(f1_score(test_labels, test_scores >= threshold))
        flagged = test_scores >= threshold
        assert row.image_fp == int(np.sum(flagged & (test_labels == 0)))
        assert row.image_fn == int(np.sum(~flagged & (test_labels == 1)))
        # Threshold-free metrics and the pixel side do not move.
        assert row.image_auroc == pytest.approx(roc_auc_score(test_labels, test_scores))
        assert row.image_ap == pytest.approx(average_precision_score(test_labels, test_scores))
        assert row.pixel_threshold_policy == "f1_max"
        assert math.isnan(row.pixel_auroc)
        assert PIXEL_NOTE in row.metric_notes
    # The row without per-image results and the error row are left as they were.
    assert after.loc["old"].threshold_policy == before.loc["old"].threshold_policy == "f1_max"
    assert after.loc["bad"].status == "error"


def test_recompute_notes_say_why_a_threshold_is_missing(tmp_path):
    store = ResultStore(tmp_path / "out")
    # The highest validation score is a normal image: no threshold is perfectly precise.
    _trial(store, "t", 0, val=([1, 0, 1, 0], [0.5, 0.9, 0.4, 0.1]))
    recompute_output(str(tmp_path / "out"), "precision_at:1.0")
    row = read_results(tmp_path / "out").iloc[0]
    assert math.isnan(row.image_threshold) and math.isnan(row.image_f1)
    assert pd.isna(row.image_tp)
    assert (
        "image_threshold and its metrics (precision_at:1): no validation threshold reaches "
        "precision 1" in row.metric_notes
    )
    assert PIXEL_NOTE in row.metric_notes
    assert not math.isnan(row.image_auroc)


def test_recompute_waits_for_no_running_sweep(output):
    directory, _ = output
    with ResultStore(directory).lock(), pytest.raises(SweepError, match="in use by another"):
        recompute_output(str(directory))


def test_cli_recompute(output):
    directory, _ = output
    result = runner.invoke(
        app, ["results", str(directory), "--recompute", "--threshold", "iou_max"]
    )
    assert result.exit_code == 0, result.output
    assert "recomputed the image-level metrics of 3 row(s)" in result.output
    assert "1 scored row(s) have no per-image results" in result.output
    assert set(read_results(directory).query("status == 'ok'").threshold_policy) == {
        "iou_max",
        "f1_max",  # the row without per-image results
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--recompute", "--threshold", "precision_at:2"], "--threshold 'precision_at:2'"),
        (["--recompute", "--threshold", "median"], "unknown threshold policy 'median'"),
        (["--threshold", "youden"], "--threshold applies with --recompute"),
    ],
)
def test_cli_recompute_bad_input_exits_2(output, args, message):
    directory, _ = output
    result = runner.invoke(app, ["results", str(directory), *args])
    assert result.exit_code == 2
    assert message in result.output
