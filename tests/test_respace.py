"""Timestep respacing (improved-diffusion / DiffuRec space_timesteps) by hand."""
import numpy as np
import pytest
import torch

from scale_diffrec.schedules import named_betas
from scale_diffrec.models.respace import model_timesteps, respaced_betas, space_timesteps


@pytest.mark.parametrize("steps,counts,expected", [
    (10, "ddim5", [0, 2, 4, 6, 8]),            # stride 2
    (10, "ddim3", [0, 4, 8]),                  # strides 1, 2, 3 give 10, 5, 4 steps
    (10, "ddim10", list(range(10))),
    (10, [2, 3], [0, 4, 5, 7, 9]),             # sections 0..4 (stride 4), 5..9 (stride 2)
    (11, "3,2", [0, 2, 5, 6, 10]),             # sizes 6, 5; stride 2.5: round(2.5) = 2
    (5, [1], [0]),
    (7, "0,3", [4, 5, 6]),                     # sizes 4, 3: nothing from the first
    (32, [32], list(range(32))),               # DiffuRec's own call: every step
])
def test_space_timesteps_by_hand(steps, counts, expected):
    assert space_timesteps(steps, counts) == expected


@pytest.mark.parametrize("steps,counts,message", [
    (5, [6], "section 0 of 5 steps into 6"),
    (10, "ddim7", "exactly 7 of 10 steps"),
    (10, "4,x", "'x' is not an integer"),
    (10, [-1, 3], "-1 is not an integer"),
    (10, "0,0", "keep no step"),
])
def test_space_timesteps_errors(steps, counts, message):
    with pytest.raises(ValueError, match=message):
        space_timesteps(steps, counts)


def test_respaced_betas_keep_alpha_bar_at_the_kept_steps():
    betas = np.array([0.1, 0.2, 0.3, 0.4])
    # alpha_bar = 0.9, 0.72, 0.504, 0.3024; kept 0, 2, 3: 0.9, 0.504, 0.3024
    np.testing.assert_allclose(respaced_betas(betas, [0, 2, 3]),
                               [0.1, 1 - 0.504 / 0.9, 1 - 0.3024 / 0.504], rtol=1e-12)
    np.testing.assert_allclose(respaced_betas(betas, [1, 3]), [1 - 0.72, 1 - 0.3024 / 0.72],
                               rtol=1e-12)
    np.testing.assert_allclose(respaced_betas(betas, range(4)), betas, rtol=1e-12)


def test_respaced_trunc_lin_ddim8():
    betas = named_betas("trunc_lin", 32)
    kept = space_timesteps(32, "ddim8")
    assert kept == list(range(0, 32, 4))
    new = respaced_betas(betas, kept)
    np.testing.assert_allclose(np.cumprod(1 - new), np.cumprod(1 - betas)[kept], rtol=1e-12)
    assert np.all((new > 0) & (new < 1))


def test_model_timesteps_map_and_rescale():
    t = torch.tensor([0, 1, 2])
    torch.testing.assert_close(model_timesteps(t, [0, 2, 3], 4), torch.tensor([0.0, 500, 750]))
    torch.testing.assert_close(model_timesteps(t, [0, 2, 3], 4, rescale=False),
                               torch.tensor([0.0, 2, 3]))
