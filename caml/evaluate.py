"""Evaluate a checkpoint on a dataset's test cases: ``python -m caml.evaluate --checkpoint FILE --data DIR --out DIR``.

The checkpoint is ours (``checkpoints/last.pt``, ``best.pt``, ``iter_N.pt`` or ``best_on_test.pt`` of
``caml.train``: model sizes, patch and strides from its config, the test cases from its recorded split,
the label values from its recorded labels) or an official CAML one (a raw state_dict: sizes and classes
from the weights, the label values those the data folder's dataset.json declares, else 0 .. C-1, the
official patch 112 x 112 x 80 and strides 18 / 18 / 4). Every test case is predicted by sliding windows
(decoder 1, as the official test), optionally reduced to its largest connected component
(``--largest-component``, the official ``post_process``; per class for several classes), and scored:
Dice, Jaccard, 95HD and ASD (in the header's spacing for NIfTI data, in voxels for the LA h5 layout, as
the official numbers); with several classes per foreground class and their mean
(``caml.metrics.SegmentationMetrics``). The checkpoint is evaluated as given, and the output names it
(``checkpoint_selection``: last, best-on-validation, iter N, best-on-test or official): this command
selects nothing on the test cases, and says so loudly of a checkpoint that ``caml.train
--select-on-test`` selected on them.

``--out`` receives ``metrics.csv`` (per case, then the mean; with several classes a row per case and
class, ``mean`` the mean over the foreground classes), ``metrics.json``, ``predictions/<case>.nii.gz``
(the data's label values, uint8, in the image's geometry where known), ``probabilities/<case>.nii.gz``
(with ``--save-probs``: the foreground probability; with several classes every class's, last axis)
and ``overlays/<case>.png``. Everything is written to a temporary folder and moved into place at
the end, so a failed run leaves no partial results.
"""
from __future__ import annotations

import csv
import math
import os
import shutil
import sys
import tempfile
from typing import Optional, Sequence

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .cli import (Interrupted, Parser, UsageError, add_device_flag, add_fold_flag, add_patch_size_flag,
                  check_out_folder, device_from_flag, int_at_least, one_line, print_metrics, run)
from .config import TrainConfig
from .data.intensity import Intensity
from .data.labels import DATASET_JSON, LabelSet, declared_labels
from .data.msd import require_nibabel, write_nifti
from .data.source import open_source
from .inference import OFFICIAL_ROI_SIZE, OFFICIAL_STRIDES, largest_components, predict_classes
from .metrics import METRICS, SegmentationMetrics
from .models import CAML3d
from .runlog import plot_overlays, read_json, write_json

__all__ = ["main", "build_parser", "load_model", "evaluate"]

PROG = "python -m caml.evaluate"
OUTPUTS = ("metrics.csv", "metrics.json", "predictions", "probabilities", "overlays")
CSV_FIELDS = ("case",) + METRICS
CLASS_CSV_FIELDS = ("case", "class") + METRICS  # several classes: a row per case and class


def build_parser():
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoints/last.pt of caml.train, or an official state_dict")
    p.add_argument("--data", required=True, help="LA h5 folder or MSD folder (imagesTr/, labelsTr/)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--split", default=None, help="MSD folder: JSON split file, or nnU-Net's splits_final.json with "
                   "--fold (default: the split recorded with the checkpoint, else the seeded split)")
    add_fold_flag(p)
    p.add_argument("--largest-component", action="store_true", help="keep the largest connected component")
    p.add_argument("--save-probs", action="store_true", help="also write the foreground probability maps")
    add_patch_size_flag(p)
    p.add_argument("--strides", type=int_at_least(1), nargs=3, default=None, metavar=("W", "H", "D"))
    p.add_argument("--sw-batch-size", type=int_at_least(1), default=4, help="windows per forward pass (default 4)")
    add_device_flag(p, default="auto")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (default: float32)")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="CPU threads")
    return p


def load_model(path: str) -> tuple[CAML3d, dict]:
    """The model of a checkpoint (ours or official) and what it says about itself: ``kind``,
    ``patch_size``, ``strides``, ``iteration``, ``max_iters``, ``split``, ``split_seed``, ``labels``
    (the recorded :class:`LabelSet`; None for an official checkpoint), ``saved_as`` (last, best,
    best_on_test, iter or official), ``selected`` (what selected it: iteration, dice) and ``intensity``
    (the normalisation it was trained with; z-score for official checkpoints, as the LA data)."""
    obj = load_checkpoint(path)
    ours = isinstance(obj, dict) and isinstance(obj.get("model"), dict) and isinstance(obj.get("config"), dict)
    try:
        model = CAML3d.from_checkpoint(path)
    except RuntimeError as err:  # load_state_dict(strict=True): missing / unexpected keys, wrong shapes
        raise ValueError(f"checkpoint {path} does not fit CAML3d: {one_line(err, 300)}") from None
    if not ours:
        return model, {"kind": "official", "patch_size": OFFICIAL_ROI_SIZE, "strides": OFFICIAL_STRIDES,
                       "iteration": None, "max_iters": None, "split": None, "split_seed": 0, "labels": None,
                       "saved_as": "official", "selected": None, "intensity": Intensity()}
    cfg = TrainConfig.from_json(obj["config"], f"checkpoint {path}: config")
    split = obj.get("split")
    run_split = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "split.json")
    if split is None and os.path.isfile(run_split):
        split = read_json(run_split)
    labels = LabelSet.from_json(obj["labels"]) if "labels" in obj else None  # older checkpoints: binary 0 / 1
    saved_as = obj.get("saved_as", "last")  # checkpoints of earlier versions: last.pt only
    selected = (obj.get("selection") or {}).get(saved_as)
    return model, {"kind": "caml.train", "patch_size": tuple(cfg.patch_size), "strides": tuple(cfg.eval_strides),
                   "iteration": obj.get("iteration"), "max_iters": cfg.max_iters, "split": split,
                   "split_seed": cfg.split_seed, "labels": labels, "saved_as": saved_as, "selected": selected,
                   "intensity": Intensity(cfg.intensity, cfg.window)}


def checkpoint_labels(model: CAML3d, info: dict, data: str, path: str) -> LabelSet:
    """The label values the checkpoint predicts: the recorded ones, else those ``data`` declares, else
    0 .. C-1 for the model's C classes; a ValueError naming both when they disagree with the data's."""
    num_classes = model.decoder1.out_conv.out_channels
    declared = declared_labels(data)
    labels = info["labels"] or declared or LabelSet.contiguous(num_classes)
    if labels.num_classes != num_classes:
        raise ValueError(f"checkpoint {path} predicts {num_classes} classes, but {labels.num_classes} labels "
                         f"{list(labels.values)} are {'recorded with it' if info['labels'] else declared.origin}")
    if declared is not None and declared.values != labels.values:
        raise ValueError(f"checkpoint {path} predicts the label values {list(labels.values)}, but "
                         f"{os.path.join(data, DATASET_JSON)} declares {list(declared.values)}")
    return labels


def _selection(info: dict) -> str:
    """The checkpoint's name in the output: last, best-on-validation, iter N, best-on-test or official."""
    names = {"last": "last", "best": "best-on-validation", "best_on_test": "best-on-test", "official": "official"}
    return names.get(info["saved_as"], f"iter {info['iteration']}")


def _protocol(info: dict) -> str:
    """What was scored, and whether anything was selected on the test cases."""
    kind, selected = info["saved_as"], info["selected"]
    at = f"iteration {info['iteration']} of {info['max_iters']}"
    if kind == "best_on_test":
        return (f"the checkpoint SELECTED ON THE TEST CASES by caml.train --select-on-test ({at}, test Dice "
                f"{selected['dice']:.4f}), the official code's protocol: for like-for-like tables only; these test "
                f"metrics are optimistic, not an estimate of the accuracy on new cases")
    if kind == "official":
        what = "the given official checkpoint as is"
    elif kind == "best":
        what = f"the checkpoint selected on the validation cases ({at}, validation Dice {selected['dice']:.4f})"
    else:
        what = f"the last checkpoint of the run ({at})" if kind == "last" else f"the checkpoint of {at}"
    return f"{what}; no model selection on the test cases was made"


def _test_origin(source, info: dict, split_file: Optional[str], fold: Optional[int]) -> str:
    if source.layout == "la_h5":
        return "test.list"
    if split_file is not None:
        return f"split file {split_file}" + ("" if fold is None else f" (the val cases of fold {fold})")
    if info["split"] is not None and info["split"].get("layout") == "msd":
        return "the split recorded with the checkpoint"
    return f"the seeded split (seed {info['split_seed']}; no split recorded with the checkpoint)"


def _publish(tmp: str, out: str) -> None:
    """Moves the finished outputs from ``tmp`` into ``out`` (replacing earlier ones) and removes ``tmp``."""
    if not os.path.exists(out):
        os.replace(tmp, out)
        return
    for name in OUTPUTS:
        dest = os.path.join(out, name)
        if os.path.isdir(dest):
            shutil.rmtree(dest)
        elif os.path.exists(dest):
            os.unlink(dest)
        if os.path.exists(os.path.join(tmp, name)):
            os.replace(os.path.join(tmp, name), dest)
    shutil.rmtree(tmp)


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.6f}"


def _write_csv(path: str, summary: dict) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        if "classes" not in summary:
            writer.writerow(CSV_FIELDS)
            for case, m in summary["cases"].items():
                writer.writerow([case] + [_fmt(m[k]) for k in METRICS])
            writer.writerow(["mean"] + [_fmt(summary[k]) for k in METRICS])
            return
        writer.writerow(CLASS_CSV_FIELDS)
        for case, m in [*summary["cases"].items(), ("mean", summary)]:
            for name, values in [*m["classes"].items(), ("mean", m)]:
                writer.writerow([case, name] + [_fmt(values[k]) for k in METRICS])


def evaluate(args) -> dict:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = device_from_flag(args.device)
    out = check_out_folder(args.out)
    if os.path.isfile(os.path.join(out, "config.json")) and os.path.isdir(os.path.join(out, "checkpoints")):
        raise UsageError(f"--out {out} is a run folder of caml.train (its metrics.json would be replaced); "
                         f"choose another, e.g. {os.path.join(out, 'eval')}")
    checkpoint = os.path.abspath(args.checkpoint)
    model, info = load_model(checkpoint)
    patch = tuple(args.patch_size) if args.patch_size else info["patch_size"]
    strides = tuple(args.strides) if args.strides else info["strides"]
    if any(s < 16 or s % 16 for s in patch):
        raise UsageError(f"patch size must be three multiples of 16, got {patch}")
    data = os.path.abspath(args.data)
    split_file = os.path.abspath(args.split) if args.split else None
    if args.fold is not None and split_file is None:
        raise UsageError("--fold needs --split FILE (nnU-Net's splits_final.json)")
    recorded = info["split"] if info["split"] is not None and info["split"].get("layout") == "msd" else None
    labels = checkpoint_labels(model, info, data, checkpoint)
    source = open_source(data, split_file, info["split_seed"], recorded, labels.num_classes, args.fold,
                         info["intensity"])
    if source.in_channels != model.in_channels:
        raise UsageError(f"--data {data} has {source.in_channels} image channel(s); the checkpoint's model takes "
                         f"{model.in_channels}")
    source.check(source.test_cases)
    protocol, origin = _protocol(info), _test_origin(source, info, split_file, args.fold)
    print(f"{len(source.test_cases)} test cases from {origin}; {protocol}", flush=True)

    require_nibabel()  # the predictions are NIfTI files: fail before the inference without it
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    try:
        for name in ("predictions", "overlays") + (("probabilities",) if args.save_probs else ()):
            os.makedirs(os.path.join(tmp, name))
        model.to(device).eval()
        binary = labels.num_classes == 2
        scores = SegmentationMetrics(classes=None if binary else labels.foreground)
        for case in source.test_cases:
            image, gt = source.load(case)
            spacing, affine = source.geometry(case)
            probs, pred = predict_classes(model, image, patch, strides, args.sw_batch_size, device, args.amp)
            if args.largest_component:
                pred = largest_components(pred)
            dice = scores(case, pred, gt, spacing)["dice"]
            write_nifti(os.path.join(tmp, "predictions", f"{case}.nii.gz"), labels.to_values(pred), affine, spacing)
            if args.save_probs:
                probs = probs.cpu().numpy()
                probs = probs[1] if probs.shape[0] == 2 else np.moveaxis(probs, 0, -1)
                write_nifti(os.path.join(tmp, "probabilities", f"{case}.nii.gz"), probs.astype(np.float32), affine,
                            spacing)
            plot_overlays([(case, image, gt, pred, dice)], os.path.join(tmp, "overlays", f"{case}.png"),
                          labels.num_classes)
        summary = scores.aggregate()
        _write_csv(os.path.join(tmp, "metrics.csv"), summary)
        metrics = {**summary, "protocol": protocol, "test_cases_from": origin,
                   "checkpoint": os.path.abspath(args.checkpoint), "checkpoint_kind": info["kind"],
                   "checkpoint_selection": _selection(info),
                   "iteration": info["iteration"], "data": data, "layout": source.layout,
                   "largest_component": args.largest_component, "patch_size": list(patch), "strides": list(strides),
                   "distance_units": "voxels" if source.layout == "la_h5" else "header spacing (mm)"}
        if not binary:
            metrics["labels"] = labels.to_json()
        write_json(os.path.join(tmp, "metrics.json"), metrics)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return metrics


def main(argv: Optional[Sequence[str]] = None) -> int:
    def body():
        args = build_parser().parse_args(argv)
        try:
            metrics = evaluate(args)
        except KeyboardInterrupt:
            raise Interrupted("interrupted; nothing written") from None
        print_metrics(metrics, os.path.abspath(args.out), "output folder")

    return run(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
