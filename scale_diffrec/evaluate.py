"""Full-ranking evaluation: score every item for every user, mask seen items, rank, measure.

As in the DiffRec reference: every user 0 .. n_users - 1 is evaluated in batches; the
model's input is the user's train row; train items are masked with -inf (for the test
split, valid items too); the top max(ks) items are ranked with ``torch.topk`` and compared
with that split's rows (metric definitions and the two averaging conventions in
``metrics.py``). Users without ground truth in the split still count in the "reference"
convention's denominator.

Three entry points:

* ``evaluate(model, data, split, ...)`` -> metrics dict (what train and the CLI call);
* ``accumulate(model, data, split, ..., users=...)`` -> ``MetricAccumulator``, for a
  subset of users (a distributed evaluator all-reduces ``acc.to_array()``);
* ``evaluate_topk(topk, data, split, ...)`` -> metrics of precomputed top-K lists (e.g.
  from the FAISS index), which must equal ``evaluate``'s for the same rankings.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from .data.csr import CSR
from .data.dataset import InteractionData
from .device import autocast
from .metrics import CONVENTIONS, MetricAccumulator, _as_ks, _as_numpy_items
from .models.base import Recommender

SPLITS = ("valid", "test")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}' (expected one of {SPLITS})")


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown metric convention '{convention}' "
                         f"(expected one of {CONVENTIONS})")


def excluded_matrices(data: InteractionData, split: str) -> list[CSR]:
    """The matrices whose items are masked when ranking for ``split``: train (+ valid)."""
    _check_split(split)
    return [data.train] if split == "valid" else [data.train, data.valid]


def truth_matrix(data: InteractionData, split: str) -> CSR:
    _check_split(split)
    return data.valid if split == "valid" else data.test


def exclusion_mask(exclude: CSR | Sequence[CSR] | None, shape: tuple[int, int],
                   device: torch.device | str | None = None) -> torch.Tensor:
    """[B, I] bool, True at the items of each row of the exclude CSR(s) (each B rows)."""
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    if exclude is None:
        return mask
    for csr in ([exclude] if isinstance(exclude, CSR) else exclude):
        if csr.n_rows != shape[0]:
            raise ValueError(f"exclude matrix has {csr.n_rows} rows, scores {shape[0]}")
        if csr.nnz == 0:
            continue
        rows = np.repeat(np.arange(csr.n_rows, dtype=np.int64), csr.row_lengths())
        mask[torch.from_numpy(rows).to(mask.device),
             torch.from_numpy(csr.indices.astype(np.int64, copy=False)).to(mask.device)] = True
    return mask


def topk_excluding(scores: torch.Tensor, exclude: CSR | Sequence[CSR] | None, k: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k items of each row of ``scores`` [B, I], never an excluded item.

    ``exclude``: a CSR of B rows (or several, e.g. train and valid) whose items are set to
    -inf before ``torch.topk``. Returns (items [B, k] int64, scores [B, k]), best first.
    Where a row has fewer than k rankable items, the remaining slots hold item -1 and score
    -inf (padding, never a hit). ``scores`` is not modified.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, I], got shape {tuple(scores.shape)}")
    k = int(k)
    n_rows, n_items = scores.shape
    mask = exclusion_mask(exclude, (n_rows, n_items), scores.device)
    masked = scores.masked_fill(mask, float("-inf"))
    kk = min(k, n_items)
    values, items = torch.topk(masked, kk, dim=1, largest=True, sorted=True)
    # an excluded item can only surface once every rankable item is taken (or on ties with
    # a model's own -inf scores): turn those slots into padding
    hidden = mask.gather(1, items)
    items = items.masked_fill(hidden, -1)
    values = values.masked_fill(hidden, float("-inf"))
    if kk < k:
        items = torch.cat([items, items.new_full((n_rows, k - kk), -1)], dim=1)
        values = torch.cat([values, values.new_full((n_rows, k - kk), float("-inf"))], dim=1)
    return items, values


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def accumulate(model: Recommender, data: InteractionData, split: str = "valid",
               ks: Iterable[int] = (10, 20, 50, 100), batch_size: int = 1000,
               device: torch.device | str | None = None,
               users: np.ndarray | None = None, precision: str = "fp32") -> MetricAccumulator:
    """Metric sums of ``model`` over ``users`` (default: all users, in order); the forward
    pass in ``precision`` (``device.autocast``), the ranking on fp32 scores."""
    _check_split(split)
    ks = _as_ks(ks)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _model_device(model) if device is None else torch.device(device)
    users = (np.arange(data.n_users, dtype=np.int64) if users is None
             else np.asarray(users, dtype=np.int64))
    exclude = excluded_matrices(data, split)
    truth = truth_matrix(data, split)
    acc = MetricAccumulator(ks)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(users), batch_size):
                rows = users[start: start + batch_size]
                batch = data.train.take_rows(rows).to_torch(device)
                with autocast(device, precision):
                    scores = model.score(batch).float()
                if tuple(scores.shape) != (len(rows), data.n_items):
                    raise ValueError(f"model.score returned shape {tuple(scores.shape)}, "
                                     f"expected {(len(rows), data.n_items)}")
                items, _ = topk_excluding(scores, [m.take_rows(rows) for m in exclude], ks[-1])
                acc.add(items.cpu().numpy(), truth.take_rows(rows))
    finally:
        model.train(was_training)
    return acc


def evaluate(model: Recommender, data: InteractionData, split: str = "valid",
             ks: Iterable[int] = (10, 20, 50, 100), convention: str = "reference",
             batch_size: int = 1000, device: torch.device | str | None = None,
             precision: str = "fp32") -> dict:
    """Full-ranking metrics of ``model`` on ``split`` ("valid" or "test") over all users.

    Returns {"recall@K", "ndcg@K", "precision@K", "mrr@K" for K in ks, "n_users",
    "n_users_with_truth", "convention"}. ``device``: where batches go (default: the
    model's device). The model's train/eval mode is restored afterwards.
    """
    _check_convention(convention)
    acc = accumulate(model, data, split, ks, batch_size, device, precision=precision)
    return acc.result(convention)


def evaluate_topk(topk_items, data: InteractionData, split: str = "valid",
                  ks: Iterable[int] = (10, 20, 50, 100), convention: str = "reference",
                  users: np.ndarray | None = None, batch_size: int = 1000) -> dict:
    """Metrics of precomputed ranked lists: row r of ``topk_items`` [n, W >= max(ks)]
    (torch or numpy; masked items already excluded, -1 = padding) is user ``users[r]``
    (default: all users in order, n = n_users).

    Sums are accumulated per ``batch_size`` rows, as ``evaluate`` does, so the same
    rankings with the same batch size give bit-identical results; other batch sizes agree
    to float64 rounding (~1e-16 relative).
    """
    _check_split(split)
    _check_convention(convention)
    items = _as_numpy_items(topk_items)
    users = (np.arange(data.n_users, dtype=np.int64) if users is None
             else np.asarray(users, dtype=np.int64))
    if items.shape[0] != len(users):
        raise ValueError(f"top-K lists have {items.shape[0]} rows for {len(users)} users")
    truth = truth_matrix(data, split)
    acc = MetricAccumulator(ks)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(users), batch_size):
        rows = users[start: start + batch_size]
        acc.add(items[start: start + batch_size], truth.take_rows(rows))
    return acc.result(convention)


__all__ = ["evaluate", "accumulate", "evaluate_topk", "topk_excluding", "exclusion_mask",
           "excluded_matrices", "truth_matrix", "SPLITS"]
