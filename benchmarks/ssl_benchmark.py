"""A semi-supervised benchmark, honest by construction: ``python benchmarks/ssl_benchmark.py``.

The protocol is fixed here, before any method is compared (issue 13), and the script publishes what
the runs show whatever they show:

- **Regime** (``DATA``, ``REGIME``): the synthetic LA-like data (``caml.data.synthetic``) with few labeled
  cases and many more unlabeled ones from the same distribution, so the case-to-case variation
  (shapes, contrast, bias field, noise, distractors) is mostly not covered by the labels. Its gate,
  checked on the supervised arm before the others are read: test Dice at most about 0.8 and a
  train-test gap (Dice on the labeled training cases minus test Dice) of at least 0.1; a regime that
  fails the gate is reported as such (``gate`` in the results), not tuned after the fact.
- **Arms** (``ARMS``): supervised only; mutual consistency only (MC-Net style: CAML without the
  OCC term); CAML as the official code trains it (channel dropout on, the official memory-bank
  reshape); CAML with this package's defaults; CAML with normalised OCC embeddings. Every arm is the
  ``small`` preset with the regime's overrides and its own switches, nothing else.
- **Pairing**: seed ``s`` of every arm has the same initial weights, batches and augmentations (they
  come from ``--seed`` only; the arms differ in their losses and switches).
- **Reported**: final-iteration test Dice, Jaccard, 95HD, ASD per seed (no checkpoint selection),
  train Dice; per arm against the supervised arm (and the CAML arms against mc_only: what the OCC
  term adds): the mean paired Dice difference with a 95% t-interval, wins out of N, and failures (a
  run that crashed, or a test Dice under 0.5).

Runs go to ``--out`` (default ``runs/ssl-benchmark``), one folder per arm and seed; a finished run
(its ``benchmark.json``) is reused, so an interrupted benchmark continues where it stopped. The
summary is ``<out>/summary.json`` and the table printed last. ``--seeds``, ``--jobs`` (parallel runs,
one thread each) and ``--arms`` scale it; about 30 minutes on a 2-core CPU with the defaults.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor
from typing import Optional

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# The regime, decided before any comparison (see the module docstring for its gate).
DATA = dict(cases=44, seed=2026, test_cases=8, min_shape=[32, 32, 32], max_shape=[40, 40, 32])
REGIME = dict(labeled=2)  # 2 labeled training cases, 34 unlabeled, 8 test
# arm -> settings over the small preset (TrainConfig fields)
ARMS = {
    "supervised": dict(method="supervised"),
    "mc_only": dict(consistency_o=0.0),
    "caml_official": dict(dropout=True, memory_reshape="official"),
    "caml": dict(),
    "caml_normalized": dict(occ_embedding="normalized"),
}
BASELINE = "supervised"
# Each arm against the supervised arm; the CAML arms also against mc_only, which they extend by the OCC term.
COMPARED_WITH = (BASELINE, "mc_only")
FAILED_BELOW = 0.5  # a test Dice under this counts as a failed run (a collapse to background, say)
GATE_TEST_DICE, GATE_GAP = 0.8, 0.1


def run_config(arm: str, seed: int, data: str):
    from caml.config import preset_config

    cfg = preset_config("small")
    # Final-iteration results only: no validation during training, one checkpoint at the end.
    run_only = dict(data=data, seed=seed, threads=1, eval_every=cfg.max_iters, checkpoint_every=cfg.max_iters)
    for name, value in {**REGIME, **ARMS[arm], **run_only}.items():
        setattr(cfg, name, value)
    cfg.validate()
    return cfg


def _train_dice(cfg, out: str) -> float:
    """Mean Dice of the final model on the labeled training cases (the train side of the gap)."""
    import torch

    from caml.data.source import open_source
    from caml.inference import predict_classes
    from caml.metrics import dice
    from caml.models import CAML3d

    model = CAML3d.from_checkpoint(os.path.join(out, "checkpoints", "last.pt")).eval()
    source = open_source(cfg.data)
    scores = []
    for case in source.train_cases[: cfg.labeled]:
        image, label = source.load(case)
        pred = predict_classes(model, image, cfg.patch_size, cfg.eval_strides, cfg.eval_batch,
                                  torch.device("cpu"), amp=False)[1]
        scores.append(dice(pred, label > 0))
    return float(np.mean(scores))


def run_one(arm: str, seed: int, root: str) -> dict:
    """Trains one arm at one seed (or reads its finished run): its final-iteration metrics."""
    out = os.path.join(root, f"{arm}-seed{seed}")
    result_path = os.path.join(out, "benchmark.json")
    if os.path.isfile(result_path):
        with open(result_path) as f:
            return json.load(f)
    try:
        import torch

        from caml.runlog import write_json
        from caml.train import train

        torch.set_num_threads(1)
        cfg = run_config(arm, seed, os.path.join(root, "data"))
        metrics = train(cfg, out)
        result = {"arm": arm, "seed": seed, "ok": True, "train_dice": _train_dice(cfg, out),
                  **{k: metrics[k] for k in ("dice", "jaccard", "hd95", "asd")}}
    except Exception as err:  # a crashed run is a failure of its arm, reported, not a crash of the benchmark
        traceback.print_exc()
        return {"arm": arm, "seed": seed, "ok": False, "error": f"{type(err).__name__}: {err}"}
    write_json(result_path, result)
    return result


def paired_interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval of paired differences (nan bounds below two pairs)."""
    from scipy import stats

    d = np.asarray(diffs, dtype=np.float64)
    mean = float(d.mean()) if d.size else math.nan
    if d.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
    return mean, mean - half, mean + half


def _paired(by: dict, arm: str, baseline: str, seeds: list[int]) -> dict:
    """``arm`` against ``baseline`` on the seeds both finished: mean Dice difference, 95% interval, wins."""
    diffs = [by[(arm, s)]["dice"] - by[(baseline, s)]["dice"] for s in seeds
             if by[(arm, s)]["ok"] and by[(baseline, s)]["ok"]]
    mean, low, high = paired_interval(diffs)
    return {"mean_dice_difference": mean, "ci95": [low, high], "pairs": len(diffs),
            "wins": sum(1 for d in diffs if d > 0)}


def summarise(results: list[dict], arms: list[str], seeds: list[int]) -> dict:
    by = {(r["arm"], r["seed"]): r for r in results}
    summary = {"data": DATA, "regime": REGIME, "arms": {a: ARMS[a] for a in arms}, "seeds": seeds, "per_arm": {}}
    for arm in arms:
        runs = [by[(arm, s)] for s in seeds]
        ok = [r for r in runs if r["ok"]]
        entry = {"runs": runs, "failures": sum(1 for r in runs if not r["ok"] or r["dice"] < FAILED_BELOW)}
        for key in ("dice", "jaccard", "hd95", "asd", "train_dice"):
            values = [r[key] for r in ok if r[key] is not None and math.isfinite(r[key])]
            entry[key] = float(np.mean(values)) if values else math.nan
        for baseline in COMPARED_WITH:
            if arm != baseline and baseline in arms and (baseline == BASELINE or arm.startswith("caml")):
                entry["vs_" + baseline] = _paired(by, arm, baseline, seeds)
        summary["per_arm"][arm] = entry
    if BASELINE in arms:
        base = summary["per_arm"][BASELINE]
        gap = base["train_dice"] - base["dice"]
        summary["gate"] = {"supervised_test_dice": base["dice"], "train_test_gap": gap,
                           "passed": bool(base["dice"] <= GATE_TEST_DICE + 0.02 and gap >= GATE_GAP)}
    return summary


def _comparison(vs: Optional[dict]) -> str:
    if not vs:
        return "- | -"
    return (f"{vs['mean_dice_difference']:+.3f} [{vs['ci95'][0]:+.3f}, {vs['ci95'][1]:+.3f}] | "
            f"{vs['wins']}/{vs['pairs']}")


def table(summary: dict) -> str:
    lines = ["| arm | test Dice | Jaccard | 95HD | ASD | train Dice | paired Dice diff vs supervised [95% CI] | wins | "
             "vs mc_only (the OCC term) [95% CI] | wins | failures |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    n = len(summary["seeds"])
    for arm, e in summary["per_arm"].items():
        lines.append(f"| {arm} | {e['dice']:.3f} | {e['jaccard']:.3f} | {e['hd95']:.2f} | {e['asd']:.2f} | "
                     f"{e['train_dice']:.3f} | {_comparison(e.get('vs_' + BASELINE))} | "
                     f"{_comparison(e.get('vs_mc_only'))} | {e['failures']}/{n} |")
    gate = summary.get("gate")
    if gate:
        lines.append(f"\nGate (supervised test Dice <= ~{GATE_TEST_DICE}, train-test gap >= {GATE_GAP}): "
                     f"test {gate['supervised_test_dice']:.3f}, gap {gate['train_test_gap']:.3f}: "
                     f"{'passed' if gate['passed'] else 'FAILED'}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/ssl_benchmark.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("runs", "ssl-benchmark"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU thread each)")
    args = p.parse_args(argv)
    from caml.data.synthetic import ensure_synthetic_la
    from caml.runlog import write_json

    os.makedirs(args.out, exist_ok=True)
    ensure_synthetic_la(os.path.join(args.out, "data"), **DATA)  # the benchmark's own data, not the user's cache
    tasks = [(arm, seed) for seed in args.seeds for arm in args.arms]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(run_one, *zip(*tasks), [args.out] * len(tasks)))
    summary = summarise(results, args.arms, args.seeds)
    write_json(os.path.join(args.out, "summary.json"), summary)
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
