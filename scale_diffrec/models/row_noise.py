"""Inference noise that depends only on (config seed, the row's own input).

DiffuRec's reverse chain (``DiffuRec.denoise``) starts from noise and draws lambda and
posterior noise at each step; its row b draws from a generator keyed by its input
sequence (``sequence_keys``: the item ids of the left-padded [max_len] window), so the same
holds there: a user's query is the same in evaluation (any eval batch size) and served.

DiffRec and L-DiffRec noise their start to step T' (``diffusion.sampling_steps``) and, with
``diffusion.sampling_noise``, add posterior noise at every reverse step. The reference
(DiffRec ``models/gaussian_diffusion.py`` ``p_sample``: ``q_sample`` and ``randn_like``)
draws that noise from torch's global RNG, so the same checkpoint scores a user differently
on every call, in every batch and on every worker. Here row b's draws come from its own
generator, seeded by ``stream_key("infer", seed, digest of row b)``: the row's item indexes
and values (its train row in evaluation, its history when served from a bundle). A user's
scores are then a function of the model and their input only -- the same twice, for any
batch size or composition, on any number of workers (a rank takes its rows' generators), on
any device (drawn on the CPU), and in ``evaluate``, ``recommend`` and the export's query
tower alike. Keyed by the input rather than the user's index because serving has histories,
not user indexes. Training draws are untouched (the global RNG, or L-DiffRec's keyed
training streams).
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..data.csr import SparseRows
from .clusters import stream_key


def row_keys(seed: int, batch: SparseRows) -> list[int]:
    """[B] 63-bit seeds, one per row of ``batch``: (seed, blake2b of the row's int64 item
    indexes and float32 values)."""
    indptr = batch.indptr.cpu().numpy()
    indices = batch.indices.cpu().numpy().astype(np.int64)
    values = batch.values.cpu().numpy().astype(np.float32)
    keys = []
    for s, e in zip(indptr[:-1], indptr[1:]):
        digest = hashlib.blake2b(indices[s:e].tobytes() + values[s:e].tobytes(),
                                 digest_size=16).hexdigest()
        keys.append(stream_key("infer", int(seed), digest))
    return keys


def sequence_keys(seed: int, inputs: torch.Tensor) -> list[int]:
    """[B] 63-bit seeds, one per row of ``inputs`` [B, L] int64 item ids (left-padded):
    (seed, blake2b of the row's ids)."""
    rows = inputs.cpu().numpy().astype(np.int64)
    return [stream_key("infer", int(seed), hashlib.blake2b(row.tobytes(),
                                                         digest_size=16).hexdigest())
            for row in rows]


def row_normal(generators: list[torch.Generator], shape: tuple[int, ...], like: torch.Tensor
               ) -> torch.Tensor:
    """[len(generators), *shape] standard normal, row b from generators[b] (on the CPU),
    typed and placed as ``like``."""
    draws = [torch.randn(shape, generator=g) for g in generators]
    out = torch.stack(draws) if draws else torch.zeros((0, *shape))
    return out.to(device=like.device, dtype=like.dtype)


class RowNoise:
    """Standard normal draws [B_own, D] for the rows ``rows`` of ``batch``, each row from its
    own generator (``row_keys``): successive calls continue each row's stream, so the
    reverse process's draws (start, then each step's posterior noise) are the row's own.
    Keys are computed at the first call (none at T' = 0 without sampling noise)."""

    def __init__(self, seed: int, batch: SparseRows, rows: slice = slice(None)):
        self.seed, self.batch, self.rows = int(seed), batch, rows
        self.generators: list[torch.Generator] | None = None

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        """Noise shaped, typed and placed as ``like`` [B_own, D] (drawn on the CPU)."""
        if self.generators is None:
            keys = row_keys(self.seed, self.batch)[self.rows]
            self.generators = [torch.Generator().manual_seed(k) for k in keys]
        if len(self.generators) != like.shape[0]:
            raise ValueError(f"noise for {len(self.generators)} rows asked for a tensor "
                             f"of {like.shape[0]} rows")
        return row_normal(self.generators, tuple(like.shape[1:]), like)
