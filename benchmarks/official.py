"""The official CAML computations, written as the official train_caml.py computes them
(docs/design.md, "The official code"), so benchmarks run them side by side with ours."""
from __future__ import annotations

import random

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
        if not self.training:  # the official CMA is active in training only
            return x
        tokens = x.flatten(2).transpose(1, 2)  # [B, L, C]
        if self.intra:
            out = self.encoder_layers(tokens.transpose(0, 1)).transpose(0, 1)
        else:
            out = self.encoder_layers(tokens)
        return out.transpose(1, 2).reshape(x.shape).contiguous()  # official: permute back, .contiguous()


def official_cma(channels: int, dropout: float = 0.5) -> nn.Module:
    """The official CMA pair at encoder 2's block four: intra-sample, then inter-sample attention."""
    return nn.Sequential(
        _OfficialSampleAttention(channels, dropout, intra=True), _OfficialSampleAttention(channels, dropout, intra=False)
    )


# --- The official training iteration (train_caml.py's loop body), for benchmarks/iteration.py ---


class OfficialMemoryBank:
    """The official feature memory: one numpy array of features and one of labels per labeled case,
    copied to the host at every update; sampling concatenates all of them and draws per class with
    ``random.sample``; a class with fewer stored features than asked gives ``None``."""

    def __init__(self, num_cases: int, num_classes: int):
        self.features, self.labels = [None] * num_cases, [None] * num_cases
        self.num_classes = num_classes

    def update(self, features: list[Tensor], labels: list[Tensor], case_ids: Tensor) -> None:
        for i, case in enumerate(case_ids):
            self.features[int(case.cpu().numpy())] = features[i].detach().cpu().numpy()
            self.labels[int(case.cpu().numpy())] = labels[i].detach().cpu().numpy()

    def sample(self, per_class: int) -> list:
        stored = [i for i, labels in enumerate(self.labels) if labels is not None]
        features = np.concatenate([self.features[i] for i in stored], axis=0)
        labels = np.concatenate([self.labels[i] for i in stored], axis=0)
        chosen = []
        for c in range(self.num_classes):
            of_class = features[labels == c]
            if of_class.shape[0] >= per_class:
                chosen.append(of_class[torch.tensor(random.sample(range(of_class.shape[0]), per_class)).numpy()])
            else:
                chosen.append(None)
        return chosen


def official_correlation(features: Tensor, prob: Tensor, label: Tensor, memory: list, num_classes: int,
                         num_filtered: int, temperature: float = 0.1):
    """The official ``cal_correlation_matrix``: per predicted class, the ``num_filtered`` most confident
    voxels (a full sort), their logits against every class's memory (copied from numpy to the device per
    class and call), softmax; ``None`` when nothing qualifies."""
    rows = []
    for c in range(num_classes):
        of_class = features[label == c]
        order = torch.sort(prob[label == c], descending=True).indices[:num_filtered]
        of_class = of_class[order]
        logits = [of_class @ torch.from_numpy(m.T).to(features.device) for m in memory
                  if m is not None and of_class.shape[0] > 1 and m.shape[0] > 1]
        if logits:
            rows.append(torch.softmax(torch.cat(logits, dim=1) / temperature, dim=1))
    return torch.cat(rows) if rows else None


def official_binary_dice_loss(prob: Tensor, target: Tensor) -> Tensor:
    target = target.float()
    return 1 - (2 * torch.sum(prob * target) + 1e-8) / (torch.sum(prob) + torch.sum(target) + 1e-8)


def official_caml_model(n_filters: int = 16, feat_dim: int = 32, num_classes: int = 2) -> nn.Module:
    """CAML3d as the official code builds it: our V-Nets (the official layers) with the official CMA, two
    ``nn.TransformerEncoderLayer`` on the bottleneck tokens, instead of the fused attention."""
    from caml.models import CAML3d

    model = CAML3d(1, num_classes, n_filters=n_filters, feat_dim=feat_dim, has_dropout=True)
    channels = 8 * n_filters
    model.encoder2.intra_attention = _OfficialSampleAttention(channels, 0.5, intra=True)
    model.encoder2.inter_attention = _OfficialSampleAttention(channels, 0.5, intra=False)
    return model


def official_train_step(model: nn.Module, optimizer, bank: OfficialMemoryBank, volume: Tensor, label: Tensor,
                        case_ids: Tensor, iteration: int, labeled_bs: int = 2, memory_num: int = 256,
                        num_filtered: int = 12800, lamda: float = 0.5, lambda_c: float = 1.0,
                        lambda_o: float = 0.05, temperature: float = 0.1) -> float:
    """One iteration of the official ``train_caml.py`` loop body after the batch is on the device:
    forward, supervised Dice, mutual consistency through host buffers, the memory-bank update and
    sampling through numpy, the filtered correlations and OCC, backward and the SGD step, and the
    per-iteration logging of the loss (a host sync). ``lambda_c`` / ``lambda_o`` are the ramped weights."""
    model.train()
    outputs_v, outputs_a, embedding_v, embedding_a = model(volume)
    outputs = [outputs_v, outputs_a]
    num_classes = outputs_v.shape[1]
    loss_s = sum(official_binary_dice_loss(torch.softmax(out[:labeled_bs], dim=1)[:, 1], label[:labeled_bs] == 1)
                 for out in outputs)
    loss_c = official_mutual_consistency(outputs, temperature)

    soft_v, soft_a = torch.softmax(outputs_v, dim=1), torch.softmax(outputs_a, dim=1)
    true_labels = label[:labeled_bs]
    correct = ((soft_a[:labeled_bs].argmax(1) == true_labels).float()
               + (soft_v[:labeled_bs].argmax(1) == true_labels).float()) == 2
    prob_v_u, pred_v_u = torch.max(soft_v[labeled_bs:], dim=1)
    _, pred_a_u = torch.max(soft_a[labeled_bs:], dim=1)
    labeled_v = embedding_v[:labeled_bs].permute(0, 2, 3, 4, 1).contiguous()
    b, h, w, d, channels = labeled_v.shape
    model.eval()  # the official projection of the memory features: BatchNorm's running statistics
    proj_v = model.projection_head1(labeled_v.view(-1, channels)).view(b, h, w, d, -1)
    proj_a = model.projection_head2(embedding_a[:labeled_bs].view(-1, channels)).view(b, h, w, d, -1)  # no permute
    model.train()
    bank.update([(proj_v[i][correct[i]] + proj_a[i][correct[i]]) / 2 for i in range(labeled_bs)],
                [true_labels[i][correct[i]] for i in range(labeled_bs)], case_ids[:labeled_bs])
    memory = bank.sample(memory_num)

    consistent = pred_v_u == pred_a_u
    unlabeled_v = embedding_v[labeled_bs:].permute(0, 2, 3, 4, 1)[consistent, :]
    unlabeled_a = embedding_a[labeled_bs:].permute(0, 2, 3, 4, 1)[consistent, :]
    corr_v = official_correlation(model.prediction_head1(model.projection_head1(unlabeled_v)),
                                  prob_v_u[consistent], pred_v_u[consistent], memory, num_classes, num_filtered)
    corr_a = official_correlation(model.prediction_head2(model.projection_head2(unlabeled_a)),
                                  prob_v_u[consistent], pred_v_u[consistent], memory, num_classes, num_filtered)
    loss_o = 0
    if corr_v is not None and corr_a is not None:
        loss_o = torch.sum(torch.sum(-corr_a * torch.log(corr_v + 1e-8), dim=1)) / corr_a.shape[0]
    loss = lamda * loss_s + lambda_c * loss_c + lambda_o * loss_o
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss)  # the official logs every iteration's losses
