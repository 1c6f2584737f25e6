// Forward of the bfloat16/float16 attention on the matrix instructions (see
// attention_lowp.h): the online softmax of attention_fwd.cpp in float32, S = Q K^T and
// acc += P V as brgemm products over 64-key panels, P rounded to the input dtype.
#include <ATen/native/CPUBlas.h>

#include <cstring>
#include <vector>

#include "attention_lowp.h"

namespace genkern::attn::lowp {
namespace {

using at::native::cpublas::brgemm;

template <typename T>
struct FwdTile {
  const Problem<float>& P;
  const Packed<T>& kp;  // K, T-packed
  const Packed<T>& vp;  // V, N-packed
  const Mat<const T>& v;
  float *s, *acc, *m, *l;  // s: (bq, kFwdBk) scores; acc: (bq, Dp)
  T* p;                    // (bq, kFwdBk): P in the input dtype
};

// Row r of a tile over keys [j0, j0 + bkp): P = exp(scale s - m_new) rounded into pr (zero
// outside the row's span), the running max/sum updated and acc rescaled when m grows. One
// pass for the max of the raw scores (scale s is monotone in s), one for exp and rounding.
template <typename T>
void softmax_row(const FwdTile<T>& w, int64_t r, int64_t lo, int64_t hi, int64_t bkp, bool first) {
  const float* sr = w.s + r * bkp;
  T* pr = w.p + r * bkp;
  const float scale = w.P.scale;
  float mx = -std::numeric_limits<float>::infinity(), mn = std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx) reduction(min : mn)
  for (int64_t c = lo; c < hi; ++c) {
    mx = sr[c] > mx ? sr[c] : mx;
    mn = sr[c] < mn ? sr[c] : mn;
  }
  const float top = hi <= lo ? mx : (scale >= 0 ? mx : mn) * scale;
  const float mnew = top > w.m[r] ? top : w.m[r];
  float sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = lo; c < hi; ++c) {
    const float e = exp_(sr[c] * scale - mnew);
    sum += e;
    put(pr, c, e);
  }
  std::fill(pr, pr + lo, T(0));
  std::fill(pr + hi, pr + bkp, T(0));
  if (mnew != w.m[r]) {  // a row that saw no key yet keeps m = -inf: no exp(-inf + inf)
    const float alpha = exp_(w.m[r] - mnew);
    w.l[r] *= alpha;
    if (!first) {
      float* ar = w.acc + r * w.vp.Dp;
#pragma omp simd
      for (int64_t d = 0; d < w.vp.Dp; ++d) ar[d] *= alpha;
    }
  }
  w.l[r] += sum;
  w.m[r] = mnew;
}

// acc (+)= P V over keys [j0, j0 + bkp). A key some row does not see may hold inf or NaN
// (0 * inf is NaN): where such a key sits in a panel with a non-finite value, each row adds
// its own span's keys instead of the product.
template <typename T>
void pv_product(const FwdTile<T>& w, const Block& qb, int64_t kvh, int64_t j0, int64_t bk, int64_t bkp, bool first) {
  const int64_t b = qb.b, bq = qb.n, Dp = w.vp.Dp, D = w.P.D;
  bool finite = true, all_see = true;
  for (int64_t c = j0 / kPanel; c < (j0 + bkp) / kPanel; ++c) finite = finite && w.vp.panel_finite(b, kvh, c);
  for (int64_t r = 0; r < bq && !finite; ++r)
    all_see = all_see && w.P.row_lo(b, qb.i0 + r) <= j0 && w.P.row_hi(b, qb.i0 + r) >= j0 + bkp;
  if (finite || all_see) {
    for (int64_t dc = 0; dc < Dp / kPanel; ++dc)
      brgemm(bq, kPanel, bkp, bkp, kPanel, Dp, !first, w.p, w.vp.npanel(b, kvh, dc, j0), w.acc + dc * kPanel, true);
    return;
  }
  for (int64_t r = 0; r < bq; ++r) {
    float* ar = w.acc + r * Dp;
    if (first) std::fill(ar, ar + Dp, 0.f);
    const int64_t lo = std::clamp<int64_t>(w.P.row_lo(b, qb.i0 + r) - j0, 0, bk);
    const int64_t hi = std::clamp<int64_t>(w.P.row_hi(b, qb.i0 + r) - j0, lo, bk);
    for (int64_t j = lo; j < hi; ++j) {
      const float pj = static_cast<float>(w.p[r * bkp + j]);
      const T* x = w.v.row(b, kvh, j0 + j);
      for (int64_t d = 0; d < D; ++d) ar[d] += pj * static_cast<float>(x[d]);
    }
  }
}

// The query block qb of head h: walks the 64-aligned key blocks of the hull of its spans.
template <typename T>
void fwd_block(const FwdTile<T>& w, const Block& qb, int64_t h, const Mat<const T>& q, const Mat<T>& out, float* lse) {
  const Problem<float>& P = w.P;
  const int64_t b = qb.b, bq = qb.n, kvh = h / P.G, D = P.D;
  for (int64_t r = 0; r < bq; ++r) w.m[r] = -std::numeric_limits<float>::infinity(), w.l[r] = 0;
  bool first = true;
  for (int64_t j0 = qb.lo / kPanel * kPanel; j0 < qb.hi; j0 += kFwdBk, first = false) {
    const int64_t bk = std::min(kFwdBk, qb.hi - j0), bkp = ceil_div(bk, kPanel) * kPanel;
    for (int64_t c = 0; c < bkp / kPanel; ++c)
      brgemm(bq, kPanel, D, q.sl, kPanel, bkp, false, q.row(b, h, qb.i0), w.kp.tpanel(b, kvh, j0 / kPanel + c),
             w.s + c * kPanel, true);
    for (int64_t r = 0; r < bq; ++r) {
      const int64_t lo = std::clamp<int64_t>(P.row_lo(b, qb.i0 + r) - j0, 0, bk);
      softmax_row(w, r, lo, std::clamp<int64_t>(P.row_hi(b, qb.i0 + r) - j0, lo, bk), bkp, first);
    }
    pv_product(w, qb, kvh, j0, bk, bkp, first);
  }
  for (int64_t r = 0; r < bq; ++r) {
    const bool empty = w.l[r] == 0.f;  // the row sees no key (a NaN in l propagates instead)
    lse[r] = empty ? -std::numeric_limits<float>::infinity() : w.m[r] + std::log(w.l[r]);
    T* orow = out.row(b, h, qb.i0 + r);
    const float inv = 1.f / w.l[r];
    const float* ar = w.acc + r * w.vp.Dp;
    for (int64_t d = 0; d < D; ++d) orow[d] = empty ? T(0) : static_cast<T>(ar[d] * inv);
  }
}

}  // namespace

template <typename T>
void fwd_kernel(const Problem<float>& P, const Mat<const T>& q, const Mat<const T>& k, const Mat<const T>& v,
                const Mat<T>& out, float* lse) {
  const Packed<T> kp = pack_rows(k, P.B, P.Hkv, P.S, P.D, true, false);
  const Packed<T> vp = pack_rows(v, P.B, P.Hkv, P.S, P.D, false, true);
  const int64_t rows = fwd_rows(P);
  const Tiling tq = tile_queries(P, rows);
  const int64_t nqb = int64_t(tq.blk.size());
  at::parallel_for(0, P.H * nqb, 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> s(rows * kFwdBk), acc(rows * vp.Dp), m(rows), l(rows);
    std::vector<T> p(rows * kFwdBk);
    const FwdTile<T> w{P, kp, vp, v, s.data(), acc.data(), m.data(), l.data(), p.data()};
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t h = u / nqb;
      const Block& qb = tq.blk[zigzag(u % nqb, nqb)];
      fwd_block(w, qb, h, q, out, lse + (qb.b * P.H + h) * P.T + qb.i0);
    }
    at::native::cpublas::brgemm_release(true);
  });
}

template void fwd_kernel<at::BFloat16>(const Problem<float>&, const Mat<const at::BFloat16>&,
                                       const Mat<const at::BFloat16>&, const Mat<const at::BFloat16>&,
                                       const Mat<at::BFloat16>&, float*);
template void fwd_kernel<at::Half>(const Problem<float>&, const Mat<const at::Half>&, const Mat<const at::Half>&,
                                   const Mat<const at::Half>&, const Mat<at::Half>&, float*);

}  // namespace genkern::attn::lowp
