"""The exported index bundle: everything serving needs, nothing of training.

    INDEX_DIR/manifest.json      format, version, library versions, model, item count,
                                 heads and their FAISS units, sha256 of every other file
    INDEX_DIR/config.yaml        the run's resolved config (rebuilds the query tower)
    INDEX_DIR/query_tower.pt     the model's state_dict: encoder, the reverse diffusion's
                                 denoiser, decoder hidden layers (and, for --brute-force
                                 checks, the output layer whose rows FAISS also holds)
    INDEX_DIR/item_ids.npy       [I] the user's original id of each item index
    INDEX_DIR/partition.parquet  item -> cluster (L-DiffRec only)
    INDEX_DIR/units/U.faiss      one FAISS index per search unit (a head, or a shard of one)
    INDEX_DIR/units/U.items.npy  [n_U] the item index of each row of unit U

A unit's rows are its head's item vectors [W_i, b_i] (``index.item_vectors``). ``export``
writes into a temporary sibling directory and renames it onto INDEX_DIR at the end, so a
failed export leaves an earlier bundle intact. ``read_manifest`` refuses a bundle whose
format version, checksums, dimensions or item counts do not match, naming the file.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from ..data.errors import ConfigError, DataError
from .index import (L2_KINDS, build_index, index_dim, item_vectors, mips_norm, resolve_params,
                    resolve_use_gpu, shard_bounds)

FORMAT = "scale_diffrec.index_bundle"
VERSION = 1
MANIFEST, CONFIG, TOWER, ITEM_IDS, PARTITION = (
    "manifest.json", "config.yaml", "query_tower.pt", "item_ids.npy", "partition.parquet")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict:
    from .. import __version__
    return {"scale_diffrec": __version__, "faiss": faiss.__version__, "torch": torch.__version__}


def export(run, out: str | Path, kind: str = "flat", params: dict | None = None,
           shards: int = 1, use_gpu="auto") -> Path:
    """Write the bundle of a trained run (``runs.TrainedRun``) to ``out``; returns it.

    ``kind``/``params``: the FAISS index type and its parameters (``index.DEFAULTS``);
    ``shards``: split each head's items into this many units (searched in parallel).
    A model whose scores are not linear heads (ItemKNN, EASE) is refused with a
    ConfigError before anything is written.
    """
    from ..config import save_config
    from ..evaluate import has_linear_heads
    if not has_linear_heads(run.model):
        raise ConfigError(f"model '{run.cfg['model']}' is not MIPS-servable: its scores are a "
                          f"history times an item x item matrix, not inner products of a query "
                          f"and item vectors; rank it with `scale-diffrec evaluate`")
    out = Path(out)
    gpu = resolve_use_gpu(use_gpu)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        (tmp / "units").mkdir()
        heads = []
        for head in run.model.item_heads():
            weight = head.weight.detach().cpu().float().numpy()
            bias = head.bias.detach().cpu().float().numpy()
            items = head.items.detach().cpu().numpy().astype(np.int64)
            units = []
            for s, (a, b) in enumerate(shard_bounds(len(items), shards)):
                unit_kind, unit_params = resolve_params(kind, b - a, params)
                if unit_kind in L2_KINDS:
                    unit_params["mips_norm"] = mips_norm(weight[a:b], bias[a:b])
                dim = index_dim(weight.shape[1], unit_kind, unit_params)
                vectors = item_vectors(weight[a:b], bias[a:b], dim, unit_params.get("mips_norm"))
                index = build_index(vectors, unit_kind, unit_params, use_gpu=gpu)
                name = f"{head.name}.{s}"
                faiss.write_index(index, str(tmp / "units" / f"{name}.faiss"))
                np.save(tmp / "units" / f"{name}.items.npy", items[a:b])
                units.append({"name": name, "kind": unit_kind, "params": unit_params,
                              "n_items": b - a, "dim": dim})
            heads.append({"name": head.name, "dim": int(weight.shape[1]), "units": units})
        save_config(run.cfg, tmp / CONFIG)
        torch.save({k: v.cpu() for k, v in run.model.state_dict().items()}, tmp / TOWER)
        item_ids = (np.arange(run.data.n_items, dtype=np.int64) if run.data.item_ids is None
                    else np.asarray(run.data.item_ids))
        np.save(tmp / ITEM_IDS, item_ids)
        if run.partition is not None:
            run.partition.save(tmp / PARTITION)
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        manifest = {"format": FORMAT, "version": VERSION, "created": time.strftime("%FT%T%z"),
                    "versions": versions(), "model": run.cfg["model"],
                    "n_items": int(run.data.n_items), "source_run": str(run.run_dir),
                    "heads": heads, "files": {f: sha256(tmp / f) for f in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_manifest(folder: str | Path, verify: bool = True) -> dict:
    """The bundle's manifest, after checking format, version and (``verify``) checksums."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise DataError(path, "not an index bundle (no manifest.json); create one with "
                              "`scale-diffrec export`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(path, f"unreadable manifest: {err}") from None
    if manifest.get("format") != FORMAT:
        raise DataError(path, f"field 'format' is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise DataError(path, f"field 'version' is {manifest.get('version')!r}; this "
                              f"scale_diffrec reads bundle version {VERSION} (export again)")
    if verify:
        for name, digest in manifest["files"].items():
            file = folder / name
            if not file.is_file():
                raise DataError(file, "listed in the manifest but missing")
            if sha256(file) != digest:
                raise DataError(file, "checksum mismatch: the file is corrupted or was "
                                      "changed after export")
    return manifest
