"""What every recommender in scale_diffrec offers the trainer, the evaluator and export.

Input is always a batch of CSR rows (``SparseRows`` [B, I], values = interaction weights).

Retrieval identity (DESIGN.md, "Retrieval"): each model's output layer is linear, so its
scores split into *heads*. Head h covers the items ``items_h`` [I_h] with a weight
[I_h, d_h] and a bias [I_h]; for a batch the model gives a query [B, d_h] per head, and

    score(batch)[:, items_h] == query(batch)[h] @ weight_h.T + bias_h

exactly (same float ops up to summation order). One head for DiffRec's last layer,
Mult-VAE's decoder, or L-DiffRec's global linear decoder; one head per cluster for
L-DiffRec with per-cluster decoders.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..data.csr import SparseRows


@dataclass
class Progress:
    """Where training stands, for annealing: ``epoch`` (0-based) and ``step`` (batches done)."""
    epoch: int = 0
    step: int = 0


@dataclass
class ItemHead:
    """Items ``items`` [I_h] (global item indexes) scored as query @ weight.T + bias."""
    name: str
    items: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor


class Recommender(nn.Module):
    """Interface; subclasses implement the four methods."""

    def training_loss(self, batch: SparseRows, progress: Progress) -> dict[str, torch.Tensor]:
        """{'loss': scalar to minimise, other scalar terms for logging}."""
        raise NotImplementedError

    @torch.no_grad()
    def score(self, batch: SparseRows) -> torch.Tensor:
        """[B, I] ranking scores over the whole catalogue (eval mode, deterministic)."""
        raise NotImplementedError

    @torch.no_grad()
    def query(self, batch: SparseRows) -> dict[str, torch.Tensor]:
        """{head name: [B, d_h]} query vectors (eval mode)."""
        raise NotImplementedError

    def item_heads(self) -> list[ItemHead]:
        raise NotImplementedError
