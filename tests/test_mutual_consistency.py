"""mutual_consistency_loss on every backend against the float64 reference."""
from __future__ import annotations

import pytest
import torch

import caml_ops
from caml_ops import reference

from .helpers import (assert_close_to_reference, assert_within_2x_torch_error, fixed_seed, fresh_seed,
                      low_precision_cases, runnable_backends, skip_interpreted_half)

BACKENDS = runnable_backends("mutual_consistency_loss")

SHAPES = [  # [B, C, *spatial]: 3D and 2D, awkward sizes
    (3, 2, 7, 5, 3),
    (1, 5, 13, 11),
    (2, 3, 9, 1, 17),
    (2, 2, 33),
]


def make_logits(s, shape, dtype=torch.float64, device="cpu", scale=2.0):
    return [(torch.randn(shape, dtype=torch.float64) * scale).to(device, dtype).requires_grad_() for _ in range(s)]


def check_against_reference(backend, device, s, shape, temperature, scale=2.0):
    seed = fresh_seed()
    logits = make_logits(s, shape, device=device, scale=scale)
    out = caml_ops.mutual_consistency_loss(logits, temperature=temperature, backend=backend)
    ref = reference.mutual_consistency_loss(logits, temperature)
    assert out.dtype == torch.float64 and out.shape == ()
    assert_close_to_reference(out, ref, seed, "loss")
    grads = torch.autograd.grad(out * 3.0, logits)
    ref_grads = torch.autograd.grad(ref * 3.0, logits)
    for i, (grad, ref_grad) in enumerate(zip(grads, ref_grads)):
        assert torch.isfinite(grad).all(), f"non-finite grad of logits[{i}] (seed {seed})"
        assert_close_to_reference(grad, ref_grad, seed, f"grad of logits[{i}]")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("s", [2, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_matches_reference_float64(backend, device, s, shape, temperature):
    check_against_reference(backend, device, s, shape, temperature)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("c", [2, 4])
def test_peaked_logits_stay_finite_and_exact(backend, device, c):
    # logits of +-50 and T = 0.01: probabilities of 0 and 1 and sharpening exponent 100.
    check_against_reference(backend, device, 2, (2, c, 6, 5, 4), temperature=0.01, scale=25.0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_stacked_tensor_equals_sequence(backend, device):
    fresh_seed()
    stacked = torch.randn(3, 2, 3, 4, 5, dtype=torch.float64, device=device)
    assert torch.equal(
        caml_ops.mutual_consistency_loss(stacked, backend=backend),
        caml_ops.mutual_consistency_loss(list(stacked), backend=backend),
    )


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_noncontiguous_logits(backend, device):
    seed = fresh_seed()
    base = torch.randn(2, 5, 3, 8, 6, dtype=torch.float64, device=device)
    # strided classes and an offset view, both with transposed spatial axes
    logits = [base[:, 0:4:2].transpose(2, 4).requires_grad_(), base[:, 3:5].transpose(2, 4).requires_grad_()]
    out = caml_ops.mutual_consistency_loss(logits, backend=backend)
    ref = reference.mutual_consistency_loss(logits)
    assert_close_to_reference(out, ref, seed, "non-contiguous loss")
    for grad, ref_grad in zip(torch.autograd.grad(out, logits), torch.autograd.grad(ref, logits)):
        assert_close_to_reference(grad, ref_grad, seed, "non-contiguous grad")


@low_precision_cases(BACKENDS)
def test_low_precision_within_2x_of_pytorch_error(backend, device, dtype, seed):
    skip_interpreted_half(backend, device, dtype)
    fixed_seed(seed)
    logits = [x.detach().to(dtype).requires_grad_() for x in make_logits(2, (2, 3, 10, 9, 7), device=device)]
    exact = [x.detach().double().requires_grad_() for x in logits]
    ref = reference.mutual_consistency_loss(exact)
    plain = reference.mutual_consistency_loss(logits)
    out = caml_ops.mutual_consistency_loss(logits, backend=backend)
    assert out.dtype == dtype
    assert_within_2x_torch_error(out, plain, ref, seed, f"{dtype} loss")
    ref_grads = torch.autograd.grad(ref, exact)
    plain_grads = torch.autograd.grad(plain, logits)
    for i, (grad, plain_grad, ref_grad) in enumerate(zip(torch.autograd.grad(out, logits), plain_grads, ref_grads)):
        assert grad.dtype == dtype
        assert_within_2x_torch_error(grad, plain_grad, ref_grad, seed, f"{dtype} grad of logits[{i}]")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_deterministic(backend, device):
    fresh_seed()
    logits = make_logits(2, (2, 2, 31, 29, 7), dtype=torch.float32, device=device)
    first = caml_ops.mutual_consistency_loss(logits, backend=backend)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU reduction order must not depend on the thread count
    try:
        second = caml_ops.mutual_consistency_loss(logits, backend=backend)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, second)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    from caml_ops._op import OPS

    fresh_seed()
    logits = make_logits(2, (2, 3, 4, 5), device=device)
    forward = OPS["mutual_consistency_loss"].kernel_op(backend)
    torch.library.opcheck(forward, (logits, 0.1))
    torch.library.opcheck(forward, (make_logits(3, (1, 2, 3, 3, 2), device=device), 0.3))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    seed = fresh_seed()
    torch._dynamo.reset()
    logits = make_logits(2, (2, 2, 5, 4, 3), device=device)
    compiled = torch.compile(
        lambda a, b: caml_ops.mutual_consistency_loss([a, b], backend=backend) * 2,
        fullgraph=True,
        backend="aot_eager" if device == "cpu" else "inductor",
    )
    out = compiled(*logits)
    ref = reference.mutual_consistency_loss(logits) * 2
    assert_close_to_reference(out, ref, seed, "compiled loss")
    for grad, ref_grad in zip(torch.autograd.grad(out, logits), torch.autograd.grad(ref, logits)):
        assert_close_to_reference(grad, ref_grad, seed, "compiled grad")


BAD_INPUTS = [
    ("S = 1", lambda: [torch.randn(2, 2, 4)], ValueError, "S >= 2"),
    ("C = 1", lambda: [torch.randn(2, 1, 4), torch.randn(2, 1, 4)], ValueError, "C >= 2"),
    ("shape mismatch", lambda: [torch.randn(2, 2, 4), torch.randn(2, 2, 5)], ValueError, r"logits\[1\]"),
    ("integer logits", lambda: [torch.ones(2, 2, 4, dtype=torch.int64)] * 2, TypeError, r"logits\[0\]"),
    ("mixed dtypes", lambda: [torch.randn(2, 2, 4), torch.randn(2, 2, 4, dtype=torch.float64)], TypeError,
     r"logits\[1\]"),
    ("1-D logits", lambda: [torch.randn(4), torch.randn(4)], ValueError, "C >= 2"),
    ("empty batch", lambda: [torch.randn(0, 2, 4), torch.randn(0, 2, 4)], ValueError, "empty"),
    ("not a sequence", lambda: 3.0, TypeError, "logits"),
]


@pytest.mark.parametrize("backend,device", BACKENDS + [pytest.param("reference", "cpu", id="reference")])
@pytest.mark.parametrize("case,make,error,needle", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(backend, device, case, make, error, needle):
    logits = make()
    if isinstance(logits, list):
        logits = [x.to(device) for x in logits]
    with pytest.raises(error, match=needle):
        caml_ops.mutual_consistency_loss(logits, backend=backend)


@pytest.mark.parametrize("temperature", [0.0, -0.1])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        caml_ops.mutual_consistency_loss([torch.randn(2, 2, 4)] * 2, temperature=temperature)
