"""The labeled-feature memory bank of CAML, kept on the model's device.

Official semantics (``utils/feature_memory.py`` of the CAML code): after every step, the bank holds
for each labeled case seen so far the projected features ``(proj_v + proj_a) / 2`` of the voxels both
sub-models predicted correctly in that case's latest patch, with their labels (a case's entry is
replaced when the case comes again). Each step samples ``memory_num`` features per class uniformly
without replacement from the entries of all stored cases together; a class with fewer stored
features is skipped.

Layout: one preallocated buffer ``[num_cases, capacity, D]``; a case's rows are sorted by label, so
class ``c`` of case ``i`` is one contiguous run. Sampling maps uniform draws over the virtual
concatenation of all cases' class-``c`` runs to buffer rows with a ``searchsorted``: no concatenation,
no host copies of features. Per-case class counts are mirrored on the host (one small sync per
update) so that sampling needs none. ``max_per_case`` optionally caps the stored rows of a case (a
uniform random subset is kept). Randomness comes from a ``torch.Generator`` on the bank's device.

Under ``torch.distributed`` every rank sees other labeled cases; :meth:`MemoryBank.update` with
``sync=True`` all-gathers the ranks' updates (variable sizes) and applies them in rank order, so all
ranks hold the same bank and, with the same generator seed, sample the same memory.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .distributed import all_gather_varsize, distributed_ready

__all__ = ["MemoryBank"]


class MemoryBank:
    """Labeled voxel features per case, sampled per class each step.

    Args:
        num_cases: labeled cases (case ids are ``0 .. num_cases - 1``, the labeled dataset indices).
        num_classes: classes, background included.
        feat_dim: feature width D.
        device: where the bank lives (the model's device).
        max_per_case: optional cap on the stored features of one case (``None``: all of them).
        rows_per_case: rows reserved per case up front (the bank grows past them when needed). A case
            stores at most a patch's voxels: reserving that many spares the step the growth's copy of the
            whole bank (on a CPU untouched rows take no memory).
        seed: seed of the sampling generator.
        dtype: storage dtype (float32, as the official numpy bank).
    """

    def __init__(self, num_cases: int, num_classes: int, feat_dim: int, device="cpu",
                 max_per_case: Optional[int] = None, seed: int = 0, dtype: torch.dtype = torch.float32,
                 rows_per_case: int = 0):
        if num_cases < 1 or num_classes < 1 or feat_dim < 1:
            raise ValueError(f"num_cases, num_classes and feat_dim must be >= 1, got {num_cases}, "
                             f"{num_classes}, {feat_dim}")
        if max_per_case is not None and max_per_case < 1:
            raise ValueError(f"max_per_case must be None or >= 1, got {max_per_case}")
        self.num_cases, self.num_classes, self.feat_dim = num_cases, num_classes, feat_dim
        self.device, self.dtype = torch.device(device), dtype
        self.max_per_case = max_per_case
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        if rows_per_case < 0:
            raise ValueError(f"rows_per_case must be >= 0, got {rows_per_case}")
        self.reserved = rows_per_case if max_per_case is None else min(rows_per_case, max_per_case)
        self.features = torch.empty((num_cases, self.reserved, feat_dim), dtype=dtype, device=self.device)
        self.counts = [[0] * num_classes for _ in range(num_cases)]  # host mirror: per case, per class
        self._counts_dev = torch.zeros((num_cases, num_classes), dtype=torch.int64, device=self.device)

    # --- state ---

    @property
    def stored_cases(self) -> list[int]:
        return [i for i, c in enumerate(self.counts) if sum(c) > 0]

    def class_totals(self) -> list[int]:
        return [sum(c[k] for c in self.counts) for k in range(self.num_classes)]

    def case_entries(self, case: int) -> tuple[Tensor, Tensor]:
        """(features [n, D], labels [n]) stored for ``case``, sorted by label."""
        counts = self.counts[case]
        labels = torch.repeat_interleave(torch.arange(self.num_classes, device=self.device),
                                         torch.tensor(counts, device=self.device))
        return self.features[case, : sum(counts)], labels

    def state_dict(self) -> dict:
        """Stored features (only the used rows), counts and the generator state."""
        used = max((sum(c) for c in self.counts), default=0)
        return {"features": self.features[:, :used].detach().clone(), "counts": torch.tensor(self.counts),
                "generator": self.generator.get_state(), "max_per_case": self.max_per_case}

    def load_state_dict(self, state: dict) -> None:
        features, counts = state["features"], state["counts"]
        if tuple(counts.shape) != (self.num_cases, self.num_classes) or features.shape[0] != self.num_cases \
                or features.shape[2] != self.feat_dim:
            raise ValueError(f"memory bank state of shape {tuple(features.shape)} / counts {tuple(counts.shape)} "
                             f"does not fit this bank ({self.num_cases} cases, {self.num_classes} classes, "
                             f"D = {self.feat_dim})")
        self.features = torch.empty((self.num_cases, max(features.shape[1], self.reserved), self.feat_dim),
                                    dtype=self.dtype, device=self.device)
        self.features[:, : features.shape[1]] = features
        self.counts = [[int(v) for v in row] for row in counts.tolist()]
        self._counts_dev = counts.to(self.device, torch.int64)
        self.generator.set_state(state["generator"])

    # --- update ---

    def _reserve(self, rows: int) -> None:
        if rows > self.features.shape[1]:
            # Geometric growth: a case's entries grow step by step while the model learns, and each growth
            # copies the whole bank.
            grown = self.features.new_empty((self.num_cases, max(rows, self.features.shape[1] * 3 // 2),
                                             self.feat_dim))
            grown[:, : self.features.shape[1]] = self.features
            self.features = grown

    def update(self, case_ids: Sequence[int] | Tensor, features: Sequence[Tensor], labels: Sequence[Tensor],
               sync: bool = True, sorted_by_label: bool = False) -> None:
        """Replace the entries of ``case_ids[i]`` by ``features[i]`` [n_i, D] with ``labels[i]`` [n_i]
        (detached; n_i may be 0). ``sync``: under ``torch.distributed``, gather every rank's updates first.
        ``sorted_by_label``: the caller promises every ``labels[i]`` is non-decreasing (the bank's order),
        which saves a sort and a copy of the features."""
        case_ids = [int(i) for i in (case_ids.tolist() if isinstance(case_ids, Tensor) else case_ids)]
        if not len(case_ids) == len(features) == len(labels):
            raise ValueError(f"case_ids, features and labels must have one entry per case, got "
                             f"{len(case_ids)}, {len(features)}, {len(labels)}")
        features = [f.detach().to(self.device, self.dtype).reshape(-1, self.feat_dim) for f in features]
        labels = [lab.detach().to(self.device, torch.int64).reshape(-1) for lab in labels]
        for f, lab in zip(features, labels):
            if f.shape[0] != lab.shape[0]:
                raise ValueError(f"features [{f.shape[0]}, D] and labels [{lab.shape[0]}] of a case must match")
        if sync and distributed_ready():
            case_ids, features, labels = self._gather(case_ids, features, labels)
        for case in case_ids:
            if not 0 <= case < self.num_cases:
                raise ValueError(f"case id {case} outside [0, {self.num_cases})")
        kept = [self._subset(f, lab) for f, lab in zip(features, labels)]
        bincounts = [torch.bincount(lab, minlength=self.num_classes) for _, lab in kept]
        if any(b.shape[0] != self.num_classes for b in bincounts):
            raise ValueError(f"labels must lie in [0, {self.num_classes})")
        counts = torch.stack(bincounts) if bincounts else None
        self._reserve(max((f.shape[0] for f, _ in kept), default=0))
        for case, (f, lab), row in zip(case_ids, kept, counts if counts is not None else []):
            self.features[case, : f.shape[0]] = f if sorted_by_label else f[torch.sort(lab, stable=True).indices]
            self._counts_dev[case] = row
        if counts is not None:  # one sync for all cases of the update
            for case, row in zip(case_ids, counts.tolist()):
                self.counts[case] = row

    def _subset(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if self.max_per_case is None or features.shape[0] <= self.max_per_case:
            return features, labels
        keep = torch.randperm(features.shape[0], generator=self.generator, device=self.device)[: self.max_per_case]
        keep = torch.sort(keep).values
        return features[keep], labels[keep]

    @staticmethod
    def _gather(case_ids, features, labels):
        device = features[0].device if features else torch.device("cpu")
        lengths = torch.tensor([f.shape[0] for f in features], dtype=torch.int64, device=device)
        ids = torch.tensor(case_ids, dtype=torch.int64, device=device)
        feat_dim = features[0].shape[1] if features else 0
        flat_f = torch.cat(features) if features else torch.empty((0, feat_dim), device=device)
        flat_l = torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64, device=device)
        all_ids, all_lengths = all_gather_varsize(ids), all_gather_varsize(lengths)
        all_f, all_l = all_gather_varsize(flat_f), all_gather_varsize(flat_l)
        out_ids, out_f, out_l = [], [], []
        for r_ids, r_len, r_f, r_l in zip(all_ids, all_lengths, all_f, all_l):
            sizes = r_len.tolist()
            out_ids += r_ids.tolist()
            out_f += list(torch.split(r_f, sizes))
            out_l += list(torch.split(r_l, sizes))
        return out_ids, out_f, out_l

    # --- sampling ---

    def sample(self, num_per_class: int) -> tuple[Tensor, Tensor]:
        """``num_per_class`` features per class drawn uniformly without replacement from all stored
        cases; classes with fewer stored features are skipped. Returns ``(memory [K, D], labels [K])``
        with the classes in order (K = 0 when every class is skipped)."""
        if num_per_class < 1:
            raise ValueError(f"num_per_class must be >= 1, got {num_per_class}")
        flat = self.features.reshape(-1, self.feat_dim)
        capacity = self.features.shape[1]
        starts = torch.cumsum(self._counts_dev, dim=1) - self._counts_dev  # first row of each class per case
        picked, picked_labels = [], []
        for c, total in enumerate(self.class_totals()):
            if total < num_per_class:
                continue
            draw = _distinct_draws(total, num_per_class, self.generator)
            counts = self._counts_dev[:, c]
            ends = torch.cumsum(counts, dim=0)  # position of each case's class-c run in the concatenation
            case = torch.searchsorted(ends, draw, right=True)
            row = starts[case, c] + draw - (ends[case] - counts[case])
            picked.append(flat.index_select(0, case * capacity + row))
            picked_labels.append(torch.full((num_per_class,), c, dtype=torch.int64, device=self.device))
        if not picked:
            return flat.new_empty((0, self.feat_dim)), torch.empty(0, dtype=torch.int64, device=self.device)
        return torch.cat(picked), torch.cat(picked_labels)


def _distinct_draws(total: int, k: int, generator: torch.Generator) -> Tensor:
    """k of ``range(total)`` uniformly without replacement, in random order (as ``randperm(total)[:k]``,
    on the generator's device). On a CPU with ``total`` much larger than k (the background class: millions
    of entries, 256 drawn) in O(k), not O(total): the distinct values of a stream of uniform draws in order
    of first appearance are such a sample."""
    device = generator.device
    if device.type != "cpu" or total < 4 * k:  # randperm: cheap there, and on a GPU no host loop
        return torch.randperm(total, generator=generator, device=device)[:k]
    draws = torch.empty(0, dtype=torch.int64)
    while True:
        draws = torch.cat([draws, torch.randint(total, (k + k // 2,), generator=generator)])
        values, inverse = torch.unique(draws, return_inverse=True)
        if values.numel() >= k:
            break
    positions = torch.arange(draws.numel())
    first = torch.full_like(values, draws.numel()).scatter_reduce(0, inverse, positions, "amin")
    return values[torch.sort(first).indices[:k]]
