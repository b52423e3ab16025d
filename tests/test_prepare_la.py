"""python -m caml.data.prepare_la on raw-challenge-like nrrd files the test writes itself: the official
normalisation and crop, the seeded split or given lists, determinism, and every bad-input path."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from caml.data import case_path, load_case, read_case_list
from caml.data.prepare_la import main

nrrd = pytest.importorskip("nrrd")  # pynrrd is optional (the GPU image lacks it); every test here writes nrrd

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (200, 180, 8)
BOX = (slice(90, 110), slice(70, 95), slice(2, 6))  # the atrium: 20 x 25 x 4 voxels


def write_raw(root, cases=5, label_values=(0, 255)) -> str:
    rng = np.random.default_rng(0)
    for i in range(cases):
        folder = Path(root) / f"CASE{i:02d}"
        folder.mkdir(parents=True)
        # unique increasing intensities: the crop's offset can be read back from its first voxel
        image = (np.arange(np.prod(SHAPE)).reshape(SHAPE) + 1000 * i).astype(np.float32)
        label = np.zeros(SHAPE, np.uint8)
        label[BOX] = label_values[1]
        label[BOX[0].start + rng.integers(0, 5), BOX[1].start, BOX[2].start] = label_values[0]
        nrrd.write(str(folder / "lgemri.nrrd"), image)
        nrrd.write(str(folder / "laendo.nrrd"), label)
    return str(root)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return write_raw(tmp_path_factory.mktemp("raw"))


def test_prepare_matches_the_official_preprocessing(raw, tmp_path, capsys):
    out = str(tmp_path / "la")
    assert main(["--raw", raw, "--out", out, "--seed", "3"]) == 0
    assert "4 train and 1 test" in capsys.readouterr().out
    train, test = read_case_list(out, "train"), read_case_list(out, "test")
    assert sorted(train + test) == [f"CASE{i:02d}" for i in range(5)] and len(test) == 1
    for case in train + test:
        image, label = load_case(case_path(out, case))
        raw_image = nrrd.read(os.path.join(raw, case, "lgemri.nrrd"))[0].astype(np.float64)
        raw_label = nrrd.read(os.path.join(raw, case, "laendo.nrrd"))[0]
        zs = (raw_image - raw_image.mean()) / raw_image.std()
        x0, y0, z0 = np.unravel_index(np.argmin(np.abs(zs - image[0, 0, 0])), SHAPE)
        w, h, d = image.shape
        assert z0 == 0 and d == SHAPE[2]  # depth keeps its full extent, as the official code
        np.testing.assert_allclose(image, zs[x0:x0 + w, y0:y0 + h], rtol=1e-5, atol=1e-5)  # z-scored over the volume
        assert np.array_equal(label, (raw_label[x0:x0 + w, y0:y0 + h] == 255).astype(np.uint8))  # 255 -> 1
        assert label.sum() == (raw_label == 255).sum()  # the whole atrium is inside the crop
        # margins: (112 - extent) // 2 padding plus 10..19 random voxels each side, clipped at the border
        for axis, (lo, extent, start, size) in enumerate(((90, 19, x0, w), (70, 24, y0, h))):
            pad = (112 - extent) // 2
            assert lo - pad - 19 <= start <= lo - pad - 10 or start == 0
            stop = start + size
            assert lo + extent + pad + 10 <= stop <= lo + extent + pad + 19 or stop == SHAPE[axis]

    again = str(tmp_path / "again")
    assert main(["--raw", raw, "--out", again, "--seed", "3"]) == 0
    other = str(tmp_path / "other")
    assert main(["--raw", raw, "--out", other, "--seed", "4"]) == 0
    shapes = {}
    for case in train:
        a, b = load_case(case_path(out, case)), load_case(case_path(again, case))
        assert all(np.array_equal(x, y) for x, y in zip(a, b))  # deterministic per seed
        shapes[case] = (a[0].shape, load_case(case_path(other, case))[0].shape)
    assert any(s != t for s, t in shapes.values())  # another seed, other margins


def test_given_lists_and_test_cases(raw, tmp_path):
    (tmp_path / "train.list").write_text("CASE03\nCASE01\n")
    (tmp_path / "test.list").write_text("CASE00\n")
    out = str(tmp_path / "la")
    assert main(["--raw", raw, "--out", out, "--train-list", str(tmp_path / "train.list"), "--test-list",
                 str(tmp_path / "test.list")]) == 0
    assert read_case_list(out, "train") == ["CASE03", "CASE01"] and read_case_list(out, "test") == ["CASE00"]
    assert sorted(os.listdir(os.path.join(out, "2018LA_Seg_Training Set"))) == ["CASE00", "CASE01", "CASE03"]
    out = str(tmp_path / "la2")
    assert main(["--raw", raw, "--out", out, "--test-cases", "2"]) == 0
    assert len(read_case_list(out, "test")) == 2 and len(read_case_list(out, "train")) == 3


def _one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:  # argparse errors exit; the others return
        raise SystemExit(main([str(a) for a in argv]))
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code != 0
    assert len(err) == 1 and err[0].startswith("python -m caml.data.prepare_la: error:"), err
    return err[0]


def test_bad_input(raw, tmp_path, capsys):
    out = tmp_path / "out"

    def error(raw_dir, *extra):
        line = _one_line_error(capsys, ["--raw", raw_dir, "--out", out, *extra])
        assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
        return line

    assert "raw data folder not found" in error(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "holds no <case>/lgemri.nrrd" in error(tmp_path / "empty")
    assert "case list not found" in error(raw, "--train-list", tmp_path / "none", "--test-list", tmp_path / "none")
    (tmp_path / "bad.list").write_text("CASE99\n")
    assert "CASE99" in error(raw, "--train-list", tmp_path / "bad.list", "--test-list", tmp_path / "bad.list")
    assert "both --train-list and --test-list" in error(raw, "--train-list", tmp_path / "bad.list")
    assert "--test-cases" in error(raw, "--test-cases", "5")
    assert "required" in _one_line_error(capsys, ["--raw", raw])

    def broken(name, edit):
        root = tmp_path / f"raw_{name}"
        write_raw(root, cases=3)
        path = edit(root / "CASE01")
        line = error(root)
        assert str(path) in line, line
        return line

    def corrupt(case_dir):
        (case_dir / "lgemri.nrrd").write_bytes(b"NRRD0004\ngarbage")
        return case_dir / "lgemri.nrrd"

    assert "cannot read nrrd" in broken("corrupt", corrupt)
    assert "not found" in broken("nolabel", lambda c: (c / "laendo.nrrd").unlink() or c / "laendo.nrrd")
    assert "differs" in broken("shape", lambda c: nrrd.write(str(c / "laendo.nrrd"), np.zeros((4, 4, 4), np.uint8))
                               or c / "laendo.nrrd")
    label = np.zeros(SHAPE, np.uint8)
    label[BOX] = 128
    assert "unexpected label values [128]" in broken("values", lambda c: nrrd.write(str(c / "laendo.nrrd"), label)
                                                     or c / "laendo.nrrd")
    assert "empty" in broken("empty", lambda c: nrrd.write(str(c / "laendo.nrrd"), np.zeros(SHAPE, np.uint8))
                             or c / "laendo.nrrd")
    nan_image = np.ones(SHAPE, np.float32)
    nan_image[0, 0, 0] = np.nan
    assert "not finite" in broken("nan", lambda c: nrrd.write(str(c / "lgemri.nrrd"), nan_image) or c / "lgemri.nrrd")
    assert "constant" in broken("constant", lambda c: nrrd.write(str(c / "lgemri.nrrd"), np.full(SHAPE, 7, np.int16))
                                or c / "lgemri.nrrd")

    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert "not empty" in _one_line_error(capsys, ["--raw", raw, "--out", out])
    assert (out / "keep.txt").exists()
    assert main(["--raw", raw, "--out", str(out), "--overwrite"]) == 0 and not (out / "keep.txt").exists()
    assert "must not be or contain" in _one_line_error(capsys, ["--raw", raw, "--out", Path(raw).parent, "--overwrite"])


def test_cli_module(raw, tmp_path):
    done = subprocess.run([sys.executable, "-m", "caml.data.prepare_la", "--raw", raw, "--out", str(tmp_path / "o")],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert read_case_list(str(tmp_path / "o"), "test")
