"""The builds of the C++ CPU kernels per capability (csrc/cpu/dispatch.h): the capability caml_ops reports and
how ATEN_CPU_CAPABILITY sets it, the AVX2 build (forced in a subprocess) against the default one (AVX-512 where
the CPU has it) on one small case of every CPU op, and no AVX-512 instruction reachable from outside the
AVX-512 build of the library."""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import caml_ops
from caml_ops import _backend

ROOT = Path(__file__).resolve().parents[1]
X86 = platform.machine() in ("x86_64", "AMD64")
pytestmark = pytest.mark.skipif(not _backend.HAS_EXTENSION, reason="caml_ops._C not built")


def _cpu_has_avx512() -> bool:
    """Whether this CPU has the AVX-512 subsets of the AVX-512 build (F, BW, VL, DQ)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= set(flags)


def _expected_capability(torch_capability: str) -> str:
    if not X86:
        return "DEFAULT"
    return "AVX512" if torch_capability == "AVX512" and _cpu_has_avx512() else "AVX2"


def _in_subprocess(aten_cpu_capability: str, code: str) -> str:
    """stdout of `code` run in a fresh interpreter with ATEN_CPU_CAPABILITY set."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": aten_cpu_capability, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_the_reported_capability_is_the_lower_of_the_cpus_and_torchs():
    assert caml_ops.cpu_capability() == _expected_capability(torch.backends.cpu.get_cpu_capability())


@pytest.mark.skipif(not X86, reason="the AVX2 and AVX-512 builds are x86-64's")
@pytest.mark.parametrize("variable,torch_capability", [("avx2", "AVX2"), ("default", "DEFAULT"), ("avx512", None)])
def test_aten_cpu_capability_sets_the_capability(variable, torch_capability):
    """avx2 forces AVX2; default runs AVX2 too (the lowest build); avx512 runs AVX-512 only on a CPU that has it."""
    line = _in_subprocess(
        variable, "import torch, caml_ops; print(torch.backends.cpu.get_cpu_capability(), caml_ops.cpu_capability())"
    )
    torch_reported, ours = line.split()
    assert torch_capability is None or torch_reported == torch_capability
    assert ours == ("AVX512" if variable == "avx512" and _cpu_has_avx512() else "AVX2")


# ---------------------------------------------------------------- every CPU op on both builds


def _with_grads(name: str, fn, inputs: list, results: dict) -> None:
    """results[name] = fn(*inputs), results[name.grad<i>] = the gradients of its sum with fixed weights."""
    inputs = [x.detach().requires_grad_() for x in inputs]
    out = fn(*inputs)
    results[name] = out.detach()
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    for i, grad in enumerate(torch.autograd.grad((out * weights).sum(), inputs)):
        results[f"{name}.grad{i}"] = grad


def every_op(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One small case of every CPU op, forward and backward, sizes past whole vectors of either build; dropout's
    values with v the identity, so that an output is 0 exactly where the mask drops."""
    results: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    cpu = {"backend": "cpu"}

    torch.manual_seed(1)
    _with_grads("dropout", lambda x: caml_ops.dropout(x, 0.4, **cpu), [rand(3, 1000)], results)
    for name, B, L, d in (("cross_sample_attention", 5, 6, 17), ("intra_sample_attention", 2, 70, 20)):
        fn = getattr(caml_ops, name)
        q, k, v = rand(B, L, 2, d), rand(B, L, 2, d), rand(B, L, 2, d)
        _with_grads(name, lambda q, k, v: fn(q, k, v, **cpu), [q, k, v], results)
        torch.manual_seed(2)
        _with_grads(f"{name}.dropout", lambda q, k, v: fn(q, k, v, dropout_p=0.3, **cpu), [q, k, v], results)
    # v[b, l, h] = e_b (cross-sample) or e_l (intra-sample): out[.., j] is P Z of key j, 0 where dropped.
    eye = lambda n: torch.eye(n, dtype=dtype)  # noqa: E731
    torch.manual_seed(3)
    results["cross_sample_attention.kept"] = caml_ops.cross_sample_attention(
        rand(5, 6, 2, 5), rand(5, 6, 2, 5), eye(5)[:, None, None, :].expand(5, 6, 2, 5), dropout_p=0.3, **cpu) != 0
    torch.manual_seed(4)
    results["intra_sample_attention.kept"] = caml_ops.intra_sample_attention(
        rand(2, 70, 2, 70), rand(2, 70, 2, 70), eye(70)[None, :, None, :].expand(2, 70, 2, 70), dropout_p=0.3,
        **cpu) != 0
    feat_v, feat_a, memory = rand(37, 19), rand(37, 19), rand(45, 19)
    _with_grads("omni_correlation_loss", lambda fv, fa, m: caml_ops.omni_correlation_loss(fv, fa, m, **cpu),
                [feat_v, feat_a, memory], results)
    _with_grads("omni_correlation", lambda f, m: caml_ops.omni_correlation(f, m, **cpu), [feat_v, memory], results)
    for classes in (2, 3):
        _with_grads(f"mutual_consistency_loss.C{classes}",
                    lambda a, b: caml_ops.mutual_consistency_loss([a, b], **cpu),
                    [3 * rand(2, classes, 5, 7, 9), 3 * rand(2, classes, 5, 7, 9)], results)
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_the_avx2_build_matches_the_default_build(dtype, tmp_path):
    """Dropout (the op, and the attention masks) bit for bit; the rest within 2^10 ulps of each result's largest
    value: the builds differ in the order of their sums over vector lanes (whose terms cancel in the softmax
    backward: measured up to ~220 ulps), not in their arithmetic per element. A wrong mask or lane would be off
    by the size of a value."""
    out = tmp_path / "avx2.pt"
    line = _in_subprocess("avx2", (
        "import torch, caml_ops\n"
        "from tests.test_cpu_capability import every_op\n"
        f"torch.save(every_op({dtype}), {str(out)!r})\n"
        "print(caml_ops.cpu_capability())\n"
    ))
    assert line == ("AVX2" if X86 else "DEFAULT")
    forced, default = torch.load(out), every_op(dtype)
    assert forced.keys() == default.keys()
    for name in ("dropout", "dropout.grad0", "cross_sample_attention.kept", "intra_sample_attention.kept"):
        assert torch.equal(forced[name], default[name]), name
    assert default["intra_sample_attention.kept"].float().mean().item() == pytest.approx(0.7, abs=0.02)
    ulps = 2**10 * torch.finfo(dtype).eps
    for name, value in default.items():
        if value.dtype != torch.bool:
            torch.testing.assert_close(forced[name], value, rtol=0, atol=ulps * value.abs().max().item(),
                                       msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------- no AVX-512 outside its build

# Registers and instructions that only AVX-512 (EVEX) code has, in objdump's AT&T syntax.
_AVX512 = re.compile(
    r"%zmm|%k[0-7]\b|%[xy]mm(1[6-9]|2\d|3[01])\b|\{1to\d+\}"
    r"|\s(vpternlog|vperm[ti]2|vpro[lr]|vpmov[qdw][bwd]\b|vcvtt?\w*2u|vcvtu|vrndscale|vscalef|vpabsq|vp(max|min)[su]q"
    r"|vpsra[v]?q|vpmullq|valign|v(p)?compress|v(p)?expand|v(insert|extract)[fi](32|64)x|vshuf[fi](32|64)x"
    r"|vbroadcast[fi](32x[248]|64x[24])|vmovdq[au](8|16|32|64)|vrcp14|vrsqrt14|vfixupimm|vgetexp|vgetmant"
    r"|vrange|vreduce|vfpclass|vpconflict|vplzcnt|vpopcnt|k(mov|and|or|xor|not|shift|test|unpck))"
)
_FUNCTION = re.compile(r"^[0-9a-f]+ <(.+)>:$")
_CALL = re.compile(r"\s(call|jmp)\s+[0-9a-f]+ <(.+?)(@plt)?(\+0x[0-9a-f]+)?>")


def _functions(library: str) -> tuple[dict[str, bool], dict[str, set[str]]]:
    """Per function of the disassembled library: whether it has AVX-512 instructions, and its direct callers."""
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", library], capture_output=True,
                             text=True, check=True).stdout
    avx512, callers, current = {}, defaultdict(set), None
    for line in listing.splitlines():
        header = _FUNCTION.match(line)
        if header:
            current = header.group(1)
            avx512.setdefault(current, False)
        elif current is not None and line.startswith(" "):
            if _AVX512.search(line):
                avx512[current] = True
            call = _CALL.search(line)
            if call and call.group(2) != current:
                callers[call.group(2)].add(current)
    return avx512, callers


@pytest.mark.skipif(not X86 or shutil.which("objdump") is None, reason="needs x86-64 and objdump")
def test_no_avx512_instruction_outside_the_avx512_build():
    """AVX-512 instructions only in functions of the AVX-512 build (named ...::AVX512::..., or called from
    such functions alone): the AVX2 build, the registration and the dispatch never reach one."""
    avx512, callers = _functions(caml_ops._C.__file__)
    assert any(avx512.values()), "no AVX-512 code found: is the AVX-512 build linked in?"
    side = {f for f in avx512 if "AVX512" in f}
    grew = True
    while grew:
        grown = {f for f in avx512 if f not in side and callers[f] and callers[f] <= side}
        side |= grown
        grew = bool(grown)
    outside = sorted(f for f, has in avx512.items() if has and f not in side)
    assert not outside, f"AVX-512 code reachable from outside the AVX-512 build: {outside[:10]}"
