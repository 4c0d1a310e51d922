"""Interaction logs in CSV, read in blocks with the interface of ``parquet.ParquetLog``.

The first line names the columns (``user_id``, ``item_id`` and optionally ``rating``,
``timestamp``; others are ignored). Column types are inferred by pyarrow from the first
block (integers, floats, strings, ISO-8601 timestamps); every block is then read as text
and converted to those types, so a value that does not convert is reported with its
field and row (0-based, the header line not counted) instead of pyarrow's message.
Empty fields (and ``NA``, ``null``, ...) are nulls, which the validators reject.
An id column inferred as integers whose first block holds text that does not write back
as the same integer (``007``, ``+7``, `` 7``) is read as strings, so ``007`` and ``7``
stay two ids; such text in a later block is refused with its field and row.
``.csv.gz`` / ``.csv.bz2`` are decompressed by their extension. Memory is one block
(``BLOCK_BYTES`` of text) at a time.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .columns import ITEM, USER, cast_column

BLOCK_BYTES = 16 << 20


def _csv():
    import pyarrow as pa
    import pyarrow.csv as csv
    return pa, csv


class CsvLog:
    """A CSV interaction log: ``path``, ``schema`` (the inferred arrow types),
    ``num_rows`` (0 for a header-only file, else None: counted while reading) and
    ``batches(columns, batch_rows)`` -> (first row, RecordBatch). ``batch_rows`` is
    accepted for the interface; blocks are ``block_bytes`` of text."""

    def __init__(self, path: str | Path, block_bytes: int = BLOCK_BYTES):
        pa, csv = _csv()
        self.path, self.block_bytes = Path(path), block_bytes
        if not self.path.exists():
            raise DataError(self.path, "file not found")
        if not self.path.is_file():
            raise DataError(self.path, "expected a CSV file, found a folder")
        try:
            reader = self._open()
            self.schema = reader.schema
            first = _next(reader)
            self.num_rows = None if first is not None and first.num_rows else 0
            self.schema = self._ids_as_text_if_written_so()
        except (pa.ArrowException, OSError, ValueError) as err:
            if "Empty CSV file" in str(err):
                raise DataError(self.path, "empty file (expected a header line naming "
                                           "the columns)") from None
            raise DataError(self.path, f"not a readable CSV file: {err}") from None

    def _int_ids(self) -> list[str]:
        pa, _ = _csv()
        return [f for f in (USER, ITEM) if f in self.schema.names
                and pa.types.is_integer(self.schema.field(f).type)]

    def _ids_as_text_if_written_so(self):
        """The schema with integer id columns whose first block does not round-trip
        (``_first_not_integer``) read as strings."""
        pa, csv = _csv()
        schema, fields = self.schema, self._int_ids()
        if not fields:
            return schema
        first = _next(self._open(csv.ConvertOptions(
            include_columns=fields, column_types={f: pa.string() for f in fields})))
        for f in fields:
            if _first_not_integer(first.column(f), schema.field(f).type) is not None:
                schema = schema.set(schema.get_field_index(f), pa.field(f, pa.string()))
        return schema

    def _open(self, convert_options=None):
        pa, csv = _csv()
        return csv.open_csv(pa.input_stream(self.path),
                            read_options=csv.ReadOptions(block_size=self.block_bytes),
                            convert_options=convert_options)

    def batches(self, columns: list[str], batch_rows: int | None = None):
        pa, csv = _csv()
        options = csv.ConvertOptions(include_columns=columns, strings_can_be_null=True,
                                     column_types={c: pa.string() for c in columns})
        offset = 0
        int_ids = self._int_ids()
        try:
            reader = self._open(options)
            while (batch := _next(reader)) is not None:
                typed = [cast_column(batch.column(c), self.schema.field(c).type, self.path,
                                     c, offset) for c in columns]
                for c in set(columns) & set(int_ids):
                    bad = _first_not_integer(batch.column(c), self.schema.field(c).type)
                    if bad is not None:
                        raise DataError(self.path, f"id {batch.column(c)[bad].as_py()!r} is "
                                        f"not written as a plain integer, unlike the ids "
                                        f"of the first rows (leading zeros, '+' or spaces "
                                        f"would merge ids): write all ids the same way",
                                        field=c, row=offset + bad)
                yield offset, pa.RecordBatch.from_arrays(typed, names=columns)
                offset += batch.num_rows
        except (pa.ArrowException, OSError) as err:
            raise DataError(self.path, f"cannot parse the CSV text (rows from {offset}): "
                                       f"{err}") from None


def _first_not_integer(text, to_type) -> int | None:
    """The first row of the text column ``text`` that does not write back as the same
    text once read as ``to_type`` (``007``, ``+7``, `` 7``); None when all do (or some do
    not convert: ``cast_column`` reports those)."""
    pa, _ = _csv()
    import pyarrow.compute as pc
    try:
        same = pc.equal(pc.cast(pc.cast(text, to_type), pa.string()), text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    differs = pc.invert(pc.fill_null(same, True)).to_numpy(zero_copy_only=False)
    return int(differs.argmax()) if differs.any() else None


def _next(reader):
    try:
        return reader.read_next_batch()
    except StopIteration:
        return None
