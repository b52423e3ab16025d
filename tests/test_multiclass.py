"""Multi-class segmentation end to end: label sets (dataset.json in MSD and nnU-Net v2 style, --num-classes,
the value map to contiguous classes and back), the multi-structure synthetic data, per-class metrics checked
by hand, caml.train + caml.evaluate on the synthetic structures (LA h5 layout) and on a multi-label MSD folder
with non-contiguous label values, and the bad-input lines."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
from scipy import ndimage

from caml import evaluate, train
from caml.cli import print_metrics
from caml.data.labels import LabelSet, dataset_labels
from caml.data.source import open_source
from caml.data.synthetic import STRUCTURES, generate_synthetic_la, main as synthetic_main, make_case
from caml.metrics import SegmentationMetrics, case_metrics
from caml.models import CAML3d

from .nifti_helpers import nibabel, save, write_msd_folder

TINY = ["--preset", "tiny", "--threads", "1", "--eval-every", "1000", "--ops-backend", "reference",
        "--max-iters", "2"]
SYN = dict(cases=8, seed=0, test_cases=2, min_shape=(32, 32, 16), max_shape=(40, 40, 20))
BRATS_VALUES = (0, 1, 2, 4)  # non-contiguous, as BraTS labels
NAMES = STRUCTURES[:3]


@pytest.fixture(scope="module")
def structures(tmp_path_factory):
    """The synthetic data with background + 3 structures (LA h5 layout, dataset.json declaring them)."""
    return generate_synthetic_la(str(tmp_path_factory.mktemp("syn4")), classes=4, **SYN)


@pytest.fixture(scope="module")
def msd4(tmp_path_factory):
    return write_msd_folder(tmp_path_factory.mktemp("msd4"), labeled=6, unlabeled=2, label_values=BRATS_VALUES)


def _csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _train(*argv) -> int:
    return train.main(TINY + [str(a) for a in argv])


def _errors(capsys, main, argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return rc, err[0]


# --- label sets ---

def test_label_sets_from_dataset_json_and_num_classes(tmp_path):
    assert dataset_labels(str(tmp_path)) == LabelSet((0, 1), ("background", "foreground"))
    assert dataset_labels(str(tmp_path), 4).values == (0, 1, 2, 3)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "edema", "2": "core"}}))
    assert dataset_labels(str(tmp_path)) == LabelSet((0, 1, 2), ("background", "edema", "core"))
    assert dataset_labels(str(tmp_path), 3).num_classes == 3
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "enhancing": 4, "edema": 2,
                                                                  "necrosis": 1}}))
    labels = dataset_labels(str(tmp_path))  # nnU-Net v2 style, values in any order: class order is ascending
    assert labels.values == (0, 1, 2, 4) and labels.names == ("background", "necrosis", "edema", "enhancing")
    assert labels.foreground == ("necrosis", "edema", "enhancing")
    label = np.array([[0, 1], [2, 4]], np.int16)
    classes = labels.to_classes(label, "x")
    assert classes.dtype == np.uint8 and classes.tolist() == [[0, 1], [2, 3]]
    assert labels.to_values(classes).tolist() == label.tolist() and labels.to_values(classes).dtype == np.uint8
    assert LabelSet((0, 300), ("background", "x")).to_values(np.array([1])).dtype == np.uint16
    assert LabelSet.from_json(labels.to_json()) == labels


def test_label_set_bad_input(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"labels": {"0": "background", "1": "edema", "2": "core"}}))
    with pytest.raises(ValueError) as info:
        dataset_labels(str(tmp_path), 4)
    assert str(info.value) == (f"--num-classes 4 disagrees with the 3 labels [0, 1, 2] that {path} declares")
    for labels, problem in (({"0": "background"}, "background 0 and at least one class"),
                            ({"1": "a", "2": "b"}, "background 0 and at least one class"),
                            ({"0": "background", "1": "a", "2": "a"}, "label names must differ"),
                            ({"background": 0, "a": [1, 2]}, "cannot read")):
        path.write_text(json.dumps({"labels": labels}))
        with pytest.raises(ValueError, match=problem) as info:
            dataset_labels(str(tmp_path))
        assert str(path) in str(info.value)
    path.write_text(json.dumps({"labels": {"0": "background", "1": "a", "2": "b"}}))
    labels = dataset_labels(str(tmp_path))
    with pytest.raises(ValueError) as info:
        labels.to_classes(np.array([0, 3, 5, 2]), "label file f.nii.gz")
    assert str(info.value) == (f"label file f.nii.gz: unexpected values [3, 5] (allowed label values [0, 1, 2]; "
                               f"declared in {path})")
    with pytest.raises(ValueError, match=r"\[0, 1\]; binary by default: declare more classes in dataset.json's "
                       "labels or give --num-classes"):
        dataset_labels(str(tmp_path / "none")).to_classes(np.array([2]), "x")


# --- the multi-structure synthetic data ---

def test_synthetic_structures_share_the_binary_volumes(tmp_path):
    shape = (40, 36, 20)
    image2, label2 = make_case(np.random.default_rng([0, 3]), shape)
    image5, label5 = make_case(np.random.default_rng([0, 3]), shape, classes=5)
    assert np.array_equal(image2, image5)  # the same volume, more of it labeled
    assert np.array_equal(label5 == 1, label2 == 1)  # the atrium wins where structures overlap
    assert sorted(np.unique(label5)) == [0, 1, 2, 3, 4]
    four = make_case(np.random.default_rng([0, 3]), shape, classes=4)[1]
    assert np.array_equal(four, np.where(label5 == 4, 0, label5))

    generate_synthetic_la(str(tmp_path / "bin"), cases=2, min_shape=(16, 16, 16), max_shape=(16, 16, 16))
    assert not (tmp_path / "bin" / "dataset.json").exists()  # the binary output as it always was
    assert "classes" not in json.load(open(tmp_path / "bin" / "synthetic.json"))
    assert synthetic_main(["--out", str(tmp_path / "s4"), "--cases", "2", "--classes", "4", "--min-shape", "16", "16",
                           "16", "--max-shape", "16", "16", "16"]) == 0
    labels = open_source(str(tmp_path / "s4")).label_set
    assert labels.values == (0, 1, 2, 3) and labels.foreground == NAMES
    assert json.load(open(tmp_path / "s4" / "synthetic.json"))["classes"] == 4


def test_synthetic_classes_out_of_range(tmp_path, capsys):
    rc, line = _errors(capsys, synthetic_main, ["--out", tmp_path / "x", "--classes", "6"])
    assert rc == 2 and "--classes" in line and "invalid choice" in line
    with pytest.raises(ValueError, match="classes must be 2 .. 5"):
        make_case(np.random.default_rng(0), (16, 16, 16), classes=1)


# --- per-class metrics, by hand ---

def _cubes() -> tuple[np.ndarray, np.ndarray]:
    """Class 1: 2x2x2 cubes shifted by one voxel along x (4 of 8 voxels shared); class 2: identical
    cubes; class 3: in the ground truth only."""
    gt, pred = np.zeros((10, 10, 10), np.uint8), np.zeros((10, 10, 10), np.uint8)
    gt[1:3, 1:3, 1:3], pred[2:4, 1:3, 1:3] = 1, 1
    gt[6:8, 6:8, 6:8], pred[6:8, 6:8, 6:8] = 2, 2
    gt[1:3, 6:8, 1:3] = 3
    return pred, gt


def test_per_class_metrics_by_hand():
    pred, gt = _cubes()
    scores = SegmentationMetrics(classes=NAMES)
    case = scores("a", pred, gt)
    # class 1: Dice 2*4/16, Jaccard 4/12; every voxel of a 2-voxel-thick cube is surface: half of each cube's
    # surface is on the other's (distance 0), half one voxel away, so 95HD 1 and ASD 0.5
    assert case["classes"][NAMES[0]] == pytest.approx({"dice": 0.5, "jaccard": 1 / 3, "hd95": 1.0, "asd": 0.5})
    assert case["classes"][NAMES[1]] == pytest.approx({"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0})
    missing = case["classes"][NAMES[2]]
    assert missing["dice"] == 0 and missing["jaccard"] == 0 and np.isnan(missing["hd95"]) and np.isnan(missing["asd"])
    # the case: means over the foreground classes (distances over the classes that have them)
    assert {k: case[k] for k in ("dice", "jaccard", "hd95", "asd")} == pytest.approx(
        {"dice": 0.5, "jaccard": 4 / 9, "hd95": 0.5, "asd": 0.25})

    scores("b", gt, gt)  # a perfect case
    summary = scores.aggregate()
    assert summary["classes"][NAMES[0]]["dice"] == pytest.approx(0.75)
    assert summary["classes"][NAMES[2]]["dice"] == pytest.approx(0.5) and summary["classes"][NAMES[2]]["hd95"] == 0
    assert summary["dice"] == pytest.approx((0.75 + 1 + 0.5) / 3)  # the mean of the class means
    assert summary["hd95"] == pytest.approx((0.5 + 0 + 0) / 3)
    assert summary["num_cases"] == 2 and summary["distance_nan_cases"] == ["a"]
    # torch tensors score alike; two classes without class names: the binary metrics of the foreground
    from_tensors = SegmentationMetrics(classes=NAMES)("t", torch.from_numpy(pred), torch.from_numpy(gt))
    for name in NAMES:
        assert from_tensors["classes"][name] == pytest.approx(case["classes"][name], nan_ok=True)
    binary = SegmentationMetrics()("x", pred == 1, gt == 1)
    assert binary == case["classes"][NAMES[0]] and "classes" not in binary


def test_printed_table_per_class(capsys):
    pred, gt = _cubes()
    scores = SegmentationMetrics(classes=NAMES)
    scores("a", pred, gt)
    print_metrics(scores.aggregate(), "/x", "output folder")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["case", "class", "dice", "jaccard", "hd95", "asd"]
    assert lines[1].split() == ["a", "left", "atrium", "0.5000", "0.3333", "1.00", "0.50"]
    assert lines[4].split() == ["a", "mean", "0.5000", "0.4444", "0.50", "0.25"]
    assert [line.split()[0] for line in lines[5:9]] == ["mean"] * 4 and lines[9] == "output folder: /x"


# --- end to end ---

def _check_evaluate_outputs(out, source, labels: LabelSet, spacing_of) -> None:
    """The predictions hold the data's label values; metrics.csv's rows per case and class are the
    metrics of those predictions against the ground truth, its mean rows the means."""
    nib = nibabel()
    rows = _csv(out / "metrics.csv")
    names = list(labels.foreground)
    assert list(rows[0]) == ["case", "class", "dice", "jaccard", "hd95", "asd"]
    assert [(r["case"], r["class"]) for r in rows] == [(c, n) for c in source.test_cases + ["mean"]
                                                       for n in names + ["mean"]]
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["labels"] == labels.to_json() and list(metrics["classes"]) == names
    by_row = {(r["case"], r["class"]): r for r in rows}
    for case in source.test_cases:
        pred = np.asarray(nib.load(str(out / "predictions" / f"{case}.nii.gz")).dataobj)
        assert pred.dtype == np.uint8 and set(np.unique(pred)) <= set(labels.values)
        classes = labels.to_classes(pred, "prediction")
        gt = source.load(case)[1]
        for c, name in enumerate(names, 1):
            expected = case_metrics(classes == c, gt == c, spacing_of(case))
            for key, value in expected.items():
                assert float(by_row[case, name][key]) == pytest.approx(value, abs=1e-5, nan_ok=True), (case, name, key)
        assert float(by_row[case, "mean"]["dice"]) == pytest.approx(
            np.mean([float(by_row[case, n]["dice"]) for n in names]), abs=1e-5)
    for name in names:
        assert float(by_row["mean", name]["dice"]) == pytest.approx(
            np.mean([float(by_row[c, name]["dice"]) for c in source.test_cases]), abs=1e-5)
        assert metrics["classes"][name]["dice"] == pytest.approx(float(by_row["mean", name]["dice"]), abs=1e-5)
    assert metrics["dice"] == pytest.approx(np.mean([metrics["classes"][n]["dice"] for n in names]))


def test_train_and_evaluate_synthetic_structures(structures, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train("--data", structures, "--out", out, "--ce-weight", "0.5") == 0
    capsys.readouterr()
    checkpoint = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["labels"] == {"values": [0, 1, 2, 3], "names": ["background", *NAMES]}
    assert checkpoint["model"]["decoder1.out_conv.weight"].shape[0] == 4
    assert checkpoint["config"]["ce_weight"] == 0.5 and checkpoint["config"]["num_classes"] is None
    run_metrics = json.load(open(out / "metrics.json"))
    assert list(run_metrics["classes"]) == list(NAMES)
    for case, values in run_metrics["cases"].items():
        assert values["dice"] == pytest.approx(np.mean([values["classes"][n]["dice"] for n in NAMES]))
    assert (out / "overlays.png").stat().st_size > 0

    nibabel()
    ev = tmp_path / "eval"
    assert evaluate.main(["--checkpoint", str(out / "checkpoints" / "last.pt"), "--data", structures, "--out", str(ev),
                          "--threads", "1", "--largest-component"]) == 0
    source = open_source(structures)
    _check_evaluate_outputs(ev, source, source.label_set, lambda case: None)
    metrics = json.load(open(ev / "metrics.json"))
    for case in source.test_cases:  # the run's own evaluation scored the same model on the same cases
        assert metrics["cases"][case]["classes"].keys() == run_metrics["cases"][case]["classes"].keys()
        pred = np.asarray(nibabel().load(str(ev / "predictions" / f"{case}.nii.gz")).dataobj)
        for c in range(1, 4):  # --largest-component: one component per class at most
            assert ndimage.label(pred == c, structure=np.ones((3, 3, 3)))[1] <= 1


def test_train_and_evaluate_multi_label_msd(msd4, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train("--data", msd4, "--out", out, "--no-eval", "--num-classes", "4") == 0
    capsys.readouterr()
    ev = tmp_path / "eval"
    assert evaluate.main(["--checkpoint", str(out / "checkpoints" / "last.pt"), "--data", msd4, "--out", str(ev),
                          "--threads", "1", "--save-probs"]) == 0
    table = capsys.readouterr().out
    source = open_source(msd4, recorded=json.load(open(out / "split.json")))
    labels = source.label_set
    assert labels.values == BRATS_VALUES and labels.foreground == NAMES
    _check_evaluate_outputs(ev, source, labels, lambda case: source.geometry(case)[0])
    case = source.test_cases[0]
    probs = np.asarray(nibabel().load(str(ev / "probabilities" / f"{case}.nii.gz")).dataobj)
    pred = np.asarray(nibabel().load(str(ev / "predictions" / f"{case}.nii.gz")).dataobj)
    assert probs.shape == pred.shape + (4,)  # every class's probability, last axis; the label value of the argmax
    assert np.array_equal(pred, np.asarray(BRATS_VALUES, np.uint8)[probs.argmax(-1)])
    assert f"{case:<24}{'mean':<16}" in table


def test_value_map_trains_as_contiguous_classes(msd4, tmp_path):
    """Labels 0 / 1 / 2 / 4 train exactly as the same labels written 0 / 1 / 2 / 3."""
    contiguous = write_msd_folder(tmp_path / "msd0123", labeled=6, unlabeled=2, label_values=(0, 1, 2, 3))
    logs = []
    for name, data in (("brats", msd4), ("contiguous", contiguous)):
        assert _train("--data", data, "--out", tmp_path / name, "--no-eval") == 0
        rows = _csv(tmp_path / name / "train_log.csv")
        logs.append([{k: v for k, v in row.items() if k != "seconds"} for row in rows])
    assert logs[0] == logs[1] and len(logs[0]) == 2


# --- bad input ---

def _train_error(capsys, *argv) -> tuple[int, str]:
    rc, line = _errors(capsys, train.main, TINY + list(argv))
    assert rc != 0 and line.startswith("python -m caml.train: error:")
    return rc, line


def test_train_bad_input(structures, tmp_path, capsys):
    rc, line = _train_error(capsys, "--data", structures, "--out", tmp_path / "a", "--num-classes", "3")
    assert rc == 2 and line.endswith(f"--num-classes 3 disagrees with the 4 labels [0, 1, 2, 3] that "
                                     f"{os.path.join(structures, 'dataset.json')} declares")
    assert not (tmp_path / "a" / "checkpoints" / "last.pt").exists()
    assert "--num-classes must be >= 2, got 1" in _train_error(capsys, "--data", structures, "--out", tmp_path / "b",
                                                               "--num-classes", "1")[1]
    assert "--ce-weight must be >= 0" in _train_error(capsys, "--out", tmp_path / "c", "--ce-weight", "-1")[1]

    plain = tmp_path / "no_json"  # the structures without their dataset.json: binary unless --num-classes says more
    shutil.copytree(structures, plain)
    os.unlink(plain / "dataset.json")
    line = _train_error(capsys, "--data", plain, "--out", tmp_path / "e")[1]
    assert "unexpected values [2, 3] (allowed label values [0, 1]; binary by default" in line
    assert "--num-classes" in line
    line = _train_error(capsys, "--data", plain, "--out", tmp_path / "f", "--num-classes", "3")[1]
    assert "unexpected values [3] (allowed label values [0, 1, 2]; num_classes 3)" in line
    source = open_source(str(plain), num_classes=4)
    source.check(source.train_cases + source.test_cases)
    assert source.label_set.values == (0, 1, 2, 3)


def test_train_msd_undeclared_label_value(msd4, tmp_path, capsys):
    bad = tmp_path / "msd_value"
    shutil.copytree(msd4, bad)
    save(bad / "labelsTr" / "heart_002.nii.gz", np.full((32, 32, 16), 3, np.uint8))
    line = _train_error(capsys, "--data", bad, "--out", tmp_path / "d")[1]
    assert "heart_002.nii.gz: unexpected values [3] (allowed label values [0, 1, 2, 4]; declared in" in line


def test_evaluate_labels_disagree_with_the_data(structures, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train("--data", structures, "--out", run, "--no-eval") == 0
    capsys.readouterr()
    other = tmp_path / "other_values"  # the same cases, declared with other values
    shutil.copytree(structures, other)
    (other / "dataset.json").write_text(json.dumps({"labels": dict(zip(("background",) + NAMES, BRATS_VALUES))}))

    def error(checkpoint):
        out = tmp_path / "eval"
        rc, line = _errors(capsys, evaluate.main, ["--checkpoint", checkpoint, "--data", other, "--out", out])
        assert rc == 1 and line.startswith("python -m caml.evaluate: error:") and not out.exists()
        return line

    ckpt = run / "checkpoints" / "last.pt"
    assert error(ckpt).endswith(f"checkpoint {ckpt} predicts the label values [0, 1, 2, 3], but "
                                f"{other / 'dataset.json'} declares [0, 1, 2, 4]")
    official = tmp_path / "official.pth"
    torch.save(CAML3d(n_filters=2, feat_dim=8).state_dict(), official)  # two classes, as the official LA model
    assert error(official).endswith(f"checkpoint {official} predicts 2 classes, but 4 labels [0, 1, 2, 4] are "
                                    f"declared in {other / 'dataset.json'}")


def test_resume_refuses_changed_labels(structures, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(structures, data)
    run = tmp_path / "run"
    assert _train("--data", data, "--out", run, "--no-eval") == 0
    capsys.readouterr()
    declared = json.load(open(data / "dataset.json"))
    declared["labels"]["4"] = "aorta"  # the data now declares one class more
    (data / "dataset.json").write_text(json.dumps(declared))
    rc, line = _errors(capsys, train.main, ["--resume", "--out", str(run), "--max-iters", "3", "--no-eval"])
    assert rc == 2 and line == (f"python -m caml.train: error: --resume: the run was trained on the label values "
                                f"[0, 1, 2, 3], but the data in {data} now has [0, 1, 2, 3, 4]")
