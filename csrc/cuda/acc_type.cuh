// The C++ types of the CUDA kernels: the input type of a Dtype, the
// accumulation type (float for float, half and bfloat16 inputs, double for
// double), the conversions to and from it, and its accurate (not the fast
// intrinsics') exp and log.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "dtype.h"

namespace caml_ops {

template <typename T>
using AccT = std::conditional_t<std::is_same_v<T, double>, double, float>;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(AccT<T> v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

// Calls f(T{}) with the input type T of dtype.
template <typename F>
void dispatch_dtype(cuda::Dtype dtype, F&& f) {
  switch (dtype) {
    case cuda::Dtype::kFloat32: return f(float{});
    case cuda::Dtype::kFloat64: return f(double{});
    case cuda::Dtype::kFloat16: return f(__half{});
    case cuda::Dtype::kBFloat16: return f(__nv_bfloat16{});
  }
}

}  // namespace caml_ops
