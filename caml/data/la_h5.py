"""The LA h5 layout of the official code (UA-MT / SASSNet / MC-Net / CAML)::

    <root>/train.list, <root>/test.list            one case name per line
    <root>/2018LA_Seg_Training Set/<case>/mri_norm2.h5
        image: float32 [W, H, D] (normalised MRI), label: uint8 [W, H, D] (0 background, 1 atrium)

Case names are names, never paths (they become file names of the outputs). Image voxels must be
finite and labels 0 / 1; other label values are refused unless given explicitly (``label_values``,
the values in class order: e.g. (0, 255) maps 255 to class 1, (0, 1, 2, 3) reads four classes).
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import h5py
import numpy as np
from torch.utils.data import Dataset

from ..cli import one_line
from .checks import check_finite
from .labels import label_classes

__all__ = ["CASES_DIR", "H5_NAME", "LABEL_VALUES", "check_case_name", "read_case_list", "case_path", "load_case",
           "check_label", "write_case", "LAHeartH5"]

CASES_DIR = "2018LA_Seg_Training Set"
H5_NAME = "mri_norm2.h5"
SPLITS = ("train", "test")
LABEL_VALUES = (0, 1)  # (background, foreground) in the label of the official files


def check_case_name(name: str, where: str) -> str:
    """``name`` if it is a plain file name (no path separator, not ``.`` or ``..``)."""
    if name in (".", "..") or any(sep in name for sep in ("/", "\\", os.sep, "\0")):
        raise ValueError(f"{where}: case name {name!r} is not a plain name (no path separators, not . or ..)")
    return name


def read_case_list(root: str, split: str) -> list[str]:
    """Case names of ``<root>/<split>.list`` (blank lines and surrounding spaces ignored)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"LA data folder not found: {root}")
    list_path = os.path.join(root, f"{split}.list")
    if not os.path.isfile(list_path):
        raise FileNotFoundError(f"case list not found: {list_path} (the LA h5 layout needs train.list and test.list)")
    with open(list_path) as f:
        cases = [check_case_name(line.strip(), f"case list {list_path}") for line in f if line.strip()]
    if not cases:
        raise ValueError(f"case list is empty: {list_path}")
    return cases


def case_path(root: str, case: str) -> str:
    return os.path.join(root, CASES_DIR, case, H5_NAME)


def check_label(path: str, label: np.ndarray, label_values: tuple = LABEL_VALUES, origin: str = "") -> np.ndarray:
    """The label's classes as uint8 (class i: ``label_values[i]``); a ValueError naming the file for any
    other value (e.g. 0 / 255 read as 0 / 1, which would train with no foreground)."""
    return label_classes(label, label_values, f"h5 file {path}", origin)


def load_case(path: str, label_values: tuple = LABEL_VALUES) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 [W, H, D], label uint8 classes [W, H, D]) of one h5 file; one-line errors naming the
    file (unreadable, shapes, non-finite image voxels, label values other than ``label_values``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"case file not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            missing = [key for key in ("image", "label") if key not in f]
            if missing:
                raise ValueError(f"h5 file {path} lacks dataset(s) {missing} (needs 'image' and 'label')")
            image, label = f["image"][()], f["label"][()]
    except (OSError, RuntimeError) as err:  # h5py reports unreadable / truncated files so
        raise ValueError(f"cannot read h5 file {path}: {one_line(err)}") from err
    if image.ndim != 3 or image.shape != label.shape:
        raise ValueError(f"h5 file {path}: image and label must both be [W, H, D] of one shape, "
                         f"got {image.shape} and {label.shape}")
    check_finite(image, f"h5 file {path}")
    return image.astype(np.float32, copy=False), check_label(path, label, label_values)


def write_case(root: str, case: str, image: np.ndarray, label: np.ndarray) -> str:
    """Writes one case in the layout (image float32, label uint8, uncompressed: fast to read); returns its path."""
    path = case_path(root, case)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=np.asarray(image, dtype=np.float32))
        f.create_dataset("label", data=np.asarray(label, dtype=np.uint8))
    return path


class LAHeartH5(Dataset):
    """The cases of one split: item i is ``{"image": float32 [W, H, D], "label": uint8 [W, H, D],
    "case": name}`` (numpy) passed through ``transform`` when given.

    ``num`` keeps the first ``num`` cases of the list (the official ``labelnum`` / ``num`` argument).
    All case files are checked to exist when the dataset is made. ``label_values``: see :func:`load_case`.
    """

    def __init__(self, root: str, split: str = "train", num: Optional[int] = None,
                 transform: Optional[Callable[[dict], dict]] = None, label_values: tuple = LABEL_VALUES):
        self.root, self.split, self.transform, self.label_values = root, split, transform, label_values
        cases = read_case_list(root, split)
        self.cases = cases[:num] if num is not None else cases
        missing = [case_path(root, c) for c in self.cases if not os.path.isfile(case_path(root, c))]
        if missing:
            raise FileNotFoundError(f"{len(missing)} case file(s) of {split}.list not found, first: {missing[0]}")

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict:
        case = self.cases[index]
        image, label = load_case(case_path(self.root, case), self.label_values)
        sample = {"image": image, "label": label, "case": case}
        return self.transform(sample) if self.transform is not None else sample
