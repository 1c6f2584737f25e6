// Block primitives of the kv_decode CPU kernel (kv_decode.cpp): scores of a block of
// cache rows, P V, the online softmax of a block, and the prefetch of the rows to come.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common.h"

namespace genkern::kvd {

constexpr int64_t kBlk = 64;              // positions per softmax block: a tile's scores stay in L1
constexpr int64_t kMaxRows = 32;          // query rows per tile: Q and the accumulators stay in L1/L2
constexpr int64_t kMinChunk = 512;        // positions per chunk at least (see above)
constexpr int64_t kItemsPerThread = 4;    // split rows until there are this many items per thread
constexpr int64_t kSerialWork = 1 << 16;  // flops below which threads cost more than they save

// Rows of the stream still to come (the V rows of this block, the K rows of the next),
// prefetched into L2 a line at a time between the FMAs of the current block: issued in
// one burst they fill the line-fill buffers and stall the core instead of overlapping.
struct Ahead {
  const char* row[kBlk];
  int64_t n = 0, bytes = 0;  // rows and bytes per row
  GENKERN_INLINE void line(int64_t j, int64_t o) const {
    if (j < n && o < bytes) __builtin_prefetch(row[j] + o, 0, 2);
  }
  GENKERN_INLINE void whole(int64_t j) const {
    for (int64_t o = 0; o < bytes; o += 64) line(j, o);
  }
};

// --- block primitives ------------------------------------------------------------------
// S[rr * kBlk + j] = Q_rr . K_j for the nr query rows (stride Dp) and nb rows kr[j].
template <typename T>
void block_scores(const T* Q, int64_t nr, const T* const* kr, int64_t nb, int64_t D, int64_t Dp, T* S,
                  const Ahead& ahead) {
  for (int64_t j = 0; j < nb; ++j) ahead.whole(j);
  for (int64_t rr = 0; rr < nr; ++rr)
    for (int64_t j = 0; j < nb; ++j) {
      const T* __restrict__ q = Q + rr * Dp;
      const T* __restrict__ k = kr[j];
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < D; ++d) s += q[d] * k[d];
      S[rr * kBlk + j] = s;
    }
}

template <typename T>
GENKERN_INLINE void axpy(T p, const T* __restrict__ x, T* __restrict__ y, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) y[d] += p * x[d];
}

// acc_rr += sum_{from[rr] <= j < to[rr]} P[rr * kBlk + j] V_j: only the positions row rr sees,
// since a masked one may hold anything and 0 * inf or NaN is NaN.
template <typename T>
void block_pv(const T* P, int64_t nr, const T* const* vr, int64_t nb, const int64_t* from, const int64_t* to, int64_t D,
              int64_t Dp, T* acc, const Ahead& ahead) {
  for (int64_t j = 0; j < nb; ++j) {
    ahead.whole(j);
    for (int64_t rr = 0; rr < nr; ++rr)
      if (j >= from[rr] && j < to[rr]) axpy(P[rr * kBlk + j], vr[j], acc + rr * Dp, D);
  }
}

using genkern::row_max;  // the generic form; float32 below

#if defined(__AVX512F__)
// float32 forms. Scores are made 16 positions at a time, with each dot product kept as
// a vector and the 16 reduced together (3 shuffle-adds per score instead of ~10 for a
// horizontal sum each); in P V the accumulators stay in registers across the block.
GENKERN_INLINE __mmask16 lanes(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1u);
}

// GCC does not vectorise max reductions without -ffinite-math-only, and a scalar
// max chain costs more than the rest of the softmax.
GENKERN_INLINE float row_max(const float* s, int64_t n) {
  __m512 bm = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += 16)  // lanes past n (within the kBlk row) are masked out
    bm = _mm512_mask_max_ps(bm, lanes(n - j), bm, _mm512_loadu_ps(s + j));
  return _mm512_reduce_max_ps(bm);
}

// Lane t of the result is the sum of the lanes of a[t].
GENKERN_INLINE __m512 reduce16(const __m512* a) {
  __m512 b[8], c[4];
  for (int t = 0; t < 8; ++t)  // per 128-bit lane: (a2t, a2t+1, a2t, a2t+1) partials
    b[t] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * t], a[2 * t + 1]), _mm512_unpackhi_ps(a[2 * t], a[2 * t + 1]));
  for (int t = 0; t < 4; ++t) {  // per 128-bit lane: (a4t, .., a4t+3) partials
    __m512d x = _mm512_castps_pd(b[2 * t]), y = _mm512_castps_pd(b[2 * t + 1]);
    c[t] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  __m512 d0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x44), _mm512_shuffle_f32x4(c[0], c[1], 0xEE));
  __m512 d1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x44), _mm512_shuffle_f32x4(c[2], c[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, 0x88), _mm512_shuffle_f32x4(d0, d1, 0xDD));
}

template <>
inline void block_scores(const float* Q, int64_t nr, const float* const* kr, int64_t nb, int64_t D, int64_t Dp,
                         float* S, const Ahead& ahead) {
  for (int64_t j0 = 0; j0 < nb; j0 += 16) {
    const int64_t cnt = std::min<int64_t>(16, nb - j0);
    const float* r[16];
    for (int t = 0; t < 16; ++t) r[t] = kr[j0 + (t < cnt ? t : 0)];  // lanes past nb: any valid row, not stored
    for (int64_t rr = 0; rr < nr; ++rr) {
      __m512 a[16];
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t) a[t] = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16) {
        const __mmask16 m = lanes(D - d);
        const __m512 q = _mm512_maskz_loadu_ps(m, Q + rr * Dp + d);
        if (rr == 0)  // one line of each of 16 rows per 16 FMAs (float32 rows: all of them)
          for (int t = 0; t < 16; ++t) ahead.line(j0 + t, 4 * d);
#pragma GCC unroll 16
        for (int t = 0; t < 16; ++t) a[t] = _mm512_fmadd_ps(q, _mm512_maskz_loadu_ps(m, r[t] + d), a[t]);
      }
      _mm512_mask_storeu_ps(S + rr * kBlk + j0, lanes(cnt), reduce16(a));
    }
  }
}

template <>
inline void block_pv(const float* P, int64_t nr, const float* const* vr, int64_t nb, const int64_t* from,
                     const int64_t* to, int64_t D, int64_t Dp, float* acc, const Ahead& ahead) {
  for (int64_t d0 = 0; d0 < D; d0 += 64) {  // 64 columns (4 registers) of every row per pass
    __mmask16 m[4];
    __m512 a[4];
    for (int u = 0; u < 4; ++u) m[u] = lanes(D - d0 - 16 * u);
    for (int64_t rr = 0; rr < nr; ++rr) {
      float* y = acc + rr * Dp + d0;
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) a[u] = _mm512_maskz_loadu_ps(m[u], y + 16 * u);
      for (int64_t j = from[rr]; j < to[rr]; ++j) {
        if (rr == 0 && d0 == 0) ahead.whole(j);
        const __m512 w = _mm512_set1_ps(P[rr * kBlk + j]);
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) a[u] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m[u], vr[j] + d0 + 16 * u), a[u]);
      }
      if (rr == 0 && d0 == 0) {
        for (int64_t j = 0; j < std::min(from[0], to[0]); ++j) ahead.whole(j);
        for (int64_t j = std::max(from[0], to[0]); j < nb; ++j) ahead.whole(j);
      }
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) _mm512_mask_storeu_ps(y + 16 * u, m[u], a[u]);
    }
  }
}
#endif

// Online softmax of one query row over a block of nb scores, of which [from, to) are
// visible (the causal limit cuts a suffix, the window and key_lo a prefix). Turns the
// scores into weights exp(s - m_new) (0 where masked), updates the running max m and sum l
// and rescales the row's accumulator acc (D values) by exp(m_old - m_new).
template <typename T>
GENKERN_INLINE void softmax_block(T* __restrict__ s, int64_t nb, int64_t from, int64_t to, T& m, T& l,
                                  T* __restrict__ acc, int64_t D) {
  for (int64_t j = 0; j < from; ++j) s[j] = 0;
  for (int64_t j = std::max(from, to); j < nb; ++j) s[j] = 0;
  if (to <= from) return;
  s += from;
  const int64_t vis = to - from;
  const T bm = row_max(s, vis);
  const T mnew = bm > m ? bm : m;
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < vis; ++j) {
    T e = exp_(s[j] - mnew);
    s[j] = e;
    sum += e;
  }
  const T alpha = exp_(m - mnew);  // 0 while m = -inf: nothing accumulated yet
  l = l * alpha + sum;
  m = mnew;
  if (alpha != T(1)) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] *= alpha;
  }
}

}  // namespace genkern::kvd
