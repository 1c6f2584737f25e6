// Block primitives of the kv_decode CPU kernel for float16/bfloat16 caches, read in their own
// type: each K/V row is loaded as 16-bit values (half the bytes of float32, and the decode
// kernel is bound by the bytes it reads). Scores, the softmax and the accumulators stay
// float32, as in the float32 forms of kv_decode_blocks.h:
// - bfloat16 scores run on the bf16 dot-product instruction (AVX512-BF16) against the
//   unscaled bfloat16 query rows: exact products, float32 sums, no widening;
// - float16 scores, and P V in both types, widen the rows to float32 in registers, exactly
//   (bfloat16 is the top half of a float32; float16 through vcvtph2ps).
//
// A row is widened once per group of up to kGroup query rows, not once per query row:
// widening costs as many vector ops as the FMAs it feeds, and the FMA ports are the ones
// it shares. With AVX2 (and F16C) but no AVX-512 the same forms run 8 lanes wide; with neither,
// kLowpRows is false and the kernel widens rows into its scratch a block at a time instead.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kv_decode_blocks.h"

namespace genkern::kvd {

template <typename T>
constexpr bool kLowp = std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>;

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
constexpr bool kLowpRows = true;
constexpr int kGroup = 4;  // query rows per pass over a block: 4 accumulators (scores), 16 (P V)

// x[0 .. 16) as float32, lanes outside m zero (and not read: D need not be a multiple of 16).
GENKERN_INLINE __m512 wide16(const at::BFloat16* x, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, x);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
GENKERN_INLINE __m512 wide16(const at::Half* x, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, x)); }

// S[r * kBlk + j0 + t] = Q_r . K_{j0+t} for the R query rows at Q (stride Dp) and the cnt <= 16
// rows r[t]: one widened K vector feeds R FMAs; the 16 dot products of a row r, kept as vectors
// in `part`, are reduced together (reduce16).
template <int R, typename H>
GENKERN_INLINE void scores16(const float* Q, const H* const* r, int64_t cnt, int64_t D, int64_t Dp, float* S,
                             const Ahead* ahead, int64_t j0) {
  alignas(64) float part[R][16][16];
  for (int64_t t = 0; t < 16; ++t) {
    if (ahead != nullptr) ahead->whole(j0 + t);  // a few lines per row: spread over the block
    const H* k = r[t < cnt ? t : 0];             // lanes past cnt: any valid row, not stored
    __m512 a[R];
#pragma GCC unroll 4
    for (int u = 0; u < R; ++u) a[u] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 m = lanes(D - d);
      const __m512 kv = wide16(k + d, m);
#pragma GCC unroll 4
      for (int u = 0; u < R; ++u) a[u] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, Q + u * Dp + d), kv, a[u]);
    }
#pragma GCC unroll 4
    for (int u = 0; u < R; ++u) _mm512_store_ps(part[u][t], a[u]);
  }
  for (int u = 0; u < R; ++u) {
    __m512 v[16];
#pragma GCC unroll 16
    for (int t = 0; t < 16; ++t) v[t] = _mm512_load_ps(part[u][t]);
    _mm512_mask_storeu_ps(S + u * kBlk, lanes(cnt), reduce16(v));
  }
}

#if defined(__AVX512BF16__)
// bfloat16 scores on the bf16 dot-product instruction: 32 products per instruction, summed in
// pairs into float32 lanes, and no widening. The query rows are bfloat16 too, unscaled (the
// input itself: exact), row u at Q + u * Dp (in bfloat16 elements); the scale is applied to the scores
// (scale_scores). The products are exact in float32 (8-bit significands).
constexpr bool kRawQ = true;

GENKERN_INLINE __m512bh bf16x32(const at::BFloat16* x, int64_t left) {
  const __mmask32 m = left >= 32 ? ~__mmask32(0) : (__mmask32(1) << left) - 1u;
  return (__m512bh)_mm512_maskz_loadu_epi16(m, x);
}

template <int R>
GENKERN_INLINE void scores16(const at::BFloat16* Q, const at::BFloat16* const* r, int64_t cnt, int64_t D, int64_t Dp,
                             float* S, const Ahead* ahead, int64_t j0) {
  alignas(64) float part[R][16][16];
  for (int64_t t = 0; t < 16; ++t) {
    if (ahead != nullptr) ahead->whole(j0 + t);
    const at::BFloat16* k = r[t < cnt ? t : 0];
    __m512 a[R];
#pragma GCC unroll 4
    for (int u = 0; u < R; ++u) a[u] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32) {
      const __m512bh kv = bf16x32(k + d, D - d);
#pragma GCC unroll 4
      for (int u = 0; u < R; ++u) a[u] = _mm512_dpbf16_ps(a[u], bf16x32(Q + u * Dp + d, D - d), kv);
    }
#pragma GCC unroll 4
    for (int u = 0; u < R; ++u) _mm512_store_ps(part[u][t], a[u]);
  }
  for (int u = 0; u < R; ++u) {
    __m512 v[16];
#pragma GCC unroll 16
    for (int t = 0; t < 16; ++t) v[t] = _mm512_load_ps(part[u][t]);
    _mm512_mask_storeu_ps(S + u * kBlk, lanes(cnt), reduce16(v));
  }
}
#else
constexpr bool kRawQ = false;
#endif

// Q holds bfloat16 rows (see kRawQ) for bfloat16 caches, else float32 rows; either way row rr
// starts at byte rr * Dp * 4.
template <typename H>
GENKERN_INLINE const auto* query_rows(const float* Q) {
  if constexpr (kRawQ && std::is_same_v<H, at::BFloat16>) return reinterpret_cast<const at::BFloat16*>(Q);
  else return Q;
}

template <typename H, std::enable_if_t<kLowp<H>, int> = 0>
void block_scores(const float* Qf, int64_t nr, const H* const* kr, int64_t nb, int64_t D, int64_t Dp, float* S,
                  const Ahead& ahead) {
  const auto* Q = query_rows<H>(Qf);
  const int64_t Dq = Dp * int64_t(sizeof(float) / sizeof(*Q));  // the rows' stride in their own type
  for (int64_t r0 = 0; r0 < nr; r0 += kGroup) {
    const auto* q = Q + r0 * Dq;
    float* s = S + r0 * kBlk;
    const Ahead* a = r0 == 0 ? &ahead : nullptr;  // the stream to come, prefetched on the first pass
    for (int64_t j0 = 0; j0 < nb; j0 += 16) {
      const int64_t cnt = std::min<int64_t>(16, nb - j0);
      switch (std::min<int64_t>(kGroup, nr - r0)) {
        case 1: scores16<1>(q, kr + j0, cnt, D, Dq, s + j0, a, j0); break;
        case 2: scores16<2>(q, kr + j0, cnt, D, Dq, s + j0, a, j0); break;
        case 3: scores16<3>(q, kr + j0, cnt, D, Dq, s + j0, a, j0); break;
        default: scores16<4>(q, kr + j0, cnt, D, Dq, s + j0, a, j0); break;
      }
    }
  }
}

// acc_r[d0 .. d0 + 64) += sum_{from[r] <= j < to[r]} P[r * kBlk + j] V_j for the R query rows:
// one widened V vector feeds R FMAs. Only the positions row r sees enter: a masked one may
// hold anything, and 0 * inf or NaN is NaN.
template <int R, typename H>
GENKERN_INLINE void pv64(const float* P, const H* const* vr, const int64_t* from, const int64_t* to, int64_t d0,
                         int64_t D, int64_t Dp, float* acc, const Ahead* ahead, int64_t nb) {
  __mmask16 m[4];
  __m512 a[R][4];
  int64_t lo = nb, hi = 0;
  for (int u = 0; u < 4; ++u) m[u] = lanes(D - d0 - 16 * u);
  for (int r = 0; r < R; ++r) {
    if (from[r] < to[r]) lo = std::min(lo, from[r]), hi = std::max(hi, to[r]);
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) a[r][u] = _mm512_maskz_loadu_ps(m[u], acc + r * Dp + d0 + 16 * u);
  }
  bool same = true;  // every row sees [lo, hi) (Tnew = 1): no per-row test in the loop
  for (int r = 0; r < R; ++r) same = same && from[r] == lo && to[r] == hi;
  for (int64_t j = 0; j < nb; ++j) {
    if (ahead != nullptr) ahead->whole(j);  // rows of the next block, whether seen or not
    if (j < lo || j >= hi) continue;
    __m512 v[4];
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) v[u] = wide16(vr[j] + d0 + 16 * u, m[u]);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      if (!same && (j < from[r] || j >= to[r])) continue;
      const __m512 w = _mm512_set1_ps(P[r * kBlk + j]);
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) a[r][u] = _mm512_fmadd_ps(w, v[u], a[r][u]);
    }
  }
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) _mm512_mask_storeu_ps(acc + r * Dp + d0 + 16 * u, m[u], a[r][u]);
}

template <typename H, std::enable_if_t<kLowp<H>, int> = 0>
void block_pv(const float* P, int64_t nr, const H* const* vr, int64_t nb, const int64_t* from, const int64_t* to,
              int64_t D, int64_t Dp, float* acc, const Ahead& ahead) {
  for (int64_t d0 = 0; d0 < D; d0 += 64)
    for (int64_t r0 = 0; r0 < nr; r0 += kGroup) {
      const float* p = P + r0 * kBlk;
      float* y = acc + r0 * Dp;
      const Ahead* a = r0 == 0 && d0 == 0 ? &ahead : nullptr;
      switch (std::min<int64_t>(kGroup, nr - r0)) {
        case 1: pv64<1>(p, vr, from + r0, to + r0, d0, D, Dp, y, a, nb); break;
        case 2: pv64<2>(p, vr, from + r0, to + r0, d0, D, Dp, y, a, nb); break;
        case 3: pv64<3>(p, vr, from + r0, to + r0, d0, D, Dp, y, a, nb); break;
        default: pv64<4>(p, vr, from + r0, to + r0, d0, D, Dp, y, a, nb); break;
      }
    }
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(__AVX512F__)
// The same on AVX2 without AVX-512 (8 lanes, 16 registers; kv_decode_blocks.h has its float32
// forms then): no 16-bit masked loads, so a row's last D % 8 values go through a zeroed copy;
// no bf16 dot product, so the query rows are scaled float32 and the K rows widen like the V rows.
constexpr bool kLowpRows = true;
constexpr bool kRawQ = false;
constexpr int kGroup = 4;    // query rows per pass over a block in the scores: 4 accumulators
constexpr int kPvGroup = 2;  // and in P V: 2 x 4 accumulators of 32 columns, 4 widened V vectors

GENKERN_INLINE __m256 wide8(__m128i h, const at::BFloat16*) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
GENKERN_INLINE __m256 wide8(__m128i h, const at::Half*) { return _mm256_cvtph_ps(h); }

// x[0 .. min(left, 8)) as float32, the other lanes zero and not read.
template <typename H>
GENKERN_INLINE __m256 wide8(const H* x, int64_t left) {
  if (left >= 8) return wide8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)), x);
  alignas(16) uint16_t t[8] = {};
  std::memcpy(t, x, size_t(std::max<int64_t>(left, 0)) * 2);
  return wide8(_mm_load_si128(reinterpret_cast<const __m128i*>(t)), x);
}

// S[r * kBlk + j0 + t] = Q_r . K_{j0+t} for the R query rows at Q (stride Dp) and the cnt <= 8
// rows r[t]: one widened K vector feeds R FMAs, the 8 dot products of a row reduced together.
template <int R, typename H>
GENKERN_INLINE void scores8(const float* Q, const H* const* r, int64_t cnt, int64_t D, int64_t Dp, float* S,
                            const Ahead* ahead, int64_t j0) {
  alignas(32) float part[R][8][8];
  for (int64_t t = 0; t < 8; ++t) {
    if (ahead != nullptr) ahead->whole(j0 + t);
    const H* k = r[t < cnt ? t : 0];  // lanes past cnt: any valid row, not stored
    __m256 a[R];
#pragma GCC unroll 4
    for (int u = 0; u < R; ++u) a[u] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      const __m256i m = lanes8(D - d);
      const __m256 kv = wide8(k + d, D - d);
#pragma GCC unroll 4
      for (int u = 0; u < R; ++u) a[u] = _mm256_fmadd_ps(_mm256_maskload_ps(Q + u * Dp + d, m), kv, a[u]);
    }
#pragma GCC unroll 4
    for (int u = 0; u < R; ++u) _mm256_store_ps(part[u][t], a[u]);
  }
  for (int u = 0; u < R; ++u) {
    __m256 v[8];
#pragma GCC unroll 8
    for (int t = 0; t < 8; ++t) v[t] = _mm256_load_ps(part[u][t]);
    _mm256_maskstore_ps(S + u * kBlk, lanes8(cnt), reduce8(v));
  }
}

template <typename H, std::enable_if_t<kLowp<H>, int> = 0>
void block_scores(const float* Q, int64_t nr, const H* const* kr, int64_t nb, int64_t D, int64_t Dp, float* S,
                  const Ahead& ahead) {
  for (int64_t r0 = 0; r0 < nr; r0 += kGroup) {
    const float* q = Q + r0 * Dp;
    float* s = S + r0 * kBlk;
    const Ahead* a = r0 == 0 ? &ahead : nullptr;  // the stream to come, prefetched on the first pass
    for (int64_t j0 = 0; j0 < nb; j0 += 8) {
      const int64_t cnt = std::min<int64_t>(8, nb - j0);
      switch (std::min<int64_t>(kGroup, nr - r0)) {
        case 1: scores8<1>(q, kr + j0, cnt, D, Dp, s + j0, a, j0); break;
        case 2: scores8<2>(q, kr + j0, cnt, D, Dp, s + j0, a, j0); break;
        case 3: scores8<3>(q, kr + j0, cnt, D, Dp, s + j0, a, j0); break;
        default: scores8<4>(q, kr + j0, cnt, D, Dp, s + j0, a, j0); break;
      }
    }
  }
}

// acc_r[d0 .. d0 + 32) += sum_{from[r] <= j < to[r]} P[r * kBlk + j] V_j for the R query rows:
// one widened V vector feeds R FMAs; only the positions row r sees enter.
template <int R, typename H>
GENKERN_INLINE void pv32(const float* P, const H* const* vr, const int64_t* from, const int64_t* to, int64_t d0,
                         int64_t D, int64_t Dp, float* acc, const Ahead* ahead, int64_t nb) {
  __m256i m[4];
  __m256 a[R][4];
  int64_t lo = nb, hi = 0;
  for (int u = 0; u < 4; ++u) m[u] = lanes8(D - d0 - 8 * u);
  for (int r = 0; r < R; ++r) {
    if (from[r] < to[r]) lo = std::min(lo, from[r]), hi = std::max(hi, to[r]);
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) a[r][u] = _mm256_maskload_ps(acc + r * Dp + d0 + 8 * u, m[u]);
  }
  bool same = true;  // every row sees [lo, hi): no per-row test in the loop
  for (int r = 0; r < R; ++r) same = same && from[r] == lo && to[r] == hi;
  for (int64_t j = 0; j < nb; ++j) {
    if (ahead != nullptr) ahead->whole(j);  // rows of the next block, whether seen or not
    if (j < lo || j >= hi) continue;
    __m256 v[4];
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) v[u] = wide8(vr[j] + d0 + 8 * u, D - d0 - 8 * u);
#pragma GCC unroll 2
    for (int r = 0; r < R; ++r) {
      if (!same && (j < from[r] || j >= to[r])) continue;
      const __m256 w = _mm256_set1_ps(P[r * kBlk + j]);
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) a[r][u] = _mm256_fmadd_ps(w, v[u], a[r][u]);
    }
  }
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) _mm256_maskstore_ps(acc + r * Dp + d0 + 8 * u, m[u], a[r][u]);
}

template <typename H, std::enable_if_t<kLowp<H>, int> = 0>
void block_pv(const float* P, int64_t nr, const H* const* vr, int64_t nb, const int64_t* from, const int64_t* to,
              int64_t D, int64_t Dp, float* acc, const Ahead& ahead) {
  for (int64_t d0 = 0; d0 < D; d0 += 32)
    for (int64_t r0 = 0; r0 < nr; r0 += kPvGroup) {
      const Ahead* a = r0 == 0 && d0 == 0 ? &ahead : nullptr;
      if (nr - r0 >= 2) pv32<2>(P + r0 * kBlk, vr, from + r0, to + r0, d0, D, Dp, acc + r0 * Dp, a, nb);
      else pv32<1>(P + r0 * kBlk, vr, from + r0, to + r0, d0, D, Dp, acc + r0 * Dp, a, nb);
    }
}
#else
constexpr bool kLowpRows = false;
constexpr bool kRawQ = false;
#endif

// Whether the query rows of a scalar_t cache are kept unscaled in scalar_t (see kRawQ).
template <typename scalar_t>
constexpr bool kRawQuery = kRawQ && std::is_same_v<scalar_t, at::BFloat16>;

// The query row q (D values) where the block primitives read it: scaled acc_t, or unscaled
// in its own type (kRawQuery), row rr of a tile at Q + rr * Dp either way.
template <typename scalar_t, typename acc_t>
GENKERN_INLINE void stage_query(const scalar_t* q, int64_t D, acc_t scale, acc_t* Q) {
  if constexpr (kRawQuery<scalar_t>) std::copy(q, q + D, reinterpret_cast<scalar_t*>(Q));
  else
    for (int64_t d = 0; d < D; ++d) Q[d] = scale * static_cast<acc_t>(q[d]);
}

// The scores of nr rows times the scale, where block_scores left it out (kRawQuery).
template <typename scalar_t, typename acc_t>
GENKERN_INLINE void scale_scores(acc_t* S, int64_t nr, int64_t nb, acc_t scale) {
  if constexpr (kRawQuery<scalar_t>)
    for (int64_t rr = 0; rr < nr; ++rr)
#pragma omp simd
      for (int64_t j = 0; j < nb; ++j) S[rr * kBlk + j] *= scale;
}

// The type a block's K/V rows are handed to the block primitives in: the cache's own where
// they read it natively, else acc_t (widened into the scratch by load_as).
template <typename scalar_t, typename acc_t>
using row_t = std::conditional_t<kLowp<scalar_t> && !kLowpRows, acc_t, scalar_t>;

template <typename acc_t, typename scalar_t>
GENKERN_INLINE const row_t<scalar_t, acc_t>* load_row(const scalar_t* src, int64_t D, acc_t* buf) {
  if constexpr (std::is_same_v<row_t<scalar_t, acc_t>, scalar_t>) return src;
  else return load_as<acc_t>(src, D, buf);
}

}  // namespace genkern::kvd
