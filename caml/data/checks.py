"""What every reader checks in what it reads (h5, NIfTI, nrrd alike), so bad voxels fail at the file that
holds them instead of as a non-finite loss or a silently wrong label later."""
from __future__ import annotations

from typing import Collection

import numpy as np

__all__ = ["check_finite", "unexpected_values"]


def check_finite(image: np.ndarray, what: str) -> None:
    """Raises ValueError ``<what>: N image voxels are not finite`` for NaN or inf voxels."""
    if image.dtype.kind in "fc" and not np.isfinite(image).all():
        count = int(np.count_nonzero(~np.isfinite(image)))
        raise ValueError(f"{what}: {count} image voxel(s) are not finite (NaN or inf)")


def unexpected_values(label: np.ndarray, allowed: Collection) -> list:
    """The values of ``label`` outside ``allowed``, sorted, at most five (empty: the label is fine)."""
    outside = ~np.isin(label, np.asarray(sorted(allowed)))
    return np.unique(label[outside])[:5].tolist() if outside.any() else []
