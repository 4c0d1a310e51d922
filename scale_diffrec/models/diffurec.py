"""DiffuRec: sequential recommendation by diffusing the target item's embedding (Li, Sun &
Li, ACM TOIS 2023, arXiv 2304.00686; official code github.com/WHUIR/DiffuRec:
src/model.py ``Att_Diffuse_model``, src/diffurec.py ``DiffuRec``, src/trainer.py).

Model, as released (../shared/DIFFUREC.md). E [n_items, d] is the item table, tied input
and output. A batch is inputs [B, L] (left-padded with the pad id n_items) and targets [B]:

    seq   = LayerNorm(dropout_emb(E[inputs]))           [B, L, d]  (no position embedding:
                                                                    the released code
                                                                    comments it out)
    e0    = E[targets]                                  [B, d]
    t     ~ sampler (uniform / lossaware / fixstep), x_t = q_sample(e0, t, eps)
    x0hat = approximator(seq, mask, x_t, t * 1000 / T, lam)   (``models/approximator.py``)
    loss  = mean_b CE(x0hat_b . E^T, target_b)          over the WHOLE catalogue

(trainer.py ``loss_diffu_ce``: plain cross-entropy; the sampler's importance weights are
not applied, as released. ``lossaware`` is updated with the per-row CE here; the released
code never updates it, so its runs sample t uniformly, the ``uniform`` default below.)
Padding: E has no pad row. The pad id looks up a zero vector that nothing trains (the
released table has a trained row 0 that also competes in its softmax and its ranking);
the pad is never a softmax entry and never ranked. Initialisation: E ~ N(0, 1) as
``nn.Embedding``'s default, drawn per cluster from a (seed, cluster) stream so that a rank
builds its rows exactly as one process does; the approximator from ``torch.manual_seed(seed)``.

Inference (``denoise``; ``query`` for the evaluator and export): x_K ~ N(0, I), then K
reverse steps k = K-1 .. 0 of the process on the kept steps ``space_timesteps(T,
reverse_steps)`` (every step when None, as released): x0hat = approximator(..,
model_timesteps(k)); x_{k-1} = posterior_mean(x0hat, x_k) +
exp(logvar_k / 2) z with the fixed-large variance log(append(posterior_var[1], beta[1:]))
(DiffuRec ``p_mean_variance``), no noise at k = 0, where the result is x0hat itself.
Scores = x0hat . E^T.

Sharded by construction (as ``models/ldiffrec.py``; DESIGN.md "Hybrid parallelism"). The
items are split into clusters (``partition.Partition``) placed on W ranks by ``shard``; rank
r holds E's rows of its items ascending (``item_embeddings``, a bias-free
``CatalogueLinear``: the parameter is ``item_embeddings.weight`` sharded or not). For a
global batch of B rows, the same on every rank, rank r with its consecutive block B_r:

    emb    = shard.sum(E_r[ids] where owned, else 0)    [B, L + 1, d]  all-reduce
    x0hat  = shard.gather(denoiser(own rows))           [B, d]         all-gather
    nll    = catalogue_nll(x0hat, E_r, targets owned)   [B]            parallel logsumexp
    L_r    = sum_{b in B_r} nll_b / B

sum_r L_r is the one-process loss and each replicated value enters it once (through the
rank's own rows), so the collectives' backward gives exact gradients
(``shard/collectives.py``); ``denoiser`` (``SequenceDenoiser``: the LayerNorm and the
approximator) is data-parallel (its gradients are summed over ranks by DeepSpeed, the
engine set by ``use_engine``, or the caller). t, eps and lambda are drawn for all B rows from one
(seed, step) stream, so every rank takes its rows of the one-process draws; the dropouts
use the process's RNG (equal only with dropout 0).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.csr import CSR
from ..data.sequences import SequenceBatch
from ..device import chunk_items
from ..partition import Partition
from ..ranking import RunningTopK, linear_chunks, merge_ranks, seen_positions
from ..schedules import named_betas
from ..schema import Config, DiffuRecConfig
from ..shard.context import Shard
from .approximator import LN_EPS, Approximator
from .base import ItemHead, Progress, Recommender
from .clusters import CatalogueLinear, stream_key, unallocated
from .diffusion import GaussianDiffusion
from .linear_logsumexp import catalogue_nll
from .respace import model_timesteps, respaced_betas, space_timesteps
from .row_noise import row_normal, sequence_keys
from .samplers import named_sampler


class SequenceDenoiser(nn.Module):
    """The data-parallel part (a DeepSpeed engine's module in a W-worker run): the
    sequence encoding LayerNorm(dropout_emb(.)) (model.py ``forward``) and the
    approximator. forward(emb [n, L, d] item embeddings of the inputs, mask [n, L], x_t
    [n, d], t [n] model timesteps, lam [n, L, d]) -> x0hat [n, d]."""

    def __init__(self, cfg: DiffuRecConfig, seed: int):
        super().__init__()
        self.emb_dropout = cfg.emb_dropout
        self.norm = nn.LayerNorm(cfg.hidden, eps=LN_EPS)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.approximator = Approximator(cfg.hidden, cfg.blocks, cfg.heads, cfg.dropout,
                                             cfg.lambda_uncertainty)

    def forward(self, emb, mask, x_t, t, lam) -> torch.Tensor:
        seq = self.norm(F.dropout(emb, self.emb_dropout, self.training))
        return self.approximator(seq, mask, x_t, t, lam)


class DiffuRec(Recommender):
    def __init__(self, n_items: int, cfg: DiffuRecConfig, partition: Partition | None = None,
                 shard: Shard | None = None, seed: int = 0, chunk_mib: float | None = None):
        """``cfg``: the ``diffurec`` config section (``schema.DiffuRecConfig``);
        ``partition``: the item clusters (None: one cluster); ``shard``: the clusters
        this process owns (None: all, one process); ``seed`` keys every draw;
        ``chunk_mib``: the logsumexp's chunk budget (``device.chunk_items``). Errors:
        ValueError when the partition does not cover ``n_items``."""
        super().__init__()
        partition = partition or Partition(np.zeros(n_items, np.int64), 1)
        if partition.n_items != n_items:
            raise ValueError(f"the partition covers {partition.n_items} items but the model "
                             f"has {n_items}")
        self.cfg, self.n_items, self.seed = cfg, int(n_items), int(seed)
        self.chunk_mib = chunk_mib
        self.shard = shard or Shard.single(partition.sizes.tolist(), None)
        own = np.sort(np.concatenate([partition.items_of(c) for c in self.shard.clusters]))
        # row of each id (pad = n_items included) in the owned table, -1 when not owned
        row_of = torch.full((n_items + 1,), -1, dtype=torch.long)
        row_of[torch.from_numpy(own)] = torch.arange(len(own))
        self.register_buffer("row_of", row_of, persistent=False)

        self.item_embeddings = unallocated(CatalogueLinear, torch.from_numpy(own), cfg.hidden,
                                           False)
        self.item_embeddings.items = torch.from_numpy(own)
        with torch.no_grad():
            for c in self.shard.clusters:
                g = torch.Generator().manual_seed(stream_key("diffurec", self.seed, "items", c))
                rows = self.row_of[torch.from_numpy(partition.items_of(c))]
                self.item_embeddings.weight[rows] = torch.randn(len(rows), cfg.hidden,
                                                                generator=g)
        self.partition, self.n_clusters = partition, partition.n_clusters
        self.denoiser = SequenceDenoiser(cfg, self.seed)
        object.__setattr__(self, "_engine", None)
        self.sampler = named_sampler(cfg.sampler.value, cfg.steps)
        betas = named_betas(cfg.schedule.value, cfg.steps)
        self.diffusion = GaussianDiffusion.from_betas(betas)
        self.kept = (list(range(cfg.steps)) if cfg.reverse_steps is None
                     else space_timesteps(cfg.steps, cfg.reverse_steps))
        reverse = respaced_betas(betas, self.kept)
        self.reverse = GaussianDiffusion.from_betas(reverse)
        # DiffuRec p_mean_variance: the fixed-large log variance (index 0 is never used)
        self.reverse_log_var = torch.from_numpy(np.log(np.append(
            self.reverse.posterior_variance.numpy()[1:2], reverse[1:])))

    @classmethod
    def from_config(cls, cfg: Config, n_items: int, partition: Partition | None = None,
                    shard: Shard | None = None) -> "DiffuRec":
        """The run config's DiffuRec: the ``diffurec`` section, ``seed``, ``chunk_mib``."""
        return cls(n_items, cfg.diffurec, partition, shard, seed=cfg.seed,
                   chunk_mib=cfg.chunk_mib)

    # ------------------------------------------------------------------ the parts
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] (items, or the pad id n_items) -> [..., d] rows of E, zero for the pad;
        sharded: each rank's owned rows, summed over ranks (all-reduce, autograd-aware)."""
        rows = self.row_of[ids]
        own = (rows >= 0)[..., None]
        local = self.item_embeddings.weight[rows.clamp(min=0)]
        return self.shard.sum(torch.where(own, local, torch.zeros_like(local)))

    def dense(self, emb, mask, x_t, t, lam) -> torch.Tensor:
        """``denoiser``(...) (``SequenceDenoiser``), through the DeepSpeed engine when one
        is set (``use_engine``)."""
        return (self._engine or self.denoiser)(emb, mask, x_t, t, lam)

    def use_engine(self, engine) -> None:
        """Run the denoiser through ``engine`` (a DeepSpeed engine around ``self.denoiser``,
        data-parallel over the ranks); not a submodule, so names stay ``denoiser.*``."""
        object.__setattr__(self, "_engine", engine)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Two AdamW groups at ``lr`` / ``weight_decay``: the catalogue (E's owned rows;
        first: a W-worker run's rank-local optimizer) and the denoiser."""
        return [{"name": "catalogue", "params": [self.item_embeddings.weight], "lr": lr,
                 "weight_decay": weight_decay},
                {"name": "denoiser", "params": list(self.denoiser.parameters()), "lr": lr,
                 "weight_decay": weight_decay}]

    def items_of(self, c: int) -> torch.Tensor:
        """[n_c] cluster c's items (ascending): their rows in the one-process table."""
        return torch.from_numpy(self.partition.items_of(c))

    def catalogue_rows(self) -> int:
        """Rows of this process's part of E (``checkpoint.merge_catalogue``)."""
        return len(self.item_embeddings.items)

    def parameter_counts(self) -> dict[str, int]:
        """{item_embeddings, denoiser, total} of the whole model (sharded: collective)."""
        table = self.shard.sum(torch.tensor(self.item_embeddings.weight.numel()))
        denoiser = sum(getattr(p, "ds_numel", p.numel()) for p in self.denoiser.parameters())
        return {"item_embeddings": int(table), "denoiser": denoiser,
                "total": int(table) + denoiser}

    def decoder_rows(self, c: int) -> torch.Tensor:
        """[n_c] the rows of cluster c's items in this rank's table (the name L-DiffRec's
        global decoder gives them: ``checkpoint.split_catalogue``)."""
        return self.row_of[self.items_of(c)].cpu()

    def model_t(self, k: torch.Tensor, kept: list[int]) -> torch.Tensor:
        """[B] float timestep the approximator sees at step k [B] of the process on
        ``kept`` (``respace.model_timesteps``: times 1000 / T when ``rescale_timesteps``)."""
        return model_timesteps(k, kept, self.cfg.steps, self.cfg.rescale_timesteps)

    def draws(self, batch: int, length: int, step: int, device):
        """(t [B], eps [B, d], lambda [B, L, d]) of training ``step`` for a global batch,
        from the (seed, step) stream on the CPU (the same on every rank and device)."""
        g = torch.Generator().manual_seed(stream_key("diffurec", self.seed, "step", step))
        t, _ = self.sampler.sample(batch, "cpu", generator=g)
        eps = torch.randn(batch, self.cfg.hidden, generator=g)
        lam = self.denoiser.approximator.draw_lambda((batch, length, self.cfg.hidden), g)
        return t.to(device), eps.to(device), lam.to(device)

    def chunk(self, rows: int, device) -> int:
        """Items per chunk of the training logsumexp (``logit_chunk`` or ``chunk_mib``)."""
        return self.cfg.logit_chunk or chunk_items(rows, device, self.chunk_mib)

    # ------------------------------------------------------------------ training
    def training_loss(self, batch: SequenceBatch, progress: Progress
                      ) -> dict[str, torch.Tensor]:
        """The training loop's entry (``train/loop.py``): ``sequence_loss`` of the batch's
        samples, the draws keyed by ``progress.step``."""
        return self.sequence_loss(batch.inputs, batch.targets, progress.step)

    def sequence_loss(self, inputs: torch.Tensor, targets: torch.Tensor, step: int
                      ) -> dict[str, torch.Tensor]:
        """inputs [B, L] (pad = n_items), targets [B] item indexes of a global batch ->
        {"loss": this rank's share L_r (the whole mean CE in one process), "ce": the batch
        mean CE over all ranks (detached)}. Updates the step sampler with each own row's CE
        (lossaware: all-gathered, ``samplers``)."""
        b, length = inputs.shape
        splits, own = self.shard.rows(b)
        t, eps, lam = self.draws(b, length, step, inputs.device)
        emb = self.embed(torch.cat([inputs, targets[:, None]], dim=1))       # [B, L + 1, d]
        x_t = self.diffusion.q_sample(emb[own, -1], t[own], eps[own])
        mask = (inputs[own] != self.n_items).float()
        x0hat_r = self.dense(emb[own, :-1], mask, x_t,
                             self.model_t(t[own], list(range(self.cfg.steps))), lam[own])
        x0hat = self.shard.gather(x0hat_r, splits)
        nll = self.catalogue_ce(x0hat, targets)
        self.sampler.update_with_local_losses(t[own], nll[own].detach())
        share = nll[own].sum()
        return {"loss": share / b, "ce": self.shard.sum(share.detach()) / b}

    def catalogue_ce(self, x0hat: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """[B] -log softmax(x0hat . E^T)_target over the whole catalogue (replicated on every
        rank): one head per rank, E_r with no bias, target 1 at its row when owned
        (``linear_logsumexp.catalogue_nll``)."""
        weight = self.item_embeddings.weight
        rows = self.row_of[targets]
        owned = torch.nonzero(rows >= 0).squeeze(1)
        head = (x0hat, weight, weight.new_zeros(weight.shape[0]), owned, rows[owned],
                torch.ones(len(owned), dtype=x0hat.dtype, device=x0hat.device))
        return catalogue_nll([head], self.shard, self.chunk(x0hat.shape[0], x0hat.device))

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def denoise(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs [B, L] -> x0hat [B, d] by the reverse chain from noise (module docstring),
        in eval mode. Row b's noise and lambda come from its own generator, keyed by the
        config seed and its input (``row_noise.sequence_keys``): its x0hat does not depend
        on the batch it is in, the number of ranks (a rank draws for its own rows; sharded:
        collective) or the device, so evaluation and serving agree."""
        was = self.training
        self.eval()
        try:
            b, length = inputs.shape
            splits, own = self.shard.rows(b)
            emb = self.embed(inputs)[own]
            mask = (inputs[own] != self.n_items).float()
            n, d, dev = emb.shape[0], self.cfg.hidden, inputs.device
            generators = [torch.Generator().manual_seed(k)
                          for k in sequence_keys(self.seed, inputs[own])]
            x = row_normal(generators, (d,), emb)
            for k in reversed(range(len(self.kept))):
                t = torch.full((n,), k, dtype=torch.long, device=dev)
                lam = self.denoiser.approximator.lambda_from(
                    row_normal(generators, (length, d), emb))
                x0hat = self.dense(emb, mask, x, self.model_t(t, self.kept), lam)
                if k == 0:
                    break
                x = self.reverse.posterior_mean(x0hat, x, t) + torch.exp(
                    0.5 * self.reverse_log_var[k]).float() * row_normal(generators, (d,), emb)
            return self.shard.gather(x0hat, splits)
        finally:
            self.train(was)

    @torch.no_grad()
    def query(self, batch: SequenceBatch) -> dict[str, torch.Tensor]:
        """{"items": x0hat [B, d]} of the batch's inputs (``denoise``): the query of the one
        linear head ``item_heads``."""
        return {"items": self.denoise(batch.inputs)}

    def item_heads(self) -> list[ItemHead]:
        """One head: the owned rows of E (no bias); score = x0hat . E^T (the pad is not a
        row, so it is never ranked)."""
        table = self.item_embeddings
        return [ItemHead("items", table.items.to(table.weight.device), table.weight,
                         table.weight.new_zeros(table.weight.shape[0]))]

    @torch.no_grad()
    def score(self, batch: SequenceBatch) -> torch.Tensor:
        """[B, n_own] scores x0hat . E_r^T of the owned items (ascending; one process:
        every item, in item order). The pad is not a column."""
        return self.query(batch)["items"] @ self.item_embeddings.weight.T

    @torch.no_grad()
    def top_k(self, query: torch.Tensor, k: int, chunk: int = 65536,
              exclude: CSR | None = None) -> torch.Tensor:
        """[B, k] best items of the whole catalogue for query [B, d] (the same on every rank:
        each rank ranks its items ``chunk`` at a time, ``ranking.merge_ranks`` merges);
        ``exclude`` [B, n_items] CSR: items never returned (the masked variant; the official
        protocol masks nothing). The pad is never ranked."""
        table = self.item_embeddings
        seen = seen_positions(exclude, query.shape[0], self.row_of[:self.n_items], query.device)
        best = RunningTopK(query.shape[0], k, seen, query.device)
        zero = table.weight.new_zeros(table.weight.shape[0])
        for scores, items in linear_chunks(query, table.weight, zero, table.items, chunk):
            best.add(scores, items)
        items, values = best.result()
        return merge_ranks(items, values, k)


__all__ = ["DiffuRec", "DiffuRecConfig"]
