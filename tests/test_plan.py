import itertools
import json
import random

import pytest

from scale_diffrec.shard.plan import Plan, plan_placement, split_rows


def test_hand_checked_lpt_assignment():
    p = plan_placement([3, 7, 2, 5, 4, 3], 2)
    # order by (-size, id): c1(7) c3(5) c4(4) c0(3) c5(3) c2(2)
    # c1->w0 [7,0]; c3->w1 [7,5]; c4->w1 [7,9]; c0->w0 [10,9]; c5->w1 [10,12]; c2->w0 [12,12]
    assert p.assignment == [[0, 1, 2], [3, 4, 5]]
    assert [p.items(r) for r in range(2)] == [12, 12]
    assert p.owner(4) == 1 and p.clusters(0) == [0, 1, 2]
    assert p.imbalance() == 1.0


def test_hand_checked_three_workers_and_ties():
    # equal sizes: round robin by worker index (ties -> fewer clusters, then lower index)
    p = plan_placement([2, 2, 2, 2, 2], 3)
    assert p.assignment == [[0, 3], [1, 4], [2]]
    p = plan_placement([10, 1, 1, 1], 3)
    assert p.assignment == [[0], [1, 3], [2]]
    assert p.imbalance() == pytest.approx(10 / (13 / 3))


def test_params_weight_uses_decoder_params():
    sizes = [10, 10, 10]
    p = plan_placement(sizes, 2, weight="params", decoder_params=[100, 900, 500])
    # c1(900)->w0, c2(500)->w1, c0(100)->w1
    assert p.assignment == [[1], [0, 2]]
    assert [p.parameters(r) for r in range(2)] == [900, 600]
    assert [p.bytes(r) for r in range(2)] == [3600, 2400]
    assert p.load(0) == 900
    q = plan_placement(sizes, 2, weight="params", decoder_params=[100, 900, 500],
                       bytes_per_param=16)
    assert q.bytes(0) == 900 * 16


def test_zero_param_clusters_still_give_every_worker_a_cluster():
    p = plan_placement([1, 1, 1], 3, weight="params", decoder_params=[5, 0, 0])
    assert all(len(cs) == 1 for cs in p.assignment)


def _opt_makespan(loads, w):
    best = float("inf")
    for assign in itertools.product(range(w), repeat=len(loads)):
        tot = [0] * w
        for c, r in enumerate(assign):
            tot[r] += loads[c]
        best = min(best, max(tot))
    return best


def test_balance_within_four_thirds_of_brute_force_optimum():
    rng = random.Random(0)
    worst = 0.0
    for _ in range(150):
        w = rng.randint(1, 3)
        c = rng.randint(w, 8)
        sizes = [rng.choice([1, 2, 3, 5, 8, 13, 40, 100]) + rng.randint(0, 5) for _ in range(c)]
        p = plan_placement(sizes, w)
        got = max(p.items(r) for r in range(w))
        opt = _opt_makespan(sizes, w)
        assert got <= (4 / 3 - 1 / (3 * w)) * opt + 1e-9, (sizes, w, p.assignment)
        worst = max(worst, got / opt)
    # the classic tight LPT case: 2 workers, loads 3 3 2 2 2 -> LPT 7, optimum 6
    p = plan_placement([3, 3, 2, 2, 2], 2)
    assert max(p.items(r) for r in range(2)) == 7 and _opt_makespan([3, 3, 2, 2, 2], 2) == 6


def test_latent_columns_follow_global_cluster_order():
    # sizes 3 5 4 -> c1->w0, c2->w1, c0->w1 ; latent dims 3 2 4 -> offsets 0 3 5 9
    p = plan_placement([3, 5, 4], 2, latent_dims=[3, 2, 4])
    assert p.assignment == [[1], [0, 2]]
    assert p.latent_ranges(0) == [(3, 5)]
    assert p.latent_ranges(1) == [(0, 3), (5, 9)]
    assert p.col_sizes() == [2, 7]
    assert p.col_index() == [[3, 4], [0, 1, 2, 5, 6, 7, 8]]
    assert sorted(sum(p.col_index(), [])) == list(range(p.latent_dim)) and p.latent_dim == 9
    # adjacent clusters on one worker merge into one range
    q = plan_placement([1, 1, 1, 1], 2, latent_dims=[1, 2, 3, 4])
    assert q.assignment == [[0, 2], [1, 3]]
    r = Plan(cluster_sizes=[1, 1, 1], assignment=[[0, 1], [2]], latent_dims=[2, 2, 2])
    assert r.latent_ranges(0) == [(0, 4)]
    with pytest.raises(ValueError, match="latent_dims"):
        plan_placement([1, 2], 1).latent_ranges(0)


def test_row_splits():
    p = plan_placement([4, 4, 4], 3)
    assert p.row_splits(7) == [3, 2, 2]
    assert p.row_splits(2) == [1, 1, 0]
    assert p.row_splits(9) == [3, 3, 3]
    assert split_rows(0, 2) == [0, 0]


def test_json_round_trip():
    p = plan_placement([5, 1, 7, 3], 3, weight="params", latent_dims=[2, 1, 3, 2],
                       decoder_params=[50, 10, 70, 30], bytes_per_param=16)
    s = p.to_json()
    json.loads(s)
    q = Plan.from_json(s)
    assert q == p
    assert q.col_index() == p.col_index() and q.bytes(2) == p.bytes(2)
    assert Plan.from_json(plan_placement([1, 2], 2).to_json()).latent_dims is None


def test_describe_is_a_readable_table():
    p = plan_placement([5000, 1000, 7000, 3000, 40], 2, latent_dims=[20, 5, 30, 10, 2],
                       decoder_params=[5000 * 68, 1000 * 68, 7000 * 68, 3000 * 68, 40 * 68])
    text = p.describe()
    print(text)
    lines = text.splitlines()
    assert "5 clusters on 2 workers" in lines[0] and "items" in lines[0]
    assert lines[1].split()[:3] == ["worker", "clusters", "items"]
    assert len(lines) == 2 + 1 + 2
    assert "7,000" in text or "8,040" in text
    assert "0-1" in text or "0,1" in text or "2" in text
    assert "KiB" in text or "MiB" in text
    assert "-" in plan_placement([1, 2], 2).describe()  # no params / latent dims: dashes


@pytest.mark.parametrize("kwargs, match", [
    (dict(cluster_sizes=[1, 2], n_workers=3), "3 workers but only 2 clusters"),
    (dict(cluster_sizes=[], n_workers=1), "no clusters"),
    (dict(cluster_sizes=[1, 2], n_workers=0), "n_workers must be >= 1"),
    (dict(cluster_sizes=[1, 0], n_workers=1), ">= 1 item"),
    (dict(cluster_sizes=[1, 2], n_workers=1, weight="flops"), "weight must be one of"),
    (dict(cluster_sizes=[1, 2], n_workers=1, weight="params"), "needs decoder_params"),
    (dict(cluster_sizes=[1, 2], n_workers=1, weight="params", decoder_params=[1]),
     "1 entries for 2 clusters"),
    (dict(cluster_sizes=[1, 2], n_workers=1, latent_dims=[1]), "latent_dims has 1 entries"),
])
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_placement(**kwargs)


def test_invalid_plans_are_rejected():
    with pytest.raises(ValueError, match="placed on workers 0 and 1"):
        Plan(cluster_sizes=[1, 1], assignment=[[0], [0, 1]])
    with pytest.raises(ValueError, match=r"clusters \[1\] are not placed"):
        Plan(cluster_sizes=[1, 1], assignment=[[0]])
    with pytest.raises(ValueError, match="unknown cluster 5"):
        Plan(cluster_sizes=[1, 1], assignment=[[0, 1, 5]])
