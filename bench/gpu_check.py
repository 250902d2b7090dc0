"""The checks to run the first time a GPU is at hand: does what the CPU-only CI cannot see work?

Four checks, each a few seconds to a couple of minutes on one GPU, written to ``--out`` as
``gpu_check.json`` (every figure) and ``gpu_check.txt`` (the summary this prints):

1. **packing**: a tiny PatchCore study of 4 seeds that asks for ``resources.gpu: 0.25`` runs
   through ``run_study`` on one GPU. Pass: 4 rows with status ok, their device the GPU's name
   (``cpu`` in a dry run), at least two trials running at the same moment (all four is the
   aim; the figure is reported), latency and throughput finite and positive, GPU memory peaks
   recorded.
2. **latency**: one fitted PatchCore timed at batch 1 by ``sweep.run.timing.measure_latency``
   (``torch.cuda.synchronize`` after every call) against CUDA events around the same calls.
   Pass: finite, positive, and the synchronised wall time not below the events' device time
   (an unsynchronised timer reads the launch only; it is reported beside them).
3. **feature cache**: one frozen extractor's features of one batch on the CPU and on the GPU,
   through ``models.cache.TensorCache``. Pass: the GPU's hit is bit-identical to its miss and
   on the GPU, the CPU and GPU entries have different keys (the device kind is in the key),
   and the GPU features equal the CPU ones within tolerance. The key, write, read and forward
   times are reported: what the cache costs against what it saves on a GPU.
4. **nearest neighbours**: ``NearestNeighbors`` on a bank on the CPU (faiss) and on the GPU
   (torch), and one fitted PatchCore's scores on each device. Pass: distances and scores
   equal within tolerance, nearest indices the same for nearly every query.

    python bench/gpu_check.py --out DIR [--dry-run] [--plan]

``--dry-run`` runs every step on the CPU with tiny inputs (the GPU side is the CPU too, so the
comparisons are trivial): what CI can check of this script. ``--plan`` prints the checks and
exits. ``bench/gpu_check.sh`` wraps this with the machine's ``nvidia-smi`` and a time limit.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHECKS = {
    "packing": "4 PatchCore trials at resources.gpu 0.25 on one GPU: rows ok, device, overlap, "
    "latency finite and positive, GPU memory peak recorded",
    "latency": "measure_latency (CUDA synchronised) against CUDA events and an unsynchronised "
    "timer, one fitted PatchCore at batch 1",
    "feature_cache": "features through TensorCache on CPU and GPU: hit == miss on the GPU, keys "
    "differ by device, GPU ~ CPU; key / write / read / forward times",
    "nearest_neighbors": "NearestNeighbors faiss (CPU) vs torch (GPU) distances and indices; "
    "one PatchCore's scores on CPU vs GPU",
}

# fp32 on both sides, but the GPU's convolutions may use TF32 (cuDNN's default) and its
# distances come from ||q||^2 - 2 q.v + ||v||^2, which cancels where faiss sums differences:
# tolerances relative to the largest value compared.
FEATURE_RTOL = 5e-3
DISTANCE_RTOL = 1e-3
SCORE_RTOL = 1e-3
INDEX_AGREEMENT = 0.99


@dataclass
class Settings:
    """Sizes: a GPU run's, or a dry run's on the CPU (tiny, seconds)."""

    device: str
    image_size: int
    n_train: int
    batch: int
    bank: int
    queries: int
    dim: int
    latency_repeats: int
    backbone: str = "resnet18"


GPU = Settings("cuda", 128, 64, 32, 50_000, 8192, 384, 50)
DRY = Settings("cpu", 64, 16, 8, 2_000, 512, 64, 5)


@dataclass
class Report:
    figures: dict = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks[name] = bool(ok)
        self.say(f"  [{'PASS' if ok else 'FAIL'}] {name}: {detail}")


def _finite_positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _max_concurrency(rows) -> int:
    """The most trials running at one moment, from their started_at / finished_at."""
    events = sorted(
        [(start, 1) for start in rows["started_at"]] + [(end, -1) for end in rows["finished_at"]],
        key=lambda event: (event[0], event[1]),  # an end before a start at the same instant
    )
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def _fitted_patchcore(settings: Settings, seed: int = 0):
    import torch

    import models

    generator = torch.Generator().manual_seed(seed)
    size = settings.image_size
    train = torch.randn(settings.n_train, 3, size, size, generator=generator)
    detector = models.create(
        "patchcore", backbone=settings.backbone, pretrained=False, coreset_ratio=0.1, seed=seed
    )
    detector.fit([train[i : i + settings.batch] for i in range(0, len(train), settings.batch)])
    test = torch.randn(settings.batch, 3, size, size, generator=generator)
    return detector, test


def check_packing(settings: Settings, work: Path, report: Report) -> None:
    import ray
    from rich.console import Console

    from sweep.results import read_results
    from sweep.run.runner import connect_ray, run_study
    from sweep.run.study import study_from_dict

    report.say("1. packing: 4 trials at resources.gpu 0.25")
    output = work / "packing"
    study = study_from_dict(
        {
            "name": "gpu-check-packing",
            "dataset": {
                "kind": "synthetic_glue",
                "root": str(work / "data"),
                "category": "part1",
                "image_size": settings.image_size,
                "synthetic": {
                    "n_train": settings.n_train,
                    "n_val_good": 4,
                    "n_val_defect": 1,
                    "n_test_good": 8,
                    "n_test_defect": 2,
                },
            },
            "space": {
                "model": "patchcore",
                "backbone": settings.backbone,
                "pretrained": False,
                "coreset_ratio": 0.1,
                "seed": {"grid": [0, 1, 2, 3]},
            },
            # Four quarters of one GPU; 1 CPU and 1 GB each so that only the GPU share decides
            # how many run at once.
            "resources": {"gpu": 0.25, "cpu": 1, "memory_gb": 1},
            "max_concurrent": 4,
            "cache": {"features": False},
            "evaluation": {
                "batch_size": settings.batch,
                "train_batch_size": settings.batch,
                "latency_warmup": 2,
                "latency_repeats": settings.latency_repeats,
            },
            "output": str(output),
        }
    )
    ray_start = connect_ray(num_cpus=4)
    gpus = ray.cluster_resources().get("GPU", 0.0)
    summary = run_study(study, console=Console(file=open(work / "packing.log", "w")))  # noqa: SIM115
    ray.shutdown()
    rows = read_results(output).sort_values("seed").reset_index(drop=True)
    ok_rows = int((rows["status"] == "ok").sum()) if len(rows) else 0
    concurrency = _max_concurrency(rows) if len(rows) else 0
    devices = sorted(set(rows.get("device", [])))
    on_gpu = settings.device == "cuda"
    report.figures["packing"] = {
        "ray_gpus": gpus,
        "ray_start_s": ray_start,
        "sweep_s": summary.sweep_s,
        "rows": len(rows),
        "ok": ok_rows,
        "max_concurrency": concurrency,
        "devices": devices,
        "per_trial": rows[
            [
                c
                for c in (
                    "seed",
                    "status",
                    "device",
                    "started_at",
                    "finished_at",
                    "train_s",
                    "latency_ms",
                    "throughput_fps",
                    "timing_wait_s",
                    "peak_gpu_mb",
                    "error",
                )
                if c in rows
            ]
        ].to_dict(orient="records"),
    }
    report.say(f"  Ray sees {gpus:g} GPU(s); sweep {summary.sweep_s:.1f} s")
    report.check("rows", len(rows) == 4 and ok_rows == 4, f"{ok_rows} of {len(rows)} rows ok")
    expected = "not cpu" if on_gpu else "cpu"
    right_device = bool(devices) and all((d != "cpu") == on_gpu for d in devices)
    report.check("device", right_device, f"{devices} (expected {expected})")
    report.check(
        "overlap",
        concurrency >= 2,
        f"at most {concurrency} of 4 trials at one moment (all 4: {concurrency == 4})",
    )
    latencies = list(rows.get("latency_ms", []))
    throughputs = list(rows.get("throughput_fps", []))
    report.check(
        "latency",
        len(latencies) == 4 and all(map(_finite_positive, latencies + throughputs)),
        "latency_ms " + ", ".join(f"{v:.2f}" for v in latencies),
    )
    if on_gpu:
        peaks = list(rows.get("peak_gpu_mb", []))
        report.check(
            "gpu_memory",
            len(peaks) == 4 and all(map(_finite_positive, peaks)),
            "peak_gpu_mb " + ", ".join(f"{v:.0f}" for v in peaks),
        )


def check_latency(settings: Settings, report: Report) -> None:
    import torch

    from sweep.run.timing import measure_latency, synchronize

    report.say("2. latency: measure_latency (synchronised) against CUDA events")
    device = torch.device(settings.device)
    detector, test = _fitted_patchcore(settings)
    detector = detector.to(device)
    image = test[:1].to(device)
    repeats = settings.latency_repeats
    synced = measure_latency(detector.predict, image, warmup=3, repeats=repeats)
    with torch.inference_mode():
        synchronize(device)
        unsynced = []
        for _ in range(repeats):
            start = time.perf_counter()
            detector.predict(image)
            unsynced.append((time.perf_counter() - start) * 1000)
        synchronize(device)
        events_ms = None
        if device.type == "cuda":
            events = []
            for _ in range(repeats):
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                begin.record()
                detector.predict(image)
                end.record()
                end.synchronize()
                events.append(begin.elapsed_time(end))
            events_ms = statistics.median(events)
    figures = {
        "synchronised_ms": synced.median_ms,
        "spread_ms": synced.spread_ms,
        "unsynchronised_ms": statistics.median(unsynced),
        "cuda_events_ms": events_ms,
    }
    report.figures["latency"] = figures
    shown = ", ".join(f"{k} {v:.3f}" for k, v in figures.items() if v is not None)
    ok = _finite_positive(synced.median_ms)
    if events_ms is not None:
        # The wall clock around a synchronised call holds the device's work and more.
        ok = ok and synced.median_ms >= 0.95 * events_ms
    report.check("synchronised", ok, shown)


def check_feature_cache(settings: Settings, report: Report) -> None:
    import torch

    from models.backbones import FeatureExtractor
    from models.cache import TensorCache, use_cache
    from sweep.run.timing import synchronize

    report.say("3. feature cache: CPU against GPU")
    device = torch.device(settings.device)
    cpu_extractor = FeatureExtractor(settings.backbone, ["layer2", "layer3"], pretrained=False)
    gpu_extractor = copy.deepcopy(cpu_extractor).to(device)
    size = settings.image_size
    images = torch.randn(settings.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    on_device = images.to(device)
    with torch.no_grad():
        cpu_features = cpu_extractor(images)
    with tempfile.TemporaryDirectory(prefix="gpu-check-cache-") as folder:
        cache = TensorCache(folder, max_bytes=1 << 36)
        with torch.no_grad(), use_cache(cache):
            times = {}
            synchronize(device)
            start = time.perf_counter()
            miss = gpu_extractor(on_device)
            synchronize(device)
            times["miss_s"] = time.perf_counter() - start  # forward + key + write
            start = time.perf_counter()
            hit = gpu_extractor(on_device)
            synchronize(device)
            times["hit_s"] = time.perf_counter() - start  # key + read + copy to the device
        with torch.no_grad():
            synchronize(device)
            start = time.perf_counter()
            gpu_extractor(on_device)
            synchronize(device)
            times["forward_s"] = time.perf_counter() - start
        start = time.perf_counter()
        gpu_key = gpu_extractor.feature_cache_key(on_device)
        times["key_s"] = time.perf_counter() - start
        cpu_key = cpu_extractor.feature_cache_key(images)
        stats = cache.stats()
    identical = all(torch.equal(hit[k], miss[k]) for k in miss)
    where = sorted({str(t.device) for t in hit.values()})
    rel = max(
        float((miss[k].cpu() - cpu_features[k]).abs().max() / cpu_features[k].abs().max())
        for k in cpu_features
    )
    report.figures["feature_cache"] = times | {
        "max_rel_diff_gpu_vs_cpu": rel,
        "hit_equals_miss": identical,
        "hit_devices": where,
        "stats": stats,
    }
    report.say(
        "  " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in times.items()) + f"; cache {stats}"
    )
    expected = [str(next(iter(miss.values())).device)]
    report.check("hit_is_miss", identical and where == expected, f"bit-identical on {where}")
    report.check(
        "keys_by_device",
        (gpu_key != cpu_key) == (device.type != "cpu"),
        "the device kind is in the key" if device.type != "cpu" else "one device: one key",
    )
    report.check("gpu_vs_cpu", rel <= FEATURE_RTOL, f"max rel diff {rel:.2e} (<= {FEATURE_RTOL})")


def check_nearest_neighbors(settings: Settings, report: Report) -> None:
    import torch

    from models.components.feature_utils import NearestNeighbors
    from sweep.run.timing import synchronize

    report.say("4. nearest neighbours: faiss on the CPU against torch on the GPU")
    device = torch.device(settings.device)
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(settings.bank, settings.dim, generator=generator)
    queries = torch.randn(settings.queries, settings.dim, generator=generator)
    cpu_index = NearestNeighbors(bank)
    gpu_index = NearestNeighbors(bank.to(device), backend="torch")
    start = time.perf_counter()
    cpu_d, cpu_i = cpu_index.search(queries, k=1)
    cpu_s = time.perf_counter() - start
    gpu_queries = queries.to(device)
    gpu_index.search(gpu_queries, k=1)  # warm-up (kernels, cuBLAS handle)
    synchronize(device)
    start = time.perf_counter()
    gpu_d, gpu_i = gpu_index.search(gpu_queries, k=1)
    synchronize(device)
    gpu_s = time.perf_counter() - start
    rel = float((gpu_d.cpu() - cpu_d).abs().max() / cpu_d.abs().max())
    agree = float((gpu_i.cpu() == cpu_i).float().mean())

    detector, test = _fitted_patchcore(settings)
    cpu_scores = detector.predict(test).score
    moved = copy.deepcopy(detector).to(device)
    gpu_scores = moved.predict(test.to(device)).score.cpu()
    score_rel = float((gpu_scores - cpu_scores).abs().max() / cpu_scores.abs().max())
    report.figures["nearest_neighbors"] = {
        "bank": settings.bank,
        "queries": settings.queries,
        "dim": settings.dim,
        "backends": [cpu_index.backend, gpu_index.backend],
        "cpu_faiss_s": cpu_s,
        "device_torch_s": gpu_s,
        "max_rel_distance_diff": rel,
        "index_agreement": agree,
        "patchcore_max_rel_score_diff": score_rel,
        "patchcore_index_backend": moved._neighbors().backend,
    }
    report.say(
        f"  {settings.queries} queries x {settings.bank} bank x {settings.dim}: faiss (CPU) "
        f"{cpu_s * 1000:.1f} ms, torch ({device.type}) {gpu_s * 1000:.1f} ms"
    )
    report.check("distances", rel <= DISTANCE_RTOL, f"max rel diff {rel:.2e} (<= {DISTANCE_RTOL})")
    report.check("indices", agree >= INDEX_AGREEMENT, f"{agree:.4f} agree (>= {INDEX_AGREEMENT})")
    backend = report.figures["nearest_neighbors"]["patchcore_index_backend"]
    report.check(
        "patchcore_scores",
        score_rel <= SCORE_RTOL and backend == ("torch" if device.type == "cuda" else "faiss"),
        f"max rel diff {score_rel:.2e} (<= {SCORE_RTOL}); its search on {device.type}: {backend}",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/gpu_check"))
    parser.add_argument("--dry-run", action="store_true", help="the CPU as the GPU, tiny sizes")
    parser.add_argument("--plan", action="store_true", help="print the checks and exit")
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), default=list(CHECKS))
    args = parser.parse_args()
    mode = "dry run (CPU stands in for the GPU)" if args.dry_run else "GPU"
    if args.plan:
        print(f"gpu_check plan, {mode}:")
        for number, (name, what) in enumerate(CHECKS.items(), 1):
            print(f"  {number}. {name}: {what}")
        return 0

    import torch

    settings = DRY if args.dry_run else GPU
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to check the script on the CPU")
        return 2
    logging.getLogger("ray").setLevel(logging.ERROR)
    torch.set_num_threads(2 if args.dry_run else 4)
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report()
    device_name = torch.cuda.get_device_name(0) if settings.device == "cuda" else "cpu"
    report.figures["environment"] = {
        "mode": mode,
        "device": device_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
        "settings": settings.__dict__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    report.say(f"gpu_check, {mode}: {device_name}, torch {torch.__version__}")
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        steps = {
            "packing": lambda: check_packing(settings, Path(work), report),
            "latency": lambda: check_latency(settings, report),
            "feature_cache": lambda: check_feature_cache(settings, report),
            "nearest_neighbors": lambda: check_nearest_neighbors(settings, report),
        }
        for name in args.only:
            try:
                steps[name]()
            except Exception as error:  # one broken step must not hide the others' figures
                report.check(name, False, f"raised {type(error).__name__}: {error}")
            # Written after every step, so that a run cut off by the time limit keeps its figures.
            write(report, args.out)
    report.figures["seconds"] = time.perf_counter() - began
    failed = [name for name, ok in report.checks.items() if not ok]
    report.say(
        f"{len(report.checks) - len(failed)} of {len(report.checks)} checks passed in "
        f"{report.figures['seconds']:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    write(report, args.out)
    print(f"figures: {args.out / 'gpu_check.json'}, summary: {args.out / 'gpu_check.txt'}")
    return 1 if failed else 0


def write(report: Report, out: Path) -> None:
    report.figures["checks"] = report.checks
    (out / "gpu_check.json").write_text(json.dumps(report.figures, indent=2, default=str))
    (out / "gpu_check.txt").write_text("\n".join(report.lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
