"""Gaussian diffusion over interaction vectors (DiffRec) or latents (L-DiffRec).

Forward process, T steps, alpha_bar_t = prod_{s<=t} (1 - beta_s):

    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)

The denoiser f(x_t, t) predicts x_0 ("x0", DiffRec's choice) or the noise ("eps"). Training
loss per sample: w_t * mean_d (target - f(x_t, t))^2, with the SNR weight
w_t = SNR(t-1) - SNR(t) (1 at t = 0) when ``reweight``, and divided by T p_t when t is
importance-sampled (the sampler's ``weights``). Inference: noise x_0 to step T' =
``sampling_steps`` (T' = 0: no noise), then run the reverse process over all T steps by
posterior means, as the DiffRec reference's ``p_sample`` does (its noise from a source the
caller chooses: the models key it by each row's input, ``row_noise``).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..choices import MeanType, Schedule
from ..schedules import make_betas
from ..schema import DiffusionConfig


def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] as [B, 1, ...] broadcastable against ``like`` [B, ...], in like's dtype."""
    out = values.to(like.device)[t].to(like.dtype)
    return out.reshape(-1, *([1] * (like.dim() - 1)))


class GaussianDiffusion:
    def __init__(self, steps: int, schedule: Schedule | str = Schedule.linear_var,
                 noise_scale: float = 0.005, noise_min: float = 0.005,
                 noise_max: float = 0.01, mean_type: MeanType | str = MeanType.x0,
                 reweight: bool = True):
        """Arguments as the ``diffusion`` config section (ranges and cross-key rules:
        ``schema.DiffusionConfig``); ``schedule`` and ``mean_type`` are ``choices`` members
        or their values (ValueError for another value); ``mean_type`` is kept as a member."""
        self.steps, self.mean_type, self.reweight = steps, MeanType(mean_type), reweight
        self.noise_scale = noise_scale
        self._tables(make_betas(schedule, steps, noise_scale, noise_min, noise_max))

    @classmethod
    def from_betas(cls, betas: np.ndarray) -> "GaussianDiffusion":
        """The x0-predicting process of the given betas [T] (DiffuRec's named and respaced
        schedules, ``schedules.named_betas`` / ``respace.respaced_betas``); no reweight."""
        process = cls.__new__(cls)
        process.steps, process.mean_type, process.reweight = len(betas), MeanType.x0, False
        process.noise_scale = 1.0
        process._tables(np.asarray(betas, dtype=np.float64))
        return process

    def _tables(self, betas: np.ndarray) -> None:
        """The per-step coefficients of betas [T] (float64 tensors)."""
        alphas = 1.0 - betas
        alpha_bar = np.cumprod(alphas)
        alpha_bar_prev = np.append(1.0, alpha_bar[:-1])
        posterior_var = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        as_t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))  # noqa: E731
        self.betas = as_t(betas)
        self.alpha_bar = as_t(alpha_bar)
        self.alpha_bar_prev = as_t(alpha_bar_prev)
        self.posterior_variance = as_t(posterior_var)
        self.posterior_log_variance = as_t(np.log(np.append(posterior_var[1:2], posterior_var[1:])))
        self.posterior_coef_x0 = as_t(betas * np.sqrt(alpha_bar_prev) / (1.0 - alpha_bar))
        self.posterior_coef_xt = as_t((1.0 - alpha_bar_prev) * np.sqrt(alphas) / (1.0 - alpha_bar))

    @classmethod
    def from_config(cls, dcfg: DiffusionConfig) -> "GaussianDiffusion":
        """The process of the ``diffusion`` section (``config.typed(cfg).diffusion``)."""
        return cls(steps=dcfg.steps, schedule=dcfg.schedule, noise_scale=dcfg.noise_scale,
                   noise_min=dcfg.noise_min, noise_max=dcfg.noise_max,
                   mean_type=dcfg.mean_type, reweight=dcfg.reweight)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR(t) = alpha_bar_t / (1 - alpha_bar_t), [B] float64."""
        a = self.alpha_bar.to(t.device)[t]
        return a / (1 - a)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps;  [B, D] -> [B, D]."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return (_gather(self.alpha_bar.sqrt(), t, x_start) * x_start
                + _gather((1 - self.alpha_bar).sqrt(), t, x_start) * noise)

    def step_weight(self, t: torch.Tensor) -> torch.Tensor:
        """[B] loss weight: SNR(t-1) - SNR(t) (1 at t = 0) for x0 with reweight, else 1."""
        if not (self.reweight and self.mean_type == MeanType.x0):
            return torch.ones(t.shape, dtype=torch.float64, device=t.device)
        weight = self.snr(torch.clamp(t - 1, min=0)) - self.snr(t)
        return torch.where(t == 0, torch.ones_like(weight), weight)

    def training_losses(self, model, x_start: torch.Tensor, t: torch.Tensor,
                        weights: torch.Tensor, noise: torch.Tensor | None = None) -> dict:
        """Per-sample losses for x_start [B, D] at steps t [B].

        Returns loss [B] = raw * weights (importance weights 1 / (T p_t)), raw [B] = w_t *
        mean_d (target - f(x_t, t))^2 (what the step sampler records), pred_xstart [B, D].
        """
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise) if self.noise_scale != 0 else x_start
        output = model(x_t, t)
        target = x_start if self.mean_type == MeanType.x0 else noise
        mse = ((target - output) ** 2).mean(dim=tuple(range(1, x_start.dim())))
        raw = self.step_weight(t).to(mse.dtype) * mse
        pred_xstart = output if self.mean_type == MeanType.x0 else self.predict_xstart(x_t, t, output)
        return {"loss": raw * weights.to(raw.dtype), "raw": raw, "pred_xstart": pred_xstart}

    def predict_xstart(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        return ((x_t - _gather((1 - self.alpha_bar).sqrt(), t, x_t) * eps)
                / _gather(self.alpha_bar.sqrt(), t, x_t))

    def posterior_mean(self, x_start: torch.Tensor, x_t: torch.Tensor,
                       t: torch.Tensor) -> torch.Tensor:
        """mu~_t(x_t, x_0) = c0_t x_0 + ct_t x_t  (c0_0 = 1, ct_0 = 0)."""
        return (_gather(self.posterior_coef_x0, t, x_t) * x_start
                + _gather(self.posterior_coef_xt, t, x_t) * x_t)

    def reverse_coefficients(self) -> tuple[float, np.ndarray]:
        """How ``p_sample`` without sampling noise combines its inputs, as (m, a): its
        result is ``m * x_T + sum_i a[i] * output_i``, with x_T the reverse process's start
        and output_i [B, D] the model's output at reverse step i (a: [T] float64).

        Every reverse step is affine with the same scalar coefficients for all rows (the
        posterior mean, and for "eps" the x0 rebuilt from the noise), so the result is a
        fixed linear combination. "x0": a = e_0, m = 0 (the last output itself); "eps":
        m != 0 and every a[i] may be non-zero (and negative: x0 = (x_t - sigma eps) / alpha).
        """
        unit = np.eye(self.steps)
        m, a = 1.0, np.zeros(self.steps)
        for i in reversed(range(self.steps)):
            if self.noise_scale == 0:
                m, a = 0.0, unit[i]
                continue
            if self.mean_type == MeanType.x0:
                pred_m, pred_a = 0.0, unit[i]
            else:
                alpha, sigma = math.sqrt(self.alpha_bar[i]), math.sqrt(1 - self.alpha_bar[i])
                pred_m, pred_a = m / alpha, a / alpha - unit[i] * sigma / alpha
            if i == 0:
                return pred_m, pred_a
            c0, ct = float(self.posterior_coef_x0[i]), float(self.posterior_coef_xt[i])
            m, a = c0 * pred_m + ct * m, c0 * pred_a + ct * a
        return m, a

    def p_sample(self, model, x_start: torch.Tensor, steps: int,
                 sampling_noise: bool = False, noise=torch.randn_like) -> torch.Tensor:
        """Reverse process from x_start [B, D] noised to ``steps`` - 1 (steps = 0: as is).

        Runs all T reverse steps T-1 .. 0 whatever ``steps`` is, by posterior means (plus
        posterior noise when sampling_noise, never at t = 0), as the DiffRec reference does.
        At t = 0 the posterior mean is exactly the x0 prediction (c0 = 1, ct = 0), so the
        result is returned as the model's final prediction itself: the retrieval identity
        score == last layer(hidden) holds exactly. ``noise(like)`` gives the standard
        normal draws shaped as ``like`` [B, D]: the start's, then each step's posterior
        noise (default: torch's global RNG, as the reference; the models pass
        ``row_noise.RowNoise``, keyed by each row's input).
        """
        if steps > self.steps:
            raise ValueError(f"config key 'diffusion.sampling_steps' ({steps}) exceeds "
                             f"'diffusion.steps' ({self.steps})")
        batch = x_start.shape[0]
        x_t = x_start
        if steps > 0:
            t = torch.full((batch,), steps - 1, dtype=torch.long, device=x_start.device)
            x_t = self.q_sample(x_start, t, noise(x_start))
        for i in reversed(range(self.steps)):
            t = torch.full((batch,), i, dtype=torch.long, device=x_start.device)
            output = model(x_t, t)
            if self.noise_scale == 0:
                x_t = output
                continue
            pred = output if self.mean_type == MeanType.x0 else self.predict_xstart(x_t, t, output)
            if i == 0:
                return pred
            x_t = self.posterior_mean(pred, x_t, t)
            if sampling_noise:
                x_t = x_t + _gather((0.5 * self.posterior_log_variance).exp(), t, x_t) \
                    * noise(x_t)
        return x_t
