"""``scale-diffrec tune``: a Ray Tune search over ordinary training runs, selected on valid.

The driver claims OUT for the whole search (``claim``, in cli.py; each trial claims its
own run directory), validates the base config and the space file (nothing is written
before), saves them as OUT/base.yaml and OUT/space.yaml, and runs a ``ray.tune.Tuner`` whose
trials are
``trial.run_trial`` (train.train of the base config with the trial's choices, reporting at
every evaluation). The experiment lives in OUT/tune (Ray Tune's state, per-trial
result.json / progress.csv and TensorBoard event files from Tune's default logger
callbacks); the trials' run directories in OUT/runs. Searchers: Tune's grid or seeded random
variant generation, or Optuna's TPE sampler (seeded) through ``OptunaSearch``; the scheduler
is ASHA on the reported ``epoch`` (max_t = epochs; none when epochs <= its grace period).
``resume=True`` continues an interrupted search with ``Tuner.restore`` (unfinished and
errored trials restart from their run's last.pt). Afterwards ``results`` writes the table,
plot, best config and the selected run's test metrics.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from .. import runs
from ..config import absolute_paths, load_config, save_config
from ..data import load_data
from ..errors import ConfigError
from ..progress import log
from ..train.distributed.trainer import check_workers
from . import results
from .progress import SearchProgress
from .space import Space, load_space
from .trial import BASE, METRIC, RUNS, SPACE, run_trial

EXPERIMENT = "tune"           # OUT/tune: Ray Tune's experiment directory
SETTINGS = "settings.json"    # OUT/settings.json: the search settings, reused by --resume


class SearchFailed(RuntimeError):
    """Every trial failed before its first evaluation: there is nothing to select."""


@dataclass
class Settings:
    """How a search runs (saved as OUT/settings.json so that --resume repeats it)."""
    trials: int
    search: str
    seed: int = 0
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None
    mlflow: str | None = None       # tracking URI: each trial logs an MLflow run


def trial_name(trial) -> str:
    """Tune's trial directory name: the trial id (also the run directory's name)."""
    return trial.trial_id


class _OptunaSpace:
    """Optuna define-by-run space over the space file's labels (picklable: OptunaSearch
    pickles its state into the experiment checkpoint)."""

    def __init__(self, space: Space):
        self.params = [(p.name, p.labels) for p in space.params]

    def __call__(self, trial) -> None:
        for name, labels in self.params:
            trial.suggest_categorical(name, labels)


def _searcher(space: Space, settings: Settings):
    """(search_alg, param_space) for Tune."""
    from ray import tune
    if settings.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch
        sampler = optuna.samplers.TPESampler(seed=settings.seed)
        return (OptunaSearch(space=_OptunaSpace(space), metric=METRIC, mode="max", sampler=sampler,
                             points_to_evaluate=list(space.start) or None), {})
    from ray.tune.search.basic_variant import BasicVariantGenerator
    pick = tune.grid_search if settings.search == "grid" else tune.choice
    return (BasicVariantGenerator(random_state=settings.seed,
                                  max_concurrent=settings.max_concurrent or 0,
                                  points_to_evaluate=list(space.start) or None),
            {p.name: pick(p.labels) for p in space.params})


def _scheduler(space: Space, cfg: dict):
    """ASHA on epochs up to ``epochs``, or None (every trial runs out) without a scheduler
    or when the runs are not longer than its grace period (a paper space on a short base
    config: there is no rung to cut at)."""
    if space.scheduler is None:
        return None
    grace = space.scheduler.get("grace_period", cfg["eval_every"])
    if grace >= cfg["epochs"]:
        named = ("scheduler.grace_period" if "grace_period" in space.scheduler
                 else "the grace period (default: eval_every)")
        log.info("%s: %s %d is not below the base config's epochs (%d): no trial is "
                 "stopped early", space.path, named, grace, cfg["epochs"])
        return None
    from ray.tune.schedulers import ASHAScheduler
    return ASHAScheduler(time_attr="epoch", max_t=cfg["epochs"], grace_period=grace,
                         reduction_factor=space.scheduler.get("reduction_factor", 2),
                         stop_last_trials=False)


def _trainable(out: Path, settings: Settings):
    from ray import tune
    return tune.with_resources(tune.with_parameters(run_trial, out=str(out),
                                                    mlflow=settings.mlflow),
                               {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial})


def _tuner(out: Path, space: Space, settings: Settings, scheduler):
    from ray import tune
    search_alg, param_space = _searcher(space, settings)
    return tune.Tuner(
        _trainable(out, settings), param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", search_alg=search_alg,
            scheduler=scheduler,
            num_samples=1 if settings.search == "grid" else settings.trials,
            max_concurrent_trials=(settings.max_concurrent if settings.search == "optuna"
                                   else None),   # BasicVariantGenerator limits its own
            trial_dirname_creator=trial_name),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(out), verbose=0,
                                  callbacks=[SearchProgress(out / RUNS, METRIC,
                                                             mlflow=settings.mlflow)]))


def prepare(config: str | Path, overrides: list[str], space_path: str | Path, out: Path,
            settings: Settings, overwrite: bool = False) -> tuple[dict, Space]:
    """Validate everything (the base config and its data, the space, OUT), then write
    OUT/base.yaml, space.yaml and settings.json. ConfigError or DataError (nothing written)
    on bad input."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; give the search's folder")
    for option, value, low, strict in (("--cpus-per-trial", settings.cpus_per_trial, 0, True),
                                       ("--gpus-per-trial", settings.gpus_per_trial, 0, False),
                                       ("--max-concurrent", settings.max_concurrent, 1, False)):
        if value is not None and (value <= low if strict else value < low):
            raise ConfigError(f"{option} must be {'>' if strict else '>='} {low}, "
                              f"got {value:g}")
    cfg = absolute_paths(load_config(config, overrides))
    space = load_space(space_path, settings.search)
    settings.search = space.search
    if settings.search == "grid" and settings.trials not in (None, space.grid_size):
        raise ConfigError(f"{space.path}: the grid has {space.grid_size} points; --trials "
                          f"must be {space.grid_size} or left out for --search grid")
    if settings.search == "grid":
        settings.trials = space.grid_size
    elif settings.trials is None:
        raise ConfigError(f"--search {settings.search} needs --trials N (how many to run)")
    elif settings.trials < 1:
        raise ConfigError(f"--trials must be >= 1 for --search {settings.search}")
    elif settings.trials < len(space.start):
        raise ConfigError(f"{space.path}: --trials {settings.trials} is fewer than the space's "
                          f"{len(space.start)} start points")
    if cfg["distributed"]["workers"] > 1:
        check_workers(cfg)
        space.check(config, overrides, check_cfg=check_workers)
    else:
        space.check(config, overrides)
    if (out / EXPERIMENT).exists() and not overwrite:
        raise ConfigError(f"{out}: already holds a search; pass --resume to continue it or "
                          f"--overwrite to start again")
    load_data(cfg)                  # the data's errors here, not in every trial
    for name in (EXPERIMENT, RUNS, results.BEST_RUN):
        path = out / name
        if path.is_symlink():
            path.unlink()
        shutil.rmtree(path, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    runs.atomic_write(out / BASE, lambda tmp: save_config(cfg, tmp))
    runs.atomic_write(out / SPACE, lambda tmp: tmp.write_text(
        f"# {space.path}, resolved\n" + yaml.safe_dump(space.resolved(), sort_keys=False)))
    runs.write_json(out / SETTINGS, settings.__dict__)
    return cfg, load_space(out / SPACE, settings.search)


def saved(out: Path) -> tuple[dict, Space, Settings]:
    """The base config, space and settings of the search in OUT (for --resume)."""
    if not (out / SETTINGS).is_file():
        raise FileNotFoundError(f"{out / SETTINGS}: no search to resume in {out}")
    settings = Settings(**json.loads((out / SETTINGS).read_text()))
    return load_config(out / BASE), load_space(out / SPACE, settings.search), settings


def run_search(out: Path, cfg: dict, space: Space, settings: Settings,
               resume: bool = False) -> dict | None:
    """Run (or, with ``resume``, continue) the search in OUT on the connected Ray cluster,
    then write its results (``results``); returns OUT/tune.json's content, or None when the
    search was interrupted (SIGINT: Tune saves its state and stops) before every trial
    ended; nothing is written then, and ``resume`` continues it."""
    import ray
    from ray import tune
    experiment = out / EXPERIMENT
    workers = cfg["distributed"]["workers"]
    if workers > 1 and settings.max_concurrent is None:
        # each trial holds its driver's CPUs while its W workers wait for theirs: admit
        # only as many trials as the cluster can give both (else they deadlock)
        per_trial = workers + settings.cpus_per_trial
        settings.max_concurrent = max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial))
    if resume:
        if not tune.Tuner.can_restore(str(experiment)):
            raise FileNotFoundError(f"{experiment}: no Ray Tune experiment to resume")
        log.info("resuming the search in %s", experiment)
        tuner = tune.Tuner.restore(str(experiment), trainable=_trainable(out, settings),
                                   resume_unfinished=True, resume_errored=True)
    else:
        scheduler = _scheduler(space, cfg)
        log.info("search: %s, %d trials (%d start points), seed %d, %s cpu / %s gpu per trial, "
                 "ASHA %s", settings.search, settings.trials, len(space.start), settings.seed,
                 settings.cpus_per_trial, settings.gpus_per_trial,
                 space.scheduler if scheduler else "off")
        tuner = _tuner(out, space, settings, scheduler)
    grid = tuner.fit()
    ended = sum(results.ended(r, out) for r in grid)
    if ended < settings.trials:
        log.warning("search interrupted with %d of %d trials ended", ended, settings.trials)
        return None
    return report(grid, out, space, cfg)


def _dotted(cfg: dict, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def report(grid, out: Path, space: Space, cfg: dict) -> dict:
    """Table, plot, best config and the best trial's test metrics (``results``)."""
    table = results.trial_table(grid, space, out)
    results.write_table(table, out)
    metric_name = cfg["select_metric"]
    results.print_summary(table, metric_name)
    png = results.plot(grid, table, metric_name, out)
    scored = table.dropna(subset=[METRIC])
    if scored.empty:
        raise SearchFailed(f"no trial of the search in {out} reached an evaluation (their "
                           f"errors: {out / EXPERIMENT}/*/error.txt)")
    best = scored.iloc[0]
    run_dir = Path(best["run_dir"])
    metrics = results.finish_best(run_dir)
    runs.atomic_write(out / results.BEST_CONFIG,
                      lambda tmp: shutil.copyfile(run_dir / runs.CONFIG, tmp))
    results.link(run_dir, out / results.BEST_RUN)
    best_cfg = load_config(run_dir / runs.CONFIG)
    summary = {"metric": f"valid {metric_name}", "search": space.search, "trials": len(table),
               "best": {"trial": best["trial"], "run_dir": str(run_dir),
                        "params": {k: _dotted(best_cfg, k) for p in space.params
                                   for k in p.keys},
                        "valid": metrics["valid"], "test": metrics["test"]},
               "table": str(out / f"{results.TABLE}.csv"), "plot": str(png)}
    runs.write_json(out / results.SUMMARY, summary)
    log.info("best trial %s: valid %s %.4f, test recall@20 %.4f ndcg@20 %.4f | %s -> %s",
             best["trial"], metric_name, metrics["valid"][metric_name],
             metrics["test"]["recall@20"], metrics["test"]["ndcg@20"],
             out / results.BEST_RUN, run_dir)
    return summary
