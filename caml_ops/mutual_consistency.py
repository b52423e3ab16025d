"""Mutual consistency loss between S sub-models' predictions, fused.

One pass over the logits per direction; no probability copies are kept (docs/design.md,
"mutual_consistency_loss"). The kernels live in csrc/cpu, csrc/cuda and caml_ops/triton; this module
holds the op's spec and the public function.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import reference
from ._backend import Kernel
from ._checks import check_floating, check_same, check_temperature
from ._op import OpSpec, contiguous_like, define, stats_dtype

# The CUDA kernels keep a row of C classes in registers: C <= kMutualConsistencyMaxClasses
# (csrc/cuda/mutual_consistency_kernel.h).
CUDA_MAX_CLASSES = 32


def _cuda_limits(logits, temperature):
    classes = logits[0].shape[1]
    if classes > CUDA_MAX_CLASSES:
        return f"C = {classes} classes is more than the CUDA kernels' {CUDA_MAX_CLASSES}"
    return None


def _fake_forward(logits, temperature):
    for x in logits[1:]:
        torch._check(x.shape == logits[0].shape, lambda: "every logits tensor must have the shape of logits[0]")
    return logits[0].new_empty((), dtype=stats_dtype(logits[0].dtype))


def _fake_backward(grad, logits, temperature):
    return [contiguous_like(x) for x in logits]


def _setup(ctx, inputs, output):
    logits, temperature = inputs
    ctx.save_for_backward(*logits)
    ctx.temperature = temperature


def _backward(backward_op, ctx, grad):
    logits = list(ctx.saved_tensors)
    return backward_op(grad, logits, ctx.temperature), None


LOSS = define(OpSpec(
    name="mutual_consistency_loss",
    forward_schema="(Tensor[] logits, float temperature) -> Tensor",
    backward_schema="(Tensor grad, Tensor[] logits, float temperature) -> Tensor[]",
    # auto's order on a GPU: the expected fastest first (not yet measured on a GPU); CPU kernels: float32/64.
    kernels=(Kernel("cuda", limits=_cuda_limits), Kernel("triton"), Kernel("cpu", upcast_half=True)),
    triton_module="mutual_consistency",
    fake_forward=_fake_forward, fake_backward=_fake_backward, setup_context=_setup, backward=_backward,
))


def _as_list(logits: Sequence[Tensor] | Tensor) -> list[Tensor]:
    if isinstance(logits, Tensor):
        check_floating(logits, "logits")
        if logits.dim() < 3:
            raise ValueError(
                f"logits as one tensor must be stacked [S, B, C, *spatial], got shape {tuple(logits.shape)}"
            )
        return list(logits.unbind(0))
    if not isinstance(logits, (list, tuple)):
        raise TypeError(f"logits must be a sequence of tensors or one stacked tensor, got {type(logits).__name__}")
    return list(logits)


def mutual_consistency_loss(
    logits: Sequence[Tensor] | Tensor, *, temperature: float = 0.1, backend: str = "auto"
) -> Tensor:
    """Mutual consistency of S >= 2 sub-models (CAML, MC-Net), fused.

    With ``p_s = softmax(logits[s], dim=1)`` and ``sharpen(p) = p^(1/T) / (p^(1/T) + (1-p)^(1/T))``::

        loss = sum over ordered pairs s != t of mean((p_s - sharpen(p_t)) ** 2)

    Gradients flow through both terms (nothing is detached).

    Args:
        logits: a sequence of S >= 2 tensors [B, C, *spatial] (same shape, dtype and device, C >= 2),
            or one stacked tensor [S, B, C, *spatial].
        temperature: sharpening temperature T, finite, in [1.18e-38, 1] (the smallest normal float32 to 1:
            above 1 the map softens, and its derivative at a probability of 0 or 1 is infinite).
        backend: "auto", "reference", "cpu", "triton" or "cuda".

    Returns:
        a 0-dim tensor in the logits' dtype.
    """
    logits = _as_list(logits)
    if len(logits) < 2:
        raise ValueError(f"logits must hold S >= 2 sub-models' predictions, got S = {len(logits)}")
    names = [f"logits[{s}]" for s in range(len(logits))]
    for x, name in zip(logits, names):
        check_floating(x, name)
    check_same(logits, names)
    first = logits[0]
    if first.dim() < 2 or first.shape[1] < 2:
        raise ValueError(f"logits[0] must be [B, C, *spatial] with C >= 2 classes, got shape {tuple(first.shape)}")
    for x, name in zip(logits[1:], names[1:]):
        if x.shape != first.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but logits[0] has {tuple(first.shape)}; they must match")
    if first.numel() == 0:
        raise ValueError(f"logits are empty (shape {tuple(first.shape)}): the mean over no voxels is undefined")
    temperature = check_temperature(temperature, at_most=1.0)
    impl = LOSS.backend(backend, first.device, logits, temperature)
    if impl == "reference":
        return reference.mutual_consistency_loss(logits, temperature)
    return LOSS.forward(impl, logits, temperature)
