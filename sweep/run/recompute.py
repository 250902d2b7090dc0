"""Image-level metrics computed again from stored per-image results, without retraining.

Every scored trial keeps each validation and test image's label, defect and score in
``_images/<config_hash>.parquet`` (``sweep.results.IMAGE_SCHEMA``). :func:`recompute_output`
reads them back, chooses the image threshold again (the row's policy, or another one) and
rewrites each row's image-level columns: a metric added to the engine, or a different threshold
policy, reaches results that exist already. Pixel-level columns need the anomaly maps, which
are not stored; they stay as the trial computed them, and ``pixel_threshold_policy`` says with
which policy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from sweep.errors import SweepError
from sweep.results import ResultStore
from sweep.run.metrics import ThresholdPolicy, image_metrics

__all__ = ["RecomputeSummary", "recompute_output"]

_IMAGE_NOTE_PREFIXES = ("image_",)


@dataclass
class RecomputeSummary:
    """What :func:`recompute_output` did."""

    recomputed: list[str] = field(default_factory=list)
    """Config hashes of the rows rewritten."""
    without_images: list[str] = field(default_factory=list)
    """Scored rows with no per-image results (written before they existed): left as they were."""
    not_scored: int = 0
    """Error and stopped rows, which have no metrics to recompute."""
    policies: dict[str, int] = field(default_factory=dict)
    """Threshold policy -> rows recomputed with it."""


def _notes(old: str | None, image_notes: list[str]) -> str:
    """The row's NaN reasons with its image-level ones replaced."""
    kept = [n for n in (old or "").split("; ") if n and not n.startswith(_IMAGE_NOTE_PREFIXES)]
    return "; ".join([*image_notes, *kept])


def recompute_output(
    output: str,
    policy: ThresholdPolicy | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RecomputeSummary:
    """Recompute the image-level columns of every scored row of ``output`` that has per-image
    results, with ``policy`` (default: each row's own ``threshold_policy``); rows are
    rewritten atomically, one at a time, under the output's lock (a running sweep holds it, so
    the two never interleave). ``progress(done, total)`` is called after each row."""
    chosen = None if policy is None else ThresholdPolicy.parse(policy)
    store = ResultStore(output)
    summary = RecomputeSummary()
    rows = store.read()
    if rows.num_rows == 0:
        raise SweepError(f"results {output!r}: no trial rows found")
    statuses = rows.column("status").to_pylist()
    hashes = rows.column("config_hash").to_pylist()
    scored = [h for h, s in zip(hashes, statuses, strict=True) if s == "ok"]
    summary.not_scored = len(hashes) - len(scored)
    with store.lock():
        images = store.read_images(scored).to_pandas()
        by_trial = dict(tuple(images.groupby("config_hash"))) if len(images) else {}
        for done, digest in enumerate(scored, 1):
            table = by_trial.get(digest)
            if table is None:
                summary.without_images.append(digest)
            else:
                used = _recompute_row(store, digest, table, chosen)
                summary.recomputed.append(digest)
                summary.policies[used] = summary.policies.get(used, 0) + 1
            if progress is not None:
                progress(done, len(scored))
    return summary


def _recompute_row(store: ResultStore, digest: str, images, chosen: ThresholdPolicy | None) -> str:
    path = store.path_of(digest)
    table = pq.read_table(path, filesystem=store.fs)
    row = table.to_pylist()[0]
    policy = chosen or ThresholdPolicy.parse(row.get("threshold_policy") or "f1_max")
    val, test = images[images["split"] == "val"], images[images["split"] == "test"]
    values, notes = image_metrics(
        val["label"].to_numpy(), val["score"].to_numpy(),
        test["label"].to_numpy(), test["score"].to_numpy(),
        policy,
    )  # fmt: skip
    row.update(values)
    row["threshold_policy"] = str(policy)
    row["metric_notes"] = _notes(row.get("metric_notes"), notes)
    # Per-image results exist only beside rows written with every image column, so the row's
    # own schema holds them all.
    store.write_row(row, table.schema)
    return str(policy)
