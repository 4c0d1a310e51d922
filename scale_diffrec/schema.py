"""The run configuration's ONE typed schema (pydantic v2): every key, its type, range and default.

``Config`` below lists every section and key; choices are the named types of ``choices.py``;
cross-key rules are the model validators, which name the key at fault with ``key_error``
(``config.py`` turns the first failure into one ``ConfigError`` line naming the dotted
key). Unknown keys are refused (``extra="forbid"``; only ``distributed.deepspeed`` is
free-form, passed to DeepSpeed). ``DEFAULTS`` is the plain nested dict of an empty config
(choices as their string values), ``PATH_KEYS`` the keys that hold file paths.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Optional

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError

from .choices import (Activation, Convention, DataSource, DiffuRecSampler, DiffuRecSchedule,
                      EmbeddingSource, MeanType, Model, Placement, Precision, ReconTarget,
                      Schedule, SplitRule, StepSampler, WarmStart)
from .schedules import make_betas, named_betas


# ------------------------------------------------------------------------- value types
def _number(value):
    """YAML 1.1 reads '1e-3' as a string: numeric strings become numbers; bools are not
    numbers; numpy scalars become Python ones."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number, got {value}")
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        value = value.item()
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


_Num = BeforeValidator(_number)
Int = Annotated[int, _Num]
PositiveInt = Annotated[int, _Num, Field(ge=1)]
NonNegativeInt = Annotated[int, _Num, Field(ge=0)]
PositiveFloat = Annotated[float, _Num, Field(gt=0)]
NonNegativeFloat = Annotated[float, _Num, Field(ge=0)]
Fraction = Annotated[float, _Num, Field(gt=0, lt=1)]          # open (0, 1)
Probability = Annotated[float, _Num, Field(ge=0, le=1)]       # closed [0, 1]
DropoutRate = Annotated[float, _Num, Field(ge=0, lt=1)]       # [0, 1)
Widths = Annotated[list[PositiveInt], Field(min_length=1)]   # layer widths, non-empty


def _use_gpu(value):
    if isinstance(value, bool) or value == "auto":
        return value
    raise ValueError(f"must be true, false or 'auto', got {value!r}")


UseGpu = Annotated[Any, PlainValidator(_use_gpu)]
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
SELECT_METRIC = re.compile(r"(recall|ndcg|precision|mrr|hr)@(\d+)")


def key_error(key: str, text: str) -> PydanticCustomError:
    """A cross-key rule's failure, reported at ``key`` (relative to the model raising it);
    ``{s}`` in ``text`` becomes the model's dotted path (to name sibling keys)."""
    return PydanticCustomError("config_key", "{text}", {"key": key, "text": text})


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=False)


# ----------------------------------------------------------------------------- data
class SplitConfig(_Section):
    """``data.split``: per-user train/valid/test split of parquet and synthetic data."""
    rule: SplitRule = SplitRule.random
    valid: Fraction = 0.1
    test: Fraction = 0.2
    seed: NonNegativeInt = 0

    @model_validator(mode="after")
    def _room_for_train(self):
        if self.valid + self.test >= 1.0:
            raise key_error("valid", f"+ '{{s}}.test' must be < 1, got {self.valid} + "
                                     f"{self.test}")
        return self


class TimeWeights(_Section):
    """``data.time_weights``: T-DiffRec's linear weights, oldest w_min .. newest w_max."""
    w_min: NonNegativeFloat
    w_max: NonNegativeFloat

    @model_validator(mode="after")
    def _ordered(self):
        if self.w_min > self.w_max:
            raise key_error("w_min", f"({self.w_min}) must not exceed '{{s}}.w_max' "
                                     f"({self.w_max})")
        return self


class SyntheticConfig(_Section):
    """``data.synthetic``: the seeded generator's parameters (data/synthetic.py)."""
    n_users: PositiveInt = 2000
    n_items: PositiveInt = 1000
    n_clusters: PositiveInt = 8
    mean_items_per_user: Annotated[float, _Num, Field(ge=1)] = 30.0
    popularity_exponent: NonNegativeFloat = 1.0
    cluster_affinity: Probability = 0.8
    seed: NonNegativeInt = 0
    clusters_per_user: PositiveInt = 2
    min_items_per_user: PositiveInt = 3
    activity_sigma: NonNegativeFloat = 0.6

    @model_validator(mode="after")
    def _clusters_fit(self):
        if self.n_clusters > self.n_items:
            raise key_error("n_clusters", f"must be at most n_items ({self.n_items}), got "
                                          f"{self.n_clusters}")
        return self


class DataConfig(_Section):
    source: DataSource = DataSource.synthetic
    path: Optional[str] = None            # required for diffrec_npy, parquet and dataset
    name: Optional[str] = None
    item_emb: Optional[str] = None        # item embeddings (.npy or parquet)
    split: SplitConfig = Field(default_factory=SplitConfig)
    time_weights: Optional[TimeWeights] = None   # -> T-DiffRec / LT-DiffRec
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    n_items: Optional[PositiveInt] = None  # declared catalogue size (ids past it: error)

    @model_validator(mode="after")
    def _path_given(self):
        if self.source != DataSource.synthetic and not self.path:
            raise key_error("path", f"is required for data.source '{self.source}'")
        return self


# ------------------------------------------------------------------------ the models
class DiffusionConfig(_Section):
    mean_type: MeanType = MeanType.x0
    steps: Annotated[int, _Num, Field(ge=2)] = 40
    schedule: Schedule = Schedule.linear_var
    noise_scale: PositiveFloat = 0.005
    noise_min: PositiveFloat = 0.005
    noise_max: PositiveFloat = 0.01
    sampling_steps: NonNegativeInt = 0    # inference noises x0 to this step (<= steps)
    sampling_noise: bool = False
    reweight: bool = True
    sampler: StepSampler = StepSampler.importance
    history_per_step: PositiveInt = 10
    uniform_prob: Probability = 0.001

    @model_validator(mode="after")
    def _schedule_is_a_diffusion(self):
        """noise_min < noise_max (linear schedules), every beta in (0, 1) as
        ``schedules.make_betas`` computes them, sampling_steps <= steps."""
        linear = self.schedule in (Schedule.linear, Schedule.linear_var)
        if linear and self.noise_min >= self.noise_max:
            raise key_error("noise_min", f"({self.noise_min}) must be < '{{s}}.noise_max' "
                                         f"({self.noise_max}) for the {self.schedule} schedule")
        if self.schedule == Schedule.linear_var and self.noise_scale * self.noise_max >= 1:
            raise key_error("noise_scale", f"x noise_max = {self.noise_scale * self.noise_max:g}"
                                           f" must be < 1 (it is the variance 1 - alpha_bar "
                                           f"of the last step)")
        betas = make_betas(self.schedule, self.steps, self.noise_scale, self.noise_min,
                           self.noise_max)
        bad = [t for t, b in enumerate(betas) if not 0.0 < b < 1.0]
        if bad:
            key = "noise_scale" if linear else "schedule"
            raise key_error(key, f"gives beta_{bad[0]} = {betas[bad[0]]:g} for the "
                                 f"{self.schedule} schedule with {self.steps} steps: every "
                                 f"beta must lie in (0, 1)")
        if self.sampling_steps > self.steps:
            raise key_error("sampling_steps", f"({self.sampling_steps}) must not exceed "
                                              f"'{{s}}.steps' ({self.steps})")
        return self


class DenoiserConfig(_Section):
    dims: Widths = [200, 600]
    emb_size: PositiveInt = 10
    norm: bool = False
    dropout: DropoutRate = 0.5
    residual: bool = False        # x0_hat = x_t + f(x_t, t), f's last Linear at zero (an
                                  #   identity at the start; models/denoiser.py)


class MultVAEConfig(_Section):
    dims: Widths = [200, 600]
    dropout: DropoutRate = 0.5
    anneal_cap: NonNegativeFloat = 0.2
    total_anneal_steps: NonNegativeInt = 200000   # 0: the KL weight is anneal_cap at once


class LDiffRecConfig(_Section):
    """Semantics and sources: scale_diffrec/models/ldiffrec.py."""
    n_clusters: PositiveInt = 2
    in_dims: Widths = [300]               # reference flag order: latent size first
    out_dims: list[PositiveInt] = []      # [] = one Linear(latent -> I); else per cluster
                                          # (C > 1: mirrors E_c, values unused, as AE)
    mlp_dims: Widths = [300]
    lamda: NonNegativeFloat = 0.03        # diffusion-loss weight: max((1 - epochs /
    anneal_cap: NonNegativeFloat = 0.005  #   anneal_steps) * lamda, anneal_cap)
    anneal_steps: NonNegativeInt = 500
    vae_anneal_cap: NonNegativeFloat = 0.3   # KL weight: min(cap, batches / steps)
    vae_anneal_steps: NonNegativeInt = 200
    lr_vae: Optional[PositiveFloat] = None           # autoencoder lr; None = lr
    weight_decay_vae: Optional[NonNegativeFloat] = None  # None = weight_decay
    act: Activation = Activation.tanh
    reparam: bool = True                  # z = mu + eps * std in training (the
                                          #   reference's --reparam); false: z = mu
    dropout: DropoutRate = 0.1
    recon_target: ReconTarget = ReconTarget.dropped
    embeddings: EmbeddingSource = EmbeddingSource.auto
    emb_dim: PositiveInt = 64             # svd embedding dimensions
    kmeans_niter: PositiveInt = 50
    logit_chunk: Optional[PositiveInt] = None   # items per chunk of the training
                                                # logsumexp; None: from chunk_mib
    cluster_capacity: Optional[Annotated[float, _Num, Field(ge=1)]] = None  # x I / C
    partition: Optional[str] = None       # a saved partition artifact to reuse
    warm_start: WarmStart = WarmStart.none  # als: encoders/decoders from per-cluster ALS
    als_reg: NonNegativeFloat = 0.1       #   the warm start's ALS: L2 regularisation,
    als_alpha: NonNegativeFloat = 10.0    #   confidence 1 + alpha x (Hu et al. 2008),
    als_iters: PositiveInt = 15           #   alternating sweeps (embeddings.als_factors)
    frozen_autoencoder_epochs: NonNegativeInt = 0  # first epochs train the denoiser only,
                                          #   on the autoencoder's latents (0: joint)

    @model_validator(mode="after")
    def _every_cluster_gets_a_width(self):
        if min(self.in_dims) < self.n_clusters:
            raise key_error("in_dims", f"{self.in_dims} has a width below n_clusters "
                                       f"({self.n_clusters}): every cluster needs at least "
                                       f"1 of each width")
        if self.warm_start != WarmStart.none and (len(self.in_dims) != 1 or (
                self.n_clusters == 1 and self.out_dims)):
            raise key_error("warm_start", "needs one-layer encoders and decoders: a single "
                                          "'{s}.in_dims' entry, and '{s}.out_dims' [] when "
                                          "'{s}.n_clusters' is 1")
        return self


def _spec(value):
    """A ``space_timesteps`` spec: YAML reads "8" as a number."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class DiffuRecConfig(_Section):
    """The ``diffurec`` section (model ``diffurec``, ``models/diffurec.py``): the released
    settings (official src/main.py defaults; ../shared/DIFFUREC.md) as defaults. The
    training settings are the top-level keys (released: ``seed`` 1997, ``lr`` 1e-3,
    ``batch_size`` 512, ``lr_decay_every`` 100, ``lr_decay`` 0.1, ``eval_every`` 20,
    ``patience`` 100 epochs = 5 validations; ``configs/diffurec-*.yaml``).
    ``sampler`` defaults to uniform: the released ``lossaware`` is never updated, so uniform
    is what the released runs did. ``reverse_steps``: None runs every one of the ``steps``
    reverse steps at inference, a ``space_timesteps`` spec ("8", "4,4", "ddim8") fewer.
    ``logit_chunk``: items per chunk of the training logsumexp (None: ``chunk_mib``).
    ``mask_history``: evaluation excludes the items of each user's input from the ranking
    (the official protocol, false, masks nothing). ``n_clusters``: E's rows in this many
    blocks of consecutive item ids (``Partition.blocks``), placed on the workers of a
    W-worker run (W <= n_clusters; the checkpoints are cut by block, so any W' resumes)."""
    hidden: PositiveInt = 128
    blocks: PositiveInt = 4
    heads: PositiveInt = 4
    dropout: DropoutRate = 0.1
    emb_dropout: DropoutRate = 0.3
    max_len: PositiveInt = 50
    steps: Annotated[int, _Num, Field(ge=2)] = 32
    schedule: DiffuRecSchedule = DiffuRecSchedule.trunc_lin
    sampler: DiffuRecSampler = DiffuRecSampler.uniform
    lambda_uncertainty: PositiveFloat = 0.001
    rescale_timesteps: bool = True
    reverse_steps: Optional[Annotated[str, BeforeValidator(_spec)]] = None
    logit_chunk: Optional[PositiveInt] = None
    mask_history: bool = False
    n_clusters: PositiveInt = 1           # E's row blocks, placed on the workers (>= W)

    @model_validator(mode="after")
    def _process(self):
        if self.hidden % self.heads:
            raise key_error("heads", f"({self.heads}) must divide '{{s}}.hidden' "
                                     f"({self.hidden})")
        try:
            named_betas(self.schedule.value, self.steps)
        except ValueError as err:
            raise key_error("schedule", f"({self.schedule}) with {self.steps} steps: "
                                        f"{err}") from None
        if self.reverse_steps is not None:
            from .models.respace import space_timesteps    # torch: only when it is set
            try:
                space_timesteps(self.steps, self.reverse_steps)
            except ValueError as err:
                raise key_error("reverse_steps", f"({self.reverse_steps!r}) for "
                                                 f"{self.steps} steps: {err}") from None
        return self


class ItemKNNConfig(_Section):
    k: PositiveInt = 100                  # neighbours per item
    shrink: NonNegativeFloat = 10.0       # cosine shrinkage


class EASEConfig(_Section):
    lamda: PositiveFloat = 500.0          # L2 weight
    max_items: PositiveInt = 20000        # refused above (an I x I dense inverse)


class ALSConfig(_Section):
    """implicit's AlternatingLeastSquares."""
    factors: PositiveInt = 64
    regularization: NonNegativeFloat = 0.01
    iterations: PositiveInt = 15
    alpha: PositiveFloat = 1.0
    use_gpu: UseGpu = "auto"              # true | false | auto (implicit's CUDA when built)


class DistributedConfig(_Section):
    workers: PositiveInt = 1              # <= ldiffrec.n_clusters
    use_gpu: UseGpu = "auto"              # true | false | auto (a GPU per worker)
    address: Optional[str] = None         # Ray cluster address (None: RAY_ADDRESS / local)
    zero_stage: Annotated[int, _Num, Field(ge=0, le=3)] = 1
    max_failures: Annotated[int, _Num, Field(ge=-1)] = 0   # -1: restart without limit
    placement: Placement = Placement.items
    deepspeed: dict[str, Any] = {}        # free-form, merged into DeepSpeed's config


# The model sections each model reads (None: every key; a tuple: those keys only); a value
# other than the default anywhere else is ignored by the run, and said (``unread_keys``).
READS: dict[Model, dict[str, tuple[str, ...] | None]] = {
    Model.diffrec: {"diffusion": None, "denoiser": None},
    Model.ldiffrec: {"diffusion": None, "ldiffrec": None,       # its MLP: ldiffrec.mlp_dims
                     "denoiser": ("emb_size", "norm", "dropout", "residual")},
    Model.multvae: {"multvae": None},
    Model.mostpop: {},
    Model.itemknn: {"itemknn": None},
    Model.ease: {"ease": None},
    Model.als: {"als": None},
    Model.diffurec: {"diffurec": None},
}
MODEL_SECTIONS = ("diffusion", "denoiser", "multvae", "ldiffrec", "itemknn", "ease", "als",
                  "diffurec")


def model_reads(model: Model, key: str) -> bool:
    """Whether ``model`` reads the dotted config ``key`` (keys outside the model sections:
    always)."""
    section, _, rest = key.partition(".")
    if section not in MODEL_SECTIONS:
        return True
    keys = READS[model].get(section, ())
    return keys is None or rest.split(".")[0] in keys


def unread_keys(config: "Config") -> tuple[list[str], str]:
    """(['section.key = value', ...] set away from their defaults in model sections that
    ``config.model`` does not read, the sections it reads) - a config written for another
    model, or a key that does nothing here (``train`` logs them as a warning)."""
    unread = []
    for section in MODEL_SECTIONS:
        value = getattr(config, section)
        default = type(value)()
        unread += [f"{section}.{key} = {getattr(value, key)}" for key in type(value).model_fields
                   if not model_reads(config.model, f"{section}.{key}")
                   and getattr(value, key) != getattr(default, key)]
    return unread, model_sections(config.model)


def model_sections(model: Model) -> str:
    """The model sections ``model`` reads, for messages ('diffusion, ldiffrec, denoiser.{emb_size,...}')."""
    read = ", ".join(s if k is None else f"{s}.{{{','.join(k)}}}" for s, k in READS[model].items())
    return read or "no model section"


class Config(_Section):
    """The whole run configuration (``load_config`` validates against it)."""
    model: Model = Model.diffrec
    seed: NonNegativeInt = 0
    epochs: PositiveInt = 100
    batch_size: PositiveInt = 400
    lr: PositiveFloat = 1.0e-3
    weight_decay: NonNegativeFloat = 0.0
    lr_decay_every: Optional[PositiveInt] = None   # epochs: lr x lr_decay every this many
    lr_decay: Fraction = 0.1                        #   (StepLR); None: a constant lr
    eval_every: PositiveInt = 5           # epochs between validation passes
    patience: PositiveInt = 20            # stop after this many epochs without a better one
    select_metric: str = "recall@20"      # METRIC@K, K in topk
    topk: Annotated[list[PositiveInt], Field(min_length=1)] = [10, 20, 50, 100]
    convention: Convention = Convention.reference
    eval_batch_size: PositiveInt = 1000
    device: str = "auto"                  # auto (CUDA when torch sees a GPU) | cpu | cuda[:N]
    precision: Precision = Precision.fp32
    chunk_mib: Optional[PositiveFloat] = None   # MiB of one [B, chunk] block of logits /
                                                # scores; None: 8 on the CPU, 1024 on a GPU
    data: DataConfig = Field(default_factory=DataConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    denoiser: DenoiserConfig = Field(default_factory=DenoiserConfig)
    multvae: MultVAEConfig = Field(default_factory=MultVAEConfig)
    ldiffrec: LDiffRecConfig = Field(default_factory=LDiffRecConfig)
    itemknn: ItemKNNConfig = Field(default_factory=ItemKNNConfig)
    ease: EASEConfig = Field(default_factory=EASEConfig)
    als: ALSConfig = Field(default_factory=ALSConfig)
    diffurec: DiffuRecConfig = Field(default_factory=DiffuRecConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not DEVICE.fullmatch(value):
            raise ValueError(f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")
        return value

    @field_validator("select_metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        if not SELECT_METRIC.fullmatch(value):
            raise ValueError(f"must be METRIC@K with METRIC one of recall, ndcg, precision, "
                             f"mrr, hr, got {value!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        k = int(SELECT_METRIC.fullmatch(self.select_metric).group(2))
        if k not in self.topk:
            raise key_error("select_metric", f"({self.select_metric}) needs K = {k} in 'topk' "
                                             f"(got {self.topk})")
        sequential = self.model == Model.diffurec
        if sequential and self.data.source == DataSource.diffrec_npy:
            raise key_error("data.source", f"('{self.data.source}') holds no sequences (no "
                                           f"order): model 'diffurec' reads diffurec_release, "
                                           f"parquet, dataset or synthetic data")
        if not sequential and self.data.source == DataSource.diffurec_release:
            raise key_error("data.source", f"('{self.data.source}') is sequential data: it "
                                           f"needs model 'diffurec', got '{self.model}'")
        if sequential and self.data.time_weights is not None:
            raise key_error("data.time_weights", "are T-DiffRec's interaction weights: "
                                                 "model 'diffurec' reads the sequence order")
        if self.denoiser.residual and self.model != Model.ldiffrec:
            raise key_error("denoiser.residual", f"is L-DiffRec's (a latent denoiser): model "
                                                 f"'{self.model}' scores items with the "
                                                 f"denoiser's last Linear, and x_t + f is no "
                                                 f"inner product to serve")
        sharded = (Model.ldiffrec, Model.diffurec)
        if (self.distributed.workers > 1 or self.distributed.address) and \
                self.model not in sharded:
            raise key_error("model", f"('{self.model}') cannot train distributed: distributed "
                                     f"training shards the catalogue of L-DiffRec and "
                                     f"DiffuRec; model '{self.model}' trains in one process "
                                     f"(set distributed.workers=1 and no distributed.address)")
        if self.model in sharded:
            workers, section = self.distributed.workers, f"{self.model}.n_clusters"
            clusters = getattr(self, str(self.model)).n_clusters
            if workers > clusters:
                raise key_error("distributed.workers",
                                f"is {workers} but {section} is {clusters}: every worker "
                                f"holds at least one item cluster (use --workers <= "
                                f"{clusters} or more clusters)")
        return self


DEFAULTS: dict = Config().model_dump(mode="json")
PATH_KEYS = (("data", "path"), ("data", "item_emb"), ("ldiffrec", "partition"))
