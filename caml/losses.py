"""CAML's losses: Dice, the confidence filtering of unlabeled voxels and the assembly of the training
objective, with the semantics of the official ``train_caml.py``.

Per step, on a batch whose first ``labeled_bs`` samples are labeled::

    loss = lamda * loss_s + lambda_c(t) * loss_c + lambda_o(t) * loss_o

- ``loss_s``: for each decoder, Dice of the foreground softmax on the labeled half (the official
  code computes no cross-entropy term; ``ce_weight`` adds one, off by default);
- ``loss_c``: mutual consistency of the two sub-models' softmax and sharpened softmax over the
  whole batch (:func:`caml_ops.mutual_consistency_loss`, temperature 0.1);
- ``loss_o``: omni-correlation consistency (:func:`caml_ops.omni_correlation_loss`, temperature
  0.1, eps 1e-8) of the filtered unlabeled voxels' predicted features against the memory bank;
- ``lambda_c(t) = consistency * sigmoid_rampup(t // rampup_interval, rampup_length)``
  (:mod:`caml.rampup`), ``lambda_o``
  likewise with ``consistency_o``; ``t`` is the 1-based iteration.

The parts run in the profiler ranges ``caml.network``, ``caml.supervised``, ``caml.consistency``,
``caml.memory_bank`` and ``caml.occ`` (``benchmarks/iteration.py --profile`` breaks an iteration down by them).

Two switches of ``LossWeights`` select the official behaviour where ours differs or improves on it:
``memory_reshape="official"`` scrambles sub-model a's labeled embedding as the official
``.view(-1, C)`` does, ``occ_embedding="normalized"`` takes the OCC loss on L2-normalised features
(cosine similarity / temperature; the official features are raw).

The memory bank is refreshed each step (before sampling) with the labeled voxels both sub-models
predict correctly, projected by the model's projection heads with running BatchNorm statistics
(``CAML3d.project(..., running_stats=True)``), averaged over the two sub-models.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

import caml_ops

from .config import MEMORY_RESHAPES, OCC_EMBEDDINGS
from .memory import MemoryBank
from .models.head_statistics import compute_dtype
from .rampup import sigmoid_rampup

__all__ = ["dice_loss", "filter_consistent", "occ_saturation", "LossWeights", "CAMLObjective"]

SATURATION_ROWS = 1024  # rows per sub-model that occ_saturation looks at (evenly spaced)
SATURATED = 0.99


def dice_loss(probs: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """Official ``Binary_dice_loss``: ``1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps)`` over all elements."""
    target = target.to(probs.dtype)
    return 1 - (2 * torch.sum(probs * target) + eps) / (torch.sum(probs) + torch.sum(target) + eps)


def filter_consistent(prob_v: Tensor, pred_v: Tensor, pred_a: Tensor, num_filtered: int,
                      num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Official per-class confidence filtering of unlabeled voxels.

    Args:
        prob_v: [...] model v's confidence (its max softmax probability) per voxel.
        pred_v, pred_a: [...] the two sub-models' predicted classes.
        num_filtered: voxels kept per class.

    Returns ``(consistent, rows, classes)``: ``consistent`` [N] the voxels both sub-models agree on
    (the "consistent set"), as indices into the flattened voxels, ascending; ``rows`` [M] indices
    into the consistent set: per class, its voxels sorted by ``prob_v`` descending (stable), the
    first ``num_filtered``, classes in order, a class kept only if it has more than one such voxel
    (as the official code); ``classes`` [M].
    """
    consistent = torch.nonzero((pred_v == pred_a).flatten()).squeeze(1)
    labels, probs = pred_v.flatten()[consistent], prob_v.flatten()[consistent]
    rows, classes = [], []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).squeeze(1)
        order = _top_stable(probs[members], num_filtered)
        if order.numel() > 1:
            rows.append(members[order])
            classes.append(torch.full_like(order, c))
    if not rows:
        empty = torch.empty(0, dtype=torch.int64, device=consistent.device)
        return consistent, empty, empty
    return consistent, torch.cat(rows), torch.cat(classes)


def _top_stable(values: Tensor, k: int) -> Tensor:
    """``torch.sort(values, descending=True, stable=True).indices[:k]`` without sorting all of
    ``values``: the k-th largest value from ``topk``, every larger value, the first of the values
    equal to it (in index order) up to k, and only those sorted."""
    if values.numel() <= k:
        return torch.sort(values, descending=True, stable=True).indices
    kth = torch.topk(values, k, sorted=False).values.min()
    above, tied = values > kth, values == kth
    chosen = torch.nonzero(above | (tied & (torch.cumsum(tied, 0) <= k - above.sum()))).squeeze(1)
    return chosen[torch.sort(values[chosen], descending=True, stable=True).indices]


@torch.no_grad()
def occ_saturation(features: Sequence[Tensor], memory: Tensor, temperature: float, backend: str = "auto") -> Tensor:
    """The fraction of rows of ``features`` (each [N, D]; at most ``SATURATION_ROWS`` evenly spaced rows
    of each) whose correlation softmax over ``memory`` has a top probability above 0.99: how close the
    OCC loss is to one-hot correlations (whose gradient vanishes). A 0-dim tensor on the features' device."""
    step = max(1, math.ceil(features[0].shape[0] / SATURATION_ROWS))
    rows = torch.cat([f.detach()[::step] for f in features])
    corr = caml_ops.omni_correlation(rows, memory, temperature=temperature, backend=backend)
    return (corr.amax(dim=1) > SATURATED).float().mean()


@dataclass
class LossWeights:
    """Weights and hyper-parameters of the objective (defaults: the official ones, 8 labels)."""

    lamda: float = 0.5
    consistency: float = 1.0
    consistency_o: float = 0.05
    rampup_length: float = 20.0
    rampup_interval: int = 150
    temperature: float = 0.1  # sharpening
    occ_temperature: float = 0.1
    occ_eps: float = 1e-8
    memory_num: int = 256
    num_filtered: int = 12800
    ce_weight: float = 0.0
    memory_reshape: str = "permuted"  # "official": sub-model a's labeled embedding scrambled as official
    occ_embedding: str = "raw"  # "normalized": OCC on L2-normalised features (cosine similarity / temperature)

    def ramp(self, iteration: int) -> float:
        return sigmoid_rampup(iteration // self.rampup_interval, self.rampup_length)


def _full(x: Tensor) -> Tensor:
    """Half-precision results (under autocast) in float32; float32 / float64 as they are."""
    return x.to(compute_dtype(x.dtype))


def _voxels(embedding: Tensor) -> Tensor:
    """[B, C, *spatial] -> [B, V, C] (channels last, row-major voxels)."""
    return embedding.flatten(2).transpose(1, 2)


class CAMLObjective(nn.Module):
    """The training objective as a module (so that DistributedDataParallel sees every parameter the
    loss uses, the heads included): ``forward(volume, label, case_ids, iteration) -> (loss, parts)``.

    Args:
        model: a :class:`caml.models.CAML3d` (or anything with its outputs and its ``project`` and
            ``predict`` of voxel embeddings).
        memory: the labeled-feature bank (``None`` for ``method="supervised"``).
        labeled_bs: labeled samples at the head of each batch.
        weights: :class:`LossWeights`.
        method: ``"caml"`` or ``"supervised"`` (only ``lamda * loss_s``: the same model, batches and
            budget without the unlabeled terms).
        backend: caml_ops backend for the fused losses.
        autocast_dtype: run the network (not the losses) under autocast in this dtype (bf16 on CUDA).
    """

    def __init__(self, model: nn.Module, memory: Optional[MemoryBank], labeled_bs: int,
                 weights: LossWeights = LossWeights(), method: str = "caml", backend: str = "auto",
                 autocast_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if method not in ("caml", "supervised"):
            raise ValueError(f"method must be 'caml' or 'supervised', got {method!r}")
        if method == "caml" and memory is None:
            raise ValueError("method 'caml' needs a memory bank")
        if weights.memory_reshape not in MEMORY_RESHAPES:
            raise ValueError(f"memory_reshape must be one of {MEMORY_RESHAPES}, got {weights.memory_reshape!r}")
        if weights.occ_embedding not in OCC_EMBEDDINGS:
            raise ValueError(f"occ_embedding must be one of {OCC_EMBEDDINGS}, got {weights.occ_embedding!r}")
        self.model, self.memory, self.labeled_bs = model, memory, labeled_bs
        self.weights, self.method, self.backend = weights, method, backend
        self.autocast_dtype = autocast_dtype

    def _autocast(self, device: torch.device):
        enabled = self.autocast_dtype is not None
        return torch.autocast(device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=enabled)

    def forward(self, volume: Tensor, label: Tensor, case_ids: Sequence[int] | Tensor,
                iteration: int) -> tuple[Tensor, dict[str, Tensor]]:
        w, lb = self.weights, self.labeled_bs
        with self._autocast(volume.device), record_function("caml.network"):
            logits_v, logits_a, embedding_v, embedding_a = self.model(volume)
        # Channel-first logits: the model's channels-last ones make softmax / argmax over the classes a
        # strided reduction (10x slower on a CPU), and the fused loss takes them contiguous anyway.
        logits = [_full(logits_v).contiguous(), _full(logits_a).contiguous()]
        label_l = label[:lb]

        with record_function("caml.supervised"):
            probs = [torch.softmax(x, dim=1) for x in logits]
            loss_s = sum(self._supervised(x[:lb], p[:lb], label_l) for x, p in zip(logits, probs))
        parts = {"loss_s": loss_s}
        loss = w.lamda * loss_s
        if self.method == "caml":
            with record_function("caml.consistency"):
                loss_c = caml_ops.mutual_consistency_loss(logits, temperature=w.temperature, backend=self.backend)
            with record_function("caml.memory_bank"):
                self._update_memory(probs, embedding_v, embedding_a, label_l, case_ids)
            with record_function("caml.occ"):
                loss_o, saturation = self._occ(probs, embedding_v, embedding_a, volume.device)
            ramp = w.ramp(iteration)
            lambda_c, lambda_o = w.consistency * ramp, w.consistency_o * ramp
            loss = loss + lambda_c * loss_c + lambda_o * loss_o
            # The weights as device scalars (a fill, not a host copy): the parts are read in one transfer.
            parts.update(loss_c=loss_c, loss_o=loss_o, lambda_c=torch.full((), lambda_c, device=volume.device),
                         lambda_o=torch.full((), lambda_o, device=volume.device))
            if saturation is not None:
                parts["occ_saturation"] = saturation
        parts["loss"] = loss
        return loss, {k: v.detach().float() for k, v in parts.items()}

    def _supervised(self, logits: Tensor, probs: Tensor, label: Tensor) -> Tensor:
        num_classes = probs.shape[1]
        dice = sum(dice_loss(probs[:, c], label == c) for c in range(1, num_classes)) / (num_classes - 1)
        if self.weights.ce_weight:
            dice = dice + self.weights.ce_weight * F.cross_entropy(logits, label)
        return dice

    @torch.no_grad()
    def _update_memory(self, probs, embedding_v, embedding_a, label_l, case_ids) -> None:
        lb, channels, num_classes = self.labeled_bs, embedding_a.shape[1], probs[0].shape[1]
        # max(...).indices, not argmax: the same first maximum, and over the classes axis argmax is a strided
        # reduction 40x slower on a CPU.
        correct = (probs[0][:lb].max(1).indices == label_l) & (probs[1][:lb].max(1).indices == label_l)
        features, labels = [], []
        for i in range(lb):
            # The voxels both sub-models predict correctly, class by class: the bank's order.
            label = label_l[i].flatten()
            members = torch.cat([torch.nonzero(correct[i].flatten() & (label == c)).squeeze(1)
                                 for c in range(num_classes)])
            # Official: sub-model a's embedding is read by .view(-1, C) without the permute, so row n
            # is C consecutive elements of the channel-first buffer, not voxel n (docs/design.md).
            rows_a = (_voxels(embedding_a[i: i + 1])[0] if self.weights.memory_reshape == "permuted"
                      else embedding_a[i].reshape(-1, channels))
            with self._autocast(label_l.device):  # official: projected with running BatchNorm statistics
                features.append(self.model.project_mean(_voxels(embedding_v[i: i + 1])[0], rows_a, members))
            labels.append(label[members])
        ids = case_ids[:lb] if not isinstance(case_ids, Tensor) else case_ids[:lb].tolist()
        self.memory.update(ids, features, labels, sorted_by_label=True)

    def _occ(self, probs, embedding_v, embedding_a, device) -> tuple[Tensor, Optional[Tensor]]:
        """``(loss_o, occ_saturation)``; the saturation is None when there is no OCC term."""
        w, lb = self.weights, self.labeled_bs
        memory, _ = self.memory.sample(w.memory_num)
        prob_v, pred_v = probs[0][lb:].max(dim=1)
        pred_a = probs[1][lb:].max(dim=1).indices
        consistent, rows, _ = filter_consistent(prob_v, pred_v, pred_a, w.num_filtered, probs[0].shape[1])
        if memory.shape[0] == 0 or rows.numel() == 0:
            return torch.zeros((), device=device), None
        with self._autocast(device):
            # Official: the heads (train mode) see every consistent voxel; the filter picks rows after.
            feat_v = self.model.predict_rows(_voxels(embedding_v[lb:]).flatten(0, 1), "v", rows, consistent)
            feat_a = self.model.predict_rows(_voxels(embedding_a[lb:]).flatten(0, 1), "a", rows, consistent)
        feat_v, feat_a = _full(feat_v), _full(feat_a)
        memory = memory.to(feat_v.dtype)
        if w.occ_embedding == "normalized":  # gradients flow through the normalisation of the features
            feat_v, feat_a, memory = (F.normalize(x, dim=1) for x in (feat_v, feat_a, memory))
        loss = caml_ops.omni_correlation_loss(feat_v, feat_a, memory, temperature=w.occ_temperature,
                                              eps=w.occ_eps, backend=self.backend)
        return loss, occ_saturation((feat_v, feat_a), memory, w.occ_temperature, self.backend)
