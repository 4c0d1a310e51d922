"""``scale-diffrec export`` and ``scale-diffrec recommend``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..data.errors import ConfigError, DataError
from ..progress import log


def cmd_export(args) -> int:
    from ..runs import load_run
    from .bundle import export
    from .index import DEFAULTS
    params = {key: getattr(args, key) for key in DEFAULTS[args.index]
              if getattr(args, key, None) is not None}
    run = load_run(args.run, checkpoint=args.checkpoint, device=args.device)
    out = export(run, args.out, kind=args.index, params=params, shards=args.shards,
                 use_gpu=args.use_gpu)
    log.info("exported %s (%s index, %d items) to %s", args.run, args.index,
             run.data.n_items, out)
    print(json.dumps({"bundle": str(out), "index": args.index, "n_items": run.data.n_items}))
    return 0


def _read_histories(path: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """(user ids, histories) from a parquet of user_id, item_id rows (file order = time)."""
    import pyarrow.parquet as pq
    try:
        table = pq.read_table(path, columns=["user_id", "item_id"])
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such histories file") from None
    except Exception as err:     # pyarrow raises several types for bad files
        raise DataError(path, f"not a readable parquet file with columns user_id, item_id "
                              f"({err})") from None
    users = table.column("user_id").to_numpy()
    items = table.column("item_id").to_numpy()
    order = np.argsort(users, kind="stable")
    unique, starts = np.unique(users[order], return_index=True)
    return unique, np.split(items[order], starts[1:])


def _write_recommendations(path: Path, users, items: np.ndarray, scores: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ..runs import atomic_write
    k = items.shape[1]
    keep = (items >= 0).ravel() if items.size else np.zeros(0, bool)
    table = pa.table({"user": np.repeat(np.asarray(users), k)[keep],
                      "rank": np.tile(np.arange(1, k + 1), len(users))[keep],
                      "item": items.ravel()[keep], "score": scores.ravel()[keep]})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def cmd_recommend(args) -> int:
    from .retriever import Retriever
    if (args.items is None) == (args.histories is None):
        raise ConfigError("give either --items ID,ID,... or --histories FILE.parquet")
    retriever = Retriever.load(args.index, device=args.device)
    if args.nprobe is not None or args.ef_search is not None:
        retriever.set_search(args.nprobe, args.ef_search)
    if args.items is not None:
        history = [int(x) for x in args.items.split(",") if x.strip()]
        items, scores = retriever.recommend([history], args.k, not args.include_seen,
                                            args.brute_force)
        print(json.dumps({"items": items[0][items[0] >= 0].tolist(),
                          "scores": [round(float(s), 6) for s in scores[0][items[0] >= 0]]}))
        return 0
    if args.out is None:
        raise ConfigError("--histories needs --out RECS.parquet")
    users, histories = _read_histories(Path(args.histories))
    items, scores = [], []
    for start in range(0, len(histories), args.batch_size):
        i, s = retriever.recommend(histories[start:start + args.batch_size], args.k,
                                   not args.include_seen, args.brute_force)
        items.append(i), scores.append(s)
    _write_recommendations(Path(args.out), users, np.concatenate(items) if items else
                           np.zeros((0, args.k), np.int64),
                           np.concatenate(scores) if scores else np.zeros((0, args.k)))
    print(json.dumps({"users": len(users), "out": args.out}))
    return 0


def register(sub) -> None:
    from .index import INDEX_TYPES
    p = sub.add_parser("export", help="write a FAISS index bundle of a trained run")
    p.add_argument("--run", required=True, help="run directory (scale-diffrec train --out)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--index", default="flat", choices=INDEX_TYPES)
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--shards", type=int, default=1, help="FAISS units per head, searched "
                                                         "in parallel")
    p.add_argument("--nlist", type=int)
    p.add_argument("--nprobe", type=int)
    p.add_argument("--M", type=int, help="HNSW neighbours per node")
    p.add_argument("--ef-search", dest="ef_search", type=int)
    p.add_argument("--pq-m", dest="pq_m", type=int)
    p.add_argument("--use-gpu", default="auto", choices=["auto", "true", "false"])
    p.add_argument("--device", help="where the model runs: auto | cpu | cuda | cuda:N "
                                    "(default: the run's)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("recommend", help="top-K items from an exported bundle")
    p.add_argument("--index", required=True, help="bundle directory (scale-diffrec export)")
    p.add_argument("--items", help="one history: comma-separated original item ids")
    p.add_argument("--histories", help="parquet of user_id, item_id rows (batch mode)")
    p.add_argument("--out", help="batch mode: parquet of (user, rank, item, score)")
    p.add_argument("-k", type=int, default=20)
    p.add_argument("--include-seen", action="store_true", help="do not drop history items")
    p.add_argument("--brute-force", action="store_true",
                   help="rank the full decoder output instead of FAISS (for checking)")
    p.add_argument("--nprobe", type=int)
    p.add_argument("--ef-search", dest="ef_search", type=int)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--device", default="auto",
                   help="where the query tower runs: auto | cpu | cuda | cuda:N")
    p.set_defaults(func=cmd_recommend)
