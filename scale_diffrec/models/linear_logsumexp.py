"""The catalogue softmax's normaliser without its [B, I] logits: a fused linear-logsumexp.

L-DiffRec's reconstruction (``models/ldiffrec.py``; AE ``compute_loss`` in the authors'
code) is a multinomial log-likelihood under a softmax over the WHOLE catalogue, written as

    nll_b = -sum_i x_bi logit_bi + (sum_i x_bi) * logsumexp_i logit_bi,
    logsumexp_i logit_bi = logsumexp_h ( logsumexp_{i in h} logit_bi )

over heads h (a cluster's decoder, or one worker's rows of the global decoder), so each
head contributes (picked, total, lse) from its own items and the three combine exactly
(``combine_multinomial``; across workers ``shard.collectives.parallel_logsumexp``). A head's
lse is computed ``chunk`` items at a time by ``LinearLogSumExp`` (the chunk's logits are
recomputed in backward): memory B x chunk rather than B x n_h.
"""
from __future__ import annotations

import torch

from ..ranking import with_bias


def chunked_logsumexp(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      chunk: int) -> torch.Tensor:
    """[B] lse_b = logsumexp_i (hidden @ weight.T + bias)_bi for hidden [B, h],
    weight [n, h], bias [n], ``chunk`` items at a time, never holding more than [B, chunk]
    logits (``LinearLogSumExp``)."""
    return LinearLogSumExp.apply(hidden, weight, bias, int(chunk))


class LinearLogSumExp(torch.autograd.Function):
    """lse = logsumexp(hidden @ weight.T + bias, dim=1), in item chunks of [B, chunk].

    The bias is folded into the product: l_k = [hidden, 1] @ [W_k, b_k].T (a copy of the
    chunk's [chunk, h + 1] weights, not of [B, chunk] biases). Forward: per chunk
    lse_k = max + log sum exp(l_k - max) (in place), lse = logaddexp over chunks. Backward,
    with g = dL/dlse [B]: the chunk's logits are recomputed and turned in place into
    P_k = exp(l_k - lse) * g (softmax times g; a single chunk keeps its softmax from the
    forward instead); dL/dhidden = sum_k P_k W_k and
    [dL/dW_k, dL/db_k] = P_k.T @ [hidden, 1]. Memory: [B, chunk], never [B, n]; no
    autograd-saved logits and no recomputed logsumexp (the profile's hottest path).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, chunk):
        # the matmuls in the ambient autocast dtype (bf16 under precision bf16), the
        # exp / sum / log on fp32 logits
        mm, acc = _matmul_dtype(hidden), torch.promote_types(hidden.dtype, torch.float32)
        hidden1 = torch.cat([hidden, hidden.new_ones(hidden.shape[0], 1)], dim=1).to(mm)
        lse = None
        for s in range(0, weight.shape[0], chunk):
            logits = (hidden1 @ with_bias(weight, bias, s, chunk).to(mm).T).to(acc)
            top = logits.amax(dim=1, keepdim=True)
            part = logits.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))
            lse = part if lse is None else torch.logaddexp(lse, part)
        # one chunk: keep its softmax (exp(l - max) / sum, within the B x chunk budget)
        # instead of recomputing the logits in backward
        single = weight.shape[0] <= chunk
        probs = logits.div_(logits.sum(dim=1, keepdim=True)) if single else None
        ctx.save_for_backward(hidden1, weight, bias, lse, probs)
        ctx.chunk, ctx.out_dtype = chunk, hidden.dtype
        return lse

    @staticmethod
    def backward(ctx, grad):
        hidden1, weight, bias, lse, probs = ctx.saved_tensors
        mm, acc, h = hidden1.dtype, lse.dtype, weight.shape[1]
        grad = grad.to(acc)
        grad_h = torch.zeros(hidden1.shape[0], h, device=grad.device, dtype=acc)
        # the weight's gradient only when asked (a frozen decoder: ``hidden``'s alone)
        want_wb = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        grad_wb = (torch.empty(weight.shape[0], h + 1, device=grad.device, dtype=acc)
                   if want_wb else None)
        for s in range(0, weight.shape[0], ctx.chunk):
            wb = with_bias(weight, bias, s, ctx.chunk).to(mm)
            if probs is not None:
                p = probs * grad[:, None]
            else:
                p = (hidden1 @ wb.T).to(acc)
                p.sub_(lse[:, None]).exp_().mul_(grad[:, None])        # [B, chunk]
            if mm == acc:
                grad_h.addmm_(p, wb[:, :h])
                if want_wb:
                    torch.mm(p.T, hidden1, out=grad_wb[s:s + ctx.chunk])
            else:                          # bf16 products, fp32 accumulation
                p = p.to(mm)
                grad_h += (p @ wb[:, :h]).to(acc)
                if want_wb:
                    grad_wb[s:s + ctx.chunk] = (p.T @ hidden1).to(acc)
        if not want_wb:
            return grad_h.to(ctx.out_dtype), None, None, None
        return (grad_h.to(ctx.out_dtype), grad_wb[:, :h].to(weight.dtype),
                grad_wb[:, h].to(bias.dtype), None)


def _matmul_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype autocast gives matmuls on ``t``'s device now (``t.dtype`` outside it)."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else t.dtype


def combine_logsumexp(parts: list[torch.Tensor]) -> torch.Tensor:
    """logsumexp over the catalogue from per-cluster logsumexps [B] each -> [B]."""
    return torch.logsumexp(torch.stack(parts, dim=1), dim=1)


def combine_multinomial(picked: torch.Tensor, total: torch.Tensor,
                        lse: torch.Tensor) -> torch.Tensor:
    """[B] multinomial NLL -sum_i x_i logit_i + (sum_i x_i) logsumexp(logits).

    ``picked`` = sum_i x_i logit_i, ``total`` = sum_i x_i, summed over all clusters;
    ``lse`` = the catalogue logsumexp (``combine_logsumexp``).
    """
    return total * lse - picked


def softmax_parts(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  rows: torch.Tensor, cols: torch.Tensor, target: torch.Tensor, chunk: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(picked [B], total [B], lse [B]) of one head whose logits are
    hidden [B, h] @ weight [n, h].T + bias [n]: picked_b = sum of target * logit over the
    entries (rows [m], cols [m] < n, row-major and unique; target [m]), total_b = sum of
    targets, lse_b = the logsumexp over the head's n items (``chunked_logsumexp``, ``chunk``
    items at a time). picked is a sparse product with the targets (O(m h)), never the
    [B, n] logits; in fp32 under autocast (CUDA has no bf16 sparse matmul)."""
    b, n = hidden.shape[0], weight.shape[0]
    acc = torch.promote_types(hidden.dtype, torch.float32)     # fp32 under bf16 autocast
    x = torch.sparse_coo_tensor(torch.stack([rows, cols]), target.to(acc), (b, n),
                                device=hidden.device, is_coalesced=True,   # row-major
                                check_invariants=False)
    # sum_i x_bi logit_bi = sum_j (X W)_bj hidden_bj + (X b)_b: sparse products, whose
    # backward is X.T @ grad (no scatter into the [n, h] weight row by row)
    with torch.autocast(hidden.device.type, enabled=False):
        picked = (torch.sparse.mm(x, weight.to(acc)) * hidden.to(acc)).sum(1) \
            + torch.sparse.mm(x, bias.to(acc)[:, None]).squeeze(1)
    total = torch.zeros(b, dtype=acc, device=hidden.device).index_add(0, rows, target.to(acc))
    return picked, total, chunked_logsumexp(hidden, weight, bias, chunk)


def catalogue_nll(heads: list, shard, chunk: int) -> torch.Tensor:
    """[B] multinomial NLL -sum_i x_bi log_softmax(logits_b)_i over the WHOLE catalogue,
    from this process's ``heads`` [(hidden, weight, bias, rows, cols, target)]
    (``softmax_parts``) and the other ranks' (``shard``: ``shard.context.Shard``, whose
    ``sum`` / ``logsumexp`` are identities in one process); the same on every rank. The
    catalogue softmax of L-DiffRec's decoder and of DiffuRec's item table."""
    picked = total = 0
    lses = []
    for hidden, weight, bias, rows, cols, target in heads:
        p, t, lse = softmax_parts(hidden, weight, bias, rows, cols, target, chunk)
        picked, total = picked + p, total + t
        lses.append(lse)
    lse = shard.logsumexp(combine_logsumexp(lses))
    return combine_multinomial(shard.sum(picked), shard.sum(total), lse)


__all__ = ["LinearLogSumExp", "chunked_logsumexp", "combine_logsumexp", "combine_multinomial",
           "softmax_parts", "catalogue_nll"]
