"""Pretrained weights offline: what a study needs, `sweep weights fetch`, and trials that load
the fetched files with no network. No test downloads anything: the source of the weights is
injected (random-init timm models) and every way out to the network is closed."""

from __future__ import annotations

import hashlib
import io
import socket
from pathlib import Path

import pytest
import timm
import torch
import yaml
from rich.console import Console
from safetensors import safe_open
from typer.testing import CliRunner

from models.backbones import BACKBONES, FeatureExtractor, get_backbone, meta_init, weights_problem
from models.errors import ModelError
from sweep.cli import app
from sweep.errors import StudyError, SweepError
from sweep.run.runner import study_schema
from sweep.run.smoke import smoke_form
from sweep.run.study import config_hash, expand_trials, study_from_dict
from sweep.run.trainable import TrialContext, run_trial
from sweep.run.weights import (
    WEIGHTS_DIR_ENV,
    check_study_weights,
    fetch_weights,
    inspect_weights,
    needed_backbones,
    trial_weights,
)
from tests.conftest import tiny_study

runner = CliRunner()


@pytest.fixture(autouse=True)
def _isolated_weights(monkeypatch, tmp_path):
    """No weights folder from the environment, and the default one under tmp_path."""
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


class RandomSource:
    """A weights source without network: a random-init timm model per backbone, seeded by name
    (what the tests compare against), counting its calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def model(self, name: str) -> torch.nn.Module:
        spec = get_backbone(name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sum(map(ord, name)))
            return timm.create_model(spec.timm_name, pretrained=False).eval()

    def __call__(self, spec, scratch: Path) -> torch.nn.Module:
        assert scratch.is_dir()
        self.calls.append(spec.name)
        return self.model(spec.name)


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def study(space: dict, **extra):
    return study_from_dict({"name": "w", "space": space, **extra})


def padim_study(backbones=("resnet18",), **extra):
    grid = list(backbones)
    return study(
        {"model": "padim", "backbone": {"grid": grid}, "pretrained": True, "seed": 0}, **extra
    )


@pytest.fixture
def no_network(monkeypatch):
    """Offline: the hub says so, and any download or connection attempt is recorded (a library
    could swallow an exception; the list cannot be swallowed)."""
    attempts: list[str] = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(name):
        def refused(*args, **kwargs):
            attempts.append(name)
            raise ConnectionError(f"test: no network ({name})")

        return refused

    import huggingface_hub
    import timm.models._builder as builder

    monkeypatch.setattr(builder, "load_pretrained", refuse("timm load_pretrained"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse("hf_hub_download"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse("torch.hub"))
    connect = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(f"connect {address}")
            raise ConnectionError("test: no network")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    return attempts


# --------------------------------------------------------------------------- what a study needs


def test_needed_backbones_follow_the_grid_defaults_composites_and_opt_outs():
    s = study(
        {
            "model": {"grid": ["patchcore", "uflow", "padim", "stfpm", "efficient_ad", "cfa"]},
            "pretrained": True,
            "cfa.backbone": {"grid": ["resnet18", "wide_resnet50_2"]},
            "uflow.backbone": "mcait",
            "uflow.image_size": "native",
            "padim.pretrained": False,  # random init: nothing to fetch
            "stfpm.weights": "/elsewhere/teacher.pth",  # its own file: nothing to fetch
        }
    )
    needs = {n.backbone: n for n in needed_backbones(s)}
    # patchcore's default backbone, cfa's grid, and uflow's mcait as its two CaiTs;
    # efficient_ad's teacher is a PDN, not a timm backbone.
    assert set(needs) == {"wide_resnet50_2", "resnet18", "cait_m48_448", "cait_s24_224"}
    assert needs["wide_resnet50_2"].models == ("patchcore", "cfa")
    assert needs["wide_resnet50_2"].timm_name == "wide_resnet50_2.tv_in1k"
    assert needs["cait_m48_448"].via == ("mcait",) and needs["cait_m48_448"].models == ("uflow",)
    # The smoke form is random-init throughout.
    assert needed_backbones(smoke_form(s)) == []


def test_weights_dir_is_a_local_path_and_not_part_of_a_trials_identity(tmp_path, monkeypatch):
    plain = padim_study()
    with_dir = padim_study(weights_dir=str(tmp_path))
    trial = expand_trials(plain)[0]
    assert config_hash(with_dir, trial) == config_hash(plain, trial)
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    assert config_hash(plain, trial) == config_hash(with_dir, expand_trials(with_dir)[0])
    with pytest.raises(StudyError, match=r"weights_dir: .*not a URI: 's3://bucket/weights'"):
        padim_study(weights_dir="s3://bucket/weights")


# --------------------------------------------------------------------------- fetching


def test_fetch_writes_each_backbone_once_and_keeps_valid_files(tmp_path):
    needs = needed_backbones(padim_study(("resnet18", "mobilenetv3_small_100")))
    source = RandomSource()
    target = tmp_path / "weights"

    results = fetch_weights(needs, target, source=source, console=quiet())
    assert [(r.backbone, r.status) for r in results] == [
        ("mobilenetv3_small_100", "fetched"),
        ("resnet18", "fetched"),
    ]
    # Named as trials look them up; nothing else left behind (no temporary file, no scratch).
    assert sorted(p.name for p in target.iterdir()) == [
        "mobilenetv3_small_100.safetensors",
        "resnet18.safetensors",
    ]
    with safe_open(str(target / "resnet18.safetensors"), framework="pt") as handle:
        assert handle.metadata()["timm_name"] == "resnet18.tv_in1k"
        expected = source.model("resnet18").state_dict()["layer4.1.conv2.weight"]
        assert torch.equal(handle.get_tensor("layer4.1.conv2.weight"), expected)

    # Again: both present and valid, the source is not asked.
    again = fetch_weights(needs, target, source=source, console=quiet())
    assert [r.status for r in again] == ["present", "present"]
    assert source.calls == ["mobilenetv3_small_100", "resnet18"]

    # A truncated file is invalid and fetched again; the valid one stays.
    path = target / "resnet18.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    entries = {e.need.backbone: e for e in inspect_weights(needs, target)}
    assert entries["resnet18"].status == "invalid"
    assert "could not be read" in entries["resnet18"].problem
    third = fetch_weights(needs, target, source=source, console=quiet())
    assert [r.status for r in third] == ["present", "fetched"]
    assert source.calls[-1] == "resnet18"
    assert inspect_weights(needs, target)[1].status == "present"


def test_a_file_of_another_architecture_is_invalid(tmp_path):
    from safetensors.torch import save_file

    needs = needed_backbones(padim_study())
    source = RandomSource()
    path = tmp_path / "resnet18.safetensors"

    def problem(state, metadata=None):
        save_file(state, str(path), metadata=metadata)
        (entry,) = inspect_weights(needs, tmp_path)
        assert entry.status == "invalid"
        assert "does not fit backbone 'resnet18'" in entry.problem
        return entry.problem

    # ResNet-50: other shapes. ResNet-34: fills every ResNet-18 tensor (and would load), but
    # holds blocks ResNet-18 does not have. A file that says it is another backbone's.
    assert "wrong shapes" in problem(source.model("resnet50").state_dict())
    assert "layer1.2." in problem(source.model("resnet34").state_dict())
    resnet18 = source.model("resnet18").state_dict()
    assert "'resnet34'" in problem(resnet18, {"backbone": "resnet34"})
    save_file(resnet18, str(path), metadata={"backbone": "resnet18"})
    assert inspect_weights(needs, tmp_path)[0].status == "present"


def test_a_failed_or_interrupted_download_leaves_no_file(tmp_path, monkeypatch):
    needs = needed_backbones(padim_study(("resnet18", "mobilenetv3_small_100")))
    target = tmp_path / "weights"
    good = RandomSource()

    def flaky(spec, scratch):
        if spec.name == "resnet18":
            (scratch / "partial.download").write_bytes(b"\0" * 1000)
            raise OSError("connection reset by peer")
        return good(spec, scratch)

    results = fetch_weights(needs, target, source=flaky, console=quiet())
    assert [(r.backbone, r.status) for r in results] == [
        ("mobilenetv3_small_100", "fetched"),
        ("resnet18", "failed"),
    ]
    assert "OSError: connection reset by peer" in results[1].reason
    assert sorted(p.name for p in target.iterdir()) == ["mobilenetv3_small_100.safetensors"]

    # A source that gives another architecture is refused before anything is written.
    wrong = fetch_weights(
        needs[1:], target, source=lambda spec, scratch: good.model("resnet34"), console=quiet()
    )
    assert wrong[0].status == "failed" and "do not fit 'resnet18'" in wrong[0].reason

    # Interrupted while writing (Ctrl-C half-way through the file): nothing under any name.
    import safetensors.torch

    def half_written(state, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 4096)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    with pytest.raises(KeyboardInterrupt):
        fetch_weights(needs[1:], target, source=good, console=quiet())
    assert sorted(p.name for p in target.iterdir()) == ["mobilenetv3_small_100.safetensors"]


def test_every_registered_backbone_loads_from_a_full_timm_checkpoint():
    # What fetch writes is the whole timm model's state dict; every extractor must find its
    # weights there, including those whose feature wrappers rename modules (ConvNeXt, DenseNet,
    # VGG: stem_0 for stem.0). Shapes only, on the meta device.
    for name, spec in BACKBONES.items():
        if spec.kind == "composite":
            continue
        with torch.random.fork_rng(devices=[]), meta_init():
            full = timm.create_model(spec.timm_name, pretrained=False)
        assert weights_problem(spec, full.state_dict()) is None, name


def test_a_renamed_extractor_loads_the_same_weights_as_timm_does(tmp_path):
    # densenet121's extractor names its modules features_conv0 (the checkpoint: features.conv0);
    # timm loading the same file into its own feature extractor is the reference.
    source = RandomSource()
    needs = needed_backbones(padim_study(("densenet121",)))
    fetch_weights(needs, tmp_path, source=source, console=quiet())
    path = tmp_path / "densenet121.safetensors"
    ours = FeatureExtractor("densenet121", ["layer2", "layer3"], pretrained=True, weights=tmp_path)
    reference = timm.create_model(
        "densenet121.tv_in1k",
        features_only=True,
        out_indices=(2, 3),
        pretrained=True,
        pretrained_cfg_overlay={"file": str(path)},
    ).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        mine = ours(images)
        theirs = reference(images)
    torch.testing.assert_close(mine["layer2"], theirs[0], rtol=0, atol=0)
    torch.testing.assert_close(mine["layer3"], theirs[1], rtol=0, atol=0)


# --------------------------------------------------------------------------- trials


def test_a_pretrained_trial_loads_the_fetched_weights_with_no_network(
    glue_root, tmp_path, no_network
):
    source = RandomSource()
    weights = tmp_path / "weights"
    fetch_weights(needed_backbones(padim_study()), weights, source=source, console=quiet())
    path = weights / "resnet18.safetensors"

    # The extractor a pretrained detector builds gives the source model's features.
    layers = ["layer1", "layer2", "layer3"]
    extractor = FeatureExtractor("resnet18", layers, pretrained=True, weights=weights)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = source.model("resnet18").forward_intermediates(
            images, indices=[1, 2, 3], intermediates_only=True
        )
        got = extractor(images)
    for layer, reference in zip(layers, expected, strict=True):
        torch.testing.assert_close(got[layer], reference, rtol=0, atol=0)

    # A whole trial, pretrained: true, the folder named by the study: it runs offline and its
    # row names the file it loaded and its hash.
    raw = tiny_study(glue_root, tmp_path / "out")
    raw["space"] = {"model": "padim", "backbone": "resnet18", "pretrained": True, "seed": 0}
    raw["weights_dir"] = str(weights)
    s = study_from_dict(raw)
    trial = expand_trials(s)[0]
    ctx = TrialContext(study=s, output=str(tmp_path / "out"), run_id="t", schema=study_schema(s))
    row = run_trial(trial, ctx)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert row["weights"] == f"resnet18.safetensors sha256:{digest}"
    assert "weights" in ctx.schema.names
    assert 0.0 <= row["image_auroc"] <= 1.0
    assert no_network == []


def test_which_weights_a_trial_gets(tmp_path, monkeypatch):
    trial = expand_trials(padim_study())[0]
    # Nothing named, nothing in the default folder: timm downloads (and the row says so).
    args, label = trial_weights(padim_study(), trial)
    assert "weights" not in args and label == "timm:resnet18.tv_in1k"
    # Random init: no weights at all.
    random = study({"model": "padim", "backbone": "resnet18", "pretrained": False})
    assert trial_weights(random, expand_trials(random)[0]) == (
        {"backbone": "resnet18", "pretrained": False, "seed": 0},
        None,
    )
    # The default folder serves the trial when it holds the file.
    default = tmp_path / "home" / ".cache" / "anomaly-sweep" / "weights"
    default.mkdir(parents=True)
    (default / "resnet18.safetensors").write_bytes(b"weights")
    args, label = trial_weights(padim_study(), trial)
    assert args["weights"] == str(default)
    assert label == f"resnet18.safetensors sha256:{hashlib.sha256(b'weights').hexdigest()}"
    # The environment variable names a folder: it must hold the file.
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(empty))
    with pytest.raises(ModelError, match=rf"{empty}.*no file for backbone 'resnet18'"):
        trial_weights(padim_study(), trial)
    # A composite needs each member's file; the label lists both.
    for member in ("cait_m48_448", "cait_s24_224"):
        (empty / f"{member}.safetensors").write_bytes(member.encode())
    uflow = study(
        {"model": "uflow", "backbone": "mcait", "image_size": "native", "pretrained": True}
    )
    args, label = trial_weights(uflow, expand_trials(uflow)[0])
    assert args["weights"] == str(empty)
    assert label.startswith("cait_m48_448.safetensors sha256:")
    assert "; cait_s24_224.safetensors sha256:" in label


def test_a_missing_weights_file_stops_the_run_naming_backbone_and_folder(tmp_path, monkeypatch):
    empty = tmp_path / "weights"
    empty.mkdir()
    with pytest.raises(SweepError) as info:
        check_study_weights(padim_study(weights_dir=str(empty)))
    message = str(info.value)
    assert str(empty) in message and "the study's weights_dir" in message
    assert "no file for backbone 'resnet18' (used by padim" in message
    assert "resnet18.safetensors" in message and "sweep weights fetch" in message

    with pytest.raises(SweepError, match="does not exist"):
        check_study_weights(padim_study(weights_dir=str(tmp_path / "nowhere")))
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(empty))
    with pytest.raises(SweepError, match=r"\$ANOMALY_SWEEP_WEIGHTS_DIR"):
        check_study_weights(padim_study())
    # Random-init studies need no weights, wherever the folder points.
    check_study_weights(study({"model": "padim", "pretrained": False}))


def test_sweep_run_exits_2_before_anything_runs_when_a_weights_file_is_missing(tmp_path):
    empty = tmp_path / "weights"
    empty.mkdir()
    path = tmp_path / "study.yaml"
    output = tmp_path / "out"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "offline",
                "space": {"model": "padim", "backbone": "resnet18", "pretrained": True},
                "weights_dir": str(empty),
                "output": str(output),
            }
        )
    )
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    assert "no file for backbone 'resnet18'" in result.output and str(empty) in result.output
    assert not output.exists()


def test_weights_fetch_and_list_commands(tmp_path, monkeypatch):
    import sweep.run.weights

    source = RandomSource()
    monkeypatch.setattr(sweep.run.weights, "timm_pretrained", source)
    path = tmp_path / "study.yaml"
    path.write_text(
        yaml.safe_dump(
            {"name": "cli", "space": {"model": "padim", "backbone": "resnet18", "pretrained": True}}
        )
    )
    target = tmp_path / "weights"
    listed = runner.invoke(app, ["weights", "list", str(path), "--to", str(target)])
    assert listed.exit_code == 0, listed.output
    assert "missing" in listed.output and "0 of 1 present" in listed.output

    fetched = runner.invoke(app, ["weights", "fetch", str(path), "--to", str(target)])
    assert fetched.exit_code == 0, fetched.output
    assert "1 fetched, 0 present, 0 failed" in fetched.output
    assert (target / "resnet18.safetensors").is_file()
    again = runner.invoke(app, ["weights", "fetch", str(path), "--to", str(target)])
    assert "0 fetched, 1 present, 0 failed" in again.output and source.calls == ["resnet18"]
    listed = runner.invoke(app, ["weights", "list", str(path), "--to", str(target)])
    assert "present" in listed.output and "1 of 1 present" in listed.output

    # Without --to: the default folder (under HOME here).
    default = runner.invoke(app, ["weights", "fetch", str(path)])
    assert default.exit_code == 0
    assert (tmp_path / "home/.cache/anomaly-sweep/weights/resnet18.safetensors").is_file()

    def offline(spec, scratch):
        raise ConnectionError("no route to the hub")

    monkeypatch.setattr(sweep.run.weights, "timm_pretrained", offline)
    failed = runner.invoke(app, ["weights", "fetch", str(path), "--to", str(tmp_path / "other")])
    assert failed.exit_code == 1 and "no route to the hub" in failed.output
    bad = runner.invoke(app, ["weights", "fetch", str(tmp_path / "missing.yaml")])
    assert bad.exit_code == 2 and "no such study file" in bad.output
