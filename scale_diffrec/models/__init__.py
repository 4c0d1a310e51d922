"""The model family behind one constructor: ``build_model(cfg, n_items, partition)``.

T-DiffRec and LT-DiffRec are DiffRec and L-DiffRec trained on time-weighted interactions
(``data.time_weights``): the weighting lives in the data, not in the model. The baselines
(most-popular, ItemKNN, EASE, ALS: ``baselines.py``) are ``FittedRecommender``s.
"""
from __future__ import annotations

from ..choices import Model
from ..config import typed
from ..schema import Config
from . import baselines
from .base import FittedRecommender, ItemHead, Progress, Recommender
from .diffrec import DiffRec
from .diffurec import DiffuRec
from .ldiffrec import LDiffRec
from .multvae import MultVAE

MODELS = Model.values()


def build_model(cfg: Config | dict, n_items: int, partition=None, train=None,
                shard=None) -> Recommender:
    """The config's ``model`` (``choices.Model``), built by its ``from_config(cfg: Config,
    ...)``; a dict is made ``config.typed`` first (ConfigError naming the key at fault).
    L-DiffRec needs the item partition (ValueError without one; DiffuRec's is optional),
    ``train`` (CSR) is what its warm start is fitted on (``ldiffrec.warm_start``; None when
    a checkpoint's weights follow), and ``shard`` (``shard.Shard``) the clusters this
    process owns in a W-worker run (None: all)."""
    cfg = typed(cfg)
    kind = cfg.model
    if kind == Model.diffrec:
        return DiffRec.from_config(cfg, n_items)
    if kind == Model.multvae:
        return MultVAE.from_config(cfg, n_items)
    if kind == Model.diffurec:              # partition None: one cluster
        return DiffuRec.from_config(cfg, n_items, partition, shard)
    if kind in (Model.mostpop, Model.itemknn, Model.ease, Model.als):
        if kind == Model.mostpop:
            return baselines.MostPopular(n_items)
        return {Model.itemknn: baselines.ItemKNN, Model.ease: baselines.EASE,
                Model.als: baselines.ALS}[kind].from_config(cfg, n_items)
    if partition is None:
        raise ValueError("model 'ldiffrec' needs an item partition")
    return LDiffRec.from_config(cfg, n_items, partition, train=train, shard=shard)


def parameter_groups(model: Recommender, cfg: Config | dict) -> list[dict]:
    """Optimizer groups: the model's own split (L-DiffRec: autoencoder vs denoiser) or one,
    at the config's ``lr`` and ``weight_decay``."""
    cfg = typed(cfg)
    if hasattr(model, "param_groups"):
        return model.param_groups(cfg.lr, cfg.weight_decay)
    return [{"params": list(model.parameters()), "lr": cfg.lr,
             "weight_decay": cfg.weight_decay}]


__all__ = ["FittedRecommender", "ItemHead", "Progress", "Recommender", "build_model", "parameter_groups", "MODELS"]
