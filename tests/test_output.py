"""The output layer: every command's --json is one JSON document with the expected keys, the
domain functions behind `plan` and `weights` print nothing, and `sweep --help` stays light."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import typer
import yaml
from rich.console import Console
from safetensors.torch import save_file
from typer.testing import CliRunner

from sweep import output
from sweep.cli import app
from sweep.run.plan import group_trials, make_plan
from sweep.run.study import load_study
from sweep.run.weights import fetch_studies, fetch_weights, list_weights, needed_backbones
from tests.report_rows import write_study_output

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "studies" / "quickstart.yaml"
runner = CliRunner()


def invoke_json(*args: object) -> object:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_catalogue_json_keys():
    detectors = invoke_json("models", "--json")
    assert set(detectors[0]) == {
        "name",
        "learning_type",
        "localizes",
        "default_backbone",
        "backbones",
        "hyperparameters",
        "family_defaults",
    }
    on_backbone = invoke_json("models", "--backbone", "resnet18", "--json")
    assert set(on_backbone[0]) == {"name", "runs", "layers", "reason"}
    backbones = invoke_json("backbones", "--json")
    assert set(backbones[0]) == {
        "name",
        "timm_name",
        "kind",
        "family",
        "input_size",
        "dynamic_size",
        "members",
        "params",
        "layers",
        "aliases",
        "layer_summary",
    }


def test_plan_json_keys():
    plan = invoke_json("plan", QUICKSTART, "--json")
    assert set(plan) == {
        "study",
        "algorithm",
        "cluster",
        "n_trials",
        "configurations",
        "serial_s",
        "packing",
        "trials",
        "warnings",
        "notes",
    }
    assert plan["n_trials"] == len(plan["trials"]) > 0


def test_results_report_and_compare_json(tmp_path):
    a = write_study_output(tmp_path / "a")
    b = write_study_output(tmp_path / "b", category="part2")
    rows = invoke_json("results", a, "--format", "json", "--columns", "model,image_auroc")
    assert rows and set(rows[0]) == {"model", "image_auroc"}
    report = invoke_json("report", a, "--json", "--plots", tmp_path / "plots")
    assert {"results", "configurations", "trials", "ok", "errors", "plots"} <= set(report)
    compared = invoke_json("compare", a, b, "--format", "json")
    assert {"a", "b", "treatment", "matched", "only_a", "only_b", "metrics"} <= set(compared)


def test_parts_show_is_json(tmp_path):
    path = tmp_path / "part.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"kind": "test"})
    shown = invoke_json("parts", "show", path)
    assert set(shown) >= {"sha256"} and len(shown["sha256"]) == 64


def test_emit_json_is_raw_on_a_narrow_console():
    """rich must neither wrap nor mark up JSON: scripts parse it."""
    console = Console(file=io.StringIO(), width=20, force_terminal=True)
    data = {"a [bold]markup[/bold] and a long line": "x" * 100, "n": [1, 2.5, None]}
    output.emit_json(data, console)
    assert console.file.getvalue() == json.dumps(data, indent=2) + "\n"


def test_bad_input_is_one_error_line_and_exit_2(capsys):
    with pytest.raises(typer.Exit) as exit_info:
        output.bad_input(ValueError("no such thing"))
    assert exit_info.value.exit_code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: no such thing")


class RandomSource:
    """Random-init timm models instead of a download."""

    def __call__(self, spec, scratch: Path) -> torch.nn.Module:
        return timm.create_model(spec.timm_name, pretrained=False)


def test_plan_and_weights_domain_functions_print_nothing(tmp_path, capsys):
    plan = make_plan(QUICKSTART, gpus=1)
    assert group_trials(plan)
    study = tmp_path / "study.yaml"
    study.write_text(
        yaml.safe_dump(
            {"name": "w", "space": {"model": "padim", "backbone": "resnet18", "pretrained": True}}
        )
    )
    target = tmp_path / "weights"
    listed = list_weights([study], target)
    assert [e.status for e in listed[target]] == ["missing"]
    report = fetch_studies([study], target, source=RandomSource())
    assert report.failed == 0 and [r.status for r in report.folders[target]] == ["fetched"]
    again = fetch_weights(needed_backbones(load_study(study)), target, source=RandomSource())
    assert [r.status for r in again] == ["present"]
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_help_imports_no_heavy_module():
    """`sweep --help` and the light commands load neither torch, Ray nor pandas."""
    code = (
        "import sys, sweep.cli; "
        "print(sorted(m for m in ('torch', 'ray', 'pandas') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.strip() == "[]"
