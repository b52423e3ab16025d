"""The official CAML computations, written as the official train_caml.py computes them
(docs/design.md, "The official code"), so benchmarks run them side by side with ours."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn


def official_occ_loss(feat_v: Tensor, feat_a: Tensor, memory_host: np.ndarray, temperature: float = 0.1) -> Tensor:
    """OCC as the official step computes it: the memory bank lives in numpy on the host and is copied to the
    device every step; both N x K correlation matrices are materialised."""
    memory = torch.from_numpy(memory_host).to(feat_v.device)
    corr_v = torch.softmax(feat_v @ memory.T / temperature, dim=1)
    corr_a = torch.softmax(feat_a @ memory.T / temperature, dim=1)
    return torch.sum(torch.sum(-corr_a * torch.log(corr_v + 1e-8), dim=1)) / feat_v.shape[0]


def _official_sharpen(p: Tensor, temperature: float) -> Tensor:
    power = 1.0 / temperature
    return p**power / (p**power + (1 - p) ** power)


def official_mutual_consistency(outputs: list[Tensor], temperature: float = 0.1) -> Tensor:
    """Mutual consistency as MC-Net/CAML compute it: probabilities and sharpened probabilities of every
    sub-model stored in host tensors [S, B, C, *spatial], then the MSE of every ordered pair."""
    y_ori = torch.zeros((len(outputs),) + tuple(outputs[0].shape))
    y_pseudo = torch.zeros((len(outputs),) + tuple(outputs[0].shape))
    for i, out in enumerate(outputs):
        prob = torch.softmax(out, dim=1)
        y_ori[i] = prob
        y_pseudo[i] = _official_sharpen(prob, temperature)
    loss = 0.0
    for i in range(len(outputs)):
        for j in range(len(outputs)):
            if i != j:
                loss = loss + torch.mean((y_ori[i] - y_pseudo[j]) ** 2)
    return loss


class _OfficialSampleAttention(nn.Module):
    """The official Intra/InterSampleAttention: one sequence-first nn.TransformerEncoderLayer(C, 4, 4C, p)
    on the bottleneck's tokens. Intra: tokens [L, B, C] (sequence = positions); inter: tokens [B, L, C]
    read as sequence = B, batch = L."""

    def __init__(self, channels: int, dropout: float, intra: bool):
        super().__init__()
        self.intra = intra
        self.encoder_layers = nn.TransformerEncoderLayer(channels, 4, 4 * channels, dropout)

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.flatten(2).transpose(1, 2)  # [B, L, C]
        if self.intra:
            out = self.encoder_layers(tokens.transpose(0, 1)).transpose(0, 1)
        else:
            out = self.encoder_layers(tokens)
        return out.transpose(1, 2).reshape(x.shape)


def official_cma(channels: int, dropout: float = 0.5) -> nn.Module:
    """The official CMA pair at encoder 2's block four: intra-sample, then inter-sample attention."""
    return nn.Sequential(
        _OfficialSampleAttention(channels, dropout, intra=True), _OfficialSampleAttention(channels, dropout, intra=False)
    )
