// CUDA binding of the mutual consistency kernels (mutual_consistency_kernel.cu):
// checks, device guard, current stream, launch checks.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "mutual_consistency_kernel.h"

namespace caml_ops {
namespace {

using at::Tensor;
using cuda::McDtype;
using cuda::McProblem;

McDtype mc_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return McDtype::kFloat32;
    case at::kHalf:
      return McDtype::kFloat16;
    case at::kBFloat16:
      return McDtype::kBFloat16;
    case at::kDouble:
      return McDtype::kFloat64;
    default:
      TORCH_CHECK(false, "mutual_consistency (CUDA): logits must be float32, float64, float16 or bfloat16, got ", t);
  }
}

// The kernels' accumulation dtype (the loss's and grad's): float64 for float64 logits, else float32.
at::ScalarType acc_dtype(McDtype dtype) { return dtype == McDtype::kFloat64 ? at::kDouble : at::kFloat; }

// The pointers of S tensors for the kernels: the host array, and a device copy
// when S exceeds what the kernel arguments carry. The copy is a non-blocking one
// from pinned memory on the current stream (no host sync; the pinned block is
// not reused before the copy has run, as the caching host allocator records it
// on the stream), and the caching allocator orders the reuse of the device
// table after the kernels queued on this stream.
struct PointerArgs {
  std::vector<void*> host;
  Tensor table;
  void* const* device() const {
    return table.defined() ? reinterpret_cast<void* const*>(table.const_data_ptr<int64_t>()) : nullptr;
  }
};

PointerArgs pointer_args(const std::vector<Tensor>& tensors, bool writable) {
  PointerArgs args;
  std::vector<int64_t> values;
  for (const Tensor& t : tensors) {
    args.host.push_back(writable ? t.mutable_data_ptr() : const_cast<void*>(t.const_data_ptr()));
    values.push_back(reinterpret_cast<int64_t>(args.host.back()));
  }
  if (static_cast<int64_t>(tensors.size()) > cuda::kMcInlineModels) {
    const Tensor host = at::empty({static_cast<int64_t>(values.size())},
                                  at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::copy(values.begin(), values.end(), host.mutable_data_ptr<int64_t>());
    args.table = host.to(tensors[0].device(), /*non_blocking=*/true);
  }
  return args;
}

McDtype check_logits(at::TensorList logits, double temperature, const char* op) {
  TORCH_CHECK(logits.size() >= 2, op, ": logits must hold S >= 2 tensors [B, C, *spatial], got ", logits.size());
  const Tensor& x0 = logits[0];
  TORCH_CHECK(x0.dim() >= 2 && x0.size(1) >= 2, op, ": logits[0] must be [B, C, *spatial] with C >= 2, got ",
              x0.sizes());
  TORCH_CHECK(x0.size(1) <= cuda::kMcMaxClasses, op, ": the CUDA kernels take C <= ", cuda::kMcMaxClasses,
              " classes, got C = ", x0.size(1), " (use the triton or cpu backend)");
  TORCH_CHECK(x0.numel() > 0, op, ": logits must not be empty, got shape ", x0.sizes());
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op, ": temperature must be > 0, got ", temperature);
  for (size_t s = 0; s < logits.size(); ++s) {
    const Tensor& x = logits[s];
    TORCH_CHECK(x.is_cuda() && x.device() == x0.device(), op, ": logits[", s, "] is on ", x.device(),
                " but must be on the CUDA device of logits[0] (", x0.device(), ")");
    TORCH_CHECK(x.scalar_type() == x0.scalar_type(), op, ": logits[", s, "] has dtype ", x.scalar_type(),
                " but logits[0] has ", x0.scalar_type());
    TORCH_CHECK(x.sizes() == x0.sizes(), op, ": logits[", s, "] has shape ", x.sizes(), " but logits[0] has ",
                x0.sizes());
  }
  return mc_dtype(x0.scalar_type());
}

// Checked, contiguous logits and the kernels' view of them. Call under the device guard.
struct Prepared {
  std::vector<Tensor> logits;
  PointerArgs pointers;
  McProblem problem;
  Prepared(at::TensorList logits_in, double temperature, McDtype dtype) {
    for (const Tensor& x : logits_in) logits.push_back(x.contiguous());
    pointers = pointer_args(logits, /*writable=*/false);
    const int64_t B = logits[0].size(0), C = logits[0].size(1);
    problem = McProblem{dtype,       static_cast<int64_t>(logits.size()), B, C, logits[0].numel() / (B * C),
                        temperature, pointers.host.data(), pointers.device()};
  }
};

Tensor mutual_consistency_loss_forward_cuda(at::TensorList logits, double temperature) {
  const McDtype dtype = check_logits(logits, temperature, "mutual_consistency_loss_forward");
  const c10::cuda::CUDAGuard guard(logits[0].device());
  const Prepared pr(logits, temperature, dtype);
  const auto opts = pr.logits[0].options().dtype(acc_dtype(dtype));
  Tensor partials = at::empty({cuda::mc_forward_partials(pr.problem)}, opts);
  Tensor loss = at::empty({}, opts);
  cuda::mc_forward(pr.problem, partials.mutable_data_ptr(), loss.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return loss;
}

std::vector<Tensor> mutual_consistency_loss_backward_cuda(const Tensor& grad, at::TensorList logits, double temperature) {
  const McDtype dtype = check_logits(logits, temperature, "mutual_consistency_loss_backward");
  const c10::cuda::CUDAGuard guard(logits[0].device());
  const Prepared pr(logits, temperature, dtype);
  TORCH_CHECK(grad.numel() == 1 && grad.is_floating_point() && grad.device() == pr.logits[0].device(),
              "mutual_consistency_loss_backward: grad must be a 0-dim floating tensor on ", pr.logits[0].device(),
              " (the loss's gradient), got shape ", grad.sizes(), ", dtype ", grad.scalar_type(), " on ",
              grad.device());
  const Tensor grad_acc = grad.to(acc_dtype(dtype)).contiguous();
  std::vector<Tensor> grads;
  for (const Tensor& x : pr.logits) grads.push_back(at::empty_like(x));
  const PointerArgs out = pointer_args(grads, /*writable=*/true);
  cuda::mc_backward(pr.problem, grad_acc.const_data_ptr(), out.host.data(), out.device(),
                    c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(caml_ops, CUDA, m) {
  m.impl("mutual_consistency_loss_forward", &mutual_consistency_loss_forward_cuda);
  m.impl("mutual_consistency_loss_backward", &mutual_consistency_loss_backward_cuda);
}

}  // namespace caml_ops
