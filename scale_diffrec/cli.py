"""``scale-diffrec``: prepare, train, evaluate, export and recommend.

Bad input (data, config, run directory) ends with one line 'error: ...' naming the file,
field or row, and exit status 2 — never a bare traceback, and nothing written over.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .data.errors import ConfigError, DataError
from .finite import NonFiniteError
from .progress import log, setup_logging


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a config key, dotted (repeatable)")


def cmd_train(args) -> int:
    from .config import absolute_paths, load_config
    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"distributed.workers={args.workers}")
    if args.address is not None:
        overrides.append(f"distributed.address={args.address}")
    cfg = absolute_paths(load_config(args.config, overrides))
    out = Path(args.out)
    if cfg["distributed"]["workers"] > 1 or cfg["distributed"]["address"]:
        from .parallel.trainer import train_distributed as run
    else:
        from .train import train as run
    metrics = run(cfg, out, resume=args.resume, overwrite=args.overwrite)
    print(json.dumps({"valid": _short(metrics["valid"]), "test": _short(metrics["test"])}))
    return 0


def _short(metrics: dict) -> dict:
    return {k: round(v, 4) for k, v in metrics.items() if "@" in k and k.endswith(("@10", "@20"))}


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate
    from .runs import load_run
    run = load_run(args.run, checkpoint=args.checkpoint, device=args.device)
    cfg = run.cfg
    metrics = evaluate(run.model, run.data, split=args.split, ks=cfg["topk"],
                       convention=cfg["convention"], batch_size=cfg["eval_batch_size"],
                       precision=args.precision or cfg["precision"],
                       chunk_mib=cfg["chunk_mib"])
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_prepare(args) -> int:
    from .data.prepare import load_prepare_config, prepare
    cfg = load_prepare_config(args.config, args.overrides)
    stats = prepare(args.input, args.out, cfg, overwrite=args.overwrite)
    print(json.dumps({k: stats[k] for k in ("users", "items", "interactions", "noise",
                                            "density")}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scale-diffrec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model; writes RUN_DIR/metrics.json")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start again in an existing run")
    p.add_argument("--workers", type=int, help="Ray Train workers (distributed.workers)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="metrics of a trained run's checkpoint")
    p.add_argument("--run", required=True)
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: the run's)")
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"],
                   help="default: the run's")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("prepare", help="raw interaction log -> a dataset directory "
                                       "(data.source: dataset)")
    p.add_argument("--input", required=True, help="parquet or CSV log: user_id, item_id "
                                                  "[, rating][, timestamp]")
    p.add_argument("--out", required=True, help="dataset directory to write")
    p.add_argument("--config", help="prepare YAML (e.g. configs/epinions-prepare.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a prepare key, dotted (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DIR")
    p.set_defaults(func=cmd_prepare)

    from .retrieval.cli import register
    register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataError, ConfigError, NonFiniteError, FileNotFoundError) as err:
        log.debug("failed", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
