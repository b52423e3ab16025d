"""Mixed precision of the network: bf16 autocast where the device computes bf16 natively.

On CUDA (``TrainConfig.amp``, on by default) every GPU with bf16 (compute capability 8.0 and later).
On a CPU only when asked (``TrainConfig.cpu_amp``, ``--cpu-amp``) and only on CPUs with AVX512-BF16
or AMX, where oneDNN's bf16 convolutions run the V-Nets 2.6x faster than float32 (at the paper's
size); elsewhere bf16 is emulated and slower than float32. It is off by default on CPUs: on the small
preset it made one seed of five end 0.33 Dice lower (docs/design.md, "Speed of the training
iteration"). The losses always take float32 logits (:class:`caml.losses.CAMLObjective`).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

__all__ = ["native_bf16", "autocast_dtype"]

_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset:
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), ()))
    except OSError:  # not Linux: no flags to read, so no claim of native bf16
        return frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (so autocast to bf16 pays)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(flag in _cpu_flags() for flag in _CPU_BF16_FLAGS)
    return False


def autocast_dtype(device: torch.device, amp: bool, cpu_amp: bool = False) -> Optional[torch.dtype]:
    """bf16 where asked (``amp`` on CUDA, ``cpu_amp`` on a CPU) and native, else None (float32)."""
    asked = amp if device.type == "cuda" else cpu_amp
    return torch.bfloat16 if asked and native_bf16(device) else None
