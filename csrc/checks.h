// Input checks of the kernel ops, shared by the CPU kernels and the CUDA
// bindings, and the host side of csrc/layout.h; host code only. The checks
// guard what the kernels rely on (shapes, dtypes, devices, rng_state) for
// callers of torch.ops.caml_ops that skip the Python layer. Messages name the
// op, the argument and the expected form.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

#include "layout.h"
#include "philox.h"

namespace caml_ops {

// What a kernel takes: its device, and whether float16 / bfloat16 as well as
// float32 / float64 (else caml_ops upcasts them).
struct KernelTarget {
  c10::DeviceType device;
  bool half_types;
};

constexpr KernelTarget kCpuKernel{c10::DeviceType::CPU, /*half_types=*/false};
constexpr KernelTarget kCudaKernel{c10::DeviceType::CUDA, /*half_types=*/true};

// The kernels' accumulation dtype, that of lse and of the loss: float64 for
// float64 inputs, else float32.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// x is on the target's device and of a dtype it takes.
inline void check_input(const char* op, const char* name, const at::Tensor& x, KernelTarget target) {
  TORCH_CHECK(x.device().type() == target.device, op, ": ", name, " must be a ", c10::DeviceTypeName(target.device),
              " tensor, got one on ", x.device());
  const at::ScalarType t = x.scalar_type();
  const bool half = t == at::kHalf || t == at::kBFloat16;
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || (half && target.half_types), op, ": ", name, " must be ",
              target.half_types ? "float32, float64, float16 or bfloat16"
                                : "float32 or float64 (half types are upcast by caml_ops)",
              ", got ", t);
}

// dropout_p in [0, 1) and rng_state, an int64 CPU tensor [2] = (seed, offset):
// the call's dropout (csrc/philox.h).
inline Dropout check_dropout(const char* op, double dropout_p, const at::Tensor& rng_state) {
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(rng_state.device().is_cpu() && rng_state.scalar_type() == at::kLong && rng_state.dim() == 1 &&
                  rng_state.size(0) == 2,
              op, ": rng_state must be an int64 CPU tensor [2] = (seed, offset), got ", rng_state.scalar_type(), " ",
              rng_state.sizes(), " on ", rng_state.device());
  const at::Tensor state = rng_state.contiguous();
  const int64_t* seed_offset = state.const_data_ptr<int64_t>();
  return make_dropout(dropout_p, static_cast<uint64_t>(seed_offset[0]), static_cast<uint64_t>(seed_offset[1]));
}

// ---------------------------------------------------------------- layout

// x itself when its last dimension is contiguous (the strides of the others
// are used as they are), else a contiguous copy.
inline at::Tensor last_dim_contiguous(const at::Tensor& x) {
  return x.size(-1) == 1 || x.stride(-1) == 1 ? x : x.contiguous();
}

// The view of a [B, L, H, d] tensor whose last dimension is contiguous
// (last_dim_contiguous); T = void: any dtype.
template <typename T>
HeadsView<const T> heads_view(const at::Tensor& x) {
  return {static_cast<const T*>(x.const_data_ptr()), x.stride(0), x.stride(1), x.stride(2)};
}

// ---------------------------------------------------------------- attention

// Layout of lse: cross-sample [B, L, H], intra-sample [B, H, L].
enum class LseLayout { kBLH, kBHL };

// x (k, v, grad_out, out) has q's shape, dtype and device.
inline void check_like_q(const char* op, const at::Tensor& x, const char* name, const at::Tensor& q) {
  TORCH_CHECK(x.sizes() == q.sizes(), op, ": ", name, " must have q's shape ", q.sizes(), " ([B, L, H, d]), got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ", x.scalar_type(), " but q has ",
              q.scalar_type());
  TORCH_CHECK(x.device() == q.device(), op, ": ", name, " is on ", x.device(), " but q is on ", q.device());
}

// Checked attention inputs: the problem and the operands, their last
// dimension contiguous (last_dim_contiguous); lse contiguous.
struct AttentionInputs {
  AttentionProblem pb;
  at::Tensor q, k, v;
};

struct AttentionBackwardInputs {
  AttentionProblem pb;
  at::Tensor grad_out, q, k, v, out, lse;
};

// Checks q, k, v [B, L, H, d], scale, dropout_p and rng_state.
inline AttentionInputs check_attention(const char* op, KernelTarget target, const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, double scale, double dropout_p,
                                        const at::Tensor& rng_state) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D [B, L, H, d], got shape ", q.sizes());
  check_input(op, "q", q, target);
  check_like_q(op, k, "k", q);
  check_like_q(op, v, "v", q);
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), d = q.size(3);
  TORCH_CHECK(B >= 1 && L >= 1 && d >= 1, op, ": q must be [B, L, H, d] with B, L, d >= 1, got shape ", q.sizes());
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  const AttentionProblem pb{B, L, H, d, scale, check_dropout(op, dropout_p, rng_state)};
  return {pb, last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)};
}

// check_attention, and grad_out, out like q, lse as the forward wrote it.
inline AttentionBackwardInputs check_attention_backward(const char* op, KernelTarget target, LseLayout layout,
                                                 const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                                 double scale, double dropout_p, const at::Tensor& rng_state) {
  const AttentionInputs in = check_attention(op, target, q, k, v, scale, dropout_p, rng_state);
  const AttentionProblem& pb = in.pb;
  check_like_q(op, grad_out, "grad_out", q);
  check_like_q(op, out, "out", q);
  const bool blh = layout == LseLayout::kBLH;
  const int64_t n1 = blh ? pb.L : pb.H, n2 = blh ? pb.H : pb.L;
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == pb.B && lse.size(1) == n1 && lse.size(2) == n2, op, ": lse must be ",
              blh ? "[B, L, H]" : "[B, H, L]", " = [", pb.B, ", ", n1, ", ", n2, "], got shape ", lse.sizes());
  const at::ScalarType lse_t = acc_dtype(q.scalar_type());
  TORCH_CHECK(lse.scalar_type() == lse_t, op, ": lse must be ", lse_t, " for ", q.scalar_type(), " inputs, got ",
              lse.scalar_type());
  TORCH_CHECK(lse.device() == q.device(), op, ": lse is on ", lse.device(), " but q is on ", q.device());
  return {pb, last_dim_contiguous(grad_out), in.q, in.k, in.v, last_dim_contiguous(out), lse.contiguous()};
}

// ---------------------------------------------------------------- mutual consistency

// S logits tensors [B, C, *spatial], N = prod(spatial).
struct LogitsShape {
  int64_t S, B, C, N;
};

// S >= 2 non-empty logits tensors [B, C, *spatial], C >= 2, of one shape,
// dtype and device, and temperature > 0.
inline LogitsShape check_logits(const char* op, KernelTarget target, at::TensorList logits, double temperature) {
  TORCH_CHECK(logits.size() >= 2, op, ": logits must hold S >= 2 tensors [B, C, *spatial], got ", logits.size());
  const at::Tensor& x0 = logits[0];
  TORCH_CHECK(x0.dim() >= 2 && x0.size(1) >= 2, op, ": logits[0] must be [B, C, *spatial] with C >= 2, got ",
              x0.sizes());
  TORCH_CHECK(x0.numel() > 0, op, ": logits must not be empty, got shape ", x0.sizes());
  check_input(op, "logits[0]", x0, target);
  for (size_t s = 1; s < logits.size(); ++s) {
    const at::Tensor& x = logits[s];
    TORCH_CHECK(x.device() == x0.device(), op, ": logits[", s, "] is on ", x.device(), " but logits[0] is on ",
                x0.device());
    TORCH_CHECK(x.scalar_type() == x0.scalar_type(), op, ": logits[", s, "] has dtype ", x.scalar_type(),
                " but logits[0] has ", x0.scalar_type());
    TORCH_CHECK(x.sizes() == x0.sizes(), op, ": logits[", s, "] has shape ", x.sizes(), " but logits[0] has ",
                x0.sizes());
  }
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op, ": temperature must be > 0, got ", temperature);
  const int64_t B = x0.size(0), C = x0.size(1);
  return {static_cast<int64_t>(logits.size()), B, C, x0.numel() / (B * C)};
}

}  // namespace caml_ops
