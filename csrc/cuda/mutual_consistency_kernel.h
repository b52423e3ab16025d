// Launchers of the CUDA mutual consistency kernels (mutual_consistency_kernel.cu);
// raw pointers only, so that the .cu file needs no torch header.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.h"

namespace caml_ops {
namespace cuda {

// Up to this many models, the tensors' pointers travel by value in the kernel
// arguments (2 x 64 pointers: 1 KiB of the 4 KiB of parameters every CUDA
// version takes); beyond, through a table in device memory.
constexpr int kMutualConsistencyInlineModels = 64;
// Classes live in registers: C is bounded.
constexpr int kMutualConsistencyMaxClasses = 32;

// S logits tensors [B, C, N] (N = prod(spatial)), contiguous, of one dtype.
// Math in float32 for float32 and the half types, in float64 for float64: the
// "accumulation type" of the comments below.
struct MutualConsistencyLossProblem {
  Dtype dtype;
  int64_t S, B, C, N;
  double temperature;
  const void* const* logits;        // host array of the S device pointers
  const void* const* logits_table;  // the same array in device memory if S > kMutualConsistencyInlineModels, else nullptr
};

// Element count of the `partials` scratch (accumulation type) the forward needs.
int64_t mutual_consistency_loss_partials(const MutualConsistencyLossProblem& pb);

// loss[0] = sum_{s != t} mean((p_s - sharpen(p_t))^2) in the accumulation type. Launches two
// kernels: per-block partials, then their sum in a fixed order (deterministic).
void mutual_consistency_loss_forward(const MutualConsistencyLossProblem& pb, void* partials, void* loss,
                                     cudaStream_t stream);

// grads[s] = grad[0] * d loss / d logits[s] (same dtype and layout as the logits);
// grad: one value of the accumulation type in device memory; grads / grads_table like logits / logits_table.
void mutual_consistency_loss_backward(const MutualConsistencyLossProblem& pb, const void* grad, void* const* grads,
                                      void* const* grads_table, cudaStream_t stream);

}  // namespace cuda
}  // namespace caml_ops
