"""Intensity normalisation of NIfTI images, channel by channel (``--intensity``, ``--window``).

- ``zscore`` (default): ``(x - mean) / std`` over the channel's volume, as the LA pipeline normalises
  its MRI (a constant channel becomes zeros).
- ``ct``: CT windowing: clip to ``window = (low, high)`` (Hounsfield units), then scale linearly to
  [0, 1] (``low`` -> 0, ``high`` -> 1), as the MC-Net / UA-MT pancreas CT pipelines do (window
  [-125, 275]). nnU-Net's CT scheme also clips to a window (the 0.5 and 99.5 percentiles of the
  dataset's foreground voxels) but then z-scores with the foreground's mean and std: for its numbers,
  pass those percentiles as ``--window``; the [0, 1] scaling differs from it by an affine map only.

One scheme applies to every channel, or one scheme per channel (in channel order), e.g. ``ct zscore``
for CT + PET. No torch here: the normalisation runs in data-loader workers on numpy arrays.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..config import intensity_problem

__all__ = ["Intensity", "zscore", "ct_window"]


def zscore(image: np.ndarray) -> np.ndarray:
    """(image - mean) / std over the volume, float32 (a constant volume becomes zeros)."""
    image = np.asarray(image, dtype=np.float32)
    std = float(image.std())
    return ((image - image.mean()) / (std if std > 0 else 1.0)).astype(np.float32, copy=False)


def ct_window(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """``image`` clipped to [low, high] and scaled to [0, 1], float32."""
    clipped = np.clip(np.asarray(image, dtype=np.float64), low, high)
    return ((clipped - low) / (high - low)).astype(np.float32)


@dataclass(frozen=True)
class Intensity:
    """The normalisation of each channel: ``schemes`` (one for all channels, or one per channel) and
    the CT ``window`` (needed by ``ct``, else None)."""

    schemes: tuple[str, ...] = ("zscore",)
    window: Optional[tuple[float, float]] = None

    def __post_init__(self):
        problem = intensity_problem(self.schemes, self.window)
        if problem is not None:
            raise ValueError(f"intensity {problem[0]} {problem[1]}, got schemes {self.schemes} window {self.window}")

    def per_channel(self, channels: int, where: str) -> tuple[str, ...]:
        """The scheme of each of ``channels`` channels (ValueError naming ``where`` if the counts differ)."""
        if len(self.schemes) == 1:
            return self.schemes * channels
        if len(self.schemes) != channels:
            raise ValueError(f"--intensity gives {len(self.schemes)} schemes, but {where} has {channels} "
                             f"image channel(s) (give one scheme, or one per channel)")
        return self.schemes

    def settings(self) -> dict:
        """What the normalised voxels depend on (part of the decoded-volume cache's key)."""
        window = None if self.window is None else [float(v) for v in self.window]
        return {"schemes": list(self.schemes), "window": window}

    def __call__(self, channels: Sequence[np.ndarray], where: str) -> np.ndarray:
        """The channels normalised: ``[X, Y, Z]`` for one channel, ``[C, X, Y, Z]`` for several (float32)."""
        normalised = [zscore(x) if scheme == "zscore" else ct_window(x, *self.window)
                      for x, scheme in zip(channels, self.per_channel(len(channels), where))]
        return normalised[0] if len(normalised) == 1 else np.stack(normalised)
