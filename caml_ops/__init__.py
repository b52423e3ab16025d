"""caml-ops: fused kernels for semi-supervised 3D medical image segmentation (CAML)."""
from . import nn
from ._backend import BACKENDS, cpu_capability, get_backend, set_backend
from .attention import cross_sample_attention, intra_sample_attention
from .dropout import dropout
from .mutual_consistency import mutual_consistency_loss
from .omni_correlation import omni_correlation, omni_correlation_loss

__all__ = [
    "nn",
    "BACKENDS",
    "cpu_capability",
    "get_backend",
    "set_backend",
    "cross_sample_attention",
    "dropout",
    "intra_sample_attention",
    "mutual_consistency_loss",
    "omni_correlation",
    "omni_correlation_loss",
]
__version__ = "0.1.0"
