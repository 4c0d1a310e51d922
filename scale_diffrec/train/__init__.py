"""Training: the run set-up (``setup``), the one loop (``loop``), one process (``run``).

``train(cfg, run_dir)`` trains in one process; ``train.distributed.trainer.train_distributed``
runs the same loop on W Ray Train workers.
"""
from .loop import (batches, epoch_order, epoch_units, finish, make_batch, run_epochs,
                   split_metrics, train_epoch, train_step)
from .run import train
from .setup import prepare_partition, seed_everything

__all__ = ["train", "train_epoch", "train_step", "run_epochs", "finish", "split_metrics",
           "batches", "epoch_order", "epoch_units", "make_batch", "prepare_partition",
           "seed_everything"]
