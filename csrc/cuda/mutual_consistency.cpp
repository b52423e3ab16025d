// CUDA binding of the mutual consistency kernels (mutual_consistency_kernel.cu):
// checks, device guard, current stream, launch checks.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../checks.h"
#include "../register.h"
#include "binding.h"
#include "mutual_consistency_kernel.h"

namespace caml_ops {
namespace {

using at::Tensor;
using cuda::MutualConsistencyLossProblem;

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
  if (static_cast<int64_t>(tensors.size()) > cuda::kMutualConsistencyInlineModels) {
    const Tensor host = at::empty({static_cast<int64_t>(values.size())},
                                  at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::copy(values.begin(), values.end(), host.mutable_data_ptr<int64_t>());
    args.table = host.to(tensors[0].device(), /*non_blocking=*/true);
  }
  return args;
}

// check_logits, and the kernels' bound on C.
LogitsShape check_inputs(const char* op, at::TensorList logits, double temperature) {
  const LogitsShape sh = check_logits(op, kCudaKernel, logits, temperature);
  TORCH_CHECK(sh.C <= cuda::kMutualConsistencyMaxClasses, op, ": the CUDA kernels take C <= ",
              cuda::kMutualConsistencyMaxClasses, " classes, got C = ", sh.C, " (use the triton or cpu backend)");
  return sh;
}

// Checked, contiguous logits and the kernels' view of them. Call under the device guard.
struct Prepared {
  std::vector<Tensor> logits;
  PointerArgs pointers;
  MutualConsistencyLossProblem problem;
  Prepared(at::TensorList logits_in, const LogitsShape& sh, double temperature) {
    for (const Tensor& x : logits_in) logits.push_back(x.contiguous());
    pointers = pointer_args(logits, /*writable=*/false);
    problem = MutualConsistencyLossProblem{cuda::dtype_of(logits[0].scalar_type()),
                                           sh.S,
                                           sh.B,
                                           sh.C,
                                           sh.N,
                                           temperature,
                                           pointers.host.data(),
                                           pointers.device()};
  }
};

Tensor mutual_consistency_loss_forward(at::TensorList logits, double temperature) {
  const LogitsShape sh = check_inputs("mutual_consistency_loss_forward", logits, temperature);
  const c10::cuda::CUDAGuard guard(logits[0].device());
  const Prepared pr(logits, sh, temperature);
  const auto opts = pr.logits[0].options().dtype(acc_dtype(logits[0].scalar_type()));
  Tensor partials = at::empty({cuda::mutual_consistency_loss_partials(pr.problem)}, opts);
  Tensor loss = at::empty({}, opts);
  cuda::mutual_consistency_loss_forward(pr.problem, partials.mutable_data_ptr(), loss.mutable_data_ptr(),
                                        c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return loss;
}

std::vector<Tensor> mutual_consistency_loss_backward(const Tensor& grad, at::TensorList logits, double temperature) {
  const LogitsShape sh = check_inputs("mutual_consistency_loss_backward", logits, temperature);
  const c10::cuda::CUDAGuard guard(logits[0].device());
  const Prepared pr(logits, sh, temperature);
  TORCH_CHECK(grad.numel() == 1 && grad.is_floating_point() && grad.device() == pr.logits[0].device(),
              "mutual_consistency_loss_backward: grad must be a 0-dim floating tensor on ", pr.logits[0].device(),
              " (the loss's gradient), got shape ", grad.sizes(), ", dtype ", grad.scalar_type(), " on ",
              grad.device());
  const Tensor grad_acc = grad.to(acc_dtype(logits[0].scalar_type())).contiguous();
  std::vector<Tensor> grads;
  for (const Tensor& x : pr.logits) grads.push_back(at::empty_like(x));
  const PointerArgs out = pointer_args(grads, /*writable=*/true);
  cuda::mutual_consistency_loss_backward(pr.problem, grad_acc.const_data_ptr(), out.host.data(), out.device(),
                                         c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grads;
}

}  // namespace

CAML_OPS_REGISTER_FORWARD_BACKWARD(CUDA, mutual_consistency_loss)

}  // namespace caml_ops
