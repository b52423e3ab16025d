"""A whole CAML training iteration, ours against the official ``train_caml.py`` loop body.

    python benchmarks/iteration.py [--device cpu|cuda] [--iters 3] [--threads N] [--precision P]
                                   [--json FILE] [--markdown FILE] [--profile] [--quick]

At the paper's configuration (preset ``la``: patch 112 x 112 x 80, batch 2 labeled + 2 unlabeled,
n_filters 16, 8 labeled cases, memory_num 256, num_filtered 12800) on the synthetic dataset at the LA
volumes' size, ours in ``--precision`` ``run`` (the run's default: float32 on a CPU, bf16 autocast on
CUDA), ``float32`` or ``bf16``, each arm in a fresh process (so its peak memory is its own) on the
same batches:

- ``official``: the official loop body (``official.official_train_step``): host ``y_ori`` / ``y_pseudo``
  buffers, the numpy memory bank copied every step, ``nn.TransformerEncoderLayer`` CMA, sort-based
  filtering, per-iteration loss logging;
- ``caml``: ``python -m caml.train``'s step (:func:`caml.trainer.optimisation_step` on the trainer's
  model, memory bank and objective, plus its per-iteration read of the losses);
- ``network``: the bare two-branch network (fused CMA included) forward + backward + SGD step on the
  same batch, with a trivial loss: the floor of any CAML iteration. CAML's overhead is
  ``caml / network - 1``.

Each arm first runs ``labeled / labeled_bs`` iterations so that every labeled case is in the memory
bank (the official bank's per-step cost grows with it), then times ``--iters`` iterations (median).
``data`` times our data pipeline (``TrainBatches``) alone, per batch. Peak memory: the process's peak
RSS on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA. ``--profile`` adds a breakdown of one
``caml`` iteration by the ``caml.*`` profiler ranges of the objective. ``--quick`` runs the tiny
preset once (CI: it cannot rot).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from caml.config import default_cache_dir, preset_config  # noqa: E402
from caml.data.batches import TrainBatches  # noqa: E402
from caml.data.source import open_source  # noqa: E402
from caml.data.synthetic import ensure_synthetic_la  # noqa: E402

ARMS = ("official", "caml", "network", "data")
# The LA volumes are about 110-140 x 110-140 x 80-90 after the official crop.
LA_SIZE = dict(cases=16, seed=0, test_cases=2, min_shape=[112, 112, 80], max_shape=[128, 128, 88])
TINY_SIZE = dict(cases=8, seed=0, test_cases=2, min_shape=[32, 32, 16], max_shape=[40, 40, 20])
PRECISIONS = ("run", "float32", "bf16")


def _config(quick: bool, device: str, threads, precision: str):
    cfg = preset_config("tiny" if quick else "la")
    cfg.device, cfg.threads, cfg.num_workers = device, threads, 0 if quick else cfg.num_workers
    if precision != "run":  # else the run's defaults: bf16 autocast on CUDA, float32 on a CPU
        cfg.amp = cfg.cpu_amp = precision == "bf16"
    size = TINY_SIZE if quick else LA_SIZE
    cfg.data = os.path.join(default_cache_dir(), "iteration-tiny" if quick else "iteration-la")
    ensure_synthetic_la(cfg.data, **size)
    if quick:
        cfg.labeled = 2
    return cfg


def _batches(cfg, count: int) -> list[dict]:
    stream = TrainBatches(cfg, open_source(cfg.data), rank=0).stream()
    return [next(stream) for _ in range(count)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _step_function(arm: str, cfg, device: torch.device):
    """``step(batch, iteration)`` of the arm, its model built from seed 0."""
    torch.manual_seed(0)
    if arm == "official":
        from official import OfficialMemoryBank, official_caml_model, official_train_step

        model = official_caml_model(cfg.n_filters, cfg.feat_dim).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)
        bank = OfficialMemoryBank(cfg.labeled, 2)

        def step(batch, iteration):
            volume, label = batch["image"].to(device), batch["label"].to(device)
            ramp = (iteration // cfg.rampup_interval) / cfg.resolved_rampup()  # cost only: any weight does
            official_train_step(model, optimizer, bank, volume, label, batch["idx"].to(device), iteration,
                                cfg.labeled_bs, cfg.memory_num, cfg.num_filtered, cfg.lamda, ramp, ramp,
                                cfg.temperature)
        return step

    from caml.losses import CAMLObjective
    from caml.precision import autocast_dtype
    from caml.trainer import build_memory, build_model, loss_weights, optimisation_step, read_parts

    model = build_model(cfg, 2, device)
    amp = autocast_dtype(device, cfg.amp, cfg.cpu_amp)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if arm == "network":
        def step(batch, iteration):
            volume = batch["image"].to(device)
            with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                outputs = model(volume)
            loss = sum(out.float().mean() for out in outputs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    memory = build_memory(cfg, 2, device)
    objective = CAMLObjective(model, memory, cfg.labeled_bs, loss_weights(cfg), "caml", "auto", amp)

    def step(batch, iteration):
        model.train()
        volume, label = batch["image"].to(device), batch["label"].to(device)
        parts = optimisation_step(objective, optimizer, volume, label, batch["idx"], iteration)
        read_parts(parts)  # the trainer's per-iteration read of the losses
    return step


def _profile(step, batch, iteration: int, device: torch.device) -> dict[str, float]:
    """Seconds per ``caml.*`` profiler range of one iteration, and the iteration's total."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        step(batch, iteration)
        _sync(device)
    total = time.perf_counter() - start
    ranges = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key.startswith("caml.")}
    return {**ranges, "iteration": total}


def run_arm(arm: str, quick: bool, device: str, threads, iters: int, profile: bool, precision: str) -> dict:
    if threads is not None:
        torch.set_num_threads(threads)
    cfg = _config(quick, device, threads, precision)
    dev = torch.device(device)
    warm = cfg.labeled // cfg.labeled_bs
    if arm == "data":
        loader = TrainBatches(cfg, open_source(cfg.data), rank=0).stream()
        next(loader)  # the workers' start
        times = []
        for _ in range(max(iters, 8)):
            start = time.perf_counter()
            next(loader)
            times.append(time.perf_counter() - start)
        return {"arm": arm, "seconds": statistics.median(times), "times": times, "peak_mib": _peak_mib(dev)}
    batches = _batches(cfg, warm + iters + int(profile))
    step = _step_function(arm, cfg, dev)
    times = []
    for i, batch in enumerate(batches[: warm + iters]):
        _sync(dev)
        start = time.perf_counter()
        step(batch, i + 1)
        _sync(dev)
        if i >= warm:
            times.append(time.perf_counter() - start)
    result = {"arm": arm, "seconds": statistics.median(times), "times": times, "peak_mib": _peak_mib(dev)}
    if profile and arm == "caml":
        result["profile"] = _profile(step, batches[-1], len(batches), dev)
    return result


def _child(arm: str, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--arm", arm, "--device", args.device,
               "--iters", str(args.iters)] + (["--threads", str(args.threads)] if args.threads else []) \
        + (["--quick"] if args.quick else []) + (["--profile"] if args.profile else []) \
        + ["--precision", args.precision]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"arm": arm, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict, machine: str) -> str:
    """The markdown table of a run's results."""
    official, caml, network = (results.get(a, {}) for a in ("official", "caml", "network"))
    lines = [f"Machine: {machine}", "",
             "| arm | seconds per iteration (median) | peak memory MiB | vs official (time) | vs official (memory) |",
             "|---|--:|--:|--:|--:|"]
    for arm in ARMS:
        r = results.get(arm)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {arm} | failed: {r['error']} | | | |")
            continue
        speed = memory = ""
        if arm in ("caml", "network") and "seconds" in official:
            speed = f"{official['seconds'] / r['seconds']:.2f}x"
            memory = f"{official['peak_mib'] / r['peak_mib']:.2f}x"
        lines.append(f"| {arm} | {r['seconds']:.3f} | {r['peak_mib']:.0f} | {speed} | {memory} |")
    if "seconds" in caml and "seconds" in network:
        lines += ["", f"CAML's overhead over the bare network: {caml['seconds'] / network['seconds'] - 1:+.1%}"]
    if "profile" in caml:
        lines += ["", "| profiler range (one caml iteration) | seconds |", "|---|--:|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in sorted(caml["profile"].items(), key=lambda kv: -kv[1])]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per arm (after the warm-up)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--markdown", default=None, help="write the table here")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--precision", choices=PRECISIONS, default="run", help="ours (and the bare network) in the "
                   "run's default precision (bf16 autocast on CUDA, float32 on a CPU), in float32, or under bf16 "
                   "autocast (--cpu-amp on a CPU); the official loop is float32 always")
    p.add_argument("--quick", action="store_true", help="tiny preset, one iteration per arm (CI)")
    p.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # one arm, in this process
    args = p.parse_args()
    if args.arm is not None:
        print(json.dumps(run_arm(args.arm, args.quick, args.device, args.threads, args.iters, args.profile,
                                 args.precision)))
        return 0
    results = {}
    for arm in args.arms.split(","):
        results[arm] = _child(arm, args)
        print(json.dumps(results[arm]), flush=True)
    machine = (torch.cuda.get_device_name(0) if args.device == "cuda"
               else f"CPU, {os.cpu_count()} cores, threads {args.threads or torch.get_num_threads()}")
    text = table(results, f"{machine}, torch {torch.__version__}, ours in precision '{args.precision}'")
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "torch": torch.__version__, "precision": args.precision, "results": results},
                  f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
