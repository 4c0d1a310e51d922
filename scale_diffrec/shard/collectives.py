"""Autograd-aware collectives for the hybrid (catalogue-parallel VAE, data-parallel denoiser) model.

Gradient convention
-------------------
The W ranks together compute ONE scalar loss ``L = sum_r L_r``: rank r computes its share
``L_r`` and calls ``L_r.backward()``. Every function here has the adjoint collective as its
backward, so after all ranks have run backward each rank's tensors hold exactly
``dL/d(tensor)`` — the gradient that the single-process program computing ``L`` would give.
A value that a collective *replicates* on every rank (the outputs of ``gather_rows``,
``parallel_logsumexp``, ``all_reduce_sum``) must therefore enter ``L`` once in total:
for example only through the rows the rank owns, only on one rank, or scaled by ``1/W``
on every rank. (Replicated *parameters*, e.g. a data-parallel denoiser, are a different
matter: their gradients are reduced over ranks by DeepSpeed; see ``zero.py``.)

With no process group (``torch.distributed`` not initialised) or a world of size 1 every
function is the identity (plus the column permutation of ``rows_to_owners``).

Which built-in collectives work on gloo (torch 2.13, probed with W = 3, see the tests)
---------------------------------------------------------------------------------------
* ``dist.all_to_all_single`` with UNEQUAL split sizes: works (gloo alltoallv).
* ``dist.all_to_all`` (tensor lists): only equal-shaped tensors ("ProcessGroupGloo::alltoall:
  invalid tensor size"); so does ``torch.distributed.nn.functional.all_to_all``, which on gloo
  is implemented with ``scatter`` (same error).
* ``dist.all_gather`` / ``all_gather_into_tensor``: only equal sizes; the unequal autograd
  ``torch.distributed.nn.functional.all_gather`` aborts the process inside gloo
  ("Received data size doesn't match expected size").
* ``dist.reduce_scatter`` / ``reduce_scatter_tensor``: work (equal sizes).
* ``torch.distributed.nn.functional.{all_gather (equal), all_to_all_single, all_reduce}``
  work forward and backward on gloo, but in torch 2.13 each call emits a FutureWarning
  (deprecated in favour of the private ``torch.distributed._functional_collectives``), and
  its ``all_reduce`` backward is only right for SUM.
So this module wraps the plain collectives in three small ``torch.autograd.Function`` s:
an all-to-all of flat buffers with per-rank element counts (any shapes, any sizes, 0 included),
a padded all-gather whose backward is an unequal reduce-scatter (done with the all-to-all),
and an all-reduce-sum whose backward is an all-reduce-sum. They run unchanged on NCCL
(tensors on the rank's GPU).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist

__all__ = ["world", "rows_to_owners", "gather_rows", "parallel_logsumexp", "all_reduce_sum",
           "all_to_all_flat"]


def world(group=None) -> tuple[int, int]:
    """(world size, rank) of ``group`` (default: the world); (1, 0) without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


# ----------------------------------------------------------------------------------------
# autograd Functions around the plain collectives
# ----------------------------------------------------------------------------------------

class _AllToAllFlat(torch.autograd.Function):
    """1-D all-to-all: rank r sends ``x[send offsets of j]`` (send_sizes[j] elements) to j and
    receives recv_sizes[j] elements from j. Backward: the same with the sizes swapped."""

    @staticmethod
    def forward(ctx, x, send_sizes, recv_sizes, group):
        ctx.sizes = (list(send_sizes), list(recv_sizes))
        ctx.group = group
        out = x.new_empty(sum(recv_sizes))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=list(recv_sizes),
                               input_split_sizes=list(send_sizes), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_sizes, recv_sizes = ctx.sizes
        gx = grad.new_empty(sum(send_sizes))
        dist.all_to_all_single(gx, grad.contiguous(), output_split_sizes=send_sizes,
                               input_split_sizes=recv_sizes, group=ctx.group)
        return gx, None, None, None


class _GatherRows(torch.autograd.Function):
    """[B_r, *f] -> [B, *f] (all ranks' rows in rank order). Forward: pad to max B_j and
    all_gather (gloo needs equal sizes). Backward: reduce-scatter by rows with unequal sizes,
    as an all-to-all followed by a sum over the W received copies."""

    @staticmethod
    def forward(ctx, x, row_splits, rank, group):
        ctx.row_splits, ctx.rank, ctx.group = list(row_splits), rank, group
        w = len(row_splits)
        m = max(row_splits)
        padded = x.new_zeros((m,) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        bufs = [torch.empty_like(padded) for _ in range(w)]
        dist.all_gather(bufs, padded, group=group)
        return torch.cat([b[:n] for b, n in zip(bufs, row_splits)], dim=0)

    @staticmethod
    def backward(ctx, grad):
        splits, rank, group = ctx.row_splits, ctx.rank, ctx.group
        w = len(splits)
        feat = tuple(grad.shape[1:])
        f = math.prod(feat)
        recv = grad.new_empty(w * splits[rank] * f)
        dist.all_to_all_single(recv, grad.contiguous().reshape(-1),
                               output_split_sizes=[splits[rank] * f] * w,
                               input_split_sizes=[n * f for n in splits], group=group)
        gx = recv.view((w, splits[rank]) + feat).sum(0)
        return gx, None, None, None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        g = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g, None


# ----------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------

def _check_splits(row_splits: Sequence[int], w: int, what: str) -> list[int]:
    splits = [int(n) for n in row_splits]
    if len(splits) != w:
        raise ValueError(f"{what}: {len(splits)} row splits for a world of size {w}")
    if any(n < 0 for n in splits):
        raise ValueError(f"{what}: negative row split in {splits}")
    return splits


def all_to_all_flat(x: torch.Tensor, send_sizes: Sequence[int], recv_sizes: Sequence[int],
                    group=None) -> torch.Tensor:
    """Autograd-aware all-to-all of a 1-D tensor.

    x [sum(send_sizes)]: the consecutive chunks of ``send_sizes[j]`` elements go to rank j.
    Returns [sum(recv_sizes)]: the chunks received from ranks 0..W-1, in rank order.
    Identity when W == 1 (then send_sizes == recv_sizes must hold).
    """
    w, _ = world(group)
    if w == 1:
        return x
    return _AllToAllFlat.apply(x, list(send_sizes), list(recv_sizes), group)


def rows_to_owners(z_cols: torch.Tensor, row_splits: Sequence[int], col_sizes: Sequence[int],
                   col_index: Sequence[Sequence[int]] | None = None, group=None) -> torch.Tensor:
    """All-to-all from column shards (all users) to row shards (all columns).

    z_cols [B, d_r]: this rank's latent columns for ALL B users of the global batch
        (d_r = col_sizes[rank], the width of the latents of its clusters).
    row_splits [W]: B_j users owned by rank j; users are the consecutive row blocks
        0..B_0-1, B_0..B_0+B_1-1, ... (sum = B; unequal and 0 allowed).
    col_sizes [W]: d_j, each rank's latent width (d = sum).
    col_index [W][d_j] (optional): the global latent columns of rank j's local columns, in
        the order rank j holds them (from ``Plan.col_index()``). Without it rank j's columns
        are the j-th consecutive block of the global latent vector.
    Returns [B_r, d]: full latent rows, columns in global order, for this rank's B_r users.
    Backward: the reverse all-to-all (gradients return to the column owners).
    """
    w, rank = world(group)
    splits = _check_splits(row_splits, w, "rows_to_owners")
    cols = [int(c) for c in col_sizes]
    if len(cols) != w:
        raise ValueError(f"rows_to_owners: {len(cols)} column sizes for a world of size {w}")
    b = sum(splits)
    if z_cols.dim() != 2 or tuple(z_cols.shape) != (b, cols[rank]):
        raise ValueError(f"rows_to_owners: rank {rank} expected z_cols of shape "
                         f"[{b}, {cols[rank]}] (B = sum(row_splits), d_r = col_sizes[rank]), "
                         f"got {list(z_cols.shape)}")
    if w == 1:
        out = z_cols
    else:
        flat = all_to_all_flat(z_cols.reshape(-1), [n * cols[rank] for n in splits],
                               [splits[rank] * c for c in cols], group)
        pieces = torch.split(flat, [splits[rank] * c for c in cols])
        out = torch.cat([p.view(splits[rank], c) for p, c in zip(pieces, cols)], dim=1)
    if col_index is not None:
        perm = _inverse_permutation(col_index, cols, out.device)
        if perm is not None:
            out = out.index_select(1, perm)
    return out


def _inverse_permutation(col_index, cols, device) -> torch.Tensor | None:
    """Positions (in rank-major order) of global columns 0..d-1; None if already in order."""
    idx = [int(i) for block in col_index for i in block]
    if [len(block) for block in col_index] != cols:
        raise ValueError(f"rows_to_owners: col_index block lengths "
                         f"{[len(b) for b in col_index]} differ from col_sizes {cols}")
    d = len(idx)
    if sorted(idx) != list(range(d)):
        raise ValueError("rows_to_owners: col_index must be a permutation of 0..d-1")
    if idx == list(range(d)):
        return None
    inv = [0] * d
    for pos, g in enumerate(idx):
        inv[g] = pos
    return torch.tensor(inv, dtype=torch.long, device=device)


def gather_rows(x: torch.Tensor, row_splits: Sequence[int], group=None) -> torch.Tensor:
    """All-gather of row blocks with unequal sizes.

    x [B_r, *f]: this rank's rows (B_r = row_splits[rank]; B_r = 0 allowed).
    Returns [B, *f]: every rank's rows in rank order (B = sum(row_splits)), on every rank.
    Backward: each rank's gradient of its rows is the SUM over ranks of the gradients of
    the gathered copy (reduce-scatter), per the module's convention L = sum_r L_r.
    """
    w, rank = world(group)
    splits = _check_splits(row_splits, w, "gather_rows")
    if x.shape[0] != splits[rank]:
        raise ValueError(f"gather_rows: rank {rank} holds {x.shape[0]} rows, "
                         f"row_splits says {splits[rank]}")
    if w == 1:
        return x
    return _GatherRows.apply(x, splits, rank, group)


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over ranks, replicated on every rank (same shape as x); backward: all-reduce-sum."""
    w, _ = world(group)
    if w == 1:
        return x
    return _AllReduceSum.apply(x, group)


def parallel_logsumexp(local_lse: torch.Tensor, group=None) -> torch.Tensor:
    """Global logsumexp from per-rank partial logsumexps (catalogue-parallel softmax normaliser).

    local_lse [B]: for each user of the global batch, the logsumexp of this rank's item
        logits (-inf if the rank has no items).
    Returns [B]: log(sum_r exp(local_lse_r)), identical on all ranks, differentiable w.r.t.
    every rank's local_lse (d out / d local_lse_r = exp(local_lse_r - out)).
    Computed stably: m = all-reduce-MAX (no gradient needed: the result does not depend on
    m), then all-reduce-SUM of exp(local_lse - m).
    """
    w, _ = world(group)
    if w == 1:
        return local_lse
    m = local_lse.detach().clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = all_reduce_sum(torch.exp(local_lse - m), group)
    return m + torch.log(s)
