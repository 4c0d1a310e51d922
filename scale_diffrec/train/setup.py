"""The set-up every run shares, one process or a Ray worker: the seeds and the item
partition (L-DiffRec's k-means clusters, DiffuRec's row blocks of its item table)."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from .. import runs
from ..choices import Model
from ..errors import ConfigError
from ..data import InteractionData, Sequences
from ..partition import Partition, build_partition, check_made_by


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_partition(cfg: dict, data: InteractionData | Sequences, run_dir: Path | None,
                      rebuild: bool = False):
    """The run's item partition (None for models without one), validated and not yet
    written. DiffuRec: ``diffurec.n_clusters`` blocks of item ids (``Partition.blocks``;
    ConfigError naming the key when there are fewer items). L-DiffRec:
    ``ldiffrec.partition`` when given, else the run's own artifact when it matches the
    config that would build it (``partition.check_made_by``; ``rebuild``: ignored), else
    built from the data."""
    if cfg["model"] == Model.diffurec:
        n_clusters = cfg["diffurec"]["n_clusters"]
        if n_clusters > data.n_items:
            raise ConfigError(f"config key 'diffurec.n_clusters' ({n_clusters}) exceeds the "
                              f"{data.n_items} items of the data")
        return Partition.blocks(data.n_items, n_clusters)
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
