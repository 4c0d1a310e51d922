"""Mult-VAE (Liang et al., WWW 2018), the paper's baseline.

    x~ = dropout(x / ||x||)                      sparse [B, I]
    mu, logvar = split(q(x~))                    q: I -> ... -> 2 d, tanh between layers
    z = mu + eps * exp(logvar / 2)  (train; z = mu at eval)
    logits = p(z)                                p: d -> ... -> I, tanh between layers
    loss = -mean_b sum_i x_bi log softmax(logits_b)_i + beta * KL,  beta = min(cap, step / N)

The first encoder layer reads the sparse rows (EmbeddingBag), so the input is never dense.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.csr import SparseRows
from ..schema import Config
from .base import ItemHead, Progress, Recommender


class SparseLinear(nn.Module):
    """Linear(n_in -> n_out) applied to sparse rows: EmbeddingBag(sum) + bias."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.bag = nn.EmbeddingBag(n_in, n_out, mode="sum")
        self.bias = nn.Parameter(torch.zeros(n_out))
        nn.init.xavier_normal_(self.bag.weight)
        nn.init.normal_(self.bias, 0.0, 0.001)

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor,
                values: torch.Tensor) -> torch.Tensor:
        return self.bag(indices, offsets, per_sample_weights=values) + self.bias


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """mean_b of KL(N(mu, e^logvar) || N(0, I)) = -1/2 sum_d (1 + logvar - mu^2 - e^logvar)."""
    return -0.5 * torch.mean(torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1))


class MultVAE(Recommender):
    def __init__(self, n_items: int, dims: list[int], dropout: float = 0.5,
                 anneal_cap: float = 0.2, total_anneal_steps: int = 200000):
        super().__init__()
        p_dims = list(dims) + [n_items]                  # [d, ..., I]
        q_dims = p_dims[::-1]                            # [I, ..., d]
        self.n_items, self.latent = n_items, p_dims[0]
        self.anneal_cap, self.total_anneal_steps = anneal_cap, total_anneal_steps
        self.first = SparseLinear(n_items, q_dims[1] if len(q_dims) > 2 else 2 * self.latent)
        widths = q_dims[1:-1] + [2 * self.latent]
        self.q_rest = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.p_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(p_dims[:-1], p_dims[1:]))
        self.drop = nn.Dropout(dropout)
        for layer in [*self.q_rest, *self.p_layers]:
            nn.init.xavier_normal_(layer.weight)
            nn.init.normal_(layer.bias, 0.0, 0.001)

    @classmethod
    def from_config(cls, cfg: Config, n_items: int) -> "MultVAE":
        m = cfg.multvae                                    # ranges: schema.MultVAEConfig
        return cls(n_items, m.dims, m.dropout, m.anneal_cap, m.total_anneal_steps)

    def encode(self, batch: SparseRows) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse rows [B, I] -> mu, logvar [B, d]."""
        rows = batch.row_ids()
        norms = torch.zeros(batch.batch_size, device=batch.values.device)
        norms.index_add_(0, rows, batch.values ** 2)
        values = batch.values / norms.sqrt().clamp_min(1e-12)[rows]
        values = self.drop(values)
        h = self.first(batch.indices, batch.indptr[:-1], values)
        for layer in self.q_rest:
            h = layer(torch.tanh(h))
        return h[:, : self.latent], h[:, self.latent:]

    def hidden(self, z: torch.Tensor) -> torch.Tensor:
        """[B, d] -> input of the last decoder layer."""
        for layer in self.p_layers[:-1]:
            z = torch.tanh(layer(z))
        return z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.p_layers[-1](self.hidden(z))

    def beta(self, step: int) -> float:
        if self.total_anneal_steps <= 0:
            return self.anneal_cap
        return min(self.anneal_cap, step / self.total_anneal_steps)

    def training_loss(self, batch: SparseRows, progress: Progress) -> dict[str, torch.Tensor]:
        mu, logvar = self.encode(batch)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        log_probs = F.log_softmax(self.decode(z), dim=1)
        nll = -log_probs[batch.row_ids(), batch.indices].mul(batch.values).sum() / batch.batch_size
        kl = kl_divergence(mu, logvar)
        return {"loss": nll + self.beta(progress.step) * kl, "nll": nll.detach(), "kl": kl.detach()}

    @torch.no_grad()
    def score(self, batch: SparseRows) -> torch.Tensor:
        return self.decode(self.encode(batch)[0])

    @torch.no_grad()
    def query(self, batch: SparseRows) -> dict[str, torch.Tensor]:
        return {"items": self.hidden(self.encode(batch)[0])}

    def item_heads(self) -> list[ItemHead]:
        last = self.p_layers[-1]
        return [ItemHead("items", torch.arange(self.n_items, device=last.weight.device),
                         last.weight.detach(), last.bias.detach())]
