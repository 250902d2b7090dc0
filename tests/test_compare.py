"""``sweep compare``: two tiny outputs matched configuration by configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats
from typer.testing import CliRunner

from sweep.cli import app
from sweep.read.compare import compare_outputs
from tests.report_rows import CONFIGS, write_study_output

# A seeds study: two configurations, 5 seeds; in B PatchCore is 0.05 better, PaDiM unchanged.
SEEDS = (0, 1, 2, 3, 4)
SEEDS_A = [CONFIGS[0], CONFIGS[3]]
SEEDS_B = [(*CONFIGS[0][:2], CONFIGS[0][2] + 0.05, *CONFIGS[0][3:]), CONFIGS[3]]

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> tuple[Path, Path]:
    """part1 with every configuration; part16 uniformly 0.1 worse in AUROC, without STFPM and
    with one PaDiM configuration part1 lacks."""
    root = tmp_path_factory.mktemp("compare")
    a = write_study_output(root / "part1", seeds=(0, 1))
    extra = ("padim", {"n_features": 20}, 0.70, 0.80, 8.0, 1.0)
    b_configs = [c for c in CONFIGS if c[0] != "stfpm"] + [extra]
    b = write_study_output(
        root / "part16", category="part16", seeds=(0, 1, 2), shift=-0.1, configs=b_configs
    )
    return a, b


def test_treatment_is_detected_and_configurations_match(parts):
    a, b = parts
    result = compare_outputs(a, b)
    assert result["treatment"] == {"category": {"a": "part1", "b": "part16"}}
    assert "category" not in result["match_on"] and "model" in result["match_on"]
    assert result["metrics"] == ["image_auroc", "pixel_auroc", "image_f1", "pixel_f1", "latency_ms"]
    matched = result["matched"]
    assert len(matched) == 5  # the configurations both hold
    assert {(m["model"], m.get("hp.coreset_ratio")) for m in matched} == {
        ("patchcore", 0.01),
        ("patchcore", 0.1),
        ("patchcore", 1),
        ("padim", None),
        ("padim", None),
    }
    for entry in matched:
        assert (entry["n_seeds_a"], entry["n_seeds_b"]) == (2, 3)
        # B - A: the shift, give or take the seed wobble (at most 0.01 each way).
        assert entry["image_auroc_diff"] == pytest.approx(-0.1, abs=0.021)
        assert entry["image_auroc_diff"] == pytest.approx(
            entry["image_auroc_b"] - entry["image_auroc_a"]
        )
        assert entry["image_auroc_a_std"] > 0 and entry["image_auroc_b_std"] > 0
    assert [(o["model"], o["n_seeds"]) for o in result["only_a"]] == [("stfpm", 2)]
    assert [(o["model"], o["hp.n_features"]) for o in result["only_b"]] == [("padim", 20)]
    assert result["rows"] == {"a": {"rows": 13, "ok": 12}, "b": {"rows": 19, "ok": 18}}


def test_compare_command_table_and_json(parts):
    a, b = parts
    result = invoke("compare", a, b, "--metric", "image_auroc", "--metric", "latency_ms")
    assert result.exit_code == 0, result.output
    text = result.output
    assert "treatment: category: A = part1, B = part16" in text
    assert "5 configuration(s) in both" in text
    assert "1 configuration(s) only in A" in text and "1 configuration(s) only in B" in text
    assert "coreset_ratio" in text and "n_features" in text  # what tells rows apart
    assert "pixel_auroc" not in text
    result = invoke("compare", a, b, "--format", "json", "--on", "category")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) >= {"treatment", "match_on", "matched", "only_a", "only_b", "metrics"}
    assert len(data["matched"]) == 5


def test_treatment_within_one_output_needs_a_filter(tmp_path):
    a = write_study_output(tmp_path / "a", seeds=(0,), augmentations=("none", "defocus"))
    b = write_study_output(tmp_path / "b", seeds=(0,), augmentations=("defocus",), shift=0.05)
    # Without --on nothing is constant within A: augmentation is a match key, so B's defocus
    # rows meet A's defocus rows and A's clean ones have no partner.
    auto = compare_outputs(a, b)
    assert auto["treatment"] == {}
    assert len(auto["matched"]) == 6 and len(auto["only_a"]) == 6
    for entry in auto["matched"]:
        assert entry["augmentation"] == "defocus"
        assert entry["image_auroc_diff"] == pytest.approx(0.05, abs=0.021)
    # --on augmentation: A holds two values per configuration, which compare cannot pair.
    result = invoke("compare", a, b, "--on", "augmentation")
    assert result.exit_code == 2, result.output
    assert "several values of the treatment" in result.output and "--where" in result.output
    # Filtered to one value per side, the treatment is clean (A) vs defocus (B).
    clean_a = write_study_output(tmp_path / "clean", seeds=(0,))
    result = invoke("compare", clean_a, b, "--on", "augmentation", "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["treatment"] == {"augmentation": {"a": "none", "b": "defocus"}}
    assert len(data["matched"]) == 6
    filtered = invoke("compare", a, b, "--where", "augmentation == defocus", "--format", "json")
    assert filtered.exit_code == 0 and json.loads(filtered.stdout)["only_a"] == []


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--on", "augmentaton"], ["--on 'augmentaton'", "did you mean 'augmentation'"]),
        (["--metric", "image_aurco"], ["--metric 'image_aurco'", "did you mean 'image_auroc'"]),
        (["--metric", "model"], ["not a numeric column"]),
        (["--format", "html"], ["--format 'html'"]),
        (["--where", "modle == padim"], ["'modle'", "did you mean 'model'"]),
    ],
)
def test_compare_bad_input_exits_2(parts, args, needles):
    a, b = parts
    result = invoke("compare", a, b, *args)
    assert result.exit_code == 2, result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


def test_compare_missing_output_exits_2(parts, tmp_path):
    result = invoke("compare", parts[0], tmp_path / "nope")
    assert result.exit_code == 2 and "no such directory" in result.output


@pytest.fixture(scope="module")
def seed_runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("seeds")
    a = write_study_output(root / "a", seeds=SEEDS, configs=SEEDS_A, error_row=False)
    b = write_study_output(root / "b", seeds=SEEDS, configs=SEEDS_B, error_row=False, wobble_seed=1)
    return a, b


def test_paired_t_tests_over_seeds_with_bh_adjustment(seed_runs):
    a, b = seed_runs
    result = compare_outputs(a, b, metrics=["image_auroc", "pixel_auroc"])
    by_model = {entry["model"]: entry for entry in result["matched"]}
    assert set(by_model) == {"patchcore", "padim"}
    assert all(entry["paired_seeds"] == 5 for entry in by_model.values())
    # The 0.05 shift stands far above seed noise of +-0.01; PaDiM differs by noise only.
    assert by_model["patchcore"]["image_auroc_p_adj"] < 1e-4
    assert by_model["padim"]["image_auroc_p_adj"] > 0.2
    # Independently: scipy's paired test on the rows matched by seed, then BH by hand over the
    # family of one metric across the two configurations (m = 2).
    rows = [pd.read_parquet(path).query("status == 'ok'") for path in (a, b)]
    for metric in ("image_auroc", "pixel_auroc"):
        p = {}
        for model in by_model:
            pair = pd.merge(*(r[r.model == model][["seed", metric]] for r in rows), on="seed")
            assert len(pair) == 5
            p[model] = stats.ttest_rel(pair[f"{metric}_y"], pair[f"{metric}_x"]).pvalue
        low, high = sorted(p, key=p.get)
        expected = {high: p[high], low: min(p[low] * 2, p[high])}
        for model, entry in by_model.items():
            assert entry[f"{metric}_p"] == pytest.approx(p[model], rel=1e-9)
            assert entry[f"{metric}_p_adj"] == pytest.approx(expected[model], rel=1e-9)
    table = invoke("compare", a, b, "--metric", "image_auroc")
    assert table.exit_code == 0, table.output
    assert "p adj" in table.output and "Benjamini-Hochberg" in table.output
    patchcore = next(line for line in table.output.splitlines() if "patchcore" in line)
    padim = next(line for line in table.output.splitlines() if "padim" in line)
    assert "*" in patchcore and "*" not in padim
    data = json.loads(invoke("compare", a, b, "--format", "json").stdout)
    assert {"image_auroc_p", "image_auroc_p_adj"} <= set(data["matched"][0])


def test_fewer_than_two_paired_seeds_have_no_p_value(seed_runs, tmp_path):
    one = write_study_output(tmp_path / "one", seeds=(4, 9), configs=SEEDS_B, error_row=False)
    result = compare_outputs(seed_runs[0], one, metrics=["image_auroc"])
    for entry in result["matched"]:
        assert entry["paired_seeds"] == 1  # seed 4 only
        assert entry["image_auroc_p"] is None and entry["image_auroc_p_adj"] is None
    table = invoke("compare", seed_runs[0], one, "--metric", "image_auroc")
    assert table.exit_code == 0 and table.output.count("n<2") == 3  # 2 rows and the title
