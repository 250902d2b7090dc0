"""``sweep results`` (filter, pick columns, export) and the worked queries of
docs/results-schema.md, each run against a tiny study's rows."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from sweep.cli import app
from sweep.errors import SweepError
from sweep.read.query import apply_where, parse_condition
from tests.report_rows import write_study_output

runner = CliRunner()
DOC = Path(__file__).resolve().parents[1] / "docs" / "results-schema.md"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> Path:
    return write_study_output(
        tmp_path_factory.mktemp("query") / "out", augmentations=("none", "defocus")
    )


@pytest.fixture(scope="module")
def rows(output) -> pd.DataFrame:
    return pd.read_parquet(output)


def _doc_blocks(language: str) -> list[str]:
    text = DOC.read_text()
    section = text[text.index("## Querying") : text.index("## Columns")]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def test_documented_pandas_and_pyarrow_queries_run(output, rows):
    blocks = _doc_blocks("python")
    assert len(blocks) >= 3
    for block in blocks:
        assert "results/quickstart" in block
        namespace: dict = {}
        exec(block.replace("results/quickstart", str(output)), namespace)  # the doc's code
        produced = [v for v in namespace.values() if isinstance(v, (pd.DataFrame, pa.Table))]
        assert produced and all(len(v) for v in produced), block
    # Spot-check what the first block computes against the rows themselves.
    namespace = {}
    exec(blocks[0].replace("results/quickstart", str(output)), namespace)
    assert (
        len(namespace["df"]) == len(rows) == 37
    )  # 6 configs x 3 seeds x 2 augmentations + error row
    ok = rows[rows.status == "ok"]
    assert namespace["per_config"]["seeds"].max() == 3
    assert set(namespace["best_per_model"].index.get_level_values("model")) == set(ok.model)
    namespace = {}
    exec(blocks[2].replace("results/quickstart", str(output)), namespace)
    table = namespace["table"]
    assert table.num_rows == int(((rows.status == "ok") & (rows.image_auroc >= 0.8)).sum())


def test_documented_duckdb_queries_run(output, rows, tmp_path):
    duckdb = pytest.importorskip("duckdb")
    blocks = _doc_blocks("sql")
    assert len(blocks) >= 3
    results = []
    for block in blocks:
        assert "results/quickstart/[!._]*.parquet" in block
        results.append(duckdb.sql(block.replace("results/quickstart", str(output))).fetchall())
        assert results[-1], block
    configurations, errors, robustness = results[:3]
    ok = rows[rows.status == "ok"]
    assert sum(r[3] for r in configurations) == len(ok)
    assert [(e[0], e[3]) for e in errors] == [("stfpm", "error")]
    assert len(robustness) == 6 and all(-0.05 < r[3] < -0.01 for r in robustness)
    # The documented glob, unlike '*' and '**', leaves out files the readers must not see.
    (output / "_report").mkdir(exist_ok=True)
    rows.head(1).to_parquet(output / "_report" / "export.parquet")
    rows.head(1).to_parquet(output / ".tmp-half-written.parquet")
    try:
        count = duckdb.sql(f"SELECT count(*) FROM '{output}/[!._]*.parquet'").fetchall()
        assert count == [(len(rows),)]
        loose = duckdb.sql(f"SELECT count(*) FROM '{output}/**/*.parquet'").fetchall()
        assert loose[0][0] > len(rows)
    finally:
        (output / "_report" / "export.parquet").unlink()
        (output / ".tmp-half-written.parquet").unlink()


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        (["status == ok"], lambda d: d.status == "ok"),
        (["status=error"], lambda d: d.status == "error"),
        (["image_auroc >= 0.9"], lambda d: d.image_auroc >= 0.9),
        (["seed != 0"], lambda d: d.seed.notna() & (d.seed != 0)),
        (["model in patchcore,padim"], lambda d: d.model.isin(["patchcore", "padim"])),
        (["model not in [patchcore, 'padim']"], lambda d: d.model == "stfpm"),
        (["hp.coreset_ratio < 0.5"], lambda d: d["hp.coreset_ratio"] < 0.5),
        (["hp.coreset_ratio is null"], lambda d: d["hp.coreset_ratio"].isna()),
        (["error is not null"], lambda d: d.error.notna()),
        (
            ["error ~ 'diverged \\|'"],
            lambda d: d.error.fillna("").str.contains("diverged |", regex=False),
        ),
        (
            ["augmentation == defocus", "latency_ms < 10", "model == patchcore"],
            lambda d: (
                (d.augmentation == "defocus") & (d.latency_ms < 10) & (d.model == "patchcore")
            ),
        ),
    ],
)
def test_where_matches_pandas(rows, conditions, expected):
    got = apply_where(rows, conditions)
    want = rows[expected(rows).fillna(False).astype(bool)]
    assert len(want) > 0
    assert list(got.index) == list(want.index)


def test_where_with_nulls_follows_sql():
    df = pd.DataFrame({"a": [1.0, None, 3.0], "s": ["x", None, "y"]})
    assert list(apply_where(df, ["a != 1"]).index) == [2]  # the null row is not "not 1"
    assert list(apply_where(df, ["s not in x"]).index) == [2]
    assert list(apply_where(df, ["s < y"]).index) == [0]
    assert list(apply_where(df, ["a is null"]).index) == [1]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("image_auroc", "expected COLUMN OP VALUE"),
        ("image_auroc >=", "no value after '>='"),
        ("error is 3", "'is' takes 'null'"),
        ("model in ''", "an empty list"),
    ],
)
def test_bad_conditions_are_named(text, needle):
    with pytest.raises(SweepError, match=re.escape(needle)):
        parse_condition(text)


def test_results_table_and_exports(output, rows, tmp_path):
    result = invoke("results", output, "--where", "model == stfpm", "--where", "status == ok")
    assert result.exit_code == 0, result.output
    assert "6 of 37 rows" in result.output and "image_auroc" in result.output
    assert "augmentation" in result.output  # shown: some rows use a variant
    assert "hp.lr" not in result.output  # not a default table column

    result = invoke(
        "results", output, "--where", "status == ok", "--columns", "model,seed,hp.*",
        "--sort", "-seed,model", "--format", "csv",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    csv = pd.read_csv(io.StringIO(result.stdout))
    assert list(csv.columns[:2]) == ["model", "seed"]
    assert {c for c in csv.columns[2:]} == {c for c in rows.columns if c.startswith("hp.")}
    assert len(csv) == 36 and csv.seed.is_monotonic_decreasing

    result = invoke("results", output, "--where", "error ~ diverged", "--format", "json")
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert len(records) == 1 and records[0]["status"] == "error"
    assert records[0]["image_auroc"] is None and len(records[0]) == len(rows.columns)

    target = tmp_path / "sub" / "ok.parquet"
    result = invoke(
        "results", output, "--where", "status == ok", "--where", "image_auroc > 0.9",
        "--format", "parquet", "--output", target,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    exported = pd.read_parquet(target)
    assert len(exported) == int(((rows.status == "ok") & (rows.image_auroc > 0.9)).sum())
    assert list(exported.columns) == list(rows.columns)
    assert [p.name for p in target.parent.iterdir()] == ["ok.parquet"]

    result = invoke("results", output, "--limit", "2", "--format", "csv", "-o", tmp_path / "x.csv")
    assert result.exit_code == 0 and len(pd.read_csv(tmp_path / "x.csv")) == 2


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--where", "image_aurco > 0.5"], ["'image_aurco'", "did you mean 'image_auroc'"]),
        (["--where", "image_auroc > high"], ["image_auroc holds numbers", "'high'"]),
        (["--where", "timing_exclusive == maybe"], ["true/false"]),
        (["--where", "started_at > soon"], ["timestamps"]),
        (["--where", "error ~ ("], ["bad regular expression"]),
        (["--columns", "model,backbon"], ["--columns", "'backbon'", "did you mean 'backbone'"]),
        (["--columns", "zz.*"], ["matches no column"]),
        (["--sort", "-latency"], ["--sort", "'latency'", "latency_ms"]),
        (["--format", "xlsx"], ["--format 'xlsx'"]),
        (["--format", "parquet"], ["needs --output"]),
        (["--output", "x.txt"], ["--format table prints to the terminal"]),
    ],
)
def test_results_bad_input_exits_2(output, args, needles):
    result = invoke("results", output, *args)
    assert result.exit_code == 2, result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


def test_results_export_to_an_unwritable_path_exits_2(output, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = invoke("results", output, "--format", "csv", "-o", blocker / "rows.csv")
    assert result.exit_code == 2 and "rows.csv" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["file"]
    result = invoke("results", tmp_path / "missing")
    assert result.exit_code == 2 and "no such directory" in result.output
