"""Every enumerated config value, as a named type (the config schema in ``schema.py`` uses
them; code compares config values against their members).

Each choice is a ``str`` subclass whose members equal, hash and format as their values
(``Schedule.linear_var == "linear-var"``, ``f"{Model.diffrec}"`` is ``diffrec``), so a
config dict holding plain strings (as ``load_config`` returns it) compares equal to the
members. To add a value (e.g. a new model), add a member here: the schema, the error
messages and the README's lists follow.
"""
from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """Base: a member is its value for ==, hash, str() and format()."""
    __hash__ = str.__hash__
    __format__ = str.__format__

    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class Model(Choice):
    """``model``: the recommender (T-/LT-DiffRec are DiffRec/L-DiffRec + data.time_weights;
    the baselines mostpop, itemknn, ease, als: models/baselines.py)."""
    diffrec = "diffrec"
    ldiffrec = "ldiffrec"
    multvae = "multvae"
    mostpop = "mostpop"
    itemknn = "itemknn"
    ease = "ease"
    als = "als"
    diffurec = "diffurec"         # sequential: models/diffurec.py, data as Sequences


class Convention(Choice):
    """``convention``: how per-user metrics are averaged (metrics.py)."""
    reference = "reference"
    users_with_truth = "users_with_truth"


class Precision(Choice):
    """``precision``: float32, TF32 matmuls, or bfloat16 autocast."""
    fp32 = "fp32"
    tf32 = "tf32"
    bf16 = "bf16"


class DataSource(Choice):
    """``data.source``."""
    synthetic = "synthetic"
    diffrec_npy = "diffrec_npy"
    parquet = "parquet"
    dataset = "dataset"           # a directory written by ``scale-diffrec prepare``
    diffurec_release = "diffurec_release"   # the DiffuRec authors' files (model diffurec)


class SplitRule(Choice):
    """``data.split.rule`` (data/split.py)."""
    random = "random"
    time = "time"


class MeanType(Choice):
    """``diffusion.mean_type``: what the denoiser predicts."""
    x0 = "x0"
    eps = "eps"


class Schedule(Choice):
    """``diffusion.schedule``: the noise schedule (schedules.make_betas)."""
    linear_var = "linear-var"
    linear = "linear"
    cosine = "cosine"
    sqrt = "sqrt"
    trunc_lin = "trunc_lin"


class StepSampler(Choice):
    """``diffusion.sampler``: LossSecondMomentResampler (importance) or uniform."""
    importance = "importance"
    uniform = "uniform"


class Activation(Choice):
    """``ldiffrec.act``: the encoders' and decoders' activation."""
    tanh = "tanh"
    relu = "relu"
    sigmoid = "sigmoid"
    leaky_relu = "leaky_relu"


class ReconTarget(Choice):
    """``ldiffrec.recon_target``: reconstruct the dropped-out input (reference) or x."""
    dropped = "dropped"
    clean = "clean"


class EmbeddingSource(Choice):
    """``ldiffrec.embeddings``: item embeddings for the k-means partition."""
    file = "file"
    svd = "svd"
    auto = "auto"


class WarmStart(Choice):
    """``ldiffrec.warm_start``: how cluster encoders and decoders start (models/ldiffrec.py):
    the paper's initialisation, or from per-cluster ALS item factors."""
    none = "none"
    als = "als"


class Placement(Choice):
    """``distributed.placement``: balance item counts or parameter bytes over workers."""
    items = "items"
    params = "params"


class DiffuRecSchedule(Choice):
    """DiffuRec's noise schedules by their official names (schedules.named_betas); its
    "linear" is Ho et al.'s scaled to T steps, unlike ``Schedule.linear``."""
    linear = "linear"
    cosine = "cosine"
    sqrt = "sqrt"
    trunc_cos = "trunc_cos"
    trunc_lin = "trunc_lin"
    pw_lin = "pw_lin"


class DiffuRecSampler(Choice):
    """DiffuRec's step samplers by their official names (samplers.named_sampler):
    uniform, lossaware (LossSecondMomentResampler) and fixstep (FixSampler)."""
    uniform = "uniform"
    lossaware = "lossaware"
    fixstep = "fixstep"
