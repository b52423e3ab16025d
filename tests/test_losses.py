"""caml.losses: Dice, ramp-up, confidence filtering and the CAML objective against straightforward
re-statements of the official train_caml.py computations."""
import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

import torch.nn.functional as F

import caml_ops.reference
from caml.losses import (SATURATION_ROWS, CAMLObjective, LossWeights, _top_stable, dice_loss, filter_consistent,
                         occ_saturation)
from caml.rampup import official_rampup_length, sigmoid_rampup
from caml.memory import MemoryBank
from caml.models import CAML3d


def test_dice_loss_matches_the_official_formula():
    torch.manual_seed(0)
    p, t = torch.rand(2, 5, 6), torch.rand(2, 5, 6) > 0.5
    expected = 1 - (2 * (p * t).sum() + 1e-8) / (p.sum() + t.sum() + 1e-8)
    torch.testing.assert_close(dice_loss(p, t), expected)
    assert float(dice_loss(t.float(), t)) == pytest.approx(0.0, abs=1e-7)
    assert float(dice_loss(t.float(), ~t)) == pytest.approx(1.0)
    assert float(dice_loss(torch.zeros(3), torch.zeros(3, dtype=torch.bool))) == pytest.approx(0.0)


def _official_sigmoid_rampup(current, rampup_length):
    if rampup_length == 0:
        return 1.0
    current = np.clip(current, 0.0, rampup_length)
    phase = 1.0 - current / rampup_length
    return float(np.exp(-5.0 * phase * phase))


@pytest.mark.parametrize("length", [0, 15, 20, 40.0])
def test_sigmoid_rampup_matches_the_official(length):
    for iteration in (0, 1, 149, 150, 151, 1500, 2999, 3000, 6000, 15000):
        assert sigmoid_rampup(iteration // 150, length) == pytest.approx(
            _official_sigmoid_rampup(iteration // 150, length), rel=1e-12)
    assert sigmoid_rampup(10**6, 40) == 1.0


def test_official_rampup_lengths():
    assert [official_rampup_length(n) for n in (4, 8, 16)] == [40.0, 20.0, 15.0]
    assert official_rampup_length(2) == 40.0 and official_rampup_length(40) == 15.0
    w = LossWeights(rampup_length=20, rampup_interval=150)
    assert w.ramp(299) == pytest.approx(_official_sigmoid_rampup(1, 20))


def _reference_filter(prob_v, pred_v, pred_a, num_filtered, num_classes):
    """The official cal_correlation_matrix row selection, restated (stable sort for ties)."""
    mask = pred_v == pred_a
    labels, probs = pred_v[mask], prob_v[mask]
    selected = []
    for c in range(num_classes):
        idx = [i for i in range(labels.numel()) if labels[i] == c]
        idx.sort(key=lambda i: -float(probs[i]))  # Python's sort is stable
        idx = idx[:num_filtered]
        if len(idx) > 1:
            selected += [(i, c) for i in idx]
    return mask, selected


@pytest.mark.parametrize("num_filtered", [1, 5, 7, 13, 1000])
def test_filter_consistent_matches_a_reference(num_filtered):
    torch.manual_seed(num_filtered)
    shape = (2, 4, 5, 3)
    prob_v = torch.rand(shape).round(decimals=1)  # ties on purpose
    pred_v, pred_a = torch.randint(0, 3, shape), torch.randint(0, 3, shape)
    pred_a[0, 0] = pred_v[0, 0]
    consistent, rows, classes = filter_consistent(prob_v, pred_v, pred_a, num_filtered, 3)
    ref_mask, ref = _reference_filter(prob_v, pred_v, pred_a, num_filtered, 3)
    assert torch.equal(consistent, torch.nonzero(ref_mask.flatten()).squeeze(1))
    assert list(zip(rows.tolist(), classes.tolist())) == ref


@pytest.mark.parametrize("k", [1, 2, 97, 998, 999, 5000])
def test_top_stable_is_the_head_of_a_stable_descending_sort(k):
    torch.manual_seed(k)
    values = torch.rand(999).round(decimals=1)  # ties everywhere, at the k-th value too
    expected = torch.sort(values, descending=True, stable=True).indices[:k]
    assert torch.equal(_top_stable(values, k), expected)


def test_filter_consistent_drops_single_voxel_classes():
    pred_v = torch.tensor([0, 0, 1, 2])
    consistent, rows, classes = filter_consistent(torch.rand(4), pred_v, pred_v.clone(), 10, 3)
    assert classes.tolist() == [0, 0] and consistent.tolist() == [0, 1, 2, 3]
    consistent, rows, _ = filter_consistent(torch.rand(2), torch.tensor([0, 1]), torch.tensor([1, 0]), 10, 2)
    assert rows.numel() == 0 and consistent.numel() == 0


# --- the objective against the official computation, restated ---

LB, WEIGHTS = 2, LossWeights(memory_num=8, num_filtered=50, rampup_length=4, rampup_interval=1)


def _model():
    torch.manual_seed(0)
    # no dropout anywhere so that two forward passes agree
    return CAML3d(n_filters=2, feat_dim=8, has_dropout=False, cma_dropout=0.0).double()


def _batch():
    torch.manual_seed(1)
    x = torch.randn(4, 1, 16, 16, 16, dtype=torch.float64)
    y = (x[:, 0] > 0.3).long()
    return x, y


def _official_loss(model, x, y, case_ids, iteration, bank, w=WEIGHTS):
    """The official step; ``w.memory_reshape == "permuted"`` reads sub-model a's labeled embedding per
    voxel (ours), ``w.occ_embedding == "normalized"`` L2-normalises the OCC features and memory."""
    outputs_v, outputs_a, embedding_v, embedding_a = model(x)
    loss_s = 0
    y_ori, y_pseudo = [], []
    for out in (outputs_v, outputs_a):
        prob = torch.softmax(out, dim=1)
        loss_s = loss_s + dice_loss(prob[:LB, 1], y[:LB] == 1)
        y_ori.append(prob)
        pt = prob ** (1 / w.temperature)
        y_pseudo.append(pt / (pt + (1 - prob) ** (1 / w.temperature)))
    loss_c = torch.mean((y_ori[0] - y_pseudo[1]) ** 2) + torch.mean((y_ori[1] - y_pseudo[0]) ** 2)

    soft_v, soft_a = torch.softmax(outputs_v, 1), torch.softmax(outputs_a, 1)
    correct = (soft_v[:LB].argmax(1) == y[:LB]) & (soft_a[:LB].argmax(1) == y[:LB])
    lab_v, lab_a = embedding_v[:LB].permute(0, 2, 3, 4, 1), embedding_a[:LB].permute(0, 2, 3, 4, 1)
    model.eval()
    proj_v = model.projection_head1(lab_v.reshape(-1, 2))
    if w.memory_reshape == "official":  # train_caml.py's lines, verbatim but for the names
        b, h, w_, d, labeled_features_dim = lab_v.shape
        proj_a = model.projection_head2(embedding_a[:LB].view(-1, labeled_features_dim))
        proj_a = proj_a.view(b, h, w_, d, -1)
    else:
        proj_a = model.projection_head2(lab_a.reshape(-1, 2)).view(*lab_a.shape[:-1], -1)
    model.train()
    proj_v = proj_v.view(*lab_v.shape[:-1], -1)
    bank.update(case_ids, [(proj_v[i][correct[i]] + proj_a[i][correct[i]]) / 2 for i in range(LB)],
                [y[i][correct[i]] for i in range(LB)])
    memory, _ = bank.sample(w.memory_num)

    prob_un_v, pred_un_v = soft_v[LB:].max(1)
    pred_un_a = soft_a[LB:].argmax(1)
    consist = pred_un_v == pred_un_a
    labels, probs = pred_un_v[consist], prob_un_v[consist]
    un_v = embedding_v[LB:].permute(0, 2, 3, 4, 1)[consist]
    un_a = embedding_a[LB:].permute(0, 2, 3, 4, 1)[consist]
    feat_v = model.prediction_head1(model.projection_head1(un_v))
    feat_a = model.prediction_head2(model.projection_head2(un_a))
    if w.occ_embedding == "normalized":
        feat_v, feat_a, memory = F.normalize(feat_v, dim=1), F.normalize(feat_a, dim=1), F.normalize(memory, dim=1)
    corr_v, corr_a = [], []
    for c in range(2):
        idx = torch.nonzero(labels == c).squeeze(1)
        idx = idx[torch.sort(probs[idx], descending=True, stable=True).indices[: w.num_filtered]]
        if idx.numel() > 1 and memory.shape[0] > 1:
            corr_v.append(torch.softmax(feat_v[idx] @ memory.T / 0.1, dim=1))
            corr_a.append(torch.softmax(feat_a[idx] @ memory.T / 0.1, dim=1))
    if corr_v:
        cv, ca = torch.cat(corr_v), torch.cat(corr_a)
        loss_o = torch.sum(torch.sum(-ca * torch.log(cv + 1e-8), dim=1)) / cv.shape[0]
    else:
        loss_o = torch.zeros((), dtype=x.dtype)
    ramp = _official_sigmoid_rampup(iteration // w.rampup_interval, w.rampup_length)
    loss = w.lamda * loss_s + w.consistency * ramp * loss_c + w.consistency_o * ramp * loss_o
    return loss, {"loss_s": loss_s, "loss_c": loss_c, "loss_o": loss_o}


@pytest.mark.parametrize("iteration", [1, 3])
def test_objective_matches_the_official_computation(iteration):
    _check_against_official(iteration, WEIGHTS, "reference")


@pytest.mark.parametrize("memory_reshape, occ_embedding", [("official", "raw"), ("permuted", "normalized"),
                                                           ("official", "normalized")])
def test_the_switches_match_the_official_lines(memory_reshape, occ_embedding):
    """The official reshape against train_caml.py's lines; normalised OCC through the fused CPU kernel
    against the reference loss on normalised features (losses, every gradient and the memory bank)."""
    w = dataclasses.replace(WEIGHTS, memory_reshape=memory_reshape, occ_embedding=occ_embedding)
    bank = _check_against_official(3, w, "cpu")
    ours = _check_against_official(3, dataclasses.replace(w, memory_reshape="permuted"), "cpu")
    scrambled = not torch.equal(bank.case_entries(1)[0], ours.case_entries(1)[0])
    assert scrambled == (memory_reshape == "official")


def _check_against_official(iteration, w, backend):
    """Our objective against _official_loss: the loss parts, the model's gradients and the bank (returned)."""
    x, y = _batch()
    model = _model().train()
    reference_model = copy.deepcopy(model)
    bank, reference_bank = (MemoryBank(4, 2, 8, seed=3, dtype=torch.float64) for _ in range(2))
    objective = CAMLObjective(model, bank, LB, w, backend=backend)
    loss, parts = objective(x, y, [1, 3], iteration)
    ref_loss, ref_parts = _official_loss(reference_model, x, y, [1, 3], iteration, reference_bank, w)
    assert float(parts["loss_o"]) > 0  # the OCC term is exercised
    for key in ("loss_s", "loss_c", "loss_o"):
        torch.testing.assert_close(parts[key].double(), ref_parts[key].detach().double(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{key}: {m}")
    torch.testing.assert_close(loss.double(), ref_loss.double(), rtol=1e-5, atol=1e-6)
    loss.backward()
    ref_loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad.double(), q.grad.double(), rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"grad of {name}: {m}")
    for case in (1, 3):
        torch.testing.assert_close(bank.case_entries(case), reference_bank.case_entries(case))
    torch.testing.assert_close(bank.sample(8)[0], reference_bank.sample(8)[0])
    return bank


def test_normalized_occ_is_the_reference_loss_of_the_normalised_features():
    torch.manual_seed(4)
    feat_v, feat_a = (torch.randn(40, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    memory = torch.randn(16, 8, dtype=torch.float64)
    grads = []
    for loss_fn in (caml_ops.omni_correlation_loss, caml_ops.reference.omni_correlation_loss):
        normalised = [F.normalize(t, dim=1) for t in (feat_v, feat_a, memory)]
        loss = loss_fn(*normalised, temperature=0.1, eps=1e-8)
        grads.append((loss, *torch.autograd.grad(loss, (feat_v, feat_a))))
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference)
    assert float(grads[0][1].abs().sum()) > 0


def test_occ_saturation_counts_rows_with_a_top_correlation_above_099():
    memory = torch.eye(2)
    saturated, spread = torch.tensor([[10.0, 0.0], [0.0, 10.0]]), torch.tensor([[0.1, 0.0], [0.3, 0.3]])
    assert float(occ_saturation([saturated, spread], memory, 0.1)) == 0.5  # softmax (100, 0): 1; (1, 0): 0.73
    assert float(occ_saturation([spread], memory, 0.1)) == 0.0
    assert float(occ_saturation([saturated], memory, 10.0)) == 0.0  # softmax (1, 0) at t = 10: 0.73
    # Beyond SATURATION_ROWS rows, evenly spaced ones: every second of 2 x SATURATION_ROWS here.
    alternating = torch.cat([saturated[:1], spread[:1]]).repeat(SATURATION_ROWS, 1)
    assert float(occ_saturation([alternating], memory, 0.1)) == 1.0


def test_objective_logs_occ_saturation():
    x, y = _batch()
    _, parts = CAMLObjective(_model().train(), MemoryBank(4, 2, 8, seed=3, dtype=torch.float64), LB, WEIGHTS,
                             backend="reference")(x, y, [1, 3], 3)
    assert 0 <= float(parts["occ_saturation"]) <= 1


def test_supervised_method_is_the_supervised_term_only():
    x, y = _batch()
    model = _model().train()
    loss, parts = CAMLObjective(model, None, LB, WEIGHTS, method="supervised")(x, y, [0, 1], 1)
    assert set(parts) == {"loss_s", "loss"}
    torch.testing.assert_close(loss.detach(), WEIGHTS.lamda * parts["loss_s"].double())
    assert math.isfinite(float(loss.detach()))
