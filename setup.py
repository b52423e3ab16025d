"""Builds caml_ops._C ahead of time: the C++ CPU kernels always (on x86-64 twice,
for AVX2 and for AVX-512, chosen at run time: csrc/cpu/dispatch.h), the CUDA
kernels whenever torch has CUDA and nvcc is found (CUDA_HOME)."""
import glob
import os
import platform

# torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper outside the toolkit.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
X86 = platform.machine() in ("x86_64", "AMD64")
# at::vec picks its AVX2 path from this macro; every x86-64 CPU we target has AVX2 + FMA.
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
# The second build of the CPU kernels: ATen's AVX512 capability (F, BW, VL, DQ).
AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
                "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]
CPU_KERNELS = "csrc/cpu/*.cpp"


def _rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cuda_available() -> bool:
    if os.environ.get("CAML_OPS_NO_CUDA", "0") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _extension():
    sources = _rel("csrc/*.cpp") + _rel(CPU_KERNELS)
    cxx = ["-O3", "-fopenmp", "-DPy_LIMITED_API=0x03090000"]
    if X86:
        cxx += AVX2_FLAGS
    extra = {"cxx": cxx}
    if _cuda_available():
        sources += _rel("csrc/cuda/*.cpp") + _rel("csrc/cuda/*.cu")
        extra["cxx"].append("-DWITH_CUDA")
        archs = os.environ.get("CAML_OPS_CUDA_ARCHS", "80;90").split(";")
        extra["nvcc"] = ["-O3"] + [
            f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs
        ]
        if os.environ.get("CAML_OPS_PTXAS_VERBOSE", "0") == "1":
            # ptxas's registers / spills / shared memory per kernel instantiation, in the build log
            # (benchmarks/ptxas_report.py turns it into a table and fails on spills).
            extra["nvcc"].append("-Xptxas=-v")
        return cpp_extension.CUDAExtension(
            "caml_ops._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"], py_limited_api=True
        )
    return cpp_extension.CppExtension(
        "caml_ops._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"], py_limited_api=True
    )


class BuildExtension(cpp_extension.BuildExtension):
    """torch's build, plus on x86-64 the AVX-512 build of the CPU kernels: csrc/cpu/*.cpp compiled a second
    time, with AVX512_FLAGS in place of AVX2_FLAGS, into build_temp/avx512, and linked after every other
    object (so that the linker keeps the AVX2 build's copy of shared inline code: csrc/cpu/dispatch.h)."""

    def build_extension(self, ext):
        if not X86:
            return super().build_extension(ext)
        compile_sources = self.compiler.compile
        kernels = set(_rel(CPU_KERNELS))

        def compile_both_builds(sources, output_dir=None, extra_postargs=None, **kwargs):
            objects = compile_sources(sources, output_dir=output_dir, extra_postargs=extra_postargs, **kwargs)
            cxx = [f for f in extra_postargs["cxx"] if f not in AVX2_FLAGS] + AVX512_FLAGS
            objects += compile_sources(
                [s for s in sources if os.path.relpath(os.path.join(ROOT, s), ROOT) in kernels],
                output_dir=os.path.join(output_dir, "avx512"), extra_postargs={**extra_postargs, "cxx": cxx}, **kwargs,
            )
            return objects

        self.compiler.compile = compile_both_builds
        try:
            return super().build_extension(ext)
        finally:
            self.compiler.compile = compile_sources


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
