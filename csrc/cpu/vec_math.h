// Vector helpers of the CPU kernels: partial loads, horizontal sums,
// accurate exp and log, the shifted exp of a softmax row, the dropout scale.
//
// float: inline AVX2 / AVX-512 polynomials (cephes expf/logf, ~1 ulp; one
// source for both widths through simd.h, the same bits per lane), so the
// extension needs no Sleef symbol from libtorch_cpu and is more accurate than
// at::vec's exp_u20; other targets and float64 (the accuracy path) use std::
// per lane.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>

#include "simd.h"

namespace caml_ops {
inline namespace CPU_CAPABILITY {  // one copy per build: see csrc/cpu/dispatch.h
namespace vecmath {

using at::vec::Vectorized;
template <typename T>
using Vec = Vectorized<T>;

template <typename T>
constexpr int64_t kLanes = Vectorized<T>::size();

// Loads n <= kLanes values; the lanes past n hold `fill`.
template <typename T>
inline Vectorized<T> load(const T* p, int64_t n, T fill = T(0)) {
  if (n == kLanes<T>) return Vectorized<T>::loadu(p);
  return Vectorized<T>::set(Vectorized<T>(fill), Vectorized<T>::loadu(p, n), n);
}

// Zeroes the lanes past n (keeps tail garbage out of sums).
template <typename T>
inline Vectorized<T> head(const Vectorized<T>& v, int64_t n) {
  return n == kLanes<T> ? v : Vectorized<T>::set(Vectorized<T>(T(0)), v, n);
}

// Sum of the lanes, accumulated in double.
template <typename T>
inline double hsum(const Vectorized<T>& v) {
  T lanes[kLanes<T>];
  v.store(lanes);
  double s = 0;
  for (int64_t i = 0; i < kLanes<T>; ++i) s += lanes[i];
  return s;
}

#if defined(CAML_OPS_SIMD)
// exp(x); 0 below log(FLT_MIN) (like exp_u20), +inf above log(FLT_MAX), NaN for NaN.
inline Vectorized<float> vexp(const Vectorized<float>& v) {
  using simd::Fv;
  const Fv x0 = v;
  // Clamped so that the power of two below stays a normal float exponent. max/min return their
  // second operand when either is NaN: x0 goes second, so NaN passes the clamp and the blends below.
  const Fv x = CAML_MM(min_ps)(CAML_MM(set1_ps)(88.3f), CAML_MM(max_ps)(CAML_MM(set1_ps)(-87.3f), x0));
  const Fv fx = simd::round_nearest(CAML_MM(mul_ps)(x, CAML_MM(set1_ps)(1.44269504088896341f)));
  // r = x - fx log(2), log(2) split in two for exactness.
  Fv r = CAML_MM(fnmadd_ps)(fx, CAML_MM(set1_ps)(0.693359375f), x);
  r = CAML_MM(fnmadd_ps)(fx, CAML_MM(set1_ps)(-2.12194440e-4f), r);
  Fv y = CAML_MM(set1_ps)(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f}) {
    y = CAML_MM(fmadd_ps)(y, r, CAML_MM(set1_ps)(c));
  }
  y = CAML_MM(fmadd_ps)(y, CAML_MM(mul_ps)(r, r), CAML_MM(add_ps)(r, CAML_MM(set1_ps)(1.f)));
  const simd::Iv e =
      CAML_MM(slli_epi32)(CAML_MM(add_epi32)(CAML_MM(cvtps_epi32)(fx), CAML_MM(set1_epi32)(127)), 23);
  y = CAML_MM(mul_ps)(y, simd::as_float(e));
  y = simd::select(simd::cmp<_CMP_LT_OQ>(x0, CAML_MM(set1_ps)(-87.33654f)), CAML_MM(setzero_ps)(), y);
  return simd::select(simd::cmp<_CMP_GT_OQ>(x0, CAML_MM(set1_ps)(88.72283f)), CAML_MM(set1_ps)(INFINITY), y);
}

// log(x) for normal x > 0; NaN for NaN and x < 0, -inf for 0, +inf for +inf (as std::log);
// subnormal x: unspecified (the kernels take logs of sums >= 1 or of p + eps, eps normal).
inline Vectorized<float> vlog(const Vectorized<float>& v) {
  using simd::Fv;
  const Fv x = v;
  const simd::Iv bits = simd::as_int(x);
  Fv e = CAML_MM(cvtepi32_ps)(CAML_MM(sub_epi32)(CAML_MM(srli_epi32)(bits, 23), CAML_MM(set1_epi32)(127)));
  // mantissa in [1, 2), then folded into [sqrt(1/2), sqrt(2)).
  Fv m = CAML_MM(or_ps)(CAML_MM(and_ps)(x, simd::as_float(CAML_MM(set1_epi32)(0x007fffff))), CAML_MM(set1_ps)(1.f));
  const simd::Mask high = simd::cmp<_CMP_GT_OQ>(m, CAML_MM(set1_ps)(1.41421356237f));
  m = simd::select(high, CAML_MM(mul_ps)(m, CAML_MM(set1_ps)(0.5f)), m);
  e = CAML_MM(add_ps)(e, simd::zero_unless(high, CAML_MM(set1_ps)(1.f)));
  const Fv f = CAML_MM(sub_ps)(m, CAML_MM(set1_ps)(1.f));
  const Fv f2 = CAML_MM(mul_ps)(f, f);
  Fv y = CAML_MM(set1_ps)(7.0376836292e-2f);
  for (const float c : {-1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f, 1.4249322787e-1f,
                        -1.6668057665e-1f, 2.0000714765e-1f, -2.4999993993e-1f, 3.3333331174e-1f}) {
    y = CAML_MM(fmadd_ps)(y, f, CAML_MM(set1_ps)(c));
  }
  y = CAML_MM(mul_ps)(CAML_MM(mul_ps)(y, f), f2);                       // f^3 P(f)
  y = CAML_MM(fmadd_ps)(e, CAML_MM(set1_ps)(-2.12194440e-4f), y);       // + e log(2) (low part)
  y = CAML_MM(fnmadd_ps)(f2, CAML_MM(set1_ps)(0.5f), y);                // - f^2 / 2
  y = CAML_MM(fmadd_ps)(e, CAML_MM(set1_ps)(0.693359375f), CAML_MM(add_ps)(f, y));
  // The special values, as std::log: NaN and +inf pass through, 0 gives -inf, x < 0 gives NaN.
  y = simd::select(simd::cmp<_CMP_NLE_UQ>(x, CAML_MM(set1_ps)(FLT_MAX)), x, y);  // NaN, +inf
  y = simd::select(simd::cmp<_CMP_EQ_OQ>(x, CAML_MM(setzero_ps)()), CAML_MM(set1_ps)(-INFINITY), y);
  return simd::select(simd::cmp<_CMP_LT_OQ>(x, CAML_MM(setzero_ps)()), CAML_MM(set1_ps)(NAN), y);
}
#else
inline Vectorized<float> vexp(const Vectorized<float>& x) {
  return x.map([](float v) { return std::exp(v); });
}
inline Vectorized<float> vlog(const Vectorized<float>& x) {
  return x.map([](float v) { return std::log(v); });
}
#endif

inline Vectorized<double> vexp(const Vectorized<double>& x) {
  return x.map([](double v) { return std::exp(v); });
}
inline Vectorized<double> vlog(const Vectorized<double>& x) {
  return x.map([](double v) { return std::log(v); });
}

// v, rounded: a compiler barrier, so that v + w is not contracted with the product that made v into a
// fused multiply-add (GCC contracts vector intrinsics too) where v must round as a maximum taken of it did.
#if defined(CAML_OPS_SIMD)
inline Vectorized<float> rounded(const Vectorized<float>& v) {
  simd::Fv x = v;
  asm("" : "+x"(x));
  return x;
}
inline Vectorized<double> rounded(const Vectorized<double>& v) {
  simd::Dv x = v;
  asm("" : "+x"(x));
  return x;
}
#else
template <typename T>
inline Vectorized<T> rounded(const Vectorized<T>& v) {
  return v;
}
#endif

// s <- exp(s - m) for a row of n values; returns their sum (accumulated in vector lanes, then in double).
template <typename T>
double exp_shift_inplace(T* s, int64_t n, T m) {
  const Vectorized<T> vm(m);
  Vectorized<T> sum(T(0));
  for (int64_t c = 0; c < n; c += kLanes<T>) {
    const int64_t k = std::min(kLanes<T>, n - c);
    const Vectorized<T> e = vexp(load(s + c, k) - vm);
    e.store(s + c, k);
    sum += head(e, k);
  }
  return hsum(sum);
}

// Dropout scale Z per lane from the Philox words of csrc/philox.h: inv_keep
// where the element is kept (word >= threshold), else 0. Branch-free: the
// words are random, so a branch per element would mispredict half the time.
template <typename T>
inline Vectorized<T> keep_scale(const uint32_t* words, uint32_t threshold, T inv_keep) {
  T z[kLanes<T>];
  for (int64_t t = 0; t < kLanes<T>; ++t) z[t] = words[t] >= threshold ? inv_keep : T(0);
  return Vectorized<T>::loadu(z);
}

#if defined(CAML_OPS_SIMD)
template <>
inline Vectorized<float> keep_scale<float>(const uint32_t* words, uint32_t threshold, float inv_keep) {
  const simd::Mask keep = simd::ge_epu32(simd::loadu(words), CAML_MM(set1_epi32)(static_cast<int>(threshold)));
  return simd::zero_unless(keep, CAML_MM(set1_ps)(inv_keep));
}
#endif

}  // namespace vecmath
}  // namespace CPU_CAPABILITY
}  // namespace caml_ops
