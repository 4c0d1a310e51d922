"""Reproduce the paper's ML-1M rows: train each model with its config, write test metrics
beside the paper's numbers and the reference implementation's measured ones.

    python benchmarks/reproduce.py                       # every row
    python benchmarks/reproduce.py --only diffrec-clean  # one row
    python benchmarks/reproduce.py --set epochs=5        # quick look (overrides all rows)
    python benchmarks/reproduce.py --from-runs           # rows from finished runs/reproduce/*
    python benchmarks/reproduce.py --tuned runs/tune     # a row's config = its search's best
                                                         # (runs/tune/ROW/best.yaml, from
                                                         # scale-diffrec tune --out runs/tune/ROW)

Writes benchmarks/results/reproduce.json (rows merged by name, so rows can run separately).
Metrics use the reference convention (sums over users with test items / all users).
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

from scale_diffrec.config import load_config  # noqa: E402
from scale_diffrec.progress import setup_logging  # noqa: E402
from scale_diffrec.runs import write_json  # noqa: E402
from scale_diffrec.train import train  # noqa: E402

# ../shared/PAPER.md: arXiv 2304.04971 Table 2 (clean ML-1M) and the authors' code run on a
# 2-core CPU here.
PAPER = {
    "multvae-clean": {"recall@10": 0.1007, "recall@20": 0.1726, "ndcg@10": 0.0825, "ndcg@20": 0.1076},
    "diffrec-clean": {"recall@10": 0.1058, "recall@20": 0.1787, "ndcg@10": 0.0901, "ndcg@20": 0.1148},
    "ldiffrec-clean": {"recall@10": 0.1060, "recall@20": 0.1809, "ndcg@10": 0.0868, "ndcg@20": 0.1122},
}
REFERENCE_MEASURED = {
    "diffrec-clean": {"recall@10": 0.1007, "recall@20": 0.1697, "ndcg@10": 0.0862, "ndcg@20": 0.1094,
                      "note": "authors' code, 20-epoch cap, best valid epoch 10"},
    "ldiffrec-clean": {"recall@10": 0.0913, "recall@20": 0.1587, "ndcg@10": 0.0799, "ndcg@20": 0.1030,
                       "note": "authors' code, best valid epoch 30", "epoch_seconds": 3.1},
}
ROWS = {
    "diffrec-clean": "configs/ml1m-clean-diffrec.yaml",
    "diffrec-noisy": "configs/ml1m-noisy-diffrec.yaml",
    "multvae-clean": "configs/ml1m-clean-multvae.yaml",
    "ldiffrec-clean": "configs/ml1m-clean-ldiffrec.yaml",
    "ldiffrec-noisy": "configs/ml1m-noisy-ldiffrec.yaml",
}
KEYS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")


def row_config(name: str, tuned: Path | None) -> tuple[Path, dict | None]:
    """The row's config file: TUNED/NAME/best.yaml (with its search's tune.json summary)
    when ``tuned`` holds a finished search for the row, else the hand-written config."""
    best = tuned / name / "best.yaml" if tuned is not None else None
    if best is None or not best.is_file():
        return ROOT / ROWS[name], None
    summary = json.loads((best.parent / "tune.json").read_text())
    return best, {"search": summary["search"], "trials": summary["trials"],
                  "params": summary["best"]["params"], "table": summary["table"]}


def run_row(name: str, overrides: list[str], runs_dir: Path, tuned: Path | None = None) -> dict:
    config, search = row_config(name, tuned)
    cfg = load_config(config, overrides)
    if cfg["data"]["path"] and not Path(cfg["data"]["path"]).is_absolute():
        cfg["data"]["path"] = str((ROOT / cfg["data"]["path"]).resolve())
    if not Path(cfg["data"]["path"]).is_dir():
        return {"skipped": f"data folder {cfg['data']['path']} is absent"}
    started = time.perf_counter()
    metrics = train(cfg, runs_dir / name, overwrite=True)
    row = make_row(name, overrides, metrics, time.perf_counter() - started, config)
    return {**row, "tuned": search} if search else row


def make_row(name: str, overrides: list[str], metrics: dict, wall_seconds: float | None,
             config: Path | None = None) -> dict:
    """The JSON row of one finished run's metrics.json, beside the paper's numbers."""
    seconds = [h["seconds"] for h in metrics["history"]]
    row = {
        "config": str(config or ROWS[name]), "overrides": overrides,
        "convention": metrics["convention"],
        "best_epoch": metrics["best_epoch"], "epochs_run": len(seconds),
        "test": {k: metrics["test"][k] for k in KEYS},
        "valid": {k: metrics["valid"][k] for k in KEYS},
        "epoch_seconds_median": statistics.median(seconds),
        "wall_seconds": wall_seconds,
        "peak_rss_mib": metrics["peak_rss_mib"],
        "parameters": metrics.get("parameters"),
    }
    if name in PAPER:
        row["paper"] = PAPER[name]
        row["ratio_to_paper"] = {k: row["test"][k] / PAPER[name][k] for k in KEYS}
    if name in REFERENCE_MEASURED:
        row["reference_measured"] = REFERENCE_MEASURED[name]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(ROWS))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--runs", default=str(ROOT / "runs" / "reproduce"))
    parser.add_argument("--from-runs", action="store_true",
                        help="rebuild the rows from finished runs in --runs, without training")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reproduce.json"))
    parser.add_argument("--tuned", type=Path, help="folder of searches, one per row "
                        "(TUNED/ROW from `scale-diffrec tune --out`): train each row from its "
                        "search's best.yaml")
    args = parser.parse_args()
    setup_logging()
    out = Path(args.out)
    machine = {"platform": platform.platform(), "processor": platform.machine(),
               "python": platform.python_version(), "cpus": os.cpu_count()}
    for name in args.only or ROWS:
        metrics_file = Path(args.runs) / name / "metrics.json"
        if args.from_runs and not metrics_file.is_file():
            continue
        row = (make_row(name, args.overrides, json.loads(metrics_file.read_text()), None)
               if args.from_runs else run_row(name, args.overrides, Path(args.runs),
                                              args.tuned))
        # re-read before writing: rows may be run by separate, concurrent invocations
        results = json.loads(out.read_text()) if out.is_file() else {"rows": {}}
        results["rows"][name] = row
        results["machine"] = machine
        write_json(out, results)
        print(json.dumps({name: row.get("test")}))


if __name__ == "__main__":
    main()
