"""The prepare config (``scale-diffrec prepare --config FILE --set KEY=VALUE``): every key
with its type, range and default. What each key does: the steps in prepare.py's docstring.
Bad keys or values are one ConfigError line naming the file and the dotted key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..config import parse_override, read_yaml_mapping
from ..errors import ConfigError


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
            raise ValueError(f"split.valid + split.test must be < 1, got {self.valid} + "
                             f"{self.test}")
        return self


class PrepareConfig(_Strict):
    """The prepare config (module docstring); every key optional."""
    rating_threshold: float | None = None
    dedupe: Literal["first", "last"] = "first"
    kcore: KCore = Field(default_factory=KCore)
    split: SplitConfig = Field(default_factory=SplitConfig)
    natural_noise: bool = False

    @model_validator(mode="after")
    def _noise_needs_threshold(self):
        if self.natural_noise and self.rating_threshold is None:
            raise ValueError("natural_noise needs rating_threshold (the noise is the pairs "
                             "rated below it)")
        return self


def load_prepare_config(path: str | Path | None = None,
                        overrides: list[str] = ()) -> PrepareConfig:
    """PrepareConfig from a YAML file and dotted ``key=value`` overrides (values parse as
    YAML); ConfigError naming the file and the dotted key otherwise."""
    raw = {} if path is None else read_yaml_mapping(path)
    where = "" if path is None else f"{path}: "
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for i, key in enumerate(keys[:-1]):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"prepare config key '{'.'.join(keys[:i + 1])}' is not "
                                  f"a mapping")
        node[keys[-1]] = value
    try:
        return PrepareConfig.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        if not key:
            raise ConfigError(f"{where}prepare config: {msg}") from None
        got = "" if first["type"] == "missing" else f", got {first.get('input')!r}"
        raise ConfigError(f"{where}prepare config key '{key}': {msg}{got}") from None
