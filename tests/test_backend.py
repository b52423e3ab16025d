"""Backend selection: keyword, set_backend, CAML_OPS_BACKEND, automatic choice and fallbacks."""
from __future__ import annotations

import warnings

import pytest
import torch

import caml_ops
from caml_ops import _backend

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def restore_backend(monkeypatch):
    monkeypatch.delenv("CAML_OPS_BACKEND", raising=False)
    yield
    caml_ops.set_backend("auto")


def test_keyword_beats_set_backend_beats_environment(monkeypatch):
    monkeypatch.setenv("CAML_OPS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.resolve("omni_correlation_loss", "auto", CPU) == "triton"
    caml_ops.set_backend("reference")
    assert caml_ops.get_backend() == "reference"
    assert _backend.resolve("omni_correlation_loss", "auto", CPU) == "reference"
    assert _backend.resolve("omni_correlation_loss", "triton", CPU) == "triton"


def test_auto_on_cpu_takes_the_cpp_kernels_when_built(monkeypatch):
    monkeypatch.setattr(_backend, "HAS_EXTENSION", True)
    for op in caml_ops._op.OPS:
        assert _backend.resolve(op, "auto", CPU) == "cpu"


def test_auto_on_cuda_prefers_the_measured_fastest(monkeypatch):
    monkeypatch.setattr(_backend, "HAS_EXTENSION", True)
    monkeypatch.setattr(_backend, "EXTENSION_HAS_CUDA", True)
    monkeypatch.setattr(_backend, "HAS_TRITON", True)
    cuda = torch.device("cuda", 0)
    assert _backend.resolve("mutual_consistency_loss", "auto", cuda) == "cuda"
    assert _backend.resolve("omni_correlation_loss", "auto", cuda) == "triton"
    assert _backend.resolve("cross_sample_attention", "auto", cuda) == "cuda"
    assert _backend.resolve("intra_sample_attention", "auto", cuda) == "triton"
    monkeypatch.setattr(_backend, "EXTENSION_HAS_CUDA", False)
    assert _backend.resolve("mutual_consistency_loss", "auto", cuda) == "triton"
    assert _backend.resolve("cross_sample_attention", "auto", cuda) == "triton"


def test_missing_extension_falls_back_and_warns_once(monkeypatch):
    monkeypatch.setattr(_backend, "HAS_EXTENSION", False)
    monkeypatch.setattr(_backend, "_warned_missing_ext", False)
    with pytest.warns(RuntimeWarning, match="caml_ops._C"):
        assert _backend.resolve("omni_correlation_loss", "auto", CPU) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.resolve("omni_correlation_loss", "auto", CPU) == "reference"
    with pytest.raises(RuntimeError, match="caml_ops._C"):
        _backend.resolve("omni_correlation_loss", "cpu", CPU)


@pytest.mark.parametrize("name", ["gpu", "", "CPU"])
def test_unknown_names_are_rejected(monkeypatch, name):
    with pytest.raises(ValueError, match="backend"):
        caml_ops.set_backend(name)
    monkeypatch.setenv("CAML_OPS_BACKEND", name)
    with pytest.raises(ValueError, match="CAML_OPS_BACKEND"):
        _backend.resolve("omni_correlation_loss", "auto", CPU)


def test_backend_device_mismatches_are_explained(monkeypatch):
    monkeypatch.setattr(_backend, "EXTENSION_HAS_CUDA", True)
    with pytest.raises(ValueError, match="CUDA tensors"):
        _backend.resolve("mutual_consistency_loss", "cuda", CPU)
    with pytest.raises(ValueError, match="no 'cuda' kernel"):
        _backend.resolve("omni_correlation_loss", "cuda", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        _backend.resolve("omni_correlation_loss", "triton", CPU)


def test_public_ops_honour_the_environment_variable(monkeypatch):
    monkeypatch.setenv("CAML_OPS_BACKEND", "reference")
    calls = []
    monkeypatch.setattr(caml_ops.reference, "mutual_consistency_loss", lambda *a: calls.append(a) or torch.zeros(()))
    caml_ops.mutual_consistency_loss([torch.randn(1, 2, 3)] * 2)
    assert len(calls) == 1


def test_a_stale_extension_counts_as_missing(monkeypatch):
    """An editable install whose _C predates the Python sources (an op schema missing) must not break the
    import: the extension is treated as missing and the message says to rebuild."""
    pytest.importorskip("caml_ops._C")
    assert _backend._load_extension() is None
    monkeypatch.setattr(_backend, "_KERNEL_OPS", _backend._KERNEL_OPS + ("no_such_op",))
    problem = _backend._load_extension()
    assert problem == "was built from older sources (it lacks caml_ops::no_such_op)"
    monkeypatch.setattr(_backend, "_EXTENSION_PROBLEM", problem)
    monkeypatch.setattr(_backend, "HAS_EXTENSION", False)
    with pytest.raises(RuntimeError, match="older sources.*rebuild"):
        _backend.resolve("cross_sample_attention", "cpu", CPU)
