"""caml_ops.dropout (the Philox dropout of the attention kernels on any tensor) on every backend against the
reference with the same mask: values and gradients, keep rate, torch.manual_seed, opcheck, torch.compile,
the nn.Dropout drop-in and bad inputs."""
from __future__ import annotations

import pytest
import torch

import caml_ops
from caml_ops import reference
from caml_ops._op import OPS

from .helpers import (assert_close_to_reference, assert_within_2x_torch_error, fixed_seed, fresh_seed,
                      requires_cuda, runnable_backends)

CASES = runnable_backends("dropout")
# Awkward sizes: not multiples of 4, 64 or the Triton block; 0-D and empty.
SHAPES = [(1,), (7,), (3, 5, 11), (130, 97), (2, 3, 4097), (1000, 17), (), (0, 5)]


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("p", [0.3, 0.9])
def test_matches_reference_with_the_same_mask(backend, device, shape, p):
    seed = fresh_seed()
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    out, mask = caml_ops.dropout(x, p, backend=backend, return_mask=True)
    assert mask.shape == x.shape and mask.dtype == torch.bool
    ref = reference.dropout(x, p, mask)
    assert_close_to_reference(out, ref, seed, "output")
    grad_out = torch.randn_like(x)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    (ref_grad,) = torch.autograd.grad(ref, x, grad_out)
    assert_close_to_reference(grad, ref_grad, seed, "grad")


@pytest.mark.parametrize("backend,device", CASES)
def test_reads_non_contiguous_inputs(backend, device):
    seed = fresh_seed()
    x = torch.randn(40, 30, dtype=torch.float64, device=device).t()
    out, mask = caml_ops.dropout(x, 0.5, backend=backend, return_mask=True)
    assert_close_to_reference(out, reference.dropout(x, 0.5, mask), seed, "transposed input")


@pytest.mark.parametrize("backend,device", CASES)
def test_mask_follows_the_spec_and_torch_manual_seed(backend, device):
    """Element i is kept iff word i mod 4 of Philox(seed, offset + i / 4) >= floor(p 2^32), with (seed, offset)
    drawn from torch's generator: the same seed gives the same mask on every backend."""
    fresh_seed()
    x = torch.randn(3, 1000, device=device) + 5  # no zeros: the output shows the mask
    torch.manual_seed(7)
    first = caml_ops.dropout(x, 0.4, backend=backend)
    second = caml_ops.dropout(x, 0.4, backend=backend)
    torch.manual_seed(7)
    rng_state = torch.randint(0, 2**62, (2,))
    index = torch.arange(x.numel(), device=device)
    keep = reference.attention_dropout_keep(rng_state, index // 64, index % 64, 64, 0.4).view(x.shape)
    assert torch.equal(first != 0, keep)
    assert not torch.equal(first, second), "successive calls must draw new masks"


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate(p):
    fresh_seed()
    mask = reference.dropout_mask(torch.randint(0, 2**62, (2,)), (1000, 333), p)
    sigma = (p * (1 - p) / mask.numel()) ** 0.5
    assert abs(mask.double().mean().item() - (1 - p)) < 5 * sigma


@pytest.mark.parametrize("backend,device", CASES)
def test_eval_and_zero_p_return_the_input(backend, device):
    x = torch.randn(5, 6, device=device)
    assert caml_ops.dropout(x, 0.5, training=False, backend=backend) is x
    assert caml_ops.dropout(x, 0.0, backend=backend) is x


@pytest.mark.parametrize("backend,device", CASES)
def test_nan_propagates_as_in_torch(backend, device):
    """x * Z, not a select: a dropped NaN stays NaN (torch.nn.functional.dropout does the same)."""
    x = torch.full((64,), float("nan"), device=device)
    assert caml_ops.dropout(x, 0.5, backend=backend).isnan().all()


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_within_2x_torch_error(dtype):
    seed = fixed_seed(0)
    base = torch.randn(333, 129, dtype=torch.float64, device="cuda")
    out, mask = caml_ops.dropout(base.to(dtype), 0.3, return_mask=True)
    plain = reference.dropout(base.to(dtype), 0.3, mask)
    assert out.dtype == dtype
    assert_within_2x_torch_error(out, plain, reference.dropout(base, 0.3, mask), seed, f"dropout {dtype}")


@pytest.mark.parametrize("backend,device", CASES)
def test_opcheck(backend, device):
    fresh_seed()
    op = OPS["dropout"].kernel_op(backend)
    x = torch.randn(7, 33, dtype=torch.float64, device=device, requires_grad=True)
    rng_state = torch.randint(0, 2**62, (2,))
    torch.library.opcheck(op, (x, 0.3, rng_state))
    torch.library.opcheck(op, (x.detach().t(), 0.0, rng_state))


@pytest.mark.parametrize("backend,device", CASES)
def test_torch_compile_fullgraph(backend, device):
    seed = fresh_seed()
    torch._dynamo.reset()
    x = torch.randn(6, 70, dtype=torch.float64, device=device, requires_grad=True)

    def step(x):
        return caml_ops.dropout(x.sin(), 0.3, backend=backend, return_mask=True)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    out, mask = compiled(x)
    ref = reference.dropout(x.sin(), 0.3, mask)
    assert_close_to_reference(out, ref, seed, "compiled output")
    grad_out = torch.randn_like(x)
    assert_close_to_reference(torch.autograd.grad(out, x, grad_out)[0], torch.autograd.grad(ref, x, grad_out)[0],
                              seed, "compiled grad")


@pytest.mark.parametrize("backend,device", CASES)
def test_module_is_an_nn_dropout(backend, device):
    seed = fresh_seed()
    layer = caml_ops.nn.Dropout(0.25, backend=backend)
    assert isinstance(layer, torch.nn.Dropout) and "p=0.25" in repr(layer)
    x = torch.randn(9, 31, dtype=torch.float64, device=device)
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    _, mask = caml_ops.dropout(x, 0.25, backend=backend, return_mask=True)
    assert_close_to_reference(out, reference.dropout(x, 0.25, mask), seed, "module output")
    assert layer.eval()(x) is x


@pytest.mark.parametrize("what,kwargs,error,text", [
    ("p = 1", dict(p=1.0), ValueError, "p must be a number in"),
    ("negative p", dict(p=-0.2), ValueError, "p must be a number in"),
    ("integer x", dict(x=torch.ones(3, dtype=torch.int64)), TypeError, "x must be a floating-point"),
    ("not a tensor", dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    ("unknown backend", dict(backend="tpu"), ValueError, "backend"),
    ("no cuda kernel", dict(backend="cuda"), ValueError, "no 'cuda' kernel"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_inputs_raise_clear_errors(what, kwargs, error, text):
    args = {"x": torch.randn(4), "p": 0.5, **kwargs}
    with pytest.raises(error, match=text):
        caml_ops.dropout(args.pop("x"), args.pop("p"), **args)


def test_kernels_check_their_inputs():
    pytest.importorskip("caml_ops._C")
    op = OPS["dropout"].kernel_op("cpu")
    with pytest.raises(RuntimeError, match="rng_state"):
        op(torch.randn(4), 0.5, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="dropout_p"):
        op(torch.randn(4), 1.5, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op(torch.randn(4).half(), 0.5, torch.zeros(2, dtype=torch.int64))
