"""DiffRec: diffusion directly on the interaction vector x_0 in R^I (Wang et al. 2023).

Training: t, weights ~ step sampler; loss = mean_b weights_b * w_t * ||x_0 - f(x_t, t)||^2 / I.
Scoring: the reverse process from x_0 (noised to ``sampling_steps``), whose final step
returns f(x_1', 0) = last_layer(hidden): one retrieval head over all items.
"""
from __future__ import annotations

import torch

from ..data.csr import SparseRows
from ..diffusion import GaussianDiffusion
from ..samplers import build_sampler
from .base import ItemHead, Progress, Recommender
from .denoiser import Denoiser


class DiffRec(Recommender):
    def __init__(self, n_items: int, diffusion: GaussianDiffusion, sampler, denoiser: Denoiser,
                 sampling_steps: int = 0, sampling_noise: bool = False):
        super().__init__()
        self.n_items, self.diffusion = n_items, diffusion
        self.sampler, self.denoiser = sampler, denoiser
        self.sampling_steps, self.sampling_noise = sampling_steps, sampling_noise

    @classmethod
    def from_config(cls, cfg: dict, n_items: int) -> "DiffRec":
        """Reference main.py: out_dims = dims + [I], in_dims = out_dims reversed."""
        d, n = cfg["diffusion"], cfg["denoiser"]
        out_dims = list(n["dims"]) + [n_items]
        denoiser = Denoiser(out_dims[::-1], out_dims, n["emb_size"], n["norm"], n["dropout"])
        return cls(n_items, GaussianDiffusion.from_config(d), build_sampler(d), denoiser,
                   d["sampling_steps"], d["sampling_noise"])

    def training_loss(self, batch: SparseRows, progress: Progress) -> dict[str, torch.Tensor]:
        x0 = batch.dense()                                   # [B, I]: the noise is dense
        t, weights = self.sampler.sample(x0.shape[0], x0.device)
        terms = self.diffusion.training_losses(self.denoiser, x0, t, weights)
        self.sampler.update_with_local_losses(t, terms["raw"])
        return {"loss": terms["loss"].mean()}

    def _final_hidden(self, batch: SparseRows) -> torch.Tensor:
        """[B, d]: hidden of the last reverse step, whose last layer gives the scores."""
        last_input = {}

        def remember(module, args):
            last_input["h"] = args[0]
        hook = self.denoiser.last_layer.register_forward_pre_hook(remember)
        try:
            self.diffusion.p_sample(self.denoiser, batch.dense(), self.sampling_steps,
                                    self.sampling_noise)
        finally:
            hook.remove()
        return last_input["h"]

    @torch.no_grad()
    def score(self, batch: SparseRows) -> torch.Tensor:
        return self.diffusion.p_sample(self.denoiser, batch.dense(), self.sampling_steps,
                                       self.sampling_noise)

    @torch.no_grad()
    def query(self, batch: SparseRows) -> dict[str, torch.Tensor]:
        return {"items": self._final_hidden(batch)}

    def item_heads(self) -> list[ItemHead]:
        last = self.denoiser.last_layer
        return [ItemHead("items", torch.arange(self.n_items, device=last.weight.device),
                         last.weight.detach(), last.bias.detach())]
