"""Interactions from a parquet file: ``user_id``, ``item_id`` (+ ``timestamp``, ``rating``).

The columns, their types and the rules every value must meet are those of columns.py.

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
split per user by ``data.split`` (see split.py). The id maps of a dataset are written and
read by id_maps.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from .columns import (ITEM, RATING, TIME, USER, check_columns, check_rating_type, id_kind,
                      id_values, pyarrow_modules, rating_values, time_kind, time_values)
from .dataset import InteractionData
from .split import check_split_config, sorted_unique, split_interactions

BATCH_ROWS = 1 << 20


def open_parquet(path: str | Path):
    """``pyarrow.parquet.ParquetFile``, or a DataError for a missing / non-parquet file."""
    pa, _, pq = pyarrow_modules()
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
    pa, _, _ = pyarrow_modules()
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


class _DistinctIds:
    """The distinct ids seen so far, merged in amortized batches (memory ~ distinct ids)."""

    def __init__(self, kind: str):
        self.kind, self.parts, self.pending, self.merged = kind, [], 0, None

    def add(self, values) -> None:
        pa, pc, _ = pyarrow_modules()
        part = sorted_unique(values) if self.kind != "str" else pc.unique(values)
        self.parts.append(part)
        self.pending += len(part)
        if self.pending > max(0 if self.merged is None else len(self.merged), 1 << 20):
            self._merge()

    def _merge(self) -> None:
        pa, pc, _ = pyarrow_modules()
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
            _, pc, _ = pyarrow_modules()
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
        pa, pc, _ = pyarrow_modules()
        idx = pc.index_in(pa.chunked_array(self.pending, type=pa.large_string()),
                          value_set=self.ids)
        if idx.null_count:
            raise DataError(self.path, "the file changed while it was being read",
                            field=self.field)
        self.out[self.start: self.start + self.rows] = idx.to_numpy()
        self.pending, self.rows = [], 0


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
    pyarrow_modules()[0].default_memory_pool().release_unused()  # the batches' memory, before sorts

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
