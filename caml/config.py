"""Training configurations: the presets of ``python -m caml.train`` and the config they fill.

- ``la``: the paper's configuration (official ``train_caml.py``): patch 112 x 112 x 80, batch 4 =
  2 labeled + 2 unlabeled, SGD lr 0.01 (constant) momentum 0.9 weight decay 1e-4, 15000 iterations,
  memory_num 256, num_filtered 12800, ramp-up 40 / 20 / 15 (4 / 8 / 16 labels) on iteration // 150,
  full-width model (n_filters 16), validation with strides 18 / 18 / 4. Needs ``--data``.
- ``small``: the CPU demo on the synthetic dataset (generated on first use): the same method and
  architecture, narrower (n_filters 4) on small volumes and patches, without dropout (at 4 channels
  the channel dropout collapses some runs), the ramp-up stretched over the whole, shorter run,
  num_filtered scaled to the smaller patch (the reasons at the preset).
- ``tiny``: a smoke-test size (seconds per run), for tests and CI.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

from .rampup import official_rampup_length

# The choices of the switches between our behaviour and the official one (caml.losses checks them too).
MEMORY_RESHAPES = ("permuted", "official")
OCC_EMBEDDINGS = ("raw", "normalized")
# The settings held as tuples (JSON and YAML give lists).
TUPLE_FIELDS = ("patch_size", "eval_strides", "intensity", "window")
INTENSITY_SCHEMES = ("zscore", "ct")  # caml.data.intensity: per-channel z-score, CT window scaled to [0, 1]

__all__ = ["TrainConfig", "TRAIN_FLAGS", "PRESETS", "OFFICIAL_NAMES", "INTENSITY_SCHEMES", "flag_of", "preset_config",
           "read_config_file", "default_cache_dir", "intensity_problem"]


@dataclass
class TrainConfig:
    preset: str = "la"
    method: str = "caml"  # "caml" or "supervised"
    data: Optional[str] = None  # LA h5 folder; None: the preset's synthetic dataset in the cache
    split: Optional[str] = None  # MSD folder: a split file; None: a seeded split (split_seed) of the labeled cases
    split_seed: int = 0
    fold: Optional[int] = None  # a split file of nnU-Net's folds (splits_final.json): the fold (its val: our test)
    imagests_unlabeled: bool = False  # MSD folder: the images of imagesTs/ join the unlabeled pool
    intensity: tuple[str, ...] = ("zscore",)  # MSD folder: normalisation of all channels, or of each
    window: Optional[tuple[float, float]] = None  # the CT window (LOW, HIGH) of intensity "ct"
    in_channels: Optional[int] = None  # image channels: set from the data by the trainer (None until then)
    synthetic: dict = field(default_factory=dict)  # cases, seed, test_cases, min_shape, max_shape
    num_classes: Optional[int] = None  # background included; None: the labels dataset.json declares, else 2
    labeled: int = 8
    max_train_cases: Optional[int] = None  # first N cases of train.list (official max_samples: 80)
    patch_size: tuple[int, int, int] = (112, 112, 80)  # W, H, D: the training crop and the evaluation's window
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
    ce_weight: float = 0.0  # the official loss has no cross-entropy term (a weight > 0 adds one)
    memory_reshape: str = "permuted"  # "official": the official scrambling of sub-model a's memory features
    occ_embedding: str = "raw"  # the official OCC on raw features; "normalized": cosine similarity / temperature
    dropout: bool = True  # the official training model's Dropout3d(0.5) (bottlenecks, decoders' last features)
    eval_strides: tuple[int, int, int] = (18, 18, 4)
    eval_every: int = 200
    eval_start: int = 800
    eval_batch: int = 4
    checkpoint_every: int = 500
    val: int = 0  # validation cases held out of the labeled training pool; 0: none (validation monitors the test cases)
    save_every: Optional[int] = None  # also keep checkpoints/iter_N.pt every N iterations
    select_on_test: bool = False  # the official protocol: keep checkpoints/best_on_test.pt, selected on the test cases
    seed: int = 1337
    device: str = "auto"
    ops_backend: str = "auto"  # checked by caml.train against caml_ops (not here: no torch in this module)
    num_workers: int = 4
    amp: bool = True  # bf16 autocast on CUDA
    cpu_amp: bool = False  # bf16 autocast on a CPU with native bf16 (AVX512-BF16 / AMX) too: caml.precision
    threads: Optional[int] = None  # CPU threads per process (None: torch's default; DDP on CPU: cores / processes)

    def resolved_rampup(self) -> float:
        return official_rampup_length(self.labeled) if self.rampup_length is None else float(self.rampup_length)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values, where: str) -> "TrainConfig":
        """The config saved as JSON (``config.json``, a checkpoint's ``config``), validated; errors name
        ``where`` and the field. Keys that are not fields (``data_root``, ``world_size``) are ignored."""
        if not isinstance(values, dict):
            raise ValueError(f"{where}: expected a JSON object of settings, got {type(values).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in values.items() if k in names})
        for name in TUPLE_FIELDS:
            if isinstance(getattr(cfg, name), list):
                setattr(cfg, name, tuple(getattr(cfg, name)))
        cfg.validate(where)
        return cfg

    def validate(self, where: Optional[str] = None, from_file: Optional[tuple[str, set]] = None) -> None:
        """Raises ValueError naming the first bad setting: by its flag (``--lr``) for settings from the
        command line, ``<file>: key <name>`` for those ``from_file`` (path, keys) gives, else
        ``<where>: field <name>`` (a saved config)."""

        def fail(name: str, problem: str):
            if from_file is not None and name in from_file[1]:
                label = f"{from_file[0]}: key {name}"
            else:
                label = f"{where}: field {name}" if where else (flag_of(name) if name in TRAIN_FLAGS else name)
            raise ValueError(f"{label} {problem}, got {getattr(self, name)!r}")

        for f in dataclasses.fields(self):  # types first: a hand-edited config may hold anything
            value, kind = getattr(self, f.name), _KINDS[f.name]
            if value is None and f.name in _OPTIONAL:
                continue
            if kind == "int" and not _is_int(value):
                fail(f.name, "must be an integer")
            if kind == "float" and not ((_is_int(value) or isinstance(value, float)) and math.isfinite(value)):
                fail(f.name, "must be a finite number")
            if kind in ("str", "bool", "dict") and type(value).__name__ != kind:
                fail(f.name, f"must be a {kind}")
            if kind == "tuple[int, int, int]" and not (isinstance(value, tuple) and len(value) == 3
                                                       and all(map(_is_int, value))):
                fail(f.name, "must be three integers")
            if kind == "tuple[float, float]" and not (isinstance(value, tuple) and len(value) == 2 and all(
                    (_is_int(v) or isinstance(v, float)) and math.isfinite(v) for v in value)):
                fail(f.name, "must be two finite numbers")
            if kind == "tuple[str, ...]" and not (isinstance(value, tuple) and all(isinstance(v, str) for v in value)):
                fail(f.name, "must be names")
        for name, minimum in _AT_LEAST.items():
            if getattr(self, name) is not None and getattr(self, name) < minimum:
                fail(name, f"must be >= {minimum}")
        for name in ("lr", "temperature"):
            if getattr(self, name) <= 0:
                fail(name, "must be > 0")
        if not 0 <= self.momentum < 1:
            fail("momentum", "must be in [0, 1)")
        if self.seed >= 2**32:  # numpy's global seed
            fail("seed", "must be < 2**32")
        if self.method not in ("caml", "supervised"):
            fail("method", "is an unknown method (choose from caml, supervised)")
        for name, choices in (("memory_reshape", MEMORY_RESHAPES), ("occ_embedding", OCC_EMBEDDINGS)):
            if getattr(self, name) not in choices:
                fail(name, f"is unknown (choose from {', '.join(choices)})")
        if self.preset not in PRESETS:
            fail("preset", f"is an unknown preset (choose from {', '.join(PRESETS)})")
        if any(s < 16 or s % 16 for s in self.patch_size):
            fail("patch_size", "must be three multiples of 16")
        if min(self.eval_strides) < 1:
            fail("eval_strides", "must be three positive integers")
        if self.labeled_bs >= self.batch_size:
            fail("labeled_bs", f"must be smaller than the batch size {self.batch_size}")
        if self.labeled < self.labeled_bs:
            fail("labeled", f"is fewer than the labeled batch size {self.labeled_bs}")
        if self.fold is not None and self.split is None:
            fail("fold", "needs --split FILE (nnU-Net's splits_final.json)")
        problem = intensity_problem(self.intensity, self.window)
        if problem is not None:
            fail(*problem)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def intensity_problem(schemes: tuple, window: Optional[tuple]) -> Optional[tuple[str, str]]:
    """(setting, problem) when intensity ``schemes`` and the CT ``window`` cannot work together, else None."""
    if not schemes or any(scheme not in INTENSITY_SCHEMES for scheme in schemes):
        return "intensity", f"must name schemes from {', '.join(INTENSITY_SCHEMES)} (one, or one per channel)"
    if "ct" in schemes and window is None:
        return "window", "LOW HIGH is needed by --intensity ct (the CT window, e.g. --window -125 275)"
    if "ct" not in schemes and window is not None:
        return "window", "applies to --intensity ct only"
    if window is not None and not window[0] < window[1]:
        return "window", "needs LOW < HIGH"
    return None


# The settings of python -m caml.train's flags (--name-with-dashes); the others come from the preset.
TRAIN_FLAGS = ("preset", "method", "data", "split", "split_seed", "labeled", "max_iters", "batch_size", "labeled_bs",
               "patch_size", "n_filters", "lr", "memory_num", "num_filtered", "memory_cap", "eval_every",
               "checkpoint_every", "num_workers", "device", "seed", "threads", "ops_backend", "memory_reshape",
               "occ_embedding", "dropout", "num_classes", "ce_weight")
# The rest of the official train_caml.py's hyper-parameters, and the validation protocol's settings.
TRAIN_FLAGS += ("max_train_cases", "feat_dim", "momentum", "weight_decay", "lamda", "consistency", "consistency_o",
                "rampup_length", "rampup_interval", "temperature", "eval_start", "val", "save_every", "select_on_test")
# The data's: nnU-Net folds, MSD imagesTs as unlabeled images, intensity normalisation per channel.
TRAIN_FLAGS += ("fold", "imagests_unlabeled", "intensity", "window")
# The settings whose flag is not the field's name: the official script's names for them.
FLAG_NAMES = {"feat_dim": "--embedding-dim", "rampup_length": "--consistency-rampup"}


def flag_of(name: str) -> str:
    """The flag of a setting: ``lr`` -> ``--lr``, ``feat_dim`` -> ``--embedding-dim``."""
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


# The official train_caml.py's argparse names and what they are here: a setting's name, or (for those
# that are no setting) the advice a user migrating from the official script needs.
OFFICIAL_NAMES = {
    "root_path": "data", "max_iteration": "max_iters", "max_samples": "max_train_cases", "labeled_bs": "labeled_bs",
    "batch_size": "batch_size", "base_lr": "lr", "labelnum": "labeled", "gpu": "device", "consistency_o":
    "consistency_o", "consistency_rampup": "rampup_length", "memory_num": "memory_num", "num_filtered":
    "num_filtered", "embedding_dim": "feat_dim",
    "exp": "use --out DIR (the run folder)",
    "model": "leave it out: the model is CAML3d (the official caml3d_v1); --method supervised trains its ablation",
    "deterministic": "leave it out: runs are seeded by --seed (batches, augmentations and weights)",
}
# Keys of a run folder's config.json that record the run rather than set it (read back, never applied).
RECORD_KEYS = ("data_root", "world_size", "labels")


_OPTIONAL = {f.name for f in dataclasses.fields(TrainConfig) if f.type.startswith("Optional[")}
_KINDS = {f.name: f.type[len("Optional["):-1] if f.name in _OPTIONAL else f.type  # the annotations, as text
          for f in dataclasses.fields(TrainConfig)}
_AT_LEAST = {"split_seed": 0, "num_classes": 2, "labeled": 1, "max_train_cases": 1, "batch_size": 2, "labeled_bs": 1,
             "n_filters": 1, "feat_dim": 1, "weight_decay": 0, "max_iters": 1, "lamda": 0, "consistency": 0,
             "consistency_o": 0, "rampup_length": 0, "rampup_interval": 1, "memory_num": 2, "num_filtered": 1,
             "memory_cap": 1,
             "ce_weight": 0, "eval_every": 1, "eval_start": 0, "eval_batch": 1, "checkpoint_every": 1, "seed": 0,
             "num_workers": 0, "threads": 1, "val": 0, "save_every": 1, "fold": 0, "in_channels": 1}


_SMALL_SYNTHETIC = dict(cases=20, seed=0, test_cases=4, min_shape=[32, 32, 32], max_shape=[40, 40, 32])
_TINY_SYNTHETIC = dict(cases=8, seed=0, test_cases=2, min_shape=[32, 32, 16], max_shape=[40, 40, 20])

PRESETS: dict[str, dict] = {
    "la": dict(preset="la", num_workers=4),
    # Each difference from the paper (la) and why; docs/design.md, "Training (caml)", has the measurements.
    "small": dict(
        preset="small",
        synthetic=_SMALL_SYNTHETIC, labeled=4,  # a CPU-sized dataset; 4 labels: the paper's smallest setting
        patch_size=(32, 32, 32), n_filters=4,  # minutes on a CPU, not hours on a GPU
        lr=0.05,  # 300 iterations instead of 15,000: a larger constant step
        # Without dropout: Dropout3d(0.5) drops whole channels, and at n_filters 4 the decoder's last
        # features are 4 channels, all dropped with probability 1/16: a sub-model then predicts no
        # foreground for the batch and some seeds collapse (test Dice 0.006 on seed 2).
        dropout=False,
        # The ramp-up spans the whole run, so that the unsupervised terms still weigh little (0.04-0.13)
        # when the supervised loss first falls below 0.5, as in the official LA runs (0.009-0.023
        # there); the former 20 x 5 schedule had them at 0.73-1.0 by then.
        max_iters=300, rampup_length=30.0, rampup_interval=10,
        num_filtered=512,  # scaled to the smaller patch (32^3 voxels instead of 112 x 112 x 80)
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


def read_config_file(path: str) -> dict:
    """The settings of a ``--config`` file: a JSON object (YAML with PyYAML installed, for ``.yaml`` /
    ``.yml``) whose keys are TrainConfig's fields, as in a run folder's ``config.json`` (whose record keys
    are accepted and left out). Relative ``data`` / ``split`` paths are relative to the file's folder.
    Raises ValueError naming the file and the problem: an unknown key among them (types and ranges are
    :meth:`TrainConfig.validate`'s)."""
    if not os.path.isfile(path):
        raise ValueError(f"--config file not found: {path}")
    try:
        with open(path) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read --config {path}: {_one_line(err)}") from None
    values = _parse_yaml(text, path) if path.lower().endswith((".yaml", ".yml")) else _parse_json(text, path)
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of settings (key: value), got {type(values).__name__}")
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    for key in values:
        if key not in names and key not in RECORD_KEYS:
            raise ValueError(f"--config {path}: unknown key {key!r}{_key_hint(str(key), names)}")
    folder = os.path.dirname(os.path.abspath(path))
    settings = {k: v for k, v in values.items() if k not in RECORD_KEYS}
    for name in ("data", "split"):
        if isinstance(settings.get(name), str):
            settings[name] = os.path.join(folder, os.path.expanduser(settings[name]))
    for name in TUPLE_FIELDS:
        if isinstance(settings.get(name), list):
            settings[name] = tuple(settings[name])
    return settings


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__


def _parse_json(text: str, path: str):
    try:
        return json.loads(text)
    except ValueError as err:
        raise ValueError(f"cannot read --config {path}: {_one_line(err)}") from None


def _parse_yaml(text: str, path: str):
    try:
        import yaml
    except ImportError:
        raise ValueError(f"--config {path}: a YAML file needs PyYAML (pip install pyyaml); or write it as JSON") \
            from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"cannot read --config {path}: {_one_line(err)}") from None


def _key_hint(key: str, names: list) -> str:
    """Advice for an unknown config key: our name for an official one, else the nearest key, if any."""
    if key in OFFICIAL_NAMES:
        ours = OFFICIAL_NAMES[key]
        return f" (the official train_caml.py's name: {'use key ' + repr(ours) if ours in names else ours})"
    near = difflib.get_close_matches(key, names, n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def default_cache_dir() -> str:
    """``$CAML_CACHE`` or ``~/.cache/caml``."""
    return os.environ.get("CAML_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "caml")
