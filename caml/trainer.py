"""The trainer of ``python -m caml.train`` (docs/design.md, "Training (caml)"): one run of a
:class:`caml.config.TrainConfig` in its run folder, from the set-up (or a checkpoint) to the final
evaluation on the test split."""
from __future__ import annotations

import math
import os
import random
import sys
import time
from typing import Optional

import numpy as np
import torch
from torch.profiler import record_function

from .checkpoint import load_checkpoint, remove_stale_temporaries, rng_state, save_atomic, set_rng_state
from .cli import UsageError, one_line
from .config import TrainConfig, default_cache_dir
from .data.batches import TrainBatches
from .data.intensity import Intensity
from .data.source import open_source, validation_cases
from .data.synthetic import ensure_synthetic_la
from .distributed import ProcessGroup
from .inference import predict_classes
from .losses import CAMLObjective, LossWeights
from .memory import MemoryBank
from .metrics import SegmentationMetrics
from .models import CAML3d
from .precision import autocast_dtype, native_bf16
from .runlog import CSVLog, TensorBoard, plot_losses, plot_overlays, plot_validation, read_json, write_json

__all__ = ["Trainer", "build_model", "build_memory", "optimisation_step", "read_parts", "loss_weights", "TRAIN_FIELDS",
           "VAL_FIELDS"]

TRAIN_FIELDS = ["iteration", "epoch", "loss", "loss_s", "loss_c", "loss_o", "lambda_c", "lambda_o", "lr", "seconds",
                "occ_saturation"]
VAL_FIELDS = ["iteration", "dice"]  # dice: on the validation cases (--val), else on the test cases
# The checkpoints selected during a run, by what selects them: on the validation cases, or (the official
# protocol, --select-on-test) on the test cases.
SELECTED = {"best": "best.pt", "best_on_test": "best_on_test.pt"}
SELECTED_ON_TEST = ("selected on the TEST cases (--select-on-test, the official code's protocol): for like-for-like "
                    "tables with methods that report their best test result during training; optimistic, not an "
                    "estimate of the accuracy on new cases")
LOSSES = ("loss", "loss_s", "loss_c", "loss_o")  # plotted and shown on the progress bar
OVERLAY_CASES = 4


def _seed_globals(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def loss_weights(cfg: TrainConfig) -> LossWeights:
    return LossWeights(lamda=cfg.lamda, consistency=cfg.consistency, consistency_o=cfg.consistency_o,
                       rampup_length=cfg.resolved_rampup(), rampup_interval=cfg.rampup_interval,
                       temperature=cfg.temperature, memory_num=cfg.memory_num, num_filtered=cfg.num_filtered,
                       ce_weight=cfg.ce_weight, memory_reshape=cfg.memory_reshape,
                       occ_embedding=cfg.occ_embedding)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, ncols=110, dynamic_ncols=False,
                file=sys.stderr, mininterval=1.0)


def build_model(cfg: TrainConfig, num_classes: int, device: torch.device) -> CAML3d:
    """The run's model on ``device``, its weights in the channels-last layout: the convolutions then run
    in oneDNN's / cuDNN's channels-last kernels (1.9x faster for a V-Net 3x3x3 convolution on a CPU)."""
    model = CAML3d(cfg.in_channels or 1, num_classes, n_filters=cfg.n_filters, feat_dim=cfg.feat_dim,
                   has_dropout=cfg.dropout)
    return model.to(device, memory_format=torch.channels_last_3d)


def build_memory(cfg: TrainConfig, num_classes: int, device: torch.device) -> MemoryBank:
    """The run's memory bank, a patch's voxels reserved per labeled case (the most a case can store)."""
    return MemoryBank(cfg.labeled, num_classes, cfg.feat_dim, device, max_per_case=cfg.memory_cap, seed=cfg.seed,
                      rows_per_case=math.prod(cfg.patch_size))


def optimisation_step(objective, optimizer: torch.optim.Optimizer, volume: torch.Tensor, label: torch.Tensor,
                      case_ids, iteration: int) -> dict[str, torch.Tensor]:
    """One step of a training iteration on a batch already on the device: the objective (a
    :class:`caml.losses.CAMLObjective`, possibly under DDP), backward, the optimizer's step. Returns the
    objective's detached loss parts (still on the device: reading them is the caller's host sync)."""
    loss, parts = objective(volume, label, case_ids, iteration)
    optimizer.zero_grad(set_to_none=True)
    with record_function("caml.backward"):
        loss.backward()
    with record_function("caml.optimizer"):
        optimizer.step()
    return parts


def read_parts(parts: dict[str, torch.Tensor]) -> dict[str, float]:
    """The step's loss parts (device scalars) as floats, in one device-to-host copy."""
    return dict(zip(parts, torch.stack(list(parts.values())).tolist()))


class Trainer:
    """One process's part of a training run of ``cfg`` in the run folder ``out``.

    Made, it is set up: the data, the model, its optimizer, the memory bank and the objective, and
    with ``resume`` restored from ``checkpoints/last.pt``; rank 0 writes ``config.json`` and
    ``split.json`` and opens the logs. :meth:`step` trains on one batch, :meth:`validate` and
    :meth:`checkpoint` run at their intervals (validate keeps the selected checkpoints, ``SELECTED``),
    :meth:`finish` writes the plots and the final metrics; :meth:`run` does it all. ``ops_backend`` is
    the caml_ops backend of the fused ops (:func:`caml.train.select_ops_backend` makes it from
    ``cfg.ops_backend``).
    """

    def __init__(self, cfg: TrainConfig, out: str, processes: ProcessGroup, ops_backend: str = "auto",
                 resume: bool = False):
        self.cfg, self.out, self.processes, self.device = cfg, out, processes, processes.device
        self.checkpoint_path = os.path.join(out, "checkpoints", "last.pt")
        processes.set_threads(cfg.threads)
        if processes.main:
            remove_stale_temporaries(self.checkpoint_path)
        saved = self._read_checkpoint() if resume else None

        _seed_globals(cfg.seed + processes.rank)
        self.data_root = self._data_root()
        self.source, self.batches = self._open_data(resume)
        self.labels = self.source.label_set
        if saved is not None:
            self._check_saved_labels(saved)
        self.model = build_model(cfg, self.labels.num_classes, self.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.memory = None
        if cfg.method == "caml":
            self.memory = build_memory(cfg, self.labels.num_classes, self.device)
        if cfg.cpu_amp and self.device.type == "cpu" and not native_bf16(self.device):
            raise UsageError("--cpu-amp: this CPU has no native bf16 (AVX512-BF16 or AMX), where bf16 is slower "
                             "than float32; train without it")
        self.autocast = autocast_dtype(self.device, cfg.amp, cfg.cpu_amp)
        self.objective = CAMLObjective(self.model, self.memory, cfg.labeled_bs, loss_weights(cfg), cfg.method,
                                       ops_backend, self.autocast)
        self.iteration = 0
        self.selection = dict.fromkeys(SELECTED)  # kind -> {"iteration", "dice"} of its checkpoint so far
        if saved is not None:
            self.restore(saved)
        self.step_fn = processes.wrap(self.objective)  # after the restore: DDP broadcasts rank 0's weights

        os.makedirs(os.path.dirname(self.checkpoint_path), exist_ok=True)
        self.train_log = self.val_log = self.board = None
        if processes.main:
            self._open_run_folder(resume)
        self.started = time.perf_counter()

    # --- set up ---

    def _read_checkpoint(self) -> dict:
        checkpoint = load_checkpoint(self.checkpoint_path)
        written_by = checkpoint.get("world_size", 1)
        if written_by != self.processes.world:
            raise UsageError(f"checkpoint was written by {written_by} process(es); resume with the same number "
                             f"(got {self.processes.world})")
        return checkpoint

    def _check_saved_labels(self, checkpoint: dict) -> None:
        """The data's labels are those the checkpoint was trained on (older checkpoints: binary)."""
        saved = checkpoint.get("labels", {"values": [0, 1]})["values"]
        if saved != list(self.labels.values):
            raise UsageError(f"--resume: the run was trained on the label values {saved}, but the data in "
                             f"{self.data_root} now has {list(self.labels.values)}")

    def _data_root(self) -> str:
        """``cfg.data``, or the preset's synthetic dataset in the cache (made by rank 0 if missing)."""
        cfg = self.cfg
        if cfg.data is not None:
            if not os.path.isdir(cfg.data):
                raise UsageError(f"data folder not found: {cfg.data}")
            return cfg.data
        syn = cfg.synthetic
        root = os.path.join(default_cache_dir(), f"synthetic-{cfg.preset}")
        if self.processes.main:
            if not os.path.isfile(os.path.join(root, "synthetic.json")):
                print(f"generating the synthetic dataset ({syn['cases']} cases) in {root} ...", file=sys.stderr,
                      flush=True)
            ensure_synthetic_la(root, cases=syn["cases"], seed=syn["seed"], test_cases=syn["test_cases"],
                                min_shape=syn["min_shape"], max_shape=syn["max_shape"])
        self.processes.barrier()
        return root

    def _open_data(self, resume: bool):
        """The data source and the training batches; every case checked (the test cases by rank 0). Sets
        ``cfg.in_channels`` from the data (a resumed run's data must have the channels it was trained on)."""
        cfg, split_path = self.cfg, os.path.join(self.out, "split.json")
        # On resume the run's own split, even if the data folder has changed since.
        recorded = read_json(split_path) if resume and os.path.isfile(split_path) else None
        if recorded is not None and recorded.get("val"):  # held out of the labeled training cases: put back
            recorded = {**recorded, "train": recorded["train"] + recorded["val"]}
        try:
            source = open_source(self.data_root, cfg.split if recorded is None else None, cfg.split_seed, recorded,
                                 cfg.num_classes, cfg.fold, Intensity(cfg.intensity, cfg.window),
                                 cfg.imagests_unlabeled)
            if cfg.in_channels not in (None, source.in_channels):
                raise ValueError(f"{self.data_root} has {source.in_channels} image channel(s); the run was trained "
                                 f"on {cfg.in_channels}")
            cfg.in_channels = source.in_channels
            self.val_cases = validation_cases(source, cfg.val, cfg.labeled)
            batches = TrainBatches(cfg, source, self.processes.rank, self.val_cases)
            if self.processes.main:
                source.check(source.test_cases + self.val_cases)
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(one_line(err)) from None
        record = source.split_record()
        self.split_record = {**record, "train": [c for c in record["train"] if c not in self.val_cases],
                             "val": self.val_cases}
        return source, batches

    def _open_run_folder(self, resume: bool) -> None:
        out = self.out
        write_json(os.path.join(out, "config.json"), {**self.cfg.to_json(), "data_root": self.data_root,
                                                      "world_size": self.processes.world,
                                                      "labels": self.labels.to_json()})
        write_json(os.path.join(out, "split.json"), self.split_record)
        if not resume:  # a new run replaces the folder's earlier one (its checkpoints could not be resumed)
            checkpoints = [os.path.join("checkpoints", name) for name in os.listdir(os.path.join(out, "checkpoints"))
                           if name.endswith(".pt")]
            for name in ["train_log.csv", "val_log.csv"] + checkpoints:
                if os.path.exists(os.path.join(out, name)):
                    os.unlink(os.path.join(out, name))
        self.train_log = CSVLog(os.path.join(out, "train_log.csv"), TRAIN_FIELDS)
        test_dice = ["test_dice"] if self.val_cases and self.cfg.select_on_test else []
        self.val_log = CSVLog(os.path.join(out, "val_log.csv"), VAL_FIELDS + test_dice)
        self.train_log.truncate(self.iteration)
        self.val_log.truncate(self.iteration)
        self.board = TensorBoard(os.path.join(out, "tb"))

    def restore(self, checkpoint: dict) -> None:
        """Continues from a checkpoint of this run: weights, optimizer, memory bank, this rank's random
        states and the iteration."""
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.memory is not None:
            self.memory.load_state_dict(checkpoint["memory"])
        set_rng_state(checkpoint["rng"][self.processes.rank])
        self.iteration = int(checkpoint["iteration"])
        self.selection.update(checkpoint.get("selection") or {})  # none in checkpoints of earlier versions

    # --- training ---

    def step(self, batch: dict, epoch: int) -> dict[str, float]:
        """One optimisation step on a batch of ``epoch``; returns the loss parts (rank 0 logs them)."""
        self.model.train()
        volume = batch["image"].to(self.device, non_blocking=True)
        label = batch["label"].to(self.device, non_blocking=True)
        parts = optimisation_step(self.step_fn, self.optimizer, volume, label, batch["idx"], self.iteration + 1)
        self.iteration += 1
        values = read_parts(parts)
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(f"the loss is not finite at iteration {self.iteration}: {values}")
        if self.processes.main:
            self.train_log.append({"iteration": self.iteration, "epoch": epoch, **values, "lr": self.cfg.lr,
                                   "seconds": round(time.perf_counter() - self.started, 3)})
            self.board.scalars(values, self.iteration, "train/")
        return values

    def validate(self) -> Optional[str]:
        """Scores the validation cases (``--val``; else the test cases, for monitoring only), logs their
        mean Dice and keeps the selected checkpoints that it improves (rank 0); returns what to report
        (the other ranks wait for it and get None)."""
        said = None
        if self.processes.main:
            dice = self._dice(self.val_cases or self.source.test_cases)
            row = {"iteration": self.iteration, "dice": dice}
            if self.val_cases:
                said = f"validation Dice {dice:.4f} ({len(self.val_cases)} validation cases)" + self._keep("best", dice)
            else:
                said = f"test Dice {dice:.4f} (monitoring; no checkpoint is selected by it)"
            if self.cfg.select_on_test:
                row["test_dice"] = self._dice(self.source.test_cases) if self.val_cases else dice
                said += f"; TEST Dice {row['test_dice']:.4f}" + self._keep("best_on_test", row["test_dice"])
            self.val_log.append(row)
            self.board.scalars({"dice": dice}, self.iteration, "val/")
        self.processes.barrier()
        return said

    def _keep(self, kind: str, dice: float) -> str:
        """Saves ``SELECTED[kind]`` if ``dice`` beats its record (the first of equals stays); says so."""
        best = self.selection[kind]
        if best is not None and dice <= best["dice"]:
            return ""
        self.selection[kind] = {"iteration": self.iteration, "dice": dice}
        self.save_weights(SELECTED[kind], kind)
        return f", best so far: saved checkpoints/{SELECTED[kind]}"

    def _weights(self, saved_as: str) -> dict:
        """What every checkpoint holds: the model, and what ``caml.evaluate`` needs to score it and name it."""
        return {"iteration": self.iteration, "model": self.model.state_dict(), "config": self.cfg.to_json(),
                "split": self.split_record, "labels": self.labels.to_json(), "saved_as": saved_as,
                "selection": self.selection}

    def save_weights(self, name: str, saved_as: str) -> None:
        """Writes ``checkpoints/<name>`` (atomically): the weights to evaluate, not a state to resume."""
        save_atomic(self._weights(saved_as), os.path.join(os.path.dirname(self.checkpoint_path), name))

    def checkpoint(self) -> None:
        """Writes ``checkpoints/last.pt`` (rank 0, atomically) with every rank's random states."""
        states = self.processes.all_gather_object(rng_state())
        if self.processes.main:
            save_atomic({**self._weights("last"), "optimizer": self.optimizer.state_dict(),
                         "memory": self.memory.state_dict() if self.memory is not None else None, "rng": states,
                         "world_size": self.processes.world}, self.checkpoint_path)
        self.processes.barrier()

    def finish(self, evaluate: bool = True) -> Optional[dict]:
        """The loss and validation plots and, with ``evaluate``, the test split's metrics (``metrics.json``,
        ``overlays.png``); returns the metrics on rank 0."""
        train_seconds = time.perf_counter() - self.started
        metrics = None
        if self.processes.main:
            plot_losses(self.train_log.rows(), list(LOSSES), os.path.join(self.out, "losses.png"))
            selected = self._selected()
            if evaluate:
                summary, overlays = self._evaluate(self._metrics(), self.source.test_cases)
                metrics = {**summary, "iteration": self.iteration, "method": self.cfg.method,
                           "preset": self.cfg.preset, "train_seconds_this_session": round(train_seconds, 1),
                           **selected}
                write_json(os.path.join(self.out, "metrics.json"), metrics)
                if not self.val_cases:  # the log holds the test cases' Dice: the final one too
                    self.val_log.append({"iteration": self.iteration, "dice": metrics["dice"]})
                    self.board.scalars({"dice": metrics["dice"]}, self.iteration, "val/")
                plot_overlays(overlays, os.path.join(self.out, "overlays.png"), self.labels.num_classes)
            plot_validation(self.val_log.rows(), os.path.join(self.out, "val_dice.png"))
            self.board.close()
        self.processes.barrier()
        return metrics

    def _selected(self) -> dict:
        """The selected checkpoints for metrics.json (none without --val or --select-on-test), each said
        on stdout; the test-selected one loudly."""
        selected = {}
        best, on_test = self.selection["best"], self.selection["best_on_test"]
        if best is not None:
            selected["best_on_validation"] = {**best, "checkpoint": "checkpoints/best.pt",
                                              "validation_cases": len(self.val_cases)}
            print(f"best on the validation cases: iteration {best['iteration']} (validation Dice {best['dice']:.4f}):"
                  f" checkpoints/best.pt; the metrics below are the last iteration's", flush=True)
        if on_test is not None:
            selected["best_on_test"] = {**on_test, "checkpoint": "checkpoints/best_on_test.pt",
                                        "protocol": SELECTED_ON_TEST}
            print(f"BEST ON THE TEST CASES: iteration {on_test['iteration']} (test Dice {on_test['dice']:.4f}): "
                  f"checkpoints/best_on_test.pt, {SELECTED_ON_TEST}", flush=True)
        return selected

    def _validates_now(self) -> bool:
        """At the validation interval; and at the end where a checkpoint is selected (the last iterate is
        a candidate; else the final evaluation scores it)."""
        cfg = self.cfg
        if self.iteration >= cfg.max_iters:
            return bool(self.val_cases) or cfg.select_on_test
        return self.iteration % cfg.eval_every == 0 and self.iteration >= cfg.eval_start

    def run(self, evaluate: bool = True) -> Optional[dict]:
        """Trains up to ``cfg.max_iters`` (validating and checkpointing on the way), then :meth:`finish`."""
        cfg, main = self.cfg, self.processes.main
        bar = _progress(cfg.max_iters, self.iteration, main)
        batches = self.batches.stream(self.iteration)  # a resumed run replays the same batches from here
        while self.iteration < cfg.max_iters:
            batch = next(batches)
            values = self.step(batch, int(batch["epoch"][0]))
            if main:
                bar.set_postfix({k: f"{values[k]:.3f}" for k in LOSSES if k in values}, refresh=False)
                bar.update(1)
            if self._validates_now():
                said = self.validate()
                if main:
                    bar.write(f"iteration {self.iteration}: {said}")
            if main and cfg.save_every is not None and self.iteration % cfg.save_every == 0:
                self.save_weights(f"iter_{self.iteration}.pt", "iter")
            if self.iteration % cfg.checkpoint_every == 0 or self.iteration == cfg.max_iters:
                self.checkpoint()
        del batches  # the loader's workers end here
        bar.close()
        return self.finish(evaluate)

    def _metrics(self, distances: bool = True) -> SegmentationMetrics:
        """Binary: the foreground's metrics; several classes: each foreground class's and their means."""
        return SegmentationMetrics(distances, None if self.labels.num_classes == 2 else self.labels.foreground)

    def _dice(self, cases: list[str]) -> float:
        """The mean Dice of ``cases`` (several classes: the mean over the foreground classes)."""
        return self._evaluate(self._metrics(distances=False), cases)[0]["dice"]

    def _evaluate(self, metrics: SegmentationMetrics, cases: list[str]) -> tuple[dict, list]:
        """The cases predicted by sliding windows and scored by ``metrics``: its summary, and the first
        cases' ``(case, image, gt, pred, dice)`` for the overlays."""
        cfg = self.cfg
        self.model.eval()
        overlays = []
        for case in cases:
            image, label = self.source.load(case)
            pred = predict_classes(self.model, image, cfg.patch_size, cfg.eval_strides, cfg.eval_batch,
                                   self.device, self.autocast is not None)[1]
            dice = metrics(case, pred, label, self.source.geometry(case)[0])["dice"]
            if len(overlays) < OVERLAY_CASES:
                overlays.append((case, image, label, pred, dice))
        return metrics.aggregate(), overlays
