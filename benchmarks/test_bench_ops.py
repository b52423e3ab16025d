"""Time (pytest-benchmark, median) and peak memory (fresh process) of the fused
ops (and of a whole CAML training step) against the reference backend and the
official CAML computations.

    pytest benchmarks/ --benchmark-json=benchmarks/results.json
    python benchmarks/report.py benchmarks/results.json
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cases import PASSES, QUICK, Case, all_cases, build, run_pass

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory_probe.py")


def peak_memory_mib(case: Case, pass_name: str) -> float:
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
    forward, inputs = build(case)
    benchmark.group = f"{case.op} {case.size} {case.device} {pass_name}"
    benchmark.extra_info.update(case.as_dict(), pass_name=pass_name)
    rounds = 1 if QUICK else 5
    if pass_name == "backward":
        benchmark.pedantic(
            lambda loss: run_pass(case, forward, inputs, "backward", loss),
            setup=lambda: ((forward(),), {}), rounds=rounds, warmup_rounds=0 if QUICK else 1,
        )
    else:
        benchmark.pedantic(lambda: run_pass(case, forward, inputs, pass_name), rounds=rounds,
                           warmup_rounds=0 if QUICK else 1)
    benchmark.extra_info["peak_mib"] = peak_memory_mib(case, pass_name)
