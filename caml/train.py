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
import json
import math
import os
import random
import shlex
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

import caml_ops
from caml_ops._backend import resolve as resolve_backend

from .checkpoint import load_checkpoint, remove_stale_temporaries, rng_state, save_atomic, set_rng_state
from .cli import Interrupted, Parser, UsageError, check_out_folder, run
from .config import PRESETS, TRAIN_FLAGS, TrainConfig, default_cache_dir, preset_config
from .data import Compose, RandomCrop, RandomRotFlip, ToTensor, TwoStreamBatchSampler
from .data.source import CaseDataset, open_source
from .data.synthetic import ensure_synthetic_la
from .inference import sliding_window_predict
from .losses import CAMLObjective, LossWeights
from .memory import MemoryBank
from .metrics import case_metrics, dice
from .models import CAML3d
from .runlog import CSVLog, TensorBoard, plot_losses, plot_overlays, plot_validation, read_json

__all__ = ["main", "train", "build_parser", "evaluate_model"]

TRAIN_FIELDS = ["iteration", "epoch", "loss", "loss_s", "loss_c", "loss_o", "lambda_c", "lambda_o", "lr", "seconds"]
VAL_FIELDS = ["iteration", "dice"]
NUM_CLASSES = 2
PROG = "python -m caml.train"
# The flags that leave the training trajectory as it was: the only ones --resume may change.
RESUME_FLAGS = ("max_iters", "device", "ops_backend", "num_workers", "eval_every", "checkpoint_every", "threads")
# The ops a run uses (model and losses): the backend must run them all on the run's device.
OPS = ("omni_correlation_loss", "mutual_consistency_loss", "cross_sample_attention", "intra_sample_attention",
       "dropout")


# --- command line ---


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
    p.add_argument("--patch-size", type=int, nargs=3, default=None, metavar=("W", "H", "D"))
    p.add_argument("--n-filters", type=int, default=None, help="V-Net base width (official 16)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--memory-num", type=int, default=None, help="memory-bank samples per class and step")
    p.add_argument("--num-filtered", type=int, default=None, help="unlabeled voxels per class in the OCC loss")
    p.add_argument("--memory-cap", type=int, default=None, help="cap on stored memory-bank voxels per case")
    p.add_argument("--eval-every", type=int, default=None, help="validation interval (iterations)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint interval (iterations)")
    p.add_argument("--num-workers", type=int, default=None, help="data-loader worker processes")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process")
    p.add_argument("--ops-backend", default=None, help=f"caml_ops backend: {', '.join(caml_ops.BACKENDS)}")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
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
    if args.no_amp:
        given["amp"] = False
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
        differ = ["--no-amp (saved: autocast)" if name == "amp" else
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


def check_backend(backend: str, device: torch.device) -> None:
    """The ops backend runs every op of a run on ``device`` (else it would fail at the first step)."""
    try:
        for op in OPS:
            resolve_backend(op, backend, device)
    except (ValueError, RuntimeError) as err:
        raise UsageError(f"--ops-backend {backend}: {err}") from None


# --- distributed ---


class Dist:
    """The process group from torchrun's environment (or a single process)."""

    def __init__(self, device_flag: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = _device(device_flag, local_rank)
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _device(flag: str, local_rank: int) -> torch.device:
    if flag == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(flag)
    except RuntimeError:
        raise UsageError(f"unknown device {flag!r} (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {flag!r} requested but CUDA is not available")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise UsageError(f"device cuda:{index} does not exist ({torch.cuda.device_count()} GPU(s))")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise UsageError(f"unsupported device {flag!r} (auto, cpu, cuda or cuda:N)")
    return device


# --- data ---


class _Indexed(Dataset):
    """Adds the dataset index as ``"idx"`` (the memory bank's case id for labeled cases)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        sample = self.dataset[index]
        return {"image": sample["image"], "label": sample["label"], "idx": index}


def resolve_data(cfg: TrainConfig, ctx: Dist) -> str:
    """The dataset folder: ``cfg.data`` or the preset's synthetic dataset (made by rank 0 if missing)."""
    if cfg.data is not None:
        if not os.path.isdir(cfg.data):
            raise UsageError(f"data folder not found: {cfg.data}")
        return cfg.data
    syn = cfg.synthetic
    root = os.path.join(default_cache_dir(), f"synthetic-{cfg.preset}")
    if ctx.main:
        if not os.path.isfile(os.path.join(root, "synthetic.json")):
            print(f"generating the synthetic dataset ({syn['cases']} cases) in {root} ...", file=sys.stderr, flush=True)
        ensure_synthetic_la(root, cases=syn["cases"], seed=syn["seed"], test_cases=syn["test_cases"],
                            min_shape=syn["min_shape"], max_shape=syn["max_shape"])
    ctx.barrier()
    return root


def _stream_seed(seed: int, rank: int, epoch: int, stream: int) -> int:
    return ((((seed * 1_000_003 + rank) * 1_000_033 + epoch) * 4 + stream) % (2**63 - 1))


class TrainData:
    """Training batches as a deterministic function of (seed, rank, epoch): each epoch's sampler,
    augmentations (or worker seeds) are seeded afresh, so a resumed run replays the same batches."""

    def __init__(self, cfg: TrainConfig, source, rank: int):
        self.cfg, self.rank = cfg, rank
        train_cases = source.train_cases
        if cfg.max_train_cases is not None:
            train_cases = train_cases[: cfg.max_train_cases]
        if cfg.labeled > source.labeled_train:
            raise UsageError(f"--labeled {cfg.labeled} asks for more labeled training cases than {source.root} has "
                             f"({source.labeled_train})")
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
        return len(self.sampler)

    def epoch(self, epoch: int) -> DataLoader:
        seed = self.cfg.seed
        self.sampler_generator.manual_seed(_stream_seed(seed, self.rank, epoch, 0))
        loader_generator = torch.Generator().manual_seed(_stream_seed(seed, self.rank, epoch, 1))
        if self.aug_generator is not None:
            self.aug_generator.manual_seed(_stream_seed(seed, self.rank, epoch, 2))
        return DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=self.cfg.num_workers,
                          generator=loader_generator, pin_memory=torch.cuda.is_available())


# --- evaluation ---


def evaluate_model(model: torch.nn.Module, source, cfg: TrainConfig, device: torch.device,
                   full: bool = True) -> list[dict]:
    """Sliding-window prediction (patch ``cfg.patch_size``, ``cfg.eval_strides``) of every test case of the
    data source (``caml.data.source``); per case ``{"case", "dice"[, "jaccard", "hd95", "asd"], "image", "gt",
    "pred"}`` (arrays for plots); distances in the source's voxel spacing (voxels for the LA h5 layout)."""
    model.eval()
    results = []
    for case in source.test_cases:
        image, label = source.load(case)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
            _, pred = sliding_window_predict(image, model, cfg.patch_size, cfg.eval_strides,
                                             sw_batch_size=cfg.eval_batch, device=device)
        pred = pred.cpu().numpy().astype(np.uint8)
        gt = label > 0
        metrics = case_metrics(pred, gt, source.geometry(case)[0]) if full else {"dice": dice(pred, gt)}
        results.append({"case": case, **metrics, "image": image, "gt": gt, "pred": pred > 0})
    return results


def _summary(results: list[dict]) -> dict:
    keys = ("dice", "jaccard", "hd95", "asd")
    mean = {k: float(np.nanmean([r[k] for r in results])) if any(not math.isnan(r[k]) for r in results)
            else float("nan") for k in keys}
    cases = {r["case"]: {k: r[k] for k in keys} for r in results}
    empty = [r["case"] for r in results if math.isnan(r["hd95"])]
    return {**mean, "cases": cases, "num_cases": len(results), "distance_nan_cases": empty}


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# --- training ---


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_json_safe(obj), f, indent=2)
    os.replace(tmp, path)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, ncols=110, dynamic_ncols=False,
                file=sys.stderr, mininterval=1.0)


def train(cfg: TrainConfig, out: str, resume: bool = False, evaluate: bool = True) -> Optional[dict]:
    """Runs training (and the final evaluation on rank 0); returns the metrics on rank 0."""
    ctx = Dist(cfg.device)
    try:
        return _train(cfg, out, resume, evaluate, ctx)
    finally:
        ctx.close()


def _train(cfg: TrainConfig, out: str, resume: bool, evaluate: bool, ctx: Dist) -> Optional[dict]:
    device = ctx.device
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    elif device.type == "cpu" and ctx.world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.world))
    check_backend(cfg.ops_backend, device)
    caml_ops.set_backend(cfg.ops_backend)
    ckpt_path = os.path.join(out, "checkpoints", "last.pt")
    if ctx.main:
        remove_stale_temporaries(ckpt_path)
    checkpoint = load_checkpoint(ckpt_path) if resume else None
    if checkpoint is not None and checkpoint.get("world_size", 1) != ctx.world:
        raise UsageError(f"checkpoint was written by {checkpoint.get('world_size', 1)} process(es); resume with "
                         f"the same number (got {ctx.world})")

    torch.manual_seed(cfg.seed + ctx.rank)
    random.seed(cfg.seed + ctx.rank)
    np.random.seed((cfg.seed + ctx.rank) % 2**32)
    root = resolve_data(cfg, ctx)
    split_path = os.path.join(out, "split.json")
    recorded = None
    if resume and os.path.isfile(split_path):  # the run's own split, even if the folder has changed since
        recorded = read_json(split_path)
    try:
        source = open_source(root, cfg.split if recorded is None else None, cfg.split_seed, recorded)
        data = TrainData(cfg, source, ctx.rank)
        if ctx.main:
            source.check(source.test_cases)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(" ".join(str(err).split())) from None

    model = CAML3d(1, NUM_CLASSES, n_filters=cfg.n_filters, feat_dim=cfg.feat_dim).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    memory = None
    if cfg.method == "caml":
        memory = MemoryBank(cfg.labeled, NUM_CLASSES, cfg.feat_dim, device, max_per_case=cfg.memory_cap,
                            seed=cfg.seed)
    weights = LossWeights(lamda=cfg.lamda, consistency=cfg.consistency, consistency_o=cfg.consistency_o,
                          rampup_length=cfg.resolved_rampup(), rampup_interval=cfg.rampup_interval,
                          temperature=cfg.temperature, memory_num=cfg.memory_num, num_filtered=cfg.num_filtered,
                          ce_weight=cfg.ce_weight)
    amp_dtype = torch.bfloat16 if cfg.amp and device.type == "cuda" else None
    objective = CAMLObjective(model, memory, cfg.labeled_bs, weights, cfg.method, cfg.ops_backend, amp_dtype)

    iteration = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if memory is not None:
            memory.load_state_dict(checkpoint["memory"])
        set_rng_state(checkpoint["rng"][ctx.rank])
        iteration = int(checkpoint["iteration"])
    step_fn = objective
    if ctx.world > 1:
        step_fn = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)

    os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
    train_log = val_log = board = None
    if ctx.main:
        _write_json(os.path.join(out, "config.json"), {**cfg.to_json(), "data_root": root, "world_size": ctx.world})
        _write_json(split_path, source.split_record())
        if not resume:  # a new run replaces the folder's earlier one (its checkpoint could not be resumed)
            for name in ("train_log.csv", "val_log.csv", os.path.join("checkpoints", "last.pt")):
                if os.path.exists(os.path.join(out, name)):
                    os.unlink(os.path.join(out, name))
        train_log, val_log = CSVLog(os.path.join(out, "train_log.csv"), TRAIN_FIELDS), \
            CSVLog(os.path.join(out, "val_log.csv"), VAL_FIELDS)
        train_log.truncate(iteration)
        val_log.truncate(iteration)
        board = TensorBoard(os.path.join(out, "tb"))

    def save_checkpoint():
        states = [None] * ctx.world
        if ctx.world > 1:
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if ctx.main:
            save_atomic({"iteration": iteration, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "memory": memory.state_dict() if memory is not None else None, "rng": states,
                         "config": cfg.to_json(), "world_size": ctx.world, "split": source.split_record()}, ckpt_path)
        ctx.barrier()

    bar = _progress(cfg.max_iters, iteration, ctx.main)
    start = time.perf_counter()
    epoch_len = len(data)
    while iteration < cfg.max_iters:
        epoch, skip = divmod(iteration, epoch_len)
        for position, batch in enumerate(data.epoch(epoch)):
            if position < skip:  # replaying a partly done epoch after a resume
                continue
            model.train()
            volume = batch["image"].to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True)
            loss, parts = step_fn(volume, label, batch["idx"], iteration + 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            iteration += 1
            values = {k: float(v) for k, v in parts.items()}
            if not math.isfinite(values["loss"]):
                raise FloatingPointError(f"the loss is not finite at iteration {iteration}: {values}")
            if ctx.main:
                train_log.append({"iteration": iteration, "epoch": epoch, **values, "lr": cfg.lr,
                                  "seconds": round(time.perf_counter() - start, 3)})
                board.scalars(values, iteration, "train/")
                bar.set_postfix({k: f"{values[k]:.3f}" for k in ("loss", "loss_s", "loss_c", "loss_o") if k in values},
                                refresh=False)
                bar.update(1)
            if iteration % cfg.eval_every == 0 and iteration >= cfg.eval_start and iteration < cfg.max_iters:
                if ctx.main:
                    results = evaluate_model(model, source, cfg, device, full=False)
                    val_dice = float(np.mean([r["dice"] for r in results]))
                    val_log.append({"iteration": iteration, "dice": val_dice})
                    board.scalars({"dice": val_dice}, iteration, "val/")
                    bar.write(f"iteration {iteration}: validation Dice {val_dice:.4f}")
                ctx.barrier()
            if iteration % cfg.checkpoint_every == 0 or iteration == cfg.max_iters:
                save_checkpoint()
            if iteration >= cfg.max_iters:
                break
    bar.close()
    train_seconds = time.perf_counter() - start

    metrics = None
    if ctx.main:
        rows = train_log.rows()
        plot_losses(rows, ["loss", "loss_s", "loss_c", "loss_o"], os.path.join(out, "losses.png"))
        if evaluate:
            results = evaluate_model(model, source, cfg, device, full=True)
            metrics = {**_summary(results), "iteration": iteration, "method": cfg.method, "preset": cfg.preset,
                       "train_seconds_this_session": round(train_seconds, 1)}
            _write_json(os.path.join(out, "metrics.json"), metrics)
            val_log.append({"iteration": iteration, "dice": metrics["dice"]})
            board.scalars({"dice": metrics["dice"]}, iteration, "val/")
            plot_overlays([(r["case"], r["image"], r["gt"], r["pred"], r["dice"]) for r in results[:4]],
                          os.path.join(out, "overlays.png"))
        plot_validation(val_log.rows(), os.path.join(out, "val_dice.png"))
        board.close()
    ctx.barrier()
    return metrics


def _print_metrics(metrics: dict, out: str, label: str = "run folder") -> None:
    print(f"{'case':<24}{'dice':>8}{'jaccard':>9}{'hd95':>8}{'asd':>8}")
    for case, m in metrics["cases"].items():
        print(f"{case:<24}{m['dice']:>8.4f}{m['jaccard']:>9.4f}{m['hd95']:>8.2f}{m['asd']:>8.2f}")
    print(f"{'mean':<24}{metrics['dice']:>8.4f}{metrics['jaccard']:>9.4f}{metrics['hd95']:>8.2f}{metrics['asd']:>8.2f}")
    print(f"{label}: {out}")


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
        _print_metrics(metrics, out)


if __name__ == "__main__":
    sys.exit(main())
