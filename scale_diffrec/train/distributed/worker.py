"""One rank's wiring of a W-worker L-DiffRec or DiffuRec run (DESIGN.md, "Hybrid
parallelism").

The model itself is sharded by construction (``models/ldiffrec.py`` / ``models/diffurec.py``
with a ``Shard``): rank r builds the catalogue parts of its clusters ``plan.clusters(r)``
(L-DiffRec's encoders and decoder rows, DiffuRec's rows of the item table) and computes its
share of the loss with collectives. What stays here is wiring:

* the model's ``denoiser`` (L-DiffRec's MLP; DiffuRec's ``SequenceDenoiser``, the
  Transformer approximator) in a DeepSpeed ZeRO engine (data-parallel over the batch
  rows), which the model runs it through (``use_engine``);
* the ``HybridOptimizer``: a rank-local torch AdamW over the rank's catalogue parameters
  (the model's first ``param_groups`` group: L-DiffRec's autoencoder at
  ``ldiffrec.lr_vae``, DiffuRec's item table) beside the engine's optimizer, and the
  backward that gives both exact gradients (``zero.hybrid_backward``);
* checkpoint shards: the rank's clusters' parameters and AdamW state under cluster names
  (``checkpoint.split_catalogue``), the common part (denoiser, sampler, progress), and the
  whole one-process state assembled on rank 0.

Training and evaluation are the one-process code: ``train.train_epoch`` / ``train_step``
and ``evaluate.evaluate`` (whose ranking merges the ranks' top-K lists).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from ...checkpoint import (FORMAT, load_optimizer_state, merge_catalogue, optimizer_state,
                          split_catalogue)
from ...data import InteractionData, Sequences
from ...models import Progress, build_model
from ..loop import make_batch, split_metrics, train_epoch, train_step
from ...shard.plan import Plan
from ...shard.context import Shard
from .zero import (full_optimizer_state, gathered_state_dict, hybrid_backward,
                   init_denoiser_engine, load_denoiser_state)


class HybridOptimizer:
    """The optimizer of a rank: DeepSpeed's engine for the data-parallel denoiser and a
    torch optimizer for the rank's own catalogue parameters; ``backward`` makes the exact
    gradients of the global loss in both (``zero.hybrid_backward``)."""

    def __init__(self, engine, local: torch.optim.Optimizer, local_params: list):
        self.engine, self.local, self.local_params = engine, local, local_params

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.local.zero_grad(set_to_none=set_to_none)

    def backward(self, loss: torch.Tensor) -> None:
        hybrid_backward(self.engine, loss, self.local_params)

    def step(self) -> None:
        self.engine.step()
        self.local.step()

    @property
    def param_groups(self) -> list[dict]:
        """Both optimizers' groups (``loop.epoch_lr`` sets their lr)."""
        return [*self.engine.optimizer.param_groups, *self.local.param_groups]


class ShardedRun:
    """One rank's part of a W-worker L-DiffRec or DiffuRec run (torch.distributed already
    initialized)."""

    def __init__(self, cfg: dict, data: InteractionData | Sequences, partition, plan: Plan,
                 device: torch.device):
        self.cfg, self.data, self.plan = cfg, data, plan
        self.device = torch.device(device)
        shard = Shard.of_process_group(plan)
        self.world, self.rank, self.clusters = shard.world, shard.rank, shard.clusters
        self.progress = Progress()
        # this rank's clusters' parts, each from its keyed stream, and the denoiser from
        # the global seed: the values one process starts from
        self.model = model = build_model(cfg, data.n_items, partition,
                                         train=getattr(data, "train", None),
                                         shard=shard).to(self.device)
        # precision bf16 on a GPU: DeepSpeed's torch_autocast mode (fp32 master weights,
        # bf16 matmuls, bf16 gradient communication of its Linear layers), the same
        # autocast as the rest of the step; on the CPU autocast alone
        dcfg = cfg["distributed"]
        bf16 = cfg["precision"] == "bf16" and self.device.type == "cuda"
        self.engine = init_denoiser_engine(
            model.denoiser, {"lr": cfg["lr"], "weight_decay": cfg["weight_decay"]},
            zero_stage=int(dcfg["zero_stage"]),
            ds_overrides={"torch_autocast": {"enabled": bf16, "dtype": "bfloat16"},
                          **dcfg["deepspeed"]},
            micro_batch_size=max(1, cfg["batch_size"] // self.world))
        model.use_engine(self.engine)
        autoencoder = model.param_groups(cfg["lr"], cfg["weight_decay"])[0]
        self.local_optimizer = torch.optim.AdamW([autoencoder])
        self.optimizer = HybridOptimizer(self.engine, self.local_optimizer,
                                         autoencoder["params"])

    # ------------------------------------------------------------------ the one-process code
    def loss_and_backward(self, units: np.ndarray) -> float:
        """One step on ``units`` (users, or sequences' training samples: a slice of
        ``loop.epoch_units``; ``train.train_step``); the global loss."""
        return train_step(self.model, self.optimizer, make_batch(self.data, units, self.device),
                          self.progress, self.cfg["precision"])

    def train_epoch(self, epoch: int) -> float:
        """Every user once, in the one-process order; the mean batch loss (all ranks)."""
        return train_epoch(self.model, self.optimizer, self.data, self.cfg, epoch,
                           self.progress, self.device)

    def evaluate(self, split: str) -> dict:
        """Full-ranking metrics of ``split`` over all users (the same dict on all ranks)."""
        return split_metrics(self.model, self.data, split, self.cfg)

    # ------------------------------------------------------------------ state
    def _catalogue(self, named: dict) -> dict:
        return split_catalogue(named, self.model, self.clusters, rows=self.model.decoder_rows)

    def catalogue_state(self) -> dict:
        """This rank's part of the checkpoint content (``checkpoint``): its clusters'
        parameters and AdamW state, under cluster names."""
        params = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return {"model": self._catalogue(params),
                "optimizer": self._catalogue(optimizer_state(
                    self.local_optimizer, self._local_named()))}

    def _local_named(self) -> list:
        own = {id(p) for p in self.optimizer.local_params}
        return [(n, p) for n, p in self.model.named_parameters() if id(p) in own]

    def common_state(self) -> dict:
        """The rest of the content, the same on every rank: the denoiser (its ZeRO-partitioned
        AdamW state consolidated per parameter), the sampler, the progress. Collective."""
        model = {f"denoiser.{k}": v.cpu() for k, v in gathered_state_dict(self.engine).items()}
        model.update({f"sampler.{k}": v.detach().cpu().clone()
                      for k, v in self.model.sampler.state_dict().items()})
        optimizer = {f"denoiser.{k}": {key: v.cpu() for key, v in state.items()}
                     for k, state in full_optimizer_state(self.engine).items()}
        return {"format": FORMAT, "model": model, "optimizer": optimizer,
                "epoch": self.progress.epoch, "step": self.progress.step,
                "torch_rng": torch.get_rng_state()}

    def load_state(self, source) -> dict:
        """Continue from a checkpoint ``source`` (``checkpoint.latest`` / ``at_epoch``)
        written by any number of workers: this rank reads its clusters' parts and the common
        content, which it returns. Collective."""
        common = source.common()
        part = source.catalogue(self.model, self.clusters)
        own = {key: merge_catalogue(part[key], self.model, self.model.decoder_rows,
                                    self.model.catalogue_rows())
               for key in ("model", "optimizer")}
        missing = {n for n, _ in self._local_named()} - set(own["model"])
        if missing:
            raise ValueError(f"{source.path}: the checkpoint lacks {sorted(missing)[:3]}")
        self.model.load_state_dict(own["model"], strict=False)
        load_optimizer_state(self.local_optimizer, self._local_named(), own["optimizer"])
        load_denoiser_state(self.engine, _under("denoiser", common["model"]),
                            _under("denoiser", common["optimizer"]))
        self.model.sampler.load_state_dict(_under("sampler", common["model"]))
        self.progress = Progress(epoch=common["epoch"], step=common["step"])
        return common

    def full_model_state(self) -> dict | None:
        """On rank 0 the single-process model's state_dict assembled from all ranks (for
        ``scale-diffrec evaluate``/``export``); None on the other ranks. Collective."""
        local = self.catalogue_state()["model"]
        parts = [None] * self.world if self.rank == 0 else None
        if self.world > 1:
            dist.gather_object(local, parts, dst=0)
        else:
            parts = [local]
        denoiser = gathered_state_dict(self.engine)
        if self.rank != 0:
            return None
        state = {f"sampler.{k}": v.cpu() for k, v in self.model.sampler.state_dict().items()}
        state.update(merge_catalogue({k: v for part in parts for k, v in part.items()},
                                     self.model))
        state.update({f"denoiser.{k}": v.cpu() for k, v in denoiser.items()})
        return state


def _under(prefix: str, named: dict) -> dict:
    """The entries ``prefix.*`` of ``named``, without the prefix."""
    return {k[len(prefix) + 1:]: v for k, v in named.items() if k.startswith(prefix + ".")}
