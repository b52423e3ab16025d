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
