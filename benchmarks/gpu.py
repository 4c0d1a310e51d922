"""GPU check: every model's epoch on GPU vs CPU, precisions, the 1M-item sharded step.

    python benchmarks/gpu.py                       # -> benchmarks/results/gpu.json
    python benchmarks/gpu.py --budget 420          # stop starting new parts after 420 s

Safe to run anywhere. With a CUDA GPU it measures
  (a) one training epoch of every model (Mult-VAE, DiffRec, L-DiffRec on ML-1M clean from
      ../shared/data/diffrec; T-DiffRec and LT-DiffRec on the synthetic time-weighted
      catalogue) on the GPU and on the CPU, and the valid Recall@20 / NDCG@20 after 2
      epochs on each (they must agree within ``--tolerance``: the random streams differ by
      device, so equal only in distribution); peak GPU memory per model next to the
      paper's Table 6 (ML-1M on a V100: Mult-VAE 497 MB, DiffRec 495 MB, L-DiffRec 481 MB);
  (b) full training runs (the ordinary ``train``, model selection on valid) in fp32, tf32
      and bf16: test R@20 / N@20 and their ratio to fp32 (the issue asks for within 1%);
  (c) the sharded L-DiffRec step at 1M items (configs/synthetic-1m.yaml: the code Ray
      workers run, ``benchmarks/scaling.py``'s measurement, NCCL, W = 1 and W = the GPUs)
      in fp32 and bf16, the one-process step, and one evaluation pass over the 1M-item
      catalogue;
  (d) faiss GPU flat == CPU flat top-K for a bundle's vectors (needs faiss-gpu).
Without a GPU it runs the same code paths on the CPU at a small size (a synthetic
catalogue) and marks the GPU-only parts skipped, so CI keeps it alive. Needs only torch,
numpy, pyarrow, pyyaml and pydantic: the sharded step also needs DeepSpeed, k-means for
L-DiffRec's partition faiss (without it the partition is contiguous item ranges, recorded),
and (d) faiss with GPU support; a part whose library is missing is marked skipped.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scale_diffrec.files import output_file_arg  # noqa: E402
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from scale_diffrec.config import load_config  # noqa: E402
from scale_diffrec.data import load_data  # noqa: E402
from scale_diffrec.device import describe, peak_memory_mib, synchronize  # noqa: E402
from scale_diffrec.evaluate import evaluate  # noqa: E402
from scale_diffrec.models import Progress, build_model, parameter_groups  # noqa: E402
from scale_diffrec.partition import Partition  # noqa: E402
from scale_diffrec.train import (prepare_partition, seed_everything, train,  # noqa: E402
                                 train_epoch)

PAPER_TABLE6_MB = {"multvae": 497, "diffrec": 495, "ldiffrec": 481}   # ML-1M, one V100
HAS = {m: importlib.util.find_spec(m) is not None for m in ("faiss", "deepspeed", "ray")}
ML1M = ("multvae", "diffrec", "ldiffrec")


def model_configs(data_root: Path, small: bool) -> dict[str, tuple[str, list[str]]]:
    """name -> (config, overrides): the reproduction configs (ML-1M clean for the models the
    paper's Table 6 lists, the synthetic time-weighted catalogue for T-/LT-DiffRec), or all
    of them on a small synthetic catalogue."""
    tiny = ["data.synthetic.n_users=600", "data.synthetic.n_items=400"]
    out = {name: (f"configs/ml1m-clean-{name}.yaml",
                  ["data.source=synthetic", "data.path=null", "ldiffrec.embeddings=svd"] + tiny
                  if small else [f"data.path={data_root / 'ml-1m_clean'}"])
           for name in ML1M}
    out["tdiffrec"] = ("configs/synthetic-tdiffrec.yaml", tiny if small else [])
    out["ltdiffrec"] = ("configs/synthetic-ltdiffrec.yaml", tiny if small else [])
    return out


def partition_of(cfg: dict, data):
    """The run's k-means partition (FAISS), or contiguous item ranges without faiss."""
    if cfg["model"] != "ldiffrec" or HAS["faiss"]:
        return prepare_partition(cfg, data, None)
    c = int(cfg["ldiffrec"]["n_clusters"])
    return Partition(np.arange(data.n_items) * c // data.n_items, c)


def epochs_on(cfg: dict, data, partition, device: torch.device, epochs: int) -> dict:
    """Train ``epochs`` epochs on ``device`` (seeded), then valid metrics and peak memory."""
    seed_everything(cfg["seed"])
    cfg = {**cfg, "device": str(device)}
    model = build_model(cfg, data.n_items, partition).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    progress, seconds = Progress(), []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        train_epoch(model, optimizer, data, cfg, epoch, progress, device)
        synchronize(device)
        seconds.append(time.perf_counter() - t0)
        progress.epoch = epoch + 1
    t0 = time.perf_counter()
    valid = evaluate(model, data, "valid", ks=cfg["topk"], convention=cfg["convention"],
                     batch_size=cfg["eval_batch_size"], precision=cfg["precision"])
    synchronize(device)
    return {"epoch_seconds": seconds, "eval_seconds": time.perf_counter() - t0,
            "valid_recall@20": valid["recall@20"], "valid_ndcg@20": valid["ndcg@20"],
            "peak_gpu_mib": peak_memory_mib(device),
            "parameters": sum(p.numel() for p in model.parameters())}


def part_epochs(configs: dict, devices: list[torch.device], epochs: int, tol: float) -> dict:
    out = {}
    for name, (config, over) in configs.items():
        cfg = load_config(ROOT / config, over)
        data = load_data(cfg)
        partition = partition_of(cfg, data)
        row = {"config": config, "overrides": over, "users": data.n_users,
               "items": data.n_items, "partition": "k-means" if HAS["faiss"] else "contiguous"}
        for device in devices:
            row[device.type] = epochs_on(cfg, data, partition, device, epochs)
        if len(devices) == 2:
            g, c = row["cuda"], row["cpu"]
            row["gpu_speedup_epoch"] = c["epoch_seconds"][-1] / g["epoch_seconds"][-1]
            row["metrics_agree"] = all(abs(g[k] - c[k]) <= tol * max(c[k], 1e-9)
                                       for k in ("valid_recall@20", "valid_ndcg@20"))
            if name in PAPER_TABLE6_MB:
                row["paper_table6_gpu_mb"] = PAPER_TABLE6_MB[name]
        out[name] = row
        print(json.dumps({name: _short(row)}), flush=True)
    return out


def part_precisions(configs: dict, models: list[str], device: torch.device,
                    max_epochs: int, deadline: float) -> dict:
    """The ordinary training run per precision; test metrics of the valid-selected epoch.
    A model whose runs would start after ``deadline`` (perf_counter) is skipped."""
    out = {}
    for name in models:
        if time.perf_counter() > deadline:
            out[name] = {"skipped": "time budget spent"}
            continue
        config, over = configs[name]
        rows = {}
        for precision in ("fp32", "tf32", "bf16"):
            with tempfile.TemporaryDirectory() as run_dir:
                cfg = load_config(ROOT / config, over + [f"precision={precision}",
                                                        f"device={device}"])
                cfg["epochs"] = min(cfg["epochs"], max_epochs)
                t0 = time.perf_counter()
                metrics = train(cfg, run_dir)
                rows[precision] = {"seconds": time.perf_counter() - t0,
                                   "best_epoch": metrics["best_epoch"],
                                   "epochs_run": len(metrics["history"]),
                                   "test_recall@20": metrics["test"]["recall@20"],
                                   "test_ndcg@20": metrics["test"]["ndcg@20"]}
        for precision in ("tf32", "bf16"):
            for k in ("test_recall@20", "test_ndcg@20"):
                rows[precision][f"{k}_over_fp32"] = rows[precision][k] / rows["fp32"][k]
        out[name] = rows
        print(json.dumps({f"precision {name}": rows}), flush=True)
    return out


def part_sharded(items: int, users: int, precisions: list[str], steps: int) -> dict:
    """``scaling.py``'s sharded measurement (NCCL, one process per GPU) per precision."""
    from scaling import prepare, run_local, summarize
    from scale_diffrec.train.distributed.trainer import build_plan
    config = str(ROOT / "configs" / "synthetic-1m.yaml")
    workdir = Path(tempfile.mkdtemp(prefix="sdr-gpu-"))
    overrides, cfg, data, partition = prepare(config, [], items, users, workdir)
    rows = []
    for precision in precisions:
        for w in sorted({1, min(max(torch.cuda.device_count(), 1), partition.n_clusters)}):
            point = {"config": config, "overrides": overrides + [f"precision={precision}"],
                     "items": items, "plan": build_plan(cfg, partition, w).to_dict(),
                     "steps": steps, "warmup": 2, "profile": False, "eval": False,
                     "workdir": str(workdir),
                     "result": str(workdir / f"ranks-{items}-{w}.json")}
            row = summarize(items, w, data, cfg["batch_size"], run_local(point, w))
            row["precision"] = precision
            row["peak_gpu_mib_max"] = max(r.get("peak_gpu_mib") or 0 for r in row["per_rank"])
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "per_rank"}), flush=True)
    return {"rows": rows}


def part_one_process_1m(items: int, users: int, device: torch.device, epochs: int) -> dict:
    """The one-process L-DiffRec at 1M items (no DeepSpeed): epochs and one valid pass per
    precision."""
    cfg = load_config(ROOT / "configs" / "synthetic-1m.yaml",
                      [f"data.synthetic.n_items={items}", f"data.synthetic.n_users={users}",
                       "distributed.workers=1"])
    data = load_data(cfg)
    partition = partition_of(cfg, data)
    out = {"items": items, "users": users, "batch_size": cfg["batch_size"]}
    for precision in ("fp32", "bf16"):
        out[precision] = row = epochs_on({**cfg, "precision": precision}, data, partition,
                                         device, epochs)
        row["step_seconds"] = row["epoch_seconds"][-1] / -(-data.n_users // cfg["batch_size"])
        print(json.dumps({f"one-process {items} {precision}": row}), flush=True)
    return out


def part_faiss_gpu(configs: dict) -> dict:
    """Flat IP top-K of a trained Mult-VAE's item vectors, GPU index vs CPU index."""
    import faiss
    from scale_diffrec.retrieval.index import gpu_available
    if not gpu_available():
        return {"skipped": "faiss has no GPU support here (install faiss-gpu)"}
    cfg = load_config(ROOT / configs["multvae"][0], configs["multvae"][1])
    data = load_data(cfg)
    model = build_model(cfg, data.n_items)
    head = model.item_heads()[0]
    vectors = torch.cat([head.weight, head.bias[:, None]], 1).float().numpy()
    queries = np.random.default_rng(0).standard_normal((1000, vectors.shape[1]),
                                                       dtype=np.float32)
    cpu = faiss.IndexFlatIP(vectors.shape[1])
    cpu.add(vectors)
    gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu)
    (dc, ic), (dg, ig) = cpu.search(queries, 20), gpu.search(queries, 20)
    return {"queries": 1000, "k": 20, "same_items_fraction": float((ic == ig).mean()),
            "max_score_diff": float(np.abs(dc - dg).max())}


def _short(row: dict) -> dict:
    keep = ("gpu_speedup_epoch", "metrics_agree")
    out = {k: row[k] for k in keep if k in row}
    for dev in ("cuda", "cpu"):
        if dev in row:
            out[dev] = {k: row[dev][k] for k in ("epoch_seconds", "valid_recall@20",
                                                 "peak_gpu_mib")}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "diffrec"))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--tolerance", type=float, default=0.1,
                   help="relative gap allowed between GPU and CPU valid metrics")
    p.add_argument("--precision-models", nargs="*", default=["ldiffrec", "diffrec"])
    p.add_argument("--precision-max-epochs", type=int, default=200)
    p.add_argument("--items", type=int, help="catalogue of the 1M-item parts (default: "
                                             "1,000,000 on a GPU, 20,000 on the CPU)")
    p.add_argument("--users", type=int, help="their users (default: 20,000; 2,000 on the CPU)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--budget", type=float, default=420.0,
                   help="seconds after which no new part starts (the rest: skipped)")
    p.add_argument("--out", type=output_file_arg,
                   default=str(ROOT / "benchmarks" / "results" / "gpu.json"))
    args = p.parse_args()
    started = time.perf_counter()
    gpu = torch.cuda.is_available()
    small = not gpu or not (Path(args.data) / "ml-1m_clean").is_dir()
    cpu = torch.device("cpu")
    device = torch.device("cuda", 0) if gpu else cpu
    configs = model_configs(Path(args.data), small)
    result = {"command": " ".join(sys.argv), "machine": {
        "device": describe(device), "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "libraries": HAS},
        "size": "small synthetic (no GPU or no ML-1M data)" if small else "ML-1M + 1M items",
        "roofline": "CPU here: see README (2-core CI machine ~210 GFLOP/s fp32); H200: "
                    "~790 TFLOP/s bf16 dense"}

    def part(name, fn, *a, needs=()):
        missing = [m for m in needs if not HAS[m]]
        if missing:
            result[name] = {"skipped": f"not installed: {', '.join(missing)}"}
        elif time.perf_counter() - started > args.budget:
            result[name] = {"skipped": f"time budget {args.budget:.0f} s spent"}
        else:
            t0 = time.perf_counter()
            result[name] = fn(*a)
            result[name + "_wall_seconds"] = time.perf_counter() - t0
        _write(args.out, result)

    devices = [device, cpu] if gpu else [cpu]
    part("epochs", part_epochs, configs, devices, args.epochs, args.tolerance)
    if gpu:
        items, users = args.items or 1_000_000, args.users or 20_000
        part("one_process_1m", part_one_process_1m, items, users, device, 2)
        part("sharded_1m", part_sharded, items, users, ["fp32", "bf16"], args.steps,
             needs=("deepspeed",))
        part("faiss_gpu", part_faiss_gpu, configs, needs=("faiss",))
        part("precisions", part_precisions, configs, args.precision_models, device,
             args.precision_max_epochs, started + args.budget)
    else:
        for name in ("precisions", "one_process_1m", "sharded_1m", "faiss_gpu"):
            result[name] = {"skipped": "no CUDA GPU visible to torch"}
        part("one_process_1m_cpu_small", part_one_process_1m, args.items or 20_000,
             args.users or 2_000, cpu, 1)
    result["wall_seconds"] = time.perf_counter() - started
    _write(args.out, result)
    print(f"wrote {args.out} ({result['wall_seconds']:.0f} s)")


def _write(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
