"""Cross-sample and intra-sample attention (CAML's CMA), layout [B, L, H, d].

Only the reference backend exists so far; the fused kernels come with the
attention issue.
"""
from __future__ import annotations

from torch import Tensor

from . import reference
from ._backend import resolve
from ._checks import check_floating, check_rank, check_same


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> None:
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        check_floating(x, name)
        check_rank(x, name, 4, "[B, L, H, d]")
    check_same((q, k, v), ("q", "k", "v"))
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k and v must have one shape [B, L, H, d], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")


def cross_sample_attention(
    q: Tensor, k: Tensor, v: Tensor, *, dropout_p: float = 0.0, scale: float | None = None, backend: str = "auto"
) -> Tensor:
    """For every position l and head h, attention over the B samples.

    ``O[b,l,h] = sum_b' dropout(softmax_b'(scale q[b,l,h].k[b',l,h])) v[b',l,h]``

    Args:
        q, k, v: [B, L, H, d] (a Linear's output on tokens [B, L, C], viewed; no permute needed).
        dropout_p: dropout on the attention probabilities, in [0, 1).
        scale: defaults to d^-0.5.
    Returns:
        [B, L, H, d].
    """
    _check_qkv(q, k, v, dropout_p)
    resolve("cross_sample_attention", backend, q.device)  # only "reference" (or "auto") passes for now
    return reference.cross_sample_attention(q, k, v, dropout_p, scale)


def intra_sample_attention(
    q: Tensor, k: Tensor, v: Tensor, *, dropout_p: float = 0.0, scale: float | None = None, backend: str = "auto"
) -> Tensor:
    """For every sample b and head h, attention over the L positions.

    Args:
        q, k, v: [B, L, H, d].
        dropout_p: dropout on the attention probabilities, in [0, 1).
        scale: defaults to d^-0.5.
    Returns:
        [B, L, H, d].
    """
    _check_qkv(q, k, v, dropout_p)
    resolve("intra_sample_attention", backend, q.device)
    return reference.intra_sample_attention(q, k, v, dropout_p, scale)
