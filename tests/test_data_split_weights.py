"""Per-user split rules, pair dedupe, and T-DiffRec time weights (hand-computed)."""
import numpy as np
import pytest

from scale_diffrec.data import CSR, InteractionData, apply_time_weights, time_weights
from scale_diffrec.data.split import (assign_splits, check_split_config, dedupe_pairs,
                                      holdout_counts, sorted_unique, split_interactions)
from scale_diffrec.errors import ConfigError


def test_holdout_counts_rounding_and_train_floor():
    n = np.array([0, 1, 2, 3, 4, 5, 10, 11])
    n_valid, n_test = holdout_counts(n, 0.1, 0.2)
    # test = floor(0.2 n + .5), valid = floor(0.1 n + .5), at least one left in train
    assert n_test.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert n_valid.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    n_valid, n_test = holdout_counts(np.array([1, 2, 3, 4]), 0.45, 0.45)
    assert (n_valid + n_test).tolist() == [0, 1, 2, 3]          # the floor of one train item
    assert n_test.tolist() == [0, 1, 1, 2] and n_valid.tolist() == [0, 0, 1, 1]


def test_assign_time_split_by_hand():
    users = np.array([0, 0, 0, 0, 0, 1, 1, 2])
    times = np.array([40, 10, 50, 20, 30, 7, 3, 9])
    got = assign_splits(users, 3, "time", valid=0.2, test=0.2, times=times)
    # user 0: 5 items -> 1 test (t=50), 1 valid (t=40); user 1: 2 items -> none held out
    assert got.tolist() == [1, 0, 2, 0, 0, 0, 0, 0]
    # ties: equal times are ordered by input position (later = newer)
    got = assign_splits(np.zeros(5, int), 1, "time", 0.2, 0.2, times=np.array([1, 1, 1, 1, 1]))
    assert got.tolist() == [0, 0, 0, 1, 2]


def test_assign_random_split_seeded_counts():
    rng = np.random.default_rng(0)
    users = np.sort(rng.integers(0, 50, 2000))
    a = assign_splits(users, 50, "random", 0.1, 0.2, seed=1)
    b = assign_splits(users, 50, "random", 0.1, 0.2, seed=1)
    c = assign_splits(users, 50, "random", 0.1, 0.2, seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    n_valid, n_test = holdout_counts(np.bincount(users, minlength=50), 0.1, 0.2)
    assert np.array_equal(np.bincount(users[a == 2], minlength=50), n_test)
    assert np.array_equal(np.bincount(users[a == 1], minlength=50), n_valid)


def test_dedupe_keeps_earliest_time_and_first_row():
    u, i, t, rows, dropped = dedupe_pairs(np.array([1, 0, 1, 1]), np.array([2, 5, 2, 0]), 6,
                                          times=np.array([9, 4, 3, 8]))
    assert u.tolist() == [0, 1, 1] and i.tolist() == [5, 0, 2]
    assert t.tolist() == [4, 8, 3] and rows.tolist() == [1, 3, 0] and dropped == 1


def test_split_interactions_partition_everything():
    rng = np.random.default_rng(3)
    users = rng.integers(0, 30, 600)
    items = rng.integers(0, 40, 600)
    train, valid, test, train_times, info = split_interactions(
        users, items, 30, 40, "random", 0.1, 0.2, seed=0, times=rng.random(600))
    assert train.nnz + valid.nnz + test.nnz + info["duplicates"] == 600
    assert len(train_times) == train.nnz
    assert np.all(train.row_lengths()[np.bincount(users, minlength=30) > 0] >= 1)


def test_sorted_unique():
    assert sorted_unique(np.array([3, 1, 3, 2, 1])).tolist() == [1, 2, 3]
    assert sorted_unique(np.array([], np.int64)).tolist() == []


def test_check_split_config_defaults():
    assert check_split_config({}) == ("random", 0.1, 0.2, 0)
    with pytest.raises(ConfigError, match="'data.split.seed'"):
        check_split_config({"seed": -1})


# ----------------------------------------------------------------------- time weights

def test_time_weights_by_hand_with_ties_and_unsorted_input():
    # row 0: times [5, 1, 5, 3]; linspace(0.1, 1, 4) = [.1, .4, .7, 1.]; the two 5s share
    #        (.7 + 1.) / 2 = .85
    # row 1: one interaction -> w_min (np.linspace(a, b, 1) == [a])
    # row 2: empty
    # row 3: times [30, 10, 20] -> linspace(.1, 1, 3) = [.1, .55, 1.] by time order
    # row 4: all tied -> all get the mean .55
    indptr = np.array([0, 4, 5, 5, 8, 10])
    times = np.array([5, 1, 5, 3, 42, 30, 10, 20, 7, 7])
    got = time_weights(indptr, times, 0.1, 1.0)
    expected = [0.85, 0.1, 0.85, 0.4, 0.1, 1.0, 0.1, 0.55, 0.55, 0.55]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_time_weights_equal_linspace_without_ties():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 30, 50)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    times = np.concatenate([rng.permutation(n) for n in lengths]).astype(np.int64)
    got = time_weights(indptr, times, 0.25, 1.0)
    for r, n in enumerate(lengths):
        seg = slice(indptr[r], indptr[r + 1])
        expected = np.linspace(0.25, 1.0, n).astype(np.float32)[times[seg]]
        assert np.array_equal(got[seg], expected)          # exactly the reference's values


def test_apply_time_weights_replaces_train_values_only():
    train = CSR(np.array([0, 2, 3]), np.array([0, 2, 1]), np.ones(3, np.float32), 3)
    other = CSR(np.array([0, 1, 1]), np.array([1]), np.ones(1, np.float32), 3)
    data = InteractionData("d", train, other, other, train_times=np.array([20, 10, 5]))
    out = apply_time_weights(data, 0.5, 1.0)
    assert out.train.values.tolist() == [1.0, 0.5, 0.5]
    assert data.train.values.tolist() == [1.0, 1.0, 1.0]      # the input is not modified
    assert out.valid is other and out.meta["time_weights"] == {"w_min": 0.5, "w_max": 1.0}
    with pytest.raises(ConfigError, match="no interaction order"):
        apply_time_weights(InteractionData("d", train, other, other), 0.5, 1.0)
