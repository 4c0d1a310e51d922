"""The primitives the sharded model math needs, below the models (DESIGN.md, "Hybrid
parallelism"):

* ``collectives``: autograd-aware all-to-all (column shards -> row shards), unequal
  all-gather of rows, catalogue-parallel logsumexp, all-reduce-sum; identities without a
  process group;
* ``plan``: placement of item clusters on workers (LPT), latent column ranges, row splits;
* ``context``: ``Shard``, the plan and this process's rank, which a sharded model holds.
"""
from .context import Shard
from .plan import Plan, plan_placement, split_rows

__all__ = ["Shard", "Plan", "plan_placement", "split_rows"]
