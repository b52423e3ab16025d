// Launchers of the CUDA cross-sample attention kernels (cross_sample_attention_kernel.cu);
// raw pointers only, so that the .cu file needs no torch header.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace caml_ops {
namespace cuda {

enum class CsaDtype { kFloat32, kFloat64, kFloat16, kBFloat16 };

// Bound of the CUDA kernels (larger heads: the triton or cpu backend).
// A row of d elements is spread over at most one warp, 8 elements per lane.
constexpr int64_t kCsaMaxHeadDim = 256;

// A [B, L, H, d] tensor with unit stride along d: element (b, l, h, c) at data[b*sb + l*sl + h*sh + c].
struct CsaTensor {
  const void* data;
  int64_t sb, sl, sh;
};

struct CsaProblem {
  CsaDtype dtype;
  int64_t B, L, H, d;  // B, d >= 1, d <= kCsaMaxHeadDim, B < 2^31
  double scale, dropout_p;
  uint64_t seed, offset;  // rng_state (csrc/philox.h); unused when dropout_p == 0
};

// out: new contiguous [B, L, H, d] of the input dtype; lse: contiguous [B, L, H], float32
// (float64 for float64 inputs).
void csa_forward(const CsaProblem& pb, CsaTensor q, CsaTensor k, CsaTensor v, void* out, void* lse,
                 cudaStream_t stream);

// grad_q, grad_k, grad_v: new contiguous [B, L, H, d] of the input dtype; lse as csa_forward wrote it;
// delta: scratch [B, L, H] of lse's dtype. `out` is read only when B exceeds one tile of the kernels.
void csa_backward(const CsaProblem& pb, CsaTensor grad_out, CsaTensor q, CsaTensor k, CsaTensor v, CsaTensor out,
                  const void* lse, void* delta, void* grad_q, void* grad_k, void* grad_v, cudaStream_t stream);

}  // namespace cuda
}  // namespace caml_ops
