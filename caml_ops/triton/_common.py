"""Pieces shared by the Triton kernels: scalar arguments, tiles, matmuls, the dropout RNG."""
from __future__ import annotations

import contextlib
import os
import struct

import torch
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


@triton.jit
def dropout_keep(index, seed_lo, seed_hi, offset, threshold):
    """The attention dropout spec of csrc/philox.h: True where element `index` (int64) is kept.

    Word 0 of Philox4x32-10 with key (seed_lo, seed_hi) and counter (lo32, hi32 of offset + index, 0, 0),
    compared with `threshold` = floor(dropout_p 2^32).
    """
    counter = index + offset
    c0 = counter.to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    k0 = tl.zeros_like(c0) + seed_lo.to(tl.uint32)
    k1 = tl.zeros_like(c0) + seed_hi.to(tl.uint32)
    for _ in tl.static_range(10):
        n0 = tl.umulhi(c2, 0xCD9E8D57) ^ c1 ^ k0
        n2 = tl.umulhi(c0, 0xD2511F53) ^ c3 ^ k1
        c1 = c2 * 0xCD9E8D57
        c3 = c0 * 0xD2511F53
        c0 = n0
        c2 = n2
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0.to(tl.int64) >= threshold


def dropout_args(rng_state, dropout_p: float) -> tuple[int, int, int, int]:
    """(seed_lo, seed_hi, offset, threshold) kernel arguments of :func:`dropout_keep`."""
    seed, offset = (int(x) for x in rng_state.tolist())
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, offset, int(dropout_p * 2.0**32)


@triton.jit
def matmul_acc(a, b, PREC: tl.constexpr, FP64: tl.constexpr):
    """a [M, L] @ b [L, N], accumulated in float32 (float64 for FP64)."""
    if FP64:
        # tl.dot has no float64 path on every Triton/GPU version; float64 is
        # for tests only, so a broadcast product-sum is enough.
        c = tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    elif PREC == "upcast":
        # Triton's interpreter multiplies bfloat16 as raw bits: upcast there.
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PREC)
    return c


@triton.jit
def _tile_ptrs_mask(ptr, rows, row_ok, s0, s1, cols, D: tl.constexpr, BD: tl.constexpr):
    ptrs = ptr + rows[:, None] * s0 + cols[None, :] * s1
    if D == BD:
        mask = row_ok[:, None]
    else:
        mask = row_ok[:, None] & (cols[None, :] < D)
    return ptrs, mask


@triton.jit
def load_tile(ptr, rows, row_ok, s0, s1, cols, D: tl.constexpr, BD: tl.constexpr):
    ptrs, mask = _tile_ptrs_mask(ptr, rows, row_ok, s0, s1, cols, D, BD)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def store_tile(ptr, val, rows, row_ok, s0, cols, D: tl.constexpr, BD: tl.constexpr):
    ptrs, mask = _tile_ptrs_mask(ptr, rows, row_ok, s0, 1, cols, D, BD)
    tl.store(ptrs, val.to(ptr.dtype.element_ty), mask=mask)


def acc_dtypes(dtype: torch.dtype):
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def dot_precision(x: torch.Tensor) -> str:
    if x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return "upcast"
    # float32: TF32 tensor cores only where PyTorch's own matmuls would use them.
    if x.dtype == torch.float32 and x.is_cuda and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored for 16-bit inputs; float64 does not use tl.dot


def device_context(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
