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
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml
from ray.tune.search.optuna import OptunaSearch

from .. import runs
from ..config import absolute_paths, load_config, save_config
from ..data import load_data
from ..claim import is_empty
from ..errors import ConfigError
from ..files import sha256
from ..progress import log
from ..train.distributed.trainer import check_address, check_workers
from . import results
from .progress import SearchProgress
from .space import Space, dotted, load_space
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
    sha256: dict | None = None      # of OUT/base.yaml and space.yaml: --resume checks them


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


class DistinctOptunaSearch(OptunaSearch):
    """Ray's ``OptunaSearch`` proposing each point of the grid once. TPE samples a
    categorical space with replacement, and a trial of a point already tried trains the same
    run again (same seed): a repeated proposal is told back to the study - as the earlier
    trial's result when it has one, else as pruned - and the study asked again, up to
    ``tries`` times (then the repeat stands, with a warning). Module-level: Tune pickles the
    searcher with the experiment."""
    tries = 100

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._given: dict[tuple, str] = {}       # point -> the trial it was given to
        self._values: dict[str, float] = {}      # trial -> its final metric

    def suggest(self, trial_id: str):
        from optuna.trial import TrialState
        for _ in range(self.tries):
            config = super().suggest(trial_id)
            if not isinstance(config, dict):
                return config
            point = tuple(sorted(config.items()))
            if point not in self._given:
                self._given[point] = trial_id
                return config
            value = self._values.get(self._given[point])
            self._ot_study.tell(self._ot_trials.pop(trial_id), value,
                                state=TrialState.PRUNED if value is None else TrialState.COMPLETE)
        log.warning("optuna proposed only points tried already (%d times); trial %s repeats "
                    "one", self.tries, trial_id)
        return config

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False):
        if result and result.get(self.metric) is not None:
            self._values[trial_id] = result[self.metric]
        super().on_trial_complete(trial_id, result, error)


def distinct_points(space: Space, n: int, seed: int) -> list[dict]:
    """The space's start points, then points drawn uniformly without replacement from the
    rest of its grid (a draw of a point already taken is drawn again, so the first k of n
    points are those of a search of k), ``n`` in all ({param name: label} each; ``n`` <= grid
    size)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    points = list(space.start)
    taken = {tuple(point.values()) for point in points}
    while len(points) < n:
        index = int(rng.integers(space.grid_size))
        point = {}
        for p in reversed(space.params):             # the index in mixed radix
            index, i = divmod(index, len(p.choices))
            point[p.name] = p.labels[i]
        point = {p.name: point[p.name] for p in space.params}
        if tuple(point.values()) not in taken:
            taken.add(tuple(point.values()))
            points.append(point)
    return points


def _searcher(space: Space, settings: Settings):
    """(search_alg, param_space) for Tune: grid, random (``distinct_points``: every trial a
    different point) or Optuna's TPE (``DistinctOptunaSearch``)."""
    from ray import tune
    if settings.search == "optuna":
        import optuna
        sampler = optuna.samplers.TPESampler(seed=settings.seed)
        return (DistinctOptunaSearch(space=_OptunaSpace(space), metric=METRIC, mode="max",
                                     sampler=sampler,
                                     points_to_evaluate=list(space.start) or None), {})
    from ray.tune.search.basic_variant import BasicVariantGenerator
    if settings.search == "grid":
        return (BasicVariantGenerator(max_concurrent=settings.max_concurrent or 0),
                {p.name: tune.grid_search(p.labels) for p in space.params})
    # every trial one of the drawn points (Tune's own random variants repeat points)
    return (BasicVariantGenerator(max_concurrent=settings.max_concurrent or 0,
                                  points_to_evaluate=distinct_points(space, settings.trials,
                                                                     settings.seed)),
            {p.name: tune.choice(p.labels) for p in space.params})


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


def _tuner(out: Path, cfg: dict, space: Space, settings: Settings, scheduler):
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
                                  callbacks=[SearchProgress(
                                      METRIC, mlflow=settings.mlflow,
                                      shown=f"valid {cfg['select_metric']}")]))


def _check_fits_locally(settings: Settings) -> None:
    """A one-process trial must fit on the local Ray instance that the search starts (this
    machine's CPUs and GPUs; a W-worker trial's instance is sized for it, ``cli``), or it
    would wait forever: ConfigError otherwise."""
    import torch
    have = {"cpus": os.cpu_count() or 1, "gpus": torch.cuda.device_count()}
    need = {"cpus": settings.cpus_per_trial, "gpus": settings.gpus_per_trial}
    for kind in need:
        if need[kind] > have[kind]:
            raise ConfigError(f"--{kind}-per-trial {need[kind]:g}: the local Ray instance has "
                              f"{have[kind]} {kind.upper()[:-1]}s (this machine's); give "
                              f"--address of a cluster that has them")


def prepare(config: str | Path, overrides: list[str], space_path: str | Path, out: Path,
            settings: Settings, overwrite: bool = False,
            address: str | None = None) -> tuple[dict, Space]:
    """Validate everything (the base config and its data, the space, the settings, OUT and,
    without a cluster ``address``, $RAY_ADDRESS or ``distributed.address``, that a trial fits
    on the local Ray instance the search starts), then write OUT/base.yaml, space.yaml and
    settings.json. ConfigError or DataError (nothing written, nothing removed) on bad
    input."""
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
    if settings.trials > space.grid_size:
        raise ConfigError(f"{space.path}: --trials {settings.trials} is more than the grid's "
                          f"{space.grid_size} points (each trial tries another point); use "
                          f"--search grid to try them all")
    if (out / EXPERIMENT).exists() or (out / SETTINGS).exists():
        if not overwrite:
            raise ConfigError(f"{out}: already holds a search; pass --resume to continue it "
                              f"or --overwrite to start again")
    elif out.is_dir() and not is_empty(out) and not overwrite:
        raise ConfigError(f"{out}: holds other files, not a search; give a new --out (or "
                          f"--overwrite to search there, beside them)")
    address = address or cfg["distributed"]["address"] or os.environ.get("RAY_ADDRESS")
    check_address(address)
    if not address:
        _check_fits_locally(settings)
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
    settings.sha256 = {name: sha256(out / name) for name in (BASE, SPACE)}
    runs.write_json(out / SETTINGS, settings.__dict__)
    return cfg, load_space(out / SPACE, settings.search)


def saved(out: Path) -> tuple[dict, Space, Settings]:
    """The base config, space and settings of the search in OUT (for --resume)."""
    if not (out / SETTINGS).is_file():
        raise FileNotFoundError(f"{out / SETTINGS}: no search to resume in {out}")
    try:
        settings = Settings(**json.loads((out / SETTINGS).read_text()))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{out / SETTINGS}: not a search's settings ({err}); start the "
                          f"search again with --overwrite") from None
    for name, digest in (settings.sha256 or {}).items():
        if not (out / name).is_file() or sha256(out / name) != digest:
            raise ConfigError(f"{out / name}: changed since the search started (its trials "
                              f"ran with the saved one); put it back, or start again with "
                              f"--overwrite")
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
    if resume and not tune.Tuner.can_restore(str(experiment)):
        # stopped before Tune saved its state (e.g. while Ray started): nothing ran that a
        # restore could continue, so the saved search starts
        log.info("%s: no Ray Tune state saved yet: starting the search from its saved "
                 "settings", experiment)
        for path in (experiment, out / RUNS):
            shutil.rmtree(path, ignore_errors=True)
        resume = False
    if resume:
        log.info("resuming the search in %s", experiment)
        tuner = tune.Tuner.restore(str(experiment), trainable=_trainable(out, settings),
                                   resume_unfinished=True, resume_errored=True)
    else:
        scheduler = _scheduler(space, cfg)
        log.info("search: %s, %d trials (%d start points), seed %d, %s cpu / %s gpu per trial, "
                 "ASHA %s", settings.search, settings.trials, len(space.start), settings.seed,
                 settings.cpus_per_trial, settings.gpus_per_trial,
                 space.scheduler if scheduler else "off")
        tuner = _tuner(out, cfg, space, settings, scheduler)
    SearchProgress.runs_dir = out / RUNS      # where the search lies now (progress.py)
    grid = tuner.fit()
    ended = sum(results.ended(r, out) for r in grid)
    if ended < settings.trials:
        log.warning("search interrupted with %d of %d trials ended", ended, settings.trials)
        return None
    return report(grid, out, space, cfg)


def report(grid, out: Path, space: Space, cfg: dict) -> dict:
    """Table, plot, best config and the best trial's test metrics (``results``)."""
    table = results.trial_table(grid, space, out)
    results.write_table(table, out)
    metric_name = cfg["select_metric"]
    results.print_summary(table, metric_name)
    png = results.plot(table, metric_name, out)
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
                        "params": {k: dotted(best_cfg, k) for p in space.params
                                   for k in p.keys},
                        "valid": metrics["valid"], "test": metrics["test"]},
               "table": str(out / f"{results.TABLE}.csv"), "plot": str(png)}
    runs.write_json(out / results.SUMMARY, summary)
    shown = dict.fromkeys([metric_name, "recall@20", "ndcg@20"])
    log.info("best trial %s: valid %s %.4f, test %s | %s -> %s", best["trial"], metric_name,
             metrics["valid"][metric_name],
             " ".join(f"{k} {metrics['test'][k]:.4f}" for k in shown),
             out / results.BEST_RUN, run_dir)
    return summary
