"""DiffRec: diffusion directly on the interaction vector x_0 in R^I (Wang et al. 2023).

Training: t, weights ~ step sampler; loss = mean_b weights_b * w_t * ||x_0 - f(x_t, t)||^2 / I.
Scoring: the reverse process from x_0 (noised to ``sampling_steps``). Its result is a fixed
linear combination m x_T + sum_i a_i f_i of its start and the denoiser's outputs
(``GaussianDiffusion.reverse_coefficients``; "x0": the last output f_0 itself). Each f_i is
last_layer(h_i) = h_i W.T + b, so for every item the row does not hold (x_T = 0 there, when
the start is the history itself: sampling_steps 0, no sampling noise) the score is
(sum_i a_i h_i) W.T + (sum_i a_i) b: one retrieval head over all items, whose query is
sum_i a_i h_i and whose bias is (sum_i a_i) b. Held items add ``seen_scale`` m times their
input value.

Inference noise (T' > 0 or ``sampling_noise``) is a deliberate departure from the reference,
which draws it from torch's global RNG, so that re-evaluating one checkpoint gave a new
number each time and model selection on valid was partly chance: each row's noise comes
from a stream keyed by (``seed``, the row's input) (``row_noise.RowNoise``), the same in
``evaluate``, ``recommend`` and the exported query tower, for any batch size. Its
distribution is the reference's; only the draws are fixed.
"""
from __future__ import annotations

import torch

from ..data.csr import SparseRows
from ..schema import Config
from .diffusion import GaussianDiffusion
from .row_noise import RowNoise
from .samplers import build_sampler
from .base import ItemHead, Progress, Recommender
from .denoiser import Denoiser


class DiffRec(Recommender):
    def __init__(self, n_items: int, diffusion: GaussianDiffusion, sampler, denoiser: Denoiser,
                 sampling_steps: int = 0, sampling_noise: bool = False, seed: int = 0):
        """``seed`` keys the inference noise (module docstring)."""
        super().__init__()
        self.n_items, self.diffusion = n_items, diffusion
        self.sampler, self.denoiser = sampler, denoiser
        self.sampling_steps, self.sampling_noise = sampling_steps, sampling_noise
        self.seed = int(seed)

    @classmethod
    def from_config(cls, cfg: Config, n_items: int) -> "DiffRec":
        """Reference main.py: out_dims = dims + [I], in_dims = out_dims reversed."""
        d = cfg.diffusion
        out_dims = list(cfg.denoiser.dims) + [n_items]
        denoiser = Denoiser.from_config(cfg.denoiser, out_dims[::-1], out_dims)
        return cls(n_items, GaussianDiffusion.from_config(d), build_sampler(d), denoiser,
                   d.sampling_steps, d.sampling_noise, cfg.seed)

    def training_loss(self, batch: SparseRows, progress: Progress) -> dict[str, torch.Tensor]:
        x0 = batch.dense()                                   # [B, I]: the noise is dense
        t, weights = self.sampler.sample(x0.shape[0], x0.device)
        terms = self.diffusion.training_losses(self.denoiser, x0, t, weights)
        self.sampler.update_with_local_losses(t, terms["raw"])
        return {"loss": terms["loss"].mean()}

    def _hiddens(self, batch: SparseRows) -> list[torch.Tensor]:
        """[B, d] inputs of the last layer at every reverse step, in step order T-1 .. 0."""
        hiddens = []
        hook = self.denoiser.last_layer.register_forward_pre_hook(
            lambda module, args: hiddens.append(args[0]))
        try:
            self._reverse(batch)
        finally:
            hook.remove()
        return hiddens

    def _reverse(self, batch: SparseRows) -> torch.Tensor:
        """[B, I] the reverse process from the rows, with their keyed noise."""
        return self.diffusion.p_sample(self.denoiser, batch.dense(), self.sampling_steps,
                                       self.sampling_noise, RowNoise(self.seed, batch))

    @torch.no_grad()
    def score(self, batch: SparseRows) -> torch.Tensor:
        return self._reverse(batch)

    @torch.no_grad()
    def query(self, batch: SparseRows) -> dict[str, torch.Tensor]:
        """sum_i a[i] h_i over the reverse steps (``GaussianDiffusion.reverse_coefficients``):
        the score of every item the row does not hold is linear in the last layer."""
        _, a = self.diffusion.reverse_coefficients()
        hiddens = self._hiddens(batch)[::-1]                 # step order 0 .. T-1
        used = [i for i in range(len(hiddens)) if a[i] != 0]
        return {"items": sum(float(a[i]) * hiddens[i] for i in used)}

    @property
    def seen_scale(self) -> float:
        return self.diffusion.reverse_coefficients()[0]

    def export_error(self) -> str | None:
        m = self.seen_scale
        if m != 0 and (self.sampling_steps > 0 or self.sampling_noise):
            return (f"DiffRec with diffusion.mean_type={self.diffusion.mean_type} and "
                    f"diffusion.sampling_steps={self.sampling_steps}, sampling_noise="
                    f"{str(self.sampling_noise).lower()} scores items by the noised input "
                    f"plus the last layer, which is not a linear head of item vectors; "
                    f"export needs diffusion.sampling_steps=0 and sampling_noise=false")
        return None

    def item_heads(self) -> list[ItemHead]:
        """The last layer (W, b) as one head; for "eps" the bias is scaled by sum_i a[i]."""
        last = self.denoiser.last_layer
        scale = float(self.diffusion.reverse_coefficients()[1].sum())
        return [ItemHead("items", torch.arange(self.n_items, device=last.weight.device),
                         last.weight.detach(), last.bias.detach() * scale)]
