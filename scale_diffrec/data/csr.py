"""Compressed sparse rows: the one in-memory form of a users x items matrix.

Nothing in scale_diffrec builds a dense users x items matrix. Training reads a batch of
rows (``CSR.take_rows``) as torch tensors (``CSR.to_torch``: ``SparseRows``, the input of
sparse first layers).

Shapes: ``indptr`` [n_rows + 1] int64, ``indices`` [nnz] int64 (sorted per row),
``values`` [nnz] float32 (1.0 for implicit feedback, or time weights for T-DiffRec).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class CSR:
    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    n_cols: int

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, self.n_cols)

    def row_lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def row_ids(self) -> np.ndarray:
        """[nnz] int64 row index of every stored entry (entry j lies in row row_ids()[j])."""
        return np.repeat(np.arange(self.n_rows, dtype=np.int64), self.row_lengths())

    def row(self, r: int) -> np.ndarray:
        """Column indices of row r."""
        return self.indices[self.indptr[r]: self.indptr[r + 1]]

    @staticmethod
    def from_pairs(rows: np.ndarray, cols: np.ndarray, n_rows: int, n_cols: int,
                   values: np.ndarray | None = None) -> "CSR":
        """Build from (row, col[, value]) triples; duplicates are kept once (last value)."""
        rows = np.asarray(rows, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        vals = (np.ones(len(rows), np.float32) if values is None
                else np.asarray(values, dtype=np.float32))
        order = np.lexsort((cols, rows))
        rows, cols, vals = rows[order], cols[order], vals[order]
        if len(rows) > 1:
            keep = np.ones(len(rows), bool)
            keep[:-1] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
            rows, cols, vals = rows[keep], cols[keep], vals[keep]
        indptr = np.zeros(n_rows + 1, np.int64)
        np.add.at(indptr, rows + 1, 1)
        np.cumsum(indptr, out=indptr)
        return CSR(indptr, cols, vals, int(n_cols))

    def take_rows(self, rows: np.ndarray) -> "CSR":
        """Rows ``rows`` (any order) as a new CSR of len(rows) rows."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, ends = self.indptr[rows], self.indptr[rows + 1]
        lengths = ends - starts
        indptr = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(lengths, out=indptr[1:])
        # gather positions: for each selected row, starts[r] .. ends[r]
        pos = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1])
        return CSR(indptr, self.indices[pos], self.values[pos], self.n_cols)

    def transpose(self) -> "CSR":
        return CSR.from_pairs(self.indices, self.row_ids(), self.n_cols, self.n_rows,
                              self.values)

    def to_torch(self, device: torch.device | str | None = None) -> "SparseRows":
        """The rows as torch tensors on ``device`` (default: the CPU, sharing memory).
        For a CUDA device the arrays are staged in pinned host memory and copied
        asynchronously (``non_blocking``): no host synchronisation."""
        device = torch.device("cpu") if device is None else torch.device(device)

        def move(array: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(array)
            if device.type == "cuda":
                return t.pin_memory().to(device, non_blocking=True)
            return t.to(device)
        return SparseRows(indptr=move(self.indptr), indices=move(self.indices),
                          values=move(self.values), n_cols=self.n_cols)


@dataclass
class SparseRows:
    """A batch of CSR rows as torch tensors: the input of sparse first layers.

    ``indptr`` [B + 1], ``indices`` [nnz], ``values`` [nnz]; EmbeddingBag takes
    (indices, offsets=indptr[:-1], per_sample_weights=values).
    """
    indptr: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    n_cols: int

    @property
    def batch_size(self) -> int:
        return self.indptr.numel() - 1

    @property
    def device(self) -> torch.device:
        return self.values.device

    def row_ids(self) -> torch.Tensor:
        """[nnz] row of each stored entry."""
        lengths = self.indptr[1:] - self.indptr[:-1]
        return torch.repeat_interleave(torch.arange(self.batch_size, device=lengths.device),
                                       lengths)

    def dense(self) -> torch.Tensor:
        """[B, n_cols] dense float32."""
        out = torch.zeros(self.batch_size, self.n_cols, dtype=torch.float32,
                          device=self.values.device)
        out[self.row_ids(), self.indices] = self.values
        return out
