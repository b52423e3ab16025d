// Input checks of the attention kernel ops (cross_sample_attention_*,
// intra_sample_attention_*) and the rng_state of dropout, shared by the
// CPU kernels and the CUDA binding; host code only. Messages name the op, the
// argument and the expected form.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

namespace caml_ops {

// The sizes and scalars of one call, rng_state read on the host.
struct AttentionProblem {
  int64_t B, L, H, d;
  double scale, dropout_p;
  uint64_t seed, offset;  // csrc/philox.h; unused when dropout_p == 0
};

// The (seed, offset) of csrc/philox.h's dropout.
struct RngState {
  uint64_t seed, offset;
};

// Reads rng_state, an int64 CPU tensor [2] = (seed, offset).
inline RngState read_rng_state(const char* op, const at::Tensor& rng_state) {
  TORCH_CHECK(rng_state.device().is_cpu() && rng_state.scalar_type() == at::kLong && rng_state.dim() == 1 &&
                  rng_state.size(0) == 2,
              op, ": rng_state must be an int64 CPU tensor [2] = (seed, offset), got ", rng_state.scalar_type(), " ",
              rng_state.sizes(), " on ", rng_state.device());
  const at::Tensor state = rng_state.contiguous();
  const int64_t* seed_offset = state.const_data_ptr<int64_t>();
  return {static_cast<uint64_t>(seed_offset[0]), static_cast<uint64_t>(seed_offset[1])};
}

// What the calling kernels take.
struct AttentionKernel {
  c10::DeviceType device;
  bool half_types;  // float16 / bfloat16 as well as float32 / float64 (else caml_ops upcasts them)
};

// Layout of lse: cross-sample [B, L, H], intra-sample [B, H, L].
enum class LseLayout { kBLH, kBHL };

// lse's dtype: float32, float64 for float64 inputs.
inline at::ScalarType attention_lse_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// x (k, v, grad_out, out) has q's shape, dtype and device.
inline void check_like_q(const char* op, const at::Tensor& x, const char* name, const at::Tensor& q) {
  TORCH_CHECK(x.sizes() == q.sizes(), op, ": ", name, " must have q's shape ", q.sizes(), " ([B, L, H, d]), got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ", x.scalar_type(), " but q has ",
              q.scalar_type());
  TORCH_CHECK(x.device() == q.device(), op, ": ", name, " is on ", x.device(), " but q is on ", q.device());
}

// Checks q, k, v [B, L, H, d], scale and dropout_p, and reads rng_state (int64 CPU [2] = (seed, offset)).
inline AttentionProblem check_attention(const char* op, AttentionKernel kernel, const at::Tensor& q,
                                        const at::Tensor& k, const at::Tensor& v, double scale, double dropout_p,
                                        const at::Tensor& rng_state) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D [B, L, H, d], got shape ", q.sizes());
  TORCH_CHECK(q.device().type() == kernel.device, op, ": q must be a ", c10::DeviceTypeName(kernel.device),
              " tensor, got one on ", q.device());
  const at::ScalarType t = q.scalar_type();
  const bool half = t == at::kHalf || t == at::kBFloat16;
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || (half && kernel.half_types), op, ": q must be ",
              kernel.half_types ? "float32, float64, float16 or bfloat16"
                                : "float32 or float64 (half types are upcast by caml_ops)",
              ", got ", t);
  check_like_q(op, k, "k", q);
  check_like_q(op, v, "v", q);
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), d = q.size(3);
  TORCH_CHECK(B >= 1 && L >= 1 && d >= 1, op, ": q must be [B, L, H, d] with B, L, d >= 1, got shape ", q.sizes());
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  const RngState rng = read_rng_state(op, rng_state);
  return {B, L, H, d, scale, dropout_p, rng.seed, rng.offset};
}

// check_attention, and grad_out, out like q, lse as the forward wrote it.
inline AttentionProblem check_attention_backward(const char* op, AttentionKernel kernel, LseLayout layout,
                                                 const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                                 double scale, double dropout_p, const at::Tensor& rng_state) {
  const AttentionProblem pb = check_attention(op, kernel, q, k, v, scale, dropout_p, rng_state);
  check_like_q(op, grad_out, "grad_out", q);
  check_like_q(op, out, "out", q);
  const bool blh = layout == LseLayout::kBLH;
  const int64_t n1 = blh ? pb.L : pb.H, n2 = blh ? pb.H : pb.L;
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == pb.B && lse.size(1) == n1 && lse.size(2) == n2, op, ": lse must be ",
              blh ? "[B, L, H]" : "[B, H, L]", " = [", pb.B, ", ", n1, ", ", n2, "], got shape ", lse.sizes());
  const at::ScalarType lse_t = attention_lse_dtype(q.scalar_type());
  TORCH_CHECK(lse.scalar_type() == lse_t, op, ": lse must be ", lse_t, " for ", q.scalar_type(), " inputs, got ",
              lse.scalar_type());
  TORCH_CHECK(lse.device() == q.device(), op, ": lse is on ", lse.device(), " but q is on ", q.device());
  return pb;
}

}  // namespace caml_ops
