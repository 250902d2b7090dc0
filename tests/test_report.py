"""``sweep report``: terminal, JSON, one self-contained HTML file and Markdown, from a tiny
study's results; every plot present; bad paths exit 2 leaving nothing behind."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from scipy import stats
from typer.testing import CliRunner

from sweep.cli import app
from sweep.errors import SweepError
from sweep.read.report import print_report, render_markdown, write_atomically
from tests.report_rows import write_study_output
from tests.test_stats import brute_force_bh

runner = CliRunner()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHROMIUM = Path("/usr/bin/chromium")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """A tiny study's output (clean and defocus rows, one error row) reported once as JSON,
    HTML and Markdown; the other tests read what this wrote."""
    root = tmp_path_factory.mktemp("report")
    output = write_study_output(root / "out", augmentations=("none", "defocus"), images=True)
    html, markdown = root / "pages" / "report.html", root / "out" / "_report" / "report.md"
    result = invoke("report", output, "--json", "--html", html, "--markdown", markdown)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    return {"root": root, "output": output, "html": html, "markdown": markdown, "report": report}


def test_recall_at_precision_and_threshold_policy_in_every_rendering(built):
    report = built["report"]
    metrics = report["metrics"]
    # AP and recall at precision >= 0.95 follow the image F1 in the configurations table.
    assert metrics[metrics.index("image_f1") + 1 : metrics.index("image_f1") + 3] == [
        "image_ap",
        "image_recall_p95",
    ]
    assert all(c["image_recall_p95_mean"] is not None for c in report["configurations"])
    assert report["evaluation"] == {"threshold_policy": ["f1_max"], "val_source": ["split"]}
    header = "Threshold policy: f1_max; validation images: split"
    page = built["html"].read_text()
    assert header in page and header in built["markdown"].read_text()
    table = page[page.index('id="configurations-table"') :]
    assert "image_recall_p95 ↑" in table[: table.index("</table>")]
    console = Console(record=True, width=250)
    print_report(report, [(o["metric"], o["mode"]) for o in report["objectives"]], console)
    text = console.export_text()
    assert header in text and "image_recal" in text


def test_paired_tests_against_the_best_match_scipy_and_bh(built):
    report = built["report"]
    tests, configs = report["paired_tests"], report["configurations"]
    assert (tests["metric"], tests["mode"]) == ("image_auroc", "max")
    best = configs[tests["best"]]
    assert (best["model"], best["hp.coreset_ratio"]) == ("patchcore", 1.0)
    assert sorted(r["index"] for r in tests["rows"]) == sorted(
        set(range(len(configs))) - {tests["best"]}
    )
    # Independently: the clean ok rows per configuration, matched by seed, scipy's paired
    # t-test, then the brute-force BH step-up over the five comparisons.
    rows = pd.read_parquet(built["output"]).query("status == 'ok' and augmentation == 'none'")

    def seeds_of(config: dict) -> pd.Series:
        mine = rows[rows.model == config["model"]]
        for column in ("hp.coreset_ratio", "hp.n_features"):
            value = config.get(column)
            mine = mine[mine[column].isna()] if value is None else mine[mine[column] == value]
        return mine.set_index("seed")["image_auroc"].sort_index()

    top = seeds_of(best)
    p = [stats.ttest_rel(seeds_of(configs[r["index"]]), top).pvalue for r in tests["rows"]]
    for row, p_row, p_adj in zip(tests["rows"], p, brute_force_bh(p), strict=True):
        assert row["n_pairs"] == 3
        assert row["p"] == pytest.approx(p_row, rel=1e-9)
        assert row["p_adj"] == pytest.approx(p_adj, rel=1e-9)
        assert row["diff"] < 0  # every other configuration is worse than the best
    page, markdown = built["html"].read_text(), built["markdown"].read_text()
    assert '<table id="paired-tests-table">' in page and "## Paired tests" in markdown
    assert "Benjamini-Hochberg" in page and "differs (p adj &lt; 0.05)" in page


def test_false_negatives_by_size_for_the_front_and_picks(built):
    report = built["report"]
    selection = report["selection"]
    shown = {i for i, r in enumerate(selection["table"]) if r["on_front"]}
    shown |= {i for i in selection["picks"].values() if i is not None}
    fn = {entry["index"]: entry for entry in report["false_negatives"]}
    assert set(fn) == shown
    # PatchCore at ratio 1 (AUROC 0.95 in tests/report_rows.py): anomalous scores 0.45 + 0.4 x
    # size / 640, one copy of each size 0.01 lower; at threshold 0.5 both 40 px images and the
    # lower 90 px one are missed in each of the 3 seeds; the unknown-size ones always.
    best = next(i for i in shown if report["configurations"][i]["hp.coreset_ratio"] == 1.0)
    assert fn[best]["trials"] == 3
    assert [
        (b["bucket"], b["min_pixels"], b["max_pixels"], b["n_false_negatives"], b["n_anomalous"])
        for b in fn[best]["buckets"]
    ] == [
        ("small", 40, 90, 9, 12),
        ("medium", 160, 250, 0, 12),
        ("large", 400, 640, 0, 12),
        ("unknown size", None, None, 6, 6),
    ]
    page, markdown = built["html"].read_text(), built["markdown"].read_text()
    assert '<table id="false-negatives-table">' in page
    assert "## False negatives by defect size" in markdown and "9/12 (75%) · 40–90 px" in markdown


def test_every_plot_is_written_and_non_empty(built):
    plots = built["report"]["plots"]
    # The plots the study's rows have data for: Fig. 13 per accuracy metric, Fig. 14, Fig. 12
    # (defocus rows) and the two ablations the configurations vary.
    assert {
        "pareto_image_auroc",
        "pareto_pixel_auroc",
        "image_vs_pixel",
        "robustness",
        "vs_coreset_ratio",
    } <= set(plots)
    for name, path in plots.items():
        data = Path(path).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 10_000, name
        assert Path(path).parent == built["output"] / "_report"


def test_report_content_picks_robustness_and_errors(built):
    report = built["report"]
    assert (report["trials"], report["ok"]) == (37, 36)  # 6 configs x 3 seeds x 2 + error
    assert report["study"]["name"] == "tiny" and "space" in report["study"]["settings"]
    assert [e["model"] for e in report["errors"]] == ["stfpm"]
    # Selection runs on the clean configurations only; robustness has one row per variant.
    assert len(report["configurations"]) == 6
    assert {r["augmentation"] for r in report["robustness"]} == {"defocus"}
    assert all(r["image_auroc_delta"] < 0 for r in report["robustness"])
    selection = report["selection"]
    configs = report["configurations"]
    pick = configs[selection["picks"]["kneedle"]]
    assert (pick["model"], pick["hp.coreset_ratio"]) == ("patchcore", 0.1)
    assert selection["chosen"] == "kneedle"
    assert set(selection["stability"]) == {"kneedle", "utopia", "topsis"}


def test_terminal_report_shows_picks_robustness_errors_and_plots(built):
    console = Console(record=True, width=220)
    objectives = [(o["metric"], o["mode"]) for o in built["report"]["objectives"]]
    print_report(built["report"], objectives, console)
    text = console.export_text()
    assert "36/37 trials ok" in text and "coreset_ratio" in text and "n_features" in text
    assert "Knee picks, side by side" in text and "kneedle (chosen)" in text
    assert text.count("holds") + text.count("changes:") >= 3  # one verdict per method
    assert "Robustness" in text and "defocus" in text and "Δ -0.0" in text
    assert "error row stfpm/resnet18 seed=7: RuntimeError: stfpm diverged" in text
    for name, path in built["report"]["plots"].items():
        assert f"{name} plot: {path}" in text


def test_html_is_self_contained_with_tables_and_every_plot(built):
    page = built["html"].read_text()
    # Nothing fetched from elsewhere: every src and href is a data URI or an in-page anchor.
    for attribute, value in re.findall(r'\b(src|href)\s*=\s*"([^"]*)"', page):
        assert value.startswith(("data:", "#")), (attribute, value[:80])
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "<link" not in page and "@import" not in page
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)"', page)
    plots = built["report"]["plots"]
    assert len(images) == len(plots)
    embedded = {base64.b64decode(data) for data in images}
    assert embedded == {Path(p).read_bytes() for p in plots.values()}
    for table in (
        "knee-picks",
        "configurations-table",
        "robustness-table",
        "errors-table",
        "settings-table",
    ):
        assert f'<table id="{table}">' in page, table
    assert "within one seed-std" in page and "Kneedle (2-D knee) (chosen)" in page
    # The error text is escaped, not markup.
    assert "stfpm diverged | loss=nan" in page and "<b>loss" not in page


def test_best_values_are_bold_by_direction(built):
    page = built["html"].read_text()
    table = page[page.index('id="configurations-table"') :]
    table = table[: table.index("</table>")]
    bold = re.findall(r"<b>([^<]+)</b>", table)
    configs = built["report"]["configurations"]
    best_auroc = max(c["image_auroc_mean"] for c in configs)  # max
    best_latency = min(c["latency_ms_mean"] for c in configs)  # min
    assert f"{best_auroc:.3f} ± " in " ".join(bold)
    assert any(b.startswith(f"{best_latency:.1f} ± ") for b in bold)
    worst_latency = max(c["latency_ms_mean"] for c in configs)
    assert not any(b.startswith(f"{worst_latency:.1f} ± ") for b in bold)


def test_markdown_has_the_tables_and_links_that_resolve(built):
    path = built["markdown"]
    text = path.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == len(built["report"]["plots"])
    for link in links:
        assert not link.startswith("/"), link  # relative
        target = path.parent / link
        assert target.is_file() and target.read_bytes()[:8] == PNG_SIGNATURE, link
    assert "## Knee picks, side by side" in text and "## Robustness" in text
    assert "| method | pick |" in text and "stfpm diverged \\| loss=nan" in text
    assert "```yaml" in text and "name: tiny" in text
    # A Markdown file elsewhere links the same PNGs by a longer relative path.
    other = built["root"] / "elsewhere" / "r.md"
    write_atomically(other, render_markdown(built["report"], other), "--markdown")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", other.read_text())
    assert len(links) == len(built["report"]["plots"])
    for link in links:
        assert link.startswith("../out/_report/") and (other.parent / link).is_file()


def test_weights_move_the_choice_to_topsis_and_are_validated(built):
    output = built["output"]
    result = invoke("report", output, "--json", "--weights", "latency_ms=5,image_auroc=1")
    assert result.exit_code == 0, result.output
    selection = json.loads(result.stdout)["selection"]
    assert selection["chosen"] == "topsis"
    assert selection["weights"] == pytest.approx({"image_auroc": 1 / 6, "latency_ms": 5 / 6})
    fastest = min(
        range(len(selection["table"])), key=lambda i: selection["table"][i]["latency_ms_mean"]
    )
    assert selection["picks"]["topsis"] == fastest
    for bad, needle in [
        ("image_aurco=2", "did you mean 'image_auroc'"),
        ("latency_ms=0", "positive"),
        ("latency_ms=-1", "positive"),
        ("latency_ms=fast", "'fast' is not a number"),
        ("latency_ms", "METRIC=WEIGHT"),
    ]:
        result = invoke("report", output, "--weights", bad)
        assert result.exit_code == 2, (bad, result.output)
        assert needle in result.output, (bad, result.output)


def test_examples_option_reaches_the_grid_and_a_bad_spec_exits_2(built, tmp_path):
    result = invoke("report", built["output"], "--examples", "best:4", "--plots", tmp_path / "p")
    assert result.exit_code == 2
    assert "examples 'best:4'" in result.output
    assert not (tmp_path / "p").exists(), "a bad spec fails before anything is drawn"
    result = invoke(
        "report", built["output"], "--json", "--examples", "top:1", "--plots", tmp_path / "q"
    )
    assert result.exit_code == 0, result.output
    assert "timing" in json.loads(result.stdout)["plots"]


def test_unwritable_html_exits_2_naming_it_and_leaves_nothing(built, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for option, target in [
        ("--html", blocker / "report.html"),
        ("--html", blocker / "deeper" / "report.html"),
        ("--markdown", tmp_path),  # a directory
    ]:
        result = invoke("report", built["output"], option, target)
        assert result.exit_code == 2, result.output
        assert option in result.output and str(target) in result.output
        assert "cannot write" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    assert blocker.read_text() == "not a folder"


def test_a_failed_write_leaves_neither_the_file_nor_its_temporary(tmp_path):
    (tmp_path / "taken.html").mkdir()  # the rename onto a directory fails after the write
    with pytest.raises(SweepError, match=r"--html '.*taken\.html': cannot write it"):
        write_atomically(tmp_path / "taken.html", "<html></html>", "--html")
    assert [p.name for p in tmp_path.iterdir()] == ["taken.html"]
    assert not any((tmp_path / "taken.html").iterdir())
    written = write_atomically(tmp_path / "new" / "r.md", "# ok\n", "--markdown")
    assert written.read_text() == "# ok\n" and [p.name for p in written.parent.iterdir()] == [
        "r.md"
    ]


def test_report_without_a_saved_study_or_a_second_seed(tmp_path):
    # An output written before issue 15: no AP, recall, threshold policy or per-image results.
    output = write_study_output(tmp_path / "out", seeds=(0,), error_row=False, new_metrics=False)
    (output / "_study.yaml").unlink()
    result = invoke("report", output, "--html", tmp_path / "r.html", "--plots", tmp_path / "p")
    assert result.exit_code == 0, result.output
    page = (tmp_path / "r.html").read_text()
    assert "No saved study" in page and "None: every trial finished." in page
    assert "not tested (one seed per configuration)" in page
    assert "robustness-table" not in page
    assert "image_recall_p95" not in page and "Threshold policy" not in page
    assert "false-negatives-table" not in page and "paired-tests-table" not in page
    assert "Paired tests: none ran" in page
    assert all(p.suffix == ".png" for p in (tmp_path / "p").iterdir())


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install chromium)")
def test_html_report_renders_in_headless_chromium(built, tmp_path):
    from PIL import Image

    page = built["html"].read_text()
    assert page.count("<img ") == len(built["report"]["plots"]) and "<table" in page
    shot = tmp_path / "shot.png"
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1280,2400",
        built["html"].resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.read_bytes()[:8] == PNG_SIGNATURE
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape == (2400, 1280, 3)
    # Not blank: text, table rules and plots give many colours and a spread of brightness.
    assert image.std() > 20
    colours = np.unique(image.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 200
    # The page's top rows are text on white; the plots further down add colour.
    assert (image[:300] < 100).any() and image[:300].mean() > 180
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def _stressed_output(output: Path) -> Path:
    """Two configurations x 3 seeds, each trained once and tested clean, under lighting (the
    normal test scores move up by 1.5 validation standard deviations) and under rotation (they
    do not move), with 40 validation and 40 test normals per trial."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sweep.results import ResultStore, read_results

    write_study_output(output, seeds=(0, 1, 2), configs=CONFIGS_2, error_row=False, images=True)
    store = ResultStore(output)
    schema = pq.read_schema(next(output.glob("[!._]*.parquet")))
    rng = np.random.default_rng(17)
    for row in read_results(output).to_dict(orient="records"):
        row = {k: (None if pd.api.types.is_scalar(v) and pd.isna(v) else v) for k, v in row.items()}
        val = rng.normal(size=40)
        for stress, shift in (("none", 0.0), ("lighting", 1.5), ("rotation", 0.0)):
            config_hash = row["config_hash"] + ("" if stress == "none" else stress)
            store.write_row({**row, "config_hash": config_hash, "stress": stress}, schema)
            test = rng.normal(loc=shift, size=40)
            n = 2 * 40 + 2
            frame = pd.DataFrame(
                {
                    "config_hash": config_hash,
                    "split": ["val"] * 41 + ["test"] * 41,
                    "index": [*range(41), *range(41)],
                    "path": [f"img/{i}.png" for i in range(n)],
                    "label": [0] * 40 + [1] + [0] * 40 + [1],
                    "defect": ["good"] * 40 + ["crack"] + ["good"] * 40 + ["crack"],
                    "defect_pixels": [0] * 40 + [100] + [0] * 40 + [100],
                    "defect_fraction": [0.0] * 40 + [0.02] + [0.0] * 40 + [0.02],
                    "score": [*val, 9.0, *test, 9.0],
                }
            )
            store.write_images(config_hash, pa.Table.from_pandas(frame, preserve_index=False))
    return output


CONFIGS_2 = [
    ("patchcore", {"coreset_ratio": 0.1, "num_neighbors": 9}, 0.93, 0.95, 14.0, 3.0),
    ("padim", {"n_features": 100}, 0.88, 0.93, 9.0, 1.0),
]


def test_drift_sentinel_section_flags_the_shift_and_not_the_control(tmp_path):
    from sweep.read.drift import drift_test
    from sweep.read.report import build_report, render_html
    from sweep.results import read_images

    output = _stressed_output(tmp_path / "out")
    objectives = [("image_auroc", "max"), ("latency_ms", "min")]
    report = build_report(output, objectives, tmp_path / "plots")
    drift = report["drift"]
    assert drift["alpha"] == 0.05 and drift["trials_cannot_fire"] == 0
    rows = {(r["configuration"].split("/")[0], r["stress"]): r for r in drift["rows"]}
    assert [r["stress"] for r in drift["rows"]] == ["none", "lighting", "rotation"] * 2
    for model in ("padim", "patchcore"):
        assert rows[model, "lighting"]["drift"] and rows[model, "lighting"]["trials_drift"] == 3
        assert not rows[model, "none"]["drift"] and not rows[model, "rotation"]["drift"]
        assert rows[model, "none"]["trials"] == 3
    assert drift["flagged"] == {"none": [0, 2], "lighting": [2, 2], "rotation": [0, 2]}
    # The medians are those of the per-trial tests, recomputed here from the images.
    images = read_images(output)
    normal = images[images["label"] == 0]
    hashes = [h for h in normal["config_hash"].unique() if h.endswith("lighting")]
    padim = sorted(h for h in hashes if int(h[:16], 16) > 3)  # padim's trials come after
    ks = [
        drift_test(
            normal[(normal.config_hash == h) & (normal.split == "val")]["score"],
            normal[(normal.config_hash == h) & (normal.split == "test")]["score"],
        )["ks_p"]
        for h in padim
    ]
    assert rows["padim", "lighting"]["ks_p_median"] == pytest.approx(np.median(ks), rel=1e-9)
    page = render_html(report)
    assert 'id="drift-table"' in page and "none (control) 0/2, lighting 2/2" in page
    markdown = render_markdown(report, tmp_path / "r.md")
    assert "## Drift sentinel" in markdown and "| **drift** |" in markdown
    console = Console(record=True, width=250)
    print_report(report, objectives, console)
    assert "Drift sentinel" in console.export_text()


def test_no_drift_section_without_stresses(built):
    # The `built` output varies the training augmentation only: no shift to test.
    report = built["report"]
    assert report.get("drift") is None
    assert 'id="drift-table"' not in built["html"].read_text()
    assert "Drift sentinel" not in built["markdown"].read_text()


def test_labelled_defects_tells_configurations_of_one_model_apart():
    """label_budget runs PaDiM at 0 and 2 labelled defects: two rows whose names must differ
    (they read 'padim/resnet18 64px' twice before), while a column one model never varies does
    not clutter the table."""
    from sweep.read.report import _config_name, _varying_columns

    configs = [
        {"model": "padim", "backbone": "resnet18", "image_size": 64, "labelled_defects": n,
         "epochs": 20, "hp.n_features": 100}
        for n in (0, 2)
    ] + [{"model": "supervised_classifier", "backbone": "resnet18", "image_size": 64,
          "labelled_defects": 2, "epochs": 30}]  # fmt: skip
    varying = _varying_columns(configs)
    assert varying == ["labelled_defects"]
    names = [_config_name(c, varying) for c in configs]
    assert names[:2] == [
        "padim/resnet18 64px labelled_defects=0",
        "padim/resnet18 64px labelled_defects=2",
    ]
