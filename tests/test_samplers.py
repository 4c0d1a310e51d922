"""Step samplers: importance weights by hand, FIFO history, identical state across ranks."""
import pytest
import torch

from scale_diffrec.train.distributed.local import run_distributed
from scale_diffrec.models.samplers import LossSecondMomentResampler, UniformSampler


def test_uniform_before_warm_up_then_second_moment_weights():
    s = LossSecondMomentResampler(3, history_per_step=2, uniform_prob=0.1)
    s.update_with_all_losses([0, 0, 1, 1, 2], [1.0, 1.0, 2.0, 2.0, 3.0])
    assert not s.warmed_up()
    torch.testing.assert_close(s.probabilities(), torch.full((3,), 1 / 3, dtype=torch.float64))
    s.update_with_all_losses([2], [4.0])
    # rms: t0 = 1, t1 = 2, t2 = sqrt((9 + 16) / 2); p = 0.9 * rms / sum + 0.1 / 3
    rms = torch.tensor([1.0, 2.0, (12.5) ** 0.5], dtype=torch.float64)
    expected = 0.9 * rms / rms.sum() + 0.1 / 3
    torch.testing.assert_close(s.probabilities(), expected)
    t, w = s.sample(1000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(w.double(), 1.0 / (3 * expected[t]), rtol=1e-6, atol=0)


def test_history_is_fifo():
    s = LossSecondMomentResampler(1, history_per_step=3)
    s.update_with_all_losses([0] * 5, [1.0, 2.0, 3.0, 4.0, 5.0])
    assert s.loss_history[0].tolist() == [3.0, 4.0, 5.0]
    assert int(s.loss_counts[0]) == 3


def test_uniform_sampler_weights_are_one():
    t, w = UniformSampler(7).sample(50)
    assert t.min() >= 0 and t.max() < 7 and torch.all(w == 1)


def test_state_dict_round_trip():
    s = LossSecondMomentResampler(4, history_per_step=2)
    s.update_with_all_losses([0, 1, 2, 3, 0, 1, 2, 3], [1.0, 2, 3, 4, 5, 6, 7, 8])
    r = LossSecondMomentResampler(4, history_per_step=2)
    r.load_state_dict(s.state_dict())
    torch.testing.assert_close(r.probabilities(), s.probabilities())


def _ranks_update(rank, world, steps):
    torch.manual_seed(100 + rank)          # every rank sees different local losses
    s = LossSecondMomentResampler(8, history_per_step=10)
    gen = torch.Generator().manual_seed(0)  # same draws on every rank (same weights)
    for step in range(steps):
        t, _ = s.sample(3 + rank + step % 2, generator=gen)   # unequal local batch sizes
        s.update_with_local_losses(t, torch.rand(t.shape[0]) * (t.double() + 1))
    return s.loss_history.clone(), s.loss_counts.clone(), s.probabilities()


@pytest.mark.parametrize("world", [2, 3])
def test_history_identical_on_every_rank_after_50_steps(world):
    results = run_distributed(_ranks_update, world_size=world, args=(50,))
    history, counts, probs = results[0]
    assert bool((counts == 10).all())
    for h, c, p in results[1:]:
        assert torch.equal(h, history) and torch.equal(c, counts) and torch.equal(p, probs)
    assert not torch.allclose(probs, torch.full_like(probs, 1 / 8))
