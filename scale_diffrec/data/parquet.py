"""Interactions from a parquet file: ``user_id``, ``item_id`` (+ ``timestamp``, ``rating``).

The columns, their types and the rules every value must meet are those of columns.py.

The file is read in record batches (``ParquetFile.iter_batches``), in two passes over the
id columns: the first (``IdScan``) collects the distinct ids (only the distinct ids are
held), the second (``IdScan.chunks``) maps every row to contiguous indexes, run of rows by
run of rows; ``read_interactions`` puts them into preallocated arrays (memory: the output,
a few int64 per interaction, plus the distinct ids plus one batch, never a whole table),
``prepare`` spills them to disk instead (buckets.py).

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


def _string_ranks(pending: list, sorted_ids, path: Path, field: str) -> np.ndarray:
    """int64 ranks in ``sorted_ids`` of the string ids of ``pending`` (arrow arrays), by
    one ``pyarrow.compute.index_in`` over them all (one hash of the distinct ids)."""
    pa, pc, _ = pyarrow_modules()
    idx = pc.index_in(pa.chunked_array(pending, type=pa.large_string()), value_set=sorted_ids)
    if idx.null_count:
        raise DataError(path, "the file changed while it was being read", field=field)
    return idx.to_numpy().astype(np.int64, copy=False)


class IdScan:
    """Pass 1 over a log (a parquet path, a ``ParquetLog`` or a ``csv_log.CsvLog``):
    validates the ids, collects the distinct ones (only those are held) and counts the
    rows. Attributes: ``log``, ``path``, ``rows``, ``kinds`` (id kind per field),
    ``sorted_ids`` (per field whose ids are mapped: int64 numpy or large_string arrow),
    ``n_users``, ``n_items``, ``has_time``, ``tkind``, ``has_rating``,
    ``user_ids`` / ``item_ids`` (original ids: int64, object array of str, or None for
    items when ``n_items`` is declared). ``chunks`` is pass 2."""

    def __init__(self, source, n_items: int | None = None, batch_rows: int = BATCH_ROWS):
        log = source if hasattr(source, "batches") else ParquetLog(source)
        self.log, self.path, self.batch_rows = log, log.path, batch_rows
        path, schema = log.path, log.schema
        check_columns(path, schema)
        if log.num_rows == 0:
            raise DataError(path, "no interactions (the file has no rows)")
        self.kinds = {f: id_kind(path, schema, f) for f in (USER, ITEM)}
        if n_items is not None and self.kinds[ITEM] == "str":
            raise DataError(path, f"data.n_items = {n_items} is declared, so item ids must "
                                  f"be integer indexes below it, got strings", field=ITEM)
        self.has_time = TIME in schema.names
        self.tkind = time_kind(path, schema) if self.has_time else None
        self.has_rating = RATING in schema.names
        distinct = {USER: _DistinctIds(self.kinds[USER])}
        if n_items is None:
            distinct[ITEM] = _DistinctIds(self.kinds[ITEM])
        n_rows = 0
        for offset, batch in log.batches([USER, ITEM], batch_rows):
            n_rows = offset + batch.num_rows
            for field in (USER, ITEM):
                values = id_values(batch.column(field), self.kinds[field], path, field, offset)
                if field in distinct:
                    distinct[field].add(values)
                else:
                    bad = np.flatnonzero(values >= n_items)
                    if len(bad):
                        raise DataError(path, f"item id {values[bad[0]]} is not below the "
                                              f"declared data.n_items = {n_items}",
                                        field=ITEM, row=offset + int(bad[0]))
        if n_rows == 0:
            raise DataError(path, "no interactions (the file has no rows)")
        self.rows = n_rows
        self.sorted_ids = {f: d.sorted() for f, d in distinct.items()}
        self.lookups = {f: _int_lookup(ids) for f, ids in self.sorted_ids.items()
                        if self.kinds[f] != "str"}
        self.user_ids, self.item_ids = self._originals(USER), self._originals(ITEM)
        self.n_users = len(self.user_ids)
        self.n_items = int(n_items) if n_items is not None else len(self.item_ids)

    def _originals(self, field):
        ids = self.sorted_ids.get(field)
        if ids is None or isinstance(ids, np.ndarray):
            return ids
        return np.asarray(ids.to_numpy(zero_copy_only=False), dtype=object)

    def chunks(self, fields=(USER, ITEM, TIME, RATING), ratings: bool = True):
        """Pass 2: yield (first row, {field: numpy column}) for consecutive runs of rows:
        ``user_id`` / ``item_id`` as int64 indexes (ranks of the sorted ids, or the
        declared item indexes), ``timestamp`` int64 / float64, ``rating`` float32, each
        of ``fields`` the log has (``rating`` only when ``ratings``), validated batch by
        batch (DataError naming the file, field and row). String ids are mapped a few
        batches at a time (runs of up to max(distinct ids, batch rows) rows), so the hash
        of the distinct ids is built O(rows / distinct) times, not once per batch."""
        path = self.path
        fields = [f for f in fields if (f in (USER, ITEM) or (f == TIME and self.has_time)
                                        or (f == RATING and ratings and self.has_rating))]
        if RATING in fields:
            check_rating_type(path, self.log.schema)
        strings = [f for f in fields if f in (USER, ITEM) and self.kinds[f] == "str"
                   and f in self.sorted_ids]
        limit = max([len(self.sorted_ids[f]) for f in strings] + [1])
        pending, start, rows = [], 0, 0
        for offset, batch in self.log.batches(fields, self.batch_rows):
            if offset + batch.num_rows > self.rows:
                raise DataError(path, "the file changed while it was being read")
            if not pending:
                start = offset
            pending.append(self._validated(batch, fields, offset))
            rows += batch.num_rows
            if rows >= limit:
                yield start, self._joined(pending, fields, strings)
                pending, rows = [], 0
        if pending:
            yield start, self._joined(pending, fields, strings)

    def _validated(self, batch, fields, offset) -> dict:
        path, out = self.path, {}
        for field in fields:
            col = batch.column(field)
            if field in (USER, ITEM):
                values = id_values(col, self.kinds[field], path, field, offset)
                out[field] = (self.lookups[field](values) if field in self.lookups
                              else values)
            elif field == TIME:
                out[field] = time_values(col, self.tkind, path, offset)
            else:
                out[field] = rating_values(col, path, offset)
        return out

    def _joined(self, pending: list, fields, strings) -> dict:
        out = {}
        for field in fields:
            parts = [p[field] for p in pending]
            out[field] = (_string_ranks(parts, self.sorted_ids[field], self.path, field)
                          if field in strings else
                          parts[0] if len(parts) == 1 else np.concatenate(parts))
        return out


def read_interactions(source, n_items: int | None = None, batch_rows: int = BATCH_ROWS,
                      ratings: bool = False, index_dtype=np.int64) -> dict:
    """Validate and index every row of ``source`` (a parquet path, a ``ParquetLog`` or a
    ``csv_log.CsvLog``): ``IdScan`` then its ``chunks`` into arrays of all rows.

    Returns a dict: ``users`` / ``items`` [rows] indexes (``index_dtype``; int64 when
    the ids outnumber it), ``times`` [rows] (int64 or float64) or None, ``ratings``
    [rows] float32 or None (read only when ``ratings`` is true and the log has the
    column), ``user_ids`` / ``item_ids`` (sorted original ids; ``item_ids`` None when
    ``n_items`` is declared), ``n_users``, ``n_items``, ``rows``, ``has_timestamp``,
    ``has_rating``.
    """
    scan = IdScan(source, n_items, batch_rows)
    n_rows = scan.rows
    if max(scan.n_users, scan.n_items) > np.iinfo(index_dtype).max:
        index_dtype = np.int64
    read_ratings = ratings and scan.has_rating
    out = {USER: np.empty(n_rows, index_dtype), ITEM: np.empty(n_rows, index_dtype),
           TIME: (np.empty(n_rows, np.float64 if scan.tkind == "float" else np.int64)
                  if scan.has_time else None),
           RATING: np.empty(n_rows, np.float32) if read_ratings else None}
    for offset, chunk in scan.chunks(ratings=ratings):
        for field, values in chunk.items():
            out[field][offset:offset + len(values)] = values
    pyarrow_modules()[0].default_memory_pool().release_unused()  # the batches' memory, before sorts
    return {"users": out[USER], "items": out[ITEM], "times": out[TIME],
            "ratings": out[RATING], "user_ids": scan.user_ids, "item_ids": scan.item_ids,
            "n_users": scan.n_users, "n_items": scan.n_items, "rows": n_rows,
            "has_timestamp": scan.has_time, "has_rating": scan.has_rating}


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
