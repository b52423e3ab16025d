"""caml.metrics against medpy.metric.binary (dc, jc, hd95, asd), the definitions the field reports,
and against an independent brute-force version (face-neighbour surfaces, k-d tree distances) so the
checks still run where medpy is not installed."""
import math
import types

import numpy as np
import pytest
import torch
from scipy import ndimage, spatial

from caml import metrics

try:
    from medpy.metric import binary as medpy_binary
except ImportError:  # medpy is optional; the brute-force reference below always runs
    medpy_binary = None


def _brute_surface(mask):
    padded = np.pad(mask, 1)
    interior = mask.copy()
    for axis in range(mask.ndim):
        for step in (-1, 1):
            interior &= np.roll(padded, step, axis=axis)[tuple(slice(1, -1) for _ in range(mask.ndim))]
    return mask & ~interior


def _brute_directed(src, dst, spacing):
    scale = np.ones(src.ndim) if spacing is None else np.broadcast_to(np.asarray(spacing, float), (src.ndim,))
    src_points = np.argwhere(_brute_surface(src)) * scale
    dst_points = np.argwhere(_brute_surface(dst)) * scale
    return spatial.cKDTree(dst_points).query(src_points)[0]


def _brute_hd95(pred, gt, voxelspacing=None):
    both = np.concatenate((_brute_directed(pred, gt, voxelspacing), _brute_directed(gt, pred, voxelspacing)))
    return np.percentile(both, 95)


brute_force = types.SimpleNamespace(
    dc=lambda p, g: 2 * np.count_nonzero(p & g) / (np.count_nonzero(p) + np.count_nonzero(g)),
    jc=lambda p, g: np.count_nonzero(p & g) / np.count_nonzero(p | g),
    hd95=_brute_hd95,
    asd=lambda p, g, voxelspacing=None: _brute_directed(p, g, voxelspacing).mean(),
)


@pytest.fixture(params=["medpy", "brute_force"])
def reference(request):
    if request.param == "medpy":
        if medpy_binary is None:
            pytest.skip("medpy not installed")
        return medpy_binary
    return brute_force


def random_blobs(shape, seed, threshold=0.6, sigma=2.0):
    """Irregular binary blobs: smoothed noise above a quantile."""
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), sigma)
    return noise > np.quantile(noise, threshold)


PAIRS = [
    ((24, 20, 16), 0),
    ((17, 23, 11), 1),
    ((30, 31), 2),  # 2D works too
]
SPACINGS = [None, 0.625, (1.0, 1.0, 1.0), (0.7, 1.3, 2.5)]


@pytest.mark.parametrize("shape,seed", PAIRS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_matches_reference(shape, seed, spacing, reference):
    if spacing is not None and np.ndim(spacing) == 1 and len(spacing) != len(shape):
        spacing = spacing[: len(shape)]
    pred, gt = random_blobs(shape, seed), random_blobs(shape, seed + 100, threshold=0.55)
    got = metrics.case_metrics(pred, gt, spacing=spacing)
    assert got["dice"] == pytest.approx(reference.dc(pred, gt), abs=1e-12)
    assert got["jaccard"] == pytest.approx(reference.jc(pred, gt), abs=1e-12)
    assert got["hd95"] == pytest.approx(reference.hd95(pred, gt, voxelspacing=spacing), abs=1e-9)
    assert got["asd"] == pytest.approx(reference.asd(pred, gt, voxelspacing=spacing), abs=1e-9)
    assert metrics.hd95(pred, gt, spacing) == got["hd95"]
    assert metrics.asd(pred, gt, spacing) == got["asd"]
    assert metrics.dice(pred, gt) == got["dice"] and metrics.jaccard(pred, gt) == got["jaccard"]


def test_small_objects_far_from_border_and_touching_it(reference):
    """The bounding-box crop must not change anything: objects inside, at the volume border, far apart."""
    pred = np.zeros((40, 36, 20), bool)
    gt = np.zeros_like(pred)
    pred[0:6, 3:9, 0:4] = True  # touches three faces of the volume
    pred[30:33, 30:36, 15:20] = True
    gt[2:9, 4:8, 1:5] = True
    gt[20, 20, 10] = True  # a single voxel
    for spacing in (None, (0.5, 2.0, 3.0)):
        assert metrics.hd95(pred, gt, spacing) == pytest.approx(reference.hd95(pred, gt, spacing), abs=1e-9)
        assert metrics.asd(pred, gt, spacing) == pytest.approx(reference.asd(pred, gt, spacing), abs=1e-9)
        assert metrics.asd(gt, pred, spacing) == pytest.approx(reference.asd(gt, pred, spacing), abs=1e-9)


def test_identical_masks_and_known_shift():
    gt = np.zeros((20, 20, 20), bool)
    gt[5:15, 5:15, 5:15] = True
    assert metrics.case_metrics(gt, gt) == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}
    shifted = np.roll(gt, 2, axis=0)
    assert metrics.hd95(shifted, gt, spacing=(1.5, 1, 1)) == pytest.approx(3.0)


def test_torch_and_label_inputs():
    pred, gt = random_blobs((16, 16, 12), 3), random_blobs((16, 16, 12), 4)
    expected = metrics.case_metrics(pred, gt)
    as_torch = metrics.case_metrics(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(gt.astype(np.uint8)))
    assert as_torch == expected
    assert metrics.dice(pred.astype(np.float32) * 3, gt) == expected["dice"]  # nonzero = foreground


def test_empty_masks():
    empty = np.zeros((10, 10, 10), bool)
    full = empty.copy()
    full[2:5, 2:5, 2:5] = True
    for pred, gt in ((empty, full), (full, empty)):
        got = metrics.case_metrics(pred, gt)
        assert got["dice"] == 0.0 and got["jaccard"] == 0.0
        assert math.isnan(got["hd95"]) and math.isnan(got["asd"])
    both = metrics.case_metrics(empty, empty, spacing=0.5)
    assert both["dice"] == 1.0 and both["jaccard"] == 1.0
    assert math.isnan(both["hd95"]) and math.isnan(both["asd"])
    with pytest.raises(ValueError, match="nonempty"):
        metrics.surface_distances(empty, full)


def test_bad_inputs():
    a = np.ones((4, 4, 4), bool)
    with pytest.raises(ValueError, match="same shape"):
        metrics.dice(a, np.ones((4, 4, 5), bool))
    with pytest.raises(ValueError, match="spacing"):
        metrics.hd95(a, a, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        metrics.asd(a, a, spacing=(1.0, 0.0, 1.0))
