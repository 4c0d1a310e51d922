"""The denoiser under DeepSpeed ZeRO 1/2/3 on 2 gloo CPU processes equals single-process AdamW.

Two models, for every stage, 3 steps on a global batch of 7 rows split 4 + 3:
* a plain MLP, data-parallel (``rank loss = sum over its rows / B``, ``hybrid_backward``);
* a miniature of the hybrid L-DiffRec: per-cluster encoders and decoders placed on the
  ranks by ``plan_placement`` (not replicated, plain AdamW), the ZeRO denoiser on the rows
  each rank owns (``rows_to_owners``), ``gather_rows`` back, per-cluster decoders and a
  catalogue-parallel softmax (``parallel_logsumexp``). Every parameter after 3 steps equals
  the single-process model's trained with one AdamW on the whole batch.
"""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from scale_diffrec.train.distributed.local import run_distributed

B = 7
STAGES = (1, 2, 3)
OPT = {"lr": 1e-2, "weight_decay": 0.01}
STEPS = 3
RTOL, ATOL = 1e-5, 1e-6

# mini hybrid model: 3 clusters of 3, 5, 4 items with latent widths 3, 2, 4
CLUSTER_ITEMS = [3, 5, 4]
LATENT = [3, 2, 4]


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _mlp_data(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(B, 4, generator=g), torch.randn(B, 3, generator=g)


def _hybrid(seed=0):
    """All modules of the mini hybrid model, built in one fixed order (same init everywhere)."""
    torch.manual_seed(seed)
    d = sum(LATENT)
    enc = nn.ModuleList(nn.Linear(i, k) for i, k in zip(CLUSTER_ITEMS, LATENT))
    den = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, d))
    dec = nn.ModuleList(nn.Linear(k, i) for i, k in zip(CLUSTER_ITEMS, LATENT))
    return enc, den, dec


def _hybrid_data(step):
    g = torch.Generator().manual_seed(200 + step)
    x = (torch.rand(B, sum(CLUSTER_ITEMS), generator=g) < 0.4).float()
    x[:, 0] = 1.0  # every user has an item
    noise = torch.randn(B, sum(LATENT), generator=g)
    return x, noise


def _item_offsets():
    offs = [0]
    for n in CLUSTER_ITEMS:
        offs.append(offs[-1] + n)
    return offs


def _lat_offsets():
    offs = [0]
    for n in LATENT:
        offs.append(offs[-1] + n)
    return offs


def _hybrid_loss_single(enc, den, dec, x, noise):
    """Reference: the global-batch mean loss in one process."""
    io, lo = _item_offsets(), _lat_offsets()
    z = torch.cat([enc[c](x[:, io[c]:io[c + 1]]) for c in range(len(enc))], dim=1)
    zhat = den(z + 0.5 * noise)
    diff = ((zhat - z) ** 2).sum(1)
    logits = torch.cat([dec[c](zhat[:, lo[c]:lo[c + 1]]) for c in range(len(dec))], dim=1)
    nll = -(x * torch.log_softmax(logits, 1)).sum(1)
    reg = 0.1 * (z ** 2).sum(1)
    return (diff + nll + reg).mean()


def _zero_worker(rank, world, stages):
    t0 = time.perf_counter()
    from scale_diffrec.shard import collectives as C
    from scale_diffrec.shard.plan import plan_placement, split_rows
    from scale_diffrec.train.distributed.zero import (gathered_grads, gathered_state_dict, hybrid_backward,
                                             import_deepspeed, init_denoiser_engine)
    import_deepspeed()
    out = {"import_s": time.perf_counter() - t0, "init_s": {}}
    SPLITS = split_rows(B, world)  # noqa: N806 - [7] or [4, 3]
    rows = slice(sum(SPLITS[:rank]), sum(SPLITS[:rank + 1]))
    for stage in stages:
        # -- plain data-parallel MLP
        t0 = time.perf_counter()
        engine = init_denoiser_engine(_mlp(), OPT, stage)
        out["init_s"][stage] = time.perf_counter() - t0
        for step in range(STEPS):
            x, y = _mlp_data(step)
            loss_r = ((engine(x[rows]) - y[rows]) ** 2).sum() / B
            hybrid_backward(engine, loss_r)
            if step == 0:
                out[("mlp.grad", stage)] = gathered_grads(engine)
            engine.step()
        out[("mlp", stage)] = gathered_state_dict(engine)

        # -- mini hybrid model
        plan = plan_placement(CLUSTER_ITEMS, world, latent_dims=LATENT)
        mine = plan.clusters(rank)
        enc, den, dec = _hybrid()
        engine = init_denoiser_engine(den, OPT, stage)
        local = [p for c in mine for m in (enc[c], dec[c]) for p in m.parameters()]
        opt = torch.optim.AdamW(local, **OPT)
        io, lo = _item_offsets(), _lat_offsets()
        my_cols = plan.latent_columns(rank)
        for step in range(STEPS):
            x, noise = _hybrid_data(step)
            z_cols = torch.cat([enc[c](x[:, io[c]:io[c + 1]]) for c in mine], dim=1)  # [B, d_r]
            z_rows = C.rows_to_owners(z_cols, SPLITS, plan.col_sizes(), plan.col_index())
            zhat_rows = engine(z_rows + 0.5 * noise[rows])                           # [B_r, d]
            diff = ((zhat_rows - z_rows) ** 2).sum()
            zhat = C.gather_rows(zhat_rows, SPLITS)                                  # [B, d]
            logits = [dec[c](zhat[:, lo[c]:lo[c + 1]]) for c in mine]
            xs = [x[:, io[c]:io[c + 1]] for c in mine]
            lse = C.parallel_logsumexp(torch.logsumexp(torch.cat(logits, 1), 1))     # [B]
            ll_items = sum((xc * lc).sum() for xc, lc in zip(xs, logits))
            ll_norm = (x[rows].sum(1) * lse[rows]).sum()  # replicated term: owned rows only
            reg = 0.1 * (z_cols ** 2).sum()
            loss_r = (diff - ll_items + ll_norm + reg) / B
            opt.zero_grad()
            hybrid_backward(engine, loss_r, local)
            if step == 0:
                g = {f"den.{k}": v for k, v in gathered_grads(engine).items()}
                for c in mine:
                    g.update({f"enc.{c}.{k}": p.grad.clone() for k, p in enc[c].named_parameters()})
                    g.update({f"dec.{c}.{k}": p.grad.clone() for k, p in dec[c].named_parameters()})
                out[("hybrid.grad", stage)] = g
            engine.step()
            opt.step()
        state = {f"den.{k}": v for k, v in gathered_state_dict(engine).items()}
        for c in mine:
            for name, m in (("enc", enc[c]), ("dec", dec[c])):
                state.update({f"{name}.{c}.{k}": v.detach().clone()
                              for k, v in m.state_dict().items()})
        out[("hybrid", stage)] = state
        assert not any(k.startswith(("enc", "dec")) and int(k.split(".")[1]) not in mine
                       for k in state)
        assert len(my_cols) == plan.col_sizes()[rank]
    return out


def _mlp_reference():
    """(parameters after STEPS AdamW steps, gradients of the first step)."""
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), **OPT)
    for step in range(STEPS):
        x, y = _mlp_data(step)
        opt.zero_grad()
        ((model(x) - y) ** 2).sum(1).mean().backward()
        if step == 0:
            grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}, grads


def _hybrid_reference():
    enc, den, dec = _hybrid()
    params = list(enc.parameters()) + list(den.parameters()) + list(dec.parameters())
    opt = torch.optim.AdamW(params, **OPT)

    def named(attr):
        out = {f"den.{k}": attr(v) for k, v in den.named_parameters()}
        for c in range(len(CLUSTER_ITEMS)):
            out.update({f"enc.{c}.{k}": attr(v) for k, v in enc[c].named_parameters()})
            out.update({f"dec.{c}.{k}": attr(v) for k, v in dec[c].named_parameters()})
        return out

    for step in range(STEPS):
        x, noise = _hybrid_data(step)
        opt.zero_grad()
        _hybrid_loss_single(enc, den, dec, x, noise).backward()
        if step == 0:
            grads = named(lambda p: p.grad.clone())
        opt.step()
    return named(lambda p: p.detach().clone()), grads


@pytest.fixture(scope="module", params=[1, 2], ids=["W1-no-process-group", "W2-gloo"])
def zero_results(request):
    """W = 2: a gloo group of 2; W = 1: no process group (the engine starts a 1-rank one)."""
    world = request.param
    t0 = time.perf_counter()
    res = run_distributed(_zero_worker, world, args=(STAGES,), env={"DS_ACCELERATOR": "cpu"},
                          timeout=240, backend="gloo" if world > 1 else None)
    inits = ", ".join(f"{k}: {v:.2f} s" for k, v in res[0]["init_s"].items())
    print(f"\n{world}-rank ZeRO run: {time.perf_counter() - t0:.1f} s; import deepspeed "
          f"{res[0]['import_s']:.1f} s; deepspeed.initialize (rank 0) per stage (first includes "
          f"process-group set-up): {inits}")
    return res


@pytest.mark.parametrize("stage", STAGES)
def test_zero_mlp_equals_single_process_adamw(zero_results, stage):
    ref, ref_grad = _mlp_reference()
    for r, res in enumerate(zero_results):
        # AdamW is blind to a constant gradient scale, so check the gradients themselves too
        for what, exp in ((("mlp.grad", stage), ref_grad), (("mlp", stage), ref)):
            got = res[what]
            assert set(got) == set(exp)
            for k in exp:
                torch.testing.assert_close(got[k], exp[k], rtol=RTOL, atol=ATOL,
                                           msg=lambda m: f"{what} rank {r} {k}: {m}")
    # the parameters did move (3 AdamW steps of lr 1e-2)
    assert (ref["0.weight"] - _mlp().state_dict()["0.weight"]).abs().max() > 1e-3


@pytest.mark.parametrize("stage", STAGES)
def test_zero_hybrid_model_equals_single_process(zero_results, stage):
    ref, ref_grad = _hybrid_reference()
    seen = set()
    for r, res in enumerate(zero_results):
        for what, exp in ((("hybrid.grad", stage), ref_grad), (("hybrid", stage), ref)):
            got = res[what]
            assert set(got) <= set(exp)
            for k, v in got.items():
                torch.testing.assert_close(v, exp[k], rtol=RTOL, atol=ATOL,
                                           msg=lambda m: f"{what} rank {r} {k}: {m}")
        seen |= set(res[("hybrid", stage)])
    assert seen == set(ref)  # every cluster's encoder/decoder lives on exactly one rank


def test_deepspeed_initialize_takes_seconds(zero_results):
    for r, res in enumerate(zero_results):
        assert res["init_s"][STAGES[0]] < 30, res["init_s"]  # seconds, no op compilation


# ----------------------------------------------------------------------------- resharding
def _mlp_steps(engine, world, rank, steps):
    from scale_diffrec.shard.plan import split_rows
    from scale_diffrec.train.distributed.zero import hybrid_backward
    splits = split_rows(B, world)
    rows = slice(sum(splits[:rank]), sum(splits[:rank + 1]))
    for step in steps:
        x, y = _mlp_data(step)
        hybrid_backward(engine, ((engine(x[rows]) - y[rows]) ** 2).sum() / B)
        engine.step()


def _zero_saved_then_loaded(rank, world, stage, saved):
    """``saved`` None: STEPS steps from the start; else load ``saved`` (written by another
    world size) into a fresh engine and take 2 more steps. Returns (parameters, the whole
    AdamW state per parameter name), both from ``gathered_state_dict`` /
    ``full_optimizer_state``."""
    from scale_diffrec.train.distributed.zero import (full_optimizer_state, gathered_state_dict,
                                             init_denoiser_engine, load_denoiser_state)
    # the resumed engine starts from other values than the saved ones
    engine = init_denoiser_engine(_mlp(seed=0 if saved is None else 1), OPT, stage)
    if saved is None:
        _mlp_steps(engine, world, rank, range(STEPS))
    else:
        load_denoiser_state(engine, *saved)
        _mlp_steps(engine, world, rank, range(STEPS, STEPS + 2))
    return gathered_state_dict(engine), full_optimizer_state(engine)


def _adamw_reference(steps):
    from scale_diffrec.checkpoint import optimizer_state
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), **OPT)
    for step in range(steps):
        x, y = _mlp_data(step)
        opt.zero_grad()
        ((model(x) - y) ** 2).sum(1).mean().backward()
        opt.step()
    return ({k: v.detach() for k, v in model.state_dict().items()},
            optimizer_state(opt, list(model.named_parameters())))


def _assert_state(got, want):
    assert set(got) == set(want)
    for k, v in want.items():
        if isinstance(v, dict):
            _assert_state(got[k], v)
        else:
            torch.testing.assert_close(got[k], v, rtol=RTOL, atol=ATOL, msg=k)


@pytest.mark.parametrize("stage, before, after", [(1, 2, 3), (2, 3, 2), (3, 2, 1), (0, 1, 2)])
def test_zero_state_written_by_w_workers_resumes_on_w_prime(stage, before, after):
    """The consolidated state equals one process's AdamW state, and loading it on another
    number of ranks continues exactly as one process does."""
    ref_saved, ref_after = _adamw_reference(STEPS), _adamw_reference(STEPS + 2)
    saved = run_distributed(_zero_saved_then_loaded, before, args=(stage, None),
                            env={"DS_ACCELERATOR": "cpu"}, timeout=240)
    for params, optimizer in saved:
        _assert_state(params, ref_saved[0])
        _assert_state(optimizer, ref_saved[1])
    assert ref_saved[1]["0.weight"]["step"] == STEPS
    resumed = run_distributed(_zero_saved_then_loaded, after, args=(stage, saved[0]),
                              env={"DS_ACCELERATOR": "cpu"}, timeout=240)
    for params, optimizer in resumed:
        _assert_state(params, ref_after[0])
        _assert_state(optimizer, ref_after[1])
