"""Seed aggregation, Pareto front, knee points and selection."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest

from sweep.errors import SweepError
from sweep.read.analysis import (
    aggregate_seeds,
    config_columns,
    knee_kneedle,
    knee_utopia,
    pareto_mask,
    select,
    selection_to_dict,
    topsis,
)

# ------------------------------------------------------------------------------ aggregation


def _rows() -> pd.DataFrame:
    rows = []
    for model, backbone, k, seeds in [
        ("patchcore", "wide_resnet50_2", 9, [0.97, 0.99, 0.95]),
        ("patchcore", "resnet18", 9, [0.90, 0.92]),
        ("padim", "resnet18", None, [0.80, float("nan"), 0.84]),  # one seed lost a metric
        ("stfpm", None, 3, [0.70]),  # no backbone column value, one seed
    ]:
        for seed, auroc in enumerate(seeds):
            rows.append(
                {
                    "study": "s",
                    "trial_id": f"{model}-{seed}",
                    "config_hash": f"{model}{backbone}{seed}",
                    "status": "ok",
                    "model": model,
                    "backbone": backbone,
                    "seed": seed,
                    "image_size": 64,
                    "hp.k": k,
                    "hp.seed": seed,
                    "image_auroc": auroc,
                    "latency_ms": 10.0 * (seed + 1),
                }
            )
    rows.append({**rows[0], "status": "error", "seed": 7, "image_auroc": 0.0, "trial_id": "e"})
    return pd.DataFrame(rows)


def test_config_columns_keep_identity_and_drop_seed_and_bookkeeping():
    assert config_columns(_rows()) == ["model", "backbone", "image_size", "hp.k"]


def test_aggregate_seeds_matches_pandas_by_hand():
    df = _rows()
    agg = aggregate_seeds(df, ["image_auroc", "latency_ms"])
    assert list(agg.columns) == [
        "model",
        "backbone",
        "image_size",
        "hp.k",
        "n_seeds",
        "image_auroc_mean",
        "image_auroc_std",
        "latency_ms_mean",
        "latency_ms_std",
    ]
    # Sorted by the configuration columns: padim, patchcore/resnet18, patchcore/wrn, stfpm.
    assert list(agg["model"]) == ["padim", "patchcore", "patchcore", "stfpm"]
    assert list(agg["backbone"].fillna("-")) == ["resnet18", "resnet18", "wide_resnet50_2", "-"]
    assert list(agg["n_seeds"]) == [3, 2, 3, 1]  # the error row does not count

    wrn = df[(df.backbone == "wide_resnet50_2") & (df.status == "ok")]
    row = agg.iloc[2]
    assert row["image_auroc_mean"] == pytest.approx(wrn["image_auroc"].mean())
    assert row["image_auroc_std"] == pytest.approx(np.std([0.97, 0.99, 0.95], ddof=1))
    assert row["latency_ms_std"] == pytest.approx(10.0)  # 10, 20, 30 -> std 10
    # NaN-safe: padim's lost value is skipped, not propagated.
    assert agg.iloc[0]["image_auroc_mean"] == pytest.approx(0.82)
    assert agg.iloc[0]["image_auroc_std"] == pytest.approx(np.std([0.80, 0.84], ddof=1))
    # A single seed has std 0, not NaN.
    assert agg.iloc[3]["image_auroc_std"] == 0.0
    assert agg.iloc[3]["image_auroc_mean"] == pytest.approx(0.70)


def test_aggregate_seeds_is_independent_of_row_order_and_accepts_by():
    df = _rows()
    shuffled = df.sample(frac=1.0, random_state=3).reset_index(drop=True)
    pd.testing.assert_frame_equal(
        aggregate_seeds(df, ["image_auroc"]), aggregate_seeds(shuffled, ["image_auroc"])
    )
    by_model = aggregate_seeds(df, ["image_auroc"], by=["model"])
    assert list(by_model["model"]) == ["padim", "patchcore", "stfpm"]
    assert list(by_model["n_seeds"]) == [3, 5, 1]


def test_aggregate_seeds_degenerate_inputs():
    df = _rows()
    empty = aggregate_seeds(df[df.status == "error"], ["image_auroc"])
    assert empty.empty and "image_auroc_mean" in empty.columns
    all_nan = df.assign(image_auroc=float("nan"))
    agg = aggregate_seeds(all_nan, ["image_auroc"])
    assert agg["image_auroc_mean"].isna().all()
    with pytest.raises(SweepError, match=r"no column.*'pixel_aupro'"):
        aggregate_seeds(df, ["pixel_aupro"])


# ----------------------------------------------------------------------------- Pareto mask


def _brute_force_front(points, maximize):
    gains = np.where(maximize, points, -points)
    n = len(points)
    keep = np.zeros(n, dtype=bool)
    for i in range(n):
        if not np.all(np.isfinite(gains[i])):
            continue
        keep[i] = not any(
            np.all(np.isfinite(gains[j]))
            and np.all(gains[j] >= gains[i])
            and np.any(gains[j] > gains[i])
            for j in range(n)
            if j != i
        )
    return keep


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [2, 3, 4])
def test_pareto_mask_equals_brute_force(seed, k):
    rng = np.random.default_rng(seed * 10 + k)
    for _ in range(5):
        n = int(rng.integers(1, 60))
        points = np.round(rng.random((n, k)), 1)  # coarse grid: many ties and duplicates
        if n > 3:
            points[rng.integers(0, n)] = np.nan
            points[0] = points[1]
        maximize = list(rng.integers(0, 2, k).astype(bool))
        np.testing.assert_array_equal(
            pareto_mask(points, maximize), _brute_force_front(points, maximize)
        )


def test_pareto_mask_hand_example_and_duplicates():
    # (latency min, accuracy max)
    points = np.array([[10, 0.9], [10, 0.9], [5, 0.8], [20, 0.95], [12, 0.85], [np.nan, 1.0]])
    assert list(pareto_mask(points, [False, True])) == [True, True, True, True, False, False]
    with pytest.raises(ValueError, match="maximize"):
        pareto_mask(points, [True])


# ------------------------------------------------------------------------------ knee points


def _elbow_front():
    # accuracy = 1 - exp(-latency / 3): steep up to latency ~8 (accuracy 0.93), then each
    # doubling of latency buys almost nothing. Kneedle and the utopia distance both take 8.
    latency = np.array([1, 2, 3, 4, 6, 8, 12, 16, 24, 32.0])
    accuracy = 1 - np.exp(-latency / 3)
    front = np.column_stack([latency, accuracy])
    dominated = np.array([[9.0, 0.5], [30.0, 0.9], [np.nan, 0.99]])
    points = np.vstack([front, dominated])
    order = np.random.default_rng(0).permutation(len(points))
    knee_row = int(np.flatnonzero(order == 5)[0])  # where latency 8 landed after shuffling
    return points[order], knee_row


def test_kneedle_and_utopia_find_the_elbow():
    points, knee_row = _elbow_front()
    assert points[knee_row, 0] == 8.0
    assert knee_kneedle(points, [False, True]) == knee_row
    assert knee_utopia(points, [False, True]) == knee_row
    # Flipping an objective's sign and its direction describes the same front.
    flipped = points * np.array([-1.0, 1.0])
    assert knee_kneedle(flipped, [True, True]) == knee_row
    assert knee_utopia(flipped, [True, True]) == knee_row


def test_knees_on_degenerate_fronts():
    assert knee_kneedle(np.array([[1.0, 0.5]]), [False, True]) is None
    # Two distinct front points (plus a duplicate) are too few for Kneedle.
    two = np.array([[1.0, 0.5], [2.0, 0.9], [2.0, 0.9]])
    assert knee_kneedle(two, [False, True]) is None
    assert knee_utopia(two, [False, True]) in (0, 1)
    assert knee_utopia(np.full((3, 2), np.nan), [False, True]) is None
    assert knee_kneedle(np.full((3, 2), np.nan), [False, True]) is None
    assert knee_utopia(np.array([[3.0, 0.7]]), [False, True]) == 0
    # A straight front has no knee.
    line = np.column_stack([np.arange(5.0), np.arange(5.0) / 10])
    assert knee_kneedle(line, [False, True]) is None
    with pytest.raises(ValueError, match="exactly 2 objectives"):
        knee_kneedle(np.ones((4, 3)), [True, True, True])


def test_knees_of_analytic_convex_fronts():
    """Two fronts whose knee is known in closed form.

    Quarter circle x = cos t, y = sin t (t in [0, 90] degrees, both maximised): each
    objective spans [0, 1] over the front, so normalising changes nothing. The utopia point is
    (1, 1); the distance to it, sqrt((1 - cos t)^2 + (1 - sin t)^2) = sqrt(3 - 2(cos t + sin t)),
    is smallest where cos t + sin t = sqrt(2) sin(t + 45) is largest: t = 45 degrees. Kneedle's
    difference curve on normalised axes is (x + y) - 1 up to a constant, largest at the same t.

    y = 1 / x for x in [1/4, 4] (both minimised): the front is symmetric under x <-> y and both
    objectives span [1/4, 4]. The normalised distance to the utopia point (1/4, 1/4) and
    Kneedle's difference curve both depend on x + 1/x, smallest at x = 1.
    """
    degrees = np.arange(0.0, 91.0, 5.0)
    t = np.radians(degrees)
    circle = np.column_stack([np.cos(t), np.sin(t)])
    inside = np.array([[0.5, 0.5], [0.7, 0.1], [0.1, 0.7]])  # dominated points inside
    points = np.vstack([inside, circle])
    order = np.random.default_rng(5).permutation(len(points))
    points = points[order]
    knee = int(np.flatnonzero(order == len(inside) + 9)[0])  # t = 45 degrees
    np.testing.assert_allclose(points[knee], [math.sqrt(0.5), math.sqrt(0.5)])
    assert pareto_mask(points, [True, True]).sum() == len(circle)
    assert knee_utopia(points, [True, True]) == knee
    assert knee_kneedle(points, [True, True]) == knee

    x = 2.0 ** np.linspace(-2, 2, 17)  # 1/4 .. 4, x = 1 at index 8
    hyperbola = np.column_stack([x, 1 / x])
    points = np.vstack([hyperbola, hyperbola[::3] * 1.5])  # dominated copies further out
    assert knee_utopia(points, [False, False]) == 8
    assert knee_kneedle(points, [False, False]) == 8
    assert points[8].tolist() == [1.0, 1.0]


def test_topsis_hand_worked_example():
    # Criteria: c1 benefit (max), c2 cost (min); weights 3:1 -> 0.75, 0.25.
    #   A = (3, 6), B = (4, 0), C = (0, 8)
    # Vector normalisation: |c1| = sqrt(9 + 16 + 0) = 5, |c2| = sqrt(36 + 0 + 64) = 10
    #   r: A (0.6, 0.6), B (0.8, 0.0), C (0.0, 0.8)
    # Weighted v: A (0.45, 0.15), B (0.6, 0.0), C (0.0, 0.2)
    # Ideal (max c1, min c2) = (0.6, 0.0); anti-ideal = (0.0, 0.2)
    #   A: d+ = sqrt(0.15^2 + 0.15^2) = 0.212132, d- = sqrt(0.45^2 + 0.05^2) = sqrt(0.205)
    #      closeness = 0.452769 / (0.212132 + 0.452769) = 0.680957
    #   B: d+ = 0 -> 1;  C: d- = 0 -> 0
    points = np.array([[3.0, 6.0], [4.0, 0.0], [0.0, 8.0]])
    closeness = topsis(points, [True, False], weights=[3, 1])
    d_plus, d_minus = math.sqrt(2 * 0.15**2), math.sqrt(0.205)
    assert closeness[0] == pytest.approx(d_minus / (d_plus + d_minus))
    assert closeness[0] == pytest.approx(0.680957, abs=1e-6)
    assert closeness[1:] == pytest.approx([1.0, 0.0])
    # Equal weights: A is exactly halfway (v = (0.3, 0.3), ideal (0.4, 0), anti (0, 0.4)).
    assert topsis(points, [True, False])[0] == pytest.approx(0.5)


def test_topsis_three_criteria_hand_worked_through_select():
    """Three criteria: c1 = image_auroc (max), c2 = latency_ms (min), c3 = pixel_auroc (max).

        A = (1, 2, 2), B = (2, 1, 2), C = (2, 2, 1)
    Every column has norm sqrt(1 + 4 + 4) = 3, so r = value / 3.
    Weights 2:1:1 -> (1/2, 1/4, 1/4); v = r * w:
        A (1/6, 1/6, 1/6), B (1/3, 1/12, 1/6), C (1/3, 1/6, 1/12)
    Ideal (max, min, max) = (1/3, 1/12, 1/6); anti-ideal = (1/6, 1/6, 1/12).
        A: d+ = sqrt(1/36 + 1/144) = sqrt(5)/12, d- = 1/12  -> 1 / (sqrt(5) + 1) = 0.309017
        B: d+ = 0                                           -> 1
        C: d+ = sqrt(2)/12, d- = 1/6                        -> 2 / (sqrt(2) + 2) = 0.585786
    Equal weights (1/3 each): v = r / 3, ideal = B's v = (2/9, 1/9, 2/9), anti (1/9, 2/9, 1/9).
        A: d+ = sqrt(2)/9, d- = 1/9 -> 1 / (sqrt(2) + 1) = 0.414214; C the same; B: 1
    """
    agg = pd.DataFrame(
        {
            "model": ["A", "B", "C"],
            "n_seeds": 1,
            "image_auroc_mean": [1.0, 2.0, 2.0],
            "latency_ms_mean": [2.0, 1.0, 2.0],
            "pixel_auroc_mean": [2.0, 2.0, 1.0],
        }
    )
    objectives = [*OBJECTIVES, ("pixel_auroc", "max")]
    weighted = select(agg, objectives, weights={"image_auroc": 2})  # the others weigh 1
    assert weighted.table["topsis_closeness"].tolist() == pytest.approx(
        [1 / (math.sqrt(5) + 1), 1.0, 2 / (math.sqrt(2) + 2)]
    )
    assert weighted.table["topsis_closeness"][0] == pytest.approx(0.309017, abs=1e-6)
    assert weighted.weights == pytest.approx(
        {"image_auroc": 0.5, "latency_ms": 0.25, "pixel_auroc": 0.25}
    )
    assert weighted.picks["topsis"] == 1 and weighted.chosen == "topsis"
    equal = select(agg, objectives)
    assert equal.table["topsis_closeness"].tolist() == pytest.approx(
        [1 / (math.sqrt(2) + 1), 1.0, 1 / (math.sqrt(2) + 1)]
    )
    assert equal.weights is None


def test_weights_change_the_topsis_pick_and_are_validated():
    # A fast, weak model and a slow, strong one: weighting accuracy moves TOPSIS's pick.
    agg = _agg_from_points(np.array([[1.0, 0.70], [10.0, 0.99], [4.0, 0.75]]))
    fast = select(agg, OBJECTIVES, weights={"latency_ms": 10})
    strong = select(agg, OBJECTIVES, weights={"image_auroc": 10})
    assert fast.picks["topsis"] == 0 and strong.picks["topsis"] == 1
    assert strong.chosen == "topsis"
    assert any(n.startswith("weights image_auroc=10, latency_ms=1") for n in strong.notes)
    assert selection_to_dict(strong)["weights"] == pytest.approx(
        {"image_auroc": 10 / 11, "latency_ms": 1 / 11}
    )
    with pytest.raises(SweepError, match=r"'image_aurco' is not an objective; did you mean"):
        select(agg, OBJECTIVES, weights={"image_aurco": 2})
    for bad in (0, -1, float("nan"), "x"):
        with pytest.raises(SweepError, match="latency_ms="):
            select(agg, OBJECTIVES, weights={"latency_ms": bad})


def test_every_pick_is_tested_against_seed_noise():
    points, knee_row = _elbow_front()
    steady = select(_agg_from_points(points, std=1e-4), OBJECTIVES)
    assert steady.stability == {"kneedle": {}, "utopia": {}, "topsis": {}}
    assert [n.split(" pick ")[0] for n in steady.notes if n.startswith("uncertainty")] == [
        "uncertainty: the kneedle",  # the chosen method's note comes first
        "uncertainty: the utopia",
        "uncertainty: the topsis",
    ]
    noisy = select(_agg_from_points(points, std=0.05), OBJECTIVES)
    assert set(noisy.stability) == {"kneedle", "utopia", "topsis"}
    assert "image_auroc" in noisy.stability["kneedle"]
    moved = noisy.stability["kneedle"]["image_auroc"]
    assert moved != knee_row
    note = next(n for n in noisy.notes if n.startswith("uncertainty: the kneedle"))
    assert "changes within one seed-std" in note
    # The same check by hand: the knee moves one std down, every other point one std up.
    shifted = points.copy()
    shifted[:, 1] += 0.05
    shifted[knee_row, 1] -= 0.1
    assert knee_kneedle(shifted, [False, True]) == moved
    assert json.loads(json.dumps(selection_to_dict(noisy)))["stability"]["kneedle"] == {
        "image_auroc": moved
    }


def test_topsis_degenerate_and_bad_weights():
    assert topsis(np.array([[1.0, 2.0]]), [True, False]) == pytest.approx([0.5])
    nan_row = topsis(np.array([[1.0, 2.0], [np.nan, 1.0], [2.0, 3.0]]), [True, False])
    assert math.isnan(nan_row[1]) and np.isfinite(nan_row[[0, 2]]).all()
    assert np.isnan(topsis(np.full((2, 2), np.nan), [True, True])).all()
    with pytest.raises(ValueError, match="weights"):
        topsis(np.ones((2, 2)), [True, True], weights=[1.0, -1.0])


# -------------------------------------------------------------------------------- selection


def _agg_from_points(points, std=0.0, n_seeds=3):
    return pd.DataFrame(
        {
            "model": [f"m{i}" for i in range(len(points))],
            "backbone": "resnet18",
            "n_seeds": n_seeds,
            "latency_ms_mean": points[:, 0],
            "latency_ms_std": std,
            "image_auroc_mean": points[:, 1],
            "image_auroc_std": std,
        }
    )


OBJECTIVES = [("image_auroc", "max"), ("latency_ms", "min")]


def test_select_two_objectives_uses_kneedle():
    points, knee_row = _elbow_front()
    sel = select(_agg_from_points(points, std=1e-4), OBJECTIVES)
    assert sel.picks == {"kneedle": knee_row, "utopia": knee_row, "topsis": sel.picks["topsis"]}
    assert sel.chosen == "kneedle"
    assert sel.table["on_front"].sum() == 10 and len(sel.front) == 10
    assert sel.table.loc[knee_row, "knee_kneedle"] and sel.table["knee_kneedle"].sum() == 1
    assert sel.table.loc[sel.picks["topsis"], "on_front"]
    assert any("holds" in note for note in sel.notes)


def test_select_reports_a_pick_within_seed_noise():
    points, knee_row = _elbow_front()
    sel = select(_agg_from_points(points, std=0.05), OBJECTIVES)
    note = next(n for n in sel.notes if n.startswith("uncertainty"))
    assert f"row {knee_row} (m{knee_row}/resnet18) changes" in note
    assert "image_auroc (to row" in note


def test_select_falls_back_to_utopia_with_a_small_front():
    points = np.array([[5.0, 0.8], [20.0, 0.95], [30.0, 0.9]])
    sel = select(_agg_from_points(points, n_seeds=1), OBJECTIVES)
    assert sel.picks["kneedle"] is None and sel.chosen == "utopia"
    assert "kneedle: fewer than 3 distinct points on the front; utopia used" in sel.notes
    # Two front points, each best at one objective: equally far from utopia, the first shown.
    assert sel.picks["utopia"] == 0
    assert any(
        n.startswith("utopia: 2 distinct front points are equally near the utopia point")
        for n in sel.notes
    )
    elbow, _ = _elbow_front()
    assert not any(
        n.startswith("utopia:") for n in select(_agg_from_points(elbow), OBJECTIVES).notes
    )
    assert "uncertainty: one seed per configuration, no seed-std to test against" in sel.notes


def test_select_three_objectives_uses_topsis():
    rng = np.random.default_rng(1)
    agg = _agg_from_points(rng.random((8, 2)))
    agg["pixel_auroc_mean"] = rng.random(8)
    sel = select(agg, [*OBJECTIVES, ("pixel_auroc", "max")])
    assert sel.picks["kneedle"] is None and sel.chosen == "topsis"
    best = sel.table["topsis_closeness"].where(sel.table["on_front"]).idxmax()
    assert sel.picks["topsis"] == best


def test_select_degenerate_inputs_do_not_crash_and_serialise():
    one = select(_agg_from_points(np.array([[5.0, 0.8]])), OBJECTIVES)
    assert one.picks == {"kneedle": None, "utopia": 0, "topsis": 0}
    all_nan = select(_agg_from_points(np.full((3, 2), np.nan)), OBJECTIVES)
    assert all_nan.picks == {"kneedle": None, "utopia": None, "topsis": None}
    assert all_nan.chosen is None and all_nan.front.empty
    assert any("no front" in note for note in all_nan.notes)
    for sel in (one, all_nan):
        text = json.dumps(selection_to_dict(sel), allow_nan=False)
        assert json.loads(text)["objectives"][0] == {"metric": "image_auroc", "mode": "max"}


def test_selection_to_dict_round_trips_through_json():
    points, knee_row = _elbow_front()
    sel = select(_agg_from_points(points), OBJECTIVES)
    data = json.loads(json.dumps(selection_to_dict(sel), allow_nan=False))
    assert data["picks"]["kneedle"] == knee_row and data["chosen"] == "kneedle"
    assert data["front"] == [int(i) for i in np.flatnonzero(sel.table["on_front"])]
    assert data["table"][knee_row]["on_front"] is True
    nan_rows = [r for r in data["table"] if r["latency_ms_mean"] is None]
    assert len(nan_rows) == 1  # the NaN latency became null


def test_select_rejects_unknown_objectives():
    agg = _agg_from_points(np.ones((2, 2)))
    with pytest.raises(SweepError, match=r"'pixel_aupro'.*image_auroc, latency_ms"):
        select(agg, [("pixel_aupro", "max"), ("latency_ms", "min")])
    with pytest.raises(SweepError, match="mode must be"):
        select(agg, [("image_auroc", "up")])


def test_end_to_end_from_trial_rows():
    rows = [
        {
            "status": "ok",
            "model": m,
            "backbone": "r18",
            "seed": s,
            "image_auroc": a + s / 100,
            "latency_ms": t,
        }
        for (m, a, t), s in itertools.product(
            [("fast", 0.80, 2.0), ("mid", 0.95, 6.0), ("slow", 0.96, 40.0), ("bad", 0.7, 50.0)],
            range(3),
        )
    ]
    agg = aggregate_seeds(pd.DataFrame(rows), ["image_auroc", "latency_ms"])
    sel = select(agg, OBJECTIVES)
    front = set(sel.front["model"])
    assert front == {"fast", "mid", "slow"}
    assert sel.table.loc[sel.picks["kneedle"], "model"] == "mid"
