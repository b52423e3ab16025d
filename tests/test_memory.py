"""caml.memory: the labeled-feature memory bank (official semantics, on the device, seeded)."""
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from caml.memory import MemoryBank


def _case(n0: int, n1: int, dim: int = 3, offset: float = 0.0):
    """n0 class-0 then n1 class-1 rows, interleaved; row k's first feature is offset + k (identifies it)."""
    labels = torch.tensor([0] * n0 + [1] * n1)[torch.randperm(n0 + n1)]
    feats = torch.randn(n0 + n1, dim)
    feats[:, 0] = offset + torch.arange(n0 + n1, dtype=torch.float32)
    return feats, labels


def _rows(features: torch.Tensor) -> set:
    return {round(float(v), 3) for v in features[:, 0]}


def test_update_stores_sorted_by_label_and_replaces():
    bank = MemoryBank(num_cases=3, num_classes=2, feat_dim=3)
    f, lab = _case(4, 6)
    bank.update([1], [f], [lab])
    stored_f, stored_l = bank.case_entries(1)
    assert stored_l.tolist() == [0] * 4 + [1] * 6
    for c in (0, 1):
        assert _rows(stored_f[stored_l == c]) == _rows(f[lab == c])
    assert bank.stored_cases == [1] and bank.class_totals() == [4, 6]
    f2, lab2 = _case(2, 1, offset=100)
    bank.update([1], [f2], [lab2])  # a case's entry is replaced, not appended
    assert bank.class_totals() == [2, 1] and _rows(bank.case_entries(1)[0]) == _rows(f2)


def test_presorted_update_stores_the_rows_as_given():
    """sorted_by_label=True (labels already non-decreasing) stores the same entries as a sorted update."""
    f, lab = _case(4, 6)
    order = torch.sort(lab, stable=True).indices
    sorted_bank, bank = MemoryBank(2, 2, 3), MemoryBank(2, 2, 3)
    sorted_bank.update([0], [f[order]], [lab[order]], sorted_by_label=True)
    bank.update([0], [f], [lab])
    for ours, theirs in zip(sorted_bank.case_entries(0), bank.case_entries(0)):
        assert torch.equal(ours, theirs)


def test_growing_entries_reallocate_the_bank_geometrically():
    """A case's entries growing row by row (as the correct voxels while the model learns) reallocate the
    bank (a copy of every case's rows) a logarithmic number of times, the entries intact."""
    bank = MemoryBank(num_cases=2, num_classes=2, feat_dim=3)
    f_other, lab_other = _case(3, 2, offset=500)
    bank.update([1], [f_other], [lab_other])
    capacities = set()
    for n in range(6, 200):
        bank.update([0], [torch.randn(n, 3)], [torch.arange(n) % 2])
        capacities.add(bank.features.shape[1])
    assert len(capacities) <= 10
    assert _rows(bank.case_entries(1)[0]) == _rows(f_other)
    reserved = MemoryBank(num_cases=2, num_classes=2, feat_dim=3, rows_per_case=200)
    reserved.load_state_dict(bank.state_dict())  # a resumed bank keeps its reserve
    features = reserved.features
    for n in range(6, 200):
        reserved.update([0], [torch.randn(n, 3)], [torch.arange(n) % 2])
    assert reserved.features is features and _rows(reserved.case_entries(1)[0]) == _rows(f_other)


def test_sampling_is_per_class_without_replacement_over_all_cases():
    bank = MemoryBank(num_cases=3, num_classes=2, feat_dim=3, seed=1)
    cases = [_case(5, 7, offset=0), _case(9, 3, offset=100), _case(2, 4, offset=200)]
    bank.update([0, 1, 2], [c[0] for c in cases], [c[1] for c in cases])
    memory, labels = bank.sample(14)  # class 1 has exactly 14 rows, class 0 has 16
    assert labels.tolist() == [0] * 14 + [1] * 14
    all_f = torch.cat([c[0] for c in cases])
    all_l = torch.cat([c[1] for c in cases])
    class1 = memory[14:]
    assert _rows(class1) == _rows(all_f[all_l == 1])  # every class-1 row exactly once
    class0 = memory[:14]
    assert len(_rows(class0)) == 14 and _rows(class0) <= _rows(all_f[all_l == 0])
    # features come back intact (the whole row, not only the id column)
    by_id = {round(float(r[0]), 3): r for r in all_f}
    for row in memory:
        torch.testing.assert_close(row, by_id[round(float(row[0]), 3)])


def test_classes_with_fewer_entries_are_skipped():
    bank = MemoryBank(num_cases=2, num_classes=2, feat_dim=3)
    f, lab = _case(30, 5)
    bank.update([0], [f], [lab])
    memory, labels = bank.sample(10)
    assert labels.tolist() == [0] * 10
    memory, labels = bank.sample(31)
    assert memory.shape == (0, 3) and labels.numel() == 0
    empty = MemoryBank(num_cases=2, num_classes=2, feat_dim=3)
    assert empty.sample(4)[0].shape == (0, 3)


def test_sampling_is_uniform_over_the_pooled_cases():
    torch.manual_seed(0)
    bank = MemoryBank(num_cases=2, num_classes=1, feat_dim=1, seed=3)
    bank.update([0, 1], [torch.zeros(10, 1), torch.ones(30, 1)], [torch.zeros(10, dtype=torch.long),
                                                                   torch.zeros(30, dtype=torch.long)])
    from_case1 = torch.stack([bank.sample(8)[0].sum() for _ in range(400)]).sum() / (8 * 400)
    assert abs(float(from_case1) - 0.75) < 0.03  # 30 of 40 rows come from case 1


def test_large_classes_are_sampled_uniformly_without_replacement():
    """A class much larger than the sample (drawn by the stream of distinct draws): every row equally
    likely, never twice in one sample, the same draws for the same seed."""
    def filled():
        bank = MemoryBank(num_cases=2, num_classes=1, feat_dim=1, seed=5)
        bank.update([0, 1], [torch.arange(300.0)[:, None], torch.arange(300.0, 500.0)[:, None]],
                    [torch.zeros(300, dtype=torch.long), torch.zeros(200, dtype=torch.long)])
        return bank

    bank = filled()
    hits = torch.zeros(500)
    for _ in range(2000):
        rows = bank.sample(16)[0][:, 0].long()
        assert rows.unique().numel() == 16
        hits[rows] += 1
    expected = 2000 * 16 / 500  # 64 per row
    assert float(((hits - expected) ** 2 / expected).sum()) < 600  # chi-square, 499 dof: p ~ 0.001
    assert torch.equal(filled().sample(16)[0], filled().sample(16)[0])


def test_cap_keeps_a_subset_per_case():
    bank = MemoryBank(num_cases=2, num_classes=2, feat_dim=3, max_per_case=7, seed=0)
    f, lab = _case(10, 10)
    bank.update([0, 1], [f, f[:5]], [lab, lab[:5]])
    stored_f, stored_l = bank.case_entries(0)
    assert stored_f.shape[0] == 7 and _rows(stored_f) <= _rows(f)
    by_id = {round(float(r[0]), 3): int(label) for r, label in zip(f, lab)}
    assert [by_id[round(float(r[0]), 3)] for r in stored_f] == stored_l.tolist()  # labels follow their rows
    assert bank.case_entries(1)[0].shape[0] == 5  # under the cap: everything


def test_seeded_sampling_is_deterministic_and_state_round_trips():
    f, lab = _case(50, 40)

    def bank(seed):
        b = MemoryBank(num_cases=1, num_classes=2, feat_dim=3, seed=seed, max_per_case=80)
        b.update([0], [f], [lab])
        return b

    a, b, c = bank(5), bank(5), bank(6)
    first = a.sample(16)[0]
    torch.testing.assert_close(first, b.sample(16)[0])
    assert not torch.equal(first, c.sample(16)[0])
    state = a.state_dict()
    restored = MemoryBank(num_cases=1, num_classes=2, feat_dim=3, seed=99, max_per_case=80)
    restored.load_state_dict(state)
    torch.testing.assert_close(a.sample(16)[0], restored.sample(16)[0])


def test_bad_updates_raise():
    bank = MemoryBank(num_cases=2, num_classes=2, feat_dim=3)
    with pytest.raises(ValueError, match="case id"):
        bank.update([2], [torch.zeros(1, 3)], [torch.zeros(1, dtype=torch.long)])
    with pytest.raises(ValueError, match="labels must lie"):
        bank.update([0], [torch.zeros(1, 3)], [torch.full((1,), 2)])
    with pytest.raises(ValueError, match="must match"):
        bank.update([0], [torch.zeros(2, 3)], [torch.zeros(1, dtype=torch.long)])
    with pytest.raises(ValueError, match="rows_per_case must be >= 0"):
        MemoryBank(num_cases=2, num_classes=2, feat_dim=3, rows_per_case=-1)


def _gather_worker(rank: int, world: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        bank = MemoryBank(num_cases=4, num_classes=2, feat_dim=2, seed=7)
        n = 3 + 2 * rank  # variable sizes across ranks
        feats = torch.full((n, 2), float(rank))
        labels = torch.arange(n) % 2
        bank.update([2 * rank, 2 * rank + 1], [feats, feats[:1]], [labels, labels[:1]])
        results[rank] = (bank.stored_cases, bank.class_totals(), bank.sample(2)[0])
    finally:
        dist.destroy_process_group()


def test_update_gathers_across_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        with mp.Manager() as manager:
            results = manager.dict()
            mp.spawn(_gather_worker, args=(2, os.path.join(tmp, "init"), results), nprocs=2)
            r0, r1 = results[0], results[1]
    assert r0[0] == r1[0] == [0, 1, 2, 3]  # every rank holds every rank's cases
    assert r0[1] == r1[1] == [2 + 1 + 3 + 1, 1 + 0 + 2 + 0]
    torch.testing.assert_close(r0[2], r1[2])  # same seed, same bank: same memory on every rank
