"""No silent wrong answers, on every backend this machine runs and in float32 and float64.

- NaN or inf in any input gives NaN (and inf) exactly where the reference gives it, values and every
  gradient, and the reference's values elsewhere;
- extreme but accepted arguments agree with the reference; arguments outside their range are rejected by
  one check before any backend runs, with the same message on every backend;
- second derivatives raise instead of returning zeros;
- torch.compile(fullgraph=True) traces transposed and sliced inputs (fake and real kernels agree on strides).
"""
from __future__ import annotations

import math

import pytest
import torch

import caml_ops
from caml_ops._checks import MIN_TEMPERATURE

from .helpers import fresh_seed, runnable_backends

DTYPES = [torch.float32, torch.float64]


def _attention_inputs(b, l, h, d):
    return lambda: [torch.randn(b, l, h, d, dtype=torch.float64) for _ in range(3)]


def _features(*rows):
    """OCC features of 19 channels at a quarter of unit scale: logits of about +-10 at temperature 0.1,
    peaked softmaxes without the rows saturated at eps, whose float32 gradients amplify the logits'
    rounding (any two float32 computations then differ by more than this file's float32 tolerance; that
    regime's accuracy is test_omni_correlation's 2x-of-PyTorch rule on fixed inputs)."""
    return lambda: [0.25 * torch.randn(n, 19, dtype=torch.float64) for n in rows]


# op name -> (call(inputs, backend, **kw), the fresh float64 inputs, keyword arguments)
OPS = {
    "omni_correlation_loss": (
        lambda xs, backend, **kw: caml_ops.omni_correlation_loss(*xs, reduction="none", backend=backend, **kw),
        _features(37, 37, 23),
        {},
    ),
    "omni_correlation": (
        lambda xs, backend, **kw: caml_ops.omni_correlation(*xs, backend=backend, **kw),
        _features(37, 70),
        {},
    ),
    "mutual_consistency_loss": (
        lambda xs, backend, **kw: caml_ops.mutual_consistency_loss(xs, backend=backend, **kw),
        lambda: [3 * torch.randn(2, 3, 9, 7, 3, dtype=torch.float64) for _ in range(3)],
        {},
    ),
    "cross_sample_attention": (
        lambda xs, backend, **kw: caml_ops.cross_sample_attention(*xs, backend=backend, **kw),
        _attention_inputs(5, 13, 2, 24),
        {"dropout_p": 0.3},
    ),
    "intra_sample_attention": (
        lambda xs, backend, **kw: caml_ops.intra_sample_attention(*xs, backend=backend, **kw),
        _attention_inputs(2, 97, 2, 32),
        {"dropout_p": 0.3},
    ),
    "dropout": (
        lambda xs, backend, **kw: caml_ops.dropout(*xs, 0.3, backend=backend, **kw),
        lambda: [torch.randn(5, 77, dtype=torch.float64)],
        {},
    ),
}


def _op_backends(ops=tuple(OPS)):
    """pytest params (op, backend, device) of every runnable fused backend of the named ops."""
    return [
        pytest.param(op, *param.values, marks=param.marks, id=f"{op}-{param.id}")
        for op in ops for param in runnable_backends(op)
    ]


def _values_and_grads(op, inputs, backend, device, dtype, **kw):
    """The op's output and the gradients of all inputs (a fixed RNG state: the same dropout mask)."""
    call = OPS[op][0]
    xs = [x.to(device, dtype).requires_grad_() for x in inputs]
    torch.manual_seed(1234)
    out = call(xs, backend, **kw)
    weights = torch.rand(out.shape, dtype=torch.float64).to(device, dtype)  # a different upstream per element
    grads = torch.autograd.grad((out * weights).sum(), xs)
    return [out.detach()] + list(grads)


def _assert_same_results(actual, plain, exact, what):
    """NaN and inf where plain PyTorch in the same dtype has them (`plain`, the reference op), and elsewhere
    the reference's values: in float64 the float64 reference's within the usual tolerance; in float32 plain
    PyTorch's within 1e-3 relative, 1e-4 absolute (the 2x-of-PyTorch's-error rule for float32 is the
    per-op files' test, on fixed larger inputs where a max error is a stable statistic)."""
    for i, (a, p, e) in enumerate(zip(actual, plain, exact)):
        name = "value" if i == 0 else f"grad of input {i - 1}"
        a, p, e = a.cpu().double(), p.cpu().double(), e.cpu().double()
        assert torch.equal(a.isnan(), p.isnan()), (
            f"{what}, {name}: NaN at {a.isnan().sum().item()} elements, the reference at {p.isnan().sum().item()}"
        )
        assert torch.equal(a.isposinf(), p.isposinf()) and torch.equal(a.isneginf(), p.isneginf()), (
            f"{what}, {name}: infinities differ from the reference's"
        )
        finite = a.isfinite() & e.isfinite()
        if actual[0].dtype == torch.float64:
            torch.testing.assert_close(a[finite], e[finite], msg=lambda m: f"{what}, {name}: {m}")
        else:
            torch.testing.assert_close(a[finite], p[finite], rtol=1e-3, atol=1e-4,
                                       msg=lambda m: f"{what}, {name}: {m}")


def _check_against_reference(op, inputs, backend, device, dtype, what, **kw):
    actual = _values_and_grads(op, inputs, backend, device, dtype, **kw)
    plain = _values_and_grads(op, inputs, "reference", device, dtype, **kw)
    exact = plain if dtype == torch.float64 else _values_and_grads(op, inputs, "reference", device, torch.float64,
                                                                   **kw)
    _assert_same_results(actual, plain, exact, what)
    return plain


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("op,backend,device", _op_backends())
def test_non_finite_inputs_propagate_as_in_the_reference(op, backend, device, dtype, value):
    seed = fresh_seed()
    kw = OPS[op][2]
    for where in range(len(OPS[op][1]())):
        inputs = OPS[op][1]()
        x = inputs[where]
        x.view(-1)[torch.randint(0, x.numel(), ()).item()] = value
        _check_against_reference(op, inputs, backend, device, dtype,
                                 f"{op} on {backend}, {value} in input {where} (seed {seed})", **kw)


MC_BACKENDS = _op_backends(("mutual_consistency_loss",))


@pytest.mark.parametrize("temperature", [0.1, 1.0])
@pytest.mark.parametrize("classes", [2, 3, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("op,backend,device", MC_BACKENDS)
def test_mutual_consistency_with_minus_inf_logits_stays_finite(op, backend, device, dtype, classes, temperature):
    """A -inf logit is a class with probability 0 (a masked class): p and sharpen(p) are exactly 0 and 1,
    and the loss and its gradients are finite, as in the reference (also where every other class is -inf)."""
    seed = fresh_seed()
    logits = [torch.randn(2, classes, 40, dtype=torch.float64) for _ in range(2)]
    logits[0][0, 1:, :7] = -math.inf  # class 0 alone
    logits[1][1, torch.randint(0, classes, ()).item(), 3] = -math.inf
    plain = _check_against_reference(op, logits, backend, device, dtype,
                                     f"mutual consistency, C = {classes} on {backend} (seed {seed})",
                                     temperature=temperature)
    for x in plain:
        assert torch.isfinite(x).all(), f"reference not finite (seed {seed})"


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("op,backend,device",
                         _op_backends(("cross_sample_attention", "intra_sample_attention")))
def test_attention_with_huge_logits_stays_finite(op, backend, device, dtype):
    """Logits of about 1e9 (scale = 1e9, or inputs of 1e5 at the default scale): the softmax is one-hot in
    every dtype, so each output row is one of v's rows (a convex combination of them at worst)."""
    seed = fresh_seed()
    q, k, v = (x.to(device, dtype) for x in OPS[op][1]())
    for kw, scale_inputs in ((dict(scale=1e9), 1.0), ({}, 1e5)):
        out = OPS[op][0]([q * scale_inputs, k * scale_inputs, v], backend, **kw)
        assert torch.isfinite(out).all(), f"{op} on {backend}: non-finite output at logits ~1e9 (seed {seed})"
        axis = 0 if op == "cross_sample_attention" else 1  # the attended axis
        low, high = v.amin(dim=axis, keepdim=True), v.amax(dim=axis, keepdim=True)
        slack = 1e-3 * v.abs().max()
        assert ((out >= low - slack) & (out <= high + slack)).all(), f"{op} on {backend}: outside v's range"


# The ends of the range (at 1e-30 and below the softmaxes are exactly one-hot; peaked but not one-hot rows,
# T ~ 1e-3, are the precision tests of test_omni_correlation and test_mutual_consistency).
EXTREME_TEMPERATURES = [MIN_TEMPERATURE, 1e-30, 1.0, 1e30]


@pytest.mark.parametrize("temperature", EXTREME_TEMPERATURES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("op,backend,device",
                         _op_backends(("omni_correlation_loss", "omni_correlation", "mutual_consistency_loss")))
def test_extreme_accepted_temperatures_agree_with_the_reference(op, backend, device, dtype, temperature):
    if op == "mutual_consistency_loss" and temperature > 1:
        pytest.skip("sharpening takes temperatures <= 1")
    seed = fresh_seed()
    inputs = OPS[op][1]()
    _check_against_reference(op, inputs, backend, device, dtype,
                             f"{op} on {backend} at temperature {temperature:g} (seed {seed})",
                             temperature=temperature)


BAD_ARGUMENTS = [
    # (op, keyword arguments, the argument the message names)
    ("omni_correlation_loss", dict(temperature=1e-45), "temperature"),
    ("omni_correlation_loss", dict(temperature=math.inf), "temperature"),
    ("omni_correlation_loss", dict(temperature=math.nan), "temperature"),
    ("omni_correlation_loss", dict(temperature=True), "temperature"),
    ("omni_correlation_loss", dict(eps=math.inf), "eps"),
    ("omni_correlation_loss", dict(eps=math.nan), "eps"),
    ("omni_correlation", dict(temperature=1e-40), "temperature"),
    ("omni_correlation", dict(temperature=-math.inf), "temperature"),
    ("mutual_consistency_loss", dict(temperature=1e-30 * 1e-15), "temperature"),
    ("mutual_consistency_loss", dict(temperature=math.inf), "temperature"),
    ("mutual_consistency_loss", dict(temperature=1.5), "temperature"),
    ("cross_sample_attention", dict(scale=math.inf), "scale"),
    ("intra_sample_attention", dict(scale=math.nan), "scale"),
    ("intra_sample_attention", dict(dropout_p=math.nan), "dropout_p"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda"])
@pytest.mark.parametrize("op,kwargs,name", BAD_ARGUMENTS, ids=[f"{op}-{kw}" for op, kw, _ in BAD_ARGUMENTS])
def test_arguments_out_of_range_are_rejected_before_any_backend(op, kwargs, name, backend):
    """One check per argument, ahead of dispatch: the same error on every backend, even one that cannot
    run here (the check comes first)."""
    call, make, _ = OPS[op]
    inputs = [x.float() for x in make()]
    with pytest.raises(ValueError, match=name):
        call(inputs, backend, **kwargs)


@pytest.mark.parametrize("op,backend,device", _op_backends(tuple(op for op in OPS if op != "dropout")))
def test_second_derivatives_raise_instead_of_returning_zeros(op, backend, device):
    fresh_seed()
    call, make, kw = OPS[op]
    xs = [x.to(device, torch.float32).requires_grad_() for x in make()]
    out = call(xs, backend, **kw)
    grads = torch.autograd.grad(out.square().sum(), xs, create_graph=True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(sum(g.square().sum() for g in grads), xs)


def test_dropout_has_second_derivatives():
    """dropout is linear: its backward is itself, so it differentiates any number of times."""
    x = torch.randn(5, 77, dtype=torch.float64, requires_grad=True)
    y = caml_ops.dropout(x, 0.3)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad((g * x).sum(), x)
    torch.testing.assert_close(gg, g.detach())


def _strided(x: torch.Tensor) -> torch.Tensor:
    """x's values in a transposed-and-sliced view (the same shape, no unit stride on the last dim)."""
    wide = torch.cat([x, x], dim=0).transpose(0, -1).contiguous().transpose(0, -1)
    return wide[: x.shape[0]]


@pytest.mark.parametrize("op,backend,device", _op_backends())
def test_torch_compile_takes_strided_inputs(op, backend, device):
    seed = fresh_seed()
    torch._dynamo.reset()
    call, make, kw = OPS[op]
    kw = {k: v for k, v in kw.items() if k != "dropout_p"}  # compiled and eager draw their RNG differently
    inputs = [x.float().to(device) for x in make()]
    strided = [_strided(x).requires_grad_() for x in inputs]
    assert not strided[0].is_contiguous()

    def step(*xs):
        return call(list(xs), backend, **kw).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    torch.manual_seed(1234)  # (dropout: the same mask in both runs)
    out = compiled(*strided)
    grads = torch.autograd.grad(out, strided)
    plain = [x.detach().clone().requires_grad_() for x in inputs]
    torch.manual_seed(1234)
    ref = step(*plain)
    ref_grads = torch.autograd.grad(ref, plain)
    torch.testing.assert_close(out, ref, msg=lambda m: f"{op} compiled on strided inputs (seed {seed}): {m}")
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, msg=lambda m: f"{op} compiled grad on strided inputs (seed {seed}): {m}")


MODULE_ARGUMENTS = [
    (lambda: caml_ops.nn.CrossSampleTransformerLayer(32.0, 4, 64, 0.1), "d_model"),
    (lambda: caml_ops.nn.CrossSampleTransformerLayer(32, True, 64, 0.1), "nhead"),
    (lambda: caml_ops.nn.CrossSampleTransformerLayer(32, 4, "64", 0.1), "dim_feedforward"),
    (lambda: caml_ops.nn.CrossSampleTransformerLayer(32, 5, 64, 0.1), "nhead"),
    (lambda: caml_ops.nn.CrossSampleTransformerLayer(32, 4, 64, 0.1, backend="gpu"), "backend"),
    (lambda: caml_ops.nn.CrossSampleMutualAttention(16.5), "channels"),
    (lambda: caml_ops.nn.CrossSampleMutualAttention(16, ffn_mult=0), "ffn_mult"),
    (lambda: caml_ops.nn.OmniCorrelationLoss(temperature=0.0), "temperature"),
    (lambda: caml_ops.nn.OmniCorrelationLoss(eps=math.inf), "eps"),
    (lambda: caml_ops.nn.OmniCorrelationLoss(reduction="max"), "reduction"),
    (lambda: caml_ops.nn.MutualConsistencyLoss(temperature=2.0), "temperature"),
    (lambda: caml_ops.nn.Dropout(0.5, backend="tpu"), "backend"),
]


@pytest.mark.parametrize("make,name", MODULE_ARGUMENTS, ids=[name for _, name in MODULE_ARGUMENTS])
def test_module_arguments_are_checked_by_name(make, name):
    with pytest.raises(ValueError, match=name):
        make()
