"""Per-user train/valid/test splits and the CSR matrices built from them.

Everything here is vectorized numpy over flat interaction arrays (``users``, ``items``,
``times``, all length n); nothing is ever users x items dense.

Rules (``data.split.rule``), per user u with n_u distinct interactions:

    n_test  = floor(test  * n_u + 0.5)
    n_valid = floor(valid * n_u + 0.5)
    at least one interaction stays in train: if n_valid + n_test > n_u - 1, valid is cut
    first, then test (so a user with a single interaction keeps it in train).

    random  the held-out interactions are a seeded random choice (``data.split.seed``):
            each interaction gets a uniform key, drawn in (user, item) order, so the split
            does not depend on the order of rows in the source file
    time    the latest n_test interactions (by time; equal times by item index) go to
            test, the n_valid before them to valid, the rest (the oldest) to train

Repeated (user, item) pairs count once, at their earliest time (``dedupe_pairs``).
"""
from __future__ import annotations

import numpy as np

from ..choices import SplitRule
from ..config import validate_section
from ..errors import ConfigError
from ..schema import SplitConfig
from .csr import CSR

RULES = SplitRule.values()
TRAIN, VALID, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "valid", "test")


def check_split_config(split: dict) -> tuple[str, float, float, int]:
    """(rule, valid, test, seed) from ``data.split`` (``schema.SplitConfig``: defaults,
    ranges, valid + test < 1), or a ConfigError naming the key."""
    s = validate_section(SplitConfig, split, "data.split")
    return s["rule"], s["valid"], s["test"], s["seed"]


def holdout_counts(counts: np.ndarray, valid: float, test: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per user (n_valid, n_test) for users with ``counts`` interactions (rule above)."""
    counts = np.asarray(counts, dtype=np.int64)
    n_test = np.floor(test * counts + 0.5).astype(np.int64)
    n_valid = np.floor(valid * counts + 0.5).astype(np.int64)
    room = np.maximum(counts - 1, 0)                 # at most n_u - 1 held out
    n_valid = np.minimum(n_valid, np.maximum(room - n_test, 0))
    n_test = np.minimum(n_test, room)
    return n_valid, n_test


def leave_one_out_counts(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per user (n_valid, n_test) for leave-one-out: the last interaction to test, the one
    before it to valid, keeping at least one in train (valid is dropped first: 2
    interactions -> train + test, 1 -> train)."""
    room = np.maximum(np.asarray(counts, dtype=np.int64) - 1, 0)
    n_test = np.minimum(room, 1)
    return np.minimum(room - n_test, 1), n_test


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique`` by sorting (numpy >= 2.3's hash-based np.unique is several times
    slower on millions of integers)."""
    s = np.sort(np.asarray(values))
    if len(s) < 2:
        return s
    keep = np.empty(len(s), bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


_GOLDEN = 0x9E3779B97F4A7C15                         # 2^64 / golden ratio, odd


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer (Steele, Lea & Flood, "Fast splittable pseudorandom number
    generators", OOPSLA 2014), in place on a uint64 array (wrapping arithmetic)."""
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def pair_keys(seed: int, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """[n] uint64 pseudo-random key of each (user, item) pair: a counter-based hash of
    (seed, user, item), so a pair's key depends on nothing else (not the order of the
    rows, not which other pairs are hashed with it)."""
    x = np.asarray(users, dtype=np.int64).astype(np.uint64)
    x += np.uint64((int(seed) * _GOLDEN) % (1 << 64))          # (seed, user) -> one word
    x = _mix64(x)
    x += np.asarray(items, dtype=np.int64).astype(np.uint64) * np.uint64(_GOLDEN)
    return _mix64(x)


def _order_within_users(users: np.ndarray, n_users: int, rank: np.ndarray, n_rank: int
                        ) -> np.ndarray:
    """Stable order by (user, rank) for rank in [0, n_rank): one packed int64 sort."""
    bits_r = int(max(n_rank - 1, 0)).bit_length()
    if int(max(n_users - 1, 0)).bit_length() + bits_r <= 62:
        packed = users << bits_r
        packed |= rank
        return np.argsort(packed, kind="stable")
    return np.lexsort((rank, users))


def assign_splits(users: np.ndarray, n_users: int, rule: str, valid: float, test: float,
                  seed: int = 0, times: np.ndarray | None = None) -> np.ndarray:
    """[n] int8 split of each interaction: 0 train, 1 valid, 2 test.

    ``random`` draws one uniform key per interaction in the given order (pass interactions
    sorted by (user, item) for an order-free split); ``time`` orders each user's
    interactions by ``times``, ties in input order (by item, for sorted input).
    """
    users = np.asarray(users, dtype=np.int64)
    n = len(users)
    if rule == "random":
        bits = min(62 - int(max(n_users - 1, 0)).bit_length(), 52)
        if bits >= 20:
            keys = np.random.default_rng(seed).integers(0, 1 << bits, n, dtype=np.int64)
            order = _order_within_users(users, n_users, keys, 1 << bits)
            del keys
        else:
            order = np.lexsort((np.random.default_rng(seed).random(n), users))
    elif rule == "time":
        if times is None:
            raise ValueError("the time split needs times")
        by_time = np.argsort(np.asarray(times), kind="stable")
        rank = np.empty(n, np.int64)
        rank[by_time] = np.arange(n, dtype=np.int64)
        del by_time
        order = _order_within_users(users, n_users, rank, n)
        del rank
    else:
        raise ConfigError(f"config key 'data.split.rule' must be one of {list(RULES)}, "
                          f"got {rule!r}")
    counts = np.bincount(users, minlength=n_users)
    return label_tails(order, counts, *holdout_counts(counts, valid, test))


def label_tails(order: np.ndarray, counts: np.ndarray, n_valid: np.ndarray,
                n_test: np.ndarray) -> np.ndarray:
    """[n] int8 split of each interaction (0 train, 1 valid, 2 test) from ``order``, the
    positions sorted by user and, within a user, oldest first: each user's last
    ``n_test`` go to test, the ``n_valid`` before them to valid (``counts``,
    ``n_valid``, ``n_test``: [n_users])."""
    n = len(order)
    ends = np.cumsum(counts)                         # one past each user's last position
    # in sorted order each user's range ends with n_valid 1s then n_test 2s: mark the
    # steps and integrate (int8, no n-length int64 temporaries)
    steps = np.zeros(n + 1, np.int8)
    np.add.at(steps, ends - n_test - n_valid, 1)
    np.add.at(steps, ends - n_test, 1)
    np.add.at(steps, ends, -2)
    out = np.empty(n, np.int8)
    out[order] = np.cumsum(steps[:-1], dtype=np.int8)
    return out


def _dedupe_keys(box: list, n_items: int, times, rows):
    """``dedupe_pairs`` on keys user * n_items + item handed over in ``box`` (a one-item
    list, emptied here so the input can be freed early)."""
    key = box.pop()
    n = len(key)
    perm = np.argsort(key, kind="stable")
    key = key[perm]
    first = np.empty(n, bool)
    first[:1] = True
    np.not_equal(key[1:], key[:-1], out=first[1:])
    key = key[first]                                 # distinct keys, sorted
    n_dropped = n - len(key)
    out_times = None
    if times is not None:
        times = np.asarray(times)
        if n_dropped == 0:
            out_times = times[perm]
        elif len(key):
            out_times = np.minimum.reduceat(times[perm], np.flatnonzero(first))
        else:
            out_times = times[:0]
    kept = perm[first]                               # first occurrence in input order
    del perm, first
    out_rows = kept if rows is None else np.asarray(rows)[kept]
    del kept
    users = key // np.int64(max(n_items, 1))
    key -= users * np.int64(max(n_items, 1))         # -> items
    return users, key, out_times, out_rows, n_dropped


def dedupe_pairs(users: np.ndarray, items: np.ndarray, n_items: int,
                 times: np.ndarray | None = None, rows: np.ndarray | None = None):
    """Sort by (user, item) and keep each pair once.

    Returns ``(users, items, times, rows, n_dropped)``: the kept pair's time is the
    earliest of its occurrences and its row the first (``rows`` defaults to the input
    position). ``times`` None comes back None.
    """
    box = [np.asarray(users, dtype=np.int64) * np.int64(max(n_items, 1))
           + np.asarray(items, dtype=np.int64)]
    return _dedupe_keys(box, n_items, times, rows)


def sorted_pairs_to_csr(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int,
                        values: np.ndarray | None = None) -> CSR:
    """CSR from pairs already sorted by (user, item) without repeats (no copy of order)."""
    users = np.asarray(users, dtype=np.int64)
    indptr = np.zeros(n_users + 1, np.int64)
    np.cumsum(np.bincount(users, minlength=n_users), out=indptr[1:])
    vals = (np.ones(len(users), np.float32) if values is None
            else np.asarray(values, dtype=np.float32))
    return CSR(indptr, np.ascontiguousarray(items, dtype=np.int64), vals, int(n_items))


def split_interactions(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int,
                       rule: str, valid: float, test: float, seed: int,
                       times: np.ndarray | None = None, rows: np.ndarray | None = None):
    """Dedupe, split and build the three CSRs.

    ``times`` None means "no timestamps": the time order is the source row order
    (``rows``, default input position), which is then also what ``train_times`` holds.
    Returns ``(train, valid, test, train_times, info)``; ``info`` has ``duplicates``
    (repeated pairs dropped) and ``sizes`` (nnz per split). Pass arrays nobody else holds
    (e.g. ``d.pop(...)``) and they are freed as soon as they are used: peak memory is a
    few tens of bytes per interaction.
    """
    box = [np.asarray(users, dtype=np.int64) * np.int64(max(n_items, 1))
           + np.asarray(items, dtype=np.int64)]
    del users, items
    users, items, times, rows, n_dropped = _dedupe_keys(box, n_items, times, rows)
    order_times = rows if times is None else times
    del times, rows
    which = assign_splits(users, n_users, rule, valid, test, seed, times=order_times)
    train_times = order_times[which == TRAIN]
    del order_times
    out = []
    for split in (TRAIN, VALID, TEST):
        mask = which == split
        out.append(sorted_pairs_to_csr(users[mask], items[mask], n_users, n_items))
    info = {"duplicates": int(n_dropped),
            "sizes": {name: m.nnz for name, m in zip(SPLIT_NAMES, out)}}
    return out[0], out[1], out[2], train_times, info
