"""GaussianDiffusion against hand-computed schedules and a naive reference loop."""
import math

import numpy as np
import pytest
import torch

from scale_diffrec.models.diffusion import GaussianDiffusion
from scale_diffrec.schedules import make_betas


def test_linear_var_schedule_by_hand():
    # variances v = linspace(0.005*0.005, 0.005*0.01, 3) = [2.5e-5, 3.75e-5, 5e-5];
    # alpha_bar = 1 - v; beta_0 = v_0, beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}.
    v = [2.5e-5, 3.75e-5, 5e-5]
    expected = [v[0], 1 - (1 - v[1]) / (1 - v[0]), 1 - (1 - v[2]) / (1 - v[1])]
    np.testing.assert_allclose(make_betas("linear-var", 3, 0.005, 0.005, 0.01), expected,
                               rtol=1e-9)
    diffusion = GaussianDiffusion(3, "linear-var", 0.005, 0.005, 0.01)
    np.testing.assert_allclose(1 - diffusion.alpha_bar.numpy(), v, rtol=1e-9)
    np.testing.assert_allclose(make_betas("linear", 3, 0.005, 0.005, 0.01), v, rtol=1e-12)


@pytest.mark.parametrize("schedule", ["cosine", "sqrt", "trunc_lin", "linear-var"])
def test_schedules_are_valid(schedule):
    betas = make_betas(schedule, 50, 0.1, 0.001, 0.02)
    assert betas.shape == (50,) and np.all(betas > 0) and np.all(betas < 1)
    alpha_bar = np.cumprod(1 - betas)
    assert np.all(np.diff(alpha_bar) < 0)


def test_q_sample_with_fixed_noise():
    d = GaussianDiffusion(10, "linear-var", 0.1, 0.01, 0.2)
    x0, noise = torch.randn(4, 6), torch.randn(4, 6)
    t = torch.tensor([0, 3, 9, 5])
    a = d.alpha_bar[t].float()[:, None]
    torch.testing.assert_close(d.q_sample(x0, t, noise), a.sqrt() * x0 + (1 - a).sqrt() * noise)


def test_training_losses_match_hand_computation():
    torch.manual_seed(0)
    d = GaussianDiffusion(5, "linear-var", 0.5, 0.01, 0.1, reweight=True)
    model = torch.nn.Linear(3, 3)
    f = lambda x, t: model(x) * (1 + t[:, None].float())   # noqa: E731
    x0, noise = torch.randn(4, 3), torch.randn(4, 3)
    t, w = torch.tensor([0, 1, 4, 2]), torch.tensor([1.0, 2.0, 0.5, 1.5])
    out = d.training_losses(f, x0, t, w, noise)
    ab = d.alpha_bar.numpy()
    snr = ab / (1 - ab)
    for b in range(4):
        tb = int(t[b])
        xt = math.sqrt(ab[tb]) * x0[b] + math.sqrt(1 - ab[tb]) * noise[b]
        pred = f(xt[None], t[b:b + 1])[0]
        weight = 1.0 if tb == 0 else snr[tb - 1] - snr[tb]
        raw = weight * ((x0[b] - pred) ** 2).mean().item()
        assert out["raw"][b].item() == pytest.approx(raw, rel=1e-5)
        assert out["loss"][b].item() == pytest.approx(raw * w[b].item(), rel=1e-5)
    assert out["pred_xstart"].requires_grad


def test_p_sample_equals_naive_posterior_mean_loop():
    torch.manual_seed(1)
    d = GaussianDiffusion(6, "linear-var", 0.3, 0.01, 0.1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.Tanh())
    f = lambda x, t: model(x) + 0.01 * t[:, None].float()   # noqa: E731
    x0 = torch.randn(3, 5)
    x = x0.clone()
    for i in reversed(range(6)):       # the reference's loop: posterior mean at every step
        t = torch.full((3,), i)
        pred = f(x, t)
        x = d.posterior_mean(pred, x, t)
    with torch.no_grad():
        torch.testing.assert_close(d.p_sample(f, x0, 0), x.detach(), rtol=1e-5, atol=1e-6)
    # coef at t = 0: posterior mean of the prediction is the prediction
    assert d.posterior_coef_x0[0].item() == pytest.approx(1.0, abs=1e-12)
    assert d.posterior_coef_xt[0].item() == 0.0


def test_sampling_steps_beyond_schedule_is_an_error():
    d = GaussianDiffusion(4, "linear-var", 0.3, 0.01, 0.1)
    with pytest.raises(ValueError, match="sampling_steps"):
        d.p_sample(lambda x, t: x, torch.zeros(1, 2), 5)


def test_choices_are_kept_as_members_and_other_values_refused():
    from scale_diffrec.choices import MeanType
    assert GaussianDiffusion(4, "linear", 0.1, 0.01, 0.2, mean_type="eps").mean_type \
        is MeanType.eps
    assert GaussianDiffusion(4).mean_type is MeanType.x0
    with pytest.raises(ValueError, match="'x1' is not a valid MeanType"):
        GaussianDiffusion(4, mean_type="x1")
    with pytest.raises(ValueError, match="'quadratic' is not a valid Schedule"):
        GaussianDiffusion(4, schedule="quadratic")
