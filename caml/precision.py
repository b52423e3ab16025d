"""Mixed precision of the network: bf16 autocast where the device computes bf16 natively.

That is every CUDA GPU with bf16 (compute capability 8.0 and later) and CPUs with AVX512-BF16 or AMX
(oneDNN's bf16 convolutions there run the V-Nets 2-3x faster than float32); on other CPUs bf16 is
emulated and slower than float32, so the network stays in float32. The losses always take float32
logits (:class:`caml.losses.CAMLObjective`).
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


def autocast_dtype(device: torch.device, amp: bool) -> Optional[torch.dtype]:
    """bf16 with ``amp`` on a device with native bf16, else None (float32)."""
    return torch.bfloat16 if amp and native_bf16(device) else None
