"""Train CAML (or its supervised-only ablation) and evaluate it: ``python -m caml.train``.

With no arguments: the ``small`` preset on the synthetic dataset (generated on first use into
``$CAML_CACHE`` or ``~/.cache/caml``), a few minutes on a laptop CPU, then the test-split evaluation.
``--preset la --data DIR --labeled 8`` is the paper's configuration. ``torchrun --nproc_per_node N
-m caml.train ...`` trains with DistributedDataParallel (NCCL on GPUs, gloo on CPU; each process
takes its own batches of ``--batch-size``, the memory bank is gathered across the processes).

The run folder (``--out``) holds ``config.json``, ``checkpoints/last.pt`` (atomic, every
``--checkpoint-every`` iterations and at the end; ``--resume`` continues from it exactly),
``train_log.csv``, ``val_log.csv``, ``tb/`` (TensorBoard, when installed), ``metrics.json`` (final
test-split evaluation: mean and per-case Dice, Jaccard, 95HD, ASD) and PNG plots (``losses.png``,
``val_dice.png``, ``overlays.png``) and ``split.json`` (the train / test / unlabeled cases, which
``python -m caml.evaluate`` reads back). ``--data`` takes the LA h5 layout or an MSD folder (``imagesTr/``,
``labelsTr/``; its labeled cases split into train and test by ``--split-seed`` or ``--split FILE``).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Optional, Sequence

import torch

import caml_ops
from caml_ops._backend import fused_backends, resolve as resolve_backend

from .cli import (Interrupted, Parser, UsageError, add_device_flag, add_patch_size_flag, check_out_folder,
                  print_metrics, run)
from .config import MEMORY_RESHAPES, OCC_EMBEDDINGS, PRESETS, TRAIN_FLAGS, TrainConfig, preset_config
from .distributed import ProcessGroup
from .runlog import read_json
from .trainer import Trainer

__all__ = ["main", "train", "build_parser", "config_from_args"]

PROG = "python -m caml.train"
# The flags that leave the training trajectory as it was: the only ones --resume may change.
RESUME_FLAGS = ("max_iters", "device", "ops_backend", "num_workers", "eval_every", "checkpoint_every", "threads")
# The ops a run uses (model and losses): the backend must run them all on the run's device.
OPS = ("omni_correlation_loss", "mutual_consistency_loss", "cross_sample_attention", "intra_sample_attention",
       "dropout")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help=f"configuration preset: {', '.join(PRESETS)} (default small)")
    p.add_argument("--method", default=None, help="caml (default) or supervised (lamda * supervised loss only)")
    p.add_argument("--data", default=None, help="LA h5 folder (train.list, test.list, 2018LA_Seg_Training Set/) or "
                   "MSD folder (imagesTr/, labelsTr/); default for small/tiny: the synthetic dataset in the cache")
    p.add_argument("--split", default=None, help="MSD folder: JSON split file {\"train\": [...], \"test\": [...]} "
                   "(default: a seeded split of the labeled cases; recorded in the run folder as split.json)")
    p.add_argument("--split-seed", type=int, default=None, help="MSD folder: seed of the train/test split (default 0)")
    p.add_argument("--out", default=None, help="run folder (default runs/<preset>-<method>)")
    p.add_argument("--labeled", type=int, default=None, help="labeled cases: the first N of train.list (MSD: of the "
                   "split's labeled training cases; the others join the unlabeled pool)")
    p.add_argument("--max-iters", type=int, default=None, help="training iterations")
    p.add_argument("--batch-size", type=int, default=None, help="batch size per process (labeled + unlabeled)")
    p.add_argument("--labeled-bs", type=int, default=None, help="labeled samples per batch")
    add_patch_size_flag(p)
    p.add_argument("--n-filters", type=int, default=None, help="V-Net base width (official 16)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--memory-num", type=int, default=None, help="memory-bank samples per class and step")
    p.add_argument("--num-filtered", type=int, default=None, help="unlabeled voxels per class in the OCC loss")
    p.add_argument("--memory-cap", type=int, default=None, help="cap on stored memory-bank voxels per case")
    p.add_argument("--eval-every", type=int, default=None, help="validation interval (iterations)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint interval (iterations)")
    p.add_argument("--num-workers", type=int, default=None, help="data-loader worker processes")
    add_device_flag(p, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process")
    p.add_argument("--ops-backend", default=None, help=f"caml_ops backend: {', '.join(caml_ops.BACKENDS)}")
    p.add_argument("--memory-reshape", choices=MEMORY_RESHAPES, default=None,
                   help="how sub-model a's labeled embedding becomes memory-bank rows: permuted (default: per "
                   "voxel, as sub-model v's) or official (the official .view(-1, C) without the permute, which "
                   "scrambles half of every memory feature; for like-for-like reproduction)")
    p.add_argument("--occ-embedding", choices=OCC_EMBEDDINGS, default=None,
                   help="features of the OCC loss: raw (default, official: dot products / temperature) or "
                   "normalized (L2-normalised: cosine similarity / temperature)")
    p.add_argument("--dropout", choices=("on", "off"), default=None,
                   help="the official Dropout3d(0.5) of the V-Nets in training (default: the preset's: off for "
                   "small, on for la and tiny)")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--cpu-amp", action="store_true", help="bf16 autocast on a CPU with native bf16 (AVX512-BF16 or "
                   "AMX): the network 2.5x faster at the paper's size; off by default (it cost one small-preset "
                   "seed of five 0.33 Dice)")
    p.add_argument("--no-eval", action="store_true", help="skip the final test-split evaluation")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoints/last.pt")
    return p


def _given(args: argparse.Namespace) -> dict:
    """The config settings the command line gives (flags left out are None)."""
    given = {name: getattr(args, name) for name in TRAIN_FLAGS if getattr(args, name) is not None}
    for name in ("data", "split"):
        if name in given:
            given[name] = os.path.abspath(os.path.expanduser(given[name]))
    if "patch_size" in given:
        given["patch_size"] = tuple(given["patch_size"])
    if "dropout" in given:
        given["dropout"] = given["dropout"] == "on"
    if args.no_amp:
        given["amp"] = False
    if args.cpu_amp:
        given["cpu_amp"] = True
    return given


def _text(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def config_from_args(args: argparse.Namespace, saved=None, where: Optional[str] = None) -> TrainConfig:
    """The preset with the given flags applied; when resuming, the saved config (read from ``where``),
    to which only the flags of ``RESUME_FLAGS`` may bring a change: any other given flag that differs
    from the saved run is refused, naming it."""
    given = _given(args)
    if saved is None:
        cfg = preset_config(given.get("preset", "small"))
    else:
        cfg = TrainConfig.from_json(saved, where)
        differ = ["--no-amp (saved: autocast)" if name == "amp" else "--cpu-amp (saved: float32 on CPUs)"
                  if name == "cpu_amp" else
                  f"--{name.replace('_', '-')} {_text(value)} (saved {_text(getattr(cfg, name))})"
                  for name, value in given.items() if name not in RESUME_FLAGS and value != getattr(cfg, name)]
        if differ:
            allowed = ", ".join("--" + name.replace("_", "-") for name in RESUME_FLAGS)
            raise UsageError(f"--resume continues the saved run, from which {', '.join(differ)} differ; only "
                             f"{allowed} may change on --resume (start a new run in another --out to change more)")
    for name, value in given.items():
        setattr(cfg, name, value)
    if cfg.data is None and cfg.preset == "la":
        raise UsageError("preset 'la' needs --data DIR (the LA h5 folder)")
    try:
        cfg.validate()
    except ValueError as err:
        raise UsageError(str(err)) from None
    return cfg


def select_ops_backend(backend: str, device: torch.device, announce: bool = True) -> str:
    """Makes ``--ops-backend`` the process's caml_ops backend; returns the backend the run passes to the ops.
    Raises UsageError if it cannot run every op of the run on ``device`` (else the first step would fail).

    ``cuda`` means the CUDA kernels where an op has them and Triton for the others: on a CUDA device that
    is what ``auto`` picks once the CUDA kernels are built, so the run checks exactly that and uses ``auto``."""
    if backend not in caml_ops.BACKENDS:
        raise UsageError(f"--ops-backend is an unknown ops backend (choose from {', '.join(caml_ops.BACKENDS)}), "
                         f"got {backend!r}")
    run_backend = "auto" if backend == "cuda" else backend
    caml_ops.set_backend(run_backend)
    with_cuda = [op for op in OPS if backend == "cuda" and "cuda" in fused_backends(op)]
    try:
        for op in with_cuda + [op for op in OPS if op not in with_cuda]:  # the CUDA kernels' errors first
            wanted = ("cuda" if op in with_cuda else "triton") if backend == "cuda" else backend
            chosen = resolve_backend(op, wanted, device)
            if resolve_backend(op, run_backend, device) != chosen:  # e.g. CAML_OPS_BACKEND says otherwise
                raise ValueError(f"{op} would not run its {chosen} kernels under {run_backend!r}")
    except (ValueError, RuntimeError) as err:
        raise UsageError(f"--ops-backend {backend}: {err}") from None
    if backend == "cuda" and announce:
        rest = [op for op in OPS if op not in with_cuda]
        print(f"--ops-backend cuda: CUDA kernels for {', '.join(with_cuda)}; Triton for {', '.join(rest)} "
              "(no CUDA kernels)", flush=True)
    return run_backend


def train(cfg: TrainConfig, out: str, resume: bool = False, evaluate: bool = True) -> Optional[dict]:
    """Trains in this process's part of the run (and evaluates on rank 0); returns the metrics on rank 0."""
    processes = ProcessGroup(cfg.device)
    try:
        ops_backend = select_ops_backend(cfg.ops_backend, processes.device, announce=processes.main)
        return Trainer(cfg, out, processes, ops_backend, resume).run(evaluate)
    finally:
        processes.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(PROG, lambda: _main(argv))


def _main(argv: Optional[Sequence[str]]) -> None:
    args = build_parser().parse_args(argv)
    preset = args.preset or "small"
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    out = check_out_folder(args.out or os.path.join("runs", f"{preset}-{args.method or 'caml'}"))
    ckpt_path, config_path = os.path.join(out, "checkpoints", "last.pt"), os.path.join(out, "config.json")
    saved = None
    if args.resume:
        if not os.path.isfile(ckpt_path) or not os.path.isfile(config_path):
            raise UsageError(f"nothing to resume: {out} has no checkpoints/last.pt and config.json")
        saved = read_json(config_path)
    cfg = config_from_args(args, saved, config_path)
    try:
        metrics = train(cfg, out, resume=args.resume, evaluate=not args.no_eval)
    except KeyboardInterrupt:
        if os.path.isfile(ckpt_path):
            raise Interrupted(f"interrupted; resume with --resume --out {shlex.quote(out)}") from None
        raise Interrupted("interrupted before the first checkpoint: nothing to resume") from None
    if metrics is not None:
        print_metrics(metrics, out, "run folder")


if __name__ == "__main__":
    sys.exit(main())
