"""The Pareto plot is written as a real PNG, atomically, without touching pyplot."""

from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from sweep.analysis import select
from sweep.errors import SweepError
from sweep.plots import pareto_plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OBJECTIVES = [("image_auroc", "max"), ("latency_ms", "min")]


def _agg(latency, auroc) -> pd.DataFrame:
    n = len(latency)
    return pd.DataFrame(
        {
            "model": [f"model{i}" for i in range(n)],
            "backbone": ["resnet18" if i % 2 else None for i in range(n)],
            "n_seeds": 3,
            "latency_ms_mean": latency,
            "latency_ms_std": np.full(n, 0.3),
            "image_auroc_mean": auroc,
            "image_auroc_std": np.full(n, 0.01),
            "pixel_auroc_mean": np.linspace(0.9, 0.95, n),
            "pixel_auroc_std": 0.0,
        }
    )


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_pareto_plot_writes_a_png(tmp_path):
    latency = np.array([2.0, 5.0, 9.0, 40.0, 150.0, 30.0])  # spans > 1 decade: log x axis
    auroc = np.array([0.80, 0.90, 0.93, 0.95, 0.97, 0.85])
    sel = select(_agg(latency, auroc), OBJECTIVES)
    out = pareto_plot(sel, tmp_path / "report" / "pareto.png", title="glue line, part 1")
    assert out == tmp_path / "report" / "pareto.png"
    width, height = _png_size(out)
    assert (width, height) == (1200, 840)  # 8 x 5.6 in at 150 dpi
    assert out.stat().st_size > 20_000  # points, labels and legend, not an empty canvas
    assert [p.name for p in out.parent.iterdir()] == ["pareto.png"]  # no temp file left


def test_pareto_plot_other_axes_degenerate_and_overwrite(tmp_path):
    path = tmp_path / "pareto.png"
    sel = select(_agg(np.array([3.0, 4.0]), np.array([0.9, 0.95])), OBJECTIVES)
    pareto_plot(sel, path)
    first = path.read_bytes()
    # Any aggregated metric can go on an axis, objective or not; the file is replaced.
    pareto_plot(sel, path, x="pixel_auroc", y="image_auroc")
    assert path.read_bytes() != first and path.read_bytes()[:8] == PNG_SIGNATURE

    nan = select(_agg(np.array([np.nan, np.nan]), np.array([0.9, np.nan])), OBJECTIVES)
    assert pareto_plot(nan, tmp_path / "empty.png").read_bytes()[:8] == PNG_SIGNATURE

    one_objective = select(_agg(np.array([3.0]), np.array([0.9])), [("image_auroc", "max")])
    with pytest.raises(SweepError, match="needs two metrics"):
        pareto_plot(one_objective, tmp_path / "x.png")
    with pytest.raises(SweepError, match="'train_s'"):
        pareto_plot(sel, tmp_path / "x.png", x="train_s")


def test_importing_and_plotting_leaves_pyplot_alone(tmp_path):
    # Two configurations: Kneedle is not needed, so kneed (which imports pyplot itself on
    # import) stays out and the check is about this package alone.
    code = (
        "import sys, numpy as np, pandas as pd\n"
        "from sweep.analysis import select\n"
        "from sweep.plots import pareto_plot\n"
        "agg = pd.DataFrame({'model': ['a', 'b'], 'latency_ms_mean': [1.0, 30.0],"
        " 'image_auroc_mean': [0.5, 0.9]})\n"
        "sel = select(agg, [('image_auroc', 'max'), ('latency_ms', 'min')])\n"
        f"pareto_plot(sel, {str(tmp_path / 'p.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
        "assert 'kneed' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_SIGNATURE
