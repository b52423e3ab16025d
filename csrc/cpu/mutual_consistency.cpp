// CPU kernels of the mutual consistency loss (see docs/design.md, "mutual_consistency_loss").
//
// Per voxel and class c, for models s = 0..S-1 (M = numel of one logits tensor):
//   p_s = softmax(x_s)_c,   q_s = sharpen(p_s) = sigmoid(z_s),   z_s = (log p_s - log(1 - p_s)) / T
//   loss = 1/M sum_{s != t} (p_s - q_t)^2
// Everything is computed from e_j = exp(x_j - max) and E = sum_j e_j, with
// D_c = sum_{j != c} e_j (so p = e_c / E, 1 - p = D_c / E):
//   z_c = (x_c - max - log D_c) / T
//   r_c = p dq/dp = q (1 - q) / (T (1 - p)) = exp(-|z| - log D_c) E / ((1 + exp(-|z|))^2 T)
// which stays finite for tiny T and far-apart logits. D_c = E - e_c for every
// class but the argmax (there D_c >= 1, so the subtraction loses nothing that
// matters); for the argmax D = sum of the others, and when that underflows it
// is taken through the second largest logit m2: log D = m2 - max + log(sum_{j != am} exp(x_j - m2)).
// When every other logit is -inf, D = 0 (p = q = 1): log D = -inf, and r takes its limit
// exp(log D (1/T - 1)) (0 for T < 1), as the reference's autograd of sharpen does.
//
// The pair sum is taken with values shifted by model 0's probability,
// u_s = p_s - p_0, w_s = q_s - p_0, U = sum_s u_s, W = sum_s w_s, so its terms
// are as small as the differences between models instead of O(1):
//   sum_{s != t} (p_s - q_t)^2 = (S-1) sum_s (u_s^2 + w_s^2) - 2 (U W - sum_s u_s w_s)
// Gradients, k = 2 grad / M:
//   dL/dp_s = k ((S-1) u_s - (W - w_s)),   dL/dq_s = k ((S-1) w_s - (U - u_s))
//   h_c = p_c dL/dp_c + r_c dL/dq_c,       dL/dx_c = h_c - p_c sum_j h_j   (softmax Jacobian)
//
// The CUDA kernels (csrc/cuda/mutual_consistency_kernel.cu) follow the same steps.
// Here lanes of at::vec vectors are consecutive voxels of one sample (class c
// of model s at logits[s][b, c, n]); voxels are grouped in tiles of one sample,
// each tile writes its own loss partial, summed in tile order: the result does
// not depend on the thread count, and there are no float atomics.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../checks.h"
#include "dispatch.h"
#include "vec_math.h"

namespace caml_ops {
inline namespace CPU_CAPABILITY {  // one build per capability: see dispatch.h
namespace {

using at::Tensor;
using namespace vecmath;

constexpr int64_t kTileVectors = 32;  // a tile: 32 vectors of voxels of one sample
// Below this, sum_{j != argmax} exp(x_j - max) is recomputed through the second largest logit.
constexpr double kTiny = 0x1p-100;

template <typename T>
inline bool any(const Vec<T>& mask) {
  return mask.zero_mask() != (1 << kLanes<T>) - 1;
}

// The same for two classes in closed form: with d = x_1 - x_0, p_1 = sigmoid(d) and q_1 = sigmoid(d / T)
// (log p - log(1 - p) = +-d), so a voxel costs 2 exponentials (3 with r) instead of 5 (7). In the terms
// above, E = 1 + a with a = exp(-|d|), log D = -|d| for the argmax and 0 for the other class, so
// r_argmax = exp(|d| (1 - 1/T)) E / ((1 + b)^2 T) and r_other = b E / ((1 + b)^2 T), b = exp(-|d| / T).
// d is taken as (x_1 - m) - (x_0 - m), m = max: NaN where m = +-inf, as softmax gives; d = +-inf where
// one logit alone is -inf (p = q = 1, r_argmax its limit 0 for T < 1, as above).
template <typename T>
void sharpen_two_classes(const T* x, int64_t N, int64_t n, const Vec<T>& inv_t, Vec<T>* p, Vec<T>* q, Vec<T>* r) {
  const Vec<T> zero(T(0)), one(T(1));
  const Vec<T> x0 = load(x, n), x1 = load(x + N, n);
  const Vec<T> m = at::vec::maximum(x0, x1);
  const Vec<T> d = (x1 - m) - (x0 - m), ad = d.abs(), up = d > zero;  // up: class 1 is the argmax
  const Vec<T> a = vexp(zero - ad), inv_1a = one / (one + a);
  const Vec<T> b = vexp(zero - ad * inv_t), inv_1b = one / (one + b);
  const Vec<T> p_max = inv_1a, p_min = a * inv_1a, q_max = inv_1b, q_min = b * inv_1b;
  p[0] = Vec<T>::blendv(p_max, p_min, up);
  p[1] = Vec<T>::blendv(p_min, p_max, up);
  q[0] = Vec<T>::blendv(q_max, q_min, up);
  q[1] = Vec<T>::blendv(q_min, q_max, up);
  if (r != nullptr) {
    const Vec<T> scale = (one + a) * inv_1b * inv_1b * inv_t;
    // |d| (1 - 1/T) is 0 for T = 1, also where |d| = inf.
    const Vec<T> r_max = vexp(Vec<T>::blendv(ad * (one - inv_t), zero, inv_t == one)) * scale, r_min = b * scale;
    r[0] = Vec<T>::blendv(r_max, r_min, up);
    r[1] = Vec<T>::blendv(r_min, r_max, up);
  }
}

// Softmax and sharpening of one model's C classes at n <= kLanes voxels (class c
// at x + c * N): p, q = sharpen(p) and, if r is given, r = p dq/dp. xs: C vectors of scratch.
template <typename T>
void sharpen_voxels(const T* x, int64_t N, int64_t C, int64_t n, const Vec<T>& inv_t, Vec<T>* xs, Vec<T>* p,
                    Vec<T>* q, Vec<T>* r) {
  if (C == 2) return sharpen_two_classes(x, N, n, inv_t, p, q, r);
  const Vec<T> zero(T(0)), one(T(1)), ninf(-INFINITY);
  Vec<T> m = ninf, am = zero;  // max and first argmax (as a float class index)
  for (int64_t c = 0; c < C; ++c) {
    xs[c] = load(x + c * N, n);
    const Vec<T> gt = xs[c] > m;
    m = Vec<T>::blendv(m, xs[c], gt);
    am = Vec<T>::blendv(am, Vec<T>(T(c)), gt);
  }
  Vec<T> others = zero;  // sum_{j != argmax} e_j
  for (int64_t c = 0; c < C; ++c) {
    xs[c] = xs[c] - m;
    p[c] = vexp(xs[c]);
    others += Vec<T>::blendv(p[c], zero, Vec<T>(T(c)) == am);
  }
  const Vec<T> sum = one + others, inv_sum = one / sum;
  Vec<T> log_others = vlog(others);
  const Vec<T> tiny = others < Vec<T>(T(kTiny));
  bool lone = false;  // some voxel's other logits are all -inf: D = 0 for its argmax
  if (any(tiny)) {  // rare: the argmax dominates so far that the others' sum underflows
    Vec<T> m2 = ninf;
    for (int64_t c = 0; c < C; ++c) m2 = at::vec::maximum(m2, Vec<T>::blendv(xs[c], ninf, Vec<T>(T(c)) == am));
    Vec<T> rest = zero;
    for (int64_t c = 0; c < C; ++c) rest += Vec<T>::blendv(vexp(xs[c] - m2), zero, Vec<T>(T(c)) == am);
    // Where m2 = -inf, rest is exp(-inf + inf) = NaN; log D is -inf there.
    const Vec<T> alone = m2 == ninf;
    lone = any(alone);
    log_others = Vec<T>::blendv(log_others, Vec<T>::blendv(m2 + vlog(rest), ninf, alone), tiny);
  }
  for (int64_t c = 0; c < C; ++c) {
    // log D_c (C > 2).
    const Vec<T> log_d = Vec<T>::blendv(vlog(sum - p[c]), log_others, Vec<T>(T(c)) == am);
    const Vec<T> z = (xs[c] - log_d) * inv_t;
    const Vec<T> nabs = zero - z.abs();
    const Vec<T> a = vexp(nabs), inv_1a = one / (one + a);
    q[c] = Vec<T>::blendv(a * inv_1a, inv_1a, z >= zero);
    if (r != nullptr) {
      Vec<T> log_r = nabs - log_d;
      // log D = -inf (p = q = 1): -|z| - log D = log D (1/T - 1) in the limit, not -inf + inf.
      if (lone) log_r = Vec<T>::blendv(log_r, Vec<T>::blendv(log_d * (inv_t - one), zero, inv_t == one), log_d == ninf);
      r[c] = vexp(log_r) * sum * inv_1a * inv_1a * inv_t;
    }
    p[c] = p[c] * inv_sum;
  }
}

// Voxel tiles: `per_sample` tiles of kTileVectors vectors per sample.
template <typename T>
struct Tiling {
  int64_t B, N, per_sample, count;
  Tiling(int64_t B_, int64_t N_) : B(B_), N(N_) {
    per_sample = (N + kTileVectors * kLanes<T> - 1) / (kTileVectors * kLanes<T>);
    count = B * per_sample;
  }
  // Calls f(b, i, n) for each vector of tile t: sample b, voxels i..i+n-1.
  template <typename F>
  void for_vectors(int64_t t, F&& f) const {
    const int64_t b = t / per_sample, n0 = (t % per_sample) * kTileVectors * kLanes<T>;
    const int64_t n1 = std::min(N, n0 + kTileVectors * kLanes<T>);
    for (int64_t i = n0; i < n1; i += kLanes<T>) f(b, i, std::min(kLanes<T>, n1 - i));
  }
};

template <typename T>
double forward_sum(const std::vector<const T*>& x, const LogitsShape& sh, double temperature) {
  const int64_t S = sh.S, C = sh.C, N = sh.N;
  const Tiling<T> tiles(sh.B, N);
  std::vector<double> partial(tiles.count);
  const Vec<T> inv_t(T(1 / temperature)), s1(T(S - 1)), two(T(2));
  at::parallel_for(0, tiles.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<Vec<T>> buf(6 * C);
    Vec<T> *xs = buf.data(), *p = xs + C, *q = p + C, *ref = q + C, *U = ref + C, *W = U + C;
    for (int64_t t = begin; t < end; ++t) {
      Vec<T> acc(T(0));
      tiles.for_vectors(t, [&](int64_t b, int64_t i, int64_t n) {
        const int64_t base = b * C * N + i;
        Vec<T> squares(T(0)), cross(T(0));
        for (int64_t s = 0; s < S; ++s) {
          sharpen_voxels<T>(x[s] + base, N, C, n, inv_t, xs, p, q, nullptr);
          if (s == 0) std::copy(p, p + C, ref);
          for (int64_t c = 0; c < C; ++c) {
            const Vec<T> u = p[c] - ref[c], w = q[c] - ref[c];
            U[c] = s == 0 ? u : U[c] + u;
            W[c] = s == 0 ? w : W[c] + w;
            squares += u * u + w * w;
            cross += u * w;
          }
        }
        Vec<T> uw(T(0));
        for (int64_t c = 0; c < C; ++c) uw += U[c] * W[c];
        acc += head(s1 * squares - two * (uw - cross), n);
      });
      partial[t] = hsum(acc);
    }
  });
  double total = 0;
  for (const double v : partial) total += v;
  return total;
}

template <typename T>
void backward_grads(const std::vector<const T*>& x, const std::vector<T*>& g, const LogitsShape& sh, double temperature,
                    double k_scale) {
  const int64_t S = sh.S, C = sh.C, N = sh.N;
  const Tiling<T> tiles(sh.B, N);
  const Vec<T> inv_t(T(1 / temperature)), s1(T(S - 1)), k(static_cast<T>(k_scale));
  at::parallel_for(0, tiles.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<Vec<T>> buf(4 * C + 3 * S * C);
    Vec<T> *xs = buf.data(), *ref = xs + C, *U = ref + C, *W = U + C;
    Vec<T> *P = W + C, *Q = P + S * C, *R = Q + S * C;  // [S][C] each
    for (int64_t t = begin; t < end; ++t) {
      tiles.for_vectors(t, [&](int64_t b, int64_t i, int64_t n) {
        const int64_t base = b * C * N + i;
        for (int64_t s = 0; s < S; ++s) {
          Vec<T> *p = P + s * C, *q = Q + s * C;
          sharpen_voxels(x[s] + base, N, C, n, inv_t, xs, p, q, R + s * C);
          if (s == 0) std::copy(p, p + C, ref);
          for (int64_t c = 0; c < C; ++c) {
            U[c] = s == 0 ? p[c] - ref[c] : U[c] + (p[c] - ref[c]);
            W[c] = s == 0 ? q[c] - ref[c] : W[c] + (q[c] - ref[c]);
          }
        }
        for (int64_t s = 0; s < S; ++s) {
          Vec<T> *p = P + s * C, *h = Q + s * C, *r = R + s * C;
          Vec<T> h_sum(T(0));
          for (int64_t c = 0; c < C; ++c) {
            const Vec<T> u = p[c] - ref[c], w = h[c] - ref[c];
            const Vec<T> gp = k * (s1 * u - (W[c] - w)), gq = k * (s1 * w - (U[c] - u));
            h[c] = p[c] * gp + r[c] * gq;
            h_sum += h[c];
          }
          for (int64_t c = 0; c < C; ++c) (h[c] - p[c] * h_sum).store(g[s] + base + c * N, n);
        }
      });
    }
  });
}

std::vector<Tensor> contiguous_all(const std::vector<Tensor>& logits) {
  std::vector<Tensor> out;
  out.reserve(logits.size());
  for (const Tensor& x : logits) out.push_back(x.contiguous());
  return out;
}

}  // namespace

Tensor mutual_consistency_loss_forward(at::TensorList logits_in, double temperature) {
  const LogitsShape sh = check_logits("mutual_consistency_loss_forward", kCpuKernel, logits_in, temperature);
  const std::vector<Tensor> logits = contiguous_all(logits_in.vec());
  const double M = static_cast<double>(logits[0].numel());
  return AT_DISPATCH_FLOATING_TYPES(logits[0].scalar_type(), "mutual_consistency_loss_forward", [&] {
    std::vector<const scalar_t*> x;
    for (const Tensor& t : logits) x.push_back(t.const_data_ptr<scalar_t>());
    const double loss = forward_sum<scalar_t>(x, sh, temperature) / M;
    return at::scalar_tensor(loss, logits[0].options());
  });
}

std::vector<Tensor> mutual_consistency_loss_backward(const Tensor& grad, at::TensorList logits_in, double temperature) {
  const LogitsShape sh = check_logits("mutual_consistency_loss_backward", kCpuKernel, logits_in, temperature);
  const std::vector<Tensor> logits = contiguous_all(logits_in.vec());
  TORCH_CHECK(grad.numel() == 1 && grad.is_floating_point(),
              "mutual_consistency_loss_backward: grad must be a 0-dim floating tensor (the loss's gradient), got shape ",
              grad.sizes(), " and dtype ", grad.scalar_type());
  const double k = 2.0 * grad.item<double>() / static_cast<double>(logits[0].numel());
  std::vector<Tensor> grads;
  for (const Tensor& x : logits) grads.push_back(at::empty_like(x));
  AT_DISPATCH_FLOATING_TYPES(logits[0].scalar_type(), "mutual_consistency_loss_backward", [&] {
    std::vector<const scalar_t*> x;
    std::vector<scalar_t*> g;
    for (size_t s = 0; s < logits.size(); ++s) {
      x.push_back(logits[s].const_data_ptr<scalar_t>());
      g.push_back(grads[s].mutable_data_ptr<scalar_t>());
    }
    backward_grads<scalar_t>(x, g, sh, temperature, k);
  });
  return grads;
}

}  // namespace CPU_CAPABILITY

CAML_OPS_REGISTER_CPU_FORWARD_BACKWARD(mutual_consistency_loss)

}  // namespace caml_ops
