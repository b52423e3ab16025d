"""caml.models: the official CAML3d_v1 state_dict (keys and shapes), forward shapes, CMA only in
training, checkpoint round-trips, and outputs equal to the official structure rebuilt here from
plain torch modules (nn.TransformerEncoderLayer for CMA). Behaviour tests use a narrow model
(n_filters=4): the structure is the same, the CPU time is not."""
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from caml.models import CAML3d, CAML3dOutput, Decoder, Encoder, load_checkpoint, read_state_dict
from caml.models import head_statistics

from .helpers import assert_close_to_reference, assert_within_2x_torch_error, fresh_seed

SHAPES_FILE = Path(__file__).parent / "data" / "caml3d_v1_state_dict_shapes.json"  # official keys and shapes
SMALL = dict(n_filters=4, feat_dim=8)


def small_model(**kwargs) -> CAML3d:
    return CAML3d(**{**SMALL, **kwargs})


# --- the official CAML3d_v1 structure, rebuilt from plain torch modules ---


class _Seq(nn.Module):
    def __init__(self, *ops):
        super().__init__()
        self.conv = nn.Sequential(*ops)

    def forward(self, x):
        return self.conv(x)


def _conv(n_stages, cin, cout):
    ops = []
    for i in range(n_stages):
        ops += [nn.Conv3d(cin if i == 0 else cout, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]
    return _Seq(*ops)


def _down(cin, cout):
    return _Seq(nn.Conv3d(cin, cout, 2, stride=2), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


def _up(cin, cout, transposed):
    if transposed:
        return _Seq(nn.ConvTranspose3d(cin, cout, 2, stride=2), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))
    return _Seq(
        nn.Upsample(scale_factor=2, mode="trilinear", align_corners=True),
        nn.Conv3d(cin, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
    )


class _OfficialAttention(nn.Module):
    def __init__(self, dim, dropout, intra):
        super().__init__()
        self.intra = intra
        self.encoder_layers = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout)

    def forward(self, x):
        if not self.training:
            return x
        b, c, h, w, d = x.shape
        tokens = x.permute(0, 2, 3, 4, 1).reshape(b, h * w * d, c)
        if self.intra:
            tokens = self.encoder_layers(tokens.permute(1, 0, 2)).permute(1, 0, 2)
        else:
            tokens = self.encoder_layers(tokens)
        return tokens.reshape(b, h, w, d, c).permute(0, 4, 1, 2, 3)


class _OfficialEncoder(nn.Module):
    def __init__(self, n, cma_dropout=None):
        super().__init__()
        self.block_one, self.block_one_dw = _conv(1, 1, n), _down(n, 2 * n)
        self.block_two, self.block_two_dw = _conv(2, 2 * n, 2 * n), _down(2 * n, 4 * n)
        self.block_three, self.block_three_dw = _conv(3, 4 * n, 4 * n), _down(4 * n, 8 * n)
        self.block_four, self.block_four_dw = _conv(3, 8 * n, 8 * n), _down(8 * n, 16 * n)
        self.block_five = _conv(3, 16 * n, 16 * n)
        self.cma = cma_dropout is not None
        if self.cma:
            self.intra_attention = _OfficialAttention(8 * n, cma_dropout, intra=True)
            self.inter_attention = _OfficialAttention(8 * n, cma_dropout, intra=False)

    def forward(self, x):
        x1 = self.block_one(x)
        x2 = self.block_two(self.block_one_dw(x1))
        x3 = self.block_three(self.block_two_dw(x2))
        x4 = self.block_four(self.block_three_dw(x3))
        if self.cma:
            x4 = self.inter_attention(self.intra_attention(x4))
        return [x1, x2, x3, x4, self.block_five(self.block_four_dw(x4))]


class _OfficialDecoder(nn.Module):
    def __init__(self, n, transposed):
        super().__init__()
        self.block_five_up, self.block_six = _up(16 * n, 8 * n, transposed), _conv(3, 8 * n, 8 * n)
        self.block_six_up, self.block_seven = _up(8 * n, 4 * n, transposed), _conv(3, 4 * n, 4 * n)
        self.block_seven_up, self.block_eight = _up(4 * n, 2 * n, transposed), _conv(2, 2 * n, 2 * n)
        self.block_eight_up, self.block_nine = _up(2 * n, n, transposed), _conv(1, n, n)
        self.out_conv = nn.Conv3d(n, 2, 1)

    def forward(self, f):
        x = self.block_six(self.block_five_up(f[4]) + f[3])
        x = self.block_seven(self.block_six_up(x) + f[2])
        x = self.block_eight(self.block_seven_up(x) + f[1])
        x = self.block_nine(self.block_eight_up(x) + f[0])
        return self.out_conv(x), x


def _official_head(cin, feat):
    return nn.Sequential(nn.Linear(cin, feat), nn.BatchNorm1d(feat), nn.ReLU(inplace=True), nn.Linear(feat, feat))


class _OfficialCAML3d(nn.Module):
    """CAML3d_v1 without its 3D dropouts (has_dropout=False, the official test model)."""

    def __init__(self, n, feat, cma_dropout=0.5):
        super().__init__()
        self.encoder1, self.encoder2 = _OfficialEncoder(n), _OfficialEncoder(n, cma_dropout)
        self.decoder1, self.decoder2 = _OfficialDecoder(n, True), _OfficialDecoder(n, False)
        self.projection_head1, self.prediction_head1 = _official_head(n, feat), _official_head(feat, feat)
        self.projection_head2, self.prediction_head2 = _official_head(n, feat), _official_head(feat, feat)

    def forward(self, x):
        out1, emb1 = self.decoder1(self.encoder1(x))
        out2, emb2 = self.decoder2(self.encoder2(x))
        return out1, out2, emb1, emb2


# --- tests ---


def test_state_dict_is_the_official_one():
    expected = json.loads(SHAPES_FILE.read_text())
    state = CAML3d().state_dict()
    assert len(expected) == 470
    assert list(state) == list(expected)
    assert {k: list(v.shape) for k, v in state.items()} == expected


def test_forward_shapes_and_input_check():
    torch.manual_seed(0)
    model = small_model()
    out = model(torch.randn(2, 1, 32, 32, 16))
    assert isinstance(out, CAML3dOutput)
    assert out._fields == ("logits_v", "logits_a", "embedding_v", "embedding_a")
    assert out.logits_v.shape == out.logits_a.shape == (2, 2, 32, 32, 16)
    assert out.embedding_v.shape == out.embedding_a.shape == (2, 4, 32, 32, 16)
    emb = out.embedding_v.permute(0, 2, 3, 4, 1).reshape(-1, 4)[:10]
    assert model.project(emb, "v").shape == model.predict(emb, "a").shape == (10, 8)
    with pytest.raises(ValueError, match="multiples of 16"):
        model(torch.randn(2, 1, 32, 32, 24))
    with pytest.raises(ValueError, match="sub_model"):
        model.project(emb, "b")


def test_eval_is_deterministic_and_without_cma():
    torch.manual_seed(0)
    model = small_model().eval()
    x = torch.randn(3, 1, 16, 16, 16)
    with torch.no_grad():
        first = model(x)
        assert all(torch.equal(a, b) for a, b in zip(first, model(x)))
        alone = model(x[1:2])  # no sample mixing in eval: a sample's output does not depend on its batch
        assert all(torch.allclose(a[1:2], b, atol=1e-5) for a, b in zip(first, alone))
        for p in model.encoder2.intra_attention.parameters():
            p.add_(1.0)
        assert all(torch.equal(a, b) for a, b in zip(first, model(x)))


def test_cma_acts_in_training_on_encoder_two_only():
    torch.manual_seed(0)
    model = small_model(has_dropout=False, cma_dropout=0.0).train()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        before = model(x)
        for p in model.encoder2.inter_attention.parameters():
            p.add_(0.5)
        after = model(x)
    assert torch.equal(before.logits_v, after.logits_v)
    assert not torch.allclose(before.logits_a, after.logits_a)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_outputs_equal_the_official_structure(training):
    """Weights moved into the official structure (strict) give the same outputs; in training mode
    (dropouts at 0, float64) this checks the CMA wiring: intra then inter, tokens as the official code."""
    seed = fresh_seed()
    ours = small_model(has_dropout=False, cma_dropout=0.0).double().train(training)
    official = _OfficialCAML3d(4, 8, cma_dropout=0.0).double().train(training)
    official.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 1, 16, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        for name, a, b in zip(CAML3dOutput._fields, ours(x), official(x)):
            assert_close_to_reference(a, b, seed, name)
        emb = torch.randn(6, 4, dtype=torch.float64)
        ours.eval(), official.eval()
        assert_close_to_reference(
            ours.predict(emb, "a"), official.prediction_head2(official.projection_head2(emb)), seed, "heads"
        )


@pytest.mark.parametrize("chunk_rows", [32_768, 64], ids=["one-chunk", "chunks"])
@pytest.mark.parametrize("members", [False, True], ids=["all-rows", "members"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("sub_model", ["v", "a"])
def test_predict_rows_equals_the_heads_on_all_rows_then_rows(sub_model, momentum, members, chunk_rows, monkeypatch):
    """predict_rows(x, s, rows, members) = predict(x[members], s)[rows] in training mode: values, the
    gradients of the embeddings and of every head parameter, and the BatchNorm running statistics after
    two calls; the statistics in one chunk of rows or in several."""
    monkeypatch.setattr(head_statistics, "CPU_CHUNK_ROWS", chunk_rows)
    seed = fresh_seed()
    model = small_model().double().train()
    for head in model._heads(sub_model):
        head[1].momentum = momentum
    twin = small_model().double().train()
    twin.load_state_dict(model.state_dict())
    for head in twin._heads(sub_model):
        head[1].momentum = momentum
    x = (torch.randn(401, 4, dtype=torch.float64) * 2 + 0.5).requires_grad_()
    x_twin = x.detach().clone().requires_grad_()
    batch = torch.randperm(401)[:301] if members else None
    rows = torch.randperm(301)[:37]
    for _ in range(2):  # the second call sees the running statistics the first one updated
        ours = model.predict_rows(x if members else x[:301], sub_model, rows, batch)
        plain = twin.predict(x_twin[batch] if members else x_twin[:301], sub_model)[rows]
        assert_close_to_reference(ours, plain, seed, "rows")
    grad = torch.randn_like(plain)
    ours.backward(grad)
    plain.backward(grad)
    assert_close_to_reference(x.grad, x_twin.grad, seed, "grad embeddings")
    params, twin_params = dict(model.named_parameters()), dict(twin.named_parameters())
    for name in params:
        if params[name].grad is not None or twin_params[name].grad is not None:
            assert_close_to_reference(params[name].grad, twin_params[name].grad, seed, f"grad {name}")
    buffers, twin_buffers = dict(model.named_buffers()), dict(twin.named_buffers())
    for name in buffers:
        torch.testing.assert_close(buffers[name], twin_buffers[name], rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("sub_model", ["v", "a"])
def test_project_with_running_stats_is_the_eval_mode_head(sub_model):
    """project(..., running_stats=True) (BatchNorm folded into the first Linear) = the head in eval mode,
    values and gradients, leaving the training mode and the running statistics as they were."""
    seed = fresh_seed()
    model = small_model().double().train()
    head = model._heads(sub_model)[0]
    with torch.no_grad():
        head[1].running_mean.uniform_(-1, 1)
        head[1].running_var.uniform_(0.5, 2)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    x = torch.randn(50, 4, dtype=torch.float64, requires_grad=True)
    ours = model.project(x, sub_model, running_stats=True)
    assert model.training and all(torch.equal(v, dict(model.named_buffers())[k]) for k, v in buffers.items())
    grad = torch.randn_like(ours)
    (x_grad,) = torch.autograd.grad(ours, x, grad)
    head.eval()
    expected = head(x)
    assert_close_to_reference(ours, expected, seed, "projection")
    assert_close_to_reference(x_grad, torch.autograd.grad(expected, x, grad)[0], seed, "gradient")
    assert_close_to_reference(model.project(x, sub_model), expected, seed, "eval mode")


@pytest.mark.parametrize("chunk_rows", [32_768, 64], ids=["one-chunk", "chunks"])
def test_project_mean_is_the_mean_of_the_running_stats_projections(chunk_rows, monkeypatch):
    """project_mean(v, a, members) = (project(v[members], "v") + project(a[members], "a")) / 2 with the
    running statistics, in training mode, the running statistics untouched."""
    monkeypatch.setattr(head_statistics, "CPU_CHUNK_ROWS", chunk_rows)
    seed = fresh_seed()
    model = small_model().double().train()
    with torch.no_grad():
        for sub_model in ("v", "a"):
            model._heads(sub_model)[0][1].running_mean.uniform_(-1, 1)
            model._heads(sub_model)[0][1].running_var.uniform_(0.5, 2)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    v, a = torch.randn(500, 4, dtype=torch.float64), torch.randn(500, 4, dtype=torch.float64)
    members = torch.randperm(500)[:333]
    expected = (model.project(v[members], "v", running_stats=True) + model.project(a[members], "a", True)) / 2
    assert_close_to_reference(model.project_mean(v, a, members), expected, seed, "features")
    assert all(torch.equal(value, dict(model.named_buffers())[k]) for k, value in buffers.items())


@pytest.mark.parametrize("chunk_rows", [32_768, 1000], ids=["one-chunk", "chunks"])
def test_predict_rows_float32_within_2x_of_pytorch_error(chunk_rows, monkeypatch):
    """In float32 the statistics from the covariance err at most twice as much as the heads on all rows."""
    monkeypatch.setattr(head_statistics, "CPU_CHUNK_ROWS", chunk_rows)
    seed = fresh_seed()
    model = small_model().train()
    x = torch.randn(20_000, 4) * 3 + 1
    rows = torch.randperm(20_000)[:500]
    reference = small_model().double().train()
    reference.load_state_dict(model.state_dict())
    expected = reference.predict(x.double(), "v")[rows]
    plain = small_model().train()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert_within_2x_torch_error(model.predict_rows(x, "v", rows), plain.predict(x, "v")[rows], expected, seed,
                                     "float32 rows")


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = small_model().eval()
    state = model.state_dict()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = model(x)
    variants = {
        "raw.pth": state,  # the official torch.save(model.state_dict(), path)
        "wrapped.pt": {"model": state, "iteration": 7, "config": {"labeled": 8}},
        "ddp.pt": {"state_dict": {f"module.{k}": v for k, v in state.items()}},
    }
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
        torch.manual_seed(1)
        loaded = load_checkpoint(small_model(), tmp_path / name).eval()
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(expected, loaded(x))), name
    restored = CAML3d.from_checkpoint(tmp_path / "raw.pth").eval()
    assert (restored.n_filters, restored.feat_dim, restored.num_classes) == (4, 8, 2)
    with torch.no_grad():
        assert torch.equal(restored(x).logits_a, expected.logits_a)
    with pytest.raises(RuntimeError, match="Missing key|Unexpected key|size mismatch"):
        load_checkpoint(CAML3d(n_filters=8, feat_dim=8), tmp_path / "raw.pth")


class _NotWeights:
    pass


def test_checkpoint_reading_is_weights_only_and_checked(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "extra": _NotWeights()}, tmp_path / "pickle.pt")
    with pytest.raises(Exception, match="[Ww]eights only"):
        read_state_dict(tmp_path / "pickle.pt")
    torch.save({"optimizer": {"lr": 0.1}}, tmp_path / "nothing.pt")
    with pytest.raises(ValueError, match="neither a state_dict"):
        read_state_dict(os.fspath(tmp_path / "nothing.pt"))


@pytest.mark.parametrize("module, kwargs, name", [
    (CAML3d, dict(n_filters=4.0), "n_filters"), (CAML3d, dict(feat_dim="8"), "feat_dim"),
    (CAML3d, dict(in_channels=True), "in_channels"), (CAML3d, dict(num_classes=0), "num_classes"),
    (CAML3d, dict(cma_heads=2.5), "cma_heads"), (CAML3d, dict(cma_dropout=1.5), "cma_dropout"),
    (CAML3d, dict(normalization="bn"), "normalization"), (CAML3d, dict(has_dropout="yes"), "has_dropout"),
    (Encoder, dict(n_filters=float("nan")), "n_filters"), (Decoder, dict(num_classes=2.0), "num_classes"),
    (Decoder, dict(up_mode="cubic"), "up_mode"),
])
def test_wrongly_typed_arguments_are_named(module, kwargs, name):
    with pytest.raises((TypeError, ValueError)) as info:
        module(**kwargs)
    message = str(info.value)
    assert message.startswith(f"{module.__name__}: {name} must be"), message
