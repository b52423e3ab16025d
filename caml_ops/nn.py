"""nn modules on the caml_ops ops: CAML's cross-sample mutual attention (CMA) and the two losses.

The transformer layer keeps the parameters and the semantics of ``nn.TransformerEncoderLayer``
(post-norm, ReLU, dropout on the attention probabilities, after the attention, after the FFN's
activation and after the FFN), so weights move between the two with ``load_state_dict(strict=True)``;
the attention is replaced by :func:`caml_ops.cross_sample_attention` (across the samples of the batch at
every position) or :func:`caml_ops.intra_sample_attention` (over the positions of each sample), and the
three other dropouts by :class:`Dropout` (:func:`caml_ops.dropout`, the same Philox RNG).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._backend import check_backend_name
from ._checks import check_choice, check_dropout_p, check_eps, check_positive_ints, check_temperature
from .attention import cross_sample_attention, intra_sample_attention
from .dropout import dropout as fused_dropout
from .mutual_consistency import mutual_consistency_loss
from .omni_correlation import REDUCTIONS, omni_correlation_loss

__all__ = [
    "Dropout",
    "CrossSampleTransformerLayer",
    "CrossSampleMutualAttention",
    "OmniCorrelationLoss",
    "MutualConsistencyLoss",
]

ATTENTIONS = ("inter", "intra")


def _memory_format(x: Tensor) -> torch.memory_format:
    """channels_last_3d for a channels-last (and not also channel-first) 5-D tensor, else contiguous_format."""
    channels_last = x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)
    return torch.channels_last_3d if channels_last and not x.is_contiguous() else torch.contiguous_format


class Dropout(nn.Dropout):
    """``nn.Dropout`` with the Philox mask of :func:`caml_ops.dropout`: no mask kept for the backward, and
    on CPU the mask costs a fraction of torch's Bernoulli sampling."""

    def __init__(self, p: float = 0.5, *, backend: str = "auto") -> None:
        super().__init__(check_dropout_p(p, "p"))
        self.backend = check_backend_name(backend)

    def forward(self, x: Tensor) -> Tensor:
        return fused_dropout(x, self.p, self.training, backend=self.backend)

    def extra_repr(self) -> str:
        return f"p={self.p}, backend={self.backend!r}"


class _SampleSelfAttention(nn.Module):
    """The parameters of ``nn.MultiheadAttention`` (``in_proj_weight``, ``in_proj_bias``, ``out_proj``),
    its initialisation, and the attention done by the caml_ops ops on tokens [B, L, C]."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float, attention: str, backend: str) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.attention, self.backend = attention, backend
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        batch, length, channels = tokens.shape
        # q, k, v are [B, L, H, d] views of the one projection: no permute copies.
        qkv = F.linear(tokens, self.in_proj_weight, self.in_proj_bias).view(
            batch, length, 3, self.num_heads, channels // self.num_heads
        )
        q, k, v = qkv.unbind(2)
        attend = cross_sample_attention if self.attention == "inter" else intra_sample_attention
        out = attend(q, k, v, dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        return self.out_proj(out.reshape(batch, length, channels))

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
            f"attention={self.attention!r}"
        )


class CrossSampleTransformerLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` on channel-first feature maps, with sample-wise attention.

    Input and output: [B, C, *spatial] with C = ``d_model``; the L = prod(spatial) positions of each
    sample are its tokens. ``attention="inter"`` attends across the B samples at every position and head
    (CAML's inter-sample attention: the official code feeds tokens [B, L, C] to a sequence-first layer);
    ``"intra"`` attends over the L positions of each sample (tokens [L, B, C] in the official code).

    Post-norm, ReLU, ``dropout`` on the attention probabilities, after the attention's output projection
    (``dropout1``), after the FFN's activation (``dropout``) and after the FFN (``dropout2``), as torch does.
    The parameters and their state_dict keys are those of ``nn.TransformerEncoderLayer(d_model, nhead,
    dim_feedforward, dropout)``. In eval mode the layer is the identity (CAML applies CMA only in
    training) unless ``active_in_eval=True``.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        dropout: float,
        attention: str = "inter",
        active_in_eval: bool = False,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_positive_ints(d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward)
        if d_model % nhead:
            raise ValueError(f"d_model ({d_model}) must be a multiple of nhead ({nhead})")
        dropout = check_dropout_p(dropout, "dropout")
        check_backend_name(backend)
        check_choice(attention, "attention", ATTENTIONS)
        self.d_model, self.nhead, self.dim_feedforward = d_model, nhead, dim_feedforward
        self.attention, self.active_in_eval = attention, bool(active_in_eval)
        self.self_attn = _SampleSelfAttention(d_model, nhead, dropout, attention, backend)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        # `backend` picks the attention kernels; the dropouts draw the same masks on every backend, so
        # they take the fastest one (the reference only for a reference layer).
        dropout_backend = "reference" if backend == "reference" else "auto"
        self.dropout = Dropout(dropout, backend=dropout_backend)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = Dropout(dropout, backend=dropout_backend)
        self.dropout2 = Dropout(dropout, backend=dropout_backend)

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training or self.active_in_eval):
            return x
        if x.dim() < 3 or x.shape[1] != self.d_model:
            raise ValueError(
                f"x must be [B, C, *spatial] with C = d_model = {self.d_model}, got shape {tuple(x.shape)}"
            )
        # The token layout [B, L, C] is a view of a channels-last x and one copy of a channel-first one; q, k,
        # v and the FFN then work on it in place. The result comes back in x's layout.
        tokens = x.flatten(2).transpose(1, 2).contiguous()
        h = self.norm1(tokens + self.dropout1(self.self_attn(tokens)))
        h = self.norm2(h + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(h))))))
        return h.transpose(1, 2).reshape(x.shape).contiguous(memory_format=_memory_format(x))

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, nhead={self.nhead}, dim_feedforward={self.dim_feedforward}, "
            f"dropout={self.self_attn.dropout}, attention={self.attention!r}, active_in_eval={self.active_in_eval}"
        )


class CrossSampleMutualAttention(nn.Module):
    """CAML's CMA block: intra-sample attention, then inter-sample attention, on [B, C, *spatial].

    Each stage is a :class:`CrossSampleTransformerLayer` (``nhead`` heads, FFN width ``ffn_mult * channels``,
    ``dropout``). The submodule names follow the official CAML auxiliary encoder, whose
    IntraSampleAttention and InterSampleAttention each hold one transformer layer as ``encoder_layers``:
    the state_dict keys are ``intra_attention.encoder_layers.*`` and ``inter_attention.encoder_layers.*``,
    so official CMA weights load as they are. Identity in eval mode unless ``active_in_eval=True``.
    """

    def __init__(
        self,
        channels: int,
        nhead: int = 4,
        ffn_mult: int = 4,
        dropout: float = 0.5,
        *,
        active_in_eval: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_positive_ints(channels=channels, nhead=nhead, ffn_mult=ffn_mult)
        self.channels, self.nhead, self.ffn_mult, self.dropout = channels, nhead, ffn_mult, dropout

        def stage(attention: str) -> nn.Sequential:
            layer = CrossSampleTransformerLayer(
                channels, nhead, ffn_mult * channels, dropout, attention, active_in_eval, backend=backend
            )
            return nn.Sequential(OrderedDict(encoder_layers=layer))

        self.intra_attention = stage("intra")
        self.inter_attention = stage("inter")

    def forward(self, x: Tensor) -> Tensor:
        return self.inter_attention(self.intra_attention(x))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, nhead={self.nhead}, ffn_mult={self.ffn_mult}, dropout={self.dropout}"


class OmniCorrelationLoss(nn.Module):
    """Module form of :func:`caml_ops.omni_correlation_loss`: ``forward(feat_v, feat_a, memory)``."""

    def __init__(self, temperature: float = 0.1, eps: float = 1e-8, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.temperature, self.eps = check_temperature(temperature), check_eps(eps)
        self.reduction, self.backend = check_choice(reduction, "reduction", REDUCTIONS), check_backend_name(backend)

    def forward(self, feat_v: Tensor, feat_a: Tensor, memory: Tensor) -> Tensor:
        return omni_correlation_loss(
            feat_v, feat_a, memory, temperature=self.temperature, eps=self.eps,
            reduction=self.reduction, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, eps={self.eps}, reduction={self.reduction!r}, backend={self.backend!r}"


class MutualConsistencyLoss(nn.Module):
    """Module form of :func:`caml_ops.mutual_consistency_loss`.

    ``forward(logits_1, logits_2, ...)`` with S >= 2 tensors [B, C, *spatial], or ``forward(logits)``
    with one sequence of them or one stacked [S, B, C, *spatial] tensor.
    """

    def __init__(self, temperature: float = 0.1, backend: str = "auto"):
        super().__init__()
        self.temperature = check_temperature(temperature, at_most=1.0)
        self.backend = check_backend_name(backend)

    def forward(self, *logits: Tensor | Sequence[Tensor]) -> Tensor:
        return mutual_consistency_loss(
            logits[0] if len(logits) == 1 else logits, temperature=self.temperature, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, backend={self.backend!r}"
