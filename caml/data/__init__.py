"""Data: the LA h5 layout, MSD / nnU-Net NIfTI folders (one or several channels, ``Intensity`` per channel,
decoded volumes cached), transforms and the two-stream batch sampler.

``open_source(root)`` reads either layout (``caml.data.source``). The synthetic LA-like dataset is in
``caml.data.synthetic`` and the preparation of the raw LA challenge data in ``caml.data.prepare_la``
(both also CLIs: ``python -m caml.data.synthetic``, ``python -m caml.data.prepare_la``)."""
from .intensity import Intensity
from .la_h5 import LAHeartH5, case_path, load_case, read_case_list, write_case
from .labels import LabelSet, dataset_labels
from .msd import MSDFolder, read_nifti, write_nifti
from .sampler import TwoStreamBatchSampler, grouper, iterate_eternally, iterate_once
from .source import CaseDataset, make_split, open_source
from .transforms import CenterCrop, Compose, RandomCrop, RandomRotFlip, ToTensor

__all__ = [
    "LAHeartH5", "case_path", "load_case", "read_case_list", "write_case", "LabelSet", "dataset_labels",
    "MSDFolder", "Intensity", "read_nifti", "write_nifti", "CaseDataset", "make_split", "open_source",
    "TwoStreamBatchSampler", "grouper", "iterate_eternally", "iterate_once",
    "CenterCrop", "Compose", "RandomCrop", "RandomRotFlip", "ToTensor",
]
