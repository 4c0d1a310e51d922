"""L-DiffRec's item partition: every item in exactly one of C clusters.

Built by k-means over item embeddings (``embeddings.py``), as the reference does
(YiyanXu/DiffRec, L-DiffRec/models/Autoencoder.py, ``AutoEncoder.__init__``:
``kmeans_pytorch.kmeans(X=item_emb, num_clusters=n_cate, distance='euclidean')``); here with
FAISS (``faiss.Kmeans``, L2, seeded), then empty clusters are refilled so that each of the
C clusters holds at least one item. The reference lists each cluster's items in ascending
item order (``np.argwhere(cluster_ids == i)``); so does ``items_of``.

Balanced assignment (``capacity``, config ``ldiffrec.cluster_capacity``; None = plain
k-means, as the reference). On a large catalogue most items are cold (few or no
interactions); their embeddings coincide, and nearest-centroid assignment puts them all in
one cluster (measured: 999,368 of 1M items in one of 8), which defeats sharding the
catalogue. With a capacity factor f >= 1 each cluster holds at most
cap = ceil(f * I / C) items, assigned by deferred acceptance over the k-means distances
[I, C]: in round j every unassigned item proposes to its j-th nearest centroid, and each
centroid accepts its nearest proposers (ties: lower item id) while it has room. C rounds
place every item, since C * cap >= I.

Lookup tables (numpy, int64):
    cluster_of [I]   cluster of each item
    local_of   [I]   position of the item inside its cluster (its column in that cluster's
                     encoder input / decoder output)
    items_of(c) [n_c] the cluster's items, ascending
    sizes      [C]

Artifact (``save`` / ``load``): a parquet file with columns ``item`` (int64) and ``cluster``
(int32), one row per item, and the schema metadata key ``scale_diffrec.partition`` holding
JSON ``{"version", "n_items", "n_clusters", "sizes", "made_by"}``; ``made_by`` holds the
config values that built it (``MADE_BY``: seed, data, n_clusters, embedding settings), so
that a run reusing it can tell when its config asks for another partition
(``check_made_by``). Written to a temporary sibling and renamed into place; validated on
load.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .config import typed
from .data.csr import CSR
from .embeddings import item_embeddings
from .errors import ConfigError, DataError
from .files import atomic_write
from .optional import require_faiss
from .progress import log
from .schema import Config

META_KEY = b"scale_diffrec.partition"
FORMAT_VERSION = 1
# the config keys a built partition depends on (data.name only labels the data)
MADE_BY = ("seed", "data.source", "data.path", "data.item_emb", "data.split",
           "data.time_weights", "data.synthetic", "data.n_items", "ldiffrec.n_clusters",
           "ldiffrec.embeddings", "ldiffrec.emb_dim", "ldiffrec.kmeans_niter",
           "ldiffrec.cluster_capacity")


def made_by(cfg: Config) -> dict:
    """{dotted key: value} of ``MADE_BY`` in ``cfg`` (JSON values)."""
    tree, out = cfg.model_dump(mode="json"), {}
    for key in MADE_BY:
        value = tree
        for part in key.split("."):
            value = value[part]
        out[key] = value
    return out


def check_made_by(partition: "Partition", cfg: Config | dict, path) -> None:
    """ConfigError unless ``partition`` (read from ``path``) is what ``cfg`` would build:
    the same ldiffrec.n_clusters and, when the artifact records them, the same ``MADE_BY``
    values."""
    cfg = typed(cfg)
    want = cfg.ldiffrec.n_clusters
    if partition.n_clusters != want:
        raise ConfigError(f"{path}: the partition has {partition.n_clusters} clusters but "
                          f"config key 'ldiffrec.n_clusters' is {want} (pass --overwrite to "
                          f"rebuild it)")
    if partition.made_by is None:
        return
    now = made_by(cfg)
    for key in MADE_BY:
        if key in partition.made_by and partition.made_by[key] != now[key]:
            raise ConfigError(f"{path}: the partition was built with config key '{key}' = "
                              f"{partition.made_by[key]!r} but the config has {now[key]!r} "
                              f"(pass --overwrite to rebuild it)")


class Partition:
    """Item -> cluster assignment with per-cluster item lists (see the module docstring)."""

    def __init__(self, cluster_of: np.ndarray, n_clusters: int | None = None):
        cluster_of = np.asarray(cluster_of, dtype=np.int64)
        if cluster_of.ndim != 1 or len(cluster_of) == 0:
            raise ValueError("cluster_of must be a non-empty 1-d array")
        n_clusters = int(cluster_of.max()) + 1 if n_clusters is None else int(n_clusters)
        if cluster_of.min() < 0 or cluster_of.max() >= n_clusters:
            raise ValueError(f"cluster ids must lie in 0..{n_clusters - 1}")
        self.cluster_of = cluster_of
        self.n_clusters = n_clusters
        self.sizes = np.bincount(cluster_of, minlength=n_clusters).astype(np.int64)
        if (self.sizes == 0).any():
            raise ValueError(f"cluster {int(np.flatnonzero(self.sizes == 0)[0])} is empty")
        # stable sort by cluster: within a cluster, items stay ascending
        self.order = np.argsort(cluster_of, kind="stable")        # [I] items, cluster-major
        self.offsets = np.zeros(n_clusters + 1, np.int64)
        np.cumsum(self.sizes, out=self.offsets[1:])
        self.local_of = np.empty(len(cluster_of), np.int64)
        self.local_of[self.order] = np.arange(len(cluster_of)) - np.repeat(self.offsets[:-1],
                                                                           self.sizes)
        self.made_by: dict | None = None     # the config values that built it (MADE_BY)

    @property
    def n_items(self) -> int:
        return len(self.cluster_of)

    def items_of(self, c: int) -> np.ndarray:
        """[n_c] items of cluster c, ascending."""
        return self.order[self.offsets[c]: self.offsets[c + 1]]

    def __repr__(self) -> str:
        return f"Partition(n_items={self.n_items}, n_clusters={self.n_clusters}, " \
               f"sizes={self.sizes.tolist()})"

    def __eq__(self, other) -> bool:
        return (isinstance(other, Partition) and other.n_clusters == self.n_clusters
                and np.array_equal(other.cluster_of, self.cluster_of))

    def cluster_columns(self, matrix: CSR, c: int) -> CSR:
        """[rows, n_c] cluster c's columns of ``matrix`` [rows, n_items], in local order."""
        row_of = matrix.row_ids()
        keep = self.cluster_of[matrix.indices] == c
        return CSR.from_pairs(row_of[keep], self.local_of[matrix.indices[keep]],
                              matrix.n_rows, int(self.sizes[c]), matrix.values[keep])

    # ---------------------------------------------------------------- construction
    @staticmethod
    def single(n_items: int) -> "Partition":
        """One cluster with every item (n_clusters = 1: plain latent DiffRec)."""
        return Partition(np.zeros(n_items, np.int64), 1)

    @staticmethod
    def blocks(n_items: int, n_clusters: int) -> "Partition":
        """``n_clusters`` blocks of consecutive item indexes, sizes differing by at most one
        (item i in block i * C // I): DiffuRec's item table, whose rows are all alike.
        ValueError when there are fewer items than blocks."""
        if n_clusters > n_items:
            raise ValueError(f"{n_clusters} clusters for {n_items} items")
        return Partition(np.arange(n_items, dtype=np.int64) * n_clusters // n_items,
                         n_clusters)

    @staticmethod
    def kmeans(emb: np.ndarray, n_clusters: int, seed: int = 0, niter: int = 50,
               capacity: float | None = None) -> "Partition":
        """FAISS k-means (L2) of ``emb`` [I, d] into ``n_clusters`` non-empty clusters (on
        the GPU with faiss-gpu).

        Deterministic for a seed. All points are used for training (no subsampling), as the
        reference's kmeans_pytorch does. ``capacity`` f >= 1: at most ceil(f * I / C) items
        per cluster (balanced assignment, module docstring). Clusters are numbered by their
        smallest item.
        """
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        n_items = emb.shape[0]
        if n_clusters < 1:
            raise ConfigError(f"config key 'ldiffrec.n_clusters' must be >= 1, got {n_clusters}")
        if n_clusters > n_items:
            raise ConfigError(f"config key 'ldiffrec.n_clusters' is {n_clusters} but there are "
                              f"only {n_items} items")
        if capacity is not None and not float(capacity) >= 1.0:
            raise ConfigError(f"config key 'ldiffrec.cluster_capacity' must be >= 1 "
                              f"(a multiple of items / clusters), got {capacity}")
        if n_clusters == 1:
            return Partition.single(n_items)
        faiss = require_faiss("config key 'ldiffrec.n_clusters': the k-means partition",
                              alternative="give a saved partition in ldiffrec.partition")
        # on the GPUs when faiss has GPU support and sees one (faiss-gpu), else the CPU
        km = faiss.Kmeans(emb.shape[1], n_clusters, niter=int(niter), seed=int(seed),
                          verbose=False, min_points_per_centroid=1,
                          max_points_per_centroid=max(n_items, 1),
                          gpu=bool(getattr(faiss, "get_num_gpus", lambda: 0)()))
        km.train(emb)
        if capacity is None:
            dist, assign = km.index.search(emb, 1)
            assign = assign[:, 0].astype(np.int64)
            dist = dist[:, 0].astype(np.float64)
        else:
            dist, prefs = km.index.search(emb, n_clusters)
            cap = int(np.ceil(capacity * n_items / n_clusters))
            assign, dist = _assign_with_capacity(dist, prefs.astype(np.int64), cap)
        assign = _fill_empty(assign, dist, n_clusters)
        return Partition(_canonical(assign, n_clusters), n_clusters)

    # ---------------------------------------------------------------- artifact
    def save(self, path: str | Path) -> None:
        """Write the artifact atomically (``files.atomic_write``)."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"version": FORMAT_VERSION, "n_items": self.n_items,
                "n_clusters": self.n_clusters, "sizes": self.sizes.tolist(),
                "made_by": self.made_by}
        table = pa.table({"item": pa.array(np.arange(self.n_items, dtype=np.int64)),
                          "cluster": pa.array(self.cluster_of.astype(np.int32))})
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
        atomic_write(path, lambda tmp: pq.write_table(table, tmp))

    @staticmethod
    def load(path: str | Path, n_items: int | None = None) -> "Partition":
        """Read and validate an artifact; a DataError names the file and what is wrong."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        path = Path(path)
        if not path.is_file():
            raise DataError(path, "partition file not found")
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as err:
            raise DataError(path, f"not a readable parquet file: {err}") from None
        raw = (table.schema.metadata or {}).get(META_KEY)
        if raw is None:
            raise DataError(path, f"not a partition artifact (no '{META_KEY.decode()}' "
                                  f"schema metadata)")
        try:
            meta = json.loads(raw)
            meta_items, meta_c = int(meta["n_items"]), int(meta["n_clusters"])
            meta_sizes = np.asarray(meta["sizes"], dtype=np.int64)
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(path, f"partition metadata is malformed: {err}") from None
        if meta.get("version") != FORMAT_VERSION:
            raise DataError(path, f"unsupported partition format version {meta.get('version')}")
        for name in ("item", "cluster"):
            if name not in table.column_names:
                raise DataError(path, "missing column", field=name)
            if not pa.types.is_integer(table.schema.field(name).type):
                raise DataError(path, f"must be integers, got {table.schema.field(name).type}",
                                field=name)
            if table.column(name).null_count:
                raise DataError(path, "null value", field=name)
        items = table.column("item").to_numpy().astype(np.int64)
        clusters = table.column("cluster").to_numpy().astype(np.int64)
        if n_items is not None and meta_items != n_items:
            raise DataError(path, f"partition is for {meta_items} items but the data has "
                                  f"{n_items}")
        if len(items) != meta_items:
            raise DataError(path, f"{len(items)} rows but the metadata says {meta_items} items")
        if meta_c < 1 or len(meta_sizes) != meta_c:
            raise DataError(path, f"metadata: {meta_c} clusters with {len(meta_sizes)} sizes")
        bad = (items < 0) | (items >= meta_items)
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raise DataError(path, f"item {items[r]} outside 0..{meta_items - 1}", field="item",
                            row=r)
        counts = np.bincount(items, minlength=meta_items)
        if (counts != 1).any():
            item = int(np.flatnonzero(counts != 1)[0])
            raise DataError(path, f"item {item} appears {counts[item]} times (each item must "
                                  f"appear exactly once)", field="item")
        bad = (clusters < 0) | (clusters >= meta_c)
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raise DataError(path, f"cluster {clusters[r]} outside 0..{meta_c - 1}",
                            field="cluster", row=r)
        sizes = np.bincount(clusters, minlength=meta_c)
        if (sizes == 0).any():
            raise DataError(path, f"cluster {int(np.flatnonzero(sizes == 0)[0])} is empty",
                            field="cluster")
        if not np.array_equal(sizes, meta_sizes):
            raise DataError(path, f"cluster sizes {sizes.tolist()} do not match the metadata "
                                  f"{meta_sizes.tolist()}", field="cluster")
        cluster_of = np.empty(meta_items, np.int64)
        cluster_of[items] = clusters
        partition = Partition(cluster_of, meta_c)
        partition.made_by = meta.get("made_by")
        return partition


def _assign_with_capacity(dist: np.ndarray, prefs: np.ndarray, cap: int
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Deferred acceptance: ``prefs`` [I, C] centroids nearest first, ``dist`` [I, C] their
    distances; every cluster takes at most ``cap`` items (C * cap >= I).
    Returns (assign [I], distance to the assigned centroid [I])."""
    n_items, n_clusters = prefs.shape
    assign = np.full(n_items, -1, np.int64)
    chosen = np.zeros(n_items, np.float64)
    room = np.full(n_clusters, cap, np.int64)
    for j in range(n_clusters):
        todo = np.flatnonzero(assign < 0)
        if len(todo) == 0:
            break
        want, d = prefs[todo, j], dist[todo, j]
        order = np.lexsort((todo, d, want))            # by centroid, nearest, lower id
        want, d, todo = want[order], d[order], todo[order]
        starts = np.searchsorted(want, np.arange(n_clusters))
        rank = np.arange(len(want)) - starts[want]      # position among the centroid's proposers
        ok = rank < room[want]
        assign[todo[ok]] = want[ok]
        chosen[todo[ok]] = d[ok]
        room -= np.bincount(want[ok], minlength=n_clusters)
    if (assign < 0).any():
        raise ValueError(f"capacity {cap} x {n_clusters} clusters cannot hold {n_items} items")
    return assign, chosen


def _fill_empty(assign: np.ndarray, dist: np.ndarray, n_clusters: int) -> np.ndarray:
    """Give every empty cluster one item: the farthest-from-centroid item of the largest
    cluster (ties: the lowest item id), until none is empty. Needs n_items >= n_clusters."""
    assign = assign.copy()
    dist = dist.copy()
    sizes = np.bincount(assign, minlength=n_clusters)
    for c in np.flatnonzero(sizes == 0):
        donor = int(np.argmax(sizes))              # largest cluster (>= 2 items while any empty)
        members = np.flatnonzero(assign == donor)
        pick = members[np.argmax(dist[members])]   # argmax: first of equal maxima
        assign[pick] = c
        dist[pick] = 0.0
        sizes[donor] -= 1
        sizes[c] += 1
    return assign


def _canonical(assign: np.ndarray, n_clusters: int) -> np.ndarray:
    """Renumber clusters in order of their smallest item (independent of FAISS's order)."""
    first = np.full(n_clusters, len(assign), np.int64)
    np.minimum.at(first, assign, np.arange(len(assign)))
    new_of_old = np.empty(n_clusters, np.int64)
    new_of_old[np.argsort(first, kind="stable")] = np.arange(n_clusters)
    return new_of_old[assign]


def build_partition(cfg: Config | dict, data) -> Partition:
    """The partition of ``data``'s items per the ``ldiffrec`` section (n_clusters,
    embeddings, kmeans_niter, cluster_capacity)."""
    cfg = typed(cfg)
    lcfg = cfg.ldiffrec
    n_clusters = lcfg.n_clusters
    if n_clusters == 1:
        partition = Partition.single(data.n_items)
    else:
        emb, source = item_embeddings(cfg, data)
        partition = Partition.kmeans(emb, n_clusters, seed=cfg.seed, niter=lcfg.kmeans_niter,
                                     capacity=lcfg.cluster_capacity)
        log.info("partition: k-means of %s (%d-d) into %d clusters, sizes %s", source,
                 emb.shape[1], n_clusters, partition.sizes.tolist())
    partition.made_by = made_by(cfg)
    return partition
