"""W-worker L-DiffRec training on Ray Train: the same run as ``scale_diffrec.train.train``.

The driver (``train_distributed``) loads the data, builds the item partition and the
placement plan (clusters -> workers, DESIGN.md "Hybrid parallelism"), writes them to the run
directory, joins or starts a Ray cluster and runs a ``TorchTrainer`` with W workers. Each
worker runs ``train_loop``: a ``ShardedRun`` (parallel/worker.py) with its clusters, the
epoch loop of the single-process trainer (validation every ``eval_every`` epochs, early
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
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .. import checkpoint, runs
from ..config import absolute_paths
from ..data import load_data
from ..errors import ConfigError, DataError, NonFiniteError
from ..models.ldiffrec import latent_dims
from ..partition import Partition
from ..progress import format_seconds, log, peak_rss_mib, setup_logging
from ..train import describe_metrics, headline, prepare_partition, seed_everything
from .memory import cluster_parameters
from .plan import Plan, plan_placement

PLAN = runs.PLAN
RAY_NAME = "ray"                  # Ray Train's run name: RUN_DIR/checkpoints/ray
FAULT_ENV = "SCALE_DIFFREC_TEST_FAULT"   # test hook, see _fault_after_report


# ============================================================================ the driver
def check_workers(cfg: dict) -> int:
    """W from ``distributed.workers``; a ConfigError unless the model is L-DiffRec."""
    if cfg["model"] != "ldiffrec":
        raise ConfigError(f"config key 'model': distributed training shards L-DiffRec's "
                          f"catalogue; model '{cfg['model']}' trains in one process "
                          f"(set distributed.workers=1 and no distributed.address)")
    return int(cfg["distributed"]["workers"])      # 1 <= W <= n_clusters: config schema


def build_plan(cfg: dict, partition: Partition, n_workers: int) -> Plan:
    """Clusters -> workers by ``distributed.placement`` (items | params), with latent widths
    and per-cluster parameters (bytes counted with grads and Adam's two moments)."""
    placement = cfg["distributed"]["placement"]
    sizes = partition.sizes.tolist()
    if n_workers > len(sizes):
        raise ConfigError(f"{n_workers} workers but the partition has {len(sizes)} clusters")
    widths = [d[-1] for d in latent_dims(sizes, cfg["ldiffrec"]["in_dims"])]
    return plan_placement(sizes, n_workers, weight=placement, latent_dims=widths,
                          decoder_params=cluster_parameters(cfg, sizes), bytes_per_param=16)


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


def worker_env(use_gpu: bool) -> dict[str, str]:
    """Environment of the training workers: DeepSpeed's CPU accelerator without a GPU, and
    the test fault hook when the driver has it."""
    env = {} if use_gpu else {"DS_ACCELERATOR": "cpu"}
    if os.environ.get(FAULT_ENV):
        env[FAULT_ENV] = os.environ[FAULT_ENV]
    return env


def _prepare_run_dir(cfg: dict, run_dir: Path, n_workers: int, resume: bool,
                     overwrite: bool):
    """Validates the data, the partition and the plan, then writes config.yaml,
    partition.parquet and plan.json (``runs.start_run``; on resume with another number of
    workers or placement, the new plan: checkpoints are not tied to one)."""
    data = load_data(cfg)
    partition = prepare_partition(cfg, data, run_dir, rebuild=overwrite)
    plan = build_plan(cfg, partition, n_workers)
    runs.start_run(run_dir, cfg, data, partition, resume=resume)
    saved = run_dir / runs.PARTITION           # the workers' copy (also for ldiffrec.partition)
    if not saved.is_file() or Partition.load(saved, n_items=data.n_items) != partition:
        partition.save(saved)
    runs.write_json(run_dir / PLAN, plan.to_dict())
    log.info("data %s: %d users x %d items, %d train interactions",
             data.name, data.n_users, data.n_items, data.train.nnz)
    log.info("%s", plan.describe())
    return plan


def _storage(run_dir: Path) -> Path:
    return run_dir / runs.CHECKPOINTS


def train_distributed(cfg: dict, run_dir: str | Path, resume: bool = False,
                      overwrite: bool = False, callbacks: tuple = (), test: bool = True
                      ) -> dict:
    """Train L-DiffRec on ``distributed.workers`` Ray Train workers; returns metrics.json.
    Nothing is written before the run directory, data, partition and plan are validated.
    ``callbacks``: Ray Train ``UserCallback``s (``tune`` passes ``TuneReportCallback``: rank
    0's per-epoch metrics, with ``tune.trial.evaluation_report``'s keys, go to Tune);
    ``test=False`` computes no test metrics (as ``train.train``)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    run_dir = Path(run_dir).resolve()
    n_workers = check_workers(cfg)       # before any data, file or Ray process
    cfg = absolute_paths(cfg)            # the workers run in other directories
    runs.check_run_dir(run_dir, cfg, resume=resume, overwrite=overwrite)
    if resume and checkpoint.latest(run_dir) is None:
        raise FileNotFoundError(f"{_storage(run_dir)}: no checkpoint to resume from")
    plan = _prepare_run_dir(cfg, run_dir, n_workers, resume, overwrite)
    started = connect(cfg)
    try:
        use_gpu = resolve_use_gpu(cfg["distributed"]["use_gpu"], n_workers)
        log.info("Ray Train: %d workers on %s, ZeRO stage %s, max_failures %d", n_workers,
                 "GPU (NCCL)" if use_gpu else "CPU (gloo)", cfg["distributed"]["zero_stage"],
                 cfg["distributed"]["max_failures"])
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"cfg": cfg, "run_dir": str(run_dir), "plan": plan.to_dict(),
                               "use_gpu": use_gpu, "test": test},
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
def _new_record() -> dict:
    """The single-process trainer's record, plus the epochs training resumed at."""
    return {"history": [], "best": -1.0, "best_epoch": 0, "valid": {}, "resumed_at": []}


def _restore(run, source, rank: int) -> dict:
    """Continue from ``source`` (the newest complete checkpoint; None: start); returns the
    record."""
    if source is None:
        return _new_record()
    record = run.load_state(source)["record"]
    if rank == 0:
        log.info("resumed from %s at epoch %d", source.path, run.progress.epoch)
    record.setdefault("resumed_at", []).append(run.progress.epoch)
    return record


def _save(run, record: dict, rank: int, run_dir: Path) -> None:
    """This epoch's sharded checkpoint, complete (its manifest written) on return on every
    rank."""
    epoch = run.progress.epoch
    name = checkpoint.part_name(rank)
    checkpoint.save_part(run_dir, epoch, name, run.catalogue_state())
    common = run.common_state()
    if rank == 0:
        checkpoint.save_part(run_dir, epoch, checkpoint.COMMON, {**common, "record": record})
    parts = [None] * run.world
    dist.all_gather_object(parts, (name, run.clusters))     # every part is on disk
    if rank == 0:
        checkpoint.mark_complete(run_dir, epoch, dict(parts), keep=(record["best_epoch"],))
    dist.barrier()                                           # and the manifest


def _report(run, record: dict, rank: int, entry: dict, run_dir: Path) -> None:
    """The epoch's checkpoint, then its metrics to Ray."""
    import ray.train
    _save(run, record, rank, run_dir)
    from ..tune.trial import evaluation_report
    ray.train.report({"epoch": entry["epoch"], "loss": entry["loss"],
                      **(evaluation_report(entry, record) or {})})
    _fault_after_report(rank, entry["epoch"])


def _stopped(record: dict, epochs_done: int, cfg: dict) -> bool:
    """Early stopping: ``patience`` epochs since the best validation epoch."""
    return record["best_epoch"] > 0 and epochs_done - record["best_epoch"] >= cfg["patience"]


def _fault_after_report(rank: int, epoch: int) -> None:
    """Test hook: with ``SCALE_DIFFREC_TEST_FAULT=RANK:EPOCH:MARKER`` rank RANK creates the
    file MARKER and exits (os._exit(1)) right after reporting epoch EPOCH, unless MARKER
    already exists: the run fails once, and Ray restarts it."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    fault_rank, fault_epoch, marker = spec.split(":", 2)
    if (int(fault_rank), int(fault_epoch)) == (rank, epoch) and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)


def _epoch_loop(run, cfg: dict, record: dict, rank: int, run_dir: Path) -> None:
    """The single-process trainer's epochs (train.train), sharded; updates ``record``."""
    say = log.info if rank == 0 else (lambda *a: None)
    metric = cfg["select_metric"]
    started = time.perf_counter()
    first_epoch = run.progress.epoch
    for epoch in range(first_epoch, cfg["epochs"]):
        if _stopped(record, epoch, cfg):
            break
        t0 = time.perf_counter()
        loss = run.train_epoch(epoch)
        seconds = time.perf_counter() - t0
        run.progress.epoch = epoch + 1
        entry = {"epoch": epoch + 1, "loss": loss, "seconds": seconds}
        eta = (time.perf_counter() - started) / (epoch + 1 - first_epoch) * (
            cfg["epochs"] - epoch - 1)
        line = f"epoch {epoch + 1}/{cfg['epochs']} | loss {loss:.4f} | {seconds:.1f} s"
        if (epoch + 1) % cfg["eval_every"] == 0 or epoch + 1 == cfg["epochs"]:
            valid = run.evaluate("valid")
            entry["valid"] = headline(valid, metric)
            line += f" | valid {describe_metrics(entry['valid'])}"
            if valid[metric] > record["best"]:
                record.update(best=valid[metric], best_epoch=epoch + 1, valid=valid)
                line += " *"
        record["history"].append(entry)
        say("%s | ETA %s | peak RSS %.0f MiB", line, format_seconds(eta), peak_rss_mib())
        _report(run, record, rank, entry, run_dir)
        if _stopped(record, epoch + 1, cfg):
            say("early stop: no better valid %s for %d epochs (best epoch %d)",
                metric, cfg["patience"], record["best_epoch"])


def _peak_memory(device: torch.device) -> dict:
    out = {"peak_rss_mib": peak_rss_mib()}
    if device.type == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return out


def _part_counts(state: dict) -> dict[str, int]:
    """LDiffRec.parameter_counts from its state_dict (encoders, decoder, denoiser, total)."""
    parts = {"encoders": ("encoders.",), "decoder": ("decoder.", "decoders."),
             "denoiser": ("denoiser.",)}
    counts = {name: sum(v.numel() for k, v in state.items() if k.startswith(prefixes))
              for name, prefixes in parts.items()}
    counts["total"] = sum(counts.values())
    return counts


def _finish(run, cfg: dict, record: dict, config: dict, rank: int, device,
            data_name: str) -> None:
    """last.pt, then the best epoch's shards back in: valid/test metrics, best.pt and
    metrics.json (rank 0), with every worker's peak memory."""
    run_dir = Path(config["run_dir"])
    last = run.full_model_state()
    if rank == 0:        # written now, not held through the best epoch's evaluation
        runs.save_checkpoint(run_dir, "last", {"model": last, "epoch": run.progress.epoch,
                                               "step": run.progress.step, "record": record})
    del last
    run.load_state(checkpoint.at_epoch(run_dir, record["best_epoch"]))
    valid = run.evaluate("valid")
    test = run.evaluate("test") if config["test"] else None
    best = run.full_model_state()
    memory = [None] * run.world
    dist.all_gather_object(memory, {"rank": rank, **_peak_memory(device)})
    if rank != 0:
        return
    runs.save_checkpoint(run_dir, "best", {"model": best, "epoch": record["best_epoch"],
                                           "record": record})
    plan = Plan.from_dict(config["plan"])
    for m in memory:
        m.update(clusters=plan.clusters(m["rank"]), items=plan.items(m["rank"]))
    metrics = {
        "model": cfg["model"], "data": data_name, "convention": cfg["convention"],
        "best_epoch": record["best_epoch"], "valid": valid,
        **({"test": test} if test is not None else {}),
        "history": record["history"], "resumed_at": record["resumed_at"],
        "parameters": _part_counts(best),
        "peak_rss_mib": max(m["peak_rss_mib"] for m in memory),
        "distributed": {"workers": run.world, "use_gpu": config["use_gpu"],
                        "zero_stage": cfg["distributed"]["zero_stage"],
                        "placement": cfg["distributed"]["placement"]},
        "plan": config["plan"], "per_worker": memory,
    }
    runs.write_json(run_dir / runs.METRICS, metrics)
    split, shown = ("test", test) if test is not None else ("valid", valid)
    log.info("best epoch %d | %s %s | wrote %s", record["best_epoch"], split,
             describe_metrics(headline(shown, cfg["select_metric"])), run_dir / runs.METRICS)


def train_loop(config: dict) -> None:
    """Ray Train's per-worker function (``config``: cfg, run_dir, plan, use_gpu)."""
    import ray.train
    from ray.train.torch import get_device
    from .worker import ShardedRun
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
    _epoch_loop(run, cfg, record, rank, run_dir)
    _finish(run, cfg, record, config, rank, device, data.name)
