// Shared helpers for the CPU kernels: argument checks and build facts.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

namespace genkern {

// Checks raise c10::ValueError / c10::TypeError, which reach Python as
// ValueError / TypeError, so a bad argument never gets near memory.
#define GENKERN_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)
#define GENKERN_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, __VA_ARGS__)

inline void check_cpu(const at::Tensor& t, const char* name) {
  GENKERN_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor for the C++ kernels, got ", t.device());
}

inline void check_float(const at::Tensor& t, const char* name) {
  auto s = t.scalar_type();
  GENKERN_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, name,
                     " must be float16, bfloat16, float32 or float64, got ", s);
}

inline void check_same(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  GENKERN_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), " but ", ref_name,
                     " has ", ref.scalar_type());
  GENKERN_CHECK_VALUE(t.sizes() == ref.sizes(), name, " has shape ", t.sizes(), " but ", ref_name, " has ",
                      ref.sizes());
}

// --- vectorisable float32 math -------------------------------------------------------
// Branch-free, inlined scalar code that GCC vectorises inside `#pragma omp simd`
// loops (glibc's libmvec is only used under -ffast-math, which we avoid: it would
// also break the magic-number rounding below). Selects need -fno-trapping-math to be
// if-converted without AVX-512 masks (setup.py sets it). Accuracy is ~1-2 ulp on the
// ranges the kernels use; Cephes polynomials.
#define GENKERN_INLINE inline __attribute__((always_inline))

GENKERN_INLINE float bits_to_float(uint32_t b) { return __builtin_bit_cast(float, b); }
GENKERN_INLINE uint32_t float_to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

// exp(x) for float32: x = n ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2),
// exp(r) by a degree-6 polynomial, 2^n built in the exponent field. n is rounded by
// adding 1.5 * 2^23 (no float->int conversion, so NaN stays well defined; it
// propagates through r). Inputs are clamped so that 2^(n-1) stays a normal number;
// results below ~2.4e-38 flush to 0, above FLT_MAX become +inf.
GENKERN_INLINE float exp_f32(float x) {
  const float kMagic = 12582912.0f;  // 1.5 * 2^23
  const float kHi = 88.72283f, kLo = -86.6f;
  float xc = x > kHi ? kHi : (x < kLo ? kLo : x);
  float t = xc * 1.44269504088896341f + kMagic;
  float n = t - kMagic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // bits(t) = bits(kMagic) + n; scale = 2^(n-1), times 2 below, so n = 128 works.
  float scale = bits_to_float((float_to_bits(t) - 0x4B400000u + 126u) << 23);
  float y = p * scale * 2.0f;
  y = x > kHi ? std::numeric_limits<float>::infinity() : y;
  return x < kLo ? 0.0f : y;
}

// expm1(x) - x for |x| < 1 by its Taylor series (to x^11, relative error < 1e-8):
// ~x^2/2 at full precision as x -> 0, where exp(x) - 1 - x would cancel. For
// |x| >= 1, exp(x) - 1 - x loses at most a factor ~4 to cancellation.
GENKERN_INLINE float expm1_minus_x_taylor_f32(float x) {
  float q = 1.0f / 39916800.0f;  // 1/11!
  q = q * x + 1.0f / 3628800.0f;
  q = q * x + 1.0f / 362880.0f;
  q = q * x + 1.0f / 40320.0f;
  q = q * x + 1.0f / 5040.0f;
  q = q * x + 1.0f / 720.0f;
  q = q * x + 1.0f / 120.0f;
  q = q * x + 1.0f / 24.0f;
  q = q * x + 1.0f / 6.0f;
  q = q * x + 0.5f;
  return x * x * q;
}

// log(x) for positive normal float32 x: x = 2^e m with m in [sqrt(1/2), sqrt(2)),
// log(m) = f - f^2/2 + f^3 P(f), f = m - 1.
GENKERN_INLINE float log_f32(float x) {
  uint32_t b = float_to_bits(x);
  float e = static_cast<float>(static_cast<int32_t>(b >> 23) - 127);
  float m = bits_to_float((b & 0x007FFFFFu) | 0x3F800000u);
  bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1.0f : e;
  float f = m - 1.0f;
  float z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  float y = f * z * p + e * -2.12194440e-4f - 0.5f * z;
  return f + y + e * 0.693359375f;
}

// cos(2 pi u) and sin(2 pi u) for u in [0, 1). Reducing in turns is exact
// (u - q/4 needs no rounding), so only the final angle in [-pi/4, pi/4] is rounded.
GENKERN_INLINE void sincos_2pi_f32(float u, float& c, float& s) {
  const float kMagic = 12582912.0f;
  float t = u * 4.0f + kMagic;  // rint(4u), quadrant in the low bits
  uint32_t q = float_to_bits(t) & 3u;
  float a = (u - (t - kMagic) * 0.25f) * 6.28318530717958648f;
  float z = a * a;
  float sa = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * a + a;
  float ca = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
             0.5f * z + 1.0f;
  // rotate by q quarter turns: (c, s) -> (-s, c) per turn
  float c1 = (q & 1u) ? -sa : ca;
  float s1 = (q & 1u) ? ca : sa;
  c = (q & 2u) ? -c1 : c1;
  s = (q & 2u) ? -s1 : s1;
}

// --- counter-based normal noise (Triton's tl.randn4x) ---------------------------------
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
  __m512i even = _mm512_mul_epu32(x, m);                         // 64-bit products of lanes 0, 2, ..
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

// A typed handle to a genkern op, looked up once per call site (cache it in a
// function-local static): calling through it skips boxing the arguments.
template <typename Sig>
c10::TypedOperatorHandle<Sig> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Sig>();
}

inline std::string build_info() {
  std::string s = "compiler=";
#if defined(__clang__)
  s += "clang " __clang_version__;
#elif defined(__GNUC__)
  s += "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__);
#else
  s += "unknown";
#endif
  s += "; simd=";
#if defined(__AVX512F__)
  s += "avx512";
#elif defined(__AVX2__)
  s += "avx2";
#elif defined(__ARM_NEON)
  s += "neon";
#else
  s += "scalar";
#endif
  s += "; openmp=";
#if defined(_OPENMP)
  s += "on";
#else
  s += "off";
#endif
  return s;
}

}  // namespace genkern
