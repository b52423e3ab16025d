"""Images of several channels (nnU-Net channel files, MSD 4D images), the MSD / nnU-Net conventions
(dataset.json's training list, imagesTs as an unlabeled pool, splits_final.json folds), per-channel
intensity normalisation (z-score, CT window) and the decoded-volume cache: end to end on tiny data,
values checked by hand, every bad input one line."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch

from caml import evaluate, train
from caml.data import cache as cache_module
from caml.data import msd as msd_module
from caml.data.cache import VolumeCache
from caml.data.intensity import Intensity, ct_window, zscore
from caml.data.msd import MSDFolder
from caml.data.source import open_source
from caml.data.synthetic import generate_synthetic_la
from caml.evaluate import load_model
from caml.inference import predict_classes

from .nifti_helpers import nibabel, save, two_channel_case, write_msd4d_folder, write_msd_folder, write_nnunet_folder
from .training_fixtures import TINY, _env, cache  # noqa: F401  (fixtures)

SHAPE = (32, 32, 16)
CASES = [f"case_{i:03d}" for i in range(8)]  # 6 labeled, 2 unlabeled
RUN = TINY + ["--max-iters", "2"]


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory):
    nibabel()
    return write_nnunet_folder(tmp_path_factory.mktemp("nnunet") / "Dataset001_Tiny", shape=SHAPE)


@pytest.fixture(scope="module")
def msd4d(tmp_path_factory):
    nibabel()
    return write_msd4d_folder(tmp_path_factory.mktemp("msd4d") / "Task01_Tiny", shape=SHAPE)


@pytest.fixture(scope="module")
def nnunet_run(nnunet, cache, tmp_path_factory):
    os.environ["CAML_CACHE"], os.environ["CAML_OPS_BACKEND"] = cache, "reference"
    out = str(tmp_path_factory.mktemp("runs") / "nnunet")
    threads = torch.get_num_threads()
    assert train.main(RUN + ["--data", nnunet, "--out", out]) == 0
    torch.set_num_threads(threads)
    return out


def _folder(root, tmp_path, **kw) -> MSDFolder:
    return MSDFolder(str(root), cache=VolumeCache(str(tmp_path / "cache")), **kw)


def _count_reads(monkeypatch) -> list:
    """Patches the NIfTI reader of caml.data.msd; the list collects the paths it decodes."""
    reads, read = [], msd_module.read_nifti
    monkeypatch.setattr(msd_module, "read_nifti", lambda path: reads.append(os.path.basename(path)) or read(path))
    return reads


# --- several channels ---

def test_nnunet_channel_files_are_one_case(nnunet, tmp_path):
    folder = _folder(nnunet, tmp_path)
    assert folder.in_channels == 2 and folder.channel_names == ["T2", "ADC"]
    assert folder.labeled == CASES[:6] and folder.unlabeled == CASES[6:]  # no case_XXX_0001, no imagesTs
    image, label = folder.load("case_001")
    first, second, expected_label = two_channel_case(0, 1, SHAPE)
    assert image.shape == (2,) + SHAPE and image.dtype == np.float32
    assert np.array_equal(image[0], zscore(first)) and np.array_equal(image[1], zscore(second))
    for channel in image:  # each channel z-scored on its own (raw: ~500 and ~40 on different scales)
        assert abs(channel.mean()) < 1e-4 and abs(channel.std() - 1) < 1e-3
    assert np.array_equal(label, expected_label)
    assert folder.header("case_001")[0] == SHAPE


def test_msd_4d_images_read_as_the_channel_files(nnunet, msd4d, tmp_path):
    four_d, files = _folder(msd4d, tmp_path / "a"), _folder(nnunet, tmp_path / "b")
    assert four_d.in_channels == 2 and four_d.channel_names == ["T2", "ADC"]
    assert (four_d.labeled, four_d.unlabeled) == (files.labeled, files.unlabeled)
    for case in ("case_000", "case_007"):
        (a, a_label), (b, b_label) = four_d.load(case), files.load(case)
        assert a.shape == (2,) + SHAPE and np.array_equal(a, b)
        assert (a_label is None and b_label is None) or np.array_equal(a_label, b_label)


def test_nnunet_folder_trains_and_evaluates(nnunet, nnunet_run, tmp_path, capsys):
    split = json.load(open(os.path.join(nnunet_run, "split.json")))
    assert split["unlabeled"] == CASES[6:]  # neither a second channel nor a test case leaks into the pool
    assert sorted(split["train"] + split["test"]) == CASES[:6] and len(split["test"]) == 1
    config = json.load(open(os.path.join(nnunet_run, "config.json")))
    assert config["in_channels"] == 2 and config["intensity"] == ["zscore"] and config["window"] is None
    checkpoint = torch.load(os.path.join(nnunet_run, "checkpoints", "last.pt"), weights_only=True)
    assert checkpoint["config"]["in_channels"] == 2
    assert checkpoint["model"]["encoder1.block_one.conv.0.weight"].shape[1] == 2
    run_metrics = json.load(open(os.path.join(nnunet_run, "metrics.json")))
    assert list(run_metrics["cases"]) == split["test"]

    out = tmp_path / "eval"
    rc = evaluate.main(["--checkpoint", f"{nnunet_run}/checkpoints/last.pt", "--data", nnunet, "--out", str(out),
                        "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    metrics = json.load(open(out / "metrics.json"))
    assert list(metrics["cases"]) == split["test"]
    assert metrics["dice"] == pytest.approx(run_metrics["dice"], abs=1e-6)
    assert (out / "predictions" / f"{split['test'][0]}.nii.gz").is_file()

    splits = tmp_path / "splits_final.json"  # nnU-Net's folds: fold 1's val cases are scored
    splits.write_text(json.dumps([{"train": CASES[2:6], "val": CASES[:2]}, {"train": CASES[:4], "val": CASES[4:6]}]))
    rc = evaluate.main(["--checkpoint", f"{nnunet_run}/checkpoints/last.pt", "--data", nnunet, "--out",
                        str(tmp_path / "fold"), "--threads", "1", "--split", str(splits), "--fold", "1"])
    assert rc == 0, capsys.readouterr().err
    metrics = json.load(open(tmp_path / "fold" / "metrics.json"))
    assert list(metrics["cases"]) == CASES[4:6] and metrics["test_cases_from"].endswith("(the val cases of fold 1)")


def test_msd_4d_folder_trains_with_ct_and_zscore_channels(msd4d, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(RUN + ["--data", msd4d, "--out", str(out), "--intensity", "ct", "zscore",
                             "--window", "-100", "600"]) == 0
    config = json.load(open(out / "config.json"))
    assert config["in_channels"] == 2 and config["intensity"] == ["ct", "zscore"] and config["window"] == [-100, 600]
    # caml.evaluate normalises as the run did (the checkpoint's settings): its probabilities are the model's
    # on the CT-windowed image, not on a z-scored one
    model, info = load_model(str(out / "checkpoints" / "last.pt"))
    assert info["intensity"] == Intensity(("ct", "zscore"), (-100, 600))
    assert evaluate.main(["--checkpoint", str(out / "checkpoints" / "last.pt"), "--data", msd4d, "--out",
                          str(tmp_path / "eval"), "--threads", "1", "--save-probs"]) == 0
    capsys.readouterr()
    split = json.load(open(out / "split.json"))
    case = split["test"][0]
    probs = np.asarray(nibabel().load(str(tmp_path / "eval" / "probabilities" / f"{case}.nii.gz")).dataobj)
    model.eval()
    for intensity, same in ((info["intensity"], True), (Intensity(), False)):
        image = open_source(msd4d, recorded=split, intensity=intensity).load(case)[0]
        expected = predict_classes(model, image, info["patch_size"], info["strides"], 4, torch.device("cpu"),
                                   False)[0][1].numpy()
        assert np.allclose(probs, expected, rtol=0, atol=1e-6) == same
    run_dice = json.load(open(out / "metrics.json"))["dice"]
    assert json.load(open(tmp_path / "eval" / "metrics.json"))["dice"] == pytest.approx(run_dice, abs=1e-6)


# --- intensity ---

def test_ct_window_by_hand():
    hu = np.array([-1000, -125, 0, 75, 275, 3000], np.int16).reshape(1, 2, 3)
    scaled = ct_window(hu, -125, 275)  # clip to [-125, 275], then (x + 125) / 400
    assert scaled.dtype == np.float32 and scaled.ravel().tolist() == [0.0, 0.0, 0.3125, 0.5, 1.0, 1.0]
    other = np.arange(6, dtype=np.float32).reshape(1, 2, 3)  # mean 2.5, std sqrt(35 / 12)
    both = Intensity(("ct", "zscore"), (-125, 275))([hu, other], "case")
    assert both.shape == (2, 1, 2, 3) and np.array_equal(both[0], scaled)
    assert both[1].ravel() == pytest.approx([(x - 2.5) / np.sqrt(35 / 12) for x in range(6)], abs=1e-6)


def test_intensity_per_channel_in_a_folder(nnunet, tmp_path):
    first, second, _ = two_channel_case(0, 2, SHAPE)  # channel 0: 500 + 100 z (int16)
    ct = _folder(nnunet, tmp_path, intensity=Intensity(("ct",), (400, 600)))
    image = ct.load("case_002")[0]
    # every channel windowed: channel 0 clipped to [400, 600] and scaled; channel 1 (~40) below the window: all 0
    assert np.array_equal(image[0], np.clip((first.astype(np.float64) - 400) / 200, 0, 1).astype(np.float32))
    assert not image[1].any()
    assert set(np.unique(image[0])) >= {0.0, 1.0}  # both ends of the window reached on this case
    mixed = _folder(nnunet, tmp_path, intensity=Intensity(("ct", "zscore"), (400, 600))).load("case_002")[0]
    assert np.array_equal(mixed[0], image[0]) and np.array_equal(mixed[1], zscore(second))


# --- the decoded-volume cache ---

def test_cache_is_reused_and_keyed_by_content_and_settings(nnunet, tmp_path, monkeypatch):
    reads = _count_reads(monkeypatch)
    first = _folder(nnunet, tmp_path).load("case_000")
    assert sorted(reads) == ["case_000.nii.gz", "case_000_0000.nii.gz", "case_000_0001.nii.gz"]
    reads.clear()
    again = _folder(nnunet, tmp_path).load("case_000")  # a new reader (another run) on the same cache
    assert reads == [] and np.array_equal(again[0], first[0]) and np.array_equal(again[1], first[1])
    _folder(nnunet, tmp_path, intensity=Intensity(("ct",), (0, 1000))).load("case_000")
    assert sorted(reads) == ["case_000_0000.nii.gz", "case_000_0001.nii.gz"]  # new settings: the image again
    reads.clear()
    moved = tmp_path / "moved"  # the same bytes elsewhere (new paths and times): the same entries
    shutil.copytree(nnunet, moved)
    assert np.array_equal(_folder(moved, tmp_path).load("case_000")[0], first[0]) and reads == []
    entries = [name for _, _, names in os.walk(tmp_path / "cache") for name in names]
    assert len(entries) == 3 and all(name.endswith(".npy") and not name.startswith(".tmp-") for name in entries)


def test_cache_key_is_the_bytes(tmp_path):
    path = tmp_path / "volume.nii.gz"
    path.write_bytes(b"aaaa")
    key = VolumeCache(str(tmp_path / "cache")).key([str(path)], {"window": None})
    stat = os.stat(path)
    path.write_bytes(b"bbbb")  # edited in place, keeping its size and modification time
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    edited = VolumeCache(str(tmp_path / "cache")).key([str(path)], {"window": None})
    assert edited != key
    assert VolumeCache(str(tmp_path / "cache")).key([str(path)], {"window": [0.0, 1.0]}) not in (key, edited)
    shutil.copy(path, tmp_path / "copy.nii.gz")
    assert VolumeCache(str(tmp_path / "cache")).key([str(tmp_path / "copy.nii.gz")], {"window": None}) == edited


def test_second_training_run_decodes_nothing(nnunet, nnunet_run, tmp_path, monkeypatch):
    reads = _count_reads(monkeypatch)
    out = str(tmp_path / "again")
    assert train.main(RUN + ["--data", nnunet, "--out", out]) == 0
    assert reads == []  # every volume of the first run's (same) batches and test case came from the cache
    logs = [[{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(open(f"{run}/train_log.csv"))]
            for run in (nnunet_run, out)]
    assert logs[0] == logs[1]
    assert json.load(open(os.path.join(out, "metrics.json")))["dice"] == json.load(
        open(os.path.join(nnunet_run, "metrics.json")))["dice"]


def test_cache_writes_are_atomic(tmp_path, monkeypatch):
    source = tmp_path / "volume.bin"
    source.write_bytes(b"voxels")
    cache = VolumeCache(str(tmp_path / "cache"))
    made = []

    def make():
        made.append(1)
        return np.arange(6, dtype=np.float32)

    def killed(src, dst):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(cache_module.os, "replace", killed)  # a run killed between the write and the rename
        cache.get([str(source)], {}, make)
    assert [n for _, _, names in os.walk(tmp_path / "cache") for n in names] == []  # no entry, no temporary
    assert cache.get([str(source)], {}, make).tolist() == list(range(6)) and len(made) == 2
    entry = cache.path(cache.key([str(source)], {}))
    assert os.path.isfile(entry)
    open(entry, "wb").write(b"\x93NUMPY damaged")  # damaged since: made again, rewritten
    assert cache.get([str(source)], {}, make).tolist() == list(range(6)) and len(made) == 3
    assert np.load(entry).tolist() == list(range(6))
    assert cache.get([str(source)], {}, make).tolist() == list(range(6)) and len(made) == 3

    blocked = VolumeCache(str(source))  # a file where the cache folder should be: decoded, uncached, warned once
    with pytest.warns(RuntimeWarning, match="not written"):
        assert blocked.get([str(source)], {}, make).tolist() == list(range(6))


# --- MSD and nnU-Net conventions ---

def test_dataset_json_training_list_is_honoured(tmp_path):
    root = write_msd_folder(tmp_path / "msd", labeled=5, unlabeled=2)
    os.makedirs(os.path.join(root, "labelsAlt"))
    shutil.move(os.path.join(root, "labelsTr", "heart_001.nii.gz"), os.path.join(root, "labelsAlt", "h1.nii.gz"))
    meta = json.load(open(os.path.join(root, "dataset.json")))
    meta["training"] = [{"image": "./imagesTr/heart_000.nii.gz", "label": "./labelsTr/heart_000.nii.gz"},
                        {"image": "./imagesTr/heart_001.nii.gz", "label": "./labelsAlt/h1.nii.gz"},
                        {"image": "./imagesTr/heart_003.nii.gz", "label": "./labelsTr/heart_003.nii.gz"}]
    json.dump(meta, open(os.path.join(root, "dataset.json"), "w"))
    folder = _folder(root, tmp_path)
    # heart_002 and heart_004 have labels but are not listed: left out; heart_005/006 have none: unlabeled
    assert folder.labeled == ["heart_000", "heart_001", "heart_003"]
    assert folder.unlabeled == ["heart_005", "heart_006"]
    assert folder.load("heart_001")[1].any()  # its label from the listed path


def test_imagests_as_unlabeled_pool(nnunet, tmp_path):
    assert "test_008" not in open_source(nnunet).split_record()["unlabeled"]
    source = open_source(nnunet, imagests_unlabeled=True)
    assert source.split_record()["unlabeled"] == CASES[6:] + ["test_008"]
    assert "test_008" not in source.test_cases and source.train_cases[-1] == "test_008"
    image, label = source.load("test_008")
    assert image.shape == (2,) + SHAPE and label is None


def test_nnunet_splits_final_fold(nnunet, tmp_path):
    splits = tmp_path / "splits_final.json"
    folds = [{"train": CASES[2:6], "val": CASES[:2]}, {"train": CASES[:2] + CASES[4:6], "val": CASES[2:4]}]
    splits.write_text(json.dumps(folds))
    source = open_source(nnunet, split_file=str(splits), fold=1)
    assert source.test_cases == ["case_002", "case_003"]  # the fold's val cases are the test cases
    assert source.train_cases == ["case_000", "case_001", "case_004", "case_005"] + CASES[6:]
    assert source.split_record()["test"] == ["case_002", "case_003"]


# --- bad input: one line naming the file, case or flag ---

def _bad_copy(nnunet, tmp_path) -> str:
    root = str(tmp_path / "bad")
    shutil.copytree(nnunet, root)
    return root


def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def _edit_json(root, **changes):
    path = os.path.join(root, "dataset.json")
    meta = {**json.load(open(path)), **changes}
    json.dump({k: v for k, v in meta.items() if v is not None}, open(path, "w"))


def test_bad_channel_files(nnunet, tmp_path):
    root = _bad_copy(nnunet, tmp_path)
    os.unlink(os.path.join(root, "imagesTr", "case_003_0001.nii.gz"))
    with pytest.raises(ValueError) as error:
        _folder(root, tmp_path)
    assert "case case_003: channel file case_003_0001.nii.gz is missing" in _one_line(error)
    _edit_json(root, channel_names=None, file_ending=None)  # without channel_names: all channels any case has
    with pytest.raises(ValueError, match="case_003_0001.nii.gz is missing"):
        _folder(root, tmp_path)
    shutil.copy(os.path.join(nnunet, "imagesTr", "case_003_0001.nii.gz"), os.path.join(root, "imagesTr"))
    shutil.copy(os.path.join(nnunet, "dataset.json"), root)

    images = os.path.join(root, "imagesTr")
    shutil.copy(os.path.join(images, "case_002_0001.nii.gz"), os.path.join(images, "case_002_0002.nii.gz"))
    with pytest.raises(ValueError) as error:
        _folder(root, tmp_path)
    assert "case_002_0002.nii.gz: channel 2, but dataset.json declares 2 channel(s)" in _one_line(error)
    os.unlink(os.path.join(root, "imagesTr", "case_002_0002.nii.gz"))

    save(os.path.join(root, "imagesTr", "case_004_0001.nii.gz"), np.zeros((32, 32, 15), np.float32))
    folder = _folder(root, tmp_path)
    with pytest.raises(ValueError) as error:
        folder.check("case_004")
    line = _one_line(error)
    assert "case_004_0001.nii.gz: shape (32, 32, 15) differs from case_004_0000.nii.gz's (32, 32, 16)" in line
    with pytest.raises(ValueError, match="channels of case case_004 must have one shape"):
        folder.load("case_004")

    save(os.path.join(root, "imagesTr", "stray.nii.gz"), np.zeros(SHAPE, np.float32))
    with pytest.raises(ValueError) as error:
        _folder(root, tmp_path)
    assert "stray.nii.gz has no nnU-Net channel suffix" in _one_line(error)
    os.unlink(os.path.join(root, "imagesTr", "stray.nii.gz"))

    for changes, pattern in (({"file_ending": ".mha"}, "file_ending '.mha' is not NIfTI"),
                             ({"channel_names": {"1": "T2"}}, "must map \"0\", \"1\""),
                             ({"channel_names": {"0": "T2", "1": "ADC", "2": "DWI"}},
                              "case case_000: channel file case_000_0002.nii.gz is missing")):
        _edit_json(root, **changes)
        with pytest.raises(ValueError, match=pattern) as error:
            _folder(root, tmp_path)
        assert "dataset.json" in _one_line(error)
        shutil.copy(os.path.join(nnunet, "dataset.json"), root)

    with pytest.raises(ValueError) as error:
        _folder(root, tmp_path, intensity=Intensity(("zscore", "zscore", "ct"), (0, 1)))
    assert "--intensity gives 3 schemes, but" in _one_line(error) and "has 2 image channel(s)" in str(error.value)


def test_bad_4d_images(msd4d, tmp_path):
    root = _bad_copy(msd4d, tmp_path)
    save(os.path.join(root, "imagesTr", "case_005.nii.gz"), np.zeros(SHAPE + (3,), np.float32))
    folder = _folder(root, tmp_path)
    with pytest.raises(ValueError) as error:
        folder.check("case_005")
    assert _one_line(error) == "case case_005 has 3 image channel(s); the folder's first case case_000 has 2"
    save(os.path.join(root, "imagesTr", "case_000.nii.gz"), np.zeros(SHAPE + (3,), np.float32))
    with pytest.raises(ValueError) as error:
        _folder(root, tmp_path)
    assert "case_000.nii.gz: 3 image channel(s), but" in _one_line(error) and "declares 2" in str(error.value)
    save(os.path.join(root, "imagesTr", "case_000.nii.gz"), np.zeros(SHAPE + (1, 2), np.float32))
    with pytest.raises(ValueError, match="expected a 3D volume or a 4D multi-channel one"):
        _folder(root, tmp_path)


def test_bad_training_list_and_imagests(nnunet, tmp_path):
    root = _bad_copy(nnunet, tmp_path)
    for training, pattern in (("x", "training must be a list"),
                              ([{"image": "./imagesTr/none.nii.gz", "label": "./labelsTr/case_000.nii.gz"}],
                               "training image ./imagesTr/none.nii.gz is not an image of imagesTr/"),
                              ([{"image": "./imagesTr/case_000.nii.gz", "label": "./labelsTr/none.nii.gz"}],
                               "training label ./labelsTr/none.nii.gz not found")):
        _edit_json(root, training=training)
        with pytest.raises((ValueError, FileNotFoundError), match=pattern) as error:
            _folder(root, tmp_path)
        assert "dataset.json" in _one_line(error)
    shutil.copy(os.path.join(nnunet, "dataset.json"), root)

    for name in ("case_000_0000.nii.gz", "case_000_0001.nii.gz"):
        shutil.copy(os.path.join(root, "imagesTr", name), os.path.join(root, "imagesTs", name))
    with pytest.raises(ValueError) as error:
        _folder(root, tmp_path, imagests_unlabeled=True)
    assert _one_line(error) == "--imagests-unlabeled: case case_000 is both in imagesTr/ and imagesTs/"
    shutil.rmtree(os.path.join(root, "imagesTs"))
    with pytest.raises(FileNotFoundError, match="--imagests-unlabeled: .* has no imagesTs/"):
        _folder(root, tmp_path, imagests_unlabeled=True)


def test_bad_flags_are_one_line(nnunet, nnunet_run, tmp_path, capsys):
    def error(main, *argv, code):
        rc = main([str(a) for a in argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == code and len(err) == 1 and ": error: " in err[0], (rc, err)
        return err[0]

    def train_error(*argv, code=2):
        return error(train.main, *RUN, "--data", nnunet, "--out", tmp_path / "out", *argv, code=code)

    splits = tmp_path / "splits_final.json"
    splits.write_text(json.dumps([{"train": CASES[2:6], "val": CASES[:2]}, {"train": CASES[:4], "val": CASES[4:6]}]))
    plain = tmp_path / "split.json"
    plain.write_text(json.dumps({"train": CASES[2:6], "test": CASES[:2]}))
    assert "--fold needs --split FILE" in train_error("--fold", "0")
    assert "holds 2 nnU-Net fold(s): choose one with --fold K, K from 0 to 1" in train_error("--split", splits)
    assert "(got 2)" in train_error("--split", splits, "--fold", "2")
    assert "--fold applies to nnU-Net's splits_final.json" in train_error("--split", plain, "--fold", "0")
    assert "--fold must be >= 0" in train_error("--split", splits, "--fold", "-1")
    assert "--window LOW HIGH is needed by --intensity ct" in train_error("--intensity", "ct")
    assert "--window applies to --intensity ct only" in train_error("--window", "0", "1")
    assert "--window needs LOW < HIGH" in train_error("--intensity", "ct", "--window", "5", "1")
    assert "--window must be two finite numbers" in train_error("--intensity", "ct", "--window", "nan", "1")
    assert "--intensity must name schemes from zscore, ct" in train_error("--intensity", "hu")
    assert "--intensity gives 3 schemes" in train_error("--intensity", "zscore", "zscore", "zscore")
    la = generate_synthetic_la(str(tmp_path / "la"), cases=3, seed=0, min_shape=SHAPE, max_shape=SHAPE)
    for flags in (["--intensity", "ct", "--window", "0", "1"], ["--imagests-unlabeled"]):
        assert f"{flags[0]}" in error(train.main, *RUN, "--data", la, "--out", tmp_path / "la_run", *flags, code=2)
    assert "applies to MSD folders; the LA h5 layout" in error(train.main, *RUN, "--data", la, "--out",
                                                               tmp_path / "la_run", "--intensity", "zscore",
                                                               "zscore", code=2)

    bad = _bad_copy(nnunet, tmp_path)
    os.unlink(os.path.join(bad, "imagesTr", "case_006_0000.nii.gz"))
    assert "case case_006: channel file case_006_0000.nii.gz is missing" in error(
        train.main, *RUN, "--data", bad, "--out", tmp_path / "bad_run", code=2)

    single = str(tmp_path / "single")  # the same cases with their first channel only
    shutil.copytree(nnunet, single, ignore=shutil.ignore_patterns("*_0001.nii.gz"))
    _edit_json(single, channel_names={"0": "T2"})
    line = error(evaluate.main, "--checkpoint", f"{nnunet_run}/checkpoints/last.pt", "--data", single, "--out",
                 tmp_path / "eval", code=2)
    assert "has 1 image channel(s); the checkpoint's model takes 2" in line and not (tmp_path / "eval").exists()
    assert "--fold needs --split FILE" in error(evaluate.main, "--checkpoint", f"{nnunet_run}/checkpoints/last.pt",
                                                "--data", nnunet, "--out", tmp_path / "eval", "--fold", "0", code=2)
