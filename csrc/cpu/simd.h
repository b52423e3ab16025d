// The native vectors of the capability a CPU kernel file is compiled for
// (setup.py builds csrc/cpu/*.cpp twice on x86-64: CPU_CAPABILITY_AVX2 and
// CPU_CAPABILITY_AVX512; see csrc/cpu/dispatch.h), so that one source of the
// hand-vectorised code (vec_math.h, gemm.h, philox_vec.h) serves both widths:
// CAML_MM(op) is _mm256_op or _mm512_op, and the few intrinsics whose names or
// types differ beyond that prefix are wrapped below. Lane for lane, both widths
// run the same operations, so they give the same bits per lane.
// CAML_OPS_SIMD is defined where these exist (not on other architectures).
#pragma once

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#define CAML_OPS_SIMD 1

#include <immintrin.h>

#include <cstdint>

namespace caml_ops {
inline namespace CPU_CAPABILITY {  // one copy per build: see csrc/cpu/dispatch.h
namespace simd {

#if defined(CPU_CAPABILITY_AVX512)
#define CAML_MM(op) _mm512_##op
using Fv = __m512;
using Dv = __m512d;
using Iv = __m512i;
using Mask = __mmask16;  // a float comparison: one bit per lane

template <int kPredicate>
inline Mask cmp(Fv a, Fv b) { return _mm512_cmp_ps_mask(a, b, kPredicate); }
inline Fv select(Mask m, Fv yes, Fv no) { return _mm512_mask_blend_ps(m, no, yes); }
inline Fv zero_unless(Mask m, Fv v) { return _mm512_maskz_mov_ps(m, v); }
inline Mask ge_epu32(Iv a, Iv b) { return _mm512_cmpge_epu32_mask(a, b); }
inline Fv as_float(Iv v) { return _mm512_castsi512_ps(v); }
inline Iv as_int(Fv v) { return _mm512_castps_si512(v); }
inline Fv round_nearest(Fv v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Iv bit_xor(Iv a, Iv b) { return _mm512_xor_si512(a, b); }
inline Iv zeros() { return _mm512_setzero_si512(); }
inline Iv splat64(uint64_t v) { return _mm512_set1_epi64(static_cast<int64_t>(v)); }
inline Iv loadu(const void* p) { return _mm512_loadu_si512(p); }
inline void storeu(void* p, Iv v) { _mm512_storeu_si512(p, v); }
// 32-bit elements 2 e, 2 e + 1 = the low words of 64-bit lane e of a and of b.
inline Iv pack_low_words(Iv a, Iv b) { return _mm512_mask_blend_epi32(0xAAAA, a, _mm512_slli_epi64(b, 32)); }
// The 128-bit lanes of a and b alternately (a0 b0 a1 b1 ...): the first and the second half.
inline Iv interleave_first(Iv a, Iv b) { return _mm512_permutex2var_epi64(a, _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), b); }
inline Iv interleave_second(Iv a, Iv b) { return _mm512_permutex2var_epi64(a, _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15), b); }
#else
#define CAML_MM(op) _mm256_##op
using Fv = __m256;
using Dv = __m256d;
using Iv = __m256i;
using Mask = __m256;  // a float comparison: all ones in the lanes where true

template <int kPredicate>
inline Mask cmp(Fv a, Fv b) { return _mm256_cmp_ps(a, b, kPredicate); }
inline Fv select(Mask m, Fv yes, Fv no) { return _mm256_blendv_ps(no, yes, m); }
inline Fv zero_unless(Mask m, Fv v) { return _mm256_and_ps(m, v); }
inline Mask ge_epu32(Iv a, Iv b) { return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_max_epu32(a, b), a)); }
inline Fv as_float(Iv v) { return _mm256_castsi256_ps(v); }
inline Iv as_int(Fv v) { return _mm256_castps_si256(v); }
inline Fv round_nearest(Fv v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Iv bit_xor(Iv a, Iv b) { return _mm256_xor_si256(a, b); }
inline Iv zeros() { return _mm256_setzero_si256(); }
inline Iv splat64(uint64_t v) { return _mm256_set1_epi64x(static_cast<int64_t>(v)); }
inline Iv loadu(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline void storeu(void* p, Iv v) { _mm256_storeu_si256(static_cast<__m256i*>(p), v); }
inline Iv pack_low_words(Iv a, Iv b) { return _mm256_blend_epi32(a, _mm256_slli_epi64(b, 32), 0xAA); }
inline Iv interleave_first(Iv a, Iv b) { return _mm256_permute2x128_si256(a, b, 0x20); }
inline Iv interleave_second(Iv a, Iv b) { return _mm256_permute2x128_si256(a, b, 0x31); }
#endif

}  // namespace simd
}  // namespace CPU_CAPABILITY
}  // namespace caml_ops

#endif
