"""cross_sample_attention and intra_sample_attention on every backend against the float64 reference,
with the kernels' own dropout masks; the Philox dropout itself; opcheck, torch.compile and bad inputs."""
from __future__ import annotations

import pytest
import torch

import caml_ops
from caml_ops import _backend, reference
from caml_ops import _op

from .helpers import (assert_close_to_reference, assert_within_2x_torch_error, fixed_seed, fresh_seed,
                      is_interpreted, requires_cuda, runnable_backends)

OPS = ("cross_sample_attention", "intra_sample_attention")
# (op, backend, device) for every backend this machine runs; skips for the others
CASES = [pytest.param(name, *param.values, marks=param.marks, id=f"{name.split('_')[0]}-{param.id}")
         for name in OPS for param in runnable_backends(name)]

# (B, L, H, d): awkward sizes; the interpreter runs the Triton kernels slowly, so it gets the smaller ones.
SHAPES = {
    "cross_sample_attention": [(1, 7, 1, 16), (3, 97, 4, 32), (4, 1, 2, 37), (17, 13, 3, 8), (64, 3, 1, 16),
                               (4, 1960, 4, 32)],
    "intra_sample_attention": [(1, 1, 1, 16), (3, 7, 1, 32), (1, 97, 3, 16), (2, 130, 1, 64), (1, 1025, 2, 16),
                               (1, 1960, 1, 32), (1, 33, 1, 128), (2, 20, 3, 40)],
}
INTERPRETER_LIMIT = 130 * 130 * 3  # L^2 B H (intra) or L B^2 H (cross) the interpreter gets


def attention(name):
    return getattr(caml_ops, name)


def mask_numel(name, shape):
    batch, length, heads, _ = shape
    return length * heads * batch * batch if name == "cross_sample_attention" else length * length * batch * heads


def shapes_for(name, backend, device):
    shapes = SHAPES[name]
    if is_interpreted(backend, device):
        shapes = [s for s in shapes if mask_numel(name, s) <= INTERPRETER_LIMIT]
    return shapes


def make_qkv(shape, dtype=torch.float64, device="cpu", spread=1.0):
    """q, k, v as the strided views of one projection [B, L, 3, H, d] (the layout the modules feed)."""
    batch, length, heads, dim = shape
    base = (torch.randn(batch, length, 3, heads, dim, dtype=torch.float64) * spread).to(device, dtype)
    return base.requires_grad_(), base.unbind(2)


def check_against_reference(name, backend, device, shape, dropout_p, scale=None, spread=1.0):
    seed = fresh_seed()
    base, (q, k, v) = make_qkv(shape, device=device, spread=spread)
    out, mask = attention(name)(q, k, v, dropout_p=dropout_p, scale=scale, backend=backend, return_dropout_mask=True)
    ref = getattr(reference, name)(q, k, v, dropout_p, scale, dropout_mask=mask)
    what = f"{name} {backend} shape {shape} p {dropout_p}"
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert_close_to_reference(out, ref, seed, f"{what}: output")
    grad_out = torch.randn_like(ref)
    (grad,) = torch.autograd.grad(out, base, grad_out)
    (ref_grad,) = torch.autograd.grad(ref, base, grad_out)
    for i, part in enumerate("qkv"):
        assert_close_to_reference(grad[:, :, i], ref_grad[:, :, i], seed, f"{what}: grad of {part}")


@pytest.mark.parametrize("name,backend,device", CASES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_matches_reference_float64(name, backend, device, dropout_p):
    for shape in shapes_for(name, backend, device):
        check_against_reference(name, backend, device, shape, dropout_p)


@pytest.mark.parametrize("name,backend,device", CASES)
def test_large_logits_and_custom_scale(name, backend, device):
    # logits of a few hundred: the softmax must subtract the row max (and the lse must hold it)
    check_against_reference(name, backend, device, (3, 11, 2, 16), 0.2, scale=1.7, spread=4.0)


@pytest.mark.parametrize("name,backend,device", CASES)
def test_float32_close_to_float64_reference(name, backend, device):
    seed = fresh_seed()
    shape = (3, 37, 2, 32)
    base, (q, k, v) = make_qkv(shape, device=device)
    base32 = base.detach().float().requires_grad_()
    q32, k32, v32 = base32.unbind(2)
    out, mask = attention(name)(q32, k32, v32, dropout_p=0.5, backend=backend, return_dropout_mask=True)
    ref = getattr(reference, name)(q, k, v, 0.5, None, dropout_mask=mask)
    assert out.dtype == torch.float32
    assert_close_to_reference(out, ref, seed, "float32 output", rtol=2e-5, atol=2e-5)
    grad_out = torch.randn_like(ref)
    (grad,) = torch.autograd.grad(out, base32, grad_out.float())
    (ref_grad,) = torch.autograd.grad(ref, base, grad_out)
    assert_close_to_reference(grad, ref_grad, seed, "float32 grads", rtol=2e-5, atol=5e-5)


@requires_cuda
@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_half_types_within_2x_torch_error(name, dtype, backend):
    if backend not in _backend.fused_backends(name):
        pytest.skip(f"{name} has no {backend} kernel")
    if backend == "cuda" and not _backend.EXTENSION_HAS_CUDA:
        pytest.skip("no CUDA kernels built")
    seed = fixed_seed(7)
    shape = (4, 1960, 4, 32) if name == "cross_sample_attention" else (2, 1025, 4, 32)
    base, (q, k, v) = make_qkv(shape, device="cuda")
    low = base.detach().to(dtype).requires_grad_()
    out, mask = attention(name)(*low.unbind(2), dropout_p=0.3, backend=backend, return_dropout_mask=True)
    plain = getattr(reference, name)(*low.unbind(2), 0.3, None, dropout_mask=mask)
    ref = getattr(reference, name)(q, k, v, 0.3, None, dropout_mask=mask)
    assert out.dtype == dtype
    assert_within_2x_torch_error(out, plain, ref, seed, f"{name} {dtype} output")
    grad_out = torch.randn_like(ref)
    (grad,) = torch.autograd.grad(out, low, grad_out.to(dtype))
    (plain_grad,) = torch.autograd.grad(plain, low, grad_out.to(dtype))
    (ref_grad,) = torch.autograd.grad(ref, base, grad_out)
    assert_within_2x_torch_error(grad, plain_grad, ref_grad, seed, f"{name} {dtype} grads")


INTRA_COMPILED = [c for c in CASES if c.values[0] == "intra_sample_attention" and not is_interpreted(*c.values[1:])]


@pytest.mark.parametrize("name,backend,device", INTRA_COMPILED)
def test_intra_long_sequence_has_64bit_dropout_counters(name, backend, device):
    """L = 70,000 with 4 heads: the dropout counters ((b H + h) L + i) ceil(L / 4) + j / 4 pass 2^32 in the
    last head. Checked on a few of its query rows, those past the 2^32 boundary included, against a float64
    reference over all the keys."""
    seed = fresh_seed()
    length, heads, dim, p = 70_000, 4, 16, 0.3
    q, k, v = (torch.randn(1, length, heads, dim, device=device) for _ in range(3))
    torch.manual_seed(seed)
    out = caml_ops.intra_sample_attention(q, k, v, dropout_p=p, backend=backend)
    torch.manual_seed(seed)
    rng_state = torch.randint(0, 2**62, (2,))  # the draw the op makes (caml_ops.dropout.draw_rng_state)
    head, groups = heads - 1, (length + 3) // 4
    rows = torch.tensor([0, 1, length // 2, 2**32 // groups + 1 - head * length, length - 2, length - 1],
                        device=device)
    assert (head * length + int(rows.max())) * groups >= 2**32
    keys = torch.arange(length, device=device)
    keep = reference.attention_dropout_keep(rng_state, head * length + rows[:, None], keys[None, :], length, p)
    q64, k64, v64 = (x[0, :, head].double() for x in (q, k, v))
    probs = torch.softmax(q64[rows] @ k64.T * dim**-0.5, dim=1)
    expected = (probs * keep / (1 - p)) @ v64
    assert_close_to_reference(out[0, rows, head], expected, seed, "rows of a 70,000-long attention",
                              rtol=1e-4, atol=1e-5)


# --- the dropout ---------------------------------------------------------------------------------------

def test_reference_philox_matches_known_answers():
    """Random123's known-answer vectors for Philox4x32-10."""
    def words(values):
        return [torch.tensor([x]) for x in values]

    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, expected in cases:
        got = reference.philox4x32_10(words(counter), words(key))
        assert [int(x) for x in got] == list(expected)


@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate(dropout_p):
    fresh_seed()
    rng_state = torch.randint(0, 2**62, (2,))
    mask = reference.attention_dropout_mask(rng_state, (200, 1000), dropout_p)
    keep = mask.double().mean().item()
    sigma = (dropout_p * (1 - dropout_p) / mask.numel()) ** 0.5
    assert abs(keep - (1 - dropout_p)) < 5 * sigma, f"keep rate {keep} for p = {dropout_p}"
    # rows and columns are not correlated: the row-wise keep rates spread as binomials do
    row_std = mask.double().mean(dim=1).std().item()
    assert 0.7 < row_std / (dropout_p * (1 - dropout_p) / 1000) ** 0.5 < 1.3


@pytest.mark.parametrize("name,backend,device", CASES)
def test_dropout_follows_torch_manual_seed(name, backend, device):
    fresh_seed()
    _, (q, k, v) = make_qkv((3, 9, 2, 16), device=device)
    op = attention(name)
    torch.manual_seed(123)
    first = op(q, k, v, dropout_p=0.5, backend=backend)
    second = op(q, k, v, dropout_p=0.5, backend=backend)
    torch.manual_seed(123)
    again = op(q, k, v, dropout_p=0.5, backend=backend)
    assert torch.equal(first, again), "the same torch seed must give the same dropout"
    assert not torch.equal(first, second), "successive calls must draw new masks"
    # every backend draws the mask the reference backend draws for the same generator state
    torch.manual_seed(123)
    assert_close_to_reference(first, op(q, k, v, dropout_p=0.5, backend="reference"), 123, "reference backend")


@pytest.mark.parametrize("name,backend,device", CASES)
def test_backward_is_deterministic(name, backend, device):
    fresh_seed()
    base, (q, k, v) = make_qkv((5, 23, 2, 16), dtype=torch.float32, device=device)
    grad_out = torch.randn(5, 23, 2, 16, device=device)
    grads = []
    for threads in (torch.get_num_threads(), 1):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            torch.manual_seed(5)
            out = attention(name)(q, k, v, dropout_p=0.4, backend=backend)
            grads.append(torch.autograd.grad(out, base, grad_out)[0])
        finally:
            torch.set_num_threads(previous)
    assert torch.equal(grads[0], grads[1])


# --- torch.library ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,backend,device", CASES)
def test_opcheck(name, backend, device):
    fresh_seed()
    _, (q, k, v) = make_qkv((3, 10, 2, 16), device=device)
    forward = _op.OPS[name].kernel_op(backend)
    rng_state = torch.randint(0, 2**62, (2,))
    torch.library.opcheck(forward, (q, k, v, 0.25, 0.3, rng_state))
    torch.library.opcheck(forward, (q.detach().contiguous(), k.detach(), v.detach(), 0.25, 0.0, rng_state))


@pytest.mark.parametrize("name,backend,device", CASES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_torch_compile_fullgraph(name, backend, device, dropout_p):
    seed = fresh_seed()
    torch._dynamo.reset()
    base, _ = make_qkv((3, 10, 2, 16), device=device)

    def step(base):
        q, k, v = base.unbind(2)
        return attention(name)(q, k, v, dropout_p=dropout_p, backend=backend, return_dropout_mask=True)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    out, mask = compiled(base)
    ref = getattr(reference, name)(*base.unbind(2), dropout_p, None, dropout_mask=mask)
    assert_close_to_reference(out, ref, seed, "compiled output")
    grad_out = torch.randn_like(ref)
    (grad,) = torch.autograd.grad(out, base, grad_out)
    (ref_grad,) = torch.autograd.grad(ref, base, grad_out)
    assert_close_to_reference(grad, ref_grad, seed, "compiled grad")


# --- bad inputs --------------------------------------------------------------------------------------------

GOOD = dict(q=torch.randn(2, 5, 2, 8), k=torch.randn(2, 5, 2, 8), v=torch.randn(2, 5, 2, 8))
BAD_INPUTS = [
    ("3-D q", dict(q=torch.randn(2, 5, 16)), ValueError, r"q must be 4-D \[B, L, H, d\]"),
    ("k shape", dict(k=torch.randn(2, 6, 2, 8)), ValueError, "one shape"),
    ("integer v", dict(v=torch.ones(2, 5, 2, 8, dtype=torch.int64)), TypeError, "v must be a floating-point"),
    ("mixed dtypes", dict(k=torch.randn(2, 5, 2, 8, dtype=torch.float64)), TypeError, "k has dtype"),
    ("empty", dict(q=torch.randn(2, 0, 2, 8), k=torch.randn(2, 0, 2, 8), v=torch.randn(2, 0, 2, 8)),
     ValueError, "non-empty"),
    ("dropout 1", dict(dropout_p=1.0), ValueError, "dropout_p"),
    ("negative dropout", dict(dropout_p=-0.1), ValueError, "dropout_p"),
    ("NaN scale", dict(scale=float("nan")), ValueError, "scale"),
    ("unknown backend", dict(backend="tpu"), ValueError, "backend"),
    ("not a tensor", dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
]


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("what,override,error,text", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(name, what, override, error, text):
    kwargs = {**GOOD, **override}
    q, k, v = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
    with pytest.raises(error, match=text):
        attention(name)(q, k, v, **kwargs)


def test_intra_has_no_cuda_kernel():
    with pytest.raises(ValueError, match="no 'cuda' kernel"):
        caml_ops.intra_sample_attention(GOOD["q"], GOOD["k"], GOOD["v"], backend="cuda")


@pytest.mark.parametrize("name", OPS)
def test_kernels_check_their_inputs(name):
    """The C++ kernels validate too (for callers of torch.ops.caml_ops directly)."""
    pytest.importorskip("caml_ops._C")
    forward = _op.OPS[name].kernel_op("cpu")
    q = torch.randn(2, 5, 2, 8)
    with pytest.raises(RuntimeError, match="rng_state"):
        forward(q, q, q, 0.3, 0.1, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="dropout_p"):
        forward(q, q, q, 0.3, 1.5, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="k"):
        forward(q, q[:, :4], q, 0.3, 0.0, torch.zeros(2, dtype=torch.int64))
