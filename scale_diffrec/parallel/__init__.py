"""Building blocks of the hybrid parallel model (DESIGN.md, "Hybrid parallelism").

* ``collectives``: autograd-aware all-to-all (column shards -> row shards), unequal
  all-gather of rows, catalogue-parallel logsumexp, all-reduce-sum.
* ``plan``: placement of item clusters on workers (LPT), latent column ranges, row splits.
* ``zero``: the data-parallel denoiser in a DeepSpeed ZeRO engine (imports deepspeed lazily).
* ``testing``: run a function in W local gloo processes.
"""
from .collectives import all_reduce_sum, gather_rows, parallel_logsumexp, rows_to_owners, world
from .plan import Plan, plan_placement, split_rows

__all__ = ["all_reduce_sum", "gather_rows", "parallel_logsumexp", "rows_to_owners", "world",
           "Plan", "plan_placement", "split_rows"]
