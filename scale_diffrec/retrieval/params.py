"""Index types, their parameters and the ranges every export and search setting must lie in.

Kept apart from ``index`` (which needs faiss) so that the command line can list the
options, and check them, on an installation without the faiss extra.

    flat   exact inner product; no parameters
    ivf    nlist (None = 4 sqrt(n), at most n / 39), nprobe
    hnsw   M, ef_construction, ef_search
    ivfpq  nlist, nprobe, pq_m, pq_nbits

A value out of range is a ``ConfigError`` naming the command-line option
('--ef-search must be an integer >= 1, got 0'), raised before anything is built or written.
"""
from __future__ import annotations

import operator

import numpy as np

from ..errors import ConfigError

INDEX_TYPES = ("flat", "ivf", "hnsw", "ivfpq")
DEFAULTS = {
    "flat": {},
    "ivf": {"nlist": None, "nprobe": 16},
    "hnsw": {"M": 32, "ef_construction": 80, "ef_search": 128},
    "ivfpq": {"nlist": None, "nprobe": 16, "pq_m": 16, "pq_nbits": 8},
}
MEANING = {"nlist": "IVF lists", "nprobe": "IVF lists searched per query",
           "M": "HNSW neighbours per node", "ef_construction": "HNSW candidates kept while "
           "building", "ef_search": "HNSW candidates kept per query", "pq_m": "PQ sub-vectors "
           "per item", "pq_nbits": "bits per PQ code"}
SEARCH_PARAMS = {"ivf": ("nprobe",), "ivfpq": ("nprobe",), "hnsw": ("ef_search",), "flat": ()}
# smallest valid value of each setting; pq_nbits also has a largest (FAISS codes <= 16 bits)
MINIMUM = {"nlist": 1, "nprobe": 1, "M": 2, "ef_construction": 1, "ef_search": 1, "pq_m": 1,
           "pq_nbits": 1, "k": 1, "shards": 1, "batch_size": 1}
MAXIMUM = {"pq_nbits": 16}


def option(key: str) -> str:
    """The command-line spelling of a setting: ef_search -> --ef-search, k -> -k."""
    return "-k" if key == "k" else "--" + key.replace("_", "-")


def check_setting(key: str, value) -> int | None:
    """``value`` as an int within the range of ``key`` (None passes: 'the default')."""
    if value is None:
        return None
    low, high = MINIMUM[key], MAXIMUM.get(key)
    try:
        number = None if isinstance(value, (bool, np.bool_)) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < low or (high is not None and number > high):
        span = f">= {low}" if high is None else f"in {low}..{high}"
        raise ConfigError(f"{option(key)} must be an integer {span}, got {value!r}")
    return number


def check_params(kind: str, params: dict | None) -> dict:
    """``params`` of an index ``kind``: known keys only, every value in range."""
    if kind not in INDEX_TYPES:
        raise ConfigError(f"--index: unknown index type '{kind}' (expected one of "
                          f"{INDEX_TYPES})")
    params = dict(params or {})
    unknown = set(params) - set(DEFAULTS[kind])
    if unknown:
        raise ConfigError(f"index '{kind}' has no parameter(s) "
                          f"{', '.join(option(k) for k in sorted(unknown))} (it takes "
                          f"{', '.join(option(k) for k in DEFAULTS[kind]) or 'none'})")
    return {key: check_setting(key, value) for key, value in params.items()}
