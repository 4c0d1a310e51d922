"""A prepared dataset directory (written by ``scale-diffrec prepare``, read by
``data.source: dataset`` with ``data.path: DIR``).

Layout (format ``scale_diffrec.dataset``, version 1):

    DIR/dataset.json      {"format", "version", "n_users", "n_items", "has_timestamp",
                           "has_rating", "input", "config"}: the manifest
    DIR/train.parquet     user (int32 index), item (int32 index), [timestamp], [rating]
    DIR/valid.parquet     the same columns
    DIR/test.parquet      the same columns
    DIR/user_ids.parquet  index -> original user_id   (id_maps.save_id_maps' format)
    DIR/item_ids.parquet  index -> original item_id
    DIR/stats.json        what prepare did and what it made (prepare.py)

Each (user, item) pair appears once in the whole directory. Rows of every split file are
sorted by user, then oldest first (timestamp, then the row of the raw log), so without a
``timestamp`` column a row's position is its time order: the loader then uses it as the
train interaction's time (T-DiffRec weights), as the DiffRec authors' files do.
``rating`` (the raw rating) is kept for inspection; training ignores it. Indexes are the
ranks of the original ids that survived preparation, in sorted order.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from .columns import TIME, id_kind, id_values, time_kind, time_values
from .dataset import InteractionData
from .id_maps import load_id_maps
from .parquet import ParquetLog
from .split import SPLIT_NAMES, dedupe_pairs, sorted_pairs_to_csr

FORMAT, VERSION = "scale_diffrec.dataset", 1
MANIFEST, STATS = "dataset.json", "stats.json"
SPLIT_FILES = {name: f"{name}.parquet" for name in SPLIT_NAMES}
USER, ITEM = "user", "item"           # indexes; timestamp and rating keep the log's names


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise DataError(folder, "prepared dataset folder not found (make one with "
                                "'scale-diffrec prepare')")
    if not path.is_file():
        raise DataError(path, "file not found (not a folder written by 'scale-diffrec "
                              "prepare')")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise DataError(path, f"not readable JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(path, f"not a prepared dataset manifest (format {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise DataError(path, f"format version {manifest.get('version')!r} is not "
                              f"supported (this code reads version {VERSION})")
    for key in ("n_users", "n_items"):
        value = manifest.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(path, f"{key} must be a positive integer, got {value!r}",
                            field=key)
    return manifest


def read_split(path: Path, n_users: int, n_items: int):
    """(users, items, times or None) of one split file, validated against the sizes."""
    log = ParquetLog(path)
    for field in (USER, ITEM):
        if field not in log.schema.names:
            raise DataError(path, f"missing column (the file has {log.schema.names})",
                            field=field)
        if id_kind(path, log.schema, field) != "int":
            raise DataError(path, "indexes must be integers", field=field)
    has_time = TIME in log.schema.names
    tkind = time_kind(path, log.schema) if has_time else None
    parts = {USER: [], ITEM: [], TIME: []}
    limits = {USER: n_users, ITEM: n_items}
    for offset, batch in log.batches([USER, ITEM] + ([TIME] if has_time else [])):
        for field, limit in limits.items():
            values = id_values(batch.column(field), "int", path, field, offset)
            bad = np.flatnonzero(values >= limit)
            if len(bad):
                raise DataError(path, f"index {values[bad[0]]} is not below the dataset's "
                                      f"{limit} {field}s", field=field, row=offset + int(bad[0]))
            parts[field].append(values)
        if has_time:
            parts[TIME].append(time_values(batch.column(TIME), tkind, path, offset))

    def joined(field, dtype=np.int64):
        return np.concatenate(parts[field]) if parts[field] else np.zeros(0, dtype)
    return joined(USER), joined(ITEM), joined(TIME) if has_time else None


def load_prepared(folder: str | Path, n_items: int | None = None,
                  name: str | None = None) -> InteractionData:
    """The InteractionData of a prepared directory (module docstring), original ids
    attached (``user_ids`` / ``item_ids``). ``n_items``, when declared, must equal the
    manifest's. ``train_times`` [train.nnz] holds the train timestamps, or each train
    row's position in train.parquet when there is no timestamp column.
    Errors: DataError naming the file, field and row; ConfigError for a declared
    ``data.n_items`` that differs."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    n_users, n_items_dir = manifest["n_users"], manifest["n_items"]
    if n_items is not None and n_items != n_items_dir:
        raise ConfigError(f"config key 'data.n_items' is {n_items} but the prepared dataset "
                          f"{folder} has {n_items_dir} items")
    user_ids, item_ids = load_id_maps(folder)
    for ids, n, what in ((user_ids, n_users, "user_ids.parquet"),
                         (item_ids, n_items_dir, "item_ids.parquet")):
        if len(ids) != n:
            raise DataError(folder / what, f"{len(ids)} ids but {MANIFEST} declares {n}")
    mats, duplicates, train_times = {}, {}, None
    for split, file in SPLIT_FILES.items():
        users, items, times = read_split(folder / file, n_users, n_items_dir)
        users, items, times, rows, dropped = dedupe_pairs(users, items, n_items_dir, times)
        mats[split] = sorted_pairs_to_csr(users, items, n_users, n_items_dir)
        duplicates[split] = int(dropped)
        if split == "train":
            train_times = rows if times is None else times
    meta = {"source": "dataset", "path": str(folder), "duplicates": duplicates,
            "sizes": {s: m.nnz for s, m in mats.items()}, "prepared": manifest}
    return InteractionData(name=name or folder.name, train=mats["train"],
                           valid=mats["valid"], test=mats["test"], train_times=train_times,
                           user_ids=user_ids, item_ids=item_ids, meta=meta)
