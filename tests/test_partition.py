"""Item partition (k-means over item embeddings) and its artifact; item embeddings."""
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scale_diffrec.config import load_config
from scale_diffrec.data.csr import CSR
from scale_diffrec.data.dataset import InteractionData
from scale_diffrec.errors import ConfigError, DataError
from scale_diffrec.embeddings import (item_embeddings, load_item_embeddings,
                                      svd_item_embeddings)
from scale_diffrec.partition import META_KEY, Partition, build_partition

ML1M = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "diffrec" / "ml-1m_clean"


def blobs(n_per=(40, 25, 60, 5), d=8, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 10, (len(n_per), d))
    x = np.concatenate([c + rng.normal(0, 0.5, (n, d)) for c, n in zip(centers, n_per)])
    perm = rng.permutation(len(x))
    return x[perm].astype(np.float32), np.repeat(np.arange(len(n_per)), n_per)[perm]


def check_cover(p: Partition):
    n = p.n_items
    seen = np.concatenate([p.items_of(c) for c in range(p.n_clusters)])
    assert np.array_equal(np.sort(seen), np.arange(n))          # each item exactly once
    assert (p.sizes > 0).all() and p.sizes.sum() == n
    for c in range(p.n_clusters):
        items = p.items_of(c)
        assert np.all(np.diff(items) > 0)                        # ascending
        assert (p.cluster_of[items] == c).all()
        assert np.array_equal(p.local_of[items], np.arange(len(items)))


def test_kmeans_covers_every_item_once_and_finds_blobs():
    x, truth = blobs()
    p = Partition.kmeans(x, 4, seed=3)
    check_cover(p)
    # well-separated blobs: the clustering equals the truth up to renaming
    for c in range(4):
        assert len(np.unique(truth[p.items_of(c)])) == 1
    assert sorted(p.sizes.tolist()) == [5, 25, 40, 60]


def test_kmeans_is_deterministic_for_a_seed():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 16)).astype(np.float32)
    a = Partition.kmeans(x, 7, seed=5)
    b = Partition.kmeans(x, 7, seed=5)
    assert a == b
    check_cover(a)


def test_empty_clusters_are_refilled():
    # 3 distinct points, 5 clusters: k-means leaves clusters empty; each must get an item
    x = np.repeat(np.eye(3, dtype=np.float32), [4, 3, 2], axis=0)
    p = Partition.kmeans(x, 5, seed=0)
    check_cover(p)
    assert p.n_clusters == 5
    with pytest.raises(ConfigError, match="n_clusters"):
        Partition.kmeans(x, 10)


def test_capacity_spreads_cold_items_over_clusters():
    # 2 warm blobs and 900 cold items with identical (zero) embeddings: nearest-centroid
    # assignment puts every cold item in one cluster; a capacity of 1.1 x I / C bounds it
    x, _ = blobs(n_per=(60, 40), d=8)
    x = np.concatenate([x, np.zeros((900, 8), np.float32)])
    plain = Partition.kmeans(x, 4, seed=0)
    assert plain.sizes.max() >= 890                 # (one moved to fill an empty cluster)
    balanced = Partition.kmeans(x, 4, seed=0, capacity=1.1)
    check_cover(balanced)
    cap = int(np.ceil(1.1 * 1000 / 4))
    assert balanced.sizes.max() <= cap and balanced.sizes.sum() == 1000
    assert Partition.kmeans(x, 4, seed=0, capacity=1.1) == balanced     # deterministic
    with pytest.raises(ConfigError, match="cluster_capacity"):
        Partition.kmeans(x, 4, capacity=0.5)


def test_capacity_moves_an_item_only_when_its_nearest_cluster_is_full():
    from scale_diffrec.partition import _assign_with_capacity
    rng = np.random.default_rng(2)
    dist = rng.random((300, 5))
    prefs = np.argsort(dist, axis=1)
    dist = np.take_along_axis(dist, prefs, axis=1)
    assign, chosen = _assign_with_capacity(dist, prefs, 70)
    sizes = np.bincount(assign, minlength=5)
    assert sizes.max() <= 70 and sizes.sum() == 300
    moved = assign != prefs[:, 0]
    assert (sizes[prefs[moved, 0]] == 70).all()
    assert np.allclose(chosen, dist[np.arange(300), np.argmax(prefs == assign[:, None], 1)])
    # a capacity that never binds is plain nearest-centroid assignment
    assign, _ = _assign_with_capacity(dist, prefs, 300)
    assert np.array_equal(assign, prefs[:, 0])
    x, _ = blobs()
    assert Partition.kmeans(x, 4, seed=3, capacity=4.0) == Partition.kmeans(x, 4, seed=3)


def test_single_cluster():
    p = Partition.kmeans(np.zeros((7, 3), np.float32), 1)
    check_cover(p)
    assert p.n_clusters == 1 and p.sizes.tolist() == [7]
    assert np.array_equal(p.items_of(0), np.arange(7))


def test_artifact_round_trip(tmp_path):
    x, _ = blobs()
    p = Partition.kmeans(x, 4, seed=0)
    path = tmp_path / "sub" / "partition.parquet"
    p.save(path)
    q = Partition.load(path, n_items=p.n_items)
    assert q == p and q.sizes.tolist() == p.sizes.tolist()
    assert [f.name for f in tmp_path.joinpath("sub").iterdir()] == ["partition.parquet"]
    with pytest.raises(DataError, match="partition.parquet.*130 items but the data has 131"):
        Partition.load(path, n_items=131)


def _rewrite(path, items, clusters, meta):
    import json
    t = pa.table({"item": pa.array(np.asarray(items, np.int64)),
                  "cluster": pa.array(np.asarray(clusters, np.int32))})
    pq.write_table(t.replace_schema_metadata({META_KEY: json.dumps(meta).encode()}), path)


@pytest.mark.parametrize("items,clusters,meta,message", [
    ([0, 1, 1, 3], [0, 1, 1, 0], None, "item 1 appears 2 times"),
    ([0, 1, 2, 3], [0, 1, 2, 0], None, "cluster 2 outside 0..1"),
    ([0, 1, 2, 3], [0, 0, 0, 0], None, "cluster 1 is empty"),
    ([0, 1, 2, 3], [0, 1, 1, 0], {"sizes": [3, 1]}, "do not match the metadata"),
    ([0, 1, 2], [0, 1, 1], None, "3 rows but the metadata says 4"),
    ([0, 1, 2, 7], [0, 1, 1, 0], None, "item 7 outside"),
])
def test_corrupted_artifact_is_refused(tmp_path, items, clusters, meta, message):
    path = tmp_path / "p.parquet"
    base = {"version": 1, "n_items": 4, "n_clusters": 2, "sizes": [2, 2]}
    _rewrite(path, items, clusters, {**base, **(meta or {})})
    with pytest.raises(DataError, match=rf"p.parquet.*{message}"):
        Partition.load(path)


def test_artifact_without_metadata_or_unreadable_is_refused(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"item": [0, 1], "cluster": [0, 0]}), path)
    with pytest.raises(DataError, match="p.parquet.*not a partition artifact"):
        Partition.load(path)
    path.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="p.parquet.*not a readable parquet"):
        Partition.load(path)
    with pytest.raises(DataError, match="missing.parquet.*not found"):
        Partition.load(tmp_path / "missing.parquet")


def test_save_is_atomic(tmp_path, monkeypatch):
    x, _ = blobs()
    p = Partition.kmeans(x, 4, seed=0)
    path = tmp_path / "partition.parquet"
    p.save(path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(DataError, match=r"partition.parquet: cannot write: disk full$"):
        Partition.single(p.n_items).save(path)
    assert path.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["partition.parquet"]


# ------------------------------------------------------------------ embeddings
def random_csr(n_users=60, n_items=40, density=0.15, seed=0):
    rng = np.random.default_rng(seed)
    mask = rng.random((n_users, n_items)) < density
    r, c = np.nonzero(mask)
    return CSR.from_pairs(r, c, n_users, n_items), mask.astype(np.float64)


def test_svd_embedding_matches_exact_svd():
    train, dense = random_csr()
    u, s, _ = np.linalg.svd(dense.T, full_matrices=False)
    exact = u[:, :5] * s[:5]
    # a range finder as wide as the matrix is exact
    emb = svd_item_embeddings(train, 5, seed=0, oversample=40)
    assert emb.shape == (40, 5) and emb.dtype == np.float32
    for j in range(5):                                   # columns up to sign
        col = emb[:, j] * np.sign(emb[:, j] @ exact[:, j])
        assert np.allclose(col, exact[:, j], atol=1e-4 * s[0])
    # the default (k + 10 columns, 4 power iterations) captures nearly all the energy
    emb = svd_item_embeddings(train, 5, seed=0)
    assert (emb ** 2).sum() >= 0.98 * (s[:5] ** 2).sum()
    assert np.array_equal(emb, svd_item_embeddings(train, 5, seed=0))   # deterministic
    # more dimensions than the rank allows: zero-padded, never an error
    assert svd_item_embeddings(train, 100, seed=0).shape == (40, 100)


def test_load_npy_and_parquet_embeddings(tmp_path):
    emb = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.save(tmp_path / "e.npy", emb)
    assert np.array_equal(load_item_embeddings(tmp_path / "e.npy", 4), emb)
    with pytest.raises(DataError, match="e.npy.*4 rows but the data has 5 items"):
        load_item_embeddings(tmp_path / "e.npy", 5)
    np.save(tmp_path / "bad.npy", np.zeros(4))
    with pytest.raises(DataError, match="bad.npy.*2-d"):
        load_item_embeddings(tmp_path / "bad.npy", 4)

    # parquet keyed by original ids, mapped through item_ids; extra ids ignored
    item_ids = np.array([30, 10, 20, 40])
    t = pa.table({"item_id": [10, 20, 30, 40, 99],
                  "vector": [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0], [9.0, 9.0]]})
    pq.write_table(t, tmp_path / "e.parquet")
    got = load_item_embeddings(tmp_path / "e.parquet", 4, item_ids)
    assert np.array_equal(got[:, 0], [3.0, 1.0, 2.0, 4.0])
    pq.write_table(t.slice(0, 3), tmp_path / "short.parquet")
    with pytest.raises(DataError, match="short.parquet.*item_id.*1 of 4 items have no embedding"):
        load_item_embeddings(tmp_path / "short.parquet", 4, item_ids)
    ragged = pa.table({"item_id": [0, 1], "vector": [[1.0, 2.0], [1.0]]})
    pq.write_table(ragged, tmp_path / "ragged.parquet")
    with pytest.raises(DataError, match="ragged.parquet.*vector.*row 1"):
        load_item_embeddings(tmp_path / "ragged.parquet", 2)
    dup = pa.table({"item_id": [0, 1, 1], "vector": [[1.0], [2.0], [3.0]]})
    pq.write_table(dup, tmp_path / "dup.parquet")
    with pytest.raises(DataError, match="dup.parquet.*item_id.*row 2.*2 embedding rows"):
        load_item_embeddings(tmp_path / "dup.parquet", 2)


def _data(train, item_emb=None):
    empty = CSR.from_pairs([], [], train.n_rows, train.n_cols)
    return InteractionData("toy", train, empty, empty, item_emb=item_emb)


def test_build_partition_from_config(tmp_path):
    train, _ = random_csr(n_users=80, n_items=50)
    cfg = load_config(None, ["model=ldiffrec", "ldiffrec.n_clusters=3",
                             "ldiffrec.embeddings=svd", "ldiffrec.emb_dim=4"])
    p = build_partition(cfg, _data(train))
    check_cover(p)
    assert p.n_clusters == 3 and p == build_partition(cfg, _data(train))
    # 'file' without any embeddings is a config error; 'auto' falls back to svd
    cfg = load_config(None, ["ldiffrec.embeddings=file"])
    with pytest.raises(ConfigError, match="ldiffrec.embeddings"):
        item_embeddings(cfg, _data(train))
    cfg = load_config(None, ["ldiffrec.embeddings=auto"])
    emb, source = item_embeddings(cfg, _data(train))
    assert emb.shape == (50, 64) and "svd" in source
    given = np.ones((50, 3), np.float32)
    emb, _ = item_embeddings(cfg, _data(train, given))
    assert emb is given or np.array_equal(emb, given)
    cfg = load_config(None, ["ldiffrec.n_clusters=1"])
    assert build_partition(cfg, _data(train)).n_clusters == 1


@pytest.mark.skipif(not ML1M.is_dir(), reason=f"DiffRec data not present at {ML1M}")
def test_ml1m_item_emb_partition():
    emb = load_item_embeddings(ML1M / "item_emb.npy", 2810)
    p = Partition.kmeans(emb, 2, seed=1)
    check_cover(p)
    assert min(p.sizes) > 100        # two real clusters, not a degenerate split


def test_the_partition_records_what_built_it_and_is_checked_against_the_config(tmp_path):
    from scale_diffrec.partition import check_made_by
    train, _ = random_csr(n_users=80, n_items=50)
    cfg = load_config(None, ["model=ldiffrec", "ldiffrec.n_clusters=3",
                             "ldiffrec.embeddings=svd", "ldiffrec.emb_dim=4"])
    p = build_partition(cfg, _data(train))
    p.save(tmp_path / "p.parquet")
    q = Partition.load(tmp_path / "p.parquet")
    assert q.made_by == p.made_by and q.made_by["ldiffrec.emb_dim"] == 4
    check_made_by(q, cfg, "p.parquet")                     # the config that built it
    for sets, key in [(["ldiffrec.emb_dim=5"], "'ldiffrec.emb_dim' = 4"),
                      (["seed=1"], "'seed' = 0"),
                      (["data.synthetic.n_items=51"], "'data.synthetic'"),
                      (["ldiffrec.n_clusters=2"], "has 3 clusters but config key "
                                                  "'ldiffrec.n_clusters' is 2")]:
        other = load_config(None, ["model=ldiffrec", "ldiffrec.n_clusters=3",
                                   "ldiffrec.embeddings=svd", "ldiffrec.emb_dim=4", *sets])
        with pytest.raises(ConfigError, match=f"p.parquet: .*{key}"):
            check_made_by(q, other, "p.parquet")
    # an artifact without a record (older, or made elsewhere): only its cluster count counts
    q.made_by = None
    check_made_by(q, load_config(None, ["ldiffrec.n_clusters=3", "seed=9"]), "p.parquet")
