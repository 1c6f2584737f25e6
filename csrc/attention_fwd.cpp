// Forward of the CPU attention kernels (see attention.cpp), per (batch, head, query
// block): walk the visible key blocks keeping a running row max m, a running row sum l and
// an output accumulator rescaled by exp(m_old - m_new) whenever m grows; lse = m + log l,
// out = acc / l.
#include <vector>

#include "attention.h"

namespace genkern::attn {
namespace {

// s <- exp(s - m); returns the sum.
template <typename T>
T row_exp_sum(T* s, int64_t n, T m) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) {
    T e = exp_(s[c] - m);
    s[c] = e;
    sum += e;
  }
  return sum;
}

// Queries [i0, i0 + bq) of head h: out rows into o (ld D) and lse. With o == nullptr only
// lse (the backward's float64 lse, see run_bwd).
template <typename T, typename L>
void fwd_block(const Problem<T>& P, int64_t b, int64_t h, int64_t i0, int64_t bq, T* o, L* lse, T* s, T* m, T* l) {
  const int64_t D = P.D, kvh = h / P.G;
  const T* q = P.q.row(b, h, i0);
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t kend = P.key_end(i0 + bq - 1);
  for (int64_t r = 0; r < bq; ++r) m[r] = ninf, l[r] = 0;
  for (int64_t j0 = 0; j0 < kend; j0 += kFwdBk) {
    const int64_t bk = std::min(kFwdBk, kend - j0);
    gemm_abt<T>(bq, bk, D, P.scale, q, P.q.sl, P.k.row(b, kvh, j0), P.k.sl, T(0), s, bk);
    for (int64_t r = 0; r < bq; ++r) {
      T* sr = s + r * bk;
      const int64_t lim = std::clamp<int64_t>(P.key_end(i0 + r) - j0, 0, bk);
      const T mx = row_max(sr, lim);
      const T mnew = mx > m[r] ? mx : m[r];
      const T sum = lim > 0 ? row_exp_sum(sr, lim, mnew) : T(0);
      for (int64_t c = lim; c < bk; ++c) sr[c] = 0;
      // A row that saw no key yet keeps m = -inf (and an all-zero accumulator): no
      // rescale, which would compute exp(-inf + inf).
      if (mnew != m[r]) {
        const T alpha = exp_(m[r] - mnew);
        l[r] *= alpha;
        if (o != nullptr && j0 > 0) {  // the accumulator holds sums against the old max
          T* orow = o + r * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) orow[d] *= alpha;
        }
      }
      l[r] += sum;
      m[r] = mnew;
    }
    if (o != nullptr) masked_ab<T>(P, P.v, b, kvh, i0, bq, j0, bk, T(1), s, T(j0 > 0 ? 1 : 0), o);
  }
  for (int64_t r = 0; r < bq; ++r) {
    const bool empty = l[r] == T(0);  // the row sees no key (a NaN in l propagates instead)
    lse[r] = empty ? -std::numeric_limits<L>::infinity() : static_cast<L>(m[r] + std::log(l[r]));
    if (o == nullptr) continue;
    T* orow = o + r * D;
    const T inv = T(1) / l[r];
    if (empty) std::fill(orow, orow + D, T(0));  // unwritten when no key block was visible
    else {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) orow[d] *= inv;
    }
  }
}

// Query rows per forward task: the largest of 256, 128, .. 32 that still gives every
// thread several tasks, so that the causal blocks' unequal costs even out.
int64_t fwd_rows(int64_t BH, int64_t T) {
  int64_t bq = kFwdBq;
  while (bq > 32 && BH * ceil_div(T, bq) < 4 * at::get_num_threads()) bq /= 2;
  return bq;
}

}  // namespace

template <typename T, typename L>
void fwd_kernel(const Problem<T>& P, T* out, L* lse) {
  const int64_t rows = fwd_rows(P.B * P.H, P.T), nqb = ceil_div(P.T, rows);
  at::parallel_for(0, P.B * P.H * nqb, 1, [&](int64_t u0, int64_t u1) {
    std::vector<T> s(rows * kFwdBk), m(rows), l(rows);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t bh = u / nqb, i0 = zigzag(u % nqb, nqb) * rows;
      const int64_t b = bh / P.H, h = bh % P.H, bq = std::min(rows, P.T - i0);
      T* o = out != nullptr ? out + (bh * P.T + i0) * P.D : nullptr;
      fwd_block(P, b, h, i0, bq, o, lse + bh * P.T + i0, s.data(), m.data(), l.data());
    }
  });
}

template void fwd_kernel<float, float>(const Problem<float>&, float*, float*);
template void fwd_kernel<double, float>(const Problem<double>&, double*, float*);
template void fwd_kernel<double, double>(const Problem<double>&, double*, double*);  // the backward's lse

}  // namespace genkern::attn
