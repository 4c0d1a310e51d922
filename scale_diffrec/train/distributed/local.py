"""Run a function in W local processes joined by a gloo process group (for tests and probes).

    results = run_distributed(fn, world_size=3, args=(x,))   # [fn(0, 3, x), fn(1, 3, x), ...]

Each rank is a fresh process (``spawn``: no state inherited from pytest), joined by
``torch.distributed.init_process_group("gloo", tcp://127.0.0.1:<free port>)``, with
``MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK`` set as a launcher would (DeepSpeed reads
them), ``torch.set_num_threads(threads)``, and any extra environment from ``env`` set *before*
``fn`` runs (e.g. ``DS_ACCELERATOR=cpu`` before deepspeed is imported).

``fn(rank, world_size, *args)`` must be importable by name (a module-level function) and
its return value picklable; each rank writes ``(status, payload)`` to a file in a temporary
folder, so results do not go through shared-memory tensor queues. If any rank raises, the
others (probably stuck in a collective) get a few seconds' grace, are then killed, and
``DistributedError`` is raised with every failing rank's traceback. A rank that dies without
reporting (signal, ``os._exit``) or a run over ``timeout`` seconds raises too.
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from typing import Any, Callable, Sequence

import torch.multiprocessing as mp


class DistributedError(RuntimeError):
    """One or more ranks failed; the message holds their tracebacks."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, env: dict,
           threads: int | None, backend: str, outdir: str) -> None:
    path = os.path.join(outdir, f"rank{rank}.pkl")
    try:
        if backend is not None:
            os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                               "RANK": str(rank), "WORLD_SIZE": str(world_size),
                               "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size)})
        os.environ.update({k: str(v) for k, v in env.items()})
        import torch
        import torch.distributed as dist
        if threads is not None:
            torch.set_num_threads(threads)
        if backend is not None:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}",
                                    rank=rank, world_size=world_size)
        try:
            result = fn(rank, world_size, *args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        out = ("ok", result)
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit
        out = ("error", f"rank {rank}:\n{traceback.format_exc()}")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(out, f)
    os.replace(tmp, path)


def run_distributed(fn: Callable, world_size: int, args: Sequence[Any] = (), *,
                    env: dict | None = None, timeout: float = 120.0, threads: int | None = 1,
                    backend: str | None = "gloo", grace: float = 5.0) -> list[Any]:
    """[fn(r, world_size, *args) for r in range(world_size)], each in its own process.

    ``backend=None`` starts no process group and sets no launcher variables (a bare process).

    Raises DistributedError (with the failing ranks' tracebacks) if any rank raises, dies
    without a result, or the run exceeds ``timeout`` seconds.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="sdr-dist-") as outdir:
        port = free_port()
        procs = [ctx.Process(target=_entry, name=f"rank{r}", daemon=False,
                             args=(r, world_size, port, fn, tuple(args), dict(env or {}),
                                   threads, backend, outdir))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        paths = [os.path.join(outdir, f"rank{r}.pkl") for r in range(world_size)]
        deadline = time.monotonic() + timeout
        kill_at = None
        reason = None
        status: dict[int, str] = {}
        try:
            while True:
                done = [os.path.exists(p) for p in paths]
                if all(done):
                    break
                now = time.monotonic()
                for r in range(world_size):
                    if done[r] and r not in status:
                        status[r] = _status(paths[r])
                failed = [r for r, s in status.items() if s != "ok"]
                dead = [r for r, p in enumerate(procs)
                        if not done[r] and p.exitcode is not None and not os.path.exists(paths[r])]
                if (failed or dead) and kill_at is None:
                    kill_at = now + grace
                if kill_at is not None and now >= kill_at:
                    reason = "other ranks failed"
                    break
                if now >= deadline:
                    reason = f"timed out after {timeout:.0f} s"
                    break
                time.sleep(0.02)
        finally:
            for p in procs:
                p.join(timeout=grace if reason is None else 0.5)
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        results, errors = [], []
        for r, path in enumerate(paths):
            if not os.path.exists(path):
                code = procs[r].exitcode
                errors.append(f"rank {r}: no result (exit code {code}"
                              f"{'; killed' if reason else ''}{'; ' + reason if reason else ''})")
                results.append(None)
                continue
            with open(path, "rb") as f:
                status, payload = pickle.load(f)
            if status != "ok":
                errors.append(payload)
                results.append(None)
            else:
                results.append(payload)
        # Ranks that only died because another rank failed are noise; show real errors first.
        if errors:
            real = [e for e in errors if "no result" not in e]
            raise DistributedError("\n".join(real + [e for e in errors if e not in real]))
        return results


def _status(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return pickle.load(f)[0]
    except Exception:  # noqa: BLE001 - being written; os.replace makes this rare
        return "ok"
