"""The columns of an interaction log: names, type checks and validated values per batch.

    user_id, item_id  integers (or floats holding whole numbers) >= 0, or strings; no nulls
    timestamp         optional; integer, float or a parquet timestamp/date (read as its
                      integer value); no nulls/NaN. Without it the row order of the file is
                      the time order (as in the DiffRec authors' files).
    rating            optional; ignored by the parquet source (every row is one implicit
                      interaction), read by ``prepare`` (numbers, or strings holding
                      numbers; no nulls/NaN).
    Other columns are ignored.

The readers (parquet.py, csv_log.py) check each column's arrow type once (``id_kind``,
``time_kind``, ``check_rating_type``) and each record batch's values (``id_values``,
``time_values``, ``rating_values``); a bad value is a DataError naming the file, the field
and the 0-based row.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError

USER, ITEM, TIME, RATING = "user_id", "item_id", "timestamp", "rating"
_INT64_MAX = np.iinfo(np.int64).max


def pyarrow_modules():
    """(pyarrow, pyarrow.compute, pyarrow.parquet), imported on first use (start-up: the
    data package is loaded by commands that never read a log)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    return pa, pc, pq


def first_null(col) -> int:
    """The row of ``col``'s first null (``col`` has one)."""
    return int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])


def _base_type(t):
    pa, _, _ = pyarrow_modules()
    return t.value_type if pa.types.is_dictionary(t) else t


def id_kind(path: Path, schema, field: str) -> str:
    """'int', 'float' or 'str' for an id column; DataError for any other type."""
    pa, _, _ = pyarrow_modules()
    t = _base_type(schema.field(field).type)
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str"
    raise DataError(path, f"ids must be integers or strings, got type {t}", field=field)


def time_kind(path: Path, schema) -> str:
    pa, _, _ = pyarrow_modules()
    t = _base_type(schema.field(TIME).type)
    if pa.types.is_integer(t) or pa.types.is_timestamp(t) or pa.types.is_date(t) \
            or pa.types.is_duration(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    raise DataError(path, f"timestamps must be integers, floats or parquet timestamps, "
                          f"got type {t}", field=TIME)


def cast_column(col, to_type, path: Path, field: str, offset: int):
    """``col`` cast to ``to_type``, or a DataError at the first row whose value does not
    convert (found by bisection: only the failing case pays for it)."""
    pa, pc, _ = pyarrow_modules()
    try:
        return pc.cast(col, to_type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    lo, hi = 0, len(col)                     # the first bad value lies in [lo, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            pc.cast(col.slice(lo, mid - lo), to_type)
            lo = mid
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            hi = mid
    raise DataError(path, f"cannot read {col[lo].as_py()!r} as {to_type}", field=field,
                    row=offset + lo)


def check_rating_type(path: Path, schema) -> None:
    """Ratings must be numbers (or strings, converted and checked row by row)."""
    pa, _, _ = pyarrow_modules()
    t = _base_type(schema.field(RATING).type)
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
            or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
        raise DataError(path, f"ratings must be numbers, got type {t}", field=RATING)


def rating_values(col, path: Path, offset: int) -> np.ndarray:
    """Validated ratings of one batch column: float32 numpy (no nulls, finite)."""
    pa, _, _ = pyarrow_modules()
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if col.null_count:
        raise DataError(path, "missing (null) rating", field=RATING,
                        row=offset + first_null(col))
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        col = cast_column(col, pa.float64(), path, RATING, offset)
    values = col.to_numpy(zero_copy_only=False).astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise DataError(path, f"rating is not finite ({values[bad[0]]})", field=RATING,
                        row=offset + int(bad[0]))
    return values


def id_values(col, kind: str, path: Path, field: str, offset: int):
    """Validated ids of one batch column: int64 numpy (int/float kinds) or a
    large_string arrow array (str kind)."""
    pa, pc, _ = pyarrow_modules()
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if col.null_count:
        raise DataError(path, "missing (null) id", field=field,
                        row=offset + first_null(col))
    if kind == "str":
        return col.cast(pa.large_string())
    values = col.to_numpy(zero_copy_only=False)
    if kind == "float":
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise DataError(path, f"missing id ({values[bad[0]]})", field=field,
                            row=offset + int(bad[0]))
        bad = np.flatnonzero(values != np.floor(values))
        if len(bad):
            raise DataError(path, f"non-integer id {values[bad[0]].item()!r}", field=field,
                            row=offset + int(bad[0]))
        bad = np.flatnonzero(values >= 2.0 ** 63)
        if len(bad):
            raise DataError(path, f"id {values[bad[0]].item()!r} is too large", field=field,
                            row=offset + int(bad[0]))
    elif values.dtype == np.uint64:
        bad = np.flatnonzero(values > _INT64_MAX)
        if len(bad):
            raise DataError(path, f"id {values[bad[0]]} is too large", field=field,
                            row=offset + int(bad[0]))
    bad = np.flatnonzero(values < 0)
    if len(bad):
        raise DataError(path, f"negative id {values[bad[0]]:g}" if kind == "float"
                        else f"negative id {values[bad[0]]}", field=field,
                        row=offset + int(bad[0]))
    return values.astype(np.int64, copy=False)


def time_values(col, kind: str, path: Path, offset: int) -> np.ndarray:
    """Validated timestamps of one batch column: int64 or float64 numpy."""
    pa, _, _ = pyarrow_modules()
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if col.null_count:
        raise DataError(path, "missing (null) timestamp", field=TIME,
                        row=offset + first_null(col))
    if kind == "float":
        values = col.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise DataError(path, f"timestamp is not finite ({values[bad[0]]})", field=TIME,
                            row=offset + int(bad[0]))
        return values
    t = col.type
    if pa.types.is_date32(t):
        col = col.cast(pa.int32())
    elif not pa.types.is_integer(t):
        col = col.cast(pa.int64())               # timestamp / date64 / duration: its value
    values = col.to_numpy(zero_copy_only=False)
    if values.dtype == np.uint64 and len(values) and values.max() > _INT64_MAX:
        bad = np.flatnonzero(values > _INT64_MAX)
        raise DataError(path, f"timestamp {values[bad[0]]} is too large", field=TIME,
                        row=offset + int(bad[0]))
    return values.astype(np.int64, copy=False)


def check_columns(path: Path, schema) -> None:
    """DataError naming the first of user_id, item_id that ``schema`` lacks."""
    for field in (USER, ITEM):
        if field not in schema.names:
            raise DataError(path, f"missing column (the file has {schema.names})",
                            field=field)
