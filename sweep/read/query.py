"""``sweep results``: filter a study's rows and export them.

A ``--where`` condition is one comparison, ``COLUMN OP VALUE``; repeated conditions must all
hold (AND). The grammar is small on purpose: nothing in it is evaluated as code, every column
is checked against the rows' columns, and every value is parsed against its column's type.

======================  ====================================================================
``OP``                  meaning
======================  ====================================================================
``==`` (or ``=``)       equal
``!=``                  not equal
``<  <=  >  >=``        order (numbers, text, timestamps such as ``2025-06-01``)
``in`` / ``not in``     one of a comma-separated list: ``model in patchcore,padim``
``~``                   text contains a match of a regular expression: ``error ~ memory``
``is null``             no value (``is not null``: a value)
======================  ====================================================================

A value may be quoted (``'...'`` or ``"..."``) to keep spaces or commas. A row whose value is
missing (null, NaN) satisfies no comparison, ``!=`` and ``not in`` included, only
``is null`` (SQL's rule).
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sweep.errors import SweepError, did_you_mean
from sweep.read.analysis import jsonable
from sweep.results import write_atomically

__all__ = [
    "FORMATS",
    "TABLE_COLUMNS",
    "Condition",
    "apply_where",
    "export_rows",
    "parse_condition",
    "pick_columns",
    "sort_rows",
]

FORMATS = ("table", "csv", "json", "parquet")
TABLE_COLUMNS = (
    "status",
    "model",
    "backbone",
    "image_size",
    "seed",
    "augmentation",
    "stress",
    "image_auroc",
    "image_f1",
    "pixel_auroc",
    "pixel_f1",
    "pixel_aupro",
    "latency_ms",
    "train_s",
)
"""What ``--format table`` shows without ``--columns`` (variant columns only when used)."""

_WORD_OPS = r"not\s+in|in|is\s+not|is"
_SYMBOL_OPS = r"==|!=|<=|>=|=|<|>|~"
_CONDITION = re.compile(
    rf"^\s*(?P<column>[A-Za-z_][\w.]*)"
    rf"(?:\s*(?P<symbol>{_SYMBOL_OPS})\s*|\s+(?P<word>{_WORD_OPS})\s+)"
    rf"(?P<value>.*?)\s*$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Condition:
    """One parsed ``--where`` condition."""

    text: str
    column: str
    op: str
    """``==``, ``!=``, ``<``, ``<=``, ``>``, ``>=``, ``in``, ``not in``, ``~``, ``is null``,
    ``is not null``."""
    values: tuple[str, ...]
    """The raw value(s), quotes removed (several only for ``in`` / ``not in``)."""


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _split_list(text: str) -> list[str]:
    """``a, 'b c', "d,e"`` -> ['a', 'b c', 'd,e']; brackets around the list are optional."""
    text = text.strip()
    if text.startswith(("[", "(")) and text.endswith(("]", ")")):
        text = text[1:-1]
    items, current, quote = [], "", ""
    for char in text:
        if quote:
            if char == quote:
                quote = ""
            else:
                current += char
        elif char in "'\"":
            quote = char
        elif char == ",":
            items.append(current.strip())
            current = ""
        else:
            current += char
    if quote:
        raise ValueError("an unclosed quote")
    items.append(current.strip())
    return [item for item in items if item != ""]


def parse_condition(text: str) -> Condition:
    """Parse ``COLUMN OP VALUE`` (see the module's table); a SweepError says what is wrong."""
    match = _CONDITION.match(text)
    if not match:
        raise SweepError(
            f"--where {text!r}: expected COLUMN OP VALUE, e.g. 'image_auroc >= 0.9', "
            "'model in patchcore,padim', 'error is null' "
            "(OP: == != < <= > >= in, not in, ~, is null, is not null)"
        )
    column, value = match["column"], match["value"]
    op = match["symbol"] or " ".join(match["word"].lower().split())
    op = "==" if op == "=" else op
    if op in ("is", "is not"):
        if value.lower() != "null":
            raise SweepError(f"--where {text!r}: '{op}' takes 'null' ({column} {op} null)")
        return Condition(text, column, f"{op} null", ())
    if value == "":
        raise SweepError(f"--where {text!r}: no value after {op!r}")
    if op in ("in", "not in"):
        try:
            values = _split_list(value)
        except ValueError as exc:
            raise SweepError(f"--where {text!r}: {exc}") from None
        if not values:
            raise SweepError(f"--where {text!r}: an empty list after {op!r}")
        return Condition(text, column, op, tuple(values))
    return Condition(text, column, op, (_unquote(value),))


def _check_column(df: pd.DataFrame, column: str, what: str) -> None:
    if column not in df.columns:
        raise SweepError(
            f"{what}: no column {column!r}{did_you_mean(column, map(str, df.columns))} "
            "(columns: docs/results-schema.md)"
        )


def _typed(series: pd.Series, raw: str, condition: Condition) -> Any:
    """``raw`` as a value comparable with ``series``, or a SweepError naming the column."""
    dtype = series.dtype
    known = series.dropna()
    if pd.api.types.is_object_dtype(dtype) and len(
        known
    ):  # an all-null or nullable column: go by the values
        if all(isinstance(v, (bool, np.bool_)) for v in known):
            dtype = np.dtype(bool)
        elif all(isinstance(v, (int, float, np.number)) for v in known):
            dtype = np.dtype(float)
    if pd.api.types.is_bool_dtype(dtype):
        lowered = raw.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise SweepError(
            f"--where {condition.text!r}: {condition.column} is true/false, not {raw!r}"
        )
    if pd.api.types.is_numeric_dtype(dtype):
        try:
            return float(raw)
        except ValueError:
            raise SweepError(
                f"--where {condition.text!r}: {condition.column} holds numbers; {raw!r} is not one"
            ) from None
    if pd.api.types.is_datetime64_any_dtype(dtype):
        try:
            stamp = pd.Timestamp(raw)
        except ValueError:
            raise SweepError(
                f"--where {condition.text!r}: {condition.column} holds timestamps; "
                f"{raw!r} is not one (e.g. 2025-06-01 or 2025-06-01T12:00)"
            ) from None
        tz = getattr(dtype, "tz", None)
        if tz is not None and stamp.tzinfo is None:
            stamp = stamp.tz_localize(tz)
        return stamp
    return raw


def _mask(df: pd.DataFrame, condition: Condition) -> pd.Series:
    series = df[condition.column]
    present = series.notna()
    if condition.op == "is null":
        return ~present
    if condition.op == "is not null":
        return present
    if condition.op == "~":
        try:
            pattern = re.compile(condition.values[0])
        except re.error as exc:
            raise SweepError(
                f"--where {condition.text!r}: bad regular expression ({exc})"
            ) from None
        text = series.map(lambda v: "" if v is None else str(v))
        return present & text.map(lambda v: bool(pattern.search(v)))
    values = [_typed(series, raw, condition) for raw in condition.values]
    if condition.op in ("in", "not in"):
        inside = series.isin(values)
        return present & (inside if condition.op == "in" else ~inside)
    value = values[0]
    operator = {
        "==": "__eq__",
        "!=": "__ne__",
        "<": "__lt__",
        "<=": "__le__",
        ">": "__gt__",
        ">=": "__ge__",
    }[condition.op]
    result = pd.Series(False, index=df.index)
    known = series[present]
    try:
        result[present] = getattr(known, operator)(value).to_numpy(dtype=bool)
    except TypeError:
        raise SweepError(
            f"--where {condition.text!r}: cannot compare {condition.column}'s values with {value!r}"
        ) from None
    return result


def apply_where(df: pd.DataFrame, where: Sequence[str]) -> pd.DataFrame:
    """The rows of ``df`` that satisfy every condition (each parsed by :func:`parse_condition`)."""
    conditions = [parse_condition(text) for text in where]
    mask = pd.Series(True, index=df.index)
    for condition in conditions:
        _check_column(df, condition.column, f"--where {condition.text!r}")
        mask &= _mask(df, condition)
    return df[mask]


def pick_columns(df: pd.DataFrame, columns: Sequence[str] | None, table: bool) -> list[str]:
    """``--columns`` (names or globs such as ``hp.*``, comma-separated) in the order given.

    Without ``--columns``: every column, or :data:`TABLE_COLUMNS` for a table (variant columns
    only where a row uses a variant).
    """
    names = [c.strip() for text in columns or [] for c in text.split(",") if c.strip()]
    if not names:
        if not table:
            return list(df.columns)
        shown = []
        for column in TABLE_COLUMNS:
            if column not in df.columns:
                continue
            if (
                column in ("augmentation", "stress")
                and not (df[column].fillna("none") != "none").any()
            ):
                continue
            shown.append(column)
        return shown
    picked: list[str] = []
    for name in names:
        if any(ch in name for ch in "*?["):
            matches = [c for c in df.columns if fnmatch.fnmatchcase(str(c), name)]
            if not matches:
                raise SweepError(f"--columns {name!r}: matches no column")
        else:
            _check_column(df, name, "--columns")
            matches = [name]
        picked.extend(c for c in matches if c not in picked)
    return picked


def sort_rows(df: pd.DataFrame, sort: Sequence[str] | None) -> pd.DataFrame:
    """``--sort col`` ascending, ``--sort -col`` descending; missing values last."""
    keys = [k.strip() for text in sort or [] for k in text.split(",") if k.strip()]
    if not keys:
        return df
    columns, ascending = [], []
    for key in keys:
        name = key.removeprefix("-")
        _check_column(df, name, "--sort")
        columns.append(name)
        ascending.append(not key.startswith("-"))
    try:
        return df.sort_values(columns, ascending=ascending, na_position="last", kind="stable")
    except TypeError:
        raise SweepError(
            f"--sort {','.join(keys)}: a column mixes types that do not order"
        ) from None


def rows_as_json(df: pd.DataFrame) -> str:
    """One JSON list of row objects (nulls for NaN, ISO timestamps)."""
    records = [
        {str(k): jsonable(v) for k, v in row.items()} for row in df.to_dict(orient="records")
    ]
    return json.dumps(records, indent=2, allow_nan=False, default=str) + "\n"


def export_rows(df: pd.DataFrame, fmt: str, output: Path) -> Path:
    """Write ``df`` as ``csv``, ``json`` or ``parquet`` to ``output`` atomically."""
    if fmt == "parquet":
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), sink)
        data: str | bytes = sink.getvalue().to_pybytes()
    elif fmt == "csv":
        data = df.to_csv(index=False)
    elif fmt == "json":
        data = rows_as_json(df)
    else:
        raise SweepError(f"--format {fmt!r}: cannot be written to a file (csv, json, parquet)")
    return write_atomically(output, data, "--output")
