"""Full-ranking top-K over large catalogues: score chunks folded into a running top-K.

The evaluator (``evaluate.evaluate``; in one process, or on each rank of a W-worker run,
which then merges the ranks' lists with ``merge_ranks``; the retriever's brute force
through ``evaluate.topk_excluding``) ranks a batch of B users over its items the same way:

1. the items are scored ``chunk`` at a time, in a fixed order of *positions* 0 .. n - 1
   (``linear_chunks`` for a linear head: ``torch.addmm(bias, query, weight.T)``, the
   product ``F.linear`` makes, written into one [B, chunk] buffer reused by every block;
   a model without linear heads gives blocks of its own);
2. the excluded (seen) entries of the chunk are set to -inf by one scatter at their
   (row, position) pairs, sorted by position once per batch (no dense [B, I] mask);
3. ``RunningTopK.add`` ranks the chunk only for the entries that can enter the running
   lists (those above a row's k-th best so far): ``torch.topk`` for a guessed m, checked
   on its [B, m] result and doubled when short, then the gaining entries are merged (top
   k of [B, k + m]).

Why (CPU, one thread, CPU seconds per score of a [1000, chunk] block, 2026-11, on a
shared 2-core machine): ``torch.topk`` with k = 100 on a 2,097-item chunk (the 8 MiB
default ``chunk_mib`` at B = 1000) costs 10.5 ns (k * 64 > n: a full nth_element per
row), with k = 10 2.3 ns; after the first chunks m is a few to a few dozen. Counting the
entries above the k-th best over the whole chunk (``(scores > kth).sum(1)``) costs
1.1-4.4 ns, more than the small top-m itself, so m is guessed and verified instead; a
``nonzero`` threshold filter was slower still. A new [B, chunk] tensor per block costs
page faults once it is above the allocator's mmap threshold (16,384 items: addmm 3.7 ns
into a new tensor, 1.9 ns into the reused buffer). Scores of -inf (excluded items, or a
model's own -inf) are never ranked: slots that only such items could fill are padding,
item -1 and score -inf. Among exactly tied scores the choice is arbitrary, as with
``torch.topk``.

The bound of one pass (benchmarks/ranking.py, benchmarks/catalogue.py): the scoring
matmul, 2 B n (d + 1) FLOP per batch, plus ``torch.topk`` over the [B, n] scores.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .data.csr import CSR

MIN_TAKE = 8         # the smallest top-m a chunk is ranked for (RunningTopK.add)


def seen_positions(exclude: CSR | Sequence[CSR] | None, n_rows: int,
                   position_of: torch.Tensor | None = None,
                   device: torch.device | str | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [n], positions [n]) int64 of the excluded entries, sorted by position.

    ``exclude``: CSR(s) of ``n_rows`` rows over item indexes. ``position_of`` [I] int64
    maps an item index to its scoring position (-1: not scored here, dropped); None means
    position = item index. Raises ValueError when a CSR has another number of rows.
    """
    csrs = [] if exclude is None else [exclude] if isinstance(exclude, CSR) else list(exclude)
    rows, cols = [], []
    for csr in csrs:
        if csr.n_rows != n_rows:
            raise ValueError(f"exclude matrix has {csr.n_rows} rows, scores {n_rows}")
        rows.append(csr.row_ids())
        cols.append(csr.indices.astype(np.int64, copy=False))
    r = torch.from_numpy(np.concatenate(rows) if rows else np.zeros(0, np.int64)).to(device)
    p = torch.from_numpy(np.concatenate(cols) if cols else np.zeros(0, np.int64)).to(device)
    if position_of is not None:
        p = position_of.to(p.device)[p]
        r, p = r[p >= 0], p[p >= 0]
    order = torch.argsort(p, stable=True)
    return r[order], p[order]


def with_bias(weight: torch.Tensor, bias: torch.Tensor, start: int, chunk: int
              ) -> torch.Tensor:
    """[n, d + 1] rows start .. start + chunk of [weight, bias] (weight [I_h, d], bias
    [I_h]): with a query [q, 1] one product gives q @ weight.T + bias."""
    return torch.cat([weight[start:start + chunk], bias[start:start + chunk, None]], dim=1)


def linear_chunks(query: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  items: torch.Tensor, chunk: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(scores [B, n] = query @ weight[s:s+n].T + bias[s:s+n], items[s:s+n]) for
    s = 0, chunk, 2 chunk, ...: a linear head (query [B, d], weight [I_h, d], bias [I_h],
    items [I_h]) scored one block of at most ``chunk`` items at a time.

    Every block is written into one [B, chunk] buffer by ``torch.addmm`` (the product
    ``F.linear`` makes): a block is overwritten by the next, so use it before asking for
    the next. Under autocast (which has no ``out=`` products) each block is a new tensor
    of the autocast dtype.
    """
    n_items, b = weight.shape[0], query.shape[0]
    if torch.is_autocast_enabled(query.device.type):
        for s in range(0, n_items, chunk):
            yield torch.addmm(bias[s:s + chunk], query, weight[s:s + chunk].T), items[s:s + chunk]
        return
    buffer = query.new_empty(b * min(chunk, n_items))
    for s in range(0, n_items, chunk):
        n = min(chunk, n_items - s)
        out = buffer[:b * n].view(b, n)
        yield torch.addmm(bias[s:s + n], query, weight[s:s + n].T, out=out), items[s:s + n]


def keep_best(values: torch.Tensor, items: torch.Tensor, k: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best columns of each row of (values [B, m], items [B, m]), best first
    (m >= k)."""
    best, idx = torch.topk(values, k, dim=1)
    return best, torch.gather(items, 1, idx)


def merge_ranks(items: torch.Tensor, values: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k] items: the best k of every rank's top-k lists (items [B, k], values [B, k],
    -1 / -inf padding) of the same B users, on every rank; the lists themselves in one
    process (no process group)."""
    size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if size == 1:
        return items
    tops = [torch.empty_like(values) for _ in range(size)]
    its = [torch.empty_like(items) for _ in range(size)]
    dist.all_gather(tops, values.contiguous())
    dist.all_gather(its, items.contiguous())
    best, merged = keep_best(torch.cat(tops, 1), torch.cat(its, 1), k)
    return torch.where(best > -torch.inf, merged, -1)


class RunningTopK:
    """The running top-k of B rows over score chunks given in position order.

    ``seen``: (rows, positions) from ``seen_positions``; ``add`` sets those entries of each
    chunk to -inf (in place) before ranking. ``result()`` -> (items [B, k] int64,
    values [B, k]), best first, -1 / -inf padding.
    """

    def __init__(self, n_rows: int, k: int, seen: tuple[torch.Tensor, torch.Tensor],
                 device: torch.device | str | None = None):
        self.k = int(k)
        self.values = torch.full((n_rows, self.k), -torch.inf, device=device)
        self.items = torch.full((n_rows, self.k), -1, dtype=torch.long, device=device)
        self.seen_rows, self.seen_pos = seen
        self.start = 0                     # position of the next chunk's first column
        self.take = self.k                 # the first guess of the entries a chunk gives

    def add(self, scores: torch.Tensor, items: torch.Tensor) -> None:
        """Fold in a chunk: ``scores`` [B, n] (modified: seen entries -> -inf) of the
        items ``items`` [n] at positions start .. start + n - 1.

        Only scores above a row's current k-th best can enter its list, so the chunk is
        ranked for its top m, m the guess from the last chunk (twice the most entries any
        row took, at least ``MIN_TAKE``), doubled until every row's m-th score is at or
        below its k-th best (or m = k): ``torch.topk`` for a small m costs a fraction of
        k = 100 on a chunk of a few thousand items. Nothing is merged when no row gains."""
        n = scores.shape[1]
        a, b = torch.searchsorted(self.seen_pos, torch.tensor(
            [self.start, self.start + n], device=self.seen_pos.device)).tolist()
        scores[self.seen_rows[a:b], self.seen_pos[a:b] - self.start] = -torch.inf
        self.start += n
        kth, full = self.values[:, -1:], min(self.k, n)
        m = min(self.take, full)
        while True:
            values, cols = torch.topk(scores, m, dim=1)
            if m == full or not bool((values[:, -1:] > kth).any()):
                break
            m = min(2 * m, full)
        gained = (values > kth).sum(1)
        most = int(gained.max()) if gained.numel() else 0
        self.take = max(2 * most, MIN_TAKE)
        if most == 0:
            return
        self.values, self.items = keep_best(torch.cat([self.values, values[:, :most]], 1),
                                            torch.cat([self.items, items[cols[:, :most]]], 1),
                                            self.k)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        ranked = self.values > -torch.inf
        return torch.where(ranked, self.items, -1), self.values


__all__ = ["RunningTopK", "keep_best", "linear_chunks", "seen_positions",
           "with_bias"]
