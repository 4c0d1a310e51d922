"""``scale-diffrec prepare``: a raw interaction log -> a prepared dataset directory
(prepared.py) that ``train`` reads with ``data.source: dataset``.

Input: a parquet log, or CSV (``.csv``, ``.csv.gz``, ``.csv.bz2``; csv_log.py), with
``user_id``, ``item_id`` and optionally ``rating`` and ``timestamp``, validated row by row
as the parquet source validates its input (columns.py): bad input is a DataError naming
the file, the field and the 0-based row, raised before anything is written.

The steps, in this order; each is a key of the prepare config (prepare_config.py; RecBole's
nearest option in brackets):

1. read: two streaming passes over record batches (parquet row groups / CSV blocks): the
   distinct ids, then each row's user and item index (int32), timestamp and rating
   (float32). Peak memory is held by rows, not the file: about 47 bytes per row of the
   log above the imports (4.4 GiB for 100M rows with every step on, measured by
   ``benchmarks/prepare.py``) plus the distinct ids; never users x items.
2. ``dedupe`` (``rm_dup_inter``): a (user, item) pair repeated in the log counts once.
   ``first`` keeps its earliest occurrence (by timestamp, then by row of the log),
   ``last`` its latest; the kept occurrence's rating and timestamp are the pair's.
3. ``rating_threshold`` (``val_interval: {rating: "[t,inf)"}``): the pairs rated >= t
   are the interactions; the others are dropped, or kept as natural noise (step 6).
   null keeps every pair (no rating column needed).
4. ``kcore.users`` / ``kcore.items`` (``user_inter_num_interval`` /
   ``item_inter_num_interval: "[k,inf)"``): iterative k-core. Every pass removes together
   the users with fewer than ``kcore.users`` interactions and the items with fewer than
   ``kcore.items``, counted on what the previous pass kept, until nothing changes: the
   result is the largest subset in which every user and item meets its bound (whatever
   the order of removal). 0 turns a side off. Users and items left without interactions
   are dropped; the passes are listed in stats.json.
5. ``split`` (``eval_args``), per user:

       random         a seeded (``split.seed``) random choice of ``split.valid`` /
                      ``split.test`` fractions; independent of the log's row order
       time           chronological: the latest to test, the ones before to valid, the
                      oldest to train (needs ``timestamp``)
       leave_one_out  the latest interaction to test, the one before it to valid, the
                      rest to train (``split.valid`` / ``split.test`` unused; needs
                      ``timestamp``)

   Equal timestamps are ordered by the row of the log (the log's order is the order of
   events). Counts per user round half up (split.py: ``holdout_counts``), and a user with
   too few interactions keeps at least one in train: valid is shortened first, then
   test (1 interaction: train only; 2 under leave_one_out: train and test).
6. ``natural_noise`` (the DiffRec paper's noisy training): the pairs rated below the
   threshold, of users and items that survived step 4, are added to train and valid only
   (test stays clean): per user a share valid / (1 - test) of them to valid, by the
   split's rule (random with seed ``split.seed + 1``, or the latest for ``time``); all to
   train under ``leave_one_out``.

Output: prepared.py's directory, built in a temporary sibling and renamed into place, so
a failed run leaves nothing behind and an existing directory is replaced (only with
``overwrite``) in one step. The directory is claimed for the whole run (``claim``), so
two prepares of one directory cannot both write it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ..claim import claim, is_empty
from ..errors import ConfigError, DataError
from ..files import default_mode
from ..progress import log, peak_rss_mib
from .columns import RATING, TIME
from .csv_log import CsvLog
from .id_maps import write_id_maps
from .parquet import BATCH_ROWS, ParquetLog, read_interactions
from .prepare_config import PrepareConfig, SplitConfig
from .prepared import FORMAT, ITEM, MANIFEST, SPLIT_FILES, STATS, USER, VERSION
from .split import (SPLIT_NAMES, assign_splits, holdout_counts, label_tails,
                    leave_one_out_counts)

CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2")
PERCENTILES = (0, 25, 50, 75, 90, 99, 100)


def open_log(path: str | Path):
    """CsvLog for .csv / .csv.gz / .csv.bz2, else ParquetLog (DataError if unreadable)."""
    path = Path(path)
    return CsvLog(path) if path.name.lower().endswith(CSV_SUFFIXES) else ParquetLog(path)


def pick_occurrences(users: np.ndarray, items: np.ndarray, n_items: int,
                     times: np.ndarray | None, keep: str) -> np.ndarray:
    """Rows [pairs] int64 of the kept occurrence of each (user, item) pair, sorted by
    (user, item): the earliest (``keep`` 'first') or latest ('last') by (time, row);
    by row alone when ``times`` is None."""
    key = users.astype(np.int64) * np.int64(max(n_items, 1)) + items
    perm = np.argsort(key, kind="stable") if times is None else np.lexsort((times, key))
    key.sort()                                   # == key[perm], without a second copy
    edge = np.empty(len(key), bool)
    if keep == "first":
        edge[:1] = True
        np.not_equal(key[1:], key[:-1], out=edge[1:])
    else:
        edge[-1:] = True
        np.not_equal(key[:-1], key[1:], out=edge[:-1])
    return perm[edge]


def kcore(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int,
          min_user: int, min_item: int) -> tuple[np.ndarray, list[dict]]:
    """Iterative k-core (module docstring, step 4): a keep mask [n] and one record per
    pass that removed something ({removed, users_below, items_below})."""
    keep = np.ones(len(users), bool)
    passes: list[dict] = []
    if min_user <= 1 and min_item <= 1:
        return keep, passes                      # every user and item present has one
    while True:
        u_count = np.bincount(users[keep], minlength=n_users)
        i_count = np.bincount(items[keep], minlength=n_items)
        drop = keep & ((u_count[users] < min_user) | (i_count[items] < min_item))
        removed = int(drop.sum())
        if removed == 0:
            return keep, passes
        keep &= ~drop
        passes.append({"removed": removed,
                       "users_below": int(((u_count > 0) & (u_count < min_user)).sum()),
                       "items_below": int(((i_count > 0) & (i_count < min_item)).sum())})


def time_order(cols: dict) -> np.ndarray:
    """Positions sorted by user, then timestamp, then row of the log."""
    keys = [cols["row"]] + ([cols["time"]] if "time" in cols else []) + [cols["user"]]
    return np.lexsort(keys)


def split_clean(cols: dict, n_users: int, split: SplitConfig) -> np.ndarray:
    """[n] int8 split (0 train, 1 valid, 2 test) of the interactions (step 5); ``cols``
    sorted by (user, item)."""
    if split.rule == "random":
        return assign_splits(cols["user"], n_users, "random", split.valid, split.test,
                             split.seed)
    counts = np.bincount(cols["user"], minlength=n_users)
    tails = (leave_one_out_counts(counts) if split.rule == "leave_one_out"
             else holdout_counts(counts, split.valid, split.test))
    return label_tails(time_order(cols), counts, *tails)


def split_noise(cols: dict, n_users: int, split: SplitConfig) -> np.ndarray:
    """[n] int8 split of the natural-noise pairs: train or valid only (step 6)."""
    if split.rule == "leave_one_out" or len(cols["user"]) == 0:
        return np.zeros(len(cols["user"]), np.int8)
    share = split.valid / (1.0 - split.test)
    if split.rule == "random":
        return assign_splits(cols["user"], n_users, "random", share, 0.0, split.seed + 1)
    counts = np.bincount(cols["user"], minlength=n_users)
    return label_tails(time_order(cols), counts, *holdout_counts(counts, share, 0.0))


def _subset(cols: dict, mask: np.ndarray) -> dict:
    return {k: v[mask] for k, v in cols.items()}


def _filter(cols: dict, mask: np.ndarray) -> None:
    """``cols`` narrowed to ``mask`` in place, one column at a time (each old column is
    freed as it is replaced, so the peak is one column more, not a second copy)."""
    for key in list(cols):
        cols[key] = cols[key][mask]


def _deduped_columns(got: dict, dedupe: str) -> dict:
    """The kept occurrence of each pair (step 2) as columns sorted by (user, item): ``row``
    (of the log; int32 when it fits), ``user``, ``item`` (+ ``time``, ``rating``). The
    read's columns are popped from ``got`` and freed one by one."""
    kept = pick_occurrences(got["users"], got["items"], got["n_items"], got["times"], dedupe)
    cols = {"row": kept.astype(np.int32) if got["rows"] <= np.iinfo(np.int32).max else kept}
    for key, name in (("users", "user"), ("items", "item"), ("times", "time"),
                      ("ratings", "rating")):
        values = got.pop(key)
        if values is not None:
            cols[name] = values[kept]
        del values
    return cols


def _compact_ids(cols: dict, noise: dict | None, got: dict):
    """Re-index users and items to those with an interaction left in ``cols``, in place
    (noise pairs of the others are dropped). Returns (user_ids, item_ids, noise pairs
    dropped): the original ids of the new indexes, still in sorted order."""
    user_alive = np.bincount(cols["user"], minlength=got["n_users"]) > 0
    item_alive = np.bincount(cols["item"], minlength=got["n_items"]) > 0
    dropped = 0
    if noise is not None:
        alive = user_alive[noise["user"]] & item_alive[noise["item"]]
        dropped = int((~alive).sum())
        _filter(noise, alive)
    new_user = np.cumsum(user_alive, dtype=np.int64) - 1
    new_item = np.cumsum(item_alive, dtype=np.int64) - 1
    for part in (cols, noise) if noise is not None else (cols,):
        part["user"] = new_user[part["user"]].astype(np.int32)
        part["item"] = new_item[part["item"]].astype(np.int32)
    return got["user_ids"][user_alive], got["item_ids"][item_alive], dropped


def _percentiles(values: np.ndarray) -> dict:
    out = {f"p{q}": float(np.percentile(values, q)) for q in PERCENTILES}
    out["mean"] = float(values.mean())
    return out


def dataset_stats(cols: dict, which: np.ndarray, noise: np.ndarray, n_users: int,
                  n_items: int) -> dict:
    """Sizes per split (clean and noise), density and percentiles of item popularity and
    user activity over the clean interactions (all splits)."""
    clean = ~noise
    sizes = {name: int(((which == s) & clean).sum()) for s, name in enumerate(SPLIT_NAMES)}
    total = sum(sizes.values())
    popularity = np.bincount(cols["item"][clean], minlength=n_items)
    top = np.sort(popularity)[::-1][:max(1, int(np.ceil(0.01 * n_items)))]
    return {"users": n_users, "items": n_items, "interactions": sizes,
            "noise": {name: int(((which == s) & noise).sum())
                      for s, name in enumerate(SPLIT_NAMES[:2])},
            "density": total / (n_users * n_items),
            "item_popularity": _percentiles(popularity),
            "top_1pct_items_share": float(top.sum() / max(total, 1)),
            "user_activity": _percentiles(np.bincount(cols["user"][clean],
                                                      minlength=n_users))}


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a directory")
    if out.is_dir() and not is_empty(out) and not overwrite:
        raise ConfigError(f"{out}: already exists; pass --overwrite to replace it")


def _write(out: Path, cols: dict, which: np.ndarray, user_ids, item_ids, manifest: dict,
           stats: dict) -> None:
    """All files into a temporary sibling of ``out``, then renamed into place."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = None
    try:
        default_mode(tmp, directory=True)        # mkdtemp's 0700 -> what mkdir would give
        order = time_order(cols)
        split_of = which[order]
        names = {"user": USER, "item": ITEM, "time": TIME, "rating": RATING}  # file columns
        keys = [k for k in names if k in cols]
        schema = pa.schema([(names[k], pa.from_numpy_dtype(cols[k].dtype)) for k in keys])
        for s, name in enumerate(SPLIT_NAMES):
            rows = order[split_of == s]              # this split, by user, oldest first
            with pq.ParquetWriter(tmp / SPLIT_FILES[name], schema) as writer:
                for start in range(0, len(rows), BATCH_ROWS):    # a row group at a time
                    chunk = rows[start:start + BATCH_ROWS]
                    writer.write_table(pa.Table.from_arrays([cols[k][chunk] for k in keys],
                                                            schema=schema))
            del rows
        write_id_maps(tmp, user_ids, len(user_ids), item_ids, len(item_ids))
        (tmp / STATS).write_text(json.dumps(stats, indent=2) + "\n")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
        if old is not None and old.exists():
            if out.exists():
                shutil.rmtree(old)
            else:
                os.replace(old, out)             # the new one failed to land: restore


def prepare(input_path: str | Path, out_dir: str | Path, cfg: PrepareConfig | None = None,
            overwrite: bool = False, batch_rows: int = BATCH_ROWS) -> dict:
    """Run the steps of the module docstring on ``input_path`` and write ``out_dir``.

    Returns the stats written to ``out_dir/stats.json``: ``input`` (path, rows),
    ``steps`` (duplicates, below_threshold, kcore passes and removals, noise pairs
    dropped with their users / items), the dataset's ``users``, ``items``,
    ``interactions`` per split, ``noise`` per split, ``density``, ``item_popularity`` /
    ``user_activity`` percentiles, ``top_1pct_items_share``, ``seconds`` and
    ``peak_rss_mib``. Errors (all before anything is written): ConfigError for the
    config or an existing ``out_dir`` without ``overwrite``; DataError naming the file,
    field and row for bad input, or for a result with an empty split; ConfigError from
    ``claim.claim`` when ``out_dir`` cannot be created or another process holds it.
    """
    with claim(out_dir):          # held to the end: one writer per dataset directory
        return _prepare(input_path, Path(out_dir), cfg or PrepareConfig(), overwrite,
                        batch_rows)


def _prepare(input_path, out: Path, cfg: PrepareConfig, overwrite: bool,
             batch_rows: int) -> dict:
    start = time.perf_counter()
    _check_target(out, overwrite)
    source = open_log(input_path)
    path, names = source.path, source.schema.names
    if cfg.rating_threshold is not None and RATING not in names:
        raise DataError(path, f"missing column: rating_threshold = {cfg.rating_threshold} "
                              f"needs ratings (the file has {names})", field=RATING)
    if cfg.split.rule != "random" and TIME not in names:
        raise DataError(path, f"missing column: split.rule '{cfg.split.rule}' needs "
                              f"timestamps (the file has {names})", field=TIME)

    got = read_interactions(source, batch_rows=batch_rows, ratings=True,
                            index_dtype=np.int32)
    rows = got["rows"]
    log.info("prepare: read %d rows (%d users, %d items) from %s", rows, got["n_users"],
             got["n_items"], path)
    cols = _deduped_columns(got, cfg.dedupe)
    steps = {"duplicates": rows - len(cols["row"])}

    positive = (np.ones(len(cols["row"]), bool) if cfg.rating_threshold is None
                else cols["rating"] >= cfg.rating_threshold)
    steps["below_threshold"] = int((~positive).sum())
    noise = _subset(cols, ~positive) if cfg.natural_noise else None
    _filter(cols, positive)
    del positive

    keep, passes = kcore(cols["user"], cols["item"], got["n_users"], got["n_items"],
                         cfg.kcore.users, cfg.kcore.items)
    steps["kcore_passes"], steps["kcore_removed"] = passes, int((~keep).sum())
    _filter(cols, keep)
    del keep
    if len(cols["row"]) == 0:
        raise DataError(path, f"no interactions left after rating_threshold = "
                              f"{cfg.rating_threshold} and kcore (users {cfg.kcore.users}, "
                              f"items {cfg.kcore.items}) ({rows} rows read)")
    user_ids, item_ids, noise_dropped = _compact_ids(cols, noise, got)
    n_users, n_items = len(user_ids), len(item_ids)
    if noise is not None:
        steps["noise_dropped"] = noise_dropped

    which = split_clean(cols, n_users, cfg.split)
    is_noise = np.zeros(len(which), bool)
    if noise is not None:
        which = np.concatenate([which, split_noise(noise, n_users, cfg.split)])
        is_noise = np.concatenate([is_noise, np.ones(len(noise["row"]), bool)])
        for key in cols:                         # one column at a time: one extra copy
            cols[key] = np.concatenate([cols[key], noise.pop(key)])
    del noise
    stats = dataset_stats(cols, which, is_noise, n_users, n_items)
    for name in ("valid", "test"):
        if stats["interactions"][name] == 0:
            raise DataError(path, f"the {name} split is empty (split.rule "
                                  f"'{cfg.split.rule}', {stats['interactions']['train']} "
                                  f"train interactions of {n_users} users): too few "
                                  f"interactions per user")
    stats = {"input": {"path": str(path), "rows": rows}, "steps": steps, **stats}
    manifest = {"format": FORMAT, "version": VERSION, "n_users": n_users,
                "n_items": n_items, "has_timestamp": "time" in cols,
                "has_rating": "rating" in cols, "input": str(path),
                "config": cfg.model_dump()}
    stats["seconds"] = time.perf_counter() - start
    stats["peak_rss_mib"] = peak_rss_mib()      # before writing (benchmarks/prepare.py
                                                 # measures the whole process)
    _write(out, cols, which, user_ids, item_ids, manifest, stats)
    log.info("prepare: %d users, %d items, train/valid/test %s (noise %s) -> %s in %.1f s, "
             "peak %.0f MiB", n_users, n_items, stats["interactions"], stats["noise"], out,
             stats["seconds"], stats["peak_rss_mib"])
    return stats
