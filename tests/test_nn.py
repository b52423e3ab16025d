"""caml_ops.nn against torch: the CMA transformer layer is nn.TransformerEncoderLayer applied the way
the official CAML code applies it (intra: tokens [L, B, C]; inter: tokens [B, L, C] read as
sequence = B, batch = L), in float64, outputs and gradients; weights move both ways; the loss modules
are the functional ops."""
import pytest
import torch
from torch import nn

import caml_ops
from caml_ops.nn import (
    CrossSampleMutualAttention,
    CrossSampleTransformerLayer,
    MutualConsistencyLoss,
    OmniCorrelationLoss,
)

from .helpers import assert_close_to_reference, fresh_seed

F64 = torch.float64


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


@pytest.mark.parametrize("attention", ["inter", "intra"])
@pytest.mark.parametrize("spatial", [(3, 2, 2), (5,)], ids=["3d", "1d"])
def test_layer_equals_torch_encoder_layer(attention, spatial):
    seed = fresh_seed()
    B, C, H, F = 3, 8, 2, 16
    ours = CrossSampleTransformerLayer(C, H, F, 0.0, attention).to(F64).train()
    ref = torch_layer(C, H, F, 0.0).train()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(B, C, *spatial, dtype=F64)
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


@pytest.mark.parametrize("attention, batch", [("inter", 3), ("intra", 1)])
def test_dropout_places_match_torch(attention, batch):
    """With one seed, the reference backend draws the same dropout masks as torch in the same order
    (attention probabilities, dropout1, FFN dropout, dropout2). For intra the token layouts [L, B, C]
    and [B, L, C] order the elements alike only for B = 1."""
    seed = fresh_seed()
    ours = CrossSampleTransformerLayer(8, 2, 16, 0.3, attention, backend="reference").to(F64).train()
    ref = torch_layer(8, 2, 16, 0.3).train()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(batch, 8, 3, 2, 2, dtype=F64)
    torch.manual_seed(seed)
    y_ours = ours(x)
    torch.manual_seed(seed)
    y_ref = official_apply(ref, x, attention)
    assert_close_to_reference(y_ours, y_ref, seed, "output with dropout")
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
