"""The W-worker application of the sharded model: Ray Train and DeepSpeed wiring.

* ``trainer``: the Ray Train driver (``train_distributed``) and the per-worker function,
  which runs the one training loop (``train/loop.py``) on the worker's ``ShardedRun``;
* ``worker``: ``ShardedRun``, one rank's wiring: the DeepSpeed engine, the hybrid
  optimizer, the checkpoint shards;
* ``zero``: the data-parallel denoiser in a DeepSpeed ZeRO engine (imports deepspeed lazily);
* ``local``: run a function in W local gloo processes (tests, benchmarks).
"""
