"""The W-worker sharded L-DiffRec (models/ldiffrec.py with a Shard, wired by distributed/worker.py) equals the single-process LDiffRec.

W gloo processes, unequal clusters (44/30/16/6 items), both decoder forms, dropout on
(encoder input, reparameterisation noise, denoiser input): the global loss and the gradient
of every parameter of one step; the resampler state after 50 steps; every parameter after
an epoch of optimizer steps (reassembled by ``full_model_state``); and the metrics of the
distributed evaluation.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from scale_diffrec.train.distributed.local import run_distributed

RTOL, ATOL = 1e-5, 1e-6
SIZES = [44, 30, 16, 6]
BASE = ["model=ldiffrec", "data.source=synthetic", "data.synthetic.n_users=90",
        "data.synthetic.n_items=96", "data.synthetic.n_clusters=4",
        "data.synthetic.mean_items_per_user=9", "batch_size=32", "eval_batch_size=40",
        "topk=[10, 20]", "ldiffrec.n_clusters=4", "ldiffrec.in_dims=[16]",
        "ldiffrec.mlp_dims=[12]", "diffusion.steps=6", "seed=3",
        "ldiffrec.vae_anneal_steps=4", "lr=1e-2", "ldiffrec.lr_vae=2e-2"]
FORMS = {"global-decoder": [], "cluster-decoders": ["ldiffrec.out_dims=[6]"],
         "chunked-logits": ["ldiffrec.logit_chunk=7"]}
# epoch-level only: a frozen autoencoder takes no gradients in the step test's epoch 0
EPOCH_FORMS = {**FORMS, "frozen-residual": ["ldiffrec.frozen_autoencoder_epochs=1",
                                            "denoiser.residual=true"]}


def _setup(overrides):
    from scale_diffrec.config import load_config
    from scale_diffrec.data import load_data
    from scale_diffrec.train.distributed.trainer import build_plan
    from scale_diffrec.partition import Partition
    cfg = load_config(None, BASE + list(overrides))
    data = load_data(cfg)
    cluster_of = np.repeat(np.arange(len(SIZES)), SIZES)
    partition = Partition(np.random.default_rng(0).permutation(cluster_of), len(SIZES))
    return cfg, data, partition, build_plan


def _single(cfg, data, partition):
    from scale_diffrec.models import build_model, parameter_groups
    from scale_diffrec.train import seed_everything
    seed_everything(cfg["seed"])
    model = build_model(cfg, data.n_items, partition)
    return model, torch.optim.AdamW(parameter_groups(model, cfg))


def _sharded(cfg, data, partition, build_plan, world):
    from scale_diffrec.train.distributed.worker import ShardedRun
    from scale_diffrec.train import seed_everything
    seed_everything(cfg["seed"])
    return ShardedRun(cfg, data, partition, build_plan(cfg, partition, world), "cpu")


def _sharded_step(rank, world, overrides):
    """(global loss, {name: gradient}, the rows of decoder.* on this rank or None) of the
    sharded step 0 on this rank (the gradients before the optimizer steps); names as in
    LDiffRec's state_dict, the same as one process's."""
    from scale_diffrec.train.distributed.zero import gathered_grads
    cfg, data, partition, build_plan = _setup(overrides)
    run = _sharded(cfg, data, partition, build_plan, world)
    grads = {}
    run.optimizer.step = lambda: grads.update(        # the gradients, before the step
        {name: p.grad.clone() for name, p in run._local_named()},
        **{f"denoiser.{n}": g for n, g in gathered_grads(run.engine).items()})
    loss = run.loss_and_backward(np.arange(32))
    rows = run.model.decoder.items.clone() if run.model.global_decoder else None
    return loss, grads, rows


def _single_step(overrides):
    """The single-process reference, computed here (no process group: its sampler must not
    all-gather)."""
    from scale_diffrec.models import Progress
    cfg, data, partition, _ = _setup(overrides)
    model, _ = _single(cfg, data, partition)
    model.train()
    loss = model.training_loss(data.train.take_rows(np.arange(32)).to_torch(), Progress())["loss"]
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("form", list(FORMS))
def test_loss_and_every_gradient_equal_single_process(world, form):
    single_loss, single = _single_step(FORMS[form])
    results = run_distributed(_sharded_step, world, args=(FORMS[form],),
                              env={"DS_ACCELERATOR": "cpu"}, timeout=240)
    seen = set()
    for loss, grads, rows in results:
        assert loss == pytest.approx(single_loss, rel=RTOL)
        for name, got in grads.items():
            want = single[name][rows] if name.startswith("decoder.") else single[name]
            torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=name)
        seen |= set(grads)
    owned = {n for n in seen if not n.startswith(("denoiser.", "decoder."))}
    expected = {n for n in single if n.startswith(("encoders.", "decoders."))}
    assert owned == expected        # every cluster's parameters live on exactly one rank...
    assert sum(len(g) for _, g, _ in results) - world * sum(
        n.startswith(("denoiser.", "decoder.")) for n in seen) == len(expected)  # ...only there
    if "decoder.weight" in single:  # the global decoder's rows: each item's on one rank
        rows = torch.cat([r for _, _, r in results])
        assert torch.equal(torch.sort(rows).values, torch.arange(len(single["decoder.bias"])))


def _epoch(rank, world, overrides, zero_stage, eval_chunk):
    """Sharded: one epoch (3 optimizer steps), then (full state on rank 0 / None, sampler
    history, valid metrics scored ``eval_chunk`` items at a time)."""
    cfg, data, partition, build_plan = _setup(list(overrides) +
                                              [f"distributed.zero_stage={zero_stage}"])
    run = _sharded(cfg, data, partition, build_plan, world)
    run.train_epoch(0)
    if eval_chunk:                  # chunk_mib of [eval_batch_size, eval_chunk] floats
        run.cfg = {**cfg, "chunk_mib": eval_chunk * 4 * cfg["eval_batch_size"] / 2 ** 20}
    return run.full_model_state(), run.model.sampler.loss_history.clone(), run.evaluate("valid")


@pytest.mark.parametrize("world, zero_stage, form, eval_chunk", [
    (2, 1, "global-decoder", None), (3, 1, "global-decoder", 5), (2, 2, "global-decoder", None),
    (2, 3, "global-decoder", None), (3, 1, "cluster-decoders", 5),
    (2, 1, "frozen-residual", None)])
def test_epoch_parameters_and_evaluation_equal_single_process(world, zero_stage, form,
                                                               eval_chunk):
    # eval_chunk 5: each rank scores its items 5 at a time into a running top-k
    from scale_diffrec.evaluate import evaluate
    from scale_diffrec.models import Progress
    from scale_diffrec.train import train_epoch
    cfg, data, partition, _ = _setup(EPOCH_FORMS[form])
    model, optimizer = _single(cfg, data, partition)
    before = {n: v.clone() for n, v in model.state_dict().items()}
    train_epoch(model, optimizer, data, cfg, 0, Progress())
    single, metrics = model.state_dict(), evaluate(model, data, "valid", ks=cfg["topk"])
    if form == "frozen-residual":       # the epoch moved the denoiser (and sampler) alone
        assert {n for n in single if not torch.equal(single[n], before[n])} == \
            {n for n in single if n.startswith(("denoiser.", "sampler."))}
    results = run_distributed(_epoch, world, args=(EPOCH_FORMS[form], zero_stage, eval_chunk),
                              env={"DS_ACCELERATOR": "cpu"}, timeout=240)
    full = results[0][0]
    assert set(full) == set(single) and all(r[0] is None for r in results[1:])
    for name, value in single.items():
        torch.testing.assert_close(full[name], value, rtol=1e-4, atol=1e-5, msg=name)
    for _, history, sharded in results:
        assert torch.equal(history, results[0][1])
        for key in ("recall@10", "recall@20", "ndcg@20"):
            assert sharded[key] == pytest.approx(metrics[key], abs=1e-9), key


def _sampler_after_steps(rank, world, steps):
    from scale_diffrec.train import batches, epoch_order
    cfg, data, partition, build_plan = _setup(["diffusion.history_per_step=2"])
    run = _sharded(cfg, data, partition, build_plan, world)
    run.model.train()
    done = 0
    while done < steps:
        for users in batches(epoch_order(data.n_users, cfg["seed"], done), cfg["batch_size"]):
            run.loss_and_backward(users)
            done += 1
            if done == steps:
                break
    s = run.model.sampler
    return s.loss_history.clone(), s.loss_counts.clone(), s.probabilities(), s.warmed_up()


def test_resampler_identical_on_every_rank_after_50_steps():
    results = run_distributed(_sampler_after_steps, 3, args=(50,),
                              env={"DS_ACCELERATOR": "cpu"}, timeout=240)
    assert results[0][3]                      # warmed up: importance sampling in use
    for history, counts, probs, _ in results[1:]:
        assert torch.equal(history, results[0][0]) and torch.equal(counts, results[0][1])
        assert torch.equal(probs, results[0][2])


def _resumed(rank, world, zero_stage, run_dir):
    """Two epochs straight vs one epoch, its checkpoint (``ShardedCheckpoints.save``) ->
    a new ShardedRun -> one more epoch: (parameters after both, on rank 0)."""
    from pathlib import Path
    from scale_diffrec import checkpoint
    from scale_diffrec.train.distributed import trainer
    from scale_diffrec.train.loop import new_record
    cfg, data, partition, build_plan = _setup([f"distributed.zero_stage={zero_stage}"])
    straight = _sharded(cfg, data, partition, build_plan, world)
    for epoch in range(2):
        straight.train_epoch(epoch)
        straight.progress.epoch = epoch + 1
    first = _sharded(cfg, data, partition, build_plan, world)
    first.train_epoch(0)
    first.progress.epoch = 1
    record = {**new_record(), "resumed_at": []}
    trainer.ShardedCheckpoints(first, Path(run_dir), {}, record).save(first.progress, record,
                                                                      False)
    second = _sharded(cfg, data, partition, build_plan, world)
    second.load_state(checkpoint.latest(run_dir))
    second.train_epoch(1)
    return straight.full_model_state(), second.full_model_state()


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_checkpoint_round_trip_resumes_exactly(zero_stage, tmp_path):
    (straight, resumed), _ = run_distributed(_resumed, 2, args=(zero_stage, str(tmp_path)),
                                             env={"DS_ACCELERATOR": "cpu"}, timeout=240)
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-6, atol=1e-7, msg=name)


def _nan_evaluation(rank, world):
    """Rank 1's clusters score NaN: every rank must raise (none left in a collective)."""
    from scale_diffrec.errors import NonFiniteError
    cfg, data, partition, build_plan = _setup(FORMS["global-decoder"])
    run = _sharded(cfg, data, partition, build_plan, world)
    if rank == 1:
        with torch.no_grad():
            run.model.decoder.bias.fill_(float("nan"))
    try:
        run.evaluate("valid")
    except NonFiniteError as err:
        return str(err)
    return None


def test_non_finite_scores_stop_every_rank_of_the_evaluation():
    messages = run_distributed(_nan_evaluation, 2, env={"DS_ACCELERATOR": "cpu"}, timeout=240)
    assert all(m is not None and "NaN or infinite" in m for m in messages), messages
