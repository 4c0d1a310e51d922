"""Every model on a real 242k-item catalogue: Epinions, ratings >= 4, random 7:1:2 split.

    nice -n 10 python benchmarks/catalogue.py            # every default row, in order
    python benchmarks/catalogue.py --only als --only itemknn
    python benchmarks/catalogue.py --only diffrec        # rows off by default run by name
    python benchmarks/catalogue.py --table               # the README table of the results

Rows: most-popular, ItemKNN and ALS (tuned on valid Recall@20 over the small grids in
``ROWS``; test is read only for the selected point), Mult-VAE, L-DiffRec in one process
and on 2 Ray workers (``configs/epinions-ldiffrec.yaml``; 2 clusters and 2 epochs on the
workers: a time and memory row), and DiffRec for 2 epochs (its dense I x 600 layers are
~290M parameters here: ~4.6 GiB with Adam and minutes per epoch on 2 cores). Every run is a
``scale-diffrec train`` subprocess on the same data and split, so its peak RSS (VmHWM, in
metrics.json) is its own. Then one run's model is loaded and ``evaluate`` timed over the
test split (``--repeats`` passes, median), beside the bound of a pass for linear heads:

    bound = 2 U sum_h I_h (d_h + 1) / 210 GFLOP/s            (the scoring products)
          + U I x (seconds per score of torch.topk(k=100) over one [1000, chunk] block,
                   the evaluator's chunk (``chunk_mib``), measured here, at the same time)

and the same bound at the matmul rate measured at that moment (``bound_seconds_measured_rate``:
on a shared, loaded machine 210 GFLOP/s is not what a matmul gets).

Writes benchmarks/results/catalogue.json (rows merged by name, written as each finishes)
and catalogue.png. The data: ``--ratings`` (Tang et al.'s Epinions ratings as parquet:
user_id, item_id, category, rating) turned by ``scale-diffrec prepare`` with
``configs/epinions-prepare.yaml`` (ratings >= 4, seeded random 7:1:2 per user) into
``--runs``/data/epinions, the dataset every row trains on.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scale_diffrec.config import load_config, save_config  # noqa: E402
from scale_diffrec.evaluate import evaluate, has_linear_heads  # noqa: E402
from scale_diffrec.files import output_file_arg  # noqa: E402
from scale_diffrec.progress import setup_logging  # noqa: E402
from scale_diffrec.device import chunk_items  # noqa: E402
from scale_diffrec.runs import load_run, write_json  # noqa: E402

MATMUL_GFLOPS = 210.0        # torch fp32 matmul on these 2 cores (the project's roofline)
KEYS = ("recall@20", "ndcg@20")
ROWS = {   # name: (overrides, {key: grid values} tuned on valid, workers, on by default)
    "mostpop": (["model=mostpop"], {}, 1, True),
    "als": (["model=als", "als.iterations=15"],
            {"als.factors": [64, 128], "als.regularization": [0.01, 0.1],
             "als.alpha": [1.0, 10.0]}, 1, True),
    "itemknn": (["model=itemknn"], {"itemknn.k": [50, 200], "itemknn.shrink": [10.0, 100.0]},
                1, True),
    "ldiffrec": ("ldiffrec", {"ldiffrec.dropout": [0.1, 0.5]}, 1, True),
    # the same settings on 2 Ray workers need 2 clusters (a worker owns whole clusters);
    # 2 epochs: a time and memory row, not an accuracy one
    "ldiffrec-2workers": ("ldiffrec", {}, 2, True),
    # 3 epochs: its two 242k x 600 layers make an epoch ~10 min here
    "multvae": (["model=multvae", "epochs=3", "eval_every=3", "batch_size=500"], {}, 1, True),
    # 2 epochs: ~290M parameters (two dense 242k-wide layers); a time and memory row
    "diffrec": (["model=diffrec", "epochs=2", "eval_every=2", "batch_size=500"], {}, 1, True),
}


def data_overrides(path: Path) -> list[str]:
    return ["data.source=dataset", f"data.path={path}", "data.name=epinions",
            "eval_batch_size=1000"]


def prepared_epinions(ratings: Path, out: Path) -> Path:
    """The dataset directory ``scale-diffrec prepare`` makes of the ratings (made once)."""
    if not (out / "stats.json").is_file():
        subprocess.run([sys.executable, "-m", "scale_diffrec", "prepare", "--input",
                        str(ratings), "--config", str(ROOT / "configs" / "epinions-prepare.yaml"),
                        "--out", str(out)], check=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    return out


def row_config(name: str) -> tuple[Path | None, list[str]]:
    """(config file or None, overrides) of a row, before the data and the grid point."""
    overrides = ROWS[name][0]
    if overrides == "ldiffrec":
        extra = (["ldiffrec.n_clusters=2", "epochs=2", "eval_every=2"]
                 if ROWS[name][2] > 1 else [])
        return ROOT / "configs" / "epinions-ldiffrec.yaml", extra
    return None, list(overrides)


def train_run(name: str, config: Path | None, overrides: list[str], workers: int,
              out: Path) -> dict:
    """One ``scale-diffrec train`` subprocess; its metrics.json plus the wall seconds. A
    finished run of the same config is reused (so an interrupted benchmark resumes)."""
    cfg = load_config(config, overrides)
    saved = out.parent / f"{out.name}.yaml"
    if (out / "metrics.json").is_file() and saved.is_file() and load_config(saved) == cfg:
        return json.loads((out / "metrics.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, saved)
    cmd = [sys.executable, "-m", "scale_diffrec", "train", "--config",
           str(out.parent / f"{out.name}.yaml"), "--out", str(out), "--overwrite"]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["wall_seconds"] = time.perf_counter() - started
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def tune(name: str, data: list[str], runs: Path, first_point: bool = False,
         point: int | None = None) -> tuple[dict, list[dict], list[str]]:
    """Train every grid point (only the first with ``first_point``, only number ``point``
    with it); (the point best on valid recall@20: its metrics, every point's valid
    figures, the selected overrides)."""
    config, base = row_config(name)
    grid = ROWS[name][1]
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    points = points[:1] if first_point else points
    points = points if point is None else points[point:point + 1]
    tried, best = [], None
    for point in points:
        overrides = data + base + [f"{k}={v}" for k, v in point.items()]
        run_dir = runs / name / ("_".join(f"{k.split('.')[-1]}{v}" for k, v in point.items())
                                 or "run")
        metrics = train_run(name, config, overrides, ROWS[name][2], run_dir)
        tried.append({"point": point, "valid": {k: metrics["valid"][k] for k in KEYS},
                      "run": str(run_dir)})
        if best is None or metrics["valid"]["recall@20"] > best[0]["valid"]["recall@20"]:
            best = (metrics, overrides, run_dir, point)
    metrics, overrides, run_dir, point = best
    metrics["run_dir"], metrics["point"] = str(run_dir), point
    return metrics, tried, overrides


def time_passes(run_dir: str, repeats: int) -> dict:
    """Median seconds of one full-ranking test pass of a run's model (and its bound)."""
    run = load_run(run_dir, device="cpu")
    cfg, seconds = run.cfg, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        evaluate(run.model, run.data, "test", ks=cfg["topk"], batch_size=cfg["eval_batch_size"],
                 precision=cfg["precision"], chunk_mib=cfg["chunk_mib"])
        seconds.append(time.perf_counter() - t0)
    chunk = chunk_items(cfg["eval_batch_size"], "cpu", cfg["chunk_mib"])
    out = {"eval_seconds_per_pass": statistics.median(seconds), "eval_passes": seconds,
           "eval_chunk": chunk, "users": run.data.n_users, "items": run.data.n_items}
    if has_linear_heads(run.model):
        flops = 2.0 * run.data.n_users * sum(
            h.weight.shape[0] * (h.weight.shape[1] + 1) for h in run.model.item_heads())
        per_score = topk_seconds_per_score(cfg["eval_batch_size"], chunk)
        topk_seconds = run.data.n_users * run.data.n_items * per_score
        gflops = matmul_gflops()
        out.update(scoring_gflop=flops / 1e9, topk_seconds_per_score=per_score,
                   matmul_gflops_measured=gflops,
                   bound_seconds=flops / (MATMUL_GFLOPS * 1e9) + topk_seconds,
                   # the same bound at the matmul rate measured now (a loaded machine)
                   bound_seconds_measured_rate=flops / (gflops * 1e9) + topk_seconds)
        out["pass_over_bound"] = out["eval_seconds_per_pass"] / out["bound_seconds"]
    return out


def _median_seconds(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def topk_seconds_per_score(rows: int, cols: int, k: int = 100) -> float:
    block = torch.randn(rows, cols)
    return _median_seconds(lambda: torch.topk(block, k, dim=1)) / (rows * cols)


def matmul_gflops(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / _median_seconds(lambda: a @ b) / 1e9


def make_row(name: str, metrics: dict, tried: list[dict], overrides: list[str],
             timing: dict) -> dict:
    seconds = [h["seconds"] for h in metrics["history"]]
    config, _ = row_config(name)
    return {
        "config": str(config.relative_to(ROOT)) if config else None,
        "overrides": overrides, "workers": ROWS[name][2], "selected": metrics["point"],
        "grid": tried, "best_epoch": metrics["best_epoch"], "epochs_run": len(seconds),
        "test": {k: metrics["test"][k] for k in KEYS},
        "valid": {k: metrics["valid"][k] for k in KEYS},
        "train_seconds": sum(seconds), "wall_seconds": metrics["wall_seconds"],
        "peak_rss_mib": metrics["peak_rss_mib"],
        **({"per_worker": metrics["per_worker"]} if "per_worker" in metrics else {}),
        **timing,
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = results["rows"]
    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, label in ((axes[0], "recall@20", "test Recall@20"),
                           (axes[1], "ndcg@20", "test NDCG@20")):
        ax.bar(names, [rows[n]["test"][key] for n in names])
        ax.set_title(label)
    axes[2].bar(names, [rows[n]["eval_seconds_per_pass"] for n in names], label="measured")
    axes[2].bar(names, [rows[n].get("bound_seconds", 0.0) for n in names], alpha=0.6,
                label="bound (linear heads)")
    axes[2].set_title("seconds per full-ranking test pass")
    axes[2].legend()
    for ax in axes:
        ax.tick_params(axis="x", rotation=45)
    fig.suptitle("Epinions, ratings >= 4, random 7:1:2 "
                 f"({results.get('n_users', '?')} users x {results.get('n_items', '?')} items)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown_table(results: dict) -> str:
    """The README's table of a catalogue.json."""
    lines = ["| row | test R@20 | test N@20 | valid R@20 | selected | train s | peak RSS MiB "
             "| eval s/pass | bound s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["rows"].items():
        selected = ", ".join(f"{k.split('.')[-1]} {v}" for k, v in r["selected"].items())
        selected = (selected or "-") + ("" if r.get("tuned", True) else " (untuned)")
        bound = f"{r['bound_seconds']:.1f}" if "bound_seconds" in r else "-"
        lines.append(f"| {name} | {r['test']['recall@20']:.4f} | {r['test']['ndcg@20']:.4f} "
                     f"| {r['valid']['recall@20']:.4f} | {selected} | {r['train_seconds']:.0f} "
                     f"| {r['peak_rss_mib']:.0f} | {r['eval_seconds_per_pass']:.0f} | {bound} |")
    return "\n".join(lines)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(ROWS))
    parser.add_argument("--ratings", default=str(
        ROOT.parent / "shared" / "data" / "tang-trust" / "epinions" / "ratings.parquet"))
    parser.add_argument("--runs", default=str(ROOT / "runs" / "catalogue"),
                        help="run directories and the prepared dataset (default runs/catalogue)")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="timed evaluation passes (>= 1)")
    parser.add_argument("--first-point", action="store_true",
                        help="only the first point of each grid (a quick look, not tuned)")
    parser.add_argument("--point", type=int,
                        help="train only grid point POINT (0-based) of each row and write no "
                             "row: points in parallel processes, then one run without "
                             "--point reuses them")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "catalogue.json"))
    parser.add_argument("--table", action="store_true",
                        help="print the README table of --out and exit")
    args = parser.parse_args()
    if args.table:
        if not Path(args.out).is_file():
            print(f"error: {args.out}: no results to tabulate (run the benchmark or give "
                  f"--out)", file=sys.stderr)
            sys.exit(2)
        print(markdown_table(json.loads(Path(args.out).read_text())))
        return
    output_file_arg(args.out)                 # unwritable: one line before hours of training
    for name in (args.only or []) if args.point is not None else []:
        size = 1 if args.first_point else len(list(itertools.product(*ROWS[name][1].values())))
        if not 0 <= args.point < size:
            print(f"error: --point {args.point}: row '{name}' has {size} grid point(s) "
                  f"(0..{size - 1})", file=sys.stderr)
            sys.exit(2)
    if args.point is not None and not args.only:
        print("error: --point needs --only ROW (a point of that row's grid)", file=sys.stderr)
        sys.exit(2)
    setup_logging()
    ratings = Path(args.ratings)
    if not ratings.is_file():
        sys.exit(f"error: {ratings}: Epinions ratings not found (give --ratings)")
    runs, out = Path(args.runs), Path(args.out)
    data = data_overrides(prepared_epinions(ratings, runs / "data" / "epinions"))
    machine = {"platform": platform.platform(), "python": platform.python_version(),
               "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "load_average": os.getloadavg()}
    for name in args.only or [n for n, row in ROWS.items() if row[3]]:
        metrics, tried, overrides = tune(name, data, runs, args.first_point, args.point)
        if args.point is not None:
            continue
        row = make_row(name, metrics, tried, overrides, time_passes(metrics["run_dir"],
                                                                    args.repeats))
        row["tuned"] = len(tried) > 1 or not ROWS[name][1]
        # re-read before writing: rows may be run by separate invocations
        results = json.loads(out.read_text()) if out.is_file() else {"rows": {}}
        results["rows"][name] = row
        results.update(machine=machine, data="Epinions (Tang et al.) through scale-diffrec prepare "
                       "(configs/epinions-prepare.yaml): ratings >= 4, random 7:1:2 per "
                       "user, seed 0",
                       n_users=row["users"], n_items=row["items"],
                       roofline_gflops=MATMUL_GFLOPS)
        write_json(out, results)
        plot(results, out.with_suffix(".png"))
        print(json.dumps({name: row["test"], "eval_s": row["eval_seconds_per_pass"]}))


if __name__ == "__main__":
    main()
