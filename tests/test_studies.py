"""The study files of studies/: each validates, has a small smoke form, and that smoke form runs
end to end on a CPU through Ray and lands its rows in Parquet (CI's dry run of every study)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sweep.results import read_results
from sweep.run.runner import run_study
from sweep.run.smoke import smoke_form
from sweep.run.study import expand_trials, load_study

STUDIES = sorted((Path(__file__).resolve().parent.parent / "studies").glob("*.yaml"))
# Smoke forms that take longer than a few seconds run in CI's slow stage.
SLOW_SMOKES = {"glue_line", "glue_line_lite", "augmentation_robustness"}
MAX_SMOKE_TRIALS = 40
TABLE3 = [
    {"Defocus": {"alias_blur": [0.1, 0.5], "p": 0.5, "radius": [3, 10]}},
    {
        "RandomBrightnessContrast": {
            "brightness_by_max": True,
            "brightness_limit": [-0.2, 0.2],
            "contrast_limit": [-0.2, 0.2],
            "p": 0.5,
        }
    },
    {"ISONoise": {"color_shift": [0.01, 0.05], "intensity": [0.1, 0.5], "p": 0.5}},
]


def test_the_issue_s_studies_exist():
    names = {path.stem for path in STUDIES}
    assert {
        "glue_line",
        "seeds",
        "resolution",
        "coreset_ratio",
        "augmentation_robustness",
        "optuna_patchcore",
    } <= names


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_every_study_and_its_smoke_form_validate(path):
    study = load_study(path)
    smoke = smoke_form(study)
    assert smoke.name == f"{study.name}-smoke"
    assert smoke.output_dir == f"{study.output_dir}-smoke", "smoke rows never mix with real ones"
    assert smoke.dataset.kind == "synthetic_glue"
    assert smoke.models and set(smoke.models) <= set(study.models)
    if smoke.search.algorithm == "optuna":
        assert smoke.search.n_trials <= 3
        return
    trials = expand_trials(smoke)
    assert 1 <= len(trials) <= MAX_SMOKE_TRIALS
    assert len({t.seed for t in trials}) == 1
    assert all(t.image_size in (64, 96) for t in trials)
    assert all(t.hparams.get("pretrained", False) is False for t in trials)


def test_glue_line_is_the_reference_study():
    study = load_study(next(p for p in STUDIES if p.stem == "glue_line"))
    trials = expand_trials(study)
    pairs = {(t.model, t.backbone, t.image_size) for t in trials}
    assert len(study.models) == 17
    assert len(pairs) == 28, "Tables 4-5: 28 detector x backbone pairs"
    assert {t.seed for t in trials} == {0, 1, 2, 3, 4}
    assert ("fastflow", "cait_m48_448", 448) in pairs
    assert ("fastflow", "deit_base_distilled_patch16_384", 384) in pairs
    assert ("uflow", "mcait", 448) in pairs
    assert ("csflow", "efficientnet_b5", 768) in pairs
    assert all(t.hparams.get("pretrained", True) for t in trials)


def test_augmentation_study_crosses_table3_sets_and_stresses():
    study = load_study(next(p for p in STUDIES if p.stem == "augmentation_robustness"))
    trials = expand_trials(study)
    assert {t.augmentation for t in trials} == {
        "none",
        "defocus",
        "brightness_contrast",
        "iso_noise",
        "table3_all",
    }
    assert {t.stress for t in trials} == {
        "none",
        "lighting",
        "background",
        "rotation",
        "orientation",
    }
    assert study.augmentation_sets["table3_all"].spec() == TABLE3


def _smoke_params():
    for path in STUDIES:
        marks = [pytest.mark.slow] if path.stem in SLOW_SMOKES else []
        yield pytest.param(path, id=path.stem, marks=marks)


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("glue-smoke"))


@pytest.mark.ray
@pytest.mark.parametrize("path", _smoke_params())
def test_every_study_dry_runs_in_smoke_form(ray_session, smoke_data, tmp_path, path):
    study = smoke_form(load_study(path), data_root=smoke_data)
    output = tmp_path / "out"
    summary = run_study(study, output=str(output))
    df = read_results(output)
    planned = (
        study.search.n_trials if study.search.algorithm == "optuna" else len(expand_trials(study))
    )
    errors = df.loc[df.status != "ok", ["model", "error"]].to_dict("records")
    assert not errors, f"{path.stem}: error rows {errors}"
    assert summary.ok == planned and len(df) == planned
    assert df["image_auroc"].notna().all() and df["latency_ms"].gt(0).all()
    assert set(df["model"]) == set(study.models) or study.search.algorithm == "optuna"
    if "augmentation" in study.space:
        _check_robustness_rows(df, output)


def _check_robustness_rows(df, output: Path) -> None:
    from typer.testing import CliRunner

    from sweep.cli import app

    clean = df[df.augmentation == "none"]
    assert clean["augmentation_spec"].isna().all()
    table3 = df[df.augmentation == "table3_all"]
    assert len(table3) and all(json.loads(s) == TABLE3 for s in table3["augmentation_spec"])
    rotated = df[df.stress == "rotation"]
    assert len(rotated) and all(json.loads(s)["kind"] == "rotation" for s in rotated["stress_spec"])

    result = CliRunner().invoke(app, ["report", str(output), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    variants = {(r["model"], r["augmentation"], r["stress"]) for r in report["robustness"]}
    assert ("padim", "table3_all", "none") in variants
    assert ("stfpm", "none", "rotation") in variants
    for row in report["robustness"]:
        assert row["image_auroc_delta"] == pytest.approx(
            row["image_auroc_mean"] - row["image_auroc_clean"]
        )
    # Model selection compares detectors as they run: trained and tested clean.
    assert {(c["augmentation"], c["stress"]) for c in report["configurations"]} == {
        ("none", "none")
    }
    text = CliRunner().invoke(app, ["report", str(output)])
    assert "Robustness" in text.output and "Δ" in text.output
