// The register-blocked GEMM of the CPU kernels (omni_correlation.cpp,
// intra_sample_attention.cpp):
//   C[M, N] (+)= alpha * A[M, K] @ B[K, N],  A(m, l) = a[m * a_m + l * a_l]
// (any strides: transposed tiles and strided rows alike), B and C row-major
// with leading dimensions ldb, ldc. The shapes are small and per tile, where
// BLAS calls are slow. Blocks of kGemmRows rows x 2 vectors of columns (12
// accumulators + 2 B vectors + 1 broadcast: 15 of the 16 AVX2 registers; of
// 32 with AVX-512, whose vectors are twice as wide) accumulate over K in order,
// by FMA, as MKL does; then times alpha, plus C when accumulating.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

#include "simd.h"
#include "vec_math.h"

namespace caml_ops {
inline namespace CPU_CAPABILITY {  // one copy per build: see csrc/cpu/dispatch.h
// Internal linkage: each kernel file keeps the copy compiled with it. (With
// external linkage the linker keeps one copy for both files, and which one,
// inlined and contracted how, would decide bits.)
namespace {

constexpr int64_t kGemmRows = 6;

namespace gemm_detail {

using at::vec::Vectorized;

// The accumulators are native vectors in fully unrolled loops: otherwise GCC
// keeps the arrays in memory and stores all of them on every step of the K loop.
#if defined(CAML_OPS_SIMD)
template <typename T>
struct NativeVec;
template <>
struct NativeVec<float> {
  using type = simd::Fv;
};
template <>
struct NativeVec<double> {
  using type = simd::Dv;
};
template <typename T>
using Native = typename NativeVec<T>::type;
inline simd::Fv fma(simd::Fv a, simd::Fv b, simd::Fv c) { return CAML_MM(fmadd_ps)(a, b, c); }
inline simd::Dv fma(simd::Dv a, simd::Dv b, simd::Dv c) { return CAML_MM(fmadd_pd)(a, b, c); }
#else
template <typename T>
using Native = Vectorized<T>;
template <typename T>
inline Vectorized<T> fma(const Vectorized<T>& a, const Vectorized<T>& b, const Vectorized<T>& c) {
  return at::vec::fmadd(a, b, c);
}
#endif

// R rows x the n <= 2 lanes columns at b, c; kFull: n == 2 lanes.
template <typename T, int R, bool kFull>
inline void block(int64_t K, const T* a, int64_t a_m, int64_t a_l, const T* b, int64_t ldb, T* c, int64_t ldc,
                  int64_t n, T alpha, bool accumulate) {
  using V = Vectorized<T>;
  using N = Native<T>;
  constexpr int64_t W = vecmath::kLanes<T>;
  const int64_t n0 = kFull ? W : std::min(n, W), n1 = kFull ? W : std::max<int64_t>(n - W, 0);
  N acc0[R], acc1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    acc0[r] = V(T(0));
    acc1[r] = V(T(0));
  }
  for (int64_t l = 0; l < K; ++l) {
    const T* bl = b + l * ldb;
    const N b0 = kFull ? V::loadu(bl) : vecmath::load(bl, n0);
    const N b1 = kFull ? V::loadu(bl + W) : vecmath::load(bl + W, n1);  // n1 == 0: zeros, no read
    const T* al = a + l * a_l;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const N av = V(al[r * a_m]);
      acc0[r] = fma(av, b0, acc0[r]);
      acc1[r] = fma(av, b1, acc1[r]);
    }
  }
  const V valpha(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    T* cr = c + r * ldc;
    V c0 = V(acc0[r]) * valpha, c1 = V(acc1[r]) * valpha;
    if (accumulate) {
      // acc * alpha + C fused or with the product rounded first, vector by vector as GCC compiled the
      // omni-correlation GEMM that this one replaced (grad_memory keeps its bits): fused in whole blocks, in
      // blocks of 1 row and in the second vector of row 0 of blocks of 2 rows; rounded first elsewhere in the
      // column tail. With alpha = 1 (the attention kernels) both are acc + C rounded once.
      const bool fused0 = kFull || R == 1, fused1 = fused0 || (R == 2 && r == 0);
      const V cur0 = vecmath::load(cr, n0), cur1 = vecmath::load(cr + W, n1);
      c0 = fused0 ? at::vec::fmadd(V(acc0[r]), valpha, cur0) : vecmath::rounded(c0) + cur0;
      c1 = fused1 ? at::vec::fmadd(V(acc1[r]), valpha, cur1) : vecmath::rounded(c1) + cur1;
    }
    c0.store(cr, n0);
    if (n1 > 0) c1.store(cr + W, n1);
  }
}

template <typename T, int R>
inline void rows(int64_t K, const T* a, int64_t a_m, int64_t a_l, const T* b, int64_t ldb, T* c, int64_t ldc,
                 int64_t n, T alpha, bool accumulate) {
  if (n == 2 * vecmath::kLanes<T>) {
    block<T, R, true>(K, a, a_m, a_l, b, ldb, c, ldc, n, alpha, accumulate);
  } else {
    block<T, R, false>(K, a, a_m, a_l, b, ldb, c, ldc, n, alpha, accumulate);
  }
}

}  // namespace gemm_detail

// C[M, N] (+)= alpha * A[M, K] @ B[K, N] (accumulate: +=), as described above.
template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, const T* a, int64_t a_m, int64_t a_l, const T* b, int64_t ldb, T* c,
          int64_t ldc, bool accumulate, T alpha = T(1)) {
  using gemm_detail::rows;
  constexpr int64_t R = kGemmRows, NB = 2 * vecmath::kLanes<T>;
  for (int64_t j = 0; j < N; j += NB) {
    const int64_t n = std::min(NB, N - j);
    int64_t i = 0;
    for (; i + R <= M; i += R) rows<T, R>(K, a + i * a_m, a_m, a_l, b + j, ldb, c + i * ldc + j, ldc, n, alpha, accumulate);
    const T* ai = a + i * a_m;
    T* ci = c + i * ldc + j;
    switch (M - i) {
      case 5: rows<T, 5>(K, ai, a_m, a_l, b + j, ldb, ci, ldc, n, alpha, accumulate); break;
      case 4: rows<T, 4>(K, ai, a_m, a_l, b + j, ldb, ci, ldc, n, alpha, accumulate); break;
      case 3: rows<T, 3>(K, ai, a_m, a_l, b + j, ldb, ci, ldc, n, alpha, accumulate); break;
      case 2: rows<T, 2>(K, ai, a_m, a_l, b + j, ldb, ci, ldc, n, alpha, accumulate); break;
      case 1: rows<T, 1>(K, ai, a_m, a_l, b + j, ldb, ci, ldc, n, alpha, accumulate); break;
      default: break;
    }
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace caml_ops
