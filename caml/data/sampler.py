"""The two-stream batch sampler of the official code (from the mean-teacher lineage): every batch
is ``primary_batch_size`` labeled indices followed by ``secondary_batch_size`` unlabeled ones.

One epoch is one pass over a random permutation of the primary (labeled) indices, in batches;
the secondary (unlabeled) indices are drawn from back-to-back random permutations, as many as
needed. Randomness comes from the given ``torch.Generator`` (or torch's global one), so a seeded
generator gives the same batches every run; successive epochs draw fresh permutations.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["TwoStreamBatchSampler", "iterate_once", "iterate_eternally", "grouper"]


def iterate_once(indices: Sequence[int], generator: Optional[torch.Generator] = None) -> list[int]:
    """The indices in a random order."""
    order = torch.randperm(len(indices), generator=generator).tolist()
    return [indices[i] for i in order]


def iterate_eternally(indices: Sequence[int], generator: Optional[torch.Generator] = None) -> Iterator[int]:
    """Endless stream of the indices: one random permutation after another."""
    while True:
        yield from iterate_once(indices, generator)


def grouper(iterable: Iterable[int], n: int) -> Iterator[tuple[int, ...]]:
    """Consecutive groups of n items; an incomplete last group is dropped: ABCDEFG, 3 -> ABC DEF."""
    return zip(*[iter(iterable)] * n)


class TwoStreamBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` indices: ``batch_size - secondary_batch_size`` from ``primary_indices``
    (labeled) then ``secondary_batch_size`` from ``secondary_indices`` (unlabeled).

    ``len(sampler) == len(primary_indices) // primary_batch_size`` batches per epoch. Use it as
    ``DataLoader(dataset, batch_sampler=sampler)``; the labeled samples are the first
    ``primary_batch_size`` rows of every batch.
    """

    def __init__(self, primary_indices: Sequence[int], secondary_indices: Sequence[int], batch_size: int,
                 secondary_batch_size: int, generator: Optional[torch.Generator] = None):
        self.primary_indices = [int(i) for i in primary_indices]
        self.secondary_indices = [int(i) for i in secondary_indices]
        self.secondary_batch_size = int(secondary_batch_size)
        self.primary_batch_size = int(batch_size) - self.secondary_batch_size
        self.generator = generator
        if not 0 < self.primary_batch_size <= len(self.primary_indices):
            raise ValueError(f"primary (labeled) batch size batch_size - secondary_batch_size = "
                             f"{self.primary_batch_size} must be in [1, {len(self.primary_indices)}] "
                             f"(the number of primary indices)")
        if not 0 < self.secondary_batch_size <= len(self.secondary_indices):
            raise ValueError(f"secondary_batch_size = {self.secondary_batch_size} must be in "
                             f"[1, {len(self.secondary_indices)}] (the number of secondary indices)")

    def __iter__(self) -> Iterator[list[int]]:
        primary = iterate_once(self.primary_indices, self.generator)
        secondary = iterate_eternally(self.secondary_indices, self.generator)
        for labeled, unlabeled in zip(grouper(primary, self.primary_batch_size),
                                      grouper(secondary, self.secondary_batch_size)):
            yield list(labeled + unlabeled)

    def __len__(self) -> int:
        return len(self.primary_indices) // self.primary_batch_size
