"""caml.data.msd and caml.data.source: the MSD NIfTI reader (spacing, affine, unlabeled pool, label
checks), the seeded split and split files, layout detection."""
import json
import os

import numpy as np
import pytest

from caml.data.msd import MSDFolder, read_nifti, write_nifti, zscore
from caml.data.source import CaseDataset, LASource, MSDSource, make_split, open_source
from caml.data.synthetic import generate_synthetic_la

from .nifti_helpers import SPACING, affine_of, nibabel, save, write_msd_folder


@pytest.fixture(scope="module")
def msd(tmp_path_factory):
    return write_msd_folder(tmp_path_factory.mktemp("msd"), labeled=5, unlabeled=2)


def test_reader_spacing_affine_and_voxels(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    path = str(tmp_path / "a.nii.gz")
    save(path, data)
    voxels, spacing, affine = read_nifti(path)
    assert voxels.shape == (4, 5, 6) and np.array_equal(voxels, data)
    assert spacing == pytest.approx(SPACING)
    assert np.allclose(affine, affine_of())
    save(str(tmp_path / "b.nii"), data[..., None])  # [X, Y, Z, 1]: one channel
    assert read_nifti(str(tmp_path / "b.nii"))[0].shape == (4, 5, 6)


def test_write_nifti_keeps_geometry(tmp_path):
    nib = nibabel()
    path = str(tmp_path / "p.nii.gz")
    write_nifti(path, np.ones((3, 4, 5), np.uint8), affine_of(), SPACING)
    img = nib.load(path)
    assert np.allclose(img.affine, affine_of()) and img.header.get_zooms()[:3] == pytest.approx(SPACING)
    assert img.get_data_dtype() == np.uint8
    write_nifti(path, np.zeros((3, 4, 5), np.float32), None, (0.5, 0.5, 2.0))  # no affine: diagonal from spacing
    assert np.allclose(nib.load(path).affine, np.diag([0.5, 0.5, 2.0, 1.0]))


def test_folder_labeled_and_unlabeled_pool(msd, tmp_path):
    folder = MSDFolder(msd)
    assert folder.labeled == [f"heart_{i:03d}" for i in range(5)]
    assert folder.unlabeled == ["heart_005", "heart_006"]
    image, label = folder.load("heart_000")
    assert image.dtype == np.float32 and abs(image.mean()) < 1e-4 and abs(image.std() - 1) < 1e-3  # z-scored
    assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1} and label.any()
    image, label = folder.load("heart_006")
    assert label is None and image.shape == (32, 32, 16)
    assert folder.header("heart_006")[1] == pytest.approx(SPACING)

    # hidden macOS files ignored; nnU-Net's _0000 channel suffix on images; no dataset.json: labels {0, 1}
    root = tmp_path / "nnunet"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    save(root / "imagesTr" / "case_0000.nii.gz", np.zeros((4, 4, 4), np.float32))
    save(root / "labelsTr" / "case.nii.gz", np.zeros((4, 4, 4), np.uint8))
    (root / "imagesTr" / "._case_0000.nii.gz").write_bytes(b"resource fork")
    folder = MSDFolder(str(root))
    assert folder.labeled == ["case"] and folder.unlabeled == [] and folder.label_set.values == (0, 1)


def test_folder_bad_input(tmp_path):
    root = tmp_path / "bad"
    with pytest.raises(FileNotFoundError, match="imagesTr"):
        MSDFolder(str(root))
    (root / "imagesTr").mkdir(parents=True)
    with pytest.raises(ValueError, match="no NIfTI images"):
        MSDFolder(str(root))
    (root / "labelsTr").mkdir()
    for name in ("ok", "corrupt", "shape", "values", "float"):
        save(root / "imagesTr" / f"{name}.nii.gz", np.zeros((4, 4, 4), np.int16))
    save(root / "labelsTr" / "ok.nii.gz", np.ones((4, 4, 4), np.uint8))
    (root / "labelsTr" / "corrupt.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    save(root / "labelsTr" / "shape.nii.gz", np.zeros((4, 4, 5), np.uint8))
    save(root / "labelsTr" / "values.nii.gz", np.full((4, 4, 4), 2, np.uint8))
    save(root / "labelsTr" / "float.nii.gz", np.full((4, 4, 4), 0.5, np.float32))
    folder = MSDFolder(str(root))
    folder.check("ok")
    for case, pattern in (("corrupt", "cannot read NIfTI"), ("shape", "differs"), ("values", "unexpected values"),
                          ("float", "unexpected values")):
        with pytest.raises(ValueError, match=pattern) as info:
            folder.check(case)
        assert f"{case}.nii.gz" in str(info.value) and "\n" not in str(info.value)
    save(root / "labelsTr" / "orphan.nii.gz", np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="orphan.nii.gz has no image"):
        MSDFolder(str(root))
    os.unlink(root / "labelsTr" / "orphan.nii.gz")
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(ValueError, match="dataset.json"):
        MSDFolder(str(root))
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "1": "a", "2": "b"}}))
    folder = MSDFolder(str(root))  # three declared labels: the all-2 label is class 2 now
    assert folder.label_set.values == (0, 1, 2)
    folder.check("values")
    with pytest.raises(ValueError, match=r"unexpected values \[0.5\]"):  # undeclared values are still refused
        folder.check("float")
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "atrium": 1}}))  # nnU-Net v2 form
    assert MSDFolder(str(root)).label_set.values == (0, 1)


def test_seeded_split():
    names = [f"c{i}" for i in range(10)]
    split = make_split(names, seed=3)
    assert len(split["test"]) == 2 and sorted(split["train"] + split["test"]) == names
    assert split == make_split(list(reversed(names)), seed=3)  # depends on the names, not their order
    assert split != make_split(names, seed=4)
    assert len(make_split(names[:2], 0)["test"]) == 1
    with pytest.raises(ValueError, match="at least 2"):
        make_split(names[:1], 0)


def test_source_split_file_and_dataset(msd, tmp_path):
    source = open_source(msd)
    assert isinstance(source, MSDSource) and source.layout == "msd"
    assert len(source.test_cases) == 1 and source.labeled_train == 4
    assert source.train_cases[-2:] == ["heart_005", "heart_006"]  # the unlabeled pool after the labeled
    record = source.split_record()
    assert record["unlabeled"] == ["heart_005", "heart_006"] and record["test"] == source.test_cases
    assert source.geometry("heart_000")[0] == pytest.approx(SPACING)

    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["heart_003", "heart_001"], "test": ["heart_000", "heart_004"]}))
    source = open_source(msd, split_file=str(split))
    assert source.train_cases == ["heart_003", "heart_001", "heart_005", "heart_006"]
    assert source.test_cases == ["heart_000", "heart_004"]
    assert open_source(msd, recorded=record).test_cases == record["test"]

    dataset = CaseDataset(source, source.train_cases)
    assert dataset[3]["label"].shape == (32, 32, 16) and not dataset[3]["label"].any()  # unlabeled: zeros
    assert dataset[0]["label"].any()

    for content, pattern in (("{", "cannot read split file"), ('{"train": []}', "expected"),
                             ('{"train": [], "test": ["heart_000"]}', "non-empty"),
                             ('{"train": ["heart_005"], "test": ["heart_000"]}', "not a labeled case"),
                             ('{"train": ["heart_000"], "test": ["heart_000"]}', "twice")):
        split.write_text(content)
        with pytest.raises(ValueError, match=pattern) as info:
            open_source(msd, split_file=str(split))
        assert str(split) in str(info.value)
    with pytest.raises(FileNotFoundError, match="split file not found"):
        open_source(msd, split_file=str(tmp_path / "none.json"))


def test_layout_detection(tmp_path):
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        open_source(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is empty"):
        open_source(str(tmp_path / "empty"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="neither"):
        open_source(str(tmp_path / "other"))
    la = generate_synthetic_la(str(tmp_path / "la"), cases=3, seed=0, min_shape=(16, 16, 16), max_shape=(16, 16, 16))
    source = open_source(la)
    assert isinstance(source, LASource) and source.test_cases == ["synth_002"] and source.geometry("synth_002") == (None, None)
    with pytest.raises(ValueError, match="--split applies to MSD"):
        open_source(la, split_file=str(tmp_path / "s.json"))


def test_zscore_constant_volume():
    assert not zscore(np.full((2, 2, 2), 7.0)).any()


def test_non_finite_image_voxels_are_rejected(tmp_path):
    root = tmp_path / "nan"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    image = np.zeros((4, 4, 4), np.float32)
    image[0, 1, 2] = np.inf
    save(root / "imagesTr" / "case.nii.gz", image)
    save(root / "labelsTr" / "case.nii.gz", np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="not finite") as info:
        MSDFolder(str(root)).load("case")
    assert str(root / "imagesTr" / "case.nii.gz") in str(info.value)
