"""Peak memory of one benchmark pass, measured in a fresh process so that
nothing else the benchmark session allocated distorts it.

Usage: python benchmarks/memory_probe.py '<case as JSON>' <pass>
Prints the peak growth in MiB over the memory held once the inputs exist and one
pass has run (so a compiler's or a first call's allocations do not count):
CPU: the peak RSS of the pass (VmHWM, reset just before it through
/proc/self/clear_refs) minus the RSS before it; CUDA: max_memory_allocated.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from cases import Case, build, run_pass  # noqa: E402


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def measure(case: Case, pass_name: str) -> float:
    forward, inputs = build(case)
    # One pass first: the steady state's memory, not the compiler's or a first call's (thread pools, caches).
    run_pass(case, forward, inputs, pass_name, forward() if pass_name == "backward" else None)
    loss = forward() if pass_name == "backward" else None
    if case.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run_pass(case, forward, inputs, pass_name, loss)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    _reset_peak_rss()
    before = _status_kib("VmRSS")
    run_pass(case, forward, inputs, pass_name, loss)
    return (_status_kib("VmHWM") - before) / 1024


if __name__ == "__main__":
    case = Case(**json.loads(sys.argv[1]))
    print(f"{measure(case, sys.argv[2]):.1f}")
