// Launchers of the CUDA mutual consistency kernels (mutual_consistency_kernel.cu);
// raw pointers only, so that the .cu file needs no torch header.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace caml_ops {
namespace cuda {

enum class McDtype { kFloat32, kFloat16, kBFloat16 };

// Up to this many models, the tensors' pointers travel by value in the kernel
// arguments; beyond, through a table in device memory.
constexpr int kMcInlineModels = 16;
// Classes live in registers: C is bounded.
constexpr int kMcMaxClasses = 32;

// S logits tensors [B, C, N] (N = prod(spatial)), contiguous, of one dtype.
struct McProblem {
  McDtype dtype;
  int64_t S, B, C, N;
  float temperature;
  const void* const* logits;        // host array of the S device pointers
  const void* const* logits_table;  // the same array in device memory if S > kMcInlineModels, else nullptr
};

// Float count of the `partials` scratch mc_forward needs.
int64_t mc_forward_partials(const McProblem& pb);

// loss[0] = sum_{s != t} mean((p_s - sharpen(p_t))^2) in float32. Launches two kernels:
// per-block partials, then their sum in a fixed order (deterministic).
void mc_forward(const McProblem& pb, float* partials, float* loss, cudaStream_t stream);

// grads[s] = grad[0] * d loss / d logits[s] (same dtype and layout as the logits);
// grad: one float in device memory; grads / grads_table like logits / logits_table.
void mc_backward(const McProblem& pb, const float* grad, void* const* grads, void* const* grads_table,
                 cudaStream_t stream);

}  // namespace cuda
}  // namespace caml_ops
