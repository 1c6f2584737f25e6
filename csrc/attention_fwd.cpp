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

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
// The float32 form on AVX2: every s - m is <= 0 or NaN (m is at least the row's max, which
// row_max takes skipping NaN), so exp(s - m) is exp(-|s - m|), whose 8-lane form has none of
// exp_f32's overflow selects (GCC makes them four blends a vector, a third of the loop).
inline float row_exp_sum(float* s, int64_t n, float m) {
  const __m256 vm = _mm256_set1_ps(m);
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    const __m256 e0 = exp_neg_abs_v8(_mm256_sub_ps(_mm256_loadu_ps(s + c), vm));
    const __m256 e1 = exp_neg_abs_v8(_mm256_sub_ps(_mm256_loadu_ps(s + c + 8), vm));
    _mm256_storeu_ps(s + c, e0);
    _mm256_storeu_ps(s + c + 8, e1);
    a0 = _mm256_add_ps(a0, e0);
    a1 = _mm256_add_ps(a1, e1);
  }
  for (; c < n; c += 8) {  // a masked lane reads 0: exp(-|0 - m|), dropped from the sum
    const __m256i k = lanes8(n - c);
    const __m256 e = exp_neg_abs_v8(_mm256_sub_ps(_mm256_maskload_ps(s + c, k), vm));
    _mm256_maskstore_ps(s + c, k, e);
    a0 = _mm256_add_ps(a0, _mm256_and_ps(e, _mm256_castsi256_ps(k)));
  }
  return hsum8(_mm256_add_ps(a0, a1));
}
#endif

// Where the visible columns of a key block differ from row to row (the causal diagonal, a
// window's edges), the query block is multiplied in parts of kFwdPart rows, each over the hull
// of its rows' columns only: on the causal diagonal of a 256-row block that skips 3/4 of the
// masked triangle, which the whole tile would multiply and then zero.
constexpr int64_t kFwdPart = 64;

struct Part {
  int64_t r0, n, c0, c1;  // rows [r0, r0 + n) of the block; columns [c0, c1) of the key block (c0 >= c1: none)
};

// The parts of a bq-row block for the key block [j0, j0 + bk); false when they would save less
// than a tenth of the tile's products (then the tile is multiplied whole).
template <typename T>
bool split_parts(const Problem<T>& P, int64_t b, int64_t i0, int64_t bq, int64_t j0, int64_t bk,
                 std::vector<Part>& parts) {
  parts.clear();
  int64_t cost = 0;
  for (int64_t r0 = 0; r0 < bq; r0 += kFwdPart) {
    Part p{r0, std::min(kFwdPart, bq - r0), bk, 0};
    for (int64_t r = r0; r < r0 + p.n; ++r) {
      const int64_t lo = std::clamp<int64_t>(P.row_lo(b, i0 + r) - j0, 0, bk);
      const int64_t hi = std::clamp<int64_t>(P.row_hi(b, i0 + r) - j0, 0, bk);
      if (lo < hi) p.c0 = std::min(p.c0, lo), p.c1 = std::max(p.c1, hi);
    }
    cost += p.n * std::max<int64_t>(p.c1 - p.c0, 0);
    parts.push_back(p);
  }
  return cost * 10 < bq * bk * 9;
}

// The query block k of head h: out rows into o (ld ldo) and lse. With o == nullptr only
// lse (the backward's float64 lse, see run_bwd). Key blocks run over the hull of the
// rows' spans only; each row takes the part of its span in a block.
template <typename T, typename L>
void fwd_block(const Problem<T>& P, const Block& k, int64_t h, T* o, int64_t ldo, L* lse, T* s, T* m, T* l,
               std::vector<Part>& parts) {
  const int64_t D = P.D, kvh = h / P.G, b = k.b, i0 = k.i0, bq = k.n;
  const T* q = P.q.row(b, h, i0);
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < bq; ++r) m[r] = ninf, l[r] = 0;
  for (int64_t j0 = k.lo; j0 < k.hi; j0 += kFwdBk) {
    const int64_t bk = std::min(kFwdBk, k.hi - j0);
    const bool split = split_parts(P, b, i0, bq, j0, bk, parts);
    if (!split) gemm_abt<T>(bq, bk, D, P.scale, q, P.q.sl, P.k.row(b, kvh, j0), P.k.sl, T(0), s, bk);
    else  // the columns no part writes lie outside every row's span: the pass below zeroes them
      for (const Part& p : parts)
        if (p.c1 > p.c0)
          gemm_abt<T>(p.n, p.c1 - p.c0, D, P.scale, q + p.r0 * P.q.sl, P.q.sl, P.k.row(b, kvh, j0 + p.c0), P.k.sl, T(0),
                      s + p.r0 * bk + p.c0, bk);
    for (int64_t r = 0; r < bq; ++r) {
      T* sr = s + r * bk;
      const int64_t lo = std::clamp<int64_t>(P.row_lo(b, i0 + r) - j0, 0, bk);
      const int64_t hi = std::clamp<int64_t>(P.row_hi(b, i0 + r) - j0, lo, bk);
      const T mx = row_max(sr + lo, hi - lo);
      const T mnew = mx > m[r] ? mx : m[r];
      const T sum = hi > lo ? row_exp_sum(sr + lo, hi - lo, mnew) : T(0);
      std::fill(sr, sr + lo, T(0));
      std::fill(sr + hi, sr + bk, T(0));
      // A row that saw no key yet keeps m = -inf (and an all-zero accumulator): no
      // rescale, which would compute exp(-inf + inf).
      if (mnew != m[r]) {
        const T alpha = exp_(m[r] - mnew);
        l[r] *= alpha;
        if (o != nullptr && j0 > k.lo) {  // the accumulator holds sums against the old max
          T* orow = o + r * ldo;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) orow[d] *= alpha;
        }
      }
      l[r] += sum;
      m[r] = mnew;
    }
    if (o == nullptr) continue;
    const T beta = T(j0 > k.lo ? 1 : 0);
    if (!split) masked_ab<T>(P, P.v, b, kvh, i0, bq, j0, bk, T(1), s, beta, o, ldo);
    else
      for (const Part& p : parts) {
        T* op = o + p.r0 * ldo;
        if (p.c1 > p.c0)
          masked_ab<T>(P, P.v, b, kvh, i0 + p.r0, p.n, j0 + p.c0, p.c1 - p.c0, T(1), s + p.r0 * bk + p.c0, beta, op,
                       ldo, bk);
        else if (beta == T(0))  // rows that see no key here yet: the accumulator starts at zero
          for (int64_t r = 0; r < p.n; ++r) std::fill(op + r * ldo, op + r * ldo + D, T(0));
      }
  }
  for (int64_t r = 0; r < bq; ++r) {
    const bool empty = l[r] == T(0);  // the row sees no key (a NaN in l propagates instead)
    lse[r] = empty ? -std::numeric_limits<L>::infinity() : static_cast<L>(m[r] + std::log(l[r]));
    if (o == nullptr) continue;
    T* orow = o + r * ldo;
    const T inv = T(1) / l[r];
    if (empty) std::fill(orow, orow + D, T(0));  // unwritten when no key block was visible
    else {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) orow[d] *= inv;
    }
  }
}

}  // namespace

template <typename T, typename L>
void fwd_kernel(const Problem<T>& P, const Mat<T>& out, L* lse) {
  const int64_t rows = fwd_rows(P);
  const Tiling tq = tile_queries(P, rows);
  const int64_t nqb = int64_t(tq.blk.size());
  at::parallel_for(0, P.H * nqb, 1, [&](int64_t u0, int64_t u1) {
    std::vector<T> s(rows * kFwdBk), m(rows), l(rows);
    std::vector<Part> parts;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t h = u / nqb;
      const Block& k = tq.blk[zigzag(u % nqb, nqb)];
      T* o = out.p != nullptr ? out.row(k.b, h, k.i0) : nullptr;
      fwd_block(P, k, h, o, out.sl, lse + (k.b * P.H + h) * P.T + k.i0, s.data(), m.data(), l.data(), parts);
    }
  });
}

template void fwd_kernel<float, float>(const Problem<float>&, const Mat<float>&, float*);
template void fwd_kernel<double, float>(const Problem<double>&, const Mat<double>&, float*);
template void fwd_kernel<double, double>(const Problem<double>&, const Mat<double>&, double*);  // the backward's lse

}  // namespace genkern::attn
