"""The op declarations (caml_ops/_op.py): schemas agree with csrc/, kernel limits with the kernels, and
dispatch honours the limits."""
from __future__ import annotations

import pathlib
import re

import pytest
import torch

from caml_ops import _backend, _op, attention, mutual_consistency

ROOT = pathlib.Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)


def _without_names(schema: str) -> str:
    """`(Tensor q, float scale) -> (Tensor out, Tensor lse)` -> `(Tensor, float) -> (Tensor, Tensor)`."""
    return re.sub(r"(\w+(?:\[\])?) \w+", r"\1", schema)


def _cpp_schemas() -> dict[str, str]:
    source = (ROOT / "csrc" / "caml_ops.cpp").read_text()
    defs = re.findall(r'm\.def\(((?:\s*"[^"]*")+)\)', source)
    schemas = {}
    for pieces in defs:
        text = "".join(re.findall(r'"([^"]*)"', pieces))
        name, rest = text.split("(", 1)
        schemas[name] = "(" + rest
    return schemas


@pytest.mark.parametrize("name", sorted(_op.OPS))
def test_triton_schemas_are_the_cpp_schemas(name):
    spec = _op.OPS[name].spec
    cpp = _cpp_schemas()
    schemas = (spec.forward_schema,) if spec.backward_schema is None else (spec.forward_schema, spec.backward_schema)
    for kernel_op, schema in zip(spec.kernel_op_names(), schemas):
        assert _without_names(cpp[kernel_op]) == _without_names(schema), kernel_op


def test_every_cpp_op_is_declared():
    declared = {n for op in _op.OPS.values() for n in op.spec.kernel_op_names()}
    assert set(_cpp_schemas()) == declared


@pytest.mark.parametrize("declared,header,constant", [
    (attention.CUDA_CROSS_SAMPLE_MAX_HEAD_DIM, "csrc/cuda/cross_sample_attention_kernel.h", "kCrossSampleAttentionMaxHeadDim"),
    (mutual_consistency.CUDA_MAX_CLASSES, "csrc/cuda/mutual_consistency_kernel.h", "kMutualConsistencyMaxClasses"),
])
def test_declared_cuda_limits_are_the_kernels(declared, header, constant):
    match = re.search(rf"{constant}\s*=\s*(\d+)", (ROOT / header).read_text())
    assert match and int(match.group(1)) == declared


def test_declared_triton_limit_is_the_kernels():
    pytest.importorskip("triton")
    from caml_ops.triton import intra_sample_attention as kernels

    assert kernels.MAX_HEAD_DIM == attention.TRITON_INTRA_SAMPLE_MAX_HEAD_DIM


def _attention_args(d: int, device=CPU):
    q = torch.empty(2, 3, 1, d, device="meta")
    return q, q, q, d ** -0.5, 0.0, torch.zeros(2, dtype=torch.int64)


@pytest.fixture
def gpu_backends(monkeypatch):
    """Dispatch as on a machine with the CUDA kernels and Triton (nothing runs)."""
    monkeypatch.delenv("CAML_OPS_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_selected", "auto")
    monkeypatch.setattr(_backend, "HAS_EXTENSION", True)
    monkeypatch.setattr(_backend, "EXTENSION_HAS_CUDA", True)
    monkeypatch.setattr(_backend, "HAS_TRITON", True)


def test_auto_takes_the_next_backend_past_a_limit(gpu_backends):
    limit = attention.CUDA_CROSS_SAMPLE_MAX_HEAD_DIM
    assert _backend.resolve("cross_sample_attention", "auto", CUDA, _attention_args(limit)) == "cuda"
    assert _backend.resolve("cross_sample_attention", "auto", CUDA, _attention_args(limit + 1)) == "triton"
    limit = attention.TRITON_INTRA_SAMPLE_MAX_HEAD_DIM
    assert _backend.resolve("intra_sample_attention", "auto", CUDA, _attention_args(limit)) == "triton"
    assert _backend.resolve("intra_sample_attention", "auto", CUDA, _attention_args(limit + 1)) == "reference"
    logits = [torch.empty(1, mutual_consistency.CUDA_MAX_CLASSES + 1, 4, device="meta")] * 2
    assert _backend.resolve("mutual_consistency_loss", "auto", CUDA, (logits, 0.1)) == "triton"


def test_an_explicit_backend_past_its_limit_names_the_limit(gpu_backends):
    with pytest.raises(ValueError, match=r"head dim d = 257 is more than the CUDA kernels' 256"):
        _backend.resolve("cross_sample_attention", "cuda", CUDA, _attention_args(257))
    logits = [torch.empty(1, 33, 4, device="meta")] * 2
    with pytest.raises(ValueError, match="C = 33 classes is more than the CUDA kernels' 32"):
        _backend.resolve("mutual_consistency_loss", "cuda", CUDA, (logits, 0.1))


def test_the_triton_custom_op_checks_the_limit_too():
    pytest.importorskip("triton")
    q = torch.randn(1, 2, 1, attention.TRITON_INTRA_SAMPLE_MAX_HEAD_DIM + 1)
    forward = _op.OPS["intra_sample_attention"].kernel_op("triton")
    with pytest.raises(ValueError, match="head dim d = 129"):
        forward(q, q, q, 1.0, 0.0, torch.zeros(2, dtype=torch.int64))


def test_half_inputs_run_in_float32_on_the_cpu_kernels_only():
    x = torch.randn(3, dtype=torch.bfloat16)
    cpu = {k.backend: k for k in _op.OPS["dropout"].spec.kernels}
    assert cpu["cpu"].cast(x).dtype == torch.float32
    assert cpu["triton"].cast(x).dtype == torch.bfloat16
    assert [t.dtype for t in cpu["cpu"].cast([x, x.double()])] == [torch.float32, torch.float64]
