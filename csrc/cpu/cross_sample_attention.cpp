// CPU kernels of cross-sample attention (see DESIGN.md, cross_sample_attention).
//
// q, k, v: [B, L, H, d], usually strided views (unbind of a [B, L, 3, H, d]
// Linear output): rows are read through the strides of B, L and H, the last
// dimension must be contiguous (otherwise one .contiguous()).
//
// A position is one (l, h) pair. Its attention (rows i = query samples,
// columns j = key samples, all B x B) does not depend on the other positions:
//   S = scale q k^T,  lse_i = logsumexp_j S_ij,  P = softmax(S),
//   Z = keep / (1 - p) (0 where dropped),  O = (P Z) V.
// Backward recomputes P = exp(S - lse) and regenerates Z, then
//   dP = (dO V^T) Z,  D_i = sum_j P_ij dP_ij  (= sum_c dO_ic O_ic, so `out` is not read),
//   dS = P (dP - D),  dQ = scale dS K,  dK = scale dS^T Q,  dV = (P Z)^T dO.
// Positions are split among threads by at::parallel_for; a position's B x B
// matrices live in a per-thread buffer and every output element is written
// once, by the thread that owns its position: no reductions across threads, so
// the results do not depend on the thread count. With at::vec (float32
// accumulation for float32, float64 for float64): the B x B inner products run
// over the key samples j in vector lanes (k, v of the position transposed to
// [d, B] in the buffer first: no horizontal sums), softmax rows over j with
// the vec_math exp, the row combinations (P Z) V, dS K, ... over d.
// Dropout: csrc/philox.h's spec on the [L, H, B] rows of B key samples.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../attention_checks.h"
#include "../philox.h"
#include "vec_math.h"

namespace caml_ops {
namespace {

using at::Tensor;
using vecmath::exp_shift_inplace;
using vecmath::kLanes;
using vecmath::load;
template <typename T>
using Vec = at::vec::Vectorized<T>;

// Work per at::parallel_for grain, in multiply-adds (B*B*d per product of a position).
constexpr int64_t kGrainWork = 1 << 15;

// The B rows of x at one position: row b of (l, h) at data + b * sB + l * sL + h * sH.
template <typename T>
struct Rows {
  const T* data;
  int64_t sB, sL, sH;
  explicit Rows(const Tensor& x) : data(x.const_data_ptr<T>()), sB(x.stride(0)), sL(x.stride(1)), sH(x.stride(2)) {}
  const T* at(int64_t l, int64_t h) const { return data + l * sL + h * sH; }
};

// t[c * Bp + j] = x_j[c] for the B rows x_j = x + j * sx of d values; columns B..Bp-1 stay as they are (zero).
template <typename T>
void transpose_rows(const T* x, int64_t sx, int64_t B, int64_t Bp, int64_t d, T* t) {
  for (int64_t j = 0; j < B; ++j) {
    for (int64_t c = 0; c < d; ++c) t[c * Bp + j] = x[j * sx + c];
  }
}

// out[i * B + j] = alpha * (a_i . b_j) for the rows a_i = a + i * sa, b given transposed (bt: [d, Bp] from
// transpose_rows), so the products run over j in vector lanes and need no horizontal sums.
template <typename T>
void row_dots(const T* a, int64_t sa, const T* bt, int64_t B, int64_t Bp, int64_t d, T alpha, T* out) {
  const Vec<T> va(alpha);
  for (int64_t j = 0; j < B; j += kLanes<T>) {
    for (int64_t i = 0; i < B; ++i) {
      const T* ai = a + i * sa;
      const T* bj = bt + j;
      Vec<T> acc0(T(0)), acc1(T(0));  // two chains: the fmadd latency, not its throughput, bounds one
      int64_t c = 0;
      for (; c + 1 < d; c += 2) {
        acc0 = at::vec::fmadd(Vec<T>(ai[c]), Vec<T>::loadu(bj + c * Bp), acc0);
        acc1 = at::vec::fmadd(Vec<T>(ai[c + 1]), Vec<T>::loadu(bj + (c + 1) * Bp), acc1);
      }
      if (c < d) acc0 = at::vec::fmadd(Vec<T>(ai[c]), Vec<T>::loadu(bj + c * Bp), acc0);
      ((acc0 + acc1) * va).store(out + i * B + j, std::min(kLanes<T>, B - j));
    }
  }
}

// y_i = alpha * sum_j w(i, j) x_j for i < B, with w(i, j) = w[i * wi + j * wj] (wi = 1, wj = B reads w
// transposed), rows x_j = x + j * sx and y_i = y + i * sy of d values.
template <typename T>
void combine_rows(const T* w, int64_t wi, int64_t wj, const T* x, int64_t sx, int64_t B, int64_t d, T alpha, T* y,
                  int64_t sy) {
  const Vec<T> va(alpha);
  for (int64_t i = 0; i < B; ++i) {
    for (int64_t c = 0; c < d; c += kLanes<T>) {
      const int64_t n = std::min(kLanes<T>, d - c);
      Vec<T> acc(T(0));
      for (int64_t j = 0; j < B; ++j) acc = at::vec::fmadd(Vec<T>(w[i * wi + j * wj]), load(x + j * sx + c, n), acc);
      (acc * va).store(y + i * sy + c, n);
    }
  }
}

// The dropout of csrc/philox.h; off when dropout_p == 0 (then the RNG is skipped).
struct Dropout {
  bool on = false;
  uint64_t seed = 0, offset = 0;
  uint32_t threshold = 0;
  double inv_keep = 1;

  explicit Dropout(const AttentionProblem& pb) {
    if (pb.dropout_p == 0) return;
    on = true;
    seed = pb.seed;
    offset = pb.offset;
    threshold = dropout_threshold(pb.dropout_p);
    inv_keep = 1 / (1 - pb.dropout_p);
  }

  // z[i * B + j] = Z of the B x B probabilities at position-head `pos` (1 / (1 - p) kept, 0 dropped).
  template <typename T>
  void fill(T* z, int64_t pos, int64_t B) const {
    const T kept = static_cast<T>(inv_keep);
    for (int64_t i = 0; i < B; ++i) {
      const uint64_t row = static_cast<uint64_t>(pos * B + i);
      for (int64_t j0 = 0; j0 < B; j0 += 4) {
        const Philox4 words = dropout_words(seed, dropout_counter(offset, row, B, j0 / 4));
        for (int64_t w = 0; w < std::min<int64_t>(4, B - j0); ++w) {
          z[i * B + j0 + w] = words.x[w] >= threshold ? kept : T(0);
        }
      }
    }
  }
};

template <typename T>
void forward_kernel(const Rows<T>& q, const Rows<T>& k, const Rows<T>& v, const AttentionProblem& dm, double scale,
                    const Dropout& drop, T* out, T* lse) {
  const int64_t B = dm.B, H = dm.H, d = dm.d, LH = dm.L * dm.H, BB = B * B;
  const int64_t Bp = (B + kLanes<T> - 1) / kLanes<T> * kLanes<T>;  // B padded to whole vectors
  at::parallel_for(0, LH, std::max<int64_t>(1, kGrainWork / (BB * d)), [&](int64_t begin, int64_t end) {
    std::vector<T> buf(2 * BB + d * Bp, T(0));
    T *p = buf.data(), *z = p + BB, *kt = z + BB;
    for (int64_t pos = begin; pos < end; ++pos) {
      const int64_t l = pos / H, h = pos % H;
      transpose_rows(k.at(l, h), k.sB, B, Bp, d, kt);
      row_dots(q.at(l, h), q.sB, kt, B, Bp, d, static_cast<T>(scale), p);
      for (int64_t i = 0; i < B; ++i) {
        T* row = p + i * B;
        const T m = *std::max_element(row, row + B);
        const double sum = exp_shift_inplace(row, B, m);
        const T inv = static_cast<T>(1 / sum);
        for (int64_t j = 0; j < B; ++j) row[j] *= inv;
        lse[i * LH + pos] = static_cast<T>(m + std::log(sum));
      }
      if (drop.on) {
        drop.fill(z, pos, B);
        for (int64_t e = 0; e < BB; ++e) p[e] *= z[e];
      }
      combine_rows(p, B, int64_t(1), v.at(l, h), v.sB, B, d, T(1), out + pos * d, LH * d);
    }
  });
}

template <typename T>
void backward_kernel(const Rows<T>& dout, const Rows<T>& q, const Rows<T>& k, const Rows<T>& v, const T* lse,
                     const AttentionProblem& dm, double scale, const Dropout& drop, T* dq, T* dk, T* dv) {
  const int64_t B = dm.B, H = dm.H, d = dm.d, LH = dm.L * dm.H, BB = B * B;
  const int64_t Bp = (B + kLanes<T> - 1) / kLanes<T> * kLanes<T>;  // B padded to whole vectors
  at::parallel_for(0, LH, std::max<int64_t>(1, kGrainWork / (3 * BB * d)), [&](int64_t begin, int64_t end) {
    std::vector<T> buf(3 * BB + 2 * d * Bp, T(0));
    T *p = buf.data(), *g = p + BB, *z = g + BB, *kt = z + BB, *vt = kt + d * Bp;
    for (int64_t pos = begin; pos < end; ++pos) {
      const int64_t l = pos / H, h = pos % H;
      const T *qp = q.at(l, h), *kp = k.at(l, h), *dop = dout.at(l, h);
      transpose_rows(kp, k.sB, B, Bp, d, kt);
      transpose_rows(v.at(l, h), v.sB, B, Bp, d, vt);
      row_dots(qp, q.sB, kt, B, Bp, d, static_cast<T>(scale), p);
      for (int64_t i = 0; i < B; ++i) exp_shift_inplace(p + i * B, B, lse[i * LH + pos]);
      row_dots(dop, dout.sB, vt, B, Bp, d, T(1), g);  // dO V^T
      if (drop.on) {
        drop.fill(z, pos, B);
        for (int64_t e = 0; e < BB; ++e) g[e] *= z[e];  // dP
      }
      for (int64_t i = 0; i < B; ++i) {
        const T *pr = p + i * B, *gr = g + i * B;
        T D = 0;
        for (int64_t j = 0; j < B; ++j) D += pr[j] * gr[j];
        for (int64_t j = 0; j < B; ++j) g[i * B + j] = pr[j] * (gr[j] - D);  // dS
      }
      // dV = (P Z)^T dO; without dropout P Z = P.
      const T* pz = p;
      if (drop.on) {
        for (int64_t e = 0; e < BB; ++e) z[e] *= p[e];
        pz = z;
      }
      combine_rows(pz, int64_t(1), B, dop, dout.sB, B, d, T(1), dv + pos * d, LH * d);
      combine_rows(g, B, int64_t(1), kp, k.sB, B, d, static_cast<T>(scale), dq + pos * d, LH * d);
      combine_rows(g, int64_t(1), B, qp, q.sB, B, d, static_cast<T>(scale), dk + pos * d, LH * d);
    }
  });
}

constexpr AttentionKernel kKernel{c10::DeviceType::CPU, /*half_types=*/false};

// x itself when its last dimension is contiguous (the strides of B, L, H are used as they are).
Tensor unit_last(const Tensor& x) { return x.size(3) == 1 || x.stride(3) == 1 ? x : x.contiguous(); }

std::tuple<Tensor, Tensor> cross_sample_attention_forward_cpu(const Tensor& q_in, const Tensor& k_in,
                                                              const Tensor& v_in, double scale, double dropout_p,
                                                              const Tensor& rng_state) {
  const AttentionProblem dm =
      check_attention("cross_sample_attention_forward", kKernel, q_in, k_in, v_in, scale, dropout_p, rng_state);
  const Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  const Dropout drop(dm);
  Tensor out = at::empty({dm.B, dm.L, dm.H, dm.d}, q.options());
  Tensor lse = at::empty({dm.B, dm.L, dm.H}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cross_sample_attention_forward_cpu", [&] {
    forward_kernel<scalar_t>(Rows<scalar_t>(q), Rows<scalar_t>(k), Rows<scalar_t>(v), dm, scale, drop,
                             out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<scalar_t>());
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> cross_sample_attention_backward_cpu(const Tensor& grad_out_in, const Tensor& q_in,
                                                                       const Tensor& k_in, const Tensor& v_in,
                                                                       const Tensor& out, const Tensor& lse_in,
                                                                       double scale, double dropout_p,
                                                                       const Tensor& rng_state) {
  // `out` is checked but not read: D = rowsum(dO * O) is taken as rowsum(P * dP).
  const AttentionProblem dm =
      check_attention_backward("cross_sample_attention_backward", kKernel, LseLayout::kBLH, grad_out_in, q_in, k_in,
                               v_in, out, lse_in, scale, dropout_p, rng_state);
  const Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in), dout = unit_last(grad_out_in);
  const Tensor lse = lse_in.contiguous();
  const Dropout drop(dm);
  Tensor dq = at::empty({dm.B, dm.L, dm.H, dm.d}, q.options());
  Tensor dk = at::empty_like(dq), dv = at::empty_like(dq);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cross_sample_attention_backward_cpu", [&] {
    backward_kernel<scalar_t>(Rows<scalar_t>(dout), Rows<scalar_t>(q), Rows<scalar_t>(k), Rows<scalar_t>(v),
                              lse.const_data_ptr<scalar_t>(), dm, scale, drop, dq.mutable_data_ptr<scalar_t>(),
                              dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>());
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(caml_ops, CPU, m) {
  m.impl("cross_sample_attention_forward", &cross_sample_attention_forward_cpu);
  m.impl("cross_sample_attention_backward", &cross_sample_attention_backward_cpu);
}

}  // namespace caml_ops
