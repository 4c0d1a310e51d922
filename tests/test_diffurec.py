"""DiffuRec (models/diffurec.py, models/approximator.py): shapes, the catalogue CE, W-worker
loss / gradients / lossaware history / ranking / reverse chain == one process (W = 2, 3;
gloo), the
respaced reverse chain, HR/NDCG of a hand-made ranking, the pad never ranked."""
from __future__ import annotations

import math

import numpy as np
import pydantic
import pytest
import torch
import torch.nn.functional as F

from scale_diffrec.data.csr import CSR
from scale_diffrec.metrics import MetricAccumulator
from scale_diffrec.data.sequences import SequenceBatch
from scale_diffrec.models.diffurec import DiffuRec
from scale_diffrec.schema import DiffuRecConfig
from scale_diffrec.partition import Partition
from scale_diffrec.train.distributed.local import run_distributed

SIZES = [11, 7, 5, 3]          # uneven clusters, 26 items
N_ITEMS, B, L = sum(SIZES), 13, 6
RTOL, ATOL = 1e-5, 1e-6


def tiny_cfg(**kw) -> DiffuRecConfig:
    base = dict(hidden=8, blocks=2, heads=2, steps=8, max_len=L, dropout=0.0, emb_dropout=0.0,
                sampler="lossaware", logit_chunk=4)
    return DiffuRecConfig(**{**base, **kw})


def partition() -> Partition:
    cluster_of = np.repeat(np.arange(len(SIZES)), SIZES)
    return Partition(np.random.default_rng(0).permutation(cluster_of), len(SIZES))


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded inputs [B, L] (pad = N_ITEMS, one row all padding but its last item)."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, N_ITEMS, (B, L), generator=g)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    inputs[torch.arange(L)[None, :] < (L - lengths)[:, None]] = N_ITEMS
    inputs[0, :-1] = N_ITEMS
    return inputs, torch.randint(0, N_ITEMS, (B,), generator=g)


def test_shapes_names_and_the_loss_is_the_catalogue_cross_entropy():
    model = DiffuRec(N_ITEMS, tiny_cfg(), partition())
    assert model.item_embeddings.weight.shape == (N_ITEMS, 8)
    assert "item_embeddings.weight" in dict(model.named_parameters())
    assert "item_embeddings.bias" not in dict(model.named_parameters())
    inputs, targets = batch()
    out = model.sequence_loss(inputs, targets, step=0)
    assert out["loss"].shape == () and torch.equal(out["loss"].detach(), out["ce"])
    # the chunked catalogue CE (4 items a chunk) == cross-entropy of x0hat . E^T
    x0hat = torch.randn(B, 8)
    want = F.cross_entropy(x0hat @ model.item_embeddings.weight.T, targets, reduction="none")
    torch.testing.assert_close(model.catalogue_ce(x0hat, targets), want)
    # the pad looks up zeros; every other id its row of E
    emb = model.embed(torch.tensor([N_ITEMS, 3]))
    assert torch.equal(emb[0], torch.zeros(8))
    assert torch.equal(emb[1], model.item_embeddings.weight[3])
    q = model.denoise(inputs)
    assert q.shape == (B, 8) and model.score(SequenceBatch(inputs, targets)).shape == (B, N_ITEMS)


def _draws_x0hat(model, inputs, targets, step):
    """x0hat [B, d] recomputed from the model's own parts and draws (module docstring)."""
    t, eps, lam = model.draws(B, L, step, "cpu")
    e = model.item_embeddings.weight
    seq = model.denoiser.norm(e[inputs.clamp(max=N_ITEMS - 1)]
                              * (inputs != N_ITEMS)[..., None])
    x_t = model.diffusion.q_sample(e[targets], t, eps)
    return model.denoiser.approximator(seq, (inputs != N_ITEMS).float(), x_t,
                                       t * 1000.0 / 8, lam)


def test_training_loss_is_the_mean_ce_of_the_approximators_x0():
    model = DiffuRec(N_ITEMS, tiny_cfg(), partition())
    inputs, targets = batch()
    loss = model.sequence_loss(inputs, targets, step=3)["loss"]
    x0hat = _draws_x0hat(model, inputs, targets, 3)
    want = F.cross_entropy(x0hat @ model.item_embeddings.weight.T, targets)
    torch.testing.assert_close(loss, want)


def _rank_run(rank, world, steps):
    """Rank ``rank`` of ``world`` (world 0: one process): (per step: (L_r, ce, {name: grad})),
    the owned items, the lossaware history and counts, the top-5 of a fixed query."""
    from scale_diffrec.shard.context import Shard
    from scale_diffrec.shard.plan import plan_placement
    shard = None if world == 0 else Shard.of_process_group(plan_placement(SIZES, world))
    model = DiffuRec(N_ITEMS, tiny_cfg(), partition(), shard)
    model.train()
    out = []
    for step in range(steps):
        model.zero_grad()
        inputs, targets = batch(step)
        got = model.sequence_loss(inputs, targets, step)
        got["loss"].backward()
        out.append((got["loss"].item(), got["ce"].item(),
                    {n: p.grad.clone() for n, p in model.named_parameters()}))
    query = torch.randn(B, 8, generator=torch.Generator().manual_seed(9))
    s = model.sampler
    chain = model.denoise(batch(7)[0])
    return (out, model.item_embeddings.items.clone(), s.loss_history.clone(),
            s.loss_counts.clone(), model.top_k(query, 5, chunk=3), chain)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_loss_gradients_history_and_ranking_equal_one_process(world):
    steps = 3
    single, items, history, counts, top, chain = _rank_run(0, 0, steps)
    assert torch.equal(items, torch.arange(N_ITEMS))
    results = run_distributed(_rank_run, world, args=(steps,), timeout=240)
    owned = torch.sort(torch.cat([r[1] for r in results])).values
    assert torch.equal(owned, torch.arange(N_ITEMS))          # each item on exactly one rank
    for step in range(steps):
        want_loss, want_ce, want = single[step]
        assert sum(r[0][step][0] for r in results) == pytest.approx(want_loss, rel=RTOL)
        for r in results:
            assert r[0][step][1] == pytest.approx(want_ce, rel=RTOL)
            torch.testing.assert_close(r[0][step][2]["item_embeddings.weight"],
                                       want["item_embeddings.weight"][r[1]],
                                       rtol=RTOL, atol=ATOL)
        for name, grad in want.items():       # replicated parts: summed over ranks
            if name != "item_embeddings.weight":
                got = sum(r[0][step][2][name] for r in results)
                torch.testing.assert_close(got, grad, rtol=RTOL, atol=ATOL, msg=name)
    assert int(counts.sum()) == steps * B
    for r in results:                          # lossaware: the same history on every rank
        assert torch.equal(r[3], counts) and torch.equal(r[2], results[0][2])
        torch.testing.assert_close(r[2], history, rtol=RTOL, atol=ATOL)
        assert torch.equal(r[4], top)
        torch.testing.assert_close(r[5], chain, rtol=RTOL, atol=ATOL)   # the reverse chain


def test_a_sequences_query_depends_on_the_sequence_and_seed_alone():
    """The reverse chain's draws are the row's own (keyed by seed and input): the same
    query twice, in any batch, whatever the global RNG; another seed draws others."""
    model = DiffuRec(N_ITEMS, tiny_cfg(), partition(), seed=3)
    inputs = batch(5)[0]
    torch.manual_seed(1)
    whole = model.denoise(inputs)
    torch.manual_seed(2)
    assert torch.equal(model.denoise(inputs), whole)
    order = torch.tensor([9, 2, 12, 0])
    torch.testing.assert_close(model.denoise(inputs[order]), whole[order], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(model.denoise(inputs[3:4]), whole[3:4], rtol=RTOL, atol=ATOL)
    reseeded = DiffuRec(N_ITEMS, tiny_cfg(), partition(), seed=4)
    reseeded.load_state_dict(model.state_dict())
    assert not torch.allclose(reseeded.denoise(inputs), whole, atol=1e-4)


@pytest.mark.parametrize("spec, kept", [(None, list(range(8))), ("ddim4", [0, 2, 4, 6]),
                                        ("3", [0, 4, 7])])
def test_reverse_chain_runs_the_space_timesteps_steps(spec, kept):
    model = DiffuRec(N_ITEMS, tiny_cfg(reverse_steps=spec), partition())
    seen = []
    model.denoiser.approximator.register_forward_hook(
        lambda m, args, out: seen.append(args[3][0].item()))
    q = model.denoise(batch()[0])
    assert seen == [k * 1000.0 / 8 for k in reversed(kept)]
    assert torch.isfinite(q).all()


def test_hr_and_ndcg_of_a_hand_made_ranking_and_the_pad_is_never_ranked():
    n, d = 15, 16
    model = DiffuRec(n, tiny_cfg(hidden=d, heads=2))
    with torch.no_grad():
        model.item_embeddings.weight.copy_(torch.eye(n, d))     # score of item i = query[i]
    scores = torch.arange(n, 0, -1, dtype=torch.float32).repeat(3, 1)  # item i at rank i
    query = F.pad(scores, (0, d - n))
    targets = [0, 3, 12]                  # ranks 0, 3 and 12 (outside the top 10)
    top = model.top_k(query, 10, chunk=4)
    assert torch.equal(top, torch.arange(10).repeat(3, 1))
    got = MetricAccumulator(ks=[10]).add(top, [[t] for t in targets]).result()
    assert got["recall@10"] == pytest.approx(2 / 3)           # HR@10: one target per user
    assert got["ndcg@10"] == pytest.approx((1 + 1 / math.log2(5)) / 3)
    everything = model.top_k(query, n + 5)
    assert set(everything[0].tolist()) == set(range(n)) | {-1}   # the pad (id n) never
    masked = model.top_k(query, 10, exclude=CSR.from_pairs(np.array([0, 0]), np.array([0, 2]),
                                                           3, n))
    assert masked[0].tolist() == [1] + list(range(3, 12)) and masked[1, 0] == 0


def test_bad_settings_are_refused_by_the_schema():
    for bad in ({"reverse_steps": "40"}, {"hidden": 10, "heads": 4}, {"dropout": 1.0},
                {"schedule": "pw_lin", "steps": 8}, {"sampler": "importance"}):
        with pytest.raises(pydantic.ValidationError):
            DiffuRecConfig(**bad)
