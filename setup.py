"""Builds caml_ops._C ahead of time: the C++ CPU kernels always, the CUDA
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


def _cuda_available() -> bool:
    if os.environ.get("CAML_OPS_NO_CUDA", "0") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _extension():
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-fopenmp", "-DPy_LIMITED_API=0x03090000"]
    if platform.machine() in ("x86_64", "AMD64"):
        # at::vec picks its AVX2 path from this macro; every x86-64 CPU we target has AVX2 + FMA.
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    extra = {"cxx": cxx}
    if _cuda_available():
        sources += rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu")
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


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
