// Launchers of the CUDA cross-sample attention kernels (cross_sample_attention_kernel.cu);
// raw pointers only, so that the .cu file needs no torch header.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../layout.h"
#include "dtype.h"

namespace caml_ops {
namespace cuda {

// Bound of the CUDA kernels (larger heads: the triton or cpu backend).
// A row of d elements is spread over at most one warp, 8 elements per lane.
constexpr int64_t kCrossSampleAttentionMaxHeadDim = 256;

// q, k, v, grad_out, out: views of `dtype` tensors; pb: B, d >= 1, d <= kCrossSampleAttentionMaxHeadDim, B < 2^31.

// out: new contiguous [B, L, H, d] of the input dtype; lse: contiguous [B, L, H], float32
// (float64 for float64 inputs).
void cross_sample_attention_forward(Dtype dtype, const AttentionProblem& pb, HeadsView<const void> q,
                                    HeadsView<const void> k, HeadsView<const void> v, void* out, void* lse,
                                    cudaStream_t stream);

// grad_q, grad_k, grad_v: new contiguous [B, L, H, d] of the input dtype; lse as the forward wrote it;
// delta: scratch [B, L, H] of lse's dtype. `out` is read only when B exceeds one tile of the kernels.
void cross_sample_attention_backward(Dtype dtype, const AttentionProblem& pb, HeadsView<const void> grad_out,
                                     HeadsView<const void> q, HeadsView<const void> k, HeadsView<const void> v,
                                     HeadsView<const void> out, const void* lse, void* delta, void* grad_q,
                                     void* grad_k, void* grad_v, cudaStream_t stream);

}  // namespace cuda
}  // namespace caml_ops
