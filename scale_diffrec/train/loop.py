"""The one training loop: every run, one process or a rank of a W-worker run, trains,
validates, selects, stops early, checkpoints and writes metrics.json through this code.

One epoch = every user once, in a seeded order (``epoch_order``), in batches of
``batch_size`` CSR rows; for sequential data (``Sequences``, DiffuRec) every training
sample (every train prefix) once, in a seeded order, ``batch_size`` samples a batch
(``epoch_batches``). ``lr_decay_every`` multiplies the learning rate by ``lr_decay`` every
so many epochs (StepLR, as DiffuRec's released runs; ``epoch_lr``). Validation every
``eval_every`` epochs on the ``select_metric`` (Recall@20); training stops after
``patience`` epochs without improvement, and the test metrics are those of the best
validation checkpoint (the reference's model selection). A ``FittedRecommender`` (the
baselines) trains in one epoch, ``fit`` on the train matrix, with no optimizer; validation,
checkpoints and metrics are the same. What differs between one process and a Ray worker is
passed in: the optimizer (a torch optimizer, or the W-worker hybrid one that owns its
backward) and the checkpoints (``LocalCheckpoints`` here,
``train.distributed.trainer.ShardedCheckpoints`` for sharded ones reported to Ray).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import checkpoint, runs
from ..data import InteractionData, Sequences
from ..device import autocast, model_device, peak_memory_mib
from ..evaluate import evaluate
from ..finite import check_finite
from ..models import FittedRecommender, Progress
from ..progress import StepProgress, format_seconds, log, peak_rss_mib
from ..shard.collectives import all_reduce_sum, world


def epoch_order(n_users: int, seed: int, epoch: int) -> np.ndarray:
    """[n_users] permutation for this epoch; a function of (seed, epoch) so resume repeats it."""
    return np.random.default_rng([seed, epoch]).permutation(n_users)


def batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def epoch_units(data: InteractionData | Sequences, seed: int, epoch: int) -> np.ndarray:
    """[n] what an epoch visits, in its seeded order (``epoch_order``): user indexes, or
    (sequences) the positions of the training samples (``Sequences.train_positions``)."""
    if isinstance(data, Sequences):
        samples = data.train_positions()
        return samples[epoch_order(len(samples), seed, epoch)]
    return epoch_order(data.n_users, seed, epoch)


def make_batch(data: InteractionData | Sequences, units: np.ndarray, device):
    """The model's training batch of ``units`` (a slice of ``epoch_units``) on ``device``:
    the users' train CSR rows, or (sequences) the ``SequenceBatch`` of the samples."""
    if isinstance(data, Sequences):
        return data.samples(units, device)
    return data.train.take_rows(units).to_torch(device)


def epoch_batches(data: InteractionData | Sequences, cfg: dict, epoch: int, device):
    """(n, batches): the epoch's ``n`` training batches of ``batch_size`` ``epoch_units``,
    built on the host one at a time (``make_batch``) and copied to ``device``."""
    order = batches(epoch_units(data, cfg["seed"], epoch), cfg["batch_size"])
    return len(order), (make_batch(data, u, device) for u in order)


def epoch_lr(optimizer, cfg: dict, epoch: int) -> None:
    """Every group's lr for ``epoch``: its first lr x ``lr_decay`` ^ (epoch //
    ``lr_decay_every``) (torch's StepLR stepped once per epoch; a function of the epoch, so
    resume needs no scheduler state). Nothing without ``lr_decay_every``."""
    if not cfg.get("lr_decay_every"):
        return
    factor = cfg["lr_decay"] ** (epoch // cfg["lr_decay_every"])
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """{part: parameters} (L-DiffRec: encoders, decoder, denoiser) with a "total"."""
    if hasattr(model, "parameter_counts"):
        return model.parameter_counts()
    return {"total": sum(p.numel() for p in model.parameters())}


def describe_model(model: torch.nn.Module) -> str:
    """Parameter counts, and the bytes of parameters + gradients + Adam's two moments (a
    fitted baseline, before its fit: that it has no gradient parameters)."""
    if isinstance(model, FittedRecommender):
        return (f"fitted once on the train matrix, no gradient parameters (metrics.json "
                f"counts its fitted values); peak RSS so far {peak_rss_mib():.0f} MiB")
    counts = parameter_counts(model)
    train_mib = 4 * counts["total"] * 4 / 2 ** 20
    return (", ".join(f"{k} {v:,}" for k, v in counts.items())
            + f" parameters; {train_mib:.1f} MiB with grads and Adam state; "
              f"peak RSS so far {peak_rss_mib():.0f} MiB")


def backward(optimizer, loss: torch.Tensor) -> None:
    """``optimizer.backward(loss)`` for an optimizer that owns the backward pass (a W-worker
    run's hybrid optimizer: DeepSpeed's engine reduces the denoiser's gradients), else
    ``loss.backward()``."""
    if hasattr(optimizer, "backward"):
        optimizer.backward(loss)
    else:
        loss.backward()


def train_step(model, optimizer, batch, progress: Progress, precision: str,
               where: str = "") -> float:
    """One optimizer step on ``batch`` (a CSR batch on the model's device); returns the
    batch loss (sharded: the sum of every rank's share, on every rank). A non-finite loss
    raises ``NonFiniteError`` before the step (every rank together)."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(batch.device, precision):
        loss = model.training_loss(batch, progress)["loss"]
    value = all_reduce_sum(loss.detach()).item()
    check_finite(value, f"training loss{where}",
                 "training stopped; checkpoints/last.pt is the last good epoch")
    backward(optimizer, loss)
    optimizer.step()
    progress.step += 1
    return value


def train_epoch(model, optimizer, data: InteractionData, cfg: dict, epoch: int,
                progress: Progress, device: torch.device | None = None) -> float | None:
    """One pass over all users (sequences: all training samples) on ``device`` (default:
    the CPU); returns the mean batch loss (None for a fitted model, whose epoch is
    ``fit(data.train)``). Batches are built on the host and copied asynchronously
    (``epoch_batches``); the loss value for the progress line
    is the step's only host synchronisation. Sharded (a rank of a W-worker run): every
    rank takes the same batches, rank 0 shows the progress."""
    device = torch.device("cpu") if device is None else device
    model.train()
    if isinstance(model, FittedRecommender):
        model.fit(data.train)
        model.to(device)                       # fit sets its buffers on the host
        return None
    epoch_lr(optimizer, cfg, epoch)
    n, order = epoch_batches(data, cfg, epoch, device)
    meter = StepProgress(epoch + 1, n) if world()[1] == 0 else None
    total = 0.0
    for i, batch in enumerate(order, 1):
        total += train_step(model, optimizer, batch, progress, cfg["precision"],
                            f" at epoch {epoch + 1}, step {i}")
        if meter is not None:
            meter.step(i, total / i)
    return total / max(n, 1)


def headline(metrics: dict, select_metric: str) -> dict:
    """The metrics an epoch line and the history show: the selection metric, and
    recall@20 / ndcg@20 when ``topk`` has 20."""
    keys = dict.fromkeys([select_metric, "recall@20", "ndcg@20"])
    return {k: metrics[k] for k in keys if k in metrics}


def describe_metrics(metrics: dict) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def split_metrics(model, data: InteractionData, split: str, cfg: dict) -> dict:
    """Metrics of ``model`` on ``split`` (valid | test) with the config's evaluation settings."""
    return evaluate(model, data, split=split, ks=cfg["topk"], convention=cfg["convention"],
                    batch_size=cfg["eval_batch_size"], precision=cfg["precision"],
                    chunk_mib=cfg["chunk_mib"],
                    mask_history=(cfg.get("diffurec") or {}).get("mask_history", False))


class LocalCheckpoints:
    """One process's checkpoints (``checkpoint``'s content in one file):
    RUN_DIR/checkpoints/best.pt at a better valid epoch and last.pt after every epoch."""

    def __init__(self, run_dir: Path, model, optimizer):
        self.run_dir, self.model, self.optimizer = Path(run_dir), model, optimizer

    def state(self, progress: Progress, record: dict) -> dict:
        """The checkpoint content; a fitted model has no optimizer."""
        model, optimizer = self.model, self.optimizer
        return {"format": checkpoint.FORMAT, "model": model.state_dict(),
                "optimizer": None if optimizer is None else checkpoint.optimizer_state(
                    optimizer, list(model.named_parameters())),
                "epoch": progress.epoch, "step": progress.step, "record": record,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                else None}

    def save(self, progress: Progress, record: dict, improved: bool) -> None:
        state = self.state(progress, record)
        if improved:
            runs.save_checkpoint(self.run_dir, "best", state)
        runs.save_checkpoint(self.run_dir, "last", state)

    def load_epoch(self, epoch: int) -> None:
        """The model takes epoch ``epoch``'s weights (``checkpoint.at_epoch``)."""
        source = checkpoint.at_epoch(self.run_dir, epoch)
        self.model.load_state_dict(source.full(self.model)["model"])

    def final(self, record: dict, device: torch.device) -> dict:
        """The run's last metrics.json entries: peak memory."""
        return {"peak_rss_mib": peak_rss_mib(), "peak_gpu_mib": peak_memory_mib(device)}


def stopped(record: dict, epochs_done: int, patience: int) -> bool:
    """Early stopping: ``patience`` epochs since the best validation epoch."""
    return record["best_epoch"] > 0 and epochs_done - record["best_epoch"] >= patience


def new_record() -> dict:
    """A run's record: {"best": best valid ``select_metric``, "best_epoch", "valid": all
    valid metrics of the best epoch, "history": an entry per epoch}."""
    return {"history": [], "best": -1.0, "best_epoch": 0, "valid": {}}


def _say_if_finished(record: dict, epochs_done: int, n_epochs: int, cfg: dict, say) -> None:
    """A resumed run with nothing left to train says why (and then only evaluates)."""
    if stopped(record, epochs_done, cfg["patience"]):
        say("the run stopped early after epoch %d (no better valid %s for %d epochs since "
            "epoch %d): nothing to train; raise patience to continue it",
            epochs_done, cfg["select_metric"], cfg["patience"], record["best_epoch"])
    elif epochs_done >= n_epochs and epochs_done > 0:
        say("the run has trained all %d epochs: nothing to train; raise epochs to "
            "continue it", epochs_done)


def run_epochs(model, optimizer, data: InteractionData, cfg: dict, progress: Progress,
               record: dict, device: torch.device, checkpoints,
               on_epoch: Callable[[dict, dict], None] | None = None) -> bool:
    """The epoch loop of every run, one process or a rank of W: train an epoch, validate
    every ``eval_every`` epochs (and at the last) on ``select_metric``, keep the best
    (model selection), stop early after ``patience`` epochs without a better one, save the
    epoch's checkpoints (``checkpoints.save``), then ``on_epoch(entry, record)``. ``entry``
    is the epoch's history entry ({"epoch", "loss", "seconds"}, plus "valid": the selection
    metric, recall@20 and ndcg@20, on evaluation epochs). Progress lines on rank 0.
    Returns whether any epoch was trained."""
    say = log.info if world()[1] == 0 else (lambda *args: None)
    n_epochs = 1 if isinstance(model, FittedRecommender) else cfg["epochs"]
    metric = cfg["select_metric"]
    started = time.perf_counter()
    first_epoch = progress.epoch
    _say_if_finished(record, first_epoch, n_epochs, cfg, say)
    epochs = [] if stopped(record, first_epoch, cfg["patience"]) else \
        range(first_epoch, n_epochs)
    for epoch in epochs:
        t0 = time.perf_counter()
        loss = train_epoch(model, optimizer, data, cfg, epoch, progress, device)
        seconds = time.perf_counter() - t0
        progress.epoch = epoch + 1
        entry = {"epoch": epoch + 1, "loss": loss, "seconds": seconds}
        done = epoch + 1 - first_epoch
        eta = (time.perf_counter() - started) / done * (n_epochs - epoch - 1)
        line = (f"epoch {epoch + 1}/{n_epochs} | "
                + ("fit" if loss is None else f"loss {loss:.4f}") + f" | {seconds:.1f} s")
        improved = False
        if (epoch + 1) % cfg["eval_every"] == 0 or epoch + 1 == n_epochs:
            valid = split_metrics(model, data, "valid", cfg)
            entry["valid"] = headline(valid, metric)
            line += f" | valid {describe_metrics(entry['valid'])}"
            if valid[metric] > record["best"]:
                record.update(best=valid[metric], best_epoch=epoch + 1, valid=valid)
                improved = True
                line += " *"
        record["history"].append(entry)
        stop = stopped(record, epoch + 1, cfg["patience"])
        if stop:                # recorded, so that a resumed run knows it has finished
            record["early_stop"] = {"epoch": epoch + 1, "patience": cfg["patience"]}
        say("%s | ETA %s | peak RSS %.0f MiB", line, format_seconds(eta), peak_rss_mib())
        checkpoints.save(progress, record, improved)
        if on_epoch is not None:
            on_epoch(entry, record)
        if stop:
            say("early stop: no better valid %s for %d epochs (best epoch %d)",
                metric, cfg["patience"], record["best_epoch"])
            break
    return len(epochs) > 0


PEAKS = ("peak_rss_mib", "peak_gpu_mib")


def finish(model, data: InteractionData, cfg: dict, run_dir: str | Path, record: dict,
           test: bool = True, trained: bool = True, checkpoints=None) -> dict:
    """The end of every run: ``model`` takes the best epoch's weights
    (``checkpoints.load_epoch``; default: this process's files) and RUN_DIR/metrics.json is
    written (by rank 0) with ``record``'s history and best-epoch valid metrics, plus (with
    ``test``) the test metrics computed now and ``checkpoints.final``'s entries (peak
    memory; W workers: the plan and every worker's). Returns the metrics.
    ``trained=False`` (a resume with nothing left to train) keeps the peak memory figures
    of the metrics.json already there: they measure training, not this no-op process.
    FileNotFoundError when the run never evaluated (no checkpoint of its best epoch)."""
    run_dir = Path(run_dir)
    device = model_device(model)
    checkpoints = checkpoints or LocalCheckpoints(run_dir, model, None)
    checkpoints.load_epoch(record["best_epoch"])
    metrics = {
        "model": cfg["model"], "data": data.name, "convention": cfg["convention"],
        "best_epoch": record["best_epoch"],
        "valid": record["valid"],          # the best epoch's (full) valid metrics
        **({"test": split_metrics(model, data, "test", cfg)} if test else {}),
        "history": record["history"],
        "parameters": parameter_counts(model),
        "device": str(device), "precision": cfg["precision"],
        **checkpoints.final(record, device),
    }
    if world()[1] != 0:
        return metrics
    if not trained and (run_dir / runs.METRICS).is_file():
        before = json.loads((run_dir / runs.METRICS).read_text())
        metrics.update({key: before[key] for key in PEAKS if key in before})
    runs.write_json(run_dir / runs.METRICS, metrics)
    split = "test" if test else "valid"
    log.info("best epoch %d | %s %s | wrote %s", record["best_epoch"], split,
             describe_metrics(headline(metrics[split], cfg["select_metric"])),
             run_dir / runs.METRICS)
    return metrics
