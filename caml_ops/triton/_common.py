"""Pieces shared by the Triton kernels."""
from __future__ import annotations

import struct

import triton
import triton.language as tl


@triton.jit
def float_arg(hi, lo, FP64: tl.constexpr):
    """A float kernel argument. Triton passes Python floats as float32, so a float64 run gets the
    value as the pair hi + lo (see :func:`split_float`) and rebuilds it here."""
    if FP64:
        x = tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    else:
        x = hi
    return x


def to_float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def split_float(x: float) -> tuple[float, float]:
    """x as float32 hi + lo, for :func:`float_arg`."""
    hi = to_float32(x)
    return hi, to_float32(x - hi)
