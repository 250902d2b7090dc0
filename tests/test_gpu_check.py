"""bench/gpu_check.sh, the check waiting for a GPU: its dry run passes on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
CHECKS = ("packing", "latency", "feature_cache", "nearest_neighbors")


def _run(*args: str, out: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    # A short RAY_TMPDIR of its own (Ray's socket paths stay under 108 bytes), no RAY_ADDRESS.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "OUT")}
    env.update(PYTHON=sys.executable, RAY_USAGE_STATS_ENABLED="0")
    with tempfile.TemporaryDirectory(prefix="gc", dir="/tmp") as ray_tmp:
        env["RAY_TMPDIR"] = ray_tmp
        extra = ("--out", str(out)) if out is not None else ()
        return subprocess.run(
            ["bash", str(SCRIPT), *args, *extra],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def test_plan_names_every_check_and_bad_arguments_exit_2():
    done = _run("--dry-run", "--plan")
    assert done.returncode == 0, done.stderr
    assert "dry run" in done.stdout
    for number, name in enumerate(CHECKS, 1):
        assert f"plan:   {number}. {name}:" in done.stdout
    bad = _run("--gpus")
    assert bad.returncode == 2
    assert "unknown argument --gpus" in bad.stderr


@pytest.mark.slow
def test_dry_run_passes_every_check_on_the_cpu_and_writes_its_figures(tmp_path):
    # About a minute on 2 shared cores (Ray and 4 packed trials): the slow stage.
    done = _run("--dry-run", out=tmp_path, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[FAIL]" not in done.stdout
    figures = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(CHECKS) <= set(figures)
    assert figures["checks"] and all(figures["checks"].values())
    packing = figures["packing"]
    assert packing["ok"] == 4 and packing["devices"] == ["cpu"]
    assert packing["max_concurrency"] >= 2
    assert figures["nearest_neighbors"]["backends"] == ["faiss", "torch"]
    summary = (tmp_path / "gpu_check.txt").read_text()
    assert f"{len(figures['checks'])} of {len(figures['checks'])} checks passed" in summary
