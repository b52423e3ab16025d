"""The training batches of a run: labeled then unlabeled cases, augmented and cropped to the patch, as a
deterministic function of (seed, rank, epoch), so that a resumed run replays the same batches."""
from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..cli import UsageError
from ..config import TrainConfig
from .sampler import TwoStreamBatchSampler
from .source import CaseDataset
from .transforms import Compose, RandomCrop, RandomRotFlip, ToTensor

__all__ = ["TrainBatches"]


class _Indexed(Dataset):
    """Adds the dataset index as ``"idx"`` (the memory bank's case id for labeled cases)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        sample = self.dataset[index]
        return {"image": sample["image"], "label": sample["label"], "idx": index}


def _stream_seed(seed: int, rank: int, epoch: int, stream: int) -> int:
    return ((((seed * 1_000_003 + rank) * 1_000_033 + epoch) * 4 + stream) % (2**63 - 1))


class TrainBatches:
    """The batches of ``cfg`` over a data source's training cases but the ``held_out`` ones (validation
    cases, labeled), for process ``rank``: each epoch's sampler and augmentations (or worker seeds) are
    seeded afresh from (seed, rank, epoch)."""

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
        self.aug_generator = torch.Generator() if cfg.num_workers == 0 else None
        transform = Compose([RandomRotFlip(self.aug_generator), RandomCrop(cfg.patch_size, self.aug_generator),
                             ToTensor()])
        self.dataset = _Indexed(CaseDataset(source, train_cases, transform=transform))
        self.sampler_generator = torch.Generator()
        self.sampler = TwoStreamBatchSampler(range(cfg.labeled), range(cfg.labeled, len(train_cases)),
                                             cfg.batch_size, cfg.batch_size - cfg.labeled_bs, self.sampler_generator)

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.sampler)

    def epoch(self, epoch: int) -> DataLoader:
        seed = self.cfg.seed
        self.sampler_generator.manual_seed(_stream_seed(seed, self.rank, epoch, 0))
        loader_generator = torch.Generator().manual_seed(_stream_seed(seed, self.rank, epoch, 1))
        if self.aug_generator is not None:
            self.aug_generator.manual_seed(_stream_seed(seed, self.rank, epoch, 2))
        return DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=self.cfg.num_workers,
                          generator=loader_generator, pin_memory=torch.cuda.is_available())
