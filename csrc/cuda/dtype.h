// The input dtypes of the CUDA kernels, as the launchers take them (the .cu
// files see no torch type; csrc/cuda/binding.h maps torch's).
#pragma once

namespace caml_ops {
namespace cuda {

enum class Dtype { kFloat32, kFloat64, kFloat16, kBFloat16 };

}  // namespace cuda
}  // namespace caml_ops
