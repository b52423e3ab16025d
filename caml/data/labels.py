"""The classes of a dataset: which label values its files hold and the class each one trains as.

A :class:`LabelSet` lists the label values in class order (class ``i`` is ``values[i]``, ascending;
``values[0]`` is the background), so that files labeled e.g. 0 / 1 / 2 / 4 (BraTS) train as the
contiguous classes 0 .. 3 and predictions are written back with the files' own values. The values
come from ``<root>/dataset.json`` when it declares ``labels`` (MSD style ``{"0": "background",
"1": "edema"}`` or nnU-Net v2 style ``{"background": 0, "edema": 1}``), else they are ``0 .. N-1``
for ``N`` classes given (``--num-classes``; 2 by default: binary 0 / 1). A label voxel outside the
values is an error naming the file: a stray value never silently becomes a class.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..cli import one_line
from .checks import unexpected_values

__all__ = ["DATASET_JSON", "LabelSet", "label_classes", "read_dataset_json", "declared_labels",
           "dataset_labels"]

DATASET_JSON = "dataset.json"
BINARY_HINT = "binary by default: declare more classes in dataset.json's labels or give --num-classes"


def label_classes(label: np.ndarray, values: Sequence[int], what: str, origin: str = "") -> np.ndarray:
    """The class indices (uint8) of a label whose voxels hold ``values`` (ascending, class order); a
    ValueError ``<what>: unexpected values [...] (allowed label values [...]; <origin>)`` otherwise."""
    unexpected = unexpected_values(label, values)
    if unexpected:
        raise ValueError(f"{what}: unexpected values {unexpected} (allowed label values {list(values)}"
                         f"{'; ' + origin if origin else ''})")
    return np.searchsorted(np.asarray(values), label).astype(np.uint8)


@dataclass(frozen=True)
class LabelSet:
    """``values``: the files' label values in class order (ascending); ``names``: one per class;
    ``origin``: where they come from (for error messages)."""

    values: tuple[int, ...]
    names: tuple[str, ...]
    origin: str = field(default="", compare=False)

    @classmethod
    def contiguous(cls, num_classes: int, origin: str = "") -> "LabelSet":
        """Values ``0 .. num_classes - 1``; names ``background``, then ``foreground`` (binary) or ``class_<i>``."""
        names = ("foreground",) if num_classes == 2 else tuple(f"class_{i}" for i in range(1, num_classes))
        return cls(tuple(range(num_classes)), ("background",) + names, origin)

    @classmethod
    def from_json(cls, record: dict) -> "LabelSet":
        return cls(tuple(int(v) for v in record["values"]), tuple(str(n) for n in record["names"]))

    def to_json(self) -> dict:
        return {"values": list(self.values), "names": list(self.names)}

    @property
    def num_classes(self) -> int:
        return len(self.values)

    @property
    def foreground(self) -> tuple[str, ...]:
        """The names of classes 1 .. C-1 (what metrics are reported for)."""
        return self.names[1:]

    def to_classes(self, label: np.ndarray, what: str) -> np.ndarray:
        """The label's class indices (uint8); :func:`label_classes`' error for other values."""
        return label_classes(label, self.values, what, self.origin)

    def to_values(self, classes: np.ndarray) -> np.ndarray:
        """Class indices back to the files' label values (uint8, or uint16 for values above 255)."""
        dtype = np.uint8 if self.values[-1] <= 255 else np.uint16
        return np.asarray(self.values, dtype=dtype)[classes]


def read_dataset_json(root: str) -> Optional[dict]:
    """The content of ``<root>/dataset.json``, or None without one; a ValueError naming it if unreadable."""
    path = os.path.join(root, DATASET_JSON)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path}: {one_line(err, 200)}") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def declared_labels(root: str, meta: Optional[dict] = None) -> Optional[LabelSet]:
    """The labels ``<root>/dataset.json`` declares (``meta``: its content when already read), or None (no
    file, or no ``labels`` in it)."""
    path = os.path.join(root, DATASET_JSON)
    meta = read_dataset_json(root) if meta is None else meta
    labels = None if meta is None else meta.get("labels")
    if labels is None:
        return None
    try:
        if all(str(k).isdigit() for k in labels):  # MSD: {"0": "background", "1": "left atrium"}
            pairs = {int(k): str(v) for k, v in labels.items()}
        else:  # nnU-Net v2: {"background": 0, "left atrium": 1}
            pairs = {int(v): str(k) for k, v in labels.items()}
    except (ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"cannot read {path}: {one_line(err, 200)}") from err
    if len(pairs) < 2 or min(pairs) != 0:
        raise ValueError(f"{path}: labels must declare background 0 and at least one class, got {sorted(pairs)}")
    names = tuple(pairs[v] for v in sorted(pairs))
    if len(set(names)) < len(names):
        raise ValueError(f"{path}: label names must differ (they name the classes' metrics), got {list(names)}")
    return LabelSet(tuple(sorted(pairs)), names, f"declared in {path}")


def dataset_labels(root: str, num_classes: Optional[int] = None, meta: Optional[dict] = None) -> LabelSet:
    """The labels of the dataset in ``root``: the declared ones (``num_classes``, when given, must agree),
    else ``0 .. num_classes - 1`` (binary without it). ``meta``: dataset.json's content when already read."""
    declared = declared_labels(root, meta)
    if declared is None:
        if num_classes is None:
            return LabelSet.contiguous(2, BINARY_HINT)
        return LabelSet.contiguous(num_classes, f"num_classes {num_classes}")
    if num_classes is not None and num_classes != declared.num_classes:
        raise ValueError(f"--num-classes {num_classes} disagrees with the {declared.num_classes} labels "
                         f"{list(declared.values)} that {os.path.join(root, DATASET_JSON)} declares")
    return declared
