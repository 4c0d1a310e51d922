"""L-DiffRec's and DiffuRec's cost vs catalogue and workers: time, memory, collectives.

    python benchmarks/scaling.py                            # items 1e4 1e5 1e6 x W 1 2 4
    python benchmarks/scaling.py --items 10000 --workers 1 2 --steps 4     # a quick run
    python benchmarks/scaling.py --config configs/diffurec-synthetic-1m.yaml --users 300 \\
        --items 10000 1000000 --workers 1 2 --steps 3 --warmup 1 --eval \\
        --out benchmarks/results/scaling-diffurec.json        # DiffuRec, sequences
    ray job submit --working-dir . -- python benchmarks/scaling.py --launcher ray \\
        --items 1000000 10000000 --workers 1 2 4 8                # a GPU cluster, unchanged

Every point (items I, workers W) trains the sharded model of ``--config`` (default
configs/synthetic-1m.yaml: L-DiffRec, per-cluster decoders, 8 balanced clusters, batch
500; configs/diffurec-synthetic-1m.yaml: DiffuRec as released, hidden 128, batch 512, its
item table in 2 row blocks, on the synthetic users' interactions as time-ordered
sequences) on a synthetic catalogue of I items with ``--users`` users, for ``--warmup`` +
``--steps`` optimizer steps of ``ShardedRun`` (the code Ray Train workers run; batches of
``train.epoch_units``: users, or DiffuRec's training samples), and measures per rank and
step:
    seconds per step (the slowest rank's; wall, and the process's CPU seconds: the
    steadier figure on a shared machine), users/s (batch / step; DiffuRec: samples/s),
    seconds per epoch (steps per epoch x median step: extrapolated), peak RSS and, on GPU, peak allocated
    memory, the exact bytes of the rank's catalogue-sharded tensors (its clusters'
    weights, gradients and AdamW moments), and the calls, bytes and seconds inside each
    collective (``profiling``), per step;
and the memory model's prediction for the rank (``memory_model.worker_terms``, DiffuRec:
``diffurec_worker_terms``). Its
constant term, the runtime (interpreter, torch, pyarrow, DeepSpeed and its engine, thread
pools), is calibrated once per W: the smallest catalogue's measured peak minus its other
terms; the larger catalogues then test the model (``measured_over_model``).

Launchers: ``local`` (default) runs W processes joined by gloo (NCCL and one GPU each when
the machine has W GPUs); ``ray`` runs a TorchTrainer with ScalingConfig(num_workers=W,
use_gpu when the cluster has W GPUs) on the cluster at RAY_ADDRESS (or a local one); the
partition files and the ranks' results go to ``--workdir``, which must be shared storage
on a multi-node cluster.
With W processes on fewer cores (this 2-core machine at W = 4), time measures
oversubscription, not scaling; memory is unaffected. ``--profile`` adds rank 0's top
operators (torch.profiler) over two more steps of each point, after the measurements.

``--eval`` then times one full-ranking pass of the test split over every user of the
point (``evaluate``, the code of a run's validation: DiffuRec's query is the reverse chain
of all its steps), beside its bound, per rank of W (rows and items split W ways):

    bound = (scoring + query) FLOP / W / 210 GFLOP/s
          + U I / W x (seconds per score of torch.topk(k = max topk) over one
                       [eval_batch_size, chunk] block, measured in the same run)

scoring = 2 U sum_h I_h (d_h + 1) over the model's linear heads (``item_heads``), query =
U x the FLOP of DiffuRec's reverse chain per user (``torch.utils.flop_counter`` over the
``SequenceDenoiser`` on one row, times the reverse steps; not counted for L-DiffRec), as
``benchmarks/catalogue.py`` states its bound; ``bound_seconds_measured_rate`` is the same at
the matmul rate measured at that moment.

Writes benchmarks/results/scaling.json and scaling.png (time and memory vs items; speed-up
and memory vs workers), with the machine, device and launcher it ran on.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scale_diffrec.files import output_file_arg  # noqa: E402
MODEL_NAMES = {"ldiffrec": "L-DiffRec", "diffurec": "DiffuRec"}


# ------------------------------------------------------------------------- one rank
def measure(point: dict, device=None) -> dict:
    """Inside a rank of an initialised process group: build, warm up, time the steps."""
    from scale_diffrec.profiling import current_rss_mib, meter_collectives
    meter = meter_collectives()                  # before DeepSpeed binds the collectives
    import time

    import torch
    import torch.distributed as dist
    from scale_diffrec.config import load_config
    from scale_diffrec.data import load_data
    from scale_diffrec.shard.plan import Plan
    from scale_diffrec.train.distributed.worker import ShardedRun
    from scale_diffrec.train.distributed.zero import import_deepspeed
    from scale_diffrec.progress import peak_rss_mib
    from scale_diffrec.train import epoch_units, prepare_partition, seed_everything
    import_deepspeed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if device is None:
        device = torch.device(f"cuda:{rank % torch.cuda.device_count()}"
                              if torch.cuda.is_available() else "cpu")
    runtime_mib = current_rss_mib()
    cfg = load_config(point["config"], point["overrides"])
    data = load_data(cfg)
    partition = prepare_partition(cfg, data, None)
    seed_everything(cfg["seed"])
    plan = Plan.from_dict(point["plan"])
    run = ShardedRun(cfg, data, partition, plan, device)
    run.model.train()
    order = epoch_units(data, cfg["seed"], 0)
    b = cfg["batch_size"]
    steps = point["warmup"] + point["steps"]
    batches = [order[(i * b) % len(order):][:b] for i in range(steps)]
    del order
    seconds, cpu = [], []
    for i, users in enumerate(batches):
        if i == point["warmup"]:
            meter.reset()
        t0, c0 = time.perf_counter(), time.process_time()
        _step(run, users, device)
        if i >= point["warmup"]:
            seconds.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    peak = peak_rss_mib()                  # before profiling, which holds its events
    collectives = {k: {"calls_per_step": v["calls"] / point["steps"],
                       "seconds_per_step": v["seconds"] / point["steps"],
                       "bytes_per_step": v["bytes"] / point["steps"]}
                   for k, v in meter.totals.items()}
    table = None
    if point["profile"]:                   # every rank steps (collectives); rank 0 records
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        import contextlib
        prof = torch.profiler.profile(activities=activities) if rank == 0 else None
        with prof if prof is not None else contextlib.nullcontext():
            for users in batches[:2]:
                _step(run, users, device)
        if prof is not None:
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    sharded = sum(t.numel() * t.element_size() for p in run.optimizer.local_params
                  for t in [p] + ([p.grad] if p.grad is not None else []))
    sharded += sum(v.numel() * v.element_size() for s in run.local_optimizer.state.values()
                   for v in s.values() if torch.is_tensor(v))
    model = model_terms(cfg, data, partition, plan.clusters(rank), world, run)
    out = {"rank": rank, "clusters": plan.clusters(rank), "items": plan.items(rank),
           "step_seconds": seconds, "step_cpu_seconds": cpu, "collectives": collectives,
           "runtime_rss_mib": runtime_mib, "peak_rss_mib": peak,
           "sharded_mib": sharded / 2 ** 20,
           "model_mib": {k: v / 2 ** 20 for k, v in model.items()},
           "device": str(device), "profile": table}
    if point["eval"]:
        out.update(eval_pass(run, cfg, device))
    if device.type == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        out["device_name"] = torch.cuda.get_device_name(device)
    return out


def model_terms(cfg: dict, data, partition, clusters, world: int, run) -> dict:
    """The memory model's terms (bytes) for the rank holding ``clusters``."""
    from scale_diffrec.memory_model import diffurec_worker_terms, worker_terms
    if cfg["model"] == "diffurec":
        return diffurec_worker_terms(cfg, partition.sizes, clusters, data.n_items,
                                     data.n_users, len(data.items),
                                     len(data.train_positions()), world)
    batch_nnz = data.train.nnz / data.n_users * cfg["batch_size"]
    return worker_terms(cfg, partition.sizes, clusters, data.n_items, data.n_users,
                        data.train.nnz + data.valid.nnz + data.test.nnz, batch_nnz, world,
                        denoiser_params=sum(p.numel() for p in run.model.denoiser.parameters()))


def eval_pass(run, cfg: dict, device) -> dict:
    """One full-ranking test pass (``evaluate``) timed on this rank, its peak RSS and the
    FLOP of its scoring products (its linear heads)."""
    import time

    import torch
    from scale_diffrec.progress import peak_rss_mib
    t0, c0 = time.perf_counter(), time.process_time()
    metrics = run.evaluate("test")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    items = sum(len(h.items) for h in run.model.item_heads())
    return {"eval_seconds": seconds, "eval_cpu_seconds": cpu,
            "eval_peak_rss_mib": peak_rss_mib(),
            "eval_items": items, "eval_users": run.data.n_users,
            "eval_scoring_flop": 2.0 * run.data.n_users * sum(
                len(h.items) * (h.weight.shape[1] + 1) for h in run.model.item_heads()),
            "eval_metrics": {k: v for k, v in metrics.items() if "@" in k}}


def query_flop_per_user(cfg: dict) -> float:
    """FLOP of DiffuRec's query for one user: the ``SequenceDenoiser`` on one [1, max_len]
    row (``torch.utils.flop_counter``), once per reverse step; 0 for other models."""
    if cfg["model"] != "diffurec":
        return 0.0
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from scale_diffrec.config import typed
    from scale_diffrec.memory_model import diffurec_one_row
    from scale_diffrec.models.respace import space_timesteps
    net, args = diffurec_one_row(cfg)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net.eval()(*args)
    dcfg = typed(cfg).diffurec
    steps = (dcfg.steps if dcfg.reverse_steps is None
             else len(space_timesteps(dcfg.steps, dcfg.reverse_steps)))
    return float(counter.get_total_flops()) * steps


def eval_bound(row: dict, cfg: dict, query_flop: float) -> dict:
    """The pass's bound (module docstring) for a summarized row with ``--eval``."""
    from catalogue import MATMUL_GFLOPS, matmul_gflops, topk_seconds_per_score
    from scale_diffrec.device import chunk_items
    ranks, w = row["per_rank"], row["workers"]
    users = ranks[0]["eval_users"]
    flop = sum(r["eval_scoring_flop"] for r in ranks) + users * query_flop
    rows = min(cfg["eval_batch_size"], users)
    chunk = chunk_items(rows, "cpu", cfg["chunk_mib"])
    topk = users * max(r["eval_items"] for r in ranks) * topk_seconds_per_score(
        rows, min(chunk, max(r["eval_items"] for r in ranks)), max(cfg["topk"]))
    gflops, seconds = matmul_gflops(), max(r["eval_seconds"] for r in ranks)
    bound = flop / w / (MATMUL_GFLOPS * 1e9) + topk
    return {"eval_users": users, "eval_seconds": seconds, "pass_over_bound": seconds / bound,
            "eval_cpu_seconds": max(r["eval_cpu_seconds"] for r in ranks),
            "eval_peak_rss_mib_max": max(r["eval_peak_rss_mib"] for r in ranks),
            "scoring_gflop": sum(r["eval_scoring_flop"] for r in ranks) / 1e9,
            "query_gflop": users * query_flop / 1e9, "topk_seconds": topk,
            "matmul_gflops_measured": gflops,
            "bound_seconds": bound,
            "bound_seconds_measured_rate": flop / w / (gflops * 1e9) + topk,
            "eval_metrics": ranks[0]["eval_metrics"]}


def _step(run, users, device) -> None:
    import torch
    run.loss_and_backward(users)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _local_rank(rank: int, world: int, point: dict) -> dict:
    return measure(point)


def _ray_rank(point: dict) -> None:
    import torch.distributed as dist
    from ray.train.torch import get_device
    result = measure(point, get_device())
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, result)
    if dist.get_rank() == 0:       # Ray Train keeps no metrics without a checkpoint
        Path(point["result"]).write_text(json.dumps(every))


# ------------------------------------------------------------------------- launchers
def run_local(point: dict, workers: int) -> list[dict]:
    import torch
    from scale_diffrec.train.distributed.local import run_distributed
    gpus = torch.cuda.device_count()
    backend = "nccl" if gpus >= workers else "gloo"
    env = {} if backend == "nccl" else {"DS_ACCELERATOR": "cpu"}
    threads = max(1, (os.cpu_count() or 1) // workers)
    return run_distributed(_local_rank, workers, args=(point,), env=env, timeout=3600,
                           threads=threads, backend=backend)


def run_ray(point: dict, workers: int) -> list[dict]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from scale_diffrec.train.distributed.trainer import resolve_use_gpu, worker_env
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local")
    use_gpu = resolve_use_gpu("auto", workers)
    trainer = TorchTrainer(
        _ray_rank, train_loop_config=point,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RunConfig(name=f"scaling-{point['items']}-{workers}",
                             storage_path=point["workdir"],
                             worker_runtime_env={"env_vars": worker_env(use_gpu)}))
    trainer.fit()
    return json.loads(Path(point["result"]).read_text())


# ------------------------------------------------------------------------- the sweep
def prepare(config: str, overrides: list[str], items: int, users: int, workdir: Path
            ) -> tuple[list[str], dict, object, object]:
    """The point's overrides (L-DiffRec: with its partition file, built here once: its
    k-means is the costly part; DiffuRec's row blocks are rebuilt by every rank); returns
    (overrides, cfg, data, partition)."""
    from scale_diffrec.config import load_config
    from scale_diffrec.data import load_data
    from scale_diffrec.train import prepare_partition
    over = list(overrides) + [f"data.synthetic.n_items={items}",
                              f"data.synthetic.n_users={users}"]
    cfg = load_config(config, over)
    data = load_data(cfg)
    partition = prepare_partition(cfg, data, None)
    if cfg["model"] == "diffurec":
        return over, cfg, data, partition
    path = workdir / f"partition-{items}.parquet"
    partition.save(path)
    return over + [f"ldiffrec.partition={path}"], cfg, data, partition


def summarize(items: int, workers: int, data, batch: int, ranks: list[dict]) -> dict:
    """The point's row: the slowest rank's median step; per epoch, what ``epoch_units``
    visits (users, or DiffuRec's training samples, ``unit``)."""
    from scale_diffrec.data import Sequences
    steps = len(ranks[0]["step_seconds"])
    step, cpu = (statistics.median(max(r[key][i] for r in ranks) for i in range(steps))
                 for key in ("step_seconds", "step_cpu_seconds"))
    names = sorted({k for r in ranks for k in r["collectives"]})
    unit, per_epoch = (("samples", len(data.train_positions())) if isinstance(data, Sequences)
                       else ("users", data.n_users))
    return {
        "items": items, "workers": workers, "users": data.n_users, "batch_size": batch,
        "step_seconds_median": step, "step_cpu_seconds_median": cpu,
        f"{unit}_per_second": batch / step,
        f"{unit}_per_epoch": per_epoch,
        "epoch_seconds_extrapolated": math.ceil(per_epoch / batch) * step,
        "peak_rss_mib_max": max(r["peak_rss_mib"] for r in ranks),
        "sharded_mib_max": max(r["sharded_mib"] for r in ranks),
        "model_mib_max": max(r["model_mib"]["total"] for r in ranks),   # without runtime
        "collective_seconds_per_step_max": max(
            sum(c["seconds_per_step"] for c in r["collectives"].values()) for r in ranks),
        "collective_bytes_per_step": {n: max(r["collectives"].get(n, {}).get(
            "bytes_per_step", 0) for r in ranks) for n in names},
        "per_rank": ranks}


def calibrate(rows: list[dict]) -> None:
    """Per W: runtime = peak RSS - modelled terms at the smallest catalogue; then every
    row's ``model_mib_max`` includes it and ``measured_over_model`` = peak / model."""
    for w in {r["workers"] for r in rows}:
        mine = sorted((r for r in rows if r["workers"] == w), key=lambda r: r["items"])
        runtime = mine[0]["peak_rss_mib_max"] - mine[0]["model_mib_max"]
        for r in mine:
            r["runtime_mib"] = runtime
            r["model_mib_max"] += runtime
            r["measured_over_model"] = r["peak_rss_mib_max"] / r["model_mib_max"]


def machine(ranks: list[dict], launcher: str) -> dict:
    import torch
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"launcher": launcher, "platform": platform.platform(), "cpu": cpu,
            "cpus": os.cpu_count(), "device": ranks[0]["device"],
            "device_name": ranks[0].get("device_name", cpu),
            "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30,
            "torch": torch.__version__}


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    items = sorted({r["items"] for r in rows})
    workers = sorted({r["workers"] for r in rows})
    at = {(r["items"], r["workers"]): r for r in rows}
    fig, ax = plt.subplots(2, 2, figsize=(11, 8.5))
    for w in workers:
        xs = [i for i in items if (i, w) in at]
        ax[0, 0].plot(xs, [at[i, w]["step_seconds_median"] for i in xs], "o-", label=f"W={w}")
        line, = ax[0, 1].plot(xs, [at[i, w]["peak_rss_mib_max"] for i in xs], "o-",
                              label=f"W={w} peak RSS")
        ax[0, 1].plot(xs, [at[i, w]["model_mib_max"] for i in xs], "x--",
                      color=line.get_color(), label=f"W={w} model")
    for i in items:
        ws = [w for w in workers if (i, w) in at]
        if (i, 1) not in at:
            continue
        base = at[i, 1]
        ax[1, 0].plot(ws, [base["step_seconds_median"] / at[i, w]["step_seconds_median"]
                           for w in ws], "o-", label=f"{i:,} items")
        ax[1, 1].plot(ws, [at[i, w]["sharded_mib_max"] / base["sharded_mib_max"] for w in ws],
                      "o-", label=f"{i:,} items: sharded tensors")
        ax[1, 1].plot(ws, [at[i, w]["peak_rss_mib_max"] / base["peak_rss_mib_max"]
                           for w in ws], "s:", label=f"{i:,} items: peak RSS")
    ax[1, 0].plot(workers, workers, "k--", lw=0.8, label="ideal")
    ax[1, 1].plot(workers, [1 / w for w in workers], "k--", lw=0.8, label="1/W")
    for a, (xl, yl, t) in zip(ax.flat, [
            ("items", "seconds per step", "time vs catalogue"),
            ("items", "MiB per worker (max over ranks)", "memory vs catalogue"),
            ("workers", "speed-up T(1) / T(W)", "speed-up vs workers"),
            ("workers", "per-worker memory / W=1", "memory vs workers")]):
        a.set_xlabel(xl), a.set_ylabel(yl), a.set_title(t), a.grid(alpha=0.3)
        a.legend(fontsize=7)
    for a in ax[0]:
        a.set_xscale("log"), a.set_yscale("log")
    ax[1, 1].set_yscale("log")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/synthetic-1m.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--launcher", choices=["local", "ray"], default="local")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--eval", action="store_true", help="time one full-ranking test pass "
                        "of every point beside its bound")
    parser.add_argument("--workdir", default=None, help="partition files (shared storage on "
                                                        "a multi-node Ray cluster)")
    parser.add_argument("--out", type=output_file_arg,
                        default=str(ROOT / "benchmarks" / "results" / "scaling.json"))
    args = parser.parse_args()
    from scale_diffrec.train.distributed.trainer import build_plan
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sdr-scaling-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = str((ROOT / args.config) if not Path(args.config).is_absolute() else args.config)
    launch = run_local if args.launcher == "local" else run_ray
    rows, load_start = [], os.getloadavg()       # a shared machine: what else ran
    for items in args.items:
        overrides, cfg, data, partition = prepare(config, args.overrides, items, args.users,
                                                  workdir)
        query_flop = query_flop_per_user(cfg) if args.eval else 0.0
        for w in args.workers:
            if w > partition.n_clusters:
                continue
            point = {"config": config, "overrides": overrides, "items": items,
                     "plan": build_plan(cfg, partition, w).to_dict(), "steps": args.steps,
                     "warmup": args.warmup, "profile": args.profile, "eval": args.eval,
                     "workdir": str(workdir),
                     "result": str(workdir / f"ranks-{items}-{w}.json")}
            ranks = launch(point, w)
            row = summarize(items, w, data, cfg["batch_size"], ranks)
            if args.eval:
                row["eval"] = eval_bound(row, cfg, query_flop)
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                              for k, v in row.items() if k != "per_rank"}), flush=True)
        del data, partition
    calibrate(rows)
    info = machine(rows[0]["per_rank"], args.launcher)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "model": cfg["model"],
                               "overrides": args.overrides,
                               "load_average": {"start": load_start, "end": os.getloadavg()},
                               "command": " ".join(sys.argv), "machine": info, "rows": rows},
                              indent=2) + "\n")
    plot(rows, out.with_suffix(".png"),
         f"{MODEL_NAMES[cfg['model']]} sharded step, {args.config}, {args.users:,} users, batch "
         f"{rows[0]['batch_size']}; {info['device_name']} x {info['cpus']} CPUs, "
         f"{args.launcher} launcher")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
