"""Noise schedules: the betas of a T-step Gaussian diffusion (``models/diffusion.py``).

DiffRec's (linear, linear-var over noise_scale * [noise_min, noise_max]) and DiffuRec's named
schedules (linear, cosine, sqrt, trunc_cos, trunc_lin, pw_lin). A module of its own, below
the config: the config's schema checks every beta of a schedule when it validates.
"""
from __future__ import annotations

import math

import numpy as np

from .choices import DiffuRecSchedule, Schedule


MAX_BETA = 0.999


def betas_for_alpha_bar(steps: int, alpha_bar, max_beta: float = MAX_BETA) -> np.ndarray:
    """[T] float64: beta_t = 1 - alpha_bar((t+1)/T) / alpha_bar(t/T), capped at max_beta
    (Nichol & Dhariwal 2021, eq. 17; DiffuRec src/diffurec.py ``betas_for_alpha_bar``)."""
    return np.array([min(1 - alpha_bar((t + 1) / steps) / alpha_bar(t / steps), max_beta)
                     for t in range(steps)], dtype=np.float64)


def betas_for_alpha_bar_left(steps: int, alpha_bar, max_beta: float = MAX_BETA) -> np.ndarray:
    """[T] float64, the grid shifted left by one step (DiffuRec src/diffurec.py
    ``betas_for_alpha_bar_left``): beta_0 = 1 - alpha_bar(0), then beta_t = 1 -
    alpha_bar(t/T) / alpha_bar((t-1)/T) for t = 1..T-1, each capped at max_beta; so the
    cumulative product of (1 - beta) at step t is alpha_bar(t/T) (uncapped)."""
    head = [min(1 - alpha_bar(0.0), max_beta)]
    return np.array(head + list(betas_for_alpha_bar(steps, alpha_bar, max_beta)[:-1]),
                    dtype=np.float64)


def betas_from_linear_variance(variance: np.ndarray, max_beta: float = MAX_BETA) -> np.ndarray:
    """DiffRec's 'linear-var': 1 - alpha_bar_t = variance_t, linear in t."""
    alpha_bar = 1 - variance
    betas = [1 - alpha_bar[0]]
    betas += [min(1 - alpha_bar[t] / alpha_bar[t - 1], max_beta) for t in range(1, len(variance))]
    return np.array(betas, dtype=np.float64)


def _trunc_lin(steps: int, cap_end: bool) -> np.ndarray:
    """Diffusion-LM's truncated linear betas, linspace(s 1e-4 + 0.01, s 0.02 + 0.01, T) with
    s = 1000 / T; ``cap_end``: DiffuRec's fallback end s 1e-3 + 0.01 when the end would
    exceed 1 (T <= 20)."""
    scale = 1000 / steps
    start, end = scale * 0.0001 + 0.01, scale * 0.02 + 0.01
    if cap_end and end > 1:
        end = scale * 0.001 + 0.01
    return np.linspace(start, end, steps, dtype=np.float64)


def named_betas(schedule: str, steps: int) -> np.ndarray:
    """[T] float64 betas of DiffuRec's named schedules (DiffuRec src/diffurec.py
    ``get_named_beta_schedule``; Li, Sun & Li, TOIS 2023), with s = 1000 / T:

        linear     linspace(s 1e-4, s 0.02, T)              (Ho et al. 2020, scaled to T)
        cosine     betas_for_alpha_bar, cos((u + 0.008) / 1.008 pi/2)^2  (Nichol & Dhariwal)
        sqrt       betas_for_alpha_bar, 1 - sqrt(u + 1e-4)  (Diffusion-LM, Li et al. 2022)
        trunc_cos  betas_for_alpha_bar_left, cos((u + 0.1) / 1.1 pi/2)^2
        trunc_lin  linspace(s 1e-4 + 0.01, s 0.02 + 0.01, T); end s 1e-3 + 0.01 if the end
                   exceeds 1 (T = 32: 0.013125 .. 0.635; DiffuRec's default)
        pw_lin     linspace(s 1e-4 + 0.01, s 1e-4, 10) ++ linspace(s 1e-4, s 0.02, T - 10)

    Errors: ValueError for an unknown name, T < 1, pw_lin with T < 10 (its first piece
    alone has 10 steps), or a beta outside (0, 1] (linear and pw_lin with T < 20; DiffuRec
    asserts the same when it builds its model).
    """
    schedule = DiffuRecSchedule(schedule)
    if steps < 1 or (schedule == DiffuRecSchedule.pw_lin and steps < 10):
        raise ValueError(f"the {schedule} schedule needs at least "
                         f"{10 if schedule == DiffuRecSchedule.pw_lin else 1} steps, got {steps}")
    scale = 1000 / steps
    if schedule == DiffuRecSchedule.cosine:
        return betas_for_alpha_bar(steps, lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2)
    if schedule == DiffuRecSchedule.sqrt:
        return betas_for_alpha_bar(steps, lambda u: 1 - math.sqrt(u + 0.0001))
    if schedule == DiffuRecSchedule.trunc_cos:
        return betas_for_alpha_bar_left(steps, lambda u: math.cos((u + 0.1) / 1.1 * math.pi / 2) ** 2)
    if schedule == DiffuRecSchedule.trunc_lin:
        return _trunc_lin(steps, cap_end=True)
    if schedule == DiffuRecSchedule.linear:
        betas = np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)
    else:
        first = np.linspace(scale * 0.0001 + 0.01, scale * 0.0001, 10, dtype=np.float64)
        betas = np.concatenate([first, np.linspace(scale * 0.0001, scale * 0.02, steps - 10,
                                                   dtype=np.float64)])
    if not np.all((betas > 0) & (betas <= 1)):
        raise ValueError(f"the {schedule} schedule with {steps} steps has beta_{steps - 1} = "
                         f"{betas[-1]:g}: every beta must lie in (0, 1] (take T >= 20)")
    return betas


def make_betas(schedule: Schedule | str, steps: int, noise_scale: float, noise_min: float,
               noise_max: float) -> np.ndarray:
    """[T] float64 betas of the ``diffusion`` config section. linear / linear-var span
    noise_scale * [noise_min, noise_max] (DiffRec's meaning of "linear", not DiffuRec's);
    cosine and sqrt are ``named_betas``'; trunc_lin is ``named_betas``' without DiffuRec's
    fallback end for T <= 20 (the config schema, ``schema.DiffusionConfig``, refuses those
    T: every beta must lie in (0, 1))."""
    schedule = Schedule(schedule)
    if schedule in (Schedule.linear, Schedule.linear_var):
        ramp = np.linspace(noise_scale * noise_min, noise_scale * noise_max, steps,
                           dtype=np.float64)
        return ramp if schedule == Schedule.linear else betas_from_linear_variance(ramp)
    if schedule == Schedule.trunc_lin:
        return _trunc_lin(steps, cap_end=False)
    return named_betas(schedule.value, steps)
