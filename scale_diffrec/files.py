"""Files written whole or not at all, with the user's permissions, checked by sha256.

Every artifact (run directory files, checkpoints, index bundles) is written to a
temporary sibling and renamed into place (``atomic_write``), so an interrupted or failed
write leaves the previous version intact. Temporary files get the mode a plain ``open``
would give (0666 / 0777 minus the umask: ``default_mode``), so run files on shared storage
are as readable as the user's umask says. A disk that fills up (ENOSPC, or EDQUOT for a
quota) surfaces as ``NoSpaceError``: one line, 'no space left on PATH'; other write errors
as one line naming the file and the system's reason (``write_errors``).

Integrity is one mechanism, sha256 (``sha256``): an index bundle lists the digest of each
of its files in its manifest; a checkpoint and a bundle's manifest carry the digest of
their own payload in a trailer (``write_sealed`` / ``check_sealed`` / ``read_sealed``):

    [payload: torch.save's zip] [b"\\nscale_diffrec sha256 "] [64 hex digits]

(zip readers find their directory from the end and skip trailing bytes, so ``torch.load``
reads a sealed file as it is). Either way a mismatch is a ``DataError`` naming the file.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import sys
import tempfile
from pathlib import Path

from .errors import ConfigError, DataError, NoSpaceError

SEAL = b"\nscale_diffrec sha256 "
_DIGEST_LEN = 64
_BLOCK = 1 << 20
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def default_mode(path, directory: bool = False) -> None:
    """Give a mkstemp file (0600) or mkdtemp folder (0700) the mode a plain open() or
    mkdir() would: 0666 (folders 0777) minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


@contextlib.contextmanager
def write_errors(path):
    """Turn an OSError inside the block into one line about ``path``: a full disk
    (ENOSPC / EDQUOT) into ``NoSpaceError``, others (a folder in the way, no permission)
    into a DataError with the system's reason."""
    try:
        yield
    except OSError as err:
        if err.errno in _NO_SPACE or "No space left on device" in str(err):
            raise NoSpaceError(path) from None
        reason = err.strerror or str(err).splitlines()[0]
        where = f" ({err.filename})" if err.filename and str(err.filename) != str(path) else ""
        raise DataError(path, f"cannot write: {reason}{where}") from None


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename tmp_path onto ``path``; on any failure the
    temporary file is removed and ``path`` is left as it was. OSErrors are one line
    (``write_errors``)."""
    path = Path(path)
    with write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            default_mode(tmp)
            write(Path(tmp))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def check_output_file(path, option: str = "--out") -> None:
    """ConfigError '{option} PATH: REASON' unless a file can be written at ``path`` later
    (by ``atomic_write``, which creates missing folders): ``path`` is not a folder, the
    nearest existing folder above it is a folder, and a file can be created in it (probed by
    creating and removing a temporary file, which also catches read-only file systems and
    root-owned folders that ``os.access`` misjudges). Creates nothing; for commands that
    write one file at the end of long work, so that an unwritable target stops them first."""
    path = Path(path)
    shown = f"{option} {path}" if option else str(path)
    if path.is_dir():
        raise ConfigError(f"{shown}: is a folder; give the file to write")
    above = next(p for p in path.absolute().parents if p.exists())
    if not above.is_dir():
        raise ConfigError(f"{shown}: cannot be created: {above} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", dir=above)
    except OSError as err:
        raise ConfigError(f"{shown}: cannot write in {above}: {err.strerror or err}") from None
    os.close(fd)
    os.unlink(probe)


def output_file_arg(text: str) -> Path:
    """argparse ``type=`` of a benchmark's ``--out`` (a file written at the end of long
    work): ``check_output_file`` while the command line is parsed, so an unwritable target
    is one line 'error: --out PATH: REASON' on stderr and exit status 2 before any work,
    not a result lost at the end."""
    try:
        check_output_file(text)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return Path(text)


def sha256(path: Path, size: int | None = None) -> str:
    """Hex sha256 of the file's first ``size`` bytes (all of it by default)."""
    digest = hashlib.sha256()
    left = os.path.getsize(path) if size is None else size
    with open(path, "rb") as f:
        while left > 0:
            block = f.read(min(_BLOCK, left))
            if not block:
                break
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def check_digest(path: Path, expected: str, size: int | None = None) -> None:
    """DataError unless the sha256 of the file (its first ``size`` bytes) is ``expected``."""
    if sha256(path, size) != expected:
        raise DataError(path, "checksum mismatch: the file is corrupted or was changed "
                              "after it was written")


class _HashingWriter:
    """A write-only file object that hashes what passes through it."""

    def __init__(self, f):
        self.f, self.digest = f, hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def write_sealed(path: Path, write_payload) -> None:
    """Write ``path``: ``write_payload(file object)`` then the seal (module docstring)."""
    with open(path, "wb") as f:
        hashing = _HashingWriter(f)
        write_payload(hashing)
        f.write(SEAL + hashing.digest.hexdigest().encode())


def check_sealed(path: Path) -> None:
    """DataError unless ``path`` ends with a seal whose digest matches its payload."""
    size = os.path.getsize(path)
    tail = len(SEAL) + _DIGEST_LEN
    with open(path, "rb") as f:
        f.seek(max(size - tail, 0))
        trailer = f.read()
    if size < tail or not trailer.startswith(SEAL):
        raise DataError(path, "no checksum seal: the file is empty, truncated or was not "
                              "written by scale_diffrec")
    check_digest(path, trailer[len(SEAL):].decode("ascii", "replace"), size - tail)


def read_sealed(path: Path) -> bytes:
    """The payload of a sealed file (``check_sealed`` first: DataError on a mismatch)."""
    check_sealed(path)
    with open(path, "rb") as f:
        return f.read(os.path.getsize(path) - len(SEAL) - _DIGEST_LEN)
