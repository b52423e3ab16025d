"""Backend selection: which implementation of an op runs for given tensors.

Order of precedence: the ``backend=`` keyword (when not "auto"), then
:func:`set_backend`, then the ``CAML_OPS_BACKEND`` environment variable, then
the automatic choice for the tensors' device.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import warnings
from typing import Callable

import torch

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
_HALF = (torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One backend's kernels of an op, and what they take.

    Attributes:
        backend: "cpu" or "cuda" (C++ in csrc/, registered by caml_ops._C) or "triton" (caml_ops/triton).
        upcast_half: the kernels take float32 and float64 only; float16 and bfloat16 inputs run in
            float32 and the result is cast back (the CPU kernels).
        limits: ``limits(*forward_args) -> str | None``: why the forward kernel op's arguments are past
            what these kernels take (a head dim, a class count), or None. ``auto`` then takes the next
            backend; an explicit backend raises the reason.
    """

    backend: str
    upcast_half: bool = False
    limits: Callable[..., str | None] | None = None

    def cast(self, arg):
        """An argument of the forward kernel op in the dtype these kernels take."""
        if isinstance(arg, (list, tuple)):
            return [self.cast(a) for a in arg]
        if self.upcast_half and isinstance(arg, torch.Tensor) and arg.dtype in _HALF:
            return arg.to(torch.float32)
        return arg


# op name -> its kernels, in the order "auto" prefers them on a GPU (declared by caml_ops._op.define).
_KERNELS: dict[str, tuple[Kernel, ...]] = {}
# The C++ kernel ops the declared ops expect of caml_ops._C (csrc/caml_ops.cpp), and those with CUDA kernels.
_KERNEL_OPS: tuple[str, ...] = ()
_CUDA_KERNEL_OPS: tuple[str, ...] = ()

_selected = "auto"
_warned_missing_ext = False


def _load_extension() -> str | None:
    """None if caml_ops._C is importable and current, else what is wrong with it."""
    try:
        import caml_ops._C  # noqa: F401  (registers the torch.ops.caml_ops kernels)
    except ImportError:
        return "is not importable"
    for op in _KERNEL_OPS:
        if not hasattr(torch.ops.caml_ops, op):  # an editable install whose build predates this source
            return f"was built from older sources (it lacks caml_ops::{op})"
    return None


_EXTENSION_PROBLEM = _load_extension()
HAS_EXTENSION = _EXTENSION_PROBLEM is None
HAS_TRITON = importlib.util.find_spec("triton") is not None
# Whether the compiled extension carries the CUDA kernels (a constant, so torch.compile traces through).
EXTENSION_HAS_CUDA = False


def cpu_capability() -> str | None:
    """The build of the C++ CPU kernels that runs: "AVX512" or "AVX2" on x86-64, the lower of what the CPU
    supports and :func:`torch.backends.cpu.get_cpu_capability` (so ``ATEN_CPU_CAPABILITY=avx2`` forces
    AVX2; AVX2 is the lowest build), "DEFAULT" on other architectures; None without caml_ops._C."""
    try:
        from caml_ops import _C
    except ImportError:
        return None
    return _C.cpu_capability() if hasattr(_C, "cpu_capability") else None


def declare(op: str, kernels: tuple[Kernel, ...], kernel_ops: tuple[str, ...]) -> None:
    """Declare `op`'s kernels; its `kernel_ops` (names in torch.ops.caml_ops) must be in caml_ops._C if it
    has C++ ones."""
    global _KERNEL_OPS, _CUDA_KERNEL_OPS, _EXTENSION_PROBLEM, HAS_EXTENSION, EXTENSION_HAS_CUDA
    _KERNELS[op] = kernels
    backends = fused_backends(op)
    if "cpu" in backends or "cuda" in backends:
        _KERNEL_OPS += kernel_ops
        _EXTENSION_PROBLEM = _load_extension()
        HAS_EXTENSION = _EXTENSION_PROBLEM is None
    if "cuda" in backends:
        _CUDA_KERNEL_OPS += kernel_ops
    EXTENSION_HAS_CUDA = HAS_EXTENSION and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"caml_ops::{name}", "CUDA") for name in _CUDA_KERNEL_OPS
    ) and bool(_CUDA_KERNEL_OPS)


def extension_has(kernel_ops: tuple[str, ...]) -> bool:
    """Whether caml_ops._C is current and defines these kernel ops."""
    return HAS_EXTENSION and all(hasattr(torch.ops.caml_ops, op) for op in kernel_ops)


def fused_backends(op: str) -> tuple[str, ...]:
    """The backends with kernels for `op`, in the order "auto" prefers them on a GPU."""
    return tuple(k.backend for k in _KERNELS[op])


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def set_backend(backend: str) -> None:
    """Set the process-wide default backend ("auto", "reference", "cpu", "triton", "cuda")."""
    global _selected
    _selected = check_backend_name(backend, "backend")


def get_backend() -> str:
    """The process-wide default backend set by :func:`set_backend` (or "auto")."""
    return _selected


def check_backend_name(backend: str, what: str = "backend") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {backend!r}")
    return backend


def _extension_problem() -> str:
    return _EXTENSION_PROBLEM or "is not importable"  # (tests patch HAS_EXTENSION alone)


def _warn_missing_extension(fallback: str) -> None:
    global _warned_missing_ext
    if not _warned_missing_ext:
        _warned_missing_ext = True
        warnings.warn(
            f"caml_ops._C (the compiled kernels) {_extension_problem()}; "
            f"backend 'auto' falls back to '{fallback}'. "
            "Reinstall with `pip install --no-build-isolation -e .` to build it.",
            RuntimeWarning,
            stacklevel=4,
        )


def resolve(op: str, backend: str, device: torch.device, args: tuple = ()) -> str:
    """The concrete backend that runs `op` on `device` (for the forward kernel op's `args`, when given,
    within each kernel's declared limits); raises ValueError or RuntimeError, naming the cause, if it cannot."""
    choice = check_backend_name(backend, "backend")
    if choice == "auto":
        choice = _selected
    if choice == "auto":
        choice = check_backend_name(os.environ.get("CAML_OPS_BACKEND", "auto"), "CAML_OPS_BACKEND")
    if choice == "auto":
        return _auto(op, device, args)
    _check_usable(op, choice, device, args)
    return choice


def _beyond_limits(kernel: Kernel, args: tuple) -> str | None:
    return kernel.limits(*args) if args and kernel.limits is not None else None


def _auto(op: str, device: torch.device, args: tuple) -> str:
    for kernel in _KERNELS[op]:
        if _beyond_limits(kernel, args):
            continue
        if device.type == "cuda":
            if kernel.backend == "cuda" and EXTENSION_HAS_CUDA:
                return "cuda"
            if kernel.backend == "triton" and HAS_TRITON:
                if not HAS_EXTENSION:
                    _warn_missing_extension("triton")
                return "triton"
        elif device.type == "cpu" and kernel.backend == "cpu":
            if HAS_EXTENSION:
                return "cpu"
            _warn_missing_extension("reference")
    return "reference"


def _check_usable(op: str, backend: str, device: torch.device, args: tuple) -> None:
    if backend == "reference":
        return
    kernels = {k.backend: k for k in _KERNELS[op]}
    if backend not in kernels:
        usable = ", ".join(repr(b) for b in ("auto", "reference") + fused_backends(op))
        raise ValueError(f"{op} has no {backend!r} kernel; use one of {usable}")
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend 'cpu' runs on CPU tensors, got tensors on {device}")
        if not HAS_EXTENSION:
            raise RuntimeError(
                f"backend 'cpu' needs the compiled extension caml_ops._C, which {_extension_problem()}; "
                "rebuild it with `pip install --no-build-isolation -e .`"
            )
    elif backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend 'cuda' runs on CUDA tensors, got tensors on {device}")
        if not EXTENSION_HAS_CUDA:
            raise RuntimeError("backend 'cuda' needs caml_ops._C built with CUDA (torch with CUDA and nvcc at build time)")
    elif backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend 'triton' needs the triton package")
        if device.type == "cpu" and not triton_interpreted():
            raise ValueError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter)")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend 'triton' runs on CUDA tensors, got tensors on {device}")
    problem = _beyond_limits(kernels[backend], args)
    if problem:
        raise ValueError(f"{op} has no {backend!r} kernel for these inputs: {problem}; use backend 'auto'")
