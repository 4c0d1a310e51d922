"""``scale-diffrec export`` and ``scale-diffrec recommend``."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..claim import claim
from ..errors import ConfigError
from ..files import atomic_write, check_output_file
from ..progress import log
from .params import (DEFAULTS, INDEX_TYPES, MEANING, SEARCH_PARAMS, check_params,
                     check_setting, option)

# start-up: what loads torch, pyarrow or faiss is imported by the command that needs it, so
# that ``scale-diffrec --help`` and argument errors answer at once
if TYPE_CHECKING:
    from ..data.csr import CSR                    # start-up: the data package loads torch


def cmd_export(args) -> int:
    from ..runs import load_run                   # start-up: torch
    given = {key for params in DEFAULTS.values() for key in params}
    params = check_params(args.index, {key: getattr(args, key) for key in given
                                       if getattr(args, key, None) is not None})
    check_setting("shards", args.shards)
    from .bundle import check_target, export      # start-up: faiss (if absent: one-line error)
    with claim(args.out, shared=True):            # concurrent exports are safe (bundle.py)
        check_target(Path(args.out))
        run = load_run(args.run, checkpoint=args.checkpoint, device=args.device)
        out = export(run, args.out, kind=args.index, params=params, shards=args.shards,
                     use_gpu=args.use_gpu)
    log.info("exported %s (%s index, %d items) to %s", args.run, args.index,
             run.data.n_items, out)
    print(json.dumps({"bundle": str(out), "index": args.index, "n_items": run.data.n_items}))
    return 0


def read_histories(path: Path, retriever) -> tuple[np.ndarray, CSR]:
    """(user ids [U], histories CSR [U, I]) from a parquet of user_id, item_id (+ timestamp)
    rows, validated by the training reader's rules (``data.columns``); an item
    the bundle does not know names the file, field and row. No rows: no users."""
    from ..data.columns import ITEM, check_columns                # start-up: the data
    from ..data.parquet import open_parquet, read_interactions    # package loads torch
    pf = open_parquet(path)
    check_columns(path, pf.schema_arrow)
    if pf.metadata.num_rows == 0:
        return np.zeros(0, np.int64), retriever.rows_csr(np.zeros(0, np.int64), [])
    got = read_interactions(path)
    # users in id order; each user's rows by timestamp when the file has one, else in file
    # order (as training orders them)
    order = (np.argsort(got["users"], kind="stable") if got["times"] is None
             else np.lexsort((got["times"], got["users"])))
    indexes = retriever.lookup(got["item_ids"][got["items"][order]], path, rows=order,
                               field=ITEM)
    return got["user_ids"], retriever.rows_csr(indexes, np.bincount(got["users"]))


def _write_recommendations(path: Path, users, items: np.ndarray, scores: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    k = items.shape[1]
    keep = np.isfinite(scores).ravel()
    user_type = pa.large_string() if np.asarray(users).dtype == object else pa.int64()
    item_type = pa.large_string() if items.dtype == object else pa.int64()
    table = pa.table({"user": pa.array(np.repeat(np.asarray(users), k)[keep], user_type),
                      "rank": pa.array(np.tile(np.arange(1, k + 1), len(users))[keep],
                                       pa.int64()),
                      "item": pa.array(items.ravel()[keep], item_type),
                      "score": pa.array(scores.ravel()[keep], pa.float32())})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def warn_short(retriever, rows: CSR, idx: np.ndarray, k: int, exclude: bool) -> None:
    """One warning line on stderr when an approximate index returned fewer than ``k``
    items for some rows although the catalogue holds that many unseen items for them."""
    available = retriever.n_items - (rows.row_lengths() if exclude else 0)
    short = int(((idx >= 0).sum(axis=1) < np.minimum(k, available)).sum())
    if short:
        settings = sorted({option(key) for unit in retriever.units
                           for key in SEARCH_PARAMS[unit.kind]})
        print(f"warning: {short} of {rows.n_rows} rows got fewer than {k} items from the "
              f"approximate index although the catalogue has more; raise "
              f"{' / '.join(settings)}", file=sys.stderr)


def cmd_recommend(args) -> int:
    if (args.items is None) == (args.histories is None):
        raise ConfigError("give either --items ID,ID,... or --histories FILE.parquet")
    if args.histories is not None and args.out is None:
        raise ConfigError("--histories needs --out RECS.parquet")
    if args.items is not None and args.out is not None:
        raise ConfigError("--out writes the recommendations of --histories; with --items "
                          "they are printed (as JSON): leave out --out")
    if args.histories is not None and args.out is not None and \
            Path(args.out).resolve() == Path(args.histories).resolve():
        raise ConfigError(f"--out {args.out}: is the --histories file; give another file to "
                          f"write the recommendations to")
    if args.out is not None:
        check_output_file(args.out)
    for key in ("k", "batch_size", "nprobe", "ef_search"):
        check_setting(key, getattr(args, key))
    from .retriever import Retriever              # start-up: faiss (if absent: one-line error)
    retriever = Retriever.load(args.index, device=args.device)
    if args.nprobe is not None or args.ef_search is not None:
        retriever.set_search(args.nprobe, args.ef_search)
    exclude = not args.include_seen
    if args.items is not None:
        rows = retriever.histories_csr([retriever.parse_ids(args.items)], source="--items")
        idx, scores = retriever.recommend_indexes(rows, args.k, exclude, args.brute_force)
        warn_short(retriever, rows, idx, args.k, exclude)
        keep = idx[0] >= 0
        print(json.dumps({"items": retriever.item_ids[idx[0][keep]].tolist(),
                          "scores": [round(float(s), 6) for s in scores[0][keep]]}))
        return 0
    users, rows = read_histories(Path(args.histories), retriever)
    items, scores = [], []
    for start in range(0, rows.n_rows, args.batch_size):
        part = rows.take_rows(np.arange(start, min(start + args.batch_size, rows.n_rows)))
        i, s = retriever.recommend_indexes(part, args.k, exclude, args.brute_force)
        items.append(i), scores.append(s)
    idx = np.concatenate(items) if items else np.zeros((0, args.k), np.int64)
    warn_short(retriever, rows, idx, args.k, exclude)
    _write_recommendations(Path(args.out), users, retriever.item_ids[np.maximum(idx, 0)],
                           np.concatenate(scores) if scores else np.zeros((0, args.k)))
    print(json.dumps({"users": len(users), "out": args.out}))
    return 0


def add_settings(p, keys: set[str], default: str | None = None) -> None:
    """One integer option per index setting in ``keys``, spelled by ``params.option`` (the
    spelling every message uses), in ``DEFAULTS`` order; the help says what it is, the
    index kinds that take it and ``default`` (else the export default)."""
    for key in dict.fromkeys(k for params in DEFAULTS.values() for k in params):
        if key in keys:
            kinds = [kind for kind, params in DEFAULTS.items() if key in params]
            given = default or DEFAULTS[kinds[0]][key] or "4 sqrt(items)"
            p.add_argument(option(key), dest=key, type=int,
                           help=f"{MEANING[key]} ({'/'.join(kinds)}; default: {given})")


def register(sub) -> None:
    p = sub.add_parser("export", help="write a FAISS index bundle of a trained run")
    p.add_argument("--run", required=True, help="run directory (scale-diffrec train --out)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--index", default="flat", choices=INDEX_TYPES)
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--shards", type=int, default=1, help="FAISS units per head, searched "
                                                         "in parallel")
    add_settings(p, {key for params in DEFAULTS.values() for key in params})
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
    add_settings(p, {key for keys in SEARCH_PARAMS.values() for key in keys},
                 default="the bundle's")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--device", default="auto",
                   help="where the query tower runs: auto | cpu | cuda | cuda:N")
    p.set_defaults(func=cmd_recommend)
