"""Progress of a search, as a Ray Tune callback: one log line when a trial ends and at most
every ``every_s`` seconds otherwise.

    tune: 3 running, 1 pending, 4 done, 2 stopped early, 0 failed of 10 | best valid
          recall@20 0.1234 (trial 9a1b2_00003) | elapsed 4m10s | ETA 6m15s

Every result Tune receives is also appended to the trial's RUN_DIR/tune_reports.jsonl
(epoch, timestamp, time_total_s and the valid metrics): unlike Tune's per-trial
progress.csv, which a restored trial starts again, it keeps the evaluations from before a
``--resume``, for the table's wall seconds and the plot (``results``).

"done" = the trial's run ended by itself (all epochs, or its own early stopping on patience)
and wrote its metrics.json; "stopped early" = cut by the scheduler (ASHA), which this
callback records as RUN_DIR/stopped_early (Tune tells callbacks of a scheduler's stop by
``done`` in the result it stopped at); a trial that is neither (nor failed) when Tune stops
was interrupted and is 'unfinished': ``tune --resume`` restarts it. The ETA is the elapsed time per
ended trial times the trials still to end (unknown until one has ended). Elapsed time counts
from this driver's start (after a ``--resume``, from the resumed start).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from ray.tune import Callback

from .. import runs
from ..progress import format_seconds, log
from ..trackers import end_stopped_run


STOPPED = "stopped_early"     # RUN_DIR/stopped_early: the scheduler cut this trial
REPORTS = "tune_reports.jsonl"  # RUN_DIR/tune_reports.jsonl: every result Tune received


def ended_state(run_dir: Path) -> str:
    """'done' (the run wrote its metrics.json, or the scheduler stopped it at its last epoch,
    before it wrote it), 'stopped early' (the scheduler cut it before) or 'unfinished' of a
    trial's run directory."""
    run_dir = Path(run_dir)
    if (run_dir / runs.METRICS).is_file():
        return "done"
    if not (run_dir / STOPPED).is_file():
        return "unfinished"
    epoch = json.loads((run_dir / STOPPED).read_text())["epoch"]
    planned = yaml.safe_load((run_dir / runs.CONFIG).read_text())["epochs"]
    return "done" if epoch is not None and epoch >= planned else "stopped early"


def trial_state(trial, runs_dir: Path) -> str:
    """'running', 'pending', 'done', 'stopped early', 'failed' or 'paused' of a Tune Trial
    whose run directory is ``runs_dir / trial_id``."""
    status = trial.status
    if status == "TERMINATED":
        return ended_state(Path(runs_dir) / trial.trial_id)
    return {"RUNNING": "running", "PENDING": "pending", "ERROR": "failed"}.get(
        status, status.lower())


def summary_line(trials, runs_dir: Path, metric: str, elapsed: float,
                 total: int | None, shown: str | None = None) -> str:
    """The progress line for Tune ``trials`` (see the module docstring): ``metric`` is the
    reported key compared, ``shown`` its name in the line (default: ``metric``)."""
    states = [trial_state(t, runs_dir) for t in trials]
    count = {s: states.count(s) for s in ("running", "pending", "done", "stopped early",
                                          "failed")}
    ended = count["done"] + count["stopped early"] + count["failed"]
    total = total or len(trials)
    scored = [t for t in trials if t.last_result.get(metric) is not None]
    best = max(scored, key=lambda t: t.last_result[metric], default=None)
    shown = shown or metric
    best_text = (f"best {shown} {best.last_result[metric]:.4f} (trial {best.trial_id})"
                 if best else f"no {shown} yet")
    eta = format_seconds(elapsed / ended * (total - ended)) if ended else "?"
    return (f"tune: {', '.join(f'{n} {s}' for s, n in count.items())} of {total} | "
            f"{best_text} | elapsed {format_seconds(elapsed)} | ETA {eta}")


class SearchProgress(Callback):
    """Logs ``summary_line`` after a trial ends and every ``every_s`` seconds (at the end of
    Tune's loop step, when the ended trial's status is set), appends each result to the
    trial's REPORTS file, and marks a trial the scheduler cut (STOPPED). With ``mlflow`` (the
    search's tracking URI), ends the MLflow run of a cut trial (``trackers.end_stopped_run``)."""

    def __init__(self, metric: str, every_s: float = 30.0, mlflow: str | None = None,
                 shown: str | None = None):
        self.metric, self.every_s, self.shown = metric, every_s, shown
        self.mlflow = mlflow
        self.total = None
        self.due = False
        self.started = self.last = time.time()

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        self.total = total_num_samples
        self.started = self.last = time.time()

    # OUT/runs of the search this driver runs, set by ``search.run_search`` for the callback
    # Tune restores too: not an instance attribute, which the experiment would keep with the
    # path the search started at (a search moved or copied, then resumed, writes where it
    # lies now; Tune's restored trials also keep their old experiment path)
    runs_dir: Path | None = None

    def on_step_end(self, iteration, trials, **info):
        if trials and (self.due or time.time() - self.last >= self.every_s):
            self.due, self.last = False, time.time()
            log.info("%s", summary_line(trials, self.runs_dir, self.metric,
                                        self.last - self.started, self.total, self.shown))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_dir = self.runs_dir / trial.trial_id
        run_dir.mkdir(parents=True, exist_ok=True)
        kept = {k: v for k, v in result.items()
                if k in ("epoch", "timestamp", "time_total_s") or k.startswith("valid/")}
        with open(run_dir / REPORTS, "a") as f:
            f.write(json.dumps(kept) + "\n")
        if result.get("done"):        # the scheduler's STOP (function trials never say done)
            runs.write_json(run_dir / STOPPED, {"epoch": result.get("epoch")})

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.due = True
        run_dir = self.runs_dir / trial.trial_id
        if self.mlflow and (run_dir / STOPPED).is_file():
            cut = ended_state(run_dir) == "stopped early"
            end_stopped_run(self.mlflow, run_dir,
                            json.loads((run_dir / STOPPED).read_text())["epoch"] if cut else None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.due = True
