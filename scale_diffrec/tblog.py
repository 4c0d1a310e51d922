"""``train --log-dir DIR``: a run's per-epoch figures as TensorBoard event files.

``TensorBoardLog`` is a ``train.train`` ``on_epoch`` hook (tensorboardX, which Ray Train and
Tune install): every epoch writes ``train/loss`` (trained models) and ``train/seconds``; every evaluation
``valid/recall@20``, ``valid/ndcg@20`` (tensorboardX writes the tags as ``recall_20``,
``ndcg_20``) and ``valid/best`` (the best ``select_metric`` so far),
all at step = epoch. ``tensorboard --logdir DIR`` shows them. (Tuned trials get the same
through Ray Tune's default TBX logger callback, in OUT/tune/TRIAL_ID.)

A W-worker run (``train --workers W --log-dir DIR``) calls the hook on every rank after
each epoch (``distributed.trainer.train_loop``); rank 0 writes and the others do nothing,
so DIR holds one run's figures, the same epochs and values as the run's metrics.json
history (its loss and valid metrics are every rank's, equal across ranks).
"""
from __future__ import annotations

from pathlib import Path

from .shard.collectives import world


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
        epoch = entry["epoch"]
        if entry["loss"] is not None:                 # None: a fitted baseline's one pass
            self.writer.add_scalar("train/loss", entry["loss"], epoch)
        self.writer.add_scalar("train/seconds", entry["seconds"], epoch)
        for key, value in entry.get("valid", {}).items():
            self.writer.add_scalar(f"valid/{key}", value, epoch)
        if "valid" in entry:
            self.writer.add_scalar("valid/best", record["best"], epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
