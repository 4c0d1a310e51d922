"""Large synthetic catalogues are written and ingested in bounded memory: never users x items.

    python benchmarks/ingest.py                          # 10k, 100k, 1M, 10M items
    python benchmarks/ingest.py --items 10000 100000     # a quick run

For each catalogue size (``--items``, users = ``--users-per-item`` x items, default 0.1:
1M users for 10M items, ~30 interactions per user) two steps run, each in a fresh Python
process so its peak RSS (``ru_maxrss``) is its own:

    write  ``write_synthetic_parquet`` streams the interactions to a parquet file under
           ``--workdir`` (row groups of 1M rows); seconds, peak RSS, rows, file bytes
    load   ``load_data`` with ``data.source: parquet`` and ``data.n_items`` declared (so
           the catalogue keeps its cold items): seconds, peak RSS, interactions loaded,
           train nnz, and the bytes of the train/valid/test CSR arrays it returns

"Bounded" means the load's peak is a small multiple of its own output (a few int64 per
interaction while indexing, deduping and splitting) plus the distinct ids plus one record
batch (the reader opens the file with ``pre_buffer=False``: pyarrow's default keeps
the compressed column chunks read so far, about the file's size), and the
write's peak is the catalogue (a few arrays of n_items) plus one row group:
neither grows with users x items. A dense float32 matrix would take users x items x 4
bytes (``dense_matrix_gib``: 37,253 GiB for 1M users x 10M items). Both peaks include the
interpreter with numpy, pyarrow and torch imported (``*_import_rss_mib``, ~220 MiB), so
small sizes show a large ``load_peak_over_output``; ``load_growth_over_output`` is the
peak above that baseline over the output. The parent process imports none of them, so its
own small RSS does not leak into the children's figures.
Writes benchmarks/results/ingest.json; the parquet files are deleted unless ``--keep``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scale_diffrec.files import output_file_arg  # noqa: E402
MIB = 2 ** 20


def write_step(path: str, n_items: int, n_users: int, mean_items_per_user: float) -> dict:
    """Child process: stream the synthetic parquet."""
    from scale_diffrec.data import write_synthetic_parquet
    from scale_diffrec.progress import peak_rss_mib
    base = peak_rss_mib()
    t0 = time.perf_counter()
    info = write_synthetic_parquet(path, n_users=n_users, n_items=n_items,
                                   mean_items_per_user=mean_items_per_user)
    return {"write_seconds": time.perf_counter() - t0, "write_peak_rss_mib": peak_rss_mib(),
            "write_import_rss_mib": base, "rows": info["rows"],
            "row_groups": info["row_groups"], "parquet_bytes": os.path.getsize(path)}


def load_step(path: str, n_items: int) -> dict:
    """Child process: load the parquet through the normal data path (load_data)."""
    from scale_diffrec.config import load_config
    from scale_diffrec.data import load_data
    from scale_diffrec.progress import peak_rss_mib
    cfg = load_config(None, ["data.source=parquet", f"data.path={path}",
                             f"data.n_items={n_items}"])
    base = peak_rss_mib()
    t0 = time.perf_counter()
    data = load_data(cfg)
    seconds = time.perf_counter() - t0
    mats = (data.train, data.valid, data.test)
    csr = sum(a.nbytes for m in mats for a in (m.indptr, m.indices, m.values))
    extra = sum(a.nbytes for a in (data.train_times, data.user_ids, data.item_ids)
                if a is not None)
    assert data.n_items == n_items and type(data.train).__name__ == "CSR"
    return {"load_seconds": seconds, "load_peak_rss_mib": peak_rss_mib(),
            "load_import_rss_mib": base, "loaded_users": data.n_users,
            "loaded_items": data.n_items, "interactions": sum(m.nnz for m in mats),
            "duplicates": data.meta["duplicates"], "train_nnz": data.train.nnz,
            "output_csr_mib": csr / MIB, "output_other_mib": extra / MIB}


def run_child(step: str, **kwargs) -> dict:
    """Run ``step`` in a fresh interpreter; its result is the last line of its stdout."""
    out = subprocess.run([sys.executable, __file__, "--child", step, json.dumps(kwargs)],
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(n_items: int, args) -> dict:
    n_users = max(1, round(n_items * args.users_per_item))
    path = str(Path(args.workdir) / f"synthetic_{n_items}.parquet")
    row = {"items": n_items, "users": n_users,
           "dense_matrix_gib": n_users * n_items * 4 / 2 ** 30}
    try:
        row.update(run_child("write", path=path, n_items=n_items, n_users=n_users,
                             mean_items_per_user=args.mean_items_per_user))
        row.update(run_child("load", path=path, n_items=n_items))
    finally:
        if not args.keep and os.path.exists(path):
            os.unlink(path)
    row["load_peak_over_output"] = row["load_peak_rss_mib"] / row["output_csr_mib"]
    row["load_growth_over_output"] = ((row["load_peak_rss_mib"] - row["load_import_rss_mib"])
                                      / row["output_csr_mib"])
    return row


def machine() -> dict:
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "memory_gib": round(pages / 2 ** 30, 1)}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        step = {"write": write_step, "load": load_step}[sys.argv[2]]
        print(json.dumps(step(**json.loads(sys.argv[3]))), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="+",
                        default=[10_000, 100_000, 1_000_000, 10_000_000])
    parser.add_argument("--users-per-item", type=float, default=0.1)
    parser.add_argument("--mean-items-per-user", type=float, default=30)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) /
                                                 "scale_diffrec_ingest"))
    parser.add_argument("--keep", action="store_true", help="keep the parquet files")
    parser.add_argument("--out", type=output_file_arg,
                        default=str(ROOT / "benchmarks" / "results" / "ingest.json"))
    args = parser.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    rows = []
    for n_items in args.items:
        rows.append(measure(n_items, args))
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v
                          for k, v in rows[-1].items()}), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python"] + sys.argv), "rows": rows,
                               "machine": machine()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
