// The attention operands and problem, for the C++ and the CUDA kernels: a
// [B, L, H, d] tensor is read in place through the strides of B, L and H
// (usually a strided view: unbind of a [B, L, 3, H, d] Linear output), its
// last dimension contiguous. No torch here (the .cu files include it); the host
// side, which checks the inputs and makes the views, is in csrc/checks.h.
#pragma once

#include <cstdint>

#include "host_device.h"
#include "philox.h"

namespace caml_ops {

// Element (b, l, h, c) at data[b * sb + l * sl + h * sh + c]. T = const void
// where the dtype is not known yet (the CUDA launchers' arguments).
template <typename T>
struct HeadsView {
  T* data;
  int64_t sb, sl, sh;

  // The first of the d elements of row (b, l, h).
  CAML_HOST_DEVICE T* row(int64_t b, int64_t l, int64_t h) const { return data + b * sb + l * sl + h * sh; }
};

// The sizes and scalars of one attention call (csrc/checks.h's check_attention).
struct AttentionProblem {
  int64_t B, L, H, d;
  double scale;
  Dropout dropout;
};

}  // namespace caml_ops
