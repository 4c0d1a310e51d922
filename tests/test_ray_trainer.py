"""The Ray Train harness (scale_diffrec/train/distributed/trainer.py) on a tiny synthetic L-DiffRec.

Without Ray: too many workers fail before anything starts; the plan's per-cluster parameter
counts and latent widths are the model's. With Ray (marked ``ray``; about 3 minutes together, in the default suite):
a 2-worker fit (``train --log-dir``) writes a run directory that ``scale-diffrec evaluate``
reproduces and equals the single-process trainer, and rank 0's TensorBoard events hold its
history; a worker killed right after reporting an epoch is restarted from
that epoch's checkpoint and the run ends exactly as an uninterrupted one; ``ray job submit`` to a local head trains
the quickstart end to end.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from scale_diffrec import checkpoint, runs
from scale_diffrec.cli import main
from scale_diffrec.config import absolute_paths, load_config, save_config
from scale_diffrec.data import load_data
from scale_diffrec.errors import ConfigError
from scale_diffrec.models import build_model
from scale_diffrec.memory_model import cluster_parameters, denoiser_parameters
from scale_diffrec.train.distributed import trainer
from scale_diffrec.train.distributed.local import free_port
from scale_diffrec.partition import Partition
from scale_diffrec.train import train

REPO = Path(__file__).resolve().parents[1]
SIZES = [120, 90, 60, 30]            # unequal clusters over the 300 items
TINY = ["model=ldiffrec", "seed=0", "epochs=3", "batch_size=100", "eval_every=1",
        "topk=[10, 20]", "data.source=synthetic", "data.name=tiny",
        "data.synthetic.n_users=400", "data.synthetic.n_items=300",
        "data.synthetic.n_clusters=4", "data.synthetic.mean_items_per_user=10",
        "diffusion.steps=5", "ldiffrec.n_clusters=4", "ldiffrec.in_dims=[12]",
        "ldiffrec.mlp_dims=[8]", "distributed.workers=2"]


@pytest.fixture(scope="module")
def partition_file(tmp_path_factory) -> Path:
    """A saved partition of the 300 items into 4 clusters of SIZES items, shuffled."""
    cluster_of = np.repeat(np.arange(len(SIZES)), SIZES)
    np.random.default_rng(0).shuffle(cluster_of)
    path = tmp_path_factory.mktemp("partition") / "partition.parquet"
    Partition(cluster_of, len(SIZES)).save(path)
    return path


def _cfg(partition_file: Path, *sets: str) -> dict:
    return absolute_paths(load_config(None, TINY + [f"ldiffrec.partition={partition_file}",
                                                    *sets]))


def _no_ray(monkeypatch):
    def refuse(cfg):
        raise AssertionError("Ray was started")
    monkeypatch.setattr(trainer, "connect", refuse)


# ----------------------------------------------------------------------------- no Ray
def test_more_workers_than_clusters_fails_before_anything_starts(tmp_path, monkeypatch,
                                                                 capsys, partition_file):
    _no_ray(monkeypatch)
    with pytest.raises(ConfigError, match="'distributed.workers' is 5 but ldiffrec.n_clusters "
                                          "is 4"):
        trainer.train_distributed(_cfg(partition_file, "distributed.workers=5"), tmp_path / "a")
    assert not (tmp_path / "a").exists()
    (tmp_path / "none.yaml").write_text("{}\n")
    args = ["train", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "b"),
            "--workers", "5"]
    for item in TINY + [f"ldiffrec.partition={partition_file}"]:
        args += ["--set", item]
    assert main(args) == 2
    assert "error: --workers 5: config key 'distributed.workers' is 5" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    # resuming a run with more workers than clusters: refused before anything is written
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    (tmp_path / "b" / "config.yaml").write_text("seed: 0\n")
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --workers 5: config key 'distributed.workers' is 5")
    assert err.count("\n") == 1
    assert (tmp_path / "b" / "config.yaml").read_text() == "seed: 0\n"


def test_resume_without_a_distributed_checkpoint_fails_before_ray(tmp_path, monkeypatch,
                                                                  partition_file):
    _no_ray(monkeypatch)
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        trainer.train_distributed(_cfg(partition_file), tmp_path, resume=True)


def test_the_run_directory_guard_holds_before_ray(tmp_path, monkeypatch, partition_file):
    _no_ray(monkeypatch)
    run_dir = tmp_path / "run"
    cfg = _cfg(partition_file)
    partition = Partition.load(partition_file)
    runs.start_run(run_dir, cfg, load_data(cfg), partition)   # config, partition, plan, epoch
    runs.write_json(run_dir / runs.PLAN, trainer.build_plan(cfg, partition, 2).to_dict())
    runs.save_checkpoint(run_dir, "last", {"format": checkpoint.FORMAT, "epoch": 1})
    files = lambda: {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}  # noqa
    before = files()
    with pytest.raises(ConfigError, match=r"--resume cannot change config key 'lr' \(0.001"):
        trainer.train_distributed(_cfg(partition_file, "lr=0.5"), run_dir, resume=True)
    with pytest.raises(ConfigError, match="already holds a run"):
        trainer.train_distributed(cfg, run_dir)
    with pytest.raises(ConfigError, match="distributed.workers"):
        trainer.train_distributed(_cfg(partition_file, "distributed.workers=5"), run_dir,
                                  resume=True)
    assert files() == before


def test_a_workers_bad_input_reaches_the_cli_as_itself():
    """A NonFiniteError (or ConfigError / DataError) raised in a worker is found through
    Ray's wrappers (v2 WorkerGroupError, v1 TrainingFailedError from a RayTaskError)."""
    from ray.exceptions import RayTaskError
    from ray.train.base_trainer import TrainingFailedError
    from ray.train.v2.api.exceptions import WorkerGroupError
    from scale_diffrec.errors import NonFiniteError
    bad = NonFiniteError("training loss at epoch 2, step 3 is not finite (nan)")
    assert trainer.worker_error(WorkerGroupError("rank 1 failed", {1: bad})) is bad
    try:
        try:
            raise RayTaskError("train_loop", "Traceback ...", bad)
        except RayTaskError as task:
            raise TrainingFailedError("restore with ...") from task
    except TrainingFailedError as err:
        assert trainer.worker_error(err) is bad
    assert trainer.worker_error(WorkerGroupError("oom", {0: MemoryError()})) is None


def test_only_ldiffrec_is_sharded(tmp_path, monkeypatch, partition_file):
    _no_ray(monkeypatch)
    with pytest.raises(ConfigError, match="model 'diffrec' trains in one process"):
        trainer.train_distributed(_cfg(partition_file, "model=diffrec"), tmp_path)


@pytest.mark.parametrize("out_dims", [[], [6]], ids=["global-decoder", "cluster-decoders"])
def test_plan_counts_each_clusters_parameters_and_latent_width(partition_file, out_dims):
    cfg = _cfg(partition_file, f"ldiffrec.out_dims={out_dims}", "distributed.placement=params")
    partition = Partition.load(partition_file)
    model = build_model(cfg, 300, partition)
    counts = cluster_parameters(cfg, partition.sizes)
    for c, n_c in enumerate(SIZES):      # cluster c's own encoder, and its decoder part
        enc = sum(p.numel() for p in model.encoders[c].parameters())
        dec = (sum(p.numel() for p in model.decoders[c].parameters()) if out_dims
               else n_c * (model.latent_size + 1))
        assert counts[c] == enc + dec
    expected = model.parameter_counts()
    assert sum(counts) == expected["encoders"] + expected["decoder"]
    assert denoiser_parameters(cfg) == expected["denoiser"]
    plan = trainer.build_plan(cfg, partition, 2)
    assert plan.weight == "params" and plan.latent_dims == model.latent_sizes
    assert sorted(c for w in plan.assignment for c in w) == [0, 1, 2, 3]
    assert plan.bytes(0) == 16 * plan.parameters(0)


# ----------------------------------------------------------------------------- with Ray
@pytest.fixture(scope="module")
def two_workers(ray_local, tmp_path_factory, partition_file):
    """A 2-worker fit of the tiny config by ``train --log-dir``: (run directory, its
    metrics, fit seconds); the TensorBoard folder is RUN_DIR/../tb."""
    base = tmp_path_factory.mktemp("two-workers")
    save_config(_cfg(partition_file), base / "tiny.yaml")
    started = time.perf_counter()
    assert main(["train", "--config", str(base / "tiny.yaml"), "--out", str(base / "run"),
                 "--log-dir", str(base / "tb")]) == 0
    seconds = time.perf_counter() - started
    return base / "run", json.loads((base / "run" / runs.METRICS).read_text()), seconds


@pytest.mark.ray
def test_two_worker_fit_writes_the_run_and_equals_one_process(two_workers, tmp_path, capsys,
                                                              partition_file,
                                                              tensorboard_scalars):
    run_dir, metrics, seconds = two_workers
    tensorboard_scalars.assert_history(run_dir.parent / "tb", metrics["history"])  # rank 0
    with capsys.disabled():
        print(f"\n2-worker tiny fit: {seconds:.1f} s, peak RSS per worker "
              f"{[round(w['peak_rss_mib']) for w in metrics['per_worker']]} MiB")
    for name in ("config.yaml", "partition.parquet", "plan.json", "metrics.json",
                 "checkpoints/last.pt", "checkpoints/best.pt",
                 "checkpoints/sharded/epoch_0003/part_000.pt",
                 "checkpoints/sharded/epoch_0003/part_001.pt",
                 "checkpoints/sharded/epoch_0003/common.pt",
                 "checkpoints/sharded/epoch_0003/manifest.json"):
        assert (run_dir / name).is_file(), name
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan == metrics["plan"] and len(plan["assignment"]) == 2
    assert [w["rank"] for w in metrics["per_worker"]] == [0, 1]
    assert [w["clusters"] for w in metrics["per_worker"]] == plan["assignment"]
    assert all(w["peak_rss_mib"] > 0 for w in metrics["per_worker"])

    capsys.readouterr()
    assert main(["evaluate", "--run", str(run_dir), "--split", "test"]) == 0
    printed = json.loads(capsys.readouterr().out)
    for key in ("recall@10", "recall@20", "ndcg@20", "mrr@10"):
        assert printed[key] == pytest.approx(metrics["test"][key], abs=1e-9)

    single = train(_cfg(partition_file, "distributed.workers=1"), tmp_path / "single")
    assert metrics["best_epoch"] == single["best_epoch"]
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    for dist_h, one_h in zip(metrics["history"], single["history"]):
        assert dist_h["loss"] == pytest.approx(one_h["loss"], rel=1e-4)
    for split in ("valid", "test"):
        for key in ("recall@20", "ndcg@20", "precision@10", "mrr@10"):
            assert metrics[split][key] == pytest.approx(single[split][key], abs=1e-4)
    assert metrics["parameters"] == single["parameters"]
    dist_last = runs.load_checkpoint(run_dir, "last")["model"]
    one_last = runs.load_checkpoint(tmp_path / "single", "last")["model"]
    assert dist_last.keys() == one_last.keys()
    for key, value in one_last.items():
        torch.testing.assert_close(dist_last[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.ray
def test_worker_killed_right_after_a_report_restarts_from_that_epoch_with_same_result(
        two_workers, tmp_path, monkeypatch, partition_file):
    _, reference, _ = two_workers
    marker = tmp_path / "killed"
    # rank 1 exits as soon as ray.train.report of epoch 2 returns: before Ray has
    # registered anything of it, so Ray's own latest checkpoint could be epoch 1's
    marker_path = str(marker)

    def exit_once(entry: dict, record: dict) -> None:     # a nested function: pickled by
        import ray.train                                   # value into the Ray workers
        rank = ray.train.get_context().get_world_rank()
        if (rank, entry["epoch"]) == (1, 2) and not os.path.exists(marker_path):
            Path(marker_path).touch()
            os._exit(1)

    metrics = trainer.train_distributed(
        _cfg(partition_file, "distributed.max_failures=1"), tmp_path / "run",
        on_epoch=exit_once)
    assert marker.is_file(), "the fault hook never fired"
    assert metrics["resumed_at"] == [2]
    assert metrics["best_epoch"] == reference["best_epoch"]
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    for got, want in zip(metrics["history"], reference["history"]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
        assert got.get("valid") == pytest.approx(want.get("valid"), abs=1e-9)
    for split in ("valid", "test"):
        for key, value in reference[split].items():
            if isinstance(value, float):
                assert metrics[split][key] == pytest.approx(value, abs=1e-9), (split, key)


@pytest.mark.ray
def test_resume_continues_a_stopped_run_to_the_same_result(two_workers, tmp_path,
                                                          partition_file):
    _, reference, _ = two_workers
    trainer.train_distributed(_cfg(partition_file, "epochs=2"), tmp_path)
    metrics = trainer.train_distributed(_cfg(partition_file), tmp_path, resume=True)
    assert metrics["resumed_at"] == [2]
    assert [h["loss"] for h in metrics["history"]] == pytest.approx(
        [h["loss"] for h in reference["history"]], rel=1e-6)
    assert metrics["best_epoch"] == reference["best_epoch"]
    assert metrics["test"]["recall@20"] == pytest.approx(reference["test"]["recall@20"],
                                                         abs=1e-9)


# ----------------------------------------------------------------------------- ray job submit
def _kill_tree(proc: subprocess.Popen) -> None:
    """End the `ray start --block` process and every process it started (by pid)."""
    import psutil
    try:
        root = psutil.Process(proc.pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=20)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait(timeout=10)


@contextlib.contextmanager
def _local_head(log_path: Path):
    """A Ray head with the job server on 127.0.0.1, free ports, its own temp dir, auth off.
    Yields (dashboard address, environment for the clients)."""
    temp = tempfile.mkdtemp(prefix="sdr-ray-", dir="/tmp")   # short: Ray's socket paths
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    ports = {name: free_port() for name in (
        "port", "node-manager-port", "object-manager-port", "ray-client-server-port",
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port")}
    cmd = [str(bin_dir / "ray"), "start", "--head", "--block", "--num-cpus=3",
           "--node-ip-address=127.0.0.1", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
           f"--temp-dir={temp}", "--disable-usage-stats",
           *(f"--{name}={port}" for name, port in ports.items())]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"ray start exited: {log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the job server did not come up in 180 s"
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{address}/api/version", timeout=5)
                break
            time.sleep(1)
        yield address, env
    finally:
        _kill_tree(proc)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.ray
def test_ray_job_submit_to_a_local_head_trains_the_quickstart(tmp_path):
    out = tmp_path / "job-run"
    with _local_head(tmp_path / "head.log") as (address, env):
        job = subprocess.run(
            ["bash", str(REPO / "launch" / "submit.sh"), address, "--",
             "--config", "configs/quickstart.yaml", "--workers", "2", "--set", "epochs=1",
             "--out", str(out)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distributed"]["workers"] == 2 and len(metrics["per_worker"]) == 2
    assert [h["epoch"] for h in metrics["history"]] == [1]
    assert 0.0 <= metrics["test"]["recall@20"] <= 1.0
    assert (out / "checkpoints" / "best.pt").is_file()
