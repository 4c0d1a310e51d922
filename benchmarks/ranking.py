"""One full-ranking pass of ``scale_diffrec.ranking`` against its bound, at Epinions' size.

    nice -n 10 python benchmarks/ranking.py                  # sizes from catalogue.json
    python benchmarks/ranking.py --users 2000 --items 50000  # a quick look

The pass is the loop that ``evaluate.accumulate`` (and a Ray worker's evaluation) runs for
a model with linear heads: users in batches of ``--batch``; per batch the seen items'
positions (``seen_positions``), the scores made ``chunk`` items at a time
(``linear_chunks``: queries [B, d] x item vectors [I, d] + biases [I]; ``chunk`` from
each ``--chunk-mib`` setting as ``device.chunk_items`` gives it: by default the
evaluator's default, 8 MiB on the CPU, and 64 MiB) and folded into a ``RunningTopK`` of
k = ``--k``. Wall and CPU seconds are recorded: on a shared machine the CPU seconds are
the steadier figure, and many small multi-threaded operations (small chunks) lose wall
time to threads waiting for a core.

The bound, measured in the same run, batch by batch, on the same queries and items: one
plain fp32 matmul ``[q, 1] @ [W, b].T`` of the same FLOP (2 B I (d + 1)) into a new
[B, I] tensor, plus ``torch.topk(k)`` over those [B, I] scores (no seen mask, no chunks).
Passes and bounds alternate (``--repeats`` of each, median); ``pass_over_bound`` is the
median over repeats of each pass over the bound of the same repeat, so that both see about
the same load on a shared machine (the load averages are recorded). Before timing, the pass's top-k of the
first batch is checked against ``torch.topk`` of the dense scores with the seen items set
to -inf (same scores, items equal up to exact ties).

Data (seeded): queries and item vectors N(0, 1/d), biases the log of a Zipf(0.9)
popularity (as a popularity-biased model's); the seen items of each user (train + valid,
as masked for the test split) a geometric number with mean ``--seen-per-user`` (Epinions
prepared: 538,386 train + valid pairs over 22,156 users, 24.3), drawn by that popularity.
Sizes: ``--users`` / ``--items``, by default those of benchmarks/results/catalogue.json
(the prepared Epinions catalogue) or 22,157 x 242,317 without it.

Writes benchmarks/results/ranking.json.
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

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scale_diffrec.files import output_file_arg  # noqa: E402

from scale_diffrec.data.csr import CSR  # noqa: E402
from scale_diffrec.device import chunk_items  # noqa: E402
from scale_diffrec.ranking import RunningTopK, linear_chunks, seen_positions  # noqa: E402
from scale_diffrec.runs import write_json  # noqa: E402

EPINIONS = (22157, 242317)          # users x items of the prepared catalogue


def catalogue_sizes(path: Path) -> tuple[int, int]:
    """(users, items) of the catalogue benchmark's data, or Epinions' when it has none."""
    if path.is_file():
        results = json.loads(path.read_text())
        if "n_users" in results and "n_items" in results:
            return int(results["n_users"]), int(results["n_items"])
    return EPINIONS


def make_data(users: int, items: int, dim: int, seen_per_user: float, seed: int):
    """(queries [U, d], weight [I, d], bias [I], seen CSR [U, I]) float32, seeded."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    popularity = 1.0 / np.arange(1, items + 1) ** 0.9
    popularity /= popularity.sum()
    rng.shuffle(popularity)
    queries = torch.randn(users, dim, generator=gen) / dim ** 0.5
    weight = torch.randn(items, dim, generator=gen) / dim ** 0.5
    bias = torch.from_numpy(np.log(popularity * items).astype(np.float32))
    counts = np.minimum(rng.geometric(1.0 / seen_per_user, users), items)
    rows = np.repeat(np.arange(users), counts)
    cols = rng.choice(items, int(counts.sum()), p=popularity)
    return queries, weight, bias, CSR.from_pairs(rows, cols, users, items)


def rank_batch(queries, weight, bias, seen: CSR, k: int, chunk: int):
    """(items [B, k], values [B, k]) of one batch: the evaluator's loop."""
    top = RunningTopK(seen.n_rows, k, seen_positions(seen, seen.n_rows))
    for scores, items in linear_chunks(queries, weight, bias, torch.arange(len(bias)), chunk):
        top.add(scores, items)
    return top.result()


def timed_pass(queries, weight, bias, seen: CSR, k: int, batch: int, chunk: int
               ) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one pass."""
    t0, c0 = time.perf_counter(), time.process_time()
    for s in range(0, len(queries), batch):
        rows = np.arange(s, min(s + batch, len(queries)))
        rank_batch(queries[s:s + batch], weight, bias, seen.take_rows(rows), k, chunk)
    return time.perf_counter() - t0, time.process_time() - c0


def timed_bound(queries, weight, bias, k: int, batch: int) -> tuple[float, float, float]:
    """(matmul seconds, topk seconds, CPU seconds) of the plain dense pass."""
    query1 = torch.cat([queries, queries.new_ones(len(queries), 1)], 1)
    items1 = torch.cat([weight, bias[:, None]], 1)
    matmul = topk = 0.0
    c0 = time.process_time()
    for s in range(0, len(queries), batch):
        t0 = time.perf_counter()
        scores = query1[s:s + batch] @ items1.T
        t1 = time.perf_counter()
        torch.topk(scores, k, dim=1)
        t2 = time.perf_counter()
        matmul, topk = matmul + t1 - t0, topk + t2 - t1
        del scores
    return matmul, topk, time.process_time() - c0


def check_first_batch(queries, weight, bias, seen: CSR, k: int, batch: int, chunk: int) -> dict:
    """The pass's top-k of the first batch vs torch.topk of its dense masked scores."""
    rows = np.arange(min(batch, len(queries)))
    block = seen.take_rows(rows)
    items, values = rank_batch(queries[:len(rows)], weight, bias, block, k, chunk)
    dense = torch.addmm(bias, queries[:len(rows)], weight.T)
    dense[torch.from_numpy(block.row_ids()), torch.from_numpy(block.indices)] = -torch.inf
    want_values, _ = torch.topk(dense, k, dim=1)
    # equal values at the same ranks, and each returned item really has that score
    return {"values_equal": bool(torch.equal(values, want_values)),
            "items_scored_so": bool(torch.equal(torch.gather(dense, 1, items), values))}


def chunk_setting(text: str) -> float | None:
    """A --chunk-mib value: MiB, or 'default' (the evaluator's, ``device.chunk_items``)."""
    return None if text == "default" else float(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_users, default_items = catalogue_sizes(ROOT / "benchmarks" / "results"
                                                   / "catalogue.json")
    parser.add_argument("--users", type=int, default=default_users)
    parser.add_argument("--items", type=int, default=default_items)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=100, help="top-k (the evaluator's max K)")
    parser.add_argument("--batch", type=int, default=1000, help="users per batch "
                        "(eval_batch_size)")
    parser.add_argument("--chunk-mib", type=chunk_setting, nargs="+", default=[None, 64.0],
                        help="chunk_mib settings, one row each ('default': the evaluator's)")
    parser.add_argument("--seen-per-user", type=float, default=24.3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=output_file_arg,
                        default=str(ROOT / "benchmarks" / "results" / "ranking.json"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    queries, weight, bias, seen = make_data(args.users, args.items, args.dim,
                                            args.seen_per_user, args.seed)
    chunks = [chunk_items(args.batch, "cpu", mib) for mib in args.chunk_mib]
    checks = [check_first_batch(queries, weight, bias, seen, args.k, args.batch, chunk)
              for chunk in chunks]
    load = [os.getloadavg()]
    passes, bounds = [[] for _ in chunks], []
    for _ in range(args.repeats):          # alternate, so that all see the same load
        for times, chunk in zip(passes, chunks):
            times.append(timed_pass(queries, weight, bias, seen, args.k, args.batch, chunk))
        bounds.append(timed_bound(queries, weight, bias, args.k, args.batch))
        load.append(os.getloadavg())
    bound_s = statistics.median(m + t for m, t, _ in bounds)
    flop = 2.0 * args.users * args.items * (args.dim + 1)
    rows = [{"chunk_mib": mib, "chunk_items": chunk,
             "pass_seconds": statistics.median(w for w, _ in times),
             # each pass over the bound of its own repeat (the load changes over minutes)
             "pass_over_bound": statistics.median(
                 w / (m + t) for (w, _), (m, t, _) in zip(times, bounds)),
             "pass_over_bound_cpu": statistics.median(
                 c / bc for (_, c), (_, _, bc) in zip(times, bounds)),
             "pass_wall_seconds": [w for w, _ in times],
             "pass_cpu_seconds": [c for _, c in times], "check_first_batch": check}
            for mib, chunk, times, check in zip(args.chunk_mib, chunks, passes, checks)]
    result = {
        "users": args.users, "items": args.items, "dim": args.dim, "k": args.k,
        "batch": args.batch, "seen_pairs": seen.nnz, "scoring_gflop": flop / 1e9,
        "rows": rows,
        "bound_seconds": bound_s, "bound_matmul_seconds": [m for m, _, _ in bounds],
        "bound_topk_seconds": [t for _, t, _ in bounds],
        "bound_cpu_seconds": [c for _, _, c in bounds],
        "matmul_gflops_in_bound": flop / 1e9 / statistics.median(m for m, _, _ in bounds),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "load_average_1_5_15min": load},
    }
    write_json(Path(args.out), result)
    for row in rows:
        print(json.dumps({k: row[k] for k in ("chunk_mib", "chunk_items", "pass_seconds",
                                              "pass_over_bound", "pass_over_bound_cpu")}
                         | {"bound_seconds": bound_s}))


if __name__ == "__main__":
    main()
