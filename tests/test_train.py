"""python -m caml.train on the tiny preset: a run, its files, exact resume, SIGKILL + resume, bad
input, and DDP on two CPU processes (gloo)."""
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import pytest
import torch

from caml.config import TrainConfig, preset_config
from caml.train import build_parser, config_from_args, main

from .training_fixtures import ROOT, TINY, _env, cache  # noqa: F401  (fixtures)


def _env_vars(cache):
    return {**os.environ, "CAML_CACHE": cache, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
            "CAML_OPS_BACKEND": "reference", "PYTHONWARNINGS": "ignore"}


def _log(out) -> list[dict]:
    with open(os.path.join(out, "train_log.csv")) as f:
        return list(csv.DictReader(f))


def test_a_tiny_run_writes_the_run_folder(tmp_path):
    out = str(tmp_path / "run")
    assert main(TINY + ["--out", out, "--max-iters", "3", "--checkpoint-every", "2"]) == 0
    rows = _log(out)
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(float(r[k]))) for r in rows for k in ("loss", "loss_s", "loss_c", "loss_o"))
    assert all(0 <= float(r["occ_saturation"]) <= 1 for r in rows)
    checkpoint = torch.load(os.path.join(out, "checkpoints", "last.pt"), weights_only=True)
    assert checkpoint["iteration"] == 3 and checkpoint["memory"]["counts"].sum() > 0
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert {"dice", "jaccard", "hd95", "asd", "cases"} <= set(metrics) and len(metrics["cases"]) == 2
    assert json.load(open(os.path.join(out, "config.json")))["preset"] == "tiny"
    for name in ("losses.png", "overlays.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0


def test_resume_continues_exactly(tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    common = TINY + ["--checkpoint-every", "2", "--no-eval"]
    assert main(common + ["--out", straight, "--max-iters", "6"]) == 0
    assert main(common + ["--out", split, "--max-iters", "4"]) == 0
    assert main(["--resume", "--out", split, "--max-iters", "6", "--no-eval"]) == 0
    a, b = _log(straight), _log(split)
    assert [int(r["iteration"]) for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        for key in ("loss", "loss_s", "loss_c", "loss_o"):
            assert float(ra[key]) == float(rb[key]), (ra["iteration"], key)
    sa = torch.load(os.path.join(straight, "checkpoints", "last.pt"), weights_only=True)
    sb = torch.load(os.path.join(split, "checkpoints", "last.pt"), weights_only=True)
    for key, value in sa["model"].items():
        assert torch.equal(value, sb["model"][key]), key


def test_sigkill_then_resume_completes(tmp_path, cache):
    out = str(tmp_path / "killed")
    ckpt = os.path.join(out, "checkpoints", "last.pt")
    cmd = [sys.executable, "-m", "caml.train", *TINY, "--out", out, "--max-iters", "12", "--checkpoint-every", "1",
           "--no-eval"]
    proc = subprocess.Popen(cmd, env=_env_vars(cache), cwd=str(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not os.path.exists(ckpt) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert os.path.exists(ckpt), "no checkpoint before the kill"
    done = subprocess.run([sys.executable, "-m", "caml.train", "--resume", "--out", out, "--no-eval"],
                          env=_env_vars(cache), cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [int(r["iteration"]) for r in _log(out)] == list(range(1, 13))
    assert torch.load(ckpt, weights_only=True)["iteration"] == 12


def _one_line_error(capsys, argv, code=None):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("python -m caml.train: error:"), err
    assert "Traceback" not in err[0]
    return err[0]


def test_bad_input_gives_one_line(tmp_path, capsys, cache):
    assert "data folder not found" in _one_line_error(capsys, ["--data", str(tmp_path / "missing"), "--out",
                                                               str(tmp_path / "a")])
    assert "unknown preset" in _one_line_error(capsys, ["--preset", "huge"])
    assert "unknown ops backend" in _one_line_error(capsys, TINY + ["--ops-backend", "magic", "--out", str(tmp_path / "b")])
    assert "--labeled 50" in _one_line_error(capsys, TINY + ["--labeled", "50", "--out", str(tmp_path / "c")])
    assert "needs --data" in _one_line_error(capsys, ["--preset", "la"])
    assert "nothing to resume" in _one_line_error(capsys, ["--resume", "--out", str(tmp_path / "none")])
    assert "invalid int" in _one_line_error(capsys, ["--max-iters", "many"])
    assert "--memory-reshape: invalid choice" in _one_line_error(capsys, ["--memory-reshape", "view"])

    # a corrupt h5 file in a copy of the tiny dataset
    import shutil

    data = tmp_path / "data"
    shutil.copytree(os.path.join(cache, "synthetic-tiny"), data)
    case = (data / "train.list").read_text().split()[3]
    (data / "2018LA_Seg_Training Set" / case / "mri_norm2.h5").write_bytes(b"not an h5 file")
    line = _one_line_error(capsys, TINY + ["--data", str(data), "--out", str(tmp_path / "d")])
    assert case in line and "h5" in line


def test_the_official_behaviours_are_a_flag_away():
    default = config_from_args(build_parser().parse_args([]))
    assert (default.memory_reshape, default.occ_embedding, default.dropout) == ("permuted", "raw", False)
    assert preset_config("tiny").dropout and preset_config("la").dropout  # the official model's dropout
    official = config_from_args(build_parser().parse_args(
        ["--memory-reshape", "official", "--occ-embedding", "normalized", "--dropout", "on"]))
    assert (official.memory_reshape, official.occ_embedding, official.dropout) == ("official", "normalized", True)
    saved = {k: v for k, v in preset_config("small").to_json().items()
             if k not in ("memory_reshape", "occ_embedding", "dropout")}  # a config saved before the switches
    assert TrainConfig.from_json(saved, "config.json").memory_reshape == "permuted"
    with pytest.raises(ValueError, match="field occ_embedding is unknown"):
        TrainConfig.from_json({**saved, "occ_embedding": "cosine"}, "config.json")


def test_cli_module_exit_status(tmp_path, cache):
    done = subprocess.run([sys.executable, "-m", "caml.train", "--preset", "nope"], env=_env_vars(cache),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["python -m caml.train: error: unknown preset 'nope' (choose from "
                                                "la, small, tiny)"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes(tmp_path, cache):
    main(TINY + ["--out", str(tmp_path / "warm"), "--max-iters", "1", "--no-eval"])  # makes the dataset once
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "caml.train", *TINY, "--out", out, "--max-iters", "3",
           "--checkpoint-every", "3", "--device", "cpu"]
    done = subprocess.run(cmd, env=_env_vars(cache), cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = torch.load(os.path.join(out, "checkpoints", "last.pt"), weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2
    assert checkpoint["memory"]["counts"].sum() > 0
    assert json.load(open(os.path.join(out, "metrics.json")))["iteration"] == 3


def test_ops_backend_cuda_means_cuda_kernels_where_they_exist_and_triton_for_the_rest(monkeypatch, capsys):
    from caml_ops import _backend
    from caml.cli import UsageError
    from caml.train import select_ops_backend

    monkeypatch.delenv("CAML_OPS_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_selected", "auto")
    for flag in ("HAS_EXTENSION", "EXTENSION_HAS_CUDA", "HAS_TRITON"):
        monkeypatch.setattr(_backend, flag, True)
    assert select_ops_backend("cuda", torch.device("cuda", 0)) == "auto"
    said = capsys.readouterr().out.strip().splitlines()
    assert said == ["--ops-backend cuda: CUDA kernels for mutual_consistency_loss, cross_sample_attention; "
                    "Triton for omni_correlation_loss, intra_sample_attention, dropout (no CUDA kernels)"]
    monkeypatch.setattr(_backend, "EXTENSION_HAS_CUDA", False)
    with pytest.raises(UsageError, match="--ops-backend cuda: backend 'cuda' needs caml_ops._C built with CUDA"):
        select_ops_backend("cuda", torch.device("cuda", 0))
    with pytest.raises(UsageError, match="--ops-backend cuda: backend 'cuda' runs on CUDA tensors"):
        select_ops_backend("cuda", torch.device("cpu"))
    assert select_ops_backend("reference", torch.device("cpu")) == "reference"


def test_the_model_is_channels_last_and_cpu_amp_runs_bf16_only_where_native(tmp_path, monkeypatch, capsys):
    """The trainer's model is channels-last; --cpu-amp puts the network under bf16 autocast on a CPU with
    native bf16 and is refused, in one line, on one without (bf16 there is slower than float32)."""
    from caml import precision, trainer

    seen = {}
    real_init = trainer.Trainer.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        seen["autocast"] = self.objective.autocast_dtype
        seen["layout"] = self.model.encoder1.block_one.conv[0].weight.is_contiguous(
            memory_format=torch.channels_last_3d)

    monkeypatch.setattr(trainer.Trainer, "__init__", spy)
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert main(TINY + ["--out", str(tmp_path / "bf16"), "--max-iters", "1", "--no-eval", "--cpu-amp"]) == 0
    assert seen == {"autocast": torch.bfloat16, "layout": True}
    assert main(TINY + ["--out", str(tmp_path / "f32"), "--max-iters", "1", "--no-eval"]) == 0
    assert seen == {"autocast": None, "layout": True}
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset({"avx2"}))
    capsys.readouterr()
    assert main(TINY + ["--out", str(tmp_path / "refused"), "--max-iters", "1", "--cpu-amp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cpu-amp" in err[0] and "no native bf16" in err[0]
