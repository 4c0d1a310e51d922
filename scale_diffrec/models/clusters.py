"""L-DiffRec's per-cluster parts: widths, sparse encoders, decoders, keyed init, batch inputs.

Reference semantics, from the authors' code (github.com/YiyanXu/DiffRec). ``AE`` below is
``models/Autoencoder.py`` (``class AutoEncoder``; the same file in L-DiffRec/ and
LT-DiffRec/), ``main`` is ``L-DiffRec/main.py``. The model that uses these parts, its loss
and its inference: ``models/ldiffrec.py``.

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
    always on there). ``ldiffrec.reparam: false`` is the reference AE's ``reparam=False``
    branch (z_c = mu_c in training too, the KL term kept): with a warm start, whose mu
    has rms ~0.45 while the tanh floors std at ~0.61, the sampled z is mostly noise. KL = -0.5 * mean_b sum_j (1 + logvar - mu^2 - exp(logvar)) over the whole
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
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..choices import Activation, ReconTarget
from ..data.csr import SparseRows
from ..embeddings import als_warm_start
from ..errors import ConfigError

ACTIVATIONS = {Activation.tanh: nn.Tanh, Activation.relu: nn.ReLU,
               Activation.sigmoid: nn.Sigmoid, Activation.leaky_relu: nn.LeakyReLU}


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


def decoder_dims(cluster_dims: list[int], size: int, out_dims: list[int],
                 n_clusters: int) -> list[int]:
    """Widths of D_c through its logits over the cluster's ``size`` items (AE.__init__):
    for C > 1 the mirror of E_c (l_c ... w1_c -> n_c; the values of out_dims are unused),
    for C == 1 [d] + out_dims + [n_items]."""
    if n_clusters == 1:
        return [cluster_dims[-1]] + [int(d) for d in out_dims] + [size]
    return cluster_dims[::-1] + [size]


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
    """``factory(*args)`` with uninitialised storage (built on the meta device), on the CPU
    unless the default device is ``meta`` (the memory model counts parts without memory)."""
    with torch.device("meta"):
        module = factory(*args)
    target = torch.get_default_device()
    return module if target.type == "meta" else module.to_empty(device="cpu")


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


def mlp(dims: list[int], act: str) -> nn.Sequential:
    """Linear layers through ``dims`` with act between them (none after the last)."""
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(d_in, d_out), ACTIVATIONS[act]()]
    return nn.Sequential(*layers[:-1])


class CatalogueLinear(nn.Module):
    """The global linear decoder's rows of the items ``items`` [n] (ascending item indexes):
    weight [n, d], bias [n]; ``forward(z)`` [B, d] -> [B, n] logits. Holding every item it
    is ``nn.Linear(d, n_items)`` (same parameter names, shapes and values); on a worker it
    is that Linear's row shard (TorchRec's row-wise sharding keeps the names too).
    ``bias=False``: no bias (``bias`` is None; DiffuRec's item table, ``models/diffurec.py``)."""

    def __init__(self, items: torch.Tensor, latent: int, bias: bool = True):
        super().__init__()
        self.register_buffer("items", items, persistent=False)
        self.weight = nn.Parameter(torch.empty(len(items), latent))
        self.bias = nn.Parameter(torch.empty(len(items))) if bias else None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.linear(z, self.weight, self.bias)


class ClusterParts(nn.ModuleDict):
    """Modules keyed by cluster id (state-dict names ``{c}.*``, as an ``nn.ModuleList`` over
    all clusters names them); indexed by the int cluster id, iterated over the modules."""

    def __getitem__(self, c) -> nn.Module:
        return super().__getitem__(str(c))

    def __iter__(self):
        return iter(self.values())

    def clusters(self) -> list[int]:
        return [int(c) for c in self.keys()]


@dataclass
class WarmFactors:
    """A cluster's warm start: the mu half of E_c's first layer and the decoder's item
    rows, each [n_c, l_c] (``LDiffRec.warm_factors``)."""
    encoder: torch.Tensor
    decoder: torch.Tensor


class PerCluster:
    """The per-cluster half of ``LDiffRec`` (a mixin: the model's ``partition``, ``lcfg``,
    ``seed``, ``cluster_dims``, ``latent_*``, ``clusters`` and lookup buffers): each
    cluster's parts built from its keyed streams, and a batch encoded cluster by cluster."""

    def items_of(self, c: int) -> torch.Tensor:
        return getattr(self, f"items_{c}")

    def new_encoder(self, c: int, factors: WarmFactors | None = None) -> ClusterEncoder:
        """E_c, initialised from the (seed, "encoder", c) stream; with ``factors`` (from
        ``warm_factors``) the mu half of its first layer is then the fold-in map and the
        logvar half starts at its floor (zero weights, bias -3: logvar = tanh(-3) ~ -1, the
        least reparameterisation noise the tanh allows, std ~0.61 against mu's ~0.45)."""
        size = int(self.partition.sizes[c])
        enc = unallocated(ClusterEncoder, size, self.cluster_dims[c], self.lcfg.act)
        enc = keyed_xavier_(enc, stream_key("init", self.seed, "encoder", c))
        if factors is not None:       # mu: the fold-in; logvar: its floor, tanh(-3) ~ -1
            with torch.no_grad():
                enc.first.weight[:, :enc.latent] = factors.encoder
                enc.first.weight[:, enc.latent:] = 0.0
                enc.first_bias[enc.latent:] = -3.0
        return enc

    def new_decoder(self, c: int, factors: WarmFactors | None = None) -> nn.Module:
        """Cluster c's decoder part, initialised from the (seed, "decoder", c) stream: D_c
        (``clusters.decoder_dims``), or its rows of the global Linear (a
        ``CatalogueLinear`` over ``items_of(c)``, keeping the whole Linear's xavier std
        sqrt(2 / (d + I))). With ``factors`` the item rows are the item factors (the global
        decoder's rows: on the cluster's latent slice, zero elsewhere)."""
        size, key = int(self.partition.sizes[c]), stream_key("init", self.seed, "decoder", c)
        if self.global_decoder:
            rows = unallocated(CatalogueLinear, self.items_of(c), self.latent_size)
            rows.items = self.items_of(c)
            g = torch.Generator().manual_seed(key)
            std = (2.0 / (self.latent_size + self.n_items)) ** 0.5   # the whole Linear's
            with torch.no_grad():
                rows.weight.normal_(0.0, std, generator=g)
                rows.bias.zero_()
                if factors is not None:
                    rows.weight.zero_()
                    rows.weight[:, self.latent_slice(c)] = factors.decoder
            return rows
        dims = decoder_dims(self.cluster_dims[c], size, self.lcfg.out_dims, self.n_clusters)
        dec = keyed_xavier_(unallocated(mlp, dims, self.lcfg.act), key)
        if factors is not None:
            with torch.no_grad():
                dec[-1].weight.copy_(factors.decoder)
        return dec

    def warm_factors(self, c: int) -> WarmFactors | None:
        """Cluster c's warm start (``ldiffrec.warm_start: als``; ``embeddings.als_warm_start``
        on cluster c's columns of the train matrix, rank l_c, so a worker fits only its own
        clusters and W workers start where one process starts), or None: the paper's
        initialisation (``warm_start: none``, or no train matrix given).

        Not in the reference (an option, off by default): NCF's pre-training (He et al.
        WWW 2017, section 3.4.1), for catalogues too sparse for the Xavier start (Epinions:
        ~2 train interactions per item)."""
        if self.warm_train is None:
            return None
        lcfg = self.lcfg
        encoder, decoder = als_warm_start(
            self.partition.cluster_columns(self.warm_train, c), self.latent_sizes[c],
            lcfg.als_reg, lcfg.als_alpha, lcfg.als_iters,
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

    # ------------------------------------------------------------------ encoder side
    def _make_input(self, rows, local, values, batch_size, generator) -> ClusterInput:
        counts = torch.bincount(rows, minlength=batch_size)
        offsets = torch.cumsum(counts, 0) - counts
        target = values
        if self.training and self.dropout > 0 and values.numel():
            keep = torch.rand(values.shape, generator=generator, device=values.device,
                              dtype=values.dtype) >= self.dropout
            values = values * keep / (1.0 - self.dropout)
            if self.lcfg.recon_target == ReconTarget.dropped:
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
        """The entries of each owned cluster (``clusters`` order; one stable sort by
        cluster), the same as ``cluster_input``; ``generators`` in the same order."""
        cl = self.cluster_of[batch.indices]
        order = torch.argsort(cl, stable=True)
        counts = torch.bincount(cl, minlength=self.n_clusters).tolist()
        rows = batch.row_ids()[order].split(counts)
        idx = batch.indices[order].split(counts)
        vals = batch.values[order].split(counts)
        return [self._make_input(rows[c], self.local_of[idx[c]], vals[c], batch.batch_size,
                                 None if generators is None else generators[i])
                for i, c in enumerate(self.clusters)]

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
        """mu + eps * exp(logvar / 2) in training, mu in eval or with ``reparam: false``
        (AE.Encode)."""
        if not self.training or not self.lcfg.reparam:
            return mu
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + eps * torch.exp(0.5 * logvar)

    @staticmethod
    def kl_sum(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """[B] sum over latent dims of (1 + logvar - mu^2 - exp(logvar)); the KL term is
        -0.5 * mean_b of its sum over clusters."""
        return torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)

    def encode(self, batch: SparseRows, generators: list | None = None):
        """(inputs per owned cluster, mu, logvar, z), each [B, d_r] over the owned
        clusters' latent columns (d_r = d in one process)."""
        inputs = self.cluster_inputs(batch, generators)
        mus, logvars, zs = [], [], []
        for i, (c, inp) in enumerate(zip(self.clusters, inputs)):
            mu, logvar = self.encode_input(c, inp)
            mus.append(mu)
            logvars.append(logvar)
            zs.append(self.reparameterize(mu, logvar,
                                          None if generators is None else generators[i]))
        return inputs, torch.cat(mus, 1), torch.cat(logvars, 1), torch.cat(zs, 1)


__all__ = ["latent_dims", "decoder_dims", "stream_key", "keyed_xavier_", "unallocated",
           "ClusterInput", "ClusterEncoder", "mlp", "CatalogueLinear", "ClusterParts",
           "WarmFactors", "PerCluster", "ACTIVATIONS"]
