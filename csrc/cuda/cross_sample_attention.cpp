// CUDA binding of the cross-sample attention kernels (cross_sample_attention_kernel.cu):
// checks, device guard, current stream, launch checks.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../attention_checks.h"
#include "cross_sample_attention_kernel.h"

namespace caml_ops {
namespace {

using at::Tensor;
using cuda::CsaDtype;
using cuda::CsaProblem;
using cuda::CsaTensor;

constexpr AttentionKernel kKernel{c10::DeviceType::CUDA, /*half_types=*/true};

// The CUDA kernels' problem: check_attention's, their dtype, their bound on d.
CsaProblem check_problem(const AttentionProblem& pb, const Tensor& q, const char* op) {
  TORCH_CHECK(pb.d <= cuda::kCsaMaxHeadDim, op, ": the CUDA kernels take a head dim d <= ", cuda::kCsaMaxHeadDim,
              ", got d = ", pb.d, " (use the triton or cpu backend)");
  CsaDtype dtype = CsaDtype::kFloat32;
  switch (q.scalar_type()) {
    case at::kDouble:
      dtype = CsaDtype::kFloat64;
      break;
    case at::kHalf:
      dtype = CsaDtype::kFloat16;
      break;
    case at::kBFloat16:
      dtype = CsaDtype::kBFloat16;
      break;
    default:  // float32: check_attention took no other dtype
      break;
  }
  return CsaProblem{dtype, pb.B, pb.L, pb.H, pb.d, pb.scale, pb.dropout_p, pb.seed, pb.offset};
}

// An input as the kernels read it: unit stride along d, else one contiguous copy.
struct Operand {
  Tensor tensor;
  CsaTensor view;
  explicit Operand(const Tensor& x)
      : tensor(x.stride(3) == 1 ? x : x.contiguous()),
        view{tensor.const_data_ptr(), tensor.stride(0), tensor.stride(1), tensor.stride(2)} {}
};

std::tuple<Tensor, Tensor> cross_sample_attention_forward_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                                               double scale, double dropout_p,
                                                               const Tensor& rng_state) {
  const char* op = "cross_sample_attention_forward";
  const CsaProblem pb = check_problem(check_attention(op, kKernel, q, k, v, scale, dropout_p, rng_state), q, op);
  const c10::cuda::CUDAGuard guard(q.device());
  const Operand qo(q), ko(k), vo(v);
  Tensor out = at::empty({pb.B, pb.L, pb.H, pb.d}, q.options());
  Tensor lse = at::empty({pb.B, pb.L, pb.H}, q.options().dtype(attention_lse_dtype(q.scalar_type())));
  if (out.numel() > 0) {
    cuda::csa_forward(pb, qo.view, ko.view, vo.view, out.mutable_data_ptr(), lse.mutable_data_ptr(),
                      c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> cross_sample_attention_backward_cuda(const Tensor& grad_out, const Tensor& q,
                                                                        const Tensor& k, const Tensor& v,
                                                                        const Tensor& out, const Tensor& lse,
                                                                        double scale, double dropout_p,
                                                                        const Tensor& rng_state) {
  const char* op = "cross_sample_attention_backward";
  const AttentionProblem checked = check_attention_backward(op, kKernel, LseLayout::kBLH, grad_out, q, k, v, out,
                                                            lse, scale, dropout_p, rng_state);
  const CsaProblem pb = check_problem(checked, q, op);
  const c10::cuda::CUDAGuard guard(q.device());
  const Operand go(grad_out), qo(q), ko(k), vo(v), oo(out);
  const Tensor lse_c = lse.contiguous();
  Tensor grad_q = at::empty({pb.B, pb.L, pb.H, pb.d}, q.options());
  Tensor grad_k = at::empty_like(grad_q);
  Tensor grad_v = at::empty_like(grad_q);
  if (grad_q.numel() > 0) {
    Tensor delta = at::empty_like(lse_c);
    cuda::csa_backward(pb, go.view, qo.view, ko.view, vo.view, oo.view, lse_c.const_data_ptr(),
                       delta.mutable_data_ptr(), grad_q.mutable_data_ptr(), grad_k.mutable_data_ptr(),
                       grad_v.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(caml_ops, CUDA, m) {
  m.impl("cross_sample_attention_forward", &cross_sample_attention_forward_cuda);
  m.impl("cross_sample_attention_backward", &cross_sample_attention_backward_cuda);
}

}  // namespace caml_ops
