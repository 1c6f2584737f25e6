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

// One tile: queries [i0, i0 + bq) of head h against keys [j0, j0 + bk). Recomputes P and
// dS in p and ds (bq x bk) and adds the tile's share to dK/dV and/or dQ.
template <typename T>
void bwd_tile(const Problem<T>& P, const Grads<T>& g, int64_t b, int64_t h, int64_t i0, int64_t bq, int64_t j0,
              int64_t bk, T* p, T* ds, bool want_dkdv, bool want_dq) {
  const int64_t D = P.D, kvh = h / P.G, bh = b * P.H + h, bkv = b * P.Hkv + kvh;
  const T* q = P.q.row(b, h, i0);
  const T* k = P.k.row(b, kvh, j0);
  const T* dout = g.dout.row(b, h, i0);
  gemm_abt<T>(bq, bk, D, P.scale, q, P.q.sl, k, P.k.sl, T(0), p, bk);
  gemm_abt<T>(bq, bk, D, T(1), dout, g.dout.sl, P.v.row(b, kvh, j0), P.v.sl, T(0), ds, bk);
  const T* lse = g.lse + bh * P.T + i0;
  const T* delta = g.delta + bh * P.T + i0;
  for (int64_t r = 0; r < bq; ++r) {
    T* pr = p + r * bk;
    T* dsr = ds + r * bk;
    const int64_t lim = std::clamp<int64_t>(P.key_end(i0 + r) - j0, 0, bk);
    const T lr = lse[r], dr = delta[r];
    row_p_ds(pr, dsr, lim, lr, dr);
    for (int64_t c = lim; c < bk; ++c) pr[c] = 0, dsr[c] = 0;
  }
  if (want_dkdv) {
    gemm_atb<T>(bk, D, bq, T(1), p, bk, dout, g.dout.sl, T(1), g.dv + (bkv * P.S + j0) * D, D);
    gemm_atb<T>(bk, D, bq, P.scale, ds, bk, q, P.q.sl, T(1), g.dk + (bkv * P.S + j0) * D, D);
  }
  if (want_dq) masked_ab<T>(P, P.k, b, kvh, i0, bq, j0, bk, P.scale, ds, T(1), g.dq + (bh * P.T + i0) * D);
}

// dK/dV of key blocks [jb0, jb1) of (b, kvh), over every query of its group; with
// want_dq also those queries' dQ (the caller owns the whole group then).
template <typename T>
void dkdv_blocks(const Problem<T>& P, const Grads<T>& g, int64_t b, int64_t kvh, int64_t jb0, int64_t jb1, bool want_dq,
                 T* p, T* ds) {
  for (int64_t jb = jb0; jb < jb1; ++jb) {
    const int64_t j0 = jb * kBwdBk, bk = std::min(kBwdBk, P.S - j0);
    for (int64_t h = kvh * P.G; h < (kvh + 1) * P.G; ++h)
      for (int64_t i0 = P.first_query(j0); i0 < P.T; i0 += kBwdBq)
        bwd_tile(P, g, b, h, i0, std::min(kBwdBq, P.T - i0), j0, bk, p, ds, true, want_dq);
  }
}

}  // namespace

template <typename T>
void bwd_kernel(const Problem<T>& P, const Grads<T>& g) {
  const int64_t nkb = ceil_div(P.S, kBwdBk), nqb = ceil_div(P.T, kBwdBq), groups = P.B * P.Hkv;
  // (batch, kv head) tasks all cost the same: they balance when they divide evenly
  // over the threads or are plentiful.
  const int64_t nt = at::get_num_threads();
  const bool fused = groups % nt == 0 || groups >= 4 * nt;
  auto buffers = [] { return std::make_pair(std::vector<T>(kBwdBq * kBwdBk), std::vector<T>(kBwdBq * kBwdBk)); };
  if (fused) {
    at::parallel_for(0, groups, 1, [&](int64_t u0, int64_t u1) {
      auto [p, ds] = buffers();
      for (int64_t u = u0; u < u1; ++u) dkdv_blocks(P, g, u / P.Hkv, u % P.Hkv, 0, nkb, true, p.data(), ds.data());
    });
    return;
  }
  at::parallel_for(0, groups * nkb, 1, [&](int64_t u0, int64_t u1) {
    auto [p, ds] = buffers();
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t bkv = u / nkb, jb = zigzag(u % nkb, nkb);
      dkdv_blocks(P, g, bkv / P.Hkv, bkv % P.Hkv, jb, jb + 1, false, p.data(), ds.data());
    }
  });
  at::parallel_for(0, P.B * P.H * nqb, 1, [&](int64_t u0, int64_t u1) {
    auto [p, ds] = buffers();
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t bh = u / nqb, i0 = zigzag(u % nqb, nqb) * kBwdBq, bq = std::min(kBwdBq, P.T - i0);
      const int64_t kend = P.key_end(i0 + bq - 1);
      for (int64_t j0 = 0; j0 < kend; j0 += kBwdBk)
        bwd_tile(P, g, bh / P.H, bh % P.H, i0, bq, j0, std::min(kBwdBk, kend - j0), p.data(), ds.data(), false, true);
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
