"""Data: every source becomes one ``InteractionData`` (train/valid/test CSR, never dense).

``load_data(cfg)`` dispatches on ``cfg["data"]["source"]``:

    synthetic    seeded generator (``data.synthetic``), the default      -> synthetic.py
    diffrec_npy  the DiffRec authors' folder of *_list.npy (``data.path``) -> diffrec_npy.py
    parquet      a parquet file of user_id, item_id[, timestamp]          -> parquet.py
    dataset      a directory written by ``scale-diffrec prepare``         -> prepared.py

then, when ``data.time_weights`` is {w_min, w_max}, replaces the train values with
T-DiffRec's time weights (time_weights.py). For the sequential model (``model: diffurec``)
the same sources give ``Sequences`` instead (sequences.py: leave-one-out, inputs of
``diffurec.max_len``): ``diffurec_release`` (the DiffuRec authors' files,
diffurec_release.py), ``parquet`` (a log of user_id, item_id[, timestamp], CSV too),
``dataset`` (prepared with ``split.rule: leave_one_out``) and ``synthetic`` (the
generator's interactions in time order). Bad input raises ``errors.DataError`` (naming
the file and the field / row), bad config ``errors.ConfigError`` (naming the dotted key).
Loaders never write anything.
"""
from __future__ import annotations

import dataclasses

from ..choices import DataSource, Model
from ..config import validate_section
from ..errors import ConfigError
from ..schema import DataConfig
from .csr import CSR, SparseRows
from .dataset import InteractionData
from .diffrec_npy import load_diffrec_npy
from .diffurec_release import load_diffurec_release
from .id_maps import load_id_maps, save_id_maps
from .parquet import load_parquet
from .prepared import load_prepared
from .sequences import (MAX_LEN, Sequences, load_sequence_log, load_sequence_prepared,
                        sequences_from_interactions)
from .synthetic import (generate_interactions, item_clusters, load_synthetic,
                        write_synthetic_parquet)
from .time_weights import apply_time_weights, check_time_weights_config, time_weights

SOURCES = DataSource.values()

__all__ = ["CSR", "SparseRows", "InteractionData", "Sequences", "load_data",
           "load_diffrec_npy", "load_parquet", "load_prepared", "load_synthetic", "write_synthetic_parquet",
           "item_clusters", "save_id_maps", "load_id_maps", "apply_time_weights", "time_weights",
           "check_time_weights_config", "SOURCES"]


def load_data(cfg: dict) -> InteractionData | Sequences:
    """The run's data, from the ``data`` section of a config (``schema.DataConfig``: keys,
    types and ranges are validated there first, ConfigError naming the dotted key);
    ``Sequences`` for ``model: diffurec`` (``load_sequences``)."""
    d = validate_section(DataConfig, cfg.get("data") or {}, "data")
    if cfg.get("model") == Model.diffurec:
        return load_sequences(d, (cfg.get("diffurec") or {}).get("max_len", MAX_LEN))
    source, n_items, name = d["source"], d["n_items"], d["name"]
    if source == DataSource.synthetic:
        data = load_synthetic(d["synthetic"], split=d["split"], n_items=n_items, name=name)
    elif source == DataSource.diffrec_npy:
        data = load_diffrec_npy(d["path"], n_items=n_items, name=name)
    elif source == DataSource.dataset:
        data = load_prepared(d["path"], n_items=n_items, name=name)
    else:
        data = load_parquet(d["path"], split=d["split"], n_items=n_items, name=name)
    if d["time_weights"] is not None:
        data = apply_time_weights(data, d["time_weights"]["w_min"], d["time_weights"]["w_max"])
    return data


def load_sequences(d: dict, max_len: int = MAX_LEN) -> Sequences:
    """``Sequences`` of the validated ``data`` section ``d`` (module docstring), inputs of
    ``max_len`` items. Bad input: DataError naming the file, field and row; a declared
    ``data.n_items`` other than the data's: ConfigError naming it."""
    source, name = d["source"], d["name"]
    if source == DataSource.diffurec_release:
        seqs = load_diffurec_release(d["path"], name=name)
    elif source == DataSource.parquet:
        seqs = load_sequence_log(d["path"], n_items=d["n_items"], name=name)
    elif source == DataSource.dataset:
        seqs = load_sequence_prepared(d["path"], name=name)
    else:
        users, items, times, _ = generate_interactions(d["synthetic"])
        seqs = sequences_from_interactions(users, items, d["synthetic"]["n_users"],
                                           d["synthetic"]["n_items"], times,
                                           name=name or "synthetic")
        seqs.meta.update({"source": "synthetic", "params": d["synthetic"]})
    if d["n_items"] is not None and d["n_items"] != seqs.n_items:
        raise ConfigError(f"config key 'data.n_items' ({d['n_items']}) differs from the "
                          f"{seqs.n_items} items of the data")
    return dataclasses.replace(seqs, max_len=int(max_len))
