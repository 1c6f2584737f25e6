// Counter-based normal noise of the CPU kernels (Triton's tl.randn4x), on the float32
// math of vec_math.h.
#pragma once

#include <cstdint>

#include "vec_math.h"

namespace genkern {

// Philox4x32-10 keyed (seed_lo, seed_hi) at counter (g, 0, 0, 0) gives four words;
// each becomes a uniform u = |int32(w)| * 2^-31 (negative w as -w - 1 = ~w) and
// Box-Muller maps (u0, u1), (u2, u3) to (n0, n1), (n2, n3). Must match
// genkern/reference/reparam_kl.py: philox_normal (up to transcendental rounding).
struct PhiloxKey {
  uint32_t k0, k1;
  explicit PhiloxKey(int64_t seed)
      : k0(static_cast<uint32_t>(static_cast<uint64_t>(seed))),
        k1(static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32)) {}
};

GENKERN_INLINE float philox_uniform(uint32_t w) {
  int32_t i = static_cast<int32_t>(w);
  i ^= i >> 31;  // -i - 1 for negative i
  return static_cast<float>(i) * 4.6566127342e-10f;
}

// Box-Muller of one uniform pair; u_r is clamped so that log stays finite.
GENKERN_INLINE void box_muller_f32(float u_r, float u_theta, float& n_cos, float& n_sin) {
  // max(u_r, 1e-7f) on the bit patterns (monotonic for positive floats): a float
  // select here stops GCC from vectorising the loop.
  uint32_t b = float_to_bits(u_r);
  b = b < 0x33D6BF95u ? 0x33D6BF95u : b;  // bits of 1e-7f
  float r = std::sqrt(-2.0f * log_f32(bits_to_float(b)));
  float c, s;
  sincos_2pi_f32(u_theta, c, s);
  n_cos = r * c;
  n_sin = r * s;
}

// One Philox4x32 round (the 32x32 -> 64-bit products give both halves), then the key bump.
GENKERN_INLINE void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t& a, uint32_t& b) {
  uint64_t pb = static_cast<uint64_t>(0xCD9E8D57u) * c2;
  uint64_t pa = static_cast<uint64_t>(0xD2511F53u) * c0;
  c0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ a;
  c1 = static_cast<uint32_t>(pb);
  c2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ b;
  c3 = static_cast<uint32_t>(pa);
  a += 0x9E3779B9u;
  b += 0xBB67AE85u;
}

// Philox words of the groups g0 .. g0 + n - 1 into w[0..3][0 .. n) (one array per
// word). Explicit SIMD where available: GCC's own vectorisation of the 32x32->64-bit
// products uses slow 64-bit multiplies (vpmullq), two vpmuludq are 3x faster.
#if defined(__AVX512F__)
GENKERN_INLINE void mulhilo_x16(__m512i x, __m512i m, __m512i& hi, __m512i& lo) {
  __m512i even = _mm512_mul_epu32(x, m);                        // 64-bit products of lanes 0, 2, ..
  __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), m);  // .. and of lanes 1, 3, ..
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}
#elif defined(__AVX2__)
GENKERN_INLINE void mulhilo_x8(__m256i x, __m256i m, __m256i& hi, __m256i& lo) {
  __m256i even = _mm256_mul_epu32(x, m);
  __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}
#endif

inline void philox_words(PhiloxKey key, uint32_t g0, int64_t n, uint32_t* __restrict__ w0, uint32_t* __restrict__ w1,
                         uint32_t* __restrict__ w2, uint32_t* __restrict__ w3) {
  int64_t k = 0;
#if defined(__AVX512F__)
  const __m512i ma = _mm512_set1_epi64(0xD2511F53u), mb = _mm512_set1_epi64(0xCD9E8D57u);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; k + 16 <= n; k += 16) {
    __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(g0 + static_cast<uint32_t>(k))), lane);
    __m512i c1 = _mm512_setzero_si512(), c2 = c1, c3 = c1, ha, la, hb, lb;
    uint32_t a = key.k0, b = key.k1;
    for (int round = 0; round < 10; ++round, a += 0x9E3779B9u, b += 0xBB67AE85u) {
      mulhilo_x16(c2, mb, hb, lb);
      mulhilo_x16(c0, ma, ha, la);
      // 0x96: three-way xor in one instruction
      c0 = _mm512_ternarylogic_epi32(hb, c1, _mm512_set1_epi32(static_cast<int>(a)), 0x96);
      c2 = _mm512_ternarylogic_epi32(ha, c3, _mm512_set1_epi32(static_cast<int>(b)), 0x96);
      c1 = lb;
      c3 = la;
    }
    _mm512_storeu_si512(w0 + k, c0);
    _mm512_storeu_si512(w1 + k, c1);
    _mm512_storeu_si512(w2 + k, c2);
    _mm512_storeu_si512(w3 + k, c3);
  }
#elif defined(__AVX2__)
  const __m256i ma = _mm256_set1_epi64x(0xD2511F53u), mb = _mm256_set1_epi64x(0xCD9E8D57u);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (; k + 8 <= n; k += 8) {
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(g0 + static_cast<uint32_t>(k))), lane);
    __m256i c1 = _mm256_setzero_si256(), c2 = c1, c3 = c1, ha, la, hb, lb;
    uint32_t a = key.k0, b = key.k1;
    for (int round = 0; round < 10; ++round, a += 0x9E3779B9u, b += 0xBB67AE85u) {
      mulhilo_x8(c2, mb, hb, lb);
      mulhilo_x8(c0, ma, ha, la);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hb, c1), _mm256_set1_epi32(static_cast<int>(a)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(ha, c3), _mm256_set1_epi32(static_cast<int>(b)));
      c1 = lb;
      c3 = la;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w0 + k), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w1 + k), c1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w2 + k), c2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w3 + k), c3);
  }
#endif
  for (; k < n; ++k) {  // tail (and the portable path)
    uint32_t c0 = g0 + static_cast<uint32_t>(k), c1 = 0, c2 = 0, c3 = 0;
    uint32_t a = key.k0, b = key.k1;
    for (int round = 0; round < 10; ++round) philox_round(c0, c1, c2, c3, a, b);
    w0[k] = c0;
    w1[k] = c1;
    w2[k] = c2;
    w3[k] = c3;
  }
}

// Normals of the groups g0 .. g0 + ngroups - 1 (4 per group, in element order) into
// out[0 .. 4 * ngroups). The caller keeps g0 + ngroups <= 2^32 (uint32 counter).
inline void philox_normal_groups(PhiloxKey key, uint32_t g0, int64_t ngroups, float* __restrict__ out) {
  constexpr int64_t kChunk = 64;
  alignas(64) uint32_t w[4][kChunk];
  for (int64_t c = 0; c < ngroups; c += kChunk) {
    int64_t n = ngroups - c < kChunk ? ngroups - c : kChunk;
    philox_words(key, g0 + static_cast<uint32_t>(c), n, w[0], w[1], w[2], w[3]);
    float* o = out + 4 * c;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      float n0, n1, n2, n3;
      box_muller_f32(philox_uniform(w[0][k]), philox_uniform(w[1][k]), n0, n1);
      box_muller_f32(philox_uniform(w[2][k]), philox_uniform(w[3][k]), n2, n3);
      o[4 * k + 0] = n0;
      o[4 * k + 1] = n1;
      o[4 * k + 2] = n2;
      o[4 * k + 3] = n3;
    }
  }
}

}  // namespace genkern
