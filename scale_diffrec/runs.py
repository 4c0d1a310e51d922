"""The run directory: what a training run leaves behind, and how to load it back.

    RUN_DIR/config.yaml            resolved config (defaults <- file <- --set)
    RUN_DIR/checkpoints/last.pt    after every epoch: model, optimizer, progress, RNG state
    RUN_DIR/checkpoints/best.pt    the model at the best validation score so far
    RUN_DIR/partition.parquet      item -> cluster (L-DiffRec), reused by eval and export
    RUN_DIR/metrics.json           {"valid": {...}, "test": {...}, "history": [...], ...}

Every file is written to a temporary sibling and renamed into place, so an interrupted or
failed run leaves the previous version of each file intact.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import load_config, save_config
from .data import InteractionData, load_data
from .device import resolve_device
from .models import build_model

CONFIG = "config.yaml"
METRICS = "metrics.json"
PARTITION = "partition.parquet"
CHECKPOINTS = "checkpoints"


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename tmp_path onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def write_config(run_dir: Path, cfg: dict) -> None:
    atomic_write(Path(run_dir) / CONFIG, lambda tmp: save_config(cfg, tmp))


def save_checkpoint(run_dir: Path, name: str, state: dict) -> None:
    atomic_write(Path(run_dir) / CHECKPOINTS / f"{name}.pt", lambda tmp: torch.save(state, tmp))


def load_checkpoint(run_dir: Path, name: str) -> dict:
    path = Path(run_dir) / CHECKPOINTS / f"{name}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint (was the run trained to an epoch end?)")
    return torch.load(path, map_location="cpu", weights_only=False)


def load_partition_of(run_dir: Path, cfg: dict, data: InteractionData):
    """The run's saved partition (L-DiffRec) or None for models without clusters."""
    if cfg["model"] != "ldiffrec":
        return None
    from .partition import Partition
    return Partition.load(Path(run_dir) / PARTITION, n_items=data.n_items)


@dataclass
class TrainedRun:
    run_dir: Path
    cfg: dict
    data: InteractionData
    model: torch.nn.Module
    partition: object | None


def load_run(run_dir: str | Path, checkpoint: str = "best",
             device: str | None = None) -> TrainedRun:
    """Rebuild a run's model from its config, partition and checkpoint (eval mode), on
    ``device`` (default: the run's ``device`` setting, see ``device.resolve_device``)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise FileNotFoundError(f"{run_dir / CONFIG}: not a run directory (no {CONFIG})")
    cfg = load_config(run_dir / CONFIG)
    data = load_data(cfg)
    partition = load_partition_of(run_dir, cfg, data)
    model = build_model(cfg, data.n_items, partition)
    state = load_checkpoint(run_dir, checkpoint)
    model.load_state_dict(state["model"])
    model.to(resolve_device(cfg["device"] if device is None else device))
    model.eval()
    return TrainedRun(run_dir, cfg, data, model, partition)
