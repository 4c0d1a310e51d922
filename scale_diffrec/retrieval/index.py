"""FAISS indexes of item vectors: build, search (CPU or GPU, sharded), merge by score.

Maximum inner product search (DESIGN.md, "Retrieval"). A head scores its items as
``q @ W.T + b``; with item vectors ``v_i = [W_i, b_i]`` [I_h, d_h + 1] and queries
``[q, 1]`` [B, d_h + 1] the logit is the inner product ``<[q, 1], v_i>``. IVF-PQ needs the
dimension to be a multiple of its sub-quantizer count ``pq_m``; vectors are then padded
with zero columns, which leaves every inner product unchanged.

A head's items may be split into shards (contiguous runs of its rows), one FAISS index
each: a ``SearchUnit`` is one such index plus ``items`` [n] (the global item index of
each row; FAISS labels are row positions 0..n-1). Searching runs every unit (CPU units in
parallel threads; FAISS releases the GIL) and merges the candidates by score; raw logits
of different heads compare directly because the softmax normaliser is shared.

IVF kinds assign vectors to their nearest centroid, which serves inner products badly when
item norms vary (popular items have long vectors). They index
``[v_i, sqrt(M^2 - |v_i|^2)]`` with M = max_i |v_i| under L2 instead (Bachrach et al. 2014,
"Speeding up the Xbox recommender system"): for a query ``u = [q, 1, 0]``,
``|u - v'|^2 = |u|^2 + M^2 - 2 <u, v>``, so the L2 order is the inner-product order and the
logit is recovered exactly as ``(|u|^2 + M^2 - dist) / 2``. Flat and HNSW use IP directly
(HNSW's graph navigates the augmented sphere poorly: measured recall@20 0.24 vs 0.90 by IP
on the synthetic benchmark catalogue).

Seen items are removed after the search, exactly: for each unit the search asks for
``k + (the most seen items any user of the batch has in that unit)`` results, so at least
k unseen items of each unit survive (when the unit has them); the merged top-k is then the
exact top-k of unseen items for a flat index.

Index types (``kind``) and their parameters (``params``, defaults in ``DEFAULTS``):
    flat   IndexFlatIP, exact
    ivf    IndexIVFFlat(IP): nlist (None = 4 sqrt(n); at most n / 39), nprobe (<= nlist)
    hnsw   IndexHNSWFlat(IP): M, ef_construction, ef_search (CPU only: FAISS has no GPU HNSW)
    ivfpq  IndexIVFPQ(IP): nlist, nprobe, pq_m, pq_nbits
A unit too small for its kind (IVF-PQ with fewer than 2**pq_nbits items) falls back to
flat; ``resolve_params`` records what each unit really is. Every setting is range-checked
first (``params``).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..data.csr import CSR
from ..errors import ConfigError
from ..optional import require_faiss
from .params import (DEFAULTS, INDEX_TYPES, SEARCH_PARAMS, check_params, check_setting,
                     option)

faiss = require_faiss("exporting or serving an index bundle")

GPU_KINDS = ("flat", "ivf", "ivfpq")
L2_KINDS = ("ivf", "ivfpq")   # searched by L2 over norm-augmented vectors
GPU_MAX_K = 2048            # FAISS GPU k-selection limit; larger searches use the CPU copy
MIN_POINTS_PER_LIST = 39    # FAISS warns below this many training points per centroid


# ----------------------------------------------------------------------------- GPU
def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_use_gpu(use_gpu) -> bool:
    """``"auto"`` -> whether a GPU is usable; True / False as given (True without a GPU
    is an error, so that a request for the GPU path never silently runs on CPU)."""
    if use_gpu == "auto":
        return gpu_available()
    if use_gpu in (True, "yes", "true", "1"):
        if not gpu_available():
            raise RuntimeError("use_gpu=True but faiss has no GPU support or sees no GPU "
                               "(install faiss-gpu on a machine with a GPU, or use 'auto')")
        return True
    if use_gpu in (False, "no", "false", "0", None):
        return False
    raise ValueError(f"use_gpu must be 'auto', True or False, got {use_gpu!r}")


_GPU_RESOURCES = None


def gpu_resources():
    """One shared StandardGpuResources (it is not thread-safe: GPU units search serially)."""
    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    return _GPU_RESOURCES


def to_gpu(index: faiss.Index, kind: str) -> faiss.Index | None:
    """A GPU copy of a CPU index, or None for kinds FAISS cannot put on a GPU (HNSW)."""
    if kind not in GPU_KINDS:
        return None
    return faiss.index_cpu_to_gpu(gpu_resources(), 0, index)


# ----------------------------------------------------------------------------- vectors
def index_dim(head_dim: int, kind: str, params: dict) -> int:
    """Width of the stored vectors: d_h + 1 (the bias) [+ 1 (the norm augmentation of the
    L2 kinds)], padded to a multiple of pq_m."""
    d = head_dim + 1 + (kind in L2_KINDS)
    if kind == "ivfpq":
        m = int(params["pq_m"])
        d = m * math.ceil(d / m)
    return d


def item_vectors(weight: np.ndarray, bias: np.ndarray, dim: int,
                 mips_norm: float | None = None) -> np.ndarray:
    """[I_h, dim] float32 rows [W_i, b_i, 0...] from weight [I_h, d_h], bias [I_h]; with
    ``mips_norm`` M the column after the bias holds sqrt(M^2 - |[W_i, b_i]|^2)."""
    n, d = weight.shape
    out = np.zeros((n, dim), np.float32)
    out[:, :d] = weight
    out[:, d] = bias
    if mips_norm is not None:
        sq = np.einsum("ij,ij->i", out[:, :d + 1], out[:, :d + 1], dtype=np.float64)
        out[:, d + 1] = np.sqrt(np.maximum(float(mips_norm) ** 2 - sq, 0.0))
    return out


def mips_norm(weight: np.ndarray, bias: np.ndarray) -> float:
    """M = max_i |[W_i, b_i]| (a hair above, so that every augmentation is real)."""
    sq = np.einsum("ij,ij->i", weight, weight, dtype=np.float64) + bias.astype(np.float64) ** 2
    return float(np.sqrt(sq.max(initial=0.0)) * (1 + 1e-6))


def query_vectors(query: np.ndarray, dim: int) -> np.ndarray:
    """[B, dim] float32 rows [q, 1, 0...] from query [B, d_h]."""
    b, d = query.shape
    out = np.zeros((b, dim), np.float32)
    out[:, :d] = query
    out[:, d] = 1.0
    return out


# ----------------------------------------------------------------------------- building
def resolve_params(kind: str, n: int, params: dict | None) -> tuple[str, dict]:
    """(kind, full parameters) for a unit of ``n`` items: defaults filled in, IVF-PQ on
    fewer than 2**pq_nbits items replaced by flat. A derived nlist (4 sqrt(n)) and the
    default nprobe are capped so every list gets >= 39 training points and nprobe <=
    nlist; an explicit nlist or nprobe beyond that is a ConfigError naming the largest
    allowed value."""
    params = check_params(kind, params)
    full = {**DEFAULTS[kind], **{k: v for k, v in params.items() if v is not None}}
    if kind == "ivfpq" and n < 2 ** int(full["pq_nbits"]):
        return "flat", {}
    if kind in ("ivf", "ivfpq"):
        cap = max(1, n // MIN_POINTS_PER_LIST)
        if params.get("nlist") is not None and params["nlist"] > cap:
            raise ConfigError(f"{option('nlist')} {params['nlist']}: at most {cap} for a unit "
                              f"of {n} items (>= {MIN_POINTS_PER_LIST} items per list)")
        nlist = full["nlist"] if full["nlist"] is not None else int(4 * math.sqrt(n))
        full["nlist"] = int(max(1, min(int(nlist), cap)))
        if params.get("nprobe") is not None and params["nprobe"] > full["nlist"]:
            raise ConfigError(f"{option('nprobe')} {params['nprobe']}: at most "
                              f"{full['nlist']}, the lists of a unit of {n} items")
        full["nprobe"] = int(min(int(full["nprobe"]), full["nlist"]))
    return kind, full


def new_index(kind: str, dim: int, params: dict) -> faiss.Index:
    """An empty (untrained) CPU index of ``kind``: inner product (flat, HNSW) or L2 over
    norm-augmented vectors (``L2_KINDS``)."""
    l2 = faiss.METRIC_L2
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "ivf":
        return faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, params["nlist"], l2)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(params["M"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(params["ef_construction"])
        return index
    if kind == "ivfpq":
        return faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, params["nlist"],
                                int(params["pq_m"]), int(params["pq_nbits"]), l2)
    raise ValueError(f"unknown index type '{kind}' (expected one of {INDEX_TYPES})")


def build_index(vectors: np.ndarray, kind: str, params: dict, use_gpu: bool = False
                ) -> faiss.Index:
    """A CPU index of ``kind`` holding ``vectors`` [n, dim] (row i gets label i).

    With ``use_gpu`` the index is trained and filled on the GPU, then copied back to CPU
    (``index_gpu_to_cpu``), ready to be serialised. ``params`` must be resolved
    (``resolve_params``).
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = new_index(kind, vectors.shape[1], params)
    gpu = to_gpu(index, kind) if use_gpu else None
    target = gpu if gpu is not None else index
    if not target.is_trained:
        target.train(vectors)
    target.add(vectors)
    out = faiss.index_gpu_to_cpu(gpu) if gpu is not None else index
    set_search_params(out, kind, params)
    return out


def set_search_params(index: faiss.Index, kind: str, params: dict) -> None:
    """Apply nprobe (IVF) / ef_search (HNSW) from ``params`` to a CPU or GPU index."""
    if kind in ("ivf", "ivfpq") and params.get("nprobe") is not None:
        space = (faiss.GpuParameterSpace() if _is_gpu_index(index) else faiss.ParameterSpace())
        space.set_index_parameter(index, "nprobe", int(params["nprobe"]))
    elif kind == "hnsw" and params.get("ef_search") is not None:
        faiss.downcast_index(index).hnsw.efSearch = int(params["ef_search"])


def _is_gpu_index(index: faiss.Index) -> bool:
    return hasattr(faiss, "GpuIndex") and isinstance(faiss.downcast_index(index), faiss.GpuIndex)


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous [start, end) row ranges of near-equal size covering 0..n."""
    shards = max(1, min(int(shards), n))
    edges = np.linspace(0, n, shards + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


# ----------------------------------------------------------------------------- searching
@dataclass
class SearchUnit:
    """One FAISS index over some items of head ``head``.

    ``index`` the CPU index (labels = row positions), ``items`` [n] global item index of
    each row, ``kind`` / ``params`` what it is and its search settings, ``gpu`` an
    optional GPU copy used for searches up to ``GPU_MAX_K`` results.
    """
    head: str
    index: faiss.Index
    items: np.ndarray
    kind: str
    params: dict = field(default_factory=dict)
    gpu: faiss.Index | None = None

    @property
    def n_items(self) -> int:
        return len(self.items)

    def set_search(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Override nprobe / ef_search (None keeps the current value)."""
        override = {"nprobe": check_setting("nprobe", nprobe),
                    "ef_search": check_setting("ef_search", ef_search)}
        for key in SEARCH_PARAMS[self.kind]:
            if override[key] is not None:
                self.params[key] = int(override[key])
        for index in (self.index, self.gpu):
            if index is not None:
                set_search_params(index, self.kind, self.params)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(items [B, k] global indexes, -1 where none; scores [B, k] float32 logits)."""
        k = min(int(k), self.n_items)
        index = self.gpu if self.gpu is not None and k <= GPU_MAX_K else self.index
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        scores, pos = index.search(queries, k)
        if self.kind in L2_KINDS:          # L2 distance -> inner product (module docstring)
            sq = np.einsum("ij,ij->i", queries, queries)[:, None]
            scores = 0.5 * (sq + float(self.params["mips_norm"]) ** 2 - scores)
        items = np.where(pos >= 0, self.items[np.maximum(pos, 0)], -1)
        return items, scores.astype(np.float32)


def seen_counts(seen: CSR, unit_of: np.ndarray, n_units: int) -> np.ndarray:
    """[B, n_units] how many of each row's seen items lie in each unit."""
    rows = seen.row_ids()
    flat = np.bincount(rows * n_units + unit_of[seen.indices], minlength=seen.n_rows * n_units)
    return flat.reshape(seen.n_rows, n_units)


def is_seen(items: np.ndarray, seen: CSR) -> np.ndarray:
    """[B, C] bool: items[b, c] is one of row b's seen items."""
    n_cols = max(seen.n_cols, 1)
    rows = seen.row_ids()
    seen_keys = rows * n_cols + seen.indices
    keys = np.arange(items.shape[0], dtype=np.int64)[:, None] * n_cols + items
    return np.isin(keys, seen_keys) & (items >= 0)


def merge_topk(items: np.ndarray, scores: np.ndarray, k: int, seen: CSR | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of candidate lists (items [B, C] with -1 = none, scores [B, C]), best first,
    seen items dropped; slots beyond the available candidates are item -1, score -inf."""
    scores = scores.astype(np.float32, copy=True)
    drop = items < 0
    if seen is not None:
        drop |= is_seen(items, seen)
    scores[drop] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_items = np.take_along_axis(items, order, axis=1)
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_items[~np.isfinite(top_scores)] = -1
    if top_items.shape[1] < k:
        pad = k - top_items.shape[1]
        top_items = np.pad(top_items, ((0, 0), (0, pad)), constant_values=-1)
        top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return top_items, top_scores


def search_units(units: list[SearchUnit], queries: dict[str, np.ndarray], k: int,
                 seen: CSR | None = None, unit_of: np.ndarray | None = None,
                 threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k items [B, k] and scores [B, k] over all ``units``, seen items excluded.

    ``queries``: {head: [B, dim_h]} (``query_vectors``); ``unit_of`` [I]: the unit of
    each item (needed with ``seen``). CPU units run in a thread pool of ``threads``
    (default: one per unit); GPU units one after another.
    """
    extra = (np.zeros(len(units), np.int64) if seen is None
             else seen_counts(seen, unit_of, len(units)).max(axis=0, initial=0))
    jobs = [(u, queries[u.head], k + int(e)) for u, e in zip(units, extra)]
    if any(u.gpu is not None for u in units) or len(units) == 1:
        results = [u.search(q, kk) for u, q, kk in jobs]
    else:
        with ThreadPoolExecutor(max_workers=threads or len(units)) as pool:
            results = list(pool.map(lambda job: job[0].search(job[1], job[2]), jobs))
    items = np.concatenate([r[0] for r in results], axis=1)
    scores = np.concatenate([r[1] for r in results], axis=1)
    return merge_topk(items, scores, k, seen)


__all__ = ["INDEX_TYPES", "DEFAULTS", "SearchUnit", "build_index", "resolve_params",
           "item_vectors", "mips_norm", "query_vectors", "index_dim", "shard_bounds", "search_units",
           "merge_topk", "gpu_available", "resolve_use_gpu", "to_gpu", "set_search_params"]
