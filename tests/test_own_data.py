"""The three parts of "your own data" together: a two-channel nnU-Net folder with three foreground
classes, trained with a validation split, its best-on-validation checkpoint evaluated per class."""
import csv
import json
import os

import numpy as np
import pytest

from caml import evaluate, train

from .nifti_helpers import nibabel, save, write_nnunet_folder
from .training_fixtures import TINY, _env, cache  # noqa: F401  (fixtures)

CLASSES = {"background": 0, "left": 1, "middle": 2, "right": 4}  # non-contiguous values: 4 is class 3


def _three_structures(root: str) -> None:
    """The binary target of each labeled case cut into thirds along x, labeled 1, 2 and 4."""
    labels = os.path.join(root, "labelsTr")
    for name in sorted(os.listdir(labels)):
        path = os.path.join(labels, name)
        target = np.asarray(nibabel().load(path).dataobj) > 0
        thirds = np.minimum(np.arange(target.shape[0]) * 3 // target.shape[0], 2)
        values = np.array([1, 2, 4], np.uint8)[thirds][:, None, None]
        save(path, np.where(target, values, 0).astype(np.uint8))
    meta_path = os.path.join(root, "dataset.json")
    meta = json.load(open(meta_path))
    json.dump({**meta, "labels": CLASSES}, open(meta_path, "w"))


def test_two_channels_three_classes_validation_split_and_best_checkpoint(tmp_path, capsys):
    nibabel()
    data = write_nnunet_folder(tmp_path / "data", labeled=6, unlabeled=2)
    _three_structures(data)
    out = str(tmp_path / "run")
    assert train.main(TINY + ["--data", data, "--out", out, "--val", "1", "--max-iters", "4", "--eval-every", "2",
                              "--labeled", "2"]) == 0, capsys.readouterr().err
    split = json.load(open(os.path.join(out, "split.json")))
    assert split["unlabeled"] == ["case_006", "case_007"]  # no _0001 channel file, no imagesTs image
    assert len(split["val"]) == 1 and not set(split["val"]) & set(split["test"] + split["train"])
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["in_channels"] == 2 and config["labels"]["values"] == [0, 1, 2, 4]

    capsys.readouterr()
    best = os.path.join(out, "checkpoints", "best.pt")
    assert evaluate.main(["--checkpoint", best, "--data", data, "--out", str(tmp_path / "eval"), "--threads", "1"]) == 0
    assert "selected on the validation cases" in capsys.readouterr().out
    metrics = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert metrics["checkpoint_selection"] == "best-on-validation"
    assert list(metrics["classes"]) == ["left", "middle", "right"]
    with open(tmp_path / "eval" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for case in split["test"]:
        assert [r["class"] for r in rows if r["case"] == case] == ["left", "middle", "right", "mean"]
        prediction = np.asarray(nibabel().load(tmp_path / "eval" / "predictions" / f"{case}.nii.gz").dataobj)
        assert set(np.unique(prediction)) <= {0, 1, 2, 4}
        mean_row = next(r for r in rows if r["case"] == case and r["class"] == "mean")
        per_class = [float(r["dice"]) for r in rows if r["case"] == case and r["class"] != "mean"]
        assert float(mean_row["dice"]) == pytest.approx(np.nanmean(per_class), abs=1e-4)
