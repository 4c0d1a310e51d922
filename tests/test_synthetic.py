"""The synthetic generator: seeded, structured (learnable), scalable, and streamed to parquet."""
import copy
import time
import tracemalloc

import numpy as np
import pyarrow.parquet as pq
import pytest

from scale_diffrec.data import load_data, load_parquet, load_synthetic, write_synthetic_parquet
from scale_diffrec.data import synthetic as syn
from scale_diffrec.schema import DEFAULTS


def default_cfg(**synthetic):
    cfg = copy.deepcopy(DEFAULTS)
    cfg["data"]["synthetic"].update(synthetic)
    return cfg


def dense(m):
    x = np.zeros(m.shape, np.float32)
    x[np.repeat(np.arange(m.n_rows), m.row_lengths()), m.indices] = m.values
    return x


def recall_at(scores, data, k=20):
    s = scores.astype(np.float64).copy()
    s[(dense(data.train) + dense(data.valid)) > 0] = -np.inf
    top = np.argpartition(-s, k, axis=1)[:, :k]
    truth = dense(data.test)
    hits = np.take_along_axis(truth, top, 1).sum(1)
    n = truth.sum(1)
    ok = n > 0
    return float(np.mean(hits[ok] / np.minimum(n[ok], k)))


def test_default_is_fast_seeded_and_well_formed():
    t0 = time.perf_counter()
    d = load_data(default_cfg())
    seconds = time.perf_counter() - t0
    assert seconds < 2.0, f"default synthetic data took {seconds:.2f}s (target ~1s)"
    assert (d.n_users, d.n_items) == (2000, 1000) and d.name == "synthetic"
    again = load_data(default_cfg())
    other = load_data(default_cfg(seed=1))
    for s in ("train", "valid", "test"):
        a, b = getattr(d, s), getattr(again, s)
        assert np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices)
    assert d.train.nnz != other.train.nnz or not np.array_equal(d.train.indices,
                                                                 other.train.indices)
    per_user = d.train.row_lengths() + d.valid.row_lengths() + d.test.row_lengths()
    assert per_user.min() >= 3 and 20 <= per_user.mean() <= 35
    assert np.all(d.train.row_lengths() >= 1)
    total = per_user.sum()
    assert abs(d.test.nnz / total - 0.2) < 0.03 and abs(d.valid.nnz / total - 0.1) < 0.03
    for m in (d.train, d.valid, d.test):         # sorted, no repeats, within the catalogue
        assert m.indices.min() >= 0 and m.indices.max() < 1000
    train_sets = [set(d.train.row(u)) for u in range(50)]
    assert all(not (train_sets[u] & set(d.test.row(u))) for u in range(50))
    # timestamps: seconds since 2020-09, in the generator's range
    assert len(d.train_times) == d.train.nnz and d.train_times.min() >= syn.T0


def test_power_law_popularity_and_clusters():
    d = load_synthetic({})
    clusters = syn.item_clusters({})
    sizes = np.bincount(clusters, minlength=8)
    assert len(sizes) == 8 and sizes.min() >= 1 and sizes.max() > 1.3 * sizes.min()
    counts = np.sort(np.bincount(d.train.indices, minlength=1000))[::-1]
    assert counts[:100].sum() > 0.4 * counts.sum()           # top 10% of items: > 40%
    # users concentrate on a few clusters: their top-2 clusters hold most interactions
    rows = np.repeat(np.arange(d.n_users), d.train.row_lengths())
    per = np.zeros((d.n_users, 8))
    np.add.at(per, (rows, clusters[d.train.indices]), 1)
    top2 = np.sort(per, axis=1)[:, -2:].sum(1) / per.sum(1)
    assert top2.mean() > 0.75
    loose = load_synthetic({"cluster_affinity": 0.0})
    rows = np.repeat(np.arange(loose.n_users), loose.train.row_lengths())
    per = np.zeros((loose.n_users, 8))
    np.add.at(per, (rows, syn.item_clusters({"cluster_affinity": 0.0})[loose.train.indices]), 1)
    assert (np.sort(per, axis=1)[:, -2:].sum(1) / per.sum(1)).mean() < top2.mean() - 0.15


def test_held_out_items_are_predictable():
    """Co-occurrence beats popularity, which beats chance, on the default test split."""
    d = load_synthetic({})
    x = dense(d.train)
    chance = recall_at(np.random.default_rng(0).random(x.shape), d)
    popularity = recall_at(np.broadcast_to(x.sum(0), x.shape), d)
    co = x.T @ x
    np.fill_diagonal(co, 0)
    co /= np.sqrt(np.outer(x.sum(0), x.sum(0))) + 1e-9
    item_knn = recall_at(x @ co, d)
    assert chance < 0.05
    assert popularity > chance + 0.15
    assert item_knn > popularity + 0.07, (chance, popularity, item_knn)


def test_time_split_uses_generated_times():
    d = load_synthetic({}, split={"rule": "time", "valid": 0.1, "test": 0.2, "seed": 0})
    r = load_synthetic({})
    assert d.test.nnz == r.test.nnz                          # same counts, other items
    assert not np.array_equal(d.test.indices, r.test.indices)


def test_many_blocks_and_huge_catalogue_stay_sparse(monkeypatch):
    monkeypatch.setattr(syn, "USER_BLOCK", 64)
    d = load_synthetic({"n_users": 300, "n_items": 500, "n_clusters": 5})
    assert d.n_users == 300 and np.all(d.train.row_lengths() >= 1)
    monkeypatch.undo()
    # 2M items: memory is O(n_items) for the catalogue, never users x items (300 x 2M)
    tracemalloc.start()
    users, items, times, cat = syn.generate_interactions(
        {"n_users": 300, "n_items": 2_000_000, "n_clusters": 50})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 150 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert items.max() < 2_000_000 and len(np.unique(users)) == 300
    assert np.all(np.diff(users) >= 0)
    same_user = users[1:] == users[:-1]
    assert np.all(np.diff(times)[same_user] >= 0)            # each user's rows in time order


def test_parquet_writer_row_groups_and_equivalence(tmp_path):
    path = tmp_path / "syn.parquet"
    info = write_synthetic_parquet(path, n_users=2000, n_items=1000, rows_per_group=7000)
    pf = pq.ParquetFile(path)
    assert info["rows"] == pf.metadata.num_rows and info["row_groups"] == pf.metadata.num_row_groups
    sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
    assert all(s == 7000 for s in sizes[:-1]) and 0 < sizes[-1] <= 7000
    assert pf.schema_arrow.names == ["user_id", "item_id", "timestamp"]
    # the parquet loader reproduces load_synthetic exactly (ids map through user/item_ids)
    a = load_synthetic({})
    b = load_parquet(path, split=DEFAULTS["data"]["split"], batch_rows=4096)
    assert np.array_equal(b.user_ids, np.arange(2000))
    assert np.array_equal(b.item_ids, np.arange(1000))
    for s in ("train", "valid", "test"):
        assert np.array_equal(getattr(a, s).indptr, getattr(b, s).indptr)
        assert np.array_equal(getattr(a, s).indices, getattr(b, s).indices)
    assert np.array_equal(a.train_times, b.train_times)


def test_parquet_writer_string_ids(tmp_path):
    path = tmp_path / "s.parquet"
    write_synthetic_parquet(path, n_users=300, n_items=200, n_clusters=4, rows_per_group=1000,
                            string_ids=True)
    d = load_parquet(path, split={"rule": "time", "valid": 0.1, "test": 0.2, "seed": 0})
    ref = load_synthetic({"n_users": 300, "n_items": 200, "n_clusters": 4},
                         split={"rule": "time", "valid": 0.1, "test": 0.2, "seed": 0})
    assert d.user_ids[0].startswith("u") and d.item_ids[0].startswith("i")
    uid = np.array([int(s[1:]) for s in d.user_ids])
    iid = np.array([int(s[1:]) for s in d.item_ids])
    for s in ("train", "test"):
        m, r = getattr(d, s), getattr(ref, s)
        got = set(zip(uid[np.repeat(np.arange(m.n_rows), m.row_lengths())].tolist(),
                      iid[m.indices].tolist()))
        want = set(zip(np.repeat(np.arange(r.n_rows), r.row_lengths()).tolist(),
                       r.indices.tolist()))
        assert got == want


@pytest.mark.parametrize("params, key", [
    ({"n_users": 0}, "n_users"), ({"mean_items_per_user": "many"}, "mean_items_per_user"),
    ({"popularity_exponent": -1}, "popularity_exponent"), ({"seed": 1.5}, "seed"),
])
def test_bad_params_name_the_key(params, key):
    from scale_diffrec.errors import ConfigError
    with pytest.raises(ConfigError, match=f"'data.synthetic.{key}'"):
        load_synthetic(params)
