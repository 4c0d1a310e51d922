"""Run configuration: YAML files over built-in defaults, plus dotted ``--set`` overrides.

A config is a plain nested dict. Every key a file or override names must exist in
``DEFAULTS`` (so typos fail loudly, naming the dotted key), except below the free-form
sections in ``FREE_FORM`` (e.g. ``distributed.deepspeed``, passed through to DeepSpeed).
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from .data.errors import ConfigError

DEFAULTS: dict = {
    "model": "diffrec",          # diffrec | ldiffrec | multvae  (T-/LT- = data.time_weights)
                                 # | baselines: mostpop | itemknn | ease | als
    "seed": 0,
    "epochs": 100,
    "batch_size": 400,
    "lr": 1.0e-3,
    "weight_decay": 0.0,
    "eval_every": 5,             # epochs between validation passes
    "patience": 20,              # stop after this many epochs without a better valid metric
    "select_metric": "recall@20",
    "topk": [10, 20, 50, 100],
    "convention": "reference",   # reference | users_with_truth (see metrics.py)
    "eval_batch_size": 1000,
    "device": "auto",            # auto (CUDA when torch sees a GPU) | cpu | cuda | cuda:N
    "precision": "fp32",         # fp32 | tf32 | bf16 (autocast for the matmuls)
    "chunk_mib": None,           # MiB of one [B, chunk] block of logits/scores; None: 8 on
                                 # the CPU, 1024 on a GPU (scale_diffrec/device.py)
    "data": {
        "source": "synthetic",   # diffrec_npy | parquet | synthetic | dataset (prepared dir)
        "path": None,
        "name": None,
        "item_emb": None,        # optional path to item embeddings (.npy or parquet)
        "split": {"rule": "random", "valid": 0.1, "test": 0.2, "seed": 0},  # random | time
        "time_weights": None,    # {w_min: .., w_max: ..} -> T-DiffRec / LT-DiffRec
        "synthetic": {
            "n_users": 2000, "n_items": 1000, "n_clusters": 8, "mean_items_per_user": 30,
            "popularity_exponent": 1.0, "cluster_affinity": 0.8, "seed": 0,
        },
        "n_items": None,         # declared catalogue size (ids past it are an error)
    },
    "diffusion": {
        "mean_type": "x0",
        "steps": 40,
        "schedule": "linear-var",  # linear-var | linear | cosine | sqrt | trunc_lin
        "noise_scale": 0.005,
        "noise_min": 0.005,
        "noise_max": 0.01,
        "sampling_steps": 0,
        "sampling_noise": False,
        "reweight": True,
        "sampler": "importance",   # importance (LossSecondMomentResampler) | uniform
        "history_per_step": 10,
        "uniform_prob": 0.001,
    },
    "denoiser": {"dims": [200, 600], "emb_size": 10, "norm": False, "dropout": 0.5},
    "multvae": {"dims": [200, 600], "dropout": 0.5, "anneal_cap": 0.2,
                "total_anneal_steps": 200000},
    "ldiffrec": {                # semantics and sources: scale_diffrec/models/ldiffrec.py
        "n_clusters": 2,
        "in_dims": [300],        # reference flag order: latent size first (reversed to build)
        "out_dims": [],          # [] = one Linear(latent -> I); non-empty = per-cluster decoders
        "mlp_dims": [300],
        "lamda": 0.03,           # diffusion-loss weight: max((1 - epochs/anneal_steps) * lamda,
        "anneal_cap": 0.005,     #   anneal_cap), epochs = epochs done (reference defaults 500,
        "anneal_steps": 500,     #   0.005: L-DiffRec/main.py, not passed by run.sh)
        "vae_anneal_cap": 0.3,   # KL weight: min(vae_anneal_cap, batches done / vae_anneal_steps)
        "vae_anneal_steps": 200,
        "lr_vae": None,          # autoencoder learning rate (reference lr1); None = lr (lr2)
        "weight_decay_vae": None,  # autoencoder weight decay (reference wd1); None = weight_decay
        "act": "tanh",
        "dropout": 0.1,
        "recon_target": "dropped",  # dropped (reference: x after input dropout) | clean (x)
        "embeddings": "auto",    # file (data.item_emb / item_emb.npy) | svd | auto (file if any)
        "emb_dim": 64,           # svd embedding dimensions
        "kmeans_niter": 50,
        "logit_chunk": None,     # items per chunk of the training logsumexp; None: chunk_mib
        "cluster_capacity": None,  # max items per cluster as a multiple of I / C (None: k-means)
        "partition": None,       # path of a saved partition artifact to reuse
    },
    "itemknn": {"k": 100, "shrink": 10.0},      # neighbours per item; cosine shrinkage
    "ease": {"lamda": 500.0, "max_items": 20000},  # L2 weight; refused above max_items
    "als": {"factors": 64, "regularization": 0.01, "iterations": 15, "alpha": 1.0,
            "use_gpu": "auto"},          # implicit's AlternatingLeastSquares (auto: its CUDA)
    "distributed": {
        "workers": 1,
        "use_gpu": "auto",
        "address": None,
        "zero_stage": 1,
        "max_failures": 0,
        "placement": "items",    # items | params
        "deepspeed": {},
    },
}

FREE_FORM = {("distributed", "deepspeed"), ("data", "synthetic")}


def _merge(base: dict, update: dict, prefix: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        dotted = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key '{dotted}'")
        path = tuple(dotted.split("."))
        if isinstance(base[key], dict) and path not in FREE_FORM:
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}' must be a mapping, got {value!r}")
            out[key] = _merge(base[key], value, dotted + ".")
        elif isinstance(base[key], dict):
            out[key] = {**base[key], **(value or {})}
        else:
            out[key] = _typed(dotted, base[key], value)
    return out


def _typed(dotted: str, default, value):
    """``value`` in the default's type: YAML reads '1e-3' as a string, so numbers written
    without a dot are converted here; anything else of the wrong kind is an error."""
    if isinstance(default, bool) or value is None or default is None:
        if isinstance(value, str):
            try:
                return float(value) if any(c in value.lower() for c in ".e") else value
            except ValueError:
                return value
        return value
    if isinstance(default, (int, float)):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"config key '{dotted}' must be a number, got '{value}'") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{dotted}' must be a number, got {value!r}")
        if isinstance(default, int) and float(value) != int(value):
            raise ConfigError(f"config key '{dotted}' must be an integer, got {value!r}")
        return int(value) if isinstance(default, int) else float(value)
    return value


def parse_override(text: str) -> tuple[list[str], object]:
    """'a.b=3' -> (['a', 'b'], 3); the value is parsed as YAML ('[1,2]', 'true', 'x.parquet')."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def _nest(keys: list[str], value) -> dict:
    out: dict = value
    for key in reversed(keys):
        out = {key: out}
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> dict:
    """DEFAULTS <- YAML file <- each ``--set key=value`` in order."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        try:
            cfg = _merge(cfg, loaded)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    for text in overrides:
        keys, value = parse_override(text)
        cfg = _merge(cfg, _nest(keys, value))
    return cfg


def save_config(cfg: dict, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))


PATH_KEYS = (("data", "path"), ("data", "item_emb"), ("ldiffrec", "partition"))


def absolute_paths(cfg: dict) -> dict:
    """Resolve the config's file paths against the current directory, so a saved run's
    config.yaml still finds its data from anywhere (and from Ray workers)."""
    cfg = copy.deepcopy(cfg)
    for section, key in PATH_KEYS:
        if cfg[section][key]:
            cfg[section][key] = str(Path(cfg[section][key]).expanduser().resolve())
    return cfg
