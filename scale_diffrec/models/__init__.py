"""The model family behind one constructor: ``build_model(cfg, n_items, partition)``.

T-DiffRec and LT-DiffRec are DiffRec and L-DiffRec trained on time-weighted interactions
(``data.time_weights``): the weighting lives in the data, not in the model. The baselines
(most-popular, ItemKNN, EASE, ALS: ``baselines.py``) are ``FittedRecommender``s.
"""
from __future__ import annotations

from .base import FittedRecommender, ItemHead, Progress, Recommender

MODELS = ("diffrec", "ldiffrec", "multvae", "mostpop", "itemknn", "ease", "als")


def build_model(cfg: dict, n_items: int, partition=None) -> Recommender:
    kind = cfg["model"]
    if kind == "diffrec":
        from .diffrec import DiffRec
        return DiffRec.from_config(cfg, n_items)
    if kind == "multvae":
        from .multvae import MultVAE
        return MultVAE.from_config(cfg, n_items)
    if kind in ("mostpop", "itemknn", "ease", "als"):
        from . import baselines
        if kind == "mostpop":
            return baselines.MostPopular(n_items)
        return {"itemknn": baselines.ItemKNN, "ease": baselines.EASE,
                "als": baselines.ALS}[kind].from_config(cfg, n_items)
    if kind == "ldiffrec":
        from .ldiffrec import LDiffRec
        if partition is None:
            raise ValueError("model 'ldiffrec' needs an item partition")
        return LDiffRec.from_config(cfg, n_items, partition)
    raise ValueError(f"config key 'model': unknown model '{kind}' (expected one of {MODELS})")


def parameter_groups(model: Recommender, cfg: dict) -> list[dict]:
    """Optimizer groups: the model's own split (L-DiffRec: autoencoder vs denoiser) or one."""
    if hasattr(model, "param_groups"):
        return model.param_groups(cfg["lr"], cfg["weight_decay"])
    return [{"params": list(model.parameters()), "lr": cfg["lr"],
             "weight_decay": cfg["weight_decay"]}]


__all__ = ["FittedRecommender", "ItemHead", "Progress", "Recommender", "build_model", "parameter_groups", "MODELS"]
