"""Dropout with the counter-based RNG of the attention kernels (Philox4x32-10, csrc/philox.h).

``dropout(x, p)`` keeps element i of x's row-major elements iff word i mod 4 of Philox(seed, offset + i / 4)
is at least floor(p 2^32) (the attention spec on rows of 64 elements), and scales kept values by 1 / (1 - p).
``seed`` and ``offset`` are drawn from torch's default generator, so ``torch.manual_seed`` reproduces a run.
Against ``torch.nn.functional.dropout``: no mask is stored for the backward (it regenerates the mask from the
16-byte RNG state), and on CPU it draws the mask about 10x faster than torch's Bernoulli sampling.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from ._backend import Kernel
from ._checks import check_dropout_p, check_floating
from ._op import OpSpec, define


def draw_rng_state(dropout_p: float) -> Tensor:
    """int64 [seed, offset] for the kernels' Philox, drawn from torch's default generator (only when dropping)."""
    if dropout_p == 0.0:
        return torch.zeros(2, dtype=torch.int64)
    return torch.randint(0, 2**62, (2,), dtype=torch.int64)


def _fake(x, dropout_p, rng_state):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    _, ctx.dropout_p, rng_state = inputs
    ctx.save_for_backward(rng_state)


def _backward(op, ctx, grad):
    # Linear in x: the gradient is the same mask and scale applied to grad.
    (rng_state,) = ctx.saved_tensors
    return op(grad, ctx.dropout_p, rng_state), None, None


DROPOUT = define(OpSpec(
    name="dropout",
    forward_schema="(Tensor x, float dropout_p, Tensor rng_state) -> Tensor",
    backward_schema=None,
    # The CPU kernel draws the mask about 10x faster than torch's Bernoulli sampling; it takes float32/64.
    kernels=(Kernel("triton"), Kernel("cpu", upcast_half=True)),
    triton_module="dropout",
    fake_forward=_fake, fake_backward=None, setup_context=_setup, backward=_backward,
))


def dropout(x: Tensor, p: float = 0.5, training: bool = True, *, backend: str = "auto",
            return_mask: bool = False):
    """``torch.nn.functional.dropout`` with the Philox mask of the fused attention kernels.

    Args:
        x: any floating tensor (a contiguous copy is made if it is not contiguous).
        p: probability of dropping an element, in [0, 1).
        training: off (or ``p == 0``) returns ``x`` itself, as torch does.
        backend: "auto", "reference", "cpu" or "triton".
        return_mask: debug path: also return the keep mask used (bool, x's shape).

    Returns:
        x * keep / (1 - p), a new tensor of x's shape and dtype (or ``(out, mask)``).
    """
    check_floating(x, "x")
    p = check_dropout_p(p, "p")
    if not training or p == 0.0:
        return (x, torch.ones_like(x, dtype=torch.bool)) if return_mask else x
    rng_state = draw_rng_state(p)
    impl = DROPOUT.backend(backend, x.device, x, p, rng_state)
    mask = None
    if impl == "reference" or return_mask:
        mask = reference.dropout_mask(rng_state, x.shape, p, device=x.device)
    if impl == "reference":
        out = reference.dropout(x, p, mask)
    else:
        out = DROPOUT.forward(impl, x, p, rng_state)
    return (out, mask) if return_mask else out
