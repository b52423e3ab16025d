"""Pieces shared by the Triton kernels: scalar arguments, tiles, matmuls, the dropout RNG, the host
functions' checks and launches."""
from __future__ import annotations

import contextlib
import os
import struct
from typing import NamedTuple

import torch
import triton
import triton.language as tl


@triton.jit
def float_arg(hi, lo, FP64: tl.constexpr):
    """A float kernel argument. Triton passes Python floats as float32, so a float64 run gets the
    value as the pair hi + lo (see :func:`split_float`) and rebuilds it here."""
    if FP64:
        x = tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    else:
        x = hi
    return x


def to_float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def split_float(x: float) -> tuple[float, float]:
    """x as float32 hi + lo, for :func:`float_arg`."""
    hi = to_float32(x)
    return hi, to_float32(x - hi)


@triton.jit
def _philox(counter, seed_lo, seed_hi):
    """The four words of Philox4x32-10 with key (seed_lo, seed_hi) and counter (lo32, hi32 of the int64
    `counter`, 0, 0)."""
    c0 = counter.to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    k0 = tl.zeros_like(c0) + seed_lo.to(tl.uint32)
    k1 = tl.zeros_like(c0) + seed_hi.to(tl.uint32)
    for _ in tl.static_range(10):
        n0 = tl.umulhi(c2, 0xCD9E8D57) ^ c1 ^ k0
        n2 = tl.umulhi(c0, 0xD2511F53) ^ c3 ^ k1
        c1 = c2 * 0xCD9E8D57
        c3 = c0 * 0xD2511F53
        c0 = n0
        c2 = n2
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _group_counter(row, group, row_len, offset):
    """Philox counter of columns 4 group .. 4 group + 3 of `row` (int64) of rows of `row_len` elements."""
    return offset + row * ((row_len + 3) // 4) + group


@triton.jit
def dropout_keep(row, col, row_len, seed_lo, seed_hi, offset, threshold):
    """The attention dropout spec of csrc/philox.h: True where element (`row`, `col`) (int64, broadcasting)
    of the probabilities, rows of `row_len` elements, is kept.

    Word col mod 4 of Philox4x32-10 with key (seed_lo, seed_hi) and counter offset + row ceil(row_len / 4)
    + col // 4, compared unsigned with `threshold` = floor(dropout_p 2^32). One Philox per element, four
    times the work of :func:`dropout_keep_tile`: for tiles narrower than four columns (cross-sample rows of B).
    """
    x0, x1, x2, x3 = _philox(_group_counter(row, col // 4, row_len, offset), seed_lo, seed_hi)
    odd = (col & 1) != 0
    word = tl.where((col & 2) != 0, tl.where(odd, x3, x2), tl.where(odd, x1, x0))
    return word >= threshold.to(tl.uint32)


@triton.jit
def dropout_keep_tile(row, col0, row_len, seed_lo, seed_hi, offset, threshold, BN: tl.constexpr):
    """:func:`dropout_keep` on the [BM, BN] tile of the rows `row` (int64 [BM]) and columns col0 .. col0 + BN,
    with col0 and BN multiples of 4: one Philox per four columns. Columns from row_len on get meaningless
    values (words of the next row): the callers mask them."""
    BM: tl.constexpr = row.shape[0]
    group = col0 // 4 + tl.arange(0, BN // 4)
    x0, x1, x2, x3 = _philox(_group_counter(row[:, None], group[None, :], row_len, offset), seed_lo, seed_hi)
    # [BM, BN / 4, 2, 2] with element [m, c, s, t] = word 2 s + t: row-major, that is column 4 c + 2 s + t.
    words = tl.reshape(tl.join(tl.join(x0, x2), tl.join(x1, x3)), [BM, BN])
    return words >= threshold.to(tl.uint32)


# The kernel parameters that get dropout_args: they change every step, so kernels take them with
# do_not_specialize=RNG_ARGS (a value of 1 would become a constexpr, divisibility a recompile).
RNG_ARGS = ["seed_lo", "seed_hi", "rng_offset", "threshold"]


def dropout_args(rng_state, dropout_p: float) -> tuple[float, float, int, int, int, int]:
    """(keep_hi, keep_lo, seed_lo, seed_hi, offset, threshold) kernel arguments: 1 / (1 - dropout_p) as a
    float pair (see :func:`split_float`), then those of :func:`dropout_keep` and :func:`dropout_keep_tile`
    from `rng_state` = int64 [seed, offset]; zeros, and no read of rng_state, when dropout_p = 0."""
    if dropout_p == 0:
        return (*split_float(1.0), 0, 0, 0, 0)
    seed, offset = (int(x) for x in rng_state.tolist())
    return (*split_float(1.0 / (1.0 - dropout_p)), seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, offset,
            int(dropout_p * 2.0**32))


@triton.jit
def matmul_acc(a, b, PREC: tl.constexpr, FP64: tl.constexpr):
    """a [M, L] @ b [L, N], accumulated in float32 (float64 for FP64)."""
    if FP64:
        # tl.dot has no float64 path on every Triton/GPU version; float64 is
        # for tests only, so a broadcast product-sum is enough.
        c = tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    elif PREC == "upcast":
        # Triton's interpreter multiplies bfloat16 as raw bits: upcast there.
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PREC)
    return c


@triton.jit
def _tile_ptrs_mask(ptr, rows, row_ok, s0, s1, cols, D: tl.constexpr, BD: tl.constexpr):
    ptrs = ptr + rows[:, None] * s0 + cols[None, :] * s1
    if D == BD:
        mask = row_ok[:, None]
    else:
        mask = row_ok[:, None] & (cols[None, :] < D)
    return ptrs, mask


@triton.jit
def load_tile(ptr, rows, row_ok, s0, s1, cols, D: tl.constexpr, BD: tl.constexpr):
    ptrs, mask = _tile_ptrs_mask(ptr, rows, row_ok, s0, s1, cols, D, BD)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def store_tile(ptr, val, rows, row_ok, s0, cols, D: tl.constexpr, BD: tl.constexpr):
    ptrs, mask = _tile_ptrs_mask(ptr, rows, row_ok, s0, 1, cols, D, BD)
    tl.store(ptrs, val.to(ptr.dtype.element_ty), mask=mask)


def acc_dtypes(dtype: torch.dtype):
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dimension is unit-stride (or of size 1), else a contiguous copy: the kernels read
    [B, L, H, d] tensors through the strides of B, L and H only."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def blh_strides(x: torch.Tensor) -> tuple[int, int, int]:
    """The (B, L, H) strides of a [B, L, H, d] tensor."""
    return x.stride(0), x.stride(1), x.stride(2)


def dot_precision(x: torch.Tensor) -> str:
    if x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return "upcast"
    # float32: TF32 tensor cores only where PyTorch's own matmuls would use them.
    if x.dtype == torch.float32 and on_gpu(x) and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored for 16-bit inputs; float64 does not use tl.dot


def device_context(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


# ---------------------------------------------------------------------------
# Checks (host side). The public ops (caml_ops/*.py) validate every user
# argument; the host functions check only what keeps the kernels inside their
# buffers when torch.ops.caml_ops.*_triton is called directly: the tensors a
# kernel indexes together agree in shape, dtype and device.
# ---------------------------------------------------------------------------


def check_like(x, name: str, shape, dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
    """Raise ValueError unless x is a tensor of `shape`, and of `dtype` and on `device` where they are given."""
    if (isinstance(x, torch.Tensor) and tuple(x.shape) == tuple(shape) and (dtype is None or x.dtype == dtype)
            and (device is None or x.device == device)):
        return
    want = " ".join([f"a tensor {list(shape)}"] + ([str(dtype)] if dtype is not None else [])
                    + ([f"on {device}"] if device is not None else []))
    got = (f"{list(x.shape)} {x.dtype} on {x.device}" if isinstance(x, torch.Tensor) else type(x).__name__)
    raise ValueError(f"{name} must be {want}, got {got}")


def check_all_like(like: torch.Tensor, tensors: dict) -> None:
    """check_like of each (name: tensor) against `like`'s shape, dtype and device."""
    for name, x in tensors.items():
        check_like(x, name, like.shape, like.dtype, like.device)


def check_rng_state(rng_state) -> None:
    check_like(rng_state, "rng_state = [seed, offset]", (2,), torch.int64, torch.device("cpu"))


# ---------------------------------------------------------------------------
# Launches (host side): one place that checks the grid, and a recording mode
# for benchmarks/compile_gpu_kernels.py, which compiles ahead of time exactly
# what the host functions launch, without a GPU.
# ---------------------------------------------------------------------------

# CUDA's grid bounds: x up to 2^31 - 1 programs, y and z up to 65,535.
MAX_GRID = (2**31 - 1, 65535, 65535)


class Launch(NamedTuple):
    kernel: object  # a triton JITFunction
    grid: tuple
    args: tuple
    kwargs: dict


_recorded: list | None = None


def on_gpu(x: torch.Tensor) -> bool:
    """True where x's kernels are compiled GPU launches: x on CUDA, or under :func:`record_launches`
    (which stands CPU tensors in for CUDA ones, so the GPU launch configuration is chosen)."""
    return x.is_cuda or _recorded is not None


@contextlib.contextmanager
def record_launches():
    """Within the block, :func:`launch` appends its Launch to the yielded list instead of running it."""
    global _recorded
    outer, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = outer


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), after checking the grid against CUDA's bounds."""
    for axis, (size, bound) in enumerate(zip(grid, MAX_GRID)):
        if not 0 <= size <= bound:
            raise ValueError(f"{getattr(kernel, '__name__', kernel)}: grid axis {axis} of {size} programs is past "
                             f"CUDA's bound of {bound}; the input is too large for this kernel")
    if _recorded is not None:
        _recorded.append(Launch(kernel, tuple(grid), args, kwargs))
        return
    kernel[grid](*args, **kwargs)
