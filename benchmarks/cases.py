"""Benchmark cases: for each op, our fused op, the reference backend and the
official CAML computation on the same inputs; a whole CAML training step with
the fused ops and with the reference backend. Shared by the pytest-benchmark
suites (time) and memory_probe.py (peak memory, in a fresh process)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Callable

import torch

import caml_ops

from official import official_mutual_consistency, official_occ_loss

QUICK = os.environ.get("CAML_BENCH_QUICK", "0") == "1"
IMPLS = ("fused", "reference", "official")
PASSES = ("forward", "backward", "forward+backward")


@dataclass(frozen=True)
class Case:
    op: str  # "occ", "consistency" or "train_step"
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
    backend = "auto" if case.impl == "fused" else "reference"
    return lambda: caml_ops.omni_correlation_loss(feat_v, feat_a, memory, backend=backend), inputs


def _consistency(case: Case):
    s, *shape = _dims(case.size)
    dtype, device = getattr(torch, case.dtype), torch.device(case.device)
    logits = [torch.randn(shape, device=device, dtype=dtype).requires_grad_() for _ in range(s)]
    if case.impl == "official":
        return lambda: official_mutual_consistency(logits), logits
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
    model = CAML3d(1, 2, n_filters=cfg.n_filters, feat_dim=cfg.feat_dim).to(device)
    memory = MemoryBank(cfg.labeled, 2, cfg.feat_dim, device, seed=0)
    weights = LossWeights(memory_num=cfg.memory_num, num_filtered=cfg.num_filtered)
    amp = torch.bfloat16 if case.device == "cuda" else None
    backend = "auto" if case.impl == "fused" else "reference"
    objective = CAMLObjective(model, memory, cfg.labeled_bs, weights, "caml", backend, amp)
    volume = torch.randn(cfg.batch_size, 1, *cfg.patch_size, device=device)
    label = (volume[:, 0] > 0.3).long()
    case_ids = torch.arange(cfg.batch_size) % cfg.labeled
    ramped = 10**6  # past the ramp-up: every loss term is on
    objective(volume, label, case_ids, ramped)  # fills the memory bank, so that OCC runs in the step
    params = tuple(model.parameters())
    return lambda: objective(volume, label, case_ids, ramped)[0], params


BUILDERS = {"occ": _occ, "consistency": _consistency, "train_step": _train_step}


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
    cases = []
    for device in devices:
        for op, sizes in (("occ", occ_sizes), ("consistency", consistency_sizes)):
            cases += [Case(op, size, impl, device) for size in sizes(device) for impl in IMPLS]
        cases += [Case("train_step", size, impl, device) for size in train_step_sizes(device) for impl in IMPLS[:2]]
    return cases
