"""Raw 2018 Atrial Segmentation Challenge cases into the LA h5 layout, as the official preprocessing
(UA-MT's ``la_heart_processing.py``, which CAML's data come from):
``python -m caml.data.prepare_la --raw DIR --out DIR [--seed S] [--test-cases N | --train-list F --test-list F]``.

``--raw`` holds one folder per case with ``lgemri.nrrd`` (the MRI) and ``laendo.nrrd`` (the atrium,
255). Per case: label = (laendo == 255); the image is z-score normalised over the whole volume;
both are cropped around the label's bounding box with random margins of 10 to 19 voxels in x and y,
widened to the 112 x 112 patch where the atrium is narrower. As in the official code the depth
(third axis) keeps its full extent (the official script draws z margins, 5 to 9, but never applies
them; the draws are kept so the random stream matches its per-case order). The margins are seeded
per (seed, case), so a case's crop does not depend on which other cases are prepared.

``train.list`` / ``test.list`` come from ``--train-list`` / ``--test-list`` (e.g. the official lists)
or a seeded split with ``--test-cases`` test cases (default: a fifth, at least one). The output is
built in a temporary folder and moved to ``--out`` at the end.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import zlib
from typing import Optional, Sequence

import numpy as np

from ..cli import Parser, check_out_folder, int_at_least, one_line, run
from .checks import check_finite, unexpected_values
from .la_h5 import write_case

__all__ = ["IMAGE_NAME", "LABEL_NAME", "find_cases", "read_raw_case", "crop_case", "prepare_la", "main"]

IMAGE_NAME, LABEL_NAME = "lgemri.nrrd", "laendo.nrrd"
OUTPUT_SIZE = (112, 112, 80)
LABEL_VALUES = (0, 255)
PROG = "python -m caml.data.prepare_la"


def find_cases(raw: str) -> list[str]:
    """Sorted names of the case folders in ``raw`` (those holding ``lgemri.nrrd``)."""
    if not os.path.isdir(raw):
        raise FileNotFoundError(f"raw data folder not found: {raw}")
    cases = sorted(name for name in os.listdir(raw) if os.path.isfile(os.path.join(raw, name, IMAGE_NAME)))
    if not cases:
        raise ValueError(f"raw data folder {raw} holds no <case>/{IMAGE_NAME}")
    return cases


def _read_nrrd(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"nrrd file not found: {path}")
    try:
        import nrrd
    except ImportError:  # a dependency of the package, imported when used: a clear line if it is missing
        raise RuntimeError("reading nrrd files needs pynrrd (pip install pynrrd)") from None
    try:
        data, _ = nrrd.read(path)
    except Exception as err:  # pynrrd reports bad files with several exception types
        raise ValueError(f"cannot read nrrd file {path}: {one_line(err, 200)}") from None
    if data.ndim != 3:
        raise ValueError(f"nrrd file {path}: expected a 3D volume, got shape {data.shape}")
    return data


def read_raw_case(raw: str, case: str) -> tuple[np.ndarray, np.ndarray]:
    """(image float64, label uint8 0/1) of one raw case; one-line errors naming the file."""
    image_path = os.path.join(raw, case, IMAGE_NAME)
    image = _read_nrrd(image_path)
    check_finite(image, f"nrrd file {image_path}")
    if image.min() == image.max():  # the z-score would divide by a zero deviation
        raise ValueError(f"nrrd file {image_path}: the image is constant ({image.flat[0]}), it cannot be z-scored")
    label_path = os.path.join(raw, case, LABEL_NAME)
    label = _read_nrrd(label_path)
    if label.shape != image.shape:
        raise ValueError(f"nrrd file {label_path}: shape {label.shape} differs from its image's {image.shape}")
    unexpected = unexpected_values(label, LABEL_VALUES)
    if unexpected:
        raise ValueError(f"nrrd file {label_path}: unexpected label values {unexpected[:5]} (expected 0 and 255)")
    if not (label == 255).any():
        raise ValueError(f"nrrd file {label_path}: the label is empty (nothing to crop around)")
    return image.astype(np.float64), (label == 255).astype(np.uint8)


def crop_case(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The official normalisation and crop (see the module docstring)."""
    nonzero = np.nonzero(label)
    lo = [int(idx.min()) for idx in nonzero]
    hi = [int(idx.max()) for idx in nonzero]
    bounds = []
    for axis, (margin_lo, margin_hi) in enumerate(((10, 20), (10, 20), (5, 10))):
        pad = max(OUTPUT_SIZE[axis] - (hi[axis] - lo[axis]), 0) // 2
        start = max(lo[axis] - int(rng.integers(margin_lo, margin_hi)) - pad, 0)
        stop = min(hi[axis] + int(rng.integers(margin_lo, margin_hi)) + pad, label.shape[axis])
        bounds.append(slice(start, stop))
    image = ((image - image.mean()) / image.std()).astype(np.float32)
    box = tuple(bounds[:2])  # x and y only, as the official code
    return image[box], label[box]


def _read_list(path: str, cases: Sequence[str]) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"case list not found: {path}")
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise ValueError(f"case list is empty: {path}")
    unknown = [n for n in names if n not in set(cases)]
    if unknown:
        raise ValueError(f"case list {path}: case {unknown[0]!r} is not in the raw data folder")
    return names


def split_cases(cases: Sequence[str], seed: int, test_cases: Optional[int] = None,
                train_list: Optional[str] = None, test_list: Optional[str] = None) -> tuple[list[str], list[str]]:
    if (train_list is None) != (test_list is None):
        raise ValueError("give both --train-list and --test-list, or neither")
    if train_list is not None:
        train, test = _read_list(train_list, cases), _read_list(test_list, cases)
        both = sorted(set(train) & set(test))
        if both:
            raise ValueError(f"case {both[0]!r} is in both {train_list} and {test_list}")
        return train, test
    n_test = max(1, round(len(cases) / 5)) if test_cases is None else int(test_cases)
    if not 1 <= n_test < len(cases):
        raise ValueError(f"--test-cases must be in [1, {len(cases) - 1}] for {len(cases)} cases, got {n_test}")
    order = [cases[i] for i in np.random.default_rng(seed).permutation(len(cases))]
    return sorted(order[n_test:]), sorted(order[:n_test])


def prepare_la(raw: str, out: str, seed: int = 0, test_cases: Optional[int] = None,
               train_list: Optional[str] = None, test_list: Optional[str] = None, overwrite: bool = False,
               log=None) -> tuple[list[str], list[str]]:
    """Writes the listed cases of ``raw`` to ``out`` in the LA h5 layout; returns (train, test)."""
    cases = find_cases(raw)
    train, test = split_cases(cases, seed, test_cases, train_list, test_list)
    out = os.path.abspath(out)
    if os.path.commonpath([out, os.path.abspath(raw)]) == out:
        raise ValueError(f"output folder {out} must not be or contain the raw data folder")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not overwrite:
        raise ValueError(f"output folder {out} exists and is not empty (use --overwrite to replace it)")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    try:
        for case in train + test:
            image, label = read_raw_case(raw, case)
            rng = np.random.default_rng([seed, zlib.crc32(case.encode())])
            image, label = crop_case(image, label, rng)
            write_case(tmp, case, image, label)
            if log is not None:
                log(f"{case}: {image.shape}")
        for split, names in (("train", train), ("test", test)):
            with open(os.path.join(tmp, f"{split}.list"), "w") as f:
                f.write("".join(n + "\n" for n in names))
        if os.path.isdir(out):
            shutil.rmtree(out)
        elif os.path.exists(out):
            os.unlink(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return train, test


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw", required=True, help="folder of <case>/lgemri.nrrd and <case>/laendo.nrrd")
    parser.add_argument("--out", required=True, help="output folder (LA h5 layout)")
    parser.add_argument("--seed", type=int_at_least(0), default=0,
                        help="seed of the crop margins and of the split (default 0)")
    parser.add_argument("--test-cases", type=int, default=None, help="test cases of the seeded split (default: a fifth)")
    parser.add_argument("--train-list", default=None, help="train.list to use (with --test-list)")
    parser.add_argument("--test-list", default=None, help="test.list to use (with --train-list)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

    def body():
        args = parser.parse_args(argv)
        out = check_out_folder(args.out)
        train, test = prepare_la(args.raw, out, args.seed, args.test_cases, args.train_list, args.test_list,
                                 args.overwrite)
        print(f"wrote {len(train)} train and {len(test)} test cases to {out}")

    return run(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
