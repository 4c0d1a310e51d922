"""Progress lines for long work: steps, epochs, rates and ETA, plus peak memory."""
from __future__ import annotations

import logging
import resource
import sys
import time

log = logging.getLogger("scale_diffrec")


def setup_logging(level: int = logging.INFO) -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far: Linux's VmHWM (its own address space's
    high-water mark; ``ru_maxrss`` would carry over the parent's peak into a forked and
    exec'd child, e.g. a spawned worker), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024          # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class StepProgress:
    """Logs 'epoch E step i/n, rate, ETA' at most every ``every_s`` seconds within an epoch."""

    def __init__(self, epoch: int, n_steps: int, every_s: float = 30.0):
        self.epoch, self.n_steps, self.every_s = epoch, n_steps, every_s
        self.start = self.last = time.perf_counter()

    def step(self, i: int, loss: float) -> None:
        now = time.perf_counter()
        if now - self.last < self.every_s or i >= self.n_steps:
            return
        self.last = now
        per_step = (now - self.start) / i
        log.info("epoch %d step %d/%d | loss %.4f | %.2f s/step | epoch ETA %s",
                 self.epoch, i, self.n_steps, loss, per_step,
                 format_seconds(per_step * (self.n_steps - i)))
