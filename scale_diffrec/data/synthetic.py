"""Seeded synthetic interactions with structure a recommender can learn (the default data).

The catalogue (a function of ``seed``, ``n_items``, ``n_clusters``, ``popularity_exponent``)
    - items fall into ``n_clusters`` latent clusters of unequal sizes (Dirichlet shares,
      every cluster non-empty), with members drawn at random (not contiguous ids);
    - item popularity is a power law: the item of popularity rank r (a random permutation
      of the ids) has weight (r + 1) ** -popularity_exponent.

Each user (in blocks of ``USER_BLOCK`` users, each block from its own generator keyed by
(seed, block), so any number of users streams in bounded memory)
    - has a target number of items n_u ~ lognormal with mean ``mean_items_per_user``
      (sigma ``activity_sigma``), clipped to [min_items_per_user, n_items // 2];
    - prefers ``clusters_per_user`` distinct clusters (chosen with probability proportional
      to cluster size) with Dirichlet(1) weights among them;
    - draws interactions one after another: with probability ``cluster_affinity`` from one
      of their clusters (by their weights), then an item of that cluster by popularity;
      otherwise an item of the whole catalogue by popularity. Repeats are skipped, up to
      n_u distinct items (fewer if the draws run out, which is rare);
    - the draws are timed: a random start within a year, then exponential gaps (mean one
      day), so ``train_times`` is a real time order.

Items are drawn by inverse-CDF lookups (``np.searchsorted``) in cumulative tables over the
items (one table of within-cluster shares laid end to end, one of global popularity):
O(n_items) memory for the catalogue, O(interactions of a block) for the users, never
users x items. Held-out items are predictable: they come from the user's own clusters and
follow popularity (tests check that co-occurrence beats popularity beats chance).

``load_synthetic`` builds ``InteractionData`` (split per user by ``data.split``);
``write_synthetic_parquet`` streams the same interactions to a parquet file in row groups.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import validate_section
from ..errors import ConfigError, DataError
from ..files import default_mode
from ..schema import SyntheticConfig
from .dataset import InteractionData
from .split import check_split_config, split_interactions

USER_BLOCK = 8192
T0 = 1_600_000_000                  # first possible timestamp (seconds)
START_SPAN = 365 * 86400            # users start within a year
MEAN_GAP = 86400.0                  # mean seconds between a user's interactions


def check_synthetic_params(params: dict | None, prefix: str = "data.synthetic") -> dict:
    """The generator's parameters (``schema.SyntheticConfig``: defaults and ranges) with
    ``params`` applied, or a ConfigError naming the key under ``prefix``."""
    return validate_section(SyntheticConfig, params or {}, prefix)


@dataclass
class Catalogue:
    """The items' latent structure. ``by_cluster`` [n_items] item ids grouped by cluster;
    ``cluster_cum`` [n_items]: for the j-th item of cluster c in ``by_cluster``,
    c + (popularity share of the cluster's first j+1 items), so cluster c's segment ends
    at exactly c + 1; ``global_cum`` [n_items] cumulative popularity share by item id."""
    item_cluster: np.ndarray
    cluster_sizes: np.ndarray
    by_cluster: np.ndarray
    cluster_cum: np.ndarray
    global_cum: np.ndarray

    @property
    def n_items(self) -> int:
        return len(self.item_cluster)

    @property
    def n_clusters(self) -> int:
        return len(self.cluster_sizes)

    @property
    def popularity(self) -> np.ndarray:
        """[n_items] probability of each item under global popularity."""
        return np.diff(self.global_cum, prepend=0.0)


def make_catalogue(n_items: int, n_clusters: int, popularity_exponent: float, seed: int
                   ) -> Catalogue:
    """The catalogue of the module docstring; memory ~ 5 arrays of n_items (+2 temporary)."""
    rng = np.random.default_rng([seed, 0])
    shares = rng.dirichlet(np.full(n_clusters, 4.0))
    sizes = 1 + rng.multinomial(n_items - n_clusters, shares)
    by_cluster = rng.permutation(n_items)
    seg = np.repeat(np.arange(n_clusters, dtype=np.int64), sizes)
    item_cluster = np.empty(n_items, np.int64)
    item_cluster[by_cluster] = seg
    global_cum = rng.permutation(n_items) + 1.0                 # popularity rank + 1
    global_cum **= -popularity_exponent                         # -> popularity weight

    w = global_cum[by_cluster]
    ends = np.cumsum(sizes)
    starts = ends - sizes
    cluster_cum = np.cumsum(w)
    before = cluster_cum[starts] - w[starts]
    total = np.add.reduceat(w, starts)
    del w
    cluster_cum -= np.repeat(before, sizes)
    cluster_cum /= np.repeat(total, sizes)
    cluster_cum += seg
    del seg
    cluster_cum[ends - 1] = np.arange(1, n_clusters + 1)     # exact segment ends
    np.cumsum(global_cum, out=global_cum)
    global_cum /= global_cum[-1]
    global_cum[-1] = 1.0
    return Catalogue(item_cluster, sizes, by_cluster, cluster_cum, global_cum)


def _lookup(table: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``np.searchsorted(table, q, side='right')``; the queries are searched in sorted order
    (each search starts from the last one), ~10x faster on large tables."""
    order = np.argsort(q)
    out = np.empty(len(q), np.int64)
    out[order] = np.searchsorted(table, q[order], side="right")
    return out


def _choose_clusters(rng, sizes: np.ndarray, n_users: int, k: int) -> np.ndarray:
    """[n_users, k] distinct clusters per user, drawn one after another with probability
    proportional to cluster size among those not yet drawn (redraw on a repeat)."""
    n_clusters = len(sizes)
    if k >= n_clusters:
        return np.argsort(rng.random((n_users, n_clusters)), axis=1)
    cum = np.cumsum(sizes) / sizes.sum()
    prefs = np.empty((n_users, k), np.int64)
    for j in range(k):
        todo = np.arange(n_users)
        while len(todo):
            cand = np.minimum(np.searchsorted(cum, rng.random(len(todo)), side="right"),
                              n_clusters - 1)
            clash = (prefs[todo, :j] == cand[:, None]).any(axis=1)
            prefs[todo[~clash], j] = cand[~clash]
            todo = todo[clash]
    return prefs


def generate_block(cat: Catalogue, params: dict, block: int, n_users: int):
    """Interactions of users [block * USER_BLOCK, + n_users): (users, items, times), each
    user's rows in time order."""
    rng = np.random.default_rng([params["seed"], 1, block])
    n_items, n_clusters = cat.n_items, cat.n_clusters
    sigma = params["activity_sigma"]
    mean = params["mean_items_per_user"]
    target = np.rint(rng.lognormal(np.log(mean) - sigma ** 2 / 2, sigma, n_users))
    lo = min(params["min_items_per_user"], n_items)
    target = np.clip(target, lo, max(lo, n_items // 2)).astype(np.int64)
    draws = np.ceil(1.5 * target).astype(np.int64) + 2
    k = min(params["clusters_per_user"], n_clusters)

    prefs = _choose_clusters(rng, cat.cluster_sizes, n_users, k)
    cumw = np.cumsum(rng.dirichlet(np.ones(k), size=n_users), axis=1)

    user_of = np.repeat(np.arange(n_users, dtype=np.int64), draws)
    m = len(user_of)
    affine = rng.random(m) < params["cluster_affinity"]
    slot = (rng.random(m)[:, None] >= cumw[user_of, :-1]).sum(axis=1)
    cluster = prefs[user_of, slot]
    pos = _lookup(cat.cluster_cum, cluster + rng.random(m))
    from_cluster = cat.by_cluster[np.minimum(pos, n_items - 1)]
    from_all = np.minimum(_lookup(cat.global_cum, rng.random(m)), n_items - 1)
    items = np.where(affine, from_cluster, from_all)

    gaps = rng.exponential(MEAN_GAP, m)
    csum = np.cumsum(gaps)
    first = np.cumsum(draws) - draws
    start = T0 + rng.integers(0, START_SPAN, n_users)
    times = start[user_of] + np.floor(csum - (csum[first] - gaps[first])[user_of]
                                      ).astype(np.int64)

    perm = np.argsort(user_of * n_items + items, kind="stable")
    key = (user_of * n_items + items)[perm]
    first = np.ones(m, bool)
    first[1:] = key[1:] != key[:-1]
    keep = np.sort(perm[first])                   # first occurrences, in draw order
    u = user_of[keep]
    counts = np.bincount(u, minlength=n_users)
    rank = np.arange(len(u)) - (np.cumsum(counts) - counts)[u]
    keep = keep[rank < target[u]]
    return block * USER_BLOCK + user_of[keep], items[keep], times[keep]


def iter_blocks(params: dict, catalogue: Catalogue | None = None):
    """Yield (users, items, times) per block of USER_BLOCK users."""
    params = check_synthetic_params(params, prefix="synthetic")
    cat = catalogue or make_catalogue(params["n_items"], params["n_clusters"],
                                      params["popularity_exponent"], params["seed"])
    n_users = params["n_users"]
    for block in range(-(-n_users // USER_BLOCK)):
        yield generate_block(cat, params, block,
                             min(USER_BLOCK, n_users - block * USER_BLOCK))


def generate_interactions(params: dict | None = None):
    """All interactions in memory: (users, items, times, catalogue)."""
    params = check_synthetic_params(params, prefix="synthetic")
    cat = make_catalogue(params["n_items"], params["n_clusters"],
                         params["popularity_exponent"], params["seed"])
    parts = list(iter_blocks(params, cat))
    users, items, times = (np.concatenate([p[i] for p in parts]) for i in range(3))
    return users, items, times, cat


def item_clusters(params: dict | None = None) -> np.ndarray:
    """[n_items] the latent cluster of each item under ``data.synthetic`` params."""
    params = check_synthetic_params(params)
    return make_catalogue(params["n_items"], params["n_clusters"],
                          params["popularity_exponent"], params["seed"]).item_cluster


def load_synthetic(params: dict | None = None, split: dict | None = None,
                   n_items: int | None = None, name: str | None = None) -> InteractionData:
    """``InteractionData`` from ``data.synthetic`` params, split by ``data.split``.

    ``train_times`` are the generated timestamps (``item_clusters(params)`` gives the
    ground-truth cluster of each item; ``meta`` stays JSON-serializable). ``n_items``
    (``data.n_items``), when declared, must equal the generated catalogue size.
    """
    params = check_synthetic_params(params)
    rule, valid, test, seed = check_split_config(split or {})
    if n_items is not None and int(n_items) != params["n_items"]:
        raise ConfigError(f"config key 'data.n_items' ({n_items}) differs from "
                          f"'data.synthetic.n_items' ({params['n_items']})")
    users, items, times, cat = generate_interactions(params)
    n_users, n_cat = params["n_users"], params["n_items"]
    train, valid_m, test_m, train_times, info = split_interactions(
        users, items, n_users, n_cat, rule, valid, test, seed, times=times)
    for split_name, m in (("valid", valid_m), ("test", test_m)):
        if m.nnz == 0:
            raise DataError("synthetic", f"the split rule '{rule}' (data.split.valid="
                                         f"{valid}, data.split.test={test}) leaves the "
                                         f"{split_name} split empty")
    meta = {"source": "synthetic", "params": params,
            "split": {"rule": rule, "valid": valid, "test": test, "seed": seed},
            "rows": len(users), **info}
    return InteractionData(name=name or "synthetic", train=train, valid=valid_m, test=test_m,
                           train_times=train_times, meta=meta)


def write_synthetic_parquet(path: str | Path, n_users: int, n_items: int,
                            n_clusters: int = 8, mean_items_per_user: float = 30,
                            popularity_exponent: float = 1.0, cluster_affinity: float = 0.8,
                            seed: int = 0, clusters_per_user: int = 2,
                            min_items_per_user: int = 3, activity_sigma: float = 0.6,
                            rows_per_group: int = 1_000_000, string_ids: bool = False,
                            compression: str = "snappy") -> dict:
    """Stream the synthetic interactions to a parquet file (user_id, item_id, timestamp).

    The same interactions as ``generate_interactions`` with these parameters, in user
    order, written ``rows_per_group`` rows per row group with ``ParquetWriter``: memory is
    the catalogue (O(n_items)) plus one row group plus one user block, so it works for
    10M-item catalogues and any number of users. ``string_ids`` writes ids as 'u<n>' /
    'i<n>' strings. The file is written to a temporary sibling and renamed into place:
    a failure leaves an existing file at ``path`` untouched.
    Returns {'path', 'rows', 'row_groups'}.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    params = check_synthetic_params(dict(
        n_users=n_users, n_items=n_items, n_clusters=n_clusters,
        mean_items_per_user=mean_items_per_user, popularity_exponent=popularity_exponent,
        cluster_affinity=cluster_affinity, seed=seed, clusters_per_user=clusters_per_user,
        min_items_per_user=min_items_per_user, activity_sigma=activity_sigma),
        prefix="synthetic")
    if isinstance(rows_per_group, bool) or not isinstance(rows_per_group, int) \
            or rows_per_group < 1:
        raise ValueError(f"rows_per_group must be a positive integer, got {rows_per_group!r}")
    id_type = pa.large_string() if string_ids else pa.int64()
    schema = pa.schema([("user_id", id_type), ("item_id", id_type),
                        ("timestamp", pa.int64())])

    def ids(values, prefix):
        arr = pa.array(values, type=pa.int64())
        if not string_ids:
            return arr
        ls = pa.large_string()
        return pc.binary_join_element_wise(pa.scalar(prefix, ls), arr.cast(ls),
                                           pa.scalar("", ls))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    rows = groups = 0
    try:
        default_mode(tmp)
        with pq.ParquetWriter(tmp, schema, compression=compression) as writer:
            def write(cols, lo, hi):
                nonlocal rows, groups
                table = pa.table([ids(cols[0][lo:hi], "u"), ids(cols[1][lo:hi], "i"),
                                  pa.array(cols[2][lo:hi], type=pa.int64())], schema=schema)
                writer.write_table(table, row_group_size=hi - lo)
                rows, groups = rows + hi - lo, groups + 1

            pending = None                  # rows not yet written (< rows_per_group)
            for block in iter_blocks(params):
                pending = block if pending is None else tuple(
                    np.concatenate([a, b]) for a, b in zip(pending, block))
                done, n = 0, len(pending[0])
                while n - done >= rows_per_group:
                    write(pending, done, done + rows_per_group)
                    done += rows_per_group
                pending = tuple(a[done:] for a in pending)
            if pending is not None and len(pending[0]):
                write(pending, 0, len(pending[0]))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"path": str(path), "rows": rows, "row_groups": groups}
