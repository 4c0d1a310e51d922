"""Errors for bad input: every message names the file and the field or row at fault."""
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
