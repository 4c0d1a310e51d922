"""The set-up every run shares, one process or a Ray worker: the seeds and the item
partition."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from .. import runs
from ..choices import Model
from ..data import InteractionData
from ..partition import Partition, build_partition, check_made_by


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_partition(cfg: dict, data: InteractionData, run_dir: Path | None,
                      rebuild: bool = False):
    """L-DiffRec's item partition (None for other models), validated and not yet written:
    ``ldiffrec.partition`` when given, else the run's own artifact when it matches the
    config that would build it (``partition.check_made_by``; ``rebuild``: ignored), else
    built from the data."""
    if cfg["model"] != Model.ldiffrec:
        return None
    given = cfg["ldiffrec"]["partition"]
    saved = Path(given) if given else (run_dir / runs.PARTITION if run_dir else None)
    if saved is not None and (given or (saved.is_file() and not rebuild)):
        partition = Partition.load(saved, n_items=data.n_items)
        if given:
            partition.made_by = None            # the user's artifact: only its shape counts
        check_made_by(partition, cfg, saved)
        return partition
    return build_partition(cfg, data)
