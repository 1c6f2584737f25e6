// Backward of the CPU attention kernels (see attention.cpp), from lse (P is recomputed,
// never stored), with delta_i = rowsum(dO_i O_i) - grad_lse_i:
//   P = exp(scale q k^T - lse), dV = P^T dO, dP = dO V^T, dS = P (dP - delta),
//   dQ = scale dS K, dK = scale dS^T Q.
#include <utility>
#include <vector>

#include "attention.h"

namespace genkern::attn {
namespace {

// p <- exp(p - lse), ds <- p (ds - delta): P and dS from the scores and dP.
template <typename T>
void row_p_ds(T* p, T* ds, int64_t n, T lse, T delta) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    T e = exp_(p[c] - lse);
    p[c] = e;
    ds[c] = e * (ds[c] - delta);
  }
}

// One tile: the query block qb of head h against the key block kb. Recomputes P and dS
// in p and ds (bq x bk) and adds the tile's share to dK/dV and/or dQ.
template <typename T>
void bwd_tile(const Problem<T>& P, const Grads<T>& g, const Block& qb, int64_t h, const Block& kb, T* p, T* ds,
              bool want_dkdv, bool want_dq) {
  const int64_t D = P.D, kvh = h / P.G, b = qb.b, i0 = qb.i0, bq = qb.n, j0 = kb.i0, bk = kb.n;
  const T* q = P.q.row(b, h, i0);
  const T* k = P.k.row(b, kvh, j0);
  const T* dout = g.dout.row(b, h, i0);
  gemm_abt<T>(bq, bk, D, P.scale, q, P.q.sl, k, P.k.sl, T(0), p, bk);
  gemm_abt<T>(bq, bk, D, T(1), dout, g.dout.sl, P.v.row(b, kvh, j0), P.v.sl, T(0), ds, bk);
  const T* lse = g.lse + (b * P.H + h) * P.T + i0;
  const T* delta = g.delta + (b * P.H + h) * P.T + i0;
  for (int64_t r = 0; r < bq; ++r) {
    T* pr = p + r * bk;
    T* dsr = ds + r * bk;
    const int64_t lo = std::clamp<int64_t>(P.row_lo(b, i0 + r) - j0, 0, bk);
    const int64_t hi = std::clamp<int64_t>(P.row_hi(b, i0 + r) - j0, lo, bk);
    row_p_ds(pr + lo, dsr + lo, hi - lo, lse[r], delta[r]);
    std::fill(pr, pr + lo, T(0)), std::fill(dsr, dsr + lo, T(0));
    std::fill(pr + hi, pr + bk, T(0)), std::fill(dsr + hi, dsr + bk, T(0));
  }
  if (want_dkdv) {
    gemm_atb<T>(bk, D, bq, T(1), p, bk, dout, g.dout.sl, T(1), g.dv.row(b, kvh, j0), g.dv.sl);
    gemm_atb<T>(bk, D, bq, P.scale, ds, bk, q, P.q.sl, T(1), g.dk.row(b, kvh, j0), g.dk.sl);
  }
  if (want_dq) masked_ab<T>(P, P.k, b, kvh, i0, bq, j0, bk, P.scale, ds, T(1), g.dq.row(b, h, i0), g.dq.sl);
}

bool sees(const Block& qb, const Block& kb) { return qb.lo < kb.hi && kb.lo < qb.hi; }

// dK/dV of the key blocks [kb0, kb1) of kv head kvh, over every query of its group that
// sees them (only its own sequence's query blocks can); with want_dq also those queries'
// dQ (the caller owns the whole group then).
template <typename T>
void dkdv_blocks(const Problem<T>& P, const Grads<T>& g, const Tiling& tq, const Tiling& tk, int64_t kvh, int64_t kb0,
                 int64_t kb1, bool want_dq, T* p, T* ds) {
  for (int64_t x = kb0; x < kb1; ++x) {
    const Block& kb = tk.blk[x];
    for (int64_t h = kvh * P.G; h < (kvh + 1) * P.G; ++h)
      for (int64_t y = tq.first[kb.seq]; y < tq.first[kb.seq + 1]; ++y)
        if (sees(tq.blk[y], kb)) bwd_tile(P, g, tq.blk[y], h, kb, p, ds, true, want_dq);
  }
}

}  // namespace

template <typename T>
void bwd_kernel(const Problem<T>& P, const Grads<T>& g) {
  const Tiling tq = tile_queries(P, kBwdBq), tk = tile_keys(P, kBwdBk);
  const int64_t nkb = int64_t(tk.blk.size()), nqb = int64_t(tq.blk.size()), groups = P.B * P.Hkv;
  // (batch, kv head) tasks all cost the same: they balance when they divide evenly
  // over the threads or are plentiful.
  const int64_t nt = at::get_num_threads();
  const bool fused = groups % nt == 0 || groups >= 4 * nt;
  auto buffers = [] { return std::make_pair(std::vector<T>(kBwdBq * kBwdBk), std::vector<T>(kBwdBq * kBwdBk)); };
  if (fused) {  // task (b, kvh): the key blocks of sequence b (all of them when packed)
    at::parallel_for(0, groups, 1, [&](int64_t u0, int64_t u1) {
      auto [p, ds] = buffers();
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t b = u / P.Hkv, s0 = P.cu_q ? 0 : b, s1 = P.cu_q ? P.nseq : b + 1;
        dkdv_blocks(P, g, tq, tk, u % P.Hkv, tk.first[s0], tk.first[s1], true, p.data(), ds.data());
      }
    });
    return;
  }
  at::parallel_for(0, P.Hkv * nkb, 1, [&](int64_t u0, int64_t u1) {
    auto [p, ds] = buffers();
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t x = zigzag(u % nkb, nkb);
      dkdv_blocks(P, g, tq, tk, u / nkb, x, x + 1, false, p.data(), ds.data());
    }
  });
  at::parallel_for(0, P.H * nqb, 1, [&](int64_t u0, int64_t u1) {
    auto [p, ds] = buffers();
    for (int64_t u = u0; u < u1; ++u) {
      const Block& qb = tq.blk[zigzag(u % nqb, nqb)];
      for (int64_t x = tk.first[qb.seq]; x < tk.first[qb.seq + 1]; ++x)
        if (sees(qb, tk.blk[x])) bwd_tile(P, g, qb, u / nqb, tk.blk[x], p.data(), ds.data(), false, true);
    }
  });
}

template <typename T>
void delta_kernel(const Problem<T>& P, const Mat<const T>& dout, const Mat<const T>& out, const float* grad_lse,
                  T* delta) {
  at::parallel_for(0, P.B * P.H * P.T, 2048, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r % P.T, bh = r / P.T;
      const T* a = dout.row(bh / P.H, bh % P.H, i);
      const T* o = out.row(bh / P.H, bh % P.H, i);
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < P.D; ++d) acc += a[d] * o[d];
      delta[r] = acc - (grad_lse ? static_cast<T>(grad_lse[r]) : T(0));
    }
  });
}

template void bwd_kernel<float>(const Problem<float>&, const Grads<float>&);
template void bwd_kernel<double>(const Problem<double>&, const Grads<double>&);
template void delta_kernel<float>(const Problem<float>&, const Mat<const float>&, const Mat<const float>&, const float*,
                                  float*);
template void delta_kernel<double>(const Problem<double>&, const Mat<const double>&, const Mat<const double>&,
                                   const float*, double*);

}  // namespace genkern::attn
