"""The prepare config (``scale-diffrec prepare --config FILE --set KEY=VALUE``): every key
with its type, range and default. What each key does: the steps in prepare.py's docstring.
Bad keys or values are one ConfigError line naming the dotted key after where it was set
(the file, or the ``--set``), as for the training config (``config.load_validated``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import load_validated
from ..schema import key_error


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class KCore(_Strict):
    """Iterative k-core bounds (0: off)."""
    users: int = Field(0, ge=0)
    items: int = Field(0, ge=0)


class SplitConfig(_Strict):
    """Per-user split; fractions of each user's interactions (train = the rest)."""
    rule: Literal["random", "time", "leave_one_out"] = "random"
    valid: float = Field(0.1, gt=0, lt=1)
    test: float = Field(0.2, gt=0, lt=1)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _fractions_fit(self):
        if self.valid + self.test >= 1:
            raise key_error("valid", f"+ '{{s}}.test' must be < 1, got {self.valid} + "
                                     f"{self.test}")
        return self


class PrepareConfig(_Strict):
    """The prepare config (module docstring); every key optional."""
    rating_threshold: float | None = None
    dedupe: Literal["first", "last"] = "first"
    kcore: KCore = Field(default_factory=KCore)
    split: SplitConfig = Field(default_factory=SplitConfig)
    natural_noise: bool = False
    memory_mib: float = Field(1024.0, gt=0)      # rows in memory at once (prepare.py, "Memory")

    @model_validator(mode="after")
    def _noise_needs_threshold(self):
        if self.natural_noise and self.rating_threshold is None:
            raise key_error("natural_noise", "needs rating_threshold (the noise is the "
                                             "pairs rated below it)")
        return self


def load_prepare_config(path: str | Path | None = None,
                        overrides: list[str] = ()) -> PrepareConfig:
    """PrepareConfig from a YAML file and dotted ``key=value`` overrides (values parse as
    YAML), as ``config.load_validated`` loads every config: ConfigError naming the dotted
    key after where it was set ('FILE: ...', '--set KEY=VALUE: ...')."""
    return load_validated(PrepareConfig, path, overrides)
