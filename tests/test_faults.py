"""Fault tolerance: trials that fail for their own reason, out-of-memory retries, Ctrl-C, a
driver killed at random moments, and a worker node of a real multi-node Ray cluster killed
mid-trial. Each ends with every expected row present exactly once."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pandas as pd
import psutil
import pyarrow.dataset as pads
import pytest
import torch
import yaml

import models
from sweep.runner import study_schema
from sweep.study import config_hash, expand_trials, study_from_dict
from sweep.trainable import TrialContext, execute_trial
from tests.conftest import tiny_study

REPO = Path(__file__).resolve().parents[1]
SWEEP = str(Path(sys.executable).with_name("sweep"))


def _context(study, tmp_path, **kw) -> TrialContext:
    return TrialContext(
        study=study, output=str(tmp_path / "out"), run_id="t", schema=study_schema(study), **kw
    )


def _padim_study(glue_root, tmp_path, **evaluation):
    raw = tiny_study(glue_root, tmp_path / "out")
    raw["space"] = {"model": "padim", "backbone": "resnet18", "pretrained": False, "seed": 0}
    raw["evaluation"] = {**raw["evaluation"], "example_maps": 0, **evaluation}
    return study_from_dict(raw)


# ------------------------------------------------------------------ a trial's own failures


def test_an_exception_is_an_error_row_with_its_type_message_and_place(glue_root, tmp_path):
    study = _padim_study(glue_root, tmp_path)
    calls = []

    def broken(trial, ctx, report):
        calls.append(ctx.batch_sizes())
        raise KeyError("no such layer 'layer9'")

    row = execute_trial(expand_trials(study)[0], _context(study, tmp_path, trial_runner=broken))
    assert row["status"] == "error"
    assert row["error"].startswith("KeyError: \"no such layer 'layer9'\" [")
    assert "test_faults.py" in row["error"] and "broken" in row["error"]
    assert calls == [(8, 8)], "only out-of-memory failures are retried"
    assert row.get("retried_with_batch") is None


def test_a_nan_training_loss_is_an_error_row(glue_root, tmp_path, monkeypatch):
    study = _padim_study(glue_root, tmp_path)
    cls = models.get_class("padim")

    def diverging_fit(self, train, epochs=None, on_epoch_end=None):
        on_epoch_end(1, {"loss": float("nan")})

    monkeypatch.setattr(cls, "fit", diverging_fit)
    row = execute_trial(expand_trials(study)[0], _context(study, tmp_path))
    assert row["status"] == "error"
    assert row["error"].startswith("FloatingPointError: training loss is nan at epoch 1")
    assert row.get("image_auroc") is None


def test_non_finite_scores_are_an_error_row(glue_root, tmp_path, monkeypatch):
    study = _padim_study(glue_root, tmp_path)
    cls = models.get_class("padim")
    predict = cls.predict

    def nan_predict(self, images):
        prediction = predict(self, images)
        prediction.score[0] = float("inf")
        return prediction

    monkeypatch.setattr(cls, "predict", nan_predict)
    row = execute_trial(expand_trials(study)[0], _context(study, tmp_path))
    assert row["status"] == "error"
    assert "FloatingPointError" in row["error"] and "non-finite image scores" in row["error"]


def test_out_of_memory_at_the_smallest_batch_is_an_error_row(glue_root, tmp_path):
    study = _padim_study(glue_root, tmp_path, train_batch_size=1, batch_size=1)
    calls = []

    def oom(trial, ctx, report):
        calls.append(ctx.batch_sizes())
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    row = execute_trial(expand_trials(study)[0], _context(study, tmp_path, trial_runner=oom))
    assert calls == [(1, 1)], "nothing to halve: no retry"
    assert row["status"] == "error"
    assert row["error"].startswith("out of memory: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert row.get("retried_with_batch") is None


# ------------------------------------------------------------------ out-of-memory retry


def test_cuda_out_of_memory_is_retried_once_with_half_the_batch(glue_root, tmp_path):
    study = _padim_study(glue_root, tmp_path, train_batch_size=8, batch_size=6)
    calls = []
    forwarded: list[dict] = []

    def runner(trial, ctx, report):
        train, evaluation = ctx.batch_sizes()
        calls.append((train, evaluation))
        report({"epoch": 1, "loss": 1.0})
        report({"epoch": 2, "loss": 0.5})
        if train > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")
        report({"epoch": 3, "loss": 0.25})
        return {"image_auroc": 0.75, "eval_batch_size": evaluation, "notes": "fit note"}

    ctx = _context(study, tmp_path, trial_runner=runner)
    row = execute_trial(expand_trials(study)[0], ctx, forwarded.append)
    assert calls == [(8, 6), (4, 3)]
    assert row["status"] == "ok" and row["error"] is None
    assert row["image_auroc"] == 0.75
    assert row["retried_with_batch"] == 4 and row["eval_batch_size"] == 3
    assert "retried with train batch 4 and eval batch 3 (from 8 and 6)" in row["notes"]
    assert "out of memory: CUDA out of memory" in row["notes"] and "fit note" in row["notes"]
    # The scheduler sees every epoch once: the retry's epochs 1-2 were reported already.
    assert [r["epoch"] for r in forwarded] == [1, 2, 3]


def test_host_out_of_memory_in_a_real_trial_is_retried_with_half_the_batch(
    glue_root, tmp_path, monkeypatch
):
    study = _padim_study(glue_root, tmp_path)
    cls = models.get_class("padim")
    fit = cls.fit
    batches: list[int] = []

    def fit_once_out_of_memory(self, train, epochs=None, on_epoch_end=None):
        batches.append(train.batch_size)
        if len(batches) == 1:
            raise MemoryError("cannot allocate 12 GiB for the embedding")
        return fit(self, train, epochs=epochs, on_epoch_end=on_epoch_end)

    monkeypatch.setattr(cls, "fit", fit_once_out_of_memory)
    row = execute_trial(expand_trials(study)[0], _context(study, tmp_path))
    assert batches == [8, 4]
    assert row["status"] == "ok", row["error"]
    assert 0.0 <= row["image_auroc"] <= 1.0
    assert row["retried_with_batch"] == 4 and row["eval_batch_size"] == 4
    assert "out of memory: cannot allocate 12 GiB" in row["notes"]


def test_a_retry_that_runs_out_of_memory_again_is_an_error_row(glue_root, tmp_path):
    study = _padim_study(glue_root, tmp_path)
    calls = []

    def always_oom(trial, ctx, report):
        calls.append(ctx.batch_sizes())
        raise RuntimeError(f"CUDA error: out of memory (batch {ctx.batch_sizes()[0]})")

    row = execute_trial(expand_trials(study)[0], _context(study, tmp_path, trial_runner=always_oom))
    assert calls == [(8, 8), (4, 4)], "one retry only"
    assert row["status"] == "error" and row["retried_with_batch"] == 4
    assert row["error"].startswith("out of memory: CUDA error: out of memory (batch 4)")
    assert "after: out of memory: CUDA error: out of memory (batch 8)" in row["notes"]


def test_a_detector_floor_on_the_training_batch_is_kept(glue_root, tmp_path, monkeypatch):
    study = _padim_study(glue_root, tmp_path, train_batch_size=8, batch_size=8)
    monkeypatch.setattr(models.get_class("padim"), "min_train_batch_size", 8, raising=False)
    calls = []

    def oom_once(trial, ctx, report):
        calls.append(ctx.batch_sizes())
        if len(calls) == 1:
            raise MemoryError
        return {}

    row = execute_trial(expand_trials(study)[0], _context(study, tmp_path, trial_runner=oom_once))
    assert calls == [(8, 8), (8, 4)], "the training batch stays at the detector's floor"
    assert row["status"] == "ok" and row["retried_with_batch"] == 8
