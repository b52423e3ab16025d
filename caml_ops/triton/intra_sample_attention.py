"""Flash-attention Triton kernels for intra-sample attention on the [B, L, H, d] layout.

For every sample b and head h, ordinary attention over the L positions
(FlashAttention-2, as in Triton's fused-attention tutorial), with dropout on
the probabilities drawn inside the kernels (the Philox spec of
csrc/philox.h: row (b H + h) L + i of P [B, H, L, L], column j; the key
blocks are multiples of 4 long, so every Philox serves four keys of a tile):

- forward: one program per (query block, b h) streams over the key blocks
  with an online softmax in base 2 (logits pre-multiplied by scale log2 e);
  the row sum l is of the un-dropped probabilities, the dropped ones only
  leave the accumulation of P V, and O = acc / l / (1 - p).
- backward: a preprocess kernel writes D_i = sum_c dO_ic O_ic; a program per
  (key block, b h) loops over the query blocks for dK and dV, a program per
  (query block, b h) over the key blocks for dQ. Every gradient element is
  written once by one program: deterministic, no atomics.

q, k, v and grad_out are read through their strides (the views that
unbinding a [B, L, 3, H, d] Linear output gives), only the last dimension must
be unit-stride. Accumulation is float32 (float64 for float64 inputs). The host
functions mirror the schemas in csrc/caml_ops.cpp; autograd, fake kernels and
the validation of user arguments live in caml_ops/attention.py. See
docs/design.md, section intra_sample_attention.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (RNG_ARGS, acc_dtypes, blh_strides, check_all_like, check_like, check_rng_state, device_context,
                      dot_precision, dropout_args, dropout_keep_tile, float_arg, launch, load_tile, matmul_acc, on_gpu,
                      split_float, store_tile, unit_last_stride)

# The largest head dim d the kernels take (their [block, d] tiles are sized for it). The op's spec declares
# it (caml_ops/attention.py, TRITON_INTRA_SAMPLE_MAX_HEAD_DIM; tests/test_op_specs.py checks they agree) and
# checks it before any launch.
MAX_HEAD_DIM = 128

# ---------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------


@triton.jit
def _head(ptr, b, h, s_b, s_h):
    """Base pointer of sample b, head h of a [B, L, H, d] tensor."""
    return ptr + b * s_b + h * s_h


@triton.jit
def _program_block(H, L, BLOCK: tl.constexpr):
    """This program's (b h, b, h) and its block of BLOCK positions (int64), with their validity mask, from a
    1-D grid of cdiv(L, BLOCK) B H programs (no 65,535 bound on B H) with the blocks varying fastest."""
    blocks = tl.cdiv(L, BLOCK)
    bh = (tl.program_id(0) // blocks).to(tl.int64)
    positions = (tl.program_id(0) % blocks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return bh, bh // H, bh % H, positions, positions < L


@triton.jit
def _keep(bh, L, queries, key0, seed_lo, seed_hi, rng_offset, threshold, BN: tl.constexpr):
    """Dropout keep mask [BM, BN] of P[b, h] at the `queries` (int64 [BM]) and keys key0 .. key0 + BN."""
    return dropout_keep_tile(bh * L + queries, key0, L, seed_lo, seed_hi, rng_offset, threshold, BN)


@triton.jit
def _query_block(q_ptr, k_ptr, v_ptr, H, L, s_qb, s_ql, s_qh, s_kb, s_kh, s_vb, s_vh,
                 D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr):
    """A program of BM queries: (b h, b, h), the queries and their mask, the head columns, the bases of this
    head's k and v, and its q rows [BM, BD]. Query blocks vary fastest: the programs of one head run together
    and share its K, V in L2."""
    bh, b, h, rows, row_ok = _program_block(H, L, BM)
    cd = tl.arange(0, BD)
    k_base = _head(k_ptr, b, h, s_kb, s_kh)
    v_base = _head(v_ptr, b, h, s_vb, s_vh)
    q = load_tile(_head(q_ptr, b, h, s_qb, s_qh), rows, row_ok, s_ql, 1, cd, D, BD)
    return bh, b, h, rows, row_ok, cd, k_base, v_base, q


@triton.jit
def _load_block(a_base, b_base, start, L, s_al, s_bl, cd, D: tl.constexpr, BD: tl.constexpr, BLOCK: tl.constexpr):
    """Positions start .. start + BLOCK (int64) of a head, their mask and the two tensors' rows there."""
    pos = start + tl.arange(0, BLOCK).to(tl.int64)
    ok = pos < L
    return pos, ok, load_tile(a_base, pos, ok, s_al, 1, cd, D, BD), load_tile(b_base, pos, ok, s_bl, 1, cd, D, BD)


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------


@triton.jit(do_not_specialize=RNG_ARGS)
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    H, L, s_qb, s_ql, s_qh, s_kb, s_kl, s_kh, s_vb, s_vl, s_vh, s_ob, s_ol, s_oh,
    qk_hi, qk_lo, ln2_hi, ln2_lo, inv_keep_hi, inv_keep_lo,
    seed_lo, seed_hi, rng_offset, threshold,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, EVEN: tl.constexpr,
    DROPOUT: tl.constexpr, PREC: tl.constexpr, FP64: tl.constexpr, ACC: tl.constexpr,
):
    bh, b, h, rows, row_ok, cd, k_base, v_base, q = _query_block(q_ptr, k_ptr, v_ptr, H, L, s_qb, s_ql, s_qh,
                                                                 s_kb, s_kh, s_vb, s_vh, D, BD, BM)
    qk_scale = float_arg(qk_hi, qk_lo, FP64)  # scale * log2(e): logits in base 2

    # Padding query rows load as 0: finite logits, never a NaN; they are not stored.
    m = tl.full([BM], float("-inf"), ACC)
    l = tl.zeros([BM], ACC)
    acc = tl.zeros([BM, BD], ACC)
    for n0 in range(0, L, BN):
        _, col_ok, k, v = _load_block(k_base, v_base, n0, L, s_kl, s_vl, cd, D, BD, BN)
        s = matmul_acc(q, tl.trans(k), PREC, FP64) * qk_scale
        if not EVEN:
            s = tl.where(col_ok[None, :], s, float("-inf"))
        # Every block has a valid column, so m_new is finite and alpha = 0 on the first block.
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _keep(bh, L, rows, n0, seed_lo, seed_hi, rng_offset, threshold, BN)
            p = p * keep.to(p.dtype)  # not tl.where: a dropped NaN stays NaN, as x * mask does
        acc = acc * alpha[:, None] + matmul_acc(p.to(v.dtype), v, PREC, FP64)
        m = m_new

    inv_l = 1.0 / l
    if DROPOUT:
        inv_l *= float_arg(inv_keep_hi, inv_keep_lo, FP64)
    store_tile(_head(out_ptr, b, h, s_ob, s_oh), acc * inv_l[:, None], rows, row_ok, s_ol, cd, D, BD)
    # Natural-log lse = m ln 2 + log l (ln 2 as a kernel argument: exact in float64).
    lse = m * float_arg(ln2_hi, ln2_lo, FP64) + tl.log(l)
    tl.store(lse_ptr + bh * L + rows, lse, mask=row_ok)


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------


@triton.jit
def _bwd_delta_kernel(
    out_ptr, do_ptr, delta_ptr,
    H, L, s_ob, s_ol, s_oh, s_db, s_dl, s_dh,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, ACC: tl.constexpr,
):
    """D_i = sum_c dO_ic O_ic, [B, H, L]."""
    bh, b, h, rows, row_ok = _program_block(H, L, BM)
    cd = tl.arange(0, BD)
    o = load_tile(_head(out_ptr, b, h, s_ob, s_oh), rows, row_ok, s_ol, 1, cd, D, BD)
    do = load_tile(_head(do_ptr, b, h, s_db, s_dh), rows, row_ok, s_dl, 1, cd, D, BD)
    tl.store(delta_ptr + bh * L + rows, tl.sum(o.to(ACC) * do.to(ACC), 1), mask=row_ok)


@triton.jit(do_not_specialize=RNG_ARGS)
def _bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    H, L, s_qb, s_ql, s_qh, s_kb, s_kl, s_kh, s_vb, s_vl, s_vh, s_db, s_dl, s_dh, s_gb, s_gl, s_gh,
    qk_hi, qk_lo, log2e_hi, log2e_lo, scale_hi, scale_lo, inv_keep_hi, inv_keep_lo,
    seed_lo, seed_hi, rng_offset, threshold,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    DROPOUT: tl.constexpr, PREC: tl.constexpr, FP64: tl.constexpr, ACC: tl.constexpr,
):
    """dV = (P Z)^T dO and dK = scale dS^T Q for a block of BN keys, in the transposed [keys, queries] frame."""
    bh, b, h, keys, key_ok = _program_block(H, L, BN)
    key0 = (tl.program_id(0) % tl.cdiv(L, BN)) * BN
    cd = tl.arange(0, BD)
    q_base = _head(q_ptr, b, h, s_qb, s_qh)
    do_base = _head(do_ptr, b, h, s_db, s_dh)
    k = load_tile(_head(k_ptr, b, h, s_kb, s_kh), keys, key_ok, s_kl, 1, cd, D, BD)
    v = load_tile(_head(v_ptr, b, h, s_vb, s_vh), keys, key_ok, s_vl, 1, cd, D, BD)
    qk_scale = float_arg(qk_hi, qk_lo, FP64)
    log2e = float_arg(log2e_hi, log2e_lo, FP64)
    inv_keep = float_arg(inv_keep_hi, inv_keep_lo, FP64)

    dk = tl.zeros([BN, BD], ACC)
    dv = tl.zeros([BN, BD], ACC)
    for m0 in range(0, L, BM):
        rows, row_ok, q, do = _load_block(q_base, do_base, m0, L, s_ql, s_dl, cd, D, BD, BM)
        # Padding query rows: lse = +inf gives P = 0 and q = dO = 0, so they add exact zeros.
        lse2 = tl.load(lse_ptr + bh * L + rows, mask=row_ok, other=float("inf")).to(ACC) * log2e
        delta = tl.load(delta_ptr + bh * L + rows, mask=row_ok, other=0.0)
        # Padding key rows may get inf/NaN here; they only reach their own (unstored) rows of dK, dV.
        p_t = tl.exp2(matmul_acc(k, tl.trans(q), PREC, FP64) * qk_scale - lse2[None, :])
        dp_t = matmul_acc(v, tl.trans(do), PREC, FP64)
        pz_t = p_t
        if DROPOUT:
            # The RNG draws along keys (groups of 4 columns): draw the [queries, keys] tile and transpose it.
            keep = tl.trans(_keep(bh, L, rows, key0, seed_lo, seed_hi, rng_offset, threshold, BN))
            # Products with the mask, not tl.where: a dropped NaN stays NaN, as in x * mask.
            pz_t = p_t * keep.to(p_t.dtype)  # times 1 / (1 - p) once, on dV
            dp_t = dp_t * tl.where(keep, inv_keep, 0.0)
        dv += matmul_acc(pz_t.to(do.dtype), do, PREC, FP64)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += matmul_acc(ds_t.to(q.dtype), q, PREC, FP64)

    if DROPOUT:
        dv *= inv_keep
    store_tile(_head(dv_ptr, b, h, s_gb, s_gh), dv, keys, key_ok, s_gl, cd, D, BD)
    store_tile(_head(dk_ptr, b, h, s_gb, s_gh), dk * float_arg(scale_hi, scale_lo, FP64), keys, key_ok, s_gl,
                cd, D, BD)


@triton.jit(do_not_specialize=RNG_ARGS)
def _bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    H, L, s_qb, s_ql, s_qh, s_kb, s_kl, s_kh, s_vb, s_vl, s_vh, s_db, s_dl, s_dh, s_gb, s_gl, s_gh,
    qk_hi, qk_lo, log2e_hi, log2e_lo, scale_hi, scale_lo, inv_keep_hi, inv_keep_lo,
    seed_lo, seed_hi, rng_offset, threshold,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, EVEN: tl.constexpr,
    DROPOUT: tl.constexpr, PREC: tl.constexpr, FP64: tl.constexpr, ACC: tl.constexpr,
):
    """dQ = scale dS K for a block of BM queries."""
    bh, b, h, rows, row_ok, cd, k_base, v_base, q = _query_block(q_ptr, k_ptr, v_ptr, H, L, s_qb, s_ql, s_qh,
                                                                 s_kb, s_kh, s_vb, s_vh, D, BD, BM)
    do = load_tile(_head(do_ptr, b, h, s_db, s_dh), rows, row_ok, s_dl, 1, cd, D, BD)
    qk_scale = float_arg(qk_hi, qk_lo, FP64)
    inv_keep = float_arg(inv_keep_hi, inv_keep_lo, FP64)
    lse2 = tl.load(lse_ptr + bh * L + rows, mask=row_ok, other=0.0).to(ACC) * float_arg(log2e_hi, log2e_lo, FP64)
    delta = tl.load(delta_ptr + bh * L + rows, mask=row_ok, other=0.0)

    dq = tl.zeros([BM, BD], ACC)
    for n0 in range(0, L, BN):
        _, col_ok, k, v = _load_block(k_base, v_base, n0, L, s_kl, s_vl, cd, D, BD, BN)
        p = tl.exp2(matmul_acc(q, tl.trans(k), PREC, FP64) * qk_scale - lse2[:, None])
        if not EVEN:
            # Padding keys (k = 0) would give p = 2^-lse2, possibly inf, and inf * 0 = NaN in dS K.
            p = tl.where(col_ok[None, :], p, 0.0)
        dp = matmul_acc(do, tl.trans(v), PREC, FP64)
        if DROPOUT:
            keep = _keep(bh, L, rows, n0, seed_lo, seed_hi, rng_offset, threshold, BN)
            dp = dp * tl.where(keep, inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        dq += matmul_acc(ds.to(k.dtype), k, PREC, FP64)
    store_tile(_head(dq_ptr, b, h, s_gb, s_gh), dq * float_arg(scale_hi, scale_lo, FP64), rows, row_ok, s_gl,
                cd, D, BD)


# ---------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------

def _config(D: int, dtype: torch.dtype, is_cuda: bool, dropout: bool) -> dict:
    """Tiles (BM queries, BN keys, warps, stages) per kernel; fixed, no autotuning.

    As FlashAttention-2: a wide query block in the forward and dQ kernels, a
    wide key block in the dK/dV kernel, narrow blocks on the loop axis. Sized
    with ptxas -v for sm_90 and sm_80 (Triton 3.8; benchmarks/compile_gpu_kernels.py) to run without spills:
    8 warps from d = 64 or with dropout (the Philox rounds keep many registers
    live per element); float32 gets small tiles, as its IEEE tl.dot runs on
    the FMA units with operands and accumulators in registers.
    """
    bd = max(16, triton.next_power_of_2(D))
    if not is_cuda or dtype == torch.float64:
        # Interpreter, or float64 on a GPU (broadcast product-sum in matmul_acc, tests only): small tiles,
        # on a GPU sized so that the [t, BD, t] float64 product stays near 64 values per thread at 4 warps
        # (no spills; benchmarks/compile_gpu_kernels.py checks the float64 variants the tests launch).
        t = 32 if not is_cuda else (16 if bd <= 32 else 8)
        tile = (t, t, 4, 1)
        return dict(BD=bd, fwd=tile, dkdv=tile, dq=tile)
    wide = bd == MAX_HEAD_DIM
    if dtype == torch.float32:
        return dict(BD=bd, fwd=(16 if wide else 64, 32, 8, 2), dkdv=(16 if wide else 32, 64, 8, 2),
                    dq=(16 if wide else 64, 32, 4 if bd <= 32 else 8, 2))
    warps = 8 if bd >= 64 or dropout else 4
    return dict(BD=bd, fwd=(128, 32 if wide else 64, warps, 3), dkdv=(32, 128, warps, 3), dq=(128, 32, warps, 3))


def _qk_scale(scale: float) -> tuple[float, float]:
    """scale log2 e, as a float pair: the kernels' softmax is in base 2."""
    return split_float(scale * math.log2(math.e))


def intra_sample_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                                   dropout_p: float, rng_state: torch.Tensor):
    """(out [B, L, H, d] contiguous in the input dtype, lse [B, H, L] float32 (float64 for float64))."""
    check_all_like(q, {"k": k, "v": v})
    check_rng_state(rng_state)
    q, k, v = (unit_last_stride(x) for x in (q, k, v))
    B, L, H, D = q.shape
    acc_t, acc_tl = acc_dtypes(q.dtype)
    out = torch.empty(B, L, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, L, dtype=acc_t, device=q.device)
    if H == 0:
        return out, lse
    c = _config(D, q.dtype, on_gpu(q), dropout_p > 0)
    bm, bn, warps, stages = c["fwd"]
    with device_context(q):
        launch(
            _fwd_kernel, (triton.cdiv(L, bm) * B * H,), q, k, v, out, lse, H, L,
            *blh_strides(q), *blh_strides(k), *blh_strides(v), *blh_strides(out),
            *_qk_scale(scale), *split_float(math.log(2.0)), *dropout_args(rng_state, dropout_p),
            D=D, BD=c["BD"], BM=bm, BN=bn, EVEN=L % bn == 0, DROPOUT=dropout_p > 0, PREC=dot_precision(q),
            FP64=acc_t == torch.float64, ACC=acc_tl, num_warps=warps, num_stages=stages)
    return out, lse


def intra_sample_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    out: torch.Tensor, lse: torch.Tensor, scale: float, dropout_p: float,
                                    rng_state: torch.Tensor):
    """(grad_q, grad_k, grad_v), new contiguous [B, L, H, d] in the input dtype."""
    check_all_like(q, {"k": k, "v": v, "grad_out": grad_out, "out": out})
    check_rng_state(rng_state)
    B, L, H, D = q.shape
    acc_t, acc_tl = acc_dtypes(q.dtype)
    check_like(lse, "lse (of the forward)", (B, H, L), acc_t, q.device)
    q, k, v, grad_out, out = (unit_last_stride(x) for x in (q, k, v, grad_out, out))
    lse = lse.contiguous()
    grads = [torch.empty(B, L, H, D, dtype=q.dtype, device=q.device) for _ in range(3)]
    if H == 0:
        return tuple(grads)
    grad_q, grad_k, grad_v = grads
    c = _config(D, q.dtype, on_gpu(q), dropout_p > 0)
    delta = torch.empty(B, H, L, dtype=acc_t, device=q.device)
    strides = (*blh_strides(q), *blh_strides(k), *blh_strides(v), *blh_strides(grad_out), *blh_strides(grad_q))
    scalars = (*_qk_scale(scale), *split_float(math.log2(math.e)), *split_float(scale),
               *dropout_args(rng_state, dropout_p))
    consts = dict(D=D, BD=c["BD"], DROPOUT=dropout_p > 0, PREC=dot_precision(q), FP64=acc_t == torch.float64,
                  ACC=acc_tl)
    with device_context(q):
        bm, _, warps, _ = c["dq"]  # the dQ kernel's row blocks, and warps for their [BM, BD] tiles
        launch(
            _bwd_delta_kernel, (triton.cdiv(L, bm) * B * H,), out, grad_out, delta, H, L,
            *blh_strides(out), *blh_strides(grad_out), D=D, BD=c["BD"], BM=bm, ACC=acc_tl, num_warps=warps)
        bm, bn, warps, stages = c["dkdv"]
        launch(
            _bwd_dkdv_kernel, (triton.cdiv(L, bn) * B * H,), q, k, v, grad_out, lse, delta, grad_k, grad_v, H, L,
            *strides, *scalars, BM=bm, BN=bn, num_warps=warps, num_stages=stages, **consts)
        bm, bn, warps, stages = c["dq"]
        launch(
            _bwd_dq_kernel, (triton.cdiv(L, bm) * B * H,), q, k, v, grad_out, lse, delta, grad_q, H, L,
            *strides, *scalars, BM=bm, BN=bn, EVEN=L % bn == 0, num_warps=warps, num_stages=stages, **consts)
    return grad_q, grad_k, grad_v
