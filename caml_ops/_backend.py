"""Backend selection: which implementation of an op runs for given tensors.

Order of precedence: the ``backend=`` keyword (when not "auto"), then
:func:`set_backend`, then the ``CAML_OPS_BACKEND`` environment variable, then
the automatic choice for the tensors' device.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")

# The fused backends each op has. On CUDA, "auto" takes the first one listed
# that is usable (ordered by the measured speed, benchmarks/RESULTS.md).
_FUSED = {
    "omni_correlation_loss": ("triton", "cpu"),
    "omni_correlation": ("triton", "cpu"),
    "mutual_consistency_loss": ("cuda", "triton", "cpu"),
    "cross_sample_attention": ("cuda", "triton", "cpu"),
    "intra_sample_attention": ("triton", "cpu"),
    "dropout": ("triton", "cpu"),
}

# The kernel ops csrc/caml_ops.cpp defines.
_KERNEL_OPS = tuple(
    f"{name}_{step}"
    for name in ("omni_correlation_loss", "omni_correlation", "mutual_consistency_loss", "cross_sample_attention",
                 "intra_sample_attention")
    for step in ("forward", "backward")
) + ("dropout",)

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


# Whether the compiled extension carries CUDA kernels (a constant, so torch.compile traces through).
EXTENSION_HAS_CUDA = HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key(
    "caml_ops::mutual_consistency_loss_forward", "CUDA"
)


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


def resolve(op: str, backend: str, device: torch.device) -> str:
    """The concrete backend that runs `op` on `device`; raises ValueError if it cannot."""
    choice = check_backend_name(backend, "backend")
    if choice == "auto":
        choice = _selected
    if choice == "auto":
        choice = check_backend_name(os.environ.get("CAML_OPS_BACKEND", "auto"), "CAML_OPS_BACKEND")
    if choice == "auto":
        return _auto(op, device)
    _check_usable(op, choice, device)
    return choice


def _auto(op: str, device: torch.device) -> str:
    fused = _FUSED[op]
    if device.type == "cuda":
        if "cuda" in fused and EXTENSION_HAS_CUDA:
            return "cuda"
        if "triton" in fused and HAS_TRITON:
            if not HAS_EXTENSION:
                _warn_missing_extension("triton")
            return "triton"
    elif device.type == "cpu" and "cpu" in fused:
        if HAS_EXTENSION:
            return "cpu"
        _warn_missing_extension("reference")
    return "reference"


def _check_usable(op: str, backend: str, device: torch.device) -> None:
    if backend == "reference":
        return
    if backend not in _FUSED[op]:
        usable = ", ".join(repr(b) for b in ("auto", "reference") + _FUSED[op])
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
