"""``scale-diffrec``: prepare, train, tune, evaluate, export and recommend.

Bad input (data, config, run directory) ends with one line 'error: ...' naming the file,
field or row, and exit status 2 — never a bare traceback, and nothing written over. Ctrl-C
(SIGINT) or SIGTERM ends any command with one line, 'interrupted: ...' saying what it left
(a command's ``interrupted`` default), and exit status 130.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import sys
import threading
from pathlib import Path

from .errors import ConfigError, DataError, NonFiniteError
from .progress import log, setup_logging

# start-up: each command imports the modules it needs (torch, ray, deepspeed, faiss, pandas)
# inside its function, so that --help and argument errors answer at once


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a config key, dotted (repeatable)")


def cmd_train(args) -> int:
    from .config import absolute_paths, load_config
    overrides = list(args.overrides)      # errors name the option that set the key
    if args.workers is not None:
        overrides.append((f"--workers {args.workers}", f"distributed.workers={args.workers}"))
    if args.address is not None:
        overrides.append((f"--address {args.address}", f"distributed.address={args.address}"))
    cfg = absolute_paths(load_config(args.config, overrides))
    out = Path(args.out)
    distributed = cfg["distributed"]["workers"] > 1 or cfg["distributed"]["address"]
    with contextlib.ExitStack() as stack:
        hooks = []
        if args.mlflow is not None:   # checked before any work, like --out
            from .trackers import MLflowLog, check_mlflow
            hooks.append(MLflowLog(check_mlflow(args.mlflow), out.resolve().name, cfg, out,
                                   resume=args.resume))
        if args.log_dir:              # created (or refused) before any work, like --out
            from .claim import claim
            if Path(args.log_dir).exists() and not Path(args.log_dir).is_dir():
                raise ConfigError(f"--log-dir {args.log_dir}: is a file, not a folder")
            from .trackers import TensorBoardLog
            stack.enter_context(claim(args.log_dir, shared=True))
            hooks.append(TensorBoardLog(Path(args.log_dir).resolve()))   # workers: other cwd
        board = None
        if hooks:
            from .trackers import Trackers
            board = hooks[0] if len(hooks) == 1 else Trackers(hooks)
            stack.push(lambda kind, *_: board.close(failed=kind is not None))
        if distributed:               # the hook runs on every worker; rank 0 writes
            from .train.distributed.trainer import train_distributed
            metrics = train_distributed(cfg, out, resume=args.resume,
                                        overwrite=args.overwrite, on_epoch=board)
        else:
            from .train import train
            metrics = train(cfg, out, resume=args.resume, overwrite=args.overwrite,
                            on_epoch=board)
    print(json.dumps({"valid": _short(metrics["valid"]), "test": _short(metrics["test"])}))
    return 0


def train_interrupted(args) -> str:
    """What an interrupted ``train`` leaves in its run directory, and how to go on."""
    from .checkpoint import saved_any
    from .runs import holds_run
    out = Path(args.out)
    if saved_any(out):
        return f"run directory {out} is resumable with --resume"
    if holds_run(out):
        return f"run directory {out} has no completed epoch; start again with --overwrite"
    return f"nothing was written to {out}"


def tune_interrupted(args) -> str | None:
    """How an interrupted ``tune`` goes on, once its settings have been saved."""
    from .tune.search import SETTINGS
    if (Path(args.out) / SETTINGS).is_file():
        return f"continue the search with `scale-diffrec tune --out {args.out} --resume`"
    return None


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
                       chunk_mib=cfg["chunk_mib"],
                       mask_history=cfg["diffurec"]["mask_history"])
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_prepare(args) -> int:
    from .data.prepare import prepare
    from .data.prepare_config import load_prepare_config
    cfg = load_prepare_config(args.config, args.overrides)
    stats = prepare(args.input, args.out, cfg, overwrite=args.overwrite)
    print(json.dumps({k: stats[k] for k in ("users", "items", "interactions", "noise",
                                            "density")}))
    return 0


def _seed(text: str) -> int:
    """A searcher seed (argparse type): numpy's and Optuna's samplers take 0 .. 2**32 - 1."""
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed < 2 ** 32:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**32 - 1, got {text!r}")
    return seed


def cmd_tune(args) -> int:
    from .claim import claim
    with claim(args.out):         # the search directory; each trial claims its own run
        return _tune(args, Path(args.out).resolve())


def _tune(args, out: Path) -> int:
    from .tune.search import SearchFailed, Settings, run_search, saved
    from .tune.search import prepare as prepare_search
    from .train.distributed.trainer import connect
    search_args = {"--config": args.config, "--space": args.space, "--trials": args.trials,
                   "--search": args.search, "--seed": args.seed,
                   "--set": args.overrides or None,
                   "--workers-per-trial": args.workers_per_trial, "--mlflow": args.mlflow,
                   "--overwrite": args.overwrite or None}
    if args.resume:
        given = [name for name, value in search_args.items() if value is not None]
        if given:
            raise ConfigError(f"--resume continues the search saved in {out} (its base.yaml, "
                              f"space.yaml and settings.json); leave out {', '.join(given)}")
        cfg, space, settings = saved(out)
    else:
        missing = [name for name in ("--config", "--space") if search_args[name] is None]
        if missing:
            raise ConfigError(f"tune needs {' and '.join(missing)} (or --resume)")
        if args.workers_per_trial is not None:
            args.overrides = [*(args.overrides or []),
                              (f"--workers-per-trial {args.workers_per_trial}",
                               f"distributed.workers={args.workers_per_trial}")]
        if args.mlflow is not None:
            from .trackers import check_mlflow
            args.mlflow = check_mlflow(args.mlflow)
        settings = Settings(trials=args.trials, search=args.search, seed=args.seed or 0,
                            cpus_per_trial=args.cpus_per_trial,
                            gpus_per_trial=args.gpus_per_trial,
                            max_concurrent=args.max_concurrent, mlflow=args.mlflow)
        cfg, space = prepare_search(args.config, args.overrides or [], args.space, out,
                                    settings, overwrite=args.overwrite, address=args.address)
    # a local Ray gets a logical CPU for each trial's driver besides its W training workers
    workers = cfg["distributed"]["workers"]
    local = {"workers": workers + (math.ceil(settings.cpus_per_trial) if workers > 1 else 0),
             "address": args.address or cfg["distributed"]["address"]}
    started = False
    with _interrupts_held() as interrupted:     # Ray's start-up would swallow them
        started = connect({**cfg, "distributed": {**cfg["distributed"], **local}})
    try:
        if interrupted:
            raise KeyboardInterrupt
        summary = run_search(out, cfg, space, settings, resume=args.resume)
    except SearchFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if started:
            import ray
            ray.shutdown()
    if summary is None:          # Tune caught the Ctrl-C and saved the search: as any command's
        raise KeyboardInterrupt
    print(json.dumps({"best": {k: summary["best"][k] for k in ("trial", "run_dir", "params")},
                      "valid": _short(summary["best"]["valid"]),
                      "test": _short(summary["best"]["test"])}))
    return 0


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line, 'error: ...' naming the argument, exit status 2, as any
    other bad input (argparse's default prints the usage first; --help still shows it)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog.split()[-1]}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="scale-diffrec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model; writes RUN_DIR/metrics.json")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start again in an existing run")
    p.add_argument("--workers", type=int, help="Ray Train workers (distributed.workers)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    p.add_argument("--log-dir", help="write per-epoch loss and valid metrics as TensorBoard "
                   "event files to this folder (W workers: rank 0 writes; shared storage "
                   "on several machines)")
    p.add_argument("--mlflow", metavar="URI", help="also log the config and per-epoch loss "
                   "and valid metrics as an MLflow run at this tracking URI (a server, or "
                   "sqlite:///mlflow.db); needs the mlflow package")
    p.set_defaults(func=cmd_train, interrupted=train_interrupted)

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
    p.set_defaults(func=cmd_prepare, interrupted=lambda args: f"prepare writes {args.out} "
                                                              f"whole or not at all")

    p = sub.add_parser("tune", help="Ray Tune search of training runs, selected on valid")
    p.add_argument("--config", help="base YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=None,
                   metavar="KEY=VALUE", help="override a base config key (repeatable)")
    p.add_argument("--space", help="search-space YAML (see configs/tune/)")
    p.add_argument("--trials", type=int, help="trials to run (grid: its size, the default)")
    p.add_argument("--search", choices=["grid", "random", "optuna"],
                   help="searcher (default: the space file's, else optuna)")
    p.add_argument("--seed", type=_seed, help="searcher seed (random, optuna; 0 to "
                   "2**32 - 1, default 0)")
    p.add_argument("--workers-per-trial", type=int, help="W: each trial is a W-worker "
                   "L-DiffRec run on Ray Train (distributed.workers; default: the config's)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0,
                   help="CPUs of a trial (of a W-worker trial's driver; each worker takes 1)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0)
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: as the "
                   "cluster's resources allow)")
    p.add_argument("--out", required=True, help="search directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search")
    p.add_argument("--overwrite", action="store_true", help="start again in an existing --out")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    p.add_argument("--mlflow", metavar="URI", help="log every trial (its config, per-epoch "
                   "loss and valid metrics) as an MLflow run at this tracking URI")
    p.set_defaults(func=cmd_tune, interrupted=tune_interrupted)

    from .retrieval.cli import register
    register(sub)
    return parser


def _on_sigterm(signum, frame) -> None:
    """SIGINT's Python handler (Tune's during a search, else KeyboardInterrupt's), also where
    SIGINT itself is ignored (a background job: ``nohup``, ``&``)."""
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)


@contextlib.contextmanager
def _interrupts_held():
    """SIGINT and SIGTERM while the block runs (Ray's start-up, which loses a SIGINT and exits
    on a SIGTERM with its own handler) are held, listed in the yielded list, for the caller to
    act on after it; SIGTERM is SIGINT's again afterwards (``sigterm_as_sigint``)."""
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    signal.signal(signal.SIGTERM, lambda signum, frame: held.append(signum))
    try:
        yield held
    except SystemExit as err:       # ray.init's own SIGTERM handler: sys.exit(SIGTERM)
        if err.code != signal.SIGTERM:
            raise
        held.append(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGINT, previous)
        sigterm_as_sigint()


def sigterm_as_sigint() -> None:
    """SIGTERM (``timeout``, Slurm, Kubernetes, ``ray job stop``) ends a command as Ctrl-C
    does: a search saves its state and says how to resume, any command one line, 130."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    sigterm_as_sigint()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataError, ConfigError, NonFiniteError, FileNotFoundError) as err:
        log.debug("failed", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:      # Ctrl-C: one line (what the command left), not a traceback
        log.debug("interrupted", exc_info=True)
        left = args.interrupted(args) if getattr(args, "interrupted", None) else None
        print("interrupted" + (f": {left}" if left else ""), file=sys.stderr)
        return 130                 # the conventional status of a SIGINT


if __name__ == "__main__":
    sys.exit(main())
