"""Sharded L-DiffRec training with W = 1, 2 ... gloo processes: epoch time, per-worker peak
memory, and the share of step time spent in collectives.

    python benchmarks/distributed_step.py                                  # ML-1M, W = 1, 2
    python benchmarks/distributed_step.py --config configs/quickstart.yaml --workers 1 2

Runs ``ShardedRun.train_epoch`` (the code Ray Train workers run) in W local processes
(``train.distributed.local.run_distributed``; no Ray start-up in the figures): one warm-up epoch,
then ``--epochs`` timed ones. Collective time is the wall time inside torch.distributed's
collectives (``profiling.meter_collectives``, ZeRO's gradient reductions
included), summed over the timed epochs, as a share of their wall time. With W processes
on 2 cores, W > 2 measures oversubscription, not scaling. Writes
benchmarks/results/distributed_step.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scale_diffrec.files import output_file_arg  # noqa: E402

def _worker(rank: int, world: int, config: str, overrides: list[str], epochs: int) -> dict:
    from scale_diffrec.profiling import meter_collectives
    meter = meter_collectives()
    import torch
    from scale_diffrec.config import absolute_paths, load_config
    from scale_diffrec.data import load_data
    from scale_diffrec.train.distributed.trainer import build_plan
    from scale_diffrec.train.distributed.worker import ShardedRun
    from scale_diffrec.progress import peak_rss_mib
    from scale_diffrec.train import prepare_partition, seed_everything
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    cfg = absolute_paths(load_config(ROOT / config, overrides))
    data = load_data(cfg)
    partition = prepare_partition(cfg, data, None)
    seed_everything(cfg["seed"])
    run = ShardedRun(cfg, data, partition, build_plan(cfg, partition, world), "cpu")
    run.train_epoch(0)
    meter.reset()
    seconds = []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        run.train_epoch(epoch)
        seconds.append(time.perf_counter() - t0)
    return {"rank": rank, "epoch_seconds": seconds, "collective_seconds": {k: v["seconds"] for k, v in meter.totals.items()},
            "peak_rss_mib": peak_rss_mib(), "clusters": run.clusters,
            "items": int(sum(len(run.model.items_of(c)) for c in run.clusters))}


def main() -> None:
    from scale_diffrec.train.distributed.local import run_distributed
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/ml1m-clean-ldiffrec.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", type=output_file_arg,
                        default=str(ROOT / "benchmarks" / "results" /
                                             "distributed_step.json"))
    args = parser.parse_args()
    rows = []
    for w in args.workers:
        ranks = run_distributed(_worker, w, args=(args.config, args.overrides, args.epochs),
                                env={"DS_ACCELERATOR": "cpu"}, timeout=1800, threads=None)
        epoch = statistics.median(max(r["epoch_seconds"][i] for r in ranks)
                                  for i in range(args.epochs))
        wall = sum(ranks[0]["epoch_seconds"])
        share = [sum(r["collective_seconds"].values()) / sum(r["epoch_seconds"]) for r in ranks]
        rows.append({"workers": w, "epoch_seconds_median": epoch,
                     "collective_share_per_rank": share, "per_rank": ranks,
                     "wall_seconds_rank0": wall})
        print(json.dumps({"workers": w, "epoch_seconds_median": round(epoch, 3),
                          "collective_share": [round(x, 3) for x in share],
                          "peak_rss_mib": [round(r["peak_rss_mib"]) for r in ranks]}), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "overrides": args.overrides, "rows": rows,
                               "machine": {"platform": platform.platform(),
                                           "cpus": os.cpu_count()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
