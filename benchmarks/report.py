"""Turn pytest-benchmark JSON into the Markdown table of the README and a PNG plot.

Usage: python benchmarks/report.py RESULTS.json [--markdown OUT.md] [--plot OUT.png] [--machine "..."]
"""
from __future__ import annotations

import argparse
import json
import platform
from collections import defaultdict

IMPL_ORDER = ("fused", "reference", "official", "sdpa", "compiled")
# The speed-up and memory saving are against the first of these an op was compared with.
BASELINES = ("official", "sdpa", "reference")


def load(path: str) -> dict:
    """(op, size, device, dtype, pass) -> impl -> (median seconds, peak MiB)."""
    with open(path) as f:
        if path.endswith(".jsonl"):  # benchmarks/conftest.py's CAML_BENCH_PARTIAL lines
            data = {"benchmarks": [json.loads(line) for line in f if line.strip()]}
        else:
            data = json.load(f)
    table = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        key = (info["op"], info["size"], info["device"], info["dtype"], info["pass_name"])
        table[key][info["impl"]] = (bench["stats"]["median"], info.get("peak_mib", float("nan")))
    return table, data.get("machine_info", {})


def _ratio(num: float, den: float) -> str:
    return f"{num / den:.1f}x" if den > 0 and num == num else "n/a"  # num == num: not NaN


def _compiled(impls: dict) -> str:
    """The fused op's time and memory against torch.compile of the plain formula: "2.1x / 3.0x"."""
    if "compiled" not in impls or "fused" not in impls:
        return ""
    (t_fused, m_fused), (t_compiled, m_compiled) = impls["fused"], impls["compiled"]
    return f"{_ratio(t_compiled, t_fused)} / {_ratio(m_compiled, m_fused)}"


def markdown(table: dict, machine: str) -> str:
    lines = [
        f"Machine: {machine}. Median time (ms) and peak memory growth (MiB) per pass; "
        "speed-up and memory saving of the fused op against the official CAML computation, "
        "else torch's SDPA (attention ops), else the reference backend (training step); "
        "vs compiled: the fused op's speed-up / memory saving against torch.compile of the plain formula "
        "(forward+backward, compilation excluded); "
        "a blank where an implementation is not run (quadratic memory past the benchmark's limit, or the "
        "reference attention with dropout, whose Philox mask in tensor arithmetic is no speed baseline).",
        "",
        "| op | size | device | pass | fused ms | reference ms | official ms | SDPA ms | compiled ms | fused MiB "
        "| reference MiB | official MiB | SDPA MiB | compiled MiB | speed-up | memory saving | vs compiled |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for (op, size, device, dtype, pass_name), impls in sorted(table.items()):
        times = [impls.get(i, (float("nan"),) * 2)[0] * 1e3 for i in IMPL_ORDER]
        mems = [impls.get(i, (float("nan"),) * 2)[1] for i in IMPL_ORDER]
        base = IMPL_ORDER.index(next((b for b in BASELINES if b in impls), "reference"))
        lines.append(
            f"| {op} | {size} | {device} {dtype} | {pass_name} | "
            + " | ".join(f"{t:.1f}" if t == t else "" for t in times) + " | "
            + " | ".join(f"{m:.0f}" if m == m else "" for m in mems)
            + f" | {_ratio(times[base], times[0])} | {_ratio(mems[base], mems[0])} | {_compiled(impls)} |"
        )
    return "\n".join(lines) + "\n"


def plot(table: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(k for k in table if k[4] == "forward+backward")
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.6 * len(keys) + 2))
    labels = [f"{op} {size} {device}" for op, size, device, _, _ in keys]
    for ax, index, title in ((axes[0], 0, "forward+backward time (ms)"), (axes[1], 1, "peak memory (MiB)")):
        height = 0.8 / len(IMPL_ORDER)
        for offset, impl in enumerate(IMPL_ORDER):
            values = [table[k].get(impl, (0, 0))[index] * (1e3 if index == 0 else 1) for k in keys]
            ax.barh([i + offset * height for i in range(len(keys))], values, height=height, label=impl)
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(keys))], labels)
        ax.set_xscale("log")
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results")
    parser.add_argument("--markdown", help="write the table here (default: print it)")
    parser.add_argument("--plot", help="write a PNG bar chart here")
    parser.add_argument("--machine", help="the machine's name for the table (default: from the JSON)")
    args = parser.parse_args()
    table, info = load(args.results)
    machine = args.machine or f"{info.get('cpu', {}).get('brand_raw', platform.processor())}"
    if info.get("caml_ops_cpu_capability"):
        machine += f", CPU kernels: {info['caml_ops_cpu_capability']}"
    text = markdown(table, machine)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    else:
        print(text)
    if args.plot:
        plot(table, args.plot)


if __name__ == "__main__":
    main()
