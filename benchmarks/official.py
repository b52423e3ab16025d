"""The official CAML computations, written as the seed's code computes them
(DESIGN.md, last section), so benchmarks run them side by side with ours."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


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
