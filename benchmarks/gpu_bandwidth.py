"""Achieved memory bandwidth of the bandwidth-bound fused ops against the card's
measured device-to-device copy bandwidth: the mutual-consistency loss (target
70% of copy) and cross-sample attention (target 60%), each GPU backend.

Usage (on a GPU machine): python benchmarks/gpu_bandwidth.py
"""
from __future__ import annotations

import torch

import caml_ops


def _median_ms(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def copy_bandwidth_gbs(nbytes: int = 2**30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / _median_ms(lambda: dst.copy_(src)) / 1e6  # read + write


def consistency_bandwidth_gbs(shape=(4, 2, 112, 112, 80), dtype=torch.float32) -> dict:
    logits = [torch.randn(shape, device="cuda", dtype=dtype).requires_grad_() for _ in range(2)]
    nbytes = sum(x.numel() * x.element_size() for x in logits)
    forward_ms = _median_ms(lambda: caml_ops.mutual_consistency_loss(logits))
    both_ms = _median_ms(lambda: torch.autograd.grad(caml_ops.mutual_consistency_loss(logits), logits))
    # forward reads the logits once; backward reads them once more and writes the gradients once.
    return {"forward_gbs": nbytes / forward_ms / 1e6, "forward_backward_gbs": 3 * nbytes / both_ms / 1e6,
            "forward_ms": forward_ms, "forward_backward_ms": both_ms}


def cross_attention_bandwidth_gbs(backend: str, shape=(4, 15680, 4, 32), dtype=torch.float32, p=0.5) -> dict:
    """Cross-sample attention on q, k, v [B, L, H, d] (block three's positions, CAML's heads) with dropout."""
    base = torch.randn(shape[0], shape[1], 3, *shape[2:], device="cuda", dtype=dtype).requires_grad_()
    q, k, v = base.unbind(2)
    grad_out = torch.randn(shape, device="cuda", dtype=dtype)
    size = q.numel() * q.element_size()  # one [B, L, H, d] tensor
    forward_ms = _median_ms(lambda: caml_ops.cross_sample_attention(q, k, v, dropout_p=p, backend=backend))
    both_ms = _median_ms(lambda: torch.autograd.grad(
        caml_ops.cross_sample_attention(q, k, v, dropout_p=p, backend=backend), base, grad_out))
    # forward: read q, k, v, write out (4 tensors); backward: read q, k, v, grad_out, write the three
    # gradients (7), then autograd stacks them into base's layout (read 3, write 3): 17 in all.
    return {"forward_gbs": 4 * size / forward_ms / 1e6, "forward_backward_gbs": 17 * size / both_ms / 1e6,
            "forward_ms": forward_ms, "forward_backward_ms": both_ms}


def _report(what: str, r: dict, copy: float) -> None:
    print(
        f"{what}: forward {r['forward_ms']:.3f} ms ({r['forward_gbs']:.0f} GB/s, "
        f"{100 * r['forward_gbs'] / copy:.0f}% of copy), forward+backward {r['forward_backward_ms']:.3f} ms "
        f"({r['forward_backward_gbs']:.0f} GB/s, {100 * r['forward_backward_gbs'] / copy:.0f}% of copy)"
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
