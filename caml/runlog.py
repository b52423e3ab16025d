"""Run-folder logging: CSV logs, an optional TensorBoard writer, and PNG plots (matplotlib, Agg)."""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Iterable, Optional, Sequence

import numpy as np

from .cli import one_line

__all__ = ["read_json", "write_json", "CSVLog", "TensorBoard", "plot_losses", "plot_validation", "plot_overlays"]


def read_json(path: str):
    """The JSON in ``path``; a ValueError naming the file if it does not parse."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"cannot read {path}: {one_line(err, 200)}") from None


def _json_safe(obj):
    """``obj`` with its non-finite floats as None (JSON has no nan or inf)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_json(path: str, obj) -> None:
    """``obj`` as indented JSON through a temporary file and ``os.replace`` (the old file or the new one)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_json_safe(obj), f, indent=2)
    os.replace(tmp, path)


class CSVLog:
    """Rows appended to a CSV file with a fixed header, one per iteration, in order. :meth:`truncate`
    keeps the complete rows up to an iteration (after a resume: not the rows a killed run wrote after
    its last checkpoint, nor a row torn by the kill); appending a row for an iteration already logged
    replaces it and anything after it (resuming a finished run evaluates it again)."""

    def __init__(self, path: str, fields: Sequence[str]):
        self.path, self.fields = path, list(fields)
        self._write(self.rows() if os.path.isfile(path) else [])

    def append(self, row: dict) -> None:
        if int(row["iteration"]) <= self.last:
            self.truncate(int(row["iteration"]) - 1)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.fields, extrasaction="ignore").writerow(row)
        self.last = int(row["iteration"])

    def rows(self) -> list[dict]:
        """The complete rows: a last line without its newline, a short row or a row whose iteration is
        not after the previous one's is dropped."""
        with open(self.path, newline="") as f:
            lines = f.read().splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines.pop()  # torn by a kill mid-write
        rows, last = [], 0
        for row in csv.DictReader(lines):
            if None in row.values() or None in row or not row["iteration"].isdigit() or int(row["iteration"]) <= last:
                continue
            rows.append(row)
            last = int(row["iteration"])
        return rows

    def truncate(self, iteration: int) -> None:
        self._write([r for r in self.rows() if int(r["iteration"]) <= iteration])

    def _write(self, rows: list[dict]) -> None:
        tmp = self.path + ".tmp"  # the old log or the new one, never half of one
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)
        self.last = int(rows[-1]["iteration"]) if rows else 0  # the last iteration logged


class TensorBoard:
    """``torch.utils.tensorboard.SummaryWriter`` when the tensorboard package is installed; otherwise
    a no-op (``available`` is False)."""

    def __init__(self, log_dir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.writer = None
        else:
            self.writer = SummaryWriter(log_dir)

    @property
    def available(self) -> bool:
        return self.writer is not None

    def scalars(self, values: dict, step: int, prefix: str = "") -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(prefix + key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(rows: Iterable[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(int(r["iteration"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    x, y = zip(*pairs)
    return np.asarray(x), np.asarray(y)


def _smooth(y: np.ndarray, width: int) -> np.ndarray:
    if width <= 1 or y.size < width:
        return y
    return np.convolve(y, np.ones(width) / width, mode="valid")


def plot_losses(rows: list[dict], keys: Sequence[str], path: str) -> None:
    """Loss curves (raw, faint, and a moving average) of the CSV rows, one panel per key."""
    plt = _pyplot()
    keys = [k for k in keys if _series(rows, k)[0].size]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        x, y = _series(rows, key)
        width = max(1, len(y) // 25)
        ax.plot(x, y, alpha=0.3, lw=0.8)
        ax.plot(x[width - 1:], _smooth(y, width), lw=1.5)
        ax.set_title(key)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_validation(rows: list[dict], path: str) -> None:
    """Validation Dice against the iteration."""
    x, y = _series(rows, "dice")
    if not x.size:
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(x, y, marker="o")
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _contour_styles(num_classes: int) -> list[tuple[int, object, object, str]]:
    """``(class, ground-truth colour, prediction colour, prediction line style)`` per foreground class:
    binary ground truth lime and prediction red; several classes one colour each, the ground truth
    solid and the prediction dashed."""
    if num_classes == 2:
        return [(1, "lime", "red", "solid")]
    colours = _pyplot().get_cmap("tab10")
    return [(c, colours((c - 1) % 10), colours((c - 1) % 10), "dashed") for c in range(1, num_classes)]


def plot_overlays(cases: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray, Optional[float]]],
                  path: str, num_classes: int = 2) -> None:
    """One row per case ``(name, image, gt, pred, dice)`` (``gt`` and ``pred``: class maps): the axial
    (last-axis) slice with the most ground truth, then the middle slices along the other two axes; the
    contours of each foreground class (:func:`_contour_styles`). A multi-channel image ``[C, W, H, D]``
    shows its first channel."""
    if not cases:
        return
    plt = _pyplot()
    styles = _contour_styles(num_classes)
    fig, axes = plt.subplots(len(cases), 3, figsize=(9, 3 * len(cases)), squeeze=False)
    for row, (name, image, gt, pred, dice) in zip(axes, cases):
        image = image[0] if image.ndim == 4 else image
        foreground = gt > 0
        z = (int(np.argmax(foreground.reshape(-1, gt.shape[-1]).sum(0))) if foreground.any()
             else gt.shape[-1] // 2)
        cuts = [(np.s_[:, :, z], f"z={z}"), (np.s_[image.shape[0] // 2], "x mid"), (np.s_[:, image.shape[1] // 2], "y mid")]
        for ax, (cut, label) in zip(row, cuts):
            ax.imshow(image[cut].T, cmap="gray", origin="lower")
            for c, gt_colour, pred_colour, pred_line in styles:
                for mask, colour, line in ((gt == c, gt_colour, "solid"), (pred == c, pred_colour, pred_line)):
                    if mask[cut].any() and not mask[cut].all():
                        ax.contour(mask[cut].T.astype(float), levels=[0.5], colors=[colour], linewidths=1,
                                   linestyles=line)
            ax.set_title(f"{name} {label}" + (f"  Dice {dice:.3f}" if dice is not None and label.startswith("z") else ""),
                         fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
