"""Queries/s and recall@20 of top-K retrieval: brute-force scoring vs FAISS flat / IVF / HNSW.

    python benchmarks/retrieval.py                  # 1M-item synthetic catalogue + ML-1M
    python benchmarks/retrieval.py --quick          # 200k items, fewer settings
    python benchmarks/retrieval.py --run RUN_DIR    # the catalogue of a trained run instead of ML-1M

Catalogues. "synthetic": item vectors of a linear output layer [W_i, b_i] with latent
cluster structure (64 centres in d = 64, items = centre + noise, power-law norms, small
biases), and queries drawn from mixtures of centres, i.e. what a trained decoder head looks
like; a model is not trained on 1M items here (see issue 6). "ml1m": the exported head of
an L-DiffRec trained for a few epochs on ../shared/data/diffrec/ml-1m_clean (skipped when
absent), queried with the real users' histories.

Brute force = torch ``q @ W.T + b`` over the whole catalogue, then ``topk`` (what
``--brute-force`` does). Recall@20 is against brute force. Every timing is the median of
``--repeats`` runs over the same query batch (1 thread per BLAS call is NOT forced: all
methods use the machine's cores). Writes benchmarks/results/retrieval.json and
retrieval.png (recall vs queries/s, log x).
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

import faiss
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scale_diffrec.files import output_file_arg  # noqa: E402

from scale_diffrec.retrieval.index import (L2_KINDS, build_index, index_dim,  # noqa: E402
                                           item_vectors, mips_norm, query_vectors,
                                           resolve_params)

K = 20


def synthetic_head(n_items: int, dim: int = 64, centres: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, dim)).astype(np.float32)
    assign = rng.integers(0, centres, n_items)
    weight = c[assign] + 0.5 * rng.normal(size=(n_items, dim)).astype(np.float32)
    weight *= (1.0 + rng.pareto(3.0, n_items)).astype(np.float32)[:, None] * 0.1
    bias = (0.1 * rng.normal(size=n_items)).astype(np.float32)
    return weight, bias


def synthetic_queries(n: int, dim: int = 64, centres: int = 64, seed: int = 1):
    rng = np.random.default_rng(seed)
    c = np.random.default_rng(0).normal(size=(centres, dim)).astype(np.float32)
    mix = rng.dirichlet(np.full(centres, 0.1), size=n).astype(np.float32)
    return mix @ c + 0.1 * rng.normal(size=(n, dim)).astype(np.float32)


def ml1m_head(run_dir: str | None):
    """(weight, bias, queries) of an L-DiffRec head on ML-1M, or None without the data."""
    from scale_diffrec.config import absolute_paths, load_config
    from scale_diffrec.runs import load_run
    from scale_diffrec.train import train
    if run_dir is None:
        cfg = absolute_paths(load_config(ROOT / "configs/ml1m-clean-ldiffrec.yaml",
                                         ["epochs=5", "eval_every=5"]))
        if not Path(cfg["data"]["path"]).is_dir():
            return None
        run_dir = ROOT / "runs" / "bench-retrieval-ml1m"
        if not (run_dir / "metrics.json").is_file():
            train(cfg, run_dir, overwrite=True)
    run = load_run(run_dir)
    head = run.model.item_heads()[0]
    queries = run.model.query(run.data.train.to_torch())[head.name]
    return head.weight.numpy(), head.bias.numpy(), queries.numpy()


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def brute_force(weight_t: torch.Tensor, bias: torch.Tensor, queries: torch.Tensor,
                batch: int = 256) -> np.ndarray:
    out = []
    for start in range(0, len(queries), batch):
        scores = torch.addmm(bias, queries[start:start + batch], weight_t)
        out.append(torch.topk(scores, K, dim=1).indices)
    return torch.cat(out).numpy()


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, exact)]))


def bench_catalogue(name: str, weight, bias, queries, settings, repeats: int) -> dict:
    n, d = weight.shape
    log(f"{name}: {n:,} items, d={d}, {len(queries)} queries")
    wt, bt, qt = torch.from_numpy(weight.T.copy()), torch.from_numpy(bias), torch.from_numpy(queries)
    seconds, exact = timed(lambda: brute_force(wt, bt, qt), repeats)
    base_qps = len(queries) / seconds
    rows = [{"method": "brute-force", "qps": base_qps, "recall@20": 1.0, "speedup": 1.0}]
    log(f"  brute-force {base_qps:,.0f} q/s")
    for kind, build_params, search_key, values in settings:
        kind_r, params = resolve_params(kind, n, build_params)
        if kind_r in L2_KINDS:
            params["mips_norm"] = mips_norm(weight, bias)
        dim = index_dim(d, kind_r, params)
        t0 = time.perf_counter()
        index = build_index(item_vectors(weight, bias, dim, params.get("mips_norm")), kind_r,
                            params)
        build_s = time.perf_counter() - t0
        q = query_vectors(queries, dim)
        for value in values:
            if search_key == "nprobe":
                faiss.ParameterSpace().set_index_parameter(index, "nprobe", value)
            elif search_key == "ef_search":
                index.hnsw.efSearch = value
            seconds, (_, found) = timed(lambda: index.search(q, K), repeats)
            row = {"method": kind, "params": {**params, **({search_key: value} if search_key else {})},
                   "build_seconds": build_s, "qps": len(queries) / seconds,
                   "recall@20": recall(found, exact)}
            row["speedup"] = row["qps"] / base_qps
            rows.append(row)
            log(f"  {kind} {search_key or ''}={value} {row['qps']:,.0f} q/s "
                f"({row['speedup']:.1f}x) recall@20 {row['recall@20']:.3f}")
    return {"n_items": n, "dim": d, "queries": len(queries), "rows": rows}


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        for method in dict.fromkeys(r["method"] for r in res["rows"]):
            rows = [r for r in res["rows"] if r["method"] == method]
            ax.plot([r["qps"] for r in rows], [r["recall@20"] for r in rows], "o-", label=method)
        ax.set_xscale("log")
        ax.set_xlabel("queries / s")
        ax.set_ylabel("recall@20 vs exact")
        ax.set_title(f"{name}: {res['n_items']:,} items, d={res['dim']}")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--items", type=int, help="synthetic catalogue size (default 1M)")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--run", help="a trained run whose first head replaces ML-1M")
    parser.add_argument("--out", type=output_file_arg,
                        default=str(ROOT / "benchmarks" / "results" / "retrieval.json"))
    args = parser.parse_args()
    n_items = args.items or (200_000 if args.quick else 1_000_000)
    nprobes = [1, 4, 16, 64] if args.quick else [1, 2, 4, 8, 16, 32, 64, 128]
    efs = [16, 64] if args.quick else [16, 32, 64, 128, 256]
    settings = [("flat", {}, None, [None]),
                ("ivf", {}, "nprobe", nprobes),
                ("hnsw", {"M": 16, "ef_construction": 40}, "ef_search", efs)]
    results = {}
    weight, bias = synthetic_head(n_items)
    results["synthetic"] = bench_catalogue("synthetic", weight, bias,
                                           synthetic_queries(args.queries), settings,
                                           args.repeats)
    del weight, bias
    head = ml1m_head(args.run)
    if head is not None:
        weight, bias, queries = head
        results["ml1m"] = bench_catalogue("ml1m", weight, bias, queries[:args.queries],
                                          settings, args.repeats)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "machine": {
        "platform": platform.platform(), "cpus": os.cpu_count(),
        "faiss": faiss.__version__, "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads()}},
        indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    log(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
