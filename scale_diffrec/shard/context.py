"""Which share of a W-worker model this process computes, and the collectives it needs.

A ``Shard`` is the placement ``plan`` (clusters -> workers, ``plan.py``) and this process's
``rank``. A sharded model (``models/ldiffrec.py``) holds the parts of the clusters its
rank owns and writes its loss once with the methods below; in one process
(``Shard.single``: one worker holding every cluster, no process group) every collective
is the identity, so the one-process model and a rank of a W-worker run execute the same
code (DESIGN.md, "Hybrid parallelism"; the gradient convention is ``collectives.py``'s).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .collectives import all_reduce_sum, gather_rows, parallel_logsumexp, rows_to_owners, world
from .plan import Plan, plan_placement


@dataclass(frozen=True)
class Shard:
    plan: Plan
    rank: int = 0

    @classmethod
    def single(cls, cluster_sizes: Sequence[int], latent_dims: Sequence[int]) -> "Shard":
        """One process holding every cluster."""
        return cls(plan_placement(cluster_sizes, 1, latent_dims=latent_dims), 0)

    @classmethod
    def of_process_group(cls, plan: Plan) -> "Shard":
        """This process's share of ``plan``; ValueError unless the process group (if any)
        has the plan's number of workers."""
        size, rank = world()
        if plan.n_workers != size:
            raise ValueError(f"the plan places clusters on {plan.n_workers} workers but the "
                             f"process group has {size}")
        return cls(plan, rank)

    @property
    def world(self) -> int:
        return self.plan.n_workers

    @property
    def clusters(self) -> list[int]:
        """The clusters this rank owns, ascending."""
        return self.plan.clusters(self.rank)

    def rows(self, batch_size: int) -> tuple[list[int], slice]:
        """(users of a global batch per rank, this rank's consecutive block of them): the
        data-parallel denoiser's rows."""
        splits = self.plan.row_splits(batch_size)
        start = sum(splits[:self.rank])
        return splits, slice(start, start + splits[self.rank])

    def to_owners(self, z_r: torch.Tensor, splits: list[int]) -> torch.Tensor:
        """[B, d_r] this rank's latent columns of all users -> [B_r, d] full latent rows of
        its users (all-to-all, ``rows_to_owners``)."""
        return rows_to_owners(z_r, splits, self.plan.col_sizes(), self.plan.col_index())

    @staticmethod
    def gather(x: torch.Tensor, splits: list[int]) -> torch.Tensor:
        """[B_r, ...] -> [B, ...] every rank's rows (all-gather, ``gather_rows``)."""
        return gather_rows(x, splits)

    @staticmethod
    def sum(x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, replicated (all-reduce, ``all_reduce_sum``)."""
        return all_reduce_sum(x)

    @staticmethod
    def logsumexp(local_lse: torch.Tensor) -> torch.Tensor:
        """[B] catalogue logsumexp from each rank's logsumexp over its items."""
        return parallel_logsumexp(local_lse)


__all__ = ["Shard"]
