"""T-DiffRec's time-aware interaction weights (Wang et al. 2023, section 4.2).

The reference (YiyanXu/DiffRec, T-DiffRec/data_utils.py ``data_load``) walks each user's
train interactions in time order, oldest first, and gives them
``np.linspace(w_min, w_max, n_u)``: the oldest w_min, the newest w_max, evenly spaced
between (a user with one interaction gets w_min). The weights replace the 1.0 entries of
the train matrix; valid/test ground truth stays binary.

Here the order is ``InteractionData.train_times`` (timestamps, or the position in the
source file when there are none, which is what the reference's file order is).
Interactions with equal times get the same weight: the mean of the linspace values their
positions span, so the result does not depend on how ties happen to be stored.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..config import validate_section
from ..errors import ConfigError
from ..schema import TimeWeights
from .csr import CSR


def check_time_weights_config(tw) -> tuple[float, float]:
    """(w_min, w_max) from ``data.time_weights`` (``schema.TimeWeights``), or a ConfigError."""
    w = validate_section(TimeWeights, tw, "data.time_weights")
    return w["w_min"], w["w_max"]


def time_weights(indptr: np.ndarray, times: np.ndarray, w_min: float, w_max: float
                 ) -> np.ndarray:
    """[nnz] float32 weights for CSR rows ``indptr`` whose entries have ``times`` [nnz]."""
    indptr = np.asarray(indptr, dtype=np.int64)
    times = np.asarray(times)
    nnz = int(indptr[-1])
    if len(times) != nnz:
        raise ValueError(f"times has {len(times)} entries, the matrix {nnz}")
    if nnz == 0:
        return np.zeros(0, np.float32)
    lengths = np.diff(indptr)
    row_of = np.repeat(np.arange(len(lengths)), lengths)
    order = np.lexsort((times, row_of))              # by row, then time (oldest first)
    rank = np.arange(nnz) - indptr[row_of[order]]    # 0 .. n_u - 1 within the row
    n = lengths[row_of[order]]
    step = np.where(n > 1, (w_max - w_min) / np.maximum(n - 1, 1), 0.0)
    lin = w_min + rank * step
    lin[(rank == n - 1) & (n > 1)] = w_max           # np.linspace ends exactly at w_max
    # ties: equal (row, time) runs in sorted order share the mean of their values
    st, sr = times[order], row_of[order]
    new_run = np.ones(nnz, bool)
    new_run[1:] = (st[1:] != st[:-1]) | (sr[1:] != sr[:-1])
    if not new_run.all():
        run = np.cumsum(new_run) - 1
        lin = (np.bincount(run, weights=lin) / np.bincount(run))[run]
    out = np.empty(nnz, np.float64)
    out[order] = lin
    return out.astype(np.float32)


def apply_time_weights(data, w_min: float, w_max: float):
    """A copy of ``data`` whose train values are the T-DiffRec weights of train_times."""
    if data.train_times is None:
        raise ConfigError(f"data.time_weights is set but the data '{data.name}' has no "
                          f"interaction order (train_times)")
    values = time_weights(data.train.indptr, data.train_times, w_min, w_max)
    train = CSR(data.train.indptr, data.train.indices, values, data.train.n_cols)
    meta = {**data.meta, "time_weights": {"w_min": w_min, "w_max": w_max}}
    return dataclasses.replace(data, train=train, meta=meta)
