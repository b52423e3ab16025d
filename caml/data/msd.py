"""A folder of NIfTI volumes in the Medical Segmentation Decathlon (MSD) or nnU-Net v2 layout::

    <root>/imagesTr/<case>.nii.gz        MSD: one image per case, 3D [X, Y, Z] or 4D [X, Y, Z, C] (C channels)
    <root>/imagesTr/<case>_0000.nii.gz   nnU-Net: one 3D file per channel, <case>_0000, <case>_0001, ...
    <root>/labelsTr/<case>.nii.gz        labels of the labeled cases (0 background, 1 foreground, ...)
    <root>/imagesTs/...                  optional: images without labels (an unlabeled pool on request)
    <root>/dataset.json                  optional: ``labels`` (the label values and class names),
                                         ``channel_names`` (nnU-Net v2) or ``modality`` (MSD): the channels;
                                         ``file_ending``; ``training`` (MSD): the labeled image / label pairs

Without declared labels the values are 0 .. N-1 for ``num_classes`` N (default 2: binary); see
:mod:`caml.data.labels` for how label values map to classes.

Channel files (nnU-Net naming) are used when ``dataset.json`` has ``channel_names`` or an image ends in
``_0000``: then every image carries a four-digit channel suffix and every case has every channel.
Without a ``training`` list, images with no label file form the unlabeled pool; with one, the listed
pairs are the labeled cases and the images it leaves out that have no label file are unlabeled.
Hidden files (the ``._*`` files of macOS archives, which the Decathlon tarballs contain) are ignored.

A case's image is ``[X, Y, Z]`` float32 for one channel and ``[C, X, Y, Z]`` for several, each
channel normalised by :class:`caml.data.intensity.Intensity` (z-score by default, as the LA
pipeline). Arrays keep NIfTI's voxel order, so the image's affine places a prediction exactly;
``spacing`` is the header's voxel size (the units of the surface distances). Decoded volumes are
kept in the decoded-volume cache (:mod:`caml.data.cache`).
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional

import numpy as np

from ..cli import one_line
from ..config import default_cache_dir
from .cache import VolumeCache
from .checks import check_finite
from .intensity import Intensity, zscore
from .labels import DATASET_JSON, dataset_labels, read_dataset_json

__all__ = ["IMAGES_DIR", "LABELS_DIR", "TEST_IMAGES_DIR", "is_msd_folder", "require_nibabel", "read_nifti",
           "read_header", "write_nifti", "zscore", "MSDFolder"]

IMAGES_DIR, LABELS_DIR, TEST_IMAGES_DIR = "imagesTr", "labelsTr", "imagesTs"
SUFFIXES = (".nii.gz", ".nii")
CHANNEL_SUFFIX = re.compile(r"_(\d{4})$")  # nnU-Net: <case>_0000, <case>_0001, ...


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


def _shape_and_channels(img, path: str) -> tuple[tuple[int, int, int], int]:
    """(spatial shape, channels): a 3D volume has one channel, a 4D one [X, Y, Z, C] has C."""
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 3:
        return shape, 1
    if len(shape) == 4:
        return shape[:3], shape[3]
    raise ValueError(f"NIfTI file {path}: expected a 3D volume or a 4D multi-channel one [X, Y, Z, C], "
                     f"got shape {shape}")


def _header(img, path: str) -> tuple[tuple[int, int, int], tuple[float, float, float], np.ndarray, int]:
    shape, channels = _shape_and_channels(img, path)
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        spacing = (1.0, 1.0, 1.0)  # a header without a usable voxel size: voxel units
    return shape, spacing, np.asarray(img.affine, dtype=np.float64), channels


def read_header(path: str) -> tuple[tuple[int, int, int], tuple[float, float, float], np.ndarray, int]:
    """(shape, spacing, affine, channels) of a NIfTI file without reading its voxels."""
    return _header(_load_image(path), path)


def read_nifti(path: str) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """(voxels [X, Y, Z], or [C, X, Y, Z] for a 4D file of C > 1 channels, spacing, affine); one-line
    errors naming the file."""
    img = _load_image(path)
    shape, spacing, affine, channels = _header(img, path)
    try:
        data = np.asarray(np.asanyarray(img.dataobj))
    except Exception as err:  # truncated or corrupt voxel data
        raise ValueError(f"cannot read NIfTI file {path}: {one_line(err, 200)}") from err
    if channels == 1:
        return data.reshape(shape), spacing, affine
    return np.moveaxis(data, -1, 0), spacing, affine


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


def _case_name(filename: str, endings=SUFFIXES) -> Optional[str]:
    for suffix in endings:
        if filename.endswith(suffix) and not filename.startswith("."):
            return filename[: -len(suffix)]
    return None


def _scan(folder: str, endings=SUFFIXES) -> dict[str, str]:
    files = {}
    for filename in sorted(os.listdir(folder)):
        name = _case_name(filename, endings)
        if name is not None and os.path.isfile(os.path.join(folder, filename)):
            files[name] = os.path.join(folder, filename)
    return files


def _read_dataset_json(meta: Optional[dict], path: str) -> tuple[Optional[list], tuple[str, ...], Optional[list]]:
    """(declared channel names or None, the image file endings, the ``training`` list or None) of the
    folder's dataset.json (``meta``: its content, None without one)."""
    if meta is None:
        return None, SUFFIXES, None
    channels = meta.get("channel_names", meta.get("modality"))  # nnU-Net v2, MSD (and nnU-Net v1)
    if channels is not None and not (isinstance(channels, dict) and channels
                                     and sorted(map(str, channels)) == sorted(str(i) for i in range(len(channels)))):
        raise ValueError(f"{path}: channel_names / modality must map \"0\", \"1\", ... to channel names, "
                         f"got {one_line(json.dumps(channels), 100)}")
    ending = meta.get("file_ending")
    if ending is not None and ending not in SUFFIXES:
        raise ValueError(f"{path}: file_ending {ending!r} is not NIfTI (caml reads {' and '.join(SUFFIXES)})")
    training = meta.get("training")
    if training is not None and not (isinstance(training, list) and all(
            isinstance(e, dict) and isinstance(e.get("image"), str) and isinstance(e.get("label"), str)
            for e in training)):
        raise ValueError(f"{path}: training must be a list of {{\"image\": ..., \"label\": ...}}")
    names = None if channels is None else [str(channels[k]) for k in sorted(channels, key=int)]
    return names, (ending,) if ending else SUFFIXES, training


def _uses_channel_files(meta: Optional[dict], files: dict[str, str]) -> bool:
    """nnU-Net naming: dataset.json has channel_names (nnU-Net v2) or an image ends in _0000 (nnU-Net v1)."""
    return (meta is not None and "channel_names" in meta) or any(name.endswith("_0000") for name in files)


def _group_channels(files: dict[str, str], folder: str, declared: Optional[list]) -> dict[str, list[str]]:
    """case -> its channel files in channel order, from nnU-Net names ``<case>_<XXXX>``; every case must
    have channels 0 .. n - 1 (n: the declared channels, else the most any case has)."""
    groups: dict[str, dict[int, str]] = {}
    for name, path in files.items():
        match = CHANNEL_SUFFIX.search(name)
        if match is None:
            raise ValueError(f"image file {path} has no nnU-Net channel suffix (_0000, _0001, ...) as the other "
                             f"images of {folder}")
        groups.setdefault(name[:match.start()], {})[int(match[1])] = path
    count = len(declared) if declared is not None else max(max(channels) + 1 for channels in groups.values())
    cases = {}
    for case, channels in sorted(groups.items()):
        extra = [c for c in channels if c >= count]
        if extra:
            raise ValueError(f"image file {channels[extra[0]]}: channel {extra[0]}, but dataset.json declares "
                             f"{count} channel(s) {declared}")
        missing = [c for c in range(count) if c not in channels]
        if missing:
            ending = os.path.basename(next(iter(channels.values())))[len(case) + len("_0000"):]
            raise ValueError(f"case {case}: channel file {case}_{missing[0]:04d}{ending} is missing from {folder} "
                             f"(every case needs all {count} channels"
                             f"{' that dataset.json declares' if declared is not None else ''})")
        cases[case] = [channels[c] for c in range(count)]
    return cases


def _image_cases(files: dict[str, str], folder: str, channel_files: bool,
                 declared: Optional[list]) -> dict[str, list[str]]:
    """case -> its image files (one per channel with nnU-Net naming, else one per case)."""
    return _group_channels(files, folder, declared) if channel_files else {name: [path] for name, path in files.items()}


def _training_labels(root: str, training: list, images: dict, path: str) -> dict[str, str]:
    """case -> label file of dataset.json's ``training`` list (paths relative to ``root``), checked."""
    labels = {}
    for entry in training:
        case = _case_name(os.path.basename(entry["image"]))
        if case not in images:
            raise ValueError(f"{path}: training image {entry['image']} is not an image of {IMAGES_DIR}/")
        label = os.path.normpath(os.path.join(root, entry["label"]))
        if not os.path.isfile(label):
            raise FileNotFoundError(f"{path}: training label {entry['label']} not found")
        labels[case] = label
    return labels


class MSDFolder:
    """The cases of an MSD or nnU-Net folder: ``labeled`` and ``unlabeled`` case names (sorted; with
    ``imagests_unlabeled`` the images of ``imagesTs/`` join the unlabeled ones), ``in_channels``, and
    ``label_set`` (:func:`caml.data.labels.dataset_labels` of the folder and ``num_classes``).

    ``intensity`` normalises the images' channels; ``cache`` keeps the decoded volumes (default: the
    ``volumes`` folder of :func:`caml.config.default_cache_dir`)."""

    def __init__(self, root: str, num_classes: Optional[int] = None, intensity: Intensity = Intensity(),
                 imagests_unlabeled: bool = False, cache: Optional[VolumeCache] = None):
        self.root, self.intensity = root, intensity
        self.cache = cache if cache is not None else VolumeCache(os.path.join(default_cache_dir(), "volumes"))
        images_dir, labels_dir = os.path.join(root, IMAGES_DIR), os.path.join(root, LABELS_DIR)
        if not os.path.isdir(images_dir):
            raise FileNotFoundError(f"MSD folder {root} has no {IMAGES_DIR}/")
        self.meta = read_dataset_json(root)
        self.label_set = dataset_labels(root, num_classes, self.meta)
        json_path = os.path.join(root, DATASET_JSON)
        self.channel_names, endings, training = _read_dataset_json(self.meta, json_path)
        files = _scan(images_dir, endings)
        channel_files = _uses_channel_files(self.meta, files)
        images = _image_cases(files, images_dir, channel_files, self.channel_names)
        if not images:
            raise ValueError(f"{images_dir} holds no NIfTI images (*{' or *'.join(endings)})")
        label_files = _scan(labels_dir, endings) if os.path.isdir(labels_dir) else {}
        if training is None:
            orphans = sorted(set(label_files) - set(images))
            if orphans:
                raise ValueError(f"label file {label_files[orphans[0]]} has no image in {images_dir}")
            labels = label_files
        else:
            labels = _training_labels(root, training, images, json_path)
        self.images, self.labels = images, labels
        self.labeled = sorted(labels)
        self.unlabeled = sorted(set(images) - set(labels) - set(label_files))
        if imagests_unlabeled:
            self._add_test_images(endings, channel_files)
        self.first_case = sorted(images)[0]  # its channel count is the folder's
        self.in_channels = self._case_header(self.first_case)[3]
        if self.channel_names is not None and self.in_channels != len(self.channel_names):
            raise ValueError(f"{self.images[self.first_case][0]}: {self.in_channels} image channel(s), but "
                             f"{json_path} declares {len(self.channel_names)} {self.channel_names}")
        intensity.per_channel(self.in_channels, root)  # one scheme, or one per channel

    def _add_test_images(self, endings: tuple, channel_files: bool) -> None:
        """The images of ``imagesTs/`` (their names distinct from the training images') join the unlabeled pool."""
        folder = os.path.join(self.root, TEST_IMAGES_DIR)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--imagests-unlabeled: {self.root} has no {TEST_IMAGES_DIR}/")
        test_images = _image_cases(_scan(folder, endings), folder, channel_files, self.channel_names)
        clash = sorted(set(test_images) & set(self.images))
        if clash:
            raise ValueError(f"--imagests-unlabeled: case {clash[0]} is both in {IMAGES_DIR}/ and {TEST_IMAGES_DIR}/")
        self.images = {**self.images, **test_images}
        self.unlabeled = sorted(self.unlabeled + list(test_images))

    def _case_header(self, case: str) -> tuple[tuple[int, int, int], tuple[float, float, float], np.ndarray, int]:
        """(shape, spacing, affine, channels) of a case's image files: the first file's geometry, the
        channels of all; a file whose spatial shape differs from the first's is a one-line error."""
        paths = self.images[case]
        shape, spacing, affine, channels = read_header(paths[0])
        for path in paths[1:]:
            other_shape, _, _, other_channels = read_header(path)
            if other_shape != shape:
                raise ValueError(f"image file {path}: shape {other_shape} differs from {os.path.basename(paths[0])}'s "
                                 f"{shape} (the channels of case {case} must have one shape)")
            channels += other_channels
        return shape, spacing, affine, channels

    def header(self, case: str) -> tuple[tuple[int, int, int], tuple[float, float, float], np.ndarray]:
        return self._case_header(case)[:3]

    def check(self, case: str) -> None:
        """The image files are readable volumes of one shape with the folder's channels (their bytes are
        hashed for the cache); a label, when there is one, reads fully, has the image's shape and only
        allowed values (so bad data fails before training)."""
        shape, _, _, channels = self._case_header(case)
        if channels != self.in_channels:
            raise ValueError(f"case {case} has {channels} image channel(s); the folder's first case "
                             f"{self.first_case} has {self.in_channels}")
        for path in self.images[case]:
            self.cache.digest(path)  # here, so that the data loader's workers inherit it
        if case in self.labels:
            self._label(case, shape)

    def _label(self, case: str, shape: tuple) -> np.ndarray:
        path = self.labels[case]
        label = self._decoded_label(path)
        if label.shape != tuple(shape):
            raise ValueError(f"label file {path}: shape {label.shape} differs from its image's {tuple(shape)}")
        return self.label_set.to_classes(label, f"label file {path}")

    def _decoded_label(self, path: str) -> np.ndarray:
        return self.cache.get([path], {"volume": "label"}, lambda: read_nifti(path)[0])

    def _decode_image(self, case: str) -> np.ndarray:
        self._case_header(case)  # the channel files' shapes agree
        channels = []
        for path in self.images[case]:
            voxels = read_nifti(path)[0]
            check_finite(voxels, f"NIfTI file {path}")
            channels.extend(voxels if voxels.ndim == 4 else [voxels])
        return self.intensity(channels, f"case {case}")

    def image(self, case: str) -> np.ndarray:
        """The normalised image, ``[X, Y, Z]`` or ``[C, X, Y, Z]`` float32 (decoded once, then cached)."""
        settings = {"volume": "image", **self.intensity.settings()}
        return self.cache.get(self.images[case], settings, lambda: self._decode_image(case))

    def load(self, case: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """(normalised image float32, label uint8 classes or None for an unlabeled case)."""
        image = self.image(case)
        label = self._label(case, image.shape[-3:]) if case in self.labels else None
        return image, label
