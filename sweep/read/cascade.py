"""``sweep cascade``: layered inspection and ensembles of configurations, from per-image results.

A line rarely runs one detector alone. A fast detector can pass the obviously good parts and
leave the rest to a slow, precise one (a two-stage *cascade*), or two or three detectors can
vote (*OR*, *AND*) or average their normalised scores. Every trial stores its validation and
test scores per image (``_images/<config_hash>.parquet``), so these combinations are evaluated
here without training anything again.

A *configuration* is a seed group of the output's clean ok rows (augmentation and stress
``none``), as :func:`sweep.read.analysis.aggregate_seeds` groups them. Every candidate is
evaluated once per seed that all its members ran (seed s of A with seed s of B: they saw the
same images), then reduced to mean ± std over those seeds. The rules (thresholds come from the
validation split only):

* **single**: the configuration at its row's ``image_threshold`` (chosen by the row's policy);
  latency is its row's ``latency_ms``.
* **cascade A -> B**: stage 1 (A) passes an image as good when its score is below ``t1``, the
  highest threshold that keeps at least ``stage1_recall`` of A's *validation* anomalies
  (:func:`stage1_threshold`: with 14 anomalies and 0.99 that is all 14, so ``t1`` is the lowest
  anomaly score). The images A flags go to B at B's ``image_threshold``; an image is anomalous
  when both flag it. Expected latency = ``latency_A + f * latency_B`` with ``f`` the share of
  *test* images stage 1 flags.
* **or / and**: anomalous when any / every member flags it at its own ``image_threshold``.
  Every member runs on every image: latency = the sum of the members' latencies.
* **average**: each member's scores become z-scores against its validation *normal* images
  (mean and population std; a std of 0 counts as 1), the z-scores are averaged, and the
  average is thresholded where its validation F1 is highest (:func:`f1_max_threshold`).
  Latency = the sum of the members' latencies.

Metrics on the test split: ``precision``, ``recall`` and ``f1`` of the decision at those
validation thresholds, and ``recall_at_p``: recall at precision >= P. For candidates with one
score (single, average) that is the most permissive *test* threshold reaching precision P (the
rows' ``image_recall_p*`` convention); a decision rule (cascade, or, and) has one operating
point, so its ``recall_at_p`` is its recall where its precision reaches P, else 0.

The candidates then join the single configurations on a Pareto front of the objective (F1 by
default, or recall at precision) against expected latency, with the knee picks of
:func:`sweep.read.analysis.select`.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from scipy.stats import rankdata

from sweep.errors import SweepError
from sweep.read import analysis
from sweep.results import read_images, read_results

__all__ = [
    "KINDS",
    "METRICS",
    "OBJECTIVES",
    "Member",
    "aggregate_candidates",
    "cascade_front",
    "cascade_output",
    "decision_metrics",
    "evaluate_average",
    "evaluate_cascade",
    "evaluate_single",
    "evaluate_vote",
    "f1_max_threshold",
    "load_members",
    "normalise",
    "per_seed_candidates",
    "print_cascade",
    "recall_at_precision",
    "stage1_threshold",
]

KINDS = ("single", "cascade", "or", "and", "average")
METRICS = ("recall_at_p", "f1", "precision", "recall", "latency_ms", "stage1_flagged")
"""Per-candidate metrics (``stage1_flagged``: the share of test images a cascade's first stage
sends on; NaN for other kinds)."""
OBJECTIVES = {"f1": "f1", "recall": "recall_at_p"}
"""``--objective`` -> the metric the front maximises (against ``latency_ms``, minimised)."""
CLEAN = "none"
NAN = float("nan")


# --------------------------------------------------------------------------- metrics (numpy)


def recall_at_precision(labels: np.ndarray, scores: np.ndarray, min_precision: float) -> float:
    """Highest recall of any threshold ``score >= t`` whose precision is >= ``min_precision``.

    Equal scores form one threshold. 0 when no threshold is that precise; NaN without
    anomalies. The same rule as the rows' ``image_recall_p*`` columns.
    """
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=float)
    positives = int(labels.sum())
    if positives == 0:
        return NAN
    order = np.argsort(-scores, kind="stable")
    ordered = scores[order]
    # The last position of each run of equal scores closes one threshold.
    ends = np.flatnonzero(np.r_[ordered[1:] != ordered[:-1], True])
    tp = np.cumsum(labels[order])[ends]
    precise = tp / (ends + 1) >= min_precision - 1e-12
    return float(tp[precise].max() / positives) if precise.any() else 0.0


def f1_max_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The highest threshold ``score >= t`` whose F1 is the best on ``labels``; NaN without
    anomalies."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=float)
    positives = int(labels.sum())
    if positives == 0:
        return NAN
    order = np.argsort(-scores, kind="stable")
    ordered = scores[order]
    ends = np.flatnonzero(np.r_[ordered[1:] != ordered[:-1], True])
    tp = np.cumsum(labels[order])[ends]
    f1 = 2.0 * tp / (ends + 1 + positives)
    return float(ordered[ends[int(np.argmax(f1))]])


def stage1_threshold(labels: np.ndarray, scores: np.ndarray, min_recall: float) -> float:
    """The highest threshold that flags at least ``min_recall`` of the anomalies (``score >=
    t``): the k-th highest anomaly score, k = ceil(min_recall x anomalies). NaN without
    anomalies."""
    labels = np.asarray(labels, dtype=bool)
    anomalous = np.sort(np.asarray(scores, dtype=float)[labels])[::-1]
    if anomalous.size == 0:
        return NAN
    k = max(1, math.ceil(min_recall * anomalous.size - 1e-9))
    return float(anomalous[min(k, anomalous.size) - 1])


def decision_metrics(labels: np.ndarray, flagged: np.ndarray) -> dict[str, float]:
    """``precision``, ``recall`` and ``f1`` of the decision ``flagged`` (precision NaN when
    nothing is flagged; recall and F1 NaN without anomalies)."""
    labels = np.asarray(labels, dtype=bool)
    flagged = np.asarray(flagged, dtype=bool)
    tp, n_flagged, positives = int((labels & flagged).sum()), int(flagged.sum()), int(labels.sum())
    return {
        "precision": tp / n_flagged if n_flagged else NAN,
        "recall": tp / positives if positives else NAN,
        "f1": 2.0 * tp / (n_flagged + positives) if positives else NAN,
    }


def normalise(val_labels: np.ndarray, val_scores: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``scores`` as z-scores against the validation normal images (population std; a std of
    0 counts as 1, so a constant member only shifts); NaN without validation normals."""
    normal = np.asarray(val_scores, dtype=float)[~np.asarray(val_labels, dtype=bool)]
    if normal.size == 0:
        return np.full(np.shape(scores), NAN)
    spread = float(normal.std())
    return (np.asarray(scores, dtype=float) - normal.mean()) / (spread if spread > 0 else 1.0)


# --------------------------------------------------------------------------- candidates


@dataclass(frozen=True)
class Member:
    """One trial (a configuration at one seed): its per-image scores, threshold and latency."""

    name: str
    val_labels: np.ndarray
    val_scores: np.ndarray
    test_labels: np.ndarray
    test_scores: np.ndarray
    threshold: float
    """The row's ``image_threshold`` (chosen on validation by the row's policy)."""
    latency_ms: float
    images: tuple = ()
    """What identifies the images (paths per split); members pair only where it is equal."""


def _decision_row(
    labels: np.ndarray, flagged: np.ndarray, min_precision: float
) -> dict[str, float]:
    row = decision_metrics(labels, flagged)
    precise = row["precision"] >= min_precision - 1e-12
    row["recall_at_p"] = row["recall"] if precise else (NAN if math.isnan(row["recall"]) else 0.0)
    return row


def evaluate_single(member: Member, min_precision: float) -> dict[str, float]:
    """A configuration alone at its row's threshold."""
    row = decision_metrics(member.test_labels, member.test_scores >= member.threshold)
    if math.isnan(member.threshold):
        row = {k: NAN for k in row}
    row["recall_at_p"] = recall_at_precision(member.test_labels, member.test_scores, min_precision)
    return {**row, "latency_ms": member.latency_ms, "stage1_flagged": NAN}


def evaluate_cascade(
    first: Member, second: Member, min_precision: float, stage1_recall: float
) -> dict[str, float]:
    """``first -> second``: stage 1 at :func:`stage1_threshold` on its validation scores,
    stage 2 at its row's threshold; anomalous when both flag."""
    t1 = stage1_threshold(first.val_labels, first.val_scores, stage1_recall)
    passed_on = first.test_scores >= t1
    if math.isnan(t1) or math.isnan(second.threshold):
        return dict.fromkeys(METRICS, NAN)
    flagged = passed_on & (second.test_scores >= second.threshold)
    share = float(passed_on.mean())
    return {
        **_decision_row(first.test_labels, flagged, min_precision),
        "latency_ms": first.latency_ms + share * second.latency_ms,
        "stage1_flagged": share,
    }


def evaluate_vote(members: Sequence[Member], rule: str, min_precision: float) -> dict[str, float]:
    """``rule`` ``or`` (any member flags) or ``and`` (every member flags), each member at its
    row's threshold."""
    if any(math.isnan(m.threshold) for m in members):
        return dict.fromkeys(METRICS, NAN) | {"latency_ms": sum(m.latency_ms for m in members)}
    votes = np.stack([m.test_scores >= m.threshold for m in members])
    flagged = votes.any(axis=0) if rule == "or" else votes.all(axis=0)
    return {
        **_decision_row(members[0].test_labels, flagged, min_precision),
        "latency_ms": float(sum(m.latency_ms for m in members)),
        "stage1_flagged": NAN,
    }


def evaluate_average(members: Sequence[Member], min_precision: float) -> dict[str, float]:
    """The mean of the members' :func:`normalise`-d scores, thresholded at its validation
    F1-max."""
    val = np.mean([normalise(m.val_labels, m.val_scores, m.val_scores) for m in members], axis=0)
    test = np.mean([normalise(m.val_labels, m.val_scores, m.test_scores) for m in members], axis=0)
    labels = members[0].test_labels
    latency = float(sum(m.latency_ms for m in members))
    if not np.all(np.isfinite(val)) or not np.all(np.isfinite(test)):
        return dict.fromkeys(METRICS, NAN) | {"latency_ms": latency}
    threshold = f1_max_threshold(members[0].val_labels, val)
    row = decision_metrics(labels, test >= threshold)
    if math.isnan(threshold):
        row = {k: NAN for k in row}
    row["recall_at_p"] = recall_at_precision(labels, test, min_precision)
    return {**row, "latency_ms": latency, "stage1_flagged": NAN}


def _paired(members: Sequence[Member]) -> bool:
    first = members[0]
    return all(
        m.images == first.images
        and np.array_equal(m.val_labels, first.val_labels)
        and np.array_equal(m.test_labels, first.test_labels)
        for m in members[1:]
    )


def per_seed_candidates(
    members: dict[str, dict[int, Member]],
    *,
    min_precision: float = 0.95,
    stage1_recall: float = 0.99,
    max_members: int = 3,
) -> tuple[pd.DataFrame, list[str]]:
    """Every candidate at every seed its members share: one row per (candidate, seed).

    ``members``: configuration name -> seed -> :class:`Member`; ``max_members`` 1: singles
    only. Columns ``candidate``,
    ``kind``, ``members`` (JSON list), ``seed`` and :data:`METRICS`. Also returns notes (seeds
    left out because the members scored different images).
    """
    names = sorted(members)  # an ensemble's name does not depend on the input's order
    combos: list[tuple[str, tuple[str, ...]]] = [("single", (n,)) for n in names]
    if max_members >= 2:
        combos += [("cascade", pair) for pair in itertools.permutations(names, 2)]
    for size in range(2, max_members + 1):
        for group in itertools.combinations(names, size):
            combos += [(kind, group) for kind in ("or", "and", "average")]
    rows, unpaired = [], 0
    for kind, group in combos:
        seeds = sorted(set.intersection(*(set(members[n]) for n in group)))
        for seed in seeds:
            trial = [members[n][seed] for n in group]
            if not _paired(trial):
                unpaired += 1
                continue
            if kind == "single":
                metrics = evaluate_single(trial[0], min_precision)
            elif kind == "cascade":
                metrics = evaluate_cascade(trial[0], trial[1], min_precision, stage1_recall)
            elif kind == "average":
                metrics = evaluate_average(trial, min_precision)
            else:
                metrics = evaluate_vote(trial, kind, min_precision)
            rows.append(
                {
                    "candidate": _candidate_name(kind, group),
                    "kind": kind,
                    "members": json.dumps(list(group)),
                    "seed": seed,
                    **metrics,
                }
            )
    notes = []
    if unpaired:
        notes.append(
            f"{unpaired} candidate seed(s) left out: their members scored different images"
        )
    columns = ["candidate", "kind", "members", "seed", *METRICS]
    return pd.DataFrame(rows, columns=columns), notes


def _candidate_name(kind: str, group: Sequence[str]) -> str:
    if kind == "single":
        return group[0]
    if kind == "cascade":
        return f"{group[0]} -> {group[1]}"
    if kind == "average":
        return f"mean({', '.join(group)})"
    return f" {'|' if kind == 'or' else '&'} ".join(group)


def aggregate_candidates(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std over seeds per candidate (:func:`sweep.read.analysis.aggregate_seeds`), in
    :data:`KINDS` order, then by name."""
    agg = analysis.aggregate_seeds(per_seed, METRICS, by=["candidate", "kind", "members"])
    if agg.empty:
        return agg
    agg["_kind"] = agg["kind"].map(KINDS.index)
    return agg.sort_values(["_kind", "candidate"]).drop(columns="_kind").reset_index(drop=True)


def cascade_front(agg: pd.DataFrame, objective: str = "f1") -> analysis.Selection:
    """The Pareto front of ``objective`` (a key of :data:`OBJECTIVES`) against expected
    latency, with the knee picks."""
    return analysis.select(agg, [(OBJECTIVES[objective], "max"), ("latency_ms", "min")])


# --------------------------------------------------------------------------- the output


def _is_clean(rows: pd.DataFrame, column: str) -> pd.Series:
    if column not in rows.columns:
        return pd.Series(True, index=rows.index)
    return rows[column].isna() | (rows[column] == CLEAN)


def _cell(value: Any) -> Any:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _configuration_names(rows: pd.DataFrame, by: list[str]) -> pd.Series:
    """``model/backbone``, plus ``key=value`` for each configuration column that tells apart
    configurations sharing it."""
    base = rows["model"].astype(str)
    # The backbone only where it tells configurations apart: one shared by all is noise.
    if "backbone" in rows.columns and rows["backbone"].map(_cell).nunique(dropna=False) > 1:
        base = base + rows["backbone"].map(lambda b: "" if _cell(b) is None else f"/{b}")
    keys = rows[by].apply(lambda r: json.dumps([_cell(v) for v in r], default=str), axis=1)
    names = base.copy()
    for name in base.unique():
        same = base == name
        if keys[same].nunique() < 2:
            continue
        varying = [
            c
            for c in by
            if c not in ("model", "backbone")
            and rows.loc[same, c].map(lambda v: json.dumps(_cell(v), default=str)).nunique() > 1
        ]
        suffixes = [
            "".join(f" {c.removeprefix('hp.')}={_cell(values[c])}" for c in varying)
            for values in rows.loc[same, varying].to_dict(orient="records")
        ]
        names[same] = name + pd.Series(suffixes, index=names[same].index)
    return names


def _number(value: Any) -> float:
    value = _cell(value)
    return NAN if value is None else float(value)


def _validation_auroc(member: Member) -> float:
    labels = member.val_labels.astype(bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if not positives or not negatives:
        return NAN
    ranks = rankdata(member.val_scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def load_members(output: str | Path) -> tuple[dict[str, dict[int, Member]], list[str]]:
    """The clean ok trials of ``output`` with per-image results, as configuration name ->
    seed -> :class:`Member`, and notes on what was left out."""
    rows = read_results(output)
    if rows.empty:
        raise SweepError(f"results {str(output)!r}: no trial rows found")
    for column in ("status", "config_hash", "seed", "model"):
        if column not in rows.columns:
            raise SweepError(f"results {str(output)!r}: no column {column!r}")
    notes = []
    ok = rows[rows["status"] == "ok"]
    clean = ok[_is_clean(ok, "augmentation") & _is_clean(ok, "stress")]
    if len(clean) < len(ok):
        notes.append(
            f"{len(ok) - len(clean)} ok row(s) with an augmentation or a stress left out "
            "(candidates combine clean configurations)"
        )
    images = read_images(output, clean["config_hash"].tolist())
    with_images = clean[clean["config_hash"].isin(set(images["config_hash"]))]
    if len(with_images) < len(clean):
        notes.append(f"{len(clean) - len(with_images)} ok row(s) without per-image results")
    if with_images.empty:
        raise SweepError(
            f"results {str(output)!r}: no clean ok trial with per-image results "
            "(_images/<config_hash>.parquet) to combine"
        )
    with_images = with_images.sort_values(
        "finished_at" if "finished_at" in with_images.columns else "config_hash"
    )
    by = analysis.config_columns(with_images)
    names = _configuration_names(with_images, by)
    by_trial = {h: g for h, g in images.groupby("config_hash", sort=False)}
    members: dict[str, dict[int, Member]] = {}
    for (_, row), name in zip(with_images.iterrows(), names, strict=True):
        trial = by_trial[row["config_hash"]].sort_values(["split", "index"])
        val, test = trial[trial["split"] == "val"], trial[trial["split"] == "test"]
        members.setdefault(name, {})[int(row["seed"])] = Member(  # a repeat: the latest counts
            name=name,
            val_labels=val["label"].to_numpy(dtype=bool),
            val_scores=val["score"].to_numpy(dtype=float),
            test_labels=test["label"].to_numpy(dtype=bool),
            test_scores=test["score"].to_numpy(dtype=float),
            threshold=_number(row.get("image_threshold")),
            latency_ms=_number(row.get("latency_ms")),
            images=(tuple(val["path"]), tuple(test["path"])),
        )
    return members, notes


def cascade_output(
    output: str | Path,
    *,
    min_precision: float = 0.95,
    stage1_recall: float = 0.99,
    max_members: int = 3,
    top: int = 8,
    objective: str = "f1",
) -> dict:
    """Evaluate the cascades and ensembles of ``output``'s configurations (JSON-able dict).

    ``top``: only the ``top`` configurations with the highest mean validation AUROC are
    combined (every configuration is still listed as a single), so the number of candidates
    stays bounded. Keys: ``output``, ``settings``, ``configurations`` (name, seeds, latency,
    validation AUROC, combined or not), ``candidates`` (the aggregated table with
    ``on_front`` and ``knee_*`` flags), ``front`` (candidate names), ``picks``, ``chosen``,
    ``notes``.
    """
    if not 0 < min_precision <= 1:
        raise SweepError(f"--precision {min_precision!r}: must be in (0, 1]")
    if not 0 < stage1_recall <= 1:
        raise SweepError(f"--stage1-recall {stage1_recall!r}: must be in (0, 1]")
    if max_members < 2:
        raise SweepError(f"--max-members {max_members!r}: at least 2")
    if top < 1:
        raise SweepError(f"--top {top!r}: at least 1")
    if objective not in OBJECTIVES:
        raise SweepError(f"--objective {objective!r}: one of {', '.join(OBJECTIVES)}")
    members, notes = load_members(output)
    auroc = {
        name: float(np.nanmean([_validation_auroc(m) for m in seeds.values()]))
        if any(not math.isnan(_validation_auroc(m)) for m in seeds.values())
        else NAN
        for name, seeds in members.items()
    }
    ranked = sorted(members, key=lambda n: (-np.nan_to_num(auroc[n], nan=-1.0), n))
    combined = set(ranked[:top])
    if len(members) > top:
        notes.append(
            f"{len(members) - top} configuration(s) outside the top {top} by validation AUROC "
            "are shown alone, not combined (--top)"
        )
    singles, single_notes = per_seed_candidates(
        {n: s for n, s in members.items() if n not in combined}, min_precision=min_precision,
        stage1_recall=stage1_recall, max_members=1,
    )  # fmt: skip
    combos, combo_notes = per_seed_candidates(
        {n: members[n] for n in ranked[:top]},
        min_precision=min_precision,
        stage1_recall=stage1_recall,
        max_members=max_members,
    )
    notes += single_notes + combo_notes
    per_seed = pd.concat([singles, combos], ignore_index=True)
    agg = aggregate_candidates(per_seed)
    selection = cascade_front(agg, objective)
    table = selection.table
    # select() names rows by their label; here a row is a candidate.
    notes += [
        re.sub(r"\brow (\d+)(?: \([^)]*\))?", lambda m: table.at[int(m[1]), "candidate"], line)
        for line in selection.notes
    ]
    return {
        "output": str(output),
        "settings": {
            "precision": min_precision,
            "stage1_recall": stage1_recall,
            "max_members": max_members,
            "top": top,
            "objective": OBJECTIVES[objective],
        },
        "configurations": [
            {
                "name": name,
                "seeds": sorted(seeds),
                "latency_ms": float(np.nanmean([m.latency_ms for m in seeds.values()])),
                "val_auroc": None if math.isnan(auroc[name]) else auroc[name],
                "combined": name in combined,
            }
            for name, seeds in ((n, members[n]) for n in ranked)
        ],
        "candidates": [
            {k: analysis.jsonable(v) for k, v in row.items()}
            | {"members": json.loads(row["members"])}
            for row in table.to_dict(orient="records")
        ],
        "front": table.loc[table["on_front"], "candidate"].tolist(),
        "picks": {
            method: None if row is None else str(table.at[row, "candidate"])
            for method, row in selection.picks.items()
        },
        "chosen": selection.chosen,
        "notes": notes,
    }


# --------------------------------------------------------------------------- printing


def _fmt(mean: Any, std: Any, digits: int) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" if not std else f"{mean:.{digits}f} ± {std:.{digits}f}"


def print_cascade(result: dict, console: Console, limit: int = 15) -> None:
    """The candidates (singles, the front, and the ``limit`` best others by the objective) as
    a table, then the front and the picks."""
    settings = result["settings"]
    objective = settings["objective"]
    candidates = result["candidates"]
    chosen = result["picks"].get(result["chosen"]) if result["chosen"] else None
    best = sorted(
        (c for c in candidates if c["kind"] != "single" and not c["on_front"]),
        key=lambda c: -(c.get(f"{objective}_mean") or -1.0),
    )[:limit]
    shown = [c for c in candidates if c["kind"] == "single" or c["on_front"]] + best
    shown.sort(key=lambda c: (not c["on_front"], -(c.get(f"{objective}_mean") or -1.0)))
    p = settings["precision"]
    table = Table(
        title=f"{len(shown)} of {len(candidates)} candidate(s) (mean ± std over the seeds all "
        f"members ran; thresholds from validation; stage 1 keeps >= {settings['stage1_recall']:g}"
        f" of validation anomalies; ★ = on the front of {objective} vs latency)",
        title_justify="left",
    )
    for column in ("", "candidate", "kind", "seeds", f"recall@P{p:g}", "F1", "precision"):
        table.add_column(column, justify="left" if column in ("candidate", "kind") else "right")
    for column in ("recall", "latency ms", "stage 1 flags"):
        table.add_column(column, justify="right")
    for c in shown:
        mark = "★" if c["on_front"] else ""
        name = escape(c["candidate"])
        if c["candidate"] == chosen:
            name = f"[bold]{name}[/bold] (pick)"
        table.add_row(
            mark,
            name,
            c["kind"],
            str(c["n_seeds"]),
            _fmt(c["recall_at_p_mean"], c["recall_at_p_std"], 3),
            _fmt(c["f1_mean"], c["f1_std"], 3),
            _fmt(c["precision_mean"], c["precision_std"], 3),
            _fmt(c["recall_mean"], c["recall_std"], 3),
            _fmt(c["latency_ms_mean"], c["latency_ms_std"], 1),
            _fmt(c["stage1_flagged_mean"], c["stage1_flagged_std"], 2),
        )
    console.print(table)
    console.print(
        f"front ({objective} max, latency_ms min): " + escape("; ".join(result["front"]) or "none"),
        highlight=False,
    )
    for method, pick in result["picks"].items():
        if pick is not None:
            star = " (chosen)" if method == result["chosen"] else ""
            console.print(f"{method} pick{star}: {escape(pick)}", highlight=False)
    for line in result["notes"]:
        console.print(f"note: {escape(line)}", highlight=False)
