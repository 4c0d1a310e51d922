"""Run configuration: YAML files and ``--set`` overrides, validated against the one typed
schema (``schema.Config``: every key with its type, range and default).

A config is validated completely when it is loaded (``load_config``), before anything is
written: unknown keys, wrong types, out-of-range values and inconsistent combinations all
raise one ``ConfigError`` line naming the dotted key (``config key 'diffusion.noise_min':
...``), after where the value came from: the file's name, or the override
(``--set diffusion.noise_min=0.5: config key ...``).

``load_config`` returns the validated config as a plain nested dict (choices as their
string values, which compare equal to the ``choices`` members): the form that run
directories, Ray workers and tune trials carry, and ``save_config`` writes as YAML.
``schema.DEFAULTS`` is that dict for an empty config. Model code reads the typed form
instead: ``typed(cfg)`` is the ``schema.Config`` object (sections as attributes, choices as
members).
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from .errors import ConfigError
from .progress import log
from .schema import PATH_KEYS, Config, unread_keys


# ------------------------------------------------------------------------- messages
def _dotted(prefix: str, loc: tuple) -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


_LIMITS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<",
           "less_than_equal": "<="}


def _describe(err: dict, prefix: str) -> tuple[str, str]:
    """(dotted key, one-line message) for one of pydantic's error dicts."""
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    key = _dotted(prefix, err["loc"])
    if kind == "config_key":
        section = key
        key = _dotted(section, tuple(ctx["key"].split(".")))
        return key, f"config key '{key}' {ctx['text'].replace('{s}', section)}"
    start = f"config key '{key}'"
    if kind == "extra_forbidden":
        return key, f"unknown config key '{key}'"
    if kind == "missing":
        return key, f"{start} is missing"
    if kind in ("enum", "literal_error"):
        return key, f"{start} must be one of {ctx['expected']}, got {value!r}"
    if kind == "int_from_float":
        return key, f"{start} must be an integer, got {value!r}"
    if kind in ("int_parsing", "int_type"):
        return key, f"{start} must be a number (an integer), got {value!r}"
    if kind in ("float_parsing", "float_type"):
        return key, f"{start} must be a number, got {value!r}"
    if kind == "finite_number":
        return key, f"{start} must be a finite number, got {value!r}"
    if kind in ("bool_parsing", "bool_type"):
        return key, f"{start} must be true or false, got {value!r}"
    if kind in ("string_type",):
        return key, f"{start} must be a string, got {value!r}"
    if kind in ("list_type",):
        return key, f"{start} must be a list, got {value!r}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return key, f"{start} must be a mapping, got {value!r}"
    if kind == "too_short":
        return key, f"{start} must not be empty, got {value!r}"
    if kind in _LIMITS:
        limit = next(iter(ctx.values()))
        if kind == "greater_than_equal" and limit == 1 and isinstance(value, int):
            return key, f"{start} must be a positive integer, got {value!r}"
        return key, f"{start} must be {_LIMITS[kind]} {limit}, got {value!r}"
    if kind == "value_error":
        return key, f"{start} {ctx['error']}"
    return key, f"{start}: {err['msg']}, got {value!r}"


def _dotted_keys(tree: dict, prefix: str = "") -> set[str]:
    """Every dotted key (and prefix of one) that ``tree`` sets."""
    out = set()
    for key, value in tree.items():
        out.add(f"{prefix}{key}")
        if isinstance(value, dict):
            out |= _dotted_keys(value, f"{prefix}{key}.")
    return out


_QUOTED = re.compile(r"'([\w.]+)'")     # the keys a cross-key rule's message names


def _related(key: str, other: str) -> bool:
    """Whether setting dotted ``other`` sets ``key``, a key below it or one above it."""
    return key == other or key.startswith((other + ".", other + "[")) or \
        other.startswith(key + ".")


def _error(err: ValidationError, prefix: str = "", origins: dict | None = None
           ) -> ConfigError:
    """The first of pydantic's errors as one ConfigError line, after where the key at fault
    was set (``origins``: {dotted key: (label, is an override)}, in the order they were
    set): the last override of it, of a mapping above it or of a key below it, or for a
    cross-key rule of a key its message names ('--set KEY=VALUE: ...'), else the file when
    the file set it ('FILE: ...'), else nothing (a default)."""
    first = err.errors()[0]
    key, line = _describe(first, prefix)
    named = {key, *(_QUOTED.findall(line) if first["type"] == "config_key" else ())}
    by = [label for k, (label, override) in (origins or {}).items()
          if (any(_related(n, k) for n in named) if override else key == k)]
    if by and by[-1]:
        line = f"{by[-1]}: {line}"
    return ConfigError(line)


def _validated(model: type[BaseModel], values, prefix: str = "",
               origins: dict | None = None) -> BaseModel:
    """``values`` as a ``model`` object, or ConfigError (``_error``)."""
    try:
        return model.model_validate(values)
    except ValidationError as err:
        raise _error(err, prefix, origins) from None


def validate_section(model: type[BaseModel], values, prefix: str) -> dict:
    """``values`` validated as ``model`` (the section at dotted ``prefix``) -> plain dict."""
    return _validated(model, values, prefix).model_dump(mode="json")


def validate_config(cfg: dict) -> dict:
    """The complete config (defaults filled in) as a plain nested dict, or ConfigError."""
    return _validated(Config, cfg).model_dump(mode="json")


def typed(cfg: dict | Config) -> Config:
    """The typed config that model code reads (``cfg.diffusion.noise_min``; choices as
    ``choices`` members): ``cfg`` itself when it is a ``Config``, else the dict (as
    ``load_config`` returns it, edited or not) validated, ConfigError naming the dotted key
    at fault. About 0.5 ms for a dict (the schedule check computes the betas)."""
    return cfg if isinstance(cfg, Config) else _validated(Config, cfg)


def warn_unread(cfg: dict | Config) -> list[str]:
    """Log one warning naming the keys set in model sections that ``cfg``'s model does not
    read (``schema.READS``): they change nothing in this run. Returns them."""
    unread, read = unread_keys(typed(cfg))
    if unread:
        log.warning("config keys not read by model '%s' (it reads %s), ignored: %s",
                    typed(cfg).model, read, "; ".join(unread))
    return unread


# ---------------------------------------------------------------------- load and save
def parse_override(text: str) -> tuple[list[str], object]:
    """'a.b=3' -> (['a', 'b'], 3); the value is parsed as YAML ('[1,2]', 'true', 'x.parquet')."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key.strip()}: not valid YAML: "
                          f"{str(err).splitlines()[0]}") from None
    return key.strip().split("."), value


def _set(tree: dict, keys: list[str], value) -> dict:
    """A copy of ``tree`` with ``value`` at ``keys``: mappings merge key by key."""
    out = dict(tree)
    if len(keys) > 1:
        below = out.get(keys[0])
        out[keys[0]] = _set(below if isinstance(below, dict) else {}, keys[1:], value)
    elif isinstance(value, dict) and isinstance(out.get(keys[0]), dict):
        out[keys[0]] = _merged(out[keys[0]], value)
    else:
        out[keys[0]] = value
    return out


def _merged(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out = _set(out, [key], value)
    return out


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict:
    """The mapping a YAML file holds ({} when empty); one-line ConfigError when the file is
    missing, is not YAML (the problem and its line and column) or holds something else."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: "
                          f"{problem or str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return raw


def load_validated(model: type[BaseModel], path: str | Path | None = None,
                   overrides=()) -> BaseModel:
    """``model`` (``Config``, ``PrepareConfig``) from its defaults <- the YAML file <- each
    override in order, validated. An override is '--set' text, 'KEY=VALUE', or a
    (label, 'KEY=VALUE') pair for one that a command-line option makes ('--workers 2');
    the error names where the key at fault was set (``_error``): 'FILE: config key ...',
    '--set KEY=VALUE: config key ...' or 'LABEL: config key ...'."""
    raw = {} if path is None else read_yaml_mapping(path)
    origins = {key: (str(path), False) for key in _dotted_keys(raw)}
    for item in overrides:
        label, text = (f"--set {item}", item) if isinstance(item, str) else item
        keys, value = parse_override(text)
        raw = _set(raw, keys, value)
        dotted = ".".join(keys)
        origins.pop(dotted, None)                # the latest setting comes last
        origins[dotted] = (label, True)
    return _validated(model, raw, "", origins)


def load_config(path: str | Path | None = None, overrides=()) -> dict:
    """Schema defaults <- YAML file <- each ``--set key=value`` in order, validated
    (``load_validated``), as the plain nested dict."""
    return load_validated(Config, path, overrides).model_dump(mode="json")


def save_config(cfg: dict, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(validate_config(cfg), sort_keys=False))


def absolute_paths(cfg: dict) -> dict:
    """Resolve the config's file paths against the current directory, so a saved run's
    config.yaml still finds its data from anywhere (and from Ray workers)."""
    cfg = copy.deepcopy(cfg)
    for section, key in PATH_KEYS:
        if cfg[section][key]:
            cfg[section][key] = str(Path(cfg[section][key]).expanduser().resolve())
    return cfg


__all__ = ["load_config", "load_validated", "save_config", "typed", "validate_config",
           "validate_section", "parse_override", "read_yaml_mapping", "absolute_paths"]
