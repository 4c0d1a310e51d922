"""The data-parallel denoiser under DeepSpeed ZeRO (stage 1, 2 or 3), next to rank-local parts.

Only the denoiser goes into the DeepSpeed engine. The per-cluster VAE parts live on one
rank each (catalogue-parallel), so their gradients must NOT be averaged over ranks: they
keep a plain torch optimizer (``torch.optim.AdamW`` with the same settings is elementwise,
so two optimizers step exactly like one).

Making the gradients exact
--------------------------
Rank r computes its share ``L_r`` of the global-batch loss ``L = sum_r L_r`` (e.g. the
denoiser term ``sum over its B_r rows / B`` — divided by the GLOBAL batch size B, not B_r —
plus its clusters' VAE terms; see ``collectives``'s convention). The true gradient of a
replicated denoiser parameter is ``sum_r dL_r/dθ``, but DeepSpeed AVERAGES gradients over
the W data-parallel ranks, giving ``(1/W) sum_r``. ``hybrid_backward`` therefore runs
``engine.backward(W * L_r)``: DeepSpeed's average then equals the exact sum for the
denoiser, and the rank-local parameters, whose gradients were scaled by W too, are divided
by W again (a rank-local parameter's exact gradient already arrives by the collectives'
adjoints, no reduction needed). The result is exact for any split of rows, equal or not,
and for every ZeRO stage, because the scaling is outside DeepSpeed.

For a denoiser-only loss this is the same as giving each rank ``sum over its rows / B * W``.
Gradient clipping in the DeepSpeed config (``gradient_clipping``) clips the denoiser's
norm only (after the average, so it is the single-process denoiser norm); clip the local
parts yourself if the reference clips them.

On CPU (no CUDA)
----------------
``DS_ACCELERATOR=cpu`` is set before deepspeed is imported, and
``deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False`` stops DeepSpeed's
TorchBackend from JIT-building its shared-memory all-reduce C++ op (it builds it whenever
the op probes as compatible: 40 s on 2 cores here, minutes on a cold machine, once per
machine and cache). With a torch optimizer (not DeepSpeed's FusedAdam / DeepSpeedCPUAdam)
no other op is built, so ``deepspeed.initialize`` takes seconds (about 3 s the first time,
all of it imports: torch._dynamo and DeepSpeed's Muon module). bf16/fp16 are off, and so
is gradient clipping unless asked for (DeepSpeed 0.19's default ``gradient_clipping`` is
1.0, which silently clips); the process group is gloo. On GPU the defaults stay and the
process group is NCCL (``DS_ACCELERATOR=cpu`` forces the CPU set-up on a GPU machine too).
An existing torch process group is always used as it is.
"""
from __future__ import annotations

import copy
import os
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ...checkpoint import load_optimizer_state, optimizer_state
from .local import free_port

__all__ = ["import_deepspeed", "ensure_process_group", "ds_config", "init_denoiser_engine",
           "hybrid_backward", "gathered_state_dict", "gathered_grads", "full_optimizer_state",
           "load_denoiser_state"]

ADAM_KEYS = ("exp_avg", "exp_avg_sq")      # AdamW's per-element state (besides "step")


def _on_gpu() -> bool:
    """GPU mode: CUDA is present and DS_ACCELERATOR does not force the CPU."""
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def import_deepspeed():
    """Import deepspeed set up for this machine (see the module docstring for CPU)."""
    if not _on_gpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    if not _on_gpu():
        import deepspeed.ops
        # Item assignment on the (lazily probed, then cached) dict: DeepSpeed reads this
        # key when its TorchBackend is created and would otherwise JIT-compile the op.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.ops.__compatible_ops__["deepspeed_ccl_comm"] = False
        from deepspeed.accelerator import get_accelerator
        if get_accelerator().device_name() != "cpu":
            raise RuntimeError("deepspeed was imported with accelerator "
                               f"{get_accelerator().device_name()!r} on a machine without "
                               "CUDA; import scale_diffrec.train.distributed.zero (or set "
                               "DS_ACCELERATOR=cpu) before deepspeed")
    return deepspeed


def ensure_process_group() -> None:
    """Use the torch process group if there is one; else start one from the launcher's
    environment (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT), or a 1-rank group without it.
    Also sets LOCAL_RANK if missing (DeepSpeed asserts on it): the current CUDA device on
    GPU, 0 on CPU."""
    if not dist.is_initialized():
        backend = "nccl" if _on_gpu() else "gloo"
        if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            dist.init_process_group(backend)
        else:
            port = free_port()
            os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                               "MASTER_PORT": str(port)})
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}",
                                    rank=0, world_size=1)
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(torch.cuda.current_device() if _on_gpu() else 0)


def _deep_update(base: dict, over: dict) -> dict:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def ds_config(zero_stage: int, ds_overrides: dict | None = None,
              micro_batch_size: int = 1) -> dict:
    """The DeepSpeed config dict: ZeRO ``zero_stage``, no gradient accumulation, a torch
    optimizer allowed, NO gradient clipping (DeepSpeed's own default clips at 1.0), fp32
    (bf16/fp16 off; on GPU an override may turn bf16 on), quiet.
    ``ds_overrides`` is merged in last (nested dicts merged key by key), e.g.
    ``{"gradient_clipping": 1.0}`` or ``{"zero_optimization": {"overlap_comm": False}}``.
    ``train_micro_batch_size_per_gpu`` is bookkeeping only: batches are not fed by DeepSpeed.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    cfg = {
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": int(zero_stage)},
        "zero_allow_untested_optimizer": True,
        # DeepSpeed's default is 1.0 (0.19.x: constants.GRADIENT_CLIPPING_DEFAULT), which
        # silently clips; clipping is opt-in here ({"gradient_clipping": 1.0}).
        "gradient_clipping": 0.0,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _deep_update(cfg, dict(ds_overrides or {}))


def init_denoiser_engine(model: nn.Module, optimizer_cfg: dict | None = None,
                         zero_stage: int = 1, ds_overrides: dict | None = None,
                         micro_batch_size: int = 1):
    """Wrap the (replicated, data-parallel) denoiser in a DeepSpeed engine.

    model: the denoiser only (never the rank-local VAE parts). optimizer_cfg: keyword
    arguments of ``torch.optim.AdamW`` (lr, betas, eps, weight_decay, ...), or a list of
    param-group dicts under key "param_groups". Every rank must start from the same
    parameters (same seed). Returns the engine: call ``engine(x)`` for the forward,
    ``hybrid_backward(engine, loss_r, local_params)`` and ``engine.step()``.
    """
    deepspeed = import_deepspeed()
    ensure_process_group()
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    opt_kw = dict(optimizer_cfg or {})
    groups = opt_kw.pop("param_groups", None)
    params = groups if groups is not None else [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, **opt_kw)
    cfg = ds_config(zero_stage, ds_overrides, micro_batch_size)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
    return engine


def hybrid_backward(engine, loss: torch.Tensor, local_params: Iterable[torch.Tensor] = ()):
    """Backward of this rank's share ``L_r`` of the global loss (see the module docstring).

    Runs ``engine.backward(W * L_r)`` (W = the engine's data-parallel world size), then
    divides the gradients of ``local_params`` (this rank's non-replicated parameters) by W.
    Afterwards the engine holds the exact denoiser gradient of ``L = sum_r L_r`` (it is
    reduced inside ``engine.backward``/``engine.step``) and each local parameter its exact
    gradient. Every rank must call it (the reductions are collective), even with 0 rows.
    """
    w = engine.dp_world_size if hasattr(engine, "dp_world_size") else dist.get_world_size()
    local = list(local_params)
    if w == 1:
        engine.backward(loss)
        return
    old = [None if p.grad is None else p.grad.clone() for p in local]
    engine.backward(loss * w)
    for p, g0 in zip(local, old):
        if p.grad is None:
            continue
        if g0 is None:
            p.grad.div_(w)
        else:  # accumulate: keep what was there, scale only what this backward added
            p.grad.sub_(g0).div_(w).add_(g0)


def gathered_state_dict(engine_or_module) -> dict[str, torch.Tensor]:
    """Full (unpartitioned) copies of the parameters, on every rank, for any ZeRO stage."""
    module = getattr(engine_or_module, "module", engine_or_module)
    params = list(module.named_parameters())
    if any(hasattr(p, "ds_id") for _, p in params):
        deepspeed = import_deepspeed()
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            return {n: p.detach().clone() for n, p in params}
    return {n: p.detach().clone() for n, p in params}


def gathered_grads(engine) -> dict[str, torch.Tensor | None]:
    """Full reduced gradients of the engine's parameters (what ``engine.step()`` will apply),
    on every rank, for any ZeRO stage: call after the backward and before ``engine.step()``,
    on all ranks (ZeRO-3 gathers the partitions). With ``hybrid_backward`` these are the
    exact gradients of the global loss."""
    from deepspeed.utils import safe_get_full_grad
    out = {}
    for n, p in engine.module.named_parameters():
        g = safe_get_full_grad(p)
        out[n] = None if g is None else g.detach().clone()
    return out


def _flat_partitions(engine) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    """(the torch AdamW inside ZeRO 1-3, the flat fp32 partitions of this rank it steps)."""
    zero = engine.optimizer
    flat = (zero.fp32_partitioned_groups_flat if engine.zero_optimization_stage() == 3
            else zero.single_partition_of_fp32_groups)
    return zero.optimizer, list(flat)


def full_optimizer_state(engine) -> dict[str, dict[str, torch.Tensor]]:
    """{name: {"step", "exp_avg", "exp_avg_sq"}}: AdamW's state of every whole denoiser
    parameter, as one process's AdamW holds it, on every rank, for any ZeRO stage (the
    partitions are assembled by DeepSpeed's ``safe_get_full_optimizer_state``); empty before
    the first step. Collective."""
    named = list(engine.module.named_parameters())
    if engine.zero_optimization_stage() == 0:
        return optimizer_state(engine.optimizer, named)
    from deepspeed.utils import safe_get_full_optimizer_state
    base, flat = _flat_partitions(engine)
    states = [base.state[p] for p in flat if base.state.get(p)]
    if not states:
        return {}
    step = states[0]["step"]
    return {n: {"step": step.detach().clone(),
                **{k: safe_get_full_optimizer_state(p, k).detach().cpu().clone()
                   for k in ADAM_KEYS}}
            for n, p in named}


def load_denoiser_state(engine, params: dict[str, torch.Tensor], optimizer: dict) -> None:
    """Set the denoiser's parameters (``gathered_state_dict``'s form) and AdamW state
    (``full_optimizer_state``'s form), whatever the world size that wrote them: each rank
    keeps its own partition of both. Collective."""
    named = dict(engine.module.named_parameters())
    stage = engine.zero_optimization_stage()
    if stage == 3:
        deepspeed = import_deepspeed()
        with deepspeed.zero.GatheredParameters(list(named.values()), modifier_rank=0):
            if dist.get_rank() == 0:
                for k, p in named.items():
                    p.data.copy_(params[k])
    else:
        for k, p in named.items():
            p.data.copy_(params[k].to(p.device))
    if stage == 0:
        load_optimizer_state(engine.optimizer, list(named.items()), optimizer)
        return
    for k, p in named.items():                 # the fp32 master partitions
        _set_full(p, params[k].to(p.device))
    if not optimizer:
        return
    # AdamW creates its state at the first step and ZeRO 1/2 link each parameter's
    # fragment of it then: create it (the step count, zero moments) and link it the same way
    (base, flat), step = _flat_partitions(engine), next(iter(optimizer.values()))["step"]
    for p in flat:
        state = base.state[p]
        for key in ADAM_KEYS:
            state.setdefault(key, torch.zeros_like(p))
        state["step"] = step.detach().clone()
    if stage < 3:
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    for k, p in named.items():
        for key in ADAM_KEYS:
            _set_full(p, optimizer[k][key].to(p.device), key)


def _set_full(param, value: torch.Tensor, key: str | None = None) -> None:
    """This rank's partition of ``param``'s fp32 master copy (``key`` None) or AdamW state
    ``key`` from the whole ``value``: DeepSpeed's ``safe_set_full_fp32_param`` /
    ``safe_set_full_optimizer_state``, except under ZeRO 3, whose own (0.19) reads past the
    end of ``value`` on a rank whose partition is padded."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    if not hasattr(param, "ds_id"):
        if key is None:
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, key)
        return
    zero = param._z3_optimizer
    part, _ = zero._get_fp32_opt_state_partition(param, release_swap_buffers=False,
                                                 optim_state_key=key)
    start = part.numel() * zero._get_param_partition_rank(param)
    n = max(0, min(part.numel(), value.numel() - start))
    part.data.narrow(0, 0, n).copy_(value.flatten().narrow(0, start, n))
