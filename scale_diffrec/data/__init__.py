"""Data: every source becomes one ``InteractionData`` (train/valid/test CSR, never dense).

``load_data(cfg)`` dispatches on ``cfg["data"]["source"]``:

    synthetic    seeded generator (``data.synthetic``), the default      -> synthetic.py
    diffrec_npy  the DiffRec authors' folder of *_list.npy (``data.path``) -> diffrec_npy.py
    parquet      a parquet file of user_id, item_id[, timestamp]          -> parquet.py
    dataset      a directory written by ``scale-diffrec prepare``         -> prepared.py

then, when ``data.time_weights`` is {w_min, w_max}, replaces the train values with
T-DiffRec's time weights (time_weights.py). Bad input raises ``DataError`` (naming the
file and the field / row), bad config ``ConfigError`` (naming the dotted key). Loaders
never write anything.
"""
from __future__ import annotations

from .csr import CSR, SparseRows
from .dataset import InteractionData
from .diffrec_npy import load_diffrec_npy
from .errors import ConfigError, DataError
from .split import check_split_config
from .parquet import load_id_maps, load_parquet, save_id_maps
from .prepared import load_prepared
from .synthetic import item_clusters, load_synthetic, write_synthetic_parquet
from .time_weights import apply_time_weights, check_time_weights_config, time_weights

SOURCES = ("synthetic", "diffrec_npy", "parquet", "dataset")
DATA_KEYS = ("source", "path", "name", "item_emb", "split", "time_weights", "synthetic",
             "n_items")

__all__ = ["CSR", "SparseRows", "InteractionData", "DataError", "ConfigError", "load_data",
           "load_diffrec_npy", "load_parquet", "load_prepared", "load_synthetic", "write_synthetic_parquet",
           "item_clusters", "save_id_maps", "load_id_maps", "apply_time_weights", "time_weights",
           "check_time_weights_config", "SOURCES"]


def _declared_n_items(value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"config key 'data.n_items' must be a positive integer or null, "
                          f"got {value!r}")
    return int(value)


def load_data(cfg: dict) -> InteractionData:
    """The run's data, from the ``data`` section of a config (keys: config.DEFAULTS)."""
    d = dict(cfg.get("data") or {})
    for key in d:
        if key not in DATA_KEYS:
            raise ConfigError(f"unknown config key 'data.{key}'")
    source = d.get("source", "synthetic")
    n_items = _declared_n_items(d.get("n_items"))
    split = d.get("split") or {}
    check_split_config(split)            # also for diffrec_npy / dataset (split by the files)
    name = d.get("name")
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"config key 'data.name' must be a string, got {name!r}")
    tw = d.get("time_weights")
    weights = check_time_weights_config(tw) if tw is not None else None

    if source == "synthetic":
        data = load_synthetic(d.get("synthetic"), split=split, n_items=n_items, name=name)
    elif source in ("diffrec_npy", "parquet", "dataset"):
        path = d.get("path")
        if not path:
            raise ConfigError(f"config key 'data.path' is required for data.source "
                              f"'{source}'")
        if source == "diffrec_npy":
            data = load_diffrec_npy(path, n_items=n_items, name=name)
        elif source == "dataset":
            data = load_prepared(path, n_items=n_items, name=name)
        else:
            data = load_parquet(path, split=split, n_items=n_items, name=name)
    else:
        raise ConfigError(f"config key 'data.source' must be one of {list(SOURCES)}, "
                          f"got {source!r}")
    if weights is not None:
        data = apply_time_weights(data, *weights)
    return data
