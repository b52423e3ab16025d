"""caml_ops.nn against torch: the CMA transformer layer is nn.TransformerEncoderLayer applied the way
the official CAML code applies it (intra: tokens [L, B, C]; inter: tokens [B, L, C] read as
sequence = B, batch = L), in float64, outputs and gradients; weights move both ways; the loss modules
are the functional ops."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import caml_ops
from caml_ops.nn import (
    CrossSampleMutualAttention,
    CrossSampleTransformerLayer,
    MutualConsistencyLoss,
    OmniCorrelationLoss,
)

from caml_ops import reference

from .helpers import assert_close_to_reference, fresh_seed, runnable_backends

F64 = torch.float64
OP_OF = {"inter": "cross_sample_attention", "intra": "intra_sample_attention"}
# (attention, backend, device): the layer on every attention backend this machine runs
LAYER_CASES = [pytest.param(attention, *param.values, marks=param.marks, id=f"{attention}-{param.id}")
               for attention in ("inter", "intra")
               for param in [pytest.param("reference", "cpu", id="reference"), *runnable_backends(OP_OF[attention])]]


def official_apply(layer: nn.TransformerEncoderLayer, x: torch.Tensor, attention: str) -> torch.Tensor:
    """The official CAML Intra/InterSampleAttention forward (sequence-first layer) on [B, C, *spatial]."""
    tokens = x.flatten(2).transpose(1, 2)  # [B, L, C]
    if attention == "intra":
        out = layer(tokens.transpose(0, 1)).transpose(0, 1)  # sequence = positions
    else:
        out = layer(tokens)  # sequence = samples, batch = positions
    return out.transpose(1, 2).reshape(x.shape)


def torch_layer(d_model, nhead, dim_feedforward, dropout):
    return nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, dtype=F64)


@pytest.mark.parametrize("attention,backend,device", LAYER_CASES)
@pytest.mark.parametrize("spatial", [(3, 2, 2), (5,)], ids=["3d", "1d"])
def test_layer_equals_torch_encoder_layer(attention, backend, device, spatial):
    seed = fresh_seed()
    B, C, H, F = 3, 8, 2, 16
    ours = CrossSampleTransformerLayer(C, H, F, 0.0, attention, backend=backend).to(device, F64).train()
    ref = torch_layer(C, H, F, 0.0).to(device).train()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(B, C, *spatial, dtype=F64, device=device)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours = ours(x_ours)
    y_ref = official_apply(ref, x_ref, attention)
    assert y_ours.shape == x.shape
    assert_close_to_reference(y_ours, y_ref, seed, "output")
    grad = torch.randn_like(y_ref)
    y_ours.backward(grad)
    y_ref.backward(grad)
    assert_close_to_reference(x_ours.grad, x_ref.grad, seed, "input grad")
    ref_params = dict(ref.named_parameters())
    ours_params = dict(ours.named_parameters())
    assert ours_params.keys() == ref_params.keys()
    for name, p in ours_params.items():
        assert_close_to_reference(p.grad, ref_params[name].grad, seed, f"grad of {name}")


def test_state_dict_moves_both_ways():
    seed = fresh_seed()
    ref = torch_layer(8, 4, 32, 0.0).train()
    ours = CrossSampleTransformerLayer(8, 4, 32, 0.0, "intra").to(F64).train()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ours.load_state_dict(ref.state_dict(), strict=True)  # torch -> ours
    x = torch.randn(2, 8, 2, 3, 2, dtype=F64)
    assert_close_to_reference(ours(x), official_apply(ref, x, "intra"), seed, "torch weights in ours")
    back = torch_layer(8, 4, 32, 0.0)
    back.load_state_dict(ours.state_dict(), strict=True)  # ours -> torch
    for key, value in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def spelled_out_layer(layer: nn.TransformerEncoderLayer, x: torch.Tensor, attention: str, p: float) -> torch.Tensor:
    """nn.TransformerEncoderLayer's computation written out on tokens [B, L, C], with the Philox states
    drawn from torch's generator in the order caml_ops draws them: the attention's mask, then dropout1,
    the FFN dropout and dropout2."""
    tokens = x.flatten(2).transpose(1, 2)
    batch, length, channels = tokens.shape
    heads = layer.self_attn.num_heads
    q, k, v = F.linear(tokens, layer.self_attn.in_proj_weight, layer.self_attn.in_proj_bias).view(
        batch, length, 3, heads, channels // heads).unbind(2)
    rng_state = torch.randint(0, 2**62, (2,))
    op = OP_OF[attention]
    shape = (length, heads, batch, batch) if attention == "inter" else (batch, heads, length, length)
    mask = reference.attention_dropout_mask(rng_state, shape, p, device=x.device)
    attended = getattr(reference, op)(q, k, v, p, None, dropout_mask=mask).reshape(batch, length, channels)
    h = layer.norm1(tokens + reference_dropout(layer.self_attn.out_proj(attended), p))
    h = layer.norm2(h + reference_dropout(layer.linear2(reference_dropout(F.relu(layer.linear1(h)), p)), p))
    return h.transpose(1, 2).reshape(x.shape)


def reference_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """The reference dropout with the Philox mask of a state drawn now from torch's generator."""
    return reference.dropout(x, p, reference.dropout_mask(torch.randint(0, 2**62, (2,)), x.shape, p,
                                                                 device=x.device))


@pytest.mark.parametrize("attention,backend,device", LAYER_CASES)
def test_dropout_places_and_rng_order(attention, backend, device):
    seed = fresh_seed()
    ours = CrossSampleTransformerLayer(8, 2, 16, 0.3, attention, backend=backend).to(device, F64).train()
    ref = torch_layer(8, 2, 16, 0.3).to(device).train()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 8, 3, 2, 2, dtype=F64, device=device)
    torch.manual_seed(seed)
    y_ours = ours(x)
    torch.manual_seed(seed)
    with torch.no_grad():
        expected = spelled_out_layer(ref, x, attention, 0.3)
    assert_close_to_reference(y_ours, expected, seed, "output with dropout")
    assert not torch.allclose(y_ours, ours(x)), "dropout should make a second call differ"


@pytest.mark.parametrize("attention", ["inter", "intra"])
def test_eval_identity_unless_active(attention):
    seed = fresh_seed()
    layer = CrossSampleTransformerLayer(8, 2, 16, 0.5, attention).to(F64).eval()
    x = torch.randn(2, 8, 2, 2, 2, dtype=F64)
    assert layer(x) is x
    active = CrossSampleTransformerLayer(8, 2, 16, 0.5, attention, active_in_eval=True).to(F64).eval()
    ref = torch_layer(8, 2, 16, 0.5).eval()
    ref.load_state_dict(active.state_dict(), strict=True)
    with torch.no_grad():
        assert_close_to_reference(active(x), official_apply(ref, x, attention), seed, "eval, active_in_eval")


class _OfficialStage(nn.Module):
    """The official Intra/InterSampleAttention's parameter layout (one layer as `encoder_layers`)."""

    def __init__(self, channels, dropout):
        super().__init__()
        self.encoder_layers = torch_layer(channels, 4, 4 * channels, dropout)


def test_cma_is_intra_then_inter_with_official_names():
    seed = fresh_seed()
    cma = CrossSampleMutualAttention(16, dropout=0.0).to(F64).train()
    official = nn.ModuleDict({"intra_attention": _OfficialStage(16, 0.0), "inter_attention": _OfficialStage(16, 0.0)})
    official.load_state_dict(cma.state_dict(), strict=True)
    assert list(cma.state_dict()) == list(official.state_dict())
    x = torch.randn(3, 16, 2, 2, 2, dtype=F64)
    expected = official_apply(official["intra_attention"].encoder_layers, x, "intra")
    expected = official_apply(official["inter_attention"].encoder_layers, expected, "inter")
    assert_close_to_reference(cma(x), expected, seed, "CMA")
    assert cma.eval()(x) is x


def test_layer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="multiple of nhead"):
        CrossSampleTransformerLayer(10, 4, 16, 0.1)
    with pytest.raises(ValueError, match="dropout"):
        CrossSampleTransformerLayer(8, 2, 16, 1.0)
    with pytest.raises(ValueError, match="attention"):
        CrossSampleTransformerLayer(8, 2, 16, 0.1, attention="cross")
    layer = CrossSampleTransformerLayer(8, 2, 16, 0.1)
    with pytest.raises(ValueError, match=r"\[B, C, \*spatial\] with C = d_model = 8"):
        layer(torch.randn(2, 6, 4))


def test_extra_repr():
    layer = CrossSampleTransformerLayer(8, 2, 16, 0.25, "intra")
    assert layer.extra_repr() == (
        "d_model=8, nhead=2, dim_feedforward=16, dropout=0.25, attention='intra', active_in_eval=False"
    )
    assert "attention='intra'" in layer.self_attn.extra_repr()
    assert CrossSampleMutualAttention(16).extra_repr() == "channels=16, nhead=4, ffn_mult=4, dropout=0.5"
    assert OmniCorrelationLoss().extra_repr() == "temperature=0.1, eps=1e-08, reduction='mean', backend='auto'"
    assert MutualConsistencyLoss(0.2).extra_repr() == "temperature=0.2, backend='auto'"


def test_loss_modules_equal_the_ops():
    seed = fresh_seed()
    feat_v, feat_a, memory = torch.randn(7, 4, dtype=F64), torch.randn(7, 4, dtype=F64), torch.randn(5, 4, dtype=F64)
    for reduction in ("mean", "none"):
        module = OmniCorrelationLoss(temperature=0.2, reduction=reduction, backend="reference")
        expected = caml_ops.omni_correlation_loss(
            feat_v, feat_a, memory, temperature=0.2, reduction=reduction, backend="reference"
        )
        assert_close_to_reference(module(feat_v, feat_a, memory), expected, seed, f"OCC {reduction}")
    logits = [torch.randn(2, 3, 4, 4, dtype=F64) for _ in range(3)]
    module = MutualConsistencyLoss(temperature=0.1, backend="reference")
    expected = caml_ops.mutual_consistency_loss(logits, temperature=0.1, backend="reference")
    for args in (logits, [logits], [torch.stack(logits)]):
        assert_close_to_reference(module(*args), expected, seed, "mutual consistency")


@pytest.mark.parametrize("attention", ["inter", "intra"])
def test_layer_keeps_the_channels_last_layout(attention):
    """A channels-last feature map (the trainer's model layout) comes back channels-last, with the values
    and gradients of the channel-first one."""
    layer = CrossSampleTransformerLayer(8, 2, 16, 0.0, attention).to(F64).train()
    x = torch.randn(3, 8, 4, 3, 2, dtype=F64)
    x_first, x_last = x.clone().requires_grad_(), x.to(memory_format=torch.channels_last_3d).requires_grad_()
    y_first, y_last = layer(x_first), layer(x_last)
    assert y_first.is_contiguous() and not y_last.is_contiguous()
    assert y_last.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(y_last, y_first, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(x)
    y_first.backward(grad)
    y_last.backward(grad)
    torch.testing.assert_close(x_last.grad, x_first.grad, rtol=1e-12, atol=1e-12)
