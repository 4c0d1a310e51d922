"""Reproduce the papers' rows: DiffRec's ML-1M table and DiffuRec's Beauty / Toys / ML-1M
table. Train each model with its config, write test metrics beside the paper's numbers and
the reference implementation's measured ones.

    python benchmarks/reproduce.py                       # every default row
    python benchmarks/reproduce.py --only diffrec-clean  # one row
    python benchmarks/reproduce.py --set epochs=5        # quick look (overrides all rows)
    python benchmarks/reproduce.py --only diffurec-beauty --workers 2     # on 2 Ray workers
    python benchmarks/reproduce.py --from-runs           # rows from finished runs/reproduce/*
    python benchmarks/reproduce.py --tuned runs/tune     # a row's config = its search's best
                                                         # (runs/tune/ROW/best.yaml, from
                                                         # scale-diffrec tune --out runs/tune/ROW;
                                                         # the row is that selected trial's run,
                                                         # runs/tune/ROW/best, when no --set)
    python benchmarks/reproduce.py --seeds 2,3           # and the same config under seeds 2, 3:
                                                         # the row's "seeds" and "seed_spread"

Every row is the product: a ``scale-diffrec train --config CONFIG --out RUNS/ROW`` process
(``--workers W`` when given; ``catalogue.train_run``, which reuses a finished run of the
same config), whose metrics.json gives the test metrics of the epoch selected on valid.

DiffuRec rows (``diffurec-beauty``, ``diffurec-toys``, ``diffurec-ml1m``:
configs/diffurec-*.yaml, the released settings on the authors' data; ../shared/DIFFUREC.md)
record test HR@K / NDCG@K (K = 5, 10, 20) in percent beside the paper's Table 2 and the
fraction of it reached (``ratio_to_paper``). They run by default only where CUDA is
available: a released run is 100+ epochs at ~30 minutes an epoch on a 2-core CPU; ask for
one by name elsewhere (``--only diffurec-beauty``).

Writes benchmarks/results/reproduce.json (rows merged by name, so rows can run separately).
DiffRec rows use the reference convention (sums over users with test items / all users).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scale_diffrec.files import output_file_arg  # noqa: E402

import torch  # noqa: E402

from catalogue import train_run  # noqa: E402
from scale_diffrec.config import load_config  # noqa: E402
from scale_diffrec.errors import ConfigError  # noqa: E402
from scale_diffrec.progress import setup_logging  # noqa: E402
from scale_diffrec.runs import write_json  # noqa: E402

# ../shared/PAPER.md: arXiv 2304.04971 Table 2 (clean ML-1M) and the authors' code run on a
# 2-core CPU here.
PAPER = {
    "multvae-clean": {"recall@10": 0.1007, "recall@20": 0.1726, "ndcg@10": 0.0825, "ndcg@20": 0.1076},
    "diffrec-clean": {"recall@10": 0.1058, "recall@20": 0.1787, "ndcg@10": 0.0901, "ndcg@20": 0.1148},
    "ldiffrec-clean": {"recall@10": 0.1060, "recall@20": 0.1809, "ndcg@10": 0.0868, "ndcg@20": 0.1122},
    # ../shared/DIFFUREC.md: DiffuRec (Li, Sun & Li, TOIS 2023) Table 2, test, in %
    "diffurec-beauty": {"hr@5": 5.5758, "hr@10": 7.9068, "hr@20": 11.1098,
                        "ndcg@5": 4.0047, "ndcg@10": 4.7494, "ndcg@20": 5.5566},
    "diffurec-toys": {"hr@5": 5.5650, "hr@10": 7.4587, "hr@20": 9.8417,
                      "ndcg@5": 4.1667, "ndcg@10": 4.7724, "ndcg@20": 5.3684},
    "diffurec-ml1m": {"hr@5": 17.9659, "hr@10": 26.2647, "hr@20": 36.7870,
                      "ndcg@5": 12.1150, "ndcg@10": 14.7909, "ndcg@20": 17.4386},
}
REFERENCE_MEASURED = {
    "diffrec-clean": {"recall@10": 0.1007, "recall@20": 0.1697, "ndcg@10": 0.0862, "ndcg@20": 0.1094,
                      "note": "authors' code, 20-epoch cap, best valid epoch 10"},
    "ldiffrec-clean": {"recall@10": 0.0913, "recall@20": 0.1587, "ndcg@10": 0.0799, "ndcg@20": 0.1030,
                       "note": "authors' code, best valid epoch 30", "epoch_seconds": 3.1},
    "diffurec-ml1m": {"hr@5": 15.66, "note": "one public re-run of the official code "
                                             "(../shared/DIFFUREC.md)"},
}
ROWS = {
    "diffrec-clean": "configs/ml1m-clean-diffrec.yaml",
    "diffrec-noisy": "configs/ml1m-noisy-diffrec.yaml",
    "multvae-clean": "configs/ml1m-clean-multvae.yaml",
    "ldiffrec-clean": "configs/ml1m-clean-ldiffrec.yaml",
    "ldiffrec-noisy": "configs/ml1m-noisy-ldiffrec.yaml",
    "diffurec-beauty": "configs/diffurec-beauty.yaml",
    "diffurec-toys": "configs/diffurec-toys.yaml",
    "diffurec-ml1m": "configs/diffurec-ml1m.yaml",
}
KEYS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
SEQUENTIAL_KEYS = ("hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20")   # in %


def default_rows(cuda: bool) -> list[str]:
    """The rows run without ``--only``: DiffuRec's only with CUDA (module docstring)."""
    return [name for name in ROWS if cuda or not name.startswith("diffurec-")]


def row_config(name: str, tuned: Path | None) -> tuple[Path, dict | None]:
    """The row's config file: TUNED/NAME/best.yaml (with its search's tune.json summary)
    when ``tuned`` holds a finished search for the row, else the hand-written config."""
    best = tuned / name / "best.yaml" if tuned is not None else None
    if best is None or not best.is_file():
        return ROOT / ROWS[name], None
    summary = json.loads((best.parent / "tune.json").read_text())
    table = (best.parent / "trials.csv").resolve()      # beside best.yaml, where it moves
    return best, {"search": summary["search"], "trials": summary["trials"],
                  "params": summary["best"]["params"],
                  "table": str(table.relative_to(ROOT) if table.is_relative_to(ROOT) else table)}


def seed_spread(runs: dict[int, dict], keys: tuple[str, ...]) -> dict:
    """{metric: {mean, sd, min, max}} of the test metrics of the same config under several
    seeds (sd: the sample standard deviation)."""
    return {k: {"mean": statistics.mean(r[k] for r in runs.values()),
                "sd": statistics.stdev(r[k] for r in runs.values()),
                "min": min(r[k] for r in runs.values()),
                "max": max(r[k] for r in runs.values())} for k in keys}


def run_row(name: str, overrides: list[str], runs_dir: Path, tuned: Path | None = None,
            workers: int = 1, seeds: tuple[int, ...] = ()) -> dict:
    """Train the row (``catalogue.train_run``: the ``scale-diffrec train`` process, on
    ``workers`` Ray workers when > 1; a tuned row without overrides is its search's selected
    run, TUNED/ROW/best, trained already) and make its JSON row; with ``seeds``, also train the
    same config under each other seed (RUNS/ROW-seedN) and add their test metrics and
    spread. A row whose data folder is absent is skipped, with the reason."""
    config, search = row_config(name, tuned)
    selected = tuned / name / "best" / "metrics.json" if search and not overrides else None
    path = load_config(config, overrides)["data"]["path"]
    if path:
        path = Path(path) if Path(path).is_absolute() else (ROOT / path).resolve()
        if not path.is_dir():
            return {"skipped": f"data folder {path} is absent"}
        overrides = [*overrides, f"data.path={path}"]
    if selected is not None and workers == 1 and selected.is_file():
        # the selected trial's own run (the same config, trained by the product)
        metrics = {**json.loads(selected.read_text()), "wall_seconds": None}
    else:
        metrics = train_run(name, config, overrides, workers, runs_dir / name)
    row = make_row(name, overrides, metrics, metrics["wall_seconds"], config, workers)
    own = load_config(config, overrides)["seed"]
    if len(set(seeds) | {own}) > 1:
        runs = {own: row["test"]}
        for seed in sorted(set(seeds) - {own}):
            other = train_run(name, config, [*overrides, f"seed={seed}"], workers,
                              runs_dir / f"{name}-seed{seed}")
            runs[seed] = make_row(name, overrides, other, other["wall_seconds"])["test"]
        row["seeds"] = {str(seed): test for seed, test in runs.items()}
        row["seed_spread"] = seed_spread(runs, tuple(row["test"]))
    return {**row, "tuned": search} if search else row


def make_row(name: str, overrides: list[str], metrics: dict, wall_seconds: float | None,
             config: Path | None = None, workers: int = 1) -> dict:
    """The JSON row of one finished run's metrics.json, beside the paper's numbers (DiffuRec
    rows: HR / NDCG in percent, as the paper's table)."""
    seconds = [h["seconds"] for h in metrics["history"]]
    sequential = name.startswith("diffurec-")
    keys, scale = (SEQUENTIAL_KEYS, 100.0) if sequential else (KEYS, 1.0)
    row = {
        "config": str(config or ROWS[name]), "overrides": overrides, "workers": workers,
        "convention": metrics["convention"], "unit": "%" if sequential else "fraction",
        "best_epoch": metrics["best_epoch"], "epochs_run": len(seconds),
        "test": {k: scale * metrics["test"][k] for k in keys},
        "valid": {k: scale * metrics["valid"][k] for k in keys},
        "epoch_seconds_median": statistics.median(seconds),
        "wall_seconds": wall_seconds,
        "peak_rss_mib": metrics["peak_rss_mib"],
        "parameters": metrics.get("parameters"),
    }
    if name in PAPER:
        row["paper"] = PAPER[name]
        row["ratio_to_paper"] = {k: row["test"][k] / PAPER[name][k] for k in keys}
    if name in REFERENCE_MEASURED:
        row["reference_measured"] = REFERENCE_MEASURED[name]
    return row


def check_args(args) -> tuple[list[str], tuple[int, ...]]:
    """(rows, seeds) once every option and each row's config (with --set, each seed) is
    valid; ConfigError or ValueError naming the option otherwise - before anything trains."""
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") \
            from None
    if seeds and args.from_runs:
        raise ValueError("--seeds trains the rows under more seeds; --from-runs trains "
                         "nothing: leave one out")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    rows = args.only or default_rows(torch.cuda.is_available())
    for name in rows:
        config, _ = row_config(name, args.tuned)
        for seed in (None, *seeds):
            load_config(config, [*args.overrides, *([f"seed={seed}"] if seed is not None
                                                    else [])])
    return rows, seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(ROWS))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config key of every row")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "reproduce"),
                        help="folder of the rows' run directories (finished ones are reused)")
    parser.add_argument("--from-runs", action="store_true",
                        help="rebuild the rows from finished runs in --runs, without training")
    parser.add_argument("--out", type=output_file_arg,
                        default=str(ROOT / "benchmarks" / "results" / "reproduce.json"),
                        help="results JSON (rows merged by name)")
    parser.add_argument("--tuned", type=Path, help="folder of searches, one per row "
                        "(TUNED/ROW from `scale-diffrec tune --out`): train each row from its "
                        "search's best.yaml")
    parser.add_argument("--workers", type=int, default=1, help="train each row on this many "
                        "Ray workers (models that shard: L-DiffRec, DiffuRec)")
    parser.add_argument("--seeds", default="", help="comma-separated seeds: train each row's "
                        "config under these too and record the test metrics' spread")
    args = parser.parse_args()
    try:
        rows, seeds = check_args(args)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    setup_logging()
    out = Path(args.out).resolve()
    machine = {"platform": platform.platform(), "processor": platform.machine(),
               "python": platform.python_version(), "cpus": os.cpu_count()}
    for name in rows:
        metrics_file = Path(args.runs) / name / "metrics.json"
        if args.from_runs and not metrics_file.is_file():
            continue
        row = (make_row(name, args.overrides, json.loads(metrics_file.read_text()), None)
               if args.from_runs else run_row(name, args.overrides, Path(args.runs).resolve(),
                                              args.tuned, args.workers, seeds))
        # re-read before writing: rows may be run by separate, concurrent invocations
        results = json.loads(out.read_text()) if out.is_file() else {"rows": {}}
        results["rows"][name] = row
        results["machine"] = machine
        write_json(out, results)
        print(json.dumps({name: row.get("test")}))


if __name__ == "__main__":
    main()
