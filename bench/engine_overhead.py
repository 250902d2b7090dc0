"""The engine's overhead per trial: 32 trivial trials through Ray Tune vs a plain loop.

Both paths run the same trial function (it trains nothing) and write the same Parquet rows,
so the difference is what Ray Tune, the actors and the bookkeeping cost. Ray's own start-up
is measured apart.

    python bench/engine_overhead.py [--trials 32] [--cpus 2]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray.cloudpickle as cloudpickle

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console

from sweep.results import ResultStore
from sweep.run.runner import connect_ray, run_study, study_schema
from sweep.run.study import expand_trials, study_from_dict
from sweep.run.trainable import TrialContext, execute_trial


def trivial_runner(trial, ctx, report):
    return {"image_auroc": 0.5, "latency_ms": 1.0, "train_s": 0.0}


cloudpickle.register_pickle_by_value(sys.modules[__name__])


def make_study(trials: int, output: Path, concurrency: int):
    return study_from_dict(
        {
            "name": "overhead",
            "dataset": {"kind": "synthetic_glue", "image_size": 64},
            "space": {
                "model": "patchcore",
                "pretrained": False,
                "seed": {"grid": list(range(trials))},
            },
            "resources": {"cpu": 1},
            "max_concurrent": concurrency,
            "output": str(output),
        }
    )


def plain_loop(study, output: Path) -> float:
    store = ResultStore(output)
    ctx = TrialContext(
        study=study,
        output=str(output),
        run_id="plain",
        schema=study_schema(study),
        trial_runner=trivial_runner,
    )
    start = time.perf_counter()
    for trial in expand_trials(study):
        store.write_row(execute_trial(trial, ctx), ctx.schema)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    ray_start = connect_ray(num_cpus=args.cpus)
    logging.getLogger("ray").setLevel(logging.ERROR)
    quiet = Console(file=open("/dev/null", "w"))  # noqa: SIM115
    loop_s, ray_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            study = make_study(args.trials, Path(tmp) / f"ray{repeat}", args.cpus)
            loop_s.append(plain_loop(study, Path(tmp) / f"loop{repeat}"))
            summary = run_study(study, trial_runner=trivial_runner, preflight=False, console=quiet)
            assert summary.ok == args.trials, summary
            ray_s.append(summary.sweep_s)
    loop, ray = statistics.median(loop_s), statistics.median(ray_s)
    overhead = (ray - loop) / args.trials
    print(
        f"trials per run             {args.trials} "
        f"(max_concurrent {args.cpus}, {args.repeats} runs)"
    )
    print(f"Ray start-up (apart)       {ray_start:.2f} s")
    print(f"plain loop, median         {loop:.2f} s  ({loop / args.trials * 1000:.1f} ms/trial)")
    print(f"through Ray Tune, median   {ray:.2f} s  ({ray / args.trials * 1000:.1f} ms/trial)")
    print(f"engine overhead per trial  {overhead:.3f} s  (target < 0.5 s)")


if __name__ == "__main__":
    main()
