"""Every entry of the bad-input catalogue (docs/errors.md) is tested here.

Each catalogue entry has an id; ``CASES`` maps that id to the command line that provokes it.
The test runs the command, expects exit status 2 and the message the catalogue quotes, and
checks that the study's output was not created. A catalogue entry without a case here, or a
case the catalogue does not list, fails ``test_catalogue_and_cases_match``.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from sweep.cli import app
from tests.conftest import tiny_study
from tests.test_cli import mvtec

CATALOGUE = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
ROW = re.compile(r"^\|\s*`(?P<id>[a-z0-9-]+)`\s*\|(?P<input>.*)\|\s*`(?P<message>[^`]+)`\s*\|\s*$")


def catalogue() -> dict[str, str]:
    """Entry id -> the message excerpt the catalogue quotes."""
    entries: dict[str, str] = {}
    for line in CATALOGUE.read_text().splitlines():
        match = ROW.match(line)
        if match:
            assert match["id"] not in entries, f"docs/errors.md repeats {match['id']!r}"
            entries[match["id"]] = match["message"]
    return entries


@dataclass
class Setup:
    tmp: Path
    glue: Path
    env: dict[str, str | None] = field(default_factory=dict)
    """The command's environment changes (CliRunner's: None unsets a variable)."""

    @property
    def output(self) -> Path:
        return self.tmp / "out"

    def study(self, edit: Callable[[dict], Any] | None = None, **overrides) -> str:
        """A valid tiny study file, changed by ``edit`` (in place) and ``overrides``."""
        raw = tiny_study(self.glue, self.output, **overrides)
        if edit is not None:
            edit(raw)
        path = self.tmp / "study.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return str(path)

    def mvtec_study(self, category: str = "part", **layout) -> str:
        """A study of ``category`` on a tiny MVTec-layout category ``part`` (``layout``: the
        options of test_cli's ``mvtec``)."""
        root = mvtec(self.tmp / "mvtec", **layout)
        spec = {"kind": "mvtec", "root": str(root), "category": category, "image_size": 64}
        return self.study(dataset=spec)


def _ray_record(s: Setup, address: str | None) -> str:
    """'auto', on a machine where `ray start` recorded ``address`` (None: nothing): Ray's temp
    folder moved under the setup's (RAY_TMPDIR), whatever runs on the machine running the test."""
    ray_dir = s.tmp / "ray-tmp" / "ray"
    ray_dir.mkdir(parents=True)
    if address is not None:
        (ray_dir / "ray_current_cluster").write_text(address)
    s.env.update(RAY_TMPDIR=str(ray_dir.parent), RAY_ADDRESS=None)
    return "auto"


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _space(**changes) -> Callable[[dict], None]:
    return lambda raw: raw["space"].update(changes)


def _set(section: str, **changes) -> Callable[[dict], None]:
    return lambda raw: raw.setdefault(section, {}).update(changes)


def _without(*keys: str) -> Callable[[dict], None]:
    def edit(raw: dict) -> None:
        for key in keys:
            raw.pop(key)

    return edit


# Each case returns the command line (without the program name).
CASES: dict[str, Callable[[Setup], list[str]]] = {
    # --- the study file
    "study-missing": lambda s: ["validate", str(s.tmp / "nope.yaml")],
    "study-directory": lambda s: ["validate", str(s.tmp)],
    "study-invalid-yaml": lambda s: [
        "validate",
        str(_write(s.tmp / "study.yaml", "name: x\nspace: {model: [patchcore\n")),
    ],
    "study-not-mapping": lambda s: [
        "validate",
        str(_write(s.tmp / "study.yaml", "- patchcore\n- padim\n")),
    ],
    "study-duplicate-key": lambda s: [
        "run",
        str(
            _write(
                s.tmp / "study.yaml",
                f"name: d\nspace: {{model: padim}}\noutput: {s.output}\nspace: {{model: stfpm}}\n",
            )
        ),
    ],
    "study-unknown-key": lambda s: ["validate", s.study(lambda raw: raw.update(spase={}))],
    "study-missing-key": lambda s: ["validate", s.study(_without("space"))],
    "study-bad-name": lambda s: ["validate", s.study(name="glue line/1")],
    "study-long-name": lambda s: ["run", s.study(name="n" * 300)],
    "study-no-model": lambda s: [
        "validate",
        s.study(lambda raw: raw["space"].pop("model")),
    ],
    "study-unknown-model": lambda s: ["validate", s.study(_space(model="patchcor"))],
    "study-unknown-backbone": lambda s: ["validate", s.study(_space(backbone="resnet19"))],
    "study-incompatible-backbone": lambda s: [
        "validate",
        s.study(_space(model="reverse_distillation", backbone="vit_base_patch16_224")),
    ],
    "study-unknown-hyperparameter": lambda s: [
        "validate",
        s.study(_space(model="patchcore", coreset_ration=0.1)),
    ],
    "study-backbone-key-unused": lambda s: [
        "validate",
        s.study(_space(**{"patchcore@wide_resnet50_2.coreset_ratio": 0.1})),
    ],
    "study-backbone-key-trial-key": lambda s: [
        "validate",
        s.study(_space(**{"patchcore@resnet18.image_size": 128})),
    ],
    "study-bad-hyperparameter": lambda s: [
        "validate",
        s.study(_space(model="patchcore", coreset_ratio=1.5)),
    ],
    "study-bad-distribution": lambda s: [
        "validate",
        s.study(_space(model="patchcore", coreset_ratio={"uniform": [0.5, 0.1]})),
    ],
    "study-bad-loguniform": lambda s: [
        "validate",
        s.study(_space(model="patchcore", coreset_ratio={"loguniform": [0, 0.1]})),
    ],
    "study-small-image": lambda s: ["validate", s.study(_space(image_size=16))],
    "study-no-objective": lambda s: ["validate", s.study(objectives=[])],
    "study-repeated-objective": lambda s: [
        "validate",
        s.study(
            objectives=[
                {"metric": "image_auroc", "mode": "max"},
                {"metric": "image_auroc", "mode": "min"},
            ]
        ),
    ],
    "study-unknown-metric": lambda s: [
        "validate",
        s.study(objectives=[{"metric": "image_aurocc", "mode": "max"}]),
    ],
    "study-optuna-without-trials": lambda s: [
        "validate",
        s.study(search={"algorithm": "optuna"}),
    ],
    "study-grid-option-on-optuna-key": lambda s: [
        "validate",
        s.study(search={"algorithm": "grid", "n_trials": 10}),
    ],
    "study-unknown-augmentation": lambda s: [
        "validate",
        s.study(_space(augmentation={"grid": ["none", "fog"]})),
    ],
    "augmentation-unknown-transform": lambda s: [
        "validate",
        s.study(augmentations={"blur": [{"Defokus": {"radius": [3, 5]}}]}),
    ],
    "augmentation-bad-argument": lambda s: [
        "validate",
        s.study(augmentations={"blur": [{"Defocus": {"radious": [3, 5]}}]}),
    ],
    "augmentation-changes-size": lambda s: [
        "validate",
        s.study(augmentations={"crop": [{"RandomCrop": {"height": 32, "width": 32}}]}),
    ],
    "study-unknown-stress": lambda s: [
        "validate",
        s.study(_space(stress={"grid": ["none", "earthquake"]})),
    ],
    "study-unknown-threshold-policy": lambda s: [
        "validate",
        s.study(_set("evaluation", threshold="median")),
    ],
    "study-bad-split-seed": lambda s: ["validate", s.study(_space(split_seed="trial"))],
    "study-bad-test-fraction": lambda s: ["validate", s.study(_space(test_fraction=1.5))],
    "study-bad-image-size": lambda s: ["validate", s.study(_set("dataset", image_size=[480]))],
    "study-bad-resize": lambda s: ["validate", s.study(_set("dataset", resize="letterbox"))],
    "study-bad-bit-depth": lambda s: ["validate", s.study(_set("dataset", bit_depth=9))],
    "study-square-input": lambda s: [
        "validate",
        s.study(
            _set("dataset", image_size=[96, 128]),
            space={"model": "fastflow", "backbone": "vit_base_patch16_224", "image_size": "native"},
        ),
    ],
    "study-seed-out-of-range": lambda s: [
        "run",
        s.study(),
        "--set",
        f"space.seed={2**63}",
    ],
    "study-seed-not-integer": lambda s: ["run", s.study(), "--set", "space.seed=1e23"],
    "study-fractional-gpus-above-one": lambda s: [
        "validate",
        s.study(resources={"cpu": 1, "gpu": 1.5}),
    ],
    "study-bad-storage": lambda s: [
        "validate",
        s.study(search={"algorithm": "optuna", "n_trials": 3, "storage": "mongo://db/x"}),
    ],
    "set-syntax": lambda s: ["validate", s.study(), "--set", "space.seed"],
    "set-unknown-key": lambda s: ["validate", s.study(), "--set", "spase.seed=1"],
    "set-duplicate-key": lambda s: ["run", s.study(), "--set", "smoke={a: 1, a: 2}"],
    "set-key-of-absent-model": lambda s: [
        "run",
        s.study(),
        "--set",
        "space.model=padim",
        "--set",
        "space.stfpm.lr=0.1",
    ],
    "set-not-a-mapping": lambda s: ["validate", s.study(), "--set", "name.x=1"],
    # --- the data set (found by the pre-flight of `sweep run`, before Ray starts)
    "dataset-missing-root": lambda s: [
        "run",
        s.study(dataset={"kind": "mvtec", "root": str(s.tmp / "none"), "category": "part"}),
    ],
    "dataset-missing-category": lambda s: ["run", s.mvtec_study(category="bottle")],
    "dataset-test-share-too-large": lambda s: ["run", s.study(_space(test_fraction=0.95))],
    "dataset-no-training-images": lambda s: ["run", s.mvtec_study(train=0)],
    "dataset-no-anomalies": lambda s: ["run", s.mvtec_study(anomalies=False)],
    "dataset-mask-size": lambda s: ["run", s.mvtec_study(mask_size=20)],
    "dataset-roi-missing": lambda s: ["run", s.study(_set("dataset", roi=str(s.tmp / "no.png")))],
    "dataset-roi-empty": lambda s: ["run", s.study(_set("dataset", roi=_roi(s.tmp, (24, 32), 0)))],
    "dataset-roi-aspect": lambda s: ["run", s.study(_set("dataset", roi=_roi(s.tmp, (40, 40))))],
    "dataset-roi-no-mask": lambda s: [
        "run",
        s.study(_set("dataset", roi=str(Path(_roi(s.tmp / "rois", (24, 32))).parent))),
    ],
    "dataset-folder-same-images": lambda s: [
        "run",
        s.study(
            dataset={"kind": "folder", "normal_dir": _images(s.tmp), "abnormal_dir": _images(s.tmp)}
        ),
    ],
    "dataset-bit-depth-exceeded": lambda s: [
        "run",
        s.study(
            dataset={
                "kind": "folder",
                "normal_dir": _images(s.tmp, value=4000),
                "abnormal_dir": _images(s.tmp / "nok", value=4001),
                "bit_depth": 10,
            }
        ),
    ],
    "dataset-unreadable-image": lambda s: [
        "run",
        _damaged(s),
    ],
    "dataset-unknown-part": lambda s: [
        "data",
        "synth-glue",
        str(s.tmp / "glue"),
        "--part",
        "part99",
    ],
    # --- pretrained weights (a folder named by the study or $ANOMALY_SWEEP_WEIGHTS_DIR)
    "weights-folder-missing": lambda s: [
        "run",
        s.study(_space(pretrained=True), weights_dir=str(s.tmp / "weights")),
    ],
    "weights-file-missing": lambda s: [
        "run",
        s.study(_space(pretrained=True), weights_dir=str(_mkdir(s.tmp / "weights"))),
    ],
    "weights-file-unreadable": lambda s: [
        "run",
        s.study(_space(pretrained=True), weights_dir=str(_junk_weights(s.tmp / "weights"))),
    ],
    "weights-folder-uri": lambda s: [
        "validate",
        s.study(_space(pretrained=True), weights_dir="s3://bucket/weights"),
    ],
    # --- where the results go
    "output-not-creatable": lambda s: [
        "run",
        s.study(),
        "--output",
        str(_write(s.tmp / "file", "x") / "out"),
    ],
    "output-unknown-scheme": lambda s: ["run", s.study(), "--output", "nosuch://bucket/out"],
    "output-unreachable": lambda s: [
        "run",
        s.study(),
        "--output",
        f"s3://results/glue?endpoint_override=127.0.0.1:{_closed_port()}&scheme=http",
    ],
    "output-journal-not-posix": lambda s: [
        "run",
        s.study(search={"algorithm": "optuna", "n_trials": 2}, space={"model": "padim"}),
        "--output",
        "s3://results/glue?region=eu-west-1",
    ],
    "output-in-use": lambda s: ["run", s.study(), "--output", _held(s.tmp / "busy")],
    "output-other-study": lambda s: ["run", s.study(), "--output", _holding(s, name="other")],
    "output-data-changed": lambda s: ["run", *_made_before(s)],
    "resume-no-study-copy": lambda s: ["resume", str(_mkdir(s.tmp / "not-an-output"))],
    # --- the Ray cluster
    "address-unreachable": lambda s: [
        "run",
        s.study(),
        "--address",
        f"127.0.0.1:{_closed_port()}",
    ],
    "address-malformed": lambda s: ["run", s.study(), "--address", "head-node:port"],
    "num-cpus-not-positive": lambda s: ["run", s.study(), "--num-cpus", "0"],
    "address-auto-no-cluster": lambda s: ["run", s.study(), "--address", _ray_record(s, None)],
    "address-auto-gone": lambda s: [
        "run",
        s.study(),
        "--address",
        _ray_record(s, f"127.0.0.1:{_closed_port()}"),
    ],
    "cluster-file-missing": lambda s: [
        "plan",
        s.study(),
        "--cluster",
        str(s.tmp / "cluster.yaml"),
    ],
    # --- results given to report
    "results-missing": lambda s: ["report", str(s.tmp / "nothing")],
    "results-empty": lambda s: ["report", str(_mkdir(s.tmp / "empty"))],
    # --- export and predict
    "export-no-results": lambda s: _export(s.tmp / "nothing", "knee", s.tmp / "artefact"),
    "export-target-exists": lambda s: _export(s.tmp, "knee", _mkdir(s.tmp / "artefact")),
    "export-unknown-pick": lambda s: _export(_rows(s), "nosuchpick", s.tmp / "artefact"),
    "export-bad-seed": lambda s: [*_export(_rows(s), "knee", s.tmp / "artefact"), "--seed", "7"],
    "export-roi-folder": lambda s: _export(
        _with_roi(_rows(s), folder=True), "knee", s.tmp / "artefact"
    ),
    "export-roi-changed": lambda s: _export(
        _with_roi(_rows(s), recorded="0" * 64), "knee", s.tmp / "artefact"
    ),
    "export-not-exportable": lambda s: _export(
        _rows(s, configs=[("dfm", {}, 0.9, 0.9, 5.0, 1.0)]), "0" * 15 + "1", s.tmp / "artefact"
    ),
    "predict-no-artefact": lambda s: _predict(_mkdir(s.tmp / "artefact"), s.tmp),
    "predict-damaged-artefact": lambda s: _predict(_artefact(s, damaged=True), s.tmp),
    "predict-missing-input": lambda s: _predict(_artefact(s), s.tmp / "nope.png"),
    "predict-no-images": lambda s: _predict(_artefact(s), _mkdir(s.tmp / "images")),
    "predict-bad-backend": lambda s: [
        *_predict(_artefact(s), _write(s.tmp / "a.png", "x")),
        "--backend",
        "tensorrt",
    ],
}


def _export(results: Path, pick: str, to: Path) -> list[str]:
    return ["export", str(results), "--pick", pick, "--to", str(to)]


def _rows(s: Setup, **options) -> Path:
    """A study output of hand-made rows (tests/report_rows.py), beside the setup's output."""
    from tests.report_rows import write_study_output

    return write_study_output(s.tmp / "results", **options)


def _with_roi(results: Path, folder: bool = False, recorded: str | None = None) -> Path:
    """``results`` with a ROI in its saved study: one mask file, or (``folder``) a folder of
    per-image masks; ``recorded``: the rows' ``roi_sha256`` (the ROI the trials ran with)."""
    import cv2
    import numpy as np
    import pyarrow.parquet as pq

    mask = results.parent / "roi.png"
    if folder:
        mask = _mkdir(results.parent / "rois")
        cv2.imwrite(str(mask / "000.png"), np.full((24, 32), 255, np.uint8))
    else:
        cv2.imwrite(str(mask), np.full((24, 32), 255, np.uint8))
    copy = results / "_study.yaml"
    raw = yaml.safe_load(copy.read_text())
    raw["dataset"]["roi"] = str(mask)
    copy.write_text(yaml.safe_dump(raw, sort_keys=False))
    if recorded is not None:
        for file in results.glob("*.parquet"):
            table = pq.read_table(file)
            column = table.schema.get_field_index("roi_sha256")
            values = [recorded] * len(table)
            table = table.set_column(column, table.schema.field(column), [values])
            pq.write_table(table, file)
    return results


def _predict(artefact: Path, images: Path) -> list[str]:
    return ["predict", str(artefact), str(images), "--out", str(artefact.parent / "predicted")]


def _artefact(s: Setup, damaged: bool = False) -> Path:
    """An artefact folder that passes the format checks (no model files: none of these cases
    gets to scoring), or whose model.pt does not match its recorded sha256."""
    from sweep.deploy.artefact import FORMAT, FORMAT_VERSION

    folder = _mkdir(s.tmp / "artefact")
    files = {}
    if damaged:
        (folder / "model.pt").write_bytes(b"edited")
        files["model.pt"] = "0" * 64
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": "padim",
        "preprocessing": {"image_size": [64, 64], "resize": "stretch"},
        "files": files,
    }
    (folder / "artefact.json").write_text(json.dumps(meta))
    return folder


_HELD: list[Any] = []


def _held(output: Path) -> str:
    """An output that another run holds: its lock taken (as `sweep run` takes it) and kept."""
    from sweep.results import ResultStore

    lock = ResultStore(output).lock()
    lock.__enter__()
    _HELD.append(lock)  # held until the test session ends
    return str(output)


def _holding(s: Setup, **changes) -> str:
    """An output (beside the setup's) holding the tiny study with ``changes``."""
    from sweep.results import ResultStore
    from sweep.run.runner import STUDY_COPY
    from sweep.run.study import load_study, study_to_yaml

    raw = tiny_study(s.glue, s.output, **changes)
    store = ResultStore(s.tmp / "held")
    store.ensure()
    source = _write(s.tmp / "held.yaml", yaml.safe_dump(raw))
    store.write_file(STUDY_COPY, study_to_yaml(load_study(source)).encode())
    return store.uri


def _made_before(s: Setup) -> list[str]:
    """The MVTec study and ``--output`` an output of it (beside the setup's) with a row, made
    before a training image was added to the data set."""
    from sweep.results import BASE_SCHEMA, ResultStore
    from sweep.run.runner import DATA_RECORD
    from sweep.run.study import data_record, load_study

    path = s.mvtec_study()
    study = load_study(path)
    store = ResultStore(s.tmp / "made")
    store.ensure()
    store.write_file(DATA_RECORD, json.dumps(data_record(study.dataset)).encode())
    store.write_row({"config_hash": "0" * 16, "status": "ok"}, BASE_SCHEMA)
    train = s.tmp / "mvtec" / "part" / "train" / "good"
    (train / "009.png").write_bytes((train / "000.png").read_bytes())
    return [path, "--output", store.uri]


def _roi(folder: Path, size: tuple[int, int], value: int = 255) -> str:
    """A ROI mask file ``folder/roi.png`` of ``size`` (H x W), every pixel ``value``."""
    import cv2
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / "roi.png"), np.full(size, value, np.uint8))
    return str(folder / "roi.png")


def _images(folder: Path, n: int = 6, value: int | None = None) -> str:
    """A folder of ``n`` small distinct gray images (made once; the path again after): 8-bit,
    or 16-bit ones whose brightest pixel is ``value``."""
    import cv2
    import numpy as np

    images = folder / "images"
    if not images.is_dir():
        images.mkdir(parents=True)
        for i in range(n):
            image = np.full((24, 32), 40 * i, np.uint8 if value is None else np.uint16)
            if value is not None:
                image[0, 0] = value
            cv2.imwrite(str(images / f"{i:03d}.png"), image)
    return str(images)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _junk_weights(folder: Path) -> Path:
    folder.mkdir()
    (folder / "resnet18.safetensors").write_bytes(b"not a safetensors file")
    return folder


def _damaged(s: Setup) -> str:
    study = s.mvtec_study()
    (s.tmp / "mvtec" / "part" / "train" / "good" / "001.png").write_bytes(b"not a png")
    return study


def test_catalogue_and_cases_match():
    entries = catalogue()
    assert len(entries) >= 40
    assert sorted(set(entries) - set(CASES)) == [], "catalogue entries without a test"
    assert sorted(set(CASES) - set(entries)) == [], "tests the catalogue does not list"


@pytest.mark.parametrize("entry", sorted(CASES))
def test_bad_input_exits_2_with_the_catalogued_message(entry, tmp_path, glue_root):
    setup = Setup(tmp_path, glue_root)
    argv = CASES[entry](setup)
    result = CliRunner().invoke(app, argv, env=setup.env)
    message = " ".join(result.output.split())
    assert result.exit_code == 2, (entry, result.output, result.exception)
    assert catalogue()[entry] in message, (entry, message)
    assert "Traceback" not in result.output
    assert not setup.output.exists(), f"{entry}: wrote {setup.output}"
