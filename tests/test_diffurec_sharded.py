"""W-worker DiffuRec through the product's wiring (``train/distributed/worker.py``
``ShardedRun``: the item table's row blocks on their ranks, the ``SequenceDenoiser`` under a
DeepSpeed ZeRO engine, the hybrid optimizer) equals the one-process run of the same config:
every parameter after two epochs of the one loop (``train_epoch``, with the StepLR decay),
the losses and the valid metrics of the one evaluator (W = 2 gloo processes, 3 row blocks,
dropout 0); the W = 2 run's sharded checkpoint (cut by row block) resumed in one process
continues as the uninterrupted run; and ``train --workers 2`` on Ray writes the run a
one-process ``train`` writes, to 1e-6."""
from __future__ import annotations

import json

import pytest
import torch

from scale_diffrec.train.distributed.local import run_distributed

# The attention's key bias has a zero gradient (softmax is invariant to adding q . b_k to
# every score of a query), so Adam steps it by the sign of rounding noise: it differs
# between any two summation orders and never changes an output.
KEY_BIAS = ".qkv.1.bias"
SETS = ["data.synthetic.n_users=120", "data.synthetic.n_items=80", "diffurec.dropout=0",
        "diffurec.emb_dropout=0", "diffurec.n_clusters=3", "batch_size=40",
        "eval_batch_size=50", "lr=1e-2", "lr_decay_every=1", "lr_decay=0.5"]


def _setup():
    from scale_diffrec.config import load_config
    from scale_diffrec.data import load_data
    from scale_diffrec.train.setup import prepare_partition, seed_everything
    cfg = load_config("configs/diffurec-quickstart.yaml", SETS)
    data = load_data(cfg)
    seed_everything(cfg["seed"])
    return cfg, data, prepare_partition(cfg, data, None)


def _sharded_epochs(rank, world, run_dir):
    """Two epochs on ``world`` workers, the first one's sharded checkpoint written as a Ray
    worker writes it (``ShardedCheckpoints.save``): (the one-process state assembled on
    rank 0, the epochs' losses, the valid metrics, the parameter counts)."""
    from pathlib import Path
    from scale_diffrec.train.distributed import trainer
    from scale_diffrec.train.distributed.worker import ShardedRun
    cfg, data, partition = _setup()
    run = ShardedRun(cfg, data, partition, trainer.build_plan(cfg, partition, world), "cpu")
    record = trainer._restore(run, None, rank)
    losses = []
    for epoch in range(2):
        losses.append(run.train_epoch(epoch))
        run.progress.epoch = epoch + 1
        if epoch == 0:
            trainer.ShardedCheckpoints(run, Path(run_dir), {}, record).save(
                run.progress, record, False)
    return run.full_model_state(), losses, run.evaluate("valid"), run.model.parameter_counts()


def _assert_states_close(got: dict, want: dict, atol: float, where: str) -> None:
    assert set(got) == set(want), where
    for name, value in want.items():
        if name.endswith(KEY_BIAS):
            continue
        if isinstance(value, dict):
            _assert_states_close(got[name], value, atol, f"{where}.{name}")
        else:
            torch.testing.assert_close(got[name], value, rtol=1e-4, atol=atol,
                                       msg=f"{where}.{name}")


def test_two_workers_equal_one_process_and_their_checkpoint_resumes_in_one_process(
        tmp_path):
    from scale_diffrec import runs
    from scale_diffrec.train import train
    cfg = {**_setup()[0], "epochs": 2, "eval_every": 2}
    straight = train(cfg, tmp_path / "straight")
    want = runs.load_checkpoint(tmp_path / "straight", "last")
    assert want["optimizer"]["item_embeddings.weight"]["step"] > 0
    results = run_distributed(_sharded_epochs, 2, args=(str(tmp_path / "run"),),
                              env={"DS_ACCELERATOR": "cpu"}, timeout=300)
    assert results[1][0] is None
    _assert_states_close(results[0][0], want["model"], 1e-5, "model")
    for _, losses, valid, parameters in results:
        assert losses == pytest.approx([h["loss"] for h in straight["history"]], rel=1e-5)
        assert parameters == straight["parameters"]
        for key in ("hr@5", "hr@10", "hr@20", "ndcg@10"):      # epoch 2 is the best
            assert valid[key] == pytest.approx(straight["valid"][key], abs=1e-6), key
    # the W = 2 checkpoint of epoch 1 (cut by row block), resumed in one process
    resumed = train(cfg, tmp_path / "run", resume=True)
    assert [h["epoch"] for h in resumed["history"]] == [2]
    got = runs.load_checkpoint(tmp_path / "run", "last")
    assert (got["epoch"], got["step"]) == (want["epoch"], want["step"])
    _assert_states_close(got["model"], want["model"], 1e-5, "model")
    _assert_states_close(got["optimizer"], want["optimizer"], 1e-6, "optimizer")
    assert resumed["test"]["hr@10"] == pytest.approx(straight["test"]["hr@10"], abs=1e-6)


@pytest.mark.ray
def test_train_on_two_ray_workers_equals_one_process(ray_local, tmp_path, capsys):
    from scale_diffrec.cli import main
    from scale_diffrec.config import absolute_paths, load_config
    from scale_diffrec.train import train
    from scale_diffrec.train.distributed.trainer import train_distributed
    sets = SETS + ["epochs=2"]
    cfg = absolute_paths(load_config("configs/diffurec-quickstart.yaml", sets))
    two = train_distributed({**cfg, "distributed": {**cfg["distributed"], "workers": 2}},
                            tmp_path / "two")
    one = train(cfg, tmp_path / "one")
    assert len(two["plan"]["assignment"]) == 2 and two["parameters"] == one["parameters"]
    assert [h["loss"] for h in two["history"]] == pytest.approx(
        [h["loss"] for h in one["history"]], rel=1e-5)
    assert two["best_epoch"] == one["best_epoch"]
    for split in ("valid", "test"):
        for key in ("hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20"):
            assert two[split][key] == pytest.approx(one[split][key], abs=1e-6), (split, key)
    capsys.readouterr()
    assert main(["evaluate", "--run", str(tmp_path / "two"), "--split", "test"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["hr@10"] == pytest.approx(two["test"]["hr@10"], abs=1e-9)
