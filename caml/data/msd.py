"""A folder of NIfTI volumes in the Medical Segmentation Decathlon layout::

    <root>/imagesTr/<case>.nii.gz      images (``.nii`` too; an nnU-Net channel suffix ``_0000`` is dropped)
    <root>/labelsTr/<case>.nii.gz      labels of the labeled cases (0 background, 1 foreground, ...)
    <root>/dataset.json                optional: its ``labels`` declare the label values and class names

Without declared labels the values are 0 .. N-1 for ``num_classes`` N (default 2: binary); see
:mod:`caml.data.labels` for how label values map to classes.

Images with no label file form the unlabeled pool. Hidden files (the ``._*`` files of macOS
archives, which the Decathlon tarballs contain) are ignored. Images are z-score normalised per
volume as the LA pipeline does; arrays keep NIfTI's voxel order, so the image's affine places a
prediction exactly; ``spacing`` is the header's voxel size (the units of the surface distances).
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from ..cli import one_line
from .checks import check_finite
from .labels import dataset_labels

__all__ = ["IMAGES_DIR", "LABELS_DIR", "is_msd_folder", "require_nibabel", "read_nifti", "write_nifti", "zscore", "MSDFolder"]

IMAGES_DIR, LABELS_DIR = "imagesTr", "labelsTr"
SUFFIXES = (".nii.gz", ".nii")
CHANNEL_SUFFIX = "_0000"


def is_msd_folder(root: str) -> bool:
    return os.path.isdir(os.path.join(root, IMAGES_DIR))


def require_nibabel():
    """The nibabel module, imported when first needed: the package imports without it."""
    try:
        import nibabel
    except ImportError:  # a dependency of the package; a clear line if an install lacks it
        raise RuntimeError("NIfTI files need nibabel (pip install nibabel)") from None
    return nibabel


def _load_image(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"NIfTI file not found: {path}")
    nibabel = require_nibabel()
    try:
        return nibabel.load(path)
    except Exception as err:  # nibabel reports bad files with many exception types
        raise ValueError(f"cannot read NIfTI file {path}: {one_line(err, 200)}") from err


def _spatial_shape(img, path: str) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise ValueError(f"NIfTI file {path}: expected a 3D single-channel volume, got shape {shape}")
    return shape


def _header(img, path: str) -> tuple[tuple[int, int, int], tuple[float, float, float], np.ndarray]:
    shape = _spatial_shape(img, path)
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        spacing = (1.0, 1.0, 1.0)  # a header without a usable voxel size: voxel units
    return shape, spacing, np.asarray(img.affine, dtype=np.float64)


def read_header(path: str) -> tuple[tuple[int, int, int], tuple[float, float, float], np.ndarray]:
    """(shape, spacing, affine) of a NIfTI file without reading its voxels."""
    return _header(_load_image(path), path)


def read_nifti(path: str) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """(voxels [X, Y, Z], spacing, affine); one-line errors naming the file."""
    img = _load_image(path)
    shape, spacing, affine = _header(img, path)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # truncated or corrupt voxel data
        raise ValueError(f"cannot read NIfTI file {path}: {one_line(err, 200)}") from err
    return np.asarray(data).reshape(shape), spacing, affine


def write_nifti(path: str, array: np.ndarray, affine: Optional[np.ndarray] = None,
                spacing: Optional[tuple] = None) -> None:
    """Writes ``array`` with ``affine`` (else a diagonal one from ``spacing``, else the identity)."""
    nibabel = require_nibabel()
    if affine is None:
        affine = np.diag(list(spacing if spacing is not None else (1.0, 1.0, 1.0)) + [1.0])
    img = nibabel.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    if spacing is not None:
        img.header.set_zooms(tuple(spacing) + tuple(img.header.get_zooms()[3:]))
    nibabel.save(img, path)


def zscore(image: np.ndarray) -> np.ndarray:
    """(image - mean) / std over the volume, float32 (a constant volume becomes zeros)."""
    image = np.asarray(image, dtype=np.float32)
    std = float(image.std())
    return ((image - image.mean()) / (std if std > 0 else 1.0)).astype(np.float32, copy=False)


def _case_name(filename: str) -> Optional[str]:
    for suffix in SUFFIXES:
        if filename.endswith(suffix) and not filename.startswith("."):
            return filename[: -len(suffix)]
    return None


def _scan(folder: str) -> dict[str, str]:
    files = {}
    for filename in sorted(os.listdir(folder)):
        name = _case_name(filename)
        if name is not None and os.path.isfile(os.path.join(folder, filename)):
            files[name] = os.path.join(folder, filename)
    return files


class MSDFolder:
    """The cases of an MSD folder: ``labeled`` and ``unlabeled`` case names (sorted), and ``label_set``
    (:func:`caml.data.labels.dataset_labels` of the folder and ``num_classes``)."""

    def __init__(self, root: str, num_classes: Optional[int] = None):
        self.root = root
        images_dir, labels_dir = os.path.join(root, IMAGES_DIR), os.path.join(root, LABELS_DIR)
        if not os.path.isdir(images_dir):
            raise FileNotFoundError(f"MSD folder {root} has no {IMAGES_DIR}/")
        self.label_set = dataset_labels(root, num_classes)
        images = {(n[: -len(CHANNEL_SUFFIX)] if n.endswith(CHANNEL_SUFFIX) else n): p for n, p in _scan(images_dir).items()}
        if not images:
            raise ValueError(f"{images_dir} holds no NIfTI images (*.nii.gz)")
        labels = _scan(labels_dir) if os.path.isdir(labels_dir) else {}
        orphans = sorted(set(labels) - set(images))
        if orphans:
            raise ValueError(f"label file {labels[orphans[0]]} has no image in {images_dir}")
        self.images, self.labels = images, labels
        self.labeled = sorted(labels)
        self.unlabeled = sorted(set(images) - set(labels))

    def header(self, case: str) -> tuple[tuple[int, int, int], tuple[float, float, float], np.ndarray]:
        return read_header(self.images[case])

    def check(self, case: str) -> None:
        """The image is a readable 3D volume; a label, when there is one, reads fully, has the image's
        shape and only allowed values (so bad data fails before training)."""
        shape = self.header(case)[0]
        if case in self.labels:
            self._label(case, shape)

    def _label(self, case: str, shape: tuple) -> np.ndarray:
        path = self.labels[case]
        label = read_nifti(path)[0]
        if label.shape != tuple(shape):
            raise ValueError(f"label file {path}: shape {label.shape} differs from its image's {tuple(shape)}")
        return self.label_set.to_classes(label, f"label file {path}")

    def load(self, case: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """(z-scored image float32, label uint8 classes or None for an unlabeled case)."""
        image = read_nifti(self.images[case])[0]
        check_finite(image, f"NIfTI file {self.images[case]}")
        label = self._label(case, image.shape) if case in self.labels else None
        return zscore(image), label
