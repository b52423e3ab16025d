"""Fused Triton kernels of cross-sample attention (see docs/design.md, section cross_sample_attention).

The math is that of csrc/cpu/cross_sample_attention.cpp (its header comment).
A position is one (l, h) pair, flattened as p = l*H + h. A program owns
BLOCK_P positions and all B samples of each: it reads [BLOCK_P, BLOCK_B,
BLOCK_DC] tiles of q, k, v through the strides of B, L and H (the unbind views
of a [B, L, 3, H, d] Linear output, no copy), d in chunks of BLOCK_DC, and
forms the B x B scores of every position as broadcast-multiply-sums over a
[BLOCK_P, BLOCK_B, BLOCK_B, BLOCK_DC] product (B is small: no tl.dot), then the
softmax over the key samples, the dropout of _common.dropout_keep (row
p*B + i, column j of P: rows of B), and the output. Backward recomputes P
from q, k and lse, regenerates the mask, takes D_i = sum_j P_ij dP_ij
(= sum_c dO_ic O_ic, so `out` is not read) and writes each element of dq,
dk, dv once: deterministic.
Accumulation is float32 (float64 for float64 inputs). The public op
(caml_ops/attention.py) validates the user's arguments; the host functions
check only what the kernels' indexing relies on.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (RNG_ARGS, acc_dtypes, blh_strides, check_all_like, check_like, check_rng_state, device_context,
                      dropout_args, dropout_keep, float_arg, launch, split_float, unit_last_stride)

# Elements of the [BLOCK_P, BLOCK_B, BLOCK_B, BLOCK_DC] products a program holds at once (half that for
# its [BLOCK_P, BLOCK_B, BLOCK_DC] tiles); sized for ~100 registers per thread at 4 warps (ptxas, sm_80/90).
_FORWARD_BUDGET = 4096
_BACKWARD_BUDGET = 2048


@triton.jit
def _row_offsets(l, h, b, s_b, s_l, s_h):
    """[BLOCK_P, BLOCK_B] int64 offsets of row b at the positions (l, h) of a strided [B, L, H, d] tensor."""
    return l[:, None] * s_l + h[:, None] * s_h + b[None, :] * s_b


@triton.jit
def _qkv_rows(l, h, b, sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h):
    """_row_offsets of q, k and v."""
    return (_row_offsets(l, h, b, sq_b, sq_l, sq_h), _row_offsets(l, h, b, sk_b, sk_l, sk_h),
            _row_offsets(l, h, b, sv_b, sv_l, sv_h))


@triton.jit
def _load_chunk(ptr, rows, row_ok, c0, D: tl.constexpr, BLOCK_DC: tl.constexpr, ACC: tl.constexpr):
    """Columns c0 .. c0 + BLOCK_DC of the rows: [BLOCK_P, BLOCK_B, BLOCK_DC] in ACC, 0 outside."""
    c = c0 + tl.arange(0, BLOCK_DC)
    mask = row_ok[:, :, None] & (c < D)[None, None, :]
    return tl.load(ptr + rows[:, :, None] + c[None, None, :], mask=mask, other=0.0).to(ACC)


@triton.jit
def _store_chunk(ptr, value, p, b, row_ok, c0, LH, D: tl.constexpr, BLOCK_DC: tl.constexpr):
    """Stores columns c0 .. c0 + BLOCK_DC of rows (b, p) of a contiguous [B, L, H, d] tensor."""
    c = c0 + tl.arange(0, BLOCK_DC)
    offs = (b[None, :, None] * LH + p[:, None, None]) * D + c[None, None, :]
    tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=row_ok[:, :, None] & (c < D)[None, None, :])


@triton.jit
def _dropout_scale(p, b, seed_lo, seed_hi, rng_offset, threshold, keep, B: tl.constexpr):
    """Z on the [BLOCK_P, BLOCK_B, BLOCK_B] tile: `keep` = 1 / (1 - dropout_p) where kept, 0 where dropped."""
    # One Philox per element, not per four columns: BLOCK_B (a power of two >= B) can be 1 or 2.
    row = p[:, None, None] * B + b[None, :, None]
    return tl.where(dropout_keep(row, b[None, None, :], B, seed_lo, seed_hi, rng_offset, threshold), keep, 0.0)


@triton.jit
def _positions(LH, H, B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr):
    """This program's positions p and their (l, h), the sample index b (all int64), and the mask of valid rows."""
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    b = tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = (p < LH)[:, None] & (b < B)[None, :]
    return p, p // H, p % H, b, row_ok


@triton.jit
def _chunk_dots(a, b, a_rows, b_rows, row_ok, c0, D: tl.constexpr, BLOCK_DC: tl.constexpr, ACC: tl.constexpr):
    """[BLOCK_P, BLOCK_B, BLOCK_B] dot products over columns c0 .. c0 + BLOCK_DC of every row of a with
    every row of b at the same position."""
    ac = _load_chunk(a, a_rows, row_ok, c0, D, BLOCK_DC, ACC)
    bc = _load_chunk(b, b_rows, row_ok, c0, D, BLOCK_DC, ACC)
    return tl.sum(ac[:, :, None, :] * bc[:, None, :, :], axis=3)


@triton.jit
def _lse_ptrs(lse, p, b, LH):
    """[BLOCK_P, BLOCK_B] pointers to the rows' lse in a contiguous [B, L, H]."""
    return lse + b[None, :] * LH + p[:, None]


@triton.jit(do_not_specialize=RNG_ARGS)
def _forward_kernel(q, k, v, out, lse, LH, H,
                    sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h,
                    scale_hi, scale_lo, keep_hi, keep_lo, seed_lo, seed_hi, rng_offset, threshold,
                    B: tl.constexpr, D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr,
                    BLOCK_DC: tl.constexpr, DROPOUT: tl.constexpr, FP64: tl.constexpr):
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    p, l, h, b, row_ok = _positions(LH, H, B, BLOCK_P, BLOCK_B)
    q_rows, k_rows, v_rows = _qkv_rows(l, h, b, sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h)

    s = tl.zeros([BLOCK_P, BLOCK_B, BLOCK_B], ACC)
    for c0 in range(0, D, BLOCK_DC):
        s += _chunk_dots(q, k, q_rows, k_rows, row_ok, c0, D, BLOCK_DC, ACC)
    s = tl.where((b < B)[None, None, :], s * float_arg(scale_hi, scale_lo, FP64), float("-inf"))
    m = tl.max(s, axis=2)
    e = tl.exp(s - m[:, :, None])
    total = tl.sum(e, axis=2)
    prob = e / total[:, :, None]
    tl.store(_lse_ptrs(lse, p, b, LH), (m + tl.log(total)).to(lse.dtype.element_ty), mask=row_ok)
    if DROPOUT:
        keep = float_arg(keep_hi, keep_lo, FP64)
        prob = prob * _dropout_scale(p, b, seed_lo, seed_hi, rng_offset, threshold, keep, B)

    for c0 in range(0, D, BLOCK_DC):
        vc = _load_chunk(v, v_rows, row_ok, c0, D, BLOCK_DC, ACC)
        o = tl.sum(prob[:, :, :, None] * vc[:, None, :, :], axis=2)
        _store_chunk(out, o, p, b, row_ok, c0, LH, D, BLOCK_DC)


@triton.jit(do_not_specialize=RNG_ARGS)
def _backward_kernel(dout, q, k, v, lse, dq, dk, dv, LH, H,
                     sg_b, sg_l, sg_h, sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h,
                     scale_hi, scale_lo, keep_hi, keep_lo, seed_lo, seed_hi, rng_offset, threshold,
                     B: tl.constexpr, D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr,
                     BLOCK_DC: tl.constexpr, DROPOUT: tl.constexpr, FP64: tl.constexpr):
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    p, l, h, b, row_ok = _positions(LH, H, B, BLOCK_P, BLOCK_B)
    g_rows = _row_offsets(l, h, b, sg_b, sg_l, sg_h)
    q_rows, k_rows, v_rows = _qkv_rows(l, h, b, sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h)
    scale = float_arg(scale_hi, scale_lo, FP64)

    s = tl.zeros([BLOCK_P, BLOCK_B, BLOCK_B], ACC)
    dp = tl.zeros([BLOCK_P, BLOCK_B, BLOCK_B], ACC)  # dO V^T
    for c0 in range(0, D, BLOCK_DC):
        s += _chunk_dots(q, k, q_rows, k_rows, row_ok, c0, D, BLOCK_DC, ACC)
        dp += _chunk_dots(dout, v, g_rows, v_rows, row_ok, c0, D, BLOCK_DC, ACC)
    row_lse = tl.load(_lse_ptrs(lse, p, b, LH), mask=row_ok, other=0.0).to(ACC)
    # P = 0 on padding rows and key columns, so they add nothing below.
    pair_ok = row_ok[:, :, None] & (b < B)[None, None, :]
    prob = tl.where(pair_ok, tl.exp(s * scale - row_lse[:, :, None]), 0.0)
    if DROPOUT:
        z = _dropout_scale(p, b, seed_lo, seed_hi, rng_offset, threshold, float_arg(keep_hi, keep_lo, FP64), B)
        dp = dp * z
        pz = prob * z
    else:
        pz = prob
    # Padding pairs: 0, not 0 * (dp - D), which is NaN once a row of v holds inf (its dp on padding rows is 0 * inf).
    ds = tl.where(pair_ok, prob * (dp - tl.sum(prob * dp, axis=2)[:, :, None]) * scale, 0.0)

    for c0 in range(0, D, BLOCK_DC):
        qc = _load_chunk(q, q_rows, row_ok, c0, D, BLOCK_DC, ACC)
        kc = _load_chunk(k, k_rows, row_ok, c0, D, BLOCK_DC, ACC)
        gc = _load_chunk(dout, g_rows, row_ok, c0, D, BLOCK_DC, ACC)
        _store_chunk(dq, tl.sum(ds[:, :, :, None] * kc[:, None, :, :], axis=2), p, b, row_ok, c0, LH, D, BLOCK_DC)
        _store_chunk(dk, tl.sum(ds[:, :, :, None] * qc[:, :, None, :], axis=1), p, b, row_ok, c0, LH, D, BLOCK_DC)
        _store_chunk(dv, tl.sum(pz[:, :, :, None] * gc[:, :, None, :], axis=1), p, b, row_ok, c0, LH, D, BLOCK_DC)


def _launch_args(q, scale: float, dropout_p: float, rng_state, budget: int):
    """(grid, float and dropout arguments, meta-parameters) shared by both kernels."""
    B, L, H, d = q.shape
    block_b = triton.next_power_of_2(B)
    block_dc = min(triton.next_power_of_2(d), max(1, budget // (block_b * block_b)))
    block_p = max(1, min(budget // (block_b * block_b), budget // 2 // block_b) // block_dc)
    block_p = min(block_p, triton.next_power_of_2(L * H))
    args = (*split_float(scale), *dropout_args(rng_state, dropout_p))
    meta = dict(B=B, D=d, BLOCK_P=block_p, BLOCK_B=block_b, BLOCK_DC=block_dc, DROPOUT=dropout_p > 0,
                FP64=q.dtype == torch.float64,
                num_warps=8 if block_b >= 32 else 4)  # the [B, B] matrices of large B over more threads
    return (triton.cdiv(L * H, block_p),), args, meta


def cross_sample_attention_forward(q, k, v, scale: float, dropout_p: float, rng_state):
    """(out [B, L, H, d] in q's dtype, lse [B, L, H] float32, float64 for float64 inputs)."""
    check_all_like(q, {"k": k, "v": v})
    check_rng_state(rng_state)
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    B, L, H, d = q.shape
    out = torch.empty((B, L, H, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, L, H), dtype=acc_dtypes(q.dtype)[0], device=q.device)
    if out.numel() > 0:
        grid, args, meta = _launch_args(q, scale, dropout_p, rng_state, _FORWARD_BUDGET)
        with device_context(q):
            launch(_forward_kernel, grid, q, k, v, out, lse, L * H, H, *blh_strides(q), *blh_strides(k),
                   *blh_strides(v), *args, **meta)
    return out, lse


def cross_sample_attention_backward(grad_out, q, k, v, out, lse, scale: float, dropout_p: float, rng_state):
    """(grad_q, grad_k, grad_v), each [B, L, H, d] in q's dtype. `out` is not read (nor checked)."""
    check_all_like(q, {"k": k, "v": v, "grad_out": grad_out})
    check_rng_state(rng_state)
    B, L, H, d = q.shape
    check_like(lse, "lse (of the forward)", (B, L, H), acc_dtypes(q.dtype)[0], q.device)
    grad_out, q, k, v, lse = (unit_last_stride(grad_out), unit_last_stride(q), unit_last_stride(k),
                              unit_last_stride(v), lse.contiguous())
    grads = [torch.empty((B, L, H, d), dtype=q.dtype, device=q.device) for _ in range(3)]
    if q.numel() > 0:
        grid, args, meta = _launch_args(q, scale, dropout_p, rng_state, _BACKWARD_BUDGET)
        with device_context(q):
            launch(
                _backward_kernel, grid, grad_out, q, k, v, lse, *grads, L * H, H,
                *blh_strides(grad_out), *blh_strides(q), *blh_strides(k), *blh_strides(v), *args, **meta,
            )
    return tuple(grads)
