"""Data: the LA h5 layout, transforms and the two-stream batch sampler.

The synthetic LA-like dataset is in ``caml.data.synthetic`` (also a CLI: ``python -m caml.data.synthetic``)."""
from .la_h5 import LAHeartH5, case_path, load_case, read_case_list, write_case
from .sampler import TwoStreamBatchSampler, grouper, iterate_eternally, iterate_once
from .transforms import CenterCrop, Compose, RandomCrop, RandomRotFlip, ToTensor

__all__ = [
    "LAHeartH5", "case_path", "load_case", "read_case_list", "write_case",
    "TwoStreamBatchSampler", "grouper", "iterate_eternally", "iterate_once",
    "CenterCrop", "Compose", "RandomCrop", "RandomRotFlip", "ToTensor",
]
