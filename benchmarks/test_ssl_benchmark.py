"""The semi-supervised benchmark's protocol and statistics (its runs are `python benchmarks/ssl_benchmark.py`)."""
import math

import pytest

import ssl_benchmark as bench


@pytest.mark.parametrize("arm", list(bench.ARMS))
def test_every_arm_is_the_small_preset_with_its_own_switches(arm):
    from caml.config import preset_config

    cfg, small = bench.run_config(arm, 3, "/data"), preset_config("small")
    changed = {k for k, v in vars(cfg).items() if v != getattr(small, k)}
    run_only = {"data", "seed", "threads", "eval_every", "checkpoint_every"}
    assert changed <= run_only | set(bench.REGIME) | set(bench.ARMS[arm])
    assert cfg.seed == 3 and cfg.labeled == bench.REGIME["labeled"]


def test_paired_interval_by_hand():
    mean, low, high = bench.paired_interval([0.1, 0.2, 0.3])
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert mean == pytest.approx(0.2) and low == pytest.approx(0.2 - half) and high == pytest.approx(0.2 + half)
    assert math.isnan(bench.paired_interval([0.1])[1])


def test_summary_pairs_seeds_counts_wins_and_failures():
    def run(arm, seed, dice, ok=True):
        return {"arm": arm, "seed": seed, "ok": ok, "dice": dice, "jaccard": dice, "hd95": 1.0, "asd": 1.0,
                "train_dice": 0.95} if ok else {"arm": arm, "seed": seed, "ok": False, "error": "boom"}

    results = [run("supervised", 0, 0.70), run("supervised", 1, 0.60), run("mc_only", 0, 0.75),
               run("mc_only", 1, 0.55), run("caml", 0, 0.80), run("caml", 1, 0.0, ok=False)]
    summary = bench.summarise(results, ["supervised", "mc_only", "caml"], [0, 1])
    mc = summary["per_arm"]["mc_only"]["vs_supervised"]
    assert mc["pairs"] == 2 and mc["wins"] == 1 and mc["mean_dice_difference"] == pytest.approx(0.0)
    caml = summary["per_arm"]["caml"]
    assert caml["failures"] == 1 and caml["vs_supervised"]["pairs"] == 1 and caml["vs_mc_only"]["wins"] == 1
    assert "vs_mc_only" not in summary["per_arm"]["mc_only"]
    assert summary["gate"]["train_test_gap"] == pytest.approx(0.95 - 0.65)
    assert "caml" in bench.table(summary)
