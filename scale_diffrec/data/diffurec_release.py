"""The DiffuRec authors' released datasets (github.com/WHUIR/DiffuRec datasets/data/NAME;
copies in ../shared/data/diffurec, described by its PROVENANCE.txt) as ``Sequences``.

    dataset.pkl       a pickle of plain dicts: train / val / test {user: [item, ...]},
                      umap {original user: user}, smap {original item: item}; users
                      0..U-1, items 1..N (0 is the authors' padding); per user the
                      sequence is train ++ val ++ test, oldest first, val and test one
                      item each (leave-one-out)
    interactions.npz  the same without pickles: user, item, pos (index in the user's
                      sequence), split (0 train, 1 val, 2 test) [rows], umap / smap
                      (k, 2) [original id, new id]

Item i becomes catalogue index i - 1 (the padding is ``Sequences.pad`` = N); user and
item original ids come from umap / smap. Checks (DataError naming the file, the field and
the row of the npz, or the user for the pickle): the arrays and their types, umap's new
ids 0..U-1 and smap's 1..N each once, items in 1..N, rows ordered by user and position,
every user with >= 3 items whose last is test and second-to-last val, all others train.
The pickle is read by an Unpickler that refuses every class, so a file holding anything
but plain containers is refused, never run.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np

from ..errors import DataError
from .sequences import MIN_ITEMS, Sequences

NPZ, PKL = "interactions.npz", "dataset.pkl"
ARRAYS = ("user", "item", "pos", "split")
MAPS = ("umap", "smap")
TRAIN, VAL, TEST = 0, 1, 2


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refused class {module}.{name}: only plain containers")


def load_diffurec_release(path: str | Path, name: str | None = None) -> Sequences:
    """The released dataset at ``path``: a folder (its interactions.npz, else its
    dataset.pkl) or either file. ``name`` defaults to the folder's name."""
    path = Path(path)
    if path.is_dir():
        path = path / NPZ if (path / NPZ).is_file() else path / PKL
    if not path.is_file():
        raise DataError(path, f"file not found (a released DiffuRec dataset has {NPZ} or {PKL})")
    cols = _read_pkl(path) if path.suffix == ".pkl" else _read_npz(path)
    return _to_sequences(path, cols, name or path.parent.name)


def _read_npz(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ARRAYS + MAPS if k not in z.files]
            if missing:
                raise DataError(path, "missing array", field=missing[0])
            cols = {k: z[k] for k in ARRAYS + MAPS}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(path, f"not a readable npz file: {err}") from None
    for k in ARRAYS + MAPS:
        want = 1 if k in ARRAYS else 2
        if cols[k].ndim != want or not np.issubdtype(cols[k].dtype, np.integer) \
                or (k in MAPS and cols[k].shape[1] != 2):
            raise DataError(path, f"expected {'a 1-D' if want == 1 else 'a (k, 2)'} integer "
                                  f"array, got {cols[k].dtype} of shape {list(cols[k].shape)}",
                            field=k)
    if len({len(cols[k]) for k in ARRAYS}) != 1:
        raise DataError(path, f"arrays {list(ARRAYS)} differ in length "
                              f"{[len(cols[k]) for k in ARRAYS]}")
    cols["rows"] = True
    return cols


def _read_pkl(path: Path) -> dict:
    """The pickle's dicts as the npz's arrays (rows in user order, train ++ val ++ test)."""
    try:
        with open(path, "rb") as f:
            raw = _PlainUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise DataError(path, f"not a readable plain-dict pickle: {err}") from None
    if not isinstance(raw, dict):
        raise DataError(path, f"expected a dict, got {type(raw).__name__}")
    for key in ("train", "val", "test") + MAPS:
        if not isinstance(raw.get(key), dict):
            raise DataError(path, "missing, or not a dict", field=key)
    users, items, pos, split = [], [], [], []
    for user in sorted(raw["train"], key=_int_key(path, "train")):
        parts = [raw["train"][user], raw["val"].get(user), raw["test"].get(user)]
        for key, part in zip(("train", "val", "test"), parts):
            if not isinstance(part, list) or not all(_is_int(i) for i in part) \
                    or (key != "train" and len(part) != 1):
                raise DataError(path, f"user {user}: expected a list of "
                                      f"{'item ids' if key == 'train' else 'one item id'}, "
                                      f"got {part!r}"[:200], field=key)
        seq = parts[0] + parts[1] + parts[2]
        users += [user] * len(seq)
        items += seq
        pos += range(len(seq))
        split += [TRAIN] * len(parts[0]) + [VAL, TEST]
    extra = (set(raw["val"]) | set(raw["test"])) - set(raw["train"])
    if extra:
        raise DataError(path, f"user {min(extra)} has no train list", field="train")
    for key in MAPS:
        for k, v in raw[key].items():
            if not (_is_int(k) and _is_int(v)):
                raise DataError(path, f"expected integer -> integer, got {k!r} -> {v!r}",
                                field=key)
    try:
        cols = {"user": np.array(users, np.int64), "item": np.array(items, np.int64),
                "pos": np.array(pos, np.int64), "split": np.array(split, np.int64),
                "rows": False}
        for key in MAPS:
            cols[key] = np.array(list(raw[key].items()), np.int64).reshape(-1, 2)
    except OverflowError as err:
        raise DataError(path, f"an id does not fit in 64 bits: {err}") from None
    return cols


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_key(path: Path, field: str):
    def key(user):
        if not _is_int(user):
            raise DataError(path, f"user keys must be integers, got {user!r}", field=field)
        return user
    return key


def _new_ids(path: Path, table: np.ndarray, first: int, field: str) -> np.ndarray:
    """Original ids ordered by new id, checking the new ids are first..first+k-1 once each."""
    order = np.argsort(table[:, 1], kind="stable")
    bad = np.flatnonzero(table[order, 1] != np.arange(first, first + len(table)))
    if len(bad):
        raise DataError(path, f"new ids must be {first}..{first + len(table) - 1}, each once "
                              f"(found {table[order[bad[0]], 1]})", field=field,
                        row=int(order[bad[0]]))
    return table[order, 0]


def _to_sequences(path: Path, cols: dict, name: str) -> Sequences:
    user_ids = _new_ids(path, cols["umap"], 0, "umap")
    item_ids = _new_ids(path, cols["smap"], 1, "smap")
    n_users, n_items = len(user_ids), len(item_ids)
    user, item, pos, split = (cols[k].astype(np.int64) for k in ARRAYS)

    def fail(field: str, r: int, message: str):
        raise DataError(path, f"user {user[r]}, position {pos[r]}: {message}", field=field,
                        row=r if cols["rows"] else None)

    for field, values, lo, hi in (("user", user, 0, n_users), ("item", item, 1, n_items + 1)):
        bad = np.flatnonzero((values < lo) | (values >= hi))
        if len(bad):
            fail(field, int(bad[0]), f"{field} {values[bad[0]]} is not in {lo}..{hi - 1} "
                                     f"({'umap' if field == 'user' else 'smap'})")
    bad = np.flatnonzero(np.diff(user) < 0)
    if len(bad):
        fail("user", int(bad[0]) + 1, "rows must be ordered by user")
    counts = np.bincount(user, minlength=n_users)
    short = np.flatnonzero(counts < MIN_ITEMS)
    if len(short):
        raise DataError(path, f"user {short[0]} has {counts[short[0]]} items; leave-one-out "
                              f"needs at least {MIN_ITEMS}", field="user")
    offsets = np.zeros(n_users + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    local = np.arange(len(user), dtype=np.int64) - offsets[user]
    bad = np.flatnonzero(pos != local)
    if len(bad):
        fail("pos", int(bad[0]), f"expected position {local[bad[0]]} (rows ordered by "
                                 f"position within a user, from 0)")
    expected = np.zeros(len(user), np.int64)
    expected[offsets[1:] - 1], expected[offsets[1:] - 2] = TEST, VAL
    bad = np.flatnonzero(split != expected)
    if len(bad):
        fail("split", int(bad[0]), f"split {split[bad[0]]} where leave-one-out has "
                                   f"{expected[bad[0]]} (0 train, 1 val, 2 test)")
    dtype = np.int32 if n_items < np.iinfo(np.int32).max else np.int64
    return Sequences(name=name, items=(item - 1).astype(dtype), offsets=offsets,
                     n_items=n_items, user_ids=user_ids, item_ids=item_ids,
                     meta={"source": "diffurec_release", "path": str(path)})
