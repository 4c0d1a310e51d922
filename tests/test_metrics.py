"""Top-K metrics: hand-computed values, both conventions, merging, and an independent loop."""
import math

import numpy as np
import pytest
import torch

from scale_diffrec.data.csr import CSR
from scale_diffrec.metrics import MetricAccumulator, compute_metrics, per_user_metrics

L2, L3, L4 = math.log2(2), math.log2(3), math.log2(4)   # 1, 1.58496..., 2


def _close(a, b):
    return a == pytest.approx(b, abs=1e-12)


# --------------------------------------------------------------------------------------
# hand-computed cases
# user 0: GT {1, 3}, ranking [3, 5, 1, 7]  -> hits at ranks 0 and 2
# user 1: GT {5},    ranking [0, 2, 5, 6]  -> hit at rank 2
# user 2: GT {},     ranking [1, 2, 3, 4]  -> evaluated, but no ground truth
RANKS = [[3, 5, 1, 7], [0, 2, 5, 6], [1, 2, 3, 4]]
TRUTH = [[1, 3], [5], []]

# per user, K = 2
U0_K2 = dict(recall=1 / 2,                       # 1 hit of |G| = 2
             precision=1 / 2,                    # 1 hit / K = 2
             ndcg=(1 / L2) / (1 / L2 + 1 / L3),  # dcg: rank 0; idcg: min(2, 2) = 2 ranks
             mrr=1 / 1)                          # first hit at rank 0
U1_K2 = dict(recall=0.0, precision=0.0, ndcg=0.0, mrr=0.0)   # rank 2 is outside the top 2
# per user, K = 4
U0_K4 = dict(recall=2 / 2,                                  # 2 hits of |G| = 2
             precision=2 / 4,
             ndcg=(1 / L2 + 1 / L4) / (1 / L2 + 1 / L3),    # hits at ranks 0, 2; idcg 2 ranks
             mrr=1 / 1)
U1_K4 = dict(recall=1 / 1,
             precision=1 / 4,
             ndcg=(1 / L4) / (1 / L2),                      # = 0.5; idcg: min(1, 4) = 1 rank
             mrr=1 / 3)                                     # first hit at rank 2


def test_per_user_values_by_hand():
    values, n_truth = per_user_metrics(np.array(RANKS), TRUTH, ks=(2, 4))
    assert n_truth.tolist() == [2, 1, 0]
    for name in ("recall", "precision", "ndcg", "mrr"):
        assert _close(values[name][0, 0], U0_K2[name]), name
        assert _close(values[name][1, 0], U1_K2[name]), name
        assert _close(values[name][0, 1], U0_K4[name]), name
        assert _close(values[name][1, 1], U1_K4[name]), name
        assert values[name][2].tolist() == [0.0, 0.0]     # no ground truth: contributes 0


def test_hand_example_numbers_written_out():
    # the same example, the values as decimals: ndcg@2 of user 0 = 1 / (1 + 0.6309297536)
    values, _ = per_user_metrics(np.array(RANKS), TRUTH, ks=(2, 4))
    assert values["ndcg"][0, 0] == pytest.approx(0.6131471928, abs=1e-9)
    assert values["ndcg"][0, 1] == pytest.approx(1.5 / 1.6309297536, abs=1e-9)   # 0.9197...
    assert values["mrr"][1, 1] == pytest.approx(0.3333333333, abs=1e-9)


@pytest.mark.parametrize("convention,denom", [("reference", 3), ("users_with_truth", 2)])
def test_both_conventions_by_hand(convention, denom):
    out = compute_metrics(np.array(RANKS), TRUTH, ks=(2, 4), convention=convention)
    # sums over users with truth (users 0 and 1), divided by 3 (all) or 2 (with truth)
    for name in ("recall", "precision", "ndcg", "mrr"):
        assert _close(out[f"{name}@2"], (U0_K2[name] + U1_K2[name]) / denom), name
        assert _close(out[f"{name}@4"], (U0_K4[name] + U1_K4[name]) / denom), name
    assert _close(out["recall@4"], (1 + 1) / denom)
    assert out["n_users"] == 3 and out["n_users_with_truth"] == 2
    assert out["convention"] == convention


def test_users_without_truth_change_only_the_reference_convention():
    base = [RANKS[0], RANKS[1]], [TRUTH[0], TRUTH[1]]
    more = [RANKS[0], RANKS[1], [9, 8, 7, 6], [0, 1, 2, 3]], [TRUTH[0], TRUTH[1], [], []]
    a_ref = compute_metrics(np.array(base[0]), base[1], ks=(2, 4), convention="reference")
    b_ref = compute_metrics(np.array(more[0]), more[1], ks=(2, 4), convention="reference")
    a_uwt = compute_metrics(np.array(base[0]), base[1], ks=(2, 4), convention="users_with_truth")
    b_uwt = compute_metrics(np.array(more[0]), more[1], ks=(2, 4), convention="users_with_truth")
    for key in ("recall@2", "ndcg@4", "precision@4", "mrr@4"):
        assert _close(a_uwt[key], b_uwt[key])
        assert _close(b_ref[key], a_ref[key] * 2 / 4)           # 2 users -> 4 users
        assert _close(a_ref[key], a_uwt[key])                   # no empty users: same
    assert b_ref["n_users"] == 4 and b_ref["n_users_with_truth"] == 2


def test_truth_larger_than_k_caps_idcg():
    # GT {0,1,2,3,4} (5 items), ranking [9, 0]: hit at rank 1; K = 2
    out = compute_metrics(np.array([[9, 0]]), [[0, 1, 2, 3, 4]], ks=(2,))
    assert _close(out["recall@2"], 1 / 5)
    assert _close(out["precision@2"], 1 / 2)
    assert _close(out["ndcg@2"], (1 / L3) / (1 / L2 + 1 / L3))   # idcg over min(5, 2) ranks
    assert _close(out["mrr@2"], 1 / 2)
    assert out["hr@2"] == 1.0 and compute_metrics(np.array([[9, 8]]), [[0, 1]], ks=(2,)
                                                  )["hr@2"] == 0.0   # a hit at all: 1


def test_padding_never_hits_and_precision_divides_by_k():
    # 2 rankable items only: [4, 2, -1, -1]; GT {2}; precision@4 = 1 / 4 (reference's /K)
    out = compute_metrics(np.array([[4, 2, -1, -1]]), [[2]], ks=(4,))
    assert _close(out["precision@4"], 1 / 4)
    assert _close(out["recall@4"], 1.0)
    assert _close(out["ndcg@4"], (1 / L3) / (1 / L2))


def test_truth_as_csr_equals_truth_as_lists_and_torch_input():
    csr = CSR.from_pairs(np.array([0, 0, 1]), np.array([1, 3, 5]), n_rows=3, n_cols=10)
    a = compute_metrics(torch.tensor(RANKS), csr, ks=(2, 4))
    b = compute_metrics(np.array(RANKS), TRUTH, ks=(2, 4))
    assert a == b


def test_list_must_be_at_least_max_k_wide():
    with pytest.raises(ValueError, match="max K"):
        compute_metrics(np.array(RANKS), TRUTH, ks=(2, 5))
    with pytest.raises(ValueError, match="convention"):
        compute_metrics(np.array(RANKS), TRUTH, ks=(2,), convention="mean")
    with pytest.raises(ValueError, match="rows"):
        compute_metrics(np.array(RANKS), TRUTH[:2], ks=(2,))


# --------------------------------------------------------------------------------------
# accumulate

def _random_case(rng, n_users=300, n_items=80, width=25, p_empty=0.2):
    ranks = np.stack([rng.permutation(n_items)[:width] for _ in range(n_users)])
    truth = []
    for _ in range(n_users):
        if rng.random() < p_empty:
            truth.append([])
        else:
            truth.append(sorted(rng.choice(n_items, rng.integers(1, 30), replace=False)))
    return ranks, truth


def test_result_keys_and_empty_accumulator():
    out = MetricAccumulator([20, 10]).result("reference")
    assert list(out) == ["recall@10", "recall@20", "ndcg@10", "ndcg@20", "precision@10",
                         "precision@20", "mrr@10", "mrr@20", "hr@10", "hr@20", "n_users",
                         "n_users_with_truth", "convention"]
    assert out["recall@10"] == 0.0 and out["n_users"] == 0


# --------------------------------------------------------------------------------------
# independent slow loop of the reference formulas

def _slow(ranks, truth, ks, convention):
    sums = {(m, k): 0.0 for m in ("recall", "ndcg", "precision", "mrr") for k in ks}
    with_truth = 0
    for ranked, gt in zip(ranks, truth):
        gt = set(int(x) for x in gt)
        if not gt:
            continue
        with_truth += 1
        for k in ks:
            hits, dcg, idcg, rr = 0, 0.0, 0.0, 0.0
            for j in range(k):
                if int(ranked[j]) in gt:
                    hits += 1
                    dcg += 1.0 / math.log2(j + 2)
                    if rr == 0.0:
                        rr = 1.0 / (j + 1)
                if j < len(gt):
                    idcg += 1.0 / math.log2(j + 2)
            sums["recall", k] += hits / len(gt)
            sums["precision", k] += hits / k
            sums["ndcg", k] += dcg / idcg
            sums["mrr", k] += rr
    denom = len(ranks) if convention == "reference" else with_truth
    return {f"{m}@{k}": v / denom for (m, k), v in sums.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("convention", ["reference", "users_with_truth"])
def test_vectorized_equals_slow_loop_on_random_data(seed, convention):
    rng = np.random.default_rng(seed)
    ranks, truth = _random_case(rng, n_users=250, n_items=120, width=100)
    ks = (10, 20, 50, 100)
    fast = compute_metrics(ranks, truth, ks=ks, convention=convention)
    slow = _slow(ranks, truth, ks, convention)
    for key, value in slow.items():
        assert fast[key] == pytest.approx(value, abs=1e-12), key
    assert fast["n_users_with_truth"] == sum(1 for t in truth if len(t))
