// Philox4x32-10 (Salmon et al., SC'11), the counter-based RNG behind the
// attention dropout of every backend (C++, CUDA; caml_ops/triton/_common.py
// and caml_ops/reference.py hold the same function; see docs/design.md,
// "Dropout RNG (Philox)").
//
// Dropout spec, shared by all backends so that one seed gives one mask. The
// attention probabilities are rows of n elements: cross-sample [L, H, B] rows
// of B (row (l H + h) B + i), intra-sample [B, H, L] rows of L (row
// (b H + h) L + i). Columns 4g .. 4g + 3 of row r take the four words of
//   philox(key = seed, counter = (lo32(c), hi32(c), 0, 0)),  c = offset + r ceil(n / 4) + g,
// element (r, j) is kept iff word j mod 4 >= threshold = floor(dropout_p * 2^32),
// and kept values are scaled by 1 / (1 - dropout_p). One Philox per four
// elements, and a row's groups never straddle rows, so tiles whose column
// offsets are multiples of 4 use every word they draw.
#pragma once
#include <cstdint>

#include "host_device.h"

namespace caml_ops {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct Philox4 {
  uint32_t x[4];
};

CAML_HOST_DEVICE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The dropout spec above: the counter of column group `group` (columns
// 4 group .. 4 group + 3) of row `row` of P, rows of `row_len` elements.
CAML_HOST_DEVICE uint64_t dropout_counter(uint64_t offset, uint64_t row, uint64_t row_len, uint64_t group) {
  return offset + row * ((row_len + 3) / 4) + group;
}

// The four dropout words of `counter` (word w: column 4 group + w).
CAML_HOST_DEVICE Philox4 dropout_words(uint64_t seed, uint64_t counter) {
  return philox4x32_10(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// floor(p * 2^32) for p in [0, 1): elements whose word is below it are dropped.
CAML_HOST_DEVICE uint32_t dropout_threshold(double dropout_p) {
  return static_cast<uint32_t>(dropout_p * 4294967296.0);
}

// The dropout of one call: rng_state's (seed, offset), the threshold and the
// scale of kept elements. Off when dropout_p == 0: then no Philox call at all.
struct Dropout {
  bool on;
  uint64_t seed, offset;
  uint32_t threshold;  // dropout_threshold(dropout_p)
  double inv_keep;     // 1 / (1 - dropout_p)

  // Whether the element whose word is `word` is kept.
  CAML_HOST_DEVICE bool keeps(uint32_t word) const { return word >= threshold; }
};

CAML_HOST_DEVICE Dropout make_dropout(double dropout_p, uint64_t seed, uint64_t offset) {
  return Dropout{dropout_p > 0, seed, offset, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)};
}

}  // namespace caml_ops
