"""Result rows: atomic one-file-per-trial Parquet, stable schema, readable by pandas and DuckDB."""

from __future__ import annotations

import math
import os
from datetime import datetime, timezone

import pandas as pd
import pyarrow as pa
import pytest

from sweep.results import BASE_SCHEMA, ResultStore, hp_column_types, read_results, row_schema


def make_row(digest: str, **values) -> dict:
    now = datetime.now(timezone.utc)
    return {
        "study": "s",
        "config_hash": digest,
        "trial_id": digest,
        "status": "ok",
        "model": "patchcore",
        "seed": 0,
        "image_auroc": 0.9,
        "started_at": now,
        "finished_at": now,
        **values,
    }


def test_hp_types_follow_values():
    types = hp_column_types(
        {
            "coreset_ratio": [0.1, 1],
            "num_neighbors": [9, 3],
            "layers": [("layer2", "layer3")],
            "pretrained": [True, False],
            "weights": [None],
            "mixed": [1, "a"],
        }
    )
    assert types["coreset_ratio"] == pa.float64()
    assert types["num_neighbors"] == pa.int64()
    assert types["layers"] == pa.string()
    assert types["pretrained"] == pa.bool_()
    assert types["weights"] == pa.string()
    assert types["mixed"] == pa.string()


def test_rows_round_trip_with_pandas_and_duckdb(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    schema = row_schema(hp_column_types({"coreset_ratio": [0.1], "layers": [("a", "b")]}))
    store = ResultStore(tmp_path / "out")
    store.write_row(make_row("aaa", **{"hp.coreset_ratio": 0.1, "hp.layers": ("a", "b")}), schema)
    store.write_row(make_row("bbb", status="error", error="boom", image_auroc=float("nan")), schema)
    (tmp_path / "out" / "_study.yaml").write_text("name: s\n")  # non-row files are skipped

    df = read_results(tmp_path / "out")
    assert sorted(df["config_hash"]) == ["aaa", "bbb"]
    row = df.set_index("config_hash").loc["aaa"]
    assert row["hp.layers"] == '["a", "b"]' and row["hp.coreset_ratio"] == 0.1
    assert math.isnan(df.set_index("config_hash").loc["bbb", "image_auroc"])

    plain = pd.read_parquet(tmp_path / "out")
    assert len(plain) == 2 and "hp.coreset_ratio" in plain.columns
    rows = duckdb.sql(
        f"SELECT count(*), count_if(status = 'ok') FROM '{tmp_path}/out/**/*.parquet'"
    ).fetchall()
    assert rows == [(2, 1)]
    assert store.statuses() == {"aaa": "ok", "bbb": "error"}


def test_write_replaces_same_hash_and_leaves_no_temp_files(tmp_path):
    schema = row_schema({})
    store = ResultStore(tmp_path)
    store.write_row(make_row("h1", status="error"), schema)
    store.write_row(make_row("h1", status="ok"), schema)
    assert store.statuses() == {"h1": "ok"}
    assert sorted(os.listdir(tmp_path)) == ["h1.parquet"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    schema = row_schema({})
    store = ResultStore(tmp_path)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("sweep.results.os.replace", broken)
    with pytest.raises(OSError, match="disk full"):
        store.write_row(make_row("h2"), schema)
    assert os.listdir(tmp_path) == []


def test_row_outside_schema_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"hp\.unknown"):
        ResultStore(tmp_path).write_row(make_row("h3", **{"hp.unknown": 1}), row_schema({}))


DESIGNED_COLUMNS = """
study trial_id config_hash status error model backbone seed image_size dataset category
augmentation image_auroc image_f1 pixel_auroc pixel_f1 pixel_aupro train_s latency_ms
throughput_fps params_trainable params_frozen peak_rss_mb peak_gpu_mb device hostname versions
started_at finished_at image_f1max pixel_f1max image_threshold pixel_threshold
"""


def test_base_schema_has_the_designed_columns():
    missing = [c for c in DESIGNED_COLUMNS.split() if c not in BASE_SCHEMA.names]
    assert missing == []
