"""Time and peak memory of ``scale-diffrec prepare`` on the Epinions log and on a large
synthetic log.

    python benchmarks/prepare.py                        # Epinions + 100M synthetic rows
    python benchmarks/prepare.py --rows 10000000        # a smaller synthetic log
    python benchmarks/prepare.py --rows 0               # Epinions only
    python benchmarks/prepare.py --rows 20000000 100000000 --memory-mib 1024 256
                                                        # every size x every budget

Each step runs in a fresh Python process, so its peak RSS (``progress.peak_rss_mib``,
VmHWM) is its own:

    generate  streams a synthetic log to ``--workdir`` (default: a temporary folder under
              /tmp, deleted afterwards): ``--rows`` rows in row groups of 1M, users in
              blocks (``--users``, default rows / 33.3: ~33 rows each, in user order as a
              dump would be), item ids skewed (``--items``, default rows / 100; item =
              floor(items * U^3): the lowest ids are the most popular), ratings 1..5
              uniform, random int64 timestamps; repeated (user, item) pairs occur
              naturally
    prepare   ``prepare()`` with the config under test: wall and CPU seconds (on a shared
              machine the CPU time is the figure that does not depend on the other jobs),
              peak RSS of the whole process (reading, every step and writing), rows read,
              the dataset's sizes

Configs: Epinions runs ``configs/epinions-prepare.yaml`` (ratings >= 4, dedupe, seeded
random 7:1:2). The synthetic log runs the most expensive path: the same plus 5-core
filtering, the chronological split and natural noise (every step on, two extra sorts).
``--memory-mib`` sets the prepare key ``memory_mib`` (default: the config's); each run
reports its ``buckets``. ``peak_growth_mib_per_100m_rows`` is the peak above the process's
imports, scaled to 100M rows of log (a figure that falls as the log grows once the
memory is bounded: compare ``peak_rss_mib`` across sizes). Writes
benchmarks/results/prepare.json (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scale_diffrec.files import output_file_arg  # noqa: E402
EPINIONS = ROOT.parent / "shared" / "data" / "tang-trust" / "epinions" / "ratings.parquet"
EPINIONS_CONFIG = ROOT / "configs" / "epinions-prepare.yaml"
SYNTHETIC_SETS = ["kcore.users=5", "kcore.items=5", "split.rule=time", "natural_noise=true"]


def generate_step(path: str, rows: int, users: int, items: int, seed: int = 0) -> dict:
    """Child process: stream the synthetic log (module docstring) to ``path``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from scale_diffrec.progress import peak_rss_mib
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    group = 1_000_000
    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()),
                        ("rating", pa.int8()), ("timestamp", pa.int64())])
    users_per_group = max(1, round(users * min(group, rows) / rows))
    with pq.ParquetWriter(path, schema) as writer:
        for g, start in enumerate(range(0, rows, group)):
            n = min(group, rows - start)
            first = g * users_per_group
            user = np.sort(rng.integers(first, first + users_per_group, n))
            item = (items * rng.random(n) ** 3).astype(np.int64)
            writer.write_table(pa.table({
                "user_id": user, "item_id": item,
                "rating": rng.integers(1, 6, n).astype(np.int8),
                "timestamp": rng.integers(1_000_000_000, 1_700_000_000, n)}, schema=schema))
    return {"generate_seconds": time.perf_counter() - t0,
            "generate_peak_rss_mib": peak_rss_mib(), "parquet_bytes": os.path.getsize(path)}


def prepare_step(path: str, out: str, config: str | None, sets: list[str]) -> dict:
    """Child process: run prepare on ``path`` into ``out``."""
    from scale_diffrec.data.prepare import prepare
    from scale_diffrec.data.prepare_config import load_prepare_config
    from scale_diffrec.progress import peak_rss_mib
    cfg = load_prepare_config(config, sets)
    base = peak_rss_mib()
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    stats = prepare(path, out, cfg, overwrite=True)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    peak = peak_rss_mib()
    rows = stats["input"]["rows"]
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mib": peak, "import_rss_mib": base,
            "rows": rows, "peak_growth_mib_per_100m_rows": (peak - base) * 1e8 / rows,
            "config": cfg.model_dump(), "buckets": stats["buckets"],
            "users": stats["users"], "items": stats["items"],
            "interactions": stats["interactions"], "noise": stats["noise"],
            "steps": {k: v for k, v in stats["steps"].items() if k != "kcore_passes"},
            "kcore_passes": len(stats["steps"]["kcore_passes"]),
            "dataset_bytes": sum(f.stat().st_size for f in Path(out).iterdir())}


def child(step: str, *args) -> dict:
    cmd = [sys.executable, __file__, "--child", step, json.dumps(args)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{step} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000_000],
                    help="synthetic rows, one log per value (0: none)")
    ap.add_argument("--memory-mib", type=float, nargs="+", default=[None],
                    help="prepare's memory_mib, one run per value (default: the config's)")
    ap.add_argument("--users", type=int, help="synthetic users (default: rows / 33.3, "
                                              "3M for 100M rows)")
    ap.add_argument("--items", type=int, help="synthetic items (default: rows / 100)")
    ap.add_argument("--epinions", default=str(EPINIONS), help="the Epinions ratings.parquet")
    ap.add_argument("--workdir", help="where the synthetic log and datasets go (default: "
                                      "a temporary folder, deleted afterwards)")
    ap.add_argument("--out", type=output_file_arg,
                    default=str(ROOT / "benchmarks" / "results" / "prepare.json"))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        step, params = args.child[0], json.loads(args.child[1])
        fn = {"generate": generate_step, "prepare": prepare_step}[step]
        print(json.dumps(fn(*params)))
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="prepare-bench-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "machine": platform.machine(),
                        "note": "shared 2-core machine, other jobs running: timings are "
                                "contended (run under nice -n 10)"},
               "runs": []}
    try:
        epinions = Path(args.epinions)
        if epinions.is_file():
            run = child("prepare", str(epinions), str(work / "epinions"),
                        str(EPINIONS_CONFIG), [])
            results["runs"].append({"log": "epinions", "path": str(epinions), **run})
            print(json.dumps(results["runs"][-1]), flush=True)
        else:
            print(f"skipped Epinions: {epinions} not found", flush=True)
        for rows in [r for r in args.rows if r]:
            log = work / f"synthetic-{rows}.parquet"
            users, items = args.users or rows * 3 // 100, args.items or rows // 100
            gen = child("generate", str(log), rows, users, items)
            for memory in args.memory_mib:
                sets = SYNTHETIC_SETS + ([] if memory is None else [f"memory_mib={memory}"])
                run = child("prepare", str(log), str(work / "synthetic"),
                            str(EPINIONS_CONFIG), sets)
                results["runs"].append({"log": "synthetic", "sets": sets,
                                        "generator": {"rows": rows, "users": users,
                                                      "items": items, **gen}, **run})
                print(json.dumps(results["runs"][-1]), flush=True)
            log.unlink()
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
