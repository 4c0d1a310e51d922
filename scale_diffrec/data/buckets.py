"""External partition of an interaction log by user: ``prepare``'s bounded memory.

The users (indexes 0..n_users-1, in id order) are cut into B contiguous ranges, the
buckets, each holding at most ``rows_per_bucket`` rows of the log (a user with more rows
than that is a bucket of its own): ``bucket_starts``. Rows are then spilled into one
Arrow IPC stream file per bucket and stage (``Spill``), so every per-user step reads one
bucket at a time, and bucket b's users all come before bucket b + 1's: results appended
bucket by bucket stay sorted by user.

Memory: one bucket's columns (``read`` fills arrays preallocated to the bucket's row
count, one IPC batch of at most ``SPILL_BATCH_ROWS`` at a time) plus one record batch of
the log while spilling; disk: the spilled columns (24 bytes per row: int32 user,
item and log row, int64 timestamp, float32 rating), freed stage by stage.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..files import write_errors
from .columns import pyarrow_modules

SPILL_BATCH_ROWS = 1 << 20


def bucket_starts(user_rows: np.ndarray, rows_per_bucket: int) -> np.ndarray:
    """First user [B] (int64, starting with 0) of each bucket, from the rows of each user
    ``user_rows`` [n_users]: user u goes to bucket floor(rows before u / rows_per_bucket),
    empty buckets dropped, so a bucket exceeds ``rows_per_bucket`` only by its last
    user's rows."""
    before = np.cumsum(user_rows) - user_rows
    bucket = before // max(int(rows_per_bucket), 1)
    change = np.ones(len(bucket), bool)
    np.not_equal(bucket[1:], bucket[:-1], out=change[1:])
    return np.flatnonzero(change) if len(bucket) else np.zeros(1, np.int64)


class Spill:
    """Bucket files ``folder/{stage}-{b}.arrow`` of named numpy columns.

    ``starts`` [B]: first user of each bucket (``bucket_starts``); ``users(b)`` is
    bucket b's range [first, end). ``spill(stage, chunks)`` sends each row of a stream
    of column dicts to its user's bucket (``user`` column, in stream order);
    ``write(stage, b, cols)`` writes one bucket's file; ``read(stage, b, columns)``
    gives its columns back; ``drop`` deletes a file. Write errors are one line
    (files.write_errors)."""

    def __init__(self, folder: Path, starts: np.ndarray, n_users: int):
        self.folder = Path(folder)
        self.folder.mkdir()
        self.bounds = np.append(np.asarray(starts, np.int64), n_users)
        self.n_buckets = len(starts)
        self.rows: dict[str, np.ndarray] = {}
        self.schemas: dict = {}

    def users(self, b: int) -> tuple[int, int]:
        return int(self.bounds[b]), int(self.bounds[b + 1])

    def _path(self, stage: str, b: int) -> Path:
        return self.folder / f"{stage}-{b}.arrow"

    def _schema(self, stage: str, cols: dict):
        pa = pyarrow_modules()[0]
        if stage not in self.schemas:
            self.schemas[stage] = pa.schema([(k, pa.from_numpy_dtype(v.dtype))
                                             for k, v in cols.items()])
            self.rows[stage] = np.zeros(self.n_buckets, np.int64)
        return self.schemas[stage]

    def _batches(self, stage: str, cols: dict):
        pa = pyarrow_modules()[0]
        schema, n = self._schema(stage, cols), len(next(iter(cols.values())))
        for lo in range(0, n, SPILL_BATCH_ROWS):
            yield pa.RecordBatch.from_arrays([v[lo:lo + SPILL_BATCH_ROWS]
                                              for v in cols.values()], schema=schema)

    def spill(self, stage: str, chunks) -> None:
        """Every row of ``chunks`` (dicts of equal-length columns) into its bucket."""
        pa = pyarrow_modules()[0]
        writers: dict[int, object] = {}
        with write_errors(self.folder):
            try:
                for cols in chunks:
                    schema = self._schema(stage, cols)
                    bucket = np.searchsorted(self.bounds, cols["user"], "right") - 1
                    order = np.argsort(bucket, kind="stable")
                    counts = np.bincount(bucket, minlength=self.n_buckets)
                    ends = np.cumsum(counts)
                    for b in np.flatnonzero(counts):
                        rows = order[ends[b] - counts[b]:ends[b]]
                        if b not in writers:
                            writers[b] = pa.ipc.new_stream(str(self._path(stage, b)), schema)
                        writers[b].write_batch(pa.RecordBatch.from_arrays(
                            [v[rows] for v in cols.values()], schema=schema))
                        self.rows[stage][b] += len(rows)
            finally:
                for writer in writers.values():
                    writer.close()

    def write(self, stage: str, b: int, cols: dict) -> None:
        """Bucket b's file of ``stage``: ``cols``."""
        pa = pyarrow_modules()[0]
        schema = self._schema(stage, cols)
        with write_errors(self.folder), pa.ipc.new_stream(str(self._path(stage, b)),
                                                          schema) as writer:
            for batch in self._batches(stage, cols):
                writer.write_batch(batch)
        self.rows[stage][b] = len(next(iter(cols.values())))

    def read(self, stage: str, b: int, columns: list[str] | None = None) -> dict:
        """Bucket b's columns of ``stage`` (all, or ``columns``), in the order written."""
        pa = pyarrow_modules()[0]
        schema = self.schemas[stage]
        names = schema.names if columns is None else columns
        n = int(self.rows[stage][b])
        out = {k: np.empty(n, schema.field(k).type.to_pandas_dtype()) for k in names}
        if n == 0:
            return out
        at = 0
        with pa.OSFile(str(self._path(stage, b))) as f:
            for batch in pa.ipc.open_stream(f):
                for k in names:
                    out[k][at:at + batch.num_rows] = batch.column(k).to_numpy()
                at += batch.num_rows
        pa.default_memory_pool().release_unused()
        return out

    def drop(self, stage: str, b: int) -> None:
        self._path(stage, b).unlink(missing_ok=True)
