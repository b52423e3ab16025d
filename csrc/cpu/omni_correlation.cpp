// CPU kernels of the omni-correlation ops (see docs/design.md,
// "omni_correlation_loss" and "omni_correlation").
//
// Rows are processed in tiles: a tile's logits S = feat[tile] @ memory^T / t
// ([tile, K], a per-thread buffer that stays in cache) come from a
// register-blocked GEMM (gemm.h), the softmax statistics and dS are computed in place
// with at::vec, and the backward GEMMs (dS @ memory, dS^T @ feat) reuse the
// same GEMM. The loss ops never hold more than one tile of the N x K matrices
// per thread.
//
// Determinism: tiles are grouped into a number of chunks fixed by the sizes
// (never by the thread count); chunks run in parallel, the tiles of a chunk in
// order, and each chunk owns its grad_memory partial; partials are summed in
// chunk order. No float atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "dispatch.h"
#include "gemm.h"
#include "vec_math.h"

namespace caml_ops {
inline namespace CPU_CAPABILITY {  // one build per capability: see dispatch.h
namespace {

using at::Tensor;
using at::vec::Vectorized;
using namespace vecmath;  // exp and log: the AVX2 / AVX-512 polynomials shared with the other CPU kernels

template <typename T>
T row_max(const T* s, int64_t K) {
  Vectorized<T> m(-std::numeric_limits<T>::infinity());
  for (int64_t k = 0; k < K; k += kLanes<T>) {
    m = at::vec::maximum(m, load(s + k, std::min(kLanes<T>, K - k), -std::numeric_limits<T>::infinity()));
  }
  T lanes[kLanes<T>];
  m.store(lanes);
  return *std::max_element(lanes, lanes + kLanes<T>);
}

// sum_k exp(s_k - m), s unchanged.
template <typename T>
T sum_exp(const T* s, int64_t K, T m) {
  const Vectorized<T> vm(m);
  Vectorized<T> sum(T(0));
  for (int64_t k = 0; k < K; k += kLanes<T>) {
    const int64_t n = std::min(kLanes<T>, K - k);
    sum += head(vexp(load(s + k, n) - vm), n);
  }
  return hsum(sum);
}

// ---------------------------------------------------------------- row kernels

// A row's log-sum-exp m + log z as an unevaluated pair hi + lo, hi = fl(m + log z):
// log p = (s - hi) - lo is then nearly exact (s - hi exactly so near the maximum,
// by Sterbenz), where s - fl(lse) would put a relative error of up to
// |lse| * 2^-24 on a whole row of p and shift all of log p alike. Same definition
// as the Triton kernels (lo in double here: more accurate, same meaning).
template <typename T>
struct Lse {
  T hi, lo;
};

template <typename T>
Lse<T> make_lse(T m, T z) {
  const double log_z = std::log(double(z));
  const T hi = static_cast<T>(m + log_z);
  return {hi, static_cast<T>((double(m) - double(hi)) + log_z)};  // m - hi: exact in double
}

// log p = (s - hi) - lo of n <= kLanes logits (forward and backward alike: bit-identical p and q).
template <typename T>
inline Vectorized<T> log_prob(const T* s, int64_t n, const Vectorized<T>& hi, const Vectorized<T>& lo) {
  return (load(s, n) - hi) - lo;
}

template <typename T>
struct LossRow {
  double loss, r_sum;
  Lse<T> lse_v, lse_a;
};

// Loss statistics of one row from its scaled logits sv, sa.
template <typename T>
LossRow<T> loss_forward_row(const T* sv, const T* sa, int64_t K, T eps) {
  const T mv = row_max(sv, K), ma = row_max(sa, K);
  if (eps == T(0)) {
    // l = lse_v - sum_j q_j s_v_j = log Zv - sum_j q_j (s_v_j - mv); R = 1.
    const Vectorized<T> vmv(mv), vma(ma);
    Vectorized<T> zv(T(0)), za(T(0)), dot(T(0));
    for (int64_t k = 0; k < K; k += kLanes<T>) {
      const int64_t n = std::min(kLanes<T>, K - k);
      const Vectorized<T> xv = load(sv + k, n) - vmv;
      const Vectorized<T> ea = head(vexp(load(sa + k, n) - vma), n);
      zv += head(vexp(xv), n);
      za += ea;
      dot += ea * head(xv, n);
    }
    const T Zv = hsum(zv), Za = hsum(za);
    return {std::log(double(Zv)) - hsum(dot) / double(Za), 1.0, make_lse(mv, Zv), make_lse(ma, Za)};
  }
  const Lse<T> lv = make_lse(mv, sum_exp(sv, K, mv)), la = make_lse(ma, sum_exp(sa, K, ma));
  // p, q and q * (p / (p + eps)) exactly as loss_backward_row recomputes them, so that
  // dl/ds_v = p R - q p / (p + eps) cancels to the last bit where a row's p is one-hot.
  const Vectorized<T> vhv(lv.hi), vlv(lv.lo), vha(la.hi), vla(la.lo), veps(eps);
  Vectorized<T> acc_log(T(0)), acc_r(T(0));
  for (int64_t k = 0; k < K; k += kLanes<T>) {
    const int64_t n = std::min(kLanes<T>, K - k);
    const Vectorized<T> p = head(vexp(log_prob(sv + k, n, vhv, vlv)), n);
    const Vectorized<T> q = head(vexp(log_prob(sa + k, n, vha, vla)), n);
    const Vectorized<T> pe = p + veps;
    acc_log += q * vlog(pe);
    acc_r += q * (p / pe);
  }
  return {-double(hsum(acc_log)), double(hsum(acc_r)), lv, la};
}

// dS of one loss row, in place of its scaled logits sv, sa.
template <typename T>
void loss_backward_row(T* sv, T* sa, int64_t K, T g, T loss, Lse<T> lse_v, Lse<T> lse_a, T r_sum, T eps) {
  const Vectorized<T> vg(g), vl(loss), vhv(lse_v.hi), vlv(lse_v.lo), vha(lse_a.hi), vla(lse_a.lo), vr(r_sum),
      veps(eps);
  for (int64_t k = 0; k < K; k += kLanes<T>) {
    const int64_t n = std::min(kLanes<T>, K - k);
    const Vectorized<T> lp = log_prob(sv + k, n, vhv, vlv);
    const Vectorized<T> p = vexp(lp);
    const Vectorized<T> q = vexp(log_prob(sa + k, n, vha, vla));
    Vectorized<T> ds_v, ds_a;
    if (eps == T(0)) {
      ds_a = vg * q * (Vectorized<T>(T(0)) - lp - vl);  // c = -log p
      ds_v = vg * (p - q);
    } else {
      const Vectorized<T> pe = p + veps;
      ds_a = vg * q * (Vectorized<T>(T(0)) - vlog(pe) - vl);
      ds_v = vg * (p * vr - q * (p / pe));  // q * (p / pe) as in R: exact cancellation for a one-hot p
    }
    ds_v.store(sv + k, n);
    ds_a.store(sa + k, n);
  }
}

// Softmax of one row in place.
template <typename T>
void softmax_row(T* s, int64_t K) {
  const T z = exp_shift_inplace(s, K, row_max(s, K));
  const Vectorized<T> inv(T(1) / z);
  for (int64_t k = 0; k < K; k += kLanes<T>) {
    const int64_t n = std::min(kLanes<T>, K - k);
    (load(s + k, n) * inv).store(s + k, n);
  }
}

// dS = P * (G - sum(G * P)) of one softmax row.
template <typename T>
void softmax_backward_row(const T* g, const T* p, T* ds, int64_t K) {
  Vectorized<T> acc(T(0));
  for (int64_t k = 0; k < K; k += kLanes<T>) {
    const int64_t n = std::min(kLanes<T>, K - k);
    acc += load(g + k, n) * load(p + k, n);
  }
  const Vectorized<T> dot(hsum(acc));
  for (int64_t k = 0; k < K; k += kLanes<T>) {
    const int64_t n = std::min(kLanes<T>, K - k);
    const Vectorized<T> pk = load(p + k, n);
    (pk * (load(g + k, n) - dot)).store(ds + k, n);
  }
}

// ---------------------------------------------------------------- tiling

constexpr int64_t kTileBytes = 64 * 1024;             // one [tile, K] buffer: stays in L2
constexpr int64_t kMaxChunks = 64;                    // parallelism of the chunked loops
constexpr int64_t kPartialBytes = int64_t(64) << 20;  // cap on the grad_memory partials

struct Tiling {
  int64_t tile = 1, rows_per_chunk = 1, chunks = 0;
};

// Tiles of rows and their grouping into chunks; depends only on the sizes. With
// partial_bytes > 0 (one chunk's grad_memory partial) the chunk count is capped
// so that the partials stay below kPartialBytes.
Tiling make_tiling(int64_t N, int64_t K, int64_t elem_size, int64_t partial_bytes = 0) {
  Tiling t;
  t.tile = std::clamp<int64_t>(kTileBytes / (K * elem_size), kGemmRows, 256) / kGemmRows * kGemmRows;  // whole GEMM blocks
  const int64_t tiles = (N + t.tile - 1) / t.tile;
  int64_t chunks = std::min(tiles, kMaxChunks);
  if (partial_bytes > 0) chunks = std::min(chunks, std::max<int64_t>(1, kPartialBytes / partial_bytes));
  if (chunks == 0) return t;
  t.rows_per_chunk = (tiles + chunks - 1) / chunks * t.tile;
  t.chunks = (N + t.rows_per_chunk - 1) / t.rows_per_chunk;
  return t;
}

// Runs fn(chunk, row0, rows, workspace) for every row tile; chunks in parallel,
// the tiles of a chunk in order, each thread with its own workspace of ws_size.
template <typename T, typename Fn>
void for_each_tile(int64_t N, const Tiling& t, int64_t ws_size, const Fn& fn) {
  at::parallel_for(0, t.chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<T> ws(ws_size);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t end = std::min(N, (c + 1) * t.rows_per_chunk);
      for (int64_t r0 = c * t.rows_per_chunk; r0 < end; r0 += t.tile) {
        fn(c, r0, std::min(t.tile, end - r0), ws.data());
      }
    }
  });
}

// Scaled logits of a tile: s[rows, K] = (feat[rows, D] @ mem_t[D, K]) / t (mem_t = memory^T).
// Rounded as PyTorch rounds (feat @ memory.T) / temperature on the CPU (the
// GEMM accumulates over D in order, by FMA, as MKL does): the float32
// gradients' error is dominated by the logits' rounding, amplified in rows
// with p_j ~ eps, and logits rounded any other way (memory / t, * (1 / t), another
// summation order) put the max error at a random 0.3 to 10 times plain
// PyTorch's.
template <typename T>
void tile_logits(const T* feat, const T* mem_t, T* s, int64_t rows, int64_t K, int64_t D, T t) {
  gemm<T>(rows, K, D, feat, D, 1, mem_t, K, s, K, false);
  const Vectorized<T> vt(t);
  for (int64_t i = 0; i < rows * K; i += kLanes<T>) {
    const int64_t n = std::min(kLanes<T>, rows * K - i);
    (load(s + i, n) / vt).store(s + i, n);
  }
}

template <typename T>
struct LossLogits {
  T* sv;
  T* sa;
};

// The scaled logits of loss rows [r0, r0 + rows): sv of feat_v (fv) and sa of
// feat_a (fa), [rows, K] each, in ws [2, tile, K]; the backward's are the
// forward's, bit for bit.
template <typename T>
LossLogits<T> loss_tile_logits(const T* fv, const T* fa, const T* mem_t, T* ws, int64_t tile, int64_t r0,
                               int64_t rows, int64_t K, int64_t D, T t) {
  T* sv = ws;
  T* sa = ws + tile * K;
  tile_logits(fv + r0 * D, mem_t, sv, rows, K, D, t);
  tile_logits(fa + r0 * D, mem_t, sa, rows, K, D, t);
  return {sv, sa};
}

// Backward GEMMs of a tile from its dS [rows, K]: grad_feat[rows] = dS @ mem_s
// (mem_s = memory / t) and, when partial is given, partial += dS^T @ feat / t.
template <typename T>
void tile_backward_gemms(const T* ds, const T* feat, const T* mem_s, T* grad_feat, T* partial, int64_t rows,
                         int64_t K, int64_t D, T inv_t) {
  gemm<T>(rows, D, K, ds, K, 1, mem_s, D, grad_feat, D, false);
  if (partial != nullptr) gemm<T>(K, D, rows, ds, 1, K, feat, D, partial, D, true, inv_t);
}

// A backward's tiling and, with memory_grad, one zeroed grad_memory partial
// [K, D] per chunk (make_tiling caps the chunks so that the partials fit in
// kPartialBytes).
template <typename T>
struct BackwardTiling {
  Tiling tiles;
  Tensor partials;  // [chunks, K, D]; undefined without memory_grad
  T* data = nullptr;
  int64_t partial_size;

  BackwardTiling(int64_t N, int64_t K, int64_t D, bool memory_grad, const at::TensorOptions& opts)
      : tiles(make_tiling(N, K, sizeof(T), memory_grad ? K * D * int64_t(sizeof(T)) : 0)), partial_size(K * D) {
    if (!memory_grad) return;
    partials = at::zeros({tiles.chunks, K, D}, opts);
    data = partials.data_ptr<T>();
  }

  // Chunk c's partial; nullptr without memory_grad.
  T* partial(int64_t c) const { return data != nullptr ? data + c * partial_size : nullptr; }

  // grad_memory: the partials summed in chunk order (zeros without memory_grad).
  Tensor grad_memory(const Tensor& memory) const {
    if (!partials.defined() || partials.size(0) == 0) return at::zeros_like(memory, at::MemoryFormat::Contiguous);
    Tensor out = partials[0].clone();
    for (int64_t c = 1; c < partials.size(0); ++c) out.add_(partials[c]);
    return out;
  }
};

// ---------------------------------------------------------------- checks

// feat [N, D] and memory [K, D], same dtype, K > 0, temperature > 0.
void check_features(const char* op, const Tensor& feat, const char* feat_name, const Tensor& memory,
                    double temperature) {
  check_input(op, feat_name, feat, kCpuKernel);
  check_input(op, "memory", memory, kCpuKernel);
  TORCH_CHECK(feat.dim() == 2, op, ": ", feat_name, " must be [N, D], got shape ", feat.sizes());
  TORCH_CHECK(memory.dim() == 2, op, ": memory must be [K, D], got shape ", memory.sizes());
  TORCH_CHECK(memory.size(0) > 0, op, ": memory is empty (K = 0): the memory bank needs at least one embedding");
  TORCH_CHECK(feat.size(1) == memory.size(1), op, ": ", feat_name, " has D = ", feat.size(1),
              " but memory has D = ", memory.size(1), "; they must match");
  TORCH_CHECK(feat.scalar_type() == memory.scalar_type(), op, ": ", feat_name, " (", feat.scalar_type(),
              ") and memory (", memory.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), op, ": temperature must be finite and > 0, got ",
              temperature);
}

void check_loss_inputs(const char* op, const Tensor& feat_v, const Tensor& feat_a, const Tensor& memory,
                       double temperature, double eps) {
  check_features(op, feat_v, "feat_v", memory, temperature);
  check_features(op, feat_a, "feat_a", memory, temperature);
  TORCH_CHECK(feat_a.sizes() == feat_v.sizes(), op, ": feat_a must have the shape of feat_v ", feat_v.sizes(),
              ", got ", feat_a.sizes());
  TORCH_CHECK(eps >= 0 && std::isfinite(eps), op, ": eps must be finite and >= 0, got ", eps);
}

// A saved or incoming floating tensor of the backward (a CPU tensor of the
// given shape), as contiguous `dtype`.
Tensor backward_input(const char* op, const Tensor& x, const char* name, at::IntArrayRef shape, const char* form,
                      at::ScalarType dtype) {
  TORCH_CHECK(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.sizes() == shape, op, ": ", name, " must be ", form, " = ", shape, ", got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": ", name, " must be floating point, got ",
              x.scalar_type());
  return x.to(dtype).contiguous();
}

}  // namespace

// ---------------------------------------------------------------- ops

std::tuple<Tensor, Tensor, Tensor, Tensor> omni_correlation_loss_forward(const Tensor& feat_v_in,
                                                                         const Tensor& feat_a_in, const Tensor& memory,
                                                                         double temperature, double eps) {
  check_loss_inputs("omni_correlation_loss_forward", feat_v_in, feat_a_in, memory, temperature, eps);
  const Tensor feat_v = feat_v_in.contiguous(), feat_a = feat_a_in.contiguous();
  const Tensor mem_t = memory.t().contiguous();  // [D, K]
  const int64_t N = feat_v.size(0), K = memory.size(0), D = memory.size(1);
  const auto opts = feat_v.options();
  Tensor loss = at::empty({N}, opts), lse_v = at::empty({N, 2}, opts), lse_a = at::empty({N, 2}, opts),
         r_sum = at::empty({N}, opts);
  AT_DISPATCH_FLOATING_TYPES(feat_v.scalar_type(), "omni_correlation_loss_forward", [&] {
    const Tiling t = make_tiling(N, K, sizeof(scalar_t));
    const scalar_t* fv = feat_v.data_ptr<scalar_t>();
    const scalar_t* fa = feat_a.data_ptr<scalar_t>();
    const scalar_t* mt = mem_t.data_ptr<scalar_t>();
    scalar_t* out_l = loss.data_ptr<scalar_t>();
    scalar_t* out_lv = lse_v.data_ptr<scalar_t>();
    scalar_t* out_la = lse_a.data_ptr<scalar_t>();
    scalar_t* out_r = r_sum.data_ptr<scalar_t>();
    const auto temp = scalar_t(temperature);
    for_each_tile<scalar_t>(N, t, 2 * t.tile * K, [&](int64_t, int64_t r0, int64_t rows, scalar_t* ws) {
      const auto [sv, sa] = loss_tile_logits(fv, fa, mt, ws, t.tile, r0, rows, K, D, temp);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t r = r0 + i;
        const LossRow<scalar_t> row = loss_forward_row<scalar_t>(sv + i * K, sa + i * K, K, scalar_t(eps));
        out_l[r] = row.loss;
        out_r[r] = row.r_sum;
        out_lv[2 * r] = row.lse_v.hi;
        out_lv[2 * r + 1] = row.lse_v.lo;
        out_la[2 * r] = row.lse_a.hi;
        out_la[2 * r + 1] = row.lse_a.lo;
      }
    });
  });
  return {loss, lse_v, lse_a, r_sum};
}

std::tuple<Tensor, Tensor, Tensor> omni_correlation_loss_backward(const Tensor& grad_rows, const Tensor& feat_v_in,
                                                                  const Tensor& feat_a_in, const Tensor& memory,
                                                                  const Tensor& loss_rows, const Tensor& lse_v_in,
                                                                  const Tensor& lse_a_in, const Tensor& r_sum_in,
                                                                  double temperature, double eps, bool memory_grad) {
  constexpr const char* op = "omni_correlation_loss_backward";
  check_loss_inputs(op, feat_v_in, feat_a_in, memory, temperature, eps);
  const Tensor feat_v = feat_v_in.contiguous(), feat_a = feat_a_in.contiguous();
  const int64_t N = feat_v.size(0), K = memory.size(0), D = memory.size(1);
  const auto dtype = feat_v.scalar_type();
  const Tensor g = backward_input(op, grad_rows, "grad_rows", {N}, "[N]", dtype);
  const Tensor loss = backward_input(op, loss_rows, "loss_rows", {N}, "[N]", dtype);
  const Tensor lse_v = backward_input(op, lse_v_in, "lse_v", {N, 2}, "[N, 2] (log-sum-exp as hi, lo)", dtype);
  const Tensor lse_a = backward_input(op, lse_a_in, "lse_a", {N, 2}, "[N, 2] (log-sum-exp as hi, lo)", dtype);
  const Tensor r_sum = backward_input(op, r_sum_in, "r_sum", {N}, "[N]", dtype);
  const Tensor mem_s = memory.div(temperature).contiguous();  // [K, D]
  const Tensor mem_t = memory.t().contiguous();               // [D, K]
  const auto opts = feat_v.options();
  Tensor grad_v = at::empty({N, D}, opts), grad_a = at::empty({N, D}, opts), grad_memory;
  AT_DISPATCH_FLOATING_TYPES(dtype, op, [&] {
    const BackwardTiling<scalar_t> bt(N, K, D, memory_grad, opts);
    const Tiling& t = bt.tiles;
    const scalar_t* fv = feat_v.data_ptr<scalar_t>();
    const scalar_t* fa = feat_a.data_ptr<scalar_t>();
    const scalar_t* ms = mem_s.data_ptr<scalar_t>();
    const scalar_t* mt = mem_t.data_ptr<scalar_t>();
    const scalar_t* pg = g.data_ptr<scalar_t>();
    const scalar_t* pl = loss.data_ptr<scalar_t>();
    const scalar_t* plv = lse_v.data_ptr<scalar_t>();
    const scalar_t* pla = lse_a.data_ptr<scalar_t>();
    const scalar_t* pr = r_sum.data_ptr<scalar_t>();
    scalar_t* gv = grad_v.data_ptr<scalar_t>();
    scalar_t* ga = grad_a.data_ptr<scalar_t>();
    const auto temp = scalar_t(temperature);
    const auto inv_t = scalar_t(1.0 / temperature);
    for_each_tile<scalar_t>(N, t, 2 * t.tile * K, [&](int64_t chunk, int64_t r0, int64_t rows, scalar_t* ws) {
      const auto [sv, sa] = loss_tile_logits(fv, fa, mt, ws, t.tile, r0, rows, K, D, temp);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t r = r0 + i;
        loss_backward_row<scalar_t>(sv + i * K, sa + i * K, K, pg[r], pl[r], {plv[2 * r], plv[2 * r + 1]},
                                    {pla[2 * r], pla[2 * r + 1]}, pr[r], scalar_t(eps));
      }
      tile_backward_gemms(sv, fv + r0 * D, ms, gv + r0 * D, bt.partial(chunk), rows, K, D, inv_t);
      tile_backward_gemms(sa, fa + r0 * D, ms, ga + r0 * D, bt.partial(chunk), rows, K, D, inv_t);
    });
    grad_memory = bt.grad_memory(memory);
  });
  return {grad_v, grad_a, grad_memory};
}

Tensor omni_correlation_forward(const Tensor& feat_in, const Tensor& memory, double temperature) {
  check_features("omni_correlation_forward", feat_in, "feat", memory, temperature);
  const Tensor feat = feat_in.contiguous();
  const Tensor mem_t = memory.t().contiguous();
  const int64_t N = feat.size(0), K = memory.size(0), D = memory.size(1);
  Tensor probs = at::empty({N, K}, feat.options());
  AT_DISPATCH_FLOATING_TYPES(feat.scalar_type(), "omni_correlation_forward", [&] {
    const Tiling t = make_tiling(N, K, sizeof(scalar_t));
    const scalar_t* f = feat.data_ptr<scalar_t>();
    const scalar_t* mt = mem_t.data_ptr<scalar_t>();
    scalar_t* out = probs.data_ptr<scalar_t>();
    const auto temp = scalar_t(temperature);
    for_each_tile<scalar_t>(N, t, 0, [&](int64_t, int64_t r0, int64_t rows, scalar_t*) {
      tile_logits(f + r0 * D, mt, out + r0 * K, rows, K, D, temp);
      for (int64_t i = 0; i < rows; ++i) softmax_row(out + (r0 + i) * K, K);
    });
  });
  return probs;
}

std::tuple<Tensor, Tensor> omni_correlation_backward(const Tensor& grad_out_in, const Tensor& probs_in,
                                                     const Tensor& feat_in, const Tensor& memory,
                                                     double temperature, bool memory_grad) {
  constexpr const char* op = "omni_correlation_backward";
  check_features(op, feat_in, "feat", memory, temperature);
  const int64_t N = feat_in.size(0), K = memory.size(0), D = memory.size(1);
  const auto dtype = feat_in.scalar_type();
  const Tensor grad_out = backward_input(op, grad_out_in, "grad_out", {N, K}, "[N, K]", dtype);
  const Tensor probs = backward_input(op, probs_in, "probs", {N, K}, "[N, K]", dtype);
  const Tensor feat = feat_in.contiguous();
  const Tensor mem_s = memory.div(temperature).contiguous();
  Tensor grad_feat = at::empty({N, D}, feat.options()), grad_memory;
  AT_DISPATCH_FLOATING_TYPES(dtype, op, [&] {
    const BackwardTiling<scalar_t> bt(N, K, D, memory_grad, feat.options());
    const scalar_t* pgo = grad_out.data_ptr<scalar_t>();
    const scalar_t* pp = probs.data_ptr<scalar_t>();
    const scalar_t* f = feat.data_ptr<scalar_t>();
    const scalar_t* ms = mem_s.data_ptr<scalar_t>();
    scalar_t* gf = grad_feat.data_ptr<scalar_t>();
    const auto inv_t = scalar_t(1.0 / temperature);
    for_each_tile<scalar_t>(N, bt.tiles, bt.tiles.tile * K, [&](int64_t chunk, int64_t r0, int64_t rows, scalar_t* ds) {
      for (int64_t i = 0; i < rows; ++i) softmax_backward_row(pgo + (r0 + i) * K, pp + (r0 + i) * K, ds + i * K, K);
      tile_backward_gemms(ds, f + r0 * D, ms, gf + r0 * D, bt.partial(chunk), rows, K, D, inv_t);
    });
    grad_memory = bt.grad_memory(memory);
  });
  return {grad_feat, grad_memory};
}

}  // namespace CPU_CAPABILITY

CAML_OPS_REGISTER_CPU_FORWARD_BACKWARD(omni_correlation_loss)
CAML_OPS_REGISTER_CPU_FORWARD_BACKWARD(omni_correlation)

}  // namespace caml_ops
