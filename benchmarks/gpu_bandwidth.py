"""Achieved memory bandwidth of the bandwidth-bound fused ops against the card's
measured device-to-device copy bandwidth: the mutual-consistency loss (target
70% of copy) and cross-sample attention (target 60%), each GPU backend.

How it times (the goals are fractions of the card's bandwidth, so the numbers must be the kernels',
not Python's or the L2 cache's): the call is replayed from a CUDA graph (a single call is 25-50 us of
kernels behind 30-60 us of Python and dispatch; eager back-to-back calls where capture fails, said in
the output), over enough input sets, used in turn, to fill twice the L2 cache (so every call reads
device memory), timed with events, median of 20 replays.

Usage (on a GPU machine): python benchmarks/gpu_bandwidth.py
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

import caml_ops

REPEATS = 20


def _replayable(calls: Sequence[Callable[[], object]]) -> tuple[Callable[[], None], str]:
    """One function running every call in turn: a CUDA graph's replay, or the eager calls."""
    def run_all():
        for call in calls:
            call()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        for _ in range(2):
            run_all()
    torch.cuda.current_stream().wait_stream(side)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run_all()
        return graph.replay, "CUDA graph"
    except RuntimeError as err:  # e.g. a host sync in the op: say so and time eagerly
        torch.cuda.synchronize()
        return run_all, f"eager (capture failed: {str(err).splitlines()[0][:80]})"


def _median_ms(make_call: Callable[..., Callable[[], object]], make_inputs: Callable[[], tuple],
               nbytes_per_set: int) -> tuple[float, str]:
    """Median milliseconds per call of ``make_call(*inputs)`` over input sets that fill twice the L2."""
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    sets = [make_inputs() for _ in range(max(2, math.ceil(2 * l2 / nbytes_per_set)))]
    run, how = _replayable([make_call(*inputs) for inputs in sets])
    return _event_median_ms(run) / len(sets), how


def _event_median_ms(run: Callable[[], object]) -> float:
    """Median milliseconds of ``run()`` over ``REPEATS`` runs, timed with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(REPEATS):
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def copy_bandwidth_gbs(nbytes: int = 2**30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up; 1 GiB is far past the L2, and one launch needs no graph
    return 2 * nbytes / _event_median_ms(lambda: dst.copy_(src)) / 1e6  # read + write


def consistency_bandwidth_gbs(shape=(4, 2, 112, 112, 80), dtype=torch.float32) -> dict:
    def inputs():
        return tuple(torch.randn(shape, device="cuda", dtype=dtype).requires_grad_() for _ in range(2))

    nbytes = 2 * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    forward_ms, how = _median_ms(lambda *xs: lambda: caml_ops.mutual_consistency_loss(list(xs)), inputs, nbytes)
    both_ms, _ = _median_ms(lambda *xs: lambda: torch.autograd.grad(caml_ops.mutual_consistency_loss(list(xs)), xs),
                            inputs, nbytes)
    # forward reads the logits once; backward reads them once more and writes the gradients once.
    return {"forward_gbs": nbytes / forward_ms / 1e6, "forward_backward_gbs": 3 * nbytes / both_ms / 1e6,
            "forward_ms": forward_ms, "forward_backward_ms": both_ms, "timing": how}


def cross_attention_bandwidth_gbs(backend: str, shape=(4, 15680, 4, 32), dtype=torch.float32, p=0.5) -> dict:
    """Cross-sample attention on q, k, v [B, L, H, d] (block three's positions, CAML's heads) with dropout."""
    def inputs():
        base = torch.randn(shape[0], shape[1], 3, *shape[2:], device="cuda", dtype=dtype).requires_grad_()
        return base, torch.randn(shape, device="cuda", dtype=dtype)

    def forward(base):
        return caml_ops.cross_sample_attention(*base.unbind(2), dropout_p=p, backend=backend)

    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()  # one [B, L, H, d] tensor
    forward_ms, how = _median_ms(lambda base, _: lambda: forward(base), inputs, 4 * size)
    both_ms, _ = _median_ms(lambda base, grad_out: lambda: torch.autograd.grad(forward(base), base, grad_out),
                            inputs, 4 * size)
    # forward: read q, k, v, write out (4 tensors); backward: read q, k, v, grad_out, write the three
    # gradients (7), then autograd stacks them into base's layout (read 3, write 3): 17 in all.
    return {"forward_gbs": 4 * size / forward_ms / 1e6, "forward_backward_gbs": 17 * size / both_ms / 1e6,
            "forward_ms": forward_ms, "forward_backward_ms": both_ms, "timing": how}


def _report(what: str, r: dict, copy: float) -> None:
    print(
        f"{what}: forward {r['forward_ms']:.3f} ms ({r['forward_gbs']:.0f} GB/s, "
        f"{100 * r['forward_gbs'] / copy:.0f}% of copy), forward+backward {r['forward_backward_ms']:.3f} ms "
        f"({r['forward_backward_gbs']:.0f} GB/s, {100 * r['forward_backward_gbs'] / copy:.0f}% of copy); {r['timing']}"
    )


if __name__ == "__main__":
    copy = copy_bandwidth_gbs()
    print(f"device: {torch.cuda.get_device_name()}; copy bandwidth {copy:.0f} GB/s")
    for dtype in (torch.float32, torch.bfloat16):
        _report(f"mutual_consistency_loss 2 x [4, 2, 112, 112, 80] {dtype}", consistency_bandwidth_gbs(dtype=dtype), copy)
    for backend in ("cuda", "triton"):
        for dtype in (torch.float32, torch.bfloat16):
            r = cross_attention_bandwidth_gbs(backend, dtype=dtype)
            _report(f"cross_sample_attention [4, 15680, 4, 32] p=0.5 {backend} {dtype}", r, copy)
