"""The DiffRec authors' dataset folders: ``train_list.npy``, ``valid_list.npy``,
``test_list.npy`` (+ optional ``item_emb.npy``).

Each ``*_list.npy`` is an integer array [n, 2] of [user, item] pairs, 0-based
(github.com/YiyanXu/DiffRec, ``data_utils.data_load``). The ids are used as indexes as
they are: n_users = max user id + 1 and n_items = max item id + 1 over all three files
(or ``n_items`` when declared; an item id at or past it is an error).

The order of a user's pairs in ``train_list.npy`` is their time order (T-DiffRec weights
them by it), so ``train_times`` holds each train pair's row in that file. A pair repeated
within one file counts once (its first row). ``item_emb.npy`` [n_items, d] (the authors'
LightGCN vectors, for L-DiffRec's k-means) is read when present.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from .dataset import InteractionData
from .split import SPLIT_NAMES, dedupe_pairs, sorted_pairs_to_csr

SPLIT_FILES = {name: f"{name}_list.npy" for name in SPLIT_NAMES}
ITEM_EMB_FILE = "item_emb.npy"
FIELDS = ("user", "item")            # column 0, column 1


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(path, f"not a readable .npy array (truncated or corrupt?): "
                              f"{err}") from None


def read_pairs(path: str | Path, n_items: int | None = None) -> np.ndarray:
    """[n, 2] int64 [user, item] pairs from one ``*_list.npy``, validated.

    Errors (DataError naming the file, and the field 'user' / 'item' and the row where
    one is at fault): not found, unreadable, not [n, 2], not integer (floats are accepted
    only when every value is a whole number), NaN, negative, item id >= ``n_items``,
    no rows.
    """
    path = Path(path)
    arr = _load_npy(path)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise DataError(path, f"expected an array of shape [n, 2] ([user, item] pairs), "
                              f"got shape {list(arr.shape)}")
    kind = arr.dtype.kind
    if kind not in "iuf":
        raise DataError(path, f"expected integer ids, got dtype {arr.dtype}")
    if len(arr) == 0:
        raise DataError(path, "no interactions (the split is empty)")
    if kind == "f":
        for col, field in enumerate(FIELDS):
            values = arr[:, col]
            bad = np.flatnonzero(~np.isfinite(values))
            if len(bad):
                raise DataError(path, f"missing id ({values[bad[0]]})", field=field,
                                row=int(bad[0]))
            bad = np.flatnonzero(values != np.floor(values))
            if len(bad):
                raise DataError(path, f"non-integer id {values[bad[0]].item()!r}", field=field,
                                row=int(bad[0]))
    if kind == "u" and arr.max() > np.iinfo(np.int64).max:
        row, col = np.unravel_index(int(np.argmax(arr)), arr.shape)
        raise DataError(path, f"id {arr[row, col]} is too large", field=FIELDS[col],
                        row=int(row))
    for col, field in enumerate(FIELDS):
        bad = np.flatnonzero(arr[:, col] < 0)
        if len(bad):
            raise DataError(path, f"negative id {arr[bad[0], col]}", field=field,
                            row=int(bad[0]))
    pairs = arr.astype(np.int64)
    if n_items is not None:
        bad = np.flatnonzero(pairs[:, 1] >= n_items)
        if len(bad):
            raise DataError(path, f"item id {pairs[bad[0], 1]} is not below the declared "
                                  f"data.n_items = {n_items}", field="item", row=int(bad[0]))
    return pairs


def read_item_emb(path: str | Path, n_items: int) -> np.ndarray:
    """[n_items, d] float32 item embeddings from a .npy file, validated."""
    path = Path(path)
    emb = _load_npy(path)
    if emb.ndim != 2 or emb.shape[1] < 1:
        raise DataError(path, f"expected an array of shape [n_items, d], got shape "
                              f"{list(emb.shape)}")
    if emb.dtype.kind not in "iuf":
        raise DataError(path, f"expected numbers, got dtype {emb.dtype}")
    if emb.shape[0] != n_items:
        raise DataError(path, f"{emb.shape[0]} rows but the data has {n_items} items "
                              f"(declare data.n_items if the catalogue is larger)")
    emb = emb.astype(np.float32, copy=False)
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
    if len(bad):
        raise DataError(path, "embedding is not finite (NaN or inf)", row=int(bad[0]))
    return emb


def load_diffrec_npy(folder: str | Path, n_items: int | None = None,
                     name: str | None = None, item_emb: bool = True) -> InteractionData:
    """Load a DiffRec dataset folder (see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "dataset folder not found (expected a folder with "
                                + ", ".join(SPLIT_FILES.values()) + ")")
    paths = {s: folder / f for s, f in SPLIT_FILES.items()}
    pairs = {s: read_pairs(p, n_items) for s, p in paths.items()}
    n_users = int(max(p[:, 0].max() for p in pairs.values())) + 1
    if n_items is None:
        n_items = int(max(p[:, 1].max() for p in pairs.values())) + 1

    has_train = np.zeros(n_users, bool)
    has_train[pairs["train"][:, 0]] = True
    for s in ("valid", "test"):
        bad = np.flatnonzero(~has_train[pairs[s][:, 0]])
        if len(bad):
            raise DataError(paths[s], f"user {pairs[s][bad[0], 0]} has {s} interactions but "
                                      f"none in {SPLIT_FILES['train']}", field="user",
                            row=int(bad[0]))

    mats, duplicates, train_times = {}, {}, None
    for s, p in pairs.items():
        users, items, _, rows, dropped = dedupe_pairs(p[:, 0], p[:, 1], n_items)
        mats[s] = sorted_pairs_to_csr(users, items, n_users, n_items)
        duplicates[s] = int(dropped)
        if s == "train":
            train_times = rows               # file position = the authors' time order
    keys = {s: m.row_ids() * n_items + m.indices for s, m in mats.items()}
    overlaps = {f"{a}&{b}": int(len(np.intersect1d(keys[a], keys[b], assume_unique=True)))
                for a, b in (("train", "valid"), ("train", "test"), ("valid", "test"))}

    emb = None
    if item_emb and (folder / ITEM_EMB_FILE).exists():
        emb = read_item_emb(folder / ITEM_EMB_FILE, n_items)
    meta = {"source": "diffrec_npy", "path": str(folder), "duplicates": duplicates,
            "overlaps": overlaps, "sizes": {s: m.nnz for s, m in mats.items()}}
    return InteractionData(name=name or folder.name, train=mats["train"],
                           valid=mats["valid"], test=mats["test"], train_times=train_times,
                           item_emb=emb, meta=meta)
