"""Tiny MSD-layout folders for the NIfTI / evaluate tests. nibabel is optional (the GPU image lacks it):
a test that writes or reads NIfTI through these helpers (or calls :func:`nibabel`) skips without it."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from caml.data.synthetic import STRUCTURES, make_case

SPACING = (1.5, 1.0, 2.0)


def nibabel():
    """The nibabel module, or a skip of the calling test where it is not installed."""
    return pytest.importorskip("nibabel")


def affine_of(spacing=SPACING, origin=(-10.0, 5.0, 3.0)) -> np.ndarray:
    affine = np.diag(list(spacing) + [1.0])
    affine[:3, 3] = origin
    return affine


def save(path, array, affine=None) -> None:
    nib = nibabel()
    nib.save(nib.Nifti1Image(np.asarray(array), affine_of() if affine is None else affine), str(path))


def write_msd_folder(root, labeled=6, unlabeled=2, seed=0, shape=(32, 32, 16), dataset_json=True,
                     label_values=(0, 1)) -> str:
    """``labeled`` cases with labels and ``unlabeled`` without, synthetic LA-like volumes (raw intensities,
    not normalised: the reader z-scores them), spacing ``SPACING``. More than two ``label_values``: the
    synthetic structures (:data:`caml.data.synthetic.STRUCTURES`) written with these values (class c as
    ``label_values[c]``) and declared nnU-Net v2 style (``{"background": 0, "left atrium": v1, ...}``)."""
    root = str(root)
    os.makedirs(os.path.join(root, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(root, "labelsTr"), exist_ok=True)
    for i in range(labeled + unlabeled):
        rng = np.random.default_rng([seed, i])
        image, label = make_case(rng, shape, len(label_values))
        name = f"heart_{i:03d}"
        save(os.path.join(root, "imagesTr", f"{name}.nii.gz"), (image * 100 + 500).astype(np.int16))
        if i < labeled:
            save(os.path.join(root, "labelsTr", f"{name}.nii.gz"), np.asarray(label_values)[label].astype(np.uint8))
    if dataset_json:
        labels = ({"0": "background", "1": "left atrium"} if len(label_values) == 2 else
                  dict(zip(("background",) + STRUCTURES, label_values)))
        with open(os.path.join(root, "dataset.json"), "w") as f:
            json.dump({"name": "tiny heart", "labels": labels, "numTraining": labeled}, f)
    return root


def two_channel_case(seed: int, index: int, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(channel 0 int16, channel 1 float32 on another scale, label uint8) of a synthetic case: two
    modalities of one anatomy, so per-channel normalisation is visible."""
    image, label = make_case(np.random.default_rng([seed, index]), shape)
    return (image * 100 + 500).astype(np.int16), (image * -3.0 + 40.0).astype(np.float32), label.astype(np.uint8)


def _write_labels_and_json(root, labeled: int, shape, seed, meta: dict) -> None:
    for i in range(labeled):
        save(os.path.join(root, "labelsTr", f"case_{i:03d}.nii.gz"), two_channel_case(seed, i, shape)[2])
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump({"name": "tiny two-channel", "labels": {"background": 0, "target": 1}, "numTraining": labeled,
                   **meta}, f)


def write_nnunet_folder(root, labeled=6, unlabeled=2, seed=0, shape=(32, 32, 16), test_images=1) -> str:
    """An nnU-Net v2 raw dataset of two channels: ``imagesTr/case_XXX_0000.nii.gz`` and ``_0001``,
    ``labelsTr/case_XXX.nii.gz`` for the first ``labeled`` cases, ``imagesTs/test_XXX_000{0,1}.nii.gz``,
    dataset.json with channel_names and file_ending."""
    root = str(root)
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    for i in range(labeled + unlabeled + test_images):
        folder, name = ("imagesTr", f"case_{i:03d}") if i < labeled + unlabeled else ("imagesTs", f"test_{i:03d}")
        for channel, array in enumerate(two_channel_case(seed, i, shape)[:2]):
            save(os.path.join(root, folder, f"{name}_{channel:04d}.nii.gz"), array)
    _write_labels_and_json(root, labeled, shape, seed,
                           {"channel_names": {"0": "T2", "1": "ADC"}, "file_ending": ".nii.gz"})
    return root


def write_msd4d_folder(root, labeled=6, unlabeled=2, seed=0, shape=(32, 32, 16)) -> str:
    """The cases of :func:`write_nnunet_folder` as MSD 4D images ``imagesTr/case_XXX.nii.gz`` [X, Y, Z, 2]
    (float32: both channels' values exactly), dataset.json with ``modality``."""
    root = str(root)
    for folder in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    for i in range(labeled + unlabeled):
        first, second, _ = two_channel_case(seed, i, shape)
        save(os.path.join(root, "imagesTr", f"case_{i:03d}.nii.gz"), np.stack([first.astype(np.float32), second], -1))
    _write_labels_and_json(root, labeled, shape, seed, {"modality": {"0": "T2", "1": "ADC"}})
    return root
