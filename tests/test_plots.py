"""The report's plots are real PNGs, written atomically without touching pyplot, and exactly
those the results have data for; trials save the example maps the heatmap grid shows."""

from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from sweep.errors import StudyError, SweepError
from sweep.read.analysis import aggregate_seeds, select, variant_deltas
from sweep.read.examples import load_examples, save_examples
from sweep.read.plots import (
    ExamplesSpec,
    _example_choices,
    image_vs_pixel_plot,
    param_plot,
    pareto_plot,
    parse_examples,
    ranked_choices,
    report_plots,
    robustness_plot,
    swept_columns,
    timing_bars,
    timing_plot,
    tradeoff_plot,
)
from sweep.results import ResultStore, read_results
from sweep.run.runner import study_schema
from sweep.run.study import config_hash, expand_trials, study_from_dict
from sweep.run.trainable import TrialContext, execute_trial, load_data
from tests.conftest import tiny_study
from tests.plot_frames import result_frame

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OBJECTIVES = [("image_auroc", "max"), ("latency_ms", "min")]


def _agg(latency, auroc) -> pd.DataFrame:
    n = len(latency)
    return pd.DataFrame(
        {
            "model": [f"model{i}" for i in range(n)],
            "backbone": ["resnet18" if i % 2 else None for i in range(n)],
            "n_seeds": 3,
            "latency_ms_mean": latency,
            "latency_ms_std": np.full(n, 0.3),
            "image_auroc_mean": auroc,
            "image_auroc_std": np.full(n, 0.01),
            "pixel_auroc_mean": np.linspace(0.9, 0.95, n),
            "pixel_auroc_std": 0.0,
        }
    )


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_pareto_plot_writes_a_png(tmp_path):
    latency = np.array([2.0, 5.0, 9.0, 40.0, 150.0, 30.0])  # spans > 1 decade: log x axis
    auroc = np.array([0.80, 0.90, 0.93, 0.95, 0.97, 0.85])
    sel = select(_agg(latency, auroc), OBJECTIVES)
    out = pareto_plot(sel, tmp_path / "report" / "pareto.png", title="glue line, part 1")
    assert out == tmp_path / "report" / "pareto.png"
    width, height = _png_size(out)
    assert (width, height) == (1200, 840)  # 8 x 5.6 in at 150 dpi
    assert out.stat().st_size > 20_000  # points, labels and legend, not an empty canvas
    assert [p.name for p in out.parent.iterdir()] == ["pareto.png"]  # no temp file left


def test_pareto_plot_other_axes_degenerate_and_overwrite(tmp_path):
    path = tmp_path / "pareto.png"
    sel = select(_agg(np.array([3.0, 4.0]), np.array([0.9, 0.95])), OBJECTIVES)
    pareto_plot(sel, path)
    first = path.read_bytes()
    # Any aggregated metric can go on an axis, objective or not; the file is replaced.
    pareto_plot(sel, path, x="pixel_auroc", y="image_auroc")
    assert path.read_bytes() != first and path.read_bytes()[:8] == PNG_SIGNATURE

    nan = select(_agg(np.array([np.nan, np.nan]), np.array([0.9, np.nan])), OBJECTIVES)
    assert pareto_plot(nan, tmp_path / "empty.png").read_bytes()[:8] == PNG_SIGNATURE

    one_objective = select(_agg(np.array([3.0]), np.array([0.9])), [("image_auroc", "max")])
    with pytest.raises(SweepError, match="needs two metrics"):
        pareto_plot(one_objective, tmp_path / "x.png")
    with pytest.raises(SweepError, match="'train_s'"):
        pareto_plot(sel, tmp_path / "x.png", x="train_s")


def test_importing_and_plotting_leaves_pyplot_alone(tmp_path):
    # Two configurations: Kneedle is not needed, so kneed (which imports pyplot itself on
    # import) stays out and the check is about this package alone.
    code = (
        "import sys, numpy as np, pandas as pd\n"
        "from sweep.read.analysis import select\n"
        "from sweep.read.plots import pareto_plot\n"
        "agg = pd.DataFrame({'model': ['a', 'b'], 'latency_ms_mean': [1.0, 30.0],"
        " 'image_auroc_mean': [0.5, 0.9]})\n"
        "sel = select(agg, [('image_auroc', 'max'), ('latency_ms', 'min')])\n"
        f"pareto_plot(sel, {str(tmp_path / 'p.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
        "assert 'kneed' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_SIGNATURE


# --------------------------------------------------------------------------- the report's plots


def _is_png(path) -> bool:
    return path is not None and path.read_bytes()[:8] == PNG_SIGNATURE


def _aggregate(df: pd.DataFrame) -> pd.DataFrame:
    clean = df[(df["status"] == "ok") & (df["augmentation"] == "none") & (df["stress"] == "none")]
    return aggregate_seeds(clean, [*ACCURACY, "latency_ms", "memory_bank_size"])


ACCURACY = ["image_auroc", "image_f1", "pixel_auroc", "pixel_f1", "pixel_aupro"]


def test_each_plot_writes_a_png_or_nothing_when_it_has_no_data(tmp_path):
    agg = _aggregate(result_frame(sizes=True, coreset=True))

    # Fig. 13 for a metric that is not an objective: its own front and knees.
    path = tradeoff_plot(agg, tmp_path / "t.png", x="latency_ms", y="pixel_aupro")
    assert _is_png(path) and _png_size(path) == (1200, 840) and path.stat().st_size > 20_000
    # Fig. 14: two panels side by side.
    path = image_vs_pixel_plot(agg, tmp_path / "ivp.png")
    assert _is_png(path) and _png_size(path) == (2100, 840)
    # Metric vs hyperparameter: accuracy panels plus the cost panel (latency, memory bank).
    for param in ("image_size", "hp.coreset_ratio"):
        path = param_plot(agg, param, tmp_path / f"{param}.png")
        assert _is_png(path) and path.stat().st_size > 30_000
    # Fig. 12 from the analysis' own frame.
    deltas = variant_deltas(result_frame(variants=True), ACCURACY)
    path = robustness_plot(deltas, tmp_path / "r.png")
    assert _is_png(path) and _png_size(path)[1] > 1000  # four panels of twelve bars each

    # Nothing to draw: nothing written, None returned.
    no_pixel = _aggregate(result_frame(pixel=False))
    assert image_vs_pixel_plot(no_pixel, tmp_path / "none1.png") is None
    assert tradeoff_plot(no_pixel, tmp_path / "none2.png", y="pixel_auroc") is None
    assert param_plot(no_pixel, "image_size", tmp_path / "none3.png") is None  # one size
    clean_only = variant_deltas(result_frame(), ACCURACY)
    assert clean_only.empty and robustness_plot(clean_only, tmp_path / "none4.png") is None
    assert not list(tmp_path.glob("none*")) and not list(tmp_path.glob(".*"))


def test_swept_columns_are_those_varied_with_everything_else_fixed():
    assert swept_columns(_aggregate(result_frame())) == []
    assert swept_columns(_aggregate(result_frame(sizes=True))) == ["image_size"]
    assert swept_columns(_aggregate(result_frame(coreset=True))) == ["hp.coreset_ratio"]
    # Different detectors at different sizes is not a resolution study.
    df = result_frame()
    df.loc[df["model"] == "padim", "image_size"] = 256
    assert swept_columns(_aggregate(df)) == []


PARETO_IMAGE = {"pareto_image_auroc", "pareto_image_f1"}
PARETO_ALL = PARETO_IMAGE | {"pareto_pixel_auroc", "pareto_pixel_f1", "pareto_pixel_aupro"}
TIMING = {"timing"}


@pytest.mark.parametrize(
    ("frame", "objectives", "expected"),
    [
        ({"pixel": False}, OBJECTIVES, PARETO_IMAGE | TIMING),
        ({}, OBJECTIVES, PARETO_ALL | TIMING | {"image_vs_pixel"}),
        ({"pixel": False, "variants": True}, OBJECTIVES, PARETO_IMAGE | TIMING | {"robustness"}),
        ({"pixel": False, "sizes": True}, OBJECTIVES, PARETO_IMAGE | TIMING | {"vs_image_size"}),
        (
            {"pixel": False, "coreset": True},
            OBJECTIVES,
            PARETO_IMAGE | TIMING | {"vs_coreset_ratio"},
        ),
        (
            {"variants": True, "sizes": True, "coreset": True},
            OBJECTIVES,
            PARETO_ALL
            | TIMING
            | {"image_vs_pixel", "robustness", "vs_image_size", "vs_coreset_ratio"},
        ),
        # Objectives that are not latency against an accuracy metric get their own plot.
        (
            {"pixel": False},
            [("image_auroc", "max"), ("train_s", "min")],
            PARETO_IMAGE | TIMING | {"pareto"},
        ),
        # No timing values: no Fig. 10 (and no time-vs-accuracy fronts).
        (
            {"pixel": False, "timing": False},
            [("image_auroc", "max"), ("train_s", "min")],
            {"pareto"},
        ),
    ],
)
def test_report_plots_writes_exactly_the_applicable_plots(tmp_path, frame, objectives, expected):
    df = result_frame(**frame)
    assert set(df["status"]) == {"ok", "error", "stopped"}
    written = report_plots(df, None, objectives, tmp_path / "plots")
    assert set(written) == expected
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(
        f"{name}.png" for name in expected
    )
    assert all(_is_png(path) and path.parent == tmp_path / "plots" for path in written.values())


def test_report_plots_of_nothing_writes_nothing(tmp_path):
    assert report_plots(pd.DataFrame(), None, OBJECTIVES, tmp_path / "a") == {}
    failed = result_frame()
    failed = failed[failed["status"] != "ok"]
    assert report_plots(failed, None, OBJECTIVES, tmp_path / "b") == {}
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_model_selection_plots_use_clean_rows_only(tmp_path):
    df = result_frame(pixel=False, variants=True)
    # A variant row far better and faster than everything must not appear on the Pareto
    # plots: models are selected as they run, trained and tested clean.
    best = (
        df[df["status"] == "ok"]
        .iloc[:1]
        .assign(augmentation="table3_all", image_auroc=1.0, latency_ms=0.01, model="dfm")
    )
    before = report_plots(df, None, OBJECTIVES, tmp_path / "before")
    after = report_plots(pd.concat([df, best]), None, OBJECTIVES, tmp_path / "after")
    assert set(before) == set(after) == PARETO_IMAGE | TIMING | {"robustness"}
    for name in PARETO_IMAGE | TIMING:
        assert before[name].read_bytes() == after[name].read_bytes()
    assert before["robustness"].read_bytes() != after["robustness"].read_bytes()


# --------------------------------------------------------------------------- example maps


def _run(raw: dict, tmp_path) -> tuple[object, list[dict]]:
    """Run every trial of a study without Ray, writing rows as a sweep does."""
    study = study_from_dict(raw)
    ctx = TrialContext(
        study=study, output=str(raw["output"]), run_id="test", schema=study_schema(study)
    )
    store = ResultStore(ctx.output)
    rows = []
    for trial in expand_trials(study):
        row = execute_trial(trial, ctx)
        store.write_row(row, ctx.schema)
        rows.append(row)
    return study, rows


def test_trials_save_the_same_example_images_for_every_model(glue_root, tmp_path):
    output = tmp_path / "out"
    raw = tiny_study(glue_root, output)
    raw["evaluation"]["example_maps"] = 3
    study, rows = _run(raw, tmp_path)
    assert [r["status"] for r in rows] == ["ok", "ok"] and all(not r["notes"] for r in rows)

    saved = [load_examples(output, r["config_hash"]) for r in rows]
    assert sorted(p.name for p in (output / "_examples").iterdir()) == sorted(
        f"{r['config_hash']}.npz" for r in rows
    )
    test = load_data(study, 64).test
    expected = [i for i in range(len(test)) if test.labels[i] == 1][:3]
    for examples in saved:
        assert examples["index"].tolist() == expected  # anomalous first, in data-set order
        assert examples["label"].tolist() == [1, 1, 1]
        assert examples["path"] == [test.paths[i] for i in expected]
        assert examples["image"].shape == (3, 64, 64, 3) and examples["image"].dtype == np.uint8
        assert np.array_equal(examples["image"][0], test.pixels[expected[0]].permute(1, 2, 0))
        assert np.array_equal(examples["mask"], test.masks[expected].numpy())
        assert examples["anomaly_map"].shape == examples["mask"].shape
        assert np.isfinite(examples["anomaly_map"]).all() and np.isfinite(examples["score"]).all()
    # Different models, different maps, the same images.
    assert not np.allclose(saved[0]["anomaly_map"], saved[1]["anomaly_map"])
    assert load_examples(output, "0" * 16) is None
    # The examples folder does not disturb the output as a Parquet dataset.
    assert len(pd.read_parquet(output)) == 2

    written = report_plots(read_results(output), None, OBJECTIVES, tmp_path / "plots", output)
    assert _is_png(written["examples"]) and written["examples"].stat().st_size > 20_000


def test_stressed_trials_save_what_the_model_saw(glue_root, tmp_path):
    raw = tiny_study(glue_root, tmp_path / "out")
    raw["space"] = {**raw["space"], "model": "padim", "stress": "orientation"}
    study, (row,) = _run(raw, tmp_path)
    examples = load_examples(tmp_path / "out", row["config_hash"])
    index = examples["index"].tolist()
    stressed, clean = load_data(study, 64, "orientation").test, load_data(study, 64).test
    assert len(index) == 4  # the default
    pixels = stressed.pixels[index].permute(0, 2, 3, 1).numpy()
    assert np.array_equal(examples["image"], pixels)
    assert not np.array_equal(examples["image"], clean.pixels[index].permute(0, 2, 3, 1).numpy())
    assert np.array_equal(examples["mask"], stressed.masks[index].numpy())


def test_example_maps_setting_zero_none_and_bad_values(glue_root, tmp_path, monkeypatch):
    raw = tiny_study(glue_root, tmp_path / "out")
    raw["space"] = {**raw["space"], "model": "padim"}
    default = study_from_dict(raw)
    assert default.evaluation.example_maps == 4
    raw["evaluation"]["example_maps"] = 0
    _, (row,) = _run(raw, tmp_path)
    assert row["status"] == "ok" and not (tmp_path / "out" / "_examples").exists()
    # How many maps a trial saves is not part of what it computes: the hash, and so every
    # existing study's finished rows, stay the same.
    trial = expand_trials(default)[0]
    assert row["config_hash"] == config_hash(default, trial)

    for bad in (-1, "many", 2.5):
        raw["evaluation"]["example_maps"] = bad
        with pytest.raises(StudyError, match=r"evaluation\.example_maps"):
            study_from_dict(raw)

    # A failure to save examples is a note on an ok row, never an error row.
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("sweep.run.trainable.save_examples", broken)
    raw["evaluation"]["example_maps"] = 2
    raw["output"] = str(tmp_path / "again")
    _, (row,) = _run(raw, tmp_path)
    assert row["status"] == "ok" and 0.0 <= row["image_auroc"] <= 1.0
    assert "example maps not saved (OSError: disk full)" in row["notes"]


def test_saved_maps_keep_their_variation_and_files_appear_whole(tmp_path):
    rng = np.random.default_rng(0)
    n, size = 5, 16
    # Far outside float16's range, on a large offset: stored scaled, restored in units.
    maps = 1e6 + rng.normal(0, 50, (n, size, size))
    store = ResultStore(tmp_path / "out")
    path = save_examples(
        store,
        "abc",
        pixels=rng.integers(0, 255, (n, 3, size, size), dtype=np.uint8),
        masks=None,
        maps=maps,
        scores=rng.normal(size=n),
        labels=np.array([0, 1, 0, 1, 0]),
        paths=[f"img{i}.png" for i in range(n)],
        defects=["good", "hole", "good", "crack", "good"],
        n=3,
    )
    assert path.endswith("_examples/abc.npz")
    examples = load_examples(tmp_path / "out", "abc")
    assert examples["index"].tolist() == [1, 3, 0]
    assert examples["defect"] == ["hole", "crack", "good"] and examples["mask"] is None
    restored = examples["anomaly_map"].astype(np.float64)
    span = np.ptp(maps[[1, 3, 0]])
    assert np.abs(restored - maps[[1, 3, 0]]).max() < span * 1e-3
    assert [p.name for p in (tmp_path / "out" / "_examples").iterdir()] == ["abc.npz"]

    (tmp_path / "out" / "_examples" / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(SweepError, match=r"bad\.npz"):
        load_examples(tmp_path / "out", "bad")


# --------------------------------------------------------------------------- Fig. 10


def _timing_agg() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "model": ["slow", "fast", "untimed", "middle"],
            "backbone": "resnet18",
            "n_seeds": 3,
            "latency_ms_mean": [300.0, 5.0, np.nan, 12.0],
            "latency_ms_std": [20.0, 0.5, np.nan, np.nan],  # one seed with a value: no std
            "throughput_fps_mean": [3.0, 180.0, np.nan, np.nan],
            "throughput_fps_std": [0.1, 9.0, np.nan, np.nan],
        }
    )


def test_timing_bars_sort_best_first_and_leave_out_untimed_configurations(tmp_path):
    agg = _timing_agg()
    latency = timing_bars(agg, "latency_ms")
    assert latency["label"].tolist() == ["fast/resnet18", "middle/resnet18", "slow/resnet18"]
    assert latency["row"].tolist() == [1, 3, 0]
    assert latency["mean"].tolist() == [5.0, 12.0, 300.0]
    assert latency["std"].tolist() == [0.5, 0.0, 20.0]
    # Throughput is better high: the fastest on top again; rows without it left out.
    throughput = timing_bars(agg, "throughput_fps")
    assert throughput["row"].tolist() == [1, 0]
    assert timing_bars(agg, "train_s").empty
    assert timing_bars(agg.iloc[:0], "latency_ms").empty

    path = timing_plot(agg, tmp_path / "timing.png")
    assert _is_png(path) and _png_size(path)[0] == 2 * 960  # a panel per metric, 6.4 in each
    one_panel = agg.drop(columns=["throughput_fps_mean", "throughput_fps_std"])
    assert _png_size(timing_plot(one_panel, tmp_path / "one.png"))[0] == 960
    untimed = agg.assign(latency_ms_mean=np.nan, throughput_fps_mean=np.nan)
    assert timing_plot(untimed, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


# --------------------------------------------------------------------------- Fig. 11's models


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("knee", ExamplesSpec()),
        ("top-bottom:4:image_auroc", ExamplesSpec("top-bottom", 4, "image_auroc")),
        ("top:3", ExamplesSpec("top", 3, "image_auroc")),
        ("bottom:12:latency_ms", ExamplesSpec("bottom", 12, "latency_ms")),
        (" top-bottom:6:pixel_aupro ", ExamplesSpec("top-bottom", 6, "pixel_aupro")),
    ],
)
def test_parse_examples_reads_the_documented_specs(text, expected):
    assert parse_examples(text) == expected
    assert parse_examples(str(expected)) == expected  # str() gives a spec back


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("knees", "unknown choice 'knees'"),
        ("best:4", "unknown choice 'best'"),
        ("", "unknown choice ''"),
        ("top", "N must be a whole number"),
        ("top:four", "N must be a whole number"),
        ("top:0", "at least 1"),
        ("top-bottom:7", r"at most 12 models \(got 14\)"),
        ("top:2:image_auroc:max", "too many ':'"),
    ],
)
def test_parse_examples_names_a_bad_spec(text, message):
    with pytest.raises(SweepError, match=message) as error:
        parse_examples(text)
    assert repr(text.strip()) in str(error.value)


def _ranked_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "model": ["a", "b", "c", "d", "e", "f"],
            "image_auroc_mean": [0.90, 0.97, np.nan, 0.50, 0.80, 0.97],
            "latency_ms_mean": [20.0, 50.0, 1.0, 5.0, np.nan, 9.0],
        }
    )


def test_ranked_choices_pick_the_best_and_worst_by_the_metric():
    table = _ranked_table()

    def rows(spec, **kwargs):
        return [row for row, _ in ranked_choices(table, parse_examples(spec), **kwargs)]

    # AUROC ranks b, f (tied, by row), a, e, d; c has no value. Shown best to worst.
    choices = ranked_choices(table, parse_examples("top-bottom:2:image_auroc"))
    assert choices == [
        (1, "top 1 by image_auroc = 0.97"),
        (5, "top 2 by image_auroc = 0.97"),
        (4, "bottom 2 by image_auroc = 0.8"),
        (3, "bottom 1 by image_auroc = 0.5"),
    ]
    assert rows("top:1") == [1] and rows("bottom:1") == [3]
    # More asked for than there are: each configuration once, as a top one.
    assert rows("top-bottom:4") == [1, 5, 0, 4, 3]
    assert rows("top:9") == [1, 5, 0, 4, 3]
    # A configuration without maps is passed over; the labels keep the true ranks.
    choices = ranked_choices(
        table, parse_examples("top-bottom:1"), available=lambda row: row not in (1, 3)
    )
    assert choices == [(5, "top 2 by image_auroc = 0.97"), (4, "bottom 2 by image_auroc = 0.8")]
    # Lower is better for a time (its natural direction), unless the caller says otherwise.
    assert rows("top:2:latency_ms") == [2, 3] and rows("bottom:1:latency_ms") == [1]
    assert rows("top:1:latency_ms", mode="max") == [1]
    assert rows("top:1:pixel_auroc") == []  # no such column


def _examples_frame(out) -> pd.DataFrame:
    """Four configurations at two seeds, their example maps saved as trials save them: none
    for the best, only seed 1's for the worst."""
    aurocs = {"best": 0.99, "good": 0.9, "fair": 0.8, "worst": 0.6}
    rows = []
    for model, auroc in aurocs.items():
        for seed in (0, 1):
            rows.append(
                {"status": "ok", "model": model, "backbone": "resnet18", "seed": seed,
                 "image_size": 16, "augmentation": "none", "stress": "none",
                 "image_auroc": auroc + 0.001 * seed, "latency_ms": 10.0 * (1 + seed),
                 "config_hash": f"{model}{seed}"}
            )  # fmt: skip
    store = ResultStore(out)
    rng = np.random.default_rng(0)
    for row in rows:
        if row["model"] == "best" or (row["model"] == "worst" and row["seed"] == 0):
            continue
        save_examples(
            store,
            row["config_hash"],
            pixels=rng.integers(0, 255, (2, 3, 16, 16), dtype=np.uint8),
            masks=None,
            maps=rng.normal(size=(2, 16, 16)),
            scores=rng.normal(size=2),
            labels=np.array([1, 0]),
            paths=["a.png", "b.png"],
            defects=["hole", "good"],
            n=2,
        )
    return pd.DataFrame(rows)


def test_the_grid_shows_the_ranked_models_with_why_each_is_there(tmp_path):
    df = _examples_frame(tmp_path / "out")
    agg = aggregate_seeds(df, ["image_auroc", "latency_ms"])
    choices = _example_choices(
        parse_examples("top-bottom:1:image_auroc"), None, agg, df, tmp_path / "out"
    )
    # The best saved no maps: the next one is shown, as what it is; the worst by seed 1's.
    assert [label for label, _ in choices] == [
        "good/resnet18 (top 2 by image_auroc = 0.901)",
        "worst/resnet18 (bottom 1 by image_auroc = 0.601)",
    ]
    assert [str(ex["config_hash"]) for _, ex in choices] == ["good0", "worst1"]

    written = report_plots(
        df, None, OBJECTIVES, tmp_path / "plots", tmp_path / "out", examples="bottom:2"
    )
    assert _is_png(written["examples"]) and _png_size(written["examples"])[0] == 4 * 1.9 * 150

    # A bad spec or metric stops before anything is drawn.
    with pytest.raises(SweepError, match=r"'top:1:image_aurox'.*did you mean 'image_auroc'"):
        report_plots(df, None, OBJECTIVES, tmp_path / "bad", examples="top:1:image_aurox")
    with pytest.raises(SweepError, match="'middle:1'"):
        report_plots(df, None, OBJECTIVES, tmp_path / "bad", examples="middle:1")
    assert not (tmp_path / "bad").exists()


def test_labelled_defects_plot_leads_with_the_studys_recall_at_precision(tmp_path, monkeypatch):
    """label_budget's question, what labels buy: its objective (recall at precision 0.95)
    against labelled defects per type, one curve per detector, AUROC after it."""
    import sweep.read.plots as plots

    rows = []
    for model, recalls in {
        "supervised_classifier": (0.5, 0.8, 0.95),
        "padim": (0.7, 0.7, 0.7),
    }.items():
        for n, recall in zip((1, 5, 20), recalls, strict=True):
            for seed in (0, 1):
                rows.append(
                    {"status": "ok", "model": model, "backbone": "tf_efficientnet_lite0",
                     "seed": seed, "image_size": 128, "labelled_defects": n,
                     "augmentation": "none", "stress": "none", "image_recall_p95": recall,
                     "image_auroc": 0.5 + recall / 2, "latency_ms": 10.0,
                     "config_hash": f"{model}-{n}-{seed}"}
                )  # fmt: skip
    drawn: dict[str, list[str]] = {}
    real = plots.param_plot

    def recording(agg, param, path, **kwargs):
        drawn[param] = list(kwargs["metrics"])
        return real(agg, param, path, **kwargs)

    monkeypatch.setattr(plots, "param_plot", recording)
    objectives = [("image_recall_p95", "max"), ("latency_ms", "min")]
    written = report_plots(pd.DataFrame(rows), None, objectives, tmp_path)
    assert _is_png(written["vs_labelled_defects"])
    assert drawn["labelled_defects"][:2] == ["image_recall_p95", "image_auroc"]


def test_a_configuration_at_one_value_is_a_marker_beside_the_curves(tmp_path, monkeypatch):
    """label_budget's supervised detectors at one N are in the picture beside the curves."""
    import sweep.read.plots as plots

    legends: list[list[str]] = []
    save = plots._save_atomically

    def recording(fig, path):
        legends.append([t.get_text() for legend in fig.legends for t in legend.get_texts()])
        return save(fig, path)

    monkeypatch.setattr(plots, "_save_atomically", recording)

    def agg(values_by_model):
        return pd.DataFrame(
            [
                {"model": m, "backbone": "resnet18", "image_size": 64, "labelled_defects": n,
                 "image_auroc_mean": 0.5 + n / 100, "image_auroc_std": 0.0}
                for m, values in values_by_model.items()
                for n in values
            ]
        )  # fmt: skip

    both = agg({"padim": [0, 2], "supervised_classifier": [2]})
    assert plots.param_plot(both, "labelled_defects", tmp_path / "a.png")
    assert legends == [["padim/resnet18", "supervised_classifier/resnet18"]]
    # Markers alone are no curve: nothing is drawn.
    alone = agg({"padim": [0], "supervised_classifier": [2]})
    assert plots.param_plot(alone, "labelled_defects", tmp_path / "b.png") is None
    assert not (tmp_path / "b.png").exists()
