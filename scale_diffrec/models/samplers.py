"""Diffusion-step samplers: uniform, importance sampling by the loss second moment, and
DiffuRec's fixed two-level weights.

All return (t [B], weights [B]) with weights = 1 / (T p_t), so that
E_t[weights * loss_t] = mean_t loss_t: the importance-sampled loss stays unbiased.

LossSecondMomentResampler (Nichol & Dhariwal 2021; DiffRec's only sampler): keeps the last
``history_per_step`` losses seen at each step t; until every t has that many it samples
uniformly, then p_t ∝ sqrt(E[L_t^2]) mixed with a ``uniform_prob`` share of uniform.
Distributed: ``update_with_local_losses`` all-gathers every rank's (t, loss) pairs and
records them in rank order, so all ranks hold identical histories and sample identically.

FixSampler (DiffuRec src/step_sample.py ``FixSampler``): p_t ∝ 1 for the first half of the
steps and 0.5 for the rest. ``named_sampler`` builds the three by DiffuRec's names.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..choices import DiffuRecSampler, StepSampler
from ..schema import DiffusionConfig


class UniformSampler(nn.Module):
    def __init__(self, steps: int):
        super().__init__()
        self.steps = steps

    def probabilities(self) -> torch.Tensor:
        return torch.full((self.steps,), 1.0 / self.steps, dtype=torch.float64, device="cpu")

    def sample(self, batch_size: int, device=None,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """t ~ p [B] (long) and weights 1 / (T p_t) [B] (float32); drawn on the CPU (with
        a CPU ``generator``), then moved to ``device``."""
        p = self.probabilities().cpu()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.steps * p[t])
        return t.to(device), weights.float().to(device)

    def update_with_local_losses(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Uniform sampling keeps no history."""


class LossSecondMomentResampler(UniformSampler):
    def __init__(self, steps: int, history_per_step: int = 10, uniform_prob: float = 0.001):
        super().__init__(steps)
        self.history_per_step, self.uniform_prob = history_per_step, uniform_prob
        self.register_buffer("loss_history", torch.zeros(steps, history_per_step,
                                                         dtype=torch.float64))
        self.register_buffer("loss_counts", torch.zeros(steps, dtype=torch.long))

    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history_per_step).all())

    def probabilities(self) -> torch.Tensor:
        """[T] float64: uniform before warm-up, else (1-u) sqrt(E L_t^2)/sum + u/T."""
        if not self.warmed_up():
            return super().probabilities()
        rms = self.loss_history.pow(2).mean(dim=-1).sqrt()
        p = rms / rms.sum()
        return p * (1 - self.uniform_prob) + self.uniform_prob / self.steps

    def update_with_all_losses(self, ts: list[int], losses: list[float]) -> None:
        """Record each (t, loss) in order; a full history drops its oldest loss (FIFO).

        Per step t: history_t <- the last H of (history_t ++ the new losses of t, in order).
        """
        ts, losses = np.asarray(ts, dtype=np.int64), np.asarray(losses, dtype=np.float64)
        history = self.loss_history.cpu().numpy()     # a view on CPU, a copy on GPU
        counts = self.loss_counts.cpu().numpy()
        for t in np.unique(ts):
            seq = np.concatenate([history[t, :counts[t]], losses[ts == t]])
            seq = seq[-self.history_per_step:]
            history[t, :len(seq)] = seq
            counts[t] = len(seq)
        if self.loss_history.device.type != "cpu":
            self.loss_history.copy_(torch.from_numpy(history))
            self.loss_counts.copy_(torch.from_numpy(counts))

    def update_with_local_losses(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Gather (t, loss) pairs of every rank (unequal batch sizes allowed), then record."""
        pairs = torch.stack([t.detach().double().cpu(), losses.detach().double().cpu()], dim=1)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            pairs = _all_gather_rows(pairs)
        self.update_with_all_losses(pairs[:, 0].long().tolist(), pairs[:, 1].tolist())


class FixSampler(UniformSampler):
    """DiffuRec's "fixstep": fixed weights w_t = 1 for t < T // 2, 0.5 for t >= T // 2,
    p_t = w_t / sum(w) (src/step_sample.py ``FixSampler``). For odd T the official array
    has only T - 1 entries (it never draws step T - 1); here every step has its weight."""

    def probabilities(self) -> torch.Tensor:
        """[T] float64."""
        w = torch.full((self.steps,), 0.5, dtype=torch.float64)
        w[: self.steps // 2] = 1.0
        return w / w.sum()


def _all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's [n_r, k] rows in rank order (n_r may differ)."""
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    world = dist.get_world_size()
    count = torch.tensor([rows.shape[0]], device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    padded = torch.zeros(longest, rows.shape[1], dtype=rows.dtype, device=device)
    padded[: rows.shape[0]] = rows.to(device)
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(c.item())] for g, c in zip(gathered, counts)]).cpu()


def build_sampler(dcfg: DiffusionConfig) -> UniformSampler:
    """The ``diffusion`` section's ``sampler``: importance (LossSecondMomentResampler, the
    reference's choice) or uniform."""
    if dcfg.sampler == StepSampler.importance:
        return LossSecondMomentResampler(dcfg.steps, dcfg.history_per_step, dcfg.uniform_prob)
    return UniformSampler(dcfg.steps)


def named_sampler(name: str, steps: int) -> UniformSampler:
    """A step sampler by DiffuRec's name (src/step_sample.py
    ``create_named_schedule_sampler``): uniform, lossaware (LossSecondMomentResampler with
    its defaults, history 10, uniform share 0.001) or fixstep. Errors: ValueError for
    another name."""
    name = DiffuRecSampler(name)
    if name == DiffuRecSampler.lossaware:
        return LossSecondMomentResampler(steps)
    return FixSampler(steps) if name == DiffuRecSampler.fixstep else UniformSampler(steps)
