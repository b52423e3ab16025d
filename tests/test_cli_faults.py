"""Every CLI fault is one clear line: the file or flag and the problem, a non-zero exit, no traceback and
nothing half-written (python -m caml.train, caml.evaluate, caml.data.synthetic on the tiny preset)."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from caml import evaluate, train
from caml.data import synthetic, write_case
from caml.models import CAML3d

from .training_fixtures import ROOT, TINY, _env, cache  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def finished(cache, tmp_path_factory):
    """A finished tiny run (2 iterations, checkpoint and final evaluation at 2); tests copy it."""
    os.environ["CAML_CACHE"], os.environ["CAML_OPS_BACKEND"] = cache, "reference"
    out = str(tmp_path_factory.mktemp("runs") / "done")
    threads = torch.get_num_threads()
    assert train.main(TINY + ["--out", out, "--max-iters", "2", "--checkpoint-every", "2"]) == 0
    torch.set_num_threads(threads)
    return out


def _copy(run, tmp_path) -> str:
    dest = str(tmp_path / "run")
    shutil.copytree(run, dest)
    return dest


def _line(capsys, main, argv, prog) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0, err
    assert len(err) == 1 and err[0].startswith(f"python -m {prog}: error:"), err
    return err[0]


def _train_error(capsys, *argv) -> str:
    return _line(capsys, train.main, argv, "caml.train")


def _iterations(path) -> list[int]:
    with open(path) as f:
        return [int(r["iteration"]) for r in csv.DictReader(f)]


# ---------------------------------------------------------------- --out


def test_out_is_a_file(tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("keep")
    line = _train_error(capsys, *TINY, "--out", out)
    assert "--out" in line and str(out) in line and "not a folder" in line
    assert _line(capsys, synthetic.main, ["--out", out, "--cases", "2"], "caml.data.synthetic").count(str(out)) == 1
    below = tmp_path / "taken" / "run"  # a file on the way to the folder
    assert str(out) in _train_error(capsys, *TINY, "--out", below)
    assert out.read_text() == "keep"


# ---------------------------------------------------------------- caml.data.synthetic


def test_synthetic_errors_are_one_line(tmp_path, capsys):
    out = tmp_path / "syn"
    assert "cases" in _line(capsys, synthetic.main, ["--out", out, "--cases", "1"], "caml.data.synthetic")
    assert "--seed" in _line(capsys, synthetic.main, ["--out", out, "--seed", "-1"], "caml.data.synthetic")
    assert "--cases" in _line(capsys, synthetic.main, ["--out", out, "--cases", "x"], "caml.data.synthetic")
    assert "--min-shape" in _line(capsys, synthetic.main, ["--out", out, "--min-shape", "8", "8", "8"],
                                  "caml.data.synthetic")
    assert not out.exists()


# ---------------------------------------------------------------- numeric flags


@pytest.mark.parametrize("flag, value", [("--lr", "nan"), ("--lr", "inf"), ("--lr", "-1"), ("--seed", "-1"),
                                         ("--num-workers", "-1"), ("--threads", "0"), ("--split-seed", "-2"),
                                         ("--max-iters", "0"), ("--memory-cap", "0"), ("--labeled", "0")])
def test_numeric_flags_are_validated_up_front(tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    line = _train_error(capsys, *TINY, "--out", out, flag, value)
    assert flag in line and value in line, line
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only machine")
def test_triton_backend_on_a_cpu_only_machine(tmp_path, cache):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CAML_CACHE=cache, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONWARNINGS="ignore")
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "caml.train", *TINY, "--out", str(out), "--ops-backend", "triton"],
                          env=env, capture_output=True, text=True, timeout=120)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1 and "--ops-backend triton" in err[0], err
    assert not out.exists()


# ---------------------------------------------------------------- --resume


def test_resume_with_a_broken_config(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    config = os.path.join(run, "config.json")
    for content in ("{not json", "[1, 2]", json.dumps({**json.load(open(os.path.join(finished, "config.json"))),
                                                       "lr": "fast"})):
        with open(config, "w") as f:
            f.write(content)
        line = _train_error(capsys, "--resume", "--out", run)
        assert config in line, line
    assert "lr" in line


def test_resume_refuses_flags_that_differ_from_the_run(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    before = open(os.path.join(run, "train_log.csv")).read()
    line = _train_error(capsys, "--resume", "--out", run, "--lr", "0.1", "--labeled", "3", "--seed", "5",
                        "--max-iters", "3")
    for flag in ("--lr 0.1", "--labeled 3", "--seed 5"):
        assert flag in line, line
    assert "--max-iters 3" not in line and "--max-iters" in line  # named as one that may change
    assert open(os.path.join(run, "train_log.csv")).read() == before
    assert torch.load(os.path.join(run, "checkpoints", "last.pt"), weights_only=True)["iteration"] == 2
    # the saved values themselves, and the flags that may change, are accepted
    assert train.main(["--resume", "--out", run, "--lr", "0.05", "--preset", "tiny", "--max-iters", "3",
                       "--threads", "1", "--no-eval"]) == 0
    assert _iterations(os.path.join(run, "train_log.csv")) == [1, 2, 3]


def test_hand_edited_config_in_a_checkpoint(finished, cache, tmp_path, capsys):
    checkpoint = torch.load(os.path.join(finished, "checkpoints", "last.pt"), weights_only=True)
    checkpoint["config"]["patch_size"] = 32
    path = tmp_path / "edited.pt"
    torch.save(checkpoint, path)
    line = _line(capsys, evaluate.main, ["--checkpoint", path, "--data", os.path.join(cache, "synthetic-tiny"),
                                         "--out", tmp_path / "eval"], "caml.evaluate")
    assert str(path) in line and "patch_size" in line, line
    assert not (tmp_path / "eval").exists()


def test_resuming_a_finished_run_logs_each_iteration_once(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    assert _iterations(os.path.join(run, "val_log.csv")) == [2]
    for _ in range(2):
        assert train.main(["--resume", "--out", run, "--threads", "1"]) == 0
    assert _iterations(os.path.join(run, "val_log.csv")) == [2]
    assert _iterations(os.path.join(run, "train_log.csv")) == [1, 2]


def test_a_torn_log_row_does_not_survive_a_resume(finished, tmp_path):
    run = _copy(finished, tmp_path)
    log = os.path.join(run, "train_log.csv")
    with open(log) as f:
        text = f.read()
    with open(log, "w") as f:
        f.write(text + "1")  # killed while writing the row of an iteration 10 or more: "1" of "1x,..." is left
    assert train.main(["--resume", "--out", run, "--threads", "1", "--max-iters", "3", "--no-eval"]) == 0
    with open(log) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3]
    assert all(r[k] not in (None, "") for r in rows for k in r), rows


def test_stale_checkpoint_temporaries_are_removed(finished, tmp_path):
    run = _copy(finished, tmp_path)
    stale = os.path.join(run, "checkpoints", ".tmp-last.pt-abc123.pt")  # a kill during a checkpoint write
    with open(stale, "wb") as f:
        f.write(b"half a checkpoint")
    assert train.main(["--resume", "--out", run, "--threads", "1", "--max-iters", "3", "--no-eval"]) == 0
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["last.pt"]


def test_ctrl_c_before_the_first_checkpoint(finished, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train", interrupted)
    out = tmp_path / "run"
    assert train.main(TINY + ["--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "..." not in err[0] and "nothing to resume" in err[0], err

    run = _copy(finished, tmp_path)  # a run with a checkpoint: the message names its folder
    assert train.main(["--resume", "--out", run]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--resume --out {run}" in err[0], err


# ---------------------------------------------------------------- caml.evaluate


def test_case_names_are_names_not_paths(cache, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(_tiny_data(cache), data)
    (data / "test.list").write_text("../../x/evil\n")
    image, label = np.zeros((32, 32, 16), np.float32), np.zeros((32, 32, 16), np.uint8)
    write_case(str(data), "../../x/evil", image, label)  # the file the name points at exists
    model = tmp_path / "official.pth"
    torch.save(CAML3d(n_filters=2, feat_dim=8).state_dict(), model)
    out = tmp_path / "deep" / "eval"
    line = _line(capsys, evaluate.main, ["--checkpoint", model, "--data", data, "--out", out, "--patch-size", 32, 32,
                                         16, "--strides", 16, 16, 8, "--threads", "1"], "caml.evaluate")
    assert "test.list" in line and "../../x/evil" in line, line
    assert not [p for p in tmp_path.rglob("evil*") if p.is_file() and p.suffix != ".h5"]
    assert not out.exists()


def _tiny_data(cache) -> str:
    from caml.config import PRESETS

    syn = PRESETS["tiny"]["synthetic"]
    return synthetic.ensure_synthetic_la(os.path.join(cache, "synthetic-tiny"), cases=syn["cases"], seed=syn["seed"],
                                         test_cases=syn["test_cases"], min_shape=syn["min_shape"],
                                         max_shape=syn["max_shape"])
