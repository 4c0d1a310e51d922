"""L-DiffRec: diffusion in the latent space of per-cluster VAEs (Wang et al., SIGIR 2023).

Reference semantics, from the authors' code (github.com/YiyanXu/DiffRec). ``AE`` below is
``models/Autoencoder.py`` (``class AutoEncoder``; the same file in L-DiffRec/ and
LT-DiffRec/), ``main`` is ``L-DiffRec/main.py``, ``GD`` is ``models/gaussian_diffusion.py``.

Architecture: ``models/clusters.py`` (per-cluster encoders and decoders, their widths and
initialisation, the sparse per-cluster batch inputs).

Training loss (main, the training loop)
  diffusion = mean_b of the diffusion loss on z (``terms["loss"].mean()``; SNR-reweighted
  and divided by the importance-sampling probability, GD.training_losses);
  zhat0 = the denoiser's prediction of z (``terms["pred_xstart"]``): the decoder reads the
  DENOISED latent, not z;
  recon = -mean_b sum_i x_bi log_softmax(logits_b)_i over the WHOLE catalogue
  (AE ``compute_loss``);
  loss = lamda * diffusion + (recon + beta * KL)            when reweight (always, below)
         diffusion + lamda * (recon + beta * KL)            otherwise
  lamda = max((1 - epochs_done / anneal_steps) * lamda0, anneal_cap)  (``update_count`` is
  incremented once per EPOCH, after the batch loop; defaults anneal_steps 500,
  anneal_cap 0.005 -- run.sh does not pass them);
  beta  = min(vae_anneal_cap, batches_done / vae_anneal_steps)       (``update_count_vae``
  is incremented once per BATCH, after computing beta; defaults 0.3, 200).
  ``--reweight`` is parsed with ``type=bool``, so every released run had reweight True
  (``reweight0`` in the yelp checkpoint names still means True).
  Optimisers: AdamW(autoencoder, lr1, wd1) and AdamW(denoiser, lr2, wd2), both stepped on
  the same loss; ``param_groups`` gives the autoencoder ``ldiffrec.lr_vae`` (lr1) and the
  denoiser ``lr`` (lr2). Released ML-1M: lr1 1e-3, lr2 5e-4, wd 0.

Not in the reference (an option, off by default): ``ldiffrec.warm_start: als`` starts each
cluster's encoder and decoder from ALS factors of its columns (``warm_factors``,
``embeddings.als_warm_start``; NCF's pre-training, He et al. WWW 2017, section 3.4.1), for
catalogues too sparse for the Xavier start (Epinions: ~2 train interactions per item).

Not in the reference (an option, off by default): ``ldiffrec.frozen_autoencoder_epochs``
trains only the denoiser during the first epochs, on the latents of the autoencoder as it
starts (the warm start's): the two-stage training of latent diffusion models (Rombach et
al., "High-Resolution Image Synthesis with Latent Diffusion Models", CVPR 2022, section
3), then the reference's joint training. The loss is the same; the autoencoder's
parameters just take no gradient (``requires_grad`` off), so its optimizer leaves them
and their Adam state untouched.

Inference (main / L-DiffRec/inference.py ``evaluate``): mu (eval mode: no dropout, no
reparameterisation) -> ``diffusion.p_sample(denoiser, mu, sampling_steps, sampling_noise)``
-> decoder -> logits. A deliberate departure: the reference draws the inference noise
(T' > 0, ``sampling_noise``) from torch's global RNG, so one checkpoint evaluated twice gave
two numbers, selection on valid was partly chance, and W workers or an exported query
tower could not equal one process. Here each user's noise comes from a stream keyed by
(cfg seed, the user's input row) (``row_noise.RowNoise``): the same for any batch size,
worker count or device, and in ``evaluate``, ``recommend`` and the bundle alike; its
distribution is the reference's.

Sharded by construction (DESIGN.md, "Hybrid parallelism"). The model holds the parts of
the clusters its ``shard`` owns (``shard/context.py``; every cluster in one process) and
writes the loss once, with collectives that are identities in one process. Rank r of W,
for a global batch of B users (the same on every rank; B_r = its consecutive block):

    z_r   = concat_{c of r} reparam(E_c(dropout(x[:, items of c])))    [B, d_r]
    z     = shard.to_owners(z_r)                                        [B_r, d]  all-to-all
    t, eps, keep = the (seed, step) draws of ALL B rows, this rank's block
    diff, zhat0_r = training_losses(denoiser, z, ...)                  [B_r], [B_r, d]
    zhat0 = shard.gather(zhat0_r)                                       [B, d]    all-gather
    per head h of r: picked_h, total_h, lse_h [B]  (``linear_logsumexp``)
    nll   = sum(total) * logsumexp_r(logsumexp_h lse_h) - sum(picked)  [B]      all-reduce
    L_r   = (a sum_{b of r} diff_b + v [sum_{b of r} nll_b - beta / 2 sum_b kl_rb]) / B

with (a, v) = (lamda, 1) under ``reweight`` (else (1, lamda)); kl_rb sums the rank's latent
columns. sum_r L_r is the one-process loss (each replicated value enters once, through the
rank's own rows), so exact gradients follow (``collectives.py``'s convention; the denoiser's
are reduced by DeepSpeed when it runs in an engine, ``use_engine``). A head is one
cluster's decoder D_c, or the rank's rows of the global decoder (``CatalogueLinear``: one
head, no per-cluster copy of its rows). All randomness is keyed by (seed, step[, cluster])
(``cluster_generator``), so a W-worker run equals the one-process run up to float summation
order. Parameter names are the same sharded and not: ``encoders.{c}.*``, ``decoders.{c}.*``,
``decoder.weight`` / ``decoder.bias`` (on a rank: its items' rows, ascending), ``denoiser.*``.

Large clusters: a head's logsumexp is computed ``ldiffrec.logit_chunk`` items at a time
(None: as many as fit ``chunk_mib``, see ``device.chunk_items``) by the fused
``LinearLogSumExp``, so memory is B x chunk rather than B x n_h; picked_h is a sparse
product with the batch's own items (O(nnz h)), never the [B, n_h] logits.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..choices import WarmStart
from ..config import typed
from ..data.csr import CSR, SparseRows
from ..device import chunk_items
from ..progress import log
from ..schema import Config, LDiffRecConfig
from .diffusion import GaussianDiffusion
from .row_noise import RowNoise
from .samplers import build_sampler
from ..shard.context import Shard
from .base import ItemHead, Progress, Recommender
from .clusters import (CatalogueLinear, ClusterInput, ClusterParts, PerCluster, latent_dims,
                       unallocated)
from .denoiser import Denoiser
from .linear_logsumexp import catalogue_nll, softmax_parts


def lamda_at(lcfg: LDiffRecConfig, epochs_done: int) -> float:
    """Diffusion-loss weight (main: ``update_count`` counts finished epochs)."""
    if lcfg.anneal_steps > 0:
        return max((1.0 - epochs_done / lcfg.anneal_steps) * lcfg.lamda, lcfg.anneal_cap)
    return max(lcfg.lamda, lcfg.anneal_cap)


def beta_at(lcfg: LDiffRecConfig, batches_done: int) -> float:
    """KL weight (main: ``update_count_vae`` counts finished batches)."""
    if lcfg.vae_anneal_steps > 0:
        return min(lcfg.vae_anneal_cap, 1.0 * batches_done / lcfg.vae_anneal_steps)
    return lcfg.vae_anneal_cap


def latent_denoiser(cfg: Config | dict) -> Denoiser:
    """The denoiser on z (main "Build MLP"): DNN(in_dims=[d] + mlp_dims[::-1],
    out_dims=mlp_dims + [d], emb_size, time_type cat, norm), d = ``in_dims[0]`` (flag
    order)."""
    cfg = typed(cfg)
    latent, mlp = cfg.ldiffrec.in_dims[0], cfg.ldiffrec.mlp_dims
    return Denoiser.from_config(cfg.denoiser, [latent] + mlp[::-1], mlp + [latent])


class LDiffRec(PerCluster, Recommender):
    def __init__(self, n_items: int, partition, lcfg: LDiffRecConfig, diffusion, sampler,
                 denoiser, reweight: bool = True, sampling_steps: int = 0,
                 sampling_noise: bool = False, seed: int = 0, chunk_mib: float | None = None,
                 train: CSR | None = None, shard: Shard | None = None):
        """``shard``: the clusters this process owns (None: all of them, one process).
        ``train`` [users, n_items]: the matrix that ``ldiffrec.warm_start`` fits the
        initial parts on (``warm_factors``); None keeps the paper's initialisation (right
        when a checkpoint's weights follow)."""
        super().__init__()
        if partition.n_items != n_items:
            raise ValueError(f"the partition covers {partition.n_items} items but the model "
                             f"has {n_items}")
        self.lcfg = lcfg
        self.n_items = n_items
        self.partition = partition
        self.n_clusters = partition.n_clusters
        self.dropout = float(lcfg.dropout)
        self.reweight = bool(reweight)
        self.sampling_steps = int(sampling_steps)
        self.sampling_noise = bool(sampling_noise)
        self.seed = int(seed)
        # items per chunk of the training logsumexp: fixed, or None = from the memory
        # budget (``device.chunk_items``) for each batch size and device
        self.logit_chunk = lcfg.logit_chunk
        self.chunk_mib = chunk_mib
        self.diffusion = diffusion
        self.sampler = sampler

        sizes = partition.sizes.tolist()
        self.cluster_dims = latent_dims(sizes, lcfg.in_dims)
        self.latent_sizes = [dims[-1] for dims in self.cluster_dims]
        self.latent_size = sum(self.latent_sizes)
        self.latent_offsets = np.concatenate([[0], np.cumsum(self.latent_sizes)]).tolist()
        self.shard = shard or Shard.single(sizes, self.latent_sizes)
        self.clusters = self.shard.clusters

        # item lookup tables as (non-persistent, read-only) buffers so they follow
        # .to(device); on the CPU they share the partition's arrays (O(I) bytes, once)
        self.register_buffer("cluster_of", torch.from_numpy(partition.cluster_of),
                             persistent=False)
        self.register_buffer("local_of", torch.from_numpy(partition.local_of),
                             persistent=False)
        for c in range(self.n_clusters):
            self.register_buffer(f"items_{c}", torch.from_numpy(partition.items_of(c)),
                                 persistent=False)

        self.global_decoder = len(lcfg.out_dims) == 0
        self.warm_train = train if lcfg.warm_start != WarmStart.none else None
        self.encoders, self.decoders, self.decoder = ClusterParts(), None, None
        parts = {}
        for c in self.clusters:
            factors = self.warm_factors(c)
            self.encoders[str(c)] = self.new_encoder(c, factors)
            parts[str(c)] = self.new_decoder(c, factors)
        if self.global_decoder:
            # AE.Decode, out_dims == []: one Linear(sum l_c -> n_items); its rows of the
            # owned items in item order (the reference orders them by cluster; a
            # permutation of it)
            own = torch.sort(torch.cat([self.items_of(c) for c in self.clusters])).values
            self.decoder = unallocated(CatalogueLinear, own, self.latent_size)
            self.decoder.items = own
            with torch.no_grad():
                for c in self.clusters:
                    self.decoder.weight[self.decoder_rows(c)] = parts[str(c)].weight
                    self.decoder.bias[self.decoder_rows(c)] = parts[str(c)].bias
        else:
            self.decoders = ClusterParts(parts)
        self.denoiser = denoiser          # keeps its own initialisation
        object.__setattr__(self, "_engine", None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: Config | dict, n_items: int, partition, train: CSR | None = None,
                    shard: Shard | None = None) -> "LDiffRec":
        cfg = typed(cfg)
        d = cfg.diffusion
        return cls(n_items, partition, cfg.ldiffrec, GaussianDiffusion.from_config(d),
                   build_sampler(d), latent_denoiser(cfg), reweight=d.reweight,
                   sampling_steps=d.sampling_steps, sampling_noise=d.sampling_noise,
                   seed=cfg.seed, chunk_mib=cfg.chunk_mib, train=train, shard=shard)

    def decoder_rows(self, c: int) -> torch.Tensor:
        """[n_c] the rows of cluster c's items in ``decoder`` (the global decoder's rows of
        the owned items, ascending; in one process the item indexes themselves)."""
        return torch.searchsorted(self.decoder.items, self.items_of(c))

    def use_engine(self, engine) -> None:
        """Run the denoiser through ``engine`` (a DeepSpeed engine around ``self.denoiser``,
        data-parallel over the ranks); not a submodule, so names stay ``denoiser.*``."""
        object.__setattr__(self, "_engine", engine)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, keep=None) -> torch.Tensor:
        return (self._engine or self.denoiser)(x_t, t, keep)

    def diffusion_draws(self, batch_size: int, step: int, device):
        """The diffusion's randomness for a batch of ``batch_size`` at training ``step``:
        (t [B], importance weights [B], noise [B, d], denoiser input-dropout keep mask
        [B, d] or None), from one stream keyed by (cfg seed, step) -- so a data-parallel
        rank can draw the whole batch's and take its rows."""
        g = self.cluster_generator(step, -1, "cpu")     # on the CPU: the same on any device
        t, weights = self.sampler.sample(batch_size, device, generator=g)
        noise = torch.randn(batch_size, self.latent_size, generator=g, device="cpu").to(device)
        p = self.denoiser.drop.p
        keep = ((torch.rand(batch_size, self.latent_size, generator=g, device="cpu") >= p)
                .to(device) if p > 0 else None)
        return t, weights, noise, keep

    # ------------------------------------------------------------------ decoder side
    def cluster_hidden(self, c: int, zhat0: torch.Tensor) -> torch.Tensor:
        """The query of cluster c's head: zhat0 itself (global decoder), else the input of
        D_c's last Linear (zhat0_c when D_c is a single Linear)."""
        if self.global_decoder:
            return zhat0
        z_c = zhat0 if self.n_clusters == 1 else zhat0[:, self.latent_slice(c)]
        return self.decoders[c][:-1](z_c)

    def cluster_weight(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [n_c, h], bias [n_c]) of the last layer scoring cluster c's items: the
        cluster's rows of the global Linear, or D_c's last Linear."""
        if self.global_decoder:
            rows = self.decoder_rows(c)
            return self.decoder.weight[rows], self.decoder.bias[rows]
        last = self.decoders[c][-1]
        return last.weight, last.bias

    def cluster_logits(self, c: int, zhat0: torch.Tensor) -> torch.Tensor:
        """[B, n_c] logits of cluster c's items (local order = ``items_of(c)``)."""
        weight, bias = self.cluster_weight(c)
        return F.linear(self.cluster_hidden(c, zhat0), weight, bias)

    def _heads(self, zhat0: torch.Tensor, inputs: list[ClusterInput]):
        """(hidden [B, h], weight [n, h], bias [n], targets) of each head this process
        scores: the owned rows of the global decoder (targets at their rows, row-major),
        or each owned cluster's D_c (targets at the cluster's local columns)."""
        if not self.global_decoder:
            return [(self.cluster_hidden(c, zhat0), *self.cluster_weight(c), inp)
                    for c, inp in zip(self.clusters, inputs)]
        rows = torch.cat([inp.rows for inp in inputs])
        cols = torch.cat([self.decoder_rows(c)[inp.local]
                          for c, inp in zip(self.clusters, inputs)])
        target = torch.cat([inp.target for inp in inputs])
        order = torch.argsort(rows * len(self.decoder.items) + cols)
        b = zhat0.shape[0]
        merged = ClusterInput(rows[order], cols[order], target[order], target[order],
                              None, b)
        return [(zhat0, self.decoder.weight, self.decoder.bias, merged)]

    def multinomial_parts(self, hidden: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor, inp: ClusterInput):
        """(picked [B], total [B], lse [B]) of one head whose logits are
        hidden [B, h] @ weight[n, h].T + bias [n], with the targets ``inp`` at the head's
        columns ``inp.local`` (``linear_logsumexp.softmax_parts``)."""
        return softmax_parts(hidden, weight, bias, inp.rows, inp.local, inp.target,
                             self._chunk(hidden))

    def multinomial_nll(self, zhat0: torch.Tensor, inputs: list[ClusterInput]) -> torch.Tensor:
        """[B] -sum_i x_i log_softmax(logits)_i over the whole catalogue, head by head and
        (sharded) rank by rank; the same on every rank (``linear_logsumexp.catalogue_nll``)."""
        heads = [(hidden, weight, bias, inp.rows, inp.local, inp.target)
                 for hidden, weight, bias, inp in self._heads(zhat0, inputs)]
        return catalogue_nll(heads, self.shard, self._chunk(zhat0))

    def _chunk(self, hidden: torch.Tensor) -> int:
        """Items per chunk of the training logsumexp: ``ldiffrec.logit_chunk``, else as many
        as fit ``chunk_mib`` for this batch and device (``device.chunk_items``)."""
        return self.logit_chunk or chunk_items(hidden.shape[0], hidden.device, self.chunk_mib)

    def _zhat0(self, z_r: torch.Tensor, splits: list[int], own: slice, step: int | None,
               row_noise: RowNoise | None = None):
        """(zhat0 [B, d], diffusion terms of the own rows or None): the latent rows go to
        their owners, the denoiser runs on them (training: ``training_losses`` at ``step``'s
        draws; eval: the reverse process ``p_sample`` with the own rows' ``row_noise``), and
        every rank gets all rows back."""
        z = self.shard.to_owners(z_r, splits)
        if step is None:
            return self.shard.gather(self.diffusion.p_sample(
                self.denoise, z, self.sampling_steps, self.sampling_noise, row_noise), splits), None
        t, weights, noise, keep = self.diffusion_draws(z_r.shape[0], step, z_r.device)
        keep = None if keep is None else keep[own]
        terms = self.diffusion.training_losses(lambda x_t, ts: self.denoise(x_t, ts, keep), z,
                                               t[own], weights[own], noise[own])
        self.sampler.update_with_local_losses(t[own], terms["raw"].detach())
        return self.shard.gather(terms["pred_xstart"], splits), terms

    # ------------------------------------------------------------------ Recommender
    def training_loss(self, batch: SparseRows, progress: Progress) -> dict[str, torch.Tensor]:
        """{"loss": this process's share L_r of the batch loss (the whole loss in one
        process; the module docstring's formula), "diffusion", "recon", "kl" (batch means
        over all ranks), "lamda", "beta"}."""
        device, b = batch.values.device, batch.batch_size
        frozen = progress.epoch < self.lcfg.frozen_autoencoder_epochs
        if frozen != getattr(self, "_frozen", False) and self.shard.rank == 0:
            log.info("epoch %d: %s", progress.epoch + 1,
                     f"the autoencoder is frozen through epoch "
                     f"{self.lcfg.frozen_autoencoder_epochs} (the denoiser trains alone)"
                     if frozen else "the autoencoder trains from now on")
        self._frozen = frozen
        for p in self.autoencoder_parameters():
            p.requires_grad_(not frozen)
        splits, own = self.shard.rows(b)
        gens = [self.cluster_generator(progress.step, c, device) for c in self.clusters]
        inputs, mu, logvar, z_r = self.encode(batch, gens)
        zhat0, terms = self._zhat0(z_r, splits, own, progress.step)
        nll = self.multinomial_nll(zhat0, inputs)

        diffusion, recon = terms["loss"].sum(), nll[own].sum()
        kl = -0.5 * self.kl_sum(mu, logvar).sum()
        lamda = lamda_at(self.lcfg, progress.epoch)
        beta = beta_at(self.lcfg, progress.step)
        # main: ``if args.reweight: loss = lamda * elbo + vae_loss`` (always, type=bool)
        a, v = (lamda, 1.0) if self.reweight else (1.0, lamda)
        loss = (a * diffusion + v * (recon + beta * kl)) / b
        means = self.shard.sum(torch.stack([diffusion, recon, kl]).detach()) / b
        return {"loss": loss, "diffusion": means[0], "recon": means[1], "kl": means[2],
                "lamda": torch.tensor(lamda), "beta": torch.tensor(beta)}

    @contextlib.contextmanager
    def _eval_mode(self):
        """Eval mode for the duration (score/query are always deterministic)."""
        was = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was)

    @torch.no_grad()
    def query(self, batch: SparseRows) -> dict[str, torch.Tensor]:
        """{head name: [B, h]} for the heads of ``item_heads`` (sharded: collective)."""
        with self._eval_mode():
            _, mu, _, _ = self.encode(batch)            # eval: no dropout, z = mu
            splits, own = self.shard.rows(batch.batch_size)
            zhat0, _ = self._zhat0(mu, splits, own, None, RowNoise(self.seed, batch, own))
            if self.global_decoder:
                return {"items": zhat0}
            return {f"cluster{c}": self.cluster_hidden(c, zhat0) for c in self.clusters}

    def item_heads(self) -> list[ItemHead]:
        """The owned items' heads: "items" (the global decoder's rows) or "cluster{c}"."""
        if self.global_decoder:
            return [ItemHead("items", self.decoder.items, self.decoder.weight.detach(),
                             self.decoder.bias.detach())]
        return [ItemHead(f"cluster{c}", self.items_of(c), self.decoders[c][-1].weight.detach(),
                         self.decoders[c][-1].bias.detach()) for c in self.clusters]

    @torch.no_grad()
    def score(self, batch: SparseRows) -> torch.Tensor:
        """[B, I] logits in global item order: query @ weight.T + bias per head (one
        process)."""
        queries = self.query(batch)
        out = torch.empty(batch.batch_size, self.n_items, device=batch.values.device)
        for h in self.item_heads():
            out[:, h.items] = queries[h.name] @ h.weight.T + h.bias
        return out

    # ------------------------------------------------------------------ optimiser, counts
    def autoencoder_parameters(self) -> list[nn.Parameter]:
        """The owned clusters' encoder and decoder parameters (rank-local when sharded)."""
        decoder = self.decoder if self.global_decoder else self.decoders
        return list(self.encoders.parameters()) + list(decoder.parameters())

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Two AdamW groups, as main's optimizer1 / optimizer2: the autoencoder with
        ``ldiffrec.lr_vae`` / ``weight_decay_vae`` (None = lr / weight_decay), the denoiser
        with ``lr`` / ``weight_decay``."""
        lr_vae, wd_vae = self.lcfg.lr_vae, self.lcfg.weight_decay_vae
        return [
            {"name": "autoencoder", "params": self.autoencoder_parameters(),
             "lr": lr if lr_vae is None else float(lr_vae),
             "weight_decay": weight_decay if wd_vae is None else float(wd_vae)},
            {"name": "denoiser", "params": list(self.denoiser.parameters()),
             "lr": lr, "weight_decay": weight_decay},
        ]

    def catalogue_rows(self) -> int | None:
        """Rows of this process's part of the row-sharded global decoder (None: per-cluster
        decoders), as ``checkpoint.merge_catalogue`` rebuilds them."""
        return len(self.decoder.items) if self.global_decoder else None

    def parameter_counts(self) -> dict[str, int]:
        """{encoders, decoder, denoiser, total} over all clusters (sharded: collective)."""
        count = lambda ps: sum(getattr(p, "ds_numel", p.numel()) for p in ps)  # noqa: E731
        decoder = self.decoder if self.global_decoder else self.decoders
        owned = self.shard.sum(torch.tensor([count(self.encoders.parameters()),
                                             count(decoder.parameters())]))
        enc, dec, den = int(owned[0]), int(owned[1]), count(self.denoiser.parameters())
        return {"encoders": enc, "decoder": dec, "denoiser": den, "total": enc + dec + den}
