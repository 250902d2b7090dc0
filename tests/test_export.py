"""sweep export / sweep predict (issue 16 items 1-3): export parity of each detector family,
the artefact's format and checks, the pick, predict's outputs and exit statuses, and (slow)
the whole path from a study run to predict's scores."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import models
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, resize_image
from models.errors import ModelError
from models.tiny import tiny_hparams
from sweep.cli import app
from sweep.deploy.artefact import (
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    ONNX_FILE,
    TORCHSCRIPT_FILE,
    WEIGHTS_FILE,
    Normalisation,
    load_artefact,
    sha256_file,
)
from sweep.deploy.export import PARITY_RTOL, parity, pick_row, write_model_files
from sweep.errors import SweepError
from sweep.results import read_results
from sweep.run.runner import read_study_copy
from tests.report_rows import write_study_output

SIZE = 64
SHAPE = (48, 64)
"""(height, width) of the predict tests' artefact: not square, as the line cameras' frames."""


def _images(n: int, seed: int, shape: tuple[int, int] = (SIZE, SIZE)) -> torch.Tensor:
    """Smooth random images (normalised): a part-like texture, not white noise."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=generator)
    pixels = torch.nn.functional.interpolate(coarse, size=shape, mode="bilinear")
    return normalize((pixels * 255).round().to(torch.uint8))


def _fitted(name: str, shape: tuple[int, int] = (SIZE, SIZE)) -> models.Detector:
    detector = models.create(name, **tiny_hparams(name))
    detector.fit([_images(6, seed=1, shape=shape)], epochs=1)
    return detector.eval()


@pytest.fixture(scope="module")
def padim_artefact(tmp_path_factory) -> tuple[Path, models.Detector]:
    """A PaDiM artefact of 48 x 64 images written as export writes its model files, with a
    hand-made artefact.json: predict's tests need no study."""
    folder = tmp_path_factory.mktemp("artefact")
    detector = _fitted("padim", SHAPE)
    write_model_files(detector, _images(2, seed=2, shape=SHAPE), folder)
    with torch.no_grad():
        prediction = detector.predict(_images(4, seed=3, shape=SHAPE))
    scores, maps = prediction.score.numpy(), prediction.anomaly_map.numpy()
    image_threshold = float(np.median(scores))
    pixel_threshold = float(np.quantile(maps, 0.9))
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": "padim",
        "backbone": "resnet18",
        "create_args": tiny_hparams("padim"),
        "preprocessing": {
            "image_size": list(SHAPE),
            "resize": "stretch",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "roi": None,
        },
        "threshold": {"policy": "f1_max", "image": image_threshold, "pixel": pixel_threshold},
        "normalisation": {
            "image": {"threshold": image_threshold, "min": float(scores.min()), "max": 99.0},
            "pixel": {"threshold": pixel_threshold, "min": float(maps.min()), "max": 99.0},
        },
        "files": {
            name: sha256_file(folder / name) for name in (TORCHSCRIPT_FILE, ONNX_FILE, WEIGHTS_FILE)
        },
    }
    (folder / META_FILE).write_text(json.dumps(meta))
    return folder, detector


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", ["patchcore", "padim", "stfpm"])
def test_torchscript_and_onnx_match_predict(name, tmp_path):
    """One per family (memory bank, distribution, student-teacher): the traced module and the
    ONNX graph, run at another batch size than they were traced at, give predict's scores and
    maps within PARITY_RTOL of their magnitude; the rebuilt detector gives them exactly."""
    import onnxruntime

    detector = _fitted(name)
    results, notes = write_model_files(detector, _images(2, seed=2), tmp_path)
    assert notes == [] and set(results) == {"torchscript", "onnx"}
    images = _images(3, seed=4)
    with torch.no_grad():
        expected = detector.predict(images)
    reference = (expected.score.numpy(), expected.anomaly_map.numpy())
    traced = torch.jit.load(str(tmp_path / TORCHSCRIPT_FILE))
    with torch.no_grad():
        scores, maps = traced(images)
    session = onnxruntime.InferenceSession(str(tmp_path / ONNX_FILE))
    onnx_scores, onnx_maps = session.run(None, {"images": images.numpy()})
    assert onnx_maps.shape == (3, SIZE, SIZE)
    for got in ((scores.numpy(), maps.numpy()), (onnx_scores, onnx_maps)):
        assert parity(reference, got)["max_rel_diff"] <= PARITY_RTOL
    # The scores still tell the images apart at that precision (not all ~equal).
    assert np.ptp(reference[0]) > 100 * PARITY_RTOL * np.abs(reference[0]).max()

    from sweep.deploy.artefact import rebuild_detector

    meta = {"model": name, "create_args": tiny_hparams(name)}
    rebuilt = rebuild_detector(meta, tmp_path / WEIGHTS_FILE)
    with torch.no_grad():
        again = rebuilt.predict(images)
    assert torch.equal(again.score, expected.score)
    assert torch.equal(again.anomaly_map, expected.anomaly_map)


def test_patchcore_export_reweights_like_predict_with_duplicate_bank_patches():
    """The re-weighting neighbourhood is taken without faiss: with every training image twice
    (each bank patch has a copy at distance 0) the scores still equal predict's."""
    twice = torch.cat([_images(3, seed=1)] * 2)
    detector = models.create("patchcore", **tiny_hparams("patchcore"), coreset_ratio=1.0)
    detector.fit([twice])
    detector.eval()
    images = torch.cat([_images(2, seed=5), twice[:1]])  # one image the bank holds
    with torch.no_grad():
        expected = detector.predict(images)
        scores, maps = detector.export_module()(images)
    assert torch.allclose(scores, expected.score, rtol=1e-5, atol=1e-5)
    assert torch.allclose(maps, expected.anomaly_map, rtol=1e-5, atol=1e-4)


def test_detectors_without_an_export_say_which_can():
    detector = models.create("dfm", **tiny_hparams("dfm"))
    with pytest.raises(ModelError, match=r"dfm cannot be exported yet \(exportable: .*padim"):
        detector.export_module()


def test_normalisation_puts_the_threshold_at_one_half():
    """anomalib's min-max normalisation, by hand: (x - t) / (max - min) + 0.5, clipped."""
    norm = Normalisation(threshold=5.0, min=0.0, max=10.0)
    values = norm.apply(np.array([5.0, 7.5, 0.0, 15.0, -3.0]))
    assert values.tolist() == [0.5, 0.75, 0.0, 1.0, 0.0]
    assert Normalisation.from_dict({"threshold": None, "min": 0, "max": 1}) is None


# --------------------------------------------------------------------------- the pick


@pytest.fixture(scope="module")
def report_output(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("picks")
    return write_study_output(root / "out", augmentations=("none", "defocus"))


def test_knee_pick_is_the_reports_chosen_configuration_at_its_lowest_seed(report_output):
    # test_report checks by hand that the report's chosen (Kneedle) pick of these rows is
    # PatchCore at coreset ratio 0.1; selection runs on the clean rows only.
    rows, study = read_results(report_output), read_study_copy(str(report_output))
    pick = pick_row(rows, study, "knee")
    assert pick.method == "kneedle" and pick.seeds == [0, 1, 2]
    row = pick.row
    assert (row["model"], row["hp.coreset_ratio"]) == ("patchcore", 0.1)
    assert (row["augmentation"], row["seed"]) == ("none", 0)
    other = pick_row(rows, study, "knee", seed=2).row
    assert other["seed"] == 2 and other["hp.coreset_ratio"] == 0.1
    # A config hash names one row (the seed is part of it), in full or by a unique prefix.
    by_hash = pick_row(rows, study, other["config_hash"])
    assert by_hash.method is None and by_hash.row["config_hash"] == other["config_hash"]
    with pytest.raises(SweepError, match="the prefix matches 36 config hashes"):
        pick_row(rows, study, other["config_hash"][:8])
    with pytest.raises(SweepError, match=r"--seed 7: the pick ran with seeds \[0, 1, 2\]"):
        pick_row(rows, study, "knee", seed=7)
    with pytest.raises(SweepError, match="no ok row has that config hash"):
        pick_row(rows, study, "nosuchhash")


# --------------------------------------------------------------------------- predict


def _write_pngs(folder: Path, n: int) -> list[Path]:
    """``n`` 80 x 100 (W x H) colour PNGs: not square, not the model's size."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        image = cv2.resize(rng.integers(0, 256, (10, 8, 3), np.uint8), (80, 100))
        path = folder / f"{i:03d}.png"
        cv2.imwrite(str(path), image)
        paths.append(path)
    return paths


def test_predict_scores_like_the_detector_and_skips_a_bad_image(padim_artefact, tmp_path):
    folder, detector = padim_artefact
    paths = _write_pngs(tmp_path / "images" / "good", 3)
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    result = CliRunner().invoke(
        app, ["predict", str(folder), str(tmp_path / "images"), "--out", str(tmp_path / "p")]
    )
    assert result.exit_code == 1, result.output
    assert "skipped" in result.output and "broken.png" in result.output
    table = pd.read_parquet(tmp_path / "p" / "scores.parquet")
    assert list(table.columns) == [
        "path", "score", "normalised_score", "anomalous", "mask", "overlay", "error",
    ]  # fmt: skip
    assert len(table) == 4 and table["error"].notna().sum() == 1
    scored = table[table["error"].isna()].set_index("path")
    # The reference: each file read the way the study's loader reads it, then predict.
    rgb = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]
    pixels = np.stack([resize_image(image, SHAPE).transpose(2, 0, 1) for image in rgb])
    with torch.no_grad():
        expected = detector.predict(normalize(torch.from_numpy(pixels)))
    got = scored.loc[[str(p) for p in paths], "score"].to_numpy()
    assert np.allclose(got, expected.score.numpy(), rtol=PARITY_RTOL, atol=0)
    meta = json.loads((folder / META_FILE).read_text())
    threshold = meta["threshold"]["image"]
    assert (scored["anomalous"] == (scored["score"] >= threshold)).all()
    assert ((scored["normalised_score"] >= 0.5) == scored["anomalous"]).all()
    mask = cv2.imread(str(tmp_path / "p" / scored["mask"].iloc[0]), cv2.IMREAD_UNCHANGED)
    overlay = cv2.imread(str(tmp_path / "p" / scored["overlay"].iloc[0]))
    assert mask.shape == (100, 80) and set(np.unique(mask)) <= {0, 255}
    assert overlay.shape == (100, 80, 3)
    assert scored["mask"].iloc[0] == "masks/good__000.png"
    csv = pd.read_csv(tmp_path / "p" / "scores.csv")
    assert np.allclose(csv["score"].dropna(), table["score"].dropna())


def test_predict_backends_agree_and_all_good_exits_0(padim_artefact, tmp_path):
    folder, _ = padim_artefact
    paths = _write_pngs(tmp_path / "images", 2)
    scores = {}
    for backend in ("onnx", "torchscript", "torch"):
        out = tmp_path / backend
        argv = ["predict", str(folder), *map(str, paths), "--out", str(out), "--backend", backend]
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0, result.output
        scores[backend] = pd.read_parquet(out / "scores.parquet")["score"].to_numpy()
    assert np.array_equal(scores["torchscript"], scores["torch"])
    assert np.allclose(scores["onnx"], scores["torch"], rtol=PARITY_RTOL, atol=0)


def test_a_damaged_artefact_is_refused(padim_artefact, tmp_path):
    folder, _ = padim_artefact
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in folder.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    load_artefact(copy)  # intact
    with open(copy / WEIGHTS_FILE, "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\0\0\0\1")
    with pytest.raises(SweepError, match=r"detector\.safetensors: sha256 differs"):
        load_artefact(copy)


# --------------------------------------------------------------------------- pad, crop, ROI

SOURCE = (100, 80)
"""(height, width) of the frames of the mapping tests: portrait, for a landscape model."""
SQUARE = (55, 75, 50, 70)
"""(y0, y1, x0, x1) of the synthetic defect: off-centre, so that a map drawn on the prepared
image and stretched back would land elsewhere (pad: ~8 px to the left; crop: ~10 px lower)."""

FLAT_PADIM = {**tiny_hparams("padim"), "layers": ["layer1"], "n_features": 32, "blur_sigma": 1.0}
"""A PaDiM that localizes to a few pixels: one shallow layer, little blur."""


def _frame(value: int = 120, square: tuple[int, int, int, int] | None = None, seed: int = 0):
    """A flat gray ``SOURCE`` frame with a little noise (RGB), and a bright square on it."""
    rng = np.random.default_rng(seed)
    frame = np.clip(value + rng.normal(0, 2, SOURCE), 0, 255).astype(np.uint8)
    if square is not None:
        y0, y1, x0, x1 = square
        frame[y0:y1, x0:x1] = 250
    return np.repeat(frame[:, :, None], 3, axis=2)


def _flat_artefact(
    folder: Path,
    resize: str,
    roi: np.ndarray | None = None,
    square=SQUARE,
    bit_depth: int | None = None,
) -> Path:
    """A PaDiM artefact of ``SHAPE`` fitted on flat frames prepared with ``resize`` (and
    ``roi``), as a study with them would fit it; its pixel threshold half the map's peak on a
    frame with ``square``. Only the detector's tensors (``--backend torch``): the model files
    are tested above."""
    from safetensors.torch import save_model

    from data.transforms import prepare

    folder.mkdir()
    roi_file = None
    if roi is not None:
        roi_file = folder / "roi.png"
        cv2.imwrite(str(roi_file), np.where(roi, 255, 0).astype(np.uint8))
    mask = None if roi is None else cv2.resize(roi.astype(np.uint8), SOURCE[::-1]) > 0

    def batch(frames):
        pixels = [prepare(f, SHAPE, resize, mask)[0].transpose(2, 0, 1) for f in frames]
        return normalize(torch.from_numpy(np.stack(pixels)))

    detector = models.create("padim", **FLAT_PADIM)
    detector.fit([batch([_frame(seed=i) for i in range(8)])], epochs=1)
    detector.eval()
    save_model(detector, str(folder / WEIGHTS_FILE))
    with torch.no_grad():
        maps = detector.predict(batch([_frame(seed=99), _frame(square=square)])).anomaly_map
    # Half the square's peak: well above anything on a flat frame.
    pixel_threshold = float(maps[1].max()) / 2
    assert pixel_threshold > 10 * float(maps[0].max())
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": "padim",
        "create_args": FLAT_PADIM,
        "preprocessing": {
            "image_size": list(SHAPE),
            "resize": resize,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "bit_depth": bit_depth,
            "roi": None
            if roi_file is None
            else {"file": "roi.png", "sha256": sha256_file(roi_file)},
        },
        "threshold": {"policy": "f1_max", "image": 0.0, "pixel": pixel_threshold},
        "normalisation": {"image": None, "pixel": None},
        "files": {WEIGHTS_FILE: sha256_file(folder / WEIGHTS_FILE)},
    }
    (folder / META_FILE).write_text(json.dumps(meta))
    return folder


def _predict_frames(artefact: Path, frames: dict[str, np.ndarray], tmp_path: Path) -> pd.DataFrame:
    images = tmp_path / "frames"
    images.mkdir(parents=True)
    for name, frame in frames.items():
        cv2.imwrite(str(images / f"{name}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    out = tmp_path / "predicted"
    argv = ["predict", str(artefact), str(images), "--out", str(out), "--backend", "torch"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code in (0, 1), result.output
    table = pd.read_parquet(out / "scores.parquet")
    table["name"] = [Path(p).stem for p in table["path"]]
    return table.set_index("name").assign(out=str(out))


def _mask(table: pd.DataFrame, name: str) -> np.ndarray:
    return cv2.imread(
        str(Path(table["out"].iloc[0]) / table.loc[name, "mask"]), cv2.IMREAD_UNCHANGED
    )


@pytest.mark.parametrize("resize", ["pad", "crop"])
def test_pad_and_crop_masks_and_overlays_lie_on_the_source_frame(resize, tmp_path):
    """A bright square on a flat portrait frame, scored by a landscape model: the mask has the
    frame's size and its pixels lie on the square, where the camera saw it (pad: the letterbox
    border dropped; crop: the rows cut away empty)."""
    artefact = _flat_artefact(tmp_path / "artefact", resize)
    table = _predict_frames(artefact, {"square": _frame(square=SQUARE)}, tmp_path)
    mask = _mask(table, "square")
    overlay = cv2.imread(str(Path(table["out"].iloc[0]) / table.loc["square", "overlay"]))
    assert mask.shape == SOURCE and overlay.shape == (*SOURCE, 3)
    ys, xs = np.nonzero(mask)
    assert len(ys) > 0
    y0, y1, x0, x1 = SQUARE
    margin = 12  # the features' reach (a few model pixels of ~2 source pixels) and the blur
    assert ys.min() >= y0 - margin and ys.max() < y1 + margin
    assert xs.min() >= x0 - margin and xs.max() < x1 + margin
    # The mask's centre is the square's (measured: within 2.3 px; a map stretched back from
    # the prepared image would be ~8 px left with pad, ~10 px lower with crop).
    assert abs(ys.mean() - (y0 + y1 - 1) / 2) < 4 and abs(xs.mean() - (x0 + x1 - 1) / 2) < 4
    if resize == "crop":
        # 100 rows cropped to 60 (48:64 of 80 wide): rows 0-19 and 80-99 never reached the model.
        assert not mask[:20].any() and not mask[80:].any()


def test_predict_applies_the_artefacts_roi_as_the_trial_did(tmp_path):
    """With the left half as the ROI (a half-size mask, resized to each frame), a square outside
    it changes nothing (the model never sees it: the same score, an empty mask), one inside it
    is found; a frame of another aspect ratio than the mask is skipped with the reason."""
    roi = np.zeros((SOURCE[0] // 2, SOURCE[1] // 2), bool)
    roi[:, : SOURCE[1] // 4] = True  # columns 0-39 of the frame
    inside = (30, 50, 10, 30)
    artefact = _flat_artefact(tmp_path / "artefact", "stretch", roi, inside)
    assert load_artefact(artefact).roi is not None
    frames = {
        "flat": _frame(),
        "outside": _frame(square=SQUARE),
        "inside": _frame(square=inside),
        "square": np.full((80, 80, 3), 120, np.uint8),
    }
    table = _predict_frames(artefact, frames, tmp_path)
    assert table.loc["square", "error"] is not None
    assert "the aspect ratios differ" in table.loc["square", "error"]
    assert table.loc["outside", "score"] == table.loc["flat", "score"]
    assert table.loc["inside", "score"] > table.loc["flat", "score"]
    assert not _mask(table, "outside").any()
    found = _mask(table, "inside")
    assert found.any() and not found[:, 40:].any(), "outside the ROI the map is at its minimum"
    # roi.png is checked like the model files.
    (artefact / "roi.png").write_bytes(b"edited")
    with pytest.raises(SweepError, match=r"roi\.png: sha256 differs"):
        load_artefact(artefact)


def test_predict_reads_16_bit_frames_at_the_studys_bit_depth(tmp_path):
    """A study of 12-bit data in 16-bit files records its depth in the artefact: predict reads
    such frames as training read them (the 8-bit frame's score), not nearly black."""
    eight_bit = _frame(square=SQUARE)
    twelve_bit = eight_bit.astype(np.uint16) * 16  # the same picture, 12 bits in 16-bit files
    scores = {}
    for depth in (12, None):
        artefact = _flat_artefact(tmp_path / f"artefact-{depth}", "stretch", bit_depth=depth)
        assert load_artefact(artefact).bit_depth == depth
        frames = {"eight": eight_bit, "twelve": twelve_bit, "dark": eight_bit // 16}
        scores[depth] = _predict_frames(artefact, frames, tmp_path / f"run-{depth}")["score"]
    assert scores[12]["twelve"] == pytest.approx(scores[12]["eight"], rel=1e-5)
    # Read as 16-bit data, the frame is what the old reader made of it: 16 times darker.
    assert scores[None]["twelve"] == pytest.approx(scores[None]["dark"], rel=1e-5)
    assert scores[12]["dark"] != pytest.approx(scores[12]["eight"], rel=1e-3)


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.ray
def test_study_export_predict_end_to_end(ray_session, glue_root, tmp_path):
    """A tiny study of the three families; export --pick knee and each model by hash; predict
    on the data set's test folder gives the row's image AUROC within the tolerance."""
    from sweep.deploy.export import METRIC_TOLERANCE
    from sweep.run import metrics
    from sweep.run.runner import run_study
    from sweep.run.study import study_from_dict
    from tests.conftest import tiny_study

    raw = tiny_study(glue_root, tmp_path / "out")
    raw["space"]["model"] = {"grid": ["patchcore", "padim", "stfpm"]}
    raw["space"]["epochs"] = 2
    raw["space"]["stfpm.layers"] = ["layer1", "layer2"]
    summary = run_study(study_from_dict(raw))
    assert summary.ok == 3
    rows = read_results(tmp_path / "out")
    test_folder = glue_root / "part1" / "test"
    runner = CliRunner()
    for pick in ["knee", *rows.loc[rows.model == "stfpm", "config_hash"]]:
        artefact = tmp_path / f"artefact-{pick}"
        result = runner.invoke(
            app,
            ["export", str(tmp_path / "out"), "--pick", pick, "--to", str(artefact), "--strict"],
        )
        assert result.exit_code == 0, result.output
        assert sorted(p.name for p in artefact.iterdir()) == [
            META_FILE, WEIGHTS_FILE, ONNX_FILE, TORCHSCRIPT_FILE,
        ]  # fmt: skip
        assert not list(tmp_path.glob(".artefact-*"))  # no temporary folder left behind
        meta = json.loads((artefact / META_FILE).read_text())
        row = rows.set_index("config_hash").loc[meta["config_hash"]]
        assert meta["metrics"]["reproduced"]
        assert meta["trial_config"] == json.loads(row.trial_config)
        out = tmp_path / f"predicted-{pick}"
        result = runner.invoke(app, ["predict", str(artefact), str(test_folder), "--out", str(out)])
        assert result.exit_code == 0, result.output
        table = pd.read_parquet(out / "scores.parquet")
        assert len(table) == row.n_test
        labels = [0 if "/good/" in path else 1 for path in table["path"]]
        auroc = metrics.auroc(labels, table["score"])
        assert abs(auroc - row.image_auroc) <= METRIC_TOLERANCE[meta["learning_type"]]
    knee = runner.invoke(
        app,
        [
            "export",
            str(tmp_path / "out"),
            "--pick",
            "knee",
            "--to",
            str(tmp_path / "artefact-knee"),
        ],
    )
    assert knee.exit_code == 2 and "already exists" in knee.output


@pytest.mark.slow
def test_keep_models_front_keeps_the_front_and_export_uses_the_kept_model(
    ray_session, glue_root, tmp_path
):
    from sweep.results import ResultStore
    from sweep.run.runner import front_config_hashes, run_study
    from sweep.run.study import study_from_dict
    from tests.conftest import tiny_study

    raw = tiny_study(glue_root, tmp_path / "out")
    raw["space"]["model"] = {"grid": ["patchcore", "padim"]}
    raw["space"]["seed"] = {"grid": [0, 1]}
    raw["evaluation"]["keep_models"] = "front"
    study = study_from_dict(raw)
    assert run_study(study).ok == 4
    rows = read_results(tmp_path / "out")
    front = front_config_hashes(study, rows)
    kept = ResultStore(tmp_path / "out").kept_models()
    assert kept == sorted(front) and 0 < len(kept) <= 4
    artefact = tmp_path / "artefact"
    result = CliRunner().invoke(
        app, ["export", str(tmp_path / "out"), "--pick", "knee", "--to", str(artefact), "--strict"]
    )
    assert result.exit_code == 0, result.output
    meta = json.loads((artefact / META_FILE).read_text())
    assert meta["config_hash"] in kept
    assert meta["refit"]["fitted"] == "kept by the trial"
    assert meta["metrics"]["reproduced"], meta["metrics"]


@pytest.mark.slow
@pytest.mark.ray
def test_a_roi_study_exports_and_predict_gives_the_trials_scores(ray_session, glue_root, tmp_path):
    """A tiny PaDiM study with one ROI mask (the glue bead, 48 x 64): the artefact carries the
    mask, and predict on the test folder gives each image the score the trial gave it
    (``_images/<hash>.parquet``), hence the row's image AUROC with the row's labels (under a
    ROI an anomaly wholly outside it is normal); its masks are empty outside the ROI."""
    from data.roi import RegionOfInterest
    from sweep.results import read_images
    from sweep.run import metrics
    from sweep.run.runner import run_study
    from sweep.run.study import study_from_dict
    from tests.conftest import tiny_study

    bead = Path(__file__).resolve().parents[1] / "studies" / "roi" / "glue_part1_bead.png"
    raw = tiny_study(glue_root, tmp_path / "out")
    raw["dataset"].update(image_size=[48, 64], roi=str(bead))
    raw["space"]["model"] = "padim"
    assert run_study(study_from_dict(raw)).ok == 1
    row = read_results(tmp_path / "out").iloc[0]
    artefact = tmp_path / "artefact"
    argv = ["export", str(tmp_path / "out"), "--pick", "knee", "--to", str(artefact), "--strict"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    meta = json.loads((artefact / META_FILE).read_text())
    roi = meta["preprocessing"]["roi"]
    assert roi["file"] == "roi.png" and roi["source_sha256"] == row.roi_sha256
    carried = RegionOfInterest(artefact / "roi.png")
    assert np.array_equal(
        carried.mask_for("x", 240, 320), RegionOfInterest(bead).mask_for("x", 240, 320)
    )

    trial = read_images(tmp_path / "out", [row.config_hash])
    trial = trial[trial["split"] == "test"].set_index("path")
    scores = {}
    for backend in ("torchscript", "onnx"):
        out = tmp_path / f"predicted-{backend}"
        argv = ["predict", str(artefact), str(glue_root / "part1" / "test"), "--out", str(out)]
        result = CliRunner().invoke(app, [*argv, "--backend", backend])
        assert result.exit_code == 0, result.output
        table = pd.read_parquet(out / "scores.parquet").set_index("path")
        assert sorted(table.index) == sorted(trial.index)
        scores[backend] = table.loc[trial.index, "score"].to_numpy()
    expected = trial["score"].to_numpy()
    diff = {b: float(np.max(np.abs(s - expected))) for b, s in scores.items()}
    # Measured: TorchScript 0 (the same arithmetic); ONNX Runtime 1.7e-5 on scores up to 8.8.
    assert diff["torchscript"] <= 1e-5 * np.abs(expected).max(), diff
    assert diff["onnx"] <= PARITY_RTOL * np.abs(expected).max(), diff
    auroc = metrics.auroc(trial["label"].to_numpy(), scores["onnx"])
    assert abs(auroc - row.image_auroc) <= 1e-6

    inside = RegionOfInterest(bead)
    for mask_file in (tmp_path / "predicted-onnx" / "masks").glob("*.png"):
        mask = cv2.imread(str(mask_file), cv2.IMREAD_UNCHANGED)
        assert not mask[~inside.mask_for(mask_file, *mask.shape)].any(), mask_file.name
