"""The run directory: what a training run leaves behind, and how to load it back.

    RUN_DIR/config.yaml            resolved config (defaults <- file <- --set)
    RUN_DIR/checkpoints/last.pt    after every epoch: model, optimizer, progress, RNG state
    RUN_DIR/checkpoints/best.pt    the model at the best validation score so far
    RUN_DIR/partition.parquet      item -> cluster (L-DiffRec), reused by eval and export
    RUN_DIR/plan.json              clusters -> workers (distributed runs)
    RUN_DIR/inputs.json            what the checkpoints depend on (sealed; ``check_inputs``)
    RUN_DIR/metrics.json           {"valid": {...}, "test": {...}, "history": [...], ...}

Every file is written to a temporary sibling and renamed into place, so an interrupted or
failed run leaves the previous version of each file intact; files follow the user's umask
and a full disk is one line, 'no space left on PATH' (``files``). Checkpoints are sealed
with the sha256 of their contents and checked on every load.

The guard: the trainers first claim RUN_DIR for their whole run (``claim.claim``: one
writer at a time, a second one refused naming the holder's pid); then ``check_run_dir``
decides, before anything is written, whether a run may start in RUN_DIR (empty, or
``overwrite``) or continue there (``resume``: the saved config may differ from the new one
only in ``SAFE_ON_RESUME``, and ``checkpoint.resume_from`` refuses fewer epochs than the
checkpoints hold); the trainers then validate the data,
the partition (against the config that made it) and the model, and only then
``start_run`` writes: a fresh start first removes the previous run's artifacts.

The checkpoints are tied to their inputs: a fresh start records in inputs.json the config
keys outside ``SAFE_ON_RESUME``, the data as loaded (users, items, train interactions and
a digest of the train matrix) and the partition's digest; resume and ``load_run`` refuse a
run whose config.yaml, data or partition.parquet no longer match (runs written before
inputs.json are accepted as they are).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .claim import LOCK
from .config import load_config, save_config
from .data import InteractionData, Sequences, load_data
from .errors import ConfigError, DataError
from .finite import check_finite
from .device import resolve_device
from .files import SEAL, atomic_write, check_sealed, write_sealed
from .models import build_model
from .partition import Partition

CONFIG = "config.yaml"
METRICS = "metrics.json"
PARTITION = "partition.parquet"
CHECKPOINTS = "checkpoints"
PLAN = "plan.json"
INPUTS = "inputs.json"
RUN_FILES = {CONFIG, METRICS, PARTITION, CHECKPOINTS, PLAN, INPUTS, LOCK}
ARTIFACTS = (CHECKPOINTS, METRICS, PARTITION, PLAN, INPUTS)   # what a fresh start replaces

# Keys a resumed run may change: how long it trains and stops, how it evaluates, where it
# runs. Everything else (model, data, optimisation, seed, partition) would make the
# continued run another experiment than its checkpoints, and is refused naming the key.
SAFE_ON_RESUME = ("epochs", "patience", "eval_every", "eval_batch_size", "topk",
                  "device", "precision", "distributed.workers", "distributed.address",
                  "distributed.use_gpu", "distributed.max_failures")


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def write_config(run_dir: Path, cfg: dict) -> None:
    atomic_write(Path(run_dir) / CONFIG, lambda tmp: save_config(cfg, tmp))


def _flat(cfg: dict, prefix: str = "") -> dict:
    """{dotted key: value}; ``distributed.deepspeed`` (free-form) counts as one key."""
    out = {}
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted != "distributed.deepspeed":
            out.update(_flat(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def changed_keys(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two validated configs."""
    a, b = _flat(old), _flat(new)
    return [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]


def holds_run(run_dir: Path) -> bool:
    return (Path(run_dir) / CONFIG).is_file() or (Path(run_dir) / CHECKPOINTS).exists()


def check_run_dir(run_dir: str | Path, cfg: dict, resume: bool = False,
                  overwrite: bool = False) -> None:
    """The guard (writes nothing): may a run with ``cfg`` start (fresh or ``overwrite``) or
    continue (``resume``) in ``run_dir``? ConfigError naming the reason otherwise; a resumed
    run's saved config may differ from ``cfg`` only in ``SAFE_ON_RESUME`` keys."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise ConfigError("--resume continues a run and --overwrite starts it again: pass one")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: not a directory")
    if not resume:
        if holds_run(run_dir) and not overwrite:
            raise ConfigError(f"{run_dir}: already holds a run; pass --resume to continue it "
                              f"or --overwrite to start again")
        others = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_FILES) \
            if run_dir.is_dir() and not holds_run(run_dir) else []
        if others and not overwrite:     # a given partition.parquet is a run's own file
            raise ConfigError(f"{run_dir}: holds other files ({others[0]}), not a run; give a "
                              f"new --out (or --overwrite to train there, beside them)")
        return
    saved_file = run_dir / CONFIG
    if not saved_file.is_file():
        return                      # the trainer names the missing checkpoint
    saved = load_config(saved_file)
    unsafe = [k for k in changed_keys(saved, cfg) if k not in SAFE_ON_RESUME]
    if unsafe:
        flat_old, flat_new = _flat(saved), _flat(cfg)
        what = ", ".join(f"'{k}' ({flat_old.get(k)!r} -> {flat_new.get(k)!r})" for k in unsafe)
        raise ConfigError(f"{saved_file}: --resume cannot change config key {what}; a resumed "
                          f"run may change only {', '.join(SAFE_ON_RESUME)} (use --overwrite "
                          f"or another --out to train with the new config)")


def _digest(*arrays) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(a.tobytes())
    return h.hexdigest()


def data_record(data: InteractionData | Sequences) -> dict:
    """The data as loaded: users, items, train interactions ("nnz"; sequences: every item
    of every sequence) and a digest of the train matrix (sequences: of the sequences)."""
    if isinstance(data, Sequences):
        return {"n_users": data.n_users, "n_items": data.n_items, "nnz": len(data.items),
                "digest": _digest(data.offsets, data.items)}
    return {"n_users": data.n_users, "n_items": data.n_items, "nnz": data.train.nnz,
            "digest": _digest(data.train.indptr, data.train.indices)}


def inputs_of(cfg: dict, data: InteractionData | Sequences, partition=None) -> dict:
    """What a run's checkpoints depend on (JSON): config keys outside ``SAFE_ON_RESUME``,
    the data (``data_record``), the partition's digest (or None)."""
    config = {k: v for k, v in _flat(cfg).items() if k not in SAFE_ON_RESUME}
    return json.loads(json.dumps({
        "config": config, "data": data_record(data),
        "partition": None if partition is None else _digest(partition.cluster_of)}))


def check_inputs(run_dir: Path, cfg: dict, data: InteractionData, partition=None) -> None:
    """DataError naming the file and what differs when the run's config, data or partition
    are not those its checkpoints were trained on (inputs.json); runs without it pass.
    A key the record lacks was added to the schema after the run was trained, with a
    default that keeps the behaviour the run was trained with: it is not a difference."""
    run_dir = Path(run_dir)
    path = run_dir / INPUTS
    if not path.is_file():
        return
    check_sealed(path)
    raw = path.read_bytes()
    try:
        saved = json.loads(raw[:raw.rindex(SEAL)])
    except ValueError as err:
        raise DataError(path, f"not a scale_diffrec inputs file: {first_line(err)}") from None
    now = inputs_of(cfg, data, partition)
    differs = [k for k in saved["config"] if saved["config"][k] != now["config"].get(k)]
    if differs:
        raise DataError(run_dir / CONFIG, f"config key '{differs[0]}' "
                                          f"({saved['config'].get(differs[0])!r} -> "
                                          f"{now['config'].get(differs[0])!r}) differs from "
                                          f"the run's checkpoints")
    if saved["data"] != now["data"]:
        raise DataError(path, f"data changed since the run was trained (recorded "
                              f"{saved['data']}, now {now['data']})")
    if saved["partition"] != now["partition"]:
        raise DataError(run_dir / PARTITION, "partition.parquet changed since the run was "
                                             "trained (another item -> cluster assignment)")


def start_run(run_dir: str | Path, cfg: dict, data: InteractionData, partition=None,
              resume: bool = False) -> None:
    """The first write of a run, after every input has been validated: a resumed run's
    inputs are checked against its inputs.json (``check_inputs``); a fresh start removes
    the previous run's artifacts (``ARTIFACTS``) and records inputs.json; then config.yaml
    and the partition (when there is one and the run does not have it yet) are written."""
    run_dir = Path(run_dir)
    if resume:
        check_inputs(run_dir, cfg, data, partition)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        for name in ARTIFACTS:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        record = json.dumps(inputs_of(cfg, data, partition), indent=2).encode()
        atomic_write(run_dir / INPUTS,
                     lambda tmp: write_sealed(tmp, lambda f: f.write(record)))
    write_config(run_dir, cfg)
    if partition is not None and not (run_dir / PARTITION).is_file():
        partition.save(run_dir / PARTITION)


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


def load_partition_of(run_dir: Path, cfg: dict, data: InteractionData | Sequences):
    """The run's saved partition (L-DiffRec, DiffuRec) or None for models without clusters."""
    if cfg["model"] not in ("ldiffrec", "diffurec"):
        return None
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
    ``device`` (default: the run's ``device`` setting, see ``device.resolve_device``).
    ``checkpoint`` "best" or "last": the file, or a W-worker run's shards where it stopped
    before writing the file (``checkpoint.model_state``)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise FileNotFoundError(f"{run_dir / CONFIG}: not a run directory (no {CONFIG})")
    cfg = load_config(run_dir / CONFIG)
    data = load_data(cfg)
    partition = load_partition_of(run_dir, cfg, data)
    check_inputs(run_dir, cfg, data, partition)
    model = build_model(cfg, data.n_items, partition)
    from .checkpoint import model_state          # cycle: checkpoint reads files through here
    state, path = model_state(run_dir, checkpoint, model)
    check_finite(state, str(path))
    load_model_state(model, state, path)
    model.to(resolve_device(cfg["device"] if device is None else device))
    model.eval()
    return TrainedRun(run_dir, cfg, data, model, partition)
