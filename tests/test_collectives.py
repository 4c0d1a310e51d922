"""Autograd-aware collectives on gloo: forward values and gradients equal the single-process
computation on the concatenated tensors, for W = 1, 2, 3, unequal rows and column widths.

Convention (collectives.py): the ranks together compute L = sum_r L_r, rank r backpropagates
its own L_r; the reference computes the same L in one process.
"""
from __future__ import annotations

import pytest
import torch

from scale_diffrec.shard import collectives as C
from scale_diffrec.train.distributed.local import DistributedError, run_distributed

TOL = dict(rtol=1e-6, atol=1e-6)


def _case(world: int, splits, col_index, n_items_per_rank, dtype=torch.float64, seed=0):
    """All tensors of one test case, made once in the parent and sent to every rank."""
    g = torch.Generator().manual_seed(seed)
    b = sum(splits)
    d = sum(len(c) for c in col_index)
    n_items = sum(n_items_per_rank)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    item_perm = torch.randperm(n_items, generator=g)
    offs = torch.tensor([0] + list(n_items_per_rank)).cumsum(0).tolist()
    return {
        "splits": list(splits), "col_index": [list(c) for c in col_index],
        "col_sizes": [len(c) for c in col_index],
        "z": randn(b, d),                                        # global latent, global order
        "w_rows": [randn(n, d) for n in splits],                 # weights of rank r's L_r
        "x": randn(b, 2, 3),                                     # rows to gather (trailing dims)
        "v": [randn(b, 2, 3) for _ in range(world)],
        "logits": 3 * randn(b, n_items),
        "items": [item_perm[offs[r]:offs[r + 1]].tolist() for r in range(world)],
        "u": [randn(b) for _ in range(world)],
        "s": randn(b, 4),
        "t": [randn(b, 4) for _ in range(world)],
    }


def _rows(splits, r):
    a = sum(splits[:r])
    return slice(a, a + splits[r])


def _rank_computation(rank, case):
    """What rank ``rank`` does: its inputs as leaves, its outputs, its L_r, its gradients."""
    sp, ci, cs = case["splits"], case["col_index"], case["col_sizes"]
    out = {}
    z_cols = case["z"][:, ci[rank]].clone().requires_grad_()
    zr = C.rows_to_owners(z_cols, sp, cs, col_index=ci)
    (case["w_rows"][rank] * torch.sin(zr)).sum().backward()
    out["rows_to_owners"], out["rows_to_owners.grad"] = zr.detach(), z_cols.grad

    x = case["x"][_rows(sp, rank)].clone().requires_grad_()
    xg = C.gather_rows(x, sp)
    (case["v"][rank] * torch.sin(xg)).sum().backward()
    out["gather_rows"], out["gather_rows.grad"] = xg.detach(), x.grad

    lg = case["logits"][:, case["items"][rank]].clone().requires_grad_()
    lse = C.parallel_logsumexp(torch.logsumexp(lg, dim=1))
    # replicated output: a different random function of it on every rank (L = sum_r L_r)
    (case["u"][rank] * lse + 0.1 * lse ** 2).sum().backward()
    out["lse"], out["lse.grad"] = lse.detach(), lg.grad

    s = case["s"].clone().requires_grad_()
    tot = C.all_reduce_sum(s * (rank + 1))
    (case["t"][rank] * torch.cos(tot)).sum().backward()
    out["sum"], out["sum.grad"] = tot.detach(), s.grad
    return out


def _reference(world, case):
    """Single process: the same L on the full tensors; per-rank expected outputs and grads."""
    sp, ci = case["splits"], case["col_index"]
    exp = [dict() for _ in range(world)]
    z = case["z"].clone().requires_grad_()
    sum((case["w_rows"][r] * torch.sin(z[_rows(sp, r)])).sum() for r in range(world)).backward()
    x = case["x"].clone().requires_grad_()
    sum((case["v"][r] * torch.sin(x)).sum() for r in range(world)).backward()
    lg = case["logits"].clone().requires_grad_()
    lse = torch.logsumexp(lg, dim=1)
    sum((case["u"][r] * lse + 0.1 * lse ** 2).sum() for r in range(world)).backward()
    s = [case["s"].clone().requires_grad_() for _ in range(world)]  # one copy per rank
    tot = sum(s[r] * (r + 1) for r in range(world))
    sum((case["t"][r] * torch.cos(tot)).sum() for r in range(world)).backward()
    for r in range(world):
        exp[r]["rows_to_owners"] = case["z"][_rows(sp, r)]
        exp[r]["rows_to_owners.grad"] = z.grad[:, ci[r]]
        exp[r]["gather_rows"] = case["x"]
        exp[r]["gather_rows.grad"] = x.grad[_rows(sp, r)]
        exp[r]["lse"] = lse.detach()
        exp[r]["lse.grad"] = lg.grad[:, case["items"][r]]
        exp[r]["sum"] = tot.detach()
        exp[r]["sum.grad"] = s[r].grad
    return exp


def _worker(rank, world, cases):
    assert C.world() == (world, rank)
    return [_rank_computation(rank, case) for case in cases]


CASES = {
    1: [_case(1, [5], [[0, 1, 2, 3, 4, 5]], [7]),
        _case(1, [4], [[2, 0, 1]], [5], seed=1)],                  # W = 1, permuted columns
    2: [_case(2, [4, 3], [[0, 1, 2], [3, 4, 5, 6, 7]], [6, 3]),  # contiguous column blocks
        _case(2, [4, 3], [[2, 5, 7], [0, 1, 3, 4, 6]], [4, 9], seed=1),
        _case(2, [4, 3], [[1, 3], [0, 2, 4]], [5, 2], dtype=torch.float32, seed=2)],
    3: [_case(3, [3, 2, 2], [[4, 6], [0, 1, 5, 7], [2, 3]], [5, 1, 8]),   # B = 7, W = 3
        _case(3, [1, 1, 0], [[3], [0, 2, 4], [1]], [2, 6, 3], seed=1),    # a rank with no rows
        _case(3, [5, 0, 4], [[0, 1, 2], [3], [4, 5]], [3, 3, 3], seed=2)],
}


@pytest.fixture(scope="module")
def results():
    """One process group per world size, all cases in it (spawning dominates the cost)."""
    return {w: run_distributed(_worker, w, args=(CASES[w],), timeout=90) for w in (1, 2, 3)}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_values_and_gradients_match_single_process(results, world):
    for k, case in enumerate(CASES[world]):
        exp = _reference(world, case)
        for r in range(world):
            got = results[world][r][k]
            assert set(got) == set(exp[r])
            for name in exp[r]:
                assert got[name].dtype == case["z"].dtype, name
                torch.testing.assert_close(got[name], exp[r][name].to(got[name].dtype), **TOL,
                                           msg=lambda m: f"W={world} case {k} rank {r} {name}: {m}")


def test_no_process_group_is_identity():
    assert C.world() == (1, 0)
    case = _case(1, [4], [[2, 0, 1]], [5])
    got = _rank_computation(0, case)
    exp = _reference(1, case)[0]
    for name in exp:
        torch.testing.assert_close(got[name], exp[name], **TOL)
    x = torch.randn(3, 2)
    assert C.gather_rows(x, [3]) is x and C.all_reduce_sum(x) is x
    assert C.rows_to_owners(x, [3], [2]) is x


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"expected z_cols of shape \[3, 4\]"):
        C.rows_to_owners(torch.zeros(3, 2), [3], [4])
    with pytest.raises(ValueError, match="2 row splits for a world of size 1"):
        C.gather_rows(torch.zeros(3, 2), [2, 1])
    with pytest.raises(ValueError, match="permutation"):
        C.rows_to_owners(torch.zeros(3, 2), [3], [2], col_index=[[0, 0]])


def _failing_worker(rank, world):
    if rank == 1:
        raise KeyError("boom on rank one")
    torch.distributed.barrier()  # rank 0 waits for a partner that never comes


def test_run_distributed_reports_the_failing_rank():
    with pytest.raises(DistributedError, match=r"(?s)rank 1:.*KeyError: 'boom on rank one'"):
        run_distributed(_failing_worker, 2, timeout=60, grace=1.0)
