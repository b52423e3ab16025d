"""The training batches of a run: labeled then unlabeled cases, augmented and cropped to the patch, as a
deterministic function of (seed, rank, iteration), so that a resumed run replays the same batches.

One data loader serves the whole run (``TrainBatches.stream``): its workers live across epochs and
prefetch the next batches while the step runs, instead of starting afresh (and stalling the step)
at every epoch. Each sample carries its own augmentation seed, drawn from (seed, rank, epoch, batch,
slot), so the batches do not depend on the number of workers or on which worker loads a sample.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..cli import UsageError
from ..config import TrainConfig
from .sampler import TwoStreamBatchSampler
from .source import CaseDataset
from .transforms import Compose, RandomCrop, RandomRotFlip, ToTensor

__all__ = ["TrainBatches"]


def _stream_seed(seed: int, rank: int, epoch: int, stream: int) -> int:
    return ((((seed * 1_000_003 + rank) * 1_000_033 + epoch) * 4 + stream) % (2**63 - 1))


def _sample_seed(seed: int, rank: int, epoch: int, batch: int, slot: int) -> int:
    return ((_stream_seed(seed, rank, epoch, 2) * 1_000_037 + batch) * 64 + slot) % (2**63 - 1)


class _Augmented(Dataset):
    """Item ``(index, epoch, aug_seed)``: the case ``index`` augmented with the transforms' generator
    seeded by ``aug_seed``, with ``"idx"`` (the memory bank's case id for labeled cases) and ``"epoch"``."""

    def __init__(self, dataset: Dataset, generator: torch.Generator):
        self.dataset, self.generator = dataset, generator

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, epoch, aug_seed = item
        self.generator.manual_seed(aug_seed)
        sample = self.dataset[index]
        return {"image": sample["image"], "label": sample["label"], "idx": index, "epoch": epoch}


class _RunSampler(Sampler):
    """The batches of every epoch from iteration ``start`` on: epoch e's batches are the two-stream
    sampler's with its generator seeded from (seed, rank, e); each item is ``(index, epoch, aug_seed)``."""

    def __init__(self, batches: "TrainBatches", start: int):
        self.batches, self.start = batches, start

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        b = self.batches
        epoch, skip = divmod(self.start, len(b))
        while True:
            b.sampler_generator.manual_seed(_stream_seed(b.cfg.seed, b.rank, epoch, 0))
            for position, indices in enumerate(b.sampler):
                if position >= skip:
                    yield [(i, epoch, _sample_seed(b.cfg.seed, b.rank, epoch, position, slot))
                           for slot, i in enumerate(indices)]
            epoch, skip = epoch + 1, 0


class TrainBatches:
    """The batches of ``cfg`` over a data source's training cases but the ``held_out`` ones (validation
    cases, labeled), for process ``rank``."""

    def __init__(self, cfg: TrainConfig, source, rank: int, held_out: Sequence[str] = ()):
        self.cfg, self.rank = cfg, rank
        held = set(held_out)
        train_cases = [case for case in source.train_cases if case not in held]
        if cfg.max_train_cases is not None:
            train_cases = train_cases[: cfg.max_train_cases]
        if cfg.labeled > source.labeled_train - len(held_out):
            raise UsageError(f"--labeled {cfg.labeled} asks for more labeled training cases than {source.root} has "
                             f"({source.labeled_train - len(held_out)})")
        if cfg.labeled >= len(train_cases):
            raise UsageError(f"--labeled {cfg.labeled} leaves no unlabeled case: the training cases of {source.root} "
                             f"number {len(train_cases)}")
        if len(train_cases) - cfg.labeled < cfg.batch_size - cfg.labeled_bs:
            raise UsageError(f"{len(train_cases) - cfg.labeled} unlabeled cases are fewer than the unlabeled batch "
                             f"size {cfg.batch_size - cfg.labeled_bs}")
        source.check(train_cases)
        aug_generator = torch.Generator()  # reseeded per sample (in each worker's copy)
        transform = Compose([RandomRotFlip(aug_generator), RandomCrop(cfg.patch_size, aug_generator), ToTensor()])
        self.dataset = _Augmented(CaseDataset(source, train_cases, transform=transform), aug_generator)
        self.sampler_generator = torch.Generator()
        self.sampler = TwoStreamBatchSampler(range(cfg.labeled), range(cfg.labeled, len(train_cases)),
                                             cfg.batch_size, cfg.batch_size - cfg.labeled_bs, self.sampler_generator)

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.sampler)

    def stream(self, start: int = 0) -> Iterator[dict]:
        """The run's batches from iteration ``start`` (0-based) on, without end; each batch's ``"epoch"``
        holds its epoch. Workers (``cfg.num_workers``) prefetch; batches are pinned for a CUDA step."""
        workers = self.cfg.num_workers
        # Its own generator: the loader's base seed (unused: each sample brings its seed) must not draw from
        # torch's global one, which the step's dropout draws from (a resumed run restores it exactly).
        return iter(DataLoader(self.dataset, batch_sampler=_RunSampler(self, start), num_workers=workers,
                               pin_memory=torch.cuda.is_available(), prefetch_factor=2 if workers else None,
                               generator=torch.Generator().manual_seed(0)))
