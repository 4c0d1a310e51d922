"""Where a run computes and in which precision: the ``device`` and ``precision`` config keys.

``device``: ``auto`` (CUDA device 0 when torch sees a GPU, else the CPU), ``cpu``, ``cuda``
or ``cuda:N``. ``precision``:

* ``fp32``: everything in float32 (matmuls at full fp32 precision);
* ``tf32``: float32 tensors, CUDA matmuls on TF32 tensor cores
  (``torch.set_float32_matmul_precision("high")``); on the CPU the same as fp32;
* ``bf16``: ``torch.autocast(dtype=bfloat16)`` around forward passes, so the matmuls of
  encoder, denoiser and decoder run in bfloat16 while parameters, optimizer state and
  reductions stay float32: the catalogue logsumexp / softmax is accumulated in fp32
  (``LinearLogSumExp`` casts each chunk's logits to fp32; autocast keeps ``log_softmax``
  in fp32), and scores are cast to fp32 before ranking.

Chunk sizes follow a memory budget: ``chunk_items(rows, device)`` is how many items fit one
[rows, chunk] float32 block of logits or scores in ``chunk_mib`` MiB (default: 8 MiB on the
CPU, about the L2/L3 cache share of a core; 1 GiB on a GPU, where large blocks keep the
tensor cores busy).
"""
from __future__ import annotations

import contextlib
import re

import torch

from .errors import ConfigError

PRECISIONS = ("fp32", "tf32", "bf16")
DEFAULT_CHUNK_MIB = {"cpu": 8, "cuda": 1024}


def resolve_device(setting: str | torch.device | None = "auto") -> torch.device:
    """The torch device a ``device`` setting names; ``auto`` = cuda:0 if torch sees a GPU.

    Raises ConfigError when CUDA is asked for but torch sees no GPU (or not that many)."""
    if isinstance(setting, torch.device):
        return setting
    text = "auto" if setting is None else str(setting).strip().lower()
    if text == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise ConfigError(f"config key 'device': expected auto, cpu, cuda or cuda:N, "
                          f"got {setting!r}")
    index = int(match.group(1) or 0)
    if not torch.cuda.is_available():
        raise ConfigError(f"config key 'device': {setting!r} asked for, but torch sees no "
                          f"GPU (torch {torch.__version__}; install the CUDA build, or use "
                          f"device: auto / cpu)")
    if index >= torch.cuda.device_count():
        raise ConfigError(f"config key 'device': {setting!r} asked for, but torch sees "
                          f"{torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", index)


def describe(device: torch.device) -> str:
    """One line for the start-up log: 'cuda:0 (NVIDIA H200, 139.8 GiB)' or 'cpu (2 threads)'."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 2 ** 30:.1f} GiB)"
    return f"cpu ({torch.get_num_threads()} threads)"


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"config key 'precision': expected one of {PRECISIONS}, "
                          f"got {precision!r}")
    return precision


def set_matmul_precision(precision: str) -> None:
    """Process-wide fp32 matmul mode: TF32 for ``tf32``, full fp32 otherwise."""
    torch.set_float32_matmul_precision("high" if check_precision(precision) == "tf32"
                                      else "highest")


def autocast(device: torch.device, precision: str):
    """The context for forward passes: bf16 autocast for ``bf16``, nothing otherwise."""
    if check_precision(precision) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def chunk_items(rows: int, device: torch.device | str, chunk_mib: float | None = None) -> int:
    """Items per chunk so that a [rows, chunk] float32 block fits ``chunk_mib`` MiB
    (default ``DEFAULT_CHUNK_MIB`` of the device type); at least 1."""
    kind = torch.device(device).type
    mib = DEFAULT_CHUNK_MIB.get(kind, DEFAULT_CHUNK_MIB["cpu"]) if chunk_mib is None \
        else float(chunk_mib)
    return max(1, int(mib * 2 ** 20) // (4 * max(int(rows), 1)))


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's tensors are: its first parameter's device, else its first buffer's
    (the fitted baselines hold only buffers), else the CPU."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (for timing); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> float | None:
    """Peak memory torch allocated on a CUDA device since the last reset (MiB); None on CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2 ** 20
