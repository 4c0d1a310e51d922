"""Measuring a worker: seconds and bytes inside each collective, resident memory.

``meter_collectives()`` wraps torch.distributed's collectives with timers that add up, per
collective name, the calls, the wall seconds spent inside (waiting for the other ranks
included) and the payload bytes this rank passes in (its input tensor; for list inputs,
their sum). Call it before DeepSpeed is imported, so that the ZeRO gradient reductions
are counted too (DeepSpeed binds the functions when it loads).
"""
from __future__ import annotations

import time

COLLECTIVES = ("all_to_all_single", "all_gather", "all_gather_into_tensor", "all_reduce",
               "reduce_scatter_tensor", "reduce_scatter", "broadcast")
_INPUT_ARG = {"all_to_all_single": 1, "all_gather": 1, "all_gather_into_tensor": 1,
              "all_reduce": 0, "reduce_scatter_tensor": 1, "reduce_scatter": 1,
              "broadcast": 0}


class CollectiveMeter:
    """{name: {"calls", "seconds", "bytes"}} accumulated since the last ``reset``."""

    def __init__(self):
        self.totals: dict[str, dict[str, float]] = {}

    def reset(self) -> None:
        self.totals = {}

    def add(self, name: str, seconds: float, nbytes: int) -> None:
        t = self.totals.setdefault(name, {"calls": 0, "seconds": 0.0, "bytes": 0})
        t["calls"] += 1
        t["seconds"] += seconds
        t["bytes"] += nbytes

    def seconds(self) -> float:
        return sum(t["seconds"] for t in self.totals.values())


def _payload_bytes(arg) -> int:
    if isinstance(arg, (list, tuple)):
        return sum(_payload_bytes(a) for a in arg)
    return arg.numel() * arg.element_size() if hasattr(arg, "element_size") else 0


def meter_collectives() -> CollectiveMeter:
    """Patch torch.distributed's collectives to record into a new ``CollectiveMeter``."""
    import torch.distributed as dist
    meter = CollectiveMeter()
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def timed(*args, __fn=fn, __name=name, **kwargs):
            i = _INPUT_ARG[__name]
            nbytes = _payload_bytes(args[i]) if len(args) > i else 0
            t0 = time.perf_counter()
            try:
                return __fn(*args, **kwargs)
            finally:
                meter.add(__name, time.perf_counter() - t0, nbytes)
        setattr(dist, name, timed)
    return meter


def current_rss_mib() -> float:
    """Resident memory of this process now (Linux /proc; peak_rss_mib gives the peak)."""
    import os
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
