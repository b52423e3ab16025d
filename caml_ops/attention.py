"""Cross-sample and intra-sample attention (CAML's CMA) on the [B, L, H, d] layout, fused.

q, k and v are the views a Linear on tokens [B, L, C] gives (``.view(B, L, 3, H, d).unbind(2)``): the
kernels read them through their strides, so no permute copies are made anywhere. The kernels live in
csrc/cpu, csrc/cuda (C++/CUDA) and caml_ops/triton; each op has a forward kernel returning the output
and the per-row log-sum-exp, and a backward kernel that recomputes the probabilities from them.

Dropout on the attention probabilities is drawn inside the kernels from a counter-based RNG (Philox4x32-10;
docs/design.md, "Dropout RNG (Philox)") seeded from torch's default generator, so ``torch.manual_seed``
reproduces a run and every backend, the reference included, draws the same mask. The backward regenerates
the mask instead of storing it. ``return_dropout_mask=True`` is the debug path: it also returns that mask,
which ``caml_ops.reference.<op>(..., dropout_mask=mask)`` reproduces. This module holds both ops' specs and
public functions (docs/design.md, "cross_sample_attention" and "intra_sample_attention").
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import reference
from ._backend import Kernel
from ._checks import check_dropout_p, check_floating, check_rank, check_same
from ._op import OpSpec, define, stats_dtype
from .dropout import draw_rng_state

_FORWARD_SCHEMA = "(Tensor q, Tensor k, Tensor v, float scale, float dropout_p, Tensor rng_state) -> (Tensor out, Tensor lse)"
_BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, float dropout_p,"
    " Tensor rng_state) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)"
)
# Head dims the kernels hold in registers: kCrossSampleAttentionMaxHeadDim (csrc/cuda/cross_sample_attention_kernel.h) and
# the Triton intra-sample tiles (caml_ops/triton/intra_sample_attention.py).
CUDA_CROSS_SAMPLE_MAX_HEAD_DIM = 256
TRITON_INTRA_SAMPLE_MAX_HEAD_DIM = 128


def _head_dim_at_most(limit: int, kernels: str):
    def limits(q, k, v, scale, dropout_p, rng_state):
        if q.shape[-1] > limit:
            return f"head dim d = {q.shape[-1]} is more than the {kernels} kernels' {limit}"
        return None

    return limits


def _lse_shape(name: str, q: Tensor) -> tuple[int, int, int]:
    batch, length, heads, _ = q.shape
    return (batch, length, heads) if name == "cross_sample_attention" else (batch, heads, length)


def _spec(name: str, kernels: tuple[Kernel, ...]) -> OpSpec:
    """Both attentions share schemas, fakes and autograd; only their lse layout differs."""

    def fake_forward(q, k, v, scale, dropout_p, rng_state):
        torch._check(k.shape == q.shape and v.shape == q.shape, lambda: "q, k and v must have one shape")
        return q.new_empty(q.shape), q.new_empty(_lse_shape(name, q), dtype=stats_dtype(q.dtype))

    def fake_backward(grad_out, q, k, v, out, lse, scale, dropout_p, rng_state):
        return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)

    def setup(ctx, inputs, output):
        q, k, v, scale, dropout_p, rng_state = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, rng_state)
        ctx.scale, ctx.dropout_p = scale, dropout_p

    def backward(backward_op, ctx, grad_out, _grad_lse):
        q, k, v, out, lse, rng_state = ctx.saved_tensors
        grad_q, grad_k, grad_v = backward_op(grad_out, q, k, v, out, lse, ctx.scale, ctx.dropout_p, rng_state)
        return grad_q, grad_k, grad_v, None, None, None

    return OpSpec(name=name, forward_schema=_FORWARD_SCHEMA, backward_schema=_BACKWARD_SCHEMA, kernels=kernels,
                  triton_module=name, fake_forward=fake_forward, fake_backward=fake_backward,
                  setup_context=setup, backward=backward)


# auto's order on a GPU: the expected fastest first (not yet measured on a GPU); CPU kernels: float32/64.
_OPS = {
    "cross_sample_attention": define(_spec("cross_sample_attention", (
        Kernel("cuda", limits=_head_dim_at_most(CUDA_CROSS_SAMPLE_MAX_HEAD_DIM, "CUDA")),
        Kernel("triton"),
        Kernel("cpu", upcast_half=True),
    ))),
    "intra_sample_attention": define(_spec("intra_sample_attention", (
        Kernel("triton", limits=_head_dim_at_most(TRITON_INTRA_SAMPLE_MAX_HEAD_DIM, "Triton")),
        Kernel("cpu", upcast_half=True),
    ))),
}


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, scale: float | None) -> float:
    """Validates the arguments; returns the scale to use."""
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        check_floating(x, name)
        check_rank(x, name, 4, "[B, L, H, d]")
    check_same((q, k, v), ("q", "k", "v"))
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k and v must have one shape [B, L, H, d], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.numel() == 0:
        raise ValueError(f"q, k and v must be non-empty [B, L, H, d], got shape {tuple(q.shape)}")
    check_dropout_p(dropout_p, "dropout_p")
    if scale is None:
        return q.shape[-1] ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number (or None for d^-0.5), got {scale!r}")
    return float(scale)


def _mask_shape(name: str, q: Tensor) -> tuple[int, int, int, int]:
    batch, length, heads, _ = q.shape
    return (length, heads, batch, batch) if name == "cross_sample_attention" else (batch, heads, length, length)


def _attention(
    name: str, q: Tensor, k: Tensor, v: Tensor, dropout_p: float, scale: float | None, backend: str,
    return_dropout_mask: bool,
):
    scale = _check_inputs(q, k, v, dropout_p, scale)
    dropout_p = float(dropout_p)
    rng_state = draw_rng_state(dropout_p)
    op = _OPS[name]
    impl = op.backend(backend, q.device, q, k, v, scale, dropout_p, rng_state)
    mask = None
    if dropout_p > 0.0 and (impl == "reference" or return_dropout_mask):
        mask = reference.attention_dropout_mask(rng_state, _mask_shape(name, q), dropout_p, device=q.device)
    if impl == "reference":
        out = getattr(reference, name)(q, k, v, dropout_p, scale, dropout_mask=mask)
    else:
        out = op.forward(impl, q, k, v, scale, dropout_p, rng_state)
    if not return_dropout_mask:
        return out
    if mask is None:
        mask = torch.ones(_mask_shape(name, q), dtype=torch.bool, device=q.device)
    return out, mask


def cross_sample_attention(
    q: Tensor, k: Tensor, v: Tensor, *, dropout_p: float = 0.0, scale: float | None = None, backend: str = "auto",
    return_dropout_mask: bool = False,
):
    """For every position l and head h, attention over the B samples (CAML's inter-sample attention).

    ``O[b,l,h] = sum_b' dropout(softmax_b'(scale q[b,l,h] . k[b',l,h])) v[b',l,h]``

    Args:
        q, k, v: [B, L, H, d], one dtype and device (a Linear's output on tokens [B, L, C], viewed
            [B, L, 3, H, d] and unbound: strided views are read in place). B from 1 to 64 is the
            intended range (B is the attended axis).
        dropout_p: dropout on the attention probabilities, in [0, 1); kept values scaled by 1 / (1 - p).
        scale: the logit scale; ``None`` means d^-0.5.
        backend: "auto", "reference", "cpu", "triton" or "cuda".
        return_dropout_mask: debug path: also return the keep mask used, bool [L, H, B, B]
            (query sample, key sample last), all True without dropout.

    Returns:
        [B, L, H, d] in the inputs' dtype (or ``(out, mask)``).
    """
    return _attention("cross_sample_attention", q, k, v, dropout_p, scale, backend, return_dropout_mask)


def intra_sample_attention(
    q: Tensor, k: Tensor, v: Tensor, *, dropout_p: float = 0.0, scale: float | None = None, backend: str = "auto",
    return_dropout_mask: bool = False,
):
    """For every sample b and head h, attention over the L positions (flash-style: memory O(L d), no L x L).

    ``O[b,l,h] = sum_m dropout(softmax_m(scale q[b,l,h] . k[b,m,h])) v[b,m,h]``

    Args:
        q, k, v: [B, L, H, d], one dtype and device (strided views of one projection are read in place).
        dropout_p: dropout on the attention probabilities, in [0, 1); kept values scaled by 1 / (1 - p).
        scale: the logit scale; ``None`` means d^-0.5.
        backend: "auto", "reference", "cpu", "triton" or "cuda" (no CUDA C++ kernel: Triton serves GPUs).
        return_dropout_mask: debug path: also return the keep mask used, bool [B, H, L, L]
            (query position, key position last; L x L memory, so for small L only), all True without dropout.

    Returns:
        [B, L, H, d] in the inputs' dtype (or ``(out, mask)``).
    """
    return _attention("intra_sample_attention", q, k, v, dropout_p, scale, backend, return_dropout_mask)
