"""Segmentation metrics with the definitions of ``medpy.metric.binary`` (the
numbers the semi-supervised LA literature reports): ``dc``, ``jc``, ``hd95``
and ``asd``.

Masks are binary: any nonzero voxel is foreground. Inputs may be numpy arrays
or torch tensors (any device) of the same shape, 2D or 3D. ``spacing`` is the
voxel size per axis (a number or one value per axis; ``None`` means 1), so
distances come out in the units of the spacing (voxels by default, as the
official CAML evaluation reports them).

Surface distances follow medpy exactly: a mask's surface is the mask minus its
binary erosion with connectivity 1 (faces only; voxels on the volume border
count as surface), and a surface voxel's distance is the Euclidean distance
transform (with spacing) to the nearest surface voxel of the other mask.
The distance transform runs on the joint bounding box of both masks plus a
one-voxel margin, which gives the same numbers as on the whole volume.

Empty masks (where medpy's dc returns 0 for two empty masks and its distances
raise RuntimeError):

- ``dice`` and ``jaccard``: 0 when exactly one mask is empty, 1 when both are
  (perfect agreement on "nothing here").
- ``hd95`` and ``asd``: ``nan`` when either mask is empty (no surface to
  measure from or to); average per-case results with ``numpy.nanmean``
  and report how many cases were empty.

The official CAML/MC-Net evaluation instead scores an empty prediction as
(dice, jaccard, hd95, asd) = (0, 0, 0, 0), which makes its distance means
flattering; ``nan`` keeps such cases out of the distance means instead.

``SegmentationMetrics`` gathers the per-case metrics of a set of cases and summarises them, as
MONAI's metric classes go with its functions: call it once per case, ``aggregate()`` at the end.
Given class names it scores label maps of several classes: each foreground class ``c`` as the
binary pair ``(pred == c, gt == c)``, a case's metric is the mean over the foreground classes
(distances: over those whose value is not nan), and the summary has, per class, the mean over
cases and, per metric, the mean of those class means (as multi-class papers report them).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
from scipy import ndimage

Spacing = Optional[Union[float, Sequence[float]]]

__all__ = ["METRICS", "dice", "jaccard", "hd95", "asd", "surface_distances", "case_metrics", "SegmentationMetrics",
           "summarize_runs"]

METRICS = ("dice", "jaccard", "hd95", "asd")


def _as_array(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _as_bool_array(mask) -> np.ndarray:
    return _as_array(mask).astype(bool, copy=False)


def _pair(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = _as_bool_array(pred), _as_bool_array(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same shape, got {pred.shape} and {gt.shape}")
    return pred, gt


def _spacing(spacing: Spacing, ndim: int) -> Optional[np.ndarray]:
    if spacing is None:
        return None
    values = np.asarray(spacing, dtype=np.float64)
    if values.ndim == 0:
        values = np.full(ndim, float(values))
    if values.shape != (ndim,) or not np.all(values > 0):
        raise ValueError(f"spacing must be a positive number or {ndim} positive numbers, got {spacing!r}")
    return np.ascontiguousarray(values)


def dice(pred, gt) -> float:
    """Dice coefficient 2|P & G| / (|P| + |G|) (medpy ``dc``); 1 if both are empty."""
    pred, gt = _pair(pred, gt)
    total = np.count_nonzero(pred) + np.count_nonzero(gt)
    if total == 0:
        return 1.0
    return 2.0 * np.count_nonzero(pred & gt) / total


def jaccard(pred, gt) -> float:
    """Jaccard index |P & G| / |P | G| (medpy ``jc``); 1 if both are empty."""
    pred, gt = _pair(pred, gt)
    union = np.count_nonzero(pred | gt)
    if union == 0:
        return 1.0
    return np.count_nonzero(pred & gt) / union


def _crop_to_masks(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to their joint bounding box plus one voxel (clipped at the volume border)."""
    nonzero = np.nonzero(pred | gt)
    box = tuple(slice(max(int(idx.min()) - 1, 0), int(idx.max()) + 2) for idx in nonzero)
    return pred[box], gt[box]


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=structure, iterations=1)


def _directed_distances(src_surface: np.ndarray, dst_surface: np.ndarray, spacing) -> np.ndarray:
    distance_to_dst = ndimage.distance_transform_edt(~dst_surface, sampling=spacing)
    return distance_to_dst[src_surface]


def surface_distances(pred, gt, spacing: Spacing = None) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (pred surface -> gt surface, gt surface -> pred surface).

    Raises ValueError if either mask is empty (there is no surface).
    """
    pred, gt = _pair(pred, gt)
    sampling = _spacing(spacing, pred.ndim)
    if not pred.any() or not gt.any():
        raise ValueError("surface distances need a nonempty pred and gt")
    pred, gt = _crop_to_masks(pred, gt)
    pred_surface, gt_surface = _surface(pred), _surface(gt)
    return (_directed_distances(pred_surface, gt_surface, sampling),
            _directed_distances(gt_surface, pred_surface, sampling))


def _distance_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Spacing) -> tuple[float, float]:
    """(hd95, asd) of boolean masks; (nan, nan) if either is empty."""
    if not pred.any() or not gt.any():
        _spacing(spacing, pred.ndim)  # still reject a malformed spacing
        return float("nan"), float("nan")
    to_gt, to_pred = surface_distances(pred, gt, spacing)
    return float(np.percentile(np.concatenate((to_gt, to_pred)), 95)), float(to_gt.mean())


def hd95(pred, gt, spacing: Spacing = None) -> float:
    """95th percentile of both directed surface distance sets together (medpy ``hd95``); nan if either is empty."""
    return _distance_metrics(*_pair(pred, gt), spacing)[0]


def asd(pred, gt, spacing: Spacing = None) -> float:
    """Mean distance from pred's surface to gt's surface (medpy ``asd``, not symmetric); nan if either is empty."""
    return _distance_metrics(*_pair(pred, gt), spacing)[1]


def case_metrics(pred, gt, spacing: Spacing = None) -> dict[str, float]:
    """``{"dice", "jaccard", "hd95", "asd"}`` for one case (empty masks as in the module docstring)."""
    pred, gt = _pair(pred, gt)
    hd95_value, asd_value = _distance_metrics(pred, gt, spacing)
    return {"dice": dice(pred, gt), "jaccard": jaccard(pred, gt), "hd95": hd95_value, "asd": asd_value}


def _mean(values: list[float]) -> float:
    """The mean of the values that are not nan (nan if none is)."""
    return float(np.nanmean(values)) if any(not math.isnan(v) for v in values) else float("nan")


class SegmentationMetrics:
    """The metrics of every case scored so far, and their summary.

    ``distances=False`` scores Dice alone (cheap: the validation during training). ``classes``: the
    names of the foreground classes 1 .. C-1 of multi-class label maps (None: binary masks, any
    nonzero voxel foreground).
    """

    def __init__(self, distances: bool = True, classes: Optional[Sequence[str]] = None):
        self.distances = distances
        self.names = METRICS if distances else ("dice",)
        self.classes = None if classes is None else list(classes)
        self.cases: dict[str, dict] = {}

    def _binary(self, pred, gt, spacing: Spacing) -> dict[str, float]:
        return case_metrics(pred, gt, spacing) if self.distances else {"dice": dice(pred, gt)}

    def __call__(self, case: str, pred, gt, spacing: Spacing = None) -> dict:
        """Scores one case (kept under its name) and returns its metrics (multi-class: the means over
        the foreground classes and ``"classes": {name: {<metric>: value}}``)."""
        if self.classes is None:
            values = self._binary(pred, gt, spacing)
        else:
            pred, gt = _as_array(pred), _as_array(gt)
            per_class = {name: self._binary(pred == c, gt == c, spacing) for c, name in enumerate(self.classes, 1)}
            values = {**_means(per_class.values(), self.names), "classes": per_class}
        self.cases[case] = values
        return values

    def aggregate(self) -> dict:
        """``{<metric>: mean, "cases": {case: {<metric>: value}}, "num_cases"}``; with distances also
        ``"distance_nan_cases"``, the cases with an empty mask (multi-class: of any class), which the
        distance means leave out; multi-class also ``"classes": {name: {<metric>: mean over cases}}``,
        and ``<metric>`` is the mean over those."""
        if self.classes is None:
            summary = _means(self.cases.values(), self.names)
        else:
            per_class = {name: _means([v["classes"][name] for v in self.cases.values()], self.names)
                         for name in self.classes}
            summary = {**_means(per_class.values(), self.names), "classes": per_class}
        summary.update(cases=dict(self.cases), num_cases=len(self.cases))
        if self.distances:
            summary["distance_nan_cases"] = [case for case, v in self.cases.items() if _has_nan_distance(v)]
        return summary


def _means(rows, names: Sequence[str]) -> dict[str, float]:
    rows = list(rows)
    return {name: _mean([row[name] for row in rows]) for name in names}


def _has_nan_distance(values: dict) -> bool:
    per_class = values["classes"].values() if "classes" in values else [values]
    return any(math.isnan(v["hd95"]) for v in per_class)
def _sample_std(values: list[float]) -> float:
    """The sample standard deviation (n - 1) of the values that are not nan (nan if fewer than two are)."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.std(finite, ddof=1)) if len(finite) > 1 else float("nan")


def summarize_runs(runs: dict[str, dict]) -> dict:
    """Mean and sample standard deviation over runs (name -> their test metrics, e.g. one per seed) of
    each metric's mean: ``{"runs": {name: {<metric>: value}}, "mean": {...}, "std": {...}, "n": {...}}``;
    a run whose value is nan (no distance: an empty mask) is left out of that metric's numbers (``n``)."""
    return {
        "runs": {name: {k: m[k] for k in METRICS + ("folder",) if k in m} for name, m in runs.items()},
        "mean": {k: _mean([m[k] for m in runs.values()]) for k in METRICS},
        "std": {k: _sample_std([m[k] for m in runs.values()]) for k in METRICS},
        "n": {k: sum(not math.isnan(m[k]) for m in runs.values()) for k in METRICS},
        "std_is": "sample standard deviation (n - 1) over the runs",
    }
