"""A run's per-epoch figures in experiment trackers: ``train --log-dir DIR`` (TensorBoard
event files) and ``train --mlflow URI`` (an MLflow run), both ``train.train`` ``on_epoch``
hooks (``Trackers`` calls several). ``tune --mlflow URI`` gives every trial an
``MLflowLog`` (its run named after the trial id); ``tune`` writes TensorBoard files through
Ray Tune's default logger callbacks.

``TensorBoardLog`` is a ``train.train`` ``on_epoch`` hook (tensorboardX, which Ray Train and
Tune install): every epoch writes ``train/loss`` (trained models) and ``train/seconds``; every evaluation
``valid/recall@20``, ``valid/ndcg@20`` (tensorboardX writes the tags as ``recall_20``,
``ndcg_20``) and ``valid/best`` (the best ``select_metric`` so far),
all at step = epoch. ``tensorboard --logdir DIR`` shows them. (Tuned trials get the same
through Ray Tune's default TBX logger callback, in OUT/tune/TRIAL_ID.)

A W-worker run (``train --workers W --log-dir DIR``) calls the hook on every rank after
each epoch (``distributed.trainer.train_loop``); rank 0 writes and the others do nothing,
so DIR holds one run's figures, the same epochs and values as the run's metrics.json
history (its loss and valid metrics are every rank's, equal across ranks). ``MLflowLog``
does the same on rank 0: one MLflow run named after the run directory, in the experiment
``MLFLOW_EXPERIMENT``, the config's keys as its parameters (dotted), and per epoch
``train/loss``, ``train/seconds``, ``valid/recall_20`` ... and ``valid/best`` at step =
epoch (MLflow's metric names allow no '@': ``tracker_key``).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from .errors import ConfigError
from .files import check_output_file
from .shard.collectives import world

MLFLOW_EXPERIMENT = "scale-diffrec"
RUN_DIR_TAG = "scale_diffrec.run_dir"   # an MLflow run's run directory (resume finds it)
STOPPED_TAG = "scale_diffrec.stopped_early"   # the epoch at which tune's scheduler cut it


def tracker_key(key: str) -> str:
    """A metric name MLflow accepts ('valid/recall@20' -> 'valid/recall_20', as tensorboardX
    writes it)."""
    return key.replace("@", "_")


def epoch_figures(entry: dict, record: dict) -> dict:
    """{name: value} of one epoch (``on_epoch``'s arguments): train/loss (trained models),
    train/seconds, and on evaluation epochs valid/METRIC@K and valid/best."""
    figures = {"train/seconds": entry["seconds"]}
    if entry["loss"] is not None:                     # None: a fitted baseline's one pass
        figures["train/loss"] = entry["loss"]
    if "valid" in entry:
        figures.update({f"valid/{k}": v for k, v in entry["valid"].items()})
        figures["valid/best"] = record["best"]
    return figures


class TensorBoardLog:
    """Writes one run's epochs to event files in ``log_dir`` from the first epoch's end (the
    command line claims ``log_dir`` first, shared: an unwritable one stops the run before
    it starts, and one left empty by a failed run is removed again). Picklable before its
    first call (Ray sends it to the workers); rank 0 of a process group writes."""

    def __init__(self, log_dir: str | Path):
        self.log_dir, self.writer = Path(log_dir), None

    def __call__(self, entry: dict, record: dict) -> None:
        if world()[1] != 0:                           # a W-worker run's other ranks
            return
        if self.writer is None:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(str(self.log_dir))
        for key, value in epoch_figures(entry, record).items():
            self.writer.add_scalar(key, value, entry["epoch"])
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        if self.writer is not None:
            self.writer.close()


def _flat(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def check_mlflow(uri: str) -> str:
    """Before a run starts: the ``mlflow`` package is installed and ``uri`` answers (one
    try, 10 s); returns the URI with a relative sqlite path made absolute (Ray's workers run
    in other folders). One-line ConfigError naming ``--mlflow`` otherwise, also for an
    empty URI, an in-memory database (which keeps nothing) and a new sqlite file that
    cannot be created (``files.check_output_file``)."""
    if not uri.strip():
        raise ConfigError("--mlflow needs a tracking URI (a server, or sqlite:///PATH.db)")
    if uri.rstrip("/") == "sqlite:" or uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path in ("", ":memory:"):
            raise ConfigError(f"--mlflow {uri}: an in-memory database keeps nothing; give "
                              f"a file, e.g. sqlite:///mlflow.db")
        uri = "sqlite:///" + str(Path(path).resolve())
        if not Path(path).is_file():  # MLflow would retry an unwritable place for minutes
            check_output_file(path, "--mlflow")
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError(f"--mlflow {uri}: needs the mlflow package: pip install "
                          f"'scale-diffrec[mlflow]'") from None
    once = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {k: os.environ.get(k) for k in once}
    os.environ.update(once)
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - any tracking-store failure, named in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"--mlflow {uri}: the tracking store does not answer: "
                          f"{first[:300]}") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return uri


class MLflowLog:
    """Writes one run's epochs to an MLflow run at ``uri`` (a tracking server, or a database
    such as sqlite:///mlflow.db), named ``run_name`` and tagged with ``run_dir``, with
    ``cfg``'s keys as parameters; rank 0 of a process group writes. With ``resume``, the
    newest MLflow run of the same ``run_dir`` goes on (its parameters stay those it started
    with) - else a new one. Picklable before its first call (Ray sends it to the workers).
    ``close(failed)`` marks the run FINISHED or FAILED (a run exists from the first epoch
    that ends)."""

    def __init__(self, uri: str, run_name: str, cfg: dict, run_dir: str | Path,
                 resume: bool = False):
        self.uri, self.run_name, self.params = uri, run_name, _flat(cfg)
        self.run_dir, self.resume = str(Path(run_dir).resolve()), resume
        self.client = self.run_id = None

    def _start(self) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient(self.uri)
        experiment = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(MLFLOW_EXPERIMENT))
        earlier = _newest_run(self.client, experiment_id, self.run_dir) if self.resume else None
        if earlier is not None:
            self.run_id = earlier.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        self.run_id = self.client.create_run(experiment_id, run_name=self.run_name,
                                             tags={RUN_DIR_TAG: self.run_dir}).info.run_id
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in
                                                   self.params.items()])

    def __call__(self, entry: dict, record: dict) -> None:
        if world()[1] != 0:
            return
        from mlflow.entities import Metric
        if self.client is None:
            self._start()
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(tracker_key(k), float(v), now, entry["epoch"])
            for k, v in epoch_figures(entry, record).items()])

    def close(self, failed: bool = False) -> None:
        if self.client is not None:
            self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def _newest_run(client, experiment_id: str, run_dir: str):
    """The newest MLflow run tagged with ``run_dir``, or None."""
    found = client.search_runs([experiment_id], f"tags.`{RUN_DIR_TAG}` = '{run_dir}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def end_stopped_run(uri: str, run_dir: str | Path, epoch: int | None) -> None:
    """Mark the MLflow run of ``run_dir`` FINISHED and tag it ``STOPPED_TAG`` = ``epoch``
    (no tag with None: stopped at its last epoch, it ran out):
    Tune ends a trial that its scheduler cuts by stopping the trial's process, whose own
    ``MLflowLog.close`` may not run (the search driver calls this; where it does run, it
    sees the driver's mark and ends the run FINISHED too, ``tune.trial.run_trial``).
    Nothing happens where the run has no MLflow run yet (cut before its first epoch's
    end)."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    run = experiment and _newest_run(client, experiment.experiment_id,
                                     str(Path(run_dir).resolve()))
    if run and epoch is not None:
        client.set_tag(run.info.run_id, STOPPED_TAG, str(epoch))
    if run:
        client.set_terminated(run.info.run_id, "FINISHED")


class Trackers:
    """Several ``on_epoch`` hooks as one (each called in turn; ``close()`` closes each that
    has a ``close``)."""

    def __init__(self, hooks: list):
        self.hooks = hooks

    def __call__(self, entry: dict, record: dict) -> None:
        for hook in self.hooks:
            hook(entry, record)

    def close(self, failed: bool = False) -> None:
        for hook in self.hooks:
            if hasattr(hook, "close"):
                hook.close(failed)

