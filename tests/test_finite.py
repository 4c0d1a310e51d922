import math

import torch

from scale_diffrec.finite import count_non_finite


def test_count_non_finite_counts_every_nan_and_infinity():
    scores = torch.randn(6, 50)
    scores[1, 3] = math.nan
    scores[1, 7] = math.inf
    scores[4, 0] = -math.inf
    scores[5, :] = math.nan                      # a whole row
    assert int(count_non_finite(scores)) == (~torch.isfinite(scores)).sum() == 53


def test_count_non_finite_is_zero_for_finite_rows_whose_sum_overflows():
    scores = torch.zeros(3, 4)
    scores[2] = 3e38                             # finite values, sum = inf in fp32
    assert not torch.isfinite(scores.sum(1)).all()
    assert int(count_non_finite(scores)) == 0
    assert int(count_non_finite(torch.randn(4, 9))) == 0
