"""Timestep respacing: run the reverse chain over a subset of a T-step diffusion's steps.

From improved-diffusion (Nichol & Dhariwal 2021, section 4; ``respace.py``), as DiffuRec
carries it (src/diffurec.py ``space_timesteps``):

- ``space_timesteps(T, counts)`` picks the kept steps: T is cut into len(counts) equal
  sections (the first T % len(counts) one step longer) and section i keeps counts[i]
  steps at evenly spaced, rounded positions (its first and last step when counts[i] > 1,
  its first when 1). ``"ddimN"``: the DDIM stride, range(0, T, s) for the smallest
  integer s that gives exactly N steps.
- ``respaced_betas(betas, kept)``: the K-step process whose cumulative products equal
  the original alpha_bar at the kept steps: beta'_k = 1 - alpha_bar[s_k] / alpha_bar[s_{k-1}]
  (alpha_bar[s_{-1}] = 1). Its step k is the original step ``kept[k]``: the model is called
  with that timestep (``model_timesteps``), and with every step kept the betas are the
  original ones.
"""
from __future__ import annotations

import numpy as np
import torch


def space_timesteps(steps: int, section_counts) -> list[int]:
    """The kept steps, sorted ascending (list of int, each in [0, steps)).

    ``section_counts``: a list of non-negative ints, a string of comma-separated ints
    ("10,5"), or "ddimN". Errors: ValueError naming the count when a section has fewer
    steps than it must keep, "ddimN" has no integer stride, a count is not an int >= 0,
    or nothing is kept.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            return _ddim_steps(steps, section_counts[len("ddim"):])
        section_counts = [_count(x, section_counts) for x in section_counts.split(",")]
    counts = [_count(c, section_counts) for c in section_counts]
    if not counts or sum(counts) == 0:
        raise ValueError(f"section counts {section_counts!r} keep no step")
    size_per, extra = divmod(steps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section {i} of {size} steps into {count}")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        kept += [start + round(j * stride) for j in range(count)]
        start += size
    return sorted(set(kept))


def _count(value, spec) -> int:
    """One section count as an int >= 0, or a ValueError quoting the whole spec."""
    try:
        count = int(value) if isinstance(value, str) else value
    except ValueError:
        count = None
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"section counts {spec!r}: {value!r} is not an integer >= 0")
    return int(count)


def _ddim_steps(steps: int, wanted: str) -> list[int]:
    """range(0, steps, s) for the smallest stride s giving exactly int(wanted) steps."""
    count = _count(wanted, f"ddim{wanted}")
    for stride in range(1, max(steps, 2)):
        if len(range(0, steps, stride)) == count:
            return list(range(0, steps, stride))
    raise ValueError(f"cannot take exactly {count} of {steps} steps with an integer stride "
                     f"('ddim{wanted}')")


def respaced_betas(betas: np.ndarray, kept) -> np.ndarray:
    """[K] float64 betas of the process restricted to ``kept`` (sorted step indexes into
    ``betas`` [T]); its alpha_bar [K] equals cumprod(1 - betas)[kept]."""
    kept = np.asarray(kept, dtype=np.int64)
    alpha_bar = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))[kept]
    return 1.0 - alpha_bar / np.append(1.0, alpha_bar[:-1])


def model_timesteps(t: torch.Tensor, kept, steps: int, rescale: bool = True) -> torch.Tensor:
    """The timestep the model sees at respaced step t [B] (long): the original step
    kept[t], times 1000 / steps (the original T) when ``rescale`` (DiffuRec's
    ``rescale_timesteps``; improved-diffusion's ``_WrappedModel``). [B] float32."""
    original = torch.as_tensor(np.asarray(kept, dtype=np.int64), device=t.device)[t]
    return original.float() * (1000.0 / steps) if rescale else original.float()
