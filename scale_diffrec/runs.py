"""The run directory: what a training run leaves behind, and how to load it back.

    RUN_DIR/config.yaml            resolved config (defaults <- file <- --set)
    RUN_DIR/checkpoints/last.pt    after every epoch: model, optimizer, progress, RNG state
    RUN_DIR/checkpoints/best.pt    the model at the best validation score so far
    RUN_DIR/partition.parquet      item -> cluster (L-DiffRec), reused by eval and export
    RUN_DIR/metrics.json           {"valid": {...}, "test": {...}, "history": [...], ...}

Every file is written to a temporary sibling and renamed into place, so an interrupted or
failed run leaves the previous version of each file intact; files follow the user's umask
and a full disk is one line, 'no space left on PATH' (``files``). Checkpoints are sealed
with the sha256 of their contents and checked on every load.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import load_config, save_config
from .data import DataError, InteractionData, load_data
from .device import resolve_device
from .files import atomic_write, check_sealed, write_sealed
from .models import build_model

CONFIG = "config.yaml"
METRICS = "metrics.json"
PARTITION = "partition.parquet"
CHECKPOINTS = "checkpoints"


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def write_config(run_dir: Path, cfg: dict) -> None:
    atomic_write(Path(run_dir) / CONFIG, lambda tmp: save_config(cfg, tmp))


def save_checkpoint(run_dir: Path, name: str, state: dict) -> None:
    """Write ``state`` to RUN_DIR/checkpoints/NAME.pt atomically, sealed with its sha256
    (``files.write_sealed``); a full disk is a ``NoSpaceError`` and leaves the old file."""
    atomic_write(checkpoint_path(run_dir, name),
                 lambda tmp: write_sealed(tmp, lambda f: torch.save(state, f)))


def checkpoint_path(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{name}.pt"


def load_checkpoint(run_dir: Path, name: str) -> dict:
    """The state saved by ``save_checkpoint``, after checking its seal. A missing, empty,
    truncated, corrupted or unreadable file is a one-line error naming it."""
    path = checkpoint_path(run_dir, name)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint (was the run trained to an epoch end?)")
    check_sealed(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:     # noqa: BLE001 - unpickling raises anything
        raise DataError(path, f"cannot load the checkpoint: {first_line(err)}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise DataError(path, "not a scale_diffrec checkpoint (no 'model' state)")
    return state


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (library errors run over many lines)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_model_state(model: torch.nn.Module, state: dict, path: Path) -> None:
    """``model.load_state_dict(state)``; a mismatch is a one-line DataError naming ``path``."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as err:
        raise DataError(path, f"the saved weights do not fit the model of the run's config "
                              f"({first_line(err)})") from None


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
    load_model_state(model, state["model"], checkpoint_path(run_dir, checkpoint))
    model.to(resolve_device(cfg["device"] if device is None else device))
    model.eval()
    return TrainedRun(run_dir, cfg, data, model, partition)
