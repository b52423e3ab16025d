// CUDA kernels of cross-sample attention (see docs/design.md, "cross_sample_attention"):
// for every position l and head h (a pair p = l*H + h), softmax attention over
// the B samples:
//   S = scale q k^T, lse_i = logsumexp_j S_ij, P = softmax(S), Z = keep / (1 - p),
//   O = (P Z) V;  backward: dP = (dO V^T) Z, D_i = sum_c dO_ic O_ic = sum_j P_ij dP_ij,
//   dS = P (dP - D), dQ = scale dS K, dK = scale dS^T Q, dV = (P Z)^T dO.
//
// One group of G lanes (a power of two <= 32, from d) per pair. Lane t holds
// kNC vectors of kV consecutive elements of each row it touches, element
// c = (n G + t) kV + u, so the group reads a row of d elements in one coalesced
// sweep, with vector accesses when d, the strides and the pointers allow. The
// scores are dot products summed over the group by xor shuffles: a butterfly,
// so every lane ends with the same bits and runs the softmax itself, and the
// summation order depends on G only (deterministic). Dropout bits of a tile: the
// lanes share its Philox calls (csrc/philox.h: one per row and 4 columns), the
// group ORs their bits into one 64-bit mask.
//
// The B x B scores of a pair go in kI x kI tiles (kI = 2, 4 or 8 from B, d and
// the dtype; B itself is a runtime value). For B <= kI (CAML: B = 4) a pair is
// one tile: the forward reads every element of q, k, v once, the backward every
// element of q, k, v and grad_out once and not `out`. Every pair owns its
// outputs: no atomics, and the results do not depend on the launch configuration.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../layout.h"
#include "../philox.h"
#include "acc_type.cuh"
#include "cross_sample_attention_kernel.h"

namespace caml_ops {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Elements per vector access: 8 bytes for 16-bit types, 16 for float32, 32 for float64.
constexpr int kV = 4;
// d <= kWarp * kV takes one vector per lane and row, up to kCrossSampleAttentionMaxHeadDim two.
static_assert(kCrossSampleAttentionMaxHeadDim == 2 * kWarp * kV, "at most 2 vectors per lane");
// Blocks of the grid-stride loop over pairs.
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

// kV elements at p (aligned to their size) through 8- or 16-byte accesses.
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, T (&v)[kV]) {
  constexpr int kBytes = sizeof(T) * kV;
  if constexpr (kBytes == 8) {
    const uint2 r = *reinterpret_cast<const uint2*>(p);
    __builtin_memcpy(v, &r, kBytes);
  } else {
    uint4 r[kBytes / 16];
#pragma unroll
    for (int w = 0; w < kBytes / 16; ++w) r[w] = reinterpret_cast<const uint4*>(p)[w];
    __builtin_memcpy(v, r, kBytes);
  }
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const T (&v)[kV]) {
  constexpr int kBytes = sizeof(T) * kV;
  if constexpr (kBytes == 8) {
    uint2 r;
    __builtin_memcpy(&r, v, kBytes);
    *reinterpret_cast<uint2*>(p) = r;
  } else {
    uint4 r[kBytes / 16];
    __builtin_memcpy(r, v, kBytes);
#pragma unroll
    for (int w = 0; w < kBytes / 16; ++w) reinterpret_cast<uint4*>(p)[w] = r[w];
  }
}

// Which elements of a row of d a lane holds: vector n, element u is c = (n G + t) kV + u.
struct RowLayout {
  int64_t d;
  int t, G;  // lane in its group, group size
  bool vec;  // d, strides and pointers allow kV-element accesses
  __device__ __forceinline__ int64_t first(int n) const { return (static_cast<int64_t>(n) * G + t) * kV; }
};

// The lane's kNC * kV elements of a row (zeros outside the row, or everywhere when !active).
template <int kNC, typename T, typename Acc>
__device__ __forceinline__ void load_row(const T* row, const RowLayout& lay, bool active, Acc (&x)[kNC * kV]) {
#pragma unroll
  for (int n = 0; n < kNC; ++n) {
    const int64_t c0 = lay.first(n);
    if (active && lay.vec && c0 < lay.d) {
      T v[kV];
      load_vec(row + c0, v);
#pragma unroll
      for (int u = 0; u < kV; ++u) x[n * kV + u] = to_acc(v[u]);
    } else {
#pragma unroll
      for (int u = 0; u < kV; ++u) x[n * kV + u] = active && c0 + u < lay.d ? to_acc(row[c0 + u]) : Acc(0);
    }
  }
}

// Stores alpha * x, the lane's part of a row, if active.
template <int kNC, typename T, typename Acc>
__device__ __forceinline__ void store_row(T* row, const RowLayout& lay, bool active, Acc alpha,
                                          const Acc (&x)[kNC * kV]) {
  if (!active) return;
#pragma unroll
  for (int n = 0; n < kNC; ++n) {
    const int64_t c0 = lay.first(n);
    if (lay.vec) {
      if (c0 < lay.d) {
        T v[kV];
#pragma unroll
        for (int u = 0; u < kV; ++u) v[u] = from_acc<T>(alpha * x[n * kV + u]);
        store_vec(row + c0, v);
      }
    } else {
#pragma unroll
      for (int u = 0; u < kV; ++u) {
        if (c0 + u < lay.d) row[c0 + u] = from_acc<T>(alpha * x[n * kV + u]);
      }
    }
  }
}

template <int kE, typename Acc>
__device__ __forceinline__ Acc dot(const Acc (&a)[kE], const Acc (&b)[kE]) {
  Acc s = 0;
#pragma unroll
  for (int e = 0; e < kE; ++e) s += a[e] * b[e];
  return s;
}

// Butterfly sum over the aligned group of G lanes; every lane gets the same bits.
template <typename V>
__device__ __forceinline__ V group_sum(V x, int G) {
  for (int off = 1; off < G; off <<= 1) x += __shfl_xor_sync(kFullMask, x, off);
  return x;
}

__device__ __forceinline__ unsigned long long group_or(unsigned long long x, int G) {
  for (int off = 1; off < G; off <<= 1) x |= __shfl_xor_sync(kFullMask, x, off);
  return x;
}

// Keep bits of pair p's B x B dropout mask for rows i0 + r (r < kR) and columns
// j0 + c (c < kC): bit r * kC + c. All ones without dropout. The lanes share
// the tile's Philox calls, one per row and group of 4 columns (csrc/philox.h);
// j0 is a multiple of kC, so a tile of kC = 2 columns lies in one group.
template <int kR, int kC>
__device__ __forceinline__ unsigned long long keep_bits(const Dropout& dr, int64_t p, int B, int i0, int j0,
                                                        bool active, int t, int G) {
  static_assert(kR * kC <= 64, "one 64-bit mask per tile");
  static_assert(kC == 2 || kC % 4 == 0, "a column tile is half a group or whole groups");
  constexpr int kGroups = (kC + 3) / 4;  // column groups per tile row
  if (!dr.on) return ~0ull;
  unsigned long long mine = 0;
  for (int u = t; u < kR * kGroups; u += G) {
    const int r = u / kGroups, i = i0 + r, g = j0 / 4 + u % kGroups;
    if (!active || i >= B) continue;
    const Philox4 words = dropout_words(dr.seed, dropout_counter(dr.offset, static_cast<uint64_t>(p) * B + i, B, g));
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const int c = 4 * g + w - j0;
      if (c >= 0 && c < kC && j0 + c < B && dr.keeps(words.x[w])) mine |= 1ull << (r * kC + c);
    }
  }
  return group_or(mine, G);
}

// An operand [B, L, H, d] of dtype T.
template <typename T>
using Rows = HeadsView<const T>;

template <typename T>
Rows<T> rows_of(HeadsView<const void> x) {
  return Rows<T>{static_cast<const T*>(x.data), x.sb, x.sl, x.sh};
}

template <typename Acc>
struct Params {
  int64_t H, d, pairs;  // pairs = L * H
  int B, G;
  bool vec;
  Acc scale, inv_keep;  // inv_keep = 1 / (1 - dropout_p)
  Dropout dropout;
};

// Runs f(p, l, h, active) for the pairs p = l * H + h of this lane's group,
// p = the group's index + k * (groups in the grid); the trip count is the same
// for all lanes of a warp (the shuffles need the whole warp), active = p < pairs.
template <typename Acc, typename F>
__device__ __forceinline__ void for_each_pair(const Params<Acc>& pm, F&& f) {
  const int64_t groups_per_block = kThreads / pm.G;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * groups_per_block;
  const int64_t warp_first = blockIdx.x * groups_per_block + (threadIdx.x / kWarp) * (kWarp / pm.G);
  for (int64_t base = warp_first; base < pm.pairs; base += stride) {
    const int64_t p = base + (threadIdx.x % kWarp) / pm.G;
    const int64_t l = p / pm.H;
    f(p, l, p - l * pm.H, p < pm.pairs);
  }
}

// Rows first + r (r < kR) of a [B, ...] operand at one pair: the lane's part, zeros for rows >= B.
template <int kR, int kNC, typename T, typename Acc>
__device__ __forceinline__ void load_rows(const T* base, int64_t sb, int first, int B, const RowLayout& lay,
                                          bool active, Acc (&x)[kR][kNC * kV]) {
#pragma unroll
  for (int r = 0; r < kR; ++r) load_row<kNC>(base + (first + r) * sb, lay, active && first + r < B, x[r]);
}

// s[r][c] = a_r . b_c over the whole row (summed over the group).
template <int kR, int kC, int kE, typename Acc>
__device__ __forceinline__ void tile_dots(const Acc (&a)[kR][kE], const Acc (&b)[kC][kE], int G, Acc (&s)[kR][kC]) {
#pragma unroll
  for (int r = 0; r < kR; ++r) {
#pragma unroll
    for (int c = 0; c < kC; ++c) s[r][c] = group_sum(dot(a[r], b[c]), G);
  }
}

// x[c] += sum_r w[r][c] y[r] (transposed) or x[r] += sum_c w[r][c] y[c].
template <bool kTransposed, int kR, int kE, typename Acc>
__device__ __forceinline__ void tile_combine(const Acc (&w)[kR][kR], const Acc (&y)[kR][kE], Acc (&x)[kR][kE]) {
#pragma unroll
  for (int r = 0; r < kR; ++r) {
#pragma unroll
    for (int c = 0; c < kR; ++c) {
#pragma unroll
      for (int e = 0; e < kE; ++e) {
        if constexpr (kTransposed) {
          x[c][e] += w[r][c] * y[r][e];
        } else {
          x[r][e] += w[r][c] * y[c][e];
        }
      }
    }
  }
}

// Forward: tiles of kI query rows against tiles of kI key rows with an online
// softmax (running max m, sum l, output o rescaled when m grows); for B <= kI
// one tile of each, and every q, k, v element is read once.
// (kThreads, 1): without a minimum of blocks per SM ptxas capped the 4-row tiles (CAML's B = 4) at 128
// registers and spilled (CAML_OPS_PTXAS_VERBOSE=1 builds, benchmarks/ptxas_report.py); now ~155, no spills.
template <typename T, int kI, int kNC>
__global__ void __launch_bounds__(kThreads, 1)
    forward_kernel(Params<AccT<T>> pm, Rows<T> q, Rows<T> k, Rows<T> v, T* __restrict__ out,
                   AccT<T>* __restrict__ lse) {
  using Acc = AccT<T>;
  constexpr int kE = kNC * kV;
  const int B = pm.B;
  const RowLayout lay{pm.d, static_cast<int>(threadIdx.x) & (pm.G - 1), pm.G, pm.vec};
  for_each_pair(pm, [&](int64_t p, int64_t l, int64_t h, bool active) {
    const T *qp = q.row(0, l, h), *kp = k.row(0, l, h), *vp = v.row(0, l, h);
    for (int i0 = 0; i0 < B; i0 += kI) {
      Acc qr[kI][kE], o[kI][kE] = {}, m[kI], sum[kI];
      load_rows<kI, kNC>(qp, q.sb, i0, B, lay, active, qr);
#pragma unroll
      for (int r = 0; r < kI; ++r) {
        m[r] = -INFINITY;
        sum[r] = 0;
      }
      for (int j0 = 0; j0 < B; j0 += kI) {
        Acc kr[kI][kE], s[kI][kI];
        load_rows<kI, kNC>(kp, k.sb, j0, B, lay, active, kr);
        tile_dots(qr, kr, lay.G, s);
        const unsigned long long keep = keep_bits<kI, kI>(pm.dropout, p, B, i0, j0, active, lay.t, lay.G);
#pragma unroll
        for (int r = 0; r < kI; ++r) {
          Acc mt = m[r];
#pragma unroll
          for (int c = 0; c < kI; ++c) {
            s[r][c] = j0 + c < B ? s[r][c] * pm.scale : -INFINITY;
            mt = s[r][c] > mt ? s[r][c] : mt;
          }
          const Acc alpha = exp_acc(m[r] - mt);  // 0 on the first tile (m = -inf, mt finite)
          m[r] = mt;
          sum[r] *= alpha;
#pragma unroll
          for (int e = 0; e < kE; ++e) o[r][e] *= alpha;
#pragma unroll
          for (int c = 0; c < kI; ++c) {
            s[r][c] = exp_acc(s[r][c] - mt);
            sum[r] += s[r][c];
            if (!((keep >> (r * kI + c)) & 1)) s[r][c] = 0;
          }
        }
        Acc vr[kI][kE];
        load_rows<kI, kNC>(vp, v.sb, j0, B, lay, active, vr);
        tile_combine<false>(s, vr, o);
      }
#pragma unroll
      for (int r = 0; r < kI; ++r) {
        const int64_t row = (i0 + r) * pm.pairs + p;  // [B, L, H] index of query row i0 + r
        store_row<kNC>(out + row * pm.d, lay, active && i0 + r < B, pm.inv_keep / sum[r], o[r]);
        if (active && i0 + r < B && lay.t == 0) lse[row] = m[r] + log_acc(sum[r]);
      }
    }
  });
}

// Backward, on tiles of kI x kI scores: P = exp(S - lse) (0 outside B x B),
// dP = Z (dO V^T), dS = P (dP - D). Sweep 1 over query tiles gives dQ; when one
// tile holds all B rows, D = rowsum(P dP) and the same registers give dK and dV.
// Otherwise D = rowsum(dO O) goes through the `delta` scratch to sweep 2, which
// gives dK and dV over key tiles.
template <typename T, int kI, int kNC>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(Params<AccT<T>> pm, Rows<T> go, Rows<T> q, Rows<T> k, Rows<T> v, Rows<T> o,
                    const AccT<T>* __restrict__ lse, AccT<T>* __restrict__ delta, T* __restrict__ gq,
                    T* __restrict__ gk, T* __restrict__ gv) {
  using Acc = AccT<T>;
  constexpr int kE = kNC * kV;
  const int B = pm.B;
  const bool one_tile = B <= kI;
  const RowLayout lay{pm.d, static_cast<int>(threadIdx.x) & (pm.G - 1), pm.G, pm.vec};
  for_each_pair(pm, [&](int64_t p, int64_t l, int64_t h, bool active) {
    const T *gop = go.row(0, l, h), *qp = q.row(0, l, h), *kp = k.row(0, l, h), *vp = v.row(0, l, h);
    // dS and P Z of the tile (i0, j0) from the lane's rows; D from dlt, or computed here for one tile.
    auto tile_grads = [&](const Acc(&qr)[kI][kE], const Acc(&dor)[kI][kE], const Acc(&kr)[kI][kE],
                          const Acc(&vr)[kI][kE], int i0, int j0, const Acc(&lse_r)[kI], Acc(&dlt)[kI],
                          Acc(&ds)[kI][kI], Acc(&a)[kI][kI]) {
      tile_dots(qr, kr, lay.G, a);
      tile_dots(dor, vr, lay.G, ds);
      const unsigned long long keep = keep_bits<kI, kI>(pm.dropout, p, B, i0, j0, active, lay.t, lay.G);
#pragma unroll
      for (int r = 0; r < kI; ++r) {
#pragma unroll
        for (int c = 0; c < kI; ++c) {
          const Acc z = (keep >> (r * kI + c)) & 1 ? pm.inv_keep : Acc(0);
          a[r][c] = i0 + r < B && j0 + c < B ? exp_acc(a[r][c] * pm.scale - lse_r[r]) : Acc(0);  // P
          ds[r][c] *= z;                                                                            // dP
        }
        if (one_tile) {
          dlt[r] = 0;
#pragma unroll
          for (int c = 0; c < kI; ++c) dlt[r] += a[r][c] * ds[r][c];
        }
#pragma unroll
        for (int c = 0; c < kI; ++c) {
          const Acc z = (keep >> (r * kI + c)) & 1 ? pm.inv_keep : Acc(0);
          ds[r][c] = a[r][c] * (ds[r][c] - dlt[r]);
          a[r][c] *= z;
        }
      }
    };
    // The lane's lse and D of query rows i0 + r.
    auto row_stats = [&](int i0, Acc(&lse_r)[kI], Acc(&dlt)[kI]) {
#pragma unroll
      for (int r = 0; r < kI; ++r) {
        const bool valid = active && i0 + r < B;
        lse_r[r] = valid ? lse[(i0 + r) * pm.pairs + p] : Acc(0);
        dlt[r] = valid && !one_tile ? delta[(i0 + r) * pm.pairs + p] : Acc(0);
      }
    };
    auto store_rows = [&](T* base, int first, Acc alpha, const Acc(&x)[kI][kE]) {
#pragma unroll
      for (int r = 0; r < kI; ++r) {
        store_row<kNC>(base + ((first + r) * pm.pairs + p) * pm.d, lay, active && first + r < B, alpha, x[r]);
      }
    };

    if (!one_tile) {  // D = rowsum(dO O) for sweeps 1 and 2
      const T* op = o.row(0, l, h);
      for (int i0 = 0; i0 < B; i0 += kI) {
        Acc dor[kI][kE], orow[kI][kE];
        load_rows<kI, kNC>(gop, go.sb, i0, B, lay, active, dor);
        load_rows<kI, kNC>(op, o.sb, i0, B, lay, active, orow);
#pragma unroll
        for (int r = 0; r < kI; ++r) {
          const Acc d_r = group_sum(dot(dor[r], orow[r]), lay.G);
          if (active && i0 + r < B && lay.t == 0) delta[(i0 + r) * pm.pairs + p] = d_r;
        }
      }
      __syncwarp();  // delta, written by lane 0 of the group, is read by all its lanes
    }
    // Sweep 1, tiles of query rows: dQ (and dK, dV for one tile).
    for (int i0 = 0; i0 < B; i0 += kI) {
      Acc qr[kI][kE], dor[kI][kE], dq[kI][kE] = {}, lse_r[kI], dlt[kI];
      load_rows<kI, kNC>(qp, q.sb, i0, B, lay, active, qr);
      load_rows<kI, kNC>(gop, go.sb, i0, B, lay, active, dor);
      row_stats(i0, lse_r, dlt);
      for (int j0 = 0; j0 < B; j0 += kI) {
        Acc kr[kI][kE], vr[kI][kE], ds[kI][kI], a[kI][kI];
        load_rows<kI, kNC>(kp, k.sb, j0, B, lay, active, kr);
        load_rows<kI, kNC>(vp, v.sb, j0, B, lay, active, vr);
        tile_grads(qr, dor, kr, vr, i0, j0, lse_r, dlt, ds, a);
        tile_combine<false>(ds, kr, dq);
        if (one_tile) {
          Acc dk[kI][kE] = {}, dv[kI][kE] = {};
          tile_combine<true>(ds, qr, dk);
          tile_combine<true>(a, dor, dv);
          store_rows(gk, j0, pm.scale, dk);
          store_rows(gv, j0, Acc(1), dv);
        }
      }
      store_rows(gq, i0, pm.scale, dq);
    }
    if (one_tile) return;
    // Sweep 2, tiles of key rows: dK, dV.
    for (int j0 = 0; j0 < B; j0 += kI) {
      Acc kr[kI][kE], vr[kI][kE], dk[kI][kE] = {}, dv[kI][kE] = {};
      load_rows<kI, kNC>(kp, k.sb, j0, B, lay, active, kr);
      load_rows<kI, kNC>(vp, v.sb, j0, B, lay, active, vr);
      for (int i0 = 0; i0 < B; i0 += kI) {
        Acc qr[kI][kE], dor[kI][kE], lse_r[kI], dlt[kI], ds[kI][kI], a[kI][kI];
        load_rows<kI, kNC>(qp, q.sb, i0, B, lay, active, qr);
        load_rows<kI, kNC>(gop, go.sb, i0, B, lay, active, dor);
        row_stats(i0, lse_r, dlt);
        tile_grads(qr, dor, kr, vr, i0, j0, lse_r, dlt, ds, a);
        tile_combine<true>(ds, qr, dk);
        tile_combine<true>(a, dor, dv);
      }
      store_rows(gk, j0, pm.scale, dk);
      store_rows(gv, j0, Acc(1), dv);
    }
  });
}

// Vectors per lane and row, and the group size: the smallest power of two that covers d.
struct Split {
  int nc, G;
};

Split split_of(int64_t d) {
  const int nc = d <= kWarp * kV ? 1 : 2;
  const int64_t lanes = (d + nc * kV - 1) / (nc * kV);
  int G = 1;
  while (G < lanes) G <<= 1;
  return Split{nc, G};
}

bool aligned(const void* ptr, int64_t elem_bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % (kV * elem_bytes) == 0;
}

bool vec_ok(HeadsView<const void> x, int64_t elem_bytes) {
  return aligned(x.data, elem_bytes) && x.sb % kV == 0 && x.sl % kV == 0 && x.sh % kV == 0;
}

template <typename T>
Params<AccT<T>> params_of(const AttentionProblem& pb, const Split& sp, bool vec) {
  using Acc = AccT<T>;
  return Params<Acc>{pb.H,
                     pb.d,
                     pb.L * pb.H,
                     static_cast<int>(pb.B),
                     sp.G,
                     vec && pb.d % kV == 0,
                     static_cast<Acc>(pb.scale),
                     static_cast<Acc>(pb.dropout.inv_keep),
                     pb.dropout};
}

unsigned blocks_for(int64_t pairs, int G) {
  const int64_t groups_per_block = kThreads / G;
  const int64_t blocks = (pairs + groups_per_block - 1) / groups_per_block;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

// Query (and key) rows per tile: the smallest of 2, 4, 8 that covers B, at most
// max_tile (registers: forward holds 3 row tiles and a score tile, backward 5 and 2).
constexpr int kForwardCap = 8, kBackwardCap = 4;
constexpr int max_tile(int cap, int nc, int acc_bytes) {
  return cap / nc / (acc_bytes / 4) > 2 ? cap / nc / (acc_bytes / 4) : 2;
}
int tile_for(int64_t B, int max) {
  int tile = 2;
  while (tile < B && tile < max) tile <<= 1;
  return tile;
}
int acc_size(Dtype dtype) { return dtype == Dtype::kFloat64 ? 8 : 4; }

template <int N>
using IntC = std::integral_constant<int, N>;

// Calls f(T{}, IntC<tile>{}, IntC<nc>{}) with the input type T of dtype.
template <typename F>
void dispatch(Dtype dtype, int tile, int nc, F&& f) {
  dispatch_dtype(dtype, [&](auto type_tag) {
    auto with_nc = [&](auto tile_tag) {
      if (nc == 1) {
        f(type_tag, tile_tag, IntC<1>{});
      } else {
        f(type_tag, tile_tag, IntC<2>{});
      }
    };
    if (tile == 2) {
      with_nc(IntC<2>{});
    } else if (tile == 4) {
      with_nc(IntC<4>{});
    } else {
      with_nc(IntC<8>{});
    }
  });
}

}  // namespace

void cross_sample_attention_forward(Dtype dtype, const AttentionProblem& pb, HeadsView<const void> q,
                                    HeadsView<const void> k, HeadsView<const void> v, void* out, void* lse,
                                    cudaStream_t stream) {
  if (pb.L * pb.H == 0) return;
  const Split sp = split_of(pb.d);
  const int tile = tile_for(pb.B, max_tile(kForwardCap, sp.nc, acc_size(dtype)));
  dispatch(dtype, tile, sp.nc, [&](auto type_tag, auto tile_tag, auto nc_tag) {
    using T = decltype(type_tag);
    constexpr int kI = decltype(tile_tag)::value, kNC = decltype(nc_tag)::value;
    if constexpr (kI <= max_tile(kForwardCap, kNC, sizeof(AccT<T>))) {  // the tiles tile_for picks
      const int64_t bytes = sizeof(T);
      const bool vec = vec_ok(q, bytes) && vec_ok(k, bytes) && vec_ok(v, bytes) && aligned(out, bytes);
      forward_kernel<T, kI, kNC><<<blocks_for(pb.L * pb.H, sp.G), kThreads, 0, stream>>>(
          params_of<T>(pb, sp, vec), rows_of<T>(q), rows_of<T>(k), rows_of<T>(v), static_cast<T*>(out),
          static_cast<AccT<T>*>(lse));
    }
  });
}

void cross_sample_attention_backward(Dtype dtype, const AttentionProblem& pb, HeadsView<const void> grad_out,
                                     HeadsView<const void> q, HeadsView<const void> k, HeadsView<const void> v,
                                     HeadsView<const void> out, const void* lse, void* delta, void* grad_q,
                                     void* grad_k, void* grad_v, cudaStream_t stream) {
  if (pb.L * pb.H == 0) return;
  const Split sp = split_of(pb.d);
  const int tile = tile_for(pb.B, max_tile(kBackwardCap, sp.nc, acc_size(dtype)));
  dispatch(dtype, tile, sp.nc, [&](auto type_tag, auto tile_tag, auto nc_tag) {
    using T = decltype(type_tag);
    using Acc = AccT<T>;
    constexpr int kI = decltype(tile_tag)::value, kNC = decltype(nc_tag)::value;
    if constexpr (kI <= max_tile(kBackwardCap, kNC, sizeof(AccT<T>))) {  // the tiles tile_for picks
      const int64_t bytes = sizeof(T);
      const bool vec = vec_ok(grad_out, bytes) && vec_ok(q, bytes) && vec_ok(k, bytes) && vec_ok(v, bytes) &&
                       vec_ok(out, bytes) && aligned(grad_q, bytes) && aligned(grad_k, bytes) &&
                       aligned(grad_v, bytes);
      backward_kernel<T, kI, kNC><<<blocks_for(pb.L * pb.H, sp.G), kThreads, 0, stream>>>(
          params_of<T>(pb, sp, vec), rows_of<T>(grad_out), rows_of<T>(q), rows_of<T>(k), rows_of<T>(v),
          rows_of<T>(out), static_cast<const Acc*>(lse), static_cast<Acc*>(delta), static_cast<T*>(grad_q),
          static_cast<T*>(grad_k), static_cast<T*>(grad_v));
    }
  });
}

}  // namespace cuda
}  // namespace caml_ops
