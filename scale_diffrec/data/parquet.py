"""Interactions from a parquet file: ``user_id``, ``item_id`` (+ ``timestamp``, ``rating``).

Columns
    user_id, item_id  integers (or floats holding whole numbers) >= 0, or strings; no nulls
    timestamp         optional; integer, float or a parquet timestamp/date (read as its
                      integer value); no nulls/NaN. Without it the row order of the file is
                      the time order (as in the DiffRec authors' files).
    rating            optional; ignored by the parquet source (every row is one implicit
                      interaction), read by ``prepare`` (numbers, or strings holding
                      numbers; no nulls/NaN).
    Other columns are ignored.

The file is read in record batches (``ParquetFile.iter_batches``), in two passes over the
id columns: the first collects the distinct ids (only the distinct ids are held), the
second maps every row to contiguous indexes into preallocated arrays. Memory is the output
(a few int64 per interaction) plus the distinct ids plus one batch, never a whole table.

Indexes are the ranks of the original ids in sorted order (numeric for integer ids,
lexicographic for strings), so they do not depend on the order of rows in the file;
``InteractionData.user_ids[index]`` / ``item_ids[index]`` give the original id back
(int64 arrays, or object arrays of str). With ``n_items`` declared (``data.n_items``) item
ids must be integer indexes below it and are kept as they are (``item_ids`` None), so the
catalogue may hold items nobody interacted with.

Repeated (user, item) rows count once at their earliest time; then the interactions are
split per user by ``data.split`` (see split.py). ``save_id_maps`` / ``load_id_maps`` write
and read the id maps as ``user_ids.parquet`` / ``item_ids.parquet`` (columns ``index`` and
``user_id`` / ``item_id``), atomically.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import DataError
from .dataset import InteractionData
from .split import check_split_config, sorted_unique, split_interactions

USER, ITEM, TIME, RATING = "user_id", "item_id", "timestamp", "rating"
USER_MAP, ITEM_MAP = "user_ids.parquet", "item_ids.parquet"
BATCH_ROWS = 1 << 20
_INT64_MAX = np.iinfo(np.int64).max


def _pa():
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    return pa, pc, pq


def open_parquet(path: str | Path):
    """``pyarrow.parquet.ParquetFile``, or a DataError for a missing / non-parquet file."""
    pa, _, pq = _pa()
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    if not path.is_file():
        raise DataError(path, "expected a parquet file, found a folder")
    try:
        # pre_buffer=False: with pyarrow's default, batch reads keep every row group's
        # compressed chunks read so far (memory ~ the file size, measured 312 MiB of a
        # 316 MB file); without it, one batch's worth
        return pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise DataError(path, f"not a readable parquet file (truncated, corrupt or not "
                              f"parquet): {err}") from None


def _batches(pf, path: Path, columns: list[str], batch_rows: int):
    """Yield (first row, RecordBatch); unreadable data -> DataError at that row."""
    pa, _, _ = _pa()
    it = pf.iter_batches(batch_size=batch_rows, columns=columns, use_threads=True)
    offset = 0
    while True:
        try:
            batch = next(it)
        except StopIteration:
            break
        except (pa.ArrowException, OSError, ValueError) as err:
            raise DataError(path, f"cannot read the parquet data (truncated or corrupt): "
                                  f"{err}", row=offset) from None
        yield offset, batch
        offset += batch.num_rows
    if offset != pf.metadata.num_rows:
        raise DataError(path, f"read {offset} rows but the file declares "
                              f"{pf.metadata.num_rows} (truncated or corrupt?)")


class ParquetLog:
    """A parquet interaction log as record batches: ``path``, ``schema`` (arrow),
    ``num_rows`` and ``batches(columns, batch_rows)`` -> (first row, RecordBatch).
    ``csv_log.CsvLog`` offers the same for CSV; ``read_interactions`` takes either."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = open_parquet(self.path)
        self.schema = self.file.schema_arrow
        self.num_rows = self.file.metadata.num_rows

    def batches(self, columns: list[str], batch_rows: int = BATCH_ROWS):
        return _batches(self.file, self.path, columns, batch_rows)


def _base_type(t):
    pa, _, _ = _pa()
    return t.value_type if pa.types.is_dictionary(t) else t


def id_kind(path: Path, schema, field: str) -> str:
    """'int', 'float' or 'str' for an id column; DataError for any other type."""
    pa, _, _ = _pa()
    t = _base_type(schema.field(field).type)
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str"
    raise DataError(path, f"ids must be integers or strings, got type {t}", field=field)


def time_kind(path: Path, schema) -> str:
    pa, _, _ = _pa()
    t = _base_type(schema.field(TIME).type)
    if pa.types.is_integer(t) or pa.types.is_timestamp(t) or pa.types.is_date(t) \
            or pa.types.is_duration(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    raise DataError(path, f"timestamps must be integers, floats or parquet timestamps, "
                          f"got type {t}", field=TIME)


def _first_null(col) -> int:
    return int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])


def cast_column(col, to_type, path: Path, field: str, offset: int):
    """``col`` cast to ``to_type``, or a DataError at the first row whose value does not
    convert (found by bisection: only the failing case pays for it)."""
    pa, pc, _ = _pa()
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
    pa, _, _ = _pa()
    t = _base_type(schema.field(RATING).type)
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
            or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
        raise DataError(path, f"ratings must be numbers, got type {t}", field=RATING)


def rating_values(col, path: Path, offset: int) -> np.ndarray:
    """Validated ratings of one batch column: float32 numpy (no nulls, finite)."""
    pa, _, _ = _pa()
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if col.null_count:
        raise DataError(path, "missing (null) rating", field=RATING,
                        row=offset + _first_null(col))
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
    pa, pc, _ = _pa()
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if col.null_count:
        raise DataError(path, "missing (null) id", field=field,
                        row=offset + _first_null(col))
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
    pa, _, _ = _pa()
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if col.null_count:
        raise DataError(path, "missing (null) timestamp", field=TIME,
                        row=offset + _first_null(col))
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


class _DistinctIds:
    """The distinct ids seen so far, merged in amortized batches (memory ~ distinct ids)."""

    def __init__(self, kind: str):
        self.kind, self.parts, self.pending, self.merged = kind, [], 0, None

    def add(self, values) -> None:
        pa, pc, _ = _pa()
        part = sorted_unique(values) if self.kind != "str" else pc.unique(values)
        self.parts.append(part)
        self.pending += len(part)
        if self.pending > max(0 if self.merged is None else len(self.merged), 1 << 20):
            self._merge()

    def _merge(self) -> None:
        pa, pc, _ = _pa()
        parts = self.parts + ([] if self.merged is None else [self.merged])
        if self.kind != "str":
            self.merged = sorted_unique(np.concatenate(parts))
        else:
            self.merged = pc.unique(pa.chunked_array(parts, type=pa.large_string()))
        self.parts, self.pending = [], 0

    def sorted(self):
        """Sorted distinct ids: int64 numpy, or a large_string arrow array."""
        self._merge()
        if self.kind == "str":
            _, pc, _ = _pa()
            return self.merged.take(pc.sort_indices(self.merged))
        return self.merged


def _int_lookup(sorted_ids: np.ndarray):
    """id -> rank in ``sorted_ids`` (every id is known to be there): a table indexed by id
    when the ids are dense enough (table <= 4x the distinct ids + 1M entries), else a
    binary search with the queries in sorted order."""
    top = int(sorted_ids[-1]) + 1 if len(sorted_ids) else 0
    if top <= 4 * len(sorted_ids) + (1 << 20):
        table = np.zeros(top, np.int64)
        table[sorted_ids] = np.arange(len(sorted_ids), dtype=np.int64)
        return lambda values: table[values]

    def search(values):
        order = np.argsort(values)
        out = np.empty(len(values), np.int64)
        out[order] = np.searchsorted(sorted_ids, values[order])
        return out
    return search


class _StringMapper:
    """Maps string ids to their rank in ``sorted_ids`` with ``pyarrow.compute.index_in``,
    a few batches at a time so the hash of the distinct ids is built O(rows / distinct)
    times, not once per batch."""

    def __init__(self, sorted_ids, out: np.ndarray, path: Path, field: str, batch_rows: int):
        self.ids, self.out, self.path, self.field = sorted_ids, out, path, field
        self.limit = max(len(sorted_ids), batch_rows)
        self.pending, self.start, self.rows = [], 0, 0

    def add(self, offset: int, values) -> None:
        if not self.pending:
            self.start = offset
        self.pending.append(values)
        self.rows += len(values)
        if self.rows >= self.limit:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        pa, pc, _ = _pa()
        idx = pc.index_in(pa.chunked_array(self.pending, type=pa.large_string()),
                          value_set=self.ids)
        if idx.null_count:
            raise DataError(self.path, "the file changed while it was being read",
                            field=self.field)
        self.out[self.start: self.start + self.rows] = idx.to_numpy()
        self.pending, self.rows = [], 0


def check_columns(path: Path, schema) -> None:
    """DataError naming the first of user_id, item_id that ``schema`` lacks."""
    for field in (USER, ITEM):
        if field not in schema.names:
            raise DataError(path, f"missing column (the file has {schema.names})",
                            field=field)


def read_interactions(source, n_items: int | None = None, batch_rows: int = BATCH_ROWS,
                      ratings: bool = False, index_dtype=np.int64) -> dict:
    """Validate and index every row of ``source`` (a parquet path, a ``ParquetLog`` or a
    ``csv_log.CsvLog``).

    Returns a dict: ``users`` / ``items`` [rows] indexes (``index_dtype``; int64 when
    the ids outnumber it), ``times`` [rows] (int64 or float64) or None, ``ratings``
    [rows] float32 or None (read only when ``ratings`` is true and the log has the
    column), ``user_ids`` / ``item_ids`` (sorted original ids; ``item_ids`` None when
    ``n_items`` is declared), ``n_users``, ``n_items``, ``rows``, ``has_timestamp``,
    ``has_rating``.
    """
    log = source if hasattr(source, "batches") else ParquetLog(source)
    path, schema = log.path, log.schema
    check_columns(path, schema)
    if log.num_rows == 0:
        raise DataError(path, "no interactions (the file has no rows)")
    kinds = {f: id_kind(path, schema, f) for f in (USER, ITEM)}
    if n_items is not None and kinds[ITEM] == "str":
        raise DataError(path, f"data.n_items = {n_items} is declared, so item ids must be "
                              f"integer indexes below it, got strings", field=ITEM)
    has_time = TIME in schema.names
    tkind = time_kind(path, schema) if has_time else None
    has_rating = RATING in schema.names
    if ratings and has_rating:
        check_rating_type(path, schema)

    # pass 1: validate ids, collect the distinct ones, count the rows
    distinct = {USER: _DistinctIds(kinds[USER])}
    if n_items is None:
        distinct[ITEM] = _DistinctIds(kinds[ITEM])
    n_rows = 0
    for offset, batch in log.batches([USER, ITEM], batch_rows):
        n_rows = offset + batch.num_rows
        for field in (USER, ITEM):
            values = id_values(batch.column(field), kinds[field], path, field, offset)
            if field in distinct:
                distinct[field].add(values)
            else:
                bad = np.flatnonzero(values >= n_items)
                if len(bad):
                    raise DataError(path, f"item id {values[bad[0]]} is not below the "
                                          f"declared data.n_items = {n_items}", field=ITEM,
                                    row=offset + int(bad[0]))
    if n_rows == 0:
        raise DataError(path, "no interactions (the file has no rows)")
    sorted_ids = {f: d.sorted() for f, d in distinct.items()}
    largest = max([len(ids) for ids in sorted_ids.values()] + [n_items or 0])
    if largest > np.iinfo(index_dtype).max:
        index_dtype = np.int64

    # pass 2: map to indexes, read timestamps (and ratings)
    out = {f: np.empty(n_rows, index_dtype) for f in (USER, ITEM)}
    times = (np.empty(n_rows, np.float64 if tkind == "float" else np.int64)
             if has_time else None)
    read_ratings = ratings and has_rating
    rating_out = np.empty(n_rows, np.float32) if read_ratings else None
    mappers = {f: _StringMapper(sorted_ids[f], out[f], path, f, batch_rows)
               for f in sorted_ids if kinds[f] == "str"}
    lookups = {f: _int_lookup(ids) for f, ids in sorted_ids.items() if kinds[f] != "str"}
    columns = [USER, ITEM] + ([TIME] if has_time else []) + ([RATING] if read_ratings else [])
    for offset, batch in log.batches(columns, batch_rows):
        end = offset + batch.num_rows
        if end > n_rows:
            raise DataError(path, "the file changed while it was being read")
        for field in (USER, ITEM):
            values = id_values(batch.column(field), kinds[field], path, field, offset)
            if field in mappers:
                mappers[field].add(offset, values)
            elif field in sorted_ids:
                out[field][offset:end] = lookups[field](values)
            else:
                out[field][offset:end] = values
        if has_time:
            times[offset:end] = time_values(batch.column(TIME), tkind, path, offset)
        if read_ratings:
            rating_out[offset:end] = rating_values(batch.column(RATING), path, offset)
    for mapper in mappers.values():
        mapper.flush()
    _pa()[0].default_memory_pool().release_unused()  # the batches' memory, before sorts

    def originals(field):
        ids = sorted_ids.get(field)
        if ids is None or isinstance(ids, np.ndarray):
            return ids
        return np.asarray(ids.to_numpy(zero_copy_only=False), dtype=object)

    user_ids, item_ids = originals(USER), originals(ITEM)
    return {"users": out[USER], "items": out[ITEM], "times": times, "ratings": rating_out,
            "user_ids": user_ids, "item_ids": item_ids, "n_users": len(user_ids),
            "n_items": int(n_items) if n_items is not None else len(item_ids),
            "rows": n_rows, "has_timestamp": has_time, "has_rating": has_rating}


def load_parquet(path: str | Path, split: dict | None = None, n_items: int | None = None,
                 name: str | None = None, batch_rows: int = BATCH_ROWS) -> InteractionData:
    """Read, index, dedupe and split a parquet file of interactions (module docstring).

    ``split`` is ``data.split`` ({rule, valid, test, seed}). ``train_times`` holds the
    timestamps of the train interactions (their file rows when there is no timestamp).
    """
    path = Path(path)
    rule, valid, test, seed = check_split_config(split or {})
    got = read_interactions(path, n_items=n_items, batch_rows=batch_rows)
    if rule == "time" and got["times"] is None:
        raise DataError(path, "the 'time' split rule (data.split.rule) needs a timestamp "
                              "column", field=TIME)
    train, valid_m, test_m, train_times, info = split_interactions(
        got.pop("users"), got.pop("items"), got["n_users"], got["n_items"], rule, valid,
        test, seed, times=got.pop("times"))           # popped: freed once used
    for split_name, m in (("valid", valid_m), ("test", test_m)):
        if m.nnz == 0:
            raise DataError(path, f"the split rule '{rule}' (data.split.valid={valid}, "
                                  f"data.split.test={test}) leaves the {split_name} split "
                                  f"empty ({got['rows']} rows, {got['n_users']} users)")
    meta = {"source": "parquet", "path": str(path), "rows": got["rows"],
            "has_timestamp": got["has_timestamp"],
            "split": {"rule": rule, "valid": valid, "test": test, "seed": seed}, **info}
    return InteractionData(name=name or path.stem, train=train, valid=valid_m, test=test_m,
                           train_times=train_times, user_ids=got["user_ids"],
                           item_ids=got["item_ids"], meta=meta)


# ---------------------------------------------------------------------------- id maps

def default_mode(path, directory: bool = False) -> None:
    """Give a mkstemp file (0600) or mkdtemp folder (0700) the mode a plain open() or
    mkdir() would: 0666 (folders 0777) minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


def id_table(ids, n: int, field: str, path: Path):
    """The id map ``index`` -> ``field`` (int64 or large_string column, no pickles) of
    ``ids`` [n] (None: the identity); DataError naming ``path`` for other id types."""
    pa, _, _ = _pa()
    if ids is None:
        ids = np.arange(n, dtype=np.int64)
    ids = np.asarray(ids)
    if ids.ndim != 1 or len(ids) != n:
        raise DataError(path, f"the id map has shape {list(ids.shape)} but the data has "
                              f"{n} {field.split('_')[0]}s", field=field)
    try:
        column = pa.array(ids, type=pa.large_string() if ids.dtype.kind in "OUS" else None)
        if not (pa.types.is_integer(column.type) or pa.types.is_large_string(column.type)):
            raise TypeError(f"ids must be integers or strings, got {column.type}")
        if column.null_count:
            raise TypeError("null id")
    except (pa.ArrowException, TypeError, ValueError) as err:
        raise DataError(path, f"cannot write the id map: {err}", field=field) from None
    return pa.table({"index": pa.array(np.arange(n, dtype=np.int64)), field: column})


def save_id_maps(data: InteractionData, folder: str | Path) -> tuple[Path, Path]:
    """Write ``folder/user_ids.parquet`` and ``folder/item_ids.parquet`` (index -> original
    id; identity maps where the data has none). Both are written to temporary files first
    and renamed into place only when both are complete, so a failure leaves any earlier
    maps intact. Returns the two paths."""
    return write_id_maps(folder, data.user_ids, data.n_users, data.item_ids, data.n_items)


def write_id_maps(folder: str | Path, user_ids, n_users: int, item_ids, n_items: int
                  ) -> tuple[Path, Path]:
    """``save_id_maps`` from the arrays: ``user_ids`` [n_users] / ``item_ids`` [n_items]
    original ids (int or str), or None for identity maps."""
    _, _, pq = _pa()
    folder = Path(folder)
    targets = [(folder / USER_MAP, user_ids, n_users, USER),
               (folder / ITEM_MAP, item_ids, n_items, ITEM)]
    tables = [(path, id_table(ids, n, field, path)) for path, ids, n, field in targets]
    folder.mkdir(parents=True, exist_ok=True)
    temps: list[str] = []
    try:
        for path, table in tables:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
            os.close(fd)
            temps.append(tmp)
            default_mode(tmp)
            pq.write_table(table, tmp)
        for (path, _), tmp in zip(tables, temps):
            os.replace(tmp, path)
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return folder / USER_MAP, folder / ITEM_MAP


def _py(value):
    """A numpy scalar as the plain Python value (for messages)."""
    return value.item() if isinstance(value, np.generic) else value


def read_id_map(path: Path, field: str) -> np.ndarray:
    """``ids[index]`` of an id map written from ``id_table``: int64, or object array of
    str; DataError naming the file, column and row for a malformed map."""
    pa, _, pq = _pa()
    pf = open_parquet(path)
    for col in ("index", field):
        if col not in pf.schema_arrow.names:
            raise DataError(path, "missing column", field=col)
    try:
        table = pf.read(columns=["index", field])
    except (pa.ArrowException, OSError, ValueError) as err:
        raise DataError(path, f"cannot read the parquet data (truncated or corrupt): "
                              f"{err}") from None
    index, ids = table.column("index"), table.column(field)
    for name, col in (("index", index), (field, ids)):
        if col.null_count:
            raise DataError(path, "missing (null) value", field=name,
                            row=_first_null(col.combine_chunks()))
    index = index.to_numpy()
    if not np.issubdtype(index.dtype, np.integer):
        raise DataError(path, f"index must be integers, got {index.dtype}", field="index")
    order = np.argsort(index, kind="stable")
    bad = np.flatnonzero(index[order] != np.arange(len(index)))
    if len(bad):
        raise DataError(path, f"the indexes must be 0..{len(index) - 1}, each once",
                        field="index", row=int(order[bad[0]]))
    kind = id_kind(path, table.schema, field)
    values = ids.to_numpy()
    values = np.asarray(values, dtype=object) if kind == "str" else values
    values = values[order]
    s = np.sort(values)
    dup = np.flatnonzero(s[1:] == s[:-1])
    if len(dup):
        raise DataError(path, f"original id {_py(s[dup[0]])!r} appears more than once",
                        field=field)
    return values


def load_id_maps(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(user_ids, item_ids) as written by ``save_id_maps``: ``ids[index]`` is the original
    id (int64 array, or object array of str)."""
    folder = Path(folder)
    return read_id_map(folder / USER_MAP, USER), read_id_map(folder / ITEM_MAP, ITEM)
