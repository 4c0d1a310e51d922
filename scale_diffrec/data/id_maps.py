"""The id maps of a dataset: ``index`` -> original id, one parquet file per side.

``user_ids.parquet`` / ``item_ids.parquet`` hold the columns ``index`` (0..n-1, int64) and
``user_id`` / ``item_id`` (the original ids: int64 or large_string; no pickles), so that
``ids[index]`` gives an index's original id back. ``save_id_maps`` writes both atomically
as a pair; ``load_id_maps`` reads them, a malformed map being a DataError naming the file,
the column and the row.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..files import default_mode
from .columns import ITEM, USER, first_null, id_kind, pyarrow_modules
from .dataset import InteractionData
from .parquet import open_parquet

USER_MAP, ITEM_MAP = "user_ids.parquet", "item_ids.parquet"


def id_table(ids, n: int, field: str, path: Path):
    """The id map ``index`` -> ``field`` (int64 or large_string column, no pickles) of
    ``ids`` [n] (None: the identity); DataError naming ``path`` for other id types."""
    pa, _, _ = pyarrow_modules()
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
    _, _, pq = pyarrow_modules()
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
    pa, _, pq = pyarrow_modules()
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
                            row=first_null(col.combine_chunks()))
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
