"""Fused Triton kernels of the mutual consistency loss (see docs/design.md, section mutual_consistency_loss).

The math is that of csrc/cpu/mutual_consistency.cpp (its header comment):
softmax from e_j = exp(x_j - max), sharpening as sigmoid(z) with
z = (x_c - max - log D_c) / T, D_c = sum_{j != c} e_j (stable for tiny T and
far-apart logits), pair sums shifted by model 0's probability, gradients
through h_c = p dL/dp + r dL/dq and the softmax Jacobian.

A program owns a [C, BLOCK_N] tile (all classes of BLOCK_N voxels of one
sample) and loops over the S models. The logits are not stacked: the kernels
get a device table of the S tensors' addresses and cast each entry to a
pointer (as Triton's grouped GEMM tutorial does), so any S works without a
copy. Forward writes one partial per program, summed in a fixed order by a
second kernel (deterministic, no atomics); backward reads the logits in two
sweeps over the models (the second from cache) and writes each gradient once.
Accumulation is float32 (float64 for float64 inputs). The public op
(caml_ops/mutual_consistency.py) validates the user's arguments; the host
functions check only what the kernels' indexing relies on.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

from ._common import acc_dtypes, check_all_like, check_like, device_context, float_arg, launch, split_float

# Below this, sum_{j != argmax} exp(x_j - max) is recomputed through the second largest logit.
_TINY = 2.0**-100


@triton.jit
def _load_model(table, s, like, offs, cls, mask, C: tl.constexpr, ACC: tl.constexpr):
    """Logits of model s on the tile, in ACC; -inf for the padding classes, 0 for padding voxels."""
    ptr = tl.load(table + s).to(tl.pointer_type(like.dtype.element_ty))
    x = tl.load(ptr + offs, mask=mask, other=0.0).to(ACC)
    return tl.where(cls[:, None] < C, x, float("-inf"))


@triton.jit
def _sharpen(x, cls, inv_t, C: tl.constexpr, TINY: tl.constexpr):
    """p = softmax(x) over axis 0, q = sharpen(p), r = p dq/dp; as sharpen_voxels in the C++ kernels."""
    m = tl.max(x, axis=0)
    is_am = cls[:, None] == tl.argmax(x, axis=0)[None, :]  # first argmax
    xs = x - m[None, :]
    e = tl.exp(xs)
    others = tl.sum(tl.where(is_am, 0.0, e), axis=0)  # sum_{j != argmax} e_j
    total = 1.0 + others
    log_others = tl.log(others)
    if tl.min(others, axis=0) < TINY:  # rare: the argmax dominates so far that the others' sum underflows
        m2 = tl.max(tl.where(is_am, float("-inf"), xs), axis=0)
        rest = tl.sum(tl.where(is_am, 0.0, tl.exp(xs - m2[None, :])), axis=0)
        # Where m2 = -inf (every other logit is -inf), rest is exp(-inf + inf) = NaN; log D is -inf there.
        log_rest = tl.where(m2 == float("-inf"), float("-inf"), m2 + tl.log(rest))
        log_others = tl.where(others < TINY, log_rest, log_others)
    # log D_c; for C = 2 the other class's D is e_argmax = 1 exactly.
    if C == 2:
        log_d = tl.where(is_am, log_others[None, :], 0.0)
    else:
        log_d = tl.where(is_am, log_others[None, :], tl.log(total[None, :] - e))
    z = (xs - log_d) * inv_t
    a = tl.exp(-tl.abs(z))
    inv_1a = 1.0 / (1.0 + a)
    q = tl.where(z >= 0, inv_1a, a * inv_1a)
    # log D = -inf (p = q = 1): -|z| - log D = log D (1/T - 1) in the limit, not -inf + inf.
    log_r = tl.where(log_d == float("-inf"), tl.where(inv_t == 1.0, 0.0, log_d * (inv_t - 1.0)), -tl.abs(z) - log_d)
    r = tl.exp(log_r) * total[None, :] * inv_1a * inv_1a * inv_t
    p = e / total[None, :]
    return p, q, r


@triton.jit
def _tile(pid, N, BLOCK_N: tl.constexpr, C: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets (int64) and mask of the tile of program pid: sample b, voxels n."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    b = pid // tiles_n
    n = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    cls = tl.arange(0, BLOCK_C)
    offs = (b.to(tl.int64) * C + cls[:, None]) * N + n[None, :]
    mask = (cls[:, None] < C) & (n[None, :] < N)
    return offs, mask, cls, n < N


@triton.jit
def _forward_kernel(table, like, partials, S, N, inv_t_hi, inv_t_lo,
                    C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
                    FP64: tl.constexpr, TINY: tl.constexpr):
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid = tl.program_id(0)
    inv_t = float_arg(inv_t_hi, inv_t_lo, FP64)
    offs, mask, cls, voxel_ok = _tile(pid, N, BLOCK_N, C, BLOCK_C)
    ref, q, _ = _sharpen(_load_model(table, 0, like, offs, cls, mask, C, ACC), cls, inv_t, C, TINY)
    # Model 0 has u = 0, w = q - ref.
    U = tl.zeros_like(ref)
    W = q - ref
    squares = W * W
    cross = tl.zeros_like(ref)
    for s in range(1, S):
        p, q, _ = _sharpen(_load_model(table, s, like, offs, cls, mask, C, ACC), cls, inv_t, C, TINY)
        u = p - ref
        w = q - ref
        U += u
        W += w
        squares += u * u + w * w
        cross += u * w
    loss = (S - 1) * squares - 2.0 * (U * W - cross)
    loss = tl.where(voxel_ok[None, :], loss, 0.0)
    tl.store(partials + pid, tl.sum(tl.sum(loss, axis=1), axis=0))


@triton.jit
def _sum_kernel(partials, count, numel, out, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], partials.dtype.element_ty)
    for start in range(0, count, BLOCK):
        i = start + tl.arange(0, BLOCK)
        acc += tl.load(partials + i, mask=i < count, other=0.0)
    tl.store(out, tl.sum(acc, axis=0) / numel.to(partials.dtype.element_ty))


@triton.jit
def _backward_kernel(table, grad_table, like, grad, S, N, numel, inv_t_hi, inv_t_lo,
                     C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
                     FP64: tl.constexpr, TINY: tl.constexpr):
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid = tl.program_id(0)
    inv_t = float_arg(inv_t_hi, inv_t_lo, FP64)
    k = 2.0 * tl.load(grad).to(ACC) / numel.to(ACC)
    offs, mask, cls, voxel_ok = _tile(pid, N, BLOCK_N, C, BLOCK_C)
    ref, q, _ = _sharpen(_load_model(table, 0, like, offs, cls, mask, C, ACC), cls, inv_t, C, TINY)
    U = tl.zeros_like(ref)
    W = q - ref
    for s in range(1, S):
        p, q, _ = _sharpen(_load_model(table, s, like, offs, cls, mask, C, ACC), cls, inv_t, C, TINY)
        U += p - ref
        W += q - ref
    for s in range(0, S):
        p, q, r = _sharpen(_load_model(table, s, like, offs, cls, mask, C, ACC), cls, inv_t, C, TINY)
        u = p - ref
        w = q - ref
        h = p * (k * ((S - 1) * u - (W - w))) + r * (k * ((S - 1) * w - (U - u)))
        dx = h - p * tl.sum(h, axis=0)[None, :]
        gptr = tl.load(grad_table + s).to(tl.pointer_type(like.dtype.element_ty))
        tl.store(gptr + offs, dx.to(like.dtype.element_ty), mask=mask)


def _prepare(logits, temperature):
    """(contiguous logits, B, N, 1 / temperature as a float pair, meta-parameters) for the kernels."""
    x0 = logits[0]
    # The kernels read every tensor with logits[0]'s sizes, through pointers of its dtype.
    check_all_like(x0, {f"logits[{s}]": x for s, x in enumerate(logits) if s > 0})
    xs = [x.contiguous() for x in logits]
    B, C = x0.shape[0], x0.shape[1]
    N = x0.numel() // (B * C)
    block_c = triton.next_power_of_2(C)
    block_n = max(16, min(max(2048 // block_c, 16), triton.next_power_of_2(N)))
    meta = dict(C=C, BLOCK_C=block_c, BLOCK_N=block_n, FP64=x0.dtype == torch.float64, TINY=_TINY)
    return xs, B, N, split_float(1.0 / temperature), meta


# Device tables of the tensors' addresses, by (device, addresses). A new set of addresses takes one
# non-blocking copy from pinned memory (no host sync; the entry keeps the pinned source alive until the
# copy has run); a known set none at all, so a CUDA graph captured after a warm-up call (which Triton's
# compilation needs anyway) replays with its tables in place. The caching allocator hands the same
# addresses back step after step, so a few entries serve a training run.
_TABLES: OrderedDict = OrderedDict()
_MAX_TABLES = 256


def _table(tensors):
    device = tensors[0].device
    key = (device, tuple(t.data_ptr() for t in tensors))
    entry = _TABLES.get(key)
    if entry is None:
        host = torch.tensor(key[1], dtype=torch.int64)
        if device.type == "cuda":
            host = host.pin_memory()
            entry = (host, host.to(device, non_blocking=True))
        else:
            entry = (host, host)
        _TABLES[key] = entry
        if len(_TABLES) > _MAX_TABLES:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return entry[1]


def mutual_consistency_loss_forward(logits: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """sum_{s != t} mean((softmax(logits[s]) - sharpen(softmax(logits[t])))^2): 0-dim, float32 (float64 for float64)."""
    xs, B, N, inv_t, meta = _prepare(logits, temperature)
    acc, _ = acc_dtypes(xs[0].dtype)
    programs = B * triton.cdiv(N, meta["BLOCK_N"])
    partials = torch.empty(programs, dtype=acc, device=xs[0].device)
    out = torch.empty((), dtype=acc, device=xs[0].device)
    with device_context(xs[0]):
        launch(_forward_kernel, (programs,), _table(xs), xs[0], partials, len(xs), N, *inv_t, **meta)
        launch(_sum_kernel, (1,), partials, programs, xs[0].numel(), out, BLOCK=1024)
    return out


def mutual_consistency_loss_backward(grad: torch.Tensor, logits: list[torch.Tensor], temperature: float) -> list[torch.Tensor]:
    """Gradients of mutual_consistency_loss_forward w.r.t. each logits tensor, times grad (0-dim)."""
    xs, B, N, inv_t, meta = _prepare(logits, temperature)
    check_like(grad, "grad (of the 0-dim loss)", ())  # the kernel reads one element
    grads = [torch.empty_like(x) for x in xs]
    programs = B * triton.cdiv(N, meta["BLOCK_N"])
    with device_context(xs[0]):
        launch(
            _backward_kernel, (programs,),
            _table(xs), _table(grads), xs[0], grad.to(xs[0].device).contiguous(), len(xs), N, xs[0].numel(), *inv_t,
            **meta,
        )
    return grads
