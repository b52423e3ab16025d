// Vector helpers of the CPU kernels: partial loads, horizontal sums,
// accurate exp and log, the shifted exp of a softmax row, the dropout scale.
//
// float: inline AVX2 polynomials (cephes expf/logf, ~1 ulp), so the extension
// needs no Sleef symbol from libtorch_cpu and is more accurate than at::vec's
// exp_u20; other targets and float64 (the accuracy path) use std:: per lane.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>

namespace caml_ops {
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

#if defined(CPU_CAPABILITY_AVX2)
// exp(x); 0 below log(FLT_MIN) (like exp_u20), +inf above log(FLT_MAX), NaN for NaN.
inline Vectorized<float> vexp(const Vectorized<float>& v) {
  const __m256 x0 = v;
  // Clamped so that the power of two below stays a normal float exponent. max/min return their
  // second operand when either is NaN: x0 goes second, so NaN passes the clamp and the blends below.
  const __m256 x = _mm256_min_ps(_mm256_set1_ps(88.3f), _mm256_max_ps(_mm256_set1_ps(-87.3f), x0));
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - fx log(2), log(2) split in two for exactness.
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f}) {
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
  }
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x0, _mm256_set1_ps(-87.33654f), _CMP_LT_OQ));
  return _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x0, _mm256_set1_ps(88.72283f), _CMP_GT_OQ));
}

// log(x) for normal x > 0; NaN for NaN and x < 0, -inf for 0, +inf for +inf (as std::log);
// subnormal x: unspecified (the kernels take logs of sums >= 1 or of p + eps, eps normal).
inline Vectorized<float> vlog(const Vectorized<float>& v) {
  const __m256 x = v;
  const __m256i bits = _mm256_castps_si256(x);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127)));
  // mantissa in [1, 2), then folded into [sqrt(1/2), sqrt(2)).
  __m256 m = _mm256_or_ps(_mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x007fffff))),
                          _mm256_set1_ps(1.f));
  const __m256 high = _mm256_cmp_ps(m, _mm256_set1_ps(1.41421356237f), _CMP_GT_OQ);
  m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), high);
  e = _mm256_add_ps(e, _mm256_and_ps(high, _mm256_set1_ps(1.f)));
  const __m256 f = _mm256_sub_ps(m, _mm256_set1_ps(1.f));
  const __m256 f2 = _mm256_mul_ps(f, f);
  __m256 y = _mm256_set1_ps(7.0376836292e-2f);
  for (const float c : {-1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f, 1.4249322787e-1f,
                        -1.6668057665e-1f, 2.0000714765e-1f, -2.4999993993e-1f, 3.3333331174e-1f}) {
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(c));
  }
  y = _mm256_mul_ps(_mm256_mul_ps(y, f), f2);                       // f^3 P(f)
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);       // + e log(2) (low part)
  y = _mm256_fnmadd_ps(f2, _mm256_set1_ps(0.5f), y);                // - f^2 / 2
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(f, y));
  // The special values, as std::log: NaN and +inf pass through, 0 gives -inf, x < 0 gives NaN.
  const __m256 special = _mm256_cmp_ps(x, _mm256_set1_ps(FLT_MAX), _CMP_NLE_UQ);  // NaN, +inf
  y = _mm256_blendv_ps(y, x, special);
  y = _mm256_blendv_ps(y, _mm256_set1_ps(-INFINITY), _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_EQ_OQ));
  return _mm256_blendv_ps(y, _mm256_set1_ps(NAN), _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
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
#if defined(CPU_CAPABILITY_AVX2)
inline Vectorized<float> rounded(const Vectorized<float>& v) {
  __m256 x = v;
  asm("" : "+x"(x));
  return x;
}
inline Vectorized<double> rounded(const Vectorized<double>& v) {
  __m256d x = v;
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

#if defined(CPU_CAPABILITY_AVX2)
template <>
inline Vectorized<float> keep_scale<float>(const uint32_t* words, uint32_t threshold, float inv_keep) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words));
  const __m256i keep = _mm256_cmpeq_epi32(_mm256_max_epu32(w, _mm256_set1_epi32(static_cast<int>(threshold))), w);
  return _mm256_and_ps(_mm256_castsi256_ps(keep), _mm256_set1_ps(inv_keep));
}
#endif

}  // namespace vecmath
}  // namespace caml_ops
