"""The one finite check: losses, scores and parameters that are NaN or infinite stop the
work that meets them, with one line naming what and where.

Why it matters: a diverged run's NaN scores rank FIRST in ``torch.topk``, so without this
check a NaN epoch could win model selection, be saved as ``best.pt`` and be exported; a
resumed checkpoint holding an inf would train on with ``loss inf``. Training checks each
step's loss before the optimizer steps (so the last checkpoint stays the last good one),
evaluation checks each batch's scores, and loading a run checks its parameters.
"""
from __future__ import annotations

import math

import torch

from .errors import NonFiniteError


def check_finite(value, what: str, then: str = "") -> None:
    """NonFiniteError unless ``value`` is finite: a number, a tensor, or a mapping of
    tensors (a state_dict; the first non-finite entry is named). ``what`` says where, e.g.
    'training loss at epoch 3, step 12'; ``then`` what follows (appended after ': ')."""
    then = f": {then}" if then else ""
    if isinstance(value, dict):
        for key, tensor in value.items():
            if torch.is_tensor(tensor) and tensor.is_floating_point():
                check_finite(tensor, f"{what}: parameter '{key}'", then[2:])
        return
    if torch.is_tensor(value):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = ~torch.isfinite(value)
            raise NonFiniteError(f"{what} is not finite ({int(bad.sum())} of {value.numel()} "
                                 f"values, e.g. {value[bad].flatten()[0].item()}){then}")
        return
    if not math.isfinite(float(value)):
        raise NonFiniteError(f"{what} is not finite ({value}){then}")


def count_non_finite(scores: torch.Tensor) -> torch.Tensor:
    """The number of NaN or infinite entries of ``scores`` [B, n], as a 0-dim tensor on its
    device, for the cost of one row sum: a row's sum is finite unless the row holds a NaN or
    an infinity, or its finite values overflow the sum; only such rows are counted entry by
    entry (so an overflow alone counts 0). ``~isfinite(scores).sum()`` costs 2x a d = 128
    scoring matmul on the CPU (bool temporaries); this costs ~5 % of it."""
    suspect = ~torch.isfinite(scores.sum(1))
    if not bool(suspect.any()):
        return torch.zeros((), dtype=torch.long, device=scores.device)
    return (~torch.isfinite(scores[suspect])).sum()
