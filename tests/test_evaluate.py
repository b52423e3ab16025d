"""python -m caml.evaluate end to end on tiny data: a checkpoint of caml.train (LA h5 layout and MSD
folder, the split recorded by the run), an official-style raw state_dict, the CSV / NIfTI / PNG outputs
checked against what they claim, and every bad-input path (one line, non-zero exit, nothing left)."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from caml import evaluate, train
from caml.config import PRESETS
from caml.data.synthetic import ensure_synthetic_la
from caml.data.source import open_source
from caml.metrics import case_metrics
from caml.models import CAML3d

from .nifti_helpers import SPACING, affine_of, nibabel, save, write_msd_folder

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--threads", "1", "--eval-every", "1000", "--ops-backend", "reference",
        "--max-iters", "2"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MSD_SHAPE = (28, 40, 16)


@pytest.fixture(scope="module")
def la(tmp_path_factory):
    syn = PRESETS["tiny"]["synthetic"]
    return ensure_synthetic_la(str(tmp_path_factory.mktemp("la")), cases=syn["cases"], seed=syn["seed"],
                               test_cases=syn["test_cases"], min_shape=syn["min_shape"], max_shape=syn["max_shape"])


@pytest.fixture(scope="module")
def la_run(la, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "la")
    assert train.main(TINY + ["--data", la, "--out", out, "--no-eval"]) == 0
    return out


@pytest.fixture(scope="module")
def msd(tmp_path_factory):
    # x narrower than the tiny patch (32, 32, 16): padded in training and inference; y wider: several windows
    return write_msd_folder(tmp_path_factory.mktemp("msd"), labeled=6, unlabeled=2, shape=MSD_SHAPE)


@pytest.fixture(scope="module")
def msd_run(msd, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "msd")
    assert train.main(TINY + ["--data", msd, "--out", out]) == 0
    return out


def _csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _run(argv, capsys):
    rc = evaluate.main([str(a) for a in argv])
    return rc, capsys.readouterr()


def test_la_checkpoint_outputs_hold_what_they_claim(la, la_run, tmp_path, capsys):
    nib = nibabel()
    out = tmp_path / "eval"
    rc, io = _run(["--checkpoint", f"{la_run}/checkpoints/last.pt", "--data", la, "--out", out, "--save-probs",
                   "--threads", "1"], capsys)
    assert rc == 0, io.err
    assert "no model selection" in io.out and "iteration 2 of 2" in io.out
    source = open_source(la)
    rows = _csv(out / "metrics.csv")
    assert [r["case"] for r in rows] == source.test_cases + ["mean"]
    metrics = json.load(open(out / "metrics.json"))
    assert "no model selection" in metrics["protocol"] and metrics["distance_units"] == "voxels"
    for row in rows[:-1]:
        case = row["case"]
        image, label = source.load(case)
        pred = nib.load(str(out / "predictions" / f"{case}.nii.gz"))
        prob = np.asarray(nib.load(str(out / "probabilities" / f"{case}.nii.gz")).dataobj)
        pred = np.asarray(pred.dataobj)
        assert pred.shape == label.shape == prob.shape and pred.dtype == np.uint8
        assert prob.min() >= 0 and prob.max() <= 1
        assert np.array_equal(pred, (prob > 0.5).astype(np.uint8))
        expected = case_metrics(pred, label, None)  # the h5 layout: voxel units
        for key in ("dice", "jaccard", "hd95", "asd"):
            assert float(row[key]) == pytest.approx(expected[key], abs=1e-5, nan_ok=True), (case, key)
        assert (out / "overlays" / f"{case}.png").read_bytes()[:8] == PNG_MAGIC
    means = {k: np.nanmean([float(r[k]) for r in rows[:-1]]) for k in ("dice", "jaccard")}
    assert float(rows[-1]["dice"]) == pytest.approx(means["dice"], abs=1e-5)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # the temporary folder was moved


def test_msd_run_records_split_and_evaluate_scores_it(msd, msd_run, tmp_path, capsys):
    nib = nibabel()
    split = json.load(open(os.path.join(msd_run, "split.json")))
    assert split["layout"] == "msd" and len(split["test"]) == 1 and len(split["train"]) == 5
    assert split["unlabeled"] == ["heart_006", "heart_007"]
    checkpoint = torch.load(os.path.join(msd_run, "checkpoints", "last.pt"), weights_only=True)
    assert checkpoint["split"] == split
    run_metrics = json.load(open(os.path.join(msd_run, "metrics.json")))
    assert list(run_metrics["cases"]) == split["test"]

    out = tmp_path / "eval"
    rc, io = _run(["--checkpoint", f"{msd_run}/checkpoints/last.pt", "--data", msd, "--out", out, "--threads", "1"],
                  capsys)
    assert rc == 0, io.err
    assert "recorded with the checkpoint" in io.out
    rows = _csv(out / "metrics.csv")
    assert [r["case"] for r in rows] == split["test"] + ["mean"]
    case = split["test"][0]
    pred = nib.load(str(out / "predictions" / f"{case}.nii.gz"))
    assert np.allclose(pred.affine, affine_of()) and pred.header.get_zooms()[:3] == pytest.approx(SPACING)
    label = np.asarray(nib.load(os.path.join(msd, "labelsTr", f"{case}.nii.gz")).dataobj)
    expected = case_metrics(np.asarray(pred.dataobj), label, SPACING)  # distances in the header's spacing
    for key in ("dice", "hd95", "asd"):
        assert float(rows[0][key]) == pytest.approx(expected[key], abs=1e-5, nan_ok=True)
        # the run's own final evaluation agrees (same model, same case, same spacing; JSON writes nan as null)
        run_value = run_metrics["cases"][case][key]
        assert (float("nan") if run_value is None else run_value) == pytest.approx(expected[key], abs=1e-5, nan_ok=True)
    assert json.load(open(out / "metrics.json"))["distance_units"].startswith("header spacing")


def test_msd_split_file_and_resume_keeps_split(msd, tmp_path):
    split_file = tmp_path / "my_split.json"
    split_file.write_text(json.dumps({"train": ["heart_004", "heart_002", "heart_001"],
                                      "test": ["heart_000", "heart_003", "heart_005"]}))
    out = str(tmp_path / "run")
    assert train.main(TINY + ["--data", msd, "--out", out, "--split", str(split_file), "--no-eval"]) == 0
    split = json.load(open(os.path.join(out, "split.json")))
    assert split["test"] == ["heart_000", "heart_003", "heart_005"]
    assert split["train"] == ["heart_004", "heart_002", "heart_001"]
    split_file.unlink()  # resume reads the run's split.json, not the (now gone) file
    assert train.main(["--resume", "--out", out, "--max-iters", "3", "--no-eval", "--threads", "1"]) == 0
    assert json.load(open(os.path.join(out, "split.json"))) == split


def test_official_state_dict_and_largest_component(la, tmp_path, capsys):
    nib = nibabel()
    torch.manual_seed(0)
    model = CAML3d(n_filters=2, feat_dim=8)
    path = tmp_path / "official.pth"
    torch.save(model.state_dict(), path)  # a raw state_dict, as the official code saves
    out = tmp_path / "eval"
    rc, io = _run(["--checkpoint", path, "--data", la, "--out", out, "--patch-size", 32, 32, 16, "--strides", 16, 16, 8,
                   "--largest-component", "--threads", "1"], capsys)
    assert rc == 0, io.err
    assert "official checkpoint" in io.out
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["checkpoint_kind"] == "official" and metrics["largest_component"] is True
    for case in metrics["cases"]:
        pred = np.asarray(nib.load(str(out / "predictions" / f"{case}.nii.gz")).dataobj)
        assert ndimage.label(pred, structure=np.ones((3, 3, 3)))[1] <= 1


def _one_line_error(capsys, argv) -> str:
    rc = evaluate.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("python -m caml.evaluate: error:"), err
    return err[0]


def test_bad_input(la, la_run, msd, msd_run, tmp_path, capsys):
    ckpt = f"{msd_run}/checkpoints/last.pt"
    out = tmp_path / "out"

    def error(**kw):
        args = {"--checkpoint": ckpt, "--data": msd, "--out": out, **kw}
        line = _one_line_error(capsys, [x for k, v in args.items() if v is not None for x in (k, v)])
        assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
        return line

    assert "checkpoint not found" in error(**{"--checkpoint": tmp_path / "none.pt"})
    (tmp_path / "corrupt.pt").write_bytes(b"garbage")
    assert "corrupt.pt" in error(**{"--checkpoint": tmp_path / "corrupt.pt"})
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    assert "not a CAML3d checkpoint" in error(**{"--checkpoint": tmp_path / "other.pt"})
    assert "data folder not found" in error(**{"--data": tmp_path / "missing"})
    (tmp_path / "empty").mkdir()
    assert "is empty" in error(**{"--data": tmp_path / "empty"})
    assert "split file not found" in error(**{"--split": tmp_path / "none.json"})
    assert "required" in error(**{"--out": None})
    assert "is a run folder" in _one_line_error(capsys, ["--checkpoint", ckpt, "--data", msd, "--out", msd_run])

    # a LA folder without test.list
    la_copy = tmp_path / "la_copy"
    shutil.copytree(la, la_copy)
    (la_copy / "test.list").unlink()
    assert "test.list" in error(**{"--checkpoint": f"{la_run}/checkpoints/last.pt", "--data": la_copy})
    # a corrupt h5 test case
    shutil.copy(os.path.join(la, "test.list"), la_copy / "test.list")
    case = (la_copy / "test.list").read_text().split()[0]
    (la_copy / "2018LA_Seg_Training Set" / case / "mri_norm2.h5").write_bytes(b"not an h5 file")
    line = error(**{"--checkpoint": f"{la_run}/checkpoints/last.pt", "--data": la_copy})
    assert "cannot read h5 file" in line and case in line

    test_case = json.load(open(os.path.join(msd_run, "split.json")))["test"][0]
    for name, label in (("corrupt", None), ("shape", np.zeros((28, 40, 15), np.uint8)),
                        ("values", np.full(MSD_SHAPE, 3, np.uint8))):
        bad = tmp_path / f"msd_{name}"
        shutil.copytree(msd, bad)
        label_path = bad / "labelsTr" / f"{test_case}.nii.gz"
        if label is None:
            label_path.write_bytes(b"\x1f\x8b\x08 truncated")
        else:
            save(label_path, label)
        line = error(**{"--data": bad})
        assert f"{test_case}.nii.gz" in line, line
    # a truncated image: the header reads, the voxels do not (fails mid-run: nothing is left behind)
    bad = tmp_path / "msd_truncated"
    shutil.copytree(msd, bad)
    image_path = bad / "imagesTr" / f"{test_case}.nii.gz"
    image_path.write_bytes(image_path.read_bytes()[:400])
    assert f"{test_case}.nii.gz" in error(**{"--data": bad})


def test_train_msd_bad_input(msd, tmp_path, capsys):
    def error(*argv):
        rc = train.main(TINY + [str(a) for a in argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc != 0 and len(err) == 1 and err[0].startswith("python -m caml.train: error:"), err
        return err[0]

    assert "more labeled training cases" in error("--data", msd, "--out", tmp_path / "a", "--labeled", "6")
    assert "split file not found" in error("--data", msd, "--out", tmp_path / "b", "--split", tmp_path / "none.json")
    (tmp_path / "empty").mkdir()
    assert "is empty" in error("--data", tmp_path / "empty", "--out", tmp_path / "c")
    bad = tmp_path / "msd_values"
    shutil.copytree(msd, bad)
    save(bad / "labelsTr" / "heart_001.nii.gz", np.full(MSD_SHAPE, 255, np.uint8))
    assert "heart_001.nii.gz" in error("--data", bad, "--out", tmp_path / "d")
    save(bad / "labelsTr" / "heart_001.nii.gz", np.zeros(MSD_SHAPE, np.uint8))
    (bad / "imagesTr" / "heart_006.nii.gz").write_bytes(b"not a nifti")  # an unlabeled image
    assert "heart_006.nii.gz" in error("--data", bad, "--out", tmp_path / "e")


def test_cli_module_exit_status(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "caml.evaluate", "--checkpoint", str(tmp_path / "x.pt"), "--data",
                           str(tmp_path), "--out", str(tmp_path / "o")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"python -m caml.evaluate: error: checkpoint not found: "
                                                f"{tmp_path / 'x.pt'}"]
