"""CAML3d: the two-sub-model V-Net of CAML (Gao et al., MICCAI 2023), official ``CAML3d_v1`` layout.

Sub-model v: encoder 1 + decoder 1 (up-sampling by transposed conv). Sub-model a: encoder 2 with CMA
(intra- then inter-sample attention, :class:`caml_ops.nn.CrossSampleMutualAttention`) after block four,
active only in training, + decoder 2 (trilinear up-sampling + conv). Projection and prediction heads
(Linear, BatchNorm1d, ReLU, Linear) map voxel embeddings to the ``feat_dim``-wide features of the
omni-correlation loss. Module names and shapes are the official ones: official checkpoints load with
``strict=True`` (:func:`load_checkpoint`).
"""
from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from caml_ops.nn import CrossSampleMutualAttention

from .head_statistics import compute_dtype, projection_statistics, row_chunks
from .vnet import DEPTH, Decoder, Encoder, check_args

_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "net")


class CAML3dOutput(NamedTuple):
    """The official model's outputs, in its order."""

    logits_v: Tensor  # [B, num_classes, *spatial], sub-model v (decoder 1)
    logits_a: Tensor  # [B, num_classes, *spatial], sub-model a (decoder 2)
    embedding_v: Tensor  # [B, n_filters, *spatial], decoder 1's last features
    embedding_a: Tensor  # [B, n_filters, *spatial], decoder 2's last features


class AuxiliaryEncoder(Encoder):
    """Encoder 2: the V-Net encoder with CMA on the block-four features.

    The official auxiliary encoder holds the CMA's two stages itself (``intra_attention.encoder_layers``,
    ``inter_attention.encoder_layers``), so they are registered here under those names and applied in
    the CMA's order.
    """

    def __init__(self, in_channels: int = 1, n_filters: int = 16, normalization: str = "none",
                 has_dropout: bool = False, cma_heads: int = 4, cma_dropout: float = 0.5,
                 cma_backend: str = "auto") -> None:
        super().__init__(in_channels, n_filters, normalization, has_dropout)
        check_args(type(self).__name__, cma_heads=cma_heads, cma_dropout=cma_dropout)
        cma = CrossSampleMutualAttention(
            8 * n_filters, nhead=cma_heads, ffn_mult=4, dropout=cma_dropout, backend=cma_backend
        )
        self.intra_attention = cma.intra_attention
        self.inter_attention = cma.inter_attention

    def after_block_four(self, x4: Tensor) -> Tensor:
        with record_function("caml.cma"):
            return self.inter_attention(self.intra_attention(x4))


def _head(in_features: int, feat_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, feat_dim), nn.BatchNorm1d(feat_dim), nn.ReLU(inplace=True), nn.Linear(feat_dim, feat_dim)
    )


class CAML3d(nn.Module):
    """CAML's model (official ``CAML3d_v1``; defaults: the official configuration).

    Args:
        in_channels: image channels (LA: 1).
        num_classes: segmentation classes, background included (LA: 2).
        n_filters: V-Net base width; the voxel embeddings are ``n_filters`` wide.
        feat_dim: width of the projection / prediction heads' output (official: 32; docs/design.md,
            "The official code").
        normalization: ``"batchnorm"``, ``"groupnorm"``, ``"instancenorm"`` or ``"none"``.
        has_dropout: 3D dropout (p = 0.5) on the bottlenecks and before the output convs in training
            (the official training model; its test model has none, which changes nothing in eval mode).
        cma_heads, cma_dropout: heads and dropout of the CMA transformer layers (official: 4, 0.5).
        cma_backend: the caml_ops backend of the CMA attention ("auto": the fused kernels).

    ``forward(x)``, x: [B, in_channels, D, H, W] with D, H, W multiples of 16, returns
    :class:`CAML3dOutput` ``(logits_v, logits_a, embedding_v, embedding_a)``. CMA mixes the samples of
    the batch in training mode only; in eval mode every sample is processed independently.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, n_filters: int = 16, feat_dim: int = 32,
                 normalization: str = "batchnorm", has_dropout: bool = True, cma_heads: int = 4,
                 cma_dropout: float = 0.5, cma_backend: str = "auto") -> None:
        super().__init__()
        check_args(type(self).__name__, in_channels=in_channels, num_classes=num_classes, n_filters=n_filters,
                   feat_dim=feat_dim, normalization=normalization, has_dropout=has_dropout, cma_heads=cma_heads,
                   cma_dropout=cma_dropout)
        self.in_channels, self.num_classes = in_channels, num_classes
        self.n_filters, self.feat_dim = n_filters, feat_dim
        self.encoder1 = Encoder(in_channels, n_filters, normalization, has_dropout)
        self.encoder2 = AuxiliaryEncoder(
            in_channels, n_filters, normalization, has_dropout, cma_heads, cma_dropout, cma_backend
        )
        self.decoder1 = Decoder(num_classes, n_filters, normalization, has_dropout, up_mode="deconv")
        self.decoder2 = Decoder(num_classes, n_filters, normalization, has_dropout, up_mode="trilinear")
        self.projection_head1 = _head(n_filters, feat_dim)
        self.prediction_head1 = _head(feat_dim, feat_dim)
        self.projection_head2 = _head(n_filters, feat_dim)
        self.prediction_head2 = _head(feat_dim, feat_dim)

    def forward(self, x: Tensor) -> CAML3dOutput:
        multiple = 2**DEPTH
        if x.dim() != 5 or x.shape[1] != self.in_channels or any(s % multiple for s in x.shape[2:]):
            raise ValueError(
                f"x must be [B, {self.in_channels}, D, H, W] with D, H, W multiples of {multiple}, "
                f"got shape {tuple(x.shape)}"
            )
        features_v = self.encoder1(x)
        features_a = self.encoder2(x)
        logits_v, embedding_v = self.decoder1(features_v)
        logits_a, embedding_a = self.decoder2(features_a)
        return CAML3dOutput(logits_v, logits_a, embedding_v, embedding_a)

    def project(self, embeddings: Tensor, sub_model: str, running_stats: bool = False) -> Tensor:
        """Projection head of sub-model ``"v"`` or ``"a"``: [N, n_filters] -> [N, feat_dim].

        ``running_stats``: normalise with BatchNorm's running statistics (and leave them as they are)
        even in training mode, as the official code projects the memory bank's features.
        """
        head = self._heads(sub_model)[0]
        if not self._uses_running_stats(head, running_stats):
            return head(embeddings)
        _, _, relu, linear2 = head
        return linear2(relu(F.linear(embeddings, *_fold_running_stats(head))))

    @torch.no_grad()
    def project_mean(self, embeddings_v: Tensor, embeddings_a: Tensor, members: Tensor) -> Tensor:
        """The memory bank's features of the voxels ``members`` (int64 [N] into both embeddings [V,
        n_filters]): ``(project(v[members], "v") + project(a[members], "a")) / 2`` with BatchNorm's running
        statistics, computed in chunks of rows (no [N, feat_dim] temporaries). -> [N, feat_dim] float32
        (float64 for float64 embeddings), no gradient."""
        heads = [self._heads(s)[0] for s in ("v", "a")]
        if not all(self._uses_running_stats(head, True) for head in heads):  # no running statistics: as is
            v, a = (self.project(x[members], s, True) for x, s in ((embeddings_v, "v"), (embeddings_a, "a")))
            return (v.to(compute_dtype(v.dtype)) + a.to(compute_dtype(a.dtype))) / 2
        folded = [_fold_running_stats(head) for head in heads]
        out = torch.empty((members.shape[0], self.feat_dim), dtype=compute_dtype(embeddings_v.dtype),
                          device=embeddings_v.device)
        chunks = zip(*(row_chunks(x, members, x.dtype) for x in (embeddings_v, embeddings_a)))
        for (where, x_v), (_, x_a) in chunks:
            projected = [linear2(relu(F.linear(x, *fold))) for x, fold, (_, _, relu, linear2)
                         in zip((x_v, x_a), folded, heads)]
            out[where] = (projected[0].to(out.dtype) + projected[1].to(out.dtype)) / 2
        return out

    @staticmethod
    def _uses_running_stats(head: nn.Sequential, running_stats: bool) -> bool:
        norm = head[1]
        return (running_stats or not norm.training) and norm.track_running_stats

    def predict(self, embeddings: Tensor, sub_model: str) -> Tensor:
        """Projection then prediction head of sub-model ``"v"`` or ``"a"``: [N, n_filters] -> [N, feat_dim]."""
        projection, prediction = self._heads(sub_model)
        return prediction(projection(embeddings))

    def predict_rows(self, embeddings: Tensor, sub_model: str, rows: Tensor,
                     members: Optional[Tensor] = None) -> Tensor:
        """``predict(batch, sub_model)[rows]`` with ``batch = embeddings[members]`` (all of ``embeddings``
        when ``members`` is None): the heads' BatchNorm statistics (training mode) are taken over every row
        of the batch as there, but only the filtered ``rows`` go through the layers after the projection
        head's ReLU. The input of the prediction head's BatchNorm is affine in that ReLU's output ``a``
        (two Linear layers), so its batch mean and variance follow from ``a``'s mean and covariance,
        which :func:`caml.models.head_statistics.projection_statistics` computes in chunks without
        holding ``a`` or the batch (docs/design.md, "Speed of the training iteration").
        embeddings [V, n_filters], rows [M] (indices into the batch), members [N] -> [M, feat_dim]."""
        projection, prediction = self._heads(sub_model)
        linear1, norm1, _, linear2 = projection
        linear3, norm2, relu2, linear4 = prediction
        count = embeddings.shape[0] if members is None else members.shape[0]
        if not (norm1.training and norm2.training) or count < 2:  # BatchNorm's own path and errors
            return self.predict(embeddings if members is None else embeddings[members], sub_model)[rows]
        stats = projection_statistics(embeddings, linear1, norm1, rows, members)
        _update_running_stats(norm1, stats.norm_mean, stats.norm_var, count)
        dtype = stats.mean.dtype  # float32 under autocast (float64 for float64)
        with torch.autocast(embeddings.device.type, enabled=False):
            weight = linear3.weight.to(dtype) @ linear2.weight.to(dtype)
            bias = linear3.weight.to(dtype) @ linear2.bias.to(dtype) + linear3.bias.to(dtype)
            mean = weight @ stats.mean + bias
            var = ((weight @ stats.cov) * weight).sum(1)  # diag(W cov W^T): the biased variance, as BatchNorm's
        _update_running_stats(norm2, mean, var, count)
        g = linear3(linear2(stats.rows))
        h = (g.to(dtype) - mean) * torch.rsqrt(var + norm2.eps)
        if norm2.affine:
            h = h * norm2.weight + norm2.bias
        return linear4(relu2(h))

    def _heads(self, sub_model: str) -> tuple[nn.Module, nn.Module]:
        """(projection head, prediction head) of sub-model ``"v"`` (decoder 1) or ``"a"`` (decoder 2)."""
        if sub_model == "v":
            return self.projection_head1, self.prediction_head1
        if sub_model == "a":
            return self.projection_head2, self.prediction_head2
        raise ValueError(f"sub_model must be 'v' (decoder 1) or 'a' (decoder 2), got {sub_model!r}")

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, num_classes={self.num_classes}, "
            f"n_filters={self.n_filters}, feat_dim={self.feat_dim}"
        )

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, **kwargs: Any) -> "CAML3d":
        """A model built to the checkpoint's sizes (in_channels, num_classes, n_filters, feat_dim, read
        from its shapes; other arguments from ``kwargs``), its weights loaded with ``strict=True``."""
        state = read_state_dict(path)
        try:
            n_filters, in_channels = state["encoder1.block_one.conv.0.weight"].shape[:2]
            sizes = dict(
                in_channels=in_channels,
                num_classes=state["decoder1.out_conv.weight"].shape[0],
                n_filters=n_filters,
                feat_dim=state["projection_head1.0.weight"].shape[0],
            )
        except KeyError as err:
            raise ValueError(f"{os.fspath(path)} is not a CAML3d checkpoint: no {err.args[0]!r}") from None
        model = cls(**{**sizes, **kwargs})
        model.load_state_dict(state, strict=True)
        return model


@torch.no_grad()
def _update_running_stats(norm: nn.BatchNorm1d, mean: Tensor, var: Tensor, count: int) -> None:
    """What ``norm`` does to its running statistics in a training-mode call on a batch of ``count`` rows
    with this batch mean and biased variance."""
    if not norm.track_running_stats:
        return
    norm.num_batches_tracked.add_(1)
    factor = norm.momentum if norm.momentum is not None else 1.0 / float(norm.num_batches_tracked)
    norm.running_mean.mul_(1 - factor).add_(mean.detach().to(norm.running_mean.dtype), alpha=factor)
    unbiased = var.detach() * (count / (count - 1))
    norm.running_var.mul_(1 - factor).add_(unbiased.to(norm.running_var.dtype), alpha=factor)


def _fold_running_stats(head: nn.Sequential) -> tuple[Tensor, Tensor]:
    """The weight and bias of a head's first Linear with its BatchNorm's running statistics folded in
    (BatchNorm with fixed statistics is affine): one pass over the rows less."""
    linear1, norm = head[0], head[1]
    scale = torch.rsqrt(norm.running_var + norm.eps)
    shift = -norm.running_mean * scale
    if norm.affine:
        scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
    return linear1.weight * scale[:, None], linear1.bias * scale + shift


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The model state_dict in a checkpoint file, read with ``weights_only=True`` onto the CPU.

    Accepts a raw state_dict (the official ``torch.save(model.state_dict(), path)``) or a dict holding
    it under ``"model"``, ``"state_dict"``, ``"model_state_dict"`` or ``"net"``; a ``"module."`` prefix
    on every key (a DistributedDataParallel model's state_dict) is removed.
    """
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not _is_state_dict(obj):
        inner = [obj[k] for k in _WRAPPER_KEYS if isinstance(obj, Mapping) and _is_state_dict(obj.get(k))]
        if not inner:
            found = sorted(obj.keys()) if isinstance(obj, Mapping) else type(obj).__name__
            raise ValueError(
                f"{os.fspath(path)} holds neither a state_dict nor a dict with one under {_WRAPPER_KEYS}: {found}"
            )
        obj = inner[0]
    state = dict(obj)
    if all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a checkpoint file (official or ours, see :func:`read_state_dict`) into ``model`` with
    ``strict=True``; returns the model."""
    model.load_state_dict(read_state_dict(path), strict=True)
    return model
