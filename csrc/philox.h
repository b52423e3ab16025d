// Philox4x32-10 (Salmon et al., SC'11), the counter-based RNG behind the
// attention dropout of every backend (C++, CUDA; caml_ops/triton/_common.py
// and caml_ops/reference.py hold the same function).
//
// Dropout spec, shared by all backends so that one seed gives one mask:
// element `index` of the attention probabilities (row-major [L, H, B, B] for
// cross-sample, [B, H, L, L] for intra-sample attention) is kept iff
//   philox(key = seed, counter = (lo32(offset + index), hi32(offset + index), 0, 0)).word0
//     >= threshold,   threshold = floor(dropout_p * 2^32),
// and kept values are scaled by 1 / (1 - dropout_p).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define CAML_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CAML_HOST_DEVICE inline
#endif

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

// The dropout spec above: the random word of one attention-probability element.
CAML_HOST_DEVICE uint32_t dropout_word(uint64_t seed, uint64_t offset, uint64_t index) {
  const uint64_t counter = offset + index;
  return philox4x32_10(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32))
      .x[0];
}

// floor(p * 2^32) for p in [0, 1): elements whose word is below it are dropped.
CAML_HOST_DEVICE uint32_t dropout_threshold(double dropout_p) {
  return static_cast<uint32_t>(dropout_p * 4294967296.0);
}

}  // namespace caml_ops
