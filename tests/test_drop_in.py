"""The caml_ops ops dropped into another semi-supervised method's training step.

A mean-teacher with an MC-Net-style two-decoder student on 3D patches, in a
few added lines: the mutual consistency of the two decoders, OCC of the
student's unlabeled embeddings against a memory bank of labeled ones
(caml.memory), and CAML's cross-sample mutual attention in the bottleneck.
This file is the runnable example the README points to.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import caml_ops
from caml.memory import MemoryBank


class TwoDecoderNet(nn.Module):
    """A tiny 3D encoder, CMA at the bottleneck, two decoders (as MC-Net), a 16-wide embedding head."""

    def __init__(self, channels: int = 16, num_classes: int = 2, feat_dim: int = 16):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv3d(1, channels, 3, padding=1), nn.ReLU(),
                                     nn.Conv3d(channels, channels, 2, stride=2), nn.ReLU())
        self.cma = caml_ops.nn.CrossSampleMutualAttention(channels, nhead=4, dropout=0.1)  # added line
        self.decoders = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose3d(channels, channels, 2, stride=2), nn.ReLU(),
                          nn.Conv3d(channels, num_classes, 1)) for _ in range(2))
        self.embed = nn.Conv3d(channels, feat_dim, 1)

    def forward(self, x):
        h = self.cma(self.encoder(x))
        return [d(h) for d in self.decoders], self.embed(F.interpolate(h, scale_factor=2))


def mean_teacher_step(student, teacher, memory, optimizer, volume, label, labeled_bs=2):
    """One training step: supervised CE + mean-teacher consistency, plus the caml_ops terms."""
    logits, embedding = student(volume)
    with torch.no_grad():
        teacher_logits, _ = teacher(volume)
    loss = sum(F.cross_entropy(x[:labeled_bs], label[:labeled_bs]) for x in logits)
    loss = loss + F.mse_loss(torch.softmax(logits[0][labeled_bs:], 1), torch.softmax(teacher_logits[0][labeled_bs:], 1))

    # --- the added lines ---
    loss = loss + 0.1 * caml_ops.mutual_consistency_loss(logits, temperature=0.1)
    voxels = embedding.flatten(2).transpose(1, 2)  # [B, V, D]
    memory.update(range(labeled_bs), list(voxels[:labeled_bs]), list(label[:labeled_bs].flatten(1)))
    bank, _ = memory.sample(64)
    unlabeled = voxels[labeled_bs:].reshape(-1, voxels.shape[-1])[:512]
    loss = loss + 0.05 * caml_ops.omni_correlation_loss(unlabeled, unlabeled.roll(1, 0), bank)
    # ---

    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():  # EMA teacher
        for t, s in zip(teacher.parameters(), student.parameters()):
            t.mul_(0.99).add_(s, alpha=0.01)
    return loss.detach()


def test_ops_drop_into_a_mean_teacher_step():
    torch.manual_seed(0)
    student = TwoDecoderNet()
    teacher = copy.deepcopy(student)
    memory = MemoryBank(num_cases=2, num_classes=2, feat_dim=16)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    volume = torch.randn(4, 1, 12, 10, 8)
    label = (volume[:, 0] > 0).long()
    losses = [mean_teacher_step(student, teacher, memory, optimizer, volume, label) for _ in range(8)]
    assert all(torch.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    # every added piece is trained: the CMA block's parameters got gradients
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.cma.parameters())
