"""``scale-diffrec prepare``: a raw interaction log -> a prepared dataset directory
(prepared.py) that ``train`` reads with ``data.source: dataset``.

Input: a parquet log, or CSV (``.csv``, ``.csv.gz``, ``.csv.bz2``; csv_log.py), with
``user_id``, ``item_id`` and optionally ``rating`` and ``timestamp``, validated row by row
as the parquet source validates its input (columns.py): bad input is a DataError naming
the file, the field and the 0-based row, raised before anything is in place.

The steps, in this order; each is a key of the prepare config (prepare_config.py; RecBole's
nearest option in brackets):

1. read, streaming over record batches (parquet row groups / CSV blocks; parquet.IdScan):
   pass 1 collects the distinct ids (users and items get their rank in sorted id order);
   when the log has more rows than one bucket holds (``memory_mib``, below), pass 2
   counts the rows of each user and cuts the users into B contiguous ranges, the buckets
   (buckets.py); pass 3 maps every row to (user index, item index, log row, timestamp,
   rating) and spills it into its user's bucket file, in a ``spill`` folder inside the
   output's temporary sibling. Every step below that works per user (2, 3, 5, 6) runs one
   bucket at a time; step 4 streams the buckets once per pass.
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
   are dropped; the passes are listed in stats.json. Only the per-user and per-item
   counts and alive flags are held (``kcore_alive``): a pair is kept while its user and
   its item are both alive.
5. ``split`` (``eval_args``), per user:

       random         a seeded (``split.seed``) random choice of ``split.valid`` /
                      ``split.test`` fractions: each pair's place in its user's order is
                      a counter-based hash of (seed, user index, item index)
                      (split.pair_keys), independent of the log's row order and of the
                      buckets
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

Every result is the same for any number of buckets (a user's rows are all in one bucket;
the k-core is the unique largest subset; the random draw is keyed by pair), and the split
files are appended bucket by bucket in row groups of a fixed size, so they are the same
bytes too.

Memory: bounded by ``memory_mib`` and the number of distinct ids, not by the rows. A
bucket holds at most memory_mib * 2^20 / ``BYTES_PER_ROW`` rows of the log (more only for
a single user with more rows than that), and one bucket at a time is in memory, at up to
``BYTES_PER_ROW`` (100) bytes per row while it is deduplicated, split and sorted (its
columns, the sort keys and permutations, the noise pairs joined to the clean ones).
Besides that: per distinct user and item ~40 bytes (the ids and their lookup, rows,
counts, alive flags and new indexes: int64 arrays of n_users and of n_items), and a fixed
part, ~370 MiB, for pyarrow's reading of 2^20-row record batches (``batch_rows``) and
spilling them, and the row groups of 2^20 rows being assembled for the split files.
Peak ~ imports + 370 MiB + 40 B x (n_users + n_items) + min(memory_mib, 100 B x rows)
(fitted to benchmarks/prepare.py's synthetic runs: 20M rows at memory_mib 1024 and 256
give ~96 bytes per bucket row). Disk: the spilled rows (24 bytes per row of the log with
timestamp and rating, then per deduplicated pair) in the temporary sibling, freed bucket
by bucket, plus the output.

Output: prepared.py's directory, built in a temporary sibling and renamed into place, so
a failed run leaves nothing behind and an existing directory is replaced (only with
``overwrite``) in one step. The directory is claimed for the whole run (``claim``), so
two prepares of one directory cannot both write it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ..claim import claim, is_empty
from ..errors import ConfigError, DataError
from ..files import default_mode, write_errors
from ..progress import log, peak_rss_mib
from .buckets import Spill, bucket_starts
from .columns import ITEM as ITEM_ID, RATING, TIME, USER as USER_ID
from .csv_log import CsvLog
from .id_maps import write_id_maps
from .parquet import BATCH_ROWS, IdScan, ParquetLog
from .prepare_config import PrepareConfig, SplitConfig
from .prepared import FORMAT, ITEM, MANIFEST, SPLIT_FILES, STATS, USER, VERSION
from .split import (SPLIT_NAMES, holdout_counts, label_tails, leave_one_out_counts,
                    pair_keys)

CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2")
PERCENTILES = (0, 25, 50, 75, 90, 99, 100)
BYTES_PER_ROW = 100          # peak bytes per row of a bucket in memory (module docstring)
_INT32_MAX = np.iinfo(np.int32).max


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


def pair_counts(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int):
    """(per-user [n_users], per-item [n_items]) int64 counts of the pairs."""
    return np.bincount(users, minlength=n_users), np.bincount(items, minlength=n_items)


def kcore_alive(counts, user_count: np.ndarray, item_count: np.ndarray, min_user: int,
                min_item: int):
    """Iterative k-core (module docstring, step 4) over pairs that are only counted.

    ``user_count`` [n_users] / ``item_count`` [n_items]: the pairs per user and item;
    ``counts(alive_users, alive_items)`` recounts them over the pairs whose user and item
    are both alive. A user or item below its bound at some pass loses all its pairs then,
    and counts only fall, so the kept pairs are always those of alive users and items.
    Returns (alive_users, alive_items, the final user and item counts, one record per pass
    that removed something: {removed, users_below, items_below})."""
    alive_u, alive_i = np.ones(len(user_count), bool), np.ones(len(item_count), bool)
    passes: list[dict] = []
    if min_user <= 1 and min_item <= 1:
        return alive_u, alive_i, user_count, item_count, passes   # every one present has 1
    total = int(user_count.sum())
    while True:
        below_u = (user_count > 0) & (user_count < min_user)
        below_i = (item_count > 0) & (item_count < min_item)
        if not (below_u.any() or below_i.any()):
            return alive_u, alive_i, user_count, item_count, passes
        alive_u &= ~below_u
        alive_i &= ~below_i
        user_count, item_count = counts(alive_u, alive_i)
        kept = int(user_count.sum())
        passes.append({"removed": total - kept, "users_below": int(below_u.sum()),
                       "items_below": int(below_i.sum())})
        total = kept


def kcore(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int,
          min_user: int, min_item: int) -> tuple[np.ndarray, list[dict]]:
    """``kcore_alive`` on pairs held in memory: a keep mask [n] and its pass records."""
    def counts(alive_u, alive_i):
        keep = alive_u[users] & alive_i[items]
        return pair_counts(users[keep], items[keep], n_users, n_items)
    alive_u, alive_i, _, _, passes = kcore_alive(
        counts, *pair_counts(users, items, n_users, n_items), min_user, min_item)
    return alive_u[users] & alive_i[items], passes


def time_order(cols: dict) -> np.ndarray:
    """Positions sorted by user, then timestamp, then row of the log."""
    keys = [cols["row"]] + ([cols["time"]] if "time" in cols else []) + [cols["user"]]
    return np.lexsort(keys)


def _user_order(cols: dict, rule: str, seed: int, base: int) -> np.ndarray:
    """Positions sorted by user, then by the split's order within a user: oldest first
    (``time_order``), or by ``pair_keys`` of (seed, base + user, item) for random."""
    if rule != "random":
        return time_order(cols)
    keys = pair_keys(seed, cols["user"].astype(np.int64) + base, cols["item"])
    return np.lexsort((keys, cols["user"]))


def split_clean(cols: dict, n_users: int, split: SplitConfig, base: int = 0) -> np.ndarray:
    """[n] int8 split (0 train, 1 valid, 2 test) of the interactions (step 5) of users
    ``base`` .. ``base + n_users - 1``, numbered from 0 in ``cols["user"]``."""
    counts = np.bincount(cols["user"], minlength=n_users)
    tails = (leave_one_out_counts(counts) if split.rule == "leave_one_out"
             else holdout_counts(counts, split.valid, split.test))
    return label_tails(_user_order(cols, split.rule, split.seed, base), counts, *tails)


def split_noise(cols: dict, n_users: int, split: SplitConfig, base: int = 0) -> np.ndarray:
    """[n] int8 split of the natural-noise pairs: train or valid only (step 6); users as
    in ``split_clean``."""
    if split.rule == "leave_one_out" or len(cols["user"]) == 0:
        return np.zeros(len(cols["user"]), np.int8)
    share = split.valid / (1.0 - split.test)
    counts = np.bincount(cols["user"], minlength=n_users)
    return label_tails(_user_order(cols, split.rule, split.seed + 1, base), counts,
                       *holdout_counts(counts, share, 0.0))


def _subset(cols: dict, mask: np.ndarray) -> dict:
    return {k: v[mask] for k, v in cols.items()}


def _filter(cols: dict, mask: np.ndarray) -> None:
    """``cols`` narrowed to ``mask`` in place, one column at a time (each old column is
    freed as it is replaced, so the peak is one column more, not a second copy)."""
    for key in list(cols):
        cols[key] = cols[key][mask]


def _percentiles(values: np.ndarray) -> dict:
    out = {f"p{q}": float(np.percentile(values, q)) for q in PERCENTILES}
    out["mean"] = float(values.mean())
    return out


def dataset_stats(sizes: dict, noise: dict, popularity: np.ndarray,
                  activity: np.ndarray) -> dict:
    """Sizes per split (clean ``sizes``, ``noise``), density and percentiles of item
    popularity [n_items] and user activity [n_users] (clean interactions, all splits)."""
    n_users, n_items = len(activity), len(popularity)
    total = sum(sizes.values())
    top = np.sort(popularity)[::-1][:max(1, int(np.ceil(0.01 * n_items)))]
    return {"users": n_users, "items": n_items, "interactions": sizes, "noise": noise,
            "density": total / (n_users * n_items),
            "item_popularity": _percentiles(popularity),
            "top_1pct_items_share": float(top.sum() / max(total, 1)),
            "user_activity": _percentiles(activity)}


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a directory")
    if out.is_dir() and not is_empty(out) and not overwrite:
        raise ConfigError(f"{out}: already exists; pass --overwrite to replace it")


@contextlib.contextmanager
def _staged(out: Path):
    """A temporary sibling of ``out`` to build the directory in: renamed onto ``out`` when
    the block succeeds (an existing ``out`` replaced in one step), removed otherwise."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = None
    try:
        default_mode(tmp, directory=True)        # mkdtemp's 0700 -> what mkdir would give
        yield tmp
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


class _RowGroups:
    """A parquet file of ``schema`` written in row groups of ``BATCH_ROWS`` rows from
    columns appended in pieces of any size (the file does not depend on the pieces)."""

    def __init__(self, path: Path, schema):
        import pyarrow.parquet as pq
        self.schema, self.parts, self.n = schema, [], 0
        self.writer = pq.ParquetWriter(path, schema)

    def append(self, columns: list[np.ndarray]) -> None:
        self.parts.append(columns)
        self.n += len(columns[0])
        if self.n >= BATCH_ROWS:
            self._flush(BATCH_ROWS * (self.n // BATCH_ROWS))

    def _flush(self, n: int) -> None:
        import pyarrow as pa
        cols = [np.concatenate(c) for c in zip(*self.parts)]
        self.writer.write_table(pa.Table.from_arrays([c[:n] for c in cols], schema=self.schema),
                                row_group_size=BATCH_ROWS)
        self.parts, self.n = [[c[n:] for c in cols]], self.n - n

    def __enter__(self):
        return self

    def __exit__(self, kind, *_) -> None:
        """Writes what is left, unless the block failed; closes the file."""
        try:
            if kind is None and self.n:
                self._flush(self.n)
        finally:
            self.writer.close()


def _spill_log(scan: IdScan, folder: Path, memory_mib: float) -> Spill:
    """Step 1's passes 2 and 3: the buckets (a count of rows per user first, unless one
    bucket holds the log) and the ``log`` files of (row, user, item[, time][, rating])."""
    rows_per_bucket = max(1, int(memory_mib * (1 << 20) / BYTES_PER_ROW))
    starts = np.zeros(1, np.int64)
    if scan.rows > rows_per_bucket:
        user_rows = np.zeros(scan.n_users, np.int64)
        for _, chunk in scan.chunks((USER_ID,)):
            user_rows += np.bincount(chunk[USER_ID], minlength=scan.n_users)
        starts = bucket_starts(user_rows, rows_per_bucket)
        del user_rows
    index = np.int32 if max(scan.n_users, scan.n_items) <= _INT32_MAX else np.int64
    row = np.int32 if scan.rows <= _INT32_MAX else np.int64
    names = {USER_ID: "user", ITEM_ID: "item", TIME: "time", RATING: "rating"}

    def columns():
        for offset, chunk in scan.chunks(ratings=True):
            cols = {"row": np.arange(offset, offset + len(chunk[USER_ID]), dtype=row)}
            for field, values in chunk.items():
                cols[names[field]] = (values.astype(index) if field in (USER_ID, ITEM_ID)
                                      else values)
            yield cols
    spill = Spill(folder, starts, scan.n_users)
    spill.spill("log", columns())
    log.info("prepare: read %d rows (%d users, %d items) from %s into %d bucket(s) of "
             "users (memory_mib %g)", scan.rows, scan.n_users, scan.n_items, scan.path,
             spill.n_buckets, memory_mib)
    return spill


def _dedupe_threshold(spill: Spill, n_users: int, n_items: int, cfg: PrepareConfig):
    """Steps 2 and 3, bucket by bucket: the ``clean`` (and ``noise``) files. Returns
    (duplicates, pairs below the threshold, clean pairs per user and per item)."""
    user_count, item_count = np.zeros(n_users, np.int64), np.zeros(n_items, np.int64)
    duplicates = below = 0
    for b in range(spill.n_buckets):
        cols = spill.read("log", b)
        spill.drop("log", b)
        kept = pick_occurrences(cols["user"], cols["item"], n_items, cols.get("time"),
                                cfg.dedupe)
        duplicates += len(cols["row"]) - len(kept)
        _filter(cols, kept)
        del kept
        positive = (np.ones(len(cols["row"]), bool) if cfg.rating_threshold is None
                    else cols["rating"] >= cfg.rating_threshold)
        below += int((~positive).sum())
        if cfg.natural_noise:
            spill.write("noise", b, _subset(cols, ~positive))
        _filter(cols, positive)
        spill.write("clean", b, cols)
        lo, hi = spill.users(b)
        user_count[lo:hi], i_count = pair_counts(cols["user"] - lo, cols["item"], hi - lo,
                                                 n_items)
        item_count += i_count
    return duplicates, below, user_count, item_count


def _bucket_counts(spill: Spill, n_items: int):
    """``kcore_alive``'s recount: streams the ``clean`` files' users and items."""
    def counts(alive_u, alive_i):
        user_count = np.zeros(len(alive_u), np.int64)
        item_count = np.zeros(n_items, np.int64)
        for b in range(spill.n_buckets):
            cols = spill.read("clean", b, ["user", "item"])
            keep = alive_u[cols["user"]] & alive_i[cols["item"]]
            lo, hi = spill.users(b)
            user_count[lo:hi], i_count = pair_counts(cols["user"][keep] - lo,
                                                     cols["item"][keep], hi - lo, n_items)
            item_count += i_count
        return user_count, item_count
    return counts


def _ranks(alive: np.ndarray) -> np.ndarray:
    """[n + 1] int64: entry i is the number of alive entries before i (an alive entry's
    new index)."""
    out = np.zeros(len(alive) + 1, np.int64)
    np.cumsum(alive, out=out[1:])
    return out


def _split_write(spill: Spill, folder: Path, schema, cfg: PrepareConfig, alive: tuple,
                 survivors: tuple) -> tuple[dict, dict, int]:
    """Steps 5 and 6 and the split files, bucket by bucket: the clean pairs of alive
    users and items (``alive``: the k-core's flags, or None when it removed nothing) and
    the noise pairs of ``survivors`` (users, items with a clean pair left), re-indexed to
    the survivors and written by user, oldest first. Returns (clean pairs per split,
    noise pairs per split, noise pairs dropped)."""
    user_alive, item_alive = survivors
    new_user, new_item = _ranks(user_alive), _ranks(item_alive)
    index = schema.field(USER).type.to_pandas_dtype()
    file_names = {"user": USER, "item": ITEM, "time": TIME, "rating": RATING}
    keys = [k for k, name in file_names.items() if name in schema.names]
    sizes, noise_sizes = dict.fromkeys(SPLIT_NAMES, 0), dict.fromkeys(SPLIT_NAMES[:2], 0)
    dropped = 0

    def reindexed(cols: dict, base: int) -> dict:
        cols["user"] = (new_user[cols["user"]] - base).astype(index)
        cols["item"] = new_item[cols["item"]].astype(index)
        return cols
    with write_errors(folder), contextlib.ExitStack() as stack:
        writers = [stack.enter_context(_RowGroups(folder / SPLIT_FILES[name], schema))
                   for name in SPLIT_NAMES]
        for b in range(spill.n_buckets):
            lo, hi = spill.users(b)
            base, n_local = int(new_user[lo]), int(new_user[hi] - new_user[lo])
            cols = spill.read("clean", b)
            if alive is not None:
                _filter(cols, alive[0][cols["user"]] & alive[1][cols["item"]])
            which = split_clean(reindexed(cols, base), n_local, cfg.split, base)
            is_noise = np.zeros(len(which), bool)
            if cfg.natural_noise:
                noise = spill.read("noise", b)
                keep = user_alive[noise["user"]] & item_alive[noise["item"]]
                dropped += int((~keep).sum())
                _filter(noise, keep)
                which = np.concatenate([which, split_noise(reindexed(noise, base), n_local,
                                                           cfg.split, base)])
                is_noise = np.concatenate([is_noise, np.ones(len(noise["row"]), bool)])
                for key in cols:                 # one column at a time: one extra copy
                    cols[key] = np.concatenate([cols[key], noise.pop(key)])
            for s, name in enumerate(SPLIT_NAMES):
                sizes[name] += int(((which == s) & ~is_noise).sum())
                if name in noise_sizes:
                    noise_sizes[name] += int(((which == s) & is_noise).sum())
            order = time_order(cols)
            split_of = which[order]
            cols["user"] += index(base)
            for s, writer in enumerate(writers):
                rows = order[split_of == s]      # this split, by user, oldest first
                writer.append([cols[k][rows] for k in keys])
            spill.drop("clean", b)
            spill.drop("noise", b)
    return sizes, noise_sizes, dropped


def _output_schema(scan: IdScan):
    import pyarrow as pa
    index = pa.int32() if max(scan.n_users, scan.n_items) <= _INT32_MAX else pa.int64()
    fields = [(USER, index), (ITEM, index)]
    if scan.has_time:
        fields.append((TIME, pa.float64() if scan.tkind == "float" else pa.int64()))
    if scan.has_rating:
        fields.append((RATING, pa.float32()))
    return pa.schema(fields)


def prepare(input_path: str | Path, out_dir: str | Path, cfg: PrepareConfig | None = None,
            overwrite: bool = False, batch_rows: int = BATCH_ROWS) -> dict:
    """Run the steps of the module docstring on ``input_path`` and write ``out_dir``.

    Returns the stats written to ``out_dir/stats.json``: ``input`` (path, rows),
    ``buckets`` (B), ``steps`` (duplicates, below_threshold, kcore passes and removals,
    noise pairs dropped with their users / items), the dataset's ``users``, ``items``,
    ``interactions`` per split, ``noise`` per split, ``density``, ``item_popularity`` /
    ``user_activity`` percentiles, ``top_1pct_items_share``, ``seconds`` and
    ``peak_rss_mib``. Errors (all before anything is in place): ConfigError for the
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

    scan = IdScan(source, batch_rows=batch_rows)
    rows = scan.rows
    with _staged(out) as tmp:
        spill = _spill_log(scan, tmp / "spill", cfg.memory_mib)
        duplicates, below, user_count, item_count = _dedupe_threshold(
            spill, scan.n_users, scan.n_items, cfg)
        steps = {"duplicates": duplicates, "below_threshold": below}
        alive_u, alive_i, user_count, item_count, passes = kcore_alive(
            _bucket_counts(spill, scan.n_items), user_count, item_count, cfg.kcore.users,
            cfg.kcore.items)
        steps["kcore_passes"] = passes
        steps["kcore_removed"] = sum(p["removed"] for p in passes)
        if user_count.sum() == 0:
            raise DataError(path, f"no interactions left after rating_threshold = "
                                  f"{cfg.rating_threshold} and kcore (users "
                                  f"{cfg.kcore.users}, items {cfg.kcore.items}) ({rows} "
                                  f"rows read)")
        user_alive, item_alive = user_count > 0, item_count > 0
        sizes, noise, dropped = _split_write(
            spill, tmp, _output_schema(scan), cfg, (alive_u, alive_i) if passes else None,
            (user_alive, item_alive))
        if cfg.natural_noise:
            steps["noise_dropped"] = dropped
        stats = dataset_stats(sizes, noise, item_count[item_alive], user_count[user_alive])
        n_users, n_items = stats["users"], stats["items"]
        for name in ("valid", "test"):
            if sizes[name] == 0:
                raise DataError(path, f"the {name} split is empty (split.rule "
                                      f"'{cfg.split.rule}', {sizes['train']} train "
                                      f"interactions of {n_users} users): too few "
                                      f"interactions per user")
        shutil.rmtree(spill.folder)
        user_ids = scan.user_ids[user_alive]
        item_ids = scan.item_ids[item_alive]
        stats = {"input": {"path": str(path), "rows": rows}, "buckets": spill.n_buckets,
                 "steps": steps, **stats}
        manifest = {"format": FORMAT, "version": VERSION, "n_users": n_users,
                    "n_items": n_items, "has_timestamp": scan.has_time,
                    "has_rating": scan.has_rating, "input": str(path),
                    "config": cfg.model_dump()}
        write_id_maps(tmp, user_ids, n_users, item_ids, n_items)
        stats["seconds"] = time.perf_counter() - start
        stats["peak_rss_mib"] = peak_rss_mib()   # benchmarks/prepare.py measures the
        (tmp / STATS).write_text(json.dumps(stats, indent=2) + "\n")   # whole process
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("prepare: %d users, %d items, train/valid/test %s (noise %s) -> %s in %.1f s, "
             "peak %.0f MiB", n_users, n_items, stats["interactions"], stats["noise"], out,
             stats["seconds"], stats["peak_rss_mib"])
    return stats
