"""Omni-correlation: CAML's omni-correlation consistency (OCC) loss and the correlation matrix, fused.

Public ops :func:`omni_correlation_loss` and :func:`omni_correlation` (docs/design.md,
"omni_correlation_loss" and "omni_correlation"); their kernels live in csrc/cpu/omni_correlation.cpp and
caml_ops/triton/omni_correlation.py; this module holds their specs (schemas, kernels, fakes, autograd).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from ._backend import Kernel
from ._checks import (
    check_choice,
    check_eps,
    check_floating,
    check_rank,
    check_same,
    check_temperature,
)
from ._op import OpSpec, contiguous_like, define, stats_dtype

REDUCTIONS = ("mean", "sum", "none")
# auto's order on a GPU: the expected fastest first (not yet measured on a GPU); CPU kernels: float32/64.
_KERNELS = (Kernel("triton"), Kernel("cpu", upcast_half=True))


def _fake_loss_forward(feat_v, feat_a, memory, temperature, eps):
    torch._check(feat_a.shape == feat_v.shape, lambda: "feat_a must have the shape of feat_v")
    torch._check(memory.shape[1] == feat_v.shape[1], lambda: "memory must have the width D of feat_v")
    # loss_rows [N], lse_v [N, 2], lse_a [N, 2] (log-sum-exp as hi, lo), r_sum [N]
    rows = feat_v.new_empty(feat_v.shape[0], dtype=stats_dtype(feat_v.dtype))
    lse = rows.new_empty(rows.shape[0], 2)
    return rows, lse, torch.empty_like(lse), torch.empty_like(rows)


def _fake_loss_backward(grad_rows, feat_v, feat_a, memory, *stats_and_scalars):
    return contiguous_like(feat_v), contiguous_like(feat_a), contiguous_like(memory)


def _setup_loss(ctx, inputs, output):
    feat_v, feat_a, memory, temperature, eps = inputs
    ctx.save_for_backward(feat_v, feat_a, memory, *output)
    ctx.temperature, ctx.eps = temperature, eps


def _loss_backward(backward_op, ctx, grad_rows, *_stat_grads):
    # lse_v, lse_a and r_sum are saved statistics, not differentiable outputs.
    feat_v, feat_a, memory, rows, lse_v, lse_a, r_sum = ctx.saved_tensors
    grad_v, grad_a, grad_m = backward_op(
        grad_rows.to(rows.dtype).contiguous(),
        feat_v, feat_a, memory, rows, lse_v, lse_a, r_sum,
        ctx.temperature, ctx.eps, ctx.needs_input_grad[2],
    )
    return grad_v, grad_a, (grad_m if ctx.needs_input_grad[2] else None), None, None


def _fake_corr_forward(feat, memory, temperature):
    torch._check(memory.shape[1] == feat.shape[1], lambda: "memory must have the width D of feat")
    return feat.new_empty(feat.shape[0], memory.shape[0])


def _fake_corr_backward(grad_out, probs, feat, memory, temperature, memory_grad):
    return contiguous_like(feat), contiguous_like(memory)


def _setup_corr(ctx, inputs, output):
    feat, memory, temperature = inputs
    ctx.save_for_backward(output, feat, memory)
    ctx.temperature = temperature


def _corr_backward(backward_op, ctx, grad_out):
    probs, feat, memory = ctx.saved_tensors
    grad_f, grad_m = backward_op(
        grad_out.contiguous(), probs, feat, memory, ctx.temperature, ctx.needs_input_grad[1]
    )
    return grad_f, (grad_m if ctx.needs_input_grad[1] else None), None


LOSS = define(OpSpec(
    name="omni_correlation_loss",
    forward_schema="(Tensor feat_v, Tensor feat_a, Tensor memory, float temperature, float eps)"
                   " -> (Tensor loss_rows, Tensor lse_v, Tensor lse_a, Tensor r_sum)",
    backward_schema="(Tensor grad_rows, Tensor feat_v, Tensor feat_a, Tensor memory, Tensor loss_rows,"
                    " Tensor lse_v, Tensor lse_a, Tensor r_sum, float temperature, float eps, bool memory_grad)"
                    " -> (Tensor grad_feat_v, Tensor grad_feat_a, Tensor grad_memory)",
    kernels=_KERNELS, triton_module="omni_correlation",
    fake_forward=_fake_loss_forward, fake_backward=_fake_loss_backward,
    setup_context=_setup_loss, backward=_loss_backward,
))
CORRELATION = define(OpSpec(
    name="omni_correlation",
    forward_schema="(Tensor feat, Tensor memory, float temperature) -> Tensor",
    backward_schema="(Tensor grad_out, Tensor probs, Tensor feat, Tensor memory, float temperature,"
                    " bool memory_grad) -> (Tensor grad_feat, Tensor grad_memory)",
    kernels=_KERNELS, triton_module="omni_correlation",
    fake_forward=_fake_corr_forward, fake_backward=_fake_corr_backward,
    setup_context=_setup_corr, backward=_corr_backward,
))


# --- public API ---


def _check_features(feat: Tensor, memory: Tensor, feat_name: str) -> None:
    check_rank(feat, feat_name, 2, "[N, D] (one embedding per row)")
    check_rank(memory, "memory", 2, "[K, D] (one memory-bank embedding per row)")
    if memory.shape[0] == 0:
        raise ValueError("memory is empty (K = 0): the memory bank needs at least one embedding")
    if feat.shape[1] != memory.shape[1]:
        raise ValueError(
            f"{feat_name} has embedding width D = {feat.shape[1]} but memory has D = {memory.shape[1]}; they must match"
        )


def omni_correlation_loss(
    feat_v: Tensor,
    feat_a: Tensor,
    memory: Tensor,
    *,
    temperature: float = 0.1,
    eps: float = 1e-8,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """CAML's omni-correlation consistency loss, fused (memory O((N + K) D), never N x K).

    For row i, with p = softmax(feat_v[i] @ memory.T / temperature) and q the
    same for feat_a: ``l_i = -sum_j q_j log(p_j + eps)``.

    Args:
        feat_v: [N, D] embeddings of the first sub-model (the "prediction").
        feat_a: [N, D] embeddings of the second sub-model (the target; gradients flow to it too, as in CAML).
        memory: [K, D] labeled embeddings of the memory bank, K >= 1; gets gradients if it requires them.
        temperature: softmax temperature, finite and >= 1.18e-38 (the smallest normal float32).
        eps: finite, >= 0, added inside the log (CAML: 1e-8); 0 gives the exact cross-entropy ``lse(s_v) - q . s_v``.
        reduction: "mean" (sum / N; the CAML loss), "sum" or "none" ([N]). N = 0 gives 0 with zero gradients.
        backend: "auto", "reference", "cpu", "triton" or "cuda" (see caml_ops.set_backend).

    Returns:
        a 0-dim tensor, or [N] for reduction="none", in the dtype of the features.
    """
    for x, name in ((feat_v, "feat_v"), (feat_a, "feat_a"), (memory, "memory")):
        check_floating(x, name)
    check_same((feat_v, feat_a, memory), ("feat_v", "feat_a", "memory"))
    _check_features(feat_v, memory, "feat_v")
    if feat_a.shape != feat_v.shape:
        raise ValueError(f"feat_a must have the shape of feat_v {tuple(feat_v.shape)}, got {tuple(feat_a.shape)}")
    temperature = check_temperature(temperature)
    eps = check_eps(eps)
    check_choice(reduction, "reduction", REDUCTIONS)
    args = (feat_v, feat_a, memory, temperature, eps)
    impl = LOSS.backend(backend, feat_v.device, *args)
    if impl == "reference":
        return reference.omni_correlation_loss(*args, reduction)
    return reference.reduce_rows(LOSS.forward(impl, *args), reduction)


def omni_correlation(feat: Tensor, memory: Tensor, *, temperature: float = 0.1, backend: str = "auto") -> Tensor:
    """Correlation matrix ``softmax(feat @ memory.T / temperature, dim=1)``, fused GEMM + softmax.

    Args:
        feat: [N, D] embeddings; memory: [K, D] memory-bank embeddings (K >= 1).
        temperature: softmax temperature, finite and >= 1.18e-38 (the smallest normal float32).
        backend: "auto", "reference", "cpu", "triton" or "cuda".

    Returns:
        [N, K] row-stochastic matrix in the dtype of `feat`; differentiable in feat and memory.
    """
    check_floating(feat, "feat")
    check_floating(memory, "memory")
    check_same((feat, memory), ("feat", "memory"))
    _check_features(feat, memory, "feat")
    temperature = check_temperature(temperature)
    args = (feat, memory, temperature)
    impl = CORRELATION.backend(backend, feat.device, *args)
    if impl == "reference":
        return reference.omni_correlation(*args)
    return CORRELATION.forward(impl, *args)
