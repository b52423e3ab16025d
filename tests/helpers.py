"""Shared test utilities: backends this machine runs, fresh random inputs, the
flash-attention tolerance rule."""
from __future__ import annotations

import os
import random

import pytest
import torch

from caml_ops import _backend

HAS_CUDA = torch.cuda.is_available()
_needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
# Tests that run a GPU kernel (the triton or cuda backend; on a CUDA device where there is one):
# benchmarks/device_check.sh runs `pytest -m gpu`.
gpu = pytest.mark.gpu


def requires_cuda(test):
    """Decorator: skipped without a CUDA GPU, and a GPU-kernel test (marker gpu)."""
    return gpu(_needs_cuda(test))


def runnable_backends(op: str) -> list:
    """pytest params (backend, device) for every fused backend of `op` this machine runs, skips for the rest."""
    params = []
    for backend in _backend.fused_backends(op):
        if backend == "cpu":
            marks = [pytest.mark.skipif(not _backend.HAS_EXTENSION, reason="caml_ops._C not built")]
            params.append(pytest.param("cpu", "cpu", marks=marks, id="cpu"))
        elif backend == "triton":
            device = "cuda" if HAS_CUDA else "cpu"
            ok = _backend.HAS_TRITON and (HAS_CUDA or _backend.triton_interpreted())
            marks = [pytest.mark.skipif(not ok, reason="needs triton on a GPU or TRITON_INTERPRET=1"), gpu]
            params.append(pytest.param("triton", device, marks=marks, id="triton"))
        elif backend == "cuda":
            marks = [_needs_cuda, pytest.mark.skipif(not _backend.EXTENSION_HAS_CUDA, reason="no CUDA kernels built"),
                     gpu]
            params.append(pytest.param("cuda", "cuda", marks=marks, id="cuda"))
    return params


def is_interpreted(backend: str, device: str) -> bool:
    return backend == "triton" and device == "cpu"


def fresh_seed() -> int:
    """A new seed per test run (inputs are fresh), reported in failure messages."""
    seed = int(os.environ.get("CAML_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    return seed


def fixed_seed(seed: int) -> int:
    """For the low-precision rule, which compares two samples of rounding error: fixed inputs make it
    reproducible, as in flash-attention's own suite."""
    torch.manual_seed(seed)
    return seed


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def assert_close_to_reference(actual, expected, seed: int, what: str, **tolerances) -> None:
    """float64 comparison against the reference (torch.testing defaults unless given)."""
    torch.testing.assert_close(
        actual.double(), expected.double(), msg=lambda m: f"{what} (seed {seed}): {m}", **tolerances
    )


def assert_within_2x_torch_error(fused, plain, reference, seed: int, what: str) -> None:
    """Flash-attention rule: the fused error against the float64 reference is at most twice the error of plain
    PyTorch in the same dtype (plus a floor of a few ulps of the reference's magnitude, for a near-zero plain error)."""
    fused_err, plain_err = max_error(fused, reference), max_error(plain, reference)
    floor = 4 * torch.finfo(plain.dtype).eps * max(reference.abs().max().item(), 1e-30) if reference.numel() else 0
    assert fused_err <= 2 * plain_err + floor, (
        f"{what} (seed {seed}): fused error {fused_err:.3e} > 2 x plain PyTorch error {plain_err:.3e} (+{floor:.1e})"
    )


def low_precision_cases(backends: list):
    """Parametrizes a 2x-of-PyTorch-error test over `backends` (runnable_backends params), float32 and
    both half types, and three fixed seeds; call :func:`skip_interpreted_half` first in the test."""
    def decorate(test):
        test = pytest.mark.parametrize("seed", [0, 1, 2])(test)
        test = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])(test)
        return pytest.mark.parametrize("backend,device", backends)(test)

    return decorate


def skip_interpreted_half(backend: str, device: str, dtype: torch.dtype) -> None:
    if device == "cpu" and dtype != torch.float32 and backend != "cpu":
        pytest.skip("half types are exercised on the GPU for Triton")
