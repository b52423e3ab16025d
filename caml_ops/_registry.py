"""torch.library glue shared by the ops' backend variants.

Each fused op has a forward and a backward kernel op per backend: the C++ ones
(``caml_ops::<name>``, defined in csrc/ with TORCH_LIBRARY, one kernel per
device) and the Triton ones (``caml_ops::<name>_triton``, custom ops defined in
Python). All variants of an op share one fake (meta) kernel and one autograd
formula, registered here once per variant.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from ._backend import HAS_EXTENSION


def op_variants(forward: str, backward: str) -> dict[str, tuple[str, str]]:
    """backend -> (forward op, backward op) for the variants that exist in this process."""
    variants = {"triton": (f"caml_ops::{forward}_triton", f"caml_ops::{backward}_triton")}
    if HAS_EXTENSION:
        variants["cpu"] = variants["cuda"] = (f"caml_ops::{forward}", f"caml_ops::{backward}")
    return variants


def contiguous_like(x: torch.Tensor) -> torch.Tensor:
    """A fake kernel's output like x, contiguous as every real kernel returns it (whatever x's strides)."""
    return x.new_empty(x.shape)


def _no_double_backward(backward_name: str) -> Callable:
    def backward(ctx, *grads):
        raise RuntimeError(
            f"{backward_name} has no derivative: caml_ops ops support first derivatives only (a backward "
            "through a gradient taken with create_graph=True, e.g. a gradient penalty or double backward, "
            "is not implemented); use backend='reference' for higher derivatives"
        )

    return backward


def resolve_op(qualname: str):
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name).default


def register_variants(
    variants: dict[str, tuple[str, str]],
    *,
    fake_forward: Callable,
    fake_backward: Callable,
    setup_context: Callable,
    backward: Callable,
) -> None:
    """Register fakes and autograd for every (forward, backward) variant.

    `backward(backward_op, ctx, *grads)` receives the variant's backward op.
    """
    for forward_name, backward_name in set(variants.values()):
        torch.library.register_fake(forward_name)(fake_forward)
        torch.library.register_fake(backward_name)(fake_backward)
        torch.library.register_autograd(
            forward_name,
            functools.partial(backward, resolve_op(backward_name)),
            setup_context=setup_context,
        )
        # Without a formula, autograd would let a C++ backward op fall through with zero second
        # derivatives (and only a warning); with this one, every backend raises alike.
        torch.library.register_autograd(backward_name, _no_double_backward(backward_name))
