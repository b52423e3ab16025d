"""Time (pytest-benchmark, median) and peak memory (a fresh process on CPU) of the fused
ops (and of a whole CAML training step) against the reference backend, the
official CAML computations and torch.compile of the plain formulas (its
compilation timed apart, in extra_info["compile_s"]).

    pytest benchmarks/ --benchmark-json=benchmarks/results.json
    python benchmarks/report.py benchmarks/results.json
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from cases import COMPILED_PASS, PASSES, QUICK, Case, all_cases, build, run_pass
from memory_probe import measure

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory_probe.py")


def peak_memory_mib(case: Case, pass_name: str) -> float:
    if case.device == "cuda":  # the CUDA allocator's peak counter is exact in-process, and a new process is slow
        return measure(case, pass_name)
    probe = subprocess.run(
        [sys.executable, PROBE, json.dumps(case.as_dict()), pass_name],
        capture_output=True, text=True, check=False,
    )
    if probe.returncode != 0:
        raise RuntimeError(f"memory probe failed for {case.id} {pass_name}:\n{probe.stderr[-2000:]}")
    return float(probe.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("pass_name", PASSES)
@pytest.mark.parametrize("case", all_cases(), ids=lambda c: c.id)
def test_op(benchmark, case, pass_name):
    if case.impl == "compiled" and pass_name != COMPILED_PASS:
        pytest.skip(f"torch.compile peers are timed {COMPILED_PASS} only")
    forward, inputs = build(case)
    benchmark.group = f"{case.op} {case.size} {case.device} {pass_name}"
    benchmark.extra_info.update(case.as_dict(), pass_name=pass_name)
    if case.impl == "compiled":  # its compilation, timed apart from the steady state
        start = time.perf_counter()
        run_pass(case, forward, inputs, pass_name)
        benchmark.extra_info["compile_s"] = round(time.perf_counter() - start, 2)
    # Block three's size takes seconds per pass on the CPU: fewer rounds there.
    slow = case.device == "cpu" and ("15680" in case.size or "28x28x20" in case.size)
    rounds = 1 if QUICK else (2 if slow else 5)
    warmup = 0 if QUICK or slow else 1
    if pass_name == "backward":
        benchmark.pedantic(
            lambda loss: run_pass(case, forward, inputs, "backward", loss),
            setup=lambda: ((forward(),), {}), rounds=rounds, warmup_rounds=warmup,
        )
    else:
        benchmark.pedantic(lambda: run_pass(case, forward, inputs, pass_name), rounds=rounds, warmup_rounds=warmup)
    benchmark.extra_info["peak_mib"] = peak_memory_mib(case, pass_name)
