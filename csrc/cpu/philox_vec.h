// Dropout words of csrc/philox.h, 32 Philox instances (128 words) at a time
// with AVX2, 64 (256 words) with AVX-512: bit-identical to
// caml_ops::dropout_words, one source for both widths through simd.h (scalar
// elsewhere).
//
// Layout: each 64-bit lane of a vector holds one Philox instance, its 32-bit
// state word in the low half (the high half is don't-care): mul_epu32 then
// yields the full 32x32->64 product of 4 (AVX2) or 8 (AVX-512) instances at
// once, with no shuffles, and its high and low words are a shift and the value
// itself. 8 such chains are in flight per batch to hide the multiply latency.
//
// Where the high counter word is the same for the whole batch (all but a few
// batches in 2^32), rounds 1 to 3 partly act on constants, computed once as scalars.
#pragma once

#include <cstdint>

#include "../philox.h"
#include "simd.h"

namespace caml_ops {
inline namespace CPU_CAPABILITY {  // one copy per build: see csrc/cpu/dispatch.h

class DropoutWords {
#if defined(CAML_OPS_SIMD)
  static constexpr int kInstances = sizeof(simd::Iv) / sizeof(uint64_t);  // per vector: 4 (AVX2) or 8 (AVX-512)
#else
  static constexpr int kInstances = 4;  // the scalar code draws the AVX2 blocks
#endif
  static constexpr int kChains = 8;
  static constexpr int64_t kWords = 4 * kChains * kInstances;  // per draw

 public:
  // Words of the dropout mask of P, rows of `row_len` elements (csrc/philox.h),
  // in two block shapes; `col` must be a multiple of 4 (a group boundary).
  // rows(): [kRows, kRowLen] words, row-major (tile rows of P on the lanes): 2 rows (AVX2) or 4 (AVX-512).
  static constexpr int64_t kRowLen = 64, kRows = kWords / kRowLen;
  // columns(): [kColumnLen, kColumnRows] words (a tile of P^T: the rows of P on the lanes), as many rows as
  // float lanes: 8 (AVX2) or 16 (AVX-512).
  static constexpr int64_t kColumnLen = 16, kColumnRows = kWords / kColumnLen;

  DropoutWords(uint64_t seed, uint64_t offset, uint64_t row_len)
      : seed_(seed), offset_(offset), row_len_(row_len) {
#if defined(CAML_OPS_SIMD)
    // rows(): chain x holds groups kInstances (x % kChainsPerRow) + e of row x / kChainsPerRow.
    // columns(): chain x holds group x / 2 of rows x % 2 + 2 e (the even and odd rows, so that one
    // pack_low_words puts the rows of a group in order).
    constexpr int kChainsPerRow = kRowLen / 4 / kInstances;
    const uint64_t groups = (row_len + 3) / 4;
    uint64_t rows_delta[kChains][kInstances], columns_delta[kChains][kInstances];
    for (int x = 0; x < kChains; ++x) {
      for (int e = 0; e < kInstances; ++e) {
        rows_delta[x][e] = static_cast<uint64_t>(x / kChainsPerRow) * groups + kInstances * (x % kChainsPerRow) + e;
        columns_delta[x][e] = static_cast<uint64_t>(x % 2 + 2 * e) * groups + x / 2;
      }
    }
    rows_ = Lanes(rows_delta);
    columns_ = Lanes(columns_delta);
#endif
  }

  // out[r * kRowLen + c] = word of (row + r, col + c).
  void rows(uint64_t row, uint64_t col, uint32_t* out) const {
#if defined(CAML_OPS_SIMD)
    using simd::Iv;
    Iv w[4][kChains];
    batch(rows_, counter(row, col), w);
    for (int x = 0; x < kChains; ++x) {
      // Instance e of the chain holds columns 4 e .. 4 e + 3: a 4 x kInstances transpose.
      const Iv a = simd::pack_low_words(w[0][x], w[1][x]), b = simd::pack_low_words(w[2][x], w[3][x]);
      const Iv lo = CAML_MM(unpacklo_epi64)(a, b), hi = CAML_MM(unpackhi_epi64)(a, b);
      uint32_t* dst = out + x * 4 * kInstances;  // the chains of a row are consecutive
      simd::storeu(dst, simd::interleave_first(lo, hi));
      simd::storeu(dst + 2 * kInstances, simd::interleave_second(lo, hi));
    }
#else
    for (int64_t r = 0; r < kRows; ++r) scalar(row + r, col, kRowLen, out + r * kRowLen, 1);
#endif
  }

  // out[c * kColumnRows + r] = word of (row + r, col + c).
  void columns(uint64_t row, uint64_t col, uint32_t* out) const {
#if defined(CAML_OPS_SIMD)
    simd::Iv w[4][kChains];
    batch(columns_, counter(row, col), w);
    for (int x = 0; x < kChains; x += 2) {
      for (int k = 0; k < 4; ++k) simd::storeu(out + (2 * x + k) * kColumnRows, simd::pack_low_words(w[k][x], w[k][x + 1]));
    }
#else
    for (int64_t r = 0; r < kColumnRows; ++r) scalar(row + r, col, kColumnLen, out + r, kColumnRows);
#endif
  }

 private:
  uint64_t seed_, offset_, row_len_;

  uint64_t counter(uint64_t row, uint64_t col) const { return dropout_counter(offset_, row, row_len_, col / 4); }

#if !defined(CAML_OPS_SIMD)
  // dst[c * stride] = word of (row, col + c), c < n.
  void scalar(uint64_t row, uint64_t col, int64_t n, uint32_t* dst, int64_t stride) const {
    for (int64_t c = 0; c < n; c += 4) {
      const Philox4 words = dropout_words(seed_, counter(row, col + c));
      for (int k = 0; k < 4; ++k) dst[(c + k) * stride] = words.x[k];
    }
  }
#else
  using Iv = simd::Iv;

  // Counter offsets of the instances from the batch's first counter.
  struct Lanes {
    Iv delta[kChains];
    uint32_t max_low = 0;  // the constant-high-word path applies where the first counter's low word is <= this
    bool fast = false;

    Lanes() = default;
    explicit Lanes(const uint64_t (&d)[kChains][kInstances]) {
      uint64_t span = 0;
      for (int x = 0; x < kChains; ++x) {
        delta[x] = simd::loadu(d[x]);
        for (int e = 0; e < kInstances; ++e) span = d[x][e] > span ? d[x][e] : span;
      }
      fast = span <= ~uint32_t(0);
      max_low = fast ? ~uint32_t(0) - static_cast<uint32_t>(span) : 0;
    }
  };

  Lanes rows_, columns_;

  static Iv splat(uint32_t v) { return CAML_MM(set1_epi32)(static_cast<int>(v)); }
  static Iv hi(Iv p) { return CAML_MM(srli_epi64)(p, 32); }
  static Iv x3(Iv a, Iv b, Iv c) { return simd::bit_xor(simd::bit_xor(a, b), c); }
  static Iv mul(Iv a, Iv b) { return CAML_MM(mul_epu32)(a, b); }

  // w[k][x]: word k of the instances of chain x (low halves of the 64-bit lanes).
  void batch(const Lanes& lanes, uint64_t ctr, Iv (&w)[4][kChains]) const {
    if (lanes.fast && static_cast<uint32_t>(ctr) <= lanes.max_low) {
      rounds<true>(lanes, ctr, w);  // no carry into the high counter word within the batch
    } else {
      rounds<false>(lanes, ctr, w);
    }
  }

  // kConstHi: the high counter word is ctr >> 32 throughout.
  template <bool kConstHi>
  void rounds(const Lanes& lanes, uint64_t ctr, Iv (&w)[4][kChains]) const {
    const uint32_t k0 = static_cast<uint32_t>(seed_), k1 = static_cast<uint32_t>(seed_ >> 32);
    const Iv m0 = splat(kPhiloxM0), m1 = splat(kPhiloxM1);
    const Iv base = simd::splat64(ctr);
    Iv (&c0)[kChains] = w[0], (&c1)[kChains] = w[1], (&c2)[kChains] = w[2], (&c3)[kChains] = w[3];
    int first_general;  // first round with no constant state word
    if (kConstHi) {
      // Round 1: c0 = counter lo, c1 = C (constant), c2 = c3 = 0.
      const uint32_t n0 = static_cast<uint32_t>(ctr >> 32) ^ k0;
      // Round 2 multiplies the constant n0: its product is a scalar.
      const uint64_t q0 = static_cast<uint64_t>(kPhiloxM0) * n0;
      const Iv key1_r1 = splat(k1), key0_r2 = splat(k0 + kPhiloxW0);
      const Iv hi_q0_key1_r2 = splat(static_cast<uint32_t>(q0 >> 32) ^ (k1 + kPhiloxW1));
      const Iv lo_q0_key1_r3 = splat(static_cast<uint32_t>(q0) ^ (k1 + 2 * kPhiloxW1));
      const Iv key0_r3 = splat(k0 + 2 * kPhiloxW0);
      for (int x = 0; x < kChains; ++x) {
        // Round 1.
        const Iv p0 = mul(CAML_MM(add_epi64)(base, lanes.delta[x]), m0);
        const Iv r1_c2 = simd::bit_xor(hi(p0), key1_r1);  // r1: c0 = n0, c1 = 0, c3 = p0
        // Round 2: c1 = 0; the M0 product is q0.
        const Iv p1 = mul(r1_c2, m1);
        const Iv r2_c0 = simd::bit_xor(hi(p1), key0_r2);
        const Iv r2_c2 = simd::bit_xor(p0, hi_q0_key1_r2);  // r2: c1 = p1, c3 = lo(q0)
        // Round 3: c3 = lo(q0) (constant).
        const Iv p0_3 = mul(r2_c0, m0), p1_3 = mul(r2_c2, m1);
        c0[x] = x3(hi(p1_3), p1, key0_r3);
        c2[x] = simd::bit_xor(hi(p0_3), lo_q0_key1_r3);
        c1[x] = p1_3;
        c3[x] = p0_3;
      }
      first_general = 3;
    } else {
      const Iv key0 = splat(k0), key1 = splat(k1);
      for (int x = 0; x < kChains; ++x) {
        // Round 1: c2 = c3 = 0, so the M1 product is 0.
        const Iv c = CAML_MM(add_epi64)(base, lanes.delta[x]);
        const Iv p0 = mul(c, m0);
        c0[x] = simd::bit_xor(hi(c), key0);
        c2[x] = simd::bit_xor(hi(p0), key1);
        c1[x] = simd::zeros();
        c3[x] = p0;
      }
      first_general = 1;
    }
    // Fully unrolled: the state arrays then live in registers, renamed per round.
#pragma GCC unroll 10
    for (int round = first_general; round < 10; ++round) {
      const Iv key0 = splat(k0 + round * kPhiloxW0), key1 = splat(k1 + round * kPhiloxW1);
#pragma GCC unroll 8
      for (int x = 0; x < kChains; ++x) {
        const Iv p0 = mul(c0[x], m0), p1 = mul(c2[x], m1);
        c0[x] = x3(hi(p1), c1[x], key0);
        c2[x] = x3(hi(p0), c3[x], key1);
        c1[x] = p1;
        c3[x] = p0;
      }
    }
  }
#endif
};

}  // namespace CPU_CAPABILITY
}  // namespace caml_ops
