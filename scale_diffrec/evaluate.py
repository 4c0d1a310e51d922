"""Full-ranking evaluation: score every item for every user, mask seen items, rank, measure.

As in the DiffRec reference: every user 0 .. n_users - 1 is evaluated in batches; the
model's input is the user's train row; train items are masked with -inf (for the test
split, valid items too); the top max(ks) items are ranked and compared with that split's
rows (metric definitions and the two averaging conventions in ``metrics.py``). Scores are
made and ranked a ``chunk_mib`` block of items at a time (``ranking.py``): a model with
linear heads is scored head by head from its queries, so no [B, I] matrix is built; any
other model gives its own blocks (``Recommender.score_chunks``). Users without ground
truth in the split still count in the "reference" convention's denominator.

Sequential data (``data.sequences.Sequences``, model DiffuRec) flows through the same
path: a user's input is the ``SequenceBatch`` of its valid / test sample (the items before
the target), the truth its one target, and nothing is masked (the official DiffuRec
protocol: history not masked, the pad never ranked) unless ``mask_history`` excludes the
input's items (the masked variant).

Two entry points:

* ``evaluate(model, data, split, ...)`` -> metrics dict (what train and the CLI call; on a
  rank of a W-worker run each rank scores its own items and the ranks' top-K lists merge,
  ``ranking.merge_ranks``, so every rank returns the same metrics);
* ``evaluate_topk(topk, data, split, ...)`` -> metrics of precomputed top-K lists (e.g.
  from the FAISS index), which must equal ``evaluate``'s for the same rankings.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from .data.csr import CSR
from .finite import NonFiniteError, count_non_finite
from .data.dataset import InteractionData
from .data.sequences import Sequences
from .device import autocast, chunk_items, model_device
from .metrics import CONVENTIONS, MetricAccumulator, _as_ks, _as_numpy_items
from .models.base import Recommender
from .shard.collectives import all_reduce_sum
from .ranking import RunningTopK, linear_chunks, merge_ranks, seen_positions

SPLITS = ("valid", "test")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}' (expected one of {SPLITS})")


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown metric convention '{convention}' "
                         f"(expected one of {CONVENTIONS})")


def excluded_matrices(data: InteractionData | Sequences, split: str,
                      mask_history: bool = False) -> list[CSR]:
    """The matrices whose items are masked when ranking for ``split``: train (+ valid);
    for sequences none, or with ``mask_history`` the items of each user's input."""
    _check_split(split)
    if isinstance(data, Sequences):
        return [data.history(split)] if mask_history else []
    return [data.train] if split == "valid" else [data.train, data.valid]


def truth_matrix(data: InteractionData | Sequences, split: str) -> CSR:
    """[n_users, n_items] the items to find for ``split`` (sequences: the one target)."""
    _check_split(split)
    if isinstance(data, Sequences):
        return data.truth(split)
    return data.valid if split == "valid" else data.test


def model_inputs(data: InteractionData | Sequences, users: np.ndarray, split: str, device):
    """The model's batch for ``users`` on ``device``: their train CSR rows, or (sequences)
    the ``SequenceBatch`` of their ``split`` samples."""
    if isinstance(data, Sequences):
        return data.samples(data.eval_positions(split)[users], device)
    return data.train.take_rows(users).to_torch(device)


def topk_excluding(scores: torch.Tensor, exclude: CSR | Sequence[CSR] | None, k: int,
                   chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k items of each row of ``scores`` [B, I], never an excluded item.

    ``exclude``: a CSR of B rows (or several, e.g. train and valid) whose items are set to
    -inf before ranking (``ranking.RunningTopK``, ``chunk`` columns at a time; None:
    ``device.chunk_items``). Returns
    (items [B, k] int64, scores [B, k]), best first. Where a row has fewer than k rankable
    items (score > -inf), the remaining slots hold item -1 and score -inf (padding, never a
    hit). ``scores`` is not modified.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, I], got shape {tuple(scores.shape)}")
    scores = scores.clone()
    top = RunningTopK(scores.shape[0], k, seen_positions(exclude, scores.shape[0],
                                                         device=scores.device), scores.device)
    items = torch.arange(scores.shape[1], device=scores.device)
    chunk = chunk or chunk_items(scores.shape[0], scores.device)
    for s in range(0, scores.shape[1], chunk):
        top.add(scores[:, s:s + chunk], items[s:s + chunk])
    return top.result()


def has_linear_heads(model: Recommender) -> bool:
    """Whether the model's scores are its linear heads (``Recommender.item_heads``) for
    every item it ranks: it defines heads and its setting is exportable
    (``Recommender.export_error``; e.g. not DiffRec eps from a noised start)."""
    return (type(model).item_heads is not Recommender.item_heads
            and model.export_error() is None)


def score_chunks(model: Recommender, batch, heads: list | None, chunk: int):
    """(scores [B, n], items [n]) blocks covering the catalogue for a batch: the linear
    ``heads`` (``model.item_heads()``) chunk by chunk from the model's queries, or, without
    heads, the model's own ``score_chunks``."""
    if heads is None:
        yield from model.score_chunks(batch, chunk)
        return
    queries = model.query(batch)
    for h in heads:
        yield from linear_chunks(queries[h.name], h.weight, h.bias, h.items, chunk)


def evaluate(model: Recommender, data: InteractionData | Sequences, split: str = "valid",
             ks: Iterable[int] = (10, 20, 50, 100), convention: str = "reference",
             batch_size: int = 1000, device: torch.device | str | None = None,
             precision: str = "fp32", chunk_mib: float | None = None,
             mask_history: bool = False) -> dict:
    """Full-ranking metrics of ``model`` on ``split`` ("valid" or "test") over all users.

    Returns {"recall@K", "ndcg@K", "precision@K", "mrr@K", "hr@K" for K in ks, "n_users",
    "n_users_with_truth", "convention"}. ``mask_history``: sequences only (module
    docstring; interaction data always masks train, + valid for test). ``device``: where
    batches go (default: the model's device). The forward pass in ``precision``
    (``device.autocast``), the ranking on fp32 scores, made a ``chunk_mib`` block of items
    at a time (``device.chunk_items``; ``score_chunks``) into a ``ranking.RunningTopK``.
    The model's train/eval mode is restored afterwards. NonFiniteError when a score is NaN
    or infinite.
    """
    _check_split(split)
    _check_convention(convention)
    ks = _as_ks(ks)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model_device(model) if device is None else torch.device(device)
    users = np.arange(data.n_users, dtype=np.int64)
    exclude = excluded_matrices(data, split, mask_history)
    truth = truth_matrix(data, split)
    acc = MetricAccumulator(ks)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            heads = model.item_heads() if has_linear_heads(model) else None
            position_of = None
            if heads is not None:      # positions: the heads' items in scoring order
                order = torch.cat([h.items for h in heads]).to(device)
                position_of = torch.full((data.n_items,), -1, dtype=torch.long,
                                         device=device)     # -1: another rank's item
                position_of[order] = torch.arange(len(order), device=device)
            for start in range(0, len(users), batch_size):
                rows = users[start: start + batch_size]
                batch = model_inputs(data, rows, split, device)
                seen = seen_positions([m.take_rows(rows) for m in exclude], len(rows),
                                      position_of, device)
                top = RunningTopK(len(rows), ks[-1], seen, device)
                chunk = chunk_items(len(rows), device, chunk_mib)
                bad = torch.zeros((), device=device)
                with autocast(device, precision):
                    for scores, items in score_chunks(model, batch, heads, chunk):
                        bad += count_non_finite(scores)
                        top.add(scores.float(), items)
                # over the ranks of a sharded model (each scored its own items): every
                # rank raises together, and the ranks' top-K lists merge into one
                n_bad = int(all_reduce_sum(bad))
                if n_bad:
                    raise NonFiniteError(
                        f"the model's {split} scores of users {rows[0]}..{rows[-1]} hold "
                        f"{n_bad} NaN or infinite values (NaN would rank first): the "
                        f"model's parameters are not finite (training diverged)")
                acc.add(merge_ranks(*top.result(), ks[-1]).cpu().numpy(),
                        truth.take_rows(rows))
    finally:
        model.train(was_training)
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


__all__ = ["evaluate", "evaluate_topk", "topk_excluding", "score_chunks",
           "has_linear_heads", "excluded_matrices", "truth_matrix", "model_inputs", "SPLITS"]
