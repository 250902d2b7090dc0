"""Benchmark: a PatchCore coreset-ratio study with the feature cache off and on.

Runs the same study twice per repeat through ``sweep.run.runner.run_study`` in one Ray session: one
PatchCore trial per coreset ratio (default ladder 0.001 ... 1.0, 10 ratios), once with
``cache.features: false`` and once with a fresh, empty cache folder (``cache.features: true``),
each into a fresh output folder. With the cache on, the trials share the backbone features of
the training, validation and test batches and one resumable greedy coreset run; latency and
throughput are timed outside the cache in both. Prints the sweep times (medians over repeats),
the speed-up, where a trial's time goes, the cache's hits and misses, and checks that both
runs give identical results per ratio.

It also measures what the cache itself costs on one batch (``--batch-size`` images at
``--size`` px, ``--threads`` threads): the batch's cache key (a sha256 of the batch and the
extractor), the write of its features as an entry (``TensorCache.put``: encoding, CRC-32,
atomic file) and their read back (``TensorCache.get``, CRC checked), against the forward they
replace. ``--cost-only`` measures only that (seconds, not minutes).

    python bench/coreset_cache.py [--size 224] [--train 200] [--backbone resnet18]
        [--ratios 0.001 0.002 ...] [--repeats 1] [--cpus 2] [--json OUT] [--cost-only]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
import torch
from rich.console import Console

from models.backbones import FeatureExtractor
from models.cache import TensorCache
from sweep.run.runner import connect_ray, run_study
from sweep.run.study import study_from_dict

LADDER = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
RESULT_COLUMNS = ["image_auroc", "pixel_auroc", "image_f1", "memory_bank_size"]


def make_study(args, output: Path, cache_dir: Path | None) -> object:
    return study_from_dict(
        {
            "name": "coreset-cache-bench",
            "dataset": {
                "kind": "synthetic_glue",
                "root": str(Path(args.data_root).expanduser()),
                "category": "part1",
                "image_size": args.size,
                "synthetic": {
                    "n_train": args.train,
                    "n_val_good": args.val_good,
                    "n_val_defect": args.val_defect,
                    "n_test_good": args.test_good,
                    "n_test_defect": args.test_defect,
                },
            },
            "space": {
                "model": "patchcore",
                "backbone": args.backbone,
                "pretrained": False,
                "seed": 0,
                "coreset_ratio": {"grid": args.ratios},
            },
            "resources": {"cpu": args.threads},
            "max_concurrent": args.concurrent,
            "evaluation": {
                "train_batch_size": args.batch_size,
                "batch_size": args.batch_size,
                "latency_warmup": args.latency_warmup,
                "latency_repeats": args.latency_repeats,
            },
            "cache": {
                "features": cache_dir is not None,
                "dir": None if cache_dir is None else str(cache_dir),
                "max_gb": args.max_gb,
            },
            "output": str(output),
        }
    )


def run_once(args, root: Path, label: str, cached: bool, console: Console) -> dict:
    output = root / f"{label}-out"
    study = make_study(args, output, root / f"{label}-cache" if cached else None)
    summary = run_study(study, console=console)
    assert summary.ok == len(args.ratios) and not summary.errors, summary
    rows = pd.read_parquet(output).sort_values("hp.coreset_ratio").reset_index(drop=True)
    return {"sweep_s": summary.sweep_s, "rows": rows}


def time_split(rows: pd.DataFrame) -> pd.DataFrame:
    """Per trial: seconds of fit, of waiting for the node's timing lock, of latency +
    throughput timing, and the rest (scoring val and test, metrics, data, set-up)."""
    wall = (rows["finished_at"] - rows["started_at"]).dt.total_seconds()
    timing = (rows["timing_finished_at"] - rows["timing_started_at"]).dt.total_seconds()
    fit, wait = rows["train_s"], rows["timing_wait_s"].fillna(0.0)
    predict = wall - fit - timing - wait
    return pd.DataFrame(
        {"wall": wall, "fit": fit, "predict": predict, "wait": wait, "timing": timing}
    )


def format_split(parts: pd.DataFrame) -> str:
    total = parts.sum()
    names = ("wall", "fit", "predict", "wait", "timing")
    return "  ".join(f"{name} {total[name]:7.1f}" for name in names)


def cache_cost(args) -> dict[str, float]:
    """One batch: seconds of its cache key, its forward, and the write and read of its
    features as a cache entry (medians of ``--cost-repeats``), and the entry's MiB."""
    torch.set_num_threads(args.threads)
    extractor = FeatureExtractor(args.backbone, ["layer2", "layer3"], pretrained=False)
    images = torch.randn(args.batch_size, 3, args.size, args.size)
    times: dict[str, list[float]] = {"key_s": [], "forward_s": [], "write_s": [], "read_s": []}
    with tempfile.TemporaryDirectory(prefix="cache-cost-") as folder:
        cache = TensorCache(folder, max_bytes=1 << 40)
        for _ in range(args.cost_repeats):
            start = time.perf_counter()
            key = extractor.feature_cache_key(images)
            times["key_s"].append(time.perf_counter() - start)
            start = time.perf_counter()
            with torch.no_grad():
                features = extractor(images)
            times["forward_s"].append(time.perf_counter() - start)
            start = time.perf_counter()
            cache.put(key, features)
            times["write_s"].append(time.perf_counter() - start)
            start = time.perf_counter()
            stored = cache.get(key)
            times["read_s"].append(time.perf_counter() - start)
            assert stored is not None and all(torch.equal(stored[k], features[k]) for k in features)
        entry_mib = cache.path(key).stat().st_size / 2**20
    return {name: statistics.median(values) for name, values in times.items()} | {
        "entry_mib": entry_mib
    }


def print_cost(args, cost: dict[str, float]) -> None:
    forward = cost["forward_s"]
    print(
        f"cache cost, one batch of {args.batch_size} x 3 x {args.size} x {args.size}, "
        f"{args.backbone} layer2+layer3, {args.threads} thread(s), median of {args.cost_repeats}:"
    )
    print(f"  forward (what a hit saves) {forward * 1000:8.1f} ms")
    for name, label in (("key_s", "cache key (sha256)"), ("write_s", "write"), ("read_s", "read")):
        share = cost[name] / forward
        print(f"  {label:26s} {cost[name] * 1000:8.1f} ms  ({share:.1%} of the forward)")
    print(f"  entry size                 {cost['entry_mib']:8.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--val-good", type=int, default=20)
    parser.add_argument("--val-defect", type=int, default=4, help="per defect type")
    parser.add_argument("--test-good", type=int, default=40)
    parser.add_argument("--test-defect", type=int, default=6, help="per defect type")
    parser.add_argument("--ratios", type=float, nargs="+", default=LADDER)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--latency-warmup", type=int, default=3)
    parser.add_argument("--latency-repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per trial")
    parser.add_argument("--concurrent", type=int, default=2, help="trials at once")
    parser.add_argument("--cpus", type=int, default=2, help="Ray's CPUs")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--max-gb", type=float, default=4.0)
    parser.add_argument("--data-root", default="~/.cache/anomaly-sweep/glue-bench")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--cost-repeats", type=int, default=5, help="batches for the cache cost")
    parser.add_argument("--cost-only", action="store_true", help="measure the cache cost only")
    args = parser.parse_args()
    if args.cost_only:
        print_cost(args, cache_cost(args))
        return

    ray_start = connect_ray(num_cpus=args.cpus)
    logging.getLogger("ray").setLevel(logging.ERROR)
    quiet = Console(file=open("/dev/null", "w"))  # noqa: SIM115
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(prefix="coreset-cache-") as tmp:
        for repeat in range(args.repeats):
            # Alternate which goes first, so drift in the machine's load hits both alike.
            order = ("off", "on") if repeat % 2 == 0 else ("on", "off")
            for label in order:
                result = run_once(args, Path(tmp), f"{label}{repeat}", label == "on", quiet)
                runs[label].append(result)
                print(f"repeat {repeat}: cache {label:3s} sweep {result['sweep_s']:7.1f} s")

    off_s = statistics.median(r["sweep_s"] for r in runs["off"])
    on_s = statistics.median(r["sweep_s"] for r in runs["on"])
    off_rows, on_rows = runs["off"][0]["rows"], runs["on"][0]["rows"]
    identical = off_rows[RESULT_COLUMNS].equals(on_rows[RESULT_COLUMNS])
    cost = cache_cost(args)
    key_s, forward_s = cost["key_s"], cost["forward_s"]

    print(
        f"\nPatchCore {args.backbone} (random init) layer2+layer3, {args.size} px, "
        f"{off_rows['n_train'][0]} train / {off_rows['n_test'][0]} test images, "
        f"{len(args.ratios)} ratios, {args.concurrent} trials at once x {args.threads} thread(s), "
        f"{args.repeats} repeat(s); Ray start-up {ray_start:.1f} s (apart)"
    )
    print(f"sweep, cache off (median)   {off_s:8.1f} s")
    print(f"sweep, cache on  (median)   {on_s:8.1f} s")
    print(f"speed-up                    {off_s / on_s:8.2f} x   (target >= 4)")
    print(f"identical results per ratio {identical}")
    print(f"cache key of one batch      {key_s * 1000:8.1f} ms  (its forward: {forward_s:.2f} s)")
    off_parts, on_parts = time_split(off_rows), time_split(on_rows)
    print("seconds summed over the trials (fit = features + coreset; predict = scoring val and")
    print("test, NN search included; wait = for the timing lock; timing = latency + throughput,")
    print("never cached):")
    print(f"  cache off: {format_split(off_parts)}")
    print(f"  cache on:  {format_split(on_parts)}")
    table = pd.DataFrame(
        {
            "ratio": off_rows["hp.coreset_ratio"],
            "bank": off_rows["memory_bank_size"],
            **{f"{name}_off": off_parts[name].round(1) for name in ("fit", "predict", "timing")},
            **{f"{name}_on": on_parts[name].round(1) for name in ("fit", "predict", "timing")},
            "hits": on_rows["cache_hits"],
            "misses": on_rows["cache_misses"],
            "auroc": off_rows["image_auroc"].round(3),
        }
    )
    print(table.to_string(index=False))
    print_cost(args, cost)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "ray_start_s": ray_start,
                    "sweep_off_s": [r["sweep_s"] for r in runs["off"]],
                    "sweep_on_s": [r["sweep_s"] for r in runs["on"]],
                    "speedup": off_s / on_s,
                    "identical": identical,
                    "key_ms": key_s * 1000,
                    "forward_s": forward_s,
                    "cache_cost": cost,
                    "per_ratio": table.to_dict(orient="records"),
                    "sums_off": time_split(off_rows).sum().to_dict(),
                    "sums_on": time_split(on_rows).sum().to_dict(),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
