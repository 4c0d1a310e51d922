"""Seconds per training epoch (single process) of a config, median over several epochs.

    python benchmarks/epoch_time.py --config configs/ml1m-clean-ldiffrec.yaml
    python benchmarks/epoch_time.py --config configs/ml1m-clean-diffrec.yaml --epochs 5

One warm-up epoch, then ``--epochs`` timed ones (training only: no evaluation). Writes
benchmarks/results/epoch_time.json, one row per config (merged), with the machine, the
torch thread count, parameter counts and peak RSS. Compare with the reference
implementation's figures in ../shared/PAPER.md only when the machine is otherwise idle.
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scale_diffrec.files import output_file_arg  # noqa: E402

from scale_diffrec.config import absolute_paths, load_config  # noqa: E402
from scale_diffrec.data import load_data  # noqa: E402
from scale_diffrec.models import Progress, build_model, parameter_groups  # noqa: E402
from scale_diffrec.progress import peak_rss_mib  # noqa: E402
from scale_diffrec.runs import write_json  # noqa: E402
from scale_diffrec.train.loop import parameter_counts  # noqa: E402
from scale_diffrec.train import (prepare_partition, seed_everything,  # noqa: E402
                                 train_epoch)


def measure(config: str, overrides: list[str], epochs: int) -> dict:
    cfg = absolute_paths(load_config(ROOT / config, overrides))
    seed_everything(cfg["seed"])
    data = load_data(cfg)
    model = build_model(cfg, data.n_items, prepare_partition(cfg, data, None))
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg))
    progress = Progress()
    seconds = []
    for epoch in range(epochs + 1):
        t0 = time.perf_counter()
        train_epoch(model, optimizer, data, cfg, epoch, progress)
        progress.epoch = epoch + 1
        if epoch > 0:                       # epoch 0 is the warm-up
            seconds.append(time.perf_counter() - t0)
    return {"config": config, "overrides": overrides, "data": data.name,
            "users": data.n_users, "items": data.n_items, "batch_size": cfg["batch_size"],
            "epoch_seconds": seconds, "epoch_seconds_median": statistics.median(seconds),
            "parameters": parameter_counts(model), "peak_rss_mib": peak_rss_mib(),
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", type=output_file_arg,
                        default=str(ROOT / "benchmarks" / "results" / "epoch_time.json"))
    args = parser.parse_args()
    row = measure(args.config, args.overrides, args.epochs)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"rows": {}}
    results["rows"][Path(args.config).stem] = row
    results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "load_average_1m": os.getloadavg()[0]}
    write_json(out, results)
    print(json.dumps({k: row[k] for k in ("config", "epoch_seconds_median", "peak_rss_mib")}))


if __name__ == "__main__":
    main()
