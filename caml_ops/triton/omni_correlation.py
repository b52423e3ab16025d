"""Fused Triton kernels for the omni-correlation ops (loss and correlation matrix).

Flash-attention style: the logits S = feat @ memory.T / temperature are built
tile by tile from the [K, D] memory bank and never stored as an N x K matrix
(except for `omni_correlation_forward`, whose output *is* that matrix).

- loss forward: one program per block of rows streams over the column tiles of
  the bank with an online softmax (one pass when eps = 0, two when eps > 0) and
  keeps per row only lse_v, lse_a (each as a float pair hi + lo, see _lse), l and R.
- backward: a row-block kernel recomputes the S tiles and accumulates
  grad_feat in registers; a (column tile, row chunk) kernel writes float32
  partials of grad_memory [num_chunks, K, D], summed over the chunks in a fixed
  order by a third kernel (deterministic, no atomics).

Accumulation is float32 (float64 for float64 inputs). The host functions mirror
the schemas in csrc/caml_ops.cpp; autograd, fake kernels and the validation of
user arguments live in caml_ops/omni_correlation.py. See docs/design.md,
sections omni_correlation_loss and omni_correlation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (acc_dtypes, check_all_like, check_like, device_context, dot_precision, float_arg, launch,
                      load_tile, matmul_acc, on_gpu, split_float, store_tile, to_float32)

# ---------------------------------------------------------------------------
# Shared device helpers
# ---------------------------------------------------------------------------


@triton.jit
def _logits(x, c_hi, c_lo, DIVIDE: tl.constexpr, FP64: tl.constexpr):
    """Scaled logits x / c (DIVIDE) or x * c, c = c_hi + c_lo from _logit_scale."""
    c = float_arg(c_hi, c_lo, FP64)
    if DIVIDE:
        y = x / c
    else:
        y = x * c
    return y


@triton.jit
def _load_rows(ptr, rows, row_ok, ACC: tl.constexpr):
    return tl.load(ptr + rows, mask=row_ok, other=0.0).to(ACC)


@triton.jit
def _lse(m, z):
    """A row's log-sum-exp m + log z as an unevaluated pair hi + lo (Fast2Sum, hi = fl(m + log z)).

    log p = (s - hi) - lo is then nearly exact (s - hi exactly so near the
    maximum, by Sterbenz), where s - fl(lse) would put a relative error of up
    to |lse| * 2^-24 on a whole row of p and shift all of log p alike.
    """
    log_z = tl.log(z)
    hi = m + log_z
    return hi, (m - hi) + log_z


@triton.jit
def _log_softmax(s, hi, lo):
    return (s - hi[:, None]) - lo[:, None]


@triton.jit
def _store_lse(ptr, rows, row_ok, hi, lo):
    tl.store(ptr + 2 * rows, hi, mask=row_ok)
    tl.store(ptr + 2 * rows + 1, lo, mask=row_ok)


@triton.jit
def _load_lse(ptr, rows, row_ok, ACC: tl.constexpr):
    return _load_rows(ptr, 2 * rows, row_ok, ACC), _load_rows(ptr, 2 * rows + 1, row_ok, ACC)


@triton.jit
def _pair_logits(fv, fa, mem_t, col_ok, c_hi, c_lo, PREC: tl.constexpr, DIVIDE: tl.constexpr,
                 FP64: tl.constexpr, EVEN_K: tl.constexpr):
    """Both sub-models' scaled logits against a memory tile; -inf in the columns past K."""
    s_v = _logits(matmul_acc(fv, mem_t, PREC, FP64), c_hi, c_lo, DIVIDE, FP64)
    s_a = _logits(matmul_acc(fa, mem_t, PREC, FP64), c_hi, c_lo, DIVIDE, FP64)
    if not EVEN_K:
        s_v = tl.where(col_ok[None, :], s_v, float("-inf"))
        s_a = tl.where(col_ok[None, :], s_a, float("-inf"))
    return s_v, s_a


@triton.jit
def _loss_dscores(s_v, s_a, g, l, hi_v, lo_v, hi_a, lo_a, r_sum, eps, col_ok, EPS_ZERO: tl.constexpr,
                  EVEN_K: tl.constexpr):
    """dl/ds_v and dl/ds_a of a tile, scaled by the row gradient g."""
    log_p = _log_softmax(s_v, hi_v, lo_v)
    p = tl.exp(log_p)
    q = tl.exp(_log_softmax(s_a, hi_a, lo_a))
    if EPS_ZERO:
        # -log p directly: exact even where p underflows.
        ds_a = q * (-log_p - l[:, None])
        ds_v = p - q
    else:
        pe = p + eps
        ds_a = q * (-tl.log(pe) - l[:, None])
        # p, q and q * (p / pe) as in the forward's R: cancels R's term where p is one-hot.
        ds_v = p * r_sum[:, None] - q * (p / pe)
    ds_a = ds_a * g[:, None]
    ds_v = ds_v * g[:, None]
    if not EVEN_K:
        # Padded columns (memory rows loaded as 0) may give inf/NaN: drop them.
        ds_a = tl.where(col_ok[None, :], ds_a, 0.0)
        ds_v = tl.where(col_ok[None, :], ds_v, 0.0)
    return ds_v, ds_a


@triton.jit
def _row_block(N, BM: tl.constexpr):
    """This program's block of BM rows (int64) and their validity mask."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    return rows, rows < N


@triton.jit
def _bank_tile(mem_ptr, n0, K, s_m0, s_m1, cd, D: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr):
    """Columns n0 .. n0 + BN of the logits: their indices, mask and memory rows [BN, BD] (0 past K)."""
    cols = n0 + tl.arange(0, BN)
    col_ok = cols < K
    return cols, col_ok, load_tile(mem_ptr, cols, col_ok, s_m0, s_m1, cd, D, BD)


@triton.jit
def _load_pair(fv_ptr, fa_ptr, rows, row_ok, s_fv0, s_fv1, s_fa0, s_fa1, cd, D: tl.constexpr, BD: tl.constexpr):
    """Both sub-models' feature rows [BM, BD]."""
    fv = load_tile(fv_ptr, rows, row_ok, s_fv0, s_fv1, cd, D, BD)
    fa = load_tile(fa_ptr, rows, row_ok, s_fa0, s_fa1, cd, D, BD)
    return fv, fa


@triton.jit
def _feature_block(fv_ptr, fa_ptr, N, s_fv0, s_fv1, s_fa0, s_fa1, D: tl.constexpr, BD: tl.constexpr,
                   BM: tl.constexpr):
    """This program's block of rows and their mask, the feature columns, and both sub-models' rows there."""
    rows, row_ok = _row_block(N, BM)
    cd = tl.arange(0, BD)
    fv, fa = _load_pair(fv_ptr, fa_ptr, rows, row_ok, s_fv0, s_fv1, s_fa0, s_fa1, cd, D, BD)
    return rows, row_ok, cd, fv, fa


@triton.jit
def _load_row_stats(g_ptr, s_g, loss_ptr, lse_v_ptr, lse_a_ptr, r_ptr, rows, row_ok, ACC: tl.constexpr):
    """The rows' gradient g and the forward's statistics l, lse_v (hi, lo), lse_a (hi, lo) and R."""
    g = tl.load(g_ptr + rows * s_g, mask=row_ok, other=0.0).to(ACC)
    l = _load_rows(loss_ptr, rows, row_ok, ACC)
    hi_v, lo_v = _load_lse(lse_v_ptr, rows, row_ok, ACC)
    hi_a, lo_a = _load_lse(lse_a_ptr, rows, row_ok, ACC)
    return g, l, hi_v, lo_v, hi_a, lo_a, _load_rows(r_ptr, rows, row_ok, ACC)


@triton.jit
def _chunk_columns(K, num_col_tiles, BN: tl.constexpr):
    """A grad_memory program's row chunk and its column tile (indices, mask). Column tiles vary fastest,
    so the programs sharing a row chunk run together and read its features from L2."""
    pid = tl.program_id(0)
    chunk = pid // num_col_tiles
    cols = (pid % num_col_tiles).to(tl.int64) * BN + tl.arange(0, BN)
    return chunk, cols, cols < K


@triton.jit
def _chunk_rows(chunk, N, blocks_per_chunk, BM: tl.constexpr):
    """The chunk's first block of rows and its number of row blocks."""
    rows = chunk.to(tl.int64) * blocks_per_chunk * BM + tl.arange(0, BM)
    return rows, tl.minimum(blocks_per_chunk, tl.cdiv(N, BM) - chunk * blocks_per_chunk)


@triton.jit
def _store_partial(part_ptr, chunk, acc, cols, col_ok, K, cd, D: tl.constexpr, BD: tl.constexpr):
    """The chunk's partial [K, D] of grad_memory, rows `cols`."""
    store_tile(part_ptr + chunk.to(tl.int64) * K * D, acc, cols, col_ok, D, cd, D, BD)


# ---------------------------------------------------------------------------
# omni_correlation_loss
# ---------------------------------------------------------------------------


@triton.jit
def _loss_fwd_kernel(
    fv_ptr, fa_ptr, mem_ptr, loss_ptr, lse_v_ptr, lse_a_ptr, r_ptr,
    N, K, s_fv0, s_fv1, s_fa0, s_fa1, s_m0, s_m1,
    logit_hi, logit_lo, eps_hi, eps_lo,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    EPS_ZERO: tl.constexpr, EVEN_K: tl.constexpr, PREC: tl.constexpr,
    DIVIDE: tl.constexpr, FP64: tl.constexpr, ACC: tl.constexpr,
):
    rows, row_ok, cd, fv, fa = _feature_block(fv_ptr, fa_ptr, N, s_fv0, s_fv1, s_fa0, s_fa1, D, BD, BM)
    eps = float_arg(eps_hi, eps_lo, FP64)

    m_v = tl.full([BM], float("-inf"), ACC)
    m_a = tl.full([BM], float("-inf"), ACC)
    z_v = tl.zeros([BM], ACC)
    z_a = tl.zeros([BM], ACC)
    # w = sum_j exp(s_a_j - m_a) (s_v_j - m_v) <= 0, so that (eps = 0)
    # l = log z_v - w / z_a adds two non-negative terms: no cancellation.
    w = tl.zeros([BM], ACC)
    for n0 in range(0, K, BN):
        _, col_ok, mem = _bank_tile(mem_ptr, n0, K, s_m0, s_m1, cd, D, BD, BN)
        s_v, s_a = _pair_logits(fv, fa, tl.trans(mem), col_ok, logit_hi, logit_lo, PREC, DIVIDE, FP64, EVEN_K)
        mv_new = tl.maximum(m_v, tl.max(s_v, 1))
        ma_new = tl.maximum(m_a, tl.max(s_a, 1))
        z_v = z_v * tl.exp(m_v - mv_new) + tl.sum(tl.exp(s_v - mv_new[:, None]), 1)
        alpha_a = tl.exp(m_a - ma_new)
        e_a = tl.exp(s_a - ma_new[:, None])
        if EPS_ZERO:
            dv = s_v - mv_new[:, None]
            if not EVEN_K:
                dv = tl.where(col_ok[None, :], dv, 0.0)
            # Re-reference w to the new maxima (z_a = 0 on the first tile, where m_v = -inf).
            shift = z_a * tl.where(z_a > 0, mv_new - m_v, 0.0)
            w = (w - shift) * alpha_a + tl.sum(e_a * dv, 1)
        z_a = z_a * alpha_a + tl.sum(e_a, 1)
        m_v = mv_new
        m_a = ma_new

    hi_v, lo_v = _lse(m_v, z_v)
    hi_a, lo_a = _lse(m_a, z_a)
    if EPS_ZERO:
        loss = tl.log(z_v) - w / z_a
        r_sum = tl.full([BM], 1.0, ACC)
    else:
        # Second pass: l = -sum q log(p + eps), R = sum q p / (p + eps), with p
        # and q computed exactly as the backward recomputes them.
        loss = tl.zeros([BM], ACC)
        r_sum = tl.zeros([BM], ACC)
        for n0 in range(0, K, BN):
            _, col_ok, mem = _bank_tile(mem_ptr, n0, K, s_m0, s_m1, cd, D, BD, BN)
            s_v, s_a = _pair_logits(fv, fa, tl.trans(mem), col_ok, logit_hi, logit_lo, PREC, DIVIDE, FP64, EVEN_K)
            p = tl.exp(_log_softmax(s_v, hi_v, lo_v))
            q = tl.exp(_log_softmax(s_a, hi_a, lo_a))
            pe = p + eps
            loss -= tl.sum(q * tl.log(pe), 1)
            r_sum += tl.sum(q * (p / pe), 1)
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    _store_lse(lse_v_ptr, rows, row_ok, hi_v, lo_v)
    _store_lse(lse_a_ptr, rows, row_ok, hi_a, lo_a)
    tl.store(r_ptr + rows, r_sum, mask=row_ok)


@triton.jit
def _loss_bwd_feat_kernel(
    g_ptr, fv_ptr, fa_ptr, mem_ptr, loss_ptr, lse_v_ptr, lse_a_ptr, r_ptr, gfv_ptr, gfa_ptr,
    N, K, s_g, s_fv0, s_fv1, s_fa0, s_fa1, s_m0, s_m1,
    logit_hi, logit_lo, scale_hi, scale_lo, eps_hi, eps_lo,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    EPS_ZERO: tl.constexpr, EVEN_K: tl.constexpr, PREC: tl.constexpr,
    DIVIDE: tl.constexpr, FP64: tl.constexpr, ACC: tl.constexpr,
):
    rows, row_ok, cd, fv, fa = _feature_block(fv_ptr, fa_ptr, N, s_fv0, s_fv1, s_fa0, s_fa1, D, BD, BM)
    g, l, hi_v, lo_v, hi_a, lo_a, r_sum = _load_row_stats(g_ptr, s_g, loss_ptr, lse_v_ptr, lse_a_ptr, r_ptr,
                                                          rows, row_ok, ACC)
    scale = float_arg(scale_hi, scale_lo, FP64)
    eps = float_arg(eps_hi, eps_lo, FP64)

    acc_v = tl.zeros([BM, BD], ACC)
    acc_a = tl.zeros([BM, BD], ACC)
    for n0 in range(0, K, BN):
        _, col_ok, mem = _bank_tile(mem_ptr, n0, K, s_m0, s_m1, cd, D, BD, BN)
        s_v, s_a = _pair_logits(fv, fa, tl.trans(mem), col_ok, logit_hi, logit_lo, PREC, DIVIDE, FP64, EVEN_K)
        ds_v, ds_a = _loss_dscores(s_v, s_a, g, l, hi_v, lo_v, hi_a, lo_a, r_sum, eps, col_ok, EPS_ZERO, EVEN_K)
        acc_v += matmul_acc(ds_v.to(mem.dtype), mem, PREC, FP64)
        acc_a += matmul_acc(ds_a.to(mem.dtype), mem, PREC, FP64)
    store_tile(gfv_ptr, acc_v * scale, rows, row_ok, D, cd, D, BD)
    store_tile(gfa_ptr, acc_a * scale, rows, row_ok, D, cd, D, BD)


@triton.jit
def _loss_bwd_mem_kernel(
    g_ptr, fv_ptr, fa_ptr, mem_ptr, loss_ptr, lse_v_ptr, lse_a_ptr, r_ptr, part_ptr,
    N, K, s_g, s_fv0, s_fv1, s_fa0, s_fa1, s_m0, s_m1,
    logit_hi, logit_lo, scale_hi, scale_lo, eps_hi, eps_lo, num_col_tiles, blocks_per_chunk,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    EPS_ZERO: tl.constexpr, EVEN_K: tl.constexpr, PREC: tl.constexpr,
    DIVIDE: tl.constexpr, FP64: tl.constexpr, ACC: tl.constexpr,
):
    chunk, cols, col_ok = _chunk_columns(K, num_col_tiles, BN)
    cd = tl.arange(0, BD)
    acc = tl.zeros([BN, BD], ACC)
    mem = load_tile(mem_ptr, cols, col_ok, s_m0, s_m1, cd, D, BD)
    mem_t = tl.trans(mem)
    scale = float_arg(scale_hi, scale_lo, FP64)
    eps = float_arg(eps_hi, eps_lo, FP64)
    rows, num_blocks = _chunk_rows(chunk, N, blocks_per_chunk, BM)
    for _ in range(0, num_blocks):
        row_ok = rows < N
        fv, fa = _load_pair(fv_ptr, fa_ptr, rows, row_ok, s_fv0, s_fv1, s_fa0, s_fa1, cd, D, BD)
        g, l, hi_v, lo_v, hi_a, lo_a, r_sum = _load_row_stats(g_ptr, s_g, loss_ptr, lse_v_ptr, lse_a_ptr, r_ptr,
                                                              rows, row_ok, ACC)
        s_v, s_a = _pair_logits(fv, fa, mem_t, col_ok, logit_hi, logit_lo, PREC, DIVIDE, FP64, EVEN_K)
        ds_v, ds_a = _loss_dscores(s_v, s_a, g, l, hi_v, lo_v, hi_a, lo_a, r_sum, eps, col_ok, EPS_ZERO, EVEN_K)
        acc += matmul_acc(tl.trans(ds_v).to(fv.dtype), fv, PREC, FP64)
        acc += matmul_acc(tl.trans(ds_a).to(fa.dtype), fa, PREC, FP64)
        rows += BM
    _store_partial(part_ptr, chunk, acc * scale, cols, col_ok, K, cd, D, BD)


@triton.jit
def _sum_chunks_kernel(part_ptr, out_ptr, num_chunks, KD, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """out = sum over the leading axis of part [num_chunks, KD], in chunk order."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < KD
    ptrs = part_ptr + offs
    acc = tl.zeros([BLOCK], ACC)
    for _ in range(0, num_chunks):
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += KD
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------
# omni_correlation (the matrix itself)
# ---------------------------------------------------------------------------


@triton.jit
def _corr_logits(f, mem, c_hi, c_lo, PREC: tl.constexpr, DIVIDE: tl.constexpr, FP64: tl.constexpr):
    return _logits(matmul_acc(f, tl.trans(mem), PREC, FP64), c_hi, c_lo, DIVIDE, FP64)


@triton.jit
def _load_grad_probs(g_ptr, p_ptr, rows, row_ok, cols, col_ok, s_g0, s_g1, s_p0, s_p1, ACC: tl.constexpr):
    """The [BM, BN] tiles of grad_out and probs, in ACC (0 outside)."""
    mask = row_ok[:, None] & col_ok[None, :]
    g = tl.load(g_ptr + rows[:, None] * s_g0 + cols[None, :] * s_g1, mask=mask, other=0.0)
    p = tl.load(p_ptr + rows[:, None] * s_p0 + cols[None, :] * s_p1, mask=mask, other=0.0)
    return g.to(ACC), p.to(ACC)


@triton.jit
def _corr_fwd_kernel(
    f_ptr, mem_ptr, out_ptr, N, K, s_f0, s_f1, s_m0, s_m1, logit_hi, logit_lo,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    EVEN_K: tl.constexpr, PREC: tl.constexpr, DIVIDE: tl.constexpr, FP64: tl.constexpr, ACC: tl.constexpr,
):
    rows, row_ok = _row_block(N, BM)
    cd = tl.arange(0, BD)
    f = load_tile(f_ptr, rows, row_ok, s_f0, s_f1, cd, D, BD)
    m = tl.full([BM], float("-inf"), ACC)
    z = tl.zeros([BM], ACC)
    for n0 in range(0, K, BN):
        _, col_ok, mem = _bank_tile(mem_ptr, n0, K, s_m0, s_m1, cd, D, BD, BN)
        s = _corr_logits(f, mem, logit_hi, logit_lo, PREC, DIVIDE, FP64)
        if not EVEN_K:
            s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        z = z * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m = m_new
    inv_z = 1.0 / z  # exp(s - m) / z sums to 1 more exactly than exp(s - lse)
    for n0 in range(0, K, BN):
        cols, col_ok, mem = _bank_tile(mem_ptr, n0, K, s_m0, s_m1, cd, D, BD, BN)
        s = _corr_logits(f, mem, logit_hi, logit_lo, PREC, DIVIDE, FP64)
        p = tl.exp(s - m[:, None]) * inv_z[:, None]
        tl.store(out_ptr + rows[:, None] * K + cols[None, :], p.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _corr_bwd_feat_kernel(
    g_ptr, p_ptr, mem_ptr, gf_ptr, delta_ptr,
    N, K, s_g0, s_g1, s_p0, s_p1, s_m0, s_m1, scale_hi, scale_lo,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    PREC: tl.constexpr, FP64: tl.constexpr, ACC: tl.constexpr,
):
    rows, row_ok = _row_block(N, BM)
    cd = tl.arange(0, BD)
    scale = float_arg(scale_hi, scale_lo, FP64)
    # delta = rowsum(G * P); masked entries load as 0.
    delta = tl.zeros([BM], ACC)
    for n0 in range(0, K, BN):
        cols = n0 + tl.arange(0, BN)
        g, p = _load_grad_probs(g_ptr, p_ptr, rows, row_ok, cols, cols < K, s_g0, s_g1, s_p0, s_p1, ACC)
        delta += tl.sum(g * p, 1)
    tl.store(delta_ptr + rows, delta, mask=row_ok)
    acc = tl.zeros([BM, BD], ACC)
    for n0 in range(0, K, BN):
        cols, col_ok, mem = _bank_tile(mem_ptr, n0, K, s_m0, s_m1, cd, D, BD, BN)
        g, p = _load_grad_probs(g_ptr, p_ptr, rows, row_ok, cols, col_ok, s_g0, s_g1, s_p0, s_p1, ACC)
        ds = p * (g - delta[:, None])
        acc += matmul_acc(ds.to(mem.dtype), mem, PREC, FP64)
    store_tile(gf_ptr, acc * scale, rows, row_ok, D, cd, D, BD)


@triton.jit
def _corr_bwd_mem_kernel(
    g_ptr, p_ptr, f_ptr, delta_ptr, part_ptr,
    N, K, s_g0, s_g1, s_p0, s_p1, s_f0, s_f1, scale_hi, scale_lo, num_col_tiles, blocks_per_chunk,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    PREC: tl.constexpr, FP64: tl.constexpr, ACC: tl.constexpr,
):
    chunk, cols, col_ok = _chunk_columns(K, num_col_tiles, BN)
    cd = tl.arange(0, BD)
    scale = float_arg(scale_hi, scale_lo, FP64)
    acc = tl.zeros([BN, BD], ACC)
    rows, num_blocks = _chunk_rows(chunk, N, blocks_per_chunk, BM)
    for _ in range(0, num_blocks):
        row_ok = rows < N
        g, p = _load_grad_probs(g_ptr, p_ptr, rows, row_ok, cols, col_ok, s_g0, s_g1, s_p0, s_p1, ACC)
        delta = _load_rows(delta_ptr, rows, row_ok, ACC)
        ds = p * (g - delta[:, None])
        f = load_tile(f_ptr, rows, row_ok, s_f0, s_f1, cd, D, BD)
        acc += matmul_acc(tl.trans(ds).to(f.dtype), f, PREC, FP64)
        rows += BM
    _store_partial(part_ptr, chunk, acc * scale, cols, col_ok, K, cd, D, BD)


# ---------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------

# grad_memory programs aimed at: enough to fill an H100 several times over while
# the [num_chunks, K, D] partials stay a few MiB. A constant, so the chunking
# (and with it the summation order) depends only on N, K and D.
_MEM_GRAD_PROGRAMS = 1024
_SUM_BLOCK = 1024


def _config(D: int, dtype: torch.dtype) -> dict:
    """Block sizes, warps and pipeline stages per feature width (fixed: no autotuning).

    All kernels of an op use the same (BM, BN) tiling so that the backward
    recomputes bit-identical logits: with peaked softmaxes (|S| ~ 1e3..1e4)
    a last-bit difference between forward and backward logits would show up
    as a 1e-4..1e-3 relative error in p and in the gradients.

    Sized with benchmarks/compile_gpu_kernels.py (ptxas, sm_90 and sm_80) to
    run without spills and within sm_80's 163 KiB of shared memory: float32's
    IEEE tl.dot runs on the FMA units with its operands in registers, so it
    gets smaller tiles than the 16-bit types' tensor-core dots.
    """
    bd = max(16, triton.next_power_of_2(D))
    if dtype == torch.float64:
        # Broadcast product-sum path (tests): small tiles keep the [BM, BD, BN] products in check.
        t = 16 if bd <= 32 else 8
        return dict(BD=bd, BM=t, BN=t, warps=4, stages=1)
    if dtype == torch.float32:
        bm, bn, warps = {16: (64, 32, 4), 32: (64, 32, 4), 64: (32, 32, 8)}.get(bd, (32, 16, 8))
        return dict(BD=bd, BM=bm, BN=bn, warps=warps, stages=3)
    return dict(BD=bd, BM=128 if bd <= 64 else 64, BN=64 if bd <= 32 else 32, warps=8, stages=3)


def _logit_scale(x: torch.Tensor, temperature: float):
    """(c_hi, c_lo, divide): the kernels' forward logits are dot(feat, memory) / c
    (divide) or * c, rounded as PyTorch rounds (feat @ memory.T) / temperature
    on x's device: a true division by fl(t) on the CPU, a product with
    fl(1 / fl(t)) on CUDA (its kernel for a scalar divisor), t rounded to the
    accumulation dtype. The float32 gradients' error is dominated by the
    logits' rounding, amplified in rows with p_j ~ eps; logits rounded any other
    way put the max error at a random 0.3 to 10 times plain PyTorch's.
    """
    gpu = on_gpu(x)
    if x.dtype == torch.float64:
        c = 1.0 / temperature if gpu else temperature
    else:
        c = (torch.ones((), dtype=torch.float32) / to_float32(temperature)).item() if gpu else to_float32(temperature)
    return (*split_float(c), not gpu)


def _sizes(feat: torch.Tensor, memory: torch.Tensor, like_feat: dict) -> tuple[int, int, int]:
    """(N, K, D) of feat [N, D] and memory [K, D], after checking that memory and the tensors `like_feat`
    (name: tensor) agree with feat: the kernels index them all with feat's N, D, dtype and device."""
    N, D = feat.shape
    K = memory.shape[0]
    check_like(memory, "memory", (K, D), feat.dtype, feat.device)
    check_all_like(feat, like_feat)
    return N, K, D


def _meta(memory: torch.Tensor) -> dict:
    """The constexprs and launch options that all the kernels of an op share (one tiling: see _config)."""
    D = memory.shape[1]
    c = _config(D, memory.dtype)
    acc_t, acc_tl = acc_dtypes(memory.dtype)
    return dict(D=D, BD=c["BD"], BM=c["BM"], BN=c["BN"], PREC=dot_precision(memory), FP64=acc_t == torch.float64,
                ACC=acc_tl, num_warps=c["warps"], num_stages=c["stages"])


def _chunking(N: int, K: int, bm: int, bn: int):
    num_col_tiles = triton.cdiv(K, bn)
    row_blocks = triton.cdiv(N, bm)
    want = max(1, min(row_blocks, _MEM_GRAD_PROGRAMS // num_col_tiles))
    blocks_per_chunk = triton.cdiv(row_blocks, want)
    return num_col_tiles, triton.cdiv(row_blocks, blocks_per_chunk), blocks_per_chunk


def _sum_chunks(part: torch.Tensor, out_dtype: torch.dtype, acc_tl) -> torch.Tensor:
    num_chunks, K, D = part.shape
    out = torch.empty(K, D, dtype=out_dtype, device=part.device)
    launch(_sum_chunks_kernel, (triton.cdiv(K * D, _SUM_BLOCK),),
        part, out, num_chunks, K * D, BLOCK=_SUM_BLOCK, ACC=acc_tl, num_warps=4)
    return out


def _stats_shapes(N: int) -> tuple:
    """Shapes of the forward's loss_rows, lse_v, lse_a and r_sum."""
    return (N,), (N, 2), (N, 2), (N,)


def omni_correlation_loss_forward(feat_v: torch.Tensor, feat_a: torch.Tensor, memory: torch.Tensor,
                                  temperature: float, eps: float):
    """Row statistics (loss_rows [N], lse_v [N, 2], lse_a [N, 2], r_sum [N]), float32 (float64 for float64).

    lse_v, lse_a: each row's log-sum-exp as hi, lo (hi + lo, hi = the rounded log-sum-exp).
    """
    N, K, D = _sizes(feat_v, memory, {"feat_a": feat_a})
    acc_t, _ = acc_dtypes(feat_v.dtype)
    outs = [torch.empty(shape, dtype=acc_t, device=feat_v.device) for shape in _stats_shapes(N)]
    if N == 0:
        return tuple(outs)
    meta = _meta(memory)
    logit_hi, logit_lo, divide = _logit_scale(feat_v, temperature)
    with device_context(feat_v):
        launch(_loss_fwd_kernel, (triton.cdiv(N, meta["BM"]),),
            feat_v, feat_a, memory, *outs, N, K, *feat_v.stride(), *feat_a.stride(), *memory.stride(),
            logit_hi, logit_lo, *split_float(eps), EPS_ZERO=eps == 0, EVEN_K=K % meta["BN"] == 0, DIVIDE=divide,
            **meta)
    return tuple(outs)


def omni_correlation_loss_backward(grad_rows: torch.Tensor, feat_v: torch.Tensor, feat_a: torch.Tensor,
                                   memory: torch.Tensor, loss_rows: torch.Tensor, lse_v: torch.Tensor,
                                   lse_a: torch.Tensor, r_sum: torch.Tensor, temperature: float, eps: float,
                                   memory_grad: bool):
    """(grad_feat_v, grad_feat_a, grad_memory) in the input dtype; grad_memory is zeros unless memory_grad."""
    N, K, D = _sizes(feat_v, memory, {"feat_a": feat_a})
    acc_t, acc_tl = acc_dtypes(feat_v.dtype)
    check_like(grad_rows, "grad_rows", (N,), device=feat_v.device)  # read through its stride, in any dtype
    stats = {"loss_rows": loss_rows, "lse_v": lse_v, "lse_a": lse_a, "r_sum": r_sum}
    for (name, x), shape in zip(stats.items(), _stats_shapes(N)):
        check_like(x, f"{name} (of the forward)", shape, acc_t, feat_v.device)
    grad_v = torch.empty(N, D, dtype=feat_v.dtype, device=feat_v.device)
    grad_a = torch.empty(N, D, dtype=feat_v.dtype, device=feat_v.device)
    if N == 0 or not memory_grad:
        grad_m = torch.zeros(K, D, dtype=memory.dtype, device=memory.device)
    if N == 0:
        return grad_v, grad_a, grad_m
    stats = [x.contiguous() for x in stats.values()]
    meta = _meta(memory)
    logit_hi, logit_lo, divide = _logit_scale(feat_v, temperature)
    meta.update(EPS_ZERO=eps == 0, EVEN_K=K % meta["BN"] == 0, DIVIDE=divide)
    scalars = (logit_hi, logit_lo, *split_float(1.0 / temperature), *split_float(eps))
    strides = (grad_rows.stride(0), *feat_v.stride(), *feat_a.stride(), *memory.stride())
    with device_context(feat_v):
        launch(_loss_bwd_feat_kernel, (triton.cdiv(N, meta["BM"]),),
            grad_rows, feat_v, feat_a, memory, *stats, grad_v, grad_a, N, K, *strides, *scalars, **meta)
        if memory_grad:
            tiles, chunks, per_chunk = _chunking(N, K, meta["BM"], meta["BN"])
            part = torch.empty(chunks, K, D, dtype=acc_t, device=memory.device)
            launch(_loss_bwd_mem_kernel, (tiles * chunks,),
                grad_rows, feat_v, feat_a, memory, *stats, part, N, K, *strides, *scalars, tiles, per_chunk, **meta)
            grad_m = _sum_chunks(part, memory.dtype, acc_tl)
    return grad_v, grad_a, grad_m


def omni_correlation_forward(feat: torch.Tensor, memory: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(feat @ memory.T / temperature, dim=1): [N, K] in the input dtype."""
    N, K, D = _sizes(feat, memory, {})
    out = torch.empty(N, K, dtype=feat.dtype, device=feat.device)
    if N == 0:
        return out
    meta = _meta(memory)
    logit_hi, logit_lo, divide = _logit_scale(feat, temperature)  # the logits rounded as PyTorch's
    with device_context(feat):
        launch(_corr_fwd_kernel, (triton.cdiv(N, meta["BM"]),),
            feat, memory, out, N, K, *feat.stride(), *memory.stride(), logit_hi, logit_lo,
            EVEN_K=K % meta["BN"] == 0, DIVIDE=divide, **meta)
    return out


def omni_correlation_backward(grad_out: torch.Tensor, probs: torch.Tensor, feat: torch.Tensor,
                              memory: torch.Tensor, temperature: float, memory_grad: bool):
    """(grad_feat, grad_memory) for dS = P * (G - rowsum(G * P)); grad_memory is zeros unless memory_grad."""
    N, K, D = _sizes(feat, memory, {})
    for name, x in (("grad_out", grad_out), ("probs", probs)):
        check_like(x, name, (N, K), device=feat.device)  # read through their strides, in any dtype
    acc_t, acc_tl = acc_dtypes(feat.dtype)
    grad_f = torch.empty(N, D, dtype=feat.dtype, device=feat.device)
    if N == 0 or not memory_grad:
        grad_m = torch.zeros(K, D, dtype=memory.dtype, device=memory.device)
    if N == 0:
        return grad_f, grad_m
    meta = _meta(memory)
    scale = split_float(1.0 / temperature)
    delta = torch.empty(N, dtype=acc_t, device=feat.device)
    strides = (*grad_out.stride(), *probs.stride())
    with device_context(feat):
        launch(_corr_bwd_feat_kernel, (triton.cdiv(N, meta["BM"]),),
            grad_out, probs, memory, grad_f, delta, N, K, *strides, *memory.stride(), *scale, **meta)
        if memory_grad:
            tiles, chunks, per_chunk = _chunking(N, K, meta["BM"], meta["BN"])
            part = torch.empty(chunks, K, D, dtype=acc_t, device=memory.device)
            launch(_corr_bwd_mem_kernel, (tiles * chunks,),
                grad_out, probs, feat, delta, part, N, K, *strides, *feat.stride(), *scale, tiles, per_chunk, **meta)
            grad_m = _sum_chunks(part, memory.dtype, acc_tl)
    return grad_f, grad_m
