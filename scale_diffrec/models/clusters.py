"""L-DiffRec's per-cluster parts: latent widths, sparse encoders, decoders, keyed init.

Sources (``AE`` = ``models/Autoencoder.py`` of github.com/YiyanXu/DiffRec, L-DiffRec/):

* ``latent_dims``: AE.__init__'s widths per cluster (truncation, the last cluster takes the
  remainder); ``in_dims`` in the reference's flag order (latent first, reversed before use).
* ``ClusterEncoder``: E_c, Linear(n_c -> w1) act ... Linear(-> 2 l_c) act, with the first
  layer reading the sparse batch (EmbeddingBag sum with per-sample weights + bias == Linear
  on the dense column slice); mu_c, logvar_c = the two halves (AE.Encode).
* ``decoder_dims``: D_c's widths (AE.__init__: the mirror of E_c for C > 1; for C == 1
  ``[d] + out_dims + [n_items]``); ``mlp`` builds them with act between layers.
* ``CatalogueLinear``: the global linear decoder (``out_dims == []``, the released
  checkpoints' form) restricted to the items a worker owns: a row-sharded
  Linear(d -> I), rows in ascending item order (all items in one process: ``nn.Linear``).
* ``keyed_xavier_``: AE ``xavier_normal_initialization`` drawn from a stream keyed by
  (seed, part, cluster), so that a worker building only its clusters gets the values one
  process gets (``stream_key``).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..choices import Activation
from ..data.errors import ConfigError

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
    is that Linear's row shard (TorchRec's row-wise sharding keeps the names too)."""

    def __init__(self, items: torch.Tensor, latent: int):
        super().__init__()
        self.register_buffer("items", items, persistent=False)
        self.weight = nn.Parameter(torch.empty(len(items), latent))
        self.bias = nn.Parameter(torch.empty(len(items)))

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


__all__ = ["latent_dims", "decoder_dims", "stream_key", "keyed_xavier_", "unallocated",
           "ClusterInput", "ClusterEncoder", "mlp", "CatalogueLinear", "ClusterParts",
           "WarmFactors", "ACTIVATIONS"]
