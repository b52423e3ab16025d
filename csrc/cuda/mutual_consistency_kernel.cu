// CUDA kernels of the mutual consistency loss (see docs/design.md, "mutual_consistency_loss").
//
// The math, step by step, is that of csrc/cpu/mutual_consistency.cpp (see its
// header comment): softmax from e_j = exp(x_j - max), sharpening as a sigmoid of
// z = (x_c - max - log D_c) / T with D_c = sum_{j != c} e_j, pair sums shifted
// by model 0's probability, gradients through h_c = p dL/dp + r dL/dq.
//
// One thread per voxel (b, n): consecutive threads read consecutive voxels of
// each (model, class) plane, so every load and store is coalesced. A voxel's C
// classes live in registers (C <= kC, a template bound); the S models are
// looped over. Forward reads each logit once and writes one float per block;
// a one-block kernel sums those partials in a fixed order (no atomics, so the
// loss is deterministic). Backward reads the logits in two sweeps over s (the
// second one hits L1: the same thread read the same lines just before) and
// writes each gradient once; it recomputes the softmax in the second sweep
// instead of keeping S * C values per thread. float32 math for float32 and the
// half types, float64 math for float64 (Acc below).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "acc_type.cuh"
#include "mutual_consistency_kernel.h"

namespace caml_ops {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Forward grid bound: the partial count depends on the sizes only.
constexpr int64_t kMaxBlocks = 2048;
// Below this, sum_{j != argmax} exp(x_j - max) is recomputed through the second largest logit.
constexpr float kTiny = 0x1p-100f;

// The S models' tensors: pointers by value, or a device table when S > kMutualConsistencyInlineModels.
template <typename T>
struct Models {
  const T* x[kMutualConsistencyInlineModels];
  T* g[kMutualConsistencyInlineModels];
  const T* const* x_table;
  T* const* g_table;
  __device__ __forceinline__ const T* in(int s) const { return x_table != nullptr ? x_table[s] : x[s]; }
  __device__ __forceinline__ T* out(int s) const { return g_table != nullptr ? g_table[s] : g[s]; }
};

// What both kernels take: the models, their sizes and 1 / temperature.
template <typename T, typename Acc = AccT<T>>
struct Voxels {
  Models<T> models;
  int S, C;
  int64_t B, N;
  Acc inv_t;
};

// Softmax and sharpening of one model's C <= kC classes at one voxel (class c at
// x[c * N]): p, q = sharpen(p) and, if kWithR, r = p dq/dp. As sharpen_voxels on CPU.
template <int kC, bool kWithR, typename T, typename Acc = AccT<T>>
__device__ __forceinline__ void sharpen_voxel(const T* __restrict__ x, int64_t N, int C, Acc inv_t, Acc* p, Acc* q,
                                              Acc* r) {
  Acc xs[kC];
#pragma unroll
  for (int c = 0; c < kC; ++c) {
    if (c < C) xs[c] = to_acc(x[c * N]);
  }
  Acc m = -INFINITY;
  int am = 0;  // first argmax
#pragma unroll
  for (int c = 0; c < kC; ++c) {
    if (c < C && xs[c] > m) {
      m = xs[c];
      am = c;
    }
  }
  Acc others = 0;  // sum_{j != argmax} e_j
#pragma unroll
  for (int c = 0; c < kC; ++c) {
    if (c < C) {
      xs[c] -= m;
      p[c] = exp_acc(xs[c]);
      if (c != am) others += p[c];
    }
  }
  const Acc sum = Acc(1) + others, inv_sum = Acc(1) / sum;
  Acc log_others;
  if (others < Acc(kTiny)) {  // rare: the argmax dominates so far that the others' sum underflows
    Acc m2 = -INFINITY;
#pragma unroll
    for (int c = 0; c < kC; ++c) {
      if (c < C && c != am) m2 = xs[c] > m2 ? xs[c] : m2;
    }
    Acc rest = 0;
#pragma unroll
    for (int c = 0; c < kC; ++c) {
      if (c < C && c != am) rest += exp_acc(xs[c] - m2);
    }
    // Every other logit -inf: rest is exp(-inf + inf) = NaN; log D is -inf (p = q = 1).
    log_others = m2 == Acc(-INFINITY) ? Acc(-INFINITY) : m2 + log_acc(rest);
  } else {
    log_others = log_acc(others);
  }
#pragma unroll
  for (int c = 0; c < kC; ++c) {
    if (c < C) {
      // log D_c; for C = 2 the other class's D is e_argmax = 1 exactly.
      const Acc log_d = c == am ? log_others : (C == 2 ? Acc(0) : log_acc(sum - p[c]));
      const Acc z = (xs[c] - log_d) * inv_t;
      const Acc abs_z = z < Acc(0) ? -z : z;
      const Acc a = exp_acc(-abs_z), inv_1a = Acc(1) / (Acc(1) + a);
      q[c] = z >= Acc(0) ? inv_1a : a * inv_1a;
      if constexpr (kWithR) {
        // log D = -inf: -|z| - log D takes its limit log D (1/T - 1), not -inf + inf.
        const Acc log_r = log_d != Acc(-INFINITY) ? -abs_z - log_d
                          : (inv_t == Acc(1) ? Acc(0) : log_d * (inv_t - Acc(1)));
        r[c] = exp_acc(log_r) * sum * inv_1a * inv_1a * inv_t;
      }
      p[c] *= inv_sum;
    }
  }
}

template <typename Acc>
__device__ __forceinline__ Acc block_sum(Acc v, Acc* smem) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = v;
  __syncthreads();
  Acc total = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) total += smem[w];
  }
  return total;  // valid in thread 0
}

template <typename T, int kC, typename Acc = AccT<T>>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(Voxels<T> vx, Acc* __restrict__ partials) {
  const int S = vx.S, C = vx.C;
  const int64_t B = vx.B, N = vx.N;
  const Acc s1 = static_cast<Acc>(S - 1);
  Acc acc = 0;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    for (int64_t n = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; n < N;
         n += static_cast<int64_t>(gridDim.x) * kThreads) {
      const int64_t base = b * C * N + n;
      Acc ref[kC], U[kC], W[kC], p[kC], q[kC];
      Acc squares = 0, cross = 0;
      for (int s = 0; s < S; ++s) {
        sharpen_voxel<kC, false>(vx.models.in(s) + base, N, C, vx.inv_t, p, q, static_cast<Acc*>(nullptr));
#pragma unroll
        for (int c = 0; c < kC; ++c) {
          if (c < C) {
            if (s == 0) ref[c] = p[c];
            const Acc u = p[c] - ref[c], w = q[c] - ref[c];
            U[c] = s == 0 ? u : U[c] + u;
            W[c] = s == 0 ? w : W[c] + w;
            squares += u * u + w * w;
            cross += u * w;
          }
        }
      }
      Acc uw = 0;
#pragma unroll
      for (int c = 0; c < kC; ++c) {
        if (c < C) uw += U[c] * W[c];
      }
      acc += s1 * squares - Acc(2) * (uw - cross);
    }
  }
  __shared__ Acc smem[kWarps];
  const Acc total = block_sum(acc, smem);
  if (threadIdx.x == 0) partials[blockIdx.y * gridDim.x + blockIdx.x] = total;
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const Acc* __restrict__ partials, int64_t count, double inv_m, Acc* __restrict__ loss) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) acc += partials[i];
  __shared__ double smem[kWarps];
  const double total = block_sum(acc, smem);
  if (threadIdx.x == 0) loss[0] = static_cast<Acc>(total * inv_m);
}

template <typename T, int kC, typename Acc = AccT<T>>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(Voxels<T> vx, const Acc* __restrict__ grad, Acc two_over_m) {
  const int S = vx.S, C = vx.C;
  const int64_t B = vx.B, N = vx.N;
  const Acc s1 = static_cast<Acc>(S - 1), k = grad[0] * two_over_m;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    for (int64_t n = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; n < N;
         n += static_cast<int64_t>(gridDim.x) * kThreads) {
      const int64_t base = b * C * N + n;
      // Sweep 1: the forward's, without its sums (a helper shared with the forward cost this kernel registers).
      Acc ref[kC], U[kC], W[kC], p[kC], q[kC], r[kC];
      for (int s = 0; s < S; ++s) {
        sharpen_voxel<kC, false>(vx.models.in(s) + base, N, C, vx.inv_t, p, q, static_cast<Acc*>(nullptr));
#pragma unroll
        for (int c = 0; c < kC; ++c) {
          if (c < C) {
            if (s == 0) ref[c] = p[c];
            U[c] = s == 0 ? p[c] - ref[c] : U[c] + (p[c] - ref[c]);
            W[c] = s == 0 ? q[c] - ref[c] : W[c] + (q[c] - ref[c]);
          }
        }
      }
      for (int s = 0; s < S; ++s) {
        sharpen_voxel<kC, true>(vx.models.in(s) + base, N, C, vx.inv_t, p, q, r);
        Acc h_sum = 0;
#pragma unroll
        for (int c = 0; c < kC; ++c) {
          if (c < C) {
            const Acc u = p[c] - ref[c], w = q[c] - ref[c];
            const Acc gp = k * (s1 * u - (W[c] - w)), gq = k * (s1 * w - (U[c] - u));
            q[c] = p[c] * gp + r[c] * gq;  // h_c
            h_sum += q[c];
          }
        }
        T* g = vx.models.out(s) + base;
#pragma unroll
        for (int c = 0; c < kC; ++c) {
          if (c < C) g[c * N] = from_acc<T>(q[c] - p[c] * h_sum);
        }
      }
    }
  }
}

dim3 grid_for(const MutualConsistencyLossProblem& pb) {
  const int64_t gy = pb.B < 65535 ? pb.B : 65535;
  const int64_t per_sample = (pb.N + kThreads - 1) / kThreads;
  int64_t gx = kMaxBlocks / gy;
  gx = gx < 1 ? 1 : (gx > per_sample ? per_sample : gx);
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
}

// grads, grads_table: nullptr for the forward.
template <typename T>
Voxels<T> voxels_of(const MutualConsistencyLossProblem& pb, void* const* grads, void* const* grads_table) {
  Voxels<T> vx{};
  Models<T>& m = vx.models;
  if (pb.logits_table != nullptr) {
    m.x_table = reinterpret_cast<const T* const*>(pb.logits_table);
    m.g_table = reinterpret_cast<T* const*>(grads_table);
  } else {
    for (int64_t s = 0; s < pb.S; ++s) {
      m.x[s] = static_cast<const T*>(pb.logits[s]);
      if (grads != nullptr) m.g[s] = static_cast<T*>(grads[s]);
    }
  }
  vx.S = static_cast<int>(pb.S);
  vx.C = static_cast<int>(pb.C);
  vx.B = pb.B;
  vx.N = pb.N;
  vx.inv_t = static_cast<AccT<T>>(1.0 / pb.temperature);
  return vx;
}

// Calls f(T{}, std::integral_constant<int, kC>{}) with the dtype and the smallest class bound kC >= C.
template <typename F>
void dispatch(const MutualConsistencyLossProblem& pb, F&& f) {
  auto with_c = [&](auto type_tag) {
    if (pb.C <= 2) {
      f(type_tag, std::integral_constant<int, 2>{});
    } else if (pb.C <= 4) {
      f(type_tag, std::integral_constant<int, 4>{});
    } else if (pb.C <= 8) {
      f(type_tag, std::integral_constant<int, 8>{});
    } else if (pb.C <= 16) {
      f(type_tag, std::integral_constant<int, 16>{});
    } else {
      f(type_tag, std::integral_constant<int, kMutualConsistencyMaxClasses>{});
    }
  };
  dispatch_dtype(pb.dtype, with_c);
}

}  // namespace

int64_t mutual_consistency_loss_partials(const MutualConsistencyLossProblem& pb) {
  const dim3 grid = grid_for(pb);
  return static_cast<int64_t>(grid.x) * grid.y;
}

void mutual_consistency_loss_forward(const MutualConsistencyLossProblem& pb, void* partials, void* loss,
                                     cudaStream_t stream) {
  const dim3 grid = grid_for(pb);
  const double inv_m = 1.0 / (static_cast<double>(pb.B) * pb.C * pb.N);
  dispatch(pb, [&](auto type_tag, auto c_bound) {
    using T = decltype(type_tag);
    forward_kernel<T, decltype(c_bound)::value>
        <<<grid, kThreads, 0, stream>>>(voxels_of<T>(pb, nullptr, nullptr), static_cast<AccT<T>*>(partials));
  });
  const int64_t count = mutual_consistency_loss_partials(pb);
  if (pb.dtype == Dtype::kFloat64) {
    finalize_kernel<double><<<1, kThreads, 0, stream>>>(static_cast<const double*>(partials), count, inv_m,
                                                        static_cast<double*>(loss));
  } else {
    finalize_kernel<float><<<1, kThreads, 0, stream>>>(static_cast<const float*>(partials), count, inv_m,
                                                       static_cast<float*>(loss));
  }
}

void mutual_consistency_loss_backward(const MutualConsistencyLossProblem& pb, const void* grad, void* const* grads,
                                      void* const* grads_table, cudaStream_t stream) {
  const dim3 grid = grid_for(pb);
  const double two_over_m = 2.0 / (static_cast<double>(pb.B) * pb.C * pb.N);
  dispatch(pb, [&](auto type_tag, auto c_bound) {
    using T = decltype(type_tag);
    using Acc = AccT<T>;
    backward_kernel<T, decltype(c_bound)::value><<<grid, kThreads, 0, stream>>>(
        voxels_of<T>(pb, grads, grads_table), static_cast<const Acc*>(grad), static_cast<Acc>(two_over_m));
  });
}

}  // namespace cuda
}  // namespace caml_ops
