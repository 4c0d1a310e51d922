"""Full-ranking top-K metrics: Recall, NDCG, Precision, MRR and HR at several K.

Definitions (those of the DiffRec reference's ``computeTopNAccuracy``), for one user with
ground-truth set G (non-empty) and a ranked list r_0, r_1, ... (0-based ranks, masked items
already removed):

    hits@K      = #{j < K : r_j in G}
    recall@K    = hits@K / |G|
    precision@K = hits@K / K
    dcg@K       = sum_{j < K, r_j in G} 1 / log2(j + 2)
    idcg@K      = sum_{j < min(|G|, K)} 1 / log2(j + 2)
    ndcg@K      = dcg@K / idcg@K
    mrr@K       = 1 / (j* + 1) for the first hit rank j* < K, 0 if no hit in the top K
    hr@K        = 1 if hits@K > 0 else 0    (hit ratio; with one relevant item, as in
                                             DiffuRec's protocol, hr@K == recall@K)

Users with empty ground truth contribute nothing to the sums. Two averaging conventions:

* ``"reference"``: the sums divided by the number of *all* evaluated users, those without
  ground truth included (the reference divides by ``len(predictedIndices)``, every user of
  the dataset). This is what the paper's numbers use.
* ``"users_with_truth"``: the sums divided by the number of users with non-empty ground
  truth (the plain mean over users that can be evaluated).

The reference rounds each value to 4 decimals; nothing is rounded here.

Accumulate, then finalize: ``MetricAccumulator.add`` sums per-user values batch by batch
(a W-worker evaluation merges the ranks' top-K lists first, so every rank adds the same).

A ranked list is an int array [B, W] with W >= max(ks); entries < 0 are padding (a user
with fewer than W rankable items) and never count as hits.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from .choices import Convention
from .data.csr import CSR

METRICS = ("recall", "ndcg", "precision", "mrr", "hr")
CONVENTIONS = Convention.values()


def _as_ks(ks: Iterable[int]) -> tuple[int, ...]:
    out = sorted({int(k) for k in ks})
    if not out or out[0] < 1:
        raise ValueError(f"ks must be a non-empty list of positive integers, got {list(ks)}")
    return tuple(out)


def _as_numpy_items(topk_items) -> np.ndarray:
    if isinstance(topk_items, torch.Tensor):
        topk_items = topk_items.detach().cpu().numpy()
    items = np.asarray(topk_items)
    if items.ndim != 2:
        raise ValueError(f"top-K items must be a [B, K] array, got shape {items.shape}")
    if items.size and not np.issubdtype(items.dtype, np.integer):
        raise ValueError(f"top-K items must be integers, got dtype {items.dtype}")
    return items.astype(np.int64, copy=False)


def _truth_keys(truth_rows, n_rows: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(sorted unique keys row * stride + item, |G| per row [n_rows], stride)."""
    if isinstance(truth_rows, CSR):
        if truth_rows.n_rows != n_rows:
            raise ValueError(f"ground truth has {truth_rows.n_rows} rows, top-K lists {n_rows}")
        lengths = truth_rows.row_lengths()
        cols = truth_rows.indices.astype(np.int64, copy=False)
        rows = truth_rows.row_ids()
        stride = max(int(truth_rows.n_cols), int(cols.max()) + 1 if cols.size else 1)
    else:
        truth_rows = list(truth_rows)
        if len(truth_rows) != n_rows:
            raise ValueError(f"ground truth has {len(truth_rows)} rows, top-K lists {n_rows}")
        parts = [np.asarray(r, dtype=np.int64).reshape(-1) for r in truth_rows]
        lengths = np.array([p.size for p in parts], dtype=np.int64)
        cols = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        rows = np.repeat(np.arange(n_rows, dtype=np.int64), lengths)
        stride = int(cols.max()) + 1 if cols.size else 1
    if cols.size and cols.min() < 0:
        raise ValueError("ground-truth item ids must be >= 0")
    keys = np.unique(rows * stride + cols)          # sorted; duplicates counted once
    n_truth = np.bincount(keys // stride, minlength=n_rows).astype(np.int64)
    return keys, n_truth, stride


def hit_matrix(topk_items, truth_rows) -> tuple[np.ndarray, np.ndarray]:
    """(hits [B, W] bool: topk_items[b, j] in G_b, |G_b| [B]); padding (< 0) never hits."""
    items = _as_numpy_items(topk_items)
    n_rows = items.shape[0]
    keys, n_truth, stride = _truth_keys(truth_rows, n_rows)
    valid = (items >= 0) & (items < stride)
    query = np.arange(n_rows, dtype=np.int64)[:, None] * stride + np.where(valid, items, 0)
    if keys.size == 0:
        return np.zeros(items.shape, bool), n_truth
    pos = np.minimum(np.searchsorted(keys, query), keys.size - 1)
    return (keys[pos] == query) & valid, n_truth


def per_user_metrics(topk_items, truth_rows, ks: Iterable[int]) -> tuple[dict, np.ndarray]:
    """Per-user values: ({metric: [B, len(ks)] float64}, |G| [B]); rows with |G| = 0 are 0."""
    ks = _as_ks(ks)
    hits, n_truth = hit_matrix(topk_items, truth_rows)
    n_rows, width = hits.shape
    kmax = ks[-1]
    if width < kmax:
        raise ValueError(f"top-K lists have {width} columns, fewer than max K = {kmax} "
                         "(pad with -1 where fewer items can be ranked)")
    hits = hits[:, :kmax]
    disc = 1.0 / np.log2(np.arange(kmax, dtype=np.float64) + 2.0)      # [Kmax]
    hit_cum = np.cumsum(hits, axis=1, dtype=np.int64)                   # [B, Kmax]
    dcg_cum = np.cumsum(hits * disc, axis=1)                            # [B, Kmax]
    idcg_cum = np.cumsum(disc)                                          # [Kmax]
    any_hit = hits.any(axis=1)
    first = np.where(any_hit, hits.argmax(axis=1), kmax)                # first hit rank
    has_truth = n_truth > 0
    denom = np.maximum(n_truth, 1).astype(np.float64)

    k_idx = np.asarray(ks) - 1                                          # [nK]
    n_hits = hit_cum[:, k_idx].astype(np.float64)                      # [B, nK]
    ideal = np.minimum(n_truth[:, None], np.asarray(ks)[None, :])       # [B, nK]
    idcg = np.where(ideal > 0, idcg_cum[np.maximum(ideal - 1, 0)], 1.0)
    mask = has_truth[:, None]
    out = {
        "recall": np.where(mask, n_hits / denom[:, None], 0.0),
        "ndcg": np.where(mask, dcg_cum[:, k_idx] / idcg, 0.0),
        "precision": np.where(mask, n_hits / np.asarray(ks, np.float64)[None, :], 0.0),
        "mrr": np.where(mask & (first[:, None] < np.asarray(ks)[None, :]),
                        1.0 / (first[:, None] + 1.0), 0.0),
        "hr": np.where(mask & (n_hits > 0), 1.0, 0.0),
    }
    return out, n_truth


class MetricAccumulator:
    """Sums of per-user metric values over batches; ``result`` divides per the convention.

    ``sums`` [len(METRICS), len(ks)] float64 (rows in METRICS order, columns in ``ks``
    order, ks sorted ascending), ``n_users`` (all users added), ``n_users_with_truth``.
    """

    def __init__(self, ks: Iterable[int] = (10, 20, 50, 100)):
        self.ks = _as_ks(ks)
        self.sums = np.zeros((len(METRICS), len(self.ks)), np.float64)
        self.n_users = 0
        self.n_users_with_truth = 0

    def add(self, topk_items, truth_rows) -> "MetricAccumulator":
        """Add a batch: ``topk_items`` [B, W >= max(ks)] ranked item ids (torch or numpy,
        masked items already excluded, -1 = padding), ``truth_rows`` the B ground-truth rows
        (a CSR of B rows or a sequence of B item-id lists)."""
        values, n_truth = per_user_metrics(topk_items, truth_rows, self.ks)
        for m, name in enumerate(METRICS):
            self.sums[m] += values[name].sum(axis=0)
        self.n_users += int(n_truth.shape[0])
        self.n_users_with_truth += int((n_truth > 0).sum())
        return self

    def result(self, convention: str = "reference") -> dict:
        """{"recall@K", "ndcg@K", "precision@K", "mrr@K", "hr@K" for each K, "n_users",
        "n_users_with_truth", "convention"}; 0.0 where there is nothing to average."""
        if convention == "reference":
            denom = self.n_users
        elif convention == "users_with_truth":
            denom = self.n_users_with_truth
        else:
            raise ValueError(f"unknown metric convention '{convention}' "
                             f"(expected one of {CONVENTIONS})")
        out: dict = {}
        for m, name in enumerate(METRICS):
            for j, k in enumerate(self.ks):
                out[f"{name}@{k}"] = float(self.sums[m, j] / denom) if denom else 0.0
        out["n_users"] = int(self.n_users)
        out["n_users_with_truth"] = int(self.n_users_with_truth)
        out["convention"] = convention
        return out


def compute_metrics(topk_items, truth_rows, ks: Iterable[int] = (10, 20, 50, 100),
                    convention: str = "reference") -> dict:
    """One-shot: metrics of ranked lists [B, W] against B ground-truth rows."""
    return MetricAccumulator(ks).add(topk_items, truth_rows).result(convention)


__all__ = ["METRICS", "CONVENTIONS", "MetricAccumulator", "compute_metrics",
           "per_user_metrics", "hit_matrix"]
