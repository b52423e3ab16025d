"""omni_correlation_loss and omni_correlation on every backend against the float64 reference."""
from __future__ import annotations

import pytest
import torch

import caml_ops
from caml_ops import reference

from .helpers import (assert_close_to_reference, assert_within_2x_torch_error, fixed_seed, fresh_seed,
                      is_interpreted, low_precision_cases, runnable_backends, skip_interpreted_half)

LOSS_BACKENDS = runnable_backends("omni_correlation_loss")
CORR_BACKENDS = runnable_backends("omni_correlation")


def make_inputs(n, k, d, dtype=torch.float64, device="cpu", scale=1.0):
    feat_v = (torch.randn(n, d, dtype=torch.float64) * scale).to(device, dtype).requires_grad_()
    feat_a = (torch.randn(n, d, dtype=torch.float64) * scale).to(device, dtype).requires_grad_()
    memory = torch.randn(k, d, dtype=torch.float64).to(device, dtype).requires_grad_()
    return feat_v, feat_a, memory


def loss_and_grads(fn, inputs, weights, **kwargs):
    """Per-row losses weighted by `weights` (so every row's upstream gradient differs), and the input grads."""
    rows = fn(*inputs, reduction="none", **kwargs)
    grads = torch.autograd.grad((rows * weights.to(rows.dtype)).sum(), inputs)
    return rows.detach(), grads


# Triton's interpreter runs a kernel program at a time in numpy: it gets the small shapes.
INTERPRETER_MAX_ROWS, INTERPRETER_MAX_COLS = 97, 130


def check_against_reference(backend, device, n, k, d, eps, temperature=0.1, scale=1.0):
    if is_interpreted(backend, device):
        n, k = min(n, INTERPRETER_MAX_ROWS), min(k, INTERPRETER_MAX_COLS)
    seed = fresh_seed()
    inputs = make_inputs(n, k, d, device=device, scale=scale)
    weights = torch.rand(n, dtype=torch.float64, device=device)
    ref_rows, ref_grads = loss_and_grads(reference.omni_correlation_loss, inputs, weights, temperature=temperature,
                                         eps=eps)
    rows, grads = loss_and_grads(caml_ops.omni_correlation_loss, inputs, weights, temperature=temperature, eps=eps,
                                 backend=backend)
    assert rows.dtype == torch.float64
    assert_close_to_reference(rows, ref_rows, seed, "loss rows")
    for name, grad, ref in zip(("feat_v", "feat_a", "memory"), grads, ref_grads):
        assert torch.isfinite(grad).all(), f"non-finite grad of {name} (seed {seed})"
        assert_close_to_reference(grad, ref, seed, f"grad of {name}")


@pytest.mark.parametrize("backend,device", LOSS_BACKENDS)
@pytest.mark.parametrize("eps", [1e-8, 0.0])
@pytest.mark.parametrize("n,k,d", [(1, 1, 16), (7, 77, 32), (1000, 300, 64), (130, 513, 96)])
def test_loss_matches_reference_float64(backend, device, n, k, d, eps):
    check_against_reference(backend, device, n, k, d, eps)


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", LOSS_BACKENDS)
def test_loss_large_n_matches_reference(backend, device):
    if is_interpreted(backend, device):
        pytest.skip("too slow for Triton's interpreter; runs on the GPU")
    check_against_reference(backend, device, 33_333, 257, 32, 1e-8)


@pytest.mark.parametrize("backend,device", LOSS_BACKENDS)
@pytest.mark.parametrize("eps", [1e-8, 0.0])
def test_peaked_softmax_stays_finite_and_exact(backend, device, eps):
    # temperature 0.01 with large features: logits of order 1e4, probabilities of exactly 0 and 1.
    check_against_reference(backend, device, 61, 45, 32, eps, temperature=0.01, scale=10.0)


@pytest.mark.parametrize("backend,device", LOSS_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(backend, device, reduction):
    seed = fresh_seed()
    inputs = make_inputs(37, 29, 16, device=device)
    out = caml_ops.omni_correlation_loss(*inputs, reduction=reduction, backend=backend)
    ref = reference.omni_correlation_loss(*inputs, reduction=reduction)
    assert out.shape == ref.shape
    assert_close_to_reference(out, ref, seed, f"reduction={reduction}")
    grads = torch.autograd.grad(out.sum(), inputs)
    ref_grads = torch.autograd.grad(ref.sum(), inputs)
    for grad, ref_grad in zip(grads, ref_grads):
        assert_close_to_reference(grad, ref_grad, seed, f"grad, reduction={reduction}")


@low_precision_cases(LOSS_BACKENDS)
def test_low_precision_within_2x_of_pytorch_error(backend, device, dtype, seed):
    skip_interpreted_half(backend, device, dtype)
    # eps = 1e-8 is 0 in float16, where plain PyTorch's log(p + eps) turns NaN: compare the exact form there.
    eps = 0.0 if dtype == torch.float16 else 1e-8
    fixed_seed(seed)
    inputs64 = make_inputs(300, 129, 32, device=device)
    inputs = [x.detach().to(dtype).requires_grad_() for x in inputs64]
    weights = torch.rand(300, dtype=torch.float64, device=device)
    exact = [x.detach().to(dtype).double().requires_grad_() for x in inputs]  # same rounded inputs, in float64
    ref_rows, ref_grads = loss_and_grads(reference.omni_correlation_loss, exact, weights, eps=eps)
    plain_rows, plain_grads = loss_and_grads(reference.omni_correlation_loss, inputs, weights, eps=eps)
    rows, grads = loss_and_grads(caml_ops.omni_correlation_loss, inputs, weights, eps=eps, backend=backend)
    assert rows.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_within_2x_torch_error(rows, plain_rows, ref_rows, seed, f"{dtype} loss rows")
    for name, grad, plain, ref in zip(("feat_v", "feat_a", "memory"), grads, plain_grads, ref_grads):
        assert_within_2x_torch_error(grad, plain, ref, seed, f"{dtype} grad of {name}")


@pytest.mark.parametrize("backend,device", LOSS_BACKENDS)
def test_float16_with_eps_stays_finite(backend, device):
    if device == "cpu" and backend != "cpu":
        pytest.skip("half types are exercised on the GPU for Triton")
    fresh_seed()
    inputs = [x.detach().half().requires_grad_() for x in make_inputs(50, 33, 16, device=device)]
    loss = caml_ops.omni_correlation_loss(*inputs, eps=1e-8, backend=backend)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in torch.autograd.grad(loss, inputs))


@pytest.mark.parametrize("backend,device", LOSS_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_no_rows_gives_zero_loss_and_zero_grads(backend, device, reduction):
    inputs = make_inputs(0, 5, 16, device=device)
    out = caml_ops.omni_correlation_loss(*inputs, reduction=reduction, backend=backend)
    assert out.item() == 0.0
    grads = torch.autograd.grad(out, inputs, allow_unused=True, materialize_grads=True)
    assert all(torch.count_nonzero(g) == 0 for g in grads)
    assert grads[2].shape == (5, 16)


@pytest.mark.parametrize("backend,device", LOSS_BACKENDS)
def test_memory_without_grad_and_noncontiguous_inputs(backend, device):
    seed = fresh_seed()
    wide_v = torch.randn(19, 64, dtype=torch.float64, device=device)
    wide_a = torch.randn(64, 19, dtype=torch.float64, device=device)
    feat_v = wide_v[:, ::2].requires_grad_()  # strided columns
    feat_a = wide_a.T[:, 32:].requires_grad_()  # transposed
    memory = torch.randn(23, 32, dtype=torch.float64, device=device)  # a detached memory bank, as in CAML
    out = caml_ops.omni_correlation_loss(feat_v, feat_a, memory, backend=backend)
    ref = reference.omni_correlation_loss(feat_v, feat_a, memory)
    assert_close_to_reference(out, ref, seed, "non-contiguous loss")
    grads = torch.autograd.grad(out, (feat_v, feat_a))
    ref_grads = torch.autograd.grad(ref, (feat_v, feat_a))
    for grad, ref_grad in zip(grads, ref_grads):
        assert_close_to_reference(grad, ref_grad, seed, "non-contiguous grad")


@pytest.mark.parametrize("backend,device", LOSS_BACKENDS)
def test_memory_grad_is_deterministic(backend, device):
    fresh_seed()
    inputs = make_inputs(1000, 77, 32, dtype=torch.float32, device=device)
    first = torch.autograd.grad(caml_ops.omni_correlation_loss(*inputs, backend=backend), inputs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU kernels' reduction order must not depend on the thread count
    try:
        second = torch.autograd.grad(caml_ops.omni_correlation_loss(*inputs, backend=backend), inputs)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", CORR_BACKENDS)
@pytest.mark.parametrize("n,k,d", [(1, 1, 16), (7, 77, 32), (300, 130, 96)])
def test_correlation_matrix_matches_reference_float64(backend, device, n, k, d):
    seed = fresh_seed()
    feat, _, memory = make_inputs(n, k, d, device=device)
    out = caml_ops.omni_correlation(feat, memory, temperature=0.05, backend=backend)
    ref = reference.omni_correlation(feat, memory, temperature=0.05)
    assert_close_to_reference(out, ref, seed, "correlation matrix")
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (feat, memory), grad_out)
    ref_grads = torch.autograd.grad(ref, (feat, memory), grad_out)
    for name, grad, ref_grad in zip(("feat", "memory"), grads, ref_grads):
        assert_close_to_reference(grad, ref_grad, seed, f"grad of {name}")


@pytest.mark.parametrize("backend,device", LOSS_BACKENDS)
def test_opcheck(backend, device):
    from caml_ops._op import OPS

    fresh_seed()
    feat_v, feat_a, memory = make_inputs(9, 13, 16, device=device)
    forward = OPS["omni_correlation_loss"].kernel_op(backend)
    torch.library.opcheck(forward, (feat_v, feat_a, memory, 0.1, 1e-8))
    torch.library.opcheck(forward, (feat_v, feat_a, memory.detach(), 0.5, 0.0))
    torch.library.opcheck(OPS["omni_correlation"].kernel_op(backend), (feat_v, memory, 0.1))


@pytest.mark.parametrize("backend,device", LOSS_BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    seed = fresh_seed()
    torch._dynamo.reset()
    inputs = make_inputs(21, 17, 16, device=device)

    def step(feat_v, feat_a, memory):
        loss = caml_ops.omni_correlation_loss(feat_v, feat_a, memory, backend=backend)
        return loss + caml_ops.omni_correlation(feat_v, memory, backend=backend).square().mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    out = compiled(*inputs)
    ref = reference.omni_correlation_loss(*inputs) + reference.omni_correlation(inputs[0], inputs[2]).square().mean()
    assert_close_to_reference(out, ref, seed, "compiled loss")
    for grad, ref_grad in zip(torch.autograd.grad(out, inputs), torch.autograd.grad(ref, inputs)):
        assert_close_to_reference(grad, ref_grad, seed, "compiled grad")


BAD_INPUTS = [
    # (description, kwargs overriding the good call, exception, text the message must contain)
    ("1-D features", dict(feat_v=torch.randn(16)), ValueError, "feat_v"),
    ("feat_a shape", dict(feat_a=torch.randn(4, 16)), ValueError, "feat_a"),
    ("D mismatch", dict(memory=torch.randn(5, 8)), ValueError, "memory"),
    ("empty memory", dict(memory=torch.randn(0, 16)), ValueError, "memory"),
    ("temperature 0", dict(temperature=0.0), ValueError, "temperature"),
    ("negative temperature", dict(temperature=-1.0), ValueError, "temperature"),
    ("negative eps", dict(eps=-1e-8), ValueError, "eps"),
    ("integer features", dict(feat_v=torch.ones(3, 16, dtype=torch.int64)), TypeError, "feat_v"),
    ("mixed dtypes", dict(memory=torch.randn(5, 16, dtype=torch.float64)), TypeError, "memory"),
    ("unknown reduction", dict(reduction="max"), ValueError, "reduction"),
    ("not a tensor", dict(feat_a=[[1.0] * 16] * 3), TypeError, "feat_a"),
]


@pytest.mark.parametrize("backend,device", LOSS_BACKENDS + [pytest.param("reference", "cpu", id="reference")])
@pytest.mark.parametrize("case,override,error,needle", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(backend, device, case, override, error, needle):
    args = dict(feat_v=torch.randn(3, 16), feat_a=torch.randn(3, 16), memory=torch.randn(5, 16))
    args.update(override)
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(error, match=needle):
        caml_ops.omni_correlation_loss(**args, backend=backend)


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend"):
        caml_ops.omni_correlation_loss(torch.randn(3, 4), torch.randn(3, 4), torch.randn(2, 4), backend="mps")


@pytest.mark.skipif(not caml_ops._backend.HAS_EXTENSION, reason="caml_ops._C not built")
def test_cpp_kernels_check_their_inputs():
    # The C++ ops validate on their own (TORCH_CHECK), for callers that skip the Python layer.
    with pytest.raises(RuntimeError, match="memory"):
        torch.ops.caml_ops.omni_correlation_loss_forward(torch.randn(3, 16), torch.randn(3, 16), torch.randn(5, 8), 0.1, 0.0)
    with pytest.raises(RuntimeError, match="temperature"):
        torch.ops.caml_ops.omni_correlation_loss_forward(torch.randn(3, 16), torch.randn(3, 16), torch.randn(5, 16), 0.0, 0.0)
