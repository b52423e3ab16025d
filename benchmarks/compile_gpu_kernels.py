"""Compile every production Triton kernel variant for a GPU architecture, without a GPU.

    python benchmarks/compile_gpu_kernels.py --arch 90 [--jobs N] [--markdown OUT.md] [--json OUT.json]

The variants are not listed by hand: each one runs the real host functions of caml_ops/triton/*.py at the
sizes CAML runs (benchmarks/cases.py's, caml.config's) on CPU tensors under
caml_ops.triton._common.record_launches(), which makes the host code pick its GPU launch configuration
(block sizes, warps, stages, constexprs such as EVEN / EVEN_K / DROPOUT / PREC / DIVIDE) and records each
launch instead of running it. Each recorded launch is then bound and specialised exactly as
JITFunction.run does (Triton's own binder: dtypes, 16-divisibility of the integer arguments and pointers)
and compiled with triton.compile for GPUTarget("cuda", ARCH, 32): Triton's whole pipeline and its bundled
ptxas, no driver. So the script cannot drift from what runs.

It prints one row per distinct compiled kernel: registers, spilled bytes (ptxas -v, as Triton runs it),
stack frame and shared memory, and fails (exit 1) on a compile error, on shared memory past the
architecture's per-block limit, or on a spill in a production variant. Test-only variants (float64, whose
matmuls are broadcast product-sums on the GPU) are compiled and reported too, but only their compile
errors and shared memory fail the run.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Shared memory a block may opt into, bytes (CUDA programming guide, compute capabilities table).
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


def _setup_env(cache_dir: str) -> None:
    """Before triton is imported: compiled, not interpreted, kernels; the cache `cache_dir`, compiling
    even on a hit (so that ptxas runs and logs for every kernel); ptxas's -v log printed, to be captured."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)


# ---------------------------------------------------------------------------
# The variants: the host functions at CAML's sizes
# ---------------------------------------------------------------------------


def _variants() -> dict:
    """name -> (production, builder); a builder calls host functions (their launches get recorded).
    Names start with the op's name."""
    import functools
    import importlib

    import torch

    def host(module: str, name: str):
        return getattr(importlib.import_module(f"caml_ops.triton.{module}"), name)

    rng = torch.tensor([1234, 5678], dtype=torch.int64)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}

    def attention(op, B, L, H, d, dtype, p):
        forward, backward = host(op, f"{op}_forward"), host(op, f"{op}_backward")

        def build():
            # q, k, v as the CMA layer passes them: unbind views of the [B, L, 3, H, d] projection.
            q, k, v = torch.empty(B, L, 3, H, d, dtype=dtype).unbind(2)
            out, lse = forward(q, k, v, d**-0.5, p, rng)
            backward(torch.empty_like(out), q, k, v, out, lse, d**-0.5, p, rng)
        return build

    def omni_correlation_loss(N, K, D, dtype, eps=1e-8):
        forward = host("omni_correlation", "omni_correlation_loss_forward")
        backward = host("omni_correlation", "omni_correlation_loss_backward")

        def build():
            fv, fa, mem = torch.empty(N, D, dtype=dtype), torch.empty(N, D, dtype=dtype), torch.empty(K, D, dtype=dtype)
            stats = forward(fv, fa, mem, 0.1, eps)
            backward(torch.empty(N, dtype=stats[0].dtype), fv, fa, mem, *stats, 0.1, eps, True)
        return build

    def omni_correlation(N, K, D, dtype):
        forward = host("omni_correlation", "omni_correlation_forward")
        backward = host("omni_correlation", "omni_correlation_backward")

        def build():
            f, mem = torch.empty(N, D, dtype=dtype), torch.empty(K, D, dtype=dtype)
            probs = forward(f, mem, 0.1)
            backward(torch.empty_like(probs), probs, f, mem, 0.1, True)
        return build

    def mutual_consistency_loss(S, shape, dtype):
        forward = host("mutual_consistency", "mutual_consistency_loss_forward")
        backward = host("mutual_consistency", "mutual_consistency_loss_backward")

        def build():
            logits = [torch.empty(shape, dtype=dtype) for _ in range(S)]
            loss = forward(logits, 0.1)
            backward(torch.empty_like(loss), logits, 0.1)
        return build

    def dropout(shape, dtype):
        return lambda: host("dropout", "dropout")(torch.empty(shape, dtype=dtype), 0.5, rng)

    builders = {"cross_sample_attention": functools.partial(attention, "cross_sample_attention"),
                "intra_sample_attention": functools.partial(attention, "intra_sample_attention"),
                "omni_correlation_loss": omni_correlation_loss, "omni_correlation": omni_correlation,
                "mutual_consistency_loss": mutual_consistency_loss, "dropout": dropout}
    v = {}

    def add(op, label, *args, tests=False, **kwargs):
        """Variant "op label" of builders[op](*args, **kwargs); test-only (not production) with `tests`."""
        v[f"{op} {label}" + (" (tests)" if tests else "")] = (not tests, builders[op](*args, **kwargs))

    # Attention at CAML's bottleneck (4 samples, 4 heads of 32, 14 x 14 x 10 = 1,960 positions) and block
    # three (15,680): float32, and bf16 as the CMA block runs under CAML's autocast, dropout 0.5 as CAML's.
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for L in (1960, 15680):
            for p in (0.0, 0.5):
                add("intra_sample_attention", f"{name} B4 L{L} H4 d32 p{p}", 4, L, 4, 32, dt, p)
        for p in (0.0, 0.5):
            add("cross_sample_attention", f"{name} B4 L1960 H4 d32 p{p}", 4, 1960, 4, 32, dt, p)
    add("intra_sample_attention", "fp16 B4 L1960 H4 d32 p0.0", 4, 1960, 4, 32, torch.float16, 0.0)
    # Wider heads, up to the kernels' bound d <= MAX_HEAD_DIM.
    for name in ("fp32", "bf16", "fp16"):
        for d in (64, host("intra_sample_attention", "MAX_HEAD_DIM")):
            add("intra_sample_attention", f"{name} B4 L1960 H4 d{d} p0.0", 4, 1960, 4, d, dtypes[name], 0.0)
    # omni_correlation_loss: N = 2 x 12,800 filtered voxels, K = 2 classes x 256 memory entries (EVEN_K),
    # feat_dim 32; wider D.
    for name in ("fp32", "bf16", "fp16"):
        for D in (32, 64, 128):
            add("omni_correlation_loss", f"{name} N25600 K512 D{D}", 25600, 512, D, dtypes[name])
    add("omni_correlation_loss", "fp32 N25600 K512 D32 eps0", 25600, 512, 32, torch.float32, eps=0.0)
    for name in ("fp32", "bf16"):
        add("omni_correlation", f"{name} N25600 K512 D32", 25600, 512, 32, dtypes[name])
    # mutual_consistency_loss: CAML's two decoders on 4 patches of 112 x 112 x 80, 2 classes (float32 logits).
    for name in ("fp32", "bf16"):
        add("mutual_consistency_loss", f"{name} S2 B4 C2 112x112x80", 2, (4, 2, 112, 112, 80), dtypes[name])
    add("mutual_consistency_loss", "fp32 S3 B4 C14 64x64x32", 3, (4, 14, 64, 64, 32), torch.float32)
    # The CMA block's FFN dropout (4 x 1,960 tokens x 4 C).
    for name in ("fp32", "bf16"):
        add("dropout", f"{name} 7840x512", (7840, 512), dtypes[name])
    # Test-only float64 variants at the GPU tests' largest sizes (tests/test_*.py).
    add("intra_sample_attention", "fp64 B1 L33 H1 d128 p0.5", 1, 33, 1, 128, torch.float64, 0.5, tests=True)
    add("intra_sample_attention", "fp64 B2 L130 H1 d64 p0.0", 2, 130, 1, 64, torch.float64, 0.0, tests=True)
    add("intra_sample_attention", "fp64 B1 L97 H3 d16 p0.5", 1, 97, 3, 16, torch.float64, 0.5, tests=True)
    add("cross_sample_attention", "fp64 B64 L3 H1 d16 p0.5", 64, 3, 1, 16, torch.float64, 0.5, tests=True)
    add("cross_sample_attention", "fp64 B4 L1 H2 d37 p0.5", 4, 1, 2, 37, torch.float64, 0.5, tests=True)
    add("omni_correlation_loss", "fp64 N130 K513 D96", 130, 513, 96, torch.float64, tests=True)
    add("omni_correlation_loss", "fp64 N7 K77 D32 eps0", 7, 77, 32, torch.float64, eps=0.0, tests=True)
    add("omni_correlation", "fp64 N300 K130 D96", 300, 130, 96, torch.float64, tests=True)
    add("mutual_consistency_loss", "fp64 S3 B1 C5 13x11", 3, (1, 5, 13, 11), torch.float64, tests=True)
    return v


def _record(name: str):
    from caml_ops.triton._common import record_launches

    with record_launches() as launches:
        _variants()[name][1]()
    return launches


# ---------------------------------------------------------------------------
# Binding and compiling, as JITFunction.run does
# ---------------------------------------------------------------------------


def _specialise(launch, target):
    """(ASTSource, options dict) of a recorded launch, by Triton's own binder (triton/runtime/jit.py)."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    try:
        from triton import knobs
        debug, mode = knobs.runtime.debug, knobs.compilation.instrumentation_mode
    except (ImportError, AttributeError):
        debug, mode = False, None
    fn = launch.kernel
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or debug
    if mode is not None:
        kwargs["instrumentation_mode"] = mode
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options.__dict__


def _key(launch, src, options) -> str:
    constants = sorted((str(k), str(v)) for k, v in src.constants.items())
    opts = {k: options.get(k) for k in ("num_warps", "num_stages", "num_ctas", "maxnreg")}
    return json.dumps([launch.kernel.__name__, sorted(src.signature.items()), constants, repr(src.attrs), opts])


def _ptxas_info(log: str, name: str) -> dict:
    regs = re.search(r"Used (\d+) registers", log)
    spill_st = re.search(r"(\d+) bytes spill stores", log)
    spill_ld = re.search(r"(\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    if regs is None:
        raise RuntimeError(f"no ptxas -v report for {name}:\n{log[-2000:]}")
    return dict(regs=int(regs.group(1)), spill_stores=int(spill_st.group(1)) if spill_st else 0,
                spill_loads=int(spill_ld.group(1)) if spill_ld else 0, stack=int(stack.group(1)) if stack else 0)


def _constexpr_summary(launch) -> str:
    keep = ("BM", "BN", "BD", "BLOCK_P", "BLOCK_B", "BLOCK_DC", "BLOCK_C", "BLOCK_N", "BLOCK", "EVEN", "EVEN_K",
            "DROPOUT", "EPS_ZERO", "PREC", "DIVIDE")
    parts = [f"{k}={launch.kwargs[k]}" for k in keep if k in launch.kwargs]
    return " ".join(p.replace("True", "1").replace("False", "0") for p in parts)


def _compile_task(task):
    """Worker: re-record variant `name`, compile its launch `index` for `arch`; one result row."""
    name, index, arch, cache_dir = task
    _setup_env(cache_dir)
    import triton
    from triton.backends.compiler import GPUTarget

    launch = _record(name)[index]
    target = GPUTarget("cuda", arch, 32)
    row = dict(variant=name, kernel=launch.kernel.__name__, config=_constexpr_summary(launch),
               num_warps=launch.kwargs.get("num_warps", 4), num_stages=launch.kwargs.get("num_stages", 3))
    start = time.perf_counter()
    log = io.StringIO()
    try:
        src, options = _specialise(launch, target)
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options)
        row.update(_ptxas_info(log.getvalue(), row["kernel"]), shared=int(compiled.metadata.shared),
                   num_warps=compiled.metadata.num_warps, num_stages=compiled.metadata.num_stages, error=None)
    except Exception as exc:  # noqa: BLE001 - a compile error is a result row
        row.update(regs=None, spill_stores=None, spill_loads=None, stack=None, shared=None,
                   error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300])
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _plan(arch: int, cache_dir: str):
    """[(variant, launch index, production)] of the distinct specialisations, in variant order."""
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    seen, plan = {}, []
    for name, (production, _) in _variants().items():
        for index, launch in enumerate(_record(name)):
            src, options = _specialise(launch, target)
            key = _key(launch, src, options)
            if key in seen:
                if production:
                    plan[seen[key]][2] = True  # shared with a production variant: held to its standard
                continue
            seen[key] = len(plan)
            plan.append([name, index, production])
    return plan


def _markdown(rows: list, arch: int) -> str:
    lines = [f"| variant | kernel | constexprs | warps | stages | regs | spill st/ld B | stack B | smem B | sm_{arch} |",
             "|---|---|---|--:|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        spill = "" if r["regs"] is None else f"{r['spill_stores']}/{r['spill_loads']}"
        lines.append(f"| {r['variant']} | {r['kernel']} | {r['config']} | {r['num_warps']} | {r['num_stages']} | "
                     f"{'' if r['regs'] is None else r['regs']} | {spill} | {'' if r['stack'] is None else r['stack']} | "
                     f"{'' if r['shared'] is None else r['shared']} | {r['verdict']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, required=True, help="compute capability, e.g. 90 (H100/H200), 80 (A100)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--only", default=None, help="only variants whose name contains this")
    parser.add_argument("--markdown", default=None, help="write the table here")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--cache-dir", default=None,
                        help="Triton cache to fill (on a GPU machine: the one the runs use, to warm it; "
                             "default: a temporary one)")
    args = parser.parse_args(argv)

    with (contextlib.nullcontext(args.cache_dir) if args.cache_dir else
          tempfile.TemporaryDirectory(prefix="caml_aot_")) as cache_dir:
        _setup_env(cache_dir)
        import triton

        start = time.perf_counter()
        plan = [p for p in _plan(args.arch, cache_dir) if args.only is None or args.only in p[0]]
        print(f"triton {triton.__version__}, sm_{args.arch}: {len(plan)} distinct kernel specialisations, "
              f"{args.jobs} jobs", flush=True)
        tasks = [(name, index, args.arch, cache_dir) for name, index, _ in plan]
        if args.jobs > 1:
            import multiprocessing

            with futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                rows = list(pool.map(_compile_task, tasks))
        else:
            rows = [_compile_task(t) for t in tasks]

    limit = MAX_SHARED.get(args.arch)
    failures = 0
    for row, (_, _, production) in zip(rows, plan):
        row["production"] = production
        problems = []
        if row["error"]:
            problems.append(f"compile error: {row['error']}")
        else:
            if limit is not None and row["shared"] > limit:
                problems.append(f"shared memory {row['shared']} B > {limit} B")
            if row["spill_stores"] or row["spill_loads"]:
                problems.append("spills" if production else "spills (test-only variant: reported, not failed)")
        fatal = [p for p in problems if "test-only" not in p]
        failures += bool(fatal)
        row["verdict"] = "; ".join(problems) if problems else "ok"
        if fatal:
            row["verdict"] = "FAIL: " + row["verdict"]

    table = _markdown(rows, args.arch)
    print(table)
    total = sum(r["seconds"] for r in rows)
    print(f"{len(rows)} kernels, {failures} failing; {total:.0f} s of compiling in {time.perf_counter() - start:.0f} s "
          f"wall ({total / max(len(rows), 1):.1f} s per kernel)")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(arch=args.arch, triton=triton.__version__, rows=rows), f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
