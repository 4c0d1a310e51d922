"""The exported index bundle: everything serving needs, nothing of training.

A bundle is a folder of immutable versions and a pointer to the current one:

    INDEX_DIR/CURRENT                  the name of the current version (one line)
    INDEX_DIR/VERSION/manifest.json    format, version, library versions, model, item count,
                                       heads and their FAISS units, sha256 of every other file;
                                       JSON followed by the seal of its own sha256
    INDEX_DIR/VERSION/config.yaml      the run's resolved config (rebuilds the query tower)
    INDEX_DIR/VERSION/query_tower.pt   the model's state_dict: encoder, the reverse
                                       diffusion's denoiser, decoder hidden layers (and, for
                                       --brute-force checks, the output layer FAISS also holds;
                                       DiffuRec: the item table, which is also its input
                                       embedding, and the sequence denoiser)
    INDEX_DIR/VERSION/item_ids.parquet index -> original item id (integers or strings; the
                                       run directory's id-map codec, ``data.id_maps``)
    INDEX_DIR/VERSION/partition.parquet  item -> cluster (L-DiffRec; DiffuRec's row blocks)
    INDEX_DIR/VERSION/units/U.faiss    one FAISS index per search unit (a head, or a shard)
    INDEX_DIR/VERSION/units/U.items.npy  [n_U] the item index of each row of unit U

A unit's rows are its head's item vectors [W_i, b_i] (``index.item_vectors``).

``export`` writes a new version into a temporary folder inside INDEX_DIR, renames it to its
version name, then replaces CURRENT atomically; it then removes versions older than the
previous one. A reader resolves CURRENT once (``resolve``) and reads only that version's
files, so it sees exactly one complete export, never a mix of two; a failed export leaves
CURRENT and every version as they were. The manifest is sealed (``files.write_sealed``):
``read_manifest`` refuses a changed manifest, and a version whose format, checksums,
dimensions or item counts do not match, naming the file.

Before anything is written, ``export`` refuses a model setting whose scores are not linear
heads (``Recommender.export_error``), weights that are not finite, and an INDEX_DIR that
exists but is not a bundle; a full disk is one line, 'no space left on INDEX_DIR'
(``files.write_errors``).
"""
from __future__ import annotations

import json
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..claim import is_empty
from ..config import save_config
from ..data.columns import ITEM
from ..data.id_maps import id_table, read_id_map
from ..errors import ConfigError, DataError
from ..evaluate import has_linear_heads
from ..files import (atomic_write, check_digest, default_mode, read_sealed, sha256,
                     write_errors, write_sealed)
from .index import (L2_KINDS, build_index, faiss, index_dim, item_vectors, mips_norm,
                    resolve_params, resolve_use_gpu, shard_bounds)
from .params import check_setting, option

FORMAT = "scale_diffrec.index_bundle"
VERSION = 2
CURRENT = "CURRENT"
MANIFEST, CONFIG, TOWER, ITEM_IDS, PARTITION = (
    "manifest.json", "config.yaml", "query_tower.pt", "item_ids.parquet", "partition.parquet")
REQUIRED = {"n_items": int, "heads": list, "files": dict, "model": str}


def versions() -> dict:
    return {"scale_diffrec": __version__, "faiss": faiss.__version__, "torch": torch.__version__}


def check_target(out: Path) -> None:
    """DataError unless ``out`` is absent (below a folder), an empty folder (but for a
    claim's lock file, ``claim``) or a bundle."""
    above = next(p for p in out.parents if p.exists())
    if not above.is_dir():
        raise DataError(out, f"cannot be created: {above} is a file, not a folder")
    if out.exists() and not (out.is_dir() and ((out / CURRENT).is_file() or is_empty(out))):
        raise DataError(out, f"exists and is not an index bundle (no {CURRENT}); choose "
                             f"another --out or remove it")


def export(run, out: str | Path, kind: str = "flat", params: dict | None = None,
           shards: int = 1, use_gpu="auto") -> Path:
    """Write a new version of the bundle of a trained run (``runs.TrainedRun``) to ``out``
    and make it current; returns ``out``.

    ``kind``/``params``: the FAISS index type and its parameters (``params.DEFAULTS``);
    ``shards``: split each head's items into this many units (searched in parallel).
    Errors (nothing written): ConfigError for a model whose scores are not linear heads
    (ItemKNN, EASE) or a setting out of range, DataError for an ``out`` that is not a
    bundle, NoSpaceError.
    """
    out = Path(out)
    reason = run.model.export_error()
    if reason is not None:
        raise ConfigError(f"cannot export {run.run_dir}: {reason}")
    if not has_linear_heads(run.model):
        raise ConfigError(f"model '{run.cfg['model']}' is not MIPS-servable: its scores are a "
                          f"history times an item x item matrix, not inner products of a query "
                          f"and item vectors; rank it with `scale-diffrec evaluate`")
    bad = next((name for name, p in run.model.state_dict().items()
                if p.is_floating_point() and not torch.isfinite(p).all()), None)
    if bad is not None:
        raise DataError(run.run_dir, f"the model's '{bad}' holds NaN or infinite values "
                                     f"(training diverged); nothing exported")
    shards = check_setting("shards", shards)
    sizes = [len(h.items) for h in run.model.item_heads()]
    if shards > min(sizes):
        raise ConfigError(f"{option('shards')} {shards}: at most {min(sizes)}, the items of the "
                          f"smallest head")
    # range checks before anything is written; the smallest unit bounds nlist and nprobe
    for n in sorted({b - a for size in sizes for a, b in shard_bounds(size, shards)}):
        resolve_params(kind, n, params)
    check_target(out)
    gpu = resolve_use_gpu(use_gpu)
    with write_errors(out):
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out))
        try:
            default_mode(tmp, directory=True)
            _write_version(run, tmp, kind, params, shards, gpu)
            # names sort by creation time: pruning keeps every version newer than previous
            name = f"v{time.time_ns():020d}-{secrets.token_hex(4)}"
            previous = current_name(out)
            tmp.rename(out / name)
            try:
                atomic_write(out / CURRENT, lambda path: path.write_text(name + "\n"))
            except BaseException:
                shutil.rmtree(out / name, ignore_errors=True)
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _prune(out, oldest_kept=min(name, previous or name))
    return out


def _write_version(run, folder: Path, kind: str, params: dict | None, shards: int,
                   gpu: bool) -> None:
    """Every file of one version, the manifest last."""
    (folder / "units").mkdir()
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
            # serialised here, written by Python: a full disk is an OSError (ENOSPC)
            (folder / "units" / f"{name}.faiss").write_bytes(
                faiss.serialize_index(index).tobytes())
            np.save(folder / "units" / f"{name}.items.npy", items[a:b])
            units.append({"name": name, "kind": unit_kind, "params": unit_params,
                          "n_items": b - a, "dim": dim})
        heads.append({"name": head.name, "dim": int(weight.shape[1]), "units": units})
    save_config(run.cfg, folder / CONFIG)
    with open(folder / TOWER, "wb") as f:
        torch.save({k: v.cpu() for k, v in run.model.state_dict().items()}, f)
    import pyarrow.parquet as pq
    pq.write_table(id_table(run.data.item_ids, run.data.n_items, ITEM, folder / ITEM_IDS),
                   folder / ITEM_IDS)
    if run.partition is not None:
        run.partition.save(folder / PARTITION)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    manifest = {"format": FORMAT, "version": VERSION, "created": time.strftime("%FT%T%z"),
                "versions": versions(), "model": run.cfg["model"],
                "n_items": int(run.data.n_items), "source_run": str(run.run_dir),
                "heads": heads, "files": {f: sha256(folder / f) for f in files}}
    write_manifest(folder, manifest)


def write_manifest(folder: Path, manifest: dict) -> None:
    """``folder/manifest.json``, sealed (``files.write_sealed``): a changed field is refused."""
    text = (json.dumps(manifest, indent=2) + "\n").encode()
    write_sealed(folder / MANIFEST, lambda f: f.write(text))


def current_name(folder: Path) -> str | None:
    """The name CURRENT points at, or None when there is no CURRENT."""
    try:
        return (Path(folder) / CURRENT).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


def resolve(folder: str | Path) -> Path:
    """The folder of the bundle's current version, read once from CURRENT."""
    folder = Path(folder)
    name = current_name(folder)
    if name is None:
        what = "no such folder" if not folder.exists() else f"not an index bundle (no {CURRENT})"
        raise DataError(folder, f"{what}; create one with `scale-diffrec export`")
    version = folder / name
    if not name or "/" in name or name.startswith(".") or not version.is_dir():
        raise DataError(folder / CURRENT, f"names version {name!r}, which is not a folder "
                                          f"of the bundle")
    return version


def _prune(folder: Path, oldest_kept: str) -> None:
    """Remove the versions older than ``oldest_kept`` (the version that was current before
    this export). Newer ones stay: a concurrent export may be about to point CURRENT at
    its version; temporary folders of running exports start with '.' and stay too."""
    for path in folder.iterdir():
        if path.is_dir() and path.name.startswith("v") and path.name < oldest_kept:
            shutil.rmtree(path, ignore_errors=True)


def read_manifest(version: str | Path, verify: bool = True) -> dict:
    """The manifest of one version folder (``resolve``), after checking its seal, format,
    version and (``verify``) the checksums of the other files."""
    version = Path(version)
    path = version / MANIFEST
    if not path.is_file():
        raise DataError(path, "missing: the version is incomplete or was removed")
    try:
        manifest = json.loads(read_sealed(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(path, f"unreadable manifest: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise DataError(path, f"field 'format' is {got!r}, expected {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise DataError(path, f"field 'version' is {manifest.get('version')!r}; this "
                              f"scale_diffrec reads bundle version {VERSION} (export again)")
    for key, kind in REQUIRED.items():
        if not isinstance(manifest.get(key), kind):
            raise DataError(path, f"field '{key}' is missing or not a {kind.__name__}")
    if verify:
        for name, digest in manifest["files"].items():
            file = version / name
            if not file.is_file():
                raise DataError(file, "listed in the manifest but missing")
            check_digest(file, digest)
    return manifest


def read_item_ids(version: Path) -> np.ndarray:
    """[I] original item ids of a version: int64, or an object array of str."""
    return read_id_map(version / ITEM_IDS, ITEM)
