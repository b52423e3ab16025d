"""python -m caml.train's settings and protocol on the tiny preset: the paper's knobs as flags, a --config
file under the flags, --print-config, the official script's flag names, the validation split (--val) with
best.pt, iter_N.pt, the labelled --select-on-test, caml.evaluate naming the checkpoint it scores, and a
multi-seed run's summary."""
import csv
import json
import os
import statistics

import pytest
import torch

from caml import evaluate, train
from caml.config import OFFICIAL_NAMES, RECORD_KEYS, TRAIN_FLAGS, TUPLE_FIELDS, flag_of, preset_config
from caml.models import CAML3d

from .nifti_helpers import nibabel, write_msd_folder
from .training_fixtures import TINY, _env, cache  # noqa: F401  (fixtures)

# Validation at every iteration from the first: a selection among six iterates.
SELECTING = TINY + ["--eval-every", "1", "--eval-start", "1", "--max-iters", "6"]


def _config(*argv) -> "TrainConfig":  # noqa: F821
    return train.config_from_args(train.parse_args([str(a) for a in argv]))


def _error(capsys, *argv, code=2) -> str:
    rc = train.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code and len(err) == 1 and err[0].startswith("python -m caml.train: error:"), (rc, err)
    return err[0]


def _rows(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _checkpoint(run, name) -> dict:
    return torch.load(os.path.join(run, "checkpoints", name), weights_only=True)


def _same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(value, b["model"][key]) for key, value in a["model"].items())


# ---------------------------------------------------------------- settings


def test_every_official_hyper_parameter_is_a_flag():
    cfg = _config("--preset", "tiny", "--lamda", 0.3, "--consistency", 0.7, "--consistency-o", 0.02,
                  "--consistency-rampup", 5, "--rampup-interval", 3, "--temperature", 0.2, "--memory-num", 8,
                  "--num-filtered", 32, "--embedding-dim", 16, "--labeled-bs", 1, "--batch-size", 3, "--lr", 0.02,
                  "--momentum", 0.8, "--weight-decay", 0.001, "--max-train-cases", 5, "--max-iters", 7)
    assert (cfg.lamda, cfg.consistency, cfg.consistency_o, cfg.rampup_length, cfg.rampup_interval) == \
        (0.3, 0.7, 0.02, 5.0, 3)
    assert (cfg.temperature, cfg.memory_num, cfg.num_filtered, cfg.feat_dim, cfg.labeled_bs, cfg.batch_size) == \
        (0.2, 8, 32, 16, 1, 3)
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.max_train_cases, cfg.max_iters) == (0.02, 0.8, 0.001, 5, 7)
    untouched = _config("--preset", "tiny")
    assert untouched == preset_config("tiny")  # no flag, no change
    for name in OFFICIAL_NAMES.values():  # every official setting has a flag of ours
        assert name not in vars(untouched) or name in TRAIN_FLAGS, name


def test_help_shows_the_presets_values(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "training iterations [--max_iteration] (presets: la 15000, small 300, tiny 4)" in text
    assert "[--lamda] (default 0.5)" in text
    assert "[--embedding_dim: 64 in its argparse, 32 in its model] (presets: la 32, small 32, tiny 8)" in text


@pytest.mark.parametrize("official", sorted(OFFICIAL_NAMES))
def test_official_flag_names_get_a_hint(capsys, tmp_path, official):
    ours = OFFICIAL_NAMES[official]
    if f"--{official}" == flag_of(ours):
        return  # the same flag here (none today: --lamda, --seed, ... are not in the table)
    line = _error(capsys, "--preset", "tiny", f"--{official}=3", "--out", tmp_path / "run")
    assert f"--{official} is a flag of the official train_caml.py" in line
    assert (f"use {flag_of(ours)}" if ours in TRAIN_FLAGS else ours) in line
    assert not (tmp_path / "run").exists()


def test_config_file_under_the_flags_and_print_config(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    config = tmp_path / "exp.json"
    config.write_text(json.dumps({"preset": "tiny", "lamda": 0.25, "temperature": 0.2, "patch_size": [32, 32, 32],
                                  "data": "data", "seed": 3}))
    cfg = _config("--config", config, "--lamda", 0.3)
    assert (cfg.lamda, cfg.temperature, cfg.patch_size, cfg.seed) == (0.3, 0.2, (32, 32, 32), 3)  # flag over file
    assert cfg.n_filters == 2 and cfg.max_iters == 4  # the file's preset under it
    assert cfg.data == str(tmp_path / "data")  # relative to the file's folder

    assert train.main(["--config", str(config), "--lamda", "0.3", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(cfg.to_json())) and printed["patch_size"] == [32, 32, 32]
    again = tmp_path / "printed.json"  # what --print-config prints is a --config file of the same settings
    again.write_text(json.dumps(printed))
    assert _config("--config", again) == cfg

    assert train.main(["--preset", "la", "--print-config"]) == 0  # the paper's settings, no --data needed
    la = json.loads(capsys.readouterr().out)
    assert (la["lr"], la["max_iters"], la["memory_num"], la["num_filtered"], la["feat_dim"]) == \
        (0.01, 15000, 256, 12800, 32)


def test_a_run_from_a_config_file_and_its_config_json_as_one(tmp_path):
    config = tmp_path / "exp.json"
    config.write_text(json.dumps({"preset": "tiny", "lamda": 0.25, "consistency_o": 0.5, "max_iters": 2,
                                  "threads": 1, "eval_every": 1000}))
    out = str(tmp_path / "run")
    assert train.main(["--config", str(config), "--lr", "0.02", "--out", out, "--no-eval"]) == 0
    saved = json.load(open(os.path.join(out, "config.json")))
    assert (saved["lamda"], saved["consistency_o"], saved["lr"], saved["max_iters"]) == (0.25, 0.5, 0.02, 2)
    rows = _rows(os.path.join(out, "train_log.csv"))
    # loss = lamda * loss_s + lambda_c * loss_c + lambda_o * loss_o, lambda_o = consistency_o * ramp-up
    for row in rows:
        total = 0.25 * float(row["loss_s"]) + float(row["lambda_c"]) * float(row["loss_c"]) + \
            float(row["lambda_o"]) * float(row["loss_o"])
        assert float(row["loss"]) == pytest.approx(total, rel=1e-5)
        assert float(row["lambda_o"]) == pytest.approx(0.5 * float(row["lambda_c"]), rel=1e-6)
    # the run folder's config.json is a --config file (its record keys accepted): the same settings
    assert _config("--config", os.path.join(out, "config.json")).to_json() == {
        k: tuple(v) if k in TUPLE_FIELDS and v is not None else v for k, v in saved.items() if k not in RECORD_KEYS}


def test_yaml_config_file(tmp_path, capsys):
    config = tmp_path / "exp.yaml"
    config.write_text("preset: tiny\nlamda: 0.25\npatch_size: [32, 32, 32]\nseed: [4, 5]\n")
    try:
        import yaml  # noqa: F401
    except ImportError:
        line = _error(capsys, "--config", config, "--print-config")
        assert str(config) in line and "pip install pyyaml" in line
        return
    assert train.main(["--config", str(config), "--lamda", "0.3", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["lamda"], printed["patch_size"], printed["seed"], printed["n_filters"]) == (0.3, [32, 32, 32],
                                                                                              [4, 5], 2)


def test_bad_config_files_are_one_line(tmp_path, capsys):
    def write(name, text):
        path = tmp_path / name
        path.write_text(text)
        return path

    cases = [(write("typo.json", '{"preset": "tiny", "lamdaa": 0.3}'), "unknown key 'lamdaa' (did you mean 'lamda'?)"),
             (write("official.json", '{"labelnum": 8}'), "unknown key 'labelnum' (the official train_caml.py's "
                                                          "name: use key 'labeled')"),
             (write("type.json", '{"lr": "fast"}'), "key lr must be a finite number, got 'fast'"),
             (write("range.json", '{"temperature": 0}'), "key temperature must be > 0"),
             (write("preset.json", '{"preset": "huge"}'), "key preset: unknown preset 'huge'"),
             (write("list.json", "[1, 2]"), "expected a mapping of settings"),
             (write("broken.json", "{not json"), "cannot read"),
             (tmp_path / "missing.json", "not found")]
    for path, problem in cases:
        line = _error(capsys, "--config", path, "--out", tmp_path / "run")
        assert str(path) in line and problem in line, line
    assert not (tmp_path / "run").exists()
    # a flag over a bad value of the file replaces it; a bad flag over the file is named as the flag
    assert _config("--config", tmp_path / "range.json", "--temperature", "0.5").temperature == 0.5
    line = _error(capsys, "--config", write("good.json", '{"temperature": 0.5}'), "--temperature", "0")
    assert "error: --temperature must be > 0" in line, line


# ---------------------------------------------------------------- validation, checkpoints, selection


@pytest.fixture(scope="module")
def selecting_run(cache, tmp_path_factory):
    """Six iterations validated on 2 held-out cases, the test cases scored too (--select-on-test), every
    iterate kept (--save-every 1)."""
    os.environ["CAML_CACHE"], os.environ["CAML_OPS_BACKEND"] = cache, "reference"
    out = str(tmp_path_factory.mktemp("runs") / "selecting")
    threads = torch.get_num_threads()
    assert train.main(SELECTING + ["--out", out, "--val", "2", "--select-on-test", "--save-every", "1"]) == 0
    torch.set_num_threads(threads)
    return out


def test_validation_split_is_recorded_and_apart_from_test(selecting_run, cache):
    split = json.load(open(os.path.join(selecting_run, "split.json")))
    train_list = open(os.path.join(cache, "synthetic-tiny", "train.list")).read().split()
    assert split["val"] == train_list[-2:]  # the last labeled training cases
    assert split["train"] == train_list[:-2]  # the first (the --labeled ones) train as without --val
    assert not set(split["val"]) & (set(split["test"]) | set(split["train"]))
    assert _checkpoint(selecting_run, "last.pt")["split"] == split


def test_best_pt_is_the_best_validation_iterate(selecting_run):
    rows = _rows(os.path.join(selecting_run, "val_log.csv"))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4, 5, 6]  # the last iterate is a candidate too
    dice = [float(r["dice"]) for r in rows]
    best_iteration = 1 + dice.index(max(dice))  # the first of equals
    best = _checkpoint(selecting_run, "best.pt")
    assert best["iteration"] == best_iteration and best["saved_as"] == "best"
    assert best["selection"]["best"] == {"iteration": best_iteration, "dice": max(dice)}
    assert _same_weights(best, _checkpoint(selecting_run, f"iter_{best_iteration}.pt"))
    metrics = json.load(open(os.path.join(selecting_run, "metrics.json")))
    assert metrics["best_on_validation"] == {"iteration": best_iteration, "dice": max(dice),
                                             "checkpoint": "checkpoints/best.pt", "validation_cases": 2}
    assert metrics["iteration"] == 6  # the final metrics are the last iterate's


def test_iter_checkpoints(selecting_run, cache, tmp_path):
    names = sorted(os.listdir(os.path.join(selecting_run, "checkpoints")))
    assert names == ["best.pt", "best_on_test.pt"] + [f"iter_{i}.pt" for i in range(1, 7)] + ["last.pt"]
    assert [_checkpoint(selecting_run, f"iter_{i}.pt")["iteration"] for i in range(1, 7)] == list(range(1, 7))
    assert _same_weights(_checkpoint(selecting_run, "iter_6.pt"), _checkpoint(selecting_run, "last.pt"))
    assert not _same_weights(_checkpoint(selecting_run, "iter_5.pt"), _checkpoint(selecting_run, "last.pt"))
    out = str(tmp_path / "every2")
    assert train.main(TINY + ["--out", out, "--max-iters", "5", "--save-every", "2", "--no-eval"]) == 0
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["iter_2.pt", "iter_4.pt", "last.pt"]


def test_select_on_test_is_labelled(selecting_run, cache, tmp_path, capsys):
    rows = _rows(os.path.join(selecting_run, "val_log.csv"))
    test_dice = [float(r["test_dice"]) for r in rows]
    iteration = 1 + test_dice.index(max(test_dice))
    on_test = _checkpoint(selecting_run, "best_on_test.pt")
    assert on_test["iteration"] == iteration and on_test["saved_as"] == "best_on_test"
    assert _same_weights(on_test, _checkpoint(selecting_run, f"iter_{iteration}.pt"))
    selected = json.load(open(os.path.join(selecting_run, "metrics.json")))["best_on_test"]
    assert selected["iteration"] == iteration and "selected on the TEST cases" in selected["protocol"]

    out = tmp_path / "eval"
    rc = evaluate.main(["--checkpoint", os.path.join(selecting_run, "checkpoints", "best_on_test.pt"), "--data",
                        os.path.join(cache, "synthetic-tiny"), "--out", str(out), "--threads", "1"])
    said = capsys.readouterr().out
    assert rc == 0 and "SELECTED ON THE TEST CASES" in said and "no model selection" not in said
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["checkpoint_selection"] == "best-on-test" and "optimistic" in metrics["protocol"]
    assert metrics["dice"] == pytest.approx(max(test_dice), abs=1e-6)  # the Dice it was selected by


def test_select_on_test_without_val_is_loud(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train.main(SELECTING + ["--max-iters", "3", "--out", out, "--select-on-test"]) == 0
    said = capsys.readouterr().out
    assert "BEST ON THE TEST CASES" in said and "best on the validation cases" not in said
    dice = [float(r["dice"]) for r in _rows(os.path.join(out, "val_log.csv"))]  # the test cases' Dice
    assert _checkpoint(out, "best_on_test.pt")["iteration"] == 1 + dice.index(max(dice))
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["best_on_test.pt", "last.pt"]  # no best.pt


def test_without_val_no_checkpoint_is_selected(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train.main(SELECTING + ["--max-iters", "3", "--out", out]) == 0
    assert "monitoring; no checkpoint is selected" in capsys.readouterr().out
    assert os.listdir(os.path.join(out, "checkpoints")) == ["last.pt"]
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert "best_on_validation" not in metrics and "best_on_test" not in metrics


@pytest.mark.parametrize("name, selection, said", [
    ("last.pt", "last", "the last checkpoint of the run (iteration 6 of 6); no model selection"),
    ("best.pt", "best-on-validation", "the checkpoint selected on the validation cases"),
    ("iter_2.pt", "iter 2", "the checkpoint of iteration 2 of 6; no model selection"),
])
def test_evaluate_names_the_checkpoint(selecting_run, cache, tmp_path, capsys, name, selection, said):
    out = tmp_path / "eval"
    rc = evaluate.main(["--checkpoint", os.path.join(selecting_run, "checkpoints", name), "--data",
                        os.path.join(cache, "synthetic-tiny"), "--out", str(out), "--threads", "1"])
    assert rc == 0 and said in capsys.readouterr().out
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["checkpoint_selection"] == selection
    assert metrics["iteration"] == _checkpoint(selecting_run, name)["iteration"]


def test_evaluate_names_an_official_checkpoint(cache, tmp_path, capsys):
    path = tmp_path / "official.pth"
    torch.save(CAML3d(n_filters=2, feat_dim=8).state_dict(), path)
    out = tmp_path / "eval"
    rc = evaluate.main(["--checkpoint", str(path), "--data", os.path.join(cache, "synthetic-tiny"), "--out", str(out),
                        "--patch-size", "32", "32", "16", "--strides", "16", "16", "8", "--threads", "1"])
    assert rc == 0 and "the given official checkpoint as is" in capsys.readouterr().out
    assert json.load(open(out / "metrics.json"))["checkpoint_selection"] == "official"


def test_protocol_bad_input(tmp_path, capsys):
    out = tmp_path / "run"
    assert "--val 5 with --labeled 2 needs 7 labeled training cases" in _error(capsys, *TINY, "--out", out, "--val",
                                                                                 "5")
    assert "--val must be >= 0, got -1" in _error(capsys, *TINY, "--out", out, "--val", "-1")
    assert "--save-every must be >= 1, got 0" in _error(capsys, *TINY, "--out", out, "--save-every", "0")
    assert "--seed lists a seed twice: 1 2 1" in _error(capsys, *TINY, "--out", out, "--seed", "1", "2", "1")
    # settings are named by their flags, also where the flag is not the field's name
    assert "--embedding-dim must be >= 1, got 0" in _error(capsys, *TINY, "--out", out, "--embedding-dim", "0")
    assert "--consistency-rampup must be >= 0, got -1.0" in _error(capsys, *TINY, "--out", out,
                                                                    "--consistency-rampup", "-1")
    assert not out.exists()


# ---------------------------------------------------------------- resume


def test_resume_of_a_validated_msd_run_continues_exactly(tmp_path):
    nibabel()
    msd = write_msd_folder(tmp_path / "msd", labeled=7, unlabeled=1, shape=(32, 32, 16))
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    common = SELECTING + ["--data", msd, "--val", "2", "--checkpoint-every", "2", "--no-eval"]
    assert train.main(common + ["--out", straight]) == 0
    assert train.main(common + ["--out", split, "--max-iters", "4"]) == 0
    recorded = json.load(open(os.path.join(split, "split.json")))
    assert len(recorded["val"]) == 2 and not set(recorded["val"]) & set(recorded["train"])
    assert train.main(["--resume", "--out", split, "--max-iters", "6", "--save-every", "3", "--no-eval"]) == 0
    assert json.load(open(os.path.join(split, "split.json"))) == recorded  # the same validation cases
    assert _rows(os.path.join(split, "val_log.csv")) == _rows(os.path.join(straight, "val_log.csv"))
    a, b = _checkpoint(straight, "best.pt"), _checkpoint(split, "best.pt")
    assert a["iteration"] == b["iteration"] and _same_weights(a, b)
    assert "iter_6.pt" in os.listdir(os.path.join(split, "checkpoints"))  # --save-every may change on --resume


def test_resume_refuses_protocol_changes(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train.main(TINY + ["--out", out, "--max-iters", "2", "--no-eval"]) == 0
    capsys.readouterr()
    line = _error(capsys, "--resume", "--out", out, "--val", "1", "--select-on-test", "--embedding-dim", "4")
    for said in ("--val 1 (saved 0)", "--select-on-test (saved: without)", "--embedding-dim 4 (saved 8)"):
        assert said in line, line
    config = tmp_path / "exp.json"
    config.write_text('{"lamda": 0.3}')
    assert "--config is for new runs" in _error(capsys, "--resume", "--out", out, "--config", config)


# ---------------------------------------------------------------- several seeds


def test_several_seeds_and_their_summary(tmp_path, capsys):
    out = tmp_path / "seeds"
    assert train.main(TINY + ["--out", str(out), "--max-iters", "2", "--seed", "0", "1", "2"]) == 0
    said = capsys.readouterr().out
    summary = json.load(open(out / "summary.json"))
    assert summary["seeds"] == [0, 1, 2] and sorted(os.listdir(out)) == ["seed0", "seed1", "seed2", "summary.json"]
    runs = [json.load(open(out / f"seed{s}" / "metrics.json")) for s in (0, 1, 2)]
    assert [json.load(open(out / f"seed{s}" / "config.json"))["seed"] for s in (0, 1, 2)] == [0, 1, 2]
    assert runs[0]["dice"] != runs[1]["dice"] or runs[1]["dice"] != runs[2]["dice"]  # the seeds differ
    for metric in ("dice", "jaccard", "hd95", "asd"):
        values = [r[metric] for r in runs if r[metric] is not None]  # null: no distance (an empty mask)
        assert summary["n"][metric] == len(values)
        assert summary["mean"][metric] == pytest.approx(statistics.mean(values) if values else None)
        expected_std = statistics.stdev(values) if len(values) > 1 else None
        assert summary["std"][metric] == pytest.approx(expected_std)
    assert [summary["runs"][f"seed{s}"]["dice"] for s in (0, 1, 2)] == [r["dice"] for r in runs]
    assert "std" in said and "summary.json" in said
    line = _error(capsys, "--resume", "--out", out)
    assert "nothing to resume" in line and "add --seed 0 1 2" in line
    assert train.main(["--resume", "--out", str(out), "--seed", "0", "1", "2", "--max-iters", "3", "--no-eval"]) == 0
    assert [len(_rows(out / f"seed{s}" / "train_log.csv")) for s in (0, 1, 2)] == [3, 3, 3]
