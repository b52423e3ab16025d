// Registration of the kernels of the ops with a forward and a backward
// (schemas in csrc/caml_ops.cpp):
//   CAML_OPS_REGISTER_FORWARD_BACKWARD(CUDA, cross_sample_attention)
// registers the functions cross_sample_attention_forward and
// cross_sample_attention_backward in scope as the CUDA kernels of the ops of
// those names. (The CPU kernels register through csrc/cpu/dispatch.h, which
// picks their AVX2 or AVX-512 build.)
#pragma once

#include <torch/library.h>

#define CAML_OPS_REGISTER_FORWARD_BACKWARD(device, op) \
  TORCH_LIBRARY_IMPL(caml_ops, device, m) {            \
    m.impl(#op "_forward", &op##_forward);             \
    m.impl(#op "_backward", &op##_backward);           \
  }
