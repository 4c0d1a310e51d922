"""Loaders: DiffRec .npy folders, parquet files, load_data dispatch, id maps."""
import copy
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scale_diffrec.data import (CSR, InteractionData, load_data, load_diffrec_npy, load_id_maps,
                                load_parquet, save_id_maps)
from scale_diffrec.data.parquet import read_interactions
from scale_diffrec.errors import DataError
from scale_diffrec.schema import DEFAULTS

ML1M = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "diffrec" / "ml-1m_clean"
needs_ml1m = pytest.mark.skipif(not (ML1M / "train_list.npy").is_file(),
                                reason=f"DiffRec data not found at {ML1M}")


def cfg_with(**data):
    cfg = copy.deepcopy(DEFAULTS)
    cfg["data"].update(data)
    return cfg


def pairs_of(m: CSR, rows_map=None, cols_map=None) -> set:
    r = np.repeat(np.arange(m.n_rows), m.row_lengths())
    c = m.indices
    if rows_map is not None:
        r, c = np.asarray(rows_map)[r], np.asarray(cols_map)[c]
    return set(zip(r.tolist(), c.tolist()))


def check_csr(m: CSR):
    assert m.indptr[0] == 0 and np.all(np.diff(m.indptr) >= 0) and m.indptr[-1] == len(m.indices)
    assert m.indices.dtype == np.int64 and m.values.dtype == np.float32
    for r in range(m.n_rows):                   # sorted, no repeats
        assert np.all(np.diff(m.row(r)) > 0)


def snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------------------ npy

def write_npy_folder(folder: Path, train, valid, test, emb=None):
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in (("train", train), ("valid", valid), ("test", test)):
        np.save(folder / f"{name}_list.npy", np.asarray(arr, dtype=np.int64).reshape(-1, 2))
    if emb is not None:
        np.save(folder / "item_emb.npy", emb)
    return folder


def test_csr_row_ids_and_transpose():
    # rows 0 and 2 hold entries, row 1 is empty, row 3 holds one entry
    m = CSR.from_pairs([2, 0, 3, 0], [1, 4, 0, 2], 4, 5, [3.0, 1.0, 4.0, 2.0])
    ids = m.row_ids()
    assert ids.dtype == np.int64 and ids.tolist() == [0, 0, 2, 3]
    assert CSR.from_pairs([], [], 3, 2).row_ids().tolist() == []
    t = m.transpose()
    assert t.shape == (5, 4)
    assert pairs_of(t) == {(4, 0), (2, 0), (1, 2), (0, 3)}
    assert t.values.tolist() == [4.0, 3.0, 2.0, 1.0]     # rows 0, 1, 2, 4 of the transpose


def test_npy_small_folder_exact(tmp_path):
    train = [[0, 3], [0, 1], [1, 2], [0, 1], [2, 0], [2, 4]]     # (0, 1) repeated
    valid = [[0, 2], [2, 1]]
    test = [[1, 5], [0, 0]]
    folder = write_npy_folder(tmp_path / "ds", train, valid, test,
                              emb=np.arange(12, dtype=np.float32).reshape(6, 2))
    before = snapshot(folder)
    d = load_diffrec_npy(folder)
    assert snapshot(folder) == before                           # loaders never write
    assert isinstance(d, InteractionData) and d.name == "ds"
    assert (d.n_users, d.n_items) == (3, 6)                     # item 5 only in test
    for m in (d.train, d.valid, d.test):
        check_csr(m)
        assert m.shape == (3, 6)
    assert pairs_of(d.train) == {(0, 3), (0, 1), (1, 2), (2, 0), (2, 4)}
    assert pairs_of(d.valid) == {(0, 2), (2, 1)}
    assert pairs_of(d.test) == {(1, 5), (0, 0)}
    # train_times = row in train_list.npy (the first of a repeated pair), aligned with indices
    assert d.train.row(0).tolist() == [1, 3] and d.train_times[:2].tolist() == [1, 0]
    assert d.train_times.tolist() == [1, 0, 2, 4, 5]
    assert d.meta["duplicates"]["train"] == 1
    assert d.item_emb.shape == (6, 2) and d.item_emb.dtype == np.float32
    assert d.user_ids is None and d.item_ids is None


def test_npy_declared_n_items(tmp_path):
    folder = write_npy_folder(tmp_path / "ds", [[0, 1], [1, 0]], [[0, 2]], [[1, 1]])
    d = load_diffrec_npy(folder, n_items=10)
    assert d.n_items == 10 and d.train.shape == (2, 10)


@needs_ml1m
def test_ml1m_clean_counts_independently_checked():
    d = load_data(cfg_with(source="diffrec_npy", path=str(ML1M)))
    lists = {s: np.load(ML1M / f"{s}_list.npy") for s in ("train", "valid", "test")}
    all_pairs = np.concatenate(list(lists.values()))
    n_users = len(np.unique(all_pairs[:, 0]))
    n_items = len(np.unique(all_pairs[:, 1]))
    assert (n_users, n_items) == (5949, 2810)
    assert (d.n_users, d.n_items) == (n_users, n_items)
    assert d.name == "ml-1m_clean"
    for s, m in (("train", d.train), ("valid", d.valid), ("test", d.test)):
        assert m.nnz == len(np.unique(lists[s][:, 0] * n_items + lists[s][:, 1]))
        assert np.array_equal(m.row_lengths(), np.bincount(lists[s][:, 0], minlength=n_users))
    assert (d.train.nnz, d.valid.nnz, d.test.nnz) == (403277, 110722, 57532)
    assert d.item_emb.shape == (2810, 64)
    # train_times: row in the file; per user increasing in file order
    t = lists["train"]
    assert np.array_equal(t[d.train_times, 0], np.repeat(np.arange(d.n_users),
                                                         d.train.row_lengths()))
    assert np.array_equal(t[d.train_times, 1], d.train.indices)


@needs_ml1m
def test_ml1m_t_diffrec_weights_equal_reference_loop():
    """The reference T-DiffRec data_load: per user, in file order, np.linspace(w_min, w_max)."""
    d = load_data(cfg_with(source="diffrec_npy", path=str(ML1M),
                           time_weights={"w_min": 0.1, "w_max": 1.0}))
    train = np.load(ML1M / "train_list.npy")
    by_user: dict = {}
    for u, i in train.tolist():
        by_user.setdefault(u, []).append(i)
    expected = {}
    for u, items in by_user.items():
        for i, w in zip(items, np.linspace(0.1, 1.0, len(items))):
            expected[(u, i)] = np.float32(w)
    rows = np.repeat(np.arange(d.n_users), d.train.row_lengths())
    got = dict(zip(zip(rows.tolist(), d.train.indices.tolist()), d.train.values.tolist()))
    assert got.keys() == expected.keys()
    assert all(got[k] == expected[k] for k in expected)
    assert d.meta["time_weights"] == {"w_min": 0.1, "w_max": 1.0}
    assert np.all(d.valid.values == 1.0) and np.all(d.test.values == 1.0)


# -------------------------------------------------------------------------- parquet

def write_parquet(path, row_group_size=None, **columns):
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def random_interactions(rng, n_users=40, n_items=30, per_user=(1, 15)):
    users, items = [], []
    for u in range(n_users):
        k = int(rng.integers(*per_user))
        users += [u] * k
        items += rng.choice(n_items, size=k, replace=False).tolist()
    return np.array(users), np.array(items)


@pytest.mark.parametrize("batch_rows", [7, 1 << 20])
def test_parquet_int_ids_remapped_and_split(tmp_path, batch_rows):
    rng = np.random.default_rng(0)
    users, items = random_interactions(rng)
    uid, iid = users * 10 + 1000, items * 3 + 7                  # sparse original ids
    times = rng.integers(0, 10**6, len(users))
    path = write_parquet(tmp_path / "x.parquet", row_group_size=50, user_id=uid,
                         item_id=iid, timestamp=times, rating=rng.random(len(users)))
    d = load_parquet(path, split={"rule": "random", "valid": 0.1, "test": 0.2, "seed": 3},
                     batch_rows=batch_rows)
    assert d.name == "x"
    assert np.array_equal(d.user_ids, np.unique(uid)) and np.array_equal(d.item_ids, np.unique(iid))
    assert (d.n_users, d.n_items) == (len(np.unique(uid)), len(np.unique(iid)))
    for m in (d.train, d.valid, d.test):
        check_csr(m)
    got = pairs_of(d.train, d.user_ids, d.item_ids) | pairs_of(d.valid, d.user_ids, d.item_ids) \
        | pairs_of(d.test, d.user_ids, d.item_ids)
    assert got == set(zip(uid.tolist(), iid.tolist()))
    assert d.train.nnz + d.valid.nnz + d.test.nnz == len(uid)
    # the held-out counts per user follow the rounding rule; singles stay in train
    n = np.bincount(np.searchsorted(d.user_ids, uid), minlength=d.n_users)
    n_test = np.floor(0.2 * n + 0.5).astype(int)
    n_valid = np.minimum(np.floor(0.1 * n + 0.5).astype(int), np.maximum(n - 1 - n_test, 0))
    n_test = np.minimum(n_test, np.maximum(n - 1, 0))
    assert np.array_equal(d.test.row_lengths(), n_test)
    assert np.array_equal(d.valid.row_lengths(), n_valid)
    assert np.all(d.train.row_lengths() >= 1)
    assert np.all(d.train.row_lengths()[n == 1] == 1)
    # train_times are the timestamps of the train pairs
    lookup = dict(zip(zip(uid.tolist(), iid.tolist()), times.tolist()))
    rows = np.repeat(np.arange(d.n_users), d.train.row_lengths())
    assert [lookup[(d.user_ids[r], d.item_ids[c])] for r, c in zip(rows, d.train.indices)] \
        == d.train_times.tolist()


def test_parquet_random_split_seeded_and_row_order_free(tmp_path):
    rng = np.random.default_rng(1)
    users, items = random_interactions(rng, per_user=(5, 20))
    a = write_parquet(tmp_path / "a.parquet", user_id=users, item_id=items)
    perm = rng.permutation(len(users))
    b = write_parquet(tmp_path / "b.parquet", user_id=users[perm], item_id=items[perm])
    split = {"rule": "random", "valid": 0.1, "test": 0.2, "seed": 5}
    da, db = load_parquet(a, split=split), load_parquet(b, split=split)
    for s in ("train", "valid", "test"):
        assert pairs_of(getattr(da, s)) == pairs_of(getattr(db, s))
    dc = load_parquet(a, split={**split, "seed": 6})
    assert pairs_of(dc.test) != pairs_of(da.test)


def test_parquet_time_split_latest_held_out(tmp_path):
    # user 'a': 10 interactions at shuffled times; user 'b' a single one
    times = np.array([50, 10, 90, 30, 70, 20, 100, 40, 60, 80, 5])
    users = np.array(["a"] * 10 + ["b"])
    items = np.array([f"i{k}" for k in range(10)] + ["i0"])
    path = write_parquet(tmp_path / "t.parquet", user_id=users, item_id=items, timestamp=times)
    d = load_parquet(path, split={"rule": "time", "valid": 0.1, "test": 0.2, "seed": 0})
    assert d.user_ids.tolist() == ["a", "b"] and d.user_ids.dtype == object
    name = lambda m, r: sorted(d.item_ids[m.row(r)].tolist())
    assert name(d.test, 0) == ["i2", "i6"]                      # times 90, 100
    assert name(d.valid, 0) == ["i9"]                           # time 80
    assert name(d.train, 1) == ["i0"] and d.test.row(1).size == 0
    assert sorted(d.train_times.tolist()) == [5, 10, 20, 30, 40, 50, 60, 70]


def test_parquet_without_timestamp_uses_row_order(tmp_path):
    path = write_parquet(tmp_path / "n.parquet", user_id=[7, 7, 7, 7, 7, 9, 9, 9, 9, 9],
                         item_id=[4, 3, 2, 1, 0, 0, 1, 2, 3, 4])
    d = load_parquet(path, split={"rule": "random", "valid": 0.2, "test": 0.2, "seed": 0})
    rows = np.repeat(np.arange(d.n_users), d.train.row_lengths())
    file_items = {7: [4, 3, 2, 1, 0], 9: [0, 1, 2, 3, 4]}
    for r, c, t in zip(rows, d.train.indices, d.train_times):
        u = int(d.user_ids[r])
        assert 5 * (u == 9) + file_items[u].index(int(d.item_ids[c])) == t
    assert d.meta["has_timestamp"] is False
    with pytest.raises(DataError, match=r"n\.parquet, field 'timestamp': the 'time' split"):
        load_parquet(path, split={"rule": "time"})


def test_parquet_repeated_pairs_count_once_at_earliest_time(tmp_path):
    path = write_parquet(tmp_path / "r.parquet", user_id=[1, 1, 1, 1, 1, 2, 2, 2],
                         item_id=[5, 6, 5, 7, 8, 5, 6, 7],
                         timestamp=[30, 20, 10, 40, 50, 1, 2, 3])
    d = load_parquet(path, split={"rule": "time", "valid": 0.25, "test": 0.25, "seed": 0})
    assert d.meta["duplicates"] == 1
    # user 1: 5 @ 10 (earliest of 30, 10), 6 @ 20, 7 @ 40, 8 @ 50 -> test 8, valid 7
    assert d.item_ids[d.test.row(0)].tolist() == [8]
    assert d.item_ids[d.valid.row(0)].tolist() == [7]
    assert dict(zip(d.item_ids[d.train.row(0)].tolist(), d.train_times[:2].tolist())) == \
        {5: 10, 6: 20}


def test_parquet_float_ids_timestamps_types_and_dictionary(tmp_path):
    ts = pa.array(np.array([3, 1, 2, 5, 4, 6], dtype="datetime64[s]"))
    table = pa.table({"user_id": pa.array([1.0, 1.0, 1.0, 2.0, 2.0, 2.0]),
                      "item_id": pa.array(["x", "y", "z", "x", "y", "z"]).dictionary_encode(),
                      "timestamp": ts})
    pq.write_table(table, tmp_path / "f.parquet")
    d = load_parquet(tmp_path / "f.parquet", split={"rule": "time", "valid": 0.34,
                                                     "test": 0.34})
    assert d.user_ids.tolist() == [1, 2] and d.user_ids.dtype == np.int64
    assert d.item_ids.tolist() == ["x", "y", "z"]
    names = lambda m, r: d.item_ids[m.row(r)].tolist()
    assert names(d.test, 0) == ["x"] and names(d.test, 1) == ["z"]
    assert names(d.valid, 0) == ["z"] and names(d.valid, 1) == ["x"]
    assert d.train_times.dtype == np.int64


def test_parquet_declared_n_items_keeps_item_indexes(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", user_id=[5, 5, 5, 8, 8, 8],
                         item_id=[0, 9, 4, 9, 2, 1])
    d = load_parquet(path, n_items=12, split={"valid": 0.34, "test": 0.34})
    assert d.n_items == 12 and d.item_ids is None and d.user_ids.tolist() == [5, 8]
    assert pairs_of(d.train) | pairs_of(d.valid) | pairs_of(d.test) == \
        {(0, 0), (0, 9), (0, 4), (1, 9), (1, 2), (1, 1)}


def test_parquet_string_ids_many_batches(tmp_path):
    rng = np.random.default_rng(2)
    users, items = random_interactions(rng, n_users=60, n_items=50)
    su = np.array([f"user-{u:03d}" for u in users])
    si = np.array([f"item/{i}" for i in items])
    path = write_parquet(tmp_path / "s.parquet", row_group_size=33, user_id=su, item_id=si)
    got = read_interactions(path, batch_rows=11)             # mapper flushes many times
    assert got["user_ids"].tolist() == sorted(set(su))
    assert got["item_ids"].tolist() == sorted(set(si))
    assert np.array_equal(got["user_ids"][got["users"]], su)
    assert np.array_equal(got["item_ids"][got["items"]], si)


def test_id_maps_round_trip(tmp_path):
    path = write_parquet(tmp_path / "s.parquet", user_id=["b", "a", "b", "c", "c", "a", "a"],
                         item_id=[10, 20, 30, 10, 20, 30, 10])
    d = load_parquet(path, split={"valid": 0.34, "test": 0.34})
    out = tmp_path / "maps"
    paths = save_id_maps(d, out)
    assert [p.name for p in paths] == ["user_ids.parquet", "item_ids.parquet"]
    assert sorted(f.name for f in out.iterdir()) == ["item_ids.parquet", "user_ids.parquet"]
    users, items = load_id_maps(out)
    assert users.tolist() == ["a", "b", "c"] and items.tolist() == [10, 20, 30]
    assert pq.read_table(out / "user_ids.parquet").column_names == ["index", "user_id"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out / "user_ids.parquet").st_mode & 0o777 == 0o666 & ~umask
    # data without maps (npy): identity maps
    folder = write_npy_folder(tmp_path / "ds", [[0, 1], [1, 0]], [[0, 2]], [[1, 1]])
    save_id_maps(load_diffrec_npy(folder), out)
    users, items = load_id_maps(out)
    assert users.tolist() == [0, 1] and items.tolist() == [0, 1, 2]


# ------------------------------------------------------------------------ load_data

def test_load_data_dispatch(tmp_path):
    d = load_data(copy.deepcopy(DEFAULTS))
    assert d.name == "synthetic" and d.n_users == 2000 and d.n_items == 1000
    json.dumps(d.meta)                                          # meta stays JSON-able
    folder = write_npy_folder(tmp_path / "ds", [[0, 1], [1, 0]], [[0, 2]], [[1, 1]])
    d = load_data(cfg_with(source="diffrec_npy", path=str(folder), name="mine"))
    assert d.name == "mine" and d.n_items == 3
    json.dumps(d.meta)
    path = write_parquet(tmp_path / "p.parquet", user_id=[1, 1, 1, 2, 2, 2, 2],
                         item_id=[1, 2, 3, 1, 2, 3, 4], timestamp=[1, 2, 3, 4, 5, 6, 7])
    d = load_data(cfg_with(source="parquet", path=str(path),
                           split={"rule": "time", "valid": 0.25, "test": 0.25, "seed": 0},
                           time_weights={"w_min": 0.5, "w_max": 1.0}))
    assert d.n_users == 2 and d.test.nnz == 2 and d.valid.nnz == 2
    # user 1 keeps 1 train item (time 1) -> w_min; user 2 keeps 2 (times 4, 5) -> [0.5, 1]
    assert d.train.values.tolist() == [0.5, 0.5, 1.0]
    json.dumps(d.meta)
