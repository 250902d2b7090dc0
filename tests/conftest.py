"""Shared fixtures: a small synthetic study and one Ray instance for the whole session."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# The feature cache and the timing lock are node-wide by design; the tests get their own, so a
# test run neither reads the user's cache nor waits on another run's timings. Set before Ray
# starts, its workers inherit them.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="anomaly-sweep-tests-"))
os.environ["ANOMALY_SWEEP_CACHE_DIR"] = str(_SESSION_DIR / "features")
os.environ["ANOMALY_SWEEP_TIMING_LOCK"] = str(_SESSION_DIR / "timing.lock")
# Every run would otherwise leave its cache behind (hundreds of runs filled a disk).
atexit.register(shutil.rmtree, _SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance (2 CPUs, like CI) shared by every test that needs it."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False
        )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def glue_root(tmp_path_factory) -> Path:
    """Where the tiny synthetic glue-line data lives for the session (generated on first use)."""
    return tmp_path_factory.mktemp("glue")


def tiny_study(glue_root: Path, output: Path, **overrides) -> dict:
    """A study mapping small enough to run several trials in seconds on 2 cores."""
    study = {
        "name": "tiny",
        "dataset": {
            "kind": "synthetic_glue",
            "root": str(glue_root),
            "category": "part1",
            "image_size": 64,
            "synthetic": {
                "n_train": 12,
                "n_val_good": 4,
                "n_val_defect": 1,
                "n_test_good": 6,
                "n_test_defect": 1,
                "height": 240,
                "width": 320,
            },
        },
        "space": {
            "model": {"grid": ["patchcore", "padim"]},
            "backbone": "resnet18",
            "pretrained": False,
            "seed": 0,
        },
        "resources": {"cpu": 1},
        "max_concurrent": 2,
        "evaluation": {
            "train_batch_size": 8,
            "batch_size": 8,
            "latency_warmup": 1,
            "latency_repeats": 3,
        },
        "output": str(output),
    }
    for key, value in overrides.items():
        study[key] = value
    return study


@pytest.fixture(scope="session")
def random_resnet18_weights(tmp_path_factory) -> str:
    """A weight file of one fixed random resnet18 (seed 0) whose residual branches are live.

    Detector tests that need a particular random teacher load it through ``weights=`` so
    that their figures do not depend on how a detector derives its backbone's seed.
    """
    import timm
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        network = timm.create_model("resnet18", zero_init_last=False)
    path = tmp_path_factory.mktemp("random_resnet18") / "resnet18.pth"
    torch.save(network.state_dict(), path)
    return str(path)
