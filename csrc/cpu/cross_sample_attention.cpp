// CPU kernels of cross-sample attention (see docs/design.md, "cross_sample_attention").
//
// q, k, v: [B, L, H, d], read in place as csrc/layout.h describes.
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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../philox.h"
#include "dispatch.h"
#include "vec_math.h"

namespace caml_ops {
inline namespace CPU_CAPABILITY {  // one build per capability: see dispatch.h
namespace {

using at::Tensor;
using namespace vecmath;
// The B rows of x at position (l, h): row b at x.row(0, l, h) + b * x.sb.
template <typename T>
using Rows = HeadsView<const T>;

// Work per at::parallel_for grain, in multiply-adds (B*B*d per product of a position).
constexpr int64_t kGrainWork = 1 << 15;

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

// z[i * B + j] = Z of the B x B probabilities at position-head `pos` (1 / (1 - p) kept, 0 dropped).
template <typename T>
void fill_keep_scale(const Dropout& drop, T* z, int64_t pos, int64_t B) {
  const T kept = static_cast<T>(drop.inv_keep);
  for (int64_t i = 0; i < B; ++i) {
    const uint64_t row = static_cast<uint64_t>(pos * B + i);
    for (int64_t j0 = 0; j0 < B; j0 += 4) {
      const Philox4 words = dropout_words(drop.seed, dropout_counter(drop.offset, row, B, j0 / 4));
      for (int64_t w = 0; w < std::min<int64_t>(4, B - j0); ++w) {
        z[i * B + j0 + w] = drop.keeps(words.x[w]) ? kept : T(0);
      }
    }
  }
}

template <typename T>
void forward_kernel(const Rows<T>& q, const Rows<T>& k, const Rows<T>& v, const AttentionProblem& dm, T* out,
                    T* lse) {
  const int64_t B = dm.B, H = dm.H, d = dm.d, LH = dm.L * dm.H, BB = B * B;
  const double scale = dm.scale;
  const Dropout& drop = dm.dropout;
  const int64_t Bp = (B + kLanes<T> - 1) / kLanes<T> * kLanes<T>;  // B padded to whole vectors
  at::parallel_for(0, LH, std::max<int64_t>(1, kGrainWork / (BB * d)), [&](int64_t begin, int64_t end) {
    std::vector<T> buf(2 * BB + d * Bp, T(0));
    T *p = buf.data(), *z = p + BB, *kt = z + BB;
    for (int64_t pos = begin; pos < end; ++pos) {
      const int64_t l = pos / H, h = pos % H;
      transpose_rows(k.row(0, l, h), k.sb, B, Bp, d, kt);
      row_dots(q.row(0, l, h), q.sb, kt, B, Bp, d, static_cast<T>(scale), p);
      for (int64_t i = 0; i < B; ++i) {
        T* row = p + i * B;
        const T m = *std::max_element(row, row + B);
        const double sum = exp_shift_inplace(row, B, m);
        const T inv = static_cast<T>(1 / sum);
        for (int64_t j = 0; j < B; ++j) row[j] *= inv;
        lse[i * LH + pos] = static_cast<T>(m + std::log(sum));
      }
      if (drop.on) {
        fill_keep_scale(drop, z, pos, B);
        for (int64_t e = 0; e < BB; ++e) p[e] *= z[e];
      }
      combine_rows(p, B, int64_t(1), v.row(0, l, h), v.sb, B, d, T(1), out + pos * d, LH * d);
    }
  });
}

template <typename T>
void backward_kernel(const Rows<T>& dout, const Rows<T>& q, const Rows<T>& k, const Rows<T>& v, const T* lse,
                     const AttentionProblem& dm, T* dq, T* dk, T* dv) {
  const int64_t B = dm.B, H = dm.H, d = dm.d, LH = dm.L * dm.H, BB = B * B;
  const double scale = dm.scale;
  const Dropout& drop = dm.dropout;
  const int64_t Bp = (B + kLanes<T> - 1) / kLanes<T> * kLanes<T>;  // B padded to whole vectors
  at::parallel_for(0, LH, std::max<int64_t>(1, kGrainWork / (3 * BB * d)), [&](int64_t begin, int64_t end) {
    std::vector<T> buf(3 * BB + 2 * d * Bp, T(0));
    T *p = buf.data(), *g = p + BB, *z = g + BB, *kt = z + BB, *vt = kt + d * Bp;
    for (int64_t pos = begin; pos < end; ++pos) {
      const int64_t l = pos / H, h = pos % H;
      const T *qp = q.row(0, l, h), *kp = k.row(0, l, h), *dop = dout.row(0, l, h);
      transpose_rows(kp, k.sb, B, Bp, d, kt);
      transpose_rows(v.row(0, l, h), v.sb, B, Bp, d, vt);
      row_dots(qp, q.sb, kt, B, Bp, d, static_cast<T>(scale), p);
      for (int64_t i = 0; i < B; ++i) exp_shift_inplace(p + i * B, B, lse[i * LH + pos]);
      row_dots(dop, dout.sb, vt, B, Bp, d, T(1), g);  // dO V^T
      if (drop.on) {
        fill_keep_scale(drop, z, pos, B);
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
      combine_rows(pz, int64_t(1), B, dop, dout.sb, B, d, T(1), dv + pos * d, LH * d);
      combine_rows(g, B, int64_t(1), kp, k.sb, B, d, static_cast<T>(scale), dq + pos * d, LH * d);
      combine_rows(g, int64_t(1), B, qp, q.sb, B, d, static_cast<T>(scale), dk + pos * d, LH * d);
    }
  });
}

}  // namespace

std::tuple<Tensor, Tensor> cross_sample_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                                          double scale, double dropout_p, const Tensor& rng_state) {
  const AttentionInputs in =
      check_attention("cross_sample_attention_forward", kCpuKernel, q, k, v, scale, dropout_p, rng_state);
  const AttentionProblem& dm = in.pb;
  Tensor out = at::empty({dm.B, dm.L, dm.H, dm.d}, q.options());
  Tensor lse = at::empty({dm.B, dm.L, dm.H}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cross_sample_attention_forward", [&] {
    forward_kernel<scalar_t>(heads_view<scalar_t>(in.q), heads_view<scalar_t>(in.k), heads_view<scalar_t>(in.v), dm,
                             out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<scalar_t>());
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> cross_sample_attention_backward(const Tensor& grad_out, const Tensor& q,
                                                                   const Tensor& k, const Tensor& v, const Tensor& out,
                                                                   const Tensor& lse, double scale, double dropout_p,
                                                                   const Tensor& rng_state) {
  // `out` is checked but not read: D = rowsum(dO * O) is taken as rowsum(P * dP).
  const AttentionBackwardInputs in =
      check_attention_backward("cross_sample_attention_backward", kCpuKernel, LseLayout::kBLH, grad_out, q, k, v, out,
                               lse, scale, dropout_p, rng_state);
  const AttentionProblem& dm = in.pb;
  Tensor dq = at::empty({dm.B, dm.L, dm.H, dm.d}, q.options());
  Tensor dk = at::empty_like(dq), dv = at::empty_like(dq);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cross_sample_attention_backward", [&] {
    backward_kernel<scalar_t>(heads_view<scalar_t>(in.grad_out), heads_view<scalar_t>(in.q),
                              heads_view<scalar_t>(in.k), heads_view<scalar_t>(in.v),
                              in.lse.const_data_ptr<scalar_t>(), dm,
                              dq.mutable_data_ptr<scalar_t>(), dk.mutable_data_ptr<scalar_t>(),
                              dv.mutable_data_ptr<scalar_t>());
  });
  return {dq, dk, dv};
}

}  // namespace CPU_CAPABILITY

CAML_OPS_REGISTER_CPU_FORWARD_BACKWARD(cross_sample_attention)

}  // namespace caml_ops
