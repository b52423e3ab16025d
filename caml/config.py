"""Training configurations: the presets of ``python -m caml.train`` and the config they fill.

- ``la``: the paper's configuration (official ``train_caml.py``): patch 112 x 112 x 80, batch 4 =
  2 labeled + 2 unlabeled, SGD lr 0.01 (constant) momentum 0.9 weight decay 1e-4, 15000 iterations,
  memory_num 256, num_filtered 12800, ramp-up 40 / 20 / 15 (4 / 8 / 16 labels) on iteration // 150,
  full-width model (n_filters 16), validation with strides 18 / 18 / 4. Needs ``--data``.
- ``small``: the CPU demo on the synthetic dataset (generated on first use): the same method and
  architecture, narrower (n_filters 4) on small volumes and patches, the ramp-up compressed to the
  shorter run, num_filtered scaled to the smaller patch.
- ``tiny``: a smoke-test size (seconds per run), for tests and CI.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional

from .losses import official_rampup_length

__all__ = ["TrainConfig", "PRESETS", "preset_config", "default_cache_dir"]


@dataclass
class TrainConfig:
    preset: str = "la"
    method: str = "caml"  # "caml" or "supervised"
    data: Optional[str] = None  # LA h5 folder; None: the preset's synthetic dataset in the cache
    split: Optional[str] = None  # MSD folder: a split file; None: a seeded split (split_seed) of the labeled cases
    split_seed: int = 0
    synthetic: dict = field(default_factory=dict)  # cases, seed, test_cases, min_shape, max_shape
    labeled: int = 8
    max_train_cases: Optional[int] = None  # first N cases of train.list (official max_samples: 80)
    patch_size: tuple = (112, 112, 80)
    batch_size: int = 4
    labeled_bs: int = 2
    n_filters: int = 16
    feat_dim: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    max_iters: int = 15000
    lamda: float = 0.5
    consistency: float = 1.0
    consistency_o: float = 0.05
    rampup_length: Optional[float] = None  # None: official rule for the labeled count (40 / 20 / 15)
    rampup_interval: int = 150
    temperature: float = 0.1
    memory_num: int = 256
    num_filtered: int = 12800
    memory_cap: Optional[int] = None
    ce_weight: float = 0.0  # the official loss has no cross-entropy term
    eval_strides: tuple = (18, 18, 4)
    eval_every: int = 200
    eval_start: int = 800
    eval_batch: int = 4
    checkpoint_every: int = 500
    seed: int = 1337
    device: str = "auto"
    ops_backend: str = "auto"
    num_workers: int = 4
    amp: bool = True  # bf16 autocast on CUDA (never on CPU)
    threads: Optional[int] = None  # CPU threads per process (None: torch's default; DDP on CPU: cores / processes)

    def resolved_rampup(self) -> float:
        return official_rampup_length(self.labeled) if self.rampup_length is None else float(self.rampup_length)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in values.items() if k in names})
        cfg.patch_size, cfg.eval_strides = tuple(cfg.patch_size), tuple(cfg.eval_strides)
        return cfg

    def validate(self) -> None:
        """Raises ValueError naming the first inconsistent setting."""
        if self.method not in ("caml", "supervised"):
            raise ValueError(f"unknown method {self.method!r} (choose from caml, supervised)")
        if len(self.patch_size) != 3 or any(int(s) < 16 or int(s) % 16 for s in self.patch_size):
            raise ValueError(f"patch size must be three multiples of 16, got {tuple(self.patch_size)}")
        if len(self.eval_strides) != 3 or min(self.eval_strides) < 1:
            raise ValueError(f"eval strides must be three positive ints, got {tuple(self.eval_strides)}")
        if not 1 <= self.labeled_bs < self.batch_size:
            raise ValueError(f"need 1 <= labeled batch size < batch size, got {self.labeled_bs} and {self.batch_size}")
        if self.labeled < self.labeled_bs:
            raise ValueError(f"--labeled {self.labeled} is fewer than the labeled batch size {self.labeled_bs}")
        for name in ("max_iters", "checkpoint_every", "eval_every", "rampup_interval", "n_filters", "feat_dim",
                     "num_filtered", "eval_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.memory_num < 2:
            raise ValueError(f"memory-num must be >= 2 (the official loss skips smaller classes), got {self.memory_num}")
        if self.memory_cap is not None and self.memory_cap < 1:
            raise ValueError(f"memory-cap must be >= 1, got {self.memory_cap}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


_SMALL_SYNTHETIC = dict(cases=20, seed=0, test_cases=4, min_shape=[32, 32, 32], max_shape=[40, 40, 32])
_TINY_SYNTHETIC = dict(cases=8, seed=0, test_cases=2, min_shape=[32, 32, 16], max_shape=[40, 40, 20])

PRESETS: dict[str, dict] = {
    "la": dict(preset="la", num_workers=4),
    "small": dict(
        preset="small", synthetic=_SMALL_SYNTHETIC, labeled=4, patch_size=(32, 32, 32), n_filters=4,
        lr=0.05, max_iters=250, rampup_length=20.0, rampup_interval=5, num_filtered=512,
        eval_strides=(8, 8, 8), eval_every=50, eval_start=50, checkpoint_every=50, seed=1337, num_workers=0,
    ),
    "tiny": dict(
        preset="tiny", synthetic=_TINY_SYNTHETIC, labeled=2, patch_size=(32, 32, 16), n_filters=2, feat_dim=8,
        lr=0.05, max_iters=4, rampup_length=2.0, rampup_interval=1, memory_num=16, num_filtered=64,
        eval_strides=(16, 16, 8), eval_every=2, eval_start=2, checkpoint_every=2, seed=0, num_workers=0,
    ),
}


def preset_config(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return TrainConfig(**PRESETS[name])


def default_cache_dir() -> str:
    """``$CAML_CACHE`` or ``~/.cache/caml``."""
    return os.environ.get("CAML_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "caml")
