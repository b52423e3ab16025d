"""Benchmark cases: for each op, our fused op, the reference backend and the
official CAML computation (or torch's SDPA for the attention ops) on the same
inputs; the whole CMA block against the official module pair; a whole CAML
training step with the fused ops and with the reference backend. Shared by the
pytest-benchmark suites (time) and memory_probe.py (peak memory, in a fresh
process)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Callable

import torch

import caml_ops
from caml_ops import reference

from official import official_cma, official_mutual_consistency, official_occ_loss

QUICK = os.environ.get("CAML_BENCH_QUICK", "0") == "1"
IMPLS = ("fused", "reference", "official", "sdpa", "compiled")
# The implementations each op is compared with. "compiled": torch.compile of the plain formula (what a user
# would pick instead of a fused op), timed forward+backward after its compilation (timed apart).
OP_IMPLS = {
    "omni_correlation_loss": ("fused", "reference", "official", "compiled"),
    "mutual_consistency_loss": ("fused", "reference", "official", "compiled"),
    "intra_sample_attention": ("fused", "reference", "sdpa", "compiled"),
    "cross_sample_attention": ("fused", "reference", "sdpa", "compiled"),
    "cma": ("fused", "reference", "official", "compiled"),
    "dropout": ("fused", "official", "compiled"),
    "train_step": ("fused", "reference"),
}
COMPILED_PASS = "forward+backward"
# Implementations that hold B x H x L x L (or B x B per position) matrices are skipped where those would
# pass this many bytes: the official intra attention at block three needs ~16 GB per matrix in float32.
QUADRATIC_LIMIT = 2 * 2**30
PASSES = ("forward", "backward", "forward+backward")


@dataclass(frozen=True)
class Case:
    op: str  # an op name (IMPLS), "cma", "dropout" or "train_step"
    size: str  # a label of the input size, parsed by the op's builder
    impl: str  # one of IMPLS
    device: str = "cpu"
    dtype: str = "float32"

    @property
    def id(self) -> str:
        return f"{self.op}-{self.size}-{self.impl}-{self.device}-{self.dtype}"

    def as_dict(self) -> dict:
        return asdict(self)


def occ_sizes(device: str) -> list[str]:
    """N x K x D; 25,600 = CAML's 2 x 12,800 filtered voxels, K = 2 classes x 256 memory entries."""
    if QUICK:
        return ["1000x64x32"]
    sizes = ["25600x512x32", "262144x512x32"]
    return sizes + ["1048576x512x32"] if device == "cuda" else sizes


def consistency_sizes(device: str) -> list[str]:
    """S x B x C x H x W x D: CAML's two decoders on a batch of 4 patches of 112 x 112 x 80."""
    return ["2x2x2x24x24x16"] if QUICK else ["2x4x2x112x112x80"]


def _dims(size: str) -> list[int]:
    return [int(x) for x in size.split("x")]


def _occ(case: Case):
    n, k, d = _dims(case.size)
    dtype, device = getattr(torch, case.dtype), torch.device(case.device)
    feat_v = torch.randn(n, d, device=device, dtype=dtype).requires_grad_()
    feat_a = torch.randn(n, d, device=device, dtype=dtype).requires_grad_()
    memory = torch.randn(k, d, device=device, dtype=dtype)  # the memory bank is detached in CAML
    inputs = (feat_v, feat_a)
    if case.impl == "official":
        memory_host = memory.cpu().numpy()
        return lambda: official_occ_loss(feat_v, feat_a, memory_host), inputs
    if case.impl == "compiled":
        loss = torch.compile(reference.omni_correlation_loss, fullgraph=True)
        return lambda: loss(feat_v, feat_a, memory), inputs
    backend = "auto" if case.impl == "fused" else "reference"
    return lambda: caml_ops.omni_correlation_loss(feat_v, feat_a, memory, backend=backend), inputs


def _consistency(case: Case):
    s, *shape = _dims(case.size)
    dtype, device = getattr(torch, case.dtype), torch.device(case.device)
    logits = [torch.randn(shape, device=device, dtype=dtype).requires_grad_() for _ in range(s)]
    if case.impl == "official":
        return lambda: official_mutual_consistency(logits), logits
    if case.impl == "compiled":
        loss = torch.compile(plain_mutual_consistency, fullgraph=True)
        return lambda: loss(logits), logits
    backend = "auto" if case.impl == "fused" else "reference"
    return lambda: caml_ops.mutual_consistency_loss(logits, backend=backend), logits


def train_step_sizes(device: str) -> list[str]:
    """caml.train presets: the paper's configuration on the GPU, the CPU demo's on the CPU."""
    return ["tiny"] if QUICK else (["la"] if device == "cuda" else ["small"])


def _train_step(case: Case):
    """One CAML training step of caml.train (model, memory bank, the whole objective) with the fused ops or
    the reference backend; gradients go to the model's parameters."""
    from caml.config import preset_config
    from caml.losses import CAMLObjective, LossWeights
    from caml.memory import MemoryBank
    from caml.models import CAML3d

    cfg, device = preset_config(case.size), torch.device(case.device)
    backend = "auto" if case.impl == "fused" else "reference"
    model = CAML3d(1, 2, n_filters=cfg.n_filters, feat_dim=cfg.feat_dim, cma_backend=backend).to(device)
    memory = MemoryBank(cfg.labeled, 2, cfg.feat_dim, device, seed=0)
    weights = LossWeights(memory_num=cfg.memory_num, num_filtered=cfg.num_filtered)
    amp = torch.bfloat16 if case.device == "cuda" else None
    objective = CAMLObjective(model, memory, cfg.labeled_bs, weights, "caml", backend, amp)
    volume = torch.randn(cfg.batch_size, 1, *cfg.patch_size, device=device)
    label = (volume[:, 0] > 0.3).long()
    case_ids = torch.arange(cfg.batch_size) % cfg.labeled
    ramped = 10**6  # past the ramp-up: every loss term is on
    objective(volume, label, case_ids, ramped)  # fills the memory bank, so that OCC runs in the step
    params = tuple(model.parameters())
    return lambda: objective(volume, label, case_ids, ramped)[0], params


def attention_sizes(device: str) -> list[str]:
    """B x L x H x d and the dropout: CAML's bottleneck (B = 4, C = 128 = 4 heads x 32, 14 x 14 x 10
    positions) and block three's 28 x 28 x 20 positions."""
    if QUICK:
        return ["2x60x2x16-p0.0", "2x60x2x16-p0.5"]
    return [f"4x{length}x4x32-p{p}" for length in (1960, 15680) for p in ("0.0", "0.5")]


def cma_sizes(device: str) -> list[str]:
    """B x C x *spatial and the dropout of the whole CMA block (intra then inter)."""
    if QUICK:
        return ["2x32x5x4x3-p0.0", "2x32x5x4x3-p0.5"]
    return ["4x128x14x14x10-p0.5", "4x128x28x28x20-p0.5"]


def dropout_sizes(device: str) -> list[str]:
    """Rows x columns and p: the FFN activations of the CMA block at CAML's size (4 x 1,960 tokens x 4C)."""
    return ["100x64-p0.5"] if QUICK else ["7840x512-p0.5"]


def _size_and_dropout(size: str) -> tuple[list[int], float]:
    dims, p = size.split("-p")
    return _dims(dims), float(p)


def _weighted_sum(out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (out * weight).sum()  # a scalar with a non-trivial gradient, the same cheap op for every impl


def _attention(case: Case):
    (batch, length, heads, dim), p = _size_and_dropout(case.size)
    dtype, device = getattr(torch, case.dtype), torch.device(case.device)
    base = torch.randn(batch, length, 3, heads, dim, device=device, dtype=dtype).requires_grad_()
    weight = torch.randn(batch, length, heads, dim, device=device, dtype=dtype)
    cross = case.op == "cross_sample_attention"
    if case.impl == "sdpa":
        # torch's attention on the permuted layout SDPA takes: [L, H, B, d] (inter) or [B, H, L, d] (intra)
        order = (1, 2, 0, 3) if cross else (0, 2, 1, 3)
        inverse = (2, 0, 1, 3) if cross else (0, 2, 1, 3)

        def forward():
            q, k, v = (x.permute(order) for x in base.unbind(2))
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=p)
            return _weighted_sum(out.permute(inverse), weight)

        return forward, (base,)
    if case.impl == "compiled":
        attend = torch.compile(plain_cross_sample_attention if cross else plain_intra_sample_attention, fullgraph=True)
        return lambda: _weighted_sum(attend(*base.unbind(2), p), weight), (base,)
    op = caml_ops.cross_sample_attention if cross else caml_ops.intra_sample_attention
    backend = "auto" if case.impl == "fused" else "reference"
    return lambda: _weighted_sum(op(*base.unbind(2), dropout_p=p, backend=backend), weight), (base,)


def _cma(case: Case):
    (batch, channels, *spatial), p = _size_and_dropout(case.size)
    dtype, device = getattr(torch, case.dtype), torch.device(case.device)
    x = torch.randn(batch, channels, *spatial, device=device, dtype=dtype).requires_grad_()
    weight = torch.randn_like(x)
    if case.impl in ("official", "compiled"):
        block = official_cma(channels, p)
    else:
        backend = "auto" if case.impl == "fused" else "reference"
        block = caml_ops.nn.CrossSampleMutualAttention(channels, dropout=p, backend=backend)
    block = block.to(device, dtype).train()
    run = torch.compile(block) if case.impl == "compiled" else block
    return lambda: _weighted_sum(run(x), weight), (x, *block.parameters())


def _dropout(case: Case):
    """caml_ops.dropout against torch's (what the official layers' three dropouts run)."""
    (rows, cols), p = _size_and_dropout(case.size)
    x = torch.randn(rows, cols, device=case.device, dtype=getattr(torch, case.dtype)).requires_grad_()
    weight = torch.randn_like(x)
    drop = caml_ops.dropout if case.impl == "fused" else torch.nn.functional.dropout
    if case.impl == "compiled":
        drop = torch.compile(drop, fullgraph=True)
    return lambda: _weighted_sum(drop(x, p), weight), (x,)


def plain_mutual_consistency(logits: list[torch.Tensor], temperature: float = 0.1) -> torch.Tensor:
    """The official mutual consistency's arithmetic on the device (no host buffers): what one compiles."""
    probs = [torch.softmax(x, dim=1) for x in logits]
    power = 1.0 / temperature
    sharp = [p**power / (p**power + (1 - p) ** power) for p in probs]
    return sum(torch.mean((p - q) ** 2) for s, p in enumerate(probs) for t, q in enumerate(sharp) if s != t)


def _plain_attention(q, k, v, dropout_p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) with dropout, times v, on [..., n, d]."""
    attn = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    return torch.nn.functional.dropout(attn, dropout_p) @ v


def plain_intra_sample_attention(q, k, v, dropout_p: float) -> torch.Tensor:
    """[B, L, H, d]: attention over the L positions, in plain PyTorch."""
    return _plain_attention(*(x.transpose(1, 2) for x in (q, k, v)), dropout_p).transpose(1, 2)


def plain_cross_sample_attention(q, k, v, dropout_p: float) -> torch.Tensor:
    """[B, L, H, d]: attention across the B samples at each position, in plain PyTorch."""
    return _plain_attention(*(x.permute(1, 2, 0, 3) for x in (q, k, v)), dropout_p).permute(2, 0, 1, 3)


def feasible(case: Case) -> bool:
    """False for the quadratic-memory implementations where their matrices pass QUADRATIC_LIMIT, and for
    the reference attention with dropout: it draws the kernels' Philox mask in int64 tensor arithmetic
    (minutes at CAML's size), a definition to test against, not a speed baseline."""
    if case.op not in ("intra_sample_attention", "cross_sample_attention", "cma") or case.impl == "fused":
        return True
    dims, p = _size_and_dropout(case.size)
    if case.impl == "reference" and p > 0:
        return False
    if case.op == "cma":
        batch, length, heads = dims[0], 1, 4
        for size in dims[2:]:
            length *= size
    else:
        batch, length, heads, _ = dims
    per_matrix = 4 * heads * (batch * batch * length if case.op == "cross_sample_attention" else batch * length * length)
    # SDPA (and the official layer, which calls it) keeps memory linear on CUDA, and on CPU without dropout.
    linear = case.impl in ("sdpa", "official") and (case.device == "cuda" or (p == 0 and case.impl == "sdpa"))
    if case.impl == "compiled" and case.op == "cma":  # the official layers, compiled: SDPA inside
        linear = case.device == "cuda" or p == 0
    return linear or per_matrix <= QUADRATIC_LIMIT


BUILDERS = {
    "omni_correlation_loss": _occ, "mutual_consistency_loss": _consistency, "intra_sample_attention": _attention, "cross_sample_attention": _attention, "cma": _cma,
    "dropout": _dropout, "train_step": _train_step,
}


def build(case: Case) -> tuple[Callable[[], torch.Tensor], tuple[torch.Tensor, ...]]:
    """(forward, inputs): forward() builds the loss with its autograd graph; gradients go to `inputs`."""
    return BUILDERS[case.op](case)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_pass(case: Case, forward, inputs, pass_name: str, loss=None):
    """Run one pass; for "backward" the caller gives the loss from a forward done beforehand."""
    if pass_name == "forward":
        out = forward()
    elif pass_name == "backward":
        out = torch.autograd.grad(loss, inputs, allow_unused=True)
    else:
        out = torch.autograd.grad(forward(), inputs, allow_unused=True)
    synchronize(case.device)
    return out


def all_cases() -> list[Case]:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    sizes = {
        "omni_correlation_loss": occ_sizes, "mutual_consistency_loss": consistency_sizes, "intra_sample_attention": attention_sizes, "cross_sample_attention": attention_sizes,
        "cma": cma_sizes, "dropout": dropout_sizes, "train_step": train_step_sizes,
    }
    cases = [
        Case(op, size, impl, device)
        for device in devices for op, impls in OP_IMPLS.items() for size in sizes[op](device) for impl in impls
    ]
    return [case for case in cases if feasible(case)]
