"""The sigmoid ramp-up of the unsupervised loss weights (plain Python: the config reads it too)."""
from __future__ import annotations

import math

__all__ = ["OFFICIAL_RAMPUP", "sigmoid_rampup", "official_rampup_length"]

# Official ramp-up lengths (in units of rampup_interval iterations) for 4 / 8 / 16 labeled LA cases.
OFFICIAL_RAMPUP = {4: 40.0, 8: 20.0, 16: 15.0}


def sigmoid_rampup(current: float, rampup_length: float) -> float:
    """``exp(-5 (1 - clip(current, 0, L) / L)^2)``, 1 for L = 0 (Laine & Aila; official ``ramps.sigmoid_rampup``)."""
    if rampup_length == 0:
        return 1.0
    current = min(max(float(current), 0.0), float(rampup_length))
    phase = 1.0 - current / rampup_length
    return float(math.exp(-5.0 * phase * phase))


def official_rampup_length(labeled: int) -> float:
    """The official ramp-up for ``labeled`` cases: 40 / 20 / 15 for 4 / 8 / 16; other counts take the
    nearest of those (ties: the smaller count)."""
    nearest = min(OFFICIAL_RAMPUP, key=lambda n: (abs(n - labeled), n))
    return OFFICIAL_RAMPUP[nearest]
