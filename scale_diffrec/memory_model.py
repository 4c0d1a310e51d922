"""Bytes per worker of a W-worker L-DiffRec run: the memory model (README, "Memory model");
DiffuRec's terms in ``diffurec_worker_terms``.

Worker r holds the clusters ``plan.clusters(r)`` (I_r items, P_r parameters); every
worker holds the data and the item lookup tables. fp32 throughout; AdamW keeps two
moments, so a trained parameter costs 16 bytes (weight, gradient, m, v).

    M_r = runtime                      the interpreter with torch, pyarrow, DeepSpeed and
                                       its engine, thread pools: a constant, calibrated as
                                       the peak RSS of a worker on a tiny catalogue minus its
                                       other terms (~0.5 GiB per CPU worker here)
        + data       20 N + 24 U       CSRs of train/valid/test (8-byte index + 4-byte value
                                       per interaction, 8-byte row pointers) and the train
                                       timestamps; N interactions, U users
        + tables     32 I + 8 I_r      item -> cluster / local column / per-cluster item
                                       lists: the partition (24 I; the model's buffers share
                                       its arrays), the worker's position table (8 I), its
                                       own item list (8 I_r)
        + sharded    16 P_r            its clusters' encoders E_c (EmbeddingBag [n_c, w1_c]
                                       + layers) and decoders (D_c, or rows [n_c, d + 1] of
                                       the global linear decoder)
        + denoiser   P_den x z(stage)  ZeRO 0: 16; 1: 8 + 8/W; 2: 4 + 12/W; 3: 16/W (weights
                                       and grads replicated or not, fp32 partition and Adam
                                       moments split over W)
        + step       train: 4 [max_c n_c (h_c + 1) + 2 B chunk + 2 nnz_B h + 4 B d]
                                       (LinearLogSumExp's [n_c, h + 1] gradient and
                                       [B, chunk] buffers, the batch's sparse targets and
                                       their products, the latents)
                     eval:  8 B_eval min(n_c, chunk)   (a chunk of scores, the running
                                       top-K; chunk = ``device.chunk_items``)
        + finish     16 P_r            the end of a run: the best epoch's shard read back
                     + 4 P + 8 (P - P_r) next to the live one; on rank 0 also the assembled
                                       single-process state (P = every cluster's
                                       parameters) and the other ranks' parts, pickled and
                                       unpickled

Only ``sharded`` and the 8 I_r of ``tables`` shrink as 1/W; data, the O(I)
tables, the runtime and the ZeRO-replicated part of the denoiser do not, which is the gap
between measured per-worker memory and 1/W. ``predict`` evaluates the model for a
balanced catalogue of any size (how 10M and 100M items scale); ``worker_terms`` for a real
plan (what ``benchmarks/scaling.py`` checks against the measured peak).
"""
from __future__ import annotations

import numpy as np
import torch

from .device import chunk_items
from .models.clusters import (CatalogueLinear, ClusterEncoder, decoder_dims,
                               latent_dims, mlp)
from .models.ldiffrec import latent_denoiser

ZERO_BYTES = {0: lambda w: 16.0, 1: lambda w: 8 + 8 / w, 2: lambda w: 4 + 12 / w,
              3: lambda w: 16 / w}


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def cluster_parameters(cfg: dict, sizes) -> list[int]:
    """[C] parameters that live with each cluster: its encoder, plus its decoder (per-cluster
    decoders) or its rows of the global linear decoder (out_dims == []); the model's own
    part classes (``models.clusters``) built on the meta device, nothing allocated."""
    lcfg = cfg["ldiffrec"]
    sizes = [int(s) for s in sizes]
    dims = latent_dims(sizes, lcfg["in_dims"])
    latent = sum(d[-1] for d in dims)
    counts = []
    with torch.device("meta"):
        for n_c, d in zip(sizes, dims):
            decoder = (CatalogueLinear(torch.empty(n_c, dtype=torch.long), latent)
                       if not lcfg["out_dims"] else
                       mlp(decoder_dims(d, n_c, lcfg["out_dims"], len(sizes)), lcfg["act"]))
            counts.append(_count(ClusterEncoder(n_c, d, lcfg["act"])) + _count(decoder))
    return counts


def denoiser_parameters(cfg: dict) -> int:
    """Parameters of the latent denoiser that ``LDiffRec.from_config`` builds (on the meta
    device: nothing is allocated)."""
    with torch.device("meta"):
        return _count(latent_denoiser(cfg))


def _head_width(cfg: dict, dims: list[int], latent: int) -> int:
    """h_c: the input width of cluster c's scoring layer."""
    if not cfg["ldiffrec"]["out_dims"]:
        return latent
    return dims[0]


def worker_terms(cfg: dict, sizes, clusters, n_items: int, n_users: int,
                 interactions: int, batch_nnz: float, workers: int,
                 runtime_bytes: float = 0.0, denoiser_params: int | None = None,
                 phase: str = "train", rank0: bool = False) -> dict[str, float]:
    """The model's terms (bytes) for the worker holding ``clusters`` of a partition with
    cluster ``sizes``; ``batch_nnz``: interactions in one training batch (B x mean per
    user); ``phase``: "train" (training steps), "eval" (adds the evaluation scores) or
    "run" (a whole training run: evaluation and the finish; ``rank0`` assembles the
    model)."""
    sizes = [int(s) for s in sizes]
    dims = latent_dims(sizes, cfg["ldiffrec"]["in_dims"])
    latent = sum(d[-1] for d in dims)
    params = cluster_parameters(cfg, sizes)
    own = [int(c) for c in clusters]
    items_r = sum(sizes[c] for c in own)
    p_r = sum(params[c] for c in own)
    p_den = denoiser_parameters(cfg) if denoiser_params is None else int(denoiser_params)
    b = int(cfg["batch_size"])
    chunk = cfg["ldiffrec"]["logit_chunk"] or chunk_items(b, "cpu", cfg.get("chunk_mib"))
    h = max(_head_width(cfg, dims[c], latent) for c in own)
    step = 4 * (max(sizes[c] * (_head_width(cfg, dims[c], latent) + 1) for c in own)
                + 2 * b * min(chunk, max(sizes[c] for c in own)) + 2 * batch_nnz * h
                + 4 * b * latent)
    if phase in ("eval", "run"):
        b_eval = int(cfg["eval_batch_size"])
        step = max(step, 8 * b_eval * min(chunk_items(b_eval, "cpu", cfg.get("chunk_mib")),
                                          max(sizes[c] for c in own)))
    terms = {"runtime": float(runtime_bytes),
             "data": 20.0 * interactions + 24.0 * n_users,
             "tables": 32.0 * n_items + 8.0 * items_r,
             "sharded": 16.0 * p_r,
             "denoiser": p_den * ZERO_BYTES[int(cfg["distributed"]["zero_stage"])](workers),
             "step": float(step)}
    if phase == "run":
        p_all = sum(params)
        terms["finish"] = 16.0 * p_r + ((4.0 * p_all + 8.0 * (p_all - p_r)) if rank0 else 0.0)
    terms["total"] = sum(terms.values())
    return terms


def predict(cfg: dict, n_items: int, n_users: int, interactions: int, workers: int,
            runtime_bytes: float, phase: str = "train") -> dict[str, float]:
    """``worker_terms`` of the most loaded worker for a catalogue of ``n_items`` split into
    ``ldiffrec.n_clusters`` equal clusters, placed round-robin on ``workers``."""
    c = int(cfg["ldiffrec"]["n_clusters"])
    sizes = np.full(c, n_items // c)
    sizes[: n_items % c] += 1
    per_user = interactions / max(n_users, 1)
    return max((worker_terms(cfg, sizes.tolist(), range(r, c, workers), n_items, n_users,
                             interactions, cfg["batch_size"] * per_user, workers,
                             runtime_bytes, phase=phase) for r in range(workers)),
               key=lambda terms: terms["total"])


# ---------------------------------------------------------------------------- DiffuRec
def diffurec_denoiser_parameters(cfg: dict) -> int:
    """Parameters of DiffuRec's data-parallel ``SequenceDenoiser`` (the LayerNorm and the
    Transformer approximator; built on the meta device, nothing allocated)."""
    from .models.diffurec import SequenceDenoiser
    from .schema import DiffuRecConfig
    with torch.device("meta"):
        return _count(SequenceDenoiser(DiffuRecConfig(**cfg["diffurec"]), 0))


def diffurec_one_row(cfg: dict) -> tuple:
    """(DiffuRec's ``SequenceDenoiser`` of ``cfg`` on the CPU, the arguments of one call
    for one [1, max_len] row: embedded inputs, mask, x_t, timestep, lambda)."""
    from .models.diffurec import SequenceDenoiser
    from .schema import DiffuRecConfig
    dcfg = DiffuRecConfig(**cfg["diffurec"])
    length, d = dcfg.max_len, dcfg.hidden
    return SequenceDenoiser(dcfg, 0), (torch.randn(1, length, d), torch.ones(1, length),
                                       torch.randn(1, d), torch.ones(1),
                                       torch.randn(1, length, d))


def diffurec_activation_bytes(cfg: dict) -> int:
    """Bytes autograd holds per training row of the ``SequenceDenoiser`` (a [1, max_len]
    sequence: every tensor one train-mode forward saves, dropout masks included, counted
    once per storage; parameters excluded), measured with ``saved_tensors_hooks`` on the
    CPU."""
    net, args = diffurec_one_row(cfg)
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(*args)
    return sum(seen.values())


def diffurec_worker_terms(cfg: dict, sizes, clusters, n_items: int, n_users: int,
                          sequence_items: int, train_samples: int, workers: int,
                          runtime_bytes: float = 0.0) -> dict[str, float]:
    """DiffuRec's bytes for the worker holding the item-table rows of ``clusters`` (blocks
    of ``Partition.blocks``, sizes ``sizes``), in the same terms as ``worker_terms``
    (fp32, AdamW; README "Memory model"; the model in ``models/diffurec.py``):

        data      4 N + 8 U + 24 S     ``Sequences`` (int32 items, int64 offsets; N items
                                       over all sequences, U users) and an epoch's order
                                       of its S training samples (positions, permutation,
                                       permuted positions: int64)
        tables    32 I + 8 I_r         the partition (24 I), the model's row-of-item table
                                       (8 I) and its own item list (8 I_r)
        sharded   16 I_r d             E's rows of the worker: weight, gradient, AdamW m, v
        denoiser  P_den x z(stage, W)  the ``SequenceDenoiser`` under ZeRO (``ZERO_BYTES``)
        step      train: a B_r + 4 (4 B (L + 1) d + 2 B chunk) + 8 I_r d
                                       autograd's saved tensors of the worker's B_r = B / W
                                       rows (a: ``diffurec_activation_bytes``), the
                                       embedded batch of every rank ([B, L + 1, d]: rows,
                                       the masked copy, the all-reduced sum, its
                                       gradient), the logsumexp's [B, chunk] buffers, and
                                       the softmax's gradients of E's rows, which the
                                       backward makes first, while the Transformer's saved
                                       tensors are still held (``LinearLogSumExp``'s
                                       [I_r, d + 1] buffer, the sparse target product's
                                       dense [I_r, d]; measured in one process at 400k
                                       items: 8.7 bytes per row parameter beyond the
                                       gradient); AdamW's step after it needs 8 I_r d
                                       (its denominator's two temporaries), no more

    Training steps only (evaluation's scores are a chunk of B_eval x chunk, far below).
    """
    dcfg = cfg["diffurec"]
    sizes = [int(s) for s in sizes]
    items_r = sum(sizes[int(c)] for c in clusters)
    d, length, b = int(dcfg["hidden"]), int(dcfg["max_len"]), int(cfg["batch_size"])
    p_r = items_r * d
    chunk = dcfg["logit_chunk"] or chunk_items(b, "cpu", cfg.get("chunk_mib"))
    step = (diffurec_activation_bytes(cfg) * -(-b // workers)
            + 4 * (4 * b * (length + 1) * d + 2 * b * min(chunk, items_r)) + 8 * p_r)
    terms = {"runtime": float(runtime_bytes),
             "data": 4.0 * sequence_items + 8.0 * n_users + 24.0 * train_samples,
             "tables": 32.0 * n_items + 8.0 * items_r,
             "sharded": 16.0 * p_r,
             "denoiser": diffurec_denoiser_parameters(cfg)
             * ZERO_BYTES[int(cfg["distributed"]["zero_stage"])](workers),
             "step": float(step)}
    terms["total"] = sum(terms.values())
    return terms
