"""DiffuRec's named schedules and step samplers against hand-computed values
(src/diffurec.py get_named_beta_schedule, src/step_sample.py of WHUIR/DiffuRec)."""
import math

import numpy as np
import pytest
import torch

from scale_diffrec.schedules import make_betas, named_betas
from scale_diffrec.models.samplers import (FixSampler, LossSecondMomentResampler, UniformSampler,
                                    named_sampler)


def test_trunc_lin_T32_endpoints_from_the_issue():
    betas = named_betas("trunc_lin", 32)
    assert betas.shape == (32,)
    # s = 1000 / 32 = 31.25: start 31.25e-4 + 0.01, end 31.25 * 0.02 + 0.01, even steps
    np.testing.assert_allclose(betas[[0, -1]], [0.013125, 0.635], rtol=1e-12)
    np.testing.assert_allclose(np.diff(betas), (0.635 - 0.013125) / 31, rtol=1e-9)


def test_trunc_lin_falls_back_when_the_end_exceeds_one():
    # T = 10: s = 100, end 100 * 0.02 + 0.01 = 2.01 > 1 -> end 100 * 0.001 + 0.01 = 0.11
    np.testing.assert_allclose(named_betas("trunc_lin", 10),
                               [0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.10, 0.11],
                               rtol=1e-12)
    # the diffusion config's trunc_lin keeps the uncapped end (refused by its schema)
    assert make_betas("trunc_lin", 10, 0.1, 0.01, 0.02)[-1] == pytest.approx(2.01)
    np.testing.assert_array_equal(make_betas("trunc_lin", 32, 0.1, 0.01, 0.02),
                                  named_betas("trunc_lin", 32))


def test_linear_is_hos_schedule_scaled_to_T():
    betas = named_betas("linear", 100)          # s = 10: 0.001 .. 0.2
    np.testing.assert_allclose(betas[[0, 1, -1]], [0.001, 0.001 + 0.199 / 99, 0.2],
                               rtol=1e-12)


def test_cosine_and_sqrt_by_hand_T2():
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2   # noqa: E731
    # beta_0 = 1 - f(1/2) / f(0); beta_1 = 1 - f(1) / f(1/2) ~ 1, capped at 0.999
    np.testing.assert_allclose(named_betas("cosine", 2), [1 - f(0.5) / f(0), 0.999],
                               rtol=1e-12)
    np.testing.assert_allclose(named_betas("cosine", 2), [0.50615641, 0.999], rtol=1e-7)
    h = lambda u: 1 - math.sqrt(u + 1e-4)                              # noqa: E731
    # h(1) < 0, so 1 - h(1) / h(1/2) > 1: capped at 0.999
    np.testing.assert_allclose(named_betas("sqrt", 2), [1 - h(0.5) / 0.99, 0.999], rtol=1e-12)
    np.testing.assert_array_equal(make_betas("cosine", 7, 0.1, 0.01, 0.02),
                                  named_betas("cosine", 7))


def test_trunc_cos_is_left_shifted_T4():
    g = lambda u: math.cos((u + 0.1) / 1.1 * math.pi / 2) ** 2      # noqa: E731
    # g(0), g(1/4), g(1/2), g(3/4) = 0.97975, 0.77032, 0.42884, 0.12213
    expected = [1 - g(0), 1 - g(0.25) / g(0), 1 - g(0.5) / g(0.25), 1 - g(0.75) / g(0.5)]
    betas = named_betas("trunc_cos", 4)
    np.testing.assert_allclose(betas, expected, rtol=1e-12)
    np.testing.assert_allclose(betas, [0.02025351, 0.21375538, 0.44329324, 0.71522135],
                               rtol=1e-6)
    np.testing.assert_allclose(np.cumprod(1 - betas), [g(t / 4) for t in range(4)], rtol=1e-12)


def test_pw_lin_T32_two_pieces():
    betas = named_betas("pw_lin", 32)
    # s = 31.25: 10 steps 0.013125 -> 0.003125, then 22 steps 0.003125 -> 0.625
    np.testing.assert_allclose(betas[:10], np.linspace(0.013125, 0.003125, 10), rtol=1e-12)
    np.testing.assert_allclose(betas[[1, 9, 10, 11, 31]],
                               [0.013125 - 0.01 / 9, 0.003125, 0.003125,
                                0.003125 + (0.625 - 0.003125) / 21, 0.625], rtol=1e-12)


@pytest.mark.parametrize("name,steps,message", [
    ("pw_lin", 9, "at least 10 steps"), ("linear", 0, "at least 1 steps"),
    ("quadratic", 32, "not a valid"),
    ("linear", 19, r"beta_18 = 1.05263: every beta must lie in \(0, 1\]"),   # 1000/19 * 0.02
    ("pw_lin", 12, r"beta_11 = 1.66667"),
])
def test_bad_schedule_requests_are_errors(name, steps, message):
    with pytest.raises(ValueError, match=message):
        named_betas(name, steps)


def test_linear_at_T20_ends_at_one():
    assert named_betas("linear", 20)[-1] == pytest.approx(1.0)


def test_fixstep_weights_even_and_odd_T():
    s = FixSampler(4)                         # w = 1, 1, 0.5, 0.5 -> p = 1/3, 1/3, 1/6, 1/6
    torch.testing.assert_close(s.probabilities(),
                               torch.tensor([1 / 3, 1 / 3, 1 / 6, 1 / 6], dtype=torch.float64))
    t, w = s.sample(400, generator=torch.Generator().manual_seed(0))
    # importance weights 1 / (T p_t): 0.75 for the first half, 1.5 for the second
    torch.testing.assert_close(w, torch.where(t < 2, 0.75, 1.5).float())
    assert set(t.tolist()) == {0, 1, 2, 3}
    torch.testing.assert_close(FixSampler(5).probabilities(),
                               torch.tensor([2, 2, 1, 1, 1], dtype=torch.float64) / 7)


def _official_fifo(steps, history, ts, losses):
    """The per-loss FIFO of step_sample.py's update_with_all_losses, written out."""
    h, counts = np.zeros((steps, history)), np.zeros(steps, int)
    for t, loss in zip(ts, losses):
        if counts[t] == history:
            h[t, :-1], h[t, -1] = h[t, 1:].copy(), loss
        else:
            h[t, counts[t]], counts[t] = loss, counts[t] + 1
    return h, counts


def test_lossaware_weights_on_a_hand_made_history():
    s = named_sampler("lossaware", 2)         # DiffuRec's defaults: 10 per step, u = 0.001
    assert isinstance(s, LossSecondMomentResampler)
    s.update_with_all_losses([0] * 12 + [1] * 9, list(range(1, 13)) + [2.0] * 9)
    assert not s.warmed_up()                  # t = 1 has 9 of 10: still uniform
    torch.testing.assert_close(s.probabilities(), torch.full((2,), 0.5, dtype=torch.float64))
    s.update_with_all_losses([1], [2.0])
    # t = 0 keeps losses 3..12: E L^2 = (650 - 1 - 4) / 10 = 64.5; t = 1: 4
    rms = torch.tensor([math.sqrt(64.5), 2.0], dtype=torch.float64)
    expected = 0.999 * rms / rms.sum() + 0.001 / 2
    torch.testing.assert_close(s.probabilities(), expected)
    t, w = s.sample(200, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(w.double(), 1 / (2 * expected[t]), rtol=1e-6, atol=0)


def test_lossaware_history_equals_the_per_loss_fifo():
    rng = np.random.default_rng(3)
    ts, losses = rng.integers(0, 5, 300), rng.random(300)
    s = LossSecondMomentResampler(5, history_per_step=7)
    for lo in range(0, 300, 37):              # batches of unequal size
        s.update_with_all_losses(ts[lo:lo + 37].tolist(), losses[lo:lo + 37].tolist())
    h, counts = _official_fifo(5, 7, ts, losses)
    np.testing.assert_array_equal(s.loss_history.numpy(), h)
    np.testing.assert_array_equal(s.loss_counts.numpy(), counts)


def test_named_samplers():
    assert type(named_sampler("uniform", 8)) is UniformSampler
    assert type(named_sampler("fixstep", 8)) is FixSampler
    with pytest.raises(ValueError):
        named_sampler("importance", 8)
