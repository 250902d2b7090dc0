"""The study files of studies/: each validates, has a small smoke form, and that smoke form runs
end to end on a CPU through Ray and lands its rows in Parquet (CI's dry run of every study)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sweep.results import read_results
from sweep.run.runner import run_study
from sweep.run.smoke import smoke_form
from sweep.run.study import expand_trials, load_study

STUDIES = sorted((Path(__file__).resolve().parent.parent / "studies").glob("*.yaml"))
# Smoke forms that take longer than a few seconds run in CI's slow stage.
SLOW_SMOKES = {
    "label_budget",
    "resolution",
    "roi_bead",
    "glue_line",
    "glue_line_lite",
    "augmentation_robustness",
    "glue_parts",
    "mvtec",
    "vin_labels",
}
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

# The reference study's detector x backbone rows (model, backbone, image size), by table.
R18, R50, WRN = "resnet18", "resnet50", "wide_resnet50_2"
CAIT, DEIT = "cait_m48_448", "deit_base_distilled_patch16_384"
TABLE_6 = {
    ("cfa", R18, 224),
    ("cfa", WRN, 224),
    ("cflow", WRN, 256),
    ("csflow", "efficientnet_b5", 768),
    ("dfm", R50, 256),
    ("draem", None, 256),
    ("dsr", None, 256),
    ("efficient_ad", None, 256),
    ("fastflow", R18, 256),
    ("fastflow", WRN, 256),
    ("fastflow", CAIT, 448),
    ("fastflow", DEIT, 384),
    ("ganomaly", None, 256),
    ("padim", R18, 256),
    ("padim", WRN, 256),
    ("patchcore", WRN, 256),
    ("reverse_distillation", R18, 256),
    ("reverse_distillation", WRN, 256),
    ("stfpm", R18, 256),
    ("stfpm", WRN, 256),
    ("uflow", "mcait", 448),
    ("uflow", R18, 256),
    ("uflow", WRN, 256),
}
TABLE_D10 = TABLE_6 | {
    ("dfkde", R18, 256),
    ("dfkde", WRN, 256),
    ("mmr", WRN, 256),
    ("simplenet", WRN, 288),
}
TABLE_A7 = TABLE_D10
TABLE_C9 = (TABLE_D10 - {("efficient_ad", None, 256)}) | {("cutpaste", R18, 256)}
MVTEC_AD_CATEGORIES = {
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
}


def test_the_issue_s_studies_exist():
    names = {path.stem for path in STUDIES}
    assert {
        "glue_line",
        "seeds",
        "resolution",
        "coreset_ratio",
        "augmentation_robustness",
        "optuna_patchcore",
        "glue_parts",
        "mvtec",
        "vin_labels",
    } <= names


def test_vin_labels_crosses_resolution_and_test_share_with_the_split_per_seed():
    study = load_study(next(p for p in STUDIES if p.stem == "vin_labels"))
    trials = expand_trials(study)
    assert len(trials) == 3 * 3 * 3 * 5, "Table 9: 3 models x 3 sizes x 3 test shares x 5 seeds"
    assert {t.model for t in trials} == {"patchcore", "padim", "skip_ganomaly"}
    assert {t.image_size for t in trials} == {208, 256, 304}
    assert {t.test_fraction for t in trials} == {0.10, 0.15, 0.20}
    assert all(t.split_seed == t.seed for t in trials), "each seed draws its own split"
    assert str(study.evaluation.threshold_policy) == "precision_at:0.996"
    assert study.objectives[0].metric == "image_recall_p996"


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
    path = _study_path("augmentation_robustness")
    study = load_study(path)
    axes = {key: list(study.space[key].options()) for key in ("seed", "augmentation", "stress")}
    assert axes == {
        "seed": [0, 1, 2, 3, 4],
        "augmentation": ["none", "defocus", "brightness_contrast", "iso_noise", "table3_all"],
        "stress": ["none", "lighting", "background", "rotation", "orientation"],
    }
    assert study.augmentation_sets["table3_all"].spec() == TABLE3
    # Expanding the whole grid (3375 trials) takes the better part of a minute: its rows are
    # the table's configurations at one point of the three axes, crossed with every point.
    pinned = load_study(path, ["space.seed=0", "space.augmentation=none", "space.stress=none"])
    configurations = _pairs(expand_trials(pinned))
    assert configurations == TABLE_C9
    assert len(configurations) == 27, "Table C.9: 27 rows"
    assert all(t.hparams.get("pretrained", True) for t in expand_trials(pinned))


def test_glue_parts_runs_tables_6_and_d10_on_parts_6_and_16():
    study = load_study(_study_path("glue_parts"))
    trials = expand_trials(study)
    pairs = _pairs(trials)
    assert pairs == TABLE_D10 and len(pairs) == 27, "Table D.10: 27 rows"
    assert len(TABLE_6) == 23 and pairs >= TABLE_6, "Table 6: 23 rows, all among them"
    assert {t.seed for t in trials} == {0, 1, 2, 3, 4}
    assert len(trials) == 27 * 5
    assert study.dataset.category == "part6"
    assert study.output_dir.endswith("part6")
    part16 = load_study(_study_path("glue_parts"), ["dataset.category=part16"])
    assert part16.dataset.loader_arguments(64)["category"] == "part16"
    # The header's commands for part 16 name its category and its own output.
    header = _study_path("glue_parts").read_text()
    assert "--set dataset.category=part16 --output results/glue_parts/part16" in header
    assert smoke_form(study).dataset.category == "part16", "the smoke form runs the hard part"


def test_mvtec_is_table_a7_on_every_mvtec_ad_category():
    path = _study_path("mvtec")
    study = load_study(path)
    assert study.dataset.kind == "mvtec"
    assert _pairs(expand_trials(study)) == TABLE_A7
    assert len(TABLE_A7) == 27, "Table A.7: 27 rows"
    loop = re.search(r"for category in ([a-z_ ]+); do", path.read_text())
    assert loop is not None, "the header runs every category"
    assert loop.group(1).split() == sorted(MVTEC_AD_CATEGORIES)
    assert study.dataset.category in MVTEC_AD_CATEGORIES


def test_mvtec_without_its_data_stops_with_exit_2_naming_the_path(tmp_path):
    from typer.testing import CliRunner

    from sweep.cli import app

    missing = tmp_path / "no-mvtec-here"
    output = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "run",
            str(_study_path("mvtec")),
            "--set",
            f"dataset.root={missing}",
            "--output",
            str(output),
        ],
    )
    assert result.exit_code == 2, result.output
    assert str(missing) in result.output
    assert not output.exists() or not any(output.glob("*.parquet")), "no trial ran"


def _study_path(stem: str) -> Path:
    return next(p for p in STUDIES if p.stem == stem)


def _pairs(trials) -> set[tuple[str, str | None, int]]:
    return {(t.model, t.backbone, t.image_size) for t in trials}


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
