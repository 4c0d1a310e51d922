"""The errors that stop a command with one line 'error: ...' and exit status 2 (cli.py):
bad input data, a bad config, a full disk, and non-finite numbers. Every message names
what is at fault: the file and the field or row, the dotted config key, or the loss /
scores / parameter (``finite.check_finite`` raises ``NonFiniteError``)."""
from __future__ import annotations


class DataError(ValueError):
    """Input data that cannot be used. ``str(err)`` reads 'FILE: [field F] [row R]: what'."""

    def __init__(self, path, message: str, *, field: str | None = None,
                 row: int | None = None):
        self.path, self.field, self.row = str(path), field, row
        where = [self.path]
        if field is not None:
            where.append(f"field '{field}'")
        if row is not None:
            where.append(f"row {row}")
        super().__init__(f"{', '.join(where)}: {message}")


class ConfigError(ValueError):
    """A config key that is unknown, missing or of the wrong kind; names the dotted key."""


class NoSpaceError(DataError):
    """A write that ran out of disk space; ``str(err)`` reads 'no space left on PATH'."""

    def __init__(self, path):
        self.path, self.field, self.row = str(path), None, None
        ValueError.__init__(self, f"no space left on {path}")


class NonFiniteError(ValueError):
    """A NaN or infinite loss, score or parameter; ``str(err)`` names what and where."""
