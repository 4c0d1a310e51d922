"""DiffuRec's approximator: the Transformer that predicts the target item's x_0 from the
sequence and the noised target (Li, Sun & Li, TOIS 2023, section 4.2; official
src/diffurec.py ``Diffu_xstart``, ``Transformer_rep``, ``TransformerBlock``,
``MultiHeadedAttention``, ``PositionwiseFeedForward``, ``SublayerConnection``).

    e_t   = MLP(sinusoid(t_model, d))          d -> 4d, SiLU, 4d -> d    (time embedding)
    lam   ~ N(lambda, lambda^2) element-wise, [B, L, d], drawn per call ("lambda_uncertainty")
    h     = blocks(seq + lam * (x_t + e_t)[:, None, :], mask)             [B, L, d]
    x0hat = LayerNorm(dropout(h))[:, -1]                                  [B, d]

Each block is pre-LN: h = h + drop(attn(LN(h))); h = h + drop(FFN(LN(h))); h = drop(h).
FFN = Linear(d, 4d), GELU (tanh form), dropout, Linear(4d, d). Attention: 4 heads, softmax
dropout; the released mask blanks the QUERY rows of padded positions (a padded position
attends uniformly; keys are not masked), kept here as released. LayerNorm eps 1e-12 (the
code's TF-style LayerNorm == ``nn.LayerNorm(d, eps=1e-12)``). Initialisation as released:
torch defaults, then xavier-normal FFN weights and attention output weight. The released
class also builds four Linear layers its forward never uses (linear_item, linear_xt,
linear_t, fuse_linear); they are left out (no effect but the parameter count).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-12


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[B] float timesteps -> [B, dim] [cos(t f), sin(t f)] with f_j = max_period^(-j/half)
    (official ``Diffu_xstart.timestep_embedding``; a zero column pads an odd dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class Block(nn.Module):
    """One pre-LN Transformer block (module docstring); [B, L, d] -> [B, L, d]."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(3)])
        self.out = nn.Linear(hidden, hidden)
        self.ffn_in, self.ffn_out = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)
        self.norm_attn = nn.LayerNorm(hidden, eps=LN_EPS)
        self.norm_ffn = nn.LayerNorm(hidden, eps=LN_EPS)
        self.drop = nn.Dropout(dropout)
        for w in (self.out.weight, self.ffn_in.weight, self.ffn_out.weight):
            nn.init.xavier_normal_(w)

    def attention(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention; mask [B, L] (1 = item, 0 = padding) blanks the padded
        query rows with -1e9 before the softmax, as released."""
        b, n, d = h.shape
        q, k, v = (lin(h).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for lin in self.qkv)
        corr = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)      # [B, heads, L, L]
        corr = corr.masked_fill(mask[:, None, :, None] == 0, -1e9)
        att = self.drop(torch.softmax(corr, dim=-1)) @ v
        return self.out(att.transpose(1, 2).reshape(b, n, d))

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = h + self.drop(self.attention(self.norm_attn(h), mask))
        ffn = self.ffn_out(self.drop(F.gelu(self.ffn_in(self.norm_ffn(h)), approximate="tanh")))
        return self.drop(h + self.drop(ffn))


class Approximator(nn.Module):
    """f(seq, x_t, t) -> x0hat [B, d] (module docstring)."""

    def __init__(self, hidden: int, blocks: int, heads: int, dropout: float,
                 lambda_uncertainty: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not a multiple of {heads} heads")
        self.hidden, self.lambda_uncertainty = hidden, float(lambda_uncertainty)
        self.time_embed = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.SiLU(),
                                        nn.Linear(4 * hidden, hidden))
        self.blocks = nn.ModuleList([Block(hidden, heads, dropout) for _ in range(blocks)])
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden, eps=LN_EPS)

    def forward(self, seq: torch.Tensor, mask: torch.Tensor, x_t: torch.Tensor,
                t_model: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """seq [B, L, d] (embedded, dropped out, normalised), mask [B, L], x_t [B, d],
        t_model [B] float (the rescaled timestep, ``respace.model_timesteps``), lam
        [B, L, d] (``draw_lambda``) -> x0hat [B, d]."""
        x = x_t + self.time_embed(timestep_embedding(t_model, self.hidden))
        h = seq + lam * x[:, None, :]
        for block in self.blocks:
            h = block(h, mask)
        return self.norm(self.drop(h))[:, -1]

    def draw_lambda(self, shape, generator: torch.Generator | None = None,
                    device=None) -> torch.Tensor:
        """[*shape] float32 ~ N(lambda, lambda^2) element-wise, on ``device`` (default: the
        CPU; ``generator`` on that device, None: the global RNG)."""
        return self.lambda_from(torch.randn(shape, generator=generator, device=device))

    def lambda_from(self, noise: torch.Tensor) -> torch.Tensor:
        """lambda + lambda * noise: ``draw_lambda`` of given standard normal ``noise``."""
        lam = self.lambda_uncertainty
        return lam + lam * noise
