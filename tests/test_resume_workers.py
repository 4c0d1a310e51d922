"""Resume with another number of workers: W -> W' continues as the uninterrupted run.

A run of E epochs on W workers (gloo processes running the Ray workers' ``_restore`` /
``_save``), or in one process (``train``), then E' more epochs on W' workers or in one
process from its checkpoint, must end with the same checkpoint content (every parameter,
every AdamW moment and step count, the sampler, the progress) as one process trained for
E + E' epochs straight: by the invariant W-run == one process, that is also what a W'-run
from the same state gives. Unequal clusters, the global decoder (whose rows are cut by
cluster) and per-cluster decoders, ZeRO stages 1 to 3; the newest complete checkpoint is
found among last.pt and the sharded directories, an incomplete directory is ignored.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from scale_diffrec import checkpoint, runs
from scale_diffrec.train.distributed.local import run_distributed

SIZES = [44, 30, 16, 6]
BASE = ["model=ldiffrec", "data.source=synthetic", "data.synthetic.n_users=90",
        "data.synthetic.n_items=96", "data.synthetic.n_clusters=4",
        "data.synthetic.mean_items_per_user=9", "batch_size=32", "eval_batch_size=40",
        "eval_every=1", "topk=[10, 20]", "ldiffrec.n_clusters=4", "ldiffrec.in_dims=[16]",
        "ldiffrec.mlp_dims=[12]", "diffusion.steps=6", "seed=3",
        "ldiffrec.vae_anneal_steps=4", "lr=1e-2", "ldiffrec.lr_vae=2e-2",
        "diffusion.history_per_step=2"]


def _cfg(tmp_path: Path, *sets: str) -> dict:
    from scale_diffrec.config import load_config
    from scale_diffrec.partition import Partition
    path = tmp_path / "partition.parquet"
    if not path.is_file():
        cluster_of = np.repeat(np.arange(len(SIZES)), SIZES)
        Partition(np.random.default_rng(0).permutation(cluster_of), len(SIZES)).save(path)
    return load_config(None, BASE + [f"ldiffrec.partition={path}", *sets])


def _sharded(rank, world, cfg, run_dir, epochs):
    """Resume a W-worker run from the newest checkpoint in ``run_dir`` (none: start), train
    to ``epochs`` and write its sharded checkpoint, as a Ray worker does."""
    from scale_diffrec.data import load_data
    from scale_diffrec.train.distributed import trainer
    from scale_diffrec.train.distributed.worker import ShardedRun
    from scale_diffrec.partition import Partition
    from scale_diffrec.train import seed_everything
    data = load_data(cfg)
    partition = Partition.load(cfg["ldiffrec"]["partition"], n_items=data.n_items)
    seed_everything(cfg["seed"])
    run = ShardedRun(cfg, data, partition, trainer.build_plan(cfg, partition, world), "cpu")
    record = trainer._restore(run, checkpoint.latest(run_dir), rank)
    started = run.progress.epoch
    for epoch in range(started, epochs):
        run.train_epoch(epoch)
        run.progress.epoch = epoch + 1
    trainer.ShardedCheckpoints(run, Path(run_dir), {}, record).save(run.progress, record, False)
    return started


def _train(world, cfg, run_dir, epochs, resume):
    """E epochs on ``world`` workers (0: the single-process trainer); returns the epoch it
    started at."""
    from scale_diffrec.train import train
    cfg = {**cfg, "epochs": epochs}
    if world == 0:
        return train(cfg, run_dir, resume=resume)["history"][0]["epoch"] - 1
    return run_distributed(_sharded, world, args=(cfg, str(run_dir), epochs),
                           env={"DS_ACCELERATOR": "cpu"}, timeout=300)[0]


def _content(cfg, run_dir) -> dict:
    from scale_diffrec.data import load_data
    from scale_diffrec.models import build_model
    from scale_diffrec.partition import Partition
    data = load_data(cfg)
    model = build_model(cfg, data.n_items, Partition.load(cfg["ldiffrec"]["partition"]))
    return checkpoint.latest(run_dir).full(model)


def _assert_same(got, want, where=""):
    if isinstance(want, dict):
        assert set(got) == set(want), where
        for k in want:
            _assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=where)
    else:
        assert got == want, where


@pytest.mark.parametrize("before, after, sets", [
    (2, 0, ["distributed.zero_stage=1"]),
    (0, 2, ["distributed.zero_stage=2", "ldiffrec.out_dims=[6]"]),
    (2, 3, ["distributed.zero_stage=3"])],
    ids=["2-workers-to-1-process", "1-process-to-2-workers", "2-to-3-workers"])
def test_resume_on_another_number_of_workers_equals_the_uninterrupted_run(
        tmp_path, before, after, sets):
    cfg = _cfg(tmp_path, *sets)
    _train(0, cfg, tmp_path / "straight", 3, resume=False)
    want = _content(cfg, tmp_path / "straight")

    run = tmp_path / "run"
    assert _train(before, cfg, run, 2, resume=False) == 0
    assert _train(after, cfg, run, 3, resume=True) == 2      # from the first part's state
    got = _content(cfg, run)
    assert got["epoch"] == want["epoch"] == 3 and got["step"] == want["step"] == 9
    for key in ("model", "optimizer"):
        _assert_same(got[key], want[key], key)


def test_latest_is_the_newest_complete_checkpoint(tmp_path):
    """last.pt and sharded directories compete by epoch; a directory without its manifest
    (a run killed while writing it) is not a checkpoint; a W-worker run's model-only
    last.pt is not one either."""
    cfg = _cfg(tmp_path)
    run = tmp_path / "run"
    assert _train(2, cfg, run, 1, resume=False) == 0
    assert checkpoint.latest(run).epoch == 1
    partial = checkpoint.epoch_dir(run, 2)
    shutil.copytree(checkpoint.epoch_dir(run, 1), partial)
    (partial / checkpoint.MANIFEST).unlink()
    assert checkpoint.latest(run).epoch == 1
    assert _train(0, cfg, run, 2, resume=True) == 1            # one process, last.pt: 2
    assert isinstance(checkpoint.latest(run), checkpoint.FileSource)
    assert _train(2, cfg, run, 3, resume=True) == 2            # workers again: epoch_0003
    assert isinstance(checkpoint.latest(run), checkpoint.ShardedSource)
    assert checkpoint.latest(run).epoch == 3
    runs.save_checkpoint(run, "last", {"model": {}, "epoch": 5})
    assert checkpoint.latest(run).epoch == 3


class _Stopped(Exception):
    """What Tune does to a trial that ASHA cuts: its function does not return."""


def _cut(rank, world, cfg, run_dir, stop_after):
    """A W-worker run as Ray's ``train_loop`` runs it (evaluation, sharded checkpoints,
    a report after each), stopped after epoch ``stop_after``'s report: it never writes
    best.pt, last.pt or metrics.json."""
    from scale_diffrec.data import load_data
    from scale_diffrec.partition import Partition
    from scale_diffrec.train import seed_everything
    from scale_diffrec.train.distributed import trainer
    from scale_diffrec.train.distributed.worker import ShardedRun
    from scale_diffrec.train.loop import run_epochs
    data = load_data(cfg)
    partition = Partition.load(Path(run_dir) / runs.PARTITION, n_items=data.n_items)
    seed_everything(cfg["seed"])
    run = ShardedRun(cfg, data, partition, trainer.build_plan(cfg, partition, world), "cpu")
    record = trainer._restore(run, None, rank)

    def report(entry, record):
        if entry["epoch"] == stop_after:
            raise _Stopped
    try:
        run_epochs(run.model, run.optimizer, data, cfg, run.progress, record,
                   torch.device("cpu"), trainer.ShardedCheckpoints(run, Path(run_dir), {}, record),
                   report)
    except _Stopped:
        return "stopped"
    return "ended"


def test_a_worker_run_stopped_before_its_end_is_read_from_its_shards(tmp_path):
    """A W-worker trial that ASHA cuts has its model only in sharded checkpoints. Its trial
    row, its selection (test metrics), and ``load_run`` best / last (evaluate, export) must
    give what the one-process run of the same epochs gives."""
    from scale_diffrec.train import train
    from scale_diffrec.train.distributed import trainer
    from scale_diffrec.tune import results
    cfg = _cfg(tmp_path, "epochs=6", "eval_every=1", "patience=6")
    straight = train({**cfg, "epochs": 3}, tmp_path / "straight")
    cut = tmp_path / "cut"
    trainer._prepare_run_dir(cfg, cut, 2, resume=False, overwrite=False)
    assert run_distributed(_cut, 2, args=(cfg, str(cut), 3), env={"DS_ACCELERATOR": "cpu"},
                           timeout=300) == ["stopped", "stopped"]
    assert not (cut / runs.METRICS).exists()
    assert not runs.checkpoint_path(cut, "best").exists()

    row = results.run_metrics(cut)
    assert row["epochs"] == 3 and row["best_epoch"] == straight["best_epoch"]
    assert row[results.METRIC] == pytest.approx(straight["valid"]["recall@20"], abs=1e-6)
    for name in ("best", "last"):
        got, want = runs.load_run(cut, name).model, runs.load_run(tmp_path / "straight", name).model
        _assert_same(got.state_dict(), want.state_dict(), name)
    metrics = results.finish_best(cut)
    assert metrics["best_epoch"] == straight["best_epoch"]
    for split in ("valid", "test"):
        assert metrics[split] == pytest.approx(straight[split], abs=1e-6), split
