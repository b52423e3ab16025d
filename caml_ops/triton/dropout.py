"""Triton kernel of dropout: out = x Z over the row-major elements, with the mask of csrc/philox.h on
rows of 64 elements (element i: word i mod 4 of Philox(seed, offset + i / 4)), one Philox per four elements.
Elementwise and memory-bound: one program per BLOCK elements; the backward is the same kernel on the gradient.
See docs/design.md, sections dropout and "Dropout RNG (Philox)".
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (RNG_ARGS, acc_dtypes, check_rng_state, device_context, dropout_args, dropout_keep_tile, float_arg,
                      launch)

_ROW = 64  # elements per row of the mask (the spec's view of the flat tensor)
_BLOCK = 4096


@triton.jit(do_not_specialize=RNG_ARGS)
def _dropout_kernel(x_ptr, out_ptr, n, keep_hi, keep_lo, seed_lo, seed_hi, rng_offset, threshold,
                    BLOCK: tl.constexpr, ROW: tl.constexpr, FP64: tl.constexpr, ACC: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    rows = start // ROW + tl.arange(0, BLOCK // ROW)
    keep = tl.reshape(dropout_keep_tile(rows, 0, ROW, seed_lo, seed_hi, rng_offset, threshold, ROW), [BLOCK])
    offs = start + tl.arange(0, BLOCK)
    in_range = offs < n
    x = tl.load(x_ptr + offs, mask=in_range, other=0.0).to(ACC)
    # x * Z, not a select: NaN and inf propagate as in torch's dropout.
    z = tl.where(keep, float_arg(keep_hi, keep_lo, FP64), 0.0)
    tl.store(out_ptr + offs, (x * z).to(out_ptr.dtype.element_ty), mask=in_range)


def dropout(x: torch.Tensor, dropout_p: float, rng_state: torch.Tensor) -> torch.Tensor:
    """x * Z, a new contiguous tensor of x's shape and dtype."""
    check_rng_state(rng_state)
    x = x.contiguous()
    if dropout_p == 0.0 or x.numel() == 0:
        return x.clone()
    out = torch.empty_like(x)
    acc_t, acc_tl = acc_dtypes(x.dtype)
    with device_context(x):
        launch(_dropout_kernel, (triton.cdiv(x.numel(), _BLOCK),),
            x, out, x.numel(), *dropout_args(rng_state, dropout_p),
            BLOCK=_BLOCK, ROW=_ROW, FP64=acc_t == torch.float64, ACC=acc_tl)
    return out
