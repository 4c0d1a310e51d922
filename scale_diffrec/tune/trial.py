"""One Ray Tune trial: the ordinary training run of the base config with the trial's choices.

The trial's run directory is ``OUT/runs/TRIAL_ID`` (a normal run directory: ``evaluate`` and
``export`` work on it). A trial that Tune restarts (``tune --resume`` after the driver
stopped) finds its ``checkpoints/last.pt`` there and continues from it, as ``train --resume``
would. After every epoch from the first evaluation on, the trial reports to Tune
(``ray.tune.report``; a W-worker trial through rank 0's ``ray.train.report``, which
reports every epoch for its checkpoints, and ``EvaluationReports``, which passes Tune the
reports from the first evaluation on):

    epoch, loss                      the epoch just trained
    valid/recall@20, valid/ndcg@20   that epoch's valid metrics (evaluation epochs only),
    valid/SELECT_METRIC              and the config's ``select_metric`` (e.g. DiffuRec's hr@10)
    best_valid, best_epoch           the trial's best valid ``select_metric`` so far and its
                                     epoch (what ASHA and the searcher compare)
    best/recall@20, best/ndcg@20     the valid metrics of that best epoch

A W-worker trial (``train.distributed.workers`` > 1, ``tune --workers-per-trial W``) is the
distributed L-DiffRec run (train/distributed/trainer.py) launched from the trial; it restarts from its
run's Ray Train checkpoints. Its run directory gets best.pt only when the run ends; a trial
that ASHA cuts keeps its best epoch in shards, which selection, ``evaluate`` and ``export``
read (``checkpoint.model_state``).

Test metrics are not computed here: only the selected trial's are (``tune.search``).
"""
from __future__ import annotations

from pathlib import Path

from .. import checkpoint
from ..config import load_config
from ..progress import setup_logging
from ..trackers import MLflowLog, Trackers
from ..train import train
from ..train.distributed.trainer import train_distributed
from .progress import ended_state
from .space import load_space

BASE = "base.yaml"          # OUT/base.yaml: the resolved base config every trial starts from
SPACE = "space.yaml"        # OUT/space.yaml: a copy of the space file
RUNS = "runs"               # OUT/runs/TRIAL_ID: each trial's run directory
METRIC = "best_valid"       # the reported key Tune optimises (mode max)
SHOWN = ("recall@20", "ndcg@20")


def evaluation_report(entry: dict, record: dict) -> dict | None:
    """The Tune result of an epoch (``train.train``'s ``on_epoch`` arguments: the epoch's
    history entry and the run's record), or None before the run's first evaluation."""
    if record["best_epoch"] == 0:
        return None
    # the epoch's headline metrics (``train.loop.headline``): select_metric, recall/ndcg@20
    valid = {f"valid/{k}": v for k, v in entry.get("valid", {}).items()}
    return {"epoch": entry["epoch"], "loss": entry["loss"], **valid,
            METRIC: record["best"], "best_epoch": record["best_epoch"],
            **{f"best/{k}": record["valid"][k] for k in SHOWN}}


def _report(entry: dict, record: dict) -> None:
    from ray import tune
    result = evaluation_report(entry, record)
    if result is not None:
        tune.report(result)


def evaluation_reports():
    """Ray's ``TuneReportCallback`` for a W-worker trial, passing on only the reports that
    carry ``METRIC`` (Tune refuses a result without the metric it optimises; rank 0 reports
    every epoch, the ones before the first evaluation without it)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EvaluationReports(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if METRIC in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return EvaluationReports()


def trial_cfg(out: Path, config: dict) -> dict:
    """The trial's config: OUT/base.yaml with the choices of Tune's ``config`` applied."""
    space = load_space(out / SPACE)
    return load_config(out / BASE, space.overrides(config))


def run_trial(config: dict, out: str, mlflow: str | None = None) -> None:
    """Ray Tune's function trainable (``out`` and ``mlflow``, a tracking URI or None, bound
    by ``tune.with_parameters``)."""
    from ray import tune
    setup_logging()
    out = Path(out)
    run_dir = out / RUNS / tune.get_context().get_trial_id()
    cfg = trial_cfg(out, config)
    # a restored trial continues from its newest checkpoint; one that has none starts again
    resume = checkpoint.latest(run_dir) is not None
    # the tracker first: an epoch at which Tune stops the trial is logged too
    tracker = MLflowLog(mlflow, run_dir.name, cfg, run_dir, resume) if mlflow else None
    failed = True
    try:
        if cfg["distributed"]["workers"] > 1:
            train_distributed(cfg, run_dir, resume=resume, overwrite=not resume,
                              callbacks=[evaluation_reports()], test=False, on_epoch=tracker)
        else:
            train(cfg, run_dir, resume=resume, overwrite=not resume, test=False,
                  on_epoch=Trackers([tracker, _report]) if tracker else _report)
        failed = False
    finally:
        if tracker is not None:
            # a trial the scheduler stopped (the driver marked it before stopping it) ended
            # well: its process may get here as Tune stops it, after the driver ended the run
            tracker.close(failed and ended_state(run_dir) == "unfinished")
