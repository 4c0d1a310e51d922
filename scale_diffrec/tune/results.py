"""What a search leaves behind, from Ray Tune's ResultGrid:

    OUT/trials.csv, OUT/trials.parquet   one row per trial: trial, state, the searched keys'
                                         values, epochs trained, best_epoch, best_valid (the
                                         select_metric), best/recall@20, best/ndcg@20 (valid,
                                         at the best epoch), seconds (the trial's wall time,
                                         summed over its runs when it was resumed), run_dir

The metrics come from each trial's run directory (the records in its checkpoints), not from
Tune's last result: a trial that ASHA cut may have trained on up to its next evaluation
before it was stopped, and the selected run must be the one its best checkpoint holds.
    OUT/trials.png                       best valid per trial (in start order) and valid
                                         select_metric vs wall time since the search started
    OUT/best.yaml                        the selected trial's resolved config (train --config)
    OUT/best -> runs/TRIAL_ID            the selected run directory (evaluate, export); its
                                         metrics.json gets the test metrics, computed for this
                                         trial only, after selection
    OUT/tune.json                        {"metric", "search", "trials", "best": {trial,
                                         run_dir, params, valid, test}}
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from .. import checkpoint, runs
from ..progress import log
from ..train import finish, split_metrics
from .progress import REPORTS, ended_state
from .space import Space, label
from .trial import METRIC, RUNS

TABLE = "trials"
BEST_CONFIG = "best.yaml"
BEST_RUN = "best"
SUMMARY = "tune.json"


def state(result, out: Path) -> str:
    """A trial's state from its Tune Result: 'failed', or its run directory's ended_state."""
    trial = (result.metrics or {}).get("trial_id") or Path(result.path).name
    return "failed" if result.error else ended_state(out / RUNS / trial)


def ended(result, out: Path) -> bool:
    """Whether the trial ended (done, stopped early or failed) rather than being
    interrupted."""
    return state(result, out) != "unfinished"


def _cell_values(values: list) -> list:
    """Numbers stay numbers; a column holding anything else becomes labels (strings)."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values
    return [label(v) for v in values]


def run_metrics(run_dir: Path) -> dict:
    """epochs, best_epoch, best_valid and best/{recall,ndcg}@20 of a trial's run directory,
    from the record in its newest checkpoint of either layout (a W-worker trial that ASHA
    cut has only sharded ones); None where it has not got that far."""
    source = checkpoint.latest(run_dir)
    record = source.common()["record"] if source is not None else None
    best = record if record is not None and record["best_epoch"] > 0 else None
    return {"epochs": source and source.epoch, "best_epoch": best and best["best_epoch"],
            METRIC: best and best["best"],
            **{f"best/{k}": best and best["valid"][k] for k in ("recall@20", "ndcg@20")}}


def reports(run_dir: Path) -> pd.DataFrame:
    """The results Tune received from a trial (RUN_DIR/tune_reports.jsonl, in arrival
    order, across ``--resume``s); empty when there were none."""
    path = Path(run_dir) / REPORTS
    lines = path.read_text().splitlines() if path.is_file() else []
    return pd.DataFrame([json.loads(line) for line in lines if line.strip()])


def wall_seconds(frame: pd.DataFrame) -> float | None:
    """A trial's wall time from its reports: Tune's ``time_total_s`` starts again at 0 when a
    trial is restored, so the time is the sum of each run's last figure."""
    if frame.empty:
        return None
    total = frame["time_total_s"]
    restarts = total.diff().fillna(0) < 0          # a later report with less time: restored
    return float(total[restarts.shift(-1, fill_value=True)].sum())


def trial_table(results, space: Space, out: Path) -> pd.DataFrame:
    """One row per trial of a ResultGrid (columns: see the module docstring), sorted by
    best_valid, best first; trials that never evaluated have NaN metrics."""
    rows = []
    for result in results:
        trial = (result.metrics or {}).get("trial_id") or Path(result.path).name
        run_dir = out / RUNS / trial
        rows.append({"trial": trial, "state": state(result, out), **space.values(result.config),
                     **run_metrics(run_dir), "seconds": wall_seconds(reports(run_dir)),
                     "run_dir": str(run_dir)})
    table = pd.DataFrame(rows)
    for key in {k for p in space.params for k in p.keys}:
        table[key] = _cell_values(table[key].tolist())
    return table.sort_values(METRIC, ascending=False, na_position="last",
                             kind="stable").reset_index(drop=True)


def write_table(table: pd.DataFrame, out: Path) -> None:
    runs.atomic_write(out / f"{TABLE}.csv", lambda tmp: table.to_csv(tmp, index=False))
    runs.atomic_write(out / f"{TABLE}.parquet", lambda tmp: table.to_parquet(tmp, index=False))


def plot(table: pd.DataFrame, metric_name: str, out: Path) -> Path:
    """OUT/trials.png: the table's best valid per trial and each trial's valid curve over
    wall time (from the timestamps of its reports, ``reports``; an epoch trained again after
    a ``--resume`` is shown once, at its last report)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    column = f"valid/{metric_name}"
    frames = {trial: reports(run_dir) for trial, run_dir in zip(table["trial"], table["run_dir"])}
    frames = {k: f.drop_duplicates("epoch", keep="last").dropna(subset=[column])
              for k, f in frames.items() if column in f}
    frames = {k: f for k, f in frames.items() if not f.empty}
    start = min((f["timestamp"].min() - f["time_total_s"].iloc[0] for f in frames.values()),
                default=0)
    order = sorted(frames, key=lambda k: frames[k]["timestamp"].min())
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    by_trial = table.set_index("trial")
    colours = {"done": "0.25", "stopped early": "0.7", "failed": "tab:red"}
    for i, trial in enumerate(order, 1):
        left.bar(i, by_trial.loc[trial, METRIC],
                 color=colours.get(by_trial.loc[trial, "state"], "white"), edgecolor="0.25")
        f = frames[trial]
        right.plot((f["timestamp"] - start) / 60, f[column], marker=".", label=trial)
    left.set_xticks(range(1, len(order) + 1))
    left.set(xlabel="trial (start order)", ylabel=f"best valid {metric_name}",
             title="dark: done, light: stopped early")
    right.set(xlabel="minutes since the search started", ylabel=f"valid {metric_name}",
              title="valid metric at each evaluation")
    if len(order) <= 12:
        right.legend(fontsize=7)
    fig.tight_layout()
    path = out / f"{TABLE}.png"
    runs.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return path


def finish_best(run_dir: Path) -> dict:
    """Test metrics for the selected trial, of its best checkpoint: added to the metrics.json
    of a run that ended by itself, or (a trial cut by ASHA) the run is finished as training
    finishes one (``train.finish`` with test). Returns the run's metrics."""
    run = runs.load_run(run_dir, "best")
    if not (run_dir / runs.METRICS).is_file():
        record = checkpoint.latest(run_dir).common()["record"]
        return finish(run.model, run.data, run.cfg, run_dir, record, test=True)
    metrics = json.loads((run_dir / runs.METRICS).read_text())
    metrics["test"] = split_metrics(run.model, run.data, "test", run.cfg)
    runs.write_json(run_dir / runs.METRICS, metrics)
    return metrics


def link(target: Path, path: Path) -> None:
    """``path`` -> ``target`` (a relative symlink), replacing ``path`` atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(os.path.relpath(target, path.parent), tmp)
    os.replace(tmp, path)


def print_summary(table: pd.DataFrame, metric_name: str, rows: int = 10) -> None:
    shown = table.drop(columns=["run_dir"]).head(rows)
    log.info("trials by best valid %s (%d of %d shown):\n%s", metric_name, len(shown),
             len(table), shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
