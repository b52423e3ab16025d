// Host helpers of the CUDA bindings (csrc/cuda/*.cpp).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "dtype.h"

namespace caml_ops {
namespace cuda {

// The kernels' name of a dtype that csrc/checks.h's check_input took.
inline Dtype dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return Dtype::kFloat32;
    case at::kDouble:
      return Dtype::kFloat64;
    case at::kHalf:
      return Dtype::kFloat16;
    case at::kBFloat16:
      return Dtype::kBFloat16;
    default:
      TORCH_CHECK(false, "caml_ops: the CUDA kernels take float32, float64, float16 or bfloat16, got ", t);
  }
}

}  // namespace cuda
}  // namespace caml_ops
