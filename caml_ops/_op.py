"""One declaration per op: :class:`OpSpec`. Registration, dispatch and the backend tables derive from it.

An op ``name`` has kernel ops ``caml_ops::<name>_forward`` and ``caml_ops::<name>_backward`` (or one
op ``caml_ops::<name>`` when it is linear and its own backward, as dropout is): the C++ ones are defined in
csrc/caml_ops.cpp with one kernel per device, the Triton ones (``..._triton``) are custom ops defined here
from the spec's schemas around the host functions of ``caml_ops/triton/<triton_module>.py``. Every variant
shares the spec's fake kernels and autograd formula. docs/adding_an_op.md is the recipe; docs/design.md,
"Dispatch", the rules.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Callable

import torch

from . import _backend
from ._backend import Kernel


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the statistics a forward kernel saves (and accumulates in): float64 for float64
    inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def contiguous_like(x: torch.Tensor) -> torch.Tensor:
    """A fake kernel's output like x, contiguous as every real kernel returns it (whatever x's strides)."""
    return x.new_empty(x.shape)


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """Everything about one fused op but its public function and its kernels' code.

    Attributes:
        name: the public name (``caml_ops.<name>``), also the stem of its kernel ops.
        forward_schema, backward_schema: the kernel ops' schemas without the name, e.g.
            ``"(Tensor feat, Tensor memory, float temperature) -> Tensor"``, as in csrc/caml_ops.cpp
            (tests/test_op_specs.py checks they agree). ``backward_schema=None``: the op is linear in its
            first argument and is its own backward.
        kernels: the fused backends, in the order ``auto`` prefers them on a GPU.
        triton_module: ``caml_ops/triton/<triton_module>.py``, with host functions named like the kernel ops.
        fake_forward, fake_backward: shapes and dtypes of the kernel ops' outputs (torch.compile, meta).
        setup_context: ``(ctx, inputs, output)``, saves what the backward needs.
        backward: ``(backward_op, ctx, *grads) -> input grads``, given the variant's backward op.
    """

    name: str
    forward_schema: str
    backward_schema: str | None
    kernels: tuple[Kernel, ...]
    triton_module: str
    fake_forward: Callable
    fake_backward: Callable | None
    setup_context: Callable
    backward: Callable

    def kernel_op_names(self) -> tuple[str, ...]:
        if self.backward_schema is None:
            return (self.name,)
        return (f"{self.name}_forward", f"{self.name}_backward")


class Op:
    """A declared op: its kernel ops per backend, dispatch and the call of a forward kernel."""

    def __init__(self, spec: OpSpec) -> None:
        self.spec = spec
        self.kernels = {k.backend: k for k in spec.kernels}
        names = spec.kernel_op_names()
        self.variants = {"triton": tuple(self._define_triton(name) for name in names)}
        if _backend.extension_has(names):
            cpp = tuple(_resolve(f"caml_ops::{name}") for name in names)
            for backend in ("cpu", "cuda"):
                if backend in self.kernels:
                    self.variants[backend] = cpp
        for ops in set(self.variants.values()):
            self._register(*ops)

    def backend(self, backend: str, device: torch.device, *args) -> str:
        """The concrete backend that runs the op on `args` (the forward kernel op's arguments) on `device`."""
        return _backend.resolve(self.spec.name, backend, device, args)

    def forward(self, backend: str, *args):
        """The forward kernel op of a fused `backend` on `args`, tensors in the dtype its kernels take.
        Returns its first output in the dtype of the first tensor argument."""
        kernel = self.kernels[backend]
        outputs = self.variants[backend][0](*(kernel.cast(a) for a in args))
        out = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
        first = args[0][0] if isinstance(args[0], (list, tuple)) else args[0]
        return out.to(first.dtype)

    def kernel_op(self, backend: str, step: int = 0) -> torch._ops.OpOverload:
        """The variant of `backend`: its forward (step 0) or backward (step 1) kernel op."""
        return self.variants[backend][step]

    def _define_triton(self, name: str) -> torch._ops.OpOverload:
        spec, kernel = self.spec, self.kernels["triton"]
        schema = spec.forward_schema if name != f"{spec.name}_backward" else spec.backward_schema

        def run(*args):
            if kernel.limits is not None and name != f"{spec.name}_backward":
                problem = kernel.limits(*args)
                if problem:
                    raise ValueError(f"{spec.name} (triton): {problem}")
            # Imported on first call: Triton is optional and slow to import.
            module = importlib.import_module(f"caml_ops.triton.{spec.triton_module}")
            return getattr(module, name)(*args)

        torch.library.custom_op(f"caml_ops::{name}_triton", run, mutates_args=(), schema=schema)
        return _resolve(f"caml_ops::{name}_triton")

    def _register(self, forward: torch._ops.OpOverload, backward: torch._ops.OpOverload | None = None) -> None:
        spec = self.spec
        torch.library.register_fake(forward)(spec.fake_forward)
        if backward is None:  # its own backward: differentiable any number of times
            torch.library.register_autograd(
                forward, functools.partial(spec.backward, forward), setup_context=spec.setup_context
            )
            return
        torch.library.register_fake(backward)(spec.fake_backward)
        torch.library.register_autograd(
            forward, functools.partial(spec.backward, backward), setup_context=spec.setup_context
        )
        # Without a formula, autograd would let a C++ backward op fall through with zero second
        # derivatives (and only a warning); with this one, every backend raises alike.
        torch.library.register_autograd(backward, _no_double_backward(backward.name()))


# Every declared op by name.
OPS: dict[str, Op] = {}


def define(spec: OpSpec) -> Op:
    """Register `spec`'s variants and declare its kernels to the dispatcher."""
    _backend.declare(spec.name, spec.kernels, spec.kernel_op_names())
    OPS[spec.name] = Op(spec)
    return OPS[spec.name]


def _resolve(qualname: str) -> torch._ops.OpOverload:
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name).default


def _no_double_backward(backward_name: str) -> Callable:
    def backward(ctx, *grads):
        raise RuntimeError(
            f"{backward_name} has no derivative: caml_ops ops support first derivatives only (a backward "
            "through a gradient taken with create_graph=True, e.g. a gradient penalty or double backward, "
            "is not implemented); use backend='reference' for higher derivatives"
        )

    return backward
