"""The dataset every loader returns: train/valid/test CSR matrices over one id space."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .csr import CSR


@dataclass
class InteractionData:
    """Users x items interactions, split; all three CSRs share shape [n_users, n_items].

    ``train_times`` [train.nnz] aligns with ``train.indices`` (per-interaction timestamp,
    used for T-DiffRec weights) or is None. ``item_ids`` / ``user_ids`` map contiguous
    indexes back to the source's original ids (None when the source ids are already
    contiguous indexes). ``item_emb`` [n_items, d] is optional (for k-means partitions).
    """
    name: str
    train: CSR
    valid: CSR
    test: CSR
    train_times: np.ndarray | None = None
    item_emb: np.ndarray | None = None
    item_ids: np.ndarray | None = None
    user_ids: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return self.train.n_rows

    @property
    def n_items(self) -> int:
        return self.train.n_cols
