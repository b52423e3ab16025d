// CPU kernels of intra_sample_attention (see docs/design.md,
// "intra_sample_attention"): attention over the L positions of each (sample, head),
// flash-style, so that memory stays O(L d): no L x L matrix, only per-thread
// tiles of kBlock x kBlock logits that live in L1/L2.
//
// Forward: one task per (b, h, query block); an online softmax over the key
// blocks. The tile is held transposed, S^T [keys, queries], so that the row
// statistics (max, sum, rescale) of the queries are plain vector ops over lanes.
//
// Backward: one task per (b, h, chunk of key blocks), one pass: for each group
// of kGroup key blocks it sweeps all query blocks, regenerates P = exp(scale S -
// lse) and the dropout mask once per tile, and accumulates dK, dV of its keys in
// place and dQ into the chunk's own partial (D = rowsum(dO O) is computed once
// first). Chunks per (b, h) depend on the sizes only; partials are summed in
// chunk order: deterministic, no float atomics, whatever the thread count.
//
// Dropout mask: csrc/philox.h on the [B, H, L] rows of L keys, drawn 128 or 256
// words at a time by philox_vec.h; no RNG at all when dropout_p == 0.
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
#include "../philox.h"
#include "dispatch.h"
#include "gemm.h"
#include "philox_vec.h"
#include "vec_math.h"

namespace caml_ops {
inline namespace CPU_CAPABILITY {  // one build per capability: see dispatch.h
namespace {

using at::Tensor;
using at::vec::Vectorized;
using namespace vecmath;
template <typename T>
using Heads = HeadsView<const T>;  // q, k, v, grad_out, out

// Query and key block sizes: a 64 x 64 float tile is 16 KiB.
constexpr int64_t kBlock = 64;
static_assert(kBlock == DropoutWords::kRowLen, "a row of a backward tile is one row of DropoutWords::rows()");
static_assert(kBlock % DropoutWords::kColumnLen == 0, "a forward tile is whole DropoutWords::columns() blocks");
// Backward: (b, h) pairs are split into key chunks until there are this many
// tasks (parallelism for small B H), which costs one dQ partial per chunk.
constexpr int64_t kMinBackwardTasks = 32;
// Backward: key blocks swept together over the query blocks (their K^T, V^T,
// dK, dV stay in L2 while the query rows stream by).
constexpr int64_t kGroup = 4;

// ---------------------------------------------------------------- operands

// dst[c * ld + i] = src[i * stride + c] for i < rows, c < d: a block of strided
// [L, d] rows, transposed into a tile (the B operand of the logits GEMMs).
template <typename T>
void pack_transposed(const T* src, int64_t stride, int64_t rows, int64_t d, T* dst, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* row = src + i * stride;
    for (int64_t c = 0; c < d; ++c) dst[c * ld + i] = row[c];
  }
}

int64_t blocks(int64_t n) { return (n + kBlock - 1) / kBlock; }

// ---------------------------------------------------------------- forward

// One query block [i0, i0 + nq) of head (b, h): out rows and lse.
template <typename T>
void forward_block(const Heads<T>& Q, const Heads<T>& K, const Heads<T>& Vh, int64_t b, int64_t h, int64_t H,
                   int64_t L, int64_t d, int64_t i0, int64_t nq, T scale, const Dropout& drop,
                   const DropoutWords& draw, T* out, T* lse, T* ws, uint32_t* words) {
  using V = Vectorized<T>;
  constexpr int64_t W = kLanes<T>;
  static_assert(W <= DropoutWords::kColumnRows, "a vector of queries takes its words from one columns() block");
  constexpr int64_t ld = kBlock;  // leading dimension of the query-indexed tiles
  T* qt = ws;                     // [d, ld]: Q^T of the block
  T* st = qt + d * ld;            // [kBlock keys, ld]: S^T, then P^T (dropped, unnormalised)
  T* o = st + kBlock * ld;        // [ld, d]: unnormalised output
  T* m = o + ld * d;              // [ld] running max of the scaled logits
  T* l = m + ld;                  // [ld] running sum of exp
  T* alpha = l + ld;              // [ld] rescale of this key block
  const T* q = Q.row(b, 0, h);
  const T* k = K.row(b, 0, h);
  const T* v = Vh.row(b, 0, h);
  const int64_t bh = b * H + h;

  // Locals: not reloaded after every store.
  const bool dropout = drop.on;
  const uint32_t threshold = drop.threshold;
  const T inv_keep = static_cast<T>(drop.inv_keep);
  pack_transposed(q + i0 * Q.sl, Q.sl, nq, d, qt, ld);
  std::fill(m, m + ld, -std::numeric_limits<T>::infinity());
  std::fill(l, l + ld, T(0));
  std::fill(o, o + ld * d, T(0));
  const V vscale(scale);
  const int64_t nvec = (nq + W - 1) / W;  // lanes past nq hold don't-care values
  for (int64_t j0 = 0; j0 < L; j0 += kBlock) {
    const int64_t nk = std::min(kBlock, L - j0);
    gemm<T>(nk, nq, d, k + j0 * K.sl, K.sl, 1, qt, ld, st, ld, false);
    for (int64_t t = 0; t < nvec; ++t) {
      const int64_t i = t * W;
      const V m_old = V::loadu(m + i);
      V m_new = m_old;
      for (int64_t j = 0; j < nk; ++j) m_new = at::vec::maximum(m_new, V::loadu(st + j * ld + i) * vscale);
      const V neg_m = V(T(0)) - m_new;
      V sum(T(0));
      for (int64_t j = 0; j < nk; j += DropoutWords::kColumnLen) {
        // Words of keys j0 + j + r (r < 16) for queries i0 + i + c (c < kColumnRows, the float lanes).
        if (dropout) draw.columns(static_cast<uint64_t>(bh * L + i0 + i), static_cast<uint64_t>(j0 + j), words);
        for (int64_t r = 0; r < std::min(DropoutWords::kColumnLen, nk - j); ++r) {
          T* s = st + (j + r) * ld + i;
          // The rounded product, as in the maximum: a fused one can exceed it by half an ulp of the logit
          // (32 at 1e9), and exp of that overflows the row sum.
          V p = vexp(rounded(V::loadu(s) * vscale) + neg_m);
          sum += p;
          if (dropout) p = p * keep_scale<T>(words + r * DropoutWords::kColumnRows, threshold, inv_keep);
          p.store(s);
        }
      }
      const V a = vexp(m_old - m_new);  // 0 on the first block (m_old = -inf)
      (V::loadu(l + i) * a + sum).store(l + i);
      m_new.store(m + i);
      a.store(alpha + i);
    }
    // The running maximum settles after a few blocks: then there is nothing to rescale.
    bool rescale = false;
    for (int64_t i = 0; i < nq; ++i) rescale |= alpha[i] != T(1);
    for (int64_t i = 0; rescale && i < nq; ++i) {
      T* oi = o + i * d;
      const V a(alpha[i]);
      for (int64_t c = 0; c < d; c += W) {
        const int64_t n = std::min(W, d - c);
        (load(oi + c, n) * a).store(oi + c, n);
      }
    }
    gemm<T>(nq, d, nk, st, 1, ld, v + j0 * Vh.sl, Vh.sl, o, d, true);
  }
  for (int64_t i = 0; i < nq; ++i) {
    const V inv_l(T(1) / l[i]);
    T* dst = out + ((b * L + i0 + i) * H + h) * d;
    for (int64_t c = 0; c < d; c += W) {
      const int64_t n = std::min(W, d - c);
      (load(o + i * d + c, n) * inv_l).store(dst + c, n);
    }
    lse[bh * L + i0 + i] = m[i] + std::log(l[i]);
  }
}

// ---------------------------------------------------------------- backward

// D_i = sum_c dO_ic O_ic of every row, [B, H, L].
template <typename T>
void row_dots(const Heads<T>& dO, const Heads<T>& O, int64_t B, int64_t H, int64_t L, int64_t d, T* D) {
  using V = Vectorized<T>;
  constexpr int64_t W = kLanes<T>;
  at::parallel_for(0, B * H, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t bh = p0; bh < p1; ++bh) {
      const T* g = dO.row(bh / H, 0, bh % H);
      const T* o = O.row(bh / H, 0, bh % H);
      for (int64_t i = 0; i < L; ++i) {
        V acc(T(0));
        for (int64_t c = 0; c < d; c += W) {
          const int64_t n = std::min(W, d - c);
          acc = at::vec::fmadd(load(g + i * dO.sl + c, n), load(o + i * O.sl + c, n), acc);
        }
        D[bh * L + i] = static_cast<T>(hsum(acc));
      }
    }
  });
}

struct BackwardShape {
  int64_t B, L, H, d;
  int64_t chunks;      // key chunks per (b, h)
  int64_t chunk_len;   // key blocks per chunk
};

// Key blocks [kb0, kb1) of head (b, h): their dK, dV rows, and this chunk's dQ partial.
template <typename T>
void backward_chunk(const Heads<T>& Q, const Heads<T>& K, const Heads<T>& Vh, const Heads<T>& dO, const T* lse,
                    const T* D, int64_t b, int64_t h, int64_t kb0, int64_t kb1, const BackwardShape& sh, T scale,
                    const Dropout& drop, const DropoutWords& draw, T* dq, T* dk, T* dv, T* ws, uint32_t* words) {
  using V = Vectorized<T>;
  constexpr int64_t W = kLanes<T>;
  constexpr int64_t ld = kBlock;  // leading dimension of the key-indexed tiles
  const int64_t L = sh.L, H = sh.H, d = sh.d, ldo = H * d;  // ldo: row stride of the outputs
  T* kt = ws;                            // [kGroup, d, ld] K^T of the key blocks of a group
  T* vt = kt + kGroup * d * ld;          // [kGroup, d, ld] V^T
  T* sp = vt + kGroup * d * ld;          // [kBlock queries, ld]: S, then P Z (dropped and rescaled)
  T* ds = sp + kBlock * ld;              // [kBlock queries, ld]: dO V^T, then scale dS
  const T* q = Q.row(b, 0, h);
  const T* k = K.row(b, 0, h);
  const T* v = Vh.row(b, 0, h);
  const T* g = dO.row(b, 0, h);
  const int64_t bh = b * H + h;
  const V vscale(scale);
  // Locals: not reloaded after every store.
  const bool dropout = drop.on;
  const uint32_t threshold = drop.threshold;
  const T inv_keep = static_cast<T>(drop.inv_keep);
  for (int64_t kg = kb0; kg < kb1; kg += kGroup) {
    const int64_t kg1 = std::min(kb1, kg + kGroup);
    for (int64_t kb = kg; kb < kg1; ++kb) {
      const int64_t j0 = kb * kBlock, nk = std::min(kBlock, L - j0);
      pack_transposed(k + j0 * K.sl, K.sl, nk, d, kt + (kb - kg) * d * ld, ld);
      pack_transposed(v + j0 * Vh.sl, Vh.sl, nk, d, vt + (kb - kg) * d * ld, ld);
    }
    // Query blocks outside, the group's key blocks inside: the rows of Q, dO and
    // dQ of a query block are fetched once per group, not once per key block.
    for (int64_t i0 = 0; i0 < L; i0 += kBlock) {
      const int64_t nq = std::min(kBlock, L - i0);
      for (int64_t kb = kg; kb < kg1; ++kb) {
        const int64_t j0 = kb * kBlock, nk = std::min(kBlock, L - j0);
        const int64_t nvec = (nk + W - 1) / W;  // lanes past nk hold don't-care values
        gemm<T>(nq, nk, d, q + i0 * Q.sl, Q.sl, 1, kt + (kb - kg) * d * ld, ld, sp, ld, false);
        gemm<T>(nq, nk, d, g + i0 * dO.sl, dO.sl, 1, vt + (kb - kg) * d * ld, ld, ds, ld, false);
        for (int64_t i = 0; i < nq; ++i) {
          const int64_t row = bh * L + i0 + i;
          const V neg_lse(-lse[row]), d_i(D[row]);
          // Words of keys j0 .. j0 + 63 for this query row and the next kRows - 1.
          constexpr int64_t kRows = DropoutWords::kRows;
          if (dropout && i % kRows == 0) draw.rows(static_cast<uint64_t>(row), static_cast<uint64_t>(j0), words);
          const uint32_t* row_words = words + (i % kRows) * kBlock;
          for (int64_t t = 0; t < nvec; ++t) {
            T* s = sp + i * ld + t * W;
            T* dp = ds + i * ld + t * W;
            V p = vexp(rounded(V::loadu(s) * vscale) + neg_lse);  // rounded as in the forward's maximum
            V dpz = V::loadu(dp);
            if (dropout) {
              const V z = keep_scale<T>(row_words + t * W, threshold, inv_keep);
              dpz = dpz * z;
              (p * z).store(s);
            } else {
              p.store(s);
            }
            (p * (dpz - d_i) * vscale).store(dp);
          }
        }
        const bool acc = i0 > 0;
        gemm<T>(nk, d, nq, sp, 1, ld, g + i0 * dO.sl, dO.sl, dv + j0 * ldo, ldo, acc);  // dV += (P Z)^T dO
        gemm<T>(nk, d, nq, ds, 1, ld, q + i0 * Q.sl, Q.sl, dk + j0 * ldo, ldo, acc);    // dK += scale dS^T Q
        gemm<T>(nq, d, nk, ds, ld, 1, k + j0 * K.sl, K.sl, dq + i0 * ldo, ldo, true);   // dQ += scale dS K
      }
    }
  }
}

}  // namespace

// ---------------------------------------------------------------- ops

std::tuple<Tensor, Tensor> intra_sample_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                                          double scale, double dropout_p, const Tensor& rng_state) {
  const AttentionInputs in =
      check_attention("intra_sample_attention_forward", kCpuKernel, q, k, v, scale, dropout_p, rng_state);
  const AttentionProblem& pb = in.pb;
  const Dropout& drop = pb.dropout;
  const int64_t B = pb.B, L = pb.L, H = pb.H, d = pb.d;
  Tensor out = at::empty({B, L, H, d}, q.options());
  Tensor lse = at::empty({B, H, L}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "intra_sample_attention_forward", [&] {
    const Heads<scalar_t> Q = heads_view<scalar_t>(in.q), K = heads_view<scalar_t>(in.k);
    const Heads<scalar_t> Vh = heads_view<scalar_t>(in.v);
    scalar_t* po = out.data_ptr<scalar_t>();
    scalar_t* pl = lse.data_ptr<scalar_t>();
    const int64_t nqb = blocks(L);
    const int64_t ws_size = 2 * d * kBlock + kBlock * kBlock + 3 * kBlock;
    at::parallel_for(0, B * H * nqb, 1, [&](int64_t t0, int64_t t1) {
      std::vector<scalar_t> ws(ws_size);
      std::vector<uint32_t> words(DropoutWords::kColumnLen * DropoutWords::kColumnRows);
      const DropoutWords draw(drop.seed, drop.offset, static_cast<uint64_t>(L));
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t bh = t / nqb, i0 = (t % nqb) * kBlock;
        forward_block<scalar_t>(Q, K, Vh, bh / H, bh % H, H, L, d, i0, std::min(kBlock, L - i0),
                                static_cast<scalar_t>(scale), drop, draw, po, pl, ws.data(), words.data());
      }
    });
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> intra_sample_attention_backward(const Tensor& grad_out, const Tensor& q,
                                                                   const Tensor& k, const Tensor& v, const Tensor& out,
                                                                   const Tensor& lse, double scale, double dropout_p,
                                                                   const Tensor& rng_state) {
  const AttentionBackwardInputs in =
      check_attention_backward("intra_sample_attention_backward", kCpuKernel, LseLayout::kBHL, grad_out, q, k, v, out,
                               lse, scale, dropout_p, rng_state);
  const AttentionProblem& pb = in.pb;
  const Dropout& drop = pb.dropout;
  const int64_t B = pb.B, L = pb.L, H = pb.H, d = pb.d;
  const auto opts = q.options();
  Tensor grad_k = at::empty({B, L, H, d}, opts), grad_v = at::empty({B, L, H, d}, opts);
  const int64_t nkb = blocks(L);
  BackwardShape sh{B, L, H, d, 1, nkb};
  if (B * H > 0) {
    sh.chunks = std::min(nkb, (kMinBackwardTasks + B * H - 1) / (B * H));
    sh.chunk_len = (nkb + sh.chunks - 1) / sh.chunks;
    sh.chunks = (nkb + sh.chunk_len - 1) / sh.chunk_len;
  }
  // Chunk 0 accumulates dQ into grad_q itself, chunk c > 0 into partials[c - 1].
  Tensor grad_q = at::zeros({B, L, H, d}, opts);
  Tensor partials = at::zeros({sh.chunks - 1, B, L, H, d}, opts);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "intra_sample_attention_backward", [&] {
    const Heads<scalar_t> Q = heads_view<scalar_t>(in.q), K = heads_view<scalar_t>(in.k);
    const Heads<scalar_t> Vh = heads_view<scalar_t>(in.v), dO = heads_view<scalar_t>(in.grad_out);
    const Heads<scalar_t> O = heads_view<scalar_t>(in.out);
    Tensor D = at::empty({B, H, L}, opts);
    row_dots(dO, O, B, H, L, d, D.data_ptr<scalar_t>());
    const scalar_t* pd = D.data_ptr<scalar_t>();
    const scalar_t* pl = in.lse.data_ptr<scalar_t>();
    scalar_t* pq = grad_q.data_ptr<scalar_t>();
    scalar_t* pp = partials.data_ptr<scalar_t>();
    scalar_t* pk = grad_k.data_ptr<scalar_t>();
    scalar_t* pv = grad_v.data_ptr<scalar_t>();
    const int64_t ws_size = 2 * kGroup * d * kBlock + 2 * kBlock * kBlock;
    at::parallel_for(0, B * H * sh.chunks, 1, [&](int64_t t0, int64_t t1) {
      std::vector<scalar_t> ws(ws_size);
      std::vector<uint32_t> words(DropoutWords::kRows * kBlock);
      const DropoutWords draw(drop.seed, drop.offset, static_cast<uint64_t>(L));
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t bh = t / sh.chunks, c = t % sh.chunks, b = bh / H, h = bh % H;
        const int64_t head = (b * L * H + h) * d;  // offset of row 0 of head (b, h) in [B, L, H, d]
        const int64_t kb0 = c * sh.chunk_len, kb1 = std::min(nkb, kb0 + sh.chunk_len);
        scalar_t* dq = (c == 0 ? pq : pp + (c - 1) * B * L * H * d) + head;
        backward_chunk<scalar_t>(Q, K, Vh, dO, pl, pd, b, h, kb0, kb1, sh, static_cast<scalar_t>(scale), drop, draw,
                                 dq, pk + head, pv + head, ws.data(), words.data());
      }
    });
  });
  for (int64_t c = 1; c < sh.chunks; ++c) grad_q.add_(partials[c - 1]);
  return {grad_q, grad_k, grad_v};
}

}  // namespace CPU_CAPABILITY

CAML_OPS_REGISTER_CPU_FORWARD_BACKWARD(intra_sample_attention)

}  // namespace caml_ops
