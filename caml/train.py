"""Train CAML (or its supervised-only ablation) and evaluate it: ``python -m caml.train``.

With no arguments: the ``small`` preset on the synthetic dataset (generated on first use into
``$CAML_CACHE`` or ``~/.cache/caml``), a few minutes on a laptop CPU, then the test-split evaluation.
``--preset la --data DIR --labeled 8`` is the paper's configuration. ``torchrun --nproc_per_node N
-m caml.train ...`` trains with DistributedDataParallel (NCCL on GPUs, gloo on CPU; each process
takes its own batches of ``--batch-size``, the memory bank is gathered across the processes).

Settings come from the preset, then a ``--config`` file (YAML or JSON, the keys of ``config.json``),
then the flags; ``--print-config`` prints them resolved. ``--seed 0 1 2`` trains one run per seed
(``OUT/seed0``, ...) and writes ``OUT/summary.json`` (mean and standard deviation of the test metrics).

The run folder (``--out``) holds ``config.json``, ``checkpoints/last.pt`` (atomic, every
``--checkpoint-every`` iterations and at the end; ``--resume`` continues from it exactly),
``checkpoints/best.pt`` (with ``--val N``: selected on N validation cases held out of the labeled
training cases), ``checkpoints/iter_N.pt`` (``--save-every``), ``checkpoints/best_on_test.pt``
(``--select-on-test``: the official protocol, selected on the test cases, said so wherever it appears),
``train_log.csv``, ``val_log.csv``, ``tb/`` (TensorBoard, when installed), ``metrics.json`` (final
test-split evaluation: mean and per-case Dice, Jaccard, 95HD, ASD; with several classes per class
too) and PNG plots (``losses.png``, ``val_dice.png``, ``overlays.png``) and ``split.json`` (the
train / test / unlabeled cases, which ``python -m caml.evaluate`` reads back). ``--data`` takes the
LA h5 layout or an MSD / nnU-Net folder (``imagesTr/``, ``labelsTr/``; its labeled cases split into
train and test by ``--split-seed`` or ``--split FILE``, one or several image channels,
``--intensity`` per channel). The classes are those the data's ``dataset.json`` declares, else
``--num-classes`` (default 2).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Optional, Sequence

import torch

import caml_ops
from caml_ops._backend import fused_backends, resolve as resolve_backend

from .cli import (Interrupted, Parser, UsageError, add_device_flag, add_fold_flag, add_patch_size_flag,
                  check_out_folder, print_metrics, run)
from .config import (INTENSITY_SCHEMES, MEMORY_RESHAPES, OCC_EMBEDDINGS, OFFICIAL_NAMES, PRESETS, TRAIN_FLAGS,
                     TrainConfig, flag_of, preset_config, read_config_file)
from .metrics import summarize_runs
from .distributed import ProcessGroup
from .runlog import read_json, write_json
from .trainer import Trainer

__all__ = ["main", "train", "build_parser", "parse_args", "config_from_args", "seeds_of"]

PROG = "python -m caml.train"
# The flags that leave the training trajectory as it was: the only ones --resume may change.
RESUME_FLAGS = ("max_iters", "device", "ops_backend", "num_workers", "eval_every", "checkpoint_every", "threads",
                "save_every")
# The ops a run uses (model and losses): the backend must run them all on the run's device.
OPS = ("omni_correlation_loss", "mutual_consistency_loss", "cross_sample_attention", "intra_sample_attention",
       "dropout")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help=f"configuration preset: {', '.join(PRESETS)} (default small)")
    p.add_argument("--method", default=None, help="caml (default) or supervised (lamda * supervised loss only)")
    p.add_argument("--data", default=None, help="LA h5 folder (train.list, test.list, 2018LA_Seg_Training Set/) or "
                   "MSD / nnU-Net folder (imagesTr/, labelsTr/); default for small/tiny: the synthetic dataset in the "
                   "cache [--root_path]")
    p.add_argument("--split", default=None, help="MSD folder: JSON split file {\"train\": [...], \"test\": [...]} "
                   "or nnU-Net's splits_final.json with --fold (default: a seeded split of the labeled cases; "
                   "recorded in the run folder as split.json)")
    p.add_argument("--split-seed", type=int, default=None, help="MSD folder: seed of the train/test split (default 0)")
    p.add_argument("--num-classes", type=int, default=None, help="classes, background included (default: the labels "
                   "the data folder's dataset.json declares, else 2; without dataset.json the label values are "
                   "0 .. N-1)")
    add_fold_flag(p)
    p.add_argument("--imagests-unlabeled", action="store_true", default=None,
                   help="MSD folder: the images of imagesTs/ join the unlabeled pool (never the test cases)")
    p.add_argument("--intensity", nargs="+", default=None, metavar="SCHEME",
                   help=f"MSD folder: intensity normalisation, {' or '.join(INTENSITY_SCHEMES)}, one for every "
                   "channel or one per channel (default zscore: per channel over the volume; ct: clipped to "
                   "--window, scaled to [0, 1])")
    p.add_argument("--window", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="the CT window of --intensity ct, e.g. -125 275 (HU)")
    p.add_argument("--out", default=None, help="run folder (default runs/<preset>-<method>) [--exp]")
    p.add_argument("--labeled", type=int, default=None, help="labeled cases: the first N of train.list (MSD: of the "
                   "split's labeled training cases; the others join the unlabeled pool) [--labelnum]")
    p.add_argument("--max-iters", type=int, default=None, help="training iterations [--max_iteration]")
    p.add_argument("--batch-size", type=int, default=None, help="batch size per process (labeled + unlabeled) "
                   "[--batch_size]")
    p.add_argument("--labeled-bs", type=int, default=None, help="labeled samples per batch [--labeled_bs]")
    add_patch_size_flag(p)
    p.add_argument("--n-filters", type=int, default=None, help="V-Net base width (official 16)")
    p.add_argument("--lr", type=float, default=None, help="SGD learning rate, constant [--base_lr]")
    p.add_argument("--ce-weight", type=float, default=None, help="weight of a cross-entropy term added to the "
                   "supervised Dice loss (default 0: none, as the official loss)")
    p.add_argument("--memory-num", type=int, default=None, help="memory-bank samples per class and step "
                   "[--memory_num]")
    p.add_argument("--num-filtered", type=int, default=None, help="unlabeled voxels per class in the OCC loss "
                   "[--num_filtered]")
    p.add_argument("--memory-cap", type=int, default=None, help="cap on stored memory-bank voxels per case")
    p.add_argument("--eval-every", type=int, default=None, help="validation interval (iterations)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint interval (iterations)")
    p.add_argument("--num-workers", type=int, default=None, help="data-loader worker processes")
    add_device_flag(p, default=None)
    p.add_argument("--seed", type=int, nargs="+", default=None,
                   help="random seed; several (--seed 0 1 2): one run per seed in OUT/seed<N> and OUT/summary.json")
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
    _add_paper_flags(p)
    _add_protocol_flags(p)
    _show_preset_values(p)
    return p


def _add_paper_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the paper's hyper-parameters (the official train_caml.py's names in brackets)")
    g.add_argument("--lamda", type=float, default=None, help="weight of the supervised loss [--lamda]")
    g.add_argument("--consistency", type=float, default=None, help="weight of the mutual consistency loss "
                   "after the ramp-up [--consistency]")
    g.add_argument("--consistency-o", type=float, default=None, help="weight of the omni-correlation consistency "
                   "loss after the ramp-up [--consistency_o]")
    g.add_argument("--consistency-rampup", dest="rampup_length", metavar="LENGTH", type=float, default=None,
                   help="sigmoid ramp-up length, in units of --rampup-interval iterations; none: the official 40 / "
                   "20 / 15 for 4 / 8 / 16 labeled cases [--consistency_rampup]")
    g.add_argument("--rampup-interval", type=int, default=None, help="iterations per ramp-up unit (official: "
                   "iteration // 150)")
    g.add_argument("--temperature", type=float, default=None, help="temperature of the sharpening and the "
                   "correlation softmax [--temperature]")
    g.add_argument("--embedding-dim", dest="feat_dim", metavar="N", type=int, default=None,
                   help="projection / prediction head width "
                   "[--embedding_dim: 64 in its argparse, 32 in its model]")
    g.add_argument("--momentum", type=float, default=None, help="SGD momentum (official: hard-coded)")
    g.add_argument("--weight-decay", type=float, default=None, help="SGD weight decay (official: hard-coded)")
    g.add_argument("--max-train-cases", type=int, default=None, help="the first N training cases only "
                   "[--max_samples]")
    g.add_argument("--eval-start", type=int, default=None, help="first iteration of the periodic validation")


def _add_protocol_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration, validation protocol and checkpoints")
    g.add_argument("--config", default=None, metavar="FILE", help="settings file, YAML (needs PyYAML) or JSON, "
                   "with the keys of a run folder's config.json; flags override it")
    g.add_argument("--print-config", action="store_true", help="print the resolved settings (preset, --config, "
                   "flags) as JSON and exit")
    g.add_argument("--val", type=int, default=None, metavar="N", help="hold N validation cases out of the labeled "
                   "training cases (the last ones; recorded in split.json): the periodic validation scores them "
                   "and keeps checkpoints/best.pt. Without it the validation Dice is that of the test cases, "
                   "for monitoring only, and no checkpoint is selected")
    g.add_argument("--save-every", type=int, default=None, metavar="K", help="also keep checkpoints/iter_N.pt "
                   "every K iterations")
    g.add_argument("--select-on-test", action="store_true", default=None, help="the official protocol, for "
                   "like-for-like tables only: also score the test cases at each validation and keep the best "
                   "as checkpoints/best_on_test.pt, labelled as selected on the test cases wherever reported")


def _shown(value) -> str:
    return "none" if value is None else _text(value)


def _show_preset_values(p: argparse.ArgumentParser) -> None:
    """Appends each setting's value in the presets to its flag's help (where it does not say one)."""
    for action in p._actions:
        if action.dest not in TRAIN_FLAGS or action.dest == "preset" or action.nargs == 0 \
                or "default" in (action.help or ""):
            continue
        values = {name: _shown(getattr(preset_config(name), action.dest)) for name in PRESETS}
        if len(set(values.values())) == 1:
            shown = f"default {values['la']}"
        else:
            shown = "presets: " + ", ".join(f"{name} {value}" for name, value in values.items())
        action.help = f"{action.help} ({shown})" if action.help else shown


def _given(args: argparse.Namespace, seed: Optional[int]) -> dict:
    """The config settings the command line gives (flags left out are None), with the run's ``seed``."""
    given = {name: getattr(args, name) for name in TRAIN_FLAGS if name != "seed" and getattr(args, name) is not None}
    if seed is not None:
        given["seed"] = seed
    for name in ("data", "split"):
        if name in given:
            given[name] = os.path.abspath(os.path.expanduser(given[name]))
    for name in ("patch_size", "intensity", "window"):
        if name in given:
            given[name] = tuple(given[name])
    if "dropout" in given:
        given["dropout"] = given["dropout"] == "on"
    if args.no_amp:
        given["amp"] = False
    if args.cpu_amp:
        given["cpu_amp"] = True
    return given


def _text(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _as_flag(name: str, value, saved) -> str:
    """A given setting that differs from the saved run's, as the flag that gave it."""
    if name == "amp":
        return "--no-amp (saved: autocast)"
    if name == "cpu_amp":
        return "--cpu-amp (saved: float32 on a CPU)"
    if name == "select_on_test":
        return "--select-on-test (saved: without)"
    if name == "dropout":
        value, saved = ("on" if v else "off" for v in (value, saved))
    return f"{flag_of(name)} {_text(value)} (saved {_text(saved)})"


def _config_file(args: argparse.Namespace) -> dict:
    """The settings of ``--config`` ({} without it); a list of seeds in it stays a list."""
    if args.config is None:
        return {}
    try:
        return read_config_file(os.path.abspath(os.path.expanduser(args.config)))
    except ValueError as err:
        raise UsageError(str(err)) from None


def seeds_of(args: argparse.Namespace) -> list[Optional[int]]:
    """The seeds to train: ``--seed``'s, else the ``--config`` file's list; [None]: the one seed the
    preset or the file gives."""
    listed = _config_file(args).get("seed")
    return args.seed or (listed if isinstance(listed, list) and listed else [None])


def config_from_args(args: argparse.Namespace, saved=None, where: Optional[str] = None,
                     seed: Optional[int] = None) -> TrainConfig:
    """The preset (``--preset``, else the config file's, else small), the ``--config`` file's settings
    over it and the given flags over those (``seed``: this run's, default the first of ``--seed``); when
    resuming, the saved config (read from ``where``), to which only the flags of ``RESUME_FLAGS`` may
    bring a change: any other given flag that differs from the saved run is refused, naming it."""
    given = _given(args, seed if seed is not None else (args.seed[0] if args.seed else None))
    from_file = _config_file(args)
    if saved is None:
        preset = given.get("preset", from_file.get("preset", "small"))
        if preset not in PRESETS:
            origin = f"--config {args.config}: key preset: " if "preset" not in given else ""
            raise UsageError(f"{origin}unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
        cfg = preset_config(preset)
    else:
        if from_file:
            raise UsageError("--resume continues the saved run with its config.json; --config is for new runs")
        cfg = TrainConfig.from_json(saved, where)
        differ = [_as_flag(name, value, getattr(cfg, name))
                  for name, value in given.items() if name not in RESUME_FLAGS and value != getattr(cfg, name)]
        if differ:
            allowed = ", ".join(flag_of(name) for name in RESUME_FLAGS)
            raise UsageError(f"--resume continues the saved run, from which {', '.join(differ)} differ; only "
                             f"{allowed} may change on --resume (start a new run in another --out to change more)")
    file_settings = {k: v for k, v in from_file.items() if not (k == "seed" and isinstance(v, list))}
    for name, value in {**file_settings, **given}.items():
        setattr(cfg, name, value)
    try:
        cfg.validate(from_file=(f"--config {args.config}", set(file_settings) - set(given)))
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


def _refuse_official_flags(argv: Sequence[str]) -> None:
    """One line for a flag of the official train_caml.py: which of ours to use instead."""
    for token in argv:
        name = token.split("=", 1)[0]
        ours = OFFICIAL_NAMES.get(name[2:]) if name.startswith("--") else None
        if ours is None or name == flag_of(ours):
            continue
        advice = f"use {flag_of(ours)}" if ours in TRAIN_FLAGS else ours
        raise UsageError(f"{name} is a flag of the official train_caml.py; {advice} ({PROG} --help lists the flags)")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    _refuse_official_flags(argv)
    return build_parser().parse_args(argv)


def _print_config(configs: list[TrainConfig]) -> None:
    """The resolved settings as JSON (a --config file): the seeds as a list when there are several."""
    settings = configs[0].to_json()
    if len(configs) > 1:
        settings["seed"] = [cfg.seed for cfg in configs]
    print(json.dumps(settings, indent=2))


def _run_folder(out: str, seed: Optional[int], several: bool) -> str:
    return os.path.join(out, f"seed{seed}") if several else out


def _default_out(args: argparse.Namespace) -> str:
    """``runs/<preset>-<method>``, as the flags or else the --config file name them."""
    from_file = _config_file(args)
    preset, method = args.preset or from_file.get("preset", "small"), args.method or from_file.get("method", "caml")
    return os.path.join("runs", f"{preset}-{method}")


def _seed_runs_hint(folder: str) -> str:
    """Where ``folder`` holds the runs of several seeds: how to resume them."""
    seeds = sorted(int(name[4:]) for name in (os.listdir(folder) if os.path.isdir(folder) else [])
                   if name.startswith("seed") and name[4:].isdigit())
    return f" (it holds the runs of seeds {' '.join(map(str, seeds))}: add --seed {' '.join(map(str, seeds))})" \
        if seeds else ""


def _main(argv: Optional[Sequence[str]]) -> None:
    args = parse_args(argv)
    seeds = seeds_of(args)
    if len(set(seeds)) < len(seeds):
        raise UsageError(f"--seed lists a seed twice: {' '.join(map(str, seeds))}")
    out = check_out_folder(args.out or _default_out(args))
    several = len(seeds) > 1
    saved = {}
    if args.resume:
        for seed in seeds:
            folder = _run_folder(out, seed, several)
            if not os.path.isfile(os.path.join(folder, "checkpoints", "last.pt")) or \
                    not os.path.isfile(os.path.join(folder, "config.json")):
                raise UsageError(f"nothing to resume: {folder} has no checkpoints/last.pt and config.json"
                                 f"{_seed_runs_hint(folder)}")
            saved[seed] = (read_json(os.path.join(folder, "config.json")), os.path.join(folder, "config.json"))
    configs = [config_from_args(args, *saved.get(seed, (None, None)), seed=seed) for seed in seeds]
    if args.print_config:
        _print_config(configs)
        return
    if configs[0].data is None and configs[0].preset == "la":
        raise UsageError("preset 'la' needs --data DIR (the LA h5 folder)")
    resume = f"--resume --out {shlex.quote(out)}" + (f" --seed {' '.join(map(str, seeds))}" if several else "")
    results = {}
    for cfg in configs:
        folder = _run_folder(out, cfg.seed, several)
        metrics = _train_one(cfg, folder, args, resume)
        if metrics is not None:
            print_metrics(metrics, folder, "run folder")
            results[f"seed{cfg.seed}"] = {**metrics, "folder": folder}
    if several and results:
        summary = {"seeds": [cfg.seed for cfg in configs], **summarize_runs(results)}
        write_json(os.path.join(out, "summary.json"), summary)
        print_metrics({"cases": results, **summary["mean"]}, os.path.join(out, "summary.json"), "summary",
                      more={"std": summary["std"]})


def _train_one(cfg: TrainConfig, out: str, args: argparse.Namespace, resume: str) -> Optional[dict]:
    """One run (of the seeds'); Ctrl-C says how to resume (``resume``: the flags)."""
    try:
        return train(cfg, out, resume=args.resume, evaluate=not args.no_eval)
    except KeyboardInterrupt:
        if os.path.isfile(os.path.join(out, "checkpoints", "last.pt")):
            raise Interrupted(f"interrupted; resume with {resume}") from None
        raise Interrupted("interrupted before the first checkpoint: nothing to resume") from None


if __name__ == "__main__":
    sys.exit(main())
