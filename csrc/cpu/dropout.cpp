// CPU kernel of dropout (see docs/design.md, "dropout"): out = x Z over the
// row-major elements of x, Z = 1 / (1 - p) where kept and 0 where dropped, with
// csrc/philox.h's mask on rows of 64 elements (element i: word i mod 4 of
// Philox(seed, offset + i / 4)), drawn 128 words at a time by philox_vec.h. No
// mask is stored: the same call on the gradient is the backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "../philox.h"
#include "dispatch.h"
#include "philox_vec.h"
#include "vec_math.h"

namespace caml_ops {
inline namespace CPU_CAPABILITY {  // one build per capability: see dispatch.h
namespace {

using at::Tensor;
using namespace vecmath;

constexpr int64_t kRowLen = DropoutWords::kRowLen;             // elements per row of the mask
constexpr int64_t kChunk = DropoutWords::kRows * kRowLen;  // elements per draw
constexpr int64_t kGrainChunks = 256;                          // chunks per parallel task, at least

}  // namespace

Tensor dropout(const Tensor& x, double dropout_p, const Tensor& rng_state) {
  constexpr const char* op = "dropout";
  check_input(op, "x", x, kCpuKernel);
  const Dropout drop = check_dropout(op, dropout_p, rng_state);
  const Tensor input = x.contiguous();
  Tensor out = at::empty_like(input, at::MemoryFormat::Contiguous);
  if (!drop.on) return out.copy_(input);
  const int64_t n = input.numel();
  const uint32_t threshold = drop.threshold;
  const DropoutWords draw(drop.seed, drop.offset, kRowLen);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), op, [&] {
    const scalar_t* src = input.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const scalar_t kept = static_cast<scalar_t>(drop.inv_keep);
    at::parallel_for(0, (n + kChunk - 1) / kChunk, kGrainChunks, [&](int64_t c0, int64_t c1) {
      uint32_t words[kChunk];
      for (int64_t c = c0; c < c1; ++c) {
        draw.rows(static_cast<uint64_t>(c * DropoutWords::kRows), 0, words);
        const int64_t i0 = c * kChunk, m = std::min(kChunk, n - i0);
        // x * Z, not a select: NaN and inf propagate as in torch's dropout.
        for (int64_t e = 0; e < m; e += kLanes<scalar_t>) {
          const int64_t k = std::min(kLanes<scalar_t>, m - e);
          (load(src + i0 + e, k) * keep_scale<scalar_t>(words + e, threshold, kept)).store(dst + i0 + e, k);
        }
      }
    });
  });
  return out;
}

}  // namespace CPU_CAPABILITY

CAML_OPS_REGISTER_CPU(dropout)

}  // namespace caml_ops
