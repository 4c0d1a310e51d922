"""Checkpoint content that does not depend on the number of workers (resume with any W').

One content, two layouts. The content of a training state is

    {"format": 2, "model": the single-process model's state_dict,
     "optimizer": {parameter name: {"step", "exp_avg", "exp_avg_sq"}} (AdamW's state of the
                  whole, unpartitioned parameter; both L-DiffRec groups and the denoiser),
     "epoch", "step", "record", "torch_rng"}

All other randomness is keyed by (seed, step[, cluster]), so this is the whole state.
The single-process trainer writes it as one file, ``RUN_DIR/checkpoints/last.pt``
(``best.pt`` the same at the best epoch). A W-worker run writes it sharded by cluster, each
rank its own part, under ``RUN_DIR/checkpoints/sharded/epoch_NNNN/``:

    part_RRR.pt     rank R's clusters: {"model": ..., "optimizer": ...} under the cluster
                    names (``split_catalogue``: encoders.{c}.*, decoders.{c}.*, and
                    decoder.{c}.weight / .bias = cluster c's rows of the global decoder;
                    DiffuRec: item_embeddings.{c}.weight = cluster c's rows of E)
    common.pt       the rest of the content (denoiser, sampler, progress, record, RNG)
    manifest.json   {"epoch", "parts": {file: [clusters]}}: written last, after every part,
                    so a directory with a manifest is complete

``latest`` picks the newest complete checkpoint of either layout, ``at_epoch`` the one of
a given epoch; both read as a ``Source`` that gives a process the content of the clusters
it holds (a rank: its parts, under cluster names) or all of it (one process: the
single-process names). The catalogue is cut by cluster, never by worker, so any W' reads
what any W wrote.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from . import runs
from .errors import ConfigError

FORMAT = 2
SHARDED = "sharded"
COMMON = "common"
MANIFEST = "manifest.json"
ROWS = ("decoder", "item_embeddings")   # tables sharded by rows: L-DiffRec's global
                                         # decoder, DiffuRec's item table
CATALOGUE = ("encoders", "decoders", *ROWS)   # the per-cluster parts


# ============================================================================ optimizer
def optimizer_state(optimizer: torch.optim.Optimizer, named_params) -> dict[str, dict]:
    """{name: per-parameter state} of a torch optimizer (parameters never stepped are left
    out); ``named_params``: (name, parameter) pairs."""
    return {name: {k: v.detach().clone() for k, v in optimizer.state[p].items()}
            for name, p in named_params if optimizer.state.get(p)}


def load_optimizer_state(optimizer: torch.optim.Optimizer, named_params, state: dict) -> None:
    """The inverse of ``optimizer_state`` (on copies: torch would keep ``step`` as given);
    hyperparameters stay those of ``optimizer``."""
    index = {id(p): i for i, p in enumerate(
        p for group in optimizer.param_groups for p in group["params"])}
    sd = optimizer.state_dict()
    sd["state"] = {index[id(p)]: {k: v.clone() for k, v in state[name].items()}
                   for name, p in named_params if name in state}
    optimizer.load_state_dict(sd)


# ============================================================================ catalogue names
def _is_catalogue(name: str) -> bool:
    return name.split(".", 1)[0] in CATALOGUE


def _take_rows(value, rows: torch.Tensor):
    """Rows of a parameter or of its optimizer state (whose 0-dim ``step`` all rows share)."""
    if isinstance(value, dict):
        return {k: _take_rows(v, rows) for k, v in value.items()}
    return value if value.dim() == 0 else value[rows]


def _put_rows(into, value, rows: torch.Tensor, n_rows: int):
    if isinstance(value, dict):
        into = {} if into is None else into
        return {k: _put_rows(into.get(k), v, rows, n_rows) for k, v in value.items()}
    if value.dim() == 0:
        return value
    if into is None:
        into = value.new_empty((n_rows, *value.shape[1:]))
    into[rows] = value
    return into


def split_catalogue(named: dict, model, clusters, rows=None) -> dict:
    """The entries of ``clusters`` under cluster names, from the model's names in ``named``
    (parameters or optimizer state); non-catalogue entries are left out. ``rows(c)``: where
    cluster c's items lie in ``named``'s ``decoder.*`` / ``item_embeddings.*`` rows (default
    ``model.items_of``: a whole model's state; a rank's own: ``model.decoder_rows``)."""
    out, clusters, rows = {}, [int(c) for c in clusters], rows or model.items_of
    for name, value in named.items():
        head, rest = name.split(".", 1)
        if head in ROWS:                            # a row-sharded table: rows by cluster
            for c in clusters:
                out[f"{head}.{c}.{rest}"] = _take_rows(value, rows(c).cpu())
        elif head in CATALOGUE and int(rest.split(".", 1)[0]) in clusters:
            out[name] = value
    return out


def merge_catalogue(named: dict, model, rows=None, n_rows: int | None = None) -> dict:
    """The inverse of ``split_catalogue``: the model's names, ``decoder.*`` with ``n_rows``
    rows (default: a whole model's, every item)."""
    out, rows = {}, rows or model.items_of
    n_rows = model.n_items if n_rows is None else n_rows
    for name, value in named.items():
        head, c, rest = name.split(".", 2)
        if head in ROWS:
            key = f"{head}.{rest}"
            out[key] = _put_rows(out.get(key), value, rows(int(c)).cpu(), n_rows)
        else:
            out[name] = value
    return out


# ============================================================================ sources
class FileSource:
    """A checkpoint in one file (single-process names)."""

    def __init__(self, path: Path, content: dict):
        self.path, self.content, self.epoch = path, content, int(content["epoch"])

    def common(self) -> dict:
        c = self.content
        return {**c, "model": {k: v for k, v in c["model"].items() if not _is_catalogue(k)},
                "optimizer": {k: v for k, v in c.get("optimizer", {}).items()
                              if not _is_catalogue(k)}}

    def catalogue(self, model, clusters) -> dict:
        return {key: split_catalogue(self.content.get(key, {}), model, clusters)
                for key in ("model", "optimizer")}

    def full(self, model=None) -> dict:
        return self.content


class ShardedSource:
    """A complete sharded checkpoint directory (see the module docstring)."""

    def __init__(self, run_dir: Path, epoch: int):
        self.run_dir, self.epoch, self.path = run_dir, epoch, epoch_dir(run_dir, epoch)
        self.manifest = json.loads((self.path / MANIFEST).read_text())

    def _load(self, part: str) -> dict:
        return runs.load_checkpoint(self.run_dir, _part_name(self.epoch, part))

    def common(self) -> dict:
        return self._load(COMMON)

    def catalogue(self, model, clusters) -> dict:
        """{"model", "optimizer"} of ``clusters`` under cluster names: only the parts that
        hold them are read."""
        want = {int(c) for c in clusters}
        out = {"model": {}, "optimizer": {}}
        for name, held in self.manifest["parts"].items():
            if want & set(held):
                part = self._load(name)
                for key in out:
                    out[key].update(_of_clusters(part[key], want))
        return out

    def full(self, model) -> dict:
        parts = self.catalogue(model, range(model.n_clusters))
        content = self.common()
        for key in ("model", "optimizer"):
            content[key] = {**content[key], **merge_catalogue(parts[key], model)}
        return content


def _of_clusters(named: dict, clusters: set[int]) -> dict:
    return {k: v for k, v in named.items() if int(k.split(".", 2)[1]) in clusters}


def sharded_root(run_dir: Path) -> Path:
    return Path(run_dir) / runs.CHECKPOINTS / SHARDED


def _epoch_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def _part_name(epoch: int, part: str) -> str:
    """The part's name for ``runs.save_checkpoint`` / ``load_checkpoint``."""
    return f"{SHARDED}/{_epoch_name(epoch)}/{part}"


def epoch_dir(run_dir: Path, epoch: int) -> Path:
    return sharded_root(run_dir) / _epoch_name(epoch)


def _complete(run_dir: Path) -> list[int]:
    """The epochs of the complete sharded checkpoints."""
    root = sharded_root(run_dir)
    return [int(m.parent.name.split("_")[1])
            for m in (root.glob("epoch_*/" + MANIFEST) if root.is_dir() else [])]


def _file(run_dir: Path, name: str) -> FileSource | None:
    """``name``.pt if it holds a training state (a W-worker run's holds the model only)."""
    path = Path(run_dir) / runs.CHECKPOINTS / f"{name}.pt"
    if not path.is_file():
        return None
    content = runs.load_checkpoint(run_dir, name)
    return FileSource(path, content) if content.get("format") == FORMAT else None


def latest(run_dir: Path) -> FileSource | ShardedSource | None:
    """The newest complete training state: ``last.pt`` or the newest complete sharded
    directory."""
    last = _file(run_dir, "last")
    complete = _complete(run_dir)
    if complete and (last is None or max(complete) > last.epoch):
        return ShardedSource(run_dir, max(complete))
    return last


def _epoch_of(path: Path) -> int:
    """The epoch a checkpoint file records (memory-mapped: its tensors are not read)."""
    return int(torch.load(path, map_location="cpu", mmap=True, weights_only=False)["epoch"])


def model_state(run_dir: Path, name: str, model) -> tuple[dict, Path]:
    """The weights of a run's ``name`` checkpoint ("best" or "last") under ``model``'s
    (single-process) names, and where they come from. That is ``NAME.pt``, unless the run's
    newest complete sharded checkpoint is newer than its last.pt: a W-worker run writes
    last.pt / best.pt only at its end, so one that stopped before (a trial ASHA cut, a run
    killed and not restarted) has its model only in shards. Then "last" is assembled from
    the newest sharded checkpoint and "best" from its best epoch's (kept by
    ``mark_complete``). FileNotFoundError when there is no such checkpoint."""
    complete = _complete(run_dir)
    last = runs.checkpoint_path(run_dir, "last")
    if complete and (not last.is_file() or _epoch_of(last) < max(complete)):
        source = ShardedSource(run_dir, max(complete))
        if name == "best":
            epoch = source.common()["record"]["best_epoch"]
            if epoch == 0:
                raise FileNotFoundError(f"{source.path}: the run has not evaluated yet, so "
                                        f"it has no best checkpoint")
            source = at_epoch(run_dir, epoch)
        return source.full(model)["model"], source.path
    return runs.load_checkpoint(run_dir, name)["model"], runs.checkpoint_path(run_dir, name)


def saved_any(run_dir: Path) -> bool:
    """Whether the run has a checkpoint of either layout (no file is read)."""
    return runs.checkpoint_path(run_dir, "last").is_file() or bool(_complete(run_dir))


def resume_from(run_dir: Path, cfg: dict) -> FileSource | ShardedSource:
    """The checkpoint ``--resume`` continues from (``latest``), checked against the new
    config before anything is written: FileNotFoundError when there is none, ConfigError
    when ``cfg``'s epochs is below the epochs it has trained (config.yaml would then say
    fewer epochs than the checkpoints hold)."""
    source = latest(run_dir)
    if source is None:
        raise FileNotFoundError(f"{Path(run_dir) / runs.CHECKPOINTS}: no checkpoint to "
                                f"resume from")
    if cfg["epochs"] < source.epoch:
        raise ConfigError(f"epochs={cfg['epochs']} is below the {source.epoch} epochs "
                          f"already trained in {run_dir}")
    return source


def at_epoch(run_dir: Path, epoch: int) -> FileSource | ShardedSource:
    """The checkpoint of ``epoch`` (the best one): its sharded directory or ``best.pt``."""
    if epoch in _complete(run_dir):
        return ShardedSource(run_dir, epoch)
    best = _file(run_dir, "best")
    if best is None or best.epoch != epoch:
        raise FileNotFoundError(f"{Path(run_dir) / runs.CHECKPOINTS}: no checkpoint of epoch "
                                f"{epoch}")
    return best


# ============================================================================ writing
def clear(run_dir: Path) -> None:
    """A fresh run starts without the checkpoints of an earlier one."""
    shutil.rmtree(sharded_root(run_dir), ignore_errors=True)
    for name in ("last", "best"):
        (Path(run_dir) / runs.CHECKPOINTS / f"{name}.pt").unlink(missing_ok=True)


def part_name(rank: int) -> str:
    return f"part_{rank:03d}"


def save_part(run_dir: Path, epoch: int, part: str, content: dict) -> None:
    """``part`` (``part_name(rank)`` or ``COMMON``) of the checkpoint of ``epoch``."""
    runs.save_checkpoint(run_dir, _part_name(epoch, part), content)


def mark_complete(run_dir: Path, epoch: int, parts: dict[str, list[int]],
                  keep: tuple[int, ...] = ()) -> None:
    """Write the manifest (every part is on disk), then remove the sharded checkpoints of
    other epochs than this one and ``keep``."""
    runs.write_json(epoch_dir(run_dir, epoch) / MANIFEST, {"epoch": epoch, "parts": parts})
    for path in sharded_root(run_dir).glob("epoch_*"):
        if int(path.name.split("_")[1]) not in (epoch, *keep):
            shutil.rmtree(path, ignore_errors=True)
