"""One rank's share of a W-worker L-DiffRec run (DESIGN.md, "Hybrid parallelism").

Rank r holds the clusters ``plan.clusters(r)``: their encoders E_c and their decoder part
(per-cluster decoders D_c, or the cluster's rows [n_c, d] of the global linear decoder),
rank-local under a torch AdamW (the autoencoder group: ``ldiffrec.lr_vae``); a replica of
the denoiser in a DeepSpeed ZeRO engine (data-parallel over the batch rows); a replica of
the step sampler, kept identical by all-gathering (t, loss) every step.

One step over a global batch of B users (the same users on every rank; B_r = rank r's rows
``plan.row_splits(B)``, consecutive, starting at o_r):

    z_r   = concat_{c of r} reparam(E_c(dropout(x[:, items of c])))    [B, d_r]
    z     = rows_to_owners(z_r)                                         [B_r, d]  all-to-all
    t, eps, keep = the (seed, step) draws of ALL B rows, rows o_r .. o_r + B_r
    diff, zhat0_r = training_losses(denoiser, z, t, eps, keep)          [B_r], [B_r, d]
    zhat0 = gather_rows(zhat0_r)                                        [B, d]    all-gather
    per cluster c of r: logits_c = D_c(zhat0) [B, n_c] -> picked_c, total_c, lse_c [B]
    lse   = parallel_logsumexp(logsumexp_c lse_c)                       [B]       all-reduce
    L_r   = (a sum_{b of r} diff_b + v [sum_{b of r} total_b lse_b - sum_b picked_rb]
             - v beta / 2 sum_b sum_{c of r} kl_cb) / B

with (a, v) = (lamda, 1) under ``reweight`` (else (1, lamda)). sum_r L_r is exactly the
single-process LDiffRec loss of the batch (each replicated term enters once: lse through
the rank's own rows); ``zero.hybrid_backward`` turns it into exact gradients for every
parameter. All randomness is keyed by (seed, step[, cluster]) as in LDiffRec, so a W-worker
run equals the one-process run up to float summation order.

Evaluation: every rank scores its own items for all users of a batch, masks seen items,
keeps its top K, and the W candidate lists are all-gathered and merged.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import FORMAT, load_optimizer_state, merge_catalogue, optimizer_state
from ..data.dataset import InteractionData
from ..device import autocast, chunk_items
from ..evaluate import excluded_matrices, truth_matrix
from ..errors import NonFiniteError
from ..finite import check_finite
from ..metrics import MetricAccumulator
from ..models import Progress
from ..models.ldiffrec import LDiffRec, beta_at, combine_logsumexp, lamda_at
from ..progress import StepProgress
from ..ranking import RunningTopK, keep_best, linear_chunks, seen_positions
from ..train import batches, epoch_order
from .collectives import all_reduce_sum, gather_rows, parallel_logsumexp, rows_to_owners, world
from .plan import Plan
from .zero import (full_optimizer_state, gathered_state_dict, hybrid_backward,
                   init_denoiser_engine, load_denoiser_state)


class ShardedRun:
    """One rank's part of a W-worker L-DiffRec run (torch.distributed already initialized)."""

    eval_chunk: int | None = None     # items scored at a time in evaluation; None: chunk_mib

    def __init__(self, cfg: dict, data: InteractionData, partition, plan: Plan,
                 device: torch.device):
        self.cfg, self.data, self.plan = cfg, data, plan
        self.device = torch.device(device)
        self.world, self.rank = world()
        if plan.n_workers != self.world:
            raise ValueError(f"the plan places clusters on {plan.n_workers} workers but the "
                             f"process group has {self.world}")
        self.clusters = plan.clusters(self.rank)
        self.progress = Progress()
        # The model without encoders/decoders (lookup tables, denoiser, diffusion, sampler;
        # the denoiser from the global seed, as in one process), then this rank's clusters'
        # parts, each from its keyed stream: the same initial values as one process.
        model = LDiffRec.from_config(cfg, data.n_items, partition, build_parts=False,
                                     train=data.train)
        self.model = model
        # named as in LDiffRec's state_dict: encoders.{c}.*, decoders.{c}.* (the global
        # decoder's rows of cluster c: decoder.{c}.weight / .bias)
        decoder = "decoder" if model.global_decoder else "decoders"
        self.local = nn.ModuleDict({"encoders": nn.ModuleDict(), decoder: nn.ModuleDict()})
        for c in self.clusters:
            factors = model.warm_factors(c)
            self.local["encoders"][str(c)] = model.new_encoder(c, factors)
            self.local[decoder][str(c)] = model.new_decoder(c, factors)
        model.to(self.device)
        self.local.to(self.device)
        lcfg = cfg["ldiffrec"]
        self.local_optimizer = torch.optim.AdamW(
            self.local.parameters(),
            lr=cfg["lr"] if lcfg["lr_vae"] is None else float(lcfg["lr_vae"]),
            weight_decay=(cfg["weight_decay"] if lcfg["weight_decay_vae"] is None
                          else float(lcfg["weight_decay_vae"])))
        dcfg = cfg["distributed"]
        # precision bf16 on a GPU: DeepSpeed's torch_autocast mode (fp32 master weights,
        # bf16 matmuls, bf16 gradient communication of its Linear layers), the same
        # autocast as the rest of the step; on the CPU autocast alone
        bf16 = cfg["precision"] == "bf16" and self.device.type == "cuda"
        self.engine = init_denoiser_engine(
            model.denoiser, {"lr": cfg["lr"], "weight_decay": cfg["weight_decay"]},
            zero_stage=int(dcfg["zero_stage"]),
            ds_overrides={"torch_autocast": {"enabled": bf16, "dtype": "bfloat16"},
                          **dcfg["deepspeed"]},
            micro_batch_size=max(1, cfg["batch_size"] // self.world))
        self.own_items = torch.cat([model.items_of(c) for c in self.clusters])
        self.local_pos = torch.full((data.n_items,), -1, dtype=torch.long, device=self.device)
        self.local_pos[self.own_items] = torch.arange(len(self.own_items), device=self.device)

    # ------------------------------------------------------------------ pieces
    def _rows(self, batch_size: int) -> tuple[list[int], slice]:
        splits = self.plan.row_splits(batch_size)
        start = sum(splits[:self.rank])
        return splits, slice(start, start + splits[self.rank])

    def _head(self, c: int, zhat0: torch.Tensor):
        """(hidden [B, h], weight [n_c, h], bias [n_c]): cluster c's logits are
        hidden @ weight.T + bias (LDiffRec.cluster_hidden / cluster_weight, from the parts
        this rank holds)."""
        if self.model.global_decoder:
            rows = self.local["decoder"][str(c)]
            return zhat0, rows.weight, rows.bias
        z_c = zhat0 if self.model.n_clusters == 1 else zhat0[:, self.model.latent_slice(c)]
        decoder = self.local["decoders"][str(c)]
        return decoder[:-1](z_c), decoder[-1].weight, decoder[-1].bias

    def _exchange(self, z_r: torch.Tensor, splits: list[int]) -> torch.Tensor:
        return rows_to_owners(z_r, splits, self.plan.col_sizes(), self.plan.col_index())

    # ------------------------------------------------------------------ training
    def loss_and_backward(self, users: np.ndarray) -> float:
        """This rank's share of one step: forward, then exact gradients in every parameter
        (denoiser: reduced by the engine at ``engine.step``). Returns the global loss."""
        with autocast(self.device, self.cfg["precision"]):
            loss = self._loss(users)
        self.local_optimizer.zero_grad(set_to_none=True)
        hybrid_backward(self.engine, loss, self.local.parameters())
        return all_reduce_sum(loss.detach()).item()

    def _loss(self, users: np.ndarray) -> torch.Tensor:
        """This rank's share L_r of the batch loss (the module docstring's formula)."""
        m, step = self.model, self.progress.step
        batch = self.data.train.take_rows(users).to_torch(self.device)
        b = batch.batch_size
        splits, own = self._rows(b)
        inputs, zs, kl = {}, [], torch.zeros(b, device=self.device)
        for c in self.clusters:
            g = m.cluster_generator(step, c, self.device)
            inputs[c] = inp = m.cluster_input(c, batch, g)
            mu, logvar = self.local["encoders"][str(c)](inp)
            zs.append(m.reparameterize(mu, logvar, g))
            kl = kl + m.kl_sum(mu, logvar)
        z = self._exchange(torch.cat(zs, 1), splits)

        t, weights, noise, keep = m.diffusion_draws(b, step, self.device)
        keep = None if keep is None else keep[own]
        terms = m.diffusion.training_losses(lambda x_t, ts: self.engine(x_t, ts, keep), z,
                                            t[own], weights[own], noise[own])
        m.sampler.update_with_local_losses(t[own], terms["raw"].detach())
        zhat0 = gather_rows(terms["pred_xstart"], splits)

        picked = total = torch.zeros(b, device=self.device)
        lses = []
        for c in self.clusters:
            p, n, lse = m.multinomial_parts(*self._head(c, zhat0), inputs[c])
            picked, total = picked + p, total + n
            lses.append(lse)
        lse = parallel_logsumexp(combine_logsumexp(lses))
        total = all_reduce_sum(total.detach())

        lamda, beta = lamda_at(m.lcfg, self.progress.epoch), beta_at(m.lcfg, step)
        a, v = (lamda, 1.0) if m.reweight else (1.0, lamda)
        return (a * terms["loss"].sum()
                + v * ((total[own] * lse[own]).sum() - picked.sum() - 0.5 * beta * kl.sum())) / b

    def optimizer_step(self) -> None:
        self.engine.step()
        self.local_optimizer.step()
        self.progress.step += 1

    def train_epoch(self, epoch: int) -> float:
        """Every user once, in the single-process order; the mean batch loss (all ranks)."""
        self.model.train(), self.local.train(), self.engine.train()
        order = batches(epoch_order(self.data.n_users, self.cfg["seed"], epoch),
                        self.cfg["batch_size"])
        meter = StepProgress(epoch + 1, len(order)) if self.rank == 0 else None
        total = 0.0
        for i, users in enumerate(order, 1):
            loss = self.loss_and_backward(users)
            check_finite(loss, f"training loss at epoch {epoch + 1}, step {i}")  # every rank
            self.optimizer_step()
            total += loss
            if meter is not None:
                meter.step(i, total / i)
        return total / max(len(order), 1)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def topk(self, users: np.ndarray, exclude: list, k: int) -> np.ndarray:
        """[B, k] global item indexes: the merged top-k of every rank's own items, with the
        items of the ``exclude`` CSRs (rows = users) masked. Scores are made
        ``eval_chunk`` items at a time (None: as many as fit ``chunk_mib``,
        ``device.chunk_items``) and folded into a running top-k (``ranking.py``, the
        single-process evaluator's code), so memory is B x chunk, not B x (the rank's
        items)."""
        with autocast(self.device, self.cfg["precision"]):
            return self._topk(users, exclude, k)

    def _topk(self, users: np.ndarray, exclude: list, k: int) -> np.ndarray:
        m = self.model
        batch = self.data.train.take_rows(users).to_torch(self.device)
        b = batch.batch_size
        splits, _ = self._rows(b)
        mus = [self.local["encoders"][str(c)](m.cluster_input(c, batch))[0] for c in self.clusters]
        z = self._exchange(torch.cat(mus, 1), splits)
        zhat0 = gather_rows(m.diffusion.p_sample(self.engine, z, m.sampling_steps,
                                                 m.sampling_noise), splits)
        top = RunningTopK(b, k, seen_positions(exclude, b, self.local_pos, self.device),
                          self.device)
        chunk = self.eval_chunk or chunk_items(b, self.device, self.cfg["chunk_mib"])
        bad = torch.zeros((), device=self.device)      # non-finite scores (NaN ranks first)
        for c in self.clusters:            # own_items is the clusters' items in this order
            hidden, weight, bias = self._head(c, zhat0)
            for scores, items in linear_chunks(hidden, weight, bias, m.items_of(c), chunk):
                scores = scores.float()
                bad += (~torch.isfinite(scores)).sum()
                top.add(scores, items)
        n_bad = int(all_reduce_sum(bad))   # over the ranks: every rank raises together
        if n_bad:
            raise NonFiniteError(f"evaluation scores of users {users[0]}..{users[-1]} hold "
                                 f"{n_bad} NaN or infinite values: the model's parameters "
                                 f"are not finite (training diverged)")
        items, values = top.result()
        if self.world > 1:
            tops, its = [torch.empty_like(values) for _ in range(self.world)], \
                [torch.empty_like(items) for _ in range(self.world)]
            dist.all_gather(tops, values.contiguous())
            dist.all_gather(its, items.contiguous())
            _, items = keep_best(torch.cat(tops, 1), torch.cat(its, 1), k)
        return items.cpu().numpy()

    def evaluate(self, split: str) -> dict:
        """Full-ranking metrics of ``split`` over all users (the same dict on all ranks)."""
        self.model.eval(), self.local.eval(), self.engine.eval()
        ks = sorted(int(k) for k in self.cfg["topk"])
        exclude, truth = excluded_matrices(self.data, split), truth_matrix(self.data, split)
        acc = MetricAccumulator(ks)
        users = np.arange(self.data.n_users)
        for start in range(0, len(users), self.cfg["eval_batch_size"]):
            rows = users[start:start + self.cfg["eval_batch_size"]]
            items = self.topk(rows, [e.take_rows(rows) for e in exclude], ks[-1])
            acc.add(items, truth.take_rows(rows))
        return acc.result(self.cfg["convention"])

    # ------------------------------------------------------------------ state
    def catalogue_state(self) -> dict:
        """This rank's part of the checkpoint content (``checkpoint``): its clusters'
        parameters and AdamW state, under cluster names."""
        return {"model": {k: v.detach().cpu().clone() for k, v in self.local.state_dict().items()},
                "optimizer": optimizer_state(self.local_optimizer,
                                             list(self.local.named_parameters()))}

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
        self.local.load_state_dict(part["model"])
        load_optimizer_state(self.local_optimizer, list(self.local.named_parameters()),
                             part["optimizer"])
        load_denoiser_state(self.engine, _under("denoiser", common["model"]),
                            _under("denoiser", common["optimizer"]))
        self.model.sampler.load_state_dict(_under("sampler", common["model"]))
        self.progress = Progress(epoch=common["epoch"], step=common["step"])
        return common

    def full_model_state(self) -> dict | None:
        """On rank 0 the single-process LDiffRec state_dict assembled from all ranks (for
        ``scale-diffrec evaluate``/``export``); None on the other ranks. Collective."""
        local = {k: v.detach().cpu() for k, v in self.local.state_dict().items()}
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
