"""Training in one process: the reference semantics every distributed run must equal
(the loop itself: ``train/loop.py``)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .. import checkpoint, runs
from ..claim import claim
from ..config import warn_unread
from ..data import Sequences, load_data
from ..device import describe, resolve_device, set_matmul_precision
from ..finite import check_finite
from ..models import FittedRecommender, Progress, build_model, parameter_groups
from ..progress import log
from .loop import LocalCheckpoints, describe_model, finish, new_record, run_epochs
from .setup import prepare_partition, seed_everything


def train(cfg: dict, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
          on_epoch: Callable[[dict, dict], None] | None = None, test: bool = True) -> dict:
    """Train per ``cfg`` in one process, writing checkpoints and metrics.json to
    ``run_dir``; returns metrics.

    The run directory is claimed for the whole run (``claim.claim``: ConfigError when
    another process holds it or it cannot be created); nothing is written until the run
    directory (``runs.check_run_dir``), the data, the partition, the model and
    (``resume``: ``checkpoint.resume_from``) the last checkpoint have been validated.
    ``on_epoch(entry, record)``: see ``run_epochs`` (``tune`` reports trials through it).
    ``test=False`` leaves the test split untouched (a tuning trial: test metrics only for
    the trial selected on valid).
    """
    run_dir = Path(run_dir)
    with claim(run_dir):          # held to the end: one writer per run directory
        return _train(cfg, run_dir, resume, overwrite, on_epoch, test)


def _train(cfg: dict, run_dir: Path, resume: bool, overwrite: bool, on_epoch, test: bool) -> dict:
    runs.check_run_dir(run_dir, cfg, resume=resume, overwrite=overwrite)
    seed_everything(cfg["seed"])
    data = load_data(cfg)
    device = resolve_device(cfg["device"])
    set_matmul_precision(cfg["precision"])
    partition = prepare_partition(cfg, data, run_dir, rebuild=overwrite)
    model = build_model(cfg, data.n_items, partition,     # refuses a bad model config
                        train=None if resume else getattr(data, "train", None))
    source = checkpoint.resume_from(run_dir, cfg) if resume else None  # last.pt or sharded
    state = source.full(model) if resume else None              # read before anything is written
    log.info("device %s (device: %s), precision %s", describe(device), cfg["device"],
             cfg["precision"])
    model = model.to(device)
    optimizer = None if isinstance(model, FittedRecommender) else \
        torch.optim.AdamW(parameter_groups(model, cfg))
    progress, record = Progress(), new_record()
    if resume:                     # last.pt, or a W-worker run's newest checkpoint
        check_finite(state["model"], str(source.path))
        runs.load_model_state(model, state["model"], source.path)
        if optimizer is not None:
            checkpoint.load_optimizer_state(optimizer, list(model.named_parameters()),
                                            state["optimizer"])
        progress = Progress(epoch=state["epoch"], step=state["step"])
        record = state["record"]
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        log.info("resumed from %s at epoch %d", source.path, progress.epoch)
    warn_unread(cfg)
    runs.start_run(run_dir, cfg, data, partition, resume=resume)
    log.info("data %s: %d users x %d items, %d %s", data.name, data.n_users, data.n_items,
             runs.data_record(data)["nnz"], "sequence items" if isinstance(data, Sequences)
             else "train interactions")
    log.info("model %s: %s", cfg["model"], describe_model(model))
    checkpoints = LocalCheckpoints(run_dir, model, optimizer)
    trained = run_epochs(model, optimizer, data, cfg, progress, record, device, checkpoints,
                         on_epoch)
    return finish(model, data, cfg, run_dir, record, test=test, trained=trained,
                  checkpoints=checkpoints)
