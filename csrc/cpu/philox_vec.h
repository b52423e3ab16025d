// Dropout words of csrc/philox.h, many at a time: bit-identical to
// caml_ops::dropout_word, vectorised with AVX2 (scalar elsewhere).
//
// Layout: each 64-bit lane of a __m256i holds one Philox instance, its 32-bit
// state word in the low half (the high half is don't-care): _mm256_mul_epu32
// then yields the full 32x32->64 product of 4 instances at once, with no
// shuffles, and its high and low words are a shift and the value itself.
// 8 such chains (32 words) are in flight per batch to hide the multiply latency.
//
// Where the high counter word is the same for the whole block (all but a few
// blocks in 2^32), rounds 1 to 3 partly act on constants, computed once as scalars.
#pragma once

#include <cstdint>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "../philox.h"

namespace caml_ops {

// Words per batch: a [4, 8] block of dropout words.
constexpr int64_t kPhiloxRows = 4, kPhiloxCols = 8, kPhiloxBatch = kPhiloxRows * kPhiloxCols;

// Draws [4, 8] blocks of dropout words: out[8 r + c] = dropout_word(seed, offset,
// index + r * row_stride + c * col_stride) (64-bit index arithmetic, wrapping
// like the scalar spec). (row_stride, col_stride) = (8, 1) gives 32 consecutive
// elements of a row of P; (1, L) gives 8 rows (the lanes) by 4 columns.
class DropoutWords {
 public:
  DropoutWords(uint64_t seed, uint64_t offset, uint64_t row_stride, uint64_t col_stride)
      : k0_(static_cast<uint32_t>(seed)),
        k1_(static_cast<uint32_t>(seed >> 32)),
        offset_(offset),
        row_stride_(row_stride),
        col_stride_(col_stride) {
#if defined(__AVX2__)
    // Chain x holds elements 8 (x / 2) + (x % 2) + {0, 2, 4, 6}: the even and odd
    // columns of row x / 2, so that one blend packs a row in order.
    uint64_t span = 0;  // counter distance from the first to the last word
    for (int x = 0; x < kChains; ++x) {
      uint64_t off[4];
      for (int e = 0; e < 4; ++e) {
        off[e] = static_cast<uint64_t>(x / 2) * row_stride + static_cast<uint64_t>(x % 2 + 2 * e) * col_stride;
        span = off[e] > span ? off[e] : span;
      }
      lane_[x] = _mm256_set_epi64x(static_cast<int64_t>(off[3]), static_cast<int64_t>(off[2]),
                                   static_cast<int64_t>(off[1]), static_cast<int64_t>(off[0]));
    }
    // The fast path needs all offsets below 2^32 (and no wrap of a product).
    const bool small = row_stride < (uint64_t(1) << 28) && col_stride < (uint64_t(1) << 28);
    max_low_ = small ? ~uint32_t(0) - static_cast<uint32_t>(span) : 0;
    fast_ok_ = small;
#endif
  }

  // One [4, 8] block from element `index` on.
  void operator()(uint64_t index, uint32_t* out) const {
#if defined(__AVX2__)
    const uint64_t ctr = offset_ + index;
    if (fast_ok_ && static_cast<uint32_t>(ctr) <= max_low_) {
      batch<true>(ctr, out);  // no carry into the high counter word within the block
    } else {
      batch<false>(ctr, out);
    }
#else
    const uint64_t seed = uint64_t(k1_) << 32 | k0_;
    for (int64_t r = 0; r < kPhiloxRows; ++r) {
      for (int64_t c = 0; c < kPhiloxCols; ++c) {
        out[r * kPhiloxCols + c] = dropout_word(seed, offset_, index + uint64_t(r) * row_stride_ + uint64_t(c) * col_stride_);
      }
    }
#endif
  }

 private:
  uint32_t k0_, k1_;
  uint64_t offset_, row_stride_, col_stride_;

#if defined(__AVX2__)
  static constexpr int kChains = kPhiloxBatch / 4;
  __m256i lane_[kChains];
  uint32_t max_low_ = 0;  // batch<true> applies where the counter's low word is <= this
  bool fast_ok_ = false;

  static __m256i splat(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }
  static __m256i hi(__m256i p) { return _mm256_srli_epi64(p, 32); }
  static __m256i x3(__m256i a, __m256i b, __m256i c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }

  // The block from counter ctr on; kConstHi: the high counter word is ctr >> 32 throughout.
  template <bool kConstHi>
  void batch(uint64_t ctr, uint32_t* out) const {
    const __m256i m0 = splat(kPhiloxM0), m1 = splat(kPhiloxM1);
    const __m256i base = _mm256_set1_epi64x(static_cast<int64_t>(ctr));
    __m256i c0[kChains], c1[kChains], c2[kChains], c3[kChains];
    int first_general;  // first round with no constant state word
    if (kConstHi) {
      // Round 1: c0 = counter lo, c1 = C (constant), c2 = c3 = 0.
      const uint32_t n0 = static_cast<uint32_t>(ctr >> 32) ^ k0_;
      // Round 2 multiplies the constant n0: its product is a scalar.
      const uint64_t q0 = static_cast<uint64_t>(kPhiloxM0) * n0;
      const __m256i key1_r1 = splat(k1_), key0_r2 = splat(k0_ + kPhiloxW0);
      const __m256i hi_q0_key1_r2 = splat(static_cast<uint32_t>(q0 >> 32) ^ (k1_ + kPhiloxW1));
      const __m256i lo_q0_key1_r3 = splat(static_cast<uint32_t>(q0) ^ (k1_ + 2 * kPhiloxW1));
      const __m256i key0_r3 = splat(k0_ + 2 * kPhiloxW0);
      for (int x = 0; x < kChains; ++x) {
        // Round 1.
        const __m256i p0 = _mm256_mul_epu32(_mm256_add_epi64(base, lane_[x]), m0);
        const __m256i r1_c2 = _mm256_xor_si256(hi(p0), key1_r1);  // r1: c0 = n0, c1 = 0, c3 = p0
        // Round 2: c1 = 0; the M0 product is q0.
        const __m256i p1 = _mm256_mul_epu32(r1_c2, m1);
        const __m256i r2_c0 = _mm256_xor_si256(hi(p1), key0_r2);
        const __m256i r2_c2 = _mm256_xor_si256(p0, hi_q0_key1_r2);  // r2: c1 = p1, c3 = lo(q0)
        // Round 3: c3 = lo(q0) (constant).
        const __m256i p0_3 = _mm256_mul_epu32(r2_c0, m0), p1_3 = _mm256_mul_epu32(r2_c2, m1);
        c0[x] = x3(hi(p1_3), p1, key0_r3);
        c2[x] = _mm256_xor_si256(hi(p0_3), lo_q0_key1_r3);
        c1[x] = p1_3;
        c3[x] = p0_3;
      }
      first_general = 3;
    } else {
      const __m256i key0 = splat(k0_), key1 = splat(k1_);
      for (int x = 0; x < kChains; ++x) {
        // Round 1: c2 = c3 = 0, so the M1 product is 0.
        const __m256i c = _mm256_add_epi64(base, lane_[x]);
        const __m256i p0 = _mm256_mul_epu32(c, m0);
        c0[x] = _mm256_xor_si256(hi(c), key0);
        c2[x] = _mm256_xor_si256(hi(p0), key1);
        c1[x] = _mm256_setzero_si256();
        c3[x] = p0;
      }
      first_general = 1;
    }
    // Fully unrolled: the state arrays then live in registers, renamed per round.
#pragma GCC unroll 8
    for (int round = first_general; round < 9; ++round) {
      const __m256i key0 = splat(k0_ + round * kPhiloxW0), key1 = splat(k1_ + round * kPhiloxW1);
#pragma GCC unroll 8
      for (int x = 0; x < kChains; ++x) {
        const __m256i p0 = _mm256_mul_epu32(c0[x], m0), p1 = _mm256_mul_epu32(c2[x], m1);
        c0[x] = x3(hi(p1), c1[x], key0);
        c2[x] = x3(hi(p0), c3[x], key1);
        c1[x] = p1;
        c3[x] = p0;
      }
    }
    // Round 10: only word 0 is needed.
    const __m256i key0 = splat(k0_ + 9 * kPhiloxW0);
    for (int x = 0; x < kChains; x += 2) {
      const __m256i even = x3(hi(_mm256_mul_epu32(c2[x], m1)), c1[x], key0);
      const __m256i odd = x3(hi(_mm256_mul_epu32(c2[x + 1], m1)), c1[x + 1], key0);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 4 * x),
                          _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA));
    }
  }
#endif
};

}  // namespace caml_ops
