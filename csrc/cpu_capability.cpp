// The capability whose build of the CPU kernels runs (csrc/cpu/dispatch.h).
#include <ATen/Version.h>  // at::get_cpu_capability: torch.backends.cpu.get_cpu_capability()

#include <string>

#include "cpu/dispatch.h"

namespace caml_ops {
namespace {

CpuCapability choose_cpu_capability() {
#if defined(__x86_64__) || defined(_M_X64)
  // torch's choice follows ATEN_CPU_CAPABILITY even past what the CPU has ("avx512" on an AVX2 CPU):
  // the CPU's own flags bound it. The AVX-512 build needs F, BW, VL and DQ, as ATen's.
  __builtin_cpu_init();
  const bool cpu_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return cpu_avx512 && at::get_cpu_capability() == "AVX512" ? CpuCapability::kAvx512 : CpuCapability::kAvx2;
#else
  return CpuCapability::kDefault;
#endif
}

}  // namespace

CpuCapability cpu_capability() {
  static const CpuCapability capability = choose_cpu_capability();
  return capability;
}

const char* cpu_capability_name() {
  switch (cpu_capability()) {
    case CpuCapability::kAvx512: return "AVX512";
    case CpuCapability::kAvx2: return "AVX2";
    default: return "DEFAULT";
  }
}

}  // namespace caml_ops
