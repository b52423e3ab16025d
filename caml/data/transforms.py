"""Training transforms of the official LA pipeline (``RandomRotFlip``, ``RandomCrop``,
``CenterCrop``, ``ToTensor``), on samples ``{"image": ..., "label": ..., ...}``.

Arrays may be numpy arrays or torch tensors, either spatial ``[W, H, D]`` or
channel-first ``[C, W, H, D]``: transforms act on the last three axes and
apply the same geometry to image and label; other keys pass through.

Randomness comes from a ``torch.Generator`` when one is given, else from
torch's global generator, so ``torch.manual_seed`` makes runs reproducible and
each DataLoader worker (seeded by torch per worker) draws its own numbers. An explicit
generator is copied into every worker with the same state, so pass one only with
``num_workers=0`` (tests, single-process loading).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

__all__ = ["Compose", "RandomRotFlip", "RandomCrop", "CenterCrop", "ToTensor", "pad_to_size"]

SPATIAL = (-3, -2, -1)


def _randint(high: int, generator: Optional[torch.Generator]) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(high, (1,), generator=generator).item())


def _rot90(x, k: int, axes=(-3, -2)):
    if isinstance(x, torch.Tensor):
        return torch.rot90(x, k, dims=axes)
    return np.rot90(x, k, axes=axes)


def _flip(x, axis: int):
    if isinstance(x, torch.Tensor):
        return torch.flip(x, dims=(axis,))
    return np.ascontiguousarray(np.flip(x, axis=axis))


def _spatial_shape(x) -> tuple[int, int, int]:
    if x.ndim not in (3, 4):
        raise ValueError(f"expected a [W, H, D] or [C, W, H, D] array, got shape {tuple(x.shape)}")
    return tuple(int(s) for s in x.shape[-3:])


def pad_to_size(x, size: Sequence[int], value: float = 0):
    """Pads the last three axes with ``value`` up to at least ``size``, split evenly (the extra voxel after)."""
    deficits = [max(int(t) - s, 0) for s, t in zip(_spatial_shape(x), size)]
    before_after = [(d // 2, d - d // 2) for d in deficits]
    if not any(b or a for b, a in before_after):
        return x
    if isinstance(x, torch.Tensor):
        flat = [p for b, a in reversed(before_after) for p in (b, a)]  # F.pad lists the last axis first
        return torch.nn.functional.pad(x, flat, value=value)
    return np.pad(x, [(0, 0)] * (x.ndim - 3) + before_after, mode="constant", constant_values=value)


def _crop(x, start: Sequence[int], size: Sequence[int]):
    return x[(...,) + tuple(slice(b, b + s) for b, s in zip(start, size))]


def _check_pair(sample: dict) -> None:
    image_shape, label_shape = _spatial_shape(sample["image"]), _spatial_shape(sample["label"])
    if image_shape != label_shape:
        raise ValueError(f"image and label spatial shapes differ: {image_shape} vs {label_shape}")


class Compose:
    """Applies transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[dict], dict]]):
        self.transforms = list(transforms)

    def __call__(self, sample: dict) -> dict:
        for transform in self.transforms:
            sample = transform(sample)
        return sample


class RandomRotFlip:
    """Rotation by k * 90 degrees (k uniform in 0..3) in the first two spatial axes, then a flip
    of one of those two axes (the official ``random_rot_flip``). The result is always one of the
    four mirror images of the xy square, never a pure rotation, as in the official code."""

    def __init__(self, generator: Optional[torch.Generator] = None):
        self.generator = generator

    def __call__(self, sample: dict) -> dict:
        _check_pair(sample)
        k, axis = _randint(4, self.generator), SPATIAL[_randint(2, self.generator)]
        out = dict(sample)
        for key in ("image", "label"):
            out[key] = _flip(_rot90(sample[key], k), axis)
        return out


class RandomCrop:
    """Random crop of ``roi_size``; a volume smaller than the patch is first zero-padded (label 0).

    The official version pads by half the deficit plus 3 voxels whenever a side is <= the patch and
    draws starts with ``randint(0, W - w)`` (never the last position); here the padding is exactly the
    deficit and every start position is possible. Both sample the same distribution of content.
    """

    def __init__(self, roi_size: Sequence[int], generator: Optional[torch.Generator] = None):
        self.roi_size = tuple(int(s) for s in roi_size)
        if len(self.roi_size) != 3 or min(self.roi_size) < 1:
            raise ValueError(f"roi_size must be three positive ints, got {roi_size!r}")
        self.generator = generator

    def __call__(self, sample: dict) -> dict:
        _check_pair(sample)
        image, label = pad_to_size(sample["image"], self.roi_size), pad_to_size(sample["label"], self.roi_size)
        start = [_randint(s - r + 1, self.generator) for s, r in zip(_spatial_shape(image), self.roi_size)]
        return {**sample, "image": _crop(image, start, self.roi_size), "label": _crop(label, start, self.roi_size)}


class CenterCrop:
    """Central crop of ``roi_size`` (zero-padded first if smaller), as the official ``CenterCrop``."""

    def __init__(self, roi_size: Sequence[int]):
        self.roi_size = tuple(int(s) for s in roi_size)
        if len(self.roi_size) != 3 or min(self.roi_size) < 1:
            raise ValueError(f"roi_size must be three positive ints, got {roi_size!r}")

    def __call__(self, sample: dict) -> dict:
        _check_pair(sample)
        image, label = pad_to_size(sample["image"], self.roi_size), pad_to_size(sample["label"], self.roi_size)
        start = [int(round((s - r) / 2.0)) for s, r in zip(_spatial_shape(image), self.roi_size)]
        return {**sample, "image": _crop(image, start, self.roi_size), "label": _crop(label, start, self.roi_size)}


def _as_tensor(x, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    return torch.as_tensor(x).to(dtype)


class ToTensor:
    """image -> float32 tensor ``[C, W, H, D]`` (a channel axis is added to ``[W, H, D]``),
    label -> int64 tensor ``[W, H, D]``."""

    def __call__(self, sample: dict) -> dict:
        image, label = _as_tensor(sample["image"], torch.float32), _as_tensor(sample["label"], torch.int64)
        if image.ndim == 3:
            image = image.unsqueeze(0)
        return {**sample, "image": image.contiguous(), "label": label.contiguous()}
