import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# CAML_BENCH_PARTIAL=path: each benchmark's result is appended to `path` (one JSON line, an entry of
# pytest-benchmark's --benchmark-json "benchmarks" list) as soon as its test finishes, so a run stopped by a
# timeout still leaves the cases it finished (pytest-benchmark writes its JSON only at the session's end).
_PARTIAL = os.environ.get("CAML_BENCH_PARTIAL")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield
    bench = getattr(item, "funcargs", {}).get("benchmark")
    if _PARTIAL and bench is not None and getattr(bench, "stats", None) is not None:
        with open(_PARTIAL, "a") as f:
            f.write(json.dumps(bench.stats.as_dict(include_data=False), default=str) + "\n")


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    """The build of the C++ CPU kernels the timings ran (AVX512 or AVX2; ATEN_CPU_CAPABILITY=avx2 forces AVX2)."""
    import caml_ops

    machine_info["caml_ops_cpu_capability"] = caml_ops.cpu_capability()
