// CUDA binding of the cross-sample attention kernels (cross_sample_attention_kernel.cu):
// checks, device guard, current stream, launch checks.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <tuple>

#include "../checks.h"
#include "../register.h"
#include "binding.h"
#include "cross_sample_attention_kernel.h"

namespace caml_ops {
namespace {

using at::Tensor;

// The kernels' bound on d, on top of check_attention's checks.
void check_head_dim(const AttentionProblem& pb, const char* op) {
  TORCH_CHECK(pb.d <= cuda::kCrossSampleAttentionMaxHeadDim, op, ": the CUDA kernels take a head dim d <= ",
              cuda::kCrossSampleAttentionMaxHeadDim, ", got d = ", pb.d, " (use the triton or cpu backend)");
}

std::tuple<Tensor, Tensor> cross_sample_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                                          double scale, double dropout_p, const Tensor& rng_state) {
  const char* op = "cross_sample_attention_forward";
  const AttentionInputs in = check_attention(op, kCudaKernel, q, k, v, scale, dropout_p, rng_state);
  const AttentionProblem& pb = in.pb;
  check_head_dim(pb, op);
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor out = at::empty({pb.B, pb.L, pb.H, pb.d}, q.options());
  Tensor lse = at::empty({pb.B, pb.L, pb.H}, q.options().dtype(acc_dtype(q.scalar_type())));
  if (out.numel() > 0) {
    cuda::cross_sample_attention_forward(cuda::dtype_of(q.scalar_type()), pb, heads_view<void>(in.q),
                                         heads_view<void>(in.k), heads_view<void>(in.v), out.mutable_data_ptr(),
                                         lse.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> cross_sample_attention_backward(const Tensor& grad_out, const Tensor& q,
                                                                   const Tensor& k, const Tensor& v, const Tensor& out,
                                                                   const Tensor& lse, double scale, double dropout_p,
                                                                   const Tensor& rng_state) {
  const char* op = "cross_sample_attention_backward";
  const AttentionBackwardInputs in = check_attention_backward(op, kCudaKernel, LseLayout::kBLH, grad_out, q, k, v,
                                                              out, lse, scale, dropout_p, rng_state);
  const AttentionProblem& pb = in.pb;
  check_head_dim(pb, op);
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor grad_q = at::empty({pb.B, pb.L, pb.H, pb.d}, q.options());
  Tensor grad_k = at::empty_like(grad_q);
  Tensor grad_v = at::empty_like(grad_q);
  if (grad_q.numel() > 0) {
    Tensor delta = at::empty_like(in.lse);
    cuda::cross_sample_attention_backward(cuda::dtype_of(q.scalar_type()), pb, heads_view<void>(in.grad_out),
                                          heads_view<void>(in.q), heads_view<void>(in.k), heads_view<void>(in.v),
                                          heads_view<void>(in.out), in.lse.const_data_ptr(), delta.mutable_data_ptr(),
                                          grad_q.mutable_data_ptr(), grad_k.mutable_data_ptr(),
                                          grad_v.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {grad_q, grad_k, grad_v};
}

}  // namespace

CAML_OPS_REGISTER_FORWARD_BACKWARD(CUDA, cross_sample_attention)

}  // namespace caml_ops
