"""Reference implementations: plain PyTorch, the definition of every op.

They run on any device and dtype (float64 included) and differentiate with
autograd; tests compare every fused backend against them in float64.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def reduce_rows(rows: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / max(rows.shape[0], 1)  # N = 0 gives 0, not NaN


def omni_correlation(feat: Tensor, memory: Tensor, temperature: float = 0.1) -> Tensor:
    """softmax(feat @ memory.T / temperature, dim=1): [N, D], [K, D] -> [N, K]."""
    return torch.softmax(feat @ memory.T / temperature, dim=1)


def omni_correlation_loss_rows(
    feat_v: Tensor, feat_a: Tensor, memory: Tensor, temperature: float = 0.1, eps: float = 1e-8
) -> Tensor:
    """Per-row loss l_i = -sum_j q_j log(p_j + eps), p/q the correlations of feat_v/feat_a."""
    s_v = feat_v @ memory.T / temperature
    q = torch.softmax(feat_a @ memory.T / temperature, dim=1)
    if eps == 0:
        return torch.logsumexp(s_v, dim=1) - (q * s_v).sum(dim=1)
    return -(q * torch.log(torch.softmax(s_v, dim=1) + eps)).sum(dim=1)


def omni_correlation_loss(feat_v: Tensor, feat_a: Tensor, memory: Tensor, temperature: float = 0.1,
                          eps: float = 1e-8, reduction: str = "mean") -> Tensor:
    """CAML's omni-correlation consistency loss: the mean, sum or rows of omni_correlation_loss_rows."""
    return reduce_rows(omni_correlation_loss_rows(feat_v, feat_a, memory, temperature, eps), reduction)


def sharpen(p: Tensor, temperature: float = 0.1) -> Tensor:
    """p^(1/T) / (p^(1/T) + (1 - p)^(1/T)), elementwise, for 0 < T <= 1.

    Written through the ratio of the smaller to the larger of p and 1 - p, raised to 1/T >= 1: it lies in
    [0, 1], so no power overflows or turns 0 / 0 for tiny T (where the kernels' sigmoid form is exact
    too), and the gradient at p = 0 or 1 (a -inf logit) is the limit 0, not 0 * inf. Each branch sees p
    clamped to its own half, so the branch not taken adds no NaN to the gradient; NaN passes through."""
    a = 1.0 / temperature
    upper = p.clamp(min=0.5)
    lower = p.clamp(max=0.5)
    t = (lower / (1 - lower)) ** a
    return torch.where(p >= 0.5, 1 / (1 + ((1 - upper) / upper) ** a), t / (1 + t))


def mutual_consistency_loss(logits: Sequence[Tensor] | Tensor, temperature: float = 0.1) -> Tensor:
    """sum over ordered pairs s != t of mean((softmax(x_s) - sharpen(softmax(x_t)))^2)."""
    probs = [torch.softmax(x, dim=1) for x in logits]
    sharp = [sharpen(p, temperature) for p in probs]
    loss = probs[0].new_zeros(())
    for s, p in enumerate(probs):
        for t, q in enumerate(sharp):
            if s != t:
                loss = loss + torch.mean((p - q) ** 2)
    return loss


def _attention_dropout(attn: Tensor, dropout_p: float, dropout_mask: Tensor | None) -> Tensor:
    if dropout_mask is not None:
        return attn * dropout_mask.to(attn.dtype) / (1.0 - dropout_p)
    return torch.nn.functional.dropout(attn, dropout_p) if dropout_p > 0 else attn


def _attention(logits_eq: str, out_eq: str, q: Tensor, k: Tensor, v: Tensor, dropout_p: float,
               scale: float | None, dropout_mask: Tensor | None) -> Tensor:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attn = torch.softmax(torch.einsum(logits_eq, q, k) * scale, dim=-1)
    return torch.einsum(out_eq, _attention_dropout(attn, dropout_p, dropout_mask), v)


def cross_sample_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, scale: float | None = None,
                           dropout_mask: Tensor | None = None) -> Tensor:
    """Attention across the B samples at every position and head.

    q, k, v, output: [B, L, H, d]. `dropout_mask` ([L, H, B, B], True = keep) replaces
    the random dropout mask on the attention probabilities.
    """
    return _attention("blhd,clhd->lhbc", "lhbc,clhd->blhd", q, k, v, dropout_p, scale, dropout_mask)


def intra_sample_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, scale: float | None = None,
                           dropout_mask: Tensor | None = None) -> Tensor:
    """Attention over the L positions of each sample and head.

    q, k, v, output: [B, L, H, d]. `dropout_mask` ([B, H, L, L], True = keep) replaces
    the random dropout mask on the attention probabilities.
    """
    return _attention("blhd,bmhd->bhlm", "bhlm,bmhd->blhd", q, k, v, dropout_p, scale, dropout_mask)


# --- Attention dropout: the Philox4x32-10 spec of csrc/philox.h, in int64 tensor arithmetic ---

_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _mul_hi_lo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32 bits of a * b for 32-bit a and b, without overflowing int64."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    p_lo, p_hi = a * b_lo, a * b_hi  # each < 2^48
    return ((p_lo >> 16) + p_hi) >> 16, (p_lo + ((p_hi & 0xFFFF) << 16)) & _MASK32


def philox4x32_10(counter: Sequence[Tensor], key: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 of int64 tensors holding 32-bit words: four counter words, two key words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mul_hi_lo(_PHILOX_M[0], c0)
        hi1, lo1 = _mul_hi_lo(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
    return c0, c1, c2, c3


def _dropout_words(rng_state: Tensor, row: Tensor, group: Tensor, row_len: int) -> Tensor:
    """The four Philox words [..., 4] of column group `group` (columns 4 group to 4 group + 3) of `row`."""
    seed, offset = rng_state.to(row.device).unbind()
    counter = offset + row * ((row_len + 3) // 4) + group
    zeros = torch.zeros_like(counter)
    return torch.stack(philox4x32_10(
        (counter & _MASK32, (counter >> 32) & _MASK32, zeros, zeros), (seed & _MASK32, (seed >> 32) & _MASK32)
    ), dim=-1)


def attention_dropout_keep(rng_state: Tensor, row: Tensor, col: Tensor, row_len: int, dropout_p: float) -> Tensor:
    """Whether the fused kernels keep the attention-probability elements (`row`, `col`) (int64 tensors that
    broadcast), for `rng_state` = int64 [seed, offset].

    The probabilities are rows of `row_len` elements: cross-sample [L, H, B] rows of B (row (l H + h) B + i),
    intra-sample [B, H, L] rows of L (row (b H + h) L + i). Columns 4g to 4g + 3 of row r take the four words
    of one Philox4x32-10 (key = seed, counter = offset + r ceil(row_len / 4) + g); element (r, j) is kept iff
    word j mod 4 >= floor(p 2^32)."""
    row, col = torch.broadcast_tensors(row, col)
    words = _dropout_words(rng_state, row, col // 4, row_len)
    return words.gather(-1, (col % 4).unsqueeze(-1)).squeeze(-1) >= int(dropout_p * 2.0**32)


def attention_dropout_mask(rng_state: Tensor, shape: Sequence[int], dropout_p: float, device=None) -> Tensor:
    """The keep mask (True = keep) of the fused attention kernels for `rng_state`, over the whole row-major
    `shape` ([L, H, B, B] or [B, H, L, L]; see :func:`attention_dropout_keep`)."""
    *lead, row_len = (int(size) for size in shape)
    rows = 1
    for size in lead:
        rows *= size
    row = torch.arange(rows, dtype=torch.int64, device=device)[:, None]
    group = torch.arange((row_len + 3) // 4, dtype=torch.int64, device=device)[None, :]
    words = _dropout_words(rng_state, row, group, row_len).view(rows, 4 * group.shape[1])[:, :row_len]
    return (words >= int(dropout_p * 2.0**32)).view(*shape)


def dropout_mask(rng_state: Tensor, shape: Sequence[int], dropout_p: float, device=None) -> Tensor:
    """The keep mask of :func:`caml_ops.dropout` over a tensor of `shape`: its row-major elements as rows of 64
    (element i: word i mod 4 of Philox(seed, offset + i / 4); see :func:`attention_dropout_keep`)."""
    numel = 1
    for size in shape:
        numel *= int(size)
    rows = -(-numel // 64)
    return attention_dropout_mask(rng_state, (rows, 64), dropout_p, device=device).flatten()[:numel].view(tuple(shape))


def dropout(x: Tensor, dropout_p: float, mask: Tensor) -> Tensor:
    """x * mask / (1 - dropout_p): dropout with a given keep mask (True = keep)."""
    return x * (mask.to(x.dtype) * (1.0 / (1.0 - dropout_p)))
