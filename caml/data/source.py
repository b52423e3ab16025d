"""One interface over the two dataset layouts ``--data`` accepts (``open_source``):

- the LA h5 layout (``train.list``, ``test.list``, ``2018LA_Seg_Training Set/``): train and test are
  the lists; every training case has a label (``--labeled N`` keeps the first N labeled);
- an MSD or nnU-Net folder (``imagesTr/``, ``labelsTr/``; :mod:`caml.data.msd`): the labeled cases are
  split into train and test by a seeded split (``make_split``) or a split file; images with no label
  (and, with ``imagests_unlabeled``, the images of ``imagesTs/``) are unlabeled training cases.

A source's ``train_cases`` lists its labeled training cases first (``labeled_train`` of them), then
the unlabeled ones; its ``label_set`` (:mod:`caml.data.labels`) says which label values its files
hold and the class each one is (``load`` returns class indices); ``split_record()`` is what a run
folder records (``split.json``) so that ``caml.evaluate`` scores the same test cases; ``in_channels``
is the images' channel count. A split file is JSON ``{"train": [...], "test": [...]}`` (a run folder's
``split.json`` is one) or nnU-Net's ``splits_final.json``, a list of folds ``[{"train": [...],
"val": [...]}, ...]``, of which ``fold`` picks one: its ``train`` cases are the labeled training cases
and its ``val`` cases the test cases.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional, Sequence

import h5py
import numpy as np
from torch.utils.data import Dataset

from ..cli import one_line
from .intensity import Intensity
from .la_h5 import CASES_DIR, case_path, check_label, load_case, read_case_list
from .labels import dataset_labels
from .msd import MSDFolder, is_msd_folder

__all__ = ["TEST_FRACTION", "open_source", "make_split", "read_split_file", "validation_cases", "LASource", "MSDSource",
           "CaseDataset"]

TEST_FRACTION = 0.2


class LASource:
    layout = "la_h5"
    in_channels = 1

    def __init__(self, root: str, num_classes: Optional[int] = None):
        """The label values: declared in ``<root>/dataset.json``, else 0 .. ``num_classes`` - 1 (default 0 / 1)."""
        self.root, self.label_set = root, dataset_labels(root, num_classes)
        self.train_cases = read_case_list(root, "train")
        self.test_cases = read_case_list(root, "test")
        self.labeled_train = len(self.train_cases)

    def check(self, cases: Sequence[str]) -> None:
        """Every case file exists and is a readable h5 with 3D ``image`` and ``label`` of one shape and
        only the allowed label values (the labels are read, the images' headers only)."""
        for case in cases:
            path = case_path(self.root, case)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"case file not found: {path}")
            try:
                with h5py.File(path, "r") as f:
                    if "image" not in f or "label" not in f:
                        raise ValueError(f"h5 file {path} lacks 'image' or 'label'")
                    shapes = f["image"].shape, f["label"].shape
                    label = f["label"][()]
            except OSError as err:
                raise ValueError(f"cannot read h5 file {path}: {one_line(err)}") from None
            if len(shapes[0]) != 3 or shapes[0] != shapes[1]:
                raise ValueError(f"h5 file {path}: image and label must be 3D of one shape, "
                                 f"got {shapes[0]} and {shapes[1]}")
            check_label(path, label, self.label_set.values, self.label_set.origin)

    def load(self, case: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
        return load_case(case_path(self.root, case), self.label_set.values)

    def geometry(self, case: str) -> tuple[Optional[tuple], Optional[np.ndarray]]:
        """(spacing, affine): unknown in the h5 layout, so metrics are in voxels as the official LA numbers."""
        return None, None

    def split_record(self) -> dict:
        return {"layout": self.layout, "train": list(self.train_cases), "test": list(self.test_cases), "unlabeled": []}


def make_split(labeled: Sequence[str], seed: int, test_fraction: float = TEST_FRACTION) -> dict:
    """Seeded split of the labeled cases: ``round(test_fraction * n)`` (at least 1) test cases (sorted),
    the rest for training in a seeded order (so ``--labeled N`` takes a random N of them)."""
    names = sorted(labeled)
    if len(names) < 2:
        raise ValueError(f"a train/test split needs at least 2 labeled cases, found {len(names)}")
    n_test = min(max(1, round(test_fraction * len(names))), len(names) - 1)
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    return {"train": order[n_test:], "test": sorted(order[:n_test])}


def read_split_file(path: str, labeled: Sequence[str], fold: Optional[int] = None) -> dict:
    """``{"train", "test"}`` of a split file (of its fold ``fold`` for nnU-Net's list of folds, whose
    ``val`` cases become the test cases), checked against the folder's labeled cases."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"split file not found: {path}")
    try:
        with open(path) as f:
            split = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read split file {path}: {one_line(err)}") from None
    if not isinstance(split, list):
        if fold is not None:
            raise ValueError(f"--fold applies to nnU-Net's splits_final.json (a list of folds); split file {path} "
                             f"is one split")
        return check_split(split, labeled, f"split file {path}")
    if fold is None or not 0 <= fold < len(split):
        raise ValueError(f"split file {path} holds {len(split)} nnU-Net fold(s): choose one with --fold K, "
                         f"K from 0 to {len(split) - 1}" + ("" if fold is None else f" (got {fold})"))
    chosen = split[fold]
    if not isinstance(chosen, dict) or set(chosen) != {"train", "val"}:
        raise ValueError(f"split file {path} fold {fold}: expected {{\"train\": [case, ...], \"val\": [case, ...]}}")
    return check_split({"train": chosen["train"], "test": chosen["val"]}, labeled, f"split file {path} fold {fold}")


def check_split(split, labeled: Sequence[str], what: str) -> dict:
    if not isinstance(split, dict) or not all(
            isinstance(split.get(k), list) and all(isinstance(c, str) for c in split[k]) for k in ("train", "test")):
        raise ValueError(f"{what}: expected {{\"train\": [case, ...], \"test\": [case, ...]}}")
    train, test = list(split["train"]), list(split["test"])
    if not train or not test:
        raise ValueError(f"{what}: train and test must both be non-empty")
    unknown = [c for c in train + test if c not in set(labeled)]
    if unknown:
        raise ValueError(f"{what}: case {unknown[0]!r} is not a labeled case of the data folder")
    both = sorted(set(train) & set(test))
    if both or len(set(train)) != len(train) or len(set(test)) != len(test):
        raise ValueError(f"{what}: a case is listed twice ({both[0] if both else 'within one list'})")
    return {"train": train, "test": test}


class MSDSource:
    layout = "msd"

    def __init__(self, root: str, split_file: Optional[str] = None, split_seed: int = 0,
                 recorded: Optional[dict] = None, num_classes: Optional[int] = None, fold: Optional[int] = None,
                 intensity: Intensity = Intensity(), imagests_unlabeled: bool = False):
        """The split: ``split_file`` (its ``fold`` for nnU-Net's folds) if given, else ``recorded`` (a run's
        split record), else seeded. ``num_classes``, ``intensity`` and ``imagests_unlabeled``: see
        :class:`MSDFolder`."""
        self.root, self.folder = root, MSDFolder(root, num_classes, intensity, imagests_unlabeled)
        self.label_set = self.folder.label_set
        self.in_channels = self.folder.in_channels
        labeled = self.folder.labeled
        if split_file is not None:
            split = read_split_file(split_file, labeled, fold)
        elif recorded is not None:
            split = check_split(recorded, labeled, f"the split recorded for {root}")
        else:
            split = make_split(labeled, split_seed)
        self.train_labeled, self.test_cases = split["train"], split["test"]
        self.train_cases = self.train_labeled + self.folder.unlabeled
        self.labeled_train = len(self.train_labeled)

    def check(self, cases: Sequence[str]) -> None:
        for case in cases:
            self.folder.check(case)

    def load(self, case: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
        return self.folder.load(case)

    def geometry(self, case: str) -> tuple[Optional[tuple], Optional[np.ndarray]]:
        _, spacing, affine = self.folder.header(case)
        return spacing, affine

    def split_record(self) -> dict:
        return {"layout": self.layout, "train": list(self.train_labeled), "test": list(self.test_cases),
                "unlabeled": list(self.folder.unlabeled)}


def open_source(root: str, split_file: Optional[str] = None, split_seed: int = 0,
                recorded: Optional[dict] = None, num_classes: Optional[int] = None, fold: Optional[int] = None,
                intensity: Intensity = Intensity(), imagests_unlabeled: bool = False):
    """The dataset in ``root`` (LA h5 layout or MSD folder); one-line errors for a missing, empty or
    unrecognised folder. ``num_classes`` (None: the declared labels, else binary) applies to both; the
    other arguments (:class:`MSDSource`'s) to MSD folders only."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data folder not found: {root}")
    if is_msd_folder(root):
        return MSDSource(root, split_file, split_seed, recorded, num_classes, fold, intensity, imagests_unlabeled)
    if any(os.path.exists(os.path.join(root, name)) for name in ("train.list", "test.list", CASES_DIR)):
        nifti_only = [flag for flag, given in (("--split", split_file is not None),
                                               ("--intensity / --window", intensity != Intensity()),
                                               ("--imagests-unlabeled", imagests_unlabeled)) if given]
        if nifti_only:
            raise ValueError(f"{nifti_only[0]} applies to MSD folders; the LA h5 layout in {root} has "
                             f"train.list/test.list (and normalised images)")
        return LASource(root, num_classes)
    what = "is empty" if not os.listdir(root) else "is neither the LA h5 layout (train.list, test.list) nor an MSD folder (imagesTr/)"
    raise ValueError(f"data folder {root} {what}")


def validation_cases(source, count: int, labeled: int) -> list[str]:
    """The ``count`` validation cases of a run (``--val``): the last of the source's labeled training
    cases, so that the first ``labeled`` train as they would without a validation split (only the
    unlabeled pool loses them). Raises ValueError if the labeled training cases are too few for both."""
    if count == 0:
        return []
    pool = source.train_cases[:source.labeled_train]
    if labeled + count > len(pool):
        raise ValueError(f"--val {count} with --labeled {labeled} needs {labeled + count} labeled training cases; "
                         f"{source.root} has {len(pool)}")
    return pool[len(pool) - count:]


class CaseDataset(Dataset):
    """Item i: ``{"image": float32 [W, H, D] or [C, W, H, D], "label": uint8 classes [W, H, D] (zeros for
    an unlabeled case), "case": name}``
    passed through ``transform``."""

    def __init__(self, source, cases: Sequence[str], transform: Optional[Callable[[dict], dict]] = None):
        self.source, self.cases, self.transform = source, list(cases), transform

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict:
        case = self.cases[index]
        image, label = self.source.load(case)
        if label is None:
            label = np.zeros(image.shape[-3:], np.uint8)
        sample = {"image": image, "label": label, "case": case}
        return self.transform(sample) if self.transform is not None else sample
