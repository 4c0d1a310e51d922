"""Claiming an output directory for one writer: a run, a search, a prepared dataset, a bundle.

Every command that writes a directory holds a claim on it from before it reads its data
to its end (``claim``):

1. the directory (and the folders above it) is created if missing, so an unwritable place
   is one line, 'cannot create PATH: REASON', before any work; what the claim created is
   removed again when the command leaves it empty (a failed run writes nothing);
2. an ``flock`` is taken on its lock file ``PATH/.lock``, without waiting: a second
   writer stops with 'PATH is in use by another run (pid N)' (the lock file holds the
   holder's pid and host) before it reads or writes anything.

Exclusive for train, tune and prepare: with the claim held, their guards (``runs.
check_run_dir``, ``tune.search.prepare``, ``data.prepare``) see the directory as no other
process can change it, so two runs started together on one new directory cannot both
start, and one given ``--resume`` or ``--overwrite`` cannot write under another. Shared for
export: concurrent exports to one bundle are safe by design (``retrieval.bundle``), but not
under a run that holds the directory. A path that exists and is not a directory is not
claimed: nothing can be written there, and each command refuses it in its own words.

The kernel drops an flock when its process ends, also on a crash or a kill, so a lock is
never stale; the lock file is removed when the claim ends (a killed process leaves it,
unlocked and harmless; ``is_empty`` does not count it). Only the process that claims holds
the lock: the run's Ray workers and other processes it starts write into the directory
under its claim and never take it (the descriptor is not inherited across exec, PEP 446).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path
from typing import Iterator

from .errors import ConfigError

LOCK = ".lock"


def is_empty(path: Path) -> bool:
    """Whether directory ``path`` holds nothing but a claim's lock file."""
    return all(p.name == LOCK for p in Path(path).iterdir())


def _reason(err: OSError) -> str:
    return err.strerror or str(err).splitlines()[0]


def _make_dirs(path: Path, shown) -> list[Path]:
    """Create ``path`` and the missing folders above it; returns those this call created,
    the deepest first. ConfigError 'cannot create PATH: REASON'."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    if not folder.is_dir():
        raise ConfigError(f"cannot create {shown}: {folder} is a file, not a folder")
    created = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
            created.insert(0, folder)
        except FileExistsError:                  # made meanwhile by another process
            pass
        except OSError as err:
            _remove_empty(created)
            raise ConfigError(f"cannot create {shown}: {_reason(err)}") from None
    return created


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:                       # the deepest first
        with contextlib.suppress(OSError):       # not ours to remove once something is in it
            folder.rmdir()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _holder(fd: int) -> str:
    """'pid N' (and 'on HOST' when another machine holds the lock) from the lock file."""
    pid, _, host = os.pread(fd, 256, 0).decode(errors="replace").strip().partition(" ")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return f"pid {pid or '?'}{where}"


def _lock(path: Path, shown, shared: bool) -> int:
    """A descriptor of ``path``'s lock file holding the flock; ConfigError if it is taken."""
    lock = path / LOCK
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise ConfigError(f"cannot lock {shown}: {_reason(err)} ({lock})") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise ConfigError(f"{shown} is in use by another run ({holder})") from None
        if _same_file(fd, lock):                 # not a file its last holder just removed
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    return fd


def _release(fd: int, lock: Path) -> None:
    """Remove the lock file unless another claim holds it, then close (the lock goes)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # a shared holder: are we the last?
        if _same_file(fd, lock):                 # (prepare may have moved the directory)
            lock.unlink()
    except BlockingIOError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def claim(path: str | Path, shared: bool = False) -> Iterator[Path]:
    """Hold directory ``path`` (created if missing) for this process while the block runs
    (module docstring); ``shared`` lets other shared claims (exports) hold it too.

    Errors (ConfigError, nothing left behind): 'cannot create PATH: REASON' when it or a
    folder above it cannot be created, 'PATH is in use by another run (pid N)' when
    another process holds it.
    """
    shown = Path(path)
    path = shown.resolve()
    if path.exists() and not path.is_dir():
        yield shown
        return
    created = _make_dirs(path, shown)
    try:
        fd = _lock(path, shown, shared)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield shown
    finally:
        _release(fd, path / LOCK)
        _remove_empty(created)
