"""Search-space files for ``scale-diffrec tune`` (configs/tune/*.yaml).

A space file is YAML:

    search: optuna            # grid | random | optuna (TPE); ``--search`` overrides it
    scheduler:                # ASHA over epochs; ``scheduler: null`` runs every trial out
      grace_period: 10        #   epochs before a trial can be stopped (default: eval_every)
      reduction_factor: 2     #   keep the best 1/reduction_factor at each rung (default 2)
    params:                   # dotted config key -> the values to try
      lr: [1.0e-4, 1.0e-3]
      denoiser.dims: [[300], [200, 600]]
      diffusion.noise_min,diffusion.noise_max: [[5.0e-4, 5.0e-3], [1.0e-3, 1.0e-2]]
    start:                    # optional: points tried first (e.g. the released settings),
      - lr: 1.0e-3            #   each naming one choice of every parameter; then the
        denoiser.dims: [200, 600]   # searcher's own (Tune's ``points_to_evaluate``)
        diffusion.noise_min,diffusion.noise_max: [1.0e-3, 1.0e-2]
    extends: paper.yaml       # optional: another space file (relative to this one) whose
                              #   keys this file's own replace, e.g. a paper grid + a start

A parameter whose name joins several keys with commas is a JOINT choice: each value is a
list with one entry per key. That is how a space excludes impossible combinations (e.g.
noise_min >= noise_max, or T' > T) — they are never written down, so no trial meets them.
Every choice is checked against the base config before anything runs (the same rules as
``--set``), and the grid is the product of the parameters' choices.

In Ray Tune's config every choice appears by its label, the value in YAML flow style
("0.001", "[200, 600]"), so grid, random and Optuna searches see the same categorical space.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import load_config, read_yaml_mapping, typed
from ..errors import ConfigError
from ..schema import model_reads, model_sections

SEARCHES = ("grid", "random", "optuna")
SCHEDULER_KEYS = ("grace_period", "reduction_factor")
KEYS = ("extends", "search", "scheduler", "params", "start")


def label(value) -> str:
    """A value in YAML flow style: 0.001 -> '0.001', [200, 600] -> '[200, 600]'."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10 ** 6)
    return text.split("\n...")[0].strip()


@dataclass(frozen=True)
class Param:
    """One searched parameter: ``keys`` (one, or several for a joint choice) and its
    ``choices``, each a tuple of one value per key."""
    keys: tuple[str, ...]
    choices: tuple[tuple, ...]

    @property
    def name(self) -> str:
        return ",".join(self.keys)

    @property
    def labels(self) -> list[str]:
        return [self.label(c) for c in self.choices]

    def label(self, choice: tuple) -> str:
        return label(choice[0] if len(self.keys) == 1 else list(choice))

    def values(self, chosen: str) -> dict:
        """{dotted key: value} of the choice labelled ``chosen``."""
        for choice in self.choices:
            if self.label(choice) == chosen:
                return dict(zip(self.keys, choice))
        raise ConfigError(f"parameter '{self.name}' has no choice {chosen!r}")


@dataclass(frozen=True)
class Space:
    """A parsed space file (see the module docstring)."""
    path: Path
    params: tuple[Param, ...]
    search: str
    scheduler: dict | None
    start: tuple[dict, ...] = ()    # {param name: choice label} per start point

    @property
    def grid_size(self) -> int:
        size = 1
        for p in self.params:
            size *= len(p.choices)
        return size

    def values(self, config: dict) -> dict:
        """{dotted key: value} of a trial's Tune ``config`` ({param name: label})."""
        out: dict = {}
        for p in self.params:
            out.update(p.values(config[p.name]))
        return out

    def overrides(self, config: dict) -> list[str]:
        """A trial's choices as ``--set`` overrides ('key=value')."""
        return [f"{k}={label(v)}" for k, v in self.values(config).items()]

    def resolved(self) -> dict:
        """The space as one self-contained space file's content (no ``extends``)."""
        params = {p.name: [c[0] if len(p.keys) == 1 else list(c) for c in p.choices]
                  for p in self.params}
        start = [{name: yaml.safe_load(chosen) for name, chosen in point.items()}
                 for point in self.start]
        return {"search": self.search, "scheduler": self.scheduler, "params": params,
                **({"start": start} if start else {})}

    def check(self, base_path: Path, base_overrides: list[str] = (), check_cfg=None) -> None:
        """Every choice, applied alone to the base config, and every start point must load
        (and pass ``check_cfg(cfg)`` if given); ConfigError naming the space file and the
        choice or point."""
        base = load_config(base_path, list(base_overrides))
        for p in self.params:
            for i, key in enumerate(p.keys):
                _check_key(self.path, p.name, key, [c[i] for c in p.choices], base)
        for p in self.params:
            settings: dict[tuple, str] = {}     # the choice's typed values -> its label
            for choice in p.choices:
                config = {q.name: q.labels[0] for q in self.params}
                config[p.name] = p.label(choice)
                try:
                    cfg = load_config(base_path, [*base_overrides,   # named below
                                                  *(("", o) for o in self.overrides(config))])
                    model = typed(cfg).model
                    unread = [k for k in p.keys if not model_reads(model, k)]
                    if unread:     # every choice would train the same
                        raise ConfigError(f"model '{model}' does not read '{unread[0]}' (it "
                                          f"reads {model_sections(model)})")
                    if check_cfg is not None:
                        check_cfg(cfg)
                except ConfigError as err:
                    raise ConfigError(f"{self.path}: params '{p.name}' choice "
                                      f"{p.label(choice)}: {err}") from None
                setting = tuple(label(dotted(cfg, k)) for k in p.keys)
                if setting in settings:      # e.g. 1e-3 (a string in YAML 1.1) and 0.001
                    raise ConfigError(f"{self.path}: params '{p.name}' choices "
                                      f"{settings[setting]} and {p.label(choice)} are the same "
                                      f"setting ({', '.join(setting)}): a trial of each would "
                                      f"train the same run")
                settings[setting] = p.label(choice)
        for i, point in enumerate(self.start):
            try:
                cfg = load_config(base_path, [*base_overrides,
                                              *(("", o) for o in self.overrides(point))])
                if check_cfg is not None:
                    check_cfg(cfg)
            except ConfigError as err:
                raise ConfigError(f"{self.path}: start[{i}]: {err}") from None


def dotted(cfg: dict, key: str):
    """The value of dotted ``key`` ('diffusion.steps') in a config."""
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def _check_key(path: Path, name: str, key: str, values: list, base: dict) -> None:
    """A searched key must be a setting of the base config, not ``model`` (a search compares
    runs of the base config's model); a section (e.g. ``data.time_weights``) only with
    values that name each of its keys (else a value would be merged into the base config's
    section, partly)."""
    node = base
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{path}: params '{name}': unknown config key '{key}'")
        node = node[part]
    if key == "model":
        raise ConfigError(f"{path}: params '{name}': 'model' cannot be searched (a search "
                          f"compares runs of the base config's model; run one per model)")
    partial = [v for v in values if isinstance(node, dict) and not (
        v is None or isinstance(v, dict) and set(v) == set(node))]
    if partial:
        raise ConfigError(f"{path}: params '{name}': '{key}' is a section: each value must "
                          f"name all its keys ({', '.join(node)}), got {partial[0]!r}; or "
                          f"search its keys (e.g. '{key}.{next(iter(node), 'KEY')}')")


def _param(path: Path, name, values) -> Param:
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{path}: params: a parameter name must be a dotted config key, "
                          f"got {name!r}")
    keys = tuple(k.strip() for k in name.split(","))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{path}: params '{name}' must be a non-empty list of values")
    if len(keys) == 1:
        choices = tuple((v,) for v in values)
    else:
        bad = [v for v in values if not isinstance(v, list) or len(v) != len(keys)]
        if bad:
            raise ConfigError(f"{path}: params '{name}' is a joint choice of {len(keys)} keys: "
                              f"every value must be a list of {len(keys)}, got {bad[0]!r}")
        choices = tuple(tuple(v) for v in values)
    param = Param(keys, choices)
    if len(set(param.labels)) != len(choices):
        raise ConfigError(f"{path}: params '{name}' lists a value twice")
    return param


def _start(path: Path, points, params: tuple[Param, ...]) -> tuple[dict, ...]:
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise ConfigError(f"{path}: start must be a list of points (mappings of parameter "
                          f"names to one of their values)")
    by_name = {p.name: p for p in params}
    out = []
    for i, point in enumerate(points):
        unknown = sorted(set(point) - set(by_name))
        missing = [name for name in by_name if name not in point]
        if unknown or missing:
            raise ConfigError(f"{path}: start[{i}]: " + (
                f"'{unknown[0]}' is not a parameter of the space" if unknown else
                f"parameter '{missing[0]}' has no value (a point names every parameter)"))
        chosen = {}
        for name, value in point.items():
            param = by_name[name]
            value = tuple(value) if len(param.keys) > 1 and isinstance(value, list) else (value,)
            if value not in param.choices:
                raise ConfigError(f"{path}: start[{i}]: '{name}' value {point[name]!r} is not "
                                  f"one of the parameter's values")
            chosen[name] = param.label(value)
        if chosen in out:
            raise ConfigError(f"{path}: start[{i}] repeats start[{out.index(chosen)}]")
        out.append(chosen)
    return tuple(out)


def _read(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The space file's mapping, with ``extends`` resolved (its keys under this file's)."""
    raw = read_yaml_mapping(path, "space file")
    unknown = set(raw) - set(KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key '{sorted(unknown)[0]}' (known: "
                          f"{', '.join(KEYS)})")
    if "extends" not in raw:
        return raw
    parent = raw.pop("extends")
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"{path}: extends must be the path of another space file")
    parent = (path.parent / parent).resolve()
    if parent in seen:
        raise ConfigError(f"{path}: extends {parent}, which extends it back")
    if not parent.is_file():
        raise ConfigError(f"{path}: extends {parent}, which is not a file")
    return {**_read(parent, (*seen, path.resolve())), **raw}


def load_space(path: str | Path, search: str | None = None) -> Space:
    """Parse and validate a space file; ``search`` (grid | random | optuna) overrides the
    file's. ConfigError (one line naming the file and key) on anything malformed."""
    path = Path(path)
    raw = _read(path)
    search = search or raw.get("search", "optuna")
    if search not in SEARCHES:
        raise ConfigError(f"{path}: search must be one of {', '.join(SEARCHES)}, got {search!r}")
    scheduler = raw.get("scheduler", {})
    if scheduler is not None:
        unknown = sorted(set(scheduler) - set(SCHEDULER_KEYS)) if isinstance(scheduler, dict) \
            else None
        if unknown is None or unknown:
            raise ConfigError(f"{path}: scheduler must be null or a mapping of "
                              f"{', '.join(SCHEDULER_KEYS)}"
                              + (f"; unknown: {', '.join(map(str, unknown))}" if unknown else ""))
        for key, value in scheduler.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (
                    key == "reduction_factor" and value < 2):
                raise ConfigError(f"{path}: scheduler.{key} must be an integer >= "
                                  f"{2 if key == 'reduction_factor' else 1}, got {value!r}")
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{path}: params must be a non-empty mapping of config keys to lists")
    parsed = tuple(_param(path, name, values) for name, values in params.items())
    keys = list(itertools.chain.from_iterable(p.keys for p in parsed))
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ConfigError(f"{path}: params: key '{repeated[0]}' appears in two parameters")
    start = _start(path, raw.get("start", []), parsed)
    if start and search == "grid":
        raise ConfigError(f"{path}: start points have no use with search grid (the grid "
                          f"tries every point); use random or optuna")
    return Space(path, parsed, search, scheduler, start)
