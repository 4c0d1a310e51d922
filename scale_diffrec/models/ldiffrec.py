"""L-DiffRec: diffusion in the latent space of per-cluster VAEs (Wang et al., SIGIR 2023).

Reference semantics, from the authors' code (github.com/YiyanXu/DiffRec). ``AE`` below is
``models/Autoencoder.py`` (``class AutoEncoder``; the same file in L-DiffRec/ and
LT-DiffRec/), ``main`` is ``L-DiffRec/main.py``, ``GD`` is ``models/gaussian_diffusion.py``.

Architecture
  * Items are split into C clusters by k-means over item embeddings (AE.__init__,
    ``kmeans(X=item_emb, num_clusters=n_cate, distance='euclidean')``); see partition.py.
  * ``in_dims`` is given in the reference's flag order and reversed before use
    (main: ``in_dims = eval(args.in_dims)[::-1]``), so its FIRST entry is the latent size
    and the list read backwards is the encoder's widths. With the released ``[300]`` that
    is simply a 300-d latent.
  * Cluster c's latent widths (AE.__init__, n_cate > 1): for every cluster but the last,
    ``int(n_c / n_items * d)`` per width d (truncation; 0 becomes 1); the last cluster gets
    the remainder ``d - sum(others)``, so the latents sum to d. One cluster (n_cate == 1):
    the widths themselves.
  * Encoder E_c: Linear(n_c -> w1) act ... Linear(-> 2 l_c) act -- the activation (tanh)
    follows EVERY layer including the last, so mu_c and logvar_c (the two halves of the
    output, mu first) both lie in (-1, 1) (AE.__init__ ``encoder_modules``, AE.Encode).
    The first layer reads the sparse batch: an EmbeddingBag(mode="sum",
    per_sample_weights=values) over the cluster's local columns plus a bias, which equals
    Linear on the dense column slice.
  * Input dropout p = ``dropout`` (AE ``nn.Dropout(dropout=0.1)``, the default main uses)
    on the whole input before encoding (AE.Encode). Dropout zeroes an entry or scales it
    by 1/(1-p); zeros stay zero, so dropping the stored nonzeros is the same operation.
  * Reconstruction target: AE.Encode returns the DROPPED-OUT input as the target for
    ``compute_loss`` (``batch = self.dropout(batch)`` ... ``return torch.cat(batch_cate)``),
    so the reference reconstructs dropout(x). ``recon_target: dropped`` (default) keeps
    that; ``clean`` reconstructs x itself. With time weights (LT-DiffRec) x holds the
    weights (LT-DiffRec/main.py trains on the weighted matrix).
  * z = concat_c z_c, z_c = mu_c + eps * exp(logvar_c / 2) in training, mu_c in eval
    (AE.Encode / ``reparamterization``; ``--reparam`` is ``type=bool`` default True, so
    always on). KL = -0.5 * mean_b sum_j (1 + logvar - mu^2 - exp(logvar)) over the whole
    z (AE.Encode).
  * Decoder (AE.__init__ / AE.Decode), two forms:
      out_dims == []  one Linear(d -> n_items) on the whole zhat0 (the released
                      checkpoints: ``cate2_in[300]_out[]`` in L-DiffRec/inference.py).
      out_dims != []  per-cluster D_c on zhat0's slice of cluster c, logits over the items
                      of c. For C > 1 the reference builds D_c as the mirror of E_c
                      (``decode_dim[i] + [category_len[i]]``: widths l_c, ..., w1_c -> n_c,
                      act between layers, none after the last); the VALUES of out_dims are
                      not used, only its non-emptiness. For C == 1 the reference decoder is
                      ``[d] + out_dims + [n_items]`` (out_dims are hidden widths); we do
                      the same.
    Xavier-normal weights, zero biases everywhere (AE ``xavier_normal_initialization``),
    drawn per cluster from a stream keyed by (cfg seed, part, cluster) (``new_encoder`` /
    ``new_decoder``): a worker builds exactly its clusters' parts, as one process would,
    without building the rest. Rows of the global decoder keep the whole Linear's
    xavier std sqrt(2 / (d + I)).
  * Denoiser on z: DNN(in_dims=[d] + mlp_dims[::-1], out_dims=mlp_dims + [d], emb_size,
    time_type cat, norm) (main "Build MLP"); here ``models.denoiser.Denoiser`` with
    ``cfg["denoiser"]`` emb_size / norm / dropout.

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

Inference (main / L-DiffRec/inference.py ``evaluate``): mu (eval mode: no dropout, no
reparameterisation) -> ``diffusion.p_sample(denoiser, mu, sampling_steps, sampling_noise)``
-> decoder -> logits.

Catalogue-parallel form. The multinomial term is written as
    nll_b = -sum_i x_bi logit_bi + (sum_i x_bi) * logsumexp_i logit_bi,
    logsumexp_i logit_bi = logsumexp_c ( logsumexp_{i in c} logit_bi ),
so each cluster contributes (picked_bc, total_bc, lse_bc) computed from its own items only
and the three combine exactly (``combine_multinomial``). The pieces a distributed worker
reuses are public: ``cluster_inputs`` / ``cluster_input``, ``encode_input`` /
``encode_cluster``, ``reparameterize``, ``kl_sum``, ``cluster_logits``,
``multinomial_parts``, ``combine_multinomial``, and the per-cluster random streams
(``cluster_generator``), which make dropout and reparameterisation noise a function of
(cfg seed, training step, cluster) only, independent of which worker holds the cluster.

Large clusters: logsumexp_{i in c} logit_bi is computed ``ldiffrec.logit_chunk`` items at a
time (None: as many as fit ``chunk_mib``, see ``device.chunk_items``) by a fused linear-logsumexp (``LinearLogSumExp``: the chunk's logits are recomputed
in backward), so memory is B x chunk rather than B x n_c; picked_bc gathers the weight
rows of the batch's own items (O(nnz h)), never the [B, n_c] logits.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..choices import Activation, ReconTarget, WarmStart
from ..config import Config, typed
from ..data.csr import SparseRows
from ..device import chunk_items
from ..errors import ConfigError
from ..ranking import with_bias
from .base import ItemHead, Progress, Recommender

ACTIVATIONS = {Activation.tanh: nn.Tanh, Activation.relu: nn.ReLU,
               Activation.sigmoid: nn.Sigmoid, Activation.leaky_relu: nn.LeakyReLU}


# ----------------------------------------------------------------------------- helpers
def latent_dims(sizes: list[int] | np.ndarray, in_dims: list[int]) -> list[list[int]]:
    """Per-cluster encoder widths (input side -> latent), the reference's rounding.

    ``in_dims`` in the reference's flag order (latent first); AE.__init__ receives it
    reversed. Cluster c < C-1: int(n_c / n * d) (0 -> 1); the last cluster: the remainder.
    """
    widths = [int(d) for d in list(in_dims)[::-1]]
    sizes = [int(s) for s in sizes]
    n = sum(sizes)
    if len(sizes) == 1:
        return [widths]
    out: list[list[int]] = []
    for c, size in enumerate(sizes):
        if c == len(sizes) - 1:
            dims = [w - sum(o[j] for o in out) for j, w in enumerate(widths)]
        else:
            dims = [int(size / n * w) for w in widths]
            dims = [d if d != 0 else 1 for d in dims]
        out.append(dims)
    if min(out[-1]) < 1:
        raise ConfigError(f"config key 'ldiffrec.in_dims' {in_dims} is too small for "
                          f"{len(sizes)} clusters: the last cluster would get widths "
                          f"{out[-1]} (every cluster needs at least 1)")
    return out


def stream_key(*fields) -> int:
    """63-bit seed of a random stream named by ``fields`` (a stable hash)."""
    text = "ldiffrec:" + ":".join(str(f) for f in fields)
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


def keyed_xavier_(module: nn.Module, key: int) -> nn.Module:
    """AE ``xavier_normal_initialization`` from one stream: zero biases, then xavier-normal
    weights of every Linear / EmbeddingBag in module order. Returns ``module``."""
    g = torch.Generator().manual_seed(key)
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
        for layer in module.modules():
            if isinstance(layer, (nn.Linear, nn.EmbeddingBag)):
                nn.init.xavier_normal_(layer.weight, generator=g)
    return module


def unallocated(factory, *args) -> nn.Module:
    """``factory(*args)`` with uninitialised CPU storage (built on the meta device)."""
    with torch.device("meta"):
        module = factory(*args)
    return module.to_empty(device="cpu")


def chunked_logsumexp(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      chunk: int) -> torch.Tensor:
    """[B] lse_b = logsumexp_i (hidden @ weight.T + bias)_bi for hidden [B, h],
    weight [n, h], bias [n], ``chunk`` items at a time, never holding more than [B, chunk]
    logits (``LinearLogSumExp``)."""
    return LinearLogSumExp.apply(hidden, weight, bias, int(chunk))


class LinearLogSumExp(torch.autograd.Function):
    """lse = logsumexp(hidden @ weight.T + bias, dim=1), in item chunks of [B, chunk].

    The bias is folded into the product: l_k = [hidden, 1] @ [W_k, b_k].T (a copy of the
    chunk's [chunk, h + 1] weights, not of [B, chunk] biases). Forward: per chunk
    lse_k = max + log sum exp(l_k - max) (in place), lse = logaddexp over chunks. Backward,
    with g = dL/dlse [B]: the chunk's logits are recomputed and turned in place into
    P_k = exp(l_k - lse) * g (softmax times g; a single chunk keeps its softmax from the
    forward instead); dL/dhidden = sum_k P_k W_k and
    [dL/dW_k, dL/db_k] = P_k.T @ [hidden, 1]. Memory: [B, chunk], never [B, n]; no
    autograd-saved logits and no recomputed logsumexp (the profile's hottest path).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, chunk):
        # the matmuls in the ambient autocast dtype (bf16 under precision bf16), the
        # exp / sum / log on fp32 logits
        mm, acc = _matmul_dtype(hidden), torch.promote_types(hidden.dtype, torch.float32)
        hidden1 = torch.cat([hidden, hidden.new_ones(hidden.shape[0], 1)], dim=1).to(mm)
        lse = None
        for s in range(0, weight.shape[0], chunk):
            logits = (hidden1 @ with_bias(weight, bias, s, chunk).to(mm).T).to(acc)
            top = logits.amax(dim=1, keepdim=True)
            part = logits.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))
            lse = part if lse is None else torch.logaddexp(lse, part)
        # one chunk: keep its softmax (exp(l - max) / sum, within the B x chunk budget)
        # instead of recomputing the logits in backward
        single = weight.shape[0] <= chunk
        probs = logits.div_(logits.sum(dim=1, keepdim=True)) if single else None
        ctx.save_for_backward(hidden1, weight, bias, lse, probs)
        ctx.chunk, ctx.out_dtype = chunk, hidden.dtype
        return lse

    @staticmethod
    def backward(ctx, grad):
        hidden1, weight, bias, lse, probs = ctx.saved_tensors
        mm, acc, h = hidden1.dtype, lse.dtype, weight.shape[1]
        grad = grad.to(acc)
        grad_h = torch.zeros(hidden1.shape[0], h, device=grad.device, dtype=acc)
        grad_wb = torch.empty(weight.shape[0], h + 1, device=grad.device, dtype=acc)
        for s in range(0, weight.shape[0], ctx.chunk):
            wb = with_bias(weight, bias, s, ctx.chunk).to(mm)
            if probs is not None:
                p = probs * grad[:, None]
            else:
                p = (hidden1 @ wb.T).to(acc)
                p.sub_(lse[:, None]).exp_().mul_(grad[:, None])        # [B, chunk]
            if mm == acc:
                grad_h.addmm_(p, wb[:, :h])
                torch.mm(p.T, hidden1, out=grad_wb[s:s + ctx.chunk])
            else:                          # bf16 products, fp32 accumulation
                p = p.to(mm)
                grad_h += (p @ wb[:, :h]).to(acc)
                grad_wb[s:s + ctx.chunk] = (p.T @ hidden1).to(acc)
        return (grad_h.to(ctx.out_dtype), grad_wb[:, :h].to(weight.dtype),
                grad_wb[:, h].to(bias.dtype), None)


def _matmul_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype autocast gives matmuls on ``t``'s device now (``t.dtype`` outside it)."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else t.dtype


def lamda_at(lcfg: dict, epochs_done: int) -> float:
    """Diffusion-loss weight (main: ``update_count`` counts finished epochs)."""
    if lcfg["anneal_steps"] > 0:
        return max((1.0 - epochs_done / lcfg["anneal_steps"]) * lcfg["lamda"],
                   lcfg["anneal_cap"])
    return max(lcfg["lamda"], lcfg["anneal_cap"])


def beta_at(lcfg: dict, batches_done: int) -> float:
    """KL weight (main: ``update_count_vae`` counts finished batches)."""
    if lcfg["vae_anneal_steps"] > 0:
        return min(lcfg["vae_anneal_cap"], 1.0 * batches_done / lcfg["vae_anneal_steps"])
    return lcfg["vae_anneal_cap"]


def combine_logsumexp(parts: list[torch.Tensor]) -> torch.Tensor:
    """logsumexp over the catalogue from per-cluster logsumexps [B] each -> [B]."""
    return torch.logsumexp(torch.stack(parts, dim=1), dim=1)


def combine_multinomial(picked: torch.Tensor, total: torch.Tensor,
                        lse: torch.Tensor) -> torch.Tensor:
    """[B] multinomial NLL -sum_i x_i logit_i + (sum_i x_i) logsumexp(logits).

    ``picked`` = sum_i x_i logit_i, ``total`` = sum_i x_i, summed over all clusters;
    ``lse`` = the catalogue logsumexp (``combine_logsumexp``).
    """
    return total * lse - picked


@dataclass
class ClusterInput:
    """One cluster's entries of a batch (row-major, as in the CSR batch).

    ``rows`` [n] batch row, ``local`` [n] column inside the cluster, ``values`` [n]
    encoder input (after dropout in training), ``target`` [n] reconstruction target,
    ``offsets`` [B] start of each row's entries (EmbeddingBag offsets).
    """
    rows: torch.Tensor
    local: torch.Tensor
    values: torch.Tensor
    target: torch.Tensor
    offsets: torch.Tensor
    batch_size: int


class ClusterEncoder(nn.Module):
    """E_c: sparse first layer (EmbeddingBag sum + bias == Linear(n_c -> w1)), act, then
    Linear + act per further width; output [B, 2 l_c] = (mu_c, logvar_c)."""

    def __init__(self, n_items: int, dims: list[int], act: str):
        super().__init__()
        widths = list(dims[:-1]) + [2 * dims[-1]]
        self.latent = dims[-1]
        self.first = nn.EmbeddingBag(n_items, widths[0], mode="sum")
        self.first_bias = nn.Parameter(torch.zeros(widths[0]))
        layers: list[nn.Module] = [ACTIVATIONS[act]()]
        for d_in, d_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(d_in, d_out), ACTIVATIONS[act]()]
        self.rest = nn.Sequential(*layers)

    def forward(self, inp: ClusterInput) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.embedding_bag(inp.local, self.first.weight, inp.offsets, mode="sum",
                            per_sample_weights=inp.values) + self.first_bias
        h = self.rest(h)
        return h[:, :self.latent], h[:, self.latent:]


@dataclass
class WarmFactors:
    """A cluster's warm start: the mu half of E_c's first layer and the decoder's item
    rows, each [n_c, l_c] (``LDiffRec.warm_factors``)."""
    encoder: torch.Tensor
    decoder: torch.Tensor


class DecoderRows(nn.Module):
    """Cluster c's rows of the global linear decoder: weight [n_c, d], bias [n_c]."""

    def __init__(self, n_items: int, latent: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_items, latent))
        self.bias = nn.Parameter(torch.empty(n_items))


def _mlp(dims: list[int], act: str) -> nn.Sequential:
    """Linear layers through ``dims`` with act between them (none after the last)."""
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(d_in, d_out), ACTIVATIONS[act]()]
    return nn.Sequential(*layers[:-1])


# ----------------------------------------------------------------------------- the model
class LDiffRec(Recommender):
    def __init__(self, n_items: int, partition, lcfg: dict, diffusion, sampler, denoiser,
                 reweight: bool = True, sampling_steps: int = 0, sampling_noise: bool = False,
                 seed: int = 0, build_parts: bool = True, chunk_mib: float | None = None,
                 train: CSR | None = None):
        """``build_parts`` False: no encoders or decoder (a worker builds its own clusters'
        with ``new_encoder`` / ``new_decoder``). ``train`` [users, n_items]: the matrix
        that ``ldiffrec.warm_start`` fits the initial parts on (``warm_factors``); None
        keeps the paper's initialisation (right when a checkpoint's weights follow)."""
        super().__init__()
        if partition.n_items != n_items:
            raise ValueError(f"the partition covers {partition.n_items} items but the model "
                             f"has {n_items}")
        self.lcfg = dict(lcfg)
        self.n_items = n_items
        self.partition = partition
        self.n_clusters = partition.n_clusters
        self.dropout = float(lcfg["dropout"])
        self.reweight = bool(reweight)
        self.sampling_steps = int(sampling_steps)
        self.sampling_noise = bool(sampling_noise)
        self.seed = int(seed)
        # items per chunk of the training logsumexp: fixed, or None = from the memory
        # budget (``device.chunk_items``) for each batch size and device
        self.logit_chunk = None if lcfg["logit_chunk"] is None else int(lcfg["logit_chunk"])
        self.chunk_mib = chunk_mib
        self.diffusion = diffusion
        self.sampler = sampler

        sizes = partition.sizes.tolist()
        self.cluster_dims = latent_dims(sizes, lcfg["in_dims"])
        self.latent_sizes = [dims[-1] for dims in self.cluster_dims]
        self.latent_size = sum(self.latent_sizes)
        self.latent_offsets = np.concatenate([[0], np.cumsum(self.latent_sizes)]).tolist()

        # item lookup tables as (non-persistent, read-only) buffers so they follow
        # .to(device); on the CPU they share the partition's arrays (O(I) bytes, once)
        self.register_buffer("cluster_of", torch.from_numpy(partition.cluster_of),
                             persistent=False)
        self.register_buffer("local_of", torch.from_numpy(partition.local_of),
                             persistent=False)
        for c in range(self.n_clusters):
            self.register_buffer(f"items_{c}", torch.from_numpy(partition.items_of(c)),
                                 persistent=False)

        self.global_decoder = len(lcfg["out_dims"]) == 0
        self.warm_train = train if lcfg["warm_start"] != WarmStart.none else None
        self.encoders = self.decoders = self.decoder = None
        if build_parts:
            encoders, decoders = [], []
            for c in range(self.n_clusters):
                factors = self.warm_factors(c)
                encoders.append(self.new_encoder(c, factors))
                decoders.append(self.new_decoder(c, factors))
            self.encoders = nn.ModuleList(encoders)
            if self.global_decoder:
                # AE.Decode, out_dims == []: one Linear(sum l_c -> n_items); rows in global
                # item order (the reference orders them by cluster; a permutation of it)
                self.decoder = unallocated(nn.Linear, self.latent_size, n_items)
                with torch.no_grad():
                    for c, rows in enumerate(decoders):
                        self.decoder.weight[self.items_of(c)] = rows.weight
                        self.decoder.bias[self.items_of(c)] = rows.bias
            else:
                self.decoders = nn.ModuleList(decoders)
        self.denoiser = denoiser          # keeps its own initialisation

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: Config | dict, n_items: int, partition,
                    build_parts: bool = True, train: CSR | None = None) -> "LDiffRec":
        from ..diffusion import GaussianDiffusion
        from ..samplers import build_sampler
        from .denoiser import Denoiser
        cfg = typed(cfg)
        lcfg, d = cfg.ldiffrec, cfg.diffusion
        # the latent size is in_dims[0] (flag order); main "Build MLP"
        latent = int(lcfg.in_dims[0])
        mlp = [int(w) for w in lcfg.mlp_dims]
        denoiser = Denoiser.from_config(cfg.denoiser, [latent] + mlp[::-1], mlp + [latent])
        return cls(n_items, partition, lcfg.model_dump(mode="json"),
                   GaussianDiffusion.from_config(d), build_sampler(d), denoiser,
                   reweight=d.reweight, sampling_steps=d.sampling_steps,
                   sampling_noise=d.sampling_noise, seed=cfg.seed,
                   build_parts=build_parts, chunk_mib=cfg.chunk_mib, train=train)

    def items_of(self, c: int) -> torch.Tensor:
        return getattr(self, f"items_{c}")

    def new_encoder(self, c: int, factors: "WarmFactors | None" = None) -> "ClusterEncoder":
        """E_c, initialised from the (seed, "encoder", c) stream; with ``factors`` (from
        ``warm_factors``) the mu half of its first layer is then the fold-in map and the
        logvar half starts at its floor (zero weights, bias -3: logvar = tanh(-3) ~ -1, the
        least reparameterisation noise the tanh allows, std ~0.61 against mu's ~0.45)."""
        size = int(self.partition.sizes[c])
        enc = unallocated(ClusterEncoder, size, self.cluster_dims[c], self.lcfg["act"])
        enc = keyed_xavier_(enc, stream_key("init", self.seed, "encoder", c))
        if factors is not None:       # mu: the fold-in; logvar: its floor, tanh(-3) ~ -1
            with torch.no_grad():
                enc.first.weight[:, :enc.latent] = factors.encoder
                enc.first.weight[:, enc.latent:] = 0.0
                enc.first_bias[enc.latent:] = -3.0
        return enc

    def new_decoder(self, c: int, factors: "WarmFactors | None" = None) -> nn.Module:
        """Cluster c's decoder part, initialised from the (seed, "decoder", c) stream:
        D_c (AE.__init__: for C > 1 the mirror of E_c, l_c ... w1_c -> n_c; for C == 1
        [d] + out_dims + [n_items]), or its ``DecoderRows`` of the global Linear. With
        ``factors`` the item rows are the scaled item factors (the global decoder's rows:
        on the cluster's latent slice, zero elsewhere)."""
        size, key = int(self.partition.sizes[c]), stream_key("init", self.seed, "decoder", c)
        if self.global_decoder:
            rows = DecoderRows(size, self.latent_size)
            g = torch.Generator().manual_seed(key)
            std = (2.0 / (self.latent_size + self.n_items)) ** 0.5   # the whole Linear's
            with torch.no_grad():
                rows.weight.normal_(0.0, std, generator=g)
                rows.bias.zero_()
                if factors is not None:
                    rows.weight.zero_()
                    rows.weight[:, self.latent_slice(c)] = factors.decoder
            return rows
        if self.n_clusters == 1:
            dims = [self.latent_size] + [int(d) for d in self.lcfg["out_dims"]] + [size]
        else:
            dims = self.cluster_dims[c][::-1] + [size]
        dec = keyed_xavier_(unallocated(_mlp, dims, self.lcfg["act"]), key)
        if factors is not None:
            with torch.no_grad():
                dec[-1].weight.copy_(factors.decoder)
        return dec

    def warm_factors(self, c: int) -> "WarmFactors | None":
        """Cluster c's warm start (``ldiffrec.warm_start: als``; ``embeddings.als_warm_start``
        on cluster c's columns of the train matrix, rank l_c, so a worker fits only its own
        clusters and W workers start where one process starts), or None: the paper's
        initialisation (``warm_start: none``, or no train matrix given)."""
        if self.warm_train is None:
            return None
        from ..embeddings import als_warm_start
        lcfg = self.lcfg
        encoder, decoder = als_warm_start(
            self.partition.cluster_columns(self.warm_train, c), self.latent_sizes[c],
            lcfg["als_reg"], lcfg["als_alpha"], lcfg["als_iters"],
            seed=stream_key("als", self.seed, c) % 2 ** 31)
        return WarmFactors(torch.from_numpy(encoder), torch.from_numpy(decoder))


    def latent_slice(self, c: int) -> slice:
        return slice(self.latent_offsets[c], self.latent_offsets[c + 1])

    # ------------------------------------------------------------------ randomness
    def cluster_generator(self, step: int, c: int, device) -> torch.Generator:
        """Cluster c's random stream at ``step`` (input dropout, then reparameterisation
        eps): keyed by (cfg seed, step, cluster) only, so it does not depend on which
        worker holds the cluster nor on torch's global RNG."""
        g = torch.Generator(device=device)
        g.manual_seed(stream_key(int(self.seed), int(step), int(c)))
        return g

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

    # ------------------------------------------------------------------ encoder side
    def _make_input(self, rows, local, values, batch_size, generator) -> ClusterInput:
        counts = torch.bincount(rows, minlength=batch_size)
        offsets = torch.cumsum(counts, 0) - counts
        target = values
        if self.training and self.dropout > 0 and values.numel():
            keep = torch.rand(values.shape, generator=generator, device=values.device,
                              dtype=values.dtype) >= self.dropout
            values = values * keep / (1.0 - self.dropout)
            if self.lcfg["recon_target"] == ReconTarget.dropped:
                target = values
        return ClusterInput(rows, local, values, target, offsets, batch_size)

    def cluster_input(self, c: int, batch: SparseRows,
                      generator: torch.Generator | None = None) -> ClusterInput:
        """Cluster c's entries of ``batch`` (dropout applied in training)."""
        sel = self.cluster_of[batch.indices] == c
        return self._make_input(batch.row_ids()[sel], self.local_of[batch.indices[sel]],
                                batch.values[sel], batch.batch_size, generator)

    def cluster_inputs(self, batch: SparseRows,
                       generators: list | None = None) -> list[ClusterInput]:
        """Every cluster's entries (one stable sort by cluster); same as ``cluster_input``."""
        cl = self.cluster_of[batch.indices]
        order = torch.argsort(cl, stable=True)
        counts = torch.bincount(cl, minlength=self.n_clusters).tolist()
        rows = batch.row_ids()[order].split(counts)
        idx = batch.indices[order].split(counts)
        vals = batch.values[order].split(counts)
        return [self._make_input(rows[c], self.local_of[idx[c]], vals[c], batch.batch_size,
                                 None if generators is None else generators[c])
                for c in range(self.n_clusters)]

    def encode_input(self, c: int, inp: ClusterInput) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu_c, logvar_c), each [B, l_c]."""
        return self.encoders[c](inp)

    def encode_cluster(self, c: int, batch: SparseRows,
                       generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu_c, logvar_c) from cluster c's columns of ``batch`` only."""
        return self.encode_input(c, self.cluster_input(c, batch, generator))

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """mu + eps * exp(logvar / 2) in training, mu in eval (AE.Encode)."""
        if not self.training:
            return mu
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + eps * torch.exp(0.5 * logvar)

    @staticmethod
    def kl_sum(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """[B] sum over latent dims of (1 + logvar - mu^2 - exp(logvar)); the KL term is
        -0.5 * mean_b of its sum over clusters."""
        return torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)

    def encode(self, batch: SparseRows, generators: list | None = None):
        """(inputs per cluster, mu [B, d], logvar [B, d], z [B, d])."""
        inputs = self.cluster_inputs(batch, generators)
        mus, logvars, zs = [], [], []
        for c, inp in enumerate(inputs):
            mu, logvar = self.encode_input(c, inp)
            mus.append(mu)
            logvars.append(logvar)
            zs.append(self.reparameterize(mu, logvar,
                                          None if generators is None else generators[c]))
        return inputs, torch.cat(mus, 1), torch.cat(logvars, 1), torch.cat(zs, 1)

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
        cluster's rows of the global Linear (a column-parallel slice), or D_c's last Linear."""
        if self.global_decoder:
            items = self.items_of(c)
            return self.decoder.weight[items], self.decoder.bias[items]
        last = self.decoders[c][-1]
        return last.weight, last.bias

    def cluster_logits(self, c: int, zhat0: torch.Tensor) -> torch.Tensor:
        """[B, n_c] logits of cluster c's items (local order = ``items_of(c)``)."""
        weight, bias = self.cluster_weight(c)
        return F.linear(self.cluster_hidden(c, zhat0), weight, bias)

    def multinomial_parts(self, hidden: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor, inp: ClusterInput):
        """(picked [B], total [B], lse [B]) of one cluster whose logits are
        hidden [B, h] @ weight[n_c, h].T + bias [n_c]: sum of target * logit over the
        cluster's entries (sparse products with the targets), sum of targets, the logsumexp
        over the cluster's items (``chunked_logsumexp``)."""
        b, n = inp.batch_size, weight.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)   # fp32 under bf16 autocast
        target = torch.sparse_coo_tensor(torch.stack([inp.rows, inp.local]),
                                         inp.target.to(acc), (b, n), device=hidden.device,
                                         is_coalesced=True,        # [B, n_c], row-major
                                         check_invariants=False)
        # sum_i x_bi logit_bi = sum_j (X W)_bj hidden_bj + (X b)_b: sparse products, whose
        # backward is X.T @ grad (no scatter into the [n_c, h] weight row by row); in fp32
        # (CUDA has no bf16 sparse matmul), outside autocast
        with torch.autocast(hidden.device.type, enabled=False):
            picked = (torch.sparse.mm(target, weight.to(acc)) * hidden.to(acc)).sum(1) \
                + torch.sparse.mm(target, bias.to(acc)[:, None]).squeeze(1)
        total = torch.zeros(b, dtype=acc, device=hidden.device).index_add(0, inp.rows,
                                                                         inp.target.to(acc))
        chunk = self.logit_chunk or chunk_items(b, hidden.device, self.chunk_mib)
        return picked, total, chunked_logsumexp(hidden, weight, bias, chunk)

    def multinomial_nll(self, zhat0: torch.Tensor, inputs: list[ClusterInput]) -> torch.Tensor:
        """[B] -sum_i x_i log_softmax(logits)_i over the whole catalogue, cluster by cluster."""
        picked = total = 0
        lses = []
        for c, inp in enumerate(inputs):
            p, t, lse = self.multinomial_parts(self.cluster_hidden(c, zhat0),
                                               *self.cluster_weight(c), inp)
            picked, total = picked + p, total + t
            lses.append(lse)
        return combine_multinomial(picked, total, combine_logsumexp(lses))

    # ------------------------------------------------------------------ Recommender
    def training_loss(self, batch: SparseRows, progress: Progress) -> dict[str, torch.Tensor]:
        device = batch.values.device
        gens = [self.cluster_generator(progress.step, c, device)
                for c in range(self.n_clusters)]
        inputs, mu, logvar, z = self.encode(batch, gens)
        kl = -0.5 * torch.mean(self.kl_sum(mu, logvar))

        t, weights, noise, keep = self.diffusion_draws(batch.batch_size, progress.step, device)
        terms = self.diffusion.training_losses(
            lambda x_t, ts: self.denoiser(x_t, ts, keep), z, t, weights, noise)
        self.sampler.update_with_local_losses(t, terms["raw"].detach())
        diffusion = terms["loss"].mean()
        recon = self.multinomial_nll(terms["pred_xstart"], inputs).mean()

        lamda = lamda_at(self.lcfg, progress.epoch)
        beta = beta_at(self.lcfg, progress.step)
        vae = recon + beta * kl
        # main: ``if args.reweight: loss = lamda * elbo + vae_loss`` (always, type=bool)
        loss = lamda * diffusion + vae if self.reweight else diffusion + lamda * vae
        return {"loss": loss, "diffusion": diffusion.detach(), "recon": recon.detach(),
                "kl": kl.detach(), "lamda": torch.tensor(lamda), "beta": torch.tensor(beta)}

    def _zhat0(self, batch: SparseRows) -> torch.Tensor:
        _, mu, _, _ = self.encode(batch)            # eval: no dropout, z = mu
        return self.diffusion.p_sample(self.denoiser, mu, self.sampling_steps,
                                       self.sampling_noise)

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
        with self._eval_mode():
            zhat0 = self._zhat0(batch)
            if self.global_decoder:
                return {"items": zhat0}
            return {f"cluster{c}": self.cluster_hidden(c, zhat0)
                    for c in range(self.n_clusters)}

    def item_heads(self) -> list[ItemHead]:
        if self.global_decoder:
            return [ItemHead("items", torch.arange(self.n_items, device=self.decoder.weight.device),
                             self.decoder.weight.detach(), self.decoder.bias.detach())]
        heads = []
        for c in range(self.n_clusters):
            last = self.decoders[c][-1]
            heads.append(ItemHead(f"cluster{c}", self.items_of(c), last.weight.detach(),
                                  last.bias.detach()))
        return heads

    @torch.no_grad()
    def score(self, batch: SparseRows) -> torch.Tensor:
        """[B, I] logits in global item order: query @ weight.T + bias per head."""
        queries = self.query(batch)
        heads = self.item_heads()
        if len(heads) == 1 and heads[0].items.numel() == self.n_items and self.global_decoder:
            h = heads[0]
            return queries[h.name] @ h.weight.T + h.bias
        out = torch.empty(batch.batch_size, self.n_items, device=batch.values.device)
        for h in heads:
            out[:, h.items] = queries[h.name] @ h.weight.T + h.bias
        return out

    # ------------------------------------------------------------------ optimiser, counts
    def autoencoder_parameters(self) -> list[nn.Parameter]:
        params = list(self.encoders.parameters())
        params += list(self.decoder.parameters() if self.global_decoder
                       else self.decoders.parameters())
        return params

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Two AdamW groups, as main's optimizer1 / optimizer2: the autoencoder with
        ``ldiffrec.lr_vae`` / ``weight_decay_vae`` (None = lr / weight_decay), the denoiser
        with ``lr`` / ``weight_decay``."""
        lr_vae = self.lcfg.get("lr_vae")
        wd_vae = self.lcfg.get("weight_decay_vae")
        return [
            {"name": "autoencoder", "params": self.autoencoder_parameters(),
             "lr": lr if lr_vae is None else float(lr_vae),
             "weight_decay": weight_decay if wd_vae is None else float(wd_vae)},
            {"name": "denoiser", "params": list(self.denoiser.parameters()),
             "lr": lr, "weight_decay": weight_decay},
        ]

    def parameter_counts(self) -> dict[str, int]:
        count = lambda ps: sum(p.numel() for p in ps)   # noqa: E731
        enc = count(self.encoders.parameters())
        dec = count(self.decoder.parameters() if self.global_decoder
                    else self.decoders.parameters())
        den = count(self.denoiser.parameters())
        return {"encoders": enc, "decoder": dec, "denoiser": den, "total": enc + dec + den}
