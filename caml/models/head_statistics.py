"""The projection head's ReLU output over many voxels, summarised without holding it in memory.

:meth:`caml.models.CAML3d.predict_rows` needs, of ``a = relu(BatchNorm(x W^T + b))`` over all N
members of a batch of voxel embeddings ``x`` (about 1.45 million at the paper's size): its batch mean,
its covariance (from which the prediction head's BatchNorm statistics follow) and its values on the M
filtered rows only. :func:`projection_statistics` computes them in chunks of rows, forward and backward,
recomputing ``a`` from ``x`` instead of keeping the [N, F] activations: about 4 passes over ``x``
instead of a dozen passes over tensors of twice its size, and no large temporary (on a CPU the page
faults of fresh large allocations cost as much as the arithmetic). The statistics of the chunks are
combined in float64 (Chan et al.'s parallel formulas), as accurate as BatchNorm's own reductions.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["ProjectionStatistics", "compute_dtype", "projection_statistics", "row_chunks"]

# Rows per chunk: a chunk's [rows, F] temporaries stay in the CPU's caches; on a GPU one chunk of a
# million rows keeps the kernel launches few.
CPU_CHUNK_ROWS = 32_768
GPU_CHUNK_ROWS = 1 << 20


class ProjectionStatistics(NamedTuple):
    rows: Tensor  # [M, F] a on the selected rows (differentiable)
    mean: Tensor  # [F] batch mean of a (differentiable)
    cov: Tensor  # [F, F] biased batch covariance of a (differentiable)
    norm_mean: Tensor  # [F] BatchNorm's batch mean of x W^T + b (for its running statistics)
    norm_var: Tensor  # [F] BatchNorm's biased batch variance of x W^T + b


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types are computed in float32, float32 and float64 as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _Moments:
    """Running count, mean [F] and sum of centred products (diagonal [F] or matrix [F, F]) in float64,
    merged chunk by chunk (Chan, Golub and LeVeque's pairwise update)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, chunk: Tensor, full: bool) -> None:
        n = chunk.shape[0]
        mean = chunk.mean(0)
        centred = chunk - mean
        m2 = (centred.T @ centred if full else (centred * centred).sum(0)).double()
        mean = mean.double()
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        spread = torch.outer(delta, delta) if full else delta * delta
        self.m2 = self.m2 + m2 + spread * (self.count * n / total)
        self.mean = self.mean + delta * (n / total)
        self.count = total


def row_chunks(x: Tensor, members: Optional[Tensor], dtype: torch.dtype):
    """Yields ``(where, rows)``: the rows ``x[members]`` (all of ``x`` when ``members`` is None) in chunks,
    in ``dtype``, and where they are in the batch (a slice of positions in ``members``)."""
    count = x.shape[0] if members is None else members.shape[0]
    size = CPU_CHUNK_ROWS if x.device.type == "cpu" else GPU_CHUNK_ROWS
    for start in range(0, count, size):
        where = slice(start, min(start + size, count))
        yield where, (x[where] if members is None else x.index_select(0, members[where])).to(dtype)


class _ProjectionStatistics(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, members, rows, weight, bias, gamma, beta, eps):
        with torch.autocast(x.device.type, enabled=False):  # the statistics in float32 (float64 for float64)
            return _ProjectionStatistics._forward(ctx, x, members, rows, weight, bias, gamma, beta, eps)

    @staticmethod
    def _forward(ctx, x, members, rows, weight, bias, gamma, beta, eps):
        dtype = compute_dtype(x.dtype)
        weight, bias, gamma, beta = (t.to(dtype) for t in (weight, bias, gamma, beta))
        norm = _Moments()
        for _, xc in row_chunks(x, members, dtype):
            norm.add(torch.addmm(bias, xc, weight.T), full=False)
        norm_var = norm.m2 / norm.count
        invstd = torch.rsqrt(norm_var + eps).to(dtype)
        norm_mean = norm.mean.to(dtype)
        # zhat = x W_r^T + b_r (the normalised pre-activation), h = gamma zhat + beta, a = relu(h)
        weight_r, bias_r = weight * invstd[:, None], (bias - norm_mean) * invstd
        moments = _Moments()
        for _, xc in row_chunks(x, members, dtype):
            moments.add(torch.relu(torch.addmm(bias_r, xc, weight_r.T) * gamma + beta), full=True)
        picked = _pick(x, members, rows, dtype)
        a_rows = torch.relu(torch.addmm(bias_r, picked, weight_r.T) * gamma + beta)
        mean_a = moments.mean.to(dtype)
        ctx.save_for_backward(x, members, rows, weight, gamma, beta, weight_r, bias_r, invstd, mean_a)
        ctx.dtype, ctx.device_type = dtype, x.device.type
        return a_rows, mean_a, (moments.m2 / moments.count).to(dtype), norm_mean, norm_var.to(dtype)

    @staticmethod
    def backward(ctx, grad_rows, grad_mean, grad_cov, _grad_norm_mean, _grad_norm_var):
        with torch.autocast(ctx.device_type, enabled=False):
            return _ProjectionStatistics._backward(ctx, grad_rows, grad_mean, grad_cov)

    @staticmethod
    def _backward(ctx, grad_rows, grad_mean, grad_cov):
        x, members, rows, weight, gamma, beta, weight_r, bias_r, invstd, mean_a = ctx.saved_tensors
        n, features = (x.shape[0] if members is None else members.shape[0]), weight.shape[0]
        grad_mean = torch.zeros_like(mean_a) if grad_mean is None else grad_mean
        grad_cov = torch.zeros(features, features, dtype=ctx.dtype, device=x.device) if grad_cov is None \
            else grad_cov
        # dL/da_i = grad_mean / N + S (a_i - mean_a) [+ grad_rows at the rows], S = (G + G^T) / N
        sym = (grad_cov + grad_cov.T) / n
        shift = grad_mean / n - mean_a @ sym

        def grad_h(xc):  # (dL/dh over the chunk from the mean and covariance, zhat)
            zhat = torch.addmm(bias_r, xc, weight_r.T)
            h = zhat * gamma + beta
            return torch.addmm(shift, torch.relu(h), sym) * (h > 0), zhat

        picked = _pick(x, members, rows, ctx.dtype)
        zhat_rows = torch.addmm(bias_r, picked, weight_r.T)
        grad_h_rows = (torch.zeros_like(zhat_rows) if grad_rows is None else grad_rows) * (zhat_rows * gamma + beta > 0)
        sum_gh = grad_h_rows.sum(0).double()
        sum_ghz = (grad_h_rows * zhat_rows).sum(0).double()
        for _, xc in row_chunks(x, members, ctx.dtype):
            gh, zhat = grad_h(xc)
            sum_gh += gh.sum(0).double()
            sum_ghz += (gh * zhat).sum(0).double()
        mean_gh, mean_ghz = (sum_gh / n).to(ctx.dtype), (sum_ghz / n).to(ctx.dtype)
        scale = gamma * invstd  # dL/dz = scale (dL/dh - mean(dL/dh) - zhat mean(dL/dh zhat))
        grad_x = torch.zeros(x.shape, dtype=ctx.dtype, device=x.device) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight)
        grad_b = torch.zeros(features, dtype=torch.float64, device=x.device)
        for where, xc in row_chunks(x, members, ctx.dtype):
            gh, zhat = grad_h(xc)
            gz = (gh - mean_gh - zhat * mean_ghz) * scale
            if grad_x is not None:
                grad_x[where if members is None else members[where]] = gz @ weight
            grad_w.addmm_(gz.T, xc)
            grad_b += gz.sum(0).double()
        gz_rows = grad_h_rows * scale  # the rows' own gradient, on top of their part above
        if grad_x is not None:
            grad_x.index_put_((rows if members is None else members[rows],), gz_rows @ weight, accumulate=True)
        grad_w.addmm_(gz_rows.T, picked)
        grad_b += gz_rows.sum(0).double()
        grad_gamma = sum_ghz.to(ctx.dtype) if ctx.needs_input_grad[5] else None
        grad_beta = sum_gh.to(ctx.dtype) if ctx.needs_input_grad[6] else None
        return (None if grad_x is None else grad_x.to(x.dtype), None, None, grad_w, grad_b.to(ctx.dtype),
                grad_gamma, grad_beta, None)


def _pick(x: Tensor, members: Optional[Tensor], rows: Tensor, dtype: torch.dtype) -> Tensor:
    return x.index_select(0, rows if members is None else members[rows]).to(dtype)


def projection_statistics(x: Tensor, linear: torch.nn.Linear, norm: torch.nn.BatchNorm1d, rows: Tensor,
                          members: Optional[Tensor] = None) -> ProjectionStatistics:
    """``a = relu(norm(linear(batch)))`` in training mode (BatchNorm's batch statistics) over the batch
    ``x[members]`` (all of ``x`` when ``members`` is None), summarised.

    Args:
        x: [V, C] voxel embeddings (any float dtype; half types are computed in float32).
        linear, norm: the projection head's first Linear (C -> F) and its BatchNorm1d(F).
        rows: [M] int64, rows of the batch (indices into ``members``, else into ``x``) whose ``a`` is
            returned, each at most once.
        members: [N] int64 distinct indices into ``x``, the batch; N >= 2.

    Returns :class:`ProjectionStatistics`; ``rows``, ``mean`` and ``cov`` are differentiable with
    respect to ``x`` and the parameters of ``linear`` and ``norm``. The running statistics of ``norm``
    are left to the caller (from ``norm_mean`` and ``norm_var``).
    """
    zeros = torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=x.device)
    bias = zeros if linear.bias is None else linear.bias
    gamma, beta = (norm.weight, norm.bias) if norm.affine else (zeros + 1, zeros)
    return ProjectionStatistics(*_ProjectionStatistics.apply(x, members, rows, linear.weight, bias, gamma, beta,
                                                             norm.eps))
