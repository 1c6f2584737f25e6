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
#elif defined(__AVX2__) && defined(__FMA__)
// The same float32 forms on AVX2 (8 lanes, 16 registers): scores 8 positions at a time,
// reduced together (reduce8); P V over 64 columns in 8 accumulators. They leave the rows to
// come to the hardware prefetchers: on a Zen 3 core the software prefetches of `ahead` stall
// on full miss buffers, and a float32 decode streamed ~15% faster on one thread without them
// (the 16-bit forms, with more work per byte, keep them).
// NaN entries are skipped, as in the generic form: vmaxps returns its second operand then.
GENKERN_INLINE float row_max(const float* s, int64_t n) {
  const float ninf = -std::numeric_limits<float>::infinity();
  __m256 bm = _mm256_set1_ps(ninf);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) bm = _mm256_max_ps(_mm256_loadu_ps(s + j), bm);
  alignas(32) float t[8];
  _mm256_store_ps(t, bm);
  float mx = ninf;
  for (float x : t) mx = x > mx ? x : mx;
  for (; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
  return mx;
}

// Lane t of the result is the sum of the lanes of a[t].
GENKERN_INLINE __m256 reduce8(const __m256* a) {
  const __m256 c0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));  // a0..a3: low | high
  const __m256 c1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));  // a4..a7
  return _mm256_add_ps(_mm256_permute2f128_ps(c0, c1, 0x20), _mm256_permute2f128_ps(c0, c1, 0x31));
}

// x[0 .. 8), or x[0 .. left) and zeros (masked lanes are not read) where kTail.
template <bool kTail>
GENKERN_INLINE __m256 load8(const float* x, __m256i m) {
  if constexpr (kTail) return _mm256_maskload_ps(x, m);
  else return _mm256_loadu_ps(x);
}

// The scores of rows of D values, D % 8 == 0 unless kTail (masks cost registers and loads).
template <bool kTail>
GENKERN_INLINE void scores_avx2(const float* Q, int64_t nr, const float* const* kr, int64_t nb, int64_t D, int64_t Dp,
                                float* S, const Ahead& ahead) {
  for (int64_t j0 = 0; j0 < nb; j0 += 8) {
    const int64_t cnt = std::min<int64_t>(8, nb - j0);
    const float* r[8];
    for (int t = 0; t < 8; ++t) r[t] = kr[j0 + (t < cnt ? t : 0)];  // lanes past nb: any valid row, not stored
    for (int64_t rr = 0; rr < nr; ++rr) {
      __m256 a[8];
#pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) a[t] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        const __m256i m = kTail ? lanes8(D - d) : __m256i{};
        const __m256 q = load8<kTail>(Q + rr * Dp + d, m);
#pragma GCC unroll 8
        for (int t = 0; t < 8; ++t) a[t] = _mm256_fmadd_ps(q, load8<kTail>(r[t] + d, m), a[t]);
      }
      _mm256_maskstore_ps(S + rr * kBlk + j0, lanes8(cnt), reduce8(a));
    }
  }
}

template <>
inline void block_scores(const float* Q, int64_t nr, const float* const* kr, int64_t nb, int64_t D, int64_t Dp,
                         float* S, const Ahead& ahead) {
  if (D % 8 == 0) scores_avx2<false>(Q, nr, kr, nb, D, Dp, S, ahead);
  else scores_avx2<true>(Q, nr, kr, nb, D, Dp, S, ahead);
}

// acc_rr[d0 .. d0 + 64) += P V over the positions row rr sees; all 64 columns exist unless kTail.
template <bool kTail>
GENKERN_INLINE void pv_avx2(const float* P, int64_t nr, const float* const* vr, int64_t nb, const int64_t* from,
                            const int64_t* to, int64_t d0, int64_t D, int64_t Dp, float* acc, const Ahead& ahead) {
  __m256i m[8];
  for (int u = 0; u < 8; ++u) m[u] = kTail ? lanes8(D - d0 - 8 * u) : __m256i{};
  for (int64_t rr = 0; rr < nr; ++rr) {
    float* y = acc + rr * Dp + d0;
    __m256 a[8];
#pragma GCC unroll 8
    for (int u = 0; u < 8; ++u) a[u] = load8<kTail>(y + 8 * u, m[u]);
    for (int64_t j = from[rr]; j < to[rr]; ++j) {
      const __m256 w = _mm256_set1_ps(P[rr * kBlk + j]);
#pragma GCC unroll 8
      for (int u = 0; u < 8; ++u) a[u] = _mm256_fmadd_ps(w, load8<kTail>(vr[j] + d0 + 8 * u, m[u]), a[u]);
    }
#pragma GCC unroll 8
    for (int u = 0; u < 8; ++u) {
      if constexpr (kTail) _mm256_maskstore_ps(y + 8 * u, m[u], a[u]);
      else _mm256_storeu_ps(y + 8 * u, a[u]);
    }
  }
}

template <>
inline void block_pv(const float* P, int64_t nr, const float* const* vr, int64_t nb, const int64_t* from,
                     const int64_t* to, int64_t D, int64_t Dp, float* acc, const Ahead& ahead) {
  for (int64_t d0 = 0; d0 < D; d0 += 64) {  // 64 columns (8 registers) of every row per pass
    if (D - d0 >= 64) pv_avx2<false>(P, nr, vr, nb, from, to, d0, D, Dp, acc, ahead);
    else pv_avx2<true>(P, nr, vr, nb, from, to, d0, D, Dp, acc, ahead);
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
