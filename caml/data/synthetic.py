"""A synthetic left-atrium-like dataset in the LA h5 layout, deterministic per seed.

Each case is an MRI-like volume with:

- the target (label 1): an irregular blob (a few merged ellipsoids whose surface is
  deformed by a smooth random field, one lobe like the atrial appendage) with four
  curved, tapering tubes leaving it like pulmonary veins;
- distractors of similar brightness and no label: two chambers pressed against the blob
  (like the left ventricle and the right atrium, parted from it only by faint walls with
  gaps), a long vessel (like the aorta) and a few small bright blobs;
- a textured background, a thin dark wall of varying contrast, blur, a smooth
  multiplicative bias field and Gaussian noise, then z-score normalisation (as the
  official ``mri_norm2.h5``).

A brightness threshold cannot separate the target from the distractors, so a model needs
shape and context; volume shapes vary per case. Case ``i`` depends only on ``(seed, i)``.

``classes`` > 2 makes a multi-structure dataset from the same volumes: label 1 the atrium, then
2 the ventricle-like chamber, 3 the right-atrium-like chamber, 4 the aorta-like vessel (the first
``classes - 1`` of them; the small blobs stay unlabeled distractors), with a ``dataset.json`` that
declares them. The default (binary) output is unchanged by the option.

``python -m caml.data.synthetic --out DIR [--cases N] [--seed S] [--classes C]`` writes the dataset.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from ..cli import Parser, check_out_folder, int_at_least, run
from .la_h5 import case_path, write_case
from .labels import DATASET_JSON

__all__ = ["DEFAULT_MIN_SHAPE", "DEFAULT_MAX_SHAPE", "STRUCTURES", "make_case", "generate_synthetic_la",
           "ensure_synthetic_la"]

DEFAULT_MIN_SHAPE = (96, 96, 64)
DEFAULT_MAX_SHAPE = (128, 128, 80)
META_NAME = "synthetic.json"
GENERATOR_VERSION = 1
STRUCTURES = ("left atrium", "left ventricle", "right atrium", "aorta")  # labels 1 .. 4 with classes > 2


def _upsample(coarse: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Separable linear interpolation of a coarse grid onto ``shape`` (corners aligned)."""
    out = coarse
    for axis, size in enumerate(shape):
        pos = np.linspace(0.0, out.shape[axis] - 1, size, dtype=np.float32)
        lo = np.minimum(pos.astype(np.int64), out.shape[axis] - 2)
        w = (pos - lo).reshape([-1 if a == axis else 1 for a in range(out.ndim)])
        out = np.take(out, lo, axis=axis) * (1 - w) + np.take(out, lo + 1, axis=axis) * w
    return out.astype(np.float32, copy=False)


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], cells: Sequence[int]) -> np.ndarray:
    """Smooth random field, roughly unit variance, with ``cells`` random values per axis."""
    return _upsample(rng.standard_normal(tuple(cells)).astype(np.float32), shape)


def _grid(shape: Sequence[int]) -> list[np.ndarray]:
    return [np.arange(s, dtype=np.float32).reshape([-1 if a == i else 1 for a in range(3)]) for i, s in enumerate(shape)]


def _ellipsoid_level(grid, center, radii) -> np.ndarray:
    """sum(((x - c) / r)^2): < 1 inside the axis-aligned ellipsoid."""
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii))


def _random_direction(rng: np.random.Generator, mean: np.ndarray, spread: float) -> np.ndarray:
    d = mean / np.linalg.norm(mean) + spread * rng.standard_normal(3)
    return d / np.linalg.norm(d)


def _tube(rng, shape, start, direction, length, radius0, radius1, curl=0.12) -> np.ndarray:
    """Mask of a curved tube: a smooth random walk from ``start``, radius tapering radius0 -> radius1."""
    steps = max(int(length), 2)
    points, radii = np.empty((steps, 3), np.float32), np.linspace(radius0, radius1, steps, dtype=np.float32)
    p, d = np.asarray(start, np.float64), np.asarray(direction, np.float64)
    for i in range(steps):
        points[i] = p
        d = _random_direction(rng, d, curl)
        p = p + d
    mask = np.zeros(shape, bool)
    r_max = float(radii.max())
    lo = np.maximum(np.floor(points.min(0) - r_max - 1), 0).astype(int)
    hi = np.minimum(np.ceil(points.max(0) + r_max + 2), shape).astype(int)
    if np.any(hi <= lo):
        return mask
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub = _grid(hi - lo)
    inside = np.zeros(tuple(hi - lo), bool)
    for point, r in zip(points - lo, radii):
        inside |= sum((g - c) ** 2 for g, c in zip(sub, point)) <= r * r
    mask[box] = inside
    return mask


def make_case(rng: np.random.Generator, shape: Sequence[int], classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic case: (image float32 [W, H, D] z-scored, label uint8 [W, H, D] 0 .. classes - 1,
    class c the structure ``STRUCTURES[c - 1]``)."""
    if not 2 <= classes <= len(STRUCTURES) + 1:
        raise ValueError(f"classes must be 2 .. {len(STRUCTURES) + 1}, got {classes}")
    shape = tuple(int(s) for s in shape)
    size = np.asarray(shape, np.float32)
    grid = _grid(shape)
    u = rng.uniform

    # Target: merged ellipsoids with a smoothly deformed surface.
    center = size * np.array([0.5, 0.52, 0.5]) + size * u(-0.06, 0.06, 3)
    radii = size * np.array([u(0.19, 0.26), u(0.17, 0.23), u(0.24, 0.34)])
    level = _ellipsoid_level(grid, center, radii)
    lobe_offset = radii * np.array([u(0.5, 0.8), u(-0.9, -0.6), u(-0.2, 0.3)])  # an appendage-like lobe
    level = np.minimum(level, _ellipsoid_level(grid, center + lobe_offset, radii * np.array([0.35, 0.3, 0.45])))
    level = np.minimum(level, _ellipsoid_level(grid, center + radii * u(-0.4, 0.4, 3), radii * u(0.6, 0.85, 3)))
    level = level * (1.0 + 0.25 * _smooth_field(rng, shape, (5, 5, 4)))
    target = level < 1.0
    wall = (level >= 1.0) & (level < 1.0 + u(0.2, 0.35))

    # Pulmonary-vein-like tubes: two to each side, leaving backwards and up or down.
    tube_scale = float(size[:2].mean()) / 112.0
    for side in (-1.0, 1.0):
        for vertical in (-1.0, 1.0):
            direction = _random_direction(rng, np.array([side, u(0.2, 0.7), vertical * u(0.2, 0.6)]), 0.15)
            start = center + 0.6 * radii * direction
            length = u(0.2, 0.4) * size[0]
            target |= _tube(rng, shape, start, direction, length,
                            u(2.5, 4.5) * tube_scale, u(1.5, 2.5) * tube_scale)

    # Distractors: two chambers pressed against the target (like the left ventricle and the right
    # atrium, each with its own wall), a long vessel (like the aorta), small bright blobs.
    distractor = np.zeros(shape, bool)
    structures = [target]  # in label order (STRUCTURES)
    side = rng.choice([-1.0, 1.0])
    for offset in (np.array([u(-0.6, 0.2), u(-1.7, -1.3), u(-0.9, -0.4)]),
                   np.array([side * u(1.5, 1.9), u(-0.6, 0.3), u(-0.5, 0.5)])):
        chamber_level = _ellipsoid_level(grid, center + radii * offset, radii * u(0.75, 1.2, 3))
        structures.append(chamber_level < 1.0)
        distractor |= structures[-1]
        wall |= (chamber_level >= 1.0) & (chamber_level < 1.0 + u(0.15, 0.3))
    vessel_start = np.array([center[0] + u(-0.5, 0.5) * radii[0], center[1] + u(1.2, 1.6) * radii[1], 0.0])
    structures.append(_tube(rng, shape, vessel_start, np.array([u(-0.2, 0.2), u(-0.2, 0.2), 1.0]), size[2] * 1.2,
                            u(5.0, 8.0) * tube_scale, u(4.0, 6.0) * tube_scale, curl=0.05))
    distractor |= structures[-1]
    for _ in range(int(rng.integers(2, 5))):
        distractor |= _ellipsoid_level(grid, size * u(0.1, 0.9, 3), size * u(0.03, 0.07, 3)) < 1.0
    distractor &= ~target
    wall &= ~(target | distractor)

    # Intensities: blood pools of similar, uneven brightness, a dark wall with gaps, textured tissue.
    blood = u(0.8, 1.0)
    image = u(0.3, 0.45) + 0.08 * _smooth_field(rng, shape, (12, 12, 8))
    image[distractor] = (blood * u(0.92, 1.08) + 0.1 * _smooth_field(rng, shape, (8, 8, 6)))[distractor]
    image[target] = (blood + 0.1 * _smooth_field(rng, shape, (8, 8, 6)))[target]
    wall_darkening = np.clip(u(0.1, 0.5) + 0.5 * _smooth_field(rng, shape, (8, 8, 6)), 0.0, 1.0)
    image[wall] *= 1.0 - wall_darkening[wall]
    image = ndimage.gaussian_filter(image, sigma=u(0.6, 1.0))
    image *= np.exp(0.25 * _smooth_field(rng, shape, (3, 3, 3)))
    image += u(0.08, 0.16) * rng.standard_normal(shape, dtype=np.float32)
    image = (image - image.mean()) / image.std()
    label = np.zeros(shape, np.uint8)
    for c in range(classes - 1, 0, -1):  # the atrium last: it wins where structures overlap, as in the image
        label[structures[c - 1]] = c
    return image.astype(np.float32), label


def _case_shape(rng: np.random.Generator, min_shape, max_shape) -> tuple[int, int, int]:
    return tuple(int(rng.integers(lo, hi + 1)) for lo, hi in zip(min_shape, max_shape))


def _check_shapes(min_shape, max_shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
    min_shape, max_shape = tuple(int(s) for s in min_shape), tuple(int(s) for s in max_shape)
    if len(min_shape) != 3 or len(max_shape) != 3 or min(min_shape) < 16 or any(
            a > b for a, b in zip(min_shape, max_shape)):
        raise ValueError(f"min_shape and max_shape must be three sizes >= 16 with min <= max, "
                         f"got {min_shape} and {max_shape}")
    return min_shape, max_shape


def generate_synthetic_la(out: str, cases: int = 20, seed: int = 0, test_cases: Optional[int] = None,
                          min_shape: Sequence[int] = DEFAULT_MIN_SHAPE,
                          max_shape: Sequence[int] = DEFAULT_MAX_SHAPE, classes: int = 2) -> str:
    """Writes ``cases`` synthetic cases to ``out`` in the LA h5 layout; returns ``out``.

    The last ``test_cases`` cases (default: a fifth, at least one) form ``test.list``, the others
    ``train.list``. Each case's shape is drawn in ``[min_shape, max_shape]`` (inclusive).
    ``synthetic.json`` records the parameters; it and the lists are written last (after the
    ``dataset.json`` of ``classes`` > 2).
    """
    min_shape, max_shape = _check_shapes(min_shape, max_shape)
    test_cases = max(1, round(cases / 5)) if test_cases is None else int(test_cases)
    if cases < 2 or not 1 <= test_cases < cases:
        raise ValueError(f"need cases >= 2 and 1 <= test_cases < cases, got cases={cases}, test_cases={test_cases}")
    names = [f"synth_{i:03d}" for i in range(cases)]
    for i, name in enumerate(names):
        rng = np.random.default_rng([seed, i])
        write_case(out, name, *make_case(rng, _case_shape(rng, min_shape, max_shape), classes))
    if classes > 2:
        with open(os.path.join(out, DATASET_JSON), "w") as f:
            json.dump({"name": "synthetic heart structures",
                       "labels": {"0": "background", **{str(c): STRUCTURES[c - 1] for c in range(1, classes)}}}, f,
                      indent=2)
    for split, split_names in (("train", names[:-test_cases]), ("test", names[-test_cases:])):
        with open(os.path.join(out, f"{split}.list"), "w") as f:
            f.write("".join(n + "\n" for n in split_names))
    with open(os.path.join(out, META_NAME), "w") as f:
        json.dump(_meta(cases, seed, test_cases, min_shape, max_shape, classes), f, indent=2)
    return out


def _meta(cases, seed, test_cases, min_shape, max_shape, classes: int = 2) -> dict:
    meta = {"generator": "caml.data.synthetic", "version": GENERATOR_VERSION, "cases": cases, "seed": seed,
            "test_cases": test_cases, "min_shape": list(min_shape), "max_shape": list(max_shape)}
    return meta if classes == 2 else {**meta, "classes": classes}  # the binary record as it always was


def ensure_synthetic_la(out: str, cases: int = 20, seed: int = 0, test_cases: Optional[int] = None,
                        min_shape: Sequence[int] = DEFAULT_MIN_SHAPE,
                        max_shape: Sequence[int] = DEFAULT_MAX_SHAPE) -> str:
    """``out`` holding the synthetic dataset of these parameters, generated unless already there."""
    min_shape, max_shape = _check_shapes(min_shape, max_shape)
    test_cases = max(1, round(cases / 5)) if test_cases is None else int(test_cases)
    try:
        with open(os.path.join(out, META_NAME)) as f:
            complete = json.load(f) == _meta(cases, seed, test_cases, min_shape, max_shape) and all(
                os.path.isfile(case_path(out, f"synth_{i:03d}")) for i in range(cases))
    except (OSError, ValueError):
        complete = False
    if not complete:
        generate_synthetic_la(out, cases, seed, test_cases, min_shape, max_shape)
    return out


PROG = "python -m caml.data.synthetic"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (LA h5 layout)")
    parser.add_argument("--cases", type=int_at_least(2), default=20, help="number of cases (default 20)")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="random seed (default 0)")
    parser.add_argument("--test-cases", type=int_at_least(1), default=None, help="cases in test.list (default: a fifth)")
    parser.add_argument("--min-shape", type=int_at_least(16), nargs=3, default=DEFAULT_MIN_SHAPE, metavar=("W", "H", "D"))
    parser.add_argument("--max-shape", type=int_at_least(16), nargs=3, default=DEFAULT_MAX_SHAPE, metavar=("W", "H", "D"))
    parser.add_argument("--classes", type=int, choices=range(2, len(STRUCTURES) + 2), default=2, metavar="C",
                        help=f"classes, background included (default 2: the atrium alone; up to "
                        f"{len(STRUCTURES) + 1}: also {', '.join(STRUCTURES[1:])})")

    def body():
        args = parser.parse_args(argv)
        out = check_out_folder(args.out)
        start = time.perf_counter()
        generate_synthetic_la(out, args.cases, args.seed, args.test_cases, args.min_shape, args.max_shape,
                              args.classes)
        print(f"wrote {args.cases} synthetic cases to {out} in {time.perf_counter() - start:.1f} s")

    return run(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
