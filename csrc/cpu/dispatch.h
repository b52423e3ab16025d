// The CPU kernels per capability, as ATen's CPU kernels (DispatchStub):
// on x86-64, setup.py compiles every csrc/cpu/*.cpp twice, with the AVX2 flags
// and -DCPU_CAPABILITY=AVX2, and with the AVX-512 flags and
// -DCPU_CAPABILITY=AVX512. Each file defines its op functions in
// `inline namespace CPU_CAPABILITY` (caml_ops::AVX2::dropout,
// caml_ops::AVX512::dropout) and ends with CAML_OPS_REGISTER_CPU(op) or
// CAML_OPS_REGISTER_CPU_FORWARD_BACKWARD(op): the AVX2 build registers one
// kernel per op that calls the build of cpu_capability(); the AVX-512 build
// registers nothing. Elsewhere (one build, no CPU_CAPABILITY_AVX2) the macros
// register the op functions directly.
//
// No AVX-512 instruction may run on a CPU without it, so nothing compiled
// with the AVX-512 flags may stand in for code of the AVX2 build:
// - our code has capability namespaces (vec_math.h, gemm.h, philox_vec.h,
//   simd.h, the kernel files) or internal linkage, and at::vec has its own
//   (at::vec::AVX2, at::vec::AVX512): the two builds share no name;
// - inline code both builds take from shared headers (checks.h, philox.h, the
//   std, c10 and ATen templates) is emitted by each as a COMDAT copy under one
//   name, of which the linker keeps the first: setup.py links the AVX-512
//   objects last, so the copy kept is the AVX2 build's (a copy only the
//   AVX-512 objects emit is only called from them).
// tests/test_cpu_capability.py checks the built library for AVX-512
// instructions reachable from outside the AVX-512 build.
#pragma once

#include <torch/library.h>

namespace caml_ops {

enum class CpuCapability { kDefault, kAvx2, kAvx512 };

// The build the CPU kernels run: the lower of what this CPU supports and what
// torch's own CPU kernels use (torch.backends.cpu.get_cpu_capability(), which
// ATEN_CPU_CAPABILITY sets), and at least AVX2 on x86-64 (our lowest build).
// Chosen on the first call, then fixed for the process.
CpuCapability cpu_capability();
// "AVX512", "AVX2" or "DEFAULT" (another architecture), as torch names them.
const char* cpu_capability_name();

#if defined(CPU_CAPABILITY_AVX2)
// Calls kAvx512 where cpu_capability() is AVX-512, else kAvx2.
template <auto kAvx2, auto kAvx512>
struct CpuDispatch;
template <typename R, typename... A, R (*kAvx2)(A...), R (*kAvx512)(A...)>
struct CpuDispatch<kAvx2, kAvx512> {
  static R call(A... args) { return (cpu_capability() == CpuCapability::kAvx512 ? kAvx512 : kAvx2)(args...); }
};
#endif

}  // namespace caml_ops

// In namespace caml_ops, after the op functions: CAML_OPS_REGISTER_CPU(op)
// registers `op` (csrc/caml_ops.cpp's schema), CAML_OPS_REGISTER_CPU_FORWARD_BACKWARD(op)
// `op`_forward and `op`_backward.
#if defined(CPU_CAPABILITY_AVX512)
#define CAML_OPS_REGISTER_CPU(op)
#define CAML_OPS_REGISTER_CPU_FORWARD_BACKWARD(op)
#else
#if defined(CPU_CAPABILITY_AVX2)
// The AVX-512 build's function: the same signature, in its namespace.
#define CAML_OPS_DECLARE_CPU(op) \
  namespace AVX512 {             \
  decltype(::caml_ops::AVX2::op) op; \
  }
#define CAML_OPS_IMPL_CPU(m, op) \
  m.impl(#op, &::caml_ops::CpuDispatch<&::caml_ops::AVX2::op, &::caml_ops::AVX512::op>::call)
#else
#define CAML_OPS_DECLARE_CPU(op)
#define CAML_OPS_IMPL_CPU(m, op) m.impl(#op, &::caml_ops::op)
#endif

#define CAML_OPS_REGISTER_CPU(op) \
  CAML_OPS_DECLARE_CPU(op)        \
  TORCH_LIBRARY_IMPL(caml_ops, CPU, m) { CAML_OPS_IMPL_CPU(m, op); }

#define CAML_OPS_REGISTER_CPU_FORWARD_BACKWARD(op) \
  CAML_OPS_DECLARE_CPU(op##_forward)               \
  CAML_OPS_DECLARE_CPU(op##_backward)              \
  TORCH_LIBRARY_IMPL(caml_ops, CPU, m) {           \
    CAML_OPS_IMPL_CPU(m, op##_forward);            \
    CAML_OPS_IMPL_CPU(m, op##_backward);           \
  }
#endif
