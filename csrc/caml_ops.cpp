// Operator schemas of caml_ops. Kernels register per device in csrc/cpu and
// csrc/cuda (TORCH_LIBRARY_IMPL, csrc/register.h); fake kernels and autograd are
// registered in Python (caml_ops/*.py) with torch.library (see docs/design.md,
// "Dispatch").
#include <Python.h>
#include <torch/library.h>

#include "cpu/dispatch.h"

namespace {
PyObject* cpu_capability(PyObject*, PyObject*) { return PyUnicode_FromString(caml_ops::cpu_capability_name()); }
PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The build of the CPU kernels that runs: 'AVX512', 'AVX2' or 'DEFAULT' (csrc/cpu/dispatch.h)."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" {
// `import caml_ops._C` loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(caml_ops, m) {
  // Omni-correlation loss. Row statistics (float32, or float64 for float64
  // inputs): loss_rows l_i [N], lse_v and lse_a [N, 2] (log-sum-exp of the
  // scaled logits as an unevaluated pair hi + lo, hi = the rounded log-sum-exp,
  // so that the backward's log p = (s - hi) - lo is nearly exact) and r_sum
  // R_i = sum_j q_j p_j / (p_j + eps) [N].
  m.def("omni_correlation_loss_forward(Tensor feat_v, Tensor feat_a, Tensor memory, float temperature, float eps)"
        " -> (Tensor loss_rows, Tensor lse_v, Tensor lse_a, Tensor r_sum)");
  m.def("omni_correlation_loss_backward(Tensor grad_rows, Tensor feat_v, Tensor feat_a, Tensor memory, Tensor loss_rows,"
        " Tensor lse_v, Tensor lse_a, Tensor r_sum, float temperature, float eps, bool memory_grad)"
        " -> (Tensor grad_feat_v, Tensor grad_feat_a, Tensor grad_memory)");
  // Correlation matrix softmax(feat @ memory.T / temperature) and its backward.
  m.def("omni_correlation_forward(Tensor feat, Tensor memory, float temperature) -> Tensor");
  m.def("omni_correlation_backward(Tensor grad_out, Tensor probs, Tensor feat, Tensor memory, float temperature,"
        " bool memory_grad) -> (Tensor grad_feat, Tensor grad_memory)");
  // Mutual consistency over S >= 2 logit tensors [B, C, *spatial].
  m.def("mutual_consistency_loss_forward(Tensor[] logits, float temperature) -> Tensor");
  m.def("mutual_consistency_loss_backward(Tensor grad, Tensor[] logits, float temperature) -> Tensor[]");
  // Attention on [B, L, H, d] (strided views accepted; last dim contiguous).
  // Cross-sample: over the B samples at each (position, head); intra-sample:
  // over the L positions of each (sample, head). `lse` is the log-sum-exp of
  // the scaled logits per query row (float32, float64 for float64 inputs):
  // [B, L, H] for cross-sample, [B, H, L] for intra-sample. Dropout on the
  // probabilities follows csrc/philox.h with rng_state = int64 [seed, offset]
  // on the CPU; backward regenerates the same mask.
  m.def("cross_sample_attention_forward(Tensor q, Tensor k, Tensor v, float scale, float dropout_p,"
        " Tensor rng_state) -> (Tensor out, Tensor lse)");
  m.def("cross_sample_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " float scale, float dropout_p, Tensor rng_state) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  m.def("intra_sample_attention_forward(Tensor q, Tensor k, Tensor v, float scale, float dropout_p,"
        " Tensor rng_state) -> (Tensor out, Tensor lse)");
  m.def("intra_sample_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " float scale, float dropout_p, Tensor rng_state) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // Dropout x * keep / (1 - dropout_p) with csrc/philox.h's mask over the
  // row-major elements (rows of 64); its own backward (the same mask on grad).
  m.def("dropout(Tensor x, float dropout_p, Tensor rng_state) -> Tensor");
}
