"""Registers, spills, stack and shared memory of every CUDA kernel instantiation, from a build log.

    CAML_OPS_PTXAS_VERBOSE=1 python setup.py build_ext --inplace > build.log 2>&1
    python benchmarks/ptxas_report.py build.log [--markdown OUT.md]

setup.py passes -Xptxas=-v to nvcc under CAML_OPS_PTXAS_VERBOSE=1; this parses ptxas's report (one entry
per kernel and architecture), prints one row per kernel and exits 1 when an instantiation CAML uses
spills: every one whose dtype is not float64 (float64 is for tests only), except the mutual-consistency
kernels' 32-class bound (C = 17 .. 32; CAML has 2 classes) and the cross-sample attention kernels' 8-row
tiles (B = 5 .. 8; CAML has B = 4), whose spills are reported only.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys

ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if tool is None:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False).stdout
    lines = out.splitlines()
    return lines if len(lines) == len(names) else names


def parse(log: str) -> list[dict]:
    rows, current = [], None
    for line in log.splitlines():
        m = ENTRY.search(line)
        if m:
            current = dict(mangled=m.group(1), arch=m.group(2), stack=0, spill_stores=0, spill_loads=0, regs=None,
                           smem=0)
            rows.append(current)
            continue
        if current is None:
            continue
        m = PROPS.search(line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            continue
        m = USED.search(line)
        if m and current["regs"] is None:
            current.update(regs=int(m.group(1)), smem=int(m.group(2) or 0))
    for row, name in zip(rows, demangle([r["mangled"] for r in rows])):
        # caml_ops::cuda::(anonymous namespace)::forward_kernel<float, 2>(...) -> forward_kernel<float, 2>
        short = re.sub(r"\(.*$", "", name.replace("caml_ops::cuda::(anonymous namespace)::", ""))
        row["kernel"] = short.replace("std::integral_constant<int, ", "").replace("__nv_bfloat16", "bf16")
        # The mutual-consistency kernels are <T, kC, Acc>: the 32-class bound is theirs, <T, 32, float>;
        # the cross-sample attention kernels <T, kI, kNC>: 8-row tiles serve B = 5 .. 8 (CAML: B = 4).
        row["caml_uses"] = "double" not in short and not re.search(r"_kernel<[^,<>]+, (32, float|8, \d)>", short)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log")
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    with open(args.log, errors="replace") as f:
        rows = parse(f.read())
    if not rows:
        print(f"no ptxas -v report in {args.log} (build with CAML_OPS_PTXAS_VERBOSE=1)")
        return 1
    lines = ["| kernel | arch | regs | spill st/ld B | stack B | smem B | verdict |", "|---|---|--:|--:|--:|--:|---|"]
    failures = 0
    for r in sorted(rows, key=lambda r: (r["arch"], r["kernel"])):
        spills = r["spill_stores"] or r["spill_loads"]
        verdict = "ok"
        if spills:
            verdict = "FAIL: spills" if r["caml_uses"] else "spills (not an instantiation CAML uses: reported)"
            failures += r["caml_uses"]
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['regs']} | {r['spill_stores']}/{r['spill_loads']} | "
                     f"{r['stack']} | {r['smem']} | {verdict} |")
    table = "\n".join(lines) + "\n"
    print(table)
    print(f"{len(rows)} kernel instantiations, {failures} spilling in instantiations CAML uses")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
