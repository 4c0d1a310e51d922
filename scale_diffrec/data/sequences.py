"""Per-user item sequences in time order, split leave-one-out, batched as DiffuRec reads them
(DiffuRec, Li, Sun & Li, TOIS 2023; the official src/utils.py ``Data_Train`` / ``Data_Val``
/ ``Data_Test``).

Compact form (``Sequences``): ``items`` [N], every user's items oldest first, users in
index order, and ``offsets`` [U + 1] (user u's items are items[offsets[u]:offsets[u+1]]).
Items are catalogue indexes 0..n_items-1; the padding id is ``n_items`` (``pad``), outside
the catalogue. A sample is one position g in ``items``: its target is items[g] and its
input the (at most ``max_len``) items before g of the same user, LEFT-padded with ``pad``
to length max_len. Positions are all a training or evaluation loop holds; inputs are built
per batch (``batch``), never all prefixes at once.

Leave-one-out, per user of n >= 3 items: test = the last item (input: the n - 1 before
it), valid = the second-to-last (input: the n - 2 train items), train = the first n - 2;
every train item but the first is a training target, its input the train items before it
(``train_positions``: n - 3 samples per user, as ``Data_Train.split_onebyone``). Users with
fewer than 3 items (no train input for valid) are dropped by ``load_sequence_log``; the
DiffuRec authors' data pipeline drops them before (its files are 5-core).

``load_sequence_log`` reads a parquet (or CSV) log of user_id, item_id[, timestamp]
through the interaction path's validation and id codec (parquet.read_interactions:
DataError naming file, field and row; indexes = ranks of the original ids). Order within a
user: timestamp, equal timestamps (and a log without timestamps) by row of the log.
Repeated (user, item) rows are kept: a sequence may return to an item.

``load_sequence_prepared`` reads a directory that ``scale-diffrec prepare`` wrote with
``split.rule: leave_one_out`` (rating threshold, dedupe, k-core as configured there: the
way to follow the released 5-core data from a raw log): a user's sequence is its train
rows, then its valid row, then its test row, each file oldest first.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..errors import DataError
from .csr import CSR
from .id_maps import load_id_maps
from .parquet import BATCH_ROWS, read_interactions
from .prepare import open_log, time_order
from .prepared import MANIFEST, SPLIT_FILES, read_manifest, read_split
from .split import SPLIT_NAMES

MAX_LEN = 50          # DiffuRec's --max_len
MIN_ITEMS = 3         # one train item, valid, test
SPLITS = ("valid", "test")


class SequenceBatch(NamedTuple):
    """The model's batch of samples: ``inputs`` [B, max_len] int64 (left-padded with the
    pad id) and ``targets`` [B] int64."""
    inputs: torch.Tensor
    targets: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.inputs.device


@dataclass(frozen=True)
class Sequences:
    """Time-ordered sequences of ``n_users`` users over ``n_items`` items (module docstring).

    ``items`` [N] int32 (int64 past 2^31 - 1 items), ``offsets`` [n_users + 1] int64;
    ``user_ids`` / ``item_ids`` map indexes back to the source's original ids (None: the
    indexes are the ids); ``meta`` says where they came from; ``max_len``: the inputs'
    length (``diffurec.max_len``).
    """
    name: str
    items: np.ndarray
    offsets: np.ndarray
    n_items: int
    user_ids: np.ndarray | None = None
    item_ids: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    max_len: int = MAX_LEN

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def pad(self) -> int:
        """The padding id, n_items: distinct from every item index."""
        return self.n_items

    def lengths(self) -> np.ndarray:
        """[n_users] int64 items per user (train + valid + test)."""
        return np.diff(self.offsets)

    def train_positions(self) -> np.ndarray:
        """[S] int64 positions of every training target, S = sum over users of (n_u - 3):
        each train item after the user's first, in (user, time) order."""
        return _ranges(self.offsets[:-1] + 1, self.lengths() - 3)

    def eval_positions(self, split: str) -> np.ndarray:
        """[n_users] int64 position of each user's valid (second-to-last) or test (last)
        item. Errors: ValueError for another split."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.offsets[1:] - (2 if split == "valid" else 1)

    def history(self, split: str) -> CSR:
        """[n_users, n_items] CSR of the items each user's valid / test input holds (all
        the items before the target, not only the last max_len; a repeated item once):
        what the masked evaluation variant excludes from the ranking (a target equal to
        an earlier item included)."""
        starts = self.offsets[:-1]
        lengths = self.eval_positions(split) - starts
        users = np.repeat(np.arange(self.n_users, dtype=np.int64), lengths)
        return CSR.from_pairs(users, self.items[_ranges(starts, lengths)], self.n_users,
                              self.n_items)

    def truth(self, split: str) -> CSR:
        """[n_users, n_items] CSR of each user's valid / test target (one item a row)."""
        return CSR.from_pairs(np.arange(self.n_users, dtype=np.int64),
                              self.items[self.eval_positions(split)], self.n_users,
                              self.n_items)

    def samples(self, positions: np.ndarray, device=None) -> SequenceBatch:
        """``batch`` of ``positions`` [B] (non-empty) on ``device``."""
        inputs, targets = self.batch(positions)
        return SequenceBatch(inputs.to(device, non_blocking=True),
                             targets.to(device, non_blocking=True))

    def batch(self, positions: np.ndarray, max_len: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs [B, max_len], targets [B]), torch int64, for the samples at
        ``positions`` [B]: targets = items[g]; inputs = the up to max_len (default
        ``self.max_len``) items before g in g's user, oldest first, left-padded with
        ``pad``."""
        g = np.asarray(positions, dtype=np.int64)
        user = np.searchsorted(self.offsets, g, side="right") - 1
        return (torch.from_numpy(self.inputs_before(g, user, max_len)),
                torch.from_numpy(self.items[g].astype(np.int64)))

    def inputs_before(self, g: np.ndarray, users: np.ndarray, max_len: int | None = None
                      ) -> np.ndarray:
        """[B, max_len] int64: the up to max_len (default ``self.max_len``) items before
        position g[b] (at most the end of user users[b]'s items) of users[b], oldest first,
        left-padded with ``pad``."""
        max_len = self.max_len if max_len is None else max_len
        before = g[:, None] - max_len + np.arange(max_len, dtype=np.int64)[None, :]
        inside = before >= self.offsets[users][:, None]
        return np.where(inside, self.items[np.maximum(before, 0)], self.pad).astype(
            np.int64, copy=False)

    def next_items(self, device=None) -> SequenceBatch:
        """The batch that asks for every user's NEXT item (serving): inputs = the last
        max_len items of each whole sequence (left-padded), targets = ``pad``."""
        users = np.arange(self.n_users, dtype=np.int64)
        inputs = torch.from_numpy(self.inputs_before(self.offsets[1:], users))
        return SequenceBatch(inputs.to(device), torch.full((self.n_users,), self.pad,
                                                           device=device))

    def iter_batches(self, positions: np.ndarray, batch_size: int, max_len: int | None = None):
        """``batch`` of consecutive slices of ``positions`` (the last may be shorter).
        Shuffle or shard the positions first for training, e.g.
        ``iter_batches(rng.permutation(seqs.train_positions()), 512)``."""
        for start in range(0, len(positions), batch_size):
            yield self.batch(positions[start:start + batch_size], max_len)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """[sum(lengths)] int64: starts[0] .. starts[0] + lengths[0] - 1, then the next range."""
    lengths = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lengths)
    return np.repeat(np.asarray(starts, dtype=np.int64) - ends + lengths, lengths) \
        + np.arange(int(ends[-1]) if len(ends) else 0, dtype=np.int64)


def sequences_from_interactions(users: np.ndarray, items: np.ndarray, n_users: int,
                                n_items: int, times: np.ndarray | None = None,
                                min_items: int = MIN_ITEMS, name: str = "sequences",
                                user_ids: np.ndarray | None = None,
                                item_ids: np.ndarray | None = None) -> Sequences:
    """``Sequences`` of interaction arrays (users, items, times: [n], indexes < n_users /
    n_items; ``user_ids`` [n_users] / ``item_ids`` [n_items] original ids or None), each
    user's items ordered by time, then by array position. Users with fewer than
    ``min_items`` (>= 3) interactions are dropped and the others renumbered in order;
    ``meta`` counts the dropped users and rows. Errors: ValueError for min_items < 3."""
    if min_items < MIN_ITEMS:
        raise ValueError(f"min_items must be >= {MIN_ITEMS} (train, valid, test), got {min_items}")
    cols = {"user": users, "row": np.arange(len(users), dtype=np.int64)}
    if times is not None:
        cols["time"] = times
    order = time_order(cols)
    counts = np.bincount(users, minlength=n_users)
    kept = counts >= min_items
    order = order[kept[users[order]]]
    offsets = np.zeros(int(kept.sum()) + 1, np.int64)
    np.cumsum(counts[kept], out=offsets[1:])
    dtype = np.int32 if n_items < np.iinfo(np.int32).max else np.int64
    meta = {"dropped_users": int((~kept).sum()), "dropped_rows": int(len(users) - len(order))}
    return Sequences(name=name, items=np.asarray(items)[order].astype(dtype), offsets=offsets,
                     n_items=int(n_items), item_ids=item_ids, meta=meta,
                     user_ids=None if user_ids is None else np.asarray(user_ids)[kept])


def load_sequence_log(path: str | Path, n_items: int | None = None,
                      min_items: int = MIN_ITEMS, name: str | None = None,
                      batch_rows: int = BATCH_ROWS) -> Sequences:
    """Sequences of a parquet / CSV log of user_id, item_id[, timestamp] (module docstring;
    ``n_items``: ``data.n_items``, item ids are then indexes below it). ``meta`` counts
    the users dropped for having fewer than ``min_items`` interactions and their rows.
    Errors: DataError naming the file, field and row (read_interactions), or the file when
    no user has ``min_items`` interactions."""
    path = Path(path)
    got = read_interactions(open_log(path), n_items=n_items, batch_rows=batch_rows,
                            index_dtype=np.int32)
    seqs = sequences_from_interactions(got["users"], got["items"], got["n_users"],
                                       got["n_items"], got["times"], min_items,
                                       name=name or path.stem, user_ids=got["user_ids"],
                                       item_ids=got["item_ids"])
    if seqs.n_users == 0:
        raise DataError(path, f"no user has the {min_items} interactions that a "
                              f"leave-one-out split needs ({got['n_users']} users)")
    seqs.meta.update({"source": "log", "path": str(path), "rows": got["rows"],
                      "has_timestamp": got["has_timestamp"]})
    return seqs


def load_sequence_prepared(folder: str | Path, name: str | None = None) -> Sequences:
    """Sequences of a prepared dataset directory split leave-one-out (module docstring),
    original ids attached. Errors: DataError naming the manifest's ``config.split.rule``
    for another split, or a split file, field and row (prepared.read_split); a user with
    3 or more items must have one valid and one test row (file and user named)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    rule = (manifest.get("config") or {}).get("split", {}).get("rule")
    if rule != "leave_one_out":
        raise DataError(folder / MANIFEST, f"sequences need a leave-one-out split, the "
                                           f"directory was prepared with {rule!r}",
                        field="config.split.rule")
    n_users, n_items = manifest["n_users"], manifest["n_items"]
    parts = [read_split(folder / SPLIT_FILES[split], n_users, n_items)[:2]
             for split in SPLIT_NAMES]
    long_enough = sum(np.bincount(users, minlength=n_users) for users, _ in parts) >= MIN_ITEMS
    for split, (users, _) in zip(SPLIT_NAMES[1:], parts[1:]):
        wrong = np.flatnonzero(long_enough & (np.bincount(users, minlength=n_users) != 1))
        if len(wrong):
            raise DataError(folder / SPLIT_FILES[split], f"user {wrong[0]} has "
                            f"{np.sum(users == wrong[0])} rows, leave-one-out has one")
    user_ids, item_ids = load_id_maps(folder)
    seqs = sequences_from_interactions(np.concatenate([u for u, _ in parts]),
                                       np.concatenate([i for _, i in parts]), n_users,
                                       n_items, name=name or folder.name, user_ids=user_ids,
                                       item_ids=item_ids)
    seqs.meta.update({"source": "dataset", "path": str(folder)})
    return seqs
