"""Sliding-window prediction as the official LA evaluation (``test_single_case``), batched.

The volume is zero-padded (evenly, the extra voxel after) where it is smaller than the
patch; along each axis the windows start at ``min(i * stride, size - patch)`` for
``i in range(ceil((size - patch) / stride) + 1)``; the softmax scores of overlapping
windows are averaged; the result is cropped back to the input size. Windows go to the
predictor ``sw_batch_size`` at a time, and scores accumulate on the predictor's device.
``predict_classes`` is how ``caml.train`` and ``caml.evaluate`` predict a test case with a model.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .precision import autocast_dtype

__all__ = ["OFFICIAL_ROI_SIZE", "OFFICIAL_STRIDES", "window_starts", "sliding_window_predict", "predict_classes",
           "largest_component", "largest_components"]

OFFICIAL_ROI_SIZE = (112, 112, 80)
OFFICIAL_STRIDES = (18, 18, 4)

Predictor = Callable[[torch.Tensor], Union[torch.Tensor, Sequence[torch.Tensor]]]


def window_starts(size: int, roi: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis of (padded) length ``size >= roi``."""
    count = math.ceil((size - roi) / stride) + 1
    return [min(i * stride, size - roi) for i in range(count)]


def _device_of(predictor, image: torch.Tensor) -> torch.device:
    parameter = next(predictor.parameters(), None) if isinstance(predictor, torch.nn.Module) else None
    return parameter.device if parameter is not None else image.device


@torch.no_grad()
def sliding_window_predict(
    image: Union[np.ndarray, torch.Tensor],
    predictor: Predictor,
    roi_size: Sequence[int] = OFFICIAL_ROI_SIZE,
    strides: Sequence[int] = OFFICIAL_STRIDES,
    sw_batch_size: int = 4,
    device: Optional[Union[str, torch.device]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities and labels of one volume.

    Args:
        image: ``[W, H, D]`` or channel-first ``[C, W, H, D]`` (numpy or torch).
        predictor: maps ``[b, C, *roi_size]`` float32 to logits ``[b, num_classes, *roi_size]``;
            a model returning a tuple/list (as the official ones do) is read by its first
            element. Put a model in ``eval()`` mode first.
        roi_size: window (patch) size; strides: window step per axis.
        sw_batch_size: windows per predictor call.
        device: where windows and scores live; default: the predictor's parameters' device
            if it is an ``nn.Module``, else the image's.

    Returns:
        ``(probs [num_classes, W, H, D] float32, labels [W, H, D] int64)`` on that device;
        labels are the argmax of the averaged probabilities (for two classes: foreground
        where its probability exceeds 0.5, as the official code).
    """
    image = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else torch.as_tensor(image)
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4:
        raise ValueError(f"image must be [W, H, D] or [C, W, H, D], got shape {tuple(image.shape)}")
    roi_size, strides = tuple(int(r) for r in roi_size), tuple(int(s) for s in strides)
    if len(roi_size) != 3 or len(strides) != 3 or min(roi_size) < 1 or min(strides) < 1:
        raise ValueError(f"roi_size and strides must be three positive ints, got {roi_size} and {strides}")
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    device = torch.device(device) if device is not None else _device_of(predictor, image)
    image = image.to(device=device, dtype=torch.float32)

    size = tuple(image.shape[1:])
    deficits = [max(r - s, 0) for s, r in zip(size, roi_size)]
    before = [d // 2 for d in deficits]
    pad = [p for d, b in zip(reversed(deficits), reversed(before)) for p in (b, d - b)]  # last axis first
    padded = F.pad(image, pad) if any(deficits) else image
    padded_size = tuple(padded.shape[1:])

    corners = [(x, y, z) for x in window_starts(padded_size[0], roi_size[0], strides[0])
               for y in window_starts(padded_size[1], roi_size[1], strides[1])
               for z in window_starts(padded_size[2], roi_size[2], strides[2])]
    scores: Optional[torch.Tensor] = None
    counts = torch.zeros((1,) + padded_size, dtype=torch.float32, device=device)
    for first in range(0, len(corners), sw_batch_size):
        batch_corners = corners[first:first + sw_batch_size]
        windows = [tuple(slice(c, c + r) for c, r in zip(corner, roi_size)) for corner in batch_corners]
        logits = predictor(torch.stack([padded[(slice(None),) + w] for w in windows]))
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        if logits.ndim != 5 or logits.shape[0] != len(windows) or tuple(logits.shape[2:]) != roi_size:
            raise ValueError(f"predictor must return logits [b, num_classes, *roi_size] with b = {len(windows)}, "
                             f"roi_size = {roi_size}; got {tuple(logits.shape)}")
        probs = torch.softmax(logits.float(), dim=1).to(device)
        if scores is None:
            scores = torch.zeros((probs.shape[1],) + padded_size, dtype=torch.float32, device=device)
        for window, prob in zip(windows, probs):
            scores[(slice(None),) + window] += prob
            counts[(slice(None),) + window] += 1
    scores /= counts
    crop = (slice(None),) + tuple(slice(b, b + s) for b, s in zip(before, size))
    probs = scores[crop].contiguous()
    return probs, probs.max(dim=0).indices  # argmax's first maximum; argmax over dim 0 is 40x slower on a CPU


def predict_classes(model: torch.nn.Module, image: np.ndarray, roi_size: Sequence[int], strides: Sequence[int],
                    sw_batch_size: int, device: torch.device, amp: bool) -> tuple[torch.Tensor, np.ndarray]:
    """:func:`sliding_window_predict` of a model (in eval mode), with ``amp`` under bf16 autocast where the
    device computes bf16 natively (a GPU, or a CPU with AVX512-BF16 / AMX: :mod:`caml.precision`):
    ``(probs [num_classes, W, H, D] on the device, classes [W, H, D] numpy uint8)`` (binary: 1 is foreground)."""
    dtype = autocast_dtype(device, amp, cpu_amp=amp)
    with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        probs, labels = sliding_window_predict(image, model, roi_size, strides, sw_batch_size, device)
    return probs, labels.to(torch.uint8).cpu().numpy()


def largest_component(mask) -> np.ndarray:
    """The largest connected component of a binary mask (full 26-connectivity in 3D, as skimage's
    ``label`` in the official test script's ``getLargestCC``); an empty mask is returned as is."""
    from scipy import ndimage

    mask = np.asarray(mask).astype(bool)
    components, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if count <= 1:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(sizes.argmax())


def largest_components(classes: np.ndarray) -> np.ndarray:
    """A class map with each foreground class reduced to its largest connected component (the other
    voxels of the class become background); for two classes, :func:`largest_component`."""
    kept = np.zeros_like(classes)
    for c in np.unique(classes[classes > 0]):
        kept[largest_component(classes == c)] = c
    return kept
