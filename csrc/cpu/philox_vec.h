// Dropout words of csrc/philox.h, 128 at a time: bit-identical to
// caml_ops::dropout_words, vectorised with AVX2 (scalar elsewhere).
//
// Layout: each 64-bit lane of a __m256i holds one Philox instance, its 32-bit
// state word in the low half (the high half is don't-care): _mm256_mul_epu32
// then yields the full 32x32->64 product of 4 instances at once, with no
// shuffles, and its high and low words are a shift and the value itself.
// 8 such chains (32 instances, 128 words) are in flight per batch to hide the
// multiply latency.
//
// Where the high counter word is the same for the whole batch (all but a few
// batches in 2^32), rounds 1 to 3 partly act on constants, computed once as scalars.
#pragma once

#include <cstdint>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "../philox.h"

namespace caml_ops {

// Words of the dropout mask of P, rows of `row_len` elements (csrc/philox.h),
// in two block shapes; `col` must be a multiple of 4 (a group boundary).
class DropoutWords {
 public:
  // rows(): [kPairRows, kRowLen] words, row-major (a tile row of P on the lanes).
  static constexpr int64_t kPairRows = 2, kRowLen = 64;
  // columns(): [kColumnLen, kColumnRows] words (a tile of P^T: the rows of P on the lanes).
  static constexpr int64_t kColumnLen = 16, kColumnRows = 8;

  DropoutWords(uint64_t seed, uint64_t offset, uint64_t row_len)
      : seed_(seed), offset_(offset), row_len_(row_len) {
#if defined(__AVX2__)
    // rows(): chain x holds groups 4 (x % 4) + {0, 1, 2, 3} of row x / 4.
    // columns(): chain x holds group x / 2 of rows x % 2 + {0, 2, 4, 6} (the
    // even and odd rows, so that one blend packs 8 rows in order).
    const uint64_t groups = (row_len + 3) / 4;
    uint64_t rows_delta[kChains][4], columns_delta[kChains][4];
    for (int x = 0; x < kChains; ++x) {
      for (int e = 0; e < 4; ++e) {
        rows_delta[x][e] = static_cast<uint64_t>(x / 4) * groups + 4 * (x % 4) + e;
        columns_delta[x][e] = static_cast<uint64_t>(x % 2 + 2 * e) * groups + x / 2;
      }
    }
    rows_ = Lanes(rows_delta);
    columns_ = Lanes(columns_delta);
#endif
  }

  // out[r * kRowLen + c] = word of (row + r, col + c).
  void rows(uint64_t row, uint64_t col, uint32_t* out) const {
#if defined(__AVX2__)
    __m256i w[4][kChains];
    batch(rows_, counter(row, col), w);
    for (int x = 0; x < kChains; ++x) {
      // Instances e of the chain hold columns 4 e .. 4 e + 3: a 4 x 4 transpose.
      const __m256i a = pack(w[0][x], w[1][x]), b = pack(w[2][x], w[3][x]);
      const __m256i lo = _mm256_unpacklo_epi64(a, b), hi = _mm256_unpackhi_epi64(a, b);
      uint32_t* dst = out + (x / 4) * kRowLen + (x % 4) * 16;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_permute2x128_si256(lo, hi, 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 8), _mm256_permute2x128_si256(lo, hi, 0x31));
    }
#else
    for (int64_t r = 0; r < kPairRows; ++r) scalar(row + r, col, kRowLen, out + r * kRowLen, 1);
#endif
  }

  // out[c * kColumnRows + r] = word of (row + r, col + c).
  void columns(uint64_t row, uint64_t col, uint32_t* out) const {
#if defined(__AVX2__)
    __m256i w[4][kChains];
    batch(columns_, counter(row, col), w);
    for (int x = 0; x < kChains; x += 2) {
      for (int k = 0; k < 4; ++k) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (2 * x + k) * kColumnRows), pack(w[k][x], w[k][x + 1]));
      }
    }
#else
    for (int64_t r = 0; r < kColumnRows; ++r) scalar(row + r, col, kColumnLen, out + r, kColumnRows);
#endif
  }

 private:
  uint64_t seed_, offset_, row_len_;

  uint64_t counter(uint64_t row, uint64_t col) const { return dropout_counter(offset_, row, row_len_, col / 4); }

#if !defined(__AVX2__)
  // dst[c * stride] = word of (row, col + c), c < n.
  void scalar(uint64_t row, uint64_t col, int64_t n, uint32_t* dst, int64_t stride) const {
    for (int64_t c = 0; c < n; c += 4) {
      const Philox4 words = dropout_words(seed_, counter(row, col + c));
      for (int k = 0; k < 4; ++k) dst[(c + k) * stride] = words.x[k];
    }
  }
#else
  static constexpr int kChains = 8;

  // Counter offsets of the 32 instances from the batch's first counter.
  struct Lanes {
    __m256i delta[kChains];
    uint32_t max_low = 0;  // the constant-high-word path applies where the first counter's low word is <= this
    bool fast = false;

    Lanes() = default;
    explicit Lanes(const uint64_t (&d)[kChains][4]) {
      uint64_t span = 0;
      for (int x = 0; x < kChains; ++x) {
        delta[x] = _mm256_set_epi64x(static_cast<int64_t>(d[x][3]), static_cast<int64_t>(d[x][2]),
                                     static_cast<int64_t>(d[x][1]), static_cast<int64_t>(d[x][0]));
        for (int e = 0; e < 4; ++e) span = d[x][e] > span ? d[x][e] : span;
      }
      fast = span <= ~uint32_t(0);
      max_low = fast ? ~uint32_t(0) - static_cast<uint32_t>(span) : 0;
    }
  };

  Lanes rows_, columns_;

  static __m256i splat(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }
  static __m256i hi(__m256i p) { return _mm256_srli_epi64(p, 32); }
  static __m256i x3(__m256i a, __m256i b, __m256i c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
  // 32-bit elements 2 e, 2 e + 1 = the low words of 64-bit lane e of a and of b.
  static __m256i pack(__m256i a, __m256i b) { return _mm256_blend_epi32(a, _mm256_slli_epi64(b, 32), 0xAA); }

  // w[k][x]: word k of the instances of chain x (low halves of the 64-bit lanes).
  void batch(const Lanes& lanes, uint64_t ctr, __m256i (&w)[4][kChains]) const {
    if (lanes.fast && static_cast<uint32_t>(ctr) <= lanes.max_low) {
      rounds<true>(lanes, ctr, w);  // no carry into the high counter word within the batch
    } else {
      rounds<false>(lanes, ctr, w);
    }
  }

  // kConstHi: the high counter word is ctr >> 32 throughout.
  template <bool kConstHi>
  void rounds(const Lanes& lanes, uint64_t ctr, __m256i (&w)[4][kChains]) const {
    const uint32_t k0 = static_cast<uint32_t>(seed_), k1 = static_cast<uint32_t>(seed_ >> 32);
    const __m256i m0 = splat(kPhiloxM0), m1 = splat(kPhiloxM1);
    const __m256i base = _mm256_set1_epi64x(static_cast<int64_t>(ctr));
    __m256i (&c0)[kChains] = w[0], (&c1)[kChains] = w[1], (&c2)[kChains] = w[2], (&c3)[kChains] = w[3];
    int first_general;  // first round with no constant state word
    if (kConstHi) {
      // Round 1: c0 = counter lo, c1 = C (constant), c2 = c3 = 0.
      const uint32_t n0 = static_cast<uint32_t>(ctr >> 32) ^ k0;
      // Round 2 multiplies the constant n0: its product is a scalar.
      const uint64_t q0 = static_cast<uint64_t>(kPhiloxM0) * n0;
      const __m256i key1_r1 = splat(k1), key0_r2 = splat(k0 + kPhiloxW0);
      const __m256i hi_q0_key1_r2 = splat(static_cast<uint32_t>(q0 >> 32) ^ (k1 + kPhiloxW1));
      const __m256i lo_q0_key1_r3 = splat(static_cast<uint32_t>(q0) ^ (k1 + 2 * kPhiloxW1));
      const __m256i key0_r3 = splat(k0 + 2 * kPhiloxW0);
      for (int x = 0; x < kChains; ++x) {
        // Round 1.
        const __m256i p0 = _mm256_mul_epu32(_mm256_add_epi64(base, lanes.delta[x]), m0);
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
      const __m256i key0 = splat(k0), key1 = splat(k1);
      for (int x = 0; x < kChains; ++x) {
        // Round 1: c2 = c3 = 0, so the M1 product is 0.
        const __m256i c = _mm256_add_epi64(base, lanes.delta[x]);
        const __m256i p0 = _mm256_mul_epu32(c, m0);
        c0[x] = _mm256_xor_si256(hi(c), key0);
        c2[x] = _mm256_xor_si256(hi(p0), key1);
        c1[x] = _mm256_setzero_si256();
        c3[x] = p0;
      }
      first_general = 1;
    }
    // Fully unrolled: the state arrays then live in registers, renamed per round.
#pragma GCC unroll 10
    for (int round = first_general; round < 10; ++round) {
      const __m256i key0 = splat(k0 + round * kPhiloxW0), key1 = splat(k1 + round * kPhiloxW1);
#pragma GCC unroll 8
      for (int x = 0; x < kChains; ++x) {
        const __m256i p0 = _mm256_mul_epu32(c0[x], m0), p1 = _mm256_mul_epu32(c2[x], m1);
        c0[x] = x3(hi(p1), c1[x], key0);
        c2[x] = x3(hi(p0), c3[x], key1);
        c1[x] = p1;
        c3[x] = p0;
      }
    }
  }
#endif
};

}  // namespace caml_ops
