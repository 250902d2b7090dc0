"""Trial results: one Parquet file (one row) per trial under the study's output.

Rows are written atomically (a temporary file renamed into place on local disks; object stores
publish whole objects), named by the trial's config hash, so a crash loses no finished trial,
a re-run finds what is already done, and the output directory is a Parquet dataset that pandas,
pyarrow and DuckDB read as it is. Everything else the engine writes under the output starts
with ``_`` or ``.``, which Parquet readers skip. The columns are documented in
``docs/results-schema.md``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, field_validator

from sweep.errors import SweepError, did_you_mean

METRICS: dict[str, Literal["max", "min"]] = {
    "image_auroc": "max",
    "image_f1": "max",
    "image_f1max": "max",
    "pixel_auroc": "max",
    "pixel_f1": "max",
    "pixel_f1max": "max",
    "pixel_aupro": "max",
    "image_ap": "max",
    "image_recall_p996": "max",
    "image_recall_p95": "max",
    "image_recall_p90": "max",
    "image_precision": "max",
    "image_recall": "max",
    "image_accuracy": "max",
    "image_fpr": "min",
    "image_fp_share": "min",
    "pixel_ap": "max",
    "pixel_iou": "max",
    "pixel_precision": "max",
    "pixel_recall": "max",
    "pixel_fpr": "min",
    "latency_ms": "min",
    "throughput_fps": "max",
    "train_s": "min",
    "params_trainable": "min",
    "params_total": "min",
    "peak_rss_mb": "min",
    "peak_gpu_mb": "min",
}
"""Metrics a study may use as objectives, with their natural direction."""


class Objective(BaseModel):
    """A metric a study optimises, and which way (its natural direction unless ``mode`` says)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str
    mode: Literal["max", "min"] | None = None

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        if metric not in METRICS:
            raise ValueError(
                f"unknown metric {metric!r}{did_you_mean(metric, METRICS)} "
                f"(known: {', '.join(METRICS)})"
            )
        return metric

    @property
    def direction(self) -> Literal["max", "min"]:
        return self.mode or METRICS[self.metric]


BASE_SCHEMA = pa.schema(
    [
        ("study", pa.string()),
        ("run_id", pa.string()),
        ("trial_id", pa.string()),
        ("config_hash", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("model", pa.string()),
        ("backbone", pa.string()),
        ("weights", pa.string()),
        ("parts", pa.string()),
        ("seed", pa.int64()),
        ("image_size", pa.int64()),
        ("epochs", pa.int64()),
        ("epochs_run", pa.int64()),
        ("dataset", pa.string()),
        ("category", pa.string()),
        ("augmentation", pa.string()),
        ("augmentation_spec", pa.string()),
        ("stress", pa.string()),
        ("stress_spec", pa.string()),
        ("split_seed", pa.int64()),
        ("test_fraction", pa.float64()),
        ("labelled_defects", pa.int64()),
        ("val_source", pa.string()),
        ("image_auroc", pa.float64()),
        ("image_f1", pa.float64()),
        ("image_f1max", pa.float64()),
        ("image_threshold", pa.float64()),
        ("pixel_auroc", pa.float64()),
        ("pixel_f1", pa.float64()),
        ("pixel_f1max", pa.float64()),
        ("pixel_threshold", pa.float64()),
        ("pixel_aupro", pa.float64()),
        ("image_ap", pa.float64()),
        ("image_recall_p996", pa.float64()),
        ("image_recall_p95", pa.float64()),
        ("image_recall_p90", pa.float64()),
        ("threshold_policy", pa.string()),
        ("image_precision", pa.float64()),
        ("image_recall", pa.float64()),
        ("image_accuracy", pa.float64()),
        ("image_fpr", pa.float64()),
        ("image_fp_share", pa.float64()),
        ("image_tp", pa.int64()),
        ("image_fp", pa.int64()),
        ("image_tn", pa.int64()),
        ("image_fn", pa.int64()),
        ("pixel_threshold_policy", pa.string()),
        ("pixel_ap", pa.float64()),
        ("pixel_iou", pa.float64()),
        ("pixel_precision", pa.float64()),
        ("pixel_recall", pa.float64()),
        ("pixel_fpr", pa.float64()),
        ("metric_notes", pa.string()),
        ("train_s", pa.float64()),
        ("latency_ms", pa.float64()),
        ("throughput_fps", pa.float64()),
        ("timing_exclusive", pa.bool_()),
        ("timing_wait_s", pa.float64()),
        ("timing_started_at", pa.timestamp("us", tz="UTC")),
        ("timing_finished_at", pa.timestamp("us", tz="UTC")),
        ("cache_hits", pa.int64()),
        ("cache_misses", pa.int64()),
        ("eval_batch_size", pa.int64()),
        ("retried_with_batch", pa.int64()),
        ("memory_bank_size", pa.int64()),
        ("params_trainable", pa.int64()),
        ("params_frozen", pa.int64()),
        ("params_total", pa.int64()),
        ("peak_rss_mb", pa.float64()),
        ("peak_gpu_mb", pa.float64()),
        ("n_train", pa.int64()),
        ("n_val", pa.int64()),
        ("n_test", pa.int64()),
        ("image_height", pa.int64()),
        ("image_width", pa.int64()),
        ("resize", pa.string()),
        ("source_sizes", pa.string()),
        ("aspect_change", pa.string()),
        ("roi", pa.string()),
        ("roi_sha256", pa.string()),
        ("roi_fraction", pa.float64()),
        ("n_relabelled", pa.int64()),
        ("device", pa.string()),
        ("hostname", pa.string()),
        ("versions", pa.string()),
        ("notes", pa.string()),
        ("trial_config", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("finished_at", pa.timestamp("us", tz="UTC")),
    ]
)
"""The fixed columns; ``hp.<name>`` columns (one per detector hyperparameter) follow them."""

HP_PREFIX = "hp."

IMAGES_DIR = "_images"
"""Where each trial's per-image results go: ``<output>/_images/<config_hash>.parquet``."""

MODELS_DIR = "_models"
"""Where kept fitted detectors go (``evaluation.keep_models``): ``<config_hash>.safetensors``
(every tensor of the fitted detector) and ``<config_hash>.json`` (how to build it again)."""

IMAGE_SCHEMA = pa.schema(
    [
        ("config_hash", pa.string()),
        ("split", pa.string()),
        ("index", pa.int64()),
        ("path", pa.string()),
        ("label", pa.int8()),
        ("defect", pa.string()),
        ("defect_pixels", pa.int64()),
        ("defect_fraction", pa.float64()),
        ("score", pa.float64()),
    ]
)
"""One row per validation and test image of a trial: which split and image, its label, defect
type and size (mask pixels at the trial's image size; null without a mask) and its score."""

STORAGE_TIMEOUT_S = 60.0
"""How long the driver waits for an object store to answer its checks before giving up."""

_T = TypeVar("_T")


def _within(timeout_s: float, call: Callable[[], _T]) -> _T:
    """``call()``, or TimeoutError after ``timeout_s``. Some clients (GCS without network
    access) retry for many minutes; the call goes on in a daemon thread that the process drops
    at exit."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="storage-check", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout_s} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def hp_column_types(values_by_name: Mapping[str, Iterable[Any]]) -> dict[str, pa.DataType]:
    """One Arrow type per hyperparameter, from every value it may take in a study.

    Each file of a study gets the same schema, so a reader that takes the first file's schema
    (pandas, DuckDB) sees every column. Integers mixed with floats become floats; anything
    else mixed, or any list value, becomes a string (lists as JSON).
    """
    types: dict[str, pa.DataType] = {}
    for name, values in values_by_name.items():
        kinds = {_kind(v) for v in values if v is not None}
        if not kinds:
            types[name] = pa.string()
        elif kinds == {"bool"}:
            types[name] = pa.bool_()
        elif kinds == {"int"}:
            types[name] = pa.int64()
        elif kinds <= {"int", "float"}:
            types[name] = pa.float64()
        else:
            types[name] = pa.string()
    return dict(sorted(types.items()))


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    return "str" if isinstance(value, str) else "json"


def row_schema(hp_types: Mapping[str, pa.DataType]) -> pa.Schema:
    """The schema of every row of a study."""
    return pa.schema(
        list(BASE_SCHEMA) + [pa.field(HP_PREFIX + name, t) for name, t in hp_types.items()]
    )


def _cell(value: Any, type_: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_string(type_):
        if isinstance(value, str):
            return value
        return (
            json.dumps(value, default=str) if isinstance(value, (list, tuple, dict)) else str(value)
        )
    if pa.types.is_floating(type_):
        return float(value)
    if pa.types.is_integer(type_):
        if isinstance(value, float) and (math.isnan(value) or not value.is_integer()):
            return None
        return int(value)
    return value


class ResultStore:
    """The Parquet rows of one study output (a local path or a ``s3://``/``gs://`` URI)."""

    def __init__(self, output: str | os.PathLike[str]):
        self.uri = str(output)
        try:
            if "://" in self.uri:
                self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
            else:
                self.fs, self.root = (
                    pafs.LocalFileSystem(),
                    str(Path(self.uri).expanduser().resolve()),
                )
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            raise SweepError(f"output {self.uri!r}: cannot open this location ({exc})") from None
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def path_of(self, config_hash: str) -> str:
        return f"{self.root}/{config_hash}.parquet"

    def ensure(self) -> None:
        """Create the output directory (and fail clearly if that is impossible)."""
        try:
            self.fs.create_dir(self.root, recursive=True)
        except OSError as exc:
            raise SweepError(f"output {self.uri!r}: cannot create it ({exc})") from None

    def check_reachable(self, timeout_s: float = STORAGE_TIMEOUT_S) -> None:
        """Ask the storage about the output without writing anything: an object store with no
        credentials, an unknown bucket or an endpoint that does not answer fails here, clearly,
        before any data is prepared or any trial runs."""
        if self.local:
            return
        try:
            _within(timeout_s, lambda: self.fs.get_file_info(self.root))
        except TimeoutError:
            raise SweepError(
                f"output {self.uri!r}: the storage did not answer within {timeout_s:.0f} s "
                "(no network route, or credentials the client keeps retrying?)"
            ) from None
        except OSError as exc:
            raise SweepError(f"output {self.uri!r}: cannot reach it ({exc})") from None

    def check_writable(self, timeout_s: float = STORAGE_TIMEOUT_S) -> None:
        """Create the output and write (then delete) a small object in it: the driver learns of
        a read-only location or missing write permission before any trial does."""
        probe = f"{self.root}/_probe-{uuid.uuid4().hex[:12]}"

        def write_and_delete() -> None:
            self.ensure()
            with self.fs.open_output_stream(probe) as stream:
                stream.write(b"anomaly-sweep write probe\n")
            self.fs.delete_file(probe)

        try:
            _within(timeout_s, write_and_delete)
        except TimeoutError:
            raise SweepError(
                f"output {self.uri!r}: the storage did not answer within {timeout_s:.0f} s"
            ) from None
        except OSError as exc:
            raise SweepError(f"output {self.uri!r}: cannot write there ({exc})") from None

    def write_file(self, name: str, data: bytes) -> str:
        """Write ``<output>/<name>`` whole (a temporary file renamed into place on local disks;
        object stores publish an object only once it is completely uploaded).

        The temporary file is hidden and not named like its final file: a writer killed before
        the rename leaves a ``.tmp-*.partial`` that no reader picks up (DuckDB's globs do match
        hidden ``*.parquet`` files) and the next run removes."""
        final = f"{self.root}/{name}"
        folder, _, base = final.rpartition("/")
        if folder != self.root:
            self.fs.create_dir(folder, recursive=True)
        if not self.local:
            with self.fs.open_output_stream(final) as stream:
                stream.write(data)
            return final
        tmp = f"{folder}/.tmp-{base}-{uuid.uuid4().hex[:8]}.partial"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return final

    def read_file(self, name: str) -> bytes | None:
        """The bytes of ``<output>/<name>``, or None when there is no such file."""
        path = f"{self.root}/{name}"
        try:
            if self.fs.get_file_info(path).type != pafs.FileType.File:
                return None
            with self.fs.open_input_stream(path) as stream:
                return stream.read()
        except OSError as exc:
            raise SweepError(f"output {self.uri!r}: cannot read {name} ({exc})") from None

    def remove_temporary_files(self) -> list[str]:
        """Delete the ``.tmp-*`` files a writer killed mid-write left behind (local outputs;
        object stores never show a partial object). Call it only while holding :meth:`lock`:
        another run's writers would otherwise lose their files."""
        if not self.local or not os.path.isdir(self.root):
            return []
        removed = []
        for entry in os.scandir(self.root):
            if entry.name.startswith(".tmp-") and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(entry.name)
        return removed

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the output for one driver: an exclusive ``flock`` on ``<output>/_lock`` (local
        outputs, NFS included), which the kernel drops when the holder dies, so a killed driver
        never leaves its output locked. A second driver on the same output fails at once.

        Object stores have no such lock: run one driver per output there.
        """
        if not self.local:
            yield
            return
        self.ensure()
        path = f"{self.root}/_lock"
        handle = open(path, "a+")  # noqa: SIM115 - held for the with-block
        try:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise SweepError(
                    f"output {self.uri!r} is in use by another sweep run ({holder}); wait for it "
                    "to finish, or give this run another --output"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
            yield
        finally:
            handle.close()

    def remove_results(self, folders: Iterable[str] = ()) -> int:
        """Delete every row and what the trials saved beside them (per-image results, kept
        models, ``folders`` such as example maps or an Optuna journal), so that a run can make
        them again; return how many rows went. Rows go last: an interrupted removal leaves rows
        that a later run still sees (and removes), never files of rows that are gone. Call it
        only while holding :meth:`lock`."""
        for folder in (IMAGES_DIR, MODELS_DIR, *folders):
            with contextlib.suppress(FileNotFoundError):
                self.fs.delete_dir(f"{self.root}/{folder}")
        rows = self._files()
        for path in rows:
            with contextlib.suppress(FileNotFoundError):
                self.fs.delete_file(path)
        return len(rows)

    def write_row(self, row: Mapping[str, Any], schema: pa.Schema) -> str:
        """Write one row atomically as ``<config_hash>.parquet``; return its path."""
        unknown = set(row) - set(schema.names)
        if unknown:
            raise ValueError(f"row has columns outside the schema: {sorted(unknown)}")
        arrays = [pa.array([_cell(row.get(f.name), f.type)], type=f.type) for f in schema]
        table = pa.Table.from_arrays(arrays, schema=schema)
        self.ensure()
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return self.write_file(f"{row['config_hash']}.parquet", sink.getvalue().to_pybytes())

    def write_images(self, config_hash: str, table: pa.Table) -> str:
        """Write a trial's per-image results (:data:`IMAGE_SCHEMA`; ``config_hash`` is set
        here) atomically as ``_images/<config_hash>.parquet``."""
        table = table.cast(IMAGE_SCHEMA)
        position = IMAGE_SCHEMA.get_field_index("config_hash")
        table = table.set_column(
            position, "config_hash", pa.array([config_hash] * table.num_rows, pa.string())
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return self.write_file(f"{IMAGES_DIR}/{config_hash}.parquet", sink.getvalue().to_pybytes())

    def write_model(self, config_hash: str, tensors: bytes, recipe: Mapping[str, Any]) -> str:
        """Keep a trial's fitted detector: its tensors (safetensors bytes) and ``recipe`` (the
        model name and ``models.create`` arguments), the recipe last, so that a recipe always
        has its tensors beside it."""
        self.write_file(f"{MODELS_DIR}/{config_hash}.safetensors", tensors)
        blob = json.dumps(dict(recipe), sort_keys=True, default=str, indent=1).encode()
        return self.write_file(f"{MODELS_DIR}/{config_hash}.json", blob)

    def kept_models(self) -> list[str]:
        """Config hashes with a kept fitted detector (recipe and tensors both there)."""
        folder = f"{self.root}/{MODELS_DIR}"
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        except OSError as exc:
            raise SweepError(f"output {self.uri!r}: cannot list {MODELS_DIR} ({exc})") from None
        names = {info.base_name for info in infos if info.type == pafs.FileType.File}
        return sorted(
            n.removesuffix(".json")
            for n in names
            if n.endswith(".json") and f"{n.removesuffix('.json')}.safetensors" in names
        )

    def remove_model(self, config_hash: str) -> None:
        """Delete a kept detector (recipe first, so a half-deleted one is never listed)."""
        for suffix in (".json", ".safetensors"):
            with contextlib.suppress(FileNotFoundError):
                self.fs.delete_file(f"{self.root}/{MODELS_DIR}/{config_hash}{suffix}")

    def read_images(self, config_hashes: Iterable[str] | None = None) -> pa.Table:
        """The per-image results of the trials ``config_hashes`` (default: all) that have
        them, concatenated; a trial without a file (an error row, an output written before
        they existed) contributes nothing."""
        folder = f"{self.root}/{IMAGES_DIR}"
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        except OSError as exc:
            raise SweepError(f"output {self.uri!r}: cannot list {IMAGES_DIR} ({exc})") from None
        wanted = None if config_hashes is None else {f"{h}.parquet" for h in config_hashes}
        files = sorted(
            info.path
            for info in infos
            if info.type == pafs.FileType.File
            and info.base_name.endswith(".parquet")
            and not info.base_name.startswith(".")
            and (wanted is None or info.base_name in wanted)
        )
        if not files:
            return IMAGE_SCHEMA.empty_table()
        return pads.dataset(files, schema=IMAGE_SCHEMA, filesystem=self.fs).to_table()

    def _files(self) -> list[str]:
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        except OSError as exc:
            raise SweepError(f"output {self.uri!r}: cannot list it ({exc})") from None
        return sorted(
            info.path
            for info in infos
            if info.type == pafs.FileType.File
            and info.base_name.endswith(".parquet")
            and not info.base_name.startswith((".", "_"))
        )

    def statuses(self) -> dict[str, str]:
        """config_hash -> status of every row already written."""
        files = self._files()
        if not files:
            return {}
        table = self._dataset(files).to_table(columns=["config_hash", "status"])
        return dict(
            zip(
                table.column("config_hash").to_pylist(),
                table.column("status").to_pylist(),
                strict=True,
            )
        )

    def read_row(self, config_hash: str) -> dict[str, Any] | None:
        path = self.path_of(config_hash)
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        return pq.read_table(path, filesystem=self.fs).to_pylist()[0]

    def _dataset(self, files: list[str]) -> pads.Dataset:
        schemas = [pq.read_schema(f, filesystem=self.fs) for f in files]
        return pads.dataset(files, schema=pa.unify_schemas(schemas), filesystem=self.fs)

    def read(self) -> pa.Table:
        """Every row, with the union of the files' columns."""
        files = self._files()
        if not files:
            return BASE_SCHEMA.empty_table()
        return self._dataset(files).to_table()


def write_atomically(path: str | os.PathLike[str], data: str | bytes, what: str) -> Path:
    """Write ``data`` (text as UTF-8) to a local ``path`` through a temporary file in the same
    folder and a rename (a report, an export: files the user names, not the study's output).

    Any failure (a parent that is a file, no permission, a full disk) is a SweepError naming
    ``what`` and the path, and leaves neither the temporary file nor a partial ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise SweepError(f"{what} {str(path)!r}: cannot write it ({exc.strerror or exc})") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path


def read_results(output: str | os.PathLike[str]):  # -> pandas.DataFrame
    """Every trial row of an output directory as a pandas DataFrame (error rows included)."""
    store = ResultStore(output)
    if store.local and not Path(store.root).is_dir():
        raise SweepError(f"results {store.uri!r}: no such directory")
    return store.read().to_pandas()


def read_images(output: str | os.PathLike[str], config_hashes: Iterable[str] | None = None):
    """The per-image results (``IMAGE_SCHEMA``) of an output's trials as a pandas DataFrame:
    all of them, or those of ``config_hashes``; empty (with the columns) when there are none."""
    store = ResultStore(output)
    if store.local and not Path(store.root).is_dir():
        raise SweepError(f"results {store.uri!r}: no such directory")
    return store.read_images(config_hashes).to_pandas()
