"""W-worker L-DiffRec and DiffuRec training on Ray Train: the same run as
``scale_diffrec.train.train``.

The driver (``train_distributed``) loads the data, builds the item partition and the
placement plan (clusters -> workers, DESIGN.md "Hybrid parallelism"), writes them to the run
directory, joins or starts a Ray cluster and runs a ``TorchTrainer`` with W workers. Each
worker runs ``train_loop``: a ``ShardedRun`` (train/distributed/worker.py) with its clusters, the
one epoch loop (train/loop.py) (validation every ``eval_every`` epochs, early
stopping on ``select_metric``, test metrics of the best epoch) and one checkpoint per
epoch, sharded by cluster (``scale_diffrec.checkpoint``): every rank writes its clusters'
part, rank 0 the rest and, once every part is on disk, the manifest that makes it
complete; only then is the epoch reported to Ray. Rank 0 logs the progress and finally
writes the run directory as the single-process trainer does, so ``scale-diffrec evaluate``
and ``runs.load_run`` work on distributed runs:

    RUN_DIR/config.yaml, partition.parquet       as for one process
    RUN_DIR/plan.json                            the placement plan (Plan.to_dict)
    RUN_DIR/checkpoints/sharded/epoch_NNNN/      the sharded checkpoint of epoch NNNN (the
                                                 latest complete one and the best are kept)
    RUN_DIR/checkpoints/ray/                     Ray Train's own run state
    RUN_DIR/checkpoints/last.pt, best.pt         {"model": the single-process LDiffRec
                                                 state_dict, ...}, written at the end
    RUN_DIR/metrics.json                         as for one process, plus plan, workers and
                                                 per-worker peak memory

The checkpoint content does not depend on the number of workers: a run resumes with any W'
(1 included: ``scale_diffrec.train`` reads it too), and a W'-worker run resumes from a
single-process ``last.pt``. Failures: a worker that dies makes Ray restart the whole group
(``distributed.max_failures`` times), and every restart, like ``resume=True``, continues
from the newest complete checkpoint in RUN_DIR. Not from ``ray.train.get_checkpoint()``:
Ray registers a reported checkpoint asynchronously, so a worker killed right after a report
would be restarted from an older one; nor does Ray hold the checkpoints, for the same reason.
For several machines RUN_DIR must be shared storage (NFS): workers read the partition from it
and rank 0 writes the run files into it.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ... import checkpoint, runs
from ...claim import claim
from ...config import absolute_paths, warn_unread
from ...data import load_data
from ...errors import ConfigError, DataError, NonFiniteError
from ...models.clusters import latent_dims
from ...partition import Partition
from ...progress import log, peak_rss_mib, setup_logging
from ...memory_model import cluster_parameters
from ..loop import finish, new_record, run_epochs
from ..setup import prepare_partition, seed_everything
from ...shard.plan import Plan, plan_placement
from .worker import ShardedRun

PLAN = runs.PLAN
RAY_NAME = "ray"                  # Ray Train's run name: RUN_DIR/checkpoints/ray


# ============================================================================ the driver
def check_workers(cfg: dict) -> int:
    """W from ``train.distributed.workers``; a ConfigError unless the model is L-DiffRec or
    DiffuRec."""
    if cfg["model"] not in ("ldiffrec", "diffurec"):
        raise ConfigError(f"config key 'model': distributed training shards the catalogue of "
                          f"L-DiffRec and DiffuRec; model '{cfg['model']}' trains in one "
                          f"process (set distributed.workers=1 and no distributed.address)")
    return int(cfg["distributed"]["workers"])      # 1 <= W <= n_clusters: config schema


def build_plan(cfg: dict, partition: Partition, n_workers: int) -> Plan:
    """Clusters -> workers by ``distributed.placement`` (items | params), with latent widths
    and per-cluster parameters (bytes counted with grads and Adam's two moments); DiffuRec's
    row blocks by items (a row of E is one parameter vector, whichever the placement)."""
    placement = cfg["distributed"]["placement"]
    sizes = partition.sizes.tolist()
    if n_workers > len(sizes):
        raise ConfigError(f"{n_workers} workers but the partition has {len(sizes)} clusters")
    if cfg["model"] == "diffurec":
        return plan_placement(sizes, n_workers)
    widths = [d[-1] for d in latent_dims(sizes, cfg["ldiffrec"]["in_dims"])]
    return plan_placement(sizes, n_workers, weight=placement, latent_dims=widths,
                          decoder_params=cluster_parameters(cfg, sizes), bytes_per_param=16)


def check_address(address: str | None) -> None:
    """A Ray cluster address (the head's host:port, or ray://host:port) must accept a TCP
    connection within 10 s (Ray itself retries for minutes): ConfigError naming it
    otherwise. None, "auto" and "local" pass."""
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"Ray cluster address {address!r}: expected HOST:PORT (or "
                          f"ray://HOST:PORT)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as err:
        raise ConfigError(f"Ray cluster address {address}: cannot connect "
                          f"({err.strerror or err})") from None


def connect(cfg: dict) -> bool:
    """Join the cluster at ``distributed.address`` or $RAY_ADDRESS, else start a local one
    (at least one CPU per worker). Returns True when this call started Ray."""
    import ray
    if ray.is_initialized():
        return False
    address = cfg["distributed"]["address"] or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        # With its dashboard (on 127.0.0.1), whose state API Ray Train's placement-group
        # cleaner polls: without it that actor logs a warning every few seconds.
        cpus = max(os.cpu_count() or 1, int(cfg["distributed"]["workers"]))
        log.info("starting a local Ray instance with %d CPUs", cpus)
        ray.init(address="local", num_cpus=cpus, log_to_driver=True)
    return True


def worker_env(use_gpu: bool) -> dict[str, str]:
    """Environment of the training workers: DeepSpeed's CPU accelerator without a GPU."""
    return {} if use_gpu else {"DS_ACCELERATOR": "cpu"}


def resolve_use_gpu(setting, n_workers: int) -> bool:
    """``distributed.use_gpu``: true, false, or "auto" = the cluster has a GPU per worker."""
    import ray
    if isinstance(setting, bool):
        return setting
    return ray.cluster_resources().get("GPU", 0) >= n_workers


def worker_error(err: BaseException):
    """The NonFiniteError / ConfigError / DataError a worker raised when that is why
    ``fit()`` failed (found through Ray's wrappers: causes, ``.cause``,
    ``worker_failures``), else None."""
    todo, seen = [err], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        original = getattr(e, "cause", None)
        for candidate in (original, e):
            if isinstance(candidate, (NonFiniteError, ConfigError, DataError)):
                return candidate
        todo += [e.__cause__, e.__context__, original,
                 *(getattr(e, "worker_failures", None) or {}).values()]
    return None


def _prepare_run_dir(cfg: dict, run_dir: Path, n_workers: int, resume: bool,
                     overwrite: bool):
    """Validates the data, the partition and the plan, then writes config.yaml,
    partition.parquet and plan.json (``runs.start_run``; on resume with another number of
    workers or placement, the new plan: checkpoints are not tied to one)."""
    data = load_data(cfg)
    partition = prepare_partition(cfg, data, run_dir, rebuild=overwrite)
    plan = build_plan(cfg, partition, n_workers)
    warn_unread(cfg)
    runs.start_run(run_dir, cfg, data, partition, resume=resume)
    saved = run_dir / runs.PARTITION           # the workers' copy (also for ldiffrec.partition)
    if not saved.is_file() or Partition.load(saved, n_items=data.n_items) != partition:
        partition.save(saved)
    runs.write_json(run_dir / PLAN, plan.to_dict())
    log.info("data %s: %d users x %d items, %d train interactions (sequences: items)",
             data.name, data.n_users, data.n_items, runs.data_record(data)["nnz"])
    log.info("%s", plan.describe())
    return plan


def _storage(run_dir: Path) -> Path:
    return run_dir / runs.CHECKPOINTS


def train_distributed(cfg: dict, run_dir: str | Path, resume: bool = False,
                      overwrite: bool = False, callbacks: tuple = (), test: bool = True,
                      on_epoch: Callable[[dict, dict], None] | None = None) -> dict:
    """Train L-DiffRec or DiffuRec on ``train.distributed.workers`` Ray Train workers;
    returns metrics.json.
    The driver claims the run directory for the whole run (``claim.claim``; the workers
    write under its claim). Nothing is written before the run directory, data, partition
    and plan are validated.
    ``callbacks``: Ray Train ``UserCallback``s (``tune`` passes ``trial.evaluation_reports``:
    rank 0's metrics from the first evaluation, with ``tune.trial.evaluation_report``'s
    keys, go to Tune);
    ``test=False`` computes no test metrics (as ``train.train``); ``on_epoch(entry,
    record)``, a picklable function, runs on every worker after each epoch's report (as
    ``train.train``'s), and its ``close()``, if it has one, on every worker at the end
    (``train --log-dir`` passes ``trackers.TensorBoardLog``, which writes on rank 0)."""
    run_dir = Path(run_dir).resolve()
    n_workers = check_workers(cfg)       # before any data, file or Ray process
    check_address(cfg["distributed"]["address"] or os.environ.get("RAY_ADDRESS"))
    cfg = absolute_paths(cfg)            # the workers run in other directories
    with claim(run_dir):          # the driver's, held to the end; workers never take it
        runs.check_run_dir(run_dir, cfg, resume=resume, overwrite=overwrite)
        if resume:
            checkpoint.resume_from(run_dir, cfg)
        plan = _prepare_run_dir(cfg, run_dir, n_workers, resume, overwrite)
        return _fit(cfg, run_dir, plan, n_workers, callbacks, test, on_epoch)


def _fit(cfg: dict, run_dir: Path, plan: Plan, n_workers: int, callbacks: tuple, test: bool,
         on_epoch) -> dict:
    """Ray Train's ``TorchTrainer`` on the prepared run directory; returns metrics.json."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    started = connect(cfg)
    try:
        use_gpu = resolve_use_gpu(cfg["distributed"]["use_gpu"], n_workers)
        log.info("Ray Train: %d workers on %s, ZeRO stage %s, max_failures %d", n_workers,
                 "GPU (NCCL)" if use_gpu else "CPU (gloo)", cfg["distributed"]["zero_stage"],
                 cfg["distributed"]["max_failures"])
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"cfg": cfg, "run_dir": str(run_dir), "plan": plan.to_dict(),
                               "use_gpu": use_gpu, "test": test, "on_epoch": on_epoch},
            scaling_config=ScalingConfig(num_workers=n_workers, use_gpu=use_gpu),
            run_config=RunConfig(
                name=RAY_NAME, storage_path=str(_storage(run_dir)),
                failure_config=FailureConfig(max_failures=int(cfg["distributed"]["max_failures"])),
                worker_runtime_env={"env_vars": worker_env(use_gpu)},
                callbacks=list(callbacks)))
        try:
            trainer.fit()
        except Exception as err:           # a worker's bad input: one line, not Ray's report
            cause = worker_error(err)
            if cause is None:
                raise
            raise cause from None
    finally:
        if started:
            import ray
            ray.shutdown()
    return json.loads((run_dir / runs.METRICS).read_text())


# ============================================================================ each worker
class ShardedCheckpoints:
    """A rank's side of the run's checkpoints (``train.run_epochs`` / ``train.finish``):
    every epoch's sharded checkpoint, complete (its manifest written) before the epoch is
    reported to Ray; at the end last.pt / best.pt with the assembled one-process state and
    every worker's peak memory for metrics.json."""

    def __init__(self, run, run_dir: Path, config: dict, record: dict):
        self.run, self.run_dir, self.config, self.record = run, run_dir, config, record

    def save(self, progress, record: dict, improved: bool) -> None:
        run, rank = self.run, self.run.rank
        epoch = progress.epoch
        name = checkpoint.part_name(rank)
        checkpoint.save_part(self.run_dir, epoch, name, run.catalogue_state())
        common = run.common_state()
        if rank == 0:
            checkpoint.save_part(self.run_dir, epoch, checkpoint.COMMON,
                                 {**common, "record": record})
        parts = [None] * run.world
        dist.all_gather_object(parts, (name, run.clusters))     # every part is on disk
        if rank == 0:
            checkpoint.mark_complete(self.run_dir, epoch, dict(parts),
                                     keep=(record["best_epoch"],))
        dist.barrier()                                           # and the manifest

    def load_epoch(self, epoch: int) -> None:
        """last.pt (the state trained so far), then the best epoch's shards back in."""
        run = self.run
        last = run.full_model_state()
        if run.rank == 0:      # written now, not held through the best epoch's evaluation
            runs.save_checkpoint(self.run_dir, "last", {"model": last, "record": self.record,
                                                        "epoch": run.progress.epoch,
                                                        "step": run.progress.step})
        del last
        run.load_state(checkpoint.at_epoch(self.run_dir, epoch))
        self.best_epoch = epoch

    def final(self, record: dict, device) -> dict:
        """best.pt; the plan, the workers and each one's peak memory. Collective."""
        run = self.run
        best = run.full_model_state()
        memory = [None] * run.world
        dist.all_gather_object(memory, {"rank": run.rank, **_peak_memory(device)})
        if run.rank == 0:
            runs.save_checkpoint(self.run_dir, "best", {"model": best, "record": record,
                                                        "epoch": self.best_epoch})
        plan = Plan.from_dict(self.config["plan"])
        for m in memory:
            m.update(clusters=plan.clusters(m["rank"]), items=plan.items(m["rank"]))
        cfg = self.config["cfg"]
        return {"resumed_at": record["resumed_at"],
                "peak_rss_mib": max(m["peak_rss_mib"] for m in memory),
                "distributed": {"workers": run.world, "use_gpu": self.config["use_gpu"],
                                "zero_stage": cfg["distributed"]["zero_stage"],
                                "placement": cfg["distributed"]["placement"]},
                "plan": self.config["plan"], "per_worker": memory}


def _restore(run, source, rank: int) -> dict:
    """Continue from ``source`` (the newest complete checkpoint; None: start); returns the
    record (``train.new_record`` plus the epochs training resumed at)."""
    if source is None:
        return {**new_record(), "resumed_at": []}
    record = run.load_state(source)["record"]
    if rank == 0:
        log.info("resumed from %s at epoch %d", source.path, run.progress.epoch)
    record.setdefault("resumed_at", []).append(run.progress.epoch)
    return record


def _peak_memory(device: torch.device) -> dict:
    out = {"peak_rss_mib": peak_rss_mib()}
    if device.type == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return out


def train_loop(config: dict) -> None:
    """Ray Train's per-worker function (``config``: cfg, run_dir, plan, use_gpu, test,
    on_epoch): the one-process epoch loop (``train.run_epochs``) and end (``train.finish``)
    on this rank's ``ShardedRun``, each epoch reported to Ray once its checkpoint is
    complete and ``on_epoch(entry, record)``, when given, has seen it (first, so that a
    tracker has the epoch at which Tune stops a trial). ``on_epoch.close()``, if it has one,
    runs when the loop ends: ``trackers.TensorBoardLog`` writes its last events then."""
    import ray.train
    from ray.train.torch import get_device
    from ...tune.trial import evaluation_report   # cycle: tune.trial imports this module
    setup_logging()
    cfg, run_dir = config["cfg"], Path(config["run_dir"])
    rank = ray.train.get_context().get_world_rank()
    device = get_device()
    data = load_data(cfg)
    partition = Partition.load(run_dir / runs.PARTITION, n_items=data.n_items)
    seed_everything(cfg["seed"])          # the single-process trainer's state at build_model
    run = ShardedRun(cfg, data, partition, Plan.from_dict(config["plan"]), device)
    # a fresh run's storage was cleared: a checkpoint here is this run's (Ray restarted it)
    record = _restore(run, checkpoint.latest(run_dir), rank)

    on_epoch = config.get("on_epoch")

    def report(entry: dict, record: dict) -> None:
        if on_epoch is not None:      # first: Tune may stop the trial at this report
            on_epoch(entry, record)
        ray.train.report({"epoch": entry["epoch"], "loss": entry["loss"],
                          **(evaluation_report(entry, record) or {})})

    checkpoints = ShardedCheckpoints(run, run_dir, config, record)
    try:
        trained = run_epochs(run.model, run.optimizer, data, cfg, run.progress, record,
                             device, checkpoints, report)
        finish(run.model, data, cfg, run_dir, record, test=config["test"], trained=trained,
               checkpoints=checkpoints)
    finally:
        if hasattr(on_epoch, "close"):
            on_epoch.close()
